//! The AVX-512 (F, BW, VL, + FMA, F16C) inner loops of [`super::kernel`]: sixteen lanes per register and 32
//! registers, which let both decode-time loops read each cached key and value once for all the query rows of a
//! group (the AVX2 loops hold 16 lanes of each row at a time, these 64):
//!
//! - [`scores`]: four keys × up to six rows of accumulators (24 registers); each key vector is widened once
//!   (`vcvtph2ps` for a float16 cache) and multiplied into every row, and the four keys' sums of a row are reduced
//!   together by a transposing shuffle tree (13 instructions for four scores instead of four horizontal sums).
//! - [`values`]: up to six rows × 64 lanes of output held in registers across the keys; each value vector is
//!   widened once and accumulated into every row.
//!
//! A head size that is not a multiple of 16 takes a masked last vector (no scalar tails). Both loops prefetch the
//! keys and values [`PREFETCH_KEYS`] positions ahead.
//!
//! At long contexts a decode step's attention is bound by memory bandwidth, not by these loops: at the 1.5B shape
//! and 4,000 positions a float16 cache streams 115 MB per step, and the best steps of either form run at the
//! machine's read bandwidth; what AVX-512 gains there is mostly under load (the `attention_decode_timing` test in
//! `kernel_tests.rs` times every form). Cached positions that fit the caches gain more (128 positions: ~1.5×).

use std::arch::x86_64::*;
use std::ops::Range;
use std::sync::atomic::Ordering;

use super::kernel::{prefetch, CacheElem, PREFETCH_KEYS};

/// Lanes of one register of float32.
pub const W: usize = 16;
/// Query rows scored (and summed) together: 4 keys × 6 rows = 24 accumulators, plus 4 key vectors and a query
/// vector, fit the 32 vector registers.
pub const MAX_ROWS: usize = 6;
/// Keys scored together.
const KEYS: usize = 4;
/// Output lanes of a row held in registers by [`values`] (4 vectors).
const SPAN: usize = 4 * W;

/// Whether this CPU runs these loops.
pub fn available() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

/// The lanes `< n` of a vector (`n ≤ W`).
#[inline(always)]
fn mask(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

/// The sums of four vectors, in order: a transposing reduction (pairs of lanes, then of pairs, then the four
/// 128-bit quarters).
#[inline(always)]
unsafe fn reduce4(a: &[__m512; KEYS]) -> __m128 {
    // SAFETY: the callers run with AVX-512F enabled.
    unsafe {
        // Per 128-bit quarter: [a0+a2, b0+b2, a1+a3, b1+b3] and the same of c, d.
        let ab = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
        let cd = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
        // Per quarter: [Σa, Σb, Σc, Σd] of that quarter's lanes.
        let (ab, cd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
        let x =
            _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)), _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)));
        // The four quarters summed.
        let x = _mm512_add_ps(x, _mm512_shuffle_f32x4::<0b01_00_11_10>(x, x));
        _mm_add_ps(_mm512_castps512_ps128(x), _mm512_extractf32x4_ps::<1>(x))
    }
}

