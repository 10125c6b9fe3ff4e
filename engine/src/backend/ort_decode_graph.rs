//! Decode steps at fixed shapes and addresses, so that ONNX Runtime's CUDA provider can capture each one as a CUDA
//! graph and replay it (`enable_cuda_graph`, run option `gpu_graph_id`): one launch per step instead of one per
//! kernel, and no host tensor in the loop.
//!
//! A step qualifies when every row feeds one token and its rows are the pool's slots `0 .. n` (the engine keeps
//! running sequences there). For each `n` the step's tensors are the same memory every time, allocated once where the
//! pool lives ([`Stage`]):
//!
//! - `input_ids [n, 1]` and `position_ids [n, 1]`: the first `n` entries of two staged vectors;
//! - `attention_mask [n, capacity]`: the first `n` rows of a staged `[slots, capacity]` matrix that stays zero except
//!   column 0, which holds each row's total length. The serving graphs read the mask only through its row sums
//!   (`seqlens_k = Σ mask − 1`, and the last-position gather's count over the last `S` columns, which for `S = 1` is
//!   an index of −1 or 0 into one position: the same position) and its width (`total_sequence_length`, which is then
//!   the pool's capacity for every step, as ONNX Runtime GenAI passes its `max_length`). So a step uploads `n` counts
//!   with one strided copy instead of a `[n, capacity]` matrix; `tests/tests/cuda_serving_graph.rs` checks on the CPU
//!   provider that this layout gives the logits of the plain step;
//! - every layer's past and present: slots `0 .. n` of the pool, in place (`ort_in_place.rs`);
//! - `logits [n, 1, vocab]`: the first `n` rows of a staged buffer, downloaded after the run.
//!
//! With a CUDA pool the stages are device buffers (`kv/device.rs`) and the run carries `gpu_graph_id = n`: ONNX
//! Runtime captures the graph for `n` on its first runs and replays it afterwards, reading the uploaded ids, counts
//! and positions from the same addresses. Every other run of such a session carries `gpu_graph_id = -1` (never
//! captured: prefill chunks and steps over other slots change shapes). On the CPU provider the same layout runs
//! uncaptured, which is how CI checks it. *Capture itself has not run yet: no GPU was lent to the session that wrote
//! it*; `docs/kv-cache-pool.md` lists what ONNX Runtime requires of a captured graph.

use std::collections::{BTreeSet, HashMap};

use ndarray::Array3;
use ort::memory::Allocator;
use ort::session::{RunOptions, Session};

use super::ort::be;
use super::ort_in_place::{bind_step, pool_memory_info, pool_values, value_over, StepValues};
use super::StepInput;
use crate::error::{EngineError, Result};
use crate::kv::device::DeviceBuffer;
use crate::kv::{KvPool, PoolDevice};
use crate::manifest::DType;

/// The run option that names a captured CUDA graph (`-1`: run without capturing or replaying).
pub(super) const GRAPH_ID_OPTION: &str = "gpu_graph_id";

/// Run options that keep a run of a capturing session out of every CUDA graph.
pub(super) fn uncaptured_run() -> Result<RunOptions> {
    let mut o = RunOptions::new().map_err(be)?;
    o.set(GRAPH_ID_OPTION, "-1").map_err(be)?;
    Ok(o)
}

/// One staged tensor's memory, where the pool lives.
enum Stage {
    /// Host memory (8-byte aligned).
    Host(Vec<u64>),
    /// A CUDA device buffer.
    Cuda(DeviceBuffer),
}

impl Stage {
    fn new(place: PoolDevice, bytes: usize, what: &str) -> Result<Stage> {
        Ok(match place {
            PoolDevice::Host => Stage::Host(vec![0u64; bytes.div_ceil(8)]),
            PoolDevice::Cuda { id } => Stage::Cuda(DeviceBuffer::new(id, bytes, what)?),
        })
    }

