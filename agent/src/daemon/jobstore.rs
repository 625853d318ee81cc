//! Durable job records: one JSON file per job under `<state>/jobs/`, written
//! to a temporary file, fsynced and renamed into place, so a record is either
//! the old or the new one after a crash. A job is recorded before the agent
//! acknowledges it; a repeated `job_id` returns the recorded status and never
//! runs twice. On start, jobs still recorded as running were cut short by a
//! crash or kill and are marked failed (CPS.0054) with the reason; a job
//! that was extracting an archive names, from its journal
//! (`<job_id>.written`, see [`JobStore::journal_path`]), the paths it may
//! have written. Records of jobs that ended long ago are removed
//! ([`JobStore::forget_ended`]).
//!
//! The store's lock covers its memory only: a record's file is written or
//! removed outside it by the one caller that has taken its job id busy, so
//! reading a job never waits for another job's flush, and a caller wanting
//! an id that is busy waits for that id alone.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::protocol::{cap_execute_msg, JobRequest, JobState, JobStatus, EXECUTE_MSG_MAX};

/// Errors of the job store.
#[derive(Debug, thiserror::Error)]
pub enum JobStoreError {
    #[error("job store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("job record {path} is not valid: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("job id {0:?} is invalid: 1-128 characters of A-Z a-z 0-9 . _ - :")]
    InvalidId(String),
}

impl JobStoreError {
    /// The reference's code for a job refused over this error.
    pub fn code(&self) -> &'static str {
        match self {
            JobStoreError::InvalidId(_) => "CPS.0048",
            _ => "CPS.0003",
        }
    }
}

/// What is kept of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub request: JobRequest,
    pub status: JobStatus,
    /// Arrival order on this agent.
    pub seq: u64,
    /// When its end was recorded (seconds since the epoch); a record
    /// written before this was kept reads its file's time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<u64>,
}

impl JobRecord {
    /// A job just accepted: running, `seq`-th in arrival order.
    fn running(request: &JobRequest, seq: u64) -> Self {
        JobRecord {
            request: request.clone(),
            status: JobStatus {
                job_id: request.job_id.clone(),
                status: JobState::Running,
                error_code: None,
                error_msg: None,
                execute_msg: None,
            },
            seq,
            ended: None,
        }
    }
}

/// `t` in seconds since the epoch (0 before it).
fn epoch_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now_secs() -> u64 {
    epoch_secs(std::time::SystemTime::now())
}

/// A record's file under `dir` and its JSON.
fn encode(dir: &Path, rec: &JobRecord) -> Result<(PathBuf, Vec<u8>), JobStoreError> {
    let path = record_path(dir, &rec.request.job_id);
    let bytes = serde_json::to_vec_pretty(rec).map_err(|e| JobStoreError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok((path, bytes))
}

/// Called with the job ids of records about to be written, before they
/// reach the disk (tests hold a write in progress there).
pub type WriteHook = Box<dyn Fn(&[&str]) + Send + Sync>;

/// The job records, on disk and in memory.
pub struct JobStore {
    dir: PathBuf,
    /// Held for in-memory work only, never across a disk write.
    inner: Mutex<Inner>,
    /// Signalled when job ids stop being busy.
    settled: Condvar,
    /// The multipart upload notes found at open (left by jobs a kill cut
    /// off, or whose abort failed), until taken.
    left_uploads: Mutex<Vec<PathBuf>>,
    before_write: Option<WriteHook>,
}

impl std::fmt::Debug for JobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// The records as they are on disk.
    jobs: HashMap<String, JobRecord>,
    /// Job ids whose file one caller is writing or removing.
    busy: HashSet<String>,
    next_seq: u64,
}

/// Job ids a caller has taken busy: given back, and those waiting for
/// them woken, when settled or dropped (after a failure or a panic too).
struct Taken<'a> {
    store: &'a JobStore,
    ids: Vec<String>,
}

