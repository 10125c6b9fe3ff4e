//! Lowers the portable `int8-wo` graph to ONNX Runtime's CPU form: every weight-only
//! `DequantizeLinear(int8 [K, N], per-column scale, axis = 1) → MatMul` becomes a `com.microsoft.MatMulNBits`
//! (bits 8, `block_size` rows per scale, `accuracy_level` 4 = int8 compute), and MatMuls that read the same input
//! (q / k / v, gate / up) become one wider `MatMulNBits` followed by a `Split`.
//!
//! Why not leave it to ONNX Runtime's own QDQ fusion: it turns the per-column int8 weights into 32-row blocks with
//! explicit all-128 zero points, one kernel call per projection. The int8 kernel's cost per block is what limits a
//! batched decode step on CPU (ORT profile in BENCHMARKS.md); a per-column scale is exact at any block size, so the
//! lowering picks a long block and leaves out the zero points (MatMulNBits' default zero point for 8 bits is 128,
//! so codes are stored as `q + 128`). The numbers are the same weights: only the kernel's layout changes.
//!
//! Only for CPU graphs: the portable `model.onnx` keeps standard ONNX (TensorRT and tract read it), and W8A8
//! MatMuls are left alone (a MatMul whose input comes from a `DequantizeLinear` is not weight-only); in an `int8`
//! (W8A8) graph only its weight-only MatMuls, the LM head by default, are lowered.
use crate::error::{CalibError, Result};
use crate::external::{element_count, rehome_initializers, ExternalDataReader, ExternalDataWriter};
use r1_proto::onnx::attribute_proto::AttributeType;
use r1_proto::onnx::tensor_proto::DataType;
use r1_proto::onnx::{AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Contrib-op domain of `MatMulNBits`.
pub const MS_DOMAIN: &str = "com.microsoft";
/// `MatMulNBits` block sizes ONNX Runtime's CPU kernels take.
pub const BLOCK_SIZES: [usize; 5] = [16, 32, 64, 128, 256];
/// Default rows per block: the longest the kernel takes (the weights' scale is per column, so any block is exact).
/// Measured on the 1.5B shape against ORT's own 32-row fusion: see BENCHMARKS.md.
pub const DEFAULT_BLOCK_SIZE: usize = 256;
/// `accuracy_level` 4: activations quantized to int8 per block, integer dot products (VNNI where present).
pub const ACCURACY_LEVEL_INT8: i64 = 4;

/// What [`lower_int8_weight_only`] did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Lowering {
    /// `MatMulNBits` nodes written.
    pub matmul_nbits: usize,
    /// MatMuls they replace (more than `matmul_nbits` when siblings were fused).
    pub matmuls: usize,
    /// Rows per block.
    pub block_size: usize,
}

/// One weight-only int8 MatMul found in the graph.
struct Candidate {
    node: usize,
    a: String,
    dq: usize,
    k: usize,
    n: usize,
}

fn attr_i(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name.as_deref() == Some(name)).and_then(|a| a.i)
}

fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn is_default_domain(n: &NodeProto) -> bool {
    matches!(n.domain.as_deref(), None | Some("") | Some("ai.onnx"))
}

fn op(n: &NodeProto) -> &str {
    n.op_type.as_deref().unwrap_or_default()
}

/// Rewrites `model` (stored in `model_dir`) into `out_dir`: weights of at least `external_threshold` bytes go to
/// `out_dir/data_location`, the caller serializes the returned model next to it. `block_size` must be one of
/// [`BLOCK_SIZES`]. A graph without weight-only int8 MatMuls is copied unchanged (`matmul_nbits == 0`).
pub fn lower_int8_weight_only(
    model: &mut ModelProto,
    model_dir: &Path,
    out_dir: &Path,
    data_location: &str,
    block_size: usize,
    external_threshold: usize,
) -> Result<Lowering> {
    if !BLOCK_SIZES.contains(&block_size) {
        return Err(CalibError::invalid("MatMulNBits block_size", "one of 16, 32, 64, 128, 256", block_size));
    }
    let opset = model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .unwrap_or(0);
    let reader = ExternalDataReader::new(model_dir);
    let mut writer = ExternalDataWriter::create(out_dir, data_location)?;
    let graph = model.graph.as_mut().ok_or_else(|| CalibError::graph("model", "has no graph"))?;
    let rewrite = {
        let src = Source::new(graph, &reader);
        let groups = group_candidates(find_candidates(&src)?, opset >= 13);
        lower_groups(&src, &groups, &mut Sink { writer: &mut writer, block_size, external_threshold })?
    };
    splice_nodes(graph, rewrite.replaced, &rewrite.removed);
    prune_initializers(graph);
    // Everything that stays moves to the new data file (the source's data file is not next to the lowered model).
    rehome_initializers(&mut graph.initializer, &reader, &mut writer, external_threshold)?;
    graph.initializer.extend(rewrite.new_inits);
    if rewrite.lowering.matmul_nbits > 0 && !model.opset_import.iter().any(|o| o.domain.as_deref() == Some(MS_DOMAIN)) {
        model.opset_import.push(OperatorSetIdProto { domain: Some(MS_DOMAIN.into()), version: Some(1) });
    }
    writer.finish()?;
    Ok(rewrite.lowering)
}

