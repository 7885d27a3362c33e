//! `rackscale-agent`: the node agent binary. Parses flags, discovers GPUs,
//! serves `AgentService` (+ gRPC health and reflection; mutual TLS unless
//! `--insecure-plaintext`) and `/metrics`,
//! registers in etcd, and on SIGTERM/ctrl-c stops every rank within its grace
//! period.

use std::time::Duration;

use agent::config::{Args, Config};
use agent::metrics::Metrics;
use agent::node::Node;
use anyhow::Context;
use clap::Parser;
use tokio::sync::watch;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let subscriber = tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    if args.log_json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
    let config = Config::try_from(args)?;
    let metrics = Metrics::new().context("registering metrics")?;
    let node = Node::new(
        config.identity.clone(),
        &config.gpus,
        config.supervisor.clone(),
        metrics,
    )?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let tls = config.transport.server(proto::tls::Alpn::H2)?;
    tracing::info!(
        addr = %config.listen,
        tls = config.transport.is_tls(),
        "serving AgentService"
    );
    let server = tokio::spawn(agent::service::serve(
        listener,
        node.clone(),
        tls,
        stopped(),
    ));

    if let Some(addr) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tokio::spawn(agent::http::serve(
            listener,
            node.clone(),
            config.fault_injection,
            stopped(),
        ));
    }

    let registration = if config.etcd.is_empty() {
        None
    } else {
        let registry = proto::registry::Registry::connect_with(
            &config.etcd,
            &config.etcd_security,
            Duration::from_secs(5),
        )
        .await?;
        tokio::spawn(agent::withdraw::run(
            registry.clone(),
            node.events().clone(),
            config.registration.call_timeout,
        ));
        Some(tokio::spawn(agent::registration::run(
            registry,
            node.clone(),
            config.registration.clone(),
            stopped(),
        )))
    };

    shutdown_signal().await;
    tracing::info!("shutting down");
    node.supervisor().shutdown(config.shutdown_grace).await;
    let _ = stop_tx.send(true);
    if let Some(task) = registration {
        let _ = task.await;
    }
    server.await??;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}
