//! The decode form of [`super::attend`]: steps whose rows feed one token each (`S = 1`).
//!
//! A decode row's queries are its `H` heads, one position each, so the tiled form's tasks (16 heads) would be matrix
//! products of 16 rows, each packing the row's whole cache again: at DeepSeek-R1's 128 heads the cache is read and
//! packed 8 times per step. Here one task takes **all** heads of a row and one chunk of its cached positions (a
//! matrix product of `H` rows, each cached latent packed once), and a second phase merges the chunks' partial softmaxes
//! (flash-decoding): chunk `j` leaves its maximum `m_j`, its sum `l_j = Σ exp(s − m_j)` and its weighted latents
//! `o_j = Σ exp(s − m_j) · c` per head; the output is `Σ_j exp(m_j − m) · o_j / Σ_j exp(m_j − m) · l_j`, `m = max m_j`,
//! summed in chunk order. The number of chunks depends on the batch size and the longest row only ([`splits`]), so the
//! output never depends on the thread count; a row with fewer positions than [`MIN_KEY_CHUNK`] per chunk uses fewer
//! chunks, and a step with one chunk per row writes its output directly.

use std::ops::Range;

use ndarray::{Array2, ArrayView2, ArrayViewMut2, ShapeBuilder};

use super::{exp_scaled, matmul, softmax_scaled, LatentBuffers, LatentDims, RowSpan};

/// The most chunks a row's positions are split into.
pub const MAX_SPLITS: usize = 8;
/// The fewest positions a chunk takes (but the last).
pub const MIN_KEY_CHUNK: usize = 256;

/// Chunks per row for a decode step of `batch` rows whose longest holds `longest` positions: enough tasks for a
/// thread pool of 16 or more at batch 1, one chunk per row from 32 rows on, and no more chunks than the longest row
/// fills (a step whose rows fit one chunk writes its output directly: no partial results to allocate and merge).
pub fn splits(batch: usize, longest: usize) -> usize {
    (32 / batch.max(1)).min(longest.div_ceil(MIN_KEY_CHUNK)).clamp(1, MAX_SPLITS)
}

/// Groups of heads a row's single chunk is split into, when its positions fill one chunk only (a short context):
/// enough tasks for a thread pool of 4 or more at batch 1, at least 32 heads a group (each group packs the row's
/// cache again, which a short context makes cheap), one group from 32 rows on. Depends on the batch size and the head
/// count only, like [`splits`].
pub fn head_groups(batch: usize, heads: usize) -> usize {
    (32 / batch.max(1)).min(heads / 32).clamp(1, MAX_SPLITS)
}

/// Group `g` of `groups` over `heads` heads.
pub fn head_range(heads: usize, groups: usize, g: usize) -> Range<usize> {
    let len = heads.div_ceil(groups.max(1));
    (g * len).min(heads)..((g + 1) * len).min(heads)
}

/// Chunk `j`'s positions among a row's `keys` (empty when the row is shorter than `j + 1` chunks).
pub fn chunk(keys: usize, splits: usize, j: usize) -> Range<usize> {
    let len = keys.div_ceil(splits).max(MIN_KEY_CHUNK);
    (j * len).min(keys)..((j + 1) * len).min(keys)
}

/// Floats of one (row, chunk)'s partial result: `m` and `l` per head, then `o` `[H, rank]`.
pub fn partial_len(d: &LatentDims) -> usize {
    d.heads * (d.rank + 2)
}

/// Where the chunks leave their partial results (`batch × splits ×` [`partial_len`] floats).
#[derive(Debug, Clone, Copy)]
pub struct Partials(pub *mut f32);

// SAFETY: each task writes only its own (row, chunk) part, and the merge reads them after every task finished.
unsafe impl Send for Partials {}
// SAFETY: as above.
unsafe impl Sync for Partials {}

