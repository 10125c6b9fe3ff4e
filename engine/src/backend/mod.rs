//! The `Backend` trait: one forward pass of the exported decoder graph over a batch, and
//! [`load`], which picks and opens a backend for an artifact.
//!
//! A backend knows nothing about tokens, sampling or requests: it maps named tensors in to named
//! tensors out, following the I/O convention recorded in the manifest (Optimum / ONNX Runtime GenAI
//! names). Every backend passes the same conformance suite (`engine/tests/`).
//!
//! Host-side tensors are always float32 (KV) / int64 (ids); a backend whose graph is fp16 converts
//! at its boundary, using the dtypes the manifest records for each input and output.

pub mod attention;
pub mod ort;
mod ort_bound;
mod ort_decode_graph;
mod ort_in_place;
mod ort_providers;
pub mod tract;

use std::path::{Path, PathBuf};

use ndarray::{Array2, Array3, ArrayD, ArrayViewD};

use crate::error::{EngineError, Result};
use crate::kv::KvPool;
use crate::manifest::Manifest;

pub use crate::manifest::names::MODEL_FILE;

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

/// A step's `present` tensors kept where the backend produced them, so that the next step can take them as its past
/// without copying them in or out of the host caches ([`Backend::run_keep`]).
pub enum KeptPresent {
    /// Host arrays (backends that cannot feed their own outputs back).
    Host(Vec<KvPair>),
    /// ONNX Runtime values (float32), shared with the runtime: `[key 0, value 0, key 1, value 1, ...]`.
    Ort(Vec<::ort::value::DynValue>),
    /// tract values (float32), reference-counted: `[key 0, value 0, key 1, value 1, ...]`.
    Tract(Vec<tract_onnx::prelude::TValue>),
    /// ONNX Runtime values of the graph's cache type, in the memory the session runs in (the GPU under TensorRT or
    /// the CUDA provider): not readable as host views; [`KeptPresent::bound`] gives the engine its new positions.
    Bound(ort_bound::BoundPresent),
}

impl std::fmt::Debug for KeptPresent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, n) = match self {
            KeptPresent::Host(v) => ("host", v.len() * 2),
            KeptPresent::Ort(v) => ("ort", v.len()),
            KeptPresent::Tract(v) => ("tract", v.len()),
            KeptPresent::Bound(b) => return write!(f, "KeptPresent({b:?})"),
        };
        write!(f, "KeptPresent({kind}, {n} tensors)")
    }
}

/// Per-layer shapes of keys and of values.
pub type LayerShapes = (Vec<Vec<usize>>, Vec<Vec<usize>>);

/// Per-layer views of keys and of values.
pub type LayerViews<'a> = (Vec<ArrayViewD<'a, f32>>, Vec<ArrayViewD<'a, f32>>);

impl KeptPresent {
    /// Views of every layer's key and value, `[batch, heads, past + seq, dim]` float32.
    pub fn views(&self) -> Result<LayerViews<'_>> {
        match self {
            KeptPresent::Host(pairs) => {
                Ok((pairs.iter().map(|p| p.key.view()).collect(), pairs.iter().map(|p| p.value.view()).collect()))
            }
            KeptPresent::Ort(values) => split_pairs("ort", values.iter().map(|v| v.try_extract_array::<f32>())),
            KeptPresent::Tract(values) => split_pairs("tract", values.iter().map(|v| v.to_plain_array_view::<f32>())),
            KeptPresent::Bound(b) => Err(EngineError::Unavailable {
                what: "host views of a present bound on the device".into(),
                message: format!("{b:?} is read through BoundPresent::positions"),
            }),
        }
    }

    /// Every layer's key and value shapes (`[batch, heads, past + seq, dim]`), without reading the tensors.
    pub fn shapes(&self) -> Result<LayerShapes> {
        let flat: Vec<Vec<usize>> = match self {
            KeptPresent::Bound(b) => b.shapes()?,
            other => {
                let (k, v) = other.views()?;
                return Ok((
                    k.iter().map(|a| a.shape().to_vec()).collect(),
                    v.iter().map(|a| a.shape().to_vec()).collect(),
                ));
            }
        };
        let (keys, values): (Vec<_>, Vec<_>) = flat.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
        Ok((keys.into_iter().map(|(_, s)| s).collect(), values.into_iter().map(|(_, s)| s).collect()))
    }

    /// The present bound on the device, whose new positions the engine copies out with [`BoundPresent::positions`]
    /// (it has no host views); `None` for the host-readable kinds.
    pub fn bound(&self) -> Option<&ort_bound::BoundPresent> {
        match self {
            KeptPresent::Bound(b) => Some(b),
            _ => None,
        }
    }
}

