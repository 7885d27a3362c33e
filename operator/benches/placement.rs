//! Wall time and fragmentation of `operator::placement` at fleet scale:
//! 1,000 GB200/GB300 NVL72 racks (72,000 GPUs, about 0.5% unhealthy) and
//! 5,000 workers in deployments of 1-4 prefill workers (4 or 8 GPUs) plus
//! 1-2 decode workers (8, 16 or 32 GPUs), drawn from a seeded PRNG.
//!
//! Cases: every deployment placed from scratch into one `Cluster` (target
//! < 200 ms); one more deployment placed incrementally, both on the kept
//! `Cluster` and through `placement::place` rebuilding the map from the
//! inventory and 5,000 allocations (target < 5 ms); and free GPUs stranded
//! for each worker size, against a naive first-fit baseline (first rack with
//! enough free GPUs, lowest free GPUs, no tray alignment) on the same input.
//!
//! No criterion: each case runs `--reps N` times (default 5) with
//! `std::time::Instant`; the tables give min and median. Run with
//! `CARGO_TARGET_DIR=/tmp/op-target cargo bench -p operator --bench placement`.
//! Exits non-zero when a median misses its target.

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::hint::black_box;
use std::time::{Duration, Instant};

use operator::placement::{
    self, Allocation, Cluster, DeploymentRequest, GpuRef, RackInventory, Role, TrayInventory,
    WorkerId, WorkerRequest,
};

const RACKS: usize = 1000;
const TRAYS: usize = 18;
const TRAY_GPUS: u32 = 4;
const WORKERS: usize = 5000;
/// One GPU in this many is unhealthy.
const UNHEALTHY_ONE_IN: u64 = 200;
const SEED: u64 = 0x5eed_f00d;
const TARGET_SCRATCH: Duration = Duration::from_millis(200);
const TARGET_INCREMENTAL: Duration = Duration::from_millis(5);
/// Worker sizes the stranding table reports.
const SIZES: [u32; 4] = [4, 8, 16, 32];

/// SplitMix64: small, seeded, good enough to draw fixtures.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize]
    }
}

fn inventory(rng: &mut Rng) -> Vec<RackInventory> {
    (0..RACKS)
        .map(|r| RackInventory {
            name: format!("rack-{r:04}"),
            trays: (0..TRAYS)
                .map(|t| TrayInventory {
                    node: format!("rack-{r:04}-t{t:02}"),
                    gpus: TRAY_GPUS,
                    unhealthy: (0..TRAY_GPUS)
                        .filter(|_| rng.next().is_multiple_of(UNHEALTHY_ONE_IN))
                        .collect(),
                })
                .collect(),
        })
        .collect()
}

fn deployment(rng: &mut Rng, name: String) -> DeploymentRequest {
    let mut workers = Vec::new();
    let prefill = rng.pick(&[4, 8]);
    for i in 0..rng.range(1, 4) {
        workers.push(WorkerRequest {
            worker: format!("prefill-{i}"),
            role: Role::Prefill,
            gpus: prefill,
        });
    }
    let decode = rng.pick(&[8, 16, 32]);
    for i in 0..rng.range(1, 2) {
        workers.push(WorkerRequest {
            worker: format!("decode-{i}"),
            role: Role::Decode,
            gpus: decode,
        });
    }
    DeploymentRequest {
        deployment: name,
        workers,
        rack_filter: None,
    }
}

/// Deployments until 5,000 workers (the last one trimmed to land exactly).
fn deployments(rng: &mut Rng) -> Vec<DeploymentRequest> {
    let mut out = Vec::new();
    let mut workers = 0;
    while workers < WORKERS {
        let mut d = deployment(rng, format!("ns/dep-{:04}", out.len()));
        d.workers.truncate(WORKERS - workers);
        workers += d.workers.len();
        out.push(d);
    }
    out
}

/// Outcome of placing every deployment.
#[derive(Debug, Default)]
struct Outcome {
    failed_deployments: usize,
    failed_workers: usize,
    split: usize,
}

