//! `Qwen3ForCausalLM` (DeepSeek-R1-0528-Qwen3-8B): the config as HF writes it, validated into a
//! [`DenseSpec`]. Per-head `q_norm` / `k_norm`, explicit `head_dim` (may differ from
//! `hidden_size / num_attention_heads`), optional `attention_bias`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::dense::DenseSpec;
use super::rope;
use crate::error::Result;

/// `config.json` of a Qwen3 checkpoint (fields the graph depends on).
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3Config {
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// KV heads (defaults to `num_attention_heads`).
    pub num_key_value_heads: Option<usize>,
    /// Per-head size (transformers' default: 128).
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4.x).
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers 4.x).
    pub rope_scaling: Option<Value>,
    /// RoPE base and scaling (transformers 5.x).
    pub rope_parameters: Option<Value>,
    /// Longest context.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Biases on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Sliding-window attention (not supported when true).
    #[serde(default)]
    pub use_sliding_window: bool,
    /// LM head shares the embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Activation; must be `silu`.
    pub hidden_act: Option<String>,
}

fn default_head_dim() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    32768
}

impl Qwen3Config {
    /// Validates and resolves into the shared dense spec.
    pub fn resolve(&self, path: &Path) -> Result<DenseSpec> {
        super::refuse_sliding_window(path, self.use_sliding_window)?;
        let heads = self.num_attention_heads;
        let spec = DenseSpec {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim: self.head_dim,
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope: rope::parse(
                path,
                self.rope_theta,
                self.rope_scaling.as_ref(),
                self.rope_parameters.as_ref(),
                10000.0,
                self.max_position_embeddings,
            )?,
            max_position_embeddings: self.max_position_embeddings,
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            qk_norm: true,
            tie_word_embeddings: self.tie_word_embeddings,
        };
        super::validate_dense(path, &spec, self.hidden_act.as_deref())?;
        Ok(spec)
    }
}
