//! Expert parallelism for the CPU model: routed experts sharded over rank
//! processes, dispatch and combine per MoE layer over TCP.
//!
//! Rank 0 (the worker) runs attention, the router and the shared expert,
//! and holds its own share of the routed experts ([`super::ExpertShard`]).
//! Each MoE layer it sends every other rank the hidden rows routed to the
//! experts that rank owns ([`Dispatcher`]), computes its own meanwhile, then
//! reads the ranks' outputs back in rank order; the model combines them in
//! each token's top-k order ([`super::model`]). A rank `r > 0` runs
//! [`serve`]: it holds only its experts and answers those requests.
//!
//! Wire format (little-endian), one request then one reply at a time on a
//! connection:
//! - request: magic `RSEP` (u32), layer (u32), batch count (u32), then per
//!   batch: expert (u32), rows (u32), `rows * hidden` f32;
//! - reply: status (u8: 0 ok, 1 error); ok: batch count (u32), then per
//!   batch: value count (u32) and the f32 values; error: length (u32) and
//!   UTF-8 text.
//!
//! Links are mutual TLS unless the process runs `--insecure-plaintext`:
//! rank 0 dials through its [`ClientTls`] (synchronously: a rustls stream
//! over a blocking socket), ranks > 0 accept through their [`ServerTls`],
//! the handshake done before the first request is read.
//!
//! Invariants: an expert's output depends only on its input rows and
//! weights, never on which rank computed it, and rows travel as exact f32
//! bits, so every EP width gives bit-identical results. A failed exchange
//! drops that connection; the next step reconnects.

use std::future::Future;
use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use proto::tls::{BlockingClientStream, BlockingServerStream, ClientTls, ServerTls};

use super::model::{ExpertBatch, Experts, Model};
use super::weights::ExpertShard;
use super::{CpuError, CpuResult};

const MAGIC: u32 = u32::from_le_bytes(*b"RSEP");
/// Most batches one request may carry (one per expert at most).
const MAX_BATCHES: u32 = 1 << 16;
/// Most f32 values one batch may carry (256 MiB).
const MAX_VALUES: u64 = 1 << 26;
/// How long rank 0 keeps trying to reach a peer that is not up yet.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);
/// Deadline of one exchange with a peer.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn put_u32(w: &mut impl Write, v: u32) -> std::io::Result<()> {
    w.write_all(&v.to_le_bytes())
}

fn get_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn put_f32s(w: &mut impl Write, values: &[f32]) -> std::io::Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    w.write_all(&bytes)
}

fn get_f32s(r: &mut impl Read, n: u64) -> std::io::Result<Vec<f32>> {
    if n > MAX_VALUES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{n} values exceed the frame limit"),
        ));
    }
    let mut bytes = vec![0u8; n as usize * 4];
    r.read_exact(&mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn invalid(why: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, why)
}

/// Writes a dispatch request.
pub fn write_request(
    w: &mut impl Write,
    layer: usize,
    batches: &[&ExpertBatch],
) -> std::io::Result<()> {
    put_u32(w, MAGIC)?;
    put_u32(w, layer as u32)?;
    put_u32(w, batches.len() as u32)?;
    for b in batches {
        put_u32(w, b.expert as u32)?;
        put_u32(w, b.rows as u32)?;
        put_f32s(w, &b.input)?;
    }
    w.flush()
}

/// Reads a dispatch request of rows `hidden` wide.
pub fn read_request(
    r: &mut impl Read,
    hidden: usize,
) -> std::io::Result<(usize, Vec<ExpertBatch>)> {
    if get_u32(r)? != MAGIC {
        return Err(invalid("not an expert dispatch request".into()));
    }
    let layer = get_u32(r)? as usize;
    let n = get_u32(r)?;
    if n > MAX_BATCHES {
        return Err(invalid(format!("{n} batches exceed the frame limit")));
    }
    let mut batches = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let expert = get_u32(r)? as usize;
        let rows = get_u32(r)? as usize;
        let input = get_f32s(r, rows as u64 * hidden as u64)?;
        batches.push(ExpertBatch {
            expert,
            input,
            rows,
        });
    }
    Ok((layer, batches))
}

