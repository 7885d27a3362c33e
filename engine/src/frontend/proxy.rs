//! Pass-through for aggregated deployments: when every registered worker has
//! role `both`, the frontend forwards each generation request
//! (`POST /v1/completions`, `POST /v1/chat/completions`) as it came to the
//! least-loaded worker's own OpenAI API and relays the answer byte for byte.
//!
//! Why not prefill on one worker and decode on another: an aggregated worker
//! answers a whole request in place (prefill then decode, its KV never
//! leaves it). Splitting the request would add two RPCs and a KV copy, even
//! when both halves land on the same worker. Forwarding keeps the worker's
//! work what it is for a direct call; the frontend adds one HTTP hop, its
//! admission limit (429 past `max_in_flight`) and its pick. Pools with any
//! prefill or decode worker keep the split path ([`super::Router`]).
//!
//! Invariants: a forwarded request counts as admitted by the router and as
//! an open stream on its worker (the load [`select::pick_aggregated`] reads)
//! until its response body ends or is dropped; only a request whose
//! connection was refused (it never reached a worker) is retried on another,
//! so nothing runs twice; a response silent for `token_timeout` is cut.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::Stream;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use proto::tls::{Alpn, Connector};
use tokio::time::{Instant, Sleep};

use super::{Router, select};
use crate::openai::metrics::{Endpoint, RequestTimer};
use crate::openai::{ApiError, OpenAiMetrics, Outcome};

/// Headers that describe one connection, not the request (RFC 9110 §7.6.1),
/// plus the ones the client recomputes for the forwarded body.
const HOP_BY_HOP: [header::HeaderName; 8] = [
    header::CONNECTION,
    header::HOST,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Forwards whole requests to aggregated workers; cheap to clone.
#[derive(Debug, Clone)]
pub struct Proxy {
    router: Router,
    client: Client<Connector, Body>,
    metrics: OpenAiMetrics,
    max_body_bytes: usize,
}

impl Proxy {
    /// A proxy over `router`'s pool, admission and timeouts, counting
    /// requests in `metrics` and reading bodies up to `max_body_bytes`.
    pub fn new(router: Router, metrics: OpenAiMetrics, max_body_bytes: usize) -> Self {
        // Through the pool's transport (mutual TLS, ALPN http/1.1, unless
        // the frontend runs plaintext); it sets TCP_NODELAY, as SSE chunks
        // are small and Nagle would hold them back.
        let connector = router
            .pool()
            .tls()
            .connector(Alpn::Http1)
            .with_connect_timeout(router.config.prefill_timeout);
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            router,
            metrics,
            max_body_bytes,
        }
    }

    async fn forward(&self, endpoint: Endpoint, request: Request) -> Response {
        let timer = self.metrics.start(endpoint);
        let admitted = match self.router.admit() {
            Ok(a) => a,
            Err(e) => return refuse(timer, e.into()),
        };
        let (parts, body) = request.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes) {
            return refuse(timer, ApiError::too_large(self.max_body_bytes));
        }
        let body = match axum::body::to_bytes(body, self.max_body_bytes).await {
            Ok(b) => b,
            Err(e) => return refuse(timer, ApiError::bad_body(format!("reading the body: {e}"))),
        };
        let mut headers = parts.headers;
        for h in HOP_BY_HOP {
            headers.remove(h);
        }
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let config = &self.router.config;
        let mut tried: Vec<String> = Vec::new();
        let mut last: Option<String> = None;
        while tried.len() < config.prefill_attempts {
            let (members, candidates) = self.router.pool().snapshot();
            let Some(i) = select::pick_aggregated(&candidates, &tried) else {
                break;
            };
            let member = members[i].clone();
            let Some(uri) = member.record.grpc_endpoint().and_then(|base| {
                format!("{}{path}", base.trim_end_matches('/'))
                    .parse::<Uri>()
                    .ok()
            }) else {
                tried.push(member.name().to_string());
                continue;
            };
            let open = member.decoding();
            let mut out = Request::new(Body::from(body.clone()));
            *out.method_mut() = parts.method.clone();
            *out.uri_mut() = uri;
            *out.headers_mut() = headers.clone();
            match tokio::time::timeout(config.prefill_timeout, self.client.request(out)).await {
                Ok(Ok(response)) => {
                    return relay(
                        response.map(Body::new),
                        timer,
                        config.token_timeout,
                        Box::new((open, admitted)),
                    );
                }
                Ok(Err(e)) if e.is_connect() => {
                    tracing::warn!(worker = %member.name(), error = %e, "worker unreachable; forwarding to another");
                    member.failed();
                    tried.push(member.name().to_string());
                    last = Some(format!("worker {}: {e}", member.name()));
                }
                Ok(Err(e)) => {
                    member.failed();
                    let why = format!("worker {}: {e}", member.name());
                    return refuse(timer, ApiError::unavailable(why));
                }
                Err(_) => {
                    member.failed();
                    let why = format!(
                        "worker {} did not answer within {:?}",
                        member.name(),
                        config.prefill_timeout
                    );
                    return refuse(timer, ApiError::unavailable(why));
                }
            }
        }
        let why = last.unwrap_or_else(|| "no aggregated worker is registered".into());
        refuse(timer, ApiError::unavailable(why))
    }
}

