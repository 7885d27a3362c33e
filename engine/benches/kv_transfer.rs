//! KV-transfer throughput: one request's KV for DeepSeek-V4-Pro at an 8K
//! prompt, moved from a prefill engine to a decode engine over loopback gRPC,
//! against a raw TCP copy of the same bytes on the same loopback.
//!
//! Two engines run in-process (`engine::serve` on `127.0.0.1:0`, roles
//! prefill and decode, time scale 1e6 so modelled compute is negligible).
//! Each rep prefills a fresh 8192-token prompt (untimed; a pull frees the KV)
//! and then times one of:
//!
//! - **PullKv**: this bench pulls the handle's KV with the decode engine's
//!   own receiving code, `engine::kv::receive` (a new connection, `PullKv`,
//!   chunks appended in order, offsets and length checked), and checks the
//!   content with `engine::kv::verify` after the clock stops;
//! - **Decode**: a `Decode` call with `max_tokens = 1` on the decode engine,
//!   timed to its first chunk: the engine's whole pull, including its own
//!   checksum verification;
//! - **raw TCP**: a fresh loopback connection, the same bytes written in
//!   chunks of the engine's KV chunk size and read fully on the other side,
//!   compared byte for byte afterwards.
//!
//! Prints bytes moved (equal to `perfmodel`'s `kv_bytes(8192)` for the model),
//! median and p10/p90 wall time and GB/s per case, and the PullKv/raw ratio
//! against the target of at least 80% of raw (PASS/MISS). Exits non-zero only
//! when a transfer is broken (wrong length, offsets or bytes), never for a
//! missed target. No criterion: `--reps N` timed runs of each case (default
//! 20), interleaved, after one warm-up. With `--tls` a second pair of engines
//! serves and pulls over mutual TLS (a CA made for the run, as in
//! production) and its PullKv and Decode cases run interleaved with the
//! plaintext ones, so the TLS cost is measured on the same machine at the
//! same moment. Run with
//! `cargo bench -p engine --bench kv_transfer [-- --reps N] [--tls]`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use engine::sim::SimBackend;
use engine::{EngineConfig, EngineMetrics, EngineTls, Role};
use perfmodel::{Calibration, ModelProfile, Parallelism, Sku};
use proto::pb;
use proto::pb::engine_service_client::EngineServiceClient;
use proto::tls::ClientTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const MODEL: &str = "deepseek-v4-pro";
const PROMPT_TOKENS: u32 = 8192;
/// Modelled seconds per wall second: an 8K prefill step sleeps microseconds.
const TIME_SCALE: f64 = 1e6;
const DEFAULT_REPS: usize = 20;
/// PullKv throughput should reach this fraction of raw loopback TCP.
const TARGET_RATIO: f64 = 0.8;

/// One in-process engine on a loopback port; stopped on drop.
struct Worker {
    endpoint: String,
    tls: ClientTls,
    metrics: EngineMetrics,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<engine::Result<()>>,
}

impl Worker {
    async fn start(role: Role, tls: &EngineTls) -> Result<Self> {
        let parallelism = match role {
            Role::Prefill => Parallelism::Tp(8),
            _ => Parallelism::Ep(8),
        };
        let mut config =
            EngineConfig::new(role, ModelProfile::builtin(MODEL)?, Sku::Gb200, parallelism);
        config.time_scale = TIME_SCALE;
        config.tls = tls.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("{}://{}", tls.scheme(), listener.local_addr()?);
        let metrics = EngineMetrics::unregistered()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(engine::serve(
            config,
            listener,
            metrics.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            endpoint,
            tls: tls.client.clone(),
            metrics,
            stop: Some(stop),
            task,
        })
    }

