//! Streaming dtype conversion (bf16 / f16 / f32 → export precision), optionally transposing a matrix
//! (HF `Linear` weights are `[out, in]`; ONNX `MatMul` wants `[in, out]`). Output goes to a sink in
//! chunks of at most [`CHUNK_BYTES`], so converting a tensor never needs a second full-size copy.

use half::{bf16, f16};

use crate::error::{ExportError, Result};
use crate::onnx::ElemType;

/// Largest chunk handed to the sink.
pub const CHUNK_BYTES: usize = 16 << 20;

/// Floating-point source dtypes the exporter converts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SrcFloat {
    /// bfloat16
    Bf16,
    /// IEEE half
    F16,
    /// IEEE single
    F32,
}

impl SrcFloat {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            SrcFloat::Bf16 | SrcFloat::F16 => 2,
            SrcFloat::F32 => 4,
        }
    }

    #[inline(always)]
    fn get(self, data: &[u8], i: usize) -> f32 {
        match self {
            SrcFloat::Bf16 => bf16::from_bits(u16::from_le_bytes([data[2 * i], data[2 * i + 1]])).to_f32(),
            SrcFloat::F16 => f16::from_bits(u16::from_le_bytes([data[2 * i], data[2 * i + 1]])).to_f32(),
            SrcFloat::F32 => f32::from_le_bytes([data[4 * i], data[4 * i + 1], data[4 * i + 2], data[4 * i + 3]]),
        }
    }
}

/// Decodes all elements to f32 (for small tensors such as norms and biases).
pub fn to_f32_vec(data: &[u8], src: SrcFloat) -> Vec<f32> {
    (0..data.len() / src.size()).map(|i| src.get(data, i)).collect()
}

fn encode_into(out: &mut Vec<u8>, v: f32, dst: ElemType) {
    match dst {
        ElemType::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
        _ => out.extend_from_slice(&v.to_le_bytes()),
    }
}

fn check_dst(dst: ElemType) -> Result<()> {
    match dst {
        ElemType::F32 | ElemType::F16 => Ok(()),
        other => Err(ExportError::Graph(format!("weights can only be converted to f32 or f16, not {}", other.name()))),
    }
}

/// Converts `data` (elements of `src`) to `dst`, in order, and hands the bytes to `sink` in chunks.
pub fn convert(data: &[u8], src: SrcFloat, dst: ElemType, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    check_dst(dst)?;
    let n = data.len() / src.size();
    let per_chunk = (CHUNK_BYTES / dst.size()).max(1);
    let mut buf = Vec::with_capacity(per_chunk.min(n) * dst.size());
    let mut i = 0;
    while i < n {
        let end = (i + per_chunk).min(n);
        buf.clear();
        if src == SrcFloat::F32 && dst == ElemType::F32 {
            buf.extend_from_slice(&data[4 * i..4 * end]);
        } else {
            for k in i..end {
                encode_into(&mut buf, src.get(data, k), dst);
            }
        }
        sink(&buf)?;
        i = end;
    }
    Ok(())
}

