//! Multi-head Latent Attention with the compressed cache.
//!
//! Per layer (shapes for batch B, new tokens S, cached + new T, heads H):
//! ```text
//! q      = q_b_proj(q_a_layernorm(q_a_proj(x)))   or q_proj(x)          [B,H,S,nope+rope]
//! kv     = kv_a_proj_with_mqa(x) = [latent c (kv_lora_rank) | k_rot (rope)]
//! c      = kv_a_layernorm(c)                     -> present.{i}.key   = concat(past, c)      [B,1,T,rank]
//! k_rot  = rotary(k_rot)                         -> present.{i}.value = concat(past, k_rot)  [B,1,T,rope]
//! scores = (q_nope · W_uk) · c^T + rotary(q_rot) · k_rot^T        (W_uk, W_uv: the two halves of kv_b_proj)
//! out    = o_proj( softmax(scores * scale + mask) · c · W_uv )
//! ```
//! kv_b_proj is *absorbed*: the query is projected into the latent space (`q_nope · W_uk`, [B,H,S,rank]) and the
//! attention output is projected out of it (`· W_uv`), so per-head keys and values are never materialized. A
//! decode step then costs `H·T·(rank + rope)` for the scores instead of re-expanding all `T` cached latents through
//! kv_b_proj (`T·rank·H·(nope + v)`), and the graph is simpler (no per-head copy of the shared rope key). The
//! softmax runs in float32. Numbers match transformers' expanded form to ~1e-6 relative (golden cases).
//!
//! DeepSeek's rotary layout is interleaved (`rope_interleave`, pairs `(x0, x1), (x2, x3)…`); transformers rotates
//! the pairs and returns the result de-interleaved (evens then odds). Permuting the rope rows of the q and kv_a
//! weights the same way at export makes that exactly the standard half-split rotary, so the shared
//! [`Ctx::apply_rotary`] is reused and the cached rope key equals transformers' cached `k_rot`.

use super::config::{DeepseekV3Config, LORA_NORM_EPS};
use super::{linear, matrix_f32, transpose, write_weight};
use crate::arch::common::{AttentionMask, Ctx, Rotary};
use crate::error::Result;
use crate::onnx::ElemType;

/// Row order that turns an interleaved rope block (`x0, x1, x2, …`) into evens-then-odds.
pub(crate) fn deinterleave_order(rope: usize) -> Vec<usize> {
    (0..rope).step_by(2).chain((1..rope).step_by(2)).collect()
}

/// Reorders, inside every group of `group` rows of a row-major `[rows, cols]` matrix, the `rope` rows that start
/// at offset `offset` by `order`.
pub(crate) fn permute_rows(m: &mut [f32], cols: usize, group: usize, offset: usize, order: &[usize]) {
    let rows = m.len() / cols.max(1);
    let mut tmp = vec![0f32; order.len() * cols];
    for g0 in (0..rows).step_by(group) {
        let base = g0 + offset;
        for (dst, &src) in order.iter().enumerate() {
            tmp[dst * cols..(dst + 1) * cols].copy_from_slice(&m[(base + src) * cols..(base + src + 1) * cols]);
        }
        m[base * cols..(base + order.len()) * cols].copy_from_slice(&tmp);
    }
}

/// One MLA block; returns the attention output `[B, S, hidden]` (after o_proj). The weights are checkpoint layer
/// `layer`'s; the cache is the graph's `past_key_values.{cache_layer}` / `present.{cache_layer}` (the same index in
/// the main graph; 0 in the draft graph, whose one layer is checkpoint layer `num_hidden_layers`).
pub(super) fn attention(
    ctx: &mut Ctx,
    cfg: &DeepseekV3Config,
    (layer, cache_layer): (usize, usize),
    x: &str,
    mask: &AttentionMask,
    rot: &Rotary,
) -> Result<String> {
    let m = MlaLayer::new(cfg, layer, cache_layer);
    let (q_nope, q_rot) = query(ctx, &m, x, rot)?;
    let (cache_latent, cache_rope) = compressed_kv(ctx, &m, x, rot)?;
    let (w_uk, w_uv) = absorbed_kv_b(ctx, &m)?;
    let probs = attention_probs(ctx, &m, (&q_nope, &q_rot), &w_uk, (&cache_latent, &cache_rope), mask)?;
    attention_output(ctx, &m, &probs, &cache_latent, &w_uv)
}

/// One layer's node and weight name prefixes and attention sizes, shared by the steps of [`attention`].
struct MlaLayer<'c> {
    cfg: &'c DeepseekV3Config,
    /// The graph's cache index of this layer.
    cache_layer: usize,
    /// Node name prefix.
    p: String,
    /// Checkpoint weight name prefix.
    hf: String,
    h: usize,
    heads: usize,
    nope: usize,
    rope: usize,
    vd: usize,
    rank: usize,
    qk: usize,
    /// Rope row order that de-interleaves the rotary pairs (`rope_interleave`).
    order: Option<Vec<usize>>,
}

