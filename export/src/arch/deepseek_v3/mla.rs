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

/// One MLA block; returns the attention output `[B, S, hidden]` (after o_proj).
pub(super) fn attention(
    ctx: &mut Ctx,
    cfg: &DeepseekV3Config,
    layer: usize,
    x: &str,
    mask: &AttentionMask,
    rot: &Rotary,
) -> Result<String> {
    let p = format!("/model/layers.{layer}/self_attn");
    let hf = format!("model.layers.{layer}.self_attn");
    let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
    let (nope, rope, vd, rank) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
    let qk = nope + rope;
    let order = cfg.rope_interleave.then(|| deinterleave_order(rope));

    // --- query ---
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
    if let Some(order) = &order {
        permute_rows(&mut wq, q_in_dim, qk, nope, order);
    }
    let wq = write_weight(ctx, &q_key, &[q_in_dim, heads * qk], &transpose(&wq, heads * qk, q_in_dim))?;
    let q_node = if cfg.q_lora_rank.is_some() { "q_b_proj" } else { "q_proj" };
    let q = ctx.b.matmul(&format!("{p}/{q_node}/MatMul"), &q_in, &wq)?;
    let q = ctx.split_heads(&format!("{p}/q_heads"), &q, heads, qk)?;
    let qs = ctx.b.split(&format!("{p}/q_split"), &q, &[nope as i64, rope as i64], -1)?;
    let q_rot = ctx.apply_rotary(&format!("{p}/q_rotary"), &qs[1], rot)?;

    // --- compressed kv ---
    let kv_key = format!("{hf}.kv_a_proj_with_mqa.weight");
    let mut wkv = matrix_f32(ctx, cfg, &kv_key, rank + rope, h)?;
    if let Some(order) = &order {
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
    let (cache_latent, cache_rope) = ctx.kv_cache(layer, &latent, &k_rot, (1, rank), (1, rope))?;

    // --- kv_b_proj, absorbed: W_uk [H, nope, rank] on the query side, W_uv [H, rank, v] on the output side ---
    let kvb_key = format!("{hf}.kv_b_proj.weight");
    let wkvb = matrix_f32(ctx, cfg, &kvb_key, heads * (nope + vd), rank)?;
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

    let dtype = ctx.dtype;
    let b = &mut ctx.b;
    let q_lat = b.matmul(&format!("{p}/q_absorb/MatMul"), &qs[0], &w_uk)?; // [B,H,S,rank]
    let lat_t = b.transpose(&format!("{p}/latent_t/Transpose"), &cache_latent, &[0, 1, 3, 2])?; // [B,1,rank,T]
    let rope_t = b.transpose(&format!("{p}/rope_t/Transpose"), &cache_rope, &[0, 1, 3, 2])?; // [B,1,rope,T]
    let s_nope = b.matmul(&format!("{p}/scores_nope/MatMul"), &q_lat, &lat_t)?;
    let s_rope = b.matmul(&format!("{p}/scores_rope/MatMul"), &q_rot, &rope_t)?;
    let mut scores = b.add(&format!("{p}/scores/Add"), &s_nope, &s_rope)?;
    if dtype != ElemType::F32 {
        scores = b.cast(&format!("{p}/scores/Cast"), &scores, ElemType::F32)?;
    }
    let scale = b.const_scalar(ElemType::F32, cfg.softmax_scale() as f32)?;
    let scaled = b.mul(&format!("{p}/scores/Scale"), &scores, &scale)?;
    let masked = b.add(&format!("{p}/mask/Add"), &scaled, &mask.d4)?;
    let mut probs = b.softmax(&format!("{p}/Softmax"), &masked, -1)?;
    if dtype != ElemType::F32 {
        probs = b.cast(&format!("{p}/probs/Cast"), &probs, dtype)?;
    }
    let ctx_lat = b.matmul(&format!("{p}/context_latent/MatMul"), &probs, &cache_latent)?; // [B,H,S,rank]
    let ctx_v = b.matmul(&format!("{p}/v_absorb/MatMul"), &ctx_lat, &w_uv)?; // [B,H,S,v]
    let ctx_v = b.transpose(&format!("{p}/context/Transpose"), &ctx_v, &[0, 2, 1, 3])?;
    let merged = b.reshape(&format!("{p}/merge_heads/Reshape"), &ctx_v, &[0, 0, (heads * vd) as i64])?;
    linear(ctx, cfg, &format!("{p}/o_proj"), &merged, &format!("{hf}.o_proj"), heads * vd, h)
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