fn place_all(cluster: &mut Cluster, deps: &[DeploymentRequest]) -> Outcome {
    let mut out = Outcome::default();
    for d in deps {
        match cluster.place(d) {
            Ok(plan) => out.split += usize::from(plan.split_across_racks),
            Err(_) => {
                out.failed_deployments += 1;
                out.failed_workers += d.workers.len();
            }
        }
    }
    out
}

/// The baseline: per worker, the first rack (name order) with enough free
/// healthy GPUs, taking its lowest free GPUs in tray order.
fn first_fit(inv: &[RackInventory], deps: &[DeploymentRequest]) -> (Vec<Allocation>, Outcome) {
    let mut free: Vec<Vec<(usize, u32)>> = inv
        .iter()
        .map(|r| {
            r.trays
                .iter()
                .enumerate()
                .flat_map(|(t, tray)| {
                    (0..tray.gpus)
                        .filter(|i| !tray.unhealthy.contains(i))
                        .map(move |i| (t, i))
                })
                .collect()
        })
        .collect();
    let mut allocs = Vec::new();
    let mut out = Outcome::default();
    for d in deps {
        let mut racks = BTreeSet::new();
        let mut failed = 0;
        for w in &d.workers {
            let g = w.gpus as usize;
            let Some(r) = free.iter().position(|f| f.len() >= g) else {
                failed += 1;
                continue;
            };
            let gpus = free[r].drain(..g);
            allocs.push(Allocation {
                owner: WorkerId {
                    deployment: d.deployment.clone(),
                    worker: w.worker.clone(),
                },
                rack: inv[r].name.clone(),
                gpus: gpus
                    .map(|(t, index)| GpuRef {
                        node: inv[r].trays[t].node.clone(),
                        index,
                    })
                    .collect(),
            });
            racks.insert(r);
        }
        out.failed_workers += failed;
        out.failed_deployments += usize::from(failed > 0);
        out.split += usize::from(racks.len() > 1);
    }
    (allocs, out)
}

fn parse_reps() -> Result<usize, Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut reps = 5;
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--reps" {
            let v = args.get(i + 1).ok_or("--reps needs a value")?;
            reps = v.parse().map_err(|e| format!("--reps {v}: {e}"))?;
            i += 1;
        }
        i += 1;
    }
    if reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    Ok(reps)
}

