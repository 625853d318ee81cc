//! Phone networking on a host: a Linux bridge per agent carries a phone
//! subnet; each phone gets a veth pair into its network namespace with a
//! static address and a default route through the bridge (or through the
//! encoding container when its traffic is diverted), and egress is
//! masqueraded by the host.
//!
//! Inbound access goes through one nftables table owned by the agent: a DNAT
//! rule over a map `server ip . access port : phone ip . listen port`, so a
//! lookup costs the same at 40,000 mappings as at one. The table is written
//! whole with `nft -f -`; a phone's change is one atomic netlink batch of map
//! elements ([`nfnl`]), with no process start. Downloads towards phones are shaped by
//! an HTB tree on the bridge: the server class carries the shared bandwidth,
//! each phone a child class capped at its `com.cph.bandwidth_limit`.
//! Planning (ports, addresses, rule and class text) is pure; [`NetManager`]
//! applies the plans and persists its state so a restart can reconcile.

pub mod cmd;
mod config;
mod manager;
pub mod nfnl;
pub mod nft;
mod state;
pub mod tc;
pub mod testbed;
mod validate;

pub use config::{Ipv4Net, NetConfig};
pub use manager::NetManager;
pub use state::{
    phones_dir, AccessInfo, BandwidthLimit, NetState, PhoneNet, PortMapping, PortRequest,
    TrafficType,
};
pub use validate::{
    validate_bandwidth_limit, validate_ports, validate_shared_bandwidth, MAX_LISTEN_PORT,
    MIN_LISTEN_PORT, RESERVED_PORT_NAMES,
};

use std::path::PathBuf;

/// Errors of phone networking. Validation errors name the offending field.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("access port range {first}-{last} is exhausted")]
    PortsExhausted { first: u16, last: u16 },
    #[error("phone subnet {subnet} has no free address")]
    AddressesExhausted { subnet: String },
    #[error("phone {phone_id} is not known to the network state")]
    UnknownPhone { phone_id: String },
    #[error("phone {phone_id} already has a network")]
    PhoneExists { phone_id: String },
    #[error("cannot open network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed with status {status}: {stderr}")]
    Command {
        command: String,
        status: i32,
        stderr: String,
    },
    #[error("network state file {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("network state file {path} is corrupt: {source}")]
    StateCorrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the kernel lacks {feature}: {detail}")]
    KernelLacks {
        feature: &'static str,
        detail: String,
    },
}

/// A refused or failed netlink batch. It maps onto the existing variants
/// so callers that match [`NetError`] exhaustively need no change: kernel
/// refusals become [`NetError::Command`] with the errno as status and the
/// message naming table, map and element; socket trouble becomes
/// [`NetError::Spawn`].
impl From<nfnl::NfnlError> for NetError {
    fn from(e: nfnl::NfnlError) -> Self {
        let command = "nfnetlink batch".to_string();
        match e.errno() {
            Some(errno) => Self::Command {
                command,
                status: errno as i32,
                stderr: e.to_string(),
            },
            None => {
                let kind = match &e {
                    nfnl::NfnlError::Open { source, .. } => source.kind(),
                    _ => std::io::ErrorKind::Other,
                };
                Self::Spawn {
                    command,
                    source: std::io::Error::new(kind, e.to_string()),
                }
            }
        }
    }
}

impl NetError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}
