//! The HTB trees shaping phones' traffic, rendered as `tc -batch -` lines.
//! Downloads are shaped on the bridge (the host side of every phone),
//! uploads on an IFB device that each phone's host-side veth redirects its
//! ingress to, before the bridge sees the frame (redirecting the bridge's
//! own ingress instead would hand routed replies back after conntrack, and
//! a DNAT's reply would leave un-NATed). Both trees are the same. Class
//! `1:1` is the server and carries the shared bandwidth; each phone has a
//! child `1:<slot + 0x10>` whose ceiling is its `com.cph.bandwidth_limit`,
//! or the server rate when unlimited. Children get a small guaranteed rate
//! and borrow the rest from the server class, so together they never exceed
//! the shared bandwidth. Downloads are put in their phone's class by the
//! nftables `phone_class` map (`meta priority`), so the bridge needs no tc
//! filters and host-local traffic stays unshaped; uploads by one `u32`
//! filter per phone on its source address. Each class's leaf is a small
//! token bucket at the same ceiling, which splits large GSO segments into
//! frames so slow limits are smooth.
//!
//! Units: tc `kbit` is 1,000 bit/s (`kbps` would be kilobytes per second);
//! the API's kbit/s and Mbit/s are decimal too, so 1 Mbit/s is `1000kbit`.

use super::config::Ipv4Net;
use super::nft::class_minor;
use super::{BandwidthLimit, PhoneNet};

/// Guaranteed rate of a phone class, kbit/s; the rest is borrowed.
pub const PHONE_GUARANTEED_KBIT: u64 = 100;
/// Leaf queue length, packets.
pub const LEAF_QUEUE_PACKETS: u32 = 256;
/// One full-size Ethernet frame, the least burst and the DRR quantum.
const MTU_BYTES: u64 = 1514;
/// The largest GSO segment.
const GSO_BYTES: u64 = 65536;

/// The ceiling of a phone class, kbit/s.
pub fn phone_ceil_kbit(limit: BandwidthLimit, shared_mbit: u32) -> u64 {
    let server = u64::from(shared_mbit) * 1000;
    match limit {
        BandwidthLimit::Unlimited => server,
        BandwidthLimit::Kbit(k) => u64::from(k).min(server),
    }
}

/// Burst in bytes: 10 ms at the rate, at least one 64 KiB GSO segment, so
/// the large segments veth and bridges carry do not starve the bucket.
fn burst_bytes(kbit: u64) -> u64 {
    (kbit * 1000 / 8 / 100).max(GSO_BYTES)
}

fn server_class(verb: &str, dev: &str, shared_mbit: u32) -> String {
    let k = u64::from(shared_mbit) * 1000;
    let b = burst_bytes(k);
    format!(
        "class {verb} dev {} parent 1: classid 1:1 htb rate {k}kbit ceil {k}kbit burst {b} cburst {b}",
        dev
    )
}

fn phone_class(verb: &str, dev: &str, p: &PhoneNet, shared_mbit: u32) -> String {
    let ceil = phone_ceil_kbit(p.bandwidth, shared_mbit);
    let rate = ceil.min(PHONE_GUARANTEED_KBIT);
    format!(
        "class {verb} dev {} parent 1:1 classid 1:{:x} htb rate {rate}kbit ceil {ceil}kbit burst {} cburst {} quantum {MTU_BYTES}",
        dev,
        class_minor(p.index),
        burst_bytes(rate),
        burst_bytes(ceil),
    )
}

/// Bytes a phone's leaf queues (as many full frames as a packet queue of
/// [`LEAF_QUEUE_PACKETS`] would hold). Kept fixed so that a rate change
/// never replaces the queue.
const LEAF_QUEUE_BYTES: u64 = LEAF_QUEUE_PACKETS as u64 * MTU_BYTES;

/// A phone's leaf: a token bucket at the phone's ceiling with a small
/// bucket (10 ms at the rate, at least two frames). HTB hands out whole
/// GSO segments of up to 64 KiB, which at low rates are seconds of
/// traffic at once; a TBF whose bucket is smaller than such a segment
/// cuts it into frames as it is queued, so slow phones are shaped frame
/// by frame (the class's 64 KiB burst no longer shows as lumps).
fn phone_leaf(verb: &str, dev: &str, p: &PhoneNet, shared_mbit: u32) -> String {
    let minor = class_minor(p.index);
    let ceil = phone_ceil_kbit(p.bandwidth, shared_mbit);
    let bucket = (ceil * 1000 / 8 / 100).max(2 * MTU_BYTES);
    format!(
        "qdisc {verb} dev {} parent 1:{minor:x} handle {minor:x}: tbf rate {ceil}kbit burst {bucket} limit {LEAF_QUEUE_BYTES}",
        dev
    )
}

/// The root qdisc and server class (idempotent: `replace`).
pub fn render_root(dev: &str, shared_mbit: u32) -> Vec<String> {
    vec![
        format!("qdisc replace dev {} root handle 1: htb default 0", dev),
        server_class("replace", dev, shared_mbit),
    ]
}

