//! The extraction pipeline: the calling thread reads the stream, validates
//! each entry, resolves and creates directories (so a directory always
//! exists before anything is queued into it) and hands files and links to a
//! few writer threads (one on btrfs) over bounded channels; the bytes in
//! flight are capped by a budget, so memory stays bounded whatever the
//! archive.
//!
//! Entries are routed to a writer by a hash of their path so that two
//! entries naming the same path, and a hard link after its target, are
//! handled in archive order (`route.rs`). When a directory lookup would
//! pass through a symlink this archive created, all writers are drained
//! first.
//! A regular file costs `openat2` (from the cached parent fd), `write`,
//! `utimensat` (when mtimes are kept) and `close`; writer threads run with a
//! private zero umask so the mode given to `openat2` is final, and create
//! as the owner the archive gives (their filesystem ids follow it, see
//! [`Creds`]), so only a file whose owner differs from its neighbours' also
//! costs an `fchown`.
//!
//! Large files travel in 1 MiB chunks whose buffers go back to the parser
//! once written; from a source that lends its bytes ([`Lend`], a download)
//! a chunk is the source's own buffers instead, written without a copy.
//! When the run ends with a sync, the disk works while the archive is still
//! arriving, so the final `syncfs` finds little left to write: each large
//! file has its writeback started every 8 MiB (`sync_file_range`, not
//! waited for), and, except on btrfs, a flusher thread calls `syncfs` each
//! time the writers have finished another 4,096 jobs or 128 MiB (small
//! files have no per-file call for it: that would be a fifth syscall each).
//! On a two-core host the final sync of 100,000 small files was a third of
//! the run, on one core while the other idled; a VM's disk that took 1 GiB
//! of large files into its host's cache flushed it for a second at the end.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use bytes::Bytes;

use super::path::{bytes_path, prefixes, sanitize, RelPath};
use super::route::Router;
use super::sys;
use super::{
    ArchiveError, ExtractOptions, ExtractReport, Lend, Skipped, SpecialFiles, WrittenPaths,
};

/// Read buffer over the source.
const READ_BUFFER: usize = 1 << 20;
/// Files up to this size travel as one message; larger ones in chunks.
const CHUNK: usize = 1 << 20;
/// Bytes of file data queued to writers at most. With the read buffer and
/// the spare chunk buffers this is most of the extractor's memory (a local
/// extraction peaks at 15-27 MiB resident in the tar bench, 35-37 on
/// btrfs with the small files held back, [`super::GROUP_WINDOW`]); a
/// streamed push adds the download's parts to it.
const BUDGET: usize = 8 << 20;
/// Batches queued per writer at most.
const QUEUE: usize = 64;
/// Jobs are handed to a writer in batches of this many (or bytes), so the
/// channel's wake-ups are amortised over many files.
const BATCH: usize = 64;
const BATCH_BYTES: usize = 512 << 10;
/// Jobs (files, links, 1 MiB chunks) the writers finish between two
/// background flushes of a run that ends with a sync, or bytes they write,
/// whichever comes first: a large file's pages are already on their way to
/// the disk ([`WRITEBACK_STEP`]), and a flush every [`FLUSH_BYTES`] makes
/// the disk put them down while the run goes on rather than in one final
/// cache flush of the whole archive (4 files of 256 MB streamed from the
/// store: 1.6-2.1 s against 2.5-3.0 s without).
const FLUSH_EVERY: u64 = 4096;
const FLUSH_BYTES: u64 = 128 << 20;
/// Writer threads at most; `MAX_THREADS * BATCH_BYTES + CHUNK` stays under
/// `BUDGET`, so the parser never waits on bytes it has not handed out yet.
const MAX_THREADS: usize = 8;
const _: () = assert!(MAX_THREADS * BATCH_BYTES + CHUNK < BUDGET);
/// A large file's writeback is started every this many bytes written
/// (when the run ends with a sync).
const WRITEBACK_STEP: u64 = 8 << 20;
/// Cached directory fds: an eighth of the open-file limit (several
/// extractions may run at once in one process), within these bounds; the
/// cache is cleared when full. An archive that visits its directories in
/// turn rather than one after the other (every file in a directory other
/// than the last one's) needs them all open: a miss costs an `openat2` and
/// a `close` on top of the file's own.
const DIR_CACHE_MIN: usize = 64;
const DIR_CACHE_MAX: usize = 8192;

/// Attributes applied to a created file or link.
struct Meta {
    mode: u32,
    owner: Option<(u32, u32)>,
    mtime: Option<i64>,
    xattrs: Vec<(CString, Vec<u8>)>,
}

/// A directory beneath the target, open.
struct Dir {
    fd: OwnedFd,
    /// Set-group-ID: what is created in it takes its group, not the
    /// creator's.
    setgid: bool,
}

impl Dir {
    /// A directory that was there before this run: its mode read once.
    /// (A phone setting the bit later makes a file created after take
    /// the directory's group, one the directory's owner could give it
    /// anyway.)
    fn opened(fd: OwnedFd) -> io::Result<Dir> {
        let st = sys::fstat(fd.as_raw_fd())?;
        Ok(Dir {
            setgid: st.st_mode & libc::S_ISGID != 0,
            fd,
        })
    }
}

impl AsRawFd for Dir {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

enum Job {
    /// A regular file: its first bytes (a range of the batch's data);
    /// `total` beyond them means chunks follow on the same writer.
    File {
        parent: Arc<Dir>,
        rel: RelPath,
        meta: Meta,
        data: std::ops::Range<usize>,
        total: u64,
    },
    Chunk(Chunk),
    Symlink {
        parent: Arc<Dir>,
        rel: RelPath,
        target: CString,
        meta: Meta,
    },
    Hardlink {
        parent: Arc<Dir>,
        rel: RelPath,
        tparent: Arc<Dir>,
        tname: CString,
    },
    Barrier(SyncSender<()>),
}

/// A piece of a large file after its first bytes.
enum Chunk {
    /// Copied from the source into a buffer of the spare pool.
    Owned(Vec<u8>),
    /// Lent by the source ([`Lend`]): its own buffers, written as they are.
    Lent(Vec<Bytes>),
}

impl Chunk {
    fn len(&self) -> usize {
        match self {
            Chunk::Owned(d) => d.len(),
            Chunk::Lent(segments) => segments.iter().map(Bytes::len).sum(),
        }
    }
}

/// Jobs for one writer with the data of their small files in one buffer
/// (one allocation per batch rather than per file, and none once buffers
/// come back from the writers).
struct Batch {
    jobs: Vec<Job>,
    /// File data in `data[..used]`; the rest is initialised room left from
    /// the buffer's earlier batches, filled again without zeroing.
    data: Vec<u8>,
    used: usize,
}

impl Batch {
    fn new() -> Self {
        Batch {
            jobs: Vec::with_capacity(BATCH),
            data: Vec::new(),
            used: 0,
        }
    }

    /// Bytes of file data this batch holds against the budget.
    fn held(&self) -> usize {
        self.used
            + self
                .jobs
                .iter()
                .map(|j| match j {
                    Job::Chunk(c) => c.len(),
                    _ => 0,
                })
                .sum::<usize>()
    }
}

/// Caps the bytes of file data in flight between the parser and writers.
struct Budget {
    state: Mutex<BudgetState>,
    freed: Condvar,
}

#[derive(Default)]
struct BudgetState {
    used: usize,
    waiting: bool,
}

impl Budget {
    fn new() -> Self {
        Budget {
            state: Mutex::new(BudgetState::default()),
            freed: Condvar::new(),
        }
    }

