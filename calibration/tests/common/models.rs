//! Tiny hand-built ONNX models for the QDQ tests and `examples/qdq_tiny.rs`.
#![allow(dead_code)]
use r1_proto::onnx::attribute_proto::AttributeType;
use r1_proto::onnx::tensor_proto::DataType;
use r1_proto::onnx::tensor_shape_proto::{dimension::Value as DimValue, Dimension};
use r1_proto::onnx::type_proto::{Tensor as TypeTensor, Value as TypeValue};
use r1_proto::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};

/// Deterministic pseudo-random values in `[-amp, amp]`, with a few channels made 8x larger (outliers).
pub fn values(n: usize, seed: u64, amp: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = ((s >> 33) as f32) / (1u64 << 31) as f32 * 2.0 - 1.0;
            if i % 17 == 3 {
                u * amp * 8.0
            } else {
                u * amp
            }
        })
        .collect()
}

pub fn f32_init(name: &str, dims: &[usize], v: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(v.iter().flat_map(|f| f.to_le_bytes()).collect()),
        ..Default::default()
    }
}

pub fn i64_init(name: &str, v: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: vec![v.len() as i64],
        data_type: Some(DataType::Int64 as i32),
        raw_data: Some(v.iter().flat_map(|f| f.to_le_bytes()).collect()),
        ..Default::default()
    }
}

pub fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        name: Some(name.into()),
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

pub fn value_info(name: &str, dims: &[usize]) -> ValueInfoProto {
    let dim =
        dims.iter().map(|&d| Dimension { value: Some(DimValue::DimValue(d as i64)), ..Default::default() }).collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(TypeValue::TensorType(TypeTensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn model(graph: GraphProto, opset: i64) -> ModelProto {
    ModelProto {
        ir_version: Some(10),
        producer_name: Some("r1-calibration-tests".into()),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        graph: Some(graph),
        ..Default::default()
    }
}

/// Rows of the test input `x`.
pub const M: usize = 4;

/// `x[M,64] → MatMul(w1[64,96]) → h → MatMul(w2[96,40]) → y`, plus `r = Add(h, bias)` (a residual-style add that
/// must stay fp32) as a second output.
pub fn matmul_chain(opset: i64) -> ModelProto {
    let (k, h, n) = (64, 96, 40);
    let graph = GraphProto {
        name: Some("chain".into()),
        node: vec![
            node("MatMul", "mm1", &["x", "w1"], &["h"]),
            node("MatMul", "mm2", &["h", "w2"], &["y"]),
            node("Add", "residual", &["h", "bias"], &["r"]),
        ],
        initializer: vec![
            f32_init("w1", &[k, h], &values(k * h, 1, 0.2)),
            f32_init("w2", &[h, n], &values(h * n, 2, 0.1)),
            f32_init("bias", &[h], &values(h, 3, 1.0)),
        ],
        input: vec![value_info("x", &[M, k])],
        output: vec![value_info("y", &[M, n]), value_info("r", &[M, h])],
        ..Default::default()
    };
    model(graph, opset)
}

/// Decomposed RMSNorm (`x / sqrt(mean(x^2) + eps) * gamma`) feeding two projections that share its output
/// (like q and k), then a residual Add of the first projection with `x`.
pub fn rmsnorm_qk(opset: i64) -> ModelProto {
    let (k, n) = (64, 64);
    let mut reduce = node("ReduceMean", "norm/mean", &["x2", "axes"], &["ms"]);
    reduce.attribute.push(int_attr("keepdims", 1));
    let graph = GraphProto {
        name: Some("rmsnorm_qk".into()),
        node: vec![
            node("Mul", "norm/square", &["x", "x"], &["x2"]),
            reduce,
            node("Add", "norm/add_eps", &["ms", "eps"], &["ms_eps"]),
            node("Sqrt", "norm/sqrt", &["ms_eps"], &["rms"]),
            node("Div", "norm/div", &["x", "rms"], &["xn"]),
            node("Mul", "norm/gamma", &["xn", "gamma"], &["normed"]),
            node("MatMul", "q_proj", &["normed", "wq"], &["q"]),
            node("MatMul", "k_proj", &["normed", "wk"], &["kk"]),
            node("Add", "residual", &["q", "x"], &["out"]),
        ],
        initializer: vec![
            i64_init("axes", &[-1]),
            f32_init("eps", &[], &[1e-6]),
            f32_init(
                "gamma",
                &[k],
                &values(k, 5, 1.0).iter().map(|v| 1.0 + 0.5 * v.abs().min(1.0)).collect::<Vec<_>>(),
            ),
            f32_init("wq", &[k, n], &values(k * n, 6, 0.1)),
            f32_init("wk", &[k, n], &values(k * n, 7, 0.1)),
        ],
        input: vec![value_info("x", &[M, k])],
        output: vec![value_info("out", &[M, n]), value_info("kk", &[M, n])],
        ..Default::default()
    };
    model(graph, opset)
}

/// Test input for both models: `[M, 64]` with outlier channels.
pub fn input_x() -> Vec<f32> {
    values(M * 64, 11, 2.0)
}
