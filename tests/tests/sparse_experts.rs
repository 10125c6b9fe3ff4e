//! DeepseekV3's `--target cpu` serving graph runs each token through its routed experts only
//! (`export/src/onnx/sparse_moe/`: one `com.microsoft.MoE` per MoE layer, the router kept in standard ops).
//!
//! - Every DeepseekV3 golden case through that graph, driven by the engine, matches transformers (fp32 ≤ 1e-4, fp16
//!   ≤ 2e-2 relative; greedy tokens identical): all rows prefilled in one batched step then decoded together, and
//!   row 0 prefilled in chunks of 2 while the others already decode.
//! - The graph holds one `MoE` per MoE layer and no dense expert stack, and the manifest records it.
//! - Each token's output depends on exactly `num_experts_per_tok` experts' weights: poisoning one expert of the last
//!   layer with NaN turns exactly the tokens routed to it into NaN (dense masked compute, `0 · NaN`, turns all).
//! - tract, which runs the portable graph, refuses the serving graph naming the operator.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message;
use r1_engine::backend::{self, BackendKind, BackendOptions, ExecutionProviderKind};
use r1_engine::manifest::Manifest;
use r1_engine::{Engine, EngineOptions, StepWork};
use r1_export::target::{self, Mode, TargetOptions};
use r1_export::Precision;
use r1_proto::onnx::{ModelProto, TensorProto};
use r1_tests::{drive_engine, export_case, golden_cases, golden_meta, golden_prompts, Golden};

fn deepseek_cases() -> Vec<PathBuf> {
    let cases: Vec<PathBuf> =
        golden_cases().into_iter().filter(|c| golden_meta(c).unwrap()["family"] == "deepseek_v3").collect();
    assert!(cases.len() >= 4, "expected the DeepseekV3 golden cases (3 + release_deepseek_r1), found {cases:?}");
    cases
}

fn tolerance(p: Precision) -> f32 {
    if p == Precision::Fp32 {
        1e-4
    } else {
        2e-2
    }
}

fn cpu_options() -> BackendOptions {
    BackendOptions { execution_provider: ExecutionProviderKind::Cpu, ..Default::default() }
}

/// Exports `case` into `out` and builds its `cpu` target; returns the manifest that records it.
fn export_for_cpu(case: &Path, out: &Path, precision: Precision) -> Manifest {
    export_case(case, out, precision).unwrap();
    let opts = TargetOptions { targets: vec!["cpu".into()], ..Default::default() };
    target::apply(out, &opts, Mode::AfterExport, &mut |_, _| {}).unwrap();
    Manifest::load(out).unwrap()
}

/// The `cpu` serving graph and the folder its external data resolves in.
fn serving_graph(out: &Path, m: &Manifest) -> (ModelProto, PathBuf) {
    let rel = m.targets.cpu_graph(out).expect("a built cpu graph");
    let path = out.join(rel);
    let model = ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    (model, path.parent().unwrap().to_path_buf())
}

fn config(m: &Manifest, key: &str) -> usize {
    m.config[key].as_u64().unwrap_or_else(|| panic!("config.{key}")) as usize
}

#[test]
fn sparse_serving_graph_matches_transformers_through_the_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut failures, mut report) = (Vec::new(), Vec::new());
    for case in deepseek_cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let g = Golden::load(&case).unwrap();
        for precision in [Precision::Fp32, Precision::Fp16] {
            let out = tmp.path().join(format!("{name}-{}", precision.name()));
            let m = export_for_cpu(&case, &out, precision);
            let cpu = m.targets.cpu().unwrap();
            assert!(cpu.sparse_experts && cpu.last_position_logits, "{name}: targets.cpu = {cpu:?}");
            let opts =
                EngineOptions { backend: BackendKind::Ort, backend_options: cpu_options(), ..Default::default() };
            let mut e = Engine::load(&out, &opts).unwrap();
            for (schedule, chunk) in [("batched prefill", None), ("row 0 in chunks of 2", Some(2))] {
                let (err, wrong) = drive_engine(&mut e, &g, chunk);
                let label = format!("{name} {} {} ({schedule})", precision.name(), e.backend_name());
                report.push(format!("{label}: rel err {err:.2e}"));
                if err.is_nan() || err > tolerance(precision) {
                    failures.push(format!("{label}: relative error {err:.3e} exceeds {:.0e}", tolerance(precision)));
                }
                if !wrong.is_empty() {
                    failures.push(format!("{label}: greedy token differs from transformers' at (row, step) {wrong:?}"));
                }
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

/// The serving graph's initializer `name`.
fn initializer<'m>(model: &'m ModelProto, name: &str) -> &'m TensorProto {
    let g = model.graph.as_ref().unwrap();
    g.initializer.iter().find(|t| t.name.as_deref() == Some(name)).unwrap_or_else(|| panic!("no initializer {name}"))
}

