//! Applies SmoothQuant ([`crate::smoothquant`]) to an ONNX graph: for each observed MatMul input `X` that is
//! produced by a per-channel weight multiply (the `Mul(normed, γ)` that ends a decomposed RMSNorm) and read only
//! by MatMuls with weight initializers, folds `1/s` into `γ` and `s` into the input rows of every such weight.
//!
//! Inputs that do not fit (attention output feeding `o_proj`, the SwiGLU product feeding `down_proj`, a tensor
//! also read by a residual add, shared weights) are skipped with the reason: folding there would change what other
//! nodes compute. Modified initializers are stored inline (`raw_data`); [`crate::qdq::quantize_model`] moves them
//! to external data afterwards.
use crate::error::Result;
use crate::external::{ExternalDataReader, ExternalDataWriter};
use crate::qdq::calibration_targets;
use crate::smoothquant::{fold_into_norm, scale_weight_rows, smoothing_factors, validate_alpha, weight_row_abs_max};
use r1_proto::onnx::tensor_proto::DataType;
use r1_proto::onnx::{GraphProto, ModelProto, TensorProto};
use serde::Serialize;
use std::collections::HashMap;

/// One MatMul input that was smoothed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SmoothedInput {
    /// The activation tensor (now divided by `s`).
    pub activation: String,
    /// The norm weight that absorbed `1/s`.
    pub norm_weight: String,
    /// The MatMul weights that absorbed `s`.
    pub weights: Vec<String>,
    /// Smallest and largest factor.
    pub factor_range: (f32, f32),
}

/// What [`apply_smoothquant`] did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SmoothSummary {
    /// Inputs smoothed.
    pub smoothed: Vec<SmoothedInput>,
    /// `(activation, reason)` for inputs left alone.
    pub skipped: Vec<(String, String)>,
}

/// `(activation, norm weight initializer index, [(weight initializer index, N)])`.
type Plan = (String, usize, Vec<(usize, usize)>);

fn is_default_domain(d: Option<&str>) -> bool {
    matches!(d, None | Some("") | Some("ai.onnx"))
}

/// Smooths every foldable MatMul input with per-channel activation maxima `channel_max` (from
/// [`crate::calibrate::Calibrator::channel_max`]) and strength `alpha` (0 = off: nothing changes).
pub fn apply_smoothquant(
    model: &mut ModelProto,
    reader: &ExternalDataReader,
    channel_max: &HashMap<String, Vec<f32>>,
    alpha: f32,
) -> Result<SmoothSummary> {
    smooth(model, reader, channel_max, alpha, None)
}

/// [`apply_smoothquant`], writing each rescaled weight matrix to `spill` (an external data file beside the model)
/// as soon as it is computed instead of keeping it inline: memory stays at one weight matrix, and the model stays
/// under protobuf's 2 GiB limit however large it is.
pub fn apply_smoothquant_spilled(
    model: &mut ModelProto,
    reader: &ExternalDataReader,
    channel_max: &HashMap<String, Vec<f32>>,
    alpha: f32,
    spill: &mut ExternalDataWriter,
) -> Result<SmoothSummary> {
    smooth(model, reader, channel_max, alpha, Some(spill))
}

/// [`apply_smoothquant`], writing rescaled weights to `spill` when one is given (see [`apply_smoothquant_spilled`]).
fn smooth(
    model: &mut ModelProto,
    reader: &ExternalDataReader,
    channel_max: &HashMap<String, Vec<f32>>,
    alpha: f32,
    spill: Option<&mut ExternalDataWriter>,
) -> Result<SmoothSummary> {
    validate_alpha(alpha)?;
    if alpha == 0.0 {
        return Ok(SmoothSummary::default());
    }
    let channels = channel_max.iter().map(|(a, c)| (a.clone(), c.len())).collect();
    let mut factors = |a: &str, weights: &[(&[f32], usize)], k: usize| -> Result<Option<Vec<f32>>> {
        Ok(Some(smoothing_factors(&channel_max[a], &weight_row_abs_max(weights, k)?, alpha)?))
    };
    fold_channel_factors(model, reader, &channels, &mut factors, spill)
}

