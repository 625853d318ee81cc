//! The btrfs backend: one btrfs filesystem on a block device or on a
//! loop-attached sparse file. Images are read-only subvolumes; a phone's
//! volume is a writable snapshot of one (constant time, copy-on-write) whose
//! qgroup carries a referenced-bytes limit, so writes past the phone's disk
//! size fail with EDQUOT. Under simple quotas the limit is on a level-1
//! qgroup `1/<volume id>` holding the volume's own: a subvolume the phone
//! makes inside its volume joins it (the kernel gives a new subvolume its
//! parent's level-1 qgroups), so what it writes there counts too. The
//! sharepool is a subvolume with its own limit.
//!
//! A new pool uses simple quotas (kernel 6.7+): an extent is charged to the
//! subvolume that wrote it for its whole life, so a phone's limit caps what
//! the phone writes on top of its image, and taking or dropping a snapshot
//! costs no accounting walk over the image (full qgroups made a 1 GB clone
//! take 110-170 ms on commit, simple ones 10 ms). Kernels without them, and
//! pools made with full qgroups, keep full accounting, where the limit
//! covers the image's bytes too.
//!
//! Layout under the mount point: `.cph-owner`, `images/<id>`,
//! `volumes/<phone>`, `meta/<phone>.json`, `share/{files,apps}`.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::cmd::{self, Btrfs, Invocation, Losetup, Mount, Runner, SystemRunner};
use super::{
    claim_owner, fs_usage, image_extract_options, is_mount_point, list_ids, read_owner,
    record_share_limit, recorded_share_limit, share_usage_of, validate_id, ImportOutcome,
    PoolUsage, SharePaths, ShareUsage, Storage, StorageError, VolumeMeta,
};

/// Offset and value of the btrfs superblock magic.
const BTRFS_MAGIC_OFFSET: u64 = 0x10040;
const BTRFS_MAGIC: &[u8; 8] = b"_BHRfS_M";
/// Label given to filesystems this backend creates.
pub const POOL_LABEL: &str = "cph-pool";
/// Smallest pool mkfs.btrfs accepts comfortably.
pub const MIN_POOL_BYTES: u64 = 128 << 20;

/// What the pool lives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolDevice {
    /// A block device (partition or disk), formatted if it holds no btrfs.
    Block(PathBuf),
    /// A sparse file of `size_bytes`, created if absent, attached to a loop
    /// device (re-attached after a reboot).
    LoopFile { path: PathBuf, size_bytes: u64 },
}

/// Where and for whom the pool is prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BtrfsConfig {
    pub device: PoolDevice,
    pub mount_point: PathBuf,
    /// Id of the agent owning the pool (written to the owner marker).
    pub owner: String,
    /// Sharepool cap in bytes (`max_share_disk_size_g`).
    pub max_share_bytes: u64,
}

/// How a pool's device is mounted.
pub fn pool_mount(device: &str, mount_point: &Path) -> Mount {
    Mount {
        fstype: Some("btrfs"),
        options: vec!["noatime".into()],
        source: device.to_string(),
        target: s(mount_point),
    }
}

/// The btrfs backend.
pub struct BtrfsStorage {
    cfg: BtrfsConfig,
    runner: Box<dyn Runner>,
    /// Serializes imports and volume changes of this handle.
    lock: Mutex<()>,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// How a pool accounts the space of its subvolumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaMode {
    /// Extents are charged to the subvolume that wrote them.
    Simple,
    /// Full qgroup accounting: shared extents count for every referrer.
    Full,
}

/// The btrfs ioctls this backend issues itself (`linux/btrfs.h`);
/// btrfs-progs before 6.7 cannot enable simple quotas.
mod ioctl {
    /// `struct btrfs_ioctl_quota_ctl_args`.
    #[repr(C)]
    pub struct QuotaCtlArgs {
        pub cmd: u64,
        pub status: u64,
    }
    /// `BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA`.
    pub const ENABLE_SIMPLE_QUOTA: u64 = 4;
    nix::ioctl_readwrite!(quota_ctl, 0x94, 40, QuotaCtlArgs);

    /// `struct btrfs_ioctl_fs_info_args` (1 KiB; only the fsid is read).
    #[repr(C)]
    pub struct FsInfoArgs {
        pub max_id: u64,
        pub num_devices: u64,
        pub fsid: [u8; 16],
        pub rest: [u8; 992],
    }
    nix::ioctl_read!(fs_info, 0x94, 31, FsInfoArgs);
}

