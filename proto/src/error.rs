//! The crate's one error type.
//!
//! Two families: *validation* errors (a message or registry value is
//! malformed: permanent, retrying the same bytes cannot help) and *registry*
//! errors (etcd unreachable, a call past its deadline, a lost lease:
//! transient, retry with backoff), plus *TLS* settings that do not load
//! (permanent) and gRPC channels that do not open (transient). [`Error::category`] gives a bounded label
//! for metrics; messages may carry keys and field names but never values.

use std::time::Duration;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong converting wire types or talking to the registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required field is absent or empty.
    #[error("{message}: required field `{field}` is missing")]
    MissingField {
        /// Message type, e.g. `WorkerRecord`.
        message: &'static str,
        /// Field path, e.g. `id.namespace`.
        field: &'static str,
    },
    /// A field holds a value the contract does not allow.
    #[error("{message}: field `{field}` is invalid: {reason}")]
    InvalidField {
        /// Message type.
        message: &'static str,
        /// Field path.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A registry value is not a valid protobuf message of the expected type.
    #[error("registry value at `{key}` is not a valid {message}: {source}")]
    Decode {
        /// The etcd key whose value failed.
        key: String,
        /// Expected message type.
        message: &'static str,
        /// What protobuf decoding said.
        #[source]
        source: prost::DecodeError,
    },
    /// A registry value decoded but failed validation.
    #[error("registry value at `{key}` is invalid: {source}")]
    InvalidValue {
        /// The etcd key whose value failed.
        key: String,
        /// The validation error.
        #[source]
        source: Box<Error>,
    },
    /// An etcd call failed (connection, gRPC status).
    #[error("etcd {op} failed: {source}")]
    Etcd {
        /// The operation, e.g. `put`.
        op: &'static str,
        /// The client error.
        #[source]
        source: etcd_client::Error,
    },
    /// An etcd call did not finish within its deadline.
    #[error("etcd {op} timed out after {after:?}")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The deadline it was given.
        after: Duration,
    },
    /// A watch could not continue (stream ended or was cancelled by etcd for a
    /// reason other than compaction); calling `next` again reopens it.
    #[error("registry watch on `{prefix}` broke: {reason}")]
    WatchBroken {
        /// The watched prefix.
        prefix: String,
        /// Why.
        reason: String,
    },
    /// A lease argument is unusable (e.g. a TTL under one second).
    #[error("invalid lease: {0}")]
    InvalidLease(String),
    /// TLS or etcd-auth settings are unusable: missing or bad files, flags
    /// that contradict each other. Permanent until the settings change.
    #[error("{0}")]
    Tls(String),
    /// A gRPC channel could not be opened (refused, handshake failed).
    #[error("connecting to {endpoint}: {reason}")]
    Connect {
        /// The endpoint dialled.
        endpoint: String,
        /// Why, with its causes.
        reason: String,
    },
}

impl Error {
    /// A bounded label naming the kind of error, for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::MissingField { .. } => "missing_field",
            Self::InvalidField { .. } => "invalid_field",
            Self::Decode { .. } => "decode",
            Self::InvalidValue { .. } => "invalid_value",
            Self::Etcd { .. } => "etcd",
            Self::Timeout { .. } => "timeout",
            Self::WatchBroken { .. } => "watch_broken",
            Self::InvalidLease(_) => "invalid_lease",
            Self::Tls(_) => "tls",
            Self::Connect { .. } => "connect",
        }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Etcd { .. }
                | Self::Timeout { .. }
                | Self::WatchBroken { .. }
                | Self::Connect { .. }
        )
    }

    pub(crate) fn tls(reason: impl Into<String>) -> Self {
        Self::Tls(reason.into())
    }

    pub(crate) fn missing(message: &'static str, field: &'static str) -> Self {
        Self::MissingField { message, field }
    }

    pub(crate) fn invalid(
        message: &'static str,
        field: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        Self::InvalidField {
            message,
            field,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_is_permanent_and_registry_trouble_transient() {
        let missing = Error::missing("WorkerRecord", "id");
        assert_eq!(missing.category(), "missing_field");
        assert!(!missing.is_transient());
        assert_eq!(
            missing.to_string(),
            "WorkerRecord: required field `id` is missing"
        );
        let timeout = Error::Timeout {
            op: "put",
            after: Duration::from_secs(1),
        };
        assert_eq!(timeout.category(), "timeout");
        assert!(timeout.is_transient());
    }
}
