//! Entry names made safe: a tar entry's path (after GNU long-name and PAX
//! `path` records are applied) becomes a list of plain components relative
//! to the target, or is refused.
//!
//! `.` components and leading `./` are dropped; `..`, an absolute path and a
//! NUL byte are refused, whatever header carried them.

use std::path::PathBuf;

/// Why an entry name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Absolute,
    DotDot,
    Nul,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Absolute => "absolute path",
            Refusal::DotDot => "path contains `..`",
            Refusal::Nul => "path contains a NUL byte",
        }
    }
}

/// A validated relative path: `joined` is the components joined by `/`,
/// `split` the offset of the last component in `joined`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelPath {
    pub joined: Vec<u8>,
    split: usize,
}

impl RelPath {
    /// The parent directory as a relative path (empty for the target itself).
    pub fn parent(&self) -> &[u8] {
        if self.split == 0 {
            &[]
        } else {
            &self.joined[..self.split - 1]
        }
    }

    /// The last component.
    pub fn name(&self) -> &[u8] {
        &self.joined[self.split..]
    }

    pub fn is_root(&self) -> bool {
        self.joined.is_empty()
    }

    pub fn to_path_buf(&self) -> PathBuf {
        bytes_path(&self.joined)
    }
}

pub fn bytes_path(b: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(std::ffi::OsStr::from_bytes(b))
}

/// Validates `raw` (the bytes of an entry name or a hard link target).
pub fn sanitize(raw: &[u8]) -> Result<RelPath, Refusal> {
    if raw.contains(&0) {
        return Err(Refusal::Nul);
    }
    if raw.first() == Some(&b'/') {
        return Err(Refusal::Absolute);
    }
    let mut joined = Vec::with_capacity(raw.len());
    let mut split = 0;
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => continue,
            b".." => return Err(Refusal::DotDot),
            c => {
                if !joined.is_empty() {
                    joined.push(b'/');
                }
                split = joined.len();
                joined.extend_from_slice(c);
            }
        }
    }
    Ok(RelPath { joined, split })
}

/// The ancestors of a relative path, shortest first (`a`, `a/b` for `a/b/c`
/// when given `a/b/c`'s parent `a/b`).
pub fn prefixes(p: &[u8]) -> impl Iterator<Item = &[u8]> {
    p.iter()
        .enumerate()
        .filter(|(_, &b)| b == b'/')
        .map(|(i, _)| &p[..i])
        .chain(std::iter::once(p).filter(|p| !p.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_dotted_names() {
        let p = sanitize(b"./a//b/./c").expect("valid");
        assert_eq!(p.joined, b"a/b/c");
        assert_eq!(p.parent(), b"a/b");
        assert_eq!(p.name(), b"c");
        let top = sanitize(b"file").expect("valid");
        assert_eq!(top.parent(), b"");
        assert_eq!(top.name(), b"file");
        assert!(sanitize(b"./").expect("valid").is_root());
        assert_eq!(sanitize(b"dir/").expect("valid").joined, b"dir");
    }

    #[test]
    fn refusals() {
        assert_eq!(sanitize(b"../x"), Err(Refusal::DotDot));
        assert_eq!(sanitize(b"a/../../x"), Err(Refusal::DotDot));
        assert_eq!(sanitize(b"a/.."), Err(Refusal::DotDot));
        assert_eq!(sanitize(b"/etc/passwd"), Err(Refusal::Absolute));
        assert_eq!(sanitize(b"a\0b"), Err(Refusal::Nul));
        assert!(sanitize(b"a..b/..c").is_ok());
    }

    #[test]
    fn prefixes_shortest_first() {
        let v: Vec<&[u8]> = prefixes(b"a/b/c").collect();
        assert_eq!(v, vec![&b"a"[..], b"a/b", b"a/b/c"]);
        assert_eq!(prefixes(b"").count(), 0);
    }
}
