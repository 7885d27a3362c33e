//! Unit tests, one group per rule, on small fixtures.

use super::fixtures::*;
use super::*;

fn ok(inventory: &[RackInventory], existing: &[Allocation], request: &DeploymentRequest) -> Plan {
    let plan =
        place(inventory, existing, request).unwrap_or_else(|e| panic!("placement failed: {e}"));
    if let Err(e) = check_plan(inventory, existing, request, &plan) {
        panic!("invalid plan: {e}\n{plan:#?}");
    }
    plan
}

fn err(
    inventory: &[RackInventory],
    existing: &[Allocation],
    request: &DeploymentRequest,
) -> PlacementError {
    match place(inventory, existing, request) {
        Ok(plan) => panic!("expected an error, got {plan:#?}"),
        Err(e) => e,
    }
}

// Rule 1: one NVLink domain per worker.

#[test]
fn worker_never_spans_racks_even_when_the_sum_would_fit() {
    let inv = [rack("A", 2), rack("B", 2)];
    let e = err(
        &inv,
        &[],
        &DeploymentRequest::test("ns/a").decode("decode-0", 16),
    );
    assert_eq!(e.category(), "worker_does_not_fit");
    assert_eq!(
        e.to_string(),
        "worker decode-0 of ns/a needs 16 GPUs in one NVLink domain (4 whole free trays); \
         the largest free block is 8 GPUs in rack A"
    );
    assert!(e.is_transient());
}

#[test]
fn largest_block_counts_whole_trays_and_the_best_partial_tray() {
    let inv = [rack("A", 5).with_unhealthy(3, 0).with_unhealthy(4, 2)];
    let e = err(
        &inv,
        &[],
        &DeploymentRequest::test("ns/a").decode("decode-0", 16),
    );
    let PlacementError::WorkerDoesNotFit {
        largest_block,
        rack,
        ..
    } = e
    else {
        panic!("unexpected {e}");
    };
    assert_eq!((largest_block, rack.as_str()), (15, "A"));
}

// Rule 2: tray-aligned shapes.

#[test]
fn tray_multiples_take_whole_trays_not_partial_ones() {
    let inv = [rack("A", 3)];
    let existing = [alloc("ns/other", "p", "A", &[(0, 0)])];
    let plan = ok(
        &inv,
        &existing,
        &DeploymentRequest::test("ns/a").decode("decode-0", 8),
    );
    assert_eq!(positions(assignment(&plan, "decode-0")), trays(1, 2));
}

#[test]
fn tray_multiples_refuse_partly_free_or_unhealthy_trays() {
    let inv = [rack("A", 2).with_unhealthy(0, 1)];
    let existing = [alloc("ns/other", "p", "A", &[(1, 3)])];
    let e = err(
        &inv,
        &existing,
        &DeploymentRequest::test("ns/a").decode("decode-0", 4),
    );
    assert!(
        e.to_string()
            .contains("needs 4 GPUs in one NVLink domain (1 whole free tray)"),
        "{e}"
    );
    assert!(
        e.to_string().contains("largest free block is 3 GPUs"),
        "{e}"
    );
}

#[test]
fn small_workers_go_best_fit_into_partly_used_trays() {
    // Tray 0 has 3 free, tray 1 has 2 free, tray 2 is whole-free.
    let inv = [rack("A", 3)];
    let existing = [
        alloc("ns/other", "x", "A", &[(0, 0)]),
        alloc("ns/other", "y", "A", &[(1, 0), (1, 1)]),
    ];
    let plan = ok(
        &inv,
        &existing,
        &DeploymentRequest::test("ns/a").prefill("prefill-0", 2),
    );
    assert_eq!(
        positions(assignment(&plan, "prefill-0")),
        vec![(1, 2), (1, 3)]
    );
    let plan = ok(
        &inv,
        &existing,
        &DeploymentRequest::test("ns/a").prefill("prefill-0", 3),
    );
    assert_eq!(
        positions(assignment(&plan, "prefill-0")),
        vec![(0, 1), (0, 2), (0, 3)]
    );
}

