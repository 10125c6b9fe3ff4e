//! The `Backend` trait: one forward pass of the exported decoder graph over a batch.
//!
//! A backend knows nothing about tokens, sampling or requests: it maps named tensors in to named
//! tensors out, following the I/O convention recorded in the manifest (Optimum / ONNX Runtime GenAI
//! names). Every backend passes the same conformance suite (`tests/`).

use ndarray::{Array2, Array3, ArrayD};

use crate::error::Result;

/// One layer's cache: `key` and `value`, each `[batch, heads, past_len, dim]`, float32 on the host.
#[derive(Debug, Clone)]
pub struct KvPair {
    pub key: ArrayD<f32>,
    pub value: ArrayD<f32>,
}

/// Inputs of one forward pass.
#[derive(Debug, Clone)]
pub struct StepInput {
    /// `[batch, seq]`
    pub input_ids: Array2<i64>,
    /// `[batch, past + seq]`, 1 for real tokens, 0 for padding.
    pub attention_mask: Array2<i64>,
    /// `[batch, seq]`
    pub position_ids: Array2<i64>,
    /// One entry per layer; `past_len` may be 0.
    pub past: Vec<KvPair>,
}

/// Outputs of one forward pass.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// `[batch, seq, vocab]`, float32 whatever the graph precision.
    pub logits: Array3<f32>,
    /// One entry per layer, `[batch, heads, past + seq, dim]`.
    pub present: Vec<KvPair>,
}

/// A loaded graph that can run forward passes. `run` takes `&mut self`: a backend serves one step at
/// a time; concurrency comes from batching in the scheduler, never from locking per request.
pub trait Backend: Send {
    /// Short name for logs and metrics: `ort-cpu`, `ort-tensorrt`, `tract`, ...
    fn name(&self) -> &'static str;
    /// One forward pass.
    fn run(&mut self, input: &StepInput) -> Result<StepOutput>;
}
