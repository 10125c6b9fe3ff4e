//! ONNX Runtime backend through the `ort` crate (`load-dynamic`): CPU, CUDA and TensorRT
//! execution providers.
//!
//! The library is found by [`crate::ort_lib::discover`] and loaded once per process together with
//! the single ONNX Runtime environment (`ort::init_from(..).build()`); every session shares it.
//! TensorRT options come from the target table ([`crate::targets::tensorrt_options`]).

use std::path::Path;

use half::f16;
use ndarray::{Array2, Array3, ArrayD, ArrayViewD};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{RunOptions, Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorRef};

use super::ort_decode_graph::DecodeGraphs;
use super::ort_providers::{choose_providers, cuda_provider, EpChoice};
use super::{
    check_kept_step, check_step_input, Backend, BackendOptions, KeptPresent, KvPair, StepInput, StepOutput, MODEL_FILE,
};
use crate::error::{EngineError, Result};
use crate::kv::{KvPool, PoolDevice};
use crate::manifest::{names, DType, Manifest};

const NAME: &str = "ort";

pub(super) fn be(message: impl std::fmt::Display) -> EngineError {
    EngineError::Backend { backend: NAME, message: message.to_string() }
}

pub use crate::host::environment;

/// An ONNX Runtime session over the artifact's graph.
pub struct OrtBackend {
    session: Session,
    name: &'static str,
    num_layers: usize,
    /// Graph input names in graph order (what the manifest lists).
    inputs: Vec<(String, DType)>,
    /// dtype of `logits` and of `present.*`.
    logits_dtype: DType,
    present_dtype: DType,
    /// The graph gathers each row's last fed position before the LM head ([`Backend::last_position_logits`]).
    last_position_logits: bool,
    /// The graph's attention is fused (`GroupQueryAttention`, ONNX Runtime's or r1's): each row's new positions are
    /// taken to be the step's whole width after its past, so rows feeding different counts run apart
    /// ([`Backend::batches_chunks_with_past`]).
    fused_attention: bool,
    /// The graph's attention appends in place into the engine's pool (`targets.cpu.kv_in_place`), which stores the
    /// graph's KV dtype.
    kv_in_place: bool,
    /// The serving graph's cache type when the manifest records one (`targets.cpu.kv_cache_dtype`).
    serving_cache: Option<DType>,
    /// Where the engine's pool must live for in-place steps ([`Backend::kv_pool_device`]).
    pool_device: PoolDevice,
    /// Where the portable graph's present stays between steps (`ort_bound.rs`); `None` brings it to the host.
    bound: Option<PoolDevice>,
    /// How in-place decode steps run, and whether the session captures CUDA graphs.
    decode_steps: DecodeSteps,
    captures: bool,
    /// The vocabulary (logits per row), for the fixed-shape decode stages.
    vocab: usize,
    /// The fixed-shape decode stages, made at the first decode step that uses them.
    decode: Option<DecodeGraphs>,
    /// `gpu_graph_id = -1` for every other run of a session that captures CUDA graphs.
    uncaptured: Option<RunOptions>,
}

impl std::fmt::Debug for OrtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtBackend").field("name", &self.name).field("inputs", &self.inputs).finish()
    }
}

impl OrtBackend {
    /// Opens `DIR/model.onnx` with the execution provider the options ask for.
    pub fn load(dir: &Path, manifest: &Manifest, opts: &BackendOptions) -> Result<OrtBackend> {
        Self::load_file(dir, MODEL_FILE, manifest, opts)
    }

