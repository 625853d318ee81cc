//! The disk layout of a phone host. A *pool* (btrfs on a block device or a
//! loop-backed sparse file, LVM thin, or plain directories with overlayfs for
//! development) holds read-only *images* unpacked once per `image_id`, and
//! per-phone copy-on-write *volumes* cloned from them in constant time, each
//! capped at the flavor's disk size. The *sharepool* is one directory tree
//! per server (`files/` and `apps/`) bind-mounted into every phone at fixed
//! paths and capped at `max_share_disk_size_g`.
//!
//! Every backend implements [`Storage`]; preparing a pool is idempotent and
//! rediscovers an existing layout after a restart or reboot.

pub mod btrfs;
pub mod cmd;
pub mod lvm;
pub mod overlay;
pub mod share;

use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub use btrfs::{BtrfsConfig, BtrfsStorage, PoolDevice};
pub use overlay::{OverlayConfig, OverlayStorage};

pub use share::{capacity_report, human, list_share_dir, ShareListing, ShareUsage};

/// Path inside every phone where the sharepool's `files/` is mounted.
pub const PHONE_SHARE_FILES_DIR: &str = "/data/media/share/files";
/// Path inside every phone where the sharepool's `apps/` is mounted.
pub const PHONE_SHARE_APPS_DIR: &str = "/data/media/share/apps";
/// The owner marker at the root of a pool: the id of the agent owning it.
pub const OWNER_FILE: &str = ".cph-owner";
/// The sharepool cap a flavor set, in bytes, at the pool's root.
pub const SHARE_LIMIT_FILE: &str = ".cph-share-limit";
/// Longest image or phone id accepted.
pub const MAX_ID_LEN: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid {kind} id {id:?}: {reason}")]
    InvalidId {
        kind: &'static str,
        id: String,
        reason: &'static str,
    },
    #[error(
        "not enough space for the pool at {path}: {wanted} bytes asked, {available} available"
    )]
    InsufficientSpace {
        path: PathBuf,
        wanted: u64,
        available: u64,
    },
    #[error("pool at {path} is owned by agent {owner:?}, not {wanted:?}")]
    OwnerConflict {
        path: PathBuf,
        owner: String,
        wanted: String,
    },
    #[error("pool is not prepared: {0}")]
    NotPrepared(String),
    #[error("unknown image {0}")]
    UnknownImage(String),
    #[error("image {image_id} could not be imported: {source}")]
    BadImage {
        image_id: String,
        #[source]
        source: crate::archive::ArchiveError,
    },
    #[error("phone {0} already has a volume")]
    VolumeExists(String),
    #[error("phone {0} has no volume")]
    UnknownVolume(String),
    #[error("device {path} is not usable: {reason}")]
    BadDevice { path: PathBuf, reason: String },
    #[error("share path {0:?} is not inside the sharepool")]
    BadSharePath(String),
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{command} exited with {status}: {stderr}")]
    Command {
        command: String,
        status: i32,
        stderr: String,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("volume metadata {path}: {detail}")]
    Metadata { path: PathBuf, detail: String },
    #[error(
        "the volume of phone {phone_id} only grows: {requested} bytes asked, its cap is {current} \
         (0: uncapped)"
    )]
    Shrink {
        phone_id: String,
        current: u64,
        requested: u64,
    },
}

impl StorageError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StorageError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Host directories of the sharepool and where they appear in a phone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharePaths {
    /// Host directory of shared files, mounted at [`PHONE_SHARE_FILES_DIR`].
    pub files: PathBuf,
    /// Host directory of shared apps, mounted at [`PHONE_SHARE_APPS_DIR`].
    pub apps: PathBuf,
}

