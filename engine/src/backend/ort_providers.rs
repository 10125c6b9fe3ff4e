//! Which ONNX Runtime execution providers a session registers ([`choose_providers`]): CPU, CUDA or TensorRT from
//! `--execution-provider`, the local GPU and whether TensorRT's own libraries load, with the errors that name what is
//! missing. The session itself is made in `ort.rs`.

use std::path::Path;

use ort::ep::{self, ArbitrarilyConfigurableExecutionProvider, ExecutionProvider, ExecutionProviderDispatch};

use super::{BackendOptions, ExecutionProviderKind};
use crate::error::{EngineError, Result};
use crate::manifest::Manifest;
use crate::targets;

/// The execution providers chosen for a session, and the backend name that results.
pub(super) struct EpChoice {
    pub providers: Vec<ExecutionProviderDispatch>,
    pub name: &'static str,
    /// The provider was asked for by name (a provider that fails to register is an error, not a fallback).
    pub explicit: bool,
    /// The local GPU's target (`--target`, else the table's entry for the detected GPU), when a GPU provider was
    /// chosen: whose CUDA serving graph to prefer.
    pub gpu_target: Option<String>,
}

pub(super) fn choose_providers(dir: &Path, manifest: &Manifest, opts: &BackendOptions) -> Result<EpChoice> {
    let cpu = EpChoice { providers: Vec::new(), name: "ort-cpu", explicit: false, gpu_target: None };
    let gpu = targets::detect_local_gpu();
    let explicit = matches!(opts.execution_provider, ExecutionProviderKind::Cuda | ExecutionProviderKind::TensorRt);
    match opts.execution_provider {
        ExecutionProviderKind::Cpu => return Ok(cpu),
        ExecutionProviderKind::Auto if gpu.is_none() => return Ok(cpu),
        _ => {}
    }
    let Some(gpu) = gpu else {
        return Err(EngineError::Unavailable {
            what: format!("`{}` execution provider", opts.execution_provider),
            message: "no NVIDIA GPU was found (nvidia-smi, /proc/driver/nvidia/gpus); use --execution-provider cpu or --backend tract".into(),
        });
    };
    let trt_available = ep::TensorRT::is_available().unwrap_or(false);
    let cuda_available = ep::CUDA::is_available().unwrap_or(false);
    let want_trt = matches!(opts.execution_provider, ExecutionProviderKind::TensorRt | ExecutionProviderKind::Auto);
    // onnxruntime-gpu always lists its TensorRT provider; TensorRT itself may still be missing.
    let trt_missing = if want_trt && trt_available { targets::missing_tensorrt_library() } else { None };
    if let Some(missing) = &trt_missing {
        if matches!(opts.execution_provider, ExecutionProviderKind::TensorRt) {
            return Err(crate::host::tensorrt_not_installed(&gpu, missing));
        }
        tracing::warn!(gpu = %gpu.name, "TensorRT is not installed ({missing}); running on the CUDA provider instead");
    }
    if want_trt && trt_available && trt_missing.is_none() {
        let target = match &opts.target {
            Some(t) => targets::target(t)?,
            None => targets::target_for_gpu_name(&gpu.name).ok_or_else(|| EngineError::Unavailable {
                what: "TensorRT target".into(),
                message: format!("GPU `{}` is not in the target table; pass --target", gpu.name),
            })?,
        };
        if let Some(build) = manifest.targets.tensorrt(target.name).filter(|b| b.built) {
            targets::check_engine_host(build, Some(&gpu))?;
        }
        let (cache_dir, options) = targets::session_tensorrt_options(
            dir,
            manifest,
            target,
            opts.hardware_compatible,
            opts.engine_cache_dir.as_deref(),
        )?;
        std::fs::create_dir_all(&cache_dir).map_err(|source| EngineError::Io { path: cache_dir.clone(), source })?;
        let mut trt = ep::TensorRT::default();
        for (k, v) in options {
            trt = trt.with_arbitrary_config(k, v);
        }
        let mut trt = trt.build();
        let mut cuda = cuda_provider().build();
        if explicit {
            trt = trt.error_on_failure();
            cuda = cuda.error_on_failure();
        }
        return Ok(EpChoice {
            providers: vec![trt, cuda],
            name: "ort-tensorrt",
            explicit,
            gpu_target: Some(target.name.into()),
        });
    }
    if matches!(opts.execution_provider, ExecutionProviderKind::TensorRt) {
        return Err(crate::host::no_tensorrt_ep(&gpu));
    }
    if cuda_available {
        let mut cuda = cuda_provider().build();
        if explicit {
            cuda = cuda.error_on_failure();
        }
        let gpu_target =
            opts.target.clone().or_else(|| targets::target_for_gpu_name(&gpu.name).map(|t| t.name.to_string()));
        return Ok(EpChoice { providers: vec![cuda], name: "ort-cuda", explicit, gpu_target });
    }
    if explicit {
        return Err(EngineError::Unavailable {
            what: "CUDA execution provider".into(),
            message: format!(
                "GPU `{}` found, but this ONNX Runtime has no CUDA provider (install onnxruntime-gpu)",
                gpu.name
            ),
        });
    }
    tracing::info!(gpu = %gpu.name, "no GPU execution provider in this ONNX Runtime; using CPU");
    Ok(cpu)
}

/// ONNX Runtime's CUDA provider as r1 configures it. TF32 is off: ONNX Runtime 1.31 otherwise runs float32 MatMuls
/// on TF32 tensor cores (10-bit mantissa), and an fp32 artifact must compute in fp32 — measured on an H100, the
/// golden suite's fp32 logits were 0.9–2.1e-3 off transformers' with TF32 and ~1e-6 (as on CPU) without.
/// fp16 artifacts are unaffected (their MatMuls are fp16).
pub(super) fn cuda_provider() -> ep::CUDA {
    ep::CUDA::default().with_tf32(false)
}
