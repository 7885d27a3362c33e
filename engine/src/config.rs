//! A worker's validated, typed configuration: role, model, SKU, shape, time
//! scale and the scheduler budgets derived from the perfmodel memory fit.

use std::path::PathBuf;
use std::time::Duration;

use perfmodel::memory;
use perfmodel::{Calibration, ModelProfile, Parallelism, Sku, WorkerShape};
use proto::tls::{Alpn, ClientTls, ServerTls, Transport};

use crate::error::{Error, Result};

/// Which calls a worker serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Prefill and `PullKv` only.
    Prefill,
    /// `Decode` only (pulls KV from prefill workers).
    Decode,
    /// Aggregated: prefill, `PullKv` and decode on one worker.
    Both,
}

impl Role {
    /// The lowercase name used in flags and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Both => "both",
        }
    }

    /// Whether the worker computes prefills and holds KV for pulling.
    pub fn prefills(self) -> bool {
        matches!(self, Role::Prefill | Role::Both)
    }

    /// Whether the worker runs decodes.
    pub fn decodes(self) -> bool {
        matches!(self, Role::Decode | Role::Both)
    }
}

impl std::str::FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "prefill" => Ok(Role::Prefill),
            "decode" => Ok(Role::Decode),
            "both" | "aggregated" => Ok(Role::Both),
            other => Err(Error::Config(format!(
                "unknown role `{other}`; expected prefill, decode or both"
            ))),
        }
    }
}

/// Which backend computes a worker's steps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BackendConfig {
    /// Modelled step times, synthetic tokens and KV ([`crate::sim`]).
    #[default]
    Sim,
    /// The CPU reference model ([`crate::cpu`]).
    Cpu(CpuOptions),
}

/// Where the CPU reference backend finds its model and expert ranks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuOptions {
    /// Directory with `config.json` and `model.safetensors`.
    pub model_dir: PathBuf,
    /// Expert-parallel peers by rank (`host:port` of ranks 1..), empty when
    /// this process holds every expert.
    pub ep_peers: Vec<String>,
}

impl BackendConfig {
    /// The name used in flags and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Sim => "sim",
            Self::Cpu(_) => "cpu",
        }
    }
}

/// How a worker's links are secured: what it serves its port with (gRPC
/// and HTTP/1.1 share it, so both ALPN protocols are offered) and what it
/// dials other engines with (KV pulls, expert ranks, its own status).
#[derive(Debug, Clone)]
pub struct EngineTls {
    /// `None`: the port serves plaintext.
    pub server: Option<ServerTls>,
    /// How other engines are dialled.
    pub client: ClientTls,
}

impl EngineTls {
    /// No TLS on either side: a binary gets it only from
    /// `--insecure-plaintext`; in-process tests use it for their servers.
    pub fn plaintext() -> Self {
        Self {
            server: None,
            client: ClientTls::plaintext(),
        }
    }

    /// Both sides from `transport` (files loaded now).
    pub fn from_transport(transport: &Transport) -> Result<Self> {
        let tls = |e: proto::Error| Error::Config(e.to_string());
        Ok(Self {
            server: transport.server(Alpn::H2Http1).map_err(tls)?,
            client: transport.client().map_err(tls)?,
        })
    }

    /// The URL scheme this worker's endpoint advertises.
    pub fn scheme(&self) -> &'static str {
        if self.server.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// Which deployment and worker this process is (reported in `Status` and
/// `KvHandle.prefill_worker`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerIdent {
    /// Namespace of the owning ModelDeployment.
    pub namespace: String,
    /// Name of the owning ModelDeployment.
    pub deployment: String,
    /// Worker name within the deployment.
    pub worker: String,
}

/// Everything a worker needs to run. Build with [`EngineConfig::new`], adjust
/// the public fields, then [`EngineConfig::validate`] (the server does).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Calls this worker serves.
    pub role: Role,
    /// Model the simulated backend behaves like.
    pub model: ModelProfile,
    /// GPU system.
    pub sku: Sku,
    /// How the worker's GPUs split the model.
    pub parallelism: Parallelism,
    /// Free parameters of the step-time model.
    pub calibration: Calibration,
    /// Modelled seconds per wall second (100 means a 30 ms step sleeps 0.3 ms).
    pub time_scale: f64,
    /// Prompt length the prefill token budget is sized for.
    pub isl: u32,
    /// Context (prompt + output) the decode KV budget is sized for.
    pub max_context: u32,
    /// Tokens per paged KV block.
    pub block_tokens: u32,
    /// Override of the KV-block total (default: from the memory fit).
    pub kv_blocks: Option<u64>,
    /// Override of the decode batch limit (default: from the memory fit).
    pub max_batch: Option<u32>,
    /// Override of the prefill tokens per step (default: from the memory fit).
    pub prefill_token_budget: Option<u32>,
    /// Decode requests that may wait for KV blocks before new ones are refused.
    pub max_waiting: usize,
    /// Wall time a prefilled KV waits to be pulled before it is freed.
    pub kv_ttl: Duration,
    /// Largest `PullKv` chunk this worker sends.
    pub kv_chunk_bytes: u32,
    /// Endpoint put into `KvHandle.kv_endpoint` (default: the bound address).
    pub advertise: Option<String>,
    /// Who this worker is.
    pub worker: WorkerIdent,
    /// Launch generation it runs.
    pub generation: u64,
    /// What computes the steps.
    pub backend: BackendConfig,
    /// How the port is served and other engines dialled.
    pub tls: EngineTls,
}