impl Taken<'_> {
    /// Applies `change` to the records and gives the ids back in one hold
    /// of the lock, so no one sees an id neither recorded nor busy between.
    fn settle(mut self, change: impl FnOnce(&mut HashMap<String, JobRecord>)) {
        let mut inner = self.store.lock();
        change(&mut inner.jobs);
        self.release(&mut inner);
        drop(inner);
        self.store.settled.notify_all();
    }

    fn release(&mut self, inner: &mut Inner) {
        for id in self.ids.drain(..) {
            inner.busy.remove(&id);
        }
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let mut inner = self.store.lock();
        self.release(&mut inner);
        drop(inner);
        self.store.settled.notify_all();
    }
}

/// What [`JobStore::admit`] made of a list of requests.
struct Admitted<'a> {
    /// One outcome per request, in order.
    out: Vec<Result<Inserted, JobStoreError>>,
    /// The new records, with their index in the requests.
    fresh: Vec<(usize, JobRecord)>,
    /// Their ids, busy until they are written.
    taken: Taken<'a>,
}

/// Outcome of [`JobStore::insert`].
#[derive(Debug, Clone, PartialEq)]
pub enum Inserted {
    /// A new job, recorded as running.
    New(JobStatus),
    /// The job id was known: its recorded status.
    Existing(JobStatus),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JobStoreError + '_ {
    move |source| JobStoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks a job id is safe as a file name.
pub fn valid_job_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl JobStore {
    /// Opens (creating) the store in `dir`; running jobs left by a previous
    /// process are marked failed. Returns the store and the ids so marked.
    pub fn open(dir: &Path) -> Result<(Self, Vec<String>), JobStoreError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let mut inner = Inner::default();
        let mut interrupted = Vec::new();
        let mut journals = Vec::new();
        let mut left_uploads = Vec::new();
        for entry in fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let path = entry.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("json") => {}
                Some(JOURNAL_EXT) => {
                    journals.push(path);
                    continue;
                }
                Some(UPLOAD_NOTE_EXT) => {
                    left_uploads.push(path);
                    continue;
                }
                _ => continue,
            }
            let text = fs::read(&path).map_err(io(&path))?;
            let mut rec: JobRecord =
                serde_json::from_slice(&text).map_err(|e| JobStoreError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if rec.status.status == JobState::Running {
                let mut msg = "job interrupted: the agent stopped while it ran".to_string();
                let mut list = None;
                let journal = journal_path(dir, &rec.request.job_id);
                if let Ok(paths) = cph_runtime::archive::read_journal(&journal) {
                    if !paths.is_empty() {
                        msg.push_str(&format!(
                            "; {} paths may have been written before it stopped",
                            paths.len()
                        ));
                        list = Some(path_list(
                            "may have been written before the agent stopped:",
                            paths.iter(),
                        ));
                    }
                }
                rec.status = failed(&rec.request.job_id, "CPS.0054", &msg, list.as_deref());
                rec.ended = Some(now_secs());
                // Written back to the file it was read from.
                let (_, bytes) = encode(dir, &rec)?;
                write_atomic(&path, &bytes).map_err(io(&path))?;
                interrupted.push(rec.request.job_id.clone());
            }
            if rec.ended.is_none() {
                rec.ended = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .map(epoch_secs);
            }
            inner.next_seq = inner.next_seq.max(rec.seq + 1);
            inner.jobs.insert(rec.request.job_id.clone(), rec);
        }
        // Journals are read above; those of jobs that ended were left by a
        // kill after their end was recorded.
        for path in journals {
            fs::remove_file(&path).map_err(io(&path))?;
        }
        Ok((
            Self {
                dir: dir.to_path_buf(),
                inner: Mutex::new(inner),
                settled: Condvar::new(),
                left_uploads: Mutex::new(left_uploads),
                before_write: None,
            },
            interrupted,
        ))
    }

    /// The multipart upload notes found at open, taken once.
    pub fn take_left_uploads(&self) -> Vec<PathBuf> {
        std::mem::take(&mut *self.left_uploads.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Where job `job_id` keeps the write-ahead list of an archive it
    /// extracts into a phone or the sharepool (removed when the job ends).
    pub fn journal_path(&self, job_id: &str) -> PathBuf {
        journal_path(&self.dir, job_id)
    }

    /// Calls `hook` before each write of records, with their job ids.
    pub fn on_write(&mut self, hook: WriteHook) {
        self.before_write = Some(hook);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lock, once none of `ids` is busy.
    fn lock_when_idle(&self, ids: &[&str]) -> MutexGuard<'_, Inner> {
        let mut inner = self.lock();
        while ids.iter().any(|id| inner.busy.contains(*id)) {
            inner = self.settled.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        inner
    }

    /// Takes `ids` busy; the caller holds the lock and has seen them idle.
    fn take(&self, inner: &mut Inner, ids: Vec<String>) -> Taken<'_> {
        inner.busy.extend(ids.iter().cloned());
        Taken { store: self, ids }
    }

    fn announce(&self, ids: &[&str]) {
        if let Some(hook) = &self.before_write {
            hook(ids);
        }
    }

    fn persist(&self, rec: &JobRecord) -> Result<(), JobStoreError> {
        self.announce(&[rec.request.job_id.as_str()]);
        let (path, bytes) = encode(&self.dir, rec)?;
        write_atomic(&path, &bytes).map_err(io(&path))
    }

    /// Under one hold of the lock, once none of the requested ids is busy:
    /// the recorded status of each known id, a new running record (its id
    /// taken busy) for each other valid one. A job id repeated in
    /// `requests` gets one record.
    fn admit(&self, requests: &[JobRequest]) -> Admitted<'_> {
        let ids: Vec<&str> = requests.iter().map(|r| r.job_id.as_str()).collect();
        let mut inner = self.lock_when_idle(&ids);
        let mut out = Vec::with_capacity(requests.len());
        let mut fresh: Vec<(usize, JobRecord)> = Vec::new();
        let mut in_batch: HashMap<&str, usize> = HashMap::new();
        for (i, request) in requests.iter().enumerate() {
            let id = request.job_id.as_str();
            if !valid_job_id(id) {
                out.push(Err(JobStoreError::InvalidId(id.to_string())));
            } else if let Some(rec) = inner.jobs.get(id) {
                out.push(Ok(Inserted::Existing(rec.status.clone())));
            } else if let Some(&k) = in_batch.get(id) {
                out.push(Ok(Inserted::Existing(fresh[k].1.status.clone())));
            } else {
                let rec = JobRecord::running(request, inner.next_seq);
                inner.next_seq += 1;
                in_batch.insert(id, fresh.len());
                out.push(Ok(Inserted::New(rec.status.clone())));
                fresh.push((i, rec));
            }
        }
        let new_ids = fresh.iter().map(|(_, r)| r.request.job_id.clone());
        let taken = self.take(&mut inner, new_ids.collect());
        drop(inner);
        Admitted { out, fresh, taken }
    }

    /// Records a new job as running (on disk first), or returns the status of
    /// the job already recorded under that id. A request for an id whose
    /// record is being written waits for that write, and never records it
    /// twice.
    pub fn insert(&self, request: &JobRequest) -> Result<Inserted, JobStoreError> {
        let Admitted { out, fresh, taken } = self.admit(std::slice::from_ref(request));
        for (_, rec) in &fresh {
            self.persist(rec)?;
        }
        taken.settle(|jobs| {
            for (_, rec) in fresh {
                jobs.insert(rec.request.job_id.clone(), rec);
            }
        });
        out.into_iter()
            .next()
            .unwrap_or_else(|| Err(JobStoreError::InvalidId(request.job_id.clone())))
    }

    /// Records several jobs with one flush of the file system (a batch from
    /// the control plane): the records are written, made durable together
    /// with `syncfs`, then renamed into place. One outcome per request, in
    /// order; a job id repeated in the batch is recorded once.
    pub fn insert_many(&self, requests: &[JobRequest]) -> Vec<Result<Inserted, JobStoreError>> {
        let Admitted {
            mut out,
            fresh,
            taken,
        } = self.admit(requests);
        if let Err(e) = self.persist_many(fresh.iter().map(|(_, r)| r)) {
            tracing::error!(error = %e, "job batch not recorded");
            for (i, _) in &fresh {
                out[*i] = Err(JobStoreError::Io {
                    path: self.dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                });
            }
            return out;
        }
        taken.settle(|jobs| {
            for (_, rec) in fresh {
                jobs.insert(rec.request.job_id.clone(), rec);
            }
        });
        out
    }

    /// Writes new records (their ids busy): on a failure none is left on
    /// disk.
    fn persist_many<'a>(
        &self,
        recs: impl Iterator<Item = &'a JobRecord>,
    ) -> Result<(), JobStoreError> {
        let recs: Vec<&JobRecord> = recs.collect();
        if recs.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = recs.iter().map(|r| r.request.job_id.as_str()).collect();
        self.announce(&ids);
        let mut written: Vec<(PathBuf, PathBuf)> = Vec::new();
        let mut renamed = 0;
        let result = (|| {
            for rec in recs {
                let (path, bytes) = encode(&self.dir, rec)?;
                let tmp = path.with_extension("tmp");
                written.push((tmp.clone(), path));
                fs::write(&tmp, &bytes).map_err(io(&tmp))?;
            }
            let dir = fs::File::open(&self.dir).map_err(io(&self.dir))?;
            nix::unistd::syncfs(&dir).map_err(|e| JobStoreError::Io {
                path: self.dir.clone(),
                source: e.into(),
            })?;
            for (tmp, path) in &written {
                fs::rename(tmp, path).map_err(io(tmp))?;
                renamed += 1;
            }
            dir.sync_all().map_err(io(&self.dir))
        })();
        if result.is_err() {
            // The jobs are refused: none may read as known after a restart.
            for (k, (tmp, path)) in written.iter().enumerate() {
                let _ = fs::remove_file(if k < renamed { path } else { tmp });
            }
        }
        result
    }

    /// Records the final status of a job (on disk first). The status is
    /// kept in memory even when it could not be written: the job ended.
    pub fn finish(&self, status: JobStatus) -> Result<(), JobStoreError> {
        let id = status.job_id.clone();
        let mut inner = self.lock_when_idle(&[id.as_str()]);
        let Some(rec) = inner.jobs.get(&id) else {
            return Ok(());
        };
        let rec = JobRecord {
            status,
            ended: Some(now_secs()),
            ..rec.clone()
        };
        let taken = self.take(&mut inner, vec![id.clone()]);
        drop(inner);
        let written = self.persist(&rec);
        taken.settle(|jobs| {
            jobs.insert(id, rec);
        });
        written
    }

    /// Forgets the jobs that ended more than `keep` ago, but for those in
    /// `unreported` (their end not yet told to the control plane, which
    /// sends a job it polls and the agent does not know again): their
    /// records are removed from disk and memory. The number forgotten.
    ///
    /// Until then a repeated job id returns the recorded status; after, the
    /// control plane has long had the job's end (it is told at the next
    /// heartbeat and polls running jobs every heartbeat).
    pub fn forget_ended(
        &self,
        keep: std::time::Duration,
        unreported: &std::collections::HashSet<String>,
    ) -> Result<usize, JobStoreError> {
        let cutoff = now_secs().saturating_sub(keep.as_secs());
        let old: Vec<String> = self
            .lock()
            .jobs
            .values()
            .filter(|r| r.status.status != JobState::Running)
            .filter(|r| r.ended.is_some_and(|t| t < cutoff))
            .filter(|r| !unreported.contains(&r.request.job_id))
            .map(|r| r.request.job_id.clone())
            .collect();
        // A file and its record go together, a few hundred at a time, their
        // ids busy meanwhile: a job sent again under one of them waits for
        // its old file to go, never has its new one removed.
        let mut forgotten = 0;
        for chunk in old.chunks(FORGET_CHUNK) {
            let ids: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let mut inner = self.lock_when_idle(&ids);
            let still: Vec<String> = chunk
                .iter()
                .filter(|id| {
                    inner
                        .jobs
                        .get(id.as_str())
                        .is_some_and(|r| r.status.status != JobState::Running)
                })
                .cloned()
                .collect();
            let taken = self.take(&mut inner, still.clone());
            drop(inner);
            let mut gone = Vec::with_capacity(still.len());
            let mut failure = None;
            for id in still {
                let path = record_path(&self.dir, &id);
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        failure = Some(io(&path)(e));
                        break;
                    }
                }
                gone.push(id);
            }
            forgotten += gone.len();
            taken.settle(|jobs| {
                for id in &gone {
                    jobs.remove(id);
                }
            });
            if let Some(e) = failure {
                return Err(e);
            }
        }
        Ok(forgotten)
    }

    /// A job's status: the one on disk (a job whose record is being
    /// written reads as not there yet, or as before). Never waits for a
    /// disk write, so async code calls it directly.
    pub fn get(&self, job_id: &str) -> Option<JobStatus> {
        self.lock().jobs.get(job_id).map(|r| r.status.clone())
    }

    /// Every record, in arrival order.
    pub fn all(&self) -> Vec<JobRecord> {
        let mut v: Vec<JobRecord> = self.lock().jobs.values().cloned().collect();
        v.sort_by_key(|r| r.seq);
        v
    }
}

