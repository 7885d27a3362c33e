//! A control plane for one test: etcd plus a kube-apiserver on it.
//!
//! Dropping a [`Cluster`] stops the apiserver first, then etcd.

use std::path::Path;

use anyhow::Result;

use crate::apiserver::KubeApiServer;
use crate::etcd::Etcd;

/// etcd and kube-apiserver started together, stopped together.
#[derive(Debug)]
pub struct Cluster {
    // Field order is drop order: the apiserver goes before its etcd.
    apiserver: KubeApiServer,
    etcd: Etcd,
}

impl Cluster {
    /// Starts etcd, then kube-apiserver on it, and waits until both serve.
    pub async fn start() -> Result<Self> {
        let etcd = Etcd::start().await?;
        let apiserver = KubeApiServer::start(&etcd).await?;
        Ok(Self { apiserver, etcd })
    }

    /// A ready admin client (cheap to clone).
    pub fn client(&self) -> kube::Client {
        self.apiserver.client()
    }

    /// Path of the kubeconfig (`kubectl --kubeconfig`).
    pub fn kubeconfig_path(&self) -> &Path {
        self.apiserver.kubeconfig_path()
    }

    /// The apiserver, for its URL, token, logs and `kubectl`.
    pub fn apiserver(&self) -> &KubeApiServer {
        &self.apiserver
    }

    /// The etcd the apiserver stores into; tests may use it directly too.
    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }
}