    /// Opens the graph file `graph` of the artifact directory (see [`super::load_graph`]).
    pub fn load_file(dir: &Path, graph: &str, manifest: &Manifest, opts: &BackendOptions) -> Result<OrtBackend> {
        let env = environment()?;
        let choice = choose_providers(dir, manifest, opts)?;
        // A per-target serving graph replaces the portable one when the decoder is asked for: on CPU the graph
        // `r1-export --target cpu` optimized (contrib ops: ort CPU only, its extended rewrites already applied, so
        // loaded at level 1), on the CUDA provider the CUDA serving graph a GPU target recorded.
        let serving = if graph == MODEL_FILE { ServingGraph::choose(dir, manifest, &choice, opts) } else { None };
        // The portable decoder on a GPU provider keeps its present on the GPU and feeds it back (`ort_bound.rs`):
        // TensorRT's engine is built from this graph, and the CUDA provider runs it when no serving graph exists.
        let bound = opts.bind_present.device(graph == MODEL_FILE && serving.is_none(), choice.name);
        let graph = serving.as_ref().map_or(graph, |s| s.graph.as_str());
        let path = dir.join(graph);
        if !path.is_file() {
            return Err(EngineError::Io { path, source: std::io::Error::from(std::io::ErrorKind::NotFound) });
        }
        // In place on the CUDA provider, the pool lives on the GPU (everywhere else in host memory), and decode steps
        // are captured as CUDA graphs unless the options say otherwise (`ort_decode_graph.rs`).
        let kv_in_place = serving.as_ref().is_some_and(|s| s.fused_attention && s.kv_in_place);
        let on_cuda = kv_in_place && choice.name == "ort-cuda";
        let captures = on_cuda && opts.decode_steps == DecodeSteps::Auto;
        let mut choice = choice;
        if captures {
            let mut cuda = cuda_provider().with_cuda_graph(true).build();
            if choice.explicit {
                cuda = cuda.error_on_failure();
            }
            choice.providers = vec![cuda];
        }
        let mut builder = Session::builder(env).map_err(be)?;
        if serving.as_ref().is_some_and(|s| s.optimized) {
            builder = builder.with_optimization_level(GraphOptimizationLevel::Level1).map_err(be)?;
        }
        if let Some(s) = &serving {
            tracing::info!(graph, kind = s.kind, "ort: using the serving graph written at export");
        }
        if let Some(n) = opts.intra_threads {
            builder = builder.with_intra_threads(n).map_err(be)?;
        }
        if !choice.providers.is_empty() {
            builder = builder.with_execution_providers(&choice.providers).map_err(be)?;
        }
        // The CPU serving graph's float32 attention is r1's operator; other graphs need no registration.
        let session = if serving.as_ref().is_some_and(|s| s.r1_ops) {
            super::attention::commit_with_ops(builder, |mut b| b.commit_from_file(&path))
        } else {
            builder.commit_from_file(&path)
        }
        .map_err(|e| be(format!("cannot load {}: {e}", path.display())))?;
        let dtype_of =
            |name: &str, default: DType| manifest.outputs.iter().find(|t| t.name == name).map_or(default, |t| t.dtype);
        // The serving graph's caches may be of another type than the portable graph's (`kv_cache_dtype` of its record).
        let serving_cache = serving.as_ref().and_then(|s| s.kv_cache_dtype);
        let cache_dtype = |name: &str, dtype: DType| match serving_cache {
            Some(cache) if names::parse_past(name).is_some() || names::parse_present(name).is_some() => cache,
            _ => dtype,
        };
        let present_key = names::present_key(0);
        let pool_device = if on_cuda { PoolDevice::Cuda { id: 0 } } else { PoolDevice::Host };
        tracing::info!(
            backend = choice.name,
            model = %path.display(),
            kv_pool = %pool_device,
            cuda_graphs = captures,
            present_bound = bound.map(|d| d.to_string()),
            "ort session ready"
        );
        Ok(OrtBackend {
            session,
            name: choice.name,
            num_layers: manifest.model.num_layers,
            inputs: manifest.inputs.iter().map(|t| (t.name.clone(), cache_dtype(&t.name, t.dtype))).collect(),
            logits_dtype: dtype_of("logits", DType::Float32),
            present_dtype: cache_dtype(&present_key, dtype_of(&present_key, manifest.kv_cache.dtype)),
            serving_cache,
            last_position_logits: serving.as_ref().is_some_and(|s| s.last_position_logits),
            fused_attention: serving.as_ref().is_some_and(|s| s.fused_attention),
            kv_in_place,
            pool_device,
            bound,
            decode_steps: opts.decode_steps,
            captures,
            vocab: manifest.model.vocab_size,
            decode: None,
            uncaptured: if captures { Some(super::ort_decode_graph::uncaptured_run()?) } else { None },
        })
    }

    /// Runs `feeds` with the options every non-captured run of this session carries.
    fn run_feeds<'s>(
        &'s mut self,
        feeds: Vec<(String, SessionInputValue<'_>)>,
    ) -> Result<ort::session::SessionOutputs<'s>> {
        match &self.uncaptured {
            Some(o) => self.session.run_with_options(feeds, o),
            None => self.session.run(feeds),
        }
        .map_err(be)
    }
}

