//! `config.json` of a `DeepseekV3ForCausalLM` checkpoint (DeepSeek-V3, DeepSeek-R1, R1-0528): the serde mirror of
//! the file, its validation, and the derived values the graph needs (rotary frequencies with YaRN, the softmax
//! scale with its mscale correction).
//!
//! The reference is transformers' `modeling_deepseek_v3.py` / `modeling_rope_utils.py` (5.x). Values the exporter
//! does not implement are refused by name rather than silently mis-exported.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::arch::rope::{yarn_mscale, Yarn};
use crate::arch::{invalid, max_size};
use crate::error::{ExportError, Result};

/// `config.json` as written by the released checkpoints (old-style `rope_scaling` + `rope_theta`) or by
/// transformers 5 (`rope_parameters`). Unknown keys (`ep_size`, `aux_loss_alpha`, ...) are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct RawConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "one")]
    pub n_shared_experts: usize,
    pub n_routed_experts: usize,
    #[serde(default = "one_f64")]
    pub routed_scaling_factor: f64,
    pub kv_lora_rank: usize,
    #[serde(default)]
    pub q_lora_rank: Option<usize>,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub qk_nope_head_dim: usize,
    #[serde(default)]
    pub n_group: Option<usize>,
    #[serde(default)]
    pub topk_group: Option<usize>,
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub first_k_dense_replace: usize,
    #[serde(default = "yes")]
    pub norm_topk_prob: bool,
    #[serde(default = "one")]
    pub moe_layer_freq: usize,
    #[serde(default)]
    pub scoring_func: Option<String>,
    #[serde(default)]
    pub topk_method: Option<String>,
    #[serde(default = "silu")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "yes")]
    pub rope_interleave: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub num_nextn_predict_layers: usize,
    #[serde(default)]
    pub quantization_config: Option<serde_json::Value>,
}

fn one() -> usize {
    1
}
fn one_f64() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}
fn default_eps() -> f64 {
    1e-6
}

/// Rotary scaling that the exporter implements.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// YaRN (R1: factor 40, original 4096, mscale = mscale_all_dim = 1), shared with the dense families.
    Yarn(Yarn),
}

/// FP8 block quantization of the source checkpoint (`quantization_config`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fp8Source {
    /// `weight_block_size`, `[128, 128]` for R1.
    pub weight_block_size: [usize; 2],
}

/// The validated configuration the graph is built from (also written to the manifest's `config`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeepseekV3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub n_shared_experts: usize,
    pub n_routed_experts: usize,
    pub routed_scaling_factor: f64,
    pub kv_lora_rank: usize,
    pub q_lora_rank: Option<usize>,
    pub qk_rope_head_dim: usize,
    pub qk_nope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub num_experts_per_tok: usize,
    pub first_k_dense_replace: usize,
    pub norm_topk_prob: bool,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rope_interleave: bool,
    /// Multi-token-prediction layers in the checkpoint (indices `num_hidden_layers..`), skipped by the exporter.
    pub num_nextn_predict_layers: usize,
    pub fp8: Option<Fp8Source>,
}

/// RMSNorm epsilon of `q_a_layernorm` and `kv_a_layernorm`: transformers builds them with the module default,
/// not `rms_norm_eps`.
pub const LORA_NORM_EPS: f64 = 1e-6;

fn num(v: &serde_json::Value, key: &str) -> Option<f64> {
    v.get(key).and_then(|x| x.as_f64())
}

impl RawConfig {
    /// Validates and resolves. Errors name config.json, the key, what is supported and the value found.
    pub fn resolve(self, path: &Path) -> Result<DeepseekV3Config> {
        self.check_sizes(path)?;
        self.check_supported(path)?;
        let groups = self.resolve_groups(path)?;
        self.check_scalars(path)?;
        let rope = resolve_rope(path, &self)?;
        let fp8 = match &self.quantization_config {
            None => None,
            Some(q) => Some(resolve_quant(path, q)?),
        };
        Ok(self.into_config(groups, rope, fp8))
    }

