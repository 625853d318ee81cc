//! The agent's nftables table, rendered as `nft -f -` text from the state.
//!
//! One table (family `ip`) holds everything: maps `public_ports` and
//! `private_ports` from `server ip . access port` to `phone ip . listen port`
//! looked up by a single DNAT rule each (TCP and UDP), the set of private
//! source prefixes that may use `private_ports`, the map `phone_class` that
//! tags forwarded packets with their phone's tc class, forward isolation
//! (new connections into the bridge only when DNATed, from the private
//! network or from another phone) and egress masquerade. A full render
//! replaces the table in one transaction (`nft -f -`); a phone's change
//! touches only its map elements, also in one transaction, planned here as
//! typed elements and sent over netlink by [`super::nfnl`].

use std::fmt::Write;
use std::net::Ipv4Addr;

use super::nfnl::{ElemBatch, Element, MapChange, Op, Value};
use super::{NetConfig, PhoneNet, PortMapping};

/// Map of internet-accessible mappings.
pub const PUBLIC_MAP: &str = "public_ports";
/// Map of mappings reachable only from the private prefixes.
pub const PRIVATE_MAP: &str = "private_ports";
/// Set of private source prefixes.
pub const PRIVATE_SET: &str = "private_nets";
/// Map from phone address to tc class.
pub const CLASS_MAP: &str = "phone_class";

/// The tc class id (hex minor) of a phone slot; shared with [`super::tc`].
pub fn class_minor(index: u32) -> u32 {
    index + 0x10
}

fn map_of(m: &PortMapping) -> &'static str {
    if m.internet_accessible {
        PUBLIC_MAP
    } else {
        PRIVATE_MAP
    }
}

fn key(cfg: &NetConfig, m: &PortMapping) -> String {
    format!("{} . {}", cfg.server_ip, m.access_port)
}

fn element(cfg: &NetConfig, ip: Ipv4Addr, m: &PortMapping) -> String {
    format!("{} : {} . {}", key(cfg, m), ip, m.listen_port)
}

fn class_element(p: &PhoneNet) -> String {
    format!("{} : 1:{:x}", p.ip, class_minor(p.index))
}

fn elements_line(out: &mut String, items: &[String]) {
    if !items.is_empty() {
        let _ = writeln!(out, "\t\telements = {{ {} }}", items.join(", "));
    }
}

/// The whole table: created if missing, deleted and re-created in the same
/// transaction, so there is no moment without rules and no duplicate.
/// Established connections keep their conntrack NAT bindings.
pub fn render_table<'a>(cfg: &NetConfig, phones: impl IntoIterator<Item = &'a PhoneNet>) -> String {
    let t = &cfg.table;
    let br = &cfg.bridge;
    let subnet = cfg.subnet;
    let mut public = Vec::new();
    let mut private = Vec::new();
    let mut classes = Vec::new();
    for p in phones {
        classes.push(class_element(p));
        for m in &p.ports {
            let e = element(cfg, p.ip, m);
            if m.internet_accessible {
                public.push(e);
            } else {
                private.push(e);
            }
        }
    }
    let prefixes: Vec<String> = cfg.private_prefixes.iter().map(|n| n.to_string()).collect();
    let mut s = String::new();
    let _ = writeln!(s, "table ip {t} {{}}");
    let _ = writeln!(s, "delete table ip {t}");
    let _ = writeln!(s, "table ip {t} {{");
    let _ = writeln!(
        s,
        "\tset {PRIVATE_SET} {{\n\t\ttype ipv4_addr\n\t\tflags interval"
    );
    elements_line(&mut s, &prefixes);
    let _ = writeln!(s, "\t}}");
    for (name, items) in [(PUBLIC_MAP, &public), (PRIVATE_MAP, &private)] {
        let _ = writeln!(
            s,
            "\tmap {name} {{\n\t\ttype ipv4_addr . inet_service : ipv4_addr . inet_service"
        );
        elements_line(&mut s, items);
        let _ = writeln!(s, "\t}}");
    }
    let _ = writeln!(s, "\tmap {CLASS_MAP} {{\n\t\ttype ipv4_addr : classid");
    elements_line(&mut s, &classes);
    let _ = writeln!(s, "\t}}");
    let dnat_public =
        format!("meta l4proto {{ tcp, udp }} dnat ip to ip daddr . th dport map @{PUBLIC_MAP}");
    let dnat_private = format!(
        "ip saddr @{PRIVATE_SET} meta l4proto {{ tcp, udp }} dnat ip to ip daddr . th dport map @{PRIVATE_MAP}"
    );
    let _ = writeln!(
        s,
        "\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\t{dnat_public}\n\t\t{dnat_private}\n\t}}"
    );
    // The host itself belongs to the private network.
    let _ = writeln!(
        s,
        "\tchain output {{\n\t\ttype nat hook output priority -100; policy accept;\n\t\t{dnat_public}\n\t\tmeta l4proto {{ tcp, udp }} dnat ip to ip daddr . th dport map @{PRIVATE_MAP}\n\t}}"
    );
    let _ = writeln!(
        s,
        "\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\
         \t\toifname \"{br}\" meta priority set ip daddr map @{CLASS_MAP}\n\
         \t\toifname \"{br}\" ct state new ct status dnat accept\n\
         \t\toifname \"{br}\" ct state new ip saddr {{ {subnet} }} accept\n\
         \t\toifname \"{br}\" ct state new ip saddr @{PRIVATE_SET} accept\n\
         \t\toifname \"{br}\" ct state new drop\n\t}}"
    );
    let _ = writeln!(
        s,
        "\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {subnet} oifname != \"{br}\" masquerade\n\
         \t\tip saddr {subnet} oifname \"{br}\" ct status dnat masquerade\n\t}}"
    );
    let _ = writeln!(s, "}}");
    s
}

