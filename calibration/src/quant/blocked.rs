//! The blocked INT4 quantization behind [`super::quantize_blocked_u4`] and
//! [`super::quantize_blocked_i4`], on every core and in vector registers, with the bytes of the scalar
//! definition.
//!
//! The work is the MSE clip search: every `block × 1` column slice of a `[K, N]` weight tries the 21 clip ratios
//! of [`INT4_CLIP_RATIOS`], each a quantize–dequantize pass over the slice. On the 1.5B shape that is ~32 G
//! divide-round-compare steps, and it was 81% of a 230 s `int4-wo` export when it ran one column at a time on one
//! core (`perf`, BENCHMARKS.md). Here:
//!
//! - **Columns in lanes.** A row of the weight is contiguous along N, so [`LANES`] neighbouring columns of one
//!   block form a tile whose rows load as vectors; each lane runs exactly the scalar sequence of operations of its
//!   own column (the same divisions, never a multiply by a reciprocal; the error summed over the block's rows in
//!   order, from zero; the first of equal errors kept), so the chosen scale and zero point are bit-for-bit the
//!   scalar ones, whatever the vector width.
//! - **Rounding without a library call.** `round_ties_even` is a call to `rintf` on the x86-64 baseline (13% of
//!   that profile, and it stops vectorization). The AVX builds round with the instruction (SSE4.1's `roundps`);
//!   the portable one clamps the quotient to ±32 first (codes saturate at 4 bits, so no code changes) and adds
//!   and subtracts 1.5·2²³: in `[2²³, 2²⁴)` the spacing of f32 is 1, so the addition rounds to the nearest
//!   integer, ties to even, as IEEE-754 round-to-nearest does. Only the sign of a zero can differ, and no code or
//!   error depends on it.
//! - **Selects, not `f32::min` / `max` / `clamp`.** Their NaN rules kept LLVM from vectorizing the loops; there are
//!   no NaNs here (finite weights, positive scales), so the plain comparisons give the same values.
//! - **Wider registers where the CPU has them.** The same code is compiled for AVX-512F and AVX2 and picked at run
//!   time; other CPUs run the portable build (SSE2 on x86-64). A multiply by `1/s` with a fallback near rounding
//!   ties was tried and measured slower than the division (more instructions; the divider is not the limit).
//! - **Every core.** Blocks of rows are independent: rayon hands them to the cores, each writing its own rows of
//!   codes and its own row of scales.
use rayon::prelude::*;

use super::{BlockedI4, INT4_CLIP_RATIOS, INT4_QMAX, UINT4_QMAX};

/// Columns searched together: one AVX-512 register of f32 (two AVX2 ones).
pub(crate) const LANES: usize = 16;
/// The longest block ([`super::INT4_BLOCK_SIZES`]).
const MAX_BLOCK: usize = 128;

type Lanes = [f32; LANES];

/// `a.min(b)` for the numbers here (never NaN; the sign of a zero never matters), written as the select that maps
/// onto one vector instruction: `f32::min`'s NaN rules keep LLVM from vectorizing these loops.
#[inline(always)]
fn min(a: f32, b: f32) -> f32 {
    if a < b {
        a
    } else {
        b
    }
}

/// `a.max(b)`, as [`min`]; a NaN `a` gives `b`.
#[inline(always)]
fn max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// `x.clamp(lo, hi)`, as [`min`].
#[inline(always)]
fn clamp(x: f32, lo: f32, hi: f32) -> f32 {
    min(max(x, lo), hi)
}

/// `round_ties_even(v)` for the quantizers, whose codes saturate at ±16. `NATIVE`: the instruction (SSE4.1 and
/// later, so the AVX builds); otherwise exact for every `v` once clamped to ±32 (see the module docs), which is
/// all the codes need. A NaN `v` cannot occur (finite weights, finite positive scales).
#[inline(always)]
fn round_code<const NATIVE: bool>(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    if NATIVE {
        v.round_ties_even()
    } else {
        (clamp(v, -32.0, 32.0) + MAGIC) - MAGIC
    }
}

/// Per lane, the squared error of the tile's column quantized with scale `s[l]` and zero point `z[l]` (codes
/// clamped to `[qlo, qhi]`), summed over the rows in order from zero: the scalar definition's value, operation for
/// operation. (Stopping a sum once every lane's error passed its best was tried: on weights like a trained layer's
/// some lane almost always still competes, and the checks made it slower.)
#[inline(always)]
fn tile_error<const NATIVE: bool>(x: &[Lanes], s: &Lanes, z: &Lanes, qlo: f32, qhi: f32) -> Lanes {
    let mut e = [0.0f32; LANES];
    for row in x {
        for l in 0..LANES {
            let q = clamp(round_code::<NATIVE>(row[l] / s[l]) + z[l], qlo, qhi);
            let d = row[l] - (q - z[l]) * s[l];
            e[l] += d * d;
        }
    }
    e
}

