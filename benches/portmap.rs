//! The port-mapping hot path against the real kernel, inside private
//! namespaces: (1) one phone's 100-port change with 40,000 mappings present
//! (the netlink batch alone, the `nft -f` CLI for reference, the API call),
//! (2) full reconcile of 40,000 mappings, (3) new-connection cost to the
//! newest port at 0/1k/10k/40k mappings, (4) bulk TCP through the DNAT path
//! next to routed access to the phone address. Writes
//! `target/bench-report/portmap.json`.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use cph_runtime::net::cmd::{self, Runner, SystemRunner};
use cph_runtime::net::testbed::{
    blast_from, goodput_bps, in_netns, netns_path, spawn_echo, spawn_sink, Testbed, SERVER_IP,
};
use cph_runtime::net::{
    nfnl, nft, tc, BandwidthLimit, Ipv4Net, NetConfig, NetManager, NetState, PhoneNet, PortMapping,
    PortRequest, TrafficType,
};
use criterion::Criterion;

const PORTS_PER_PHONE: u32 = 100;
const FIRST_PORT: u16 = 10000;
const REAL_PHONE: &str = "real-phone";

#[path = "common/report.rs"]
mod report;
use report::Metric;

fn percentile(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i.min(v.len() - 1)]
}

fn config(tb: &Testbed) -> NetConfig {
    let mut cfg = tb.config(FIRST_PORT, 60000);
    cfg.subnet = Ipv4Net {
        addr: Ipv4Addr::new(10, 211, 0, 0),
        prefix: 16,
    };
    cfg.max_ports_per_phone = PORTS_PER_PHONE as usize;
    cfg
}

fn mappings(first_access: u32) -> Vec<PortMapping> {
    (0..PORTS_PER_PHONE)
        .map(|j| PortMapping {
            name: format!("p{j}"),
            listen_port: 20000 + j as u16,
            access_port: (first_access + j) as u16,
            internet_accessible: true,
            system: false,
        })
        .collect()
}

/// A state with `n` mappings on phones without a namespace (they exist
/// only as rules and classes), the port cursor after them.
fn fake_state(cfg: &NetConfig, n: u32) -> NetState {
    let mut st = NetState {
        shared_bandwidth_mbit: 2000,
        port_cursor: FIRST_PORT + n as u16,
        ..NetState::default()
    };
    for i in 0..n / PORTS_PER_PHONE {
        let id = format!("fake{i}");
        st.phones.insert(
            id.clone(),
            PhoneNet {
                phone_id: id,
                index: i,
                ip: cfg
                    .subnet
                    .host(i + 2)
                    .expect("subnet holds the fake phones"),
                host_if: cfg.veth_name(i),
                netns: PathBuf::from("/nonexistent/fake-phone"),
                ports: mappings(u32::from(FIRST_PORT) + i * PORTS_PER_PHONE),
                bandwidth: BandwidthLimit::Unlimited,
                traffic: TrafficType::Direct,
            },
        );
    }
    st
}

fn user_ports(n: u32) -> Vec<PortRequest> {
    (0..n)
        .map(|j| PortRequest {
            name: format!("p{j}"),
            listen_port: 20000 + j as u16,
            internet_accessible: true,
            system: false,
        })
        .collect()
}

/// Loads `n` mappings, then gives the real phone one port (the newest).
fn load(cfg: &NetConfig, phone_ns: &Path, n: u32) -> NetManager {
    fake_state(cfg, n)
        .save(&cfg.state_path)
        .expect("write bench state");
    let mut net = NetManager::open(cfg.clone(), 2000).expect("open manager");
    net.reconcile().expect("reconcile");
    net.add_phone(REAL_PHONE, phone_ns, &user_ports(1), -1)
        .expect("add real phone");
    net
}

fn crr(to: SocketAddr) -> Duration {
    let start = Instant::now();
    let mut s = TcpStream::connect(to).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.write_all(b"x").expect("write");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).expect("echo");
    drop(s);
    start.elapsed()
}

