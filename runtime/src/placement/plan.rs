//! The planner: topology + strategy + flavor -> one placement per phone slot.
//!
//! A pure function of (topology, strategy, capacity, vCPUs, memory, reserved
//! CPUs): the same inputs give the same plan, whatever order sysfs listed
//! things in. Steps: usable CPUs in canonical order; NUMA domains (one per
//! node, or the fewest nodes, most free first, for phones larger than a
//! node); domain quotas (spread by largest remainder over usable CPUs, or
//! pack); group quotas inside a domain (clusters that hold a phone, then the
//! rest of the node as one group); seat tiling inside a group; slots
//! interleaved across domains; GPUs balanced with local ones first.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::gpu;
use super::strategy::{CpuPolicy, NumaPolicy, Strategy};
use super::topology::{Cpu, Topology};
use super::{cpulist, PlacementError};

/// CFS period used for quotas, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// What to plan for: a phone flavor on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRequest {
    /// `core_bind_strategy` of the flavor.
    pub strategy: String,
    /// `phone_capacity`: phones on the host.
    pub capacity: u32,
    /// vCPUs per phone.
    pub vcpus: u32,
    /// Memory per phone in MiB (0: not checked).
    pub memory_mb: u64,
    /// CPUs kept for the agent and the encoding server; `None` for the
    /// strategy's default (first CPU of each node, or none for `dev_small`).
    pub reserved: Option<Vec<u32>>,
}

/// Where one phone slot runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub slot: u32,
    /// CPU ids of the phone's cpuset, ascending.
    pub cpus: Vec<u32>,
    /// The NUMA node holding most of the phone's CPUs.
    pub numa_node: u32,
    /// `cpuset.mems`: the nodes under `cpus`.
    pub mems: Vec<u32>,
    /// Render node of the phone's GPU (`renderD128`), if any.
    pub gpu: Option<String>,
    /// cgroup v1 `cpu.shares` (1024 per vCPU).
    pub cpu_shares: u64,
    /// cgroup v2 `cpu.weight` (100 per vCPU).
    pub cpu_weight: u64,
    /// CFS quota per period, when the strategy caps CPU time.
    pub cpu_quota_us: Option<u64>,
    pub cpu_period_us: u64,
}

impl Slot {
    /// `cpuset.cpus` text.
    pub fn cpuset(&self) -> String {
        cpulist::format(&self.cpus)
    }

    /// `cpuset.mems` text.
    pub fn mems_list(&self) -> String {
        cpulist::format(&self.mems)
    }

    /// Host path of the GPU render node to allow and bind into the phone.
    pub fn render_device(&self) -> Option<String> {
        self.gpu.as_ref().map(|g| format!("/dev/dri/{g}"))
    }
}

/// The placement of every slot of a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub fingerprint: String,
    pub strategy: String,
    pub capacity: u32,
    pub vcpus: u32,
    pub memory_mb: u64,
    /// Most phones any CPU may carry.
    pub ratio: u32,
    /// True when every phone that fits a cluster was kept inside one; false
    /// when the clusters left over by the reserved set could not hold the
    /// flavor and phones were tiled over whole nodes instead.
    pub cluster_tiled: bool,
    pub reserved: Vec<u32>,
    pub slots: Vec<Slot>,
}

/// A set of NUMA nodes phones are placed in as one unit.
struct Domain {
    cpus: Vec<Cpu>,
    groups: Vec<Group>,
    memory_mb: u64,
}

/// CPUs that phones are tiled over together (a cluster, or the rest of a node).
struct Group {
    /// For tiling: the CPUs. For exclusive: whole cores, each a list of siblings.
    cores: Vec<Vec<u32>>,
    cap: u32,
}