    /// Refuses a size of 0, or one above its [`max_size`].
    fn check_sizes(&self, path: &Path) -> Result<()> {
        let c = self;
        let bad = |field: &'static str, message: String| invalid(path, field, message);
        for (k, v) in [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("moe_intermediate_size", c.moe_intermediate_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("n_routed_experts", c.n_routed_experts),
            ("kv_lora_rank", c.kv_lora_rank),
            ("qk_rope_head_dim", c.qk_rope_head_dim),
            ("qk_nope_head_dim", c.qk_nope_head_dim),
            ("v_head_dim", c.v_head_dim),
            ("num_experts_per_tok", c.num_experts_per_tok),
            ("max_position_embeddings", c.max_position_embeddings),
            ("q_lora_rank", c.q_lora_rank.unwrap_or(1)),
        ] {
            if v == 0 {
                return Err(bad(k, "must be at least 1, got 0".into()));
            }
        }
        for (k, v) in [
            ("vocab_size", c.vocab_size),
            ("max_position_embeddings", c.max_position_embeddings),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("moe_intermediate_size", c.moe_intermediate_size),
            ("kv_lora_rank", c.kv_lora_rank),
            ("q_lora_rank", c.q_lora_rank.unwrap_or(1)),
            ("qk_rope_head_dim", c.qk_rope_head_dim),
            ("qk_nope_head_dim", c.qk_nope_head_dim),
            ("v_head_dim", c.v_head_dim),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("n_routed_experts", c.n_routed_experts),
            ("n_shared_experts", c.n_shared_experts),
            ("num_experts_per_tok", c.num_experts_per_tok),
        ] {
            let max = max_size(k);
            if v > max {
                return Err(bad(k, format!("must be at most {max}, got {v}")));
            }
        }
        Ok(())
    }

    /// Refuses the activation, routing, attention and rotary variants the graph does not implement.
    fn check_supported(&self, path: &Path) -> Result<()> {
        let c = self;
        let bad = |field: &'static str, message: String| invalid(path, field, message);
        if c.hidden_act != "silu" {
            return Err(bad("hidden_act", format!("must be \"silu\", got {:?}", c.hidden_act)));
        }
        if let Some(s) = c.scoring_func.as_deref().filter(|s| *s != "sigmoid") {
            return Err(bad("scoring_func", format!("must be \"sigmoid\" (DeepSeek-V3 routing), got {s:?}")));
        }
        if let Some(m) = c.topk_method.as_deref().filter(|m| *m != "noaux_tc") {
            return Err(bad(
                "topk_method",
                format!("must be \"noaux_tc\" (group-limited top-k with correction bias), got {m:?}"),
            ));
        }
        if c.moe_layer_freq != 1 {
            return Err(bad("moe_layer_freq", format!("must be 1, got {}", c.moe_layer_freq)));
        }
        if c.attention_bias {
            return Err(bad(
                "attention_bias",
                "must be false (DeepSeek-V3/R1 attention has no biases), got true".into(),
            ));
        }
        if let Some(kv) = c.num_key_value_heads.filter(|kv| *kv != c.num_attention_heads) {
            return Err(bad(
                "num_key_value_heads",
                format!("must equal num_attention_heads ({}) for MLA, got {kv}", c.num_attention_heads),
            ));
        }
        if !c.qk_rope_head_dim.is_multiple_of(2) {
            return Err(bad("qk_rope_head_dim", format!("must be even, got {}", c.qk_rope_head_dim)));
        }
        Ok(())
    }

    /// `(n_group, topk_group)` with their defaults, checked against the expert counts.
    fn resolve_groups(&self, path: &Path) -> Result<(usize, usize)> {
        let c = self;
        let bad = |field: &'static str, message: String| invalid(path, field, message);
        let n_group = c.n_group.unwrap_or(1);
        let topk_group = c.topk_group.unwrap_or(n_group);
        if n_group == 0 || !c.n_routed_experts.is_multiple_of(n_group) {
            return Err(bad(
                "n_group",
                format!("must divide n_routed_experts ({}), got {n_group}", c.n_routed_experts),
            ));
        }
        if topk_group == 0 || topk_group > n_group {
            return Err(bad("topk_group", format!("must be between 1 and n_group ({n_group}), got {topk_group}")));
        }
        let per_group = c.n_routed_experts / n_group;
        if per_group < 2 {
            return Err(bad(
                "n_group",
                format!(
                    "must leave at least 2 experts per group (groups are scored by their top-2), got {n_group} groups \
                     of {per_group}"
                ),
            ));
        }
        if c.num_experts_per_tok > topk_group * per_group {
            return Err(bad(
                "num_experts_per_tok",
                format!(
                    "must be at most topk_group * experts per group ({}), got {}",
                    topk_group * per_group,
                    c.num_experts_per_tok
                ),
            ));
        }
        Ok((n_group, topk_group))
    }

    /// Checks `first_k_dense_replace`, `rms_norm_eps` and `routed_scaling_factor`.
    fn check_scalars(&self, path: &Path) -> Result<()> {
        let c = self;
        let bad = |field: &'static str, message: String| invalid(path, field, message);
        if c.first_k_dense_replace > c.num_hidden_layers {
            return Err(bad(
                "first_k_dense_replace",
                format!("must be at most num_hidden_layers ({}), got {}", c.num_hidden_layers, c.first_k_dense_replace),
            ));
        }
        if !(c.rms_norm_eps > 0.0 && c.rms_norm_eps < 1.0) {
            return Err(bad("rms_norm_eps", format!("must be in (0, 1), got {}", c.rms_norm_eps)));
        }
        if !c.routed_scaling_factor.is_finite() {
            return Err(bad("routed_scaling_factor", format!("must be finite, got {}", c.routed_scaling_factor)));
        }
        Ok(())
    }

    /// The validated config, from the checked raw values and the resolved groups, rotary and FP8 source.
    fn into_config(
        self,
        (n_group, topk_group): (usize, usize),
        (rope_theta, rope_scaling): (f64, RopeScaling),
        fp8: Option<Fp8Source>,
    ) -> DeepseekV3Config {
        let c = self;
        DeepseekV3Config {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            moe_intermediate_size: c.moe_intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            n_shared_experts: c.n_shared_experts,
            n_routed_experts: c.n_routed_experts,
            routed_scaling_factor: c.routed_scaling_factor,
            kv_lora_rank: c.kv_lora_rank,
            q_lora_rank: c.q_lora_rank,
            qk_rope_head_dim: c.qk_rope_head_dim,
            qk_nope_head_dim: c.qk_nope_head_dim,
            v_head_dim: c.v_head_dim,
            n_group,
            topk_group,
            num_experts_per_tok: c.num_experts_per_tok,
            first_k_dense_replace: c.first_k_dense_replace,
            norm_topk_prob: c.norm_topk_prob,
            max_position_embeddings: c.max_position_embeddings,
            rms_norm_eps: c.rms_norm_eps,
            tie_word_embeddings: c.tie_word_embeddings,
            rope_theta,
            rope_scaling,
            rope_interleave: c.rope_interleave,
            num_nextn_predict_layers: c.num_nextn_predict_layers,
            fp8,
        }
    }
}

/// The keys of `quantization_config` that [`RawConfig::resolve`] reads (`arch::config_keys` lists the others in the
/// manifest with their reason).
pub const QUANTIZATION_KEYS_READ: &[&str] = &["quant_method", "fmt", "weight_block_size"];

fn resolve_quant(path: &Path, q: &serde_json::Value) -> Result<Fp8Source> {
    let bad = |field: &'static str, message: String| invalid(path, field, message);
    let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("<missing>");
    if method != "fp8" {
        return Err(bad(
            "quantization_config.quant_method",
            format!("must be \"fp8\" (block-scaled e4m3, as released R1), got {method:?}"),
        ));
    }
    if let Some(fmt) = q.get("fmt").and_then(|f| f.as_str()).filter(|f| *f != "e4m3") {
        return Err(bad("quantization_config.fmt", format!("must be \"e4m3\", got {fmt:?}")));
    }
    let block: Vec<usize> = q
        .get("weight_block_size")
        .and_then(|b| b.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_u64().map(|n| n as usize)).collect())
        .unwrap_or_default();
    match block.as_slice() {
        [r, c] if *r > 0 && *c > 0 => Ok(Fp8Source { weight_block_size: [*r, *c] }),
        _ => Err(bad(
            "quantization_config.weight_block_size",
            format!(
                "must be two positive integers (per-tensor FP8 is not supported), got {}",
                q.get("weight_block_size").map(|v| v.to_string()).unwrap_or_else(|| "nothing".into())
            ),
        )),
    }
}

