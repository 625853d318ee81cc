//! `cph up`: the whole platform on this one machine.
//!
//! Runs the three services a fleet runs, as the same binaries a fleet runs
//! them: the embedded S3-protocol object store (`cph-agent object-store`),
//! the control plane (`cph serve`) and one node agent (`cph-agent run`)
//! registered with it. The first start creates a default project with AK/SK
//! credentials and writes them, with the endpoints, to
//! `<data-dir>/credentials.json`; later starts reuse everything in the data
//! directory. Ctrl-C (or SIGTERM) stops the services; the phones' data stays,
//! and the next `cph up` resumes the same platform.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use cph_runtime::container::Runtime;

/// Errors of `cph up` and the local phone commands.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{name} not found next to {exe}; build the workspace (cargo build --workspace --bins)"
    )]
    NoBinary { name: &'static str, exe: PathBuf },
    #[error("phone image {0} not found; build it with image/build-test-image.sh")]
    NoImage(PathBuf),
    #[error("stopped by signal {0} while starting; the services started were stopped")]
    Interrupted(i32),
    #[error("{service} did not come up on {addr} within {secs} s; its log: {log}")]
    NotUp {
        service: &'static str,
        addr: SocketAddr,
        secs: u64,
        log: PathBuf,
    },
    #[error("{service} exited with {status} while starting; its log: {log}")]
    Exited {
        service: &'static str,
        status: std::process::ExitStatus,
        log: PathBuf,
    },
    #[error(
        "{service} exited with {status} after {restarts} restarts in 5 minutes; its log: {log}"
    )]
    Failed {
        service: &'static str,
        status: std::process::ExitStatus,
        restarts: usize,
        log: PathBuf,
    },
    #[error("{what}: {reason}")]
    Bootstrap { what: &'static str, reason: String },
    #[error(transparent)]
    Container(#[from] cph_runtime::container::ContainerError),
}

/// Options of `cph up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub data_dir: PathBuf,
    /// Phone image: a rootfs tar, optionally gzip.
    pub image: PathBuf,
    /// Address of the CPH API.
    pub listen: SocketAddr,
    /// Address of the local agent's protocol.
    pub agent_listen: SocketAddr,
    /// Address of the embedded object store.
    pub obs_listen: SocketAddr,
    /// Phones of the local server (the development flavor's capacity).
    pub phones: u32,
    /// Phones in user namespaces of their own, on btrfs volumes.
    pub user_namespaces: bool,
    /// Size of those volumes' sparse pool file in GiB, when it is made
    /// (`None`: [`BTRFS_POOL_BASE_GB`] + [`BTRFS_POOL_GB_PER_PHONE`] per phone).
    pub pool_size_gb: Option<u64>,
    /// The CPH API over HTTPS, with a self-signed certificate of the data
    /// dir.
    pub tls: bool,
    /// Local hosts: agents on this machine, each a host of the fleet with
    /// a server of its own to buy (1 to [`MAX_HOSTS`]).
    pub hosts: u32,
}

/// Most local hosts `cph up` runs.
pub const MAX_HOSTS: u32 = 4;

/// One local host of `cph up`: host 1 keeps the names of a single-host
/// platform (`agent/`, `agent.toml`, the machine's id); host `i` has
/// `agent-i/`, `agent-i.toml`, the node id `<instance>-host-i`, the next
/// agent port, and its own cgroup parent, bridge, subnet, nft table and
/// access ports.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalHost {
    pub number: u32,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub listen: SocketAddr,
    pub cgroup_parent: String,
    pub node_id: Option<String>,
}

impl LocalHost {
    pub fn new(data_dir: &Path, agent_listen: SocketAddr, number: u32) -> Self {
        let suffix = if number == 1 {
            String::new()
        } else {
            format!("-{number}")
        };
        let mut listen = agent_listen;
        listen.set_port(agent_listen.port().saturating_add((number - 1) as u16));
        Self {
            number,
            dir: data_dir.join(format!("agent{suffix}")),
            config: data_dir.join(format!("agent{suffix}.toml")),
            log: data_dir.join("logs").join(format!("agent{suffix}.log")),
            listen,
            cgroup_parent: format!("cph{suffix}"),
            node_id: (number > 1)
                .then(|| format!("cph-up-{}-host-{number}", instance_number(data_dir))),
        }
    }

    /// The local hosts a data dir has had (those with an agent config).
    pub fn existing(data_dir: &Path) -> Vec<LocalHost> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        (1..=MAX_HOSTS)
            .map(|i| Self::new(data_dir, any, i))
            .filter(|h| h.config.is_file() || h.number == 1)
            .collect()
    }

    /// The runtime of this host's phones.
    pub fn runtime(&self) -> Result<Runtime, UpError> {
        let shim = sibling("cph-shim")?;
        Ok(Runtime::new(
            &self.dir.join("containers"),
            &self.cgroup_parent,
            &shim,
        )?)
    }
}