impl<'c> MlaLayer<'c> {
    /// Names and sizes of checkpoint layer `layer` of `cfg`, cached at the graph's `cache_layer`.
    fn new(cfg: &'c DeepseekV3Config, layer: usize, cache_layer: usize) -> Self {
        let (nope, rope) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim);
        MlaLayer {
            cfg,
            cache_layer,
            p: format!("/model/layers.{layer}/self_attn"),
            hf: format!("model.layers.{layer}.self_attn"),
            h: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            nope,
            rope,
            vd: cfg.v_head_dim,
            rank: cfg.kv_lora_rank,
            qk: nope + rope,
            order: cfg.rope_interleave.then(|| deinterleave_order(rope)),
        }
    }
}

/// The query heads `[B,H,S,nope+rope]` split into the nope part and the rotated rope part.
fn query(ctx: &mut Ctx, m: &MlaLayer, x: &str, rot: &Rotary) -> Result<(String, String)> {
    let (cfg, p, hf) = (m.cfg, &m.p, &m.hf);
    let (h, heads, nope, rope, qk) = (m.h, m.heads, m.nope, m.rope, m.qk);
    let (q_in, q_in_dim, q_key) = match cfg.q_lora_rank {
        Some(r) => {
            let qa = linear(ctx, cfg, &format!("{p}/q_a_proj"), x, &format!("{hf}.q_a_proj"), h, r)?;
            let qn = ctx.rms_norm(
                &format!("{p}/q_a_layernorm"),
                &qa,
                &format!("{hf}.q_a_layernorm.weight"),
                r,
                LORA_NORM_EPS,
            )?;
            (qn, r, format!("{hf}.q_b_proj.weight"))
        }
        None => (x.to_string(), h, format!("{hf}.q_proj.weight")),
    };
    let mut wq = matrix_f32(ctx, cfg, &q_key, heads * qk, q_in_dim)?;
    if let Some(order) = &m.order {
        permute_rows(&mut wq, q_in_dim, qk, nope, order);
    }
    let wq = write_weight(ctx, &q_key, &[q_in_dim, heads * qk], &transpose(&wq, heads * qk, q_in_dim))?;
    let q_node = if cfg.q_lora_rank.is_some() { "q_b_proj" } else { "q_proj" };
    let q = ctx.b.matmul(&format!("{p}/{q_node}/MatMul"), &q_in, &wq)?;
    let q = ctx.split_heads(&format!("{p}/q_heads"), &q, heads, qk)?;
    let qs = ctx.b.split(&format!("{p}/q_split"), &q, &[nope as i64, rope as i64], -1)?;
    let q_rot = ctx.apply_rotary(&format!("{p}/q_rotary"), &qs[1], rot)?;
    Ok((qs[0].clone(), q_rot))
}

/// The compressed kv: the normed latent and the rotated rope key, appended to the layer's cache; returns the
/// cache's `[B,1,T,rank]` latents and `[B,1,T,rope]` rope keys.
fn compressed_kv(ctx: &mut Ctx, m: &MlaLayer, x: &str, rot: &Rotary) -> Result<(String, String)> {
    let (p, hf, h, rank, rope) = (&m.p, &m.hf, m.h, m.rank, m.rope);
    let kv_key = format!("{hf}.kv_a_proj_with_mqa.weight");
    let mut wkv = matrix_f32(ctx, m.cfg, &kv_key, rank + rope, h)?;
    if let Some(order) = &m.order {
        permute_rows(&mut wkv, h, rank + rope, rank, order);
    }
    let wkv = write_weight(ctx, &kv_key, &[h, rank + rope], &transpose(&wkv, rank + rope, h))?;
    let kv = ctx.b.matmul(&format!("{p}/kv_a_proj_with_mqa/MatMul"), x, &wkv)?;
    let kvs = ctx.b.split(&format!("{p}/kv_split"), &kv, &[rank as i64, rope as i64], -1)?;
    let latent = ctx.rms_norm(
        &format!("{p}/kv_a_layernorm"),
        &kvs[0],
        &format!("{hf}.kv_a_layernorm.weight"),
        rank,
        LORA_NORM_EPS,
    )?;
    let latent = ctx.b.unsqueeze(&format!("{p}/latent/Unsqueeze"), &latent, &[1])?; // [B,1,S,rank]
    let k_rot = ctx.b.unsqueeze(&format!("{p}/k_rot/Unsqueeze"), &kvs[1], &[1])?; // [B,1,S,rope]
    let k_rot = ctx.apply_rotary(&format!("{p}/k_rotary"), &k_rot, rot)?;
    ctx.kv_cache(m.cache_layer, &latent, &k_rot, (1, rank), (1, rope))
}

