//! The multi-token-prediction (MTP) module of DeepSeek-V3 / R1 (`num_nextn_predict_layers`, tech report §2.2),
//! exported as the draft graph `mtp.onnx` (contract: `r1_engine::manifest::draft`).
//!
//! The release stores the first module as checkpoint layer `num_hidden_layers` (61 for R1):
//! ```text
//! e   = enorm(embed_tokens(t[i+1]))            own copy `model.layers.61.embed_tokens`, else the main embedding
//! h'  = hnorm(h[i])                            h = the main model's last hidden state before `model.norm`
//! x   = eh_proj(concat(e, h'))                 [2·hidden → hidden]; the embedding half comes first
//! y   = decoder layer 61 (MLA with its own latent cache + MoE, exactly like a main layer)
//! out = shared_head.head(shared_head.norm(y))  own copy `shared_head.head`, else the main LM head
//! ```
//! The concatenation order is the one of the released weights as vLLM's and SGLang's DeepSeek MTP layers load them
//! (`cat([enorm(embeds), hnorm(hidden)])`). Rotary positions are those of `h[i]` (the main graph's `position_ids`).
//! vLLM zeroes the embedding at position 0; this graph does not (the reference in
//! `tests/fixtures/make_golden_deepseek.py` neither): it changes only how well the draft guesses, never what greedy
//! decoding emits once the main graph verifies the guesses.
//!
//! The graph also outputs `y` as `last_hidden_state`, so a second draft step can feed it back as `hidden_states`
//! (how vLLM and SGLang chain one MTP module for several speculative tokens). Modules past the first
//! (`num_nextn_predict_layers > 1`) are not exported; the manifest notes say so.

use r1_engine::manifest::{names, DType, Dim, KvCacheInfo};

use super::config::DeepseekV3Config;
use super::{decoder_layer, latent_kv_cache, linear};
use crate::arch::common::Ctx;
use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};

/// Checkpoint key prefix of the first MTP module.
pub fn prefix(cfg: &DeepseekV3Config) -> String {
    format!("model.layers.{}", cfg.num_hidden_layers)
}

/// The draft's cache: the main graph's latent layout, one layer.
pub fn kv_cache(cfg: &DeepseekV3Config, dtype: DType) -> KvCacheInfo {
    let mut kv = latent_kv_cache(cfg, dtype);
    kv.num_layers = 1;
    kv.bytes_per_token = kv.computed_bytes_per_token();
    kv.description = format!(
        "the MTP module's own cache (one layer, checkpoint layer {}), laid out as the main graph's: {}",
        cfg.num_hidden_layers, kv.description
    );
    kv
}

/// Every tensor of the first MTP module with its shape (FP8 scales aside), in the order an export reads them; the
/// embedding and head copies are listed only when the checkpoint has them (they fall back to the main model's).
pub fn required_tensors(cfg: &DeepseekV3Config) -> Vec<(String, Vec<usize>)> {
    let hf = prefix(cfg);
    let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
    let (nope, rope, vd, rank) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
    let mut t: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |name: &str, shape: &[usize]| t.push((format!("{hf}.{name}"), shape.to_vec()));
    add("enorm.weight", &[h]);
    add("hnorm.weight", &[h]);
    add("eh_proj.weight", &[h, 2 * h]);
    add("input_layernorm.weight", &[h]);
    match cfg.q_lora_rank {
        Some(r) => {
            add("self_attn.q_a_proj.weight", &[r, h]);
            add("self_attn.q_a_layernorm.weight", &[r]);
            add("self_attn.q_b_proj.weight", &[heads * (nope + rope), r]);
        }
        None => add("self_attn.q_proj.weight", &[heads * (nope + rope), h]),
    }
    add("self_attn.kv_a_proj_with_mqa.weight", &[rank + rope, h]);
    add("self_attn.kv_a_layernorm.weight", &[rank]);
    add("self_attn.kv_b_proj.weight", &[heads * (nope + vd), rank]);
    add("self_attn.o_proj.weight", &[h, heads * vd]);
    add("post_attention_layernorm.weight", &[h]);
    if cfg.is_moe_layer(cfg.num_hidden_layers) {
        let (e, i) = (cfg.n_routed_experts, cfg.moe_intermediate_size);
        add("mlp.gate.weight", &[e, h]);
        add("mlp.gate.e_score_correction_bias", &[e]);
        for j in 0..e {
            add(&format!("mlp.experts.{j}.gate_proj.weight"), &[i, h]);
            add(&format!("mlp.experts.{j}.up_proj.weight"), &[i, h]);
            add(&format!("mlp.experts.{j}.down_proj.weight"), &[h, i]);
        }
        if cfg.n_shared_experts > 0 {
            let si = i * cfg.n_shared_experts;
            add("mlp.shared_experts.gate_proj.weight", &[si, h]);
            add("mlp.shared_experts.up_proj.weight", &[si, h]);
            add("mlp.shared_experts.down_proj.weight", &[h, si]);
        }
    } else {
        let i = cfg.intermediate_size;
        add("mlp.gate_proj.weight", &[i, h]);
        add("mlp.up_proj.weight", &[i, h]);
        add("mlp.down_proj.weight", &[h, i]);
    }
    add("shared_head.norm.weight", &[h]);
    t
}

