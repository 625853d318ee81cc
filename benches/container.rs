//! Phone start-to-ready and exec round trip, ours next to `runc` and `crun`
//! (`run --detach`, `exec`) of one equivalent OCI bundle on the same rootfs,
//! in one run. Needs root; otherwise it says why and measures nothing.
//! Also ours in a user namespace of its own, against the same start
//! without one (where the rootfs can be mounted idmapped).
//! Writes `target/bench-report/container.json`.
//!
//! crun refuses a hybrid cgroup layout whose v2 hierarchy still holds
//! controllers (here `hugetlb`, the one not mounted as v1). The bench runs
//! in a mount namespace of its own where each such controller is given a
//! v1 hierarchy ([`V1Controllers`]), so all three runtimes see the same
//! layout; the controllers go back to v2 when the bench ends, killed or not.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cph_runtime::container::{ContainerSpec, Runtime, UserNamespace};
use criterion::Criterion;

#[path = "common/report.rs"]
mod report;
use report::Metric;

#[path = "common/bins.rs"]
mod bins;
use bins::image;

/// `cph-shim` of this build, brought up to date.
fn shim() -> PathBuf {
    bins::built().join("cph-shim")
}

fn wait_ready(marker: &Path) -> Duration {
    let start = Instant::now();
    while !marker.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "phone never became ready"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    start.elapsed()
}