    /// A client, retrying until the server accepts (bounded by a deadline).
    async fn client(&self) -> Result<EngineServiceClient<tonic::transport::Channel>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let endpoint = self.tls.endpoint(&self.endpoint)?;
        loop {
            match self.tls.channel(&endpoint).await {
                Ok(c) => return Ok(EngineServiceClient::new(c)),
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("connecting to {}", self.endpoint));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await??;
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Wall times of one case, all moving `bytes`.
struct Timings {
    name: &'static str,
    bytes: u64,
    runs: Vec<Duration>,
}

impl Timings {
    fn new(name: &'static str, bytes: u64) -> Self {
        Self {
            name,
            bytes,
            runs: Vec::new(),
        }
    }

    /// Nearest-rank percentile `p` (0..=100) of the wall times.
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.runs.clone();
        sorted.sort();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted
            .get(rank.clamp(1, sorted.len().max(1)) - 1)
            .copied()
            .unwrap_or_default()
    }

    fn gbps(&self, d: Duration) -> f64 {
        self.bytes as f64 / d.as_secs_f64() / 1e9
    }

    fn row(&self) -> String {
        let (p10, p50, p90) = (
            self.percentile(10.0),
            self.percentile(50.0),
            self.percentile(90.0),
        );
        format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} |",
            self.name,
            self.runs.len(),
            ms(p50),
            ms(p10),
            ms(p90),
            self.gbps(p50),
            // Faster runs (p10 of time) are the higher GB/s.
            self.gbps(p90),
            self.gbps(p10),
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Prefills a fresh `PROMPT_TOKENS` prompt on `prefill`; returns its handle.
async fn prefill(prefill: &Worker, request_id: &str) -> Result<pb::KvHandle> {
    let reply = prefill
        .client()
        .await?
        .prefill(pb::PrefillRequest {
            request_id: request_id.into(),
            prompt: Some(pb::prefill_request::Prompt::PromptLength(PROMPT_TOKENS)),
            max_tokens: 1,
            sampling: None,
        })
        .await
        .context("prefill")?;
    reply
        .into_inner()
        .kv
        .context("prefill reply without handle")
}

/// Pulls `handle`'s KV with the decode engine's own receiving code
/// (`engine::kv::receive`: connect, `PullKv`, offsets and length checked).
async fn pull(handle: &pb::KvHandle, chunk_bytes: u32, tls: &ClientTls) -> Result<Vec<u8>> {
    let received = prometheus::IntCounter::new("bench_kv_received_bytes", "KV bytes pulled")?;
    let data = engine::kv::receive(handle, chunk_bytes, &received, tls).await?;
    ensure!(
        received.get() == handle.bytes,
        "counted {} received bytes for a {}-byte KV",
        received.get(),
        handle.bytes
    );
    Ok(data)
}

/// Fails unless `data` is exactly the KV the holder filled for `handle`
/// (length, then the engine's checksum against the holder's fill).
async fn verify(handle: &pb::KvHandle, data: Vec<u8>) -> Result<Vec<u8>> {
    ensure!(
        data.len() as u64 == handle.bytes,
        "received {} of {} bytes",
        data.len(),
        handle.bytes
    );
    Ok(engine::kv::verify(handle, data).await?)
}

/// Decodes one token from `handle` on `decode`; returns when the first
/// chunk arrives (the engine has pulled and verified the KV by then).
async fn decode_first(decode: &Worker, request_id: &str, handle: pb::KvHandle) -> Result<()> {
    let first_token = handle.first_token;
    let mut stream = decode
        .client()
        .await?
        .decode(pb::DecodeRequest {
            request_id: request_id.into(),
            kv: Some(handle),
            max_tokens: 1,
            sampling: None,
        })
        .await
        .context("decode (the engine's pull)")?
        .into_inner();
    let chunk = stream.message().await?.context("decode sent no chunk")?;
    ensure!(
        chunk.token_ids == [first_token],
        "decode's first chunk {:?} is not the prefill's token {first_token}",
        chunk.token_ids
    );
    Ok(())
}

/// Copies `data` over a fresh loopback TCP connection in `chunk`-byte writes;
/// returns the wall time from connect to the last byte read, and the bytes read.
async fn raw_tcp(data: &'static [u8], chunk: usize) -> Result<(Duration, Vec<u8>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        for piece in data.chunks(chunk) {
            stream.write_all(piece).await?;
        }
        stream.shutdown().await?;
        std::io::Result::Ok(())
    });
    let (mut stream, _) = listener.accept().await?;
    let mut received = Vec::with_capacity(data.len());
    while received.len() < data.len() {
        // Into the preallocated buffer's spare capacity: one copy per byte.
        if stream.read_buf(&mut received).await? == 0 {
            break;
        }
    }
    let elapsed = start.elapsed();
    writer.await??;
    Ok((elapsed, received))
}

