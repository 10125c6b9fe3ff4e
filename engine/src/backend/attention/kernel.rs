//! The arithmetic of r1's grouped-query attention: rotary, the cache append and attention for one step, over raw
//! float32 buffers. [`super`] wraps it as an ONNX Runtime operator; the tests below check it against a plain
//! reference.
//!
//! Why not ONNX Runtime's own kernel: its CPU `GroupQueryAttention` computes each *query* head with its own pair of
//! matrix products, so each key/value head's cache is packed and read once per query head of its group (6× for the
//! 1.5B shape) on every decode step. Here one task takes one key/value head of one row and all the query heads of
//! its group together: each cached key and value is read once per step, from a small block that stays in L1 while
//! every query row of the task uses it.
//!
//! Layouts (as `com.microsoft.GroupQueryAttention`): `q [B, S, H·d]`, `k`/`v [B, S, Hkv·d]` (new positions, before
//! rotary), caches `[B, Hkv, capacity, d]` (keys after rotary), rotary tables `[positions, d/2]`
//! (non-interleaved halves), output `[B, S, H·d]`. Activations are float32; the caches are float32 or float16
//! ([`CacheElem`]): a float16 cache halves the bytes a decode step streams, which is what a long context's step
//! costs. Arithmetic is float32 either way (keys and values are widened as they are loaded).

pub use super::isa::{Isa, ISA_VAR};
#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};
use crate::kv::region::PoolElem;

/// An element type of the caches: float32, or float16 (stored rounded to nearest, widened exactly).
pub trait CacheElem: PoolElem {
    /// Eight values from `p` as one register of float32.
    ///
    /// # Safety
    /// The CPU has AVX and F16C; `p` covers eight values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;

    /// Sixteen values from `p` as one register of float32.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `p` covers sixteen values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;

    /// The values of `p` in the lanes of `mask` (zero in the others), as one register of float32.
    ///
    /// # Safety
    /// The CPU has AVX-512F, BW and VL; `p` covers the lanes of `mask`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_masked(p: *const Self, mask: std::arch::x86_64::__mmask16) -> std::arch::x86_64::__m512;
}

impl CacheElem for f32 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's guarantee.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's guarantee.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_masked(p: *const f32, mask: std::arch::x86_64::__mmask16) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's guarantee (masked-off lanes are not read).
        unsafe { std::arch::x86_64::_mm512_maskz_loadu_ps(mask, p) }
    }
}

impl CacheElem for half::f16 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::{_mm256_cvtph_ps, _mm_loadu_si128};
        // SAFETY: the caller's guarantee.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const half::f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::{_mm256_loadu_si256, _mm512_cvtph_ps};
        // SAFETY: the caller's guarantee.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_masked(p: *const half::f16, mask: std::arch::x86_64::__mmask16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::{_mm256_maskz_loadu_epi16, _mm512_cvtph_ps};
        // SAFETY: the caller's guarantee (masked-off lanes are not read).
        unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.cast())) }
    }
}

/// Query positions one attention task takes (times the group's query heads = its rows).
pub const QUERY_TILE: usize = 16;
/// Keys scored (and values summed) per block: a block of keys and values stays in L1 (2 × 32 × 128 × 4 B = 32 KiB).
const KEY_BLOCK: usize = 32;

/// Sizes of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub batch: usize,
    /// New positions per row (`S`).
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions of the past buffers.
    pub past_capacity: usize,
    /// Positions of the present buffers (≥ `past_capacity`).
    pub present_capacity: usize,
    /// Rows of the rotary tables.
    pub rotary_positions: usize,
}

impl Dims {
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// One row's split of its positions: `past` cached before the step, `new` fed by it (`new ≤ S`; the rest of the
/// row's `S` inputs are padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSpan {
    pub past: usize,
    pub new: usize,
}

impl RowSpan {
    /// The split ONNX Runtime's kernel uses, from `seqlens_k + 1` (the row's total length): a row shorter than `S`
    /// is a right-padded first prompt.
    pub fn of(total: usize, seq: usize) -> RowSpan {
        if total >= seq {
            RowSpan { past: total - seq, new: seq }
        } else {
            RowSpan { past: 0, new: total }
        }
    }
}

