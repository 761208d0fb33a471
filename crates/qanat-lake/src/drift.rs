//! Drift correction (F3): a day's changes chosen by four clocks instead of one.
//!
//! A change has four times: `modified_time` (the row's update time, a data column),
//! `log_time` (`_log_time`, when the source logged it), `proc_time` (a business event
//! time, optional) and `extract_time` (`_extract_time`). Cutting a day on `_log_time`
//! alone moves a row updated at 23:59:59 and logged at 00:00:02 into the wrong day.
//!
//! The rule, for day D = [start, end) in UTC and an overlap `w` (15 minutes by default):
//!
//! 1. Read changes with `log_time` in [start − w, end + w): the day's change-log partition
//!    and the neighbouring days' (the next day's must exist).
//! 2. Drop a change whose `modified_time` is not in D. A null `modified_time` counts as
//!    its `log_time`. A delete's row image is the row *before* the delete, so its
//!    `modified_time` says nothing about the delete: a delete is kept when its `log_time`
//!    is in D, and is never taken from the overlaps.
//! 3. The day part — `log_time` in [start − w, end) — keeps, per key, its changes in bus
//!    order (the delete mode then picks from them; for `keep`, the latest).
//! 4. The tail — `log_time` in [end, end + w) — keeps per key only the *earliest* change
//!    whose business times (`modified_time` and, when configured, `proc_time`) are in D.
//! 5. Full outer join of the two on the key: where a key has both, the tail's change
//!    wins, because it was made in D (step 2) and logged after every change of the day
//!    part: it is the key's latest state of D that drifted over midnight.
//!
//! `extract_time` is configurable for completeness but does not take part in the rule:
//! the extraction clock says when the connector ran, not when the row changed.
//!
//! Times may be Timestamp columns of any unit, Date32, Int64 milliseconds since the epoch,
//! or text (`2026-11-29 23:59:58`, RFC 3339); text without a zone is UTC. A value that
//! does not parse is null.

use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::TimestampMillisecondType;
use arrow_array::{Array, ArrayRef, BooleanArray, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use arrow_select::filter::filter_record_batch;

use crate::columns;
use crate::error::LakeError;
use crate::layout::Ds;
use crate::read::ParquetInput;

/// Milliseconds in a minute.
const MINUTE_MS: i64 = 60_000;

/// The four time columns and the overlap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriftConfig {
    pub modified_time: String,
    pub log_time: String,
    pub proc_time: Option<String>,
    pub extract_time: String,
    pub overlap_ms: i64,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            modified_time: "modified_time".into(),
            log_time: columns::LOG_TIME.into(),
            proc_time: None,
            extract_time: columns::EXTRACT_TIME.into(),
            overlap_ms: 15 * MINUTE_MS,
        }
    }
}

fn usable(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Timestamp(_, _)
            | DataType::Date32
            | DataType::Date64
            | DataType::Int64
            | DataType::Utf8
            | DataType::LargeUtf8
    )
}

