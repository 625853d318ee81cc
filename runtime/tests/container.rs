//! Real phone containers from the test image: namespaces, cgroups, exec,
//! stop, re-adoption and clean-up. Privileged: skipped (with the reason
//! printed) where root or namespaces are not available.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use cph_runtime::container::{
    binder, netns, ContainerError, ContainerSpec, DeviceNode, Runtime, Status, UserNamespace,
};

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
        let _ = cph_runtime::container::remove_cgroup_parent(&self.parent);
    }
}

/// Whether this host's cgroups are the unified (v2) hierarchy alone. Where
/// the tests are meant to run on v2 (`CPH_EXPECT_CGROUP_V2=1`, the VM of
/// `scripts/cgroup-v2-vm.sh`), any other layout fails them.
fn unified() -> bool {
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    if std::env::var_os("CPH_EXPECT_CGROUP_V2").is_some_and(|v| v == "1") {
        assert!(
            v2,
            "cgroup v2 expected, but /sys/fs/cgroup is not the unified hierarchy"
        );
    }
    v2
}

/// `file` of the cgroup `path`: in controller `ctrl`'s hierarchy on v1, in
/// the unified hierarchy on v2.
fn cgroup_file(ctrl: &str, path: &str, file: &str) -> String {
    let root = Path::new("/sys/fs/cgroup");
    let dir = if unified() {
        root.join(path)
    } else {
        root.join(ctrl).join(path)
    };
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Whether the phone is refused the device `major:minor`: a node of it
/// cannot be made inside the phone (as its init could) or, made, cannot be
/// opened. The device cgroup refuses both; an allowed device shows that
/// the phone may make nodes at all.
fn device_refused(f: &Fixture, name: &str, major: u32, minor: u32) -> bool {
    let script = format!(
        "rm -f /tmp/dev-probe; mknod /tmp/dev-probe c {major} {minor} 2>&1 && \
         (: </tmp/dev-probe) 2>&1; rc=$?; rm -f /tmp/dev-probe; exit $rc"
    );
    let (out, code) = f.sh(name, &script);
    if code == Some(0) {
        return false;
    }
    assert!(
        out.contains("not permitted"),
        "device {major}:{minor}: {out}"
    );
    true
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
    if unified() {
        assert_eq!(cgroup_file("memory", &cg, "memory.max"), "268435456");
        assert_eq!(cgroup_file("memory", &cg, "memory.swap.max"), "0");
        // 512 shares on the v2 weight scale.
        assert_eq!(cgroup_file("cpu", &cg, "cpu.weight"), "20");
    } else {
        assert_eq!(
            cgroup_file("memory", &cg, "memory.limit_in_bytes"),
            "268435456"
        );
        assert_eq!(cgroup_file("cpu", &cg, "cpu.shares"), "512");
        assert!(cgroup_file("devices", &cg, "devices.list").contains("c 1:3 rwm"));
    }
    assert_eq!(cgroup_file("cpuset", &cg, "cpuset.cpus"), "0");
    assert_eq!(cgroup_file("pids", &cg, "pids.max"), "100");
    // The device allow-list at work: /dev/mem (1:1) refused, /dev/null
    // (1:3) allowed, whatever node the phone makes for them.
    assert!(device_refused(&f, &name, 1, 1), "/dev/mem was opened");
    assert!(!device_refused(&f, &name, 1, 3), "/dev/null was refused");

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
    // The views are the host's files, read-only to the phone.
    for view in [
        "/proc/cpuinfo",
        "/proc/meminfo",
        "/sys/devices/system/cpu/online",
    ] {
        let (_, code) = f.sh(&name, &format!("echo x >> {view}"));
        assert_ne!(code, Some(0), "{view} written");
    }
    assert_eq!(f.sh(&name, "grep -c ^processor /proc/cpuinfo").0, "1");
    let mut devs = f.sh(&name, "ls /dev | sort | tr '\\n' ' '").0;
    if binder::available() {
        for d in ["binder ", "binderfs ", "hwbinder ", "vndbinder "] {
            assert!(devs.contains(d), "{d}missing from {devs}");
            devs = devs.replacen(d, "", 1);
        }
    }
    assert_eq!(f.sh(&name, "grep -c '^cpu[0-9]' /proc/stat").0, "1");
    assert_eq!(f.sh(&name, "cat /sys/devices/system/cpu/present").0, "0");
    if tun {
        assert_eq!(devs, "full net null ptmx pts random shm tty urandom zero");
        assert!(
            !device_refused(&f, &name, 10, 200),
            "the tun device was refused"
        );
        assert_eq!(f.sh(&name, "test -c /dev/net/tun && echo yes").0, "yes");
    } else {
        assert_eq!(devs, "full null ptmx pts random shm tty urandom zero");
    }
    assert_eq!(f.sh(&name, "getprop ro.product.model").0, "cph-test");

    // Confined, init and what runs in the phone alike: seccomp on, no
    // capability for modules (16) or the clock (25) in the bounding set,
    // and a module insertion refused before the kernel reads the module
    // (unconfined, busybox is refused as an invalid module).
    let init_pid = f.rt.state(&name).expect("state").pid;
    let confined = |status: &str| {
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(str::trim)
                .unwrap_or_default()
                .to_string()
        };
        let bounding = u64::from_str_radix(&field("CapBnd:"), 16).expect("CapBnd");
        (
            field("Seccomp:"),
            bounding & (1 << 16 | 1 << 25),
            bounding & 1 << 21,
        )
    };
    let init_status =
        std::fs::read_to_string(format!("/proc/{init_pid}/status")).expect("init status");
    assert_eq!(confined(&init_status), ("2".to_string(), 0, 1 << 21));
    let (exec_status, _) = f.sh(&name, "cat /proc/self/status");
    assert_eq!(confined(&exec_status), ("2".to_string(), 0, 1 << 21));
    let (insmod, code) = f.sh(&name, "insmod /bin/busybox 2>&1");
    assert_ne!(code, Some(0));
    assert!(insmod.contains("Operation not permitted"), "{insmod}");
    // Nor may it freeze or thaw the filesystem beneath it, the host's
    // (unconfined, thawing a filesystem not frozen is refused as invalid;
    // the harmless half of the pair, should the filter fail).
    let (thaw, code) = f.sh(&name, "fsfreeze --unfreeze / 2>&1");
    assert_ne!(code, Some(0));
    assert!(thaw.contains("Operation not permitted"), "{thaw}");
    // What acts on the whole host is read-only (a sysctl written back as
    // it is fails), what shows the host's memory, keys and timers masked:
    // each of those this kernel has is a mount point of its own.
    let script = "for p in /proc/sys /proc/sysrq-trigger /proc/irq /proc/bus /proc/fs; do \
        [ -e $p ] && ! grep -q \" $p ro,\" /proc/self/mountinfo && echo \"$p writable\"; done; \
        for p in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug /proc/latency_stats \
        /proc/acpi /proc/scsi /sys/firmware; do \
        [ -e $p ] && ! grep -q \" $p \" /proc/self/mountinfo && echo \"$p shown\"; done; \
        cat /proc/sys/kernel/panic > /proc/sys/kernel/panic 2>/dev/null && echo 'sysctl written'; \
        echo checked";
    assert_eq!(f.sh(&name, script).0, "checked");
    // The network sysctls are the phone's namespace's, and writable.
    let host_forward =
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/lo/forwarding").expect("host sysctl");
    let flip = if host_forward.trim() == "1" { "0" } else { "1" };
    assert_eq!(
        f.sh(
            &name,
            &format!(
                "echo {flip} > /proc/sys/net/ipv4/conf/lo/forwarding && \
                 cat /proc/sys/net/ipv4/conf/lo/forwarding"
            )
        )
        .0,
        flip
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/conf/lo/forwarding").expect("host sysctl"),
        host_forward,
        "the host's own sysctl changed"
    );

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
    // A command that leaves a process in the background holding its
    // output ends at the deadline with what it wrote and its status; one
    // whose background process let go of the output ends at once, that
    // process left running.
    let started = Instant::now();
    let out =
        f.rt.exec(
            &name,
            &["sh", "-c", "sleep 30 & echo started"],
            Duration::from_millis(500),
            1024,
        )
        .expect("exec");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "held by its output"
    );
    assert_eq!(
        (out.stdout.as_slice(), out.exit_code, out.timed_out),
        (&b"started\n"[..], Some(0), false)
    );
    assert_eq!(f.sh(&name, "ps | grep '[s]leep 30' | wc -l").0, "0");
    let started = Instant::now();
    let out =
        f.rt.exec(
            &name,
            &["sh", "-c", "sleep 31 >/dev/null 2>&1 & echo detached"],
            Duration::from_secs(20),
            1024,
        )
        .expect("exec");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.stdout, b"detached\n");
    assert_eq!(f.sh(&name, "ps | grep '[s]leep 31' | wc -l").0, "1");
    f.sh(&name, "pkill -f 'sleep 31' || kill $(pidof sleep) ; true");
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

    // On v2 the phone (holding CAP_SYS_ADMIN) can make cgroups beneath its
    // own, as Android's init does for its apps: they go with it.
    if unified() {
        let (out, code) = f.sh(
            &name,
            "mkdir -p /run/cg && mount -t cgroup2 none /run/cg && \
             mkdir -p /run/cg/uid_0/pid_1 /run/cg/uid_1000 && umount /run/cg && echo made",
        );
        assert_eq!((out.as_str(), code), ("made", Some(0)));
    }

    // Stop: init exits 0 on SIGTERM, well within the grace period.
    let started = Instant::now();
    let status = f.rt.stop(&name, Duration::from_secs(5)).expect("stop");
    assert_eq!(status, Status::Exited { code: 0 });
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(
        cph_runtime::container::cgroups_named(&cg),
        Vec::<PathBuf>::new(),
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
    // Once its last phone is deleted, the parent cgroup leaves every
    // hierarchy, the named ones (`name=systemd`) included.
    let parent = f.parent.clone();
    assert!(
        !cph_runtime::container::cgroups_named(&parent).is_empty(),
        "parent cgroup made"
    );
    again.delete(&name, Duration::from_secs(5)).expect("delete");
    again.release_parent();
    assert_eq!(
        cph_runtime::container::cgroups_named(&parent),
        Vec::<PathBuf>::new()
    );
}

