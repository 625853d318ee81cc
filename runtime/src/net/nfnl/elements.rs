//! nftables map elements over netlink: typed values in register layout,
//! and a batch of element changes applied as one transaction.
//!
//! Each field of a concatenated key or value sits in its own 4-byte
//! register: an IPv4 address, then a big-endian port and two zero bytes. A
//! tc class id is a host-endian `u32`.

use std::fmt;
use std::net::Ipv4Addr;

use nix::errno::Errno;

use super::{
    attr, attrs, Ack, NfnlError, Socket, Writer, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST,
};

/// nfgenmsg family of an `ip` table.
const FAMILY_IP: u8 = libc::NFPROTO_IPV4 as u8;
const NFNL_SUBSYS_NFTABLES: u16 = libc::NFNL_SUBSYS_NFTABLES as u16;
const NFNL_MSG_BATCH_BEGIN: u16 = libc::NFNL_MSG_BATCH_BEGIN as u16;
const NFNL_MSG_BATCH_END: u16 = libc::NFNL_MSG_BATCH_END as u16;
const NFT_MSG_NEWSETELEM: u16 = libc::NFT_MSG_NEWSETELEM as u16;
const NFT_MSG_GETSETELEM: u16 = libc::NFT_MSG_GETSETELEM as u16;
const NFT_MSG_DELSETELEM: u16 = libc::NFT_MSG_DELSETELEM as u16;

// linux/netfilter/nf_tables.h attribute numbers (not in the libc crate).
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;

/// Elements per message: keeps a nested attribute under its 64 KiB limit
/// (an element with data is 36 bytes). A batch may hold many messages.
const MAX_ELEMENTS_PER_MSG: usize = 1024;

/// One key or data value of a map element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Value {
    /// `ipv4_addr . inet_service`.
    AddrPort(Ipv4Addr, u16),
    /// `ipv4_addr`.
    Addr(Ipv4Addr),
    /// `classid`, `major:minor`.
    ClassId { major: u16, minor: u16 },
}

/// The type of a [`Value`], for decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    AddrPort,
    Addr,
    ClassId,
}

impl Value {
    /// The value in nftables register layout.
    pub fn to_bytes(&self) -> Vec<u8> {
        match *self {
            Self::AddrPort(ip, port) => {
                let mut b = ip.octets().to_vec();
                b.extend_from_slice(&port.to_be_bytes());
                b.extend_from_slice(&[0, 0]);
                b
            }
            Self::Addr(ip) => ip.octets().to_vec(),
            Self::ClassId { major, minor } => ((u32::from(major) << 16) | u32::from(minor))
                .to_ne_bytes()
                .to_vec(),
        }
    }

    /// Reads a value of the given kind back from register layout.
    pub fn decode(kind: Kind, b: &[u8]) -> Option<Self> {
        match (kind, b.len()) {
            (Kind::AddrPort, 8) => Some(Self::AddrPort(
                Ipv4Addr::new(b[0], b[1], b[2], b[3]),
                u16::from_be_bytes([b[4], b[5]]),
            )),
            (Kind::Addr, 4) => Some(Self::Addr(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
            (Kind::ClassId, 4) => {
                let v = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                Some(Self::ClassId {
                    major: (v >> 16) as u16,
                    minor: (v & 0xffff) as u16,
                })
            }
            _ => None,
        }
    }
}

/// As `nft` writes it: `10.0.0.1 . 80`, `10.0.0.1`, `1:13`.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AddrPort(ip, port) => write!(f, "{ip} . {port}"),
            Self::Addr(ip) => write!(f, "{ip}"),
            Self::ClassId { major, minor } => write!(f, "{major:x}:{minor:x}"),
        }
    }
}

/// A map element; deletions carry only the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub key: Value,
    pub data: Option<Value>,
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.data {
            Some(d) => write!(f, "{} : {d}", self.key),
            None => write!(f, "{}", self.key),
        }
    }
}

/// Adding (`nft add element`: an identical element is not an error) or
/// deleting (a missing element is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Delete,
}

impl Op {
    /// The `nft` verb.
    pub fn verb(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Delete => "delete",
        }
    }
}

/// Elements added to or deleted from one map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapChange {
    pub op: Op,
    pub map: String,
    pub elements: Vec<Element>,
}

/// Element changes in one `ip` table, applied in order as one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ElemBatch {
    pub table: String,
    pub changes: Vec<MapChange>,
}

impl ElemBatch {
    pub fn is_empty(&self) -> bool {
        self.changes.iter().all(|c| c.elements.is_empty())
    }

