//! Feed arbitrary server messages to the SCRAM client of the native producer: the
//! server-first parser (input before the first 0xFF byte, after a valid nonce prefix when the
//! selector byte is odd, so the salt and iteration parsers are reached), then the
//! server-final check (the rest).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qanat_scram::{ScramClient, ScramMechanism};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let mechanism = if selector & 2 == 0 {
        ScramMechanism::Sha256
    } else {
        ScramMechanism::Sha512
    };
    let (first, last) = match rest.iter().position(|b| *b == 0xFF) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let client = ScramClient::with_nonce(mechanism, "u", b"secret", "cn");
    let mut server_first = Vec::new();
    if selector & 1 == 1 {
        server_first.extend_from_slice(b"r=cnsn,");
    }
    server_first.extend_from_slice(first);
    if let Ok((_, check)) = client.client_final(&server_first) {
        let _ = check.verify(last);
    }
});