/// How the in-place serving graph's decode steps run (`BackendOptions::decode_steps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeSteps {
    /// Fixed shapes captured as CUDA graphs on the CUDA provider (`ort_decode_graph.rs`); as shaped elsewhere.
    #[default]
    Auto,
    /// Always as shaped by the step, never captured (the way to rule CUDA graphs out when diagnosing).
    Shaped,
    /// Fixed shapes on any provider, captured on none: the CUDA-graph layout on the CPU provider (how CI checks it).
    Fixed,
}

impl DecodeSteps {
    /// `auto`, `shaped` or `fixed`.
    pub fn parse(s: &str) -> Option<DecodeSteps> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(DecodeSteps::Auto),
            "shaped" | "off" => Some(DecodeSteps::Shaped),
            "fixed" => Some(DecodeSteps::Fixed),
            _ => None,
        }
    }
}

/// Whether the portable graph's present stays where the session made it and comes back as the next step's past
/// (`ort_bound.rs`; `BackendOptions::bind_present`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PresentBinding {
    /// On the GPU providers (TensorRT, or CUDA without a serving graph), where it keeps the cache on the device;
    /// copied to the host every step on the CPU provider.
    #[default]
    Auto,
    /// On every provider: the CPU provider keeps it in host memory (how CI checks the path).
    Always,
    /// On none: every step's present comes back to the host (the way to rule the binding out when diagnosing a GPU
    /// deployment).
    Never,
}

impl PresentBinding {
    /// `auto`, `always` or `never`.
    pub fn parse(s: &str) -> Option<PresentBinding> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(PresentBinding::Auto),
            "always" | "on" => Some(PresentBinding::Always),
            "never" | "off" => Some(PresentBinding::Never),
            _ => None,
        }
    }

    /// Where a session's present is bound: `portable` when it runs the portable graph (no serving graph), on the
    /// execution provider `provider` (`ort-cpu`, `ort-cuda`, `ort-tensorrt`); `None` when it comes back to the host.
    pub fn device(self, portable: bool, provider: &str) -> Option<PoolDevice> {
        let on_gpu = matches!(provider, "ort-tensorrt" | "ort-cuda");
        match self {
            _ if !portable => None,
            PresentBinding::Never => None,
            PresentBinding::Auto | PresentBinding::Always if on_gpu => Some(PoolDevice::Cuda { id: 0 }),
            PresentBinding::Always => Some(PoolDevice::Host),
            PresentBinding::Auto => None,
        }
    }
}

/// Which serving graph a decoder session opens in place of the portable `model.onnx` (`BackendOptions::graph`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GraphChoice {
    /// The execution provider's own: the `cpu` record's graph on the CPU provider, a GPU target's CUDA serving graph
    /// on the CUDA provider, the portable graph under TensorRT (whose engine is built from it).
    #[default]
    Auto,
    /// The CUDA serving graph, whatever the provider (it runs on ONNX Runtime's CPU provider too, which is how CI
    /// checks it); the portable graph when the artifact has none.
    Cuda,
}

/// A per-target serving graph and what its record says about it (`targets.cpu`, or `targets.<gpu>.cuda_graph`).
#[derive(Debug, Clone)]
struct ServingGraph {
    kind: &'static str,
    graph: String,
    /// Optimized by ONNX Runtime at export (load at level 1).
    optimized: bool,
    /// Uses r1's attention operator (registered on the session).
    r1_ops: bool,
    last_position_logits: bool,
    fused_attention: bool,
    kv_in_place: bool,
    kv_cache_dtype: Option<DType>,
}

