//! The weight stream of a quantized export without float32 staging: the trait the graph builder hands its MatMul
//! weights to as they are made ([`super::GraphBuilder::streaming`], implemented by `quantize::stream`), its callback
//! types, and the decoding of float32 values out of byte chunks that need not end on a value.

use std::any::Any;

use r1_proto::onnx::TensorProto;

use super::ElemType;
use crate::error::{ExportError, Result};

/// Where a byte sink passes a weight's little-endian bytes (in as many chunks as the producer likes).
pub type ByteSink<'a> = &'a mut dyn FnMut(&[u8]) -> Result<()>;

/// The matrices of a stacked weight ([`WeightStream::quantize_stack`]): passes each one's float32 values, in order, to
/// the callback it is given.
pub type Matrices<'a> = &'a mut dyn FnMut(&mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()>;

/// The columns of a MatMul weight `B` (`[k, n]`) read in bands ([`WeightStream::quantize_columns`]): called with
/// `(c0, c1)` and a buffer, fills the buffer (cleared first) with columns `[c0, c1)` of `B` as float32
/// `[k, c1 - c0]`, row-major.
pub type Columns<'a> = &'a mut dyn FnMut((usize, usize), &mut Vec<f32>) -> Result<()>;

/// Takes the weights of a graph whose MatMul weights are quantized as they are made (`quantize::stream`, a
/// weight-only export without fp32 staging). The graph keeps a placeholder initializer (name, FLOAT, dims, no
/// data) for each weight it quantizes; the graph rewrite after [`GraphBuilder::finish_streamed`] replaces them.
pub trait WeightStream {
    /// Whether MatMul weight `name` (`[k, n]` = `dims`, of type `elem`) is quantized; otherwise it is stored.
    fn takes(&self, name: &str, elem: ElemType, dims: &[i64]) -> bool;
    /// Quantizes MatMul weight `name` from its float32 values (`[k, n]`, row-major).
    fn quantize(&mut self, name: &str, values: &[f32], k: usize, n: usize) -> Result<()>;
    /// Stores a weight that stays as it is: `t` carries its name, type and dims; `fill` passes its `length` bytes
    /// to the sink it is given. Points `t` at the stored bytes (or sets them inline); returns the bytes stored.
    fn store(
        &mut self,
        t: &mut TensorProto,
        length: u64,
        fill: &mut dyn FnMut(ByteSink<'_>) -> Result<()>,
    ) -> Result<u64>;
    /// Quantizes MatMul weight `name` (`[k, n]`) whose columns `columns` reads in any band asked for (a weight
    /// stored transposed in the checkpoint: a band of output columns is a band of its rows). The stream picks the
    /// bands, so that it never needs the whole weight in float32; by default one band of all `n` columns, handed to
    /// [`WeightStream::quantize`].
    fn quantize_columns(&mut self, name: &str, k: usize, n: usize, columns: Columns<'_>) -> Result<()> {
        let mut values = Vec::new();
        columns((0, n), &mut values)?;
        self.quantize(name, &values, k, n)
    }
    /// Whether the stacked MatMul weight `name` (`[e, k, n]` = `dims`: `e` matrices `[k, n]`, DeepseekV3's routed
    /// experts) is quantized matrix by matrix ([`WeightStream::quantize_stack`]); otherwise it is stored.
    fn takes_stack(&self, _name: &str, _elem: ElemType, _dims: &[i64]) -> bool {
        false
    }
    /// Quantizes stacked MatMul weight `name` (`[e, k, n]`): `matrices` passes each matrix's float32 values (`[k, n]`,
    /// row-major), in order, to the callback it is given.
    fn quantize_stack(&mut self, name: &str, dims: [usize; 3], matrices: Matrices<'_>) -> Result<()> {
        let _ = (dims, matrices);
        Err(ExportError::Graph(format!("weight `{name}`: this stream does not quantize stacked weights")))
    }
    /// Itself, for the caller that made it to take back.
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

/// Float32 values out of little-endian byte chunks that need not end on a value (a value's leading bytes wait).
#[derive(Default)]
pub(super) struct F32Chunks {
    carry: [u8; 4],
    pub(super) carried: usize,
}

impl F32Chunks {
    /// Appends the whole values of `chunk` (after the bytes carried from the last one) to `out`.
    pub(super) fn feed(&mut self, mut chunk: &[u8], out: &mut Vec<f32>) {
        if self.carried > 0 {
            let take = (4 - self.carried).min(chunk.len());
            self.carry[self.carried..self.carried + take].copy_from_slice(&chunk[..take]);
            self.carried += take;
            chunk = &chunk[take..];
            if self.carried < 4 {
                return;
            }
            out.push(f32::from_le_bytes(self.carry));
            self.carried = 0;
        }
        let whole = chunk.len() / 4 * 4;
        out.extend(chunk[..whole].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        self.carried = chunk.len() - whole;
        self.carry[..self.carried].copy_from_slice(&chunk[whole..]);
    }
}
