//! Reading a HuggingFace checkpoint directory: `config.json` (parsed per family in `arch/`) and the
//! weights, single-file (`model.safetensors`) or sharded (`model.safetensors.index.json`).
//!
//! Shards are memory-mapped; headers are parsed up front (so a missing or malformed tensor is found
//! before anything is written), tensor bytes are read lazily. After a tensor has been converted, the
//! caller hands it back with [`Checkpoint::release`], which drops its pages (`madvise(DONTNEED)`), so
//! resident memory stays around one tensor whatever the model size.

pub mod convert;
pub mod fp8;
// FP8 block dequantization (`fp8.rs`) is declared here by the DeepseekV3 helper once it compiles.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};

pub use convert::SrcFloat;

use crate::error::{ExportError, Result};

/// Name of the single-file weights.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of the model config.
pub const CONFIG_FILE: &str = "config.json";

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8 + header length).
    data_start: usize,
}

#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the shard file.
    start: usize,
    end: usize,
}

/// One tensor of the checkpoint, borrowed from its memory map.
pub struct TensorRef<'a> {
    /// Checkpoint key.
    pub name: &'a str,
    /// The safetensors file it lives in.
    pub file: &'a Path,
    /// Element type as stored.
    pub dtype: Dtype,
    /// Shape as stored.
    pub shape: &'a [usize],
    /// Raw little-endian bytes.
    pub data: &'a [u8],
}

impl TensorRef<'_> {
    /// The floating-point source type, or an error naming the tensor when it is not bf16/f16/f32.
    pub fn float(&self) -> Result<SrcFloat> {
        match self.dtype {
            Dtype::BF16 => Ok(SrcFloat::Bf16),
            Dtype::F16 => Ok(SrcFloat::F16),
            Dtype::F32 => Ok(SrcFloat::F32),
            other => Err(ExportError::TensorDtype {
                file: self.file.to_path_buf(),
                name: self.name.to_string(),
                expected: "BF16, F16, F32",
                got: format!("{other:?}"),
            }),
        }
    }
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    entries: HashMap<String, Entry>,
    /// Where tensors were looked for, for error messages.
    searched: String,
}

fn read_json(path: &Path, what: &'static str) -> Result<serde_json::Value> {
    if !path.is_file() {
        return Err(ExportError::MissingFile { path: path.to_path_buf(), what });
    }
    let text = std::fs::read_to_string(path).map_err(ExportError::io(path))?;
    serde_json::from_str(&text).map_err(|e| ExportError::Json { path: path.to_path_buf(), message: e.to_string() })
}

/// Reads `DIR/config.json` as JSON (family parsing happens in `arch/`).
pub fn read_config(dir: &Path) -> Result<(PathBuf, serde_json::Value)> {
    let path = dir.join(CONFIG_FILE);
    let v = read_json(&path, "the model config (config.json)")?;
    Ok((path, v))
}

/// A tensor's header entry in a shard: name, dtype, shape, and the start and end of its bytes.
type HeaderEntry = (String, Dtype, Vec<usize>, usize, usize);

fn open_shard(path: &Path) -> Result<(Shard, Vec<HeaderEntry>)> {
    let file = File::open(path).map_err(ExportError::io(path))?;
    // SAFETY: the file is opened read-only and not modified by this process; a concurrent external
    // truncation would be a user error we cannot guard against (as for every mmap-based reader).
    let mmap = unsafe { Mmap::map(&file) }.map_err(ExportError::io(path))?;
    let bad = |message: String| ExportError::Safetensors { path: path.to_path_buf(), message };
    let (n, meta) = match SafeTensors::read_metadata(&mmap) {
        Ok(x) => x,
        Err(safetensors::SafeTensorError::MetadataIncompleteBuffer) => {
            return Err(bad(truncation_message(&mmap)));
        }
        Err(e) => {
            return Err(bad(format!("{e} (file size {} bytes)", mmap.len())));
        }
    };
    let data_start = 8 + n;
    let mut list = Vec::new();
    for (name, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        list.push((name, info.dtype, info.shape.clone(), data_start + s, data_start + e));
    }
    list.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((Shard { path: path.to_path_buf(), mmap, data_start }, list))
}

/// Explains a data section whose size does not match the header.
fn truncation_message(buf: &[u8]) -> String {
    let got = buf.len();
    let expected = (|| {
        let n = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?) as usize;
        let header: serde_json::Value = serde_json::from_slice(buf.get(8..8 + n)?).ok()?;
        let end = header
            .as_object()?
            .iter()
            .filter(|(k, _)| k.as_str() != "__metadata__")
            .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
            .max()
            .unwrap_or(0);
        Some(8 + n + end as usize)
    })();
    match expected {
        Some(e) if e > got => format!("truncated: the header describes {e} bytes, the file has {got}"),
        Some(e) => format!("the header describes {e} bytes, the file has {got} (trailing bytes)"),
        None => format!("data section does not match the header (file size {got} bytes)"),
    }
}

