//! Quantizing a large MatMul weight in bands of output columns (the LM head: DeepSeek-R1's is 3.7 GB in float32), for
//! the streamed weight-only export ([`super::stream`]). Every scheme quantizes each output column on its own (int8:
//! one scale per column; int4: the clip search per block of `K` rows of one column), so a band of columns quantized
//! as a `[K, band]` matrix gives exactly those columns' codes, scales and zero points; [`quantize_banded`] places them
//! into the whole tensors' layout. Memory holds the quantized weight and one band, never the float32 weight.

use r1_calibration::qdq::{quantize_weight, QuantScheme, QuantizedWeight};
use r1_proto::onnx::tensor_proto::DataType;

use crate::error::{ExportError, Result};
use crate::onnx::Columns;

/// Float32 bytes of one band of a MatMul weight quantized in bands of output columns (a weight larger than this is
/// never in memory whole).
pub(crate) const BAND_BYTES: usize = 64 << 20;

/// Columns per band of a `[k, n]` weight for bands of at most `bytes` of float32: a multiple of 16 (an even width
/// keeps every band's packed int4 rows on whole bytes when `n` is even), at least 16.
pub(crate) fn band_columns(k: usize, bytes: usize) -> usize {
    (bytes / (4 * k.max(1)) / 16 * 16).max(16)
}

/// Weight `name` (`[k, n]`) quantized per `scheme` `band` columns at a time, each band read by `columns` and
/// quantized by [`quantize_weight`] as a `[k, band]` matrix, its codes, scales and zero points placed into the
/// whole tensors' layout: the same tensors and `DequantizeLinear`, byte for byte, as [`quantize_weight`] of the whole
/// weight gives, since every scheme quantizes each column on its own (the module docs). Holds the quantized
/// weight and one band.
pub(crate) fn quantize_banded(
    name: &str,
    k: usize,
    n: usize,
    scheme: QuantScheme,
    band: usize,
    columns: Columns<'_>,
) -> Result<QuantizedWeight> {
    let band = band.max(1);
    let mut values = Vec::new();
    let mut whole: Option<(QuantizedWeight, Vec<usize>)> = None;
    let mut c0 = 0;
    while c0 < n {
        let c1 = (c0 + band).min(n);
        let width = c1 - c0;
        values.clear();
        columns((c0, c1), &mut values)?;
        let mut q = quantize_weight(name, &values, k, width, scheme)?;
        let (w, bits) = match &mut whole {
            Some(w) => w,
            None => {
                let mut bits = Vec::new();
                let mut initializers = Vec::new();
                for t in &mut q.initializers {
                    let b = match t.data_type.and_then(|d| DataType::try_from(d).ok()) {
                        Some(DataType::Int4 | DataType::Uint4) => 4,
                        Some(DataType::Int8 | DataType::Uint8) => 8,
                        Some(DataType::Float) => 32,
                        other => {
                            return Err(ExportError::Graph(format!(
                                "weight `{name}`: no banded layout for a quantized tensor of type {other:?}"
                            )))
                        }
                    };
                    let mut dims = t.dims.clone();
                    if let Some(last) = dims.last_mut() {
                        *last = n as i64;
                    }
                    let count: usize = dims.iter().map(|&d| d.max(0) as usize).product();
                    bits.push(b);
                    let raw = t.raw_data.take();
                    let mut full = t.clone();
                    t.raw_data = raw;
                    full.dims = dims;
                    full.raw_data = Some(vec![0u8; (count * b).div_ceil(8)]);
                    initializers.push(full);
                }
                whole.insert((QuantizedWeight { k, n, initializers, dequantize: q.dequantize.clone() }, bits))
            }
        };
        if q.initializers.len() != w.initializers.len() || q.dequantize != w.dequantize {
            return Err(ExportError::Graph(format!("weight `{name}`: its bands were quantized differently")));
        }
        for ((t, full), &b) in q.initializers.iter().zip(&mut w.initializers).zip(bits.iter()) {
            let (Some(src), Some(dst)) = (t.raw_data.as_deref(), full.raw_data.as_deref_mut()) else {
                return Err(ExportError::Graph(format!("weight `{name}`: a quantized band has no bytes")));
            };
            let count: usize = t.dims.iter().map(|&d| d.max(0) as usize).product();
            if t.dims.last() != Some(&(width as i64))
                || !count.is_multiple_of(width)
                || src.len() != (count * b).div_ceil(8)
            {
                return Err(ExportError::Graph(format!(
                    "weight `{name}`: quantized band tensor `{}` has dims {:?}, not [.., {width}]",
                    t.name.as_deref().unwrap_or("?"),
                    t.dims
                )));
            }
            place_band(src, dst, count / width, width, n, c0, b);
        }
        c0 = c1;
    }
    whole.map(|(w, _)| w).ok_or_else(|| ExportError::Graph(format!("weight `{name}` has no columns")))
}

/// Copies a band's row-major `[rows, width]` elements of `bits` bits (4: packed two per byte, low nibble first, as
/// ONNX stores int4) into columns `[c0, c0 + width)` of the row-major `[rows, n]` tensor `dst`.
fn place_band(src: &[u8], dst: &mut [u8], rows: usize, width: usize, n: usize, c0: usize, bits: usize) {
    if bits == 4 {
        for r in 0..rows {
            // Element (nibble) indices of the row's first value in the band and in the whole tensor.
            let (s, d) = (r * width, r * n + c0);
            if s.is_multiple_of(2) && d.is_multiple_of(2) && width.is_multiple_of(2) {
                dst[d / 2..(d + width) / 2].copy_from_slice(&src[s / 2..(s + width) / 2]);
                continue;
            }
            for j in 0..width {
                let (s, d) = (s + j, d + j);
                let nibble = (src[s / 2] >> (4 * (s % 2))) & 0x0f;
                let shift = 4 * (d % 2);
                dst[d / 2] = (dst[d / 2] & !(0x0f << shift)) | (nibble << shift);
            }
        }
        return;
    }
    let e = bits / 8;
    for r in 0..rows {
        dst[(r * n + c0) * e..(r * n + c0 + width) * e].copy_from_slice(&src[r * width * e..(r + 1) * width * e]);
    }
}
