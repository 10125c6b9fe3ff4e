//! Serving-graph rewrite for ONNX Runtime on CPU: each dense layer's attention becomes one `GroupQueryAttention`
//! node: r1's own kernel (`r1.GroupQueryAttention`, [`r1_engine::backend::attention`]) in float32 graphs,
//! ONNX Runtime's `com.microsoft.GroupQueryAttention` in float16 ones ([`attention_domain`]).
//!
//! The portable graph spells attention out in basic opset-17 ops: per layer, the q/k heads' transposes, rotary
//! (`Split → Neg → Concat → Mul × 2 → Add`, for q and for k), the cache `Concat`s, the key transpose, the grouped
//! score `MatMul`, mask `Add`, `Softmax`, the context `MatMul` and three reshapes/transposes back: ~30 nodes per
//! layer, each a separate kernel launch over a small tensor during decode. ONNX Runtime's contrib
//! `GroupQueryAttention` does all of it in one kernel (rotary from `position_ids` and cos/sin tables, the cache
//! append, grouped attention without repeating the KV heads), and its CPU kernel is what ONNX Runtime GenAI runs.
//!
//! What the rewrite keeps exact: the KV cache contract's names and shapes (`past_key_values.{i}.*` in,
//! `present.{i}.*` out, keys stored after rotary, `[batch, kv_heads, positions, head_dim]`) and the rotary angles
//! (`position_ids × inv_freq`, with the graph's own `inv_freq`).
//!
//! What it changes: **the cache layout.** Each row's length comes from the attention mask (`seqlens_k = Σ mask − 1`:
//! its cached positions plus the ones it feeds) and the portable graph's additive mask is dropped, so a row's past
//! must hold its positions at the start (right-padded), and the kernel writes the new ones right after them. That is
//! the engine's KV pool: it binds each slot range as both past and present, and the kernel appends in place
//! (`targets.cpu.kv_in_place`; `r1_engine::backend::Backend::run_in_place`). The graph is not meant for the
//! left-padded host layout of `model.onnx`.
//!
//! And a limit: a row's new positions are the step's whole width after its past (`past = seqlens_k + 1 − S`; only
//! first prompts may be right-padded), so rows that feed different counts after a past cannot share a step
//! (ONNX Runtime's kernel refuses any step with more than one row feeding more than one token after a past:
//! `batch_size must be 1 when sequence_length > 1 and past context is given`). The artifact records
//! `targets.cpu.fused_attention` (and `targets.cpu.attention_op`), and the engine then runs such rows one at a time
//! (decode rows, and first chunks without a past, still run batched).
//!
//! And an option: **the cache's element type.** r1's kernel takes float16 caches under float32 activations
//! ([`fuse_attention`]'s `cache`): the layers' `past_key_values.*` inputs and `present.*` outputs become float16,
//! which halves the bytes a decode step streams at a long context and the pool's memory per position. The kernel
//! rounds each new key and value to float16 once, as it appends them, and computes in float32.
//!
//! Only the dense families (Llama, Qwen2, Qwen3) are rewritten here; DeepSeek-V3's MLA has its own rewrite
//! ([`super::fused_latent`], r1's `LatentAttention`), which reuses the row lengths and graph helpers below.
use std::collections::{HashMap, HashSet};

use r1_calibration::external::ExternalDataReader;
use r1_calibration::matmul_nbits::MS_DOMAIN;
use r1_engine::manifest::names;
use r1_proto::onnx::{type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto};

use super::{attr_f, attr_i, i64_tensor, inline_tensor, rewrite_node as node, ElemType};
use crate::error::{ExportError, Result};

/// Prefix of every node and tensor this rewrite adds.
const PREFIX: &str = "/fused_attention";
/// The portable graph's rotary inputs (see `arch::common::Ctx::rotary`).
const ROTARY_FREQS: &str = "/model/rotary_emb/freqs/Mul";
/// Present only when the rotary tables are scaled (`Ctx::rotary` with `scale != 1`), which the fused form lacks.
const ROTARY_SCALE: &str = "/model/rotary_emb/Cos/Scale";

