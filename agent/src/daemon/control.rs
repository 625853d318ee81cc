//! Talking to the control plane: register (`POST /agent/v1/register` with
//! the inventory), then heartbeat (`POST /agent/v1/heartbeat`) every
//! `heartbeat_secs` (or what the registration answered) with the phones and
//! the jobs finished since the last accepted report. A finished job brings
//! the next heartbeat forward (after a short pause that gathers the jobs
//! ending together), so job results and phone states reach the API at once
//! and a busy agent never goes silent. Failures retry with
//! exponential backoff (1 s doubling to 60 s for a registration, to the
//! heartbeat period for heartbeats); phones and jobs carry on while the
//! control plane is away. A heartbeat the control plane does not accept
//! (it forgot the host) leads to a registration again. All requests carry
//! the node token.

use std::sync::Arc;
use std::time::Duration;

use super::Daemon;
use crate::protocol::{Accepted, Heartbeat, JobStatus, Registered};

const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long an early heartbeat waits for other jobs ending with the first.
const GATHER: Duration = Duration::from_millis(200);

/// The HTTP client of the control plane, trusting `control_plane_ca`
/// beside the system's roots.
fn client(d: &Daemon) -> Option<reqwest::Client> {
    crate::tls::http_client(
        &d.cfg.control_plane_url,
        d.cfg.control_plane_ca.as_deref(),
        Duration::from_secs(10),
    )
    .map_err(|e| tracing::error!(error = %e, "control-plane client not built"))
    .ok()
}

fn url(d: &Daemon, path: &str) -> String {
    format!("{}{path}", d.cfg.control_plane_url.trim_end_matches('/'))
}

async fn post<T: serde::Serialize>(
    client: &reqwest::Client,
    d: &Daemon,
    path: &str,
    body: &T,
) -> Result<reqwest::Response, String> {
    let resp = client
        .post(url(d, path))
        .bearer_auth(&d.cfg.node_token)
        .json(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(resp)
    } else {
        Err(format!("status {}", resp.status()))
    }
}

/// Registration and heartbeats, forever. A heartbeat the control plane
/// does not accept (it forgot this host) brings a registration again.
pub async fn run(d: Arc<Daemon>) {
    if d.cfg.control_plane_url.is_empty() {
        return;
    }
    let Some(client) = client(&d) else { return };
    let mut period = Duration::from_secs(d.cfg.heartbeat_secs.max(1));
    loop {
        period = register(&d, &client, period).await;
        heartbeat(&d, &client, period).await;
        tracing::warn!("the control plane no longer knows this host; registering again");
    }
}

/// Registers (retrying with backoff); the heartbeat period answered.
async fn register(d: &Arc<Daemon>, client: &reqwest::Client, period: Duration) -> Duration {
    let mut backoff = Duration::from_secs(1);
    loop {
        let d2 = Arc::clone(d);
        let inv = match tokio::task::spawn_blocking(move || d2.inventory()).await {
            Ok(i) => i,
            Err(_) => return period,
        };
        match post(client, d, "/agent/v1/register", &inv).await {
            Ok(resp) => {
                tracing::info!(control_plane = %d.cfg.control_plane_url, "registered");
                return match resp.json::<Registered>().await {
                    Ok(r) => Duration::from_secs(r.heartbeat_secs.max(1)),
                    Err(_) => period,
                };
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "registration failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Heartbeats every `period` (sooner when jobs end) until one is not
/// accepted. Failures retry with backoff capped at the period, so a
/// control plane back from a restart hears from this host before it
/// counts it silent.
async fn heartbeat(d: &Arc<Daemon>, client: &reqwest::Client, period: Duration) {
    let mut backoff = Duration::from_secs(1);
    let mut next = tokio::time::Instant::now() + period;
    loop {
        let early = tokio::select! {
            _ = tokio::time::sleep_until(next) => false,
            _ = d.report_now.notified() => true,
        };
        if early {
            tokio::time::sleep(GATHER).await;
        }
        let jobs: Vec<JobStatus> =
            std::mem::take(&mut *d.unreported.lock().unwrap_or_else(|p| p.into_inner()));
        let d2 = Arc::clone(d);
        let (phones, encoders, share_apps, pools) = tokio::task::spawn_blocking(move || {
            let share_apps =
                d2.phones.share_paths().ok().and_then(|paths| {
                    super::transfer::share_apps(&paths, &d2.share_app_versions).ok()
                });
            let pools = d2.phones.pools().ok();
            (
                d2.phones.states(),
                d2.phones.encoder_states(),
                share_apps,
                pools,
            )
        })
        .await
        .unwrap_or_default();
        let hb = Heartbeat {
            node_id: d.node_id.clone(),
            phones,
            jobs: jobs.clone(),
            encoders,
            share_apps,
            pools,
        };
        let result = match post(client, d, "/agent/v1/heartbeat", &hb).await {
            Ok(resp) => resp
                .json::<Accepted>()
                .await
                .map_err(|e| format!("answer: {e}")),
            Err(e) => Err(e),
        };
        next = tokio::time::Instant::now() + period;
        match result {
            Ok(Accepted { accepted: true }) => backoff = Duration::from_secs(1),
            Ok(Accepted { accepted: false }) => {
                // Reported again after the registration.
                requeue(d, jobs);
                return;
            }
            Err(e) => {
                requeue(d, jobs);
                tracing::warn!(error = %e, retry_in = ?backoff, "control-plane report failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX).min(period);
            }
        }
    }
}

/// Keeps job reports that did not get through for the next attempt, ahead
/// of those that ended since.
fn requeue(d: &Daemon, jobs: Vec<JobStatus>) {
    let mut pending = d.unreported.lock().unwrap_or_else(|p| p.into_inner());
    let mut again = jobs;
    again.append(&mut pending);
    *pending = again;
}
