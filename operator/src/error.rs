//! The operator's errors, each classified transient (requeue with backoff)
//! or permanent (wait for a spec change), with a bounded metric category.

use std::time::Duration;

/// Everything reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("no recipe meets the SLO: {0}")]
    NoRecipe(String),
    #[error("the recipe does not fit: {0}")]
    DoesNotFit(String),
    #[error("cannot place: {0}")]
    Placement(String),
    #[error("invalid deployment: {0}")]
    Invalid(String),
    #[error("performance model: {0}")]
    Model(#[from] perfmodel::Error),
    #[error("serialization: {0}")]
    Serialization(#[from] serde_json::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("etcd registry: {0}")]
    Registry(String),
    #[error("{0}")]
    SpecFile(String),
}

impl Error {
    /// Transient errors are retried with backoff; permanent ones wait for
    /// the spec (or the fleet) to change.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Kube(e) => !matches!(e, kube::Error::Api(s) if s.code == 422 || s.code == 400),
            Error::Placement(_) | Error::Finalizer(_) | Error::Registry(_) => true,
            Error::NoRecipe(_)
            | Error::DoesNotFit(_)
            | Error::Invalid(_)
            | Error::Model(_)
            | Error::Serialization(_)
            | Error::SpecFile(_) => false,
        }
    }

    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::NoRecipe(_) => "no_recipe",
            Error::DoesNotFit(_) => "does_not_fit",
            Error::Placement(_) => "placement",
            Error::Invalid(_) => "invalid_spec",
            Error::Model(_) => "perf_model",
            Error::Serialization(_) => "serialization",
            Error::Finalizer(_) => "finalizer",
            Error::Registry(_) => "registry",
            Error::SpecFile(_) => "spec_file",
        }
    }

    /// The condition reason shown in status (CamelCase, bounded).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "ApiError",
            Error::NoRecipe(_) => "NoRecipeMeetsSlo",
            Error::DoesNotFit(_) => "DoesNotFitInHbm",
            Error::Placement(_) => "InsufficientGpus",
            Error::Invalid(_) => "InvalidSpec",
            Error::Model(_) => "PerfModelError",
            Error::Serialization(_) => "SerializationError",
            Error::Finalizer(_) => "FinalizerError",
            Error::Registry(_) => "RegistryError",
            Error::SpecFile(_) => "InvalidSpecFile",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Exponential backoff for transient failures of one object: 1 s doubling
/// to 256 s (the 300 s ceiling is never reached).
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(8)).min(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_and_backoff() {
        assert!(Error::Placement("x".into()).is_transient());
        assert!(!Error::NoRecipe("x".into()).is_transient());
        assert_eq!(Error::DoesNotFit("x".into()).category(), "does_not_fit");
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(40), Duration::from_secs(256));
    }
}
