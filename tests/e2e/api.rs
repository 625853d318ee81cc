//! The CPH REST API as a client sees it: every request signed
//! `SDK-HMAC-SHA256` with the project's AK/SK by the project's own signer
//! (`cph::auth::signing::sign`, checked against the official SDK in
//! `tests/auth_signing.rs`), one HTTP/1.1 exchange per call, and the job
//! helpers every scenario step uses.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

/// How long a job may run before the test gives up on it.
pub const JOB_LIMIT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(200);

/// A client of one project, from `credentials.json`.
#[derive(Clone)]
pub struct Api {
    /// `host:port` of the CPH API.
    pub addr: String,
    pub project_id: String,
    ak: String,
    sk: String,
    /// Every job seen ending, in order.
    ended: std::rc::Rc<std::cell::RefCell<Vec<Value>>>,
}

/// A response: HTTP status and JSON body (`Null` when not JSON).
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
}

impl Resp {
    /// The body, after checking the status is 200.
    pub fn ok(self, what: &str) -> Value {
        assert_eq!(self.status, 200, "{what}: {}", self.body);
        self.body
    }
}

impl Api {
    pub fn new(creds: &Value) -> Self {
        let s = |k: &str| {
            creds[k]
                .as_str()
                .unwrap_or_else(|| panic!("credentials.json lacks {k}: {creds}"))
                .to_string()
        };
        let endpoint = s("endpoint");
        let addr = endpoint
            .strip_prefix("http://")
            .unwrap_or(&endpoint)
            .trim_end_matches('/')
            .to_string();
        Self {
            addr,
            project_id: s("project_id"),
            ak: s("ak"),
            sk: s("sk"),
            ended: Default::default(),
        }
    }

    /// `/v1/{project_id}/cloud-phone/<rest>`.
    pub fn path(&self, rest: &str) -> String {
        format!("/v1/{}/cloud-phone/{rest}", self.project_id)
    }

