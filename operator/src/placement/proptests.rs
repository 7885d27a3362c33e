//! Property tests: random racks (random unhealthy GPUs, a node sometimes
//! gone), other deployments and this deployment's previous plan placed
//! through [`Cluster`], then a changed request. Every plan must keep the
//! invariants of [`check_plan`], keep every still-valid worker, be a fixed
//! point, and not change kept workers under unrelated changes.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::fixtures::*;
use super::*;

const D: &str = "ns/d";

/// Worker sizes in {1, 2, 4, 8, 16, 32, 64}, small ones more often so that
/// most scenarios fit and exercise the success paths.
fn size() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => prop::sample::select(vec![1u32, 2, 4, 8]),
        2 => Just(16u32),
        1 => prop::sample::select(vec![32u32, 64]),
    ]
}

/// What happens to a worker of the previous request.
#[derive(Debug, Clone, Copy)]
enum Edit {
    Keep,
    Resize(u32),
    Drop,
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        6 => Just(Edit::Keep),
        1 => size().prop_map(Edit::Resize),
        1 => Just(Edit::Drop),
    ]
}

#[derive(Debug, Clone)]
struct Scenario {
    trays: Vec<usize>,
    others: Vec<Vec<u32>>,
    prior: Vec<(u32, Edit)>,
    added: Vec<u32>,
    unhealthy: Vec<(usize, usize, u32)>,
    gone: Option<(usize, usize)>,
    filter: Option<Vec<bool>>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec(prop_oneof![1 => 1usize..=4, 3 => 8usize..=18], 1..=3),
        prop::collection::vec(prop::collection::vec(size(), 1..=3), 0..=3),
        prop::collection::vec((size(), edit()), 0..=5),
        prop::collection::vec(size(), 0..=2),
        prop::collection::vec((0usize..3, 0usize..18, 0u32..4), 0..=6),
        prop::option::weighted(0.2, (0usize..3, 0usize..18)),
        prop::option::weighted(0.2, prop::collection::vec(any::<bool>(), 3)),
    )
        .prop_map(
            |(trays, others, prior, added, unhealthy, gone, filter)| Scenario {
                trays,
                others,
                prior,
                added,
                unhealthy,
                gone,
                filter,
            },
        )
}

fn rack_name(i: usize) -> String {
    format!("R{i}")
}

fn request(name: &str, prefix: &str, sizes: impl IntoIterator<Item = u32>) -> DeploymentRequest {
    sizes
        .into_iter()
        .enumerate()
        .fold(DeploymentRequest::test(name), |r, (i, g)| {
            let role = if i % 2 == 0 {
                Role::Prefill
            } else {
                Role::Decode
            };
            r.worker(&format!("{prefix}{i}"), role, g)
        })
}

/// Inventory after the changes, the allocations that exist, and the new
/// request for deployment `D`.
fn build(s: &Scenario) -> (Vec<RackInventory>, Vec<Allocation>, DeploymentRequest) {
    let healthy: Vec<RackInventory> = s
        .trays
        .iter()
        .enumerate()
        .map(|(i, &n)| rack(&rack_name(i), n))
        .collect();
    let mut cluster = Cluster::new(&healthy, &[]).unwrap_or_else(|e| panic!("{e}"));
    for (i, sizes) in s.others.iter().enumerate() {
        let _ = cluster.place(&request(&format!("ns/o{i}"), "w", sizes.iter().copied()));
    }
    let _ = cluster.place(&request(D, "w", s.prior.iter().map(|p| p.0)));
    let existing = cluster.allocations();

    let mut inv = healthy;
    for &(r, t, idx) in &s.unhealthy {
        let rack = &mut inv[r % s.trays.len()];
        let t = t % rack.trays.len();
        rack.trays[t].unhealthy.insert(idx);
    }
    if let Some((r, t)) = s.gone {
        let rack = &mut inv[r % s.trays.len()];
        rack.trays.remove(t % rack.trays.len());
    }

    let mut req = DeploymentRequest::test(D);
    for (i, &(g, e)) in s.prior.iter().enumerate() {
        let name = format!("w{i}");
        match e {
            Edit::Keep => req = req.prefill(&name, g),
            Edit::Resize(to) => req = req.prefill(&name, to),
            Edit::Drop => {}
        }
    }
    for (i, &g) in s.added.iter().enumerate() {
        req = req.decode(&format!("n{i}"), g);
    }
    req.rack_filter = s.filter.as_ref().map(|mask| {
        (0..s.trays.len())
            .filter(|&i| mask[i])
            .map(rack_name)
            .collect()
    });
    (inv, existing, req)
}

/// Workers of `D` whose existing allocation is still valid (rule 5); the
/// scenario never creates conflicts, so validity is size, rack, presence and
/// health.
fn still_valid(
    inv: &[RackInventory],
    existing: &[Allocation],
    req: &DeploymentRequest,
) -> BTreeSet<String> {
    let ok_gpu = |rack: &str, g: &GpuRef| {
        inv.iter()
            .filter(|r| r.name == rack)
            .flat_map(|r| &r.trays)
            .any(|t| t.node == g.node && g.index < t.gpus && !t.unhealthy.contains(&g.index))
    };
    req.workers
        .iter()
        .filter(|w| {
            existing.iter().any(|a| {
                a.owner.deployment == D
                    && a.owner.worker == w.worker
                    && a.gpus.len() == w.gpus as usize
                    && req.rack_filter.as_ref().is_none_or(|f| f.contains(&a.rack))
                    && a.gpus.iter().all(|g| ok_gpu(&a.rack, g))
            })
        })
        .map(|w| w.worker.clone())
        .collect()
}

