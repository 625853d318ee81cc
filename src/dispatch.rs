//! Job dispatch: jobs are persisted first, then sent to the owning agent
//! (`POST /v1/jobs/batch`, many per request, idempotent on `job_id`) with
//! retries; dispatched jobs are polled (`GET /v1/jobs/{id}`) until their
//! agent reports an end, so a restarted control plane resumes tracking.
//! Servers bought but not yet created are sent as `CreateServer`. Silent
//! agents are marked abnormal and their unfinished jobs fail with a reason.

use std::sync::Arc;
use std::time::Duration;

use cph_agent::protocol::{
    BatchedJob, JobBatch, JobKind, JobRequest, JobState, JobStatus, MIGRATE_RESTORE_SUFFIX,
};
use tokio::sync::Notify;

use crate::catalog::Catalog;
use crate::store::{Store, StoreError};

/// Attempts before a job that cannot reach its agent fails.
pub const MAX_ATTEMPTS: u32 = 5;

/// How far the wall clock may move apart from the monotonic one between
/// two passes of the loop before it counts as stepped.
const CLOCK_STEP_SECS: i64 = 10;

/// Whether the wall clock (Unix seconds) moved apart from the monotonic
/// one between two readings of both by more than [`CLOCK_STEP_SECS`].
fn clock_stepped(before: (std::time::Instant, i64), now: (std::time::Instant, i64)) -> bool {
    let elapsed = now.0.saturating_duration_since(before.0).as_secs() as i64;
    (now.1 - before.1 - elapsed).abs() > CLOCK_STEP_SECS
}
/// Undispatched jobs read at once.
const UNDISPATCHED_BATCH: u32 = 2000;

/// Dispatch failures.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("agent {url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("agent {url} unreachable: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("job request is invalid json: {0}")]
    Json(#[from] serde_json::Error),
}

/// Handle to wake the dispatch loop.
#[derive(Clone)]
pub struct Dispatcher {
    notify: Arc<Notify>,
}

impl Default for Dispatcher {
    fn default() -> Self {
        Self::new()
    }
}

impl Dispatcher {
    pub fn new() -> Self {
        Self {
            notify: Arc::new(Notify::new()),
        }
    }

    /// Wakes the loop to send what is pending now.
    pub fn kick(&self) {
        self.notify.notify_one();
    }
}

/// Applies an agent's job status to the store and to the phone it touched.
///
/// A migration is one CPH job in two phases: when its source side (the
/// phone written to the store) succeeds, the same job is sent to the target
/// phone's agent as a restore under `<job_id>-restore`, and its end is the
/// job's end. A report for a phase the job is no longer in is ignored.
///
/// A server's deletion that succeeded removes the server and its phones
/// (the host is free again); one that failed leaves the server abnormal,
/// to be deleted again.
pub fn apply_status(store: &Store, j: &JobStatus) -> Result<(), StoreError> {
    if j.status == JobState::Running {
        return Ok(());
    }
    let row_id = j
        .job_id
        .strip_suffix(MIGRATE_RESTORE_SUFFIX)
        .unwrap_or(&j.job_id);
    match job_request(store, row_id)? {
        Some((row, req)) if req.job_id == j.job_id => apply_to(store, &row, &req, j),
        _ => Ok(()),
    }
}

/// A job's row and the request its agent was sent.
fn job_request(
    store: &Store,
    row_id: &str,
) -> Result<Option<(crate::store::Job, JobRequest)>, StoreError> {
    let Some(row) = store.job_any(row_id)? else {
        return Ok(None);
    };
    let req: JobRequest = serde_json::from_str(&row.request)?;
    Ok(Some((row, req)))
}

