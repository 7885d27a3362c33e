//! The GPU map placement works on: racks, trays, who holds which GPU, and
//! the per-rack counters that make fit checks O(workers).
//!
//! Invariants kept by every mutation (all go through `Cluster::set_holders`):
//! a tray's `used` bit is set exactly when the GPU's holder count is
//! non-zero, and each rack's `free`, `whole_free` and `hist` equal what a
//! full scan of its trays would give. Mutations made while placing are
//! journaled so a failed placement restores the map exactly.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use super::error::{PlacementError, Result};
use super::{Allocation, RackInventory, RackUsage, Stranded};

/// Most GPUs one tray may have (a tray's GPUs are a `u64` bit set).
const MAX_TRAY_GPUS: u32 = 64;

/// Bit set of GPUs `0..n`.
pub(super) fn mask(n: u32) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

/// Node name → (rack, tray). Lookups only, never iterated, so the hasher
/// does not affect determinism.
pub(super) type NodeIndex<'a> = HashMap<&'a str, (usize, usize), BuildHasherDefault<Fx>>;

/// FxHash-style word-at-a-time hashing: node names are short and trusted,
/// and SipHash dominated building the map at fleet scale.
#[derive(Debug, Default)]
pub(super) struct Fx(u64);

impl Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
}

/// One GPU's place in the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Pos {
    pub rack: usize,
    pub tray: usize,
    pub idx: u32,
}

#[derive(Debug, Clone)]
pub(super) struct Tray<'a> {
    pub node: &'a str,
    pub cap: u32,
    /// Healthy GPUs (bits `0..cap`).
    pub healthy: u64,
    /// GPUs held by at least one allocation.
    pub used: u64,
}

impl Tray<'_> {
    pub fn free_mask(&self) -> u64 {
        self.healthy & !self.used
    }

    pub fn free(&self) -> u32 {
        self.free_mask().count_ones()
    }
}

#[derive(Debug, Clone)]
pub(super) struct Rack<'a> {
    pub name: &'a str,
    /// `T`: the largest GPU count of the rack's trays.
    pub tray_gpus: u32,
    pub trays: Vec<Tray<'a>>,
    /// Offset of each tray's GPUs in `holders`.
    base: Vec<usize>,
    /// Holder count per GPU (more than one only when inputs conflict).
    holders: Vec<u16>,
    pub total: u32,
    pub healthy: u32,
    /// Free healthy GPUs.
    pub free: u32,
    /// Whole-free trays.
    pub whole_free: u32,
    /// `hist[k]`: trays that are not whole-free and have `k` free GPUs.
    pub hist: Vec<u32>,
}

