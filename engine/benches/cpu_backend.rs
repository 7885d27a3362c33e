//! The CPU reference backend's figures next to the simulated backend's:
//! prefill and decode tokens/s, and KV transfer time per request.
//!
//! For each backend, three in-process engines serve on loopback
//! (`engine::serve` on `127.0.0.1:0`): a prefill worker, a decode worker and
//! nothing else. Each rep prefills a fresh prompt of `--prompt` tokens
//! (byte tokens of a fixed text), then:
//!
//! - **prefill tok/s**: prompt tokens over the prefill worker's step time,
//!   as its `Status` reports it (`prefill_tokens_per_second`: measured wall
//!   time for the CPU model, modelled time for the sim);
//! - **KV transfer**: pulls the handle's KV with the decode engine's own
//!   receiving code (`engine::kv::receive`), timed in wall time;
//! - **decode tok/s**: `--batch` requests decode `--tokens` tokens each at
//!   once on the decode worker; per request it is 1 / TPOT as `Status`
//!   reports it, in aggregate `batch / TPOT`.
//!
//! The sim is DeepSeek-V4-Pro on GB200 (prefill TP8, decode EP8) at a time
//! scale of 1e4, so its figures are modelled GPU time while its KV bytes
//! (the model's real size) really cross loopback. Prints a markdown table.
//! Run with `cargo bench -p engine --bench cpu_backend [-- --reps N]`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use engine::{BackendConfig, CpuOptions, EngineConfig, EngineMetrics, Role};
use perfmodel::{ModelProfile, Parallelism, Sku};
use proto::pb;
use proto::pb::engine_service_client::EngineServiceClient;
use tokio::sync::oneshot;

const MODEL: &str = "deepseek-v4-pro";
const SIM_TIME_SCALE: f64 = 1e4;
const TEXT: &str = "Prefill computes the KV cache of the prompt; decode pulls it \
and streams tokens back while experts are dispatched across ranks. ";

struct Options {
    reps: usize,
    prompt: usize,
    tokens: u32,
    batch: usize,
}

fn options() -> Result<Options> {
    let mut o = Options {
        reps: 5,
        prompt: 512,
        tokens: 32,
        batch: 8,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || -> Result<usize> {
            args.next()
                .with_context(|| format!("{arg} needs a value"))?
                .parse()
                .with_context(|| format!("{arg} takes a number"))
        };
        match arg.as_str() {
            "--reps" => o.reps = value()?.max(1),
            "--prompt" => o.prompt = value()?.max(1),
            "--tokens" => o.tokens = u32::try_from(value()?.max(2))?,
            "--batch" => o.batch = value()?.max(1),
            // cargo bench passes --bench; ignore what is not ours.
            _ => {}
        }
    }
    Ok(o)
}

struct Worker {
    endpoint: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<engine::Result<()>>,
}

impl Worker {
    async fn start(config: EngineConfig) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let metrics = EngineMetrics::register(&prometheus::Registry::new())?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(engine::serve(config, listener, metrics, async move {
            let _ = stopped.await;
        }));
        let w = Self {
            endpoint,
            stop: Some(stop),
            task,
        };
        w.client().await?;
        Ok(w)
    }

    async fn client(&self) -> Result<EngineServiceClient<tonic::transport::Channel>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match EngineServiceClient::connect(self.endpoint.clone()).await {
                Ok(c) => return Ok(c.max_decoding_message_size(64 << 20)),
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    async fn load(&self) -> Result<pb::EngineLoad> {
        let s = self.client().await?.status(pb::StatusRequest {}).await?;
        s.into_inner().load.context("status without load")
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await??;
        Ok(())
    }
}

fn config(role: Role, cpu: Option<&Path>) -> Result<EngineConfig> {
    let model = ModelProfile::builtin(MODEL)?;
    let mut c = match cpu {
        Some(dir) => {
            let mut c = EngineConfig::new(role, model, Sku::Gb200, Parallelism::Tp(1));
            c.backend = BackendConfig::Cpu(CpuOptions {
                model_dir: dir.to_path_buf(),
                ep_peers: Vec::new(),
            });
            c
        }
        None => {
            let p = if role == Role::Prefill {
                Parallelism::Tp(8)
            } else {
                Parallelism::Ep(8)
            };
            let mut c = EngineConfig::new(role, model, Sku::Gb200, p);
            c.time_scale = SIM_TIME_SCALE;
            c
        }
    };
    c.isl = 4096;
    c.max_context = 8192;
    Ok(c)
}

fn prompt(len: usize, rep: usize) -> Vec<u32> {
    // A different rotation per rep so no two prompts are the same.
    TEXT.bytes()
        .cycle()
        .skip(rep * 7)
        .take(len)
        .map(u32::from)
        .collect()
}