/// [`apply_status`] of the job `row` that was sent as `req`.
fn apply_to(
    store: &Store,
    row: &crate::store::Job,
    req: &JobRequest,
    j: &JobStatus,
) -> Result<(), StoreError> {
    let status: i32 = j.status.into();
    let row_id = row.job_id.as_str();
    if let (
        JobState::Succeeded,
        JobKind::Migrate {
            object,
            keep_property,
            target: Some(t),
            platform_object,
        },
    ) = (j.status, &req.kind)
    {
        // The target phone may have gone since the job was accepted (its
        // server switched to another host, or deleted): its restore would
        // land on a phone being released.
        if !target_in_place(store, &row.project_id, t)? {
            let msg = format!(
                "the phone was written to {}/{}, but the target phone {} is no longer on \
                 server {} (switched to another host or deleted); restore it with \
                 batch-restore",
                object.bucket, object.key, t.phone_id, t.server_id
            );
            return fail_job(store, row_id, "CPS.0233", &msg);
        }
        let restore = JobRequest {
            job_id: format!("{row_id}{MIGRATE_RESTORE_SUFFIX}"),
            request_id: req.request_id.clone(),
            server_id: t.server_id.clone(),
            phone_id: Some(t.phone_id.clone()),
            kind: JobKind::Restore {
                object: object.clone(),
                property: keep_property.then(|| t.property.clone()),
                whole_phone: true,
                remove_object: *platform_object,
            },
        };
        store.retarget_job(row_id, &t.node_id, &serde_json::to_string(&restore)?)?;
        tracing::info!(job_id = %row_id, target = %t.phone_id, "migration written, restoring on the target");
        return Ok(());
    }
    // A phone's properties are what its agent applied, so a refused or
    // failed change leaves the recorded ones as they were. Recorded before
    // the job reads as succeeded, so whoever sees it ended sees them.
    if let (1, JobState::Succeeded, Some(phone_id)) = (row.status, j.status, &req.phone_id) {
        let (property, replace) = match &req.kind {
            JobKind::UpdateProperty { property } => (Some(property), false),
            JobKind::RestartPhone { property, .. } => (property.as_ref(), false),
            JobKind::ResetPhone { property, .. } | JobKind::Restore { property, .. } => {
                (property.as_ref(), true)
            }
            _ => (None, false),
        };
        if let Some(property) = property {
            store.apply_phone_property(phone_id, property, replace)?;
        }
    }
    let execute = j
        .execute_msg
        .as_deref()
        .map(cph_agent::protocol::cap_execute_msg);
    let ended = store.update_job(
        row_id,
        status,
        j.error_code.as_deref(),
        j.error_msg.as_deref(),
        execute.as_deref(),
    )?;
    if let (true, JobState::Succeeded, JobKind::CreateImage { image_id, .. }) =
        (ended, j.status, &req.kind)
    {
        let size = j
            .execute_msg
            .as_deref()
            .and_then(cph_agent::protocol::image_size);
        store.finish_image(image_id, size)?;
        tracing::info!(%image_id, ?size, "image creation ended");
    }
    if let (
        true,
        JobState::Succeeded,
        JobKind::ChangeFlavor {
            server_model_name,
            flavor,
        },
    ) = (ended, j.status, &req.kind)
    {
        store.change_server_model(
            &row.project_id,
            &req.server_id,
            server_model_name,
            &flavor.flavor_id,
        )?;
        tracing::info!(server_id = %req.server_id, %server_model_name, phone_model = %flavor.flavor_id, "server model changed");
    }
    if let (true, JobState::Failed) = (ended, j.status) {
        failed_effects(store, req, &row.node_id)?;
    }
    if let (true, JobState::Succeeded) = (ended, j.status) {
        match &req.kind {
            JobKind::UpdateKeypair {
                keypair_name: Some(name),
                ..
            } if req.phone_id.is_none() => {
                store.set_server_keypair(&row.project_id, &req.server_id, name)?;
            }
            JobKind::AttachShareFs { fs } => {
                store.set_server_share_fs(&req.server_id, &fs.fs_id, Some(&fs.source))?
            }
            JobKind::DetachShareFs { fs_id } => {
                store.set_server_share_fs(&req.server_id, fs_id, None)?
            }
            _ => {}
        }
    }
    if let (true, JobState::Succeeded, JobKind::DeleteServer) = (ended, j.status, &req.kind) {
        store.release_server(&req.server_id)?;
        tracing::info!(server_id = %req.server_id, "server deleted, its host is free");
    }
    Ok(())
}

/// Whether a migration's target phone is still where the job was accepted
/// for: on its server, on the host the restore is to be sent to.
fn target_in_place(
    store: &Store,
    project_id: &str,
    t: &cph_agent::protocol::MigrateTarget,
) -> Result<bool, StoreError> {
    if store
        .phone(project_id, &t.phone_id)?
        .is_none_or(|p| p.server_id != t.server_id)
    {
        return Ok(false);
    }
    server_on(store, &t.server_id, &t.node_id)
}

