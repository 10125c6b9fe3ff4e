//! `int8-wo` / `int4-wo` without calibration data quantize each MatMul weight as it is read from the checkpoint
//! (no fp32 staging export). The artifact must be the staged export's: every file but `model.onnx` and
//! `model.onnx.data` byte-identical (manifest, report, draft graph, tokenizer), the graph identical once each
//! tensor's data-file offset is set aside, and every initializer's bytes identical. The fixtures cover a dense
//! bf16 checkpoint, biases below the external-data threshold with tied embeddings, the trained arith-r1
//! (DeepseekV3: MLA, routers, experts) and a DeepseekV3 checkpoint with FP8 128×128 blocks and an MTP layer; int8-wo,
//! int4-wo asymmetric and symmetric, and a float LM head.
//!
//! DeepseekV3's routed experts are the one designed difference: the streamed export writes them quantized (3-D codes
//! behind a `DequantizeLinear`, `export/src/quantize/stream.rs`), the staged one keeps them float (and its report
//! says so). They are set aside here after checking that; `tests/tests/quantized_experts.rs` compares them (the
//! `cpu` graph's `QMoE` tensors byte for byte).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message;
use r1_calibration::external::{is_external, ExternalDataReader};
use r1_export::quantize::{export_quantized, min_opset, LmHead, QuantProgress, QuantizeOptions};
use r1_export::{ExportOptions, Precision, DEFAULT_OPSET};
use r1_proto::onnx::tensor_proto::DataType;
use r1_proto::onnx::ModelProto;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Exports `checkpoint` at `precision` into `out`, staged or streamed; asserts which path ran.
fn export(checkpoint: &Path, out: &Path, precision: Precision, tune: &dyn Fn(&mut QuantizeOptions), staged: bool) {
    let mut opts = ExportOptions::new(checkpoint, out);
    opts.opset = DEFAULT_OPSET.max(min_opset(precision));
    let mut q = QuantizeOptions::new(precision);
    tune(&mut q);
    q.staged = staged;
    let mut streamed = false;
    export_quantized(&opts, &q, &mut |p| streamed |= matches!(p, QuantProgress::Streaming))
        .unwrap_or_else(|e| panic!("{} staged={staged}: {e}", checkpoint.display()));
    assert_eq!(streamed, !staged, "{}: the streamed path ran iff not staged", checkpoint.display());
}

fn manifest_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

/// A routed-expert tensor or node (`model.layers.{i}.mlp.experts.{proj}...`).
fn is_expert(name: &str) -> bool {
    name.starts_with("model.layers.") && name.contains(".mlp.experts.")
}

/// The streamed export's quantized expert stacks (or the staged one's float stacks) taken out of `model`, and each
/// MatMul reading the stack's `{w}_dequantized` pointed back at `{w}`.
fn without_experts(model: &mut ModelProto) {
    let g = model.graph.as_mut().unwrap();
    g.initializer.retain(|t| !is_expert(t.name.as_deref().unwrap_or_default()));
    g.node.retain(|n| !(n.op_type.as_deref() == Some("DequantizeLinear") && is_expert(n.name.as_deref().unwrap())));
    for i in g.node.iter_mut().flat_map(|n| n.input.iter_mut()) {
        if let Some(w) = i.strip_suffix("_dequantized").filter(|w| is_expert(w)) {
            *i = w.to_string();
        }
    }
}

/// `v` (a JSON array of strings or of `[node, reason]` pairs) without the entries that name routed experts.
fn drop_experts(v: &mut serde_json::Value) {
    if let Some(a) = v.as_array_mut() {
        a.retain(|x| !x.to_string().contains(".mlp.experts."));
    }
}

fn read_model(dir: &Path) -> ModelProto {
    ModelProto::decode(std::fs::read(dir.join("model.onnx")).unwrap().as_slice()).unwrap()
}

/// The model with every initializer's payload taken out (returned by name) and external offsets set aside.
fn split_model(dir: &Path) -> (ModelProto, BTreeMap<String, Vec<u8>>) {
    let mut model = read_model(dir);
    without_experts(&mut model);
    let reader = ExternalDataReader::new(dir);
    let mut payloads = BTreeMap::new();
    for t in &mut model.graph.as_mut().unwrap().initializer {
        let bytes = reader.tensor_bytes(t).unwrap();
        let name = t.name.clone().unwrap();
        if is_external(t) {
            t.external_data.retain(|e| e.key.as_deref() != Some("offset"));
        }
        assert!(payloads.insert(name.clone(), bytes).is_none(), "duplicate initializer {name}");
    }
    (model, payloads)
}

