//! Delimited files (E2): CSV or TSV, optionally gzip or zstd, each data file with a
//! verification file beside it.
//!
//! Address: `file:///dir/orders.csv?format=csv&compression=zstd&header=true` (format from
//! the extension when absent: `.tsv` is TSV, anything else CSV; compression from a trailing
//! `.gz` / `.zst`). `check=false` lets a source without a verification file be read.
//!
//! Text forms: CSV is RFC 4180 (`,`, `"` quoting, `\n` records, `\r\n` accepted); an unquoted
//! empty field is NULL, a quoted empty field `""` the empty string (PostgreSQL's CSV rule).
//! TSV is PostgreSQL's text COPY form (tab, backslash escapes, `\N` for NULL). The first line
//! holds the column names unless `header=false`. Cells are the canonical string forms of
//! `types` (binary as lower-case hex).
//!
//! Verification file: `<data file>.verify`, JSON `{"file", "rows", "bytes", "sha256",
//! "format", "compression", "header", "columns": [{"name", "type", "nullable"}],
//! "primary_key", "splits": [{"split", "rows"}]}`; `bytes` and `sha256` are of the data file
//! as stored (compressed). The writer writes each split to its own part (a gzip member or
//! zstd frame) in a hidden staging directory, joins the parts in split order into the data
//! file (renamed into place), and writes the verification file last, so a reader that finds
//! a verification file matching the data file has the whole file. The reader checks size and
//! SHA-256 before reading a row and the row count at the end, and refuses any mismatch.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow_array::RecordBatch;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::dirty::DirtyLog;
use crate::plugin::{Reader, Rejected, SplitWriter, WriteMode, Writer};
use crate::split::Split;
use crate::types::{cell, BatchBuilder, CanonicalType, CellRef, Column, TableSchema};
use crate::SyncError;

/// Field syntax of a delimited file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Csv,
    Tsv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// One data file and how it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    pub path: PathBuf,
    pub format: Format,
    pub compression: Compression,
    pub header: bool,
    /// Refuse to read without a matching verification file.
    pub check: bool,
}

impl FileSpec {
    /// From the path and the DSN's query (`key=value&…`); errors name the key.
    pub fn from_parts(path: PathBuf, query: Option<&str>) -> Result<FileSpec, String> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (stem, compression) = if let Some(s) = name.strip_suffix(".gz") {
            (s, Compression::Gzip)
        } else if let Some(s) = name.strip_suffix(".zst") {
            (s, Compression::Zstd)
        } else {
            (name.as_str(), Compression::None)
        };
        let format = if stem.ends_with(".tsv") {
            Format::Tsv
        } else {
            Format::Csv
        };
        let mut spec = FileSpec {
            path,
            format,
            compression,
            header: true,
            check: true,
        };
        let bool_of = |k: &str, v: &str| match v {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(format!("{k}={v:?}: expected true or false")),
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?}: expected key=value"))?;
            match k {
                "format" => {
                    spec.format = match v {
                        "csv" => Format::Csv,
                        "tsv" => Format::Tsv,
                        _ => return Err(format!("format={v:?}: expected csv or tsv")),
                    }
                }
                "compression" => {
                    spec.compression = match v {
                        "none" => Compression::None,
                        "gzip" | "gz" => Compression::Gzip,
                        "zstd" | "zst" => Compression::Zstd,
                        _ => return Err(format!("compression={v:?}: expected none, gzip or zstd")),
                    }
                }
                "header" => spec.header = bool_of(k, v)?,
                "check" => spec.check = bool_of(k, v)?,
                _ => {
                    return Err(format!(
                        "unknown key {k:?} (expected format, compression, header or check)"
                    ))
                }
            }
        }
        Ok(spec)
    }

    /// The verification file of the data file.
    pub fn verification_path(&self) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(".verify");
        PathBuf::from(s)
    }

    fn display(&self) -> String {
        self.path.display().to_string()
    }
}

/// A column in the verification file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FileColumn {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub nullable: bool,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SplitRows {
    pub split: usize,
    pub rows: u64,
}

/// The verification file's content.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Verification {
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
    pub sha256: String,
    pub format: Format,
    pub compression: Compression,
    pub header: bool,
    pub columns: Vec<FileColumn>,
    #[serde(default)]
    pub primary_key: Vec<String>,
    #[serde(default)]
    pub splits: Vec<SplitRows>,
}

fn verification_error(spec: &FileSpec, reason: impl Into<String>) -> SyncError {
    SyncError::Verification {
        file: spec.display(),
        reason: reason.into(),
    }
}

