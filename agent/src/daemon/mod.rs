//! The node agent daemon (`cph-agent run`).
//!
//! Serves the agent protocol ([`crate::protocol`]) over HTTP on `listen`,
//! every route behind `Authorization: Bearer <node_token>` (compared in
//! constant time; an empty configured token refuses everything). Jobs are
//! recorded on disk ([`jobstore`]) before they are acknowledged and are
//! idempotent on `job_id`. Recording a job and queueing (or running) it
//! happen in a task of their own that the request only waits for: a
//! request dropped half-way (the control plane timed out) leaves no job
//! recorded as running that never runs.
//!
//! Ordering: each phone (or, for server-wide jobs, each server) has a FIFO
//! queue worked by one task, so a phone runs one job at a time in arrival
//! order; at most `max_parallel_jobs` run at once on the host. A server's
//! job that works on its phones (restart, flavor change, keypair, share
//! file systems, shared apps' installation, deletion) takes its turn in
//! each phone's queue as well: it runs once every job its phones received
//! before it ended, and their jobs received after it wait for it. A sync shell
//! bypasses the queues and the limit: it runs at once, is answered within
//! 2 s in the `POST /v1/jobs` response itself, and is recorded like any job.
//!
//! `POST /v1/servers` records the server and queues one `CreatePhone` job
//! per phone with job id `<server_id>:create:<phone_id>` (visible through
//! `GET /v1/jobs/{id}`); at most `max_parallel_creates` creations run at once.
//! `DELETE /v1/servers/{id}` queues the job `<server_id>:delete`, which
//! releases the server ([`crate::protocol::JobKind::DeleteServer`]).
//!
//! SIGTERM or SIGINT: new jobs are refused (503), running ones get
//! `shutdown_grace_secs`, queued ones are marked failed, phones keep running
//! (their shims are separate processes; the unit uses `KillMode=process`).
//! With `NOTIFY_SOCKET` set, `READY=1` is sent once listening and
//! `WATCHDOG=1` every half `WATCHDOG_USEC`.
//!
//! Keypairs: the host side of a server keypair goes to
//! `<state_dir>/ssh/authorized_keys` (never root's own file).

pub mod control;
pub mod host;
pub mod http;
pub mod jobs;
pub mod jobstore;
pub mod metrics;
pub mod network;
pub mod notify;
pub mod phones;
pub mod transfer;
pub mod volumes;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify, Semaphore};

use crate::config::{AgentConfig, StorageBackend};
use crate::objstore::ObjectStore;
use crate::protocol::{BatchedJob, CreateServer, Inventory, JobKind, JobRequest, JobStatus};
use jobstore::{Inserted, JobStore, JobStoreError};
use phones::Phones;

/// A job's failure: a reference error code and a message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {msg}")]
pub struct JobFailure {
    pub code: String,
    pub msg: String,
    /// Output worth showing the user (a failed command's output).
    pub execute_msg: Option<String>,
}

impl JobFailure {
    pub fn new(code: &str, msg: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            msg: msg.into(),
            execute_msg: None,
        }
    }

    /// CPS.0003, the reference's internal error.
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new("CPS.0003", msg)
    }
}

/// Errors starting or running the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("agent state dir {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    JobStore(#[from] JobStoreError),
    #[error("agent phones: {0}")]
    Phones(JobFailure),
    #[error("agent storage: {0}")]
    Storage(JobFailure),
    #[error("agent listen address {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cph-shim not found at {0}; set `shim` in the config")]
    NoShim(PathBuf),
    #[error("agent server: {0}")]
    Serve(std::io::Error),
    #[error("agent object store: {0}")]
    ObjectStore(crate::objstore::ObjectStoreError),
    #[error("agent config: {0}")]
    Config(&'static str),
    #[error("agent tls: {0}")]
    Tls(String),
}

/// Settings that cannot work together, refused before anything is made.
fn check_config(cfg: &AgentConfig) -> Result<(), DaemonError> {
    if cfg.tls_cert.is_some() != cfg.tls_key.is_some() {
        return Err(DaemonError::Config(
            "tls_cert and tls_key go together: set both to serve the agent protocol over TLS",
        ));
    }
    if cfg.user_namespaces.enabled && cfg.storage.backend == StorageBackend::Overlay {
        return Err(DaemonError::Config(
            "user_namespaces needs phone volumes that can be mounted idmapped: \
             set storage.backend = \"btrfs\" (an overlayfs mount cannot be idmapped)",
        ));
    }
    Ok(())
}

