//! `cph` as a client of a running platform: list servers and phones, run a
//! shell command, push a file, follow jobs. Requests are signed with the
//! project's AK/SK exactly as the official SDK signs them; the credentials
//! come from a `credentials.json` as `cph up` writes it.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use serde_json::{json, Value};

/// Failures of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("credentials {path}: {reason}")]
    Credentials { path: PathBuf, reason: String },
    #[error("{method} {path}: {source}")]
    Http {
        method: &'static str,
        path: String,
        source: reqwest::Error,
    },
    #[error("{method} {path} answered {status}: {code} {msg}")]
    Api {
        method: &'static str,
        path: String,
        status: u16,
        code: String,
        msg: String,
    },
    #[error("{0}")]
    Input(String),
    #[error("object store: {0}")]
    Store(#[from] cph_agent::objstore::ObjectStoreError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("jobs did not end within {0} s")]
    Timeout(u64),
}

/// `credentials.json` as `cph up` writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct Credentials {
    pub endpoint: String,
    pub project_id: String,
    pub ak: String,
    pub sk: String,
    #[serde(default)]
    pub obs_endpoint: Option<String>,
    #[serde(default)]
    pub obs_ak: Option<String>,
    #[serde(default)]
    pub obs_sk: Option<String>,
    /// A certificate (PEM) to trust for an HTTPS endpoint, beside the
    /// system's roots: `cph up --tls` writes its own here.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
}

impl Credentials {
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError::Credentials {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
    }
}

/// A signed connection to the CPH API of one project.
pub struct Client {
    http: reqwest::Client,
    creds: Credentials,
    host: String,
}

/// A job as the API answers it.
#[derive(Debug, Clone)]
pub struct JobRef {
    pub job_id: String,
    /// The phone or server it concerns.
    pub target: String,
}

impl Client {
    pub fn new(creds: Credentials) -> Result<Self, ClientError> {
        let host = creds
            .endpoint
            .split("://")
            .nth(1)
            .unwrap_or(&creds.endpoint)
            .trim_end_matches('/')
            .to_string();
        let http = cph_agent::tls::http_client(
            &creds.endpoint,
            creds.ca_cert.as_deref(),
            Duration::from_secs(60),
        )
        .map_err(ClientError::Input)?;
        Ok(Self { http, creds, host })
    }

