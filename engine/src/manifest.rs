//! `manifest.json`: the contract between `r1-export` (which writes it) and everything that loads an
//! artifact (engine, server, calibration). One definition, used by both sides.
//!
//! Layout of an artifact directory:
//! ```text
//! OUT_DIR/
//!   manifest.json            this file
//!   model.onnx               portable decoder graph (standard ONNX ops)
//!   model.onnx.data          external weights (deterministic layout, 4 KiB-aligned tensors)
//!   tokenizer.json, tokenizer_config.json, generation_config.json   copied from the checkpoint
//!   engines/<target>/...     per-GPU TensorRT builds (optional)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// Current manifest format version. Bump on incompatible changes.
pub const MANIFEST_VERSION: u32 = 1;
/// File name of the manifest inside an artifact directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Everything an artifact says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`] at write time.
    pub format_version: u32,
    /// Which tool wrote it.
    pub exporter: ExporterInfo,
    /// Model family: `qwen2`, `llama`, `qwen3` or `deepseek_v3`.
    pub family: String,
    /// The checkpoint's `architectures[0]`, e.g. `Qwen2ForCausalLM`.
    pub architecture: String,
    /// Precision of the graph's weights and KV cache: `fp32`, `fp16`, `int8`, `int8-wo`, `int4-wo`.
    pub precision: String,
    /// ONNX opset of the default domain.
    pub opset: i64,
    /// What the source checkpoint held.
    pub source: SourceInfo,
    /// Model dimensions the engine needs without parsing the family config.
    pub model: ModelInfo,
    /// The resolved, validated family config (family-specific JSON, for humans and tools).
    pub config: serde_json::Value,
    /// Graph inputs, in graph order.
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs, in graph order.
    pub outputs: Vec<TensorSpec>,
    /// What the KV cache tensors hold and how big they are.
    pub kv_cache: KvCacheInfo,
    /// sha256 and size of every file of the artifact except `manifest.json`, by relative path.
    pub files: BTreeMap<String, FileEntry>,
    /// Per-target engine builds or build plans, by target name (`a100`, `cpu`, ...).
    #[serde(default)]
    pub targets: BTreeMap<String, serde_json::Value>,
    /// Calibration / quantization summary when the graph is quantized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<serde_json::Value>,
}

/// The tool that wrote the artifact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExporterInfo {
    pub name: String,
    pub version: String,
}

/// What the checkpoint held before export.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceInfo {
    /// Dominant weight dtype in the checkpoint: `bf16`, `f16`, `f32`, `fp8_e4m3` ...
    pub dtype: String,
    /// True when the checkpoint stored FP8 block-scaled weights that were dequantized at export.
    #[serde(default)]
    pub fp8_block_quantized: bool,
    /// Notes about what was skipped or converted (e.g. the MTP layer of R1).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// Model dimensions used by the engine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    pub num_layers: usize,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Longest context (prompt + generated) the model supports.
    pub max_position_embeddings: usize,
}

/// ONNX element type names as they appear in the manifest.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Int64,
    Float32,
    Float16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Int64 => 8,
            DType::Float32 => 4,
            DType::Float16 => 2,
        }
    }
}

/// One axis of a tensor: fixed or symbolic (`batch`, `sequence`, `past_sequence`, `total_sequence`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Dim {
    Fixed(i64),
    Symbolic(String),
}

/// A graph input or output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

/// KV cache layout. Every layer has one `key` and one `value` tensor of shape
/// `[batch, heads, past_sequence, dim]`; what they hold depends on `layout`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KvCacheInfo {
    /// `per_head` (dense families: keys after rotary, values) or `mla_latent` (DeepseekV3: key holds
    /// the normalized compressed latent, value holds the rotated shared rope key).
    pub layout: String,
    pub num_layers: usize,
    /// Heads and last-axis size of `past_key_values.{i}.key`.
    pub key_heads: usize,
    pub key_dim: usize,
    /// Heads and last-axis size of `past_key_values.{i}.value`.
    pub value_heads: usize,
    pub value_dim: usize,
    pub dtype: DType,
    /// Bytes one token occupies in the cache, summed over all layers, keys and values.
    pub bytes_per_token: usize,
    /// Human-readable description of what the tensors hold.
    pub description: String,
}