/// Why a job was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("agent is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] JobStoreError),
    #[error("job task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why a server was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Its record or the host's SSH keys not written.
    #[error("server not recorded: {0}")]
    Record(JobFailure),
    #[error(transparent)]
    Submit(#[from] SubmitError),
}

/// What a queue's task takes in turn.
enum Queued {
    /// A job, and for a server's job working on its phones, its turns in
    /// their queues.
    Job(Box<JobRequest>, Option<Turns>),
    /// A server's job's turn in one of its phones' queues: reached once
    /// the phone's earlier jobs ended; the phone's later ones wait until
    /// the server's job ended (its [`Turns::done`] dropped).
    Turn {
        reached: Reached,
        done: tokio::sync::watch::Receiver<()>,
    },
}

/// A phone queue's permit to a server's job waiting for its turn: given
/// when the queue reaches the turn, or when the turn is dropped unreached
/// (its queue's task ended): a server's job never waits for a queue that
/// is gone.
struct Reached(Option<Arc<Semaphore>>);

impl Reached {
    fn give(&mut self) {
        if let Some(s) = self.0.take() {
            s.add_permits(1);
        }
    }
}

impl Drop for Reached {
    fn drop(&mut self) {
        self.give();
    }
}

/// A server's job's turns in its phones' queues.
struct Turns {
    /// A permit from each phone's queue as it reaches the job's turn.
    reached: Arc<Semaphore>,
    phones: u32,
    /// Dropped when the job ended: the phones' queues go on.
    _done: tokio::sync::watch::Sender<()>,
}

/// The running agent.
pub struct Daemon {
    pub cfg: AgentConfig,
    pub store: JobStore,
    pub phones: Arc<Phones>,
    pub node_id: String,
    pub missing: Vec<String>,
    /// The object store of images, APKs, pushes and exports, when configured.
    pub object_store: Option<ObjectStore>,
    queues: Mutex<HashMap<String, mpsc::UnboundedSender<Queued>>>,
    jobs_limit: Arc<Semaphore>,
    creates_limit: Arc<Semaphore>,
    accepting: AtomicBool,
    running: AtomicUsize,
    idle: Notify,
    /// Finished jobs not yet reported to the control plane.
    pub(crate) unreported: Mutex<Vec<JobStatus>>,
    pub(crate) report_now: Notify,
    /// The shared applications' versions as heartbeats last read them.
    pub(crate) share_app_versions: transfer::ShareAppVersions,
}

/// The host's id in the fleet: the configured `node_id`, else the
/// machine's.
fn node_id(cfg: &AgentConfig) -> String {
    cfg.node_id
        .clone()
        .filter(|id| !id.trim().is_empty())
        .unwrap_or_else(machine_id)
}

fn machine_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn shim_path(cfg: &AgentConfig) -> Result<PathBuf, DaemonError> {
    let path = match &cfg.shim {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map(|e| e.with_file_name("cph-shim"))
            .unwrap_or_else(|_| PathBuf::from("/usr/libexec/cph/cph-shim")),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(DaemonError::NoShim(path))
    }
}