/// What a phone named `name` left on the host: cgroup dirs in any
/// controller, its state dir, mounts naming it, a shim process for it.
fn leftovers(f: &Fixture, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let cg = f.rt.cgroup_path(name);
    for p in cph_runtime::container::cgroups_named(&cg) {
        out.push(format!("cgroup {}", p.display()));
    }
    if f.state.join(name).exists() {
        out.push("state dir".to_string());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if mounts.lines().any(|l| l.contains(name)) {
        out.push("mount".to_string());
    }
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let shim = args
            .first()
            .is_some_and(|a| String::from_utf8_lossy(a).ends_with("cph-shim"));
        if shim && args.contains(&name.as_bytes()) {
            out.push(format!("shim process {:?}", e.file_name()));
        }
    }
    out
}

#[test]
fn bad_specs_fail_clearly_and_leave_nothing() {
    if !cph_runtime::privilege::check("bad_specs_fail_clearly_and_leave_nothing") {
        return;
    }
    let mut f = Fixture::new();
    let empty = tempfile::tempdir().expect("tempdir");
    type Check = fn(&ContainerError) -> bool;
    let cases: Vec<(ContainerSpec, Check)> = vec![
        (
            ContainerSpec::new(&unique("missing"), Path::new("/nonexistent/rootfs")),
            |e| matches!(e, ContainerError::RootfsMissing { .. }),
        ),
        (ContainerSpec::new(&unique("empty"), empty.path()), |e| {
            matches!(e, ContainerError::RootfsEmpty { .. })
        }),
        (
            {
                let mut s = f.spec(&unique("noexec"));
                s.init = vec!["/system/build.prop".into()];
                s
            },
            |e| matches!(e, ContainerError::InitNotExecutable { .. }),
        ),
        (
            {
                let mut s = f.spec(&unique("mem"));
                s.memory_limit = Some(1024);
                s
            },
            |e| matches!(e, ContainerError::MemoryTooLow { limit: 1024, .. }),
        ),
        (
            {
                let mut s = f.spec(&unique("cpus"));
                s.cpus = Some("999".into());
                s
            },
            |e| {
                matches!(
                    e,
                    ContainerError::NotOnHost {
                        field: "cpus",
                        missing: 999,
                        ..
                    }
                )
            },
        ),
        (
            {
                let mut s = f.spec(&unique("numa"));
                s.mems = Some("63".into());
                s
            },
            |e| {
                matches!(
                    e,
                    ContainerError::NotOnHost {
                        field: "mems",
                        missing: 63,
                        ..
                    }
                )
            },
        ),
        (
            {
                let mut s = f.spec(&unique("quick"));
                s.init = vec!["/bin/true".into()];
                s
            },
            |e| matches!(e, ContainerError::InitExited { code: 0, .. }),
        ),
        (
            {
                let mut s = f.spec(&unique("fails"));
                s.init = vec!["/bin/false".into()];
                s
            },
            |e| matches!(e, ContainerError::InitExited { code: 1, .. }),
        ),
        (
            {
                let mut s = f.spec(&unique("says"));
                s.init = vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "echo starting; echo no system partition >&2; exit 3".into(),
                ];
                s
            },
            |e| {
                matches!(e, ContainerError::InitExited { code: 3, console, .. }
                    if console == "starting / no system partition")
                    && e.to_string().ends_with("no system partition")
            },
        ),
        (ContainerSpec::new("bad/name", &f.rootfs), |e| {
            matches!(e, ContainerError::InvalidSpec { .. })
        }),
    ];
    // Under an emulated CPU (the VM of `scripts/cgroup-v2-vm.sh`), an init
    // that exits at once takes longer than the start's watch window.
    let emulated = std::env::var_os("CPH_EMULATED_CPU").is_some_and(|v| v == "1");
    for (spec, check) in cases {
        if emulated
            && matches!(
                spec.init.first().map(String::as_str),
                Some("/bin/true" | "/bin/false" | "/bin/sh")
            )
        {
            eprintln!("{}: left out under an emulated CPU", spec.name);
            continue;
        }
        let err = f.rt.start(&spec).expect_err("bad spec must fail");
        assert!(check(&err), "{}: unexpected error {err:?}", spec.name);
        assert!(
            err.to_string().contains(&spec.name),
            "error names the phone: {err}"
        );
        assert_eq!(
            leftovers(&f, &spec.name),
            Vec::<String>::new(),
            "{}",
            spec.name
        );
        // The failure is reported with its reason until the name is reused.
        match f.rt.state(&spec.name).expect("failed state").status {
            Status::Failed { reason } => assert_eq!(reason, err.to_string()),
            other => panic!("{}: {other:?}", spec.name),
        }
    }
    // A duplicate name while the first runs: refused, the first untouched.
    let name = unique("dup");
    let spec = f.spec(&name);
    let first = f.rt.start(&spec).expect("start");
    let err = f.rt.start(&spec).expect_err("duplicate");
    assert!(matches!(err, ContainerError::Exists { .. }), "{err}");
    let st = f.rt.state(&name).expect("state");
    assert_eq!((st.pid, st.status), (first.pid, Status::Running));
    f.rt.delete(&name, Duration::from_secs(5)).expect("delete");
    assert_eq!(leftovers(&f, &name), Vec::<String>::new());
}

