//! The simulated backend: step times from perfmodel (the functions the
//! planner uses), scaled sleeps, synthetic tokens and deterministic KV bytes.
//!
//! Invariant: every figure it returns is modelled time; only [`SimBackend::sleep`]
//! converts to wall time, dividing by the time scale.

use std::sync::Arc;
use std::time::Duration;

use perfmodel::steptime::StepModel;
use perfmodel::{Calibration, ModelProfile, Parallelism, Sku};

use crate::backend::{Backend, DecodeSeq, KvCache, PrefillChunk};
use crate::error::{Error, Result};
use crate::openai::{SimTokenizer, Tokenizer};

/// A worker's simulated GPUs.
#[derive(Debug, Clone)]
pub struct SimBackend {
    model: ModelProfile,
    step: StepModel,
    time_scale: f64,
    /// Calibration's fixed per-request latency outside model steps.
    request_overhead_ms: f64,
}

impl SimBackend {
    /// The backend of `model` on `sku` split by `parallelism`; `time_scale` is
    /// modelled seconds per wall second.
    pub fn new(
        model: ModelProfile,
        sku: Sku,
        parallelism: Parallelism,
        calibration: Calibration,
        time_scale: f64,
    ) -> Self {
        let request_overhead_ms = calibration.request_overhead_ms;
        let step = StepModel::new(&model, &sku.hardware(), parallelism, calibration);
        Self {
            model,
            step,
            time_scale,
            request_overhead_ms,
        }
    }

    /// Modelled seconds of one decode step over requests at these context
    /// lengths (one new token each).
    pub fn decode_step_seconds(&self, contexts: &[u32]) -> f64 {
        if contexts.is_empty() {
            return 0.0;
        }
        let n = contexts.len() as f64;
        let att = &self.model.attention;
        let (read, flops) = contexts.iter().fold((0.0, 0.0), |(r, f), &c| {
            let c = f64::from(c);
            (r + att.kv_read_bytes(c), f + att.flops_per_token(c))
        });
        self.step.decode(n, read / n, flops / n).total()
    }

    /// Modelled seconds of one prefill step over `(tokens in this step,
    /// full prompt length)` parts.
    pub fn prefill_step_seconds(&self, parts: &[(u32, u32)]) -> f64 {
        let tokens: f64 = parts.iter().map(|&(t, _)| f64::from(t)).sum();
        if tokens <= 0.0 {
            return 0.0;
        }
        let att = &self.model.attention;
        let flops: f64 = parts
            .iter()
            .map(|&(t, isl)| f64::from(t) * att.prefill_flops_per_token(f64::from(isl)))
            .sum();
        self.step
            .prefill(tokens, parts.len() as f64, flops / tokens)
            .total()
    }

    /// Sleeps the wall time that `modelled` seconds take at this time scale.
    pub async fn sleep(&self, modelled: f64) {
        let wall = self.wall(modelled);
        if !wall.is_zero() {
            tokio::time::sleep(wall).await;
        }
    }

    /// The wall time `modelled` seconds take at this time scale.
    pub fn wall(&self, modelled: f64) -> Duration {
        let wall = modelled / self.time_scale;
        if wall.is_finite() && wall > 0.0 {
            Duration::from_secs_f64(wall)
        } else {
            Duration::ZERO
        }
    }

    /// KV bytes of a prompt of `prompt_len` tokens (whole bytes).
    pub fn kv_bytes(&self, prompt_len: u32) -> u64 {
        self.model.attention.kv_bytes(f64::from(prompt_len)).ceil() as u64
    }

    /// The synthetic token at output `position` of `request_id`.
    pub fn token(&self, request_id: &str, position: u32) -> u32 {
        let vocab = u64::from(self.model.vocab.max(1));
        (mix(seed(request_id) ^ u64::from(position)) % vocab) as u32
    }
}

/// The scheduler's view: modelled step times, synthetic tokens, and KV bytes
/// synthesised on export ([`fill_kv`]) and checked on import ([`checksum`]).
impl Backend for SimBackend {
    fn prefill(&self, chunks: &mut [PrefillChunk]) -> Result<f64> {
        let parts: Vec<(u32, u32)> = chunks.iter().map(|c| (c.len, c.prompt_len)).collect();
        for c in chunks.iter_mut() {
            if c.start + c.len >= c.prompt_len {
                c.first_token = Some(self.token(&c.request_id, 0));
            }
        }
        Ok(self.prefill_step_seconds(&parts))
    }