#[test]
fn sparse_serving_graph_holds_one_moe_per_layer_and_no_dense_expert_stack() {
    let tmp = tempfile::tempdir().unwrap();
    for case in deepseek_cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let out = tmp.path().join(&name);
        let m = export_for_cpu(&case, &out, Precision::Fp32);
        let (model, _) = serving_graph(&out, &m);
        let g = model.graph.as_ref().unwrap();
        let (layers, dense) = (config(&m, "num_hidden_layers"), config(&m, "first_k_dense_replace"));
        let (experts, k) = (config(&m, "n_routed_experts"), config(&m, "num_experts_per_tok"));
        let (h, inter) = (config(&m, "hidden_size"), config(&m, "moe_intermediate_size"));
        let moe: Vec<_> = g.node.iter().filter(|n| n.op_type() == "MoE" && n.domain() == "com.microsoft").collect();
        assert_eq!(moe.len(), layers - dense, "{name}: one MoE per MoE layer");
        for (j, n) in moe.iter().enumerate() {
            let attr = |a: &str| n.attribute.iter().find(|x| x.name() == a).unwrap_or_else(|| panic!("attribute {a}"));
            assert_eq!(attr("k").i(), k as i64, "{name}: top-k");
            assert_eq!(attr("activation_type").s(), b"swiglu");
            let fc1 = initializer(&model, &n.input[2]);
            assert_eq!(fc1.dims, [experts, 2 * inter, h].map(|d| d as i64), "{name} MoE {j}: fc1");
        }
        // No MatMul reads a stack of all experts any more: the dense compute is gone, not just bypassed.
        for n in g.node.iter().filter(|n| n.op_type().contains("MatMul") || n.op_type() == "Gemm") {
            for i in &n.input {
                if let Some(t) = g.initializer.iter().find(|t| t.name.as_ref() == Some(i)) {
                    assert!(
                        !(t.dims.len() == 3 && t.dims[0] == experts as i64),
                        "{name}: `{}` still multiplies the expert stack `{i}` {:?}",
                        n.name(),
                        t.dims
                    );
                }
            }
        }
        // What is left of the portable block is the reshape of the sum back to [batch, sequence, hidden].
        let left: Vec<_> = g.node.iter().map(|n| n.name()).filter(|n| n.contains("/mlp/experts/")).collect();
        assert!(left.iter().all(|n| n.ends_with("/mlp/experts/Reshape")), "{name}: dense expert nodes left: {left:?}");
    }
}

/// The byte range of expert `e` in the external payload of `fc1` (`[E, 2I, H]`), and the file holding it.
fn expert_range(t: &TensorProto, dir: &Path, e: usize) -> (PathBuf, u64, usize) {
    let entry = |k: &str| t.external_data.iter().find(|x| x.key() == k).map(|x| x.value().to_string());
    let location = entry("location").expect("fc1 is stored as external data");
    let offset: u64 = entry("offset").map_or(0, |v| v.parse().unwrap());
    let per_expert = (t.dims[1] * t.dims[2]) as usize * 4;
    (dir.join(location), offset + (e * per_expert) as u64, per_expert)
}