/// Plans every slot. Errors when the flavor cannot fit: never over-packs.
pub fn plan(topo: &Topology, req: &PlanRequest) -> Result<Plan, PlacementError> {
    if req.capacity == 0 || req.vcpus == 0 {
        return Err(PlacementError::Invalid {
            reason: format!(
                "capacity ({}) and vcpus ({}) must be at least 1",
                req.capacity, req.vcpus
            ),
        });
    }
    let strategy = Strategy::parse(&req.strategy, req.capacity)?;
    let reserved: Vec<u32> = match &req.reserved {
        Some(r) => {
            let mut r = r.clone();
            r.sort_unstable();
            r.dedup();
            r
        }
        None if strategy.reserve_by_default => topo.default_reserved(),
        None => Vec::new(),
    };
    let reserved_set: BTreeSet<u32> = reserved.iter().copied().collect();
    let known: BTreeSet<u32> = topo.cpus.iter().map(|c| c.id).collect();
    if let Some(bad) = reserved.iter().find(|c| !known.contains(c)) {
        return Err(PlacementError::Invalid {
            reason: format!("reserved cpu {bad} is not an online cpu of this host"),
        });
    }
    let v = req.vcpus;

    // Usable CPUs per node, canonical order.
    let mut per_node: Vec<(u32, Vec<&Cpu>)> = Vec::new();
    for c in topo.cpus.iter().filter(|c| !reserved_set.contains(&c.id)) {
        match per_node.last_mut() {
            Some((n, list)) if *n == c.node => list.push(c),
            _ => per_node.push((c.node, vec![c])),
        }
    }
    if strategy.numa == NumaPolicy::Single {
        // The node with the most usable CPUs, ties to the lower id.
        let best = per_node
            .iter()
            .enumerate()
            .max_by(|(ia, a), (ib, b)| a.1.len().cmp(&b.1.len()).then(ib.cmp(ia)))
            .map(|(i, _)| i);
        per_node = best
            .map(|i| vec![per_node.swap_remove(i)])
            .unwrap_or_default();
    }
    let usable: usize = per_node.iter().map(|(_, l)| l.len()).sum();
    if usable == 0 {
        return Err(PlacementError::Insufficient {
            reason: "no usable cpu is left after the reserved set".to_string(),
        });
    }

    // The ratio to start from: explicit, or the least that offers enough seats.
    let first_ratio = match (strategy.cpu, strategy.ratio) {
        (_, Some(r)) => r,
        (CpuPolicy::SharedNode, None) => strategy.max_ratio,
        (_, None) => {
            let need = u64::from(req.capacity) * u64::from(v);
            let r = need.div_ceil(usable as u64);
            if r > u64::from(strategy.max_ratio) {
                return Err(PlacementError::Insufficient {
                    reason: format!(
                        "{} phones of {v} vcpus need {r} phones per cpu on {usable} usable cpus; \
                         {} allows at most {}",
                        req.capacity, strategy.name, strategy.max_ratio
                    ),
                });
            }
            u32::try_from(r).unwrap_or(u32::MAX).max(1)
        }
    };
    let last_ratio = strategy
        .ratio
        .unwrap_or(strategy.max_ratio)
        .max(first_ratio);
    let memory_of = |node: u32| {
        topo.nodes
            .iter()
            .find(|n| n.id == node)
            .map_or(0, |n| n.memory_mb)
    };

    // Rounding per cluster and per node can leave a derived ratio a few
    // seats short: raise it (up to the strategy's cap) rather than span
    // NUMA nodes or refuse. Clusters come first; whole nodes when clusters
    // cut by the reserved set strand CPUs.
    let mut fit = None;
    let mut best_cap = 0u64;
    'ratios: for ratio in first_ratio..=last_ratio {
        for whole_node in [false, true] {
            let mut domains = build_domains(&per_node, v, &memory_of);
            for d in &mut domains {
                d.groups = build_groups(d, v, ratio, strategy.cpu, whole_node);
            }
            let caps: Vec<u32> = domains
                .iter()
                .map(|d| {
                    let cap = d.groups.iter().map(|g| g.cap).sum::<u32>();
                    match req.memory_mb {
                        0 => cap,
                        _ if d.memory_mb == 0 => cap,
                        m => cap.min(u32::try_from(d.memory_mb / m).unwrap_or(u32::MAX)),
                    }
                })
                .collect();
            let total: u64 = caps.iter().map(|&c| u64::from(c)).sum();
            best_cap = best_cap.max(total);
            if total >= u64::from(req.capacity) {
                fit = Some((ratio, !whole_node, domains, caps));
                break 'ratios;
            }
        }
    }
    let Some((ratio, cluster_tiled, domains, caps)) = fit else {
        let mem_note = if req.memory_mb > 0 {
            format!(" and {} MiB of memory each", req.memory_mb)
        } else {
            String::new()
        };
        return Err(PlacementError::Insufficient {
            reason: format!(
                "{} fits {best_cap} phones of {v} vcpus{mem_note} at up to {last_ratio} phones \
                 per cpu, {} asked",
                strategy.name, req.capacity
            ),
        });
    };
    let quotas = match strategy.numa {
        NumaPolicy::Spread | NumaPolicy::Single => {
            let weights: Vec<u64> = domains.iter().map(|d| d.cpus.len() as u64).collect();
            largest_remainder(req.capacity, &weights, &caps)
        }
        NumaPolicy::Pack => pack(req.capacity, &caps),
    };

    // Phones per domain, in group order.
    let mut per_domain: Vec<Vec<Vec<u32>>> = Vec::with_capacity(domains.len());
    for (d, &q) in domains.iter().zip(&quotas) {
        let group_caps: Vec<u32> = d.groups.iter().map(|g| g.cap).collect();
        let gq = match strategy.numa {
            NumaPolicy::Pack => pack(q, &group_caps),
            _ => {
                let w: Vec<u64> = group_caps.iter().map(|&c| u64::from(c)).collect();
                largest_remainder(q, &w, &group_caps)
            }
        };
        let mut phones = Vec::with_capacity(q as usize);
        for (g, &n) in d.groups.iter().zip(&gq) {
            cut_group(g, n, v, ratio, strategy.cpu, &mut phones);
        }
        if strategy.cpu == CpuPolicy::SharedNode {
            let all: Vec<u32> = d.cpus.iter().map(|c| c.id).collect();
            for p in &mut phones {
                p.clone_from(&all);
            }
        }
        per_domain.push(phones);
    }

    // Interleave domains: order (k / q_d, d).
    let mut order: Vec<(usize, usize)> = Vec::with_capacity(req.capacity as usize);
    for (d, phones) in per_domain.iter().enumerate() {
        order.extend((0..phones.len()).map(|k| (d, k)));
    }
    order.sort_by(|&(da, ka), &(db, kb)| {
        let qa = per_domain[da].len() as u64;
        let qb = per_domain[db].len() as u64;
        (ka as u64 * qb)
            .cmp(&(kb as u64 * qa))
            .then(da.cmp(&db))
            .then(ka.cmp(&kb))
    });

    let by_id: Vec<Cpu> = {
        let mut v = topo.cpus.clone();
        v.sort_by_key(|c| c.id);
        v
    };
    let node_of_sorted = |cpu: u32| {
        by_id
            .binary_search_by(|c| c.id.cmp(&cpu))
            .ok()
            .map(|i| by_id[i].node)
    };

    let mut slots = Vec::with_capacity(order.len());
    for (i, (d, k)) in order.into_iter().enumerate() {
        let mut cpus = per_domain[d][k].clone();
        cpus.sort_unstable();
        let mut count: Vec<(u32, u32)> = Vec::new();
        for &c in &cpus {
            let n = node_of_sorted(c).unwrap_or(0);
            match count.iter_mut().find(|(m, _)| *m == n) {
                Some((_, k)) => *k += 1,
                None => count.push((n, 1)),
            }
        }
        let numa_node = count
            .iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            .map_or(0, |(n, _)| *n);
        let mut mems: Vec<u32> = count.iter().map(|(n, _)| *n).collect();
        mems.sort_unstable();
        let quota = (strategy.cpu == CpuPolicy::SharedNode).then(|| u64::from(v) * CPU_PERIOD_US);
        slots.push(Slot {
            slot: u32::try_from(i).unwrap_or(u32::MAX),
            cpus,
            numa_node,
            mems,
            gpu: None,
            cpu_shares: 1024 * u64::from(v),
            cpu_weight: (100 * u64::from(v)).min(10_000),
            cpu_quota_us: quota,
            cpu_period_us: CPU_PERIOD_US,
        });
    }

    if strategy.numa != NumaPolicy::Single {
        let nodes: Vec<u32> = slots.iter().map(|s| s.numa_node).collect();
        for (slot, g) in slots.iter_mut().zip(gpu::assign(topo, &nodes)) {
            slot.gpu = g.map(|i| topo.gpus[i].render_node.clone());
        }
    }

    Ok(Plan {
        fingerprint: topo.fingerprint(),
        strategy: req.strategy.clone(),
        capacity: req.capacity,
        vcpus: v,
        memory_mb: req.memory_mb,
        ratio,
        cluster_tiled,
        reserved,
        slots,
    })
}

