//! What the benchmark sends: per-request input and output lengths drawn by
//! InferenceX's rule (uniform in 80–100% of nominal), synthetic prompts, and
//! Poisson inter-arrival gaps.
//!
//! Invariant: request `i` of a run with seed `s` is the same whatever the
//! load shape or scheduling order, because each request draws from its own
//! generator seeded by `(s, i)`. Prompts are random token ids (or random
//! words), so no two requests share a prefix and prefix caches do not flatter
//! the figures.

/// Token ids are drawn from this range: clear of the special tokens at the
/// bottom of common vocabularies and inside every vocabulary of 32k or more.
const TOKEN_IDS: (u64, u64) = (100, 30_000);

/// Characters per token when the prompt is text (chat).
const CHARS_PER_TOKEN: usize = 4;

/// SplitMix64: tiny, fast and fully determined by its seed; its output does
/// not change between crate versions, so a seed names a workload for good.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The generator of request `index` in a run seeded with `seed`.
    pub fn for_request(seed: u64, index: u64) -> Self {
        Self(mix(seed ^ mix(index.wrapping_add(0x5851_F42D_4C95_7F2D))))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `lo..=hi` (multiply-shift; bias below 2^-32 here).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        debug_assert!(lo <= hi);
        let span = u128::from(hi - lo) + 1;
        lo + ((u128::from(self.next_u64()) * span) >> 64) as u64
    }

    /// Uniform in (0, 1].
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Exponentially distributed with the given rate (mean 1 / rate).
    pub fn exponential(&mut self, rate: f64) -> f64 {
        -self.unit().ln() / rate
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// InferenceX's length rule: uniform in `[⌈0.8 n⌉, n]`.
pub fn draw_len(rng: &mut Rng, nominal: u32) -> u32 {
    let lo = (u64::from(nominal) * 4).div_ceil(5).max(1);
    rng.range(lo, u64::from(nominal).max(lo)) as u32
}

/// The prompt as sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Token ids, for `/v1/completions`: the input length is exact.
    Tokens(Vec<u32>),
    /// Text of about [`CHARS_PER_TOKEN`] characters a token, for chat: the
    /// server's tokenizer decides the real length.
    Text(String),
}

/// One request of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    pub index: u64,
    /// Drawn input length in tokens.
    pub input_len: u32,
    /// Drawn output length: sent as `max_tokens`.
    pub output_len: u32,
    pub prompt: Prompt,
}

/// How requests are drawn.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub isl: u32,
    pub osl: u32,
    pub seed: u64,
    /// Text prompts (chat) instead of token ids.
    pub text: bool,
}

impl Workload {
    pub fn request(&self, index: u64) -> RequestSpec {
        let mut rng = Rng::for_request(self.seed, index);
        let input_len = draw_len(&mut rng, self.isl);
        let output_len = draw_len(&mut rng, self.osl);
        let prompt = if self.text {
            Prompt::Text(words(&mut rng, input_len as usize * CHARS_PER_TOKEN))
        } else {
            Prompt::Tokens(
                (0..input_len)
                    .map(|_| rng.range(TOKEN_IDS.0, TOKEN_IDS.1 - 1) as u32)
                    .collect(),
            )
        };
        RequestSpec {
            index,
            input_len,
            output_len,
            prompt,
        }
    }

    /// The generator of arrival gaps, separate from every request's.
    pub fn arrivals(&self) -> Rng {
        Rng::new(mix(self.seed ^ 0xA5A5_5A5A_0F0F_F0F0))
    }
}

/// Random lowercase words, 2–8 letters, `chars` characters in all.
fn words(rng: &mut Rng, chars: usize) -> String {
    let mut text = String::with_capacity(chars);
    while text.len() < chars {
        if !text.is_empty() {
            text.push(' ');
        }
        for _ in 0..rng.range(2, 8) {
            text.push(char::from(b'a' + rng.range(0, 25) as u8));
        }
    }
    text.truncate(chars);
    if text.ends_with(' ') {
        text.pop();
        text.push('a');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_stay_in_80_to_100_percent() {
        let mut rng = Rng::new(7);
        let draws: Vec<u32> = (0..10_000).map(|_| draw_len(&mut rng, 1024)).collect();
        assert!(draws.iter().all(|&n| (820..=1024).contains(&n)));
        assert!(draws.contains(&820) && draws.contains(&1024));
        let mean = draws.iter().map(|&n| f64::from(n)).sum::<f64>() / draws.len() as f64;
        assert!((mean - 922.0).abs() < 3.0, "mean {mean}");
        assert_eq!(draw_len(&mut rng, 1), 1);
        assert!((4..=5).contains(&draw_len(&mut rng, 5)));
    }

    #[test]
    fn requests_are_determined_by_seed_and_index() {
        let w = Workload {
            isl: 256,
            osl: 32,
            seed: 42,
            text: false,
        };
        assert_eq!(w.request(3), w.request(3));
        assert_ne!(w.request(3), w.request(4));
        let other = Workload { seed: 43, ..w };
        assert_ne!(w.request(3), other.request(3));
        let r = w.request(9);
        let Prompt::Tokens(ids) = &r.prompt else {
            panic!("token prompt expected")
        };
        assert_eq!(ids.len(), r.input_len as usize);
        assert!(ids.iter().all(|&t| (100..30_000).contains(&t)));
        assert!((26..=32).contains(&r.output_len));
    }

    #[test]
    fn text_prompts_are_four_chars_a_token() {
        let w = Workload {
            isl: 100,
            osl: 10,
            seed: 1,
            text: true,
        };
        let r = w.request(0);
        let Prompt::Text(text) = &r.prompt else {
            panic!("text prompt expected")
        };
        assert_eq!(text.len(), r.input_len as usize * 4);
        assert!(text.chars().all(|c| c == ' ' || c.is_ascii_lowercase()));
        assert!(!text.starts_with(' ') && text.contains(' '));
    }

    #[test]
    fn exponential_gaps_have_the_requested_mean() {
        let mut rng = Rng::new(5);
        let n = 20_000;
        let mean = (0..n).map(|_| rng.exponential(4.0)).sum::<f64>() / f64::from(n);
        assert!((mean - 0.25).abs() < 0.01, "mean {mean}");
        assert!((0..1000).all(|_| rng.unit() > 0.0));
    }
}
