//! A phone's storage and network end to end, through the real `cph-agent
//! run` and the agent protocol: each phone's rootfs is an overlay volume of
//! the pool (two phones do not see each other's writes, a reset restores the
//! image); each phone has its own network namespace with its address, and a
//! TCP connection to its mapped access port on the host reaches a listener
//! inside it; bandwidth limits and traffic diversion change tc classes and
//! routes; an agent restart reconciles without duplicates; deleting the
//! server leaves no namespace, veth, nftables element or volume. A second
//! test runs a phone on a btrfs pool (loop-backed file) with networking off
//! and a third with it on, both in user namespaces of their own.
//! Names are unique per process and guards remove everything whatever
//! happens.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    delete_server, http, image, job, mounts_under, run_job, server_job, wait_job, TestAgent,
};
use serde_json::{json, Value};

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a sync shell in the phone; returns (status, execute_msg).
fn sh(addr: &str, token: &str, server: &str, phone: &str, id: &str, cmd: &str) -> (i64, String) {
    let (code, st) = http(
        addr,
        "POST",
        "/v1/jobs",
        token,
        Some(&job(
            id,
            server,
            phone,
            json!({"kind": "sync_shell", "command": cmd, "timeout_ms": 2000}),
        )),
    );
    assert_eq!(code, 200, "{st}");
    (
        st["status"].as_i64().unwrap_or(0),
        st["execute_msg"].as_str().unwrap_or("").to_string(),
    )
}

/// Submits a job and waits for it to succeed.
fn ok_job(addr: &str, token: &str, body: Value) -> Value {
    let st = run_job(addr, token, &body);
    assert_eq!(st["status"], 2, "{st}");
    st
}

fn phones(addr: &str, token: &str) -> Vec<Value> {
    let (code, v) = http(addr, "GET", "/v1/phones", token, None);
    assert_eq!(code, 200, "{v}");
    v.as_array().cloned().unwrap_or_default()
}

fn phone<'a>(all: &'a [Value], id: &str) -> &'a Value {
    all.iter()
        .find(|p| p["phone_id"] == id)
        .unwrap_or_else(|| panic!("phone {id} missing in {all:?}"))
}

fn access(p: &Value, kind: &str) -> (String, u16) {
    let a = p["access_infos"]
        .as_array()
        .and_then(|v| v.iter().find(|a| a["type"] == kind))
        .unwrap_or_else(|| panic!("no {kind} access info in {p}"));
    (
        a["phone_ip"].as_str().expect("phone ip").to_string(),
        a["access_port"].as_u64().expect("access port") as u16,
    )
}

/// Sends a line to `to` and reads the echo, retrying while the listener
/// comes up.
fn echo(to: SocketAddr, msg: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(format!("{msg}\n").as_bytes())?;
            let mut buf = vec![0u8; msg.len() + 1];
            s.read_exact(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf).trim().to_string())
        })();
        match attempt {
            Ok(text) => return text,
            Err(e) if Instant::now() < deadline => {
                eprintln!("echo via {to}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("echo via {to}: {e}"),
        }
    }
}

fn netns_name(phone: &str) -> String {
    format!("cph-{phone}")
}

fn tc_classes(bridge: &str) -> String {
    run("tc", &["class", "show", "dev", bridge])
}

fn nft_map(table: &str, map: &str) -> String {
    run("nft", &["list", "map", "ip", table, map])
}

/// Elements of an nft map listing (the `elements = { a : b, ... }` part).
fn map_elements(listing: &str) -> usize {
    listing
        .split_once("elements = {")
        .and_then(|(_, rest)| rest.split_once('}'))
        .map_or(0, |(items, _)| items.matches(" : ").count())
}

