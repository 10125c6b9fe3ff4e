//! QDQ rewrite of tiny hand-built graphs: structure, and numerics checked with an independent interpreter
//! against a reference built from the crate's quant functions.
mod common;
use common::eval::{run, T};
use common::models::*;
use prost::Message;
use r1_calibration::calibrate::{model_targets, ActivationSink, ActivationSource, Calibrator};
use r1_calibration::external::{ExternalDataReader, ExternalDataWriter, EXTERNAL_ALIGN};
use r1_calibration::observer::CalibrationMethod;
use r1_calibration::qdq::{
    add_observed_outputs, calibration_targets, quantize_model, rewrite_graph, QdqOptions, QuantScheme,
};
use r1_calibration::quant::{quantize_blocked_i4, quantize_blocked_u4, quantize_per_channel, quantize_with_scale};
use r1_calibration::report::sqnr_db;
use r1_calibration::smoothquant::{fold_into_norm, scale_weight_rows, smoothing_factors, weight_row_abs_max};
use r1_proto::onnx::ModelProto;

fn reader() -> ExternalDataReader {
    ExternalDataReader::new(".")
}

fn x() -> T {
    T { shape: vec![M, 64], data: input_x() }
}

fn count(m: &ModelProto, op: &str) -> usize {
    m.graph.as_ref().unwrap().node.iter().filter(|n| n.op_type.as_deref() == Some(op)).count()
}

fn init<'a>(m: &'a ModelProto, name: &str) -> Option<&'a r1_proto::onnx::TensorProto> {
    m.graph.as_ref().unwrap().initializer.iter().find(|t| t.name.as_deref() == Some(name))
}

fn weight(m: &ModelProto, name: &str) -> Vec<f32> {
    reader().tensor_f32(init(m, name).unwrap()).unwrap()
}

fn mm(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; m * n];
    for i in 0..m {
        for c in 0..n {
            let mut acc = 0.0f32;
            for j in 0..k {
                acc += a[i * k + j] * b[j * n + c];
            }
            y[i * n + c] = acc;
        }
    }
    y
}

/// The activation source a real driver gets from the engine, here from the interpreter on a calibration copy.
struct EvalSource {
    model: ModelProto,
    names: Vec<String>,
    batches: Vec<T>,
}

impl ActivationSource for EvalSource {
    fn next_batch(&mut self, sink: &mut ActivationSink<'_>) -> r1_calibration::Result<bool> {
        let Some(b) = self.batches.pop() else { return Ok(false) };
        let vals = run(&self.model, &reader(), &[("x", b)]);
        for n in &self.names {
            sink(n, &vals[n].data)?;
        }
        Ok(true)
    }
}

fn calibrate(model: &ModelProto) -> QdqOptions {
    let mut copy = model.clone();
    let names = calibration_targets(model);
    add_observed_outputs(&mut copy, &names).unwrap();
    let mut src = EvalSource { model: copy, names, batches: vec![x()] };
    let mut cal = Calibrator::new(&model_targets(model)).unwrap();
    assert_eq!(cal.run(&mut src, 8, &mut |_| {}).unwrap(), 1);
    let mut opts = QdqOptions::new(QuantScheme::W8A8);
    opts.activation_scales = cal.scales(CalibrationMethod::Max).unwrap().into_iter().collect();
    opts
}

