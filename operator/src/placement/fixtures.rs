//! Test builders for placement inputs and one checker for the invariants
//! every plan must keep (rules 1, 2, 4, 5, 6), shared by the unit and
//! property tests.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

/// GPUs per tray in fixtures (GB200/GB300).
pub const T: u32 = 4;

/// A rack of `trays` healthy 4-GPU trays named `{name}-t00`, `{name}-t01`, ...
pub fn rack(name: &str, trays: usize) -> RackInventory {
    RackInventory {
        name: name.to_string(),
        trays: (0..trays)
            .map(|t| TrayInventory {
                node: node(name, t),
                gpus: T,
                unhealthy: BTreeSet::new(),
            })
            .collect(),
    }
}

pub fn node(rack: &str, tray: usize) -> String {
    format!("{rack}-t{tray:02}")
}

impl RackInventory {
    /// Marks GPU `idx` of tray `tray` unhealthy.
    pub fn with_unhealthy(mut self, tray: usize, idx: u32) -> Self {
        self.trays[tray].unhealthy.insert(idx);
        self
    }
}

impl DeploymentRequest {
    pub fn test(deployment: &str) -> Self {
        DeploymentRequest {
            deployment: deployment.to_string(),
            workers: Vec::new(),
            rack_filter: None,
        }
    }

    pub fn prefill(self, worker: &str, gpus: u32) -> Self {
        self.worker(worker, Role::Prefill, gpus)
    }

    pub fn decode(self, worker: &str, gpus: u32) -> Self {
        self.worker(worker, Role::Decode, gpus)
    }

    pub fn worker(mut self, worker: &str, role: Role, gpus: u32) -> Self {
        self.workers.push(WorkerRequest {
            worker: worker.to_string(),
            role,
            gpus,
        });
        self
    }

    pub fn in_racks(mut self, racks: &[&str]) -> Self {
        self.rack_filter = Some(racks.iter().map(|r| r.to_string()).collect());
        self
    }
}

/// An allocation of `gpus` (`(tray, index)` pairs) in rack `rack`.
pub fn alloc(deployment: &str, worker: &str, rack: &str, gpus: &[(usize, u32)]) -> Allocation {
    Allocation {
        owner: WorkerId {
            deployment: deployment.to_string(),
            worker: worker.to_string(),
        },
        rack: rack.to_string(),
        gpus: gpus
            .iter()
            .map(|&(t, index)| GpuRef {
                node: node(rack, t),
                index,
            })
            .collect(),
    }
}

/// `(tray, index)` pairs of whole trays `from..from + n`.
pub fn trays(from: usize, n: usize) -> Vec<(usize, u32)> {
    (from..from + n)
        .flat_map(|t| (0..T).map(move |i| (t, i)))
        .collect()
}

/// The plan's assignment for `worker`.
pub fn assignment<'p>(plan: &'p Plan, worker: &str) -> &'p Allocation {
    plan.assignments
        .iter()
        .find(|a| a.owner.worker == worker)
        .unwrap_or_else(|| panic!("no assignment for {worker}"))
}

/// `(tray, index)` pairs of an allocation, assuming fixture node names.
pub fn positions(a: &Allocation) -> Vec<(usize, u32)> {
    a.gpus
        .iter()
        .map(|g| {
            let tray = g.node.rsplit("-t").next().and_then(|t| t.parse().ok());
            (
                tray.unwrap_or_else(|| panic!("not a fixture node: {}", g.node)),
                g.index,
            )
        })
        .collect()
}

/// Asserts what every plan must keep, against the inputs it came from.
/// Returns a description of the first violation.
pub fn check_plan(
    inventory: &[RackInventory],
    existing: &[Allocation],
    request: &DeploymentRequest,
    plan: &Plan,
) -> Result<(), String> {
    let mut where_is: BTreeMap<&str, (&str, &TrayInventory)> = BTreeMap::new();
    for r in inventory {
        for t in &r.trays {
            where_is.insert(&t.node, (&r.name, t));
        }
    }
    if plan.assignments.len() != request.workers.len() {
        return Err(format!(
            "{} assignments for {} workers",
            plan.assignments.len(),
            request.workers.len()
        ));
    }
    let mut taken: BTreeSet<&GpuRef> = existing
        .iter()
        .filter(|a| a.owner.deployment != request.deployment)
        .flat_map(|a| a.gpus.iter())
        .collect();
    for (w, a) in request.workers.iter().zip(&plan.assignments) {
        let id = &w.worker;
        if a.owner.worker != *id || a.owner.deployment != request.deployment {
            return Err(format!("assignment {:?} for worker {id}", a.owner));
        }
        if a.gpus.len() != w.gpus as usize {
            return Err(format!("{id}: {} GPUs, asked {}", a.gpus.len(), w.gpus));
        }
        if let Some(f) = &request.rack_filter
            && !f.contains(&a.rack)
        {
            return Err(format!("{id}: rack {} not allowed", a.rack));
        }
        for g in &a.gpus {
            let Some((rack, tray)) = where_is.get(g.node.as_str()) else {
                return Err(format!("{id}: node {} unknown", g.node));
            };
            if *rack != a.rack {
                return Err(format!(
                    "{id}: GPU on {} is in rack {rack}, not {}",
                    g.node, a.rack
                ));
            }
            if g.index >= tray.gpus || tray.unhealthy.contains(&g.index) {
                return Err(format!(
                    "{id}: GPU {}:{} absent or unhealthy",
                    g.node, g.index
                ));
            }
            if !taken.insert(g) {
                return Err(format!("{id}: GPU {}:{} assigned twice", g.node, g.index));
            }
        }
        let kept = plan.kept.contains(id);
        let before: Vec<&Allocation> = existing.iter().filter(|e| e.owner == a.owner).collect();
        if kept && !before.contains(&a) {
            return Err(format!("{id}: kept but its GPUs changed"));
        }
        if !kept {
            check_shape(a, w.gpus, &where_is)?;
        }
    }
    let racks: BTreeSet<&String> = plan.assignments.iter().map(|a| &a.rack).collect();
    if plan.split_across_racks != (racks.len() > 1) {
        return Err(format!(
            "split_across_racks is {} for racks {racks:?}",
            plan.split_across_racks
        ));
    }
    Ok(())
}

/// Rule 2 for a newly placed worker: `g / T` whole trays plus `g % T` GPUs
/// on one more tray.
fn check_shape(
    a: &Allocation,
    g: u32,
    where_is: &BTreeMap<&str, (&str, &TrayInventory)>,
) -> Result<(), String> {
    let mut per_tray: BTreeMap<&str, u32> = BTreeMap::new();
    for gpu in &a.gpus {
        *per_tray.entry(&gpu.node).or_default() += 1;
    }
    let full = per_tray
        .iter()
        .filter(|(n, c)| {
            where_is
                .get(*n)
                .is_some_and(|(_, t)| t.gpus == **c && t.gpus == T)
        })
        .count() as u32;
    let partial: Vec<u32> = per_tray
        .iter()
        .filter(|(n, c)| {
            !where_is
                .get(*n)
                .is_some_and(|(_, t)| t.gpus == **c && t.gpus == T)
        })
        .map(|(_, c)| *c)
        .collect();
    let want_partial: Vec<u32> = if !g.is_multiple_of(T) {
        vec![g % T]
    } else {
        vec![]
    };
    if full != g / T || partial != want_partial {
        return Err(format!(
            "{}: {g} GPUs as {full} whole trays + {partial:?}",
            a.owner.worker
        ));
    }
    Ok(())
}