impl Rack<'_> {
    pub fn is_whole(&self, tray: usize) -> bool {
        let t = &self.trays[tray];
        t.cap == self.tray_gpus && t.cap > 0 && t.free_mask() == mask(t.cap)
    }

    /// Adds (`add`) or removes one tray's share of the rack counters.
    fn count(&mut self, tray: usize, add: bool) {
        let free = self.trays[tray].free();
        let apply = |v: &mut u32, by: u32| {
            *v = if add { *v + by } else { v.saturating_sub(by) };
        };
        if self.is_whole(tray) {
            apply(&mut self.whole_free, 1);
        } else if let Some(h) = self.hist.get_mut(free as usize) {
            apply(h, 1);
        }
        apply(&mut self.free, free);
    }

    fn holders_of(&self, tray: usize, idx: u32) -> u16 {
        self.holders[self.base[tray] + idx as usize]
    }

    /// Contiguous runs `(start, len)` of whole-free trays, in tray order.
    pub fn whole_runs(&self) -> Vec<(usize, usize)> {
        let mut runs = Vec::new();
        let mut start = None;
        for t in 0..self.trays.len() {
            match (self.is_whole(t), start) {
                (true, None) => start = Some(t),
                (false, Some(s)) => {
                    runs.push((s, t - s));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            runs.push((s, self.trays.len() - s));
        }
        runs
    }

    /// The largest worker this rack could still take under rule 2.
    pub fn largest_block(&self) -> u32 {
        let partial = (0..self.hist.len())
            .rev()
            .find(|&k| self.hist[k] > 0)
            .unwrap_or(0);
        self.whole_free * self.tray_gpus + partial as u32
    }

    /// How this rack would hold workers of `sizes` GPUs, or `None` when it
    /// cannot. Mirrors `Cluster::commit` exactly: whole trays for every
    /// worker first, then remainders largest first, each best-fit into a
    /// partly used tray or else into a whole-free tray.
    pub fn fit(&self, sizes: &[u32]) -> Option<FitKey> {
        let t = self.tray_gpus;
        let total = sizes.iter().fold(0u32, |a, &g| a.saturating_add(g));
        if t == 0 || total > self.free {
            return None;
        }
        let mut whole = 0u32;
        let mut rems = [0u32; MAX_TRAY_GPUS as usize];
        let mut any_rem = false;
        for &g in sizes {
            whole = whole.saturating_add(g / t);
            if g % t > 0 {
                rems[(g % t) as usize] += 1;
                any_rem = true;
            }
        }
        if whole > self.whole_free {
            return None;
        }
        let mut whole_left = self.whole_free - whole;
        let mut broken = 0;
        if any_rem {
            let mut hist = [0u32; MAX_TRAY_GPUS as usize + 1];
            hist[..self.hist.len()].copy_from_slice(&self.hist);
            for r in (1..t as usize).rev() {
                for _ in 0..rems[r] {
                    if let Some(k) = (r..t as usize).find(|&k| hist[k] > 0) {
                        hist[k] -= 1;
                        hist[k - r] += 1;
                    } else if whole_left > 0 {
                        whole_left -= 1;
                        broken += 1;
                        hist[t as usize - r] += 1;
                    } else {
                        return None;
                    }
                }
            }
        }
        Some(FitKey {
            broken,
            whole_left,
            free_left: self.free - total,
        })
    }

    /// The most workers of `g` GPUs the rules let this rack take.
    fn capacity_for(&self, g: u32) -> u32 {
        let t = self.tray_gpus;
        if t == 0 || g == 0 {
            return 0;
        }
        let (a, r) = (g / t, g % t);
        if r == 0 {
            return self.whole_free / a;
        }
        // Remainder slots in partly used trays, and per broken whole tray.
        let slots: u32 = (0..self.hist.len())
            .map(|k| self.hist[k] * (k as u32 / r))
            .sum();
        let per_tray = t / r;
        let fits = |n: u32| {
            let extra = n.saturating_sub(slots).div_ceil(per_tray);
            n * a + extra <= self.whole_free
        };
        let mut n = 0;
        while fits(n + 1) {
            n += 1;
        }
        n
    }
}

/// How well a rack fits a set of workers; smaller is better (rule 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct FitKey {
    /// Whole-free trays opened for remainders.
    pub broken: u32,
    /// Whole-free trays left afterwards (best fit keeps big blocks elsewhere).
    pub whole_left: u32,
    /// Free GPUs left afterwards.
    pub free_left: u32,
}

/// An allocation as given, with each GPU resolved (`None`: not in the
/// inventory).
#[derive(Debug, Clone)]
pub(super) struct Held<'a> {
    pub alloc: Cow<'a, Allocation>,
    pub pos: Vec<Option<Pos>>,
}

/// Which allocations a [`Cluster`] remembers by owner; all of them occupy
/// their GPUs either way. Placing one deployment needs only its own.
#[derive(Debug, Clone, Copy)]
pub(super) enum Remember<'a> {
    All,
    Deployment(&'a str),
    Nothing,
}

/// Undo log of holder-count changes: `(gpu, previous count)`.
pub(super) type Journal = Vec<(Pos, u16)>;

/// The GPU map: every rack's trays and who holds which GPU. Build it once
/// from the inventory and existing allocations (it borrows both, so building
/// copies no names), then [`Cluster::place`] deployments one after another;
/// each successful placement updates the map. Inventory changes (health,
/// nodes) mean building a new one.
#[derive(Debug, Clone)]
pub struct Cluster<'a> {
    /// Sorted by name.
    pub(super) racks: Vec<Rack<'a>>,
    pub(super) nodes: NodeIndex<'a>,
    /// Allocations per deployment, in input order.
    pub(super) holdings: BTreeMap<String, Vec<Held<'a>>>,
}

impl<'a> Cluster<'a> {
    /// Builds the map. Fails on duplicate rack or node names and on trays of
    /// more than 64 GPUs. Allocations may name unknown nodes (those GPUs are
    /// simply not in the map) and may even overlap (a GPU then has several
    /// holders and stays used until all release it).
    pub fn new(inventory: &'a [RackInventory], allocations: &'a [Allocation]) -> Result<Self> {
        Self::build(inventory, allocations, Remember::All)
    }

