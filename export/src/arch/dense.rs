//! The dense decoder shared by Llama, Qwen2 and Qwen3: embeddings → N × (RMSNorm → GQA attention
//! with rotary and KV cache → residual → RMSNorm → SwiGLU MLP → residual) → RMSNorm → LM head.
//! Families differ only in flags of [`DenseSpec`] (q/k/v biases, per-head q/k norms, head_dim,
//! rope scaling, tied embeddings), which each family file fills from its own config struct.

use r1_engine::manifest::{KvCacheInfo, ModelInfo};
use serde::Serialize;

use super::common::Ctx;
use super::rope::Rope;
use crate::error::Result;

/// A validated dense-decoder configuration.
#[derive(Debug, Clone, Serialize)]
pub struct DenseSpec {
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (divides `num_heads`).
    pub num_kv_heads: usize,
    /// Per-head size (may differ from `hidden_size / num_heads`, e.g. Qwen3).
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary settings.
    pub rope: Rope,
    /// Longest supported context.
    pub max_position_embeddings: usize,
    /// q/k/v projections have biases (Qwen2; Llama `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj has a bias (Llama `attention_bias`).
    pub o_bias: bool,
    /// Per-head RMSNorm on q and k before rotary (Qwen3 `q_norm` / `k_norm`).
    pub qk_norm: bool,
    /// LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl DenseSpec {
    /// Model dimensions for the manifest.
    pub fn model_info(&self) -> ModelInfo {
        ModelInfo {
            num_layers: self.num_layers,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            max_position_embeddings: self.max_position_embeddings,
        }
    }

    /// KV cache description for the manifest.
    pub fn kv_cache(&self, dtype: r1_engine::manifest::DType) -> KvCacheInfo {
        let mut kv = KvCacheInfo {
            layout: "per_head".into(),
            num_layers: self.num_layers,
            key_heads: self.num_kv_heads,
            key_dim: self.head_dim,
            value_heads: self.num_kv_heads,
            value_dim: self.head_dim,
            dtype,
            bytes_per_token: 0,
            description: "past_key_values.{i}.key: keys after rotary, past_key_values.{i}.value: values; \
                          [batch, num_kv_heads, past_sequence, head_dim]"
                .into(),
        };
        kv.bytes_per_token = kv.computed_bytes_per_token();
        kv
    }

    /// Builds the whole graph into `ctx`.
    pub fn build(&self, ctx: &mut Ctx) -> Result<()> {
        let (h, nh, nkv, d) = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim);
        let inputs = ctx.declare_inputs();
        let mask = ctx.attention_mask(&inputs)?;
        let (inv_freq, scale) = self.rope.tables(d);
        let rot = ctx.rotary(&inputs, &inv_freq, scale)?;
        let mut x = ctx.embed("model.embed_tokens.weight", &inputs.input_ids, self.vocab_size, h)?;
        for i in 0..self.num_layers {
            let p = format!("/model/layers.{i}");
            let hf = format!("model.layers.{i}");
            let normed = ctx.rms_norm(
                &format!("{p}/input_layernorm"),
                &x,
                &format!("{hf}.input_layernorm.weight"),
                h,
                self.rms_norm_eps,
            )?;
            let a = format!("{p}/self_attn");
            let ha = format!("{hf}.self_attn");
            let q = ctx.linear(&format!("{a}/q_proj"), &normed, &format!("{ha}.q_proj"), h, nh * d, self.qkv_bias)?;
            let k = ctx.linear(&format!("{a}/k_proj"), &normed, &format!("{ha}.k_proj"), h, nkv * d, self.qkv_bias)?;
            let v = ctx.linear(&format!("{a}/v_proj"), &normed, &format!("{ha}.v_proj"), h, nkv * d, self.qkv_bias)?;
            let (q, k) = if self.qk_norm {
                // Qwen3: RMSNorm over head_dim of each head, before the heads are transposed.
                let q4 = ctx.b.reshape(&format!("{a}/q_heads/Reshape"), &q, &[0, 0, nh as i64, d as i64])?;
                let k4 = ctx.b.reshape(&format!("{a}/k_heads/Reshape"), &k, &[0, 0, nkv as i64, d as i64])?;
                let qn =
                    ctx.rms_norm(&format!("{a}/q_norm"), &q4, &format!("{ha}.q_norm.weight"), d, self.rms_norm_eps)?;
                let kn =
                    ctx.rms_norm(&format!("{a}/k_norm"), &k4, &format!("{ha}.k_norm.weight"), d, self.rms_norm_eps)?;
                (
                    ctx.b.transpose(&format!("{a}/q_heads/Transpose"), &qn, &[0, 2, 1, 3])?,
                    ctx.b.transpose(&format!("{a}/k_heads/Transpose"), &kn, &[0, 2, 1, 3])?,
                )
            } else {
                (
                    ctx.split_heads(&format!("{a}/q_heads"), &q, nh, d)?,
                    ctx.split_heads(&format!("{a}/k_heads"), &k, nkv, d)?,
                )
            };
            let v = ctx.split_heads(&format!("{a}/v_heads"), &v, nkv, d)?;
            let q = ctx.apply_rotary(&format!("{a}/q_rotary"), &q, &rot)?;
            let k = ctx.apply_rotary(&format!("{a}/k_rotary"), &k, &rot)?;
            let (k_all, v_all) = ctx.kv_cache(i, &k, &v, (nkv, d), (nkv, d))?;
            let scale = 1.0 / (d as f32).sqrt();
            let attn = ctx.attention(&format!("{a}/attn"), &q, &k_all, &v_all, &mask, (nh, nkv), (d, d), scale)?;
            let o = ctx.linear(&format!("{a}/o_proj"), &attn, &format!("{ha}.o_proj"), nh * d, h, self.o_bias)?;
            let x1 = ctx.b.add(&format!("{p}/attn_residual/Add"), &x, &o)?;
            let normed2 = ctx.rms_norm(
                &format!("{p}/post_attention_layernorm"),
                &x1,
                &format!("{hf}.post_attention_layernorm.weight"),
                h,
                self.rms_norm_eps,
            )?;
            let m = ctx.swiglu_mlp(&format!("{p}/mlp"), &normed2, &format!("{hf}.mlp"), h, self.intermediate_size)?;
            x = ctx.b.add(&format!("{p}/mlp_residual/Add"), &x1, &m)?;
        }
        let xn = ctx.rms_norm("/model/norm", &x, "model.norm.weight", h, self.rms_norm_eps)?;
        let head_key = if self.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        ctx.lm_head(&xn, head_key, h, self.vocab_size)?;
        ctx.b.move_output_first("logits");
        Ok(())
    }
}