/// A phone's class and leaf queue (idempotent: `replace`).
pub fn render_phone_add(dev: &str, p: &PhoneNet, shared_mbit: u32) -> Vec<String> {
    vec![
        phone_class("replace", dev, p, shared_mbit),
        phone_leaf("replace", dev, p, shared_mbit),
    ]
}

/// Changes a phone's ceiling in place (class and leaf); queued packets
/// and flows stay.
pub fn render_phone_change(dev: &str, p: &PhoneNet, shared_mbit: u32) -> Vec<String> {
    vec![
        phone_class("change", dev, p, shared_mbit),
        phone_leaf("change", dev, p, shared_mbit),
    ]
}

/// Removes a phone's class (its leaf queue goes with it).
pub fn render_phone_delete(dev: &str, index: u32) -> Vec<String> {
    vec![format!(
        "class del dev {} classid 1:{:x}",
        dev,
        class_minor(index)
    )]
}

/// Changes the shared bandwidth live: the server class and every phone
/// ceiling that depends on it.
pub fn render_shared_change<'a>(
    dev: &str,
    shared_mbit: u32,
    phones: impl IntoIterator<Item = &'a PhoneNet>,
) -> Vec<String> {
    let mut v = vec![server_class("change", dev, shared_mbit)];
    v.extend(
        phones
            .into_iter()
            .flat_map(|p| render_phone_change(dev, p, shared_mbit)),
    );
    v
}

/// A phone's host-side veth handing every frame the phone sends to the
/// upload device `ifb` (one filter matching all; `u32` is the classifier
/// every kernel with tc filters has), except IPv4 packets to the phone
/// subnet: traffic to another phone of the server (or to the host's
/// bridge address) stays on the host, as the download tree never sees it
/// either, so neither limit counts it. The exception is node 1, before
/// the redirect's node 0x800 in the same `u32` table; a match without an
/// action ends classification and lets the frame on to the bridge (no
/// `gact` action module needed, which some kernels lack).
pub fn render_upload_redirect(host_if: &str, ifb: &str, subnet: &Ipv4Net) -> Vec<String> {
    vec![
        format!("qdisc replace dev {host_if} handle ffff: ingress"),
        format!(
            "filter replace dev {host_if} parent ffff: protocol all prio 1 handle 800::1 \
             u32 match u8 0x40 0xf0 at 0 match ip dst {subnet} classid ffff:1"
        ),
        format!(
            "filter replace dev {host_if} parent ffff: protocol all prio 1 handle 800::800 \
             u32 match u32 0 0 action mirred egress redirect dev {ifb}"
        ),
    ]
}

/// The `u32` node of a phone slot's upload filter (12 bits, from 1).
fn filter_node(index: u32) -> u32 {
    index + 1
}

/// Puts a phone's uploads (by source address) in its class on `ifb`.
pub fn render_upload_filter(ifb: &str, p: &PhoneNet) -> Vec<String> {
    vec![format!(
        "filter replace dev {ifb} parent 1: protocol ip prio 1 handle 800::{:x} \
         u32 match ip src {}/32 flowid 1:{:x}",
        filter_node(p.index),
        p.ip,
        class_minor(p.index)
    )]
}

/// Removes a phone slot's upload filter (before its class: a class that
/// filters point to cannot be deleted).
pub fn render_upload_filter_delete(ifb: &str, index: u32) -> Vec<String> {
    vec![format!(
        "filter del dev {ifb} parent 1: protocol ip prio 1 handle 800::{:x} u32",
        filter_node(index)
    )]
}

/// Slots whose upload filter `tc filter show` lists (`fh 800::<node>`).
pub fn parse_upload_filters(show: &str) -> Vec<u32> {
    show.split_whitespace()
        .skip_while(|w| *w != "fh")
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "fh")
        .filter_map(|w| {
            let node = w[1].strip_prefix("800::")?;
            u32::from_str_radix(node, 16).ok()?.checked_sub(1)
        })
        .collect()
}

/// Whether `tc qdisc show` lists our HTB root (`qdisc htb 1: root`).
pub fn has_htb_root(show: &str) -> bool {
    show.lines().any(|l| l.starts_with("qdisc htb 1: root"))
}

