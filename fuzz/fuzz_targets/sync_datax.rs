//! Feed arbitrary bytes to the DataX job translator of `qanat sync run --datax`: it must never
//! panic, and a job it accepts must pass the job file's own validation or fail it with an
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(job) = qanat_sync::datax::parse(text, "fuzz.json") {
        let _ = job.job.validate();
    }
});