/// Asymmetric search of one tile (`x`: the block's rows, one column per lane): per lane the scale and zero point
/// among [`INT4_CLIP_RATIOS`] with the least squared error, as `quant::best_u4_params` defines it.
#[inline(always)]
fn search_u4<const NATIVE: bool>(x: &[Lanes], scale: &mut Lanes, zero: &mut Lanes) {
    let (mut lo, mut hi) = ([0.0f32; LANES], [0.0f32; LANES]);
    for row in x {
        for l in 0..LANES {
            lo[l] = min(row[l], lo[l]);
            hi[l] = max(row[l], hi[l]);
        }
    }
    let mut best = [0.0f32; LANES];
    for (i, &r) in INT4_CLIP_RATIOS.iter().enumerate() {
        let (mut s, mut z) = ([0.0f32; LANES], [0.0f32; LANES]);
        for l in 0..LANES {
            s[l] = max((hi[l] - lo[l]) * r / UINT4_QMAX, f32::MIN_POSITIVE);
            z[l] = clamp(round_code::<false>(-lo[l] * r / s[l]), 0.0, UINT4_QMAX);
        }
        let e = tile_error::<NATIVE>(x, &s, &z, 0.0, UINT4_QMAX);
        for l in 0..LANES {
            if i == 0 || e[l] < best[l] {
                (best[l], scale[l], zero[l]) = (e[l], s[l], z[l]);
            }
        }
    }
    for l in 0..LANES {
        if hi[l] - lo[l] == 0.0 {
            (scale[l], zero[l]) = (1.0, 0.0);
        }
    }
}

/// Symmetric search of one tile: per lane the scale among [`INT4_CLIP_RATIOS`] `· amax / 7` with the least squared
/// error, as `quant::best_i4_scale` defines it.
#[inline(always)]
fn search_i4<const NATIVE: bool>(x: &[Lanes], scale: &mut Lanes) {
    let mut amax = [0.0f32; LANES];
    for row in x {
        for l in 0..LANES {
            amax[l] = max(row[l].abs(), amax[l]);
        }
    }
    let mut base = [0.0f32; LANES];
    for l in 0..LANES {
        // `quant::scale_from_amax`: an all-zero column gets scale 1.
        base[l] = if amax[l] == 0.0 { 1.0 } else { max(amax[l] / INT4_QMAX, f32::MIN_POSITIVE) };
    }
    // Symmetric codes are asymmetric ones with zero point 0 (`round(v) + 0 - 0` is `round(v)`, bar the sign of a
    // zero code, which multiplies to the same error). Hidden from the optimizer: with a constant zero LLVM picks
    // another vectorization of `tile_error` that runs 2.5 times slower.
    let zero = std::hint::black_box([0.0f32; LANES]);
    let mut best = [0.0f32; LANES];
    for (i, &r) in INT4_CLIP_RATIOS.iter().enumerate() {
        let mut s = [0.0f32; LANES];
        for l in 0..LANES {
            s[l] = if i == 0 { base[l] } else { max(base[l] * r, f32::MIN_POSITIVE) };
        }
        let e = tile_error::<NATIVE>(x, &s, &zero, -8.0, 7.0);
        for l in 0..LANES {
            if i == 0 || e[l] < best[l] {
                (best[l], scale[l]) = (e[l], s[l]);
            }
        }
    }
}

