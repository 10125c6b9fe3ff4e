//! Serving-graph rewrite for ONNX Runtime on CPU, DeepseekV3: each layer's absorbed multi-head latent attention
//! (`arch/deepseek_v3/mla.rs`) over the compressed cache becomes one `r1.LatentAttention` node
//! ([`r1_engine::backend::attention::latent`]), which appends the step's latent and rope key into the cache in place
//! and attends over each row's valid positions only.
//!
//! The portable graph per layer: the cache `Concat`s (`present.{i}.key = concat(past, c)`, `present.{i}.value =
//! concat(past, k_rot)`), two transposes, the latent and rope score `MatMul`s and their `Add`, the softmax scale, the
//! additive mask, `Softmax`, and the context `MatMul` over the latent. The fused node takes the absorbed query
//! (`q_absorb/MatMul`'s output), the rotated `q_rot`, the step's latent and rotated rope key (the `Concat`s' second
//! inputs), the layer's past and the row lengths, and produces the context `[B, H, S, rank]` and both presents; `W_uv`,
//! the head merge and `o_proj` after it are unchanged, and so is everything before (projections, norms, rotary with
//! the graph's own — yarn-scaled — tables). The softmax scale is read from the graph's `scores/Scale` constant, so it
//! is exactly the one `mla.rs` wrote (yarn's mscale included).
//!
//! What it changes, as [`super::fused_attention`] does for the dense families: **the cache layout.** Each row's length
//! is `Σ attention_mask` (`seqlens_k = Σ mask − 1`, the same nodes as the dense rewrite), its past holds its positions
//! first (right-padded) and the additive mask is gone, so the engine binds its KV pool as both past and present
//! (`targets.cpu.kv_in_place`) and nothing is copied per step. The same limit as there: rows that feed more than one
//! token after a past step one at a time (`targets.cpu.fused_attention`, `Backend::batches_chunks_with_past`).
//!
//! Float32 graphs with float32 caches only (the kernel's arithmetic and cache type); other graphs are left as they are
//! (the portable attention, host path). The MTP draft graph (`mtp.onnx`) is not rewritten: the draft runs on host
//! caches beside the engine.
use std::collections::HashSet;

use r1_calibration::external::ExternalDataReader;
use r1_engine::backend::attention::{latent, DOMAIN};
use r1_engine::manifest::names;
use r1_proto::onnx::{ModelProto, NodeProto, OperatorSetIdProto};

use super::fused_attention::{self as fa, NodeIndex};
use super::{attr_f, attr_i, rewrite_node as node, ElemType};
use crate::error::{ExportError, Result};

/// Prefix of every node this rewrite adds (besides the shared row lengths, [`fa::shared_nodes`]).
const PREFIX: &str = "/fused_latent";

/// The MLA shape of a DeepseekV3 artifact, from its manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentShape {
    /// Decoder layers (the cache's layers).
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// The latent's width (`kv_lora_rank`): the cache's key size.
    pub kv_lora_rank: usize,
    /// The rope key's width (`qk_rope_head_dim`): the cache's value size.
    pub qk_rope_head_dim: usize,
}

fn graph_err(message: String) -> ExportError {
    ExportError::Graph(format!("fused latent attention: {message}"))
}

/// Whether `model` already holds this rewrite's nodes.
pub fn has_fused_latent(model: &ModelProto) -> bool {
    model
        .graph
        .as_ref()
        .is_some_and(|g| g.node.iter().any(|n| n.name.as_deref().is_some_and(|s| s.starts_with(PREFIX))))
}

/// One layer's tensors in the portable graph.
struct Layer {
    q_latent: String,
    q_rope: String,
    latent: String,
    rope_key: String,
    scale: f32,
    /// The context over the latent, which the fused node produces instead.
    out: String,
}