/// Middleware over the OpenAI router: generation requests go to a worker
/// whole while the pool is aggregated; everything else (and every request
/// to a disaggregated pool) goes on to the router.
pub async fn pass_through(State(proxy): State<Proxy>, request: Request, next: Next) -> Response {
    let endpoint = match (request.method(), request.uri().path()) {
        (&Method::POST, "/v1/completions") => Endpoint::Completions,
        (&Method::POST, "/v1/chat/completions") => Endpoint::ChatCompletions,
        _ => return next.run(request).await,
    };
    if !select::aggregated(&proxy.router.pool().snapshot().1) {
        return next.run(request).await;
    }
    proxy.forward(endpoint, request).await
}

fn refuse(timer: RequestTimer, e: ApiError) -> Response {
    tracing::debug!(status = e.status.as_u16(), error = %e.message, "request refused");
    timer.end(e.outcome(), None);
    e.into_response()
}

/// How a worker's status counts in the frontend's metrics.
fn outcome(status: StatusCode) -> Outcome {
    match status {
        s if s.is_success() => Outcome::Ok,
        StatusCode::TOO_MANY_REQUESTS => Outcome::Overloaded,
        StatusCode::SERVICE_UNAVAILABLE => Outcome::Unavailable,
        s if s.is_client_error() => Outcome::ClientError,
        _ => Outcome::ServerError,
    }
}

/// The worker's response with its body relayed as it arrives.
fn relay(
    response: Response,
    timer: RequestTimer,
    token_timeout: Duration,
    held: Box<dyn Any + Send>,
) -> Response {
    let (mut parts, body) = response.into_parts();
    for h in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TRAILER,
        header::UPGRADE,
    ] {
        parts.headers.remove(h);
    }
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let relayed = Relay {
        outcome: outcome(parts.status),
        remaining: length,
        inner: body.into_data_stream(),
        silence: Box::pin(tokio::time::sleep(token_timeout)),
        token_timeout,
        timer: Some(timer),
        done: false,
        _held: held,
    };
    Response::from_parts(parts, Body::from_stream(relayed))
}

/// A worker's response body on its way to the client, holding the request's
/// admission and worker load until it ends or the client goes away.
struct Relay {
    inner: BodyDataStream,
    /// Fires when the worker stays silent for `token_timeout`.
    silence: Pin<Box<Sleep>>,
    token_timeout: Duration,
    /// Ended with `outcome` at the end of the body; dropped (cancelled) if
    /// the client goes first.
    timer: Option<RequestTimer>,
    outcome: Outcome,
    /// Bytes still to come of a body of known length: the server stops
    /// polling once they are sent, so the end is counted at the last one.
    remaining: Option<u64>,
    done: bool,
    /// The request's admission and its share of the worker's load.
    _held: Box<dyn Any + Send>,
}

