//! FP8 (`float8_e4m3fn`) block-scaled weights, as the released DeepSeek-V3 / R1 checkpoints store them.
//!
//! A quantized Linear weight `W` of shape `[rows, cols]` is stored as one `F8_E4M3` byte per element plus a
//! float32 tensor `W_scale_inv` of shape `[ceil(rows / br), ceil(cols / bc)]` (block size `[br, bc]` from
//! `quantization_config.weight_block_size`, `[128, 128]` for R1). The real value is
//! `fp8_to_f32(W[r][c]) * W_scale_inv[r / br][c / bc]`. Blocks on the last row / column may be partial when
//! `rows` or `cols` is not a multiple of the block size.
//!
//! Dequantization is done row-range by row-range ([`dequantize_rows`]) so a caller can stream a large tensor to the
//! export precision without materializing it whole in f32.

use std::ops::Range;

/// Errors of FP8 block dequantization. The checkpoint reader wraps these with the tensor name.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Fp8Error {
    /// The block size from `quantization_config.weight_block_size` is unusable.
    #[error("weight_block_size must be two positive integers, got {0:?}")]
    BadBlockSize(Vec<usize>),
    /// The weight is not a matrix.
    #[error("FP8 block-scaled weight must be 2-D, got shape {0:?}")]
    NotMatrix(Vec<usize>),
    /// The scale tensor does not have one entry per block.
    #[error(
        "weight_scale_inv for a {rows}x{cols} weight with blocks {block:?} must have shape {expected:?}, got {got:?}"
    )]
    ScaleShape {
        /// Weight rows.
        rows: usize,
        /// Weight columns.
        cols: usize,
        /// Block size.
        block: [usize; 2],
        /// `[ceil(rows / br), ceil(cols / bc)]`.
        expected: [usize; 2],
        /// What the checkpoint holds.
        got: Vec<usize>,
    },
    /// Byte / element counts do not match the declared shapes.
    #[error("{what} holds {got} elements, the shape needs {expected}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// Elements the shape needs.
        expected: usize,
        /// Elements present.
        got: usize,
    },
    /// Requested rows outside the weight.
    #[error("row range {start}..{end} is outside a weight with {rows} rows")]
    RowRange {
        /// First row asked for.
        start: usize,
        /// One past the last row asked for.
        end: usize,
        /// Rows of the weight.
        rows: usize,
    },
    /// A scale is NaN, infinite or negative (a corrupt checkpoint).
    #[error("weight_scale_inv[{row}][{col}] is {value}, expected a finite non-negative number")]
    BadScale {
        /// Block row.
        row: usize,
        /// Block column.
        col: usize,
        /// The value found.
        value: f32,
    },
}

/// Decodes one `float8_e4m3fn` byte (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no infinities;
/// `S.1111.111` is NaN; largest finite magnitude 448).
pub fn e4m3fn_to_f32(byte: u8) -> f32 {
    E4M3FN_TABLE[byte as usize]
}

const fn decode_e4m3fn(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0f32 } else { 1.0f32 };
    let exp = ((byte >> 3) & 0x0f) as i32;
    let man = (byte & 0x07) as f32;
    if exp == 0x0f && (byte & 0x07) == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        // subnormal: man/8 * 2^(1-7)
        return sign * man * (1.0 / 8.0) * (1.0 / 64.0);
    }
    // normal: (1 + man/8) * 2^(exp-7), exp in 1..=15
    let mut scale = 1.0f32;
    let mut e = exp - 7;
    while e > 0 {
        scale *= 2.0;
        e -= 1;
    }
    while e < 0 {
        scale *= 0.5;
        e += 1;
    }
    sign * (1.0 + man / 8.0) * scale
}

const fn build_table() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = decode_e4m3fn(i as u8);
        i += 1;
    }
    t
}

static E4M3FN_TABLE: [f32; 256] = build_table();

/// Shape and block layout of one FP8 block-scaled weight, validated against its scale tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    /// Weight rows (output features).
    pub rows: usize,
    /// Weight columns (input features).
    pub cols: usize,
    /// Block size `[rows, cols]`.
    pub block: [usize; 2],
}