/// `[k0, v0, k1, v1, ...]` (each a view or the backend's error) → `([k0, k1, ...], [v0, v1, ...])`.
#[allow(clippy::type_complexity)]
fn split_pairs<'a, E: std::fmt::Display>(
    backend: &'static str,
    flat: impl Iterator<Item = std::result::Result<ArrayViewD<'a, f32>, E>>,
) -> Result<(Vec<ArrayViewD<'a, f32>>, Vec<ArrayViewD<'a, f32>>)> {
    let mut keys = Vec::new();
    let mut values = Vec::new();
    for (i, t) in flat.enumerate() {
        let view = t.map_err(|e| EngineError::Backend { backend, message: format!("kept present: {e}") })?;
        if i % 2 == 0 {
            keys.push(view);
        } else {
            values.push(view);
        }
    }
    Ok((keys, values))
}

/// A loaded graph that can run forward passes. `run` takes `&mut self`: a backend serves one step at
/// a time; concurrency comes from batching in the scheduler, never from locking per request.
pub trait Backend: Send {
    /// Short name for logs and metrics: `ort-cpu`, `ort-cuda`, `ort-tensorrt`, `tract`.
    fn name(&self) -> &'static str;
    /// One forward pass.
    fn run(&mut self, input: &StepInput) -> Result<StepOutput>;

    /// The serving path: one forward pass that returns the logits and keeps `present` where the backend made it.
    /// With `past = Some(kept)` (what the previous call returned, for the same rows in the same order) the step's
    /// past is taken from `kept` instead of `input.past`, which must then be empty: the caches are not copied
    /// into the step. The default runs [`Backend::run`] and keeps the present on the host; it refuses `past`.
    fn run_keep(&mut self, input: &StepInput, past: Option<&KeptPresent>) -> Result<(Array3<f32>, KeptPresent)> {
        if past.is_some() {
            return Err(EngineError::Unavailable {
                what: format!("feeding a kept present back on backend `{}`", self.name()),
                message: "this backend takes its past from the host (Backend::can_feed_kept is false)".into(),
            });
        }
        let out = self.run(input)?;
        Ok((out.logits, KeptPresent::Host(out.present)))
    }

    /// Whether this backend steps over the engine's KV pool in place ([`Backend::run_in_place`]): its graph appends
    /// each step's new positions into the past buffer it is given, so nothing is gathered or appended on the host.
    fn steps_in_place(&self) -> bool {
        false
    }

    /// One forward pass over the pool's slots `first .. first + n` (one row each, in slot order) that writes the new
    /// positions of row `r` into slot `first + r` right after its valid ones, and returns the logits. `input.past` is
    /// empty; `input.attention_mask` is laid out as for [`Backend::run`] (its row sums give each row's new total
    /// length). Only for backends whose [`Backend::steps_in_place`] is true. Writes nothing at or below a slot's
    /// valid positions, so a failed pass leaves every sequence as it was.
    fn run_in_place(&mut self, input: &StepInput, pool: &mut KvPool, first: usize, n: usize) -> Result<Array3<f32>> {
        let _ = (input, pool, first, n);
        Err(EngineError::Unavailable {
            what: format!("in-place steps on backend `{}`", self.name()),
            message: "this backend takes its past from the host (Backend::steps_in_place is false)".into(),
        })
    }

    /// The element type of the caches the graph steps over, when it is not the manifest's `kv_cache.dtype` (a
    /// `--target cpu` graph exported with a float16 cache under float32 activations): the engine's pool stores it.
    fn kv_cache_dtype(&self) -> Option<crate::manifest::DType> {
        None
    }

    /// Where the engine's KV pool must be allocated for [`Backend::run_in_place`]: host memory, or the GPU the
    /// session runs on (the CUDA serving graph on ONNX Runtime's CUDA provider), so the cache never crosses to
    /// the host.
    fn kv_pool_device(&self) -> crate::kv::PoolDevice {
        crate::kv::PoolDevice::Host
    }

    /// Whether [`Backend::run_keep`] accepts a kept present as the past.
    fn can_feed_kept(&self) -> bool {
        false
    }

    /// The row counts whose decode steps ran at fixed shapes and addresses so far (on ONNX Runtime's CUDA provider,
    /// one captured CUDA graph each; `ort_decode_graph.rs`); empty where steps run as shaped.
    fn fixed_decode_shapes(&self) -> Vec<usize> {
        Vec::new()
    }

