//! The placement algorithm over a [`Cluster`]: keep what is still valid,
//! choose racks for the rest (rule 3, 7), choose trays within a rack (rule
//! 2, 7), and assemble the [`Plan`]. All changes to the map are journaled and
//! rolled back when placement fails.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use super::error::{PlacementError, Result};
use super::state::{Cluster, FitKey, Held, Journal, Pos, Rack};
use super::{Allocation, DeploymentRequest, GpuRef, MoveReason, Plan, WorkerId, WorkerRequest};

/// A worker still to place: its index in the request and its size.
#[derive(Debug, Clone, Copy)]
struct Pending {
    req: usize,
    gpus: u32,
}

/// Where earlier steps put the workers of this attempt: request index →
/// (rack, GPUs).
type Placed = BTreeMap<usize, (usize, Vec<Pos>)>;

/// What stability (rule 5) decided for the deployment's existing workers.
#[derive(Debug, Default)]
struct Triage<'a> {
    kept: BTreeMap<String, Held<'a>>,
    moved: BTreeMap<String, (MoveReason, Option<usize>)>,
    released: BTreeSet<String>,
}

impl<'a> Cluster<'a> {
    /// Places one deployment (rules in the [module docs](super)) and records
    /// the result in the map: the deployment's allocations become the plan's
    /// assignments. On error the map is left exactly as it was.
    pub fn place(&mut self, request: &DeploymentRequest) -> Result<Plan> {
        validate(request)?;
        let mut journal = Journal::new();
        match self.place_journaled(request, &mut journal) {
            Ok((plan, held)) => {
                if held.is_empty() {
                    self.holdings.remove(&request.deployment);
                } else {
                    self.holdings.insert(request.deployment.clone(), held);
                }
                Ok(plan)
            }
            Err(e) => {
                self.rollback(journal);
                Err(e)
            }
        }
    }

    fn place_journaled(
        &mut self,
        request: &DeploymentRequest,
        journal: &mut Journal,
    ) -> Result<(Plan, Vec<Held<'a>>)> {
        let allowed = self.allowed(request);
        let triage = self.triage(request, &allowed, journal);

        let mut pending: Vec<Pending> = request
            .workers
            .iter()
            .enumerate()
            .filter(|(_, w)| !triage.kept.contains_key(&w.worker))
            .map(|(req, w)| Pending { req, gpus: w.gpus })
            .collect();
        pending.sort_by(|a, b| {
            (Reverse(a.gpus), &request.workers[a.req].worker)
                .cmp(&(Reverse(b.gpus), &request.workers[b.req].worker))
        });

        let mut placed = Placed::new();
        if !pending.is_empty() {
            self.check_capacity(request, &allowed, &pending)?;
            self.choose_racks(request, &allowed, &triage, pending, &mut placed, journal)?;
        }
        Ok(self.assemble(request, triage, placed))
    }

    /// Allowed rack indices, in rack order.
    fn allowed(&self, request: &DeploymentRequest) -> Vec<usize> {
        match &request.rack_filter {
            None => (0..self.racks.len()).collect(),
            Some(filter) => {
                let mut v: Vec<usize> = filter.iter().filter_map(|n| self.rack_index(n)).collect();
                v.sort_unstable();
                v
            }
        }
    }

