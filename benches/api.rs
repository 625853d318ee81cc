//! Control-plane API bench: list (limit 100) and detail of phones with
//! 100,000 phones in the store (p50, p99, requests/s over real HTTP), and
//! acceptance of a batch restart of 1,000 phones. Under `cargo test` it is
//! a smoke run with 2,000 phones that writes no report.

use std::time::{Duration, Instant};

use cph::serve::{serve, ServeConfig};
use cph::store::{new_id, now_string, NewServer, Order, Phone, Store};
use criterion::Criterion;
use serde_json::json;

#[path = "common/report.rs"]
mod report;
use report::Metric;

fn percentile(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Fills a data dir: one project, one host with one server, `n` phones.
fn fill(dir: &std::path::Path, n: usize) -> (String, Vec<String>) {
    let s = Store::open_dir(dir).expect("store");
    let p = s.create_project("bench").expect("project");
    s.create_user("bench", "pw", &p.project_id).expect("user");
    let inv = cph_agent::protocol::Inventory {
        node_id: "bench-node".into(),
        hostname: "bench".into(),
        agent_url: "http://127.0.0.1:9".into(),
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
    };
    s.upsert_node(&inv).expect("node");
    let server_id = new_id();
    let order = Order {
        project_id: p.project_id.clone(),
        server_model_name: "physical.dev.local".into(),
        phone_model_name: "dev.cp.c1.m512".into(),
        image_id: cph::catalog::TEST_IMAGE_ID.into(),
        keypair_name: String::new(),
        network_version: "v1".into(),
        order_id: "CSBENCH".into(),
        product_id: "OFFIBENCH".into(),
        vpc_id: String::new(),
        subnet_id: String::new(),
        vpc_cidr: String::new(),
        subnet_cidr: String::new(),
        availability_zone: String::new(),
        ports: "[]".into(),
        band_width_id: String::new(),
        property: "{}".into(),
        servers: vec![NewServer {
            server_id: server_id.clone(),
            server_name: "bench-0001".into(),
            phones: vec![],
            create_request: "{}".into(),
        }],
    };
    s.assign_servers(&order)
        .expect("assign")
        .expect("host free");
    let now = now_string();
    let phones: Vec<Phone> = (0..n)
        .map(|i| Phone {
            phone_id: new_id(),
            project_id: p.project_id.clone(),
            server_id: server_id.clone(),
            phone_name: format!("bench-{i:06}"),
            phone_model_name: "dev.cp.c1.m512".into(),
            image_id: cph::catalog::TEST_IMAGE_ID.into(),
            status: 2,
            phone_type: 0,
            slot: i as u32,
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

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 100_000 } else { 2_000 };
    let requests = if full { 2_000 } else { 50 };
    let dir = tempfile::tempdir().expect("tempdir");
    let (project, phone_ids) = fill(dir.path(), n);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (base, token) = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", l.local_addr().expect("addr"));
        let cfg = ServeConfig::new(dir.path().to_path_buf());
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

    println!("list p50 {l50:?} p99 {l99:?} {lrps:.0} req/s; detail p50 {d50:?} p99 {d99:?} {drps:.0} req/s; batch 1000 accepted in {batch_ms:.1} ms");
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
            ],
        );
    }
}
