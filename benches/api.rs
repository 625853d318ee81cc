//! Control-plane API bench: list (limit 100) and detail of phones with
//! 100,000 phones in the store (p50, p99, requests/s over real HTTP), and a
//! batch restart of 1,000 phones spread over 20 servers, each on its own
//! real `cph-agent` (no phones of its own: the jobs reach it and end there):
//! the time until the API accepts the batch and until the control plane
//! has dispatched every job to its agent. Under `cargo test` it is a smoke
//! run with 2,000 phones that writes no report. The agents need root;
//! without it the dispatch part is skipped with the reason.

use std::time::{Duration, Instant};

use cph::serve::{serve, ServeConfig};
use cph::store::{new_id, now_string, NewServer, Order, Phone, Store};
use criterion::Criterion;
use serde_json::json;

#[path = "common/report.rs"]
mod report;

#[path = "common/bins.rs"]
mod bins;
use report::Metric;

fn percentile(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Hosts (and servers) the phones are spread over.
const HOSTS: usize = 20;
const NODE_TOKEN: &str = "bench-node-token";

/// Fills a data dir: one project, [`HOSTS`] hosts each with one server
/// whose agent listens at `agents[i]`, `n` phones spread over them.
fn fill(dir: &std::path::Path, n: usize, agents: &[String]) -> (String, Vec<String>) {
    let s = Store::open_dir(dir).expect("store");
    let p = s.create_project("bench").expect("project");
    s.create_user("bench", "pw", &p.project_id).expect("user");
    for (i, url) in agents.iter().enumerate() {
        let inv = cph_agent::protocol::Inventory {
            node_id: format!("bench-node-{i:02}"),
            hostname: format!("bench-{i}"),
            agent_url: url.clone(),
            agent_version: "0".into(),
            server_model: "physical.dev.local".into(),
            server_ip: "10.0.0.1".into(),
            public_ip: None,
            cpus: 2,
            numa_nodes: 1,
            gpus: 0,
            memory_mb: 1024,
            phone_capacity: 0,
            missing: vec![],
            phones: vec![],
            encoder_ip: None,
            encoders: vec![],
            pools: vec![],
        };
        s.upsert_node(&inv).expect("node");
    }
    let server_ids: Vec<String> = (0..agents.len()).map(|_| new_id()).collect();
    // The reference sells at most 10 servers per order.
    for (k, chunk) in server_ids.chunks(10).enumerate() {
        let order = Order {
            project_id: p.project_id.clone(),
            server_model_name: "physical.dev.local".into(),
            phone_model_name: "dev.cp.c1.m512".into(),
            image_id: cph::catalog::TEST_IMAGE_ID.into(),
            keypair_name: String::new(),
            network_version: "v1".into(),
            order_id: format!("CSBENCH{k}"),
            product_id: "OFFIBENCH".into(),
            vpc_id: String::new(),
            subnet_id: String::new(),
            vpc_cidr: String::new(),
            subnet_cidr: String::new(),
            availability_zone: String::new(),
            ports: "[]".into(),
            band_width_id: String::new(),
            property: "{}".into(),
            new_bandwidth: None,
            servers: chunk
                .iter()
                .enumerate()
                .map(|(j, id)| NewServer {
                    server_id: id.clone(),
                    server_name: format!("bench-{k}{j:03}"),
                    phones: vec![],
                    create_request: "{}".into(),
                })
                .collect(),
        };
        s.assign_servers(&order)
            .expect("assign")
            .expect("hosts free");
    }
    for id in &server_ids {
        // Their phones are put in the store directly; nothing to create.
        s.mark_server_created(id).expect("mark created");
    }
    let now = now_string();
    let phones: Vec<Phone> = (0..n)
        .map(|i| Phone {
            phone_id: new_id(),
            project_id: p.project_id.clone(),
            server_id: server_ids[i % server_ids.len()].clone(),
            phone_name: format!("bench-{i:06}"),
            phone_model_name: "dev.cp.c1.m512".into(),
            image_id: cph::catalog::TEST_IMAGE_ID.into(),
            status: 2,
            phone_type: 0,
            slot: (i / server_ids.len()) as u32,
            property: "{}".into(),
            access_infos: "[]".into(),
            traffic_type: "direct".into(),
            create_time: now.clone(),
            update_time: now.clone(),
        })
        .collect();
    s.insert_phones(&phones).expect("phones");
    (
        p.project_id,
        phones.into_iter().map(|p| p.phone_id).collect(),
    )
}

/// The bench's agents: real `cph-agent run` processes over temporary state
/// dirs, without a control plane to register with (the store already has
/// them) or a phone network; killed and purged at the end.
struct Agents {
    children: Vec<(std::process::Child, std::path::PathBuf)>,
    exe: std::path::PathBuf,
}

impl Agents {
    fn start(dir: &std::path::Path, addrs: &[String]) -> Self {
        let bin = bins::built();
        let exe = bin.join("cph-agent");
        let mut children = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let state = dir.join(format!("agent-{i}"));
            let config = dir.join(format!("agent-{i}.toml"));
            std::fs::write(
                &config,
                format!(
                    "control_plane_url = \"\"\nnode_token = \"{NODE_TOKEN}\"\nlisten = \"{addr}\"\n\
                     state_dir = \"{}\"\nprepare_host = false\nshim = \"{}\"\n\
                     cgroup_parent = \"cph-apibench-{}-{i}\"\n[network]\nenabled = false\n",
                    state.display(),
                    bin.join("cph-shim").display(),
                    std::process::id()
                ),
            )
            .expect("agent config");
            let child = std::process::Command::new(&exe)
                .arg("--config")
                .arg(&config)
                .arg("run")
                .env("RUST_LOG", "warn")
                .spawn()
                .expect("spawn cph-agent");
            children.push((child, config));
        }
        for addr in addrs {
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::net::TcpStream::connect(addr).is_err() {
                assert!(Instant::now() < deadline, "agent at {addr} did not listen");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Self { children, exe }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for (child, config) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::process::Command::new(&self.exe)
                .arg("--config")
                .arg(config)
                .arg("purge")
                .stdout(std::process::Stdio::null())
                .status();
        }
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 100_000 } else { 2_000 };
    let requests = if full { 2_000 } else { 50 };
    let dir = tempfile::tempdir().expect("tempdir");
    let privileged = cph_runtime::privilege::check("api bench: dispatch to 20 agents");
    let addrs: Vec<String> = (0..HOSTS)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            format!("127.0.0.1:{}", l.local_addr().expect("addr").port())
        })
        .collect();
    let urls: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    let (project, phone_ids) = fill(dir.path(), n, &urls);
    let _agents = privileged.then(|| Agents::start(dir.path(), &addrs));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (base, token) = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", l.local_addr().expect("addr"));
        let mut cfg = ServeConfig::new(dir.path().to_path_buf());
        cfg.node_token = Some(NODE_TOKEN.to_string());
        tokio::spawn(async move {
            let _ = serve(cfg, l, std::future::pending()).await;
        });
        let r = reqwest::Client::new()
            .post(format!("{base}/v3/auth/tokens"))
            .json(&json!({"auth": {"identity": {"password": {"user": {"name": "bench", "password": "pw"}}}}}))
            .send()
            .await
            .expect("login");
        let t = r.headers().get("x-subject-token").and_then(|v| v.to_str().ok()).expect("token").to_string();
        (base, t)
    });
    let client = reqwest::Client::new();
    let get = |path: String| {
        let c = client.clone();
        let t = token.clone();
        async move {
            let r = c
                .get(path)
                .header("x-auth-token", t)
                .send()
                .await
                .expect("send");
            assert!(r.status().is_success());
            r.bytes().await.expect("body");
        }
    };
    let list_url = format!("{base}/v1/{project}/cloud-phone/phones?offset=0&limit=100");
    let measure = |urls: &mut dyn FnMut(usize) -> String| {
        let mut lat = Vec::with_capacity(requests);
        let start = Instant::now();
        for i in 0..requests {
            let u = urls(i);
            let t = Instant::now();
            rt.block_on(get(u));
            lat.push(t.elapsed());
        }
        let rps = requests as f64 / start.elapsed().as_secs_f64();
        (
            percentile(&mut lat.clone(), 0.5),
            percentile(&mut lat, 0.99),
            rps,
        )
    };
    let (l50, l99, lrps) = measure(&mut |i| {
        format!(
            "{base}/v1/{project}/cloud-phone/phones?offset={}&limit=100",
            (i * 100) % n
        )
    });
    let (d50, d99, drps) = measure(&mut |i| {
        format!(
            "{base}/v1/{project}/cloud-phone/phones/{}",
            phone_ids[i % n]
        )
    });
    // 1,000 phones, 50 on each server (the store spreads them round robin).
    let batch: Vec<_> = phone_ids
        .iter()
        .take(1000)
        .map(|id| json!({"phone_id": id}))
        .collect();
    let t = Instant::now();
    let r = rt.block_on(async {
        client
            .post(format!(
                "{base}/v1/{project}/cloud-phone/phones/batch-restart"
            ))
            .header("x-auth-token", &token)
            .json(&json!({"phones": batch}))
            .send()
            .await
            .expect("batch")
    });
    assert!(r.status().is_success());
    let batch_ms = t.elapsed().as_secs_f64() * 1000.0;
    // Dispatched: no job of the batch is left unsent to its agent.
    let dispatched_ms = privileged.then(|| {
        let store = Store::open_dir(dir.path()).expect("store");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !store.undispatched_jobs(1).expect("jobs").is_empty() {
            assert!(Instant::now() < deadline, "batch not dispatched in 60 s");
            std::thread::sleep(Duration::from_millis(2));
        }
        t.elapsed().as_secs_f64() * 1000.0
    });

    // Deep pages whose remembered positions are stale: a phone was added
    // just before (unfiltered listing), or the listing is filtered by
    // status and asked for the first time.
    let (changed50, filtered_first) = {
        let store = Store::open_dir(dir.path()).expect("store");
        let template = store
            .phone(&project, &phone_ids[0])
            .expect("phone")
            .expect("exists");
        let deep = format!(
            "{base}/v1/{project}/cloud-phone/phones?offset={}&limit=100",
            n / 2
        );
        let mut lat = Vec::new();
        for _ in 0..20 {
            let p = Phone {
                phone_id: new_id(),
                ..template.clone()
            };
            store.insert_phones(&[p]).expect("insert");
            let t = Instant::now();
            rt.block_on(get(deep.clone()));
            lat.push(t.elapsed());
        }
        let t = Instant::now();
        rt.block_on(get(format!("{deep}&status=2")));
        (percentile(&mut lat, 0.5), t.elapsed())
    };
    let mut c = Criterion::default().sample_size(10);
    c = if full {
        c.configure_from_args()
    } else {
        c.warm_up_time(Duration::from_millis(50))
            .measurement_time(Duration::from_millis(200))
    };
    c.bench_function("api/list_phones_limit_100", |b| {
        b.iter(|| rt.block_on(get(list_url.clone())))
    });

    println!("list p50 {l50:?} p99 {l99:?} {lrps:.0} req/s; deep page after a change p50 {changed50:?}, first filtered deep page {filtered_first:?}; detail p50 {d50:?} p99 {d99:?} {drps:.0} req/s; batch 1000 accepted in {batch_ms:.1} ms, dispatched to {HOSTS} agents in {dispatched_ms:?} ms");
    if full {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        report::write(
            "api",
            &[
                Metric {
                    metric: "list limit 100 p50 (100k phones)".into(),
                    ours: ms(l50),
                    anchor: 10.0,
                    unit: "ms",
                },
                Metric {
                    metric: "list limit 100 p99 (100k phones)".into(),
                    ours: ms(l99),
                    anchor: 10.0,
                    unit: "ms",
                },
                Metric {
                    metric: "list requests per second".into(),
                    ours: lrps,
                    anchor: 1000.0,
                    unit: "req/s",
                },
                Metric {
                    metric: "list limit 100 at offset 50,000 right after a phone was added, p50"
                        .into(),
                    ours: ms(changed50),
                    anchor: 10.0,
                    unit: "ms",
                },
                Metric {
                    metric: "first list at offset 50,000 filtered by status".into(),
                    ours: ms(filtered_first),
                    anchor: 10.0,
                    unit: "ms",
                },
                Metric {
                    metric: "detail p50".into(),
                    ours: ms(d50),
                    anchor: 10.0,
                    unit: "ms",
                },
                Metric {
                    metric: "detail p99".into(),
                    ours: ms(d99),
                    anchor: 10.0,
                    unit: "ms",
                },
                Metric {
                    metric: "detail requests per second".into(),
                    ours: drps,
                    anchor: 1000.0,
                    unit: "req/s",
                },
                Metric {
                    metric: "batch restart of 1000 accepted".into(),
                    ours: batch_ms,
                    anchor: 1000.0,
                    unit: "ms",
                },
                Metric {
                    metric: "batch restart of 1000 dispatched to 20 agents".into(),
                    ours: dispatched_ms.unwrap_or(f64::NAN),
                    anchor: 1000.0,
                    unit: "ms",
                },
            ],
        );
    }
}
