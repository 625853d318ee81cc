//! Talking to the control plane: register (`POST /agent/v1/register` with
//! the inventory), then heartbeat (`POST /agent/v1/heartbeat`) every
//! `heartbeat_secs` (or what the registration answered) with the phones and
//! the jobs finished since the last accepted report. A finished job brings
//! the next heartbeat forward (after a short pause that gathers the jobs
//! ending together), so job results and phone states reach the API at once
//! and a busy agent never goes silent. Failures retry with
//! exponential backoff (1 s doubling to 60 s); phones and jobs carry on
//! while the control plane is away. All requests carry the node token.

use std::sync::Arc;
use std::time::Duration;

use super::Daemon;
use crate::protocol::{Heartbeat, JobStatus, Registered};

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

/// Registration and heartbeats, forever.
pub async fn run(d: Arc<Daemon>) {
    if d.cfg.control_plane_url.is_empty() {
        return;
    }
    let Some(client) = client(&d) else { return };
    let mut backoff = Duration::from_secs(1);
    let mut period = Duration::from_secs(d.cfg.heartbeat_secs.max(1));
    // Register.
    loop {
        let d2 = Arc::clone(&d);
        let inv = match tokio::task::spawn_blocking(move || d2.inventory()).await {
            Ok(i) => i,
            Err(_) => return,
        };
        match post(&client, &d, "/agent/v1/register", &inv).await {
            Ok(resp) => {
                if let Ok(r) = resp.json::<Registered>().await {
                    period = Duration::from_secs(r.heartbeat_secs.max(1));
                }
                tracing::info!(control_plane = %d.cfg.control_plane_url, "registered");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "registration failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    backoff = Duration::from_secs(1);
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
        let d2 = Arc::clone(&d);
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
        let result = post(&client, &d, "/agent/v1/heartbeat", &hb)
            .await
            .map(|_| ());
        next = tokio::time::Instant::now() + period;
        match result {
            Ok(()) => backoff = Duration::from_secs(1),
            Err(e) => {
                // Keep the unreported jobs for the next attempt.
                {
                    let mut pending = d.unreported.lock().unwrap_or_else(|p| p.into_inner());
                    let mut again = jobs;
                    again.append(&mut pending);
                    *pending = again;
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "control-plane report failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}
