//! Writing a tar of a directory tree (exports).
//!
//! The walk goes by directory fds: every child is opened with `openat2`
//! (`O_NOFOLLOW`, beneath its parent), so a symlink is stored as a link and
//! never followed, and a directory swapped for a symlink mid-walk is not
//! entered. Paths in the archive are relative to `root`. Include and
//! exclude lists are path prefixes at component boundaries, or end in `*`
//! to name every entry beginning so; an empty include list means
//! everything, and exclude wins. Hard-linked files are
//! stored once and linked after; xattrs are not exported.
//!
//! The tree may change while it is read (a running phone's): an entry gone
//! between its directory's listing and its reading is left out and counted
//! ([`WriteReport::vanished`]); any other failure ends the export.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::path::{bytes_path, sanitize};
use super::{sys, ArchiveError};

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// Bytes of file data (before tar framing).
    pub bytes: u64,
    /// Sockets, fifos and device nodes left out.
    pub skipped: u64,
    /// Entries listed but gone (or no longer a directory) when read, left
    /// out.
    pub vanished: u64,
}

/// A step of the walk on the entry at a relative path, just before it is
/// taken: where a tree that changes while it is read can change under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// `lstat` of a listed entry.
    Stat,
    /// Opening a listed file or directory, or reading a listed link.
    Open,
}

/// Whether `e` says the entry a walk listed is no longer there: gone
/// (`ENOENT`), or, for a directory, replaced by something else (`ENOTDIR`).
fn vanished(e: &io::Error, dir: bool) -> bool {
    match e.raw_os_error() {
        Some(libc::ENOENT) => true,
        Some(libc::ENOTDIR) => dir,
        _ => false,
    }
}

/// An include/exclude path: a prefix at component boundaries, or, ending
/// in `*` (as in the reference's `/data/app/com.xx.xx-*`), every name that
/// begins with what comes before the `*`, and what lies beneath it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    /// Relative, normalised, without the `*`.
    stem: Vec<u8>,
    wild: Wild,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wild {
    /// A plain path.
    No,
    /// `dir/*`: everything beneath `dir`, not `dir` itself.
    Children,
    /// `dir/name*`: names in `dir` beginning with `name`.
    Name,
}

impl Pattern {
    /// Normalises an include/exclude path: a leading `/` is allowed (paths
    /// are relative to `root` either way), `..` is refused.
    fn parse(p: &str) -> Result<Pattern, ArchiveError> {
        let (body, wild) = match p.strip_suffix('*') {
            Some(b) if b.ends_with('/') || b.is_empty() => (b, Wild::Children),
            Some(b) => (b, Wild::Name),
            None => (p, Wild::No),
        };
        let trimmed = body.trim_start_matches('/');
        let stem = sanitize(trimmed.as_bytes())
            .map(|r| r.joined)
            .map_err(|r| ArchiveError::Escape {
                entry: PathBuf::from(p),
                reason: r.reason(),
            })?;
        Ok(Pattern { stem, wild })
    }

    /// Whether `p` is matched (it, or an entry above it, is named).
    fn matches(&self, p: &[u8]) -> bool {
        match self.wild {
            Wild::No => under(p, &self.stem),
            Wild::Children => under(p, &self.stem) && p.len() > self.stem.len(),
            Wild::Name => p.starts_with(&self.stem),
        }
    }

    /// Whether `p` is a directory above what this pattern names.
    fn below(&self, p: &[u8]) -> bool {
        let dir = match self.wild {
            Wild::No | Wild::Children => &self.stem[..],
            Wild::Name => match self.stem.iter().rposition(|b| *b == b'/') {
                Some(at) => &self.stem[..at],
                None => &[],
            },
        };
        // A plain path's own entry is matched, not passed through.
        under(dir, p) && (self.wild != Wild::No || dir.len() > p.len())
    }
}

/// `p` equals `pre` or lies beneath it.
fn under(p: &[u8], pre: &[u8]) -> bool {
    pre.is_empty() || (p.starts_with(pre) && (p.len() == pre.len() || p[pre.len()] == b'/'))
}