/// Times `run` `reps` times after one warm-up; neither `setup` nor dropping
/// what `run` returns is timed.
fn time<S, T>(
    reps: usize,
    mut setup: impl FnMut() -> S,
    mut run: impl FnMut(S) -> T,
) -> (Duration, Duration) {
    drop(black_box(run(setup())));
    let mut times: Vec<Duration> = (0..reps)
        .map(|_| {
            let s = setup();
            let start = Instant::now();
            let out = black_box(run(s));
            let elapsed = start.elapsed();
            drop(out);
            elapsed
        })
        .collect();
    times.sort_unstable();
    (times[0], times[times.len() / 2])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Free GPUs left over if a worker could take any `g` free GPUs of a rack.
fn stranded_any_shape(usage: &BTreeMap<String, placement::RackUsage>, g: u32) -> u32 {
    usage.values().map(|u| u.free % g).sum()
}

/// Trays whose GPUs belong to more than one worker.
fn shared_trays(allocs: &[Allocation]) -> usize {
    let mut owners: BTreeMap<&str, BTreeSet<&WorkerId>> = BTreeMap::new();
    for a in allocs {
        for g in &a.gpus {
            owners.entry(&g.node).or_default().insert(&a.owner);
        }
    }
    owners.values().filter(|o| o.len() > 1).count()
}

fn main() -> Result<(), Box<dyn Error>> {
    let reps = parse_reps()?;
    let mut rng = Rng(SEED);
    let inv = inventory(&mut rng);
    let deps = deployments(&mut rng);
    let extra = deployment(&mut rng, "ns/extra".to_string());
    let requested: u32 = deps.iter().flat_map(|d| &d.workers).map(|w| w.gpus).sum();
    let rack_gpus = TRAYS as u32 * TRAY_GPUS;
    let oversized = deps
        .iter()
        .filter(|d| d.workers.iter().map(|w| w.gpus).sum::<u32>() > rack_gpus)
        .count();

    let empty = Cluster::new(&inv, &[])?;
    let (scratch_min, scratch_med) = time(
        reps,
        || empty.clone(),
        |mut c| {
            let out = place_all(&mut c, &deps);
            (c, out)
        },
    );
    let mut cluster = empty.clone();
    let ours = place_all(&mut cluster, &deps);
    let allocs = cluster.allocations();

    let inc_reps = reps.max(20);
    let (kept_min, kept_med) = time(
        inc_reps,
        || cluster.clone(),
        |mut c| {
            let plan = c.place(&extra);
            (c, plan)
        },
    );
    let (full_min, full_med) = time(
        inc_reps,
        || (),
        |()| placement::place(&inv, &allocs, &extra),
    );
    let (build_min, build_med) = time(inc_reps, || (), |()| Cluster::new(&inv, &allocs));

    let (naive_allocs, naive) = first_fit(&inv, &deps);
    let naive_cluster = Cluster::new(&inv, &naive_allocs)?;
    let (our_usage, naive_usage) = (cluster.usage(), naive_cluster.usage());

    let workers: usize = deps.iter().map(|d| d.workers.len()).sum();
    let healthy: u32 = our_usage.values().map(|u| u.healthy).sum();
    println!(
        "\n{RACKS} racks x {TRAYS} trays x {TRAY_GPUS} GPUs ({} GPUs, {healthy} healthy); \
         {workers} workers in {} deployments asking {requested} GPUs ({oversized} deployments \
         need more than one rack); {reps} reps; \
         the incremental deployment has workers of {:?} GPUs\n",
        RACKS * TRAYS * TRAY_GPUS as usize,
        deps.len(),
        extra.workers.iter().map(|w| w.gpus).collect::<Vec<_>>(),
    );
    println!("| case | min ms | median ms | target ms |");
    println!("|---|---:|---:|---:|");
    let row = |name: &str, min: Duration, med: Duration, target: Option<Duration>| {
        let t = target.map_or("-".to_string(), |t| format!("{:.0}", ms(t)));
        println!("| {name} | {:.2} | {:.2} | {t} |", ms(min), ms(med));
    };
    row(
        "place all from scratch (Cluster)",
        scratch_min,
        scratch_med,
        Some(TARGET_SCRATCH),
    );
    row(
        "one more deployment (kept Cluster)",
        kept_min,
        kept_med,
        Some(TARGET_INCREMENTAL),
    );
    row(
        "one more deployment (placement::place, rebuilds map)",
        full_min,
        full_med,
        None,
    );
    row(
        "Cluster::new remembering all 5,000 allocations",
        build_min,
        build_med,
        None,
    );

    println!(
        "\n| placement | failed workers | deployments split across racks | trays shared by 2+ workers | whole free trays | empty racks |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let whole = |u: &BTreeMap<String, placement::RackUsage>| -> (u32, usize) {
        let trays = u.values().map(|r| r.whole_free_trays).sum();
        let empty = u.values().filter(|r| r.allocated == 0).count();
        (trays, empty)
    };
    let rows = [
        ("rackscale", &ours, &our_usage, &allocs),
        ("naive first-fit", &naive, &naive_usage, &naive_allocs),
    ];
    for (name, o, u, a) in rows {
        let (trays, empty) = whole(u);
        let shared = shared_trays(a);
        println!(
            "| {name} | {} | {} | {shared} | {trays} | {empty} |",
            o.failed_workers, o.split
        );
    }

    println!(
        "\nFree healthy GPUs stranded for a worker of g GPUs (tray rules; any shape in parentheses):\n"
    );
    println!("| g | free (ours) | stranded (ours) | free (first-fit) | stranded (first-fit) |");
    println!("|---:|---:|---:|---:|---:|");
    for g in SIZES {
        let (a, b) = (cluster.stranded(g), naive_cluster.stranded(g));
        println!(
            "| {g} | {} | {} ({}) | {} | {} ({}) |",
            a.free,
            a.stranded,
            stranded_any_shape(&our_usage, g),
            b.free,
            b.stranded,
            stranded_any_shape(&naive_usage, g),
        );
    }

    if scratch_med > TARGET_SCRATCH || kept_med > TARGET_INCREMENTAL {
        return Err("a median missed its target".into());
    }
    Ok(())
}