    pub(super) fn build(
        inventory: &'a [RackInventory],
        allocations: &'a [Allocation],
        remember: Remember<'_>,
    ) -> Result<Self> {
        let mut order: Vec<&'a RackInventory> = inventory.iter().collect();
        order.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = order.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(PlacementError::InvalidInventory(format!(
                "rack {} is listed twice",
                w[0].name
            )));
        }
        let trays = inventory.iter().map(|r| r.trays.len()).sum();
        let mut nodes = NodeIndex::with_capacity_and_hasher(trays, Default::default());
        let mut racks = Vec::with_capacity(order.len());
        for (r, inv) in order.into_iter().enumerate() {
            racks.push(build_rack(r, inv, &mut nodes)?);
        }
        let mut cluster = Cluster {
            racks,
            nodes,
            holdings: BTreeMap::new(),
        };
        let mut buf: Vec<Option<Pos>> = Vec::new();
        for alloc in allocations {
            let keep = match remember {
                Remember::All => true,
                Remember::Deployment(d) => alloc.owner.deployment == d,
                Remember::Nothing => false,
            };
            buf.clear();
            buf.extend(cluster.resolve(alloc));
            buf.iter()
                .flatten()
                .for_each(|&p| cluster.hold_untracked(p));
            if !keep {
                continue;
            }
            let held = Held {
                alloc: Cow::Borrowed(alloc),
                pos: buf.clone(),
            };
            let owner = &alloc.owner.deployment;
            match cluster.holdings.get_mut(owner) {
                Some(v) => v.push(held),
                None => {
                    cluster.holdings.insert(owner.clone(), vec![held]);
                }
            }
        }
        Ok(cluster)
    }

    /// Every allocation the map holds, by deployment (name order), then in
    /// the order given or placed.
    pub fn allocations(&self) -> Vec<Allocation> {
        self.holdings
            .values()
            .flatten()
            .map(|h| h.alloc.as_ref().clone())
            .collect()
    }

    /// Allocations of one deployment.
    pub fn deployment_allocations(&self, deployment: &str) -> Vec<Allocation> {
        self.holdings
            .get(deployment)
            .map(|v| v.iter().map(|h| h.alloc.as_ref().clone()).collect())
            .unwrap_or_default()
    }

    /// Per-rack GPU counts, keyed by rack name.
    pub fn usage(&self) -> BTreeMap<String, RackUsage> {
        self.racks
            .iter()
            .map(|r| {
                let allocated = r.holders.iter().filter(|&&h| h > 0).count() as u32;
                let usage = RackUsage {
                    total: r.total,
                    healthy: r.healthy,
                    allocated,
                    free: r.free,
                    whole_free_trays: r.whole_free,
                };
                (r.name.to_string(), usage)
            })
            .collect()
    }

    /// Free healthy GPUs left over, per rack and in all, after packing as
    /// many workers of `worker_gpus` GPUs into every rack as rule 2 allows
    /// (computed from the counters; `worker_gpus == 0` strands everything).
    pub fn stranded(&self, worker_gpus: u32) -> Stranded {
        let mut per_rack = BTreeMap::new();
        let (mut free, mut stranded) = (0, 0);
        for r in &self.racks {
            let usable = r.capacity_for(worker_gpus).saturating_mul(worker_gpus);
            let left = r.free.saturating_sub(usable);
            free += r.free;
            stranded += left;
            per_rack.insert(r.name.to_string(), left);
        }
        Stranded {
            worker_gpus,
            free,
            stranded,
            per_rack,
        }
    }

    pub(super) fn rack_index(&self, name: &str) -> Option<usize> {
        self.racks.binary_search_by(|r| r.name.cmp(name)).ok()
    }

    fn resolve<'s, 'b>(
        &'s self,
        alloc: &'b Allocation,
    ) -> impl Iterator<Item = Option<Pos>> + use<'s, 'a, 'b> {
        // GPUs of one tray come together; look each node up once.
        let mut last: Option<(&str, Option<(usize, usize)>)> = None;
        alloc.gpus.iter().map(move |g| {
            let found = match last {
                Some((node, found)) if node == g.node => found,
                _ => {
                    let found = self.nodes.get(g.node.as_str()).copied();
                    last = Some((&g.node, found));
                    found
                }
            };
            let (rack, tray) = found?;
            (g.index < self.racks[rack].trays[tray].cap).then_some(Pos {
                rack,
                tray,
                idx: g.index,
            })
        })
    }

    pub(super) fn holders(&self, p: Pos) -> u16 {
        self.racks[p.rack].holders_of(p.tray, p.idx)
    }

    pub(super) fn is_healthy(&self, p: Pos) -> bool {
        self.racks[p.rack].trays[p.tray].healthy & (1 << p.idx) != 0
    }

    pub(super) fn hold(&mut self, p: Pos, journal: &mut Journal) {
        let h = self.holders(p);
        journal.push((p, h));
        self.set_holders(p, h.saturating_add(1));
    }

    fn hold_untracked(&mut self, p: Pos) {
        let h = self.holders(p);
        self.set_holders(p, h.saturating_add(1));
    }

    pub(super) fn release(&mut self, p: Pos, journal: &mut Journal) {
        let h = self.holders(p);
        if h > 0 {
            journal.push((p, h));
            self.set_holders(p, h - 1);
        }
    }

    /// Undoes journaled changes, newest first.
    pub(super) fn rollback(&mut self, journal: Journal) {
        for (p, old) in journal.into_iter().rev() {
            self.set_holders(p, old);
        }
    }

    fn set_holders(&mut self, p: Pos, count: u16) {
        let rack = &mut self.racks[p.rack];
        let slot = rack.base[p.tray] + p.idx as usize;
        let old = rack.holders[slot];
        rack.holders[slot] = count;
        if (old > 0) != (count > 0) {
            rack.count(p.tray, false);
            rack.trays[p.tray].used ^= 1 << p.idx;
            rack.count(p.tray, true);
        }
    }

    /// Takes `n` whole-free trays of rack `r` (rule 7: the smallest run that
    /// holds them, else the largest runs first) and holds all their GPUs.
    pub(super) fn take_whole(&mut self, r: usize, n: usize, journal: &mut Journal) -> Vec<Pos> {
        let mut taken = Vec::new();
        let mut need = n;
        while need > 0 {
            let runs = self.racks[r].whole_runs();
            let pick = runs
                .iter()
                .filter(|run| run.1 >= need)
                .min_by_key(|run| (run.1, run.0))
                .map(|&(s, _)| (s, need))
                .or_else(|| {
                    runs.iter()
                        .max_by_key(|run| (run.1, std::cmp::Reverse(run.0)))
                        .copied()
                });
            let Some((start, len)) = pick else { break };
            for tray in start..start + len {
                for idx in 0..self.racks[r].trays[tray].cap {
                    let p = Pos { rack: r, tray, idx };
                    self.hold(p, journal);
                    taken.push(p);
                }
            }
            need -= len;
        }
        taken
    }

    /// Takes `rem` GPUs on one tray of rack `r`: best fit among trays that
    /// are not whole-free, else the first tray of the smallest whole-free
    /// run; the lowest free indices. `None` when no tray has room.
    pub(super) fn take_remainder(
        &mut self,
        r: usize,
        rem: u32,
        journal: &mut Journal,
    ) -> Option<Vec<Pos>> {
        let rack = &self.racks[r];
        let partial = (0..rack.trays.len())
            .filter(|&t| !rack.is_whole(t) && rack.trays[t].free() >= rem)
            .min_by_key(|&t| (rack.trays[t].free(), t));
        let tray = partial.or_else(|| {
            rack.whole_runs()
                .into_iter()
                .min_by_key(|run| (run.1, run.0))
                .map(|run| run.0)
        })?;
        let mut free = rack.trays[tray].free_mask();
        let mut taken = Vec::with_capacity(rem as usize);
        for _ in 0..rem {
            let idx = free.trailing_zeros();
            free &= free - 1;
            let p = Pos { rack: r, tray, idx };
            self.hold(p, journal);
            taken.push(p);
        }
        Some(taken)
    }
}

