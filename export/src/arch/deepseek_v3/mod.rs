//! `DeepseekV3ForCausalLM` (DeepSeek-V3, DeepSeek-R1, R1-0528): Multi-head Latent Attention with a compressed
//! KV cache, a mixture of experts with group-limited sigmoid routing, and FP8 block-scaled source weights.
//!
//! - [`config`]: the config.json mirror, validation, YaRN rotary frequencies and the softmax-scale correction.
//! - [`mla`]: the attention block; the cache holds the normalized latent and the rotated shared rope key.
//! - [`moe`]: the router and the experts (dense masked compute, chosen by measurement, see `moe.rs`).
//! - [`mtp`]: the multi-token-prediction module (checkpoint layer `num_hidden_layers`) as the draft graph
//!   `mtp.onnx`; with it, the main graph also outputs `last_hidden_state` (before the final norm).
//! - this file: the family entry point, the layer loop and weight reading (FP8 blocks dequantized while
//!   streaming, one tensor at a time).
//!
//! Reference: transformers 5.x `modeling_deepseek_v3.py`; the golden cases in
//! `tests/fixtures/golden/deepseek_v3_*` (made by `tests/fixtures/make_golden_deepseek.py`) pin the numbers.

pub mod config;
mod mla;
mod moe;
pub mod mtp;

/// The MoE router's weight (`model.layers.N.mlp.gate.weight`, as the checkpoint names it) ends so. Routers stay
/// float32 in every precision, as in transformers; the quantizer leaves them float too (a rounded router picks other
/// experts: on arith-r1 quantizing them cost int4-wo 0.4 points, BENCHMARKS.md).
pub const ROUTER_WEIGHT_SUFFIX: &str = ".mlp.gate.weight";

use std::path::Path;

use r1_engine::manifest::{DType, KvCacheInfo, ModelInfo};
use safetensors::Dtype;
use serde_json::Value;

use super::common::{AttentionMask, Ctx, Rotary};
use super::{parse_struct, FamilyGraph};
use crate::checkpoint::convert::to_f32_vec;
use crate::checkpoint::fp8::{dequantize, BlockLayout, Fp8Error};
use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
pub use config::{DeepseekV3Config, Fp8Source};

/// The DeepseekV3 family, validated and ready to build.
pub struct DeepseekV3 {
    architecture: String,
    cfg: DeepseekV3Config,
}

impl DeepseekV3 {
    /// Parses and validates config.json (`path` is used in error messages).
    pub fn from_config(path: &Path, config: &Value, architecture: &str) -> Result<Self> {
        let raw: config::RawConfig = parse_struct(path, config)?;
        Ok(DeepseekV3 { architecture: architecture.to_string(), cfg: raw.resolve(path)? })
    }

    /// The resolved config.
    pub fn config(&self) -> &DeepseekV3Config {
        &self.cfg
    }
}

/// The manifest's KV-cache description for the latent layout.
pub fn latent_kv_cache(cfg: &DeepseekV3Config, dtype: DType) -> KvCacheInfo {
    let mut kv = KvCacheInfo {
        layout: "mla_latent".into(),
        num_layers: cfg.num_hidden_layers,
        key_heads: 1,
        key_dim: cfg.kv_lora_rank,
        value_heads: 1,
        value_dim: cfg.qk_rope_head_dim,
        dtype,
        bytes_per_token: 0,
        description: format!(
            "Multi-head Latent Attention cache (compressed, shared by all {heads} heads): \
             past_key_values.{{i}}.key = kv_a_layernorm(compressed kv latent) [batch, 1, past_sequence, {r}] \
             (kv_lora_rank), past_key_values.{{i}}.value = the shared rope key after rotary [batch, 1, \
             past_sequence, {d}] (qk_rope_head_dim, de-interleaved when rope_interleave). Keys and values per head \
             are recovered inside the graph through kv_b_proj (absorbed into the query and output). {lat} values \
             per token per layer instead of {per} for a per-head cache ({ratio:.1}x smaller).",
            heads = cfg.num_attention_heads,
            r = cfg.kv_lora_rank,
            d = cfg.qk_rope_head_dim,
            lat = cfg.latent_values_per_token_layer(),
            per = cfg.per_head_values_per_token_layer(),
            ratio = cfg.per_head_values_per_token_layer() as f64 / cfg.latent_values_per_token_layer() as f64,
        ),
    };
    kv.bytes_per_token = kv.computed_bytes_per_token();
    kv
}

