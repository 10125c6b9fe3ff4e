//! The ort backend's bound present: the portable graph's `present.*` outputs left where ONNX Runtime made them (on
//! the GPU under TensorRT or the CUDA provider) and fed back as the next step's past, so a steady decode step moves
//! no cache between host and device. Only the logits and the step's new positions cross back: the new positions,
//! `[batch, heads, seq, dim]` per layer and kind (one strided copy each, [`crate::kv::device::copy_rows_out`]), are
//! what the engine appends to its host pool, which a step with a new set of rows gathers from.
//!
//! Why not the pool in place, as the serving graphs do (`ort_in_place.rs`): TensorRT has no `GroupQueryAttention`,
//! so a TensorRT engine is built from the portable graph, whose attention is `Concat(past, new)`: its present is a
//! new tensor one position longer than its past, never the past's memory. Binding both on the device is what that
//! contract allows (`docs/kv-cache-pool.md`, "TensorRT").
//!
//! On the CPU provider the same binding runs with the present in host memory (`BackendOptions::bind_present` =
//! `PresentBinding::Always`), which is how CI checks this path; the copies out go through the same stride arithmetic.
//! `PresentBinding::Never` (`R1_BIND_PRESENT=never` on r1-serve) turns it off on the GPU providers.

use half::f16;
use ndarray::{Array3, Array4};
use ort::session::{RunOptions, Session};
use ort::value::{DynValue, Tensor, ValueType};
use ort::AsPointer;

use super::ort::{be, logits_of};
use super::ort_in_place::{pool_memory_info, unknown_input, StepValues};
use super::{KvPair, StepInput};
use crate::error::{EngineError, Result};
use crate::kv::PoolDevice;
use crate::manifest::{names, DType};

/// A step's present tensors where ONNX Runtime allocated them: `[key 0, value 0, key 1, value 1, ...]`, each
/// `[batch, heads, total, dim]` of `dtype`, in the memory of `device`.
pub struct BoundPresent {
    pub(super) values: Vec<DynValue>,
    pub(super) device: PoolDevice,
    pub(super) dtype: DType,
}

impl std::fmt::Debug for BoundPresent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BoundPresent({} tensors of {:?} in {})", self.values.len(), self.dtype, self.device)
    }
}

impl BoundPresent {
    /// Each tensor's shape, in the order of [`BoundPresent::values`].
    pub fn shapes(&self) -> Result<Vec<Vec<usize>>> {
        self.values
            .iter()
            .map(|v| match v.dtype() {
                ValueType::Tensor { shape, .. } => Ok(shape.iter().map(|&d| d.max(0) as usize).collect()),
                other => Err(be(format!("bound present: a {other} value, not a tensor"))),
            })
            .collect()
    }

    /// Positions `from .. from + n` of every layer's key and value, copied to the host as float32
    /// (`[batch, heads, n, dim]` each): one strided copy per tensor, nothing else of the cache.
    pub fn positions(&self, from: usize, n: usize) -> Result<Vec<KvPair>> {
        let shapes = self.shapes()?;
        let mut out = Vec::with_capacity(self.values.len() / 2);
        let mut layer = Vec::with_capacity(2);
        for (v, shape) in self.values.iter().zip(&shapes) {
            let &[b, h, total, d] = shape.as_slice() else {
                return Err(EngineError::Shape {
                    name: "present".into(),
                    expected: "[batch, heads, total, dim]".into(),
                    got: format!("{shape:?}"),
                });
            };
            if from + n > total {
                return Err(EngineError::Shape {
                    name: "present".into(),
                    expected: format!("at least {} positions", from + n),
                    got: format!("{total}"),
                });
            }
            let e = self.dtype.size();
            let mut bytes = vec![0u8; b * h * n * d * e];
            // SAFETY: the tensor holds `b · h · total · d` values of `dtype` in `device`'s memory and lives across
            // the call; row `(b, h)`'s positions `from .. from + n` start at `((b · h) · total + from) · d` values.
            unsafe {
                let src = data_ptr(v)?.add(from * d * e);
                crate::kv::device::copy_rows_out(self.device, src, total * d * e, n * d * e, &mut bytes)?;
            }
            let floats: Vec<f32> = match self.dtype {
                DType::Float16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
                DType::Float32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                DType::Int64 => return Err(be("bound present: an int64 cache")),
            };
            layer.push(Array4::from_shape_vec((b, h, n, d), floats).map_err(be)?.into_dyn());
            if layer.len() == 2 {
                let value = layer.pop().expect("two tensors");
                let key = layer.pop().expect("two tensors");
                out.push(KvPair { key, value });
            }
        }
        Ok(out)
    }
}