    /// The same change as `nft -f -` text, one line per map change.
    pub fn render_nft(&self) -> String {
        let mut s = String::new();
        for c in self.changes.iter().filter(|c| !c.elements.is_empty()) {
            let items: Vec<String> = c.elements.iter().map(Element::to_string).collect();
            s.push_str(&format!(
                "{} element ip {} {} {{ {} }}\n",
                c.op.verb(),
                self.table,
                c.map,
                items.join(", ")
            ));
        }
        s
    }

    /// The batch on the wire, sequence numbers from `seq`.
    pub fn encode(&self, seq: u32) -> Encoded {
        let mut w = Writer::default();
        let mut seq = seq;
        let begin_seq = seq;
        batch_marker(&mut w, NFNL_MSG_BATCH_BEGIN, seq);
        let mut msgs = Vec::new();
        for (ci, c) in self.changes.iter().enumerate() {
            for (chunk_no, chunk) in c.elements.chunks(MAX_ELEMENTS_PER_MSG).enumerate() {
                seq = seq.wrapping_add(1);
                let (ty, flags) = match c.op {
                    Op::Add => (NFT_MSG_NEWSETELEM, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK),
                    Op::Delete => (NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK),
                };
                let start = w.begin_msg(nft_type(ty), flags, seq, FAMILY_IP, 0);
                w.attr_str(NFTA_SET_ELEM_LIST_TABLE, &self.table);
                w.attr_str(NFTA_SET_ELEM_LIST_SET, &c.map);
                let list = w.nest_begin(NFTA_SET_ELEM_LIST_ELEMENTS);
                let mut spans = Vec::with_capacity(chunk.len());
                for (i, e) in chunk.iter().enumerate() {
                    let from = w.buf.len() - start;
                    let el = w.nest_begin(NFTA_LIST_ELEM);
                    let k = w.nest_begin(NFTA_SET_ELEM_KEY);
                    w.attr(NFTA_DATA_VALUE, &e.key.to_bytes());
                    w.nest_end(k);
                    if let (Op::Add, Some(d)) = (c.op, &e.data) {
                        let n = w.nest_begin(NFTA_SET_ELEM_DATA);
                        w.attr(NFTA_DATA_VALUE, &d.to_bytes());
                        w.nest_end(n);
                    }
                    w.nest_end(el);
                    spans.push((
                        from,
                        w.buf.len() - start,
                        chunk_no * MAX_ELEMENTS_PER_MSG + i,
                    ));
                }
                w.nest_end(list);
                w.end_msg(start);
                msgs.push(SentMsg {
                    seq,
                    change: ci,
                    spans,
                });
            }
        }
        seq = seq.wrapping_add(1);
        batch_marker(&mut w, NFNL_MSG_BATCH_END, seq);
        Encoded {
            buf: w.buf,
            begin_seq,
            msgs,
            next_seq: seq.wrapping_add(1),
        }
    }
}

/// An encoded batch and where each element sits, to name the element the
/// kernel points at in an error.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub buf: Vec<u8>,
    begin_seq: u32,
    msgs: Vec<SentMsg>,
    next_seq: u32,
}

#[derive(Debug, Clone)]
struct SentMsg {
    seq: u32,
    change: usize,
    /// (first byte, end byte, element index) relative to the message start.
    spans: Vec<(usize, usize, usize)>,
}

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

fn batch_marker(w: &mut Writer, ty: u16, seq: u32) {
    let start = w.begin_msg(
        ty,
        NLM_F_REQUEST,
        seq,
        libc::AF_UNSPEC as u8,
        NFNL_SUBSYS_NFTABLES,
    );
    w.end_msg(start);
}

/// An element as the kernel lists it, in register layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawElement {
    pub key: Vec<u8>,
    pub data: Option<Vec<u8>>,
}

fn data_value(nested: &[u8]) -> Option<Vec<u8>> {
    attr(nested, NFTA_DATA_VALUE).map(<[u8]>::to_vec)
}

impl Socket {
    /// Applies the batch as one transaction: every element change or none.
    pub fn apply(&mut self, batch: &ElemBatch) -> Result<(), NfnlError> {
        if batch.is_empty() {
            return Ok(());
        }
        let enc = batch.encode(self.seq.wrapping_add(1));
        self.seq = enc.next_seq.wrapping_sub(1);
        self.send(&enc.buf)?;
        let refused = self.refusals(enc.msgs.iter().map(|m| m.seq), Some(enc.begin_seq), || {
            format!("the batch on table ip {}", batch.table)
        })?;
        match refused.into_iter().next() {
            None => Ok(()),
            Some((seq, ack)) if seq == enc.begin_seq => Err(NfnlError::Batch {
                table: batch.table.clone(),
                errno: Errno::from_raw(ack.errno),
                message: ack.message,
            }),
            Some((seq, ack)) => Err(kernel_error(batch, &enc, seq, ack)),
        }
    }