/// The buffers of one call, caches of element `C`. Past and present may be the same memory (the KV pool bound in
/// place); nothing else may overlap.
#[derive(Debug, Clone, Copy)]
pub struct Buffers<C> {
    pub q: *const f32,
    pub k: *const f32,
    pub v: *const f32,
    pub past_key: *const C,
    pub past_value: *const C,
    pub present_key: *mut C,
    pub present_value: *mut C,
    pub cos: *const f32,
    pub sin: *const f32,
    pub out: *mut f32,
}

// SAFETY: the pointers are only dereferenced by `append` and `attend`, whose callers hand each task a disjoint part
// of every buffer it writes (see their docs).
unsafe impl<C> Send for Buffers<C> {}
// SAFETY: as above.
unsafe impl<C> Sync for Buffers<C> {}

/// Rotates `x` (one head, `d` values) by the rotary angles of table row `pos`, into `out`.
#[inline(always)]
fn rotate<C: PoolElem>(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [C]) {
    let half = cos.len();
    for j in 0..half {
        let (a, b) = (x[j], x[j + half]);
        out[j] = C::from_f32(a * cos[j] - b * sin[j]);
        out[j + half] = C::from_f32(b * cos[j] + a * sin[j]);
    }
}

/// Phase one for row `b`, key/value head `g`: copies the row's past into the present when they are not the same
/// memory, then writes the step's new keys (rotated) and values after it.
///
/// # Safety
/// Every buffer holds `dims`' sizes; `positions[s]` < `dims.rotary_positions` and `span.past + span.new ≤
/// dims.present_capacity`; no other task writes head `g` of row `b` of the presents during the call.
pub unsafe fn append<C: CacheElem>(d: &Dims, buf: &Buffers<C>, b: usize, g: usize, span: RowSpan, positions: &[usize]) {
    let hd = d.head_dim;
    let half = hd / 2;
    let past_base = (b * d.kv_heads + g) * d.past_capacity * hd;
    let present_base = (b * d.kv_heads + g) * d.present_capacity * hd;
    // SAFETY: ranges within the buffers by the caller's guarantee; past and present are either the same memory
    // (nothing to copy) or disjoint.
    unsafe {
        if !std::ptr::eq(buf.past_key, buf.present_key) && span.past > 0 {
            std::ptr::copy_nonoverlapping(
                buf.past_key.add(past_base),
                buf.present_key.add(present_base),
                span.past * hd,
            );
            std::ptr::copy_nonoverlapping(
                buf.past_value.add(past_base),
                buf.present_value.add(present_base),
                span.past * hd,
            );
        }
        for (s, &pos) in positions.iter().enumerate().take(span.new) {
            let src = ((b * d.seq + s) * d.kv_heads + g) * hd;
            let dst = present_base + (span.past + s) * hd;
            let key = std::slice::from_raw_parts(buf.k.add(src), hd);
            let cos = std::slice::from_raw_parts(buf.cos.add(pos * half), half);
            let sin = std::slice::from_raw_parts(buf.sin.add(pos * half), half);
            rotate(key, cos, sin, std::slice::from_raw_parts_mut(buf.present_key.add(dst), hd));
            let value = std::slice::from_raw_parts(buf.v.add(src), hd);
            let cached = std::slice::from_raw_parts_mut(buf.present_value.add(dst), hd);
            for (c, &x) in cached.iter_mut().zip(value) {
                *c = C::from_f32(x);
            }
        }
    }
}

/// One attention task: row `b`, key/value head `g`, query positions `tile` (a range of at most [`QUERY_TILE`]).
#[derive(Debug, Clone)]
pub struct Task<'a> {
    pub b: usize,
    pub g: usize,
    pub span: RowSpan,
    pub tile: std::ops::Range<usize>,
    /// The row's rotary position of each of its `S` inputs.
    pub positions: &'a [usize],
    pub scale: f32,
}

/// Phase two for one [`Task`]: rotates the group's queries, scores them against the row's keys (causal: query `s`
/// sees positions `..= past + s`), softmaxes, sums the values and writes the output rows; padding queries get zeros.
/// Runs the loops of [`Isa::selected`].
///
/// # Safety
/// As [`append`], after `append` ran for `(b, g)`; no other task writes the output rows of `(b, tile)` for the
/// heads of group `g`.
pub unsafe fn attend<C: CacheElem>(d: &Dims, buf: &Buffers<C>, task: &Task) {
    // SAFETY: the caller's guarantee.
    unsafe { attend_with(Isa::selected(), d, buf, task) }
}