/// `--reps N` and `--tls`.
fn parse_args() -> Result<(usize, bool)> {
    let mut args = std::env::args().skip(1);
    let mut reps = DEFAULT_REPS;
    let mut tls = false;
    // `cargo bench` passes `--bench`; that and any filter are ignored.
    while let Some(arg) = args.next() {
        if arg == "--tls" {
            tls = true;
        } else if arg == "--reps" {
            reps = args
                .next()
                .context("--reps needs a value")?
                .parse()
                .context("--reps must be a positive integer")?;
            ensure!(reps > 0, "--reps must be positive");
        }
    }
    Ok((reps, tls))
}

/// A prefill and a decode engine on one transport, and their timings.
struct Pair {
    label: &'static str,
    p: Worker,
    d: Worker,
    pull_kv: Timings,
    decode: Timings,
}

impl Pair {
    async fn start(label: &'static str, tls: &EngineTls, bytes: u64) -> Result<Self> {
        Ok(Self {
            label,
            p: Worker::start(Role::Prefill, tls).await?,
            d: Worker::start(Role::Decode, tls).await?,
            pull_kv: Timings::new(
                if tls.server.is_some() {
                    "PullKv (bench as puller), mTLS"
                } else {
                    "PullKv (bench as puller)"
                },
                bytes,
            ),
            decode: Timings::new(
                if tls.server.is_some() {
                    "Decode: engine pull + checksum, mTLS"
                } else {
                    "Decode: engine pull + checksum"
                },
                bytes,
            ),
        })
    }

    /// One rep of both cases; `warmup` reps are not recorded.
    async fn rep(&mut self, rep: usize, warmup: bool, bytes: u64, chunk_bytes: u32) -> Result<()> {
        let id = format!("pull-{rep}");
        let handle = prefill(&self.p, &id).await?;
        ensure!(
            handle.bytes == bytes,
            "handle says {} bytes, expected {bytes}",
            handle.bytes
        );
        let start = Instant::now();
        let got = pull(&handle, chunk_bytes, &self.d.tls).await?;
        let elapsed = start.elapsed();
        verify(&handle, got)
            .await
            .with_context(|| format!("{} PullKv rep {rep}", self.label))?;
        if !warmup {
            self.pull_kv.runs.push(elapsed);
        }

        let id = format!("decode-{rep}");
        let handle = prefill(&self.p, &id).await?;
        let before = self.d.metrics.kv_received_bytes.get();
        let start = Instant::now();
        decode_first(&self.d, &id, handle).await?;
        let elapsed = start.elapsed();
        let moved = self.d.metrics.kv_received_bytes.get() - before;
        ensure!(
            moved == bytes,
            "decode engine received {moved} of {bytes} bytes"
        );
        if !warmup {
            self.decode.runs.push(elapsed);
        }
        Ok(())
    }
}

