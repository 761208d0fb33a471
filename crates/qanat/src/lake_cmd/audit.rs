//! `qanat lake audit`: reconcile one table and day from the bus (optional: `--bootstrap`
//! and `--topic`, plus the CDC transaction topic) to the change log to the snapshot
//! partition. The judging is `qanat_lake::audit`; this reads the bus (assign + explicit
//! offsets, no consumer group state) and sets the exit status: 0 no difference, 1 a
//! difference (loss), 2 usage or reading error.
//!
//! The bus is read from the first record whose bus timestamp is at or after the day's start
//! less `--bus-slack-minutes` (ListOffsets by time), to the end. A change event is produced
//! after its source logged it, so its bus timestamp is not earlier than its `source.ts_ms`
//! but for clock skew between the source and the producer, which the slack covers; every
//! event of the day is therefore read without reading the days before it.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use qanat_lake::audit::{audit, BusEvent, TransactionCount};
use qanat_lake::layout::{Ds, TableLayout, TableName};
use qanat_lake::schema::{RowImage, Scalar};
use rdkafka::consumer::Consumer;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Deserialize;

#[derive(Args)]
pub struct AuditArgs {
    /// Lake root directory.
    #[arg(long, env = "QANAT_LAKE_ROOT")]
    root: PathBuf,
    /// `db.table`.
    #[arg(long)]
    table: String,
    /// The day, YYYYMMDD.
    #[arg(long)]
    ds: String,
    /// Read the table's change events of the day from the bus (needs --topic).
    #[arg(long)]
    bootstrap: Option<String>,
    #[command(flatten)]
    security: crate::kafka_security::SecurityArgs,
    /// The table's topic (repeatable).
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// The CDC transaction topic (BEGIN/END markers with per-table counts).
    #[arg(long)]
    transaction_topic: Option<String>,
    /// The table's name in the END markers' `data_collections` (default: --table).
    #[arg(long)]
    collection: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Keys/ranges per difference in the text report.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Read the bus from this many minutes before the day's start (by record timestamp):
    /// the clock skew allowed between the source and the producer.
    #[arg(long, default_value_t = 60, conflicts_with = "bus_from_start")]
    bus_slack_minutes: u32,
    /// Read the bus from each partition's first record instead.
    #[arg(long)]
    bus_from_start: bool,
    /// Give up (exit 2) when the bus answers nothing for this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

const EXIT_LOSS: i32 = 1;
const EXIT_ERROR: i32 = 2;

pub async fn run(args: AuditArgs) -> anyhow::Result<()> {
    let result = tokio::task::spawn_blocking(move || run_blocking(&args)).await;
    let code = match result {
        Ok(Ok(true)) => 0,
        Ok(Ok(false)) => EXIT_LOSS,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            EXIT_ERROR
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_ERROR
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

fn run_blocking(args: &AuditArgs) -> anyhow::Result<bool> {
    args.security.install()?;
    if let Some(bootstrap) = &args.bootstrap {
        crate::kafka_security::check_login_blocking(bootstrap)?;
    }
    let table: TableName = args.table.parse().context("--table")?;
    let ds: Ds = args.ds.parse().context("--ds")?;
    let layout = TableLayout::new(&args.root, table);
    let (bus, txs) = match &args.bootstrap {
        Some(b) => {
            if args.topics.is_empty() {
                bail!("--bootstrap needs --topic");
            }
            let (start, end) = day_window(ds)?;
            let since =
                (!args.bus_from_start).then(|| start - i64::from(args.bus_slack_minutes) * 60_000);
            let bus = read_bus(args, b, since, start, end)?;
            let txs = match &args.transaction_topic {
                Some(t) => Some(read_transactions(
                    args,
                    b,
                    since,
                    t,
                    args.collection.as_deref().unwrap_or(&args.table),
                )?),
                None => None,
            };
            (Some(bus), txs)
        }
        None => (None, None),
    };
    let report = audit(&layout, ds, bus.as_deref(), txs.as_deref())?;
    let text = if args.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        report.render_text(args.limit)
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    Ok(report.ok)
}

/// Every record of `topics` from the first one at or after bus time `since` (or from the
/// beginning) to the end seen now, to `each`.
fn read_all(
    args: &AuditArgs,
    bootstrap: &str,
    since: Option<i64>,
    topics: &[String],
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.timeout.max(1));
    let consumer = crate::kafka_security::reading_consumer(bootstrap, "lake-audit")?;
    // (topic, partition) → (start, end).
    let mut ranges: HashMap<(String, i32), (i64, i64)> = HashMap::new();
    for topic in topics {
        let md = consumer
            .fetch_metadata(Some(topic), timeout)
            .with_context(|| format!("metadata of {topic}"))?;
        let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
            bail!("topic {topic} does not exist");
        };
        if t.partitions().is_empty() {
            bail!("topic {topic} does not exist");
        }
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), timeout)
                .with_context(|| format!("offsets of {topic}/{}", p.id()))?;
            ranges.insert((topic.clone(), p.id()), (low, high));
        }
    }
    if let Some(since) = since {
        let mut by_time = TopicPartitionList::new();
        for (topic, partition) in ranges.keys() {
            by_time.add_partition_offset(topic, *partition, Offset::Offset(since))?;
        }
        let found = consumer
            .offsets_for_times(by_time, timeout)
            .context("looking up offsets by time")?;
        for e in found.elements() {
            if let Some(range) = ranges.get_mut(&(e.topic().to_owned(), e.partition())) {
                match e.offset() {
                    Offset::Offset(o) => range.0 = o.clamp(range.0, range.1),
                    // No record at or after `since`.
                    Offset::End => range.0 = range.1,
                    _ => {}
                }
            }
        }
    }
    let mut tpl = TopicPartitionList::new();
    let mut pending: HashMap<(String, i32), i64> = HashMap::new();
    for ((topic, partition), (start, end)) in ranges {
        tpl.add_partition_offset(&topic, partition, Offset::Offset(start))?;
        if end > start {
            pending.insert((topic, partition), end);
        }
    }
    consumer.assign(&tpl).context("assigning partitions")?;
    let mut idle = std::time::Instant::now();
    while !pending.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                idle = std::time::Instant::now();
                each(&m)?;
                let key = (m.topic().to_owned(), m.partition());
                if pending.get(&key).is_some_and(|&end| m.offset() + 1 >= end) {
                    pending.remove(&key);
                }
            }
            Some(Err(e)) => return Err(e).context("reading the bus"),
            None if idle.elapsed() > timeout => {
                bail!(
                    "the bus answered nothing for {timeout:?}; {} partitions unread",
                    pending.len()
                )
            }
            None => {}
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct EventHead<'a> {
    source: Option<SourceHead>,
    #[serde(borrow)]
    transaction: Option<TxHead<'a>>,
}