#[test]
fn a_tray_with_an_unhealthy_gpu_hosts_small_workers_on_its_healthy_gpus() {
    let inv = [rack("A", 2).with_unhealthy(0, 3)];
    let request = DeploymentRequest::test("ns/a")
        .decode("decode-0", 4)
        .prefill("prefill-0", 3);
    let plan = ok(&inv, &[], &request);
    assert_eq!(positions(assignment(&plan, "decode-0")), trays(1, 1));
    assert_eq!(
        positions(assignment(&plan, "prefill-0")),
        vec![(0, 0), (0, 1), (0, 2)]
    );
}

#[test]
fn sizes_between_multiples_take_whole_trays_plus_a_packed_remainder() {
    // Tray 0 has 2 free GPUs: the remainder of a 6-GPU worker lands there.
    let inv = [rack("A", 4)];
    let existing = [alloc("ns/other", "x", "A", &[(0, 0), (0, 1)])];
    let plan = ok(
        &inv,
        &existing,
        &DeploymentRequest::test("ns/a").prefill("prefill-0", 6),
    );
    let mut want = vec![(0, 2), (0, 3)];
    want.extend(trays(1, 1));
    assert_eq!(positions(assignment(&plan, "prefill-0")), want);
}

// Rule 3: co-location.

#[test]
fn prefill_and_decode_share_the_best_fitting_rack() {
    // A has 6 whole trays free, B all 18: the deployment (24 GPUs) fits A
    // exactly, leaving B's big block intact.
    let inv = [rack("A", 6), rack("B", 18)];
    let request = DeploymentRequest::test("ns/a")
        .prefill("prefill-0", 4)
        .prefill("prefill-1", 4)
        .decode("decode-0", 16);
    let plan = ok(&inv, &[], &request);
    assert_eq!(plan.racks, vec!["A".to_string()]);
    assert!(!plan.split_across_racks);
    assert_eq!(plan.added, vec!["prefill-0", "prefill-1", "decode-0"]);
    // Largest first, contiguous: decode on trays 0-3, prefill on 4 and 5.
    assert_eq!(positions(assignment(&plan, "decode-0")), trays(0, 4));
    assert_eq!(positions(assignment(&plan, "prefill-0")), trays(4, 1));
    assert_eq!(positions(assignment(&plan, "prefill-1")), trays(5, 1));
}

#[test]
fn new_workers_join_the_rack_where_the_deployment_already_runs() {
    let inv = [rack("A", 4), rack("B", 18)];
    let existing = [alloc("ns/a", "decode-0", "B", &trays(0, 4))];
    let request = DeploymentRequest::test("ns/a")
        .decode("decode-0", 16)
        .prefill("prefill-0", 8);
    let plan = ok(&inv, &existing, &request);
    assert_eq!(plan.kept, vec!["decode-0"]);
    assert_eq!(assignment(&plan, "prefill-0").rack, "B");
    assert_eq!(positions(assignment(&plan, "prefill-0")), trays(4, 2));
}

#[test]
fn a_deployment_no_rack_can_hold_is_split_whole_workers_at_a_time() {
    let inv = [rack("A", 4), rack("B", 4)];
    let request = DeploymentRequest::test("ns/a")
        .decode("decode-0", 16)
        .decode("decode-1", 8)
        .prefill("prefill-0", 4)
        .prefill("prefill-1", 4);
    let plan = ok(&inv, &[], &request);
    assert!(plan.split_across_racks);
    assert_eq!(plan.racks, vec!["A".to_string(), "B".to_string()]);
    assert_eq!(assignment(&plan, "decode-0").rack, "A");
    for w in ["decode-1", "prefill-0", "prefill-1"] {
        assert_eq!(assignment(&plan, w).rack, "B", "{w}");
    }
}

