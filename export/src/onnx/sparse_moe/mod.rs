//! Serving-graph rewrite for ONNX Runtime on CPU: each DeepseekV3 MoE layer's routed experts become one
//! `com.microsoft.MoE` node, so each token runs only the experts its router picked.
//!
//! The portable graph runs every routed expert on every token and masks the outputs (`arch::deepseek_v3::moe`):
//! correct on every runtime, but for R1's 256 experts with 8 active it does 32× the routed work of a token and reads
//! every expert's weights at every decode step. ONNX Runtime 1.31's CPU provider has two sparse operators:
//!
//! - `com.microsoft.QMoE` takes a `router_weights` input beside `router_probs` (select with one tensor, mix with
//!   another: DeepSeek's bias-corrected selection), but its expert weights are `uint8` (int4/int8/int2) or fp8
//!   only: no float32 or float16 experts. It is the operator for quantized experts.
//! - `com.microsoft.MoE` takes float32 / float16 experts. Its CPU kernel softmaxes `router_probs`, keeps each
//!   token's top `k`, and mixes the experts' outputs with those softmax values (divided by their sum with
//!   `normalize_routing_weights`). Its activation is `swiglu` with gate and up interleaved in one `fc1`
//!   (`swiglu_fusion = 1`, the only fused layout the CPU kernel takes; separate `fc3` is refused): `silu(g) · u`
//!   with `activation_alpha = 1`, `activation_beta = 0` and no `swiglu_limit`. It has no group-limited top-k, no
//!   sigmoid scoring, no correction bias and no routing-weight input.
//!
//! So the router stays the portable graph's own standard ops, exactly transformers' (sigmoid scores; the
//! `e_score_correction_bias` used only to select; group-limited top-k over `n_group` / `topk_group`;
//! `norm_topk_prob`; `routed_scaling_factor`): it yields `w [N, E]`, each token's final mixing weights, zero
//! outside its top-k. The operator is fed `router_probs = ln(max(w, 1e-30))`: its softmax is then `w / Σw`
//! (unselected experts get `e^-69 / Σw`, nothing next to a selected weight), its top-k are exactly the experts with
//! a weight, and with `normalize_routing_weights` each is mixed with `w_e / Σ_topk w`. Multiplying the operator's
//! output by `Σ w` (a `[N, 1]` ReduceSum) gives `Σ_e w_e · expert_e(x)`, the portable graph's sum: the scaling
//! factor and an unnormalized `norm_topk_prob = false` pass through the sum. The only difference is rounding
//! (`ln` then `exp` of each weight, ~1e-7 relative), and on exact ties of choice scores the portable mask may keep
//! more than `k` experts where the operator (like transformers' index-based top-k) keeps `k`.
//!
//! Measured before choosing (`python3 export/benches/moe_sparse_dispatch.py`, ONNX Runtime 1.31.1, 2 threads, this
//! 2-core machine while other builds ran; ms per MoE block of hidden 1024, intermediate 512, 64 experts, top-8, fp32;
//! the three agree to < 1e-6 relative; BENCHMARKS.md has top-6 too):
//!
//! | tokens | dense masked | per-token gather (standard ops) | `com.microsoft.MoE` |
//! |---|---|---|---|
//! | 1 | 38.2 | 9.4 | 4.8 |
//! | 8 | 75.3 | 88.0 | 19.7 |
//! | 64 | 218 | 483 | 46.1 |
//! | 256 | 543 | 2325 | 168 |
//!
//! The operator wins at every size (it groups tokens by expert, so a prefill runs one GEMM per selected expert),
//! where gathering each token's expert matrices only helps single-token decode and grows as `tokens·k·H·I`.
//!
//! The rewrite relays the expert weights into the operator's layout (`relayout.rs`, one expert at a time), in a data
//! file beside the serving copy; the dense stacks and the nodes that only fed them are dropped. The shared experts
//! stay a plain SwiGLU MLP. The operator is ONNX Runtime's own (no session option). tract runs the portable
//! `model.onnx` only; asked to load this serving graph it refuses, naming the operator (`engine/src/backend/tract.rs`).
//!
//! The manifest records the rewrite (`targets.cpu.sparse_experts`).
//!
//! In `int8-wo`, `int4-wo` and `int8` artifacts the experts run as one `com.microsoft.QMoE` per layer fed the same
//! router (`quantized.rs`; recorded in `targets.cpu.expert_quantization`): quantized on the way from float stacks
//! (staged exports), or, where the portable graph holds them quantized already (a streamed `int8-wo` / `int4-wo`
//! export: 3-D codes behind a blocked `DequantizeLinear`), their codes re-laid into the operator's layout without
//! rounding again. `--cpu-float-experts` dequantizes such stacks into the float `MoE`.

