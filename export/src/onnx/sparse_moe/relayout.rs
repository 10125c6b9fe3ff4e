//! The routed experts' weights, moved from the portable graph's layout to `com.microsoft.MoE`'s, one expert at a
//! time: the portable graph stacks them for batched MatMuls (`gate_proj`, `up_proj`: `[E, H, I]`; `down_proj`:
//! `[E, I, H]`, each expert's matrix transposed from the checkpoint), the operator wants the checkpoint's own
//! orientation with gate and up interleaved (`fc1`: `[E, 2I, H]`, row `2j` = gate row `j`, row `2j + 1` = up row
//! `j`; `fc2`: `[E, H, I]`). Reads are ranged (one expert of one tensor in memory), so a model larger than memory
//! relays in bounded memory.
//!
//! A stack may also be quantized already (a streamed `int8-wo` / `int4-wo` export, `quantize/stream.rs`): 3-D codes
//! `[E, K, N]` (int8, or int4 / uint4 packed two per byte), scales and zero points `[E, blocks, N]` behind a blocked
//! `DequantizeLinear` (`axis = 1`). [`QuantizedStack`] reads one expert's codes as they are stored (for `QMoE`,
//! `quantized.rs`) or dequantized (for the float `MoE`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use r1_proto::onnx::tensor_proto::{DataLocation, DataType};
use r1_proto::onnx::{StringStringEntryProto, TensorProto};

use crate::error::{ExportError, Result};
use crate::onnx::{ElemType, ExternalDataWriter, ExternalSpan};

fn graph_err(message: String) -> ExportError {
    ExportError::Graph(format!("sparse experts: {message}"))
}

/// The float element type of an initializer the operator can take (float32 or float16), `None` for others.
pub(super) fn float_type(t: &TensorProto) -> Option<ElemType> {
    match t.data_type {
        Some(d) if d == DataType::Float as i32 => Some(ElemType::F32),
        Some(d) if d == DataType::Float16 as i32 => Some(ElemType::F16),
        _ => None,
    }
}

/// Where an initializer's payload is: inline, or a byte range of an external file.
enum Payload<'t> {
    Inline(&'t [u8]),
    File { file: File, path: PathBuf, offset: u64 },
}

/// Ranged reads of one initializer's payload.
pub(super) struct Reader<'t> {
    name: String,
    payload: Payload<'t>,
    len: u64,
}

impl<'t> Reader<'t> {
    /// Opens `t`'s payload; external locations resolve against `dir` and must stay inside it.
    pub(super) fn open(t: &'t TensorProto, dir: &Path) -> Result<Reader<'t>> {
        let name = t.name.clone().unwrap_or_default();
        if t.data_location != Some(DataLocation::External as i32) {
            let raw = t.raw_data.as_deref().ok_or_else(|| graph_err(format!("`{name}` has no raw_data")))?;
            return Ok(Reader { name, len: raw.len() as u64, payload: Payload::Inline(raw) });
        }
        let entry =
            |k: &str| t.external_data.iter().find(|e| e.key.as_deref() == Some(k)).and_then(|e| e.value.clone());
        let location = entry("location").unwrap_or_default();
        let rel = Path::new(&location);
        if location.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(graph_err(format!("`{name}`: external location `{location}` is not inside the model folder")));
        }
        let number = |k: &str| -> Result<Option<u64>> {
            entry(k)
                .map(|v| v.parse::<u64>().map_err(|_| graph_err(format!("`{name}`: `{k}` is `{v}`, not a number"))))
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let path = dir.join(rel);
        let file = File::open(&path).map_err(ExportError::io(&path))?;
        let file_len = file.metadata().map_err(ExportError::io(&path))?.len();
        let len = number("length")?.unwrap_or(file_len.saturating_sub(offset));
        if offset.saturating_add(len) > file_len {
            return Err(graph_err(format!(
                "`{name}`: bytes {offset}..{} are past the end of {}",
                offset + len,
                path.display()
            )));
        }
        Ok(Reader { name, len, payload: Payload::File { file, path, offset } })
    }

    /// Fills `buf` from byte `start` of the payload.
    fn read_at(&self, start: u64, buf: &mut [u8]) -> Result<()> {
        let end = start + buf.len() as u64;
        if end > self.len {
            return Err(graph_err(format!("`{}`: bytes {start}..{end} of {}", self.name, self.len)));
        }
        match &self.payload {
            Payload::Inline(raw) => buf.copy_from_slice(&raw[start as usize..end as usize]),
            Payload::File { file, path, offset } => {
                file.read_exact_at(buf, offset + start).map_err(ExportError::io(path))?
            }
        }
        Ok(())
    }
}

/// `[rows, cols]` → `[cols, rows]`, in 32×32 tiles so that reads and writes both stay in cache.
fn transpose<T: Copy + Default>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
    const TILE: usize = 32;
    let mut out = vec![T::default(); m.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = m[r * cols + c];
                }
            }
        }
    }
    out
}

