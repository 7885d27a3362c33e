//! The live rebalancer's pure parts: what the operator does with engines'
//! load reports and a decided [`Transition`] before any I/O happens.
//!
//! - [`Sampler`] turns successive load reports (cumulative counters plus
//!   gauges) into the [`Observation`] of one decision: arrival rate and mean
//!   lengths from counter deltas over the reports' own times, queues and
//!   latencies from the latest gauges.
//! - [`choose_drains`] picks which workers of a shrinking pool leave: the
//!   least loaded running ones, all in one rack so their GPUs can be reused
//!   together.
//! - [`carve`] cuts the drained workers' GPUs into workers of the other
//!   shape (whole trays for tray-sized workers, never across racks), so a
//!   move relaunches on the same GPUs.
//! - [`fresh_names`] names the new workers without reusing a live name.
//!
//! Invariants: a rate is only computed from two reports of the same worker
//! whose counters did not go back (a restarted engine starts from zero);
//! every carved worker has exactly its shape's GPU count, inside one rack.

use std::collections::{BTreeMap, BTreeSet};

use super::{Demand, Observation, PoolLoad, Split, Transition};
use crate::crd::{NodeGpus, Pool, WorkerState, WorkerStatus};

/// One worker's load report, in the operator's terms.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LoadSample {
    /// When the engine took it (wall seconds since the Unix epoch).
    pub at_s: f64,
    pub queued: u32,
    pub running: u32,
    pub kv_used: u64,
    pub kv_total: u64,
    /// Recent mean TTFT / TPOT, modelled seconds; 0 when none yet.
    pub ttft_s: f64,
    pub tpot_s: f64,
    /// Counters since the engine started.
    pub prefills: u64,
    pub prompt_tokens: u64,
    pub decodes: u64,
    pub requested_output_tokens: u64,
}

/// Differences successive reports of each worker.
#[derive(Debug, Clone, Default)]
pub struct Sampler {
    last: BTreeMap<String, LoadSample>,
}

/// Counter growth of one worker between two reports.
#[derive(Debug, Clone, Copy, Default)]
struct Delta {
    seconds: f64,
    prefills: u64,
    prompt_tokens: u64,
    decodes: u64,
    requested_output_tokens: u64,
}

impl Delta {
    fn between(before: &LoadSample, after: &LoadSample, time_scale: f64) -> Option<Self> {
        let seconds = (after.at_s - before.at_s) * time_scale;
        let grew = after.prefills >= before.prefills
            && after.prompt_tokens >= before.prompt_tokens
            && after.decodes >= before.decodes
            && after.requested_output_tokens >= before.requested_output_tokens;
        (seconds > 0.0 && grew).then(|| Self {
            seconds,
            prefills: after.prefills - before.prefills,
            prompt_tokens: after.prompt_tokens - before.prompt_tokens,
            decodes: after.decodes - before.decodes,
            requested_output_tokens: after.requested_output_tokens - before.requested_output_tokens,
        })
    }
}

/// What a [`Sampler`] needs besides the reports.
#[derive(Debug, Clone, Copy)]
pub struct SampleContext {
    /// Modelled seconds now (the decision's clock).
    pub now_s: f64,
    /// The split serving now.
    pub split: Split,
    /// A move is still draining or loading.
    pub switching: bool,
    /// Modelled seconds per wall second (1 on real hardware).
    pub time_scale: f64,
    /// Mean lengths to assume before any request was seen (the spec's
    /// workload: 90% of nominal, as lengths are drawn from 80-100%).
    pub fallback_isl: f64,
    pub fallback_osl: f64,
}

