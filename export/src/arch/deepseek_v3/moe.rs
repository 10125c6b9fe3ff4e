//! The DeepseekV3 MoE block: router + routed experts + shared experts, with standard ONNX ops only.
//!
//! Router (transformers' `DeepseekV3TopkRouter`, in float32): `scores = sigmoid(x · W_gate^T)`; choice scores
//! `scores + e_score_correction_bias`; each of `n_group` groups is scored by the sum of its top-2 choice scores;
//! the best `topk_group` groups stay eligible; the top `num_experts_per_tok` eligible experts are picked; their
//! weights are the *uncorrected* scores, divided by their sum when `norm_topk_prob`, times `routed_scaling_factor`.
//! Top-k selections are expressed as "value ≥ k-th largest value" masks (TopK + Slice + GreaterOrEqual), which
//! equals index-based selection except on exact ties.
//!
//! Dispatch: **dense masked compute**. Every expert runs on every token as three batched MatMuls over stacked
//! expert weights (`[E,H,I]`, `[E,H,I]`, `[E,I,H]`); the outputs are weighted by the routing-weight matrix (zero
//! outside each token's top-k) and summed over experts. Measured against gather-based dispatch (gathering each
//! token's k expert matrices, `[N,k,H,I]`) with `export/benches/moe_dispatch.py` on this 2-core CPU (ONNX Runtime
//! 1.31, 2 threads; ms per MoE block):
//!
//! | config | tokens | dense masked | gather |
//! |---|---|---|---|
//! | tiny (H64, I32, 8 experts, top-3) | 1 / 8 / 64 | 0.19 / 0.24 / 0.50 | 0.16 / 0.25 / 1.15 |
//! | mid (H1024, I512, 64 experts, top-6) | 1 / 8 / 64 | 43 / 94 / 271 | 11 / 86 / 504 |
//!
//! Gather wins only single-token decode (4x at mid size) and loses from ~8 tokens on; worse, its intermediate
//! grows as `tokens·k·H·I` (a 512-token prefill at mid size would gather ~6 GB of weights), while dense masked
//! compute grows as `E·tokens·I`. Dense masked is therefore the portable default; a per-target graph (TensorRT)
//! is the place for a fused MoE.

use super::config::DeepseekV3Config;
use super::{read_matrix, swiglu, transpose};
use crate::arch::common::Ctx;
use crate::error::Result;
use crate::onnx::{attr_i, ElemType};

