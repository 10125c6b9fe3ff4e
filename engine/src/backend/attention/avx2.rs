//! The AVX2 + FMA (+ F16C) inner loops of [`super::kernel`], blocked over registers: LLVM vectorizes the portable
//! loops across the four keys instead of along the head (shuffles that cost more than the arithmetic), and keeps
//! accumulators in memory. Cached keys and values are read through [`CacheElem::load8`]: float32 as they are,
//! float16 widened by `vcvtph2ps` as they are loaded (half the bytes streamed from memory per step).

use std::arch::x86_64::*;
use std::ops::Range;

use std::sync::atomic::Ordering;

use super::kernel::{prefetch, CacheElem, L, PREFETCH_KEYS};

/// Query rows scored together: 2 keys × 6 rows = 12 accumulators, plus 2 key vectors and a query vector, fit
/// the 16 vector registers.
pub const MAX_ROWS: usize = 6;

/// Whether this CPU runs these loops.
pub fn available() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: the callers run with AVX enabled.
    unsafe {
        let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)))
    }
}

/// `out[j · stride + t] = q_j · key_t` for rows `j < n` (`n ≤ MAX_ROWS`, row `j` at `q + j · hd`) and keys `t`
/// in `ts` (key `t` at `k + t · hd`), two keys at a time.
///
/// # Safety
/// [`available`]; the pointers cover those rows, keys and outputs.
#[target_feature(enable = "avx2,fma,f16c")]
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

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_n<const R: usize, C: CacheElem>(
    q: *const f32,
    hd: usize,
    k: *const C,
    ts: Range<usize>,
    out: *mut f32,
    stride: usize,
) {
    let n = hd / L * L;
    let ahead = PREFETCH_KEYS.load(Ordering::Relaxed);
    let tail = |r: usize, key: *const C| -> f32 {
        // SAFETY: the caller's guarantee covers `hd` values of each row and key.
        (n..hd).map(|i| unsafe { *q.add(r * hd + i) * (*key.add(i)).to_f32() }).sum()
    };
    let mut t = ts.start;
    // SAFETY (both loops): the caller's guarantee.
    unsafe {
        while t + 2 <= ts.end {
            let (ka, kb) = (k.add(t * hd), k.add((t + 1) * hd));
            if ahead > 0 {
                prefetch(k.wrapping_add((t + ahead) * hd), 2 * hd);
            }
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            let mut c = 0;
            while c < n {
                let (x, y) = (C::load8(ka.add(c)), C::load8(kb.add(c)));
                for (r, a) in acc.iter_mut().enumerate() {
                    let qv = _mm256_loadu_ps(q.add(r * hd + c));
                    a[0] = _mm256_fmadd_ps(qv, x, a[0]);
                    a[1] = _mm256_fmadd_ps(qv, y, a[1]);
                }
                c += L;
            }
            for (r, a) in acc.iter().enumerate() {
                *out.add(r * stride + t) = hsum(a[0]) + tail(r, ka);
                *out.add(r * stride + t + 1) = hsum(a[1]) + tail(r, kb);
            }
            t += 2;
        }
        if t < ts.end {
            let ka = k.add(t * hd);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut c = 0;
            while c < n {
                let x = C::load8(ka.add(c));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(r * hd + c)), x, *a);
                }
                c += L;
            }
            for (r, a) in acc.iter().enumerate() {
                *out.add(r * stride + t) = hsum(*a) + tail(r, ka);
            }
        }
    }
}

/// `acc_j += Σ_t p[j · p_stride + t] · value_t` for rows `j < n` (`n ≤ MAX_ROWS`, row `j` at `acc + j · hd`) over
/// keys `ts` (value `t` at `v + t · hd`): 16 lanes of every row held in registers (12 accumulators) across the keys,
/// so each value vector is loaded and widened once for all the rows of a group instead of once per row.
///
/// # Safety
/// [`available`]; the pointers cover those rows, probabilities and values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn values_rows<C: CacheElem>(
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
            1 => values_rows_n::<1, C>(p, p_stride, acc, hd, v, ts),
            2 => values_rows_n::<2, C>(p, p_stride, acc, hd, v, ts),
            3 => values_rows_n::<3, C>(p, p_stride, acc, hd, v, ts),
            4 => values_rows_n::<4, C>(p, p_stride, acc, hd, v, ts),
            5 => values_rows_n::<5, C>(p, p_stride, acc, hd, v, ts),
            _ => values_rows_n::<6, C>(p, p_stride, acc, hd, v, ts),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn values_rows_n<const R: usize, C: CacheElem>(
    p: *const f32,
    p_stride: usize,
    acc: *mut f32,
    hd: usize,
    v: *const C,
    ts: Range<usize>,
) {
    const SPAN: usize = 2 * L;
    let ahead = PREFETCH_KEYS.load(Ordering::Relaxed);
    let mut c = 0;
    // SAFETY (whole body): the caller's guarantee; `c + SPAN ≤ hd` in the first loop, `c + L ≤ hd` in the second,
    // and the scalar tail stays below `hd`.
    unsafe {
        while c + SPAN <= hd {
            let mut a = [[_mm256_setzero_ps(); 2]; R];
            for (r, x) in a.iter_mut().enumerate() {
                x[0] = _mm256_loadu_ps(acc.add(r * hd + c));
                x[1] = _mm256_loadu_ps(acc.add(r * hd + c + L));
            }
            for t in ts.clone() {
                let row = v.add(t * hd + c);
                if c == 0 && ahead > 0 {
                    prefetch(v.wrapping_add((t + ahead) * hd), hd);
                }
                let (x0, x1) = (C::load8(row), C::load8(row.add(L)));
                for (r, y) in a.iter_mut().enumerate() {
                    let pb = _mm256_broadcast_ss(&*p.add(r * p_stride + t));
                    y[0] = _mm256_fmadd_ps(pb, x0, y[0]);
                    y[1] = _mm256_fmadd_ps(pb, x1, y[1]);
                }
            }
            for (r, x) in a.iter().enumerate() {
                _mm256_storeu_ps(acc.add(r * hd + c), x[0]);
                _mm256_storeu_ps(acc.add(r * hd + c + L), x[1]);
            }
            c += SPAN;
        }
        while c + L <= hd {
            let mut a = [_mm256_setzero_ps(); R];
            for (r, y) in a.iter_mut().enumerate() {
                *y = _mm256_loadu_ps(acc.add(r * hd + c));
            }
            for t in ts.clone() {
                let x = C::load8(v.add(t * hd + c));
                for (r, y) in a.iter_mut().enumerate() {
                    *y = _mm256_fmadd_ps(_mm256_broadcast_ss(&*p.add(r * p_stride + t)), x, *y);
                }
            }
            for (r, y) in a.iter().enumerate() {
                _mm256_storeu_ps(acc.add(r * hd + c), *y);
            }
            c += L;
        }
        for r in 0..R {
            for i in c..hd {
                for t in ts.clone() {
                    let a = acc.add(r * hd + i);
                    *a = (*p.add(r * p_stride + t)).mul_add((*v.add(t * hd + i)).to_f32(), *a);
                }
            }
        }
    }
}