/// Whether the server `server_id` is on the host `node_id` (it may have
/// been switched away or released since a job was made for it there).
fn server_on(store: &Store, server_id: &str, node_id: &str) -> Result<bool, StoreError> {
    Ok(store
        .server_by_id(server_id)?
        .is_some_and(|s| s.node_id == node_id))
}

/// What a failed job leaves to the control plane, whoever failed it (its
/// agent, or the control plane giving up on a silent or unreachable one):
/// an image being made reads failed, the phones a server's creation did
/// not make read failed, a server whose deletion failed reads abnormal.
/// A server's effects are left out once it is no longer on the job's host
/// (switched away, or released with a forgotten host): its phones and
/// status are then another host's.
fn failed_effects(store: &Store, req: &JobRequest, node_id: &str) -> Result<(), StoreError> {
    let on_host = || server_on(store, &req.server_id, node_id);
    match &req.kind {
        JobKind::CreateImage { image_id, .. } => {
            store.finish_image(image_id, None)?;
            tracing::info!(%image_id, "image creation failed");
        }
        JobKind::CreateServer { .. } if on_host()? => {
            // Else they would read as being created for ever.
            let failed = store.fail_unmade_phones(&req.server_id)?;
            store.refresh_server_status(node_id)?;
            tracing::warn!(server_id = %req.server_id, failed, "server not fully made on its new host");
        }
        JobKind::DeleteServer if on_host()? => {
            store.set_server_abnormal(&req.server_id)?;
            tracing::warn!(server_id = %req.server_id, "server deletion failed");
        }
        _ => {}
    }
    Ok(())
}

/// [`failed_effects`] of a job the store has just failed.
pub fn after_failure(store: &Store, job_id: &str) -> Result<(), StoreError> {
    match job_request(store, job_id)? {
        Some((row, req)) => failed_effects(store, &req, &row.node_id),
        None => Ok(()),
    }
}

/// [`after_failure`] of each job the store failed in bulk (a silent,
/// forgotten or switched host); an error is logged and the rest go on.
pub fn after_failures(store: &Store, job_ids: &[String]) {
    for job_id in job_ids {
        if let Err(e) = after_failure(store, job_id) {
            tracing::error!(error = %e, %job_id, "failed job's effects not applied");
        }
    }
}

/// Fails a job the control plane gives up on, as a failure its agent
/// reported would (its effects included); nothing when it had ended.
pub fn fail_job(store: &Store, job_id: &str, code: &str, msg: &str) -> Result<(), StoreError> {
    let Some((row, req)) = job_request(store, job_id)? else {
        return Ok(());
    };
    let failed = JobStatus {
        job_id: req.job_id.clone(),
        status: JobState::Failed,
        error_code: Some(code.to_string()),
        error_msg: Some(msg.to_string()),
        execute_msg: None,
    };
    apply_to(store, &row, &req, &failed)
}

/// The loop's settings.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub node_token: String,
    pub heartbeat_secs: u64,
    /// Missed heartbeats before a node counts as silent.
    pub silent_after: u64,
    /// A certificate trusted for agents served over TLS.
    pub agent_ca: Option<reqwest::Certificate>,
}

