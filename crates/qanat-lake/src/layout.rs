//! Where a table's files live under the lake root.
//!
//! ```text
//! ROOT/<db>/<name>_changes/ds=YYYYMMDD/[hh=HH/]part-<topic>-<partition>-<first>-<last>.parquet
//! ROOT/<db>/<name>/ds=YYYYMMDD/part-NNNNN.parquet
//! ROOT/<db>/<name>/ds=YYYYMMDD/_SUCCESS
//! ```
//!
//! A table named without a database (`events`) lives directly under the root.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use chrono::{Days, NaiveDate};

/// A path or name that does not fit the layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error(
        "table name {0:?}: expected `db.table` or `table`, letters, digits, `_`, `-` and `$` only"
    )]
    BadTableName(String),
    #[error("day {0:?}: expected YYYYMMDD, for example 20261129")]
    BadDay(String),
    #[error("hour {0}: expected 0 to 23")]
    BadHour(u32),
}

/// A table's name in the lake: an optional database and the table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    pub db: Option<String>,
    pub name: String,
}

impl TableName {
    fn valid_part(part: &str) -> bool {
        !part.is_empty()
            && part != "."
            && part != ".."
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '$'))
    }
}

impl FromStr for TableName {
    type Err = LayoutError;

    fn from_str(text: &str) -> Result<Self, LayoutError> {
        let bad = || LayoutError::BadTableName(text.to_owned());
        let (db, name) = match text.split_once('.') {
            Some((db, name)) => (Some(db), name),
            None => (None, text),
        };
        if !Self::valid_part(name) || db.is_some_and(|db| !Self::valid_part(db)) {
            return Err(bad());
        }
        Ok(TableName {
            db: db.map(str::to_owned),
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.db {
            Some(db) => write!(f, "{db}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// A day partition, `ds=YYYYMMDD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ds(NaiveDate);

impl Ds {
    pub fn new(date: NaiveDate) -> Self {
        Ds(date)
    }

    pub fn date(self) -> NaiveDate {
        self.0
    }

    /// The day before, or `None` before the start of the calendar.
    pub fn previous(self) -> Option<Ds> {
        self.0.checked_sub_days(Days::new(1)).map(Ds)
    }

    /// The day after, or `None` at the end of the calendar.
    pub fn next(self) -> Option<Ds> {
        self.0.checked_add_days(Days::new(1)).map(Ds)
    }

    /// The directory name, `ds=YYYYMMDD`.
    pub fn dir_name(self) -> String {
        format!("ds={self}")
    }
}

impl FromStr for Ds {
    type Err = LayoutError;

    fn from_str(text: &str) -> Result<Self, LayoutError> {
        let digits = text.strip_prefix("ds=").unwrap_or(text);
        if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(LayoutError::BadDay(text.to_owned()));
        }
        NaiveDate::parse_from_str(digits, "%Y%m%d")
            .map(Ds)
            .map_err(|_| LayoutError::BadDay(text.to_owned()))
    }
}

impl fmt::Display for Ds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.format("%Y%m%d"))
    }
}

/// The two directories of one table under the lake root.
#[derive(Debug, Clone)]
pub struct TableLayout {
    root: PathBuf,
    table: TableName,
}

impl TableLayout {
    pub fn new(root: impl Into<PathBuf>, table: TableName) -> Self {
        TableLayout {
            root: root.into(),
            table,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn table(&self) -> &TableName {
        &self.table
    }

    fn base(&self) -> PathBuf {
        match &self.table.db {
            Some(db) => self.root.join(db),
            None => self.root.clone(),
        }
    }

    /// The change log: every landed change event, partitioned by the day of `_log_time`.
    pub fn changes_dir(&self) -> PathBuf {
        self.base().join(format!("{}_changes", self.table.name))
    }

    /// The merged daily snapshots.
    pub fn snapshot_dir(&self) -> PathBuf {
        self.base().join(&self.table.name)
    }

    /// A day of the change log, optionally one hour of it.
    pub fn changes_partition(&self, ds: Ds, hour: Option<u32>) -> Result<PathBuf, LayoutError> {
        let day = self.changes_dir().join(ds.dir_name());
        match hour {
            None => Ok(day),
            Some(hh) if hh < 24 => Ok(day.join(format!("hh={hh:02}"))),
            Some(hh) => Err(LayoutError::BadHour(hh)),
        }
    }

    /// A day of the snapshot table.
    pub fn snapshot_partition(&self, ds: Ds) -> PathBuf {
        self.snapshot_dir().join(ds.dir_name())
    }
}

/// The name of the change-log file covering `first..=last` of one topic partition.
/// Offsets are zero-padded so names sort in offset order.
pub fn change_file_name(topic: &str, partition: i32, first: i64, last: i64) -> String {
    format!("part-{topic}-{partition}-{first:020}-{last:020}.parquet")
}

/// The name of the `index`th data file of a snapshot partition.
pub fn snapshot_file_name(index: usize) -> String {
    format!("part-{index:05}.parquet")
}

/// The file marking a snapshot partition complete; it holds the [`crate::manifest::Manifest`].
pub const SUCCESS_FILE: &str = "_SUCCESS";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn table_names_map_to_directories() {
        let layout = TableLayout::new("/lake", "shop.orders".parse().unwrap());
        assert_eq!(layout.changes_dir(), Path::new("/lake/shop/orders_changes"));
        let ds: Ds = "20261129".parse().unwrap();
        assert_eq!(
            layout.snapshot_partition(ds),
            Path::new("/lake/shop/orders/ds=20261129")
        );
        assert_eq!(
            layout.changes_partition(ds, Some(7)).unwrap(),
            Path::new("/lake/shop/orders_changes/ds=20261129/hh=07")
        );
        assert_eq!(
            layout.changes_partition(ds, Some(24)),
            Err(LayoutError::BadHour(24))
        );
        let bare = TableLayout::new("/lake", "events".parse().unwrap());
        assert_eq!(bare.snapshot_dir(), Path::new("/lake/events"));
    }

    #[test]
    fn bad_names_and_days_are_refused() {
        for bad in ["", ".", "a.", ".b", "a/b", "..", "a.b.c", "a b"] {
            assert!(bad.parse::<TableName>().is_err(), "{bad:?} accepted");
        }
        for bad in ["2026112", "20261131", "2026-11-29", "ds=2026113x"] {
            assert!(bad.parse::<Ds>().is_err(), "{bad:?} accepted");
        }
        let ds: Ds = "ds=20261231".parse().unwrap();
        assert_eq!(ds.next().unwrap().to_string(), "20270101");
        assert_eq!(ds.previous().unwrap().to_string(), "20261230");
    }

    #[test]
    fn change_file_names_sort_by_offset() {
        let a = change_file_name("cdc.shop.orders", 0, 9, 99);
        let b = change_file_name("cdc.shop.orders", 0, 100, 1000);
        assert!(a < b);
    }
}