    /// One signed request; `path` is absolute, `query` raw (without `?`).
    pub fn call(&self, method: &str, path: &str, query: &str, body: Option<&Value>) -> Resp {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut headers = vec![
            ("Host".to_string(), self.addr.clone()),
            ("Content-Type".to_string(), "application/json".to_string()),
            ("X-Project-Id".to_string(), self.project_id.clone()),
        ];
        cph::auth::signing::sign(
            method,
            path,
            query,
            &mut headers,
            body.as_bytes(),
            &self.ak,
            &self.sk,
            SystemTime::now(),
        );
        let target = if query.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{query}")
        };
        let mut req = format!("{method} {target} HTTP/1.1\r\n");
        for (n, v) in &headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ));
        let mut s = TcpStream::connect(&self.addr)
            .unwrap_or_else(|e| panic!("connect to the CPH API {}: {e}", self.addr));
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        s.write_all(req.as_bytes()).expect("send request");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read response");
        parse_response(&raw).unwrap_or_else(|| {
            panic!(
                "{method} {target}: not an HTTP response: {}",
                String::from_utf8_lossy(&raw)
            )
        })
    }

    pub fn get(&self, rest: &str, query: &str) -> Resp {
        self.call("GET", &self.path(rest), query, None)
    }

    pub fn post(&self, rest: &str, body: Value) -> Resp {
        self.call("POST", &self.path(rest), "", Some(&body))
    }

    pub fn put(&self, rest: &str, body: Value) -> Resp {
        self.call("PUT", &self.path(rest), "", Some(&body))
    }

    pub fn delete(&self, rest: &str, body: Value) -> Resp {
        self.call("DELETE", &self.path(rest), "", Some(&body))
    }

    /// The job ids of a batch answer, each target accepted (no in-place error).
    pub fn job_ids(resp: Resp, what: &str) -> Vec<String> {
        let body = resp.ok(what);
        let jobs = body["jobs"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no jobs in {body}"));
        assert!(!jobs.is_empty(), "{what}: empty jobs in {body}");
        jobs.iter()
            .map(|j| {
                assert!(
                    j.get("error_code").is_none_or(Value::is_null),
                    "{what}: target refused: {j}"
                );
                j["job_id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{what}: job without id: {j}"))
                    .to_string()
            })
            .collect()
    }

    /// `GET .../jobs/{job_id}`.
    pub fn job(&self, id: &str) -> Value {
        self.get(&format!("jobs/{id}"), "").ok("job detail")
    }

    /// Polls a job until it ends (status 2 or -1).
    pub fn wait_job(&self, id: &str) -> Value {
        let deadline = Instant::now() + JOB_LIMIT;
        loop {
            let j = self.job(id);
            if j["status"] != 1 {
                self.ended.borrow_mut().push(j.clone());
                return j;
            }
            assert!(Instant::now() < deadline, "job {id} still running: {j}");
            std::thread::sleep(POLL);
        }
    }

    /// Every job this client saw end, as it ended.
    pub fn ended_jobs(&self) -> Vec<Value> {
        self.ended.borrow().clone()
    }

    /// Submits a batch, waits for its single job, and returns it ended.
    pub fn run_one(&self, resp: Resp, what: &str) -> Value {
        let ids = Self::job_ids(resp, what);
        assert_eq!(ids.len(), 1, "{what}: one job expected, got {ids:?}");
        let j = self.wait_job(&ids[0]);
        println!("  {what}: job {} -> {j}", ids[0]);
        j
    }

    /// Like [`Api::run_one`], and the job must have succeeded.
    pub fn run_ok(&self, resp: Resp, what: &str) -> Value {
        let j = self.run_one(resp, what);
        assert_eq!(j["status"], 2, "{what} failed: {j}");
        j
    }

    /// Async ADB shell (`phones/commands`): the job, ended.
    pub fn shell_job(&self, phone: &str, command: &str) -> Value {
        let resp = self.post(
            "phones/commands",
            json!({"command": "shell", "content": command, "phone_ids": [phone]}),
        );
        let ids = Self::job_ids(resp, "async shell");
        self.wait_job(&ids[0])
    }

    /// Async ADB shell that must succeed; its output.
    pub fn shell(&self, phone: &str, command: &str) -> String {
        let j = self.shell_job(phone, command);
        assert_eq!(j["status"], 2, "shell {command:?} on {phone} failed: {j}");
        j["execute_msg"].as_str().unwrap_or("").to_string()
    }

    /// Sync ADB shell (`phones/sync-commands`, 6 per minute per project):
    /// the job, ended.
    pub fn sync_shell(&self, phone: &str, command: &str) -> Value {
        let resp = self.post(
            "phones/sync-commands",
            json!({"command": "shell", "content": command, "phone_ids": [phone]}),
        );
        let body = resp.ok("sync shell");
        // The answer carries the phone's result, as the reference's does.
        let job = body["jobs"][0].clone();
        assert!(
            job["status"].is_i64() && job["execute_msg"].is_string(),
            "sync shell answered without its result: {body}"
        );
        job
    }

    pub fn phone(&self, id: &str) -> Value {
        self.get(&format!("phones/{id}"), "").ok("phone detail")
    }

    pub fn server(&self, id: &str) -> Value {
        self.get(&format!("servers/{id}"), "").ok("server detail")
    }

    /// The phones of a server, by phone id.
    pub fn phones(&self, server_id: &str) -> Vec<Value> {
        let mut v = self
            .get("phones", &format!("server_id={server_id}"))
            .ok("phone list")["phones"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        v.sort_by(|a, b| a["phone_id"].as_str().cmp(&b["phone_id"].as_str()));
        v
    }

    /// Polls until the phone's API status is `status`.
    pub fn wait_phone_status(&self, id: &str, status: i64, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let p = self.phone(id);
            if p["status"] == status {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "phone {id} not in status {status} within {limit:?}: {p}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Polls until the server is normal (5) with every phone running (2).
    pub fn wait_server_ready(&self, server_id: &str, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.server(server_id);
            let phones = self.phones(server_id);
            if s["status"] == 5 && !phones.is_empty() && phones.iter().all(|p| p["status"] == 2) {
                return phones
                    .iter()
                    .map(|p| p["phone_id"].as_str().unwrap_or_default().to_string())
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "server {server_id} not ready within {limit:?}: {s} phones {phones:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Status and JSON body of a raw HTTP/1.1 response (plain or chunked).
fn parse_response(raw: &[u8]) -> Option<Resp> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let rest = &raw[split + 4..];
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Some(Resp {
        status,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    })
}

fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = s.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&s[..eol]).trim().to_string();
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("0"), 16).unwrap_or(0);
        if n == 0 || s.len() < eol + 2 + n {
            break;
        }
        out.extend_from_slice(&s[eol + 2..eol + 2 + n]);
        s = &s[(eol + 4 + n).min(s.len())..];
    }
    out
}