/// How a quantized stack's codes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Codes {
    /// int8, one byte each.
    Int8,
    /// Signed int4 (symmetric), two per byte, the even element in the low nibble.
    Int4,
    /// Unsigned int4 with zero points (asymmetric), packed the same way.
    Uint4,
}

impl Codes {
    /// The codes of an ONNX element type, `None` for others.
    pub(super) fn of(data_type: Option<i32>) -> Option<Codes> {
        match data_type {
            Some(d) if d == DataType::Int8 as i32 => Some(Codes::Int8),
            Some(d) if d == DataType::Int4 as i32 => Some(Codes::Int4),
            Some(d) if d == DataType::Uint4 as i32 => Some(Codes::Uint4),
            _ => None,
        }
    }

    /// Stored bytes of `count` codes.
    fn bytes(self, count: usize) -> usize {
        if self == Codes::Int8 {
            count
        } else {
            count.div_ceil(2)
        }
    }
}

/// One expert's quantized `[k, n]` matrix as the portable graph stores it.
pub(super) struct ExpertCodes {
    /// Codes `[k, n]`, unpacked: int8 and int4 as signed values, uint4 as `0..=15`.
    pub codes: Vec<i16>,
    /// Scales `[blocks, n]`.
    pub scales: Vec<f32>,
    /// Zero points `[blocks, n]` (uint4 only).
    pub zeros: Option<Vec<i16>>,
}

/// A stack quantized in the portable graph: `[E, k, n]` codes, `[E, blocks, n]` scales (and zero points), blocks of
/// `block` rows along K.
pub(super) struct QuantizedStack<'t> {
    pub codes: Reader<'t>,
    pub scales: Reader<'t>,
    pub zeros: Option<Reader<'t>>,
    pub form: Codes,
    pub block: usize,
    pub k: usize,
    pub n: usize,
}

/// `count` packed 4-bit values from `bytes`, sign-extended when `signed`.
fn unpack4(bytes: &[u8], count: usize, signed: bool) -> Vec<i16> {
    (0..count)
        .map(|j| {
            let nibble = if j % 2 == 0 { bytes[j / 2] & 0xF } else { bytes[j / 2] >> 4 };
            if signed {
                i16::from(((nibble << 4) as i8) >> 4)
            } else {
                i16::from(nibble)
            }
        })
        .collect()
}

