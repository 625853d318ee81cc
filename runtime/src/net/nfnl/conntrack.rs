//! Conntrack entries over ctnetlink: the flows a phone answers (its address
//! is the reply tuple's source) are listed with a kernel-side filter and
//! deleted one by one by their original tuple and id, as `conntrack -D`
//! does, so established connections to an unmapped port stop.

use std::net::Ipv4Addr;

use nix::errno::Errno;

use super::{attr, Ack, NfnlError, Socket, Writer, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};

const NFNL_SUBSYS_CTNETLINK: u16 = libc::NFNL_SUBSYS_CTNETLINK as u16;
// linux/netfilter/nfnetlink_conntrack.h (not in the libc crate).
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_FILTER: u16 = 25;
const CTA_FILTER_REPLY_FLAGS: u16 = 2;
const CTA_FILTER_FLAG_CTA_IP_SRC: u32 = 1;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;

/// Deletions per `send`: their acknowledgements must fit the socket's
/// receive buffer.
const DELETES_PER_SEND: usize = 64;

/// A conntrack entry answered by a phone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    /// The phone-side port (the reply's source port); 0 without ports.
    pub phone_port: u16,
    /// The original tuple as the kernel listed it, to delete the entry by.
    orig: Vec<u8>,
    id: Option<Vec<u8>>,
    zone: Option<Vec<u8>>,
}

fn ct_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | msg
}

/// The reply source address, protocol and port of a listed entry.
fn reply_side(body: &[u8]) -> Option<(Ipv4Addr, u8, u16)> {
    let reply = attr(body, CTA_TUPLE_REPLY)?;
    let ip = attr(attr(reply, CTA_TUPLE_IP)?, CTA_IP_V4_SRC)?;
    let ip = Ipv4Addr::new(*ip.first()?, *ip.get(1)?, *ip.get(2)?, *ip.get(3)?);
    let proto = attr(reply, CTA_TUPLE_PROTO)?;
    let num = *attr(proto, CTA_PROTO_NUM)?.first()?;
    let port = attr(proto, CTA_PROTO_SRC_PORT)
        .and_then(|p| Some(u16::from_be_bytes(p.get(..2)?.try_into().ok()?)))
        .unwrap_or(0);
    Some((ip, num, port))
}

impl Socket {
    /// The IPv4 entries whose reply comes from `phone_ip`. Kernels without
    /// dump filters list everything; the address is checked here as well.
    pub fn conntrack_flows_of(&mut self, phone_ip: Ipv4Addr) -> Result<Vec<Flow>, NfnlError> {
        let seq = self.take_seqs(1);
        let mut w = Writer::default();
        let start = w.begin_msg(
            ct_type(IPCTNL_MSG_CT_GET),
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            libc::AF_INET as u8,
            0,
        );
        let reply = w.nest_begin(CTA_TUPLE_REPLY);
        let ip = w.nest_begin(CTA_TUPLE_IP);
        w.attr(CTA_IP_V4_SRC, &phone_ip.octets());
        w.nest_end(ip);
        w.nest_end(reply);
        let filter = w.nest_begin(CTA_FILTER);
        w.attr(
            CTA_FILTER_REPLY_FLAGS,
            &CTA_FILTER_FLAG_CTA_IP_SRC.to_ne_bytes(),
        );
        w.nest_end(filter);
        w.end_msg(start);
        let refused = |ack: Ack| NfnlError::Conntrack {
            op: "list",
            phone_ip,
            errno: Errno::from_raw(ack.errno),
            message: ack.message,
        };
        let mut out = Vec::new();
        self.dump(&w.buf, seq, refused, |m| {
            let body = m.body();
            let Some((ip, proto, phone_port)) = reply_side(body) else {
                return Ok(());
            };
            let Some(orig) = attr(body, CTA_TUPLE_ORIG) else {
                return Ok(());
            };
            if ip == phone_ip {
                out.push(Flow {
                    proto,
                    phone_port,
                    orig: orig.to_vec(),
                    id: attr(body, CTA_ID).map(<[u8]>::to_vec),
                    zone: attr(body, CTA_ZONE).map(<[u8]>::to_vec),
                });
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Deletes the entries; one already gone is not an error. Returns how
    /// many were deleted.
    pub fn conntrack_delete(
        &mut self,
        phone_ip: Ipv4Addr,
        flows: &[Flow],
    ) -> Result<usize, NfnlError> {
        let mut deleted = 0;
        for chunk in flows.chunks(DELETES_PER_SEND) {
            let first = self.take_seqs(chunk.len() as u32);
            let mut w = Writer::default();
            for (i, f) in chunk.iter().enumerate() {
                let start = w.begin_msg(
                    ct_type(IPCTNL_MSG_CT_DELETE),
                    NLM_F_REQUEST | NLM_F_ACK,
                    first.wrapping_add(i as u32),
                    libc::AF_INET as u8,
                    0,
                );
                let orig = w.nest_begin(CTA_TUPLE_ORIG);
                w.buf.extend_from_slice(&f.orig);
                w.nest_end(orig);
                if let Some(id) = &f.id {
                    w.attr(CTA_ID, id);
                }
                if let Some(zone) = &f.zone {
                    w.attr(CTA_ZONE, zone);
                }
                w.end_msg(start);
            }
            self.send(&w.buf)?;
            let seqs = (0..chunk.len() as u32).map(|i| first.wrapping_add(i));
            let refused =
                self.refusals(seqs, None, || format!("conntrack deletions for {phone_ip}"))?;
            let mut gone = 0;
            for (_, ack) in refused {
                if ack.errno != libc::ENOENT {
                    return Err(NfnlError::Conntrack {
                        op: "delete",
                        phone_ip,
                        errno: Errno::from_raw(ack.errno),
                        message: ack.message,
                    });
                }
                gone += 1;
            }
            deleted += chunk.len() - gone;
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_side_reads_address_protocol_and_port() {
        let mut w = Writer::default();
        let reply = w.nest_begin(CTA_TUPLE_REPLY);
        let ip = w.nest_begin(CTA_TUPLE_IP);
        w.attr(CTA_IP_V4_SRC, &[10, 210, 0, 2]);
        w.attr(2, &[10, 210, 101, 2]);
        w.nest_end(ip);
        let proto = w.nest_begin(CTA_TUPLE_PROTO);
        w.attr(CTA_PROTO_NUM, &[6]);
        w.attr(CTA_PROTO_SRC_PORT, &20001u16.to_be_bytes());
        w.attr(3, &40000u16.to_be_bytes());
        w.nest_end(proto);
        w.nest_end(reply);
        assert_eq!(
            reply_side(&w.buf),
            Some((Ipv4Addr::new(10, 210, 0, 2), 6, 20001))
        );
        assert_eq!(reply_side(&[]), None);
    }
}