fn pool_load(samples: &[&LoadSample]) -> PoolLoad {
    let mean = |f: fn(&LoadSample) -> f64| {
        let v: Vec<f64> = samples.iter().map(|s| f(s)).filter(|v| *v > 0.0).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let (used, total) = samples
        .iter()
        .fold((0u64, 0u64), |(u, t), s| (u + s.kv_used, t + s.kv_total));
    PoolLoad {
        queued: samples.iter().map(|s| s.queued).sum(),
        running: samples.iter().map(|s| s.running).sum(),
        kv_use: if total == 0 {
            0.0
        } else {
            used as f64 / total as f64
        },
        ttft_s: mean(|s| s.ttft_s),
        tpot_s: mean(|s| s.tpot_s),
    }
}

impl Sampler {
    /// The observation from the latest report of each serving worker
    /// (`samples`: worker name -> (pool, report)). Workers not serving now
    /// (draining, loading) are left out by the caller.
    pub fn observe(
        &mut self,
        ctx: SampleContext,
        samples: &BTreeMap<String, (Pool, LoadSample)>,
    ) -> Observation {
        let mut prefill_deltas = Vec::new();
        let mut decode_deltas = Vec::new();
        for (worker, (pool, sample)) in samples {
            if let Some(d) = self
                .last
                .get(worker)
                .and_then(|before| Delta::between(before, sample, ctx.time_scale))
            {
                match pool {
                    Pool::Prefill => prefill_deltas.push(d),
                    Pool::Decode => decode_deltas.push(d),
                }
            }
        }
        // Reports of a worker that did not send a new one keep their place,
        // so the next delta spans the gap.
        for (worker, (_, sample)) in samples {
            let newer = self
                .last
                .get(worker)
                .is_none_or(|before| sample.at_s > before.at_s);
            if newer {
                self.last.insert(worker.clone(), *sample);
            }
        }
        self.last.retain(|w, _| samples.contains_key(w));

        let rate: f64 = prefill_deltas
            .iter()
            .map(|d| d.prefills as f64 / d.seconds)
            .sum();
        let prefills: u64 = prefill_deltas.iter().map(|d| d.prefills).sum();
        let prompt: u64 = prefill_deltas.iter().map(|d| d.prompt_tokens).sum();
        let decodes: u64 = decode_deltas.iter().map(|d| d.decodes).sum();
        let output: u64 = decode_deltas
            .iter()
            .map(|d| d.requested_output_tokens)
            .sum();
        let isl = if prefills > 0 {
            prompt as f64 / prefills as f64
        } else {
            ctx.fallback_isl
        };
        let osl = if decodes > 0 {
            output as f64 / decodes as f64
        } else {
            ctx.fallback_osl
        };
        let of = |want: Pool| -> Vec<&LoadSample> {
            samples
                .values()
                .filter(|(p, _)| *p == want)
                .map(|(_, s)| s)
                .collect()
        };
        Observation {
            now_s: ctx.now_s,
            split: ctx.split,
            switching: ctx.switching,
            demand: Demand { rate, isl, osl },
            prefill: pool_load(&of(Pool::Prefill)),
            decode: pool_load(&of(Pool::Decode)),
        }
    }
}

/// The split the workers of `status` form.
pub fn split_of(workers: &[WorkerStatus]) -> Split {
    let count = |p| workers.iter().filter(|w| w.role == p).count() as u32;
    Split {
        prefill: count(Pool::Prefill),
        decode: count(Pool::Decode),
    }
}

/// Queued plus running requests of `worker`, from its last report.
fn busy(samples: &BTreeMap<String, (Pool, LoadSample)>, worker: &str) -> u32 {
    samples.get(worker).map_or(0, |(_, s)| s.queued + s.running)
}

/// The workers to drain for `t`: of each shrinking pool, the running
/// workers with the least work (then the highest name, so the recipe's
/// first workers stay), all from one rack: one that has enough of them,
/// the one with most on a tie.
/// Returns fewer than asked when too few are running.
pub fn choose_drains(
    t: &Transition,
    workers: &[WorkerStatus],
    samples: &BTreeMap<String, (Pool, LoadSample)>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (pool, n) in [
        (Pool::Prefill, t.drain_prefill),
        (Pool::Decode, t.drain_decode),
    ] {
        if n == 0 {
            continue;
        }
        let running: Vec<&WorkerStatus> = workers
            .iter()
            .filter(|w| w.role == pool && w.state == WorkerState::Running)
            .collect();
        let mut per_rack: BTreeMap<&str, Vec<&WorkerStatus>> = BTreeMap::new();
        for w in &running {
            per_rack.entry(w.rack.as_str()).or_default().push(w);
        }
        let Some(mut pick) = per_rack
            .into_values()
            .max_by_key(|ws| (ws.len().min(n as usize), ws.len()))
        else {
            continue;
        };
        pick.sort_by(|a, b| {
            busy(samples, &a.name)
                .cmp(&busy(samples, &b.name))
                .then_with(|| natural(&b.name).cmp(&natural(&a.name)))
        });
        out.extend(pick.into_iter().take(n as usize).map(|w| w.name.clone()));
    }
    out
}

/// `prefill-12` sorts after `prefill-3`.
fn natural(name: &str) -> (String, u64) {
    match name.rsplit_once('-') {
        Some((stem, n)) => match n.parse() {
            Ok(n) => (stem.to_string(), n),
            Err(_) => (name.to_string(), 0),
        },
        None => (name.to_string(), 0),
    }
}

/// `n` names `{pool}-{i}` for the lowest indices no name in `taken` uses.
pub fn fresh_names(pool: Pool, n: u32, taken: &BTreeSet<String>) -> Vec<String> {
    let stem = match pool {
        Pool::Prefill => "prefill",
        Pool::Decode => "decode",
    };
    (0..)
        .map(|i| format!("{stem}-{i}"))
        .filter(|name| !taken.contains(name))
        .take(n as usize)
        .collect()
}

/// A new worker on GPUs a move freed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carved {
    pub worker: String,
    pub rack: String,
    pub placement: Vec<NodeGpus>,
}

