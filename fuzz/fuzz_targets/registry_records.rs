//! Registry values: whatever bytes sit under a registry key, decoding them
//! as any record type either fails with an error or yields a record that
//! survives its own encoding unchanged; it never panics. Also checks the
//! key check: a record decodes under its own key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::records::{AgentRecord, LoadReport, RankRecord, RegistryRecord, WorkerRecord};

fn round_trip<R: RegistryRecord + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    if let Ok(record) = R::decode_bytes(bytes) {
        let encoded = record.encode();
        let again = R::decode_bytes(&encoded).expect("a record decodes from its own encoding");
        assert_eq!(again, record);
        let key = record.key();
        let under_key = R::decode(&key, &encoded).expect("a record decodes under its own key");
        assert_eq!(under_key, record);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => round_trip::<AgentRecord>(bytes),
        1 => round_trip::<WorkerRecord>(bytes),
        2 => round_trip::<RankRecord>(bytes),
        _ => round_trip::<LoadReport>(bytes),
    }
});