impl SharePaths {
    /// The bind mounts every phone gets: `(host dir, path in the phone)`.
    pub fn mounts(&self) -> Vec<(PathBuf, PathBuf)> {
        vec![
            (self.files.clone(), PathBuf::from(PHONE_SHARE_FILES_DIR)),
            (self.apps.clone(), PathBuf::from(PHONE_SHARE_APPS_DIR)),
        ]
    }
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOutcome {
    pub path: PathBuf,
    /// False when the image already existed and nothing was read.
    pub imported: bool,
    /// Bytes of file data written (0 when already present).
    pub bytes: u64,
}

/// A disk-layout backend. Object-safe: the agent holds a `Box<dyn Storage>`.
pub trait Storage: Send + Sync {
    /// The backend's name (`btrfs`, `overlay`).
    fn name(&self) -> &'static str;
    /// Creates or rediscovers the pool (attach, mount, check the owner).
    /// Idempotent; never reformats an existing pool.
    fn prepare(&self) -> Result<(), StorageError>;
    /// Unpacks a rootfs tar (optionally gzip) into the read-only image
    /// `image_id`, atomically; a no-op when the image exists.
    fn import_image(
        &self,
        image_id: &str,
        reader: Box<dyn Read + Send + '_>,
    ) -> Result<ImportOutcome, StorageError>;
    fn has_image(&self, image_id: &str) -> Result<bool, StorageError>;
    fn list_images(&self) -> Result<Vec<String>, StorageError>;
    /// Deletes an image; volumes cloned from it stay intact.
    fn delete_image(&self, image_id: &str) -> Result<(), StorageError>;
    /// Clones `image_id` into the phone's volume capped at `disk_size_bytes`
    /// (0: uncapped) and returns its rootfs directory.
    fn create_volume(
        &self,
        phone_id: &str,
        image_id: &str,
        disk_size_bytes: u64,
    ) -> Result<PathBuf, StorageError>;
    /// Drops the phone's volume and clones it again, from `image_id` when
    /// given, otherwise from the image it was made from; same size cap.
    fn reset_volume(&self, phone_id: &str, image_id: Option<&str>)
        -> Result<PathBuf, StorageError>;
    /// Moves the phone's volume to `image_id` keeping its top-level
    /// directories `keep` (`data` and `cache` for an image update): they
    /// stay as the phone left them, everything else is the new image's.
    /// Same size cap. On failure the kept directories are untouched (on
    /// btrfs the whole volume is).
    fn upgrade_volume(
        &self,
        phone_id: &str,
        image_id: &str,
        keep: &[&str],
    ) -> Result<PathBuf, StorageError>;
    /// Deletes the phone's volume (no error when it has none).
    fn delete_volume(&self, phone_id: &str) -> Result<(), StorageError>;
    /// Raises the size cap of the phone's volume to `disk_size_bytes`,
    /// kept across resets; returns the cap it had. A cap never shrinks and
    /// an uncapped volume stays so ([`StorageError::Shrink`]).
    fn grow_volume(&self, phone_id: &str, disk_size_bytes: u64) -> Result<u64, StorageError>;
    /// The rootfs directory of a phone's volume, when it has one.
    fn volume_path(&self, phone_id: &str) -> Result<Option<PathBuf>, StorageError>;
    fn list_volumes(&self) -> Result<Vec<String>, StorageError>;
    /// The sharepool's host directories.
    fn share_paths(&self) -> Result<SharePaths, StorageError>;
    /// Size, use and availability of the sharepool.
    fn share_usage(&self) -> Result<ShareUsage, StorageError>;
    /// Size, use and room of the pool the images and phones' volumes are
    /// on (the sharepool included where it shares the filesystem).
    fn pool_usage(&self) -> Result<PoolUsage, StorageError>;
    /// Caps the sharepool at `bytes` (the flavor's `max_share_disk_size_g`;
    /// 0: no cap but the pool's size). The cap is recorded in the pool and
    /// outlives restarts, taking the place of the configured default.
    fn set_share_limit(&self, bytes: u64) -> Result<(), StorageError>;
    /// Unmounts everything and detaches the loop device (data stays).
    fn teardown(&self) -> Result<(), StorageError>;
}

/// Removes the entries of `dir` whose names are not in `keep`.
pub(crate) fn remove_all_but(dir: &Path, keep: &[&str]) -> Result<(), StorageError> {
    let entries = std::fs::read_dir(dir).map_err(|e| StorageError::io("read", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("read", dir, e))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| keep.contains(&n))
        {
            continue;
        }
        let path = entry.path();
        let is_dir = entry
            .file_type()
            .map_err(|e| StorageError::io("stat", &path, e))?
            .is_dir();
        let removed = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| StorageError::io("remove", &path, e))?;
    }
    Ok(())
}