/// The attention shape of a dense decoder, from the artifact's manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head size (rotary covers all of it in the dense families).
    pub head_dim: usize,
    /// Rows of the cos/sin tables: the longest position the artifact serves.
    pub max_positions: usize,
}

fn graph_err(message: String) -> ExportError {
    ExportError::Graph(format!("fused attention: {message}"))
}

/// Whether `model` already holds this rewrite's nodes.
pub fn has_fused_attention(model: &ModelProto) -> bool {
    model
        .graph
        .as_ref()
        .is_some_and(|g| g.node.iter().any(|n| n.name.as_deref().is_some_and(|s| s.starts_with(PREFIX))))
}

/// The float32 values of initializer `name`, when the graph has one of that name and type.
pub(super) fn f32_initializer(g: &GraphProto, name: &str, data: &ExternalDataReader) -> Option<Vec<f32>> {
    let t = g.initializer.iter().find(|t| t.name.as_deref() == Some(name))?;
    data.tensor_f32(t).ok()
}

/// The cos and sin tables `[max_positions, inv_freq.len()]`, angle `position × inv_freq` rounded to float32 as
/// the portable graph computes it, cos/sin evaluated in float64 and stored as `dtype`.
fn rotary_tables(inv_freq: &[f32], max_positions: usize, dtype: ElemType) -> Result<(Vec<u8>, Vec<u8>)> {
    let mut cos = Vec::with_capacity(max_positions * inv_freq.len());
    let mut sin = Vec::with_capacity(max_positions * inv_freq.len());
    for p in 0..max_positions {
        for f in inv_freq {
            let angle = f64::from(p as f32 * f);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((dtype.encode_f32(&cos)?, dtype.encode_f32(&sin)?))
}

/// The domain of the attention node for a graph of activation type `dtype`: r1's own kernel for float32
/// ([`r1_engine::backend::attention`]: each cached key and value read once per step, not once per query head),
/// ONNX Runtime's `com.microsoft` one for float16 (r1's kernel is float32 only). Both take the same inputs and
/// attributes.
pub fn attention_domain(dtype: ElemType) -> &'static str {
    if dtype == ElemType::F32 {
        r1_engine::backend::attention::DOMAIN
    } else {
        MS_DOMAIN
    }
}

/// ONNX Runtime's CPU `GroupQueryAttention` takes head sizes that are a multiple of this only.
pub const HEAD_DIM_MULTIPLE: usize = 16;

/// Rewrites `model` in place (see the module docs) and returns the number of layers fused. `dtype` is the graph's
/// activation type (float32 or float16), `cache` the element type the fused graph's caches take (`dtype`, or
/// float16 under float32 activations: r1's kernel only); `data` reads the graph's initializers (the rotary
/// `inv_freq`). Returns 0 and leaves the graph as it is when it was rewritten before or when the kernel cannot take
/// the graph (a head size that is not a multiple of [`HEAD_DIM_MULTIPLE`], or scaled cos/sin tables: the portable
/// attention stays, which is correct, only slower). Errors name the node or tensor of the portable graph that is
/// missing, or the cache type the kernel cannot take.
pub fn fuse_attention(
    model: &mut ModelProto,
    shape: &AttentionShape,
    dtype: ElemType,
    cache: ElemType,
    data: &ExternalDataReader,
) -> Result<usize> {
    if cache != dtype && !(dtype == ElemType::F32 && cache == ElemType::F16) {
        return Err(graph_err(format!(
            "a {cache:?} cache under {dtype:?} activations: only float32 graphs take another cache type (float16, \
             r1's kernel)"
        )));
    }
    if has_fused_attention(model) || !shape.head_dim.is_multiple_of(HEAD_DIM_MULTIPLE) {
        return Ok(0);
    }
    let (nh, nkv, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    if nkv == 0 || !nh.is_multiple_of(nkv) || !d.is_multiple_of(2) {
        return Err(graph_err(format!("{nh} heads over {nkv} kv heads of size {d} cannot be grouped")));
    }
    let g = model.graph.as_mut().ok_or_else(|| graph_err("the model has no graph".into()))?;
    for input in ["attention_mask", "position_ids"] {
        if !g.input.iter().any(|i| i.name.as_deref() == Some(input)) {
            return Err(graph_err(format!("the graph has no `{input}` input")));
        }
    }
    let Some(plan) = plan_fusion(g, shape, data)? else { return Ok(0) };
    add_shared_initializers(g, shape, dtype, &plan.inv_freq)?;
    let mut new_nodes = shared_nodes();
    let mut replaced: HashSet<String> = HashSet::new();
    for (i, l) in plan.layers.iter().enumerate() {
        replaced.extend(fuse_layer(g, shape, attention_domain(dtype), i, l, &mut new_nodes)?);
    }
    // The old producers of the replaced tensors go; what only fed them goes with them.
    g.node.retain(|n| !n.output.iter().any(|o| replaced.contains(o)));
    g.node.extend(new_nodes);
    topological_sort(g)?;
    remove_dead_nodes(g);
    if cache != dtype {
        retype_cache(g, shape.num_layers, cache);
    }
    let domain = attention_domain(dtype);
    if !model.opset_import.iter().any(|o| o.domain.as_deref() == Some(domain)) {
        model.opset_import.push(OperatorSetIdProto { domain: Some(domain.into()), version: Some(1) });
    }
    Ok(plan.layers.len())
}

/// Declares every layer's `past_key_values.*` input and `present.*` output (and any value info of them) as `cache`.
fn retype_cache(g: &mut GraphProto, layers: usize, cache: ElemType) {
    let names: HashSet<String> = (0..layers)
        .flat_map(|i| [names::past_key(i), names::past_value(i), names::present_key(i), names::present_value(i)])
        .collect();
    for v in g.input.iter_mut().chain(g.output.iter_mut()).chain(g.value_info.iter_mut()) {
        if !v.name.as_ref().is_some_and(|n| names.contains(n)) {
            continue;
        }
        if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
            t.elem_type = Some(cache.onnx_code());
        }
    }
}

/// `s` under this rewrite's [`PREFIX`] (the latent rewrite's row lengths are these nodes too).
pub(super) fn t(s: &str) -> String {
    format!("{PREFIX}/{s}")
}

/// The portable graph's nodes by name.
pub(super) struct NodeIndex<'g> {
    g: &'g GraphProto,
    by_name: HashMap<String, usize>,
}

