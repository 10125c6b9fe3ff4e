//! The external-data file (`model.onnx.data`): every weight initializer is appended here in creation
//! order, each starting at a 4 KiB-aligned offset so runtimes can mmap tensors in place. The file is
//! hashed while it is written, so the artifact's sha256 costs no second read.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{ExportError, Result};

/// Alignment of every tensor in the external-data file.
pub const EXTERNAL_ALIGN: u64 = 4096;

/// Writes `model.onnx.data`. Tensors are written one at a time with [`ExternalDataWriter::begin`],
/// any number of [`ExternalDataWriter::write`] chunks, then [`ExternalDataWriter::end`].
pub struct ExternalDataWriter {
    path: PathBuf,
    location: String,
    file: BufWriter<File>,
    offset: u64,
    tensor_start: Option<u64>,
    hasher: Sha256,
}

/// Where one tensor landed in the external-data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExternalSpan {
    /// Byte offset (multiple of [`EXTERNAL_ALIGN`]).
    pub offset: u64,
    /// Byte length.
    pub length: u64,
}

/// Summary of a finished external-data file.
#[derive(Debug, Clone)]
pub struct ExternalSummary {
    /// File name relative to the model (the `location` of every tensor).
    pub location: String,
    /// Total size in bytes.
    pub bytes: u64,
    /// Lower-case hex sha256 of the whole file.
    pub sha256: String,
}

impl ExternalDataWriter {
    /// Creates (truncates) `dir/location`.
    pub fn create(dir: &Path, location: &str) -> Result<Self> {
        let path = dir.join(location);
        let file = File::create(&path).map_err(ExportError::io(&path))?;
        Ok(ExternalDataWriter {
            path,
            location: location.to_string(),
            file: BufWriter::with_capacity(8 << 20, file),
            offset: 0,
            tensor_start: None,
            hasher: Sha256::new(),
        })
    }

    /// The `location` string tensors refer to.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.file.write_all(bytes).map_err(ExportError::io(&self.path))?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Pads to the next aligned offset and starts a tensor there.
    pub fn begin(&mut self) -> Result<()> {
        if self.tensor_start.is_some() {
            return Err(ExportError::Graph("external data: begin() while a tensor is open".into()));
        }
        let pad = (EXTERNAL_ALIGN - self.offset % EXTERNAL_ALIGN) % EXTERNAL_ALIGN;
        if pad > 0 {
            let zeros = [0u8; EXTERNAL_ALIGN as usize];
            self.put(&zeros[..pad as usize])?;
        }
        self.tensor_start = Some(self.offset);
        Ok(())
    }

    /// Appends bytes to the open tensor.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if self.tensor_start.is_none() {
            return Err(ExportError::Graph("external data: write() without begin()".into()));
        }
        self.put(bytes)
    }

    /// Closes the open tensor and returns where it is.
    pub fn end(&mut self) -> Result<ExternalSpan> {
        let start = self
            .tensor_start
            .take()
            .ok_or_else(|| ExportError::Graph("external data: end() without begin()".into()))?;
        Ok(ExternalSpan { offset: start, length: self.offset - start })
    }

    /// Flushes the file and returns its size and hash.
    pub fn finish(mut self) -> Result<ExternalSummary> {
        if self.tensor_start.is_some() {
            return Err(ExportError::Graph("external data: finish() while a tensor is open".into()));
        }
        self.file.flush().map_err(ExportError::io(&self.path))?;
        let file =
            self.file.into_inner().map_err(|e| ExportError::Io { path: self.path.clone(), source: e.into_error() })?;
        file.sync_all().map_err(ExportError::io(&self.path))?;
        Ok(ExternalSummary { location: self.location, bytes: self.offset, sha256: hex::encode(self.hasher.finalize()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_are_aligned_and_hash_matches_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ExternalDataWriter::create(dir.path(), "x.data").unwrap();
        w.begin().unwrap();
        w.write(&[1, 2, 3]).unwrap();
        let a = w.end().unwrap();
        w.begin().unwrap();
        w.write(&[4; 10]).unwrap();
        w.write(&[5; 5]).unwrap();
        let b = w.end().unwrap();
        let s = w.finish().unwrap();
        assert_eq!(a, ExternalSpan { offset: 0, length: 3 });
        assert_eq!(b, ExternalSpan { offset: 4096, length: 15 });
        let bytes = std::fs::read(dir.path().join("x.data")).unwrap();
        assert_eq!(bytes.len() as u64, s.bytes);
        assert_eq!(bytes.len(), 4096 + 15);
        assert_eq!(hex::encode(Sha256::digest(&bytes)), s.sha256);
        assert_eq!(&bytes[4096..4106], &[4; 10]);
    }

    #[test]
    fn misuse_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ExternalDataWriter::create(dir.path(), "x.data").unwrap();
        assert!(w.write(&[1]).is_err());
        assert!(w.end().is_err());
        w.begin().unwrap();
        assert!(w.begin().is_err());
    }
}