/// Deletes a named network namespace made by `ip netns add`, whatever happens.
struct NetnsGuard(String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn phone_joins_a_named_network_namespace() {
    if !cph_runtime::privilege::check("phone_joins_a_named_network_namespace") {
        return;
    }
    let ns = unique("cphns");
    let made = std::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED phone_joins_a_named_network_namespace: ip netns add failed");
        return;
    }
    let _guard = NetnsGuard(ns.clone());
    let file = netns::path(&ns);
    let mut f = Fixture::new();
    let name = unique("netns");
    let mut spec = f.spec(&name);
    spec.netns = Some(file.clone());
    let st = f.rt.start(&spec).expect("start");
    f.wait_ready();
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(&file).expect("stat netns").ino();
    let link = std::fs::read_link(format!("/proc/{}/ns/net", st.pid)).expect("readlink");
    assert_eq!(link.to_string_lossy(), format!("net:[{ino}]"));
    // A link made in the namespace from the host is the phone's.
    let dummy = std::process::Command::new("ip")
        .args(["-n", &ns, "link", "add", "cphd0", "type", "dummy"])
        .status()
        .is_ok_and(|s| s.success());
    if dummy {
        assert!(f.sh(&name, "ls /sys/class/net").0.contains("cphd0"));
    }
    f.rt.delete(&name, Duration::from_secs(5)).expect("delete");
    assert!(file.exists(), "the namespace belongs to its creator");

    // The helper makes what ip netns makes; a file that is not a netns is refused.
    let own = unique("cphown");
    let p = netns::create(&own).expect("create netns");
    let ok = std::process::Command::new("ip")
        .args(["-n", &own, "link", "show", "lo"])
        .status()
        .is_ok_and(|s| s.success());
    netns::remove(&own).expect("remove netns");
    assert!(ok, "ip -n does not see the helper's namespace");
    assert!(!p.exists());
    let mut bad = f.spec(&unique("badns"));
    bad.netns = Some(f.rootfs.join("init"));
    let err = f.rt.start(&bad).expect_err("not a netns");
    assert!(matches!(err, ContainerError::InvalidSpec { .. }), "{err}");
}

