//! Development backend, chosen explicitly: images are plain directories,
//! a phone's rootfs is an overlayfs mount with the image as its read-only
//! lower layer and a per-phone upper and work directory. Creation is
//! constant time; there is no size limit (the flavor's disk size is not
//! enforced), so production hosts use btrfs or LVM thin.
//!
//! Layout under the root: `.cph-owner`, `images/<id>`,
//! `volumes/<phone>/{upper,work,rootfs}`, `meta/<phone>.json`,
//! `share/{files,apps}`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::cmd::{self, Mount, Runner, SystemRunner};
use super::{
    fs_usage, image_extract_options, is_mount_point, list_ids, read_owner, record_share_limit,
    recorded_share_limit, share_usage_of, validate_id, ImportOutcome, PoolUsage, SharePaths,
    ShareUsage, Storage, StorageError, VolumeMeta,
};

/// Where the development layout lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayConfig {
    pub root: PathBuf,
    pub owner: String,
    /// Reported as the sharepool's size; not enforced.
    pub max_share_bytes: u64,
}

pub struct OverlayStorage {
    cfg: OverlayConfig,
    runner: Box<dyn Runner>,
    lock: Mutex<()>,
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl OverlayStorage {
    pub fn new(cfg: OverlayConfig) -> Self {
        Self {
            cfg,
            runner: Box::new(SystemRunner),
            lock: Mutex::new(()),
        }
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dir(&self, sub: &str) -> PathBuf {
        self.cfg.root.join(sub)
    }

    fn vol(&self, phone: &str) -> PathBuf {
        self.dir("volumes").join(phone)
    }

    fn meta_file(&self, phone: &str) -> PathBuf {
        self.dir("meta").join(format!("{phone}.json"))
    }

    fn check_prepared(&self) -> Result<(), StorageError> {
        if read_owner(&self.cfg.root).as_deref() != Some(self.cfg.owner.as_str()) {
            return Err(StorageError::NotPrepared(format!(
                "{} is not prepared by {}",
                self.cfg.root.display(),
                self.cfg.owner
            )));
        }
        Ok(())
    }

    fn overlay_mount(&self, image_id: &str, vol: &Path) -> Mount {
        Mount {
            fstype: Some("overlay"),
            options: vec![
                format!("lowerdir={}", s(&self.dir("images").join(image_id))),
                format!("upperdir={}", s(&vol.join("upper"))),
                format!("workdir={}", s(&vol.join("work"))),
            ],
            source: "overlay".into(),
            target: s(&vol.join("rootfs")),
        }
    }

    /// Makes upper/work/rootfs and mounts the overlay.
    fn assemble(&self, image_id: &str, vol: &Path) -> Result<(), StorageError> {
        for d in ["upper", "work", "rootfs"] {
            let p = vol.join(d);
            std::fs::create_dir_all(&p).map_err(|e| StorageError::io("create", &p, e))?;
        }
        self.runner
            .run(&self.overlay_mount(image_id, vol).render())
            .map(|_| ())
    }

    fn unmount(&self, vol: &Path) -> Result<(), StorageError> {
        let rootfs = vol.join("rootfs");
        if is_mount_point(&rootfs) {
            self.runner.run(&cmd::umount(&s(&rootfs)))?;
        }
        Ok(())
    }
}

/// Copies every entry of `dir` (in a mounted overlay) and below it up to
/// the upper layer, by setting each one's owner to what it is. Nothing
/// when `dir` does not exist.
fn copy_up_tree(dir: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StorageError::io("stat", dir, e)),
    };
    std::os::unix::fs::lchown(dir, Some(meta.uid()), Some(meta.gid()))
        .map_err(|e| StorageError::io("copy up", dir, e))?;
    if !meta.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).map_err(|e| StorageError::io("read", dir, e))? {
        let entry = entry.map_err(|e| StorageError::io("read", dir, e))?;
        copy_up_tree(&entry.path())?;
    }
    Ok(())
}

/// Marks an upper-layer directory opaque: overlayfs then shows nothing of
/// the lower layer beneath it.
fn set_opaque(dir: &Path) -> Result<(), StorageError> {
    use std::os::fd::AsRawFd;
    let opaque = std::fs::File::open(dir).and_then(|d| {
        crate::archive::sys::fsetxattr(d.as_raw_fd(), c"trusted.overlay.opaque", b"y")
    });
    opaque.map_err(|e| StorageError::io("mark opaque", dir, e))
}