/// `delete table`, for teardown (errors if the table is missing; callers
/// check `nft list tables` first).
pub fn render_delete_table(cfg: &NetConfig) -> String {
    format!("delete table ip {}\n", cfg.table)
}

/// The key of a mapping: `server ip . access port`.
fn key_value(cfg: &NetConfig, m: &PortMapping) -> Value {
    Value::AddrPort(cfg.server_ip, m.access_port)
}

fn class_value(p: &PhoneNet) -> Value {
    let minor = class_minor(p.index);
    Value::ClassId {
        major: 1,
        // tc class minors are 16 bits: a slot past 0xffef already fails in
        // `tc`, which add_phone runs before the elements are applied.
        minor: u16::try_from(minor).unwrap_or(u16::MAX),
    }
}

/// One phone's change as a single transaction: elements of `old` that are
/// gone or changed are deleted, those of `new` that are new or changed are
/// added, its class element follows presence. `None` is "no phone".
/// Applied over netlink ([`super::nfnl`]) or rendered as `nft -f` text.
pub fn phone_delta(cfg: &NetConfig, old: Option<&PhoneNet>, new: Option<&PhoneNet>) -> ElemBatch {
    let mut del: [Vec<Element>; 2] = [Vec::new(), Vec::new()];
    let mut add: [Vec<Element>; 2] = [Vec::new(), Vec::new()];
    let slot = |m: &PortMapping| usize::from(map_of(m) == PRIVATE_MAP);
    let same = |a: &PhoneNet, am: &PortMapping, b: &PhoneNet, bm: &PortMapping| {
        a.ip == b.ip
            && am.listen_port == bm.listen_port
            && am.internet_accessible == bm.internet_accessible
    };
    if let Some(o) = old {
        for m in &o.ports {
            let kept = new.is_some_and(|n| {
                n.ports
                    .iter()
                    .any(|nm| nm.access_port == m.access_port && same(o, m, n, nm))
            });
            if !kept {
                del[slot(m)].push(Element {
                    key: key_value(cfg, m),
                    data: None,
                });
            }
        }
    }
    if let Some(n) = new {
        for m in &n.ports {
            let had = old.is_some_and(|o| {
                o.ports
                    .iter()
                    .any(|om| om.access_port == m.access_port && same(o, om, n, m))
            });
            if !had {
                add[slot(m)].push(Element {
                    key: key_value(cfg, m),
                    data: Some(Value::AddrPort(n.ip, m.listen_port)),
                });
            }
        }
    }
    let change = |op, map: &str, elements| MapChange {
        op,
        map: map.to_string(),
        elements,
    };
    let [del_public, del_private] = del;
    let [add_public, add_private] = add;
    let mut changes = vec![
        change(Op::Delete, PUBLIC_MAP, del_public),
        change(Op::Delete, PRIVATE_MAP, del_private),
    ];
    match (old, new) {
        (Some(o), Some(n)) if o.ip == n.ip && o.index == n.index => {}
        _ => {
            if let Some(o) = old {
                let key = Value::Addr(o.ip);
                changes.push(change(
                    Op::Delete,
                    CLASS_MAP,
                    vec![Element { key, data: None }],
                ));
            }
            if let Some(n) = new {
                let e = Element {
                    key: Value::Addr(n.ip),
                    data: Some(class_value(n)),
                };
                changes.push(change(Op::Add, CLASS_MAP, vec![e]));
            }
        }
    }
    changes.push(change(Op::Add, PUBLIC_MAP, add_public));
    changes.push(change(Op::Add, PRIVATE_MAP, add_private));
    changes.retain(|c| !c.elements.is_empty());
    ElemBatch {
        table: cfg.table.clone(),
        changes,
    }
}

