//! The landed position of each topic partition, recovered from the change-log files.
//!
//! The files are the truth; the consumer group's committed offset is only a hint that may
//! lag them (a crash between the rename and the commit). A flush of one topic partition
//! writes one file per day (or hour) directory its rows fall in, all named by the same
//! offset range and all carrying `qanat.group_files` = how many there are. A group is
//! complete when that many files of its name exist; only the newest group of a partition
//! can be incomplete (a crash in the middle of its renames), and recovery removes its
//! files, so the range is landed again, whole, under the same names.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};

use parquet::file::metadata::ParquetMetaDataReader;

use crate::fs::{LakeFs, OsFs, ReadFile};
use crate::sink::TMP_PREFIX;

/// Recovery failed.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: reading the Parquet footer: {source}")]
    Footer {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
}

/// `part-<topic>-<partition>-<first>-<last>.parquet` → (topic, partition, first, last).
/// The topic may itself contain `-`: the three numbers are taken from the right.
pub fn parse_change_file_name(name: &str) -> Option<(String, i32, i64, i64)> {
    let stem = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
    let mut it = stem.rsplitn(4, '-');
    let last = it.next()?.parse().ok()?;
    let first = it.next()?.parse().ok()?;
    let partition = it.next()?.parse().ok()?;
    let topic = it.next()?;
    if topic.is_empty() {
        return None;
    }
    Some((topic.to_owned(), partition, first, last))
}

/// The footer's key-value metadata of a Parquet file.
pub fn file_metadata(path: &Path) -> Result<HashMap<String, String>, RecoverError> {
    file_metadata_in(&OsFs, path)
}

/// [`file_metadata`] of a file of `fs`.
pub fn file_metadata_in(
    fs: &dyn LakeFs,
    path: &Path,
) -> Result<HashMap<String, String>, RecoverError> {
    let file = fs.open_read(path).map_err(|source| RecoverError::Io {
        path: path.to_owned(),
        source,
    })?;
    let footer = |source| RecoverError::Footer {
        path: path.to_owned(),
        source,
    };
    let meta = match &file {
        ReadFile::Os(f) => ParquetMetaDataReader::new().parse_and_finish(f),
        ReadFile::Bytes(b) => ParquetMetaDataReader::new().parse_and_finish(b),
    }
    .map_err(footer)?;
    Ok(meta
        .file_metadata()
        .key_value_metadata()
        .into_iter()
        .flatten()
        .filter_map(|kv| kv.value.clone().map(|v| (kv.key.clone(), v)))
        .collect())
}

/// One change-log file found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundFile {
    pub path: PathBuf,
    pub topic: String,
    pub partition: i32,
    pub first: i64,
    pub last: i64,
}