impl DriftConfig {
    /// Every change file has the time columns, of a type the rule can read.
    pub fn check_columns(&self, inputs: &[ParquetInput]) -> Result<(), LakeError> {
        let names = [
            Some(&self.modified_time),
            Some(&self.log_time),
            self.proc_time.as_ref(),
        ];
        for input in inputs {
            for name in names.iter().flatten() {
                let Ok(field) = input.schema.field_with_name(name) else {
                    return Err(LakeError::MissingDriftColumn {
                        path: input.path.clone(),
                        column: (*name).clone(),
                    });
                };
                if !usable(field.data_type()) {
                    return Err(LakeError::BadDriftColumn {
                        path: input.path.clone(),
                        column: (*name).clone(),
                        found: field.data_type().clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// One day and its overlaps, in UTC milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriftWindow {
    pub start: i64,
    pub end: i64,
    pub overlap: i64,
}

/// Where a change goes under the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The day part: all changes count, in bus order.
    Day,
    /// The tail: only a key's earliest change counts.
    Tail,
}

impl DriftWindow {
    pub fn new(ds: Ds, config: &DriftConfig) -> Result<DriftWindow, LakeError> {
        if config.overlap_ms < 0 || config.overlap_ms > 24 * 60 * MINUTE_MS {
            return Err(LakeError::Invalid(format!(
                "drift overlap {} ms: expected 0 to 24 hours",
                config.overlap_ms
            )));
        }
        let start = ds
            .date()
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_millis())
            .ok_or_else(|| LakeError::Invalid(format!("day {ds} has no midnight")))?;
        Ok(DriftWindow {
            start,
            end: start + 24 * 60 * MINUTE_MS,
            overlap: config.overlap_ms,
        })
    }

    fn in_day(&self, t: i64) -> bool {
        self.start <= t && t < self.end
    }

    /// The rule for one change (steps 1, 2 and the tail's business-time test of step 4);
    /// `proc_time` is `None` when not configured, `Some(None)` when null.
    pub fn classify(
        &self,
        delete: bool,
        log_time: Option<i64>,
        modified_time: Option<i64>,
        proc_time: Option<Option<i64>>,
    ) -> Option<Part> {
        let log = log_time?;
        if log < self.start - self.overlap || log >= self.end + self.overlap {
            return None;
        }
        if delete {
            return self.in_day(log).then_some(Part::Day);
        }
        if !self.in_day(modified_time.unwrap_or(log)) {
            return None;
        }
        if log < self.end {
            return Some(Part::Day);
        }
        match proc_time {
            Some(proc) if !proc.is_some_and(|t| self.in_day(t)) => None,
            _ => Some(Part::Tail),
        }
    }

    /// A change-log batch's rows of the day part and of the tail (`true`).
    pub fn split(
        &self,
        config: &DriftConfig,
        batch: &RecordBatch,
        path: &Path,
    ) -> Result<Vec<(RecordBatch, bool)>, LakeError> {
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| LakeError::MissingDriftColumn {
                    path: path.to_owned(),
                    column: name.to_owned(),
                })
        };
        let log = millis(&column(&config.log_time)?, path, &config.log_time)?;
        let modified = millis(&column(&config.modified_time)?, path, &config.modified_time)?;
        let proc = match &config.proc_time {
            Some(name) => Some(millis(&column(name)?, path, name)?),
            None => None,
        };
        let op = batch
            .column_by_name(columns::OP)
            .and_then(|a| a.as_string_opt::<i32>().cloned());
        let mut day = Vec::with_capacity(batch.num_rows());
        let mut tail = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let delete = op
                .as_ref()
                .is_some_and(|op| op.is_valid(i) && op.value(i) == "d");
            let part = self.classify(delete, log[i], modified[i], proc.as_ref().map(|p| p[i]));
            day.push(part == Some(Part::Day));
            tail.push(part == Some(Part::Tail));
        }
        let mut out = Vec::with_capacity(2);
        for (mask, is_tail) in [(day, false), (tail, true)] {
            let mask = BooleanArray::from(mask);
            if mask.true_count() > 0 {
                let part = filter_record_batch(batch, &mask)
                    .map_err(LakeError::arrow(path.display().to_string()))?;
                out.push((part, is_tail));
            }
        }
        Ok(out)
    }
}

/// A time column as UTC milliseconds since the epoch.
pub fn millis(column: &ArrayRef, path: &Path, name: &str) -> Result<Vec<Option<i64>>, LakeError> {
    if let Some(ints) = column.as_primitive_opt::<arrow_array::types::Int64Type>() {
        return Ok(ints.iter().collect());
    }
    if !usable(column.data_type()) {
        return Err(LakeError::BadDriftColumn {
            path: path.to_owned(),
            column: name.to_owned(),
            found: column.data_type().clone(),
        });
    }
    // An offset rather than "UTC": zone names need arrow's chrono-tz feature.
    let target = DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into()));
    let cast = arrow_cast::cast(column, &target).map_err(LakeError::arrow(format!(
        "{}: column `{name}`",
        path.display()
    )))?;
    Ok(cast
        .as_primitive::<TimestampMillisecondType>()
        .iter()
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn text_dates_and_timestamps_read_as_utc_millis() {
        let text: ArrayRef = std::sync::Arc::new(arrow_array::StringArray::from(vec![
            Some("2026-11-29 23:59:58"),
            Some("2026-11-29T23:59:58.5Z"),
            Some("garbage"),
            None,
        ]));
        let ms = millis(&text, Path::new("f"), "c").unwrap();
        let expect = chrono::NaiveDate::from_ymd_opt(2026, 11, 29)
            .unwrap()
            .and_hms_opt(23, 59, 58)
            .unwrap()
            .and_utc()
            .timestamp_millis();
        assert_eq!(ms, vec![Some(expect), Some(expect + 500), None, None]);
    }
}