impl ServingGraph {
    fn choose(dir: &Path, manifest: &Manifest, choice: &EpChoice, opts: &BackendOptions) -> Option<ServingGraph> {
        let cuda = || {
            let local = choice.gpu_target.as_deref().or(opts.target.as_deref());
            manifest.targets.cuda_graph(dir, local).map(|c| ServingGraph {
                kind: "cuda",
                graph: c.graph.clone(),
                optimized: false,
                r1_ops: false,
                last_position_logits: c.last_position_logits,
                fused_attention: true,
                kv_in_place: c.kv_in_place,
                kv_cache_dtype: Some(c.kv_cache_dtype),
            })
        };
        match (opts.graph, choice.name) {
            (GraphChoice::Cuda, _) | (GraphChoice::Auto, "ort-cuda") => cuda(),
            (GraphChoice::Auto, _) if choice.providers.is_empty() => {
                let graph = manifest.targets.cpu_graph(dir)?;
                let c = manifest.targets.cpu()?;
                Some(ServingGraph {
                    kind: "cpu",
                    graph: graph.to_string(),
                    optimized: true,
                    r1_ops: true,
                    last_position_logits: c.last_position_logits,
                    fused_attention: c.fused_attention,
                    kv_in_place: c.kv_in_place,
                    kv_cache_dtype: c.kv_cache_dtype,
                })
            }
            _ => None,
        }
    }
}

fn float_input<'a>(a: &'a ArrayD<f32>, dtype: DType) -> Result<SessionInputValue<'a>> {
    Ok(match dtype {
        DType::Float16 => Tensor::from_array(a.mapv(f16::from_f32)).map_err(be)?.into(),
        _ if a.is_standard_layout() => TensorRef::from_array_view(a.view()).map_err(be)?.into(),
        // ONNX Runtime needs row-major memory: copy views made by slicing or `insert_axis`.
        _ => Tensor::from_array(a.as_standard_layout().into_owned()).map_err(be)?.into(),
    })
}

/// An int64 input, borrowed when it is row-major, copied otherwise.
fn int_input(a: &Array2<i64>) -> Result<SessionInputValue<'_>> {
    Ok(if a.is_standard_layout() {
        TensorRef::from_array_view(a.view()).map_err(be)?.into()
    } else {
        Tensor::from_array(a.as_standard_layout().into_owned()).map_err(be)?.into()
    })
}

fn float_output(v: &DynValue, dtype: DType, name: &str) -> Result<ArrayD<f32>> {
    match dtype {
        DType::Float16 => {
            let a: ArrayViewD<f16> = v.try_extract_array::<f16>().map_err(|e| be(format!("output `{name}`: {e}")))?;
            Ok(a.mapv(f16::to_f32))
        }
        _ => Ok(v.try_extract_array::<f32>().map_err(|e| be(format!("output `{name}`: {e}")))?.to_owned()),
    }
}

impl OrtBackend {
    /// A graph that steps in place reads each row's length from the mask and its positions from the start of its past:
    /// a host past gathered with left padding (rows of different lengths) is not its layout, and would give wrong
    /// results silently. Pasts of one length (or none) are the same in both layouts and pass.
    fn check_host_layout(&self, input: &StepInput) -> Result<()> {
        let past = input.attention_mask.ncols().saturating_sub(input.input_ids.ncols());
        if self.kv_in_place
            && past > 0
            && input.attention_mask.columns().into_iter().take(past).flatten().any(|&m| m == 0)
        {
            return Err(be(
                "this serving graph steps over the engine's KV pool in place (targets.cpu.kv_in_place); a left-padded \
                 past of rows with different lengths is not its layout: step it through r1_engine::Engine",
            ));
        }
        Ok(())
    }

    /// Whether the graph's past inputs and present outputs are float32, so a step's present can be fed back as is.
    fn f32_cache(&self) -> bool {
        self.present_dtype == DType::Float32
            && self.inputs.iter().filter(|(n, _)| names::parse_past(n).is_some()).all(|(_, d)| *d == DType::Float32)
    }
}

pub(super) fn logits_of(outputs: &ort::session::SessionOutputs<'_>, dtype: DType) -> Result<Array3<f32>> {
    let v = outputs.get("logits").ok_or_else(|| be("graph returned no `logits`"))?;
    float_output(v, dtype, "logits")?.into_dimensionality::<ndarray::Ix3>().map_err(|e| EngineError::Shape {
        name: "logits".into(),
        expected: "rank 3".into(),
        got: e.to_string(),
    })
}