/// What a client needs to use the platform; `<data-dir>/credentials.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub endpoint: String,
    pub project_id: String,
    pub ak: String,
    pub sk: String,
    pub obs_endpoint: String,
    pub obs_ak: String,
    pub obs_sk: String,
    /// The certificate an HTTPS `endpoint` is served with, for clients to
    /// trust (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

/// Secrets shared between the local services, kept across restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Secrets {
    node_token: String,
    obs_ak: String,
    obs_sk: String,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> UpError + 'a {
    move |source| UpError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A project binary installed beside the running `cph`.
fn sibling(name: &'static str) -> Result<PathBuf, UpError> {
    let exe = std::env::current_exe().map_err(io("locate", Path::new("cph")))?;
    let path = exe.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(UpError::NoBinary { name, exe })
    }
}

/// `cph phone purge`: each local host's agent deletes every phone
/// (containers, volumes, networks) and takes its phone network and pool
/// mounts off the host; without an agent config, the containers alone are
/// deleted.
pub fn purge(data_dir: &Path) -> Result<(), UpError> {
    for host in LocalHost::existing(data_dir) {
        if host.config.is_file() {
            let agent = sibling("cph-agent")?;
            let status = Command::new(&agent)
                .arg("--config")
                .arg(&host.config)
                .arg("purge")
                .status()
                .map_err(io("run", &agent))?;
            if status.success() {
                continue;
            }
            tracing::warn!(%status, host = host.number, "cph-agent purge failed; deleting the containers alone");
        }
        let rt = host.runtime()?;
        for st in rt.list()? {
            rt.delete(&st.name, Duration::from_secs(5))?;
            println!("deleted {}", st.name);
        }
    }
    Ok(())
}

/// The runtimes of the local hosts' phones.
pub fn runtimes(data_dir: &Path) -> Result<Vec<Runtime>, UpError> {
    LocalHost::existing(data_dir)
        .iter()
        .map(LocalHost::runtime)
        .collect()
}

fn random_hex(bytes: usize) -> Result<String, UpError> {
    use std::io::Read;
    let path = Path::new("/dev/urandom");
    let mut buf = vec![0u8; bytes];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(io("read", path))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn load_or_create_secrets(path: &Path) -> Result<Secrets, UpError> {
    if let Ok(text) = std::fs::read_to_string(path) {
        if let Ok(s) = serde_json::from_str(&text) {
            return Ok(s);
        }
    }
    let s = Secrets {
        node_token: random_hex(24)?,
        obs_ak: format!("CPHOBS{}", random_hex(7)?.to_uppercase()),
        obs_sk: random_hex(20)?,
    };
    write_private(path, &serde_json::to_vec_pretty(&s).unwrap_or_default())?;
    Ok(s)
}

/// Writes a file readable by root only, atomically.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), UpError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io("rename", path))
}

/// Restarts of one service within [`RESTART_WINDOW`] before `cph up` gives up.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(300);

/// One supervised service process: restarted when it dies, killed with
/// SIGTERM when dropped.
struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
    program: std::ffi::OsString,
    args: Vec<std::ffi::OsString>,
    addr: SocketAddr,
    restarts: Vec<Instant>,
}

fn start_child(
    program: &std::ffi::OsStr,
    args: &[std::ffi::OsString],
    log: &Path,
) -> Result<Child, UpError> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io("open log", log))?;
    let err = out.try_clone().map_err(io("open log", log))?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // Own process group: Ctrl-C in the terminal reaches `cph up` only,
    // which then stops the services in order.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    // The child inherits the signals `cph up` blocks (see
    // `block_stop_signals`): unblocked, so that SIGTERM stops it.
    // SAFETY: only async-signal-safe calls (sigemptyset, sigaddset,
    // sigprocmask) between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(set.as_mut_ptr());
            libc::sigaddset(set.as_mut_ptr(), libc::SIGINT);
            libc::sigaddset(set.as_mut_ptr(), libc::SIGTERM);
            if libc::sigprocmask(libc::SIG_UNBLOCK, set.as_ptr(), std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(io("start", log))
}

impl Service {
    fn spawn(
        name: &'static str,
        cmd: Command,
        log: PathBuf,
        addr: SocketAddr,
    ) -> Result<Self, UpError> {
        let program = cmd.get_program().to_os_string();
        let args: Vec<std::ffi::OsString> = cmd.get_args().map(|a| a.to_os_string()).collect();
        let child = start_child(&program, &args, &log)?;
        let mut svc = Self {
            name,
            child,
            log,
            program,
            args,
            addr,
            restarts: Vec::new(),
        };
        svc.wait_listening(addr, Duration::from_secs(60))?;
        Ok(svc)
    }

    /// Starts the service again after it died, unless it died too often.
    fn restart(&mut self, status: std::process::ExitStatus) -> Result<(), UpError> {
        let now = Instant::now();
        self.restarts
            .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        if self.restarts.len() >= MAX_RESTARTS {
            return Err(UpError::Failed {
                service: self.name,
                status,
                restarts: self.restarts.len(),
                log: self.log.clone(),
            });
        }
        self.restarts.push(now);
        self.child = start_child(&self.program, &self.args, &self.log)?;
        self.wait_listening(self.addr, Duration::from_secs(60))
    }