struct Walk<'w, W: Write> {
    root: PathBuf,
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
    builder: tar::Builder<&'w mut W>,
    links: HashMap<(u64, u64), Vec<u8>>,
    report: WriteReport,
    /// Called before each [`Step`] (a no-op but in tests).
    before: &'w mut dyn FnMut(Step, &[u8]),
}

enum Want {
    /// Store this entry and everything below it.
    All,
    /// Only an ancestor of an included path: store it and look inside.
    Ancestor,
    No,
}

impl<W: Write> Walk<'_, W> {
    fn want(&self, rel: &[u8], all: bool) -> Want {
        if self.exclude.iter().any(|e| e.matches(rel)) {
            return Want::No;
        }
        if all || self.include.is_empty() || self.include.iter().any(|i| i.matches(rel)) {
            return Want::All;
        }
        if self.include.iter().any(|i| i.below(rel)) {
            return Want::Ancestor;
        }
        Want::No
    }

    fn io(&self, op: &'static str, rel: &[u8], e: io::Error) -> ArchiveError {
        ArchiveError::io(op, self.root.join(bytes_path(rel)), e)
    }

    fn header(st: &libc::stat, kind: tar::EntryType) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(st.st_mode & 0o7777);
        h.set_uid(u64::from(st.st_uid));
        h.set_gid(u64::from(st.st_gid));
        h.set_mtime(st.st_mtime.max(0) as u64);
        h.set_size(0);
        h
    }

    /// Stores the children of directory `dir` (at `rel`), recursively. A
    /// directory removed since it was opened lists as empty.
    fn dir(&mut self, dir: &OwnedFd, rel: &[u8], all: bool) -> Result<(), ArchiveError> {
        let listing = dir
            .try_clone()
            .map_err(|e| self.io("open directory", rel, e))
            .and_then(|fd| {
                nix::dir::Dir::from_fd(fd).map_err(|e| self.io("list directory", rel, e.into()))
            })?;
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut listing = listing;
        for entry in listing.iter() {
            let entry = entry.map_err(|e| self.io("list directory", rel, e.into()))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        drop(listing);
        names.sort();
        for name in names {
            let mut child = Vec::with_capacity(rel.len() + 1 + name.len());
            if !rel.is_empty() {
                child.extend_from_slice(rel);
                child.push(b'/');
            }
            child.extend_from_slice(&name);
            let want = self.want(&child, all);
            if matches!(want, Want::No) {
                continue;
            }
            self.child(dir, &name, &child, matches!(want, Want::All))?;
        }
        Ok(())
    }

    fn child(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        rel: &[u8],
        all: bool,
    ) -> Result<(), ArchiveError> {
        let c = sys::cstr(name).map_err(|e| self.io("open", rel, e))?;
        (self.before)(Step::Stat, rel);
        let st = match sys::lstatat(dir.as_raw_fd(), &c) {
            Ok(st) => st,
            Err(e) if vanished(&e, false) => return self.gone(),
            Err(e) => return Err(self.io("stat", rel, e)),
        };
        let path = bytes_path(rel);
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                (self.before)(Step::Open, rel);
                let fd = match sys::open_dir(dir.as_raw_fd(), &c) {
                    Ok(fd) => fd,
                    Err(e) if vanished(&e, true) => return self.gone(),
                    Err(e) => return Err(self.io("open", rel, e)),
                };
                let st = sys::fstat(fd.as_raw_fd()).map_err(|e| self.io("stat", rel, e))?;
                let mut h = Self::header(&st, tar::EntryType::Directory);
                self.builder
                    .append_data(&mut h, &path, io::empty())
                    .map_err(|e| self.io("write tar entry for", rel, e))?;
                self.report.dirs += 1;
                self.dir(&fd, rel, all)
            }
            libc::S_IFLNK => {
                if !all {
                    return Ok(());
                }
                (self.before)(Step::Open, rel);
                let target = match nix::fcntl::readlinkat(dir, c.as_c_str()) {
                    Ok(t) => t,
                    Err(e) if vanished(&e.into(), false) => return self.gone(),
                    Err(e) => return Err(self.io("read symlink", rel, e.into())),
                };
                let mut h = Self::header(&st, tar::EntryType::Symlink);
                self.builder
                    .append_link(&mut h, &path, Path::new(&target))
                    .map_err(|e| self.io("write tar entry for", rel, e))?;
                self.report.symlinks += 1;
                Ok(())
            }
            libc::S_IFREG => {
                if !all {
                    return Ok(());
                }
                (self.before)(Step::Open, rel);
                // Not blocking: a fifo swapped in since the stat (a running
                // phone's tree) would hold the open until someone writes
                // to it; what is not a regular file is left out below.
                let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
                let fd = match sys::openat2(dir.as_raw_fd(), &c, flags, 0) {
                    Ok(fd) => fd,
                    Err(e) if vanished(&e, false) => return self.gone(),
                    Err(e) => return Err(self.io("open", rel, e)),
                };
                let st = sys::fstat(fd.as_raw_fd()).map_err(|e| self.io("stat", rel, e))?;
                if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                    return Ok(());
                }
                let key = (st.st_dev, st.st_ino);
                if st.st_nlink > 1 {
                    if let Some(first) = self.links.get(&key) {
                        let mut h = Self::header(&st, tar::EntryType::Link);
                        let first = bytes_path(first);
                        self.builder
                            .append_link(&mut h, &path, &first)
                            .map_err(|e| self.io("write tar entry for", rel, e))?;
                        self.report.hardlinks += 1;
                        return Ok(());
                    }
                    self.links.insert(key, rel.to_vec());
                }
                let size = st.st_size.max(0) as u64;
                let mut h = Self::header(&st, tar::EntryType::Regular);
                h.set_size(size);
                // A file that shrinks while read is padded with zeros and
                // one that grows is cut, so the header stays true.
                let data = File::from(fd).chain(io::repeat(0)).take(size);
                self.builder
                    .append_data(&mut h, &path, data)
                    .map_err(|e| self.io("write tar entry for", rel, e))?;
                self.report.files += 1;
                self.report.bytes += size;
                Ok(())
            }
            _ => {
                self.report.skipped += 1;
                Ok(())
            }
        }
    }

    /// Leaves out an entry gone since it was listed, counting it.
    fn gone(&mut self) -> Result<(), ArchiveError> {
        self.report.vanished += 1;
        Ok(())
    }
}