/// [`attend`] with the loops of `isa` (or the best form below it that this CPU has; the tests run each form).
///
/// # Safety
/// As [`attend`].
unsafe fn attend_with<C: CacheElem>(isa: Isa, d: &Dims, buf: &Buffers<C>, task: &Task) {
    match isa.or_below() {
        // SAFETY (each arm): the CPU has the form's features; the rest is the caller's guarantee.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { attend_avx512(d, buf, task) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { attend_avx2(d, buf, task) },
        _ => unsafe { attend_body::<PORTABLE, C>(d, buf, task) },
    }
}

/// Values of `attend_body`'s `ISA` parameter.
const PORTABLE: u8 = 0;
#[cfg(target_arch = "x86_64")]
const AVX2: u8 = 1;
#[cfg(target_arch = "x86_64")]
const AVX512: u8 = 2;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<C: CacheElem>(d: &Dims, buf: &Buffers<C>, task: &Task) {
    // SAFETY: the caller's guarantee.
    unsafe { attend_body::<AVX2, C>(d, buf, task) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn attend_avx512<C: CacheElem>(d: &Dims, buf: &Buffers<C>, task: &Task) {
    // SAFETY: the caller's guarantee.
    unsafe { attend_body::<AVX512, C>(d, buf, task) }
}

/// Keys ahead of the SIMD loops that they prefetch (0: none): 16 (4 KiB of a float16 head, 8 of a float32 one)
/// measured best of 0 / 16 / 32 / 64 by `attention_decode_timing`, by a little (the loops are bound by memory
/// bandwidth at long contexts, and prefetching lets memory stream while the arithmetic runs); a variable for that
/// test.
#[cfg(target_arch = "x86_64")]
pub(super) static PREFETCH_KEYS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(16);

/// Asks for the cache lines of `n` elements from `p` into L1 (`p` may be past the end of its buffer: a prefetch
/// does not fault).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn prefetch<C>(p: *const C, n: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let (p, bytes) = (p.cast::<i8>(), n * size_of::<C>());
    let mut o = 0;
    while o < bytes {
        // SAFETY: a prefetch reads nothing the program sees and does not fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(o)) };
        o += 64;
    }
}

/// `a · b + c`, fused where the code is compiled for FMA.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Lanes of the explicit vectors below (one AVX2 register of float32).
pub(super) const L: usize = 8;

/// `xs` as whole vectors of [`L`] (the tail is handled by the callers).
#[inline(always)]
fn vectors<E>(xs: &[E]) -> impl Iterator<Item = &[E; L]> {
    xs.chunks_exact(L).map(|c| c.try_into().expect("chunks_exact yields L values"))
}

/// Dot products of `q` with four keys at once (each query vector is loaded once for the four).
#[inline(always)]
fn dot4<const FMA: bool, C: PoolElem>(q: &[f32], k: [&[C]; 4]) -> [f32; 4] {
    let mut acc = [[0f32; L]; 4];
    let keys = vectors(k[0]).zip(vectors(k[1])).zip(vectors(k[2])).zip(vectors(k[3]));
    for (qv, (((k0, k1), k2), k3)) in vectors(q).zip(keys) {
        for i in 0..L {
            acc[0][i] = madd::<FMA>(qv[i], k0[i].to_f32(), acc[0][i]);
            acc[1][i] = madd::<FMA>(qv[i], k1[i].to_f32(), acc[1][i]);
            acc[2][i] = madd::<FMA>(qv[i], k2[i].to_f32(), acc[2][i]);
            acc[3][i] = madd::<FMA>(qv[i], k3[i].to_f32(), acc[3][i]);
        }
    }
    let n = q.len() / L * L;
    let mut out = [0f32; 4];
    for j in 0..4 {
        let mut s = acc[j].iter().sum::<f32>();
        for (a, b) in q[n..].iter().zip(&k[j][n..]) {
            s = madd::<FMA>(*a, b.to_f32(), s);
        }
        out[j] = s;
    }
    out
}

/// `acc += Σ p[j] · v[j]` over four values at once (the accumulator is loaded and stored once for the four).
#[inline(always)]
fn axpy4<const FMA: bool, C: PoolElem>(acc: &mut [f32], p: [f32; 4], v: [&[C]; 4]) {
    let n = acc.len() / L * L;
    let values = vectors(v[0]).zip(vectors(v[1])).zip(vectors(v[2])).zip(vectors(v[3]));
    for (a, (((v0, v1), v2), v3)) in acc[..n].chunks_exact_mut(L).zip(values) {
        for i in 0..L {
            let mut x = a[i];
            x = madd::<FMA>(p[0], v0[i].to_f32(), x);
            x = madd::<FMA>(p[1], v1[i].to_f32(), x);
            x = madd::<FMA>(p[2], v2[i].to_f32(), x);
            x = madd::<FMA>(p[3], v3[i].to_f32(), x);
            a[i] = x;
        }
    }
    for i in n..acc.len() {
        let mut x = acc[i];
        for j in 0..4 {
            x = madd::<FMA>(p[j], v[j][i].to_f32(), x);
        }
        acc[i] = x;
    }
}

/// `e^x` for `x ≤ 0` (softmax inputs after the row maximum is subtracted), branch-free so that a loop of it
/// vectorizes: Cody–Waite range reduction and Cephes' degree-6 polynomial, within 2 ulp of `f32::exp`.
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    let x = x.max(-87.0);
    // n = round(x / ln 2) by the 1.5 · 2^23 trick (no libm call, vectorizes without SSE4.1).
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Reduces `xs` with `f` over eight interleaved lanes (so that the loop vectorizes), then across the lanes.
#[inline(always)]
pub(super) fn lanes(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] = f(acc[i], c[i]);
        }
    }
    let mut r = chunks.remainder().iter().fold(init, |a, &x| f(a, x));
    for a in acc {
        r = f(r, a);
    }
    r
}

