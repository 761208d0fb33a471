//! Sharded sources (E5): one logical table over many physical tables in many databases, such
//! as `order_{0000..1023}` spread over a list of DSNs, read as one source table.
//!
//! Invariants:
//! - Every shard has the logical table's columns with the same canonical types (checked before
//!   any row moves); the error names the first shard that differs.
//! - Splits go by shard: each split reads exactly one shard (the whole shard, or one key range
//!   of it when `max_splits` leaves room for several per shard), so every row of every shard
//!   is read once.
//! - With a shard column (`shard_column = "_shard"`), every row carries its physical table's
//!   name, and a target read for `--verify` selects a split's rows by that name; without one,
//!   `--verify` compares the whole table.

use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use tokio::sync::mpsc;

use crate::dirty::DirtyLog;
use crate::plugin::Reader;
use crate::split::{ShardRef, Split};
use crate::types::{CanonicalType, Column, TableSchema};
use crate::SyncError;

/// The most physical tables one logical table may expand to.
pub const MAX_SHARDS: usize = 65_536;
/// Shards whose catalog is read at once while checking their columns.
const SCHEMA_PARALLELISM: usize = 8;

/// Expand every `{A..B}` range of decimal numbers in `pattern` (several ranges multiply).
/// A range whose first bound has a leading zero, or whose bounds are equally long, keeps that
/// width: `order_{0000..0003}` gives `order_0000` … `order_0003`. Text without a range is
/// returned as is.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, String> {
    let mut out = vec![String::new()];
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}').map(|c| open + c) else {
            break;
        };
        let inner = &rest[open + 1..close];
        let Some((a, b)) = inner.split_once("..") else {
            for s in &mut out {
                s.push_str(&rest[..=close]);
            }
            rest = &rest[close + 1..];
            continue;
        };
        let digits =
            |s: &str| !s.is_empty() && s.len() <= 9 && s.bytes().all(|c| c.is_ascii_digit());
        if !digits(a) || !digits(b) {
            return Err(format!(
                "shard range {{{inner}}}: expected {{FIRST..LAST}} with decimal numbers"
            ));
        }
        let (lo, hi): (u64, u64) = (
            a.parse().map_err(|_| format!("bad number {a:?}"))?,
            b.parse().map_err(|_| format!("bad number {b:?}"))?,
        );
        if hi < lo {
            return Err(format!("shard range {{{inner}}}: {hi} is below {lo}"));
        }
        let width = if (a.len() > 1 && a.starts_with('0')) || a.len() == b.len() {
            a.len()
        } else {
            0
        };
        let count = (hi - lo + 1) as usize;
        if out.len().saturating_mul(count) > MAX_SHARDS {
            return Err(format!("more than {MAX_SHARDS} shards"));
        }
        let prefix = &rest[..open];
        let mut next = Vec::with_capacity(out.len() * count);
        for s in &out {
            for n in lo..=hi {
                next.push(format!("{s}{prefix}{n:0width$}"));
            }
        }
        out = next;
        rest = &rest[close + 1..];
    }
    for s in &mut out {
        s.push_str(rest);
    }
    Ok(out)
}

/// One physical table of a sharded source.
pub struct Shard {
    /// The physical table (`database.table`), as stored in the shard column.
    pub name: String,
    pub reader: Arc<dyn Reader>,
}

/// A logical table read from its shards.
pub struct ShardedTable {
    shards: Vec<Shard>,
    shard_column: Option<String>,
}

impl ShardedTable {
    pub fn new(shards: Vec<Shard>, shard_column: Option<String>) -> Result<Self, SyncError> {
        if shards.is_empty() {
            return Err(SyncError::Invalid("a sharded source needs a shard".into()));
        }
        Ok(ShardedTable {
            shards,
            shard_column,
        })
    }

    fn shard(&self, split: &Split) -> Result<&Shard, SyncError> {
        split
            .shard
            .as_ref()
            .and_then(|s| self.shards.get(s.index))
            .ok_or_else(|| {
                SyncError::Internal(format!("split {} names no shard", split.describe()))
            })
    }

    /// The physical tables' schema: the logical one without the shard column.
    fn physical(&self, schema: &TableSchema) -> TableSchema {
        TableSchema {
            columns: schema
                .columns
                .iter()
                .filter(|c| Some(&c.name) != self.shard_column.as_ref())
                .cloned()
                .collect(),
            primary_key: schema.primary_key.clone(),
        }
    }
}

fn same_columns(a: &TableSchema, b: &TableSchema) -> Option<String> {
    if a.columns.len() != b.columns.len() {
        return Some(format!(
            "{} columns instead of {}",
            b.columns.len(),
            a.columns.len()
        ));
    }
    a.columns
        .iter()
        .zip(&b.columns)
        .find(|(x, y)| x.name != y.name || x.ty != y.ty)
        .map(|(x, y)| {
            format!(
                "column {} {} where the first shard has {} {}",
                y.name,
                y.ty.name(),
                x.name,
                x.ty.name()
            )
        })
}

#[async_trait::async_trait]
impl Reader for ShardedTable {
    fn name(&self) -> String {
        let first = &self.shards[0];
        match self.shards.len() {
            1 => first.reader.name(),
            n => format!("{} (+{} shards)", first.reader.name(), n - 1),
        }
    }

    fn server(&self) -> String {
        self.shards[0].reader.server()
    }

    fn server_for(&self, split: &Split) -> String {
        self.shard(split)
            .map(|s| s.reader.server())
            .unwrap_or_else(|_| self.server())
    }