impl FamilyGraph for DeepseekV3 {
    fn family(&self) -> r1_engine::manifest::Family {
        r1_engine::manifest::Family::DeepseekV3
    }
    fn architecture(&self) -> &str {
        &self.architecture
    }
    fn resolved_config(&self) -> Value {
        serde_json::to_value(&self.cfg).unwrap_or(Value::Null)
    }
    fn model_info(&self) -> ModelInfo {
        ModelInfo {
            num_layers: self.cfg.num_hidden_layers,
            vocab_size: self.cfg.vocab_size,
            hidden_size: self.cfg.hidden_size,
            max_position_embeddings: self.cfg.max_position_embeddings,
        }
    }
    fn kv_cache(&self, dtype: DType) -> KvCacheInfo {
        latent_kv_cache(&self.cfg, dtype)
    }
    fn fp8_block_quantized(&self) -> bool {
        self.cfg.fp8.is_some()
    }
    fn notes(&self) -> Vec<String> {
        let c = &self.cfg;
        let mut notes = Vec::new();
        if c.num_nextn_predict_layers > 1 {
            notes.push(format!(
                "multi-token-prediction modules model.layers.{}.. past the first were not exported \
                 (num_nextn_predict_layers = {}): the draft graph is the first module, chained on itself",
                c.num_hidden_layers + 1,
                c.num_nextn_predict_layers
            ));
        }
        if let Some(f) = &c.fp8 {
            notes.push(format!(
                "source weights were FP8 e4m3 with weight_scale_inv per {}x{} block; dequantized at export \
                 (fp8_block_quantized)",
                f.weight_block_size[0], f.weight_block_size[1]
            ));
        }
        notes.push(format!(
            "MoE: {} routed experts (top-{} within top-{} of {} groups, sigmoid + e_score_correction_bias) run as \
             dense masked compute: every expert on every token, weighted by a top-k mask",
            c.n_routed_experts, c.num_experts_per_tok, c.topk_group, c.n_group
        ));
        notes
    }
    fn build(&self, ctx: &mut Ctx) -> Result<()> {
        build(&self.cfg, ctx)
    }
    fn draft_layer(&self) -> Option<usize> {
        (self.cfg.num_nextn_predict_layers > 0).then_some(self.cfg.num_hidden_layers)
    }
    fn check_draft(&self, ck: &Checkpoint) -> Result<()> {
        mtp::check_tensors(&self.cfg, ck)
    }
    fn draft_kv_cache(&self, dtype: DType) -> KvCacheInfo {
        mtp::kv_cache(&self.cfg, dtype)
    }
    fn build_draft(&self, ctx: &mut Ctx) -> Result<()> {
        mtp::build(&self.cfg, ctx)
    }
}

/// Embeddings → layers (MLA + dense MLP or MoE) → final norm → LM head. The MTP module (layer
/// `num_hidden_layers`) is the draft graph ([`mtp`]); with `ctx.last_hidden_state` the main graph also outputs the
/// last layer's output before the final norm, which the draft takes.
fn build(cfg: &DeepseekV3Config, ctx: &mut Ctx) -> Result<()> {
    let h = cfg.hidden_size;
    let inputs = ctx.declare_inputs();
    let mask = ctx.attention_mask(&inputs)?;
    let (inv_freq, attention_factor) = cfg.rope_inv_freq();
    let rot = ctx.rotary(&inputs, &inv_freq, attention_factor)?;
    let mut x = ctx.embed("model.embed_tokens.weight", &inputs.input_ids, cfg.vocab_size, h)?;
    for i in 0..cfg.num_hidden_layers {
        x = decoder_layer(ctx, cfg, (i, i), &x, &mask, &rot)?;
    }
    if ctx.last_hidden_state {
        mtp::hidden_output(ctx, &x, h)?;
    }
    let x = ctx.rms_norm("/model/norm", &x, "model.norm.weight", h, cfg.rms_norm_eps)?;
    let head = if cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
    ctx.lm_head(&x, head, h, cfg.vocab_size)?;
    Ok(())
}

