//! Pure-Rust backend on tract 0.23 (CPU, no native library).
//!
//! The graph is loaded once (external data is read relative to the model directory), its ONNX
//! `dim_param`s become tract symbols, and it is optimized and planned once
//! (`into_optimized().into_runnable()`): the same plan runs every batch size, chunk length and past
//! length. tract cannot run bf16, int4 or fp8 tensors, blocked quantization or 8-bit MatMulNBits.

use std::path::Path;
use std::sync::Arc;

use half::f16;
use ndarray::{Array3, ArrayD, Ix3};
use tract_onnx::prelude::*;

use super::{check_kept_step, check_step_input, Backend, KeptPresent, KvPair, StepInput, StepOutput, MODEL_FILE};
use crate::error::{EngineError, Result};
use crate::manifest::{names, DType, Manifest, Precision};

const NAME: &str = "tract";

fn be(message: impl std::fmt::Display) -> EngineError {
    EngineError::Backend { backend: NAME, message: message.to_string() }
}

/// Where a graph input gets its value from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    InputIds,
    AttentionMask,
    PositionIds,
    Past { layer: usize, key: bool, f16: bool },
}

/// A planned tract model.
pub struct TractBackend {
    plan: Arc<TypedRunnableModel>,
    feeds: Vec<Feed>,
    /// Index of `logits` and of each layer's present key/value among the plan's outputs.
    logits_at: usize,
    present_at: Vec<(usize, usize)>,
    /// Every plan output's name, in plan order (for [`Backend::run_named`]).
    out_names: Vec<String>,
    num_layers: usize,
    /// Past inputs and present outputs are float32: a step's present can be fed back as the next past.
    f32_cache: bool,
}

impl std::fmt::Debug for TractBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractBackend").field("feeds", &self.feeds).finish()
    }
}

impl TractBackend {
    /// Loads, optimizes and plans `DIR/model.onnx`.
    pub fn load(dir: &Path, manifest: &Manifest) -> Result<TractBackend> {
        Self::load_file(dir, MODEL_FILE, manifest)
    }

    /// Loads, optimizes and plans the graph file `graph` of the artifact directory (see [`super::load_graph`]).
    pub fn load_file(dir: &Path, graph: &str, manifest: &Manifest) -> Result<TractBackend> {
        if manifest.precision == Precision::Int4WeightOnly {
            return Err(EngineError::Unavailable {
                what: "tract backend".into(),
                message: format!("tract cannot run `{}` graphs (int4 tensors); use --backend ort", manifest.precision),
            });
        }
        if graph == MODEL_FILE && manifest.quantized_expert_stacks() > 0 {
            return Err(EngineError::Unavailable {
                what: "tract backend".into(),
                message: format!(
                    "this `{}` graph holds its {} routed-expert stacks quantized behind blocked DequantizeLinear \
                     (opset {}), which tract does not run; use --backend ort, or export with --opset 17 to keep the \
                     experts float",
                    manifest.precision,
                    manifest.quantized_expert_stacks(),
                    manifest.opset
                ),
            });
        }
        if let Some(cpu) = manifest.targets.cpu().filter(|c| c.graph == graph) {
            let experts = if cpu.sparse_experts { ", the routed experts' com.microsoft.MoE among them" } else { "" };
            return Err(EngineError::Unavailable {
                what: "tract backend".into(),
                message: format!(
                    "`{graph}` is the ONNX Runtime serving graph of `--target cpu`: it holds ONNX Runtime's own \
                     operators{experts}, which tract does not run; tract runs the portable `{MODEL_FILE}`"
                ),
            });
        }
        let path = dir.join(graph);
        if !path.is_file() {
            return Err(EngineError::Io { path, source: std::io::Error::from(std::io::ErrorKind::NotFound) });
        }
        let started = std::time::Instant::now();
        let model = tract_onnx::onnx()
            .model_for_path(&path)
            .map_err(|e| be(format!("cannot load {}: {e:?}", path.display())))?;
        let typed = model.into_optimized().map_err(|e| be(format!("cannot optimize {}: {e:?}", path.display())))?;
        let mut feeds = Vec::new();
        for outlet in typed.input_outlets().map_err(be)? {
            let name = typed.node(outlet.node).name.as_str();
            let feed = match name {
                names::INPUT_IDS => Feed::InputIds,
                names::ATTENTION_MASK => Feed::AttentionMask,
                names::POSITION_IDS => Feed::PositionIds,
                other => match names::parse_past(other) {
                    Some((layer, key)) => {
                        let f16 =
                            manifest.inputs.iter().find(|t| t.name == other).is_some_and(|t| t.dtype == DType::Float16);
                        Feed::Past { layer, key, f16 }
                    }
                    None => return Err(be(format!("graph input `{other}` is not one the engine provides"))),
                },
            };
            feeds.push(feed);
        }
        let out_names: Vec<String> = typed
            .output_outlets()
            .map_err(be)?
            .iter()
            .map(|o| typed.outlet_label(*o).map(str::to_string).unwrap_or_else(|| typed.node(o.node).name.clone()))
            .collect();
        let find = |n: &str| {
            out_names
                .iter()
                .position(|x| x == n)
                .ok_or_else(|| be(format!("graph has no output `{n}` (outputs: {out_names:?})")))
        };
        let logits_at = find("logits")?;
        let num_layers = manifest.model.num_layers;
        let present_at = (0..num_layers)
            .map(|i| Ok((find(&names::present_key(i))?, find(&names::present_value(i))?)))
            .collect::<Result<Vec<_>>>()?;
        let plan = typed.into_runnable().map_err(be)?;
        tracing::info!(model = %path.display(), secs = started.elapsed().as_secs_f32(), "tract plan ready");
        let f32_cache = feeds.iter().all(|f| !matches!(f, Feed::Past { f16: true, .. }))
            && manifest
                .outputs
                .iter()
                .filter(|t| names::parse_present(&t.name).is_some())
                .all(|t| t.dtype == DType::Float32);
        Ok(TractBackend { plan, feeds, logits_at, present_at, out_names, num_layers, f32_cache })
    }
}

