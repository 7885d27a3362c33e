//! `ModelDeployment`: one served model on one rack SKU, with its workload,
//! SLO and either an automatic or an explicit prefill/decode recipe.
//!
//! Validation lives in the schema (CEL rules with messages that say what to
//! fix) so the API server rejects a bad spec before the operator sees it.

// kube's derive repeats `printcolumn`/`x_kube` attributes by design.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Condition;

/// A model served by disaggregated prefill and decode pools on one rack SKU.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "rackscale.io",
    version = "v1alpha1",
    kind = "ModelDeployment",
    plural = "modeldeployments",
    singular = "modeldeployment",
    shortname = "md",
    category = "rackscale",
    namespaced,
    status = "ModelDeploymentStatus",
    doc = "A model served by disaggregated prefill and decode pools on NVLink racks.",
    printcolumn(name = "MODEL", type_ = "string", json_path = ".spec.model.name"),
    printcolumn(name = "SKU", type_ = "string", json_path = ".spec.hardware.sku"),
    printcolumn(
        name = "PREFILL",
        type_ = "string",
        json_path = ".status.recipe.prefill"
    ),
    printcolumn(name = "DECODE", type_ = "string", json_path = ".status.recipe.decode"),
    printcolumn(name = "GPUS", type_ = "integer", json_path = ".status.recipe.gpus"),
    printcolumn(
        name = "TOK/S/GPU",
        type_ = "integer",
        json_path = ".status.recipe.predicted.tokSPerGpu"
    ),
    printcolumn(
        name = "TOK/S/USER",
        type_ = "number",
        json_path = ".status.recipe.predicted.tokSPerUser"
    ),
    printcolumn(name = "READY", type_ = "string", json_path = ".status.ready"),
    printcolumn(
        name = "AGE",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "self.recipe.mode != 'explicit' || !has(self.recipe.prefill) || !has(self.recipe.decode) || !(has(self.recipe.decode.ep) || has(self.recipe.decode.tp)) || self.recipe.prefill.workers * self.recipe.prefill.tp + self.recipe.decode.workers * (has(self.recipe.decode.ep) ? self.recipe.decode.ep : self.recipe.decode.tp) <= self.hardware.gpuBudget"
).message("the explicit recipe uses more GPUs than hardware.gpuBudget: prefill.workers x prefill.tp + decode.workers x (decode.ep or decode.tp) must not exceed it").field_path(".recipe"))]
#[x_kube(validation = Rule::new(
    "self.recipe.mode != 'explicit' || !has(self.recipe.decode) || !has(self.recipe.decode.ep) || (self.model.profile == 'deepseek-v4-pro' ? 384 : 256) % self.recipe.decode.ep == 0"
).message("recipe.decode.ep must divide the model's routed experts (384 for deepseek-v4-pro: 2, 4, 8, 12, 16, 24, 32, 48, 64; 256 for deepseek-v4-flash and deepseek-v3: 2, 4, 8, 16, 32, 64)").field_path(".recipe.decode.ep"))]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    pub model: ModelSpec,
    pub hardware: HardwareSpec,
    pub workload: WorkloadSpec,
    pub slo: SloSpec,
    pub recipe: RecipeSpec,
    #[serde(default)]
    pub rebalance: RebalanceSpec,
    #[serde(default)]
    pub engine: EngineSpec,
}

/// Which model to serve.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Name clients use in the OpenAI API `model` field, e.g.
    /// `deepseek-ai/DeepSeek-V4-Pro`.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Performance profile the planner uses (architecture, sizes, precisions).
    pub profile: ModelProfileName,
    /// Where engines load weights from (a path or URI); the simulated backend
    /// ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
}

/// Built-in model profiles.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ModelProfileName {
    #[serde(rename = "deepseek-v4-pro")]
    DeepseekV4Pro,
    #[serde(rename = "deepseek-v4-flash")]
    DeepseekV4Flash,
    #[serde(rename = "deepseek-v3")]
    DeepseekV3,
}