    async fn estimate_rows(&self) -> Option<u64> {
        let mut total = Some(0u64);
        for chunk in self.shards.chunks(SCHEMA_PARALLELISM) {
            let futures: Vec<_> = chunk.iter().map(|s| s.reader.estimate_rows()).collect();
            for n in futures_util::future::join_all(futures).await {
                total = total.zip(n).map(|(a, b)| a + b);
            }
        }
        total
    }

    async fn schema(&self) -> Result<TableSchema, SyncError> {
        let first = self.shards[0].reader.schema().await?;
        let mut rest: Vec<(usize, TableSchema)> = Vec::new();
        for (c, chunk) in self.shards[1..].chunks(SCHEMA_PARALLELISM).enumerate() {
            let futures: Vec<_> = chunk.iter().map(|s| s.reader.schema()).collect();
            for (j, schema) in futures_util::future::join_all(futures)
                .await
                .into_iter()
                .enumerate()
            {
                rest.push((1 + c * SCHEMA_PARALLELISM + j, schema?));
            }
        }
        for (i, schema) in &rest {
            if let Some(diff) = same_columns(&first, schema) {
                return Err(SyncError::Invalid(format!(
                    "shard {} does not match {}: {diff}",
                    self.shards[*i].reader.name(),
                    self.shards[0].reader.name()
                )));
            }
        }
        let mut logical = first;
        if let Some(c) = &self.shard_column {
            if logical.column(c).is_some() {
                return Err(SyncError::Invalid(format!(
                    "shard column {c} is already a column of {}",
                    self.shards[0].reader.name()
                )));
            }
            logical.columns.push(Column {
                name: c.clone(),
                ty: CanonicalType::Utf8,
                nullable: false,
                native: "shard".into(),
            });
        }
        Ok(logical)
    }

    async fn splits(
        &self,
        schema: &TableSchema,
        split_pk: Option<&str>,
        max_splits: usize,
    ) -> Result<Vec<Split>, SyncError> {
        let physical = self.physical(schema);
        // Key ranges within shards only when the cap leaves at least two per shard.
        let per_shard = max_splits / self.shards.len();
        let mut splits = Vec::new();
        for (i, shard) in self.shards.iter().enumerate() {
            let parts = if per_shard >= 2 {
                shard.reader.splits(&physical, split_pk, per_shard).await?
            } else {
                vec![Split::whole(0)]
            };
            for mut s in parts {
                s.index = splits.len();
                s.shard = Some(ShardRef {
                    index: i,
                    name: shard.name.clone(),
                    column: self.shard_column.clone(),
                });
                splits.push(s);
            }
        }
        Ok(splits)
    }

    async fn read(
        &self,
        schema: &TableSchema,
        split: &Split,
        batch_rows: usize,
        out: mpsc::Sender<RecordBatch>,
        dirty: &DirtyLog,
    ) -> Result<(), SyncError> {
        let shard = self.shard(split)?;
        let physical = self.physical(schema);
        let own = Split {
            shard: None,
            ..split.clone()
        };
        let Some(column) = &self.shard_column else {
            return shard
                .reader
                .read(&physical, &own, batch_rows, out, dirty)
                .await;
        };
        let position = schema
            .columns
            .iter()
            .position(|c| &c.name == column)
            .ok_or_else(|| SyncError::Internal(format!("shard column {column} not in schema")))?;
        let arrow = schema.arrow();
        let (tx, mut rx) = mpsc::channel::<RecordBatch>(1);
        let read = shard.reader.read(&physical, &own, batch_rows, tx, dirty);
        let forward = async {
            while let Some(batch) = rx.recv().await {
                let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
                let names: ArrayRef = Arc::new(StringArray::from(vec![
                    shard.name.as_str();
                    batch.num_rows()
                ]));
                columns.insert(position, names);
                let batch = RecordBatch::try_new(arrow.clone(), columns)
                    .map_err(|e| SyncError::Internal(format!("adding the shard column: {e}")))?;
                if out.send(batch).await.is_err() {
                    // The writer stopped; its error is the one reported.
                    break;
                }
            }
            Ok::<(), SyncError>(())
        };
        let (r, f) = tokio::join!(read, forward);
        r?;
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_expand_with_their_width() {
        assert_eq!(
            expand_braces("db.order_{0000..0002}"),
            Ok(vec![
                "db.order_0000".to_string(),
                "db.order_0001".into(),
                "db.order_0002".into()
            ])
        );
        assert_eq!(
            expand_braces("s{1..2}.t_{8..10}"),
            Ok(
                ["s1.t_8", "s1.t_9", "s1.t_10", "s2.t_8", "s2.t_9", "s2.t_10"]
                    .map(String::from)
                    .to_vec()
            )
        );
        assert_eq!(expand_braces("plain.t"), Ok(vec!["plain.t".to_string()]));
        assert_eq!(expand_braces("a{x}b"), Ok(vec!["a{x}b".to_string()]));
        assert!(matches!(expand_braces("t_{5..1}"), Err(e) if e.contains("below")));
        assert!(matches!(expand_braces("t_{a..b}"), Err(e) if e.contains("decimal")));
        assert!(matches!(
            expand_braces("t_{0..999}_{0..999}"),
            Err(e) if e.contains("more than")
        ));
    }

    proptest::proptest! {
        #[test]
        fn expanding_garbage_never_panics(s in ".{0,40}") {
            let _ = expand_braces(&s);
        }
    }
}
