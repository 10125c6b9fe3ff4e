//! Quantized routed experts in DeepseekV3's `--target cpu` serving graph (`export/src/onnx/sparse_moe/quantized.rs`):
//! `int8-wo` and `int4-wo` artifacts run each MoE layer's experts as one `com.microsoft.QMoE` (uint8 codes).
//!
//! - The graph holds one `QMoE` per MoE layer, no `MoE` and no float expert stack; the manifest records the form;
//!   the expert bytes are the codes of the padded matrices plus their scales (≈ 1/4 and 1/8 of fp32 before them).
//! - Through the engine, on every DeepseekV3 golden case, the logits' error against transformers' stays within a
//!   margin of the same artifact's with float experts (`--cpu-float-experts`), and `int8-wo`'s greedy tokens move
//!   nowhere the float experts' do not.
//! - On the trained arith-r1, the quantized experts answer held-out problems with the fp32 graph's tokens
//!   (`int8-wo`) or nearly (`int4-wo`, and `int8` W8A8, whose `cpu` graph quantizes the experts to int8 too).
//! - A streamed `int8-wo` / `int4-wo` export (no calibration data, opset 21) writes the experts quantized into the
//!   portable graph (3-D codes behind a blocked `DequantizeLinear`, no float stack; bytes counted exactly), its
//!   logits stay within the margin of the staged export's (float experts), and the `cpu` graph built from it holds
//!   the same `QMoE` tensors, byte for byte, as the one built from the staged export's float stacks.

use std::path::{Path, PathBuf};

use prost::Message;
use r1_calibration::external::ExternalDataReader;
use r1_engine::backend::{BackendOptions, ExecutionProviderKind};
use r1_engine::eval::{self, EvalOptions};
use r1_engine::manifest::Manifest;
use r1_engine::text::{ChatTemplate, Tokenizer};
use r1_engine::{BackendKind, Engine, EngineOptions};
use r1_export::quantize::{export_quantized, min_opset, QuantizeOptions};
use r1_export::target::{self, Mode, TargetOptions};
use r1_export::{ExportOptions, Precision};
use r1_proto::onnx::{ModelProto, TensorProto};
use r1_tests::{drive_engine, export_case, golden_cases, golden_meta, Golden};

const QUANTIZED: [Precision; 2] = [Precision::Int8WeightOnly, Precision::Int4WeightOnly];

fn deepseek_cases() -> Vec<PathBuf> {
    let cases: Vec<PathBuf> =
        golden_cases().into_iter().filter(|c| golden_meta(c).unwrap()["family"] == "deepseek_v3").collect();
    assert!(cases.len() >= 4, "expected the DeepseekV3 golden cases (3 + release_deepseek_r1), found {cases:?}");
    cases
}

/// Exports `checkpoint` at `precision` (quantized without calibration data, as `r1-export --precision P` does)
/// into `out`, builds its `cpu` target and returns the manifest.
fn export_for_cpu(checkpoint: &Path, out: &Path, precision: Precision) -> Manifest {
    if precision == Precision::Fp32 {
        export_case(checkpoint, out, precision).unwrap();
    } else {
        let mut opts = ExportOptions::new(checkpoint, out);
        opts.opset = opts.opset.max(min_opset(precision));
        let mut q = QuantizeOptions::new(precision);
        if precision == Precision::Int8 {
            // W8A8 needs activation ranges: a few of arith-r1's own conversations, no generation, no report.
            q.calibration_data = Some(checkpoint.join("calibration.jsonl"));
            (q.samples, q.eval_samples, q.generate_tokens) = (8, 0, 0);
        }
        export_quantized(&opts, &q, &mut |_| {}).unwrap();
    }
    let opts = TargetOptions { targets: vec!["cpu".into()], ..Default::default() };
    target::apply(out, &opts, Mode::AfterExport, &mut |_, _| {}).unwrap();
    Manifest::load(out).unwrap()
}