impl Daemon {
    /// Opens the state (job store, phones), prepares the host.
    pub fn open(cfg: AgentConfig) -> Result<Arc<Self>, DaemonError> {
        check_config(&cfg)?;
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| DaemonError::StateDir {
            path: cfg.state_dir.clone(),
            source,
        })?;
        if cfg.prepare_host {
            for outcome in
                host::apply_sysctls(&cfg.sysctl_root, &host::sysctl_needs(cfg.phone_capacity))
            {
                tracing::info!(?outcome, "host sysctl");
            }
        }
        match host::raise_open_files_limit() {
            Ok((from, to)) if from < to => tracing::info!(from, to, "open-file limit raised"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "open-file limit not raised"),
        }
        let mut missing = host::missing_features(
            std::path::Path::new("/proc"),
            std::path::Path::new("/sys/fs/cgroup"),
        );
        let object_store = match &cfg.object_store {
            None => {
                missing.push("object store (not configured)".to_string());
                None
            }
            Some(o) => {
                Some(ObjectStore::new(&o.client_config()).map_err(DaemonError::ObjectStore)?)
            }
        };
        let (store, interrupted) = JobStore::open(&cfg.state_dir.join("jobs"))?;
        let shim = shim_path(&cfg)?;
        let node_id = node_id(&cfg);
        let storage = volumes::backend(&cfg.storage, &cfg.state_dir, &node_id);
        let volumes = volumes::Volumes::open(storage, cfg.storage.share_size_gb)
            .map_err(DaemonError::Storage)?;
        let net = if cfg.network.enabled {
            match network::Network::open(&cfg) {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::error!(error = %e, "phones run without a network");
                    missing.push(format!("phone networking ({e})"));
                    None
                }
            }
        } else {
            missing.push("phone networking (disabled by config)".to_string());
            None
        };
        let phones = Phones::open(&cfg.state_dir, &cfg.cgroup_parent, &shim, volumes, net)
            .map_err(DaemonError::Phones)?
            .with_user_namespaces(&cfg.user_namespaces)
            .with_connect_secret(&cfg.node_token);
        sweep_scratch(&cfg.state_dir.join("staging"), &phones);
        let unreported: Vec<JobStatus> =
            interrupted.iter().filter_map(|id| store.get(id)).collect();
        for id in &interrupted {
            tracing::warn!(job_id = %id, "job interrupted by an agent restart, marked failed");
        }
        let d = Arc::new(Self {
            jobs_limit: Arc::new(Semaphore::new(cfg.max_parallel_jobs.max(1))),
            creates_limit: Arc::new(Semaphore::new(cfg.max_parallel_creates.max(1))),
            cfg,
            store,
            phones: Arc::new(phones),
            node_id,
            missing,
            object_store,
            queues: Mutex::new(HashMap::new()),
            accepting: AtomicBool::new(true),
            running: AtomicUsize::new(0),
            idle: Notify::new(),
            unreported: Mutex::new(unreported),
            report_now: Notify::new(),
            share_app_versions: transfer::ShareAppVersions::default(),
        });
        Ok(d)
    }

    /// Path of the host's `authorized_keys` the agent maintains.
    pub fn authorized_keys(&self) -> PathBuf {
        self.cfg.state_dir.join("ssh").join("authorized_keys")
    }

    /// Takes a job: recorded first, then queued (or, for a sync shell, run
    /// at once and answered with its final status), in a task of its own
    /// that goes on if the caller stops waiting.
    pub async fn submit(self: &Arc<Self>, req: JobRequest) -> Result<JobStatus, SubmitError> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let me = Arc::clone(self);
        tokio::spawn(async move { me.take(req).await }).await?
    }

    /// Records a job and queues or runs it; see [`Daemon::submit`].
    async fn take(self: Arc<Self>, req: JobRequest) -> Result<JobStatus, SubmitError> {
        let r = req.clone();
        let status = match self.on_store(move |s| s.insert(&r)).await?? {
            Inserted::Existing(s) => return Ok(s),
            Inserted::New(s) => s,
        };
        if matches!(req.kind, JobKind::SyncShell { .. }) {
            return Ok(self.run_now(req).await);
        }
        Ok(self.enqueue(req).await.unwrap_or(status))
    }

    /// Takes several jobs recorded together (one flush for the batch), in
    /// a task of its own like [`Daemon::submit`]. Sync shells in a batch
    /// run at once but are answered as running; the control plane sends
    /// them alone to wait for their output.
    pub async fn submit_batch(
        self: &Arc<Self>,
        reqs: Vec<JobRequest>,
    ) -> Result<Vec<BatchedJob>, SubmitError> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let me = Arc::clone(self);
        tokio::spawn(async move { me.take_batch(reqs).await }).await?
    }

    async fn take_batch(
        self: Arc<Self>,
        reqs: Vec<JobRequest>,
    ) -> Result<Vec<BatchedJob>, SubmitError> {
        let (reqs, outcomes) = self
            .on_store(move |s| {
                let outcomes = s.insert_many(&reqs);
                (reqs, outcomes)
            })
            .await?;
        let mut out = Vec::with_capacity(reqs.len());
        for (req, outcome) in reqs.into_iter().zip(outcomes) {
            let job_id = req.job_id.clone();
            match outcome {
                Ok(Inserted::Existing(s)) => out.push(BatchedJob::accepted(s)),
                Ok(Inserted::New(s)) => {
                    let s = if matches!(req.kind, JobKind::SyncShell { .. }) {
                        let me = Arc::clone(&self);
                        tokio::spawn(async move { me.run_now(req).await });
                        s
                    } else {
                        self.enqueue(req).await.unwrap_or(s)
                    };
                    out.push(BatchedJob::accepted(s));
                }
                Err(e) => out.push(BatchedJob::refused(job_id, e.code(), e.to_string())),
            }
        }
        Ok(out)
    }

    /// Takes a server: recorded (its key opens the host's SSH access at
    /// once), then its encoding server's and phones' creation queued as
    /// jobs, in a task of its own like [`Daemon::submit`].
    pub async fn create_server(self: &Arc<Self>, server: CreateServer) -> Result<(), ServerError> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown.into());
        }
        let me = Arc::clone(self);
        tokio::spawn(async move { me.take_server(server).await })
            .await
            .map_err(SubmitError::from)?
    }

    async fn take_server(self: Arc<Self>, server: CreateServer) -> Result<(), ServerError> {
        let me = Arc::clone(&self);
        let s = server.clone();
        tokio::task::spawn_blocking(move || {
            me.phones
                .put_server(&s)
                .and_then(|()| jobs::write_host_keys(&me.phones, &me.authorized_keys()))
        })
        .await
        .map_err(SubmitError::from)?
        .map_err(ServerError::Record)?;
        let id = &server.server_id;
        // The flavor's encoding server comes up beside the phones.
        let encoder = server.flavor.encode_server_spec().map(|_| JobRequest {
            job_id: format!("{id}:encoder"),
            request_id: format!("{id}:create"),
            server_id: id.clone(),
            phone_id: None,
            kind: JobKind::RestartEncodeServer,
        });
        let phones = server.phones.iter().map(|phone| JobRequest {
            job_id: format!("{id}:create:{}", phone.phone_id),
            request_id: format!("{id}:create"),
            server_id: id.clone(),
            phone_id: Some(phone.phone_id.clone()),
            kind: JobKind::CreatePhone {
                phone: phone.clone(),
            },
        });
        for req in encoder.into_iter().chain(phones) {
            Arc::clone(&self).take(req).await?;
        }
        Ok(())
    }

    /// Runs a job-store call (it may sync to disk) on a blocking thread.
    async fn on_store<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&JobStore) -> T + Send + 'static,
    ) -> Result<T, SubmitError> {
        let me = Arc::clone(self);
        Ok(tokio::task::spawn_blocking(move || f(&me.store)).await?)
    }

    /// Queues a recorded job behind the earlier ones of its phone (or
    /// server). A server's job that works on its phones also takes its
    /// turn in each of their queues, so it runs after the jobs each phone
    /// received before it and before those it receives after. A job that
    /// cannot be queued is recorded failed at once (never left running):
    /// its status then.
    async fn enqueue(self: &Arc<Self>, req: JobRequest) -> Option<JobStatus> {
        let key = match (&req.kind, &req.phone_id) {
            (JobKind::CreatePhone { phone }, _) => format!("phone:{}", phone.phone_id),
            (_, Some(p)) => format!("phone:{p}"),
            (_, None) => format!("server:{}", req.server_id),
        };
        let works_on_phones = req.phone_id.is_none()
            && (req.kind.is_server_wide() || matches!(req.kind, JobKind::UpdateKeypair { .. }));
        let phones = if works_on_phones {
            self.phones.phones_of(&req.server_id)
        } else {
            Vec::new()
        };
        let sent = {
            // One hold of the lock: the turns and the job are queued in
            // the same arrival order everywhere.
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            let turns = works_on_phones.then(|| {
                let (done, watch) = tokio::sync::watch::channel(());
                let reached = Arc::new(Semaphore::new(0));
                let mut taken = 0;
                for phone in &phones {
                    let turn = Queued::Turn {
                        reached: Reached(Some(Arc::clone(&reached))),
                        done: watch.clone(),
                    };
                    if self
                        .queue(&mut queues, format!("phone:{phone}"))
                        .send(turn)
                        .is_ok()
                    {
                        taken += 1;
                    }
                }
                Turns {
                    reached,
                    phones: taken,
                    _done: done,
                }
            });
            self.queue(&mut queues, key)
                .send(Queued::Job(Box::new(req), turns))
        };
        let Err(mpsc::error::SendError(Queued::Job(req, _))) = sent else {
            return None;
        };
        tracing::error!(job_id = %req.job_id, "job queue closed");
        let st = jobstore::failed(&req.job_id, "CPS.0003", "job queue closed", None);
        self.finish(st.clone()).await;
        Some(st)
    }

    /// The sender of the queue `key`, its task started if it has none.
    fn queue(
        self: &Arc<Self>,
        queues: &mut HashMap<String, mpsc::UnboundedSender<Queued>>,
        key: String,
    ) -> mpsc::UnboundedSender<Queued> {
        match queues.get(&key) {
            // A queue whose task ended (it panicked) is made anew.
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(Arc::clone(self).work_queue(rx));
                queues.insert(key, tx.clone());
                tx
            }
        }
    }

    async fn work_queue(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Queued>) {
        while let Some(item) = rx.recv().await {
            let (req, turns) = match item {
                Queued::Job(req, turns) => (*req, turns),
                Queued::Turn {
                    mut reached,
                    mut done,
                } => {
                    // The phone's earlier jobs ended; its later ones wait
                    // for the server's job (until its sender is dropped).
                    reached.give();
                    while done.changed().await.is_ok() {}
                    continue;
                }
            };
            // A server's job waits for its turn in each of its phones'
            // queues (before taking a permit: the phones' earlier jobs
            // may need them).
            if let Some(t) = &turns {
                if let Ok(p) = t.reached.acquire_many(t.phones).await {
                    p.forget();
                }
            }
            let create = matches!(req.kind, JobKind::CreatePhone { .. });
            let _create_permit = if create {
                Arc::clone(&self.creates_limit).acquire_owned().await.ok()
            } else {
                None
            };
            let Ok(_permit) = Arc::clone(&self.jobs_limit).acquire_owned().await else {
                return;
            };
            if !self.accepting.load(Ordering::SeqCst) {
                let st = jobstore::failed(
                    &req.job_id,
                    "CPS.0042",
                    "agent shut down before the job started",
                    None,
                );
                self.finish(st).await;
                continue;
            }
            self.run_now(req).await;
            // Its phones' queues go on.
            drop(turns);
        }
    }

    /// Runs a recorded job on a blocking thread and records its end.
    async fn run_now(self: &Arc<Self>, req: JobRequest) -> JobStatus {
        self.running.fetch_add(1, Ordering::SeqCst);
        let me = Arc::clone(self);
        let handle = tokio::runtime::Handle::current();
        let job_id = req.job_id.clone();
        tracing::info!(job_id = %job_id, kind = %req.kind.name(), "job started");
        let journal = self.store.journal_path(&job_id);
        let journal_in_job = journal.clone();
        let result = tokio::task::spawn_blocking(move || {
            // A phone's job waits for a server's job restarting it (a sync
            // shell, which changes nothing the phone's jobs rely on, does
            // not).
            let held_phone = match (&req.kind, &req.phone_id) {
                (JobKind::SyncShell { .. }, _) => None,
                (k, _) if k.is_server_wide() => None,
                (JobKind::CreatePhone { phone }, _) => Some(phone.phone_id.as_str()),
                (_, Some(p)) => Some(p.as_str()),
                (_, None) => None,
            };
            let _held = held_phone.map(|p| me.phones.hold(p));
            let ctx = jobs::JobContext {
                phones: &me.phones,
                shell_timeout: Duration::from_secs(me.cfg.shell_timeout_secs.max(1)),
                authorized_keys: &me.authorized_keys(),
                store: me.object_store.as_ref(),
                handle: &handle,
                staging_dir: &me.cfg.state_dir.join("staging"),
                parallel_creates: me.cfg.max_parallel_creates,
                journal: &journal_in_job,
            };
            jobs::execute(&ctx, &req)
        })
        .await;
        let status = match result {
            Ok(Ok(msg)) => jobstore::succeeded(&job_id, msg.as_deref()),
            Ok(Err(f)) => jobstore::failed(&job_id, &f.code, &f.msg, f.execute_msg.as_deref()),
            Err(e) => jobstore::failed(&job_id, "CPS.0003", &format!("job task failed: {e}"), None),
        };
        tracing::info!(job_id = %job_id, status = ?status.status, error = ?status.error_msg, "job ended");
        self.finish(status.clone()).await;
        // The status names what a failed extraction wrote; the journal was
        // only for a kill.
        if let Err(e) = std::fs::remove_file(&journal) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(error = %e, path = %journal.display(), "job journal not removed");
            }
        }
        if self.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
        status
    }

    /// Records a job's end (on a blocking thread) and has it reported.
    async fn finish(self: &Arc<Self>, status: JobStatus) {
        let st = status.clone();
        let recorded = self.on_store(move |s| s.finish(st)).await;
        if let Err(e) = recorded.and_then(|r| r.map_err(SubmitError::from)) {
            tracing::error!(error = %e, job_id = %status.job_id, "job status not recorded");
        }
        self.unreported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(status);
        self.report_now.notify_one();
    }

    /// Stops taking jobs and waits up to `grace` for running ones.
    pub async fn drain(&self, grace: Duration) {
        self.accepting.store(false, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + grace;
        while self.running.load(Ordering::SeqCst) > 0 {
            let idle = self.idle.notified();
            if self.running.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                tracing::warn!(
                    running = self.running.load(Ordering::SeqCst),
                    "shutdown deadline passed with jobs running"
                );
                break;
            }
        }
    }

    /// Whether new jobs are taken.
    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    /// The host's inventory.
    /// Jobs running now (sync shells included).
    pub fn running_jobs(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    pub fn inventory(&self) -> Inventory {
        // The host's CPUs, NUMA nodes and GPUs as placement sees them.
        let (cpus, numa_nodes, gpus) =
            match cph_runtime::placement::Topology::discover(std::path::Path::new("/sys")) {
                Ok(t) => (
                    t.cpus.len() as u32,
                    t.nodes.len() as u32,
                    t.gpus.len() as u32,
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "host topology not read");
                    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
                    (cpus, 1, 0)
                }
            };
        let memory_mb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb / 1024);
        let listen_host = self
            .cfg
            .listen
            .rsplit_once(':')
            .map_or("127.0.0.1", |(h, _)| h);
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Inventory {
            node_id: self.node_id.clone(),
            hostname,
            agent_url: self.cfg.advertise_url.clone().unwrap_or_else(|| {
                let scheme = if self.cfg.tls_cert.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{}", self.cfg.listen)
            }),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            server_model: self.cfg.server_model.clone(),
            // With a phone network, where its access ports are mapped.
            server_ip: match self.phones.network() {
                Some(net) => net.server_ip().to_string(),
                None => self
                    .cfg
                    .server_ip
                    .clone()
                    .unwrap_or_else(|| listen_host.to_string()),
            },
            public_ip: self.cfg.network.public_ip.clone(),
            cpus,
            numa_nodes,
            gpus,
            memory_mb,
            phone_capacity: self.cfg.phone_capacity,
            missing: self.missing.clone(),
            phones: self.phones.states(),
            encoder_ip: self.phones.network().map(|n| n.encoder_ip().to_string()),
            encoders: self.phones.encoder_states(),
            pools: self.phones.pools().unwrap_or_else(|e| {
                tracing::warn!(error = %e.msg, "storage pools not measured");
                Vec::new()
            }),
        }
    }
}

