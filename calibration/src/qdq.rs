//! Rewrites an fp32 ONNX model into quantized forms, touching only `MatMul` nodes whose `B` input is a 2-D FLOAT
//! weight initializer `[K, N]` (residual adds, norms, softmax and everything else stay fp32).
//!
//! - [`QuantScheme::W8A8`]: input `A` gets `QuantizeLinear → DequantizeLinear` (int8, per-tensor calibrated scale,
//!   zero point 0); the weight becomes an int8 initializer with per-output-channel scales and a
//!   `DequantizeLinear(axis = 1)`. `DQ(A), DQ(W) → MatMul` is the pattern ONNX Runtime fuses into an integer GEMM
//!   and TensorRT into an INT8 GEMM. Each consuming MatMul gets its own `Q → DQ` pair (q, k and v projections of
//!   one normed input: three pairs sharing one scale): ONNX Runtime only converts a signed Q/DQ pair to the
//!   unsigned form its x86 integer kernels need, and then fuses `MatMulIntegerToFloat`, when the Q has a single DQ
//!   consumer (checked with `scripts/check_qdq.py`: with a shared Q neither projection was fused). The pairs also
//!   get their own scale / zero-point initializers, or ORT's common-subexpression elimination merges them back.
//!   MatMuls named in [`QdqOptions::weight_only`] get only the weight part (the LM head by default in `r1-export`).
//! - [`QuantScheme::Int8WeightOnly`]: only the weight part of W8A8.
//! - [`QuantScheme::Int4WeightOnly`]: int4 initializer `[K, N]` + scales `[ceil(K/B), N]`, opset 21
//!   `DequantizeLinear(axis = 0, block_size = B)`, no zero point (symmetric); or, `asymmetric`, a uint4
//!   initializer + scales + uint4 zero points `[ceil(K/B), N]` (see [`crate::quant`]).
//!
//! Names are deterministic: `{w}_int8` / `{w}_int4` / `{w}_uint4`, `{w}_scale`, `{w}_zero_point`, `{w}_dequantized`;
//! and per consuming MatMul `{a}_scale_for_{matmul}`, `{a}_zero_point_for_{matmul}`, `{a}_quantized_for_{matmul}`,
//! `{a}_dequantized_for_{matmul}`.
use crate::error::{CalibError, Result};
use crate::external::{is_external, rehome_initializers, ExternalDataReader, ExternalDataWriter, WrittenFile};
use crate::quant::{quantize_blocked_packed, quantize_per_channel, validate_block_size};
use r1_proto::onnx::attribute_proto::AttributeType;
use r1_proto::onnx::tensor_proto::DataType;
use r1_proto::onnx::type_proto::{Tensor as TypeTensor, Value as TypeValue};
use r1_proto::onnx::{AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, ValueInfoProto};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::path::Path;

mod streamed;
pub use streamed::{quantize_weight, rewrite_prequantized, QuantizedWeight};

/// Which quantized form to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum QuantScheme {
    /// INT8 weights and activations (explicit QDQ for TensorRT / ORT integer GEMMs).
    W8A8,
    /// INT8 weights, fp32 activations.
    Int8WeightOnly,
    /// Blocked INT4 weights (opset 21), fp32 activations.
    Int4WeightOnly {
        /// Rows per block: 32, 64 or 128.
        block_size: usize,
        /// Unsigned codes with a zero point per block (ONNX Runtime) instead of symmetric signed codes (TensorRT).
        asymmetric: bool,
    },
}

impl QuantScheme {
    /// Minimum default-domain opset the rewritten graph needs.
    pub fn min_opset(&self) -> i64 {
        match self {
            QuantScheme::Int4WeightOnly { .. } => 21,
            _ => 13,
        }
    }
}

/// Options of [`quantize_model`].
#[derive(Debug, Clone)]
pub struct QdqOptions {
    /// The quantized form.
    pub scheme: QuantScheme,
    /// Per-tensor activation scales (`amax / 127`) keyed by MatMul input name; required for every rewritten MatMul
    /// under [`QuantScheme::W8A8`].
    pub activation_scales: HashMap<String, f32>,
    /// MatMul node names or weight names to leave in fp32 (e.g. the LM head).
    pub exclude: HashSet<String>,
    /// MatMul node names or weight names whose weight is quantized but whose input activation stays float under
    /// [`QuantScheme::W8A8`] (int8 weight-only there; e.g. the LM head, whose input has the widest range). No
    /// activation scale is needed for them. The other schemes are weight-only already.
    pub weight_only: HashSet<String>,
    /// Initializers of at least this many bytes go to the external data file (when one is written).
    pub external_threshold: usize,
}