#[derive(Deserialize)]
struct SourceHead {
    ts_ms: Option<i64>,
}

#[derive(Deserialize)]
struct TxHead<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
}

fn key_text(v: &Scalar<'_>) -> String {
    match v {
        Scalar::Str(s) => s.to_string(),
        other => other.to_string(),
    }
}

/// The day as UTC milliseconds, `[start, end)`.
fn day_window(ds: Ds) -> anyhow::Result<(i64, i64)> {
    let start = ds.date().and_hms_opt(0, 0, 0);
    let end = ds.next().and_then(|n| n.date().and_hms_opt(0, 0, 0));
    let (Some(start), Some(end)) = (start, end) else {
        bail!("--ds {ds}: no such day");
    };
    Ok((
        start.and_utc().timestamp_millis(),
        end.and_utc().timestamp_millis(),
    ))
}

/// The table's change events whose `source.ts_ms` is in `[start, end)`, read from bus time
/// `since` on.
fn read_bus(
    args: &AuditArgs,
    bootstrap: &str,
    since: Option<i64>,
    start: i64,
    end: i64,
) -> anyhow::Result<Vec<BusEvent>> {
    let mut out = Vec::new();
    read_all(args, bootstrap, since, &args.topics, |m| {
        let Some(value) = m.payload() else {
            return Ok(()); // a tombstone
        };
        let Ok(head) = serde_json::from_slice::<EventHead<'_>>(value) else {
            return Ok(()); // not a change event: landing reports it, the audit counts changes
        };
        let Some(ts) = head.source.and_then(|s| s.ts_ms) else {
            return Ok(());
        };
        if ts < start || ts >= end {
            return Ok(());
        }
        let key = m
            .key()
            .and_then(|k| serde_json::from_slice::<RowImage<'_>>(k).ok())
            .map(|k| k.0.iter().map(|(_, v)| key_text(v)).collect())
            .unwrap_or_default();
        out.push(BusEvent {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key,
            transaction: head.transaction.map(|t| t.id.into_owned()),
        });
        Ok(())
    })?;
    Ok(out)
}

#[derive(Deserialize)]
struct Marker {
    status: String,
    id: String,
    #[serde(default)]
    data_collections: Option<Vec<Collection>>,
}

#[derive(Deserialize)]
struct Collection {
    data_collection: String,
    event_count: u64,
}

/// The END markers' event counts for `collection`.
fn read_transactions(
    args: &AuditArgs,
    bootstrap: &str,
    since: Option<i64>,
    topic: &str,
    collection: &str,
) -> anyhow::Result<Vec<TransactionCount>> {
    let mut out = Vec::new();
    read_all(args, bootstrap, since, &[topic.to_owned()], |m| {
        let Some(Ok(marker)) = m.payload().map(serde_json::from_slice::<Marker>) else {
            return Ok(());
        };
        if marker.status != "END" {
            return Ok(());
        }
        for c in marker.data_collections.unwrap_or_default() {
            if c.data_collection == collection {
                out.push(TransactionCount {
                    id: marker.id.clone(),
                    events: c.event_count,
                });
            }
        }
        Ok(())
    })?;
    Ok(out)
}
