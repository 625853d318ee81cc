//! What the agent's end-to-end tests share: the test image, the real
//! `cph-agent` binary over a temporary state dir, one-request HTTP, job
//! helpers, and a guard that kills the agent and deletes every container of
//! the test whatever happens.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cph_runtime::container::Runtime;
use serde_json::{json, Value};

pub fn image() -> PathBuf {
    if let Some(p) = std::env::var_os("CPH_TEST_IMAGE") {
        return PathBuf::from(p);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = repo.join("target/images/cph-test-image.tar.gz");
    if !path.exists() {
        let ok = Command::new(repo.join("image/build-test-image.sh"))
            .arg(&path)
            .status()
            .expect("run build-test-image.sh")
            .success();
        assert!(ok, "building the test image failed");
    }
    path
}

/// `cph-shim` of this build, brought up to date (it belongs to the runtime
/// package), unless `CPH_BINS_BUILT=1` says the caller built every binary
/// of this checkout already (the cgroup v2 VM, where a cargo run that
/// builds nothing takes seconds).
pub fn shim() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_cph-agent"));
    let dir = exe.parent().expect("bin dir").to_path_buf();
    if std::env::var_os("CPH_BINS_BUILT").is_some_and(|v| v == "1") {
        return dir.join("cph-shim");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    // Selected from the whole workspace: a build of the runtime package
    // alone would resolve its dependencies' features anew and compile them
    // again.
    cmd.args(["build", "--workspace", "--bin", "cph-shim"]);
    if dir.ends_with("release") {
        cmd.arg("--release");
    }
    let ok = cmd.status().expect("cargo build cph-shim").success();
    assert!(ok, "building cph-shim failed");
    dir.join("cph-shim")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// One HTTP/1.1 request; returns status and JSON body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let (status, text) = http_text(addr, method, path, token, body);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// One HTTP/1.1 request; returns status and body text.
pub fn http_text(
    addr: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect agent");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read");
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("http response");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// The real `cph-agent run`, killed when dropped.
pub struct Agent {
    child: Option<Child>,
    config: PathBuf,
    pub addr: String,
}

impl Agent {
    pub fn start(config: &Path, addr: &str) -> Self {
        let exe = env!("CARGO_BIN_EXE_cph-agent");
        let mut cmd = match std::env::var_os("CPH_SPAWN_WRAPPER") {
            Some(w) => {
                let mut c = Command::new(w);
                c.arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.arg("--config").arg(config).arg("run");
        let child = cmd.spawn().expect("spawn cph-agent");
        let agent = Self {
            child: Some(child),
            config: config.to_path_buf(),
            addr: addr.to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "cph-agent did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        *self = Self::start(&self.config.clone(), &self.addr.clone());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Deletes every container left in the test's state dir and its cgroups,
/// then its phones' network namespaces and every mount under the state dir
/// (overlay volumes), so the temporary directory can go.
pub struct Cleanup {
    pub state: PathBuf,
    pub parent: String,
    pub shim: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(rt) = Runtime::new(&self.state.join("containers"), &self.parent, &self.shim) {
            for c in rt.list().unwrap_or_default() {
                let _ = rt.delete(&c.name, Duration::from_secs(5));
            }
        }
        let _ = cph_runtime::container::remove_cgroup_parent(&self.parent);
        // The network state keeps one file per phone.
        let phone_files = std::fs::read_dir(self.state.join("network.phones"))
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        for file in phone_files {
            let rec = std::fs::read(&file)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
            if let Some(ns) = rec.as_ref().and_then(|r| r["phone"]["netns"].as_str()) {
                let _ = Command::new("umount").args(["-l", ns]).status();
                let _ = std::fs::remove_file(ns);
            }
        }
        for m in mounts_under(&self.state).into_iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        for dev in loops_under(&self.state) {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
    }
}

/// Loop devices whose backing file is below `dir` (btrfs pool files).
pub fn loops_under(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, file)| Path::new(file.trim()).starts_with(dir))
        .map(|(dev, _)| dev.to_string())
        .collect()
}

/// Writes an agent config for a test: no control plane, host preparation
/// off, the given shim and cgroup parent, and `extra` (sections) appended.
pub fn write_config(
    path: &Path,
    token: &str,
    addr: &str,
    state: &Path,
    shim: &Path,
    parent: &str,
    extra: &str,
) {
    std::fs::write(
        path,
        format!(
            "control_plane_url = \"\"\nnode_token = \"{token}\"\nlisten = \"{addr}\"\nstate_dir = \"{}\"\nprepare_host = false\nshim = \"{}\"\ncgroup_parent = \"{parent}\"\nshell_timeout_secs = 60\n{extra}",
            state.display(),
            shim.display(),
        ),
    )
    .expect("write agent config");
}

/// One agent under test: a temporary directory, names unique to the test
/// process, its config (`extra` TOML sections appended), the running
/// `cph-agent`, and the guards that clean up whatever happens. Fields drop
/// in order: the agent, its containers and mounts, the host's network
/// objects, the directory.
pub struct TestAgent {
    pub agent: Agent,
    pub addr: String,
    pub token: String,
    pub state: PathBuf,
    pub parent: String,
    pub shim: PathBuf,
    pub config: PathBuf,
    pub net: Option<TestNet>,
    _cleanup: Cleanup,
    _host: Option<HostGuard>,
    pub tmp: tempfile::TempDir,
}

impl TestAgent {
    /// Starts an agent whose cgroup parent is `cph-<name>-<pid>`; with
    /// `network` its phones get a network of their own (torn down after),
    /// otherwise networking is off.
    pub fn start(name: &str, network: bool, extra: &str) -> Self {
        Self::start_in(tempfile::tempdir().expect("tempdir"), name, network, extra)
    }

    /// [`TestAgent::start`] in a directory the test has already used.
    pub fn start_in(tmp: tempfile::TempDir, name: &str, network: bool, extra: &str) -> Self {
        let pid = std::process::id();
        let state = tmp.path().join("state");
        let parent = format!("cph-{name}-{pid}");
        let shim = shim();
        let net = network.then(TestNet::unique);
        let host = net.clone().map(|net| HostGuard { net });
        let cleanup = Cleanup {
            state: state.clone(),
            parent: parent.clone(),
            shim: shim.clone(),
        };
        let addr = format!("127.0.0.1:{}", free_port());
        let token = format!("tok-{pid}");
        let config = tmp.path().join("agent.toml");
        let net_toml = match &net {
            Some(n) => n.toml(),
            None => "[network]\nenabled = false\n".to_string(),
        };
        write_config(
            &config,
            &token,
            &addr,
            &state,
            &shim,
            &parent,
            &format!("{extra}\n{net_toml}"),
        );
        let agent = Agent::start(&config, &addr);
        Self {
            agent,
            addr,
            token,
            state,
            parent,
            shim,
            config,
            net,
            _cleanup: cleanup,
            _host: host,
            tmp,
        }
    }

    /// One request to the agent with its token.
    pub fn http(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        http(&self.addr, method, path, &self.token, body)
    }

    /// Waits for a job to end.
    pub fn wait_job(&self, id: &str) -> Value {
        wait_job(&self.addr, &self.token, id)
    }
}

/// Submits a job (answered 200) and waits for it to end; its status.
pub fn run_job(addr: &str, token: &str, body: &Value) -> Value {
    let id = body["job_id"].as_str().expect("job id");
    let (code, st) = http(addr, "POST", "/v1/jobs", token, Some(body));
    assert_eq!(code, 200, "{st}");
    wait_job(addr, token, id)
}

pub fn wait_job(addr: &str, token: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (code, body) = http(addr, "GET", &format!("/v1/jobs/{id}"), token, None);
        assert_eq!(code, 200, "job {id}: {body}");
        if body["status"] != 1 {
            return body;
        }
        assert!(Instant::now() < deadline, "job {id} still running");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn job(id: &str, server: &str, phone: &str, kind: Value) -> Value {
    let mut v = server_job(id, server, kind);
    v["phone_id"] = json!(phone);
    v
}

/// `DELETE /v1/servers/SERVER`, which must be accepted; the ended job
/// `SERVER:delete` that releases the server.
pub fn delete_server(addr: &str, token: &str, server: &str) -> Value {
    let (code, body) = http(
        addr,
        "DELETE",
        &format!("/v1/servers/{server}"),
        token,
        None,
    );
    assert_eq!(code, 200, "{body}");
    wait_job(addr, token, &format!("{server}:delete"))
}

/// A job of the server itself (no phone).
pub fn server_job(id: &str, server: &str, kind: Value) -> Value {
    let mut v = json!({"job_id": id, "request_id": "r", "server_id": server});
    if let (Some(o), Some(k)) = (v.as_object_mut(), kind.as_object()) {
        o.extend(k.clone());
    }
    v
}

/// Network names of one test agent, unique per process and call, so tests
/// run in parallel with each other and with a real agent on the host.
#[derive(Debug, Clone)]
pub struct TestNet {
    pub bridge: String,
    pub table: String,
    /// Hex digits between `v` and `p`: no other test's prefix starts with it.
    pub veth_prefix: String,
    pub subnet_prefix: String,
    pub port_first: u16,
    pub port_last: u16,
}

static NET_COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl TestNet {
    pub fn unique() -> Self {
        let pid = std::process::id();
        let n = NET_COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let k = pid.wrapping_mul(8).wrapping_add(n);
        let first = 30000 + (k % 1000) as u16 * 20;
        Self {
            bridge: format!("cb{pid}x{n}"),
            table: format!("ct{pid}_{n}"),
            veth_prefix: format!("v{:x}p", pid.wrapping_mul(100).wrapping_add(n)),
            subnet_prefix: format!("10.{}.{}", 100 + k % 100, (k / 100) % 256),
            port_first: first,
            port_last: first + 19,
        }
    }

    /// The subnet, e.g. `10.123.45.0/24`.
    pub fn subnet(&self) -> String {
        format!("{}.0/24", self.subnet_prefix)
    }

    /// The `[network]` section of the agent config.
    pub fn toml(&self) -> String {
        format!(
            "[network]\nenabled = true\nbridge = \"{}\"\nsubnet = \"{}\"\nnft_table = \"{}\"\nveth_prefix = \"{}\"\naccess_port_first = {}\naccess_port_last = {}\n",
            self.bridge,
            self.subnet(),
            self.table,
            self.veth_prefix,
            self.port_first,
            self.port_last
        )
    }

    /// Host links of this test's phones.
    pub fn veths(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            .filter(|n| n.starts_with(&self.veth_prefix))
            .collect()
    }
}

/// Removes the host side of a test agent's network: its nftables table,
/// veths and bridge. Declare it before [`Cleanup`] so it runs after the
/// containers and namespaces are gone.
pub struct HostGuard {
    pub net: TestNet,
}

impl Drop for HostGuard {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", &self.net.table])
            .status();
        for l in self.net.veths() {
            let _ = Command::new("ip").args(["link", "del", &l]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.net.bridge])
            .status();
    }
}

/// Mount points at or below `dir`, outermost first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort();
    v
}