/// Append one cell in the file's text form.
fn encode_cell(format: Format, out: &mut Vec<u8>, c: CellRef<'_>) {
    match format {
        Format::Tsv => match c {
            CellRef::Bytes(b) => out.extend_from_slice(crate::types::hex(b).as_bytes()),
            other => crate::pgcopy::encode_cell(out, other),
        },
        Format::Csv => {
            let Some(text) = c.render() else {
                return; // NULL: an unquoted empty field
            };
            let needs_quotes = text.is_empty()
                || text
                    .bytes()
                    .any(|b| matches!(b, b',' | b'"' | b'\n' | b'\r'));
            if needs_quotes {
                out.push(b'"');
                for b in text.bytes() {
                    if b == b'"' {
                        out.push(b'"');
                    }
                    out.push(b);
                }
                out.push(b'"');
            } else {
                out.extend_from_slice(text.as_bytes());
            }
        }
    }
}

fn encode_header(format: Format, names: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, n) in names.iter().enumerate() {
        if i > 0 {
            out.push(if format == Format::Csv { b',' } else { b'\t' });
        }
        encode_cell(format, &mut out, CellRef::Text(n));
    }
    out.push(b'\n');
    out
}

/// A streaming RFC 4180 record reader. Hand-written rather than the `csv` crate because the
/// NULL / empty-string distinction rests on whether an empty field was quoted, which that
/// crate does not report.
pub struct CsvRecords<R> {
    input: R,
    /// Fields of the current record; `None` for an unquoted empty field.
    pub fields: Vec<Option<Vec<u8>>>,
    /// Records read so far, for messages.
    pub records: u64,
}

impl<R: BufRead> CsvRecords<R> {
    pub fn new(input: R) -> Self {
        CsvRecords {
            input,
            fields: Vec::new(),
            records: 0,
        }
    }

    /// Read the next record into `fields`; `false` at the end of the input.
    pub fn next_record(&mut self) -> Result<bool, String> {
        self.fields.clear();
        let mut field: Vec<u8> = Vec::new();
        let mut quoted = false; // the current field was quoted
        let mut in_quotes = false;
        let mut after_quote = false; // just saw a `"` inside quotes
        let mut any = false;
        loop {
            let buf = self.input.fill_buf().map_err(|e| e.to_string())?;
            if buf.is_empty() {
                if in_quotes && !after_quote {
                    return Err(format!(
                        "record {}: unterminated quoted field at the end of the file",
                        self.records + 1
                    ));
                }
                if !any {
                    return Ok(false);
                }
                push_field(&mut self.fields, &mut field, quoted);
                self.records += 1;
                return Ok(true);
            }
            let mut used = 0;
            let mut done = false;
            for &b in buf {
                used += 1;
                any = true;
                if in_quotes {
                    if after_quote {
                        after_quote = false;
                        if b == b'"' {
                            field.push(b'"');
                            continue;
                        }
                        in_quotes = false;
                        // fall through: the byte after a closing quote
                    } else if b == b'"' {
                        after_quote = true;
                        continue;
                    } else {
                        field.push(b);
                        continue;
                    }
                }
                match b {
                    b',' => {
                        push_field(&mut self.fields, &mut field, quoted);
                        quoted = false;
                    }
                    b'\n' => {
                        if field.last() == Some(&b'\r') && !quoted {
                            field.pop();
                        }
                        push_field(&mut self.fields, &mut field, quoted);
                        done = true;
                        break;
                    }
                    b'\r' if quoted => {} // `"…"\r\n`
                    b'"' if field.is_empty() && !quoted => {
                        quoted = true;
                        in_quotes = true;
                    }
                    _ if quoted => {
                        return Err(format!(
                            "record {}: unexpected {:?} after a closing quote",
                            self.records + 1,
                            b as char
                        ))
                    }
                    _ => field.push(b),
                }
            }
            self.input.consume(used);
            if done {
                self.records += 1;
                return Ok(true);
            }
        }
    }
}

fn push_field(fields: &mut Vec<Option<Vec<u8>>>, field: &mut Vec<u8>, quoted: bool) {
    let f = std::mem::take(field);
    fields.push(if f.is_empty() && !quoted {
        None
    } else {
        Some(f)
    });
}

/// Undo the hex form of binary columns before the text → Arrow conversion.
fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|p| {
            let d = |b: u8| (b as char).to_digit(16);
            Some((d(p[0])? * 16 + d(p[1])?) as u8)
        })
        .collect()
}

