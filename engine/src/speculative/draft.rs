//! Running the draft graph (`manifest.draft`, DeepseekV3's MTP module) on ONNX Runtime or tract, one forward pass
//! over named inputs. The engine's [`crate::backend::Backend`]s feed only the main graph's inputs; the draft also
//! takes `hidden_states`, so it gets this small runner of its own.

use std::path::Path;
use std::sync::Arc;

use half::f16;
use ndarray::{Array2, Array3, ArrayD, Axis, IxDyn};
use tract_onnx::prelude::{
    tvec, DatumType, Framework, InferenceModelExt, IntoRunnable, IntoTValue, TValue, TVec, Tensor as TractTensor,
    TypedSimplePlan,
};

use crate::backend::{BackendKind, KvPair};
use crate::error::{EngineError, Result};
use crate::manifest::{names, DType, DraftGraph, Manifest};

fn de(message: impl std::fmt::Display) -> EngineError {
    EngineError::Backend { backend: "draft", message: message.to_string() }
}

/// One draft pass: positions of the rows (`[batch, seq]` ids and positions, the mask over past + new) with the
/// hidden states they pair with (`[batch, seq, hidden]`) and the draft's cache so far.
pub struct DraftInput<'a> {
    pub input_ids: Array2<i64>,
    pub attention_mask: Array2<i64>,
    pub position_ids: Array2<i64>,
    pub hidden_states: Array3<f32>,
    pub past: &'a KvPair,
}

/// What a draft pass returns: `[batch, seq, vocab]` logits, `[batch, seq, hidden]` hidden state (fed back it drafts
/// a further token), and the cache with the new positions appended.
pub struct DraftOutput {
    pub logits: Array3<f32>,
    pub last_hidden_state: Array3<f32>,
    pub present: KvPair,
}

enum Runtime {
    Ort(Box<ort::session::Session>),
    Tract { plan: Arc<TypedSimplePlan>, inputs: Vec<String>, outputs: Vec<String> },
}

/// The draft graph of an artifact, opened on one runtime.
pub struct DraftModel {
    runtime: Runtime,
    record: DraftGraph,
    /// The graph's float type (`hidden_states` and the cache): float32 or float16.
    dtype: DType,
}

impl DraftModel {
    /// Opens `manifest.draft` of the artifact in `dir` on `kind` (`auto` is ONNX Runtime when its library loads,
    /// else tract); an error names what is missing when the artifact has no draft graph.
    pub fn open(dir: &Path, manifest: &Manifest, kind: BackendKind) -> Result<DraftModel> {
        let record = manifest.draft.clone().ok_or_else(|| EngineError::Unavailable {
            what: "the draft graph".into(),
            message: format!(
                "{} has no `draft` (export a DeepseekV3 checkpoint with num_nextn_predict_layers > 0, without \
                 --no-draft)",
                dir.join(names::MANIFEST_FILE).display()
            ),
        })?;
        let dtype = record.inputs.iter().find(|t| t.name == names::HIDDEN_STATES).map_or(DType::Float32, |t| t.dtype);
        let path = dir.join(&record.graph);
        let use_ort = match kind {
            BackendKind::Ort => true,
            BackendKind::Tract => false,
            BackendKind::Auto => crate::host::environment().is_ok(),
        };
        let runtime = if use_ort {
            let env = crate::host::environment()?;
            let load = |e: &dyn std::fmt::Display| de(format!("cannot load {}: {e}", path.display()));
            let session = ort::session::Session::builder(env)
                .map_err(|e| load(&e))?
                .commit_from_file(&path)
                .map_err(|e| load(&e))?;
            Runtime::Ort(Box::new(session))
        } else {
            let typed = tract_onnx::onnx()
                .model_for_path(&path)
                .and_then(|m| m.into_optimized())
                .map_err(|e| de(format!("cannot load {}: {e:?}", path.display())))?;
            let inputs = typed.input_outlets().map_err(de)?.iter().map(|o| typed.node(o.node).name.clone()).collect();
            let outputs = typed
                .output_outlets()
                .map_err(de)?
                .iter()
                .map(|o| typed.outlet_label(*o).map(str::to_string).unwrap_or_else(|| typed.node(o.node).name.clone()))
                .collect();
            Runtime::Tract { plan: typed.into_runnable().map_err(de)?, inputs, outputs }
        };
        Ok(DraftModel { runtime, record, dtype })
    }

    /// The record the model was opened from.
    pub fn record(&self) -> &DraftGraph {
        &self.record
    }

    /// An empty cache for `batch` rows.
    pub fn empty_cache(&self, batch: usize) -> KvPair {
        let kv = &self.record.kv_cache;
        KvPair {
            key: ArrayD::zeros(IxDyn(&[batch, kv.key_heads, 0, kv.key_dim])),
            value: ArrayD::zeros(IxDyn(&[batch, kv.value_heads, 0, kv.value_dim])),
        }
    }