    fn decode(&self, seqs: &mut [DecodeSeq]) -> Result<f64> {
        let contexts: Vec<u32> = seqs.iter().map(|s| s.context).collect();
        for s in seqs.iter_mut() {
            s.output = self.token(&s.request_id, s.index);
        }
        Ok(self.decode_step_seconds(&contexts))
    }

    fn wall(&self, seconds: f64) -> Duration {
        SimBackend::wall(self, seconds)
    }

    fn blocking(&self) -> bool {
        false
    }

    fn needs_tokens(&self) -> bool {
        false
    }

    fn kv_bytes(&self, prompt_len: u32) -> u64 {
        SimBackend::kv_bytes(self, prompt_len)
    }

    fn export_kv(&self, kv_id: &str, prompt_len: u32, _kv: KvCache) -> Result<Vec<u8>> {
        Ok(fill_kv(kv_id, SimBackend::kv_bytes(self, prompt_len)))
    }

    fn import_kv(&self, kv_id: &str, _prompt_len: u32, data: Vec<u8>) -> Result<KvCache> {
        if checksum(&data) == expected_checksum(kv_id, data.len() as u64) {
            Ok(KvCache::default())
        } else {
            Err(Error::KvCorrupt("checksum mismatch".into()))
        }
    }

    fn request_overhead(&self) -> Duration {
        self.wall(self.request_overhead_ms * 1e-3)
    }

    fn tokenizer(&self) -> Arc<dyn Tokenizer> {
        Arc::new(SimTokenizer::new(self.model.vocab))
    }
}

/// How far a busy worker may fall behind its modelled steps before it
/// restarts its pacing from now instead of running steps back to back.
pub const MAX_LAG: Duration = Duration::from_millis(50);

/// Paces a worker's back-to-back steps against the wall clock without drift.
///
/// A GPU runs a busy engine's steps back to back while the host prepares the
/// next one, so a step's wall time is its modelled time over the time scale
/// and nothing more. Sleeping that long after each step would add the loop's
/// own work between steps (streaming tokens out, taking commands) and the
/// timer's millisecond rounding to every step, which at a time scale of a
/// few shows up as a TPOT several percent slower than modelled. Instead each
/// step of a busy run ends a step's time after the previous step's planned
/// end. After idling, or when the host fell behind by more than [`MAX_LAG`],
/// pacing restarts from now.
#[derive(Debug, Default)]
pub struct Pacer {
    /// Planned wall end of the last step of the current busy run.
    last_end: Option<tokio::time::Instant>,
}

impl Pacer {
    /// Waits out one step of `wall` time.
    pub async fn step(&mut self, wall: Duration) {
        let now = tokio::time::Instant::now();
        let start = match self.last_end {
            Some(end) if end + MAX_LAG >= now => end,
            _ => now,
        };
        let end = start + wall;
        self.last_end = Some(end);
        tokio::time::sleep_until(end).await;
    }

    /// The worker ran out of work: the next step starts from its arrival.
    pub fn idle(&mut self) {
        self.last_end = None;
    }
}

/// FNV-1a of a string, the seed of everything synthetic about it.
fn seed(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Word `i` of the KV of the handle seeded `s`.
fn kv_word(s: u64, i: u64) -> u64 {
    mix(s ^ i)
}

/// `len` bytes of KV for the handle `kv_id`, a pure function of both: the
/// little-endian words `mix(seed ^ i)`, the last one cut to length.
pub fn fill_kv(kv_id: &str, len: u64) -> Vec<u8> {
    let s = seed(kv_id);
    let mut data = vec![0u8; len as usize];
    let mut words = data.chunks_exact_mut(8);
    let mut i = 0u64;
    for word in &mut words {
        word.copy_from_slice(&kv_word(s, i).to_le_bytes());
        i += 1;
    }
    let tail = words.into_remainder();
    let n = tail.len();
    tail.copy_from_slice(&kv_word(s, i).to_le_bytes()[..n]);
    data
}

/// One step of the checksum over word `i`.
fn fold_word(acc: u64, i: u64, word: u64) -> u64 {
    acc.rotate_left(5) ^ word.wrapping_add(i)
}

/// Order-sensitive checksum of KV bytes (8-byte little-endian words, the
/// last one zero-padded, position mixed in).
pub fn checksum(data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(8);
    let mut acc = 0u64;
    let mut i = 0u64;
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        acc = fold_word(acc, i, u64::from_le_bytes(w));
        i += 1;
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        let mut w = [0u8; 8];
        w[..tail.len()].copy_from_slice(tail);
        acc = fold_word(acc, i, u64::from_le_bytes(w));
    }
    acc
}