/// The graph being lowered, read-only: its initializers by name and the reader of their external data.
struct Source<'a> {
    graph: &'a GraphProto,
    inits: HashMap<String, usize>,
    reader: &'a ExternalDataReader,
}

impl<'a> Source<'a> {
    /// Indexes `graph`'s initializers by name.
    fn new(graph: &'a GraphProto, reader: &'a ExternalDataReader) -> Self {
        let inits = graph.initializer.iter().enumerate().filter_map(|(i, t)| t.name.clone().map(|n| (n, i))).collect();
        Source { graph, inits, reader }
    }

    /// The initializer named `name`, if the graph has one.
    fn init(&self, name: &str) -> Option<&'a TensorProto> {
        self.inits.get(name).map(|&i| &self.graph.initializer[i])
    }
}

/// Every MatMul that reads a weight-only int8 `DequantizeLinear` as its `B` input, in the order of those nodes.
fn find_candidates(src: &Source) -> Result<Vec<Candidate>> {
    let graph = src.graph;
    let producer: HashMap<&str, usize> =
        graph.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i))).collect();
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for x in &n.input {
            consumers.entry(x.as_str()).or_default().push(i);
        }
    }
    let graph_outputs: HashSet<&str> = graph.output.iter().filter_map(|o| o.name.as_deref()).collect();

    // Weight-only: the DequantizeLinear's output is read only by MatMuls as their B input.
    let mut candidates = Vec::new();
    for (di, dq) in graph.node.iter().enumerate() {
        let Some((k, n)) = int8_weight_shape(src, dq)? else { continue };
        let out = dq.output[0].as_str();
        let users = consumers.get(out).cloned().unwrap_or_default();
        let weight_only = |&u: &usize| {
            let m = &graph.node[u];
            op(m) == "MatMul"
                && is_default_domain(m)
                && m.input.len() == 2
                && m.input[1] == out
                && m.input[0] != out
                && producer.get(m.input[0].as_str()).is_none_or(|&p| op(&graph.node[p]) != "DequantizeLinear")
        };
        if users.is_empty() || graph_outputs.contains(out) || !users.iter().all(weight_only) {
            continue;
        }
        for u in users {
            candidates.push(Candidate { node: u, a: graph.node[u].input[0].clone(), dq: di, k, n });
        }
    }
    Ok(candidates)
}

/// `(K, N)` when `dq` is an int8 weight `DequantizeLinear`: int8 [K, N] initializer, FLOAT [N] scale initializer,
/// zero point absent or all zero, axis 1, not blocked.
fn int8_weight_shape(src: &Source, dq: &NodeProto) -> Result<Option<(usize, usize)>> {
    if op(dq) != "DequantizeLinear" || !is_default_domain(dq) || dq.output.len() != 1 {
        return Ok(None);
    }
    if attr_i(dq, "axis") != Some(1) || attr_i(dq, "block_size").is_some_and(|b| b != 0) {
        return Ok(None);
    }
    let (Some(w), Some(s)) = (src.init(&dq.input[0]), dq.input.get(1).and_then(|s| src.init(s))) else {
        return Ok(None);
    };
    if w.data_type != Some(DataType::Int8 as i32) || w.dims.len() != 2 || s.data_type != Some(DataType::Float as i32) {
        return Ok(None);
    }
    let (k, n) = (w.dims[0] as usize, w.dims[1] as usize);
    if element_count(s)? != n {
        return Ok(None);
    }
    if let Some(z) = dq.input.get(2).filter(|z| !z.is_empty()) {
        let Some(z) = src.init(z) else { return Ok(None) };
        if src.reader.tensor_bytes(z)?.iter().any(|&b| b != 0) {
            return Ok(None);
        }
    }
    Ok(Some((k, n)))
}