fn open_dir(p: &Path) -> Result<std::fs::File, StorageError> {
    std::fs::File::open(p).map_err(|e| StorageError::io("open", p, e))
}

/// The accounting mode of the btrfs mounted at `mount`, `None` when quotas
/// are off (read from `/sys/fs/btrfs/<fsid>/qgroups/mode`, or the presence
/// of `qgroups` on older kernels).
pub fn quota_mode(mount: &Path) -> Result<Option<QuotaMode>, StorageError> {
    use std::os::fd::AsRawFd;
    let dir = open_dir(mount)?;
    let mut args = ioctl::FsInfoArgs {
        max_id: 0,
        num_devices: 0,
        fsid: [0; 16],
        rest: [0; 992],
    };
    // SAFETY: `args` is a properly sized, writable FS_INFO argument block
    // and `dir` an open descriptor for the duration of the call.
    unsafe { ioctl::fs_info(dir.as_raw_fd(), &mut args) }
        .map_err(|e| StorageError::io("read btrfs info of", mount, e.into()))?;
    // sysfs names the filesystem by its fsid as a hyphenated UUID.
    let hex: String = args.fsid.iter().map(|b| format!("{b:02x}")).collect();
    let fsid = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    let qgroups = Path::new("/sys/fs/btrfs").join(fsid).join("qgroups");
    let mode = qgroups.join("mode");
    match std::fs::read_to_string(&mode) {
        Ok(m) if m.trim() == "squota" => Ok(Some(QuotaMode::Simple)),
        Ok(_) => Ok(Some(QuotaMode::Full)),
        // Kernels before 6.7 have no `mode` (nor simple quotas): the
        // `qgroups` directory alone says quotas are on.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(qgroups.is_dir().then_some(QuotaMode::Full))
        }
        Err(e) => Err(StorageError::io("read", mode, e)),
    }
}

/// Turns simple quotas on; `Ok(false)` when the kernel has none.
fn enable_simple_quotas(mount: &Path) -> Result<bool, StorageError> {
    use std::os::fd::AsRawFd;
    let dir = open_dir(mount)?;
    let mut args = ioctl::QuotaCtlArgs {
        cmd: ioctl::ENABLE_SIMPLE_QUOTA,
        status: 0,
    };
    // SAFETY: `args` is a valid QUOTA_CTL argument block and `dir` an open
    // descriptor for the duration of the call.
    match unsafe { ioctl::quota_ctl(dir.as_raw_fd(), &mut args) } {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::EOPNOTSUPP) => Ok(false),
        Err(e) => Err(StorageError::io("enable simple quotas on", mount, e.into())),
    }
}

