//! Safe, fast extraction of tar archives (optionally gzip) beneath a target
//! directory, and the writer side used by exports.
//!
//! Extraction never writes outside the target: entry names are validated
//! (`..`, absolute paths and NUL bytes are refused, whatever GNU long-name or
//! PAX record carried them) and every lookup goes through `openat2(2)` with
//! `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` from directory fds that stay
//! open, so a running phone swapping a directory for a symlink cannot steer a
//! write outside. Files are created `O_EXCL` (an existing file is unlinked
//! first, never written through), device nodes and fifos are refused or
//! skipped, setuid/setgid bits are stripped, and xattrs come only from an
//! allow-list. The calling thread parses the stream and a few writer threads
//! create the files (see `extract.rs`); one `syncfs` ends the run when asked.

mod extract;
mod path;
mod route;
pub(crate) mod sys;
mod write;

use std::io;
use std::path::{Path, PathBuf};

pub use write::{write_tar, WriteReport};

/// `mode` readable by all (searchable and runnable by all for a directory
/// or an executable) and writable by its owner alone, as GNU tar's
/// `--mode=a+rX,go-w` ([`ExtractOptions::public_modes`]).
pub fn public_mode(mode: u32, dir: bool) -> u32 {
    let searchable = dir || mode & 0o111 != 0;
    (mode | 0o444 | if searchable { 0o111 } else { 0 }) & !0o022
}

/// Who owns what an archive creates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Ownership {
    /// Owned by the extracting process (no `chown` at all).
    #[default]
    Unchanged,
    /// The uid/gid recorded in the archive.
    Archive,
    /// The archive's uid/gid plus a shift (a phone's user-namespace base).
    Shift { uid: u32, gid: u32 },
    /// Everything owned by one uid/gid.
    Fixed { uid: u32, gid: u32 },
}

impl Ownership {
    fn map(self, uid: u64, gid: u64) -> Option<(u32, u32)> {
        let (u, g) = (uid as u32, gid as u32);
        match self {
            Ownership::Unchanged => None,
            Ownership::Archive => Some((u, g)),
            Ownership::Shift { uid, gid } => Some((u.wrapping_add(uid), g.wrapping_add(gid))),
            Ownership::Fixed { uid, gid } => Some((uid, gid)),
        }
    }
}

/// What to do with device nodes and fifos found in an archive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SpecialFiles {
    /// Fail the extraction naming the entry.
    #[default]
    Refuse,
    /// Skip them and list them in [`ExtractReport::skipped`].
    Skip,
}

/// The xattr names allowed by default: `user.*` only. `security.capability`
/// (file capabilities) can be added by callers importing system images; the
/// rest of `security.*` and all of `trusted.*`/`system.*` stay out.
pub const DEFAULT_XATTR_PREFIXES: &[&str] = &["user."];

/// How an archive is extracted.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Refuse the archive once this many bytes of file data would be written.
    pub max_bytes: Option<u64>,
    /// Call `syncfs` on the target once at the end.
    pub sync: bool,
    /// Ownership of created files, directories and links.
    pub ownership: Ownership,
    /// Set modification times from the archive (as GNU tar does).
    pub preserve_mtime: bool,
    /// Every entry readable by all (directories and executables searchable
    /// and runnable by all) and writable by its owner alone, as GNU tar's
    /// `--mode=a+rX,go-w`: for a share every phone reads and none writes.
    pub public_modes: bool,
    /// Device nodes and fifos: refuse (default) or skip.
    pub special: SpecialFiles,
    /// xattr name prefixes (from PAX `SCHILY.xattr.*` records) that are set;
    /// others are dropped and counted in [`ExtractReport::xattrs_dropped`].
    pub xattr_prefixes: Vec<String>,
    /// Extract into a fresh sibling directory and rename it onto `target`
    /// (which must not exist) only when everything succeeded: a failure
    /// leaves `target` absent.
    pub staging: bool,
    /// Writer threads (0 picks from the available cores, one on btrfs; at
    /// most 8).
    pub threads: usize,
    /// A file (made anew) to which every path is appended before it is
    /// created or replaced, a batch of entries at a time: if the process
    /// dies mid-run, [`read_journal`] lists what it may have written (a
    /// superset by at most the batches in flight). Not synced: it outlives
    /// the process, not a host crash. The caller removes it.
    pub journal: Option<PathBuf>,
    /// Bytes of small files held back and created directory by directory
    /// rather than in archive order; `None` picks: [`GROUP_WINDOW`] on
    /// btrfs with one writer, none elsewhere (see there).
    pub group_window: Option<usize>,
}

