//! Phone networking of the agent over `cph-runtime`'s [`NetManager`]: each
//! phone gets a named network namespace (`/run/netns/cph-<phone>`; the
//! config's `netns_prefix` in place of `cph-`) that its container joins,
//! a veth into it from the agent's bridge with an address of the phone
//! subnet, its server's ports plus ADB and VNC mapped to host access
//! ports (nftables DNAT on the server address), and a tc class capped at
//! its `com.cph.bandwidth_limit` under the server's shared
//! bandwidth. The namespace outlives container restarts, so the network is
//! plumbed once, before the phone first starts.
//!
//! The manager's state (`<state_dir>/network.json` and one file per phone
//! in `<state_dir>/network.phones/`) is the source of truth: at open the
//! host side (bridge, table, tc tree) is rebuilt from it and links of ours
//! it does not know are deleted.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use cph_runtime::container::{netns, ContainerError};
use cph_runtime::net::cmd::{self, Runner, SystemRunner};
use cph_runtime::net::{
    validate_bandwidth_limit, Ipv4Net, NetConfig, NetError, NetManager, PhoneNet, PortRequest,
    TrafficType,
};

use super::phones::prefixed_name;
use super::JobFailure;
use crate::config::{AgentConfig, NetworkConfig};
use crate::protocol::{AccessInfo, PortSpec, ENCODER_FIRST_PORT, ENCODER_MAX_PORTS};

/// Port ADB listens on inside a phone.
pub const ADB_PORT: u16 = 5555;
/// Port the phone's VNC server listens on.
pub const VNC_PORT: u16 = 5900;
/// Server-wide shared bandwidth until a server names one, Mbit/s.
pub const DEFAULT_SHARED_BANDWIDTH_MBIT: u32 = 300;
/// User ports a phone may map (the reference's limit).
pub const MAX_USER_PORTS: usize = 10;

/// Errors of the agent's phone networking.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network config {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("traffic type {0:?} is neither direct nor routing")]
    TrafficType(String),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("network namespace of phone {phone_id}: {source}")]
    Netns {
        phone_id: String,
        source: ContainerError,
    },
}

/// A networking error as a job failure, with the reference's parameter
/// codes for invalid input.
pub fn network_fail(e: NetworkError) -> JobFailure {
    let code = match &e {
        NetworkError::TrafficType(_) => "CPS.0207",
        NetworkError::Net(NetError::Invalid { field, .. }) => match *field {
            "ports" => "CPS.0145",
            "name" => "CPS.0038",
            "listen_port" => "CPS.0040",
            "band_width_size" => "CPS.0036",
            "com.cph.bandwidth_limit" => "CPS.0164",
            "traffic_type" => "CPS.0207",
            _ => "CPS.0003",
        },
        NetworkError::Config { .. }
        | NetworkError::Netns { .. }
        | NetworkError::Net(
            NetError::PortsExhausted { .. }
            | NetError::AddressesExhausted { .. }
            | NetError::UnknownPhone { .. }
            | NetError::PhoneExists { .. }
            | NetError::Netns { .. }
            | NetError::Spawn { .. }
            | NetError::Command { .. }
            | NetError::State { .. }
            | NetError::StateCorrupt { .. }
            | NetError::KernelLacks { .. },
        ) => "CPS.0003",
    };
    JobFailure::new(code, format!("network: {e}"))
}

/// The host's phone networking.
pub struct Network {
    mgr: Mutex<NetManager>,
    encoder_ip: Ipv4Addr,
    /// Of the phones' named namespaces (the config's `netns_prefix`).
    netns_prefix: String,
}

fn config_err(field: &'static str, reason: impl Into<String>) -> NetworkError {
    NetworkError::Config {
        field,
        reason: reason.into(),
    }
}

fn parse_net(field: &'static str, text: &str) -> Result<Ipv4Net, NetworkError> {
    text.parse::<Ipv4Net>()
        .map_err(|e| config_err(field, format!("{text:?}: {e}")))
}

fn parse_ip(field: &'static str, text: &str) -> Result<Ipv4Addr, NetworkError> {
    text.parse::<Ipv4Addr>()
        .map_err(|_| config_err(field, format!("{text:?} is not an ipv4 address")))
}