fn build_rack<'a>(r: usize, inv: &'a RackInventory, nodes: &mut NodeIndex<'a>) -> Result<Rack<'a>> {
    let mut trays = Vec::with_capacity(inv.trays.len());
    let mut base = Vec::with_capacity(inv.trays.len());
    let mut slots = 0usize;
    for (t, tray) in inv.trays.iter().enumerate() {
        if tray.gpus > MAX_TRAY_GPUS {
            return Err(PlacementError::InvalidInventory(format!(
                "node {} in rack {} reports {} GPUs; at most {MAX_TRAY_GPUS} are supported",
                tray.node, inv.name, tray.gpus
            )));
        }
        let node = tray.node.as_str();
        if nodes.insert(node, (r, t)).is_some() {
            return Err(PlacementError::InvalidInventory(format!(
                "node {} is listed twice",
                tray.node
            )));
        }
        let unhealthy = tray
            .unhealthy
            .iter()
            .filter(|&&i| i < tray.gpus)
            .fold(0u64, |m, &i| m | (1 << i));
        trays.push(Tray {
            node,
            cap: tray.gpus,
            healthy: mask(tray.gpus) & !unhealthy,
            used: 0,
        });
        base.push(slots);
        slots += tray.gpus as usize;
    }
    let tray_gpus = trays.iter().map(|t| t.cap).max().unwrap_or(0);
    let mut rack = Rack {
        name: &inv.name,
        tray_gpus,
        total: trays.iter().map(|t| t.cap).sum(),
        healthy: trays.iter().map(|t| t.healthy.count_ones()).sum(),
        trays,
        base,
        holders: vec![0; slots],
        free: 0,
        whole_free: 0,
        hist: vec![0; tray_gpus as usize + 1],
    };
    for t in 0..rack.trays.len() {
        rack.count(t, true);
    }
    Ok(rack)
}