/// Every change-log file under `changes_dir` (`ds=*/` and `ds=*/hh=*/`), and every
/// temporary file there.
pub fn scan(
    fs: &dyn LakeFs,
    changes_dir: &Path,
) -> Result<(Vec<FoundFile>, Vec<PathBuf>), RecoverError> {
    let mut files = Vec::new();
    let mut tmps = Vec::new();
    let mut dirs = vec![changes_dir.to_owned()];
    while let Some(dir) = dirs.pop() {
        let entries = match fs.list_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(RecoverError::Io { path: dir, source }),
        };
        for (name, is_dir) in entries {
            let path = dir.join(&name);
            if is_dir && (name.starts_with("ds=") || name.starts_with("hh=")) {
                dirs.push(path);
            } else if name.starts_with(TMP_PREFIX) {
                tmps.push(path);
            } else if let Some((topic, partition, first, last)) = parse_change_file_name(&name) {
                files.push(FoundFile {
                    path,
                    topic,
                    partition,
                    first,
                    last,
                });
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((files, tmps))
}

/// A partition's groups: offset range → its files.
type Groups = BTreeMap<(i64, i64), Vec<PathBuf>>;

/// What recovery found and did.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Per (topic, partition): the next offset to land (newest complete group's last + 1).
    pub positions: HashMap<(String, i32), i64>,
    pub removed_tmp: Vec<PathBuf>,
    /// Files of incomplete groups, removed.
    pub removed_incomplete: Vec<PathBuf>,
}

impl Recovery {
    /// Every removed file with why.
    pub fn removed(&self) -> impl Iterator<Item = (&Path, &'static str)> {
        self.removed_tmp
            .iter()
            .map(|p| (p.as_path(), "temporary file"))
            .chain(
                self.removed_incomplete
                    .iter()
                    .map(|p| (p.as_path(), "file of an incomplete group")),
            )
    }
}

/// The topic partition of a temporary file, `.tmp-part-<topic>-<partition>-<first>.parquet`.
fn tmp_partition(path: &Path) -> Option<(String, i32)> {
    let name = path.file_name()?.to_str()?;
    let stem = name
        .strip_prefix(TMP_PREFIX)?
        .strip_prefix("part-")?
        .strip_suffix(".parquet")?;
    let mut it = stem.rsplitn(3, '-');
    let _first: i64 = it.next()?.parse().ok()?;
    let partition = it.next()?.parse().ok()?;
    Some((it.next()?.to_owned(), partition))
}

/// Recover the landed positions of the topic partitions `wanted` accepts (the ones this
/// process owns) in one table's change log: remove their temporary files and incomplete
/// newest groups, and make the removals durable. Files of other partitions are neither read
/// nor removed.
pub fn recover_partitions(
    fs: &dyn LakeFs,
    changes_dir: &Path,
    wanted: impl Fn(&str, i32) -> bool,
) -> Result<Recovery, RecoverError> {
    let (files, tmps) = scan(fs, changes_dir)?;
    let files: Vec<FoundFile> = files
        .into_iter()
        .filter(|f| wanted(&f.topic, f.partition))
        .collect();
    let mut out = Recovery::default();
    let mut touched: Vec<PathBuf> = Vec::new();
    for tmp in tmps {
        // A temporary file of unknown shape is not ours to judge by partition: removed too.
        if tmp_partition(&tmp).is_some_and(|(t, p)| !wanted(&t, p)) {
            continue;
        }
        remove(fs, &tmp)?;
        touched.extend(tmp.parent().map(Path::to_owned));
        out.removed_tmp.push(tmp);
    }
    // (topic, partition) → (first, last) → files of that group.
    let mut groups: HashMap<(String, i32), Groups> = HashMap::new();
    for f in files {
        groups
            .entry((f.topic, f.partition))
            .or_default()
            .entry((f.first, f.last))
            .or_default()
            .push(f.path);
    }
    for (tp, by_range) in groups {
        for ((_, last), paths) in by_range.into_iter().rev() {
            let meta = file_metadata_in(fs, &paths[0])?;
            let expected = meta
                .get("qanat.group_files")
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(1);
            if paths.len() >= expected {
                out.positions.insert(tp, last + 1);
                break;
            }
            for p in paths {
                remove(fs, &p)?;
                touched.extend(p.parent().map(Path::to_owned));
                out.removed_incomplete.push(p);
            }
        }
    }
    touched.sort();
    touched.dedup();
    for dir in touched {
        fs.sync_dir(&dir)
            .map_err(|source| RecoverError::Io { path: dir, source })?;
    }
    Ok(out)
}

fn remove(fs: &dyn LakeFs, path: &Path) -> Result<(), RecoverError> {
    match fs.remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RecoverError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn names_parse_from_the_right() {
        let name = crate::layout::change_file_name("cdc.my-db.orders", 3, 10, 99);
        assert_eq!(
            parse_change_file_name(&name),
            Some(("cdc.my-db.orders".into(), 3, 10, 99))
        );
        for bad in [
            "part-0-1-2.parquet",
            "part-t-x-1-2.parquet",
            "t-0-1-2.parquet",
            "part-t-0-1-2.csv",
            "part-00000.parquet",
        ] {
            assert_eq!(parse_change_file_name(bad), None, "{bad}");
        }
    }
}