/// One block of rows: the search over every group of [`LANES`] columns, then the codes. `w` holds the block's
/// rows (`rows × n`); `out` gets their codes, one per byte (`PACKED` false) or two per byte as
/// [`super::pack_int4`] lays them out (`PACKED` true, for an even `n`: a row then starts on a byte, and so
/// does every group of columns); `scales` / `zeros` are the block's row of `[blocks, N]`.
#[inline(always)]
fn block_body<const NATIVE: bool, const PACKED: bool>(
    w: &[f32],
    n: usize,
    asymmetric: bool,
    out: &mut [u8],
    scales: &mut [f32],
    zeros: &mut [u8],
) {
    let rows = w.len() / n;
    let mut tile = [[0.0f32; LANES]; MAX_BLOCK];
    let tile = &mut tile[..rows];
    for c0 in (0..n).step_by(LANES) {
        let width = LANES.min(n - c0);
        for (r, t) in tile.iter_mut().enumerate() {
            let src = &w[r * n + c0..r * n + c0 + width];
            if let Ok(full) = <&Lanes>::try_from(src) {
                // A whole vector: a fixed-size copy is two register moves, a variable one a `memmove` call.
                *t = *full;
            } else {
                t[..width].copy_from_slice(src);
                // Tail lanes hold zeros: searched like any column, never written out.
                t[width..].fill(0.0);
            }
        }
        let (mut s, mut z) = ([1.0f32; LANES], [0.0f32; LANES]);
        if asymmetric {
            search_u4::<NATIVE>(tile, &mut s, &mut z);
        } else {
            search_i4::<NATIVE>(tile, &mut s);
        }
        for (r, t) in tile.iter().enumerate() {
            let mut codes = [0u8; LANES];
            for l in 0..LANES {
                let q = round_code::<NATIVE>(t[l] / s[l]);
                // Signed codes as two's complement bytes (`i8 as u8`), as the unpacked values and `pack_int4` store them.
                codes[l] =
                    if asymmetric { clamp(q + z[l], 0.0, UINT4_QMAX) as u8 } else { clamp(q, -8.0, 7.0) as i8 as u8 };
            }
            if PACKED {
                let row = &mut out[(r * n + c0) / 2..(r * n + c0 + width) / 2];
                for (i, b) in row.iter_mut().enumerate() {
                    *b = (codes[2 * i] & 0x0f) | (codes[2 * i + 1] << 4);
                }
            } else {
                out[r * n + c0..r * n + c0 + width].copy_from_slice(&codes[..width]);
            }
        }
        scales[c0..c0 + width].copy_from_slice(&s[..width]);
        if asymmetric {
            for (o, &v) in zeros[c0..c0 + width].iter_mut().zip(&z[..width]) {
                *o = v as u8;
            }
        }
    }
}

/// Declares the builds of [`block_body`] for one layout (`PACKED`) and the run-time choice among them.
macro_rules! builds {
    ($packed:literal, $choose:ident, $avx512:ident, $avx2:ident, $portable:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        fn $avx512(w: &[f32], n: usize, asymmetric: bool, out: &mut [u8], scales: &mut [f32], zeros: &mut [u8]) {
            block_body::<true, $packed>(w, n, asymmetric, out, scales, zeros)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $avx2(w: &[f32], n: usize, asymmetric: bool, out: &mut [u8], scales: &mut [f32], zeros: &mut [u8]) {
            block_body::<true, $packed>(w, n, asymmetric, out, scales, zeros)
        }

        fn $portable(w: &[f32], n: usize, asymmetric: bool, out: &mut [u8], scales: &mut [f32], zeros: &mut [u8]) {
            block_body::<false, $packed>(w, n, asymmetric, out, scales, zeros)
        }

        /// The widest build this CPU runs.
        fn $choose() -> BlockFn {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F, the only feature this build is compiled for.
                    return |w, n, a, o, s, z| unsafe { $avx512(w, n, a, o, s, z) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, the only feature this build is compiled for.
                    return |w, n, a, o, s, z| unsafe { $avx2(w, n, a, o, s, z) };
                }
            }
            $portable
        }
    };
}

type BlockFn = fn(&[f32], usize, bool, &mut [u8], &mut [f32], &mut [u8]);

builds!(false, block_fn, block_avx512, block_avx2, block_portable);
builds!(true, packed_block_fn, packed_block_avx512, packed_block_avx2, packed_block_portable);

/// Runs `f` over every block of rows of a checked (finite, `k · n` long) row-major `[K, N]` weight on every core,
/// each block writing its rows of `out` (codes of `k` rows, unpacked or packed) and its row of scales and zero
/// points; returns those.
fn run(
    w: &[f32],
    k: usize,
    n: usize,
    block: usize,
    asymmetric: bool,
    f: BlockFn,
    out: &mut [u8],
) -> (Vec<f32>, Vec<u8>) {
    debug_assert!(block <= MAX_BLOCK && w.len() == k * n);
    let nb = k.div_ceil(block);
    let mut scales = vec![1.0f32; nb * n];
    let mut zeros = vec![0u8; nb * n];
    if n > 0 && k > 0 {
        let chunk = out.len() / k * block;
        out.par_chunks_mut(chunk)
            .zip(scales.par_chunks_mut(n))
            .zip(zeros.par_chunks_mut(n))
            .zip(w.par_chunks(block * n))
            .for_each(|(((o, s), z), w)| f(w, n, asymmetric, o, s, z));
    }
    (scales, zeros)
}

