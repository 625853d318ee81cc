//! `cph up`: the platform on this one machine, as far as it exists today.
//!
//! Prepares a data directory, unpacks the phone image once, plans the
//! development flavor's placement on this host (`dev_small`), and runs its
//! phones as real containers under `cph-runtime`, until Ctrl-C stops them
//! (their root filesystems, and so their data, stay in the data directory;
//! the next `cph up` starts the same phones again). The CPH API control plane
//! and the node agent join this command as they land.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cph_runtime::container::{ContainerSpec, Runtime, Status};
use cph_runtime::placement::{self, PlanRequest, Topology};

/// Errors of `cph up` and the phone commands.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("image {path} cannot be unpacked: {reason}")]
    Image { path: PathBuf, reason: String },
    #[error(transparent)]
    Placement(#[from] placement::PlacementError),
    #[error(transparent)]
    Container(#[from] cph_runtime::container::ContainerError),
    #[error("cph-shim not found next to {exe}; build the workspace (cargo build --workspace)")]
    NoShim { exe: PathBuf },
}

/// Options of `cph up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub data_dir: PathBuf,
    /// Phone image: a rootfs tar, optionally gzip.
    pub image: PathBuf,
    /// Phones of the development flavor to run.
    pub phones: u32,
    pub memory_mb: u64,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> UpError + 'a {
    move |source| UpError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The runtime over a data directory, with the shim installed beside `cph`.
pub fn runtime(data_dir: &Path) -> Result<Runtime, UpError> {
    let exe = std::env::current_exe().map_err(io("locate", Path::new("cph")))?;
    let shim = exe.with_file_name("cph-shim");
    if !shim.exists() {
        return Err(UpError::NoShim { exe });
    }
    Ok(Runtime::new(&data_dir.join("containers"), "cph", &shim)?)
}

/// Unpacks `image` into `dest` once: into a temporary directory first, renamed
/// into place only when complete, so a failed unpack leaves nothing behind.
fn unpack_once(image: &Path, dest: &Path) -> Result<(), UpError> {
    if dest.exists() {
        return Ok(());
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io("create", parent))?;
    let tmp = dest.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io("create", &tmp))?;
    let file = std::fs::File::open(image).map_err(io("open image", image))?;
    let mut magic = [0u8; 2];
    let gz = {
        use std::io::Read;
        let mut f = &file;
        f.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b]
    };
    let file = std::fs::File::open(image).map_err(io("open image", image))?;
    let reader: Box<dyn std::io::Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_unpack_xattrs(false);
    if let Err(e) = archive.unpack(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(UpError::Image {
            path: image.to_path_buf(),
            reason: e.to_string(),
        });
    }
    std::fs::rename(&tmp, dest).map_err(io("rename", dest))
}

/// Runs the platform until Ctrl-C or SIGTERM.
pub fn up(opts: &UpOptions) -> Result<(), UpError> {
    let rt = runtime(&opts.data_dir)?;
    let topo = Topology::discover(Path::new("/sys"))?;
    let vcpus = u32::try_from(topo.cpus.len()).unwrap_or(1).clamp(1, 2);
    let plan = placement::Checkpoint::load_or_plan(
        &opts.data_dir.join("placement.json"),
        &topo,
        &PlanRequest {
            strategy: "dev_small".to_string(),
            capacity: opts.phones,
            vcpus,
            memory_mb: opts.memory_mb,
            reserved: None,
        },
        &Default::default(),
    )?
    .checkpoint
    .plan;
    let mut names = Vec::new();
    for slot in &plan.slots {
        let name = format!("cph-dev-{:04}", slot.slot + 1);
        let rootfs = opts.data_dir.join("phones").join(&name).join("rootfs");
        unpack_once(&opts.image, &rootfs)?;
        let running = matches!(rt.state(&name).map(|s| s.status), Ok(Status::Running));
        if !running {
            let mut spec = ContainerSpec::new(&name, &rootfs);
            spec.cpus = Some(slot.cpuset());
            spec.mems = Some(slot.mems_list());
            spec.cpu_shares = Some(slot.cpu_shares);
            spec.memory_limit = i64::try_from(opts.memory_mb * 1024 * 1024).ok();
            spec.pids_limit = Some(4096);
            spec.init.push(format!("androidboot.serialno={name}"));
            // The slot's GPU: allowed in the device cgroup and bound at /dev/dri.
            if let Some(dev) = slot.render_device().filter(|d| Path::new(d).exists()) {
                spec.devices
                    .push(cph_runtime::container::DeviceNode { path: dev.into() });
            }
            rt.start(&spec)?;
        }
        let st = rt.state(&name)?;
        println!(
            "phone {name}: {:?}, pid {}, cpus {}, rootfs {}",
            st.status,
            st.pid,
            slot.cpuset(),
            rootfs.display()
        );
        names.push(name);
    }
    println!(
        "\ncph is up with {} phone(s); data in {}.\n  cph phone list --data-dir {}\n  cph phone exec --data-dir {} {} -- getprop\nCtrl-C stops the phones (their data stays).",
        names.len(),
        opts.data_dir.display(),
        opts.data_dir.display(),
        opts.data_dir.display(),
        names.first().map_or("NAME", String::as_str)
    );
    wait_for_ctrl_c();
    for name in &names {
        let status = rt.stop(name, Duration::from_secs(10))?;
        println!("phone {name}: {status:?}");
    }
    Ok(())
}

/// Waits for Ctrl-C (SIGINT) or SIGTERM (systemd, `timeout`).
fn wait_for_ctrl_c() {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot wait for signals");
            return;
        }
    };
    rt.block_on(async {
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    });
}
