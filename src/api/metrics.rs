//! `GET /metrics`: the fleet in the Prometheus text format, read from the
//! store at each scrape, behind the node token (a scraper sends it as a
//! bearer token): hosts alive, silent, free and being released; servers,
//! phones, jobs and scheduled events by status.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use cph_agent::metrics::{labels, render_families, Family, CONTENT_TYPE};

use super::{ApiError, Failure, Shared};

/// Samples `{label="key"} count` of a grouping query.
fn by(st: &Shared, label: &str, sql: &str) -> Result<Vec<(String, f64)>, ApiError> {
    Ok(st
        .store
        .counts(sql)?
        .into_iter()
        .map(|(k, n)| (labels(&[(label, &k)]), n as f64))
        .collect())
}

/// The one sample of a `SELECT '', COUNT(*) ...` query.
fn count(st: &Shared, sql: &str) -> Result<Vec<(String, f64)>, ApiError> {
    let n = st.store.counts(sql)?.first().map_or(0, |(_, n)| *n);
    Ok(vec![(String::new(), n as f64)])
}

fn families(st: &Shared) -> Result<Vec<Family>, ApiError> {
    let free: Vec<(String, f64)> = st
        .store
        .free_hosts_by_model()?
        .into_iter()
        .map(|(model, n)| (labels(&[("server_model", &model)]), f64::from(n)))
        .collect();
    Ok(vec![
        (
            "cph_hosts",
            "Hosts of the fleet by liveness of their agent.",
            "gauge",
            by(
                st,
                "state",
                "SELECT CASE WHEN alive = 1 THEN 'alive' ELSE 'silent' END, COUNT(*)
                 FROM nodes GROUP BY 1",
            )?,
        ),
        (
            "cph_hosts_free",
            "Hosts that can be bought, by server model.",
            "gauge",
            free,
        ),
        (
            "cph_hosts_releasing",
            "Hosts out of sale until their agent deleted the phones of a server that left.",
            "gauge",
            count(
                st,
                "SELECT '', COUNT(*) FROM nodes WHERE releasing_server IS NOT NULL",
            )?,
        ),
        (
            "cph_hosts_cordoned",
            "Hosts the operator keeps out of sale.",
            "gauge",
            count(st, "SELECT '', COUNT(*) FROM nodes WHERE cordoned = 1")?,
        ),
        (
            "cph_servers",
            "Servers by status (the reference's codes).",
            "gauge",
            by(
                st,
                "status",
                "SELECT status, COUNT(*) FROM servers GROUP BY status",
            )?,
        ),
        (
            "cph_phones",
            "Phones by status (the reference's codes).",
            "gauge",
            by(
                st,
                "status",
                "SELECT status, COUNT(*) FROM phones GROUP BY status",
            )?,
        ),
        (
            "cph_jobs",
            "Jobs by status: 1 running, 2 succeeded, -1 failed.",
            "gauge",
            by(
                st,
                "status",
                "SELECT status, COUNT(*) FROM jobs GROUP BY status",
            )?,
        ),
        (
            "cph_jobs_undispatched",
            "Running jobs not yet delivered to their agent.",
            "gauge",
            count(
                st,
                "SELECT '', COUNT(*) FROM jobs WHERE status = 1 AND dispatched = 0",
            )?,
        ),
        (
            "cph_scheduled_events",
            "Scheduled events by state.",
            "gauge",
            by(
                st,
                "state",
                "SELECT state, COUNT(*) FROM scheduled_events GROUP BY state",
            )?,
        ),
    ])
}

pub async fn metrics(State(st): State<Shared>, headers: HeaderMap) -> Response {
    let r = super::agent::check_token(&st, &headers).and_then(|()| families(&st));
    match r {
        Ok(f) => (
            [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
            render_families(&f),
        )
            .into_response(),
        Err(e) => Failure(e).into_response(),
    }
}