/// kv_b_proj, absorbed: writes W_uk [H, nope, rank] (query side) and W_uv [H, rank, v] (output side).
fn absorbed_kv_b(ctx: &mut Ctx, m: &MlaLayer) -> Result<(String, String)> {
    let (hf, heads, nope, vd, rank) = (&m.hf, m.heads, m.nope, m.vd, m.rank);
    let kvb_key = format!("{hf}.kv_b_proj.weight");
    let wkvb = matrix_f32(ctx, m.cfg, &kvb_key, heads * (nope + vd), rank)?;
    let mut w_uk = Vec::with_capacity(heads * nope * rank);
    let mut w_uv = Vec::with_capacity(heads * rank * vd);
    for hd in 0..heads {
        let base = hd * (nope + vd) * rank;
        w_uk.extend_from_slice(&wkvb[base..base + nope * rank]);
        w_uv.extend(transpose(&wkvb[base + nope * rank..base + (nope + vd) * rank], vd, rank));
    }
    drop(wkvb);
    let w_uk = write_weight(ctx, &format!("{hf}.kv_b_proj.w_uk"), &[heads, nope, rank], &w_uk)?;
    let w_uv = write_weight(ctx, &format!("{hf}.kv_b_proj.w_uv"), &[heads, rank, vd], &w_uv)?;
    Ok((w_uk, w_uv))
}

/// The attention probabilities `[B,H,S,T]`: latent and rope scores, scaled, masked, softmax in float32 (cast
/// back to the graph's type).
fn attention_probs(
    ctx: &mut Ctx,
    m: &MlaLayer,
    (q_nope, q_rot): (&str, &str),
    w_uk: &str,
    (cache_latent, cache_rope): (&str, &str),
    mask: &AttentionMask,
) -> Result<String> {
    let p = &m.p;
    let dtype = ctx.dtype;
    let b = &mut ctx.b;
    let q_lat = b.matmul(&format!("{p}/q_absorb/MatMul"), q_nope, w_uk)?; // [B,H,S,rank]
    let lat_t = b.transpose(&format!("{p}/latent_t/Transpose"), cache_latent, &[0, 1, 3, 2])?; // [B,1,rank,T]
    let rope_t = b.transpose(&format!("{p}/rope_t/Transpose"), cache_rope, &[0, 1, 3, 2])?; // [B,1,rope,T]
    let s_nope = b.matmul(&format!("{p}/scores_nope/MatMul"), &q_lat, &lat_t)?;
    let s_rope = b.matmul(&format!("{p}/scores_rope/MatMul"), q_rot, &rope_t)?;
    let mut scores = b.add(&format!("{p}/scores/Add"), &s_nope, &s_rope)?;
    if dtype != ElemType::F32 {
        scores = b.cast(&format!("{p}/scores/Cast"), &scores, ElemType::F32)?;
    }
    let scale = b.const_scalar(ElemType::F32, m.cfg.softmax_scale() as f32)?;
    let scaled = b.mul(&format!("{p}/scores/Scale"), &scores, &scale)?;
    let masked = b.add(&format!("{p}/mask/Add"), &scaled, &mask.d4)?;
    let mut probs = b.softmax(&format!("{p}/Softmax"), &masked, -1)?;
    if dtype != ElemType::F32 {
        probs = b.cast(&format!("{p}/probs/Cast"), &probs, dtype)?;
    }
    Ok(probs)
}

/// The context `probs · c · W_uv`, heads merged and through o_proj: `[B, S, hidden]`.
fn attention_output(ctx: &mut Ctx, m: &MlaLayer, probs: &str, cache_latent: &str, w_uv: &str) -> Result<String> {
    let (p, hf, h, heads, vd) = (&m.p, &m.hf, m.h, m.heads, m.vd);
    let b = &mut ctx.b;
    let ctx_lat = b.matmul(&format!("{p}/context_latent/MatMul"), probs, cache_latent)?; // [B,H,S,rank]
    let ctx_v = b.matmul(&format!("{p}/v_absorb/MatMul"), &ctx_lat, w_uv)?; // [B,H,S,v]
    let ctx_v = b.transpose(&format!("{p}/context/Transpose"), &ctx_v, &[0, 2, 1, 3])?;
    let merged = b.reshape(&format!("{p}/merge_heads/Reshape"), &ctx_v, &[0, 0, (heads * vd) as i64])?;
    linear(ctx, m.cfg, &format!("{p}/o_proj"), &merged, &format!("{hf}.o_proj"), heads * vd, h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deinterleave_puts_evens_first() {
        assert_eq!(deinterleave_order(6), vec![0, 2, 4, 1, 3, 5]);
    }

    #[test]
    fn permute_rows_touches_only_the_rope_block_of_each_head() {
        // 2 heads x (nope 1 + rope 4) rows, 1 column: rows hold their own index.
        let mut m: Vec<f32> = (0..10).map(|i| i as f32).collect();
        permute_rows(&mut m, 1, 5, 1, &deinterleave_order(4));
        assert_eq!(m, vec![0.0, 1.0, 3.0, 2.0, 4.0, 5.0, 6.0, 8.0, 7.0, 9.0]);
    }
}