#[test]
fn boot_properties_and_limits_are_visible_inside() {
    if !cph_runtime::privilege::check("boot_properties_and_limits_are_visible_inside") {
        return;
    }
    let mut f = Fixture::new();
    let name = unique("boot");
    let mut spec = f.spec(&name);
    let serial = unique("serial");
    spec.boot_properties
        .insert("serialno".into(), serial.clone());
    spec.boot_properties.insert("hardware".into(), "cph".into());
    // The host's last CPU, so the phone's CPU 0 is a renumbered one.
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").expect("online");
    let last = online
        .trim()
        .rsplit([',', '-'])
        .next()
        .expect("cpu")
        .to_string();
    spec.cpus = Some(last.clone());
    spec.memory_limit = Some(128 * 1024 * 1024);
    f.rt.start(&spec).expect("start");
    f.wait_ready();
    assert_eq!(f.sh(&name, "getprop ro.boot.serialno").0, serial);
    assert_eq!(f.sh(&name, "getprop ro.boot.hardware").0, "cph");
    let cmdline = f.sh(&name, "cat /proc/cmdline").0;
    assert!(
        cmdline.contains(&format!("androidboot.serialno={serial}")),
        "{cmdline}"
    );
    let init = f.sh(&name, "tr '\\0' ' ' < /proc/1/cmdline").0;
    assert!(init.contains("androidboot.hardware=cph"), "{init}");

    assert_eq!(
        f.sh(&name, "grep MemTotal /proc/meminfo | tr -s ' '").0,
        "MemTotal: 131072 kB"
    );
    assert_eq!(f.sh(&name, "cat /sys/devices/system/cpu/online").0, "0");
    assert_eq!(f.sh(&name, "cat /sys/devices/system/cpu/possible").0, "0");
    assert_eq!(
        f.sh(&name, "grep ^processor /proc/cpuinfo | tr -d ' \\t'")
            .0,
        "processor:0"
    );
    let stat = f
        .sh(&name, "grep ^cpu /proc/stat | cut -d' ' -f1 | tr '\\n' ' '")
        .0;
    assert_eq!(stat, "cpu cpu0");
    assert!(f.sh(&name, "grep -c ^btime /proc/stat").0 == "1");
    assert_eq!(f.sh(&name, "nproc").0, "1");
}

