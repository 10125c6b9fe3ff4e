//! ONNX initializer payloads: reading them (inline `raw_data`, `float_data`, or external data files relative to the
//! model directory) and writing them to a new external data file with 4 KiB-aligned offsets.
use crate::error::{CalibError, Result};
use r1_proto::onnx::tensor_proto::{DataLocation, DataType};
use r1_proto::onnx::{StringStringEntryProto, TensorProto};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};
use std::path::{Component, Path, PathBuf};

/// Alignment of every tensor written to external data, so runtimes can mmap them.
pub const EXTERNAL_ALIGN: u64 = 4096;

/// True when the tensor's payload lives in an external file.
pub fn is_external(t: &TensorProto) -> bool {
    t.data_location == Some(DataLocation::External as i32)
}

fn entry<'a>(t: &'a TensorProto, key: &str) -> Option<&'a str> {
    t.external_data.iter().find(|e| e.key.as_deref() == Some(key)).and_then(|e| e.value.as_deref())
}

fn tensor_name(t: &TensorProto) -> String {
    t.name.clone().unwrap_or_default()
}

/// Number of elements a tensor's dims describe (1 for a scalar). Errors on negative dims.
pub fn element_count(t: &TensorProto) -> Result<usize> {
    t.dims.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d)
            .ok()
            .and_then(|d| acc.checked_mul(d))
            .ok_or_else(|| CalibError::graph(format!("tensor `{}`", tensor_name(t)), format!("bad dims {:?}", t.dims)))
    })
}

/// Reads initializer payloads of a model stored in `dir`.
#[derive(Debug, Clone)]
pub struct ExternalDataReader {
    dir: PathBuf,
}

impl ExternalDataReader {
    /// A reader resolving external locations relative to `dir` (the directory holding `model.onnx`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ExternalDataReader { dir: dir.into() }
    }

    /// The payload bytes of `t` in ONNX's little-endian raw layout: `raw_data`, the external file range, or
    /// (for FLOAT tensors) `float_data` re-encoded.
    pub fn tensor_bytes(&self, t: &TensorProto) -> Result<Vec<u8>> {
        if is_external(t) {
            return self.read_external(t);
        }
        if let Some(raw) = &t.raw_data {
            return Ok(raw.clone());
        }
        if t.data_type == Some(DataType::Float as i32) {
            return Ok(t.float_data.iter().flat_map(|f| f.to_le_bytes()).collect());
        }
        if element_count(t)? == 0 {
            return Ok(Vec::new());
        }
        Err(CalibError::graph(
            format!("tensor `{}`", tensor_name(t)),
            "payload is neither raw_data, external data nor float_data",
        ))
    }

    /// A FLOAT tensor's values. External data is read straight into the values (no second copy of the tensor in
    /// memory, no conversion pass).
    pub fn tensor_f32(&self, t: &TensorProto) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.tensor_f32_into(t, &mut out)?;
        Ok(out)
    }

    /// [`ExternalDataReader::tensor_f32`] into `out` (replacing its content). A loop over many weights that passes
    /// the same buffer reuses its memory: a fresh allocation of each weight would be faulted in and zeroed by the
    /// kernel page by page, which cost more than reading the weight.
    pub fn tensor_f32_into(&self, t: &TensorProto, out: &mut Vec<f32>) -> Result<()> {
        if t.data_type != Some(DataType::Float as i32) {
            return Err(CalibError::graph(
                format!("tensor `{}`", tensor_name(t)),
                format!("expected data_type FLOAT (1), got {:?}", t.data_type),
            ));
        }
        let n = element_count(t)?;
        let what = || format!("payload bytes of tensor `{}`", tensor_name(t));
        out.clear();
        if is_external(t) {
            let (mut f, length, path) = self.open_external(t)?;
            crate::error::ensure_len(&what(), n * 4, length as usize)?;
            out.resize(n, 0.0);
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(out.as_mut_slice());
            f.read_exact(bytes).map_err(|source| CalibError::Io { op: "reading", path, source })?;
            // The file holds little-endian f32; on a little-endian host the bytes read are the values.
            if cfg!(target_endian = "big") {
                for v in out.iter_mut() {
                    *v = f32::from_bits(v.to_bits().swap_bytes());
                }
            }
            return Ok(());
        }
        let bytes = self.tensor_bytes(t)?;
        crate::error::ensure_len(&what(), n * 4, bytes.len())?;
        out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        Ok(())
    }

    fn read_external(&self, t: &TensorProto) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_external_chunks(t, &mut |chunk| {
            buf.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(buf)
    }

    /// Passes `t`'s external payload to `sink` in chunks of [`READ_CHUNK`] bytes (the last one shorter; each a
    /// multiple of 4 bytes but the last); returns its length.
    fn read_external_chunks(&self, t: &TensorProto, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<u64> {
        let (mut f, length, path) = self.open_external(t)?;
        let io = |source| CalibError::Io { op: "reading", path: path.clone(), source };
        let mut buf = vec![0u8; (length as usize).min(READ_CHUNK)];
        let mut left = length as usize;
        while left > 0 {
            let chunk = &mut buf[..left.min(READ_CHUNK)];
            f.read_exact(chunk).map_err(io)?;
            sink(chunk)?;
            left -= chunk.len();
        }
        Ok(length)
    }

    /// `t`'s external data file, positioned at the payload, with the payload's length; errors name the tensor and
    /// the file when the reference is invalid or out of the file's range.
    fn open_external(&self, t: &TensorProto) -> Result<(File, u64, PathBuf)> {
        let name = tensor_name(t);
        let location = entry(t, "location").unwrap_or_default();
        let bad = |path: &Path, problem: String| CalibError::ExternalData {
            tensor: name.clone(),
            path: path.to_path_buf(),
            problem,
        };
        let rel = Path::new(location);
        if location.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
            return Err(bad(rel, "location must be a relative path inside the model directory".into()));
        }
        let path = self.dir.join(rel);
        let parse = |key: &str| -> Result<Option<u64>> {
            entry(t, key)
                .map(|v| v.parse::<u64>().map_err(|_| bad(&path, format!("`{key}` must be an integer, got {v:?}"))))
                .transpose()
        };
        let offset = parse("offset")?.unwrap_or(0);
        let length = parse("length")?;
        let mut f = File::open(&path).map_err(|source| CalibError::Io { op: "opening", path: path.clone(), source })?;
        let file_len =
            f.metadata().map_err(|source| CalibError::Io { op: "reading", path: path.clone(), source })?.len();
        let length = length.unwrap_or(file_len.saturating_sub(offset));
        let end = offset.saturating_add(length);
        if end > file_len {
            return Err(bad(&path, format!("range {offset}..{end} is past the end of the file ({file_len} bytes)")));
        }
        f.seek(SeekFrom::Start(offset)).map_err(|source| CalibError::Io {
            op: "reading",
            path: path.clone(),
            source,
        })?;
        Ok((f, length, path))
    }
}