    /// One signed request; `path` may hold `{p}` for the project id.
    pub async fn call(
        &self,
        method: &'static str,
        path: &str,
        query: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let path = path.replace("{p}", &self.creds.project_id);
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let mut headers = vec![
            ("Host".to_string(), self.host.clone()),
            ("Content-Type".to_string(), "application/json".to_string()),
            ("X-Project-Id".to_string(), self.creds.project_id.clone()),
        ];
        crate::auth::signing::sign(
            method,
            &path,
            query,
            &mut headers,
            bytes.as_bytes(),
            &self.creds.ak,
            &self.creds.sk,
            SystemTime::now(),
        );
        let mut url = format!("{}{path}", self.creds.endpoint.trim_end_matches('/'));
        if !query.is_empty() {
            url = format!("{url}?{query}");
        }
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut req = self.http.request(m, &url);
        for (n, v) in &headers {
            if !n.eq_ignore_ascii_case("host") {
                req = req.header(n.as_str(), v.as_str());
            }
        }
        if body.is_some() {
            req = req.body(bytes);
        }
        let http_err = |source| ClientError::Http {
            method,
            path: path.clone(),
            source,
        };
        let resp = req.send().await.map_err(http_err)?;
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            return Err(ClientError::Api {
                method,
                path,
                status,
                code: v["error_code"].as_str().unwrap_or("").to_string(),
                msg: v["error_msg"].as_str().unwrap_or("").to_string(),
            });
        }
        Ok(v)
    }

    /// Jobs of a batch answer; per-target errors are printed, not fatal.
    fn jobs_of(answer: &Value) -> Vec<JobRef> {
        let mut out = Vec::new();
        for j in answer["jobs"].as_array().into_iter().flatten() {
            let target = j["phone_id"]
                .as_str()
                .or_else(|| j["server_id"].as_str())
                .unwrap_or("")
                .to_string();
            match j["job_id"].as_str() {
                Some(id) => out.push(JobRef {
                    job_id: id.to_string(),
                    target,
                }),
                None => eprintln!(
                    "{target}: {} {}",
                    j["error_code"].as_str().unwrap_or(""),
                    j["error_msg"].as_str().unwrap_or("")
                ),
            }
        }
        out
    }

    /// Follows jobs to their end (status 2 or -1), drawing a progress bar on
    /// a terminal; returns their final answers in the given order.
    pub async fn follow(
        &self,
        jobs: &[JobRef],
        limit: Duration,
    ) -> Result<Vec<Value>, ClientError> {
        let start = Instant::now();
        let mut done: Vec<Option<Value>> = vec![None; jobs.len()];
        let mut bar = Progress::new(jobs.len());
        loop {
            for (i, j) in jobs.iter().enumerate() {
                if done[i].is_some() {
                    continue;
                }
                let v = self
                    .call(
                        "GET",
                        &format!("/v1/{{p}}/cloud-phone/jobs/{}", j.job_id),
                        "",
                        None,
                    )
                    .await?;
                if v["status"] == 2 || v["status"] == -1 {
                    done[i] = Some(v);
                }
            }
            let ended = done.iter().filter(|d| d.is_some()).count();
            let failed = done.iter().flatten().filter(|v| v["status"] == -1).count();
            bar.draw(ended, failed);
            if ended == jobs.len() {
                bar.finish();
                return Ok(done.into_iter().flatten().collect());
            }
            if start.elapsed() > limit {
                bar.finish();
                return Err(ClientError::Timeout(limit.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// A one-line progress bar on stderr (only on a terminal).
struct Progress {
    total: usize,
    tty: bool,
    drawn: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self {
            total,
            tty: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    fn draw(&mut self, ended: usize, failed: usize) {
        if !self.tty {
            return;
        }
        let width = 30;
        let full = ended * width / self.total.max(1);
        let line = format!(
            "\r[{}{}] {ended}/{} jobs ended{}",
            "#".repeat(full),
            "-".repeat(width - full),
            self.total,
            if failed > 0 {
                format!(", {failed} failed")
            } else {
                String::new()
            }
        );
        let mut err = std::io::stderr();
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
        self.drawn = true;
    }

    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// What the client is asked to do.
#[derive(Debug, Clone)]
pub enum Action {
    Servers,
    Phones {
        server_id: Option<String>,
    },
    Shell {
        phones: Vec<String>,
        command: String,
    },
    Push {
        phones: Vec<String>,
        file: String,
    },
    Jobs {
        job_ids: Vec<String>,
    },
    DeleteServers {
        server_ids: Vec<String>,
    },
    Restart {
        phones: Vec<String>,
    },
    Stop {
        phones: Vec<String>,
    },
    Reset {
        phones: Vec<String>,
        image_id: Option<String>,
    },
    Install {
        phones: Vec<String>,
        /// The APK: a local path or an `obs://` URL.
        file: String,
        /// `pm install` options such as `-r -t`.
        options: String,
    },
    Uninstall {
        phones: Vec<String>,
        package: String,
    },
    /// The project's custom images and those shared with it.
    Images,
    /// A custom image of a phone, followed until it is written.
    CreateImage {
        phone: String,
        name: String,
    },
    /// A server switched to a free host of its model with new phones
    /// (`ChangeCloudPhoneServer`), followed until they are made.
    SwitchServer {
        server_id: String,
        phone_model: String,
        image_id: String,
        keypair: Option<String>,
    },
}

/// Longest a command waits on its jobs.
const FOLLOW_LIMIT: Duration = Duration::from_secs(600);

fn print_jobs(answers: &[Value], jobs: &[JobRef]) -> bool {
    let mut ok = true;
    for (v, j) in answers.iter().zip(jobs) {
        if v["status"] == 2 {
            let msg = v["execute_msg"].as_str().unwrap_or("").trim_end();
            println!(
                "{} {}: ok{}",
                j.target,
                j.job_id,
                if msg.is_empty() {
                    String::new()
                } else {
                    format!("\n{msg}")
                }
            );
        } else {
            ok = false;
            println!(
                "{} {}: failed {} {}",
                j.target,
                j.job_id,
                v["error_code"].as_str().unwrap_or(""),
                v["error_msg"].as_str().unwrap_or("")
            );
        }
    }
    ok
}

/// Uploads a local file to the platform's object store (bucket `cph-client`)
/// and returns its `obs://` URL.
async fn upload(creds: &Credentials, file: &Path) -> Result<String, ClientError> {
    let (Some(endpoint), Some(ak), Some(sk)) = (&creds.obs_endpoint, &creds.obs_ak, &creds.obs_sk)
    else {
        return Err(ClientError::Input(
            "a local file needs the object store in the credentials (obs_endpoint, obs_ak, obs_sk); pass an obs:// URL instead".into(),
        ));
    };
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| ClientError::Input(format!("{} names no file", file.display())))?;
    let store = cph_agent::objstore::ObjectStore::new(
        &cph_agent::objstore::ObjectStoreConfig::local(endpoint.clone(), ak.clone(), sk.clone()),
    )?;
    let bucket = "cph-client";
    store.create_bucket(bucket).await?;
    let key = format!("push/{}/{name}", crate::store::new_id());
    let path = file.to_path_buf();
    store
        .upload_with(bucket, &key, move |w| {
            let mut f = std::fs::File::open(&path)?;
            std::io::copy(&mut f, w).map(drop)
        })
        .await
        .map_err(|e| match e {
            cph_agent::objstore::UploadError::Store(s) => ClientError::Store(s),
            cph_agent::objstore::UploadError::Produce(source) => ClientError::Io {
                what: "read",
                path: file.to_path_buf(),
                source,
            },
        })?;
    Ok(format!("obs://{bucket}/{key}"))
}

/// A batch operation (`POST path`) on `targets` phones, followed to the
/// end; `Ok(false)` unless every phone's job succeeded.
async fn batch(
    client: &Client,
    path: &str,
    body: &Value,
    targets: usize,
) -> Result<bool, ClientError> {
    let answer = client.call("POST", path, "", Some(body)).await?;
    let jobs = Client::jobs_of(&answer);
    let answers = client.follow(&jobs, FOLLOW_LIMIT).await?;
    Ok(print_jobs(&answers, &jobs) && jobs.len() == targets)
}

/// An ADB command (`POST .../phones/commands`) on `targets` phones.
async fn commands(client: &Client, body: &Value, targets: usize) -> Result<bool, ClientError> {
    batch(client, "/v1/{p}/cloud-phone/phones/commands", body, targets).await
}

/// `{"phones": [{"phone_id": ..}, ..]}` entries.
fn phone_entries(phones: &[String]) -> Value {
    Value::Array(phones.iter().map(|p| json!({ "phone_id": p })).collect())
}

/// An `obs://` URL as it is, a local file uploaded to the platform's store.
async fn object_url(creds: &Credentials, file: String) -> Result<String, ClientError> {
    if file.starts_with("obs://") {
        Ok(file)
    } else {
        upload(creds, Path::new(&file)).await
    }
}

/// Every item of a paged listing (`offset`/`limit`, at most 100 a page):
/// the `key` arrays of its pages, asked for until a short page.
async fn list_all(
    client: &Client,
    path: &str,
    query: &str,
    key: &str,
) -> Result<Vec<Value>, ClientError> {
    const PAGE: usize = 100;
    let mut all = Vec::new();
    loop {
        let q = format!("{query}&limit={PAGE}&offset={}", all.len());
        let v = client
            .call("GET", path, q.trim_start_matches('&'), None)
            .await?;
        let page = v[key].as_array().cloned().unwrap_or_default();
        let short = page.len() < PAGE;
        all.extend(page);
        if short {
            return Ok(all);
        }
    }
}

/// Runs one client action; `Ok(false)` when a job failed.
pub async fn run(creds_path: &Path, action: Action) -> Result<bool, ClientError> {
    let creds = Credentials::load(creds_path)?;
    let client = Client::new(creds.clone())?;
    match action {
        Action::Servers => {
            let servers = list_all(&client, "/v1/{p}/cloud-phone/servers", "", "servers").await?;
            println!("{:<34} {:<24} {:>6}  model", "server_id", "name", "status");
            for s in &servers {
                println!(
                    "{:<34} {:<24} {:>6}  {}",
                    s["server_id"].as_str().unwrap_or(""),
                    s["server_name"].as_str().unwrap_or(""),
                    s["status"],
                    s["server_model_name"].as_str().unwrap_or("")
                );
            }
            Ok(true)
        }
        Action::Phones { server_id } => {
            let query = match &server_id {
                Some(s) => format!("server_id={s}"),
                None => String::new(),
            };
            let phones = list_all(&client, "/v1/{p}/cloud-phone/phones", &query, "phones").await?;
            println!(
                "{:<34} {:<28} {:>6}  server_id",
                "phone_id", "name", "status"
            );
            for p in &phones {
                println!(
                    "{:<34} {:<28} {:>6}  {}",
                    p["phone_id"].as_str().unwrap_or(""),
                    p["phone_name"].as_str().unwrap_or(""),
                    p["status"],
                    p["server_id"].as_str().unwrap_or("")
                );
            }
            Ok(true)
        }
        Action::Shell { phones, command } => {
            let body = json!({"command": "shell", "content": command, "phone_ids": phones});
            commands(&client, &body, phones.len()).await
        }
        Action::Push { phones, file } => {
            let url = object_url(&creds, file).await?;
            let body = json!({"command": "push", "content": url, "phone_ids": phones});
            commands(&client, &body, phones.len()).await
        }
        Action::Install {
            phones,
            file,
            options,
        } => {
            let url = object_url(&creds, file).await?;
            let content = format!("{} {url}", options.trim()).trim().to_string();
            let body = json!({"command": "install", "content": content, "phone_ids": phones});
            commands(&client, &body, phones.len()).await
        }
        Action::Uninstall { phones, package } => {
            let body = json!({"command": "uninstall", "content": package, "phone_ids": phones});
            commands(&client, &body, phones.len()).await
        }
        Action::Restart { phones } => {
            let body = json!({ "phones": phone_entries(&phones) });
            let path = "/v1/{p}/cloud-phone/phones/batch-restart";
            batch(&client, path, &body, phones.len()).await
        }
        Action::Stop { phones } => {
            let body = json!({ "phone_ids": phones });
            let path = "/v1/{p}/cloud-phone/phones/batch-stop";
            batch(&client, path, &body, phones.len()).await
        }
        Action::Reset { phones, image_id } => {
            let mut body = json!({ "phones": phone_entries(&phones) });
            if let Some(id) = image_id {
                body["image_id"] = json!(id);
            }
            let path = "/v1/{p}/cloud-phone/phones/batch-reset";
            batch(&client, path, &body, phones.len()).await
        }
        Action::Jobs { job_ids } => {
            let jobs: Vec<JobRef> = job_ids
                .into_iter()
                .map(|job_id| JobRef {
                    target: "job".to_string(),
                    job_id,
                })
                .collect();
            let answers = client.follow(&jobs, FOLLOW_LIMIT).await?;
            Ok(print_jobs(&answers, &jobs))
        }
        Action::Images => {
            let images = list_all(&client, "/v1/{p}/cloud-phone/images", "", "image_infos").await?;
            println!(
                "{:<34} {:<24} {:>6} {:>12}  type",
                "image_id", "name", "status", "bytes"
            );
            for i in &images {
                println!(
                    "{:<34} {:<24} {:>6} {:>12}  {}",
                    i["image_id"].as_str().unwrap_or(""),
                    i["image_name"].as_str().unwrap_or(""),
                    i["status"],
                    i["image_size"],
                    i["image_type"].as_str().unwrap_or("")
                );
            }
            Ok(true)
        }
        Action::CreateImage { phone, name } => {
            let body = json!({"phone_id": phone, "image_name": name});
            let answer = client
                .call("POST", "/v1/{p}/cloud-phone/images", "", Some(&body))
                .await?;
            let image_id = answer["image_id"].as_str().unwrap_or("").to_string();
            let jobs = vec![JobRef {
                target: format!("image {image_id} of {phone}"),
                job_id: answer["job_id"].as_str().unwrap_or("").to_string(),
            }];
            let answers = client.follow(&jobs, FOLLOW_LIMIT).await?;
            Ok(print_jobs(&answers, &jobs))
        }
        Action::SwitchServer {
            server_id,
            phone_model,
            image_id,
            keypair,
        } => {
            let body = json!({"phone_model_name": phone_model, "image_id": image_id,
                              "keypair_name": keypair});
            let answer = client
                .call(
                    "POST",
                    &format!("/v2/{{p}}/cloud-phone/servers/{server_id}/change"),
                    "",
                    Some(&body),
                )
                .await?;
            let jobs = vec![JobRef {
                job_id: answer["job_id"].as_str().unwrap_or("").to_string(),
                target: server_id.clone(),
            }];
            let answers = client.follow(&jobs, FOLLOW_LIMIT).await?;
            Ok(print_jobs(&answers, &jobs))
        }
        Action::DeleteServers { server_ids } => {
            let body = json!({ "server_ids": server_ids });
            let answer = client
                .call("DELETE", "/v2/{p}/cloud-phone/servers", "", Some(&body))
                .await?;
            // The answer names the first job; the request lists them all.
            let request = answer["request_id"].as_str().unwrap_or("");
            let listed = client
                .call(
                    "GET",
                    "/v1/{p}/cloud-phone/jobs",
                    &format!("request_id={request}"),
                    None,
                )
                .await?;
            let jobs = Client::jobs_of(&listed);
            let answers = client.follow(&jobs, FOLLOW_LIMIT).await?;
            Ok(print_jobs(&answers, &jobs) && jobs.len() == server_ids.len())
        }
    }
}
