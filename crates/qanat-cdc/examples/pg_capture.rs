//! Capture rate of the PostgreSQL source alone, for `bench/cdc_postgres.sh`: streams an
//! existing slot (`--snapshot never` semantics), acknowledges every commit at once, and
//! after `ROWS` row events prints one JSON line: rows, seconds, rows/s, and the lag
//! (arrival − commit time) p50/p99/max in milliseconds.
//!
//! `pg_capture URL SLOT PUBLICATION ROWS`

use std::time::Instant;

use qanat_cdc::postgres::{PostgresConfig, PostgresSource, SnapshotMode};
use qanat_cdc::source::{Change, Source};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, slot, publication, rows] = args.as_slice() else {
        return Err("usage: pg_capture URL SLOT PUBLICATION ROWS".into());
    };
    let target: u64 = rows.parse()?;
    let mut config = PostgresConfig::new(url.as_str(), "bench");
    config.slot = Some(slot.clone());
    config.publication = Some(publication.clone());
    config.snapshot = SnapshotMode::Never;
    let mut source = PostgresSource::open(&config, None).await?;
    println!("ready to stream");
    let mut seen = 0u64;
    let mut started: Option<Instant> = None;
    let mut lags: Vec<i64> = Vec::with_capacity(target as usize);
    while seen < target {
        match source.next().await? {
            Change::Row(event) => {
                started.get_or_insert_with(Instant::now);
                seen += 1;
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_millis() as i64;
                lags.push(now_ms - event.source.ts_ms);
            }
            Change::Commit {
                resume: Some(resume),
                ..
            } => source.acknowledge(&resume).await?,
            _ => {}
        }
    }
    let seconds = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    lags.sort_unstable();
    let at = |q: f64| lags[((lags.len() - 1) as f64 * q) as usize];
    println!(
        "{{\"rows\":{seen},\"seconds\":{seconds:.3},\"rows_per_s\":{:.0},\"lag_p50_ms\":{},\"lag_p99_ms\":{},\"lag_max_ms\":{}}}",
        seen as f64 / seconds.max(1e-9),
        at(0.5),
        at(0.99),
        at(1.0)
    );
    Ok(())
}