/// [`phone_delta`] as `nft -f -` text.
pub fn render_phone_delta(
    cfg: &NetConfig,
    old: Option<&PhoneNet>,
    new: Option<&PhoneNet>,
) -> String {
    phone_delta(cfg, old, new).render_nft()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::state::tests::config;
    use crate::net::{BandwidthLimit, TrafficType};

    fn m(name: &str, listen: u16, access: u16, public: bool) -> PortMapping {
        PortMapping {
            name: name.into(),
            listen_port: listen,
            access_port: access,
            internet_accessible: public,
            system: false,
        }
    }

    fn phone(ports: Vec<PortMapping>) -> PhoneNet {
        PhoneNet {
            phone_id: "p1".into(),
            index: 3,
            ip: Ipv4Addr::new(10, 201, 0, 5),
            host_if: "cphv3".into(),
            netns: "/run/netns/p1".into(),
            ports,
            bandwidth: BandwidthLimit::Unlimited,
            traffic: TrafficType::Direct,
        }
    }

    #[test]
    fn full_table_has_one_dnat_rule_per_map_and_all_elements() {
        let cfg = config(10000, 10999);
        let p = phone(vec![
            m("web", 20000, 10001, true),
            m("db", 20001, 10002, false),
        ]);
        let text = render_table(&cfg, [&p]);
        assert!(text.starts_with("table ip cph {}\ndelete table ip cph\ntable ip cph {\n"));
        assert!(text.contains("elements = { 192.168.0.0/16 }"));
        assert!(text.contains("elements = { 192.168.1.10 . 10001 : 10.201.0.5 . 20000 }"));
        assert!(text.contains("elements = { 192.168.1.10 . 10002 : 10.201.0.5 . 20001 }"));
        assert!(text.contains("elements = { 10.201.0.5 : 1:13 }"));
        assert_eq!(
            text.matches("dnat ip to ip daddr . th dport map @public_ports")
                .count(),
            2
        );
        assert!(text.contains(
            "ip saddr @private_nets meta l4proto { tcp, udp } dnat ip to ip daddr . th dport map @private_ports"
        ));
        assert!(text.contains("ip saddr 10.201.0.0/24 oifname != \"cphbr0\" masquerade"));
        assert!(text.contains("oifname \"cphbr0\" ct state new drop"));
        // No elements line for an empty map.
        let empty = render_table(&cfg, []);
        assert!(!empty.contains("elements = {  }"));
        assert!(!empty.contains(": 10.201"));
    }

    #[test]
    fn phone_delta_touches_only_changed_elements() {
        let cfg = config(10000, 10999);
        let old = phone(vec![
            m("web", 20000, 10001, true),
            m("db", 20001, 10002, false),
        ]);
        let new = phone(vec![
            m("web", 20000, 10001, true),
            m("db", 20001, 10002, true),
            m("x", 20002, 10003, false),
        ]);
        let text = render_phone_delta(&cfg, Some(&old), Some(&new));
        assert_eq!(
            text,
            "delete element ip cph private_ports { 192.168.1.10 . 10002 }\n\
             add element ip cph public_ports { 192.168.1.10 . 10002 : 10.201.0.5 . 20001 }\n\
             add element ip cph private_ports { 192.168.1.10 . 10003 : 10.201.0.5 . 20002 }\n"
        );
        let add = render_phone_delta(&cfg, None, Some(&old));
        assert_eq!(
            add,
            "add element ip cph phone_class { 10.201.0.5 : 1:13 }\n\
             add element ip cph public_ports { 192.168.1.10 . 10001 : 10.201.0.5 . 20000 }\n\
             add element ip cph private_ports { 192.168.1.10 . 10002 : 10.201.0.5 . 20001 }\n"
        );
        let del = render_phone_delta(&cfg, Some(&old), None);
        assert_eq!(
            del,
            "delete element ip cph public_ports { 192.168.1.10 . 10001 }\n\
             delete element ip cph private_ports { 192.168.1.10 . 10002 }\n\
             delete element ip cph phone_class { 10.201.0.5 }\n"
        );
        assert_eq!(render_phone_delta(&cfg, Some(&old), Some(&old)), "");
    }
}