/// Groups the candidates by (input, K) in graph order: one MatMulNBits per group (Split with sizes as an input
/// needs opset 13, so without `can_split` every candidate is a group of its own).
fn group_candidates(mut candidates: Vec<Candidate>, can_split: bool) -> Vec<Vec<Candidate>> {
    let mut groups: Vec<Vec<Candidate>> = Vec::new();
    candidates.sort_by_key(|c| c.node);
    for c in candidates {
        match groups.iter_mut().find(|g| can_split && g[0].a == c.a && g[0].k == c.k) {
            Some(g) => g.push(c),
            None => groups.push(vec![c]),
        }
    }
    groups
}

/// Where the lowered weights go: the new data file for tensors of at least `external_threshold` bytes.
struct Sink<'w> {
    writer: &'w mut ExternalDataWriter,
    block_size: usize,
    external_threshold: usize,
}

impl Sink<'_> {
    /// Stores `bytes` as `t`'s data: in the data file from `external_threshold` bytes on, inline below that.
    fn store(&mut self, t: &mut TensorProto, bytes: Vec<u8>) -> Result<()> {
        if bytes.len() >= self.external_threshold {
            self.writer.write_tensor(t, &bytes)?;
        } else {
            t.raw_data = Some(bytes);
        }
        Ok(())
    }
}

/// The lowered groups: their nodes by the index of the MatMul they take the place of, the node indices they
/// remove, and their new initializers.
struct Rewrite {
    lowering: Lowering,
    replaced: HashMap<usize, Vec<NodeProto>>,
    removed: HashSet<usize>,
    new_inits: Vec<TensorProto>,
}

/// Lowers every group to one `MatMulNBits` (and a `Split` for fused siblings).
fn lower_groups(src: &Source, groups: &[Vec<Candidate>], sink: &mut Sink) -> Result<Rewrite> {
    let mut rewrite = Rewrite {
        lowering: Lowering { block_size: sink.block_size, ..Default::default() },
        replaced: HashMap::new(),
        removed: HashSet::new(),
        new_inits: Vec::new(),
    };
    for group in groups {
        let nodes = lower_group(src, group, sink, &mut rewrite.new_inits)?;
        rewrite.replaced.insert(group[0].node, nodes);
        rewrite.removed.extend(group.iter().map(|c| c.node));
        rewrite.removed.extend(group.iter().map(|c| c.dq));
        rewrite.lowering.matmul_nbits += 1;
        rewrite.lowering.matmuls += group.len();
    }
    Ok(rewrite)
}

/// One group's `MatMulNBits` node (and `Split`, for fused siblings), adding their initializers to `new_inits`.
fn lower_group(
    src: &Source,
    group: &[Candidate],
    sink: &mut Sink,
    new_inits: &mut Vec<TensorProto>,
) -> Result<Vec<NodeProto>> {
    let graph = src.graph;
    let (k, block_size) = (group[0].k, sink.block_size);
    let nb = k.div_ceil(block_size);
    let n_total: usize = group.iter().map(|c| c.n).sum();
    let (b, scales) = pack_group(src, group, nb, block_size)?;
    let first = &graph.node[group[0].node];
    let base = first.name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| format!("MatMul_{}", group[0].node));
    let stem = if group.len() == 1 { base.clone() } else { format!("{base}/fused{}", group.len()) };
    let (b_name, s_name) = (format!("{stem}/MatMulNBits.B"), format!("{stem}/MatMulNBits.scales"));
    let mut bt = TensorProto {
        name: Some(b_name.clone()),
        dims: vec![n_total as i64, nb as i64, block_size as i64],
        data_type: Some(DataType::Uint8 as i32),
        ..Default::default()
    };
    let mut st = TensorProto {
        name: Some(s_name.clone()),
        dims: vec![(n_total * nb) as i64],
        data_type: Some(DataType::Float as i32),
        ..Default::default()
    };
    for (t, bytes) in [(&mut bt, b), (&mut st, scales)] {
        sink.store(t, bytes)?;
    }
    new_inits.push(bt);
    new_inits.push(st);
    let single_out = (group.len() == 1).then(|| first.output[0].clone());
    let mm_out = single_out.clone().unwrap_or_else(|| format!("{stem}/MatMulNBits_output_0"));
    let mut nodes = vec![NodeProto {
        name: Some(format!("{stem}/MatMulNBits")),
        op_type: Some("MatMulNBits".into()),
        domain: Some(MS_DOMAIN.into()),
        input: vec![group[0].a.clone(), b_name, s_name],
        output: vec![mm_out.clone()],
        attribute: vec![
            int_attr("K", k as i64),
            int_attr("N", n_total as i64),
            int_attr("bits", 8),
            int_attr("block_size", block_size as i64),
            int_attr("accuracy_level", ACCURACY_LEVEL_INT8),
        ],
        ..Default::default()
    }];
    if single_out.is_none() {
        nodes.push(split_node(graph, group, &stem, mm_out, new_inits));
    }
    Ok(nodes)
}

