//! The simulated deployment: workers, queues and the event heap.
//!
//! Prefill workers take prompts from one frontend queue in arrival order
//! with token-budget batching (a prompt longer than what is left of the
//! budget is chunked and finished first in the worker's next pass); a
//! finished prompt's KV crosses NVLink and the request waits for decode.
//! Decode workers batch continuously: a request joins at the next step
//! boundary when its KV (at its full context) fits the worker's HBM and the
//! batch is under the scheduler cap, and leaves after OSL steps. Step times
//! come from `perfmodel::steptime::StepModel`, the functions the engine's
//! simulated backend uses; a decode step is costed at the batch's mean
//! context (the engine sums per request; the difference is small because
//! KV reads are near-linear in context).
//!
//! Moves drain the chosen workers (prefill: finish the prompt in hand;
//! decode: finish every request in the batch), then relaunch their GPUs in
//! the other role after the modelled weight reload. Invariant: GPUs in use
//! (running, draining, loading) never exceed the budget, except for the
//! oracle's "ghost" workers, whose GPUs were handed over at no cost.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, VecDeque};

use perfmodel::memory::{
    self, MAX_DECODE_BATCH_PER_RANK, MIN_PREFILL_TOKENS, RUNTIME_RESERVE_BYTES,
};
use perfmodel::steptime::StepModel;
use perfmodel::{Calibration, Hardware, ModelProfile, Parallelism, Role, WorkerShape};

use crate::rebalance::{Demand, Observation, PoolLoad, Shapes, Split, Transition};

/// Workload-independent figures of the two worker shapes.
#[derive(Debug, Clone)]
pub(crate) struct Setup {
    pub model: ModelProfile,
    pub shapes: Shapes,
    prefill_step: StepModel,
    decode_step: StepModel,
    prefill_budget: u32,
    decode_kv_capacity: f64,
    decode_batch_cap: usize,
    decode_act_per_request: f64,
    pub prefill_reload_s: f64,
    pub decode_reload_s: f64,
    overhead_s: f64,
    transfer_bw: f64,
}

impl Setup {
    /// Shapes sized for prompts up to `max_isl` and contexts up to `max_ctx`.
    pub fn new(
        model: ModelProfile,
        hw: Hardware,
        cal: Calibration,
        shapes: Shapes,
        max_isl: f64,
        max_ctx: f64,
    ) -> Self {
        let pshape = WorkerShape::prefill_tp(shapes.prefill_tp);
        let dshape = WorkerShape {
            role: Role::Decode,
            parallelism: shapes.decode,
        };
        let pfit = memory::fit(&model, &hw, pshape, max_isl, max_ctx);
        let dfit = memory::fit(&model, &hw, dshape, max_isl, max_ctx);
        let (ranks_holding, split) = match shapes.decode {
            Parallelism::Ep(e) => (e, 1),
            Parallelism::Tp(t) => (1, t),
        };
        let free = (hw.usable_hbm_bytes - dfit.breakdown.weights - RUNTIME_RESERVE_BYTES).max(0.0);
        let reload = perfmodel::memory::start_seconds;
        Self {
            prefill_step: StepModel::new(&model, &hw, pshape.parallelism, cal),
            decode_step: StepModel::new(&model, &hw, shapes.decode, cal),
            prefill_budget: pfit.max_token_budget.max(MIN_PREFILL_TOKENS),
            decode_kv_capacity: free * f64::from(ranks_holding),
            decode_batch_cap: (MAX_DECODE_BATCH_PER_RANK * ranks_holding) as usize,
            decode_act_per_request: model.activation_bytes_per_token(split),
            prefill_reload_s: reload(pfit.breakdown.weights),
            decode_reload_s: reload(dfit.breakdown.weights),
            overhead_s: cal.request_overhead_ms * 1e-3,
            transfer_bw: hw.nvlink_bandwidth * cal.link_efficiency,
            model,
            shapes,
        }
    }

    fn kv_need(&self, r: &Req) -> f64 {
        self.model.attention.kv_bytes(f64::from(r.isl + r.osl)) + self.decode_act_per_request
    }
}

/// One request's life; times are NaN until they happen.
#[derive(Debug, Clone)]
pub(crate) struct Req {
    pub arrival: f64,
    pub isl: u32,
    pub osl: u32,
    prefill_left: u32,
    /// Joined a decode batch: its first token has reached the client.
    pub admitted: f64,
    pub done: f64,
}

