//! Quality figures of a plan and its operator views: a table for people and
//! JSON for scripts (`cph-agent plan`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use serde::Serialize;

use super::plan::Plan;
use super::topology::Topology;

/// How good a plan is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    pub phones: usize,
    /// Most phones on any CPU.
    pub max_phones_per_cpu: u32,
    /// Mean phones per CPU over the CPUs phones use.
    pub mean_phones_per_cpu: f64,
    /// Share of phones whose CPUs and memory lie in one NUMA node.
    pub numa_local_share: f64,
    /// Share of phones whose CPUs lie in one cluster.
    pub cluster_local_share: f64,
    /// Most minus fewest phones on a GPU (0 without GPUs).
    pub gpu_imbalance: usize,
    /// Share of phones with a GPU on their own NUMA node.
    pub gpu_local_share: f64,
    /// Most other phones a phone shares a CPU with.
    pub max_cotenants: usize,
    /// Plan time in microseconds, when measured.
    pub plan_time_us: Option<f64>,
}

/// Computes the figures of `plan` on `topo`.
pub fn figures(topo: &Topology, plan: &Plan) -> Figures {
    let info: BTreeMap<u32, (u32, (u32, u32))> = topo
        .cpus
        .iter()
        .map(|c| (c.id, (c.node, (c.package, c.cluster))))
        .collect();
    let mut per_cpu: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    let (mut numa_local, mut cluster_local) = (0usize, 0usize);
    for (i, s) in plan.slots.iter().enumerate() {
        for c in &s.cpus {
            per_cpu.entry(*c).or_default().push(i);
        }
        let nodes: BTreeSet<u32> = s
            .cpus
            .iter()
            .filter_map(|c| info.get(c).map(|x| x.0))
            .collect();
        if nodes.len() == 1 && s.mems.len() == 1 && nodes.contains(&s.mems[0]) {
            numa_local += 1;
        }
        let clusters: BTreeSet<(u32, u32)> = s
            .cpus
            .iter()
            .filter_map(|c| info.get(c).map(|x| x.1))
            .collect();
        if clusters.len() == 1 {
            cluster_local += 1;
        }
    }
    let max_phones_per_cpu = per_cpu.values().map(Vec::len).max().unwrap_or(0);
    let mean = if per_cpu.is_empty() {
        0.0
    } else {
        per_cpu.values().map(Vec::len).sum::<usize>() as f64 / per_cpu.len() as f64
    };
    let max_cotenants = plan
        .slots
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let others: BTreeSet<usize> = s
                .cpus
                .iter()
                .flat_map(|c| per_cpu.get(c).into_iter().flatten().copied())
                .filter(|&j| j != i)
                .collect();
            others.len()
        })
        .max()
        .unwrap_or(0);
    let gpu_node: BTreeMap<&str, Option<u32>> = topo
        .gpus
        .iter()
        .map(|g| (g.render_node.as_str(), g.node))
        .collect();
    let mut gpu_load: BTreeMap<&str, usize> = topo
        .gpus
        .iter()
        .map(|g| (g.render_node.as_str(), 0))
        .collect();
    let mut gpu_local = 0usize;
    for s in &plan.slots {
        if let Some(g) = &s.gpu {
            if let Some(l) = gpu_load.get_mut(g.as_str()) {
                *l += 1;
            }
            if gpu_node.get(g.as_str()).copied().flatten() == Some(s.numa_node) {
                gpu_local += 1;
            }
        }
    }
    let gpu_imbalance = match (gpu_load.values().max(), gpu_load.values().min()) {
        (Some(max), Some(min)) => max - min,
        _ => 0,
    };
    let n = plan.slots.len().max(1) as f64;
    Figures {
        phones: plan.slots.len(),
        max_phones_per_cpu: u32::try_from(max_phones_per_cpu).unwrap_or(u32::MAX),
        mean_phones_per_cpu: mean,
        numa_local_share: numa_local as f64 / n,
        cluster_local_share: cluster_local as f64 / n,
        gpu_imbalance,
        gpu_local_share: gpu_local as f64 / n,
        max_cotenants,
        plan_time_us: None,
    }
}

#[derive(Serialize)]
struct JsonSlot<'a> {
    slot: u32,
    cpus: &'a [u32],
    numa_node: u32,
    mems: &'a [u32],
    gpu: Option<&'a str>,
    cpu_shares: u64,
    cpu_quota_us: Option<u64>,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    fingerprint: &'a str,
    strategy: &'a str,
    capacity: u32,
    vcpus: u32,
    ratio: u32,
    reserved: &'a [u32],
    figures: &'a Figures,
    slots: Vec<JsonSlot<'a>>,
}

/// The plan and its figures as JSON: per slot `slot`, `cpus` (a list of CPU
/// ids), `numa_node`, `gpu` (render node or null), plus the figures.
pub fn to_json(plan: &Plan, figures: &Figures) -> String {
    let report = JsonReport {
        fingerprint: &plan.fingerprint,
        strategy: &plan.strategy,
        capacity: plan.capacity,
        vcpus: plan.vcpus,
        ratio: plan.ratio,
        reserved: &plan.reserved,
        figures,
        slots: plan
            .slots
            .iter()
            .map(|s| JsonSlot {
                slot: s.slot,
                cpus: &s.cpus,
                numa_node: s.numa_node,
                mems: &s.mems,
                gpu: s.gpu.as_deref(),
                cpu_shares: s.cpu_shares,
                cpu_quota_us: s.cpu_quota_us,
            })
            .collect(),
    };
    serde_json::to_string_pretty(&report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// The plan as a table followed by its figures.
pub fn to_table(plan: &Plan, f: &Figures) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "strategy {}  capacity {}  vcpus {}  ratio {}  reserved [{}]  fingerprint {}",
        plan.strategy,
        plan.capacity,
        plan.vcpus,
        plan.ratio,
        super::cpulist::format(&plan.reserved),
        plan.fingerprint
    );
    let _ = writeln!(
        out,
        "{:>5}  {:<24} {:>4}  {:<12}",
        "SLOT", "CPUS", "NUMA", "GPU"
    );
    for s in &plan.slots {
        let _ = writeln!(
            out,
            "{:>5}  {:<24} {:>4}  {:<12}",
            s.slot,
            s.cpuset(),
            s.numa_node,
            s.gpu.as_deref().unwrap_or("-")
        );
    }
    let _ = writeln!(
        out,
        "max phones/cpu {}  mean phones/cpu {:.2}  numa-local {:.1}%  cluster-local {:.1}%  \
         gpu imbalance {}  gpu-local {:.1}%  max co-tenants {}",
        f.max_phones_per_cpu,
        f.mean_phones_per_cpu,
        f.numa_local_share * 100.0,
        f.cluster_local_share * 100.0,
        f.gpu_imbalance,
        f.gpu_local_share * 100.0,
        f.max_cotenants
    );
    if let Some(t) = f.plan_time_us {
        let _ = writeln!(out, "plan time {t:.1} us");
    }
    out
}