    /// The elements of `map` in `table` (family `ip`), as the kernel holds
    /// them.
    pub fn list(&mut self, table: &str, map: &str) -> Result<Vec<RawElement>, NfnlError> {
        let seq = self.take_seqs(1);
        let mut w = Writer::default();
        let start = w.begin_msg(
            nft_type(NFT_MSG_GETSETELEM),
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            FAMILY_IP,
            0,
        );
        w.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
        w.attr_str(NFTA_SET_ELEM_LIST_SET, map);
        w.end_msg(start);
        let mut out = Vec::new();
        let refused = |ack: Ack| NfnlError::Kernel {
            op: "list",
            table: table.to_string(),
            map: map.to_string(),
            element: "any".into(),
            errno: Errno::from_raw(ack.errno),
            message: ack.message,
        };
        self.dump(&w.buf, seq, refused, |m| {
            let Some(list) = attr(m.body(), NFTA_SET_ELEM_LIST_ELEMENTS) else {
                return Ok(());
            };
            for (ty, el) in attrs(list) {
                if ty != NFTA_LIST_ELEM {
                    continue;
                }
                let key = attr(el, NFTA_SET_ELEM_KEY)
                    .and_then(data_value)
                    .ok_or(NfnlError::Malformed("set element without key"))?;
                let data = attr(el, NFTA_SET_ELEM_DATA).and_then(data_value);
                out.push(RawElement { key, data });
            }
            Ok(())
        })?;
        Ok(out)
    }
}