/// The checksum the holder's [`fill_kv`] produces for `kv_id` and `len`,
/// computed from the words directly (no buffer).
pub fn expected_checksum(kv_id: &str, len: u64) -> u64 {
    let s = seed(kv_id);
    let (full, tail) = (len / 8, len % 8);
    let mut acc = (0..full).fold(0u64, |acc, i| fold_word(acc, i, kv_word(s, i)));
    if tail > 0 {
        let mut w = kv_word(s, full).to_le_bytes();
        w[tail as usize..].fill(0);
        acc = fold_word(acc, full, u64::from_le_bytes(w));
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> SimBackend {
        let model = ModelProfile::builtin("deepseek-v4-pro").expect("builtin model");
        SimBackend::new(
            model,
            Sku::Gb200,
            Parallelism::Ep(8),
            Calibration::fitted(),
            100.0,
        )
    }

    #[test]
    fn decode_step_grows_with_batch_and_matches_perfmodel() {
        let b = backend();
        let one = b.decode_step_seconds(&[1000]);
        let many = b.decode_step_seconds(&[1000; 64]);
        assert!(one > 0.0 && many > one, "{one} {many}");
        let att = &b.model.attention;
        let direct = b
            .step
            .decode(1.0, att.kv_read_bytes(1000.0), att.flops_per_token(1000.0))
            .total();
        assert!((one - direct).abs() < 1e-12);
    }

    #[test]
    fn tokens_and_kv_are_deterministic() {
        let b = backend();
        assert_eq!(b.token("r1", 3), b.token("r1", 3));
        assert_ne!(
            (0..8).map(|p| b.token("r1", p)).collect::<Vec<_>>(),
            (0..8).map(|p| b.token("r2", p)).collect::<Vec<_>>()
        );
        let kv = fill_kv("kv-1", 1001);
        assert_eq!(kv.len(), 1001);
        assert_eq!(checksum(&kv), expected_checksum("kv-1", 1001));
        for len in [0, 1, 7, 8, 9, 64] {
            let kv = fill_kv("kv-3", len);
            assert_eq!(kv.len() as u64, len);
            assert_eq!(checksum(&kv), expected_checksum("kv-3", len), "len {len}");
            // A prefix of a longer fill: the words do not depend on length.
            assert_eq!(kv[..], fill_kv("kv-3", 80)[..len as usize]);
        }
        assert_ne!(checksum(&kv), expected_checksum("kv-2", 1001));
        let mut bad = kv.clone();
        bad[500] ^= 1;
        assert_ne!(checksum(&bad), checksum(&kv));
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_absorbs_work_between_steps_but_not_idle_time() {
        let step = Duration::from_millis(10);
        let mut pacer = Pacer::default();
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            pacer.step(step).await;
            // 3 ms of host work after every step.
            tokio::time::advance(Duration::from_millis(3)).await;
        }
        // Ten steps end 100 ms after the first began; the last step's 3 ms
        // of host work comes after it.
        assert_eq!(start.elapsed(), Duration::from_millis(103));
        // Idle, then a new busy run starts from now, not from the past.
        pacer.idle();
        tokio::time::advance(Duration::from_millis(500)).await;
        let resumed = tokio::time::Instant::now();
        pacer.step(step).await;
        assert_eq!(resumed.elapsed(), step);
        // A host stalled longer than MAX_LAG does not burst to catch up.
        tokio::time::advance(MAX_LAG * 2).await;
        let late = tokio::time::Instant::now();
        pacer.step(step).await;
        assert_eq!(late.elapsed(), step);
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_divides_by_time_scale() {
        let b = backend();
        let start = tokio::time::Instant::now();
        b.sleep(1.0).await;
        assert_eq!(start.elapsed(), Duration::from_millis(10));
    }
}