/// The scheduler budgets a configuration resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// Largest running decode batch.
    pub max_batch: u32,
    /// Paged KV blocks available to decode.
    pub kv_blocks: u64,
    /// Tokens per paged KV block.
    pub block_tokens: u32,
    /// Prompt tokens per prefill step.
    pub prefill_token_budget: u32,
    /// Decode requests allowed to wait for blocks.
    pub max_waiting: usize,
}

impl EngineConfig {
    /// Defaults for a role, model, SKU and shape: ISL 8k, context 9k, 64-token
    /// blocks, time scale 1, KV held 60 s, 1 MiB chunks.
    pub fn new(role: Role, model: ModelProfile, sku: Sku, parallelism: Parallelism) -> Self {
        Self {
            role,
            model,
            sku,
            parallelism,
            calibration: Calibration::fitted(),
            time_scale: 1.0,
            isl: 8192,
            max_context: 9216,
            block_tokens: 64,
            kv_blocks: None,
            max_batch: None,
            prefill_token_budget: None,
            max_waiting: 1024,
            kv_ttl: Duration::from_secs(60),
            kv_chunk_bytes: 1 << 20,
            advertise: None,
            worker: WorkerIdent::default(),
            generation: 0,
            backend: BackendConfig::Sim,
            tls: EngineTls::plaintext(),
        }
    }

    /// Budgets of the CPU reference backend: its small model fits anywhere,
    /// so the overrides or plain defaults (64 requests of `max_context`,
    /// whole prompts per prefill step) apply instead of the GPU memory fit.
    fn cpu_budgets(&self) -> Budgets {
        let max_batch = self.max_batch.unwrap_or(64).max(1);
        let blocks_per_request = u64::from(self.max_context.div_ceil(self.block_tokens));
        Budgets {
            max_batch,
            kv_blocks: self
                .kv_blocks
                .unwrap_or(u64::from(max_batch) * blocks_per_request),
            block_tokens: self.block_tokens,
            prefill_token_budget: self.prefill_token_budget.unwrap_or(self.max_context).max(1),
            max_waiting: self.max_waiting,
        }
    }

    /// Modelled seconds this worker needs to load its weights and start
    /// before it serves (perfmodel's start-up cost of its shape); 0 for the
    /// CPU reference backend, whose small model loads for real.
    pub fn start_seconds(&self) -> f64 {
        if let BackendConfig::Cpu(_) = self.backend {
            return 0.0;
        }
        let role = if self.role == Role::Prefill {
            perfmodel::Role::Prefill
        } else {
            perfmodel::Role::Decode
        };
        let fit = memory::fit(
            &self.model,
            &self.sku.hardware(),
            WorkerShape {
                role,
                parallelism: self.parallelism,
            },
            f64::from(self.isl),
            f64::from(self.max_context),
        );
        memory::start_seconds(fit.breakdown.weights)
    }

    /// Checks the flags and resolves the scheduler budgets from the memory fit.
    pub fn validate(&self) -> Result<Budgets> {
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return Err(Error::Config(format!(
                "time scale must be positive, got {}",
                self.time_scale
            )));
        }
        if self.block_tokens == 0 || self.kv_chunk_bytes == 0 {
            return Err(Error::Config(
                "block tokens and KV chunk bytes must be positive".into(),
            ));
        }
        if self.isl == 0 || self.max_context < self.isl {
            return Err(Error::Config(format!(
                "need 0 < isl ({}) <= max context ({})",
                self.isl, self.max_context
            )));
        }
        if let BackendConfig::Cpu(_) = self.backend {
            return Ok(self.cpu_budgets());
        }
        let hw = self.sku.hardware();
        let role = if self.role == Role::Prefill {
            perfmodel::Role::Prefill
        } else {
            perfmodel::Role::Decode
        };
        let shape = WorkerShape {
            role,
            parallelism: self.parallelism,
        };
        shape.validate(&self.model, &hw)?;
        let decode_fit = memory::fit(
            &self.model,
            &hw,
            WorkerShape {
                role: perfmodel::Role::Decode,
                parallelism: self.parallelism,
            },
            f64::from(self.isl),
            f64::from(self.max_context),
        );
        let prefill_fit = memory::fit(
            &self.model,
            &hw,
            WorkerShape {
                role: perfmodel::Role::Prefill,
                parallelism: self.parallelism,
            },
            f64::from(self.isl),
            f64::from(self.max_context),
        );
        let relevant = if self.role == Role::Prefill {
            &prefill_fit
        } else {
            &decode_fit
        };
        if !relevant.fits && self.kv_blocks.is_none() {
            return Err(Error::Config(
                relevant
                    .reason
                    .clone()
                    .unwrap_or_else(|| format!("{shape} does not fit")),
            ));
        }
        let max_batch = self.max_batch.unwrap_or(decode_fit.max_batch).max(1);
        let blocks_per_request = u64::from(self.max_context.div_ceil(self.block_tokens));
        let kv_blocks = self
            .kv_blocks
            .unwrap_or(u64::from(decode_fit.max_batch) * blocks_per_request);
        let prefill_token_budget = self
            .prefill_token_budget
            .unwrap_or(prefill_fit.max_token_budget)
            .max(1);
        Ok(Budgets {
            max_batch,
            kv_blocks,
            block_tokens: self.block_tokens,
            prefill_token_budget,
            max_waiting: self.max_waiting,
        })
    }
}