#[test]
fn memory_view_follows_use_inside() {
    if !cph_runtime::privilege::check("memory_view_follows_use_inside") {
        return;
    }
    let mut f = Fixture::new();
    let name = unique("memview");
    let mut spec = f.spec(&name);
    spec.memory_limit = Some(256 * 1024 * 1024);
    f.rt.start(&spec).expect("start");
    f.wait_ready();
    let field = |f: &Fixture, key: &str| -> u64 {
        let line = f.sh(&name, &format!("grep ^{key}: /proc/meminfo")).0;
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    };
    assert_eq!(field(&f, "MemTotal"), 256 * 1024);
    let before = field(&f, "MemFree");
    // 96 MiB written to the phone's own tmpfs is charged to its cgroup.
    let (_, code) = f.sh(
        &name,
        "dd if=/dev/zero of=/dev/shm/fill bs=1M count=96 2>/dev/null",
    );
    assert_eq!(code, Some(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = field(&f, "MemFree");
        if before.saturating_sub(now) >= 80 * 1024 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "MemFree stayed at {now} kB (was {before} kB) after using 96 MiB"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(field(&f, "MemAvailable") <= 256 * 1024);
    f.sh(&name, "rm /dev/shm/fill");
}

#[test]
fn init_console_is_kept_in_a_capped_rotated_log() {
    if !cph_runtime::privilege::check("init_console_is_kept_in_a_capped_rotated_log") {
        return;
    }
    use cph_runtime::container::shim::CONSOLE_LOG_MAX;
    let mut f = Fixture::new();
    let name = unique("console");
    let spec = f.spec(&name);
    f.rt.start(&spec).expect("start");
    f.wait_ready();
    // A phone writing to its init's console without end (2.5 logs' worth
    // here, then a last line) fills no more than two logs on the host.
    let total = CONSOLE_LOG_MAX * 5 / 2;
    let (_, code) = f.sh(
        &name,
        &format!(
            "head -c {total} /dev/zero | tr '\\0' x > /proc/1/fd/1 && \
             echo last-line > /proc/1/fd/1"
        ),
    );
    assert_eq!(code, Some(0));
    let log = f.state.join(&name).join("console.log");
    let older = f.state.join(&name).join("console.log.1");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read(&log).unwrap_or_default();
        if text.ends_with(b"last-line\n") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the last line never reached the log ({} bytes)",
            text.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    assert_eq!(size(&older), CONSOLE_LOG_MAX, "the rotated log");
    assert!(size(&log) < CONSOLE_LOG_MAX, "{} bytes", size(&log));
    let entries = std::fs::read_dir(f.state.join(&name))
        .expect("state dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("console"))
        .count();
    assert_eq!(entries, 2, "console logs kept");
    // The phone still runs and its console still reaches the log.
    let (_, code) = f.sh(&name, "echo after > /proc/1/fd/2");
    assert_eq!(code, Some(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read(&log)
        .unwrap_or_default()
        .ends_with(b"after\n")
    {
        assert!(
            Instant::now() < deadline,
            "later output never reached the log"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn phones_get_their_own_binder_devices() {
    if !cph_runtime::privilege::check("phones_get_their_own_binder_devices") {
        return;
    }
    if !binder::available() {
        eprintln!(
            "SKIPPED phones_get_their_own_binder_devices: host kernel has no binderfs (no binder in /proc/filesystems)"
        );
        return;
    }
    let mut f = Fixture::new();
    let a = unique("bindera");
    let b = unique("binderb");
    let spec_a = f.spec(&a);
    let spec_b = f.spec(&b);
    f.rt.start(&spec_a).expect("start a");
    f.rt.start(&spec_b).expect("start b");
    let nodes = |n: &str| {
        let (out, code) = f.sh(
            n,
            "for d in binder hwbinder vndbinder; do test -c /dev/$d || exit 9; stat -L -c '%t:%T' /dev/$d; done",
        );
        assert_eq!(code, Some(0), "{n}: binder devices missing");
        out
    };
    let (na, nb) = (nodes(&a), nodes(&b));
    assert_ne!(na, nb, "phones share binder devices");
}

/// Keyrings named `desc` that this process may see in `/proc/keys`.
fn keyrings_named(desc: &str) -> usize {
    std::fs::read_to_string("/proc/keys")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(7) == Some(&"keyring") && f.get(8).and_then(|d| d.strip_suffix(':')) == Some(desc)
        })
        .count()
}

/// A phone's init holds a session keyring of its own, named for the phone,
/// and each process started in it another, never the one the runtime was
/// started with, which every phone would otherwise share.
#[test]
fn phones_get_session_keyrings_of_their_own() {
    if !cph_runtime::privilege::check("phones_get_session_keyrings_of_their_own") {
        return;
    }
    if !Path::new("/proc/keys").exists() {
        eprintln!("SKIPPED phones_get_session_keyrings_of_their_own: the kernel has no keyrings");
        return;
    }
    let mut f = Fixture::new();
    let name = unique("keys");
    let spec = f.spec(&name);
    f.rt.start(&spec).expect("start");
    f.wait_ready();
    let desc = cph_runtime::container::keyring_name(&name);
    assert_eq!(keyrings_named(&desc), 1, "init's keyring {desc}");
    std::thread::scope(|s| {
        let running = s.spawn(|| f.sh(&name, "sleep 5"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while keyrings_named(&desc) < 2 {
            assert!(Instant::now() < deadline, "no keyring for the exec");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(running.join().expect("exec").1, Some(0));
    });
}

#[test]
fn state_changes_are_reported() {
    if !cph_runtime::privilege::check("state_changes_are_reported") {
        return;
    }
    let mut f = Fixture::new();
    let name = unique("events");
    let spec = f.spec(&name);
    let mut seen = std::collections::BTreeMap::new();
    assert!(f.rt.changes(&mut seen).expect("changes").is_empty());
    let st = f.rt.start(&spec).expect("start");
    let ch = f.rt.changes(&mut seen).expect("changes");
    assert_eq!(ch.len(), 1);
    assert_eq!(
        (ch[0].old.clone(), ch[0].new.clone()),
        (None, Some(Status::Running))
    );
    assert!(f.rt.changes(&mut seen).expect("changes").is_empty());
    f.wait_ready();
    f.rt.pause(&name).expect("pause");
    let ch = f.rt.changes(&mut seen).expect("changes");
    assert_eq!(ch[0].new, Some(Status::Paused));
    f.rt.resume(&name).expect("resume");
    f.rt.changes(&mut seen).expect("changes");
    // init killed from outside: exited with 128 + SIGKILL, as the shim recorded.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(st.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(5);
    let change = loop {
        let ch = f.rt.changes(&mut seen).expect("changes");
        if let Some(c) = ch.into_iter().next() {
            break c;
        }
        assert!(Instant::now() < deadline, "exit not reported");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        matches!(change.new, Some(Status::Exited { code }) if code == 137 || code == -1),
        "{change:?}"
    );
    f.rt.delete(&name, Duration::from_secs(1)).expect("delete");
    let ch = f.rt.changes(&mut seen).expect("changes");
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].new, None);
    // A failed start is reported with its reason.
    let mut bad = f.spec(&name);
    bad.init = vec!["/bin/false".into()];
    let err = f.rt.start(&bad).expect_err("fails");
    let ch = f.rt.changes(&mut seen).expect("changes");
    assert_eq!(
        ch[0].new,
        Some(Status::Failed {
            reason: err.to_string()
        })
    );
}

/// Whether `path` is on ext4, xfs or btrfs, which every kernel this
/// project supports can mount idmapped.
fn idmappable(path: &Path) -> bool {
    let out = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .expect("stat -f");
    let fs = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ["ext2/ext3", "xfs", "btrfs"].contains(&fs.as_str())
}

/// Runs one phone with a user namespace of its own, in a new network
/// namespace or (`named`) a named one; false when the filesystem of the
/// test's rootfs cannot be mounted idmapped on this kernel.
fn run_in_own_user_namespace(named: bool) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ns = unique("cphuns");
    let _guard = named.then(|| NetnsGuard(ns.clone()));
    let mut f = Fixture::new();
    let name = unique("userns");
    let mut spec = f.spec(&name);
    let host_id = 1_000_000 + (std::process::id() % 2048) * 131_072 + u32::from(named) * 65_536;
    spec.user_ns = Some(UserNamespace {
        host_id,
        size: 65_536,
    });
    // A read-only share of the host's (as the sharepool is).
    let share = tempfile::tempdir().expect("tempdir");
    std::fs::write(share.path().join("app.apk"), "apk\n").expect("write");
    spec.mounts.push(cph_runtime::container::BindMount {
        source: share.path().to_path_buf(),
        target: PathBuf::from("/data/share"),
        read_only: true,
    });
    if named {
        let made = std::process::Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .is_ok_and(|s| s.success());
        assert!(made, "ip netns add {ns}");
        let veth = std::process::Command::new("ip")
            .args([
                "-n", &ns, "link", "add", "cphu0", "type", "veth", "peer", "cphu1",
            ])
            .status()
            .is_ok_and(|s| s.success());
        assert!(veth, "veth pair in {ns}");
        spec.netns = Some(netns::path(&ns));
    }
    let st = match f.rt.start(&spec) {
        Ok(st) => st,
        // Skipped only where the rootfs's filesystem may lack idmapped
        // mounts (the VM's tmpfs on 6.1); ext4, xfs and btrfs have them.
        Err(e)
            if e.to_string().contains("cannot be mounted idmapped") && !idmappable(&f.rootfs) =>
        {
            eprintln!("SKIPPED user namespace phone: {e}");
            assert!(
                leftovers(&f, &name).is_empty(),
                "{:?}",
                leftovers(&f, &name)
            );
            return false;
        }
        Err(e) => panic!("start with a user namespace: {e}"),
    };
    f.wait_ready();

    // Outside, every process of the phone is the unprivileged host user.
    let status = std::fs::read_to_string(format!("/proc/{}/status", st.pid)).expect("status");
    for key in ["Uid:", "Gid:"] {
        let line = status.lines().find(|l| l.starts_with(key)).expect(key);
        let ids: Vec<&str> = line.split_whitespace().skip(1).collect();
        assert!(
            ids.iter().all(|id| *id == host_id.to_string()),
            "{line} (host id {host_id})"
        );
    }
    // Inside (init's and exec's alike): root, over the phone's own map.
    let (map, _) = f.sh(&name, "cat /proc/self/uid_map /proc/1/gid_map");
    let map: Vec<String> = map
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let want = format!("0 {host_id} 65536");
    assert_eq!(map, [want.clone(), want], "uid and gid maps");
    let (ids, _) = f.sh(&name, "grep -E '^(Uid|Gid):' /proc/self/status");
    for line in ids.lines() {
        assert!(
            line.split_whitespace().skip(1).all(|id| id == "0"),
            "exec is not root inside: {line}"
        );
    }
    // The idmapped root: the image's files are root's inside, and what the
    // phone's root writes is stored as uid 0 (init wrote the ready file).
    assert_eq!(f.sh(&name, "stat -c %u:%g /init").0, "0:0");
    assert_eq!(
        f.sh(
            &name,
            "echo x > /etc/userns-probe && stat -c %u /etc/userns-probe"
        ),
        ("0".to_string(), Some(0))
    );
    for file in ["run/cph-ready", "etc/userns-probe"] {
        let meta = std::fs::metadata(f.rootfs.join(file)).expect(file);
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{file} on disk");
    }
    // The share reads, and stays read-only: the phone's root cannot
    // remount it writable (its flags are locked), so nothing it writes
    // reaches the host's copy every phone shares.
    assert_eq!(
        f.sh(&name, "cat /data/share/app.apk"),
        ("apk".to_string(), Some(0))
    );
    let (out, code) = f.sh(
        &name,
        "mount -o remount,bind,rw /data/share 2>&1; echo x > /data/share/planted 2>&1",
    );
    assert_ne!(code, Some(0), "wrote into the read-only share: {out}");
    assert!(
        !share.path().join("planted").exists(),
        "the phone's write reached the host's share"
    );
    // No host privileges: not even a /dev/null node can be made, while
    // the bound /dev/null works.
    assert!(device_refused(&f, &name, 1, 3), "mknod in a user namespace");
    assert_eq!(f.sh(&name, "echo hi >/dev/null && echo ok").0, "ok");
    // sysfs shows the phone's own network namespace.
    let (links, _) = f.sh(&name, "ls /sys/class/net | tr '\\n' ' '");
    let links: Vec<&str> = links.split_whitespace().collect();
    if named {
        assert_eq!(links, ["cphu0", "cphu1", "lo"], "links of {ns}");
    } else {
        assert_eq!(links, ["lo"], "links of a new netns");
    }
    f.rt.delete(&name, Duration::from_secs(5)).expect("delete");
    assert!(
        leftovers(&f, &name).is_empty(),
        "{:?}",
        leftovers(&f, &name)
    );
    true
}

#[test]
fn phone_runs_in_its_own_user_namespace() {
    if !cph_runtime::privilege::check("phone_runs_in_its_own_user_namespace") {
        return;
    }
    if run_in_own_user_namespace(false) {
        run_in_own_user_namespace(true);
    }

    // A range that would map the host's root, or none, is refused.
    let mut f = Fixture::new();
    for (host_id, size) in [(0, 65_536), (100_000, 0), (u32::MAX - 10, 65_536)] {
        let mut spec = f.spec(&unique("badusers"));
        spec.user_ns = Some(UserNamespace { host_id, size });
        let err = f.rt.start(&spec).expect_err("bad id range");
        assert!(matches!(err, ContainerError::InvalidSpec { .. }), "{err}");
    }
}

/// Bind mounts land beneath the phone's root whatever links the phone
/// planted on their way: a link out of the root (absolute, or climbing
/// with `..`) makes the start fail and creates nothing outside; a link
/// that stays inside is followed; a file mount point is made as a file.
#[test]
fn mount_points_never_lead_out_of_the_root() {
    if !cph_runtime::privilege::check("mount_points_never_lead_out_of_the_root") {
        return;
    }
    let mut f = Fixture::new();
    let outside = tempfile::tempdir().expect("tempdir");
    let source = tempfile::tempdir().expect("tempdir");
    std::fs::write(source.path().join("shared.txt"), "shared\n").expect("write");
    let bind = |target: &str| cph_runtime::container::BindMount {
        source: source.path().to_path_buf(),
        target: PathBuf::from(target),
        read_only: true,
    };
    let escape = outside.path().join("planted");
    std::fs::create_dir_all(f.rootfs.join("data")).expect("mkdir");
    std::os::unix::fs::symlink(&escape, f.rootfs.join("data/abs")).expect("symlink");
    std::os::unix::fs::symlink("../../../../../../../../..", f.rootfs.join("data/up"))
        .expect("symlink");
    for target in [
        "/data/abs/x".to_string(),
        format!("/data/up{}/x", outside.path().display()),
    ] {
        let name = unique("mlink");
        let mut spec = f.spec(&name);
        spec.mounts.push(bind(&target));
        let err = f.rt.start(&spec).expect_err("a link out of the root");
        assert!(err.to_string().contains("mount point"), "{err}");
        assert_eq!(
            std::fs::read_dir(outside.path()).expect("ls").count(),
            0,
            "{target}: something was made outside"
        );
    }
    // A link inside the root is followed; a file source gets a file point.
    std::fs::create_dir(f.rootfs.join("data/real")).expect("mkdir");
    std::os::unix::fs::symlink("real", f.rootfs.join("data/inner")).expect("symlink");
    let name = unique("mlink");
    let mut spec = f.spec(&name);
    spec.mounts.push(bind("/data/inner/share"));
    spec.mounts.push(cph_runtime::container::BindMount {
        source: source.path().join("shared.txt"),
        target: PathBuf::from("/data/one.txt"),
        read_only: true,
    });
    f.rt.start(&spec).expect("start");
    f.wait_ready();
    let (out, code) = f.sh(&name, "cat /data/real/share/shared.txt /data/one.txt");
    assert_eq!((out.as_str(), code), ("shared\nshared", Some(0)));
    let (_, code) = f.sh(&name, "echo x > /data/real/share/new");
    assert_ne!(code, Some(0), "read-only");
}
