//! The routed experts' weights, moved from the portable graph's layout to `com.microsoft.MoE`'s, one expert at a
//! time: the portable graph stacks them for batched MatMuls (`gate_proj`, `up_proj`: `[E, H, I]`; `down_proj`:
//! `[E, I, H]`, each expert's matrix transposed from the checkpoint), the operator wants the checkpoint's own
//! orientation with gate and up interleaved (`fc1`: `[E, 2I, H]`, row `2j` = gate row `j`, row `2j + 1` = up row
//! `j`; `fc2`: `[E, H, I]`). Reads are ranged (one expert of one tensor in memory), so a model larger than memory
//! relays in bounded memory.

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

/// The portable graph's three expert stacks of one layer.
pub(super) struct Stacks<'t> {
    pub gate: Reader<'t>,
    pub up: Reader<'t>,
    pub down: Reader<'t>,
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
        let fc1 = expert_fc1(&read_expert::<T>(&s.gate, e, h * i)?, &read_expert::<T>(&s.up, e, h * i)?, h, i);
        w.write(bytemuck::cast_slice(&fc1))?;
    }
    let fc1 = w.end()?;
    w.begin()?;
    for e in 0..s.experts {
        let fc2 = transpose(&read_expert::<T>(&s.down, e, h * i)?, i, h);
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