    fn ptr(&mut self) -> Result<*mut u8> {
        match self {
            Stage::Host(v) => Ok(v.as_mut_ptr().cast()),
            Stage::Cuda(b) => b.ptr_at(0),
        }
    }

    fn host_bytes(v: &mut [u64]) -> &mut [u8] {
        // SAFETY: any bytes are valid u8s; the slice covers exactly the vector's memory.
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len() * 8) }
    }

    /// Writes `data` at byte `offset`.
    fn write(&mut self, offset: usize, data: &[u8]) -> Result<()> {
        match self {
            Stage::Host(v) => {
                let bytes = Self::host_bytes(v);
                let end = offset.checked_add(data.len()).filter(|e| *e <= bytes.len()).ok_or_else(|| {
                    EngineError::InvalidArgument {
                        name: "staged input".into(),
                        message: format!("bytes {offset}+{} beyond its {} bytes", data.len(), bytes.len()),
                    }
                })?;
                bytes[offset..end].copy_from_slice(data);
                Ok(())
            }
            Stage::Cuda(b) => b.upload(offset, data),
        }
    }

    /// Writes the `width`-byte pieces of `data` at `offset + r · pitch` (one column of a row-major matrix).
    fn write_column(&mut self, offset: usize, pitch: usize, width: usize, data: &[u8]) -> Result<()> {
        match self {
            Stage::Host(_) => {
                for (r, piece) in data.chunks(width.max(1)).enumerate() {
                    self.write(offset + r * pitch, piece)?;
                }
                Ok(())
            }
            Stage::Cuda(b) => b.upload_strided(offset, pitch, width, data),
        }
    }

    /// Reads `out.len()` bytes from the start.
    fn read(&mut self, out: &mut [u8]) -> Result<()> {
        match self {
            Stage::Host(v) => {
                let bytes = Self::host_bytes(v);
                let src = bytes.get(..out.len()).ok_or_else(|| EngineError::InvalidArgument {
                    name: "staged output".into(),
                    message: format!("{} bytes asked of {}", out.len(), bytes.len()),
                })?;
                out.copy_from_slice(src);
                Ok(())
            }
            Stage::Cuda(b) => b.download(0, out),
        }
    }
}

/// Each row's total length (its attention mask's sum), checked to lie in `1 ..= capacity`.
pub(super) fn row_lengths(mask: &ndarray::Array2<i64>, capacity: usize) -> Result<Vec<i64>> {
    mask.rows()
        .into_iter()
        .enumerate()
        .map(|(r, row)| {
            let total: i64 = row.sum();
            if total < 1 || total as usize > capacity {
                return Err(EngineError::Shape {
                    name: format!("attention_mask row {r}"),
                    expected: format!("a total length of 1 ..= {capacity} (the pool's capacity)"),
                    got: total.to_string(),
                });
            }
            Ok(total)
        })
        .collect()
}

fn i64_bytes(xs: &[i64]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

/// The staged tensors of fixed-shape decode steps and, on CUDA, which row counts have a graph.
pub(super) struct DecodeGraphs {
    place: PoolDevice,
    /// Rows staged for: the pool's slots.
    rows: usize,
    /// The mask's width: the pool's capacity.
    capacity: usize,
    vocab: usize,
    logits_dtype: DType,
    /// Whether runs carry `gpu_graph_id` (the session captures CUDA graphs).
    capture: bool,
    ids: Stage,
    positions: Stage,
    mask: Stage,
    logits: Stage,
    /// Run options per row count (`gpu_graph_id = n`).
    options: HashMap<usize, RunOptions>,
    /// Row counts run so far (each a captured graph on CUDA).
    shapes: BTreeSet<usize>,
}

impl std::fmt::Debug for DecodeGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeGraphs")
            .field("place", &self.place)
            .field("rows", &self.rows)
            .field("capacity", &self.capacity)
            .field("capture", &self.capture)
            .field("shapes", &self.shapes)
            .finish()
    }
}