    /// One forward pass.
    pub fn run(&mut self, input: &DraftInput) -> Result<DraftOutput> {
        let (b, s) = input.input_ids.dim();
        if input.hidden_states.dim().0 != b || input.hidden_states.dim().1 != s {
            return Err(EngineError::Shape {
                name: names::HIDDEN_STATES.into(),
                expected: format!("[{b}, {s}, hidden] (as input_ids)"),
                got: format!("{:?}", input.hidden_states.shape()),
            });
        }
        let floats: [(String, ArrayD<f32>); 3] = [
            (names::HIDDEN_STATES.into(), input.hidden_states.clone().into_dyn()),
            (names::past_key(0), input.past.key.clone()),
            (names::past_value(0), input.past.value.clone()),
        ];
        let ints = [
            (names::INPUT_IDS, &input.input_ids),
            (names::ATTENTION_MASK, &input.attention_mask),
            (names::POSITION_IDS, &input.position_ids),
        ];
        let want = [
            names::LOGITS.to_string(),
            names::LAST_HIDDEN_STATE.into(),
            names::present_key(0),
            names::present_value(0),
        ];
        let mut out = match &mut self.runtime {
            Runtime::Ort(session) => run_ort(session, self.dtype, &ints, &floats, &want)?,
            Runtime::Tract { plan, inputs, outputs } => {
                run_tract(plan, inputs, outputs, self.dtype, &ints, &floats, &want)?
            }
        }
        .into_iter();
        let mut next3 = |what: &str| -> Result<Array3<f32>> {
            let a = out.next().ok_or_else(|| de(format!("no `{what}`")))?;
            a.into_dimensionality().map_err(|e| de(format!("`{what}`: {e}")))
        };
        let logits = next3(names::LOGITS)?;
        let last_hidden_state = next3(names::LAST_HIDDEN_STATE)?;
        let key = out.next().ok_or_else(|| de("no present key"))?;
        let value = out.next().ok_or_else(|| de("no present value"))?;
        Ok(DraftOutput { logits, last_hidden_state, present: KvPair { key, value } })
    }
}

fn run_ort(
    session: &mut ort::session::Session,
    dtype: DType,
    ints: &[(&str, &Array2<i64>)],
    floats: &[(String, ArrayD<f32>)],
    want: &[String],
) -> Result<Vec<ArrayD<f32>>> {
    use ort::session::SessionInputValue;
    use ort::value::Tensor;
    let mut feeds: Vec<(String, SessionInputValue)> = Vec::new();
    for (n, a) in ints {
        feeds.push((n.to_string(), Tensor::from_array(a.as_standard_layout().into_owned()).map_err(de)?.into()));
    }
    for (n, a) in floats {
        let a = a.as_standard_layout().into_owned();
        let v: SessionInputValue = match dtype {
            DType::Float16 => Tensor::from_array(a.mapv(f16::from_f32)).map_err(de)?.into(),
            _ => Tensor::from_array(a).map_err(de)?.into(),
        };
        feeds.push((n.clone(), v));
    }
    let out = session.run(feeds).map_err(de)?;
    want.iter()
        .map(|n| {
            let v = out.get(n).ok_or_else(|| de(format!("graph has no output `{n}`")))?;
            match v.try_extract_array::<f32>() {
                Ok(a) => Ok(a.to_owned()),
                Err(_) => Ok(v.try_extract_array::<f16>().map_err(de)?.mapv(f16::to_f32)),
            }
        })
        .collect()
}

fn run_tract(
    plan: &Arc<TypedSimplePlan>,
    inputs: &[String],
    outputs: &[String],
    dtype: DType,
    ints: &[(&str, &Array2<i64>)],
    floats: &[(String, ArrayD<f32>)],
    want: &[String],
) -> Result<Vec<ArrayD<f32>>> {
    let mut values: TVec<TValue> = tvec![];
    for name in inputs {
        let v: TractTensor = if let Some((_, a)) = ints.iter().find(|(n, _)| n == name) {
            (*a).clone().into_dyn().into()
        } else if let Some((_, a)) = floats.iter().find(|(n, _)| n == name) {
            match dtype {
                DType::Float16 => a.mapv(f16::from_f32).into(),
                _ => a.clone().into(),
            }
        } else {
            return Err(de(format!("graph input `{name}` is not one the draft runner provides")));
        };
        values.push(v.into_tvalue());
    }
    let out = plan.run(values).map_err(|e| de(format!("{e:?}")))?;
    want.iter()
        .map(|n| {
            let at = outputs.iter().position(|x| x == n).ok_or_else(|| de(format!("graph has no output `{n}`")))?;
            let v = &out[at];
            match v.datum_type() {
                DatumType::F16 => Ok(v.to_plain_array_view::<f16>().map_err(de)?.mapv(f16::to_f32)),
                _ => Ok(v.to_plain_array_view::<f32>().map_err(de)?.to_owned()),
            }
        })
        .collect()
}

/// The first `len` positions of a `[batch, heads, positions, dim]` cache tensor (a rejected draft token's position
/// dropped).
pub fn truncate(a: &ArrayD<f32>, len: usize) -> ArrayD<f32> {
    a.slice_axis(Axis(2), (0..len).into()).to_owned()
}