#[test]
fn phones_get_volumes_and_networks_of_their_own() {
    if !cph_runtime::privilege::check("phones_get_volumes_and_networks_of_their_own") {
        return;
    }
    let mut t = TestAgent::start("lifecycle", true, "[storage]\nbackend = \"overlay\"\n");
    let (addr, token, pid) = (t.addr.clone(), t.token.clone(), std::process::id());
    let state = t.state.clone();
    let net = t.net.clone().expect("network");
    let (_, inv) = http(&addr, "GET", "/v1/inventory", &token, None);
    let missing = inv["missing"].to_string();
    assert!(!missing.contains("phone networking"), "{missing}");
    let server_ip: std::net::Ipv4Addr = inv["server_ip"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("server ip in {inv}"));
    assert!(!server_ip.is_loopback(), "{inv}");

    let server = format!("ls{pid}");
    let (a, b) = (format!("la{pid}"), format!("lb{pid}"));
    let create = json!({
        "server_id": server, "server_name": "lifecycle",
        "flavor": {"flavor_id": "dev", "vcpus": 1, "memory_mb": 256, "disk_gb": 1, "phone_capacity": 2,
                    "core_bind_strategy": "dev_small", "extend_spec": {}},
        "image": {"image_id": "img", "url": format!("file://{}", image().display())},
        "ports": [{"name": "web", "listen_port": 20000, "internet_accessible": true}],
        "band_width_size": 10, "public_key": null,
        "phones": [
            {"phone_id": a, "phone_name": "phone-a", "slot": 0,
             "property": {"com.cph.bandwidth_limit": "5000"}},
            {"phone_id": b, "phone_name": "phone-b", "slot": 1, "property": {}}
        ]
    });
    let (code, body) = http(&addr, "POST", "/v1/servers", &token, Some(&create));
    assert_eq!(code, 200, "{body}");
    for p in [&a, &b] {
        let st = wait_job(&addr, &token, &format!("{server}:create:{p}"));
        assert_eq!(st["status"], 2, "{st}");
    }
    let all = phones(&addr, &token);
    for p in [&a, &b] {
        assert_eq!(phone(&all, p)["state"], "running", "{all:?}");
    }

    // Storage: each rootfs is an overlay mount of the pool.
    let pool = state.join("pool");
    for p in [&a, &b] {
        let root = pool.join("volumes").join(p).join("rootfs");
        assert!(
            mounts_under(&pool).contains(&root),
            "{} is not mounted",
            root.display()
        );
    }
    assert!(pool.join("images/img/system/build.prop").is_file());
    // Writes stay in their phone.
    let (st, _) = sh(
        &addr,
        &token,
        &server,
        &a,
        "w-a",
        "echo mine > /data/only-a",
    );
    assert_eq!(st, 2);
    let (_, seen) = sh(&addr, &token, &server, &a, "r-a", "cat /data/only-a");
    assert_eq!(seen.trim(), "mine");
    let (_, other) = sh(
        &addr,
        &token,
        &server,
        &b,
        "r-b",
        "cat /data/only-a 2>/dev/null || echo absent",
    );
    assert_eq!(other.trim(), "absent");
    assert!(pool
        .join("volumes")
        .join(&a)
        .join("upper/data/only-a")
        .is_file());
    assert!(!pool.join("images/img/data/only-a").exists());

    // Network: own namespace with its address, distinct per phone.
    let (ip_a, web_a) = access(phone(&all, &a), "web");
    let (ip_b, web_b) = access(phone(&all, &b), "web");
    assert_ne!(ip_a, ip_b);
    assert_ne!(web_a, web_b);
    for (p, ip) in [(&a, &ip_a), (&b, &ip_b)] {
        assert!(ip.starts_with(&format!("{}.", net.subnet_prefix)), "{ip}");
        let ns = netns_name(p);
        assert!(Path::new("/run/netns").join(&ns).exists());
        let inside = run(
            "ip",
            &["-n", &ns, "-4", "-o", "addr", "show", "dev", "eth0"],
        );
        assert!(inside.contains(&format!("{ip}/24")), "{inside}");
        let (_, in_phone) = sh(
            &addr,
            &token,
            &server,
            p,
            &format!("ip-{p}"),
            "ip -4 -o addr show dev eth0",
        );
        assert!(in_phone.contains(ip.as_str()), "{in_phone}");
        for kind in ["adb", "vnc"] {
            let (_, port) = access(phone(&all, p), kind);
            assert!((net.port_first..=net.port_last).contains(&port));
        }
    }
    assert_eq!(net.veths().len(), 2, "{:?}", net.veths());

    // A TCP connection to the access port on the host reaches the phone.
    let (st, msg) = sh(
        &addr,
        &token,
        &server,
        &a,
        "nc-a",
        "nc -ll -p 20000 -e /bin/cat </dev/null >/dev/null 2>&1 &",
    );
    assert_eq!(st, 2, "{msg}");
    assert_eq!(
        echo(SocketAddr::from((server_ip, web_a)), "ping-a"),
        "ping-a"
    );
    let public = nft_map(&net.table, "public_ports");
    assert!(
        public.contains(&format!("{server_ip} . {web_a} : {ip_a} . 20000")),
        "{public}"
    );
    let private = nft_map(&net.table, "private_ports");
    let (_, adb_a) = access(phone(&all, &a), "adb");
    assert!(
        private.contains(&format!("{server_ip} . {adb_a} : {ip_a} . 5555")),
        "{private}"
    );

    // Bandwidth: phone a is capped at its property, phone b at the server.
    let classes = tc_classes(&net.bridge);
    assert!(classes.contains("ceil 5Mbit"), "{classes}");
    assert!(classes.contains("rate 10Mbit ceil 10Mbit"), "{classes}");
    ok_job(
        &addr,
        &token,
        job(
            "bw-prop",
            &server,
            &a,
            json!({"kind": "update_property", "property": {"com.cph.bandwidth_limit": "8000"}}),
        ),
    );
    let classes = tc_classes(&net.bridge);
    assert!(classes.contains("ceil 8Mbit"), "{classes}");
    assert!(!classes.contains("ceil 5Mbit"), "{classes}");
    ok_job(
        &addr,
        &token,
        server_job(
            "bw-shared",
            &server,
            json!({"kind": "update_bandwidth", "band_width_size": 20}),
        ),
    );
    let classes = tc_classes(&net.bridge);
    assert!(classes.contains("rate 20Mbit ceil 20Mbit"), "{classes}");

    // Traffic diversion: this flavor has no encoding server to route
    // through (tests/encoder.rs routes through one), so the phone keeps its
    // route; a bad type is refused.
    let ns_a = netns_name(&a);
    let gw = format!("{}.1", net.subnet_prefix);
    let st = run_job(
        &addr,
        &token,
        &job(
            "tr-1",
            &server,
            &a,
            json!({"kind": "set_traffic", "traffic_type": "routing"}),
        ),
    );
    assert_eq!(st["error_code"], "CPS.0208", "{st}");
    let route = run("ip", &["-n", &ns_a, "route", "show", "default"]);
    assert!(route.contains(&format!("via {gw}")), "{route}");
    assert_eq!(phone(&phones(&addr, &token), &a)["traffic_type"], "direct");
    ok_job(
        &addr,
        &token,
        job(
            "tr-2",
            &server,
            &a,
            json!({"kind": "set_traffic", "traffic_type": "direct"}),
        ),
    );
    let route = run("ip", &["-n", &ns_a, "route", "show", "default"]);
    assert!(route.contains(&format!("via {gw}")), "{route}");
    let st = run_job(
        &addr,
        &token,
        &job(
            "tr-3",
            &server,
            &a,
            json!({"kind": "set_traffic", "traffic_type": "sideways"}),
        ),
    );
    assert_eq!(st["error_code"], "CPS.0207", "{st}");

    // Reset restores the image; the network stays as it was.
    ok_job(
        &addr,
        &token,
        job(
            "reset-a",
            &server,
            &a,
            json!({"kind": "reset_phone", "image": null, "property": null}),
        ),
    );
    let (_, after) = sh(
        &addr,
        &token,
        &server,
        &a,
        "r-a2",
        "cat /data/only-a 2>/dev/null || echo absent",
    );
    assert_eq!(after.trim(), "absent");
    let all = phones(&addr, &token);
    assert_eq!(phone(&all, &a)["state"], "running");
    assert_eq!(access(phone(&all, &a), "web"), (ip_a.clone(), web_a));

    // A new flavor (more memory): the running phone restarts on it, the
    // stopped one takes it at its next start; the network stays.
    let mem_total = |p: &str, id: &str| {
        let (st, out) = sh(&addr, &token, &server, p, id, "head -n 1 /proc/meminfo");
        assert_eq!(st, 2, "{out}");
        out.split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(mem_total(&a, "mem-a0"), (256 * 1024).to_string());
    ok_job(
        &addr,
        &token,
        job("stop-b", &server, &b, json!({"kind": "stop_phone"})),
    );
    let mut flavor = create["flavor"].clone();
    flavor["flavor_id"] = json!("dev-more");
    flavor["memory_mb"] = json!(384);
    // A smaller disk keeps the volumes' larger cap.
    flavor["disk_gb"] = json!(0);
    let st = ok_job(
        &addr,
        &token,
        server_job(
            "flavor-1",
            &server,
            json!({"kind": "change_flavor", "server_model_name": "dev", "flavor": flavor}),
        ),
    );
    let msg = st["execute_msg"].as_str().unwrap_or_default();
    assert!(
        msg.ends_with("flavor dev-more (was dev), 1 running phones restarted on it"),
        "{msg}"
    );
    assert_eq!(mem_total(&a, "mem-a1"), (384 * 1024).to_string());
    let all = phones(&addr, &token);
    assert_eq!(phone(&all, &a)["state"], "running");
    assert_eq!(phone(&all, &b)["state"], "stopped");
    assert_eq!(access(phone(&all, &a), "web"), (ip_a.clone(), web_a));
    ok_job(
        &addr,
        &token,
        job("start-b", &server, &b, json!({"kind": "start_phone"})),
    );
    assert_eq!(mem_total(&b, "mem-b1"), (384 * 1024).to_string());
    // A flavor with room for fewer phones than the server has changes
    // nothing.
    let mut small = flavor.clone();
    small["flavor_id"] = json!("dev-one");
    small["phone_capacity"] = json!(1);
    small["memory_mb"] = json!(128);
    let st = run_job(
        &addr,
        &token,
        &server_job(
            "flavor-2",
            &server,
            json!({"kind": "change_flavor", "server_model_name": "dev", "flavor": small}),
        ),
    );
    assert_eq!(st["error_code"], "CPS.0257", "{st}");
    assert_eq!(mem_total(&a, "mem-a2"), (384 * 1024).to_string());

    // A restarted agent reconciles in place: nothing doubled, still reachable.
    let before = (
        map_elements(&nft_map(&net.table, "public_ports")),
        map_elements(&nft_map(&net.table, "private_ports")),
        tc_classes(&net.bridge).lines().count(),
    );
    t.agent.restart();
    let after = (
        map_elements(&nft_map(&net.table, "public_ports")),
        map_elements(&nft_map(&net.table, "private_ports")),
        tc_classes(&net.bridge).lines().count(),
    );
    assert_eq!(before, after);
    assert_eq!(before.0, 2);
    assert_eq!(before.1, 4);
    assert_eq!(net.veths().len(), 2);
    let (st, _) = sh(
        &addr,
        &token,
        &server,
        &b,
        "nc-b",
        "nc -ll -p 20000 -e /bin/cat </dev/null >/dev/null 2>&1 &",
    );
    assert_eq!(st, 2);
    assert_eq!(
        echo(SocketAddr::from((server_ip, web_b)), "ping-b"),
        "ping-b"
    );

    // Deleting the server leaves nothing behind.
    let st = delete_server(&addr, &token, &server);
    assert_eq!(st["status"], 2, "{st}");
    for p in [&a, &b] {
        assert!(!Path::new("/run/netns").join(netns_name(p)).exists());
    }
    assert!(phones(&addr, &token).is_empty());
    assert!(net.veths().is_empty(), "{:?}", net.veths());
    assert_eq!(map_elements(&nft_map(&net.table, "public_ports")), 0);
    assert_eq!(map_elements(&nft_map(&net.table, "private_ports")), 0);
    assert_eq!(map_elements(&nft_map(&net.table, "phone_class")), 0);
    let classes = tc_classes(&net.bridge);
    assert_eq!(
        classes.lines().count(),
        1,
        "only the server class: {classes}"
    );
    let volumes: Vec<_> = std::fs::read_dir(pool.join("volumes"))
        .expect("volumes dir")
        .collect();
    assert!(volumes.is_empty(), "{volumes:?}");
    assert!(
        !mounts_under(&pool)
            .iter()
            .any(|m| m.starts_with(pool.join("volumes"))),
        "{:?}",
        mounts_under(&pool)
    );
}

/// Whether this host can make btrfs pools (tools and kernel).
/// Creates a server of the development flavor with one phone (port 20000
/// named `web`) and waits for the phone's creation to succeed.
fn create_one_phone_server(addr: &str, token: &str, server: &str, phone_id: &str) {
    create_one_phone_server_with(addr, token, server, phone_id, json!({}));
}

/// [`create_one_phone_server`] with the flavor's `extend_spec`.
fn create_one_phone_server_with(
    addr: &str,
    token: &str,
    server: &str,
    phone_id: &str,
    extend_spec: Value,
) {
    let create = json!({
        "server_id": server, "server_name": server,
        "flavor": {"flavor_id": "dev", "vcpus": 1, "memory_mb": 256, "disk_gb": 1, "phone_capacity": 1,
                    "core_bind_strategy": "dev_small", "extend_spec": extend_spec},
        "image": {"image_id": "img", "url": format!("file://{}", image().display())},
        "ports": [{"name": "web", "listen_port": 20000, "internet_accessible": true}],
        "band_width_size": 10, "public_key": null,
        "phones": [{"phone_id": phone_id, "phone_name": "phone-1", "slot": 0, "property": {}}]
    });
    let (code, body) = http(addr, "POST", "/v1/servers", token, Some(&create));
    assert_eq!(code, 200, "{body}");
    let st = wait_job(addr, token, &format!("{server}:create:{phone_id}"));
    assert_eq!(st["status"], 2, "{st}");
}

/// The host uid of a phone's init (from the runtime's state of it).
fn init_uid(t: &TestAgent, phone_id: &str) -> String {
    let rt = cph_runtime::container::Runtime::new(&t.state.join("containers"), &t.parent, &t.shim)
        .expect("runtime");
    let pid = rt
        .state(&cph_agent::daemon::phones::container_name(phone_id))
        .expect("phone container")
        .pid;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("init status");
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
    uid.split_whitespace().nth(1).unwrap_or("").to_string()
}

/// A number per call, for unique job ids.
fn out_counter() -> u32 {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
}

fn btrfs_available(test: &str) -> bool {
    let tools = Command::new("mkfs.btrfs").arg("--version").output().is_ok();
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !tools || !fs.contains("btrfs") {
        eprintln!("SKIPPED {test}: mkfs.btrfs or the btrfs kernel module is missing");
        return false;
    }
    true
}

#[test]
fn btrfs_volumes_and_phones_without_a_network() {
    let name = "btrfs_volumes_and_phones_without_a_network";
    if !cph_runtime::privilege::check(name) || !btrfs_available(name) {
        return;
    }
    let t = TestAgent::start(
        "lifecycle-bt",
        false,
        "[storage]\nbackend = \"btrfs\"\npool_size_gb = 1\n\
         [user_namespaces]\nenabled = true\nfirst_host_id = 2000000\n",
    );
    let (addr, token, pid) = (t.addr.clone(), t.token.clone(), std::process::id());
    let state = t.state.clone();
    let (_, inv) = http(&addr, "GET", "/v1/inventory", &token, None);
    assert!(
        inv["missing"]
            .to_string()
            .contains("phone networking (disabled by config)"),
        "{inv}"
    );

    let server = format!("bs{pid}");
    let phone_id = format!("bp{pid}");
    create_one_phone_server(&addr, &token, &server, &phone_id);
    let all = phones(&addr, &token);
    let p = phone(&all, &phone_id);
    assert_eq!(p["state"], "running", "{p}");
    assert_eq!(p["access_infos"], json!([]), "{p}");

    // The phone has a user namespace of its own: its init is host user
    // 2000000, root inside, and so is a shell job.
    let in_own_users = || {
        assert_eq!(init_uid(&t, &phone_id), "2000000");
        let (st, out) = sh(
            &addr,
            &token,
            &server,
            &phone_id,
            &format!("ids-{}", out_counter()),
            "cat /proc/self/uid_map; id -u",
        );
        assert_eq!(st, 2, "{out}");
        let words: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(words, ["0", "2000000", "131072", "0"], "{out}");
    };
    in_own_users();

    // The volume is a btrfs subvolume of the pool mounted under the state dir.
    let vol = state.join("pool/volumes").join(&phone_id);
    let fstype = run("stat", &["-f", "-c", "%T", &vol.to_string_lossy()]);
    assert_eq!(fstype.trim(), "btrfs");
    let ino = run("stat", &["-c", "%i", &vol.to_string_lossy()]);
    assert_eq!(ino.trim(), "256", "a subvolume root has inode 256");
    let (st, _) = sh(
        &addr,
        &token,
        &server,
        &phone_id,
        "w",
        "echo x > /data/mark",
    );
    assert_eq!(st, 2);
    assert!(vol.join("data/mark").is_file());
    // Written by the phone's root, stored as uid 0 (the idmapped root).
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(vol.join("data/mark"))
            .expect("mark")
            .uid(),
        0
    );
    // The data volume grows, never shrinks.
    let expand = |id: &str, gb: u64| {
        let req = job(
            id,
            &server,
            &phone_id,
            json!({"kind": "expand_volume", "disk_gb": gb}),
        );
        http(&addr, "POST", "/v1/jobs", &token, Some(&req));
        wait_job(&addr, &token, id)
    };
    let st = expand("grow", 3);
    assert_eq!(st["status"], 2, "{st}");
    assert!(
        st["execute_msg"]
            .as_str()
            .is_some_and(|m| m.contains("3 GiB (was 1 GiB)")),
        "{st}"
    );
    let st = expand("shrink", 2);
    assert_eq!(
        (st["status"].as_i64(), st["error_code"].as_str()),
        (Some(-1), Some("CPS.0001")),
        "{st}"
    );
    ok_job(
        &addr,
        &token,
        job(
            "reset",
            &server,
            &phone_id,
            json!({"kind": "reset_phone", "image": null, "property": null}),
        ),
    );
    assert!(!vol.join("data/mark").exists());
    // A reset phone keeps its user namespace.
    in_own_users();
    // And its grown volume.
    let meta = std::fs::read_to_string(state.join("pool/meta").join(format!("{phone_id}.json")))
        .expect("volume metadata");
    assert!(
        meta.contains(&format!("\"disk_size_bytes\":{}", 3u64 << 30)),
        "{meta}"
    );

    // Network jobs fail cleanly; the phone keeps running.
    http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&job(
            "tr",
            &server,
            &phone_id,
            json!({"kind": "set_traffic", "traffic_type": "direct"}),
        )),
    );
    let st = wait_job(&addr, &token, "tr");
    assert_eq!(st["status"], -1, "{st}");
    assert_eq!(st["error_code"], "CPS.0003", "{st}");
    assert_eq!(phone(&phones(&addr, &token), &phone_id)["state"], "running");

    let st = delete_server(&addr, &token, &server);
    assert_eq!(st["status"], 2, "{st}");
    assert!(!vol.exists());
    assert!(state.join("pool/images/img").is_dir(), "images stay");
}