impl BlockLayout {
    /// Checks a weight shape, a scale shape and a block size (`weight_block_size`) against each other.
    pub fn new(weight_shape: &[usize], scale_shape: &[usize], block: &[usize]) -> Result<Self, Fp8Error> {
        let block = match block {
            [br, bc] if *br > 0 && *bc > 0 => [*br, *bc],
            other => return Err(Fp8Error::BadBlockSize(other.to_vec())),
        };
        let (rows, cols) = match weight_shape {
            [r, c] => (*r, *c),
            other => return Err(Fp8Error::NotMatrix(other.to_vec())),
        };
        let expected = [rows.div_ceil(block[0]), cols.div_ceil(block[1])];
        if scale_shape != expected {
            return Err(Fp8Error::ScaleShape { rows, cols, block, expected, got: scale_shape.to_vec() });
        }
        Ok(BlockLayout { rows, cols, block })
    }

    /// Number of scale entries per block row.
    pub fn scale_cols(&self) -> usize {
        self.cols.div_ceil(self.block[1])
    }

    /// Number of scale entries (`ceil(rows/br) * ceil(cols/bc)`).
    pub fn scale_len(&self) -> usize {
        self.rows.div_ceil(self.block[0]) * self.scale_cols()
    }
}

/// Dequantizes rows `rows` of an FP8 block-scaled weight into `out` (row-major, `rows.len() * cols` values).
///
/// `weight` is the whole FP8 tensor (`rows * cols` bytes), `scale_inv` the whole scale tensor (row-major f32).
/// Every element becomes `e4m3fn(weight) * scale_inv[block]`, computed in f32 (as transformers' dequantization does).
pub fn dequantize_rows(
    layout: &BlockLayout,
    weight: &[u8],
    scale_inv: &[f32],
    rows: Range<usize>,
    out: &mut [f32],
) -> Result<(), Fp8Error> {
    let BlockLayout { rows: n_rows, cols, block } = *layout;
    if weight.len() != n_rows * cols {
        return Err(Fp8Error::Length { what: "FP8 weight", expected: n_rows * cols, got: weight.len() });
    }
    if scale_inv.len() != layout.scale_len() {
        return Err(Fp8Error::Length { what: "weight_scale_inv", expected: layout.scale_len(), got: scale_inv.len() });
    }
    if rows.start > rows.end || rows.end > n_rows {
        return Err(Fp8Error::RowRange { start: rows.start, end: rows.end, rows: n_rows });
    }
    let need = rows.len() * cols;
    if out.len() != need {
        return Err(Fp8Error::Length { what: "output buffer", expected: need, got: out.len() });
    }
    let scale_cols = layout.scale_cols();
    for (scale_idx, &s) in scale_inv.iter().enumerate() {
        if !s.is_finite() || s < 0.0 {
            return Err(Fp8Error::BadScale { row: scale_idx / scale_cols, col: scale_idx % scale_cols, value: s });
        }
    }
    for (out_row, r) in out.chunks_exact_mut(cols.max(1)).zip(rows.clone()) {
        let src = &weight[r * cols..(r + 1) * cols];
        let srow = &scale_inv[(r / block[0]) * scale_cols..(r / block[0] + 1) * scale_cols];
        for ((dst, src), &s) in out_row.chunks_mut(block[1]).zip(src.chunks(block[1])).zip(srow) {
            for (d, &b) in dst.iter_mut().zip(src) {
                *d = E4M3FN_TABLE[b as usize] * s;
            }
        }
    }
    Ok(())
}