impl<'g> NodeIndex<'g> {
    /// Indexes `g`'s nodes by name.
    pub(super) fn new(g: &'g GraphProto) -> Self {
        let by_name = g.node.iter().enumerate().filter_map(|(i, n)| n.name.clone().map(|s| (s, i))).collect();
        NodeIndex { g, by_name }
    }

    /// The node named `name`, or an error naming it.
    pub(super) fn find(&self, name: &str) -> Result<&'g NodeProto> {
        self.by_name
            .get(name)
            .map(|&i| &self.g.node[i])
            .ok_or_else(|| graph_err(format!("the graph has no node `{name}`")))
    }

    /// The first input of node `name`.
    pub(super) fn first_input(&self, name: &str) -> Result<String> {
        self.find(name)?.input.first().cloned().ok_or_else(|| graph_err(format!("node `{name}` has no input")))
    }
}

/// One layer's tensors in the portable graph.
struct Layer {
    q: String,
    k: String,
    v: String,
    /// The merged attention output, which the fused node produces instead.
    out: String,
}

/// What the rewrite reads from the portable graph.
struct Plan {
    /// The rotary angles' inverse frequencies.
    inv_freq: Vec<f32>,
    layers: Vec<Layer>,
}

/// Looks up the rotary `inv_freq`, the mask's condition and every layer's tensors before anything changes;
/// `None` when the cos/sin tables are scaled.
fn plan_fusion(g: &GraphProto, shape: &AttentionShape, data: &ExternalDataReader) -> Result<Option<Plan>> {
    let d = shape.head_dim;
    let ix = NodeIndex::new(g);
    // The rotary angles' inverse frequencies: `freqs = positions × inv_freq`.
    if ix.by_name.contains_key(ROTARY_SCALE) {
        // Scaled cos/sin tables (yarn's mscale): the kernel has no such factor, so the portable attention stays.
        return Ok(None);
    }
    let freqs = ix.find(ROTARY_FREQS)?;
    let inv_freq = freqs
        .input
        .iter()
        .find_map(|i| f32_initializer(g, i, data))
        .ok_or_else(|| graph_err(format!("`{ROTARY_FREQS}` reads no float32 inv_freq initializer")))?;
    if inv_freq.len() * 2 != d {
        return Err(graph_err(format!(
            "rotary covers {} of head_dim {d}; only full-width rotary is fused",
            inv_freq.len() * 2
        )));
    }
    let layers = (0..shape.num_layers).map(|i| layer_tensors(&ix, i)).collect::<Result<Vec<_>>>()?;
    Ok(Some(Plan { inv_freq, layers }))
}

