//! DeepseekV3's latent (MLA) cache appended in place: the `--target cpu` serving graph of the DeepseekV3 golden
//! checkpoints replaces each layer's cache `Concat`s and attention with r1's `r1.LatentAttention`
//! (`export/src/onnx/fused_latent.rs`, `engine/src/backend/attention/latent.rs`), and the engine binds its KV pool
//! as both past and present.
//!
//! - The manifest records `fused_attention`, `kv_in_place` and the operator; the graph holds one `LatentAttention`
//!   per layer, and nothing else reads a past input (no `Concat`, no `Softmax` left).
//! - Through the engine (in place), the golden prompts' prefill and teacher-forced decode logits match transformers'
//!   within 1e-4 relative, greedy tokens identical: all rows batched, and row 0 in chunks of 2 while the others decode.
//! - Ragged prompts: greedy tokens batched (one step, and chunks of 3) equal each prompt alone, and equal tract's on
//!   the portable graph (host path); every logits row within 1e-4 relative of tract's.
//! - Decode steps at fixed shapes (`DecodeSteps::Fixed`, the CUDA-graph layout run on the CPU provider) give the same
//!   greedy tokens.
//! - A steady decode step copies no KV cache (`KvPool::copied_bytes`).

use std::path::{Path, PathBuf};

use prost::Message;
use r1_engine::backend::ort::DecodeSteps;
use r1_engine::backend::{self, BackendKind, BackendOptions, ExecutionProviderKind};
use r1_engine::manifest::{DType, Manifest};
use r1_engine::Engine;
use r1_export::target::{self, Mode, TargetOptions};
use r1_export::Precision;
use r1_proto::onnx::ModelProto;
use r1_tests::{decode_copied_bytes, drive_engine, export_case, golden_dir, ragged_prompts, Golden};

const CASES: [&str; 3] = ["deepseek_v3_noqlora_f32", "deepseek_v3_qlora_yarn_bf16", "deepseek_v3_fp8_block"];
const TOLERANCE: f32 = 1e-4;

fn cpu_options() -> BackendOptions {
    BackendOptions { execution_provider: ExecutionProviderKind::Cpu, ..Default::default() }
}

/// Exports golden case `name` at fp32 into `tmp/name` and builds its `cpu` target.
fn export_for_cpu(tmp: &Path, name: &str) -> (PathBuf, Manifest) {
    let out = tmp.join(name);
    export_case(&golden_dir().join(name), &out, Precision::Fp32).unwrap();
    let opts = TargetOptions { targets: vec!["cpu".into()], mla_in_place: true, ..Default::default() };
    target::apply(&out, &opts, Mode::AfterExport, &mut |_, _| {}).unwrap();
    let m = Manifest::load(&out).unwrap();
    (out, m)
}

fn engine(out: &Path, m: &Manifest, kind: BackendKind) -> Engine {
    let opts = if kind == BackendKind::Ort { cpu_options() } else { BackendOptions::default() };
    let b = backend::load(out, m, kind, &opts).unwrap();
    assert_eq!(b.steps_in_place(), kind == BackendKind::Ort, "{kind:?}: in place on ort, host path on tract");
    Engine::from_backend(out, m.clone(), b, None).unwrap()
}

#[test]
fn the_serving_graph_attends_over_the_latent_cache_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    for name in CASES {
        let (out, m) = export_for_cpu(tmp.path(), name);
        let cpu = m.targets.cpu().unwrap();
        assert!(cpu.fused_attention && cpu.kv_in_place && cpu.last_position_logits, "{name}: {cpu:?}");
        assert_eq!(cpu.attention_op.as_deref(), Some("r1.LatentAttention"), "{name}");
        assert_eq!(cpu.kv_cache_dtype, Some(DType::Float32), "{name}");
        let path = out.join(m.targets.cpu_graph(&out).unwrap());
        let model = ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
        let g = model.graph.as_ref().unwrap();
        let fused: Vec<_> = g.node.iter().filter(|n| n.op_type() == "LatentAttention" && n.domain() == "r1").collect();
        assert_eq!(fused.len(), m.kv_cache.num_layers, "{name}: one LatentAttention per layer");
        for n in &g.node {
            let reads_past = n.input.iter().any(|i| i.starts_with("past_key_values."));
            assert!(!reads_past || n.op_type() == "LatentAttention", "{name}: `{}` reads a past input", n.name());
            assert!(n.op_type() != "Softmax", "{name}: `{}`: the portable attention is left", n.name());
        }
    }
}