/// Writes the reply to a request.
pub fn write_reply(
    w: &mut impl Write,
    reply: &Result<Vec<Vec<f32>>, String>,
) -> std::io::Result<()> {
    match reply {
        Ok(outputs) => {
            w.write_all(&[0])?;
            put_u32(w, outputs.len() as u32)?;
            for o in outputs {
                put_u32(w, o.len() as u32)?;
                put_f32s(w, o)?;
            }
        }
        Err(why) => {
            w.write_all(&[1])?;
            put_u32(w, why.len() as u32)?;
            w.write_all(why.as_bytes())?;
        }
    }
    w.flush()
}

/// Reads a reply: the outputs, or the peer's error text.
pub fn read_reply(r: &mut impl Read) -> std::io::Result<Result<Vec<Vec<f32>>, String>> {
    let mut status = [0u8];
    r.read_exact(&mut status)?;
    let n = get_u32(r)?;
    if status[0] != 0 {
        let mut text = vec![0u8; n.min(1 << 16) as usize];
        r.read_exact(&mut text)?;
        return Ok(Err(String::from_utf8_lossy(&text).into_owned()));
    }
    if n > MAX_BATCHES {
        return Err(invalid(format!("{n} outputs exceed the frame limit")));
    }
    let mut outputs = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let len = get_u32(r)?;
        outputs.push(get_f32s(r, u64::from(len))?);
    }
    Ok(Ok(outputs))
}

/// One peer rank's connection, opened on first use.
#[derive(Debug)]
struct Peer {
    rank: usize,
    addr: String,
    tls: ClientTls,
    conn: Mutex<Option<BlockingClientStream>>,
}

