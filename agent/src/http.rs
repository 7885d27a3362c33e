//! The agent's small HTTP server: `GET /metrics`, and, when enabled, the
//! fault-injection hook `POST /debug/gpus/{index}/health/{health}` where
//! `health` is `healthy`, `degraded` or `unhealthy` (the recorded reason is
//! `fault injected`). Fault injection is off unless the
//! `--enable-fault-injection` flag is given; it exists for simulated racks.

use std::future::Future;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use proto::types::GpuHealth;

use crate::node::Node;

async fn metrics(State(node): State<Node>) -> String {
    node.metrics().render()
}

async fn inject(
    State(node): State<Node>,
    Path((index, health)): Path<(u32, String)>,
) -> (StatusCode, String) {
    let health = match health.as_str() {
        "healthy" => GpuHealth::Healthy,
        "degraded" => GpuHealth::Degraded,
        "unhealthy" => GpuHealth::Unhealthy,
        _ => return (StatusCode::BAD_REQUEST, "unknown health\n".into()),
    };
    match node.set_gpu_health(index, health, "fault injected") {
        Ok(Some(_)) => (StatusCode::OK, "changed\n".into()),
        Ok(None) => (StatusCode::OK, "unchanged\n".into()),
        Err(err) => (StatusCode::NOT_FOUND, format!("{err}\n")),
    }
}

/// Serves the routes above on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Node,
    fault_injection: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut app = axum::Router::new().route("/metrics", get(metrics));
    if fault_injection {
        app = app.route("/debug/gpus/{index}/health/{health}", post(inject));
    }
    axum::serve(listener, app.with_state(node))
        .with_graceful_shutdown(shutdown)
        .await
}
