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

    /// Stores the children of directory `dir` (at `rel`), recursively.
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
        let st = lstatat(dir, &c).map_err(|e| self.io("stat", rel, e))?;
        let path = bytes_path(rel);
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let fd = sys::open_dir(dir.as_raw_fd(), &c).map_err(|e| self.io("open", rel, e))?;
                let st = fstat(&fd).map_err(|e| self.io("stat", rel, e))?;
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
                let target = nix::fcntl::readlinkat(dir, c.as_c_str())
                    .map_err(|e| self.io("read symlink", rel, e.into()))?;
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
                let fd = sys::openat2(dir.as_raw_fd(), &c, libc::O_RDONLY | libc::O_NOFOLLOW, 0)
                    .map_err(|e| self.io("open", rel, e))?;
                let st = fstat(&fd).map_err(|e| self.io("stat", rel, e))?;
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
}

fn lstatat(dir: &OwnedFd, name: &std::ffi::CStr) -> io::Result<libc::stat> {
    // SAFETY: all-zero is a valid `stat`, filled by the kernel on success.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a valid C string and `st` a valid out-pointer.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: as in `lstatat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` a valid out-pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Writes a tar of the tree beneath `root` to `writer`: paths relative to
/// `root`, `include`/`exclude` as path prefixes (exclude wins), symlinks
/// stored, never followed.
pub fn write_tar<W: Write>(
    root: &Path,
    include: &[String],
    exclude: &[String],
    mut writer: W,
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