impl QuantizedStack<'_> {
    /// The codes tensor's name.
    pub(super) fn codes_name(&self) -> &str {
        &self.codes.name
    }

    /// Blocks along K.
    pub(super) fn blocks(&self) -> usize {
        self.k.div_ceil(self.block)
    }

    /// Expert `e`'s codes, scales and zero points. Packed experts must each end on a byte (the export lays them end
    /// to end only then).
    pub(super) fn expert(&self, e: usize) -> Result<ExpertCodes> {
        let (k, n, nb) = (self.k, self.n, self.blocks());
        if self.form != Codes::Int8 && ((k * n) % 2 != 0 || (self.zeros.is_some() && (nb * n) % 2 != 0)) {
            return Err(graph_err(format!("`{}`: packed 4-bit experts of odd size", self.codes.name)));
        }
        let bytes = self.form.bytes(k * n);
        let mut raw = vec![0u8; bytes];
        self.codes.read_at((e * bytes) as u64, &mut raw)?;
        let codes = match self.form {
            Codes::Int8 => raw.iter().map(|&b| i16::from(b as i8)).collect(),
            Codes::Int4 => unpack4(&raw, k * n, true),
            Codes::Uint4 => unpack4(&raw, k * n, false),
        };
        let scales = read_expert::<f32>(&self.scales, e, nb * n)?;
        let zeros = match &self.zeros {
            Some(z) if self.form == Codes::Uint4 => {
                let mut raw = vec![0u8; (nb * n) / 2];
                z.read_at((e * raw.len()) as u64, &mut raw)?;
                Some(unpack4(&raw, nb * n, false))
            }
            // int8's zero points are all zero (symmetric per channel): checked, not used.
            Some(z) => {
                let raw = read_expert::<u8>(z, e, nb * n)?;
                if raw.iter().any(|&v| v != 0) {
                    return Err(graph_err(format!("`{}`: int8 experts with nonzero zero points", z.name)));
                }
                None
            }
            None => None,
        };
        Ok(ExpertCodes { codes, scales, zeros })
    }

    /// Expert `e` dequantized (`(code - zero point) · scale`, as `DequantizeLinear` computes it), `[k, n]`.
    pub(super) fn dequantize(&self, e: usize) -> Result<Vec<f32>> {
        let c = self.expert(e)?;
        let n = self.n;
        Ok((0..self.k * n)
            .map(|j| {
                let b = (j / n / self.block) * n + j % n;
                let z = c.zeros.as_ref().map_or(0, |z| z[b]);
                f32::from(c.codes[j] - z) * c.scales[b]
            })
            .collect())
    }
}

/// One of the portable graph's expert stacks: float, or quantized.
pub(super) enum Stack<'t> {
    Float(Reader<'t>),
    Quantized(QuantizedStack<'t>),
}

impl Stack<'_> {
    /// Expert `e`'s `count` elements as `T` (the stack's float type; a quantized stack is dequantized to float32).
    pub(super) fn expert<T: bytemuck::Pod + Default>(&self, e: usize, count: usize) -> Result<Vec<T>> {
        match self {
            Stack::Float(r) => read_expert(r, e, count),
            Stack::Quantized(q) => {
                let v = q.dequantize(e)?;
                if std::mem::size_of::<T>() != 4 || v.len() != count {
                    return Err(graph_err(format!("`{}`: dequantized experts are float32", q.codes.name)));
                }
                Ok(bytemuck::cast_slice(&v).to_vec())
            }
        }
    }
}

/// The portable graph's three expert stacks of one layer.
pub(super) struct Stacks<'t> {
    pub gate: Stack<'t>,
    pub up: Stack<'t>,
    pub down: Stack<'t>,
    pub experts: usize,
    pub hidden: usize,
    pub inter: usize,
}

/// One expert's `fc1` (`[2I, H]`, gate and up rows interleaved) from its `gate` and `up` (`[H, I]` each).
fn expert_fc1<T: Copy + Default>(gate: &[T], up: &[T], h: usize, i: usize) -> Vec<T> {
    let (g, u) = (transpose(gate, h, i), transpose(up, h, i));
    let mut fc1 = Vec::with_capacity(2 * i * h);
    for j in 0..i {
        fc1.extend_from_slice(&g[j * h..(j + 1) * h]);
        fc1.extend_from_slice(&u[j * h..(j + 1) * h]);
    }
    fc1
}

/// Expert `e`'s `n` elements of the stack `r`.
pub(super) fn read_expert<T: bytemuck::Pod + Default>(r: &Reader, e: usize, n: usize) -> Result<Vec<T>> {
    let mut v = vec![T::default(); n];
    let bytes = (n * std::mem::size_of::<T>()) as u64;
    r.read_at(e as u64 * bytes, bytemuck::cast_slice_mut(&mut v))?;
    Ok(v)
}

