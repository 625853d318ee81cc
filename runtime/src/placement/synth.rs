//! Synthetic hosts: a topology described by a few numbers, and a writer that
//! lays it out as a sysfs tree. Used for the fixture trees in the repository,
//! the property tests and the planner benches (a 10,000-CPU host does not
//! exist to snapshot), and by operators to try a flavor on a host they have
//! not bought yet.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use super::topology::{Cpu, Gpu, Node, Topology};
use super::{cpulist, PlacementError};

/// The shape of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostShape {
    pub packages: u32,
    pub nodes_per_package: u32,
    pub cores_per_node: u32,
    pub threads_per_core: u32,
    /// Cores per cluster (4 on Kunpeng 920 and Hi1616); 1 = no clusters.
    pub cluster_cores: u32,
    pub memory_mb_per_node: u64,
    /// GPUs as (NUMA node, or None when unknown).
    pub gpu_nodes: Vec<Option<u32>>,
}

impl HostShape {
    /// Builds the topology. CPU ids run node by node, core by core; SMT
    /// siblings are numbered after all first threads, as x86 kernels do.
    pub fn topology(&self) -> Topology {
        let nodes_total = self.packages * self.nodes_per_package;
        let cores_total = nodes_total * self.cores_per_node;
        let cluster_cores = self.cluster_cores.max(1);
        // Clusters never straddle NUMA nodes on real hardware.
        let clusters_per_node = self.cores_per_node.div_ceil(cluster_cores);
        let mut cpus = Vec::new();
        for n in 0..nodes_total {
            let package = n / self.nodes_per_package.max(1);
            let first_core_in_package = (n % self.nodes_per_package.max(1)) * self.cores_per_node;
            for c in 0..self.cores_per_node {
                let core = first_core_in_package + c;
                for t in 0..self.threads_per_core.max(1) {
                    cpus.push(Cpu {
                        id: t * cores_total + n * self.cores_per_node + c,
                        package,
                        core,
                        cluster: (n % self.nodes_per_package.max(1)) * clusters_per_node
                            + c / cluster_cores,
                        node: n,
                    });
                }
            }
        }
        let nodes = (0..nodes_total)
            .map(|n| Node {
                id: n,
                memory_mb: self.memory_mb_per_node,
                distance: (0..nodes_total)
                    .map(|m| {
                        let d = if m == n {
                            10
                        } else if m / self.nodes_per_package.max(1)
                            == n / self.nodes_per_package.max(1)
                        {
                            16
                        } else {
                            32
                        };
                        (m, d)
                    })
                    .collect(),
            })
            .collect();
        let gpus = self
            .gpu_nodes
            .iter()
            .enumerate()
            .map(|(i, node)| Gpu {
                render_node: format!("renderD{}", 128 + i),
                pci: format!("0000:{:02x}:00.0", 0x10 + i * 0x10),
                node: *node,
            })
            .collect();
        Topology::new(cpus, nodes, gpus)
    }
}

/// Writes `topo` as a sysfs tree under `root` (which must not exist yet or be
/// empty): the files [`Topology::discover`] reads, with the same names and
/// formats as the kernel's.
pub fn write_sysfs(topo: &Topology, root: &Path) -> Result<(), PlacementError> {
    let w = |rel: &str, text: String| -> Result<(), PlacementError> {
        let path = root.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|source| PlacementError::Sysfs {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        fs::write(&path, text).map_err(|source| PlacementError::Sysfs { path, source })
    };
    let ids: Vec<u32> = topo.cpus.iter().map(|c| c.id).collect();
    w(
        "devices/system/cpu/online",
        format!("{}\n", cpulist::format(&ids)),
    )?;
    w(
        "devices/system/cpu/possible",
        format!("{}\n", cpulist::format(&ids)),
    )?;
    let mut siblings: BTreeMap<(u32, u32), Vec<u32>> = BTreeMap::new();
    let mut clusters: BTreeMap<(u32, u32), Vec<u32>> = BTreeMap::new();
    for c in &topo.cpus {
        siblings.entry((c.package, c.core)).or_default().push(c.id);
        clusters
            .entry((c.package, c.cluster))
            .or_default()
            .push(c.id);
    }
    for c in &topo.cpus {
        let t = format!("devices/system/cpu/cpu{}/topology", c.id);
        w(
            &format!("{t}/physical_package_id"),
            format!("{}\n", c.package),
        )?;
        w(&format!("{t}/core_id"), format!("{}\n", c.core))?;
        w(&format!("{t}/cluster_id"), format!("{}\n", c.cluster))?;
        let sib = cpulist::format(&siblings[&(c.package, c.core)]);
        w(&format!("{t}/thread_siblings_list"), format!("{sib}\n"))?;
        w(&format!("{t}/core_cpus_list"), format!("{sib}\n"))?;
        let cl = cpulist::format(&clusters[&(c.package, c.cluster)]);
        w(&format!("{t}/cluster_cpus_list"), format!("{cl}\n"))?;
    }
    for n in &topo.nodes {
        let cpus: Vec<u32> = topo.node_cpus(n.id).map(|c| c.id).collect();
        let d = format!("devices/system/node/node{}", n.id);
        w(
            &format!("{d}/cpulist"),
            format!("{}\n", cpulist::format(&cpus)),
        )?;
        let dist: Vec<String> = n.distance.values().map(u32::to_string).collect();
        w(&format!("{d}/distance"), format!("{}\n", dist.join(" ")))?;
        w(
            &format!("{d}/meminfo"),
            format!(
                "Node {} MemTotal:       {} kB\nNode {} MemFree:        {} kB\n",
                n.id,
                n.memory_mb * 1024,
                n.id,
                n.memory_mb * 512
            ),
        )?;
    }
    for g in &topo.gpus {
        let d = format!("class/drm/{}/device", g.render_node);
        let node = g.node.map_or("-1".to_string(), |n| n.to_string());
        w(&format!("{d}/numa_node"), format!("{node}\n"))?;
        w(
            &format!("{d}/uevent"),
            format!("DRIVER=amdgpu\nPCI_SLOT_NAME={}\n", g.pci),
        )?;
    }
    Ok(())
}

/// `physical.rx1.xlarge`: Hi1616, 2 packages x 2 nodes x 16 cores in
/// 4-core clusters, 256 GB, 3 GPUs on nodes 0-2.
pub fn hi1616_rx1() -> HostShape {
    HostShape {
        packages: 2,
        nodes_per_package: 2,
        cores_per_node: 16,
        threads_per_core: 1,
        cluster_cores: 4,
        memory_mb_per_node: 64 * 1024,
        gpu_nodes: vec![Some(0), Some(1), Some(2)],
    }
}

/// `physical.kg1.4xlarge.cp`: Kunpeng 920, 2 packages x 2 nodes x 32 cores in
/// 4-core clusters, 512 GB; `gpus` render nodes spread over the nodes.
pub fn kunpeng920_kg1(gpus: u32) -> HostShape {
    HostShape {
        packages: 2,
        nodes_per_package: 2,
        cores_per_node: 32,
        threads_per_core: 1,
        cluster_cores: 4,
        memory_mb_per_node: 128 * 1024,
        gpu_nodes: (0..gpus).map(|i| Some(i % 4)).collect(),
    }
}