mod quantized;
mod relayout;

use std::collections::HashMap;
use std::path::Path;

use r1_calibration::matmul_nbits::MS_DOMAIN;
use r1_engine::manifest::{Family, Manifest, Precision};
use r1_proto::onnx::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto};

use super::{attr_f, attr_i, attr_s, i64_tensor, inline_tensor, rewrite_node as node, ElemType, ExternalDataWriter};
use crate::error::{ExportError, Result};
pub use quantized::{ExpertQuantization, ExpertWeights, QMOE_OP};
use relayout::{external_tensor, float_type, Codes, QuantizedStack, Reader, Stack, Stacks};

/// Prefix of every node and tensor this rewrite adds.
const PREFIX: &str = "/sparse_experts";
/// The operator, `domain.type`.
pub const MOE_OP: &str = "com.microsoft.MoE";
/// The floor of a routing weight before its logarithm: an unselected expert's zero becomes `ln(1e-30) ≈ −69`.
const WEIGHT_FLOOR: f32 = 1e-30;

fn graph_err(message: String) -> ExportError {
    ExportError::Graph(format!("sparse experts: {message}"))
}

/// The routed experts per token of a DeepseekV3 artifact (the graphs [`sparse_experts`] rewrites), read from its
/// manifest's `config`; `None` for other families.
pub fn moe_top_k(manifest: &Manifest) -> Option<usize> {
    if manifest.family != Family::DeepseekV3 {
        return None;
    }
    manifest.config.get("num_experts_per_tok")?.as_u64().map(|k| k as usize)
}

/// How an artifact's serving graph stores its routed experts: quantized for `int8-wo` / `int8` (int8 per channel)
/// and `int4-wo` (the artifact's own int4 scheme, `quantization.scheme`: blocks of 32, asymmetric, when an older
/// manifest does not say), float otherwise.
pub fn expert_weights(manifest: &Manifest) -> ExpertWeights {
    match manifest.precision {
        Precision::Int8WeightOnly | Precision::Int8 => ExpertWeights::Int8,
        Precision::Int4WeightOnly => {
            let scheme = manifest.quantization.as_ref().and_then(|q| q.pointer("/scheme/Int4WeightOnly"));
            let get = |k: &str| scheme.and_then(|s| s.get(k));
            ExpertWeights::Int4 {
                block: get("block_size").and_then(serde_json::Value::as_u64).map_or(32, |b| b as usize),
                asymmetric: get("asymmetric").and_then(serde_json::Value::as_bool).unwrap_or(true),
            }
        }
        Precision::Fp32 | Precision::Fp16 => ExpertWeights::Float,
    }
}

/// Whether `model` already holds this rewrite's nodes.
pub fn has_sparse_experts(model: &ModelProto) -> bool {
    model
        .graph
        .as_ref()
        .is_some_and(|g| g.node.iter().any(|n| n.name.as_deref().is_some_and(|s| s.starts_with(PREFIX))))
}

/// One MoE layer of the portable graph.
struct Layer {
    index: usize,
    /// The tokens `[N, H]` the experts read.
    x: String,
    /// The router's mixing weights `[N, E]` (float32, zero outside each token's top-k).
    weights: String,
    /// The weighted sum over experts `[N, H]`, which the operator produces instead.
    out: String,
    /// The stacked expert weights: gate and up `[E, H, I]`, down `[E, I, H]`.
    stacks: [Source; 3],
    dtype: ElemType,
    experts: usize,
    hidden: usize,
    inter: usize,
}

