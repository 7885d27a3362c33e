//! Unit tests of the decision core on DeepSeek-V4-Pro, 72 GB300 GPUs,
//! TP4 prefill and DEP16 decode workers.

use perfmodel::{Calibration, ModelProfile, Parallelism, Sku};

use super::*;

const INTERVAL: f64 = 30.0;

fn shapes() -> Shapes {
    Shapes {
        prefill_tp: 4,
        decode: Parallelism::Ep(16),
        gpu_budget: 72,
    }
}

fn slo() -> SloTarget {
    SloTarget {
        max_tpot_s: 1.0 / 20.0,
        max_ttft_s: Some(10.0),
    }
}

fn model() -> CapacityModel {
    let m = ModelProfile::builtin("deepseek-v4-pro").expect("builtin");
    CapacityModel::new(m, Sku::Gb300, Calibration::fitted(), shapes(), slo()).expect("model")
}

fn settings() -> Settings {
    Settings {
        interval_s: INTERVAL,
        window_s: 60.0,
        min_workers: 1,
        max_moves: 4,
        min_gain: 0.1,
        payback_s: 600.0,
    }
}

/// Demand at `load` times what the best split for these lengths serves.
fn demand(isl: f64, osl: f64, load: f64) -> Demand {
    let m = model();
    let probe = Demand {
        rate: 1e9,
        isl: 0.9 * isl,
        osl: 0.9 * osl,
    };
    let pools = m.pools(probe, Corrections::default());
    let top = shapes()
        .splits(1)
        .into_iter()
        .map(|s| pools.headroom(s))
        .fold(0.0, f64::max);
    assert!(top > 0.0, "no split serves {isl}/{osl}");
    Demand {
        rate: load * top,
        ..probe
    }
}

fn best(d: Demand) -> Split {
    let m = model();
    m.best_split(&m.pools(d, Corrections::default()), 1, None)
}

fn obs(now: f64, split: Split, d: Demand) -> Observation {
    Observation {
        now_s: now,
        split,
        switching: false,
        demand: d,
        prefill: PoolLoad::default(),
        decode: PoolLoad::default(),
    }
}

/// splitmix64, for reproducible noise.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Runs decisions every interval, applying moves at once; returns the
/// decisions and the split after each.
fn drive(
    r: &mut Rebalancer,
    start: Split,
    steps: usize,
    mut demand_at: impl FnMut(usize) -> Demand,
) -> Vec<(Decision, Split)> {
    let mut split = start;
    let mut out = Vec::new();
    for i in 0..steps {
        let d = r.decide(&obs(i as f64 * INTERVAL, split, demand_at(i)));
        if let Action::Move(t) = d.action {
            assert_eq!(t.from, split);
            split = t.to;
        }
        out.push((d, split));
    }
    out
}

#[test]
fn splits_fit_the_budget_and_waste_no_whole_worker() {
    let s = shapes();
    let all = s.splits(1);
    assert_eq!(
        all,
        (1..=4)
            .map(|d| Split {
                prefill: (72 - 16 * d) / 4,
                decode: d
            })
            .collect::<Vec<_>>()
    );
    assert!(s.splits(3).iter().all(|x| x.prefill >= 3 && x.decode >= 3));
    let t = s.transition(
        Split {
            prefill: 14,
            decode: 1,
        },
        Split {
            prefill: 2,
            decode: 4,
        },
    );
    assert_eq!((t.drain_prefill, t.launch_decode, t.moves), (12, 3, 3));
}

#[test]
fn long_prompts_want_prefill_and_long_outputs_want_decode() {
    let mid = best(demand(8192.0, 1024.0, 0.8));
    let long_in = best(demand(32768.0, 1024.0, 0.8));
    let long_out = best(demand(1024.0, 4096.0, 0.8));
    assert!(long_in.prefill > mid.prefill, "{long_in} vs {mid}");
    assert!(long_out.decode > mid.decode, "{long_out} vs {mid}");
}

#[test]
fn no_flapping_under_noisy_load() {
    let base = demand(8192.0, 1024.0, 0.75);
    let start = best(base);
    let mut r = Rebalancer::new(model(), settings());
    let mut noise = Noise(7);
    let run = drive(&mut r, start, 200, |_| Demand {
        rate: base.rate * (0.85 + 0.3 * noise.next()),
        isl: base.isl * (0.95 + 0.1 * noise.next()),
        osl: base.osl * (0.95 + 0.1 * noise.next()),
    });
    let moves = run
        .iter()
        .filter(|(d, _)| matches!(d.action, Action::Move(_)))
        .count();
    assert_eq!(
        moves,
        0,
        "{:?}",
        run.iter().find(|(d, _)| d.reason == Reason::Rebalance)
    );
    assert!(run.iter().all(|(d, _)| !d.message.is_empty()));
}

