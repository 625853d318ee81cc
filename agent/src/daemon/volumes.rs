//! Phone volumes over `cph-runtime`'s storage: images are imported once per
//! `image_id` into the pool, a phone's rootfs is a copy-on-write volume
//! cloned from its image (capped at the flavor's disk size where the backend
//! enforces it), a reset clones it again and a delete drops it. The pool is
//! prepared when the agent opens, which also rediscovers (and remounts) the
//! volumes of an earlier run.
//!
//! Images come from `file://` archives here; other sources (the object
//! store's `obs://`) feed [`Volumes::import_from`] with a reader.

use std::io::Read;
use std::path::{Path, PathBuf};

use cph_runtime::storage::{
    BtrfsConfig, BtrfsStorage, OverlayConfig, OverlayStorage, PoolDevice, SharePaths, ShareUsage,
    Storage, StorageError,
};

use super::JobFailure;
use crate::config::{StorageBackend, StorageConfig};
use crate::protocol::{ImageRef, PoolState};

const GIB: u64 = 1 << 30;

/// The agent's phone volumes.
pub struct Volumes {
    storage: Box<dyn Storage>,
    /// The sharepool cap of the configuration (`storage.share_size_gb`),
    /// which a host holding no server returns to.
    default_share_gb: u64,
}

/// A storage error as a job failure with the reference's code where one
/// fits; every other failure is CPS.0003 with the storage's message.
pub fn storage_fail(e: StorageError) -> JobFailure {
    let code = match &e {
        StorageError::UnknownImage(_) | StorageError::BadImage { .. } => "CPS.0166",
        StorageError::InvalidId { kind, .. } => match *kind {
            "image" => "CPS.0030",
            "phone" => "CPS.0004",
            _ => "CPS.0003",
        },
        StorageError::InsufficientSpace { .. }
        | StorageError::OwnerConflict { .. }
        | StorageError::NotPrepared(_)
        | StorageError::VolumeExists(_)
        | StorageError::UnknownVolume(_)
        | StorageError::BadDevice { .. }
        | StorageError::BadSharePath(_)
        | StorageError::Spawn { .. }
        | StorageError::Command { .. }
        | StorageError::Io { .. }
        | StorageError::Metadata { .. } => "CPS.0003",
        StorageError::Shrink { .. } => "CPS.0001",
    };
    JobFailure::new(code, format!("storage: {e}"))
}

/// The backend the configuration names, not yet prepared.
pub fn backend(cfg: &StorageConfig, state_dir: &Path, owner: &str) -> Box<dyn Storage> {
    match cfg.backend {
        StorageBackend::Overlay => {
            Box::new(OverlayStorage::new(overlay_config(cfg, state_dir, owner)))
        }
        StorageBackend::Btrfs => Box::new(BtrfsStorage::new(btrfs_config(cfg, state_dir, owner))),
    }
}

fn overlay_config(cfg: &StorageConfig, state_dir: &Path, owner: &str) -> OverlayConfig {
    OverlayConfig {
        root: cfg.pool.clone().unwrap_or_else(|| state_dir.join("pool")),
        owner: owner.to_string(),
        max_share_bytes: cfg.share_size_gb.saturating_mul(GIB),
    }
}

