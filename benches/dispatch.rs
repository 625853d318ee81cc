//! Job dispatch on an idle agent: the real `cph-agent` over a temporary
//! state dir with one running phone of the test image, driven over its
//! protocol. Two figures, each next to its anchor in the same run:
//! - acknowledgement: POST of a job until the agent answers (validated,
//!   recorded with fsync, queued), next to a bare protocol round trip
//!   (GET of a job's status) on the same agent;
//! - dispatch-to-start: POST of an async `shell` job until its command runs
//!   inside the phone (it creates a file the bench watches through
//!   `/proc/<init>/root`), next to the runtime's own exec of the same
//!   command started by the bench.
//!
//! Needs root; otherwise it says why and measures nothing. `cargo bench`
//! writes `target/bench-report/dispatch.json`; under `cargo test` it is a
//! short smoke run without a report.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cph_runtime::container::Runtime;
use criterion::Criterion;
use serde_json::{json, Value};

#[path = "common/report.rs"]
mod report;
use report::Metric;

#[path = "common/bins.rs"]
mod bins;

/// One HTTP/1.1 request with a bearer token; status and JSON body.
fn http(addr: &str, method: &str, path: &str, token: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).expect("connect agent");
    s.set_nodelay(true).expect("nodelay");
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read");
    let text = String::from_utf8_lossy(&resp);
    let (head, rest) = text.split_once("\r\n\r\n").expect("http response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, serde_json::from_str(rest).unwrap_or(Value::Null))
}

fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn percentile(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i.min(v.len() - 1)].as_secs_f64() * 1e3
}

/// The agent process and everything it made: phones purged, agent killed.
struct AgentGuard {
    child: Child,
    exe: PathBuf,
    config: PathBuf,
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(&self.exe)
            .arg("--config")
            .arg(&self.config)
            .arg("purge")
            .status();
    }
}

fn main() {
    if !cph_runtime::privilege::check("dispatch bench") {
        return;
    }
    // `cargo bench` passes `--bench`; under `cargo test` it is a smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let bin = bins::built();
    let image = bins::image();
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let pid = std::process::id();
    let parent = format!("cph-dispatch-{pid}");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let token = format!("tok-{pid}");
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "control_plane_url = \"\"\nnode_token = \"{token}\"\nlisten = \"{addr}\"\n\
             state_dir = \"{}\"\nprepare_host = false\nshim = \"{}\"\ncgroup_parent = \"{parent}\"\n\
             [network]\nenabled = false\n",
            state.display(),
            bin.join("cph-shim").display(),
        ),
    )
    .expect("write config");
    let exe = bin.join("cph-agent");
    let child = Command::new(&exe)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .spawn()
        .expect("spawn cph-agent");
    let _agent = AgentGuard { child, exe, config };
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "cph-agent did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }

    let server = format!("bs{pid}");
    let phone = format!("bp{pid}");
    let create = json!({
        "server_id": server, "server_name": "bench",
        "flavor": {"flavor_id": "dev", "vcpus": 1, "memory_mb": 256, "disk_gb": 1,
                   "phone_capacity": 1, "core_bind_strategy": "dev_small", "extend_spec": {}},
        "image": {"image_id": "img", "url": format!("file://{}", image.display())},
        "ports": [], "band_width_size": 10, "public_key": null,
        "phones": [{"phone_id": phone, "phone_name": "phone-1", "slot": 0, "property": {}}]
    });
    let (code, body) = http(&addr, "POST", "/v1/servers", &token, Some(&create));
    assert_eq!(code, 200, "{body}");
    let created = format!("/v1/jobs/{server}:create:{phone}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, st) = http(&addr, "GET", &created, &token, None);
        if st["status"] != 1 {
            assert_eq!(st["status"], 2, "phone create failed: {st}");
            break;
        }
        assert!(Instant::now() < deadline, "phone create still running");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rt = Runtime::new(&state.join("containers"), &parent, &bin.join("cph-shim"))
        .expect("runtime over the agent's state");
    let container = rt
        .list()
        .expect("list containers")
        .into_iter()
        .next()
        .expect("the phone's container");
    let root = PathBuf::from(format!("/proc/{}/root/tmp", container.pid));

    let (mut ack, mut bare, mut start, mut direct) = (vec![], vec![], vec![], vec![]);
    let mut round = 0u64;
    let mut c = Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_millis(300))
        .configure_from_args();
    c.bench_function("dispatch/async_shell_to_start", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                round += 1;
                let marker = format!("j{round}");
                let job = json!({"job_id": format!("bench-{round}"), "request_id": "r",
                                 "server_id": server, "phone_id": phone, "kind": "shell",
                                 "command": format!("touch /tmp/{marker}")});
                let t = Instant::now();
                let (code, st) = http(&addr, "POST", "/v1/jobs", &token, Some(&job));
                ack.push(t.elapsed());
                assert_eq!(code, 200, "{st}");
                wait_for(&root.join(&marker));
                let d = t.elapsed();
                start.push(d);
                total += d;
                let t = Instant::now();
                let (code, _) = http(
                    &addr,
                    "GET",
                    &format!("/v1/jobs/bench-{round}"),
                    &token,
                    None,
                );
                bare.push(t.elapsed());
                assert_eq!(code, 200);
            }
            total
        })
    });
    c.bench_function("dispatch/direct_exec_to_start", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                round += 1;
                let marker = format!("d{round}");
                let cmd = format!("touch /tmp/{marker}");
                let t = Instant::now();
                std::thread::scope(|s| {
                    let (rt, name, cmd) = (&rt, container.name.as_str(), cmd.as_str());
                    let exec = s.spawn(move || {
                        rt.exec(name, &["sh", "-c", cmd], Duration::from_secs(10), 64)
                    });
                    wait_for(&root.join(&marker));
                    let d = t.elapsed();
                    direct.push(d);
                    total += d;
                    exec.join().expect("exec thread").expect("direct exec");
                });
            }
            total
        })
    });
    let metrics = vec![
        Metric {
            metric: "job acknowledged p50 (anchor: bare protocol round trip)".into(),
            ours: percentile(&mut ack, 0.5),
            anchor: percentile(&mut bare, 0.5),
            unit: "ms",
        },
        Metric {
            metric: "job acknowledged p99 (anchor: bare protocol round trip)".into(),
            ours: percentile(&mut ack, 0.99),
            anchor: percentile(&mut bare, 0.99),
            unit: "ms",
        },
        Metric {
            metric: "dispatch-to-start p50 (anchor: direct runtime exec)".into(),
            ours: percentile(&mut start, 0.5),
            anchor: percentile(&mut direct, 0.5),
            unit: "ms",
        },
        Metric {
            metric: "dispatch-to-start p99 (anchor: direct runtime exec)".into(),
            ours: percentile(&mut start, 0.99),
            anchor: percentile(&mut direct, 0.99),
            unit: "ms",
        },
    ];
    if full {
        report::write("dispatch", &metrics);
    } else {
        println!("dispatch smoke run done ({round} rounds); no report written");
    }
}