fn engine(out: &Path) -> Engine {
    let backend_options = BackendOptions { execution_provider: ExecutionProviderKind::Cpu, ..Default::default() };
    Engine::load(out, &EngineOptions { backend: BackendKind::Ort, backend_options, ..Default::default() }).unwrap()
}

fn config(m: &Manifest, key: &str) -> usize {
    m.config[key].as_u64().unwrap_or_else(|| panic!("config.{key}")) as usize
}

/// Bytes of an initializer's payload (external `length`, or inline raw data).
fn payload_bytes(t: &TensorProto) -> u64 {
    match t.external_data.iter().find(|e| e.key() == "length") {
        Some(e) => e.value().parse().unwrap(),
        None => t.raw_data().len() as u64,
    }
}

#[test]
fn quantized_serving_graph_holds_one_qmoe_per_layer_and_no_float_expert_stack() {
    let tmp = tempfile::tempdir().unwrap();
    for case in deepseek_cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        for precision in QUANTIZED {
            let label = format!("{name} {}", precision.name());
            let out = tmp.path().join(format!("{name}-{}", precision.name()));
            let m = export_for_cpu(&case, &out, precision);
            let cpu = m.targets.cpu().unwrap();
            assert!(cpu.sparse_experts, "{label}: {cpu:?}");
            let q = cpu.expert_quantization.as_ref().unwrap_or_else(|| panic!("{label}: no expert_quantization"));
            let bits = if precision == Precision::Int8WeightOnly { 8 } else { 4 };
            assert_eq!((q["op"].as_str(), q["bits"].as_u64()), (Some("com.microsoft.QMoE"), Some(bits)), "{label}");
            // int4-wo keeps its artifact's asymmetric default; int8 is symmetric per channel like the 2-D weights.
            assert_eq!(q["asymmetric"].as_bool(), Some(bits == 4), "{label}: {q}");
            let path = out.join(m.targets.cpu_graph(&out).unwrap());
            let model = ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
            let g = model.graph.as_ref().unwrap();
            let (experts, k) = (config(&m, "n_routed_experts"), config(&m, "num_experts_per_tok"));
            let (h, inter) = (config(&m, "hidden_size"), config(&m, "moe_intermediate_size"));
            let moe_layers = config(&m, "num_hidden_layers") - config(&m, "first_k_dense_replace");
            let qmoe: Vec<_> =
                g.node.iter().filter(|n| n.op_type() == "QMoE" && n.domain() == "com.microsoft").collect();
            assert_eq!(qmoe.len(), moe_layers, "{label}: one QMoE per MoE layer");
            assert!(!g.node.iter().any(|n| n.op_type() == "MoE"), "{label}: a float MoE is left");
            let (hp, ip) =
                (q["padded_hidden"].as_u64().unwrap() as usize, q["padded_intermediate"].as_u64().unwrap() as usize);
            let block = q["block_size"].as_u64().unwrap() as usize;
            assert!(hp >= h && ip >= inter && hp % block == 0 && ip % block == 0 && block >= 16, "{label}: {q}");
            for n in &qmoe {
                let attr = |a: &str| n.attribute.iter().find(|x| x.name() == a).unwrap_or_else(|| panic!("{a}")).i();
                assert_eq!(
                    (attr("k"), attr("expert_weight_bits"), attr("block_size")),
                    (k as i64, bits as i64, block as i64)
                );
                assert_eq!(attr("normalize_routing_weights"), 0, "{label}: router_weights mix as they are");
                assert_eq!(n.input[1], n.input[14], "{label}: the router's weights select and mix");
            }
            // No float tensor with the experts as its first dimension is left but the scales: neither the portable
            // stacks nor a relaid fc1 / fc2.
            for t in g.initializer.iter().filter(|t| !t.name().ends_with("_scales")) {
                let float = matches!(t.data_type(), 1 | 10 | 16);
                assert!(!(float && t.dims.len() == 3 && t.dims[0] == experts as i64), "{label}: float `{}`", t.name());
            }
            // Expert bytes: codes of the padded matrices, plus one f32 scale (and, asymmetric, a 4-bit zero point)
            // per block of each output row.
            let of = |kind: &str| -> u64 {
                g.initializer
                    .iter()
                    .filter(|t| t.name().starts_with("/sparse_experts/") && t.name().ends_with(kind))
                    .map(payload_bytes)
                    .sum()
            };
            let elems = (moe_layers * experts * 3 * hp * ip) as u64;
            assert_eq!(of("_weights"), elems * bits / 8, "{label}: codes of {hp}x{ip}");
            assert_eq!(of("_scales"), elems / block as u64 * 4, "{label}: scales");
            let total = of("_weights") + of("_scales") + of("_zero_points");
            assert_eq!(q["bytes"].as_u64(), Some(total), "{label}");
            let zp_bytes = |rows: usize, k: usize| (rows * (k / block).div_ceil(2)) as u64;
            let zp =
                if bits == 4 { (moe_layers * experts) as u64 * (zp_bytes(2 * ip, hp) + zp_bytes(hp, ip)) } else { 0 };
            assert_eq!(of("_zero_points"), zp, "{label}: zero points");
            let fp32 = (moe_layers * experts * 3 * h * inter * 4) as u64;
            let ratio = total as f64 / fp32 as f64;
            // Unpadded (deepseek_v3_qlora_yarn_bf16, block 32): 1/4 or 1/8 of fp32 plus the scales (1/32 of the
            // fp32 bytes) and int4's zero points (a byte per row of fewer than three blocks).
            if (hp, ip) == (h, inter) {
                let (lo, hi) = if bits == 8 { (0.25, 0.29) } else { (0.125, 0.17) };
                assert!((lo..hi).contains(&ratio), "{label}: {ratio:.4} of fp32, expected {lo}..{hi}");
            }
            eprintln!(
                "{label}: experts {total} bytes = {ratio:.3} of fp32 (padded {h}x{inter} -> {hp}x{ip}, block {block})"
            );
            // At opset 21 (int4-wo) the streamed export writes them quantized into the portable graph; at int8-wo's
            // opset 17 a per-channel scale over a 3-D stack has no DequantizeLinear form, so they stay float, and the
            // record says which.
            let quantization = m.quantization.as_ref().unwrap();
            let left = quantization["skipped_matmuls"].to_string();
            let stacks = quantization["quantized_expert_stacks"].as_u64().unwrap();
            if m.opset >= 21 {
                assert_eq!(stacks, 3 * moe_layers as u64, "{label}");
                assert!(!left.contains("mlp.experts"), "{label}: {left}");
            } else {
                assert_eq!(stacks, 0, "{label}");
                assert!(left.contains("mlp.experts.gate_proj"), "{label}: {left}");
            }
        }
    }
}

