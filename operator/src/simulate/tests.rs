//! Simulator tests on short traces (DeepSeek-V4-Pro, 72 GB300 GPUs, TP4
//! prefill, DEP16 decode).

use perfmodel::{Calibration, ModelProfile, Parallelism, Sku};

use super::*;

fn config(seed: u64) -> SimConfig {
    SimConfig {
        model: ModelProfile::builtin("deepseek-v4-pro").expect("builtin"),
        sku: Sku::Gb300,
        calibration: Calibration::fitted(),
        shapes: Shapes {
            prefill_tp: 4,
            decode: Parallelism::Ep(16),
            gpu_budget: 72,
        },
        slo: SloTarget {
            max_tpot_s: 1.0 / 20.0,
            max_ttft_s: Some(10.0),
        },
        settings: Settings {
            interval_s: 30.0,
            window_s: 60.0,
            min_workers: 1,
            max_moves: 4,
            min_gain: 0.1,
            payback_s: 600.0,
        },
        seed,
        tail_s: 900.0,
    }
}

/// `load` times what the best split serves for these lengths.
fn phase(isl: u32, osl: u32, load: f64, seconds: f64) -> Phase {
    let cfg = config(0);
    let m = CapacityModel::new(cfg.model, cfg.sku, cfg.calibration, cfg.shapes, cfg.slo)
        .expect("model");
    let mut p = Phase {
        name: format!("{isl}/{osl}"),
        rate: 1e9,
        isl,
        osl,
        duration_seconds: seconds,
    };
    let pools = m.pools(phase_demand(&p), Corrections::default());
    let top = cfg
        .shapes
        .splits(1)
        .into_iter()
        .map(|s| pools.headroom(s))
        .fold(0.0, f64::max);
    p.rate = load * top;
    p
}

fn shift() -> Trace {
    Trace {
        name: "test-shift".into(),
        phases: vec![
            phase(8192, 1024, 0.9, 300.0),
            phase(32768, 1024, 0.9, 600.0),
            phase(1024, 4096, 0.9, 600.0),
        ],
    }
}

#[test]
fn same_seed_same_report_and_another_seed_differs() {
    let t = shift();
    let a = run(&config(1), &t, PolicyKind::Rebalance).unwrap();
    let b = run(&config(1), &t, PolicyKind::Rebalance).unwrap();
    assert_eq!(a, b);
    let c = run(&config(2), &t, PolicyKind::Rebalance).unwrap();
    assert_ne!(a.requests, c.requests);
}

#[test]
fn steady_light_load_completes_everything_within_the_slo() {
    let t = Trace {
        name: "steady".into(),
        phases: vec![phase(8192, 1024, 0.5, 300.0)],
    };
    for policy in PolicyKind::ALL {
        let r = run(&config(3), &t, policy).unwrap();
        assert!(r.requests > 100, "{}", r.requests);
        assert_eq!(r.completed, r.requests, "{policy}: nothing is lost");
        assert!(r.slo_attainment > 0.95, "{policy}: {}", r.slo_attainment);
        if policy != PolicyKind::Dynamo {
            assert_eq!(r.role_switches, 0, "{policy}: {:?}", r.move_log);
        }
    }
}

#[test]
fn rebalancing_follows_a_shift_and_beats_a_static_split() {
    let t = shift();
    let cfg = config(4);
    let reports = run_all(&cfg, &t).unwrap();
    let get = |p| reports.iter().find(|r| r.policy == p).expect("report");
    let (rb, st, or) = (
        get(PolicyKind::Rebalance),
        get(PolicyKind::Static),
        get(PolicyKind::Oracle),
    );
    assert!(
        rb.role_switches >= 1 && rb.gpu_seconds_switching > 0.0,
        "{:?}",
        rb.move_log
    );
    assert!(
        rb.goodput_per_gpu_hour > 1.2 * st.goodput_per_gpu_hour,
        "rebalance {} static {}",
        rb.goodput_per_gpu_hour,
        st.goodput_per_gpu_hour
    );
    assert!(or.goodput_per_gpu_hour >= rb.goodput_per_gpu_hour * 0.98);
    assert_eq!(or.gpu_seconds_switching, 0.0);
    for p in &rb.phases[1..] {
        assert_eq!(p.split_at_end, p.best_split, "{p:?}");
    }
    // Every arrival is accounted for, whatever the policy.
    for r in &reports {
        assert_eq!(r.requests, st.requests);
        assert_eq!(r.phases.iter().map(|p| p.requests).sum::<u64>(), r.requests);
    }
}