/// Layer `i`'s q/k/v heads and merged attention output.
fn layer_tensors(ix: &NodeIndex, i: usize) -> Result<Layer> {
    let a = format!("/model/layers.{i}/self_attn");
    Ok(Layer {
        // The heads in `[batch, sequence, heads, head_dim]` (after Qwen3's per-head norms), before the transpose.
        q: ix.first_input(&format!("{a}/q_heads/Transpose"))?,
        k: ix.first_input(&format!("{a}/k_heads/Transpose"))?,
        v: ix.first_input(&format!("{a}/v_heads/Transpose"))?,
        out: ix
            .find(&format!("{a}/attn/merge_heads/Reshape"))?
            .output
            .first()
            .cloned()
            .ok_or_else(|| graph_err(format!("`{a}/attn/merge_heads/Reshape` has no output")))?,
    })
}

/// Adds the initializers all layers share: the cos/sin caches, the mask's fill values and the index constants.
fn add_shared_initializers(
    g: &mut GraphProto,
    shape: &AttentionShape,
    dtype: ElemType,
    inv_freq: &[f32],
) -> Result<()> {
    let (cos, sin) = rotary_tables(inv_freq, shape.max_positions, dtype)?;
    let half = (shape.head_dim / 2) as i64;
    g.initializer.extend([
        inline_tensor(&t("cos_cache"), dtype, &[shape.max_positions as i64, half], cos),
        inline_tensor(&t("sin_cache"), dtype, &[shape.max_positions as i64, half], sin),
        i64_tensor(&t("heads_3d"), &[3], &[0, 0, -1]),
    ]);
    g.initializer.extend(row_length_constants());
    Ok(())
}

/// The constants [`shared_nodes`] reads.
pub(super) fn row_length_constants() -> [TensorProto; 2] {
    [i64_tensor(&t("one"), &[], &[1]), i64_tensor(&t("axis1"), &[1], &[1])]
}

/// The nodes all layers share: the `total` length (the mask's width) and each row's `seqlens` (its ones − 1), int32.
pub(super) fn shared_nodes() -> Vec<NodeProto> {
    vec![
        node(&t("total/Shape"), "Shape", &["attention_mask"], &[&t("mask_shape")]),
        NodeProto {
            attribute: vec![attr_i("axis", 0)],
            ..node(&t("total/Gather"), "Gather", &[&t("mask_shape"), &t("one")], &[&t("total64")])
        },
        NodeProto {
            attribute: vec![attr_i("to", ElemType::I32.onnx_code() as i64)],
            ..node(&t("total/Cast"), "Cast", &[&t("total64")], &[&t("total")])
        },
        // Each row's length is its number of ones: its cached positions plus the ones it feeds.
        NodeProto {
            attribute: vec![attr_i("keepdims", 0)],
            ..node(&t("seqlens/ReduceSum"), "ReduceSum", &["attention_mask", &t("axis1")], &[&t("fed64")])
        },
        node(&t("seqlens/Sub"), "Sub", &[&t("fed64"), &t("one")], &[&t("seqlens64")]),
        NodeProto {
            attribute: vec![attr_i("to", ElemType::I32.onnx_code() as i64)],
            ..node(&t("seqlens/Cast"), "Cast", &[&t("seqlens64")], &[&t("seqlens")])
        },
    ]
}

