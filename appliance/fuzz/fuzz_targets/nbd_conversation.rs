//! Feeds arbitrary bytes to the NBD server codec as one client connection would: the fixed
//! newstyle handshake, then request headers with their write payloads skipped. The codec must
//! neither panic nor stall, whatever the bytes and however they are split into reads.
//!
//! The first byte picks the read size (1–128 bytes) and whether the bytes follow a valid
//! handshake (high bit set), so that most inputs reach the request decoder and validator.
#![no_main]

use ferry_appliance::core::nbd::client::{encode_go_data, encode_option, run_conversation};
use ferry_appliance::core::nbd::{
    ExportInfo, ServerConfig, INFO_BLOCK_SIZE, OPT_GO, REQUEST_MAGIC,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let chunk_bytes = usize::from(control & 0x7f) + 1;
    let mut input = Vec::with_capacity(rest.len() + 64);
    if control & 0x80 != 0 {
        input.extend_from_slice(&1u32.to_be_bytes());
        input.extend(encode_option(
            OPT_GO,
            &encode_go_data("", &[INFO_BLOCK_SIZE]),
        ));
        input.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    input.extend_from_slice(rest);
    let config = ServerConfig::new(vec![ExportInfo {
        name: "web-1/os".into(),
        size_bytes: 1 << 20,
        description: "fuzzed export".into(),
    }]);
    run_conversation(config, &input, chunk_bytes);
});