fn open_decoded(spec: &FileSpec) -> Result<Box<dyn BufRead + Send>, SyncError> {
    let file = File::open(&spec.path).map_err(|e| SyncError::io(&spec.path, e))?;
    let raw = BufReader::with_capacity(1 << 20, file);
    Ok(match spec.compression {
        Compression::None => Box::new(raw),
        Compression::Gzip => Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::bufread::MultiGzDecoder::new(raw),
        )),
        Compression::Zstd => Box::new(BufReader::with_capacity(
            1 << 20,
            zstd::stream::read::Decoder::with_buffer(raw)
                .map_err(|e| SyncError::io(&spec.path, e))?,
        )),
    })
}

/// A data file as a source (and, for `--verify`, the file a [`FileWriter`] wrote).
#[derive(Debug, Clone)]
pub struct FileTable {
    spec: FileSpec,
    checked: Arc<Mutex<Option<Verification>>>,
    /// Read split N as the rows the writer's split N wrote (for `--verify`), rather than the
    /// whole file as one split.
    by_split: bool,
}

impl FileTable {
    pub fn new(spec: FileSpec) -> Self {
        FileTable {
            spec,
            checked: Arc::default(),
            by_split: false,
        }
    }

    /// Read the verification file and check the data file's size and SHA-256 against it.
    pub fn check(&self) -> Result<Option<Verification>, SyncError> {
        let vpath = self.spec.verification_path();
        let text = match std::fs::read_to_string(&vpath) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !self.spec.check => {
                return Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !self.spec.path.exists() {
                    return Err(SyncError::UnknownTable {
                        table: format!("{} (file)", self.spec.display()),
                    });
                }
                return Err(verification_error(
                    &self.spec,
                    format!(
                        "no verification file {} (add ?check=false to read the file unchecked)",
                        vpath.display()
                    ),
                ));
            }
            Err(e) => return Err(SyncError::io(&vpath, e)),
        };
        let v: Verification = serde_json::from_str(&text).map_err(|e| {
            verification_error(
                &self.spec,
                format!("verification file {} is not valid: {e}", vpath.display()),
            )
        })?;
        let meta =
            std::fs::metadata(&self.spec.path).map_err(|e| SyncError::io(&self.spec.path, e))?;
        if meta.len() != v.bytes {
            return Err(verification_error(
                &self.spec,
                format!(
                    "size is {} bytes, the verification file says {}",
                    meta.len(),
                    v.bytes
                ),
            ));
        }
        let mut file =
            File::open(&self.spec.path).map_err(|e| SyncError::io(&self.spec.path, e))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| SyncError::io(&self.spec.path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let sha = crate::types::hex(&hasher.finalize());
        if sha != v.sha256 {
            return Err(verification_error(
                &self.spec,
                format!("SHA-256 is {sha}, the verification file says {}", v.sha256),
            ));
        }
        if v.format != self.spec.format || v.compression != self.spec.compression {
            return Err(verification_error(
                &self.spec,
                format!(
                    "written as {:?}/{:?}, read as {:?}/{:?}",
                    v.format, v.compression, self.spec.format, self.spec.compression
                ),
            ));
        }
        Ok(Some(v))
    }

    /// Call `on_row` with each data row's cells; the header line is skipped.
    fn for_each_row(
        &self,
        header: bool,
        mut on_row: impl FnMut(&[Option<&[u8]>]) -> Result<bool, SyncError>,
    ) -> Result<(), SyncError> {
        let input = open_decoded(&self.spec)?;
        let bad = |reason: String| SyncError::Invalid(format!("{}: {reason}", self.spec.display()));
        let mut first = header;
        match self.spec.format {
            Format::Csv => {
                let mut records = CsvRecords::new(input);
                while records.next_record().map_err(bad)? {
                    if std::mem::take(&mut first) {
                        continue;
                    }
                    let cells: Vec<Option<&[u8]>> =
                        records.fields.iter().map(|f| f.as_deref()).collect();
                    if !on_row(&cells)? {
                        break;
                    }
                }
            }
            Format::Tsv => {
                let mut splitter = crate::pgcopy::LineSplitter::default();
                let mut input = input;
                let mut stop = false;
                loop {
                    let buf = input
                        .fill_buf()
                        .map_err(|e| SyncError::io(&self.spec.path, e))?;
                    if buf.is_empty() || stop {
                        break;
                    }
                    let n = buf.len();
                    splitter.feed(buf, |cells| {
                        if stop || std::mem::take(&mut first) {
                            return Ok(());
                        }
                        stop = !on_row(cells)?;
                        Ok::<(), SyncError>(())
                    })?;
                    input.consume(n);
                }
                if splitter.leftover() > 0 && !stop {
                    return Err(bad("the last line has no line end".into()));
                }
            }
        }
        Ok(())
    }
}