    fn acquire(&self, n: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.used > 0 && st.used + n > BUDGET {
            st.waiting = true;
            st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.used += n;
    }

    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.used = st.used.saturating_sub(n);
        // Waking costs a syscall: only when the parser waits.
        if st.waiting {
            st.waiting = false;
            self.freed.notify_all();
        }
    }
}

struct Shared {
    target: PathBuf,
    abort: AtomicBool,
    error: Mutex<Option<ArchiveError>>,
    budget: Budget,
    track: bool,
    /// A final sync was asked: large files start their writeback as they
    /// are written.
    early_writeback: bool,
    /// Jobs the writers finished and the bytes those held, and the flusher
    /// they wake every [`FLUSH_EVERY`] jobs or [`FLUSH_BYTES`] bytes (when a
    /// final sync was asked).
    jobs_done: AtomicU64,
    bytes_done: AtomicU64,
    flusher: Option<Arc<Flusher>>,
    /// Chunk buffers, and batch data buffers.
    spare: Spare,
    batch_buffers: Spare,
    /// Entries get owners from the archive (mapped): writers create them
    /// with those owners where they can ([`Creds`]).
    set_owners: bool,
}

/// Buffers written out and handed back for the parser to fill again (no
/// allocation, zeroing or page faults per MiB of a large file or per batch
/// of small ones).
struct Spare {
    bufs: Mutex<Vec<Vec<u8>>>,
    /// Buffers kept at most.
    keep: usize,
    /// Buffers smaller than this are not kept.
    min: usize,
}

impl Spare {
    fn new(keep: usize, min: usize) -> Self {
        Spare {
            bufs: Mutex::new(Vec::new()),
            keep,
            min,
        }
    }

    /// A buffer of `n` bytes (contents unspecified).
    fn take(&self, n: usize) -> Vec<u8> {
        let mut buf = self
            .reuse()
            .unwrap_or_else(|| Vec::with_capacity(n.max(self.min)));
        buf.resize(n, 0);
        buf
    }

    /// A buffer handed back, as long as it was.
    fn reuse(&self) -> Option<Vec<u8>> {
        self.bufs.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put(&self, buf: Vec<u8>) {
        let mut bufs = self.bufs.lock().unwrap_or_else(|p| p.into_inner());
        if bufs.len() < self.keep && buf.capacity() >= self.min {
            bufs.push(buf);
        }
    }
}

impl Shared {
    fn fail(&self, e: ArchiveError) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.abort.store(true, Ordering::SeqCst);
    }

    fn take_error(&self) -> Option<ArchiveError> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn full(&self, rel: &[u8]) -> PathBuf {
        self.target.join(bytes_path(rel))
    }
}

/// The write-ahead list of [`ExtractOptions::journal`]: each path about
/// to be created or replaced is appended (NUL-terminated) before a writer
/// or the parser touches it, a batch at a time, so a process killed
/// mid-run leaves a list holding everything it wrote.
struct Journal {
    file: std::fs::File,
    path: PathBuf,
    pending: Vec<u8>,
}

impl Journal {
    fn open(path: &Path) -> Result<Self, ArchiveError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| ArchiveError::io("create journal", path, e))?;
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            pending: Vec::new(),
        })
    }

    fn note(&mut self, rel: &[u8]) {
        self.pending.extend_from_slice(rel);
        self.pending.push(0);
    }

    /// Appends what was noted since the last call.
    fn write(&mut self) -> Result<(), ArchiveError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        io::Write::write_all(&mut self.file, &self.pending)
            .map_err(|e| ArchiveError::io("write journal", &self.path, e))?;
        self.pending.clear();
        Ok(())
    }
}

/// The writer threads.
struct Pool {
    txs: Vec<SyncSender<Batch>>,
    pending: Vec<Batch>,
    handles: Vec<JoinHandle<WrittenPaths>>,
    shared: Arc<Shared>,
    journal: Option<Journal>,
}

impl Pool {
    fn new(n: usize, shared: Arc<Shared>, journal: Option<Journal>) -> Result<Self, ArchiveError> {
        let mut pool = Pool {
            txs: Vec::new(),
            pending: Vec::new(),
            handles: Vec::new(),
            shared,
            journal,
        };
        for i in 0..n {
            let (tx, rx) = sync_channel(QUEUE);
            let shared = pool.shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("tar-writer-{i}"))
                .spawn(move || writer(rx, &shared))
                .map_err(|e| ArchiveError::io("spawn writer thread for", &pool.shared.target, e))?;
            pool.txs.push(tx);
            pool.pending.push(Batch::new());
            pool.handles.push(h);
        }
        Ok(pool)
    }

    /// Queues `job` (holding `bytes` of data) on writer `i`; false when
    /// writers stopped.
    fn send(&mut self, i: usize, job: Job, bytes: usize) -> bool {
        let i = i % self.txs.len();
        if let Some(j) = &mut self.journal {
            match &job {
                Job::File { rel, .. } | Job::Symlink { rel, .. } | Job::Hardlink { rel, .. } => {
                    j.note(&rel.joined)
                }
                Job::Chunk(_) | Job::Barrier(_) => {}
            }
        }
        let batch = &mut self.pending[i];
        batch.jobs.push(job);
        if batch.jobs.len() >= BATCH || batch.used + bytes >= BATCH_BYTES {
            return self.flush(i);
        }
        true
    }

    /// Room for `n` more bytes in writer `i`'s next batch, and where it
    /// starts in the batch's data (the pending batch is sent first when it
    /// would overflow). What is read into it counts once [`Pool::fill`]ed.
    fn buffer(&mut self, i: usize, n: usize) -> Result<(&mut [u8], usize), Stop> {
        let i = i % self.txs.len();
        if self.pending[i].used + n > BATCH_BYTES + CHUNK && !self.flush(i) {
            return Err(Stop);
        }
        let batch = &mut self.pending[i];
        if batch.data.is_empty() {
            if let Some(reused) = self.shared.batch_buffers.reuse() {
                batch.data = reused;
            }
        }
        let start = batch.used;
        if batch.data.len() < start + n {
            // Most batches end near `BATCH_BYTES`; one that takes a large
            // file's first chunk late grows once.
            batch.data.resize((start + n).max(BATCH_BYTES), 0);
        }
        Ok((&mut batch.data[start..start + n], start))
    }

    /// Counts the `n` bytes last read into writer `i`'s [`Pool::buffer`].
    fn fill(&mut self, i: usize, n: usize) {
        self.pending[i % self.txs.len()].used += n;
    }

    fn flush(&mut self, i: usize) -> bool {
        if self.pending[i].jobs.is_empty() {
            return true;
        }
        if !self.write_journal() {
            return false;
        }
        let b = std::mem::replace(&mut self.pending[i], Batch::new());
        self.txs[i].send(b).is_ok()
    }

    /// Writes the journal's noted paths ahead of the jobs that create them;
    /// false (the failure recorded) when it cannot.
    fn write_journal(&mut self) -> bool {
        match self.journal.as_mut().map(Journal::write) {
            Some(Err(e)) => {
                self.shared.fail(e);
                false
            }
            _ => true,
        }
    }

    /// Notes `rel` in the journal and writes it at once (the parser is
    /// about to create it itself).
    fn journal_now(&mut self, rel: &[u8]) -> Result<(), Stop> {
        if let Some(j) = &mut self.journal {
            j.note(rel);
        }
        if self.write_journal() {
            Ok(())
        } else {
            Err(Stop)
        }
    }

    fn flush_all(&mut self) -> bool {
        (0..self.txs.len()).all(|i| self.flush(i))
    }

    /// Waits until every writer processed everything queued so far.
    fn barrier(&mut self) -> bool {
        if !self.flush_all() {
            return false;
        }
        let mut acks = Vec::new();
        for tx in &self.txs {
            let (atx, arx) = sync_channel(1);
            let barrier = Batch {
                jobs: vec![Job::Barrier(atx)],
                ..Batch::new()
            };
            if tx.send(barrier).is_err() {
                return false;
            }
            acks.push(arx);
        }
        acks.into_iter().all(|a| a.recv().is_ok())
    }

    fn finish(mut self, written: &mut WrittenPaths) -> Result<(), ArchiveError> {
        self.flush_all();
        drop(self.txs);
        let mut panicked = false;
        for h in self.handles {
            match h.join() {
                Ok(w) => written.append(w),
                Err(_) => panicked = true,
            }
        }
        if panicked {
            return Err(ArchiveError::WriterPanic(self.shared.target.clone()));
        }
        Ok(())
    }
}