impl KvCacheInfo {
    /// Bytes per token computed from the layout (what `bytes_per_token` must equal).
    pub fn computed_bytes_per_token(&self) -> usize {
        self.checked_bytes_per_token().unwrap_or(usize::MAX)
    }

    /// [`KvCacheInfo::computed_bytes_per_token`], or `None` when the layout overflows `usize` (a corrupt or hostile
    /// manifest; [`Manifest::check`] refuses it).
    pub fn checked_bytes_per_token(&self) -> Option<usize> {
        let key = self.key_heads.checked_mul(self.key_dim)?;
        let value = self.value_heads.checked_mul(self.value_dim)?;
        self.num_layers.checked_mul(key.checked_add(value)?)?.checked_mul(self.dtype.size())
    }
}

/// sha256 and size of one artifact file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

impl Manifest {
    /// Whether the graph's INT4 weights carry zero points (an asymmetric `int4-wo` export, recorded by the exporter
    /// in `quantization.scheme`): ONNX Runtime runs them, TensorRT's block-quantized INT4 does not.
    pub fn int4_zero_points(&self) -> bool {
        self.quantization
            .as_ref()
            .and_then(|q| q.pointer("/scheme/Int4WeightOnly/asymmetric"))
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    }

    /// Reads and checks `DIR/manifest.json`. Does not verify file hashes (see [`Manifest::verify_files`]).
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io { path: path.clone(), source })?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| EngineError::Manifest { path: path.clone(), message: e.to_string() })?;
        m.check(&path)?;
        Ok(m)
    }

    /// Internal consistency checks: version, KV accounting, I/O names.
    pub fn check(&self, path: &Path) -> Result<()> {
        let bad = |message: String| EngineError::Manifest { path: path.to_path_buf(), message };
        if self.format_version != MANIFEST_VERSION {
            return Err(bad(format!(
                "format_version must be {MANIFEST_VERSION}, got {} (re-export with this r1-export)",
                self.format_version
            )));
        }
        let kv = &self.kv_cache;
        if kv.checked_bytes_per_token().is_none() {
            return Err(bad(format!(
                "kv_cache layout overflows: num_layers {} x (key_heads {} x key_dim {} + value_heads {} x value_dim {}) x {} bytes",
                kv.num_layers,
                kv.key_heads,
                kv.key_dim,
                kv.value_heads,
                kv.value_dim,
                kv.dtype.size()
            )));
        }
        if kv.bytes_per_token != kv.computed_bytes_per_token() {
            return Err(bad(format!(
                "kv_cache.bytes_per_token is {} but the layout gives {}",
                kv.bytes_per_token,
                kv.computed_bytes_per_token()
            )));
        }
        if kv.num_layers != self.model.num_layers {
            return Err(bad(format!(
                "kv_cache.num_layers is {} but model.num_layers is {}",
                kv.num_layers, self.model.num_layers
            )));
        }
        for required in ["input_ids", "attention_mask", "position_ids"] {
            if !self.inputs.iter().any(|t| t.name == required) {
                return Err(bad(format!("graph input `{required}` is missing")));
            }
        }
        if !self.outputs.iter().any(|t| t.name == "logits") {
            return Err(bad("graph output `logits` is missing".into()));
        }
        Ok(())
    }

    /// Name of the past key input of layer `i`.
    pub fn past_key_name(i: usize) -> String {
        format!("past_key_values.{i}.key")
    }
    /// Name of the past value input of layer `i`.
    pub fn past_value_name(i: usize) -> String {
        format!("past_key_values.{i}.value")
    }
    /// Name of the present key output of layer `i`.
    pub fn present_key_name(i: usize) -> String {
        format!("present.{i}.key")
    }
    /// Name of the present value output of layer `i`.
    pub fn present_value_name(i: usize) -> String {
        format!("present.{i}.value")
    }

    /// Path of a file of the artifact.
    pub fn file_path(dir: &Path, rel: &str) -> PathBuf {
        dir.join(rel)
    }
}

