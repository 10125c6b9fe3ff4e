//! Generated protobuf types for r1.
//!
//! - [`onnx`]: the ONNX model schema (`ModelProto`, `GraphProto`, ...), used by the exporter to write
//!   graphs and by calibration to rewrite them.
//! - `r1::v1` (when `r1/v1/*.proto` exist): the public gRPC API served by `r1-serve`.

#[allow(clippy::all, missing_docs)]
pub mod onnx {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}
