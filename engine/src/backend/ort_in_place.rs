//! The ort backend's in-place step: the KV pool's slots bound as both the past inputs and the present outputs of
//! the serving graph, so that ONNX Runtime's `GroupQueryAttention` appends each step's new positions into the pool
//! and copies nothing (`docs/kv-cache-pool.md` records what the kernel requires and what was measured).
//!
//! Binding rules (ort 2.0.0-rc.15): `IoBinding::bind_input` deep-copies a value made over borrowed memory
//! (`TensorRef`, `TensorRefMut::from_raw`), which would silently defeat the aliasing. So each pool range is wrapped
//! as an *owned* ONNX Runtime value over the pool's memory (`CreateTensorWithDataAsOrtValue`, then
//! `Value::from_ptr`): ONNX Runtime never frees memory it did not allocate, and ort binds such a value as it is. The
//! same value is bound as `past_key_values.{i}.*` and `present.{i}.*`; the kernel sees equal pointers and writes in
//! place.

use std::ptr::NonNull;

use ndarray::Array3;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, RunOptions, Session};
use ort::value::{DynValue, Tensor};
use ort::AsPointer;

use super::ort::{be, logits_of};
use super::StepInput;
use crate::error::{EngineError, Result};
use crate::kv::{KvPool, PoolDevice};
use crate::manifest::{names, DType};

/// An owned ONNX Runtime tensor of `dtype` and `shape` over `data` (not copied, never freed by ONNX Runtime).
///
/// # Safety
/// `data` must hold `shape`'s product of `dtype` values, in the memory `info` describes, and outlive every use of
/// the returned value.
pub(super) unsafe fn value_over(
    data: *mut u8,
    dtype: DType,
    shape: &[i64],
    info: &MemoryInfo,
    allocator: &Allocator,
) -> Result<DynValue> {
    let elements: i64 = shape.iter().product();
    let bytes = usize::try_from(elements).map_err(be)? * dtype.size();
    use ort::sys::ONNXTensorElementDataType as E;
    let element_type = match dtype {
        DType::Float16 => E::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
        DType::Float32 => E::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
        DType::Int64 => E::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64,
    };
    let api = ort::api();
    let mut out: *mut ort::sys::OrtValue = std::ptr::null_mut();
    // SAFETY: the caller guarantees `data`; `shape` lives across the call; ONNX Runtime copies the memory info.
    let status = unsafe {
        (api.CreateTensorWithDataAsOrtValue)(
            info.ptr(),
            data.cast(),
            bytes,
            shape.as_ptr(),
            shape.len(),
            element_type,
            &mut out,
        )
    };
    if !status.0.is_null() {
        // SAFETY: a non-null status from the call above; its message is a C string it owns.
        let message =
            unsafe { std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0)) }.to_string_lossy().into_owned();
        // SAFETY: released once.
        unsafe { (api.ReleaseStatus)(status.0) };
        return Err(be(format!("cannot wrap memory as a {shape:?} tensor: {message}")));
    }
    let ptr = NonNull::new(out).ok_or_else(|| be("ONNX Runtime returned no tensor over the given memory"))?;
    // SAFETY: a valid tensor value just created over memory ONNX Runtime does not own (it never frees it); ort keeps
    // the allocator only for values it allocated itself.
    Ok(unsafe { DynValue::from_ptr(ptr, Some(allocator)) })
}

/// The memory info that describes where `pool` lives.
pub(super) fn pool_memory_info(device: PoolDevice) -> Result<MemoryInfo<'static>> {
    match device {
        PoolDevice::Host => MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default),
        PoolDevice::Cuda { id } => {
            MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default)
        }
    }
    .map_err(be)
}

/// One value per layer and kind over slots `first .. first + n` of `pool` (`[n, heads, capacity, dim]`), to be
/// bound as both the past input and the present output.
///
/// # Safety
/// The values point into `pool`: they must be dropped before `pool` is used again (the callers hold it borrowed
/// mutably for the whole run).
pub(super) unsafe fn pool_values(
    pool: &mut KvPool,
    first: usize,
    n: usize,
    info: &MemoryInfo,
    allocator: &Allocator,
) -> Result<Vec<(DynValue, DynValue)>> {
    let g = pool.geometry();
    let cap = pool.capacity() as i64;
    let mut kv = Vec::with_capacity(g.num_layers);
    for layer in 0..g.num_layers {
        let r = pool.layer_range(layer, first, n)?;
        let ks = [n as i64, g.key_heads as i64, cap, g.key_dim as i64];
        let vs = [n as i64, g.value_heads as i64, cap, g.value_dim as i64];
        // SAFETY: `layer_range` points at `n` slots of this layer; the caller keeps the pool alive and unused
        // while the values live.
        let pair = unsafe {
            (
                value_over(r.key, pool.dtype(), &ks, info, allocator)?,
                value_over(r.value, pool.dtype(), &vs, info, allocator)?,
            )
        };
        kv.push(pair);
    }
    Ok(kv)
}