    /// Whether the graph returns `logits [batch, 1, vocab]`, each row's last fed position only (a serving graph
    /// written by `r1-export --target cpu`), instead of every position. The engine only reads last positions.
    fn last_position_logits(&self) -> bool {
        false
    }

    /// Whether one forward pass may hold several rows that each feed more than one token and have a past (a
    /// prefill chunk after the first). `false` for a serving graph whose attention is ONNX Runtime's
    /// `GroupQueryAttention` (`targets.cpu.fused_attention`), whose CPU kernel refuses it: the engine then runs
    /// such rows one per pass.
    fn batches_chunks_with_past(&self) -> bool {
        true
    }

    /// One forward pass returning the graph outputs named in `names` as float32, in that order. For tools that
    /// run a copy of the graph with intermediate tensors added as outputs (INT8 calibration, per-layer error
    /// reports); serving uses [`Backend::run`].
    fn run_named(&mut self, input: &StepInput, names: &[String]) -> Result<Vec<ArrayD<f32>>> {
        let _ = (input, names);
        Err(EngineError::Unavailable {
            what: format!("named outputs on backend `{}`", self.name()),
            message: "this backend only returns logits and the KV cache".into(),
        })
    }
}

/// Which backend to open (`--backend auto|ort|tract`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// TensorRT when a GPU and its libraries are there, else ort on CPU when the ONNX Runtime
    /// library is found, else tract. The choice and its reason are logged.
    #[default]
    Auto,
    /// ONNX Runtime through the `ort` crate (execution provider from [`BackendOptions`]).
    Ort,
    /// Pure-Rust tract (CPU only, no native library needed).
    Tract,
}

impl std::str::FromStr for BackendKind {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "ort" => Ok(BackendKind::Ort),
            "tract" => Ok(BackendKind::Tract),
            other => Err(EngineError::InvalidArgument {
                name: "backend".into(),
                message: format!("must be one of auto, ort, tract; got `{other}`"),
            }),
        }
    }
}

/// Execution provider for the ort backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecutionProviderKind {
    /// TensorRT if a GPU, the TensorRT EP and its libraries are present (silent fallback to CPU
    /// otherwise, logged).
    #[default]
    Auto,
    /// CPU only.
    Cpu,
    /// CUDA; registration failure is an error.
    Cuda,
    /// TensorRT (with CUDA behind it for unsupported nodes); registration failure is an error.
    TensorRt,
}

impl std::fmt::Display for ExecutionProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExecutionProviderKind::Auto => "auto",
            ExecutionProviderKind::Cpu => "cpu",
            ExecutionProviderKind::Cuda => "cuda",
            ExecutionProviderKind::TensorRt => "tensorrt",
        })
    }
}

impl std::str::FromStr for ExecutionProviderKind {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(ExecutionProviderKind::Auto),
            "cpu" => Ok(ExecutionProviderKind::Cpu),
            "cuda" => Ok(ExecutionProviderKind::Cuda),
            "tensorrt" | "trt" => Ok(ExecutionProviderKind::TensorRt),
            other => Err(EngineError::InvalidArgument {
                name: "execution_provider".into(),
                message: format!("must be one of auto, cpu, cuda, tensorrt; got `{other}`"),
            }),
        }
    }
}

/// Options shared by the backends. `Default` is what tests and the golden suite use.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// Execution provider for ort (ignored by tract).
    pub execution_provider: ExecutionProviderKind,
    /// Intra-op threads (ort); `None` lets the runtime decide.
    pub intra_threads: Option<usize>,
    /// GPU target name from [`crate::targets`] (`a100`, ...); `None` detects the local GPU.
    pub target: Option<String>,
    /// Accept an engine built for another GPU when it was built hardware-compatible.
    pub hardware_compatible: bool,
    /// Where TensorRT engine and timing caches live; default `DIR/engines/<target>/`.
    pub engine_cache_dir: Option<PathBuf>,
    /// Which serving graph replaces the portable one ([`ort::GraphChoice`]; ort only).
    pub graph: ort::GraphChoice,
    /// How in-place decode steps run ([`ort::DecodeSteps`]; ort only).
    pub decode_steps: ort::DecodeSteps,
    /// Whether the portable graph's present stays where the session made it and is fed back as the next step's past
    /// ([`ort::PresentBinding`], `ort_bound.rs`): by default on the GPU providers (TensorRT, or CUDA without a serving
    /// graph), where it keeps the cache on the device; `Always` runs the same binding on the CPU provider (how CI
    /// checks it), `Never` turns it off. ort only.
    pub bind_present: ort::PresentBinding,
}