    fn wait_listening(&mut self, addr: SocketAddr, limit: Duration) -> Result<(), UpError> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(UpError::Exited {
                    service: self.name,
                    status,
                    log: self.log.clone(),
                });
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(sig) = stop_signal(Duration::ZERO) {
                return Err(UpError::Interrupted(sig));
            }
            if start.elapsed() > limit {
                return Err(UpError::NotUp {
                    service: self.name,
                    addr,
                    secs: limit.as_secs(),
                    log: self.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL after `grace`.
    fn stop(&mut self, grace: Duration) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if self.exited().is_some() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < grace {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(20));
    }
}

fn local_url(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("http://127.0.0.1:{}", addr.port())
    } else {
        format!("http://{addr}")
    }
}

/// The local URL of the CPH API: `https` with `--tls`.
fn api_url(opts: &UpOptions) -> String {
    let url = local_url(opts.listen);
    if opts.tls {
        url.replacen("http://", "https://", 1)
    } else {
        url
    }
}

/// Instance numbers `cph up` hands out: each names a bridge, an nft table,
/// a veth prefix and a subnet of its own.
const INSTANCES: u32 = 100;
/// Access-port ranges: instance `n` maps the ports of slot `n % PORT_SLOTS`,
/// so at most this many platforms run at once on one machine.
const PORT_SLOTS: u32 = 20;

/// Access ports of each local host.
const ACCESS_PORTS: u32 = 500;

/// The first access port of local host `host` of instance `n`.
fn first_access_port(n: u32, host: u32) -> u32 {
    20000 + (n % PORT_SLOTS) * ACCESS_PORTS + 10000 * (host - 1)
}

/// Where a data dir keeps the instance number its first `cph up` took.
fn instance_file(data_dir: &Path) -> PathBuf {
    data_dir.join("instance")
}

/// The instance number a data dir took, or for one that never ran (or ran
/// before the number was kept), the number its path hashes to.
fn instance_number(data_dir: &Path) -> u32 {
    kept_instance(data_dir).unwrap_or_else(|| hashed_instance(data_dir))
}

fn kept_instance(data_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(instance_file(data_dir)).ok()?;
    text.trim().parse().ok().filter(|n| *n < INSTANCES)
}

/// The first number tried for a data dir: a hash of its path.
fn hashed_instance(data_dir: &Path) -> u32 {
    let path = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let mut h: u32 = 0x811c_9dc5;
    for b in path.to_string_lossy().bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h % INSTANCES
}

/// A running `cph up`'s hold on its instance number and that number's
/// access-port slot: an abstract unix socket named after the slot, which
/// the kernel releases when the process ends, however it ends, and which
/// leaves nothing on disk.
#[derive(Debug)]
struct InstanceClaim {
    number: u32,
    _socket: std::os::unix::net::UnixListener,
}

/// Binds the slot of instance `n`; `None` when another `cph up` holds it.
fn hold_slot(n: u32) -> Result<Option<InstanceClaim>, UpError> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("cph-up-port-slot-{}", n % PORT_SLOTS);
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(io("name", Path::new(&name)))?;
    match std::os::unix::net::UnixListener::bind_addr(&addr) {
        Ok(socket) => Ok(Some(InstanceClaim {
            number: n,
            _socket: socket,
        })),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(None),
        Err(e) => Err(io("bind", Path::new(&name))(e)),
    }
}

/// Phones the data dir's local hosts hold.
fn phone_count(data_dir: &Path) -> usize {
    LocalHost::existing(data_dir)
        .iter()
        .map(|h| host_phones(&h.dir))
        .sum()
}

/// Phones of the local host whose agent state dir is `agent_dir`.
fn host_phones(agent_dir: &Path) -> usize {
    std::fs::read_dir(agent_dir.join("phones"))
        .map(|d| d.flatten().count())
        .unwrap_or(0)
}

/// The bridge of host 1 of instance `n`.
fn bridge_name(n: u32) -> String {
    format!("cphup{n}")
}

/// Takes the data dir's instance number for this run: the one it kept,
/// or, the first time, the first number from its hash whose port slot no
/// running `cph up` holds and whose bridge is not on the host (a stopped
/// platform's phones keep theirs). Two platforms started at once never
/// share bridge, veth names, subnet or access ports.
fn claim_instance(data_dir: &Path) -> Result<InstanceClaim, UpError> {
    claim_instance_from(
        data_dir,
        hashed_instance(data_dir),
        Path::new("/sys/class/net"),
    )
}

