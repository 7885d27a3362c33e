//! Where the lease lives: the [`LeaseStore`] seam and its Kubernetes edge.
//!
//! Owns the translation between a `coordination.k8s.io/v1` `Lease` and the
//! pure [`LeaseRecord`]. Invariant: every write is guarded by the version
//! that was read (a `Lease`'s `resourceVersion`), so two contenders that
//! read the same state cannot both win; the loser gets
//! [`Error::Conflict`](super::Error::Conflict). Tests swap in an in-memory
//! store with the same contract.

use std::future::Future;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

use super::Error;
use super::decision::LeaseRecord;

/// A lease as read, with the version a guarded write must name.
#[derive(Debug, Clone)]
pub(crate) struct Stored<V> {
    /// The election state.
    pub(crate) record: LeaseRecord,
    /// What the write must be conditional on.
    pub(crate) version: V,
}

/// Reads and conditionally writes one lease.
///
/// `create` and `replace` fail with [`Error::Conflict`] when the lease
/// changed (or appeared) since it was read.
pub(crate) trait LeaseStore: Send + Sync {
    /// The optimistic-concurrency token of a read.
    type Version: Clone + Send + Sync;

    /// The lease, or `None` when it does not exist.
    fn get(&self) -> impl Future<Output = Result<Option<Stored<Self::Version>>, Error>> + Send;

    /// Creates the lease; conflicts when it already exists.
    fn create(
        &self,
        record: &LeaseRecord,
    ) -> impl Future<Output = Result<Stored<Self::Version>, Error>> + Send;

    /// Overwrites the lease read as `version`; conflicts when it changed.
    fn replace(
        &self,
        version: &Self::Version,
        record: &LeaseRecord,
    ) -> impl Future<Output = Result<Stored<Self::Version>, Error>> + Send;
}

/// The lease as a `coordination.k8s.io/v1` object on the API server.
#[derive(Clone)]
pub(crate) struct KubeLeaseStore {
    api: Api<Lease>,
    namespace: String,
    name: String,
}

impl std::fmt::Debug for KubeLeaseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeLeaseStore")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl KubeLeaseStore {
    pub(crate) fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl LeaseStore for KubeLeaseStore {
    /// The whole object as read: its `resourceVersion` guards the write, and
    /// fields the election does not own (labels, `preferredHolder`) survive.
    type Version = Lease;

    async fn get(&self) -> Result<Option<Stored<Lease>>, Error> {
        let lease = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(Error::from_kube)?;
        Ok(lease.map(stored))
    }

    async fn create(&self, record: &LeaseRecord) -> Result<Stored<Lease>, Error> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(write_spec(LeaseSpec::default(), record)),
        };
        let created = self
            .api
            .create(&PostParams::default(), &lease)
            .await
            .map_err(Error::from_kube)?;
        Ok(stored(created))
    }

    async fn replace(&self, version: &Lease, record: &LeaseRecord) -> Result<Stored<Lease>, Error> {
        // Without a resourceVersion the API server would accept the write
        // unconditionally; refuse rather than risk two leaders.
        if version.metadata.resource_version.is_none() {
            return Err(Error::Conflict);
        }
        let mut lease = version.clone();
        lease.spec = Some(write_spec(lease.spec.take().unwrap_or_default(), record));
        let replaced = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map_err(Error::from_kube)?;
        Ok(stored(replaced))
    }
}

fn stored(lease: Lease) -> Stored<Lease> {
    Stored {
        record: read_spec(lease.spec.as_ref()),
        version: lease,
    }
}

/// The election state in a lease spec; a missing spec is a free lease.
pub(crate) fn read_spec(spec: Option<&LeaseSpec>) -> LeaseRecord {
    let Some(spec) = spec else {
        return LeaseRecord::default();
    };
    LeaseRecord {
        holder: spec.holder_identity.clone(),
        lease_duration: spec
            .lease_duration_seconds
            .map(|secs| Duration::from_secs(u64::try_from(secs).unwrap_or(0))),
        acquire_time: spec.acquire_time.as_ref().map(|t| SystemTime::from(t.0)),
        renew_time: spec.renew_time.as_ref().map(|t| SystemTime::from(t.0)),
        transitions: spec
            .lease_transitions
            .map_or(0, |n| u32::try_from(n).unwrap_or(0)),
    }
}

/// `spec` with the election fields set from `record`; other fields kept.
pub(crate) fn write_spec(spec: LeaseSpec, record: &LeaseRecord) -> LeaseSpec {
    LeaseSpec {
        holder_identity: record.holder.clone().filter(|holder| !holder.is_empty()),
        lease_duration_seconds: record.lease_duration.map(whole_seconds),
        acquire_time: record.acquire_time.and_then(micro_time),
        renew_time: record.renew_time.and_then(micro_time),
        lease_transitions: Some(i32::try_from(record.transitions).unwrap_or(i32::MAX)),
        ..spec
    }
}

/// Seconds for `leaseDurationSeconds`, rounded up: others then wait at least
/// as long as we promised, never less.
fn whole_seconds(duration: Duration) -> i32 {
    let secs = duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0));
    i32::try_from(secs).unwrap_or(i32::MAX)
}

fn micro_time(time: SystemTime) -> Option<MicroTime> {
    Timestamp::try_from(time).ok().map(MicroTime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_at_microsecond_precision() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let record = LeaseRecord {
            holder: Some("op-0".into()),
            lease_duration: Some(Duration::from_secs(15)),
            acquire_time: Some(at),
            renew_time: Some(at + Duration::from_secs(3)),
            transitions: 4,
        };
        let spec = write_spec(LeaseSpec::default(), &record);
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(read_spec(Some(&spec)), record);
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["renewTime"], "2023-11-14T22:13:23.123456Z");
    }

    #[test]
    fn fractional_durations_round_up() {
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(2)), 2);
    }

    #[test]
    fn release_clears_holder_and_keeps_foreign_fields() {
        let spec = LeaseSpec {
            holder_identity: Some("op-0".into()),
            preferred_holder: Some("op-1".into()),
            ..LeaseSpec::default()
        };
        let written = write_spec(spec, &LeaseRecord::default());
        assert_eq!(written.holder_identity, None);
        assert_eq!(written.preferred_holder.as_deref(), Some("op-1"));
    }

    #[test]
    fn missing_or_negative_fields_read_as_free() {
        assert_eq!(read_spec(None), LeaseRecord::default());
        let spec = LeaseSpec {
            lease_transitions: Some(-3),
            lease_duration_seconds: Some(-1),
            ..LeaseSpec::default()
        };
        let record = read_spec(Some(&spec));
        assert_eq!(record.transitions, 0);
        assert_eq!(record.lease_duration, Some(Duration::ZERO));
        assert_eq!(record.holder(), None);
    }
}
