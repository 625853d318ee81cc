//! The encoding server of a flavor with `encode_server_spec`, through the
//! real `cph-agent` and its protocol: it comes up with the server as a
//! container at the subnet's encoder address with forwarding on; a phone
//! switched to `routing` sends its traffic to the host through it (its
//! forwarded-packet counter moves); the restart job gives it a new init;
//! deleting the server removes container and namespace. Privileged.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use cph_runtime::container::Runtime;
use serde_json::json;

mod common;

use common::{delete_server, http, image, job, server_job, wait_job, TestAgent};

/// `Ip: ForwDatagrams` of the namespace at `netns` (/proc/net/snmp).
fn forwarded(netns: &Path) -> u64 {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["cat", "/proc/net/snmp"])
        .output()
        .expect("nsenter");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
    let (head, values) = (ip.next().expect("Ip header"), ip.next().expect("Ip values"));
    let col = head
        .split_whitespace()
        .position(|h| h == "ForwDatagrams")
        .expect("ForwDatagrams column");
    values
        .split_whitespace()
        .nth(col)
        .and_then(|v| v.parse().ok())
        .expect("ForwDatagrams value")
}

/// A listener on `port` of the network namespace at `netns` (bound by a
/// thread that enters it).
fn listen_in(netns: &Path, port: u16) -> TcpListener {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&netns).expect("netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        TcpListener::bind(("0.0.0.0", port)).expect("bind in the namespace")
    })
    .join()
    .expect("listener thread")
}

