//! Dirty records: rows a reader cannot convert or a writer rejects. Each goes to the job's
//! dirty-record file as one JSON line `{"table", "split", "reason", "row"}`; the table fails
//! once its dirty rows pass `max_dirty_records`, or at the end when their share of the rows
//! read passes `max_dirty_ratio`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::SyncError;

#[derive(Debug)]
pub struct DirtyLog {
    table: String,
    file: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    path: Option<PathBuf>,
    count: AtomicU64,
    pub max_records: Option<u64>,
    pub max_ratio: Option<f64>,
}

impl DirtyLog {
    pub fn new(
        table: &str,
        path: Option<PathBuf>,
        max_records: Option<u64>,
        max_ratio: Option<f64>,
    ) -> Result<Self, SyncError> {
        let file = match &path {
            Some(p) => {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| SyncError::io(dir, e))?;
                }
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| SyncError::io(p, e))?;
                Some(Mutex::new(std::io::BufWriter::new(f)))
            }
            None => None,
        };
        Ok(DirtyLog {
            table: table.to_string(),
            file,
            path,
            count: AtomicU64::new(0),
            max_records,
            max_ratio,
        })
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Record one dirty row; fails when that passes `max_dirty_records`.
    pub fn record(
        &self,
        split: usize,
        reason: &str,
        row: serde_json::Value,
    ) -> Result<(), SyncError> {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::counter!("qanat_sync_dirty_records_total", "table" => self.table.clone())
            .increment(1);
        tracing::debug!(table = %self.table, split, reason, "dirty record");
        if let Some(f) = &self.file {
            let line = serde_json::json!({
                "table": self.table, "split": split, "reason": reason, "row": row,
            });
            let mut f = f
                .lock()
                .map_err(|_| SyncError::Internal("dirty log poisoned".into()))?;
            writeln!(f, "{line}")
                .and_then(|()| f.flush())
                .map_err(|e| SyncError::io(self.path.as_deref().unwrap_or("dirty".as_ref()), e))?;
        }
        if let Some(max) = self.max_records {
            if n > max {
                return Err(SyncError::TooDirty {
                    table: self.table.clone(),
                    reason: format!("{n} dirty records pass max_dirty_records = {max}"),
                });
            }
        }
        Ok(())
    }

    /// The end-of-table check of `max_dirty_ratio` against the rows read.
    pub fn check_ratio(&self, rows_read: u64) -> Result<(), SyncError> {
        let n = self.count();
        if let (Some(max), true) = (self.max_ratio, rows_read > 0) {
            let ratio = n as f64 / rows_read as f64;
            if ratio > max {
                return Err(SyncError::TooDirty {
                    table: self.table.clone(),
                    reason: format!(
                        "{n} dirty of {rows_read} rows ({ratio:.4}) pass max_dirty_ratio = {max}"
                    ),
                });
            }
        }
        Ok(())
    }
}