/// Writes a tar of the tree beneath `root` to `writer`: paths relative to
/// `root`, `include`/`exclude` as path prefixes (exclude wins), symlinks
/// stored, never followed, entries gone while read left out.
pub fn write_tar<W: Write>(
    root: &Path,
    include: &[String],
    exclude: &[String],
    writer: W,
) -> Result<WriteReport, ArchiveError> {
    write_tar_stepped(root, include, exclude, writer, &mut |_, _| {})
}

/// [`write_tar`], calling `before` ahead of each step of the walk.
fn write_tar_stepped<W: Write>(
    root: &Path,
    include: &[String],
    exclude: &[String],
    mut writer: W,
    before: &mut dyn FnMut(Step, &[u8]),
) -> Result<WriteReport, ArchiveError> {
    let include = include
        .iter()
        .map(|p| Pattern::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    let exclude = exclude
        .iter()
        .map(|p| Pattern::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    let root_fd: OwnedFd = File::open(root)
        .map_err(|e| ArchiveError::io("open export root", root, e))?
        .into();
    let mut builder = tar::Builder::new(&mut writer);
    builder.follow_symlinks(false);
    let mut walk = Walk {
        root: root.to_path_buf(),
        include,
        exclude,
        builder,
        links: HashMap::new(),
        report: WriteReport::default(),
        before,
    };
    walk.dir(&root_fd, b"", false)?;
    let report = walk.report.clone();
    walk.builder
        .into_inner()
        .map_err(|e| ArchiveError::io("finish tar of", root, e))?
        .flush()
        .map_err(|e| ArchiveError::io("flush tar of", root, e))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::{write_tar_stepped, Step, WriteReport};
    use std::fs;
    use std::path::Path;

    /// Every entry of `tar` (each must parse) and a file's contents.
    fn entries(tar: &[u8]) -> Vec<(String, String)> {
        let mut a = tar::Archive::new(tar);
        let mut out = Vec::new();
        for e in a.entries().expect("entries") {
            let mut e = e.expect("entry");
            let name = e.path().expect("path").to_string_lossy().into_owned();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut e, &mut text).expect("data");
            out.push((name.trim_end_matches('/').to_string(), text));
        }
        out
    }

    fn write_tree(root: &Path) {
        for d in ["a/dir_gone", "a/dir_swapped", "b"] {
            fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        for f in [
            "a/keep.txt",
            "a/gone_at_stat.txt",
            "a/gone_at_open.txt",
            "a/dir_gone/x",
            "b/other.txt",
        ] {
            fs::write(root.join(f), f).expect("write");
        }
        std::os::unix::fs::symlink("keep.txt", root.join("a/link")).expect("symlink");
    }

    /// A tree that loses entries while it is written (a running phone's):
    /// each one gone between its directory's listing and its reading is
    /// left out and counted, whichever step found it gone, and the archive
    /// holds the rest, whole.
    #[test]
    fn entries_gone_while_read_are_left_out_and_counted() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path();
        write_tree(root);
        let mut changes = |step: Step, rel: &[u8]| {
            let p = root.join(std::str::from_utf8(rel).expect("utf-8"));
            match (step, rel) {
                (Step::Stat, b"a/gone_at_stat.txt") | (Step::Open, b"a/gone_at_open.txt") => {
                    fs::remove_file(p).expect("remove file")
                }
                (Step::Open, b"a/link") => fs::remove_file(p).expect("remove link"),
                (Step::Open, b"a/dir_gone") => fs::remove_dir_all(p).expect("remove dir"),
                (Step::Open, b"a/dir_swapped") => {
                    fs::remove_dir(&p).expect("remove dir");
                    fs::write(&p, "now a file").expect("file in its place");
                }
                _ => {}
            }
        };
        let mut out = Vec::new();
        let report =
            write_tar_stepped(root, &[], &[], &mut out, &mut changes).expect("written whole");
        assert_eq!(
            report,
            WriteReport {
                files: 2,
                dirs: 2,
                bytes: ("a/keep.txt".len() + "b/other.txt".len()) as u64,
                vanished: 5,
                ..WriteReport::default()
            }
        );
        let want: Vec<(String, String)> = [
            ("a", ""),
            ("a/keep.txt", "a/keep.txt"),
            ("b", ""),
            ("b/other.txt", "b/other.txt"),
        ]
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
        assert_eq!(entries(&out), want);
    }

    /// A file swapped for a fifo between its stat and its open is left out;
    /// the open does not wait for a writer that never comes.
    #[test]
    fn a_file_swapped_for_a_fifo_is_left_out() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().to_path_buf();
        write_tree(&root);
        let (tx, rx) = std::sync::mpsc::channel();
        let walk_root = root.clone();
        std::thread::spawn(move || {
            let mut changes = |step: Step, rel: &[u8]| {
                if (step, rel) == (Step::Open, b"a/keep.txt".as_slice()) {
                    let p = walk_root.join("a/keep.txt");
                    fs::remove_file(&p).expect("remove file");
                    nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o644))
                        .expect("fifo in its place");
                }
            };
            let mut out = Vec::new();
            let r = write_tar_stepped(&walk_root, &[], &[], &mut out, &mut changes);
            let _ = tx.send(r.map(|_| entries(&out)));
        });
        // Without a writer the open would block for ever: the walk is
        // waited for (generously), not timed.
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the walk ended")
            .expect("written");
        assert!(got.iter().all(|(n, _)| n != "a/keep.txt"), "{got:?}");
        assert!(got.iter().any(|(n, _)| n == "b/other.txt"), "{got:?}");
    }

    /// Only an entry gone is left out: one that changed into what the walk
    /// may not read (a file become a link) still fails the export.
    #[test]
    fn other_failures_while_read_still_fail() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path();
        write_tree(root);
        let mut changes = |step: Step, rel: &[u8]| {
            if (step, rel) == (Step::Open, b"a/keep.txt".as_slice()) {
                let p = root.join("a/keep.txt");
                fs::remove_file(&p).expect("remove file");
                std::os::unix::fs::symlink("/etc/passwd", &p).expect("link in its place");
            }
        };
        let e = write_tar_stepped(root, &[], &[], &mut Vec::new(), &mut changes)
            .expect_err("a link where a file was listed");
        assert!(e.to_string().contains("a/keep.txt"), "{e}");
    }
}