/// Class minors present under `1:` in `tc class show` output (server class
/// excluded).
pub fn parse_class_minors(show: &str) -> Vec<u32> {
    show.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next()? == "class" && it.next()? == "htb").then_some(())?;
            let id = it.next()?.strip_prefix("1:")?;
            u32::from_str_radix(id, 16).ok()
        })
        .filter(|&m| m != 1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::state::tests::config;
    use crate::net::TrafficType;
    use std::net::Ipv4Addr;

    fn phone(limit: BandwidthLimit) -> PhoneNet {
        PhoneNet {
            phone_id: "p".into(),
            index: 0,
            ip: Ipv4Addr::new(10, 201, 0, 2),
            host_if: "cphv0".into(),
            netns: "/run/netns/p".into(),
            ports: vec![],
            bandwidth: limit,
            traffic: TrafficType::Direct,
        }
    }

    #[test]
    fn units_are_decimal_kbit() {
        let cfg = config(10000, 10100);
        let dev = cfg.bridge.as_str();
        let root = render_root(dev, 300);
        assert_eq!(
            root[0],
            "qdisc replace dev cphbr0 root handle 1: htb default 0"
        );
        assert_eq!(
            root[1],
            "class replace dev cphbr0 parent 1: classid 1:1 htb rate 300000kbit ceil 300000kbit burst 375000 cburst 375000"
        );
        let p = phone(BandwidthLimit::Kbit(10_000));
        assert_eq!(
            render_phone_add(dev, &p, 300),
            vec![
                "class replace dev cphbr0 parent 1:1 classid 1:10 htb rate 100kbit ceil 10000kbit burst 65536 cburst 65536 quantum 1514".to_string(),
                "qdisc replace dev cphbr0 parent 1:10 handle 10: tbf rate 10000kbit burst 12500 limit 387584".to_string(),
            ]
        );
        assert_eq!(
            render_phone_change(dev, &phone(BandwidthLimit::Unlimited), 15)[0],
            "class change dev cphbr0 parent 1:1 classid 1:10 htb rate 100kbit ceil 15000kbit burst 65536 cburst 65536 quantum 1514"
        );
        // A limit above the server rate is capped by it; a tiny one keeps it.
        assert_eq!(
            phone_ceil_kbit(BandwidthLimit::Kbit(99_999_999), 2000),
            2_000_000
        );
        assert_eq!(phone_ceil_kbit(BandwidthLimit::Kbit(1), 2000), 1);
        assert!(render_phone_add(dev, &phone(BandwidthLimit::Kbit(1)), 5)[0]
            .contains("rate 1kbit ceil 1kbit"));
        assert_eq!(
            render_phone_delete(dev, 0)[0],
            "class del dev cphbr0 classid 1:10"
        );
        // A slow phone's leaf bucket is two frames: smaller than a GSO
        // segment, which it cuts into frames.
        assert!(
            render_phone_add(dev, &phone(BandwidthLimit::Kbit(64)), 5)[1]
                .contains("tbf rate 64kbit burst 3028 limit 387584")
        );
        let shared = render_shared_change(dev, 50, [&p]);
        assert_eq!(shared.len(), 3);
        assert!(shared[2].starts_with("qdisc change dev cphbr0 parent 1:10 handle 10: tbf"));
        assert!(shared[0]
            .starts_with("class change dev cphbr0 parent 1: classid 1:1 htb rate 50000kbit"));
        let subnet: Ipv4Net = "10.201.0.0/16".parse().unwrap();
        let redirect = render_upload_redirect("cphv0", "cphbr0-up", &subnet);
        assert_eq!(
            redirect[1],
            "filter replace dev cphv0 parent ffff: protocol all prio 1 handle 800::1 \
             u32 match u8 0x40 0xf0 at 0 match ip dst 10.201.0.0/16 classid ffff:1"
        );
        assert_eq!(
            redirect[2],
            "filter replace dev cphv0 parent ffff: protocol all prio 1 handle 800::800 \
             u32 match u32 0 0 action mirred egress redirect dev cphbr0-up"
        );
        assert_eq!(
            render_upload_filter("cphbr0-up", &p)[0],
            "filter replace dev cphbr0-up parent 1: protocol ip prio 1 handle 800::1 \
             u32 match ip src 10.201.0.2/32 flowid 1:10"
        );
        assert_eq!(
            render_upload_filter_delete("cphbr0-up", 0)[0],
            "filter del dev cphbr0-up parent 1: protocol ip prio 1 handle 800::1 u32"
        );
    }

    #[test]
    fn parses_upload_filters() {
        let show = "filter parent 1: protocol ip pref 1 u32 chain 0 \n\
                    filter parent 1: protocol ip pref 1 u32 chain 0 fh 800: ht divisor 1 \n\
                    filter parent 1: protocol ip pref 1 u32 chain 0 fh 800::1 order 1 key ht 800 bkt 0 flowid 1:10 not_in_hw \n\
                    \x20 match 0ad20002/ffffffff at 12\n\
                    filter parent 1: protocol ip pref 1 u32 chain 0 fh 800::1b order 27 key ht 800 bkt 0 flowid 1:2a not_in_hw \n";
        assert_eq!(parse_upload_filters(show), vec![0, 0x1a]);
    }

    #[test]
    fn parses_class_listing() {
        let show = "class htb 1:1 root rate 15Mbit ceil 15Mbit burst 1600b cburst 1600b \n\
                    class htb 1:10 parent 1:1 leaf 10: prio 0 rate 100Kbit ceil 10Mbit burst 3028b cburst 6250b \n\
                    class htb 1:1a parent 1:1 leaf 1a: prio 0 rate 100Kbit ceil 15Mbit burst 3028b cburst 9375b \n";
        assert_eq!(parse_class_minors(show), vec![0x10, 0x1a]);
        assert!(has_htb_root(
            "qdisc htb 1: root refcnt 2 r2q 10 default 0 direct_packets_stat 0\n"
        ));
        assert!(!has_htb_root("qdisc noqueue 0: root refcnt 2\n"));
    }
}
