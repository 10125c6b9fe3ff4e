//! `r1.LatentAttention`: DeepseekV3's absorbed multi-head latent attention (MLA) over the compressed cache, appended
//! in place, as one ONNX Runtime custom operator (domain [`super::DOMAIN`], registered beside
//! `r1.GroupQueryAttention` by [`super::domain`]).
//!
//! The exporter's serving rewrite (`export/src/onnx/fused_latent.rs`) replaces, in each layer of
//! `export/src/arch/deepseek_v3/mla.rs`, the cache `Concat`s, both score `MatMul`s, the scale, the mask `Add`, the
//! `Softmax` and the context `MatMul` with this node. Inputs (float32; `B` rows, `S` new positions, `H` heads):
//!
//! | # | input | shape |
//! |---|---|---|
//! | 0 | `query_latent`: the absorbed query `q_nope · W_uk` | `[B, H, S, rank]` |
//! | 1 | `query_rope`: the rotated `q_rot` | `[B, H, S, rope]` |
//! | 2 | `latent`: the step's normed latent `c` | `[B, 1, S, rank]` |
//! | 3 | `rope_key`: the step's rotated `k_rot` | `[B, 1, S, rope]` |
//! | 4, 5 | `past_latent`, `past_rope` (`past_key_values.{i}.key` / `.value`) | `[B, 1, P, rank]`, `[B, 1, P, rope]` |
//! | 6 | `seqlens_k`: each row's total length − 1 (`Σ attention_mask − 1`) | `[B]` int32 |
//! | 7 | `total_sequence_length`: the mask's width | `[1]` int32 |
//!
//! Outputs: the softmax-weighted latent `[B, H, S, rank]` (the graph then applies `W_uv` and `o_proj` as before) and
//! the presents `[B, 1, max(P, total), rank]` / `[…, rope]` (`present.{i}.key` / `.value`). Attributes: `num_heads`,
//! `scale` (the graph's own softmax scale, yarn's mscale included).
//!
//! The cache layout is the engine's KV pool, as `r1.GroupQueryAttention`'s: a row's positions are at the start of
//! its slot (right-padded), its length is `seqlens_k + 1`, and a step's new positions are the step's whole width after
//! its past (`past = len − S`; only a first prompt may be shorter, right-padded: [`RowSpan::of`]). When a past and its
//! present are the same memory (the pool bound as both, `backend/ort_in_place.rs`) the new positions are written after
//! each row's valid ones and nothing is copied; otherwise the valid past is copied first. Query `s` of a row attends
//! to its positions `..= past + s` only; padding queries get zeros.
//!
//! Work is spread over ONNX Runtime's intra-op thread pool: one task per row appends, then one task per (row, tile of
//! [`HEAD_TILE`] heads, tile of [`QUERY_TILE`] queries) attends: its queries' scores against the row's cache are one
//! matrix product (`ndarray`'s, i.e. `matrixmultiply`'s single-threaded sgemm), so each cached latent is read once
//! per task for all its heads, as a GEMM reads it. A decode step (one token per row) takes all of a row's heads per
//! task instead and splits the row's positions into chunks whose partial softmaxes are merged ([`decode`]). Tiles and
//! chunks depend on the shapes and lengths only, so the output never depends on the thread count or on how tasks were
//! scheduled. Arithmetic is float32 throughout, as the portable graph's.

use ndarray::{Array2, ArrayView2, ArrayViewMut2, ShapeBuilder};
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput};
use ort::value::TensorElementType as T;

use super::kernel::RowSpan;

#[path = "latent_decode.rs"]
pub mod decode;

/// The operator's type name, in [`super::DOMAIN`].
pub const OP_TYPE: &str = "LatentAttention";
/// Heads one attention task takes.
pub const HEAD_TILE: usize = 16;
/// Query positions one attention task takes.
pub const QUERY_TILE: usize = 8;

/// Sizes of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentDims {
    pub batch: usize,
    /// New positions per row (`S`).
    pub seq: usize,
    pub heads: usize,
    /// The latent's width (`kv_lora_rank`).
    pub rank: usize,
    /// The rope key's width (`qk_rope_head_dim`).
    pub rope: usize,
    /// Positions of the past buffers.
    pub past_capacity: usize,
    /// Positions of the present buffers (≥ `past_capacity`).
    pub present_capacity: usize,
}

