//! The error of the lake's merge, drift correction and listing.

use std::io;
use std::path::PathBuf;

use arrow_schema::{ArrowError, DataType};
use parquet::errors::ParquetError;

use crate::layout::LayoutError;
use crate::manifest::ManifestError;

/// Why a merge or a listing failed. Every variant names the file or column at fault.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a readable Parquet file: {source}")]
    Parquet { path: PathBuf, source: ParquetError },
    #[error("{context}: {source}")]
    Arrow { context: String, source: ArrowError },
    #[error("{what} {path} does not exist{hint}")]
    MissingPartition {
        what: &'static str,
        path: PathBuf,
        hint: String,
    },
    #[error(
        "column `{column}` has type {first_type} in {first} but {second_type} in {second}: \
         a column may not change type"
    )]
    TypeConflict {
        column: String,
        first: PathBuf,
        first_type: DataType,
        second: PathBuf,
        second_type: DataType,
    },
    #[error("{path}: column `{column}` must be {expected}, found {found}")]
    BadMetadataColumn {
        path: PathBuf,
        column: String,
        expected: DataType,
        found: DataType,
    },
    #[error(
        "table {table}: no primary key: pass --pk, or land the change log with the \
         `qanat.primary_key` Parquet metadata"
    )]
    MissingPrimaryKey { table: String },
    #[error("primary key {first:?} in {first_file} but {second:?} in {second_file}")]
    PrimaryKeyConflict {
        first: String,
        first_file: PathBuf,
        second: String,
        second_file: PathBuf,
    },
    #[error("{path}: primary-key column `{column}` is missing")]
    MissingKeyColumn { path: PathBuf, column: String },
    #[error("{path}: drift column `{column}` is missing")]
    MissingDriftColumn { path: PathBuf, column: String },
    #[error("{path}: drift column `{column}` has type {found}, expected a timestamp, date, Int64 milliseconds or text")]
    BadDriftColumn {
        path: PathBuf,
        column: String,
        found: DataType,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

impl LakeError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> LakeError {
        let path = path.into();
        move |source| LakeError::Io { path, source }
    }

    pub(crate) fn parquet(path: impl Into<PathBuf>) -> impl FnOnce(ParquetError) -> LakeError {
        let path = path.into();
        move |source| LakeError::Parquet { path, source }
    }

    pub(crate) fn arrow(context: impl Into<String>) -> impl FnOnce(ArrowError) -> LakeError {
        let context = context.into();
        move |source| LakeError::Arrow { context, source }
    }
}
