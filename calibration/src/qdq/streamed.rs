//! The QDQ rewrite of a graph whose weights were quantized as they were made (a streamed export: `r1-export`
//! quantizes each MatMul weight as it reads it from the checkpoint, and never writes an fp32 copy).
//!
//! The graph handed over is the fp32 graph, except that each weight quantized on the way is a placeholder
//! initializer (its name, FLOAT type and dims, no data). [`rewrite_prequantized`] selects the MatMuls exactly as
//! [`super::quantize_model`] does on the fp32 graph, checks that the weights quantized on the way are exactly
//! their weights, and wires each weight's `DequantizeLinear` in the same place, with the same names and the same
//! initializer order. Only where the bytes sit in the data file differs: a streamed export writes each
//! initializer as it is made.
use super::{
    dequantized_weight, rewrite_nodes, select_targets, skipped_non_float, take_sources, QdqOptions, QuantScheme,
    RewriteSummary,
};
use crate::error::{CalibError, Result};
use r1_proto::onnx::{ModelProto, NodeProto, TensorProto};
use std::collections::{HashMap, HashSet};

/// One weight quantized before its graph was rewritten: its new initializers, in the rewrite's order (codes,
/// scales, zero points; each inline or already pointing at a data file) and the `DequantizeLinear` that reads it
/// back as `{w}_dequantized`.
#[derive(Debug, Clone)]
pub struct QuantizedWeight {
    /// Rows (`K`) of the weight.
    pub k: usize,
    /// Columns (`N`) of the weight.
    pub n: usize,
    /// The new initializers.
    pub initializers: Vec<TensorProto>,
    /// The node that dequantizes them.
    pub dequantize: NodeProto,
}

/// Quantizes weight `w` (`values`, `[k, n]` row-major) per `scheme`, as the rewrite of [`super::quantize_model`]
/// does: the same codes, scales, zero points and names.
pub fn quantize_weight(w: &str, values: &[f32], k: usize, n: usize, scheme: QuantScheme) -> Result<QuantizedWeight> {
    if values.len() != k * n {
        return Err(CalibError::invalid(
            format!("values of weight `{w}`"),
            format!("{k} × {n} = {}", k * n),
            values.len(),
        ));
    }
    let mut initializers = Vec::new();
    let dequantize = dequantized_weight(w, values, k, n, scheme, &mut initializers)?;
    Ok(QuantizedWeight { k, n, initializers, dequantize })
}

