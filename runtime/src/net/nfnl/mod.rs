//! A small client for the netfilter netlink family (NETLINK_NETFILTER),
//! which the kernel offers for nftables and conntrack alike.
//!
//! nftables: a batch (`NFNL_MSG_BATCH_BEGIN`, element messages,
//! `NFNL_MSG_BATCH_END`) is one kernel transaction, applied whole or not at
//! all; it replaces `nft -f -` for a phone's map elements, without a process
//! start or a ruleset parse ([`ElemBatch`]). Conntrack: the entries a phone
//! answers are listed with a kernel-side filter and deleted one by one, as
//! the `conntrack` tool does ([`Flow`]). Every request asks for an
//! acknowledgement, and a refusal becomes a typed error naming what it
//! concerned. The same plumbing serves one sibling family, sock_diag, for
//! the host's listening ports ([`DiagSocket`]), which `ss` would read.

mod conntrack;
mod elements;
mod sockdiag;

pub use conntrack::Flow;
pub use elements::{ElemBatch, Element, Encoded, Kind, MapChange, Op, RawElement, Value};
pub use sockdiag::DiagSocket;

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};
use nix::sys::time::TimeVal;

// linux/netlink.h.
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_HDRLEN: usize = 4;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(3 << 14);
const NLM_F_REQUEST: u16 = libc::NLM_F_REQUEST as u16;
const NLM_F_ACK: u16 = libc::NLM_F_ACK as u16;
const NLM_F_CREATE: u16 = libc::NLM_F_CREATE as u16;
const NLM_F_DUMP: u16 = libc::NLM_F_DUMP as u16;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;

/// How long to wait for the kernel's answer before giving up.
const REPLY_TIMEOUT_SECS: i64 = 5;
const RECV_BUF: usize = 64 * 1024;

/// Errors of the netfilter netlink client; kernel refusals name the table,
/// map and (when the kernel points at it) the element, or the phone address
/// of a conntrack request.
#[derive(Debug, thiserror::Error)]
pub enum NfnlError {
    #[error("cannot open a netlink socket in {}: {source}", netns_name(.netns))]
    Open {
        netns: Option<PathBuf>,
        source: std::io::Error,
    },
    #[error("netlink {what} failed: {errno}")]
    Io { what: &'static str, errno: Errno },
    #[error("cannot {op} element {element} in map {map} of table ip {table}: {errno}{}", detail(.message))]
    Kernel {
        op: &'static str,
        table: String,
        map: String,
        element: String,
        errno: Errno,
        message: Option<String>,
    },
    #[error("nftables batch on table ip {table} rejected: {errno}{}", detail(.message))]
    Batch {
        table: String,
        errno: Errno,
        message: Option<String>,
    },
    #[error("cannot {op} conntrack entries answered by {phone_ip}: {errno}{}", detail(.message))]
    Conntrack {
        op: &'static str,
        phone_ip: Ipv4Addr,
        errno: Errno,
        message: Option<String>,
    },
    #[error("cannot list the host's listening sockets: {errno}{}", detail(.message))]
    SockDiag {
        errno: Errno,
        message: Option<String>,
    },
    #[error("no answer from the kernel to {what}")]
    NoAck { what: String },
    #[error("malformed netlink reply: {0}")]
    Malformed(&'static str),
}

fn netns_name(netns: &Option<PathBuf>) -> String {
    match netns {
        Some(p) => p.display().to_string(),
        None => "the current network namespace".into(),
    }
}

fn detail(message: &Option<String>) -> String {
    message
        .as_deref()
        .map(|m| format!(" ({m})"))
        .unwrap_or_default()
}

impl NfnlError {
    /// The kernel's errno when it refused a request; `None` for socket
    /// trouble (after which the socket should be reopened).
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Kernel { errno, .. }
            | Self::Batch { errno, .. }
            | Self::Conntrack { errno, .. }
            | Self::SockDiag { errno, .. } => Some(*errno),
            Self::Open { .. } | Self::Io { .. } | Self::NoAck { .. } | Self::Malformed(_) => None,
        }
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends netlink messages and attributes to one buffer.
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// A bare `nlmsghdr`; the length is filled in by [`Writer::end_msg`].
    fn begin_raw(&mut self, ty: u16, flags: u16, seq: u32) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        start
    }