async fn prefill(w: &Worker, id: &str, ids: Vec<u32>) -> Result<pb::KvHandle> {
    let reply = w
        .client()
        .await?
        .prefill(pb::PrefillRequest {
            request_id: id.into(),
            prompt: Some(pb::prefill_request::Prompt::TokenIds(pb::TokenIds { ids })),
            max_tokens: 0,
            sampling: None,
        })
        .await?;
    reply.into_inner().kv.context("no KV handle")
}

async fn decode_all(w: &Worker, handles: Vec<(String, pb::KvHandle)>, tokens: u32) -> Result<()> {
    let mut streams = Vec::new();
    for (id, kv) in handles {
        let s = w
            .client()
            .await?
            .decode(pb::DecodeRequest {
                request_id: id,
                kv: Some(kv),
                max_tokens: tokens,
                sampling: None,
            })
            .await?
            .into_inner();
        streams.push(s);
    }
    for mut s in streams {
        let mut n = 0;
        while let Some(c) = s.message().await? {
            n += c.token_ids.len();
        }
        ensure!(n == tokens as usize, "decoded {n} of {tokens} tokens");
    }
    Ok(())
}

/// One backend's figures.
#[derive(Debug, Default)]
struct Figures {
    prefill_tps: f64,
    kv_bytes: u64,
    kv_ms: Vec<f64>,
    tpot_batch1: f64,
    tpot_batch: f64,
}

async fn measure(o: &Options, cpu: Option<&Path>) -> Result<Figures> {
    let p = Worker::start(config(Role::Prefill, cpu)?).await?;
    let d1 = Worker::start(config(Role::Decode, cpu)?).await?;
    let dn = Worker::start(config(Role::Decode, cpu)?).await?;
    let counter = prometheus::IntCounter::new("bench_kv_bytes", "KV bytes pulled")?;
    let mut f = Figures::default();
    for rep in 0..o.reps {
        let kv = prefill(&p, &format!("kv-{rep}"), prompt(o.prompt, rep)).await?;
        let start = Instant::now();
        let data = engine::kv::receive(&kv, 1 << 20, &counter, &proto::tls::ClientTls::plaintext())
            .await?;
        f.kv_ms.push(start.elapsed().as_secs_f64() * 1e3);
        ensure!(data.len() as u64 == kv.bytes, "short KV");
        f.kv_bytes = kv.bytes;
    }
    f.prefill_tps = p.load().await?.prefill_tokens_per_second;
    for rep in 0..o.reps {
        let id = format!("one-{rep}");
        let kv = prefill(&p, &id, prompt(o.prompt, rep)).await?;
        decode_all(&d1, vec![(id, kv)], o.tokens).await?;
    }
    f.tpot_batch1 = d1.load().await?.tpot_seconds;
    for rep in 0..o.reps {
        let mut handles = Vec::new();
        for b in 0..o.batch {
            let id = format!("batch-{rep}-{b}");
            handles.push((
                id.clone(),
                prefill(&p, &id, prompt(o.prompt, rep + b)).await?,
            ));
        }
        decode_all(&dn, handles, o.tokens).await?;
    }
    f.tpot_batch = dn.load().await?.tpot_seconds;
    p.stop().await?;
    d1.stop().await?;
    dn.stop().await?;
    Ok(f)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

async fn run() -> Result<()> {
    let o = options()?;
    let dir = tempfile::tempdir()?;
    engine::cpu::write_model(dir.path(), 7)?;
    let cpu = measure(&o, Some(dir.path())).await?;
    let sim = measure(&o, None).await?;
    println!(
        "## CPU reference backend vs simulated backend ({} reps, {}-token prompts, {} output tokens, decode batch {})\n",
        o.reps, o.prompt, o.tokens, o.batch
    );
    println!(
        "| figure | CPU reference: small model (4 layers, hidden 64, 8 experts), measured on this machine | sim: DeepSeek-V4-Pro on GB200 (prefill TP8, decode EP8), modelled |"
    );
    println!("|---|---|---|");
    println!(
        "| prefill tok/s (one prompt per step) | {:.0} | {:.0} |",
        cpu.prefill_tps, sim.prefill_tps
    );
    let per = |t: f64| if t > 0.0 { 1.0 / t } else { 0.0 };
    println!(
        "| decode tok/s per request, batch 1 (1/TPOT) | {:.0} | {:.1} |",
        per(cpu.tpot_batch1),
        per(sim.tpot_batch1)
    );
    println!(
        "| decode tok/s, batch {b} (batch/TPOT) | {:.0} | {:.1} |",
        o.batch as f64 * per(cpu.tpot_batch),
        o.batch as f64 * per(sim.tpot_batch),
        b = o.batch
    );
    println!(
        "| KV bytes per request ({}-token prompt) | {} | {} |",
        o.prompt, cpu.kv_bytes, sim.kv_bytes
    );
    println!(
        "| KV transfer per request, PullKv over loopback (median wall ms) | {:.2} | {:.2} |",
        median(&cpu.kv_ms),
        median(&sim.kv_ms)
    );
    Ok(())
}

fn main() -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}