/// Runs dispatch, polling and liveness until the task is dropped.
pub async fn run(store: Arc<Store>, catalog: Arc<Catalog>, d: Dispatcher, cfg: LoopConfig) {
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if let Some(ca) = &cfg.agent_ca {
        builder = builder.add_root_certificate(ca.clone());
    }
    let client = match builder.build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the agent http client");
            return;
        }
    };
    // Agents get a whole silent period to reach a control plane back from
    // a restart before their servers read abnormal and their jobs fail.
    match store.restart_liveness() {
        Ok(n) if n > 0 => tracing::info!(nodes = n, "liveness counted from this start"),
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "liveness not reset at start"),
    }
    let mut last_poll = std::time::Instant::now();
    // Jobs whose delivery failed, since when.
    let mut undelivered: std::collections::HashMap<String, std::time::Instant> =
        std::collections::HashMap::new();
    // Servers whose creation their agent did not take: since when, how
    // many times.
    let mut refused: std::collections::HashMap<String, (std::time::Instant, u32)> =
        std::collections::HashMap::new();
    let mut last_pass = (std::time::Instant::now(), crate::store::now_secs());
    loop {
        // Liveness is kept in wall-clock seconds: when the clock stepped
        // (an NTP correction, a paused machine resumed) it counts from
        // now, as after a restart, rather than every agent reading silent
        // at once (or a dead one late).
        let now = (std::time::Instant::now(), crate::store::now_secs());
        if clock_stepped(last_pass, now) {
            match store.restart_liveness() {
                Ok(n) => tracing::warn!(nodes = n, "the clock stepped; liveness counted from now"),
                Err(e) => tracing::error!(error = %e, "liveness not reset after a clock step"),
            }
        }
        last_pass = now;
        let deadline = crate::store::now_secs() - (cfg.heartbeat_secs * cfg.silent_after) as i64;
        match store.mark_silent_nodes(deadline) {
            Ok((ids, failed)) => {
                for id in ids {
                    tracing::warn!(node_id = %id, "agent silent, server and phones marked abnormal");
                }
                after_failures(&store, &failed);
            }
            Err(e) => tracing::error!(error = %e, "liveness check failed"),
        }
        if let Err(e) = create_servers(&store, &client, &cfg, &mut refused).await {
            tracing::warn!(error = %e, "server creation dispatch failed");
        }
        if let Err(e) = crate::events::start_due(&store, &catalog, crate::store::now_ms()) {
            tracing::warn!(error = %e, "scheduled events not started");
        }
        if let Err(e) = send_jobs(&store, &client, &cfg, &mut undelivered).await {
            tracing::warn!(error = %e, "job dispatch failed");
        }
        if last_poll.elapsed() >= Duration::from_secs(cfg.heartbeat_secs.max(1)) {
            last_poll = std::time::Instant::now();
            if let Err(e) = poll_jobs(&store, &client, &cfg).await {
                tracing::warn!(error = %e, "job polling failed");
            }
            if let Err(e) = release_hosts(&store, &client, &cfg).await {
                tracing::warn!(error = %e, "host release failed");
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), d.notify.notified()).await;
    }
}

async fn post_json<T: serde::Serialize>(
    client: &reqwest::Client,
    cfg: &LoopConfig,
    url: String,
    body: &T,
) -> Result<reqwest::Response, DispatchError> {
    let resp = client
        .post(&url)
        .bearer_auth(&cfg.node_token)
        .json(body)
        .send()
        .await
        .map_err(|source| DispatchError::Http {
            url: url.clone(),
            source,
        })?;
    if !resp.status().is_success() {
        return Err(DispatchError::Status {
            url,
            status: resp.status().as_u16(),
        });
    }
    Ok(resp)
}

/// Sends each server bought to its agent (`POST /v1/servers`) until it is
/// taken. One its agent, alive, keeps refusing with an error answer (not
/// out of reach, not shutting down: [`MAX_ATTEMPTS`] times and for as long
/// as an agent may be silent) is given up as when its creation job fails:
/// its phones read creation failed (-8), and the server no longer creating.
async fn create_servers(
    store: &Arc<Store>,
    client: &reqwest::Client,
    cfg: &LoopConfig,
    refused: &mut std::collections::HashMap<String, (std::time::Instant, u32)>,
) -> Result<(), DispatchError> {
    let patience = Duration::from_secs(cfg.heartbeat_secs.max(1) * cfg.silent_after.max(1));
    let waiting = store.servers_to_create()?;
    refused.retain(|id, _| waiting.iter().any(|s| &s.server_id == id));
    for s in waiting {
        let Some(node) = store.node(&s.node_id)? else {
            continue;
        };
        let Some(text) = store.server_create_request(&s.server_id)? else {
            continue;
        };
        let req: serde_json::Value = serde_json::from_str(&text)?;
        let url = format!("{}/v1/servers", node.agent_url.trim_end_matches('/'));
        match post_json(client, cfg, url, &req).await {
            Ok(_) => {
                refused.remove(&s.server_id);
                store.mark_server_created(&s.server_id)?;
                tracing::info!(server_id = %s.server_id, node_id = %s.node_id, "server creation sent");
            }
            Err(e) => {
                tracing::warn!(server_id = %s.server_id, error = %e, "server creation not sent");
                // Only an answer refusing it counts: not an agent out of
                // reach or shutting down (503) for a restart.
                let refusal = matches!(e, DispatchError::Status { status, .. } if status != 503);
                if !refusal {
                    continue;
                }
                let (since, tries) = refused
                    .entry(s.server_id.clone())
                    .or_insert_with(|| (std::time::Instant::now(), 0));
                *tries += 1;
                if *tries >= MAX_ATTEMPTS && since.elapsed() >= patience {
                    refused.remove(&s.server_id);
                    store.mark_server_created(&s.server_id)?;
                    let failed = store.fail_unmade_phones(&s.server_id)?;
                    store.refresh_server_status(&s.node_id)?;
                    tracing::error!(server_id = %s.server_id, phones = failed, error = %e, "server creation given up");
                }
            }
        }
    }
    Ok(())
}