/// Appends layer `i`'s q/k/v reshapes and its `GroupQueryAttention` to `new_nodes`; returns the tensors the fused
/// node produces in place of the portable graph's (the attention output and the layer's present key and value).
fn fuse_layer(
    g: &GraphProto,
    shape: &AttentionShape,
    domain: &str,
    i: usize,
    l: &Layer,
    new_nodes: &mut Vec<NodeProto>,
) -> Result<[String; 3]> {
    let (nh, nkv, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
    let p = format!("{PREFIX}/layers.{i}");
    let mut in3 = Vec::new();
    for (name, x) in [("q", &l.q), ("k", &l.k), ("v", &l.v)] {
        let out = format!("{p}/{name}_3d");
        new_nodes.push(node(&format!("{p}/{name}/Reshape"), "Reshape", &[x, &t("heads_3d")], &[&out]));
        in3.push(out);
    }
    let (pk, pv) = (names::past_key(i), names::past_value(i));
    let (ok, ov) = (names::present_key(i), names::present_value(i));
    for io in [&pk, &pv] {
        if !g.input.iter().any(|x| x.name.as_ref() == Some(io)) {
            return Err(graph_err(format!("the graph has no `{io}` input")));
        }
    }
    new_nodes.push(NodeProto {
        domain: Some(domain.into()),
        attribute: vec![
            attr_i("num_heads", nh as i64),
            attr_i("kv_num_heads", nkv as i64),
            attr_i("do_rotary", 1),
            attr_i("rotary_interleaved", 0),
            attr_f("scale", 1.0 / (d as f32).sqrt()),
        ],
        ..node(
            &format!("{p}/GroupQueryAttention"),
            "GroupQueryAttention",
            &[
                &in3[0],
                &in3[1],
                &in3[2],
                &pk,
                &pv,
                &t("seqlens"),
                &t("total"),
                &t("cos_cache"),
                &t("sin_cache"),
                "position_ids",
            ],
            &[&l.out, &ok, &ov],
        )
    });
    Ok([l.out.clone(), ok, ov])
}

/// Orders `g.node` so every node comes after the producers of its inputs (stable: nodes already in order keep
/// their relative order). Fails naming a tensor nothing produces.
pub(super) fn topological_sort(g: &mut GraphProto) -> Result<()> {
    let mut known: HashSet<String> = g.input.iter().filter_map(|i| i.name.clone()).collect();
    known.extend(g.initializer.iter().filter_map(|t| t.name.clone()));
    known.insert(String::new());
    let mut pending = std::mem::take(&mut g.node);
    let mut sorted = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let before = pending.len();
        let mut rest = Vec::new();
        for n in pending {
            if n.input.iter().all(|i| known.contains(i)) {
                known.extend(n.output.iter().cloned());
                sorted.push(n);
            } else {
                rest.push(n);
            }
        }
        if rest.len() == before {
            let missing = rest[0].input.iter().find(|i| !known.contains(*i)).cloned().unwrap_or_default();
            return Err(graph_err(format!(
                "node `{}` reads `{missing}`, which nothing produces",
                rest[0].name.as_deref().unwrap_or("?")
            )));
        }
        pending = rest;
    }
    g.node = sorted;
    Ok(())
}