#[test]
fn w8a8_matmul_chain_structure_and_numerics() {
    let fp = matmul_chain(17);
    assert_eq!(calibration_targets(&fp), vec!["x", "h"]);
    let opts = calibrate(&fp);
    let mut q = fp.clone();
    let summary = rewrite_graph(&mut q, &reader(), &opts).unwrap();
    assert_eq!(summary.quantized.len(), 2);
    assert_eq!(summary.quantized[1].output, "y");
    assert_eq!(count(&q, "QuantizeLinear"), 2);
    assert_eq!(count(&q, "DequantizeLinear"), 4);
    assert_eq!(count(&q, "Add"), 1, "the residual add is untouched");
    let g = q.graph.as_ref().unwrap();
    let add = g.node.iter().find(|n| n.op_type.as_deref() == Some("Add")).unwrap();
    assert_eq!(add.input, vec!["h", "bias"], "no Q/DQ on the residual add");
    let mm1 = g.node.iter().find(|n| n.name.as_deref() == Some("mm1")).unwrap();
    assert_eq!(mm1.input, vec!["x_dequantized_for_mm1", "w1_dequantized"]);
    assert!(init(&q, "w1").is_none() && init(&q, "w2").is_none(), "fp32 weights are dropped");
    let w1q = init(&q, "w1_int8").unwrap();
    assert_eq!((w1q.dims.clone(), w1q.data_type), (vec![64, 96], Some(3)));
    assert_eq!(init(&q, "w1_scale").unwrap().dims, vec![96]);
    let wdq = g.node.iter().find(|n| n.name.as_deref() == Some("w1/DequantizeLinear")).unwrap();
    assert_eq!(wdq.attribute.iter().find(|a| a.name.as_deref() == Some("axis")).unwrap().i, Some(1));
    assert!(init(&q, "x_scale_for_mm1").unwrap().dims.is_empty(), "per-tensor activation scale");

    // numerics: interpreter on the rewritten graph == reference from the quant functions
    let got = run(&q, &reader(), &[("x", x())]);
    let (sx, sh) = (opts.activation_scales["x"], opts.activation_scales["h"]);
    let xq = quantize_with_scale(&input_x(), sx).dequantize();
    let w1 = quantize_per_channel(&weight(&fp, "w1"), 64, 96).unwrap().dequantize();
    let h = mm(&xq, &w1, M, 64, 96);
    let hq = quantize_with_scale(&h, sh).dequantize();
    let w2 = quantize_per_channel(&weight(&fp, "w2"), 96, 40).unwrap().dequantize();
    assert_eq!(got["y"].data, mm(&hq, &w2, M, 96, 40));
    assert_eq!(got["r"].data.len(), M * 96);
    // and close to fp32
    let want = run(&fp, &reader(), &[("x", x())]);
    let db = sqnr_db(&want["y"].data, &got["y"].data).unwrap().unwrap();
    assert!(db > 25.0, "W8A8 SQNR {db:.1} dB");
}

#[test]
fn weight_only_int8_and_int4() {
    let fp = matmul_chain(21);
    let want = run(&fp, &reader(), &[("x", x())]);
    let mut q8 = fp.clone();
    rewrite_graph(&mut q8, &reader(), &QdqOptions::new(QuantScheme::Int8WeightOnly)).unwrap();
    assert_eq!(count(&q8, "QuantizeLinear"), 0);
    assert_eq!(count(&q8, "DequantizeLinear"), 2);
    let got = run(&q8, &reader(), &[("x", x())]);
    let w1 = quantize_per_channel(&weight(&fp, "w1"), 64, 96).unwrap().dequantize();
    assert_eq!(got["h"].data, mm(&input_x(), &w1, M, 64, 96));
    let db8 = sqnr_db(&want["y"].data, &got["y"].data).unwrap().unwrap();

    // int4, block 32 on K = 96 (3 blocks) and K = 64 (2 blocks)
    let mut q4 = fp.clone();
    rewrite_graph(
        &mut q4,
        &reader(),
        &QdqOptions::new(QuantScheme::Int4WeightOnly { block_size: 32, asymmetric: false }),
    )
    .unwrap();
    let t = init(&q4, "w2_int4").unwrap();
    assert_eq!(
        (t.dims.clone(), t.data_type, t.raw_data.as_ref().unwrap().len()),
        (vec![96, 40], Some(22), 96 * 40 / 2)
    );
    assert_eq!(init(&q4, "w2_scale").unwrap().dims, vec![3, 40]);
    let dq = q4.graph.as_ref().unwrap().node.iter().find(|n| n.name.as_deref() == Some("w2/DequantizeLinear")).unwrap();
    let a = |n: &str| dq.attribute.iter().find(|a| a.name.as_deref() == Some(n)).and_then(|a| a.i);
    assert_eq!((a("axis"), a("block_size"), dq.input.len()), (Some(0), Some(32), 2));
    let got4 = run(&q4, &reader(), &[("x", x())]);
    let w2 = quantize_blocked_i4(&weight(&fp, "w2"), 96, 40, 32).unwrap().dequantize();
    assert_eq!(got4["y"].data, mm(&got4["h"].data, &w2, M, 96, 40));
    let db4 = sqnr_db(&want["y"].data, &got4["y"].data).unwrap().unwrap();
    assert!(db8 > 30.0 && db4 > 8.0 && db8 > db4 + 15.0, "int8-wo {db8:.1} dB, int4-wo {db4:.1} dB");

    // int4 needs opset 21
    let mut old = matmul_chain(17);
    let e = rewrite_graph(
        &mut old,
        &reader(),
        &QdqOptions::new(QuantScheme::Int4WeightOnly { block_size: 64, asymmetric: false }),
    )
    .unwrap_err();
    assert!(e.to_string().contains(">= 21") && e.to_string().contains("17"), "{e}");
    let e = rewrite_graph(
        &mut old,
        &reader(),
        &QdqOptions::new(QuantScheme::Int4WeightOnly { block_size: 48, asymmetric: false }),
    )
    .unwrap_err();
    assert!(e.to_string().contains("block_size"), "{e}");
}

