//! Quantize / dequantize maths, matching ONNX `QuantizeLinear` / `DequantizeLinear` exactly.
//!
//! - INT8 is symmetric: zero point 0, `scale = amax / 127`, values saturate to `[-128, 127]`.
//!   Quantization is `saturate(round_half_to_even(x / scale))`, as ONNX `QuantizeLinear` specifies (a division,
//!   not a multiplication by `1/scale`, so results agree bit for bit with ONNX Runtime's reference).
//! - Per-tensor ([`quantize_per_tensor`]) for activations; per-output-channel ([`quantize_per_channel`]) for
//!   MatMul weights stored `[K, N]`: one scale per column, i.e. ONNX `axis = 1`.
//! - INT4 weight-only is **symmetric** signed int4 (`[-8, 7]`, no zero point, `scale = amax / 7` so values use
//!   `[-7, 7]`), blocked along the input axis: the `[K, N]` weight has one scale per `block_size` rows of each
//!   column, scale shape `[ceil(K / block_size), N]`. This is opset 21 `DequantizeLinear` with `axis = 0` and
//!   `block_size = B`: `y[k, n] = x[k, n] * scale[k / B, n]`. Symmetric was chosen because it needs no zero-point
//!   tensor, dequantizes with one multiply and is what TensorRT's weight-only INT4 expects; the price is one unused
//!   code (-8).
//! - INT4 weight-only can instead be **asymmetric** ([`quantize_blocked_u4`]): unsigned int4 codes `[0, 15]` with a
//!   uint4 zero point per block, `y = (q - zp) * scale`, so a block whose weights are skewed (say `[-0.2, 0.9]`)
//!   spends all 16 codes on its own range instead of half of them on a mirrored one. Same blocking and layout; the
//!   zero points are a second `[ceil(K / block_size), N]` tensor. ONNX Runtime's `MatMulNBits` takes zero points,
//!   TensorRT's block-quantized INT4 does not (so GPU targets keep the symmetric form).
//! - INT4 tensors are packed two per byte in row-major order, element `2i` in the low nibble of byte `i`, element
//!   `2i + 1` in the high nibble; an odd count leaves the last high nibble zero ([`pack_int4`]).
use crate::error::{ensure_finite, ensure_len, CalibError, Result};

mod blocked;

/// Largest INT8 magnitude used by symmetric quantization (`scale = amax / 127`).
pub const INT8_QMAX: f32 = 127.0;
/// Largest INT4 magnitude used by symmetric quantization (`scale = amax / 7`).
pub const INT4_QMAX: f32 = 7.0;
/// Block sizes accepted for blocked INT4 weights.
pub const INT4_BLOCK_SIZES: [usize; 3] = [32, 64, 128];

/// Scale for symmetric quantization of a range `[-amax, amax]` onto `[-qmax, qmax]`.
///
/// An all-zero tensor (`amax == 0`) gets scale 1.0: every value quantizes to 0 anyway, and runtimes reject a zero
/// scale. A negative or non-finite `amax` is an error.
pub fn scale_from_amax(amax: f32, qmax: f32) -> Result<f32> {
    if !amax.is_finite() || amax < 0.0 {
        return Err(CalibError::invalid("amax", "a finite value >= 0", amax));
    }
    if amax == 0.0 {
        return Ok(1.0);
    }
    let s = amax / qmax;
    // amax below f32::MIN_POSITIVE * qmax would give a subnormal scale that runtimes may flush to zero.
    Ok(s.max(f32::MIN_POSITIVE))
}

/// ONNX `QuantizeLinear` to int8 with zero point 0: `saturate(round_half_to_even(x / scale))`.
#[inline]
pub fn quantize_i8(x: f32, scale: f32) -> i8 {
    // `as i8` saturates and maps NaN to 0, like ONNX Runtime.
    (x / scale).round_ties_even().clamp(-128.0, 127.0) as i8
}

/// ONNX `DequantizeLinear` from int8 with zero point 0.
#[inline]
pub fn dequantize_i8(q: i8, scale: f32) -> f32 {
    f32::from(q) * scale
}

