//! End-to-end over HTTP against an in-process `cph serve`: auth, catalog,
//! registration of a node (a protocol-speaking recorder standing in for the
//! agent's HTTP side), buying, phones, batch jobs, errors, isolation and
//! restart persistence.

#[path = "../benches/common/bins.rs"]
mod bins;
#[path = "api_common.rs"]
mod common;

use std::sync::{Arc, Mutex};

use axum::routing::{get, post};
use common::{Cp, NODE_TOKEN};
use cph_agent::protocol::{AccessInfo, Inventory, JobState, JobStatus, PhoneRunState, PhoneState};
use serde_json::{json, Value};

/// Requests an agent received.
#[derive(Default)]
struct Seen {
    servers: Vec<Value>,
    jobs: Vec<Value>,
    /// What `GET /v1/jobs/{id}` answers for a job (404 for others).
    statuses: std::collections::HashMap<String, JobStatus>,
}

/// Serves the agent side of the protocol and records what it is sent.
async fn recorder() -> (String, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s1 = seen.clone();
    let s2 = seen.clone();
    let s3 = seen.clone();
    let app = axum::Router::new()
        .route(
            "/v1/servers",
            post(move |axum::Json(v): axum::Json<Value>| {
                let s = s1.clone();
                async move {
                    s.lock().expect("lock").servers.push(v);
                    axum::Json(json!({"accepted": true}))
                }
            }),
        )
        .route(
            "/v1/jobs",
            post(move |axum::Json(v): axum::Json<Value>| {
                let s = s2.clone();
                async move {
                    let id = v["job_id"].as_str().unwrap_or("").to_string();
                    // A sync shell is answered with its result, as the
                    // agent does.
                    let sync = (v["kind"] == "sync_shell")
                        .then(|| format!("ran {}", v["command"].as_str().unwrap_or("")));
                    s.lock().expect("lock").jobs.push(v);
                    axum::Json(JobStatus {
                        job_id: id,
                        status: if sync.is_some() {
                            JobState::Succeeded
                        } else {
                            JobState::Running
                        },
                        error_code: None,
                        error_msg: None,
                        execute_msg: sync,
                    })
                }
            }),
        )
        .route(
            "/v1/jobs/{id}",
            get(
                move |axum::extract::Path(id): axum::extract::Path<String>| {
                    let s = s3.clone();
                    async move {
                        use axum::response::IntoResponse;
                        match s.lock().expect("lock").statuses.get(&id) {
                            Some(st) => axum::Json(st.clone()).into_response(),
                            None => axum::http::StatusCode::NOT_FOUND.into_response(),
                        }
                    }
                },
            ),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (url, seen)
}

fn inventory(node_id: &str, url: &str) -> Inventory {
    Inventory {
        node_id: node_id.into(),
        hostname: node_id.into(),
        agent_url: url.into(),
        agent_version: "0.1.0".into(),
        server_model: "physical.dev.local".into(),
        server_ip: "10.0.0.5".into(),
        public_ip: Some("203.0.113.5".into()),
        cpus: 2,
        numa_nodes: 1,
        gpus: 0,
        memory_mb: 2048,
        phone_capacity: 2,
        missing: vec![],
        phones: vec![],
        encoder_ip: None,
        encoders: vec![],
        pools: vec![cph_agent::protocol::PoolState {
            name: "thinpool".into(),
            backend: "btrfs".into(),
            size_bytes: 64 << 30,
            used_bytes: 1 << 30,
            avail_bytes: 63 << 30,
        }],
    }
}

/// An operator's flavor `name` of the development server in the catalog of
/// the data directory `dir`: two phones of 1 CPU and 512 MB for images of
/// `label`, no shared storage nor sharepool.
fn dev_flavor(dir: &std::path::Path, name: &str, label: &str, product_type: u32) {
    std::fs::write(
        dir.join(format!("catalog-{name}.json")),
        json!({"phone_models": [{"server_model_name": "physical.dev.local",
            "phone_model_name": name, "status": 1, "cpu": 1.0, "memory": 512,
            "disk": 2, "resolution": "720x1280", "extend_spec": {"core_bind_strategy": "dev_small"},
            "spec_code": name, "phone_capacity": 2, "image_label": label,
            "product_type": product_type}]})
        .to_string(),
    )
    .expect("catalog file");
}

/// The catalog's public image labelled `cloud_game`.
const GAME_IMAGE_ID: &str = "20032420200401a60b0003a99684b8ea";

fn buy_body(count: u32) -> Value {
    json!({"server_name": "dev", "server_model_name": "physical.dev.local",
        "phone_model_name": "dev.cp.c1.m512", "image_id": cph::catalog::TEST_IMAGE_ID,
        "count": count, "band_width": {"band_width_share_type": 0},
        "ports": [{"name": "web", "listen_port": 20000, "internet_accessible": "true"}],
        "extend_param": {"charging_mode": 0, "period_type": 2, "period_num": 1, "is_auto_pay": 1}})
}

/// The phones of a `CreateServer` the recorder got, as their agent would
/// report them once running.
fn running_phones(create: &Value) -> Vec<PhoneState> {
    let server_id = create["server_id"].as_str().expect("server_id");
    create["phones"]
        .as_array()
        .expect("phones")
        .iter()
        .map(|p| PhoneState {
            phone_id: p["phone_id"].as_str().expect("id").into(),
            server_id: server_id.into(),
            phone_name: p["phone_name"].as_str().expect("n").into(),
            state: PhoneRunState::Running,
            reason: None,
            image_id: cph::catalog::TEST_IMAGE_ID.into(),
            slot: p["slot"].as_u64().expect("slot") as u32,
            access_infos: vec![AccessInfo {
                kind: "adb".into(),
                phone_ip: "172.30.0.2".into(),
                listen_port: 5555,
                access_port: 30001,
                internet_accessible: true,
            }],
            property: Default::default(),
            traffic_type: "direct".into(),
        })
        .collect()
}

/// A control plane with the recorder's nodes `nodes` registered.
async fn with_nodes(nodes: &[&str]) -> (tempfile::TempDir, Cp, String, Arc<Mutex<Seen>>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = Cp::start(dir.path().to_path_buf()).await;
    let (url, seen) = recorder().await;
    for n in nodes {
        let inv = serde_json::to_value(inventory(n, &url)).expect("json");
        assert_eq!(cp.agent_post("/agent/v1/register", inv).await.status, 200);
    }
    (dir, cp, url, seen)
}

/// Buys `count` servers; their ids once their `CreateServer` reached the
/// recorder.
async fn buy(cp: &Cp, seen: &Arc<Mutex<Seen>>, count: u32) -> Vec<String> {
    let before = seen.lock().expect("lock").servers.len();
    let r = cp
        .call("POST", "/v1/{p}/cloud-phone/phones", Some(buy_body(count)))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    wait_for(seen, |s| s.servers.len() == before + count as usize).await;
    r.body["server_ids"]
        .as_array()
        .expect("server_ids")
        .iter()
        .map(|v| v.as_str().expect("id").to_string())
        .collect()
}

/// `field` of each phone of the server `sid`, as the phone list shows it.
async fn phone_fields(cp: &Cp, sid: &str, field: &str) -> Vec<Value> {
    let r = cp
        .call(
            "GET",
            &format!("/v1/{{p}}/cloud-phone/phones?server_id={sid}"),
            None,
        )
        .await;
    let phones = r.body["phones"].as_array().cloned().unwrap_or_default();
    phones.iter().map(|p| p[field].clone()).collect()
}

/// The jobs listed under the request id the answer `r` carries.
async fn jobs_of_request(cp: &Cp, r: &common::Resp) -> Vec<Value> {
    let request = r.body["request_id"].as_str().expect("request_id");
    let listed = cp
        .call(
            "GET",
            &format!("/v1/{{p}}/cloud-phone/jobs?request_id={request}"),
            None,
        )
        .await;
    listed.body["jobs"].as_array().cloned().unwrap_or_default()
}

/// Heartbeats of node `node` reporting `phones`, every 300 ms, until the
/// handle is aborted (a silent node's jobs would fail).
fn keep_beating(cp: &Cp, node: &str, phones: Vec<PhoneState>) -> tokio::task::JoinHandle<()> {
    let (base, node) = (cp.base.clone(), node.to_string());
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        loop {
            let _ = http
                .post(format!("{base}/agent/v1/heartbeat"))
                .bearer_auth(NODE_TOKEN)
                .json(&json!({"node_id": node, "phones": phones, "jobs": []}))
                .send()
                .await;
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    })
}

/// How many times longer the waits of these tests are: 4 under QEMU (a
/// cross run, `CPH_SPAWN_WRAPPER` set), where the control plane and the
/// test run emulated; 1 otherwise.
fn slowdown() -> u32 {
    if std::env::var_os("CPH_SPAWN_WRAPPER").is_some() {
        4
    } else {
        1
    }
}

