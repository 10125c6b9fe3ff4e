//! The engine's batched-vs-single conformance check on an artifact written by r1-export, on both backends: the
//! `qwen2_gqa2_bf16` golden checkpoint exported at fp32 with `--target cpu`, so that ONNX Runtime runs the serving
//! graph r1-serve runs (last-position logits, attention fused into GroupQueryAttention) and tract the portable one.
//! The test makes its artifact itself (the engine's own conformance suite, `engine/tests/conformance.rs`, runs on
//! in-memory fixtures and cannot depend on the exporter).

use std::path::Path;

use r1_engine::backend::{self, BackendKind, BackendOptions};
use r1_engine::{Engine, Manifest};
use r1_export::target::{apply, Mode, TargetOptions};
use r1_export::{export, ExportOptions};

#[test]
fn exported_artifact_batched_greedy_equals_single() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("qwen2_gqa2_bf16-fp32");
    let ck = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden/qwen2_gqa2_bf16");
    export(&ExportOptions::new(&ck, &dir), &mut |_| {}).expect("export the golden checkpoint");
    apply(&dir, &TargetOptions { targets: vec!["cpu".into()], ..Default::default() }, Mode::Build, &mut |_, _| {})
        .expect("build --target cpu");
    let manifest = Manifest::load(&dir).expect("manifest");
    let prompts = r1_tests::ragged_prompts(manifest.model.vocab_size as u32);
    let mut by_backend = Vec::new();
    for kind in [BackendKind::Ort, BackendKind::Tract] {
        let b = backend::load(&dir, &manifest, kind, &BackendOptions::default()).expect("load");
        // ONNX Runtime runs the serving graph over the engine's KV pool in place; tract gathers on the host.
        assert_eq!(b.steps_in_place(), kind == BackendKind::Ort, "{kind:?}");
        let mut e = Engine::from_backend(&dir, manifest.clone(), b, None).unwrap();
        let singles: Vec<Vec<u32>> = prompts.iter().map(|p| e.generate_greedy(p, 8, &[]).expect("single")).collect();
        for chunk in [usize::MAX, 3] {
            let batched = e
                .generate_batch_with(&prompts, 8, &[], chunk, |l| Ok(r1_engine::generate::argmax(l)))
                .expect("batched");
            assert_eq!(batched, singles, "{kind:?} chunk {chunk}");
        }
        by_backend.push(singles);
        // A steady decode step copies no cache in place (and copies the whole past on the host the first time).
        for (step, copied) in r1_tests::decode_copied_bytes(&mut e, &prompts[..3], 3).into_iter().enumerate() {
            if kind == BackendKind::Ort {
                assert_eq!(copied, 0, "decode step {step} copied {copied} bytes of KV cache");
            } else {
                assert!(copied > 0, "tract appends each step's new positions");
            }
        }
    }
    assert_eq!(by_backend[0], by_backend[1], "ort (fused, in place) and tract (portable) greedy tokens");

    // Stepped directly (not through the engine), the in-place graph refuses a left-padded past of ragged rows, the
    // one host layout it would get wrong.
    let mut b = backend::load(&dir, &manifest, BackendKind::Ort, &BackendOptions::default()).expect("load");
    let kv = &manifest.kv_cache;
    let past = |heads, dim| ndarray::ArrayD::<f32>::zeros(vec![2, heads, 3, dim]);
    let input = r1_engine::StepInput {
        input_ids: ndarray::Array2::from_elem((2, 1), 5),
        attention_mask: ndarray::arr2(&[[1, 1, 1, 1], [0, 1, 1, 1]]),
        position_ids: ndarray::arr2(&[[3], [2]]),
        past: (0..kv.num_layers)
            .map(|_| r1_engine::KvPair {
                key: past(kv.key_heads, kv.key_dim),
                value: past(kv.value_heads, kv.value_dim),
            })
            .collect(),
    };
    let err = b.run(&input).expect_err("ragged left-padded past");
    assert!(err.to_string().contains("kv_in_place"), "{err}");
}
