//! Reading the Parquet files of a partition: listing, schemas, union by column name.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use arrow_array::RecordBatch;
use arrow_schema::{DataType, Field, SchemaRef};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use crate::error::LakeError;

/// Rows per batch read from Parquet.
pub const BATCH_ROWS: usize = 65_536;

/// One Parquet file with what its footer says.
#[derive(Debug, Clone)]
pub struct ParquetInput {
    pub path: PathBuf,
    pub schema: SchemaRef,
    pub rows: u64,
    pub bytes: u64,
    /// Sum of the row groups' uncompressed sizes: what the file takes decoded, roughly.
    pub uncompressed: u64,
    pub metadata: HashMap<String, String>,
}

impl ParquetInput {
    /// Reads the footer of `path`.
    pub fn open(path: &Path) -> Result<ParquetInput, LakeError> {
        let file = File::open(path).map_err(LakeError::io(path))?;
        let bytes = file.metadata().map_err(LakeError::io(path))?.len();
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(LakeError::parquet(path))?;
        let meta = builder.metadata();
        let rows = meta.file_metadata().num_rows().max(0) as u64;
        let uncompressed = meta
            .row_groups()
            .iter()
            .map(|rg| rg.total_byte_size().max(0) as u64)
            .sum();
        // Schema metadata of the Arrow writer and the file's own key-value pairs alike.
        let mut metadata: HashMap<String, String> = builder.schema().metadata().clone();
        let file_metadata: HashMap<String, String> = meta
            .file_metadata()
            .key_value_metadata()
            .map(|kvs| {
                kvs.iter()
                    .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?)))
                    .collect()
            })
            .unwrap_or_default();
        metadata.extend(file_metadata);
        Ok(ParquetInput {
            path: path.to_owned(),
            schema: builder.schema().clone(),
            rows,
            bytes,
            uncompressed,
            metadata,
        })
    }

    /// The file's batches, errors naming the file.
    pub fn batches(&self) -> Result<Batches, LakeError> {
        let file = File::open(&self.path).map_err(LakeError::io(&self.path))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(LakeError::parquet(&self.path))?
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(LakeError::parquet(&self.path))?;
        Ok(Batches {
            path: self.path.clone(),
            reader,
        })
    }
}

/// The batches of one Parquet file.
pub struct Batches {
    path: PathBuf,
    reader: ParquetRecordBatchReader,
}

impl Iterator for Batches {
    type Item = Result<RecordBatch, LakeError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.reader.next().map(|batch| {
            batch.map_err(|source| LakeError::Arrow {
                context: format!("{}: not a readable Parquet file", self.path.display()),
                source,
            })
        })
    }
}

/// The Parquet files under `dir` (recursively, through `hh=` directories), in name order.
/// Names starting with `.` or `_` (temporary files, `_SUCCESS`) are not data.
pub fn parquet_files(dir: &Path) -> Result<Vec<PathBuf>, LakeError> {
    let mut files = Vec::new();
    collect(dir, &mut files)?;
    files.sort();
    Ok(files)
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), LakeError> {
    for entry in fs::read_dir(dir).map_err(LakeError::io(dir))? {
        let entry = entry.map_err(LakeError::io(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(LakeError::io(&path))?;
        if kind.is_dir() {
            collect(&path, files)?;
        } else if name.ends_with(".parquet") {
            files.push(path);
        }
    }
    Ok(())
}

/// Columns by name across files: the first file's order, then new names as they appear.
/// The same name with two types is a [`LakeError::TypeConflict`] naming both files.
#[derive(Debug, Default)]
pub struct SchemaUnion {
    fields: Vec<(Field, PathBuf)>,
}

impl SchemaUnion {
    pub fn add(&mut self, path: &Path, schema: &SchemaRef) -> Result<(), LakeError> {
        for field in schema.fields() {
            self.add_field(path, field)?;
        }
        Ok(())
    }

    pub fn add_field(&mut self, path: &Path, field: &Field) -> Result<(), LakeError> {
        match self.fields.iter().find(|(f, _)| f.name() == field.name()) {
            Some((known, first)) if known.data_type() != field.data_type() => {
                Err(LakeError::TypeConflict {
                    column: field.name().clone(),
                    first: first.clone(),
                    first_type: known.data_type().clone(),
                    second: path.to_owned(),
                    second_type: field.data_type().clone(),
                })
            }
            Some(_) => Ok(()),
            None => {
                self.fields.push((field.clone(), path.to_owned()));
                Ok(())
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<(&DataType, &Path)> {
        self.fields
            .iter()
            .find(|(f, _)| f.name() == name)
            .map(|(f, p)| (f.data_type(), p.as_path()))
    }

    pub fn fields(&self) -> impl Iterator<Item = &Field> {
        self.fields.iter().map(|(f, _)| f)
    }
}