#[test]
fn kept_rack_takes_what_it_can_before_others_are_used() {
    // decode-0 runs in A, which has room for one 4-GPU prefill only.
    let inv = [rack("A", 5), rack("B", 18)];
    let existing = [alloc("ns/a", "decode-0", "A", &trays(0, 4))];
    let request = DeploymentRequest::test("ns/a")
        .decode("decode-0", 16)
        .prefill("prefill-0", 4)
        .prefill("prefill-1", 4);
    let plan = ok(&inv, &existing, &request);
    assert_eq!(assignment(&plan, "prefill-0").rack, "A");
    assert_eq!(assignment(&plan, "prefill-1").rack, "B");
    assert!(plan.split_across_racks);
}

// Rule 4: health.

#[test]
fn a_worker_on_a_gpu_that_went_unhealthy_moves_within_its_rack() {
    let inv = [rack("A", 4).with_unhealthy(1, 2), rack("B", 18)];
    let existing = [
        alloc("ns/a", "decode-0", "A", &trays(0, 2)),
        alloc("ns/a", "prefill-0", "A", &trays(2, 1)),
    ];
    let request = DeploymentRequest::test("ns/a")
        .decode("decode-0", 8)
        .prefill("prefill-0", 4);
    let plan = ok(&inv, &existing, &request);
    assert_eq!(plan.kept, vec!["prefill-0"]);
    assert_eq!(
        plan.moved,
        vec![("decode-0".to_string(), MoveReason::UnhealthyGpu)]
    );
    // Only tray 3 is whole-free in A besides tray 0, which the old
    // allocation released: decode-0 takes trays 0 and 3.
    let moved = assignment(&plan, "decode-0");
    assert_eq!(moved.rack, "A");
    let mut want = trays(0, 1);
    want.extend(trays(3, 1));
    assert_eq!(positions(moved), want);
}

// Rule 5: stability.

#[test]
fn valid_allocations_are_kept_exactly_even_with_a_shape_placement_would_not_pick() {
    let inv = [rack("A", 4)];
    // Spread over two trays, GPUs listed out of order: still valid.
    let odd = alloc("ns/a", "prefill-0", "A", &[(2, 3), (0, 1)]);
    let request = DeploymentRequest::test("ns/a").prefill("prefill-0", 2);
    let plan = ok(&inv, std::slice::from_ref(&odd), &request);
    assert_eq!(plan.kept, vec!["prefill-0"]);
    assert_eq!(plan.assignments, vec![odd]);
    assert!(plan.moved.is_empty() && plan.added.is_empty() && plan.released.is_empty());
}

#[test]
fn each_cause_of_a_move_is_reported() {
    let inv = [rack("A", 10).with_unhealthy(3, 0), rack("B", 8)];
    let existing = [
        alloc("ns/a", "resized", "A", &trays(0, 1)),
        alloc("ns/a", "gone", "A", &[(19, 0), (19, 1), (19, 2), (19, 3)]),
        alloc("ns/a", "unhealthy", "A", &trays(3, 1)),
        alloc("ns/a", "elsewhere", "B", &trays(0, 1)),
        alloc("ns/a", "clash", "A", &trays(4, 1)),
        alloc("ns/b", "owner", "A", &[(4, 2)]),
        alloc("ns/a", "fine", "A", &trays(5, 1)),
        alloc("ns/a", "dropped", "A", &trays(6, 1)),
    ];
    let request = DeploymentRequest::test("ns/a")
        .prefill("resized", 8)
        .prefill("gone", 4)
        .prefill("unhealthy", 4)
        .prefill("elsewhere", 4)
        .prefill("clash", 4)
        .decode("fine", 4)
        .in_racks(&["A"]);
    let plan = ok(&inv, &existing, &request);
    assert_eq!(plan.kept, vec!["fine"]);
    assert_eq!(
        plan.moved,
        vec![
            ("resized".to_string(), MoveReason::SizeChanged),
            ("gone".to_string(), MoveReason::NodeGone),
            ("unhealthy".to_string(), MoveReason::UnhealthyGpu),
            ("elsewhere".to_string(), MoveReason::RackNotAllowed),
            ("clash".to_string(), MoveReason::Conflict),
        ]
    );
    assert_eq!(plan.released, vec!["dropped"]);
    assert!(plan.added.is_empty());
    assert_eq!(plan.racks, vec!["A".to_string()]);
}

