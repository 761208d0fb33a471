//! Model test of landing's crash recovery: random records, file rolls by size and age, schema
//! changes, and crashes at any filesystem operation (torn temporary files, renames that were
//! or were not made durable, a crash between the rename and the offset commit), each followed
//! by a restart that recovers and consumes again from the larger of the committed offset and
//! the recovered one. At the end every record is in exactly one visible file, and every
//! visible file reads back whole.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type};
use arrow_array::Array;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use proptest::prelude::*;
use qanat_lake::fs::{LakeFile, LakeFs, ReadFile};
use qanat_lake::land::{InputKind, Lander, Record, TableSpec};
use qanat_lake::offsets::parse_change_file_name;

/// SplitMix64, so a case replays from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A file's content: what was written and what an fsync made durable.
#[derive(Default)]
struct Content {
    current: Vec<u8>,
    durable_len: usize,
}

type Node = Arc<Mutex<Content>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The namespace: what the directories hold now, and what they held at their last fsync.
#[derive(Default)]
struct Namespace {
    files: BTreeMap<PathBuf, Node>,
    synced: BTreeMap<PathBuf, Node>,
    dirs: BTreeSet<PathBuf>,
    /// Filesystem operations done (creations, renames, removals, fsyncs, listings).
    ops: u64,
    /// The operation that fails as the process dies; every one after it fails too.
    crash_at: Option<u64>,
    crashed: bool,
}

/// An in-memory filesystem that loses, when it crashes, what was not made durable:
/// - file data past the last fsync: a crash keeps a random prefix of it (a torn write);
/// - directory entries (creations, renames, removals) past the directory's last fsync: a
///   crash keeps, per directory, either the entries of its last fsync or the current ones;
/// - directories themselves are durable at once (a simplification).
#[derive(Clone, Default)]
struct SimFs(Arc<Mutex<Namespace>>);

fn crashed_err() -> io::Error {
    io::Error::other("simulated crash")
}

impl SimFs {
    /// Count an operation; fail it when it is the one the process dies at.
    fn op(&self) -> io::Result<MutexGuard<'_, Namespace>> {
        let mut ns = lock(&self.0);
        if ns.crashed {
            return Err(crashed_err());
        }
        ns.ops += 1;
        if ns.crash_at.is_some_and(|at| ns.ops >= at) {
            ns.crashed = true;
            return Err(crashed_err());
        }
        Ok(ns)
    }

    fn crash_now(&self) {
        lock(&self.0).crashed = true;
    }

    fn crashed(&self) -> bool {
        lock(&self.0).crashed
    }

    /// The filesystem as a restart finds it after a crash, with `crash_at` armed.
    fn after_crash(&self, rng: &mut Rng, crash_at: Option<u64>) -> SimFs {
        let ns = lock(&self.0);
        let mut dirs_of: BTreeSet<PathBuf> = BTreeSet::new();
        for p in ns.files.keys().chain(ns.synced.keys()) {
            dirs_of.extend(p.parent().map(Path::to_owned));
        }
        let mut kept: BTreeMap<PathBuf, Node> = BTreeMap::new();
        for dir in dirs_of {
            // The current entries may have reached the disk without an fsync.
            let source = if rng.chance(30) {
                &ns.files
            } else {
                &ns.synced
            };
            for (p, node) in source {
                if p.parent() == Some(dir.as_path()) {
                    kept.insert(p.clone(), node.clone());
                }
            }
        }
        let mut files = BTreeMap::new();
        let mut seen: HashMap<*const Mutex<Content>, Node> = HashMap::new();
        for (p, node) in kept {
            let fresh = seen
                .entry(Arc::as_ptr(&node))
                .or_insert_with(|| {
                    let c = lock(&node);
                    let pending = c.current.len() - c.durable_len;
                    let keep = c.durable_len + rng.below(pending as u64 + 1) as usize;
                    let mut data = c.current[..keep].to_vec();
                    if keep < c.current.len() && rng.chance(20) {
                        data.extend_from_slice(b"\0garbage\xff");
                    }
                    Arc::new(Mutex::new(Content {
                        durable_len: data.len(),
                        current: data,
                    }))
                })
                .clone();
            files.insert(p, fresh);
        }
        SimFs(Arc::new(Mutex::new(Namespace {
            synced: files.clone(),
            files,
            dirs: ns.dirs.clone(),
            ops: 0,
            crash_at,
            crashed: false,
        })))
    }

    fn ops(&self) -> u64 {
        lock(&self.0).ops
    }

    /// Visible files with their bytes.
    fn visible(&self) -> Vec<(PathBuf, Vec<u8>)> {
        lock(&self.0)
            .files
            .iter()
            .map(|(p, n)| (p.clone(), lock(n).current.clone()))
            .collect()
    }
}