    /// Releases all of the deployment's GPUs, then re-holds the first valid
    /// allocation of each requested worker (allocations in name order).
    fn triage(
        &mut self,
        request: &DeploymentRequest,
        allowed: &[usize],
        journal: &mut Journal,
    ) -> Triage<'a> {
        let old = self
            .holdings
            .get(&request.deployment)
            .cloned()
            .unwrap_or_default();
        for p in old.iter().flat_map(|h| h.pos.iter().flatten()) {
            self.release(*p, journal);
        }
        let mut by_worker: BTreeMap<String, Vec<Held<'a>>> = BTreeMap::new();
        for h in old {
            by_worker
                .entry(h.alloc.owner.worker.clone())
                .or_default()
                .push(h);
        }
        let sizes: BTreeMap<&str, u32> = request
            .workers
            .iter()
            .map(|w| (w.worker.as_str(), w.gpus))
            .collect();
        let mut triage = Triage::default();
        for (worker, mut helds) in by_worker {
            let Some(&gpus) = sizes.get(worker.as_str()) else {
                triage.released.insert(worker);
                continue;
            };
            helds.sort_by(|a, b| {
                (&a.alloc.rack, &a.alloc.gpus).cmp(&(&b.alloc.rack, &b.alloc.gpus))
            });
            let mut first_reason = None;
            for h in helds {
                match self.check(request, &h, gpus) {
                    Ok(()) => {
                        for p in h.pos.iter().flatten() {
                            self.hold(*p, journal);
                        }
                        triage.kept.insert(worker.clone(), h);
                        break;
                    }
                    Err(reason) => {
                        let rack = self
                            .rack_index(&h.alloc.rack)
                            .filter(|r| allowed.binary_search(r).is_ok());
                        first_reason.get_or_insert((reason, rack));
                    }
                }
            }
            if let (false, Some(reason)) = (triage.kept.contains_key(&worker), first_reason) {
                triage.moved.insert(worker, reason);
            }
        }
        triage
    }

    /// Whether an existing allocation may be kept as it is (rule 5).
    fn check(
        &self,
        request: &DeploymentRequest,
        h: &Held<'_>,
        gpus: u32,
    ) -> std::result::Result<(), MoveReason> {
        if h.alloc.gpus.len() != gpus as usize {
            return Err(MoveReason::SizeChanged);
        }
        if let Some(filter) = &request.rack_filter
            && !filter.contains(&h.alloc.rack)
        {
            return Err(MoveReason::RackNotAllowed);
        }
        let rack = self.rack_index(&h.alloc.rack).ok_or(MoveReason::NodeGone)?;
        let mut pos = Vec::with_capacity(h.pos.len());
        for p in &h.pos {
            match p {
                Some(p) if p.rack == rack => pos.push(*p),
                _ => return Err(MoveReason::NodeGone),
            }
        }
        if pos.iter().any(|&p| !self.is_healthy(p)) {
            return Err(MoveReason::UnhealthyGpu);
        }
        let held_elsewhere = pos.iter().any(|&p| self.holders(p) > 0);
        pos.sort_unstable();
        pos.dedup();
        if held_elsewhere || pos.len() != h.pos.len() {
            return Err(MoveReason::Conflict);
        }
        Ok(())
    }

    fn check_capacity(
        &self,
        request: &DeploymentRequest,
        allowed: &[usize],
        pending: &[Pending],
    ) -> Result<()> {
        if allowed.is_empty() {
            let filter = request
                .rack_filter
                .as_ref()
                .map(|f| f.iter().cloned().collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            return Err(PlacementError::NoRackAllowed {
                deployment: request.deployment.clone(),
                filter: format!("[{filter}]"),
            });
        }
        let needed: u32 = pending.iter().map(|p| p.gpus).fold(0, u32::saturating_add);
        let sum = |f: fn(&Rack) -> u32| -> u32 { allowed.iter().map(|&r| f(&self.racks[r])).sum() };
        let free: u32 = sum(|r| r.free);
        if needed > free {
            return Err(PlacementError::InsufficientGpus {
                deployment: request.deployment.clone(),
                needed,
                workers: pending.len(),
                racks: allowed.len(),
                free,
                healthy: sum(|r| r.healthy),
                total: sum(|r| r.total),
            });
        }
        Ok(())
    }

    /// Rule 3: racks where the deployment keeps workers take what they can;
    /// the rest goes, all together, to a rack a moved worker came from, else
    /// to the best-fitting rack; else, whole workers at a time, to the rack
    /// that takes the most GPUs of them.
    fn choose_racks(
        &mut self,
        request: &DeploymentRequest,
        allowed: &[usize],
        triage: &Triage<'_>,
        mut rest: Vec<Pending>,
        placed: &mut Placed,
        journal: &mut Journal,
    ) -> Result<()> {
        let kept_racks =
            by_gpus(triage.kept.values().filter_map(|h| {
                Some((self.rack_index(&h.alloc.rack)?, h.alloc.gpus.len() as u32))
            }));
        for r in kept_racks {
            let subset = self.greedy_subset(r, &rest);
            rest = self.commit(request, r, rest, &subset, placed, journal)?;
        }
        let moved_racks = by_gpus(triage.moved.iter().filter_map(|(w, (_, rack))| {
            let gpus = request.workers.iter().find(|x| &x.worker == w)?.gpus;
            Some(((*rack)?, gpus))
        }));
        let sizes: Vec<u32> = rest.iter().map(|p| p.gpus).collect();
        if let Some(r) = moved_racks
            .into_iter()
            .find(|&r| !rest.is_empty() && self.racks[r].fit(&sizes).is_some())
        {
            let all: Vec<usize> = (0..rest.len()).collect();
            rest = self.commit(request, r, rest, &all, placed, journal)?;
        }
        while !rest.is_empty() {
            let sizes: Vec<u32> = rest.iter().map(|p| p.gpus).collect();
            let total: u32 = sizes.iter().sum();
            let best_all = allowed
                .iter()
                .filter(|&&r| self.racks[r].free >= total)
                .filter_map(|&r| Some((self.racks[r].fit(&sizes)?, r)))
                .min();
            let (r, subset) = match best_all {
                Some((_, r)) => (r, (0..rest.len()).collect()),
                None => match self.best_subset(allowed, &rest) {
                    Some(found) => found,
                    None => return Err(self.does_not_fit(request, allowed, rest[0], placed.len())),
                },
            };
            rest = self.commit(request, r, rest, &subset, placed, journal)?;
        }
        Ok(())
    }

    /// Indices into `rest` of the workers rack `r` takes when offered them in
    /// order (largest first), each added only if all chosen still fit.
    fn greedy_subset(&self, r: usize, rest: &[Pending]) -> Vec<usize> {
        let rack = &self.racks[r];
        let mut chosen = Vec::new();
        let mut sizes = Vec::new();
        for (i, p) in rest.iter().enumerate() {
            if p.gpus > rack.free {
                continue;
            }
            sizes.push(p.gpus);
            if rack.fit(&sizes).is_some() {
                chosen.push(i);
            } else {
                sizes.pop();
            }
        }
        chosen
    }

    /// The rack whose greedy subset holds the most GPUs (then best fit, then
    /// rack order), with that subset; `None` when no rack takes any worker.
    fn best_subset(&self, allowed: &[usize], rest: &[Pending]) -> Option<(usize, Vec<usize>)> {
        let smallest = rest.iter().map(|p| p.gpus).min()?;
        allowed
            .iter()
            .filter(|&&r| self.racks[r].free >= smallest)
            .filter_map(|&r| {
                let subset = self.greedy_subset(r, rest);
                let sizes: Vec<u32> = subset.iter().map(|&i| rest[i].gpus).collect();
                let gpus: u32 = sizes.iter().sum();
                let key: FitKey = self.racks[r].fit(&sizes)?;
                (!subset.is_empty()).then_some(((Reverse(gpus), key, r), subset))
            })
            .min_by(|a, b| a.0.cmp(&b.0))
            .map(|((_, _, r), subset)| (r, subset))
    }

    /// Places `rest[subset]` in rack `r` (whole trays for all first, then
    /// remainders largest first, as `Rack::fit` assumes) and returns the
    /// workers still to place.
    fn commit(
        &mut self,
        request: &DeploymentRequest,
        r: usize,
        rest: Vec<Pending>,
        subset: &[usize],
        placed: &mut Placed,
        journal: &mut Journal,
    ) -> Result<Vec<Pending>> {
        if subset.is_empty() {
            return Ok(rest);
        }
        let t = self.racks[r].tray_gpus.max(1);
        let mut got: Vec<(Pending, Vec<Pos>)> = Vec::with_capacity(subset.len());
        for &i in subset {
            let p = rest[i];
            let whole = (p.gpus / t) as usize;
            let gpus = self.take_whole(r, whole, journal);
            if gpus.len() != whole * t as usize {
                return Err(self.does_not_fit(request, &[r], p, placed.len()));
            }
            got.push((p, gpus));
        }
        let mut by_rem: Vec<usize> = (0..got.len())
            .filter(|&i| !got[i].0.gpus.is_multiple_of(t))
            .collect();
        by_rem.sort_by_key(|&i| Reverse(got[i].0.gpus % t));
        for i in by_rem {
            let p = got[i].0;
            match self.take_remainder(r, p.gpus % t, journal) {
                Some(gpus) => got[i].1.extend(gpus),
                None => return Err(self.does_not_fit(request, &[r], p, placed.len())),
            }
        }
        for (p, mut gpus) in got {
            gpus.sort_unstable();
            placed.insert(p.req, (r, gpus));
        }
        let taken: BTreeSet<usize> = subset.iter().copied().collect();
        Ok(rest
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !taken.contains(i))
            .map(|(_, p)| p)
            .collect())
    }

    fn does_not_fit(
        &self,
        request: &DeploymentRequest,
        allowed: &[usize],
        p: Pending,
        placed_before: usize,
    ) -> PlacementError {
        let best = allowed
            .iter()
            .map(|&r| (self.racks[r].largest_block(), Reverse(r)))
            .max()
            .map(|(block, Reverse(r))| (block, r));
        let (largest_block, rack) = best.unwrap_or((0, 0));
        let t = self.racks.get(rack).map_or(0, |r| r.tray_gpus).max(1);
        PlacementError::WorkerDoesNotFit {
            deployment: request.deployment.clone(),
            worker: request.workers[p.req].worker.clone(),
            gpus: p.gpus,
            whole_trays: p.gpus / t,
            remainder: p.gpus % t,
            largest_block,
            rack: self
                .racks
                .get(rack)
                .map(|r| r.name.to_string())
                .unwrap_or_default(),
            placed_before,
        }
    }

    fn assemble(
        &self,
        request: &DeploymentRequest,
        triage: Triage<'a>,
        placed: Placed,
    ) -> (Plan, Vec<Held<'a>>) {
        let mut plan = Plan {
            deployment: request.deployment.clone(),
            assignments: Vec::with_capacity(request.workers.len()),
            kept: Vec::new(),
            moved: Vec::new(),
            added: Vec::new(),
            released: triage.released.into_iter().collect(),
            racks: Vec::new(),
            split_across_racks: false,
        };
        let mut held = Vec::with_capacity(request.workers.len());
        for (i, w) in request.workers.iter().enumerate() {
            if let Some(h) = triage.kept.get(&w.worker) {
                plan.kept.push(w.worker.clone());
                plan.assignments.push(h.alloc.as_ref().clone());
                held.push(h.clone());
                continue;
            }
            match triage.moved.get(&w.worker) {
                Some((reason, _)) => plan.moved.push((w.worker.clone(), *reason)),
                None => plan.added.push(w.worker.clone()),
            }
            if let Some((r, gpus)) = placed.get(&i) {
                let alloc = self.allocation(request, w, *r, gpus);
                plan.assignments.push(alloc.clone());
                held.push(Held {
                    alloc: Cow::Owned(alloc),
                    pos: gpus.iter().map(|&p| Some(p)).collect(),
                });
            }
        }
        let racks: BTreeSet<&String> = plan.assignments.iter().map(|a| &a.rack).collect();
        plan.racks = racks.into_iter().cloned().collect();
        plan.split_across_racks = plan.racks.len() > 1;
        (plan, held)
    }

    fn allocation(
        &self,
        request: &DeploymentRequest,
        w: &WorkerRequest,
        r: usize,
        gpus: &[Pos],
    ) -> Allocation {
        let rack = &self.racks[r];
        Allocation {
            owner: WorkerId {
                deployment: request.deployment.clone(),
                worker: w.worker.clone(),
            },
            rack: rack.name.to_string(),
            gpus: gpus
                .iter()
                .map(|p| GpuRef {
                    node: rack.trays[p.tray].node.to_string(),
                    index: p.idx,
                })
                .collect(),
        }
    }
}

