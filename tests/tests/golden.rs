//! Golden suite: every case under `tests/fixtures/golden/` is exported (fp32 and fp16) and run on
//! ONNX Runtime and on tract; logits must match transformers' (relative error ≤ 1e-4 fp32, ≤ 2e-2
//! fp16) and the greedy tokens must be identical. Plus: a left-padded batch gives the same logits as
//! each prompt run alone.

use ndarray::{s, Array2};
use r1_engine::backend::{self, BackendKind, BackendOptions, StepInput};
use r1_export::Precision;
use r1_tests::{empty_past, export_case, golden_cases, golden_tokens, rel_err, run_golden, Golden};

const BACKENDS: [BackendKind; 2] = [BackendKind::Ort, BackendKind::Tract];

fn tolerance(p: Precision) -> f32 {
    match p {
        Precision::Fp32 => 1e-4,
        Precision::Fp16 => 2e-2,
    }
}

#[test]
fn every_golden_case_matches_transformers_on_ort_and_tract() {
    let cases = golden_cases();
    assert!(cases.len() >= 5, "expected the dense golden cases, found {cases:?}");
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let g = Golden::load(case).unwrap();
        for precision in [Precision::Fp32, Precision::Fp16] {
            let out = tmp.path().join(format!("{name}-{}", precision.name()));
            let m = match export_case(case, &out, precision) {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!("{name} {}: export failed: {e:#}", precision.name()));
                    continue;
                }
            };
            for kind in BACKENDS {
                let mut label = format!("{name} {} {kind:?}", precision.name());
                let run = backend::load(&out, &m, kind, &BackendOptions::default())
                    .map_err(anyhow::Error::from)
                    .and_then(|mut be| {
                        // The backend's own name says which execution provider ran (ort-cpu, ort-cuda, ...).
                        label = format!("{name} {} {}", precision.name(), be.name());
                        run_golden(be.as_mut(), &m, &g)
                    });
                match run {
                    Err(e) => failures.push(format!("{label}: {e:#}")),
                    Ok(r) => {
                        report.push(format!("{label}: rel err {:.2e}", r.max_rel_err));
                        if !(r.max_rel_err <= tolerance(precision)) {
                            failures.push(format!(
                                "{label}: relative logit error {:.3e} exceeds {:.0e}",
                                r.max_rel_err,
                                tolerance(precision)
                            ));
                        }
                        if r.tokens != golden_tokens(&g) {
                            failures.push(format!("{label}: greedy tokens {:?}, transformers {:?}", r.tokens, golden_tokens(&g)));
                        }
                    }
                }
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn left_padded_batch_equals_each_prompt_alone() {
    let tmp = tempfile::tempdir().unwrap();
    // Dense cases only (the DeepseekV3 suite covers its own family).
    let cases: Vec<_> = golden_cases()
        .into_iter()
        .filter(|c| !c.file_name().unwrap().to_string_lossy().starts_with("deepseek"))
        .collect();
    assert!(!cases.is_empty());
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let g = Golden::load(&case).unwrap();
        let out = tmp.path().join(&name);
        let m = export_case(&case, &out, Precision::Fp32).unwrap();
        for kind in BACKENDS {
            let mut be = backend::load(&out, &m, kind, &BackendOptions::default()).unwrap();
            let (b, p) = g.input_ids.dim();
            let batch = be
                .run(&StepInput {
                    input_ids: g.input_ids.clone(),
                    attention_mask: g.attention_mask.clone(),
                    position_ids: g.position_ids.clone(),
                    past: empty_past(&m, b),
                })
                .unwrap();
            for r in 0..b {
                let start = (0..p).find(|&t| g.attention_mask[[r, t]] == 1).unwrap();
                let n = p - start;
                let ids = g.input_ids.slice(s![r..r + 1, start..]).to_owned();
                let alone = be
                    .run(&StepInput {
                        input_ids: ids,
                        attention_mask: Array2::ones((1, n)),
                        position_ids: Array2::from_shape_fn((1, n), |(_, t)| t as i64),
                        past: empty_past(&m, 1),
                    })
                    .unwrap();
                let from_batch = batch.logits.slice(s![r..r + 1, start.., ..]).to_owned();
                let e = rel_err(&alone.logits, &from_batch, |_, _| true).unwrap();
                assert!(e <= 1e-4, "{name} {kind:?} row {r}: batch vs alone relative error {e:.3e}");
            }
        }
    }
}