impl Storage for OverlayStorage {
    fn name(&self) -> &'static str {
        "overlay"
    }

    fn prepare(&self) -> Result<(), StorageError> {
        let _g = self.guard();
        let root = &self.cfg.root;
        if let Some(owner) = read_owner(root) {
            if owner != self.cfg.owner {
                return Err(StorageError::OwnerConflict {
                    path: root.clone(),
                    owner,
                    wanted: self.cfg.owner.clone(),
                });
            }
        }
        for d in ["images", "volumes", "meta", "share/files", "share/apps"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(|e| StorageError::io("create", &p, e))?;
        }
        for d in ["images", "volumes"] {
            // Phones on overlay run as host root (no user namespace).
            super::make_private(&root.join(d), 0o700)?;
        }
        for d in ["share/files", "share/apps"] {
            super::make_share_public(&root.join(d))?;
        }
        super::claim_owner(root, &self.cfg.owner)?;
        // After a reboot the overlays are gone: mount them again.
        for phone in list_ids(&self.dir("volumes"), None)? {
            let vol = self.vol(&phone);
            if is_mount_point(&vol.join("rootfs")) {
                continue;
            }
            let meta = VolumeMeta::load(&self.meta_file(&phone))?;
            self.assemble(&meta.image_id, &vol)?;
        }
        Ok(())
    }

    fn import_image(
        &self,
        image_id: &str,
        reader: Box<dyn Read + Send + '_>,
    ) -> Result<ImportOutcome, StorageError> {
        validate_id("image", image_id)?;
        self.check_prepared()?;
        let _g = self.guard();
        let dest = self.dir("images").join(image_id);
        if dest.exists() {
            return Ok(ImportOutcome {
                path: dest,
                imported: false,
                bytes: 0,
            });
        }
        let report =
            crate::archive::extract(reader, &dest, &image_extract_options(true)).map_err(|e| {
                StorageError::BadImage {
                    image_id: image_id.to_string(),
                    source: e,
                }
            })?;
        Ok(ImportOutcome {
            path: dest,
            imported: true,
            bytes: report.bytes,
        })
    }

    fn has_image(&self, image_id: &str) -> Result<bool, StorageError> {
        validate_id("image", image_id)?;
        Ok(self.dir("images").join(image_id).is_dir())
    }

    fn list_images(&self) -> Result<Vec<String>, StorageError> {
        list_ids(&self.dir("images"), None)
    }

    fn delete_image(&self, image_id: &str) -> Result<(), StorageError> {
        validate_id("image", image_id)?;
        let _g = self.guard();
        let dir = self.dir("images").join(image_id);
        if !dir.exists() {
            return Err(StorageError::UnknownImage(image_id.to_string()));
        }
        std::fs::remove_dir_all(&dir).map_err(|e| StorageError::io("remove", dir, e))
    }

    fn create_volume(
        &self,
        phone_id: &str,
        image_id: &str,
        disk_size_bytes: u64,
    ) -> Result<PathBuf, StorageError> {
        validate_id("phone", phone_id)?;
        validate_id("image", image_id)?;
        self.check_prepared()?;
        let _g = self.guard();
        if !self.dir("images").join(image_id).is_dir() {
            return Err(StorageError::UnknownImage(image_id.to_string()));
        }
        let vol = self.vol(phone_id);
        if vol.exists() {
            return Err(StorageError::VolumeExists(phone_id.to_string()));
        }
        let made = self.assemble(image_id, &vol).and_then(|_| {
            VolumeMeta {
                image_id: image_id.to_string(),
                disk_size_bytes,
            }
            .save(&self.meta_file(phone_id))
        });
        if let Err(e) = made {
            let _ = self.unmount(&vol);
            let _ = std::fs::remove_dir_all(&vol);
            return Err(e);
        }
        Ok(vol.join("rootfs"))
    }

    fn reset_volume(
        &self,
        phone_id: &str,
        image_id: Option<&str>,
    ) -> Result<PathBuf, StorageError> {
        validate_id("phone", phone_id)?;
        let _g = self.guard();
        let vol = self.vol(phone_id);
        let meta_path = self.meta_file(phone_id);
        let mut meta = VolumeMeta::of_volume(phone_id, &vol, &meta_path)?;
        let image = image_id.unwrap_or(&meta.image_id).to_string();
        validate_id("image", &image)?;
        if !self.dir("images").join(&image).is_dir() {
            return Err(StorageError::UnknownImage(image));
        }
        self.unmount(&vol)?;
        for d in ["upper", "work"] {
            let p = vol.join(d);
            std::fs::remove_dir_all(&p).map_err(|e| StorageError::io("remove", &p, e))?;
        }
        self.assemble(&image, &vol)?;
        meta.image_id = image;
        meta.save(&meta_path)?;
        Ok(vol.join("rootfs"))
    }

    /// The upper layer keeps only the kept directories (with what the
    /// phone wrote and deleted there); the new image is the lower layer.
    fn upgrade_volume(
        &self,
        phone_id: &str,
        image_id: &str,
        keep: &[&str],
    ) -> Result<PathBuf, StorageError> {
        validate_id("phone", phone_id)?;
        validate_id("image", image_id)?;
        let _g = self.guard();
        let vol = self.vol(phone_id);
        let meta_path = self.meta_file(phone_id);
        let mut meta = VolumeMeta::of_volume(phone_id, &vol, &meta_path)?;
        if !self.dir("images").join(image_id).is_dir() {
            return Err(StorageError::UnknownImage(image_id.to_string()));
        }
        // The kept directories are made whole in the upper layer: what the
        // phone sees there of the old image is copied up (an owner change
        // to the same owner, through the mount, copies an entry up).
        let rootfs = vol.join("rootfs");
        if !is_mount_point(&rootfs) {
            self.assemble(&meta.image_id, &vol)?;
        }
        for d in keep {
            copy_up_tree(&rootfs.join(d))?;
        }
        self.unmount(&vol)?;
        // Then opaque: the new image adds nothing to them, and what the
        // phone deleted there stays deleted.
        let pruned = super::remove_all_but(&vol.join("upper"), keep)
            .and_then(|()| {
                keep.iter()
                    .map(|d| vol.join("upper").join(d))
                    .filter(|p| p.is_dir())
                    .try_for_each(|p| set_opaque(&p))
            })
            .and_then(|()| {
                let work = vol.join("work");
                std::fs::remove_dir_all(&work).map_err(|e| StorageError::io("remove", &work, e))
            });
        if let Err(e) = pruned {
            // Whatever was pruned, the volume is mounted again on its image.
            let _ = self.assemble(&meta.image_id, &vol);
            return Err(e);
        }
        self.assemble(image_id, &vol)?;
        meta.image_id = image_id.to_string();
        meta.save(&meta_path)?;
        Ok(vol.join("rootfs"))
    }

    fn delete_volume(&self, phone_id: &str) -> Result<(), StorageError> {
        validate_id("phone", phone_id)?;
        let _g = self.guard();
        let vol = self.vol(phone_id);
        if vol.exists() {
            self.unmount(&vol)?;
            std::fs::remove_dir_all(&vol).map_err(|e| StorageError::io("remove", &vol, e))?;
        }
        let _ = std::fs::remove_file(self.meta_file(phone_id));
        Ok(())
    }

    /// Overlay volumes are not capped: only the recorded size changes
    /// (what the volume reports, kept by resets).
    fn grow_volume(&self, phone_id: &str, disk_size_bytes: u64) -> Result<u64, StorageError> {
        validate_id("phone", phone_id)?;
        let _g = self.guard();
        let meta_path = self.meta_file(phone_id);
        if !self.vol(phone_id).exists() || !meta_path.exists() {
            return Err(StorageError::UnknownVolume(phone_id.to_string()));
        }
        let meta = VolumeMeta::load(&meta_path)?;
        meta.grown(phone_id, disk_size_bytes)?.save(&meta_path)?;
        Ok(meta.disk_size_bytes)
    }

    fn volume_path(&self, phone_id: &str) -> Result<Option<PathBuf>, StorageError> {
        validate_id("phone", phone_id)?;
        let r = self.vol(phone_id).join("rootfs");
        Ok(r.is_dir().then_some(r))
    }

    fn list_volumes(&self) -> Result<Vec<String>, StorageError> {
        list_ids(&self.dir("volumes"), None)
    }

    fn share_paths(&self) -> Result<SharePaths, StorageError> {
        Ok(SharePaths {
            files: self.dir("share/files"),
            apps: self.dir("share/apps"),
        })
    }

    fn pool_usage(&self) -> Result<PoolUsage, StorageError> {
        self.check_prepared()?;
        fs_usage(&self.cfg.root)
    }

    fn share_usage(&self) -> Result<ShareUsage, StorageError> {
        let share = self.dir("share");
        let used = du(&share)?;
        let max = recorded_share_limit(&self.cfg.root)?.unwrap_or(self.cfg.max_share_bytes);
        share_usage_of(&share, used, max)
    }

    fn set_share_limit(&self, bytes: u64) -> Result<(), StorageError> {
        let _g = self.guard();
        self.check_prepared()?;
        record_share_limit(&self.cfg.root, bytes)
    }

    fn teardown(&self) -> Result<(), StorageError> {
        let _g = self.guard();
        for phone in list_ids(&self.dir("volumes"), None)? {
            self.unmount(&self.vol(&phone))?;
        }
        Ok(())
    }
}

/// Allocated bytes under a directory (no symlinks followed).
fn du(dir: &Path) -> Result<u64, StorageError> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).map_err(|e| StorageError::io("list", &d, e))?;
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            total += md.blocks() * 512;
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_mount_renders_layers() {
        let st = OverlayStorage::new(OverlayConfig {
            root: "/dev-pool".into(),
            owner: "a".into(),
            max_share_bytes: 0,
        });
        let m = st.overlay_mount("img", Path::new("/dev-pool/volumes/p1"));
        assert_eq!(
            m.render().display(),
            "mount -t overlay -o lowerdir=/dev-pool/images/img,upperdir=/dev-pool/volumes/p1/upper,workdir=/dev-pool/volumes/p1/work overlay /dev-pool/volumes/p1/rootfs"
        );
    }
}
