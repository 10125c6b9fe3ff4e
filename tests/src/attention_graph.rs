//! One-purpose ONNX graphs of `GroupQueryAttention` nodes, for comparing r1's kernel (`r1.GroupQueryAttention`)
//! with ONNX Runtime's (`com.microsoft.GroupQueryAttention`): `tests/tests/attention_op.rs` and
//! `tests/examples/attention_kernels.rs`.
use prost::Message;
use r1_proto::onnx::{
    attribute_proto, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TypeProto,
    ValueInfoProto,
};

/// ONNX element types of the caches.
pub const FLOAT: i32 = 1;
pub const FLOAT16: i32 = 10;
const INT32: i32 = 6;
const INT64: i32 = 7;

fn value_info(name: &str, elem: i32) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: Some(elem), shape: None })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn attr(name: &str, i: Option<i64>, f: Option<f32>) -> AttributeProto {
    let t = if f.is_some() { attribute_proto::AttributeType::Float } else { attribute_proto::AttributeType::Int };
    AttributeProto { name: Some(name.into()), i, f, r#type: Some(t as i32), ..Default::default() }
}

/// A model of `layers` attention nodes of `domain` (`r1` or `com.microsoft`) over shared inputs `q`, `k`, `v`,
/// `seqlens_k`, `total`, `cos`, `sin`, `position_ids`, each with its own cache `past_key{l}` / `past_value{l}`,
/// producing `out{l}`, `present_key{l}`, `present_value{l}` (rotary on, non-interleaved, scale 1/√head_dim). The
/// caches are of ONNX element type `cache` ([`FLOAT`] or [`FLOAT16`]; activations are float32).
pub fn model(domain: &str, layers: usize, heads: usize, kv_heads: usize, head_dim: usize, cache: i32) -> Vec<u8> {
    let shared = [
        ("q", FLOAT),
        ("k", FLOAT),
        ("v", FLOAT),
        ("seqlens_k", INT32),
        ("total", INT32),
        ("cos", FLOAT),
        ("sin", FLOAT),
        ("position_ids", INT64),
    ];
    let mut inputs: Vec<ValueInfoProto> = shared.iter().map(|(n, t)| value_info(n, *t)).collect();
    let (mut nodes, mut outputs) = (Vec::new(), Vec::new());
    for l in 0..layers {
        let (pk, pv) = (format!("past_key{l}"), format!("past_value{l}"));
        let outs = [format!("out{l}"), format!("present_key{l}"), format!("present_value{l}")];
        inputs.extend([value_info(&pk, cache), value_info(&pv, cache)]);
        outputs.extend(outs.iter().enumerate().map(|(i, o)| value_info(o, if i == 0 { FLOAT } else { cache })));
        nodes.push(NodeProto {
            name: Some(format!("attention{l}")),
            op_type: Some("GroupQueryAttention".into()),
            domain: Some(domain.into()),
            input: ["q", "k", "v", &pk, &pv, "seqlens_k", "total", "cos", "sin", "position_ids"]
                .map(String::from)
                .to_vec(),
            output: outs.to_vec(),
            attribute: vec![
                attr("num_heads", Some(heads as i64), None),
                attr("kv_num_heads", Some(kv_heads as i64), None),
                attr("do_rotary", Some(1), None),
                attr("rotary_interleaved", Some(0), None),
                attr("scale", None, Some(1.0 / (head_dim as f32).sqrt())),
            ],
            ..Default::default()
        });
    }
    ModelProto {
        ir_version: Some(9),
        opset_import: vec![
            OperatorSetIdProto { domain: Some(String::new()), version: Some(17) },
            OperatorSetIdProto { domain: Some(domain.into()), version: Some(1) },
        ],
        graph: Some(GraphProto {
            name: Some("attention".into()),
            node: nodes,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}