/// The buffers of one call. Past and present may be the same memory (the KV pool bound in place); nothing else may
/// overlap.
#[derive(Debug, Clone, Copy)]
pub struct LatentBuffers {
    pub query_latent: *const f32,
    pub query_rope: *const f32,
    pub latent: *const f32,
    pub rope_key: *const f32,
    pub past_latent: *const f32,
    pub past_rope: *const f32,
    pub present_latent: *mut f32,
    pub present_rope: *mut f32,
    pub out: *mut f32,
}

// SAFETY: the pointers are only dereferenced by `append` and `attend`, whose callers hand each task a disjoint part
// of every buffer it writes (see their docs).
unsafe impl Send for LatentBuffers {}
// SAFETY: as above.
unsafe impl Sync for LatentBuffers {}

/// The checked shapes of a call's inputs, in input order (see the module docs); `Err` names the input, what it
/// should be and what it is.
pub fn check_shapes(heads: usize, shapes: &[Vec<usize>; 8], total: i64) -> Result<LatentDims, String> {
    let [ql, qr, lat, rk, pl, pr, sl, _] = shapes;
    let named = |i: usize| ["query_latent", "query_rope", "latent", "rope_key", "past_latent", "past_rope"][i];
    for (i, s) in shapes[..6].iter().enumerate() {
        if s.len() != 4 {
            return Err(format!("input `{}` has shape {s:?}, expected 4 dimensions", named(i)));
        }
    }
    let (batch, seq, rank, rope) = (ql[0], ql[2], ql[3], qr[3]);
    if ql[1] != heads {
        return Err(format!("input `query_latent` has {} heads (shape {ql:?}), num_heads is {heads}", ql[1]));
    }
    let past_capacity = pl[2];
    let want = [
        vec![batch, heads, seq, rope],
        vec![batch, 1, seq, rank],
        vec![batch, 1, seq, rope],
        vec![batch, 1, past_capacity, rank],
        vec![batch, 1, past_capacity, rope],
    ];
    for (i, (got, want)) in [qr, lat, rk, pl, pr].into_iter().zip(&want).enumerate() {
        if got != want {
            return Err(format!("input `{}` has shape {got:?}, expected {want:?}", named(i + 1)));
        }
    }
    if sl.as_slice() != [batch] {
        return Err(format!("input `seqlens_k` has shape {sl:?}, expected [{batch}]"));
    }
    let total = usize::try_from(total).map_err(|_| format!("total_sequence_length is {total}, expected ≥ 0"))?;
    if rank == 0 || rope == 0 {
        return Err(format!("the latent width {rank} and the rope width {rope} must both be > 0"));
    }
    Ok(LatentDims { batch, seq, heads, rank, rope, past_capacity, present_capacity: past_capacity.max(total) })
}

/// Each row's split of its positions from `seqlens_k`; `Err` names the row whose length does not fit the caches.
pub fn row_spans(d: &LatentDims, seqlens: &[i32]) -> Result<Vec<RowSpan>, String> {
    seqlens
        .iter()
        .enumerate()
        .map(|(b, &s)| {
            let len = i64::from(s) + 1;
            if len < 1 || len as usize > d.present_capacity {
                return Err(format!(
                    "row {b}: seqlens_k + 1 = {len} is outside 1 ..= {} (the present cache's positions)",
                    d.present_capacity
                ));
            }
            let span = RowSpan::of(len as usize, d.seq);
            if span.past > d.past_capacity {
                return Err(format!("row {b}: {} past positions, the past cache holds {}", span.past, d.past_capacity));
            }
            Ok(span)
        })
        .collect()
}

/// Phase one for row `b`: copies its valid past into the present when they are not the same memory (and zeroes the
/// rest of a separate present), then writes the step's new latents and rope keys after it.
///
/// # Safety
/// Every buffer holds `d`'s sizes; `span.past ≤ d.past_capacity` and `span.past + span.new ≤ d.present_capacity`; no
/// other task writes row `b` of the presents during the call.
pub unsafe fn append(d: &LatentDims, buf: &LatentBuffers, b: usize, span: RowSpan) {
    for (width, past, present, new) in [
        (d.rank, buf.past_latent, buf.present_latent, buf.latent),
        (d.rope, buf.past_rope, buf.present_rope, buf.rope_key),
    ] {
        // SAFETY: ranges within the buffers by the caller's guarantee; past and present are the same memory or
        // disjoint.
        unsafe {
            let dst = present.add(b * d.present_capacity * width);
            if !std::ptr::eq(past, present.cast_const()) {
                std::ptr::copy_nonoverlapping(past.add(b * d.past_capacity * width), dst, span.past * width);
                let len = span.past + span.new;
                std::ptr::write_bytes(dst.add(len * width), 0, (d.present_capacity - len) * width);
            }
            let src = new.add(b * d.seq * width);
            std::ptr::copy_nonoverlapping(src, dst.add(span.past * width), span.new * width);
        }
    }
}

