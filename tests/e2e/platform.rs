//! The platform as a user runs it: the real `cph up` over a fresh data dir
//! on free ports, started, stopped and started again, and a guard that
//! leaves the host as it found it whatever happens (SIGTERM `cph up`, then
//! `cph phone purge`, then whatever it left: the phones' network namespaces,
//! the bridge, veths and nft table named in the agent's config, mounts under
//! the data dir, the data dir).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long `cph up` may take to bring its three services up.
const START_LIMIT: Duration = Duration::from_secs(90);
/// How long `cph up` may take to stop them after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(60);

/// `cph` of this build; `cph-agent` and `cph-shim` next to it are built
/// first (they belong to the agent and runtime packages, which
/// `cargo test -p cph` does not build).
pub fn cph() -> PathBuf {
    let dir = crate::bins::built();
    for bin in ["cph-agent", "cph-shim"] {
        assert!(
            dir.join(bin).exists(),
            "{bin} not built in {}",
            dir.display()
        );
    }
    PathBuf::from(env!("CARGO_BIN_EXE_cph"))
}

/// The test phone image: `CPH_TEST_IMAGE`, or built by the repo's script.
pub use crate::bins::image;

/// Three distinct free ports on 127.0.0.1.
fn free_ports() -> [u16; 3] {
    let l: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let p = |i: usize| l[i].local_addr().expect("addr").port();
    [p(0), p(1), p(2)]
}

/// A process: pid, parent pid and argv.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    pub argv: Vec<String>,
}

/// Every process of the host.
pub fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let argv = std::fs::read(e.path().join("cmdline"))
            .unwrap_or_default()
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        out.push(Proc { pid, ppid, argv });
    }
    out
}