#[test]
fn asymmetric_int4_has_uint4_zero_points_and_beats_symmetric() {
    let fp = matmul_chain(21);
    let want = run(&fp, &reader(), &[("x", x())]);
    let rewrite = |asymmetric| {
        let mut q = fp.clone();
        rewrite_graph(&mut q, &reader(), &QdqOptions::new(QuantScheme::Int4WeightOnly { block_size: 32, asymmetric }))
            .unwrap();
        q
    };
    let (sym, asym) = (rewrite(false), rewrite(true));
    let t = init(&asym, "w2_uint4").unwrap();
    assert_eq!(
        (t.dims.clone(), t.data_type, t.raw_data.as_ref().unwrap().len()),
        (vec![96, 40], Some(21), 96 * 40 / 2)
    );
    let zp = init(&asym, "w2_zero_point").unwrap();
    assert_eq!(
        (zp.dims.clone(), zp.data_type, zp.raw_data.as_ref().unwrap().len()),
        (vec![3, 40], Some(21), 3 * 40 / 2)
    );
    let dq =
        asym.graph.as_ref().unwrap().node.iter().find(|n| n.name.as_deref() == Some("w2/DequantizeLinear")).unwrap();
    assert_eq!(dq.input, ["w2_uint4", "w2_scale", "w2_zero_point"]);
    // The interpreter dequantizes from the graph's bytes, the reference from the crate's codes: same weights.
    let got = run(&asym, &reader(), &[("x", x())]);
    let w2 = quantize_blocked_u4(&weight(&fp, "w2"), 96, 40, 32).unwrap().dequantize();
    assert_eq!(got["y"].data, mm(&got["h"].data, &w2, M, 96, 40));
    let db = |m: &ModelProto| sqnr_db(&want["y"].data, &run(m, &reader(), &[("x", x())])["y"].data).unwrap().unwrap();
    let (db_sym, db_asym) = (db(&sym), db(&asym));
    assert!(db_asym > db_sym, "asymmetric {db_asym:.2} dB must beat symmetric {db_sym:.2} dB");
}

#[test]
fn w8a8_weight_only_exception_keeps_its_input_float() {
    // mm2 (the LM head's role): int8 weight, no Q/DQ on its input, and it needs no activation scale.
    let fp = matmul_chain(17);
    let mut opts = calibrate(&fp);
    opts.activation_scales.remove("h");
    opts.weight_only.insert("w2".into());
    let mut q = fp.clone();
    let summary = rewrite_graph(&mut q, &reader(), &opts).unwrap();
    let flags: Vec<_> = summary.quantized.iter().map(|m| (m.node.as_str(), m.activation_quantized)).collect();
    assert_eq!(flags, vec![("mm1", true), ("mm2", false)]);
    assert_eq!((count(&q, "QuantizeLinear"), count(&q, "DequantizeLinear")), (1, 3));
    let g = q.graph.as_ref().unwrap();
    let mm2 = g.node.iter().find(|n| n.name.as_deref() == Some("mm2")).unwrap();
    assert_eq!(mm2.input, vec!["h", "w2_dequantized"], "float input, int8 weight");
    assert!(init(&q, "w2_int8").is_some() && init(&q, "w2").is_none());
    // numerics: W8A8 first MatMul, weight-only second
    let got = run(&q, &reader(), &[("x", x())]);
    let xq = quantize_with_scale(&input_x(), opts.activation_scales["x"]).dequantize();
    let w1 = quantize_per_channel(&weight(&fp, "w1"), 64, 96).unwrap().dequantize();
    let h = mm(&xq, &w1, M, 64, 96);
    let w2 = quantize_per_channel(&weight(&fp, "w2"), 96, 40).unwrap().dequantize();
    assert_eq!(got["y"].data, mm(&h, &w2, M, 96, 40));
    // without the exception the missing scale is an error naming the MatMul and its input
    opts.weight_only.clear();
    let e = rewrite_graph(&mut fp.clone(), &reader(), &opts).unwrap_err().to_string();
    assert!(e.contains("`mm2`") && e.contains("`h`"), "{e}");
}