/// The address the host reaches the outside from (the default route's
/// source); found with a UDP `connect`, which sends nothing.
fn primary_ipv4() -> Option<Ipv4Addr> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    sock.connect((Ipv4Addr::new(192, 0, 2, 1), 9)).ok()?;
    match sock.local_addr().ok()?.ip() {
        std::net::IpAddr::V4(ip) => Some(ip),
        std::net::IpAddr::V6(_) => None,
    }
}

/// The address access ports are mapped on: the configured `server_ip`, the
/// listen address, the host's primary address, or else the bridge's, the
/// first that is a routable IPv4 address (DNAT cannot use loopback).
pub fn pick_server_ip(
    configured: Option<&str>,
    listen: &str,
    primary: Option<Ipv4Addr>,
    bridge: Ipv4Addr,
) -> Ipv4Addr {
    let usable = |ip: &Ipv4Addr| !ip.is_loopback() && !ip.is_unspecified();
    let listen_host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
    configured
        .and_then(|s| s.parse::<Ipv4Addr>().ok())
        .filter(usable)
        .or_else(|| listen_host.parse::<Ipv4Addr>().ok().filter(usable))
        .or_else(|| primary.filter(usable))
        .unwrap_or(bridge)
}

/// The runtime's network settings for this agent's configuration.
pub fn net_config(
    cfg: &NetworkConfig,
    state_dir: &Path,
    server_ip: Ipv4Addr,
) -> Result<NetConfig, NetworkError> {
    if cfg.veth_prefix.ends_with(|c: char| c.is_ascii_digit()) {
        return Err(config_err(
            "veth_prefix",
            format!("{:?} must not end in a digit", cfg.veth_prefix),
        ));
    }
    let private_prefixes = cfg
        .private_prefixes
        .iter()
        .map(|p| parse_net("private_prefixes", p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NetConfig {
        table: cfg.nft_table.clone(),
        bridge: cfg.bridge.clone(),
        veth_prefix: cfg.veth_prefix.clone(),
        subnet: parse_net("subnet", &cfg.subnet)?,
        server_ip,
        public_ip: cfg
            .public_ip
            .as_deref()
            .map(|p| parse_ip("public_ip", p))
            .transpose()?,
        private_prefixes,
        access_port_first: cfg.access_port_first,
        access_port_last: cfg.access_port_last,
        max_ports_per_phone: MAX_USER_PORTS,
        state_path: state_dir.join("network.json"),
        host_netns: None,
    })
}

/// The encoding container's address: configured, or the subnet's last host.
fn encoder_ip(cfg: &NetworkConfig, subnet: Ipv4Net) -> Result<Ipv4Addr, NetworkError> {
    if let Some(ip) = &cfg.encoder_ip {
        return parse_ip("encoder_ip", ip);
    }
    let hosts = (1u64 << (32 - u32::from(subnet.prefix))).saturating_sub(2);
    u32::try_from(hosts)
        .ok()
        .and_then(|n| subnet.host(n))
        .ok_or_else(|| config_err("subnet", format!("{subnet} has no room for an encoder")))
}

/// The ports a phone maps: ADB and VNC (private network only), then the
/// server's user ports.
pub fn port_requests(ports: &[PortSpec]) -> Vec<PortRequest> {
    let system = [("adb", ADB_PORT), ("vnc", VNC_PORT)]
        .into_iter()
        .map(|(name, port)| PortRequest {
            name: name.to_string(),
            listen_port: port,
            internet_accessible: false,
            system: true,
        });
    system
        .chain(ports.iter().map(|p| PortRequest {
            name: p.name.clone(),
            listen_port: p.listen_port,
            internet_accessible: p.internet_accessible,
            system: false,
        }))
        .collect()
}

/// The ports of an encoding server serving `n`: `port1` on
/// [`ENCODER_FIRST_PORT`] and up, reachable from the internet. They are
/// the platform's own, outside the range of a server's user ports.
pub fn encoder_port_requests(n: u16) -> Vec<PortRequest> {
    (0..n.min(ENCODER_MAX_PORTS))
        .map(|i| PortRequest {
            name: format!("port{}", i + 1),
            listen_port: ENCODER_FIRST_PORT + i,
            internet_accessible: true,
            system: true,
        })
        .collect()
}

/// The protocol's view of a phone's mappings.
fn access_infos_of(p: &PhoneNet) -> Vec<AccessInfo> {
    p.ports
        .iter()
        .map(|m| AccessInfo {
            kind: m.name.clone(),
            phone_ip: p.ip.to_string(),
            listen_port: m.listen_port,
            access_port: m.access_port,
            internet_accessible: m.internet_accessible,
        })
        .collect()
}

/// Brings the network of a known phone (or encoding container) to its
/// namespace at `path` and the `wanted` ports: re-plumbed when the
/// namespace is new (`fresh`) or another, or its veth is gone (host
/// reboot); its ports set when they differ.
fn keep_plumbed(
    mgr: &mut NetManager,
    known: &PhoneNet,
    path: &Path,
    fresh: bool,
    wanted: &[PortRequest],
) -> Result<(), NetError> {
    let id = known.phone_id.as_str();
    if fresh || known.netns != path || !mgr.host_links()?.contains(&known.host_if) {
        tracing::info!(phone_id = id, "re-plumbing the phone's network");
        mgr.attach_phone(id, path)?;
    }
    if !same_ports(known, wanted) {
        mgr.set_ports(id, wanted)?;
    }
    Ok(())
}

fn same_ports(p: &PhoneNet, wanted: &[PortRequest]) -> bool {
    p.ports.len() == wanted.len()
        && p.ports.iter().zip(wanted).all(|(m, w)| {
            m.name == w.name
                && m.listen_port == w.listen_port
                && m.internet_accessible == w.internet_accessible
                && m.system == w.system
        })
}

/// The named network namespace of a phone (or encoding container):
/// made when missing (a stale non-namespace file in its place is removed
/// first). Returns its name, path and whether it was made now.
fn own_netns(prefix: &str, id: &str) -> Result<(String, PathBuf, bool), NetworkError> {
    let name = prefixed_name(prefix, id);
    let path = netns::path(&name);
    if netns::is_netns(&path) {
        return Ok((name, path, false));
    }
    let ns_err = |source| NetworkError::Netns {
        phone_id: id.to_string(),
        source,
    };
    if path.exists() {
        netns::remove(&name).map_err(ns_err)?;
    }
    netns::create(&name).map_err(ns_err)?;
    Ok((name, path, true))
}

impl Network {
    /// Opens the manager over its state file and brings the host side in
    /// line with it (bridge, nftables table, tc tree; stale links deleted).
    pub fn open(cfg: &AgentConfig) -> Result<Self, NetworkError> {
        let subnet = parse_net("subnet", &cfg.network.subnet)?;
        let bridge_ip = subnet
            .host(1)
            .ok_or_else(|| config_err("subnet", format!("{subnet} has no host address")))?;
        let server_ip = pick_server_ip(
            cfg.server_ip.as_deref(),
            &cfg.listen,
            primary_ipv4(),
            bridge_ip,
        );
        let net_cfg = net_config(&cfg.network, &cfg.state_dir, server_ip)?;
        let mut mgr = NetManager::open(net_cfg, DEFAULT_SHARED_BANDWIDTH_MBIT)?;
        mgr.reconcile()?;
        tracing::info!(
            bridge = %cfg.network.bridge,
            subnet = %subnet,
            server_ip = %server_ip,
            phones = mgr.state().phones.len(),
            "phone network ready"
        );
        Ok(Self {
            mgr: Mutex::new(mgr),
            encoder_ip: encoder_ip(&cfg.network, subnet)?,
            netns_prefix: cfg.network.netns_prefix.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, NetManager> {
        self.mgr.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The address access ports are mapped on.
    pub fn server_ip(&self) -> Ipv4Addr {
        self.lock().config().server_ip
    }

    /// The name of the phone's network namespace.
    fn netns_name(&self, phone_id: &str) -> String {
        prefixed_name(&self.netns_prefix, phone_id)
    }

    /// Makes sure the phone has its namespace and network: created the
    /// first time; re-plumbed when the namespace or the veth is gone (host
    /// reboot); ports and bandwidth limit brought to what is asked. Returns
    /// the namespace for the container to join.
    pub fn ensure_phone(
        &self,
        phone_id: &str,
        ports: &[PortSpec],
        bandwidth_kbit: i64,
    ) -> Result<PathBuf, NetworkError> {
        let (name, path, fresh) = own_netns(&self.netns_prefix, phone_id)?;
        let mut mgr = self.lock();
        let wanted = port_requests(ports);
        let Some(known) = mgr.phone(phone_id).cloned() else {
            if let Err(e) = mgr.add_phone(phone_id, &path, &wanted, bandwidth_kbit) {
                if fresh {
                    let _ = netns::remove(&name);
                }
                return Err(e.into());
            }
            return Ok(path);
        };
        keep_plumbed(&mut mgr, &known, &path, fresh, &wanted)?;
        if known.bandwidth != validate_bandwidth_limit(bandwidth_kbit)? {
            mgr.set_bandwidth_limit(phone_id, bandwidth_kbit)?;
        }
        Ok(path)
    }

    /// The encoding container's network: its namespace with the encoder
    /// address of the subnet (the `routing` gateway of phones), forwarding
    /// on and redirects off inside it, so phones' traffic passes through it
    /// to the host; its `ports` mapped like a phone's user ports. Made the
    /// first time, re-plumbed after a host reboot.
    pub fn ensure_encoder(&self, encoder_id: &str, ports: u16) -> Result<PathBuf, NetworkError> {
        let (name, path, fresh) = own_netns(&self.netns_prefix, encoder_id)?;
        let mut mgr = self.lock();
        let wanted = encoder_port_requests(ports);
        let plumbed = match mgr.phone(encoder_id).cloned() {
            None => mgr
                .add_phone_at(encoder_id, &path, self.encoder_ip, &wanted, -1)
                .map(drop),
            Some(known) => keep_plumbed(&mut mgr, &known, &path, fresh, &wanted),
        };
        if let Err(e) = plumbed {
            if fresh {
                let _ = netns::remove(&name);
            }
            return Err(e.into());
        }
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.eth0.send_redirects", "0"),
        ] {
            SystemRunner.run(&cmd::sysctl(key, value).in_netns(Some(&path)))?;
        }
        Ok(path)
    }

    /// The encoding container's address on the phone subnet.
    pub fn encoder_ip(&self) -> Ipv4Addr {
        self.encoder_ip
    }

    /// Removes the phone's network and namespace (nothing when it has none).
    pub fn remove_phone(&self, phone_id: &str) -> Result<(), NetworkError> {
        let mut mgr = self.lock();
        if mgr.phone(phone_id).is_some() {
            mgr.remove_phone(phone_id)?;
        }
        let name = self.netns_name(phone_id);
        match netns::remove(&name) {
            Ok(()) | Err(ContainerError::NotFound { .. }) => Ok(()),
            Err(source) => Err(NetworkError::Netns {
                phone_id: phone_id.to_string(),
                source,
            }),
        }
    }

    /// Takes the whole phone network down: every phone's links and
    /// namespace, the nftables table, the bridge and the state file.
    pub fn teardown(&self) -> Result<(), NetworkError> {
        let mut mgr = self.lock();
        let ids: Vec<String> = mgr.state().phones.keys().cloned().collect();
        mgr.teardown()?;
        for id in ids {
            match netns::remove(&self.netns_name(&id)) {
                Ok(()) | Err(ContainerError::NotFound { .. }) => {}
                Err(source) => {
                    return Err(NetworkError::Netns {
                        phone_id: id,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Removes the network of every phone not in `keep` (left by a delete
    /// that did not finish).
    pub fn retain_phones(&self, keep: &BTreeSet<String>) {
        let stale: Vec<String> = self
            .lock()
            .state()
            .phones
            .keys()
            .filter(|id| !keep.contains(*id))
            .cloned()
            .collect();
        for phone_id in stale {
            tracing::warn!(phone_id = %phone_id, "removing the network of an unknown phone");
            if let Err(e) = self.remove_phone(&phone_id) {
                tracing::warn!(phone_id = %phone_id, error = %e, "stale phone network not removed");
            }
        }
    }

    /// Bytes the phone has received and sent, from the counters of its
    /// veth's host side (what the host sends it is what it receives);
    /// `None` for a phone without a network.
    pub fn traffic(&self, phone_id: &str) -> Option<(u64, u64)> {
        let host_if = self.lock().phone(phone_id)?.host_if.clone();
        let read = |name: &str| -> Option<u64> {
            let path = format!("/sys/class/net/{host_if}/statistics/{name}");
            std::fs::read_to_string(path).ok()?.trim().parse().ok()
        };
        Some((read("tx_bytes")?, read("rx_bytes")?))
    }

    /// The phone's mapped ports as the protocol reports them.
    pub fn access_infos(&self, phone_id: &str) -> Vec<AccessInfo> {
        self.lock()
            .phone(phone_id)
            .map(access_infos_of)
            .unwrap_or_default()
    }

    /// Changes a phone's download limit live (kbit/s, -1 unlimited); a
    /// phone without a network gets it when its network is made.
    pub fn set_bandwidth_limit(&self, phone_id: &str, kbit: i64) -> Result<(), NetworkError> {
        let mut mgr = self.lock();
        if mgr.phone(phone_id).is_none() {
            validate_bandwidth_limit(kbit)?;
            return Ok(());
        }
        mgr.set_bandwidth_limit(phone_id, kbit)?;
        Ok(())
    }

    /// Changes the server-wide shared bandwidth (Mbit/s) when it differs.
    pub fn set_shared_bandwidth(&self, mbit: u32) -> Result<(), NetworkError> {
        let mut mgr = self.lock();
        if mgr.state().shared_bandwidth_mbit != mbit {
            mgr.set_shared_bandwidth(mbit)?;
        }
        Ok(())
    }

    /// Points the phone's default route at the bridge (`direct`) or at the
    /// encoding container (`routing`).
    pub fn set_traffic(&self, phone_id: &str, traffic_type: &str) -> Result<(), NetworkError> {
        let traffic = match traffic_type {
            "direct" => TrafficType::Direct,
            "routing" => TrafficType::Routing(self.encoder_ip),
            other => return Err(NetworkError::TrafficType(other.to_string())),
        };
        self.lock().set_traffic(phone_id, traffic)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_ip_skips_loopback_and_falls_back_to_the_bridge() {
        let bridge = Ipv4Addr::new(172, 31, 0, 1);
        let primary = Some(Ipv4Addr::new(192, 0, 2, 2));
        assert_eq!(
            pick_server_ip(Some("10.1.2.3"), "127.0.0.1:8600", primary, bridge),
            Ipv4Addr::new(10, 1, 2, 3)
        );
        assert_eq!(
            pick_server_ip(Some("127.0.0.1"), "127.0.0.1:8600", primary, bridge),
            Ipv4Addr::new(192, 0, 2, 2)
        );
        assert_eq!(
            pick_server_ip(None, "10.9.9.9:8600", primary, bridge),
            Ipv4Addr::new(10, 9, 9, 9)
        );
        assert_eq!(pick_server_ip(None, "0.0.0.0:8600", None, bridge), bridge);
    }

    #[test]
    fn config_maps_onto_the_runtime_settings() {
        let cfg = NetworkConfig::default();
        let n = net_config(&cfg, Path::new("/srv/cph"), Ipv4Addr::new(192, 0, 2, 2))
            .expect("default config is valid");
        assert_eq!(n.bridge, "cph0");
        assert_eq!(n.subnet.to_string(), "172.31.0.0/24");
        assert_eq!(n.state_path, Path::new("/srv/cph/network.json"));
        assert_eq!(n.private_prefixes.len(), 3);
        assert_eq!(
            encoder_ip(&cfg, n.subnet).expect("encoder"),
            Ipv4Addr::new(172, 31, 0, 254)
        );
        let bad = NetworkConfig {
            veth_prefix: "cphv1".into(),
            ..NetworkConfig::default()
        };
        assert!(net_config(&bad, Path::new("/x"), Ipv4Addr::LOCALHOST).is_err());
        let bad = NetworkConfig {
            subnet: "172.31.0.0".into(),
            ..NetworkConfig::default()
        };
        assert!(net_config(&bad, Path::new("/x"), Ipv4Addr::LOCALHOST).is_err());
    }

    #[test]
    fn phones_map_adb_and_vnc_before_their_user_ports() {
        let reqs = port_requests(&[PortSpec {
            name: "web".into(),
            listen_port: 20000,
            internet_accessible: true,
        }]);
        let names: Vec<&str> = reqs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["adb", "vnc", "web"]);
        assert!(reqs[0].system && !reqs[0].internet_accessible);
        assert!(!reqs[2].system && reqs[2].internet_accessible);
    }

    #[test]
    fn invalid_input_keeps_the_reference_codes() {
        let f = network_fail(NetworkError::TrafficType("x".into()));
        assert_eq!(f.code, "CPS.0207");
        let f = network_fail(NetworkError::Net(NetError::Invalid {
            field: "band_width_size",
            reason: "301".into(),
        }));
        assert_eq!(f.code, "CPS.0036");
        let f = network_fail(NetworkError::Net(NetError::PortsExhausted {
            first: 1,
            last: 2,
        }));
        assert_eq!(f.code, "CPS.0003");
    }
}