fn writer(rx: Receiver<Batch>, shared: &Shared) -> WrittenPaths {
    let mut w = Writer {
        shared,
        written: WrittenPaths::default(),
        open: None,
        creds: Creds::new(shared.set_owners),
    };
    if let Err(e) = sys::private_zero_umask() {
        shared.fail(ArchiveError::io("set writer umask for", &shared.target, e));
    }
    for batch in rx {
        let held = batch.held();
        let jobs = batch.jobs.len();
        for job in batch.jobs {
            if let Job::Barrier(ack) = job {
                let _ = ack.send(());
                continue;
            }
            if !shared.abort.load(Ordering::SeqCst) {
                if let Err(e) = w.run(job, &batch.data) {
                    w.open = None;
                    shared.fail(e);
                }
            }
        }
        shared.budget.release(held);
        if let Some(f) = &shared.flusher {
            // Both counters move on, whichever crossed a step.
            let jobs_step = crosses(&shared.jobs_done, jobs as u64, FLUSH_EVERY);
            if crosses(&shared.bytes_done, held as u64, FLUSH_BYTES) || jobs_step {
                f.kick();
            }
        }
        if !batch.data.is_empty() {
            shared.batch_buffers.put(batch.data);
        }
    }
    w.written
}

/// Adds `n` to `counter`; whether it passed a multiple of `every`.
fn crosses(counter: &AtomicU64, n: u64, every: u64) -> bool {
    let before = counter.fetch_add(n, Ordering::Relaxed);
    before / every != (before + n) / every
}

/// A large file being written in chunks.
struct OpenFile {
    fd: OwnedFd,
    rel: RelPath,
    meta: Meta,
    /// Created with its owner: no chown.
    owned: bool,
    /// The file's size in the archive.
    total: u64,
    /// Bytes written so far, and how many of them writeback was asked for.
    written: u64,
    flushed: u64,
}

struct Writer<'a> {
    shared: &'a Shared,
    written: WrittenPaths,
    open: Option<OpenFile>,
    creds: Creds,
}

/// Who a writer creates as: its thread's filesystem uid and gid, the owner
/// the kernel gives a new file. Set to the owner the archive wants, a file
/// needs no `fchown` after it is made (a call and an inode update less per
/// file; file servers create as their clients the same way). The thread
/// keeps its capabilities across the change, so root's writer still passes
/// every permission check as root.
struct Creds {
    /// The filesystem uid and gid in effect.
    current: (u32, u32),
    /// The owner wanted for the previous file or symlink.
    last: Option<(u32, u32)>,
    /// Whether this thread may change them.
    switchable: bool,
    /// Whether to mark the process dumpable again after a change: the
    /// kernel clears the flag, for the whole process, whenever a thread's
    /// filesystem ids change, which would hide the agent's `/proc` entries
    /// from its own children in a user namespace and stop its core dumps.
    /// Setting it back gives no one a hold on the process: ptrace goes by
    /// the real and effective ids, root's throughout.
    dumpable: bool,
}

impl Creds {
    fn new(set_owners: bool) -> Creds {
        let switchable = set_owners && sys::keep_caps_across_id_changes().is_ok();
        Creds {
            current: sys::fs_ids(),
            last: None,
            switchable,
            dumpable: switchable && sys::dumpable(),
        }
    }

    /// Whether an entry created now in `parent` gets `owner` (`None`: any
    /// owner) without a chown. The ids change to an owner wanted twice in a
    /// row, so a file whose owner differs from both its neighbours' costs a
    /// chown, as before, rather than two changes.
    fn creates_as(&mut self, parent: &Dir, owner: Option<(u32, u32)>) -> bool {
        let Some(wanted) = owner else {
            return true;
        };
        let last = self.last.replace(wanted);
        if parent.setgid {
            // The group comes from the directory.
            return false;
        }
        if wanted != self.current && self.switchable && last == Some(wanted) {
            let gid = sys::set_fsgid(wanted.1);
            let uid = sys::set_fsuid(wanted.0);
            self.current = (uid, gid);
            if self.current != wanted {
                // An id the kernel refused (not mapped in this user
                // namespace): chown from here on.
                self.switchable = false;
            }
            if self.dumpable {
                let _ = sys::set_dumpable();
            }
        }
        wanted == self.current
    }
}

impl Writer<'_> {
    fn record(&mut self, rel: &RelPath) {
        if self.shared.track {
            self.written.push(&rel.joined);
        }
    }

    fn io(&self, op: &'static str, rel: &RelPath, e: io::Error) -> ArchiveError {
        ArchiveError::io(op, self.shared.full(&rel.joined), e)
    }

    fn run(&mut self, job: Job, batch: &[u8]) -> Result<(), ArchiveError> {
        match job {
            Job::File {
                parent,
                rel,
                meta,
                data,
                total,
            } => {
                let name = cname(&rel)?;
                let owned = self.creds.creates_as(&parent, meta.owner);
                let fd = self.create(&parent, &rel, &name, meta.mode)?;
                self.record(&rel);
                let data = &batch[data];
                if !data.is_empty() {
                    sys::write_all(fd.as_raw_fd(), data).map_err(|e| self.io("write", &rel, e))?;
                }
                let file = OpenFile {
                    fd,
                    rel,
                    meta,
                    owned,
                    total,
                    written: data.len() as u64,
                    flushed: 0,
                };
                self.close_when_whole(file)
            }
            Job::Chunk(data) => {
                let Some(mut file) = self.open.take() else {
                    return Ok(());
                };
                let fd = file.fd.as_raw_fd();
                let len = data.len();
                let wrote = match data {
                    Chunk::Owned(data) => {
                        let wrote = sys::write_all(fd, &data);
                        self.shared.spare.put(data);
                        wrote
                    }
                    Chunk::Lent(segments) => {
                        segments.iter().try_for_each(|s| sys::write_all(fd, s))
                    }
                };
                wrote.map_err(|e| self.io("write", &file.rel, e))?;
                file.written += len as u64;
                if self.shared.early_writeback && file.written - file.flushed >= WRITEBACK_STEP {
                    // Start writing this file's new pages to disk now, so the
                    // final `syncfs` does not find a whole large file dirty.
                    // Best effort: the final sync is what makes it durable.
                    let _ = sys::start_writeback(
                        file.fd.as_raw_fd(),
                        file.flushed,
                        file.written - file.flushed,
                    );
                    file.flushed = file.written;
                }
                self.close_when_whole(file)
            }
            Job::Symlink {
                parent,
                rel,
                target,
                meta,
            } => {
                let name = cname(&rel)?;
                let dir = parent.as_raw_fd();
                let owned = self.creds.creates_as(&parent, meta.owner);
                replace(dir, &name, || sys::symlinkat(&target, dir, &name))
                    .map_err(|e| self.io("create symlink", &rel, e))?;
                self.record(&rel);
                if let Some((uid, gid)) = meta.owner.filter(|_| !owned) {
                    sys::lchownat(dir, &name, uid, gid).map_err(|e| self.io("chown", &rel, e))?;
                }
                if let Some(m) = meta.mtime {
                    sys::set_mtime(dir, Some(&name), m)
                        .map_err(|e| self.io("set mtime of", &rel, e))?;
                }
                Ok(())
            }
            Job::Hardlink {
                parent,
                rel,
                tparent,
                tname,
            } => {
                let name = cname(&rel)?;
                let dir = parent.as_raw_fd();
                let link = || sys::linkat(tparent.as_raw_fd(), &tname, dir, &name);
                match link() {
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        // A link to what is already there (itself, or the
                        // same file through a linked directory) is done:
                        // removing the name first would lose the file.
                        let same = sys::same_inode(tparent.as_raw_fd(), &tname, dir, &name)
                            .map_err(|e| self.io("create hard link", &rel, e))?;
                        if !same {
                            // Once the old name is gone the path counts as
                            // written, whether the link then succeeds or not.
                            let replaced = replace(dir, &name, link);
                            self.record(&rel);
                            replaced.map_err(|e| self.io("create hard link", &rel, e))?;
                        }
                    }
                    r => {
                        r.map_err(|e| self.io("create hard link", &rel, e))?;
                        self.record(&rel);
                    }
                }
                Ok(())
            }
            Job::Barrier(_) => Ok(()),
        }
    }

    /// Creates `name` exclusively; an existing non-directory is unlinked
    /// first, so an existing inode (or a symlink) is never written through.
    fn create(
        &self,
        parent: &Dir,
        rel: &RelPath,
        name: &CString,
        mode: u32,
    ) -> Result<OwnedFd, ArchiveError> {
        let dir = parent.as_raw_fd();
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY;
        let mut fd = None;
        replace(dir, name, || {
            fd = Some(sys::openat2(dir, name, flags, mode)?);
            Ok(())
        })
        .map_err(|e| self.io("create", rel, e))?;
        fd.ok_or_else(|| self.io("create", rel, io::Error::from(io::ErrorKind::NotFound)))
    }

    /// Closes `file` once all its bytes are written; until then it stays
    /// open for the chunks that follow.
    fn close_when_whole(&mut self, file: OpenFile) -> Result<(), ArchiveError> {
        if file.written >= file.total {
            self.close(file)
        } else {
            self.open = Some(file);
            Ok(())
        }
    }

    fn close(&mut self, file: OpenFile) -> Result<(), ArchiveError> {
        let fd = file.fd.as_raw_fd();
        if let Some((uid, gid)) = file.meta.owner.filter(|_| !file.owned) {
            sys::fchown(fd, uid, gid).map_err(|e| self.io("chown", &file.rel, e))?;
        }
        for (name, value) in &file.meta.xattrs {
            sys::fsetxattr(fd, name, value).map_err(|e| self.io("set xattr on", &file.rel, e))?;
        }
        if let Some(m) = file.meta.mtime {
            sys::set_mtime(fd, None, m).map_err(|e| self.io("set mtime of", &file.rel, e))?;
        }
        sys::close(file.fd).map_err(|e| self.io("close", &file.rel, e))
    }
}

