//! The `rackscale-agent` flags and the validated configuration built from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use proto::registry::{EtcdArgs, EtcdSecurity};
use proto::tls::{TlsArgs, Transport};

use crate::gpu::{ConfiguredGpus, NodeIdentity, SimulatedGpus};
use crate::registration::RegistrationConfig;
use crate::supervisor::{EngineCommand, RestartPolicy, SupervisorConfig, env};
use crate::{Error, Result};

/// Flags of `rackscale-agent`; every flag has a `RACKSCALE_AGENT_*` env twin.
#[derive(Debug, Clone, Parser)]
#[command(name = "rackscale-agent", about = "rackscale node agent", version)]
pub struct Args {
    /// Kubernetes node name of this tray.
    #[arg(long, env = "RACKSCALE_AGENT_NODE")]
    pub node: String,
    /// Address to serve `AgentService` on.
    #[arg(long, env = "RACKSCALE_AGENT_LISTEN", default_value = "0.0.0.0:7400")]
    pub listen: SocketAddr,
    /// Address published in the registry; defaults to the listen address.
    #[arg(long, env = "RACKSCALE_AGENT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Address to serve `/metrics` (and fault injection) on; unset disables it.
    #[arg(long, env = "RACKSCALE_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// etcd endpoints, comma-separated; empty disables registration.
    #[arg(long, env = "RACKSCALE_AGENT_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Lease TTL in seconds.
    #[arg(long, env = "RACKSCALE_AGENT_LEASE_TTL_SECONDS", default_value_t = 10)]
    pub lease_ttl_seconds: u64,
    /// Where the GPUs come from: `sim` (the `--gpu-*` flags) or `nvml` (the
    /// NVIDIA driver; needs a build with `--features nvml`).
    #[arg(
        long,
        env = "RACKSCALE_AGENT_GPU_SOURCE",
        value_enum,
        default_value_t = GpuSourceKind::Sim
    )]
    pub gpu_source: GpuSourceKind,
    /// Number of simulated GPUs (`--gpu-source sim` only).
    #[arg(long, env = "RACKSCALE_AGENT_GPU_COUNT", default_value_t = 4)]
    pub gpu_count: u32,
    /// Memory per simulated GPU, MiB (`--gpu-source sim` only).
    #[arg(
        long,
        env = "RACKSCALE_AGENT_GPU_MEMORY_MIB",
        default_value_t = 189_471
    )]
    pub gpu_memory_mib: u64,
    /// Simulated GPU product name, GFD spelling (`--gpu-source sim` only).
    #[arg(
        long,
        env = "RACKSCALE_AGENT_GPU_PRODUCT",
        default_value = "NVIDIA-GB200"
    )]
    pub gpu_product: String,
    /// GPU SKU.
    #[arg(long, env = "RACKSCALE_AGENT_SKU", default_value = "GB200")]
    pub sku: String,
    /// NVLink clique (`<clusterUUID>.<cliqueId>`).
    #[arg(long, env = "RACKSCALE_AGENT_CLIQUE", default_value = "")]
    pub clique: String,
    /// Engine binary each rank runs.
    #[arg(long, env = "RACKSCALE_AGENT_ENGINE_BIN")]
    pub engine_bin: PathBuf,
    /// One argument passed to the engine before the per-rank ones; repeat
    /// the flag for several (the env twin holds a single argument).
    #[arg(
        long = "engine-arg",
        env = "RACKSCALE_AGENT_ENGINE_ARG",
        allow_hyphen_values = true
    )]
    pub engine_args: Vec<String>,
    /// Restarts of a crashed rank before it is left failed.
    #[arg(long, env = "RACKSCALE_AGENT_MAX_RESTARTS", default_value_t = 5)]
    pub max_restarts: u32,
    /// First restart delay, milliseconds; doubles per restart.
    #[arg(long, env = "RACKSCALE_AGENT_RESTART_BASE_MS", default_value_t = 1000)]
    pub restart_base_ms: u64,
    /// Cap on the restart delay, milliseconds.
    #[arg(long, env = "RACKSCALE_AGENT_RESTART_MAX_MS", default_value_t = 30_000)]
    pub restart_max_ms: u64,
    /// Grace period for ranks when the agent shuts down, seconds.
    #[arg(
        long,
        env = "RACKSCALE_AGENT_SHUTDOWN_GRACE_SECONDS",
        default_value_t = 10
    )]
    pub shutdown_grace_seconds: u64,
    /// Serve `POST /debug/gpus/{index}/health/{health}` on the metrics address.
    #[arg(long, env = "RACKSCALE_AGENT_ENABLE_FAULT_INJECTION")]
    pub enable_fault_injection: bool,
    /// Log as JSON.
    #[arg(long, env = "RACKSCALE_AGENT_LOG_JSON")]
    pub log_json: bool,
    /// Mutual TLS of `AgentService` and of every engine rank started here
    /// (the ranks inherit these settings).
    #[command(flatten)]
    pub tls: TlsArgs,
    /// TLS and authentication to etcd (the ranks inherit them too).
    #[command(flatten)]
    pub etcd_security: EtcdArgs,
}