impl ModelProfileName {
    /// The perfmodel profile name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeepseekV4Pro => "deepseek-v4-pro",
            Self::DeepseekV4Flash => "deepseek-v4-flash",
            Self::DeepseekV3 => "deepseek-v3",
        }
    }
}

/// Which GPUs to run on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HardwareSpec {
    /// Rack SKU; every worker runs inside one NVLink domain of this SKU.
    pub sku: SkuName,
    /// Labels a `Rack` must carry to be used (all racks of the SKU when empty).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rack_selector: BTreeMap<String, String>,
    /// Most GPUs the deployment may use, prefill and decode together.
    #[schemars(range(min = 2, max = 100000))]
    pub gpu_budget: u32,
}

/// Rack SKUs the operator places on.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SkuName {
    Gb200,
    Gb300,
}

impl SkuName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gb200 => "gb200",
            Self::Gb300 => "gb300",
        }
    }
}

/// The traffic the deployment is planned for.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// Nominal input sequence length in tokens.
    #[schemars(range(min = 1, max = 1048576))]
    pub isl: u32,
    /// Nominal output sequence length in tokens.
    #[schemars(range(min = 1, max = 1048576))]
    pub osl: u32,
}

/// Service-level objective: per-user speed and time to first token.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("has(self.minTokensPerSecondPerUser) || has(self.maxTpotMs)")
    .message("set slo.minTokensPerSecondPerUser (tok/s/user) or slo.maxTpotMs"))]
#[x_kube(validation = Rule::new("!(has(self.minTokensPerSecondPerUser) && has(self.maxTpotMs))")
    .message("set only one of slo.minTokensPerSecondPerUser and slo.maxTpotMs: one is 1000 divided by the other"))]
#[serde(rename_all = "camelCase")]
pub struct SloSpec {
    /// Minimum tokens per second each user sees (1000 / TPOT in ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("slo.minTokensPerSecondPerUser must be positive"))]
    pub min_tokens_per_second_per_user: Option<f64>,
    /// Maximum time per output token, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("slo.maxTpotMs must be positive"))]
    pub max_tpot_ms: Option<f64>,
    /// Maximum time to first token, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("slo.maxTtftMs must be positive"))]
    pub max_ttft_ms: Option<f64>,
}

/// How pools are sized: by the planner, or as given.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.mode != 'explicit' || (has(self.prefill) && has(self.decode))")
    .message("recipe.mode explicit needs recipe.prefill and recipe.decode"))]
#[x_kube(validation = Rule::new("self.mode != 'auto' || (!has(self.prefill) && !has(self.decode))")
    .message("recipe.mode auto picks the pools itself: remove recipe.prefill and recipe.decode, or set mode: explicit"))]
#[serde(rename_all = "camelCase")]
pub struct RecipeSpec {
    /// `auto`: the planner picks the best recipe for the SLO within the
    /// budget. `explicit`: use `prefill` and `decode` as given.
    pub mode: RecipeMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill: Option<PrefillPoolSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<DecodePoolSpec>,
    /// Most requests in flight the deployment admits (auto: the planner's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("recipe.maxConcurrency must be at least 1"))]
    pub max_concurrency: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RecipeMode {
    Auto,
    Explicit,
}

/// Prefill pool: workers of `tp` GPUs each (tensor parallel).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrefillPoolSpec {
    #[x_kube(validation = Rule::new("self >= 1").message("recipe.prefill.workers must be at least 1"))]
    pub workers: u32,
    /// Tensor-parallel width of each prefill worker.
    #[x_kube(validation = Rule::new("self in [1, 2, 4, 8]").message("recipe.prefill.tp must be 1, 2, 4 or 8 (a TP group stays within 8 GPUs)"))]
    pub tp: u32,
}

/// Decode pool: workers of `ep` GPUs with data-parallel attention and expert
/// parallelism, or of `tp` GPUs with plain tensor parallelism.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.ep) != has(self.tp)")
    .message("set exactly one of recipe.decode.ep (expert-parallel width) and recipe.decode.tp (tensor-parallel width)"))]