/// Runs `make`; on `EEXIST` removes what is there, a non-directory or an
/// empty directory (as GNU tar does; a directory holding anything stays,
/// and the entry fails), and retries once.
fn replace(dir: i32, name: &CString, mut make: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    match make() {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            match sys::unlinkat(dir, name, false) {
                Err(e) if e.raw_os_error() == Some(libc::EISDIR) => sys::unlinkat(dir, name, true)?,
                r => r?,
            }
            make()
        }
        r => r,
    }
}

fn cname(rel: &RelPath) -> Result<CString, ArchiveError> {
    sys::cstr(rel.name()).map_err(|e| ArchiveError::io("name", rel.to_path_buf(), e))
}

/// What the tar parser sees: the (decompressed) stream, noting whether it
/// reached end of input and whether the underlying source failed.
struct Tracked<R> {
    inner: R,
    state: Arc<Mutex<SourceState>>,
}

#[derive(Default)]
struct SourceState {
    eof: bool,
    source_error: Option<io::Error>,
}

impl<R: Read> Read for Tracked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.state.lock().unwrap_or_else(|p| p.into_inner()).eof = true;
        }
        Ok(n)
    }
}

/// What the extraction reads from: any reader ([`Copied`]), or one that
/// lends its bytes ([`Lending`]).
pub(super) trait Input: Read {
    /// Whether [`Input::lend`] works.
    const LENDS: bool;
    /// As [`Lend::lend`]; called only when [`Input::LENDS`].
    fn lend(&mut self, max: usize) -> io::Result<Bytes>;
}

/// A plain reader: file data is copied into the extractor's buffers.
pub(super) struct Copied<R>(pub R);

impl<R: Read> Read for Copied<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: Read> Input for Copied<R> {
    const LENDS: bool = false;
    fn lend(&mut self, _max: usize) -> io::Result<Bytes> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// A reader whose bytes are written from its own buffers.
pub(super) struct Lending<L>(pub L);

impl<L: Lend> Read for Lending<L> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<L: Lend> Input for Lending<L> {
    const LENDS: bool = true;
    fn lend(&mut self, max: usize) -> io::Result<Bytes> {
        self.0.lend(max)
    }
}

/// Where the parser collects the bytes of a large file's chunk while the
/// tar parser "reads" it: `Some` while a chunk is taken, during which reads
/// of the source fill it instead of the buffer given to them (the tar
/// parser only counts a file's bytes; it never looks at them).
type Capture = Rc<RefCell<Option<Vec<Bytes>>>>;

/// A read buffer over the source that hands large reads (file data)
/// straight to the source once it is drained, where `BufReader` would copy
/// them through its buffer unless they are at least its whole size.
struct ReadBuffer<I> {
    inner: Source<I>,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
    /// Set when the source lends and the stream is not compressed.
    capture: Option<Capture>,
}

impl<I: Input> ReadBuffer<I> {
    /// Reads at least this large skip the buffer when it is empty.
    const DIRECT: usize = 64 << 10;

    fn new(inner: Source<I>) -> Self {
        ReadBuffer {
            inner,
            buf: vec![0u8; READ_BUFFER].into_boxed_slice(),
            pos: 0,
            filled: 0,
            capture: None,
        }
    }
}

impl<I: Input> Read for ReadBuffer<I> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if let Some(capture) = &self.capture {
            if let Some(segments) = capture.borrow_mut().as_mut() {
                // What the buffer still holds is copied (at most one
                // buffer's worth per file); the rest is lent.
                let segment = if self.pos < self.filled {
                    let n = out.len().min(self.filled - self.pos);
                    let s = Bytes::copy_from_slice(&self.buf[self.pos..self.pos + n]);
                    self.pos += n;
                    s
                } else {
                    self.inner.lend(out.len())?
                };
                let n = segment.len();
                if n > 0 {
                    segments.push(segment);
                }
                return Ok(n);
            }
        }
        if self.pos == self.filled {
            if out.len() >= Self::DIRECT {
                return self.inner.read(out);
            }
            self.filled = self.inner.read(&mut self.buf)?;
            self.pos = 0;
        }
        let n = out.len().min(self.filled - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The raw source: its own failures are kept so they are not mistaken for
/// a corrupt archive.
struct Source<I> {
    inner: I,
    state: Arc<Mutex<SourceState>>,
}

impl<I: Input> Source<I> {
    /// Keeps the source's error `e` and returns the one the parser sees.
    fn failed(&self, e: io::Error) -> io::Error {
        let kind = e.kind();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.source_error.is_none() {
            st.source_error = Some(e);
        }
        io::Error::new(kind, "archive source failed")
    }

    fn lend(&mut self, max: usize) -> io::Result<Bytes> {
        loop {
            match self.inner.lend(max) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.failed(e)),
                Ok(b) => return Ok(b),
            }
        }
    }
}

impl<I: Input> Read for Source<I> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.failed(e)),
                Ok(n) => return Ok(n),
            }
        }
    }
}

fn classify(e: io::Error, entries: u64, state: &Mutex<SourceState>) -> ArchiveError {
    if let Some(src) = state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .source_error
        .take()
    {
        return ArchiveError::Read(src);
    }
    if entries == 0 {
        return ArchiveError::NotATar {
            detail: e.to_string(),
        };
    }
    if e.kind() == io::ErrorKind::UnexpectedEof || e.to_string().contains("entire block") {
        return ArchiveError::Truncated { entries };
    }
    ArchiveError::Corrupt {
        entries,
        detail: e.to_string(),
    }
}

/// A created directory whose final attributes are applied at the end (its
/// mtime would otherwise change as entries land in it).
struct DirMeta {
    rel: Vec<u8>,
    mode: u32,
    owner: Option<(u32, u32)>,
    mtime: Option<i64>,
}

/// Parser-side state: the directory cache and what the parser created.
struct Parser<'o> {
    opts: &'o ExtractOptions,
    shared: Arc<Shared>,
    pool: Pool,
    router: Router,
    root: Arc<Dir>,
    dirs: HashMap<Vec<u8>, Arc<Dir>>,
    /// Directory fds cached at most.
    dir_cache: usize,
    symlinks: HashSet<Vec<u8>>,
    deferred: Vec<DirMeta>,
    written: WrittenPaths,
    report: ExtractReport,
    umask: u32,
    /// Set when the source lends ([`Capture`]).
    capture: Option<Capture>,
    /// What the tar parser is given to "read" a lent chunk into: never
    /// written, so never touched.
    scratch: Vec<u8>,
    /// Small files held back to be created directory by directory.
    window: Window,
}

/// Small files read but not yet handed to a writer, created grouped by
/// directory when the window fills.
#[derive(Default)]
struct Window {
    files: Vec<Staged>,
    /// Their data, one after the other.
    data: Vec<u8>,
    /// The paths of the files held.
    paths: HashSet<Vec<u8>>,
    /// The directories files held are in, and their ancestors (kept from
    /// one partial release to the next, up to the parser's directory cache
    /// size: a full release empties it).
    dirs: HashSet<Vec<u8>>,
    /// Bytes of data held at most; 0 when files are not held.
    limit: usize,
}

struct Staged {
    parent: Arc<Dir>,
    rel: RelPath,
    meta: Meta,
    data: std::ops::Range<usize>,
}

