//! Feed arbitrary text to the push-subscription filter parser, and evaluate what parses.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(filter) = qanat_broker::filter::Filter::parse(text) {
            let _ = filter.matches(&[("app", Some(b"shop")), ("event", None)]);
        }
    }
});