fn in_netns(netns: &Path, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .output()
        .expect("nsenter");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn encoding_server_runs_routes_restarts_and_goes_with_its_server() {
    if !cph_runtime::privilege::check(
        "encoding_server_runs_routes_restarts_and_goes_with_its_server",
    ) {
        return;
    }
    let mut t = TestAgent::start("enc", true, "");
    let (addr, token, pid) = (t.addr.clone(), t.token.clone(), std::process::id());
    let (state, parent, shim) = (&t.state, &t.parent, &t.shim);
    let net = t.net.clone().expect("network");

    let server = format!("es{pid}");
    let phone = format!("ep{pid}");
    let create = json!({
        "server_id": server, "server_name": "enc",
        "flavor": {"flavor_id": "dev", "vcpus": 1, "memory_mb": 256, "disk_gb": 1, "phone_capacity": 1,
                   "core_bind_strategy": "dev_small",
                   "extend_spec": {"encode_server_spec": {"cpu": 1, "memory": 128, "disk": 1, "port_num": 2}}},
        "image": {"image_id": "img", "url": format!("file://{}", image().display())},
        "ports": [], "band_width_size": 100, "public_key": null,
        "phones": [{"phone_id": phone, "phone_name": "phone-1", "slot": 0, "property": {}}]
    });
    let (code, body) = http(&addr, "POST", "/v1/servers", &token, Some(&create));
    assert_eq!(code, 200, "{body}");
    let st = wait_job(&addr, &token, &format!("{server}:encoder"));
    assert_eq!(st["status"], 2, "{st}");
    let st = wait_job(&addr, &token, &format!("{server}:create:{phone}"));
    assert_eq!(st["status"], 2, "{st}");

    // The container runs at the subnet's last host address, forwarding.
    let enc_name = format!("cph-enc-{server}");
    let enc_ns = Path::new("/run/netns").join(&enc_name);
    let enc_ip = format!("{}.254", net.subnet_prefix);
    let (_, inv) = http(&addr, "GET", "/v1/inventory", &token, None);
    assert_eq!(inv["encoder_ip"], enc_ip.as_str(), "{inv}");
    // Its two ports, 6900 and 6901, each mapped to a host port.
    let encoders = inv["encoders"].as_array().expect("encoders");
    assert_eq!(encoders.len(), 1, "{inv}");
    assert_eq!(encoders[0]["server_id"], server.as_str());
    assert_eq!(encoders[0]["status"], 1);
    let infos = encoders[0]["access_infos"]
        .as_array()
        .expect("access infos");
    let seen: Vec<(&str, u64, &str, bool)> = infos
        .iter()
        .map(|a| {
            (
                a["type"].as_str().unwrap_or(""),
                a["listen_port"].as_u64().unwrap_or(0),
                a["phone_ip"].as_str().unwrap_or(""),
                a["internet_accessible"] == true,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("port1", 6900, enc_ip.as_str(), true),
            ("port2", 6901, enc_ip.as_str(), true)
        ],
        "{inv}"
    );
    let access_port = infos[0]["access_port"].as_u64().expect("access port") as u16;
    assert_ne!(
        access_port,
        infos[1]["access_port"].as_u64().unwrap_or(0) as u16
    );
    assert!(
        in_netns(&enc_ns, &["ip", "-4", "-o", "addr", "show", "eth0"]).contains(&enc_ip),
        "encoder address"
    );
    assert_eq!(
        in_netns(&enc_ns, &["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(),
        "1"
    );
    let rt = Runtime::new(&state.join("containers"), parent, shim).expect("runtime");
    let first = rt.state(&enc_name).expect("encoder container");
    let (_, phones) = http(&addr, "GET", "/v1/phones", &token, None);
    assert_eq!(
        phones.as_array().map(Vec::len),
        Some(1),
        "encoder is no phone: {phones}"
    );

    // The host's access port reaches a listener on port 6900 in the
    // encoder's namespace.
    let listener = listen_in(&enc_ns, 6900);
    let echoed = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept in the encoder");
        let mut line = [0u8; 5];
        s.read_exact(&mut line).expect("read");
        s.write_all(&line).expect("write");
    });
    let server_ip: std::net::Ipv4Addr = inv["server_ip"]
        .as_str()
        .and_then(|ip| ip.parse().ok())
        .expect("server ip");
    let mut c = std::net::TcpStream::connect((server_ip, access_port)).expect("connect");
    c.write_all(b"ping\n").expect("send");
    let mut back = [0u8; 5];
    c.read_exact(&mut back).expect("echo");
    assert_eq!(&back, b"ping\n");
    echoed.join().expect("encoder listener");

    // A phone on `routing` reaches the host through the encoder.
    http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&job(
            "traffic-1",
            &server,
            &phone,
            json!({"kind": "set_traffic", "traffic_type": "routing"}),
        )),
    );
    let st = wait_job(&addr, &token, "traffic-1");
    assert_eq!(st["status"], 2, "{st}");
    let listener = TcpListener::bind("0.0.0.0:0").expect("host listener");
    let port = listener.local_addr().expect("addr").port();
    let server_ip = inv["server_ip"].as_str().expect("server ip").to_string();
    let accept = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut got = String::new();
        let _ = s.read_to_string(&mut got);
        got
    });
    let before = forwarded(&enc_ns);
    let (_, st) = http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&job(
            "routed-1",
            &server,
            &phone,
            json!({"kind": "sync_shell", "timeout_ms": 2000,
                   "command": format!("ip route show default; echo routed | nc -w 1 {server_ip} {port}")}),
        )),
    );
    assert_eq!(st["status"], 2, "{st}");
    assert!(
        st["execute_msg"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("via {enc_ip}")),
        "{st}"
    );
    assert_eq!(accept.join().expect("accept thread").trim(), "routed");
    assert!(
        forwarded(&enc_ns) > before,
        "traffic did not pass the encoder"
    );

    // Restart: a new init in the same container name.
    let (_, st) = http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&server_job(
            "enc-restart-1",
            &server,
            json!({"kind": "restart_encode_server"}),
        )),
    );
    assert_ne!(st["status"], -1, "{st}");
    let st = wait_job(&addr, &token, "enc-restart-1");
    assert_eq!(st["status"], 2, "{st}");
    let second = rt.state(&enc_name).expect("encoder after restart");
    assert_ne!(first.pid, second.pid);

    // Deleting the server takes the encoder with it, also one its flavor
    // no longer names (a flavor change whose removal of it failed; the
    // record changed by hand while the agent is down).
    t.agent.kill();
    let record = state.join(format!("servers/cph-{server}.json"));
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).expect("server record")).expect("json");
    let spec = rec["flavor"]["extend_spec"]
        .as_object_mut()
        .expect("extend_spec")
        .remove("encode_server_spec");
    assert!(spec.is_some(), "{rec}");
    std::fs::write(&record, rec.to_string()).expect("write record");
    t.agent.restart();
    let st = delete_server(&addr, &token, &server);
    assert_eq!(st["status"], 2, "{st}");
    assert!(rt.state(&enc_name).is_err(), "encoder left behind");
    assert!(!enc_ns.exists(), "encoder netns left behind");
}
