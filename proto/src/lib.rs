//! Generated protobuf types for r1.
//!
//! - [`onnx`]: the ONNX model schema (`ModelProto`, `GraphProto`, ...), used by the exporter to write
//!   graphs and by calibration to rewrite them.
//! - [`r1::v1`]: the public gRPC API served by `r1-serve`; [`FILE_DESCRIPTOR_SET`] for reflection.

#[allow(clippy::all, missing_docs)]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

/// The public gRPC API (`package r1.v1`), served by `r1-serve`.
pub mod r1 {
    /// Version 1 of the API: the `Generation` service and its messages.
    #[allow(clippy::all, missing_docs)]
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/r1.v1.rs"));
    }
}

/// Encoded `FileDescriptorSet` of every `r1.v1` proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/r1_descriptor.bin"));