fn resolve_rope(path: &Path, c: &RawConfig) -> Result<(f64, RopeScaling)> {
    // transformers 5 writes `rope_parameters` (with rope_theta inside); released checkpoints write `rope_scaling`.
    let params = match (&c.rope_parameters, &c.rope_scaling) {
        (Some(p), _) if !p.is_null() => Some(p.clone()),
        (_, Some(s)) if !s.is_null() => Some(s.clone()),
        _ => None,
    };
    let theta = params.as_ref().and_then(|p| num(p, "rope_theta")).or(c.rope_theta).unwrap_or(10000.0);
    if theta.is_nan() || theta <= 0.0 {
        return Err(invalid(path, "rope_theta", format!("must be positive, got {theta}")));
    }
    let Some(p) = params else { return Ok((theta, RopeScaling::Default)) };
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    match kind {
        "default" => Ok((theta, RopeScaling::Default)),
        "yarn" => Ok((theta, RopeScaling::Yarn(Yarn::from_json(path, &p, c.max_position_embeddings)?))),
        other => Err(ExportError::UnsupportedRopeScaling {
            path: path.to_path_buf(),
            kind: other.to_string(),
            supported: "yarn (or none) for DeepseekV3",
        }),
    }
}

impl DeepseekV3Config {
    /// Query/key head size (`qk_nope_head_dim + qk_rope_head_dim`).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Rotary inverse frequencies (`qk_rope_head_dim / 2` values) and the factor cos/sin are multiplied by
    /// (YaRN's attention factor; 1 without scaling), as transformers computes them (f32 powers).
    pub fn rope_inv_freq(&self) -> (Vec<f32>, f32) {
        let dim = self.qk_rope_head_dim;
        match &self.rope_scaling {
            RopeScaling::Default => {
                let base = self.rope_theta as f32;
                ((0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32)).collect(), 1.0)
            }
            RopeScaling::Yarn(y) => y.tables(self.rope_theta, dim),
        }
    }

    /// Softmax scale: `qk_head_dim^-0.5`, times `yarn_get_mscale(factor, mscale_all_dim)^2` under YaRN when
    /// `mscale_all_dim` is set (transformers' `yarn_apply_mscale`).
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.rope_scaling {
            RopeScaling::Yarn(Yarn { factor, mscale_all_dim: Some(a), .. }) if *a != 0.0 => {
                let m = yarn_mscale(*factor, *a);
                base * m * m
            }
            _ => base,
        }
    }

    /// Whether layer `i` has the MoE block (`i >= first_k_dense_replace`).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        i >= self.first_k_dense_replace
    }

    /// Values per token per layer in the latent KV cache (`kv_lora_rank + qk_rope_head_dim`).
    pub fn latent_values_per_token_layer(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// Values per token per layer a per-head cache would need (`heads * (qk_head_dim + v_head_dim)`).
    pub fn per_head_values_per_token_layer(&self) -> usize {
        self.num_attention_heads * (self.qk_head_dim() + self.v_head_dim)
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
