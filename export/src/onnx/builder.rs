//! A small typed ONNX graph builder in tract's `wire_node` style.
//!
//! Each node is one call that returns its output name(s). Node names are given by the caller and
//! mirror the checkpoint layout (`/model/layers.3/self_attn/q_proj/MatMul`); a node's single output is
//! named `<node name>_output_0` unless the caller names it (graph outputs such as `present.3.key`).
//! Duplicate node names are refused, so a family builder cannot silently wire the same name twice.
//!
//! Initializers come in two kinds:
//! - small constants (shapes, axes, scalars), stored inline in `model.onnx`, deduplicated by value;
//! - weights, streamed to the external-data file ([`ExternalDataWriter`]) at the moment they are
//!   created, in creation order, so the layout is deterministic and no weight stays in memory; or, in a streamed
//!   quantized export ([`GraphBuilder::streaming`]), handed to a [`WeightStream`], which quantizes the MatMul
//!   weights ([`GraphBuilder::matmul_weight`]) as they come and stores the others.

use std::collections::{HashMap, HashSet};

use r1_engine::manifest::{DType, Dim, TensorSpec};
use r1_proto::onnx::{
    tensor_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
};

use super::external::{ExternalDataWriter, ExternalSummary};
use super::proto::{inline_tensor, value_info, Attr};
use super::weight_stream::{F32Chunks, WeightStream};
use super::ElemType;
use crate::error::{ExportError, Result};

/// Lowest and highest default-domain opset the builder emits.
pub const OPSET_RANGE: std::ops::RangeInclusive<i64> = 17..=21;

/// ONNX IR version to declare for an opset (the lowest IR that defines the opset).
pub fn ir_version_for_opset(opset: i64) -> i64 {
    match opset {
        ..=18 => 8,
        19 | 20 => 9,
        _ => 10,
    }
}

/// Builds one ONNX graph. See the module docs.
pub struct GraphBuilder {
    opset: i64,
    nodes: Vec<NodeProto>,
    node_names: HashSet<String>,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    initializers: Vec<TensorProto>,
    initializer_names: HashSet<String>,
    consts: HashMap<(i32, Vec<i64>, Vec<u8>), String>,
    weights: Option<ExternalDataWriter>,
    /// A streamed quantized export's weights (instead of `weights`).
    stream: Option<Box<dyn WeightStream>>,
    /// A MatMul weight's float32 values on their way to `stream` (one buffer for all, see `matmul_weight`).
    values: Vec<f32>,
    /// Bytes of weights written so far (for progress reporting).
    weight_bytes: u64,
}

impl GraphBuilder {
    /// A builder for `opset` (must be in [`OPSET_RANGE`]). With `weights`, weight initializers go to
    /// that external-data file; without, they are stored inline (only for tiny test graphs).
    pub fn new(opset: i64, weights: Option<ExternalDataWriter>) -> Result<Self> {
        if !OPSET_RANGE.contains(&opset) {
            return Err(ExportError::InvalidOption {
                option: "--opset",
                message: format!("must be between {} and {}, got {opset}", OPSET_RANGE.start(), OPSET_RANGE.end()),
            });
        }
        Ok(GraphBuilder {
            opset,
            nodes: Vec::new(),
            node_names: HashSet::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            initializers: Vec::new(),
            initializer_names: HashSet::new(),
            consts: HashMap::new(),
            weights,
            stream: None,
            values: Vec::new(),
            weight_bytes: 0,
        })
    }

    /// A builder for `opset` whose weights go to `stream`: MatMul weights it takes are quantized as they are made,
    /// the others stored by it. Finish it with [`GraphBuilder::finish_streamed`].
    pub fn streaming(opset: i64, stream: Box<dyn WeightStream>) -> Result<Self> {
        let mut b = GraphBuilder::new(opset, None)?;
        b.stream = Some(stream);
        Ok(b)
    }

