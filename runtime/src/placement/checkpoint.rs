//! The plan checkpoint, like the kubelet's CPU manager state file: the plan
//! and the host fingerprint it was made for. Same fingerprint and request on
//! restart: the stored plan is used as is, byte for byte. A changed topology
//! (or flavor) gives a new target plan; slots whose phones are running keep
//! their old placement until they stop ([`Checkpoint::settle`]), so only
//! stopped phones move.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::plan::{plan, Plan, PlanRequest};
use super::topology::Topology;
use super::PlacementError;

/// What is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub request: PlanRequest,
    /// The placement in force.
    pub plan: Plan,
    /// Where every slot should be on the current topology; differs from
    /// `plan` only in slots waiting for their phone to stop.
    pub target: Plan,
}

/// The result of loading a checkpoint against the current host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub checkpoint: Checkpoint,
    /// True when the stored plan was reused unchanged.
    pub reused: bool,
    /// Slots whose placement changed in the plan in force.
    pub moved: Vec<u32>,
    /// Slots that must move but whose phone is running.
    pub pending: Vec<u32>,
}

impl Checkpoint {
    /// Loads the checkpoint at `path` for this host and request, planning
    /// anew when there is none or the fingerprint or request changed, and
    /// saves the result. `running` lists slots whose phones run now.
    pub fn load_or_plan(
        path: &Path,
        topo: &Topology,
        request: &PlanRequest,
        running: &BTreeSet<u32>,
    ) -> Result<Loaded, PlacementError> {
        let stored = Self::read(path)?;
        let fingerprint = topo.fingerprint();
        if let Some(cp) = &stored {
            if cp.request == *request && cp.target.fingerprint == fingerprint {
                let pending = cp.pending();
                return Ok(Loaded {
                    checkpoint: cp.clone(),
                    reused: true,
                    moved: Vec::new(),
                    pending,
                });
            }
        }
        let target = plan(topo, request)?;
        let mut current = target.clone();
        let mut moved = Vec::new();
        if let Some(old) = stored.filter(|cp| cp.plan.slots.len() == target.slots.len()) {
            for (new, prev) in current.slots.iter_mut().zip(&old.plan.slots) {
                if new != prev {
                    if running.contains(&new.slot) {
                        new.clone_from(prev);
                    } else {
                        moved.push(new.slot);
                    }
                }
            }
        }
        let cp = Checkpoint {
            request: request.clone(),
            plan: current,
            target,
        };
        cp.save(path)?;
        let pending = cp.pending();
        Ok(Loaded {
            checkpoint: cp,
            reused: false,
            moved,
            pending,
        })
    }

    /// Slots still waiting to move.
    pub fn pending(&self) -> Vec<u32> {
        self.plan
            .slots
            .iter()
            .zip(&self.target.slots)
            .filter(|(a, b)| a != b)
            .map(|(a, _)| a.slot)
            .collect()
    }

    /// Moves a stopped phone's slot to its target placement and saves.
    pub fn settle(&mut self, slot: u32, path: &Path) -> Result<bool, PlacementError> {
        let i = slot as usize;
        match (self.plan.slots.get(i), self.target.slots.get(i)) {
            (Some(a), Some(b)) if a != b => {
                self.plan.slots[i] = b.clone();
                self.save(path)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn read(path: &Path) -> Result<Option<Self>, PlacementError> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| {
                PlacementError::Checkpoint {
                    path: path.to_path_buf(),
                    reason: source.to_string(),
                }
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(PlacementError::Checkpoint {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        }
    }

    /// Writes atomically: a temporary file, fsync, rename.
    fn save(&self, path: &Path) -> Result<(), PlacementError> {
        let err = |e: &dyn std::fmt::Display| PlacementError::Checkpoint {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| err(&e))?;
        let tmp: PathBuf = path.with_extension("tmp");
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| err(&e))?;
        }
        let mut f = fs::File::create(&tmp).map_err(|e| err(&e))?;
        f.write_all(&bytes).map_err(|e| err(&e))?;
        f.sync_all().map_err(|e| err(&e))?;
        fs::rename(&tmp, path).map_err(|e| err(&e))
    }
}