#[serde(rename_all = "camelCase")]
pub struct DecodePoolSpec {
    #[x_kube(validation = Rule::new("self >= 1").message("recipe.decode.workers must be at least 1"))]
    pub workers: u32,
    /// Expert-parallel width: 2 to 72 GPUs inside one NVLink domain, and a
    /// divisor of the model's routed experts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self in [2, 4, 8, 12, 16, 24, 32, 48, 64, 72]").message("recipe.decode.ep must be one of 2, 4, 8, 12, 16, 24, 32, 48, 64, 72: an EP group stays inside one 72-GPU NVLink domain"))]
    pub ep: Option<u32>,
    /// Tensor-parallel width (TP-only decode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self in [1, 2, 4, 8]").message("recipe.decode.tp must be 1, 2, 4 or 8"))]
    pub tp: Option<u32>,
}

/// Moving whole workers between pools as load shifts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.stabilizationWindowSeconds >= self.intervalSeconds")
    .message("rebalance.stabilizationWindowSeconds must be at least rebalance.intervalSeconds"))]
#[serde(rename_all = "camelCase")]
pub struct RebalanceSpec {
    #[serde(default)]
    pub enabled: bool,
    /// Seconds between rebalancing decisions.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 5, max = 3600))]
    pub interval_seconds: u32,
    /// A new split must be wanted this long before workers move.
    #[serde(default = "default_window")]
    #[schemars(range(min = 5, max = 86400))]
    pub stabilization_window_seconds: u32,
    /// Neither pool shrinks below this many workers.
    #[serde(default = "default_min_workers")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_workers_per_pool: u32,
    /// Most moves per decision; a move turns the GPUs of one worker of the
    /// wider shape into workers of the other role (one DEP16 decode worker
    /// <-> four TP4 prefill workers is one move).
    #[serde(default = "default_max_moves")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_moves_per_interval: u32,
    /// Hysteresis: a new split must serve at least this many percent more
    /// requests within the SLO than the current one before it is wanted.
    #[serde(default = "default_min_gain")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_gain_percent: u32,
    /// Seconds over which a move's extra served requests must repay the
    /// requests lost while its GPUs drain and reload weights.
    #[serde(default = "default_payback")]
    #[schemars(range(min = 1, max = 86400))]
    pub payback_seconds: u32,
}

fn default_interval() -> u32 {
    30
}
fn default_window() -> u32 {
    180
}
fn default_min_workers() -> u32 {
    1
}
fn default_max_moves() -> u32 {
    2
}
fn default_min_gain() -> u32 {
    10
}
fn default_payback() -> u32 {
    600
}

impl Default for RebalanceSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            interval_seconds: default_interval(),
            stabilization_window_seconds: default_window(),
            min_workers_per_pool: default_min_workers(),
            max_moves_per_interval: default_max_moves(),
            min_gain_percent: default_min_gain(),
            payback_seconds: default_payback(),
        }
    }
}

/// The message of the `engine.args` rule (also checked by standalone mode).
pub const ENGINE_ARGS_RULE: &str = "engine.args entries must be --name=value engine flags (e.g. --max-context=16384); --tls-*, --etcd-* and --insecure-plaintext are set by the agent";

/// Splits one `engine.args` entry into its flag name and value, or `None`
/// when the CRD's rule refuses it (the same check, for specs that do not
/// pass through an API server).
pub fn engine_arg(arg: &str) -> Option<(&str, &str)> {
    let (name, value) = arg.strip_prefix("--")?.split_once('=')?;
    let well_formed = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let reserved = name.starts_with("tls-")
        || name.starts_with("etcd")
        || name.starts_with("insecure-plaintext");
    (well_formed && !reserved).then_some((name, value))
}

/// How engines run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EngineSpec {
    /// Container image of the engine (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `sim`: step times from the performance model; `cpu`: the CPU
    /// reference backend that does real tensor math on a small model.
    #[serde(default)]
    pub backend: Backend,
    /// Extra engine flags, each `--name=value` (e.g. `--max-context=16384`),
    /// appended to every rank's command line after the agent's own engine
    /// flags, which they override. The transport flags (`--tls-*`,
    /// `--etcd-*`, `--insecure-plaintext`) are the agent's and refused here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 256)))]
    #[x_kube(validation = Rule::new("self.all(a, a.matches('^--[a-z][a-z0-9-]*=') && !(a.startsWith('--tls-') || a.startsWith('--etcd') || a.startsWith('--insecure-plaintext')))").message(ENGINE_ARGS_RULE))]
    pub args: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Sim,
    Cpu,
}

