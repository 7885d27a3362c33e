//! KV-transfer framing: a peer's arbitrary sequence of chunks (offsets,
//! lengths, last marks) against a handle's size. The assembler never
//! panics or over-allocates, and accepts a KV only when the chunks tile it
//! exactly, in order, ending with the one marked last.
#![no_main]

use engine::kv::Assembler;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    // The handle's size: any u64, so absurd claims are exercised too.
    let expected = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let mut kv = Assembler::new(expected);
    let mut sent = 0u64;
    let mut marked_last = false;
    // Each chunk: offset delta (i8: back, same, forward), length (u8), last.
    for chunk in data[8..].chunks_exact(3) {
        let offset = sent.wrapping_add_signed(i64::from(chunk[0] as i8));
        let bytes = vec![0xAB; usize::from(chunk[1])];
        let last = chunk[2] & 1 == 1;
        let fits = !marked_last && offset == sent && sent + bytes.len() as u64 <= expected;
        match kv.push(offset, &bytes, last) {
            Ok(()) => {
                assert!(fits, "accepted a chunk that does not fit");
                sent += bytes.len() as u64;
                marked_last = last;
            }
            Err(_) => {
                // A pull ends at its first refused chunk, as kv::receive does.
                assert!(!fits, "refused a chunk that fits");
                return;
            }
        }
    }
    match kv.finish() {
        Ok(whole) => {
            assert!(marked_last && sent == expected);
            assert_eq!(whole.len() as u64, expected);
        }
        Err(_) => assert!(!(marked_last && sent == expected)),
    }
});