impl Checkpoint {
    /// Opens the weights of `dir`: the shard index when present, else `model.safetensors`.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let index_path = dir.join(INDEX_FILE);
        let files: Vec<PathBuf> = if index_path.is_file() {
            let index = read_json(&index_path, "the shard index")?;
            let map = index.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ExportError::Json {
                path: index_path.clone(),
                message: "missing object field `weight_map`".into(),
            })?;
            let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            names.sort();
            names.dedup();
            // Shards live in the checkpoint directory: a name that is absolute or climbs out of it is refused.
            if let Some(bad) = names
                .iter()
                .find(|n| Path::new(n.as_str()).components().any(|c| !matches!(c, std::path::Component::Normal(_))))
            {
                return Err(ExportError::Json {
                    path: index_path.clone(),
                    message: format!(
                        "`weight_map` names shard {bad:?}: must be a file name inside the checkpoint directory"
                    ),
                });
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let single = dir.join(SINGLE_FILE);
            if !single.is_file() {
                return Err(ExportError::MissingFile {
                    path: single,
                    what: "the weights (model.safetensors or model.safetensors.index.json)",
                });
            }
            vec![single]
        };
        let mut shards = Vec::new();
        let mut entries = HashMap::new();
        for path in &files {
            if !path.is_file() {
                return Err(ExportError::MissingFile {
                    path: path.clone(),
                    what: "a weight shard listed in the index",
                });
            }
            let (shard, list) = open_shard(path)?;
            let idx = shards.len();
            for (name, dtype, shape, start, end) in list {
                entries.insert(name, Entry { shard: idx, dtype, shape, start, end });
            }
            shards.push(shard);
        }
        let searched = if files.len() == 1 {
            files[0].display().to_string()
        } else {
            format!("{} ({} shards)", index_path.display(), files.len())
        };
        Ok(Checkpoint { dir: dir.to_path_buf(), shards, entries, searched })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when the checkpoint has a tensor of that name.
    pub fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        v.sort();
        v
    }

    /// Stored shape of a tensor, or a [`ExportError::MissingTensor`].
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        self.entry(name, &[]).map(|e| e.shape.as_slice())
    }

    fn entry(&self, name: &str, expected: &[usize]) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| ExportError::MissingTensor {
            name: name.to_string(),
            searched: self.searched.clone(),
            expected: expected.to_vec(),
        })
    }

    /// A tensor, checked against the shape config.json implies.
    pub fn tensor<'a>(&'a self, name: &'a str, expected_shape: &[usize]) -> Result<TensorRef<'a>> {
        let e = self.entry(name, expected_shape)?;
        let shard = &self.shards[e.shard];
        if e.shape != expected_shape {
            return Err(ExportError::TensorShape {
                file: shard.path.clone(),
                name: name.to_string(),
                expected: expected_shape.to_vec(),
                got: e.shape.clone(),
            });
        }
        Ok(TensorRef { name, file: &shard.path, dtype: e.dtype, shape: &e.shape, data: &shard.mmap[e.start..e.end] })
    }

    /// A tensor without a shape check (for callers that check it themselves).
    pub fn tensor_any_shape<'a>(&'a self, name: &'a str) -> Result<TensorRef<'a>> {
        let e = self.entry(name, &[])?;
        let shard = &self.shards[e.shard];
        Ok(TensorRef { name, file: &shard.path, dtype: e.dtype, shape: &e.shape, data: &shard.mmap[e.start..e.end] })
    }

    /// Drops the resident pages of a tensor once it has been converted, so RSS stays bounded.
    pub fn release(&self, name: &str) {
        self.release_bytes(name, 0, usize::MAX);
    }

    /// Drops the resident pages of bytes `[from, to)` of a tensor's data (clamped to it) once they have been
    /// read, so a tensor read in parts (a MatMul weight quantized band by band) never has all its pages resident.
    pub fn release_bytes(&self, name: &str, from: usize, to: usize) {
        let Some(e) = self.entries.get(name) else { return };
        let shard = &self.shards[e.shard];
        let (from, to) = (e.start.saturating_add(from).min(e.end), e.start.saturating_add(to).min(e.end));
        // madvise works on whole pages: shrink the range to the pages fully inside it, leaving neighbours'
        // partial pages alone.
        const PAGE: usize = 4096;
        let start = from.div_ceil(PAGE) * PAGE;
        let end = (to / PAGE) * PAGE;
        if end > start {
            // SAFETY: the map is read-only and file-backed; DONTNEED only drops clean pages, which are
            // re-read from the file if touched again. No slice into this range is used afterwards by
            // the exporter (and would still read correct data if it were).
            let _ = unsafe { shard.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
        }
    }

    /// Bytes stored per dtype (`"BF16" -> 3_400_000_000`), for the manifest's source dtype.
    pub fn dtype_bytes(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for e in self.entries.values() {
            *m.entry(format!("{:?}", e.dtype)).or_insert(0) += e.end - e.start;
        }
        m
    }

    /// The dtype that holds most of the checkpoint's bytes, as a manifest string (`bf16`, `f16`, `f32`,
    /// `fp8_e4m3`, ...). Counted in bytes, not tensors: an FP8 checkpoint has as many small f32 scale
    /// tensors as weights, but its bytes are FP8.
    pub fn dominant_dtype(&self) -> String {
        let counts = self.dtype_bytes();
        let top = counts.iter().max_by_key(|(_, n)| **n).map(|(k, _)| k.as_str()).unwrap_or("F32");
        match top {
            "F8_E4M3" => "fp8_e4m3".into(),
            other => other.to_lowercase(),
        }
    }

    /// Size in bytes of the data section of every shard (for progress reporting).
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| (s.mmap.len() - s.data_start) as u64).sum()
    }
}