/// Routing weights `[N, E]` (float32, zero outside each token's top-k) for tokens `x2` `[N, H]`.
fn router(ctx: &mut Ctx, cfg: &DeepseekV3Config, layer: usize, x2: &str) -> Result<String> {
    let p = format!("/model/layers.{layer}/mlp/gate");
    let hf = format!("model.layers.{layer}.mlp.gate");
    debug_assert!(format!("{hf}.weight").ends_with(super::ROUTER_WEIGHT_SUFFIX));
    let (h, e) = (cfg.hidden_size, cfg.n_routed_experts);
    // Router weights stay float32 in every precision, as in transformers.
    let wg = ctx.tensor_f32(&format!("{hf}.weight"), &[e, h])?;
    let wg = ctx.b.weight(&format!("{hf}.weight"), ElemType::F32, &[h as i64, e as i64], |sink| {
        sink(bytemuck::cast_slice(&transpose(&wg, e, h)))
    })?;
    ctx.ck.release(&format!("{hf}.weight"));
    let bias = ctx.tensor_f32(&format!("{hf}.e_score_correction_bias"), &[e])?;
    let bias = ctx.b.weight(&format!("{hf}.e_score_correction_bias"), ElemType::F32, &[e as i64], |sink| {
        sink(bytemuck::cast_slice(&bias))
    })?;
    let dtype = ctx.dtype;
    let b = &mut ctx.b;
    let xf = if dtype != ElemType::F32 { b.cast(&format!("{p}/Cast"), x2, ElemType::F32)? } else { x2.to_string() };
    let logits = b.matmul(&format!("{p}/MatMul"), &xf, &wg)?;
    let scores = b.unary(&format!("{p}/Sigmoid"), "Sigmoid", &logits)?;
    let choice = b.add(&format!("{p}/correction_bias/Add"), &scores, &bias)?;
    let eligible = if cfg.topk_group < cfg.n_group {
        let per = (e / cfg.n_group) as i64;
        let grouped = b.reshape(&format!("{p}/groups/Reshape"), &choice, &[-1, cfg.n_group as i64, per])?;
        let two = b.const_i64s(&[2])?;
        let top2 = b.wire_n(&format!("{p}/group_top2/TopK"), "TopK", &[&grouped, &two], vec![attr_i("axis", -1)], 2)?;
        let last = b.const_i64s(&[-1])?;
        let gscore = b.wire(
            &format!("{p}/group_score/ReduceSum"),
            "ReduceSum",
            &[&top2[0], &last],
            vec![attr_i("keepdims", 0)],
        )?;
        let gsel = top_k_mask(b, &format!("{p}/group_select"), &gscore, cfg.topk_group)?; // [N,G] bool
        let g3 = b.unsqueeze(&format!("{p}/group_mask/Unsqueeze"), &gsel, &[-1])?;
        let shape = b.const_i64s(&[1, cfg.n_group as i64, per])?;
        let g3 = b.wire(&format!("{p}/group_mask/Expand"), "Expand", &[&g3, &shape], vec![])?;
        let emask = b.reshape(&format!("{p}/group_mask/Reshape"), &g3, &[-1, e as i64])?;
        let ninf = b.const_scalar(ElemType::F32, f32::NEG_INFINITY)?;
        b.where_(&format!("{p}/group_mask/Where"), &emask, &choice, &ninf)?
    } else {
        choice
    };
    let esel = top_k_mask(b, &format!("{p}/expert_select"), &eligible, cfg.num_experts_per_tok)?;
    let zero = b.const_scalar(ElemType::F32, 0.0)?;
    let mut w = b.where_(&format!("{p}/weights/Where"), &esel, &scores, &zero)?;
    if cfg.norm_topk_prob {
        let last = b.const_i64s(&[-1])?;
        let sum = b.wire(&format!("{p}/norm/ReduceSum"), "ReduceSum", &[&w, &last], vec![attr_i("keepdims", 1)])?;
        let eps = b.const_scalar(ElemType::F32, 1e-20)?;
        let den = b.add(&format!("{p}/norm/Add"), &sum, &eps)?;
        w = b.div(&format!("{p}/norm/Div"), &w, &den)?;
    }
    if cfg.routed_scaling_factor != 1.0 {
        let s = b.const_scalar(ElemType::F32, cfg.routed_scaling_factor as f32)?;
        w = b.mul(&format!("{p}/routed_scaling/Mul"), &w, &s)?;
    }
    Ok(w)
}

/// `x >= (k-th largest of x along the last axis)`: a boolean mask of each row's top-k.
fn top_k_mask(b: &mut crate::onnx::GraphBuilder, node: &str, x: &str, k: usize) -> Result<String> {
    let kk = b.const_i64s(&[k as i64])?;
    let top = b.wire_n(&format!("{node}/TopK"), "TopK", &[x, &kk], vec![attr_i("axis", -1)], 2)?;
    let start = b.const_i64s(&[k as i64 - 1])?;
    let end = b.const_i64s(&[k as i64])?;
    let axis = b.const_i64s(&[-1])?;
    let kth = b.wire(&format!("{node}/kth/Slice"), "Slice", &[&top[0], &start, &end, &axis], vec![])?;
    b.wire(&format!("{node}/GreaterOrEqual"), "GreaterOrEqual", &[x, &kth], vec![])
}