/// Rack indices ordered by GPUs summed per rack (most first), then rack order.
fn by_gpus(items: impl Iterator<Item = (usize, u32)>) -> Vec<usize> {
    let mut per_rack: BTreeMap<usize, u32> = BTreeMap::new();
    for (r, g) in items {
        *per_rack.entry(r).or_default() += g;
    }
    let mut v: Vec<(usize, u32)> = per_rack.into_iter().collect();
    v.sort_by_key(|&(r, g)| (Reverse(g), r));
    v.into_iter().map(|(r, _)| r).collect()
}

fn validate(request: &DeploymentRequest) -> Result<()> {
    let invalid = |msg: String| Err(PlacementError::InvalidRequest(msg));
    if request.deployment.is_empty() {
        return invalid("the deployment name is empty".to_string());
    }
    let mut names = BTreeSet::new();
    for w in &request.workers {
        if w.worker.is_empty() {
            return invalid(format!(
                "a worker of {} has an empty name",
                request.deployment
            ));
        }
        if !names.insert(w.worker.as_str()) {
            return invalid(format!(
                "worker {} of {} is listed twice",
                w.worker, request.deployment
            ));
        }
        if w.gpus == 0 {
            return invalid(format!(
                "worker {} of {} asks for 0 GPUs",
                w.worker, request.deployment
            ));
        }
    }
    Ok(())
}