/// Removes what jobs a kill cut off left in the agent's scratch space
/// (downloaded APKs) and in the sharepool's apps (a share app's new
/// version not yet swapped in: names beginning with `.`).
fn sweep_scratch(staging: &std::path::Path, phones: &Phones) {
    let mut left = Vec::new();
    if let Ok(entries) = std::fs::read_dir(staging) {
        left.extend(entries.flatten().map(|e| e.path()));
    }
    if let Ok(paths) = phones.share_paths() {
        if let Ok(entries) = std::fs::read_dir(&paths.apps) {
            left.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
                    .map(|e| e.path()),
            );
        }
    }
    for path in left {
        match transfer::remove_entry(&path) {
            Ok(_) => tracing::info!(path = %path.display(), "left by a job cut off, removed"),
            Err(e) => tracing::warn!(path = %path.display(), error = %e.msg, "not removed"),
        }
    }
}

/// Ends the multipart uploads jobs left open in the store (a kill in the
/// middle of an export, or an abort the store was out of reach for), as
/// their notes the job store found at its open name them: their parts
/// would take room in the store for good. A note whose upload cannot be
/// ended yet is kept for the next start.
async fn abort_left_uploads(d: Arc<Daemon>, notes: Vec<PathBuf>) {
    let Some(store) = d.object_store.clone() else {
        return;
    };
    for note in notes {
        match store.abort_noted(&note).await {
            Ok(_) => {
                tracing::info!(note = %note.display(), "multipart upload a job left open, aborted")
            }
            Err(e) => {
                tracing::warn!(note = %note.display(), error = %e, "multipart upload a job left open, not aborted yet")
            }
        }
    }
}