/// What the file-parsing thread hands to the async reader.
enum Parsed {
    Batch(RecordBatch),
    Dirty(String, serde_json::Value),
}

fn dirty_json(columns: &[Column], cells: &[Option<&[u8]>]) -> serde_json::Value {
    serde_json::Value::Object(
        columns
            .iter()
            .zip(cells)
            .map(|(c, v)| {
                (
                    c.name.clone(),
                    v.map_or(serde_json::Value::Null, |b| {
                        serde_json::Value::String(String::from_utf8_lossy(b).into_owned())
                    }),
                )
            })
            .collect(),
    )
}

impl FileTable {
    /// Parse the rows `skip..skip + take` (all when `take` is `None`) into batches on `tx`;
    /// the number of data rows seen.
    #[allow(clippy::too_many_arguments)]
    fn parse_rows(
        &self,
        schema: &TableSchema,
        header: bool,
        positions: &[usize],
        binary: &[bool],
        skip: u64,
        take: Option<u64>,
        batch_rows: usize,
        tx: &mpsc::Sender<Parsed>,
    ) -> Result<u64, SyncError> {
        let width = self
            .checked
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|v| v.columns.len()))
            .unwrap_or(schema.columns.len());
        let mut builder = BatchBuilder::new(schema);
        let mut seen = 0u64;
        let mut decoded: Vec<Option<Vec<u8>>> = Vec::with_capacity(positions.len());
        self.for_each_row(header, |cells| {
            let index = seen;
            seen += 1;
            if index < skip {
                return Ok(true);
            }
            if take.is_some_and(|t| index >= skip + t) {
                seen -= 1;
                return Ok(false);
            }
            if cells.len() != width {
                let reason = format!("line of {} fields, expected {width}", cells.len());
                let row = dirty_json(&schema.columns, cells);
                return Ok(tx.blocking_send(Parsed::Dirty(reason, row)).is_ok());
            }
            decoded.clear();
            let mut not_hex = None;
            for ((p, is_bin), column) in positions.iter().zip(binary).zip(&schema.columns) {
                decoded.push(match cells[*p] {
                    Some(v) if *is_bin => {
                        let bytes = unhex(v);
                        if bytes.is_none() {
                            not_hex.get_or_insert(column);
                        }
                        bytes
                    }
                    Some(v) => Some(v.to_vec()),
                    None => None,
                });
            }
            if let Some(column) = not_hex {
                // A binary cell that is not hex is a bad row, never its text stored as bytes.
                let reason = format!("column {}: binary value is not hex", column.name);
                let raw: Vec<Option<&[u8]>> = positions.iter().map(|p| cells[*p]).collect();
                let row = dirty_json(&schema.columns, &raw);
                return Ok(tx.blocking_send(Parsed::Dirty(reason, row)).is_ok());
            }
            let picked: Vec<Option<&[u8]>> = decoded.iter().map(|c| c.as_deref()).collect();
            if let Err(e) = builder.push_text_row(&picked) {
                let row = dirty_json(&schema.columns, &picked);
                if tx.blocking_send(Parsed::Dirty(e.to_string(), row)).is_err() {
                    return Ok(false);
                }
            }
            if builder.rows() >= batch_rows || builder.bytes() >= crate::job::BATCH_BYTES {
                return Ok(tx.blocking_send(Parsed::Batch(builder.finish())).is_ok());
            }
            Ok(true)
        })?;
        if builder.rows() > 0 {
            let _ = tx.blocking_send(Parsed::Batch(builder.finish()));
        }
        Ok(seen)
    }
}

pub(crate) fn canonical_from_name(name: &str) -> Option<CanonicalType> {
    Some(match name {
        "bool" => CanonicalType::Bool,
        "int64" => CanonicalType::Int64,
        "float64" => CanonicalType::Float64,
        "utf8" => CanonicalType::Utf8,
        "binary" => CanonicalType::Binary,
        "date" => CanonicalType::Date,
        "time" => CanonicalType::Time,
        "timestamp" => CanonicalType::Timestamp,
        "timestamptz" => CanonicalType::TimestampTz,
        _ => {
            let args = name.strip_prefix("decimal(")?.strip_suffix(')')?;
            let (p, s) = args.split_once(',')?;
            let precision: u8 = p.trim().parse().ok()?;
            let scale: i8 = s.trim().parse().ok()?;
            if precision == 0 || precision > 38 || scale < 0 || scale as u8 > precision {
                return None;
            }
            CanonicalType::Decimal { precision, scale }
        }
    })
}

