//! Protobuf helpers for ONNX graphs: node attributes, small inline tensors, bare nodes and value infos, shared by the
//! graph builder ([`super::GraphBuilder`]) and the graph rewrites that edit a `ModelProto` directly.

use r1_engine::manifest::{Dim, TensorSpec};
use r1_proto::onnx::{
    attribute_proto::AttributeType, tensor_shape_proto, type_proto, AttributeProto, NodeProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

use super::ElemType;

/// One node attribute. Build with [`attr_i`], [`attr_f`], [`attr_ints`], [`attr_s`], [`attr_t`].
pub type Attr = AttributeProto;

/// Integer attribute.
pub fn attr_i(name: &str, v: i64) -> Attr {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}
/// Float attribute.
pub fn attr_f(name: &str, v: f32) -> Attr {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}
/// Integer-list attribute.
pub fn attr_ints(name: &str, v: &[i64]) -> Attr {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}
/// String attribute.
pub fn attr_s(name: &str, v: &str) -> Attr {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}
/// Tensor attribute (e.g. `ConstantOfShape`'s `value`).
pub fn attr_t(name: &str, t: TensorProto) -> Attr {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(t),
        ..Default::default()
    }
}

/// A tensor proto with inline raw data (little-endian), for small constants.
pub fn inline_tensor(name: &str, elem: ElemType, dims: &[i64], raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        data_type: Some(elem.onnx_code()),
        dims: dims.to_vec(),
        raw_data: Some(raw),
        ..Default::default()
    }
}

/// An int64 tensor proto with inline data, for the small shape and index constants of graph rewrites.
pub fn i64_tensor(name: &str, dims: &[i64], v: &[i64]) -> TensorProto {
    inline_tensor(name, ElemType::I64, dims, v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

/// A default-domain node without attributes, for graph rewrites that edit a `ModelProto` directly (the builder
/// makes its own nodes).
pub fn rewrite_node(name: &str, op_type: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        name: Some(name.into()),
        op_type: Some(op_type.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A graph input's or output's declared type and shape.
pub(super) fn value_info(spec: &TensorSpec) -> ValueInfoProto {
    let elem = ElemType::from(spec.dtype);
    let dim = spec
        .shape
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                Dim::Symbolic(s) => tensor_shape_proto::dimension::Value::DimParam(s.clone()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(spec.name.clone()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem.onnx_code()),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