fn present_on_host(outputs: &ort::session::SessionOutputs<'_>, layers: usize, dtype: DType) -> Result<Vec<KvPair>> {
    (0..layers)
        .map(|i| {
            let kn = names::present_key(i);
            let vn = names::present_value(i);
            let k = outputs.get(&kn).ok_or_else(|| be(format!("graph returned no `{kn}`")))?;
            let v = outputs.get(&vn).ok_or_else(|| be(format!("graph returned no `{vn}`")))?;
            Ok(KvPair { key: float_output(k, dtype, &kn)?, value: float_output(v, dtype, &vn)? })
        })
        .collect()
}

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        self.name
    }

    fn run(&mut self, input: &StepInput) -> Result<StepOutput> {
        check_step_input(input, self.num_layers)?;
        self.check_host_layout(input)?;
        let feeds = feeds(&self.inputs, input, None)?;
        let (layers, logits_dtype, present_dtype) = (self.num_layers, self.logits_dtype, self.present_dtype);
        let outputs = self.run_feeds(feeds)?;
        let logits = logits_of(&outputs, logits_dtype)?;
        let present = present_on_host(&outputs, layers, present_dtype)?;
        Ok(StepOutput { logits, present })
    }

    fn can_feed_kept(&self) -> bool {
        self.bound.is_some() || (self.f32_cache() && !self.kv_in_place)
    }

    fn kv_cache_dtype(&self) -> Option<DType> {
        self.serving_cache
    }

    fn steps_in_place(&self) -> bool {
        self.kv_in_place
    }

    fn kv_pool_device(&self) -> PoolDevice {
        self.pool_device
    }

    fn run_in_place(&mut self, input: &StepInput, pool: &mut KvPool, first: usize, n: usize) -> Result<Array3<f32>> {
        if !self.kv_in_place {
            return Err(be("this graph does not append into the KV pool (targets.cpu.kv_in_place is false)"));
        }
        let fixed = match self.decode_steps {
            DecodeSteps::Fixed => true,
            DecodeSteps::Auto => self.captures,
            DecodeSteps::Shaped => false,
        };
        if fixed && first == 0 && input.input_ids.ncols() == 1 && input.past.is_empty() {
            if !self.decode.as_ref().is_some_and(|d| d.fits(pool)) {
                self.decode = Some(DecodeGraphs::new(pool, self.vocab, self.logits_dtype, self.captures)?);
            }
            if let Some(d) = self.decode.as_mut().filter(|d| d.takes(input, first, n)) {
                return d.run(&mut self.session, &self.inputs, input, pool, n);
            }
        }
        let options = self.uncaptured.as_ref();
        super::ort_in_place::run(&mut self.session, &self.inputs, self.logits_dtype, input, pool, first, n, options)
    }

    fn last_position_logits(&self) -> bool {
        self.last_position_logits
    }

    fn fixed_decode_shapes(&self) -> Vec<usize> {
        self.decode.as_ref().map(|d| d.shapes().iter().copied().collect()).unwrap_or_default()
    }

    fn batches_chunks_with_past(&self) -> bool {
        !self.fused_attention
    }

    fn run_keep(&mut self, input: &StepInput, past: Option<&KeptPresent>) -> Result<(Array3<f32>, KeptPresent)> {
        if let Some(device) = self.bound {
            let kept = match past {
                None => {
                    check_step_input(input, self.num_layers)?;
                    None
                }
                Some(k @ KeptPresent::Bound(b)) => {
                    check_kept_step(input, k, self.num_layers)?;
                    Some(b)
                }
                Some(other) => return Err(be(format!("cannot feed {other:?} back as the past of this graph"))),
            };
            let (logits, present) = super::ort_bound::run(
                &mut self.session,
                &self.inputs,
                self.logits_dtype,
                self.present_dtype,
                self.num_layers,
                input,
                kept,
                device,
                self.uncaptured.as_ref(),
            )?;
            return Ok((logits, KeptPresent::Bound(present)));
        }
        let kept_past = match past {
            None => {
                check_step_input(input, self.num_layers)?;
                self.check_host_layout(input)?;
                None
            }
            Some(k @ KeptPresent::Ort(values)) if self.f32_cache() => {
                check_kept_step(input, k, self.num_layers)?;
                Some(values.as_slice())
            }
            Some(other) => return Err(be(format!("cannot feed {other:?} back as the past of this graph"))),
        };
        let f32_cache = self.f32_cache();
        let (layers, logits_dtype, present_dtype) = (self.num_layers, self.logits_dtype, self.present_dtype);
        let feeds = feeds(&self.inputs, input, kept_past)?;
        let mut outputs = match &self.uncaptured {
            Some(o) => self.session.run_with_options(feeds, o),
            None => self.session.run(feeds),
        }
        .map_err(be)?;
        let logits = logits_of(&outputs, logits_dtype)?;
        if !f32_cache {
            return Ok((logits, KeptPresent::Host(present_on_host(&outputs, layers, present_dtype)?)));
        }
        // Shared with ONNX Runtime (reference-counted): nothing is copied.
        let mut kept = Vec::with_capacity(2 * layers);
        for i in 0..layers {
            for name in [names::present_key(i), names::present_value(i)] {
                kept.push(outputs.remove(&name).ok_or_else(|| be(format!("graph returned no `{name}`")))?);
            }
        }
        Ok((logits, KeptPresent::Ort(kept)))
    }

    fn run_named(&mut self, input: &StepInput, names: &[String]) -> Result<Vec<ArrayD<f32>>> {
        check_step_input(input, self.num_layers)?;
        let feeds = feeds(&self.inputs, input, None)?;
        let outputs = self.run_feeds(feeds)?;
        names
            .iter()
            .map(|n| {
                let v = outputs.get(n).ok_or_else(|| be(format!("graph has no output `{n}`")))?;
                match v.try_extract_array::<f32>() {
                    Ok(a) => Ok(a.to_owned()),
                    Err(_) => float_output(v, DType::Float16, n),
                }
            })
            .collect()
    }
}