/// Quantizes a checked (finite, `k · n` long) row-major `[K, N]` weight in blocks of `block` rows (at most 128).
pub(crate) fn quantize(w: &[f32], k: usize, n: usize, block: usize, asymmetric: bool) -> BlockedI4 {
    let mut values = vec![0i8; k * n];
    let (scales, zeros) = run(w, k, n, block, asymmetric, block_fn(), bytemuck::cast_slice_mut(&mut values));
    BlockedI4 { k, n, block, scales, zero_points: asymmetric.then_some(zeros), values }
}

/// [`quantize`] with the codes packed as [`super::pack_int4`] packs them, written packed by the search when
/// `n` is even (no unpacked copy, no packing pass); returns (packed codes, scales, zero points when asymmetric).
pub(crate) fn quantize_packed(
    w: &[f32],
    k: usize,
    n: usize,
    block: usize,
    asymmetric: bool,
) -> (Vec<u8>, Vec<f32>, Option<Vec<u8>>) {
    if !n.is_multiple_of(2) {
        let q = quantize(w, k, n, block, asymmetric);
        return (q.packed(), q.scales, q.zero_points);
    }
    let mut packed = vec![0u8; k * n / 2];
    let (scales, zeros) = run(w, k, n, block, asymmetric, packed_block_fn(), &mut packed);
    (packed, scales, asymmetric.then_some(zeros))
}

/// Rows of a `[K, N]` weight per task of the per-channel int8 work.
const ROWS_PER_TASK: usize = 64;

/// [`super::column_abs_max`] on every core: column maxima of row bands, then of the bands (a maximum does
/// not depend on the order it is taken in).
pub(crate) fn column_abs_max(w: &[f32], n: usize) -> Vec<f32> {
    if n == 0 {
        return Vec::new();
    }
    let band = |rows: &[f32]| {
        let mut m = vec![0.0f32; n];
        for row in rows.chunks_exact(n) {
            for (mj, x) in m.iter_mut().zip(row) {
                *mj = max(x.abs(), *mj);
            }
        }
        m
    };
    let combine = |mut a: Vec<f32>, b: Vec<f32>| {
        for (x, y) in a.iter_mut().zip(b) {
            *x = max(y, *x);
        }
        a
    };
    w.par_chunks(ROWS_PER_TASK * n).map(band).reduce(|| vec![0.0f32; n], combine)
}

/// Per-column int8 codes of a row-major `[K, N]` weight (`N = scales.len()`), [`super::quantize_i8`] of each
/// element with its column's scale, on every core. The quotient is clamped to ±256 before rounding (codes saturate
/// at 127 / -128, so none changes) and rounded as [`round_code`] does.
pub(crate) fn quantize_columns_i8(w: &[f32], scales: &[f32]) -> Vec<i8> {
    let n = scales.len();
    let mut out = vec![0i8; w.len()];
    if n == 0 {
        return out;
    }
    out.par_chunks_mut(ROWS_PER_TASK * n).zip(w.par_chunks(ROWS_PER_TASK * n)).for_each(|(o, w)| {
        for (orow, wrow) in o.chunks_exact_mut(n).zip(w.chunks_exact(n)) {
            for ((q, &x), &s) in orow.iter_mut().zip(wrow).zip(scales) {
                const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23, as in `round_code`
                let r = (clamp(x / s, -256.0, 256.0) + MAGIC) - MAGIC;
                *q = clamp(r, -128.0, 127.0) as i8;
            }
        }
    });
    out
}

/// [`super::pack_int4`] on every core: chunks of an even length pack independently.
pub(crate) fn pack(values: &[i8]) -> Vec<u8> {
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0u8; values.len().div_ceil(2)];
    out.par_chunks_mut(CHUNK / 2).zip(values.par_chunks(CHUNK)).for_each(|(o, v)| {
        for (b, p) in o.iter_mut().zip(v.chunks(2)) {
            let lo = (p[0] as u8) & 0x0f;
            let hi = p.get(1).map_or(0, |&x| (x as u8) & 0x0f);
            *b = lo | (hi << 4);
        }
    });
    out
}

/// The first non-finite element of `xs`, if any, searched on every core.
pub(crate) fn first_non_finite(xs: &[f32]) -> Option<usize> {
    const CHUNK: usize = 1 << 16;
    if xs.par_chunks(CHUNK).all(|c| c.iter().all(|x| x.is_finite())) {
        return None;
    }
    xs.iter().position(|x| !x.is_finite())
}

#[cfg(test)]
#[path = "blocked_tests.rs"]
mod tests;
