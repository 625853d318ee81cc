//! Which writer thread an entry goes to.
//!
//! Entries naming one path must land in archive order, and a hard link
//! after its target; different paths are written at once. Each path has a
//! home writer, a hash of the path. A hard link goes to its target's
//! writer, which moves its own name there: later entries of that name
//! follow it. A hard link whose name may still be queued on another writer
//! (an earlier entry of the same name) waits for every writer to drain
//! first, or the earlier entry could land after it; so does a directory
//! entry (made by the parser itself) whose path may be queued. Which paths
//! may be queued is kept as a Bloom filter of every path routed.

use std::collections::HashMap;

/// Bits of the filter of paths seen: 1 MiB, a few percent of false
/// positives at a million paths (a false positive only costs a drain).
const SEEN_BITS: usize = 1 << 23;

pub(super) struct Router {
    writers: usize,
    /// Paths whose latest entry went to a writer other than their home.
    moved: HashMap<Vec<u8>, usize>,
    /// Every path routed so far, as a two-hash Bloom filter (allocated at
    /// the first path).
    seen: Vec<u64>,
}

/// Where a hard link goes.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct LinkRoute {
    pub writer: usize,
    /// An entry of the link's own name may be queued on another writer:
    /// drain them all before queueing the link.
    pub drain_first: bool,
}

impl Router {
    pub(super) fn new(writers: usize) -> Self {
        Router {
            writers: writers.max(1),
            moved: HashMap::new(),
            seen: Vec::new(),
        }
    }

    /// The writer of a regular file or symlink at `rel`.
    pub(super) fn file(&mut self, rel: &[u8]) -> usize {
        let h = hash(rel);
        self.mark_seen(h);
        match self.moved.get(rel) {
            Some(&w) => w,
            None => self.home(h),
        }
    }

    /// The writer of a hard link at `rel` to `target`: the one its target's
    /// latest entry went to.
    pub(super) fn link(&mut self, rel: &[u8], target: &[u8]) -> LinkRoute {
        let writer = match self.moved.get(target) {
            Some(&w) => w,
            None => self.home(hash(target)),
        };
        let h = hash(rel);
        let home = self.home(h);
        let before = match self.moved.get(rel) {
            Some(&w) => Some(w),
            None => self.maybe_seen(h).then_some(home),
        };
        if writer == home {
            self.moved.remove(rel);
        } else {
            self.moved.insert(rel.to_vec(), writer);
        }
        self.mark_seen(h);
        LinkRoute {
            writer,
            drain_first: before.is_some_and(|w| w != writer),
        }
    }

    /// Whether an entry of `rel` may still be queued on a writer (one of
    /// the paths routed so far, or a false positive of the filter).
    pub(super) fn may_be_queued(&self, rel: &[u8]) -> bool {
        self.maybe_seen(hash(rel))
    }

    /// The writer entries of `rel` go to when no hard link moved them.
    #[cfg(test)]
    pub(super) fn home_of(&self, rel: &[u8]) -> usize {
        self.home(hash(rel))
    }

    fn home(&self, h: u64) -> usize {
        (h >> 7) as usize % self.writers
    }

    fn bits(h: u64) -> [usize; 2] {
        let mask = SEEN_BITS as u64 - 1;
        [(h & mask) as usize, ((h >> 32) & mask) as usize]
    }

    fn maybe_seen(&self, h: u64) -> bool {
        !self.seen.is_empty()
            && Self::bits(h)
                .iter()
                .all(|&b| self.seen[b / 64] & (1 << (b % 64)) != 0)
    }

    fn mark_seen(&mut self, h: u64) {
        if self.seen.is_empty() {
            self.seen = vec![0; SEEN_BITS / 64];
        }
        for b in Self::bits(h) {
            self.seen[b / 64] |= 1 << (b % 64);
        }
    }
}

/// FNV-1a: cheap, and spreads sibling names.
fn hash(rel: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in rel {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first of `names` and one on another writer.
    fn apart(r: &Router, names: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
        let a = &names[0];
        let b = names
            .iter()
            .find(|b| r.home_of(b) != r.home_of(a))
            .expect("two homes");
        (a.clone(), b.clone())
    }

    fn names(prefix: &str) -> Vec<Vec<u8>> {
        (0..64)
            .map(|i| format!("{prefix}{i}").into_bytes())
            .collect()
    }

    #[test]
    fn paths_keep_their_writer_by_hash() {
        let mut r = Router::new(4);
        let first: Vec<usize> = (0..100)
            .map(|i| r.file(format!("d/f{i}").as_bytes()))
            .collect();
        assert!(first.iter().all(|&w| w < 4));
        assert!((0..4).all(|w| first.contains(&w)), "{first:?}");
        let again: Vec<usize> = (0..100)
            .map(|i| r.file(format!("d/f{i}").as_bytes()))
            .collect();
        assert_eq!(first, again);
    }

    #[test]
    fn a_link_follows_its_target_and_drains_when_its_name_is_queued_elsewhere() {
        let mut r = Router::new(2);
        let (a, t) = apart(&r, &names("f"));
        let wt = r.file(&t);
        // A name not seen before: no drain, and its later entries follow
        // the link.
        let (fresh, _) = apart(&r, &names("fresh"));
        let fresh_route = r.link(&fresh, &t);
        assert_eq!(
            fresh_route,
            LinkRoute {
                writer: wt,
                drain_first: false
            }
        );
        assert_eq!(r.file(&fresh), wt);
        // A name already queued on the other writer: drain first.
        let wa = r.file(&a);
        assert_ne!(wa, wt);
        assert_eq!(
            r.link(&a, &t),
            LinkRoute {
                writer: wt,
                drain_first: true
            }
        );
        // The name now follows the link; a second link the same way needs
        // no drain, and a link back to a target at its home moves it home
        // after a drain.
        assert_eq!(r.file(&a), wt);
        assert!(!r.link(&a, &t).drain_first);
        let home_target = names("h")
            .into_iter()
            .find(|h| r.home_of(h) == wa)
            .expect("a target at a's home");
        r.file(&home_target);
        assert_eq!(
            r.link(&a, &home_target),
            LinkRoute {
                writer: wa,
                drain_first: true
            }
        );
        assert_eq!(r.file(&a), wa);
    }

    #[test]
    fn a_link_at_home_to_a_target_at_home_never_drains() {
        let mut r = Router::new(3);
        let a = b"x".to_vec();
        let t = names("t")
            .into_iter()
            .find(|t| r.home_of(t) == r.home_of(&a))
            .expect("a name on the same writer");
        r.file(&a);
        r.file(&t);
        assert_eq!(
            r.link(&a, &t),
            LinkRoute {
                writer: r.home_of(&a),
                drain_first: false
            }
        );
    }

    #[test]
    fn one_writer_takes_everything_and_knows_what_it_queued() {
        let mut r = Router::new(1);
        assert!(!r.may_be_queued(b"a"));
        assert_eq!(r.file(b"a"), 0);
        assert!(r.may_be_queued(b"a"));
        assert_eq!(
            r.link(b"a", b"b"),
            LinkRoute {
                writer: 0,
                drain_first: false
            }
        );
        assert!(!r.may_be_queued(b"c"));
    }
}