/// ONNX `QuantizeLinear` to signed int4 (`[-8, 7]`) with zero point 0.
#[inline]
pub fn quantize_i4(x: f32, scale: f32) -> i8 {
    (x / scale).round_ties_even().clamp(-8.0, 7.0) as i8
}

/// Largest unsigned INT4 code (asymmetric quantization uses codes `[0, 15]`).
pub const UINT4_QMAX: f32 = 15.0;

/// ONNX `QuantizeLinear` to unsigned int4 (`[0, 15]`): `saturate(round_half_to_even(x / scale) + zero_point)`.
#[inline]
pub fn quantize_u4(x: f32, scale: f32, zero_point: u8) -> u8 {
    ((x / scale).round_ties_even() + f32::from(zero_point)).clamp(0.0, UINT4_QMAX) as u8
}

/// Largest absolute value of a slice (0 for an empty slice).
pub fn abs_max(xs: &[f32]) -> f32 {
    xs.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// A tensor quantized to int8 with one scale.
#[derive(Debug, Clone, PartialEq)]
pub struct PerTensorI8 {
    /// The scale (`amax / 127`).
    pub scale: f32,
    /// Quantized values, same order as the input.
    pub values: Vec<i8>,
}

impl PerTensorI8 {
    /// Dequantized values.
    pub fn dequantize(&self) -> Vec<f32> {
        self.values.iter().map(|&q| dequantize_i8(q, self.scale)).collect()
    }
}

/// Quantizes with `scale = abs_max(xs) / 127`.
pub fn quantize_per_tensor(xs: &[f32]) -> Result<PerTensorI8> {
    ensure_finite("tensor", xs)?;
    let scale = scale_from_amax(abs_max(xs), INT8_QMAX)?;
    Ok(quantize_with_scale(xs, scale))
}

/// Quantizes with a given scale (e.g. from a calibrated activation range); values beyond the range saturate.
pub fn quantize_with_scale(xs: &[f32], scale: f32) -> PerTensorI8 {
    PerTensorI8 { scale, values: xs.iter().map(|&x| quantize_i8(x, scale)).collect() }
}

/// A `[K, N]` MatMul weight quantized to int8 with one scale per output column (ONNX `axis = 1`).
#[derive(Debug, Clone, PartialEq)]
pub struct PerChannelI8 {
    /// Rows (input features).
    pub k: usize,
    /// Columns (output features).
    pub n: usize,
    /// One scale per column, length `n`.
    pub scales: Vec<f32>,
    /// Quantized values, row-major `[K, N]`.
    pub values: Vec<i8>,
}

impl PerChannelI8 {
    /// Dequantized weight, row-major `[K, N]`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.values.iter().enumerate().map(|(i, &q)| dequantize_i8(q, self.scales[i % self.n])).collect()
    }
}

/// Per-column amax of a row-major `[K, N]` matrix.
pub fn column_abs_max(w: &[f32], k: usize, n: usize) -> Result<Vec<f32>> {
    ensure_len("weight [K, N]", k * n, w.len())?;
    Ok(blocked::column_abs_max(w, n))
}

/// Quantizes a row-major `[K, N]` weight per output column: `scale[n] = amax(column n) / 127`. (On every core;
/// the codes are [`quantize_i8`]'s.)
pub fn quantize_per_channel(w: &[f32], k: usize, n: usize) -> Result<PerChannelI8> {
    if let Some(index) = blocked::first_non_finite(w) {
        return Err(CalibError::NonFinite { what: "weight".into(), index, value: w[index] });
    }
    let amax = column_abs_max(w, k, n)?;
    let scales = amax.iter().map(|&a| scale_from_amax(a, INT8_QMAX)).collect::<Result<Vec<_>>>()?;
    let values = blocked::quantize_columns_i8(w, &scales);
    Ok(PerChannelI8 { k, n, scales, values })
}

