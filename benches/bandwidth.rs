//! Shaping accuracy in both directions and live limit changes on real tc:
//! one phone of a testbed behind the agent's HTB trees, a TCP sender
//! outside pushing through its access port (downloads, on the bridge), then
//! the phone sending to a sink outside (uploads, on the upload device). For
//! each `com.cph.bandwidth_limit` from 64 kbit/s to 1 Gbit/s the rate at
//! layer 2 is read from the phone class's own byte counter over a window
//! after the burst, next to the limit itself (target: within 3%). Criterion
//! times a live limit change (`tc class change` over the batch, target under
//! 10 ms).
//!
//! Needs root; otherwise it says why and measures nothing. `cargo bench`
//! writes `target/bench-report/bandwidth.json`; under `cargo test` it is a
//! smoke run at one limit without a report.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use cph_runtime::net::cmd::{self, Runner, SystemRunner};
use cph_runtime::net::testbed::{blast_from, netns_path, spawn_sink, Testbed, PUBLIC_CLIENT_IP};
use cph_runtime::net::{nft, NetManager, PortRequest};
use criterion::Criterion;

#[path = "common/report.rs"]
mod report;
use report::Metric;

const PHONE: &str = "bw-phone";

/// The word after `name` in the phone class's `tc -s class show` on `dev`
/// (`Sent` its bytes, `backlog` what it holds queued).
fn class_stat(host: &Path, dev: &str, minor: u32, name: &str) -> Option<String> {
    let inv = cmd::tc_class_stats(dev, minor).in_netns(Some(host));
    let out = SystemRunner.run(&inv).expect("tc -s class show");
    out.split_whitespace()
        .skip_while(|w| *w != name)
        .nth(1)
        .map(str::to_string)
}

/// Waits (up to 10 s) until the phone's classes on `devs` hold no backlog.
fn wait_drained(host: &Path, devs: &[String], minor: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let queued = devs
            .iter()
            .any(|dev| class_stat(host, dev, minor, "backlog").is_some_and(|b| b != "0b"));
        if !queued {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bytes the phone's HTB class on `dev` has sent.
fn class_bytes(host: &Path, dev: &str, minor: u32) -> u64 {
    class_stat(host, dev, minor, "Sent")
        .and_then(|n| n.parse().ok())
        .expect("class byte counter")
}

fn main() {
    if !cph_runtime::privilege::check("bandwidth bench") {
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tb = Testbed::new("bwb", dir.path()).expect("testbed");
    let cfg = tb.config(14000, 14100);
    let host = netns_path(&tb.host);
    let public = netns_path(&tb.public);
    let phone_ns = tb.phone_netns().expect("phone netns");
    let mut net = NetManager::open(cfg.clone(), 2000).expect("manager");
    net.setup_host().expect("host network");
    let sink = PortRequest {
        name: "sink".into(),
        listen_port: 20000,
        internet_accessible: true,
        system: false,
    };
    let info = net
        .add_phone(PHONE, &phone_ns, &[sink], -1)
        .expect("add phone");
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_sink(&phone_ns, 20000, tx).expect("sink");
    let to = SocketAddr::from((
        info[0].server_ip.parse::<Ipv4Addr>().expect("server ip"),
        info[0].access_port,
    ));
    let minor = nft::class_minor(net.phone(PHONE).expect("phone").index);
    // Uploads: the phone sends to a sink on the public client.
    let (up_tx, up_rx) = std::sync::mpsc::channel();
    spawn_sink(&public, 20001, up_tx).expect("upload sink");
    let up_to = SocketAddr::from((PUBLIC_CLIENT_IP, 20001));

    // (limit kbit/s, measuring window): slow rates need long windows for
    // enough 1514-byte frames to count.
    // `CPH_BW_LIMITS=1000:8,10000:2` measures only these (kbit/s:window s).
    let chosen: Vec<(i64, f64)> = std::env::var("CPH_BW_LIMITS")
        .ok()
        .map(|v| {
            v.split(',')
                .filter_map(|p| {
                    let (k, w) = p.split_once(':')?;
                    Some((k.parse().ok()?, w.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default();
    let limits: &[(i64, f64)] = if !chosen.is_empty() {
        &chosen
    } else if full {
        &[
            (64, 12.0),
            (1_000, 4.0),
            (10_000, 2.0),
            (100_000, 2.0),
            (1_000_000, 2.0),
        ]
    } else {
        &[(10_000, 1.0)]
    };
    let mut metrics = Vec::new();
    for &(kbit, window) in limits {
        // Downloads (public client to the phone, shaped on the bridge), then
        // uploads (the phone to the public client, on the upload device).
        let upload_dev = cfg.upload_dev();
        let directions = [
            ("", &public, to, cfg.bridge.as_str(), &rx),
            (" upload", &phone_ns, up_to, upload_dev.as_str(), &up_rx),
        ];
        for (what, from, dest, dev, sink) in directions {
            // What the last sender left queued at a slow limit (seconds of
            // it) would hold this connection's handshake: flushed at a high
            // limit first.
            net.set_bandwidth_limit(PHONE, 1_000_000)
                .expect("flush limit");
            wait_drained(&host, &cfg.shaped_devs(), minor);
            net.set_bandwidth_limit(PHONE, kbit).expect("set limit");
            // The class's burst drains in the first moments; measure after it.
            let settle = 0.8;
            let from = from.clone();
            let sender = std::thread::spawn(move || blast_from(&from, dest, settle + window + 0.3));
            std::thread::sleep(Duration::from_secs_f64(settle));
            let (b1, t1) = (class_bytes(&host, dev, minor), Instant::now());
            std::thread::sleep(Duration::from_secs_f64(window));
            let (b2, t2) = (class_bytes(&host, dev, minor), Instant::now());
            if let Err(e) = sender.join().expect("sender") {
                panic!("sending{what} at {kbit} kbit/s: {e}");
            }
            let _ = sink.recv_timeout(Duration::from_secs(5));
            let rate_kbit = (b2 - b1) as f64 * 8.0 / (t2 - t1).as_secs_f64() / 1000.0;
            eprintln!(
                "limit {kbit} kbit/s{what}: layer 2 {rate_kbit:.1} kbit/s ({:.3})",
                rate_kbit / kbit as f64
            );
            metrics.push(Metric {
                metric: format!("layer-2{what} rate at a {kbit} kbit/s limit (anchor: the limit)"),
                ours: rate_kbit,
                anchor: kbit as f64,
                unit: "kbit/s",
            });
        }
    }

    // A live change of the limit, one `tc -batch` each.
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(2));
    if full {
        c = c.configure_from_args();
    } else {
        c = c.measurement_time(Duration::from_millis(200));
    }
    let mut changes = Vec::new();
    let mut k = 0i64;
    c.bench_function("bandwidth/limit_change", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                k += 1;
                let t = Instant::now();
                net.set_bandwidth_limit(PHONE, 10_000 + (k % 50) * 1000)
                    .expect("change limit");
                let d = t.elapsed();
                changes.push(d);
                total += d;
            }
            total
        })
    });
    changes.sort();
    metrics.push(Metric {
        metric: "live limit change p50 (anchor: the 10 ms target)".into(),
        ours: changes[changes.len() / 2].as_secs_f64() * 1e3,
        anchor: 10.0,
        unit: "ms",
    });
    net.teardown().expect("teardown");
    if full {
        report::write("bandwidth", &metrics);
    } else {
        println!("bandwidth smoke run done; no report written");
    }
}
