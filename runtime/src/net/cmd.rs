//! Outside commands as data. Every kernel change of this module that does
//! not go over netlink ([`super::nfnl`]: map elements, conntrack) is one of
//! the typed commands below (`ip`, `tc`, `nft`, `conntrack`, `ss`,
//! `sysctl`), rendered to an argv plus optional stdin, and executed by one
//! [`Runner`].
//! Batches (`ip -batch -`, `tc -batch -`, `nft -f -`) keep a change to one
//! process and, for nft, one atomic transaction.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::NetError;

/// One rendered outside command: program, arguments, optional stdin text and
/// the network namespace (a path such as `/proc/<pid>/ns/net` or
/// `/run/netns/<name>`) it must run in; `None` is the caller's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub program: &'static str,
    pub args: Vec<String>,
    pub stdin: Option<String>,
    pub netns: Option<PathBuf>,
}

impl Invocation {
    fn new(program: &'static str, args: &[&str]) -> Self {
        Self {
            program,
            args: args.iter().map(|a| a.to_string()).collect(),
            stdin: None,
            netns: None,
        }
    }

    fn with_stdin(mut self, text: String) -> Self {
        self.stdin = Some(text);
        self
    }

    /// Runs the command inside the given network namespace.
    pub fn in_netns(mut self, netns: Option<&Path>) -> Self {
        self.netns = netns.map(Path::to_path_buf);
        self
    }

    /// The command line as text, for logs and errors.
    pub fn display(&self) -> String {
        let mut s = self.program.to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }
}

/// `ip -batch -` with one `ip` command per line (`link add ...`).
pub fn ip_batch(lines: &[String]) -> Invocation {
    Invocation::new("ip", &["-batch", "-"]).with_stdin(join_lines(lines))
}

/// `tc -batch -` with one `tc` command per line (`class change ...`).
pub fn tc_batch(lines: &[String]) -> Invocation {
    Invocation::new("tc", &["-batch", "-"]).with_stdin(join_lines(lines))
}

/// `nft -f -`: the whole text is one atomic transaction.
pub fn nft_batch(text: String) -> Invocation {
    Invocation::new("nft", &["-f", "-"]).with_stdin(text)
}

/// `nft list tables`.
pub fn nft_list_tables() -> Invocation {
    Invocation::new("nft", &["list", "tables"])
}

/// `ip -o link show`: one line per link.
pub fn ip_links() -> Invocation {
    Invocation::new("ip", &["-o", "link", "show"])
}

/// `tc class show dev <dev>`.
pub fn tc_class_show(dev: &str) -> Invocation {
    Invocation::new("tc", &["class", "show", "dev", dev])
}

/// `tc filter show dev <dev> parent 1:`: the upload filters.
pub fn tc_filter_show(dev: &str) -> Invocation {
    Invocation::new("tc", &["filter", "show", "dev", dev, "parent", "1:"])
}

/// `tc -s class show dev <dev> classid 1:<minor>`: one class with its
/// counters.
pub fn tc_class_stats(dev: &str, minor: u32) -> Invocation {
    Invocation::new(
        "tc",
        &[
            "-s",
            "class",
            "show",
            "dev",
            dev,
            "classid",
            &format!("1:{minor:x}"),
        ],
    )
}

/// `tc qdisc show dev <dev>`.
pub fn tc_qdisc_show(dev: &str) -> Invocation {
    Invocation::new("tc", &["qdisc", "show", "dev", dev])
}

/// Local ports from `ss -H -l -n -t -u` (`tcp LISTEN 0 128 0.0.0.0:22 ...`).
/// The manager reads the same sockets over sock_diag
/// ([`super::nfnl::DiagSocket`]); this stays for checks against `ss`.
pub fn parse_listening_ports(out: &str) -> std::collections::BTreeSet<u16> {
    out.lines()
        .filter_map(|l| {
            let local = l.split_whitespace().nth(4)?;
            local.rsplit(':').next()?.parse().ok()
        })
        .collect()
}

/// `sysctl -q -w key=value`.
pub fn sysctl(key: &str, value: &str) -> Invocation {
    Invocation::new("sysctl", &["-q", "-w", &format!("{key}={value}")])
}

/// Which conntrack entries to drop: those whose reply comes from the phone
/// address, optionally only from one of its listen ports (TCP and UDP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConntrackDelete {
    pub phone_ip: std::net::Ipv4Addr,
    pub listen_port: Option<(&'static str, u16)>,
}

impl ConntrackDelete {
    pub fn render(&self) -> Invocation {
        let mut args = vec!["-D".to_string()];
        if let Some((proto, port)) = self.listen_port {
            args.extend(["-p".into(), proto.into()]);
            args.extend(["--reply-src".into(), self.phone_ip.to_string()]);
            args.extend(["--reply-port-src".into(), port.to_string()]);
        } else {
            args.extend(["--reply-src".into(), self.phone_ip.to_string()]);
        }
        Invocation {
            program: "conntrack",
            args,
            stdin: None,
            netns: None,
        }
    }
}