/// Opens the backend `kind` for the artifact in `dir` described by `manifest`.
pub fn load(dir: &Path, manifest: &Manifest, kind: BackendKind, opts: &BackendOptions) -> Result<Box<dyn Backend>> {
    load_graph(dir, MODEL_FILE, manifest, kind, opts)
}

/// Like [`load`], but opens the graph file `graph` of the artifact directory instead of [`MODEL_FILE`]: a copy of
/// the decoder graph with the same inputs and extra outputs (read them with [`Backend::run_named`]). The copy sits
/// in `dir` so that its external-data references resolve.
pub fn load_graph(
    dir: &Path,
    graph: &str,
    manifest: &Manifest,
    kind: BackendKind,
    opts: &BackendOptions,
) -> Result<Box<dyn Backend>> {
    match kind {
        BackendKind::Tract => Ok(Box::new(tract::TractBackend::load_file(dir, graph, manifest)?)),
        BackendKind::Ort => Ok(Box::new(ort::OrtBackend::load_file(dir, graph, manifest, opts)?)),
        BackendKind::Auto => load_auto(dir, graph, manifest, opts),
    }
}

fn load_auto(dir: &Path, graph: &str, manifest: &Manifest, opts: &BackendOptions) -> Result<Box<dyn Backend>> {
    match crate::ort_lib::discover() {
        Ok(lib) => {
            let gpu = crate::targets::detect_local_gpu();
            match (&gpu, opts.execution_provider) {
                (Some(g), ExecutionProviderKind::Auto) => tracing::info!(
                    gpu = %g.name, lib = %lib.path.display(),
                    "backend auto: ort with TensorRT (GPU found, ONNX Runtime found via {})", lib.source
                ),
                _ => tracing::info!(
                    lib = %lib.path.display(),
                    "backend auto: ort on {} (ONNX Runtime found via {}; {})",
                    if gpu.is_some() { "the requested execution provider" } else { "CPU" },
                    lib.source,
                    if gpu.is_some() { "GPU present" } else { "no NVIDIA GPU detected" }
                ),
            }
            Ok(Box::new(ort::OrtBackend::load_file(dir, graph, manifest, opts)?))
        }
        Err(e) => {
            tracing::info!("backend auto: tract (ONNX Runtime library not found: {e})");
            Ok(Box::new(tract::TractBackend::load_file(dir, graph, manifest)?))
        }
    }
}

/// Checks a step's inputs against each other and the manifest before a backend runs them.
pub(crate) fn check_step_input(input: &StepInput, num_layers: usize) -> Result<()> {
    if input.past.len() != num_layers {
        return Err(EngineError::Shape {
            name: "past_key_values".into(),
            expected: format!("{num_layers} layers"),
            got: format!("{}", input.past.len()),
        });
    }
    let past = input.past.first().map_or(0, |p| p.key.shape().get(2).copied().unwrap_or(0));
    check_step_tokens(input, past)
}

/// Checks a step fed from a kept present: `input.past` is empty and `kept` holds `num_layers` layers for the step's
/// rows. Returns nothing; the shapes of `kept` itself were checked when it was produced.
pub(crate) fn check_kept_step(input: &StepInput, kept: &KeptPresent, num_layers: usize) -> Result<()> {
    let bad = |name: &str, expected: String, got: String| EngineError::Shape { name: name.into(), expected, got };
    if !input.past.is_empty() {
        return Err(bad(
            "past_key_values",
            "empty (the past comes from the kept present)".into(),
            format!("{} layers", input.past.len()),
        ));
    }
    let (keys, _) = kept.shapes()?;
    if keys.len() != num_layers {
        return Err(bad("kept present", format!("{num_layers} layers"), format!("{} layers", keys.len())));
    }
    let shape = keys[0].as_slice();
    let b = input.input_ids.nrows();
    if shape.len() != 4 || shape[0] != b {
        return Err(bad("kept present", format!("[{b}, heads, past, dim]"), format!("{shape:?}")));
    }
    check_step_tokens(input, shape[2])
}

fn check_step_tokens(input: &StepInput, past: usize) -> Result<()> {
    let bad = |name: &str, expected: String, got: String| EngineError::Shape { name: name.into(), expected, got };
    let (b, s) = input.input_ids.dim();
    if input.position_ids.dim() != (b, s) {
        return Err(bad("position_ids", format!("[{b}, {s}]"), format!("{:?}", input.position_ids.shape())));
    }
    if input.attention_mask.dim() != (b, past + s) {
        return Err(bad(
            "attention_mask",
            format!("[{b}, {}]", past + s),
            format!("{:?}", input.attention_mask.shape()),
        ));
    }
    Ok(())
}