/// A `[K, N]` weight quantized to int4 in blocks of `block` rows (opset 21 blocked `DequantizeLinear`,
/// `axis = 0`): symmetric signed codes without zero points, or asymmetric unsigned codes with one zero point per
/// block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockedI4 {
    /// Rows (input features).
    pub k: usize,
    /// Columns (output features).
    pub n: usize,
    /// Rows per block.
    pub block: usize,
    /// Scales, row-major `[ceil(K / block), N]`.
    pub scales: Vec<f32>,
    /// `None`: symmetric, `values` are signed codes in `[-8, 7]`. `Some`: asymmetric, `values` are unsigned codes
    /// in `[0, 15]` and these are the zero points (each in `[0, 15]`), row-major `[ceil(K / block), N]`.
    pub zero_points: Option<Vec<u8>>,
    /// Quantized codes, row-major `[K, N]` (unpacked; see [`pack_int4`]).
    pub values: Vec<i8>,
}

impl BlockedI4 {
    /// Number of blocks along K: `ceil(K / block)`.
    pub fn num_blocks(&self) -> usize {
        self.k.div_ceil(self.block)
    }

    /// Scale that applies to element `(row, col)`.
    #[inline]
    pub fn scale_at(&self, row: usize, col: usize) -> f32 {
        self.scales[(row / self.block) * self.n + col]
    }

    /// Zero point that applies to element `(row, col)` (0 when symmetric).
    #[inline]
    pub fn zero_point_at(&self, row: usize, col: usize) -> i8 {
        self.zero_points.as_ref().map_or(0, |z| z[(row / self.block) * self.n + col] as i8)
    }

    /// Dequantized weight, row-major `[K, N]`: `(q - zero_point) * scale`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.values.len());
        for r in 0..self.k {
            for c in 0..self.n {
                let q = self.values[r * self.n + c] - self.zero_point_at(r, c);
                out.push(f32::from(q) * self.scale_at(r, c));
            }
        }
        out
    }

    /// Codes packed two per byte as ONNX stores int4 / uint4 (low nibble first), as [`pack_int4`] does.
    pub fn packed(&self) -> Vec<u8> {
        blocked::pack(&self.values)
    }

    /// Zero points packed two per byte (uint4), when asymmetric.
    pub fn packed_zero_points(&self) -> Option<Vec<u8>> {
        self.zero_points.as_ref().map(|z| pack_int4(&z.iter().map(|&v| v as i8).collect::<Vec<_>>()))
    }
}

/// Checks an INT4 block size against [`INT4_BLOCK_SIZES`].
pub fn validate_block_size(block: usize) -> Result<()> {
    if INT4_BLOCK_SIZES.contains(&block) {
        Ok(())
    } else {
        Err(CalibError::invalid("block_size", "one of 32, 64, 128", block))
    }
}

/// Clip ratios tried per INT4 block: `scale = ratio · amax / 7`, 1.0 down to 0.5 in steps of 0.025. Clipping the
/// few largest weights of a block buys finer steps for all the others; 1.0 (no clipping) comes first so it wins
/// ties.
pub const INT4_CLIP_RATIOS: [f32; 21] = {
    let mut r = [0.0f32; 21];
    let mut i = 0;
    while i < 21 {
        r[i] = 1.0 - 0.025 * i as f32;
        i += 1;
    }
    r
};

/// Quantizes a row-major `[K, N]` weight to symmetric int4, one scale per `block` rows of each column.
/// `K` need not be a multiple of `block`: the last block is shorter. Each block's scale is the one among
/// [`INT4_CLIP_RATIOS`] `· amax / 7` with the least squared error over the block (an MSE clip search, as AWQ and
/// llama.cpp do): never worse than plain `amax / 7`.
pub fn quantize_blocked_i4(w: &[f32], k: usize, n: usize, block: usize) -> Result<BlockedI4> {
    quantize_blocked(w, k, n, block, false)
}

