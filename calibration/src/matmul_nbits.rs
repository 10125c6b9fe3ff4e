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
use r1_proto::onnx::{AttributeProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto};
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
    let inits: HashMap<String, usize> =
        graph.initializer.iter().enumerate().filter_map(|(i, t)| t.name.clone().map(|n| (n, i))).collect();
    let producer: HashMap<&str, usize> =
        graph.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i))).collect();
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in graph.node.iter().enumerate() {
        for x in &n.input {
            consumers.entry(x.as_str()).or_default().push(i);
        }
    }
    let graph_outputs: HashSet<&str> = graph.output.iter().filter_map(|o| o.name.as_deref()).collect();

    // Weight-only int8 DequantizeLinear nodes: int8 [K, N] initializer, FLOAT [N] scale initializer, zero point
    // absent or all zero, axis 1, not blocked, read only by MatMuls as their B input.
    let init = |name: &str| inits.get(name).map(|&i| &graph.initializer[i]);
    let mut candidates = Vec::new();
    for (di, dq) in graph.node.iter().enumerate() {
        if op(dq) != "DequantizeLinear" || !is_default_domain(dq) || dq.output.len() != 1 {
            continue;
        }
        if attr_i(dq, "axis") != Some(1) || attr_i(dq, "block_size").is_some_and(|b| b != 0) {
            continue;
        }
        let (Some(w), Some(s)) = (init(&dq.input[0]), dq.input.get(1).and_then(|s| init(s))) else { continue };
        if w.data_type != Some(DataType::Int8 as i32)
            || w.dims.len() != 2
            || s.data_type != Some(DataType::Float as i32)
        {
            continue;
        }
        let (k, n) = (w.dims[0] as usize, w.dims[1] as usize);
        if element_count(s)? != n {
            continue;
        }
        if let Some(z) = dq.input.get(2).filter(|z| !z.is_empty()) {
            let Some(z) = init(z) else { continue };
            if reader.tensor_bytes(z)?.iter().any(|&b| b != 0) {
                continue;
            }
        }
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

    // Group by (input, K) in graph order: one MatMulNBits per group (Split with sizes as an input needs opset 13).
    let can_split = opset >= 13;
    let mut groups: Vec<Vec<Candidate>> = Vec::new();
    candidates.sort_by_key(|c| c.node);
    for c in candidates {
        match groups.iter_mut().find(|g| can_split && g[0].a == c.a && g[0].k == c.k) {
            Some(g) => g.push(c),
            None => groups.push(vec![c]),
        }
    }

    let mut lowering = Lowering { block_size, ..Default::default() };
    let mut replaced: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut removed: HashSet<usize> = HashSet::new();
    let mut new_inits = Vec::new();
    for group in &groups {
        let k = group[0].k;
        let nb = k.div_ceil(block_size);
        let n_total: usize = group.iter().map(|c| c.n).sum();
        let mut b = Vec::with_capacity(n_total * nb * block_size);
        let mut scales = Vec::with_capacity(n_total * nb * 4);
        for c in group {
            let dq = &graph.node[c.dq];
            let weight = |i: usize| {
                init(&dq.input[i]).ok_or_else(|| {
                    CalibError::graph(format!("DequantizeLinear input `{}`", dq.input[i]), "is not an initializer")
                })
            };
            let q = reader.tensor_bytes(weight(0)?)?;
            let s = reader.tensor_f32(weight(1)?)?;
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
            if bytes.len() >= external_threshold {
                writer.write_tensor(t, &bytes)?;
            } else {
                t.raw_data = Some(bytes);
            }
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
            let sizes = format!("{stem}/split_sizes");
            let sz: Vec<u8> = group.iter().flat_map(|c| (c.n as i64).to_le_bytes()).collect();
            new_inits.push(TensorProto {
                name: Some(sizes.clone()),
                dims: vec![group.len() as i64],
                data_type: Some(DataType::Int64 as i32),
                raw_data: Some(sz),
                ..Default::default()
            });
            nodes.push(NodeProto {
                name: Some(format!("{stem}/Split")),
                op_type: Some("Split".into()),
                input: vec![mm_out, sizes],
                output: group.iter().map(|c| graph.node[c.node].output[0].clone()).collect(),
                attribute: vec![int_attr("axis", -1)],
                ..Default::default()
            });
        }
        replaced.insert(group[0].node, nodes);
        removed.extend(group.iter().map(|c| c.node));
        removed.extend(group.iter().map(|c| c.dq));
        lowering.matmul_nbits += 1;
        lowering.matmuls += group.len();
    }

    let old = std::mem::take(&mut graph.node);
    for (i, node) in old.into_iter().enumerate() {
        if let Some(nodes) = replaced.remove(&i) {
            graph.node.extend(nodes);
        } else if !removed.contains(&i) {
            graph.node.push(node);
        }
    }
    let read: HashSet<String> = graph.node.iter().flat_map(|n| n.input.iter().cloned()).collect();
    let outputs: HashSet<String> = graph.output.iter().filter_map(|o| o.name.clone()).collect();
    graph.initializer.retain(|t| t.name.as_ref().is_some_and(|n| read.contains(n) || outputs.contains(n)));
    // Everything that stays moves to the new data file (the source's data file is not next to the lowered model).
    rehome_initializers(&mut graph.initializer, &reader, &mut writer, external_threshold)?;
    graph.initializer.extend(new_inits);
    if lowering.matmul_nbits > 0 && !model.opset_import.iter().any(|o| o.domain.as_deref() == Some(MS_DOMAIN)) {
        model.opset_import.push(OperatorSetIdProto { domain: Some(MS_DOMAIN.into()), version: Some(1) });
    }
    writer.finish()?;
    Ok(lowering)
}
