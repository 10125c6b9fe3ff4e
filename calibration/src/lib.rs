//! r1-calibration: INT8 / INT4 quantization of r1 artifacts (issue 5).
//!
//! Pipeline (driven by `r1-export`): [`dataset`] reads calibration text → the engine runs the fp32 graph with the
//! MatMul inputs as extra outputs ([`calibrate::ActivationSource`]) → [`observer`]s build streaming histograms →
//! a [`observer::CalibrationMethod`] picks each tensor's range → optional [`smoothquant`] folding (W8A8) or
//! [`awq`] scaling (INT4 weight-only) → [`qdq`] rewrites
//! the ONNX graph (W8A8, int8 weight-only, int4 weight-only), writing weights through [`external`] →
//! [`trt_cache`] for legacy TensorRT → [`report`] measures the quality loss.
//!
//! - [`matmul_nbits`]: the CPU lowering of `int8-wo` graphs to ONNX Runtime's `MatMulNBits` (used by the `cpu`
//!   target build).
//! - [`quant`]: quantize / dequantize maths matching ONNX `QuantizeLinear` / `DequantizeLinear`; its blocked INT4
//!   search runs vectorized on every core (`blocked.rs`).
//! - [`error`]: the crate's one error type, [`CalibError`].
pub mod awq;
pub mod calibrate;
pub mod dataset;
pub mod error;
pub mod external;
pub mod matmul_nbits;
pub mod observer;
pub mod qdq;
pub mod quant;
pub mod report;
pub mod smooth_graph;
pub mod smoothquant;
pub mod trt_cache;

pub use error::{CalibError, Result};