/// A succeeded status with `execute_msg` capped.
pub fn succeeded(job_id: &str, execute_msg: Option<&str>) -> JobStatus {
    JobStatus {
        job_id: job_id.to_string(),
        status: JobState::Succeeded,
        error_code: None,
        error_msg: None,
        execute_msg: execute_msg.map(cap_execute_msg),
    }
}

/// Records removed with their ids busy at once.
const FORGET_CHUNK: usize = 256;

const JOURNAL_EXT: &str = "written";
/// A job's note of the multipart upload it has open, beside its journal.
pub const UPLOAD_NOTE_EXT: &str = "upload";

/// Job `job_id`'s record.
fn record_path(dir: &Path, job_id: &str) -> PathBuf {
    dir.join(format!("{job_id}.json"))
}

fn journal_path(dir: &Path, job_id: &str) -> PathBuf {
    dir.join(format!("{job_id}.{JOURNAL_EXT}"))
}

/// `heading`, then `paths` one per line, within [`EXECUTE_MSG_MAX`] bytes
/// (the rest cut to `...`).
pub fn path_list(heading: &str, paths: impl Iterator<Item = PathBuf>) -> String {
    let mut list = format!("{heading}\n");
    for p in paths {
        let line = format!("{}\n", p.display());
        if list.len() + line.len() > EXECUTE_MSG_MAX - 4 {
            list.push_str("...\n");
            break;
        }
        list.push_str(&line);
    }
    list
}