/// Rewrites `model` in place (see the module docs) and returns the number of layers fused. `dtype` is the graph's
/// activation type, `cache` the cache type asked for; `data` reads the graph's initializers (the softmax scale).
/// Returns 0 and leaves the graph as it is when it was rewritten before or is not a float32 graph. Errors name the
/// node or tensor of the portable graph that is missing or not what `mla.rs` writes, or the cache type the kernel
/// cannot take.
pub fn fuse_latent_attention(
    model: &mut ModelProto,
    shape: &LatentShape,
    dtype: ElemType,
    cache: ElemType,
    data: &ExternalDataReader,
) -> Result<usize> {
    if dtype != ElemType::F32 || has_fused_latent(model) {
        return Ok(0);
    }
    if cache != ElemType::F32 {
        return Err(graph_err(format!(
            "a {cache:?} cache: r1.{} takes float32 caches only (use --kv-cache-dtype auto)",
            latent::OP_TYPE
        )));
    }
    if shape.num_heads == 0 || shape.kv_lora_rank == 0 || shape.qk_rope_head_dim == 0 {
        return Err(graph_err(format!("the shape {shape:?} has an empty dimension")));
    }
    let g = model.graph.as_mut().ok_or_else(|| graph_err("the model has no graph".into()))?;
    if !g.input.iter().any(|i| i.name.as_deref() == Some(names::ATTENTION_MASK)) {
        return Err(graph_err(format!("the graph has no `{}` input", names::ATTENTION_MASK)));
    }
    let layers = {
        let ix = NodeIndex::new(g);
        (0..shape.num_layers).map(|i| layer_tensors(&ix, g, i, data)).collect::<Result<Vec<_>>>()?
    };
    g.initializer.extend(fa::row_length_constants());
    let mut new_nodes = fa::shared_nodes();
    let mut replaced: HashSet<String> = HashSet::new();
    for (i, l) in layers.iter().enumerate() {
        let (pk, pv) = (names::past_key(i), names::past_value(i));
        let (ok, ov) = (names::present_key(i), names::present_value(i));
        new_nodes.push(NodeProto {
            domain: Some(DOMAIN.into()),
            attribute: vec![attr_i("num_heads", shape.num_heads as i64), attr_f("scale", l.scale)],
            ..node(
                &format!("{PREFIX}/layers.{i}/LatentAttention"),
                latent::OP_TYPE,
                &[&l.q_latent, &l.q_rope, &l.latent, &l.rope_key, &pk, &pv, &fa::t("seqlens"), &fa::t("total")],
                &[&l.out, &ok, &ov],
            )
        });
        replaced.extend([l.out.clone(), ok, ov]);
    }
    // The old producers of the replaced tensors go; what only fed them (scores, mask, softmax) goes with them.
    g.node.retain(|n| !n.output.iter().any(|o| replaced.contains(o)));
    g.node.extend(new_nodes);
    fa::topological_sort(g)?;
    fa::remove_dead_nodes(g);
    if !model.opset_import.iter().any(|o| o.domain.as_deref() == Some(DOMAIN)) {
        model.opset_import.push(OperatorSetIdProto { domain: Some(DOMAIN.into()), version: Some(1) });
    }
    Ok(layers.len())
}

/// Input `k` of node `name`, or an error naming it.
fn input_of(ix: &NodeIndex, name: &str, k: usize) -> Result<String> {
    ix.find(name)?.input.get(k).cloned().ok_or_else(|| graph_err(format!("node `{name}` has no input {k}")))
}

