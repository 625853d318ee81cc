//! Real phone containers from the test image: namespaces, cgroups, exec,
//! stop, re-adoption and clean-up. Privileged: skipped (with the reason
//! printed) where root or namespaces are not available.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cph_runtime::container::{ContainerError, ContainerSpec, DeviceNode, Runtime, Status};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

fn image() -> PathBuf {
    if let Some(p) = std::env::var_os("CPH_TEST_IMAGE") {
        return PathBuf::from(p);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = repo.join("target/images/cph-test-image.tar.gz");
    if !path.exists() {
        let ok = std::process::Command::new(repo.join("image/build-test-image.sh"))
            .arg(&path)
            .status()
            .expect("run build-test-image.sh")
            .success();
        assert!(ok, "building the test image failed");
    }
    path
}

/// A phone's rootfs, a runtime over a private state dir, and a guard that
/// deletes the phone whatever happens.
struct Fixture {
    _tmp: tempfile::TempDir,
    rootfs: PathBuf,
    state: PathBuf,
    rt: Runtime,
    parent: String,
    names: Vec<String>,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let rootfs = tmp.path().join("rootfs");
        std::fs::create_dir(&rootfs).expect("mkdir rootfs");
        let ok = std::process::Command::new("tar")
            .arg("xzf")
            .arg(image())
            .arg("-C")
            .arg(&rootfs)
            .status()
            .expect("tar")
            .success();
        assert!(ok, "extracting the test image failed");
        let state = tmp.path().join("state");
        let parent = unique("cph-test");
        let rt = Runtime::new(&state, &parent, Path::new(env!("CARGO_BIN_EXE_cph-shim")))
            .expect("runtime");
        Self {
            _tmp: tmp,
            rootfs,
            state,
            rt,
            parent,
            names: Vec::new(),
        }
    }

    fn spec(&mut self, name: &str) -> ContainerSpec {
        self.names.push(name.to_string());
        ContainerSpec::new(name, &self.rootfs)
    }

    fn wait_ready(&self) {
        let ready = self.rootfs.join("run/cph-ready");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "phone never became ready");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn sh(&self, name: &str, script: &str) -> (String, Option<i32>) {
        let out = self
            .rt
            .exec(
                name,
                &["sh", "-c", script],
                Duration::from_secs(10),
                1 << 20,
            )
            .expect("exec");
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            out.exit_code,
        )
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = self.rt.delete(n, Duration::from_millis(500));
        }
        for ctrl in [
            "cpuset", "cpu", "memory", "pids", "devices", "freezer", "cpuacct", "blkio",
        ] {
            let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(ctrl).join(&self.parent));
        }
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup/unified").join(&self.parent));
    }
}

fn cgroup_file(ctrl: &str, path: &str, file: &str) -> String {
    std::fs::read_to_string(Path::new("/sys/fs/cgroup").join(ctrl).join(path).join(file))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn phone_runs_isolated_with_its_limits_and_stops_cleanly() {
    if !cph_runtime::privilege::check("phone_runs_isolated_with_its_limits_and_stops_cleanly") {
        return;
    }
    let mut f = Fixture::new();
    let name = unique("phone");
    let mut spec = f.spec(&name);
    spec.cpus = Some("0".to_string());
    spec.mems = Some("0".to_string());
    spec.memory_limit = Some(256 * 1024 * 1024);
    spec.pids_limit = Some(100);
    spec.cpu_shares = Some(512);
    // An extra device the host has (tun stands in for binder, fuse, render nodes).
    let tun = Path::new("/dev/net/tun").exists();
    if tun {
        spec.devices.push(DeviceNode {
            path: "/dev/net/tun".into(),
        });
    }
    let st = f.rt.start(&spec).expect("start");
    assert_eq!(st.status, Status::Running);
    f.wait_ready();

    // Limits in the cgroup files.
    let cg = f.rt.cgroup_path(&name);
    assert_eq!(
        cgroup_file("memory", &cg, "memory.limit_in_bytes"),
        "268435456"
    );
    assert_eq!(cgroup_file("cpuset", &cg, "cpuset.cpus"), "0");
    assert_eq!(cgroup_file("pids", &cg, "pids.max"), "100");
    assert_eq!(cgroup_file("cpu", &cg, "cpu.shares"), "512");
    assert!(cgroup_file("devices", &cg, "devices.list").contains("c 1:3 rwm"));

    // Inside: init is PID 1, hostname, limits as seen by the phone, /dev.
    // PID 1 is the image's init (a script, so its interpreter runs it).
    let init = f.sh(&name, "cat /proc/1/cmdline | tr '\\0' ' '").0;
    assert!(init.ends_with("/init"), "pid 1 is {init:?}");
    assert_eq!(f.sh(&name, "hostname").0, name);
    assert_eq!(
        f.sh(&name, "grep MemTotal /proc/meminfo | tr -s ' '").0,
        "MemTotal: 262144 kB"
    );
    assert_eq!(f.sh(&name, "cat /sys/devices/system/cpu/online").0, "0");
    assert_eq!(f.sh(&name, "grep -c ^processor /proc/cpuinfo").0, "1");
    let devs = f.sh(&name, "ls /dev | sort | tr '\\n' ' '").0;
    if tun {
        assert_eq!(devs, "full net null ptmx pts random shm tty urandom zero");
        assert!(cgroup_file("devices", &cg, "devices.list").contains("c 10:200 rwm"));
        assert_eq!(f.sh(&name, "test -c /dev/net/tun && echo yes").0, "yes");
    } else {
        assert_eq!(devs, "full null ptmx pts random shm tty urandom zero");
    }
    assert_eq!(f.sh(&name, "getprop ro.product.model").0, "cph-test");

    // Exit codes and the timeout that kills the exec's whole tree.
    assert_eq!(f.sh(&name, "exit 7").1, Some(7));
    let started = Instant::now();
    let out =
        f.rt.exec(
            &name,
            &["sh", "-c", "sleep 30 & sleep 30"],
            Duration::from_millis(300),
            1024,
        )
        .expect("exec");
    assert!(out.timed_out);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        f.sh(&name, "ps | grep '[s]leep 30' | wc -l").0,
        "0",
        "timed-out exec left processes"
    );
    let out =
        f.rt.exec(
            &name,
            &["sh", "-c", "head -c 5000 /dev/zero"],
            Duration::from_secs(5),
            100,
        )
        .expect("exec");
    assert_eq!(out.stdout.len(), 100);
    assert!(out.truncated);

    // Pause and resume through the freezer.
    f.rt.pause(&name).expect("pause");
    assert_eq!(f.rt.state(&name).expect("state").status, Status::Paused);
    f.rt.resume(&name).expect("resume");
    assert_eq!(f.rt.state(&name).expect("state").status, Status::Running);

    // Stop: init exits 0 on SIGTERM, well within the grace period.
    let started = Instant::now();
    let status = f.rt.stop(&name, Duration::from_secs(5)).expect("stop");
    assert_eq!(status, Status::Exited { code: 0 });
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(
        !Path::new("/sys/fs/cgroup/memory").join(&cg).exists(),
        "cgroup left behind"
    );
    let err =
        f.rt.exec(&name, &["true"], Duration::from_secs(1), 10)
            .expect_err("stopped");
    assert!(matches!(err, ContainerError::NotRunning { .. }), "{err}");

    // Start again on the same rootfs, then delete.
    f.rt.start(&spec).expect("restart");
    f.rt.delete(&name, Duration::from_secs(5)).expect("delete");
    assert!(!f.state.join(&name).exists());
}