/// Values of `--gpu-source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GpuSourceKind {
    /// GPUs described by the `--gpu-*` flags.
    Sim,
    /// GPUs discovered through NVML.
    Nvml,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Who this node is.
    pub identity: NodeIdentity,
    /// Where the GPUs come from.
    pub gpus: ConfiguredGpus,
    /// `AgentService` listen address.
    pub listen: SocketAddr,
    /// `/metrics` listen address.
    pub metrics_listen: Option<SocketAddr>,
    /// etcd endpoints; empty disables registration.
    pub etcd: Vec<String>,
    /// Registration settings.
    pub registration: RegistrationConfig,
    /// Supervisor settings.
    pub supervisor: SupervisorConfig,
    /// Grace for ranks at shutdown.
    pub shutdown_grace: Duration,
    /// Whether the fault-injection route is served.
    pub fault_injection: bool,
    /// How `AgentService` is served (and how the ranks serve and dial).
    pub transport: Transport,
    /// How the registry client authenticates to etcd.
    pub etcd_security: EtcdSecurity,
}

impl TryFrom<Args> for Config {
    type Error = Error;

    fn try_from(args: Args) -> Result<Self> {
        if args.node.is_empty() || args.node.contains('/') {
            return Err(Error::Config("--node must be non-empty without '/'".into()));
        }
        if args.gpu_source == GpuSourceKind::Sim && args.gpu_count == 0 {
            return Err(Error::Config("--gpu-count must be at least 1".into()));
        }
        if args.lease_ttl_seconds == 0 {
            return Err(Error::Config(
                "--lease-ttl-seconds must be at least 1".into(),
            ));
        }
        if args.restart_base_ms == 0 || args.restart_max_ms < args.restart_base_ms {
            return Err(Error::Config(
                "need 0 < --restart-base-ms <= --restart-max-ms".into(),
            ));
        }
        let gpus = gpu_source(&args)?;
        let transport = args
            .tls
            .transport()
            .map_err(|e| Error::Config(e.to_string()))?;
        let etcd_security = args
            .etcd_security
            .security()
            .map_err(|e| Error::Config(e.to_string()))?;
        let etcd: Vec<String> = args.etcd.into_iter().filter(|e| !e.is_empty()).collect();
        let mut engine_env = vec![
            (env::NODE.to_owned(), args.node.clone()),
            (env::SKU.to_owned(), args.sku.to_lowercase()),
        ];
        if !etcd.is_empty() {
            engine_env.push((env::ETCD_ENDPOINTS.to_owned(), etcd.join(",")));
            engine_env.extend(etcd_security.env());
        }
        // One agent's TLS settings configure its ranks.
        engine_env.extend(transport.env());
        let address = args
            .advertise
            .clone()
            .unwrap_or_else(|| args.listen.to_string());
        Ok(Self {
            identity: NodeIdentity {
                node: args.node,
                sku: args.sku,
                clique: args.clique,
            },
            gpus,
            listen: args.listen,
            metrics_listen: args.metrics_listen,
            etcd,
            registration: RegistrationConfig {
                address,
                ttl: Duration::from_secs(args.lease_ttl_seconds),
                call_timeout: Duration::from_secs(5),
                revoke_on_shutdown: true,
            },
            supervisor: SupervisorConfig {
                engine: EngineCommand {
                    program: args.engine_bin,
                    args: args.engine_args,
                    env: engine_env,
                },
                restart: RestartPolicy {
                    max_restarts: args.max_restarts,
                    base_delay: Duration::from_millis(args.restart_base_ms),
                    max_delay: Duration::from_millis(args.restart_max_ms),
                },
            },
            shutdown_grace: Duration::from_secs(args.shutdown_grace_seconds),
            fault_injection: args.enable_fault_injection,
            transport,
            etcd_security,
        })
    }
}