/// Names the table, map and element of a refused message.
fn kernel_error(batch: &ElemBatch, enc: &Encoded, seq: u32, ack: Ack) -> NfnlError {
    let errno = Errno::from_raw(ack.errno);
    let Some(sent) = enc.msgs.iter().find(|m| m.seq == seq) else {
        return NfnlError::Batch {
            table: batch.table.clone(),
            errno,
            message: ack.message,
        };
    };
    let change = &batch.changes[sent.change];
    let pointed = ack.offset.and_then(|off| {
        sent.spans
            .iter()
            .find(|(from, to, _)| (*from..*to).contains(&off))
            .map(|s| s.2)
    });
    let element = match (pointed, change.elements.len()) {
        (Some(i), _) => change.elements.get(i).map(|e| e.key.to_string()),
        (None, 1) => Some(change.elements[0].key.to_string()),
        (None, _) => None,
    }
    .unwrap_or_else(|| format!("(one of {})", change.elements.len()));
    NfnlError::Kernel {
        op: change.op.verb(),
        table: batch.table.clone(),
        map: change.map.clone(),
        element,
        errno,
        message: ack.message,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{messages, NFGENMSG_LEN};
    use super::*;

    fn ap(a: [u8; 4], p: u16) -> Value {
        Value::AddrPort(Ipv4Addr::from(a), p)
    }

    #[test]
    fn values_use_register_layout_and_nft_text() {
        let v = ap([192, 168, 1, 10], 10002);
        assert_eq!(v.to_bytes(), [192, 168, 1, 10, 0x27, 0x12, 0, 0]);
        assert_eq!(v.to_string(), "192.168.1.10 . 10002");
        assert_eq!(Value::decode(Kind::AddrPort, &v.to_bytes()), Some(v));
        let c = Value::ClassId {
            major: 1,
            minor: 0x13,
        };
        assert_eq!(c.to_bytes(), 0x0001_0013u32.to_ne_bytes());
        assert_eq!(c.to_string(), "1:13");
        assert_eq!(Value::decode(Kind::ClassId, &c.to_bytes()), Some(c));
        assert_eq!(Value::decode(Kind::Addr, &[1, 2, 3]), None);
    }

    #[test]
    fn batch_encodes_begin_elements_end_with_acks() {
        let batch = ElemBatch {
            table: "cph".into(),
            changes: vec![
                MapChange {
                    op: Op::Delete,
                    map: "private_ports".into(),
                    elements: vec![Element {
                        key: ap([10, 0, 0, 1], 80),
                        data: None,
                    }],
                },
                MapChange {
                    op: Op::Add,
                    map: "public_ports".into(),
                    elements: vec![Element {
                        key: ap([10, 0, 0, 1], 81),
                        data: Some(ap([10, 1, 0, 2], 8080)),
                    }],
                },
            ],
        };
        assert_eq!(
            batch.render_nft(),
            "delete element ip cph private_ports { 10.0.0.1 . 80 }\n\
             add element ip cph public_ports { 10.0.0.1 . 81 : 10.1.0.2 . 8080 }\n"
        );
        let enc = batch.encode(7);
        let msgs = messages(&enc.buf).unwrap();
        let types: Vec<(u16, u16, u32)> = msgs.iter().map(|m| (m.ty, m.flags, m.seq)).collect();
        assert_eq!(
            types,
            [
                (0x10, 1, 7),
                (0x0a0e, 1 | 4, 8),
                (0x0a0c, 1 | 4 | 0x400, 9),
                (0x11, 1, 10)
            ]
        );
        // Batch markers carry the nftables subsystem in res_id.
        assert_eq!(msgs[0].payload, [0, 0, 0, 10]);
        let body = &msgs[2].payload[NFGENMSG_LEN..];
        assert_eq!(msgs[2].payload[0], libc::NFPROTO_IPV4 as u8);
        assert_eq!(attr(body, NFTA_SET_ELEM_LIST_TABLE).unwrap(), b"cph\0");
        assert_eq!(
            attr(body, NFTA_SET_ELEM_LIST_SET).unwrap(),
            b"public_ports\0"
        );
        let list = attr(body, NFTA_SET_ELEM_LIST_ELEMENTS).unwrap();
        let el = attr(list, NFTA_LIST_ELEM).unwrap();
        let key = attr(el, NFTA_SET_ELEM_KEY).and_then(data_value).unwrap();
        let data = attr(el, NFTA_SET_ELEM_DATA).and_then(data_value).unwrap();
        assert_eq!(key, [10, 0, 0, 1, 0, 81, 0, 0]);
        assert_eq!(data, [10, 1, 0, 2, 0x1f, 0x90, 0, 0]);
        // A deletion carries no data.
        let list = attr(
            &msgs[1].payload[NFGENMSG_LEN..],
            NFTA_SET_ELEM_LIST_ELEMENTS,
        )
        .unwrap();
        assert!(attr(attr(list, NFTA_LIST_ELEM).unwrap(), NFTA_SET_ELEM_DATA).is_none());
        assert_eq!(enc.next_seq, 11);
    }

    #[test]
    fn large_changes_split_into_messages_of_one_batch() {
        let elements: Vec<Element> = (0..2500u16)
            .map(|p| Element {
                key: ap([10, 0, 0, 1], p),
                data: Some(ap([10, 1, 0, 2], p)),
            })
            .collect();
        let batch = ElemBatch {
            table: "t".into(),
            changes: vec![MapChange {
                op: Op::Add,
                map: "m".into(),
                elements,
            }],
        };
        let enc = batch.encode(0);
        assert_eq!(messages(&enc.buf).unwrap().len(), 5);
        assert_eq!(enc.msgs.len(), 3);
        assert_eq!(enc.msgs[2].spans[0].2, 2048);
    }

    #[test]
    fn kernel_error_names_the_element_at_the_offset() {
        let elements: Vec<Element> = (1..=3u16)
            .map(|p| Element {
                key: ap([10, 0, 0, 1], p),
                data: None,
            })
            .collect();
        let batch = ElemBatch {
            table: "cph".into(),
            changes: vec![MapChange {
                op: Op::Delete,
                map: "public_ports".into(),
                elements,
            }],
        };
        let enc = batch.encode(100);
        let second = enc.msgs[0].spans[1].0 + 2;
        let e = kernel_error(
            &batch,
            &enc,
            101,
            Ack {
                errno: libc::ENOENT,
                message: None,
                offset: Some(second),
            },
        );
        assert_eq!(
            e.to_string(),
            "cannot delete element 10.0.0.1 . 2 in map public_ports of table ip cph: ENOENT: No such file or directory"
        );
        assert_eq!(e.errno(), Some(Errno::ENOENT));
        let e = kernel_error(
            &batch,
            &enc,
            101,
            Ack {
                errno: libc::ENOENT,
                message: Some("x".into()),
                offset: None,
            },
        );
        assert!(e.to_string().contains("element (one of 3)"), "{e}");
        assert!(e.to_string().ends_with(" (x)"), "{e}");
    }
}