impl Window {
    /// Whether a file at `rel` may be held with the others: only where
    /// creating it out of archive order changes nothing, so neither at the
    /// path of a directory one is in nor beneath a file held (what lands
    /// there depends on the order). Files of one path are released in
    /// archive order: one directory's files keep their order.
    fn admits(&self, rel: &RelPath) -> bool {
        if self.limit == 0 || self.dirs.contains(&rel.joined) {
            return false;
        }
        let parent = rel.parent();
        self.dirs.contains(parent) || !prefixes(parent).any(|p| self.paths.contains(p))
    }

    /// Whether holding a file at `rel` keeps the directories listed within
    /// `max` (held files keep their directories open).
    fn room_for(&self, rel: &RelPath, max: usize) -> bool {
        let parent = rel.parent();
        self.dirs.contains(parent) || self.dirs.len() + prefixes(parent).count() <= max
    }

    /// Whether the window is to be released: its bytes or its files.
    fn full(&self) -> bool {
        self.data.len() >= self.limit || self.files.len() >= MAX_HELD
    }

    fn hold(&mut self, f: Staged) {
        if !self.dirs.contains(f.rel.parent()) {
            for p in prefixes(f.rel.parent()) {
                self.dirs.insert(p.to_vec());
            }
        }
        self.paths.insert(f.rel.joined.clone());
        self.files.push(f);
    }
}

/// Stops the parse loop early because a writer failed (its error is in `Shared`).
struct Stop;

enum Fail {
    Stop,
    Err(ArchiveError),
}

impl From<ArchiveError> for Fail {
    fn from(e: ArchiveError) -> Self {
        Fail::Err(e)
    }
}

impl From<Stop> for Fail {
    fn from(_: Stop) -> Self {
        Fail::Stop
    }
}

