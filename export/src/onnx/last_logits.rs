//! Serving-graph rewrite: the LM head runs on each row's last fed position only.
//!
//! The portable graph returns `logits [batch, sequence, vocab]` for every position (the golden files and the
//! calibration report compare all of them). A server only samples from the last position of each sequence, and
//! during a prefill the LM head is the largest MatMul of the step (vocabulary × hidden per position: 15% of the
//! 1.5B shape's MACs per token) and its output the largest tensor (16 prompts × 16 tokens × 151,936 × 4 bytes =
//! 156 MB). This rewrite gathers, before the LM head, the hidden state of each row's last real position, so the
//! graph returns `logits [batch, 1, vocab]`.
//!
//! Which position is last is read from the graph's own `attention_mask`: the engine lays a step out with each row's
//! new tokens first and padding after them, so the last fed position of a row is the number of ones in the mask's
//! last `sequence` columns, minus one. No input is added, so every caller of the graph feeds it as before; only
//! the meaning of the `logits` output changes, which the artifact records (`targets.cpu.last_position_logits`)
//! and the engine reads.
//!
//! Where the head's input is quantized (`--quantize-lm-head all`: `QuantizeLinear → DequantizeLinear → MatMul`)
//! the gather goes before the `QuantizeLinear`, so ONNX Runtime still fuses the integer GEMM.
use r1_proto::onnx::type_proto::Value as TypeValue;
use r1_proto::onnx::{tensor_shape_proto, GraphProto, ModelProto, NodeProto};

use super::{attr_i, i64_tensor, rewrite_node};
use crate::error::{ExportError, Result};

/// Prefix of every node and tensor this rewrite adds.
const PREFIX: &str = "/last_position_logits";

fn op(n: &NodeProto) -> &str {
    n.op_type.as_deref().unwrap_or_default()
}

fn producer<'a>(g: &'a GraphProto, tensor: &str) -> Option<(usize, &'a NodeProto)> {
    g.node.iter().enumerate().find(|(_, n)| n.output.iter().any(|o| o == tensor))
}

fn graph_err(message: String) -> ExportError {
    ExportError::Graph(format!("last-position logits: {message}"))
}

fn node(name: &str, op_type: &str, inputs: &[&str], output: &str) -> NodeProto {
    rewrite_node(&format!("{PREFIX}/{name}"), op_type, inputs, &[output])
}

/// Whether `model`'s `logits` output is already declared `[batch, 1, vocab]` by this rewrite.
pub fn has_last_position_logits(model: &ModelProto) -> bool {
    model
        .graph
        .as_ref()
        .is_some_and(|g| g.node.iter().any(|n| n.name.as_deref().is_some_and(|s| s.starts_with(PREFIX))))
}

