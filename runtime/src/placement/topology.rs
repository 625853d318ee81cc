//! Host topology read from sysfs: online CPUs with their core, cluster and
//! package, NUMA nodes with CPUs, memory and distances, and DRM render nodes
//! with the NUMA node of their PCI device.
//!
//! The root is a parameter (`/sys` in production) so tests feed snapshots.
//! Listing order never matters: everything is sorted into a canonical order,
//! and the fingerprint hashes that order.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{cpulist, PlacementError};

/// One online logical CPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cpu {
    pub id: u32,
    pub package: u32,
    /// Core id within the package; SMT siblings share it.
    pub core: u32,
    /// Cluster id within the package (Kunpeng's 4-core L3-tag clusters);
    /// one cluster per core when the kernel reports none.
    pub cluster: u32,
    pub node: u32,
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: u32,
    pub memory_mb: u64,
    /// Distances to every node, by node id (`node*/distance`).
    pub distance: BTreeMap<u32, u32>,
}

/// One GPU render node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// `renderD128`; the device is `/dev/dri/<name>`.
    pub render_node: String,
    /// PCI address (`0000:03:00.0`), or the render node name when unknown.
    pub pci: String,
    /// NUMA node of the PCI device; `None` when the kernel reports -1.
    pub node: Option<u32>,
}

/// A host's topology in canonical order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Sorted by (node, package, cluster, core, id).
    pub cpus: Vec<Cpu>,
    /// Sorted by id.
    pub nodes: Vec<Node>,
    /// Sorted by PCI address.
    pub gpus: Vec<Gpu>,
}

impl Topology {
    /// Builds a topology from parts in any order, putting it in canonical order.
    pub fn new(mut cpus: Vec<Cpu>, mut nodes: Vec<Node>, mut gpus: Vec<Gpu>) -> Self {
        cpus.sort_by_key(|c| (c.node, c.package, c.cluster, c.core, c.id));
        nodes.sort_by_key(|n| n.id);
        gpus.sort_by(|a, b| {
            a.pci
                .cmp(&b.pci)
                .then_with(|| a.render_node.cmp(&b.render_node))
        });
        Self { cpus, nodes, gpus }
    }