/// Chunk `j` of row `b`: scores the heads `heads` against the chunk's positions. With one chunk per row
/// (`splits == 1`) it writes those heads' normalized output; otherwise (all heads) its partial result into
/// `partials`.
///
/// # Safety
/// As [`super::attend`] for a decode step (`d.seq == 1`), after the row's append; `partials` holds `batch × splits ×`
/// [`partial_len`] floats when `splits > 1`, and then `heads` is every head; no other task writes this (row, chunk)'s
/// part or (one chunk) these heads' output.
pub unsafe fn attend_chunk(
    d: &LatentDims,
    buf: &LatentBuffers,
    (span, b): (RowSpan, usize),
    (j, splits): (usize, usize),
    heads: Range<usize>,
    scale: f32,
    partials: Partials,
) {
    let (h, rank, rope) = (heads.len(), d.rank, d.rope);
    let first = b * d.heads + heads.start;
    let keys = chunk(span.past + span.new, splits, j);
    let part = (splits > 1).then(|| {
        // SAFETY: within `partials` by the caller's guarantee.
        unsafe { partials.0.add((b * splits + j) * partial_len(d)) }
    });
    if keys.is_empty() {
        if let Some(p) = part {
            // SAFETY: this chunk's `m` and `l`; an empty chunk weighs nothing in the merge.
            unsafe {
                std::slice::from_raw_parts_mut(p, h).fill(f32::NEG_INFINITY);
                std::slice::from_raw_parts_mut(p.add(h), h).fill(0.0);
            }
        }
        return;
    }
    // SAFETY: with S = 1 the row's queries are `[H, width]` from `b × H × width`; the chunk's positions were written
    // (past, or appended by phase one); all views are read only.
    let (q_lat, q_rot, lat, rk) = unsafe {
        let q = |p: *const f32, w: usize| ArrayView2::from_shape_ptr((h, w).strides((w, 1)), p.add(first * w));
        let c = |p: *const f32, w: usize| {
            let at = p.add((b * d.present_capacity + keys.start) * w);
            ArrayView2::from_shape_ptr((keys.len(), w).strides((w, 1)), at)
        };
        (q(buf.query_latent, rank), q(buf.query_rope, rope), c(buf.present_latent, rank), c(buf.present_rope, rope))
    };
    let mut scores = Array2::<f32>::zeros((h, keys.len()));
    matmul(&q_lat, &lat.t(), false, &mut scores.view_mut());
    matmul(&q_rot, &rk.t(), true, &mut scores.view_mut());
    let Some(p) = part else {
        for mut row in scores.outer_iter_mut() {
            softmax_scaled(row.as_slice_mut().expect("standard layout"), scale);
        }
        // SAFETY: these heads' rows of the row's output `[H, 1, rank]` are this task's (one chunk per row).
        let mut out = unsafe { ArrayViewMut2::from_shape_ptr((h, rank).strides((rank, 1)), buf.out.add(first * rank)) };
        matmul(&scores.view(), &lat, false, &mut out);
        return;
    };
    // SAFETY: this chunk's part of `partials`: `m`, `l` per head, then `o`.
    let (m, l, mut o) = unsafe {
        (
            std::slice::from_raw_parts_mut(p, h),
            std::slice::from_raw_parts_mut(p.add(h), h),
            ArrayViewMut2::from_shape_ptr((h, rank).strides((rank, 1)), p.add(2 * h)),
        )
    };
    for (i, mut row) in scores.outer_iter_mut().enumerate() {
        (m[i], l[i]) = exp_scaled(row.as_slice_mut().expect("standard layout"), scale);
    }
    matmul(&scores.view(), &lat, false, &mut o);
}

/// Merges row `b`'s `splits` partial results into its output, chunks in order.
///
/// # Safety
/// After every [`attend_chunk`] of the row ran with `splits > 1`; no other task writes row `b`'s output.
pub unsafe fn merge(d: &LatentDims, buf: &LatentBuffers, b: usize, splits: usize, partials: Partials) {
    let (h, rank, len) = (d.heads, d.rank, partial_len(d));
    // SAFETY: the row's partial results, written by its chunks; its output `[H, 1, rank]`.
    let (parts, out) = unsafe {
        (
            std::slice::from_raw_parts(partials.0.add(b * splits * len), splits * len),
            std::slice::from_raw_parts_mut(buf.out.add(b * h * rank), h * rank),
        )
    };
    for (head, out) in out.chunks_exact_mut(rank).enumerate() {
        let max = parts.chunks_exact(len).fold(f32::NEG_INFINITY, |m, p| m.max(p[head]));
        out.fill(0.0);
        let mut total = 0f32;
        for p in parts.chunks_exact(len).filter(|p| p[head] != f32::NEG_INFINITY) {
            let w = (p[head] - max).exp();
            total += w * p[h + head];
            let o = &p[2 * h + head * rank..][..rank];
            for (x, y) in out.iter_mut().zip(o) {
                *x += w * y;
            }
        }
        let inv = 1.0 / total;
        out.iter_mut().for_each(|x| *x *= inv);
    }
}