/// The GPU source `--gpu-source` selects; NVML in a build without the `nvml`
/// feature is refused here, at startup, rather than at discovery.
fn gpu_source(args: &Args) -> Result<ConfiguredGpus> {
    match args.gpu_source {
        GpuSourceKind::Sim => Ok(ConfiguredGpus::Simulated(SimulatedGpus {
            count: args.gpu_count,
            memory_mib: args.gpu_memory_mib,
            product: args.gpu_product.clone(),
            node: args.node.clone(),
        })),
        #[cfg(feature = "nvml")]
        GpuSourceKind::Nvml => Ok(ConfiguredGpus::Nvml(crate::gpu::NvmlGpus)),
        #[cfg(not(feature = "nvml"))]
        GpuSourceKind::Nvml => Err(Error::Config(
            "--gpu-source nvml needs NVML support, which this build lacks; \
             rebuild rackscale-agent with `--features nvml`"
                .into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let base = [
            "rackscale-agent",
            "--node=n1",
            "--engine-bin=/bin/true",
            "--insecure-plaintext",
        ];
        Args::try_parse_from(base.iter().chain(extra)).unwrap()
    }

    #[test]
    fn ranks_inherit_node_sku_and_registry() {
        let config = Config::try_from(args(&[
            "--sku=GB300",
            "--etcd=http://127.0.0.1:1,http://127.0.0.1:2",
        ]))
        .unwrap();
        let env: Vec<(&str, &str)> = config
            .supervisor
            .engine
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("RACKSCALE_NODE", "n1"),
                ("RACKSCALE_SKU", "gb300"),
                (
                    "RACKSCALE_ETCD_ENDPOINTS",
                    "http://127.0.0.1:1,http://127.0.0.1:2"
                ),
                ("RACKSCALE_INSECURE_PLAINTEXT", "true"),
            ]
        );
        // Without a registry there is only the transport to hand down.
        let alone = Config::try_from(args(&[])).unwrap();
        assert_eq!(alone.supervisor.engine.env.len(), 3);
    }

    #[test]
    fn ranks_inherit_tls_and_etcd_security() {
        let config = Config::try_from(
            Args::try_parse_from([
                "rackscale-agent",
                "--node=n1",
                "--engine-bin=/bin/true",
                "--etcd=https://10.0.0.1:2379",
                "--tls-ca=/pki/ca.pem",
                "--tls-cert=/pki/agent.pem",
                "--tls-key=/pki/agent-key.pem",
                "--tls-server-name=rackscale-agent",
                "--etcd-ca=/etcd/ca.pem",
                "--etcd-username=rackscale",
                "--etcd-password-file=/etcd/password",
            ])
            .unwrap(),
        )
        .unwrap();
        assert!(config.transport.is_tls());
        let env: std::collections::BTreeMap<&str, &str> = config
            .supervisor
            .engine
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(env["RACKSCALE_TLS_CA"], "/pki/ca.pem");
        assert_eq!(env["RACKSCALE_TLS_KEY"], "/pki/agent-key.pem");
        assert_eq!(env["RACKSCALE_TLS_SERVER_NAME"], "rackscale-agent");
        assert_eq!(env["RACKSCALE_ETCD_CA"], "/etcd/ca.pem");
        assert_eq!(env["RACKSCALE_ETCD_USERNAME"], "rackscale");
        assert!(!env.contains_key("RACKSCALE_INSECURE_PLAINTEXT"));
    }

    #[test]
    fn without_tls_or_the_plaintext_flag_the_agent_refuses() {
        let args = Args::try_parse_from(["rackscale-agent", "--node=n1", "--engine-bin=/bin/true"])
            .unwrap();
        match Config::try_from(args) {
            Err(Error::Config(message)) => {
                assert!(message.contains("--tls-ca"), "{message}");
                assert!(message.contains("--insecure-plaintext"), "{message}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn flags_validate() {
        let args = args(&["--gpu-count=4"]);
        let config = Config::try_from(args.clone()).unwrap();
        assert_eq!(config.registration.ttl, Duration::from_secs(10));
        assert!(matches!(
            config.gpus,
            ConfiguredGpus::Simulated(SimulatedGpus { count: 4, .. })
        ));
        let bad = Args {
            gpu_count: 0,
            ..args
        };
        assert!(matches!(Config::try_from(bad), Err(Error::Config(_))));
    }

    #[test]
    fn gpu_source_defaults_to_sim() {
        assert_eq!(args(&[]).gpu_source, GpuSourceKind::Sim);
        assert_eq!(args(&["--gpu-source=sim"]).gpu_source, GpuSourceKind::Sim);
        assert_eq!(
            args(&["--gpu-source", "nvml"]).gpu_source,
            GpuSourceKind::Nvml
        );
        assert!(
            Args::try_parse_from([
                "rackscale-agent",
                "--node=n1",
                "--engine-bin=/bin/true",
                "--insecure-plaintext",
                "--gpu-source=cuda",
            ])
            .is_err()
        );
    }

    #[cfg(not(feature = "nvml"))]
    #[test]
    fn nvml_without_the_feature_is_refused_at_config_time() {
        match Config::try_from(args(&["--gpu-source=nvml"])) {
            Err(Error::Config(message)) => {
                assert!(message.contains("--features nvml"), "{message}");
            }
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[cfg(feature = "nvml")]
    #[test]
    fn nvml_with_the_feature_selects_nvml() {
        // The simulated-GPU flags do not apply to NVML, so a zero count is fine.
        let config = Config::try_from(args(&["--gpu-source=nvml", "--gpu-count=0"])).unwrap();
        assert_eq!(config.gpus, ConfiguredGpus::Nvml(crate::gpu::NvmlGpus));
    }
}