/// One decoder layer (MLA + dense MLP or MoE, pre-norm residuals) of checkpoint layer `layer`, cached at the graph's
/// `cache_layer`; returns the layer's output `[B, S, hidden]`.
pub(crate) fn decoder_layer(
    ctx: &mut Ctx,
    cfg: &DeepseekV3Config,
    (layer, cache_layer): (usize, usize),
    x: &str,
    mask: &AttentionMask,
    rot: &Rotary,
) -> Result<String> {
    let h = cfg.hidden_size;
    let p = format!("/model/layers.{layer}");
    let hf = format!("model.layers.{layer}");
    let eps = cfg.rms_norm_eps;
    let normed = ctx.rms_norm(&format!("{p}/input_layernorm"), x, &format!("{hf}.input_layernorm.weight"), h, eps)?;
    let attn = mla::attention(ctx, cfg, (layer, cache_layer), &normed, mask, rot)?;
    let x = ctx.b.add(&format!("{p}/attn_residual/Add"), x, &attn)?;
    let normed = ctx.rms_norm(
        &format!("{p}/post_attention_layernorm"),
        &x,
        &format!("{hf}.post_attention_layernorm.weight"),
        h,
        eps,
    )?;
    let mlp = if cfg.is_moe_layer(layer) {
        moe::moe(ctx, cfg, layer, &normed)?
    } else {
        swiglu(ctx, cfg, &format!("{p}/mlp"), &normed, &format!("{hf}.mlp"), h, cfg.intermediate_size)?
    };
    ctx.b.add(&format!("{p}/mlp_residual/Add"), &x, &mlp)
}

/// Reads a `[rows, cols]` weight as f32. FP8 e4m3 weights are dequantized with their `{key}_scale_inv`
/// (one f32 per block of `config.quantization_config.weight_block_size`, partial edge blocks included);
/// bf16/f16/f32 weights are converted. The tensor's pages are released afterwards.
pub(crate) fn read_matrix(
    ck: &Checkpoint,
    fp8: Option<&Fp8Source>,
    key: &str,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>> {
    let t = ck.tensor(key, &[rows, cols])?;
    let out = if t.dtype == Dtype::F8_E4M3 {
        let Some(fp8) = fp8 else {
            return Err(ExportError::TensorDtype {
                file: t.file.to_path_buf(),
                name: key.to_string(),
                expected: "BF16, F16, F32 (F8_E4M3 needs quantization_config.quant_method = \"fp8\" in config.json)",
                got: format!("{:?}", t.dtype),
            });
        };
        let [br, bc] = fp8.weight_block_size;
        let scale_key = format!("{key}_scale_inv");
        let s = ck.tensor(&scale_key, &[rows.div_ceil(br), cols.div_ceil(bc)])?;
        let scales = to_f32_vec(s.data, s.float()?);
        let fp8_err = |e: Fp8Error| ExportError::Safetensors {
            path: t.file.to_path_buf(),
            message: format!("tensor `{key}`: {e}"),
        };
        let layout = BlockLayout::new(t.shape, s.shape, &fp8.weight_block_size).map_err(fp8_err)?;
        let v = dequantize(&layout, t.data, &scales).map_err(fp8_err)?;
        ck.release(&scale_key);
        v
    } else {
        to_f32_vec(t.data, t.float()?)
    };
    ck.release(key);
    Ok(out)
}

/// [`read_matrix`] with progress reporting.
pub(crate) fn matrix_f32(
    ctx: &mut Ctx,
    cfg: &DeepseekV3Config,
    key: &str,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>> {
    let m = read_matrix(ctx.ck, cfg.fp8.as_ref(), key, rows, cols)?;
    (ctx.progress)(key, (m.len() * 4) as u64);
    Ok(m)
}

/// `[rows, cols]` → `[cols, rows]`.
pub(crate) fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; m.len()];
    for r in 0..rows {
        for (c, v) in m[r * cols..(r + 1) * cols].iter().enumerate() {
            out[c * rows + r] = *v;
        }
    }
    out
}

