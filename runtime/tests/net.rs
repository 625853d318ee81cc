//! Phone networking against the real kernel: namespaces, veth, bridge,
//! nftables and tc, all inside private namespaces of a [`Testbed`].

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use cph_runtime::net::cmd::{Invocation, Runner, SystemRunner};
use cph_runtime::net::testbed::{
    blast_from, echo_from, goodput_bps, netns_path, spawn_echo, spawn_sink, Testbed,
    PUBLIC_CLIENT_IP, SERVER_IP,
};
use cph_runtime::net::{phones_dir, NetError, NetManager, PortRequest, TrafficType};

fn port(name: &str, listen: u16, public: bool) -> PortRequest {
    PortRequest {
        name: name.into(),
        listen_port: listen,
        internet_accessible: public,
        system: false,
    }
}

fn in_ns(ns: &Path, program: &'static str, args: &[&str]) -> String {
    SystemRunner
        .run(&Invocation {
            program,
            args: args.iter().map(|a| a.to_string()).collect(),
            stdin: None,
            netns: Some(ns.to_path_buf()),
        })
        .unwrap()
}

fn access(port: u16) -> SocketAddr {
    SocketAddr::from((SERVER_IP, port))
}

#[test]
fn port_mapping_reaches_phone_private_ports_refused_outside_teardown_clean() {
    if !cph_runtime::privilege::check("port_mapping_reaches_phone") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut tb = Testbed::new("pm", dir.path()).unwrap();
    let cfg = tb.config(12000, 12100);
    let host = netns_path(&tb.host);
    let (public, private) = (netns_path(&tb.public), netns_path(&tb.private));
    let mut net = NetManager::open(cfg.clone(), 300).unwrap();
    net.setup_host().unwrap();
    let phone_ns = tb.phone_netns().unwrap();
    let info = net
        .add_phone(
            "phone-a",
            &phone_ns,
            &[port("web", 20000, true), port("db", 20001, false)],
            -1,
        )
        .unwrap();
    assert_eq!(info.len(), 2);
    assert_eq!(info[0].phone_ip, "10.210.0.2");
    assert_eq!(info[0].server_ip, SERVER_IP.to_string());
    assert_eq!(info[0].public_ip, "203.0.113.10");
    assert_eq!(info[1].public_ip, "");
    let (web, db) = (info[0].access_port, info[1].access_port);
    assert_ne!(web, db);
    spawn_echo(&phone_ns, 20000).unwrap();
    spawn_echo(&phone_ns, 20001).unwrap();

    // Internet-accessible port: reachable from the outside client.
    assert_eq!(echo_from(&public, access(web), b"hello").unwrap(), b"hello");
    // Private port: refused from outside, reachable from the private network.
    let refused = echo_from(&public, access(db), b"x").unwrap_err();
    assert!(refused.contains("refused"), "{refused}");
    assert_eq!(
        echo_from(&private, access(db), b"inside").unwrap(),
        b"inside"
    );
    // The phone address itself is not open to the outside.
    let direct = SocketAddr::from(([10, 210, 0, 2], 20000));
    assert!(echo_from(&public, direct, b"x").is_err());
    assert_eq!(echo_from(&private, direct, b"routed").unwrap(), b"routed");

    // Egress from the phone is masqueraded behind the server address.
    spawn_echo(&public, 30000).unwrap();
    let out = SocketAddr::from(([10, 210, 100, 2], 30000));
    assert_eq!(echo_from(&phone_ns, out, b"out").unwrap(), b"out");
    let ct = in_ns(&host, "conntrack", &["-L", "-p", "tcp", "--dport", "30000"]);
    assert!(ct.contains("src=10.210.0.2"), "{ct}");

    // Ports persisted; a second phone never shares an access port, and a
    // host listener inside the range is skipped.
    let state = std::fs::read_to_string(phones_dir(&cfg.state_path).join("phone-a.json")).unwrap();
    assert!(state.contains("\"access_port\":"));
    spawn_echo(&host, 12002).unwrap();
    let phone_b = tb.phone_netns().unwrap();
    let info_b = net
        .add_phone("phone-b", &phone_b, &[port("web", 20000, true)], -1)
        .unwrap();
    assert_eq!(info_b[0].phone_ip, "10.210.0.3");
    assert!(
        ![web, db, 12002].contains(&info_b[0].access_port),
        "{info_b:?}"
    );

    // Bad input changes nothing.
    let before = in_ns(&host, "nft", &["list", "table", "ip", &cfg.table]);
    for (bad, field) in [
        (vec![port("web", 9000, true)], "listen_port"),
        (vec![port("adb", 20000, true)], "name"),
        (
            vec![port("a", 20000, true), port("b", 20000, true)],
            "listen_port",
        ),
    ] {
        match net.set_ports("phone-a", &bad) {
            Err(NetError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected invalid {field}, got {other:?}"),
        }
    }
    assert!(matches!(
        net.add_phone("phone-c", &phone_b, &[], 0),
        Err(NetError::Invalid {
            field: "com.cph.bandwidth_limit",
            ..
        })
    ));
    assert_eq!(
        in_ns(&host, "nft", &["list", "table", "ip", &cfg.table]),
        before
    );
    assert!(!net.host_links().unwrap().contains(&cfg.veth_name(2)));

    // Unmapping the public port: its conntrack entries go, the kept port's
    // stay, new connections are refused.
    let ct_ports = || {
        cph_runtime::net::cmd::parse_conntrack_reply_ports(&in_ns(
            &host,
            "conntrack",
            &["-L", "--reply-src", "10.210.0.2"],
        ))
    };
    assert!(ct_ports().contains(&("tcp".to_string(), 20000)));
    let info = net
        .set_ports("phone-a", &[port("db", 20001, false)])
        .unwrap();
    net.settle_conntrack();
    let after = ct_ports();
    assert!(!after.contains(&("tcp".to_string(), 20000)), "{after:?}");
    assert!(after.contains(&("tcp".to_string(), 20001)), "{after:?}");
    assert_eq!(info[0].access_port, db, "kept port keeps its access port");
    assert!(echo_from(&public, access(web), b"x").is_err());
    assert_eq!(echo_from(&private, access(db), b"still").unwrap(), b"still");

    let minor = format!("1:{:x}", 0x10 + net.phone("phone-b").unwrap().index);
    let up = cfg.upload_dev();
    let upload_filters = || in_ns(&host, "tc", &["filter", "show", "dev", &up, "parent", "1:"]);
    assert!(upload_filters().contains(&format!("flowid {minor} ")));
    // A removal cut off after its map elements went (deleted here by
    // hand) finishes when done again.
    let of_b = |map: &str| -> Vec<(String, String)> {
        nft_json_elements(&host, &cfg.table, map)
            .into_iter()
            .filter(|(_, data)| data.starts_with("10.210.0.3 "))
            .collect()
    };
    let b_public = of_b("public_ports");
    assert_eq!(b_public.len(), 1, "{b_public:?}");
    in_ns(
        &host,
        "nft",
        &[
            "delete",
            "element",
            "ip",
            &cfg.table,
            "public_ports",
            &format!("{{ {} }}", b_public[0].0),
        ],
    );
    assert!(of_b("public_ports").is_empty());
    net.remove_phone("phone-b").unwrap();
    assert!(of_b("public_ports").is_empty() && of_b("private_ports").is_empty());
    // Its classes in both trees and its upload filter went with it.
    for dev in cfg.shaped_devs() {
        let classes = in_ns(&host, "tc", &["class", "show", "dev", &dev]);
        assert!(
            !classes.contains(&format!("class htb {minor} ")),
            "{dev}: {classes}"
        );
    }
    let filters = upload_filters();
    assert!(!filters.contains(&format!("flowid {minor} ")), "{filters}");
    net.teardown().unwrap();
    let links = in_ns(&host, "ip", &["-o", "link", "show"]);
    assert!(
        !links.contains(&cfg.bridge) && !links.contains(&cfg.veth_prefix),
        "{links}"
    );
    assert!(!in_ns(&phone_ns, "ip", &["-o", "link", "show"]).contains("eth0"));
    assert!(!cfg.state_path.exists());
    assert!(!phones_dir(&cfg.state_path).exists());
}

fn measure(tb: &Testbed, rx: &std::sync::mpsc::Receiver<Vec<(u64, f64)>>, to: u16) -> f64 {
    let public = netns_path(&tb.public);
    blast_from(&public, access(to), 2.2).unwrap();
    let samples = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    goodput_bps(&samples, 0.5, 2.1).unwrap()
}

/// Upload goodput: the phone sends to a sink on the public client.
fn measure_upload(
    phone_ns: &Path,
    rx: &std::sync::mpsc::Receiver<Vec<(u64, f64)>>,
    port: u16,
) -> f64 {
    blast_from(phone_ns, SocketAddr::from((PUBLIC_CLIENT_IP, port)), 2.2).unwrap();
    let samples = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    goodput_bps(&samples, 0.5, 2.1).unwrap()
}

#[test]
fn bandwidth_limits_shape_downloads_and_change_live() {
    if !cph_runtime::privilege::check("bandwidth_limits_shape_downloads") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut tb = Testbed::new("bw", dir.path()).unwrap();
    let cfg = tb.config(13000, 13100);
    let host = netns_path(&tb.host);
    let mut net = NetManager::open(cfg.clone(), 1000).unwrap();
    net.setup_host().unwrap();
    let phone_ns = tb.phone_netns().unwrap();
    let info = net
        .add_phone("phone-bw", &phone_ns, &[port("sink", 20000, true)], 10_000)
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_sink(&phone_ns, 20000, tx).unwrap();
    let ap = info[0].access_port;

    // TCP goodput carries 1448 payload bytes per 1514-byte frame (95.6%);
    // the shaper counts frames, so the layer-2 rate is goodput * 1514/1448.
    // More than the limit fails at once. Less is measured again, up to six
    // runs: a loaded host (the suite's other tests on both cores) can starve
    // the sender for a while (0.80-0.88 three runs in a row once, then 1.00).
    let check = |measure: &mut dyn FnMut() -> f64, limit_bps: f64, what: &str| {
        const RUNS: u32 = 6;
        for run in 1..=RUNS {
            let ratio = measure() / limit_bps;
            let l2 = ratio * 1514.0 / 1448.0;
            eprintln!(
                "{what}, run {run}: goodput {:.2} Mbit/s = {ratio:.3} of the limit, layer 2 {l2:.3}",
                ratio * limit_bps / 1e6
            );
            assert!(ratio <= 1.0, "{what}: goodput ratio {ratio:.3}");
            assert!(l2 <= 1.03, "{what}: layer-2 ratio {l2:.3}");
            if (ratio >= 0.93 && l2 >= 0.97) || run == RUNS {
                assert!(ratio >= 0.93, "{what}: goodput ratio {ratio:.3}");
                assert!(l2 >= 0.97, "{what}: layer-2 ratio {l2:.3}");
                return;
            }
        }
    };
    // Uploads: the phone sends to a sink outside, through the same limits.
    let (up_tx, up_rx) = std::sync::mpsc::channel();
    let public = netns_path(&tb.public);
    spawn_sink(&public, 20001, up_tx).unwrap();
    check(
        &mut || measure(&tb, &rx, ap),
        10e6,
        "phone limit 10000 kbit/s",
    );
    check(
        &mut || measure_upload(&phone_ns, &up_rx, 20001),
        10e6,
        "upload, phone limit 10000 kbit/s",
    );
    // Traffic to another phone of the server is not an upload: the phone
    // limited to 10 Mbit/s sends to its neighbour many times faster.
    let peer_ns = tb.phone_netns().unwrap();
    net.add_phone("phone-bw-peer", &peer_ns, &[], -1).unwrap();
    let peer_ip = net.phone("phone-bw-peer").unwrap().ip;
    let (peer_tx, peer_rx) = std::sync::mpsc::channel();
    spawn_sink(&peer_ns, 20002, peer_tx).unwrap();
    blast_from(&phone_ns, SocketAddr::from((peer_ip, 20002)), 2.2).unwrap();
    let samples = peer_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let local = goodput_bps(&samples, 0.5, 2.1).unwrap();
    eprintln!("phone to phone: goodput {:.1} Mbit/s", local / 1e6);
    assert!(local > 5.0 * 10e6, "phone to phone shaped: {local} bit/s");
    net.set_bandwidth_limit("phone-bw", 18_000).unwrap();
    for dev in cfg.shaped_devs() {
        let classes = in_ns(&host, "tc", &["class", "show", "dev", &dev]);
        assert!(classes.contains("ceil 18Mbit"), "{dev}: {classes}");
    }
    check(
        &mut || measure(&tb, &rx, ap),
        18e6,
        "phone limit changed to 18000 kbit/s",
    );
    check(
        &mut || measure_upload(&phone_ns, &up_rx, 20001),
        18e6,
        "upload, phone limit changed to 18000 kbit/s",
    );
    net.set_bandwidth_limit("phone-bw", -1).unwrap();
    net.set_shared_bandwidth(14).unwrap();
    check(
        &mut || measure(&tb, &rx, ap),
        14e6,
        "unlimited phone, shared 14 Mbit/s",
    );
    check(
        &mut || measure_upload(&phone_ns, &up_rx, 20001),
        14e6,
        "upload, unlimited phone, shared 14 Mbit/s",
    );
    assert!(matches!(
        net.set_shared_bandwidth(301),
        Err(NetError::Invalid {
            field: "band_width_size",
            ..
        })
    ));
    net.teardown().unwrap();
    let links = in_ns(&host, "ip", &["-o", "link", "show"]);
    assert!(!links.contains(&cfg.bridge), "{links}");
    assert!(!links.contains(&cfg.upload_dev()), "{links}");
}

#[test]
fn traffic_diversion_and_reconcile_after_restart() {
    if !cph_runtime::privilege::check("traffic_diversion_and_reconcile") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut tb = Testbed::new("rc", dir.path()).unwrap();
    let cfg = tb.config(14000, 14100);
    let host = netns_path(&tb.host);
    let public = netns_path(&tb.public);
    let mut net = NetManager::open(cfg.clone(), 300).unwrap();
    net.setup_host().unwrap();
    let phone_ns = tb.phone_netns().unwrap();
    let info = net
        .add_phone("phone-r", &phone_ns, &[port("web", 20000, true)], 5000)
        .unwrap();
    let ap = info[0].access_port;
    spawn_echo(&phone_ns, 20000).unwrap();

    // Traffic diversion switches the default route live. An "encoding
    // container" on the bridge forwards the phone's traffic onwards.
    let enc = std::net::Ipv4Addr::new(10, 210, 0, 250);
    let enc_ns = tb.phone_netns().unwrap();
    let enc_path = enc_ns.display().to_string();
    in_ns(
        &host,
        "ip",
        &[
            "link", "add", "encv", "type", "veth", "peer", "name", "eth0", "netns", &enc_path,
        ],
    );
    in_ns(
        &host,
        "ip",
        &["link", "set", "encv", "master", &cfg.bridge, "up"],
    );
    in_ns(
        &enc_ns,
        "ip",
        &["addr", "add", "10.210.0.250/24", "dev", "eth0"],
    );
    in_ns(&enc_ns, "ip", &["link", "set", "eth0", "up"]);
    in_ns(
        &enc_ns,
        "ip",
        &["route", "add", "default", "via", "10.210.0.1"],
    );
    in_ns(&enc_ns, "sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]);
    in_ns(
        &enc_ns,
        "sysctl",
        &["-q", "-w", "net.ipv4.conf.all.send_redirects=0"],
    );
    in_ns(
        &enc_ns,
        "sysctl",
        &["-q", "-w", "net.ipv4.conf.eth0.send_redirects=0"],
    );
    // /proc/net/dev belongs to the reader's namespace (sysfs would not).
    let enc_rx = || -> u64 {
        let out = in_ns(&enc_ns, "cat", &["/proc/net/dev"]);
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with("eth0:"))
            .unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    spawn_echo(&public, 30001).unwrap();
    let outside = SocketAddr::from(([10, 210, 100, 2], 30001));
    let before = enc_rx();
    assert_eq!(echo_from(&phone_ns, outside, b"direct").unwrap(), b"direct");
    let direct_pkts = enc_rx() - before;
    net.set_traffic("phone-r", TrafficType::Routing(enc))
        .unwrap();
    let route = in_ns(&phone_ns, "ip", &["route", "show", "default"]);
    assert!(route.contains("via 10.210.0.250"), "{route}");
    let before = enc_rx();
    assert_eq!(
        echo_from(&phone_ns, outside, b"diverted").unwrap(),
        b"diverted"
    );
    let routed_pkts = enc_rx() - before;
    assert!(
        routed_pkts >= 4 && routed_pkts > direct_pkts + 3,
        "direct {direct_pkts}, routed {routed_pkts}"
    );
    assert!(matches!(
        net.set_traffic(
            "phone-r",
            TrafficType::Routing("192.0.2.1".parse().unwrap())
        ),
        Err(NetError::Invalid {
            field: "traffic_type",
            ..
        })
    ));
    net.set_traffic("phone-r", TrafficType::Direct).unwrap();
    let route = in_ns(&phone_ns, "ip", &["route", "show", "default"]);
    assert!(route.contains("via 10.210.0.1"), "{route}");

    // An established connection through the access port.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<Vec<u8>, String>>();
    cph_runtime::net::testbed::in_netns(&public, move || {
        use std::io::{Read, Write};
        let r = (|| {
            let mut s = std::net::TcpStream::connect(access(ap)).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(3)))
                .map_err(|e| e.to_string())?;
            while let Ok(msg) = rx.recv() {
                s.write_all(&msg).map_err(|e| e.to_string())?;
                let mut got = vec![0; msg.len()];
                s.read_exact(&mut got).map_err(|e| e.to_string())?;
                done_tx.send(Ok(got)).map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        })();
        if let Err(e) = r {
            let _ = done_tx.send(Err(e));
        }
    });
    tx.send(b"before".to_vec()).unwrap();
    assert_eq!(
        done_rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap(),
        b"before"
    );

    // "Restart": a new manager from the state file, with a leaked link of
    // ours and a stale class present; reconcile twice (idempotent).
    drop(net);
    in_ns(
        &host,
        "ip",
        &[
            "link",
            "add",
            &cfg.veth_name(42),
            "type",
            "veth",
            "peer",
            "name",
            "leak42",
        ],
    );
    // A phone plumbed by an agent that did not shape uploads: no redirect.
    in_ns(
        &host,
        "tc",
        &["qdisc", "del", "dev", &cfg.veth_name(0), "ingress"],
    );
    let mut net = NetManager::open(cfg.clone(), 300).unwrap();
    net.reconcile().unwrap();
    net.reconcile().unwrap();
    tx.send(b"after".to_vec()).unwrap();
    assert_eq!(
        done_rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .unwrap(),
        b"after"
    );
    assert_eq!(echo_from(&public, access(ap), b"new").unwrap(), b"new");
    let links = net.host_links().unwrap();
    assert!(!links.contains(&cfg.veth_name(42)));
    let table = in_ns(&host, "nft", &["list", "table", "ip", &cfg.table]);
    assert_eq!(
        table.matches(&format!("{SERVER_IP} . {ap}")).count(),
        1,
        "{table}"
    );
    let tables = in_ns(&host, "nft", &["list", "tables"]);
    assert_eq!(tables.matches(&cfg.table).count(), 1);
    let classes = in_ns(&host, "tc", &["class", "show", "dev", &cfg.bridge]);
    let htb = classes
        .lines()
        .filter(|l| l.starts_with("class htb"))
        .count();
    assert_eq!(htb, 2, "{classes}");
    assert!(classes.contains("ceil 5Mbit"), "{classes}");
    // Uploads: the same classes on the upload device, one filter for the
    // phone, and its veth redirecting there.
    let up = cfg.upload_dev();
    let up_classes = in_ns(&host, "tc", &["class", "show", "dev", &up]);
    let htb = up_classes
        .lines()
        .filter(|l| l.starts_with("class htb"))
        .count();
    assert_eq!(htb, 2, "{up_classes}");
    let filters = in_ns(&host, "tc", &["filter", "show", "dev", &up, "parent", "1:"]);
    assert_eq!(filters.matches("flowid 1:10").count(), 1, "{filters}");
    let redirected = || {
        let veth = cfg.veth_name(0);
        let f = in_ns(
            &host,
            "tc",
            &["filter", "show", "dev", &veth, "parent", "ffff:"],
        );
        // Traffic to the phone subnet passes first (node 1), the rest goes
        // to the upload device.
        f.contains("fh 800::1 ")
            && f.contains("flowid ffff:1")
            && f.contains(&format!("Redirect to device {up}"))
    };
    assert!(redirected());

    // A phone whose veth vanished (container restart) is re-plumbed.
    in_ns(&host, "ip", &["link", "del", &cfg.veth_name(0)]);
    net.reconcile().unwrap();
    assert_eq!(echo_from(&public, access(ap), b"again").unwrap(), b"again");
    assert!(redirected());
    // So is one that deleted its end and made a link of its own under
    // that name; a phone that cannot be re-plumbed fails no one else's.
    in_ns(&phone_ns, "ip", &["link", "del", "eth0"]);
    in_ns(
        &phone_ns,
        "ip",
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "mine0",
        ],
    );
    net.reconcile().unwrap();
    assert_eq!(echo_from(&public, access(ap), b"mine").unwrap(), b"mine");
    assert!(redirected());
    drop(tx);
    net.teardown().unwrap();
    assert!(!in_ns(&host, "nft", &["list", "tables"]).contains(&cfg.table));
    let left = in_ns(&host, "ip", &["-o", "link", "show"]);
    assert!(
        !left.contains(&cfg.bridge) && !left.contains(&cfg.veth_prefix),
        "{left}"
    );
}