/// The tasks of phase two for `d` (steps that are not decode steps): (row, head tile, query tile), in that order.
pub fn attention_tasks(d: &LatentDims) -> usize {
    d.batch * d.heads.div_ceil(HEAD_TILE) * d.seq.div_ceil(QUERY_TILE)
}

/// Phase two for task `task` (< [`attention_tasks`]): scores the task's queries against the row's cache (causal),
/// softmaxes them with `scale` and writes the weighted latents; padding queries get zeros.
///
/// # Safety
/// As [`append`], after `append` ran for the task's row; no other task writes the task's output rows.
pub unsafe fn attend(d: &LatentDims, buf: &LatentBuffers, spans: &[RowSpan], task: usize, scale: f32) {
    let (head_tiles, query_tiles) = (d.heads.div_ceil(HEAD_TILE), d.seq.div_ceil(QUERY_TILE));
    let b = task / (head_tiles * query_tiles);
    let (ht, qt) = (task / query_tiles % head_tiles, task % query_tiles);
    let heads = ht * HEAD_TILE..((ht + 1) * HEAD_TILE).min(d.heads);
    let span = spans[b];
    let q0 = qt * QUERY_TILE;
    let queries = q0..((qt + 1) * QUERY_TILE).min(d.seq);
    let (rank, rope) = (d.rank, d.rope);
    let out_row = |h: usize, s: usize| ((b * d.heads + h) * d.seq + s) * rank;
    // Queries at or past the row's new positions are padding: zeros.
    let live = queries.start..queries.end.min(span.new);
    for h in heads.clone() {
        for s in live.end.max(queries.start)..queries.end {
            // SAFETY: the output row of (b, h, s) is this task's.
            unsafe { std::ptr::write_bytes(buf.out.add(out_row(h, s)), 0, rank) };
        }
    }
    if live.is_empty() {
        return;
    }
    let (nq, rows) = (live.len(), heads.len() * live.len());
    // Keys the last live query sees: the row's past and the new positions up to it.
    let keys = span.past + live.end;
    // SAFETY: the row's present holds `keys` ≤ past + new valid positions (phase one wrote them); the queries are
    // within `query_*`; the views are read only.
    let (q_lat, q_rot, cache_lat, cache_rope) = unsafe {
        let gather = |src: *const f32, width: usize| {
            let mut m = Array2::<f32>::zeros((rows, width));
            for (i, h) in heads.clone().enumerate() {
                let from = src.add(((b * d.heads + h) * d.seq + live.start) * width);
                let dst = m.as_slice_mut().expect("standard layout");
                std::ptr::copy_nonoverlapping(from, dst.as_mut_ptr().add(i * nq * width), nq * width);
            }
            m
        };
        let view = |p: *const f32, width: usize| {
            ArrayView2::from_shape_ptr((keys, width).strides((width, 1)), p.add(b * d.present_capacity * width))
        };
        (
            gather(buf.query_latent, rank),
            gather(buf.query_rope, rope),
            view(buf.present_latent, rank),
            view(buf.present_rope, rope),
        )
    };
    // scores = q_lat · cᵀ + q_rot · k_rotᵀ, as the portable graph sums its two products.
    let mut scores = Array2::<f32>::zeros((rows, keys));
    matmul(&q_lat.view(), &cache_lat.t(), false, &mut scores.view_mut());
    matmul(&q_rot.view(), &cache_rope.t(), true, &mut scores.view_mut());
    for (r, mut row) in scores.outer_iter_mut().enumerate() {
        let visible = span.past + live.start + r % nq + 1;
        let row = row.as_slice_mut().expect("standard layout");
        let (seen, hidden) = row.split_at_mut(visible);
        softmax_scaled(seen, scale);
        hidden.fill(0.0);
    }
    let mut context = Array2::<f32>::zeros((rows, rank));
    matmul(&scores.view(), &cache_lat, false, &mut context.view_mut());
    let context = context.as_slice().expect("standard layout");
    for (i, h) in heads.enumerate() {
        // SAFETY: the output rows of (b, h, live) are this task's and hold `nq × rank` values.
        unsafe {
            std::ptr::copy_nonoverlapping(
                context.as_ptr().add(i * nq * rank),
                buf.out.add(out_row(h, live.start)),
                nq * rank,
            );
        }
    }
}