impl Parser<'_> {
    fn full(&self, rel: &[u8]) -> PathBuf {
        self.shared.full(rel)
    }

    fn escape(rel: &[u8]) -> ArchiveError {
        ArchiveError::Escape {
            entry: bytes_path(rel),
            reason: "resolves through a symlink leading outside the target",
        }
    }

    /// The directory `rel` beneath the target, created (with parents) when
    /// missing; `entry` names the archive entry for errors.
    fn dir(&mut self, rel: &[u8]) -> Result<Arc<Dir>, Fail> {
        if rel.is_empty() {
            return Ok(self.root.clone());
        }
        if let Some(fd) = self.dirs.get(rel) {
            return Ok(fd.clone());
        }
        if !self.symlinks.is_empty() && prefixes(rel).any(|p| self.symlinks.contains(p)) {
            // A symlink of this archive may still be queued: let it land.
            if !self.pool.barrier() {
                return Err(Fail::Stop);
            }
        }
        let c =
            sys::cstr(rel).map_err(|e| ArchiveError::io("open directory", self.full(rel), e))?;
        let fd = match sys::open_dir_follow(self.root.as_raw_fd(), &c).and_then(Dir::opened) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let p = sanitize(rel).map_err(|_| Self::escape(rel))?;
                let mode = 0o755 & !self.umask;
                return self.mkdir(&p, mode, None);
            }
            Err(e) => return Err(self.open_dir_failed(rel, e).into()),
        };
        Ok(self.cache(rel, fd))
    }

    /// Why directory `rel` could not be opened: a lookup leaving the
    /// target through a symlink (`EXDEV`, `ELOOP`) is an escape.
    fn open_dir_failed(&self, rel: &[u8], e: io::Error) -> ArchiveError {
        match e.raw_os_error() {
            Some(libc::EXDEV) | Some(libc::ELOOP) => Self::escape(rel),
            _ => ArchiveError::io("open directory", self.full(rel), e),
        }
    }

    fn cache(&mut self, rel: &[u8], fd: Dir) -> Arc<Dir> {
        if self.dirs.len() >= self.dir_cache {
            self.dirs.clear();
        }
        let fd = Arc::new(fd);
        self.dirs.insert(rel.to_vec(), fd.clone());
        fd
    }

    /// Creates directory `p` (its parent first); `meta` is the archive's
    /// entry for it, or `None` for an implied parent. An entry replaces a
    /// file or a symlink that does not lead to a directory at `p`, as GNU
    /// tar does; a symlink to a directory beneath the target is kept and
    /// followed (GNU tar's `--keep-directory-symlink`: a phone's root has
    /// such links, `/sdcard` for one).
    fn mkdir(&mut self, p: &RelPath, mode: u32, meta: Option<DirMeta>) -> Result<Arc<Dir>, Fail> {
        let parent = self.dir(p.parent())?;
        let name = cname(p)?;
        self.pool.journal_now(&p.joined)?;
        let mut made = sys::mkdirat(parent.as_raw_fd(), &name, mode | 0o700);
        if matches!(&made, Err(e) if e.raw_os_error() == Some(libc::EEXIST)) {
            // Exists (maybe raced, maybe a symlink to a directory beneath).
            let c = sys::cstr(&p.joined)
                .map_err(|e| ArchiveError::io("open directory", self.full(&p.joined), e))?;
            match sys::open_dir_follow(self.root.as_raw_fd(), &c).and_then(Dir::opened) {
                Ok(fd) => return Ok(self.cache(&p.joined, fd)),
                Err(e)
                    if meta.is_some()
                        && matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ENOENT)) =>
                {
                    sys::unlinkat(parent.as_raw_fd(), &name, false)
                        .map_err(|e| ArchiveError::io("replace", self.full(&p.joined), e))?;
                    made = sys::mkdirat(parent.as_raw_fd(), &name, mode | 0o700);
                }
                Err(e) => return Err(self.open_dir_failed(&p.joined, e).into()),
            }
        }
        match made {
            Ok(()) => {
                if self.shared.track {
                    self.written.push(&p.joined);
                }
                self.report.dirs += 1;
                let owner = self.opts.ownership.map(0, 0);
                self.deferred.push(meta.unwrap_or(DirMeta {
                    rel: p.joined.clone(),
                    mode,
                    owner,
                    mtime: None,
                }));
                let fd = sys::open_dir(parent.as_raw_fd(), &name)
                    .map_err(|e| self.open_dir_failed(&p.joined, e))?;
                // Made here: set-group-ID only as its parent (whose bit
                // a new directory inherits).
                let dir = Dir {
                    fd,
                    setgid: parent.setgid,
                };
                Ok(self.cache(&p.joined, dir))
            }
            Err(e) => Err(ArchiveError::io("create directory", self.full(&p.joined), e).into()),
        }
    }

    fn send(&mut self, i: usize, job: Job) -> Result<(), Stop> {
        let bytes = match &job {
            Job::Chunk(c) => c.len(),
            _ => 0,
        };
        if self.pool.send(i, job, bytes) {
            Ok(())
        } else {
            Err(Stop)
        }
    }

    fn check(&self) -> Result<(), Stop> {
        if self.shared.abort.load(Ordering::Relaxed) {
            Err(Stop)
        } else {
            Ok(())
        }
    }

    fn meta<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        entries: u64,
        state: &Mutex<SourceState>,
    ) -> Result<Meta, ArchiveError> {
        let h = entry.header();
        let corrupt = |e: io::Error| ArchiveError::Corrupt {
            entries,
            detail: e.to_string(),
        };
        let mut mode = h.mode().map_err(corrupt)? & 0o1777;
        if self.opts.public_modes {
            mode = super::public_mode(mode, h.entry_type().is_dir());
        }
        // Empty numeric fields (some writers leave them blank) read as 0.
        let owner = match self.opts.ownership {
            super::Ownership::Unchanged => None,
            o => o.map(h.uid().unwrap_or(0), h.gid().unwrap_or(0)),
        };
        let mtime = if self.opts.preserve_mtime {
            h.mtime().ok().map(|m| m as i64)
        } else {
            None
        };
        let mut xattrs = Vec::new();
        if let Some(exts) = entry
            .pax_extensions()
            .map_err(|e| classify(e, entries, state))?
        {
            for ext in exts {
                let ext = ext.map_err(corrupt)?;
                let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                    continue;
                };
                let allowed = self
                    .opts
                    .xattr_prefixes
                    .iter()
                    .any(|p| name.starts_with(p.as_bytes()));
                match (allowed, CString::new(name)) {
                    (true, Ok(n)) => xattrs.push((n, ext.value_bytes().to_vec())),
                    _ => self.report.xattrs_dropped += 1,
                }
            }
        }
        Ok(Meta {
            mode,
            owner,
            mtime,
            xattrs,
        })
    }

    fn entry<R: Read>(
        &mut self,
        mut entry: tar::Entry<'_, R>,
        entries: u64,
        state: &Mutex<SourceState>,
    ) -> Result<(), Fail> {
        use tar::EntryType as T;
        self.check()?;
        let kind = entry.header().entry_type();
        let raw = entry.path_bytes().into_owned();
        let rel = sanitize(&raw).map_err(|r| ArchiveError::Escape {
            entry: bytes_path(&raw),
            reason: r.reason(),
        })?;
        let special = match kind {
            T::Char => Some("character device"),
            T::Block => Some("block device"),
            T::Fifo => Some("fifo"),
            _ => None,
        };
        if let Some(what) = special {
            return match self.opts.special {
                SpecialFiles::Refuse => Err(ArchiveError::Refused {
                    entry: rel.to_path_buf(),
                    kind: what,
                }
                .into()),
                SpecialFiles::Skip => {
                    self.report.skipped.push(Skipped {
                        path: rel.to_path_buf(),
                        kind: what,
                    });
                    Ok(())
                }
            };
        }
        match kind {
            T::XGlobalHeader | T::GNULongName | T::GNULongLink | T::XHeader => return Ok(()),
            T::Regular | T::Continuous | T::GNUSparse | T::Directory | T::Symlink | T::Link => {}
            _ if kind.as_byte() == b'V' => return Ok(()),
            _ => {
                return Err(ArchiveError::Refused {
                    entry: rel.to_path_buf(),
                    kind: "entry of an unknown type",
                }
                .into())
            }
        }
        if rel.is_root() {
            if kind == T::Directory {
                return Ok(());
            }
            return Err(ArchiveError::Refused {
                entry: bytes_path(&raw),
                kind: "non-directory naming the target itself",
            }
            .into());
        }
        let meta = self.meta(&mut entry, entries, state)?;
        if matches!(kind, T::Directory | T::Symlink | T::Link) {
            self.release(false)?;
        }
        match kind {
            T::Directory => {
                if self.dirs.contains_key(&rel.joined) {
                    return Ok(());
                }
                // What an earlier entry of this path makes lands first.
                if self.router.may_be_queued(&rel.joined) && !self.pool.barrier() {
                    return Err(Fail::Stop);
                }
                let dm = DirMeta {
                    rel: rel.joined.clone(),
                    mode: meta.mode,
                    owner: meta.owner,
                    mtime: meta.mtime,
                };
                self.mkdir(&rel, meta.mode, Some(dm))?;
            }
            T::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                let target = sys::cstr(&target).map_err(|_| ArchiveError::Escape {
                    entry: rel.to_path_buf(),
                    reason: "symlink target contains a NUL byte",
                })?;
                let parent = self.dir(rel.parent())?;
                let prefix = rel.joined.clone();
                self.dirs.retain(|k, _| !k.starts_with(&prefix));
                self.symlinks.insert(rel.joined.clone());
                self.report.symlinks += 1;
                let i = self.router.file(&rel.joined);
                self.send(
                    i,
                    Job::Symlink {
                        parent,
                        rel,
                        target,
                        meta,
                    },
                )?;
            }
            T::Link => {
                let raw_target = entry.link_name_bytes().unwrap_or_default().into_owned();
                let t = sanitize(&raw_target).map_err(|r| ArchiveError::Escape {
                    entry: rel.to_path_buf(),
                    reason: match r {
                        super::path::Refusal::Absolute => "hard link to an absolute path",
                        super::path::Refusal::DotDot => "hard link target contains `..`",
                        super::path::Refusal::Nul => "hard link target contains a NUL byte",
                    },
                })?;
                if t.is_root() {
                    return Err(ArchiveError::Refused {
                        entry: rel.to_path_buf(),
                        kind: "hard link to the target directory",
                    }
                    .into());
                }
                let tparent = self.dir(t.parent())?;
                let tname = cname(&t)?;
                let parent = self.dir(rel.parent())?;
                self.report.hardlinks += 1;
                self.dirs.remove(&rel.joined);
                let route = self.router.link(&rel.joined, &t.joined);
                if route.drain_first && !self.pool.barrier() {
                    return Err(Fail::Stop);
                }
                self.send(
                    route.writer,
                    Job::Hardlink {
                        parent,
                        rel,
                        tparent,
                        tname,
                    },
                )?;
            }
            _ => self.file(entry, rel, meta, entries, state)?,
        }
        Ok(())
    }

    /// Hands the window's files to the writers, directory by directory:
    /// all of them, or (`some`) those of the directories holding most
    /// files, about half the window, the others kept to gather more.
    fn release(&mut self, some: bool) -> Result<(), Fail> {
        if self.window.files.is_empty() {
            return Ok(());
        }
        let mut files = std::mem::take(&mut self.window.files);
        let data = std::mem::take(&mut self.window.data);
        files.sort_by(|a, b| a.rel.parent().cmp(b.rel.parent()));
        // Runs of one directory, largest first.
        let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
        for (k, f) in files.iter().enumerate() {
            match groups.last_mut() {
                Some(g) if files[g.start].rel.parent() == f.rel.parent() => g.end = k + 1,
                _ => groups.push(k..k + 1),
            }
        }
        groups.sort_by_key(|g| std::cmp::Reverse(g.len()));
        let mut go = vec![!some; files.len()];
        if some {
            let (mut bytes, mut count) = (0, 0);
            for g in &groups {
                if count > 0 && (bytes >= self.window.limit / 2 || count >= files.len() / 2) {
                    break;
                }
                for k in g.clone() {
                    go[k] = true;
                    bytes += files[k].data.len();
                    count += 1;
                }
            }
        }
        let mut kept = Vec::new();
        for (f, go) in files.into_iter().zip(go) {
            if !go {
                kept.push(f);
                continue;
            }
            // A failure ends the run: what is held is dropped with it.
            self.check()?;
            let i = self.router.file(&f.rel.joined);
            if some {
                self.window.paths.remove(&f.rel.joined);
            }
            self.report.grouped += 1;
            let n = f.data.len();
            let held = &data[f.data];
            self.queue_file(i, f.parent, f.rel, f.meta, n, n as u64, |buf| {
                buf.copy_from_slice(held);
                Ok(())
            })?;
        }
        // The kept files' data moved to the front, in place: in the order
        // it was read, each piece moves down, over data already sent.
        let mut data = data;
        kept.sort_by_key(|f| f.data.start);
        let mut end = 0;
        for f in &mut kept {
            let n = f.data.len();
            data.copy_within(f.data.clone(), end);
            f.data = end..end + n;
            end += n;
        }
        data.truncate(end);
        if !some {
            self.window.paths.clear();
            self.window.dirs.clear();
        }
        self.window.files = kept;
        self.window.data = data;
        Ok(())
    }

    /// Queues a regular file on writer `i` with its first `first` bytes,
    /// which `fill` writes into the writer's batch; `total` beyond them
    /// means chunks follow.
    #[allow(clippy::too_many_arguments)]
    fn queue_file(
        &mut self,
        i: usize,
        parent: Arc<Dir>,
        rel: RelPath,
        meta: Meta,
        first: usize,
        total: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<(), ArchiveError>,
    ) -> Result<(), Fail> {
        self.shared.budget.acquire(first);
        let start = match self.pool.buffer(i, first) {
            Ok((buf, start)) => fill(buf).map(|()| start).map_err(Fail::from),
            Err(stop) => Err(stop.into()),
        };
        let start = start.inspect_err(|_| self.shared.budget.release(first))?;
        self.pool.fill(i, first);
        self.send(
            i,
            Job::File {
                parent,
                rel,
                meta,
                data: start..start + first,
                total,
            },
        )?;
        Ok(())
    }

    fn file<R: Read>(
        &mut self,
        mut entry: tar::Entry<'_, R>,
        rel: RelPath,
        meta: Meta,
        entries: u64,
        state: &Mutex<SourceState>,
    ) -> Result<(), Fail> {
        let size = entry.size();
        let sparse = entry.header().entry_type() == tar::EntryType::GNUSparse;
        let stage = size <= STAGE_MAX && !sparse && self.window.admits(&rel);
        if !stage || !self.window.room_for(&rel, self.dir_cache) {
            self.release(false)?;
        }
        // A sparse file's data is the archive's pieces with holes between
        // them: read (and copied), never lent.
        let contiguous = !sparse;
        let total = self.report.bytes.saturating_add(size);
        if let Some(limit) = self.opts.max_bytes {
            if total > limit {
                return Err(ArchiveError::TooLarge {
                    entry: rel.to_path_buf(),
                    limit,
                }
                .into());
            }
        }
        self.report.bytes = total;
        self.report.files += 1;
        let parent = self.dir(rel.parent())?;
        // A directory there is replaced (when empty) by the writer.
        self.dirs.remove(&rel.joined);
        let truncated = |e: io::Error| match classify(e, entries, state) {
            ArchiveError::NotATar { .. } => ArchiveError::Truncated { entries },
            e => e,
        };
        if stage {
            let w = &mut self.window;
            let start = w.data.len();
            if w.data.capacity() == 0 {
                w.data.reserve_exact(w.limit + STAGE_MAX as usize);
            }
            w.data.resize(start + size as usize, 0);
            if let Err(e) = entry.read_exact(&mut w.data[start..]) {
                w.data.truncate(start);
                return Err(truncated(e).into());
            }
            w.hold(Staged {
                parent,
                rel,
                meta,
                data: start..start + size as usize,
            });
            if w.full() {
                self.release(true)?;
            }
            return Ok(());
        }
        let i = self.router.file(&rel.joined);
        let first = size.min(CHUNK as u64) as usize;
        self.queue_file(i, parent, rel, meta, first, size, |buf| {
            entry.read_exact(buf).map_err(truncated)
        })?;
        let mut left = size - first as u64;
        while left > 0 {
            self.check()?;
            let n = left.min(CHUNK as u64) as usize;
            let budget = &self.shared.budget;
            budget.acquire(n);
            let data = match self.capture.as_ref().filter(|_| contiguous) {
                Some(capture) => {
                    *capture.borrow_mut() = Some(Vec::new());
                    let read = entry.read_exact(&mut self.scratch[..n]);
                    let segments = capture.borrow_mut().take().unwrap_or_default();
                    read.map(|()| Chunk::Lent(segments))
                }
                None => {
                    let mut data = self.shared.spare.take(n);
                    entry.read_exact(&mut data).map(|()| Chunk::Owned(data))
                }
            };
            let data = match data {
                Ok(data) => data,
                Err(e) => {
                    budget.release(n);
                    return Err(truncated(e).into());
                }
            };
            self.send(i, Job::Chunk(data))?;
            left -= n as u64;
        }
        Ok(())
    }
}

