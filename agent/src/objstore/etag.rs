//! ETags of objects that were put into the embedded store's directory by
//! hand rather than through the S3 protocol.
//!
//! `s3s-fs` keeps an object's ETag (its MD5, as S3 gives for a single PUT)
//! in a file of its own next to the buckets, written when the object is
//! uploaded. When that file is missing it computes the MD5 of the whole
//! object on every GET and HEAD: a 1 GB tar read in 4 MiB ranges hashed
//! 256 GB. [`ensure`] computes it once and stores it where `s3s-fs`
//! reads it, with the file's size and modification time, and computes it
//! again only when those change (the file was replaced by hand). ETags
//! stored by `s3s-fs` itself are left as they are.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use s3s::crypto::{Checksum, Md5};
use serde_json::{Map, Value};

/// The key `s3s-fs` reads an object's ETag from.
const E_TAG: &str = "e_tag";
/// The ETag computed here, and the size and modification time (ns) of the
/// file it was computed from. An `e_tag` that differs from `cph_e_tag` was
/// written by `s3s-fs` since (an upload over the file), which keeps the
/// rest of the file when it completes a multipart upload.
const OURS: &str = "cph_e_tag";
const SIZE: &str = "cph_size";
const MTIME_NS: &str = "cph_mtime_ns";

/// Bytes hashed at once.
const HASH_CHUNK: usize = 1 << 20;

/// Where `s3s-fs` 0.14 keeps an object's internal information (its ETag
/// and checksums): `<root>/.bucket-<bucket>.object-<key>.internal.json`,
/// both names in URL-safe base64 without padding.
pub fn info_path(root: &Path, bucket: &str, key: &str) -> PathBuf {
    let encode = |s: &str| base64_simd::URL_SAFE_NO_PAD.encode_to_string(s);
    root.join(format!(
        ".bucket-{}.object-{}.internal.json",
        encode(bucket),
        encode(key)
    ))
}

/// The object file of `bucket`/`key`, when both name a path beneath
/// `root` (plain components only; anything else is left for `s3s-fs` to
/// refuse).
fn object_path(root: &Path, bucket: &str, key: &str) -> Option<PathBuf> {
    let rel = Path::new(bucket).join(key);
    rel.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| root.join(rel))
}

fn stamp(meta: &fs::Metadata) -> (u64, i128) {
    let mtime = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
    (meta.len(), mtime)
}

/// Makes sure the ETag of `bucket`/`key` is stored for `s3s-fs`. Returns
/// whether it was computed now. An object that does not exist is left to
/// `s3s-fs` to report.
pub fn ensure(root: &Path, bucket: &str, key: &str) -> io::Result<bool> {
    let Some(path) = object_path(root, bucket, key) else {
        return Ok(false);
    };
    let meta = match fs::metadata(&path) {
        Ok(m) if m.is_file() => m,
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let (size, mtime) = stamp(&meta);
    let info_file = info_path(root, bucket, key);
    let mut info: Map<String, Value> = match fs::read(&info_file) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Map::new(),
        Err(e) => return Err(e),
    };
    if let Some(stored) = info.get(E_TAG).and_then(Value::as_str) {
        let current = match info.get(OURS).and_then(Value::as_str) {
            // Stored by `s3s-fs` when the object was uploaded.
            None => true,
            Some(ours) if ours != stored => true,
            Some(_) => {
                info.get(SIZE).and_then(Value::as_u64) == Some(size)
                    && info.get(MTIME_NS).and_then(Value::as_str)
                        == Some(mtime.to_string().as_str())
            }
        };
        if current {
            return Ok(false);
        }
    }
    let e_tag = md5_hex(&path)?;
    // The file may have changed while it was hashed: store nothing then,
    // the next request computes it again.
    if stamp(&fs::metadata(&path)?) != (size, mtime) {
        return Ok(false);
    }
    info.insert(E_TAG.to_string(), Value::String(e_tag.clone()));
    info.insert(OURS.to_string(), Value::String(e_tag));
    info.insert(SIZE.to_string(), Value::from(size));
    info.insert(MTIME_NS.to_string(), Value::String(mtime.to_string()));
    write_atomically(&info_file, &serde_json::to_vec(&info)?)?;
    Ok(true)
}

/// One lock per object whose ETag is being checked: requests in flight for
/// the same new object hash it once, while reads of other objects go on.
#[derive(Default)]
pub struct Locks(Mutex<LockMap>);

/// The lock of each object being checked, by bucket and key.
type LockMap = HashMap<(String, String), Arc<Mutex<()>>>;