/// A graph input that is neither a step value nor a past the engine provides.
pub(super) fn unknown_input(name: &str) -> EngineError {
    EngineError::Shape {
        name: name.to_string(),
        expected: "an input the engine provides".into(),
        got: "an unknown graph input".into(),
    }
}

/// The step's three integer inputs, bound by name.
pub(super) struct StepValues {
    pub input_ids: DynValue,
    pub attention_mask: DynValue,
    pub position_ids: DynValue,
}

impl StepValues {
    /// The step's ids, mask and positions as owned tensors.
    pub(super) fn of(input: &StepInput) -> Result<StepValues> {
        Ok(StepValues {
            input_ids: int_value(&input.input_ids)?,
            attention_mask: int_value(&input.attention_mask)?,
            position_ids: int_value(&input.position_ids)?,
        })
    }

    /// Binds the value for graph input `name` when it is one of the three; `None` for any other input.
    pub(super) fn bind(&self, binding: &mut IoBinding, name: &str) -> Option<ort::Result<()>> {
        let v = match name {
            names::INPUT_IDS => &self.input_ids,
            names::ATTENTION_MASK => &self.attention_mask,
            names::POSITION_IDS => &self.position_ids,
            _ => return None,
        };
        Some(binding.bind_input(name, v))
    }
}

/// A binding of every graph input (`inputs`, in graph order) and of every layer's present output: the step's
/// values, and each layer's pool value as both its past and its present. The logits are left to the caller.
pub(super) fn bind_step(
    session: &mut Session,
    inputs: &[(String, DType)],
    step: &StepValues,
    kv: &mut [(DynValue, DynValue)],
) -> Result<IoBinding> {
    let mut binding = session.create_binding().map_err(be)?;
    for (name, _) in inputs {
        if let Some(bound) = step.bind(&mut binding, name) {
            bound.map_err(be)?;
            continue;
        }
        let other = name.as_str();
        match names::parse_past(other) {
            Some((layer, is_key)) if layer < kv.len() => {
                let v = if is_key { &kv[layer].0 } else { &kv[layer].1 };
                binding.bind_input(name, v)
            }
            _ => return Err(unknown_input(other)),
        }
        .map_err(be)?;
    }
    for (layer, (k, v)) in kv.iter_mut().enumerate() {
        binding.bind_output(names::present_key(layer), k).map_err(be)?;
        binding.bind_output(names::present_value(layer), v).map_err(be)?;
    }
    Ok(binding)
}

/// An int64 input as an owned tensor (bound without a copy of a copy).
fn int_value(a: &ndarray::Array2<i64>) -> Result<DynValue> {
    Ok(Tensor::from_array(a.as_standard_layout().into_owned()).map_err(be)?.into_dyn())
}

/// Runs `session` over slots `first .. first + n` of `pool` (see [`super::Backend::run_in_place`]); `options`
/// carry the run's settings (a session that captures CUDA graphs is told not to capture this run).
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    session: &mut Session,
    inputs: &[(String, DType)],
    logits_dtype: DType,
    input: &StepInput,
    pool: &mut KvPool,
    first: usize,
    n: usize,
    options: Option<&RunOptions>,
) -> Result<Array3<f32>> {
    let (b, _) = input.input_ids.dim();
    if b != n || first + n > pool.slots() || !input.past.is_empty() {
        return Err(EngineError::Shape {
            name: "in-place step".into(),
            expected: format!("{n} rows, no host past, slots within {}", pool.slots()),
            got: format!("{b} rows, {} past layers, slots {first}..{}", input.past.len(), first + n),
        });
    }
    let host = pool_memory_info(PoolDevice::Host)?;
    // The pool's tensors are described by where the pool lives: ONNX Runtime's CUDA kernels read and append them on
    // the GPU, and only the logits (bound to host memory below) cross back.
    let info = pool_memory_info(pool.device())?;
    let allocator = Allocator::default();
    // SAFETY: the values are dropped below, before this call returns and while `pool` is still borrowed.
    let mut kv = unsafe { pool_values(pool, first, n, &info, &allocator)? };
    let step = StepValues::of(input)?;
    let mut binding = bind_step(session, inputs, &step, &mut kv)?;
    binding.bind_output_to_device("logits", &host).map_err(be)?;
    let outputs = match options {
        Some(o) => session.run_binding_with_options(&binding, o),
        None => session.run_binding(&binding),
    }
    .map_err(be)?;
    let logits = logits_of(&outputs, logits_dtype)?;
    drop(outputs);
    drop(binding);
    drop(kv);
    Ok(logits)
}