#[test]
fn two_workers_claiming_one_gpu_keep_the_first_by_name() {
    let inv = [rack("A", 4)];
    let existing = [
        alloc("ns/a", "b", "A", &trays(0, 1)),
        alloc("ns/a", "a", "A", &trays(0, 1)),
    ];
    let request = DeploymentRequest::test("ns/a")
        .prefill("b", 4)
        .prefill("a", 4);
    let plan = ok(&inv, &existing, &request);
    assert_eq!(plan.kept, vec!["a"]);
    assert_eq!(plan.moved, vec![("b".to_string(), MoveReason::Conflict)]);
}

#[test]
fn other_deployments_are_never_touched_and_their_gpus_never_reused() {
    let inv = [rack("A", 2)];
    let other = alloc(
        "ns/b",
        "decode-0",
        "A",
        &[(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)],
    );
    let request = DeploymentRequest::test("ns/a").prefill("prefill-0", 3);
    let plan = ok(&inv, std::slice::from_ref(&other), &request);
    assert_eq!(
        positions(assignment(&plan, "prefill-0")),
        vec![(1, 1), (1, 2), (1, 3)]
    );
    let e = err(
        &inv,
        &[other],
        &DeploymentRequest::test("ns/a").prefill("prefill-0", 4),
    );
    assert_eq!(e.category(), "insufficient_gpus");
    assert_eq!(
        e.to_string(),
        "deployment ns/a needs 4 GPUs for 1 worker(s) to place, but the 1 allowed rack(s) \
         have 3 free healthy GPUs (8 healthy of 8)"
    );
}

#[test]
fn placing_the_plan_again_changes_nothing() {
    let inv = [rack("A", 5).with_unhealthy(0, 0), rack("B", 3)];
    let request = DeploymentRequest::test("ns/a")
        .prefill("prefill-0", 3)
        .prefill("prefill-1", 6)
        .decode("decode-0", 8);
    let first = ok(&inv, &[], &request);
    let again = ok(&inv, &first.assignments, &request);
    assert_eq!(again.assignments, first.assignments);
    assert_eq!(again.kept.len(), 3);
    assert!(again.moved.is_empty() && again.added.is_empty() && again.released.is_empty());
}

// Rule 6: exclusive.

#[test]
fn a_rack_can_be_filled_exactly_and_no_further() {
    let inv = [rack("A", 4)];
    let request = DeploymentRequest::test("ns/a")
        .decode("decode-0", 8)
        .prefill("prefill-0", 3)
        .prefill("prefill-1", 2)
        .prefill("prefill-2", 2)
        .prefill("prefill-3", 1);
    let plan = ok(&inv, &[], &request);
    let mut all: Vec<(usize, u32)> = plan.assignments.iter().flat_map(positions).collect();
    all.sort_unstable();
    assert_eq!(all, trays(0, 4));
    let more = request.clone().prefill("prefill-4", 1);
    assert_eq!(err(&inv, &[], &more).category(), "insufficient_gpus");
}

// Rule 7: low fragmentation.

#[test]
fn whole_trays_come_from_the_smallest_run_that_holds_them() {
    // Free runs: trays 2-3 (2 trays) and 6-11 (6 trays).
    let inv = [rack("A", 12)];
    let mut used = trays(0, 2);
    used.extend(trays(4, 2));
    let existing = [alloc("ns/other", "x", "A", &used)];
    let plan = ok(
        &inv,
        &existing,
        &DeploymentRequest::test("ns/a").decode("decode-0", 8),
    );
    assert_eq!(positions(assignment(&plan, "decode-0")), trays(2, 2));
}