/// What the operator decided and observed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The recipe in force, with the planner's predicted figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<RecipeStatus>,
    /// Where each worker runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<WorkerStatus>,
    /// Running workers out of planned, e.g. `3/3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Planned, Placed, Ready, Degraded, Rebalancing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// What the rebalancer decided and is doing (with `rebalance.enabled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<RebalanceStatus>,
}

/// The rebalancer's state: the workers of each pool now, the move in
/// progress, and its recent decisions with their reasons.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceStatus {
    /// Prefill workers of the current split (names); they replace the
    /// recipe's worker count once the rebalancer has moved a worker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefill: Vec<String>,
    /// Decode workers of the current split (names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decode: Vec<String>,
    /// Workers drained and relaunched in the other role, in total.
    #[serde(default)]
    pub switches: u32,
    /// The move under way, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_progress: Option<MoveStatus>,
    /// The latest decision (a hold or a move) and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<DecisionRecord>,
    /// The latest moves, newest last (at most ten).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<DecisionRecord>,
}

/// A move between the pools, from the decision to the relaunched workers
/// serving.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MoveStatus {
    /// Split before the move, e.g. `4P:1D`.
    pub from: String,
    /// Split after it, e.g. `2P:2D`.
    pub to: String,
    pub phase: MovePhase,
    /// When the move was decided (RFC 3339).
    pub started: String,
    /// Workers finishing their in-flight work before they stop.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draining: Vec<String>,
    /// Workers launched on the drained GPUs in the other role.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub launching: Vec<String>,
    /// Prefill workers the move launches once the drain is over.
    #[serde(default)]
    pub launch_prefill: u32,
    /// Decode workers the move launches once the drain is over.
    #[serde(default)]
    pub launch_decode: u32,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MovePhase {
    /// The leaving workers take no new work and finish what they have.
    Draining,
    /// The drained GPUs load weights in the other role.
    Loading,
}

/// One rebalancing decision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DecisionRecord {
    /// RFC 3339.
    pub time: String,
    /// `hold` or `move`.
    pub action: String,
    /// Bounded reason: `balanced`, `stabilizing`, `rebalance`, ...
    pub reason: String,
    /// The reason in words, with the figures behind it.
    pub message: String,
    /// The split serving when it was decided.
    pub split: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    Planned,
    Placed,
    Ready,
    Degraded,
    Failed,
}

/// The recipe in force.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecipeStatus {
    /// e.g. `2xTP4`.
    pub prefill: String,
    /// e.g. `1xDEP16`.
    pub decode: String,
    pub prefill_workers: u32,
    pub prefill_tp: u32,
    pub decode_workers: u32,
    /// Expert-parallel width (absent for TP-only decode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_ep: Option<u32>,
    /// Tensor-parallel width (TP-only decode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_tp: Option<u32>,
    pub concurrency: u32,
    pub gpus: u32,
    /// Where the recipe came from: `planner` or `spec`.
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<PredictedFigures>,
}

/// Figures the performance model predicts for the recipe (InferenceX terms).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PredictedFigures {
    pub tok_s_per_gpu: i64,
    pub tok_s_per_user: f64,
    pub tpot_ms: f64,
    pub ttft_ms: f64,
    pub usd_per_mtok: f64,
}

/// One worker: its pool, rack, GPUs and state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    pub name: String,
    pub role: Pool,
    /// The `Rack` (NVLink domain) it runs in.
    pub rack: String,
    /// GPUs per node (compute tray).
    pub placement: Vec<NodeGpus>,
    pub state: WorkerState,
    /// Why the worker is not running (a rank's exit, a refused launch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeGpus {
    pub node: String,
    pub gpus: Vec<u32>,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    Prefill,
    Decode,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WorkerState {
    Placed,
    Launching,
    Running,
    Draining,
    Failed,
}