/// Stacks the `E` experts' `{proj}.weight` (`[out, in]` each) as `[E, in, out]` in the export dtype, streaming
/// one expert at a time (each dequantized from FP8 when stored so). In a streamed `int8-wo` / `int4-wo` export the
/// stack is quantized expert by expert instead and read back through a `DequantizeLinear` (`quantize/stream.rs`).
fn stacked_experts(
    ctx: &mut Ctx,
    cfg: &DeepseekV3Config,
    layer: usize,
    proj: &str,
    out_f: usize,
    in_f: usize,
) -> Result<String> {
    let e = cfg.n_routed_experts;
    let hf = format!("model.layers.{layer}.mlp.experts");
    let dtype = ctx.dtype;
    let name = format!("{hf}.{proj}");
    let ck = ctx.ck;
    let fp8 = cfg.fp8.clone();
    let mut total = 0u64;
    let keys: Vec<String> = (0..e).map(|j| format!("{hf}.{j}.{proj}.weight")).collect();
    // Validate every expert tensor (presence, shape) before streaming so errors name the tensor early.
    for k in &keys {
        let t = ck.tensor(k, &[out_f, in_f])?;
        total += t.data.len() as u64;
    }
    // A streamed weight-only export quantizes the stack one expert at a time (`GraphBuilder::stacked_matmul_weight`).
    let out = ctx.b.stacked_matmul_weight(&name, dtype, &[e as i64, in_f as i64, out_f as i64], |sink| {
        for k in &keys {
            let m = read_matrix(ck, fp8.as_ref(), k, out_f, in_f)?;
            let t = transpose(&m, out_f, in_f);
            for chunk in t.chunks(1 << 20) {
                sink(&dtype.encode_f32(chunk)?)?;
            }
        }
        Ok(())
    })?;
    (ctx.progress)(&name, total);
    Ok(out)
}

/// The MoE block for `x` `[B, S, H]`: routed experts (dense masked) + shared experts.
pub(super) fn moe(ctx: &mut Ctx, cfg: &DeepseekV3Config, layer: usize, x: &str) -> Result<String> {
    let p = format!("/model/layers.{layer}/mlp");
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let x2 = ctx.b.reshape(&format!("{p}/tokens/Reshape"), x, &[-1, h as i64])?; // [N,H]
    let w = router(ctx, cfg, layer, &x2)?; // [N,E] f32
    let wg = stacked_experts(ctx, cfg, layer, "gate_proj", i, h)?;
    let wu = stacked_experts(ctx, cfg, layer, "up_proj", i, h)?;
    let wd = stacked_experts(ctx, cfg, layer, "down_proj", h, i)?;
    let dtype = ctx.dtype;
    let b = &mut ctx.b;
    let g = b.matmul(&format!("{p}/experts/gate_proj/MatMul"), &x2, &wg)?; // [E,N,I]
    let u = b.matmul(&format!("{p}/experts/up_proj/MatMul"), &x2, &wu)?;
    let sg = b.unary(&format!("{p}/experts/act_fn/Sigmoid"), "Sigmoid", &g)?;
    let act = b.mul(&format!("{p}/experts/act_fn/Mul"), &g, &sg)?;
    let prod = b.mul(&format!("{p}/experts/Mul"), &act, &u)?;
    let d = b.matmul(&format!("{p}/experts/down_proj/MatMul"), &prod, &wd)?; // [E,N,H]
    let wt = b.transpose(&format!("{p}/experts/weights/Transpose"), &w, &[1, 0])?; // [E,N]
    let mut wt = b.unsqueeze(&format!("{p}/experts/weights/Unsqueeze"), &wt, &[-1])?; // [E,N,1]
    if dtype != ElemType::F32 {
        wt = b.cast(&format!("{p}/experts/weights/Cast"), &wt, dtype)?;
    }
    let weighted = b.mul(&format!("{p}/experts/weighted/Mul"), &d, &wt)?;
    let zero_axis = b.const_i64s(&[0])?;
    let routed =
        b.wire(&format!("{p}/experts/ReduceSum"), "ReduceSum", &[&weighted, &zero_axis], vec![attr_i("keepdims", 0)])?;
    let shape = b.unary(&format!("{p}/shape/Shape"), "Shape", x)?;
    let routed = b.wire(&format!("{p}/experts/Reshape"), "Reshape", &[&routed, &shape], vec![])?;
    if cfg.n_shared_experts == 0 {
        return Ok(routed);
    }
    let shared = swiglu(
        ctx,
        cfg,
        &format!("{p}/shared_experts"),
        x,
        &format!("model.layers.{layer}.mlp.shared_experts"),
        h,
        i * cfg.n_shared_experts,
    )?;
    ctx.b.add(&format!("{p}/shared/Add"), &routed, &shared)
}