#[test]
fn a_worker_no_run_holds_takes_the_largest_runs_first() {
    // Free runs: tray 0, trays 2-4, tray 6.
    let inv = [rack("A", 7)];
    let existing = [alloc("ns/other", "x", "A", &[(1, 0), (5, 0)])];
    let plan = ok(
        &inv,
        &existing,
        &DeploymentRequest::test("ns/a").decode("decode-0", 16),
    );
    let mut want = trays(0, 1);
    want.extend(trays(2, 3));
    assert_eq!(positions(assignment(&plan, "decode-0")), want);
}

#[test]
fn small_workers_prefer_a_rack_where_they_break_no_whole_tray() {
    let inv = [rack("A", 18), rack("B", 18)];
    let existing = [alloc(
        "ns/other",
        "x",
        "B",
        &trays(0, 17)
            .into_iter()
            .chain([(17, 0)])
            .collect::<Vec<_>>(),
    )];
    let plan = ok(
        &inv,
        &existing,
        &DeploymentRequest::test("ns/a").prefill("prefill-0", 2),
    );
    assert_eq!(assignment(&plan, "prefill-0").rack, "B");
    assert_eq!(
        positions(assignment(&plan, "prefill-0")),
        vec![(17, 1), (17, 2)]
    );
}

#[test]
fn best_fit_keeps_the_emptiest_rack_for_big_workers() {
    let inv = [rack("A", 18), rack("B", 18), rack("C", 18)];
    let existing = [
        alloc("ns/other", "x", "A", &trays(0, 10)),
        alloc("ns/other", "y", "C", &trays(0, 14)),
    ];
    let plan = ok(
        &inv,
        &existing,
        &DeploymentRequest::test("ns/a").decode("decode-0", 16),
    );
    assert_eq!(assignment(&plan, "decode-0").rack, "C");
}

// Rule 8: deterministic.

#[test]
fn input_order_does_not_matter() {
    let mut inv = vec![rack("A", 6), rack("B", 6).with_unhealthy(2, 1)];
    let mut existing = vec![
        alloc("ns/b", "x", "A", &trays(1, 1)),
        alloc("ns/c", "y", "B", &[(0, 0)]),
        alloc("ns/a", "prefill-0", "B", &trays(4, 1)),
    ];
    let request = DeploymentRequest::test("ns/a")
        .prefill("prefill-0", 4)
        .decode("decode-0", 8)
        .prefill("prefill-1", 1)
        .in_racks(&["B", "A", "Z"]);
    let first = ok(&inv, &existing, &request);
    inv.reverse();
    existing.reverse();
    assert_eq!(ok(&inv, &existing, &request), first);
}

// Errors and helpers.

#[test]
fn invalid_inputs_are_refused_before_anything_changes() {
    let inv = [rack("A", 2)];
    let twice = DeploymentRequest::test("ns/a")
        .prefill("p", 1)
        .prefill("p", 1);
    let e = err(&inv, &[], &twice);
    assert_eq!((e.category(), e.is_transient()), ("invalid_request", false));
    assert_eq!(
        err(&inv, &[], &DeploymentRequest::test("ns/a").prefill("p", 0)).category(),
        "invalid_request"
    );
    let dup = [rack("A", 2), rack("A", 1)];
    assert_eq!(
        err(&dup, &[], &DeploymentRequest::test("ns/a")).category(),
        "invalid_inventory"
    );
    let e = err(
        &inv,
        &[],
        &DeploymentRequest::test("ns/a")
            .prefill("p", 1)
            .in_racks(&["Z"]),
    );
    assert_eq!(
        e.to_string(),
        "deployment ns/a may use no rack in the inventory (rack filter: [Z])"
    );
}