/// Bytes read from an external data file at a time.
const READ_CHUNK: usize = 8 << 20;

/// Where [`ExternalDataWriter::write_tensor_with`]'s `fill` writes a payload's pieces.
pub type ChunkSink<'a> = &'a mut dyn FnMut(&[u8]) -> Result<()>;

/// Appends tensor payloads to one external data file, each at a 4 KiB-aligned offset.
#[derive(Debug)]
pub struct ExternalDataWriter {
    out: Out,
    path: PathBuf,
    location: String,
    pos: u64,
}

/// Where the bytes go: the file, from the caller's thread, or a thread that writes and hashes them while the
/// caller goes on ([`ExternalDataWriter::create_background`]).
#[derive(Debug)]
enum Out {
    File(BufWriter<File>),
    Thread { tx: Option<SyncSender<Vec<u8>>>, done: Option<JoinHandle<Result<String>>> },
}

/// Payloads queued for the background writer thread before [`ExternalDataWriter::write_tensor_owned`] waits.
const QUEUED: usize = 4;

/// A finished [`ExternalDataWriter`]'s file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFile {
    /// Its path.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Lower-case hex sha256 of its content, computed as it was written by a background writer
    /// ([`ExternalDataWriter::create_background`]); `None` from a plain one.
    pub sha256: Option<String>,
}

impl ExternalDataWriter {
    /// Creates (truncates) `dir/location`; `location` is what the model will reference (a plain file name).
    pub fn create(dir: &Path, location: &str) -> Result<Self> {
        let (path, file) = Self::open(dir, location)?;
        Ok(ExternalDataWriter { out: Out::File(BufWriter::new(file)), path, location: location.to_string(), pos: 0 })
    }