/// `conntrack -L --reply-src <ip>`: the connections answered by a phone.
pub fn conntrack_list_reply_src(phone_ip: std::net::Ipv4Addr) -> Invocation {
    Invocation::new("conntrack", &["-L", "--reply-src", &phone_ip.to_string()])
}

/// The (protocol, phone-side port) pairs of `conntrack -L` lines: the
/// protocol is the first word, the phone's port the reply tuple's `sport`
/// (the second `sport=`).
pub fn parse_conntrack_reply_ports(out: &str) -> std::collections::BTreeSet<(String, u16)> {
    out.lines()
        .filter_map(|l| {
            let proto = l.split_whitespace().next()?.to_string();
            let port = l
                .split_whitespace()
                .filter_map(|w| w.strip_prefix("sport="))
                .nth(1)?
                .parse()
                .ok()?;
            Some((proto, port))
        })
        .collect()
}

fn join_lines(lines: &[String]) -> String {
    let mut s = String::new();
    for l in lines {
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// Executes invocations. The only implementation used for real is
/// [`SystemRunner`]; the seam exists so plans can be rendered and checked
/// without running anything.
pub trait Runner: Send + Sync {
    /// Runs the command and returns its stdout; a non-zero exit is an error
    /// carrying stderr.
    fn run(&self, inv: &Invocation) -> Result<String, NetError>;
}

/// Runs commands as child processes, entering the invocation's network
/// namespace in the child before exec.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemRunner;

impl Runner for SystemRunner {
    fn run(&self, inv: &Invocation) -> Result<String, NetError> {
        let mut cmd = Command::new(inv.program);
        cmd.args(&inv.args)
            .stdin(if inv.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let ns_file = match &inv.netns {
            Some(path) => Some(std::fs::File::open(path).map_err(|e| NetError::Netns {
                path: path.clone(),
                source: e,
            })?),
            None => None,
        };
        if let Some(f) = &ns_file {
            let fd = f.as_raw_fd();
            // SAFETY: the closure runs in the forked child before exec and
            // only issues the async-signal-safe setns(2) syscall on a file
            // descriptor that the parent keeps open until spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(|e| NetError::Spawn {
            command: inv.display(),
            source: e,
        })?;
        drop(ns_file);
        if let (Some(text), Some(mut stdin)) = (&inv.stdin, child.stdin.take()) {
            stdin
                .write_all(text.as_bytes())
                .map_err(|e| NetError::Spawn {
                    command: inv.display(),
                    source: e,
                })?;
        }
        let out = child.wait_with_output().map_err(|e| NetError::Spawn {
            command: inv.display(),
            source: e,
        })?;
        if !out.status.success() {
            return Err(NetError::Command {
                command: inv.display(),
                status: out.status.code().unwrap_or(-1),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_render_one_process_with_stdin() {
        let inv = ip_batch(&["link add a type bridge".into(), "link set a up".into()]);
        assert_eq!(inv.display(), "ip -batch -");
        assert_eq!(
            inv.stdin.as_deref(),
            Some("link add a type bridge\nlink set a up\n")
        );
        let inv = nft_batch("add table ip t\n".into()).in_netns(Some(Path::new("/run/netns/x")));
        assert_eq!(inv.display(), "nft -f -");
        assert_eq!(inv.netns.as_deref(), Some(Path::new("/run/netns/x")));
    }

    #[test]
    fn conntrack_listing_yields_reply_ports() {
        let out = "tcp      6 431999 ESTABLISHED src=10.210.101.2 dst=10.210.100.1 sport=40000 dport=12001 src=10.210.0.2 dst=10.210.101.2 sport=20001 dport=40000 [ASSURED] mark=0 use=1\n\
                   udp      17 29 src=10.210.101.2 dst=10.210.100.1 sport=5000 dport=12002 src=10.210.0.2 dst=10.210.101.2 sport=20002 dport=5000 mark=0 use=1\n";
        let got = parse_conntrack_reply_ports(out);
        assert_eq!(
            got,
            [("tcp".to_string(), 20001), ("udp".to_string(), 20002)].into()
        );
        assert_eq!(
            conntrack_list_reply_src(std::net::Ipv4Addr::new(10, 210, 0, 2)).display(),
            "conntrack -L --reply-src 10.210.0.2"
        );
    }

    #[test]
    fn conntrack_delete_renders_reply_side_match() {
        let ip = std::net::Ipv4Addr::new(10, 2, 0, 5);
        let all = ConntrackDelete {
            phone_ip: ip,
            listen_port: None,
        };
        assert_eq!(all.render().display(), "conntrack -D --reply-src 10.2.0.5");
        let one = ConntrackDelete {
            phone_ip: ip,
            listen_port: Some(("tcp", 20000)),
        };
        assert_eq!(
            one.render().display(),
            "conntrack -D -p tcp --reply-src 10.2.0.5 --reply-port-src 20000"
        );
    }
}