/// The group's weights in `MatMulNBits` layout: B column by column as `q + 128`, zero-padded to `nb` whole blocks,
/// and each column's scale once per block (little-endian f32).
fn pack_group(src: &Source, group: &[Candidate], nb: usize, block_size: usize) -> Result<(Vec<u8>, Vec<u8>)> {
    let k = group[0].k;
    let n_total: usize = group.iter().map(|c| c.n).sum();
    let mut b = Vec::with_capacity(n_total * nb * block_size);
    let mut scales = Vec::with_capacity(n_total * nb * 4);
    for c in group {
        let dq = &src.graph.node[c.dq];
        let weight = |i: usize| {
            src.init(&dq.input[i]).ok_or_else(|| {
                CalibError::graph(format!("DequantizeLinear input `{}`", dq.input[i]), "is not an initializer")
            })
        };
        let q = src.reader.tensor_bytes(weight(0)?)?;
        let s = src.reader.tensor_f32(weight(1)?)?;
        for col in 0..c.n {
            for row in 0..nb * block_size {
                let v = if row < k { q[row * c.n + col] as i8 } else { 0 };
                b.push((i16::from(v) + 128) as u8);
            }
            for _ in 0..nb {
                scales.extend_from_slice(&s[col].to_le_bytes());
            }
        }
    }
    Ok((b, scales))
}

/// The `Split` of a fused group's `mm_out` back into its MatMuls' outputs, adding its sizes to `new_inits`.
fn split_node(
    graph: &GraphProto,
    group: &[Candidate],
    stem: &str,
    mm_out: String,
    new_inits: &mut Vec<TensorProto>,
) -> NodeProto {
    let sizes = format!("{stem}/split_sizes");
    let sz: Vec<u8> = group.iter().flat_map(|c| (c.n as i64).to_le_bytes()).collect();
    new_inits.push(TensorProto {
        name: Some(sizes.clone()),
        dims: vec![group.len() as i64],
        data_type: Some(DataType::Int64 as i32),
        raw_data: Some(sz),
        ..Default::default()
    });
    NodeProto {
        name: Some(format!("{stem}/Split")),
        op_type: Some("Split".into()),
        input: vec![mm_out, sizes],
        output: group.iter().map(|c| graph.node[c.node].output[0].clone()).collect(),
        attribute: vec![int_attr("axis", -1)],
        ..Default::default()
    }
}

/// Puts each group's lowered nodes where its first MatMul was and drops its other MatMuls and its
/// `DequantizeLinear`s.
fn splice_nodes(graph: &mut GraphProto, mut replaced: HashMap<usize, Vec<NodeProto>>, removed: &HashSet<usize>) {
    let old = std::mem::take(&mut graph.node);
    for (i, node) in old.into_iter().enumerate() {
        if let Some(nodes) = replaced.remove(&i) {
            graph.node.extend(nodes);
        } else if !removed.contains(&i) {
            graph.node.push(node);
        }
    }
}

/// Drops the initializers that no node reads and that are not graph outputs.
fn prune_initializers(graph: &mut GraphProto) {
    let read: HashSet<String> = graph.node.iter().flat_map(|n| n.input.iter().cloned()).collect();
    let outputs: HashSet<String> = graph.output.iter().filter_map(|o| o.name.clone()).collect();
    graph.initializer.retain(|t| t.name.as_ref().is_some_and(|n| read.contains(n) || outputs.contains(n)));
}
