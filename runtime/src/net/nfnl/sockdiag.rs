//! The host's listening ports over NETLINK_SOCK_DIAG, the interface `ss`
//! reads: one dump per address family and protocol, TCP sockets in LISTEN
//! and unconnected UDP sockets, as `ss -l -t -u` shows them. Asking for TCP
//! LISTEN alone keeps the kernel to its listening hash (a bound TCP socket
//! that does not listen is in no table a dump walks anyway).

use std::collections::BTreeSet;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::SockProtocol;

use super::{Ack, NfnlError, Socket, Writer, NLM_F_DUMP, NLM_F_REQUEST};

// linux/sock_diag.h, linux/inet_diag.h.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const TCP_LISTEN: u32 = 10;
const TCP_CLOSE: u32 = 7;
/// `inet_diag_req_v2` after the header: family, protocol, ext, pad, states,
/// then a zeroed 48-byte `inet_diag_sockid`.
const REQ_SOCKID_LEN: usize = 48;
/// Offset of `id.idiag_sport` (big-endian) in an `inet_diag_msg`.
const MSG_SPORT_AT: usize = 4;

/// A NETLINK_SOCK_DIAG socket in one network namespace.
#[derive(Debug)]
pub struct DiagSocket(Socket);

impl DiagSocket {
    /// Opens the socket in the namespace at `netns`, or in the caller's.
    pub fn open(netns: Option<&Path>) -> Result<Self, NfnlError> {
        Socket::open_protocol(netns, SockProtocol::NetlinkSockDiag).map(Self)
    }

    /// Local ports of listening TCP and unconnected UDP sockets, IPv4 and
    /// IPv6.
    pub fn listening_ports(&mut self) -> Result<BTreeSet<u16>, NfnlError> {
        let mut ports = BTreeSet::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            for (protocol, states) in [
                (libc::IPPROTO_TCP, 1u32 << TCP_LISTEN),
                (
                    libc::IPPROTO_UDP,
                    (1u32 << TCP_LISTEN) | (1u32 << TCP_CLOSE),
                ),
            ] {
                let seq = self.0.take_seqs(1);
                let mut w = Writer::default();
                let start = w.begin_raw(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq);
                w.buf
                    .extend_from_slice(&[family as u8, protocol as u8, 0, 0]);
                w.buf.extend_from_slice(&states.to_ne_bytes());
                w.buf.extend_from_slice(&[0; REQ_SOCKID_LEN]);
                w.end_msg(start);
                let refused = |ack: Ack| NfnlError::SockDiag {
                    errno: Errno::from_raw(ack.errno),
                    message: ack.message,
                };
                self.0.dump(&w.buf, seq, refused, |m| {
                    let port = m
                        .payload
                        .get(MSG_SPORT_AT..MSG_SPORT_AT + 2)
                        .ok_or(NfnlError::Malformed("short inet_diag message"))?;
                    ports.insert(u16::from_be_bytes([port[0], port[1]]));
                    Ok(())
                })?;
            }
        }
        Ok(ports)
    }
}
