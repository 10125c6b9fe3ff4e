//! End to end on the trained arith-r1 fixture: `--precision int8` calibrated the way a user would — on prompts only
//! (`fixtures/arith-r1/user_eval/prompts.jsonl`, user turns without answers, which the fp32 model answers first),
//! default MSE ranges + SmoothQuant — `int8-wo` and `int4-wo` (with and without AWQ) exports give the same answers
//! as the fp32 export on the 5 problems of `expected.jsonl`; the int8 artifact carries a quality report and a
//! TensorRT calibration cache in the documented layout; tract refuses what it cannot run, by name.

use std::path::{Path, PathBuf};

use prost::Message;
use r1_calibration::report::QualityReport;
use r1_calibration::trt_cache::CalibrationCache;
use r1_engine::eval::{self, EvalOptions, EvalReport};
use r1_engine::text::{ChatTemplate, Tokenizer};
use r1_engine::{BackendKind, Engine, EngineOptions, Manifest};
use r1_export::quantize::{export_quantized, QuantizeOptions, CACHE_FILE, REPORT_FILE};
use r1_export::target::{apply, Mode, TargetOptions};
use r1_export::{export, ExportOptions, Precision, DEFAULT_OPSET};
use r1_proto::onnx::ModelProto;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/arith-r1")
}

fn answers(art: &Path, kind: BackendKind) -> Result<EvalReport, String> {
    let path = fixture().join("expected.jsonl");
    let problems = eval::load_problems(&path).map_err(|e| e.to_string())?;
    let tokenizer = Tokenizer::from_dir(art).map_err(|e| e.to_string())?;
    let template = ChatTemplate::from_config(tokenizer.config(), None, false).map_err(|e| e.to_string())?;
    let mut engine =
        Engine::load(art, &EngineOptions { backend: kind, ..Default::default() }).map_err(|e| e.to_string())?;
    let opts = EvalOptions { batch: 5, max_new_tokens: 64, ..Default::default() };
    eval::evaluate(&mut engine, &tokenizer, &template, &problems, &opts, &mut |_, _, _| {}).map_err(|e| e.to_string())
}

fn op_count(art: &Path, op: &str) -> usize {
    let m = ModelProto::decode(std::fs::read(art.join("model.onnx")).unwrap().as_slice()).unwrap();
    m.graph.unwrap().node.iter().filter(|n| n.op_type.as_deref() == Some(op)).count()
}

/// The user's prompts: 64 user turns, no answers (56 calibrate, 8 are the report's held-out samples).
fn prompts() -> PathBuf {
    fixture().join("user_eval/prompts.jsonl")
}

fn quantize(out: &Path, precision: Precision, calibrate: bool) -> (Manifest, QualityReport) {
    let mut opts = ExportOptions::new(fixture(), out);
    opts.opset = DEFAULT_OPSET.max(r1_export::quantize::min_opset(precision));
    let mut q = QuantizeOptions::new(precision);
    if calibrate {
        q.calibration_data = Some(prompts());
        q.samples = 56;
    }
    q.backend = BackendKind::Ort;
    let mut passes = 0;
    let r = export_quantized(&opts, &q, &mut |p| {
        if let r1_export::quantize::QuantProgress::Pass { .. } = p {
            passes += 1
        }
    })
    .unwrap_or_else(|e| panic!("--precision {}: {e}", precision.name()));
    let want = match (precision, calibrate) {
        (Precision::Int8, _) => 2,              // SmoothQuant: per-channel maxima, then ranges
        (Precision::Int4WeightOnly, true) => 1, // AWQ: per-channel mean squares
        _ => 0,
    };
    assert_eq!(passes, want, "calibration passes of {}", precision.name());
    r
}