#[test]
fn a_phone_in_its_own_user_namespace_on_the_phone_network() {
    let name = "a_phone_in_its_own_user_namespace_on_the_phone_network";
    if !cph_runtime::privilege::check(name) || !btrfs_available(name) {
        return;
    }
    let t = TestAgent::start(
        "lifecycle-un",
        true,
        "[storage]\nbackend = \"btrfs\"\npool_size_gb = 1\n\
         [user_namespaces]\nenabled = true\nfirst_host_id = 4000000\n",
    );
    let (addr, token, pid) = (t.addr.clone(), t.token.clone(), std::process::id());
    let (_, inv) = http(&addr, "GET", "/v1/inventory", &token, None);
    let server_ip: std::net::Ipv4Addr = inv["server_ip"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("server ip in {inv}"));
    let server = format!("us{pid}");
    let phone_id = format!("up{pid}");
    // With an encoding server, which gets a user namespace of its own too.
    let encoder = json!({"encode_server_spec": {"cpu": 1, "memory": 128, "disk": 1}});
    create_one_phone_server_with(&addr, &token, &server, &phone_id, encoder);
    let st = wait_job(&addr, &token, &format!("{server}:encoder"));
    assert_eq!(st["status"], 2, "{st}");
    let encoder_id = cph_agent::daemon::phones::encoder_id(&server);
    let mut uids = [init_uid(&t, &phone_id), init_uid(&t, &encoder_id)];
    uids.sort();
    assert_eq!(uids, ["4000000", "4131072"]);
    let phone_ids = init_uid(&t, &phone_id);

    // Root inside its own id range; its sysfs is that of the phone's
    // network namespace (the host's user namespace owns that one).
    let (st, who) = sh(
        &addr,
        &token,
        &server,
        &phone_id,
        "who",
        "id -u; head -c 40 /proc/self/uid_map; ls /sys/class/net | tr '\\n' ' '",
    );
    assert_eq!(st, 2, "{who}");
    let who: Vec<&str> = who.split_whitespace().collect();
    assert_eq!(
        who,
        ["0", "0", phone_ids.as_str(), "131072", "eth0", "lo"],
        "{who:?}"
    );
    // The sharepool is not idmapped: its directories (the agent's, host
    // root's) show the overflow id, so the phone's root, which could
    // remount it writable, has no right to write there.
    let (st, owners) = sh(
        &addr,
        &token,
        &server,
        &phone_id,
        "share-owner",
        "stat -c %u:%g /data/media/share/files /data/media/share/apps",
    );
    assert_eq!(st, 2, "{owners}");
    assert_eq!(
        owners.split_whitespace().collect::<Vec<_>>(),
        ["65534:65534", "65534:65534"]
    );
    let (_, wrote) = sh(
        &addr,
        &token,
        &server,
        &phone_id,
        "share-write",
        "mount -o remount,bind,rw /data/media/share/files 2>/dev/null; \
         touch /data/media/share/files/planted 2>/dev/null && echo wrote || echo refused",
    );
    assert_eq!(wrote.trim(), "refused");
    // Its access port reaches a listener inside it.
    let (_, web) = access(phone(&phones(&addr, &token), &phone_id), "web");
    let (st, msg) = sh(
        &addr,
        &token,
        &server,
        &phone_id,
        "nc",
        "nc -ll -p 20000 -e /bin/cat </dev/null >/dev/null 2>&1 &",
    );
    assert_eq!(st, 2, "{msg}");
    assert_eq!(echo(SocketAddr::from((server_ip, web)), "ping-u"), "ping-u");

    let st = delete_server(&addr, &token, &server);
    assert_eq!(st["status"], 2, "{st}");
    let kept = t.state.join("encoders");
    assert!(
        std::fs::read_dir(&kept).map_or(true, |mut d| d.next().is_none()),
        "the encoder's id range is still kept in {}",
        kept.display()
    );
}