    /// Like [`ExternalDataWriter::create`], the writing and a sha256 of the file done by a thread of its own, so the
    /// caller quantizes the next tensor while the last one is copied to the page cache; see
    /// [`ExternalDataWriter::finish_hashed`]. A write error is returned by the next write or by the finish.
    pub fn create_background(dir: &Path, location: &str) -> Result<Self> {
        let (path, file) = Self::open(dir, location)?;
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUED);
        let thread_path = path.clone();
        let done = std::thread::Builder::new()
            .name("r1-data-writer".into())
            .spawn(move || {
                let io = |source| CalibError::Io { op: "writing", path: thread_path.clone(), source };
                let mut file = BufWriter::with_capacity(8 << 20, file);
                let mut hash = Sha256::new();
                for bytes in rx {
                    hash.update(&bytes);
                    file.write_all(&bytes).map_err(io)?;
                }
                file.flush().map_err(io)?;
                Ok(hex::encode(hash.finalize()))
            })
            .map_err(|source| CalibError::Io { op: "starting a writer thread for", path: path.clone(), source })?;
        let out = Out::Thread { tx: Some(tx), done: Some(done) };
        Ok(ExternalDataWriter { out, path, location: location.to_string(), pos: 0 })
    }

    fn open(dir: &Path, location: &str) -> Result<(PathBuf, File)> {
        if location.is_empty() || Path::new(location).components().count() != 1 || location == ".." {
            return Err(CalibError::invalid("external data location", "a plain file name", location));
        }
        let path = dir.join(location);
        let file =
            File::create(&path).map_err(|source| CalibError::Io { op: "creating", path: path.clone(), source })?;
        Ok((path, file))
    }

    /// Writes `bytes` as the payload of `t` and points `t` at it (clearing any inline data).
    pub fn write_tensor(&mut self, t: &mut TensorProto, bytes: &[u8]) -> Result<()> {
        self.write_tensor_with(t, &mut |sink| sink(bytes))
    }

    /// Like [`ExternalDataWriter::write_tensor`], taking the payload: a background writer gets it without a copy.
    pub fn write_tensor_owned(&mut self, t: &mut TensorProto, bytes: Vec<u8>) -> Result<()> {
        let offset = self.pad()?;
        let length = bytes.len() as u64;
        let sent = self.put(bytes);
        self.pos = offset + length;
        sent?;
        self.point(t, offset, length);
        Ok(())
    }

    /// Like [`ExternalDataWriter::write_tensor`], the payload given in pieces: `fill` passes them, in order, to the
    /// sink it receives (a large tensor is copied without holding it in memory).
    pub fn write_tensor_with(
        &mut self,
        t: &mut TensorProto,
        fill: &mut dyn FnMut(ChunkSink<'_>) -> Result<()>,
    ) -> Result<()> {
        let offset = self.pad()?;
        let mut length = 0u64;
        let filled = fill(&mut |chunk: &[u8]| {
            length += chunk.len() as u64;
            self.put(chunk.to_vec())
        });
        // Counted even when `fill` failed part way, so that the next tensor still starts aligned.
        self.pos = offset + length;
        filled?;
        self.point(t, offset, length);
        Ok(())
    }

    /// Writes the zeros up to the next aligned offset and returns it.
    fn pad(&mut self) -> Result<u64> {
        let pad = (EXTERNAL_ALIGN - self.pos % EXTERNAL_ALIGN) % EXTERNAL_ALIGN;
        if pad > 0 {
            self.put(vec![0u8; pad as usize])?;
            self.pos += pad;
        }
        Ok(self.pos)
    }

    /// Hands `bytes` to the file or the writer thread (whose error, if it stopped, is returned).
    fn put(&mut self, bytes: Vec<u8>) -> Result<()> {
        match &mut self.out {
            Out::File(f) => {
                f.write_all(&bytes).map_err(|source| CalibError::Io { op: "writing", path: self.path.clone(), source })
            }
            Out::Thread { tx, done } => {
                let stopped = tx.as_ref().is_none_or(|tx| tx.send(bytes).is_err());
                if !stopped {
                    return Ok(());
                }
                tx.take();
                Err(join(done.take(), &self.path).err().unwrap_or_else(|| CalibError::Io {
                    op: "writing",
                    path: self.path.clone(),
                    source: std::io::Error::other("the writer thread stopped"),
                }))
            }
        }
    }

    /// Points `t` at `length` bytes at `offset` of this file, clearing any inline data.
    fn point(&self, t: &mut TensorProto, offset: u64, length: u64) {
        let kv = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        t.raw_data = None;
        t.float_data.clear();
        t.int32_data.clear();
        t.int64_data.clear();
        t.data_location = Some(DataLocation::External as i32);
        t.external_data = vec![
            kv("location", self.location.clone()),
            kv("offset", offset.to_string()),
            kv("length", length.to_string()),
        ];
    }

    /// Bytes written so far (including padding).
    pub fn len(&self) -> u64 {
        self.pos
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Flushes and closes the file; returns its path.
    pub fn finish(self) -> Result<PathBuf> {
        Ok(self.finish_inner()?.0)
    }

    /// Flushes and closes the file; returns it with its size and, from a background writer, its sha256.
    pub fn finish_hashed(self) -> Result<WrittenFile> {
        let (path, bytes, sha256) = self.finish_inner()?;
        Ok(WrittenFile { path, bytes, sha256 })
    }

    fn finish_inner(mut self) -> Result<(PathBuf, u64, Option<String>)> {
        let path = std::mem::take(&mut self.path);
        match &mut self.out {
            Out::File(f) => {
                f.flush().map_err(|source| CalibError::Io { op: "writing", path: path.clone(), source })?;
                Ok((path, self.pos, None))
            }
            Out::Thread { tx, done } => {
                tx.take();
                let sha = join(done.take(), &path)?;
                Ok((path, self.pos, Some(sha)))
            }
        }
    }
}

/// The writer thread's result (its error, or the file's sha256).
fn join(done: Option<JoinHandle<Result<String>>>, path: &Path) -> Result<String> {
    let gone = || CalibError::Io {
        op: "writing",
        path: path.to_path_buf(),
        source: std::io::Error::other("the writer thread stopped"),
    };
    done.ok_or_else(gone)?.join().map_err(|_| gone())?
}

impl Drop for ExternalDataWriter {
    /// A writer dropped without a finish (an error elsewhere) stops its thread and waits for it.
    fn drop(&mut self) {
        if let Out::Thread { tx, done } = &mut self.out {
            tx.take();
            if let Some(d) = done.take() {
                let _ = d.join();
            }
        }
    }
}

/// Moves every initializer whose payload is external or at least `threshold` bytes into `writer` (payloads read
/// through `reader`, external ones copied a chunk at a time); those that turn out smaller are inlined. Used when a
/// rewritten model gets a new data file.
pub fn rehome_initializers(
    initializers: &mut [TensorProto],
    reader: &ExternalDataReader,
    writer: &mut ExternalDataWriter,
    threshold: usize,
) -> Result<()> {
    for t in initializers.iter_mut() {
        let big = element_count(t)?.saturating_mul(4) >= threshold
            || t.raw_data.as_ref().is_some_and(|r| r.len() >= threshold);
        if is_external(t) {
            let (mut f, length, path) = reader.open_external(t)?;
            if length >= threshold as u64 {
                let mut buf = vec![0u8; (length as usize).min(READ_CHUNK)];
                writer.write_tensor_with(t, &mut |sink| {
                    let mut left = length as usize;
                    while left > 0 {
                        let chunk = &mut buf[..left.min(READ_CHUNK)];
                        f.read_exact(chunk).map_err(|source| CalibError::Io {
                            op: "reading",
                            path: path.clone(),
                            source,
                        })?;
                        sink(chunk)?;
                        left -= chunk.len();
                    }
                    Ok(())
                })?;
                continue;
            }
        }
        if is_external(t) || big {
            let bytes = reader.tensor_bytes(t)?;
            if bytes.len() >= threshold {
                writer.write_tensor(t, &bytes)?;
            } else {
                t.data_location = None;
                t.external_data.clear();
                t.float_data.clear();
                t.raw_data = Some(bytes);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn float_tensor(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
        TensorProto {
            name: Some(name.into()),
            dims: dims.to_vec(),
            data_type: Some(DataType::Float as i32),
            raw_data: Some(v.iter().flat_map(|f| f.to_le_bytes()).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn write_then_read_is_aligned_and_identical() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ExternalDataWriter::create(dir.path(), "w.data").unwrap();
        let mut a = float_tensor("a", &[3], &[1.0, 2.0, 3.0]);
        let mut b = float_tensor("b", &[2, 2], &[4.0, 5.0, 6.0, 7.0]);
        for t in [&mut a, &mut b] {
            let bytes = t.raw_data.clone().unwrap();
            w.write_tensor(t, &bytes).unwrap();
        }
        w.finish().unwrap();
        assert!(is_external(&b) && b.raw_data.is_none());
        assert_eq!(entry(&b, "offset"), Some("4096"));
        assert_eq!(entry(&b, "length"), Some("16"));
        let r = ExternalDataReader::new(dir.path());
        assert_eq!(r.tensor_f32(&a).unwrap(), vec![1.0, 2.0, 3.0]);
        assert_eq!(r.tensor_f32(&b).unwrap(), vec![4.0, 5.0, 6.0, 7.0]);
    }

    #[test]
    fn background_writer_writes_the_same_file_and_hashes_it() {
        let dir = tempfile::tempdir().unwrap();
        let payloads: Vec<Vec<u8>> =
            vec![vec![1; 10], vec![2; 5000], vec![], (0..=255).cycle().take(3 << 20).collect()];
        let mut plain = ExternalDataWriter::create(dir.path(), "plain.data").unwrap();
        let mut background = ExternalDataWriter::create_background(dir.path(), "background.data").unwrap();
        for (i, p) in payloads.iter().enumerate() {
            let (mut a, mut b) = (float_tensor("t", &[1], &[0.0]), float_tensor("t", &[1], &[0.0]));
            plain.write_tensor(&mut a, p).unwrap();
            // Owned, borrowed and chunked payloads all take the thread.
            match i % 3 {
                0 => background.write_tensor_owned(&mut b, p.clone()).unwrap(),
                1 => background.write_tensor(&mut b, p).unwrap(),
                _ => background.write_tensor_with(&mut b, &mut |sink| p.chunks(1000).try_for_each(&mut *sink)).unwrap(),
            }
            assert_eq!(a.external_data[1..], b.external_data[1..], "offset and length of payload {i}");
        }
        let plain_file = plain.finish_hashed().unwrap();
        let written = background.finish_hashed().unwrap();
        assert_eq!(plain_file.sha256, None);
        let bytes = std::fs::read(&written.path).unwrap();
        assert_eq!(bytes, std::fs::read(&plain_file.path).unwrap());
        assert_eq!((written.bytes, plain_file.bytes), (bytes.len() as u64, bytes.len() as u64));
        assert_eq!(written.sha256, Some(hex::encode(Sha256::digest(&bytes))));
    }

    #[test]
    fn background_write_errors_are_returned() {
        if !Path::new("/dev/full").exists() {
            return;
        }
        // Every write to /dev/full fails (ENOSPC): the thread stops, and the next write or the finish says so.
        let mut w = ExternalDataWriter::create_background(Path::new("/dev"), "full").unwrap();
        let mut t = float_tensor("t", &[1], &[0.0]);
        let mut first = None;
        for _ in 0..8 {
            if let Err(e) = w.write_tensor_owned(&mut t, vec![7; 16 << 20]) {
                first = Some(e);
                break;
            }
        }
        let e = first.unwrap_or_else(|| w.finish_hashed().unwrap_err()).to_string();
        assert!(e.contains("/dev/full") && e.contains("writing"), "{e}");
    }

    #[test]
    fn bad_references_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.data"), [0u8; 8]).unwrap();
        let r = ExternalDataReader::new(dir.path());
        let mut t = float_tensor("w", &[4], &[0.0; 4]);
        t.raw_data = None;
        t.data_location = Some(DataLocation::External as i32);
        let kv = |k: &str, v: &str| StringStringEntryProto { key: Some(k.into()), value: Some(v.into()) };
        t.external_data = vec![kv("location", "x.data"), kv("offset", "0"), kv("length", "16")];
        let e = r.tensor_f32(&t).unwrap_err().to_string();
        assert!(e.contains("`w`") && e.contains("past the end") && e.contains("8 bytes"), "{e}");
        t.external_data[0] = kv("location", "../x.data");
        assert!(r.tensor_bytes(&t).unwrap_err().to_string().contains("relative path"));
        t.external_data = vec![kv("location", "x.data"), kv("offset", "abc")];
        assert!(r.tensor_bytes(&t).unwrap_err().to_string().contains("`offset`"));
        assert!(ExternalDataWriter::create(dir.path(), "../evil").is_err());
    }

    #[test]
    fn float_data_is_read() {
        let t = TensorProto {
            name: Some("f".into()),
            dims: vec![2],
            data_type: Some(DataType::Float as i32),
            float_data: vec![1.5, -2.0],
            ..Default::default()
        };
        assert_eq!(ExternalDataReader::new(".").tensor_f32(&t).unwrap(), vec![1.5, -2.0]);
    }
}