/// Where a stack's weights are: a float initializer, or the codes, scales and zero points of a blocked
/// `DequantizeLinear` (`axis = 1`, blocks of `block` rows along K) whose output the MatMul reads.
enum Source {
    Float(String),
    Quantized { codes: String, scales: String, zeros: Option<String>, block: usize, form: Codes },
}

impl Source {
    /// The tensor that carries the stack's dims (`[E, K, N]`).
    fn tensor(&self) -> &str {
        match self {
            Source::Float(n) | Source::Quantized { codes: n, .. } => n,
        }
    }
}

/// The source of the stack a MatMul reads as `name`: an initializer, or a quantized stack's `DequantizeLinear`;
/// `None` when it is neither (not a form this rewrite knows).
fn stack_source(g: &GraphProto, name: &str) -> Result<Option<Source>> {
    let init = |n: &str| g.initializer.iter().find(|t| t.name.as_deref() == Some(n));
    if init(name).is_some() {
        return Ok(Some(Source::Float(name.to_string())));
    }
    let Some(dq) = g.node.iter().find(|n| n.output.first().map(String::as_str) == Some(name)) else {
        return Ok(None);
    };
    if dq.op_type() != "DequantizeLinear" || !matches!(dq.domain(), "" | "ai.onnx") {
        return Ok(None);
    }
    let attr = |a: &str| dq.attribute.iter().find(|x| x.name() == a).map(|x| x.i());
    let (Some(1), Some(block)) = (attr("axis"), attr("block_size")) else { return Ok(None) };
    let input = |j: usize| dq.input.get(j).filter(|s| !s.is_empty()).cloned();
    let (Some(codes), Some(scales)) = (input(0), input(1)) else { return Ok(None) };
    let zeros = input(2);
    let (Some(c), Some(sc)) = (init(&codes), init(&scales)) else { return Ok(None) };
    let Some(form) = Codes::of(c.data_type) else { return Ok(None) };
    let blocks = match c.dims[..] {
        [e, k, n] if block > 0 && k > 0 => [e, (k + block - 1) / block, n],
        ref d => return Err(graph_err(format!("`{codes}` has dims {d:?}, not [experts, K, N]"))),
    };
    let z = zeros.as_deref().map(|z| init(z).ok_or_else(|| graph_err(format!("`{z}` is not an initializer"))));
    let z = z.transpose()?;
    if float_type(sc) != Some(ElemType::F32) || sc.dims != blocks || z.is_some_and(|z| z.dims != blocks) {
        return Err(graph_err(format!(
            "`{}`: scales `{scales}` {:?} (and zero points) are not float32 {blocks:?}",
            dq.name(),
            sc.dims
        )));
    }
    Ok(Some(Source::Quantized { codes, scales, zeros, block: block as usize, form }))
}

/// Opens the stack `s` of `g` (external data resolved in `dir`); `k`, `n`: one expert matrix's dims.
fn open_stack<'t>(g: &'t GraphProto, s: &Source, dir: &Path, k: usize, n: usize) -> Result<Stack<'t>> {
    let reader = |name: &str| -> Result<Reader<'t>> {
        let init = g.initializer.iter().find(|t| t.name.as_deref() == Some(name));
        Reader::open(init.ok_or_else(|| graph_err(format!("no initializer `{name}`")))?, dir)
    };
    Ok(match s {
        Source::Float(name) => Stack::Float(reader(name)?),
        Source::Quantized { codes, scales, zeros, block, form } => Stack::Quantized(QuantizedStack {
            codes: reader(codes)?,
            scales: reader(scales)?,
            zeros: zeros.as_deref().map(reader).transpose()?,
            form: *form,
            block: *block,
            k,
            n,
        }),
    })
}

