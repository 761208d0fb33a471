//! Feed arbitrary bytes to the RecordBatch v2 validator: it must never panic, and whatever it
//! accepts must survive offset assignment and LogAppendTime with a valid CRC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qanat_log::batch::{self, BatchHeader, BatchIter};

fuzz_target!(|data: &[u8]| {
    let _ = BatchHeader::parse_checked(data, 0);
    for item in BatchIter::new(data) {
        let _ = item;
    }
    if let Ok(summary) = batch::validate_batches(data) {
        let mut buf = data.to_vec();
        for b in &summary.batches {
            let slice = &mut buf[b.position..b.position + b.len];
            batch::set_base_offset(slice, 1 << 40).unwrap_or(());
            batch::set_log_append_time(slice, 123).unwrap_or(());
        }
        assert!(batch::validate_batches(&buf).is_ok());
    }
});