impl DecodeGraphs {
    /// Stages for `pool` (its slots, capacity and place) and a vocabulary of `vocab` logits of `logits_dtype`.
    pub(super) fn new(pool: &KvPool, vocab: usize, logits_dtype: DType, capture: bool) -> Result<DecodeGraphs> {
        let (place, rows, capacity) = (pool.device(), pool.slots(), pool.capacity());
        let mask_bytes =
            rows.checked_mul(capacity).and_then(|x| x.checked_mul(8)).ok_or_else(|| EngineError::InvalidArgument {
                name: "decode mask".into(),
                message: format!("{rows} slots x {capacity} positions overflow"),
            })?;
        let g = DecodeGraphs {
            place,
            rows,
            capacity,
            vocab,
            logits_dtype,
            capture,
            ids: Stage::new(place, rows * 8, "decode input_ids")?,
            positions: Stage::new(place, rows * 8, "decode position_ids")?,
            mask: Stage::new(place, mask_bytes, "decode attention_mask")?,
            logits: Stage::new(place, rows * vocab * logits_dtype.size(), "decode logits")?,
            options: HashMap::new(),
            shapes: BTreeSet::new(),
        };
        tracing::info!(
            place = %place,
            rows,
            capacity,
            capture,
            "fixed-shape decode steps staged (one CUDA graph per row count where captured)"
        );
        Ok(g)
    }

    /// Whether these stages were made for `pool` (same place, slots and capacity).
    pub(super) fn fits(&self, pool: &KvPool) -> bool {
        (self.place, self.rows, self.capacity) == (pool.device(), pool.slots(), pool.capacity())
    }

    /// Whether a pass over slots `first .. first + n` feeding `input` runs here: decode rows from slot 0.
    pub(super) fn takes(&self, input: &StepInput, first: usize, n: usize) -> bool {
        first == 0 && n >= 1 && n <= self.rows && input.input_ids.dim() == (n, 1) && input.past.is_empty()
    }

    /// Row counts run so far (each its own CUDA graph where captured).
    pub(super) fn shapes(&self) -> &BTreeSet<usize> {
        &self.shapes
    }