/// What [`ExtractOptions::group_window`] picks on btrfs. Creating a file
/// inserts its directory's entries into the subvolume's tree under the
/// tree's root lock; entries of one directory land in one leaf, so files
/// created directory by directory touch a few leaves where an archive that
/// visits its directories in turn touches one per file. 100,000 small
/// files over 1,000 directories in turn, each run on a fresh pool (medians
/// of 3-5): GNU tar 15.3-16.1 s, ours 15.5 s in archive order, 13.5 s
/// holding 8 MiB (35 MiB resident at the peak against 25), 12.5 s holding
/// 16 MiB. The tar bench (fastest samples, pool reused): the mix 0.87 of
/// GNU tar's time before, 0.80 with 8 MiB; 16 MiB took a streamed run to
/// 70 MiB resident, past the extractor's 64. Not elsewhere: on ext4,
/// several writers creating in one directory wait on its lock in turn.
///
/// What holds the tree's locks meanwhile is btrfs's own work (100,000 small
/// files on a fresh pool, the writer's waits recorded: about 11,000 on
/// those locks while creating files, on its CPU 60% of the run): every
/// dirty file keeps metadata space reserved until it is written back, so
/// the filesystem's preemptive reclaim starts writeback during the run,
/// and its workers then insert the written extents and the delayed inode
/// updates into the same tree. GNU tar's run meets the same, which is why
/// the two are closer on small files here (0.79-0.89 of GNU tar's time in
/// the bench) than on ext4 (0.56-0.72).
pub const GROUP_WINDOW: usize = 8 << 20;

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            max_bytes: None,
            sync: false,
            ownership: Ownership::Unchanged,
            preserve_mtime: true,
            public_modes: false,
            special: SpecialFiles::Refuse,
            xattr_prefixes: DEFAULT_XATTR_PREFIXES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            staging: false,
            threads: 0,
            journal: None,
            group_window: None,
        }
    }
}

/// An entry that was not extracted, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub kind: &'static str,
}

/// Relative paths (beneath the target) an extraction created or replaced,
/// stored compactly (one buffer) so a million entries stay small.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WrittenPaths {
    buf: Vec<u8>,
    count: usize,
}

impl WrittenPaths {
    fn push(&mut self, rel: &[u8]) {
        self.buf.extend_from_slice(rel);
        self.buf.push(0);
        self.count += 1;
    }

    fn append(&mut self, other: WrittenPaths) {
        self.buf.extend_from_slice(&other.buf);
        self.count += other.count;
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The paths, relative to the target.
    pub fn iter(&self) -> impl Iterator<Item = PathBuf> + '_ {
        self.buf
            .split(|&b| b == 0)
            .take(self.count)
            .map(path::bytes_path)
    }
}

/// The paths an extraction's [`ExtractOptions::journal`] holds: those it
/// may have created or replaced, relative to its target, each once.
pub fn read_journal(path: &Path) -> io::Result<WrittenPaths> {
    let mut bytes = std::fs::read(path)?;
    // A record cut off by a kill mid-write was not acted on yet.
    let whole = bytes.iter().rposition(|&b| b == 0).map_or(0, |i| i + 1);
    bytes.truncate(whole);
    let mut seen = std::collections::HashSet::new();
    let mut out = WrittenPaths::default();
    for rel in bytes.split(|&b| b == 0).filter(|r| !r.is_empty()) {
        if seen.insert(rel) {
            out.push(rel);
        }
    }
    Ok(out)
}