#[async_trait::async_trait]
impl Reader for FileTable {
    fn name(&self) -> String {
        self.spec.display()
    }

    async fn schema(&self) -> Result<TableSchema, SyncError> {
        let v = tokio::task::block_in_place(|| self.check())?;
        let schema = match &v {
            Some(v) => TableSchema {
                columns: v
                    .columns
                    .iter()
                    .map(|c| {
                        Ok(Column {
                            name: c.name.clone(),
                            ty: canonical_from_name(&c.ty).ok_or_else(|| {
                                SyncError::UnsupportedType {
                                    table: self.name(),
                                    column: c.name.clone(),
                                    native: c.ty.clone(),
                                }
                            })?,
                            nullable: c.nullable,
                            native: c.ty.clone(),
                        })
                    })
                    .collect::<Result<_, SyncError>>()?,
                primary_key: v.primary_key.clone(),
            },
            None => {
                // An unchecked foreign file: every column is text, named by the header.
                if !self.spec.header {
                    return Err(SyncError::Invalid(format!(
                        "{}: without a verification file the columns come from the header; \
                         header=false leaves them unknown",
                        self.name()
                    )));
                }
                let mut names = Vec::new();
                tokio::task::block_in_place(|| {
                    self.for_each_row(false, |cells| {
                        names = cells
                            .iter()
                            .map(|c| String::from_utf8_lossy(c.unwrap_or_default()).into_owned())
                            .collect();
                        Ok(false)
                    })
                })?;
                TableSchema {
                    columns: names
                        .into_iter()
                        .map(|name| Column {
                            name,
                            ty: CanonicalType::Utf8,
                            nullable: true,
                            native: "text".into(),
                        })
                        .collect(),
                    primary_key: Vec::new(),
                }
            }
        };
        if let Ok(mut c) = self.checked.lock() {
            *c = v;
        }
        Ok(schema)
    }

    async fn splits(
        &self,
        _schema: &TableSchema,
        _split_pk: Option<&str>,
        _max_splits: usize,
    ) -> Result<Vec<Split>, SyncError> {
        Ok(vec![Split::whole(0)])
    }