fn assert_same_artifact(streamed: &Path, staged: &Path, quantized_type: DataType) {
    let (mut a, mut b) = (manifest_json(streamed), manifest_json(staged));
    let stacks = a["quantization"]["quantized_expert_stacks"].as_u64().unwrap();
    assert_eq!(b["quantization"]["quantized_expert_stacks"].as_u64(), Some(0), "the staged export keeps them float");
    let deepseek = a["family"] == "deepseek_v3";
    let opset = a["opset"].as_i64().unwrap();
    // int8 per channel over a 3-D stack needs opset 21's blocked DequantizeLinear; int4-wo is at 21 anyway.
    assert_eq!(stacks > 0, deepseek && opset >= 21, "quantized expert stacks: {stacks}");
    let report = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("calibration/report.json")).unwrap()).unwrap()
    };
    let (mut ra, mut rb) = (report(streamed), report(staged));
    if stacks > 0 {
        // The staged export leaves the experts float and says so; the streamed one does not.
        assert!(!ra["left_float"].to_string().contains("mlp.experts"), "{}", ra["left_float"]);
        assert!(rb["left_float"].to_string().contains("mlp.experts"), "{}", rb["left_float"]);
        for m in [&mut a, &mut b] {
            m["quantization"]["quantized_expert_stacks"] = 0.into();
            drop_experts(&mut m["quantization"]["skipped_matmuls"]);
            assert!(m["files"].as_object_mut().unwrap().remove("calibration/report.json").is_some());
        }
        for r in [&mut ra, &mut rb] {
            drop_experts(&mut r["left_float"]);
        }
    }
    assert_eq!(ra, rb, "reports of {} and {}", streamed.display(), staged.display());
    for m in [&mut a, &mut b] {
        let files = m["files"].as_object_mut().unwrap();
        assert!(files.remove("model.onnx").is_some() && files.remove("model.onnx.data").is_some());
    }
    // Everything else in the manifest (precision, quantization record, the hashes of report.json, mtp.onnx,
    // mtp.onnx.data and the tokenizer files) is the staged export's.
    assert_eq!(a, b, "manifests of {} and {}", streamed.display(), staged.display());
    let ((ma, pa), (mb, pb)) = (split_model(streamed), split_model(staged));
    assert_eq!(pa.keys().collect::<Vec<_>>(), pb.keys().collect::<Vec<_>>(), "initializer names");
    for (name, bytes) in &pa {
        assert!(bytes == &pb[name], "initializer `{name}`: {} bytes differ from the staged export's", bytes.len());
    }
    assert!(ma == mb, "graphs differ beyond data-file offsets");
    let graph = ma.graph.unwrap();
    let codes = |t: &&r1_proto::onnx::TensorProto| {
        t.data_type == Some(quantized_type as i32) && !t.name.as_deref().unwrap().ends_with("_zero_point")
    };
    let quantized = graph.initializer.iter().filter(codes).count();
    assert!(quantized > 0, "no {quantized_type:?} initializer in {}", streamed.display());
    let dq = graph.node.iter().filter(|n| n.op_type.as_deref() == Some("DequantizeLinear")).count();
    assert_eq!(dq, quantized, "one DequantizeLinear per quantized weight");
}

fn check(fixture: &str, precision: Precision, tune: &dyn Fn(&mut QuantizeOptions), quantized_type: DataType) {
    let tmp = tempfile::tempdir().unwrap();
    let checkpoint = fixtures().join(fixture);
    let (streamed, staged) = (tmp.path().join("streamed"), tmp.path().join("staged"));
    export(&checkpoint, &streamed, precision, tune, false);
    export(&checkpoint, &staged, precision, tune, true);
    assert_same_artifact(&streamed, &staged, quantized_type);
    // Nothing but the artifact is left beside it (no staging directory).
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn streamed_int4_equals_staged_on_dense_checkpoints() {
    check("golden/qwen2_gqa2_bf16", Precision::Int4WeightOnly, &|_| {}, DataType::Uint4);
    check("golden/llama_mqa_bias_tied", Precision::Int4WeightOnly, &|q| q.int4_asymmetric = false, DataType::Int4);
    check("golden/llama_mqa_bias_tied", Precision::Int8WeightOnly, &|q| q.lm_head = LmHead::Float, DataType::Int8);
}

#[test]
fn streamed_int8_and_int4_equal_staged_on_deepseek_v3_with_fp8_blocks() {
    check("golden/deepseek_v3_fp8_block", Precision::Int4WeightOnly, &|_| {}, DataType::Uint4);
    check("golden/deepseek_v3_fp8_block", Precision::Int8WeightOnly, &|_| {}, DataType::Int8);
}

#[test]
fn streamed_int4_equals_staged_on_arith_r1() {
    check("arith-r1", Precision::Int4WeightOnly, &|q| q.block_size = 64, DataType::Uint4);
    check("arith-r1", Precision::Int4WeightOnly, &|q| q.int4_asymmetric = false, DataType::Int4);
}