/// `x ← softmax(x · scale)`, as the portable graph computes it: scale, subtract the maximum, exponentiate, divide by
/// the sum.
fn softmax_scaled(x: &mut [f32], scale: f32) {
    let (_, sum) = exp_scaled(x, scale);
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `x ← exp(scale · x − m)` with `m = max(scale · x)`; returns `(m, Σ x)`. Vectorized: the kernel's polynomial
/// `exp` (within 2 ulp of libm, [`super::kernel::exp_neg`]) and eight-lane reductions instead of a libm call and a
/// serial sum per score (at 128 heads × 4,000 positions that was most of a decode step's time).
fn exp_scaled(x: &mut [f32], scale: f32) -> (f32, f32) {
    for v in x.iter_mut() {
        *v *= scale;
    }
    let max = super::kernel::lanes(x, f32::NEG_INFINITY, f32::max);
    for v in x.iter_mut() {
        *v = super::kernel::exp_neg(*v - max);
    }
    (max, super::kernel::lanes(x, 0.0, |a, b| a + b))
}

/// `c ← a · b` (`add`: `c ← c + a · b`), float32, on the calling thread: the `gemm` crate's sgemm, which at this
/// operator's shapes (128 heads × 512 by hundreds of positions) packs less and runs ~10–15% faster than ndarray's
/// `matrixmultiply` (`BENCHMARKS.md`, "DeepseekV3: the latent cache in place"). Any strides (a transposed view
/// included).
pub(super) fn matmul(a: &ArrayView2<f32>, b: &ArrayView2<f32>, add: bool, c: &mut ArrayViewMut2<f32>) {
    let ((m, k), (k2, n)) = (a.dim(), b.dim());
    assert!(k == k2 && c.dim() == (m, n), "matmul shapes {:?} x {:?} -> {:?}", a.dim(), b.dim(), c.dim());
    let (cs, as_, bs) = (c.strides().to_vec(), a.strides(), b.strides());
    // SAFETY: the three views are valid for their shapes and strides; `c` is borrowed mutably and cannot alias `a`
    // or `b` (the borrow checker forbids it); gemm reads `c` only when `add`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            cs[1],
            cs[0],
            add,
            a.as_ptr(),
            as_[1],
            as_[0],
            b.as_ptr(),
            bs[1],
            bs[0],
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// The tasks of one phase: task `i` of `0 .. n`, run once each in any order and on any thread.
pub type Tasks<'t> = &'t (dyn Fn(usize) + Sync + Send);

/// Runs the phases of one call, each task through `par_for(tasks, task)` (ONNX Runtime's thread pool, or a plain
/// loop in the tests).
///
/// # Safety
/// Every buffer holds `d`'s sizes; `spans` are [`row_spans`]'s for `d`.
pub unsafe fn run(
    d: &LatentDims,
    buf: &LatentBuffers,
    spans: &[RowSpan],
    scale: f32,
    par_for: &mut dyn FnMut(usize, Tasks<'_>) -> ort::Result<()>,
) -> ort::Result<()> {
    // SAFETY (every phase): task b writes row b of the presents only; an attention task writes only its own output
    // rows (or its own chunk's partial result), after every append finished; a merge reads a row's partial results
    // after all its chunks finished.
    par_for(d.batch, &|b| unsafe { append(d, buf, b, spans[b]) })?;
    if d.seq != 1 {
        return par_for(attention_tasks(d), &|t| unsafe { attend(d, buf, spans, t, scale) });
    }
    let longest = spans.iter().map(|s| s.past + s.new).max().unwrap_or(0);
    let splits = decode::splits(d.batch, longest);
    let mut partials = vec![0f32; if splits > 1 { d.batch * splits * decode::partial_len(d) } else { 0 }];
    let p = decode::Partials(partials.as_mut_ptr());
    // A short context (one chunk per row) splits the row's heads instead, so the pool still has tasks for its threads.
    let groups = if splits == 1 { decode::head_groups(d.batch, d.heads) } else { 1 };
    let per_row = splits * groups;
    par_for(d.batch * per_row, &|t| unsafe {
        let (b, j, g) = (t / per_row, t % per_row / groups, t % groups);
        let heads = decode::head_range(d.heads, groups, g);
        decode::attend_chunk(d, buf, (spans[b], b), (j, splits), heads, scale, p)
    })?;
    if splits > 1 {
        par_for(d.batch, &|b| unsafe { decode::merge(d, buf, b, splits, p) })?;
    }
    Ok(())
}

/// The operator (float32 activations and caches).
pub(super) struct LatentAttention;

/// The attributes, read once per node.
pub struct LatentKernel {
    heads: usize,
    scale: f32,
}

fn err(message: String) -> ort::Error {
    ort::Error::new(format!("r1.{OP_TYPE}: {message}"))
}

impl Operator for LatentAttention {
    type Kernel<'attr> = LatentKernel;

    fn name(&self) -> &str {
        OP_TYPE
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(T::Float32), // query_latent [B, H, S, rank]
            OperatorInput::required(T::Float32), // query_rope [B, H, S, rope]
            OperatorInput::required(T::Float32), // latent [B, 1, S, rank]
            OperatorInput::required(T::Float32), // rope_key [B, 1, S, rope]
            OperatorInput::required(T::Float32), // past_latent [B, 1, P, rank]
            OperatorInput::required(T::Float32), // past_rope [B, 1, P, rope]
            OperatorInput::required(T::Int32),   // seqlens_k [B]
            OperatorInput::required(T::Int32),   // total_sequence_length [1]
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [
            OperatorOutput::required(T::Float32), // output [B, H, S, rank]
            OperatorOutput::required(T::Float32), // present_latent [B, 1, max(P, total), rank]
            OperatorOutput::required(T::Float32), // present_rope [B, 1, max(P, total), rope]
        ]
    }

    fn create_kernel<'attr>(&self, ctx: &KernelContext<'attr>) -> ort::Result<LatentKernel> {
        let heads = ctx.get::<i64>("num_heads").filter(|&h| h > 0);
        let heads = heads.ok_or_else(|| err("needs the attribute num_heads > 0".into()))?;
        let scale = ctx.get::<f32>("scale").filter(|s| s.is_finite() && *s > 0.0);
        let scale = scale.ok_or_else(|| err("needs the attribute scale, finite and > 0".into()))?;
        Ok(LatentKernel { heads: heads as usize, scale })
    }
}

/// Input `i`'s shape and data pointer.
fn input<E: ort::value::PrimitiveTensorElementType>(
    ctx: &ComputeContext,
    i: usize,
) -> ort::Result<(Vec<usize>, *const E, usize)> {
    let v = ctx.input(i)?.ok_or_else(|| err(format!("input {i} is missing")))?;
    let (shape, data) = v.try_extract_tensor::<E>()?;
    Ok((shape.iter().map(|&x| x.max(0) as usize).collect(), data.as_ptr(), data.len()))
}

fn output(ctx: &ComputeContext, i: usize, shape: &[usize]) -> ort::Result<*mut f32> {
    let dims: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
    let mut v = ctx.output(i, dims)?.ok_or_else(|| err(format!("output {i} is missing")))?;
    let (_, data) = v.try_extract_tensor_mut::<f32>()?;
    Ok(data.as_mut_ptr())
}

impl Kernel for LatentKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let mut shapes: [Vec<usize>; 8] = Default::default();
        let mut floats = [std::ptr::null::<f32>(); 6];
        for (i, (shape, data)) in shapes.iter_mut().zip(&mut floats).enumerate() {
            let (s, p, _) = input::<f32>(ctx, i)?;
            (*shape, *data) = (s, p);
        }
        let (s, seqlens, n) = input::<i32>(ctx, 6)?;
        shapes[6] = s;
        let (s, total, total_len) = input::<i32>(ctx, 7)?;
        shapes[7] = s;
        if total_len != 1 {
            return Err(err(format!("total_sequence_length holds {total_len} values, expected 1")));
        }
        // SAFETY: one int32 value, checked above.
        let total = i64::from(unsafe { *total });
        let d = check_shapes(self.heads, &shapes, total).map_err(err)?;
        // SAFETY: `seqlens_k` holds `n` (= batch, checked) values.
        let seqlens = unsafe { std::slice::from_raw_parts(seqlens, n) };
        let spans = row_spans(&d, seqlens).map_err(err)?;
        let out = output(ctx, 0, &[d.batch, d.heads, d.seq, d.rank])?;
        let present_latent = output(ctx, 1, &[d.batch, 1, d.present_capacity, d.rank])?;
        let present_rope = output(ctx, 2, &[d.batch, 1, d.present_capacity, d.rope])?;
        let buf = LatentBuffers {
            query_latent: floats[0],
            query_rope: floats[1],
            latent: floats[2],
            rope_key: floats[3],
            past_latent: floats[4],
            past_rope: floats[5],
            present_latent,
            present_rope,
            out,
        };
        // SAFETY: every buffer has `d`'s sizes (checked shapes, outputs allocated so), `spans` are `d`'s.
        unsafe { run(&d, &buf, &spans, self.scale, &mut |n, f| ctx.par_for(n, 0, f)) }
    }
}

#[cfg(test)]
#[path = "latent_tests.rs"]
mod tests;