impl Req {
    pub fn ttft(&self, overhead_s: f64) -> f64 {
        self.admitted - self.arrival + overhead_s
    }

    pub fn tpot(&self) -> f64 {
        (self.done - self.admitted) / f64::from(self.osl.max(1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Draining,
    Loading,
    Retired,
}

#[derive(Debug, Clone)]
struct Worker {
    role: Role,
    state: State,
    gpus: u32,
    busy: bool,
    /// Oracle only: drained at no cost, its GPUs already serve elsewhere.
    ghost: bool,
    // Prefill.
    partial: Option<u32>,
    in_step: Vec<(u32, u32)>,
    // Decode: (finish step, request) for the running batch.
    batch: BinaryHeap<Reverse<(u64, u32)>>,
    joining: Vec<u32>,
    steps: u64,
    ctx_sum: f64,
    kv_used: f64,
}

impl Worker {
    fn new(role: Role, gpus: u32, state: State) -> Self {
        Self {
            role,
            state,
            gpus,
            busy: false,
            ghost: false,
            partial: None,
            in_step: Vec::new(),
            batch: BinaryHeap::new(),
            joining: Vec::new(),
            steps: 0,
            ctx_sum: 0.0,
            kv_used: 0.0,
        }
    }

    fn load(&self) -> usize {
        match self.role {
            Role::Prefill => self.in_step.len() + usize::from(self.partial.is_some()),
            Role::Decode => self.batch.len() + self.joining.len(),
        }
    }

    fn drained(&self) -> bool {
        !self.busy && self.load() == 0
    }
}

/// What the event loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Arrival,
    Tick,
    PhaseStart(usize),
    PrefillDone(usize),
    Transferred(u32),
    DecodeDone(usize),
    Ready(usize),
}

#[derive(Debug, Clone, Copy)]
struct Event {
    t: f64,
    seq: u64,
    kind: Kind,
}

impl PartialEq for Event {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Event {
    /// Earliest first (the heap is a max-heap), then in scheduling order.
    fn cmp(&self, o: &Self) -> Ordering {
        o.t.total_cmp(&self.t).then(o.seq.cmp(&self.seq))
    }
}

/// A move in progress.
#[derive(Debug, Clone)]
struct Switch {
    started: f64,
    draining: Vec<usize>,
    loading: Vec<usize>,
    launch: Vec<Role>,
    drained_gpus: u32,
}

/// Counters over one observation interval.
#[derive(Debug, Clone, Default)]
struct Interval {
    arrivals: u32,
    isl_sum: f64,
    osl_sum: f64,
    ttft_sum: f64,
    ttft_n: u32,
    tpot_sum: f64,
    tpot_n: u32,
}

/// The simulated deployment.
#[derive(Debug)]
pub(crate) struct Cluster {
    pub setup: Setup,
    pub now: f64,
    seq: u64,
    events: BinaryHeap<Event>,
    pub reqs: Vec<Req>,
    workers: Vec<Worker>,
    prefill_queue: VecDeque<u32>,
    decode_queue: VecDeque<u32>,
    free_gpus: u32,
    switch: Option<Switch>,
    interval: Interval,
    pub lost_gpu_s: f64,
    pub role_switches: u32,
    pub moves: u32,
    /// Times at which a move's workers all serve.
    pub settled_at: Vec<f64>,
}

impl Cluster {
    pub fn new(setup: Setup, split: Split) -> Self {
        let mut c = Self {
            free_gpus: setup.shapes.gpu_budget,
            setup,
            now: 0.0,
            seq: 0,
            events: BinaryHeap::new(),
            reqs: Vec::new(),
            workers: Vec::new(),
            prefill_queue: VecDeque::new(),
            decode_queue: VecDeque::new(),
            switch: None,
            interval: Interval::default(),
            lost_gpu_s: 0.0,
            role_switches: 0,
            moves: 0,
            settled_at: Vec::new(),
        };
        for _ in 0..split.prefill {
            c.add_worker(Role::Prefill, State::Running);
        }
        for _ in 0..split.decode {
            c.add_worker(Role::Decode, State::Running);
        }
        c
    }

    pub fn overhead_s(&self) -> f64 {
        self.setup.overhead_s
    }

    fn gpus_of(&self, role: Role) -> u32 {
        match role {
            Role::Prefill => self.setup.shapes.prefill_gpus(),
            Role::Decode => self.setup.shapes.decode_gpus(),
        }
    }

    fn add_worker(&mut self, role: Role, state: State) -> usize {
        let gpus = self.gpus_of(role);
        self.free_gpus = self.free_gpus.saturating_sub(gpus);
        self.workers.push(Worker::new(role, gpus, state));
        self.workers.len() - 1
    }

    pub fn push(&mut self, t: f64, kind: Kind) {
        self.seq += 1;
        self.events.push(Event {
            t,
            seq: self.seq,
            kind,
        });
    }

    pub fn pop(&mut self) -> Option<(f64, Kind)> {
        self.events.pop().map(|e| (e.t, e.kind))
    }

    /// Running workers per role (draining, loading and ghosts excluded).
    pub fn split(&self) -> Split {
        let count = |role| {
            self.workers
                .iter()
                .filter(|w| w.role == role && w.state == State::Running)
                .count() as u32
        };
        Split {
            prefill: count(Role::Prefill),
            decode: count(Role::Decode),
        }
    }

    pub fn switching(&self) -> bool {
        self.switch.is_some()
    }

    /// A request arrives at the frontend.
    pub fn arrive(&mut self, isl: u32, osl: u32) {
        let id = self.reqs.len() as u32;
        self.reqs.push(Req {
            arrival: self.now,
            isl,
            osl,
            prefill_left: isl,
            admitted: f64::NAN,
            done: f64::NAN,
        });
        self.interval.arrivals += 1;
        self.interval.isl_sum += f64::from(isl);
        self.interval.osl_sum += f64::from(osl);
        self.prefill_queue.push_back(id);
        for w in 0..self.workers.len() {
            if self.prefill_queue.is_empty() {
                break;
            }
            self.start_prefill(w);
        }
    }

    /// Handles a worker or transfer event.
    pub fn handle(&mut self, kind: Kind) {
        match kind {
            Kind::PrefillDone(w) => self.prefill_done(w),
            Kind::Transferred(r) => {
                self.decode_queue.push_back(r);
                self.admit();
            }
            Kind::DecodeDone(w) => self.decode_done(w),
            Kind::Ready(w) => self.ready(w),
            Kind::Arrival | Kind::Tick | Kind::PhaseStart(_) => {}
        }
    }

    fn start_prefill(&mut self, w: usize) {
        let worker = &self.workers[w];
        if worker.role != Role::Prefill || worker.busy {
            return;
        }
        let taking = worker.state == State::Running;
        if !(taking || (worker.state == State::Draining && worker.partial.is_some())) {
            return;
        }
        let mut left = self.setup.prefill_budget;
        let mut parts = Vec::new();
        let mut partial = self.workers[w].partial.take();
        if let Some(r) = partial.take() {
            let take = self.reqs[r as usize].prefill_left.min(left);
            left -= take;
            parts.push((r, take));
            if take < self.reqs[r as usize].prefill_left {
                partial = Some(r);
            }
        }
        while taking && left > 0 && partial.is_none() {
            let Some(r) = self.prefill_queue.pop_front() else {
                break;
            };
            let need = self.reqs[r as usize].prefill_left;
            let take = need.min(left);
            left -= take;
            parts.push((r, take));
            if take < need {
                partial = Some(r);
            }
        }
        if parts.is_empty() {
            return;
        }
        let att = &self.setup.model.attention;
        let tokens: f64 = parts.iter().map(|p| f64::from(p.1)).sum();
        let flops: f64 = parts
            .iter()
            .map(|&(r, t)| {
                f64::from(t) * att.prefill_flops_per_token(f64::from(self.reqs[r as usize].isl))
            })
            .sum();
        let dt = self
            .setup
            .prefill_step
            .prefill(tokens, parts.len() as f64, flops / tokens)
            .total();
        let worker = &mut self.workers[w];
        worker.partial = partial;
        worker.in_step = parts;
        worker.busy = true;
        self.push(self.now + dt, Kind::PrefillDone(w));
    }

    fn prefill_done(&mut self, w: usize) {
        let parts = std::mem::take(&mut self.workers[w].in_step);
        self.workers[w].busy = false;
        for (r, t) in parts {
            let req = &mut self.reqs[r as usize];
            req.prefill_left -= t;
            if req.prefill_left == 0 {
                let bytes = self.setup.model.attention.kv_bytes(f64::from(req.isl));
                let at = self.now + bytes / self.setup.transfer_bw;
                self.push(at, Kind::Transferred(r));
            }
        }
        self.start_prefill(w);
        self.check_drained(w);
    }

    /// Admits queued requests, oldest first, to the decode worker with the
    /// most free KV that can hold them.
    fn admit(&mut self) {
        while let Some(&r) = self.decode_queue.front() {
            let need = self.setup.kv_need(&self.reqs[r as usize]);
            let cap = self.setup.kv_capacity();
            let best = self
                .workers
                .iter()
                .enumerate()
                .filter(|(_, w)| {
                    w.role == Role::Decode
                        && w.state == State::Running
                        && w.load() < self.setup.decode_batch_cap
                        && w.kv_used + need <= cap
                })
                .max_by(|a, b| b.1.kv_used.total_cmp(&a.1.kv_used).then(b.0.cmp(&a.0)))
                .map(|(i, _)| i);
            let Some(w) = best else {
                break;
            };
            self.decode_queue.pop_front();
            let req = &mut self.reqs[r as usize];
            req.admitted = self.now;
            self.interval.ttft_sum += req.ttft(self.setup.overhead_s);
            self.interval.ttft_n += 1;
            let worker = &mut self.workers[w];
            worker.kv_used += need;
            worker.joining.push(r);
            if !worker.busy {
                self.start_decode(w);
            }
        }
    }

    fn start_decode(&mut self, w: usize) {
        let worker = &mut self.workers[w];
        for r in std::mem::take(&mut worker.joining) {
            let req = &self.reqs[r as usize];
            worker
                .batch
                .push(Reverse((worker.steps + u64::from(req.osl), r)));
            worker.ctx_sum += f64::from(req.isl);
        }
        let b = worker.batch.len();
        if b == 0 {
            worker.busy = false;
            return;
        }
        let ctx = worker.ctx_sum / b as f64;
        let att = &self.setup.model.attention;
        let dt = self
            .setup
            .decode_step
            .decode(b as f64, att.kv_read_bytes(ctx), att.flops_per_token(ctx))
            .total();
        worker.busy = true;
        self.push(self.now + dt, Kind::DecodeDone(w));
    }

    fn decode_done(&mut self, w: usize) {
        let now = self.now;
        let mut finished = Vec::new();
        {
            let worker = &mut self.workers[w];
            worker.busy = false;
            worker.steps += 1;
            worker.ctx_sum += worker.batch.len() as f64;
            while let Some(&Reverse((at, r))) = worker.batch.peek() {
                if at > worker.steps {
                    break;
                }
                worker.batch.pop();
                finished.push(r);
            }
        }
        for r in finished {
            let need = self.setup.kv_need(&self.reqs[r as usize]);
            let req = &mut self.reqs[r as usize];
            req.done = now;
            let tpot = req.tpot();
            let ctx = f64::from(req.isl + req.osl);
            self.interval.tpot_sum += tpot;
            self.interval.tpot_n += 1;
            let worker = &mut self.workers[w];
            worker.ctx_sum -= ctx;
            worker.kv_used = (worker.kv_used - need).max(0.0);
        }
        self.admit();
        if !self.workers[w].busy {
            self.start_decode(w);
        }
        self.check_drained(w);
    }

    fn check_drained(&mut self, w: usize) {
        let worker = &self.workers[w];
        if worker.state != State::Draining || !worker.drained() {
            return;
        }
        let ghost = worker.ghost;
        let gpus = worker.gpus;
        self.workers[w].state = State::Retired;
        if ghost {
            return;
        }
        self.free_gpus += gpus;
        let Some(sw) = self.switch.as_mut() else {
            return;
        };
        sw.draining.retain(|&x| x != w);
        if sw.draining.is_empty() {
            self.launch();
        }
    }

    /// Starts loading the move's new workers once every drain is done.
    fn launch(&mut self) {
        let Some(sw) = self.switch.as_mut() else {
            return;
        };
        let roles = std::mem::take(&mut sw.launch);
        let mut loading = Vec::new();
        for role in roles {
            let reload = match role {
                Role::Prefill => self.setup.prefill_reload_s,
                Role::Decode => self.setup.decode_reload_s,
            };
            let w = self.add_worker(role, State::Loading);
            self.push(self.now + reload, Kind::Ready(w));
            loading.push(w);
        }
        if let Some(sw) = self.switch.as_mut() {
            sw.loading = loading;
        }
        self.finish_switch_if_done();
    }

    fn ready(&mut self, w: usize) {
        self.workers[w].state = State::Running;
        if let Some(sw) = self.switch.as_mut() {
            sw.loading.retain(|&x| x != w);
        }
        match self.workers[w].role {
            Role::Prefill => self.start_prefill(w),
            Role::Decode => self.admit(),
        }
        self.finish_switch_if_done();
    }

    fn finish_switch_if_done(&mut self) {
        let done = self
            .switch
            .as_ref()
            .is_some_and(|s| s.draining.is_empty() && s.loading.is_empty() && s.launch.is_empty());
        if done && let Some(sw) = self.switch.take() {
            self.lost_gpu_s += f64::from(sw.drained_gpus) * (self.now - sw.started);
            self.settled_at.push(self.now);
        }
    }

    /// Starts a move. `instant`: the oracle's free switch (new workers serve
    /// now; drained ones finish their work as ghosts on no budget).
    pub fn apply(&mut self, t: &Transition, instant: bool) {
        self.moves += t.moves;
        self.role_switches += t.drain_prefill + t.drain_decode;
        let mut chosen = Vec::new();
        for (role, n) in [
            (Role::Prefill, t.drain_prefill),
            (Role::Decode, t.drain_decode),
        ] {
            let mut candidates: Vec<usize> = (0..self.workers.len())
                .filter(|&i| {
                    self.workers[i].role == role && self.workers[i].state == State::Running
                })
                .collect();
            candidates.sort_by_key(|&i| (self.workers[i].load(), Reverse(i)));
            chosen.extend(candidates.into_iter().take(n as usize));
        }
        let mut launch = Vec::new();
        launch.extend(std::iter::repeat_n(
            Role::Prefill,
            t.launch_prefill as usize,
        ));
        launch.extend(std::iter::repeat_n(Role::Decode, t.launch_decode as usize));
        if instant {
            for &w in &chosen {
                self.workers[w].state = State::Draining;
                self.workers[w].ghost = true;
                self.free_gpus += self.workers[w].gpus;
                self.check_drained(w);
            }
            for role in launch {
                let w = self.add_worker(role, State::Running);
                match role {
                    Role::Prefill => self.start_prefill(w),
                    Role::Decode => self.admit(),
                }
            }
            return;
        }
        let drained_gpus = chosen.iter().map(|&w| self.workers[w].gpus).sum();
        self.switch = Some(Switch {
            started: self.now,
            draining: chosen.clone(),
            loading: Vec::new(),
            launch,
            drained_gpus,
        });
        for &w in &chosen {
            self.workers[w].state = State::Draining;
        }
        // Requests already admitted to a draining decode worker finish there.
        for &w in &chosen {
            self.check_drained(w);
        }
        if self
            .switch
            .as_ref()
            .is_some_and(|s| s.draining.is_empty() && !s.launch.is_empty())
        {
            self.launch();
        }
    }

    /// The load report for the interval since the last call, then resets it.
    pub fn observe(&mut self, interval_s: f64) -> Observation {
        let i = std::mem::take(&mut self.interval);
        let n = f64::from(i.arrivals.max(1));
        let demand = Demand {
            rate: f64::from(i.arrivals) / interval_s,
            isl: i.isl_sum / n,
            osl: i.osl_sum / n,
        };
        let running = |role: Role| {
            self.workers
                .iter()
                .filter(move |w| w.role == role && w.state == State::Running)
        };
        let decode_running: usize = running(Role::Decode).map(Worker::load).sum();
        let kv_used: f64 = running(Role::Decode).map(|w| w.kv_used).sum();
        let kv_cap = self.setup.kv_capacity() * running(Role::Decode).count() as f64;
        let mean = |sum: f64, n: u32| (n > 0).then(|| sum / f64::from(n));
        Observation {
            now_s: self.now,
            split: self.split(),
            switching: self.switching(),
            demand,
            prefill: PoolLoad {
                queued: self.prefill_queue.len() as u32,
                running: running(Role::Prefill).map(Worker::load).sum::<usize>() as u32,
                kv_use: 0.0,
                ttft_s: mean(i.ttft_sum, i.ttft_n),
                tpot_s: None,
            },
            decode: PoolLoad {
                queued: self.decode_queue.len() as u32,
                running: decode_running as u32,
                kv_use: if kv_cap > 0.0 { kv_used / kv_cap } else { 0.0 },
                ttft_s: None,
                tpot_s: mean(i.tpot_sum, i.tpot_n),
            },
        }
    }
}

impl Setup {
    fn kv_capacity(&self) -> f64 {
        self.decode_kv_capacity
    }
}