/// A block device is used as it is; any other path is a sparse pool file.
fn btrfs_config(cfg: &StorageConfig, state_dir: &Path, owner: &str) -> BtrfsConfig {
    let pool = cfg
        .pool
        .clone()
        .unwrap_or_else(|| state_dir.join("pool.img"));
    let device = if is_block_device(&pool) {
        PoolDevice::Block(pool)
    } else {
        PoolDevice::LoopFile {
            path: pool,
            size_bytes: cfg.pool_size_gb.saturating_mul(GIB),
        }
    };
    BtrfsConfig {
        device,
        mount_point: cfg
            .mount_point
            .clone()
            .unwrap_or_else(|| state_dir.join("pool")),
        owner: owner.to_string(),
        max_share_bytes: cfg.share_size_gb.saturating_mul(GIB),
    }
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

impl Volumes {
    /// Prepares (or rediscovers) the pool of `storage`; `default_share_gb`
    /// is the configured sharepool cap.
    pub fn open(storage: Box<dyn Storage>, default_share_gb: u64) -> Result<Self, JobFailure> {
        storage.prepare().map_err(storage_fail)?;
        Ok(Self {
            storage,
            default_share_gb,
        })
    }

    /// Imports an image from any tar or tar.gz stream, unless the pool
    /// already has it. The hook for images that are not local files.
    pub fn import_from(
        &self,
        image: &ImageRef,
        reader: Box<dyn Read + Send + '_>,
    ) -> Result<(), JobFailure> {
        let outcome = self
            .storage
            .import_image(&image.image_id, reader)
            .map_err(storage_fail)?;
        if outcome.imported {
            tracing::info!(image_id = %image.image_id, bytes = outcome.bytes, "image imported");
        }
        Ok(())
    }

    /// Unmounts the pool (data stays on disk).
    pub fn teardown(&self) -> Result<(), JobFailure> {
        self.storage.teardown().map_err(storage_fail)
    }

    /// Whether the image is imported already.
    pub fn has_image(&self, image_id: &str) -> Result<bool, JobFailure> {
        self.storage.has_image(image_id).map_err(storage_fail)
    }

    /// Deletes an imported image (volumes made from it stay); one not
    /// there is fine.
    pub fn delete_image(&self, image_id: &str) -> Result<(), JobFailure> {
        match self.storage.delete_image(image_id) {
            Ok(()) | Err(StorageError::UnknownImage(_)) => Ok(()),
            Err(e) => Err(storage_fail(e)),
        }
    }

    /// Makes sure the pool holds the image, importing a `file://` archive
    /// the first time.
    pub fn ensure_image(&self, image: &ImageRef) -> Result<(), JobFailure> {
        if self
            .storage
            .has_image(&image.image_id)
            .map_err(storage_fail)?
        {
            return Ok(());
        }
        let path = image_path(image)?;
        let file = std::fs::File::open(&path).map_err(|e| {
            JobFailure::new(
                "CPS.0166",
                format!("image {} at {}: {e}", image.image_id, path.display()),
            )
        })?;
        self.import_from(image, Box::new(std::io::BufReader::new(file)))
    }

    /// A fresh volume of `image` for the phone (an earlier one, left by an
    /// interrupted create, is dropped first); returns its rootfs.
    pub fn create(
        &self,
        phone_id: &str,
        image: &ImageRef,
        disk_gb: u64,
    ) -> Result<PathBuf, JobFailure> {
        self.ensure_image(image)?;
        if self
            .storage
            .volume_path(phone_id)
            .map_err(storage_fail)?
            .is_some()
        {
            tracing::warn!(phone_id, "dropping the volume of an unfinished create");
            self.storage.delete_volume(phone_id).map_err(storage_fail)?;
        }
        self.storage
            .create_volume(phone_id, &image.image_id, disk_gb.saturating_mul(GIB))
            .map_err(storage_fail)
    }

    /// The phone's volume cloned again from `image`, same size cap; a phone
    /// without a volume (its create failed) gets a new one.
    pub fn reset(
        &self,
        phone_id: &str,
        image: &ImageRef,
        disk_gb: u64,
    ) -> Result<PathBuf, JobFailure> {
        self.ensure_image(image)?;
        match self.storage.reset_volume(phone_id, Some(&image.image_id)) {
            Ok(p) => Ok(p),
            Err(StorageError::UnknownVolume(_)) => self.create(phone_id, image, disk_gb),
            Err(e) => Err(storage_fail(e)),
        }
    }

    /// Raises the cap of the phone's volume to `disk_gb` GiB when it is
    /// smaller; a larger cap, or an uncapped volume, stays as it is.
    pub fn raise_to(&self, phone_id: &str, disk_gb: u64) -> Result<(), JobFailure> {
        match self
            .storage
            .grow_volume(phone_id, disk_gb.saturating_mul(GIB))
        {
            Ok(_) | Err(StorageError::Shrink { .. }) => Ok(()),
            Err(e) => Err(storage_fail(e)),
        }
    }

    /// Moves the phone's volume to `image` keeping what the phone holds in
    /// [`KEPT_ON_UPDATE`].
    pub fn upgrade(&self, phone_id: &str, image: &ImageRef) -> Result<PathBuf, JobFailure> {
        self.ensure_image(image)?;
        self.storage
            .upgrade_volume(phone_id, &image.image_id, KEPT_ON_UPDATE)
            .map_err(storage_fail)
    }

    /// Drops the phone's volume (nothing when it has none).
    pub fn delete(&self, phone_id: &str) -> Result<(), JobFailure> {
        self.storage.delete_volume(phone_id).map_err(storage_fail)
    }

    /// Raises the cap of the phone's volume to `disk_gb` GiB; the cap it
    /// had, in bytes.
    pub fn grow(&self, phone_id: &str, disk_gb: u64) -> Result<u64, JobFailure> {
        self.storage
            .grow_volume(phone_id, disk_gb.saturating_mul(GIB))
            .map_err(storage_fail)
    }

    /// The rootfs of the phone's volume; CPS.0005 when it has none.
    pub fn rootfs(&self, phone_id: &str) -> Result<PathBuf, JobFailure> {
        self.storage
            .volume_path(phone_id)
            .map_err(storage_fail)?
            .ok_or_else(|| JobFailure::new("CPS.0005", format!("phone {phone_id} has no volume")))
    }

    /// Phones that have a volume.
    pub fn phones(&self) -> Result<Vec<String>, JobFailure> {
        self.storage.list_volumes().map_err(storage_fail)
    }

    /// The sharepool's host directories.
    pub fn share_paths(&self) -> Result<SharePaths, JobFailure> {
        self.storage.share_paths().map_err(storage_fail)
    }

    /// Returns the sharepool to the configured cap (a server's flavor may
    /// have set another).
    pub fn reset_share_limit(&self) -> Result<(), JobFailure> {
        self.set_share_limit_gb(self.default_share_gb)
    }

    /// Caps the sharepool at `gb` GiB (a flavor's `max_share_disk_size_g`).
    pub fn set_share_limit_gb(&self, gb: u64) -> Result<(), JobFailure> {
        self.storage
            .set_share_limit(gb.saturating_mul(GIB))
            .map_err(storage_fail)
    }

    /// Size, use and availability of the sharepool.
    pub fn share_usage(&self) -> Result<ShareUsage, JobFailure> {
        self.storage.share_usage().map_err(storage_fail)
    }

    /// The thinpool and the sharepool with their space.
    pub fn pools(&self) -> Result<Vec<PoolState>, JobFailure> {
        let pool = self.storage.pool_usage().map_err(storage_fail)?;
        let share = self.storage.share_usage().map_err(storage_fail)?;
        let backend = self.storage.name().to_string();
        Ok(vec![
            PoolState {
                name: "thinpool".into(),
                backend: backend.clone(),
                size_bytes: pool.size,
                used_bytes: pool.used,
                avail_bytes: pool.avail,
            },
            PoolState {
                name: "sharepool".into(),
                backend,
                size_bytes: share.size,
                used_bytes: share.used,
                avail_bytes: share.avail,
            },
        ])
    }
}

/// What an image update keeps of a phone's root: the directories Android
/// keeps its users' apps, settings and files in.
pub const KEPT_ON_UPDATE: &[&str] = &["data", "cache"];

/// The local archive of an image (`file://` URL).
fn image_path(image: &ImageRef) -> Result<PathBuf, JobFailure> {
    if let Some(p) = image.url.strip_prefix("file://") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(JobFailure::new(
                "CPS.0166",
                format!("image {} not found at {}", image.image_id, p.display()),
            ));
        }
        return Ok(p);
    }
    if image.url.starts_with("obs://") {
        return Err(JobFailure::new(
            "CPS.0166",
            format!(
                "image {}: obs:// images are not fetched by this agent yet",
                image.image_id
            ),
        ));
    }
    Err(JobFailure::new(
        "CPS.0166",
        format!(
            "image {} has an unsupported url {}",
            image.image_id, image.url
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_errors_carry_the_image_code() {
        let f = storage_fail(StorageError::UnknownImage("img".into()));
        assert_eq!(f.code, "CPS.0166");
        assert!(f.msg.contains("img"), "{}", f.msg);
        let f = storage_fail(StorageError::UnknownVolume("p1".into()));
        assert_eq!(f.code, "CPS.0003");
        assert!(f.msg.contains("p1"), "{}", f.msg);
        let missing = ImageRef {
            image_id: "img".into(),
            url: "file:///nonexistent/image.tar.gz".into(),
        };
        assert_eq!(
            image_path(&missing).map_err(|e| e.code),
            Err("CPS.0166".to_string())
        );
        let ftp = ImageRef {
            image_id: "img".into(),
            url: "ftp://x/y".into(),
        };
        assert!(image_path(&ftp).is_err());
    }

    #[test]
    fn pool_locations_default_to_the_state_dir() {
        let dir = Path::new("/srv/cph");
        let o = overlay_config(&StorageConfig::default(), dir, "agent-1");
        assert_eq!(o.root, dir.join("pool"));
        assert_eq!(o.owner, "agent-1");
        let b = btrfs_config(
            &StorageConfig {
                backend: StorageBackend::Btrfs,
                pool_size_gb: 4,
                share_size_gb: 1,
                ..StorageConfig::default()
            },
            dir,
            "agent-1",
        );
        assert_eq!(
            b.device,
            PoolDevice::LoopFile {
                path: dir.join("pool.img"),
                size_bytes: 4 << 30
            }
        );
        assert_eq!(b.mount_point, dir.join("pool"));
        assert_eq!(b.max_share_bytes, 1 << 30);
        let dev = btrfs_config(
            &StorageConfig {
                backend: StorageBackend::Btrfs,
                pool: Some("/dev/null".into()),
                ..StorageConfig::default()
            },
            dir,
            "agent-1",
        );
        // /dev/null is a character device, so it is taken as a pool file.
        assert!(matches!(dev.device, PoolDevice::LoopFile { .. }));
    }
}
