//! End-to-end tests of the agent's gRPC server with simulated GPUs and real
//! child processes (`/bin/sh` scripts standing in for the engine).
//!
//! Every test shuts the supervisor down (killing its ranks) before it ends;
//! `kill_on_drop` covers a test that fails midway.

use std::collections::HashMap;
use std::time::Duration;

use agent::gpu::{NodeIdentity, SimulatedGpus};
use agent::metrics::Metrics;
use agent::node::Node;
use agent::supervisor::{EngineCommand, RestartPolicy, SupervisorConfig};
use anyhow::{Context, Result, bail};
use futures::StreamExt;
use harness::wait_for;
use proto::pb;
use proto::pb::agent_service_client::AgentServiceClient;
use proto::types::GpuHealth;
use tokio::sync::oneshot;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(10);

struct Agent {
    node: Node,
    channel: Channel,
    client: AgentServiceClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl Agent {
    async fn start(script: &str) -> Result<Self> {
        let config = SupervisorConfig {
            engine: EngineCommand {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), script.into()],
                env: vec![],
            },
            restart: RestartPolicy {
                max_restarts: 3,
                base_delay: Duration::from_millis(50),
                max_delay: Duration::from_millis(200),
            },
        };
        let gpus = SimulatedGpus {
            count: 4,
            memory_mib: 189_471,
            product: "NVIDIA-GB200".into(),
            node: "tray-0".into(),
        };
        let identity = NodeIdentity {
            node: "tray-0".into(),
            sku: "GB200".into(),
            clique: "c0.1".into(),
        };
        let node = Node::new(identity, &gpus, config, Metrics::new()?)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let served = node.clone();
        let server = tokio::spawn(async move {
            let _ = agent::service::serve(listener, served, None, async {
                let _ = stopped.await;
            })
            .await;
        });
        let channel = Channel::from_shared(address)?.connect().await?;
        Ok(Self {
            node,
            client: AgentServiceClient::new(channel.clone()),
            channel,
            stop: Some(stop),
            server,
        })
    }

    async fn shutdown(mut self) -> Result<()> {
        self.node.supervisor().shutdown(Duration::ZERO).await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.server).await?;
        Ok(())
    }
}

fn spec(worker: &str, rank: u32, gpus: &[u32]) -> pb::RankSpec {
    pb::RankSpec {
        worker: Some(pb::WorkerId {
            namespace: "ns".into(),
            deployment: "dep".into(),
            worker: worker.into(),
        }),
        role: pb::Role::Decode as i32,
        shape: Some(pb::Shape { tp: 1, ep: 2 }),
        rank,
        world_size: 2,
        gpu_indices: gpus.to_vec(),
        rendezvous: None,
        model: Some(pb::ModelProfile {
            name: "tiny".into(),
            ..Default::default()
        }),
        backend: pb::Backend::Sim as i32,
        engine_args: HashMap::new(),
        generation: 1,
    }
}

fn rank_ref(worker: &str, rank: u32) -> pb::RankRef {
    pb::RankRef {
        worker: spec(worker, rank, &[]).worker,
        rank,
        generation: 1,
    }
}

async fn next_event(
    events: &mut tonic::Streaming<pb::AgentEvent>,
) -> Result<pb::agent_event::Event> {
    let event = tokio::time::timeout(WAIT, events.next())
        .await
        .context("no event in time")?
        .context("event stream ended")??;
    event.event.context("event without payload")
}

async fn launch(agent: &mut Agent, spec: pb::RankSpec) -> Result<pb::RankStatus> {
    agent
        .client
        .launch_rank(pb::LaunchRankRequest { spec: Some(spec) })
        .await?
        .into_inner()
        .status
        .context("no status")
}

fn kill(signal: &str, pid: u32) -> Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed");
    }
    Ok(())
}

#[tokio::test]
async fn a_rank_starts_crashes_restarts_and_stops() -> Result<()> {
    let mut agent = Agent::start("echo started; exec sleep 30").await?;
    let mut events = agent
        .client
        .stream_events(pb::StreamEventsRequest::default())
        .await?
        .into_inner();

    launch(&mut agent, spec("w0", 0, &[0, 1])).await?;
    let pb::agent_event::Event::RankStarted(started) = next_event(&mut events).await? else {
        bail!("expected RankStarted");
    };
    let first_pid = started.status.context("status")?.pid;
    assert_ne!(first_pid, 0);

    let listed = agent
        .client
        .list_ranks(pb::ListRanksRequest::default())
        .await?
        .into_inner()
        .ranks;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].phase, pb::RankPhase::Running as i32);
    assert_eq!(listed[0].gpu_indices, vec![0, 1]);

    // kill -9 the engine: a failure, then a restart with a new pid.
    kill("KILL", first_pid)?;
    let pb::agent_event::Event::RankFailed(failed) = next_event(&mut events).await? else {
        bail!("expected RankFailed");
    };
    assert_eq!(failed.exit_code, None);
    assert!(failed.reason.contains("signal 9"), "{}", failed.reason);
    let pb::agent_event::Event::RankStarted(restarted) = next_event(&mut events).await? else {
        bail!("expected a second RankStarted");
    };
    let second_pid = restarted.status.context("status")?.pid;
    assert_ne!(second_pid, first_pid);
    assert!(
        agent
            .node
            .metrics()
            .render()
            .contains("rackscale_agent_rank_restarts_total 1")
    );

    // StopRank with a grace period: `sleep` dies on SIGTERM at once.
    let begun = std::time::Instant::now();
    let stopped = agent
        .client
        .stop_rank(pb::StopRankRequest {
            rank: Some(rank_ref("w0", 0)),
            grace_period: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
        })
        .await?
        .into_inner()
        .status
        .context("status")?;
    assert!(begun.elapsed() < Duration::from_secs(5));
    assert_eq!(stopped.phase, pb::RankPhase::Exited as i32);
    let pb::agent_event::Event::RankExited(exited) = next_event(&mut events).await? else {
        bail!("expected RankExited");
    };
    assert!(exited.requested);
    assert_eq!(exited.exit_code, 128 + 15);
    // The process is gone.
    assert!(kill("0", second_pid).is_err());
    agent.shutdown().await
}

