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
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use ort::AsPointer;

use super::ort::{be, logits_of};
use super::StepInput;
use crate::error::{EngineError, Result};
use crate::kv::{KvPool, PoolDevice};
use crate::manifest::{names, DType};

/// An owned ONNX Runtime tensor of `dtype` (float32 or float16) and `shape` over `data` (not copied, never freed
/// by ONNX Runtime).
///
/// # Safety
/// `data` must hold `shape`'s product of `dtype` values and outlive every use of the returned value.
unsafe fn value_over(
    data: *mut u8,
    dtype: DType,
    shape: [i64; 4],
    info: &MemoryInfo,
    allocator: &Allocator,
) -> Result<DynValue> {
    let elements: i64 = shape.iter().product();
    let bytes = usize::try_from(elements).map_err(be)? * dtype.size();
    let element_type = match dtype {
        DType::Float16 => ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
        _ => ort::sys::ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
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
        return Err(be(format!("cannot wrap the KV pool as a tensor: {message}")));
    }
    let ptr = NonNull::new(out).ok_or_else(|| be("ONNX Runtime returned no tensor for the KV pool"))?;
    // SAFETY: a valid tensor value just created over memory ONNX Runtime does not own (it never frees it); ort keeps
    // the allocator only for values it allocated itself.
    Ok(unsafe { DynValue::from_ptr(ptr, Some(allocator)) })
}

/// An int64 input as an owned tensor (bound without a copy of a copy).
fn int_value(a: &ndarray::Array2<i64>) -> Result<DynValue> {
    Ok(Tensor::from_array(a.as_standard_layout().into_owned()).map_err(be)?.into_dyn())
}

/// Runs `session` over slots `first .. first + n` of `pool` (see [`super::Backend::run_in_place`]).
pub(super) fn run(
    session: &mut Session,
    inputs: &[(String, DType)],
    logits_dtype: DType,
    input: &StepInput,
    pool: &mut KvPool,
    first: usize,
    n: usize,
) -> Result<Array3<f32>> {
    let (b, _) = input.input_ids.dim();
    if b != n || first + n > pool.slots() || !input.past.is_empty() {
        return Err(EngineError::Shape {
            name: "in-place step".into(),
            expected: format!("{n} rows, no host past, slots within {}", pool.slots()),
            got: format!("{b} rows, {} past layers, slots {first}..{}", input.past.len(), first + n),
        });
    }
    let g = pool.geometry();
    let cap = pool.capacity() as i64;
    let host = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default).map_err(be)?;
    // The pool's tensors are described by where the pool lives: ONNX Runtime's CUDA kernels read and append them on
    // the GPU, and only the logits (bound to host memory below) cross back.
    let info = match pool.device() {
        PoolDevice::Host => host.clone(),
        PoolDevice::Cuda { id } => {
            MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default).map_err(be)?
        }
    };
    let allocator = Allocator::default();
    // One value per layer and kind, bound as the past input and the present output.
    let mut kv: Vec<(DynValue, DynValue)> = Vec::with_capacity(g.num_layers);
    for layer in 0..g.num_layers {
        let r = pool.layer_range(layer, first, n)?;
        let ks = [n as i64, g.key_heads as i64, cap, g.key_dim as i64];
        let vs = [n as i64, g.value_heads as i64, cap, g.value_dim as i64];
        // SAFETY: `layer_range` points at `n` slots of this layer, which live as long as `pool`, borrowed mutably
        // for this whole call; the values are dropped before it returns.
        let pair = unsafe {
            (
                value_over(r.key, pool.dtype(), ks, &info, &allocator)?,
                value_over(r.value, pool.dtype(), vs, &info, &allocator)?,
            )
        };
        kv.push(pair);
    }
    let mut binding = session.create_binding().map_err(be)?;
    for (name, _) in inputs {
        match name.as_str() {
            names::INPUT_IDS => binding.bind_input(name, &int_value(&input.input_ids)?),
            names::ATTENTION_MASK => binding.bind_input(name, &int_value(&input.attention_mask)?),
            names::POSITION_IDS => binding.bind_input(name, &int_value(&input.position_ids)?),
            other => match names::parse_past(other) {
                Some((layer, is_key)) if layer < kv.len() => {
                    let v = if is_key { &kv[layer].0 } else { &kv[layer].1 };
                    binding.bind_input(name, v)
                }
                _ => {
                    return Err(EngineError::Shape {
                        name: other.to_string(),
                        expected: "an input the engine provides".into(),
                        got: "an unknown graph input".into(),
                    })
                }
            },
        }
        .map_err(be)?;
    }
    for (layer, (k, v)) in kv.iter_mut().enumerate() {
        binding.bind_output(names::present_key(layer), k).map_err(be)?;
        binding.bind_output(names::present_value(layer), v).map_err(be)?;
    }
    binding.bind_output_to_device("logits", &host).map_err(be)?;
    let outputs = session.run_binding(&binding).map_err(be)?;
    let logits = logits_of(&outputs, logits_dtype)?;
    drop(outputs);
    drop(binding);
    drop(kv);
    Ok(logits)
}