/// Rewrites `model` in place (see the module docs). `hidden` is the LM head's input width. A graph rewritten
/// before is left as it is. Errors name what the graph lacks (no `logits` output, no `input_ids` /
/// `attention_mask` input, a `logits` not computed by a MatMul).
pub fn gather_last_position_logits(model: &mut ModelProto, hidden: usize) -> Result<()> {
    if has_last_position_logits(model) {
        return Ok(());
    }
    let g = model.graph.as_mut().ok_or_else(|| graph_err("the model has no graph".into()))?;
    for input in ["input_ids", "attention_mask"] {
        if !g.input.iter().any(|i| i.name.as_deref() == Some(input)) {
            return Err(graph_err(format!("the graph has no `{input}` input")));
        }
    }
    if !g.output.iter().any(|o| o.name.as_deref() == Some("logits")) {
        return Err(graph_err("the graph has no `logits` output".into()));
    }
    // logits <- [Cast <-] MatMul | MatMulNBits (A, ...)
    let (mut head, mut head_node) =
        producer(g, "logits").ok_or_else(|| graph_err("no node computes `logits`".into()))?;
    if op(head_node) == "Cast" {
        let a = head_node.input.first().cloned().unwrap_or_default();
        (head, head_node) = producer(g, &a).ok_or_else(|| graph_err(format!("no node computes `{a}`")))?;
    }
    if !matches!(op(head_node), "MatMul" | "MatMulNBits") {
        return Err(graph_err(format!("`logits` comes from a {} node, not the LM head's MatMul", op(head_node))));
    }
    // The node whose input 0 is the head's float input: the MatMul itself, or the QuantizeLinear before its DQ.
    let mut target = head;
    let a = g.node[head].input.first().cloned().unwrap_or_default();
    if let Some((dq, dq_node)) = producer(g, &a).filter(|(_, n)| op(n) == "DequantizeLinear") {
        let q_out = dq_node.input.first().cloned().unwrap_or_default();
        match producer(g, &q_out) {
            Some((q, q_node)) if op(q_node) == "QuantizeLinear" => target = q,
            _ => {
                return Err(graph_err(format!(
                    "the LM head's input `{a}` is dequantized from `{q_out}`, not quantized in the graph (node {dq})"
                )))
            }
        }
    }
    let hidden_in = g.node[target].input[0].clone();
    let t = |s: &str| format!("{PREFIX}/{s}");
    g.initializer.extend([
        i64_tensor(&t("one"), &[1], &[1]),
        i64_tensor(&t("zero"), &[], &[0]),
        i64_tensor(&t("end"), &[1], &[i64::MAX]),
        i64_tensor(&t("axis1"), &[1], &[1]),
        i64_tensor(&t("axis2"), &[1], &[2]),
        i64_tensor(&t("gather_shape"), &[3], &[1, 1, hidden as i64]),
    ]);
    let gathered = t("hidden");
    let new_nodes = vec![
        node("Shape", "Shape", &["input_ids"], &t("ids_shape")),
        node("SeqLen", "Gather", &[&t("ids_shape"), &t("one")], &t("seq_len")),
        node("NegSeqLen", "Neg", &[&t("seq_len")], &t("neg_seq_len")),
        // The mask's last `sequence` columns: 1 for each token fed to this step.
        node("NewMask", "Slice", &["attention_mask", &t("neg_seq_len"), &t("end"), &t("axis1")], &t("new_mask")),
        node("Fed", "ReduceSum", &[&t("new_mask"), &t("axis1")], &t("fed")),
        node("LastIndex", "Sub", &[&t("fed"), &t("one")], &t("last_raw")),
        node("NotNegative", "Max", &[&t("last_raw"), &t("zero")], &t("last")),
        node("Unsqueeze", "Unsqueeze", &[&t("last"), &t("axis2")], &t("last3")),
        node("Expand", "Expand", &[&t("last3"), &t("gather_shape")], &t("index")),
        NodeProto {
            attribute: vec![attr_i("axis", 1)],
            ..node("GatherElements", "GatherElements", &[&hidden_in, &t("index")], &gathered)
        },
    ];
    g.node[target].input[0] = gathered;
    // Keep the graph topologically sorted: the new nodes go right before the node that reads their output.
    let tail = g.node.split_off(target);
    g.node.extend(new_nodes);
    g.node.extend(tail);
    // The declared output shape: [batch, 1, vocab].
    let logits = g.output.iter_mut().find(|o| o.name.as_deref() == Some("logits")).expect("checked above");
    if let Some(TypeValue::TensorType(tt)) = logits.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        if let Some(dim) = tt.shape.as_mut().and_then(|s| s.dim.get_mut(1)) {
            dim.value = Some(tensor_shape_proto::dimension::Value::DimValue(1));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use r1_proto::onnx::{TypeProto, ValueInfoProto};

    fn value(name: &str) -> ValueInfoProto {
        ValueInfoProto { name: Some(name.into()), r#type: Some(TypeProto::default()), ..Default::default() }
    }

    /// input_ids, attention_mask, h → [QuantizeLinear → DequantizeLinear →] MatMul(h, W) → logits.
    fn head(inputs: &[&str], quantized: bool) -> ModelProto {
        let mut nodes = Vec::new();
        let mut a = "h".to_string();
        if quantized {
            nodes.push(NodeProto {
                op_type: Some("QuantizeLinear".into()),
                input: vec!["h".into(), "s".into()],
                output: vec!["hq".into()],
                ..Default::default()
            });
            nodes.push(NodeProto {
                op_type: Some("DequantizeLinear".into()),
                input: vec!["hq".into(), "s".into()],
                output: vec!["hdq".into()],
                ..Default::default()
            });
            a = "hdq".into();
        }
        nodes.push(NodeProto {
            name: Some("/lm_head/MatMul".into()),
            op_type: Some("MatMul".into()),
            input: vec![a, "W".into()],
            output: vec!["logits".into()],
            ..Default::default()
        });
        ModelProto {
            graph: Some(GraphProto {
                node: nodes,
                input: inputs.iter().map(|n| value(n)).collect(),
                output: vec![value("logits")],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn node_named<'a>(m: &'a ModelProto, op_type: &str) -> &'a NodeProto {
        m.graph.as_ref().unwrap().node.iter().find(|n| op(n) == op_type).unwrap()
    }

    #[test]
    fn gathers_before_the_head_in_order_and_only_once() {
        let mut m = head(&["input_ids", "attention_mask", "h"], false);
        gather_last_position_logits(&mut m, 8).unwrap();
        let g = m.graph.as_ref().unwrap();
        let ops: Vec<&str> = g.node.iter().map(op).collect();
        assert_eq!(ops.last(), Some(&"MatMul"));
        assert_eq!(node_named(&m, "MatMul").input[0], format!("{PREFIX}/hidden"));
        assert_eq!(node_named(&m, "GatherElements").input[0], "h");
        assert_eq!(node_named(&m, "Slice").input[0], "attention_mask");
        // every input of every node is produced earlier (or is a graph input / initializer)
        let mut known: Vec<String> = g.input.iter().filter_map(|i| i.name.clone()).collect();
        known.extend(g.initializer.iter().filter_map(|t| t.name.clone()));
        known.push("W".into());
        for n in &g.node {
            for i in &n.input {
                assert!(known.contains(i), "{i} read before it is made");
            }
            known.extend(n.output.iter().cloned());
        }
        let before = m.clone();
        gather_last_position_logits(&mut m, 8).unwrap();
        assert_eq!(m, before, "a rewritten graph is left as it is");
        assert!(has_last_position_logits(&m));
    }

    #[test]
    fn a_quantized_head_input_is_gathered_before_its_quantize() {
        let mut m = head(&["input_ids", "attention_mask", "h"], true);
        gather_last_position_logits(&mut m, 8).unwrap();
        assert_eq!(node_named(&m, "QuantizeLinear").input[0], format!("{PREFIX}/hidden"));
        assert_eq!(node_named(&m, "MatMul").input[0], "hdq", "DequantizeLinear → MatMul stays fusable");
    }

    #[test]
    fn missing_pieces_are_named() {
        let e = gather_last_position_logits(&mut head(&["input_ids", "h"], false), 8).unwrap_err().to_string();
        assert!(e.contains("`attention_mask`"), "{e}");
        let mut m = head(&["input_ids", "attention_mask", "h"], false);
        m.graph.as_mut().unwrap().node[0].op_type = Some("Gemm".into());
        let e = gather_last_position_logits(&mut m, 8).unwrap_err().to_string();
        assert!(e.contains("Gemm") && e.contains("LM head"), "{e}");
    }
}