impl Locks {
    /// [`ensure`] under the object's lock.
    pub fn ensure(&self, root: &Path, bucket: &str, key: &str) -> io::Result<bool> {
        let id = (bucket.to_string(), key.to_string());
        let lock = self.map().entry(id.clone()).or_default().clone();
        let result = {
            let _one = lock.lock().unwrap_or_else(|p| p.into_inner());
            ensure(root, bucket, key)
        };
        let mut map = self.map();
        // Clones are only taken under the map's lock: two references are
        // the map's and this one, so nobody else waits on it.
        if Arc::strong_count(&lock) == 2 {
            map.remove(&id);
        }
        result
    }

    fn map(&self) -> std::sync::MutexGuard<'_, LockMap> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn md5_hex(path: &Path) -> io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut md5 = Md5::new();
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => md5.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(md5.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `path` through a temporary file renamed over it, so a reader
/// never sees half of it. The temporary file is named as `s3s-fs` names
/// its own, which it removes when it starts.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(
        ".tmp.cph-{}-{name}.internal.part",
        std::process::id()
    ));
    let mut file = fs::File::create(&tmp)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_data());
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(root: &Path, bucket: &str, key: &str) -> Map<String, Value> {
        serde_json::from_slice(&fs::read(info_path(root, bucket, key)).expect("info"))
            .expect("json")
    }

    #[test]
    fn computed_once_and_again_when_the_file_changes() {
        let root = tempfile::tempdir().expect("tempdir");
        let obj = root.path().join("b/dir/k.tar");
        fs::create_dir_all(obj.parent().expect("parent")).expect("mkdir");
        fs::write(&obj, b"hello").expect("write");
        assert!(ensure(root.path(), "b", "dir/k.tar").expect("ensure"));
        // MD5("hello")
        assert_eq!(
            stored(root.path(), "b", "dir/k.tar")[E_TAG],
            "5d41402abc4b2a76b9719d911017c592"
        );
        assert!(!ensure(root.path(), "b", "dir/k.tar").expect("again"));
        fs::write(&obj, b"hello, world").expect("rewrite");
        assert!(ensure(root.path(), "b", "dir/k.tar").expect("changed"));
        assert_eq!(
            stored(root.path(), "b", "dir/k.tar")[E_TAG],
            "e4d7f1b4ed2e42d15898f4b27b019da4"
        );
    }

    #[test]
    fn etags_stored_by_the_store_are_kept() {
        let root = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(root.path().join("b")).expect("mkdir");
        fs::write(root.path().join("b/k"), b"data").expect("write");
        let info = br#"{"e_tag":"abc-2","checksum_crc32":"x"}"#;
        fs::write(info_path(root.path(), "b", "k"), info).expect("info");
        assert!(!ensure(root.path(), "b", "k").expect("ensure"));
        assert_eq!(
            fs::read(info_path(root.path(), "b", "k")).expect("read"),
            info
        );

        // One computed here, then replaced by a multipart upload, which
        // keeps the other keys: the upload's ETag stands.
        fs::write(root.path().join("b/k"), b"uploaded").expect("write");
        let info = br#"{"e_tag":"def-3","cph_e_tag":"0123","cph_size":4,"cph_mtime_ns":"1"}"#;
        fs::write(info_path(root.path(), "b", "k"), info).expect("info");
        assert!(!ensure(root.path(), "b", "k").expect("ensure"));
        assert_eq!(stored(root.path(), "b", "k")[E_TAG], "def-3");
    }

    #[test]
    fn other_keys_are_kept_and_odd_names_left_alone() {
        let root = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(root.path().join("b")).expect("mkdir");
        fs::write(root.path().join("b/k"), b"data").expect("write");
        fs::write(
            info_path(root.path(), "b", "k"),
            br#"{"checksum_crc32":"x"}"#,
        )
        .expect("info");
        assert!(ensure(root.path(), "b", "k").expect("ensure"));
        assert_eq!(stored(root.path(), "b", "k")["checksum_crc32"], "x");
        // Missing objects, directories and paths leaving the root.
        assert!(!ensure(root.path(), "b", "missing").expect("missing"));
        assert!(!ensure(root.path(), "b", "").expect("bucket dir"));
        assert!(!ensure(root.path(), "b", "../../etc/passwd").expect("escape"));
        assert!(!info_path(root.path(), "b", "../../etc/passwd").exists());
    }

    #[test]
    fn concurrent_requests_hash_a_new_object_once() {
        let root = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(root.path().join("b")).expect("mkdir");
        fs::write(root.path().join("b/k"), vec![3u8; 8 << 20]).expect("write");
        let locks = Locks::default();
        let computed: usize = std::thread::scope(|s| {
            let runs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| locks.ensure(root.path(), "b", "k").expect("ensure")))
                .collect();
            runs.into_iter()
                .map(|r| usize::from(r.join().expect("thread")))
                .sum()
        });
        assert_eq!(computed, 1);
        assert!(locks.map().is_empty(), "locks left behind");
    }
}