/// Layer `i`'s tensors, or `None` when its experts are not in a form the operator can take.
fn plan_layer(g: &GraphProto, by_name: &HashMap<&str, &NodeProto>, i: usize) -> Result<Option<Layer>> {
    let p = format!("/model/layers.{i}/mlp/experts");
    let find = |suffix: &str| {
        let name = format!("{p}/{suffix}");
        by_name.get(name.as_str()).copied().ok_or_else(|| graph_err(format!("the graph has no node `{name}`")))
    };
    let input = |n: &NodeProto, k: usize| {
        n.input.get(k).cloned().ok_or_else(|| graph_err(format!("node `{}` has no input {k}", n.name())))
    };
    let (gate, up, down) = (find("gate_proj/MatMul")?, find("up_proj/MatMul")?, find("down_proj/MatMul")?);
    let x = input(gate, 0)?;
    if input(up, 0)? != x {
        return Err(graph_err(format!("`{}` and `{}` read different tokens", gate.name(), up.name())));
    }
    let weights = input(find("weights/Transpose")?, 0)?;
    let reduce = find("ReduceSum")?;
    let out = reduce.output.first().cloned().ok_or_else(|| graph_err(format!("`{}` has no output", reduce.name())))?;
    let mut stacks = Vec::new();
    for m in [gate, up, down] {
        match stack_source(g, &input(m, 1)?)? {
            Some(s) => stacks.push(s),
            None => return Ok(None),
        }
    }
    let Ok(stacks) = <[Source; 3]>::try_from(stacks) else { return Ok(None) };
    let quantized = matches!(stacks[0], Source::Quantized { .. });
    if stacks.iter().any(|s| matches!(s, Source::Quantized { .. }) != quantized) {
        return Err(graph_err(format!("layer {i}: some expert stacks are quantized and some are not")));
    }
    let tensors = stacks
        .iter()
        .map(|s| {
            g.initializer
                .iter()
                .find(|t| t.name.as_deref() == Some(s.tensor()))
                .ok_or_else(|| graph_err(format!("no initializer `{}`", s.tensor())))
        })
        .collect::<Result<Vec<_>>>()?;
    // Quantized stacks are read back as float32 (their scales' type).
    let tensor_type =
        |t: &TensorProto| if quantized { Codes::of(t.data_type).map(|_| ElemType::F32) } else { float_type(t) };
    let Some(dtype) = tensor_type(tensors[0]) else { return Ok(None) };
    let [e, h, inter] = match tensors[0].dims[..] {
        [e, h, i] if e > 0 && h > 0 && i > 0 => [e as usize, h as usize, i as usize],
        ref d => {
            return Err(graph_err(format!(
                "`{}` has dims {d:?}, not [experts, hidden, intermediate]",
                stacks[0].tensor()
            )))
        }
    };
    let want = [[e, h, inter], [e, h, inter], [e, inter, h]];
    for (t, w) in tensors.iter().zip(want) {
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        if dims != w || tensor_type(t) != Some(dtype) || t.data_type != tensors[0].data_type {
            return Err(graph_err(format!(
                "`{}` is {dims:?} of type {:?}, expected {w:?} of type {:?}",
                t.name(),
                t.data_type,
                tensors[0].data_type
            )));
        }
    }
    Ok(Some(Layer { index: i, x, weights, out, stacks, dtype, experts: e, hidden: h, inter }))
}

/// The MoE layers of the portable graph (by their `.../mlp/experts/ReduceSum` nodes), in order; `None` when one of
/// them cannot be rewritten.
fn plan(g: &GraphProto) -> Result<Option<Vec<Layer>>> {
    let by_name: HashMap<&str, &NodeProto> = g.node.iter().filter_map(|n| Some((n.name.as_deref()?, n))).collect();
    let mut indices: Vec<usize> = g
        .node
        .iter()
        .filter_map(|n| n.name.as_deref()?.strip_prefix("/model/layers.")?.strip_suffix("/mlp/experts/ReduceSum"))
        .filter_map(|i| i.parse().ok())
        .collect();
    indices.sort_unstable();
    let mut layers = Vec::new();
    for i in indices {
        match plan_layer(g, &by_name, i)? {
            Some(l) => layers.push(l),
            None => return Ok(None),
        }
    }
    Ok(Some(layers))
}

