//! Feed arbitrary bytes to the broker's request decoder (a frame without its length prefix):
//! it must never panic or allocate from a forged length.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = qanat_broker::server::decode_request(bytes::Bytes::copy_from_slice(data));
});