#[test]
fn quantized_exports_answer_like_fp32() {
    let tmp = tempfile::tempdir().unwrap();
    let fp32 = tmp.path().join("fp32");
    export(&ExportOptions::new(fixture(), &fp32), &mut |_| {}).unwrap();
    let want = answers(&fp32, BackendKind::Ort).unwrap();
    assert_eq!(want.correct, 5, "fp32 baseline: {}", want.summary());

    // int8: W8A8 QDQ, calibrated.
    let int8 = tmp.path().join("int8");
    let (manifest, report) = quantize(&int8, Precision::Int8, true);
    assert_eq!(manifest.precision, Precision::Int8);
    assert!(op_count(&int8, "QuantizeLinear") > 0 && op_count(&int8, "DequantizeLinear") > 0);
    let q = manifest.quantization.as_ref().unwrap();
    assert_eq!(q["calibration_samples"], 56, "{q}");
    // Every sample was a prompt: the fp32 model wrote the rest (the think block and the answer, ~28 tokens each).
    let tokens = report.tokens.clone().expect("token sources in the report");
    assert_eq!(tokens.open_samples, 64, "{tokens:?}");
    assert!(tokens.generated > 20 * 64 && tokens.given < tokens.generated, "{tokens:?}");
    assert_eq!(q["calibration_token_sources"]["generated"], tokens.generated as u64, "{q}");
    assert!(q["quantized_matmuls"].as_u64().unwrap() >= 4 * 4, "q/kv/o projections of 4 layers at least: {q}");
    assert!(!q["calibration"]["smoothquant"]["smoothed"].as_array().unwrap().is_empty(), "SmoothQuant folded: {q}");
    // The report: per-layer SQNR and next-token agreement on held-out samples, the same file as in the manifest.
    let on_disk = QualityReport::from_json(&std::fs::read_to_string(int8.join(REPORT_FILE)).unwrap()).unwrap();
    assert_eq!(on_disk, QualityReport::from_json(&report.to_json().unwrap()).unwrap());
    assert!(manifest.files.contains_key(REPORT_FILE) && manifest.files.contains_key(CACHE_FILE));
    assert_eq!(report.layers.len() as u64, q["quantized_matmuls"].as_u64().unwrap());
    let worst = report.worst_layer().unwrap();
    let e2e = report.end_to_end.as_ref().unwrap();
    eprintln!("int8 report: worst layer {worst:?}, {e2e:?}");
    // measured: worst layer 30.4 dB, mean KL 0.012, top-1 99.2% (entropy ranges: 9.4 dB, 0.217, 94.9%)
    assert!(worst.sqnr_db.unwrap() > 20.0, "worst layer {worst:?}");
    assert!(e2e.positions >= 8 * 20 && e2e.top1_agreement > 0.97 && e2e.mean_kl < 0.05, "{e2e:?}");
    // The legacy TensorRT cache: documented header and one `name: hex` line per observed MatMul input.
    let cache_text = std::fs::read_to_string(int8.join(CACHE_FILE)).unwrap();
    assert!(cache_text.starts_with("TRT-100300-EntropyCalibration2\n"), "{cache_text}");
    let cache = CalibrationCache::parse(&cache_text).unwrap();
    assert_eq!(cache.entries.len(), q["calibration"]["amax"].as_object().unwrap().len());
    assert!(cache.entries.iter().all(|(_, s)| s.is_finite() && *s > 0.0));

    let got = answers(&int8, BackendKind::Ort).unwrap();
    for (g, w) in got.results.iter().zip(&want.results) {
        assert_eq!(g.got, w.got, "int8 vs fp32 answer of {:?}: {:?} vs {:?}", g.question, g.completion, w.completion);
    }
    // The LM head is int8 weight-only by default (its input, the last hidden state, stays float); the cpu target
    // lowers it, and only it, to MatMulNBits next to the W8A8 integer GEMMs.
    assert_eq!(q["lm_head"], "weights", "{q}");
    assert_eq!(
        op_count(&int8, "QuantizeLinear") as u64,
        q["quantized_matmuls"].as_u64().unwrap() - 1,
        "no Q on the head's input"
    );
    let targets = TargetOptions { targets: vec!["cpu".into()], ..Default::default() };
    apply(&int8, &targets, Mode::AfterExport, &mut |_, _| {}).unwrap();
    let record = Manifest::load(&int8).unwrap().targets.cpu().and_then(|c| c.lowering.clone()).expect("lowering");
    assert_eq!(
        (record["matmul_nbits"].clone(), record["matmuls"].clone()),
        (serde_json::json!(1), serde_json::json!(1)),
        "{record}"
    );
    let got = answers(&int8, BackendKind::Ort).unwrap();
    for (g, w) in got.results.iter().zip(&want.results) {
        assert_eq!(g.got, w.got, "int8 cpu graph vs fp32 answer of {:?}", g.question);
    }

    // Weight-only forms need no calibration data.
    for precision in [Precision::Int8WeightOnly, Precision::Int4WeightOnly] {
        let dir = tmp.path().join(precision.name());
        let (manifest, _) = quantize(&dir, precision, false);
        assert_eq!(manifest.precision, precision);
        assert_eq!(op_count(&dir, "QuantizeLinear"), 0, "{}: weights only", precision.name());
        assert!(op_count(&dir, "DequantizeLinear") > 0);
        let got = answers(&dir, BackendKind::Ort).unwrap();
        for (g, w) in got.results.iter().zip(&want.results) {
            assert_eq!(g.got, w.got, "{} vs fp32 answer of {:?}", precision.name(), g.question);
        }
    }

    // int4-wo calibrated on the prompts: AWQ scales the norm-fed inputs (folded into the RMSNorm weights) and the
    // answers stay.
    let awq = tmp.path().join("int4-wo-awq");
    let (manifest, report) = quantize(&awq, Precision::Int4WeightOnly, true);
    let q = manifest.quantization.as_ref().unwrap();
    let choices = q["calibration"]["awq"]["choices"].as_array().unwrap();
    assert!(!choices.is_empty(), "{q}");
    assert!(!q["calibration"]["awq"]["folds"]["smoothed"].as_array().unwrap().is_empty(), "some input scaled: {q}");
    assert!(choices.iter().all(|c| c["error_ratio"].as_f64().unwrap() <= 1.0), "{q}");
    assert!(report.method.as_deref().unwrap_or_default().starts_with("awq"), "{:?}", report.method);
    let got = answers(&awq, BackendKind::Ort).unwrap();
    for (g, w) in got.results.iter().zip(&want.results) {
        assert_eq!(g.got, w.got, "int4-wo (AWQ) vs fp32 answer of {:?}", g.question);
    }

    // The cpu target lowers int8-wo to MatMulNBits (256-row blocks, siblings fused behind a Split); ort then runs
    // that graph, with the same answers.
    let int8_wo = tmp.path().join("int8-wo");
    apply(&int8_wo, &targets, Mode::AfterExport, &mut |_, _| {}).unwrap();
    let record = Manifest::load(&int8_wo).unwrap().targets.cpu().and_then(|c| c.lowering.clone()).expect("lowering");
    let (nbits, matmuls) = (record["matmul_nbits"].as_u64().unwrap(), record["matmuls"].as_u64().unwrap());
    assert_eq!(record["block_size"], 256);
    assert_eq!(matmuls as usize, op_count(&int8_wo, "DequantizeLinear"), "every weight-only MatMul is lowered");
    assert!(nbits < matmuls, "siblings fused: {nbits} MatMulNBits for {matmuls} MatMuls");
    let graph = Manifest::load(&int8_wo).unwrap().targets.cpu().unwrap().graph.clone();
    let cpu = ModelProto::decode(std::fs::read(int8_wo.join(graph)).unwrap().as_slice()).unwrap();
    let cpu_ops: Vec<&str> = cpu.graph.as_ref().unwrap().node.iter().filter_map(|n| n.op_type.as_deref()).collect();
    assert_eq!(cpu_ops.iter().filter(|o| **o == "MatMulNBits").count() as u64, nbits);
    assert!(!cpu_ops.contains(&"DequantizeLinear"), "no weight is dequantized at run time");
    let got = answers(&int8_wo, BackendKind::Ort).unwrap();
    for (g, w) in got.results.iter().zip(&want.results) {
        assert_eq!(g.got, w.got, "int8-wo cpu graph vs fp32 answer of {:?}", g.question);
    }
    // tract has no blocked (int4) DequantizeLinear: the error names the precision and the way out.
    let e = answers(&tmp.path().join("int4-wo"), BackendKind::Tract).unwrap_err();
    assert!(e.contains("int4") && e.contains("--backend ort"), "{e}");
}

#[test]
fn int8_without_calibration_data_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("int8");
    let q = QuantizeOptions::new(Precision::Int8);
    let e = export_quantized(&ExportOptions::new(fixture(), &out), &q, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("--calibration-data") && e.contains("int8"), "{e}");
    assert!(!out.exists());
    let mut q = QuantizeOptions::new(Precision::Int4WeightOnly);
    q.block_size = 48;
    let e = export_quantized(&ExportOptions::new(fixture(), &out), &q, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("--opset") && e.contains("21") && e.contains("17"), "{e}");
    let mut opts = ExportOptions::new(fixture(), &out);
    opts.opset = 21;
    let e = export_quantized(&opts, &q, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("--int4-block-size") && e.contains("48"), "{e}");
    assert!(!out.exists() && std::fs::read_dir(tmp.path()).unwrap().next().is_none(), "nothing left behind");
}
