//! Host-wide network settings of an agent.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::NetError;

/// An IPv4 prefix such as `10.201.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, NetError> {
        if prefix > 32 {
            return Err(NetError::invalid(
                "subnet",
                format!("prefix /{prefix} > 32"),
            ));
        }
        Ok(Self { addr, prefix })
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The `n`-th address after the network address.
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix));
        // Exclude the broadcast address.
        if u64::from(n) + 1 >= size {
            return None;
        }
        Some(Ipv4Addr::from(u32::from(self.network()) + n))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| NetError::invalid("subnet", format!("{s} has no /prefix")))?;
        let addr = a
            .parse()
            .map_err(|_| NetError::invalid("subnet", format!("{a} is not an ipv4 address")))?;
        let prefix = p
            .parse()
            .map_err(|_| NetError::invalid("subnet", format!("{p} is not a prefix length")))?;
        Self::new(addr, prefix)
    }
}

/// Network settings of one agent. Names (table, bridge, veth prefix) are
/// owned by the agent: nothing else on the host is touched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The agent's nftables table (family `ip`).
    pub table: String,
    /// The host bridge carrying the phone subnet.
    pub bridge: String,
    /// Prefix of host-side veth names; the phone's slot index follows.
    pub veth_prefix: String,
    /// Phone subnet; the bridge takes the first host address.
    pub subnet: Ipv4Net,
    /// The server's internal address: access ports are mapped on it.
    pub server_ip: Ipv4Addr,
    /// The public address shown for internet-accessible ports.
    pub public_ip: Option<Ipv4Addr>,
    /// Source prefixes of the server's private network, the only ones that
    /// reach ports that are not internet accessible.
    pub private_prefixes: Vec<Ipv4Net>,
    /// Inclusive range of host access ports.
    pub access_port_first: u16,
    pub access_port_last: u16,
    /// Most user ports a phone may map (the flavor's limit).
    pub max_ports_per_phone: usize,
    /// Where the allocator and phone state persist (JSON).
    pub state_path: PathBuf,
    /// The network namespace holding the host side; `None` is the agent's
    /// own (production). Tests use a private namespace.
    pub host_netns: Option<PathBuf>,
}

impl NetConfig {
    /// The bridge's address: the first host address of the subnet.
    pub fn bridge_ip(&self) -> Option<Ipv4Addr> {
        self.subnet.host(1)
    }

    /// The IFB device uploads are shaped on: the bridge's name and `-up`.
    pub fn upload_dev(&self) -> String {
        format!("{}-up", self.bridge)
    }

    /// The devices whose HTB trees shape phones: the bridge (downloads)
    /// and [`Self::upload_dev`] (uploads).
    pub fn shaped_devs(&self) -> [String; 2] {
        [self.bridge.clone(), self.upload_dev()]
    }

    /// Host-side veth name of the phone in slot `index`.
    pub fn veth_name(&self, index: u32) -> String {
        format!("{}{}", self.veth_prefix, index)
    }

    pub(crate) fn check(&self) -> Result<(), NetError> {
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 15
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if !name_ok(&self.table) {
            return Err(NetError::invalid(
                "table",
                format!("{:?} is not a valid name", self.table),
            ));
        }
        if !name_ok(&self.bridge) || self.bridge.len() > 12 {
            return Err(NetError::invalid(
                "bridge",
                format!(
                    "{:?} must be 1-12 name characters (its upload device adds \"-up\")",
                    self.bridge
                ),
            ));
        }
        if !name_ok(&self.veth_prefix) || self.veth_prefix.len() > 10 {
            return Err(NetError::invalid(
                "veth_prefix",
                format!("{:?} must be 1-10 name characters", self.veth_prefix),
            ));
        }
        if self.subnet.prefix > 30 {
            return Err(NetError::invalid(
                "subnet",
                format!("{} is too small", self.subnet),
            ));
        }
        if self.access_port_first == 0 || self.access_port_first > self.access_port_last {
            return Err(NetError::invalid(
                "access_port_range",
                format!(
                    "{}-{} is empty",
                    self.access_port_first, self.access_port_last
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_hosts_skip_network_and_broadcast() {
        let n: Ipv4Net = "10.201.3.7/24".parse().unwrap();
        assert_eq!(n.network(), Ipv4Addr::new(10, 201, 3, 0));
        assert_eq!(n.host(1), Some(Ipv4Addr::new(10, 201, 3, 1)));
        assert_eq!(n.host(254), Some(Ipv4Addr::new(10, 201, 3, 254)));
        assert_eq!(n.host(255), None);
        assert!(n.contains(Ipv4Addr::new(10, 201, 3, 200)));
        assert!(!n.contains(Ipv4Addr::new(10, 201, 4, 1)));
        assert_eq!(n.to_string(), "10.201.3.0/24");
        assert!("10.0.0.0".parse::<Ipv4Net>().is_err());
    }
}
