//! The CPU model's byte-level tokenizer: one id per UTF-8 byte (256 ids).
//!
//! Invariants: `decode(encode(s)) == s` for every string; ids decode to
//! their bytes, a prefix ending inside a character showing U+FFFD (which
//! [`crate::openai::tokenizer::IncrementalDecoder`] holds back).

use crate::openai::Tokenizer;

/// Text as its UTF-8 bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl Tokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().map(|&id| (id & 0xff) as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn vocab_size(&self) -> u32 {
        256
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::tokenizer::IncrementalDecoder;

    #[test]
    fn round_trips_text_byte_by_byte() {
        let t = ByteTokenizer;
        let s = "rack → décode ok";
        let ids = t.encode(s);
        assert_eq!(ids.len(), s.len());
        assert_eq!(t.decode(&ids), s);
        // Streamed one id at a time, multi-byte characters arrive whole.
        let mut dec = IncrementalDecoder::default();
        let mut out = String::new();
        for id in &ids {
            out.push_str(&dec.push(&t, &[*id]));
        }
        out.push_str(&dec.flush(&t));
        assert_eq!(out, s);
    }
}