/// The address of a tensor value's data (host or device memory, as its memory info says).
fn data_ptr(v: &DynValue) -> Result<*const u8> {
    let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
    // SAFETY: `v` is a live tensor value; ONNX Runtime writes its data pointer to `p`.
    let status = unsafe { (ort::api().GetTensorMutableData)(v.ptr().cast_mut(), &mut p) };
    if !status.0.is_null() {
        // SAFETY: released once; the message is not needed (the value is a tensor, so this cannot fail in practice).
        unsafe { (ort::api().ReleaseStatus)(status.0) };
        return Err(be("bound present: ONNX Runtime gave no data pointer for a present tensor"));
    }
    Ok(p.cast_const().cast())
}

/// A host float32 array as an owned tensor of the graph's `dtype` (bound as it is; ONNX Runtime copies it to the
/// device its provider runs on).
fn host_value(a: &ndarray::ArrayD<f32>, dtype: DType) -> Result<DynValue> {
    Ok(match dtype {
        DType::Float16 => Tensor::from_array(a.mapv(f16::from_f32)).map_err(be)?.into_dyn(),
        _ => Tensor::from_array(a.as_standard_layout().into_owned()).map_err(be)?.into_dyn(),
    })
}

/// One pass of the portable graph with its present outputs bound on `device` and its past taken from `kept` (the
/// previous pass's bound present, for the same rows) or else from `input.past` (host float32, converted to each
/// input's type in `inputs`). Returns the logits (on the host) and the new bound present.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    session: &mut Session,
    inputs: &[(String, DType)],
    logits_dtype: DType,
    present_dtype: DType,
    num_layers: usize,
    input: &StepInput,
    kept: Option<&BoundPresent>,
    device: PoolDevice,
    options: Option<&RunOptions>,
) -> Result<(Array3<f32>, BoundPresent)> {
    let host = pool_memory_info(PoolDevice::Host)?;
    let on_device = pool_memory_info(device)?;
    let step = StepValues::of(input)?;
    let mut host_past = Vec::new();
    if kept.is_none() {
        for (name, dtype) in inputs {
            if let Some((layer, is_key)) = names::parse_past(name) {
                let p = input.past.get(layer).ok_or_else(|| EngineError::Shape {
                    name: name.clone(),
                    expected: format!("{num_layers} past layers"),
                    got: format!("{}", input.past.len()),
                })?;
                host_past.push((name.as_str(), host_value(if is_key { &p.key } else { &p.value }, *dtype)?));
            }
        }
    }
    let mut binding = session.create_binding().map_err(be)?;
    for (name, _) in inputs {
        if let Some(bound) = step.bind(&mut binding, name) {
            bound.map_err(be)?;
            continue;
        }
        let other = name.as_str();
        match (names::parse_past(other), kept) {
            (Some((layer, is_key)), Some(k)) if 2 * layer + 1 < k.values.len() => {
                // An owned value ONNX Runtime allocated: bound as it is, not copied.
                binding.bind_input(name, &k.values[2 * layer + usize::from(!is_key)])
            }
            (Some(_), None) => {
                let v = host_past.iter().find(|(n, _)| *n == other).map(|(_, v)| v).ok_or_else(|| be(other))?;
                binding.bind_input(name, v)
            }
            _ => return Err(unknown_input(other)),
        }
        .map_err(be)?;
    }
    binding.bind_output_to_device("logits", &host).map_err(be)?;
    for layer in 0..num_layers {
        binding.bind_output_to_device(names::present_key(layer), &on_device).map_err(be)?;
        binding.bind_output_to_device(names::present_value(layer), &on_device).map_err(be)?;
    }
    let mut outputs = match options {
        Some(o) => session.run_binding_with_options(&binding, o),
        None => session.run_binding(&binding),
    }
    .map_err(be)?;
    let logits = logits_of(&outputs, logits_dtype)?;
    let mut values = Vec::with_capacity(2 * num_layers);
    for layer in 0..num_layers {
        for name in [names::present_key(layer), names::present_value(layer)] {
            values.push(outputs.remove(&name).ok_or_else(|| be(format!("graph returned no `{name}`")))?);
        }
    }
    drop(outputs);
    drop(binding);
    Ok((logits, BoundPresent { values, device, dtype: present_dtype }))
}
