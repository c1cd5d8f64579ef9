//! Feeds arbitrary bytes to the decoders of what crosses the replication link and what is read
//! back from the cache journal: a whole wire frame (header, checksum, body, and every record a
//! records frame carries) and a single journal record. Both must return an error for anything
//! malformed and never panic.
#![no_main]

use ferry_appliance::core::{record, wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Decodes the frame header first, so the header decoder is fuzzed by this call too.
    let _ = wire::decode_frame(data);
    if let Ok((decoded, _links, used)) = record::decode_linked(data) {
        assert!(
            used <= data.len(),
            "a record claims more bytes than it was given"
        );
        assert!(decoded.payload.len() <= used);
    }
});