    /// The default-domain opset being emitted (ops whose signature changed between opsets, such as
    /// `ReduceMean` in 18, are emitted accordingly).
    pub fn opset(&self) -> i64 {
        self.opset
    }

    /// Bytes of weights written so far.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Declares a graph input and returns its name.
    pub fn input(&mut self, name: &str, dtype: DType, shape: Vec<Dim>) -> String {
        self.inputs.push(TensorSpec { name: name.into(), dtype, shape });
        name.into()
    }

    /// Declares a graph output; `name` must be produced by some node.
    pub fn output(&mut self, name: &str, dtype: DType, shape: Vec<Dim>) {
        self.outputs.push(TensorSpec { name: name.into(), dtype, shape });
    }

    /// Moves an already declared output to the front (e.g. `logits` before the `present.*` outputs,
    /// the order Optimum uses).
    pub fn move_output_first(&mut self, name: &str) {
        if let Some(i) = self.outputs.iter().position(|o| o.name == name) {
            let o = self.outputs.remove(i);
            self.outputs.insert(0, o);
        }
    }

    /// Graph inputs declared so far, in order.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    /// Graph outputs declared so far, in order.
    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    /// Adds a node with explicitly named outputs. Returns the output names.
    pub fn wire_to(
        &mut self,
        name: &str,
        op: &str,
        inputs: &[&str],
        attrs: Vec<Attr>,
        outputs: &[&str],
    ) -> Result<Vec<String>> {
        if !self.node_names.insert(name.to_string()) {
            return Err(ExportError::Graph(format!("duplicate node name `{name}`")));
        }
        let output: Vec<String> = outputs.iter().map(|s| s.to_string()).collect();
        self.nodes.push(NodeProto {
            name: Some(name.into()),
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: output.clone(),
            attribute: attrs,
            ..Default::default()
        });
        Ok(output)
    }

    /// Adds a node with `n` outputs named `<name>_output_<k>`.
    pub fn wire_n(&mut self, name: &str, op: &str, inputs: &[&str], attrs: Vec<Attr>, n: usize) -> Result<Vec<String>> {
        let outs: Vec<String> = (0..n).map(|k| format!("{name}_output_{k}")).collect();
        let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        self.wire_to(name, op, inputs, attrs, &refs)
    }

    /// Adds a single-output node and returns the output name `<name>_output_0`.
    pub fn wire(&mut self, name: &str, op: &str, inputs: &[&str], attrs: Vec<Attr>) -> Result<String> {
        let out = format!("{name}_output_0");
        self.wire_to(name, op, inputs, attrs, &[&out])?;
        Ok(out)
    }

    fn push_initializer(&mut self, t: TensorProto) -> Result<String> {
        let name = t.name.clone().unwrap_or_default();
        if !self.initializer_names.insert(name.clone()) {
            return Err(ExportError::Graph(format!("duplicate initializer `{name}`")));
        }
        self.initializers.push(t);
        Ok(name)
    }

    /// A small inline constant, deduplicated by value; returns its name.
    pub fn constant(&mut self, elem: ElemType, dims: &[i64], raw: Vec<u8>) -> Result<String> {
        let key = (elem.onnx_code(), dims.to_vec(), raw);
        if let Some(name) = self.consts.get(&key) {
            return Ok(name.clone());
        }
        let name = format!("/model/constants/{}_{}", elem.name(), self.consts.len());
        let t = inline_tensor(&name, elem, dims, key.2.clone());
        self.push_initializer(t)?;
        self.consts.insert(key, name.clone());
        Ok(name)
    }