/// How much the experts' quantization may add to a serving graph's relative logit error against transformers',
/// over the same artifact built with float experts (`--cpu-float-experts`; its error is the 2-D weights'
/// quantization). The weights' relative quantization error is ~0.4% RMS for int8 per channel and ~7% for int4 in
/// blocks of 32; the experts are one of each MoE layer's two branches. Measured additions on these cases: int8
/// +0.002–0.007, int4 −0.06–+0.04 (the int4 errors are 0.4–1.1 with float experts already: these random 2–3-layer
/// models are sensitive). A misplaced row, nibble or scale gives O(1) errors.
fn margin(p: Precision) -> f32 {
    if p == Precision::Int8WeightOnly {
        0.02
    } else {
        0.15
    }
}

/// Rebuilds `out`'s `cpu` target, with its experts float or quantized.
fn rebuild_cpu(out: &Path, float_experts: bool) {
    let opts = TargetOptions { targets: vec!["cpu".into()], float_experts, ..Default::default() };
    target::apply(out, &opts, Mode::Build, &mut |_, _| {}).unwrap();
    let m = Manifest::load(out).unwrap();
    assert_eq!(m.targets.cpu().unwrap().expert_quantization.is_none(), float_experts);
}

#[test]
fn quantized_experts_track_the_float_experts_on_the_golden_cases() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut failures, mut report) = (Vec::new(), Vec::new());
    for case in deepseek_cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let g = Golden::load(&case).unwrap();
        for precision in QUANTIZED {
            let label = format!("{name} {}", precision.name());
            let out = tmp.path().join(format!("{name}-{}", precision.name()));
            export_for_cpu(&case, &out, precision);
            let (err, wrong) = drive_engine(&mut engine(&out), &g, None);
            rebuild_cpu(&out, true);
            let (float_err, float_wrong) = drive_engine(&mut engine(&out), &g, None);
            report.push(format!(
                "{label}: rel err {err:.3e} (float experts {float_err:.3e}); greedy differs at {} ({}) positions",
                wrong.len(),
                float_wrong.len()
            ));
            if err.is_nan() || err > float_err + margin(precision) {
                failures.push(format!(
                    "{label}: relative error {err:.3e}, float experts {float_err:.3e} + margin {}",
                    margin(precision)
                ));
            }
            // int8: the quantized experts move no greedy choice that the float experts keep.
            if precision == Precision::Int8WeightOnly && wrong.iter().any(|w| !float_wrong.contains(w)) {
                failures.push(format!("{label}: greedy differs at {wrong:?}, with float experts at {float_wrong:?}"));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

fn arith() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/arith-r1")
}

/// Greedy completions of the first `n` held-out problems, as token ids.
fn completions(out: &Path, n: usize) -> (Vec<Vec<u32>>, usize) {
    let tokenizer = Tokenizer::from_dir(out).unwrap();
    let template = ChatTemplate::from_config(tokenizer.config(), None, false).unwrap();
    let path = arith().join("heldout.jsonl");
    let problems: Vec<_> = eval::load_problems(&path).unwrap().into_iter().take(n).collect();
    let opts = EvalOptions { batch: 8, max_new_tokens: 64, ..Default::default() };
    let r = eval::evaluate(&mut engine(out), &tokenizer, &template, &problems, &opts, &mut |_, _, _| {}).unwrap();
    (r.results.into_iter().map(|p| p.completion_token_ids).collect(), r.correct)
}

#[test]
fn arith_r1_quantized_experts_answer_like_fp32() {
    const N: usize = 48;
    let tmp = tempfile::tempdir().unwrap();
    let fp32 = tmp.path().join("fp32");
    export_for_cpu(&arith(), &fp32, Precision::Fp32);
    let (want, want_correct) = completions(&fp32, N);
    for precision in [Precision::Int8WeightOnly, Precision::Int4WeightOnly, Precision::Int8] {
        let out = tmp.path().join(precision.name());
        let m = export_for_cpu(&arith(), &out, precision);
        let q = m.targets.cpu().unwrap().expert_quantization.clone().expect("quantized experts");
        assert_eq!(q["bits"].as_u64(), Some(if precision == Precision::Int4WeightOnly { 4 } else { 8 }));
        let (got, correct) = completions(&out, N);
        let same = got.iter().zip(&want).filter(|(a, b)| a == b).count();
        eprintln!(
            "arith-r1 {}: {correct}/{N} correct (fp32 {want_correct}), {same}/{N} completions identical",
            precision.name()
        );
        // int8-wo: the quantization moves no greedy choice of this model on these problems; int4-wo and W8A8
        // (activations quantized too) may move a few.
        let (min_same, max_loss) = if precision == Precision::Int8WeightOnly { (N - 1, 0) } else { (N * 3 / 4, 2) };
        assert!(same >= min_same, "{}: {same}/{N} completions equal fp32's", precision.name());
        assert!(correct + max_loss >= want_correct, "{}: {correct} correct, fp32 {want_correct}", precision.name());
    }
}

/// Exports `checkpoint` at `precision` (opset 21, no calibration data) streamed or staged into `out`.
fn export_at_21(checkpoint: &Path, out: &Path, precision: Precision, staged: bool) -> Manifest {
    let mut opts = ExportOptions::new(checkpoint, out);
    opts.opset = 21;
    let mut q = QuantizeOptions::new(precision);
    q.staged = staged;
    export_quantized(&opts, &q, &mut |_| {}).unwrap();
    Manifest::load(out).unwrap()
}

fn read_graph(path: &Path) -> ModelProto {
    ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap()
}

/// The `QMoE` tensors (`/sparse_experts/...` initializers) of `out`'s `cpu` graph, by name, with their dims and bytes.
fn qmoe_tensors(out: &Path) -> std::collections::BTreeMap<String, (Vec<i64>, Vec<u8>)> {
    let m = Manifest::load(out).unwrap();
    let path = out.join(m.targets.cpu_graph(out).unwrap());
    let reader = ExternalDataReader::new(path.parent().unwrap());
    let model = read_graph(&path);
    let g = model.graph.unwrap();
    assert!(g.node.iter().any(|n| n.op_type() == "QMoE"), "{}: no QMoE", path.display());
    g.initializer
        .iter()
        .filter(|t| t.name().starts_with("/sparse_experts/"))
        .map(|t| (t.name().to_string(), (t.dims.clone(), reader.tensor_bytes(t).unwrap())))
        .collect()
}

#[test]
fn streamed_export_writes_the_experts_quantized_and_its_qmoe_equals_the_staged_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut failures, mut report) = (Vec::new(), Vec::new());
    for case in deepseek_cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let g = Golden::load(&case).unwrap();
        for precision in QUANTIZED {
            let label = format!("{name} {}", precision.name());
            let (streamed, staged) = (
                tmp.path().join(format!("{name}-{}-s", precision.name())),
                tmp.path().join(format!("{name}-{}-t", precision.name())),
            );
            let m = export_at_21(&case, &streamed, precision, false);
            export_at_21(&case, &staged, precision, true);
            let (e, h, inter) =
                (config(&m, "n_routed_experts"), config(&m, "hidden_size"), config(&m, "moe_intermediate_size"));
            let moe_layers = config(&m, "num_hidden_layers") - config(&m, "first_k_dense_replace");

            // The portable graph: no float expert stack; codes, scales and zero points of the expected sizes.
            let model = read_graph(&streamed.join("model.onnx"));
            let graph = model.graph.as_ref().unwrap();
            let expert = |t: &&TensorProto| t.name().starts_with("model.layers.") && t.name().contains(".mlp.experts.");
            for t in graph.initializer.iter().filter(expert).filter(|t| !t.name().ends_with("_scale")) {
                assert!(!matches!(t.data_type(), 1 | 10 | 16), "{label}: float expert tensor `{}`", t.name());
            }
            let bytes: u64 = graph.initializer.iter().filter(expert).map(payload_bytes).sum();
            let stack = |k: usize, n: usize| -> u64 {
                let (k, n, e) = (k as u64, n as u64, e as u64);
                if precision == Precision::Int8WeightOnly {
                    e * (k * n + n * 4 + n) // int8 codes, a float32 scale and an int8 zero point (0) per column
                } else {
                    let blocks = k.div_ceil(32);
                    e * (k * n / 2 + blocks * n * 4 + blocks * n / 2) // uint4 codes, scales, uint4 zero points
                }
            };
            let want = moe_layers as u64 * (2 * stack(h, inter) + stack(inter, h));
            assert_eq!(bytes, want, "{label}: expert bytes");
            let fp32 = (moe_layers * 3 * e * h * inter * 4) as u64;
            let dqs: Vec<_> = graph
                .node
                .iter()
                .filter(|n| n.op_type() == "DequantizeLinear" && n.name().contains(".mlp.experts."))
                .collect();
            assert_eq!(dqs.len(), 3 * moe_layers, "{label}: one DequantizeLinear per stack");
            assert_eq!(m.quantized_expert_stacks(), 3 * moe_layers as u64, "{label}: recorded in the manifest");
            // tract has no blocked DequantizeLinear: it refuses the portable graph by name instead of failing inside.
            let refused = match r1_engine::backend::tract::TractBackend::load(&streamed, &m) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{label}: tract loaded quantized expert stacks"),
            };
            // (int4-wo graphs are refused earlier, for their int4 tensors.)
            let named = precision == Precision::Int4WeightOnly || refused.contains("routed-expert stacks quantized");
            assert!(named && refused.contains("--backend ort"), "{label}: {refused}");
            for n in &dqs {
                let attr = |a: &str| n.attribute.iter().find(|x| x.name() == a).map(|x| x.i());
                assert_eq!(attr("axis"), Some(1), "{label}: `{}` dequantizes along K", n.name());
                let k = if n.name().contains("down_proj") { inter } else { h } as i64;
                let block = if precision == Precision::Int8WeightOnly { k } else { 32 };
                assert_eq!(attr("block_size"), Some(block), "{label}: `{}`", n.name());
            }
            // The report: the streamed export leaves no expert float; the staged one says it does.
            let left = |out: &Path| -> String { std::fs::read_to_string(out.join("calibration/report.json")).unwrap() };
            let (ls, lt) = (left(&streamed), left(&staged));
            assert!(!ls.contains("mlp.experts"), "{label}: streamed report {ls}");
            assert!(lt.contains("mlp.experts.gate_proj"), "{label}: staged report {lt}");

            // The portable graphs' logits against transformers': the quantized experts add at most the margin.
            let (err, _) = drive_engine(&mut engine(&streamed), &g, None);
            let (float_err, _) = drive_engine(&mut engine(&staged), &g, None);
            report.push(format!(
                "{label}: experts {bytes} bytes = {:.4} of fp32 {fp32}; portable rel err {err:.3e} (float experts {float_err:.3e})",
                bytes as f64 / fp32 as f64
            ));
            if err.is_nan() || err > float_err + margin(precision) {
                failures.push(format!("{label}: portable relative error {err:.3e}, float experts {float_err:.3e}"));
            }

            // The cpu graphs: the same QMoE tensors from the codes as from the float stacks.
            let opts = TargetOptions { targets: vec!["cpu".into()], ..Default::default() };
            for out in [&streamed, &staged] {
                target::apply(out, &opts, Mode::AfterExport, &mut |_, _| {}).unwrap();
            }
            let (qs, qt) = (qmoe_tensors(&streamed), qmoe_tensors(&staged));
            assert_eq!(qs.keys().collect::<Vec<_>>(), qt.keys().collect::<Vec<_>>(), "{label}: QMoE tensors");
            for (k, v) in &qs {
                assert!(v == &qt[k], "{label}: `{k}` differs from the staged export's");
            }
            let cpu = |out: &Path| Manifest::load(out).unwrap().targets.cpu().unwrap().expert_quantization.clone();
            assert_eq!(cpu(&streamed), cpu(&staged), "{label}: expert_quantization");
            // And the float experts (`--cpu-float-experts`) dequantized from the codes track the staged export's
            // float experts in the same form of cpu graph.
            rebuild_cpu(&streamed, true);
            rebuild_cpu(&staged, true);
            let (dequantized_err, _) = drive_engine(&mut engine(&streamed), &g, None);
            let (float_cpu_err, _) = drive_engine(&mut engine(&staged), &g, None);
            report.push(format!(
                "{label}: cpu graph with float experts: dequantized {dequantized_err:.3e}, float {float_cpu_err:.3e}"
            ));
            if dequantized_err.is_nan() || dequantized_err > float_cpu_err + margin(precision) {
                failures.push(format!(
                    "{label}: cpu graph, dequantized float experts {dequantized_err:.3e}, float {float_cpu_err:.3e}"
                ));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}
