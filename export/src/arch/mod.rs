//! Model families. `config.json`'s `architectures[0]` picks the family; each family file holds a
//! serde struct mirroring HF's config, validated into something that can build the graph.
//!
//! - `llama.rs`, `qwen2.rs`, `qwen3.rs`: dense decoders, all built by `dense.rs`.
//! - `common.rs`: layer pieces shared by every family (also the DeepseekV3 one).
//! - `rope.rs`: rotary parameters and inverse frequencies.
//! - `config_keys.rs`: which config.json keys are read, and the reason for each one left (manifest
//!   `source.ignored_config_keys`).

pub mod common;
pub mod config_keys;
pub mod deepseek_v3;
pub mod dense;
pub mod llama;
pub mod qwen2;
pub mod qwen3;
pub mod rope;

use std::path::Path;

use r1_engine::manifest::{DType, Family, KvCacheInfo, ModelInfo};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use common::Ctx;
use dense::DenseSpec;

/// `architectures[0]` values this exporter accepts.
pub const SUPPORTED_ARCHITECTURES: &[&str] =
    &["Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM", "DeepseekV3ForCausalLM"];

/// A validated model family, ready to build its graph.
pub trait FamilyGraph {
    /// The family.
    fn family(&self) -> Family;
    /// `architectures[0]` of the checkpoint.
    fn architecture(&self) -> &str;
    /// The resolved config, for the manifest.
    fn resolved_config(&self) -> Value;
    /// Model dimensions for the manifest.
    fn model_info(&self) -> ModelInfo;
    /// KV-cache description for a cache dtype.
    fn kv_cache(&self, dtype: DType) -> KvCacheInfo;
    /// True when the checkpoint stores FP8 block-scaled weights that are dequantized at export.
    fn fp8_block_quantized(&self) -> bool {
        false
    }
    /// Notes for the manifest (skipped tensors, conversions).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// Builds the graph, streaming weights from `ctx.ck`.
    fn build(&self, ctx: &mut Ctx) -> Result<()>;
    /// The checkpoint layer of the draft module the config declares (DeepseekV3's first multi-token-prediction
    /// module, `num_hidden_layers`), or `None`: then there is no draft graph and the `*_draft` methods are unused.
    fn draft_layer(&self) -> Option<usize> {
        None
    }
    /// Checks that `ck` holds every tensor of the draft module (before anything is built).
    fn check_draft(&self, _ck: &Checkpoint) -> Result<()> {
        Ok(())
    }
    /// The draft graph's KV-cache description.
    fn draft_kv_cache(&self, dtype: DType) -> KvCacheInfo {
        self.kv_cache(dtype)
    }
    /// Builds the draft graph (`manifest.draft`), streaming weights from `ctx.ck`.
    fn build_draft(&self, _ctx: &mut Ctx) -> Result<()> {
        Err(ExportError::Graph(format!("{} has no draft graph", self.architecture())))
    }
}

/// A dense family (Llama, Qwen2, Qwen3).
pub struct Dense {
    family: Family,
    architecture: String,
    spec: DenseSpec,
}

impl Dense {
    /// The resolved spec.
    pub fn spec(&self) -> &DenseSpec {
        &self.spec
    }
}

impl FamilyGraph for Dense {
    fn family(&self) -> Family {
        self.family
    }
    fn architecture(&self) -> &str {
        &self.architecture
    }
    fn resolved_config(&self) -> Value {
        serde_json::to_value(&self.spec).unwrap_or(Value::Null)
    }
    fn model_info(&self) -> ModelInfo {
        self.spec.model_info()
    }
    fn kv_cache(&self, dtype: DType) -> KvCacheInfo {
        self.spec.kv_cache(dtype)
    }
    fn build(&self, ctx: &mut Ctx) -> Result<()> {
        self.spec.build(ctx)
    }
}

/// Deserializes a family config struct, turning serde's message (which names the field) into an
/// error naming the file.
pub fn parse_struct<T: DeserializeOwned>(path: &Path, config: &Value) -> Result<T> {
    T::deserialize(config).map_err(|e| ExportError::Json { path: path.to_path_buf(), message: e.to_string() })
}

/// An [`ExportError::InvalidConfig`] for `field` of `path`.
pub fn invalid(path: &Path, field: &'static str, message: String) -> ExportError {
    ExportError::InvalidConfig { path: path.to_path_buf(), field, message }
}