/// One domain per node; for phones larger than every node, the fewest nodes
/// (most usable CPUs first, ties to the lower id) joined until they hold one.
fn build_domains(
    per_node: &[(u32, Vec<&Cpu>)],
    v: u32,
    memory_of: &dyn Fn(u32) -> u64,
) -> Vec<Domain> {
    let largest = per_node.iter().map(|(_, l)| l.len()).max().unwrap_or(0);
    let domain = |nodes: Vec<u32>, cpus: Vec<Cpu>| Domain {
        memory_mb: nodes.iter().map(|&n| memory_of(n)).sum(),
        cpus,
        groups: Vec::new(),
    };
    if v as usize <= largest {
        return per_node
            .iter()
            .map(|(n, l)| domain(vec![*n], l.iter().map(|&c| c.clone()).collect()))
            .collect();
    }
    let mut order: Vec<&(u32, Vec<&Cpu>)> = per_node.iter().collect();
    order.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
    let mut out = Vec::new();
    let mut nodes = Vec::new();
    let mut cpus = Vec::new();
    for (n, l) in order {
        nodes.push(*n);
        cpus.extend(l.iter().map(|&c| c.clone()));
        if cpus.len() >= v as usize {
            out.push(domain(
                std::mem::take(&mut nodes),
                std::mem::take(&mut cpus),
            ));
        }
    }
    out
}

