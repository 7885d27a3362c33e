//! The `rackscale-agent` binary end to end: flags, gRPC over mutual TLS,
//! `/metrics`, the fault-injection route, and SIGTERM stopping every rank
//! before exit.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use harness::pki::{Pki, flags};
use harness::wait_for;
use proto::pb;
use proto::pb::agent_service_client::AgentServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(15);

/// A free loopback port (bound then released; the binary binds it next).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn http(port: u16, method: &str, path: &str) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request =
        format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

#[tokio::test]
async fn the_binary_serves_and_stops_its_ranks_on_sigterm() -> Result<()> {
    let (grpc, metrics) = (free_port()?, free_port()?);
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path(), "agent test CA")?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rackscale-agent"))
        .args(flags(&pki.issue("tray-9")?))
        .args([
            "--node=tray-9",
            &format!("--listen=127.0.0.1:{grpc}"),
            &format!("--metrics-listen=127.0.0.1:{metrics}"),
            "--gpu-count=2",
            "--engine-bin=/bin/sh",
            "--engine-arg=-c",
            "--engine-arg=exec sleep 30",
            "--enable-fault-injection",
            "--shutdown-grace-seconds=5",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let address = format!("https://127.0.0.1:{grpc}");
    let tls = pki.transport("operator")?.client()?;
    let mut client = wait_for("the agent's gRPC server", WAIT, || {
        let (address, tls) = (address.clone(), tls.clone());
        async move {
            let channel = tls.channel(&tls.endpoint(&address)?).await?;
            Ok(Some(AgentServiceClient::new(channel)))
        }
    })
    .await?;
    let node = client.get_node(pb::GetNodeRequest {}).await?.into_inner();
    assert_eq!((node.node.as_str(), node.gpus.len()), ("tray-9", 2));

    let spec = pb::RankSpec {
        worker: Some(pb::WorkerId {
            namespace: "ns".into(),
            deployment: "dep".into(),
            worker: "w0".into(),
        }),
        role: pb::Role::Prefill as i32,
        shape: Some(pb::Shape { tp: 1, ep: 1 }),
        rank: 0,
        world_size: 1,
        gpu_indices: vec![0],
        backend: pb::Backend::Sim as i32,
        generation: 1,
        ..Default::default()
    };
    let status = client
        .launch_rank(pb::LaunchRankRequest { spec: Some(spec) })
        .await?
        .into_inner()
        .status
        .context("status")?;
    assert_eq!(status.gpu_indices, vec![0]);
    let pid = wait_for("the rank's pid", WAIT, || {
        let mut client = client.clone();
        async move {
            let ranks = client
                .list_ranks(pb::ListRanksRequest::default())
                .await?
                .into_inner()
                .ranks;
            Ok(ranks.first().map(|r| r.pid).filter(|p| *p != 0))
        }
    })
    .await?;

    let text = wait_for("metrics showing one running rank", WAIT, || async move {
        let text = http(metrics, "GET", "/metrics").await?;
        Ok(text
            .contains("rackscale_agent_ranks_running 1")
            .then_some(text))
    })
    .await?;
    assert!(
        text.contains("rackscale_agent_gpus{health=\"healthy\"} 2"),
        "{text}"
    );
    let reply = http(metrics, "POST", "/debug/gpus/1/health/unhealthy").await?;
    assert!(reply.contains("changed"), "{reply}");
    let node = client.get_node(pb::GetNodeRequest {}).await?.into_inner();
    assert_eq!(node.gpus[1].health, pb::GpuHealth::Unhealthy as i32);

    let ranks = client
        .list_ranks(pb::ListRanksRequest::default())
        .await?
        .into_inner()
        .ranks;
    assert_eq!(ranks[0].phase, pb::RankPhase::Running as i32);
    assert_eq!(ranks[0].pid, pid);

    let agent_pid = child.id().context("agent pid")?;
    let term = std::process::Command::new("kill")
        .args(["-TERM", &agent_pid.to_string()])
        .status()?;
    if !term.success() {
        bail!("kill -TERM failed");
    }
    let exit = tokio::time::timeout(WAIT, child.wait()).await??;
    assert!(exit.success(), "{exit:?}");
    let alive = std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()?;
    assert!(!alive.success(), "rank {pid} outlived the agent");
    Ok(())
}