impl Relay {
    fn end(&mut self, outcome: Outcome) {
        self.done = true;
        if let Some(timer) = self.timer.take() {
            timer.end(outcome, None);
        }
    }
}

impl Stream for Relay {
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                if let Some(left) = this.remaining.as_mut() {
                    *left = left.saturating_sub(bytes.len() as u64);
                    if *left == 0 {
                        let outcome = this.outcome;
                        this.end(outcome);
                        return Poll::Ready(Some(Ok(bytes)));
                    }
                }
                let next = Instant::now() + this.token_timeout;
                this.silence.as_mut().reset(next);
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.end(Outcome::ServerError);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                let outcome = this.outcome;
                this.end(outcome);
                Poll::Ready(None)
            }
            Poll::Pending => match this.silence.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.end(Outcome::Unavailable);
                    let why = format!("the worker sent nothing for {:?}", this.token_timeout);
                    Poll::Ready(Some(Err(axum::Error::new(why))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    fn requests(metrics: &OpenAiMetrics, outcome: Outcome) -> u64 {
        metrics
            .requests
            .with_label_values(&["completions", outcome.as_str()])
            .get()
    }

    /// A worker answer whose body is `chunks`, then nothing for ever.
    fn stalled(chunks: &[&'static str], length: Option<usize>) -> Response {
        let chunks: Vec<Result<Bytes, axum::Error>> =
            chunks.iter().map(|c| Ok(Bytes::from(*c))).collect();
        let sent = futures::stream::iter(chunks);
        let mut response = Response::new(Body::from_stream(sent.chain(futures::stream::pending())));
        if let Some(n) = length {
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, n.into());
        }
        response
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_worker_is_cut_after_the_token_timeout() {
        let metrics = OpenAiMetrics::unregistered().expect("metrics");
        let timer = metrics.start(Endpoint::Completions);
        let relayed = relay(
            stalled(&["data: 1\n\n"], None),
            timer,
            Duration::from_secs(10),
            Box::new(()),
        );
        let mut body = relayed.into_body().into_data_stream();
        assert_eq!(
            body.next().await.and_then(Result::ok),
            Some(Bytes::from("data: 1\n\n"))
        );
        let started = Instant::now();
        assert!(matches!(body.next().await, Some(Err(_))));
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert_eq!(requests(&metrics, Outcome::Unavailable), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_of_known_length_ends_at_its_last_byte() {
        // The server stops polling once Content-Length bytes are out: the
        // request counts as done then, not as cancelled when it drops.
        let metrics = OpenAiMetrics::unregistered().expect("metrics");
        let timer = metrics.start(Endpoint::Completions);
        let relayed = relay(
            stalled(&["{\"a\":", "1}"], Some(6)),
            timer,
            Duration::from_secs(10),
            Box::new(()),
        );
        assert_eq!(relayed.headers()[header::CONTENT_LENGTH], "6");
        let mut body = relayed.into_body().into_data_stream();
        assert!(body.next().await.is_some_and(|c| c.is_ok()));
        assert!(body.next().await.is_some_and(|c| c.is_ok()));
        drop(body);
        assert_eq!(requests(&metrics, Outcome::Ok), 1);
        assert_eq!(requests(&metrics, Outcome::Cancelled), 0);
    }

    #[test]
    fn worker_statuses_count_as_the_frontends_outcomes() {
        assert_eq!(outcome(StatusCode::OK), Outcome::Ok);
        assert_eq!(outcome(StatusCode::TOO_MANY_REQUESTS), Outcome::Overloaded);
        assert_eq!(
            outcome(StatusCode::SERVICE_UNAVAILABLE),
            Outcome::Unavailable
        );
        assert_eq!(outcome(StatusCode::NOT_FOUND), Outcome::ClientError);
        assert_eq!(outcome(StatusCode::BAD_GATEWAY), Outcome::ServerError);
    }
}