/// Groups of a domain: each cluster that can hold a phone on its own, then
/// the remaining CPUs of the domain together.
fn build_groups(d: &Domain, v: u32, ratio: u32, policy: CpuPolicy, whole_node: bool) -> Vec<Group> {
    // Cores with their cluster key. Domain CPUs are in canonical order, so
    // siblings and clusters are contiguous.
    let mut cores: Vec<((u32, u32, u32), Vec<u32>)> = Vec::new();
    let mut core_key: Option<(u32, u32, u32, u32)> = None;
    for c in &d.cpus {
        let id = c.id;
        let key = (c.node, c.package, c.cluster, c.core);
        if core_key == Some(key) {
            if let Some(last) = cores.last_mut() {
                last.1.push(id);
            }
        } else {
            cores.push(((c.node, c.package, c.cluster), vec![id]));
            core_key = Some(key);
        }
    }
    if whole_node && policy != CpuPolicy::SharedNode {
        let cores: Vec<Vec<u32>> = cores.into_iter().map(|(_, c)| c).collect();
        let cap = group_cap(&cores, v, ratio, policy);
        return vec![Group { cores, cap }];
    }
    if policy == CpuPolicy::SharedNode {
        let n = d.cpus.len() as u64 * u64::from(ratio) / u64::from(v);
        return vec![Group {
            cores: cores.into_iter().map(|(_, c)| c).collect(),
            cap: u32::try_from(n).unwrap_or(u32::MAX),
        }];
    }
    let mut clusters: Vec<Vec<Vec<u32>>> = Vec::new();
    let mut last = None;
    for (key, core) in cores {
        if last == Some(key) {
            if let Some(c) = clusters.last_mut() {
                c.push(core);
            }
        } else {
            clusters.push(vec![core]);
            last = Some(key);
        }
    }
    let mut groups = Vec::new();
    let mut rest: Vec<Vec<u32>> = Vec::new();
    for cl in clusters {
        let cap = group_cap(&cl, v, ratio, policy);
        if cap > 0 {
            groups.push(Group { cores: cl, cap });
        } else {
            rest.extend(cl);
        }
    }
    let cap = group_cap(&rest, v, ratio, policy);
    if cap > 0 {
        groups.push(Group { cores: rest, cap });
    }
    groups
}

