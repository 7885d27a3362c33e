//! Text <-> token ids for the OpenAI surface: the [`Tokenizer`] seam (a real
//! Hugging Face tokenizer plugs in here with the CPU backend), the simulated
//! backend's [`SimTokenizer`], and [`IncrementalDecoder`], which turns a
//! stream of ids into text pieces for any tokenizer.
//!
//! [`SimTokenizer`] is deterministic and needs no files:
//!
//! - **Encoding** walks the text once. Where a word of its fixed vocabulary
//!   ([`WORDS`]) starts (at the text's start or after whitespace) and is
//!   followed by one space, `word␠` is one token whose id is the word's index.
//!   Anything else is cut into pieces of at most 4 bytes, on UTF-8 character
//!   boundaries and ending after any whitespace character; a piece's id is
//!   `WORDS.len() + fnv1a(piece) % (vocab - WORDS.len())`. So ordinary text
//!   costs about one token per 4 bytes, as with real BPE vocabularies.
//! - **Decoding** maps every id, generated or not, to `WORDS[id % WORDS.len()]`
//!   followed by a space, so synthetic output reads as words.
//!
//! Invariants: text made of vocabulary words each followed by one space
//! round-trips exactly; decoded output re-encodes to as many tokens as it was
//! decoded from; an id below `vocab_size()` always decodes.

use std::collections::HashMap;
use std::fmt::Debug;

/// The fixed vocabulary [`SimTokenizer`] decodes into (every entry unique,
/// lowercase ASCII, no whitespace).
pub const WORDS: [&str; 128] = [
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at",
    "from", "it", "this", "be", "are", "or", "an", "not", "have", "has", "but", "which", "their",
    "all", "were", "can", "more", "one", "other", "been", "also", "its", "new", "into", "than",
    "first", "time", "only", "two", "after", "some", "may", "over", "most", "there", "such",
    "about", "these", "when", "between", "made", "used", "many", "then", "them", "so", "like",
    "would", "up", "out", "they", "we", "you", "our", "rack", "model", "token", "prefill",
    "decode", "cache", "expert", "layer", "batch", "queue", "worker", "pool", "memory", "speed",
    "light", "river", "stone", "cloud", "garden", "window", "signal", "number", "simple", "quiet",
    "bright", "early", "small", "large", "green", "blue", "warm", "cold", "fast", "slow", "open",
    "close", "north", "south", "east", "west", "morning", "evening", "road", "bridge", "paper",
    "music", "story", "answer", "question", "reason", "system", "network", "engine", "value",
    "order", "field", "point", "line", "space", "world",
];

/// Turns text into token ids and back.
pub trait Tokenizer: Send + Sync + Debug + 'static {
    /// Token ids of `text` (no special tokens added).
    fn encode(&self, text: &str) -> Vec<u32>;
    /// The text of `ids`, concatenated. Must be prefix-consistent
    /// (`decode(a)` is a prefix of `decode(a ++ b)` once `a` ends on a whole
    /// character) for [`IncrementalDecoder`] to stream it.
    fn decode(&self, ids: &[u32]) -> String;
    /// Ids are `0..vocab_size()`; prompts of other ids are refused.
    fn vocab_size(&self) -> u32;
}

/// The simulated backend's tokenizer (see the module documentation).
#[derive(Debug, Clone)]
pub struct SimTokenizer {
    vocab: u32,
    index: HashMap<&'static str, u32>,
}

impl SimTokenizer {
    /// A tokenizer over ids `0..vocab` (the model's vocabulary size; at
    /// least [`WORDS`]`.len()` is used).
    pub fn new(vocab: u32) -> Self {
        let index = WORDS
            .iter()
            .enumerate()
            .map(|(i, w)| (*w, i as u32))
            .collect();
        Self {
            vocab: vocab.max(WORDS.len() as u32),
            index,
        }
    }

    fn words() -> u32 {
        WORDS.len() as u32
    }

    /// The id of a non-vocabulary piece.
    fn piece_id(&self, piece: &str) -> u32 {
        let hash = piece.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        let spare = self.vocab - Self::words();
        if spare == 0 {
            hash % self.vocab
        } else {
            Self::words() + hash % spare
        }
    }

    /// The vocabulary word (and its id) starting `rest`, when one is
    /// followed by a space.
    fn word_at(&self, rest: &str) -> Option<(u32, usize)> {
        let end = rest.find(' ')?;
        self.index.get(&rest[..end]).map(|&id| (id, end + 1))
    }
}

/// Length in bytes of the next non-vocabulary piece of `rest`: at most 4
/// bytes, whole characters (at least one), ending after any whitespace.
fn piece_len(rest: &str) -> usize {
    let mut len = 0;
    for c in rest.chars() {
        if len > 0 && len + c.len_utf8() > 4 {
            break;
        }
        len += c.len_utf8();
        if c.is_whitespace() {
            break;
        }
    }
    len
}

impl Tokenizer for SimTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 4 + 1);
        let mut at = 0;
        let mut word_start = true;
        while at < text.len() {
            let rest = &text[at..];
            let (id, len) = match word_start.then(|| self.word_at(rest)).flatten() {
                Some(word) => word,
                None => {
                    let len = piece_len(rest);
                    (self.piece_id(&rest[..len]), len)
                }
            };
            ids.push(id);
            at += len;
            word_start = text[..at].ends_with(char::is_whitespace);
        }
        ids
    }

    fn decode(&self, ids: &[u32]) -> String {
        let mut text = String::with_capacity(ids.len() * 6);
        for &id in ids {
            text.push_str(WORDS[(id % Self::words()) as usize]);
            text.push(' ');
        }
        text
    }

    fn vocab_size(&self) -> u32 {
        self.vocab
    }
}

