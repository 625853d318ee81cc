//! A private topology for tests and benches: a "host" namespace holding the
//! bridge and nftables table, a public and a private client namespace wired
//! to it, and phone namespaces. Everything lives in namespaces this module
//! creates (unique names), so nothing on the real host is touched; dropping
//! the [`Testbed`] deletes them all, which removes every link, rule and class
//! inside.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::cmd::{Invocation, Runner, SystemRunner};
use super::{Ipv4Net, NetConfig, NetError};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Server address facing the public client.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 100, 1);
/// The public (outside) client.
pub const PUBLIC_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 100, 2);
/// The host's address towards the private client.
pub const PRIVATE_GW_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 101, 1);
/// A client on the server's private network.
pub const PRIVATE_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 210, 101, 2);

/// Namespaces of one test, deleted on drop.
pub struct Testbed {
    pub tag: String,
    pub host: String,
    pub public: String,
    pub private: String,
    phones: Vec<String>,
    pub dir: PathBuf,
}

fn run(args: &[&str]) -> Result<String, NetError> {
    SystemRunner.run(&Invocation {
        program: "ip",
        args: args.iter().map(|a| a.to_string()).collect(),
        stdin: None,
        netns: None,
    })
}

/// Path of a named namespace.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/{name}"))
}

impl Testbed {
    /// Creates host, public and private client namespaces and their links;
    /// `dir` holds the state file.
    pub fn new(label: &str, dir: &Path) -> Result<Self, NetError> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{label}{}x{n}", std::process::id());
        let mut tb = Self {
            host: format!("cphtb-{tag}-h"),
            public: format!("cphtb-{tag}-pub"),
            private: format!("cphtb-{tag}-prv"),
            tag,
            phones: Vec::new(),
            dir: dir.to_path_buf(),
        };
        for ns in [&tb.host, &tb.public, &tb.private] {
            run(&["netns", "add", ns])?;
        }
        let (h, p, v) = (tb.host.clone(), tb.public.clone(), tb.private.clone());
        run(&[
            "-n", &h, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", &p,
        ])?;
        run(&[
            "-n", &h, "link", "add", "up1", "type", "veth", "peer", "name", "eth0", "netns", &v,
        ])?;
        for (ns, dev, addr) in [
            (&h, "up0", format!("{SERVER_IP}/24")),
            (&h, "up1", format!("{PRIVATE_GW_IP}/24")),
            (&p, "eth0", format!("{PUBLIC_CLIENT_IP}/24")),
            (&v, "eth0", format!("{PRIVATE_CLIENT_IP}/24")),
        ] {
            run(&["-n", ns, "addr", "add", &addr, "dev", dev])?;
            run(&["-n", ns, "link", "set", dev, "up"])?;
            run(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        run(&[
            "-n",
            &p,
            "route",
            "add",
            "default",
            "via",
            &SERVER_IP.to_string(),
        ])?;
        run(&[
            "-n",
            &v,
            "route",
            "add",
            "default",
            "via",
            &PRIVATE_GW_IP.to_string(),
        ])?;
        tb.phones.clear();
        Ok(tb)
    }

    /// A network config confined to this testbed.
    pub fn config(&self, first: u16, last: u16) -> NetConfig {
        let n = COUNTER.load(Ordering::Relaxed) % 100;
        NetConfig {
            table: format!("cphtest{n}"),
            bridge: format!("cphbr{n}"),
            veth_prefix: format!("tv{n}p"),
            subnet: Ipv4Net {
                addr: Ipv4Addr::new(10, 210, 0, 0),
                prefix: 24,
            },
            server_ip: SERVER_IP,
            public_ip: Some(Ipv4Addr::new(203, 0, 113, 10)),
            private_prefixes: vec![Ipv4Net {
                addr: Ipv4Addr::new(10, 210, 101, 0),
                prefix: 24,
            }],
            access_port_first: first,
            access_port_last: last,
            max_ports_per_phone: 200,
            state_path: self.dir.join("net-state.json"),
            host_netns: Some(netns_path(&self.host)),
        }
    }

    /// A new empty phone namespace.
    pub fn phone_netns(&mut self) -> Result<PathBuf, NetError> {
        let name = format!("cphtb-{}-ph{}", self.tag, self.phones.len());
        run(&["netns", "add", &name])?;
        self.phones.push(name.clone());
        Ok(netns_path(&name))
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for ns in self
            .phones
            .iter()
            .chain([&self.host, &self.public, &self.private])
        {
            let _ = run(&["netns", "del", ns]);
        }
    }
}

/// Runs `f` on a new thread that has entered the namespace at `path`; the
/// caller's thread is untouched. Sockets made in `f` belong to that
/// namespace for their whole life.
pub fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<Result<T, NetError>> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).map_err(|e| NetError::Netns {
            path: path.clone(),
            source: e,
        })?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
            NetError::Netns {
                path: path.clone(),
                source: std::io::Error::from(e),
            }
        })?;
        Ok(f())
    })
}