/// Drops nodes none of whose outputs is read (by a later node or as a graph output), and then initializers
/// nothing reads. `g.node` must be topologically sorted. (Also the sparse-experts rewrite's last pass.)
pub(super) fn remove_dead_nodes(g: &mut GraphProto) {
    let mut live: HashSet<String> = g.output.iter().filter_map(|o| o.name.clone()).collect();
    let mut keep = vec![false; g.node.len()];
    for (i, n) in g.node.iter().enumerate().rev() {
        if n.output.iter().any(|o| live.contains(o)) {
            keep[i] = true;
            live.extend(n.input.iter().cloned());
        }
    }
    let mut it = keep.into_iter();
    g.node.retain(|_| it.next().unwrap_or(false));
    g.initializer.retain(|t| t.name.as_ref().is_some_and(|n| live.contains(n)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_tables_hold_position_times_inv_freq() {
        let (cos, sin) = rotary_tables(&[1.0, 0.5], 3, ElemType::F32).unwrap();
        let cos: Vec<f32> = bytemuck::cast_slice(&cos).to_vec();
        let sin: Vec<f32> = bytemuck::cast_slice(&sin).to_vec();
        assert_eq!(cos.len(), 6);
        for p in 0..3 {
            for (j, f) in [1.0f32, 0.5].iter().enumerate() {
                assert!((cos[p * 2 + j] - (p as f32 * f).cos()).abs() < 1e-7);
                assert!((sin[p * 2 + j] - (p as f32 * f).sin()).abs() < 1e-7);
            }
        }
    }

    fn reader() -> ExternalDataReader {
        ExternalDataReader::new(std::env::temp_dir())
    }

    fn graph_with_inputs(inputs: &[&str]) -> ModelProto {
        let value = |n: &str| r1_proto::onnx::ValueInfoProto { name: Some(n.into()), ..Default::default() };
        ModelProto {
            graph: Some(GraphProto { input: inputs.iter().map(|n| value(n)).collect(), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn an_unfusable_head_size_is_left_alone_and_a_missing_piece_is_named() {
        let shape = AttentionShape { num_layers: 1, num_heads: 4, num_kv_heads: 2, head_dim: 8, max_positions: 16 };
        let mut m = graph_with_inputs(&["attention_mask", "position_ids"]);
        let before = m.clone();
        assert_eq!(fuse_attention(&mut m, &shape, ElemType::F32, ElemType::F32, &reader()).unwrap(), 0);
        assert_eq!(m, before, "head_dim 8 is not a multiple of {HEAD_DIM_MULTIPLE}: nothing changes");
        let shape = AttentionShape { head_dim: 32, ..shape };
        let err = fuse_attention(&mut m, &shape, ElemType::F32, ElemType::F32, &reader()).unwrap_err().to_string();
        assert!(err.contains(ROTARY_FREQS), "{err}");
        let mut scaled = graph_with_inputs(&["attention_mask", "position_ids"]);
        scaled.graph.as_mut().unwrap().node.push(node(ROTARY_SCALE, "Mul", &["c", "s"], &["cs"]));
        let before = scaled.clone();
        assert_eq!(
            fuse_attention(&mut scaled, &shape, ElemType::F32, ElemType::F32, &reader()).unwrap(),
            0,
            "scaled cos/sin tables are not fused"
        );
        assert_eq!(scaled, before);
        let mut m = graph_with_inputs(&["attention_mask"]);
        let err = fuse_attention(&mut m, &shape, ElemType::F32, ElemType::F32, &reader()).unwrap_err().to_string();
        assert!(err.contains("no `position_ids` input"), "{err}");
        let bad = AttentionShape { num_kv_heads: 3, ..shape };
        let err = fuse_attention(&mut m, &bad, ElemType::F32, ElemType::F32, &reader()).unwrap_err().to_string();
        assert!(err.contains("4 heads over 3 kv heads"), "{err}");
        let err = fuse_attention(&mut m, &shape, ElemType::F16, ElemType::F32, &reader()).unwrap_err().to_string();
        assert!(err.contains("F32 cache under F16 activations"), "{err}");
    }

    #[test]
    fn sort_and_dead_node_removal() {
        let mut g = GraphProto {
            node: vec![
                node("b", "Neg", &["a1"], &["b1"]),
                node("a", "Neg", &["x"], &["a1"]),
                node("dead", "Neg", &["x"], &["d1"]),
            ],
            input: vec![r1_proto::onnx::ValueInfoProto { name: Some("x".into()), ..Default::default() }],
            output: vec![r1_proto::onnx::ValueInfoProto { name: Some("b1".into()), ..Default::default() }],
            initializer: vec![i64_tensor("unused", &[], &[1])],
            ..Default::default()
        };
        topological_sort(&mut g).unwrap();
        remove_dead_nodes(&mut g);
        let names: Vec<&str> = g.node.iter().map(|n| n.name.as_deref().unwrap()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(g.initializer.is_empty());
        g.node.push(node("c", "Neg", &["nowhere"], &["c1"]));
        let err = topological_sort(&mut g).unwrap_err().to_string();
        assert!(err.contains("`c` reads `nowhere`"), "{err}");
    }
}
