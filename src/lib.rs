//! `cph`: the control plane of the cloud phone platform and the `cph` command.
//!
//! It serves the Huawei Cloud Phone Host (CPH) REST API over a fleet of hosts,
//! each run by a `cph-agent`, and `cph up` runs a whole platform on one machine.

pub mod admin;
pub mod api;
pub mod auth;
pub mod catalog;
pub mod client;
pub mod dispatch;
pub mod events;
pub mod serve;
pub mod store;
pub mod up;