fn claim_instance_from(
    data_dir: &Path,
    first: u32,
    links: &Path,
) -> Result<InstanceClaim, UpError> {
    let phones = phone_count(data_dir);
    // Phones made before numbers were kept have networks named by the hash.
    let kept = kept_instance(data_dir).or((phones > 0).then_some(first));
    if let Some(n) = kept {
        if let Some(claim) = hold_slot(n)? {
            return Ok(claim);
        }
        if phones > 0 {
            let port = first_access_port(n, 1);
            return Err(UpError::Bootstrap {
                what: "instance",
                reason: format!(
                    "another running `cph up` maps access ports {port}-{} that this data dir's \
                     {phones} phones use; stop it first",
                    port + ACCESS_PORTS - 1
                ),
            });
        }
    }
    for k in 0..INSTANCES {
        let n = (first + k) % INSTANCES;
        if Some(n) == kept || links.join(bridge_name(n)).exists() {
            continue;
        }
        let Some(claim) = hold_slot(n)? else {
            continue;
        };
        write_private(&instance_file(data_dir), format!("{n}\n").as_bytes())?;
        return Ok(claim);
    }
    Err(UpError::Bootstrap {
        what: "instance",
        reason: format!(
            "{PORT_SLOTS} platforms already run on this machine (or {INSTANCES} bridges of \
             stopped ones remain; `cph phone purge --data-dir` takes one off)"
        ),
    })
}

/// Refuses to switch the phone volumes' backend (`--user-namespaces` on or
/// off) of a data dir that holds phones: they would be lost from sight.
fn keeps_its_volumes(
    agent_toml: &Path,
    agent_dir: &Path,
    user_namespaces: bool,
) -> Result<(), UpError> {
    let Ok(text) = std::fs::read_to_string(agent_toml) else {
        return Ok(());
    };
    let Ok(old) = toml::from_str::<cph_agent::config::AgentConfig>(&text) else {
        return Ok(());
    };
    let phones = host_phones(agent_dir);
    if old.user_namespaces.enabled != user_namespaces && phones > 0 {
        let (was, flag) = if old.user_namespaces.enabled {
            ("with", "add --user-namespaces")
        } else {
            ("without", "leave out --user-namespaces")
        };
        return Err(UpError::Bootstrap {
            what: "phone volumes",
            reason: format!(
                "this data dir's {phones} phones were made {was} user namespaces, on other \
                 volumes: {flag}, or delete them first (cph phone purge --data-dir ...)"
            ),
        });
    }
    Ok(())
}

/// Size of the sparse btrfs pool file of `cph up --user-namespaces`:
/// images and sharepool, then each phone's volume.
const BTRFS_POOL_BASE_GB: u64 = 16;
const BTRFS_POOL_GB_PER_PHONE: u64 = 8;

/// `s` as a quoted TOML string.
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The `[object_store]` section naming the embedded store, as the agent's
/// configuration and the control plane's `--object-store` file hold it.
fn object_store_section(opts: &UpOptions, secrets: &Secrets) -> String {
    format!(
        "[object_store]\n\
         endpoint = {obs}\n\
         access_key = {ak}\n\
         secret_key = {sk}\n\
         path_style = true\n",
        obs = q(&local_url(opts.obs_listen)),
        ak = q(&secrets.obs_ak),
        sk = q(&secrets.obs_sk),
    )
}

/// The local agent's configuration, rewritten at every start.
fn agent_config(opts: &UpOptions, secrets: &Secrets, host: &LocalHost) -> String {
    let dir = &host.dir;
    let n = instance_number(&opts.data_dir);
    let i = host.number;
    let first_port = first_access_port(n, i);
    // Host 1 keeps a single host's names; the others' differ by `i`.
    let (bridge, table, veth, netns) = if i == 1 {
        (
            bridge_name(n),
            format!("cph_up_{n}"),
            format!("cu{n}x"),
            "cph-".to_string(),
        )
    } else {
        (
            format!("cphup{n}h{i}"),
            format!("cph_up_{n}_h{i}"),
            format!("cu{n}{}", ['x', 'y', 'z', 'w'][(i as usize - 1) % 4]),
            format!("cph-h{i}-"),
        )
    };
    let node_id = host
        .node_id
        .as_deref()
        .map(|id| format!("node_id = {}\n", q(id)))
        .unwrap_or_default();
    // User namespaces need volumes that can be mounted idmapped: btrfs
    // snapshots in a sparse file (`pool.img`, mounted at `pool`).
    let storage = if opts.user_namespaces {
        format!(
            "[storage]\nbackend = \"btrfs\"\npool_size_gb = {}\n\n\
             [user_namespaces]\nenabled = true\n",
            opts.pool_size_gb
                .unwrap_or(BTRFS_POOL_BASE_GB + BTRFS_POOL_GB_PER_PHONE * u64::from(opts.phones))
        )
    } else {
        format!(
            "[storage]\nbackend = \"overlay\"\npool = {}\n",
            q(&dir.join("pool").to_string_lossy())
        )
    };
    // With --tls the API and the agent protocol are HTTPS with the data
    // dir's own certificate, which each side trusts.
    let ca = if opts.tls {
        let tls = opts.data_dir.join("tls");
        let cert = q(&tls.join("cert.pem").to_string_lossy());
        let key = q(&tls.join("key.pem").to_string_lossy());
        format!("control_plane_ca = {cert}\ntls_cert = {cert}\ntls_key = {key}\n")
    } else {
        String::new()
    };
    format!(
        "# Written by `cph up` at every start.\n\
         control_plane_url = {cp}\n\
         {ca}\
         node_token = {token}\n\
         {node_id}\
         listen = {listen}\n\
         cgroup_parent = {cgroup}\n\
         state_dir = {state}\n\
         server_model = {model}\n\
         phone_capacity = {cap}\n\
         \n\
         {storage}\
         \n\
         [network]\n\
         enabled = true\n\
         bridge = {bridge}\n\
         subnet = \"172.{net}.{subnet}.0/24\"\n\
         nft_table = {table}\n\
         veth_prefix = {veth}\n\
         netns_prefix = {netns}\n\
         access_port_first = {first_port}\n\
         access_port_last = {last_port}\n\
         \n\
         {obs}",
        cp = q(&api_url(opts)),
        token = q(&secrets.node_token),
        listen = q(&host.listen.to_string()),
        cgroup = q(&host.cgroup_parent),
        bridge = q(&bridge),
        table = q(&table),
        veth = q(&veth),
        netns = q(&netns),
        net = 32 - i,
        state = q(&dir.to_string_lossy()),
        model = q(crate::catalog::DEV_SERVER_MODEL),
        cap = opts.phones,
        obs = object_store_section(opts, secrets),
        subnet = 100 + n,
        last_port = first_port + ACCESS_PORTS - 1,
    )
}