/// Quantizes a row-major `[K, N]` weight to asymmetric uint4 (codes `[0, 15]`), one scale and one zero point per
/// `block` rows of each column. The block's range `[min(lo, 0), max(hi, 0)]` (zero stays exactly representable)
/// is shrunk by each of [`INT4_CLIP_RATIOS`] in turn and the pair with the least squared error is kept.
pub fn quantize_blocked_u4(w: &[f32], k: usize, n: usize, block: usize) -> Result<BlockedI4> {
    quantize_blocked(w, k, n, block, true)
}

/// A `[K, N]` weight quantized like [`quantize_blocked_u4`] (`asymmetric`) or [`quantize_blocked_i4`], in the form
/// ONNX stores it: codes and zero points packed two per byte ([`pack_int4`]). What the QDQ rewrite writes; the
/// codes are packed as they are made (no unpacked copy of the weight) when `N` is even.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedBlockedI4 {
    /// Rows per block.
    pub block: usize,
    /// Scales, row-major `[ceil(K / block), N]`.
    pub scales: Vec<f32>,
    /// The codes, `[K, N]` packed.
    pub packed: Vec<u8>,
    /// Zero points, `[ceil(K / block), N]` packed (uint4), when asymmetric.
    pub packed_zero_points: Option<Vec<u8>>,
}

/// [`quantize_blocked_u4`] (`asymmetric`) or [`quantize_blocked_i4`], packed: the same bytes as their
/// [`BlockedI4::packed`], [`BlockedI4::scales`] and [`BlockedI4::packed_zero_points`].
pub fn quantize_blocked_packed(
    w: &[f32],
    k: usize,
    n: usize,
    block: usize,
    asymmetric: bool,
) -> Result<PackedBlockedI4> {
    check_blocked(w, k, n, block)?;
    let (packed, scales, zeros) = blocked::quantize_packed(w, k, n, block, asymmetric);
    let packed_zero_points = zeros.map(|z| blocked::pack(bytemuck::cast_slice(&z)));
    Ok(PackedBlockedI4 { block, scales, packed, packed_zero_points })
}

fn check_blocked(w: &[f32], k: usize, n: usize, block: usize) -> Result<()> {
    validate_block_size(block)?;
    ensure_len("weight [K, N]", k * n, w.len())?;
    match blocked::first_non_finite(w) {
        Some(index) => Err(CalibError::NonFinite { what: "weight".into(), index, value: w[index] }),
        None => Ok(()),
    }
}

fn quantize_blocked(w: &[f32], k: usize, n: usize, block: usize, asymmetric: bool) -> Result<BlockedI4> {
    check_blocked(w, k, n, block)?;
    // The clip search per block and column, vectorized across columns and run on every core; the bytes are those
    // of the scalar definition in the docs above (`blocked.rs` says how, and its tests hold it to that).
    Ok(blocked::quantize(w, k, n, block, asymmetric))
}

/// Packs int4 values (each in `[-8, 7]`) two per byte: element `2i` in the low nibble of byte `i`, element
/// `2i + 1` in the high nibble (two's complement nibbles). An odd count pads the last high nibble with 0.
pub fn pack_int4(values: &[i8]) -> Vec<u8> {
    values
        .chunks(2)
        .map(|p| {
            let lo = (p[0] as u8) & 0x0f;
            let hi = p.get(1).map_or(0, |&v| (v as u8) & 0x0f);
            lo | (hi << 4)
        })
        .collect()
}