/// `cph-agent purge`: deletes every phone of this agent and takes down what
/// it set up on the host (phone network, pool mounts). Not while the agent
/// runs.
pub fn purge(cfg: AgentConfig) -> Result<Vec<String>, DaemonError> {
    let shim = shim_path(&cfg)?;
    let storage = volumes::backend(&cfg.storage, &cfg.state_dir, &node_id(&cfg));
    let volumes =
        volumes::Volumes::open(storage, cfg.storage.share_size_gb).map_err(DaemonError::Storage)?;
    let net = if cfg.network.enabled {
        match network::Network::open(&cfg) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, "phone network not opened; nothing of it to purge");
                None
            }
        }
    } else {
        None
    };
    let phones = Phones::open(&cfg.state_dir, &cfg.cgroup_parent, &shim, volumes, net)
        .map_err(DaemonError::Phones)?;
    phones.purge().map_err(DaemonError::Phones)
}

/// Runs the agent until SIGTERM/SIGINT.
pub fn run(cfg: AgentConfig) -> Result<(), DaemonError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DaemonError::Serve)?;
    rt.block_on(async move {
        let listen = cfg.listen.clone();
        let grace = Duration::from_secs(cfg.shutdown_grace_secs);
        let daemon = Daemon::open(cfg)?;
        // The host's SSH keys as the recorded servers have them (a server
        // deletion cut off by a kill may have left its key).
        if let Err(e) = jobs::write_host_keys(&daemon.phones, &daemon.authorized_keys()) {
            tracing::warn!(error = %e, "authorized_keys not rewritten");
        }
        {
            let d = Arc::clone(&daemon);
            tokio::task::spawn_blocking(move || d.phones.reconcile())
                .await
                .map_err(|e| DaemonError::Serve(std::io::Error::other(e)))?;
        }
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .map_err(|source| DaemonError::Listen {
                addr: listen.clone(),
                source,
            })?;
        let tls = match (&daemon.cfg.tls_cert, &daemon.cfg.tls_key) {
            (Some(cert), Some(key)) => {
                let files = crate::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                };
                Some(crate::tls::acceptor(&files).map_err(DaemonError::Tls)?)
            }
            _ => None,
        };
        tracing::info!(listen = %listen, tls = tls.is_some(), node_id = %daemon.node_id, "cph-agent listening");
        let app = http::router(Arc::clone(&daemon));
        let shutdown = Arc::new(Notify::new());
        let server = {
            let shutdown = Arc::clone(&shutdown);
            let stop = async move { shutdown.notified().await };
            match tls {
                Some(acceptor) => {
                    let listener = crate::tls::TlsListener::new(listener, acceptor)
                        .map_err(DaemonError::Serve)?;
                    tokio::spawn(async move {
                        axum::serve(listener, app)
                            .with_graceful_shutdown(stop)
                            .await
                    })
                }
                None => tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stop)
                        .await
                }),
            }
        };
        tokio::spawn(control::run(Arc::clone(&daemon)));
        tokio::spawn(forget_ended_jobs(Arc::clone(&daemon)));
        let left_uploads = daemon.store.take_left_uploads();
        tokio::spawn(abort_left_uploads(Arc::clone(&daemon), left_uploads));
        notify::notify("READY=1");
        if let Some(every) = notify::watchdog_interval() {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    notify::notify("WATCHDOG=1");
                }
            });
        }
        wait_for_signal().await;
        tracing::info!("cph-agent stopping: no new jobs, phones keep running");
        notify::notify("STOPPING=1");
        daemon.drain(grace).await;
        shutdown.notify_one();
        match server.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(DaemonError::Serve(e)),
            Err(e) => Err(DaemonError::Serve(std::io::Error::other(e))),
        }
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// How often ended jobs past their retention are looked for.
const FORGET_EVERY: Duration = Duration::from_secs(3600);