#[tokio::test]
async fn a_stop_past_the_grace_period_kills() -> Result<()> {
    // The script ignores SIGTERM; only the hard kill ends it.
    let mut agent = Agent::start("trap '' TERM; while :; do sleep 0.1; done").await?;
    launch(&mut agent, spec("w0", 0, &[0])).await?;
    let begun = std::time::Instant::now();
    let stopped = agent
        .client
        .stop_rank(pb::StopRankRequest {
            rank: Some(rank_ref("w0", 0)),
            grace_period: Some(prost_types::Duration {
                seconds: 0,
                nanos: 300_000_000,
            }),
        })
        .await?
        .into_inner()
        .status
        .context("status")?;
    let took = begun.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(stopped.phase, pb::RankPhase::Exited as i32);
    agent.shutdown().await
}

#[tokio::test]
async fn a_used_or_failed_gpu_is_refused() -> Result<()> {
    let mut agent = Agent::start("exec sleep 30").await?;
    let mut events = agent
        .client
        .stream_events(pb::StreamEventsRequest::default())
        .await?
        .into_inner();
    launch(&mut agent, spec("w0", 0, &[0, 1])).await?;
    // Idempotent relaunch of the same generation.
    launch(&mut agent, spec("w0", 0, &[0, 1])).await?;

    let err = agent
        .client
        .launch_rank(pb::LaunchRankRequest {
            spec: Some(spec("w1", 0, &[1, 2])),
        })
        .await
        .err()
        .context("launch on a used GPU succeeded")?;
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("GPU 1 is already used by rank ns/dep/w0#0"),
        "{}",
        err.message()
    );

    // Fault injection: GPU 3 fails.
    agent
        .node
        .set_gpu_health(3, GpuHealth::Unhealthy, "xid 79")?;
    let node = agent
        .client
        .get_node(pb::GetNodeRequest {})
        .await?
        .into_inner();
    assert_eq!((node.node.as_str(), node.sku.as_str()), ("tray-0", "GB200"));
    assert_eq!(node.gpus[3].health, pb::GpuHealth::Unhealthy as i32);
    assert_eq!(node.gpus[3].reason, "xid 79");
    let health = loop {
        if let pb::agent_event::Event::GpuHealth(h) = next_event(&mut events).await? {
            break h;
        }
    };
    assert_eq!(health.gpu.context("gpu")?.index, 3);
    assert_eq!(health.previous, pb::GpuHealth::Healthy as i32);
    let err = agent
        .client
        .launch_rank(pb::LaunchRankRequest {
            spec: Some(spec("w1", 0, &[3])),
        })
        .await
        .err()
        .context("launch on an unhealthy GPU succeeded")?;
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("GPU 3 is not usable"),
        "{}",
        err.message()
    );

    // An unknown GPU is an invalid argument; a free healthy one works.
    let err = agent
        .client
        .launch_rank(pb::LaunchRankRequest {
            spec: Some(spec("w1", 0, &[7])),
        })
        .await
        .err()
        .context("launch on an unknown GPU succeeded")?;
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    launch(&mut agent, spec("w1", 0, &[2])).await?;
    wait_for("two running ranks", WAIT, || {
        let running = agent
            .node
            .supervisor()
            .list()
            .iter()
            .filter(|s| s.pid != 0)
            .count();
        async move { Ok((running == 2).then_some(())) }
    })
    .await?;
    agent.shutdown().await
}

#[tokio::test]
async fn a_rank_that_keeps_crashing_is_given_up() -> Result<()> {
    let mut agent = Agent::start("exit 3").await?;
    launch(&mut agent, spec("w0", 0, &[0])).await?;
    let key = agent::rank::RankKey {
        worker: proto::types::WorkerId::new("ns", "dep", "w0"),
        rank: 0,
    };
    let status = wait_for("the rank to be given up", WAIT, || {
        let status = agent.node.supervisor().get(&key);
        async move { Ok(status.filter(|s| s.message.starts_with("gave up"))) }
    })
    .await?;
    assert_eq!(status.phase, agent::rank::Phase::Failed);
    assert_eq!(status.restarts, 3);
    // Its GPU is free again.
    launch(&mut agent, spec("w1", 0, &[0])).await?;
    agent.shutdown().await
}

#[tokio::test]
async fn health_and_reflection_are_served_next_to_the_agent_service() -> Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let agent = Agent::start("exec sleep 30").await?;
    let health = HealthClient::new(agent.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "rackscale.v1.AgentService".into(),
        })
        .await?
        .into_inner();
    assert_eq!(health.status, ServingStatus::Serving as i32);

    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = ServerReflectionClient::new(agent.channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let reply = replies.message().await?.context("no reflection reply")?;
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        bail!("unexpected reflection reply {:?}", reply.message_response);
    };
    let mut services: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    services.sort();
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "rackscale.v1.AgentService",
        ]
    );
    drop(replies);
    agent.shutdown().await
}
