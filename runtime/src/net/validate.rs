//! Input rules of the reference for ports and bandwidth, checked before
//! anything is planned so a bad request changes nothing.

use std::collections::BTreeSet;

use super::{BandwidthLimit, NetError, PortRequest};

/// Lowest user `listen_port`.
pub const MIN_LISTEN_PORT: u16 = 10000;
/// Highest user `listen_port`.
pub const MAX_LISTEN_PORT: u16 = 50000;
/// Names user ports may not take.
pub const RESERVED_PORT_NAMES: [&str; 2] = ["adb", "vnc"];
/// Longest port name, in bytes.
pub const MAX_PORT_NAME_BYTES: usize = 16;
/// `com.cph.bandwidth_limit` bounds, kbit/s.
pub const MIN_BANDWIDTH_LIMIT_KBIT: i64 = 1;
pub const MAX_BANDWIDTH_LIMIT_KBIT: i64 = 99_999_999;
/// `band_width_size` bounds, Mbit/s.
pub const MIN_SHARED_BANDWIDTH_MBIT: u32 = 1;
pub const MAX_SHARED_BANDWIDTH_MBIT: u32 = 2000;

/// Checks a phone's ports: user ports in 10000-50000, names not `adb`/`vnc`
/// and at most 16 bytes, no more than `max_user_ports`, no listen port or
/// name twice.
pub fn validate_ports(ports: &[PortRequest], max_user_ports: usize) -> Result<(), NetError> {
    let user = ports.iter().filter(|p| !p.system).count();
    if user > max_user_ports {
        return Err(NetError::invalid(
            "ports",
            format!("{user} ports exceed the limit of {max_user_ports}"),
        ));
    }
    let mut listen = BTreeSet::new();
    let mut names = BTreeSet::new();
    for p in ports {
        if p.name.is_empty() || p.name.len() > MAX_PORT_NAME_BYTES {
            return Err(NetError::invalid(
                "name",
                format!(
                    "port name {:?} must be 1-{MAX_PORT_NAME_BYTES} bytes",
                    p.name
                ),
            ));
        }
        if !p.system {
            if RESERVED_PORT_NAMES.contains(&p.name.to_ascii_lowercase().as_str()) {
                return Err(NetError::invalid(
                    "name",
                    format!("port name {:?} is reserved", p.name),
                ));
            }
            if !(MIN_LISTEN_PORT..=MAX_LISTEN_PORT).contains(&p.listen_port) {
                return Err(NetError::invalid(
                    "listen_port",
                    format!(
                        "{} is outside {MIN_LISTEN_PORT}-{MAX_LISTEN_PORT}",
                        p.listen_port
                    ),
                ));
            }
        } else if p.listen_port == 0 {
            return Err(NetError::invalid("listen_port", "0 is not a port"));
        }
        if !listen.insert(p.listen_port) {
            return Err(NetError::invalid(
                "listen_port",
                format!("{} is conflicted", p.listen_port),
            ));
        }
        if !names.insert(p.name.as_str()) {
            return Err(NetError::invalid(
                "name",
                format!("port name {:?} is conflicted", p.name),
            ));
        }
    }
    Ok(())
}

/// Parses `com.cph.bandwidth_limit` (kbit/s, 1..=99999999, or -1).
pub fn validate_bandwidth_limit(value: i64) -> Result<BandwidthLimit, NetError> {
    match value {
        -1 => Ok(BandwidthLimit::Unlimited),
        v if (MIN_BANDWIDTH_LIMIT_KBIT..=MAX_BANDWIDTH_LIMIT_KBIT).contains(&v) => {
            // In range, so it fits u32.
            Ok(BandwidthLimit::Kbit(v as u32))
        }
        v => Err(NetError::invalid(
            "com.cph.bandwidth_limit",
            format!("{v} is outside 1-99999999 kbit/s and not -1"),
        )),
    }
}

/// Checks `band_width_size` (Mbit/s): 1-2000, in steps of 1 up to 300, of 50
/// up to 1000 and of 500 above.
pub fn validate_shared_bandwidth(mbit: u32) -> Result<u32, NetError> {
    if !(MIN_SHARED_BANDWIDTH_MBIT..=MAX_SHARED_BANDWIDTH_MBIT).contains(&mbit) {
        return Err(NetError::invalid(
            "band_width_size",
            format!("{mbit} is outside 1-2000 Mbit/s"),
        ));
    }
    let step = match mbit {
        0..=300 => 1,
        301..=1000 => 50,
        _ => 500,
    };
    if mbit % step != 0 {
        return Err(NetError::invalid(
            "band_width_size",
            format!("{mbit} is not a multiple of the {step} Mbit/s step"),
        ));
    }
    Ok(mbit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, port: u16) -> PortRequest {
        PortRequest {
            name: name.into(),
            listen_port: port,
            internet_accessible: true,
            system: false,
        }
    }

    fn field(e: NetError) -> &'static str {
        match e {
            NetError::Invalid { field, .. } => field,
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn port_rules_name_the_field() {
        assert!(validate_ports(&[p("web", 10000), p("x", 50000)], 2).is_ok());
        assert_eq!(
            field(validate_ports(&[p("web", 9999)], 5).unwrap_err()),
            "listen_port"
        );
        assert_eq!(
            field(validate_ports(&[p("web", 50001)], 5).unwrap_err()),
            "listen_port"
        );
        assert_eq!(
            field(validate_ports(&[p("ADB", 20000)], 5).unwrap_err()),
            "name"
        );
        assert_eq!(
            field(validate_ports(&[p("vnc", 20000)], 5).unwrap_err()),
            "name"
        );
        assert_eq!(
            field(validate_ports(&[p("a", 20000), p("b", 20000)], 5).unwrap_err()),
            "listen_port"
        );
        assert_eq!(
            field(validate_ports(&[p("a", 20000), p("a", 20001)], 5).unwrap_err()),
            "name"
        );
        assert_eq!(
            field(validate_ports(&[p("a", 20000), p("b", 20001)], 1).unwrap_err()),
            "ports"
        );
        assert_eq!(
            field(validate_ports(&[p("a234567890abcdefg", 20000)], 5).unwrap_err()),
            "name"
        );
        let adb = PortRequest {
            name: "adb".into(),
            listen_port: 5555,
            internet_accessible: false,
            system: true,
        };
        assert!(validate_ports(&[adb, p("web", 20000)], 1).is_ok());
    }

    #[test]
    fn bandwidth_rules() {
        assert_eq!(
            validate_bandwidth_limit(-1).unwrap(),
            BandwidthLimit::Unlimited
        );
        assert_eq!(
            validate_bandwidth_limit(1).unwrap(),
            BandwidthLimit::Kbit(1)
        );
        assert_eq!(
            validate_bandwidth_limit(99_999_999).unwrap(),
            BandwidthLimit::Kbit(99_999_999)
        );
        for bad in [0, -2, 100_000_000] {
            assert_eq!(
                field(validate_bandwidth_limit(bad).unwrap_err()),
                "com.cph.bandwidth_limit"
            );
        }
        for ok in [1, 300, 350, 1000, 1500, 2000] {
            assert_eq!(validate_shared_bandwidth(ok).unwrap(), ok);
        }
        for bad in [0, 301, 1010, 1200, 2500] {
            assert_eq!(
                field(validate_shared_bandwidth(bad).unwrap_err()),
                "band_width_size"
            );
        }
    }
}