async fn wait_for<F: Fn(&Seen) -> bool>(seen: &Arc<Mutex<Seen>>, f: F) {
    for _ in 0..100 * slowdown() {
        if f(&seen.lock().expect("lock")) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("condition not reached in {} s", 5 * slowdown());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_auth_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = Cp::start(dir.path().to_path_buf()).await;

    // Request id header equals the body's.
    let r = cp
        .call("GET", "/v1/{p}/cloud-phone/server-models", None)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["request_id"], json!(r.request_id));
    assert!(r.body["server_models"]
        .as_array()
        .expect("list")
        .iter()
        .any(|m| m["server_model_name"] == "physical.dev.local"));

    let r = cp
        .call(
            "GET",
            "/v1/{p}/cloud-phone/phone-models?status=1&unknown=x",
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let dev = r.body["phone_models"]
        .as_array()
        .expect("list")
        .iter()
        .find(|m| m["phone_model_name"] == "dev.cp.c1.m512")
        .cloned()
        .expect("dev flavor");
    let spec: Value =
        serde_json::from_str(dev["extend_spec"].as_str().expect("string")).expect("json");
    assert!(spec["core_bind_strategy"].is_string());
    assert!(spec["thinpool_size_g"].is_number());

    let r = cp
        .call("GET", "/v1/{p}/cloud-phone/phone-images", None)
        .await;
    assert!(r.body["phone_images"]
        .as_array()
        .expect("list")
        .iter()
        .any(|i| i["image_id"] == cph::catalog::TEST_IMAGE_ID));

    // Flavors a page at a time.
    let r = cp
        .call("GET", "/v1/{p}/cloud-phone/phone-models", None)
        .await;
    let all = r.body["phone_models"].as_array().expect("list").clone();
    assert!(all.len() >= 3, "{all:?}");
    let r = cp
        .call(
            "GET",
            "/v1/{p}/cloud-phone/phone-models?offset=1&limit=2",
            None,
        )
        .await;
    assert_eq!(r.body["phone_models"], json!(all[1..3]));

    // Query and path parameters the reference gives a code of their own.
    let unknown = "0123456789abcdef0123456789abcdef";
    for (method, path, body, status, code) in [
        ("GET", "/v1/{p}/cloud-phone/phones?type=9".to_string(), None, 400, "CPS.0116"),
        ("GET", "/v1/{p}/cloud-phone/encode-servers?type=x".to_string(), None, 400, "CPS.0116"),
        ("GET", "/v1/{p}/cloud-phone/phone-models?product_type=5".to_string(), None, 400, "CPS.0144"),
        ("GET", "/v1/{p}/cloud-phone/server-models?product_type=5".to_string(), None, 400, "CPS.0144"),
        ("GET", "/v1/{p}/cloud-phone/phone-images?is_public=3".to_string(), None, 400, "CPS.0143"),
        ("GET", "/v1/{p}/cloud-phone/phone-models?limit=101".to_string(), None, 400, "CPS.0002"),
        ("GET", "/v1/{p}/cloud-phone/phones/bad%2Bid".to_string(), None, 400, "CPS.0004"),
        ("GET", format!("/v1/{{p}}/cloud-phone/phones/{}", "a".repeat(33)), None, 400, "CPS.0004"),
        ("GET", format!("/v1/{{p}}/cloud-phone/phones/{unknown}"), None, 400, "CPS.0005"),
        ("PUT", "/v1/{p}/cloud-phone/phones/bad%2Bid".to_string(),
            Some(json!({"phone_name": "x"})), 400, "CPS.0004"),
        ("GET", "/v1/{p}/cloud-phone/servers/bad%2Bid".to_string(), None, 400, "CPS.0016"),
        ("GET", format!("/v1/{{p}}/cloud-phone/servers/{unknown}"), None, 400, "CPS.0015"),
        ("PUT", "/v1/{p}/cloud-phone/servers/bad%2Bid".to_string(),
            Some(json!({"server_name": "x"})), 400, "CPS.0016"),
        ("POST", "/v1/{p}/cloud-phone/encode-servers/batch-restart".to_string(),
            Some(json!({"encode_server_ids": []})), 400, "CPS.0122"),
        ("POST", "/v1/{p}/cloud-phone/phones/share-apps".to_string(),
            Some(json!({"bucket_name": "bucket1", "object_path": "a/app.zip",
                        "package_name": "com.example.app", "server_ids": [unknown]})), 400, "CPS.0135"),
        ("POST", "/v1/{p}/cloud-phone/phones/share-apps".to_string(),
            Some(json!({"bucket_name": "bucket1", "object_path": "a/app.tar",
                        "package_name": "noperiod", "server_ids": [unknown]})), 400, "CPS.0173"),
        ("POST", "/v1/{p}/cloud-phone/phones/share-apps".to_string(),
            Some(json!({"bucket_name": "bucket1", "object_path": "a/app.tar",
                        "package_name": "com.example.app", "pre_install_app": 2,
                        "server_ids": [unknown]})), 400, "CPS.0148"),
        ("DELETE", "/v1/{p}/cloud-phone/phones/share-apps".to_string(),
            Some(json!({"package_name": "_a.b", "server_ids": [unknown]})), 400, "CPS.0173"),
        ("GET", format!("/v1/{{p}}/cloud-phone/servers/share-files?path=/a//b&server_ids={unknown}"),
            None, 400, "CPS.0199"),
        ("GET", format!("/v1/{{p}}/cloud-phone/servers/share-files?path=/data&server_ids={unknown}&limit=101"),
            None, 400, "CPS.0002"),
    ] {
        let r = cp.call(method, &path, body).await;
        assert_eq!(
            (r.status, r.body["error_code"].as_str()),
            (status, Some(code)),
            "{method} {path}: {:?}",
            r.body
        );
    }

    // Pagination errors.
    for q in ["limit=0", "limit=101", "offset=-1", "limit=abc"] {
        let r = cp
            .call("GET", &format!("/v1/{{p}}/cloud-phone/phones?{q}"), None)
            .await;
        assert_eq!(r.status, 400, "{q}");
        assert_eq!(r.body["error_code"], "CPS.0002", "{q}");
        assert_eq!(r.body["request_id"], json!(r.request_id));
    }

    // Malformed json and wrong types are 400.
    let r = cp
        .raw("POST", "/v1/{p}/cloud-phone/phones/batch-stop", "{not json")
        .await;
    assert_eq!(r.status, 400);
    let r = cp
        .raw(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-stop",
            r#"{"phone_ids": 5}"#,
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.body["error_code"]
        .as_str()
        .expect("code")
        .starts_with("CPS."));

    // Body limit. Sent on a connection of its own: the server answers 413
    // before it has read the body and closes the connection, which a
    // shared client could otherwise hand to the next request half written.
    let big = "x".repeat(13 * 1024 * 1024);
    let lone = reqwest::Client::new();
    let r = common::resp(
        lone.post(format!(
            "{}/v1/{}/cloud-phone/phones/batch-stop",
            cp.base, cp.project_id
        ))
        .header("x-auth-token", &cp.token)
        .json(&json!({"phone_ids": [big]}))
        .send()
        .await
        .expect("send"),
    )
    .await;
    assert_eq!(r.status, 413);

    // No token, bad token, wrong project.
    let r = common::resp(
        cp.http
            .get(format!(
                "{}/v1/{}/cloud-phone/phones",
                cp.base, cp.project_id
            ))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["error_code"], "APIG.0301");
    let r = cp
        .call_as("bogus", "GET", "/v1/{p}/cloud-phone/phones", None)
        .await;
    assert_eq!(r.status, 401);
    let r = cp
        .call(
            "GET",
            "/v1/0123456789abcdef0123456789abcdef/cloud-phone/phones",
            None,
        )
        .await;
    assert_eq!(r.status, 403);
    let r = cp.login("p1-user", "wrong").await;
    assert_eq!(r.status, 401);

    // IAM projects.
    let r = common::resp(
        cp.http
            .get(format!("{}/v3/projects", cp.base))
            .header("x-auth-token", &cp.token)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(r.body["projects"][0]["id"], json!(cp.project_id));

    // Jobs listing rules.
    let r = cp.call("GET", "/v1/{p}/cloud-phone/jobs", None).await;
    assert_eq!(r.body["error_code"], "CPS.0049");
    let many: Vec<String> = (0..21).map(|i| format!("r{i}")).collect();
    let r = cp
        .call(
            "GET",
            &format!("/v1/{{p}}/cloud-phone/jobs?request_ids={}", many.join(",")),
            None,
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0161");
    for (query, want) in [
        ("request_ids=,", "CPS.0049"),
        ("request_id=a%2Fb", "CPS.0264"),
        ("request_id=0123456789abcdef0123456789abcdef", "CPS.0050"),
    ] {
        let path = format!("/v1/{{p}}/cloud-phone/jobs?{query}");
        let r = cp.call("GET", &path, None).await;
        assert_eq!(r.body["error_code"], want, "{query}: {:?}", r.body);
    }
    let r = cp.call("GET", "/v1/{p}/cloud-phone/jobs/nope", None).await;
    assert_eq!(r.body["error_code"], "CPS.0011");

    // Buying with no host: capacity error, nothing assigned.
    let r = cp
        .call("POST", "/v1/{p}/cloud-phone/phones", Some(buy_body(1)))
        .await;
    assert_eq!(r.body["error_code"], "CPS.0066");
    let r = cp
        .call("POST", "/v2/{p}/cloud-phone/servers", Some(buy_body(1)))
        .await;
    assert_eq!(r.body["error_code"], "CPS.0242");
    let mut b = buy_body(11);
    let r = cp
        .call("POST", "/v1/{p}/cloud-phone/phones", Some(b.clone()))
        .await;
    assert_eq!(r.body["error_code"], "CPS.0024");
    b["count"] = json!(1);
    b["ports"][0]["listen_port"] = json!(80);
    let r = cp
        .call("POST", "/v1/{p}/cloud-phone/phones", Some(b.clone()))
        .await;
    assert_eq!(r.body["error_code"], "CPS.0040");
    b["server_name"] = json!("bad name!");
    let r = cp.call("POST", "/v1/{p}/cloud-phone/phones", Some(b)).await;
    assert_eq!(r.body["error_code"], "CPS.0087");
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buy_phones_jobs_isolation_and_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    // An operator's flavor of the development server for game images.
    dev_flavor(dir.path(), "dev.cg.c1.m512", "cloud_game", 1);
    let cp = Cp::start(dir.path().to_path_buf()).await;
    let (url, seen) = recorder().await;

    // Wrong node token refused; right one registers.
    let r = common::resp(
        cp.http
            .post(format!("{}/agent/v1/register", cp.base))
            .bearer_auth("wrong")
            .json(&inventory("n1", &url))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(r.status, 401);
    for n in ["n1", "n2"] {
        let r = cp
            .agent_post(
                "/agent/v1/register",
                serde_json::to_value(inventory(n, &url)).expect("json"),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.body["heartbeat_secs"], 1);
    }
    let _ = NODE_TOKEN;

    // Buy 2 servers: names with -0001 suffixes, CreateServer to the agent.
    let r = cp
        .call("POST", "/v1/{p}/cloud-phone/phones", Some(buy_body(2)))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let ids: Vec<String> = r.body["server_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_str().expect("s").to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(r.body["order_id"].is_string() && r.body["product_id"].is_string());
    wait_for(&seen, |s| s.servers.len() == 2).await;
    let create = seen.lock().expect("lock").servers[0].clone();
    assert_eq!(create["phones"].as_array().expect("phones").len(), 2);
    assert_eq!(create["flavor"]["memory_mb"], 512);
    assert_eq!(create["image"]["url"], "file:///nonexistent/test.tar.gz");

    // A third server cannot be had.
    let r = cp
        .call("POST", "/v1/{p}/cloud-phone/phones", Some(buy_body(1)))
        .await;
    assert_eq!(r.body["error_code"], "CPS.0066");

    // An image of another label than the phone model's is refused before
    // any host is looked for: the catalog's game image on a phone model.
    let mut game = buy_body(1);
    game["image_id"] = json!(GAME_IMAGE_ID);
    let r = cp
        .call("POST", "/v1/{p}/cloud-phone/phones", Some(game))
        .await;
    assert_eq!(r.body["error_code"], "CPS.0142", "{:?}", r.body);
    let msg = r.body["error_msg"].as_str().expect("error_msg");
    assert!(
        msg.contains("cloud_game") && msg.contains("cloud_phone"),
        "{msg}"
    );

    let r = cp
        .call(
            "GET",
            "/v1/{p}/cloud-phone/servers?server_name=dev-000",
            None,
        )
        .await;
    let names: Vec<String> = r.body["servers"]
        .as_array()
        .expect("list")
        .iter()
        .map(|s| s["server_name"].as_str().expect("n").to_string())
        .collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"dev-0001".to_string()) && names.contains(&"dev-0002".to_string()));
    let r = cp
        .call(
            "GET",
            &format!("/v1/{{p}}/cloud-phone/servers/{}", ids[0]),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(matches!(r.body["status"].as_i64(), Some(0 | 1)));

    // Phones: 4, filter, then the agent reports them running.
    let r = cp
        .call("GET", "/v1/{p}/cloud-phone/phones?limit=10", None)
        .await;
    let phones = r.body["phones"].as_array().expect("phones").clone();
    assert_eq!(phones.len(), 4);
    let r = cp
        .call(
            "GET",
            &format!(
                "/v1/{{p}}/cloud-phone/phones?server_id={}&limit=1&offset=1",
                ids[0]
            ),
            None,
        )
        .await;
    assert_eq!(r.body["phones"].as_array().expect("p").len(), 1);
    let node_of_server0 = create["server_id"].as_str().expect("sid").to_string();
    let node = if seen.lock().expect("lock").servers[0]["server_id"] == json!(node_of_server0) {
        "n1"
    } else {
        "n2"
    };
    let states = running_phones(&create);
    // Which node holds server 0 is decided by the control plane; report from both.
    for n in ["n1", "n2"] {
        let _ = n == node;
        let r = cp
            .agent_post(
                "/agent/v1/heartbeat",
                json!({"node_id": n, "phones": states, "jobs": [],
                       "encoders": [{"server_id": node_of_server0, "status": 1,
                           "access_infos": [{"type": "port1", "phone_ip": "10.9.0.254",
                               "listen_port": 6900, "access_port": 30100,
                               "internet_accessible": true}]}]}),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let r = cp
        .call(
            "GET",
            &format!("/v1/{{p}}/cloud-phone/servers/{node_of_server0}"),
            None,
        )
        .await;
    assert_eq!(r.body["status"], 5, "{:?}", r.body);
    let pid = states[0].phone_id.clone();
    let r = cp
        .call("GET", &format!("/v1/{{p}}/cloud-phone/phones/{pid}"), None)
        .await;
    assert_eq!(r.body["status"], 2);
    assert_eq!(r.body["access_infos"][0]["access_port"], 30001);
    assert_eq!(r.body["access_infos"][0]["public_ip"], "203.0.113.5");
    assert!(r.body["property"].is_string());

    // Batch restart with one bad id: per-target error, job for the rest.
    let r = cp.call("POST", "/v1/{p}/cloud-phone/phones/batch-restart", Some(json!({"phones": [{"phone_id": pid}, {"phone_id": "0123456789abcdef0123456789abcdef"}]}))).await;
    assert_eq!(r.status, 200);
    let jobs = r.body["jobs"].as_array().expect("jobs").clone();
    assert_eq!(jobs[0]["phone_id"], json!(pid));
    assert!(jobs[0]["job_id"].is_string());
    assert_eq!(jobs[1]["error_code"], "CPS.0005");
    let request_id = r.request_id.clone();
    assert_eq!(r.body["request_id"], json!(request_id));
    let job_id = jobs[0]["job_id"].as_str().expect("id").to_string();
    wait_for(&seen, |s| {
        s.jobs.iter().any(|j| j["job_id"] == json!(job_id))
    })
    .await;
    let sent = seen
        .lock()
        .expect("lock")
        .jobs
        .iter()
        .find(|j| j["job_id"] == json!(job_id))
        .cloned()
        .expect("sent");
    assert_eq!(sent["kind"], "restart_phone");
    assert_eq!(sent["image"], Value::Null);
    let r = cp
        .call(
            "GET",
            &format!("/v1/{{p}}/cloud-phone/jobs?request_id={request_id}"),
            None,
        )
        .await;
    assert_eq!(r.body["jobs"][0]["status"], 1);
    // The agent reports success.
    let r = cp.agent_post("/agent/v1/jobs", json!([{"job_id": job_id, "status": 2, "error_code": null, "error_msg": null, "execute_msg": "ok"}])).await;
    assert_eq!(r.status, 200);
    let r = cp
        .call("GET", &format!("/v1/{{p}}/cloud-phone/jobs/{job_id}"), None)
        .await;
    assert_eq!(r.body["status"], 2);
    assert_eq!(r.body["execute_msg"], "ok");
    assert_eq!(r.body["request_id"], json!(request_id), "the job's request");
    assert_eq!(r.request_id, request_id, "in the header too");

    // Migration: one CPH job in two phases. The source's agent writes the
    // phone to the store; then the target's agent restores it under
    // `<job_id>-restore` with the source's properties; its end is the job's.
    let target = states[1].phone_id.clone();
    let nobody = "0".repeat(32);
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-migrate",
            Some(json!({"migrate_infos": [
                {"source_phone_id": nobody, "target_phone_id": target},
                {"source_phone_id": pid, "target_phone_id": nobody},
                {"source_phone_id": pid, "target_phone_id": pid},
            ]})),
        )
        .await;
    let codes: Vec<&Value> = (0..3).map(|i| &r.body["jobs"][i]["error_code"]).collect();
    assert_eq!(
        codes,
        [&json!("CPS.0232"), &json!("CPS.0233"), &json!("CPS.0231")],
        "{:?}",
        r.body
    );
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-migrate",
            Some(
                json!({"migrate_infos": [{"source_phone_id": pid, "target_phone_id": target,
                "bucket_name": "bucket-a", "object_path": "mig/phone.tar",
                "is_migrate_property": "TRUE"}]}),
            ),
        )
        .await;
    assert_eq!(
        r.body["jobs"][0]["source_phone_id"],
        json!(pid),
        "{:?}",
        r.body
    );
    assert_eq!(r.body["jobs"][0]["target_phone_id"], json!(target));
    let mig = r.body["jobs"][0]["job_id"]
        .as_str()
        .expect("migrate job")
        .to_string();
    wait_for(&seen, |s| s.jobs.iter().any(|j| j["job_id"] == json!(mig))).await;
    let sent = seen
        .lock()
        .expect("lock")
        .jobs
        .iter()
        .find(|j| j["job_id"] == json!(mig))
        .cloned()
        .expect("sent");
    assert_eq!(sent["kind"], "migrate");
    assert_eq!(sent["phone_id"], json!(pid));
    assert_eq!(sent["target"]["phone_id"], json!(target));
    let report = |id: &str, status: i32| json!([{"job_id": id, "status": status, "error_code": null, "error_msg": null, "execute_msg": "done"}]);
    cp.agent_post("/agent/v1/jobs", report(&mig, 2)).await;
    let restore_id = format!("{mig}-restore");
    wait_for(&seen, |s| {
        s.jobs.iter().any(|j| j["job_id"] == json!(restore_id))
    })
    .await;
    let restore = seen
        .lock()
        .expect("lock")
        .jobs
        .iter()
        .find(|j| j["job_id"] == json!(restore_id))
        .cloned()
        .expect("restore sent");
    assert_eq!(restore["kind"], "restore");
    assert_eq!(restore["phone_id"], json!(target));
    assert_eq!(restore["object"]["key"], "mig/phone.tar");
    // The whole phone replaces the target's; the user's object is kept.
    assert_eq!(restore["whole_phone"], true, "{restore}");
    assert_eq!(restore.get("remove_object"), None, "{restore}");
    assert!(restore["property"].is_object(), "{restore}");
    let r = cp
        .call("GET", &format!("/v1/{{p}}/cloud-phone/jobs/{mig}"), None)
        .await;
    assert_eq!(r.body["status"], 1, "still restoring: {:?}", r.body);
    // A late report of the finished first phase changes nothing.
    cp.agent_post("/agent/v1/jobs", report(&mig, -1)).await;
    cp.agent_post("/agent/v1/jobs", report(&restore_id, 2))
        .await;
    let r = cp
        .call("GET", &format!("/v1/{{p}}/cloud-phone/jobs/{mig}"), None)
        .await;
    assert_eq!(r.body["status"], 2, "{:?}", r.body);
    assert_eq!(r.body["execute_msg"], "done");
    // The reference's own body names no bucket: the platform's is used, and
    // properties stay unless asked for.
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-migrate",
            Some(json!({"migrate_infos": [{"source_phone_id": pid, "target_phone_id": target}]})),
        )
        .await;
    let mig2 = r.body["jobs"][0]["job_id"]
        .as_str()
        .expect("migrate job")
        .to_string();
    wait_for(&seen, |s| s.jobs.iter().any(|j| j["job_id"] == json!(mig2))).await;
    let sent = seen
        .lock()
        .expect("lock")
        .jobs
        .iter()
        .find(|j| j["job_id"] == json!(mig2))
        .cloned()
        .expect("sent");
    assert_eq!(
        sent["object"]["bucket"],
        cph_agent::protocol::MIGRATE_BUCKET
    );
    assert_eq!(sent["keep_property"], false);
    // The platform's copy goes once restored.
    assert_eq!(sent["platform_object"], true, "{sent}");
    cp.agent_post("/agent/v1/jobs", report(&mig2, 2)).await;
    let restore2 = sent_job(&seen, &format!("{mig2}-restore")).await;
    assert_eq!(
        (&restore2["whole_phone"], &restore2["remove_object"]),
        (&json!(true), &json!(true)),
        "{restore2}"
    );

    // With both phone_ids and server_ids, the phones named are the targets.
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/commands",
            Some(
                json!({"command": "shell", "content": "true", "phone_ids": [pid],
                        "server_ids": [node_of_server0]}),
            ),
        )
        .await;
    let jobs = r.body["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 1, "{:?}", r.body);
    assert_eq!(jobs[0]["phone_id"], json!(pid));
    // ADB: validation and a sync shell limit of 6 a minute. A missing or
    // mistyped parameter gets that parameter's code.
    for (body, want) in [
        (json!({"content": "ls", "phone_ids": [pid]}), "CPS.0117"),
        (
            json!({"command": "shell", "content": 7, "phone_ids": [pid]}),
            "CPS.0118",
        ),
        (
            json!({"command": "shell", "content": "ls", "phone_ids": [7]}),
            "CPS.0080",
        ),
    ] {
        let r = cp
            .call("POST", "/v1/{p}/cloud-phone/phones/commands", Some(body))
            .await;
        assert_eq!(
            (r.status, &r.body["error_code"]),
            (400, &json!(want)),
            "{:?}",
            r.body
        );
    }
    let r = cp.call("POST", "/v1/{p}/cloud-phone/phones/commands", Some(json!({"command": "install", "content": "obs://bucket-a/x.zip", "phone_ids": [pid]}))).await;
    assert_eq!(r.body["error_code"], "CPS.0119");
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/commands",
            Some(json!({"command": "shell", "content": "ls /", "phone_ids": [pid]})),
        )
        .await;
    assert!(r.body["jobs"][0]["job_id"].is_string());
    for i in 0..7 {
        let r = cp
            .call(
                "POST",
                "/v1/{p}/cloud-phone/phones/sync-commands",
                Some(json!({"command": "shell", "content": "echo hi", "phone_ids": [pid]})),
            )
            .await;
        if i < 6 {
            assert_eq!(r.status, 200, "{i} {:?}", r.body);
            // The answer carries the result, not only the job's id.
            let j = &r.body["jobs"][0];
            assert_eq!(
                (&j["status"], &j["error_code"], &j["execute_msg"]),
                (&json!(2), &json!(""), &json!("ran echo hi")),
                "{:?}",
                r.body
            );
        } else {
            // The reference's error table: 400 with CPS.0042.
            assert_eq!((r.status, &r.body["error_code"]), (400, &json!("CPS.0042")));
        }
    }

    // Rename, property, stop, reset.
    let r = cp
        .call(
            "PUT",
            &format!("/v1/{{p}}/cloud-phone/phones/{pid}"),
            Some(json!({"phone_name": "renamed"})),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = cp
        .call(
            "PUT",
            &format!("/v1/{{p}}/cloud-phone/phones/{pid}"),
            Some(json!({"phone_name": "bad name"})),
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0025");
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-update-property",
            Some(json!({"phones": [{"phone_id": pid, "property": "{\"com.cph.mainkeys\":1}"}]})),
        )
        .await;
    // The phone's recorded properties change only once its agent applied
    // the new ones: not while the job runs, not when it failed.
    let prop_job = r.body["jobs"][0]["job_id"]
        .as_str()
        .expect("property job")
        .to_string();
    let recorded = |body: &Value| {
        let text = body["property"].as_str().unwrap_or("{}");
        serde_json::from_str::<Value>(text).expect("property json")["com.cph.mainkeys"].clone()
    };
    let detail_path = format!("/v1/{{p}}/cloud-phone/phones/{pid}");
    let report = |job: &str, status: i32| {
        json!([{"job_id": job, "status": status, "error_code": (status < 0).then_some("CPS.0003"),
                "error_msg": null, "execute_msg": null}])
    };
    sent_job(&seen, &prop_job).await;
    assert_eq!(
        recorded(&cp.call("GET", &detail_path, None).await.body),
        Value::Null
    );
    cp.agent_post("/agent/v1/jobs", report(&prop_job, -1)).await;
    assert_eq!(
        recorded(&cp.call("GET", &detail_path, None).await.body),
        Value::Null
    );
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-update-property",
            Some(
                json!({"phones": [{"phone_id": pid, "property": "{\"com.cph.mainkeys\":\"1\"}"}]}),
            ),
        )
        .await;
    let prop_job = r.body["jobs"][0]["job_id"]
        .as_str()
        .expect("job")
        .to_string();
    sent_job(&seen, &prop_job).await;
    cp.agent_post("/agent/v1/jobs", report(&prop_job, 2)).await;
    assert_eq!(
        recorded(&cp.call("GET", &detail_path, None).await.body),
        json!("1")
    );
    // Names and values are checked before a job is made.
    for (property, code) in [
        ("[1]", "CPS.0078"),
        ("{\"no.such\":\"1\"}", "CPS.0163"),
        ("{\"sys.prop.write_imsi\":\"46000x\"}", "CPS.0075"),
        ("{\"com.cph.cg.app_port\":9000}", "CPS.0164"),
        ("{\"gsm.sim.operator.iso-country\":\"460\"}", "CPS.0131"),
        // Not a value at all: the name is judged first.
        ("{\"no.such\":{}}", "CPS.0163"),
        ("{\"com.cph.mainkeys\":null}", "CPS.0127"),
    ] {
        let r = cp
            .call(
                "POST",
                "/v1/{p}/cloud-phone/phones/batch-update-property",
                Some(json!({"phones": [{"phone_id": pid, "property": property}]})),
            )
            .await;
        assert_eq!(
            r.body["jobs"][0]["error_code"], code,
            "{property}: {:?}",
            r.body
        );
    }
    // The reference's own request example is taken.
    let example = r#"{"sys.prop.writephonenum":"13666666666","sys.prop.writeimsi": "460021624617113","sys.prop.writewifissid":"test_wifi"}"#;
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-update-property",
            Some(json!({"phones": [{"phone_id": pid, "property": example}]})),
        )
        .await;
    assert!(r.body["jobs"][0]["job_id"].is_string(), "{:?}", r.body);
    // What a phone records stays within 2,048 bytes whichever request
    // adds to it: an update or a restart with properties.
    let long = |names: &[&str], n: usize| {
        let v: serde_json::Map<String, Value> = names
            .iter()
            .map(|k| (k.to_string(), json!("x".repeat(n))))
            .collect();
        Value::Object(v).to_string()
    };
    let first = long(
        &[
            "ro.product.name",
            "ro.product.device",
            "ro.build.product",
            "ro.board.platform",
            "ro.hardware.gpu-renderer",
        ],
        250,
    );
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-update-property",
            Some(json!({"phones": [{"phone_id": pid, "property": first}]})),
        )
        .await;
    let big_job = r.body["jobs"][0]["job_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{:?}", r.body))
        .to_string();
    sent_job(&seen, &big_job).await;
    cp.agent_post("/agent/v1/jobs", report(&big_job, 2)).await;
    let more = long(
        &[
            "ro.product.manufacturer",
            "ro.com.cph.sfs_enable",
            "com.cph.cg.heartbeat_url",
        ],
        240,
    )
    .replace("\"xxx", "\"https://xxx");
    for (path, body) in [
        (
            "batch-update-property",
            json!({"phones": [{"phone_id": pid, "property": more}]}),
        ),
        (
            "batch-restart",
            json!({"phones": [{"phone_id": pid, "property": more}]}),
        ),
    ] {
        let r = cp
            .call(
                "POST",
                &format!("/v1/{{p}}/cloud-phone/phones/{path}"),
                Some(body),
            )
            .await;
        assert_eq!(
            r.body["jobs"][0]["error_code"], "CPS.0078",
            "{path}: {:?}",
            r.body
        );
    }
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-stop",
            Some(json!({"phone_ids": []})),
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0009");
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-reset",
            Some(json!({"phones": [{"phone_id": pid}], "image_id": "nope"})),
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0166");
    // A reset or restart to an image of another label fails for the phone
    // whose model runs another label, before any job is sent.
    for op in ["batch-reset", "batch-restart"] {
        let r = cp
            .call(
                "POST",
                &format!("/v1/{{p}}/cloud-phone/phones/{op}"),
                Some(json!({"phones": [{"phone_id": pid}], "image_id": GAME_IMAGE_ID})),
            )
            .await;
        assert_eq!(
            r.body["jobs"][0]["error_code"], "CPS.0142",
            "{op}: {:?}",
            r.body
        );
        assert!(
            r.body["jobs"][0]["job_id"]
                .as_str()
                .is_none_or(str::is_empty),
            "{op}: {:?}",
            r.body
        );
    }
    // A restart to an image of the phone's label: the job carries the
    // image (where its archive is), for the agent to update the phone to.
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-restart",
            Some(json!({"phones": [{"phone_id": pid}], "image_id": cph::catalog::TEST_IMAGE_ID})),
        )
        .await;
    let job = r.body["jobs"][0]["job_id"]
        .as_str()
        .expect("job")
        .to_string();
    let sent = sent_job(&seen, &job).await;
    assert_eq!(sent["kind"], "restart_phone");
    assert_eq!(sent["image"]["image_id"], cph::catalog::TEST_IMAGE_ID);
    assert_eq!(sent["image"]["url"], "file:///nonexistent/test.tar.gz");
    // Export: what each storage_info must hold, checked before a job.
    let info = |include: Value, exclude: Option<Value>, path: &str| {
        let mut i = json!({"phone_id": pid, "bucket_name": "bucket-a", "object_path": path,
                           "include_files": include});
        if let Some(e) = exclude {
            i["exclude_files"] = e;
        }
        i
    };
    for (infos, want) in [
        (
            json!([info(json!(["/data"]), None, "../x.tar")]),
            "CPS.0135",
        ),
        (json!([info(Value::Null, None, "x.tar")]), "CPS.0168"),
        (json!([info(json!(["/system"]), None, "x.tar")]), "CPS.0168"),
        (
            json!([info(json!(["/data"]), Some(json!([])), "x.tar")]),
            "CPS.0169",
        ),
        (
            json!([info(json!(["/data"]), Some(json!(["/etc"])), "x.tar")]),
            "CPS.0169",
        ),
    ] {
        let r = cp
            .call(
                "POST",
                "/v1/{p}/cloud-phone/phones/batch-storage",
                Some(json!({"storage_infos": infos})),
            )
            .await;
        assert_eq!(
            r.body["jobs"][0]["error_code"], want,
            "{infos}: {:?}",
            r.body
        );
    }
    let twice = json!([
        info(json!(["/data"]), None, "a.tar"),
        info(json!(["/cache"]), None, "b.tar")
    ]);
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-storage",
            Some(json!({"storage_infos": twice})),
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0167", "{:?}", r.body);
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-storage",
            Some(json!({"storage_infos": [info(json!(["/data/app/com.xx.xx-*"]), Some(json!(["/data/app/com.xx.xx-1"])), "ok.tar")]})),
        )
        .await;
    let export_job = r.body["jobs"][0]["job_id"]
        .as_str()
        .expect("export job")
        .to_string();
    let sent = sent_job(&seen, &export_job).await;
    assert_eq!(sent["include"], json!(["/data/app/com.xx.xx-*"]));
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones-traffic",
            Some(json!({"phone_ids": [pid], "traffic_type": "bogus"})),
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0207");
    let many: Vec<String> = (0..101).map(|i| format!("{i:032}")).collect();
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones-traffic",
            Some(json!({"phone_ids": many, "traffic_type": "direct"})),
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0209", "{:?}", r.body);

    // Server-level calls in the reference's shapes (as the official SDK sends them).
    let sid = node_of_server0.clone();
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/servers/batch-restart",
            Some(json!({"server_ids": [sid]})),
        )
        .await;
    // One job for the server, as the reference answers.
    let jobs = r.body["jobs"].as_array().expect("jobs").clone();
    assert_eq!(jobs.len(), 1, "{:?}", r.body);
    assert!(jobs
        .iter()
        .all(|j| j["server_id"] == json!(sid) && j["job_id"].is_string()));
    let restart_job = jobs[0]["job_id"].as_str().expect("job id").to_string();
    let sent = loop_until(&seen, |s| {
        s.jobs
            .iter()
            .find(|j| j["job_id"] == json!(restart_job))
            .cloned()
    })
    .await;
    assert_eq!(
        (sent["kind"].as_str(), sent["server_id"].as_str()),
        (Some("restart_server"), Some(sid.as_str())),
        "{sent}"
    );
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/servers/change-server-model",
            Some(
                json!({"server_id": sid, "server_model_name": "physical.dev.local",
                "phone_model_name": "dev.cp.c1.m512", "extend_param": {"is_auto_pay": 1}}),
            ),
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0250", "{:?}", r.body);
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/servers/change-server-model",
            Some(
                json!({"server_id": sid, "server_model_name": "physical.none",
                "phone_model_name": "dev.cp.c1.m512"}),
            ),
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0246", "{:?}", r.body);
    // Refused before any job: a phone flavor of another server model, a
    // server model of other hardware (its host stays).
    let change_path = "/v1/{p}/cloud-phone/servers/change-server-model";
    let change = |sm: &str, pm: &str| {
        json!({"server_id": sid, "server_model_name": sm, "phone_model_name": pm,
               "extend_param": {"is_auto_pay": 1}})
    };
    let r = cp
        .call(
            "POST",
            change_path,
            Some(change("physical.dev.local", "rx1.cp.c60.d10.e1v1")),
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0257", "{:?}", r.body);
    let r = cp
        .call(
            "POST",
            change_path,
            Some(change("physical.rx1.xlarge", "rx1.cp.c60.d10.e1v1")),
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0247", "{:?}", r.body);
    // The change: a job that takes the new flavor to the server's agent;
    // the server keeps its model until the job succeeds.
    let models = |sid: String| {
        let cp = &cp;
        async move {
            let d = cp
                .call("GET", &format!("/v1/{{p}}/cloud-phone/servers/{sid}"), None)
                .await;
            let phones = cp
                .call(
                    "GET",
                    &format!("/v1/{{p}}/cloud-phone/phones?server_id={sid}"),
                    None,
                )
                .await;
            let phone_models: Vec<Value> = phones.body["phones"]
                .as_array()
                .expect("phones")
                .iter()
                .map(|p| p["phone_model_name"].clone())
                .collect();
            (d.body["phone_model_name"].clone(), phone_models)
        }
    };
    let r = cp
        .call(
            "POST",
            change_path,
            Some(change("physical.dev.local", "dev.cp.c1.m768")),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(r.body["order_id"]
        .as_str()
        .is_some_and(|o| o.starts_with("CS")));
    let job = r.body["job_id"].as_str().expect("job_id").to_string();
    // Its request id finds the job.
    let listed = jobs_of_request(&cp, &r).await;
    assert_eq!(listed[0]["job_id"], json!(job), "{listed:?}");
    let sent = sent_job(&seen, &job).await;
    assert_eq!(sent["kind"], "change_flavor");
    assert_eq!(sent["server_id"], json!(sid));
    assert_eq!(sent["server_model_name"], "physical.dev.local");
    assert_eq!(sent["flavor"]["flavor_id"], "dev.cp.c1.m768");
    assert_eq!(sent["flavor"]["memory_mb"], 768);
    let m512 = json!("dev.cp.c1.m512");
    let m768 = json!("dev.cp.c1.m768");
    assert_eq!(
        models(sid.clone()).await,
        (m512.clone(), vec![m512.clone(); 2])
    );
    let done = |status: i32| {
        json!([{"job_id": job, "status": status, "error_code": null, "error_msg": null,
                "execute_msg": null}])
    };
    assert_eq!(cp.agent_post("/agent/v1/jobs", done(2)).await.status, 200);
    let on_m768 = (m768.clone(), vec![m768; 2]);
    assert_eq!(models(sid.clone()).await, on_m768);
    // A change whose job fails leaves the model as it was.
    let r = cp
        .call(
            "POST",
            change_path,
            Some(change("physical.dev.local", "dev.cp.c1.m512")),
        )
        .await;
    let job = r.body["job_id"].as_str().expect("job_id").to_string();
    sent_job(&seen, &job).await;
    let failed = json!([{"job_id": job, "status": -1, "error_code": "CPS.0257",
                         "error_msg": "does not fit", "execute_msg": null}]);
    assert_eq!(cp.agent_post("/agent/v1/jobs", failed).await.status, 200);
    assert_eq!(models(sid.clone()).await, on_m768);
    // The phones keep their images: a flavor of another image label is
    // refused before any job.
    let r = cp
        .call(
            "POST",
            change_path,
            Some(change("physical.dev.local", "dev.cg.c1.m512")),
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0257", "{:?}", r.body);
    assert!(
        r.body["error_msg"]
            .as_str()
            .is_some_and(|m| m.contains("cloud_phone image") && m.contains("cloud_game")),
        "{:?}",
        r.body
    );
    assert_eq!(models(sid.clone()).await, on_m768);
    let r = cp
        .call(
            "DELETE",
            "/v1/{p}/cloud-phone/phones/share-apps",
            Some(json!({"package_name": "com.example.app", "server_ids": [sid]})),
        )
        .await;
    assert_eq!(r.body["jobs"][0]["server_id"], json!(sid), "{:?}", r.body);
    let r = cp
        .call(
            "PUT",
            "/v1/{p}/cloud-phone/servers/open-access",
            Some(json!({"servers": [{"server_id": sid, "keypair_name": "nope"}]})),
        )
        .await;
    assert_eq!(r.body["jobs"][0]["error_code"], "CPS.0067", "{:?}", r.body);
    // A keypair the project has: the server shows it once its agent put
    // the key in place, not before, and not after a failure.
    cph::store::Store::open_dir(dir.path())
        .expect("store")
        .put_keypair(
            &cp.project_id,
            "second",
            "ssh-ed25519 AAAAsecond second@cph",
        )
        .expect("keypair");
    let keypair_of = || async {
        cp.call("GET", &format!("/v1/{{p}}/cloud-phone/servers/{sid}"), None)
            .await
            .body["keypair_name"]
            .clone()
    };
    let before = keypair_of().await;
    let change = |name: &'static str| {
        let cp = &cp;
        let sid = sid.clone();
        async move {
            let r = cp
                .call(
                    "PUT",
                    "/v1/{p}/cloud-phone/servers/open-access",
                    Some(json!({"servers": [{"server_id": sid, "keypair_name": name}]})),
                )
                .await;
            r.body["jobs"][0]["job_id"]
                .as_str()
                .unwrap_or_else(|| panic!("{:?}", r.body))
                .to_string()
        }
    };
    let job = change("second").await;
    let sent = sent_job(&seen, &job).await;
    assert_eq!(sent["keypair_name"], "second", "{sent}");
    assert_eq!(keypair_of().await, before, "not before the agent's answer");
    let failed = json!([{"job_id": job, "status": -1, "error_code": "CPS.0003", "error_msg": "no", "execute_msg": null}]);
    assert_eq!(cp.agent_post("/agent/v1/jobs", failed).await.status, 200);
    assert_eq!(keypair_of().await, before, "nor after a failure");
    let job = change("second").await;
    let done = json!([{"job_id": job, "status": 2, "error_code": null, "error_msg": null, "execute_msg": "ok"}]);
    assert_eq!(cp.agent_post("/agent/v1/jobs", done).await.status, 200);
    assert_eq!(keypair_of().await, json!("second"));
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/encode-servers/batch-restart",
            Some(json!({"encode_server_ids": [sid]})),
        )
        .await;
    assert_eq!(
        r.body["jobs"][0]["encode_server_id"],
        json!(sid),
        "{:?}",
        r.body
    );
    assert!(r.body["jobs"][0].get("server_id").is_none(), "{:?}", r.body);
    // Its mapped ports as the reference's access_info has them.
    let r = cp
        .call(
            "GET",
            &format!("/v1/{{p}}/cloud-phone/encode-servers?server_id={sid}"),
            None,
        )
        .await;
    let enc = &r.body["encode_servers"][0];
    let server_ip = enc["encode_server_ip"].clone();
    assert_eq!(
        enc["access_infos"],
        json!([{"type": "port1", "listen_port": 6900, "access_port": 30100,
                "public_ip": "203.0.113.5", "access_ip": "203.0.113.5",
                "server_ip": server_ip, "intranet_ip": server_ip}]),
        "{:?}",
        r.body
    );
    for (q, n) in [
        ("status=1", 1),
        ("status=2", 0),
        ("type=1", 1),
        ("type=0", 0),
    ] {
        let r = cp
            .call(
                "GET",
                &format!("/v1/{{p}}/cloud-phone/encode-servers?server_id={sid}&{q}"),
                None,
            )
            .await;
        let got = r.body["encode_servers"].as_array().expect("list").len();
        assert_eq!(got, n, "{q}: {:?}", r.body);
    }

    // Another project sees nothing of p1.
    let other = common::prepare(dir.path(), "p2");
    let r2 = cp.login("p2-user", "pw").await;
    let tok2 = r2.subject_token.expect("token");
    let r = common::resp(
        cp.http
            .get(format!("{}/v1/{other}/cloud-phone/phones/{pid}", cp.base))
            .header("x-auth-token", &tok2)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(
        (r.status, r.body["error_code"].as_str()),
        (400, Some("CPS.0005"))
    );
    let r = common::resp(
        cp.http
            .get(format!("{}/v1/{other}/cloud-phone/phones", cp.base))
            .header("x-auth-token", &tok2)
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(r.body["phones"].as_array().expect("list").len(), 0);
    let r = cp
        .call_as(&tok2, "GET", "/v1/{p}/cloud-phone/phones", None)
        .await;
    assert_eq!(r.status, 403);

    // Restart: same data dir, same state. A control plane away longer than
    // the silent period gives its agents a whole period to reach it again
    // before their servers read abnormal.
    // The agents report in just before (the steps above take longer than
    // the silent period under emulation, password checks among them).
    for n in ["n1", "n2"] {
        let r = cp
            .agent_post(
                "/agent/v1/heartbeat",
                json!({"node_id": n, "phones": states, "jobs": []}),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let server_path = format!("/v1/{{p}}/cloud-phone/servers/{node_of_server0}");
    let before = cp.call("GET", &server_path, None).await.body["status"].clone();
    assert_ne!(before, json!(2), "alive before the restart");
    let token = cp.token.clone();
    cp.stop().await;
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let cp = Cp::start(dir.path().to_path_buf()).await;
    // Its liveness check has run by then (within the 3 s silent period).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(
        cp.call("GET", &server_path, None).await.body["status"],
        before,
        "not silent at once"
    );
    let r = cp
        .call_as(
            &token,
            "GET",
            &format!("/v1/{{p}}/cloud-phone/jobs/{job_id}"),
            None,
        )
        .await;
    assert_eq!(r.body["status"], 2);
    let r = cp.call("GET", "/v1/{p}/cloud-phone/phones", None).await;
    assert_eq!(r.body["phones"].as_array().expect("list").len(), 4);

    // Silent agents: server abnormal (2), phones abnormal (-7).
    tokio::time::sleep(std::time::Duration::from_secs(5 * u64::from(slowdown()))).await;
    let r = cp
        .call(
            "GET",
            &format!("/v1/{{p}}/cloud-phone/servers/{node_of_server0}"),
            None,
        )
        .await;
    assert_eq!(r.body["status"], 2, "{:?}", r.body);
    let r = cp
        .call("GET", &format!("/v1/{{p}}/cloud-phone/phones/{pid}"), None)
        .await;
    assert_eq!(r.body["status"], -7);
    cp.stop().await;
}

/// Deleting a server (`DELETE /v2/.../servers`): refused while it is being
/// created; its job waits for the jobs before it on the server; meanwhile
/// the server shows as being deleted and takes no more jobs; a failed
/// deletion leaves it abnormal and deletable again; a finished one removes
/// it, its phones and its bandwidth, keeps the jobs, and frees the host
/// for the next purchase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_deletion_waits_for_earlier_jobs_and_frees_the_host() {
    let (_dir, cp, _url, seen) = with_nodes(&["n1"]).await;
    // The server model is on sale while a host of it is free.
    let offering = || async {
        let r = cp.call("GET", "/v1/{p}/server-model-offerings", None).await;
        let models = r.body["models"].as_array().cloned().unwrap_or_default();
        models
            .iter()
            .find(|m| m["model_name"] == "physical.dev.local")
            .map(|m| m["sell_status"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(offering().await.as_deref(), Some("available"));
    let sid = buy(&cp, &seen, 1).await.remove(0);
    assert_eq!(offering().await.as_deref(), Some("sellout"));
    let create = seen.lock().expect("lock").servers[0].clone();
    let delete = |ids: Value| json!({ "server_ids": ids });

    // Still being created: refused, nothing done.
    let r = cp
        .call(
            "DELETE",
            "/v2/{p}/cloud-phone/servers",
            Some(delete(json!([sid]))),
        )
        .await;
    assert_eq!(
        (r.status, r.body["error_code"].as_str()),
        (400, Some("CPS.0105"))
    );

    // The agent keeps reporting the phones running (a silent agent would
    // fail the jobs).
    let states = running_phones(&create);
    let pid = states[0].phone_id.clone();
    let beat = keep_beating(&cp, "n1", states.clone());
    let status = |r: &common::Resp| r.body["status"].as_i64();
    let server_path = format!("/v1/{{p}}/cloud-phone/servers/{sid}");
    for _ in 0..50 * slowdown() {
        if status(&cp.call("GET", &server_path, None).await) == Some(5) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status(&cp.call("GET", &server_path, None).await), Some(5));

    // Bad requests.
    let r = cp
        .call(
            "DELETE",
            "/v2/{p}/cloud-phone/servers",
            Some(delete(json!([]))),
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0095");
    let unknown = "0123456789abcdef0123456789abcdef";
    let r = cp
        .call(
            "DELETE",
            "/v2/{p}/cloud-phone/servers",
            Some(delete(json!([sid, unknown]))),
        )
        .await;
    assert_eq!(
        (r.status, r.body["error_code"].as_str()),
        (400, Some("CPS.0015"))
    );
    let many: Vec<String> = (0..101).map(|i| format!("{i:032x}")).collect();
    let r = cp
        .call(
            "DELETE",
            "/v2/{p}/cloud-phone/servers",
            Some(delete(json!(many))),
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0096");
    assert_eq!(status(&cp.call("GET", &server_path, None).await), Some(5));

    let tag = json!({"action": "create", "tags": [{"key": "env", "value": "prod"}]});
    let r = cp
        .call(
            "POST",
            &format!("/v1/{{p}}/cph-server/{sid}/tags/action"),
            Some(tag),
        )
        .await;
    assert_eq!(r.status, 204, "{:?}", r.body);

    // A job of the phone runs at its agent; the deletion waits for it.
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-restart",
            Some(json!({"phones": [{"phone_id": pid}]})),
        )
        .await;
    let restart = r.body["jobs"][0]["job_id"]
        .as_str()
        .expect("job")
        .to_string();
    wait_for(&seen, |s| {
        s.jobs.iter().any(|j| j["job_id"] == json!(restart))
    })
    .await;
    let r = cp
        .call(
            "DELETE",
            "/v2/{p}/cloud-phone/servers",
            Some(delete(json!([sid, sid]))),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let first = r.body["job_id"].as_str().expect("job_id").to_string();
    let request = r.body["request_id"]
        .as_str()
        .expect("request_id")
        .to_string();
    let r = cp
        .call(
            "GET",
            &format!("/v1/{{p}}/cloud-phone/jobs?request_id={request}"),
            None,
        )
        .await;
    assert_eq!(
        r.body["jobs"].as_array().map(Vec::len),
        Some(1),
        "{:?}",
        r.body
    );
    assert_eq!(status(&cp.call("GET", &server_path, None).await), Some(11));
    let r = cp
        .call(
            "DELETE",
            "/v2/{p}/cloud-phone/servers",
            Some(delete(json!([sid]))),
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0105");
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-stop",
            Some(json!({"phone_ids": [pid]})),
        )
        .await;
    assert_eq!(r.body["jobs"][0]["error_code"], "CPS.0105", "{:?}", r.body);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let sent = |id: &str| {
        seen.lock()
            .expect("lock")
            .jobs
            .iter()
            .find(|j| j["job_id"] == json!(id))
            .cloned()
    };
    assert!(
        sent(&first).is_none(),
        "deletion sent before the restart ended"
    );
    let report = |id: &str, status: i32| {
        json!([{"job_id": id, "status": status,
        "error_code": (status < 0).then_some("CPS.0003"), "error_msg": null, "execute_msg": null}])
    };
    cp.agent_post("/agent/v1/jobs", report(&restart, 2)).await;
    wait_for(&seen, |s| {
        s.jobs.iter().any(|j| j["job_id"] == json!(first))
    })
    .await;
    assert_eq!(sent(&first).expect("sent")["kind"], "delete_server");

    // Failed: still there, abnormal until its agent reports its phones
    // again (the heartbeats here do), deletable again.
    cp.agent_post("/agent/v1/jobs", report(&first, -1)).await;
    let after = status(&cp.call("GET", &server_path, None).await);
    assert!(matches!(after, Some(2 | 5)), "{after:?}");
    let r = cp
        .call(
            "DELETE",
            "/v2/{p}/cloud-phone/servers",
            Some(delete(json!([sid]))),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let second = r.body["job_id"].as_str().expect("job_id").to_string();
    wait_for(&seen, |s| {
        s.jobs.iter().any(|j| j["job_id"] == json!(second))
    })
    .await;
    cp.agent_post("/agent/v1/jobs", report(&second, 2)).await;

    // Done: server, phones and bandwidth gone, jobs kept, host free.
    let r = cp.call("GET", &server_path, None).await;
    assert_eq!(
        (r.status, r.body["error_code"].as_str()),
        (400, Some("CPS.0015"))
    );
    let r = cp.call("GET", "/v1/{p}/cloud-phone/phones", None).await;
    assert_eq!(r.body["phones"], json!([]), "{:?}", r.body);
    let r = cp.call("GET", "/v1/{p}/cloud-phone/bandwidths", None).await;
    assert_eq!(r.body["band_widths"], json!([]), "{:?}", r.body);
    let r = cp.call("GET", "/v1/{p}/cph-server/tags", None).await;
    assert_eq!(r.body["total_count"], 0, "{:?}", r.body);
    assert_eq!(offering().await.as_deref(), Some("available"));
    for (id, want) in [(&first, -1), (&second, 2)] {
        let r = cp
            .call("GET", &format!("/v1/{{p}}/cloud-phone/jobs/{id}"), None)
            .await;
        assert_eq!(status(&r), Some(want), "{:?}", r.body);
    }
    assert_ne!(buy(&cp, &seen, 1).await, vec![sid]);
    beat.abort();
    cp.stop().await;
}

/// A project's bandwidths are found by id however many it has (each order
/// of a new bandwidth adds one; lookups once saw only the newest 100); a
/// bandwidth update answers the request id its jobs are filed under; an
/// order naming a keypair the project lacks is refused before anything is
/// made; a dedicated bandwidth takes the size given, in the reference's
/// steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidths_by_id_and_order_checks() {
    let (_dir, cp, _url, seen) = with_nodes(&["n1", "n2", "n3"]).await;
    let order = |band_width: Value, keypair: &str| {
        let mut b = buy_body(1);
        b["band_width"] = band_width;
        b["keypair_name"] = json!(keypair);
        b
    };
    let place = |body: Value| {
        let cp = &cp;
        async move {
            cp.call("POST", "/v1/{p}/cloud-phone/phones", Some(body))
                .await
        }
    };
    let shared = json!({"band_width_share_type": 1, "band_width_size": 100,
                        "band_width_charge_mode": 0});
    let r = place(order(shared, "")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let first = r.body["server_ids"][0].as_str().expect("id").to_string();
    wait_for(&seen, |s| s.servers.len() == 1).await;
    let server = |id: String| {
        let cp = &cp;
        async move {
            cp.call("GET", &format!("/v1/{{p}}/cloud-phone/servers/{id}"), None)
                .await
                .body
        }
    };
    let bw = server(first.clone()).await["band_widths"][0]["band_width_id"]
        .as_str()
        .expect("the server's bandwidth")
        .to_string();
    // 100 newer bandwidths of the project.
    let store = cph::store::Store::open_dir(&cp.dir).expect("store");
    for i in 0..100 {
        store
            .insert_bandwidth(&cph::store::Bandwidth {
                band_width_id: format!("bw-{i:03}"),
                project_id: cp.project_id.clone(),
                band_width_name: format!("other-{i}"),
                band_width_size: 10,
                band_width_share_type: 1,
                band_width_charge_mode: 0,
                create_time: "2026-01-01T00:00:00Z".into(),
                update_time: "2026-01-01T00:00:00Z".into(),
            })
            .expect("bandwidth");
    }
    let shown = server(first.clone()).await;
    assert_eq!(
        shown["band_widths"][0]["band_width_id"],
        json!(bw),
        "{shown}"
    );

    // The update finds it and answers the request id of its job.
    let r = cp
        .call(
            "PUT",
            &format!("/v1/{{p}}/cloud-phone/bandwidths/{bw}"),
            Some(json!({"band_width_size": 200})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let jobs = jobs_of_request(&cp, &r).await;
    assert_eq!(jobs[0]["server_id"], json!(first), "{jobs:?}");

    // A keypair the project lacks: CPS.0067, no server made.
    let joined = json!({"band_width_id": bw});
    let r = place(order(joined.clone(), "no-such-keypair")).await;
    assert_eq!(r.body["error_code"], "CPS.0067", "{:?}", r.body);
    let listed = cp.call("GET", "/v1/{p}/cloud-phone/servers", None).await;
    assert_eq!(listed.body["count"], 1, "{:?}", listed.body);

    // An order joining it by id.
    let r = place(order(joined, "")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let second = r.body["server_ids"][0].as_str().expect("id").to_string();
    let shown = server(second).await;
    assert_eq!(
        (
            &shown["band_widths"][0]["band_width_id"],
            &shown["band_widths"][0]["band_width_size"]
        ),
        (&json!(bw), &json!(200)),
        "{shown}"
    );

    // Dedicated: the size given, in the reference's steps.
    for bad in [0, 301, 2500] {
        let dedicated = json!({"band_width_share_type": 0, "band_width_size": bad});
        let r = place(order(dedicated, "")).await;
        assert_eq!(r.body["error_code"], "CPS.0036", "{bad}: {:?}", r.body);
    }
    let dedicated = json!({"band_width_share_type": 0, "band_width_size": 50});
    let r = place(order(dedicated, "")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let third = r.body["server_ids"][0].as_str().expect("id").to_string();
    let shown = server(third).await;
    assert_eq!(
        shown["band_widths"][0]["band_width_size"],
        json!(50),
        "{shown}"
    );
    assert_eq!(
        shown["band_widths"][0]["band_width_share_type"],
        json!(0),
        "{shown}"
    );

    // A share-apps deletion of more package names than a job takes.
    let names: Vec<String> = (0..101).map(|i| format!("com.example.app{i}")).collect();
    let r = cp
        .call(
            "DELETE",
            "/v1/{p}/cloud-phone/phones/share-apps",
            Some(json!({"server_ids": [first], "package_names": names})),
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0001", "{:?}", r.body);
    cp.stop().await;
}

/// A server whose agent, alive, keeps refusing its creation is given up
/// once the agent had as long as it may be silent: its phones read
/// creation failed (-8), as when a creation job fails, rather than
/// creating for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_its_agent_keeps_refusing_is_given_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = Cp::start(dir.path().to_path_buf()).await;
    let tries = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = tries.clone();
    let app = axum::Router::new().route(
        "/v1/servers",
        post(move || {
            let t = counted.clone();
            async move {
                t.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                axum::http::StatusCode::INTERNAL_SERVER_ERROR
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    let inv = serde_json::to_value(inventory("n1", &url)).expect("json");
    assert_eq!(cp.agent_post("/agent/v1/register", inv).await.status, 200);
    let beat = keep_beating(&cp, "n1", vec![]);
    let r = cp
        .call("POST", "/v1/{p}/cloud-phone/phones", Some(buy_body(1)))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sid = r.body["server_ids"][0].as_str().expect("id").to_string();
    let mut states = Vec::new();
    for _ in 0..120 * slowdown() {
        states = phone_fields(&cp, &sid, "status").await;
        if !states.is_empty() && states.iter().all(|s| *s == json!(-8)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(
        !states.is_empty() && states.iter().all(|s| *s == json!(-8)),
        "creation failed: {states:?}"
    );
    assert!(tries.load(std::sync::atomic::Ordering::SeqCst) >= 5);
    let path = format!("/v1/{{p}}/cloud-phone/servers/{sid}");
    let status = cp.call("GET", &path, None).await.body["status"].clone();
    assert_ne!(status, json!(1), "the server no longer reads creating");
    beat.abort();
    cp.stop().await;
}

/// Tags of servers (the SDK's tag operations): set, replaced, deleted,
/// listed per server and per project, and servers found by tags and name;
/// bad input answers the reference's CPS.03xx codes and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tags() {
    let (_dir, cp, _url, seen) = with_nodes(&["n1", "n2"]).await;
    let ids = buy(&cp, &seen, 2).await;
    let (a, b) = (&ids[0], &ids[1]);
    let name_of = |r: &common::Resp| r.body["server_name"].as_str().expect("name").to_string();
    let b_name = name_of(
        &cp.call("GET", &format!("/v1/{{p}}/cloud-phone/servers/{b}"), None)
            .await,
    );
    let act = |id: &str, action: &str, tags: Value| {
        let path = format!("/v1/{{p}}/cph-server/{id}/tags/action");
        let body = json!({"action": action, "tags": tags});
        let cp = &cp;
        async move { cp.call("POST", &path, Some(body)).await }
    };
    let tags_of = |id: &str| {
        let path = format!("/v1/{{p}}/cph-server/{id}/tags");
        let cp = &cp;
        async move { cp.call("GET", &path, None).await.body["tags"].clone() }
    };

    let r = act(
        a,
        "create",
        json!([{"key": "env", "value": "prod"}, {"key": "team", "value": "a"}]),
    )
    .await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    assert_eq!(
        act(b, "create", json!([{"key": "env", "value": "stage"}]))
            .await
            .status,
        204
    );
    assert_eq!(
        tags_of(a).await,
        json!([{"key": "env", "value": "prod"}, {"key": "team", "value": "a"}])
    );
    // A key already there takes the new value.
    assert_eq!(
        act(a, "create", json!([{"key": "team", "value": "b"}]))
            .await
            .status,
        204
    );
    assert_eq!(tags_of(a).await[1], json!({"key": "team", "value": "b"}));

    // Bad input: the reference's codes, nothing written.
    let code = |r: common::Resp| {
        (
            r.status,
            r.body["error_code"].as_str().unwrap_or("").to_string(),
        )
    };
    let bad = |s: &str| (400, s.to_string());
    let r = cp
        .call(
            "POST",
            &format!("/v1/{{p}}/cph-phone/{a}/tags/action"),
            Some(json!({"action": "create", "tags": [{"key": "k", "value": "v"}]})),
        )
        .await;
    assert_eq!(code(r), bad("CPS.0300"));
    assert_eq!(
        code(act("bad!id", "create", json!([{"key": "k", "value": "v"}])).await),
        bad("CPS.0301")
    );
    let unknown = "0123456789abcdef0123456789abcdef";
    assert_eq!(
        code(act(unknown, "create", json!([{"key": "k", "value": "v"}])).await),
        (400, "CPS.0302".to_string())
    );
    assert_eq!(code(act(a, "create", json!([])).await), bad("CPS.0303"));
    assert_eq!(
        code(
            act(
                a,
                "create",
                json!([{"key": "k", "value": "1"}, {"key": "k", "value": "2"}])
            )
            .await
        ),
        bad("CPS.0303")
    );
    assert_eq!(
        code(act(a, "create", json!([{"key": "a;b", "value": "v"}])).await),
        bad("CPS.0304")
    );
    assert_eq!(
        code(act(a, "create", json!([{"key": "k", "value": " v"}])).await),
        bad("CPS.0305")
    );
    assert_eq!(
        code(act(a, "create", json!([{"key": "_sys_k", "value": "v"}])).await),
        bad("CPS.0306")
    );
    let many: Vec<Value> = (0..19)
        .map(|i| json!({"key": format!("k{i}"), "value": "v"}))
        .collect();
    assert_eq!(code(act(a, "create", json!(many)).await), bad("CPS.0307"));
    assert_eq!(
        code(act(a, "rename", json!([{"key": "k", "value": "v"}])).await),
        bad("CPS.0001")
    );
    assert_eq!(tags_of(a).await.as_array().map(Vec::len), Some(2));

    // The project's keys with their values, a page at a time.
    let r = cp.call("GET", "/v1/{p}/cph-server/tags", None).await;
    assert_eq!(r.body["total_count"], 2);
    assert_eq!(
        r.body["tags"][0],
        json!({"key": "env", "values": ["prod", "stage"]})
    );
    let r = cp
        .call("GET", "/v1/{p}/cph-server/tags?limit=1&offset=1", None)
        .await;
    assert_eq!(r.body["tags"], json!([{"key": "team", "values": ["b"]}]));
    let r = cp
        .call("GET", "/v1/{p}/cph-server/tags?limit=0", None)
        .await;
    assert_eq!(code(r), bad("CPS.0002"));

    // Servers by tags and name.
    let find = |body: Value| {
        let cp = &cp;
        async move {
            cp.call(
                "POST",
                "/v1/{p}/cph-server/resource_instances/action",
                Some(body),
            )
            .await
        }
    };
    let ids_of = |r: &common::Resp| -> Vec<String> {
        r.body["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .map(|x| x["resource_id"].as_str().expect("id").to_string())
            .collect()
    };
    let r = find(json!({"action": "filter", "tags": [{"key": "env", "values": ["prod"]}]})).await;
    assert_eq!(ids_of(&r), vec![a.clone()], "{:?}", r.body);
    assert_eq!(
        r.body["resources"][0]["tags"].as_array().map(Vec::len),
        Some(2)
    );
    let r = find(json!({"action": "filter", "tags": [{"key": "env", "values": []}]})).await;
    assert_eq!(r.body["total_count"], 2);
    let r = find(json!({"action": "filter", "limit": "1", "offset": "1",
                        "tags": [{"key": "env", "values": []}]}))
    .await;
    assert_eq!(
        (ids_of(&r).len(), r.body["total_count"].as_i64()),
        (1, Some(2))
    );
    let r = find(json!({"action": "count", "tags": [{"key": "team", "values": ["b"]}]})).await;
    assert_eq!(
        r.body,
        json!({"total_count": 1, "request_id": r.body["request_id"]})
    );
    let r =
        find(json!({"action": "filter", "matches": [{"key": "resource_name", "value": b_name}]}))
            .await;
    assert_eq!(ids_of(&r), vec![b.clone()]);
    assert_eq!(
        code(find(json!({"action": "filter", "limit": "0"})).await),
        bad("CPS.0002")
    );
    assert_eq!(
        code(
            find(json!({"action": "filter", "matches": [{"key": "resource_id", "value": "x"}]}))
                .await
        ),
        bad("CPS.0313")
    );
    assert_eq!(code(find(json!({"action": "list"})).await), bad("CPS.0001"));

    // Deleted by key; a value given must match.
    assert_eq!(
        act(b, "delete", json!([{"key": "env", "value": "prod"}]))
            .await
            .status,
        204
    );
    assert_eq!(tags_of(b).await, json!([{"key": "env", "value": "stage"}]));
    assert_eq!(act(b, "delete", json!([{"key": "env"}])).await.status, 204);
    assert_eq!(tags_of(b).await, json!([]));
    let r = find(json!({"action": "filter", "without_any_tag": true})).await;
    assert_eq!(ids_of(&r), vec![b.clone()]);

    // Server model offerings, a page at a time by marker.
    let r = cp.call("GET", "/v1/{p}/server-model-offerings", None).await;
    let all: Vec<Value> = r.body["models"].as_array().cloned().unwrap_or_default();
    assert_eq!(r.body["count"].as_u64(), Some(all.len() as u64));
    assert!(all.len() >= 2, "{:?}", r.body);
    assert_eq!(r.body["page_info"]["next_marker"], Value::Null);
    let r = cp
        .call("GET", "/v1/{p}/server-model-offerings?limit=1", None)
        .await;
    assert_eq!(r.body["models"], json!([all[0]]));
    let marker = r.body["page_info"]["next_marker"]
        .as_str()
        .expect("marker")
        .to_string();
    let r = cp
        .call(
            "GET",
            &format!("/v1/{{p}}/server-model-offerings?limit=1&marker={marker}"),
            None,
        )
        .await;
    assert_eq!(r.body["models"], json!([all[1]]));
    let r = cp
        .call("GET", "/v1/{p}/server-model-offerings?limit=1001", None)
        .await;
    assert_eq!(code(r), bad("CPS.0002"));
    let r = cp
        .call("GET", "/v1/{p}/server-model-offerings?marker=nope", None)
        .await;
    assert_eq!(code(r), bad("CPS.0001"));
    cp.stop().await;
}

/// `expand-volume`: one job per phone with the size in GiB; a size out of
/// 1..=32768 or an unknown phone is refused in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expand_volume_jobs() {
    let (_dir, cp, _url, seen) = with_nodes(&["n1"]).await;
    buy(&cp, &seen, 1).await;
    let create = seen.lock().expect("lock").servers[0].clone();
    let (a, b) = (
        create["phones"][0]["phone_id"]
            .as_str()
            .expect("a")
            .to_string(),
        create["phones"][1]["phone_id"]
            .as_str()
            .expect("b")
            .to_string(),
    );
    let unknown = "0123456789abcdef0123456789abcdef";
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/expand-volume",
            Some(json!({"phones": [{"phone_id": a, "new_size": 64},
                                   {"phone_id": b, "new_size": 32769},
                                   {"phone_id": unknown, "new_size": 8}]})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let jobs = r.body["jobs"].as_array().expect("jobs").clone();
    assert_eq!(jobs[1]["error_code"], "CPS.0001", "{jobs:?}");
    assert_eq!(jobs[2]["error_code"], "CPS.0005", "{jobs:?}");
    let id = jobs[0]["job_id"].as_str().expect("job").to_string();
    wait_for(&seen, |s| s.jobs.iter().any(|j| j["job_id"] == json!(id))).await;
    let sent = seen
        .lock()
        .expect("lock")
        .jobs
        .iter()
        .find(|j| j["job_id"] == json!(id))
        .cloned()
        .expect("sent");
    assert_eq!(
        (sent["kind"].as_str(), sent["disk_gb"].as_u64()),
        (Some("expand_volume"), Some(64))
    );
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/expand-volume",
            Some(json!({"phones": []})),
        )
        .await;
    assert_eq!(r.body["error_code"], "CPS.0009");
    cp.stop().await;
}

/// A server's share apps snapshot is what its agent last reported, with
/// the time; one package or a page at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_apps_snapshot() {
    let (_dir, cp, _url, seen) = with_nodes(&["n1"]).await;
    let sid = buy(&cp, &seen, 1).await.remove(0);
    // A phone its agent reports down after a failed reset or restart reads
    // as that step failed (-5, -6), not as a failed creation (-8).
    let create = seen.lock().expect("lock").servers[0].clone();
    for (state, status) in [
        (cph_agent::protocol::PhoneRunState::ResetFailed, -5),
        (cph_agent::protocol::PhoneRunState::RestartFailed, -6),
        (cph_agent::protocol::PhoneRunState::Failed, -8),
    ] {
        let mut phones = running_phones(&create);
        phones[0].state = state;
        let pid = phones[0].phone_id.clone();
        let hb = json!({"node_id": "n1", "phones": phones, "jobs": []});
        assert_eq!(cp.agent_post("/agent/v1/heartbeat", hb).await.status, 200);
        let r = cp
            .call("GET", &format!("/v1/{{p}}/cloud-phone/phones/{pid}"), None)
            .await;
        assert_eq!(r.body["status"], status, "{state:?}: {:?}", r.body);
    }
    let path = format!("/v1/{{p}}/servers/{sid}/share-apps-snapshot");
    let r = cp.call("GET", &path, None).await;
    assert_eq!(
        (r.status, r.body["share_apps"].clone()),
        (200, json!([])),
        "{:?}",
        r.body
    );
    let apps = json!([{"package_name": "com.a.one", "versions": ["1.0"]},
                      {"package_name": "com.a.two", "versions": []},
                      {"package_name": "com.b.three", "versions": ["3", "3.1"]}]);
    let r = cp
        .agent_post(
            "/agent/v1/heartbeat",
            json!({"node_id": "n1", "phones": [], "jobs": [], "share_apps": apps}),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = cp.call("GET", &path, None).await;
    assert_eq!(r.body["share_apps"], apps);
    // The host's pools show as the server's volumes: registered, then as
    // each heartbeat measures them.
    let detail = format!("/v1/{{p}}/cloud-phone/servers/{sid}");
    let d = cp.call("GET", &detail, None).await;
    assert_eq!(
        (
            d.body["volumes"][0]["volume_size"].clone(),
            d.body["volumes"][0]["volume_type"].clone(),
            d.body["volumes"].as_array().map(Vec::len)
        ),
        (json!(64), json!("btrfs"), Some(1)),
        "{:?}",
        d.body
    );
    let pools = json!([
        {"name": "thinpool", "backend": "btrfs", "size_bytes": 128u64 << 30,
         "used_bytes": 2u64 << 30, "avail_bytes": 126u64 << 30},
        {"name": "sharepool", "backend": "btrfs", "size_bytes": 50u64 << 30,
         "used_bytes": 0, "avail_bytes": 50u64 << 30}]);
    let hb = cp
        .agent_post(
            "/agent/v1/heartbeat",
            json!({"node_id": "n1", "phones": [], "jobs": [], "pools": pools}),
        )
        .await;
    assert_eq!(hb.status, 200);
    let d = cp.call("GET", &detail, None).await;
    let volumes: Vec<(Value, Value)> = d.body["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| (v["volume_id"].clone(), v["volume_size"].clone()))
        .collect();
    assert_eq!(
        volumes,
        vec![
            (json!(format!("{sid}-thinpool")), json!(128)),
            (json!(format!("{sid}-sharepool")), json!(50))
        ]
    );
    assert!(
        r.body["collect_time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{:?}",
        r.body
    );
    assert_eq!(r.body["page_info"]["next_marker"], Value::Null);
    let r = cp.call("GET", &format!("{path}?limit=2"), None).await;
    assert_eq!(r.body["share_apps"].as_array().map(Vec::len), Some(2));
    assert_eq!(r.body["page_info"]["next_marker"], "com.a.two");
    let r = cp
        .call("GET", &format!("{path}?limit=2&marker=com.a.two"), None)
        .await;
    assert_eq!(r.body["share_apps"], json!([apps[2]]));
    let r = cp
        .call("GET", &format!("{path}?package_name=com.a.one"), None)
        .await;
    assert_eq!(r.body["share_apps"], json!([apps[0]]));
    for (query, code) in [("limit=501", "CPS.0002"), ("package_name=1bad", "CPS.0173")] {
        let r = cp.call("GET", &format!("{path}?{query}"), None).await;
        assert_eq!(r.body["error_code"], code, "{query}");
    }
    let r = cp
        .call(
            "GET",
            "/v1/{p}/servers/0123456789abcdef0123456789abcdef/share-apps-snapshot",
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.body["error_code"].as_str()),
        (400, Some("CPS.0015"))
    );
    cp.stop().await;
}

/// `cph admin host forget`: a host whose agent went silent for good leaves
/// the fleet with its server released; a live or unknown host is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_host_is_forgotten_with_its_server() {
    let (dir, cp, _url, seen) = with_nodes(&["n1", "n2"]).await;
    let sid = buy(&cp, &seen, 1).await.remove(0);
    let store = cph::store::Store::open_dir(dir.path()).expect("store");
    let gone = store
        .server(&cp.project_id, &sid)
        .expect("server")
        .expect("bought")
        .node_id;
    let live = if gone == "n1" { "n2" } else { "n1" };
    let beat = keep_beating(&cp, live, Vec::new());
    let server_path = format!("/v1/{{p}}/cloud-phone/servers/{sid}");
    for _ in 0..100 * slowdown() {
        if cp.call("GET", &server_path, None).await.body["status"] == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(cp.call("GET", &server_path, None).await.body["status"], 2);

    let d = dir.path();
    assert!(matches!(
        cph::admin::host_forget(d, live),
        Err(cph::store::StoreError::NodeAlive(_))
    ));
    assert!(matches!(
        cph::admin::host_forget(d, "nope"),
        Err(cph::store::StoreError::NodeNotFound(_))
    ));
    assert_eq!(
        cph::admin::host_forget(d, &gone).expect("forget"),
        Some(sid)
    );
    let hosts = cph::admin::host_list(d).expect("hosts");
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    assert!(
        hosts[0].starts_with(&format!("{live}\t")) && hosts[0].ends_with("\talive\t-\t-\t-"),
        "{hosts:?}"
    );
    let r = cp.call("GET", &server_path, None).await;
    assert_eq!(r.body["error_code"], "CPS.0015");
    let r = cp.call("GET", "/v1/{p}/cloud-phone/phones", None).await;
    assert_eq!(r.body["phones"], json!([]));
    // The live host is the one left to buy.
    buy(&cp, &seen, 1).await;
    beat.abort();
    cp.stop().await;
}

/// The real `cph-agent` of a host the control plane forgot while the
/// agent was out of reach (stopped here, as a network partition would
/// leave it): once back, its first heartbeat is not accepted and it
/// registers again, so its host is in the fleet again without an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_host_registers_again_when_its_agent_is_back() {
    // `bins::built` builds for this host, not for a cross target run under
    // QEMU.
    if std::env::var_os("CPH_SPAWN_WRAPPER").is_some() {
        eprintln!("SKIPPED a_forgotten_host_registers_again_when_its_agent_is_back: cross run");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = Cp::start(dir.path().to_path_buf()).await;
    let bin = bins::built().join("cph-agent");
    let node = format!("reregister-{}", std::process::id());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "control_plane_url = \"{}\"\nnode_token = \"{NODE_TOKEN}\"\n\
             listen = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\nnode_id = \"{node}\"\n\
             prepare_host = false\ncgroup_parent = \"cph-{node}\"\nheartbeat_secs = 1\n\
             [network]\nenabled = false\n",
            cp.base,
            dir.path().join("agent-state").display(),
        ),
    )
    .expect("agent config");
    /// The agent process, killed when dropped (also on a failed assertion).
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let agent = Killed(
        std::process::Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn cph-agent"),
    );
    let pid = nix::unistd::Pid::from_raw(agent.0.id() as i32);
    let state = |want: Option<&'static str>| {
        let (d, node) = (dir.path(), node.clone());
        async move {
            for _ in 0..150 {
                let hosts = cph::admin::host_list(d).expect("hosts");
                let now = hosts
                    .iter()
                    .find(|h| h.starts_with(&format!("{node}\t")))
                    .map(|h| h.split('\t').nth(4).unwrap_or("").to_string());
                if now.as_deref() == want {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("host {node} never read {want:?}");
        }
    };
    state(Some("alive")).await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("stop agent");
    state(Some("silent")).await;
    assert_eq!(
        cph::admin::host_forget(dir.path(), &node).expect("forget"),
        None
    );
    state(None).await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("resume agent");
    state(Some("alive")).await;
    drop(agent);
    cp.stop().await;
}

/// The API over HTTPS (`cph serve --tls-cert`): the token login and a
/// signed `cph` client call go through with the certificate trusted; a
/// plain HTTP request or a client that does not trust it gets nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cp, cert) = Cp::start_tls(dir.path().to_path_buf()).await;
    assert!(cp.base.starts_with("https://"));
    // The login in `start_tls` went over TLS; so does a listing.
    let r = cp.call("GET", "/v1/{p}/cloud-phone/servers", None).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // The `cph` client, signing with AK/SK, trusting the certificate.
    let (project_id, ak, sk) = cph::admin::credential_create(dir.path(), "p1").expect("ak/sk");
    let creds = dir.path().join("credentials.json");
    let write = |ca: Option<&std::path::Path>| {
        let v = json!({"endpoint": cp.base, "project_id": project_id, "ak": ak, "sk": sk,
                       "ca_cert": ca});
        std::fs::write(&creds, v.to_string()).expect("credentials");
    };
    write(Some(&cert));
    let ok = cph::client::run(&creds, cph::client::Action::Servers).await;
    assert!(matches!(ok, Ok(true)), "{ok:?}");
    write(None);
    let untrusted = cph::client::run(&creds, cph::client::Action::Servers).await;
    assert!(
        matches!(untrusted, Err(cph::client::ClientError::Http { .. })),
        "{untrusted:?}"
    );
    let plain = cp.base.replacen("https://", "http://", 1);
    let r = reqwest::get(format!("{plain}/v3/projects")).await;
    assert!(r.is_err(), "plain HTTP answered: {r:?}");
    cp.stop().await;
}

/// Waits until the API shows the phone running (its agent's heartbeat
/// reported it).
async fn wait_running(cp: &Cp, phone: &str) {
    for _ in 0..100 * slowdown() {
        let r = cp
            .call(
                "GET",
                &format!("/v1/{{p}}/cloud-phone/phones/{phone}"),
                None,
            )
            .await;
        if r.body["status"] == 2 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("phone {phone} not running in {} s", 5 * slowdown());
}

async fn delete_image(cp: &Cp, id: &str) -> common::Resp {
    cp.call(
        "DELETE",
        &format!("/v1/{{p}}/cloud-phone/images/{id}"),
        None,
    )
    .await
}

/// The sent job with this id, once the recorder has it.
async fn sent_job(seen: &Arc<Mutex<Seen>>, id: &str) -> Value {
    wait_for(seen, |s| s.jobs.iter().any(|j| j["job_id"] == json!(id))).await;
    let s = seen.lock().expect("lock");
    let job = s.jobs.iter().find(|j| j["job_id"] == json!(id));
    job.cloned().expect("sent")
}

/// Custom images: made from a running phone by a `create_image` job,
/// usable once the job succeeded, shared with another project that sees
/// it at once and uses it once it accepted, and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_images_from_phones_and_shared() {
    let (dir, cp, url, seen) = with_nodes(&["n1"]).await;
    buy(&cp, &seen, 1).await;
    let create = seen.lock().expect("lock").servers[0].clone();
    let beat = keep_beating(&cp, "n1", running_phones(&create));
    // A free host for the other project.
    let inv = serde_json::to_value(inventory("n2", &url)).expect("json");
    assert_eq!(cp.agent_post("/agent/v1/register", inv).await.status, 200);
    let phone = create["phones"][0]["phone_id"]
        .as_str()
        .expect("phone")
        .to_string();
    let code = |r: &common::Resp| r.body["error_code"].as_str().unwrap_or("").to_string();
    wait_running(&cp, &phone).await;

    // Bad input: nothing is made.
    let make = |phone: &str, name: &str| json!({"phone_id": phone, "image_name": name});
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/images",
            Some(make(&phone, "a/b")),
        )
        .await;
    assert_eq!(code(&r), "CPS.0162");
    let unknown = "0123456789abcdef0123456789abcdef";
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/images",
            Some(make(unknown, "x")),
        )
        .await;
    assert_eq!(code(&r), "CPS.0005");

    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/images",
            Some(make(&phone, "golden")),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let image = r.body["image_id"].as_str().expect("image_id").to_string();
    let job = r.body["job_id"].as_str().expect("job_id").to_string();
    let sent = sent_job(&seen, &job).await;
    assert_eq!(sent["kind"], "create_image");
    assert_eq!(sent["image_id"], json!(image));
    assert_eq!(sent["object"]["bucket"], "cph-images");
    let key = format!("{}/{image}.tar", cp.project_id);
    assert_eq!(sent["object"]["key"], json!(key));

    // While it is made: listed as creating, not usable, not deletable.
    let r = cp.call("GET", "/v1/{p}/cloud-phone/images", None).await;
    assert_eq!(r.body["total"], 1, "{:?}", r.body);
    let info = &r.body["image_infos"][0];
    assert_eq!(
        (info["status"].as_i64(), info["image_type"].as_str()),
        (Some(0), Some("private"))
    );
    assert_eq!(info["project_id"], json!(cp.project_id));
    let reset = json!({"phones": [{"phone_id": phone}], "image_id": image});
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-reset",
            Some(reset.clone()),
        )
        .await;
    assert_eq!(code(&r), "CPS.0220");
    let r = delete_image(&cp, &image).await;
    assert_eq!(code(&r), "CPS.0220");

    // The job ends: active, with the size the agent wrote.
    let image_url = format!("obs://cph-images/{key}");
    let msg = cph_agent::protocol::image_written(&image_url, 4096);
    let done = json!([{"job_id": job, "status": 2, "error_code": null, "error_msg": null, "execute_msg": msg}]);
    assert_eq!(cp.agent_post("/agent/v1/jobs", done).await.status, 200);
    let r = cp
        .call(
            "GET",
            &format!("/v1/{{p}}/cloud-phone/images?image_id={image}&status=1"),
            None,
        )
        .await;
    assert_eq!(r.body["image_infos"][0]["image_size"], 4096, "{:?}", r.body);
    let r = cp
        .call("GET", "/v1/{p}/cloud-phone/phone-images?is_public=2", None)
        .await;
    let listed = r.body["phone_images"].as_array().expect("phone_images");
    assert!(listed
        .iter()
        .any(|i| i["image_id"] == json!(image) && i["image_name"] == "golden"));
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-reset",
            Some(reset),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let reset_job = r.body["jobs"][0]["job_id"]
        .as_str()
        .expect("job")
        .to_string();
    let sent = sent_job(&seen, &reset_job).await;
    assert_eq!(sent["image"]["url"], json!(image_url));
    let done = json!([{"job_id": reset_job, "status": 2, "error_code": null, "error_msg": null, "execute_msg": null}]);
    cp.agent_post("/agent/v1/jobs", done).await;
    // Its agent reports the phone on the image: the API shows it so.
    beat.abort();
    let mut states = running_phones(&create);
    states[0].image_id = image.clone();
    let beat = keep_beating(&cp, "n1", states);
    let detail = format!("/v1/{{p}}/cloud-phone/phones/{phone}");
    for _ in 0..100 * slowdown() {
        if cp.call("GET", &detail, None).await.body["image_id"] == json!(image) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        cp.call("GET", &detail, None).await.body["image_id"],
        json!(image)
    );

    // Another project: sees the image once shared, uses it once accepted.
    let p2 = common::prepare(dir.path(), "p2");
    let t2 = cp
        .login("p2-user", "pw")
        .await
        .subject_token
        .expect("token");
    let p2_path = |rest: &str| format!("/v1/{p2}/cloud-phone/{rest}");
    let r = cp.call_as(&t2, "GET", &p2_path("images"), None).await;
    assert_eq!(r.body["total"], 0);
    let members = format!("/v1/{{p}}/cloud-phone/images/{image}/members");
    for bad in [unknown, cp.project_id.as_str(), "p2"] {
        let r = cp
            .call("POST", &members, Some(json!({"member": bad})))
            .await;
        assert_eq!(code(&r), "CPS.0001", "member {bad}");
    }
    let r = cp.call("POST", &members, Some(json!({"member": p2}))).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = cp
        .call_as(&t2, "GET", &p2_path("images?image_type=share"), None)
        .await;
    assert_eq!(r.body["total"], 1);
    assert_eq!(
        r.body["image_infos"][0]["src_project_id"],
        json!(cp.project_id)
    );
    let mut buy2 = buy_body(1);
    buy2["image_id"] = json!(image);
    let r = cp
        .call_as(&t2, "POST", &p2_path("phones"), Some(buy2.clone()))
        .await;
    assert_eq!(code(&r), "CPS.0030", "pending: {:?}", r.body);
    let p2_members = p2_path(&format!("images/{image}/members"));
    let r = cp
        .call_as(&t2, "PUT", &p2_members, Some(json!({"status": "maybe"})))
        .await;
    assert_eq!(code(&r), "CPS.0010");
    let r = cp
        .call_as(&t2, "PUT", &p2_members, Some(json!({"status": "accepted"})))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = cp.call("GET", &members, None).await;
    assert_eq!(r.body["members"][0]["member_id"], json!(p2));
    assert_eq!(r.body["members"][0]["status"], "accepted");
    // Only the owner lists or deletes members.
    let r = cp.call_as(&t2, "GET", &p2_members, None).await;
    assert_eq!(code(&r), "CPS.0166");
    let servers_before = seen.lock().expect("lock").servers.len();
    let r = cp
        .call_as(&t2, "POST", &p2_path("phones"), Some(buy2.clone()))
        .await;
    assert_eq!(r.status, 200, "accepted: {:?}", r.body);
    wait_for(&seen, |s| s.servers.len() == servers_before + 1).await;
    let create2 = seen.lock().expect("lock").servers[servers_before].clone();
    assert_eq!(create2["image"]["url"], json!(image_url));

    // No longer shared: gone from p2's list; it cannot be deleted twice.
    let r = cp.call("DELETE", &format!("{members}/{p2}"), None).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = cp.call("DELETE", &format!("{members}/{p2}"), None).await;
    assert_eq!(code(&r), "CPS.0001");
    let r = cp.call_as(&t2, "GET", &p2_path("images"), None).await;
    assert_eq!(r.body["total"], 0);

    // A creation that fails leaves a failed image, which can be deleted.
    wait_running(&cp, &phone).await;
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/images",
            Some(make(&phone, "second")),
        )
        .await;
    let failed = r.body["image_id"].as_str().expect("image_id").to_string();
    let job = r.body["job_id"].as_str().expect("job_id").to_string();
    let fail = json!([{"job_id": job, "status": -1, "error_code": "CPS.0108", "error_msg": "store down", "execute_msg": null}]);
    cp.agent_post("/agent/v1/jobs", fail).await;
    let r = cp
        .call(
            "GET",
            &format!("/v1/{{p}}/cloud-phone/images?image_id={failed}"),
            None,
        )
        .await;
    assert_eq!(r.body["image_infos"][0]["status"], 2, "{:?}", r.body);

    // Deleted: another project cannot, the owner can, once.
    let r = cp
        .call_as(&t2, "DELETE", &p2_path(&format!("images/{image}")), None)
        .await;
    assert_eq!(code(&r), "CPS.0166");
    for id in [&image, &failed] {
        let r = delete_image(&cp, id).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let r = delete_image(&cp, &image).await;
    assert_eq!(code(&r), "CPS.0166");
    let r = cp.call("GET", "/v1/{p}/cloud-phone/images", None).await;
    assert_eq!(r.body["total"], 0);
    beat.abort();
    cp.stop().await;
}

/// Scheduled events: the operator announces maintenance of a server's
/// host, the project lists and authorizes it; at the authorized time the
/// server's running phones are stopped by jobs, and when the operator
/// completes it they are started again.
#[tokio::test]
async fn scheduled_events_stop_phones_when_authorized_and_start_them_after() {
    let (dir, cp, _url, seen) = with_nodes(&["n1"]).await;
    let sid = buy(&cp, &seen, 1).await.remove(0);
    let create = seen.lock().expect("lock").servers[0].clone();
    let beat = keep_beating(&cp, "n1", running_phones(&create));
    let phones: Vec<String> = create["phones"]
        .as_array()
        .expect("phones")
        .iter()
        .map(|p| p["phone_id"].as_str().expect("phone").to_string())
        .collect();
    for p in &phones {
        wait_running(&cp, p).await;
    }
    let code = |r: &common::Resp| r.body["error_code"].as_str().unwrap_or("").to_string();
    let ev = cph::admin::event_create(dir.path(), &sid, "system-maintenance", "new disk", 72)
        .expect("event");
    let list = |q: &str| {
        let cp = &cp;
        let q = q.to_string();
        async move {
            cp.call(
                "GET",
                &format!("/v1/{{p}}/cloud-phone/scheduled-events{q}"),
                None,
            )
            .await
        }
    };
    let r = list("").await;
    assert_eq!(r.body["count"], 1, "{:?}", r.body);
    let e = &r.body["scheduled_events"][0];
    assert_eq!(e["event_id"], json!(ev));
    assert_eq!(e["server_id"], json!(sid));
    assert_eq!(e["state"], "inquiring");
    assert_eq!(e["type"], "system-maintenance");
    assert_eq!(e["description"], "new disk");
    assert_eq!(e["not_before"], Value::Null);
    let deadline = cph::store::parse_utc(e["not_before_deadline"].as_str().expect("deadline"))
        .expect("a time");
    let ahead = deadline - cph::store::now_secs();
    assert!((71 * 3600..=72 * 3600).contains(&ahead), "{ahead}");
    // Filters.
    assert_eq!(list("?state=scheduled,executing").await.body["count"], 0);
    assert_eq!(list("?type=localdisk-recovery").await.body["count"], 0);
    assert_eq!(
        list(&format!("?server_id={sid}&state=inquiring"))
            .await
            .body["count"],
        1
    );
    assert_eq!(
        list("?publish_since=2099-01-01T00:00:00Z").await.body["count"],
        0
    );
    assert_eq!(code(&list("?state=sleeping").await), "CPS.0001");
    assert_eq!(code(&list("?publish_until=yesterday").await), "CPS.0001");

    // Refusals change nothing.
    let authorize = |id: &str, body: Value| {
        let cp = &cp;
        let path = format!("/v1/{{p}}/cloud-phone/scheduled-events/{id}/authorize");
        async move { cp.call("POST", &path, Some(body)).await }
    };
    let update_path = format!("/v1/{{p}}/cloud-phone/scheduled-events/{ev}");
    let unknown = "0123456789abcdef0123456789abcdef";
    let r = authorize(unknown, json!({"authorization_type": "maintenance"})).await;
    assert_eq!((r.status, code(&r)), (400, "CPS.0017".to_string()));
    let r = authorize(&ev, json!({"authorization_type": "reboot"})).await;
    assert_eq!(code(&r), "CPS.0001");
    assert!(r.body["error_msg"]
        .as_str()
        .is_some_and(|m| m.contains("maintenance or redeploy")));
    let soon = cph::store::utc_string(cph::store::now_secs() + 60);
    let r = authorize(
        &ev,
        json!({"authorization_type": "maintenance", "not_before": soon}),
    )
    .await;
    assert_eq!(code(&r), "CPS.0001");
    let late = cph::store::utc_string(deadline + 3600);
    let r = authorize(
        &ev,
        json!({"authorization_type": "maintenance", "not_before": late}),
    )
    .await;
    assert_eq!(code(&r), "CPS.0001");
    let r = cp
        .call("PUT", &update_path, Some(json!({"not_before": ""})))
        .await;
    assert_eq!(code(&r), "CPS.0010", "an inquiring event is not moved");
    assert_eq!(
        list("").await.body["scheduled_events"][0]["state"],
        "inquiring"
    );

    // Authorized an hour ahead: scheduled, nothing stopped yet.
    let hour = cph::store::utc_string(cph::store::now_secs() + 3600);
    let r = authorize(
        &ev,
        json!({"authorization_type": "maintenance", "not_before": hour}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let e = list("").await.body["scheduled_events"][0].clone();
    assert_eq!(
        (
            e["state"].as_str(),
            e["not_before"].as_str(),
            e["authorization_type"].as_str()
        ),
        (Some("scheduled"), Some(hour.as_str()), Some("maintenance"))
    );
    let r = authorize(&ev, json!({"authorization_type": "maintenance"})).await;
    assert_eq!(code(&r), "CPS.0010", "authorized once");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let stops = |s: &Seen, kind: &str| {
        s.jobs
            .iter()
            .filter(|j| j["kind"] == kind && j["server_id"] == json!(sid))
            .count()
    };
    assert_eq!(stops(&seen.lock().expect("lock"), "stop_phone"), 0);

    // Moved to now: it starts, and each running phone gets a stop job.
    let r = cp
        .call("PUT", &update_path, Some(json!({"not_before": ""})))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    wait_for(&seen, |s| stops(s, "stop_phone") == phones.len()).await;
    let e = list("").await.body["scheduled_events"][0].clone();
    assert_eq!(e["state"], "executing");
    assert!(e["start_time"].is_string());
    assert_eq!(
        cph::admin::event_cancel(dir.path(), &ev).map_err(|e| e.to_string()),
        Err(format!(
            "scheduled event {ev} is executing; only an event not started yet is canceled"
        ))
    );

    // The operator completes it: the phones it stopped start again.
    assert_eq!(
        cph::admin::event_complete(dir.path(), &ev).expect("complete"),
        phones.len()
    );
    wait_for(&seen, |s| stops(s, "start_phone") == phones.len()).await;
    let e = list("").await.body["scheduled_events"][0].clone();
    assert_eq!(e["state"], "completed");
    assert!(e["finish_time"].is_string());
    assert!(
        cph::admin::event_complete(dir.path(), &ev).is_err(),
        "completed once"
    );

    // An event about a host the server has left since (switched away) is
    // canceled when due, and stops nothing on the server's new host.
    let ev2 =
        cph::admin::event_create(dir.path(), &sid, "system-maintenance", "fan", 72).expect("event");
    // As if announced while the server was on a host it has left.
    let db = rusqlite::Connection::open(dir.path().join("cph.db")).expect("db");
    db.execute(
        "UPDATE scheduled_events SET node_id = 'the-host-it-left' WHERE event_id = ?1",
        [&ev2],
    )
    .expect("event's host");
    let r = authorize(
        &ev2,
        json!({"authorization_type": "maintenance", "not_before": hour}),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let path2 = format!("/v1/{{p}}/cloud-phone/scheduled-events/{ev2}");
    let r = cp
        .call("PUT", &path2, Some(json!({"not_before": ""})))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let mut state = Value::Null;
    for _ in 0..40 * slowdown() {
        let events = list(&format!("?event_id={ev2}")).await;
        state = events.body["scheduled_events"][0]["state"].clone();
        if state != json!("scheduled") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(state, json!("canceled"));
    // (Jobs this recorder does not answer for are sent again: counted by id.)
    let stopped: std::collections::HashSet<String> = seen
        .lock()
        .expect("lock")
        .jobs
        .iter()
        .filter(|j| j["kind"] == "stop_phone")
        .filter_map(|j| j["job_id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(stopped.len(), phones.len(), "no more stops");
    beat.abort();
}

/// Hosts n1 and n2 and a server bought on n1, its phones running: the dir,
/// the control plane, the recorder, the server, its `CreateServer`, and the
/// heartbeats of n1 (its phones running) and of n2 (no phones).
#[allow(clippy::type_complexity)]
async fn one_server_of_two_hosts() -> (
    tempfile::TempDir,
    Cp,
    Arc<Mutex<Seen>>,
    String,
    Value,
    tokio::task::JoinHandle<()>,
    tokio::task::JoinHandle<()>,
) {
    let (dir, cp, _url, seen) = with_nodes(&["n1", "n2"]).await;
    let sid = buy(&cp, &seen, 1).await.remove(0);
    let create = seen.lock().expect("lock").servers[0].clone();
    let beat1 = keep_beating(&cp, "n1", running_phones(&create));
    let beat2 = keep_beating(&cp, "n2", vec![]);
    for p in running_phones(&create) {
        wait_running(&cp, &p.phone_id).await;
    }
    (dir, cp, seen, sid, create, beat1, beat2)
}

/// `ChangeCloudPhoneServer`: a server moves to a free host of its model
/// with new phones of the flavor and image asked for; one job makes it
/// there; the host it left is out of sale until its agent deleted the old
/// phones; no free host, no switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_switches_to_a_free_host() {
    let (_dir, cp, seen, sid, create, beat1, beat2) = one_server_of_two_hosts().await;
    let old_phones = running_phones(&create);
    let server_path = format!("/v1/{{p}}/cloud-phone/servers/{sid}");
    let status_is = |want: i64| {
        let (cp, path) = (&cp, server_path.clone());
        async move {
            for _ in 0..50 * slowdown() {
                let r = cp.call("GET", &path, None).await;
                if r.body["status"].as_i64() == Some(want) {
                    return r.body;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("server not in status {want}");
        }
    };
    status_is(5).await;
    let path = format!("/v2/{{p}}/cloud-phone/servers/{sid}/change");
    let body = |pm: &str, image: &str| {
        json!({"phone_model_name": pm, "image_id": image, "keypair_name": "",
               "ports": [{"name": "web", "listen_port": 20001, "internet_accessible": "false"}],
               "property": "{\"com.cph.mainkeys\":\"1\"}",
               "phone_data_volume": {"volume_type": "SSD", "size": 20},
               "extend_param": {"enterprise_project_id": "0"}})
    };
    let test_image = cph::catalog::TEST_IMAGE_ID;

    // Refusals change nothing.
    let unknown = "0123456789abcdef0123456789abcdef";
    let code = |r: common::Resp| r.body["error_code"].as_str().unwrap_or("").to_string();
    let refusals = [
        (
            format!("/v2/{{p}}/cloud-phone/servers/{unknown}/change"),
            body("dev.cp.c1.m768", test_image),
            "CPS.0015",
        ),
        (
            path.clone(),
            body("rx1.cp.c60.d10.e1v1", test_image),
            "CPS.0257",
        ),
        (path.clone(), body("dev.cp.c1.nope", test_image), "CPS.0028"),
        (path.clone(), body("dev.cp.c1.m768", unknown), "CPS.0030"),
        (
            path.clone(),
            body("dev.cp.c1.m768", GAME_IMAGE_ID),
            "CPS.0142",
        ),
    ];
    for (p, b, want) in refusals {
        assert_eq!(code(cp.call("POST", &p, Some(b)).await), want);
    }
    let mut small = body("dev.cp.c1.m768", test_image);
    small["phone_data_volume"]["size"] = json!(5);
    assert_eq!(code(cp.call("POST", &path, Some(small)).await), "CPS.0001");
    let mut bad_property = body("dev.cp.c1.m768", test_image);
    bad_property["property"] = json!("[1]");
    let r = cp.call("POST", &path, Some(bad_property)).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(seen.lock().expect("lock").jobs.is_empty());

    // The switch.
    let r = cp
        .call("POST", &path, Some(body("dev.cp.c1.m768", test_image)))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["server_id"], json!(sid));
    assert!(r.body["request_id"].is_string());
    let job = r.body["job_id"].as_str().expect("job_id").to_string();
    let sent = sent_job(&seen, &job).await;
    assert_eq!(sent["kind"], "create_server");
    let made = &sent["server"];
    assert_eq!(made["server_id"], json!(sid));
    assert_eq!(made["server_name"], create["server_name"]);
    assert_eq!(made["flavor"]["flavor_id"], "dev.cp.c1.m768");
    assert_eq!(made["flavor"]["disk_gb"], 20);
    assert_eq!(made["ports"][0]["listen_port"], 20001);
    let new_phones = running_phones(made);
    assert_eq!(new_phones.len(), 2);
    assert_eq!(made["phones"][0]["property"]["com.cph.mainkeys"], "1");
    for p in &new_phones {
        assert!(old_phones.iter().all(|o| o.phone_id != p.phone_id));
    }
    // Being made on n2: the old phones are gone from the API, the new ones
    // are being created, the server keeps its id and name.
    let d = cp.call("GET", &server_path, None).await;
    assert_eq!(d.body["status"], 1, "{:?}", d.body);
    assert_eq!(d.body["phone_model_name"], "dev.cp.c1.m768");
    assert_eq!(d.body["server_name"], create["server_name"]);
    let listed = cp
        .call(
            "GET",
            &format!("/v1/{{p}}/cloud-phone/phones?server_id={sid}"),
            None,
        )
        .await;
    let ids: Vec<&str> = listed.body["phones"]
        .as_array()
        .expect("phones")
        .iter()
        .map(|p| p["phone_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(new_phones
        .iter()
        .all(|p| ids.contains(&p.phone_id.as_str())));
    // A second switch waits for this one; no host is for sale: n1 still
    // holds the old phones.
    assert_eq!(
        code(
            cp.call("POST", &path, Some(body("dev.cp.c1.m512", test_image)))
                .await
        ),
        "CPS.0105"
    );
    assert_eq!(
        code(
            cp.call("POST", "/v2/{p}/cloud-phone/servers", Some(buy_body(1)))
                .await
        ),
        "CPS.0242"
    );

    // n1's agent is told to delete the old phones; once it has, n1 is free.
    let release = loop_until(&seen, |s| {
        s.jobs
            .iter()
            .find(|j| j["kind"] == "delete_server" && j["server_id"] == json!(sid))
            .cloned()
    })
    .await;
    let release_id = release["job_id"].as_str().expect("id").to_string();
    assert!(release_id.starts_with(&format!("{sid}:release:")));
    beat1.abort();
    let beat1 = keep_beating(&cp, "n1", vec![]);
    release_succeeded(&seen, release_id);
    assert_eq!(buy_when_free(&cp).await, 200);
    let listed = cp.call("GET", "/v1/{p}/cloud-phone/servers", None).await;
    assert_eq!(
        listed.body["servers"].as_array().map(Vec::len),
        Some(2),
        "{:?}",
        listed.body
    );

    // n2 made one phone and not the other: the job fails and names it;
    // the phone not made reads failed (-8), not as being created.
    beat2.abort();
    let beat2 = keep_beating(&cp, "n2", new_phones[..1].to_vec());
    let failed = json!([{"job_id": job, "status": -1, "error_code": "CPS.0003",
                         "error_msg": format!("1 of 2 phones created; not created: {}", new_phones[1].phone_id),
                         "execute_msg": null}]);
    assert_eq!(cp.agent_post("/agent/v1/jobs", failed).await.status, 200);
    let j = cp
        .call("GET", &format!("/v1/{{p}}/cloud-phone/jobs/{job}"), None)
        .await;
    assert_eq!(j.body["status"], -1, "{:?}", j.body);
    status_is(5).await;
    let phone_status = |id: String| {
        let cp = &cp;
        async move {
            cp.call("GET", &format!("/v1/{{p}}/cloud-phone/phones/{id}"), None)
                .await
                .body["status"]
                .as_i64()
        }
    };
    // (The made phone's state comes with n2's next heartbeat.)
    for _ in 0..50 * slowdown() {
        if phone_status(new_phones[0].phone_id.clone()).await == Some(2) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(phone_status(new_phones[0].phone_id.clone()).await, Some(2));
    assert_eq!(phone_status(new_phones[1].phone_id.clone()).await, Some(-8));
    beat1.abort();
    beat2.abort();
}

/// A switch fails what its server's old host still had to do, with the
/// failures' effects: an image being made from one of its phones reads
/// failed; a migration into one of its phones whose source side ends after
/// the switch fails (CPS.0233, the data's object named) and no restore is
/// sent to the old host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_fails_the_jobs_left_on_the_old_host() {
    let (dir, cp, _url, seen) = with_nodes(&["n1", "n2", "n3"]).await;
    let ids = buy(&cp, &seen, 2).await;
    let store = cph::store::Store::open_dir(dir.path()).expect("store");
    let node_of = |sid: &str| {
        store
            .server(&cp.project_id, sid)
            .expect("server")
            .expect("bought")
            .node_id
    };
    let creates = seen.lock().expect("lock").servers.clone();
    let create_of = |sid: &str| {
        creates
            .iter()
            .find(|c| c["server_id"] == json!(sid))
            .cloned()
            .expect("create")
    };
    let (moved, other) = (ids[0].clone(), ids[1].clone());
    let moved_phones = running_phones(&create_of(&moved));
    let other_phones = running_phones(&create_of(&other));
    let mut beats = vec![
        keep_beating(&cp, &node_of(&moved), moved_phones.clone()),
        keep_beating(&cp, &node_of(&other), other_phones.clone()),
    ];
    let free = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| *n != node_of(&moved) && *n != node_of(&other))
        .expect("a free host");
    beats.push(keep_beating(&cp, free, vec![]));
    for p in moved_phones.iter().chain(&other_phones) {
        wait_running(&cp, &p.phone_id).await;
    }

    // An image being made from a phone of the server, and a migration
    // from a phone of the other server into one of it.
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/images",
            Some(json!({"phone_id": moved_phones[0].phone_id, "image_name": "golden"})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let image = r.body["image_id"].as_str().expect("image_id").to_string();
    let image_job = r.body["job_id"].as_str().expect("job_id").to_string();
    sent_job(&seen, &image_job).await;
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-migrate",
            Some(
                json!({"migrate_infos": [{"source_phone_id": other_phones[0].phone_id,
                "target_phone_id": moved_phones[1].phone_id,
                "bucket_name": "bucket-a", "object_path": "mig/phone.tar"}]}),
            ),
        )
        .await;
    let mig = r.body["jobs"][0]["job_id"]
        .as_str()
        .expect("migrate job")
        .to_string();
    sent_job(&seen, &mig).await;

    let path = format!("/v2/{{p}}/cloud-phone/servers/{moved}/change");
    let r = cp
        .call(
            "POST",
            &path,
            Some(json!({"phone_model_name": "dev.cp.c1.m512",
                "image_id": cph::catalog::TEST_IMAGE_ID, "keypair_name": "",
                "extend_param": {"enterprise_project_id": "0"}})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(node_of(&moved), free);

    let job = |id: String| {
        let cp = &cp;
        async move {
            cp.call("GET", &format!("/v1/{{p}}/cloud-phone/jobs/{id}"), None)
                .await
                .body
        }
    };
    let j = job(image_job).await;
    assert_eq!(
        (j["status"].as_i64(), j["error_msg"].as_str()),
        (Some(-1), Some("the server was switched to another host")),
        "{j:?}"
    );
    let r = cp.call("GET", "/v1/{p}/cloud-phone/images", None).await;
    let made = r.body["image_infos"]
        .as_array()
        .expect("images")
        .iter()
        .find(|i| i["image_id"] == json!(image))
        .cloned()
        .expect("listed");
    assert_eq!(made["status"], 2, "failed, not creating for ever: {made:?}");
    // Deletable, as a failed image is.
    assert_eq!(delete_image(&cp, &image).await.status, 200);

    // The migration's source side ends after the switch: the target phone
    // is gone with the old host's phones.
    let done = json!([{"job_id": mig, "status": 2, "error_code": null, "error_msg": null,
                       "execute_msg": "written"}]);
    assert_eq!(cp.agent_post("/agent/v1/jobs", done).await.status, 200);
    let j = job(mig.clone()).await;
    assert_eq!(
        (j["status"].as_i64(), j["error_code"].as_str()),
        (Some(-1), Some("CPS.0233")),
        "{j:?}"
    );
    let msg = j["error_msg"].as_str().unwrap_or("");
    assert!(
        msg.contains("bucket-a/mig/phone.tar") && msg.contains(&moved_phones[1].phone_id),
        "{msg}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let restore = format!("{mig}-restore");
    assert!(
        !seen
            .lock()
            .expect("lock")
            .jobs
            .iter()
            .any(|j| j["job_id"] == json!(restore)),
        "a restore was sent into a phone being released"
    );

    // A job made for the old host in the instant of the switch, or for a
    // server whose deletion began in that instant, is stored failed.
    let row = |server_id: &str, phone_id: &str, node_id: String| {
        let req = cph_agent::protocol::JobRequest {
            job_id: cph::store::new_id(),
            request_id: cph::store::new_id(),
            server_id: server_id.into(),
            phone_id: Some(phone_id.into()),
            kind: cph_agent::protocol::JobKind::Shell {
                command: "ls".into(),
            },
        };
        cph::store::Job::running(&req, &cp.project_id, &node_id, &cph::store::now_string())
            .expect("job")
    };
    let old_host = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| *n != free && *n != node_of(&other))
        .expect("the host left");
    let late = row(&moved, &moved_phones[0].phone_id, old_host.into());
    let fine = row(&other, &other_phones[1].phone_id, node_of(&other));
    let stale = store
        .insert_jobs(&[late.clone(), fine.clone()])
        .expect("insert");
    assert_eq!(stale, vec![late.job_id.clone()]);
    let j = job(late.job_id).await;
    assert_eq!(
        (j["status"].as_i64(), j["error_code"].as_str()),
        (Some(-1), Some("CPS.0054")),
        "{j:?}"
    );
    let msg = j["error_msg"].as_str().unwrap_or("");
    assert!(msg.contains("switched"), "{msg}");
    assert_eq!(job(fine.job_id.clone()).await["status"], 1);
    sent_job(&seen, &fine.job_id).await;
    let r = cp
        .call(
            "DELETE",
            "/v2/{p}/cloud-phone/servers",
            Some(json!({"server_ids": [other]})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let late = row(&other, &other_phones[1].phone_id, node_of(&other));
    let stale = store
        .insert_jobs(std::slice::from_ref(&late))
        .expect("insert");
    assert_eq!(stale, vec![late.job_id.clone()]);
    let j = job(late.job_id).await;
    assert_eq!(
        (j["status"].as_i64(), j["error_code"].as_str()),
        (Some(-1), Some("CPS.0105")),
        "{j:?}"
    );
    for b in beats {
        b.abort();
    }
    cp.stop().await;
}

/// A scheduled event authorized as `redeploy` switches the server to a free
/// host when due (new phones of its flavor and image) and is completed;
/// with no host free, it runs as maintenance (the phones are stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeploy_event_switches_the_server_to_a_free_host() {
    let (dir, cp, seen, sid, create, beat1, beat2) = one_server_of_two_hosts().await;
    let old_phones = running_phones(&create);
    let event = |description: &str| {
        cph::admin::event_create(dir.path(), &sid, "system-maintenance", description, 72)
            .expect("event")
    };
    let authorize = |id: String| {
        let cp = &cp;
        async move {
            let path = format!("/v1/{{p}}/cloud-phone/scheduled-events/{id}/authorize");
            let r = cp
                .call(
                    "POST",
                    &path,
                    Some(json!({"authorization_type": "redeploy"})),
                )
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
        }
    };
    let state_of = |id: String| {
        let cp = &cp;
        async move {
            let r = cp
                .call(
                    "GET",
                    &format!("/v1/{{p}}/cloud-phone/scheduled-events?event_id={id}"),
                    None,
                )
                .await;
            r.body["scheduled_events"][0].clone()
        }
    };
    let ev = event("host retired");
    authorize(ev.clone()).await;
    let made = loop_until(&seen, |s| {
        s.jobs
            .iter()
            .find(|j| j["kind"] == "create_server")
            .cloned()
    })
    .await;
    assert_eq!(made["server_id"], json!(sid));
    let server = &made["server"];
    assert_eq!(server["flavor"]["flavor_id"], "dev.cp.c1.m512");
    assert_eq!(server["image"]["image_id"], cph::catalog::TEST_IMAGE_ID);
    assert_eq!(server["ports"], create["ports"]);
    let new_phones = running_phones(server);
    assert!(new_phones
        .iter()
        .all(|p| old_phones.iter().all(|o| o.phone_id != p.phone_id)));
    let e = state_of(ev).await;
    assert_eq!(e["state"], "completed", "{e}");
    assert!(
        e["start_time"].is_string() && e["finish_time"].is_string(),
        "{e}"
    );

    // The server runs on n2; n1 still holds the old phones: no host is free
    // for a second redeploy, which then runs as maintenance.
    beat2.abort();
    let beat2 = keep_beating(&cp, "n2", new_phones.clone());
    for p in &new_phones {
        wait_running(&cp, &p.phone_id).await;
    }
    let ev2 = event("again");
    authorize(ev2.clone()).await;
    let stops = loop_until(&seen, |s| {
        let stops: Vec<Value> = s
            .jobs
            .iter()
            .filter(|j| j["kind"] == "stop_phone")
            .cloned()
            .collect();
        (stops.len() == new_phones.len()).then_some(stops)
    })
    .await;
    for p in &new_phones {
        assert!(stops.iter().any(|j| j["phone_id"] == json!(p.phone_id)));
    }
    assert_eq!(state_of(ev2).await["state"], "executing");
    // One server creation: a job the recorder does not answer for is sent
    // again under its own id (as to an agent that lost it), so ids count.
    let created: std::collections::HashSet<String> = seen
        .lock()
        .expect("lock")
        .jobs
        .iter()
        .filter(|j| j["kind"] == "create_server")
        .map(|j| j["job_id"].to_string())
        .collect();
    assert_eq!(created.len(), 1, "{created:?}");
    beat1.abort();
    beat2.abort();
}

/// A host whose agent reports phones of a server the fleet does not place
/// on it (a host forgotten and back) is not for sale until its agent has
/// deleted them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_phones_of_an_unknown_server_releases_them_first() {
    let (dir, cp, _url, seen) = with_nodes(&["n1"]).await;
    let ghost = running_phones(&json!({"server_id": "ghost", "phones": [
        {"phone_id": "gp1", "phone_name": "ghost-0001", "slot": 0}]}));
    let beat = keep_beating(&cp, "n1", ghost);
    let release = loop_until(&seen, |s| {
        s.jobs
            .iter()
            .find(|j| j["kind"] == "delete_server" && j["server_id"] == "ghost")
            .cloned()
    })
    .await;
    let release_id = release["job_id"].as_str().expect("id").to_string();
    assert!(release_id.starts_with("ghost:release:"), "{release_id}");
    let r = cp
        .call("POST", "/v2/{p}/cloud-phone/servers", Some(buy_body(1)))
        .await;
    assert_eq!(r.body["error_code"], "CPS.0242", "{:?}", r.body);
    let hosts = cph::admin::host_list(dir.path()).expect("hosts");
    assert!(hosts[0].ends_with("\talive\t-\tghost\t-"), "{hosts:?}");
    // Its agent deleted them: the host is for sale.
    beat.abort();
    let beat = keep_beating(&cp, "n1", vec![]);
    release_succeeded(&seen, release_id);
    assert_eq!(buy_when_free(&cp).await, 200);
    beat.abort();
}

/// `GET /metrics`: the fleet by state, behind the node token; a host the
/// operator cordons is not for sale until uncordoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_metrics_and_cordoned_hosts() {
    let (dir, cp, _seen, _sid, _create, beat1, beat2) = one_server_of_two_hosts().await;
    let get = |token: &'static str| {
        let cp = &cp;
        async move {
            let r = cp
                .http
                .get(format!("{}/metrics", cp.base))
                .bearer_auth(token)
                .send()
                .await
                .expect("metrics");
            (r.status().as_u16(), r.text().await.expect("text"))
        }
    };
    assert_eq!(get("wrong").await.0, 401);
    let (code, text) = get(NODE_TOKEN).await;
    assert_eq!(code, 200, "{text}");
    let has = |text: &str, line: &str| text.lines().any(|l| l == line);
    for line in [
        "# TYPE cph_hosts gauge",
        "cph_hosts{state=\"alive\"} 2",
        "cph_hosts_free{server_model=\"physical.dev.local\"} 1",
        "cph_hosts_releasing 0",
        "cph_servers{status=\"5\"} 1",
        "cph_phones{status=\"2\"} 2",
    ] {
        assert!(has(&text, line), "{line} not in\n{text}");
    }
    // Cordoned, the free host n2 is not for sale; uncordoned, it is.
    cph::admin::host_cordon(dir.path(), "n2", true).expect("cordon");
    assert!(cph::admin::host_cordon(dir.path(), "nope", true).is_err());
    let text = get(NODE_TOKEN).await.1;
    assert!(has(&text, "cph_hosts_cordoned 1"), "{text}");
    assert!(!text.contains("cph_hosts_free{"), "{text}");
    let hosts = cph::admin::host_list(dir.path()).expect("hosts");
    assert!(
        hosts
            .iter()
            .any(|h| h.starts_with("n2\t") && h.ends_with("\tcordoned")),
        "{hosts:?}"
    );
    let r = cp
        .call("POST", "/v2/{p}/cloud-phone/servers", Some(buy_body(1)))
        .await;
    assert_eq!(r.body["error_code"], "CPS.0242", "{:?}", r.body);
    cph::admin::host_cordon(dir.path(), "n2", false).expect("uncordon");
    let text = get(NODE_TOKEN).await.1;
    assert!(
        has(
            &text,
            "cph_hosts_free{server_model=\"physical.dev.local\"} 1"
        ),
        "{text}"
    );
    beat1.abort();
    beat2.abort();
}

/// Share file systems: offered by the operator, attached to and detached
/// from servers by one job per server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_filesystems_attach_and_detach() {
    let (dir, cp, seen, sid, _create, beat, beat2) = one_server_of_two_hosts().await;
    let fs = cph::admin::sharefs_create(
        dir.path(),
        "p1",
        std::path::Path::new("/srv/sfs"),
        Some("games"),
    )
    .expect("offer");
    assert_eq!(fs, "games");
    assert!(cph::admin::sharefs_create(
        dir.path(),
        "p1",
        std::path::Path::new("/srv/x"),
        Some("games")
    )
    .is_err());
    assert!(
        cph::admin::sharefs_create(dir.path(), "p1", std::path::Path::new("rel"), None).is_err()
    );
    let body = |kind: &str, id: &str, servers: Value, path: Option<&str>| json!({"type": kind, "id": id, "server_ids": servers, "path": path});
    let attach = "/v1/{p}/servers/attach-share-filesystem";
    let detach = "/v1/{p}/servers/detach-share-filesystem";
    let code = |r: common::Resp| r.body["error_code"].as_str().unwrap_or("").to_string();
    let many: Vec<String> = (0..21).map(|i| format!("s{i}")).collect();
    for (path, b, want) in [
        (attach, body("nfs", "games", json!([sid]), None), "CPS.0001"),
        (
            attach,
            body("sfs_turbo", "other", json!([sid]), None),
            "CPS.0001",
        ),
        (
            attach,
            body("sfs_turbo", "games", json!([sid]), Some("/../etc")),
            "CPS.0001",
        ),
        (
            attach,
            body("sfs_turbo", "games", json!([]), None),
            "CPS.0095",
        ),
        (
            attach,
            body("sfs_turbo", "games", json!(many), None),
            "CPS.0096",
        ),
        (
            detach,
            body("sfs_turbo", "other", json!([sid]), None),
            "CPS.0001",
        ),
    ] {
        assert_eq!(code(cp.call("POST", path, Some(b)).await), want);
    }
    assert!(seen.lock().expect("lock").jobs.is_empty());
    let unknown = "0123456789abcdef0123456789abcdef";
    let r = cp
        .call(
            "POST",
            attach,
            Some(body(
                "sfs_turbo",
                "games",
                json!([sid, unknown]),
                Some("/level1"),
            )),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let jobs = r.body["jobs"].as_array().expect("jobs").clone();
    assert_eq!(jobs[0]["server_id"], json!(sid));
    assert_eq!(jobs[1]["error_code"], "CPS.0015");
    let attach_job = jobs[0]["job_id"].as_str().expect("job").to_string();
    let sent = sent_job(&seen, &attach_job).await;
    assert_eq!(sent["kind"], "attach_share_fs");
    let games = json!({"fs_id": "games", "source": "/srv/sfs/level1"});
    assert_eq!(sent["fs"], games);
    // Once attached, a switch of the server takes it along.
    let done = json!([{"job_id": attach_job, "status": 2, "error_code": null,
                       "error_msg": null, "execute_msg": null}]);
    assert_eq!(cp.agent_post("/agent/v1/jobs", done).await.status, 200);
    let r = cp
        .call(
            "POST",
            &format!("/v2/{{p}}/cloud-phone/servers/{sid}/change"),
            Some(json!({"phone_model_name": "dev.cp.c1.m512",
                        "image_id": cph::catalog::TEST_IMAGE_ID})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let made = sent_job(&seen, r.body["job_id"].as_str().expect("job")).await;
    assert_eq!(made["server"]["share_filesystems"], json!([games]));
    let r = cp
        .call(
            "POST",
            detach,
            Some(body("sfs_turbo", "games", json!([sid]), None)),
        )
        .await;
    let sent = sent_job(&seen, r.body["jobs"][0]["job_id"].as_str().expect("job")).await;
    assert_eq!(sent["kind"], "detach_share_fs");
    assert_eq!(sent["fs_id"], "games");
    // Another project's file system is not this one's.
    common::prepare(dir.path(), "p2");
    let p2 = cph::store::Store::open_dir(dir.path())
        .expect("store")
        .project("p2")
        .expect("q")
        .expect("p2");
    cph::admin::sharefs_create(
        dir.path(),
        &p2.project_id,
        std::path::Path::new("/srv/p2"),
        Some("p2fs"),
    )
    .expect("offer");
    assert_eq!(
        code(
            cp.call(
                "POST",
                attach,
                Some(body("sfs_turbo", "p2fs", json!([sid]), None))
            )
            .await
        ),
        "CPS.0001"
    );
    assert_eq!(cph::admin::sharefs_list(dir.path()).expect("list").len(), 2);
    beat.abort();
    beat2.abort();
}

/// Makes the recorder answer that the release job `id` succeeded.
fn release_succeeded(seen: &Arc<Mutex<Seen>>, id: String) {
    seen.lock().expect("lock").statuses.insert(
        id.clone(),
        JobStatus {
            job_id: id,
            status: JobState::Succeeded,
            error_code: None,
            error_msg: None,
            execute_msg: None,
        },
    );
}

/// Buys one server through v2 once a host is for sale (within 6 s); the
/// last answer's status.
async fn buy_when_free(cp: &Cp) -> u16 {
    let mut status = 0;
    for _ in 0..60 * slowdown() {
        let r = cp
            .call("POST", "/v2/{p}/cloud-phone/servers", Some(buy_body(1)))
            .await;
        status = r.status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    status
}

/// Waits until `f` finds something in what the recorder saw.
async fn loop_until<T, F: Fn(&Seen) -> Option<T>>(seen: &Arc<Mutex<Seen>>, f: F) -> T {
    for _ in 0..100 * slowdown() {
        if let Some(v) = f(&seen.lock().expect("lock")) {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("not seen in {} s", 5 * slowdown());
}

/// Share files and share apps only on servers whose phone flavor has shared
/// storage and a sharepool: others are refused with the reference's
/// CPS.0137 / CPS.0147 before any job, each server on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_jobs_need_a_flavor_with_shared_storage() {
    let dir = tempfile::tempdir().expect("tempdir");
    dev_flavor(dir.path(), "dev.cp.c1.noshare", "cloud_phone", 0);
    let cp = Cp::start(dir.path().to_path_buf()).await;
    let (url, seen) = recorder().await;
    for n in ["n1", "n2"] {
        let inv = serde_json::to_value(inventory(n, &url)).expect("json");
        assert_eq!(cp.agent_post("/agent/v1/register", inv).await.status, 200);
    }
    let with_share = buy(&cp, &seen, 1).await.remove(0);
    let mut b = buy_body(1);
    b["phone_model_name"] = json!("dev.cp.c1.noshare");
    b["availability_zone"] = json!("az-dev-1");
    let r = cp.call("POST", "/v1/{p}/cloud-phone/phones", Some(b)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let without = r.body["server_ids"][0].as_str().expect("id").to_string();
    wait_for(&seen, |s| s.servers.len() == 2).await;
    // Its phones are in its availability zone.
    let zones = phone_fields(&cp, &without, "availability_zone").await;
    assert!(
        !zones.is_empty() && zones.iter().all(|z| *z == json!("az-dev-1")),
        "{:?}",
        r.body
    );
    let ids = json!([with_share, without]);
    let calls = [
        (
            "POST",
            "/v1/{p}/cloud-phone/phones/share-files".to_string(),
            Some(json!({"bucket_name": "bucket1", "object_path": "f/a.tar", "server_ids": ids})),
            "CPS.0137",
        ),
        (
            "DELETE",
            "/v1/{p}/cloud-phone/phones/share-files".to_string(),
            Some(json!({"file_paths": ["/data/a"], "server_ids": ids})),
            "CPS.0137",
        ),
        (
            "GET",
            format!("/v1/{{p}}/cloud-phone/servers/share-files?path=/data&server_ids={with_share},{without}"),
            None,
            "CPS.0137",
        ),
        (
            "POST",
            "/v1/{p}/cloud-phone/phones/share-apps".to_string(),
            Some(json!({"bucket_name": "bucket1", "object_path": "a/app.tar",
                        "package_name": "com.example.app", "server_ids": ids})),
            "CPS.0147",
        ),
        (
            "DELETE",
            "/v1/{p}/cloud-phone/phones/share-apps".to_string(),
            Some(json!({"package_name": "com.example.app", "server_ids": ids})),
            "CPS.0147",
        ),
    ];
    for (method, path, body, code) in calls {
        let r = cp.call(method, &path, body).await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.body);
        let jobs = r.body["jobs"].as_array().expect("jobs");
        let of = |sid: &str| {
            jobs.iter()
                .find(|j| j["server_id"] == json!(sid))
                .cloned()
                .unwrap_or_else(|| panic!("{path}: no entry for {sid}: {jobs:?}"))
        };
        assert!(of(&with_share)["job_id"].is_string(), "{path}: {jobs:?}");
        let refused = of(&without);
        assert_eq!(refused["error_code"], code, "{path}: {jobs:?}");
        assert!(refused["job_id"].is_null(), "{path}: {jobs:?}");
        assert!(
            refused["error_msg"]
                .as_str()
                .is_some_and(|m| m.contains(&without)),
            "{path}: {jobs:?}"
        );
    }
    // One job per call, each to the server with shared storage.
    wait_for(&seen, |s| s.jobs.len() == 5).await;
    let sent = seen.lock().expect("lock").jobs.clone();
    assert!(
        sent.iter().all(|j| j["server_id"] == json!(with_share)),
        "{sent:?}"
    );
    // A listing 50 entries a page unless asked, as the reference says.
    let list = sent
        .iter()
        .find(|j| j["kind"] == "share_list_files")
        .unwrap_or_else(|| panic!("no listing sent: {sent:?}"));
    assert_eq!(
        (list["offset"].clone(), list["limit"].clone()),
        (json!(0), json!(50)),
        "{list}"
    );
    cp.stop().await;
}

/// A job the control plane fails itself (its agent went silent) ends as a
/// failure its agent reported would: the image it was making reads failed
/// and can be deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_whose_agent_goes_silent_reads_failed() {
    let (_dir, cp, _url, seen) = with_nodes(&["n1"]).await;
    buy(&cp, &seen, 1).await;
    let create = seen.lock().expect("lock").servers[0].clone();
    let beat = keep_beating(&cp, "n1", running_phones(&create));
    let phone = create["phones"][0]["phone_id"]
        .as_str()
        .expect("phone")
        .to_string();
    wait_running(&cp, &phone).await;
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/images",
            Some(json!({"phone_id": phone, "image_name": "lost"})),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let image = r.body["image_id"].as_str().expect("image_id").to_string();
    let job = r.body["job_id"].as_str().expect("job_id").to_string();
    sent_job(&seen, &job).await;
    beat.abort();
    let status = || async {
        let r = cp.call("GET", "/v1/{p}/cloud-phone/images", None).await;
        r.body["image_infos"][0]["status"].as_i64()
    };
    assert_eq!(status().await, Some(0), "being made");
    let mut failed = false;
    for _ in 0..100 * slowdown() {
        if status().await == Some(2) {
            failed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(failed, "the image reads failed once its agent is silent");
    let r = cp
        .call("GET", &format!("/v1/{{p}}/cloud-phone/jobs/{job}"), None)
        .await;
    assert_eq!(
        (r.body["status"].as_i64(), r.body["error_code"].as_str()),
        (Some(-1), Some("CPS.0054"))
    );
    assert_eq!(delete_image(&cp, &image).await.status, 200);
    cp.stop().await;
}

/// A job its agent refuses (per job, in a batch) ends at once with the
/// agent's code and reason; it is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_its_agent_refuses_fails_with_the_agents_reason() {
    // An agent's batch endpoint that refuses every job (a double of the
    // agent, as the recorder is, for the control plane's side).
    let batches = Arc::new(Mutex::new(0u32));
    let counted = batches.clone();
    let (url, seen) = recorder().await;
    let refuser = axum::Router::new()
        .route(
            "/v1/jobs/batch",
            post(move |axum::Json(v): axum::Json<Value>| {
                let counted = counted.clone();
                async move {
                    *counted.lock().expect("lock") += 1;
                    let answers: Vec<Value> = v["jobs"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|j| {
                            json!({"job_id": j["job_id"], "status": null,
                                        "error_code": "CPS.0001", "error_msg": "job id refused"})
                        })
                        .collect();
                    axum::Json(Value::Array(answers))
                }
            }),
        )
        .fallback_service(axum::routing::any(move |req: axum::extract::Request| {
            let url = url.clone();
            async move {
                // Everything else as the recorder answers it.
                let client = reqwest::Client::new();
                let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                    .await
                    .unwrap_or_default();
                let r = client
                    .post(format!("{url}/v1/servers"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("forward");
                axum::Json(r.json::<Value>().await.unwrap_or(Value::Null))
            }
        }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let agent = format!("http://{}", l.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(l, refuser).await;
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = Cp::start(dir.path().to_path_buf()).await;
    let inv = serde_json::to_value(inventory("n1", &agent)).expect("json");
    assert_eq!(cp.agent_post("/agent/v1/register", inv).await.status, 200);
    let sid = buy(&cp, &seen, 1).await.remove(0);
    let create = seen.lock().expect("lock").servers[0].clone();
    let beat = keep_beating(&cp, "n1", running_phones(&create));
    let r = cp
        .call(
            "POST",
            "/v1/{p}/cloud-phone/servers/batch-restart",
            Some(json!({"server_ids": [sid]})),
        )
        .await;
    let job = r.body["jobs"][0]["job_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{:?}", r.body))
        .to_string();
    let mut ended = Value::Null;
    for _ in 0..50 * slowdown() {
        let r = cp
            .call("GET", &format!("/v1/{{p}}/cloud-phone/jobs/{job}"), None)
            .await;
        if r.body["status"] == -1 {
            ended = r.body;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        (ended["error_code"].as_str(), ended["error_msg"].as_str()),
        (Some("CPS.0001"), Some("job id refused")),
        "{ended}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(*batches.lock().expect("lock"), 1, "sent once");
    beat.abort();
    cp.stop().await;
}

/// `batch-connection`: each running phone's endpoint (a port of the
/// server's own, one reachable from the internet first, else VNC on the
/// private address) and a ticket under the key its agent derives from the
/// node token; every other phone an entry of `errors`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_tickets_name_the_endpoint_and_sign_the_session() {
    let (_dir, cp, _url, seen) = with_nodes(&["n1"]).await;
    buy(&cp, &seen, 1).await;
    let create = seen.lock().expect("lock").servers[0].clone();
    let mut states = running_phones(&create);
    assert_eq!(states.len(), 2, "{create}");
    let port = |kind: &str, access_port: u16, internet_accessible: bool| AccessInfo {
        kind: kind.into(),
        phone_ip: "172.30.0.2".into(),
        listen_port: 5555,
        access_port,
        internet_accessible,
    };
    states[0].access_infos = vec![
        port("adb", 30001, false),
        port("vnc", 30002, false),
        port("web", 30003, false),
        port("game", 30004, true),
    ];
    states[1].access_infos = vec![port("adb", 30011, false), port("vnc", 30012, false)];
    let beat = |states: &[PhoneState]| {
        cp.agent_post(
            "/agent/v1/heartbeat",
            json!({"node_id": "n1", "phones": states, "jobs": []}),
        )
    };
    assert_eq!(beat(&states).await.status, 200);
    let (a, b) = (states[0].phone_id.clone(), states[1].phone_id.clone());
    // The listing's newer fields: the total, the phone's route.
    let r = cp
        .call("GET", "/v1/{p}/cloud-phone/phones?limit=1", None)
        .await;
    assert_eq!(r.body["count"], 2, "{:?}", r.body);
    let r = cp
        .call("GET", &format!("/v1/{{p}}/cloud-phone/phones/{a}"), None)
        .await;
    assert_eq!(r.body["traffic_type"], "direct", "{:?}", r.body);
    let unknown = "0123456789abcdef0123456789abcdef";
    let connect = |ids: Value, client: &str| {
        cp.call(
            "POST",
            "/v1/{p}/cloud-phone/phones/batch-connection",
            Some(json!({"phone_ids": ids, "client_type": client})),
        )
    };
    let r = connect(json!([a, b, unknown]), "WINDOWS").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let infos = r.body["connect_infos"].as_array().expect("connect_infos");
    assert_eq!(infos.len(), 2, "{:?}", r.body);
    let (ia, ib) = (&infos[0]["access_info"], &infos[1]["access_info"]);
    assert_eq!(
        (&infos[0]["phone_id"], &infos[1]["phone_id"]),
        (&json!(a), &json!(b))
    );
    // The public port of the server's own; VNC where it has none.
    assert_eq!(ia["access_port"], 30004);
    assert_eq!(ia["access_ip"], "203.0.113.5");
    assert_eq!(ia["intranet_ip"], "10.0.0.5");
    assert_eq!(ib["access_port"], 30012);
    assert_eq!(ib["access_ip"], "");
    let text = |v: &Value| v.as_str().expect("string").to_string();
    for (id, info) in [(&a, ia), (&b, ib)] {
        let key = cph_agent::connect::phone_key(NODE_TOKEN, id);
        let (session, ts) = (text(&info["session_id"]), text(&info["timestamp"]));
        let want = cph_agent::connect::ticket(&key, id, &session, &ts, "WINDOWS");
        assert_eq!(info["ticket"], json!(want), "{info}");
        assert_eq!(session.len(), 32);
    }
    assert_ne!(ia["session_id"], ib["session_id"]);
    assert_eq!(
        r.body["errors"],
        json!([{"phone_id": unknown, "error_code": "CPS.0005",
                "error_msg": format!("Phone {unknown} is not found.")}])
    );

    // A phone whose only mapping is ADB has no endpoint; a stopped phone
    // none either.
    states[0].access_infos = vec![port("adb", 30001, true)];
    states[1].state = PhoneRunState::Stopped;
    assert_eq!(beat(&states).await.status, 200);
    let r = connect(json!([a, b]), "android").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["connect_infos"], json!([]));
    let codes: Vec<&Value> = r.body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| &e["error_code"])
        .collect();
    assert_eq!(codes, [&json!("CPS.0022"), &json!("CPS.0141")]);

    // Bad requests: no phones, more than 10, an unknown client.
    assert_eq!(
        connect(json!([]), "IOS").await.body["error_code"],
        "CPS.0009"
    );
    let eleven = json!(vec![a.clone(); 11]);
    assert_eq!(connect(eleven, "IOS").await.body["error_code"], "CPS.0209");
    let r = connect(json!([a]), "BLACKBERRY").await;
    assert_eq!((r.status, &r.body["error_code"]), (400, &json!("CPS.0001")));
    cp.stop().await;
}