async fn run(reps: usize, with_tls: bool) -> Result<()> {
    let model = ModelProfile::builtin(MODEL)?;
    let bytes = model.attention.kv_bytes(f64::from(PROMPT_TOKENS)).ceil() as u64;
    let per_token = model.attention.kv_bytes_per_token();
    let chunk_bytes =
        EngineConfig::new(Role::Prefill, model.clone(), Sku::Gb200, Parallelism::Tp(8))
            .kv_chunk_bytes;
    let sim_bytes = SimBackend::new(
        model,
        Sku::Gb200,
        Parallelism::Tp(8),
        Calibration::fitted(),
        TIME_SCALE,
    )
    .kv_bytes(PROMPT_TOKENS);
    ensure!(
        sim_bytes == bytes,
        "engine models {sim_bytes} KV bytes, perfmodel {bytes}"
    );

    let mut pairs = vec![Pair::start("plaintext", &EngineTls::plaintext(), bytes).await?];
    let pki_dir = tempfile::tempdir()?;
    if with_tls {
        let pki = harness::pki::Pki::create(pki_dir.path(), "kv_transfer bench CA")?;
        let tls = EngineTls::from_transport(&pki.transport("engine")?)?;
        pairs.push(Pair::start("mTLS", &tls, bytes).await?);
    }
    let mut raw = Timings::new("raw TCP loopback", bytes);

    // Raw TCP moves the same bytes the engine moves (one KV's content).
    let plain = &pairs[0];
    let sample = prefill(&plain.p, "raw-sample").await?;
    let data: &'static [u8] = verify(&sample, pull(&sample, chunk_bytes, &plain.d.tls).await?)
        .await
        .context("raw sample")?
        .leak();

    for rep in 0..=reps {
        let warmup = rep == 0;
        for pair in &mut pairs {
            pair.rep(rep, warmup, bytes, chunk_bytes).await?;
        }

        let (elapsed, got) = raw_tcp(data, chunk_bytes as usize).await?;
        if got != data {
            bail!(
                "raw TCP rep {rep}: received {} bytes that differ from the {} sent",
                got.len(),
                data.len()
            );
        }
        if !warmup {
            raw.runs.push(elapsed);
        }
    }
    for (i, pair) in pairs.iter().enumerate() {
        // The plaintext pair also served the raw case's sample.
        let want = bytes * (2 * reps as u64 + 2 + u64::from(i == 0));
        ensure!(
            pair.p.metrics.kv_sent_bytes.get() == want,
            "{} prefill engine sent {} bytes, expected {want}",
            pair.label,
            pair.p.metrics.kv_sent_bytes.get(),
        );
    }

    println!(
        "\n{MODEL}, {PROMPT_TOKENS}-token prompt: {bytes} KV bytes ({:.1} MiB) per transfer \
         = perfmodel attention.kv_bytes({PROMPT_TOKENS}) (compressed attention, so not \
         {PROMPT_TOKENS} x the asymptotic {per_token:.0} B/token = {:.0}); \
         {} KiB chunks; {reps} timed reps after 1 warm-up; every transfer verified\n",
        bytes as f64 / f64::from(1u32 << 20),
        per_token * f64::from(PROMPT_TOKENS),
        chunk_bytes >> 10,
    );
    println!("| case | reps | median ms | p10 ms | p90 ms | median GB/s | p10 GB/s | p90 GB/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for pair in &pairs {
        println!("{}", pair.pull_kv.row());
        println!("{}", pair.decode.row());
    }
    println!("{}", raw.row());
    let (pull_kv, decode) = (&pairs[0].pull_kv, &pairs[0].decode);
    let ratio = pull_kv.gbps(pull_kv.percentile(50.0)) / raw.gbps(raw.percentile(50.0));
    let decode_ratio = decode.gbps(decode.percentile(50.0)) / raw.gbps(raw.percentile(50.0));
    // A missed target is reported, not an error: only broken transfers fail.
    println!(
        "\nPullKv / raw TCP (medians): {:.1}% (target >= {:.0}%): {}",
        100.0 * ratio,
        100.0 * TARGET_RATIO,
        if ratio >= TARGET_RATIO {
            "PASS"
        } else {
            "MISS"
        }
    );
    println!(
        "Decode (pull + checksum) / raw TCP (medians): {:.1}% (no target)",
        100.0 * decode_ratio
    );
    if let Some(tls) = pairs.get(1) {
        let median = |t: &Timings| t.percentile(50.0).as_secs_f64();
        println!(
            "mTLS / plaintext (median wall time): PullKv {:.2}x, Decode {:.2}x",
            median(&tls.pull_kv) / median(pull_kv),
            median(&tls.decode) / median(decode),
        );
    }
    for pair in pairs {
        pair.p.stop().await?;
        pair.d.stop().await?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let (reps, tls) = parse_args()?;
    tokio::runtime::Runtime::new()?.block_on(run(reps, tls))
}