    /// 1-D int64 constant (shapes, axes, indices).
    pub fn const_i64s(&mut self, v: &[i64]) -> Result<String> {
        self.constant(ElemType::I64, &[v.len() as i64], v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    /// Scalar int64 constant.
    pub fn const_i64(&mut self, v: i64) -> Result<String> {
        self.constant(ElemType::I64, &[], v.to_le_bytes().to_vec())
    }

    /// Scalar float constant of type `elem` (`F32` or `F16`).
    pub fn const_scalar(&mut self, elem: ElemType, v: f32) -> Result<String> {
        self.constant(elem, &[], elem.encode_f32(&[v])?)
    }

    /// 1-D float32 constant (e.g. rotary inverse frequencies).
    pub fn const_f32s(&mut self, v: &[f32]) -> Result<String> {
        self.constant(ElemType::F32, &[v.len() as i64], bytemuck::cast_slice(v).to_vec())
    }

    /// A weight initializer whose bytes are produced by `fill`, which receives a sink to write the
    /// little-endian data to (in as many chunks as it likes). With an external-data writer the bytes
    /// stream straight to disk; the total must equal `dims` × element size.
    pub fn weight(
        &mut self,
        name: &str,
        elem: ElemType,
        dims: &[i64],
        fill: impl FnOnce(&mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>,
    ) -> Result<String> {
        let expected: u64 = dims.iter().map(|&d| d.max(0) as u64).product::<u64>() * elem.size() as u64;
        let mut t = TensorProto {
            name: Some(name.into()),
            data_type: Some(elem.onnx_code()),
            dims: dims.to_vec(),
            ..Default::default()
        };
        let written = match (self.stream.as_mut(), self.weights.as_mut()) {
            (Some(stream), _) => {
                let mut fill = Some(fill);
                stream.store(&mut t, expected, &mut |sink| match fill.take() {
                    Some(f) => f(sink),
                    None => Err(ExportError::Graph(format!("weight `{name}`: its bytes were asked for twice"))),
                })?
            }
            (None, Some(w)) => {
                w.begin()?;
                fill(&mut |chunk: &[u8]| w.write(chunk))?;
                let span = w.end()?;
                let entry = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
                t.data_location = Some(tensor_proto::DataLocation::External as i32);
                t.external_data = vec![
                    entry("location", w.location().to_string()),
                    entry("offset", span.offset.to_string()),
                    entry("length", span.length.to_string()),
                ];
                span.length
            }
            (None, None) => {
                let mut raw = Vec::new();
                fill(&mut |chunk: &[u8]| {
                    raw.extend_from_slice(chunk);
                    Ok(())
                })?;
                let n = raw.len() as u64;
                t.raw_data = Some(raw);
                n
            }
        };
        if written != expected {
            return Err(ExportError::Graph(format!(
                "weight `{name}` with dims {dims:?} needs {expected} bytes, the writer produced {written}"
            )));
        }
        self.weight_bytes += written;
        self.push_initializer(t)
    }

    /// A weight that is the `B` input (`[k, n]`) of MatMuls: like [`GraphBuilder::weight`], except that in a
    /// streamed quantized export ([`GraphBuilder::streaming`]) the stream may quantize it as it comes: its float32
    /// values are collected (one tensor in memory, in a buffer reused from weight to weight) and handed over, and
    /// the graph gets a placeholder.
    pub fn matmul_weight(
        &mut self,
        name: &str,
        elem: ElemType,
        dims: &[i64],
        fill: impl FnOnce(&mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>,
    ) -> Result<String> {
        let Some((k, n)) = self.streamed_matmul(name, elem, dims) else {
            return self.weight(name, elem, dims, fill);
        };
        let mut values = std::mem::take(&mut self.values);
        values.clear();
        values.reserve(k * n);
        let mut decode = F32Chunks::default();
        fill(&mut |chunk: &[u8]| {
            decode.feed(chunk, &mut values);
            Ok(())
        })?;
        let carried = decode.carried;
        let result = if carried != 0 || values.len() != k * n {
            Err(ExportError::Graph(format!(
                "weight `{name}` with dims {dims:?} needs {} bytes, the writer produced {}",
                k * n * 4,
                values.len() * 4 + carried
            )))
        } else {
            self.quantize_streamed(name, dims, &values)
        };
        self.values = values;
        result
    }

    /// [`GraphBuilder::matmul_weight`] for a weight that can also be read a band of columns at a time
    /// (`columns`, see [`Columns`](super::Columns)): a streamed quantized export hands it to
    /// [`WeightStream::quantize_columns`], which reads it in bands of output columns, so its float32 form (the LM
    /// head's: 3.7 GB for DeepSeek-R1) is never in memory whole. Otherwise `fill` writes it as [`GraphBuilder::weight`] does.
    pub fn matmul_weight_columns(
        &mut self,
        name: &str,
        elem: ElemType,
        dims: &[i64],
        fill: impl FnOnce(&mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>,
        mut columns: impl FnMut((usize, usize), &mut Vec<f32>) -> Result<()>,
    ) -> Result<String> {
        let Some((k, n)) = self.streamed_matmul(name, elem, dims) else {
            return self.weight(name, elem, dims, fill);
        };
        let stream = self.stream.as_mut().ok_or_else(|| ExportError::Graph(format!("weight `{name}`: no stream")))?;
        let mut read = 0usize;
        stream.quantize_columns(name, k, n, &mut |(c0, c1), out| {
            if c0 > c1 || c1 > n {
                return Err(ExportError::Graph(format!("weight `{name}` [{k}, {n}]: no columns {c0}..{c1}")));
            }
            columns((c0, c1), out)?;
            if out.len() != k * (c1 - c0) {
                return Err(ExportError::Graph(format!(
                    "weight `{name}` [{k}, {n}]: columns {c0}..{c1} need {} values, got {}",
                    k * (c1 - c0),
                    out.len()
                )));
            }
            read += c1 - c0;
            Ok(())
        })?;
        if read != n {
            return Err(ExportError::Graph(format!("weight `{name}` [{k}, {n}]: {read} columns were read, not {n}")));
        }
        self.weight_bytes += (k * n * 4) as u64;
        self.push_initializer(TensorProto {
            name: Some(name.into()),
            data_type: Some(ElemType::F32.onnx_code()),
            dims: dims.to_vec(),
            ..Default::default()
        })
    }

    /// A stack of `e` MatMul `B` matrices (`dims` = `[e, k, n]`, read by a batched MatMul: DeepseekV3's routed
    /// experts): like [`GraphBuilder::weight`], except that in a streamed quantized export the stream may quantize it
    /// one matrix at a time ([`WeightStream::quantize_stack`]; one matrix's float32 values in memory), and the graph
    /// gets a placeholder.
    pub fn stacked_matmul_weight(
        &mut self,
        name: &str,
        elem: ElemType,
        dims: &[i64],
        fill: impl FnOnce(&mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>,
    ) -> Result<String> {
        let stacked = match (self.stream.as_ref(), dims) {
            (Some(s), &[e, k, n])
                if e > 0 && k > 0 && n > 0 && elem == ElemType::F32 && s.takes_stack(name, elem, dims) =>
            {
                Some([e as usize, k as usize, n as usize])
            }
            _ => None,
        };
        let Some([e, k, n]) = stacked else { return self.weight(name, elem, dims, fill) };
        let mut values = std::mem::take(&mut self.values);
        let stream = self.stream.as_mut().ok_or_else(|| ExportError::Graph(format!("weight `{name}`: no stream")))?;
        let mut fill = Some(fill);
        let mut matrices = 0usize;
        let result = stream.quantize_stack(name, [e, k, n], &mut |matrix| {
            let fill = fill
                .take()
                .ok_or_else(|| ExportError::Graph(format!("weight `{name}`: its bytes were asked for twice")))?;
            values.clear();
            values.reserve(k * n);
            let mut decode = F32Chunks::default();
            fill(&mut |chunk: &[u8]| {
                // A chunk may end inside a matrix, or hold the end of one and the start of the next.
                let mut rest = chunk;
                while !rest.is_empty() {
                    let want = (k * n - values.len()) * 4 - decode.carried;
                    let (now, later) = rest.split_at(want.min(rest.len()));
                    decode.feed(now, &mut values);
                    rest = later;
                    if values.len() == k * n {
                        if matrices == e {
                            return Err(ExportError::Graph(format!("weight `{name}`: more than {e} matrices")));
                        }
                        matrix(&values)?;
                        matrices += 1;
                        values.clear();
                    }
                }
                Ok(())
            })?;
            if matrices != e || !values.is_empty() || decode.carried != 0 {
                return Err(ExportError::Graph(format!(
                    "weight `{name}` with dims {dims:?} needs {} bytes, the writer produced {}",
                    e * k * n * 4,
                    (matrices * k * n + values.len()) * 4 + decode.carried
                )));
            }
            Ok(())
        });
        self.values = values;
        result?;
        self.weight_bytes += (e * k * n * 4) as u64;
        self.push_initializer(TensorProto {
            name: Some(name.into()),
            data_type: Some(ElemType::F32.onnx_code()),
            dims: dims.to_vec(),
            ..Default::default()
        })
    }

    /// [`GraphBuilder::matmul_weight`] from float32 values (`[k, n]`, row-major) already in memory, written in
    /// `elem`.
    pub fn matmul_weight_f32(&mut self, name: &str, elem: ElemType, dims: &[i64], values: &[f32]) -> Result<String> {
        if self.streamed_matmul(name, elem, dims).is_none() {
            return self.weight(name, elem, dims, |sink| {
                for chunk in values.chunks(1 << 20) {
                    sink(&elem.encode_f32(chunk)?)?;
                }
                Ok(())
            });
        }
        let expected: usize = dims.iter().map(|&d| d.max(0) as usize).product();
        if values.len() != expected {
            return Err(ExportError::Graph(format!(
                "weight `{name}` with dims {dims:?} needs {expected} values, got {}",
                values.len()
            )));
        }
        self.quantize_streamed(name, dims, values)
    }

    /// `(k, n)` when `name` is quantized by a stream as it comes.
    fn streamed_matmul(&self, name: &str, elem: ElemType, dims: &[i64]) -> Option<(usize, usize)> {
        let stream = self.stream.as_ref()?;
        match dims {
            [k, n] if *k > 0 && *n > 0 && elem == ElemType::F32 && stream.takes(name, elem, dims) => {
                Some((*k as usize, *n as usize))
            }
            _ => None,
        }
    }

    /// Hands `values` (`dims` = `[k, n]`) to the stream and keeps a placeholder initializer for the rewrite.
    fn quantize_streamed(&mut self, name: &str, dims: &[i64], values: &[f32]) -> Result<String> {
        let stream = self.stream.as_mut().ok_or_else(|| ExportError::Graph(format!("weight `{name}`: no stream")))?;
        stream.quantize(name, values, dims[0] as usize, dims[1] as usize)?;
        self.weight_bytes += (values.len() * 4) as u64;
        self.push_initializer(TensorProto {
            name: Some(name.into()),
            data_type: Some(ElemType::F32.onnx_code()),
            dims: dims.to_vec(),
            ..Default::default()
        })
    }

    /// Finishes a streamed graph ([`GraphBuilder::streaming`]): the model, its quantized MatMul weights still
    /// placeholders, and the stream.
    pub fn finish_streamed(mut self, graph_name: &str, doc: &str) -> Result<(ModelProto, Box<dyn WeightStream>)> {
        let stream = self
            .stream
            .take()
            .ok_or_else(|| ExportError::Graph("finish_streamed on a builder made without a stream".into()))?;
        let (model, _) = self.finish(graph_name, doc)?;
        Ok((model, stream))
    }

    /// Finishes the graph. Returns the model and, when weights were external, the data file summary.
    pub fn finish(self, graph_name: &str, doc: &str) -> Result<(ModelProto, Option<ExternalSummary>)> {
        if self.stream.is_some() {
            return Err(ExportError::Graph("a streamed graph is finished with finish_streamed".into()));
        }
        let produced: HashSet<&str> = self
            .nodes
            .iter()
            .flat_map(|n| n.output.iter().map(String::as_str))
            .chain(self.inputs.iter().map(|i| i.name.as_str()))
            .chain(self.initializer_names.iter().map(String::as_str))
            .collect();
        for n in &self.nodes {
            for i in &n.input {
                if !i.is_empty() && !produced.contains(i.as_str()) {
                    return Err(ExportError::Graph(format!(
                        "node `{}` reads `{i}`, which nothing produces",
                        n.name.as_deref().unwrap_or("?")
                    )));
                }
            }
        }
        for o in &self.outputs {
            if !produced.contains(o.name.as_str()) {
                return Err(ExportError::Graph(format!("graph output `{}` is not produced by any node", o.name)));
            }
        }
        let summary = self.weights.map(|w| w.finish()).transpose()?;
        let graph = GraphProto {
            name: Some(graph_name.into()),
            node: self.nodes,
            initializer: self.initializers,
            input: self.inputs.iter().map(value_info).collect(),
            output: self.outputs.iter().map(value_info).collect(),
            doc_string: Some(doc.into()),
            ..Default::default()
        };
        let model = ModelProto {
            ir_version: Some(ir_version_for_opset(self.opset)),
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(self.opset) }],
            producer_name: Some("r1-export".into()),
            producer_version: Some(env!("CARGO_PKG_VERSION").into()),
            graph: Some(graph),
            ..Default::default()
        };
        Ok((model, summary))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{ByteSink, Matrices};
    use std::any::Any;

    /// Takes every stack and records the matrices it is handed.
    struct Recorder(Vec<Vec<f32>>);

    impl WeightStream for Recorder {
        fn takes(&self, _: &str, _: ElemType, _: &[i64]) -> bool {
            false
        }
        fn quantize(&mut self, _: &str, _: &[f32], _: usize, _: usize) -> Result<()> {
            Ok(())
        }
        fn store(&mut self, _: &mut TensorProto, _: u64, _: &mut dyn FnMut(ByteSink<'_>) -> Result<()>) -> Result<u64> {
            Ok(0)
        }
        fn takes_stack(&self, _: &str, _: ElemType, _: &[i64]) -> bool {
            true
        }
        fn quantize_stack(&mut self, _: &str, [e, k, n]: [usize; 3], matrices: Matrices<'_>) -> Result<()> {
            matrices(&mut |m| {
                assert_eq!(m.len(), k * n);
                self.0.push(m.to_vec());
                Ok(())
            })?;
            assert_eq!(self.0.len(), e);
            Ok(())
        }
        fn into_any(self: Box<Self>) -> Box<dyn Any> {
            self
        }
    }

    #[test]
    fn a_stack_reaches_the_stream_matrix_by_matrix_whatever_the_chunks() {
        // 3 matrices of 2 × 3, written in chunks of 7 bytes: chunks end inside values and span matrices.
        let values: Vec<f32> = (0..18).map(|v| v as f32 * 0.5 - 3.0).collect();
        let bytes: Vec<u8> = bytemuck::cast_slice(&values).to_vec();
        let mut b = GraphBuilder::streaming(21, Box::new(Recorder(Vec::new()))).unwrap();
        b.stacked_matmul_weight("w", ElemType::F32, &[3, 2, 3], |sink| {
            for c in bytes.chunks(7) {
                sink(c)?;
            }
            Ok(())
        })
        .unwrap();
        let short = b.stacked_matmul_weight("v", ElemType::F32, &[3, 2, 3], |sink| sink(&bytes[..70]));
        assert!(short.unwrap_err().to_string().contains("needs 72 bytes"));
        let (_, stream) = b.finish_streamed("g", "").unwrap();
        let got = stream.into_any().downcast::<Recorder>().unwrap().0;
        assert_eq!(got.concat()[..18], values[..]);
        assert_eq!(got.len(), 3 + 2, "the short stack handed over its 2 whole matrices before failing");
    }
}
