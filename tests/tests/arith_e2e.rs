//! End to end on the trained arith-r1 fixture: export the HF checkpoint at fp32, load the artifact
//! in the engine on ONNX Runtime and on tract, render the 5 problems of `expected.jsonl` with the
//! artifact's chat template, generate greedily, and require the exact prompt and completion token
//! ids (and the completion text and answer) that transformers fp32 produced (`eval_hf.py`).

use std::path::{Path, PathBuf};

use r1_engine::eval::{self, EvalOptions};
use r1_engine::text::{ChatTemplate, Tokenizer};
use r1_engine::{BackendKind, Engine, EngineOptions};
use r1_export::{export, ExportOptions};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/arith-r1")
}

/// One line of `expected.jsonl` (the fields this test checks).
#[derive(serde::Deserialize)]
struct Expected {
    prompt_token_ids: Vec<u32>,
    completion: String,
    completion_token_ids: Vec<u32>,
    finished_by_eos: bool,
    answer: String,
}

#[test]
fn arith_r1_greedy_completions_match_transformers_on_ort_and_tract() {
    let expected_path = fixture().join("expected.jsonl");
    let text = std::fs::read_to_string(&expected_path).unwrap();
    let expected: Vec<Expected> =
        text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
    let problems = eval::parse_problems(&text, &expected_path).unwrap();
    assert_eq!((problems.len(), expected.len()), (5, 5), "expected.jsonl holds 5 problems");

    let tmp = tempfile::tempdir().unwrap();
    let art = tmp.path().join("arith-fp32");
    let manifest = export(&ExportOptions::new(fixture(), &art), &mut |_| {}).unwrap();
    assert_eq!((manifest.family.name(), manifest.precision.name()), ("deepseek_v3", "fp32"));

    let tokenizer = Tokenizer::from_dir(&art).unwrap();
    assert_eq!(tokenizer.eos_token_ids(), &[1], "EOS from generation_config.json");
    let template = ChatTemplate::from_config(tokenizer.config(), None, false).unwrap();

    // Different batch shapes per backend: all 5 problems in one batch on ort, batches of 2 (padding,
    // sequences finishing at different steps) on tract. Both must reproduce transformers exactly.
    for (kind, batch) in [(BackendKind::Ort, 5), (BackendKind::Tract, 2)] {
        let opts = EngineOptions { backend: kind, ..Default::default() };
        let mut engine = Engine::load(&art, &opts).unwrap_or_else(|e| panic!("loading the artifact on {kind:?}: {e}"));
        let eval_opts = EvalOptions { batch, max_new_tokens: 64, ..Default::default() };
        let report =
            eval::evaluate(&mut engine, &tokenizer, &template, &problems, &eval_opts, &mut |_, _, _| {}).unwrap();
        let backend = report.backend.clone();
        assert_eq!(report.total, 5);
        for (got, want) in report.results.iter().zip(&expected) {
            assert_eq!(got.prompt_token_ids, want.prompt_token_ids, "{backend}: prompt ids of {:?}", got.question);
            assert_eq!(
                got.completion_token_ids, want.completion_token_ids,
                "{backend}: completion ids of {:?}",
                got.question
            );
            assert_eq!(got.completion, want.completion, "{backend}: completion text of {:?}", got.question);
            assert_eq!(got.finished_by_eos, want.finished_by_eos, "{backend}: {:?}", got.question);
            assert_eq!(got.got, want.answer, "{backend}: answer of {:?}", got.question);
        }
        assert_eq!(report.correct, 5, "{backend}: {}", report.summary());
        println!("{}", report.summary());
    }
}