/// `out[j · stride + t] = q_j · key_t` for rows `j < n` (`n ≤ MAX_ROWS`, row `j` at `q + j · hd`) and keys `t`
/// in `ts` (key `t` at `k + t · hd`), four keys at a time.
///
/// # Safety
/// [`available`]; the pointers cover those rows, keys and outputs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn scores<C: CacheElem>(
    q: *const f32,
    n: usize,
    hd: usize,
    k: *const C,
    ts: Range<usize>,
    out: *mut f32,
    stride: usize,
) {
    // SAFETY (whole body): the caller's guarantee.
    unsafe {
        match n {
            1 => scores_n::<1, C>(q, hd, k, ts, out, stride),
            2 => scores_n::<2, C>(q, hd, k, ts, out, stride),
            3 => scores_n::<3, C>(q, hd, k, ts, out, stride),
            4 => scores_n::<4, C>(q, hd, k, ts, out, stride),
            5 => scores_n::<5, C>(q, hd, k, ts, out, stride),
            _ => scores_n::<6, C>(q, hd, k, ts, out, stride),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn scores_n<const R: usize, C: CacheElem>(
    q: *const f32,
    hd: usize,
    k: *const C,
    ts: Range<usize>,
    out: *mut f32,
    stride: usize,
) {
    let full = hd / W * W;
    let tail = mask(hd - full);
    let ahead = PREFETCH_KEYS.load(Ordering::Relaxed);
    let mut t = ts.start;
    // SAFETY (both loops): the caller's guarantee; full vectors end at `full ≤ hd`, the masked one reads `hd`.
    unsafe {
        while t + KEYS <= ts.end {
            if ahead > 0 {
                prefetch(k.wrapping_add((t + ahead) * hd), KEYS * hd);
            }
            let kp: [*const C; KEYS] = std::array::from_fn(|j| k.add((t + j) * hd));
            let mut acc = [[_mm512_setzero_ps(); KEYS]; R];
            let mut c = 0;
            while c < full {
                let kv: [__m512; KEYS] = std::array::from_fn(|j| C::load16(kp[j].add(c)));
                for (r, a) in acc.iter_mut().enumerate() {
                    let qv = _mm512_loadu_ps(q.add(r * hd + c));
                    for j in 0..KEYS {
                        a[j] = _mm512_fmadd_ps(qv, kv[j], a[j]);
                    }
                }
                c += W;
            }
            if tail != 0 {
                let kv: [__m512; KEYS] = std::array::from_fn(|j| C::load16_masked(kp[j].add(c), tail));
                for (r, a) in acc.iter_mut().enumerate() {
                    let qv = _mm512_maskz_loadu_ps(tail, q.add(r * hd + c));
                    for j in 0..KEYS {
                        a[j] = _mm512_fmadd_ps(qv, kv[j], a[j]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                _mm_storeu_ps(out.add(r * stride + t), reduce4(a));
            }
            t += KEYS;
        }
        while t < ts.end {
            let kp = k.add(t * hd);
            let mut acc = [_mm512_setzero_ps(); R];
            let mut c = 0;
            while c < full {
                let kv = C::load16(kp.add(c));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(r * hd + c)), kv, *a);
                }
                c += W;
            }
            if tail != 0 {
                let kv = C::load16_masked(kp.add(c), tail);
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, q.add(r * hd + c)), kv, *a);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                *out.add(r * stride + t) = _mm512_reduce_add_ps(*a);
            }
            t += 1;
        }
    }
}

/// `acc_j += Σ_t p[j · p_stride + t] · value_t` for rows `j < n` (`n ≤ MAX_ROWS`, row `j` at `acc + j · hd`)
/// over keys `ts` (value `t` at `v + t · hd`): each value vector is loaded and widened once for all the rows.
///
/// # Safety
/// [`available`]; the pointers cover those rows, probabilities and values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn values<C: CacheElem>(
    p: *const f32,
    p_stride: usize,
    n: usize,
    acc: *mut f32,
    hd: usize,
    v: *const C,
    ts: Range<usize>,
) {
    // SAFETY (whole body): the caller's guarantee.
    unsafe {
        match n {
            1 => values_n::<1, C>(p, p_stride, acc, hd, v, ts),
            2 => values_n::<2, C>(p, p_stride, acc, hd, v, ts),
            3 => values_n::<3, C>(p, p_stride, acc, hd, v, ts),
            4 => values_n::<4, C>(p, p_stride, acc, hd, v, ts),
            5 => values_n::<5, C>(p, p_stride, acc, hd, v, ts),
            _ => values_n::<6, C>(p, p_stride, acc, hd, v, ts),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn values_n<const R: usize, C: CacheElem>(
    p: *const f32,
    p_stride: usize,
    acc: *mut f32,
    hd: usize,
    v: *const C,
    ts: Range<usize>,
) {
    let ahead = PREFETCH_KEYS.load(Ordering::Relaxed);
    let mut c = 0;
    // SAFETY (whole body): the caller's guarantee; `c + SPAN ≤ hd` in the first loop, the second masks at `hd`.
    unsafe {
        while c + SPAN <= hd {
            let mut a = [[_mm512_setzero_ps(); 4]; R];
            for (r, x) in a.iter_mut().enumerate() {
                for (i, y) in x.iter_mut().enumerate() {
                    *y = _mm512_loadu_ps(acc.add(r * hd + c + i * W));
                }
            }
            for t in ts.clone() {
                if c == 0 && ahead > 0 {
                    prefetch(v.wrapping_add((t + ahead) * hd), hd);
                }
                let row = v.add(t * hd + c);
                let x: [__m512; 4] = std::array::from_fn(|i| C::load16(row.add(i * W)));
                for (r, y) in a.iter_mut().enumerate() {
                    let pb = _mm512_set1_ps(*p.add(r * p_stride + t));
                    for i in 0..4 {
                        y[i] = _mm512_fmadd_ps(pb, x[i], y[i]);
                    }
                }
            }
            for (r, x) in a.iter().enumerate() {
                for (i, y) in x.iter().enumerate() {
                    _mm512_storeu_ps(acc.add(r * hd + c + i * W), *y);
                }
            }
            c += SPAN;
        }
        while c < hd {
            let m = mask((hd - c).min(W));
            let mut a = [_mm512_setzero_ps(); R];
            for (r, y) in a.iter_mut().enumerate() {
                *y = _mm512_maskz_loadu_ps(m, acc.add(r * hd + c));
            }
            for t in ts.clone() {
                let x = C::load16_masked(v.add(t * hd + c), m);
                for (r, y) in a.iter_mut().enumerate() {
                    *y = _mm512_fmadd_ps(_mm512_set1_ps(*p.add(r * p_stride + t)), x, *y);
                }
            }
            for (r, y) in a.iter().enumerate() {
                _mm512_mask_storeu_ps(acc.add(r * hd + c), m, *y);
            }
            c += W;
        }
    }
}