/// A whole server made by one `create_server` job (a server switched to
/// this host): the phones run, the server's key opens the host's SSH
/// access and is in each phone; a server whose phones cannot be made fails
/// the job, naming them.
#[test]
fn a_server_made_by_one_job() {
    if !cph_runtime::privilege::check("a_server_made_by_one_job") {
        return;
    }
    let t = TestAgent::start("mkserver", false, "[storage]\nbackend = \"overlay\"\n");
    let (addr, token, pid) = (t.addr.clone(), t.token.clone(), std::process::id());
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMadeByOneJob test@cph";
    let server_of = |server: &str, image: &str, url: String, phones: &[String]| {
        json!({
            "server_id": server, "server_name": server,
            "flavor": {"flavor_id": "dev", "vcpus": 1, "memory_mb": 256, "disk_gb": 1,
                       "phone_capacity": phones.len(), "core_bind_strategy": "dev_small",
                       "extend_spec": {}},
            "image": {"image_id": image, "url": url},
            "ports": [], "band_width_size": 10, "public_key": key,
            "phones": phones.iter().enumerate().map(|(slot, id)| json!({
                "phone_id": id, "phone_name": format!("p{slot}"), "slot": slot, "property": {}
            })).collect::<Vec<_>>()
        })
    };
    let server = format!("ms{pid}");
    let ids = [format!("ma{pid}"), format!("mb{pid}")];
    let made = ok_job(
        &addr,
        &token,
        server_job(
            &format!("make-{pid}"),
            &server,
            json!({"kind": "create_server",
                   "server": server_of(&server, "img", format!("file://{}", image().display()), &ids)}),
        ),
    );
    assert_eq!(
        made["execute_msg"],
        format!("server {server} made on this host, 2 phones created")
    );
    let all = phones(&addr, &token);
    for id in &ids {
        assert_eq!(phone(&all, id)["state"], "running", "{all:?}");
        let (code, out) = sh(
            &addr,
            &token,
            &server,
            id,
            &format!("k-{id}"),
            "cat /data/misc/adb/adb_keys",
        );
        assert_eq!((code, out.trim()), (2, key));
    }
    let keys = std::fs::read_to_string(t.state.join("ssh/authorized_keys")).expect("keys");
    assert_eq!(keys.trim(), key);

    // An image that is not there: no phone is made; the job says which.
    let broken = format!("mx{pid}");
    let lost = [format!("mc{pid}")];
    let st = run_job(
        &addr,
        &token,
        &server_job(
            &format!("make-broken-{pid}"),
            &broken,
            json!({"kind": "create_server",
                   "server": server_of(&broken, "img-gone", "file:///nonexistent/image.tar".into(), &lost)}),
        ),
    );
    assert_eq!(st["status"], -1, "{st}");
    let msg = st["error_msg"].as_str().unwrap_or("");
    assert!(
        msg.starts_with("0 of 1 phones created; not created: ") && msg.contains(&lost[0]),
        "{st}"
    );
    for s in [&server, &broken] {
        assert_eq!(delete_server(&addr, &token, s)["status"], 2);
    }
    assert!(phones(&addr, &token).is_empty());
}