/// For every expert of the last MoE layer: poisons its weights with NaN, runs the golden prompts (prefill, then
/// teacher-forced decode) and marks which of the returned logits rows (each row's last fed position) turn NaN.
/// The last layer's MoE output reaches no cache, so each row's logits depend on its own token's experts only.
#[test]
fn each_token_reads_exactly_its_top_k_experts() {
    let tmp = tempfile::tempdir().unwrap();
    for case in deepseek_cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let out = tmp.path().join(&name);
        let m = export_for_cpu(&case, &out, Precision::Fp32);
        let (experts, k) = (config(&m, "n_routed_experts"), config(&m, "num_experts_per_tok"));
        let last = config(&m, "num_hidden_layers") - 1;
        let (model, dir) = serving_graph(&out, &m);
        let fc1 = initializer(&model, &format!("/sparse_experts/layers.{last}/fc1"));
        let g = Golden::load(&case).unwrap();
        // poisoned[(row, step)] = how many experts' poison reached that row's logits.
        let mut poisoned: BTreeMap<(usize, usize), usize> = BTreeMap::new();
        for e in 0..experts {
            let (file, at, len) = expert_range(fc1, &dir, e);
            let original = std::fs::read(&file).unwrap();
            let mut bytes = original.clone();
            for v in bytes[at as usize..at as usize + len].chunks_exact_mut(4) {
                v.copy_from_slice(&f32::NAN.to_le_bytes());
            }
            std::fs::write(&file, &bytes).unwrap();
            let be = backend::load(&out, &m, BackendKind::Ort, &cpu_options()).unwrap();
            for (key, nan) in nan_rows(be, &out, &m, &g) {
                *poisoned.entry(key).or_default() += usize::from(nan);
            }
            std::fs::write(&file, &original).unwrap();
        }
        for ((r, step), n) in &poisoned {
            assert_eq!(
                *n, k,
                "{name}: row {r} step {step} turned NaN with {n} poisoned experts of {experts}; it routes to {k}"
            );
        }
        assert!(!poisoned.is_empty());
    }
}

/// Prefill of the golden prompts, then their decode tokens one step at a time, through an engine over `be` (the
/// serving graph steps the engine's KV pool in place, as r1-serve runs it: its layout is the pool's, right-padded,
/// not a host past); for each returned logits row (each row's last fed position), whether it holds a NaN.
fn nan_rows(be: Box<dyn backend::Backend>, out: &Path, m: &Manifest, g: &Golden) -> Vec<((usize, usize), bool)> {
    assert!(be.last_position_logits(), "the serving graph returns each row's last position");
    let mut e = Engine::from_backend(out, m.clone(), be, None).unwrap();
    let n = g.decode_input_ids.ncols();
    let seqs: Vec<_> = golden_prompts(g).iter().map(|prompt| e.add_sequence(prompt, n + 1).unwrap()).collect();
    let work: Vec<StepWork> = seqs.iter().map(|&s| StepWork::all(s)).collect();
    let mut rows = Vec::new();
    for step in 0..=n {
        for res in e.step(&work).unwrap() {
            let r = seqs.iter().position(|s| *s == res.seq).unwrap();
            rows.push(((r, step), res.logits.iter().any(|v| v.is_nan())));
            if step < n {
                e.push_token(res.seq, g.decode_input_ids[[r, step]] as u32).unwrap();
            }
        }
    }
    rows
}

#[test]
fn tract_refuses_the_sparse_serving_graph_naming_the_operator() {
    let tmp = tempfile::tempdir().unwrap();
    let case = deepseek_cases().into_iter().next().unwrap();
    let out = tmp.path().join("artifact");
    let m = export_for_cpu(&case, &out, Precision::Fp32);
    let rel = m.targets.cpu_graph(&out).unwrap().to_string();
    let err = backend::load_graph(&out, &rel, &m, BackendKind::Tract, &BackendOptions::default())
        .err()
        .expect("tract does not run the serving graph")
        .to_string();
    assert!(err.contains("com.microsoft.MoE") && err.contains("tract runs the portable `model.onnx`"), "{err}");
    // The engine's tract backend runs the portable graph, dense masked, and is not asked to run the serving one.
    let opts = EngineOptions { backend: BackendKind::Tract, ..Default::default() };
    Engine::load(&out, &opts).unwrap();
}