/// Kept workers and their GPUs.
fn kept(plan: &Plan) -> Vec<&Allocation> {
    plan.assignments
        .iter()
        .filter(|a| plan.kept.contains(&a.owner.worker))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn plans_keep_every_invariant(s in scenario()) {
        let (inv, existing, req) = build(&s);
        let mut cluster = Cluster::new(&inv, &existing).unwrap_or_else(|e| panic!("{e}"));
        let before = (cluster.usage(), cluster.allocations());
        let plan = match cluster.place(&req) {
            Ok(plan) => plan,
            Err(e) => {
                prop_assert!(e.is_transient(), "unexpected {e}");
                prop_assert_eq!((cluster.usage(), cluster.allocations()), before);
                return Ok(());
            }
        };
        if let Err(e) = check_plan(&inv, &existing, &req, &plan) {
            prop_assert!(false, "{e}\n{plan:#?}");
        }
        let valid = still_valid(&inv, &existing, &req);
        let kept_set: BTreeSet<String> = plan.kept.iter().cloned().collect();
        prop_assert_eq!(&kept_set, &valid);

        // The cluster now holds exactly the plan for D.
        prop_assert_eq!(cluster.deployment_allocations(D), plan.assignments.clone());

        // Fixed point: the plan's output as input changes nothing.
        let mut again_in: Vec<Allocation> =
            existing.iter().filter(|a| a.owner.deployment != D).cloned().collect();
        again_in.extend(plan.assignments.iter().cloned());
        let again = place(&inv, &again_in, &req).unwrap_or_else(|e| panic!("{e}"));
        prop_assert_eq!(&again.assignments, &plan.assignments);
        prop_assert!(again.moved.is_empty() && again.added.is_empty() && again.released.is_empty());

        // Deterministic, whatever the order of the inputs.
        let mut reversed = existing.clone();
        reversed.reverse();
        let mut inv_rev = inv.clone();
        inv_rev.reverse();
        prop_assert_eq!(&place(&inv_rev, &reversed, &req).unwrap_or_else(|e| panic!("{e}")), &plan);
    }

    #[test]
    fn unrelated_changes_do_not_move_kept_workers(s in scenario(), pick in any::<prop::sample::Index>()) {
        let (inv, existing, req) = build(&s);
        let Ok(plan) = place(&inv, &existing, &req) else { return Ok(()) };
        let ours: BTreeSet<&str> = existing
            .iter()
            .filter(|a| a.owner.deployment == D)
            .flat_map(|a| a.gpus.iter().map(|g| g.node.as_str()))
            .collect();

        // Another rack joins.
        let mut more = inv.clone();
        more.push(rack("Q", 18));
        let with_rack = place(&more, &existing, &req).unwrap_or_else(|e| panic!("{e}"));
        prop_assert_eq!(kept(&with_rack), kept(&plan));

        // A GPU goes unhealthy on a tray D does not use.
        let trays: Vec<(usize, usize)> = inv
            .iter()
            .enumerate()
            .flat_map(|(r, rk)| rk.trays.iter().enumerate().map(move |(t, tr)| (r, t, tr)))
            .filter(|(_, _, tr)| !ours.contains(tr.node.as_str()))
            .map(|(r, t, _)| (r, t))
            .collect();
        if !trays.is_empty() {
            let (r, t) = trays[pick.index(trays.len())];
            let mut sick = inv.clone();
            sick[r].trays[t].unhealthy.insert(pick.index(4) as u32);
            if let Ok(p) = place(&sick, &existing, &req) {
                prop_assert_eq!(kept(&p), kept(&plan));
            }
        }

        // Another deployment takes a free GPU D did not hold.
        let taken: BTreeSet<&GpuRef> = existing.iter().flat_map(|a| &a.gpus).collect();
        let free: Vec<(String, GpuRef)> = inv
            .iter()
            .flat_map(|r| r.trays.iter().map(move |t| (r, t)))
            .flat_map(|(r, t)| {
                (0..t.gpus)
                    .filter(|i| !t.unhealthy.contains(i))
                    .map(move |index| (r.name.clone(), GpuRef { node: t.node.clone(), index }))
            })
            .filter(|(_, g)| !taken.contains(g))
            .collect();
        if !free.is_empty() {
            let (rack, gpu) = free[pick.index(free.len())].clone();
            let mut crowded = existing.clone();
            crowded.push(Allocation {
                owner: WorkerId { deployment: "ns/zz".to_string(), worker: "x".to_string() },
                rack,
                gpus: vec![gpu],
            });
            if let Ok(p) = place(&inv, &crowded, &req) {
                prop_assert_eq!(kept(&p), kept(&plan));
            }
        }
    }
}