/// The session feeds of one step, in graph input order. The past comes from `kept` (`[key 0, value 0, ...]`, fed
/// as they are) when given, else from `input.past`.
fn feeds<'a>(
    inputs: &[(String, DType)],
    input: &'a StepInput,
    kept: Option<&'a [DynValue]>,
) -> Result<Vec<(String, SessionInputValue<'a>)>> {
    let mut feeds: Vec<(String, SessionInputValue<'a>)> = Vec::with_capacity(inputs.len());
    for (name, dtype) in inputs {
        let value: SessionInputValue<'_> = match name.as_str() {
            names::INPUT_IDS => int_input(&input.input_ids)?,
            names::ATTENTION_MASK => int_input(&input.attention_mask)?,
            names::POSITION_IDS => int_input(&input.position_ids)?,
            other => match (names::parse_past(other), kept) {
                (Some((layer, is_key)), Some(values)) if 2 * layer + 1 < values.len() => {
                    SessionInputValue::from(&values[2 * layer + usize::from(!is_key)])
                }
                (Some((layer, is_key)), None) if layer < input.past.len() => {
                    let p = &input.past[layer];
                    float_input(if is_key { &p.key } else { &p.value }, *dtype)?
                }
                _ => {
                    return Err(EngineError::Shape {
                        name: other.to_string(),
                        expected: "an input the engine provides (input_ids, attention_mask, position_ids, past_key_values.{i}.key/value)".into(),
                        got: "an unknown graph input".into(),
                    })
                }
            },
        };
        feeds.push((name.clone(), value));
    }
    Ok(feeds)
}

#[cfg(test)]
mod tests {
    use super::{PoolDevice, PresentBinding};

    #[test]
    fn the_present_is_bound_on_the_gpu_providers_by_default_and_never_when_told() {
        let gpu = Some(PoolDevice::Cuda { id: 0 });
        for provider in ["ort-tensorrt", "ort-cuda"] {
            assert_eq!(PresentBinding::Auto.device(true, provider), gpu, "{provider}");
            assert_eq!(PresentBinding::Always.device(true, provider), gpu, "{provider}");
            assert_eq!(PresentBinding::Never.device(true, provider), None, "{provider}");
            // A serving graph steps its pool in place instead.
            assert_eq!(PresentBinding::Always.device(false, provider), None, "{provider}");
        }
        assert_eq!(PresentBinding::Auto.device(true, "ort-cpu"), None);
        assert_eq!(PresentBinding::Always.device(true, "ort-cpu"), Some(PoolDevice::Host));
        assert_eq!(PresentBinding::Never.device(true, "ort-cpu"), None);
        assert_eq!(PresentBinding::parse(" Never "), Some(PresentBinding::Never));
        assert_eq!(PresentBinding::parse("always"), Some(PresentBinding::Always));
        assert_eq!(PresentBinding::parse("auto"), Some(PresentBinding::Auto));
        assert_eq!(PresentBinding::parse("device"), None);
    }
}