struct SimFile {
    fs: SimFs,
    node: Node,
}

impl Write for SimFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.fs.crashed() {
            return Err(crashed_err());
        }
        lock(&self.node).current.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl LakeFile for SimFile {
    fn sync_all(&mut self) -> io::Result<()> {
        let _ns = self.fs.op()?;
        let mut c = lock(&self.node);
        c.durable_len = c.current.len();
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(lock(&self.node).current.len() as u64)
    }
}

fn not_found(p: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, p.display().to_string())
}

impl LakeFs for SimFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut ns = self.op()?;
        for d in dir.ancestors() {
            ns.dirs.insert(d.to_owned());
        }
        Ok(())
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn LakeFile>> {
        let mut ns = self.op()?;
        if !path.parent().is_some_and(|d| ns.dirs.contains(d)) {
            return Err(not_found(path));
        }
        let node = Node::default();
        ns.files.insert(path.to_owned(), node.clone());
        Ok(Box::new(SimFile {
            fs: self.clone(),
            node,
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut ns = self.op()?;
        let node = ns.files.remove(from).ok_or_else(|| not_found(from))?;
        ns.files.insert(to.to_owned(), node);
        Ok(())
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut ns = self.op()?;
        ns.files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut ns = self.op()?;
        let ns = &mut *ns;
        ns.synced.retain(|p, _| p.parent() != Some(dir));
        for (p, node) in &ns.files {
            if p.parent() == Some(dir) {
                ns.synced.insert(p.clone(), node.clone());
            }
        }
        Ok(())
    }
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<(String, bool)>> {
        let ns = self.op()?;
        if !ns.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
        let mut out: Vec<(String, bool)> = ns
            .dirs
            .iter()
            .filter(|d| d.parent() == Some(dir))
            .filter_map(|d| name(d).map(|n| (n, true)))
            .collect();
        out.extend(
            ns.files
                .keys()
                .filter(|p| p.parent() == Some(dir))
                .filter_map(|p| name(p).map(|n| (n, false))),
        );
        Ok(out)
    }
    fn open_read(&self, path: &Path) -> io::Result<ReadFile> {
        let ns = self.op()?;
        let node = ns.files.get(path).ok_or_else(|| not_found(path))?;
        let data = lock(node).current.clone();
        Ok(ReadFile::Bytes(bytes::Bytes::from(data)))
    }
}

const TOPIC: &str = "cdc.shop.orders";
const PARTITIONS: i32 = 2;
/// 2026-11-29 23:59:59.990 UTC: records straddle midnight, so groups span two directories.
const LOG_TIME_BASE: i64 = 1_795_910_399_990;

/// The value of record `offset` of `partition`; from offset `schema_at` on it has a column
/// more (a schema change), and every third record lacks the optional column `note`.
fn envelope(partition: i32, offset: i64, schema_at: i64) -> String {
    let id = i64::from(partition) * 1_000_000 + offset;
    let note = if offset % 3 == 0 {
        String::new()
    } else {
        format!(r#","note":"n{id}""#)
    };
    let extra = if offset >= schema_at {
        r#","extra":true"#
    } else {
        ""
    };
    format!(
        r#"{{"op":"c","after":{{"id":{id},"v":"v{id}"{note}{extra}}},"source":{{"ts_ms":{},"file":"b.1","pos":{offset}}},"ts_ms":{}}}"#,
        LOG_TIME_BASE + offset,
        LOG_TIME_BASE + offset + 1
    )
}

/// A case: records per partition, where the schema changes, roll settings, and the seed
/// driving crashes, torn writes and interleaving.
#[derive(Debug, Clone)]
struct Case {
    records: i64,
    schema_at: i64,
    roll_bytes: u64,
    roll_age_ms: u64,
    crashes: u32,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        1i64..60,
        0i64..80,
        prop_oneof![Just(1u64), 200u64..3000, Just(u64::MAX)],
        prop_oneof![Just(u64::MAX), 5u64..50],
        0u32..5,
        any::<u64>(),
    )
        .prop_map(
            |(records, schema_at, roll_bytes, roll_age_ms, crashes, seed)| Case {
                records,
                schema_at,
                roll_bytes,
                roll_age_ms,
                crashes,
                seed,
            },
        )
}

/// Commit the landed positions, unless the process dies first (after the files are in
/// place and before the commit); false if it did.
fn commit(
    landed: Vec<qanat_lake::land::Landed>,
    fs: &SimFs,
    rng: &mut Rng,
    may_crash: bool,
    committed: &mut HashMap<i32, i64>,
) -> bool {
    for l in landed {
        if may_crash && rng.chance(5) {
            fs.crash_now();
            return false;
        }
        let c = committed.entry(l.partition).or_insert(0);
        *c = (*c).max(l.next_offset);
    }
    true
}

/// How one life of the lander ended.
enum Life {
    Crashed,
    Finished,
}

/// Run the lander from recovery to the end of the input (or its crash).
fn live(
    case: &Case,
    fs: &SimFs,
    may_crash: bool,
    rng: &mut Rng,
    committed: &mut HashMap<i32, i64>,
    clock: &mut Instant,
) -> Life {
    let root = PathBuf::from("/lake");
    let mut spec = TableSpec::new("shop.orders".parse().unwrap(), InputKind::Cdc);
    spec.roll_bytes = case.roll_bytes;
    spec.roll_age = Duration::from_millis(case.roll_age_ms);
    let mut lander = Lander::with_fs(Arc::new(fs.clone()), &root, spec);
    let parts: Vec<(String, i32)> = (0..PARTITIONS).map(|p| (TOPIC.to_string(), p)).collect();
    let recovered = match lander.recover(&parts) {
        Ok(r) => r,
        Err(_) if fs.crashed() => return Life::Crashed,
        Err(e) => panic!("recovery failed without a crash: {e}"),
    };
    // Consuming starts at the larger of the committed offset and the recovered one.
    let mut next: HashMap<i32, i64> = (0..PARTITIONS)
        .map(|p| {
            let files = recovered.get(&(TOPIC.to_string(), p)).copied();
            let commit = committed.get(&p).copied();
            (p, commit.max(files).unwrap_or(0))
        })
        .collect();
    loop {
        let open: Vec<i32> = (0..PARTITIONS).filter(|p| next[p] < case.records).collect();
        if open.is_empty() {
            break;
        }
        let p = open[rng.below(open.len() as u64) as usize];
        let offset = next[&p];
        let value = envelope(p, offset, case.schema_at);
        let key = format!(r#"{{"id":{}}}"#, i64::from(p) * 1_000_000 + offset);
        let rec = Record {
            topic: TOPIC,
            partition: p,
            offset,
            timestamp_ms: None,
            key: Some(key.as_bytes()),
            value: Some(value.as_bytes()),
            headers: &[],
        };
        *clock += Duration::from_millis(rng.below(10));
        match lander.push(&rec, *clock) {
            Ok(landed) => {
                if !commit(landed, fs, rng, may_crash, committed) {
                    return Life::Crashed;
                }
            }
            Err(_) if fs.crashed() => return Life::Crashed,
            Err(e) => panic!("landing failed without a crash: {e}"),
        }
        next.insert(p, offset + 1);
        if rng.chance(10) {
            match lander.tick(*clock) {
                Ok(landed) => {
                    if !commit(landed, fs, rng, may_crash, committed) {
                        return Life::Crashed;
                    }
                }
                Err(_) if fs.crashed() => return Life::Crashed,
                Err(e) => panic!("rolling failed without a crash: {e}"),
            }
        }
    }
    match lander.flush() {
        Ok(landed) => {
            if commit(landed, fs, rng, may_crash, committed) {
                Life::Finished
            } else {
                Life::Crashed
            }
        }
        Err(_) if fs.crashed() => Life::Crashed,
        Err(e) => panic!("flushing failed without a crash: {e}"),
    }
}

/// Every visible change-log file reads back whole and holds exactly the rows of its name's
/// range; together they hold every record exactly once.
fn check(case: &Case, fs: &SimFs) -> Result<(), TestCaseError> {
    let mut seen: BTreeMap<(i32, i64), usize> = BTreeMap::new();
    for (path, data) in fs.visible() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        prop_assert!(
            !name.starts_with(".tmp-"),
            "temporary file left after a clean run: {}",
            path.display()
        );
        let (topic, partition, first, last) = parse_change_file_name(&name)
            .ok_or_else(|| TestCaseError::fail(format!("unexpected file {}", path.display())))?;
        prop_assert_eq!(topic, TOPIC);
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(data))
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", path.display())))?
            .build()
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", path.display())))?;
        for batch in reader {
            let batch =
                batch.map_err(|e| TestCaseError::fail(format!("{}: {e}", path.display())))?;
            let ids = batch
                .column_by_name("id")
                .unwrap()
                .as_primitive::<Int64Type>();
            let v = batch.column_by_name("v").unwrap().as_string::<i32>();
            let parts = batch
                .column_by_name("_partition")
                .unwrap()
                .as_primitive::<Int32Type>();
            let offsets = batch
                .column_by_name("_offset")
                .unwrap()
                .as_primitive::<Int64Type>();
            for i in 0..batch.num_rows() {
                let (p, o) = (parts.value(i), offsets.value(i));
                prop_assert_eq!(p, partition);
                prop_assert!((first..=last).contains(&o), "offset {} outside {}", o, name);
                let id = i64::from(p) * 1_000_000 + o;
                prop_assert_eq!(ids.value(i), id);
                prop_assert!(!v.is_null(i));
                prop_assert_eq!(v.value(i), format!("v{id}"));
                *seen.entry((p, o)).or_default() += 1;
            }
        }
    }
    for p in 0..PARTITIONS {
        for o in 0..case.records {
            let n = seen.get(&(p, o)).copied().unwrap_or(0);
            prop_assert_eq!(n, 1, "record {}/{} landed {} times", p, o, n);
        }
    }
    prop_assert_eq!(seen.len() as i64, case.records * i64::from(PARTITIONS));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn every_record_lands_exactly_once_across_crashes(case in cases()) {
        let mut rng = Rng(case.seed);
        let mut committed: HashMap<i32, i64> = HashMap::new();
        let mut clock = Instant::now();
        // The first life runs on an empty filesystem.
        let mut fs = SimFs::default();
        lock(&fs.0).dirs.insert(PathBuf::from("/"));
        let mut crashes_left = case.crashes;
        lock(&fs.0).crash_at = (crashes_left > 0).then(|| 1 + rng.below(40));
        loop {
            match live(&case, &fs, crashes_left > 0, &mut rng, &mut committed, &mut clock) {
                Life::Finished => break,
                Life::Crashed => {
                    crashes_left = crashes_left.saturating_sub(1);
                    // Later lives crash later on average; the last one runs to the end.
                    let crash_at = (crashes_left > 0)
                        .then(|| 1 + rng.below(40 + fs.ops()));
                    fs = fs.after_crash(&mut rng, crash_at);
                }
            }
        }
        check(&case, &fs)?;
    }
}

/// A crash-free run lands every record once, in files named by their ranges.
#[test]
fn without_crashes_every_record_lands_once() {
    let case = Case {
        records: 50,
        schema_at: 20,
        roll_bytes: 1500,
        roll_age_ms: 30,
        crashes: 0,
        seed: 7,
    };
    let mut rng = Rng(case.seed);
    let fs = SimFs::default();
    lock(&fs.0).dirs.insert(PathBuf::from("/"));
    let mut committed = HashMap::new();
    let mut clock = Instant::now();
    assert!(matches!(
        live(&case, &fs, false, &mut rng, &mut committed, &mut clock),
        Life::Finished
    ));
    check(&case, &fs).unwrap();
    assert!(fs.visible().len() > 2, "rolled into several files");
    assert_eq!(committed.get(&0), Some(&50));
}