/// Runs the platform until Ctrl-C or SIGTERM.
pub fn up(opts: &UpOptions) -> Result<(), UpError> {
    block_stop_signals();
    let data = &opts.data_dir;
    std::fs::create_dir_all(data).map_err(io("create", data))?;
    let image =
        std::fs::canonicalize(&opts.image).map_err(|_| UpError::NoImage(opts.image.clone()))?;
    let cph = std::env::current_exe().map_err(io("locate", Path::new("cph")))?;
    let agent_bin = sibling("cph-agent")?;
    sibling("cph-shim")?;
    let logs = data.join("logs");
    std::fs::create_dir_all(&logs).map_err(io("create", &logs))?;
    let secrets = load_or_create_secrets(&data.join("secrets.json"))?;
    let instance = claim_instance(data)?;
    tracing::debug!(instance = instance.number, "instance claimed");

    let obs_root = data.join("objects");
    std::fs::create_dir_all(&obs_root).map_err(io("create", &obs_root))?;
    let mut obs = Command::new(&agent_bin);
    obs.arg("object-store")
        .arg("--root")
        .arg(&obs_root)
        .arg("--listen")
        .arg(opts.obs_listen.to_string())
        .arg("--ak")
        .arg(&secrets.obs_ak)
        .arg("--sk")
        .arg(&secrets.obs_sk);
    let obs = Service::spawn(
        "object store",
        obs,
        logs.join("object-store.log"),
        opts.obs_listen,
    )?;

    let control = data.join("control");
    std::fs::create_dir_all(&control).map_err(io("create", &control))?;
    let image_url = format!("file://{}", image.display());
    write_private(&control.join("node-token"), secrets.node_token.as_bytes())?;
    let tls = if opts.tls {
        Some(self_signed(&data.join("tls"), opts.listen)?)
    } else {
        None
    };
    let creds = bootstrap(
        &control,
        opts,
        &secrets,
        tls.as_ref().map(|t| t.cert.clone()),
    )?;
    let control_store = control.join("object-store.toml");
    write_private(
        &control_store,
        object_store_section(opts, &secrets).as_bytes(),
    )?;
    let mut cp = Command::new(&cph);
    cp.arg("serve")
        .arg("--object-store")
        .arg(&control_store)
        .arg("--data-dir")
        .arg(&control)
        .arg("--listen")
        .arg(opts.listen.to_string())
        .arg("--test-image-url")
        .arg(&image_url);
    if let Some(t) = &tls {
        // The agent is served with the same certificate.
        cp.arg("--tls-cert")
            .arg(&t.cert)
            .arg("--tls-key")
            .arg(&t.key)
            .arg("--agent-ca")
            .arg(&t.cert);
    }
    let cp = Service::spawn(
        "control plane",
        cp,
        logs.join("control-plane.log"),
        opts.listen,
    )?;

    let mut agents = Vec::new();
    for i in 1..=opts.hosts.clamp(1, MAX_HOSTS) {
        let host = LocalHost::new(data, opts.agent_listen, i);
        std::fs::create_dir_all(&host.dir).map_err(io("create", &host.dir))?;
        keeps_its_volumes(&host.config, &host.dir, opts.user_namespaces)?;
        write_private(&host.config, agent_config(opts, &secrets, &host).as_bytes())?;
        let mut agent = Command::new(&agent_bin);
        agent.arg("--config").arg(&host.config).arg("run");
        let name = if i == 1 { "agent" } else { "another agent" };
        agents.push(Service::spawn(name, agent, host.log.clone(), host.listen)?);
    }
    println!(
        "cph is up.\n  CPH API      {}\n  project id   {}\n  AK / SK      {} / {}\n  object store {} (AK {})\n  credentials  {}\n  logs         {}\n\
         Buy the local server with the development flavor, e.g. with the official SDK; list servers with\n  cph servers --credentials {}/credentials.json\n\
         Ctrl-C stops the services; phones' data stays in {}.",
        creds.endpoint,
        creds.project_id,
        creds.ak,
        creds.sk,
        creds.obs_endpoint,
        creds.obs_ak,
        data.join("credentials.json").display(),
        logs.display(),
        data.display(),
        data.display(),
    );
    // Agents first (they finish or checkpoint their jobs), the store last.
    let mut services = agents;
    services.extend([cp, obs]);
    let result = wait_for_signal_or_exit(&mut services);
    for svc in &mut services {
        svc.stop(Duration::from_secs(30));
    }
    result
}

