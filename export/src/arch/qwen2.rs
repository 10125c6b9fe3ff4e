//! `Qwen2ForCausalLM` (DeepSeek-R1-Distill-Qwen-1.5B / 7B / 14B / 32B): the config as HF writes it,
//! validated into a [`DenseSpec`]. q/k/v projections always carry biases; sliding-window attention
//! is refused (the distilled checkpoints do not use it).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::dense::DenseSpec;
use super::rope;
use crate::error::Result;

/// `config.json` of a Qwen2 checkpoint (fields the graph depends on).
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen2Config {
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
    /// Sliding-window attention (not supported when true).
    #[serde(default)]
    pub use_sliding_window: bool,
    /// LM head shares the embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Activation; must be `silu`.
    pub hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    32768
}

impl Qwen2Config {
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
            head_dim: super::divide_hidden(path, self.hidden_size, heads)?,
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
            qkv_bias: true,
            o_bias: false,
            qk_norm: false,
            tie_word_embeddings: self.tie_word_embeddings,
        };
        super::validate_dense(path, &spec, self.hidden_act.as_deref())?;
        Ok(spec)
    }
}