    async fn read(
        &self,
        schema: &TableSchema,
        split: &Split,
        batch_rows: usize,
        out: mpsc::Sender<RecordBatch>,
        dirty: &DirtyLog,
    ) -> Result<(), SyncError> {
        let verification = self.checked.lock().ok().and_then(|c| c.clone());
        let header = verification.as_ref().map_or(self.spec.header, |v| v.header);
        // The file's columns in its order, and where each of `schema`'s columns is.
        let file_columns: Vec<String> = match &verification {
            Some(v) => v.columns.iter().map(|c| c.name.clone()).collect(),
            None => schema.columns.iter().map(|c| c.name.clone()).collect(),
        };
        let positions: Vec<usize> = schema
            .columns
            .iter()
            .map(|c| {
                file_columns
                    .iter()
                    .position(|n| *n == c.name)
                    .ok_or_else(|| SyncError::UnknownColumn {
                        table: self.name(),
                        column: c.name.clone(),
                    })
            })
            .collect::<Result<_, _>>()?;
        // A split of the writer's job is a run of rows in the file (for `--verify`); a file
        // read as a source is one split.
        let (skip, take) = match verification.as_ref().filter(|_| self.by_split) {
            Some(v) => {
                let at = v.splits.iter().position(|s| s.split == split.index);
                match at {
                    Some(at) => (
                        v.splits[..at].iter().map(|s| s.rows).sum::<u64>(),
                        Some(v.splits[at].rows),
                    ),
                    None => (0, Some(0)),
                }
            }
            None => (0, None),
        };
        let binary: Vec<bool> = schema
            .columns
            .iter()
            .map(|c| c.ty == CanonicalType::Binary)
            .collect();
        // Parsing is blocking file I/O: a blocking thread sends batches and dirty rows.
        let (tx, mut rx) = mpsc::channel::<Parsed>(2);
        let this = self.clone();
        let schema_c = schema.clone();
        let parse = tokio::task::spawn_blocking(move || {
            this.parse_rows(
                &schema_c, header, &positions, &binary, skip, take, batch_rows, &tx,
            )
        });
        while let Some(msg) = rx.recv().await {
            match msg {
                Parsed::Batch(b) => {
                    if out.send(b).await.is_err() {
                        break;
                    }
                }
                Parsed::Dirty(reason, row) => dirty.record(split.index, &reason, row)?,
            }
        }
        drop(rx);
        let seen = parse
            .await
            .map_err(|e| SyncError::Internal(format!("file reader task: {e}")))??;
        let data_rows = seen.saturating_sub(skip);
        if let (Some(v), None) = (&verification, take) {
            if data_rows != v.rows {
                return Err(verification_error(
                    &self.spec,
                    format!(
                        "{data_rows} rows read, the verification file says {}",
                        v.rows
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Writes one data file and its verification file.
#[derive(Debug)]
pub struct FileWriter {
    spec: FileSpec,
    staging: PathBuf,
    schema: Mutex<Option<TableSchema>>,
    /// Committed parts: split index → rows.
    parts: Arc<Mutex<BTreeMap<usize, u64>>>,
}

impl FileWriter {
    pub fn new(spec: FileSpec) -> Self {
        let dir = spec
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let name = spec
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let staging = dir.join(format!(".{name}.staging-{}", std::process::id()));
        FileWriter {
            spec,
            staging,
            schema: Mutex::new(None),
            parts: Arc::default(),
        }
    }

    fn part_path(&self, index: usize) -> PathBuf {
        self.staging.join(format!("part-{index:05}"))
    }
}

/// A compressing sink over a file.
enum Encoder {
    Plain(std::io::BufWriter<File>),
    Gzip(flate2::write::GzEncoder<std::io::BufWriter<File>>),
    Zstd(zstd::stream::write::Encoder<'static, std::io::BufWriter<File>>),
}

impl Encoder {
    fn new(compression: Compression, file: File) -> std::io::Result<Encoder> {
        let w = std::io::BufWriter::with_capacity(1 << 20, file);
        Ok(match compression {
            Compression::None => Encoder::Plain(w),
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                w,
                flate2::Compression::fast(),
            )),
            Compression::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(w, 3)?),
        })
    }

    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Encoder::Plain(w) => w.write_all(data),
            Encoder::Gzip(w) => w.write_all(data),
            Encoder::Zstd(w) => w.write_all(data),
        }
    }

    fn finish(self) -> std::io::Result<File> {
        let w = match self {
            Encoder::Plain(w) => w,
            Encoder::Gzip(w) => w.finish()?,
            Encoder::Zstd(w) => w.finish()?,
        };
        w.into_inner().map_err(|e| e.into_error())
    }
}

fn encoded_file(compression: Compression, path: &Path, data: &[u8]) -> Result<(), SyncError> {
    let file = File::create(path).map_err(|e| SyncError::io(path, e))?;
    let mut enc = Encoder::new(compression, file).map_err(|e| SyncError::io(path, e))?;
    enc.write_all(data).map_err(|e| SyncError::io(path, e))?;
    let file = enc.finish().map_err(|e| SyncError::io(path, e))?;
    file.sync_all().map_err(|e| SyncError::io(path, e))
}

#[async_trait::async_trait]
impl Writer for FileWriter {
    fn name(&self) -> String {
        self.spec.display()
    }

    async fn prepare(&self, schema: &TableSchema, mode: WriteMode) -> Result<(), SyncError> {
        if mode == WriteMode::Upsert {
            return Err(SyncError::Invalid(format!(
                "{} is written whole; mode upsert does not apply to a file (use insert)",
                self.name()
            )));
        }
        if let Some(dir) = self.spec.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| SyncError::io(dir, e))?;
        }
        if self.staging.exists() {
            std::fs::remove_dir_all(&self.staging).map_err(|e| SyncError::io(&self.staging, e))?;
        }
        std::fs::create_dir_all(&self.staging).map_err(|e| SyncError::io(&self.staging, e))?;
        *self
            .schema
            .lock()
            .map_err(|_| SyncError::Internal("writer state poisoned".into()))? =
            Some(schema.clone());
        Ok(())
    }

    async fn open(&self, split: &Split, attempt: u32) -> Result<Box<dyn SplitWriter>, SyncError> {
        let tmp = self
            .staging
            .join(format!("part-{:05}.attempt-{attempt}", split.index));
        let file = File::create(&tmp).map_err(|e| SyncError::io(&tmp, e))?;
        let encoder =
            Encoder::new(self.spec.compression, file).map_err(|e| SyncError::io(&tmp, e))?;
        Ok(Box::new(FileSplitWriter {
            encoder: Some(encoder),
            format: self.spec.format,
            tmp,
            path: self.part_path(split.index),
            index: split.index,
            rows: 0,
            parts: self.parts.clone(),
        }))
    }

    async fn commit(&self) -> Result<(), SyncError> {
        let schema = self
            .schema
            .lock()
            .map_err(|_| SyncError::Internal("writer state poisoned".into()))?
            .clone()
            .ok_or_else(|| SyncError::Internal("commit before prepare".into()))?;
        let parts = self
            .parts
            .lock()
            .map_err(|_| SyncError::Internal("writer state poisoned".into()))?
            .clone();
        tokio::task::block_in_place(|| self.assemble(&schema, &parts))
    }

    async fn abort(&self) -> Option<String> {
        let _ = std::fs::remove_dir_all(&self.staging);
        None
    }

    fn verifier(&self) -> Option<Arc<dyn Reader>> {
        Some(Arc::new(FileTable {
            by_split: true,
            ..FileTable::new(self.spec.clone())
        }))
    }
}

impl FileWriter {
    /// Join the header and the parts into the data file, then write the verification file.
    fn assemble(
        &self,
        schema: &TableSchema,
        parts: &BTreeMap<usize, u64>,
    ) -> Result<(), SyncError> {
        let data_tmp = self.staging.join("data");
        if self.spec.header {
            let names: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
            encoded_file(
                self.spec.compression,
                &data_tmp,
                &encode_header(self.spec.format, &names),
            )?;
        } else {
            File::create(&data_tmp).map_err(|e| SyncError::io(&data_tmp, e))?;
        }
        let mut out = std::fs::OpenOptions::new()
            .append(true)
            .open(&data_tmp)
            .map_err(|e| SyncError::io(&data_tmp, e))?;
        // gzip members and zstd frames concatenate into one valid stream.
        for index in parts.keys() {
            let part = self.part_path(*index);
            let mut f = File::open(&part).map_err(|e| SyncError::io(&part, e))?;
            std::io::copy(&mut f, &mut out).map_err(|e| SyncError::io(&data_tmp, e))?;
        }
        out.sync_all().map_err(|e| SyncError::io(&data_tmp, e))?;
        drop(out);
        let mut hasher = Sha256::new();
        let mut f = File::open(&data_tmp).map_err(|e| SyncError::io(&data_tmp, e))?;
        let bytes = std::io::copy(&mut f, &mut hasher).map_err(|e| SyncError::io(&data_tmp, e))?;
        let verification = Verification {
            file: self
                .spec
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            rows: parts.values().sum(),
            bytes,
            sha256: crate::types::hex(&hasher.finalize()),
            format: self.spec.format,
            compression: self.spec.compression,
            header: self.spec.header,
            columns: schema
                .columns
                .iter()
                .map(|c| FileColumn {
                    name: c.name.clone(),
                    ty: c.ty.name(),
                    nullable: c.nullable,
                })
                .collect(),
            primary_key: schema.primary_key.clone(),
            splits: parts
                .iter()
                .map(|(split, rows)| SplitRows {
                    split: *split,
                    rows: *rows,
                })
                .collect(),
        };
        // The old verification file goes first: a reader never pairs it with the new data.
        let vpath = self.spec.verification_path();
        match std::fs::remove_file(&vpath) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(SyncError::io(&vpath, e)),
        }
        std::fs::rename(&data_tmp, &self.spec.path)
            .map_err(|e| SyncError::io(&self.spec.path, e))?;
        let vtmp = self.staging.join("verify");
        let text = serde_json::to_vec_pretty(&verification)
            .map_err(|e| SyncError::Internal(format!("encoding the verification file: {e}")))?;
        std::fs::write(&vtmp, text).map_err(|e| SyncError::io(&vtmp, e))?;
        File::open(&vtmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| SyncError::io(&vtmp, e))?;
        std::fs::rename(&vtmp, &vpath).map_err(|e| SyncError::io(&vpath, e))?;
        if let Some(dir) = self.spec.path.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        std::fs::remove_dir_all(&self.staging).map_err(|e| SyncError::io(&self.staging, e))?;
        Ok(())
    }
}