/// Applies the deferred attributes of created directories, deepest first.
fn finish_dirs(root: &OwnedFd, deferred: &[DirMeta], shared: &Shared) -> Result<(), ArchiveError> {
    for d in deferred.iter().rev() {
        let full = || shared.full(&d.rel);
        let c = sys::cstr(&d.rel).map_err(|e| ArchiveError::io("open directory", full(), e))?;
        let fd = match sys::open_dir(root.as_raw_fd(), &c) {
            Ok(fd) => fd,
            // A later entry of the archive replaced it.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
                ) =>
            {
                continue
            }
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => return Err(Parser::escape(&d.rel)),
            Err(e) => return Err(ArchiveError::io("open directory", full(), e)),
        };
        let raw = fd.as_raw_fd();
        if let Some((uid, gid)) = d.owner {
            sys::fchown(raw, uid, gid).map_err(|e| ArchiveError::io("chown", full(), e))?;
        }
        sys::fchmod(raw, d.mode).map_err(|e| ArchiveError::io("chmod", full(), e))?;
        if let Some(m) = d.mtime {
            sys::set_mtime(raw, None, m)
                .map_err(|e| ArchiveError::io("set mtime of", full(), e))?;
        }
    }
    Ok(())
}

fn process_umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// Writers for a target: one on btrfs, where every file created in a
/// subvolume takes its tree's root lock, which the filesystem's own workers
/// (writeback, delayed inode items) also take, so a second writer mostly
/// waits. In the tar bench's btrfs run one writer gave 0.99 of GNU tar's
/// time for 100,000 small files, 0.56 for large files and 0.86 for the mix
/// (two: 0.98, 0.58, 0.90); in probes on a fresh pool small files took
/// 4.10-4.15 s with one, 4.44-4.48 s with two and 5.0 s with six, on two
/// cores. Elsewhere one per core, two to four: 20,000 small files onto an
/// ext4 with a journal took 0.44-0.51 s with two, 0.57-0.63 s with one
/// (GNU tar 0.79-0.87 s), for the same CPU. On an ext4 without one, where
/// the kernel's inode allocator steps past inodes freed in the last
/// minutes, two writers walked twice what one did (2.2-2.9 CPU-s against
/// 1.5-1.7) and were still as fast or faster (1.3-1.6 s against 1.5-1.7).
/// Their allocations running at once are what doubles it: with their
/// creations taken one at a time (a lock around `openat2`) the walk was
/// one writer's (1.3-1.5 CPU-s), but on the ext4 with a journal that lock
/// made the runs a fifth to a half slower, so creations are not
/// serialized.
fn default_threads(on_btrfs: bool) -> usize {
    if on_btrfs {
        return 1;
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 4)
}

/// Files up to this size may be held in the window.
const STAGE_MAX: u64 = 64 << 10;
/// Files held in the window at most (empty ones take no bytes).
const MAX_HELD: usize = 16 << 10;

fn dir_cache_size() -> usize {
    let limit = sys::open_files_limit().unwrap_or(1024);
    usize::try_from(limit / 8)
        .unwrap_or(DIR_CACHE_MAX)
        .clamp(DIR_CACHE_MIN, DIR_CACHE_MAX)
}

/// Calls `syncfs` in the background each time the writers have finished
/// [`FLUSH_EVERY`] more jobs or [`FLUSH_BYTES`] more bytes, while the run
/// goes on.
struct Flusher {
    state: Mutex<FlushState>,
    wake: Condvar,
    /// `syncfs` calls made.
    syncs: AtomicU64,
}

#[derive(Default)]
struct FlushState {
    wanted: bool,
    done: bool,
}

