//! Test harness for rackscale: real etcd and kube-apiserver processes on
//! loopback, a kubeconfig and a ready `kube::Client`, CRD installation, and
//! fixtures for GPU racks as Node objects carrying GPU Feature Discovery
//! labels.
//!
//! Every test that uses it gets its own instances on random free ports, so
//! tests run in parallel. Processes are killed and reaped on drop, also when
//! the test panics; their logs stay on disk when a test fails (see
//! [`workdir::Workdir`]). Nothing here sleeps for a fixed time: readiness and
//! test conditions are polled against a deadline ([`wait`]).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use harness::{Cluster, Sku, Topology};
//! let cluster = Cluster::start().await?;
//! harness::install_crds(&cluster.client(), "deploy/crds").await?;
//! Topology::new()
//!     .rack("A", Sku::Gb200, 18, 4)
//!     .create(&cluster.client())
//!     .await?;
//! # Ok(()) }
//! ```

pub mod apiserver;
pub mod bins;
pub mod cluster;
pub mod crds;
pub mod dashboards;
pub mod etcd;
pub mod fleet;
pub mod helm;
pub mod kubeconfig;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod secrets;
pub mod tls_probe;
pub mod topology;
pub mod wait;
pub mod workdir;

pub use apiserver::KubeApiServer;
pub use cluster::Cluster;
pub use crds::{apply_crd, apply_crd_yaml, apply_crds_yaml, install_crds, wait_crd_established};
pub use etcd::Etcd;
pub use topology::{RackSpec, Sku, Topology};
pub use wait::{wait_for, wait_until};
