//! The CPU lowering of int8-wo graphs to `com.microsoft.MatMulNBits`: structure, and numerics through the test
//! interpreter (which implements MatMulNBits from its spec, independently of the lowering): the lowered graph
//! computes exactly what the portable int8-wo graph computes.
mod common;
use common::eval::{run, T};
use common::models::*;
use r1_calibration::external::ExternalDataReader;
use r1_calibration::matmul_nbits::{lower_int8_weight_only, Lowering, MS_DOMAIN};
use r1_calibration::qdq::{rewrite_graph, QdqOptions, QuantScheme};
use r1_proto::onnx::ModelProto;
use std::collections::HashMap;

fn ops(m: &ModelProto) -> Vec<String> {
    m.graph.as_ref().unwrap().node.iter().map(|n| n.op_type.clone().unwrap_or_default()).collect()
}

fn int8_wo(fp: &ModelProto) -> ModelProto {
    let mut q = fp.clone();
    rewrite_graph(&mut q, &ExternalDataReader::new("."), &QdqOptions::new(QuantScheme::Int8WeightOnly)).unwrap();
    q
}

/// Lowers `m` into a temporary directory; returns the lowered model, what was done and every value it computes on
/// `x`, next to every value the unlowered model computes.
fn lower(m: &ModelProto, x: T, block: usize) -> (ModelProto, Lowering, HashMap<String, T>, HashMap<String, T>) {
    let out = tempfile::tempdir().unwrap();
    let mut lowered = m.clone();
    let l = lower_int8_weight_only(&mut lowered, std::path::Path::new("."), out.path(), "lowered.data", block, 1024)
        .unwrap();
    let got = run(&lowered, &ExternalDataReader::new(out.path()), &[("x", x.clone())]);
    let want = run(m, &ExternalDataReader::new("."), &[("x", x)]);
    (lowered, l, got, want)
}

fn attr(m: &ModelProto, op: &str, name: &str) -> Vec<i64> {
    let g = m.graph.as_ref().unwrap();
    g.node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some(op))
        .filter_map(|n| n.attribute.iter().find(|a| a.name.as_deref() == Some(name)).and_then(|a| a.i))
        .collect()
}

#[test]
fn siblings_reading_one_input_become_one_matmul_nbits_and_a_split() {
    // q_proj and k_proj both read the normed input: one MatMulNBits with N = 64 + 64, then a Split.
    let q = int8_wo(&rmsnorm_qk(17));
    let x = T { shape: vec![M, 64], data: input_x() };
    let (lowered, l, got, want) = lower(&q, x, 256);
    assert_eq!(l, Lowering { matmul_nbits: 1, matmuls: 2, block_size: 256 });
    let o = ops(&lowered);
    assert_eq!(o.iter().filter(|o| *o == "MatMulNBits").count(), 1);
    assert_eq!(o.iter().filter(|o| *o == "Split").count(), 1);
    assert!(!o.iter().any(|o| o == "DequantizeLinear" || o == "MatMul"), "{o:?}");
    assert_eq!((attr(&lowered, "MatMulNBits", "N"), attr(&lowered, "MatMulNBits", "K")), (vec![128], vec![64]));
    assert_eq!(attr(&lowered, "MatMulNBits", "accuracy_level"), vec![4]);
    assert!(lowered.opset_import.iter().any(|o| o.domain.as_deref() == Some(MS_DOMAIN)));
    let g = lowered.graph.as_ref().unwrap();
    let b = g.initializer.iter().find(|t| t.name.as_deref().is_some_and(|n| n.ends_with("MatMulNBits.B"))).unwrap();
    assert_eq!(b.dims, vec![128, 1, 256], "K = 64 padded to one 256-row block");
    assert!(
        !g.initializer.iter().any(|t| t.name.as_deref().is_some_and(|n| n.ends_with("_int8"))),
        "int8 weights dropped"
    );
    for name in ["q", "kk", "out"] {
        assert_eq!(got[name], want[name], "{name}");
    }
}

#[test]
fn separate_inputs_stay_separate_and_padding_is_exact() {
    // mm1 reads x (K = 64), mm2 reads h (K = 96): two MatMulNBits, no Split; with 64-row blocks K = 96 is one full
    // block and one half block padded with zeros.
    let q = int8_wo(&matmul_chain(17));
    let x = T { shape: vec![M, 64], data: input_x() };
    let (lowered, l, got, want) = lower(&q, x, 64);
    assert_eq!(l, Lowering { matmul_nbits: 2, matmuls: 2, block_size: 64 });
    assert!(!ops(&lowered).contains(&"Split".to_string()));
    assert_eq!(attr(&lowered, "MatMulNBits", "K"), vec![64, 96]);
    for name in ["h", "y", "r"] {
        assert_eq!(got[name], want[name], "{name}");
    }
}

#[test]
fn w8a8_and_fp32_matmuls_are_left_alone_and_bad_block_sizes_are_refused() {
    let fp = matmul_chain(17);
    let x = T { shape: vec![M, 64], data: input_x() };
    let (lowered, l, got, want) = lower(&fp, x.clone(), 256);
    assert_eq!((l.matmul_nbits, l.matmuls), (0, 0));
    assert_eq!(ops(&lowered), ops(&fp));
    assert_eq!(got["y"], want["y"]);
    // W8A8: the MatMul's input is a DequantizeLinear output, so the weight is not weight-only.
    let mut w8a8 = fp.clone();
    let mut opts = QdqOptions::new(QuantScheme::W8A8);
    opts.activation_scales = [("x", 0.05f32), ("h", 0.5)].into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    rewrite_graph(&mut w8a8, &ExternalDataReader::new("."), &opts).unwrap();
    let (lowered, l, _, _) = lower(&w8a8, x.clone(), 256);
    assert_eq!((l.matmul_nbits, ops(&lowered)), (0, ops(&w8a8)));
    // ... except a weight-only MatMul inside a W8A8 graph (r1-export's default LM head): only that one is lowered.
    let mut head_wo = fp.clone();
    opts.weight_only.insert("w2".into());
    rewrite_graph(&mut head_wo, &ExternalDataReader::new("."), &opts).unwrap();
    let (lowered, l, got, want) = lower(&head_wo, x, 256);
    assert_eq!((l.matmul_nbits, l.matmuls), (1, 1));
    let o = ops(&lowered);
    assert_eq!(o.iter().filter(|o| *o == "MatMulNBits").count(), 1);
    assert_eq!(o.iter().filter(|o| *o == "MatMul").count(), 1, "the W8A8 MatMul stays: {o:?}");
    assert_eq!(o.iter().filter(|o| *o == "QuantizeLinear").count(), 1, "{o:?}");
    assert_eq!(attr(&lowered, "MatMulNBits", "K"), vec![96]);
    assert_eq!(got["y"], want["y"]);
    let out = tempfile::tempdir().unwrap();
    let e =
        lower_int8_weight_only(&mut int8_wo(&fp), std::path::Path::new("."), out.path(), "d", 48, 1024).unwrap_err();
    assert!(e.to_string().contains("block_size") && e.to_string().contains("48"), "{e}");
}