/// The factors of one foldable input: given its activation name, the weights that read it (row-major `[k, N_i]`)
/// and `k`, the per-channel factors `s` to fold, or `None` to leave it alone.
pub type FactorFn<'a> = dyn FnMut(&str, &[(&[f32], usize)], usize) -> Result<Option<Vec<f32>>> + 'a;

/// Folds per-channel factors into every foldable MatMul input among `channels` (activation name → channel count):
/// `1/s` into the RMSNorm weight that produces it and `s` into the input rows of each weight that reads it, `s`
/// chosen by `factors` (SmoothQuant's formula, or AWQ's search in [`crate::awq`]). Rescaled weights go to `spill`
/// when given, inline otherwise.
pub fn fold_channel_factors(
    model: &mut ModelProto,
    reader: &ExternalDataReader,
    channels: &HashMap<String, usize>,
    factors: &mut FactorFn<'_>,
    mut spill: Option<&mut ExternalDataWriter>,
) -> Result<SmoothSummary> {
    let mut summary = SmoothSummary::default();
    let targets = calibration_targets(model);
    let Some(graph) = model.graph.as_mut() else { return Ok(summary) };
    // plan first (immutable), apply after
    let plans = make_plans(graph, targets, channels, &mut summary);
    for plan in plans {
        let a = plan.0.clone();
        match apply_plan(graph, reader, channels, factors, spill.as_deref_mut(), plan)? {
            Some(smoothed) => summary.smoothed.push(smoothed),
            None => summary.skipped.push((a, "left as is (factors of 1 chosen)".into())),
        }
    }
    Ok(summary)
}

/// Lookups over the graph being planned: initializers by name and how many node inputs read each tensor.
struct GraphIndex<'g> {
    graph: &'g GraphProto,
    init_idx: HashMap<String, usize>,
    uses: HashMap<&'g str, usize>,
}

impl<'g> GraphIndex<'g> {
    /// Indexes `graph`.
    fn new(graph: &'g GraphProto) -> Self {
        let init_idx: HashMap<String, usize> =
            graph.initializer.iter().enumerate().filter_map(|(i, t)| t.name.clone().map(|n| (n, i))).collect();
        let mut uses: HashMap<&str, usize> = HashMap::new();
        for n in &graph.node {
            for i in &n.input {
                *uses.entry(i.as_str()).or_default() += 1;
            }
        }
        GraphIndex { graph, init_idx, uses }
    }

    /// Whether `name` is a graph output.
    fn is_output(&self, name: &str) -> bool {
        self.graph.output.iter().any(|o| o.name.as_deref() == Some(name))
    }

    /// Index of the FLOAT initializer `name` when it has shape `dims`.
    fn float_init(&self, name: &str, dims: &[i64]) -> Option<usize> {
        let &i = self.init_idx.get(name)?;
        let t = &self.graph.initializer[i];
        (t.data_type == Some(DataType::Float as i32) && t.dims == dims).then_some(i)
    }
}

/// The plans for the targets that can be smoothed, in order; the others go to `summary.skipped` with the reason.
fn make_plans(
    graph: &GraphProto,
    targets: Vec<String>,
    channels: &HashMap<String, usize>,
    summary: &mut SmoothSummary,
) -> Vec<Plan> {
    let ix = GraphIndex::new(graph);
    let mut plans: Vec<Plan> = Vec::new();
    for a in targets {
        let Some(&k) = channels.get(&a) else {
            summary.skipped.push((a, "no per-channel statistics observed".into()));
            continue;
        };
        match plan_input(&ix, &a, k as i64) {
            Ok((g, weights)) => plans.push((a, g, weights)),
            Err(r) => summary.skipped.push((a, r)),
        }
    }
    plans
}

/// The norm weight and the `(weight, N)` pairs that absorb the `k` factors of input `a`, or why `a` is skipped.
fn plan_input(ix: &GraphIndex, a: &str, k: i64) -> std::result::Result<(usize, Vec<(usize, usize)>), String> {
    let weights = foldable_weights(ix, a, k)?;
    if ix.is_output(a) {
        return Err("is a graph output".into());
    }
    let gamma = norm_weight(ix, a, k).ok_or("not produced by a per-channel weight Mul (RMSNorm)")?;
    Ok((gamma, weights))
}