/// What an extraction wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtractReport {
    /// Regular files created.
    pub files: u64,
    /// Directories created (existing ones are not counted nor touched).
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// Bytes of file data written.
    pub bytes: u64,
    /// Entries skipped (device nodes and fifos under [`SpecialFiles::Skip`]).
    pub skipped: Vec<Skipped>,
    /// xattrs present in the archive but outside the allow-list.
    pub xattrs_dropped: u64,
    /// Everything created or replaced, relative to the target (empty when
    /// staging, where the whole target is new).
    pub written: WrittenPaths,
    /// Writer threads the run used (one on btrfs unless asked otherwise).
    pub writers: usize,
    /// Filesystem syncs made in the background while the run went on (a
    /// run ending with a sync, but on btrfs), besides the final one.
    pub background_syncs: u64,
    /// Regular files held back and created directory by directory
    /// ([`ExtractOptions::group_window`]).
    pub grouped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("input is not a tar archive: {detail}")]
    NotATar { detail: String },
    #[error("corrupt tar archive after {entries} entries: {detail}")]
    Corrupt { entries: u64, detail: String },
    #[error("tar archive is truncated after {entries} entries")]
    Truncated { entries: u64 },
    #[error("reading the archive: {0}")]
    Read(#[source] io::Error),
    #[error("entry {entry} escapes the target: {reason}")]
    Escape {
        entry: PathBuf,
        reason: &'static str,
    },
    #[error("archive exceeds the limit of {limit} bytes at entry {entry}")]
    TooLarge { entry: PathBuf, limit: u64 },
    #[error("entry {entry} is a {kind}, which an archive may not create")]
    Refused { entry: PathBuf, kind: &'static str },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("staging target {0} already exists")]
    TargetExists(PathBuf),
    #[error("writer thread for {0} panicked")]
    WriterPanic(PathBuf),
    #[error("extraction into {target} failed after writing {} paths: {cause}", written.len())]
    Incomplete {
        target: PathBuf,
        cause: Box<ArchiveError>,
        /// Exactly what was created or replaced before the failure.
        written: WrittenPaths,
    },
}

impl ArchiveError {
    /// The underlying failure, looking through [`ArchiveError::Incomplete`].
    pub fn root_cause(&self) -> &ArchiveError {
        match self {
            ArchiveError::Incomplete { cause, .. } => cause.root_cause(),
            e => e,
        }
    }

    /// Paths written before the failure (empty when nothing was or when a
    /// staging directory was removed).
    pub fn written(&self) -> Option<&WrittenPaths> {
        match self {
            ArchiveError::Incomplete { written, .. } => Some(written),
            _ => None,
        }
    }

    /// The input is not a usable tar (garbage, corrupt or truncated): the
    /// caller's "not a tar" error rather than a host failure.
    pub fn is_bad_archive(&self) -> bool {
        matches!(
            self.root_cause(),
            ArchiveError::NotATar { .. }
                | ArchiveError::Corrupt { .. }
                | ArchiveError::Truncated { .. }
        )
    }

    fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        ArchiveError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// A reader that can hand over its next bytes without copying them. An
/// object being downloaded holds what it received in shared buffers;
/// [`extract_lent`] writes a large file's data straight from them instead
/// of copying each byte once more on its way to the file.
pub trait Lend: io::Read {
    /// Up to `max` (at least 1) of the next bytes, consumed from the stream
    /// as by `read`; empty only at the end of the stream.
    fn lend(&mut self, max: usize) -> io::Result<bytes::Bytes>;
}

impl<L: Lend + ?Sized> Lend for &mut L {
    fn lend(&mut self, max: usize) -> io::Result<bytes::Bytes> {
        (**self).lend(max)
    }
}

/// Extracts a tar stream (gzip detected from its magic bytes) beneath `target`.
///
/// Without staging, `target` must be an existing directory; on failure the
/// error is [`ArchiveError::Incomplete`] listing what was written, or the
/// bare cause when nothing was. With staging, `target` must not exist and is
/// absent after a failure.
pub fn extract<R: io::Read>(
    reader: R,
    target: &Path,
    opts: &ExtractOptions,
) -> Result<ExtractReport, ArchiveError> {
    extract_input(extract::Copied(reader), target, opts)
}

/// As [`extract`], the data of large files written from the buffers
/// `reader` lends rather than copied out of them (a gzip stream is read and
/// copied as by [`extract`]).
pub fn extract_lent<L: Lend>(
    reader: L,
    target: &Path,
    opts: &ExtractOptions,
) -> Result<ExtractReport, ArchiveError> {
    extract_input(extract::Lending(reader), target, opts)
}

fn extract_input<I: extract::Input>(
    reader: I,
    target: &Path,
    opts: &ExtractOptions,
) -> Result<ExtractReport, ArchiveError> {
    if !opts.staging {
        return extract::run(reader, target, opts, true);
    }
    if target.symlink_metadata().is_ok() {
        return Err(ArchiveError::TargetExists(target.to_path_buf()));
    }
    let staging = staging_path(target);
    std::fs::create_dir(&staging)
        .map_err(|e| ArchiveError::io("create staging directory", &staging, e))?;
    let result = extract::run(
        reader,
        &staging,
        &ExtractOptions {
            sync: false,
            ..opts.clone()
        },
        false,
    )
    .and_then(|report| {
        let from = sys::cstr(path_bytes(&staging))
            .map_err(|e| ArchiveError::io("rename staging directory", &staging, e))?;
        let to = sys::cstr(path_bytes(target))
            .map_err(|e| ArchiveError::io("rename staging directory", target, e))?;
        sys::rename_noreplace(&from, &to).map_err(|e| {
            if e.raw_os_error() == Some(libc::EEXIST) || e.raw_os_error() == Some(libc::ENOTEMPTY) {
                ArchiveError::TargetExists(target.to_path_buf())
            } else {
                ArchiveError::io("rename staging directory onto", target, e)
            }
        })?;
        Ok(report)
    });
    match result {
        Ok(report) => {
            if opts.sync {
                extract::sync_dir(target)?;
            }
            Ok(report)
        }
        Err(e) => {
            if let Err(rm) = std::fs::remove_dir_all(&staging) {
                tracing::warn!(path = %staging.display(), error = %rm, "removing staging directory");
            }
            Err(match e {
                ArchiveError::Incomplete { cause, .. } => *cause,
                e => e,
            })
        }
    }
}

fn path_bytes(p: &Path) -> &[u8] {
    use std::os::unix::ffi::OsStrExt;
    p.as_os_str().as_bytes()
}

fn staging_path(target: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "target".into());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!(".{name}.staging-{}-{n}", std::process::id()))
}