    /// One decode step over slots `0 .. n` (see the module docs); returns `[n, 1, vocab]` logits.
    pub(super) fn run(
        &mut self,
        session: &mut Session,
        inputs: &[(String, DType)],
        input: &StepInput,
        pool: &mut KvPool,
        n: usize,
    ) -> Result<Array3<f32>> {
        if !self.takes(input, 0, n) || !self.fits(pool) {
            return Err(EngineError::Shape {
                name: "fixed-shape decode step".into(),
                expected: format!(
                    "1 to {} rows of one token each over slots 0.., a pool of {} positions",
                    self.rows, self.capacity
                ),
                got: format!(
                    "{:?} input ids over {n} slots, a pool of {} x {}",
                    input.input_ids.dim(),
                    pool.slots(),
                    pool.capacity()
                ),
            });
        }
        let lengths = row_lengths(&input.attention_mask, self.capacity)?;
        let ids: Vec<i64> = input.input_ids.column(0).to_vec();
        let positions: Vec<i64> = input.position_ids.column(0).to_vec();
        self.ids.write(0, &i64_bytes(&ids))?;
        self.positions.write(0, &i64_bytes(&positions))?;
        self.mask.write_column(0, self.capacity * 8, 8, &i64_bytes(&lengths))?;

        let info = pool_memory_info(self.place)?;
        let allocator = Allocator::default();
        let (n64, cap) = (n as i64, self.capacity as i64);
        // SAFETY: each stage holds at least the shape given (`rows ≥ n` rows of it) in the memory `info` describes,
        // and lives in `self`, which outlives the values (dropped before this call returns).
        let step = unsafe {
            StepValues {
                input_ids: value_over(self.ids.ptr()?, DType::Int64, &[n64, 1], &info, &allocator)?,
                attention_mask: value_over(self.mask.ptr()?, DType::Int64, &[n64, cap], &info, &allocator)?,
                position_ids: value_over(self.positions.ptr()?, DType::Int64, &[n64, 1], &info, &allocator)?,
            }
        };
        // SAFETY: as above for the logits stage ([rows, vocab] ≥ [n, 1, vocab]).
        let mut logits = unsafe {
            value_over(self.logits.ptr()?, self.logits_dtype, &[n64, 1, self.vocab as i64], &info, &allocator)?
        };
        // SAFETY: the values are dropped below, before this call returns and while `pool` is still borrowed.
        let mut kv = unsafe { pool_values(pool, 0, n, &info, &allocator)? };
        let mut binding = bind_step(session, inputs, &step, &mut kv)?;
        binding.bind_output("logits", &mut logits).map_err(be)?;
        if self.capture && !self.options.contains_key(&n) {
            let mut o = RunOptions::new().map_err(be)?;
            o.set(GRAPH_ID_OPTION, n.to_string()).map_err(be)?;
            self.options.insert(n, o);
        }
        let outputs = match self.options.get(&n) {
            Some(o) if self.capture => session.run_binding_with_options(&binding, o),
            _ => session.run_binding(&binding),
        }
        .map_err(be)?;
        drop(outputs);
        drop(binding);
        drop(kv);
        drop(logits);
        drop(step);
        if self.shapes.insert(n) && self.capture {
            tracing::info!(rows = n, "decode step captured as a CUDA graph");
        }
        let mut bytes = vec![0u8; n * self.vocab * self.logits_dtype.size()];
        self.logits.read(&mut bytes)?;
        let values: Vec<f32> = match self.logits_dtype {
            DType::Float16 => bytes.chunks_exact(2).map(|c| half::f16::from_ne_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::Float32 => bytes.chunks_exact(4).map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::Int64 => return Err(be("logits of type int64")),
        };
        Array3::from_shape_vec((n, 1, self.vocab), values).map_err(|e| EngineError::Shape {
            name: "logits".into(),
            expected: format!("[{n}, 1, {}]", self.vocab),
            got: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn row_lengths_are_mask_sums_within_the_capacity() {
        assert_eq!(row_lengths(&array![[1, 1, 0], [1, 1, 1]], 8).unwrap(), vec![2, 3]);
        let e = row_lengths(&array![[1, 1, 0], [0, 0, 0]], 8).unwrap_err().to_string();
        assert!(e.contains("attention_mask row 1") && e.contains("1 ..= 8") && e.contains('0'), "{e}");
        let e = row_lengths(&array![[1, 1, 1]], 2).unwrap_err().to_string();
        assert!(e.contains("1 ..= 2") && e.contains('3'), "{e}");
    }

    #[test]
    fn a_host_stage_writes_a_column_and_refuses_out_of_range() {
        let mut s = Stage::new(PoolDevice::Host, 3 * 4 * 8, "t").unwrap();
        s.write_column(0, 4 * 8, 8, &i64_bytes(&[5, 6, 7])).unwrap();
        let mut out = vec![0u8; 3 * 4 * 8];
        s.read(&mut out).unwrap();
        let m: Vec<i64> = out.chunks_exact(8).map(|c| i64::from_ne_bytes(c.try_into().unwrap())).collect();
        assert_eq!(m, vec![5, 0, 0, 0, 6, 0, 0, 0, 7, 0, 0, 0]);
        assert!(s.write(3 * 4 * 8 - 4, &[0u8; 8]).is_err());
        assert!(s.read(&mut [0u8; 3 * 4 * 8 + 1]).is_err());
    }

    #[test]
    fn a_cuda_stage_without_the_runtime_names_it() {
        if crate::kv::device::cuda_runtime_available().is_ok() {
            return; // a GPU host: allocation may succeed
        }
        let e = Stage::new(PoolDevice::Cuda { id: 0 }, 64, "decode mask").err().unwrap().to_string();
        assert!(e.contains("libcudart"), "{e}");
    }
}