/// A share file system attached to a server is in its running phones
/// (restarted) at `/data/media/sfs/<id>`, read-write; detached, it is gone;
/// a source that is not a directory of the host is refused.
#[test]
fn a_share_filesystem_attached_and_detached() {
    if !cph_runtime::privilege::check("a_share_filesystem_attached_and_detached") {
        return;
    }
    let t = TestAgent::start("sharefs", false, "[storage]\nbackend = \"overlay\"\n");
    let (addr, token, pid) = (t.addr.clone(), t.token.clone(), std::process::id());
    let server = format!("fs{pid}");
    let phone_id = format!("fp{pid}");
    create_one_phone_server(&addr, &token, &server, &phone_id);
    let source = tempfile::tempdir().expect("tempdir");
    std::fs::write(source.path().join("level.dat"), "level 1\n").expect("write");
    let fs = |source: &Path| json!({"fs_id": "games", "source": source.to_string_lossy()});
    let st = run_job(
        &addr,
        &token,
        &server_job(
            &format!("bad-{pid}"),
            &server,
            json!({"kind": "attach_share_fs", "fs": fs(Path::new("/nonexistent/sfs"))}),
        ),
    );
    assert_eq!(
        (st["status"].as_i64(), st["error_code"].as_str()),
        (Some(-1), Some("CPS.0104")),
        "{st}"
    );
    let st = ok_job(
        &addr,
        &token,
        server_job(
            &format!("attach-{pid}"),
            &server,
            json!({"kind": "attach_share_fs", "fs": fs(source.path())}),
        ),
    );
    assert_eq!(
        st["execute_msg"],
        "share file system games attached at /data/media/sfs/games; 1 running phones restarted"
    );
    let (code, out) = sh(
        &addr,
        &token,
        &server,
        &phone_id,
        "s1",
        "cat /data/media/sfs/games/level.dat && echo saved > /data/media/sfs/games/save",
    );
    assert_eq!((code, out.as_str()), (2, "level 1\n"));
    assert_eq!(
        std::fs::read_to_string(source.path().join("save")).expect("written by the phone"),
        "saved\n"
    );
    ok_job(
        &addr,
        &token,
        server_job(
            &format!("detach-{pid}"),
            &server,
            json!({"kind": "detach_share_fs", "fs_id": "games"}),
        ),
    );
    let (_, out) = sh(
        &addr,
        &token,
        &server,
        &phone_id,
        "s2",
        "ls /data/media/sfs/games 2>&1; true",
    );
    assert!(!out.contains("level.dat"), "{out}");
    let st = run_job(
        &addr,
        &token,
        &server_job(
            &format!("again-{pid}"),
            &server,
            json!({"kind": "detach_share_fs", "fs_id": "games"}),
        ),
    );
    assert_eq!(st["error_code"], "CPS.0001", "{st}");
    assert_eq!(delete_server(&addr, &token, &server)["status"], 2);
}