/// Refuses `use_sliding_window: true` (Qwen2/Qwen3 configs): the graph implements full causal attention only.
pub fn refuse_sliding_window(path: &Path, use_sliding_window: bool) -> Result<()> {
    if use_sliding_window {
        return Err(invalid(
            path,
            "use_sliding_window",
            "must be false (sliding-window attention is not supported), got true".into(),
        ));
    }
    Ok(())
}
/// `hidden / heads`, refusing sizes where the heads do not divide the hidden size.
pub fn divide_hidden(path: &Path, hidden: usize, heads: usize) -> Result<usize> {
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(invalid(
            path,
            "num_attention_heads",
            format!("must divide hidden_size ({hidden}) when head_dim is not given, got {heads}"),
        ));
    }
    Ok(hidden / heads)
}

/// Checks the invariants every dense decoder needs.
/// Largest value config.json may give for a size. Far above every released model (DeepSeek-R1: vocab 129,280, context
/// 163,840, hidden 7,168, 61 layers, 256 experts), and small enough that the products the exporter and the engine form
/// from them (tensor element counts, KV bytes per token, rotary tables) cannot overflow or ask for terabytes.
pub fn max_size(field: &str) -> usize {
    match field {
        "vocab_size" | "max_position_embeddings" => 1 << 24,
        "num_hidden_layers"
        | "num_attention_heads"
        | "n_routed_experts"
        | "n_shared_experts"
        | "num_experts_per_tok" => 1 << 16,
        _ => 1 << 20,
    }
}

/// Checks a dense family's sizes: at least 1, at most [`max_size`], consistent with each other.
pub fn validate_dense(path: &Path, s: &DenseSpec, act: Option<&str>) -> Result<()> {
    let positive: [(&'static str, usize); 7] = [
        ("hidden_size", s.hidden_size),
        ("intermediate_size", s.intermediate_size),
        ("num_hidden_layers", s.num_layers),
        ("num_attention_heads", s.num_heads),
        ("num_key_value_heads", s.num_kv_heads),
        ("head_dim", s.head_dim),
        ("vocab_size", s.vocab_size),
    ];
    for (field, v) in positive {
        if v == 0 {
            return Err(invalid(path, field, "must be at least 1, got 0".into()));
        }
        if v > max_size(field) {
            return Err(invalid(path, field, format!("must be at most {}, got {v}", max_size(field))));
        }
    }
    if !s.num_heads.is_multiple_of(s.num_kv_heads) {
        return Err(invalid(
            path,
            "num_key_value_heads",
            format!("must divide num_attention_heads ({}), got {}", s.num_heads, s.num_kv_heads),
        ));
    }
    if !s.head_dim.is_multiple_of(2) {
        return Err(invalid(path, "head_dim", format!("must be even for rotary embeddings, got {}", s.head_dim)));
    }
    if !(s.rms_norm_eps > 0.0 && s.rms_norm_eps < 1.0) {
        return Err(invalid(path, "rms_norm_eps", format!("must be in (0, 1), got {}", s.rms_norm_eps)));
    }
    if let Some(a) = act {
        if a != "silu" {
            return Err(invalid(path, "hidden_act", format!("must be `silu` (SwiGLU), got `{a}`")));
        }
    }
    Ok(())
}

/// Reads `architectures[0]` and parses + validates the matching family config.
pub fn from_config(path: &Path, config: &Value) -> Result<Box<dyn FamilyGraph>> {
    let arch = config.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str).ok_or_else(|| {
        invalid(
            path,
            "architectures",
            format!("must be a non-empty list of strings, got {}", config.get("architectures").unwrap_or(&Value::Null)),
        )
    })?;
    let dense = |family: Family, spec: DenseSpec| -> Result<Box<dyn FamilyGraph>> {
        Ok(Box::new(Dense { family, architecture: arch.to_string(), spec }))
    };
    match arch {
        "Qwen2ForCausalLM" => dense(Family::Qwen2, parse_struct::<qwen2::Qwen2Config>(path, config)?.resolve(path)?),
        "LlamaForCausalLM" => dense(Family::Llama, parse_struct::<llama::LlamaConfig>(path, config)?.resolve(path)?),
        "Qwen3ForCausalLM" => dense(Family::Qwen3, parse_struct::<qwen3::Qwen3Config>(path, config)?.resolve(path)?),
        "DeepseekV3ForCausalLM" => Ok(Box::new(deepseek_v3::DeepseekV3::from_config(path, config, arch)?)),
        other => Err(ExportError::UnknownArchitecture {
            path: path.to_path_buf(),
            got: other.to_string(),
            supported: SUPPORTED_ARCHITECTURES.join(", "),
        }),
    }
}
