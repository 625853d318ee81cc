//! Core-binding strategies, named by a phone flavor's `core_bind_strategy`.
//!
//! | name | phones per CPU (R) | NUMA | cpuset |
//! |---|---|---|---|
//! | `common_hosted_c{N}` | ceil(N·v / usable CPUs), at most 4 | spread | seats tiled in a cluster |
//! | `lxc_qemu_common_hosted_c{N}` | as above; QEMU vCPU i runs on `cpus[i]` | spread | as above |
//! | `exclusive_c{N}` | 1, whole cores, SMT siblings never split | pack | whole cores |
//! | `numa_spread_r{R}` / `numa_pack_r{R}` | R (1-8) | spread / pack | seats tiled in a cluster |
//! | `shared_numa` | CFS quota of v CPUs over the node's CPUs, at most 4 v per CPU | spread | the whole node |
//! | `dev_small` | ceil(N·v / usable CPUs), at most 8; nothing reserved | one node | seats tiled |
//!
//! For `_c{N}` names N must equal the flavor's `phone_capacity`.

use serde::{Deserialize, Serialize};

use super::PlacementError;

/// Highest phones-per-CPU ratio the hosted strategies accept.
pub const MAX_HOSTED_RATIO: u32 = 4;
/// Highest ratio of `dev_small` and the explicit `_r{R}` strategies.
pub const MAX_RATIO: u32 = 8;
/// The strategy names, as listed in errors.
pub const KNOWN: &str = "common_hosted_c{N}, lxc_qemu_common_hosted_c{N}, exclusive_c{N}, \
numa_spread_r{R}, numa_pack_r{R}, shared_numa, dev_small";

/// How phones are spread over NUMA nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NumaPolicy {
    /// In proportion to each node's usable CPUs.
    Spread,
    /// Fill nodes in id order.
    Pack,
    /// Only the node with the most usable CPUs.
    Single,
}

/// How a phone's cpuset is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuPolicy {
    /// Seat tiling: each CPU offers R seats, a phone takes v consecutive seats.
    Tiled,
    /// Whole cores, one phone per core.
    Exclusive,
    /// All usable CPUs of the node, limited by a CFS quota of v CPUs.
    SharedNode,
}

/// A parsed strategy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Strategy {
    pub name: String,
    pub numa: NumaPolicy,
    pub cpu: CpuPolicy,
    /// Explicit phones-per-CPU ratio, or `None` when derived from the capacity.
    pub ratio: Option<u32>,
    /// Largest derived ratio accepted.
    pub max_ratio: u32,
    /// Whether the default reserved set (first CPU of each node) applies.
    pub reserve_by_default: bool,
}

impl Strategy {
    /// Parses a `core_bind_strategy` for a flavor of `capacity` phones.
    pub fn parse(name: &str, capacity: u32) -> Result<Self, PlacementError> {
        let unknown = || PlacementError::UnknownStrategy {
            name: name.to_string(),
            known: KNOWN,
        };
        let with_n = |prefix: &str| -> Result<Option<u32>, PlacementError> {
            match name.strip_prefix(prefix) {
                None => Ok(None),
                Some(n) => {
                    let n: u32 = n.parse().map_err(|_| unknown())?;
                    if n != capacity {
                        return Err(PlacementError::CapacityMismatch {
                            name: name.to_string(),
                            capacity,
                            known: KNOWN,
                        });
                    }
                    Ok(Some(n))
                }
            }
        };
        let ratio = |prefix: &str| -> Result<Option<u32>, PlacementError> {
            match name.strip_prefix(prefix) {
                None => Ok(None),
                Some(r) => match r.parse::<u32>() {
                    Ok(r) if (1..=MAX_RATIO).contains(&r) => Ok(Some(r)),
                    _ => Err(unknown()),
                },
            }
        };
        let s = |numa, cpu, ratio, max_ratio, reserve_by_default| Self {
            name: name.to_string(),
            numa,
            cpu,
            ratio,
            max_ratio,
            reserve_by_default,
        };
        use CpuPolicy::*;
        use NumaPolicy::*;
        if with_n("lxc_qemu_common_hosted_c")?.is_some() || with_n("common_hosted_c")?.is_some() {
            return Ok(s(Spread, Tiled, None, MAX_HOSTED_RATIO, true));
        }
        if with_n("exclusive_c")?.is_some() {
            return Ok(s(Pack, Exclusive, Some(1), 1, true));
        }
        if let Some(r) = ratio("numa_spread_r")? {
            return Ok(s(Spread, Tiled, Some(r), r, true));
        }
        if let Some(r) = ratio("numa_pack_r")? {
            return Ok(s(Pack, Tiled, Some(r), r, true));
        }
        match name {
            "shared_numa" => Ok(s(Spread, SharedNode, None, MAX_HOSTED_RATIO, true)),
            "dev_small" => Ok(s(Single, Tiled, None, MAX_RATIO, false)),
            _ => Err(unknown()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_names_parse() {
        assert_eq!(
            Strategy::parse("common_hosted_c60", 60).expect("c60").cpu,
            CpuPolicy::Tiled
        );
        assert_eq!(
            Strategy::parse("lxc_qemu_common_hosted_c60", 60)
                .expect("qemu")
                .numa,
            NumaPolicy::Spread
        );
        assert_eq!(
            Strategy::parse("exclusive_c8", 8).expect("ex").ratio,
            Some(1)
        );
        assert_eq!(
            Strategy::parse("numa_pack_r3", 10).expect("pack").numa,
            NumaPolicy::Pack
        );
        assert!(
            !Strategy::parse("dev_small", 2)
                .expect("dev")
                .reserve_by_default
        );
    }

    #[test]
    fn unknown_and_mismatched_names_list_the_known_ones() {
        let e = Strategy::parse("fastest", 60).expect_err("unknown");
        assert!(e.to_string().contains("common_hosted_c{N}"), "{e}");
        let e = Strategy::parse("common_hosted_c60", 20).expect_err("mismatch");
        assert!(e.to_string().contains("phone_capacity 20"), "{e}");
        assert!(e.to_string().contains("shared_numa"), "{e}");
        assert!(Strategy::parse("numa_spread_r0", 4).is_err());
        assert!(Strategy::parse("common_hosted_cx", 4).is_err());
    }
}