/// Cuts the GPUs of `freed` (workers of one rack, in drain order) into the
/// `wanted` workers (name, GPU count): a worker smaller than a tray takes
/// GPUs of one tray (the tightest that fits); a larger one takes whole
/// trays. Workers that cannot be cut from what is left are not returned
/// (placement finds them GPUs); GPUs left over go back to the rack.
pub fn carve(freed: &[WorkerStatus], wanted: &[(String, u32)]) -> Vec<Carved> {
    let Some(rack) = freed.first().map(|w| w.rack.clone()) else {
        return Vec::new();
    };
    // Free GPUs per node, nodes in the order they were freed.
    let mut nodes: Vec<(String, Vec<u32>)> = Vec::new();
    for w in freed.iter().filter(|w| w.rack == rack) {
        for n in &w.placement {
            match nodes.iter_mut().find(|(node, _)| *node == n.node) {
                Some((_, g)) => g.extend(&n.gpus),
                None => nodes.push((n.node.clone(), n.gpus.clone())),
            }
        }
    }
    for (_, g) in &mut nodes {
        g.sort_unstable();
        g.dedup();
    }
    // GPUs per tray: at least the highest index seen (a tray's GPUs are
    // numbered from 0), so half a tray is never taken for a whole one.
    let tray = nodes
        .iter()
        .map(|(_, g)| (g.len() as u32).max(g.last().map_or(0, |i| i + 1)))
        .max()
        .unwrap_or(0);
    let mut out = Vec::new();
    for (name, gpus) in wanted {
        let gpus = *gpus;
        if gpus == 0 {
            continue;
        }
        let placement = if gpus <= tray {
            // The tightest node with room, its lowest GPUs.
            let best = nodes
                .iter_mut()
                .filter(|(_, g)| g.len() >= gpus as usize)
                .min_by_key(|(_, g)| g.len());
            best.map(|(node, g)| {
                let taken: Vec<u32> = g.drain(..gpus as usize).collect();
                vec![NodeGpus {
                    node: node.clone(),
                    gpus: taken,
                }]
            })
        } else {
            // Whole nodes until the count is met exactly.
            let mut picked = Vec::new();
            let mut have = 0u32;
            for (i, (_, g)) in nodes.iter().enumerate() {
                let len = g.len() as u32;
                if len == tray && have + len <= gpus {
                    picked.push(i);
                    have += len;
                }
                if have == gpus {
                    break;
                }
            }
            (have == gpus).then(|| {
                picked
                    .iter()
                    .map(|&i| NodeGpus {
                        node: nodes[i].0.clone(),
                        gpus: std::mem::take(&mut nodes[i].1),
                    })
                    .collect()
            })
        };
        if let Some(placement) = placement {
            out.push(Carved {
                worker: name.clone(),
                rack: rack.clone(),
                placement,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(name: &str, role: Pool, rack: &str, nodes: &[(&str, &[u32])]) -> WorkerStatus {
        WorkerStatus {
            name: name.into(),
            role,
            rack: rack.into(),
            placement: nodes
                .iter()
                .map(|(n, g)| NodeGpus {
                    node: (*n).into(),
                    gpus: g.to_vec(),
                })
                .collect(),
            state: WorkerState::Running,
            message: None,
        }
    }

    fn ctx(now_s: f64, time_scale: f64) -> SampleContext {
        SampleContext {
            now_s,
            split: Split {
                prefill: 2,
                decode: 1,
            },
            switching: false,
            time_scale,
            fallback_isl: 900.0,
            fallback_osl: 90.0,
        }
    }

    fn sample(at_s: f64, prefills: u64, prompt: u64, decodes: u64, out: u64) -> LoadSample {
        LoadSample {
            at_s,
            prefills,
            prompt_tokens: prompt,
            decodes,
            requested_output_tokens: out,
            ..LoadSample::default()
        }
    }

    #[test]
    fn rates_and_lengths_come_from_counter_deltas_in_modelled_time() {
        let mut s = Sampler::default();
        let first: BTreeMap<_, _> = [
            (
                "prefill-0".to_string(),
                (Pool::Prefill, sample(100.0, 10, 10_000, 0, 0)),
            ),
            (
                "prefill-1".to_string(),
                (Pool::Prefill, sample(100.0, 0, 0, 0, 0)),
            ),
            (
                "decode-0".to_string(),
                (Pool::Decode, sample(100.0, 0, 0, 5, 500)),
            ),
        ]
        .into();
        let o = s.observe(ctx(0.0, 10.0), &first);
        // No baseline yet: no rate, lengths from the spec.
        assert_eq!(o.demand.rate, 0.0);
        assert_eq!((o.demand.isl, o.demand.osl), (900.0, 90.0));

        // 2 wall seconds at time scale 10 = 20 modelled seconds.
        let second: BTreeMap<_, _> = [
            (
                "prefill-0".to_string(),
                (Pool::Prefill, sample(102.0, 30, 50_000, 0, 0)),
            ),
            (
                "prefill-1".to_string(),
                (Pool::Prefill, sample(102.0, 20, 20_000, 0, 0)),
            ),
            (
                "decode-0".to_string(),
                (Pool::Decode, sample(102.0, 0, 0, 45, 8_500)),
            ),
        ]
        .into();
        let o = s.observe(ctx(20.0, 10.0), &second);
        assert!(
            (o.demand.rate - 40.0 / 20.0).abs() < 1e-9,
            "{}",
            o.demand.rate
        );
        assert!((o.demand.isl - 60_000.0 / 40.0).abs() < 1e-9);
        assert!((o.demand.osl - 8_000.0 / 40.0).abs() < 1e-9);
    }

    #[test]
    fn a_restarted_engine_or_a_stale_report_gives_no_delta() {
        let mut s = Sampler::default();
        let at = |t, n| -> BTreeMap<String, (Pool, LoadSample)> {
            [(
                "prefill-0".to_string(),
                (Pool::Prefill, sample(t, n, n * 1000, 0, 0)),
            )]
            .into()
        };
        s.observe(ctx(0.0, 1.0), &at(10.0, 50));
        // Counters went back: the engine restarted.
        assert_eq!(s.observe(ctx(1.0, 1.0), &at(11.0, 3)).demand.rate, 0.0);
        // The same report again: no time passed.
        assert_eq!(s.observe(ctx(2.0, 1.0), &at(11.0, 3)).demand.rate, 0.0);
        assert!((s.observe(ctx(3.0, 1.0), &at(13.0, 7)).demand.rate - 2.0).abs() < 1e-9);
    }

    #[test]
    fn gauges_sum_per_pool_and_latencies_average_over_reporting_workers() {
        let mut s = Sampler::default();
        let d = |queued, running, used, tpot| LoadSample {
            at_s: 1.0,
            queued,
            running,
            kv_used: used,
            kv_total: 100,
            tpot_s: tpot,
            ..LoadSample::default()
        };
        let m: BTreeMap<_, _> = [
            ("decode-0".to_string(), (Pool::Decode, d(1, 10, 50, 0.04))),
            ("decode-1".to_string(), (Pool::Decode, d(2, 20, 30, 0.0))),
        ]
        .into();
        let o = s.observe(ctx(0.0, 1.0), &m);
        assert_eq!((o.decode.queued, o.decode.running), (3, 30));
        assert!((o.decode.kv_use - 0.4).abs() < 1e-9);
        assert_eq!(o.decode.tpot_s, Some(0.04));
        assert_eq!(o.prefill.queued, 0);
    }

    fn transition(drain_prefill: u32, drain_decode: u32) -> Transition {
        Transition {
            from: Split {
                prefill: 4,
                decode: 1,
            },
            to: Split {
                prefill: 4 - drain_prefill,
                decode: 1,
            },
            drain_prefill,
            drain_decode,
            launch_prefill: 0,
            launch_decode: 0,
            moves: 1,
        }
    }

    #[test]
    fn drains_take_the_idlest_running_workers_of_one_rack() {
        let workers = vec![
            worker("prefill-0", Pool::Prefill, "a", &[("t0", &[0, 1, 2, 3])]),
            worker("prefill-1", Pool::Prefill, "a", &[("t1", &[0, 1, 2, 3])]),
            worker("prefill-2", Pool::Prefill, "a", &[("t2", &[0, 1, 2, 3])]),
            worker("prefill-3", Pool::Prefill, "b", &[("u0", &[0, 1, 2, 3])]),
            worker("decode-0", Pool::Decode, "a", &[("t3", &[0, 1, 2, 3])]),
        ];
        let busy = |q| LoadSample {
            queued: q,
            ..LoadSample::default()
        };
        let samples: BTreeMap<_, _> = [
            ("prefill-0".to_string(), (Pool::Prefill, busy(5))),
            ("prefill-1".to_string(), (Pool::Prefill, busy(0))),
            ("prefill-2".to_string(), (Pool::Prefill, busy(1))),
        ]
        .into();
        assert_eq!(
            choose_drains(&transition(2, 0), &workers, &samples),
            vec!["prefill-1", "prefill-2"]
        );
        // A worker that is not running is never drained.
        let mut stopped = workers.clone();
        stopped[1].state = WorkerState::Launching;
        assert_eq!(
            choose_drains(&transition(2, 0), &stopped, &samples),
            vec!["prefill-2", "prefill-0"]
        );
        // Ties break towards the highest index, so the recipe's first stay.
        assert_eq!(
            choose_drains(&transition(1, 0), &workers, &BTreeMap::new()),
            vec!["prefill-2"]
        );
    }

    #[test]
    fn freed_trays_become_workers_of_the_other_shape() {
        let freed = vec![
            worker("prefill-2", Pool::Prefill, "a", &[("t2", &[0, 1, 2, 3])]),
            worker("prefill-3", Pool::Prefill, "a", &[("t3", &[0, 1, 2, 3])]),
        ];
        // Two TP4 trays -> one DEP8 on both trays.
        let c = carve(&freed, &[("decode-1".into(), 8)]);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].rack, "a");
        let nodes: Vec<&str> = c[0].placement.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(nodes, vec!["t2", "t3"]);
        assert!(c[0].placement.iter().all(|n| n.gpus == vec![0, 1, 2, 3]));

        // One DEP8 -> two TP4, a tray each.
        let dep = vec![worker(
            "decode-0",
            Pool::Decode,
            "a",
            &[("t4", &[0, 1, 2, 3]), ("t5", &[0, 1, 2, 3])],
        )];
        let c = carve(&dep, &[("prefill-4".into(), 4), ("prefill-5".into(), 4)]);
        let got: Vec<(&str, &str)> = c
            .iter()
            .map(|c| (c.worker.as_str(), c.placement[0].node.as_str()))
            .collect();
        assert_eq!(got, vec![("prefill-4", "t4"), ("prefill-5", "t5")]);

        // One tray cannot hold a DEP8: placement has to find it GPUs.
        assert!(carve(&freed[..1], &[("decode-1".into(), 8)]).is_empty());
        // Half a tray is never taken for a whole one.
        let half = vec![worker("prefill-9", Pool::Prefill, "a", &[("t6", &[2, 3])])];
        assert!(carve(&half, &[("decode-2".into(), 4)]).is_empty());
        // TP2 workers share a tray.
        let c = carve(&freed[..1], &[("p-a".into(), 2), ("p-b".into(), 2)]);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].placement[0].gpus, vec![0, 1]);
        assert_eq!(c[1].placement[0].gpus, vec![2, 3]);
    }

    #[test]
    fn fresh_names_skip_live_ones() {
        let taken: BTreeSet<String> = ["prefill-0", "prefill-2", "decode-0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            fresh_names(Pool::Prefill, 3, &taken),
            vec!["prefill-1", "prefill-3", "prefill-4"]
        );
        assert_eq!(fresh_names(Pool::Decode, 1, &taken), vec!["decode-1"]);
    }

    #[test]
    fn split_counts_workers_per_pool() {
        let w = vec![
            worker("prefill-0", Pool::Prefill, "a", &[]),
            worker("decode-0", Pool::Decode, "a", &[]),
            worker("decode-1", Pool::Decode, "a", &[]),
        ];
        assert_eq!(
            split_of(&w),
            Split {
                prefill: 1,
                decode: 2
            }
        );
    }
}
