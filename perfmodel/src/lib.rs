//! rackscale's performance model: which serving recipes fit, how fast they
//! run, and which is best.
//!
//! Pure and fast: no I/O beyond reading model files. The same functions drive
//! the planner, the simulated engine and the rebalancer, so what the planner
//! predicts and what the simulated rack measures differ only by what the
//! orchestration itself loses.
//!
//! - [`hardware`]: the SKU catalog (GB200/GB300 NVL72, B200, H200).
//! - [`model`], [`attention`], [`precision`]: model profiles from HF configs.
//! - [`shape`], [`memory`]: worker shapes and whether they fit in HBM.
//! - [`steptime`], [`calibration`]: forward-pass time and its free parameters.
//! - [`recipe`]: a recipe's figures under closed-loop load.
//! - [`fit`]: calibration against measured recipes.
//! - [`search`]: Pareto frontiers, interpolation, SKU comparison, best recipe.

pub mod attention;
pub mod calibration;
pub mod fit;
pub mod hardware;
pub mod memory;
pub mod model;
pub mod precision;
pub mod recipe;
pub mod search;
pub mod shape;
pub mod steptime;

pub use calibration::Calibration;
pub use hardware::{Hardware, Sku};
pub use model::ModelProfile;
pub use recipe::{Evaluation, Evaluator, Figures, Recipe, Workload};
pub use shape::{Parallelism, Role, WorkerShape};

/// Everything that can go wrong in the performance model. All are permanent
/// (they depend only on the inputs).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown SKU `{given}`; known SKUs: {known}")]
    UnknownSku { given: String, known: String },
    #[error("unknown model `{given}`; built-in profiles: {known} (or pass a config.json)")]
    UnknownModel { given: String, known: String },
    #[error(
        "unsupported architecture `{0}`; supported: DeepseekV4ForCausalLM, DeepseekV3ForCausalLM"
    )]
    UnsupportedArchitecture(String),
    #[error("invalid model or calibration data: {0}")]
    InvalidConfig(String),
    #[error("invalid worker shape: {0}")]
    InvalidShape(String),
    #[error("invalid search request: {0}")]
    InvalidRequest(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::UnknownSku { .. } => "unknown_sku",
            Error::UnknownModel { .. } => "unknown_model",
            Error::UnsupportedArchitecture(_) => "unsupported_architecture",
            Error::InvalidConfig(_) => "invalid_config",
            Error::InvalidShape(_) => "invalid_shape",
            Error::InvalidRequest(_) => "invalid_request",
            Error::Io { .. } => "io",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
