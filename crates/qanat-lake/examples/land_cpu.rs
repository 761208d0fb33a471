//! CPU cost of the lander alone (no bus): N generated CDC envelopes shaped like the ones of
//! `bench/lake_land.sh`, pushed through [`Lander`] into a temporary root.
//!
//! `cargo run --release -p qanat-lake --example land_cpu -- 1000000`

use std::time::Instant;

use qanat_lake::land::{InputKind, Lander, Record, TableSpec};

fn envelope(i: u64) -> (String, String) {
    let base = 1_795_910_400_000u64;
    let id = i % 1_000_000;
    let key = format!("{{\"id\":{id}}}");
    let value = format!(
        "{{\"before\":null,\"after\":{{\"id\":{id},\"customer\":{},\"status\":\"{}\",\"amount\":\"{}.{:02}\",\
         \"note\":\"order {i} of the benchmark\",\"created_at\":\"2026-11-29T10:00:00Z\"}},\
         \"source\":{{\"version\":\"0.1.0\",\"connector\":\"mysql\",\"name\":\"bench\",\"ts_ms\":{},\"snapshot\":\"false\",\
         \"db\":\"bench\",\"table\":\"orders\",\"server_id\":1,\"file\":\"binlog.000001\",\"pos\":{},\"row\":0}},\
         \"op\":\"{}\",\"ts_ms\":{},\"transaction\":null}}",
        i % 5000,
        if i % 2 == 1 { "paid" } else { "new" },
        i % 1000,
        i % 100,
        base + i,
        4 + i * 300,
        if i.is_multiple_of(3) { "u" } else { "c" },
        base + i + 5
    );
    (key, value)
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage struct.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .map_or(Ok(1_000_000), |a| a.parse())?;
    let root = tempfile::tempdir()?;
    let records: Vec<(String, String)> = (0..n).map(envelope).collect();
    let mut lander = Lander::new(
        root.path(),
        TableSpec::new("bench.orders".parse()?, InputKind::Cdc),
    );
    lander.recover(&[("cdc.bench.orders".to_string(), 0)])?;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let mut rows = 0;
    for (offset, (key, value)) in records.iter().enumerate() {
        let rec = Record {
            topic: "cdc.bench.orders",
            partition: 0,
            offset: offset as i64,
            timestamp_ms: None,
            key: Some(key.as_bytes()),
            value: Some(value.as_bytes()),
            headers: &[],
        };
        for l in lander.push(&rec, t0)? {
            rows += l.rows;
        }
    }
    for l in lander.flush()? {
        rows += l.rows;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    println!(
        "{n} events, {rows} rows landed: {:.0} events/s wall, {:.2} CPU-s per million events",
        n as f64 / wall,
        cpu / (n as f64 / 1e6)
    );
    Ok(())
}
