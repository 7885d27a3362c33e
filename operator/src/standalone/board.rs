//! The status board of standalone mode: every deployment's latest status,
//! written by the reconcile loop (its one owner) and read by the HTTP
//! server, which serves it as JSON on `GET /status` beside the telemetry
//! routes (`/metrics`, `/healthz`, `/readyz`).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::crd::{ModelDeploymentSpec, ModelDeploymentStatus, Phase};
use crate::telemetry::{TelemetryState, router};

/// One deployment as `GET /status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentView {
    pub namespace: String,
    pub name: String,
    /// The file the spec was read from.
    pub file: String,
    pub generation: i64,
    pub spec: ModelDeploymentSpec,
    pub status: ModelDeploymentStatus,
    /// The last reconcile error, if the last reconcile failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The whole board, as served.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Every deployment is Ready.
    pub ready: bool,
    /// A spec file that could not be read since the last good load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec_error: Option<String>,
    pub deployments: Vec<DeploymentView>,
}

/// Shared, lock-protected board; the reconcile loop is its only writer.
#[derive(Debug, Clone, Default)]
pub struct Board(Arc<RwLock<Snapshot>>);

impl Board {
    /// Replaces the board with `deployments` (in key order) and `spec_error`.
    pub fn publish(
        &self,
        deployments: BTreeMap<String, DeploymentView>,
        spec_error: Option<String>,
    ) {
        let deployments: Vec<DeploymentView> = deployments.into_values().collect();
        let ready = !deployments.is_empty()
            && deployments
                .iter()
                .all(|d| d.status.phase == Some(Phase::Ready));
        let mut board = self.0.write().unwrap_or_else(|e| e.into_inner());
        *board = Snapshot {
            ready,
            spec_error,
            deployments,
        };
    }

    pub fn snapshot(&self) -> Snapshot {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

async fn status(State(board): State<Board>) -> Response {
    Json(board.snapshot()).into_response()
}

/// `/status` plus the telemetry routes.
pub fn routes(board: Board, telemetry: TelemetryState) -> Router {
    Router::new()
        .route("/status", get(status))
        .with_state(board)
        .merge(router(telemetry))
}

/// Serves [`routes`] on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    board: Board,
    telemetry: TelemetryState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, routes(board, telemetry))
        .with_graceful_shutdown(shutdown)
        .await
}