/// Converts a row-major `[rows, cols]` matrix to its transpose `[cols, rows]` in `dst`, streaming
/// blocks of output rows to `sink`.
pub fn convert_transposed(
    data: &[u8],
    src: SrcFloat,
    dst: ElemType,
    rows: usize,
    cols: usize,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    check_dst(dst)?;
    if data.len() != rows * cols * src.size() {
        return Err(ExportError::Graph(format!(
            "transpose of [{rows}, {cols}] needs {} bytes, got {}",
            rows * cols * src.size(),
            data.len()
        )));
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    // Output rows (= source columns) per block.
    let block = (CHUNK_BYTES / (rows * dst.size())).clamp(1, cols);
    let mut vals = vec![0f32; block * rows];
    let mut bytes = Vec::with_capacity(block * rows * dst.size());
    const TILE: usize = 32;
    let mut c0 = 0;
    while c0 < cols {
        let c1 = (c0 + block).min(cols);
        let width = c1 - c0;
        for rt in (0..rows).step_by(TILE) {
            let rt_end = (rt + TILE).min(rows);
            for c in c0..c1 {
                let out = &mut vals[(c - c0) * rows..(c - c0 + 1) * rows];
                for (o, r) in out[rt..rt_end].iter_mut().zip(rt..rt_end) {
                    *o = src.get(data, r * cols + c);
                }
            }
        }
        bytes.clear();
        match dst {
            ElemType::F32 => bytes.extend_from_slice(bytemuck::cast_slice(&vals[..width * rows])),
            _ => {
                for v in &vals[..width * rows] {
                    encode_into(&mut bytes, *v, dst);
                }
            }
        }
        sink(&bytes)?;
        c0 = c1;
    }
    Ok(())
}

/// Rows `[r0, r1)` of a row-major `[rows, cols]` matrix, transposed into `out` as float32 `[cols, r1 - r0]`
/// (row-major; `out` is cleared first): the output columns `[r0, r1)` of the `[cols, rows]` transpose, the same
/// values [`convert_transposed`] writes there in f32. A band of a MatMul weight read from its HF `[out, in]` rows.
pub fn transposed_rows_f32(
    data: &[u8],
    src: SrcFloat,
    rows: usize,
    cols: usize,
    (r0, r1): (usize, usize),
    out: &mut Vec<f32>,
) -> Result<()> {
    if data.len() != rows * cols * src.size() || r0 > r1 || r1 > rows {
        return Err(ExportError::Graph(format!(
            "rows {r0}..{r1} of [{rows}, {cols}] ({} bytes) out of {} bytes",
            rows * cols * src.size(),
            data.len()
        )));
    }
    let width = r1 - r0;
    out.clear();
    out.resize(width * cols, 0.0);
    const TILE: usize = 32;
    for ct in (0..cols).step_by(TILE) {
        let ct_end = (ct + TILE).min(cols);
        for r in r0..r1 {
            let j = r - r0;
            for c in ct..ct_end {
                out[c * width + j] = src.get(data, r * cols + c);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(f: impl FnOnce(&mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>) -> Vec<u8> {
        let mut out = Vec::new();
        f(&mut |c: &[u8]| {
            out.extend_from_slice(c);
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn bf16_to_f32_and_f16() {
        let vals = [1.5f32, -2.0, 0.1015625, 29952.0]; // all exact in bf16
        let data: Vec<u8> = vals.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
        let out = collect(|s| convert(&data, SrcFloat::Bf16, ElemType::F32, s));
        let got: &[f32] = bytemuck::cast_slice(&out);
        assert_eq!(got, &vals);
        let out = collect(|s| convert(&data, SrcFloat::Bf16, ElemType::F16, s));
        let got: Vec<f32> = out.chunks(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
        let want: Vec<f32> = vals.iter().map(|v| f16::from_f32(*v).to_f32()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn transpose_matches_naive() {
        let (rows, cols) = (37, 70);
        let vals: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let data: Vec<u8> = bytemuck::cast_slice(&vals).to_vec();
        let out = collect(|s| convert_transposed(&data, SrcFloat::F32, ElemType::F32, rows, cols, s));
        let got: &[f32] = bytemuck::cast_slice(&out);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(got[c * rows + r], vals[r * cols + c]);
            }
        }
        assert!(convert_transposed(&data[1..], SrcFloat::F32, ElemType::F32, rows, cols, &mut |_| Ok(())).is_err());
    }

    #[test]
    fn transposed_rows_are_the_transposes_columns() {
        let (rows, cols) = (37, 70);
        let vals: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.25 - 100.0).collect();
        let data: Vec<u8> = vals.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
        let whole = collect(|s| convert_transposed(&data, SrcFloat::Bf16, ElemType::F32, rows, cols, s));
        let whole: &[f32] = bytemuck::cast_slice(&whole);
        let mut band = Vec::new();
        for (r0, r1) in [(0, 37), (0, 5), (5, 36), (36, 37), (10, 10)] {
            transposed_rows_f32(&data, SrcFloat::Bf16, rows, cols, (r0, r1), &mut band).unwrap();
            assert_eq!(band.len(), (r1 - r0) * cols);
            for c in 0..cols {
                assert_eq!(band[c * (r1 - r0)..(c + 1) * (r1 - r0)], whole[c * rows + r0..c * rows + r1]);
            }
        }
        assert!(transposed_rows_f32(&data, SrcFloat::Bf16, rows, cols, (30, 38), &mut band).is_err());
    }
}