/// Removes the records of jobs that ended more than `job_retention_hours`
/// ago, at start and every [`FORGET_EVERY`], so the job store does not grow
/// with every job a host ever ran. Those whose end the control plane has
/// not been told yet are kept.
async fn forget_ended_jobs(d: Arc<Daemon>) {
    let keep = Duration::from_secs(d.cfg.job_retention_hours.max(1) * 3600);
    let mut tick = tokio::time::interval(FORGET_EVERY);
    loop {
        tick.tick().await;
        let d2 = Arc::clone(&d);
        let done = tokio::task::spawn_blocking(move || {
            let unreported: std::collections::HashSet<String> = d2
                .unreported
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|s| s.job_id.clone())
                .collect();
            d2.store.forget_ended(keep, &unreported)
        })
        .await;
        match done {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(jobs = n, "records of long-ended jobs removed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "ended jobs not removed"),
            Err(e) => tracing::warn!(error = %e, "ended-job sweep failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::jobstore::testing::Gate;
    use super::*;
    use crate::protocol::JobState;

    /// A daemon over `dir`: no network, no host changes, a stand-in shim
    /// (the jobs here name a phone that does not exist and never start
    /// one); the first write of job `gated`'s record is held.
    fn daemon(dir: &std::path::Path, gated: &'static str) -> (Arc<Daemon>, Gate) {
        let shim = dir.join("cph-shim");
        std::fs::write(&shim, b"").expect("shim");
        let mut cfg = AgentConfig {
            state_dir: dir.join("state"),
            prepare_host: false,
            shim: Some(shim),
            node_id: Some("unit".to_string()),
            ..AgentConfig::default()
        };
        cfg.network.enabled = false;
        let mut d = Daemon::open(cfg).expect("daemon");
        let store = &mut Arc::get_mut(&mut d).expect("not shared yet").store;
        let gate = Gate::on(store, gated);
        (d, gate)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_whose_request_is_dropped_while_it_is_recorded_still_runs() {
        let shell = JobKind::Shell {
            command: "true".into(),
        };
        let sync_shell = JobKind::SyncShell {
            command: "true".into(),
            timeout_ms: 1000,
        };
        for (id, kind, batch) in [
            ("shell", shell.clone(), false),
            ("sync-shell", sync_shell.clone(), false),
            ("batched-shell", shell, true),
            ("batched-sync-shell", sync_shell, true),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (d, mut gate) = daemon(dir.path(), id);
            let req = JobRequest {
                job_id: id.into(),
                request_id: "r".into(),
                server_id: "s".into(),
                phone_id: Some("nophone".into()),
                kind,
            };
            let request: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = if batch
            {
                let (d, req) = (Arc::clone(&d), req.clone());
                Box::pin(async move {
                    let _ = d.submit_batch(vec![req]).await;
                })
            } else {
                let (d, req) = (Arc::clone(&d), req.clone());
                Box::pin(async move {
                    let _ = d.submit(req).await;
                })
            };
            // The control plane gives up on the request while its job's
            // record is being written.
            tokio::select! {
                () = request => panic!("{id}: answered before its record was written"),
                () = async {
                    while gate.writes() == 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                } => {}
            }
            gate.release();
            // The job still runs and ends (failed: its phone does not
            // exist), and nothing is left counted as running.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let st = d.store.get(id).map(|s| s.status);
                if st.is_some_and(|s| s != JobState::Running) && d.running_jobs() == 0 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{id}: left {st:?} after its request was dropped"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // The control plane sending it again reads its end.
            let again = d.submit(req).await.expect("sent again");
            assert_eq!(again.status, JobState::Failed, "{id}: {again:?}");
        }
    }

    #[test]
    fn user_namespaces_need_idmappable_volumes() {
        let mut cfg = AgentConfig::default();
        cfg.user_namespaces.enabled = true;
        let err = check_config(&cfg).expect_err("overlay volumes cannot be idmapped");
        assert!(err.to_string().contains("storage.backend"), "{err}");
        cfg.storage.backend = StorageBackend::Btrfs;
        assert!(check_config(&cfg).is_ok());
        assert!(check_config(&AgentConfig::default()).is_ok());
    }

    #[test]
    fn a_tls_certificate_needs_its_key() {
        let mut cfg = AgentConfig {
            tls_cert: Some(PathBuf::from("/etc/cph/tls/cert.pem")),
            ..AgentConfig::default()
        };
        let err = check_config(&cfg).expect_err("a certificate without its key");
        assert!(err.to_string().contains("tls_key"), "{err}");
        cfg.tls_key = Some(PathBuf::from("/etc/cph/tls/key.pem"));
        assert!(check_config(&cfg).is_ok());
    }
}
