//! Proof that the harness works against the real binaries: every test starts
//! its own etcd (and kube-apiserver) on random ports and checks what a test
//! of the operator will rely on.

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::{GetOptions, PutOptions};
use futures::{StreamExt, TryStreamExt};
use harness::topology::{GPU_RESOURCE, labels};
use harness::{Cluster, Etcd, Sku, Topology, install_crds, wait_until};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

const FIXTURE_CRDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/crds");
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn apiserver_is_ready_and_reports_the_pinned_version() {
    let cluster = Cluster::start().await.unwrap();
    let client = cluster.client();

    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.git_version, "v1.37.2");

    let readyz = http::Request::get("/readyz").body(Vec::new()).unwrap();
    assert_eq!(client.request_text(readyz).await.unwrap().trim(), "ok");

    // A second client built from the kubeconfig file works as well.
    let other = cluster.apiserver().new_client().await.unwrap();
    assert_eq!(
        other.apiserver_version().await.unwrap().git_version,
        "v1.37.2"
    );
}

#[tokio::test]
async fn crd_objects_round_trip_with_status_subresource_and_watch() {
    let cluster = Cluster::start().await.unwrap();
    let client = cluster.client();
    assert_eq!(
        install_crds(&client, "/nonexistent/rackscale/crds")
            .await
            .unwrap(),
        0
    );
    assert_eq!(install_crds(&client, FIXTURE_CRDS).await.unwrap(), 1);

    let gvk = GroupVersionKind::gvk("harness.rackscale.dev", "v1alpha1", "Widget");
    let resource = ApiResource::from_gvk(&gvk);
    let api: Api<DynamicObject> = Api::namespaced_with(client, "default", &resource);

    // The schema is enforced: size must be at least 1.
    let invalid = DynamicObject::new("bad", &resource).data(json!({ "spec": { "size": 0 } }));
    assert!(api.create(&PostParams::default(), &invalid).await.is_err());

    let widget = DynamicObject::new("w1", &resource).data(json!({ "spec": { "size": 3 } }));
    api.create(&PostParams::default(), &widget).await.unwrap();
    let read = api.get("w1").await.unwrap();
    assert_eq!(read.data["spec"]["size"], 3);
    assert!(read.data.get("status").is_none());

    let config = watcher::Config::default().fields("metadata.name=w1");
    let mut events = watcher(api.clone(), config).applied_objects().boxed();
    let first = tokio::time::timeout(EVENT_TIMEOUT, events.try_next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.unwrap().data["spec"]["size"], 3);

    // Status sent to the main resource is dropped; only /status sets it.
    let bogus = json!({ "status": { "phase": "Bogus" } });
    api.patch("w1", &PatchParams::default(), &Patch::Merge(bogus))
        .await
        .unwrap();
    assert!(api.get("w1").await.unwrap().data.get("status").is_none());
    let status = json!({ "status": { "phase": "Ready", "readyReplicas": 3 } });
    let patched = api
        .patch_status("w1", &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
    assert_eq!(patched.data["status"]["phase"], "Ready");

    let seen = tokio::time::timeout(EVENT_TIMEOUT, async {
        while let Some(object) = events.try_next().await.unwrap() {
            assert_ne!(object.data["status"]["phase"], "Bogus");
            if object.data["status"]["phase"] == "Ready" {
                return object;
            }
        }
        panic!("watch stream ended");
    })
    .await
    .expect("the watch did not deliver the status change");
    assert_eq!(seen.data["status"]["readyReplicas"], 3);
    assert_eq!(seen.data["spec"]["size"], 3);
}

#[tokio::test]
async fn topology_nodes_are_found_by_clique() {
    let cluster = Cluster::start().await.unwrap();
    let topology = Topology::new()
        .rack("A", Sku::Gb200, 18, 4)
        .rack("B", Sku::Gb300, 18, 4);
    let created = topology.create(&cluster.client()).await.unwrap();
    assert_eq!(created.len(), 36);

    let nodes = Api::<Node>::all(cluster.client());
    for rack in topology.racks() {
        let listed = nodes
            .list(&ListParams::default().labels(&rack.selector()))
            .await
            .unwrap();
        assert_eq!(listed.items.len(), 18, "nodes of rack {}", rack.name);
        let names: BTreeSet<String> = listed
            .items
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        assert_eq!(names, rack.node_names().into_iter().collect());
        for node in &listed.items {
            let labels = node.metadata.labels.as_ref().unwrap();
            assert_eq!(labels[labels::GPU_PRODUCT], rack.sku.gpu_product());
            assert_eq!(labels[labels::GPU_COUNT], "4");
            let status = node.status.as_ref().unwrap();
            let gpus = &status.allocatable.as_ref().unwrap()[GPU_RESOURCE];
            assert_eq!(gpus, &Quantity("4".into()));
        }
    }
    let gpu_nodes = ListParams::default().labels(&format!("{}=true", labels::GPU_PRESENT));
    assert_eq!(nodes.list(&gpu_nodes).await.unwrap().items.len(), 36);
    let gb300 = ListParams::default().labels(&format!("{}=NVIDIA-GB300", labels::GPU_PRODUCT));
    assert_eq!(nodes.list(&gb300).await.unwrap().items.len(), 18);

    // The apiserver stored them in its etcd under its own prefix.
    let mut etcd = cluster.etcd().client().await.unwrap();
    let prefix = format!("{}/minions/", cluster.apiserver().etcd_prefix());
    let stored = etcd.get(
        prefix,
        Some(GetOptions::new().with_prefix().with_count_only()),
    );
    assert_eq!(stored.await.unwrap().count(), 36);
}

#[tokio::test]
async fn etcd_put_get_watch_and_lease_expiry() {
    let etcd = Etcd::start().await.unwrap();
    let mut client = etcd.client().await.unwrap();

    client.put("rackscale/plain", "v1", None).await.unwrap();
    let got = client.get("rackscale/plain", None).await.unwrap();
    assert_eq!(got.kvs().len(), 1);
    assert_eq!(got.kvs()[0].value_str().unwrap(), "v1");

    let mut watch = client.watch("rackscale/watched", None).await.unwrap();
    let created = watch.message().await.unwrap().unwrap();
    assert!(created.created());
    client
        .put("rackscale/watched", "hello", None)
        .await
        .unwrap();
    let event = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            let response = watch.message().await.unwrap().expect("watch stream ended");
            if let Some(event) = response.events().first() {
                return event.clone();
            }
        }
    })
    .await
    .expect("the watch did not see the put");
    let kv = event.kv().unwrap();
    assert_eq!(
        (kv.key_str().unwrap(), kv.value_str().unwrap()),
        ("rackscale/watched", "hello")
    );

    let lease = client.lease_grant(1, None).await.unwrap().id();
    let with_lease = PutOptions::new().with_lease(lease);
    client
        .put("rackscale/leased", "short-lived", Some(with_lease))
        .await
        .unwrap();
    assert_eq!(
        client
            .get("rackscale/leased", None)
            .await
            .unwrap()
            .kvs()
            .len(),
        1
    );
    wait_until("the leased key to expire", Duration::from_secs(20), || {
        let mut client = client.clone();
        async move { Ok(client.get("rackscale/leased", None).await?.kvs().is_empty()) }
    })
    .await
    .unwrap();
    // Keys without a lease stay.
    assert_eq!(
        client
            .get("rackscale/plain", None)
            .await
            .unwrap()
            .kvs()
            .len(),
        1
    );
}

#[tokio::test]
async fn kubectl_works_with_the_written_kubeconfig() {
    let cluster = Cluster::start().await.unwrap();
    let topology = Topology::new().rack("A", Sku::Gb200, 2, 4);
    topology.create(&cluster.client()).await.unwrap();

    let output = cluster
        .apiserver()
        .kubectl()
        .unwrap()
        .args([
            "get",
            "nodes",
            "-o",
            "name",
            "-l",
            &topology.racks()[0].selector(),
        ])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kubectl failed: {stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let names: Vec<&str> = stdout.lines().collect();
    assert_eq!(names, ["node/rack-a-tray-00", "node/rack-a-tray-01"]);
}