impl QdqOptions {
    /// Options for `scheme` with no activation scales, no exclusions, no weight-only exceptions and a 1 KiB
    /// external-data threshold.
    pub fn new(scheme: QuantScheme) -> Self {
        QdqOptions {
            scheme,
            activation_scales: HashMap::new(),
            exclude: HashSet::new(),
            weight_only: HashSet::new(),
            external_threshold: 1024,
        }
    }
}

/// One MatMul that was rewritten.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantizedMatMul {
    /// Node name.
    pub node: String,
    /// Activation input `A`.
    pub activation: String,
    /// Weight initializer `B`.
    pub weight: String,
    /// Weight rows.
    pub k: usize,
    /// Weight columns.
    pub n: usize,
    /// The MatMul's output (compare it with the fp32 graph's for per-layer SQNR).
    pub output: String,
    /// Whether input `A` was quantized too (W8A8), or only the weight.
    pub activation_quantized: bool,
}

/// What [`rewrite_graph`] did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RewriteSummary {
    /// MatMuls that now read quantized weights.
    pub quantized: Vec<QuantizedMatMul>,
    /// MatMuls left in fp32, with the reason.
    pub skipped: Vec<(String, String)>,
}

impl RewriteSummary {
    /// The weights left float for their shape or type (not `--keep-float`), named with each layer index as `*`,
    /// with how many layers: DeepseekV3's routed expert stacks (`[E, H, I]`; the `--target cpu` serving graph
    /// quantizes them into `com.microsoft.QMoE`) and MLA's per-head absorbed projections (`kv_b_proj.w_uk`,
    /// `w_uv`: `[heads, ·, ·]` batched MatMuls).
    pub fn left_float(&self) -> Vec<String> {
        let mut counts: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
        for (_, reason) in &self.skipped {
            let Some(weight) = reason.strip_prefix("weight `").and_then(|r| r.split('`').next()) else { continue };
            *counts.entry(layer_pattern(weight)).or_default() += 1;
        }
        counts.into_iter().map(|(w, n)| if n > 1 { format!("{w} (×{n})") } else { w }).collect()
    }
}

/// `name` with the index after `layers.` replaced by `*`.
fn layer_pattern(name: &str) -> String {
    match name.split_once("layers.") {
        Some((head, rest)) => {
            let tail = rest.trim_start_matches(|c: char| c.is_ascii_digit());
            if tail.len() == rest.len() {
                name.to_string()
            } else {
                format!("{head}layers.*{tail}")
            }
        }
        None => name.to_string(),
    }
}

/// A MatMul whose `B` input is a weight initializer: `(node index, activation name, weight name)`.
fn weight_matmuls(graph: &GraphProto) -> Vec<(usize, String, String)> {
    let inits: HashMap<&str, &TensorProto> =
        graph.initializer.iter().filter_map(|t| t.name.as_deref().map(|n| (n, t))).collect();
    graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            n.op_type.as_deref() == Some("MatMul") && matches!(n.domain.as_deref(), None | Some("") | Some("ai.onnx"))
        })
        .filter(|(_, n)| n.input.len() == 2)
        .filter(|(_, n)| {
            inits
                .get(n.input[1].as_str())
                .is_some_and(|t| t.dims.len() == 2 && t.data_type == Some(DataType::Float as i32))
        })
        .map(|(i, n)| (i, n.input[0].clone(), n.input[1].clone()))
        .collect()
}

/// The activation tensors a W8A8 calibration must observe: input `A` of every MatMul with a weight initializer,
/// deduplicated, in graph order.
pub fn calibration_targets(model: &ModelProto) -> Vec<String> {
    let mut seen = HashSet::new();
    model.graph.iter().flat_map(weight_matmuls).filter_map(|(_, a, _)| seen.insert(a.clone()).then_some(a)).collect()
}