fn to_f32(v: &TValue, what: &str) -> Result<ArrayD<f32>> {
    match v.datum_type() {
        DatumType::F32 => Ok(v.to_plain_array_view::<f32>().map_err(be)?.to_owned()),
        DatumType::F16 => Ok(v.to_plain_array_view::<f16>().map_err(be)?.mapv(f16::to_f32)),
        other => {
            Err(EngineError::Shape { name: what.into(), expected: "f32 or f16".into(), got: format!("{other:?}") })
        }
    }
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&mut self, input: &StepInput) -> Result<StepOutput> {
        check_step_input(input, self.num_layers)?;
        let values = self.values(input)?;
        let outputs = self.plan.run(values).map_err(|e| be(format!("{e:?}")))?;
        let logits = to_f32(&outputs[self.logits_at], "logits")?
            .into_dimensionality::<Ix3>()
            .map_err(|e| EngineError::Shape { name: "logits".into(), expected: "rank 3".into(), got: e.to_string() })?;
        let present = self
            .present_at
            .iter()
            .enumerate()
            .map(|(i, &(k, v))| {
                Ok(KvPair {
                    key: to_f32(&outputs[k], &names::present_key(i))?,
                    value: to_f32(&outputs[v], &names::present_value(i))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StepOutput { logits, present })
    }

    fn can_feed_kept(&self) -> bool {
        self.f32_cache
    }

    fn run_keep(&mut self, input: &StepInput, past: Option<&KeptPresent>) -> Result<(Array3<f32>, KeptPresent)> {
        let kept_past = match past {
            None => {
                check_step_input(input, self.num_layers)?;
                None
            }
            Some(k @ KeptPresent::Tract(values)) if self.f32_cache => {
                check_kept_step(input, k, self.num_layers)?;
                Some(values.as_slice())
            }
            Some(other) => return Err(be(format!("cannot feed {other:?} back as the past of this graph"))),
        };
        if !self.f32_cache {
            let out = self.run(input)?;
            return Ok((out.logits, KeptPresent::Host(out.present)));
        }
        let values = self.values_with(input, kept_past)?;
        let outputs = self.plan.run(values).map_err(|e| be(format!("{e:?}")))?;
        let logits = to_f32(&outputs[self.logits_at], "logits")?
            .into_dimensionality::<Ix3>()
            .map_err(|e| EngineError::Shape { name: "logits".into(), expected: "rank 3".into(), got: e.to_string() })?;
        // Reference-counted tensors: kept without copying.
        let kept = self.present_at.iter().flat_map(|&(k, v)| [outputs[k].clone(), outputs[v].clone()]).collect();
        Ok((logits, KeptPresent::Tract(kept)))
    }

    fn run_named(&mut self, input: &StepInput, names: &[String]) -> Result<Vec<ArrayD<f32>>> {
        check_step_input(input, self.num_layers)?;
        let outputs = self.plan.run(self.values(input)?).map_err(|e| be(format!("{e:?}")))?;
        names
            .iter()
            .map(|n| {
                let at = self
                    .out_names
                    .iter()
                    .position(|x| x == n)
                    .ok_or_else(|| be(format!("graph has no output `{n}`")))?;
                to_f32(&outputs[at], n)
            })
            .collect()
    }
}

impl TractBackend {
    /// The plan's inputs of one step, in plan input order.
    fn values(&self, input: &StepInput) -> Result<TVec<TValue>> {
        self.values_with(input, None)
    }

    /// Like [`TractBackend::values`], with the past taken from `kept` (`[key 0, value 0, ...]`) when given.
    fn values_with(&self, input: &StepInput, kept: Option<&[TValue]>) -> Result<TVec<TValue>> {
        let mut values: TVec<TValue> = TVec::with_capacity(self.feeds.len());
        for feed in &self.feeds {
            if let (Feed::Past { layer, key, .. }, Some(kept)) = (*feed, kept) {
                let at = 2 * layer + usize::from(!key);
                values.push(
                    kept.get(at)
                        .ok_or_else(|| be(format!("kept present has no tensor for past layer {layer}")))?
                        .clone(),
                );
                continue;
            }
            let t: Tensor = match *feed {
                Feed::InputIds => input.input_ids.clone().into_dyn().into(),
                Feed::AttentionMask => input.attention_mask.clone().into_dyn().into(),
                Feed::PositionIds => input.position_ids.clone().into_dyn().into(),
                Feed::Past { layer, key, f16: half } => {
                    let p =
                        input.past.get(layer).ok_or_else(|| be(format!("the step has no past for layer {layer}")))?;
                    let a = if key { &p.key } else { &p.value };
                    if half {
                        a.mapv(f16::from_f32).into()
                    } else {
                        a.clone().into()
                    }
                }
            };
            values.push(t.into_tvalue());
        }
        Ok(values)
    }
}
