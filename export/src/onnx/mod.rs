//! ONNX graph construction: element types, the typed graph builder, op helpers and the
//! external-data writer. Produces `r1_proto::onnx::ModelProto`.
//!
//! Why opset 17 by default: it is the newest default-domain opset that all three runtimes we target
//! run completely: TensorRT 8.6's ONNX parser supports opsets up to 17, tract is tested up to 18, and
//! ONNX Runtime runs everything. The fused LLM ops (RMSNormalization, RotaryEmbedding, Attention) only
//! arrive in opset 23, so the portable graph decomposes them into basic ops; fused forms belong in
//! per-target graphs.
//! `--opset` accepts 17..=21 and the builder emits the right signature for ops that changed.

mod builder;
mod external;
pub mod fused_attention;
pub mod fused_latent;
pub mod last_logits;
mod ops;
mod proto;
pub mod sparse_moe;
mod weight_stream;

pub use builder::{ir_version_for_opset, GraphBuilder, OPSET_RANGE};
pub use external::{ExternalDataWriter, ExternalSpan, ExternalSummary, EXTERNAL_ALIGN};
pub use proto::{attr_f, attr_i, attr_ints, attr_s, attr_t, i64_tensor, inline_tensor, rewrite_node, Attr};
pub use weight_stream::{ByteSink, Columns, Matrices, WeightStream};

use half::f16;
use r1_engine::manifest::DType;
use r1_proto::onnx::tensor_proto::DataType;

use crate::error::{ExportError, Result};

/// Element types the builder emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElemType {
    /// float32
    F32,
    /// float16
    F16,
    /// int64
    I64,
    /// int32
    I32,
    /// bool
    Bool,
    /// int8
    I8,
    /// uint8
    U8,
}

impl ElemType {
    /// `TensorProto.DataType` code.
    pub fn onnx_code(self) -> i32 {
        (match self {
            ElemType::F32 => DataType::Float,
            ElemType::F16 => DataType::Float16,
            ElemType::I64 => DataType::Int64,
            ElemType::I32 => DataType::Int32,
            ElemType::Bool => DataType::Bool,
            ElemType::I8 => DataType::Int8,
            ElemType::U8 => DataType::Uint8,
        }) as i32
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ElemType::F32 | ElemType::I32 => 4,
            ElemType::F16 => 2,
            ElemType::I64 => 8,
            ElemType::Bool | ElemType::I8 | ElemType::U8 => 1,
        }
    }

    /// Short lower-case name (used in constant names).
    pub fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "f32",
            ElemType::F16 => "f16",
            ElemType::I64 => "i64",
            ElemType::I32 => "i32",
            ElemType::Bool => "bool",
            ElemType::I8 => "i8",
            ElemType::U8 => "u8",
        }
    }

    /// Encodes f32 values as this (floating-point) type, little-endian.
    pub fn encode_f32(self, v: &[f32]) -> Result<Vec<u8>> {
        match self {
            ElemType::F32 => Ok(bytemuck::cast_slice(v).to_vec()),
            ElemType::F16 => Ok(v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect()),
            other => Err(ExportError::Graph(format!("cannot encode floats as {}", other.name()))),
        }
    }

    /// The manifest dtype, for graph inputs and outputs.
    pub fn manifest_dtype(self) -> Result<DType> {
        match self {
            ElemType::F32 => Ok(DType::Float32),
            ElemType::F16 => Ok(DType::Float16),
            ElemType::I64 => Ok(DType::Int64),
            other => Err(ExportError::Graph(format!("{} cannot be a graph input or output", other.name()))),
        }
    }
}

impl From<DType> for ElemType {
    fn from(d: DType) -> Self {
        match d {
            DType::Int64 => ElemType::I64,
            DType::Float32 => ElemType::F32,
            DType::Float16 => ElemType::F16,
        }
    }
}