#[test]
fn in_place_latent_attention_matches_transformers_through_the_engine() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut failures, mut report) = (Vec::new(), Vec::new());
    for name in CASES {
        let (out, m) = export_for_cpu(tmp.path(), name);
        let g = Golden::load(&golden_dir().join(name)).unwrap();
        let mut e = engine(&out, &m, BackendKind::Ort);
        for (schedule, chunk) in [("batched prefill", None), ("row 0 in chunks of 2", Some(2))] {
            let (err, wrong) = drive_engine(&mut e, &g, chunk);
            let label = format!("{name} ({schedule})");
            report.push(format!("{label}: rel err {err:.2e}"));
            if err.is_nan() || err > TOLERANCE {
                failures.push(format!("{label}: relative error {err:.3e} exceeds {TOLERANCE:.0e}"));
            }
            if !wrong.is_empty() {
                failures.push(format!("{label}: greedy token differs from transformers' at (row, step) {wrong:?}"));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

/// Greedy generation of each prompt alone, recording every step's logits.
fn singles(e: &mut Engine, prompts: &[Vec<u32>], n: usize) -> (Vec<Vec<u32>>, Vec<Vec<Vec<f32>>>) {
    let mut logits = vec![Vec::new(); prompts.len()];
    let tokens = prompts
        .iter()
        .zip(&mut logits)
        .map(|(p, l)| {
            e.generate_with(p, n, &[], |x| {
                l.push(x.to_vec());
                Ok(r1_engine::generate::argmax(x))
            })
            .unwrap()
        })
        .collect();
    (tokens, logits)
}

fn max_rel(got: &[f32], want: &[f32]) -> f32 {
    let den = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(f32::MIN_POSITIVE);
    got.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) / den
}

#[test]
fn batched_equals_single_and_tract_and_a_decode_step_copies_no_cache() {
    let tmp = tempfile::tempdir().unwrap();
    for name in CASES {
        let (out, m) = export_for_cpu(tmp.path(), name);
        let prompts = ragged_prompts(m.model.vocab_size as u32);
        let mut e = engine(&out, &m, BackendKind::Ort);
        let (tokens, logits) = singles(&mut e, &prompts, 8);
        for chunk in [usize::MAX, 3] {
            let batched = e
                .generate_batch_with(&prompts, 8, &[], chunk, |l| Ok(r1_engine::generate::argmax(l)))
                .expect("batched");
            assert_eq!(batched, tokens, "{name}: batched (chunk {chunk}) vs single");
        }
        // Decode steps at fixed shapes (the CUDA-graph layout, run uncaptured here: the mask as wide as the pool, each
        // row's length in its first column) give the same tokens.
        let opts = BackendOptions { decode_steps: DecodeSteps::Fixed, ..cpu_options() };
        let mut fixed =
            Engine::from_backend(&out, m.clone(), backend::load(&out, &m, BackendKind::Ort, &opts).unwrap(), None)
                .unwrap();
        let fixed_tokens =
            fixed.generate_batch_with(&prompts, 8, &[], usize::MAX, |l| Ok(r1_engine::generate::argmax(l)));
        assert_eq!(fixed_tokens.unwrap(), tokens, "{name}: fixed-shape decode steps");
        assert!(!fixed.fixed_decode_shapes().is_empty(), "{name}: no decode step ran at fixed shapes");
        for (step, copied) in decode_copied_bytes(&mut e, &prompts[..3], 3).into_iter().enumerate() {
            assert_eq!(copied, 0, "{name}: in-place decode step {step} copied {copied} bytes of KV cache");
        }
        let mut t = engine(&out, &m, BackendKind::Tract);
        let (tract_tokens, tract_logits) = singles(&mut t, &prompts, 8);
        assert_eq!(tokens, tract_tokens, "{name}: ort in place (fused) vs tract (portable) greedy tokens");
        for (p, (a, b)) in logits.iter().zip(&tract_logits).enumerate() {
            for (step, (x, y)) in a.iter().zip(b).enumerate() {
                let err = max_rel(x, y);
                assert!(err <= TOLERANCE, "{name}: prompt {p} step {step}: relative error {err:.3e} vs tract");
            }
        }
        // tract's host path appends each step's new positions: the counter counts copies.
        assert!(decode_copied_bytes(&mut t, &prompts[..3], 1)[0] > 0, "{name}: tract copies");
    }
}