/// Rewrites `model` in place (see the module docs) and returns the number of MoE layers rewritten and how their
/// experts were quantized. `top_k` is the model's experts per token; `weights` chooses `MoE` (float) or `QMoE`
/// (`quantized.rs`: quantized here from float stacks, or re-laid from quantized ones); `data_dir` resolves the
/// graph's external data; the relaid experts are written to `out_dir/location`, which the serving copy's graph file
/// must sit beside. Returns 0 layers and leaves the graph (and `out_dir`) as they are when it was rewritten before,
/// has no MoE layer, or holds experts in a form the operator cannot take. Errors name the node or tensor of the
/// portable graph that is missing or malformed.
pub fn sparse_experts(
    model: &mut ModelProto,
    top_k: usize,
    weights: ExpertWeights,
    data_dir: &Path,
    out_dir: &Path,
    location: &str,
) -> Result<SparseExperts> {
    let none = SparseExperts { layers: 0, quantization: None };
    if has_sparse_experts(model) {
        return Ok(none);
    }
    let g = model.graph.as_mut().ok_or_else(|| graph_err("the model has no graph".into()))?;
    let Some(layers) = plan(g)? else { return Ok(none) };
    if layers.is_empty() {
        return Ok(none);
    }
    let mut writer = ExternalDataWriter::create(out_dir, location)?;
    let mut new_inits = vec![
        inline_tensor(&t("weight_floor"), ElemType::F32, &[], WEIGHT_FLOOR.to_le_bytes().to_vec()),
        i64_tensor(&t("last_axis"), &[1], &[-1]),
    ];
    let mut replacements: HashMap<String, Vec<NodeProto>> = HashMap::new();
    let mut quantization = None;
    for l in &layers {
        if top_k == 0 || top_k > l.experts {
            return Err(graph_err(format!("{top_k} experts per token of {}", l.experts)));
        }
        let (h, i) = (l.hidden, l.inter);
        let stacks = Stacks {
            gate: open_stack(g, &l.stacks[0], data_dir, h, i)?,
            up: open_stack(g, &l.stacks[1], data_dir, h, i)?,
            down: open_stack(g, &l.stacks[2], data_dir, i, h)?,
            experts: l.experts,
            hidden: l.hidden,
            inter: l.inter,
        };
        if weights != ExpertWeights::Float {
            if l.dtype != ElemType::F32 {
                return Err(graph_err(format!(
                    "layer {}: quantized experts are made from float32 stacks, these are {}",
                    l.index,
                    l.dtype.name()
                )));
            }
            let (spans, geometry) = quantized::write_layer(&stacks, weights, &mut writer)?;
            new_inits.extend(quantized::initializers(l, weights, &spans, geometry, location));
            let zero_points = spans.fc1[2].is_some();
            let nodes = quantized::layer_nodes(l, top_k, weights, geometry, zero_points, &mut new_inits);
            replacements.insert(l.out.clone(), nodes);
            let (block_size, padded_hidden, padded_intermediate) = geometry;
            let q = quantization.get_or_insert_with(|| ExpertQuantization {
                op: QMOE_OP.into(),
                bits: if weights == ExpertWeights::Int8 { 8 } else { 4 },
                block_size,
                scales: if weights == ExpertWeights::Int8 { "per_channel" } else { "blocked" }.into(),
                asymmetric: zero_points,
                accuracy_level: quantized::ACCURACY_LEVEL,
                padded_hidden,
                padded_intermediate,
                bytes: 0,
            });
            q.bytes += spans.bytes;
            continue;
        }
        let (fc1, fc2) = relayout::write_layer(&stacks, l.dtype, &mut writer)?;
        let (e, h, i) = (l.experts as i64, l.hidden as i64, l.inter as i64);
        let p = format!("{PREFIX}/layers.{}", l.index);
        new_inits.push(external_tensor(&format!("{p}/fc1"), l.dtype, &[e, 2 * i, h], location, fc1));
        new_inits.push(external_tensor(&format!("{p}/fc2"), l.dtype, &[e, h, i], location, fc2));
        replacements.insert(l.out.clone(), layer_nodes(l, top_k));
    }
    writer.finish()?;
    g.initializer.extend(new_inits);
    // Each layer's nodes take the place of its weighted sum: every input is produced earlier (the tokens and the
    // router's weights feed the dense MatMuls that came before it), so the order stays topological.
    let old = std::mem::take(&mut g.node);
    for n in old {
        match n.output.first().and_then(|o| replacements.remove(o)) {
            Some(nodes) => g.node.extend(nodes),
            None => g.node.push(n),
        }
    }
    super::fused_attention::remove_dead_nodes(g);
    if !model.opset_import.iter().any(|o| o.domain.as_deref() == Some(MS_DOMAIN)) {
        model.opset_import.push(OperatorSetIdProto { domain: Some(MS_DOMAIN.into()), version: Some(1) });
    }
    Ok(SparseExperts { layers: layers.len(), quantization })
}

