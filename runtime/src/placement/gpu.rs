//! GPU assignment: every GPU gets floor(P/G) or one more phones; the extra
//! phones go where they make the most phones NUMA-local; then each node's
//! phones take their local GPUs round-robin, and the rest the nearest GPU
//! with room (by node distance, then PCI address).

use super::topology::Topology;

/// For each phone (given by its NUMA node, in slot order) the index of its
/// GPU in `topo.gpus`, or `None` when the host has none.
pub fn assign(topo: &Topology, phone_nodes: &[u32]) -> Vec<Option<usize>> {
    let g = topo.gpus.len();
    if g == 0 {
        return vec![None; phone_nodes.len()];
    }
    let targets = targets(topo, phone_nodes);
    let mut load = vec![0usize; g];
    let mut out = vec![None; phone_nodes.len()];

    // Pass 1: local GPUs, round-robin per node.
    let mut nodes: Vec<u32> = phone_nodes.to_vec();
    nodes.sort_unstable();
    nodes.dedup();
    for n in nodes {
        let local: Vec<usize> = (0..g).filter(|&i| topo.gpus[i].node == Some(n)).collect();
        if local.is_empty() {
            continue;
        }
        let mut next = 0;
        for (p, _) in phone_nodes.iter().enumerate().filter(|(_, &pn)| pn == n) {
            let pick = (0..local.len())
                .map(|k| local[(next + k) % local.len()])
                .find(|&i| load[i] < targets[i]);
            let Some(i) = pick else { break };
            out[p] = Some(i);
            load[i] += 1;
            next = (local.iter().position(|&x| x == i).unwrap_or(0) + 1) % local.len();
        }
    }

    // Pass 2: the nearest GPU with room.
    for (p, &n) in phone_nodes.iter().enumerate() {
        if out[p].is_some() {
            continue;
        }
        let pick = (0..g).filter(|&i| load[i] < targets[i]).min_by(|&a, &b| {
            let da = topo.gpus[a].node.map_or(u32::MAX, |m| topo.distance(n, m));
            let db = topo.gpus[b].node.map_or(u32::MAX, |m| topo.distance(n, m));
            da.cmp(&db).then(a.cmp(&b))
        });
        if let Some(i) = pick {
            out[p] = Some(i);
            load[i] += 1;
        }
    }
    out
}

/// Phones per GPU: floor(P/G) each, and the P mod G extra ones to the GPUs
/// whose node has the most phones left without a local GPU seat (ties to the
/// lower node, then the lower PCI address), which maximises local phones.
fn targets(topo: &Topology, phone_nodes: &[u32]) -> Vec<usize> {
    let g = topo.gpus.len();
    let p = phone_nodes.len();
    let base = p / g;
    let mut extra = p % g;
    let mut t = vec![base; g];
    let demand = |n: u32| phone_nodes.iter().filter(|&&x| x == n).count();
    // Unmet local demand per GPU's node after the base share.
    let mut unmet: Vec<(u32, i64)> = Vec::new();
    for gpu in &topo.gpus {
        if let Some(n) = gpu.node {
            if !unmet.iter().any(|(m, _)| *m == n) {
                let seats = topo.gpus.iter().filter(|x| x.node == Some(n)).count() * base;
                let need = i64::try_from(demand(n)).unwrap_or(i64::MAX)
                    - i64::try_from(seats).unwrap_or(i64::MAX);
                unmet.push((n, need));
            }
        }
    }
    while extra > 0 {
        // The node with the largest unmet demand that still has a GPU without an extra.
        let best = unmet
            .iter()
            .filter(|(n, need)| {
                *need > 0 && (0..g).any(|i| topo.gpus[i].node == Some(*n) && t[i] == base)
            })
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
            .map(|(n, _)| *n);
        let pick = match best {
            Some(n) => (0..g).find(|&i| topo.gpus[i].node == Some(n) && t[i] == base),
            None => (0..g).find(|&i| t[i] == base),
        };
        let Some(i) = pick else { break };
        t[i] += 1;
        extra -= 1;
        if let Some(n) = topo.gpus[i].node {
            if let Some(e) = unmet.iter_mut().find(|(m, _)| *m == n) {
                e.1 -= 1;
            }
        }
    }
    t
}

/// Phones per GPU for a given assignment.
pub fn loads(gpus: usize, assignment: &[Option<usize>]) -> Vec<usize> {
    let mut load = vec![0usize; gpus];
    for i in assignment.iter().flatten() {
        if let Some(l) = load.get_mut(*i) {
            *l += 1;
        }
    }
    load
}