/// Checks an image or phone id: 1 to [`MAX_ID_LEN`] characters of
/// `[A-Za-z0-9._-]`, not starting with a dot.
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), StorageError> {
    let bad = |reason| {
        Err(StorageError::InvalidId {
            kind,
            id: id.to_string(),
            reason,
        })
    };
    if id.is_empty() {
        return bad("empty");
    }
    if id.len() > MAX_ID_LEN {
        return bad("too long");
    }
    if id.starts_with('.') {
        return bad("starts with a dot");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// Per-volume record kept beside the volumes, so a reset knows its origin.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct VolumeMeta {
    pub image_id: String,
    pub disk_size_bytes: u64,
}

impl VolumeMeta {
    /// The record with its cap raised to `bytes`, refused when that would
    /// shrink it.
    pub(crate) fn grown(&self, phone_id: &str, bytes: u64) -> Result<Self, StorageError> {
        if self.disk_size_bytes == 0 || bytes < self.disk_size_bytes {
            return Err(StorageError::Shrink {
                phone_id: phone_id.to_string(),
                current: self.disk_size_bytes,
                requested: bytes,
            });
        }
        Ok(Self {
            disk_size_bytes: bytes,
            ..self.clone()
        })
    }

    /// The record of the phone's volume at `vol`; `UnknownVolume` when
    /// the volume or its record is missing.
    pub(crate) fn of_volume(phone_id: &str, vol: &Path, path: &Path) -> Result<Self, StorageError> {
        if !vol.exists() || !path.exists() {
            return Err(StorageError::UnknownVolume(phone_id.to_string()));
        }
        Self::load(path)
    }

    pub(crate) fn load(path: &Path) -> Result<Self, StorageError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| StorageError::io("read volume metadata", path, e))?;
        serde_json::from_str(&text).map_err(|e| StorageError::Metadata {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
    }

    pub(crate) fn save(&self, path: &Path) -> Result<(), StorageError> {
        let text = serde_json::to_string(self).map_err(|e| StorageError::Metadata {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        write_atomic(path, text.as_bytes())
    }
}

/// Writes a file through a temporary sibling and a rename, both synced: a
/// crash leaves the old file or the new one, never an empty one (the
/// pool's owner marker and a volume's record are read at every start).
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StorageError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| StorageError::io("write", &tmp, e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| StorageError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| StorageError::io("rename", path, e))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StorageError::io("sync", dir, e))?;
    }
    Ok(())
}

/// Makes what `dir` holds readable by all (directories and executables
/// searchable and runnable by all) and writable by its owner alone, as the
/// agent writes a share (`ExtractOptions::public_modes`): a phone with a
/// user namespace of its own reads the sharepool as any user, and a share
/// written before kept the archive's modes. Links are left as they are.
pub(crate) fn make_share_public(dir: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::PermissionsExt;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| StorageError::io("list", &d, e))?;
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                continue;
            }
            let mode = meta.permissions().mode() & 0o7777;
            let public = crate::archive::public_mode(mode, meta.is_dir());
            if public != mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(public))
                    .map_err(|e| StorageError::io("chmod", &path, e))?;
            }
            if meta.is_dir() {
                todo.push(path);
            }
        }
    }
    Ok(())
}

/// Makes a directory of phones' roots or images root's: `0o700`, or
/// `0o711` where a phone with a user namespace of its own (an unprivileged
/// host user) must pass through to its root. A phone writes files there as
/// root (or as its own root, stored as uid 0 through its idmapped mount),
/// setuid ones included, which no other user of the host should run: with
/// `0o700` none can reach them; with `0o711` none can list the phones,
/// only one that knows a phone's id could reach its files.
pub(crate) fn make_private(dir: &Path, mode: u32) -> Result<(), StorageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| StorageError::io("chmod", dir, e))
}

/// The sharepool cap recorded at `root` by [`Storage::set_share_limit`].
pub(crate) fn recorded_share_limit(root: &Path) -> Result<Option<u64>, StorageError> {
    let path = root.join(SHARE_LIMIT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|e| StorageError::Metadata {
                path,
                detail: format!("sharepool limit: {e}"),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::io("read sharepool limit", path, e)),
    }
}

pub(crate) fn record_share_limit(root: &Path, bytes: u64) -> Result<(), StorageError> {
    write_atomic(
        &root.join(SHARE_LIMIT_FILE),
        format!("{bytes}\n").as_bytes(),
    )
}