/// The level-1 qgroup capping volume subvolume `id` under simple quotas.
fn cap_qgroup(id: u64) -> String {
    format!("1/{id}")
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl BtrfsStorage {
    pub fn new(cfg: BtrfsConfig) -> Self {
        Self::with_runner(cfg, Box::new(SystemRunner))
    }

    pub fn with_runner(cfg: BtrfsConfig, runner: Box<dyn Runner>) -> Self {
        Self {
            cfg,
            runner,
            lock: Mutex::new(()),
        }
    }

    pub fn config(&self) -> &BtrfsConfig {
        &self.cfg
    }

    fn run(&self, inv: Invocation) -> Result<String, StorageError> {
        self.runner.run(&inv)
    }

    fn btrfs(&self, c: Btrfs) -> Result<String, StorageError> {
        self.run(c.render())
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn root(&self) -> Result<&Path, StorageError> {
        let mp = self.cfg.mount_point.as_path();
        if !is_mount_point(mp) {
            return Err(StorageError::NotPrepared(format!(
                "{} is not mounted",
                mp.display()
            )));
        }
        Ok(mp)
    }

    fn image_dir(&self, id: &str) -> PathBuf {
        self.cfg.mount_point.join("images").join(id)
    }

    fn volume_dir(&self, id: &str) -> PathBuf {
        self.cfg.mount_point.join("volumes").join(id)
    }

    fn meta_file(&self, id: &str) -> PathBuf {
        self.cfg.mount_point.join("meta").join(format!("{id}.json"))
    }

    /// The loop devices currently backing the pool file.
    fn loops_of(&self, file: &Path) -> Result<Vec<String>, StorageError> {
        let out = self.run(Losetup::Find { file: s(file) }.render())?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// Finds or makes the device: `(device, attached by this call, file
    /// created by this call)`.
    fn open_device(&self) -> Result<(String, bool, bool), StorageError> {
        match &self.cfg.device {
            PoolDevice::Block(p) => {
                if !p.exists() {
                    return Err(StorageError::BadDevice {
                        path: p.clone(),
                        reason: "no such device".into(),
                    });
                }
                Ok((s(p), false, false))
            }
            PoolDevice::LoopFile { path, size_bytes } => {
                let mut created = false;
                if !path.exists() {
                    if *size_bytes < MIN_POOL_BYTES {
                        return Err(StorageError::BadDevice {
                            path: path.clone(),
                            reason: format!("pool size {size_bytes} is below {MIN_POOL_BYTES}"),
                        });
                    }
                    check_space(path, *size_bytes)?;
                    create_sparse(path, *size_bytes)?;
                    created = true;
                }
                if let Some(dev) = self.loops_of(path)?.into_iter().next() {
                    return Ok((dev, false, created));
                }
                let attach = |direct_io| {
                    self.run(
                        Losetup::Attach {
                            file: s(path),
                            direct_io,
                        }
                        .render(),
                    )
                };
                let attached = attach(true).or_else(|e| {
                    tracing::info!(pool = %path.display(), error = %e,
                        "attaching the pool file with direct I/O failed; trying buffered I/O");
                    attach(false)
                });
                match attached {
                    Ok(out) => Ok((out.trim().to_string(), true, created)),
                    Err(e) => {
                        if created {
                            let _ = std::fs::remove_file(path);
                        }
                        Err(e)
                    }
                }
            }
        }
    }

    fn undo_device(&self, dev: &str, attached: bool, created: bool) {
        if attached {
            if let Err(e) = self.run(
                Losetup::Detach {
                    device: dev.to_string(),
                }
                .render(),
            ) {
                tracing::warn!(device = dev, error = %e, "detaching loop device");
            }
        }
        if let (true, PoolDevice::LoopFile { path, .. }) = (created, &self.cfg.device) {
            let _ = std::fs::remove_file(path);
        }
    }

    fn mount_pool(&self) -> Result<(), StorageError> {
        let mp = &self.cfg.mount_point;
        let (dev, attached, created) = self.open_device()?;
        let result = (|| {
            if !has_btrfs_magic(Path::new(&dev))? {
                self.run(cmd::mkfs_btrfs(&dev, POOL_LABEL))?;
            }
            std::fs::create_dir_all(mp).map_err(|e| StorageError::io("create", mp, e))?;
            self.run(pool_mount(&dev, mp).render())?;
            Ok(())
        })();
        if let Err(e) = result {
            self.undo_device(&dev, attached, created);
            return Err(e);
        }
        if let Some(owner) = read_owner(mp) {
            if owner != self.cfg.owner {
                if let Err(e) = self.run(cmd::umount(&s(mp))) {
                    tracing::warn!(mount = %mp.display(), error = %e, "unmounting foreign pool");
                }
                self.undo_device(&dev, attached, false);
                return Err(StorageError::OwnerConflict {
                    path: mp.clone(),
                    owner,
                    wanted: self.cfg.owner.clone(),
                });
            }
        }
        tracing::info!(device = %dev, mount = %mp.display(), "btrfs pool mounted");
        Ok(())
    }

    fn ensure_layout(&self) -> Result<(), StorageError> {
        let mp = &self.cfg.mount_point;
        claim_owner(mp, &self.cfg.owner)?;
        self.enable_quotas(mp)?;
        for d in ["images", "volumes", "meta"] {
            let p = mp.join(d);
            std::fs::create_dir_all(&p).map_err(|e| StorageError::io("create", &p, e))?;
            // Phones with user namespaces run from `volumes` (btrfs only).
            super::make_private(&p, if d == "volumes" { 0o711 } else { 0o700 })?;
        }
        let share = mp.join("share");
        if !share.exists() {
            self.btrfs(Btrfs::SubvolumeCreate { path: s(&share) })?;
        }
        for d in ["files", "apps"] {
            let p = share.join(d);
            std::fs::create_dir_all(&p).map_err(|e| StorageError::io("create", &p, e))?;
            super::make_share_public(&p)?;
        }
        // A cap a flavor set earlier wins over the configured default.
        let limit = recorded_share_limit(mp)?.unwrap_or(self.cfg.max_share_bytes);
        self.btrfs(Btrfs::QgroupLimit {
            bytes: limit,
            qgroup: None,
            path: s(&share),
        })?;
        // Leftovers of an import or reset interrupted by a crash.
        for dir in [mp.join("images"), mp.join("volumes")] {
            let rd = std::fs::read_dir(&dir).map_err(|e| StorageError::io("list", &dir, e))?;
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".staging-") {
                    tracing::warn!(path = %e.path().display(), "removing interrupted staging");
                    self.delete_subvolume(&e.path())?;
                }
                // A reset or an image update cut off: before the old
                // volume was deleted it is still whole and the new one
                // goes; after, the new one (a fresh clone, or the phone's
                // kept data on the new image, complete by then) takes its
                // place, so nothing asked for is lost.
                for (prefix, what) in [(".reset-", "reset"), (".upgrade-", "image update")] {
                    if let Some(phone) = name.strip_prefix(prefix) {
                        self.settle_replacement(&e.path(), &dir.join(phone), what)?;
                    }
                }
            }
        }
        self.sweep_caps()
    }

    /// A volume's replacement `new` a crash left beside `vol`: removed
    /// while `vol` is there, else renamed to it.
    fn settle_replacement(&self, new: &Path, vol: &Path, what: &str) -> Result<(), StorageError> {
        if vol.symlink_metadata().is_ok() {
            tracing::warn!(path = %new.display(), "removing interrupted {what}");
            return self.delete_volume_subvolume(new);
        }
        tracing::warn!(volume = %vol.display(), "finishing a {what} cut off after the old volume went");
        std::fs::rename(new, vol).map_err(|err| StorageError::io("rename", new, err))
    }

    /// Quotas as they are on an existing pool; simple ones on a new pool
    /// where the kernel has them, full accounting otherwise.
    fn enable_quotas(&self, mp: &Path) -> Result<(), StorageError> {
        if quota_mode(mp)?.is_some() {
            return Ok(());
        }
        if enable_simple_quotas(mp)? {
            tracing::info!(mount = %mp.display(), "btrfs simple quotas enabled");
            return Ok(());
        }
        tracing::info!(
            mount = %mp.display(),
            "kernel has no btrfs simple quotas; using full qgroup accounting"
        );
        self.btrfs(Btrfs::QuotaEnable { mount: s(mp) }).map(|_| ())
    }

    /// Deletes a subvolume, and first the subvolumes a phone made inside
    /// it (its root may make them; the kernel refuses to delete a
    /// subvolume holding others, and btrfs-progs before 6.12 cannot do it
    /// in one go).
    fn delete_subvolume(&self, path: &Path) -> Result<(), StorageError> {
        let first = self.btrfs(Btrfs::SubvolumeDelete { path: s(path) });
        if first.is_ok() {
            return Ok(());
        }
        let nested = self.nested_subvolumes(path)?;
        if nested.is_empty() {
            return first.map(|_| ());
        }
        for n in &nested {
            self.delete_subvolume(n)?;
        }
        self.btrfs(Btrfs::SubvolumeDelete { path: s(path) })
            .map(|_| ())
    }

    /// The subvolumes directly beneath subvolume `path`, as paths.
    fn nested_subvolumes(&self, path: &Path) -> Result<Vec<PathBuf>, StorageError> {
        let root = self.root()?.to_path_buf();
        let out = self.run(Invocation::new(
            "btrfs",
            &["subvolume", "list", "-o", &s(path)],
        ))?;
        // `ID 259 gen 9 top level 258 path <path from the top level>`.
        Ok(out
            .lines()
            .filter_map(|l| l.split_once(" path ").map(|(_, p)| p.trim()))
            .map(|p| root.join(p.trim_start_matches("<FS_TREE>/")))
            .collect())
    }

    fn subvol_id(&self, path: &Path) -> Result<u64, StorageError> {
        let out = self.run(Invocation::new(
            "btrfs",
            &["inspect-internal", "rootid", &s(path)],
        ))?;
        out.trim().parse().map_err(|_| StorageError::Metadata {
            path: path.to_path_buf(),
            detail: format!("unexpected subvolume id {:?}", out.trim()),
        })
    }

    /// Snapshots the image into `dest` and applies the size cap; nothing is
    /// left when the cap cannot be set.
    fn clone_image(&self, image_id: &str, dest: &Path, size: u64) -> Result<(), StorageError> {
        let image = self.image_dir(image_id);
        if !image.is_dir() {
            return Err(StorageError::UnknownImage(image_id.to_string()));
        }
        self.btrfs(Btrfs::Snapshot {
            source: s(&image),
            dest: s(dest),
            read_only: false,
        })?;
        if size > 0 {
            if let Err(e) = self.cap_volume(dest, size) {
                let _ = self.delete_volume_subvolume(dest);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Whether the pool accounts with simple quotas, where a volume's cap
    /// is its level-1 qgroup.
    fn simple_quotas(&self) -> Result<bool, StorageError> {
        Ok(quota_mode(self.root()?)? == Some(QuotaMode::Simple))
    }

    /// Caps what volume `vol` holds at `bytes`, the subvolumes made inside
    /// it included under simple quotas (its level-1 qgroup, made here).
    /// Full accounting gives a new subvolume no parent qgroup: the cap is
    /// then on the volume's own (a phone cannot make a subvolume: its
    /// seccomp filter refuses the btrfs `ioctl`s, `container::confine`).
    fn cap_volume(&self, vol: &Path, bytes: u64) -> Result<(), StorageError> {
        let root = s(self.root()?);
        if !self.simple_quotas()? {
            return self
                .btrfs(Btrfs::QgroupLimit {
                    bytes,
                    qgroup: None,
                    path: s(vol),
                })
                .map(|_| ());
        }
        let id = self.subvol_id(vol)?;
        let cap = cap_qgroup(id);
        // Made already: a cap being raised, or one a crash left (subvolume
        // ids of deleted subvolumes come back after a remount).
        let made = |r: Result<String, StorageError>| match r {
            Err(StorageError::Command { stderr, .. }) if stderr.contains("File exists") => Ok(()),
            r => r.map(|_| ()),
        };
        made(self.btrfs(Btrfs::QgroupCreate {
            qgroup: cap.clone(),
            path: root.clone(),
        }))?;
        made(self.btrfs(Btrfs::QgroupRelation {
            child: format!("0/{id}"),
            parent: cap.clone(),
            assign: true,
            path: root.clone(),
        }))?;
        self.btrfs(Btrfs::QgroupLimit {
            bytes,
            qgroup: Some(cap),
            path: root,
        })
        .map(|_| ())
    }

    /// Deletes a volume's subvolume (with those made inside it) and its
    /// cap. A cap that cannot be removed now is swept at the next start.
    fn delete_volume_subvolume(&self, vol: &Path) -> Result<(), StorageError> {
        let id = match self.simple_quotas()? {
            true => Some(self.subvol_id(vol)?),
            false => None,
        };
        self.delete_subvolume(vol)?;
        if let Some(id) = id {
            if let Err(e) = self.release_cap(&cap_qgroup(id)) {
                tracing::warn!(path = %vol.display(), error = %e, "volume cap left for the next start");
            }
        }
        Ok(())
    }

    /// Removes cap qgroup `cap`, first emptied of its members (the qgroup
    /// of a deleted subvolume stays until its extents are freed).
    fn release_cap(&self, cap: &str) -> Result<(), StorageError> {
        let root = s(self.root()?);
        let out = self.btrfs(Btrfs::QgroupShow { path: root.clone() })?;
        let Some(q) = cmd::parse_qgroup(&out, cap) else {
            return Ok(());
        };
        for child in q.children {
            // A member the cleaner removes meanwhile is no longer one.
            match self.btrfs(Btrfs::QgroupRelation {
                child,
                parent: cap.to_string(),
                assign: false,
                path: root.clone(),
            }) {
                Err(StorageError::Command { stderr, .. })
                    if stderr.contains("No such file or directory") => {}
                r => {
                    r?;
                }
            }
        }
        self.btrfs(Btrfs::QgroupDestroy {
            qgroup: cap.to_string(),
            path: root,
        })
        .map(|_| ())
    }

    /// Removes the caps of volumes that are gone (deleted by a run a crash
    /// cut off before it removed their caps).
    fn sweep_caps(&self) -> Result<(), StorageError> {
        if !self.simple_quotas()? {
            return Ok(());
        }
        let out = self.btrfs(Btrfs::QgroupShow {
            path: s(self.root()?),
        })?;
        let groups = cmd::parse_qgroups(&out);
        for q in &groups {
            let Some(id) = q.id.strip_prefix("1/") else {
                continue;
            };
            let own = format!("0/{id}");
            if !groups.iter().any(|g| g.id == own) {
                tracing::info!(qgroup = %q.id, "removing the cap of a deleted volume");
                self.release_cap(&q.id)?;
            }
        }
        Ok(())
    }
}

impl Storage for BtrfsStorage {
    fn name(&self) -> &'static str {
        "btrfs"
    }

    fn prepare(&self) -> Result<(), StorageError> {
        let _g = self.guard();
        let mp = &self.cfg.mount_point;
        if is_mount_point(mp) {
            if let Some(owner) = read_owner(mp) {
                if owner != self.cfg.owner {
                    return Err(StorageError::OwnerConflict {
                        path: mp.clone(),
                        owner,
                        wanted: self.cfg.owner.clone(),
                    });
                }
            }
        } else {
            self.mount_pool()?;
        }
        self.ensure_layout()
    }

    fn import_image(
        &self,
        image_id: &str,
        reader: Box<dyn Read + Send + '_>,
    ) -> Result<ImportOutcome, StorageError> {
        validate_id("image", image_id)?;
        let root = self.root()?;
        let _g = self.guard();
        let dest = self.image_dir(image_id);
        if dest.exists() {
            return Ok(ImportOutcome {
                path: dest,
                imported: false,
                bytes: 0,
            });
        }
        let staging = root.join("images").join(format!(
            ".staging-{image_id}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        self.btrfs(Btrfs::SubvolumeCreate { path: s(&staging) })?;
        let report = match crate::archive::extract(reader, &staging, &image_extract_options(false))
        {
            Ok(r) => r,
            Err(e) => {
                self.delete_subvolume(&staging)?;
                return Err(StorageError::BadImage {
                    image_id: image_id.to_string(),
                    source: e,
                });
            }
        };
        let snap = self.btrfs(Btrfs::Snapshot {
            source: s(&staging),
            dest: s(&dest),
            read_only: true,
        });
        self.delete_subvolume(&staging)?;
        snap?;
        tracing::info!(image_id, bytes = report.bytes, "image imported");
        Ok(ImportOutcome {
            path: dest,
            imported: true,
            bytes: report.bytes,
        })
    }

    fn has_image(&self, image_id: &str) -> Result<bool, StorageError> {
        validate_id("image", image_id)?;
        self.root()?;
        Ok(self.image_dir(image_id).is_dir())
    }

    fn list_images(&self) -> Result<Vec<String>, StorageError> {
        let root = self.root()?;
        list_ids(&root.join("images"), None)
    }

    fn delete_image(&self, image_id: &str) -> Result<(), StorageError> {
        validate_id("image", image_id)?;
        self.root()?;
        let _g = self.guard();
        let dir = self.image_dir(image_id);
        if !dir.exists() {
            return Err(StorageError::UnknownImage(image_id.to_string()));
        }
        self.delete_subvolume(&dir)
    }

    fn create_volume(
        &self,
        phone_id: &str,
        image_id: &str,
        disk_size_bytes: u64,
    ) -> Result<PathBuf, StorageError> {
        validate_id("phone", phone_id)?;
        validate_id("image", image_id)?;
        self.root()?;
        let _g = self.guard();
        let vol = self.volume_dir(phone_id);
        if vol.exists() {
            return Err(StorageError::VolumeExists(phone_id.to_string()));
        }
        self.clone_image(image_id, &vol, disk_size_bytes)?;
        let meta = VolumeMeta {
            image_id: image_id.to_string(),
            disk_size_bytes,
        };
        if let Err(e) = meta.save(&self.meta_file(phone_id)) {
            let _ = self.delete_volume_subvolume(&vol);
            return Err(e);
        }
        tracing::info!(phone_id, image_id, disk_size_bytes, "volume created");
        Ok(vol)
    }

    fn reset_volume(
        &self,
        phone_id: &str,
        image_id: Option<&str>,
    ) -> Result<PathBuf, StorageError> {
        validate_id("phone", phone_id)?;
        if let Some(i) = image_id {
            validate_id("image", i)?;
        }
        let root = self.root()?;
        let _g = self.guard();
        let vol = self.volume_dir(phone_id);
        let meta_path = self.meta_file(phone_id);
        let mut meta = VolumeMeta::of_volume(phone_id, &vol, &meta_path)?;
        let image = image_id.unwrap_or(&meta.image_id).to_string();
        let tmp = root.join("volumes").join(format!(".reset-{phone_id}"));
        if tmp.exists() {
            self.delete_volume_subvolume(&tmp)?;
        }
        self.clone_image(&image, &tmp, meta.disk_size_bytes)?;
        if let Err(e) = self.delete_volume_subvolume(&vol) {
            let _ = self.delete_volume_subvolume(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &vol).map_err(|e| StorageError::io("rename", &tmp, e))?;
        meta.image_id = image;
        meta.save(&meta_path)?;
        tracing::info!(phone_id, image_id = %meta.image_id, "volume reset");
        Ok(vol)
    }

    /// A snapshot of the volume (its kept directories shared, not
    /// copied), emptied of the rest, which is then copied in from the new
    /// image (reflinked: data blocks are shared too), then put in the
    /// volume's place.
    fn upgrade_volume(
        &self,
        phone_id: &str,
        image_id: &str,
        keep: &[&str],
    ) -> Result<PathBuf, StorageError> {
        validate_id("phone", phone_id)?;
        validate_id("image", image_id)?;
        let root = self.root()?;
        let _g = self.guard();
        let vol = self.volume_dir(phone_id);
        let meta_path = self.meta_file(phone_id);
        let mut meta = VolumeMeta::of_volume(phone_id, &vol, &meta_path)?;
        let image = self.image_dir(image_id);
        if !image.is_dir() {
            return Err(StorageError::UnknownImage(image_id.to_string()));
        }
        let tmp = root.join("volumes").join(format!(".upgrade-{phone_id}"));
        if tmp.exists() {
            self.delete_volume_subvolume(&tmp)?;
        }
        self.btrfs(Btrfs::Snapshot {
            source: s(&vol),
            dest: s(&tmp),
            read_only: false,
        })?;
        let filled = (|| {
            if meta.disk_size_bytes > 0 {
                self.cap_volume(&tmp, meta.disk_size_bytes)?;
            }
            super::remove_all_but(&tmp, keep)?;
            let mut args = vec!["-a".to_string(), "--reflink=auto".into(), "--".into()];
            for entry in
                std::fs::read_dir(&image).map_err(|e| StorageError::io("read", &image, e))?
            {
                let entry = entry.map_err(|e| StorageError::io("read", &image, e))?;
                // A kept directory the phone does not have comes from the
                // new image too.
                let name = entry.file_name();
                let kept = name.to_str().is_some_and(|n| keep.contains(&n))
                    && tmp.join(&name).symlink_metadata().is_ok();
                if !kept {
                    args.push(s(&entry.path()));
                }
            }
            if args.len() > 3 {
                args.push(s(&tmp));
                self.run(Invocation::new("cp", &args))?;
            }
            Ok(())
        })();
        if let Err(e) = filled {
            let _ = self.delete_volume_subvolume(&tmp);
            return Err(e);
        }
        if let Err(e) = self.delete_volume_subvolume(&vol) {
            let _ = self.delete_volume_subvolume(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &vol).map_err(|e| StorageError::io("rename", &tmp, e))?;
        meta.image_id = image_id.to_string();
        meta.save(&meta_path)?;
        tracing::info!(phone_id, image_id, ?keep, "volume moved to a new image");
        Ok(vol)
    }

    fn delete_volume(&self, phone_id: &str) -> Result<(), StorageError> {
        validate_id("phone", phone_id)?;
        self.root()?;
        let _g = self.guard();
        let vol = self.volume_dir(phone_id);
        if vol.exists() {
            self.delete_volume_subvolume(&vol)?;
        }
        let meta = self.meta_file(phone_id);
        match std::fs::remove_file(&meta) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io("remove", meta, e)),
        }
    }

    fn grow_volume(&self, phone_id: &str, disk_size_bytes: u64) -> Result<u64, StorageError> {
        validate_id("phone", phone_id)?;
        self.root()?;
        let _g = self.guard();
        let vol = self.volume_dir(phone_id);
        let meta_path = self.meta_file(phone_id);
        let meta = VolumeMeta::of_volume(phone_id, &vol, &meta_path)?;
        let grown = meta.grown(phone_id, disk_size_bytes)?;
        self.cap_volume(&vol, disk_size_bytes)?;
        if self.simple_quotas()? {
            // A volume made when the cap was on its own qgroup.
            self.btrfs(Btrfs::QgroupLimit {
                bytes: 0,
                qgroup: None,
                path: s(&vol),
            })?;
        }
        grown.save(&meta_path)?;
        tracing::info!(phone_id, disk_size_bytes, "volume grown");
        Ok(meta.disk_size_bytes)
    }

    fn volume_path(&self, phone_id: &str) -> Result<Option<PathBuf>, StorageError> {
        validate_id("phone", phone_id)?;
        self.root()?;
        let vol = self.volume_dir(phone_id);
        Ok(vol.is_dir().then_some(vol))
    }

    fn list_volumes(&self) -> Result<Vec<String>, StorageError> {
        let root = self.root()?;
        list_ids(&root.join("volumes"), None)
    }

    fn share_paths(&self) -> Result<SharePaths, StorageError> {
        let root = self.root()?;
        Ok(SharePaths {
            files: root.join("share/files"),
            apps: root.join("share/apps"),
        })
    }

    fn pool_usage(&self) -> Result<PoolUsage, StorageError> {
        fs_usage(self.root()?)
    }

    fn share_usage(&self) -> Result<ShareUsage, StorageError> {
        let root = self.root()?;
        let share = root.join("share");
        let id = self.subvol_id(&share)?;
        let out = self.btrfs(Btrfs::QgroupShow { path: s(root) })?;
        let own = format!("0/{id}");
        let q = cmd::parse_qgroup(&out, &own).ok_or_else(|| StorageError::Metadata {
            path: share.clone(),
            detail: format!("no qgroup {own}"),
        })?;
        // The kernel's own limit is the truth; the recorded one is what it
        // was set to.
        share_usage_of(root, q.referenced, q.max_referenced.unwrap_or(0))
    }

    fn set_share_limit(&self, bytes: u64) -> Result<(), StorageError> {
        let _g = self.guard();
        let root = self.root()?;
        self.btrfs(Btrfs::QgroupLimit {
            bytes,
            qgroup: None,
            path: s(&root.join("share")),
        })?;
        record_share_limit(root, bytes)
    }

    fn teardown(&self) -> Result<(), StorageError> {
        let _g = self.guard();
        let mp = &self.cfg.mount_point;
        if is_mount_point(mp) {
            // A short-lived opener (a probe of the new mount, writeback
            // finishing under load) makes it busy for a moment: try again.
            let deadline = std::time::Instant::now() + LOOP_RELEASE_WAIT;
            loop {
                match self.run(cmd::umount(&s(mp))) {
                    Ok(_) => break,
                    Err(StorageError::Command { ref stderr, .. })
                        if stderr.contains("busy") && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if let PoolDevice::LoopFile { path, .. } = &self.cfg.device {
            if path.exists() {
                for dev in self.loops_of(path)? {
                    self.run(Losetup::Detach { device: dev }.render())?;
                }
                // A device btrfs has not let go of yet is only marked to
                // detach on its last close: wait until it is gone.
                let deadline = std::time::Instant::now() + LOOP_RELEASE_WAIT;
                while !self.loops_of(path)?.is_empty() {
                    if std::time::Instant::now() >= deadline {
                        return Err(StorageError::io(
                            "detach the loop device of",
                            path,
                            std::io::Error::new(
                                std::io::ErrorKind::ResourceBusy,
                                format!("still attached after {LOOP_RELEASE_WAIT:?}"),
                            ),
                        ));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
        Ok(())
    }
}

/// How long teardown waits for a detached loop device to be released.
const LOOP_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether the device or file holds a btrfs superblock.
pub fn has_btrfs_magic(dev: &Path) -> Result<bool, StorageError> {
    let mut f = std::fs::File::open(dev).map_err(|e| StorageError::io("open", dev, e))?;
    let mut buf = [0u8; 8];
    if f.seek(SeekFrom::Start(BTRFS_MAGIC_OFFSET)).is_err() {
        return Ok(false);
    }
    match f.read_exact(&mut buf) {
        Ok(()) => Ok(&buf == BTRFS_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(StorageError::io("read superblock", dev, e)),
    }
}

/// Refuses a pool file the filesystem holding it has no room for.
pub fn check_space(file: &Path, wanted: u64) -> Result<(), StorageError> {
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let available = fs_usage(parent)?.avail;
    if available < wanted {
        return Err(StorageError::InsufficientSpace {
            path: file.to_path_buf(),
            wanted,
            available,
        });
    }
    Ok(())
}

fn create_sparse(path: &Path, size: u64) -> Result<(), StorageError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| StorageError::io("create pool file", path, e))?;
    if let Err(e) = f.set_len(size) {
        let _ = std::fs::remove_file(path);
        return Err(StorageError::io("size pool file", path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_is_detected_only_at_its_offset() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("dev");
        std::fs::write(&f, vec![0u8; 0x10100]).unwrap();
        assert!(!has_btrfs_magic(&f).unwrap());
        let mut data = vec![0u8; 0x10100];
        data[0x10040..0x10048].copy_from_slice(BTRFS_MAGIC);
        std::fs::write(&f, data).unwrap();
        assert!(has_btrfs_magic(&f).unwrap());
        std::fs::write(&f, b"short").unwrap();
        assert!(!has_btrfs_magic(&f).unwrap());
    }

    #[test]
    fn space_check_refuses_more_than_free() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("pool.img");
        assert!(matches!(
            check_space(&f, u64::MAX / 2),
            Err(StorageError::InsufficientSpace { .. })
        ));
        check_space(&f, 1).unwrap();
    }
}