fn kill(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

fn alive(pid: i32) -> bool {
    // A zombie still answers signal 0; read its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// `cph up` over one data dir, and everything it leaves on the host.
pub struct Platform {
    pub data: PathBuf,
    cph: PathBuf,
    image: PathBuf,
    pub ports: [u16; 3],
    child: Option<Child>,
    /// Further arguments of `cph up`.
    args: Vec<String>,
    /// Service pids seen last (cleaned up if `cph up` dies without them).
    services: Vec<i32>,
}

impl Platform {
    pub fn new(cph: PathBuf, image: PathBuf) -> Self {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let data = std::env::temp_dir().join(format!("cph-e2e.{}.{stamp}", std::process::id()));
        std::fs::create_dir_all(&data).expect("create data dir");
        Self {
            data,
            cph,
            image,
            ports: free_ports(),
            child: None,
            args: Vec::new(),
            services: Vec::new(),
        }
    }

    /// The platform with further `cph up` arguments.
    pub fn with_args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    /// Runs `cph up` and waits until its three services answer; returns
    /// `credentials.json`.
    pub fn start(&mut self) -> Value {
        assert!(self.child.is_none(), "cph up already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.join("up.log"))
            .expect("open up.log");
        let err = log.try_clone().expect("clone log");
        let child = Command::new(&self.cph)
            .arg("up")
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--image")
            .arg(&self.image)
            .args(["--listen", &self.addr(0)])
            .args(["--agent-listen", &self.addr(1)])
            .args(["--obs-listen", &self.addr(2)])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("spawn cph up");
        self.child = Some(child);
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Some(status) = self.try_wait() {
                panic!("cph up exited with {status} while starting");
            }
            let up = (0..3).all(|i| TcpStream::connect(self.addr(i)).is_ok());
            let creds = std::fs::read(self.data.join("credentials.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
            // The agent listens last, after the credentials are written.
            if let (true, Some(c)) = (up, creds) {
                self.services = self.children().iter().map(|p| p.pid).collect();
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "cph up not up within {START_LIMIT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }

    /// The services `cph up` runs now.
    pub fn children(&self) -> Vec<Proc> {
        let Some(pid) = self.pid() else {
            return Vec::new();
        };
        processes().into_iter().filter(|p| p.ppid == pid).collect()
    }

    /// The pid of `cph-agent run`.
    pub fn agent_pid(&self) -> Option<i32> {
        self.children()
            .into_iter()
            .find(|p| {
                p.argv.first().is_some_and(|a| a.ends_with("cph-agent"))
                    && p.argv.iter().any(|a| a == "run")
            })
            .map(|p| p.pid)
    }

    /// `cph up`'s exit status once it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten();
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Waits up to `limit` for `cph up` to exit on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// SIGTERM to `cph up` (it stops its services in order), SIGKILL after
    /// [`STOP_LIMIT`]; then any service it left behind is killed.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        use nix::sys::signal::Signal;
        let mut status = None;
        if let Some(pid) = self.pid() {
            let seen: Vec<i32> = self.children().iter().map(|p| p.pid).collect();
            self.services.extend(seen);
            kill(pid, Signal::SIGTERM);
            status = self.wait_exit(STOP_LIMIT);
            if status.is_none() {
                if let Some(mut c) = self.child.take() {
                    let _ = c.kill();
                    status = c.wait().ok();
                }
            }
        }
        for pid in std::mem::take(&mut self.services) {
            if alive(pid) {
                eprintln!("e2e: service {pid} outlived cph up; killing it");
                kill(pid, Signal::SIGKILL);
            }
        }
        status
    }

    /// The tail of `cph up`'s and its services' logs.
    pub fn dump_logs(&self) {
        let mut files = vec![self.data.join("up.log")];
        if let Ok(rd) = std::fs::read_dir(self.data.join("logs")) {
            files.extend(rd.flatten().map(|e| e.path()));
        }
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!("==== {} (last {} lines)", f.display(), tail.len());
            for l in tail {
                eprintln!("{l}");
            }
        }
    }

    /// The bridge of this platform's phones (from `<data>/agent.toml`).
    pub fn bridge(&self) -> Option<String> {
        self.network_names().bridge
    }

    /// The host network names in `<data>/agent.toml`.
    fn network_names(&self) -> NetworkNames {
        let cfg = std::fs::read_to_string(self.data.join("agent.toml"))
            .ok()
            .and_then(|t| t.parse::<toml::Table>().ok());
        let get = |k: &str| {
            cfg.as_ref()
                .and_then(|c| c.get("network"))
                .and_then(|n| n.get(k))
                .and_then(|v| v.as_str())
                .filter(|v| !v.is_empty())
                .map(String::from)
        };
        NetworkNames {
            bridge: get("bridge"),
            nft_table: get("nft_table"),
            veth_prefix: get("veth_prefix"),
        }
    }

    /// Network namespaces of this platform's phones (from the agent's state).
    fn netns_paths(&self) -> Vec<PathBuf> {
        let state = std::fs::read(self.data.join("agent/network.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
        state
            .as_ref()
            .and_then(|s| s["phones"].as_object())
            .map(|phones| {
                phones
                    .values()
                    .filter_map(|p| p["netns"].as_str().map(PathBuf::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Host network names of one platform.
struct NetworkNames {
    bridge: Option<String>,
    nft_table: Option<String>,
    veth_prefix: Option<String>,
}

impl NetworkNames {
    /// Host links whose names start with the veth prefix.
    fn veths(&self) -> Vec<String> {
        let Some(prefix) = &self.veth_prefix else {
            return Vec::new();
        };
        std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .filter(|n| n.starts_with(prefix.as_str()))
            .collect()
    }
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort();
    v.reverse();
    v
}

impl Drop for Platform {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        self.stop();
        let purge = Command::new(&self.cph)
            .args(["phone", "purge", "--data-dir"])
            .arg(&self.data)
            .output();
        if !purge.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("e2e: cph phone purge failed: {purge:?}");
        }
        for ns in self.netns_paths() {
            let _ = Command::new("umount").arg("-l").arg(&ns).status();
            let _ = std::fs::remove_file(&ns);
        }
        // What the agent's purge may leave of the host network `cph up`
        // named for this data dir (`[network]` of its agent.toml).
        let net = self.network_names();
        if let Some(table) = &net.nft_table {
            let _ = Command::new("nft")
                .args(["delete", "table", "ip", table])
                .stderr(Stdio::null())
                .status();
        }
        let mut links = net.veths();
        links.extend(net.bridge.clone());
        for l in links {
            let _ = Command::new("ip")
                .args(["link", "del", &l])
                .stderr(Stdio::null())
                .status();
        }
        for m in mounts_under(&self.data) {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        if let Err(e) = std::fs::remove_dir_all(&self.data) {
            eprintln!("e2e: remove {}: {e}", self.data.display());
        }
    }
}