/// A pool's space in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUsage {
    pub size: u64,
    pub used: u64,
    pub avail: u64,
}

/// The space of the filesystem holding `path`, as `df` reports it (used is
/// what is neither free nor reserved-free).
pub(crate) fn fs_usage(path: &Path) -> Result<PoolUsage, StorageError> {
    let vfs = nix::sys::statvfs::statvfs(path)
        .map_err(|e| StorageError::io("statvfs", path, e.into()))?;
    let frag = vfs.fragment_size() as u64;
    let size = vfs.blocks() as u64 * frag;
    let free = vfs.blocks_free() as u64 * frag;
    Ok(PoolUsage {
        size,
        used: size.saturating_sub(free),
        avail: vfs.blocks_available() as u64 * frag,
    })
}

/// Size, use and room of a sharepool from its use, its cap (0: none) and
/// the filesystem holding it.
pub(crate) fn share_usage_of(
    fs_root: &Path,
    used: u64,
    max: u64,
) -> Result<ShareUsage, StorageError> {
    let fs = fs_usage(fs_root)?;
    let (fs_size, fs_avail) = (fs.size, fs.avail);
    let size = if max > 0 { max.min(fs_size) } else { fs_size };
    Ok(ShareUsage {
        size,
        used,
        avail: size.saturating_sub(used).min(fs_avail),
        max: if max > 0 { max } else { fs_size },
    })
}

/// Checks or writes the owner marker at `root`.
pub(crate) fn claim_owner(root: &Path, owner: &str) -> Result<(), StorageError> {
    let marker = root.join(OWNER_FILE);
    match std::fs::read_to_string(&marker) {
        Ok(text) => {
            let found = text.trim();
            if found != owner {
                return Err(StorageError::OwnerConflict {
                    path: root.to_path_buf(),
                    owner: found.to_string(),
                    wanted: owner.to_string(),
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            write_atomic(&marker, format!("{owner}\n").as_bytes())
        }
        Err(e) => Err(StorageError::io("read owner marker", marker, e)),
    }
}

/// Reads the owner marker at `root`, if any.
pub(crate) fn read_owner(root: &Path) -> Option<String> {
    std::fs::read_to_string(root.join(OWNER_FILE))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The extraction options of images: archive ownership and mtimes, file
/// capabilities kept, device nodes skipped (the runtime makes `/dev`).
pub(crate) fn image_extract_options(staging: bool) -> crate::archive::ExtractOptions {
    let mut opts = crate::archive::ExtractOptions {
        ownership: crate::archive::Ownership::Archive,
        special: crate::archive::SpecialFiles::Skip,
        staging,
        ..Default::default()
    };
    opts.xattr_prefixes.push("security.capability".into());
    opts
}

/// Names of the entries of `dir` that are valid ids, sorted; a missing
/// directory is empty.
pub(crate) fn list_ids(dir: &Path, suffix: Option<&str>) -> Result<Vec<String>, StorageError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StorageError::io("list", dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| StorageError::io("list", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let name = match suffix {
            Some(s) => match name.strip_suffix(s) {
                Some(n) => n.to_string(),
                None => continue,
            },
            None => name,
        };
        if validate_id("entry", &name).is_ok() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Whether `path` is a mount point, from `/proc/self/mountinfo`.
pub(crate) fn is_mount_point(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| unescape_mount(mp) == want)
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("image", "img-1.0_a").is_ok());
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(129)] {
            assert!(validate_id("image", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn owner_marker_is_claimed_once() {
        let d = tempfile::tempdir().unwrap();
        claim_owner(d.path(), "agent-a").unwrap();
        claim_owner(d.path(), "agent-a").unwrap();
        match claim_owner(d.path(), "agent-b") {
            Err(StorageError::OwnerConflict { owner, .. }) => assert_eq!(owner, "agent-a"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn share_mounts_use_fixed_phone_paths() {
        let p = SharePaths {
            files: "/p/share/files".into(),
            apps: "/p/share/apps".into(),
        };
        let m = p.mounts();
        assert_eq!(m[0].1, Path::new(PHONE_SHARE_FILES_DIR));
        assert_eq!(m[1].0, Path::new("/p/share/apps"));
    }
}