/// Why an artifact failed [`Manifest::verify_files`]. Every message names the file and, where it applies, the
/// expected and the actual value.
#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    /// A file listed in `manifest.json` is not in the artifact directory.
    #[error("artifact file `{file}` is listed in manifest.json but missing from {dir}")]
    Missing {
        /// Relative path as listed.
        file: String,
        /// The artifact directory.
        dir: PathBuf,
    },
    /// A file the loader needs is not listed in `manifest.json`, so it could not be verified.
    #[error("manifest.json does not list `{file}` in `files`, so its integrity cannot be checked")]
    Unlisted {
        /// Relative path.
        file: String,
    },
    /// A listed path is absolute or leaves the artifact directory.
    #[error("manifest.json lists `{file}`, which is not a relative path inside the artifact directory")]
    UnsafePath {
        /// The path as listed.
        file: String,
    },
    /// The file's size differs from the manifest's (checked before hashing).
    #[error("artifact file `{file}` has {actual} bytes, manifest.json says {expected} bytes (truncated or replaced)")]
    Size {
        /// Relative path.
        file: String,
        /// Size in the manifest.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// The file's sha256 differs from the manifest's.
    #[error("artifact file `{file}` has sha256 {actual}, manifest.json says {expected} (modified or corrupted)")]
    Hash {
        /// Relative path.
        file: String,
        /// sha256 in the manifest (lowercase hex).
        expected: String,
        /// sha256 of the file on disk.
        actual: String,
    },
    /// A file could not be opened or read.
    #[error("cannot read artifact file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// What [`Manifest::verify_files`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegrityReport {
    /// Files whose size and sha256 matched.
    pub files: usize,
    /// Bytes hashed.
    pub bytes: u64,
    /// Files in the directory (besides `manifest.json`) that the manifest does not list; they were not verified.
    pub unlisted: Vec<String>,
}

impl Manifest {
    /// Verifies every file listed in `files` against its size and sha256 (sizes of all files first, so a truncated
    /// multi-GB file is refused before anything is hashed; then hashes, streamed in 8 MiB chunks). `model.onnx`
    /// must be listed. Files present but not listed are returned in the report, not refused.
    pub fn verify_files(&self, dir: &Path) -> std::result::Result<IntegrityReport, IntegrityError> {
        verify_entries(&self.files, dir, &[crate::backend::MODEL_FILE])
    }
}

/// [`Manifest::verify_files`] over a `files` map; every name in `required` must be listed.
pub fn verify_entries(
    files: &BTreeMap<String, FileEntry>,
    dir: &Path,
    required: &[&str],
) -> std::result::Result<IntegrityReport, IntegrityError> {
    use std::path::Component;
    for r in required {
        if !files.contains_key(*r) {
            return Err(IntegrityError::Unlisted { file: (*r).to_string() });
        }
    }
    let mut paths = Vec::with_capacity(files.len());
    for (rel, entry) in files {
        let p = Path::new(rel);
        if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(IntegrityError::UnsafePath { file: rel.clone() });
        }
        let path = dir.join(p);
        let meta = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Err(IntegrityError::Missing { file: rel.clone(), dir: dir.to_path_buf() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IntegrityError::Missing { file: rel.clone(), dir: dir.to_path_buf() })
            }
            Err(source) => return Err(IntegrityError::Io { path, source }),
        };
        if meta.len() != entry.bytes {
            return Err(IntegrityError::Size { file: rel.clone(), expected: entry.bytes, actual: meta.len() });
        }
        paths.push((rel, entry, path));
    }
    let mut bytes = 0u64;
    for (rel, entry, path) in &paths {
        let (actual, n) = sha256_file(path)?;
        if n != entry.bytes {
            return Err(IntegrityError::Size { file: (*rel).clone(), expected: entry.bytes, actual: n });
        }
        if !actual.eq_ignore_ascii_case(&entry.sha256) {
            return Err(IntegrityError::Hash { file: (*rel).clone(), expected: entry.sha256.clone(), actual });
        }
        bytes += n;
    }
    let mut unlisted = Vec::new();
    list_unlisted(dir, dir, files, &mut unlisted);
    unlisted.sort();
    Ok(IntegrityReport { files: paths.len(), bytes, unlisted })
}