/// Jobs sent to one agent in one request at most.
const BATCH_MAX: usize = 200;

/// What became of sending one job: its row, whether the agent took it, and
/// the status it answered.
type Sent = (String, bool, Option<JobStatus>);

/// Sends every undispatched job: to each agent in batches (one request and
/// one flush on the agent for many jobs), sync shells alone, since their
/// answer carries the output.
async fn send_jobs(
    store: &Arc<Store>,
    client: &reqwest::Client,
    cfg: &LoopConfig,
    undelivered: &mut std::collections::HashMap<String, std::time::Instant>,
) -> Result<(), DispatchError> {
    // An agent restarting (an upgrade) is out of reach a few seconds: a
    // job is given up only after [`MAX_ATTEMPTS`] and as long as the agent
    // may be silent before it counts as gone.
    let patience = Duration::from_secs(cfg.heartbeat_secs.max(1) * cfg.silent_after.max(1));
    loop {
        let jobs = store.undispatched_jobs(UNDISPATCHED_BATCH)?;
        if jobs.len() < UNDISPATCHED_BATCH as usize {
            // Every job still to send is here: those no longer waiting
            // (ended some other way, an agent gone silent) are forgotten.
            let waiting: std::collections::HashSet<&str> =
                jobs.iter().map(|j| j.job_id.as_str()).collect();
            undelivered.retain(|id, _| waiting.contains(id.as_str()));
        }
        if jobs.is_empty() {
            return Ok(());
        }
        let mut nodes = std::collections::HashMap::new();
        let mut batches: std::collections::HashMap<String, Vec<(String, JobRequest)>> =
            std::collections::HashMap::new();
        let mut set = tokio::task::JoinSet::new();
        for j in jobs {
            let node = match nodes.get(&j.node_id) {
                Some(n) => Some(Clone::clone(n)),
                None => {
                    let n = store.node(&j.node_id)?;
                    if let Some(n) = &n {
                        nodes.insert(j.node_id.clone(), n.clone());
                    }
                    n
                }
            };
            let Some(node) = node.filter(|n| n.alive) else {
                fail_job(
                    store,
                    &j.job_id,
                    "CPS.0054",
                    "the agent of the server is not reachable",
                )?;
                continue;
            };
            let req: JobRequest = serde_json::from_str(&j.request)?;
            let base = node.agent_url.trim_end_matches('/').to_string();
            if matches!(req.kind, JobKind::SyncShell { .. }) {
                let (client, cfg) = (client.clone(), cfg.clone());
                set.spawn(async move { vec![post_one(&client, &cfg, &base, j.job_id, req).await] });
            } else {
                batches.entry(base).or_default().push((j.job_id, req));
            }
        }
        // An agent's batches go one after another, in the jobs' order,
        // and stop at the first not delivered: the agent queues a phone's
        // jobs as they arrive, so a later batch must never overtake an
        // earlier one (the rest go on a later pass, after it).
        for (base, jobs) in batches {
            let (client, cfg) = (client.clone(), cfg.clone());
            set.spawn(async move {
                let mut out = Vec::new();
                let mut jobs = jobs.into_iter().peekable();
                while jobs.peek().is_some() {
                    let chunk: Vec<_> = jobs.by_ref().take(BATCH_MAX).collect();
                    let sent = post_batch(&client, &cfg, &base, chunk).await;
                    let delivered = sent.iter().all(|(_, ok, _)| *ok);
                    out.extend(sent);
                    if !delivered {
                        break;
                    }
                }
                out
            });
        }
        let mut sent: Vec<Sent> = Vec::new();
        while let Some(res) = set.join_next().await {
            if let Ok(v) = res {
                sent.extend(v);
            }
        }
        let marks: Vec<(&str, bool)> = sent.iter().map(|(id, ok, _)| (id.as_str(), *ok)).collect();
        let attempts = store.mark_dispatched_many(&marks)?;
        let mut progress = false;
        for ((job_id, ok, status), attempts) in sent.into_iter().zip(attempts) {
            if ok {
                progress = true;
                undelivered.remove(&job_id);
                if let Some(s) = status {
                    apply_status(store, &s)?;
                }
                continue;
            }
            let since = *undelivered
                .entry(job_id.clone())
                .or_insert_with(std::time::Instant::now);
            if attempts >= MAX_ATTEMPTS && since.elapsed() >= patience {
                undelivered.remove(&job_id);
                fail_job(
                    store,
                    &job_id,
                    "CPS.0054",
                    "the job could not be delivered to the agent of its server",
                )?;
            }
        }
        if !progress {
            return Ok(());
        }
    }
}

