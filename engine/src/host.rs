//! What this host has: the ONNX Runtime environment (the library loaded once per process, found by [`crate::ort_lib`])
//! and whether it carries the TensorRT execution provider, and the errors that say what is missing. The backends
//! and the build actions both depend on this module; it depends on neither.

use std::sync::OnceLock;

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider};

use crate::error::{EngineError, Result};
use crate::ort_lib;
use crate::targets::LocalGpu;

static ENV: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, loading the library on first use.
pub fn environment() -> Result<&'static Environment> {
    let env = ENV.get_or_init(|| {
        let lib = ort_lib::discover().map_err(|e| e.to_string())?;
        tracing::info!(path = %lib.path.display(), source = %lib.source, "loading ONNX Runtime");
        let builder = ort::init_from(&lib.path).map_err(|e| format!("cannot load {}: {e}", lib.path.display()))?;
        builder
            .with_name("r1")
            .with_telemetry(false)
            .build()
            .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))
    });
    env.as_ref().map_err(|m| EngineError::Unavailable { what: "ONNX Runtime".into(), message: m.clone() })
}

/// Loads ONNX Runtime (if not yet) and tells whether it carries the TensorRT execution provider.
pub fn tensorrt_ep_available() -> Result<bool> {
    environment()?;
    ep::TensorRT::is_available().map_err(|e| EngineError::Backend { backend: "ort", message: e.to_string() })
}

/// The error for a GPU host whose ONNX Runtime lacks the TensorRT EP.
pub fn no_tensorrt_ep(gpu: &LocalGpu) -> EngineError {
    EngineError::Unavailable {
        what: "TensorRT execution provider".into(),
        message: format!(
            "GPU `{}` found, but the ONNX Runtime library loaded has no TensorRT provider; install onnxruntime-gpu and the tensorrt wheels and point ORT_DYLIB_PATH at that libonnxruntime.so",
            gpu.name
        ),
    }
}

/// The error for a GPU host whose ONNX Runtime has the TensorRT EP but not TensorRT itself: `missing` is the library
/// the loader could not open, with its reason ([`crate::targets::missing_tensorrt_library`]).
pub fn tensorrt_not_installed(gpu: &LocalGpu, missing: &str) -> EngineError {
    EngineError::Unavailable {
        what: "TensorRT execution provider".into(),
        message: format!(
            "GPU `{}` found and ONNX Runtime has the TensorRT provider, but TensorRT's library {missing} cannot be \
             loaded: install TensorRT 10 for CUDA 13 (NVIDIA's tensorrt wheels or tarball) and put its lib directory \
             on LD_LIBRARY_PATH",
            gpu.name
        ),
    }
}