#[test]
fn a_failed_placement_leaves_the_cluster_as_it_was() {
    let inv = [rack("A", 4), rack("B", 4)];
    let existing = [alloc("ns/a", "decode-0", "A", &trays(0, 2))];
    let mut cluster = Cluster::new(&inv, &existing).unwrap_or_else(|e| panic!("{e}"));
    let before = (cluster.usage(), cluster.allocations());
    // Fits by count (30 of 32 free once decode-0 is released) but not by
    // shape: a rack of 4 trays holds two 6-GPU workers (tray + 2), not three.
    let request = (0..5).fold(DeploymentRequest::test("ns/a"), |r, i| {
        r.prefill(&format!("p{i}"), 6)
    });
    let e = cluster.place(&request).err().map(|e| e.to_string());
    assert_eq!(
        e.as_deref(),
        Some(
            "worker p4 of ns/a needs 6 GPUs in one NVLink domain (1 whole free tray + 2 GPUs on \
             one tray); the largest free block is 4 GPUs in rack A (after placing 4 other workers \
             of this deployment)"
        )
    );
    assert_eq!((cluster.usage(), cluster.allocations()), before);
}

#[test]
fn a_cluster_places_deployments_one_after_another() {
    let inv = [rack("A", 4)];
    let mut cluster = Cluster::new(&inv, &[]).unwrap_or_else(|e| panic!("{e}"));
    let a = cluster
        .place(&DeploymentRequest::test("ns/a").decode("d", 8))
        .unwrap_or_else(|e| panic!("{e}"));
    let b = cluster
        .place(&DeploymentRequest::test("ns/b").decode("d", 8))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(positions(&a.assignments[0]), trays(0, 2));
    assert_eq!(positions(&b.assignments[0]), trays(2, 2));
    let shrunk = cluster
        .place(&DeploymentRequest::test("ns/a"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(shrunk.released, vec!["d"]);
    assert_eq!(cluster.allocations(), b.assignments);
}

#[test]
fn free_gpus_counts_per_rack() {
    let inv = [
        rack("A", 3).with_unhealthy(0, 0).with_unhealthy(2, 3),
        rack("B", 1),
    ];
    let existing = [
        alloc("ns/a", "x", "A", &[(0, 0), (0, 1)]), // holds an unhealthy GPU
        alloc("ns/b", "y", "A", &trays(1, 1)),
        alloc("ns/b", "z", "Q", &[(0, 0)]), // unknown node: ignored
    ];
    let usage = free_gpus(&inv, &existing).unwrap_or_else(|e| panic!("{e}"));
    let a = RackUsage {
        total: 12,
        healthy: 10,
        allocated: 6,
        free: 5,
        whole_free_trays: 0,
    };
    let b = RackUsage {
        total: 4,
        healthy: 4,
        allocated: 0,
        free: 4,
        whole_free_trays: 1,
    };
    assert_eq!(usage.get("A"), Some(&a));
    assert_eq!(usage.get("B"), Some(&b));
}

#[test]
fn stranded_gpus_measure_what_a_size_cannot_use() {
    // A: tray 0 has 3 free, tray 1 has 2 free, trays 2-4 whole-free.
    let inv = [rack("A", 5)];
    let existing = [alloc("ns/b", "y", "A", &[(0, 0), (1, 0), (1, 1)])];
    let s = |g| stranded_gpus(&inv, &existing, g).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s(1).stranded, 0);
    assert_eq!(s(2).stranded, 1); // the 3-free tray leaves one
    assert_eq!(s(4).stranded, 5); // only whole trays count
    assert_eq!(s(8).stranded, 9); // one pair of whole trays
    assert_eq!(s(6).stranded, 5); // 6 = tray + 2: two fit, remainders on trays 0 and 1
    assert_eq!(s(6).free, 17);
    assert_eq!(s(64).per_rack.get("A"), Some(&17));
}
