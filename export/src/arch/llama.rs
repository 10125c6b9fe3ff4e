//! `LlamaForCausalLM` (DeepSeek-R1-Distill-Llama-8B / -70B): the config as HF writes it, validated
//! into a [`DenseSpec`]. Optional `attention_bias`, explicit `head_dim`, Llama-3 `rope_scaling`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::dense::DenseSpec;
use super::{invalid, rope};
use crate::error::Result;

/// `config.json` of a Llama checkpoint (fields the graph depends on).
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
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
    /// Per-head size (defaults to `hidden_size / num_attention_heads`).
    pub head_dim: Option<usize>,
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
    /// Biases on MLP projections (not supported).
    #[serde(default)]
    pub mlp_bias: bool,
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
    2048
}

impl LlamaConfig {
    /// Validates and resolves into the shared dense spec.
    pub fn resolve(&self, path: &Path) -> Result<DenseSpec> {
        if self.mlp_bias {
            return Err(invalid(path, "mlp_bias", "must be false (MLP biases are not supported), got true".into()));
        }
        let heads = self.num_attention_heads;
        let head_dim = match self.head_dim {
            Some(d) => d,
            None => super::divide_hidden(path, self.hidden_size, heads)?,
        };
        let spec = DenseSpec {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim,
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
            qk_norm: false,
            tie_word_embeddings: self.tie_word_embeddings,
        };
        super::validate_dense(path, &spec, self.hidden_act.as_deref())?;
        Ok(spec)
    }
}