fn main() {
    if !cph_runtime::privilege::check("portmap bench") {
        return;
    }
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not:
    // then this is a smoke run at 1,000 mappings that writes no report.
    let full = std::env::args().any(|a| a == "--bench");
    let big: u32 = if full { 40_000 } else { 1_000 };
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    if full {
        c = c.configure_from_args();
    } else {
        c = c
            .warm_up_time(Duration::from_millis(50))
            .measurement_time(Duration::from_millis(200));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tb = Testbed::new("bench", dir.path()).expect("testbed");
    let cfg = config(&tb);
    let host = netns_path(&tb.host);
    let public = netns_path(&tb.public);
    let private = netns_path(&tb.private);
    let phone_ns = tb.phone_netns().expect("phone netns");
    spawn_echo(&phone_ns, 20000).expect("echo");
    let mut metrics = Vec::new();

    // (3) New-connection cost to the newest port, by map size.
    let mut crr_p50 = Vec::new();
    for n in [0u32, 1000, 10_000, 40_000]
        .into_iter()
        .filter(|&n| n <= big)
    {
        let mut net = load(&cfg, &phone_ns, n);
        let ap = net.access_info(REAL_PHONE).expect("info")[0].access_port;
        let to = SocketAddr::from((SERVER_IP, ap));
        let samples = Rc::new(RefCell::new(Vec::new()));
        let rec = samples.clone();
        let public2 = public.clone();
        c.bench_function(&format!("portmap/crr_newest_port/{n}"), |b| {
            b.iter_custom(|iters| {
                let ds = in_netns(&public2, move || {
                    (0..iters).map(|_| crr(to)).collect::<Vec<_>>()
                })
                .join()
                .expect("client thread")
                .expect("client netns");
                let total = ds.iter().sum();
                rec.borrow_mut().extend(ds);
                total
            })
        });
        let p50 = percentile(&mut samples.borrow_mut(), 0.5);
        crr_p50.push((n, p50));
        net.remove_phone(REAL_PHONE).expect("remove real phone");
    }
    let base = crr_p50[0].1.as_secs_f64() * 1e6;
    for (n, p50) in &crr_p50 {
        metrics.push(Metric {
            metric: format!("crr_p50_newest_port_at_{n}_mappings"),
            ours: p50.as_secs_f64() * 1e6,
            anchor: base,
            unit: "us",
        });
    }

    // 40,000 mappings present from here on.
    let mut net = load(&cfg, &phone_ns, big);

    // (1a) The kernel transaction alone: one phone's 100 elements added,
    // then removed, as one netlink batch each (how the agent applies them),
    // and for reference as one `nft -f -` batch each (the CLI path).
    let probe = PhoneNet {
        phone_id: "probe".into(),
        index: 60_000,
        ip: Ipv4Addr::new(10, 211, 250, 250),
        host_if: "unused".into(),
        netns: PathBuf::from("/nonexistent"),
        ports: mappings(50_100),
        bandwidth: BandwidthLimit::Unlimited,
        traffic: TrafficType::Direct,
    };
    let add = nft::phone_delta(&cfg, None, Some(&probe));
    let del = nft::phone_delta(&cfg, Some(&probe), None);
    let mut sock = nfnl::Socket::open(Some(&host)).expect("netlink socket");
    let tx_samples = Rc::new(RefCell::new(Vec::new()));
    let rec = tx_samples.clone();
    c.bench_function("portmap/netlink_add_remove_100_at_40k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for batch in [&add, &del] {
                    let t = Instant::now();
                    sock.apply(batch).expect("netlink batch");
                    let d = t.elapsed();
                    total += d;
                    rec.borrow_mut().push(d);
                }
            }
            total
        })
    });
    let mut v = tx_samples.borrow_mut();
    metrics.push(Metric {
        metric: "nft_batch_100_ports_at_40k_p99".into(),
        ours: percentile(&mut v, 0.99).as_secs_f64() * 1e3,
        anchor: 5.0,
        unit: "ms",
    });
    metrics.push(Metric {
        metric: "nft_batch_100_ports_at_40k_p50".into(),
        ours: percentile(&mut v, 0.5).as_secs_f64() * 1e3,
        anchor: 5.0,
        unit: "ms",
    });
    drop(v);
    let cli_samples = Rc::new(RefCell::new(Vec::new()));
    let rec = cli_samples.clone();
    let (add_text, del_text) = (add.render_nft(), del.render_nft());
    c.bench_function("portmap/nft_cli_add_remove_100_at_40k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for text in [&add_text, &del_text] {
                    let inv = cmd::nft_batch(text.clone()).in_netns(Some(&host));
                    let t = Instant::now();
                    SystemRunner.run(&inv).expect("nft batch");
                    let d = t.elapsed();
                    total += d;
                    rec.borrow_mut().push(d);
                }
            }
            total
        })
    });
    metrics.push(Metric {
        metric: "nft_cli_batch_100_ports_at_40k_p99".into(),
        ours: percentile(&mut cli_samples.borrow_mut(), 0.99).as_secs_f64() * 1e3,
        anchor: 5.0,
        unit: "ms",
    });

    // (1b) The whole API call: validation, host listener scan, allocation,
    // nft transaction, conntrack cleanup on removal, state file write.
    let api_samples = Rc::new(RefCell::new(Vec::new()));
    let rec = api_samples.clone();
    let ports = user_ports(PORTS_PER_PHONE);
    c.bench_function("portmap/set_ports_100_at_40k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for p in [&ports[..], &ports[..1]] {
                    let t = Instant::now();
                    net.set_ports(REAL_PHONE, p).expect("set ports");
                    let d = t.elapsed();
                    total += d;
                    rec.borrow_mut().push(d);
                }
            }
            total
        })
    });
    metrics.push(Metric {
        metric: "set_ports_api_100_ports_at_40k_p99".into(),
        ours: percentile(&mut api_samples.borrow_mut(), 0.99).as_secs_f64() * 1e3,
        anchor: 5.0,
        unit: "ms",
    });
    metrics.push(Metric {
        metric: "set_ports_api_100_ports_at_40k_p50".into(),
        ours: percentile(&mut api_samples.borrow_mut(), 0.5).as_secs_f64() * 1e3,
        anchor: 5.0,
        unit: "ms",
    });

    // The conntrack cleanup the call leaves to its thread: unmapping 99
    // ports, then waiting for the thread to have walked the table.
    let mut settles = Vec::new();
    for _ in 0..10 {
        net.set_ports(REAL_PHONE, &ports).expect("set ports");
        net.set_ports(REAL_PHONE, &ports[..1]).expect("set ports");
        let t = Instant::now();
        net.settle_conntrack();
        settles.push(t.elapsed());
    }
    metrics.push(Metric {
        metric: "conntrack_cleanup_after_unmap_p50 (off the call's path)".into(),
        ours: percentile(&mut settles, 0.5).as_secs_f64() * 1e3,
        anchor: 5.0,
        unit: "ms",
    });

    // (2) Full reconcile of 40,000 mappings (table, classes, links).
    let rc_samples = Rc::new(RefCell::new(Vec::new()));
    let rec = rc_samples.clone();
    c.bench_function("portmap/full_reconcile_40k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                net.reconcile().expect("reconcile");
                let d = t.elapsed();
                total += d;
                rec.borrow_mut().push(d);
            }
            total
        })
    });
    metrics.push(Metric {
        metric: "full_reconcile_40k_p50".into(),
        ours: percentile(&mut rc_samples.borrow_mut(), 0.5).as_secs_f64() * 1e3,
        // Plain `nft -f` load of a 40k map measured on this machine.
        anchor: 542.0,
        unit: "ms",
    });

    // Pieces of the API call: one phone's state file with 40,000 mappings
    // present, and a live bandwidth change as one `tc -batch` (`tc class change`).
    let mut saves = Vec::new();
    let mut st = net.state().clone();
    for _ in 0..20 {
        let t = Instant::now();
        st.save_phone(&cfg.state_path, REAL_PHONE)
            .expect("save phone state");
        saves.push(t.elapsed());
    }
    metrics.push(Metric {
        metric: "state_save_one_phone_at_40k_p50".into(),
        ours: percentile(&mut saves, 0.5).as_secs_f64() * 1e3,
        anchor: 5.0,
        unit: "ms",
    });
    let mut phone = net.phone(REAL_PHONE).expect("real phone").clone();
    let mut changes = Vec::new();
    for i in 0..20u32 {
        phone.bandwidth = BandwidthLimit::Kbit(10_000 + i * 1000);
        // As the manager changes it: downloads' and uploads' classes in one batch.
        let lines: Vec<String> = cfg
            .shaped_devs()
            .iter()
            .flat_map(|dev| tc::render_phone_change(dev, &phone, 2000))
            .collect();
        let inv = cmd::tc_batch(&lines).in_netns(Some(&host));
        let t = Instant::now();
        SystemRunner.run(&inv).expect("tc class change");
        changes.push(t.elapsed());
    }
    metrics.push(Metric {
        metric: "tc_limit_change_p50".into(),
        ours: percentile(&mut changes, 0.5).as_secs_f64() * 1e3,
        anchor: 10.0,
        unit: "ms",
    });

    // (4) Bulk TCP from the private client: DNAT through the access port
    // versus routed to the phone address, interleaved, shaping off.
    let tables = SystemRunner
        .run(&cmd::nft_list_tables().in_netns(Some(&host)))
        .expect("nft list");
    eprintln!("nft tables in the bench host namespace: {}", tables.trim());
    let flowtable = format!(
        "table ip {t}ft {{\n\tflowtable f {{\n\t\thook ingress priority 0; devices = {{ up1 }};\n\t}}\n}}\n",
        t = cfg.table
    );
    match SystemRunner.run(&cmd::nft_batch(flowtable).in_netns(Some(&host))) {
        Ok(_) => eprintln!("nftables flowtable available (not used by this build)"),
        Err(e) => eprintln!("nftables flowtable unavailable on this kernel: {e}"),
    }
    let _ = SystemRunner
        .run(&cmd::nft_batch(format!("delete table ip {}ft\n", cfg.table)).in_netns(Some(&host)));
    let _ = SystemRunner
        .run(&cmd::tc_batch(&[format!("qdisc del dev {} root", cfg.bridge)]).in_netns(Some(&host)));
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_sink(&phone_ns, 20099, tx).expect("sink");
    let info = net
        .set_ports(
            REAL_PHONE,
            &[PortRequest {
                name: "bulk".into(),
                listen_port: 20099,
                internet_accessible: true,
                system: false,
            }],
        )
        .expect("bulk port");
    let dnat = SocketAddr::from((SERVER_IP, info[0].access_port));
    let phone_ip: Ipv4Addr = info[0].phone_ip.parse().expect("phone ip");
    let routed = SocketAddr::from((phone_ip, 20099));
    let (mut via_dnat, mut via_route) = (Vec::new(), Vec::new());
    for _ in 0..if full { 5 } else { 1 } {
        for (to, out) in [(dnat, &mut via_dnat), (routed, &mut via_route)] {
            blast_from(&private, to, 1.2).expect("blast");
            let s = rx.recv_timeout(Duration::from_secs(10)).expect("samples");
            out.push(goodput_bps(&s, 0.2, 1.1).expect("goodput") / 1e9);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (d, r) = (median(&mut via_dnat), median(&mut via_route));
    eprintln!("bulk tcp: dnat {via_dnat:?} routed {via_route:?} Gbit/s");
    metrics.push(Metric {
        metric: "bulk_tcp_dnat_vs_routed".into(),
        ours: d,
        anchor: r,
        unit: "Gbit/s",
    });
    net.teardown().expect("teardown");
    c.final_summary();
    if !full {
        eprintln!(
            "portmap smoke run done ({} metrics); no report written",
            metrics.len()
        );
        return;
    }

    report::write("portmap", &metrics);
}