fn run(cmd: &mut Command) {
    let out = cmd.stdin(Stdio::null()).output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An OCI runtime of the comparison (`runc` or `crun`): both take the same
/// bundle and command line.
#[derive(Clone, Copy)]
struct Oci {
    tool: &'static str,
}

impl Oci {
    /// `run --detach` of `bundle` as `id`. The detached container keeps
    /// whatever it inherits open, so its output goes to a file, not a pipe;
    /// the runtime's own errors are read back from that file when it fails.
    fn run(self, bundle: &Path, id: &str) {
        let log = bundle.join(format!("{}.stderr", self.tool));
        let file = std::fs::File::create(&log).expect("create runtime log");
        let status = Command::new(self.tool)
            .args(["run", "--detach", "--bundle"])
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .status()
            .expect("spawn OCI runtime");
        assert!(
            status.success(),
            "{} run {id}: {status}: {}",
            self.tool,
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn exec(self, id: &str) {
        run(Command::new(self.tool).args(["exec", id, "true"]));
    }

    fn delete(self, id: &str) {
        run(Command::new(self.tool).args(["delete", "--force", id]));
    }

    fn installed(self) -> bool {
        Command::new(self.tool).arg("--version").output().is_ok()
    }
}

const RUNC: Oci = Oci { tool: "runc" };
const CRUN: Oci = Oci { tool: "crun" };

/// Writes an OCI bundle whose config runs the test image's init on `rootfs`,
/// in a new network namespace or joining the one at `netns`.
fn oci_bundle(dir: &Path, rootfs: &Path, netns: Option<&Path>) {
    run(Command::new("runc").arg("spec").arg("--bundle").arg(dir));
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read config")).expect("json");
    cfg["root"]["path"] = serde_json::json!(rootfs);
    cfg["root"]["readonly"] = serde_json::json!(false);
    cfg["process"]["terminal"] = serde_json::json!(false);
    cfg["process"]["args"] = serde_json::json!(["/init"]);
    cfg["hostname"] = serde_json::json!("oci-phone");
    if let (Some(ns), Some(list)) = (netns, cfg["linux"]["namespaces"].as_array_mut()) {
        for n in list.iter_mut().filter(|n| n["type"] == "network") {
            n["path"] = serde_json::json!(ns);
        }
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).expect("json")).expect("write config");
}

/// Controllers of the cgroup v2 hierarchy given v1 hierarchies of their
/// own, mounted in this process's private mount namespace.
///
/// A controller that no v2 cgroup enables can be moved: mounting a v1
/// hierarchy with it takes it out of v2 for every process, and when the
/// last mount of that hierarchy goes (it has no cgroups left), the kernel
/// gives it back to v2. The namespace dies with the process, so a killed
/// bench gives the controllers back as well.
struct V1Controllers {
    unified: PathBuf,
    mounts: Vec<(String, PathBuf)>,
}

impl V1Controllers {
    /// Nothing taken.
    fn none() -> V1Controllers {
        V1Controllers {
            unified: PathBuf::new(),
            mounts: Vec::new(),
        }
    }

    /// Enters a private mount namespace and mounts a v1 hierarchy in `dir`
    /// for each controller of the v2 hierarchy of a hybrid layout. Nothing
    /// to do (an empty set) on a pure v1 or pure v2 host. Must run before
    /// the process starts threads: the namespace is the calling thread's
    /// and its children's.
    fn take(dir: &Path) -> Result<V1Controllers, String> {
        use nix::mount::{mount, MsFlags};
        // The unified hierarchy is the one mount with `cgroup.controllers`.
        let unified = cph_runtime::container::cgroup_mount_points()
            .into_iter()
            .find(|p| p.join("cgroup.controllers").exists());
        let Some(unified) = unified.filter(|u| u != Path::new("/sys/fs/cgroup")) else {
            return Ok(V1Controllers::none());
        };
        let read =
            |f: &str| std::fs::read_to_string(unified.join(f)).map_err(|e| format!("{f}: {e}"));
        let controllers: Vec<String> = read("cgroup.controllers")?
            .split_whitespace()
            .map(String::from)
            .collect();
        if controllers.is_empty() {
            return Ok(V1Controllers::none());
        }
        let enabled = read("cgroup.subtree_control")?;
        if !enabled.trim().is_empty() {
            return Err(format!("v2 cgroups use the controllers {}", enabled.trim()));
        }
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
            .map_err(|e| format!("unshare mount namespace: {e}"))?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| format!("make mounts private: {e}"))?;
        let mut taken = V1Controllers {
            unified,
            mounts: Vec::new(),
        };
        for c in controllers {
            let at = dir.join(format!("cgroup-{c}"));
            std::fs::create_dir_all(&at).map_err(|e| e.to_string())?;
            mount(
                Some("cgroup"),
                &at,
                Some("cgroup"),
                MsFlags::empty(),
                Some(c.as_str()),
            )
            .map_err(|e| format!("mount a v1 {c} hierarchy: {e}"))?;
            taken.mounts.push((c, at));
        }
        Ok(taken)
    }
}

impl Drop for V1Controllers {
    /// Unmounts the v1 hierarchies and waits for their controllers to be
    /// back in v2. A hierarchy whose last cgroup was removed just before
    /// can outlive its unmount; mounting and unmounting it again once it
    /// is empty lets it go.
    fn drop(&mut self) {
        use nix::mount::{mount, umount, MsFlags};
        if self.mounts.is_empty() {
            return;
        }
        for (_, at) in &self.mounts {
            let _ = umount(at);
        }
        let back = |c: &str| {
            std::fs::read_to_string(self.unified.join("cgroup.controllers"))
                .is_ok_and(|s| s.split_whitespace().any(|x| x == c))
        };
        for (c, at) in &self.mounts {
            for i in 1..=50 {
                if back(c) {
                    break;
                }
                if i % 10 == 0
                    && mount(
                        Some("cgroup"),
                        at,
                        Some("cgroup"),
                        MsFlags::empty(),
                        Some(c.as_str()),
                    )
                    .is_ok()
                {
                    let _ = umount(at);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !back(c) {
                eprintln!("container bench: the {c} controller is not back in cgroup v2");
            }
        }
    }
}

/// What the bench leaves on the host, removed when it ends, panics
/// included: the OCI containers, our phone, our parent cgroup (in every
/// hierarchy), the named network namespace, then the controllers taken
/// from v2.
struct Cleanup {
    state: PathBuf,
    parent: String,
    oci_id: String,
    netns: String,
    shim: PathBuf,
    _controllers: V1Controllers,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for oci in [RUNC, CRUN] {
            let _ = Command::new(oci.tool)
                .args(["delete", "--force", &self.oci_id])
                .stderr(Stdio::null())
                .status();
        }
        if let Ok(rt) = Runtime::new(&self.state, &self.parent, &self.shim) {
            let _ = rt.delete("bench-phone", Duration::from_secs(5));
        }
        let _ = cph_runtime::container::remove_cgroup_parent(&self.parent);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if !cph_runtime::privilege::check("container bench") {
        return;
    }
    if !RUNC.installed() {
        eprintln!("SKIPPED container bench: runc is not installed (apt-get install runc)");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    // First, while this process has one thread.
    let controllers = match V1Controllers::take(tmp.path()) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("container bench: crun left out, as it refuses this host's cgroups: {e}");
            None
        }
    };
    let mut anchors = vec![RUNC];
    if controllers.is_some() && CRUN.installed() {
        anchors.push(CRUN);
    }
    let mut c = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300))
        .configure_from_args();
    let rootfs = tmp.path().join("rootfs");
    std::fs::create_dir(&rootfs).expect("mkdir");
    run(Command::new("tar")
        .arg("xzf")
        .arg(image())
        .arg("-C")
        .arg(&rootfs));
    let marker = rootfs.join("run/cph-ready");
    // Names of their own: an OCI runtime puts a container without
    // `cgroupsPath` in a cgroup named after it, which must not be our
    // phones' parent.
    let pid = std::process::id();
    let guard = Cleanup {
        state: tmp.path().join("state"),
        parent: format!("cph-bench-{pid}"),
        oci_id: format!("cph-bench-oci-{pid}"),
        netns: format!("cph-bench-{pid}"),
        shim: shim(),
        _controllers: controllers.unwrap_or_else(V1Controllers::none),
    };
    let rt = Runtime::new(&guard.state, &guard.parent, &guard.shim).expect("runtime");
    // Phones of the platform join the network namespace their network was
    // plumbed in (it outlives restarts); a bare start makes a new one. Both
    // are measured, for every runtime.
    run(Command::new("ip").args(["netns", "add", &guard.netns]));
    let ns_path = Path::new("/run/netns").join(&guard.netns);
    let bundle = tmp.path().join("bundle");
    let bundle_ns = tmp.path().join("bundle-ns");
    for (dir, netns) in [(&bundle, None), (&bundle_ns, Some(ns_path.as_path()))] {
        std::fs::create_dir(dir).expect("mkdir bundle");
        oci_bundle(dir, &rootfs, netns);
    }
    let oci_id = guard.oci_id.clone();
    let spec = ContainerSpec::new("bench-phone", &rootfs);
    let mut spec_ns = spec.clone();
    spec_ns.netns = Some(ns_path.clone());
    // A phone in a user namespace of its own (idmapped rootfs), in the
    // phone's netns: what it costs next to the same start without one.
    let mut spec_users = spec_ns.clone();
    spec_users.user_ns = Some(UserNamespace {
        host_id: 1_500_000,
        size: 65_536,
    });

    let ours_start = |spec: &ContainerSpec, n: u64| -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..n {
            let _ = std::fs::remove_file(&marker);
            let t = Instant::now();
            rt.start(spec).expect("start");
            wait_ready(&marker);
            total += t.elapsed();
            rt.delete("bench-phone", Duration::from_secs(5))
                .expect("delete");
        }
        total
    };
    let oci_start = |oci: Oci, bundle: &Path, n: u64| -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..n {
            let _ = std::fs::remove_file(&marker);
            let t = Instant::now();
            oci.run(bundle, &oci_id);
            wait_ready(&marker);
            total += t.elapsed();
            oci.delete(&oci_id);
        }
        total
    };
    for (group, spec, bundle) in [
        ("start_to_ready", &spec, &bundle),
        ("start_to_ready_existing_netns", &spec_ns, &bundle_ns),
    ] {
        let mut group = c.benchmark_group(group);
        group.bench_function("ours", |b| b.iter_custom(|n| ours_start(spec, n)));
        for &oci in &anchors {
            group.bench_function(oci.tool, |b| b.iter_custom(|n| oci_start(oci, bundle, n)));
        }
        group.finish();
    }
    let users = match rt.start(&spec_users) {
        Ok(_) => {
            wait_ready(&marker);
            rt.delete("bench-phone", Duration::from_secs(5))
                .expect("delete");
            let mut group = c.benchmark_group("start_to_ready_own_user_namespace");
            group.bench_function("ours", |b| b.iter_custom(|n| ours_start(&spec_users, n)));
            group.finish();
            true
        }
        Err(e) => {
            eprintln!("container bench: no user-namespace start here: {e}");
            false
        }
    };

    // Exec round trips against a running phone of each kind.
    let times = |f: &dyn Fn()| -> Vec<Duration> {
        (0..15)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect()
    };
    rt.start(&spec).expect("start");
    wait_ready(&marker);
    let ours_exec = || {
        let out = rt
            .exec("bench-phone", &["true"], Duration::from_secs(5), 1024)
            .expect("exec");
        assert_eq!(out.exit_code, Some(0));
    };
    let mut group = c.benchmark_group("exec_round_trip");
    group.bench_function("ours", |b| b.iter(ours_exec));
    let ours_exec_times = times(&ours_exec);
    rt.delete("bench-phone", Duration::from_secs(5))
        .expect("delete");
    let mut oci_exec_times = Vec::new();
    for &oci in &anchors {
        let _ = std::fs::remove_file(&marker);
        oci.run(&bundle, &oci_id);
        wait_ready(&marker);
        group.bench_function(oci.tool, |b| b.iter(|| oci.exec(&oci_id)));
        oci_exec_times.push(times(&|| oci.exec(&oci_id)));
        oci.delete(&oci_id);
    }
    group.finish();

    let ours_ready = median((0..7).map(|_| ours_start(&spec, 1)).collect());
    let ours_ready_ns = median((0..7).map(|_| ours_start(&spec_ns, 1)).collect());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut metrics = Vec::new();
    for (&oci, exec_times) in anchors.iter().zip(oci_exec_times) {
        let ready = median((0..7).map(|_| oci_start(oci, &bundle, 1)).collect());
        let ready_ns = median((0..7).map(|_| oci_start(oci, &bundle_ns, 1)).collect());
        let tool = oci.tool;
        metrics.extend([
            Metric {
                metric: format!("start-to-ready, new netns (median), against {tool} run"),
                ours: ms(ours_ready),
                anchor: ms(ready),
                unit: "ms",
            },
            Metric {
                metric: format!(
                    "start-to-ready, joining the phone's netns (median), against {tool} run"
                ),
                ours: ms(ours_ready_ns),
                anchor: ms(ready_ns),
                unit: "ms",
            },
            Metric {
                metric: format!("exec round trip (median), against {tool} exec"),
                ours: ms(median(ours_exec_times.clone())),
                anchor: ms(median(exec_times)),
                unit: "ms",
            },
        ]);
    }
    if users {
        let with = median((0..7).map(|_| ours_start(&spec_users, 1)).collect());
        metrics.push(Metric {
            metric: "start-to-ready in a user namespace of its own (median), against the same \
                     start without one"
                .to_string(),
            ours: ms(with),
            anchor: ms(ours_ready_ns),
            unit: "ms",
        });
    }
    drop(guard);
    report::write("container", &metrics);
    c.final_summary();
}