#[test]
fn exclusions_and_missing_scales() {
    let fp = matmul_chain(17);
    let mut opts = QdqOptions::new(QuantScheme::Int8WeightOnly);
    opts.exclude.insert("mm2".into());
    let mut q = fp.clone();
    let s = rewrite_graph(&mut q, &reader(), &opts).unwrap();
    assert_eq!(s.skipped, vec![("mm2".to_string(), "excluded".to_string())]);
    assert!(init(&q, "w2").is_some() && init(&q, "w1").is_none());
    // a second pass finds only the excluded MatMul: quantized weights are no longer FLOAT initializers
    let again = rewrite_graph(&mut q.clone(), &reader(), &opts).unwrap();
    assert!(again.quantized.is_empty() && again.skipped.len() == 1, "{again:?}");
    // an fp16 weight is reported, not silently ignored
    let mut half = fp.clone();
    let w2 = half.graph.as_mut().unwrap().initializer.iter_mut().find(|t| t.name.as_deref() == Some("w2")).unwrap();
    w2.data_type = Some(10);
    w2.raw_data = Some(vec![0; 96 * 40 * 2]);
    let s = rewrite_graph(&mut half, &reader(), &QdqOptions::new(QuantScheme::Int8WeightOnly)).unwrap();
    assert_eq!(s.quantized.len(), 1);
    assert!(s.skipped[0].0 == "mm2" && s.skipped[0].1.contains("FLOAT16"), "{:?}", s.skipped);
    let mut opts = QdqOptions::new(QuantScheme::W8A8);
    opts.activation_scales.insert("x".into(), 0.1);
    let e = rewrite_graph(&mut fp.clone(), &reader(), &opts).unwrap_err().to_string();
    assert!(e.contains("`mm2`") && e.contains("`h`"), "{e}");
}

#[test]
fn rmsnorm_pattern_with_smoothquant() {
    let fp = rmsnorm_qk(18);
    assert_eq!(calibration_targets(&fp), vec!["normed"], "q and k share one observed input");
    let want = run(&fp, &reader(), &[("x", x())]);

    // SmoothQuant: fold 1/s into gamma and s into wq, wk rows; the fp32 graph must compute the same thing.
    let act: Vec<f32> = {
        let normed = &want["normed"].data;
        (0..64).map(|j| (0..M).map(|i| normed[i * 64 + j].abs()).fold(0.0, f32::max)).collect()
    };
    let (wq, wk) = (weight(&fp, "wq"), weight(&fp, "wk"));
    let s = smoothing_factors(&act, &weight_row_abs_max(&[(&wq, 64), (&wk, 64)], 64).unwrap(), 0.5).unwrap();
    let (mut gamma, mut wq2, mut wk2) = (weight(&fp, "gamma"), wq.clone(), wk.clone());
    fold_into_norm(&mut gamma, &s).unwrap();
    scale_weight_rows(&mut wq2, 64, 64, &s).unwrap();
    scale_weight_rows(&mut wk2, 64, 64, &s).unwrap();
    let mut smooth = fp.clone();
    for t in smooth.graph.as_mut().unwrap().initializer.iter_mut() {
        let v = match t.name.as_deref() {
            Some("gamma") => &gamma,
            Some("wq") => &wq2,
            Some("wk") => &wk2,
            _ => continue,
        };
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        *t = f32_init(t.name.as_deref().unwrap(), &dims, v);
    }
    let got = run(&smooth, &reader(), &[("x", x())]);
    for name in ["out", "kk"] {
        let db = sqnr_db(&want[name].data, &got[name].data).unwrap().map_or(f64::INFINITY, |d| d);
        assert!(db > 100.0, "folded graph differs from the original on {name}: {db:.1} dB");
    }

    // then W8A8 on the smoothed graph: a Q/DQ pair per projection sharing one scale, norm untouched
    let opts = calibrate(&smooth);
    let mut q = smooth.clone();
    rewrite_graph(&mut q, &reader(), &opts).unwrap();
    assert_eq!(count(&q, "QuantizeLinear"), 2, "one Q/DQ pair per consuming projection");
    assert_eq!(count(&q, "DequantizeLinear"), 4);
    let scale_of = |n: &str| reader().tensor_f32(init(&q, n).unwrap()).unwrap();
    assert_eq!(scale_of("normed_scale_for_q_proj"), scale_of("normed_scale_for_k_proj"), "one calibrated scale");
    for op in ["ReduceMean", "Sqrt", "Div"] {
        assert_eq!(count(&q, op), 1);
    }
    let g = q.graph.as_ref().unwrap();
    for n in
        g.node.iter().filter(|n| matches!(n.op_type.as_deref(), Some("Mul" | "Add" | "Div" | "Sqrt" | "ReduceMean")))
    {
        assert!(n.input.iter().all(|i| !i.contains("quantized")), "Q/DQ reached {:?}", n.name);
    }
    let qout = run(&q, &reader(), &[("x", x())]);
    let db = sqnr_db(&want["out"].data, &qout["out"].data).unwrap().unwrap();
    assert!(db > 25.0, "smoothed W8A8 SQNR {db:.1} dB");
}