/// Two passes over the experts, so that each tensor is written contiguously with one expert in memory: `fc1` from
/// gate and up, then `fc2` (down, `[I, H]` → `[H, I]`).
fn write_relayed<T: bytemuck::Pod + Default>(
    s: &Stacks,
    w: &mut ExternalDataWriter,
) -> Result<(ExternalSpan, ExternalSpan)> {
    let (h, i) = (s.hidden, s.inter);
    w.begin()?;
    for e in 0..s.experts {
        let fc1 = expert_fc1(&s.gate.expert::<T>(e, h * i)?, &s.up.expert::<T>(e, h * i)?, h, i);
        w.write(bytemuck::cast_slice(&fc1))?;
    }
    let fc1 = w.end()?;
    w.begin()?;
    for e in 0..s.experts {
        let fc2 = transpose(&s.down.expert::<T>(e, h * i)?, i, h);
        w.write(bytemuck::cast_slice(&fc2))?;
    }
    Ok((fc1, w.end()?))
}

/// Writes one layer's `fc1` then `fc2` to `w`, in element type `dtype`; returns their ranges.
pub(super) fn write_layer(
    s: &Stacks,
    dtype: ElemType,
    w: &mut ExternalDataWriter,
) -> Result<(ExternalSpan, ExternalSpan)> {
    match dtype {
        ElemType::F32 => write_relayed::<u32>(s, w),
        ElemType::F16 => write_relayed::<u16>(s, w),
        other => Err(graph_err(format!("experts of type {} cannot be relaid", other.name()))),
    }
}

/// An initializer whose payload is `range` of the external file `location`.
pub(super) fn external_tensor(
    name: &str,
    dtype: ElemType,
    dims: &[i64],
    location: &str,
    range: ExternalSpan,
) -> TensorProto {
    let entry = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
    TensorProto {
        name: Some(name.into()),
        data_type: Some(dtype.onnx_code()),
        dims: dims.to_vec(),
        data_location: Some(DataLocation::External as i32),
        external_data: vec![
            entry("location", location.to_string()),
            entry("offset", range.offset.to_string()),
            entry("length", range.length.to_string()),
        ],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_nibbles_unpack_low_first_and_sign_extend() {
        assert_eq!(unpack4(&[0x21, 0xF8], 4, false), [1, 2, 8, 15]);
        assert_eq!(unpack4(&[0x21, 0xF8], 4, true), [1, 2, -8, -1]);
    }

    #[test]
    fn transpose_crosses_tile_edges() {
        let (rows, cols) = (37, 70);
        let m: Vec<u32> = (0..(rows * cols) as u32).collect();
        let t = transpose(&m, rows, cols);
        for r in 0..rows {
            for c in 0..cols {
                assert_eq!(t[c * rows + r], m[r * cols + c]);
            }
        }
    }

    #[test]
    fn relay_interleaves_gate_and_up_rows_and_transposes_down() {
        // h = 2, i = 3: gate[h][j] = 10h + j, up = 100 + gate, down[j][h] = 1000 + 10j + h.
        let gate: Vec<u32> = (0..2).flat_map(|h| (0..3).map(move |j| 10 * h + j)).collect();
        let up: Vec<u32> = gate.iter().map(|v| 100 + v).collect();
        let down: Vec<u32> = (0..3).flat_map(|j| (0..2).map(move |h| 1000 + 10 * j + h)).collect();
        // fc1 [2i, h]: row 2j = gate column j, row 2j+1 = up column j.
        assert_eq!(expert_fc1(&gate, &up, 2, 3), [0, 10, 100, 110, 1, 11, 101, 111, 2, 12, 102, 112]);
        // fc2 [h, i]: fc2[h][j] = down[j][h].
        assert_eq!(transpose(&down, 3, 2), [1000, 1010, 1020, 1001, 1011, 1021]);
    }
}
