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
        self.num_layers * (self.key_heads * self.key_dim + self.value_heads * self.value_dim) * self.dtype.size()
    }
}

/// sha256 and size of one artifact file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

impl Manifest {
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