/// Layer `i`'s query, step cache entries, softmax scale and context in the portable graph (`mla.rs`'s node names).
fn layer_tensors(ix: &NodeIndex, g: &r1_proto::onnx::GraphProto, i: usize, data: &ExternalDataReader) -> Result<Layer> {
    let p = format!("/model/layers.{i}/self_attn");
    let output_of = |name: &str| -> Result<String> {
        ix.find(name)?.output.first().cloned().ok_or_else(|| graph_err(format!("node `{name}` has no output")))
    };
    // The caches are appended from the graph's own past inputs.
    for (node, past) in [("key_cache", names::past_key(i)), ("value_cache", names::past_value(i))] {
        let first = ix.first_input(&format!("{p}/{node}/Concat"))?;
        if first != past {
            return Err(graph_err(format!("`{p}/{node}/Concat` appends to `{first}`, not the past input `{past}`")));
        }
    }
    let scale_node = format!("{p}/scores/Scale");
    let scale_input = input_of(ix, &scale_node, 1)?;
    let scale = match fa::f32_initializer(g, &scale_input, data).as_deref() {
        Some(&[s]) if s.is_finite() && s > 0.0 => s,
        other => {
            return Err(graph_err(format!(
                "`{scale_node}` scales by `{scale_input}`, which is not one positive float32 constant ({other:?})"
            )))
        }
    };
    Ok(Layer {
        q_latent: output_of(&format!("{p}/q_absorb/MatMul"))?,
        q_rope: ix.first_input(&format!("{p}/scores_rope/MatMul"))?,
        latent: input_of(ix, &format!("{p}/key_cache/Concat"), 1)?,
        rope_key: input_of(ix, &format!("{p}/value_cache/Concat"), 1)?,
        scale,
        out: output_of(&format!("{p}/context_latent/MatMul"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use r1_proto::onnx::{GraphProto, ValueInfoProto};

    fn reader() -> ExternalDataReader {
        ExternalDataReader::new(std::env::temp_dir())
    }

    fn graph_with_inputs(inputs: &[&str]) -> ModelProto {
        let value = |n: &str| ValueInfoProto { name: Some(n.into()), ..Default::default() };
        ModelProto {
            graph: Some(GraphProto { input: inputs.iter().map(|n| value(n)).collect(), ..Default::default() }),
            ..Default::default()
        }
    }

    const SHAPE: LatentShape = LatentShape { num_layers: 1, num_heads: 4, kv_lora_rank: 16, qk_rope_head_dim: 8 };

    #[test]
    fn other_graphs_are_left_alone_and_missing_pieces_are_named() {
        let mut m = graph_with_inputs(&["attention_mask"]);
        let before = m.clone();
        assert_eq!(fuse_latent_attention(&mut m, &SHAPE, ElemType::F16, ElemType::F16, &reader()).unwrap(), 0);
        assert_eq!(m, before, "a float16 graph keeps its portable attention");
        let err = fuse_latent_attention(&mut m, &SHAPE, ElemType::F32, ElemType::F16, &reader()).unwrap_err();
        assert!(err.to_string().contains("F16 cache") && err.to_string().contains("float32 caches only"), "{err}");
        let err = fuse_latent_attention(&mut m, &SHAPE, ElemType::F32, ElemType::F32, &reader()).unwrap_err();
        assert!(err.to_string().contains("no node `/model/layers.0/self_attn/key_cache/Concat`"), "{err}");
        let mut no_mask = graph_with_inputs(&["input_ids"]);
        let err = fuse_latent_attention(&mut no_mask, &SHAPE, ElemType::F32, ElemType::F32, &reader()).unwrap_err();
        assert!(err.to_string().contains("no `attention_mask` input"), "{err}");
        let empty = LatentShape { kv_lora_rank: 0, ..SHAPE };
        let err = fuse_latent_attention(&mut m, &empty, ElemType::F32, ElemType::F32, &reader()).unwrap_err();
        assert!(err.to_string().contains("empty dimension"), "{err}");
    }

    #[test]
    fn a_cache_appended_to_something_else_is_refused_by_name() {
        let mut m = graph_with_inputs(&["attention_mask", "past_key_values.0.key"]);
        let g = m.graph.as_mut().unwrap();
        let p = "/model/layers.0/self_attn";
        g.node.push(node(&format!("{p}/key_cache/Concat"), "Concat", &["elsewhere", "c"], &["present.0.key"]));
        let err = fuse_latent_attention(&mut m, &SHAPE, ElemType::F32, ElemType::F32, &reader()).unwrap_err();
        assert!(
            err.to_string().contains("appends to `elsewhere`, not the past input `past_key_values.0.key`"),
            "{err}"
        );
    }
}