#[test]
fn external_data_in_and_out() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut fp = matmul_chain(21);
    let mut w = ExternalDataWriter::create(src.path(), "model.onnx.data").unwrap();
    for t in fp.graph.as_mut().unwrap().initializer.iter_mut() {
        let bytes = t.raw_data.clone().unwrap();
        w.write_tensor(t, &bytes).unwrap();
    }
    w.finish().unwrap();
    let want = run(&fp, &ExternalDataReader::new(src.path()), &[("x", x())]);

    let mut q = fp.clone();
    let mut opts = QdqOptions::new(QuantScheme::Int4WeightOnly { block_size: 64, asymmetric: false });
    opts.external_threshold = 256;
    // refusing to overwrite the source's own data file
    let e = quantize_model(&mut q.clone(), src.path(), src.path(), "model.onnx.data", &opts).unwrap_err().to_string();
    assert!(e.contains("model.onnx.data") && e.contains("source model"), "{e}");
    assert!(ExternalDataReader::new(src.path()).tensor_f32(init(&fp, "w1").unwrap()).is_ok(), "source data intact");
    quantize_model(&mut q, src.path(), out.path(), "model.int4.onnx.data", &opts).unwrap();
    // serialize and reload, as the exporter will
    let q = ModelProto::decode(q.encode_to_vec().as_slice()).unwrap();
    let g = q.graph.as_ref().unwrap();
    for t in &g.initializer {
        let size = t.raw_data.as_ref().map_or(0, |r| r.len());
        if t.data_location == Some(1) {
            let kv =
                |k: &str| t.external_data.iter().find(|e| e.key.as_deref() == Some(k)).unwrap().value.clone().unwrap();
            assert_eq!(kv("location"), "model.int4.onnx.data");
            assert_eq!(kv("offset").parse::<u64>().unwrap() % EXTERNAL_ALIGN, 0);
        } else {
            assert!(size < 256, "{:?} ({size} bytes) should be external", t.name);
        }
    }
    assert!(g.initializer.iter().any(|t| t.name.as_deref() == Some("w1_int4") && t.data_location == Some(1)));
    let got = run(&q, &ExternalDataReader::new(out.path()), &[("x", x())]);
    let w1 = quantize_blocked_i4(&weight_from(&fp, "w1", src.path()), 64, 96, 64).unwrap().dequantize();
    assert_eq!(got["h"].data, mm(&input_x(), &w1, M, 64, 96));
    assert!(sqnr_db(&want["y"].data, &got["y"].data).unwrap().unwrap() > 8.0);
    // the bias (384 bytes, untouched) moved into the new file too
    assert!(init(&q, "bias").unwrap().data_location == Some(1));
}

fn weight_from(m: &ModelProto, name: &str, dir: &std::path::Path) -> Vec<f32> {
    ExternalDataReader::new(dir).tensor_f32(init(m, name).unwrap()).unwrap()
}

