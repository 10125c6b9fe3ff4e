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
use r1_proto::onnx::{ModelProto, TensorProto};
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

fn smooth(
    model: &mut ModelProto,
    reader: &ExternalDataReader,
    channel_max: &HashMap<String, Vec<f32>>,
    alpha: f32,
    mut spill: Option<&mut ExternalDataWriter>,
) -> Result<SmoothSummary> {
    validate_alpha(alpha)?;
    let mut summary = SmoothSummary::default();
    if alpha == 0.0 {
        return Ok(summary);
    }
    let targets = calibration_targets(model);
    let Some(graph) = model.graph.as_mut() else { return Ok(summary) };
    let init_idx: HashMap<String, usize> =
        graph.initializer.iter().enumerate().filter_map(|(i, t)| t.name.clone().map(|n| (n, i))).collect();
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            *uses.entry(i.as_str()).or_default() += 1;
        }
    }
    let is_output = |name: &str| graph.output.iter().any(|o| o.name.as_deref() == Some(name));
    let float_init = |name: &str, dims: &[i64]| -> Option<usize> {
        let &i = init_idx.get(name)?;
        let t = &graph.initializer[i];
        (t.data_type == Some(DataType::Float as i32) && t.dims == dims).then_some(i)
    };

    // plan first (immutable), apply after
    let mut plans: Vec<Plan> = Vec::new();
    for a in targets {
        let Some(ch) = channel_max.get(&a) else {
            summary.skipped.push((a, "no per-channel maxima observed".into()));
            continue;
        };
        let k = ch.len() as i64;
        let consumers: Vec<_> = graph.node.iter().filter(|n| n.input.contains(&a)).collect();
        let mut weights = Vec::new();
        let mut reason = None;
        for c in &consumers {
            let w = c.input.get(1).map(String::as_str).unwrap_or_default();
            let init = init_idx.get(w).map(|&i| &graph.initializer[i]);
            let ok = c.op_type.as_deref() == Some("MatMul")
                && is_default_domain(c.domain.as_deref())
                && c.input[0] == a
                && init.is_some_and(|t| {
                    t.data_type == Some(DataType::Float as i32) && t.dims.len() == 2 && t.dims[0] == k
                });
            if !ok {
                reason = Some(format!(
                    "also read by {} node `{}`",
                    c.op_type.as_deref().unwrap_or("?"),
                    c.name.as_deref().unwrap_or("?")
                ));
                break;
            }
            if uses.get(w).copied() != Some(1) {
                reason = Some(format!("weight `{w}` is shared with other nodes"));
                break;
            }
            let t = &graph.initializer[init_idx[w]];
            weights.push((init_idx[w], t.dims[1] as usize));
        }
        if reason.is_none() && is_output(&a) {
            reason = Some("is a graph output".into());
        }
        let producer = graph.node.iter().find(|n| n.output.contains(&a));
        let gamma = producer
            .filter(|p| {
                p.op_type.as_deref() == Some("Mul") && is_default_domain(p.domain.as_deref()) && p.input.len() == 2
            })
            .and_then(|p| {
                p.input.iter().find_map(|i| float_init(i, &[k]).filter(|_| uses.get(i.as_str()) == Some(&1)))
            });
        match (reason, gamma) {
            (Some(r), _) => summary.skipped.push((a, r)),
            (None, None) => summary.skipped.push((a, "not produced by a per-channel weight Mul (RMSNorm)".into())),
            (None, Some(g)) => plans.push((a, g, weights)),
        }
    }

    for (a, g, weights) in plans {
        let k = channel_max[&a].len();
        let mats: Vec<(Vec<f32>, usize)> =
            weights.iter().map(|&(i, n)| Ok((reader.tensor_f32(&graph.initializer[i])?, n))).collect::<Result<_>>()?;
        let views: Vec<(&[f32], usize)> = mats.iter().map(|(w, n)| (w.as_slice(), *n)).collect();
        let s = smoothing_factors(&channel_max[&a], &weight_row_abs_max(&views, k)?, alpha)?;
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
        summary.smoothed.push(SmoothedInput {
            activation: a,
            norm_weight: graph.initializer[g].name.clone().unwrap_or_default(),
            weights: names,
            factor_range: range,
        });
    }
    Ok(summary)
}

fn set_f32(t: &mut TensorProto, v: &[f32]) {
    t.data_location = None;
    t.external_data.clear();
    t.float_data.clear();
    t.raw_data = Some(v.iter().flat_map(|f| f.to_le_bytes()).collect());
}