struct FileSplitWriter {
    encoder: Option<Encoder>,
    format: Format,
    tmp: PathBuf,
    path: PathBuf,
    index: usize,
    rows: u64,
    parts: Arc<Mutex<BTreeMap<usize, u64>>>,
}

#[async_trait::async_trait]
impl SplitWriter for FileSplitWriter {
    async fn write(&mut self, batch: &RecordBatch) -> Result<Vec<Rejected>, SyncError> {
        let mut buf = Vec::with_capacity(batch.num_rows() * 64);
        let sep = if self.format == Format::Csv {
            b','
        } else {
            b'\t'
        };
        for row in 0..batch.num_rows() {
            for (i, col) in batch.columns().iter().enumerate() {
                if i > 0 {
                    buf.push(sep);
                }
                encode_cell(self.format, &mut buf, cell(col.as_ref(), row));
            }
            buf.push(b'\n');
        }
        let enc = self
            .encoder
            .as_mut()
            .ok_or_else(|| SyncError::Internal("split writer used after finish".into()))?;
        tokio::task::block_in_place(|| enc.write_all(&buf))
            .map_err(|e| SyncError::io(&self.tmp, e))?;
        self.rows += batch.num_rows() as u64;
        Ok(Vec::new())
    }

    async fn finish(mut self: Box<Self>) -> Result<(), SyncError> {
        let enc = self
            .encoder
            .take()
            .ok_or_else(|| SyncError::Internal("split writer finished twice".into()))?;
        let file = tokio::task::block_in_place(|| enc.finish())
            .map_err(|e| SyncError::io(&self.tmp, e))?;
        file.sync_all().map_err(|e| SyncError::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| SyncError::io(&self.path, e))?;
        self.parts
            .lock()
            .map_err(|_| SyncError::Internal("writer state poisoned".into()))?
            .insert(self.index, self.rows);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_all(data: &[u8]) -> Result<Vec<Vec<Option<Vec<u8>>>>, String> {
        let mut r = CsvRecords::new(data);
        let mut out = Vec::new();
        while r.next_record()? {
            out.push(r.fields.clone());
        }
        Ok(out)
    }

    #[test]
    fn csv_tells_null_from_empty_and_unquotes() {
        let rows = parse_all(b"a,,\"\",\"x,\"\"y\"\"\nz\"\r\n1,2,3\r\n").unwrap_or_default();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0][0].as_deref(), Some(b"a".as_slice()));
        assert_eq!(rows[0][1], None);
        assert_eq!(rows[0][2].as_deref(), Some(b"".as_slice()));
        assert_eq!(rows[0][3].as_deref(), Some(b"x,\"y\"\nz".as_slice()));
        assert_eq!(rows[1][2].as_deref(), Some(b"3".as_slice()));
        assert!(parse_all(b"\"open").is_err());
        assert!(parse_all(b"\"a\"b\n").is_err());
    }

    #[test]
    fn dsn_query_sets_format_and_compression() {
        let s = FileSpec::from_parts(PathBuf::from("/d/o.tsv.gz"), None);
        assert!(
            matches!(&s, Ok(s) if s.format == Format::Tsv && s.compression == Compression::Gzip)
        );
        let s = FileSpec::from_parts(
            PathBuf::from("/d/o.dat"),
            Some("format=csv&compression=zstd&header=false"),
        );
        assert!(
            matches!(&s, Ok(s) if s.format == Format::Csv && s.compression == Compression::Zstd && !s.header)
        );
        let e = FileSpec::from_parts(PathBuf::from("/d/o.csv"), Some("compresion=zstd"));
        assert!(matches!(&e, Err(m) if m.contains("compresion")));
    }

    proptest! {
        #[test]
        fn csv_cells_survive_encode_then_parse(cells in prop::collection::vec(prop::option::of(".{0,12}"), 1..6)) {
            let mut buf = Vec::new();
            for (i, c) in cells.iter().enumerate() {
                if i > 0 { buf.push(b','); }
                match c {
                    Some(t) => encode_cell(Format::Csv, &mut buf, CellRef::Text(t)),
                    None => encode_cell(Format::Csv, &mut buf, CellRef::Null),
                }
            }
            buf.push(b'\n');
            let rows = parse_all(&buf).map_err(TestCaseError::fail)?;
            prop_assert_eq!(rows.len(), 1);
            let got: Vec<Option<String>> = rows[0].iter().map(|f| f.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())).collect();
            prop_assert_eq!(got, cells);
        }

        #[test]
        fn csv_garbage_never_panics(data in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_all(&data);
        }
    }
}