/// `nft -j list map` elements as `(key, data)` text pairs; a concatenation
/// reads `a . b`, like `nft` text.
fn nft_json_elements(host: &Path, table: &str, map: &str) -> Vec<(String, String)> {
    let out = in_ns(host, "nft", &["-j", "list", "map", "ip", table, map]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let text = |x: &serde_json::Value| -> String {
        match x.get("concat").and_then(|c| c.as_array()) {
            Some(parts) => parts
                .iter()
                .map(|p| match p {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(" . "),
            None => x.as_str().map_or_else(|| x.to_string(), str::to_string),
        }
    };
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("map"))
        .flat_map(|m| m["elem"].as_array().cloned().unwrap_or_default())
        .map(|e| (text(&e[0]), text(&e[1])))
        .collect()
}

#[test]
fn netlink_elements_match_nft_both_ways_batches_are_atomic_conntrack_drops() {
    use cph_runtime::net::nfnl::{
        DiagSocket, ElemBatch, Element, Kind, MapChange, NfnlError, Op, Socket, Value,
    };
    use cph_runtime::net::{nft, BandwidthLimit, PhoneNet, PortMapping};
    use std::net::Ipv4Addr;

    if !cph_runtime::privilege::check("netlink_elements_match_nft") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tb = Testbed::new("nl", dir.path()).unwrap();
    let cfg = tb.config(15000, 15100);
    let host = netns_path(&tb.host);
    let t = cfg.table.as_str();
    SystemRunner
        .run(&cph_runtime::net::cmd::nft_batch(nft::render_table(&cfg, [])).in_netns(Some(&host)))
        .unwrap();
    let mut sock = Socket::open(Some(&host)).unwrap();

    // Added over netlink, read back by `nft -j`.
    let mapping = |listen, access, public| PortMapping {
        name: format!("p{listen}"),
        listen_port: listen,
        access_port: access,
        internet_accessible: public,
        system: false,
    };
    let phone = PhoneNet {
        phone_id: "nl-phone".into(),
        index: 3,
        ip: Ipv4Addr::new(10, 210, 0, 5),
        host_if: "unused".into(),
        netns: "/nonexistent".into(),
        ports: vec![mapping(20000, 15001, true), mapping(20001, 15002, false)],
        bandwidth: BandwidthLimit::Unlimited,
        traffic: TrafficType::Direct,
    };
    sock.apply(&nft::phone_delta(&cfg, None, Some(&phone)))
        .unwrap();
    let pair = |k: &str, d: &str| (k.to_string(), d.to_string());
    assert_eq!(
        nft_json_elements(&host, t, "public_ports"),
        [pair("10.210.100.1 . 15001", "10.210.0.5 . 20000")]
    );
    assert_eq!(
        nft_json_elements(&host, t, "private_ports"),
        [pair("10.210.100.1 . 15002", "10.210.0.5 . 20001")]
    );
    assert_eq!(
        nft_json_elements(&host, t, "phone_class"),
        [pair("10.210.0.5", "1:13")]
    );

    // Added by `nft`, read back over netlink: the same bytes.
    in_ns(
        &host,
        "nft",
        &[
            "add",
            "element",
            "ip",
            t,
            "public_ports",
            "{ 10.210.100.1 . 15099 : 10.210.0.9 . 21000 }",
        ],
    );
    in_ns(
        &host,
        "nft",
        &[
            "add",
            "element",
            "ip",
            t,
            "phone_class",
            "{ 10.210.0.9 : 1:1f }",
        ],
    );
    let listed = sock.list(t, "public_ports").unwrap();
    let want_key = Value::AddrPort(SERVER_IP, 15099);
    let want_data = Value::AddrPort(Ipv4Addr::new(10, 210, 0, 9), 21000);
    let got = listed
        .iter()
        .find(|e| e.key == want_key.to_bytes())
        .unwrap_or_else(|| panic!("{listed:?}"));
    assert_eq!(got.data.as_deref(), Some(&want_data.to_bytes()[..]));
    assert_eq!(
        Value::decode(Kind::AddrPort, got.data.as_deref().unwrap()),
        Some(want_data)
    );
    assert_eq!(listed.len(), 2);
    let classes = sock.list(t, "phone_class").unwrap();
    let class9 = classes
        .iter()
        .find(|e| e.key == Value::Addr(Ipv4Addr::new(10, 210, 0, 9)).to_bytes())
        .unwrap();
    assert_eq!(
        Value::decode(Kind::ClassId, class9.data.as_deref().unwrap()),
        Some(Value::ClassId {
            major: 1,
            minor: 0x1f
        })
    );

    // A batch with one bad change applies nothing, and the error names the
    // table, map and the element the kernel pointed at.
    let before = in_ns(&host, "nft", &["list", "table", "ip", t]);
    let el = |p: u16, data: Option<Value>| Element {
        key: Value::AddrPort(SERVER_IP, p),
        data,
    };
    let bad = ElemBatch {
        table: cfg.table.clone(),
        changes: vec![
            MapChange {
                op: Op::Add,
                map: "public_ports".into(),
                elements: vec![el(15050, Some(want_data))],
            },
            MapChange {
                op: Op::Delete,
                map: "private_ports".into(),
                elements: vec![el(15002, None), el(15077, None)],
            },
        ],
    };
    match sock.apply(&bad) {
        Err(NfnlError::Kernel {
            op,
            table,
            map,
            element,
            errno,
            ..
        }) => {
            assert_eq!(
                (op, table.as_str(), map.as_str(), element.as_str()),
                ("delete", t, "private_ports", "10.210.100.1 . 15077")
            );
            assert_eq!(errno, nix::errno::Errno::ENOENT);
        }
        other => panic!("expected a kernel refusal, got {other:?}"),
    }
    assert_eq!(in_ns(&host, "nft", &["list", "table", "ip", t]), before);
    let missing = ElemBatch {
        table: format!("{t}missing"),
        changes: bad.changes[..1].to_vec(),
    };
    let e = sock.apply(&missing).unwrap_err();
    assert!(
        e.to_string().contains(&format!("table ip {t}missing")),
        "{e}"
    );
    // The socket stays usable after refusals; the phone's elements go.
    sock.apply(&nft::phone_delta(&cfg, Some(&phone), None))
        .unwrap();
    assert_eq!(
        nft_json_elements(&host, t, "public_ports"),
        [pair("10.210.100.1 . 15099", "10.210.0.9 . 21000")]
    );
    assert!(nft_json_elements(&host, t, "private_ports").is_empty());
    assert_eq!(
        nft_json_elements(&host, t, "phone_class"),
        [pair("10.210.0.9", "1:1f")]
    );

    // Conntrack over the same socket: entries answered by the phone are
    // listed (only those) and deleted; a second deletion finds none.
    for (proto, phone_ip, phone_port, client_port) in [
        ("tcp", "10.210.0.5", "20000", "40000"),
        ("udp", "10.210.0.5", "20001", "40000"),
        ("tcp", "10.210.0.6", "20000", "40001"),
    ] {
        let mut args = vec!["-I", "-p", proto, "-s", "10.210.101.2", "-d"];
        args.extend([
            "10.210.100.1",
            "--sport",
            client_port,
            "--dport",
            "15001",
            "--reply-src",
            phone_ip,
            "--reply-dst",
            "10.210.101.2",
            "--reply-port-src",
            phone_port,
            "--reply-port-dst",
            client_port,
            "--timeout",
            "100",
        ]);
        if proto == "tcp" {
            args.extend(["--state", "ESTABLISHED"]);
        }
        in_ns(&host, "conntrack", &args);
    }
    let ip5 = Ipv4Addr::new(10, 210, 0, 5);
    let mut flows = sock.conntrack_flows_of(ip5).unwrap();
    flows.sort_by_key(|f| f.proto);
    let seen: Vec<(u8, u16)> = flows.iter().map(|f| (f.proto, f.phone_port)).collect();
    assert_eq!(seen, [(6, 20000), (17, 20001)]);
    assert_eq!(sock.conntrack_delete(ip5, &flows).unwrap(), 2);
    assert!(sock.conntrack_flows_of(ip5).unwrap().is_empty());
    assert_eq!(sock.conntrack_delete(ip5, &flows).unwrap(), 0);
    let other = in_ns(&host, "conntrack", &["-L", "--reply-src", "10.210.0.6"]);
    assert!(other.contains("sport=20000"), "{other}");

    // Listening ports over sock_diag are what `ss -l -t -u` shows.
    let held = cph_runtime::net::testbed::in_netns(&host, || {
        (
            std::net::TcpListener::bind("0.0.0.0:15555").unwrap(),
            std::net::UdpSocket::bind("0.0.0.0:15556").unwrap(),
            std::net::TcpListener::bind("[::]:15557").ok(),
        )
    })
    .join()
    .unwrap()
    .unwrap();
    let ours = DiagSocket::open(Some(&host))
        .unwrap()
        .listening_ports()
        .unwrap();
    let ss = cph_runtime::net::cmd::parse_listening_ports(&in_ns(
        &host,
        "ss",
        &["-H", "-l", "-n", "-t", "-u"],
    ));
    assert_eq!(ours, ss);
    assert!(ours.contains(&15555) && ours.contains(&15556), "{ours:?}");
    assert_eq!(ours.contains(&15557), held.2.is_some(), "{ours:?}");
    drop(held);
}

/// Runs every command for real but refuses IFB devices, as a kernel built
/// without CONFIG_IFB would (a stand-in for a kernel this machine does not
/// run).
struct NoIfb;

impl Runner for NoIfb {
    fn run(&self, inv: &Invocation) -> Result<String, NetError> {
        if inv.stdin.as_deref().is_some_and(|s| s.contains("type ifb")) {
            return Err(NetError::Command {
                command: format!("{} {}", inv.program, inv.args.join(" ")),
                status: 2,
                stderr: "Error: Unknown device type.".into(),
            });
        }
        SystemRunner.run(inv)
    }
}

#[test]
fn a_kernel_without_ifb_is_named() {
    if !cph_runtime::privilege::check("a_kernel_without_ifb_is_named") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tb = Testbed::new("noifb", dir.path()).unwrap();
    let cfg = tb.config(13200, 13210);
    let mut net = NetManager::with_runner(cfg.clone(), NoIfb, 100).unwrap();
    match net.setup_host() {
        Err(NetError::KernelLacks { feature, detail }) => {
            assert!(feature.contains("CONFIG_IFB"), "{feature}");
            assert!(detail.contains("Unknown device type"), "{detail}");
        }
        other => panic!("expected KernelLacks, got {other:?}"),
    }
    // Nothing of it is left.
    net.teardown().unwrap();
    let host = netns_path(&tb.host);
    let links = in_ns(&host, "ip", &["-o", "link", "show"]);
    assert!(!links.contains(&cfg.bridge), "{links}");
}