/// Dequantizes a whole FP8 block-scaled weight to f32 (`rows * cols` values). For large tensors prefer
/// [`dequantize_rows`] in chunks.
pub fn dequantize(layout: &BlockLayout, weight: &[u8], scale_inv: &[f32]) -> Result<Vec<f32>, Fp8Error> {
    let mut out = vec![0.0f32; layout.rows * layout.cols];
    dequantize_rows(layout, weight, scale_inv, 0..layout.rows, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_known_e4m3fn_values() {
        assert_eq!(e4m3fn_to_f32(0x00), 0.0);
        assert_eq!(e4m3fn_to_f32(0x80), 0.0); // -0
        assert!(e4m3fn_to_f32(0x80).is_sign_negative());
        assert_eq!(e4m3fn_to_f32(0x38), 1.0);
        assert_eq!(e4m3fn_to_f32(0xb8), -1.0);
        assert_eq!(e4m3fn_to_f32(0x40), 2.0);
        assert_eq!(e4m3fn_to_f32(0x3c), 1.5);
        assert_eq!(e4m3fn_to_f32(0x7e), 448.0);
        assert_eq!(e4m3fn_to_f32(0xfe), -448.0);
        assert_eq!(e4m3fn_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(e4m3fn_to_f32(0x07), 7.0 * 2f32.powi(-9)); // largest subnormal
        assert_eq!(e4m3fn_to_f32(0x08), 2f32.powi(-6)); // smallest normal
        assert!(e4m3fn_to_f32(0x7f).is_nan());
        assert!(e4m3fn_to_f32(0xff).is_nan());
        assert_eq!(e4m3fn_to_f32(0x77), 240.0); // 0.1110.111 = 1.875 * 2^7
    }

    #[test]
    fn positive_codes_are_strictly_increasing_and_negatives_mirror_them() {
        for b in 0u8..0x7e {
            assert!(e4m3fn_to_f32(b) < e4m3fn_to_f32(b + 1), "code {b:#x}");
            assert_eq!(e4m3fn_to_f32(b | 0x80), -e4m3fn_to_f32(b));
        }
    }

    #[test]
    fn partial_edge_blocks_use_their_own_scale() {
        // 3x5 weight, 2x2 blocks -> scales 2x3; every element is code 0x38 (1.0) so the output is the scale map.
        let layout = BlockLayout::new(&[3, 5], &[2, 3], &[2, 2]).unwrap();
        let w = vec![0x38u8; 15];
        let s = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let got = dequantize(&layout, &w, &s).unwrap();
        #[rustfmt::skip]
        let want = [
            1.0, 1.0, 2.0, 2.0, 3.0,
            1.0, 1.0, 2.0, 2.0, 3.0,
            4.0, 4.0, 5.0, 5.0, 6.0,
        ];
        assert_eq!(got, want);
        // row ranges give the same rows
        let mut part = vec![0.0; 5];
        dequantize_rows(&layout, &w, &s, 2..3, &mut part).unwrap();
        assert_eq!(part, want[10..15]);
    }

    #[test]
    fn value_times_scale() {
        let layout = BlockLayout::new(&[1, 3], &[1, 1], &[128, 128]).unwrap();
        let got = dequantize(&layout, &[0x40, 0xb8, 0x01], &[0.5]).unwrap();
        assert_eq!(got, vec![1.0, -0.5, 2f32.powi(-10)]);
    }

    #[test]
    fn rejects_mismatched_shapes_by_value() {
        let e = BlockLayout::new(&[200, 130], &[2, 1], &[128, 128]).unwrap_err();
        assert_eq!(
            e,
            Fp8Error::ScaleShape { rows: 200, cols: 130, block: [128, 128], expected: [2, 2], got: vec![2, 1] }
        );
        assert!(e.to_string().contains("[2, 2]"), "{e}");
        assert_eq!(BlockLayout::new(&[4], &[1], &[128, 128]).unwrap_err(), Fp8Error::NotMatrix(vec![4]));
        assert_eq!(BlockLayout::new(&[4, 4], &[1, 1], &[0, 128]).unwrap_err(), Fp8Error::BadBlockSize(vec![0, 128]));
        let layout = BlockLayout::new(&[2, 2], &[1, 1], &[128, 128]).unwrap();
        let mut out = vec![0.0; 4];
        assert!(matches!(
            dequantize_rows(&layout, &[0; 3], &[1.0], 0..2, &mut out),
            Err(Fp8Error::Length { what: "FP8 weight", expected: 4, got: 3 })
        ));
        assert!(matches!(
            dequantize_rows(&layout, &[0; 4], &[1.0], 1..3, &mut out),
            Err(Fp8Error::RowRange { start: 1, end: 3, rows: 2 })
        ));
        assert!(matches!(
            dequantize_rows(&layout, &[0; 4], &[f32::NAN], 0..2, &mut out),
            Err(Fp8Error::BadScale { row: 0, col: 0, .. })
        ));
    }
}