/// Writes f32 values as a weight initializer in the export dtype (chunked, no second full copy in bytes). A 2-D
/// one is a MatMul's weight: a streamed quantized export quantizes it as it is
/// ([`crate::onnx::GraphBuilder::matmul_weight_f32`]).
pub(crate) fn write_weight(ctx: &mut Ctx, name: &str, dims: &[usize], values: &[f32]) -> Result<String> {
    let dtype = ctx.dtype;
    let d: Vec<i64> = dims.iter().map(|&x| x as i64).collect();
    if d.len() == 2 {
        return ctx.b.matmul_weight_f32(name, dtype, &d, values);
    }
    ctx.b.weight(name, dtype, &d, |sink| {
        for chunk in values.chunks(1 << 20) {
            sink(&dtype.encode_f32(chunk)?)?;
        }
        Ok(())
    })
}

/// A `Linear` weight (`[out, in]` in the checkpoint) written as `[in, out]`; FP8 sources are dequantized,
/// others go through the shared streaming transposer.
pub(crate) fn linear_weight(
    ctx: &mut Ctx,
    cfg: &DeepseekV3Config,
    key: &str,
    out_f: usize,
    in_f: usize,
) -> Result<String> {
    let is_fp8 = ctx.ck.tensor_any_shape(key).map(|t| t.dtype == Dtype::F8_E4M3).unwrap_or(false);
    if !is_fp8 {
        return ctx.matrix_t(key, out_f, in_f);
    }
    let m = matrix_f32(ctx, cfg, key, out_f, in_f)?;
    write_weight(ctx, key, &[in_f, out_f], &transpose(&m, out_f, in_f))
}

/// `x @ W^T` for the checkpoint `Linear` `{hf}.weight`.
pub(crate) fn linear(
    ctx: &mut Ctx,
    cfg: &DeepseekV3Config,
    node: &str,
    x: &str,
    hf: &str,
    in_f: usize,
    out_f: usize,
) -> Result<String> {
    let w = linear_weight(ctx, cfg, &format!("{hf}.weight"), out_f, in_f)?;
    ctx.b.matmul(&format!("{node}/MatMul"), x, &w)
}

/// SwiGLU MLP `down(silu(gate(x)) * up(x))` whose weights may be FP8.
pub(crate) fn swiglu(
    ctx: &mut Ctx,
    cfg: &DeepseekV3Config,
    node: &str,
    x: &str,
    hf: &str,
    hidden: usize,
    inter: usize,
) -> Result<String> {
    let g = linear(ctx, cfg, &format!("{node}/gate_proj"), x, &format!("{hf}.gate_proj"), hidden, inter)?;
    let u = linear(ctx, cfg, &format!("{node}/up_proj"), x, &format!("{hf}.up_proj"), hidden, inter)?;
    let sg = ctx.b.unary(&format!("{node}/act_fn/Sigmoid"), "Sigmoid", &g)?;
    let act = ctx.b.mul(&format!("{node}/act_fn/Mul"), &g, &sg)?;
    let prod = ctx.b.mul(&format!("{node}/Mul"), &act, &u)?;
    linear(ctx, cfg, &format!("{node}/down_proj"), &prod, &format!("{hf}.down_proj"), inter, hidden)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_is_correct() {
        let m = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(transpose(&m, 2, 3), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }

    #[test]
    fn r1_latent_cache_is_576_values_per_token_layer() {
        let raw: config::RawConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "num_hidden_layers": 61, "num_attention_heads": 128, "n_routed_experts": 256, "kv_lora_rank": 512,
            "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
            "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "max_position_embeddings": 163840
        }))
        .unwrap();
        let cfg = raw.resolve(Path::new("config.json")).unwrap();
        let kv = latent_kv_cache(&cfg, DType::Float16);
        assert_eq!(kv.bytes_per_token, 61 * 576 * 2);
        assert_eq!(kv.bytes_per_token, kv.computed_bytes_per_token());
        // per-head layout: 61 layers * 128 heads * (192 + 128) * 2 bytes
        assert_eq!(cfg.per_head_values_per_token_layer() * 61 * 2, 4_997_120);
    }
}
