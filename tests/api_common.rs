//! Shared by the api_* tests: a control plane served in-process on
//! 127.0.0.1:0 over a temp data dir, with a project, a user and a token.

#![allow(dead_code)]

use std::path::PathBuf;

use cph::serve::{serve, ServeConfig};
use cph::store::Store;
use serde_json::Value;

pub const NODE_TOKEN: &str = "test-node-token";

pub struct Cp {
    pub base: String,
    pub project_id: String,
    pub token: String,
    pub dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub http: reqwest::Client,
}

pub struct Resp {
    pub status: u16,
    pub request_id: String,
    pub subject_token: Option<String>,
    pub body: Value,
}

/// Prepares a data dir with project `p1`, user `alice`/`pw`.
pub fn prepare(dir: &std::path::Path, project: &str) -> String {
    let s = Store::open_dir(dir).expect("store");
    let p = match s.project(project).expect("q") {
        Some(p) => p,
        None => s.create_project(project).expect("project"),
    };
    s.create_user(&format!("{project}-user"), "pw", &p.project_id)
        .expect("user");
    p.project_id
}

impl Cp {
    pub async fn start(dir: PathBuf) -> Cp {
        Self::start_with(dir, None).await
    }

    /// Serves HTTPS with a self-signed certificate for 127.0.0.1 made in
    /// `dir/tls`; the certificate's path, which `http` trusts.
    pub async fn start_tls(dir: PathBuf) -> (Cp, PathBuf) {
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls).expect("tls dir");
        let made =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("certificate");
        let files = cph::serve::TlsFiles {
            cert: tls.join("cert.pem"),
            key: tls.join("key.pem"),
        };
        std::fs::write(&files.cert, made.cert.pem()).expect("cert");
        std::fs::write(&files.key, made.key_pair.serialize_pem()).expect("key");
        let cert = files.cert.clone();
        (Self::start_with(dir, Some(files)).await, cert)
    }

    async fn start_with(dir: PathBuf, tls: Option<cph::serve::TlsFiles>) -> Cp {
        let project_id = prepare(&dir, "p1");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base = format!("{scheme}://{}", listener.local_addr().expect("addr"));
        let mut http = reqwest::Client::builder();
        if let Some(t) = &tls {
            let pem = std::fs::read(&t.cert).expect("read cert");
            http = http.add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"));
        }
        let http = http.build().expect("http client");
        let mut cfg = ServeConfig::new(dir.clone());
        cfg.node_token = Some(NODE_TOKEN.into());
        cfg.heartbeat_secs = 1;
        // Under QEMU (a cross run) the control plane and the tests run
        // emulated, several times slower: a test's node would read silent
        // between two of the heartbeats it sends by hand.
        if std::env::var_os("CPH_SPAWN_WRAPPER").is_some() {
            cfg.silent_after = 12;
        }
        cfg.test_image_url = "file:///nonexistent/test.tar.gz".into();
        cfg.tls = tls;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(cfg, listener, async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
        });
        let mut cp = Cp {
            base,
            project_id,
            token: String::new(),
            dir,
            stop: Some(tx),
            task: Some(task),
            http,
        };
        cp.token = cp
            .login("p1-user", "pw")
            .await
            .subject_token
            .expect("token");
        cp
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    pub async fn login(&self, user: &str, pw: &str) -> Resp {
        let body = serde_json::json!({"auth": {"identity": {"methods": ["password"],
            "password": {"user": {"name": user, "password": pw, "domain": {"name": "d"}}}},
            "scope": {"project": {"name": user.trim_end_matches("-user")}}}});
        let r = self
            .http
            .post(format!("{}/v3/auth/tokens", self.base))
            .json(&body)
            .send()
            .await
            .expect("send");
        resp(r).await
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        self.call_as(&self.token.clone(), method, path, body).await
    }

    pub async fn call_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Resp {
        let path = path.replace("{p}", &self.project_id);
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut rb = self
            .http
            .request(m, format!("{}{}", self.base, path))
            .header("x-auth-token", token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        resp(rb.send().await.expect("send")).await
    }

    pub async fn raw(&self, method: &str, path: &str, body: &'static str) -> Resp {
        let path = path.replace("{p}", &self.project_id);
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let r = self
            .http
            .request(m, format!("{}{}", self.base, path))
            .header("x-auth-token", &self.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("send");
        resp(r).await
    }

    pub async fn agent_post(&self, path: &str, body: Value) -> Resp {
        let r = self
            .http
            .post(format!("{}{}", self.base, path))
            .bearer_auth(NODE_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("send");
        resp(r).await
    }
}

pub async fn resp(r: reqwest::Response) -> Resp {
    let status = r.status().as_u16();
    let request_id = r
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let subject_token = r
        .headers()
        .get("x-subject-token")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let text = r.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Resp {
        status,
        request_id,
        subject_token,
        body,
    }
}