/// `(weight initializer index, N)` of every node reading `a`, or the reason when one of them is not a MatMul
/// with an unshared `[k, N]` FLOAT weight of its own.
fn foldable_weights(ix: &GraphIndex, a: &str, k: i64) -> std::result::Result<Vec<(usize, usize)>, String> {
    let graph = ix.graph;
    let consumers: Vec<_> = graph.node.iter().filter(|n| n.input.iter().any(|i| i == a)).collect();
    let mut weights = Vec::new();
    for c in &consumers {
        let w = c.input.get(1).map(String::as_str).unwrap_or_default();
        let init = ix.init_idx.get(w).map(|&i| &graph.initializer[i]);
        let ok = c.op_type.as_deref() == Some("MatMul")
            && is_default_domain(c.domain.as_deref())
            && c.input[0] == a
            && init.is_some_and(|t| t.data_type == Some(DataType::Float as i32) && t.dims.len() == 2 && t.dims[0] == k);
        if !ok {
            return Err(format!(
                "also read by {} node `{}`",
                c.op_type.as_deref().unwrap_or("?"),
                c.name.as_deref().unwrap_or("?")
            ));
        }
        if ix.uses.get(w).copied() != Some(1) {
            return Err(format!("weight `{w}` is shared with other nodes"));
        }
        let t = &graph.initializer[ix.init_idx[w]];
        weights.push((ix.init_idx[w], t.dims[1] as usize));
    }
    Ok(weights)
}

/// The per-channel weight of the `Mul` producing `a`: a FLOAT `[k]` initializer that nothing else reads.
fn norm_weight(ix: &GraphIndex, a: &str, k: i64) -> Option<usize> {
    let producer = ix.graph.node.iter().find(|n| n.output.iter().any(|o| o == a));
    producer
        .filter(|p| p.op_type.as_deref() == Some("Mul") && is_default_domain(p.domain.as_deref()) && p.input.len() == 2)
        .and_then(|p| {
            p.input.iter().find_map(|i| ix.float_init(i, &[k]).filter(|_| ix.uses.get(i.as_str()) == Some(&1)))
        })
}

/// Computes the factors of one plan and folds `1/s` into its norm weight and `s` into its MatMul weights (written
/// to `spill` when given, inline otherwise); `None` when `factors` leaves it alone.
fn apply_plan(
    graph: &mut GraphProto,
    reader: &ExternalDataReader,
    channels: &HashMap<String, usize>,
    factors: &mut FactorFn<'_>,
    mut spill: Option<&mut ExternalDataWriter>,
    (a, g, weights): Plan,
) -> Result<Option<SmoothedInput>> {
    let k = channels[&a];
    let mats: Vec<(Vec<f32>, usize)> =
        weights.iter().map(|&(i, n)| Ok((reader.tensor_f32(&graph.initializer[i])?, n))).collect::<Result<_>>()?;
    let views: Vec<(&[f32], usize)> = mats.iter().map(|(w, n)| (w.as_slice(), *n)).collect();
    let Some(s) = factors(&a, &views, k)? else { return Ok(None) };
    crate::error::ensure_len("channel factors", k, s.len())?;
    let mut gamma = reader.tensor_f32(&graph.initializer[g])?;
    fold_into_norm(&mut gamma, &s)?;
    set_f32(&mut graph.initializer[g], &gamma);
    let mut names = Vec::new();
    for ((i, n), (mut w, _)) in weights.into_iter().zip(mats) {
        scale_weight_rows(&mut w, k, n, &s)?;
        match spill.as_deref_mut() {
            Some(writer) => {
                let bytes: Vec<u8> = w.iter().flat_map(|f| f.to_le_bytes()).collect();
                writer.write_tensor(&mut graph.initializer[i], &bytes)?;
            }
            None => set_f32(&mut graph.initializer[i], &w),
        }
        names.push(graph.initializer[i].name.clone().unwrap_or_default());
    }
    let range = s.iter().fold((f32::INFINITY, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    Ok(Some(SmoothedInput {
        activation: a,
        norm_weight: graph.initializer[g].name.clone().unwrap_or_default(),
        weights: names,
        factor_range: range,
    }))
}

fn set_f32(t: &mut TensorProto, v: &[f32]) {
    t.data_location = None;
    t.external_data.clear();
    t.float_data.clear();
    t.raw_data = Some(v.iter().flat_map(|f| f.to_le_bytes()).collect());
}