fn group_cap(cores: &[Vec<u32>], v: u32, ratio: u32, policy: CpuPolicy) -> u32 {
    match policy {
        CpuPolicy::Exclusive => {
            // Whole cores, consecutive, until a phone has v threads.
            let (mut phones, mut acc) = (0u32, 0usize);
            for core in cores {
                acc += core.len();
                if acc >= v as usize {
                    phones += 1;
                    acc = 0;
                }
            }
            phones
        }
        _ => {
            let m: usize = cores.iter().map(Vec::len).sum();
            if m < v as usize {
                return 0;
            }
            u32::try_from(m as u64 * u64::from(ratio) / u64::from(v)).unwrap_or(u32::MAX)
        }
    }
}

/// Cuts `n` phones out of a group: seat tiling (each CPU listed `ratio` times,
/// pass after pass; phone j takes seats j·v .. (j+1)·v), or whole cores.
fn cut_group(g: &Group, n: u32, v: u32, ratio: u32, policy: CpuPolicy, out: &mut Vec<Vec<u32>>) {
    let v = v as usize;
    match policy {
        CpuPolicy::Exclusive => {
            let mut cores = g.cores.iter();
            for _ in 0..n {
                let mut cpus = Vec::with_capacity(v);
                for core in cores.by_ref() {
                    cpus.extend(core.iter().copied());
                    if cpus.len() >= v {
                        break;
                    }
                }
                cpus.truncate(v);
                out.push(cpus);
            }
        }
        _ => {
            let cpus: Vec<u32> = g.cores.iter().flatten().copied().collect();
            let m = cpus.len();
            let seats = m * ratio as usize;
            for j in 0..n as usize {
                let start = j * v;
                if start + v > seats {
                    break;
                }
                out.push((start..start + v).map(|s| cpus[s % m]).collect());
            }
        }
    }
}

/// Splits `total` over items in proportion to `weights` by the largest
/// remainder (ties to the lower index), capped at `caps`; what a cap cuts off
/// goes, one at a time, to the item with the most room left.
pub(crate) fn largest_remainder(total: u32, weights: &[u64], caps: &[u32]) -> Vec<u32> {
    let sum: u64 = weights.iter().sum();
    if sum == 0 {
        return pack(total, caps);
    }
    let t = u64::from(total);
    let mut q: Vec<u64> = weights.iter().map(|w| t * w / sum).collect();
    let mut left = t - q.iter().sum::<u64>();
    let mut rems: Vec<(u64, usize)> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| (t * w % sum, i))
        .collect();
    rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (_, i) in rems {
        if left == 0 {
            break;
        }
        q[i] += 1;
        left -= 1;
    }
    let mut overflow = 0u64;
    for (qi, &cap) in q.iter_mut().zip(caps) {
        if *qi > u64::from(cap) {
            overflow += *qi - u64::from(cap);
            *qi = u64::from(cap);
        }
    }
    while overflow > 0 {
        let best = q
            .iter()
            .zip(caps)
            .enumerate()
            .map(|(i, (&qi, &cap))| (u64::from(cap).saturating_sub(qi), i))
            .filter(|(room, _)| *room > 0)
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        match best {
            Some((_, i)) => {
                q[i] += 1;
                overflow -= 1;
            }
            None => break,
        }
    }
    q.into_iter()
        .map(|x| u32::try_from(x).unwrap_or(u32::MAX))
        .collect()
}

/// Fills items in order up to their caps.
pub(crate) fn pack(total: u32, caps: &[u32]) -> Vec<u32> {
    let mut left = total;
    caps.iter()
        .map(|&cap| {
            let take = left.min(cap);
            left -= take;
            take
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_remainder_is_proportional_and_capped() {
        assert_eq!(
            largest_remainder(10, &[1, 1, 1], &[10, 10, 10]),
            vec![4, 3, 3]
        );
        assert_eq!(
            largest_remainder(10, &[1, 1, 1], &[2, 10, 10]),
            vec![2, 4, 4]
        );
        assert_eq!(largest_remainder(5, &[3, 1], &[9, 9]), vec![4, 1]);
        assert_eq!(pack(7, &[3, 3, 3]), vec![3, 3, 1]);
    }
}
