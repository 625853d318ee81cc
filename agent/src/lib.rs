//! `cph-agent`: the node service of a cloud phone host.
//!
//! It runs on every bare-metal server under systemd, owns that server's
//! phones through `cph-runtime`, registers and heartbeats with the control
//! plane, and executes the jobs the CPH API asks of a phone or a server.

pub mod apk;
pub mod config;
pub mod connect;
pub mod daemon;
pub mod memory;
pub mod metrics;
pub mod objstore;
pub mod property;
pub mod protocol;
pub mod telemetry;
pub mod tls;
