//! The blocked INT4 quantization behind [`crate::quant::quantize_blocked_u4`] and
//! [`crate::quant::quantize_blocked_i4`], on every core and in vector registers, with the bytes of the scalar
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

use crate::quant::{BlockedI4, INT4_CLIP_RATIOS, INT4_QMAX, UINT4_QMAX};

/// Columns searched together: one AVX-512 register of f32 (two AVX2 ones).
pub(crate) const LANES: usize = 16;
/// The longest block ([`crate::quant::INT4_BLOCK_SIZES`]).
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
/// rows (`rows × n`), `codes` the same positions; `scales` / `zeros` are the block's row of `[blocks, N]`.
#[inline(always)]
fn block_body<const NATIVE: bool>(
    w: &[f32],
    n: usize,
    asymmetric: bool,
    codes: &mut [i8],
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
            let out = &mut codes[r * n + c0..r * n + c0 + width];
            for (l, c) in out.iter_mut().enumerate() {
                let q = round_code::<NATIVE>(t[l] / s[l]);
                *c = if asymmetric { clamp(q + z[l], 0.0, UINT4_QMAX) as i8 } else { clamp(q, -8.0, 7.0) as i8 };
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn block_avx512(w: &[f32], n: usize, asymmetric: bool, codes: &mut [i8], scales: &mut [f32], zeros: &mut [u8]) {
    block_body::<true>(w, n, asymmetric, codes, scales, zeros)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn block_avx2(w: &[f32], n: usize, asymmetric: bool, codes: &mut [i8], scales: &mut [f32], zeros: &mut [u8]) {
    block_body::<true>(w, n, asymmetric, codes, scales, zeros)
}

fn block_portable(w: &[f32], n: usize, asymmetric: bool, codes: &mut [i8], scales: &mut [f32], zeros: &mut [u8]) {
    block_body::<false>(w, n, asymmetric, codes, scales, zeros)
}

type BlockFn = fn(&[f32], usize, bool, &mut [i8], &mut [f32], &mut [u8]);

/// The widest build this CPU runs.
fn block_fn() -> BlockFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, the only feature `block_avx512` is compiled for.
            return |w, n, a, c, s, z| unsafe { block_avx512(w, n, a, c, s, z) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, the only feature `block_avx2` is compiled for.
            return |w, n, a, c, s, z| unsafe { block_avx2(w, n, a, c, s, z) };
        }
    }
    block_portable
}

/// Quantizes a checked (finite, `k · n` long) row-major `[K, N]` weight in blocks of `block` rows (at most 128).
pub(crate) fn quantize(w: &[f32], k: usize, n: usize, block: usize, asymmetric: bool) -> BlockedI4 {
    debug_assert!(block <= MAX_BLOCK && w.len() == k * n);
    let nb = k.div_ceil(block);
    let mut values = vec![0i8; k * n];
    let mut scales = vec![1.0f32; nb * n];
    let mut zeros = vec![0u8; nb * n];
    if n > 0 && k > 0 {
        let f = block_fn();
        values
            .par_chunks_mut(block * n)
            .zip(scales.par_chunks_mut(n))
            .zip(zeros.par_chunks_mut(n))
            .zip(w.par_chunks(block * n))
            .for_each(|(((codes, s), z), w)| f(w, n, asymmetric, codes, s, z));
    }
    BlockedI4 { k, n, block, scales, zero_points: asymmetric.then_some(zeros), values }
}

/// Rows of a `[K, N]` weight per task of the per-channel int8 work.
const ROWS_PER_TASK: usize = 64;

/// [`crate::quant::column_abs_max`] on every core: column maxima of row bands, then of the bands (a maximum does
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

/// Per-column int8 codes of a row-major `[K, N]` weight (`N = scales.len()`), [`crate::quant::quantize_i8`] of each
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

/// [`crate::quant::pack_int4`] on every core: chunks of an even length pack independently.
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
mod tests {
    use super::*;
    use crate::quant::{quantize_i4, quantize_u4, scale_from_amax};
    use proptest::prelude::*;

    /// The scalar definition, one column at a time (the code this module replaced).
    fn reference(w: &[f32], k: usize, n: usize, block: usize, asymmetric: bool) -> BlockedI4 {
        let nb = k.div_ceil(block);
        let mut scales = vec![1.0f32; nb * n];
        let mut zps = vec![0u8; nb * n];
        for b in 0..nb {
            for c in 0..n {
                let col: Vec<f32> = (b * block..((b + 1) * block).min(k)).map(|r| w[r * n + c]).collect();
                if asymmetric {
                    (scales[b * n + c], zps[b * n + c]) = best_u4_params(&col);
                } else {
                    scales[b * n + c] = best_i4_scale(&col);
                }
            }
        }
        let values = (0..k * n)
            .map(|i| {
                let j = (i / n / block) * n + i % n;
                if asymmetric {
                    quantize_u4(w[i], scales[j], zps[j]) as i8
                } else {
                    quantize_i4(w[i], scales[j])
                }
            })
            .collect();
        BlockedI4 { k, n, block, scales, zero_points: asymmetric.then_some(zps), values }
    }

    fn best_i4_scale(xs: &[f32]) -> f32 {
        let base = scale_from_amax(xs.iter().fold(0.0f32, |m, x| m.max(x.abs())), INT4_QMAX).unwrap();
        let err = |s: f32| xs.iter().map(|&x| (x - f32::from(quantize_i4(x, s)) * s).powi(2)).sum::<f32>();
        let mut best = (err(base), base);
        for r in &INT4_CLIP_RATIOS[1..] {
            let s = (base * r).max(f32::MIN_POSITIVE);
            let e = err(s);
            if e < best.0 {
                best = (e, s);
            }
        }
        best.1
    }

    fn best_u4_params(xs: &[f32]) -> (f32, u8) {
        let lo = xs.iter().fold(0.0f32, |m, &x| m.min(x));
        let hi = xs.iter().fold(0.0f32, |m, &x| m.max(x));
        if hi - lo == 0.0 {
            return (1.0, 0);
        }
        let params = |r: f32| {
            let s = ((hi - lo) * r / UINT4_QMAX).max(f32::MIN_POSITIVE);
            (s, (-lo * r / s).round_ties_even().clamp(0.0, UINT4_QMAX) as u8)
        };
        let err = |(s, zp): (f32, u8)| {
            xs.iter().map(|&x| (x - f32::from(quantize_u4(x, s, zp) as i8 - zp as i8) * s).powi(2)).sum::<f32>()
        };
        let first = params(1.0);
        let mut best = (err(first), first);
        for &r in &INT4_CLIP_RATIOS[1..] {
            let p = params(r);
            let e = err(p);
            if e < best.0 {
                best = (e, p);
            }
        }
        best.1
    }

    fn same(a: &BlockedI4, b: &BlockedI4) -> bool {
        let bits = |s: &[f32]| s.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        bits(&a.scales) == bits(&b.scales) && a.zero_points == b.zero_points && a.values == b.values
    }

    #[test]
    fn rounding_is_ties_to_even_over_the_clamped_range() {
        let mut v = -40.0f32;
        while v <= 40.0 {
            for x in [v, v + 0.5, v + 0.25, v - 1e-6, v + 1e-6] {
                let want = x.round_ties_even().clamp(-32.0, 32.0);
                assert_eq!(round_code::<false>(x), want, "{x}");
                assert_eq!(round_code::<true>(x).clamp(-32.0, 32.0), want, "{x}");
            }
            v += 1.0;
        }
        assert_eq!(round_code::<false>(f32::INFINITY), 32.0);
        assert_eq!(round_code::<false>(f32::NEG_INFINITY), -32.0);
        assert_eq!(round_code::<false>(1e30), 32.0);
    }

    #[test]
    fn every_build_gives_the_reference_bytes() {
        // Edge cases: all-zero columns, a column of one value, tiny magnitudes (scales at f32::MIN_POSITIVE), huge
        // ones (quotients far beyond the clamp), exact half-step values (rounding ties), N below one lane group.
        let (k, n) = (70, 37);
        let w: Vec<f32> = (0..k * n)
            .map(|i| match i % n {
                0 => 0.0,
                1 => 0.75,
                2 => 1e-38 * ((i % 7) as f32 - 3.0),
                3 => 3e37 * ((i % 5) as f32 - 2.0),
                4 => 0.5 * ((i / n % 9) as f32 - 4.0),
                _ => ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1,
            })
            .collect();
        let builds: Vec<(&str, BlockFn)> = {
            let mut b: Vec<(&str, BlockFn)> = vec![("portable", block_portable)];
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") {
                    b.push(("avx2", |w, n, a, c, s, z| unsafe { block_avx2(w, n, a, c, s, z) }));
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    b.push(("avx512f", |w, n, a, c, s, z| unsafe { block_avx512(w, n, a, c, s, z) }));
                }
            }
            b
        };
        for block in [32, 64, 128] {
            for asymmetric in [false, true] {
                let want = reference(&w, k, n, block, asymmetric);
                assert!(same(&quantize(&w, k, n, block, asymmetric), &want), "dispatch, block {block}");
                for (name, f) in &builds {
                    let nb = k.div_ceil(block);
                    let (mut codes, mut s, mut z) = (vec![0i8; k * n], vec![1.0f32; nb * n], vec![0u8; nb * n]);
                    for b in 0..nb {
                        let rows = b * block * n..((b + 1) * block).min(k) * n;
                        f(
                            &w[rows.clone()],
                            n,
                            asymmetric,
                            &mut codes[rows],
                            &mut s[b * n..][..n],
                            &mut z[b * n..][..n],
                        );
                    }
                    let got = BlockedI4 { k, n, block, scales: s, zero_points: asymmetric.then_some(z), values: codes };
                    assert!(same(&got, &want), "{name}, block {block}, asymmetric {asymmetric}");
                }
            }
        }
    }

    #[test]
    fn int8_per_channel_matches_the_scalar_definition() {
        let (k, n) = (300, 37);
        let w: Vec<f32> = (0..k * n)
            .map(|i| match i % n {
                0 => 0.0,
                1 => 1e-38 * ((i % 7) as f32 - 3.0),
                2 => 3e37 * ((i % 5) as f32 - 2.0),
                3 => 0.5 * ((i / n % 9) as f32 - 4.0) / 127.0 * 4.0,
                _ => ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1,
            })
            .collect();
        let want_amax: Vec<f32> = (0..n).map(|c| (0..k).fold(0.0f32, |m, r| m.max(w[r * n + c].abs()))).collect();
        let amax = column_abs_max(&w, n);
        assert_eq!(amax, want_amax);
        let scales: Vec<f32> = amax.iter().map(|&a| scale_from_amax(a, crate::quant::INT8_QMAX).unwrap()).collect();
        let want: Vec<i8> = w.iter().enumerate().map(|(i, &x)| crate::quant::quantize_i8(x, scales[i % n])).collect();
        assert_eq!(quantize_columns_i8(&w, &scales), want);
        // a scale far below the values: every code saturates
        assert_eq!(quantize_columns_i8(&[1e30, -1e30, 0.4, -0.6], &[1e-30, 1e-30]), vec![127, -128, 127, -128]);
    }

    proptest! {
        #[test]
        fn matches_the_scalar_definition((k, n, block, w) in (1usize..200, 1usize..40, 0usize..3).prop_flat_map(|(k, n, b)|
                (Just(k), Just(n), Just(crate::quant::INT4_BLOCK_SIZES[b]), prop::collection::vec(-2f32..3.0, k * n)))) {
            for asymmetric in [false, true] {
                prop_assert!(same(&quantize(&w, k, n, block, asymmetric), &reference(&w, k, n, block, asymmetric)));
            }
        }

        #[test]
        fn packing_matches(values in prop::collection::vec(-8i8..8, 0..300_000)) {
            prop_assert_eq!(pack(&values), crate::quant::pack_int4(&values));
        }
    }
}