    /// Reads the topology under a sysfs root (`/sys` on a host).
    pub fn discover(sysfs: &Path) -> Result<Self, PlacementError> {
        let cpu_dir = sysfs.join("devices/system/cpu");
        let online = cpulist::parse(&read(&cpu_dir.join("online"))?)?;
        let node_dir = sysfs.join("devices/system/node");

        let mut nodes = Vec::new();
        let mut node_of = BTreeMap::new();
        for (id, path) in numbered_entries(&node_dir, "node")? {
            for cpu in cpulist::parse(&read(&path.join("cpulist"))?)? {
                node_of.insert(cpu, id);
            }
            let distance = read_opt(&path.join("distance"))?
                .map(|text| {
                    text.split_whitespace()
                        .enumerate()
                        .filter_map(|(i, d)| Some((u32::try_from(i).ok()?, d.parse().ok()?)))
                        .collect()
                })
                .unwrap_or_default();
            let memory_mb = read_opt(&path.join("meminfo"))?
                .map(|text| parse_memtotal_kb(&text) / 1024)
                .unwrap_or(0);
            nodes.push(Node {
                id,
                memory_mb,
                distance,
            });
        }
        if nodes.is_empty() {
            // A kernel without NUMA support: one node holding everything.
            nodes.push(Node {
                id: 0,
                memory_mb: 0,
                distance: BTreeMap::from([(0, 10)]),
            });
        }

        let mut cpus = Vec::with_capacity(online.len());
        for id in online {
            let topo = cpu_dir.join(format!("cpu{id}/topology"));
            let package = read_u32(&topo.join("physical_package_id"))?.unwrap_or(0);
            let core = read_u32(&topo.join("core_id"))?.unwrap_or(id);
            // 65535 / -1 / absent mean "no cluster": each core is its own.
            let cluster = match read_u32(&topo.join("cluster_id"))? {
                Some(c) if c != u32::from(u16::MAX) => c,
                _ => core,
            };
            let node = node_of.get(&id).copied().unwrap_or(0);
            cpus.push(Cpu {
                id,
                package,
                core,
                cluster,
                node,
            });
        }

        let mut gpus = Vec::new();
        let drm = sysfs.join("class/drm");
        if drm.is_dir() {
            for entry in fs::read_dir(&drm).map_err(|e| io_err(&drm, e))? {
                let entry = entry.map_err(|e| io_err(&drm, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.starts_with("renderD") {
                    continue;
                }
                let device = entry.path().join("device");
                let node = read_opt(&device.join("numa_node"))?
                    .and_then(|t| t.trim().parse::<i64>().ok())
                    .and_then(|n| u32::try_from(n).ok());
                let pci = pci_address(&device)?.unwrap_or_else(|| name.clone());
                gpus.push(Gpu {
                    render_node: name,
                    pci,
                    node,
                });
            }
        }
        Ok(Self::new(cpus, nodes, gpus))
    }

    /// A stable hash of what placement depends on: the canonical CPU list and
    /// the GPUs with their nodes. Memory sizes are left out on purpose: they
    /// drift a little between boots and never move a phone.
    pub fn fingerprint(&self) -> String {
        let mut h = Fnv64::new();
        for c in &self.cpus {
            h.write_u32s(&[c.id, c.package, c.core, c.cluster, c.node]);
        }
        h.write(b"|gpus|");
        for g in &self.gpus {
            h.write(g.pci.as_bytes());
            h.write(g.render_node.as_bytes());
            h.write_u32s(&[g.node.map_or(u32::MAX, |n| n)]);
        }
        format!("{:016x}", h.finish())
    }

    /// Usable CPUs of a node, in canonical order.
    pub fn node_cpus(&self, node: u32) -> impl Iterator<Item = &Cpu> {
        self.cpus.iter().filter(move |c| c.node == node)
    }

    /// Distance between two nodes (10 for the same node, 255 when unknown).
    pub fn distance(&self, a: u32, b: u32) -> u32 {
        if a == b {
            return 10;
        }
        self.nodes
            .iter()
            .find(|n| n.id == a)
            .and_then(|n| n.distance.get(&b).copied())
            .unwrap_or(255)
    }

    /// The default reserved set: the first CPU (in canonical order) of every
    /// NUMA node, for the agent and the encoding server.
    pub fn default_reserved(&self) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        let mut last_node = None;
        for c in &self.cpus {
            if last_node != Some(c.node) {
                out.push(c.id);
                last_node = Some(c.node);
            }
        }
        out
    }
}

/// 64-bit FNV-1a: tiny, and stable across Rust releases (unlike std's hasher).
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn write_u32s(&mut self, vals: &[u32]) {
        for v in vals {
            self.write(&v.to_le_bytes());
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

fn io_err(path: &Path, source: std::io::Error) -> PlacementError {
    PlacementError::Sysfs {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<String, PlacementError> {
    fs::read_to_string(path).map_err(|e| io_err(path, e))
}

fn read_opt(path: &Path) -> Result<Option<String>, PlacementError> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, e)),
    }
}

fn read_u32(path: &Path) -> Result<Option<u32>, PlacementError> {
    Ok(read_opt(path)?.and_then(|t| t.trim().parse::<u32>().ok()))
}

/// `nodeN` style entries of a directory, sorted by N.
fn numbered_entries(dir: &Path, prefix: &str) -> Result<Vec<(u32, PathBuf)>, PlacementError> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix(prefix).and_then(|s| s.parse().ok()) {
            out.push((n, entry.path()));
        }
    }
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}

/// PCI address of a DRM device: the target of the `device` link on a real
/// host, or `PCI_SLOT_NAME` from its `uevent`.
fn pci_address(device: &Path) -> Result<Option<String>, PlacementError> {
    if let Ok(target) = fs::read_link(device) {
        if let Some(name) = target.file_name() {
            return Ok(Some(name.to_string_lossy().into_owned()));
        }
    }
    Ok(read_opt(&device.join("uevent"))?.and_then(|t| {
        t.lines().find_map(|l| {
            l.strip_prefix("PCI_SLOT_NAME=")
                .map(|s| s.trim().to_string())
        })
    }))
}

fn parse_memtotal_kb(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find(|l| l.contains("MemTotal:"))
        .and_then(|l| l.split_whitespace().rev().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memtotal_is_read_from_node_meminfo() {
        let text = "Node 0 MemTotal:        6776608 kB\nNode 0 MemFree:  1 kB\n";
        assert_eq!(parse_memtotal_kb(text), 6_776_608);
    }

    #[test]
    fn canonical_order_ignores_input_order() {
        let cpu = |id, node| Cpu {
            id,
            package: 0,
            core: id,
            cluster: id / 4,
            node,
        };
        let a = Topology::new(vec![cpu(3, 1), cpu(0, 0), cpu(2, 1)], vec![], vec![]);
        let b = Topology::new(vec![cpu(2, 1), cpu(3, 1), cpu(0, 0)], vec![], vec![]);
        assert_eq!(a, b);
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.default_reserved(), vec![0, 2]);
    }
}