/// Sends one job (`POST /v1/jobs`).
async fn post_one(
    client: &reqwest::Client,
    cfg: &LoopConfig,
    base: &str,
    row_id: String,
    req: JobRequest,
) -> Sent {
    let url = format!("{base}/v1/jobs");
    match post_json(client, cfg, url, &req).await {
        Ok(resp) => {
            let status = resp.json::<JobStatus>().await.ok();
            (row_id, true, status)
        }
        Err(e) => {
            tracing::warn!(job_id = %req.job_id, error = %e, "job not delivered");
            (row_id, false, None)
        }
    }
}

/// Sends jobs of one agent together (`POST /v1/jobs/batch`); an agent
/// without batches (404/405) gets them one by one.
async fn post_batch(
    client: &reqwest::Client,
    cfg: &LoopConfig,
    base: &str,
    jobs: Vec<(String, JobRequest)>,
) -> Vec<Sent> {
    let (rows, reqs): (Vec<String>, Vec<JobRequest>) = jobs.into_iter().unzip();
    let batch = JobBatch { jobs: reqs };
    let url = format!("{base}/v1/jobs/batch");
    let answers = match post_json(client, cfg, url, &batch).await {
        Ok(resp) => resp
            .json::<Vec<BatchedJob>>()
            .await
            .map_err(|e| e.to_string()),
        Err(DispatchError::Status {
            status: 404 | 405, ..
        }) => {
            let mut out = Vec::with_capacity(rows.len());
            for (row, req) in rows.into_iter().zip(batch.jobs) {
                out.push(post_one(client, cfg, base, row, req).await);
            }
            return out;
        }
        Err(e) => Err(e.to_string()),
    };
    match answers {
        Ok(answers) if answers.len() == rows.len() => rows
            .into_iter()
            .zip(answers)
            .map(|(row, a)| match a.status {
                Some(s) => (row, true, Some(s)),
                None => {
                    // A refusal (an id or a job the agent cannot take) is
                    // the job's end, with the agent's reason; sending it
                    // again would meet the same.
                    tracing::warn!(job_id = %a.job_id, code = ?a.error_code, error = ?a.error_msg, "job refused by its agent");
                    let refused = JobStatus {
                        job_id: a.job_id,
                        status: JobState::Failed,
                        error_code: Some(a.error_code.unwrap_or_else(|| "CPS.0003".into())),
                        error_msg: Some(
                            a.error_msg
                                .unwrap_or_else(|| "refused by the agent of its server".into()),
                        ),
                        execute_msg: None,
                    };
                    (row, true, Some(refused))
                }
            })
            .collect(),
        other => {
            let error = match other {
                Ok(a) => format!("{} answers for {} jobs", a.len(), rows.len()),
                Err(e) => e,
            };
            tracing::warn!(agent = %base, jobs = rows.len(), %error, "job batch not delivered");
            rows.into_iter().map(|r| (r, false, None)).collect()
        }
    }
}

/// What a poll of a running job found.
enum Polled {
    /// The agent does not know it (it restarted before accepting it).
    Lost(String),
    Status(JobStatus),
}