/// Starts an echo server on `port` inside the namespace: every connection
/// gets its bytes back until it closes. Runs until the namespace goes.
pub fn spawn_echo(netns: &Path, port: u16) -> Result<(), NetError> {
    let (tx, rx) = std::sync::mpsc::channel();
    in_netns(netns, move || {
        let l = match TcpListener::bind(("0.0.0.0", port)) {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 65536];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .map_err(|_| NetError::invalid("listener", "echo listener did not start"))?
        .map_err(|e| NetError::Spawn {
            command: format!("bind echo listener on {port}"),
            source: e,
        })
}

/// Starts a sink on `port` inside the namespace: reads and discards,
/// reporting (bytes, seconds) samples of each connection over `tx`.
pub fn spawn_sink(
    netns: &Path,
    port: u16,
    tx: std::sync::mpsc::Sender<Vec<(u64, f64)>>,
) -> Result<(), NetError> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    in_netns(netns, move || {
        let l = match TcpListener::bind(("0.0.0.0", port)) {
            Ok(l) => {
                let _ = ready_tx.send(true);
                l
            }
            Err(_) => {
                let _ = ready_tx.send(false);
                return;
            }
        };
        for s in l.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; 1 << 16];
                let start = std::time::Instant::now();
                let mut total = 0u64;
                let mut samples = Vec::new();
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                    samples.push((total, start.elapsed().as_secs_f64()));
                }
                let _ = tx.send(samples);
            });
        }
    });
    match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(true) => Ok(()),
        _ => Err(NetError::invalid("listener", "sink listener did not start")),
    }
}

/// Connects from inside a namespace, sends `msg` and returns the echo.
pub fn echo_from(netns: &Path, to: SocketAddr, msg: &'static [u8]) -> Result<Vec<u8>, String> {
    in_netns(netns, move || {
        let mut s =
            TcpStream::connect_timeout(&to, Duration::from_secs(3)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        s.write_all(msg).map_err(|e| e.to_string())?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).map_err(|e| e.to_string())?;
        Ok(got)
    })
    .join()
    .map_err(|_| "client thread panicked".to_string())?
    .map_err(|e| e.to_string())?
}

/// Sends as fast as possible for `secs` from inside a namespace, then
/// resets the connection: what its send buffer still holds (seconds of data
/// at a slow limit) is dropped rather than sent after it, where it would
/// share the next measurement's class.
pub fn blast_from(netns: &Path, to: SocketAddr, secs: f64) -> Result<u64, String> {
    in_netns(netns, move || {
        let mut s =
            TcpStream::connect_timeout(&to, Duration::from_secs(3)).map_err(|e| e.to_string())?;
        let buf = vec![0x5au8; 1 << 16];
        let start = std::time::Instant::now();
        let mut sent = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            s.write_all(&buf).map_err(|e| e.to_string())?;
            sent += buf.len() as u64;
        }
        let abort = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &abort)
            .map_err(|e| e.to_string())?;
        Ok(sent)
    })
    .join()
    .map_err(|_| "sender thread panicked".to_string())?
    .map_err(|e| e.to_string())?
}

/// Goodput in bit/s of a sink's samples between `from` and `to` seconds:
/// the least-squares slope of bytes over time, so one late read (data
/// waiting in the socket buffer) does not skew it.
pub fn goodput_bps(samples: &[(u64, f64)], from: f64, to: f64) -> Option<f64> {
    let pts: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.1 >= from && s.1 <= to)
        .map(|s| (s.1, s.0 as f64))
        .collect();
    if pts.len() < 10 {
        return None;
    }
    let n = pts.len() as f64;
    let mt = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let mb = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = pts.iter().map(|p| (p.0 - mt) * (p.1 - mb)).sum();
    let var: f64 = pts.iter().map(|p| (p.0 - mt) * (p.0 - mt)).sum();
    (var > 0.0).then(|| cov / var * 8.0)
}