/// Adds `names` as FLOAT graph outputs (the copy of the graph the calibration run executes: runtimes can only
/// return intermediate tensors that are graph outputs). Names already among the outputs are skipped.
pub fn add_observed_outputs(model: &mut ModelProto, names: &[String]) -> Result<()> {
    let graph = model.graph.as_mut().ok_or_else(|| CalibError::graph("model", "has no graph"))?;
    let existing: HashSet<String> = graph.output.iter().filter_map(|o| o.name.clone()).collect();
    for n in names.iter().filter(|n| !existing.contains(*n)) {
        graph.output.push(ValueInfoProto {
            name: Some(n.clone()),
            r#type: Some(TypeProto {
                value: Some(TypeValue::TensorType(TypeTensor { elem_type: Some(DataType::Float as i32), shape: None })),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    Ok(())
}

/// Default-domain opset the model imports (None when it imports none).
pub fn default_opset(model: &ModelProto) -> Option<i64> {
    model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
}

/// Quantizes the model in `model_dir` per `opts` and writes every initializer of at least
/// `opts.external_threshold` bytes to `out_dir/data_location` (4 KiB-aligned). The caller serializes the model to
/// `out_dir` afterwards; it no longer references the source model's data files.
pub fn quantize_model(
    model: &mut ModelProto,
    model_dir: &Path,
    out_dir: &Path,
    data_location: &str,
    opts: &QdqOptions,
) -> Result<RewriteSummary> {
    Ok(quantize_model_hashed(model, model_dir, out_dir, data_location, opts)?.0)
}

/// [`quantize_model`], also returning the data file with its size and sha256 (hashed as it was written, on the
/// writer's own thread, while the next weight is quantized).
pub fn quantize_model_hashed(
    model: &mut ModelProto,
    model_dir: &Path,
    out_dir: &Path,
    data_location: &str,
    opts: &QdqOptions,
) -> Result<(RewriteSummary, WrittenFile)> {
    let reader = ExternalDataReader::new(model_dir);
    // Writing over a data file the source model still reads from would destroy the weights mid-rewrite.
    let target = out_dir.join(data_location);
    let same = |a: &Path, b: &Path| a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y);
    for t in model.graph.iter().flat_map(|g| g.initializer.iter()).filter(|t| is_external(t)) {
        let loc =
            t.external_data.iter().find(|e| e.key.as_deref() == Some("location")).and_then(|e| e.value.as_deref());
        if let Some(loc) = loc.filter(|l| same(&model_dir.join(l), &target)) {
            return Err(CalibError::invalid(
                "external data location",
                format!("a file other than the source model's `{loc}`"),
                target.display(),
            ));
        }
    }
    let mut writer = ExternalDataWriter::create_background(out_dir, data_location)?;
    let threshold = opts.external_threshold;
    let summary = rewrite(model, &reader, opts, Some((&mut writer, threshold)))?;
    let file = writer.finish_hashed()?;
    Ok((summary, file))
}

/// Rewrites the graph in place (new initializers carry inline `raw_data`; externally stored source weights are
/// read through `reader`). Quantized fp32 weights are removed unless another node still reads them.
pub fn rewrite_graph(model: &mut ModelProto, reader: &ExternalDataReader, opts: &QdqOptions) -> Result<RewriteSummary> {
    rewrite(model, reader, opts, None)
}

/// The rewrite, one weight at a time. With `out` (a writer and the external-data threshold), the initializers that
/// stay are moved to the writer first, in graph order, and each new one is written as soon as it is made: memory
/// holds one weight, never the quantized model, and the data file is laid out as rewriting everything inline and
/// then moving every initializer over in order lays it out (`quantize_model`'s layout before it streamed).
fn rewrite(
    model: &mut ModelProto,
    reader: &ExternalDataReader,
    opts: &QdqOptions,
    mut out: Option<(&mut ExternalDataWriter, usize)>,
) -> Result<RewriteSummary> {
    check_scheme(model, opts)?;
    let graph = model.graph.as_mut().ok_or_else(|| CalibError::graph("model", "has no graph"))?;
    let mut summary = RewriteSummary::default();
    skipped_non_float(graph, &mut summary);
    let targets = select_targets(graph, opts, &mut summary)?;
    let sources = take_sources(graph, &targets);
    if let Some((writer, threshold)) = out.as_mut() {
        rehome_initializers(&mut graph.initializer, reader, writer, *threshold)?;
    }
    let mut store = |t: &mut TensorProto| -> Result<()> {
        let Some((writer, threshold)) = out.as_mut() else { return Ok(()) };
        match t.raw_data.take() {
            Some(raw) if raw.len() >= *threshold => writer.write_tensor_owned(t, raw),
            raw => {
                t.raw_data = raw;
                Ok(())
            }
        }
    };
    // Every weight's fp32 values, one after the other, in one buffer (see `ExternalDataReader::tensor_f32_into`).
    let mut values = Vec::new();
    let mut quantize = |w: &str, src: &TensorProto, k: usize, n: usize, new_inits: &mut Vec<TensorProto>| {
        reader.tensor_f32_into(src, &mut values)?;
        dequantized_weight(w, &values, k, n, opts.scheme, new_inits)
    };
    let new_inits = rewrite_nodes(graph, &targets, &sources, &mut quantize, opts, &mut store, &mut summary)?;
    graph.initializer.extend(new_inits);
    Ok(summary)
}

/// How [`rewrite_nodes`] gets a weight quantized: `(weight name, its fp32 initializer, k, n, new initializers)`
/// appends the weight's new initializers and returns the `DequantizeLinear` that reads it back.
type QuantizeWeight<'a> = dyn FnMut(&str, &TensorProto, usize, usize, &mut Vec<TensorProto>) -> Result<NodeProto> + 'a;

/// The fp32 weights of the target MatMuls by name: moved out of the graph when the rewrite replaces every read of
/// them, cloned when a node or graph output still reads them (they stay, in their place).
fn take_sources(graph: &mut GraphProto, targets: &HashMap<usize, Target>) -> HashMap<String, TensorProto> {
    let mut still_read: HashSet<String> = graph.output.iter().filter_map(|o| o.name.clone()).collect();
    for (idx, node) in graph.node.iter().enumerate() {
        let b_replaced = targets.contains_key(&idx);
        still_read
            .extend(node.input.iter().enumerate().filter(|&(j, _)| !(b_replaced && j == 1)).map(|(_, x)| x.clone()));
    }
    let weights: HashSet<&str> = targets.values().map(|t| t.w.as_str()).collect();
    let mut sources = HashMap::new();
    let mut kept = Vec::with_capacity(graph.initializer.len());
    for t in std::mem::take(&mut graph.initializer) {
        let name = t.name.clone().unwrap_or_default();
        if !weights.contains(name.as_str()) {
            kept.push(t);
        } else if still_read.contains(&name) {
            sources.insert(name, t.clone());
            kept.push(t);
        } else {
            sources.insert(name, t);
        }
    }
    graph.initializer = kept;
    sources
}

/// A MatMul to rewrite: its name, activation input `A`, weight initializer `B`, and whether `A` is quantized too.
struct Target {
    name: String,
    a: String,
    w: String,
    quantize_a: bool,
}

/// Refuses an invalid int4 block size, or a model whose default-domain opset is below what the scheme needs.
fn check_scheme(model: &ModelProto, opts: &QdqOptions) -> Result<()> {
    if let QuantScheme::Int4WeightOnly { block_size, .. } = opts.scheme {
        validate_block_size(block_size)?;
    }
    let opset = default_opset(model).unwrap_or(0);
    if opset < opts.scheme.min_opset() {
        return Err(CalibError::graph(
            "opset_import",
            format!(
                "{:?} needs default-domain opset >= {}, model declares {opset}",
                opts.scheme,
                opts.scheme.min_opset()
            ),
        ));
    }
    Ok(())
}

/// The MatMuls to rewrite by node index, recording the excluded ones in `summary`; fails on a W8A8 input that
/// has no activation scale.
fn select_targets(
    graph: &GraphProto,
    opts: &QdqOptions,
    summary: &mut RewriteSummary,
) -> Result<HashMap<usize, Target>> {
    let mut targets = HashMap::new();
    for (idx, a, w) in weight_matmuls(graph) {
        let name = node_name(&graph.node[idx], idx);
        if opts.exclude.contains(&name) || opts.exclude.contains(&w) {
            summary.skipped.push((name, "excluded".into()));
            continue;
        }
        let quantize_a =
            opts.scheme == QuantScheme::W8A8 && !opts.weight_only.contains(&name) && !opts.weight_only.contains(&w);
        if quantize_a && !opts.activation_scales.contains_key(&a) {
            return Err(CalibError::graph(
                format!("MatMul `{name}`"),
                format!("no activation scale for input `{a}` (calibration did not observe it)"),
            ));
        }
        targets.insert(idx, Target { name, a, w, quantize_a });
    }
    Ok(targets)
}

/// Rewrites the target MatMuls in graph order: each weight's `DequantizeLinear` goes before its first reader,
/// each W8A8 input's `Q → DQ` pair before its MatMul. Each weight of `sources` is quantized once by `quantize`, and
/// its new initializers handed to `store` (which may move their bytes to a data file) before the next one is
/// quantized. Returns the new initializers.
fn rewrite_nodes(
    graph: &mut GraphProto,
    targets: &HashMap<usize, Target>,
    sources: &HashMap<String, TensorProto>,
    quantize: &mut QuantizeWeight<'_>,
    opts: &QdqOptions,
    store: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
    summary: &mut RewriteSummary,
) -> Result<Vec<TensorProto>> {
    let mut new_inits: Vec<TensorProto> = Vec::new();
    // New initializers before this index have been handed to `store`.
    let mut stored = 0;
    let mut weight_dq: HashMap<String, String> = HashMap::new();
    let mut nodes = Vec::with_capacity(graph.node.len() + 3 * targets.len());
    let old_nodes = std::mem::take(&mut graph.node);
    for (idx, mut node) in old_nodes.into_iter().enumerate() {
        let Some(Target { name, a, w, quantize_a }) = targets.get(&idx) else {
            nodes.push(node);
            continue;
        };
        let src = &sources[w];
        let (k, n) = (dim(src, 0)?, dim(src, 1)?);
        if !weight_dq.contains_key(w) {
            let dq = quantize(w, src, k, n, &mut new_inits)?;
            weight_dq.insert(w.clone(), dq.output[0].clone());
            nodes.push(dq);
        }
        node.input[1] = weight_dq[w].clone();
        if *quantize_a {
            node.input[0] = quantized_activation(a, name, opts.activation_scales[a], &mut new_inits, &mut nodes)?;
        }
        for t in &mut new_inits[stored..] {
            store(t)?;
        }
        stored = new_inits.len();
        let output = node.output.first().cloned().unwrap_or_default();
        summary.quantized.push(QuantizedMatMul {
            node: name.clone(),
            activation: a.clone(),
            weight: w.clone(),
            k,
            n,
            output,
            activation_quantized: *quantize_a,
        });
        nodes.push(node);
    }
    graph.node = nodes;
    Ok(new_inits)
}

/// Quantizes weight `w` (`values`, `[k, n]`) per `scheme` into `new_inits` and returns the `DequantizeLinear` that
/// reads it back as `{w}_dequantized`.
fn dequantized_weight(
    w: &str,
    values: &[f32],
    k: usize,
    n: usize,
    scheme: QuantScheme,
    new_inits: &mut Vec<TensorProto>,
) -> Result<NodeProto> {
    let dq_out = format!("{w}_dequantized");
    let (q_name, scale_name) = (quantized_weight_name(w, scheme), format!("{w}_scale"));
    let mut dq = NodeProto {
        name: Some(format!("{w}/DequantizeLinear")),
        op_type: Some("DequantizeLinear".into()),
        input: vec![q_name.clone(), scale_name.clone()],
        output: vec![dq_out],
        ..Default::default()
    };
    match scheme {
        QuantScheme::W8A8 | QuantScheme::Int8WeightOnly => {
            let q = quantize_per_channel(values, k, n)?;
            new_inits.push(int8_tensor(&q_name, &[k, n], &q.values));
            new_inits.push(f32_tensor(&scale_name, &[n], &q.scales));
            let zp = format!("{w}_zero_point");
            new_inits.push(int8_tensor(&zp, &[n], &vec![0; n]));
            dq.input.push(zp);
            dq.attribute.push(int_attr("axis", 1));
        }
        QuantScheme::Int4WeightOnly { block_size, asymmetric } => {
            let q = quantize_blocked_packed(values, k, n, block_size, asymmetric)?;
            let blocks = k.div_ceil(block_size);
            let int4_type = if asymmetric { DataType::Uint4 } else { DataType::Int4 };
            new_inits.push(int4_tensor(&q_name, &[k, n], int4_type, q.packed));
            new_inits.push(f32_tensor(&scale_name, &[blocks, n], &q.scales));
            if let Some(zp) = q.packed_zero_points {
                let zp_name = format!("{w}_zero_point");
                new_inits.push(int4_tensor(&zp_name, &[blocks, n], DataType::Uint4, zp));
                dq.input.push(zp_name);
            }
            dq.attribute.push(int_attr("axis", 0));
            dq.attribute.push(int_attr("block_size", block_size as i64));
        }
    }
    Ok(dq)
}

/// Appends MatMul `name`'s own `QuantizeLinear → DequantizeLinear` pair on input `a` (per-tensor `scale`, zero
/// point 0) to `nodes`, its initializers to `new_inits`, and returns the dequantized tensor's name.
fn quantized_activation(
    a: &str,
    name: &str,
    scale: f32,
    new_inits: &mut Vec<TensorProto>,
    nodes: &mut Vec<NodeProto>,
) -> Result<String> {
    // Scale and zero point are per consumer too (same values): with shared initializers ONNX Runtime's
    // common-subexpression elimination merges the Q nodes again and the fusion is lost.
    let (scale_name, zp_name) = (format!("{a}_scale_for_{name}"), format!("{a}_zero_point_for_{name}"));
    if !(scale.is_finite() && scale > 0.0) {
        return Err(CalibError::invalid(format!("activation scale of `{a}`"), "finite and > 0", scale));
    }
    new_inits.push(f32_tensor(&scale_name, &[], &[scale]));
    new_inits.push(int8_tensor(&zp_name, &[], &[0]));
    let (q_out, dq_out) = (format!("{a}_quantized_for_{name}"), format!("{a}_dequantized_for_{name}"));
    nodes.push(NodeProto {
        name: Some(format!("{name}/input/QuantizeLinear")),
        op_type: Some("QuantizeLinear".into()),
        input: vec![a.to_string(), scale_name.clone(), zp_name.clone()],
        output: vec![q_out.clone()],
        ..Default::default()
    });
    nodes.push(NodeProto {
        name: Some(format!("{name}/input/DequantizeLinear")),
        op_type: Some("DequantizeLinear".into()),
        input: vec![q_out, scale_name, zp_name],
        output: vec![dq_out.clone()],
        ..Default::default()
    });
    Ok(dq_out)
}

/// MatMuls whose weight is an initializer this rewrite cannot take (not 2-D FLOAT, e.g. an fp16 graph).
fn skipped_non_float(graph: &GraphProto, summary: &mut RewriteSummary) {
    let inits: HashMap<&str, &TensorProto> =
        graph.initializer.iter().filter_map(|t| t.name.as_deref().map(|n| (n, t))).collect();
    for (idx, n) in graph.node.iter().enumerate().filter(|(_, n)| n.op_type.as_deref() == Some("MatMul")) {
        let Some(t) = n.input.get(1).and_then(|w| inits.get(w.as_str())) else { continue };
        if t.dims.len() != 2 || t.data_type != Some(DataType::Float as i32) {
            let dt = t
                .data_type
                .and_then(|d| DataType::try_from(d).ok())
                .map_or("unknown".into(), |d| d.as_str_name().to_string());
            summary.skipped.push((
                node_name(n, idx),
                format!(
                    "weight `{}` is {dt} with {} dims; only 2-D FLOAT weights are quantized",
                    n.input[1],
                    t.dims.len()
                ),
            ));
        }
    }
}

fn node_name(node: &NodeProto, idx: usize) -> String {
    node.name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| format!("MatMul_{idx}"))
}

fn quantized_weight_name(w: &str, scheme: QuantScheme) -> String {
    match scheme {
        QuantScheme::Int4WeightOnly { asymmetric: false, .. } => format!("{w}_int4"),
        QuantScheme::Int4WeightOnly { asymmetric: true, .. } => format!("{w}_uint4"),
        _ => format!("{w}_int8"),
    }
}

fn dim(t: &TensorProto, i: usize) -> Result<usize> {
    usize::try_from(t.dims[i]).map_err(|_| {
        CalibError::graph(
            format!("weight `{}`", t.name.as_deref().unwrap_or_default()),
            format!("bad dims {:?}", t.dims),
        )
    })
}

fn int8_tensor(name: &str, dims: &[usize], v: &[i8]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Int8 as i32),
        raw_data: Some(v.iter().map(|&x| x as u8).collect()),
        ..Default::default()
    }
}

fn int4_tensor(name: &str, dims: &[usize], data_type: DataType, packed: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(data_type as i32),
        raw_data: Some(packed),
        ..Default::default()
    }
}

fn f32_tensor(name: &str, dims: &[usize], v: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(v.iter().flat_map(|f| f.to_le_bytes()).collect()),
        ..Default::default()
    }
}

fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}
