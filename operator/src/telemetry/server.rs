//! The HTTP endpoints scraped and probed by Kubernetes and Prometheus.
//!
//! Owns the routes: `/metrics` (text exposition of the operator's
//! registry), `/healthz` (200 while the main loop beats, else 503) and
//! `/readyz` (200 once ready, else 503 with the reason). Invariant: the
//! server never binds on its own; it serves the listener it is given until
//! the shutdown future completes, so tests bind port 0.

use std::future::Future;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tracing::warn;

use super::health::{Health, Readiness};
use super::metrics::Metrics;

/// What the endpoints read: the metrics and the health flags.
#[derive(Debug, Clone)]
pub struct TelemetryState {
    /// Exported on `/metrics`.
    pub metrics: Metrics,
    /// Answered on `/healthz` and `/readyz`.
    pub health: Health,
}

impl TelemetryState {
    /// Endpoints over `metrics` and `health`.
    pub fn new(metrics: Metrics, health: Health) -> Self {
        Self { metrics, health }
    }
}

/// The routes, for embedding into another server.
pub fn router(state: TelemetryState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves the endpoints on `listener` until `shutdown` completes, then
/// finishes in-flight requests and returns.
pub async fn serve(
    listener: TcpListener,
    state: TelemetryState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(state): State<TelemetryState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(err) => {
            warn!(error = %err, "encoding metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed").into_response()
        }
    }
}

async fn healthz(State(state): State<TelemetryState>) -> Response {
    if state.health.is_alive() {
        (StatusCode::OK, "ok").into_response()
    } else {
        let since = state.health.since_beat();
        let body = format!("main loop stalled: no heartbeat for {since:?}");
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn readyz(State(state): State<TelemetryState>) -> Response {
    match state.health.readiness() {
        Readiness::Ready => (StatusCode::OK, "ready").into_response(),
        Readiness::NotReady(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;

    use super::*;
    use crate::telemetry::names;

    /// A running server on a port-0 listener, stopped on drop of `stop`.
    struct Running {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    async fn start(state: TelemetryState) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, state, async {
            let _ = stopped.await;
        }));
        Running { addr, stop, task }
    }

    /// A minimal HTTP/1.1 GET: status code and body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_owned(), body.to_owned())
    }

    fn state() -> TelemetryState {
        TelemetryState::new(Metrics::new().unwrap(), Health::default())
    }

    #[tokio::test]
    async fn metrics_show_names_and_a_recorded_reconcile() {
        let state = state();
        let server = start(state.clone()).await;
        state.metrics.reconcile_timer().success();

        let (status, head, body) = get(server.addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            head.to_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        for name in [
            names::RECONCILES_TOTAL,
            names::RECONCILE_DURATION_SECONDS,
            names::PLACEMENT_DURATION_SECONDS,
            names::LEADER,
            names::LEASE_TRANSITIONS_TOTAL,
        ] {
            assert!(
                body.contains(&names::full(name)),
                "{name} missing in\n{body}"
            );
        }
        let success = format!(
            "{}{{result=\"success\"}} 1",
            names::full(names::RECONCILES_TOTAL)
        );
        assert!(body.lines().any(|line| line == success), "{body}");

        server.stop.send(()).unwrap();
        server.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn readyz_flips_from_503_to_200() {
        let state = state();
        let server = start(state.clone()).await;
        let (status, _, body) = get(server.addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("starting"), "{body}");

        state.health.set_ready();
        assert_eq!(get(server.addr, "/readyz").await.0, 200);

        state.health.set_not_ready("cache resync");
        let (status, _, body) = get(server.addr, "/readyz").await;
        assert_eq!((status, body.as_str()), (503, "not ready: cache resync"));

        server.stop.send(()).unwrap();
        server.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn healthz_fails_when_the_loop_stops_beating() {
        let state = TelemetryState::new(Metrics::new().unwrap(), Health::new(Duration::ZERO));
        state.health.beat();
        let server = start(state.clone()).await;
        let body = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let (status, _, body) = get(server.addr, "/healthz").await;
                if status == 503 {
                    return body;
                }
            }
        })
        .await
        .unwrap();
        assert!(body.contains("no heartbeat"), "{body}");

        let healthy = TelemetryState::new(Metrics::new().unwrap(), Health::default());
        let other = start(healthy).await;
        let (status, _, body) = get(other.addr, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok"));

        server.stop.send(()).unwrap();
        other.stop.send(()).unwrap();
        server.task.await.unwrap().unwrap();
        other.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn unknown_paths_are_404() {
        let server = start(state()).await;
        assert_eq!(get(server.addr, "/nope").await.0, 404);
        server.stop.send(()).unwrap();
        server.task.await.unwrap().unwrap();
    }
}