/// Rewrites `model` (the fp32 graph with a placeholder for each of `weights`) as [`super::rewrite_graph`] rewrites
/// the fp32 graph, taking each weight's quantized form from `weights` instead of quantizing it. `store` receives
/// each initializer that stays inline so far (the caller moves the large ones to its data file, as
/// [`super::quantize_model`] does). Weight-only schemes only: W8A8 needs calibrated activation scales.
///
/// An error names the weight when the weights quantized on the way are not exactly the weights the rewrite
/// selects (one excluded or read as something other than a MatMul's `B`, or one not quantized), so a streamed
/// export never differs silently from a staged one.
pub fn rewrite_prequantized(
    model: &mut ModelProto,
    mut weights: HashMap<String, QuantizedWeight>,
    opts: &QdqOptions,
    store: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<RewriteSummary> {
    if opts.scheme == QuantScheme::W8A8 {
        return Err(CalibError::invalid(
            "scheme of a rewrite with weights quantized on the way",
            "Int8WeightOnly or Int4WeightOnly (W8A8 needs calibrated activation scales)",
            format!("{:?}", opts.scheme),
        ));
    }
    super::check_scheme(model, opts)?;
    let graph = model.graph.as_mut().ok_or_else(|| CalibError::graph("model", "has no graph"))?;
    let mut summary = RewriteSummary::default();
    skipped_non_float(graph, &mut summary);
    let targets = select_targets(graph, opts, &mut summary)?;
    let selected: HashSet<&str> = targets.values().map(|t| t.w.as_str()).collect();
    let mut extra: Vec<&String> = weights.keys().filter(|w| !selected.contains(w.as_str())).collect();
    extra.sort();
    if let Some(w) = extra.first() {
        return Err(CalibError::graph(
            format!("weight `{w}`"),
            format!(
                "was quantized as it was read, but the rewrite leaves it float (excluded, or not the weight input of \
                 a MatMul); {} such weight(s)",
                extra.len()
            ),
        ));
    }
    let mut missing: Vec<&str> = selected.iter().copied().filter(|w| !weights.contains_key(*w)).collect();
    missing.sort();
    if let Some(w) = missing.first() {
        return Err(CalibError::graph(
            format!("MatMul weight `{w}`"),
            format!(
                "is selected by the rewrite but was not quantized as it was read; {} such weight(s)",
                missing.len()
            ),
        ));
    }
    let sources = take_sources(graph, &targets);
    // A weight another node still reads keeps its fp32 copy in a staged rewrite; a placeholder has no data.
    if let Some(t) = graph.initializer.iter().find(|t| t.name.as_deref().is_some_and(|n| weights.contains_key(n))) {
        return Err(CalibError::graph(
            format!("weight `{}`", t.name.as_deref().unwrap_or_default()),
            "is read by a node other than its MatMuls, so its fp32 values are needed too; they were not kept",
        ));
    }
    for t in &mut graph.initializer {
        store(t)?;
    }
    let mut quantize = |w: &str, _: &TensorProto, k: usize, n: usize, new_inits: &mut Vec<TensorProto>| {
        let q = weights.remove(w).ok_or_else(|| CalibError::graph(format!("weight `{w}`"), "quantized twice"))?;
        if (q.k, q.n) != (k, n) {
            return Err(CalibError::graph(
                format!("weight `{w}`"),
                format!("was quantized as [{}, {}] but the graph has it as [{k}, {n}]", q.k, q.n),
            ));
        }
        new_inits.extend(q.initializers);
        Ok(q.dequantize)
    };
    // The new initializers were stored as they were made: what is still inline is small.
    let new_inits = rewrite_nodes(graph, &targets, &sources, &mut quantize, opts, &mut |_| Ok(()), &mut summary)?;
    graph.initializer.extend(new_inits);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::external::ExternalDataReader;
    use r1_proto::onnx::tensor_proto::DataType;
    use r1_proto::onnx::{GraphProto, OperatorSetIdProto};

    fn matmul(name: &str, a: &str, w: &str) -> NodeProto {
        NodeProto {
            name: Some(name.into()),
            op_type: Some("MatMul".into()),
            input: vec![a.into(), w.into()],
            output: vec![format!("{name}_out")],
            ..Default::default()
        }
    }

    fn weight(name: &str, k: usize, n: usize, values: Option<&[f32]>) -> TensorProto {
        TensorProto {
            name: Some(name.into()),
            dims: vec![k as i64, n as i64],
            data_type: Some(DataType::Float as i32),
            raw_data: values.map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            ..Default::default()
        }
    }

    /// Two MatMuls on `w1` (one weight read twice), one on `w2`, and `emb` read by a Gather only.
    fn model(values: Option<&[f32]>) -> ModelProto {
        let gather = NodeProto {
            name: Some("gather".into()),
            op_type: Some("Gather".into()),
            input: vec!["emb".into(), "ids".into()],
            output: vec!["x".into()],
            ..Default::default()
        };
        ModelProto {
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(21) }],
            graph: Some(GraphProto {
                node: vec![gather, matmul("m1", "x", "w1"), matmul("m2", "m1_out", "w2"), matmul("m3", "x", "w1")],
                initializer: vec![
                    weight("emb", 64, 8, values),
                    weight("w1", 64, 8, values),
                    weight("w2", 64, 8, values),
                ],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn values() -> Vec<f32> {
        (0..64 * 8).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect()
    }

    fn prequantized(names: &[&str], scheme: QuantScheme) -> HashMap<String, QuantizedWeight> {
        names.iter().map(|w| (w.to_string(), quantize_weight(w, &values(), 64, 8, scheme).unwrap())).collect()
    }

    #[test]
    fn prequantized_weights_give_the_staged_rewrite() {
        for scheme in [QuantScheme::Int8WeightOnly, QuantScheme::Int4WeightOnly { block_size: 32, asymmetric: true }] {
            let opts = QdqOptions::new(scheme);
            let mut staged = model(Some(&values()));
            let want = super::super::rewrite_graph(&mut staged, &ExternalDataReader::new("."), &opts).unwrap();
            let mut streamed = model(None);
            // The Gather's table is the one real initializer left in the streamed graph.
            streamed.graph.as_mut().unwrap().initializer[0] = weight("emb", 64, 8, Some(&values()));
            let got = rewrite_prequantized(&mut streamed, prequantized(&["w1", "w2"], scheme), &opts, &mut |_| Ok(()))
                .unwrap();
            assert_eq!(got, want, "{scheme:?}");
            assert_eq!(streamed, staged, "{scheme:?}");
        }
    }

    #[test]
    fn a_weight_the_rewrite_treats_differently_is_named() {
        let scheme = QuantScheme::Int8WeightOnly;
        let opts = QdqOptions::new(scheme);
        let err = |weights| rewrite_prequantized(&mut model(None), weights, &opts, &mut |_| Ok(())).unwrap_err();
        let e = err(prequantized(&["w1"], scheme)).to_string();
        assert!(e.contains("`w2`") && e.contains("was not quantized as it was read"), "{e}");
        let e = err(prequantized(&["w1", "w2", "emb"], scheme)).to_string();
        assert!(e.contains("`emb`") && e.contains("leaves it float"), "{e}");
        let mut excluded = opts.clone();
        excluded.exclude.insert("w2".into());
        let e = rewrite_prequantized(&mut model(None), prequantized(&["w1", "w2"], scheme), &excluded, &mut |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`w2`") && e.contains("leaves it float"), "{e}");
        let w8a8 = QdqOptions::new(QuantScheme::W8A8);
        let e = rewrite_prequantized(&mut model(None), HashMap::new(), &w8a8, &mut |_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("W8A8"), "{e}");
    }
}
