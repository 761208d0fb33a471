//! The filesystem operations landing relies on, behind a trait, so a model test can run the
//! same code on a simulated filesystem that loses what was not made durable when it crashes.
//!
//! Landing needs only: create a directory, create and write a file, fsync it, rename it into
//! place, fsync a directory, list a directory, remove a file, and read a file back (the
//! Parquet footer, on recovery). [`OsFs`] is the real filesystem.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// A filesystem as landing uses it.
pub trait LakeFs: Send + Sync + 'static {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Create a file for writing, truncating one that exists.
    fn create(&self, path: &Path) -> io::Result<Box<dyn LakeFile>>;
    /// Rename, replacing `to` if it exists.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// fsync a directory, so renames, creations and removals in it are durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// The entries of a directory: name, and whether it is a directory.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<(String, bool)>>;
    /// A file opened for reading (its Parquet footer).
    fn open_read(&self, path: &Path) -> io::Result<ReadFile>;
}

/// A file being written.
pub trait LakeFile: Write + Send {
    /// fsync: the content written so far survives a crash.
    fn sync_all(&mut self) -> io::Result<()>;
    /// Bytes written so far.
    fn size(&self) -> io::Result<u64>;
}

/// A file opened for reading: a real one, or the bytes of a simulated one.
pub enum ReadFile {
    Os(File),
    Bytes(bytes::Bytes),
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsFs;

impl LakeFile for File {
    fn sync_all(&mut self) -> io::Result<()> {
        File::sync_all(self)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl LakeFs for OsFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn LakeFile>> {
        Ok(Box::new(File::create(path)?))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        crate::manifest::sync_dir(dir)
    }
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<(String, bool)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let is_dir = entry.file_type()?.is_dir();
            out.push((entry.file_name().to_string_lossy().into_owned(), is_dir));
        }
        Ok(out)
    }
    fn open_read(&self, path: &Path) -> io::Result<ReadFile> {
        Ok(ReadFile::Os(File::open(path)?))
    }
}
