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
//!   mtp.onnx, mtp.onnx.data  the draft graph (DeepseekV3's multi-token-prediction module, optional; `draft`)
//!   engines/<target>/...     per-GPU TensorRT builds (optional)
//! ```

pub mod draft;
pub mod integrity;
pub mod kinds;
pub mod names;
pub mod records;
pub mod target_table;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

pub use draft::DraftGraph;
pub use integrity::{verify_entries, IntegrityError, IntegrityReport};
pub use kinds::{Family, Precision, UnknownName};
pub use names::MANIFEST_FILE;
pub use records::{CpuBuild, CudaGraph, EngineBuild, ProfileRecord, TargetRecord, Targets};

/// Current manifest format version. Bump on incompatible changes.
pub const MANIFEST_VERSION: u32 = 1;

/// Everything an artifact says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`] at write time.
    pub format_version: u32,
    /// Which tool wrote it.
    pub exporter: ExporterInfo,
    /// Model family.
    pub family: Family,
    /// The checkpoint's `architectures[0]`, e.g. `Qwen2ForCausalLM`.
    pub architecture: String,
    /// Precision of the graph's weights and KV cache.
    pub precision: Precision,
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
    /// Per-target engine builds or build plans, by target name (`a100`, `cpu`, ...), typed.
    #[serde(default)]
    pub targets: Targets,
    /// Calibration / quantization summary when the graph is quantized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<serde_json::Value>,
    /// The draft graph for speculative decoding (DeepseekV3's MTP module), when exported; absent in older manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft: Option<DraftGraph>,
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
    /// Keys of the checkpoint's config.json that the exporter did not read, each with the reason (dotted for a key
    /// inside `rope_scaling` / `quantization_config`); every other key was read (`export/src/arch/config_keys.rs`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ignored_config_keys: BTreeMap<String, String>,
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

    /// How many routed-expert stacks the portable graph holds quantized behind a blocked `DequantizeLinear` (a
    /// streamed `int8-wo` / `int4-wo` DeepseekV3 export, `quantization.quantized_expert_stacks`); 0 otherwise.
    pub fn quantized_expert_stacks(&self) -> u64 {
        self.quantization
            .as_ref()
            .and_then(|q| q.get("quantized_expert_stacks"))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    }

    /// Reads and checks `DIR/manifest.json`. Does not verify file hashes (see [`Manifest::verify_files`]).
    /// A value that does not parse is an error naming the file and the key (`targets.cpu`, `precision`, ...).
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io { path: path.clone(), source })?;
        let m = Manifest::parse(&text).map_err(|message| EngineError::Manifest { path: path.clone(), message })?;
        m.check(&path)?;
        Ok(m)
    }

    /// Parses manifest JSON; the error names the key path of the value that failed (`key `precision`: ...`).
    pub fn parse(text: &str) -> std::result::Result<Manifest, String> {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            if key == "." || key.is_empty() {
                e.into_inner().to_string()
            } else {
                format!("key `{key}`: {}", e.into_inner())
            }
        })
    }

    /// Writes `dir/manifest.json` atomically and durably, after [`Manifest::check`]: a temporary file in `dir`,
    /// fsynced, renamed over the old one, then the directory fsynced (best effort: not every filesystem allows it).
    /// A reader sees the old manifest or the new one, never a partial file. The one writer of manifests.
    pub fn write_atomic(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        self.check(&path)?;
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| EngineError::Manifest { path: path.clone(), message: format!("cannot serialize: {e}") })?;
        let tmp = dir.join(format!(".{MANIFEST_FILE}.tmp-{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(source) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(EngineError::Io { path, source });
        }
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
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
        for required in names::REQUIRED_INPUTS {
            if !self.inputs.iter().any(|t| t.name == required) {
                return Err(bad(format!("graph input `{required}` is missing")));
            }
        }
        if !self.outputs.iter().any(|t| t.name == names::LOGITS) {
            return Err(bad("graph output `logits` is missing".into()));
        }
        if let Some(d) = &self.draft {
            d.check(&self.outputs).map_err(bad)?;
            if !self.files.contains_key(&d.graph) {
                return Err(bad(format!("draft.graph `{}` is not listed in files", d.graph)));
            }
        }
        Ok(())
    }
}