impl Flusher {
    /// Starts the flusher thread on its own descriptor of `root`: an
    /// intermediate `syncfs` must not take a writeback error from the
    /// final one, and errors are reported per open file.
    fn start(root: &OwnedFd, target: &Path) -> Result<FlushThread, ArchiveError> {
        let fd = sys::open_dir(root.as_raw_fd(), c".")
            .map_err(|e| ArchiveError::io("open target", target, e))?;
        let flusher = Arc::new(Flusher {
            state: Mutex::new(FlushState::default()),
            wake: Condvar::new(),
            syncs: AtomicU64::new(0),
        });
        let f = flusher.clone();
        let handle = std::thread::Builder::new()
            .name("tar-flusher".into())
            .spawn(move || {
                let mut st = f.lock();
                loop {
                    while !st.wanted && !st.done {
                        st = f.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                    if st.done {
                        return;
                    }
                    st.wanted = false;
                    drop(st);
                    // Best effort: the final `syncfs` is the one that counts.
                    let _ = sys::syncfs(fd.as_raw_fd());
                    f.syncs.fetch_add(1, Ordering::Relaxed);
                    st = f.lock();
                }
            })
            .map_err(|e| ArchiveError::io("spawn flusher thread for", target, e))?;
        Ok(FlushThread {
            flusher,
            handle: Some(handle),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FlushState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for a flush (one already asked for and not begun is not
    /// doubled).
    fn kick(&self) {
        self.lock().wanted = true;
        self.wake.notify_one();
    }
}

/// The flusher's thread, stopped and joined when dropped (on every return
/// of the run).
struct FlushThread {
    flusher: Arc<Flusher>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for FlushThread {
    fn drop(&mut self) {
        self.flusher.lock().done = true;
        self.flusher.wake.notify_one();
        if let Some(h) = self.handle.take() {
            // A flusher that panicked flushed less: the final sync does the rest.
            let _ = h.join();
        }
    }
}

/// Opens `target` and calls `syncfs` on its filesystem.
pub(super) fn sync_dir(target: &Path) -> Result<(), ArchiveError> {
    let dir =
        std::fs::File::open(target).map_err(|e| ArchiveError::io("open target", target, e))?;
    sys::syncfs(dir.as_raw_fd()).map_err(|e| ArchiveError::io("syncfs", target, e))
}

/// Extracts `reader` beneath the existing directory `target`.
pub(super) fn run<I: Input>(
    reader: I,
    target: &Path,
    opts: &ExtractOptions,
    track: bool,
) -> Result<ExtractReport, ArchiveError> {
    let root = std::fs::File::open(target)
        .and_then(|f| {
            use std::os::unix::fs::MetadataExt;
            let md = f.metadata()?;
            if md.is_dir() {
                Ok(Dir {
                    setgid: md.mode() & libc::S_ISGID != 0,
                    fd: f.into(),
                })
            } else {
                Err(io::Error::from_raw_os_error(libc::ENOTDIR))
            }
        })
        .map_err(|e| ArchiveError::io("open target", target, e))?;
    let state = Arc::new(Mutex::new(SourceState::default()));
    // Headers and small files are read through one large buffer, so the
    // source costs a read per MiB rather than two per entry.
    let mut src = ReadBuffer::new(Source {
        inner: reader,
        state: state.clone(),
    });
    let mut head = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        match src.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(classify(e, 1, &state)),
        }
    }
    if got == 0 {
        return Err(ArchiveError::NotATar {
            detail: "empty input".into(),
        });
    }
    let gzip = head[..got] == [0x1f, 0x8b];
    let capture = (I::LENDS && !gzip).then(Capture::default);
    src.capture = capture.clone();
    let chained = io::Cursor::new(head[..got].to_vec()).chain(src);
    let stream: Box<dyn Read + '_> = if gzip {
        Box::new(flate2::read::MultiGzDecoder::new(chained))
    } else {
        Box::new(chained)
    };
    let mut archive = tar::Archive::new(Tracked {
        inner: stream,
        state: state.clone(),
    });

    // On btrfs each `syncfs` commits a transaction the writers then wait
    // on: 100,000 small files took 13% longer with the flusher than
    // without, where on ext4 they took 6-7% less.
    let on_btrfs = sys::on_btrfs(&root.fd).ok();
    let flush = opts.sync && on_btrfs == Some(false);
    let flusher = flush
        .then(|| Flusher::start(&root.fd, target))
        .transpose()?;
    let shared = Arc::new(Shared {
        target: target.to_path_buf(),
        abort: AtomicBool::new(false),
        error: Mutex::new(None),
        budget: Budget::new(),
        track,
        early_writeback: opts.sync,
        jobs_done: AtomicU64::new(0),
        bytes_done: AtomicU64::new(0),
        flusher: flusher.as_ref().map(|t| t.flusher.clone()),
        // What the budget lets be in flight.
        spare: Spare::new(BUDGET / CHUNK + 2, CHUNK),
        // In a steady run a writer hands a buffer back as the parser needs
        // one; a few more cover the writers' queues.
        batch_buffers: Spare::new(2 * MAX_THREADS, BATCH_BYTES),
        set_owners: !matches!(opts.ownership, super::Ownership::Unchanged),
    });
    let threads = if opts.threads == 0 {
        default_threads(on_btrfs == Some(true))
    } else {
        opts.threads.min(MAX_THREADS)
    };
    let router = Router::new(threads);
    let journal = opts.journal.as_deref().map(Journal::open).transpose()?;
    let pool = Pool::new(threads, shared.clone(), journal)?;
    let mut p = Parser {
        opts,
        shared: shared.clone(),
        pool,
        router,
        root: Arc::new(root),
        dirs: HashMap::new(),
        dir_cache: dir_cache_size(),
        symlinks: HashSet::new(),
        deferred: Vec::new(),
        written: WrittenPaths::default(),
        report: ExtractReport::default(),
        umask: process_umask(),
        scratch: if capture.is_some() {
            vec![0u8; CHUNK]
        } else {
            Vec::new()
        },
        capture,
        window: Window {
            limit: opts
                .group_window
                .unwrap_or(if on_btrfs == Some(true) && threads == 1 {
                    super::GROUP_WINDOW
                } else {
                    0
                }),
            ..Window::default()
        },
    };

    let mut parsed: Result<(), Fail> = Ok(());
    let mut count = 0u64;
    match archive.entries() {
        Err(e) => parsed = Err(Fail::Err(classify(e, 0, &state))),
        Ok(entries) => {
            for entry in entries {
                let r = match entry {
                    Ok(entry) => {
                        count += 1;
                        p.entry(entry, count, &state)
                    }
                    Err(e) => Err(Fail::Err(classify(e, count, &state))),
                };
                if r.is_err() {
                    parsed = r;
                    break;
                }
            }
            if parsed.is_ok() {
                parsed = p.release(false);
            }
        }
    }
    if parsed.is_ok() {
        let st = state.lock().unwrap_or_else(|p| p.into_inner());
        if st.eof {
            // The stream ended without the end-of-archive blocks.
            parsed = Err(Fail::Err(if count == 0 {
                ArchiveError::NotATar {
                    detail: "no tar header found".into(),
                }
            } else {
                ArchiveError::Truncated { entries: count }
            }));
        }
    }

    let Parser {
        pool,
        mut written,
        report,
        deferred,
        dirs,
        root,
        ..
    } = p;
    drop(dirs);
    let joined = pool.finish(&mut written);
    // Joined, so its count is final.
    drop(flusher);
    let background_syncs = shared
        .flusher
        .as_ref()
        .map_or(0, |f| f.syncs.load(Ordering::Relaxed));
    let writer_err = shared.take_error();
    let err = match (parsed, joined, writer_err) {
        (_, Err(e), _) => Some(e),
        (Err(Fail::Err(e)), _, _) => Some(e),
        (_, _, Some(e)) => Some(e),
        (Err(Fail::Stop), _, None) => Some(ArchiveError::WriterPanic(target.to_path_buf())),
        (Ok(()), Ok(()), None) => None,
    };
    let err = match err {
        Some(e) => Some(e),
        None => finish_dirs(&root.fd, &deferred, &shared).err(),
    };
    let err = match err {
        Some(e) => Some(e),
        None if opts.sync => sys::syncfs(root.as_raw_fd())
            .map_err(|e| ArchiveError::io("syncfs", target, e))
            .err(),
        None => None,
    };
    match err {
        None => Ok(ExtractReport {
            written,
            writers: threads,
            background_syncs,
            ..report
        }),
        Some(e) if written.is_empty() => Err(e),
        Some(e) => Err(ArchiveError::Incomplete {
            target: target.to_path_buf(),
            cause: Box::new(e),
            written,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(b: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_path(name).expect("path");
        h.set_cksum();
        b.append(&h, data).expect("append");
    }

    /// A hard link whose name an earlier file took, on another writer than
    /// its target: the link must win, however the writers' queues run. The
    /// target's writer is handed a full batch right after the link, while
    /// the earlier file still waits in the other writer's unsent batch, so
    /// without the drain the file would land last.
    #[test]
    fn a_hard_link_replacing_a_file_queued_on_another_writer_lands_last() {
        let router = Router::new(2);
        let names: Vec<String> = (0..200).map(|i| format!("n{i}")).collect();
        let home = |n: &String| router.home_of(n.as_bytes());
        let name = &names[0];
        let target = names.iter().find(|t| home(t) != home(name)).expect("apart");
        let mut b = tar::Builder::new(Vec::new());
        append(&mut b, name, tar::EntryType::Regular, b"the file");
        append(&mut b, target, tar::EntryType::Regular, b"the target");
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Link);
        h.set_size(0);
        h.set_mode(0o644);
        b.append_link(&mut h, name, target).expect("link");
        let fillers: Vec<&String> = names
            .iter()
            .filter(|n| home(n) == home(target) && *n != target)
            .collect();
        assert!(fillers.len() >= BATCH, "a full batch behind the link");
        for filler in fillers {
            append(&mut b, filler, tar::EntryType::Regular, b"x");
        }
        let tar = b.into_inner().expect("tar");
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = ExtractOptions {
            threads: 2,
            ..Default::default()
        };
        let report = super::super::extract(&tar[..], dir.path(), &opts).expect("extract");
        assert_eq!(report.writers, 2);
        assert_eq!(report.hardlinks, 1);
        let got = std::fs::read(dir.path().join(name)).expect("read");
        assert_eq!(got, b"the target", "{name} -> {target}");
    }
}