/// What [`sparse_experts`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseExperts {
    /// MoE layers rewritten (0: none, the graph is unchanged).
    pub layers: usize,
    /// How their experts were quantized (`None`: float, `com.microsoft.MoE`).
    pub quantization: Option<ExpertQuantization>,
}

/// `s` under this rewrite's [`PREFIX`].
fn t(s: &str) -> String {
    format!("{PREFIX}/{s}")
}

/// Layer `l`'s routing input, operator and rescaling, ending in `l.out`.
fn layer_nodes(l: &Layer, top_k: usize) -> Vec<NodeProto> {
    let p = format!("{PREFIX}/layers.{}", l.index);
    let n = |s: &str| format!("{p}/{s}");
    let cast = |name: &str, input: &str, output: &str| NodeProto {
        attribute: vec![attr_i("to", l.dtype.onnx_code() as i64)],
        ..node(&n(name), "Cast", &[input], &[output])
    };
    let mut nodes = vec![
        node(&n("router_probs/Max"), "Max", &[&l.weights, &t("weight_floor")], &[&n("floored")]),
        node(&n("router_probs/Log"), "Log", &[&n("floored")], &[&n("log_weights")]),
        NodeProto {
            attribute: vec![attr_i("keepdims", 1)],
            ..node(&n("weight_sum/ReduceSum"), "ReduceSum", &[&l.weights, &t("last_axis")], &[&n("weight_sum")])
        },
    ];
    let (probs, sum) = if l.dtype == ElemType::F32 {
        (n("log_weights"), n("weight_sum"))
    } else {
        nodes.push(cast("router_probs/Cast", &n("log_weights"), &n("router_probs")));
        nodes.push(cast("weight_sum/Cast", &n("weight_sum"), &n("weight_sum_t")));
        (n("router_probs"), n("weight_sum_t"))
    };
    nodes.push(NodeProto {
        domain: Some(MS_DOMAIN.into()),
        attribute: swiglu_attributes(top_k, true),
        ..node(&n("MoE"), "MoE", &[&l.x, &probs, &n("fc1"), "", &n("fc2")], &[&n("mixed")])
    });
    nodes.push(node(&n("weight_sum/Mul"), "Mul", &[&n("mixed"), &sum], &[&l.out]));
    nodes
}

/// The attributes `MoE` and `QMoE` share: top-`k` routing, SwiGLU with gate and up interleaved (`silu(g) · u`), and
/// whether the operator renormalizes the selected routing weights.
pub(super) fn swiglu_attributes(top_k: usize, normalize: bool) -> Vec<r1_proto::onnx::AttributeProto> {
    vec![
        attr_i("k", top_k as i64),
        attr_s("activation_type", "swiglu"),
        attr_i("swiglu_fusion", 1),
        attr_f("activation_alpha", 1.0),
        attr_f("activation_beta", 0.0),
        attr_i("normalize_routing_weights", i64::from(normalize)),
    ]
}