/// Inverse of [`pack_int4`]: the first `count` signed int4 values.
pub fn unpack_int4(bytes: &[u8], count: usize) -> Result<Vec<i8>> {
    ensure_len("packed int4 bytes", count.div_ceil(2), bytes.len())?;
    let sext = |nib: u8| ((nib << 4) as i8) >> 4;
    Ok((0..count).map(|i| sext(if i % 2 == 0 { bytes[i / 2] & 0x0f } else { bytes[i / 2] >> 4 })).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Naive reference: round half to even written out by hand, saturation by comparisons.
    fn ref_quant(x: f32, scale: f32, lo: i32, hi: i32) -> i32 {
        let v = (x as f64) / (scale as f64);
        let v = v as f32 as f64; // ONNX divides in f32
        let fl = v.floor();
        let diff = v - fl;
        let r = if diff > 0.5 || (diff == 0.5 && (fl as i64) % 2 != 0) { fl + 1.0 } else { fl };
        (r as i64).clamp(lo as i64, hi as i64) as i32
    }

    #[test]
    fn rounds_half_to_even() {
        assert_eq!(quantize_i8(0.5, 1.0), 0);
        assert_eq!(quantize_i8(1.5, 1.0), 2);
        assert_eq!(quantize_i8(2.5, 1.0), 2);
        assert_eq!(quantize_i8(-0.5, 1.0), 0);
        assert_eq!(quantize_i8(-1.5, 1.0), -2);
        assert_eq!(quantize_i8(-2.5, 1.0), -2);
        assert_eq!(quantize_i4(6.5, 1.0), 6);
        assert_eq!(quantize_i4(-7.5, 1.0), -8);
    }

    #[test]
    fn saturates() {
        assert_eq!(quantize_i8(1e9, 0.1), 127);
        assert_eq!(quantize_i8(-1e9, 0.1), -128);
        assert_eq!(quantize_i4(100.0, 1.0), 7);
        assert_eq!(quantize_i4(-100.0, 1.0), -8);
    }

    #[test]
    fn scale_edge_cases() {
        assert_eq!(scale_from_amax(0.0, INT8_QMAX).unwrap(), 1.0);
        assert_eq!(scale_from_amax(127.0, INT8_QMAX).unwrap(), 1.0);
        assert!(scale_from_amax(f32::NAN, INT8_QMAX).is_err());
        let e = scale_from_amax(-1.0, INT8_QMAX).unwrap_err().to_string();
        assert!(e.contains("amax") && e.contains("-1"), "{e}");
        assert!(quantize_per_tensor(&[1.0, f32::INFINITY]).is_err());
    }

    #[test]
    fn per_channel_layout_is_axis_1() {
        // [K=2, N=3]; column 1 is large, column 2 is all zero.
        let w = [1.0, -100.0, 0.0, 0.5, 50.0, 0.0];
        let q = quantize_per_channel(&w, 2, 3).unwrap();
        assert_eq!(q.scales, vec![1.0 / 127.0, 100.0 / 127.0, 1.0]);
        assert_eq!(q.values, vec![127, -127, 0, 64, 64, 0]);
    }

    #[test]
    fn blocked_int4_layout() {
        // K = 40 with block 32: two blocks, the second 8 rows long.
        let (k, n) = (40, 2);
        let w: Vec<f32> = (0..k * n).map(|i| if i / n < 32 { 7.0 } else { -14.0 }).collect();
        let q = quantize_blocked_i4(&w, k, n, 32).unwrap();
        assert_eq!(q.num_blocks(), 2);
        assert_eq!(q.scales, vec![1.0, 1.0, 2.0, 2.0]);
        assert!(q.values[..64].iter().all(|&v| v == 7));
        assert!(q.values[64..].iter().all(|&v| v == -7));
        assert_eq!(q.dequantize(), w);
        assert!(quantize_blocked_i4(&w, k, n, 48).unwrap_err().to_string().contains("block_size"));
    }

    #[test]
    fn int4_packing_is_low_nibble_first() {
        assert_eq!(pack_int4(&[1, 2]), vec![0x21]);
        assert_eq!(pack_int4(&[-1, 7]), vec![0x7f]);
        assert_eq!(pack_int4(&[-8, 0, 3]), vec![0x08, 0x03]);
        assert_eq!(unpack_int4(&[0x08, 0x03], 3).unwrap(), vec![-8, 0, 3]);
        assert!(unpack_int4(&[0x08], 3).is_err());
    }

    proptest! {
        #[test]
        fn i8_matches_reference(x in -1e4f32..1e4, scale in 1e-3f32..10.0) {
            prop_assert_eq!(quantize_i8(x, scale) as i32, ref_quant(x, scale, -128, 127));
            prop_assert_eq!(quantize_i4(x, scale) as i32, ref_quant(x, scale, -8, 7));
        }

        #[test]
        fn per_tensor_error_bounded(xs in prop::collection::vec(-100f32..100.0, 1..200)) {
            let q = quantize_per_tensor(&xs).unwrap();
            let d = q.dequantize();
            for (x, y) in xs.iter().zip(&d) {
                // half a step, plus float rounding of the multiply/divide
                prop_assert!((x - y).abs() <= q.scale * 0.5 * (1.0 + 1e-5) + 1e-6 * x.abs(), "{} vs {}", x, y);
            }
            // idempotence: quantizing the dequantized values with the same scale gives the same codes
            prop_assert_eq!(quantize_with_scale(&d, q.scale).values, q.values.clone());
        }

        #[test]
        fn saturation_with_small_scale(xs in prop::collection::vec(-100f32..100.0, 1..50), scale in 0.01f32..0.5) {
            let q = quantize_with_scale(&xs, scale);
            for (x, v) in xs.iter().zip(&q.values) {
                if x / scale >= 127.5 { prop_assert_eq!(*v, 127); }
                if x / scale <= -128.5 { prop_assert_eq!(*v, -128); }
            }
        }

        #[test]
        fn per_channel_error_bounded((k, n, w) in (1usize..8, 1usize..8).prop_flat_map(|(k, n)|
                (Just(k), Just(n), prop::collection::vec(-10f32..10.0, k * n)))) {
            let q = quantize_per_channel(&w, k, n).unwrap();
            let d = q.dequantize();
            for (i, (x, y)) in w.iter().zip(&d).enumerate() {
                let s = q.scales[i % n];
                prop_assert!((x - y).abs() <= s * 0.5 * (1.0 + 1e-5) + 1e-6);
                prop_assert!(q.values[i] != -128, "symmetric int8 never uses -128");
            }
            prop_assert_eq!(quantize_per_channel(&d, k, n).unwrap().values, q.values.clone());
        }

        #[test]
        fn blocked_i4_error_and_roundtrip((k, n, block, w) in (1usize..300, 1usize..4, 0usize..3).prop_flat_map(|(k, n, b)|
                (Just(k), Just(n), Just(INT4_BLOCK_SIZES[b]), prop::collection::vec(-3f32..3.0, k * n)))) {
            let q = quantize_blocked_i4(&w, k, n, block).unwrap();
            prop_assert_eq!(q.scales.len(), k.div_ceil(block) * n);
            let d = q.dequantize();
            // Per block and column: the clip search is never worse than plain symmetric `amax / 7`, and no
            // element is off by more than the clipped part plus half a step.
            for b in 0..k.div_ceil(block) {
                for c in 0..n {
                    let rows: Vec<usize> = (b * block..((b + 1) * block).min(k)).collect();
                    let amax = rows.iter().fold(0f32, |m, &r| m.max(w[r * n + c].abs()));
                    let plain = scale_from_amax(amax, INT4_QMAX).unwrap();
                    let plain_err: f32 = rows.iter().map(|&r| {
                        let x = w[r * n + c];
                        (x - f32::from(quantize_i4(x, plain)) * plain).powi(2)
                    }).sum();
                    let got_err: f32 = rows.iter().map(|&r| (w[r * n + c] - d[r * n + c]).powi(2)).sum();
                    prop_assert!(got_err <= plain_err * (1.0 + 1e-5) + 1e-9, "block {} col {}: {} > {}", b, c, got_err, plain_err);
                    let s = q.scale_at(rows[0], c);
                    for &r in &rows {
                        let x = w[r * n + c];
                        let clipped = (x.abs() - 7.0 * s).max(0.0);
                        prop_assert!((x - d[r * n + c]).abs() <= clipped + s * 0.5 * (1.0 + 1e-5) + 1e-6);
                    }
                }
            }
            prop_assert_eq!(unpack_int4(&q.packed(), q.values.len()).unwrap(), q.values.clone());
        }

        #[test]
        fn u4_matches_reference(x in -1e3f32..1e3, scale in 1e-3f32..10.0, zp in 0u8..16) {
            let want = (ref_quant(x, scale, -1000, 1000) + i32::from(zp)).clamp(0, 15);
            prop_assert_eq!(i32::from(quantize_u4(x, scale, zp)), want);
        }

        #[test]
        fn blocked_u4_error_bounded_and_zero_exact((k, n, block, w) in (1usize..300, 1usize..4, 0usize..3).prop_flat_map(|(k, n, b)|
                (Just(k), Just(n), Just(INT4_BLOCK_SIZES[b]), prop::collection::vec(-1f32..3.0, k * n)))) {
            let q = quantize_blocked_u4(&w, k, n, block).unwrap();
            let zps = q.zero_points.clone().unwrap();
            prop_assert_eq!((q.scales.len(), zps.len()), (k.div_ceil(block) * n, k.div_ceil(block) * n));
            prop_assert!(zps.iter().all(|&z| z <= 15) && q.values.iter().all(|&v| (0..=15).contains(&v)));
            let d = q.dequantize();
            for b in 0..k.div_ceil(block) {
                for c in 0..n {
                    let rows: Vec<usize> = (b * block..((b + 1) * block).min(k)).collect();
                    let (s, z) = (q.scale_at(rows[0], c), q.zero_point_at(rows[0], c));
                    // Zero is a code: quantizing 0.0 gives the zero point back, which dequantizes to exactly 0.
                    prop_assert_eq!(quantize_u4(0.0, s, z as u8) as i8, z);
                    // Never worse than the unclipped min/max range, which bounds every element by half a step of it.
                    let lo = rows.iter().fold(0f32, |m, &r| m.min(w[r * n + c]));
                    let hi = rows.iter().fold(0f32, |m, &r| m.max(w[r * n + c]));
                    let s_full = ((hi - lo) / UINT4_QMAX).max(f32::MIN_POSITIVE);
                    let got_err: f32 = rows.iter().map(|&r| (w[r * n + c] - d[r * n + c]).powi(2)).sum();
                    let bound = rows.len() as f32 * (s_full * 0.5 * (1.0 + 1e-4)).powi(2) + 1e-9;
                    if hi > lo {
                        prop_assert!(got_err <= bound, "block {} col {}: {} > {}", b, c, got_err, bound);
                    }
                }
            }
            let unpacked: Vec<i8> = q.packed().iter().flat_map(|b| [(b & 0xf) as i8, (b >> 4) as i8]).take(q.values.len()).collect();
            prop_assert_eq!(unpacked, q.values.clone());
        }
    }

    #[test]
    fn blocked_u4_uses_the_whole_code_range_of_a_skewed_block() {
        // One block of 0, 0.1, ..., 1.5: symmetric int4 has 8 codes for it (0..7), asymmetric all 16.
        let w: Vec<f32> = (0..32).map(|i| (i % 16) as f32 * 0.1).collect();
        let q = quantize_blocked_u4(&w, 32, 1, 32).unwrap();
        assert_eq!(q.zero_points, Some(vec![0]));
        assert!((q.scales[0] - 0.1).abs() < 1e-6, "{}", q.scales[0]);
        for (x, y) in w.iter().zip(q.dequantize()) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
        let sym = quantize_blocked_i4(&w, 32, 1, 32).unwrap().dequantize();
        assert!(w.iter().zip(&sym).any(|(x, y)| (x - y).abs() > 0.01), "symmetric cannot represent all 16 values");
        // All-zero block: scale 1, zero point 0.
        let z = quantize_blocked_u4(&[0.0; 32], 32, 1, 32).unwrap();
        assert_eq!(
            (z.scales.clone(), z.zero_points.clone(), z.dequantize()),
            (vec![1.0], Some(vec![0]), vec![0.0; 32])
        );
    }
}
