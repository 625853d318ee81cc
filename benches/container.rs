//! Phone start-to-ready and exec round trip, ours next to `runc run` and
//! `runc exec` of an equivalent OCI bundle on the same rootfs, in one run.
//! (crun refuses this host's hybrid cgroup layout, so runc is the anchor.)
//! Needs root; otherwise it says why and measures nothing.
//! Writes `target/bench-report/container.json`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cph_runtime::container::{ContainerSpec, Runtime};
use criterion::Criterion;

#[path = "common/report.rs"]
mod report;
use report::Metric;

#[path = "common/bins.rs"]
mod bins;
use bins::image;

/// `cph-shim` of this build, brought up to date.
fn shim() -> PathBuf {
    bins::built(&["cph-runtime"]).join("cph-shim")
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

/// `runc run --detach` of `bundle` as `id`. The detached container keeps
/// whatever it inherits open, so its output goes to a file, not a pipe;
/// runc's own errors are read back from that file when it fails.
fn runc_run(bundle: &Path, id: &str) {
    let log = bundle.join("runc.stderr");
    let file = std::fs::File::create(&log).expect("create runc log");
    let status = Command::new("runc")
        .args(["run", "--detach", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .status()
        .expect("spawn runc");
    assert!(
        status.success(),
        "runc run {id}: {status}: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// Writes a runc bundle whose config runs the test image's init on `rootfs`,
/// in a new network namespace or joining the one at `netns`.
fn runc_bundle(dir: &Path, rootfs: &Path, netns: Option<&Path>) {
    run(Command::new("runc").arg("spec").arg("--bundle").arg(dir));
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read config")).expect("json");
    cfg["root"]["path"] = serde_json::json!(rootfs);
    cfg["root"]["readonly"] = serde_json::json!(false);
    cfg["process"]["terminal"] = serde_json::json!(false);
    cfg["process"]["args"] = serde_json::json!(["/init"]);
    cfg["hostname"] = serde_json::json!("runc-phone");
    if let (Some(ns), Some(list)) = (netns, cfg["linux"]["namespaces"].as_array_mut()) {
        for n in list.iter_mut().filter(|n| n["type"] == "network") {
            n["path"] = serde_json::json!(ns);
        }
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).expect("json")).expect("write config");
}

/// What the bench leaves on the host, removed when it ends, panics
/// included: the runc container, our phone, our parent cgroup (in every
/// hierarchy) and the named network namespace.
struct Cleanup {
    state: PathBuf,
    parent: String,
    runc_id: String,
    netns: String,
    shim: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["delete", "--force", &self.runc_id])
            .stderr(Stdio::null())
            .status();
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
    if Command::new("runc").arg("--version").output().is_err() {
        eprintln!("SKIPPED container bench: runc is not installed (apt-get install runc)");
        return;
    }
    let mut c = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300))
        .configure_from_args();
    let tmp = tempfile::tempdir().expect("tempdir");
    let rootfs = tmp.path().join("rootfs");
    std::fs::create_dir(&rootfs).expect("mkdir");
    run(Command::new("tar")
        .arg("xzf")
        .arg(image())
        .arg("-C")
        .arg(&rootfs));
    let marker = rootfs.join("run/cph-ready");
    // Names of their own: runc puts a container without `cgroupsPath` in a
    // cgroup named after it, which must not be our phones' parent.
    let pid = std::process::id();
    let guard = Cleanup {
        state: tmp.path().join("state"),
        parent: format!("cph-bench-{pid}"),
        runc_id: format!("cph-bench-runc-{pid}"),
        netns: format!("cph-bench-{pid}"),
        shim: shim(),
    };
    let rt = Runtime::new(&guard.state, &guard.parent, &guard.shim).expect("runtime");
    // Phones of the platform join the network namespace their network was
    // plumbed in (it outlives restarts); a bare start makes a new one. Both
    // are measured, for both runtimes.
    run(Command::new("ip").args(["netns", "add", &guard.netns]));
    let ns_path = Path::new("/run/netns").join(&guard.netns);
    let bundle = tmp.path().join("bundle");
    let bundle_ns = tmp.path().join("bundle-ns");
    for (dir, netns) in [(&bundle, None), (&bundle_ns, Some(ns_path.as_path()))] {
        std::fs::create_dir(dir).expect("mkdir bundle");
        runc_bundle(dir, &rootfs, netns);
    }
    let runc_id = guard.runc_id.clone();
    let spec = ContainerSpec::new("bench-phone", &rootfs);
    let mut spec_ns = spec.clone();
    spec_ns.netns = Some(ns_path.clone());

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
    let runc_start = |bundle: &Path, n: u64| -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..n {
            let _ = std::fs::remove_file(&marker);
            let t = Instant::now();
            runc_run(bundle, &runc_id);
            wait_ready(&marker);
            total += t.elapsed();
            run(Command::new("runc").args(["delete", "--force", &runc_id]));
        }
        total
    };
    let mut group = c.benchmark_group("start_to_ready");
    group.bench_function("ours", |b| b.iter_custom(|n| ours_start(&spec, n)));
    group.bench_function("runc", |b| b.iter_custom(|n| runc_start(&bundle, n)));
    group.finish();
    let mut group = c.benchmark_group("start_to_ready_existing_netns");
    group.bench_function("ours", |b| b.iter_custom(|n| ours_start(&spec_ns, n)));
    group.bench_function("runc", |b| b.iter_custom(|n| runc_start(&bundle_ns, n)));
    group.finish();

    // Exec round trips against a running phone of each kind.
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
    let ours_exec_times: Vec<Duration> = (0..15)
        .map(|_| {
            let t = Instant::now();
            ours_exec();
            t.elapsed()
        })
        .collect();
    rt.delete("bench-phone", Duration::from_secs(5))
        .expect("delete");
    let _ = std::fs::remove_file(&marker);
    runc_run(&bundle, &runc_id);
    wait_ready(&marker);
    let runc_exec = || run(Command::new("runc").args(["exec", &runc_id, "true"]));
    group.bench_function("runc", |b| b.iter(runc_exec));
    group.finish();
    let runc_exec_times: Vec<Duration> = (0..15)
        .map(|_| {
            let t = Instant::now();
            runc_exec();
            t.elapsed()
        })
        .collect();
    run(Command::new("runc").args(["delete", "--force", &runc_id]));

    let ours_ready = median((0..7).map(|_| ours_start(&spec, 1)).collect());
    let runc_ready = median((0..7).map(|_| runc_start(&bundle, 1)).collect());
    let ours_ready_ns = median((0..7).map(|_| ours_start(&spec_ns, 1)).collect());
    let runc_ready_ns = median((0..7).map(|_| runc_start(&bundle_ns, 1)).collect());
    drop(guard);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    report::write(
        "container",
        &[
            Metric {
                metric: "start-to-ready, new netns (median)".to_string(),
                ours: ms(ours_ready),
                anchor: ms(runc_ready),
                unit: "ms",
            },
            Metric {
                metric: "start-to-ready, joining the phone's netns (median)".to_string(),
                ours: ms(ours_ready_ns),
                anchor: ms(runc_ready_ns),
                unit: "ms",
            },
            Metric {
                metric: "exec round trip (median)".to_string(),
                ours: ms(median(ours_exec_times)),
                anchor: ms(median(runc_exec_times)),
                unit: "ms",
            },
        ],
    );
    c.final_summary();
}