#[test]
fn a_one_interval_spike_does_not_move_workers() {
    let base = demand(8192.0, 1024.0, 0.7);
    let spike = demand(32768.0, 1024.0, 0.9);
    let start = best(base);
    let mut r = Rebalancer::new(model(), settings());
    let run = drive(&mut r, start, 20, |i| if i == 10 { spike } else { base });
    assert!(run.iter().all(|(_, s)| *s == start));
    assert_eq!(
        run[10].0.reason,
        Reason::Stabilizing,
        "{}",
        run[10].0.message
    );
}

#[test]
fn converges_to_the_right_split_after_a_shift() {
    let before = demand(8192.0, 1024.0, 0.8);
    for after in [demand(32768.0, 1024.0, 0.8), demand(1024.0, 4096.0, 0.8)] {
        let target = best(after);
        let mut r = Rebalancer::new(model(), settings());
        let run = drive(&mut r, best(before), 30, |i| {
            if i < 10 { before } else { after }
        });
        let reached = run
            .iter()
            .position(|(_, s)| *s == target)
            .unwrap_or_else(|| panic!("never reached {target}: {:?}", run.last()));
        assert!(
            reached >= 10 && reached - 10 <= 3,
            "reached after {} intervals",
            reached - 10
        );
        assert!(run[reached..].iter().all(|(_, s)| *s == target));
    }
}

#[test]
fn respects_minimum_workers_and_the_cap_on_moves() {
    let before = demand(1024.0, 4096.0, 0.8);
    let after = demand(32768.0, 1024.0, 0.9);
    for (min, cap) in [(1, 1), (2, 1), (1, 2)] {
        let mut r = Rebalancer::new(
            model(),
            Settings {
                min_workers: min,
                max_moves: cap,
                ..settings()
            },
        );
        let m = model();
        let start = m.best_split(&m.pools(before, Corrections::default()), min, None);
        let run = drive(&mut r, start, 40, |i| if i < 5 { before } else { after });
        let mut moved = 0;
        for (d, s) in &run {
            assert!(s.prefill >= min && s.decode >= min, "{s}");
            assert!(shapes().gpus(*s) <= 72);
            if let Action::Move(t) = d.action {
                assert!(t.moves <= cap, "{t:?}");
                moved += 1;
            }
        }
        assert!(moved >= 1, "min {min} cap {cap}: never moved");
        let target = m.best_split(&m.pools(after, Corrections::default()), min, None);
        assert_eq!(run.last().map(|x| x.1), Some(target));
    }
}

#[test]
fn refuses_a_move_whose_cost_exceeds_its_gain() {
    let before = demand(8192.0, 1024.0, 0.8);
    let after = demand(32768.0, 1024.0, 0.8);
    let mut r = Rebalancer::new(
        model(),
        Settings {
            payback_s: 5.0,
            ..settings()
        },
    );
    let start = best(before);
    let run = drive(&mut r, start, 10, |i| if i < 2 { before } else { after });
    assert!(run.iter().all(|(_, s)| *s == start));
    let last = &run.last().expect("decisions").0;
    assert_eq!(last.reason, Reason::CostExceedsGain, "{}", last.message);
    assert!(last.message.contains("GPU-s"), "{}", last.message);

    // The same shift with a payback horizon long enough moves.
    let mut r = Rebalancer::new(model(), settings());
    let run = drive(&mut r, start, 10, |i| if i < 2 { before } else { after });
    assert_ne!(run.last().map(|x| x.1), Some(start));
}

#[test]
fn slower_decode_than_predicted_shifts_gpus_to_decode() {
    let d = demand(8192.0, 1024.0, 0.8);
    let start = best(d);
    let m = model();
    let pools = m.pools(d, Corrections::default());
    let batch = pools.decode_batch * 0.8;
    let mut r = Rebalancer::new(model(), settings());
    let mut split = start;
    for i in 0..20 {
        let mut o = obs(i as f64 * INTERVAL, split, d);
        o.decode.running = (batch * f64::from(split.decode)) as u32;
        o.decode.tpot_s = Some(2.0 * pools.predicted_tpot(batch));
        if let Action::Move(t) = r.decide(&o).action {
            split = t.to;
        }
    }
    assert!(r.corrections().decode > 1.5, "{:?}", r.corrections());
    assert!(split.decode > start.decode, "{split} vs {start}");
}

#[test]
fn switching_and_idle_deployments_hold_with_a_reason() {
    let mut r = Rebalancer::new(model(), settings());
    let split = Split {
        prefill: 14,
        decode: 1,
    };
    let mut o = obs(0.0, split, demand(1024.0, 4096.0, 0.8));
    o.switching = true;
    let d = r.decide(&o);
    assert_eq!(
        (d.action, d.reason),
        (Action::Hold, Reason::SwitchInProgress)
    );
    let mut o = obs(30.0, split, demand(1024.0, 4096.0, 0.8));
    o.demand.rate = 0.0;
    let d = r.decide(&o);
    assert_eq!((d.action, d.reason), (Action::Hold, Reason::NoDemand));
}