#[test]
fn smoothquant_on_the_graph() {
    use r1_calibration::smooth_graph::apply_smoothquant;
    use std::collections::HashMap;
    let fp = rmsnorm_qk(18);
    let want = run(&fp, &reader(), &[("x", x())]);
    let normed = &want["normed"].data;
    let act: Vec<f32> = (0..64).map(|j| (0..M).map(|i| normed[i * 64 + j].abs()).fold(0.0, f32::max)).collect();
    let ch: HashMap<String, Vec<f32>> = [("normed".to_string(), act)].into_iter().collect();

    let mut off = fp.clone();
    assert!(apply_smoothquant(&mut off, &reader(), &ch, 0.0).unwrap().smoothed.is_empty());
    assert_eq!(off, fp, "alpha 0 changes nothing");

    let mut sm = fp.clone();
    let s = apply_smoothquant(&mut sm, &reader(), &ch, 0.5).unwrap();
    assert_eq!(s.smoothed.len(), 1);
    assert_eq!(
        (s.smoothed[0].norm_weight.as_str(), s.smoothed[0].weights.clone()),
        ("gamma", vec!["wq".to_string(), "wk".to_string()])
    );
    assert!(s.smoothed[0].factor_range.1 > 2.0 * s.smoothed[0].factor_range.0, "outlier channels get larger factors");
    assert_ne!(weight(&sm, "gamma"), weight(&fp, "gamma"));
    let got = run(&sm, &reader(), &[("x", x())]);
    for name in ["out", "kk"] {
        let db = sqnr_db(&want[name].data, &got[name].data).unwrap().unwrap_or(f64::INFINITY);
        assert!(db > 100.0, "smoothed graph differs on {name}: {db:.1} dB");
    }
    // the smoothed activation's range shrank
    let amax = |v: &[f32]| v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(amax(&got["normed"].data) < amax(&want["normed"].data));

    // chain: `x` has no producer, `h` is also read by the residual Add
    let mut chain = matmul_chain(17);
    let ch: HashMap<String, Vec<f32>> =
        [("x".to_string(), vec![1.0; 64]), ("h".to_string(), vec![1.0; 96])].into_iter().collect();
    let s = apply_smoothquant(&mut chain, &reader(), &ch, 0.5).unwrap();
    assert!(s.smoothed.is_empty());
    assert!(s.skipped[0].1.contains("not produced by"), "{:?}", s.skipped);
    assert!(s.skipped[1].1.contains("Add node `residual`"), "{:?}", s.skipped);
    assert!(apply_smoothquant(&mut chain, &reader(), &ch, 2.0).is_err());
}

#[test]
fn w8a8_driver_with_smoothquant() {
    use r1_calibration::calibrate::{calibrate_w8a8, W8A8Config};
    let fp = rmsnorm_qk(18);
    let want = run(&fp, &reader(), &[("x", x())]);
    let mut quantized = Vec::new();
    for alpha in [0.0, 0.5] {
        let mut m = fp.clone();
        let mut built = Vec::new();
        let mut factory = |copy: &ModelProto| -> r1_calibration::Result<Box<dyn ActivationSource>> {
            built.push(copy.graph.as_ref().unwrap().output.len());
            Ok(Box::new(EvalSource { model: copy.clone(), names: calibration_targets(copy), batches: vec![x(), x()] }))
        };
        let cfg = W8A8Config { method: CalibrationMethod::Max, alpha, max_batches: 8 };
        let cal = calibrate_w8a8(&mut m, &reader(), &mut factory, cfg, None, &mut |_| {}).unwrap();
        assert_eq!(
            built,
            if alpha > 0.0 { vec![3, 3] } else { vec![3] },
            "one pass per model copy, `normed` added as output"
        );
        assert_eq!(cal.batches, 2);
        assert_eq!(cal.smooth.smoothed.len(), usize::from(alpha > 0.0));
        let mut opts = QdqOptions::new(QuantScheme::W8A8);
        opts.activation_scales = cal.scales.into_iter().collect();
        rewrite_graph(&mut m, &reader(), &opts).unwrap();
        let got = run(&m, &reader(), &[("x", x())]);
        quantized.push(sqnr_db(&want["kk"].data, &got["kk"].data).unwrap().unwrap());
    }
    eprintln!("W8A8 SQNR of `kk` without / with SmoothQuant (alpha .5): {quantized:?} dB");
    // outlier channels in `x` survive the norm; smoothing moves them into the weights (33.7 -> 38.0 dB here)
    assert!(quantized[1] > quantized[0] + 2.0, "SQNR without / with SmoothQuant: {quantized:?}");
    assert!(quantized.iter().all(|&db| db > 25.0), "{quantized:?}");
}