/// Asks the agents how their running jobs are: each host's jobs one after
/// another, the hosts at once. A host not alive is left to the liveness
/// check, and one that does not answer to the next pass, so a host gone
/// quiet holds up the loop for one request's timeout, not one per job.
async fn poll_jobs(
    store: &Arc<Store>,
    client: &reqwest::Client,
    cfg: &LoopConfig,
) -> Result<(), DispatchError> {
    let mut bases: std::collections::HashMap<String, Option<String>> =
        std::collections::HashMap::new();
    let mut by_host: std::collections::HashMap<String, Vec<(String, String)>> =
        std::collections::HashMap::new();
    for j in store.dispatched_running_jobs(500)? {
        let base = match bases.get(&j.node_id) {
            Some(b) => b.clone(),
            None => {
                let b = store
                    .node(&j.node_id)?
                    .filter(|n| n.alive)
                    .map(|n| n.agent_url.trim_end_matches('/').to_string());
                bases.insert(j.node_id.clone(), b.clone());
                b
            }
        };
        let Some(base) = base else {
            continue;
        };
        // The agent knows the job by its request's id (a migration's
        // restore phase has its own).
        let agent_job_id = serde_json::from_str::<JobRequest>(&j.request)
            .map(|r| r.job_id)
            .unwrap_or_else(|_| j.job_id.clone());
        let url = format!("{base}/v1/jobs/{agent_job_id}");
        by_host.entry(j.node_id).or_default().push((j.job_id, url));
    }
    let mut set = tokio::task::JoinSet::new();
    for jobs in by_host.into_values() {
        let (client, token) = (client.clone(), cfg.node_token.clone());
        set.spawn(async move {
            let mut found = Vec::new();
            for (row, url) in jobs {
                match client.get(&url).bearer_auth(&token).send().await {
                    Ok(r) if r.status().as_u16() == 404 => found.push(Polled::Lost(row)),
                    Ok(r) if r.status().is_success() => {
                        if let Ok(s) = r.json::<JobStatus>().await {
                            found.push(Polled::Status(s));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            found
        });
    }
    while let Some(found) = set.join_next().await {
        for p in found.unwrap_or_default() {
            match p {
                // Sent again.
                Polled::Lost(row) => {
                    store.mark_dispatched(&row, false)?;
                }
                Polled::Status(s) => apply_status(store, &s)?,
            }
        }
    }
    Ok(())
}

/// Frees the hosts servers were switched away from: each one's agent gets
/// the host's release job (a [`JobKind::DeleteServer`] of the server that
/// left), sent again while the agent does not know it; the host is free
/// once the job has succeeded. A failed release keeps the host out of
/// sale (the operator forgets it with `cph admin host forget` once silent,
/// or the server's phones are removed by hand).
async fn release_hosts(
    store: &Arc<Store>,
    client: &reqwest::Client,
    cfg: &LoopConfig,
) -> Result<(), DispatchError> {
    for (node, job_id) in store.releasing_hosts()? {
        let Some(server_id) = node.releasing_server.clone() else {
            continue;
        };
        let base = node.agent_url.trim_end_matches('/');
        let resp = client
            .get(format!("{base}/v1/jobs/{job_id}"))
            .bearer_auth(&cfg.node_token)
            .send()
            .await;
        let status = match resp {
            Ok(r) if r.status().as_u16() == 404 => None,
            Ok(r) if r.status().is_success() => match r.json::<JobStatus>().await {
                Ok(s) => Some(s),
                Err(_) => continue,
            },
            _ => continue,
        };
        match status.map(|s| (s.status, s.error_msg)) {
            None => {
                let req = JobRequest {
                    job_id: job_id.clone(),
                    request_id: job_id.clone(),
                    server_id: server_id.clone(),
                    phone_id: None,
                    kind: JobKind::DeleteServer,
                };
                match post_json(client, cfg, format!("{base}/v1/jobs"), &req).await {
                    Ok(_) => {
                        tracing::info!(node_id = %node.node_id, %server_id, "release of the host sent")
                    }
                    Err(e) => {
                        tracing::warn!(node_id = %node.node_id, error = %e, "release not sent")
                    }
                }
            }
            Some((JobState::Succeeded, _)) => {
                store.host_released(&node.node_id, &job_id)?;
                tracing::info!(node_id = %node.node_id, %server_id, "host released, free again");
            }
            Some((JobState::Running, _)) => {}
            Some((JobState::Failed, error)) => {
                tracing::warn!(node_id = %node.node_id, %server_id, ?error, "host release failed, host kept out of sale")
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_step_is_told_from_time_passing() {
        let t0 = std::time::Instant::now();
        let t1 = t0 + Duration::from_secs(30);
        // 30 s passed on both clocks: no step, however long the pass.
        assert!(!clock_stepped((t0, 1000), (t1, 1030)));
        assert!(!clock_stepped((t0, 1000), (t1, 1035)));
        // The wall clock jumped ahead (or the machine was paused), or back.
        assert!(clock_stepped((t0, 1000), (t1, 1100)));
        assert!(clock_stepped((t0, 1000), (t1, 980)));
    }
}