/// Fails, naming the first missing tensor, when `ck` lacks part of the MTP module its config declares; run before
/// anything is written, so a checkpoint stripped of layer `num_hidden_layers` fails in seconds, not after the main
/// graph.
pub fn check_tensors(cfg: &DeepseekV3Config, ck: &Checkpoint) -> Result<()> {
    for (name, shape) in required_tensors(cfg) {
        if !ck.has(&name) {
            return Err(ExportError::MissingTensor {
                name,
                searched: format!(
                    "{} (the multi-token-prediction module declared by num_nextn_predict_layers = {}; \
                     `r1-export --no-draft` exports without the draft graph)",
                    ck.dir().display(),
                    cfg.num_nextn_predict_layers
                ),
                expected: shape,
            });
        }
    }
    Ok(())
}

/// The module's own copy of `what` (`embed_tokens` / `shared_head.head`) when the checkpoint has it, else the main
/// model's `fallback` (README_WEIGHTS.md of DeepSeek-V3: the module shares them with the main model).
fn own_or_shared(ck: &Checkpoint, cfg: &DeepseekV3Config, what: &str, fallback: &str) -> String {
    let own = format!("{}.{what}.weight", prefix(cfg));
    if ck.has(&own) {
        own
    } else {
        fallback.to_string()
    }
}

/// Builds the draft graph (see the module docs); the tensors were checked by [`check_tensors`].
pub fn build(cfg: &DeepseekV3Config, ctx: &mut Ctx) -> Result<()> {
    let (h, n) = (cfg.hidden_size, cfg.num_hidden_layers);
    let hf = prefix(cfg);
    let p = format!("/model/layers.{n}");
    let inputs = ctx.declare_inputs();
    let act = ctx.kv_dtype();
    let hidden = ctx.b.input(
        names::HIDDEN_STATES,
        act,
        vec![Dim::Symbolic("batch".into()), Dim::Symbolic("sequence".into()), Dim::Fixed(h as i64)],
    );
    let mask = ctx.attention_mask(&inputs)?;
    let (inv_freq, attention_factor) = cfg.rope_inv_freq();
    let rot = ctx.rotary(&inputs, &inv_freq, attention_factor)?;
    let embed_key = own_or_shared(ctx.ck, cfg, "embed_tokens", "model.embed_tokens.weight");
    let emb = ctx.embed(&embed_key, &inputs.input_ids, cfg.vocab_size, h)?;
    let e = ctx.rms_norm(&format!("{p}/enorm"), &emb, &format!("{hf}.enorm.weight"), h, cfg.rms_norm_eps)?;
    let hn = ctx.rms_norm(&format!("{p}/hnorm"), &hidden, &format!("{hf}.hnorm.weight"), h, cfg.rms_norm_eps)?;
    let cat = ctx.b.concat(&format!("{p}/eh_concat/Concat"), &[&e, &hn], -1)?;
    let x = linear(ctx, cfg, &format!("{p}/eh_proj"), &cat, &format!("{hf}.eh_proj"), 2 * h, h)?;
    let y = decoder_layer(ctx, cfg, (n, 0), &x, &mask, &rot)?;
    hidden_output(ctx, &y, h)?;
    let normed = ctx.rms_norm(
        &format!("{p}/shared_head/norm"),
        &y,
        &format!("{hf}.shared_head.norm.weight"),
        h,
        cfg.rms_norm_eps,
    )?;
    let main_head = if cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
    let head_key = own_or_shared(ctx.ck, cfg, "shared_head.head", main_head);
    ctx.lm_head(&normed, &head_key, h, cfg.vocab_size)?;
    Ok(())
}

/// Declares `x` (`[batch, sequence, hidden]`) as the graph output `last_hidden_state`.
pub(super) fn hidden_output(ctx: &mut Ctx, x: &str, hidden: usize) -> Result<()> {
    let dt = ctx.kv_dtype();
    ctx.b.wire_to("/model/last_hidden_state/Identity", "Identity", &[x], vec![], &[names::LAST_HIDDEN_STATE])?;
    ctx.b.output(
        names::LAST_HIDDEN_STATE,
        dt,
        vec![Dim::Symbolic("batch".into()), Dim::Symbolic("sequence".into()), Dim::Fixed(hidden as i64)],
    );
    Ok(())
}
