//! Placement: which CPUs, NUMA node and GPU each phone slot of a host gets.
//!
//! A phone flavor names a `core_bind_strategy` and a `phone_capacity`. The
//! planner turns the host's topology (read from sysfs) and the flavor into a
//! deterministic plan, one entry per slot, the way the kubelet's CPU, memory
//! and topology managers place pods, but for dense phone hosting: phones of a
//! node share cores at a bounded ratio, stay inside one NUMA node and one
//! cluster when they fit, and GPUs carry equal numbers of phones, local ones
//! first. The plan is checkpointed with the host's fingerprint so a phone
//! keeps its cores across agent restarts and reboots.

pub mod checkpoint;
pub mod cpulist;
pub mod gpu;
pub mod plan;
pub mod report;
pub mod strategy;
pub mod synth;
pub mod topology;

use std::path::PathBuf;

pub use checkpoint::{Checkpoint, Loaded};
pub use plan::{plan, Plan, PlanRequest, Slot};
pub use report::{figures, Figures};
pub use strategy::Strategy;
pub use topology::{Cpu, Gpu, Node, Topology};

/// Errors of placement.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("cannot read {path}: {source}")]
    Sysfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid cpu list {text:?}")]
    CpuList { text: String },
    #[error("unknown core_bind_strategy {name:?}; known strategies: {known}")]
    UnknownStrategy { name: String, known: &'static str },
    #[error(
        "core_bind_strategy {name:?} does not match the flavor's phone_capacity {capacity}; \
         known strategies: {known}"
    )]
    CapacityMismatch {
        name: String,
        capacity: u32,
        known: &'static str,
    },
    #[error("placement does not fit: {reason}")]
    Insufficient { reason: String },
    #[error("invalid placement request: {reason}")]
    Invalid { reason: String },
    #[error("placement checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
}