#[inline(always)]
unsafe fn attend_body<const ISA: u8, C: CacheElem>(d: &Dims, buf: &Buffers<C>, task: &Task) {
    // The plain loops below run in the portable form only (the SIMD forms `continue` before them).
    const { assert!(ISA <= 2) };
    let Task { b, g, span, ref tile, positions, scale } = *task;
    let (hd, group) = (d.head_dim, d.group());
    let half = hd / 2;
    let row_width = d.heads * hd;
    // Query rows of this task: (position s, head h of the group), position-major.
    let real = tile.start..tile.end.min(span.new).max(tile.start);
    let rows = real.len() * group;
    let keys = span.past + real.end; // the last real query sees this many positions
    let mut q = vec![0f32; rows * hd];
    let mut scores = vec![0f32; rows * keys];
    let mut acc = vec![0f32; rows * hd];
    // SAFETY (whole body): the caller's guarantee bounds every range read and written below.
    unsafe {
        for (i, s) in real.clone().enumerate() {
            let pos = positions[s];
            let cos = std::slice::from_raw_parts(buf.cos.add(pos * half), half);
            let sin = std::slice::from_raw_parts(buf.sin.add(pos * half), half);
            for h in 0..group {
                let src = (b * d.seq + s) * row_width + (g * group + h) * hd;
                let x = std::slice::from_raw_parts(buf.q.add(src), hd);
                let r = (i * group + h) * hd;
                rotate(x, cos, sin, &mut q[r..r + hd]);
                for v in &mut q[r..r + hd] {
                    *v *= scale;
                }
            }
        }
        let base = (b * d.kv_heads + g) * d.present_capacity * hd;
        let kp = buf.present_key.cast_const().add(base);
        let vp = buf.present_value.cast_const().add(base);
        let key = |t: usize| std::slice::from_raw_parts(kp.add(t * hd), hd);
        let value = |t: usize| std::slice::from_raw_parts(vp.add(t * hd), hd);
        // Row r (query i = r / group) sees keys 0 .. limit(r).
        let limit = |r: usize| span.past + real.start + r / group + 1;
        // Scores, a block of keys at a time. Rows of one query position (its group of heads) share their causal
        // limit, so they are scored together: each key vector is loaded once for all of them.
        let mut t0 = 0;
        while t0 < keys {
            let t1 = (t0 + KEY_BLOCK).min(keys);
            for r0 in (0..rows).step_by(group) {
                let end = t1.min(limit(r0));
                if end <= t0 {
                    continue;
                }
                #[cfg(target_arch = "x86_64")]
                if ISA == AVX512 {
                    for (j, r) in (r0..r0 + group).step_by(avx512::MAX_ROWS).enumerate() {
                        let n = (group - j * avx512::MAX_ROWS).min(avx512::MAX_ROWS);
                        let out = scores.as_mut_ptr().add(r * keys);
                        avx512::scores::<C>(q.as_ptr().add(r * hd), n, hd, kp, t0..end, out, keys);
                    }
                    continue;
                }
                #[cfg(target_arch = "x86_64")]
                if ISA == AVX2 {
                    for (j, r) in (r0..r0 + group).step_by(avx2::MAX_ROWS).enumerate() {
                        let n = (group - j * avx2::MAX_ROWS).min(avx2::MAX_ROWS);
                        let out = scores.as_mut_ptr().add(r * keys);
                        avx2::scores::<C>(q.as_ptr().add(r * hd), n, hd, kp, t0..end, out, keys);
                    }
                    continue;
                }
                for r in r0..r0 + group {
                    let qr = &q[r * hd..(r + 1) * hd];
                    let sr = &mut scores[r * keys..(r + 1) * keys];
                    let mut t = t0;
                    while t + 4 <= end {
                        let s4 = dot4::<false, C>(qr, [key(t), key(t + 1), key(t + 2), key(t + 3)]);
                        sr[t..t + 4].copy_from_slice(&s4);
                        t += 4;
                    }
                    while t < end {
                        sr[t] = qr.iter().zip(key(t)).fold(0.0, |a, (x, y)| madd::<false>(*x, y.to_f32(), a));
                        t += 1;
                    }
                }
            }
            t0 = t1;
        }
        // Softmax over each row's visible keys (masked keys get probability 0).
        for r in 0..rows {
            let n = limit(r);
            let sr = &mut scores[r * keys..r * keys + n];
            let max = lanes(sr, f32::NEG_INFINITY, f32::max);
            for x in sr.iter_mut() {
                *x = exp_neg(*x - max);
            }
            let inv = 1.0 / lanes(sr, 0.0, |a, b| a + b);
            for x in sr.iter_mut() {
                *x *= inv;
            }
        }
        // Values, a block at a time so that the block's values are reused by every row from L1.
        let mut t0 = 0;
        while t0 < keys {
            let t1 = (t0 + KEY_BLOCK).min(keys);
            // Rows of one query position share their causal limit: the SIMD loops sum each value into all of
            // them at once.
            #[cfg(target_arch = "x86_64")]
            if ISA == AVX512 || ISA == AVX2 {
                let max_rows = if ISA == AVX512 { avx512::MAX_ROWS } else { avx2::MAX_ROWS };
                for r0 in (0..rows).step_by(group) {
                    let end = t1.min(limit(r0));
                    if end <= t0 {
                        continue;
                    }
                    for (j, r) in (r0..r0 + group).step_by(max_rows).enumerate() {
                        let n = (group - j * max_rows).min(max_rows);
                        let (p, a) = (scores.as_ptr().add(r * keys), acc.as_mut_ptr().add(r * hd));
                        if ISA == AVX512 {
                            avx512::values::<C>(p, keys, n, a, hd, vp, t0..end);
                        } else {
                            avx2::values_rows::<C>(p, keys, n, a, hd, vp, t0..end);
                        }
                    }
                }
                t0 = t1;
                continue;
            }
            for r in 0..rows {
                let end = t1.min(limit(r));
                let pr = &scores[r * keys..(r + 1) * keys];
                let ar = &mut acc[r * hd..(r + 1) * hd];
                let mut t = t0;
                while t + 4 <= end {
                    let p = [pr[t], pr[t + 1], pr[t + 2], pr[t + 3]];
                    axpy4::<false, C>(ar, p, [value(t), value(t + 1), value(t + 2), value(t + 3)]);
                    t += 4;
                }
                while t < end {
                    let (p, v0) = (pr[t], value(t));
                    for (a, x) in ar.iter_mut().zip(v0) {
                        *a = madd::<false>(p, x.to_f32(), *a);
                    }
                    t += 1;
                }
            }
            t0 = t1;
        }
        for s in tile.clone() {
            for h in 0..group {
                let dst =
                    std::slice::from_raw_parts_mut(buf.out.add((b * d.seq + s) * row_width + (g * group + h) * hd), hd);
                if real.contains(&s) {
                    let r = ((s - real.start) * group + h) * hd;
                    dst.copy_from_slice(&acc[r..r + hd]);
                } else {
                    dst.fill(0.0);
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "kernel_tests.rs"]
pub(super) mod tests;