impl Peer {
    fn lock(&self) -> MutexGuard<'_, Option<BlockingClientStream>> {
        // A panic mid-exchange leaves at worst a stale stream, which the
        // next exchange's error drops.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn error(&self, why: impl std::fmt::Display) -> CpuError {
        CpuError::Peer {
            rank: self.rank,
            why: format!("{}: {why}", self.addr),
        }
    }

    /// Connects (TCP_NODELAY, [`IO_TIMEOUT`] on every read and write, the
    /// TLS handshake done), retrying while the peer may still be starting.
    fn connect(&self) -> CpuResult<BlockingClientStream> {
        let deadline = Instant::now() + CONNECT_PATIENCE;
        loop {
            match self.tls.dial_blocking(&self.addr, IO_TIMEOUT) {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() >= deadline => return Err(self.error(e)),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// Rank 0's view of the experts: its own shard plus its peers'.
#[derive(Debug)]
pub struct Dispatcher {
    model: Arc<Model>,
    peers: Vec<Peer>,
}

impl Dispatcher {
    /// Dispatches to `peers` (`host:port` of ranks 1.., in rank order)
    /// dialled through `tls`; `model` must hold rank 0's shard of
    /// `peers.len() + 1`.
    pub fn new(model: Arc<Model>, peers: &[String], tls: &ClientTls) -> CpuResult<Self> {
        let want = ExpertShard {
            rank: 0,
            ranks: peers.len() + 1,
        };
        if model.shard() != want {
            return Err(CpuError::Peer {
                rank: 0,
                why: format!("holds shard {:?}, expected {want:?}", model.shard()),
            });
        }
        Ok(Self {
            model,
            peers: peers
                .iter()
                .enumerate()
                .map(|(i, addr)| Peer {
                    rank: i + 1,
                    addr: addr
                        .trim_start_matches("https://")
                        .trim_start_matches("http://")
                        .to_string(),
                    tls: tls.clone(),
                    conn: Mutex::new(None),
                })
                .collect(),
        })
    }

    fn ranks(&self) -> usize {
        self.peers.len() + 1
    }

    /// Sends `batches` to `peer` and reads its outputs (one exchange).
    fn exchange_start(&self, peer: &Peer, layer: usize, batches: &[&ExpertBatch]) -> CpuResult<()> {
        let mut conn = peer.lock();
        if conn.is_none() {
            *conn = Some(peer.connect()?);
        }
        let Some(stream) = conn.as_mut() else {
            return Err(peer.error("no connection"));
        };
        let sent = write_request(&mut BufWriter::new(&mut *stream), layer, batches);
        if let Err(e) = sent {
            *conn = None;
            return Err(peer.error(e));
        }
        Ok(())
    }

    fn exchange_finish(&self, peer: &Peer, expect: usize) -> CpuResult<Vec<Vec<f32>>> {
        let mut conn = peer.lock();
        let Some(stream) = conn.as_mut() else {
            return Err(peer.error("no connection"));
        };
        let reply = read_reply(&mut BufReader::new(&mut *stream));
        match reply {
            Ok(Ok(outputs)) if outputs.len() == expect => Ok(outputs),
            Ok(Ok(outputs)) => {
                *conn = None;
                Err(peer.error(format!("{} outputs for {expect} batches", outputs.len())))
            }
            Ok(Err(why)) => Err(peer.error(why)),
            Err(e) => {
                *conn = None;
                Err(peer.error(e))
            }
        }
    }
}

impl Experts for Dispatcher {
    fn run(&self, layer: usize, batches: Vec<ExpertBatch>) -> CpuResult<Vec<Vec<f32>>> {
        let experts = self.model.config().n_routed_experts;
        let ranks = self.ranks();
        let owner: Vec<usize> = batches
            .iter()
            .map(|b| ExpertShard::owner(experts, ranks, b.expert))
            .collect();
        // Dispatch: every peer with work gets its rows before rank 0 starts
        // on its own, so the ranks compute at the same time.
        let mut busy = Vec::new();
        for peer in &self.peers {
            let mine: Vec<&ExpertBatch> = batches
                .iter()
                .zip(&owner)
                .filter(|(_, o)| **o == peer.rank)
                .map(|(b, _)| b)
                .collect();
            if !mine.is_empty() {
                self.exchange_start(peer, layer, &mine)?;
                busy.push((peer, mine.len()));
            }
        }
        let local: Vec<ExpertBatch> = batches
            .iter()
            .zip(&owner)
            .filter(|(_, o)| **o == 0)
            .map(|(b, _)| b.clone())
            .collect();
        let local_out = self.model.run_local(layer, local);
        // Combine: read every peer's outputs (even after a local failure, so
        // no reply is left on a connection), then put them back in order.
        let mut remote: Vec<CpuResult<Vec<Vec<f32>>>> = busy
            .iter()
            .map(|(peer, n)| self.exchange_finish(peer, *n))
            .collect();
        let mut per_rank: Vec<std::vec::IntoIter<Vec<f32>>> = vec![local_out?.into_iter()];
        for peer in &self.peers {
            let outputs = match busy.iter().position(|(p, _)| p.rank == peer.rank) {
                Some(i) => std::mem::replace(&mut remote[i], Ok(Vec::new()))?,
                None => Vec::new(),
            };
            per_rank.push(outputs.into_iter());
        }
        owner
            .iter()
            .map(|&o| {
                per_rank[o].next().ok_or_else(|| CpuError::Peer {
                    rank: o,
                    why: "returned too few outputs".into(),
                })
            })
            .collect()
    }
}

/// Answers one connection's dispatch requests until it closes. Requests
/// and replies alternate, so one buffered reader serves the connection and
/// each reply is written (and flushed) through it.
fn answer(stream: BlockingServerStream, model: &Model) -> std::io::Result<()> {
    let hidden = model.config().hidden_size;
    let mut io = BufReader::new(stream);
    loop {
        let (layer, batches) = match read_request(&mut io, hidden) {
            Ok(req) => req,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let reply = model.run_local(layer, batches).map_err(|e| e.to_string());
        write_reply(&mut BufWriter::new(io.get_mut()), &reply)?;
    }
}

/// Serves rank `model.shard().rank`'s experts on `listener` until
/// `shutdown` resolves, through `tls` when given (a client without a
/// certificate of the CA is dropped before it is read); each connection
/// is answered on a blocking thread.
pub async fn serve(
    listener: tokio::net::TcpListener,
    model: Arc<Model>,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        let (model, tls) = (Arc::clone(&model), tls.clone());
        tokio::task::spawn_blocking(move || {
            let stream = match &tls {
                None => BlockingServerStream::Plain(stream),
                Some(tls) => match tls.accept_blocking(stream, IO_TIMEOUT) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "expert link: TLS handshake refused");
                        return;
                    }
                },
            };
            if let Err(e) = answer(stream, &model) {
                tracing::warn!(%peer, error = %e, "expert dispatch connection failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::config::ModelConfig;
    use crate::cpu::model::KvCache;
    use crate::cpu::weights::Weights;

    #[test]
    fn frames_round_trip() {
        let b = ExpertBatch {
            expert: 5,
            input: vec![1.5, -2.0, f32::MIN_POSITIVE, 3.25],
            rows: 2,
        };
        let mut buf = Vec::new();
        write_request(&mut buf, 3, &[&b]).expect("write");
        let (layer, back) = read_request(&mut buf.as_slice(), 2).expect("read");
        assert_eq!((layer, back), (3, vec![b]));
        let mut buf = Vec::new();
        write_reply(&mut buf, &Err("no expert 9".into())).expect("write");
        assert_eq!(
            read_reply(&mut buf.as_slice()).expect("read"),
            Err("no expert 9".into())
        );
        assert!(read_request(&mut &b"XXXX"[..], 2).is_err());
    }

    fn greedy(experts: &dyn Experts, model: &Model, prompt: &[u32]) -> Vec<u32> {
        let mut cache = KvCache::default();
        let mut next = model.forward(prompt, &mut cache, experts).expect("prefill");
        let mut out = vec![next];
        for _ in 0..6 {
            next = model.forward(&[next], &mut cache, experts).expect("decode");
            out.push(next);
        }
        out
    }

    /// EP over real sockets in one process: ranks 1..n serve their shards,
    /// rank 0 dispatches; the tokens equal the single-process model's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sharded_experts_give_identical_tokens() {
        let config = ModelConfig::small(11);
        let weights = Weights::generate(&config).expect("weights");
        let prompt: Vec<u32> = b"expert parallel bytes"
            .iter()
            .map(|&b| u32::from(b))
            .collect();
        let whole = Model::new(&weights, ExpertShard::ALL).expect("model");
        let expected = greedy(&whole, &whole, &prompt);
        for ranks in [2, 4] {
            let mut peers = Vec::new();
            let (stop, stopped) = tokio::sync::watch::channel(false);
            for rank in 1..ranks {
                let shard = ExpertShard { rank, ranks };
                let model = Arc::new(Model::new(&weights, shard).expect("shard"));
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                peers.push(listener.local_addr().expect("addr").to_string());
                let mut stopped = stopped.clone();
                tokio::spawn(serve(listener, model, None, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                }));
            }
            let shard = ExpertShard { rank: 0, ranks };
            let model = Arc::new(Model::new(&weights, shard).expect("rank 0"));
            let d = Dispatcher::new(Arc::clone(&model), &peers, &ClientTls::plaintext())
                .expect("dispatcher");
            let p = prompt.clone();
            let got = tokio::task::spawn_blocking(move || greedy(&d, &model, &p))
                .await
                .expect("join");
            assert_eq!(got, expected, "EP={ranks}");
            let _ = stop.send(true);
        }
    }
}