fn stop_signal_set() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set
}

/// Blocks SIGINT and SIGTERM from the start of `cph up` (the services it
/// starts unblock them before they run), so one that
/// arrives while the services start is taken by [`stop_signal`] and the
/// services started so far are stopped, rather than `cph up` dying with
/// them left running (in their own process groups, a terminal's Ctrl-C
/// reaches `cph up` alone).
fn block_stop_signals() {
    if stop_signal_set().thread_block().is_err() {
        tracing::warn!("cannot block signals; stopping on service exit only");
    }
}

/// A pending SIGINT or SIGTERM, waited for up to `wait`.
fn stop_signal(wait: Duration) -> Option<i32> {
    let set = stop_signal_set();
    let ts = nix::sys::time::TimeSpec::from_duration(wait);
    // SAFETY: sigtimedwait only reads the set and writes no info (null).
    let r = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), ts.as_ref()) };
    (r > 0).then_some(r)
}

/// Creates (once) the default project, its AK/SK and a keypair named
/// `default`, and writes `credentials.json`.
fn bootstrap(
    control: &Path,
    opts: &UpOptions,
    secrets: &Secrets,
    ca_cert: Option<PathBuf>,
) -> Result<Credentials, UpError> {
    let path = opts.data_dir.join("credentials.json");
    let endpoint = api_url(opts);
    let obs_endpoint = local_url(opts.obs_listen);
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(mut c) = serde_json::from_str::<Credentials>(&text) {
            c.endpoint = endpoint;
            c.obs_endpoint = obs_endpoint;
            c.ca_cert = ca_cert;
            write_private(&path, &serde_json::to_vec_pretty(&c).unwrap_or_default())?;
            return Ok(c);
        }
    }
    let fail = |what: &'static str| {
        move |e: crate::store::StoreError| UpError::Bootstrap {
            what,
            reason: e.to_string(),
        }
    };
    let project =
        crate::admin::project_create(control, "default").map_err(fail("create project"))?;
    let (project_id, ak, sk) =
        crate::admin::credential_create(control, &project).map_err(fail("create credential"))?;
    crate::admin::keypair_create(control, &project_id, "default", DEV_PUBLIC_KEY)
        .map_err(fail("create keypair"))?;
    let creds = Credentials {
        endpoint,
        project_id,
        ak,
        sk,
        obs_endpoint,
        obs_ak: secrets.obs_ak.clone(),
        obs_sk: secrets.obs_sk.clone(),
        ca_cert,
    };
    write_private(
        &path,
        &serde_json::to_vec_pretty(&creds).unwrap_or_default(),
    )?;
    Ok(creds)
}

/// The data dir's self-signed certificate of the CPH API (`cert.pem`,
/// `key.pem` in `dir`), made the first time, for `localhost`, 127.0.0.1,
/// ::1 and the address listened on.
fn self_signed(dir: &Path, listen: SocketAddr) -> Result<crate::serve::TlsFiles, UpError> {
    let files = crate::serve::TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    if files.cert.is_file() && files.key.is_file() {
        return Ok(files);
    }
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
        names.push(listen.ip().to_string());
    }
    let made = rcgen::generate_simple_self_signed(names).map_err(|e| UpError::Bootstrap {
        what: "make the API's certificate",
        reason: e.to_string(),
    })?;
    write_private(&files.key, made.key_pair.serialize_pem().as_bytes())?;
    write_private(&files.cert, made.cert.pem().as_bytes())?;
    Ok(files)
}

/// Public key of the default keypair (replace it with `cph admin` for real use).
const DEV_PUBLIC_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAcphdevelopmentkeypairnotforproduction000 cph-up";