    /// An `nlmsghdr` and `nfgenmsg`; `res_id` is written big-endian.
    fn begin_msg(&mut self, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
        let start = self.begin_raw(ty, flags, seq);
        self.buf.push(family);
        self.buf.push(libc::NFNETLINK_V0 as u8);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    fn end_msg(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (NLA_HDRLEN + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    fn attr_str(&mut self, ty: u16, s: &str) {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.attr(ty, &b);
    }

    fn nest_begin(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    fn nest_end(&mut self, start: usize) {
        // Callers bound their nests (elements per message, one tuple) far
        // below u16::MAX.
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// One received netlink message.
struct Msg<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    /// Everything after the `nlmsghdr`.
    payload: &'a [u8],
}

impl Msg<'_> {
    /// The attributes after the `nfgenmsg`.
    fn body(&self) -> &[u8] {
        self.payload.get(NFGENMSG_LEN..).unwrap_or_default()
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn messages(mut b: &[u8]) -> Result<Vec<Msg<'_>>, NfnlError> {
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDRLEN {
        let len = u32_at(b, 0).ok_or(NfnlError::Malformed("netlink message header"))? as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(NfnlError::Malformed("netlink message length"));
        }
        out.push(Msg {
            ty: u16_at(b, 4).ok_or(NfnlError::Malformed("netlink message type"))?,
            flags: u16_at(b, 6).ok_or(NfnlError::Malformed("netlink message flags"))?,
            seq: u32_at(b, 8).ok_or(NfnlError::Malformed("netlink message seq"))?,
            payload: &b[NLMSG_HDRLEN..len],
        });
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

/// `(type without flags, payload)` of each attribute in `b`.
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= NLA_HDRLEN {
        let (Some(len), Some(ty)) = (u16_at(b, 0), u16_at(b, 2)) else {
            break;
        };
        let len = usize::from(len);
        if len < NLA_HDRLEN || len > b.len() {
            break;
        }
        out.push((ty & NLA_TYPE_MASK, &b[NLA_HDRLEN..len]));
        b = &b[align4(len).min(b.len())..];
    }
    out
}

fn attr(b: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(b).into_iter().find(|a| a.0 == ty).map(|a| a.1)
}

/// An `NLMSG_ERROR` message: errno (0 for an ack), the kernel's text and
/// the offset of the offending attribute in the request, if given.
struct Ack {
    errno: i32,
    message: Option<String>,
    offset: Option<usize>,
}

fn parse_ack(m: &Msg<'_>) -> Result<Ack, NfnlError> {
    let bad = || NfnlError::Malformed("netlink error message");
    let err = u32_at(m.payload, 0).ok_or_else(bad)? as i32;
    let orig_len = u32_at(m.payload, 4).ok_or_else(bad)? as usize;
    let echoed = if m.flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        align4(orig_len)
    };
    let mut ack = Ack {
        errno: -err,
        message: None,
        offset: None,
    };
    if m.flags & NLM_F_ACK_TLVS != 0 {
        if let Some(tlvs) = m.payload.get(4 + echoed..) {
            ack.message = attr(tlvs, NLMSGERR_ATTR_MSG).map(|s| {
                String::from_utf8_lossy(s)
                    .trim_end_matches('\0')
                    .to_string()
            });
            ack.offset = attr(tlvs, NLMSGERR_ATTR_OFFS)
                .and_then(|o| u32_at(o, 0))
                .map(|o| o as usize);
        }
    }
    Ok(ack)
}

/// A NETLINK_NETFILTER socket bound to the network namespace it was opened
/// in, for the whole of its life.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

fn new_fd(protocol: SockProtocol) -> std::io::Result<OwnedFd> {
    let fd = socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        protocol,
    )?;
    // Errors point at the bad attribute and do not echo the request.
    for opt in [libc::NETLINK_EXT_ACK, libc::NETLINK_CAP_ACK] {
        let on: libc::c_int = 1;
        // SAFETY: `fd` is an open socket owned by this function; the option
        // value points at a live c_int whose size is passed along.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                opt,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    socket::setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &TimeVal::new(REPLY_TIMEOUT_SECS, 0),
    )?;
    socket::bind(fd.as_raw_fd(), &socket::NetlinkAddr::new(0, 0))?;
    Ok(fd)
}

impl Socket {
    /// Opens a socket in the namespace at `netns` (a path such as
    /// `/run/netns/x`), or in the caller's when `None`. A short-lived thread
    /// enters the namespace, so the caller's threads are untouched.
    pub fn open(netns: Option<&Path>) -> Result<Self, NfnlError> {
        Self::open_protocol(netns, SockProtocol::NetlinkNetFilter)
    }

    /// A socket of another netlink family (sock_diag), for the sibling
    /// clients that share this plumbing.
    fn open_protocol(netns: Option<&Path>, protocol: SockProtocol) -> Result<Self, NfnlError> {
        let open_err = |source| NfnlError::Open {
            netns: netns.map(Path::to_path_buf),
            source,
        };
        let fd = match netns {
            None => new_fd(protocol).map_err(open_err)?,
            Some(path) => {
                let ns = std::fs::File::open(path).map_err(open_err)?;
                std::thread::scope(|s| {
                    s.spawn(|| {
                        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                            .map_err(std::io::Error::from)?;
                        new_fd(protocol)
                    })
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
                })
                .map_err(open_err)?
            }
        };
        Ok(Self {
            fd,
            seq: std::process::id().wrapping_shl(16),
            buf: vec![0; RECV_BUF],
        })
    }

    /// The next `n` sequence numbers; returns the first.
    fn take_seqs(&mut self, n: u32) -> u32 {
        let first = self.seq.wrapping_add(1);
        self.seq = self.seq.wrapping_add(n);
        first
    }

    fn send(&self, buf: &[u8]) -> Result<(), NfnlError> {
        loop {
            match socket::send(self.fd.as_raw_fd(), buf, MsgFlags::empty()) {
                Ok(n) if n == buf.len() => return Ok(()),
                Ok(_) => return Err(NfnlError::Malformed("short netlink send")),
                Err(Errno::EINTR) => continue,
                Err(errno) => {
                    return Err(NfnlError::Io {
                        what: "send",
                        errno,
                    })
                }
            }
        }
    }

    /// Receives one datagram; `Ok(None)` when `nonblocking` and nothing is
    /// queued, or when a blocking wait times out.
    fn recv(&mut self, nonblocking: bool) -> Result<Option<usize>, NfnlError> {
        let flags = if nonblocking {
            MsgFlags::MSG_DONTWAIT
        } else {
            MsgFlags::empty()
        };
        loop {
            match socket::recv(self.fd.as_raw_fd(), &mut self.buf, flags) {
                Ok(n) => return Ok(Some(n)),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(None),
                Err(errno) => {
                    return Err(NfnlError::Io {
                        what: "recv",
                        errno,
                    })
                }
            }
        }
    }

    /// Reads the answers to the requests numbered `seqs` (all sent with
    /// `NLM_F_ACK`) and returns the refusals. The kernel handles requests
    /// while they are sent, so once one refusal has arrived the rest are
    /// already queued. A refusal of `abort_seq` (a batch begin) ends the
    /// wait: nothing else will be answered.
    fn refusals(
        &mut self,
        seqs: impl IntoIterator<Item = u32>,
        abort_seq: Option<u32>,
        what: impl Fn() -> String,
    ) -> Result<Vec<(u32, Ack)>, NfnlError> {
        let mut pending: std::collections::BTreeSet<u32> = seqs.into_iter().collect();
        let mut refused = Vec::new();
        while !pending.is_empty() {
            let Some(n) = self.recv(!refused.is_empty())? else {
                if refused.is_empty() {
                    return Err(NfnlError::NoAck { what: what() });
                }
                break;
            };
            for m in messages(&self.buf[..n])? {
                if m.ty != NLMSG_ERROR {
                    continue;
                }
                let ack = parse_ack(&m)?;
                if Some(m.seq) == abort_seq && ack.errno != 0 {
                    pending.clear();
                    refused.push((m.seq, ack));
                } else if pending.remove(&m.seq) && ack.errno != 0 {
                    refused.push((m.seq, ack));
                }
            }
        }
        Ok(refused)
    }

    /// Sends a dump request and hands each answer to `each` until the dump
    /// ends; a refusal goes through `refused`.
    fn dump(
        &mut self,
        request: &[u8],
        seq: u32,
        refused: impl FnOnce(Ack) -> NfnlError,
        mut each: impl FnMut(&Msg<'_>) -> Result<(), NfnlError>,
    ) -> Result<(), NfnlError> {
        self.send(request)?;
        loop {
            let Some(n) = self.recv(false)? else {
                return Err(NfnlError::NoAck {
                    what: "a dump request".into(),
                });
            };
            for m in messages(&self.buf[..n])? {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let ack = parse_ack(&m)?;
                        return if ack.errno == 0 {
                            Ok(())
                        } else {
                            Err(refused(ack))
                        };
                    }
                    _ => each(&m)?,
                }
            }
        }
    }
}