#[test]
fn phones_outlive_the_runtime_handle_and_are_adopted() {
    if !cph_runtime::privilege::check("phones_outlive_the_runtime_handle_and_are_adopted") {
        return;
    }
    let mut f = Fixture::new();
    let name = unique("adopt");
    let spec = f.spec(&name);
    let first = f.rt.start(&spec).expect("start");
    f.wait_ready();
    let again = Runtime::new(
        &f.state,
        &f.parent,
        Path::new(env!("CARGO_BIN_EXE_cph-shim")),
    )
    .expect("runtime");
    let st = again.state(&name).expect("adopted");
    assert_eq!(st.pid, first.pid);
    assert_eq!(st.status, Status::Running);
    assert_eq!(again.list().expect("list").len(), 1);
    let out = again
        .exec(&name, &["hostname"], Duration::from_secs(5), 100)
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), name);
    // A killed init is seen as exited, never as a live stale pid.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(st.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = again.state(&name).expect("state").status;
        if matches!(s, Status::Exited { .. }) {
            break;
        }
        assert!(Instant::now() < deadline, "kill not observed: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_specs_fail_clearly_and_leave_nothing() {
    if !cph_runtime::privilege::check("bad_specs_fail_clearly_and_leave_nothing") {
        return;
    }
    let mut f = Fixture::new();
    let empty = tempfile::tempdir().expect("tempdir");
    let cases: Vec<(ContainerSpec, &str)> = vec![
        (
            ContainerSpec::new(&unique("missing"), Path::new("/nonexistent/rootfs")),
            "is not a directory",
        ),
        (
            ContainerSpec::new(&unique("empty"), empty.path()),
            "is empty",
        ),
        (
            {
                let mut s = f.spec(&unique("noexec"));
                s.init = vec!["/system/build.prop".into()];
                s
            },
            "not an executable",
        ),
        (
            {
                let mut s = f.spec(&unique("mem"));
                s.memory_limit = Some(1024);
                s
            },
            "below the minimum",
        ),
        (
            {
                let mut s = f.spec(&unique("cpus"));
                s.cpus = Some("999".into());
                s
            },
            "not online",
        ),
        (
            {
                let mut s = f.spec(&unique("quick"));
                s.init = vec!["/bin/true".into()];
                s
            },
            "exited at once",
        ),
        (ContainerSpec::new("bad/name", &f.rootfs), "must be 1-63"),
    ];
    for (spec, want) in cases {
        let err = f.rt.start(&spec).expect_err("bad spec must fail");
        assert!(err.to_string().contains(want), "{}: {err}", spec.name);
        assert!(
            err.to_string().contains(&spec.name),
            "error names the phone: {err}"
        );
        assert!(
            !f.state.join(&spec.name).exists(),
            "{}: state left behind",
            spec.name
        );
        let cg = Path::new("/sys/fs/cgroup/memory").join(f.rt.cgroup_path(&spec.name));
        assert!(!cg.exists(), "{}: cgroup left behind", spec.name);
    }
    // A duplicate name while the first runs.
    let name = unique("dup");
    let spec = f.spec(&name);
    f.rt.start(&spec).expect("start");
    let err = f.rt.start(&spec).expect_err("duplicate");
    assert!(matches!(err, ContainerError::Exists { .. }), "{err}");
}