/// Lowercase hex sha256 and length of a file, read in 8 MiB chunks.
fn sha256_file(path: &Path) -> std::result::Result<(String, u64), IntegrityError> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let io = |source| IntegrityError::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

/// Appends the relative paths (with `/`) of regular files under `at` that `files` does not list.
fn list_unlisted(root: &Path, at: &Path, files: &BTreeMap<String, FileEntry>, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(at) else { return };
    for e in rd.flatten() {
        let path = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            list_unlisted(root, &path, files, out);
        } else if let Ok(rel) = path.strip_prefix(root) {
            let rel: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            let rel = rel.join("/");
            if rel != MANIFEST_FILE && !files.contains_key(&rel) {
                out.push(rel);
            }
        }
    }
}

#[cfg(test)]
mod integrity_tests {
    use super::*;

    fn artifact() -> (tempfile::TempDir, BTreeMap<String, FileEntry>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut files = BTreeMap::new();
        for (name, body) in [("model.onnx", b"graph bytes".as_slice()), ("sub/model.onnx.data", &[7u8; 10_000][..])] {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, body).expect("write");
            let (sha256, bytes) = sha256_file(&path).expect("hash");
            files.insert(name.to_string(), FileEntry { sha256, bytes });
        }
        (dir, files)
    }

    #[test]
    fn intact_artifact_passes_and_reports_unlisted_files() {
        let (dir, files) = artifact();
        std::fs::write(dir.path().join(MANIFEST_FILE), "{}").expect("write");
        std::fs::write(dir.path().join("notes.txt"), "x").expect("write");
        let r = verify_entries(&files, dir.path(), &["model.onnx"]).expect("intact");
        assert_eq!((r.files, r.bytes, r.unlisted), (2, 11 + 10_000, vec!["notes.txt".to_string()]));
        // Known value: sha256("graph bytes") computed independently of sha256_file's chunking.
        use sha2::Digest;
        assert_eq!(files["model.onnx"].sha256, hex::encode(sha2::Sha256::digest(b"graph bytes")));
    }

    #[test]
    fn one_flipped_byte_is_refused_naming_file_and_both_hashes() {
        let (dir, files) = artifact();
        let path = dir.path().join("sub/model.onnx.data");
        let mut body = std::fs::read(&path).expect("read");
        body[5_000] ^= 1;
        std::fs::write(&path, &body).expect("write");
        let err = verify_entries(&files, dir.path(), &[]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, IntegrityError::Hash { .. }), "{msg}");
        assert!(msg.contains("sub/model.onnx.data") && msg.contains(&files["sub/model.onnx.data"].sha256), "{msg}");
        use sha2::Digest;
        assert!(msg.contains(&hex::encode(sha2::Sha256::digest(&body))), "{msg}");
    }

    #[test]
    fn missing_truncated_unlisted_and_escaping_paths_are_refused() {
        let (dir, files) = artifact();
        let msg = verify_entries(&files, dir.path(), &["tokenizer.json"]).unwrap_err().to_string();
        assert!(msg.contains("does not list `tokenizer.json`"), "{msg}");

        std::fs::write(dir.path().join("model.onnx"), b"graph byte").expect("truncate");
        let msg = verify_entries(&files, dir.path(), &[]).unwrap_err().to_string();
        assert!(msg.contains("`model.onnx` has 10 bytes, manifest.json says 11 bytes"), "{msg}");

        std::fs::remove_file(dir.path().join("model.onnx")).expect("rm");
        let err = verify_entries(&files, dir.path(), &[]).unwrap_err();
        assert!(matches!(err, IntegrityError::Missing { ref file, .. } if file == "model.onnx"), "{err}");

        for bad in ["../outside", "/etc/passwd", "a/../../b", ""] {
            let mut f = BTreeMap::new();
            f.insert(bad.to_string(), FileEntry { sha256: String::new(), bytes: 0 });
            let err = verify_entries(&f, dir.path(), &[]).unwrap_err();
            assert!(matches!(err, IntegrityError::UnsafePath { .. }), "{bad}: {err}");
        }
    }
}