/// Turns ids arriving one batch at a time into text pieces: a piece is
/// released once the ids so far decode to more text that does not end in
/// an incomplete character (U+FFFD), so a multi-byte character split across
/// tokens is never emitted half. Only a window of recent ids is re-decoded.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the ids decoded as context for the next piece.
    prefix: usize,
    /// End of the ids whose text was already released.
    read: usize,
}

impl IncrementalDecoder {
    /// Adds `ids`; returns the text they complete (possibly empty).
    pub fn push(&mut self, tokenizer: &dyn Tokenizer, ids: &[u32]) -> String {
        self.ids.extend_from_slice(ids);
        let prefix_text = tokenizer.decode(&self.ids[self.prefix..self.read]);
        let text = tokenizer.decode(&self.ids[self.prefix..]);
        if text.len() > prefix_text.len()
            && !text.ends_with('\u{FFFD}')
            && let Some(new) = text.get(prefix_text.len()..)
        {
            let new = new.to_owned();
            self.prefix = self.read;
            self.read = self.ids.len();
            return new;
        }
        String::new()
    }

    /// Whatever text is still held back (at the end of the stream).
    pub fn flush(&mut self, tokenizer: &dyn Tokenizer) -> String {
        let prefix_text = tokenizer.decode(&self.ids[self.prefix..self.read]);
        let text = tokenizer.decode(&self.ids[self.prefix..]);
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        text.get(prefix_text.len()..).unwrap_or_default().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOCAB: u32 = 129_280;

    #[test]
    fn vocabulary_words_round_trip_as_one_token_each() {
        let t = SimTokenizer::new(VOCAB);
        let text = "the model can decode one token at a time ";
        let ids = t.encode(text);
        // "a" is not a vocabulary word: "a " is one 2-byte piece.
        assert_eq!(ids.len(), 9, "{ids:?}");
        assert_eq!(ids[0], 0);
        let words = "the model can decode one token at time ";
        assert_eq!(t.decode(&t.encode(words)), words);
    }

    #[test]
    fn other_text_costs_about_a_token_per_four_bytes() {
        let t = SimTokenizer::new(VOCAB);
        assert_eq!(t.encode("Hello, World!").len(), 4); // "Hell" "o, " "Worl" "d!"
        let prose = "Disaggregated serving splits prefill and decode across pools. ".repeat(20);
        let n = t.encode(&prose).len();
        let ratio = prose.len() as f64 / n as f64;
        assert!((3.0..=5.0).contains(&ratio), "{ratio} bytes/token");
        assert!(t.encode(&prose).iter().all(|&id| id < VOCAB));
        assert_eq!(t.encode(""), Vec::<u32>::new());
    }

    #[test]
    fn multibyte_text_is_cut_on_character_boundaries() {
        let t = SimTokenizer::new(VOCAB);
        // 3-byte characters: one per piece; a 4-byte emoji alone.
        assert_eq!(t.encode("日本語").len(), 3);
        assert_eq!(t.encode("🦀🦀").len(), 2);
        assert_eq!(t.encode("é🦀").len(), 2);
    }

    #[test]
    fn any_id_decodes_to_a_word_and_output_re_encodes_to_its_length() {
        let t = SimTokenizer::new(VOCAB);
        let ids: Vec<u32> = (0..200).map(|i| i * 7919 % VOCAB).collect();
        let text = t.decode(&ids);
        assert!(
            text.split(' ')
                .filter(|w| !w.is_empty())
                .all(|w| WORDS.contains(&w))
        );
        assert_eq!(t.encode(&text).len(), ids.len());
        assert_eq!(t.decode(&t.encode(&text)), text);
    }

    #[test]
    fn encoding_is_deterministic() {
        let a = SimTokenizer::new(VOCAB);
        let b = SimTokenizer::new(VOCAB);
        let text = "Same input, same ids: 42 ✓";
        assert_eq!(a.encode(text), b.encode(text));
        assert_ne!(a.encode("abcd"), a.encode("abce"));
    }

    /// A byte-level tokenizer: one id per byte, so a character may span ids.
    #[derive(Debug)]
    struct Bytes;

    impl Tokenizer for Bytes {
        fn encode(&self, text: &str) -> Vec<u32> {
            text.bytes().map(u32::from).collect()
        }
        fn decode(&self, ids: &[u32]) -> String {
            String::from_utf8_lossy(&ids.iter().map(|&b| b as u8).collect::<Vec<_>>()).into_owned()
        }
        fn vocab_size(&self) -> u32 {
            256
        }
    }

    #[test]
    fn incremental_decoding_never_splits_a_character() {
        let text = "añ🦀b";
        let ids = Bytes.encode(text);
        let mut d = IncrementalDecoder::default();
        let pieces: Vec<String> = ids.iter().map(|&id| d.push(&Bytes, &[id])).collect();
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(pieces.concat() + &d.flush(&Bytes), text);
        // The crab's four bytes come out together, with its last byte.
        assert_eq!(pieces[6], "🦀");
    }

    #[test]
    fn incremental_decoding_matches_whole_decoding() {
        let t = SimTokenizer::new(VOCAB);
        let ids: Vec<u32> = (0..50).map(|i| i * 104_729 % VOCAB).collect();
        let mut d = IncrementalDecoder::default();
        let mut out: String = ids.chunks(3).map(|c| d.push(&t, c)).collect();
        out.push_str(&d.flush(&t));
        assert_eq!(out, t.decode(&ids));
    }
}
