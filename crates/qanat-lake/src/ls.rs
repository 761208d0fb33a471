//! `ls`: the tables under a lake root, their partitions, rows, bytes and source positions.
//!
//! A table is a directory holding `ds=YYYYMMDD` partitions, at `ROOT/<db>/<name>` or
//! `ROOT/<name>`; `<name>_changes` is the change log of `<name>`. Rows and bytes come from
//! the Parquet footers (or a snapshot's `_SUCCESS`), source positions from `_SUCCESS` or
//! from change-log file names (`part-<topic>-<partition>-<first>-<last>.parquet`).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::LakeError;
use crate::layout::{Ds, TableName};
use crate::manifest::{Manifest, SourceRange};
use crate::offsets::parse_change_file_name;
use crate::read::{parquet_files, ParquetInput};

/// Snapshot or change log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionKind {
    Snapshot,
    Changes,
}

/// One `ds=` partition.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionInfo {
    pub kind: PartitionKind,
    pub ds: String,
    pub path: PathBuf,
    pub files: usize,
    pub rows: u64,
    pub bytes: u64,
    /// A snapshot partition with its `_SUCCESS`; change-log partitions are always `true`.
    pub complete: bool,
    pub sources: Vec<SourceRange>,
}

/// One table and its partitions, snapshot then change log, each by day.
#[derive(Debug, Clone, Serialize)]
pub struct TableInfo {
    pub table: String,
    pub partitions: Vec<PartitionInfo>,
}

fn subdirs(dir: &Path) -> Result<Vec<(String, PathBuf)>, LakeError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(LakeError::io(dir))? {
        let entry = entry.map_err(LakeError::io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.file_type().map_err(LakeError::io(dir))?.is_dir() {
            continue;
        }
        out.push((name, entry.path()));
    }
    out.sort();
    Ok(out)
}

fn days(dir: &Path) -> Result<Vec<(Ds, PathBuf)>, LakeError> {
    Ok(subdirs(dir)?
        .into_iter()
        .filter_map(|(name, path)| Some((name.strip_prefix("ds=")?.parse().ok()?, path)))
        .collect())
}

fn partition(kind: PartitionKind, ds: Ds, dir: &Path) -> Result<PartitionInfo, LakeError> {
    let files = parquet_files(dir)?;
    let mut info = PartitionInfo {
        kind,
        ds: ds.to_string(),
        path: dir.to_owned(),
        files: files.len(),
        rows: 0,
        bytes: 0,
        complete: true,
        sources: Vec::new(),
    };
    let manifest = match kind {
        PartitionKind::Snapshot => Manifest::read(dir)?,
        PartitionKind::Changes => None,
    };
    info.complete = kind == PartitionKind::Changes || manifest.is_some();
    if let Some(manifest) = manifest {
        info.rows = manifest.rows;
        info.bytes = manifest.files.iter().map(|f| f.bytes).sum();
        info.sources = manifest.sources;
        return Ok(info);
    }
    let mut ranges: BTreeMap<(String, i32), (i64, i64)> = BTreeMap::new();
    for path in &files {
        let input = ParquetInput::open(path)?;
        info.rows += input.rows;
        info.bytes += input.bytes;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some((topic, partition, first, last)) = parse_change_file_name(&name) {
            let entry = ranges.entry((topic, partition)).or_insert((first, last));
            entry.0 = entry.0.min(first);
            entry.1 = entry.1.max(last);
        }
    }
    info.sources = ranges
        .into_iter()
        .map(|((topic, partition), (first, last))| SourceRange {
            topic,
            partition,
            first_offset: first,
            last_offset: last,
        })
        .collect();
    Ok(info)
}

/// The tables under `root` (or just `only`), with their partitions.
pub fn list(root: &Path, only: Option<&TableName>) -> Result<Vec<TableInfo>, LakeError> {
    // (table name, directory, kind)
    let mut dirs: Vec<(String, PathBuf, PartitionKind)> = Vec::new();
    let mut consider = |db: Option<&str>, name: &str, path: PathBuf| {
        let (table, kind) = match name.strip_suffix("_changes") {
            Some(base) => (base, PartitionKind::Changes),
            None => (name, PartitionKind::Snapshot),
        };
        let table = match db {
            Some(db) => format!("{db}.{table}"),
            None => table.to_owned(),
        };
        dirs.push((table, path, kind));
    };
    if !root.is_dir() {
        return Err(LakeError::MissingPartition {
            what: "lake root",
            path: root.to_owned(),
            hint: String::new(),
        });
    }
    for (name, path) in subdirs(root)? {
        if !days(&path)?.is_empty() {
            consider(None, &name, path);
            continue;
        }
        for (inner, inner_path) in subdirs(&path)? {
            if !days(&inner_path)?.is_empty() {
                consider(Some(&name), &inner, inner_path);
            }
        }
    }
    let wanted = only.map(|t| t.to_string());
    let mut tables: BTreeMap<String, Vec<PartitionInfo>> = BTreeMap::new();
    dirs.sort_by_key(|(_, _, kind)| *kind == PartitionKind::Changes);
    for (table, dir, kind) in dirs {
        if wanted.as_ref().is_some_and(|w| *w != table) {
            continue;
        }
        let entry = tables.entry(table).or_default();
        for (ds, path) in days(&dir)? {
            entry.push(partition(kind, ds, &path)?);
        }
    }
    Ok(tables
        .into_iter()
        .map(|(table, partitions)| TableInfo { table, partitions })
        .collect())
}