/// Waits for SIGINT/SIGTERM; a service that dies meanwhile is restarted
/// (phones keep running through an agent restart), and one that keeps
/// dying stops the platform with an error.
fn wait_for_signal_or_exit(services: &mut [Service]) -> Result<(), UpError> {
    loop {
        // Poll for a pending signal once per 200 ms.
        if let Some(sig) = stop_signal(Duration::from_millis(200)) {
            tracing::info!(signal = sig, "stopping");
            return Ok(());
        }
        for svc in services.iter_mut() {
            if let Some(status) = svc.exited() {
                tracing::warn!(service = svc.name, %status, log = %svc.log.display(), "service exited; restarting it");
                match svc.restart(status) {
                    // A Ctrl-C while it restarted: the platform stops.
                    Err(UpError::Interrupted(sig)) => {
                        tracing::info!(signal = sig, "stopping");
                        return Ok(());
                    }
                    r => r?,
                }
                tracing::info!(service = svc.name, "service restarted");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service starts with SIGINT and SIGTERM unblocked though `cph up`
    /// blocks them (or it could not be stopped but by SIGKILL).
    #[test]
    fn services_start_with_stop_signals_unblocked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        block_stop_signals();
        // grep itself (a shell would clear its mask at start).
        let args = ["SigBlk".into(), "/proc/self/status".into()];
        let mut child = start_child("grep".as_ref(), &args, &log).expect("start");
        child.wait().expect("wait");
        let text = std::fs::read_to_string(&log).expect("log");
        let mask = u64::from_str_radix(text.split_whitespace().nth(1).expect("mask"), 16)
            .expect("hex mask");
        for sig in [libc::SIGINT, libc::SIGTERM] {
            assert_eq!(mask & (1 << (sig - 1)), 0, "signal {sig} blocked: {text}");
        }
    }

    fn options(user_namespaces: bool) -> UpOptions {
        UpOptions {
            data_dir: PathBuf::from("/var/lib/cph"),
            image: PathBuf::from("image.tar.gz"),
            listen: "127.0.0.1:8443".parse().expect("addr"),
            agent_listen: "127.0.0.1:8600".parse().expect("addr"),
            obs_listen: "127.0.0.1:9000".parse().expect("addr"),
            phones: 2,
            user_namespaces,
            pool_size_gb: None,
            tls: false,
            hosts: 1,
        }
    }

    fn host(opts: &UpOptions, i: u32) -> LocalHost {
        LocalHost::new(&opts.data_dir, opts.agent_listen, i)
    }

    fn secrets() -> Secrets {
        Secrets {
            node_token: "t".into(),
            obs_ak: "ak".into(),
            obs_sk: "sk".into(),
        }
    }

    #[test]
    fn agent_config_is_valid_with_overlay_storage_and_its_own_network() {
        let (opts, secrets) = (options(false), secrets());
        let text = agent_config(&opts, &secrets, &host(&opts, 1));
        let cfg: cph_agent::config::AgentConfig = toml::from_str(&text).expect("valid config");
        assert_eq!(
            cfg.storage.backend,
            cph_agent::config::StorageBackend::Overlay
        );
        assert_eq!(
            cfg.storage.pool,
            Some(PathBuf::from("/var/lib/cph/agent/pool"))
        );
        assert!(cfg.network.enabled);
        assert_ne!(
            cfg.network.bridge,
            cph_agent::config::NetworkConfig::default().bridge
        );
        assert!(cfg.object_store.is_some());

        // Another data directory: other names, subnet and ports.
        let other = UpOptions {
            data_dir: PathBuf::from("/srv/cph-second"),
            ..opts
        };
        let text2 = agent_config(&other, &secrets, &host(&other, 1));
        let cfg2: cph_agent::config::AgentConfig = toml::from_str(&text2).expect("valid config");
        assert_ne!(
            instance_number(&other.data_dir),
            instance_number(Path::new("/var/lib/cph"))
        );
        assert_ne!(cfg.network.bridge, cfg2.network.bridge);
        assert_ne!(cfg.network.nft_table, cfg2.network.nft_table);
        assert_ne!(cfg.network.subnet, cfg2.network.subnet);
        assert!(cfg2.network.bridge.len() <= 15);
        assert_eq!(cfg.control_plane_url, "http://127.0.0.1:8443");
        assert_eq!(cfg.control_plane_ca, None);

        // With --tls the agent speaks HTTPS and trusts the data dir's certificate.
        let tls = UpOptions { tls: true, ..other };
        let text3 = agent_config(&tls, &secrets, &host(&tls, 1));
        let cfg3: cph_agent::config::AgentConfig = toml::from_str(&text3).expect("valid config");
        assert_eq!(cfg3.control_plane_url, "https://127.0.0.1:8443");
        let cert = PathBuf::from("/srv/cph-second/tls/cert.pem");
        assert_eq!(cfg3.control_plane_ca.as_ref(), Some(&cert));
        assert_eq!(cfg3.tls_cert, Some(cert));
        assert_eq!(
            cfg3.tls_key,
            Some(PathBuf::from("/srv/cph-second/tls/key.pem"))
        );
    }

    #[test]
    fn platforms_started_at_once_take_numbers_that_share_nothing() {
        let links = tempfile::tempdir().expect("tempdir");
        let (a, b, c) = (
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        );
        // Three data dirs whose paths hash to the same number (other
        // tests may hold slots meanwhile: only distinctness is asserted).
        let first = 37;
        let ca = claim_instance_from(a.path(), first, links.path()).expect("claim a");
        let cb = claim_instance_from(b.path(), first, links.path()).expect("claim b");
        assert_ne!(ca.number % PORT_SLOTS, cb.number % PORT_SLOTS);
        assert_eq!(instance_number(a.path()), ca.number);
        assert_eq!(instance_number(b.path()), cb.number);
        // A bridge of that number left on the host by a stopped platform
        // is passed over too.
        let n = ca.number;
        drop(ca);
        std::fs::create_dir(links.path().join(bridge_name(n))).expect("link");
        let cc = claim_instance_from(c.path(), n, links.path()).expect("claim c");
        assert_ne!(cc.number, n);
        // The first data dir keeps its number across restarts.
        let again = claim_instance_from(a.path(), first + 1, links.path()).expect("claim a again");
        assert_eq!(again.number, n);
        // A data dir with phones whose port slot another platform holds
        // is refused, with the reason.
        let held = hold_slot(cb.number + PORT_SLOTS).expect("bind");
        assert!(held.is_none(), "slot of b is held");
        std::fs::create_dir_all(b.path().join("agent/phones")).expect("mkdir");
        std::fs::write(b.path().join("agent/phones/p.json"), "{}").expect("write");
        let other = b.path().join("copy");
        std::fs::create_dir_all(other.join("agent/phones")).expect("mkdir");
        std::fs::write(other.join("agent/phones/p.json"), "{}").expect("write");
        std::fs::write(instance_file(&other), format!("{}\n", cb.number)).expect("write");
        let err = claim_instance_from(&other, first, links.path()).expect_err("slot held");
        assert!(err.to_string().contains("stop it first"), "{err}");
    }

    #[test]
    fn a_data_dir_with_phones_keeps_its_volumes_backend() {
        let dir = tempfile::tempdir().expect("tempdir");
        let toml_path = dir.path().join("agent.toml");
        let agent = dir.path().join("agent");
        // A first start: anything goes.
        assert!(keeps_its_volumes(&toml_path, &agent, true).is_ok());
        std::fs::write(&toml_path, "[user_namespaces]\nenabled = true\n").expect("write");
        // No phones yet: switching is harmless.
        assert!(keeps_its_volumes(&toml_path, &agent, false).is_ok());
        std::fs::create_dir_all(agent.join("phones")).expect("mkdir");
        std::fs::write(agent.join("phones/cph-p1.json"), "{}").expect("write");
        let err = keeps_its_volumes(&toml_path, &agent, false).expect_err("switch refused");
        assert!(err.to_string().contains("add --user-namespaces"), "{err}");
        assert!(keeps_its_volumes(&toml_path, &agent, true).is_ok());
    }

    #[test]
    fn agent_config_with_user_namespaces_puts_phones_on_btrfs() {
        let (opts, secrets) = (options(true), secrets());
        let text = agent_config(&opts, &secrets, &host(&opts, 1));
        let cfg: cph_agent::config::AgentConfig = toml::from_str(&text).expect("valid config");
        assert_eq!(
            cfg.storage.backend,
            cph_agent::config::StorageBackend::Btrfs
        );
        // The pool file and its mount point are the agent's defaults in its state dir.
        assert_eq!(cfg.storage.pool, None);
        assert_eq!(cfg.storage.pool_size_gb, 32);
        assert!(cfg.user_namespaces.enabled);
        assert!(cfg.network.enabled);
        let small = UpOptions {
            pool_size_gb: Some(1),
            ..opts
        };
        let text = agent_config(&small, &secrets, &host(&small, 1));
        let cfg: cph_agent::config::AgentConfig = toml::from_str(&text).expect("valid config");
        assert_eq!(cfg.storage.pool_size_gb, 1);
    }

    #[test]
    fn local_hosts_share_nothing_the_kernel_or_the_fleet_names() {
        let (opts, secrets) = (options(false), secrets());
        let cfgs: Vec<(LocalHost, cph_agent::config::AgentConfig)> = (1..=MAX_HOSTS)
            .map(|i| {
                let h = host(&opts, i);
                let text = agent_config(&opts, &secrets, &h);
                (h, toml::from_str(&text).expect("valid config"))
            })
            .collect();
        // Host 1 is a single host's agent, as before hosts were counted.
        let (h1, c1) = &cfgs[0];
        assert_eq!(h1.dir, PathBuf::from("/var/lib/cph/agent"));
        assert_eq!(c1.node_id, None);
        assert_eq!(c1.cgroup_parent, "cph");
        assert_eq!(c1.listen, "127.0.0.1:8600");
        for (i, (a, ca)) in cfgs.iter().enumerate() {
            assert!(ca.network.bridge.len() <= 15, "{}", ca.network.bridge);
            assert!(ca.network.access_port_last > ca.network.access_port_first);
            for (b, cb) in &cfgs[i + 1..] {
                assert_ne!(a.dir, b.dir);
                assert_ne!(ca.listen, cb.listen);
                assert_ne!(ca.node_id, cb.node_id);
                assert_ne!(ca.cgroup_parent, cb.cgroup_parent);
                assert_ne!(ca.network.bridge, cb.network.bridge);
                assert_ne!(ca.network.subnet, cb.network.subnet);
                assert_ne!(ca.network.nft_table, cb.network.nft_table);
                assert_ne!(ca.network.veth_prefix, cb.network.veth_prefix);
                assert_ne!(ca.network.netns_prefix, cb.network.netns_prefix);
                assert!(
                    ca.network.access_port_last < cb.network.access_port_first,
                    "access ports overlap"
                );
            }
        }
    }
}