/// A failed status with messages capped.
pub fn failed(job_id: &str, code: &str, msg: &str, execute_msg: Option<&str>) -> JobStatus {
    JobStatus {
        job_id: job_id.to_string(),
        status: JobState::Failed,
        error_code: Some(code.to_string()),
        error_msg: Some(cap_execute_msg(msg)),
        execute_msg: execute_msg.map(cap_execute_msg),
    }
}

/// A write of the store held in progress, for tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc, Mutex};

    use super::JobStore;

    /// Holds the first write of job `id`'s record, until [`Gate::release`]
    /// or the gate's drop; counts the writes of that record.
    pub(crate) struct Gate {
        held: mpsc::Receiver<()>,
        release: Option<mpsc::Sender<()>>,
        writes: Arc<AtomicUsize>,
    }

    impl Gate {
        pub(crate) fn on(store: &mut JobStore, id: &'static str) -> Self {
            let (held_tx, held) = mpsc::channel();
            let (release, released) = mpsc::channel::<()>();
            let released = Mutex::new(released);
            let writes = Arc::new(AtomicUsize::new(0));
            let counted = Arc::clone(&writes);
            store.on_write(Box::new(move |ids| {
                if ids.contains(&id) && counted.fetch_add(1, Ordering::SeqCst) == 0 {
                    let _ = held_tx.send(());
                    let _ = released.lock().map(|r| r.recv());
                }
            }));
            Self {
                held,
                release: Some(release),
                writes,
            }
        }

        /// Waits until the write is held.
        pub(crate) fn wait_held(&self) {
            self.held.recv().expect("the gated write never came");
        }

        /// Lets the held write go on.
        pub(crate) fn release(&mut self) {
            self.release.take();
        }

        /// Writes of the record so far.
        pub(crate) fn writes(&self) -> usize {
            self.writes.load(Ordering::SeqCst)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Gate;
    use super::*;
    use crate::protocol::JobKind;
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::mpsc;
    use std::sync::Arc;

    /// Runs `f` on a thread of its own: its result, or `None` if it was
    /// still blocked long after it should have ended (then it is left).
    fn unblocked<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(20)).ok()
    }

    #[test]
    fn other_jobs_do_not_wait_for_a_batch_being_flushed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = JobStore::open(dir.path()).expect("open");
        store.insert(&req("done")).expect("done");
        store.finish(succeeded("done", None)).expect("finish");
        let mut gate = Gate::on(&mut store, "slow");
        let store = Arc::new(store);
        let batch = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || store.insert_many(&[req("slow"), req("slow-2")]))
        };
        gate.wait_held();
        // With the batch's flush held: polls, another job and another
        // job's end go through; the held jobs are not known yet.
        let others = {
            let store = Arc::clone(&store);
            unblocked(move || {
                let polled = store.get("done").map(|s| s.status);
                let inserted = store.insert(&req("other")).expect("other");
                store
                    .finish(succeeded("other", None))
                    .expect("finish other");
                (polled, inserted, store.get("slow"), store.all().len())
            })
        };
        gate.release();
        let (polled, inserted, slow, all) = others.expect("waited for another job's flush");
        assert_eq!(polled, Some(JobState::Succeeded));
        assert!(matches!(inserted, Inserted::New(_)), "{inserted:?}");
        assert_eq!((slow, all), (None, 2));
        let out = batch.join().expect("batch");
        assert!(
            out.iter().all(|o| matches!(o, Ok(Inserted::New(_)))),
            "{out:?}"
        );
        assert_eq!(store.get("slow").map(|s| s.status), Some(JobState::Running));
        let order: Vec<String> = store.all().into_iter().map(|r| r.request.job_id).collect();
        assert_eq!(order, ["done", "slow", "slow-2", "other"]);
    }

    #[test]
    fn a_job_id_sent_twice_at_once_is_recorded_once_and_answered_once_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = JobStore::open(dir.path()).expect("open");
        let mut gate = Gate::on(&mut store, "dup");
        let store = Arc::new(store);
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let send = |batch: bool| {
            let (store, released) = (Arc::clone(&store), Arc::clone(&released));
            std::thread::spawn(move || {
                let outcome = if batch {
                    store.insert_many(&[req("dup")]).remove(0)
                } else {
                    store.insert(&req("dup"))
                };
                (outcome.expect("dup"), released.load(SeqCst))
            })
        };
        let first = send(false);
        gate.wait_held();
        let second = send(true);
        let third = send(false);
        // Both wait for the record being written: not answered while it
        // is held (they cannot end before the release when they wait, so
        // this cannot fail spuriously; a store that answered at once would
        // have them ended by then).
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            !second.is_finished() && !third.is_finished(),
            "answered while the record was being written"
        );
        released.store(true, SeqCst);
        gate.release();
        let answers = [first, second, third].map(|t| t.join().expect("sender"));
        assert!(matches!(answers[0].0, Inserted::New(_)), "{answers:?}");
        for (outcome, after_write) in &answers[1..] {
            assert!(matches!(outcome, Inserted::Existing(_)), "{answers:?}");
            assert!(after_write, "answered before the record was written");
        }
        assert_eq!(gate.writes(), 1, "the record was written twice");
    }

    #[test]
    fn a_refused_batch_leaves_no_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = JobStore::open(dir.path()).expect("open");
        // `b`'s record cannot be renamed into place: a directory is there.
        fs::create_dir(dir.path().join("b.json")).expect("dir in the way");
        fs::write(dir.path().join("b.json/x"), b"").expect("not empty");
        let out = store.insert_many(&[req("a"), req("b")]);
        assert!(out.iter().all(Result::is_err), "{out:?}");
        assert_eq!(store.get("a"), None);
        drop(store);
        fs::remove_dir_all(dir.path().join("b.json")).expect("remove the directory");
        let (store, interrupted) = JobStore::open(dir.path()).expect("reopen");
        assert!(interrupted.is_empty(), "{interrupted:?}");
        assert_eq!(store.all(), []);
    }

    fn req(id: &str) -> JobRequest {
        JobRequest {
            job_id: id.into(),
            request_id: "r".into(),
            server_id: "s".into(),
            phone_id: Some("p".into()),
            kind: JobKind::StartPhone,
        }
    }

    #[test]
    fn jobs_ended_long_ago_are_forgotten_unless_unreported() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (store, _) = JobStore::open(dir.path()).expect("open");
            for id in ["old", "older-format", "recent", "running", "unreported"] {
                store.insert(&req(id)).expect("insert");
            }
            for id in ["old", "older-format", "recent", "unreported"] {
                store.finish(succeeded(id, None)).expect("finish");
            }
        }
        // Two ended long ago (one by its record, one, written before
        // records had an end time, by its file's time), one recently.
        let edit = |id: &str, ended: Option<u64>| {
            let path = dir.path().join(format!("{id}.json"));
            let mut v: serde_json::Value =
                serde_json::from_slice(&fs::read(&path).expect("read")).expect("json");
            match ended {
                Some(t) => v["ended"] = t.into(),
                None => {
                    v.as_object_mut().expect("object").remove("ended");
                }
            }
            fs::write(&path, serde_json::to_vec(&v).expect("encode")).expect("write");
            path
        };
        edit("old", Some(1_000));
        edit("unreported", Some(1_000));
        let older = edit("older-format", None);
        let two_days_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86400);
        fs::File::options()
            .write(true)
            .open(&older)
            .and_then(|f| f.set_modified(two_days_ago))
            .expect("set mtime");

        let (store, interrupted) = JobStore::open(dir.path()).expect("reopen");
        assert_eq!(interrupted, ["running"]);
        let unreported = ["unreported".to_string()].into_iter().collect();
        let day = std::time::Duration::from_secs(86400);
        assert_eq!(store.forget_ended(day, &unreported).expect("forget"), 2);
        for gone in ["old", "older-format"] {
            assert_eq!(store.get(gone), None, "{gone}");
            assert!(!dir.path().join(format!("{gone}.json")).exists(), "{gone}");
        }
        // The job interrupted just now has ended, recently.
        for kept in ["recent", "running", "unreported"] {
            assert!(store.get(kept).is_some(), "{kept}");
            assert!(dir.path().join(format!("{kept}.json")).exists(), "{kept}");
        }
        assert_eq!(store.forget_ended(day, &unreported).expect("again"), 0);
        // What is forgotten is forgotten after a restart too.
        drop(store);
        let (store, _) = JobStore::open(dir.path()).expect("reopen");
        assert_eq!(store.get("old"), None);
        assert_eq!(store.all().len(), 3);
    }

    #[test]
    fn repeated_id_returns_existing_status() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = JobStore::open(dir.path()).expect("open");
        assert!(matches!(
            store.insert(&req("j1")).expect("insert"),
            Inserted::New(_)
        ));
        store.finish(succeeded("j1", Some("ok"))).expect("finish");
        match store.insert(&req("j1")).expect("insert again") {
            Inserted::Existing(s) => assert_eq!(s.status, JobState::Succeeded),
            other => panic!("expected existing, got {other:?}"),
        }
    }

    #[test]
    fn a_batch_is_recorded_once_per_id_and_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (store, _) = JobStore::open(dir.path()).expect("open");
            store.insert(&req("old")).expect("old");
            store.finish(succeeded("old", None)).expect("finish");
            let out = store.insert_many(&[req("x"), req("y"), req("x"), req("../z"), req("old")]);
            assert!(matches!(out[0], Ok(Inserted::New(_))), "{out:?}");
            assert!(matches!(out[1], Ok(Inserted::New(_))), "{out:?}");
            assert!(matches!(out[2], Ok(Inserted::Existing(_))), "{out:?}");
            assert!(
                matches!(out[3], Err(JobStoreError::InvalidId(_))),
                "{out:?}"
            );
            match &out[4] {
                Ok(Inserted::Existing(s)) => assert_eq!(s.status, JobState::Succeeded),
                other => panic!("expected the recorded job, got {other:?}"),
            }
            let y = store.lock().jobs["y"].seq;
            assert_eq!(store.lock().jobs["x"].seq + 1, y, "arrival order kept");
        }
        let left: Vec<_> = fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "tmp"))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
        let (store, mut interrupted) = JobStore::open(dir.path()).expect("reopen");
        interrupted.sort();
        assert_eq!(interrupted, ["x", "y"]);
        assert_eq!(
            store.get("old").map(|s| s.status),
            Some(JobState::Succeeded)
        );
    }

    #[test]
    fn a_job_cut_off_mid_extraction_names_what_its_journal_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (store, _) = JobStore::open(dir.path()).expect("open");
            store.insert(&req("push")).expect("push");
            store.insert(&req("done")).expect("done");
            store.finish(succeeded("done", None)).expect("finish");
            // Two whole records and one a kill cut off mid-write.
            fs::write(
                store.journal_path("push"),
                b"data/a\0data/a/b.txt\0data/a/c",
            )
            .expect("journal");
            fs::write(store.journal_path("done"), b"x\0").expect("stale journal");
        }
        let (store, interrupted) = JobStore::open(dir.path()).expect("reopen");
        assert_eq!(interrupted, ["push"]);
        let st = store.get("push").expect("push");
        assert_eq!(st.error_code.as_deref(), Some("CPS.0054"));
        assert!(
            st.error_msg
                .as_deref()
                .is_some_and(|m| m.contains("2 paths may have been written")),
            "{st:?}"
        );
        assert_eq!(
            st.execute_msg.as_deref(),
            Some("may have been written before the agent stopped:\ndata/a\ndata/a/b.txt\n")
        );
        assert_eq!(store.get("done").map(|s| s.execute_msg), Some(None));
        let journals: Vec<_> = fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "written"))
            .collect();
        assert!(journals.is_empty(), "journals left: {journals:?}");
    }

    #[test]
    fn running_jobs_fail_on_reopen_and_finished_ones_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (store, _) = JobStore::open(dir.path()).expect("open");
            store.insert(&req("a")).expect("a");
            store.insert(&req("b")).expect("b");
            store.finish(succeeded("b", None)).expect("finish b");
        }
        let (store, interrupted) = JobStore::open(dir.path()).expect("reopen");
        assert_eq!(interrupted, vec!["a".to_string()]);
        let a = store.get("a").expect("a kept");
        assert_eq!(a.status, JobState::Failed);
        assert_eq!(a.error_code.as_deref(), Some("CPS.0054"));
        assert_eq!(store.get("b").expect("b").status, JobState::Succeeded);
        let order: Vec<String> = store.all().into_iter().map(|r| r.request.job_id).collect();
        assert_eq!(order, vec!["a", "b"]);
    }

    #[test]
    fn unsafe_ids_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = JobStore::open(dir.path()).expect("open");
        for bad in ["", "../x", "a/b", ".hidden"] {
            assert!(store.insert(&req(bad)).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn long_messages_are_capped() {
        let s = failed("j", "CPS.0003", &"x".repeat(5000), Some(&"y".repeat(5000)));
        assert_eq!(s.error_msg.map(|m| m.len()), Some(1024));
        assert_eq!(s.execute_msg.map(|m| m.len()), Some(1024));
    }
}
