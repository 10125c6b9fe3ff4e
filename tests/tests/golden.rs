//! Golden suite: every case under `tests/fixtures/golden/` is exported (fp32 and fp16) and run on
//! ONNX Runtime and on tract; logits must match transformers' (relative error ≤ 1e-4 fp32, ≤ 2e-2
//! fp16) and the greedy tokens must be identical, for each reference of the case: positions from 0 and, where the
//! case has one, the far-position reference (position_ids from 60,000). Plus: a left-padded batch gives the same
//! logits as each prompt run alone.

use ndarray::{s, Array2};
use r1_engine::backend::{self, BackendKind, BackendOptions, StepInput};
use r1_export::Precision;
use r1_tests::{empty_past, export_case, golden_cases, golden_meta, golden_tokens, rel_err, run_golden, Golden};

const BACKENDS: [BackendKind; 2] = [BackendKind::Ort, BackendKind::Tract];

fn tolerance(p: Precision) -> f32 {
    match p {
        Precision::Fp32 => 1e-4,
        Precision::Fp16 => 2e-2,
        quantized => panic!("the golden cases are exported at fp32 and fp16, not {quantized}"),
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
        let refs = Golden::load_all(case).unwrap();
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
                let mut be = match backend::load(&out, &m, kind, &BackendOptions::default()) {
                    Ok(be) => be,
                    Err(e) => {
                        failures.push(format!("{name} {} {kind:?}: {e:#}", precision.name()));
                        continue;
                    }
                };
                for (variant, g) in &refs {
                    // The backend's own name says which execution provider ran (ort-cpu, ort-cuda, ...).
                    let label = format!("{name}{} {} {}", with_space(variant), precision.name(), be.name());
                    match run_golden(be.as_mut(), &m, g) {
                        Err(e) => failures.push(format!("{label}: {e:#}")),
                        Ok(r) => {
                            report.push(format!("{label}: rel err {:.2e}", r.max_rel_err));
                            if r.max_rel_err.is_nan() || r.max_rel_err > tolerance(precision) {
                                failures.push(format!(
                                    "{label}: relative logit error {:.3e} exceeds {:.0e}",
                                    r.max_rel_err,
                                    tolerance(precision)
                                ));
                            }
                            if r.tokens != golden_tokens(g) {
                                failures.push(format!(
                                    "{label}: greedy tokens {:?}, transformers {:?}",
                                    r.tokens,
                                    golden_tokens(g)
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

/// `" far 60000"` for a labelled reference, `""` for the reference at positions from 0.
fn with_space(variant: &str) -> String {
    if variant.is_empty() {
        String::new()
    } else {
        format!(" {variant}")
    }
}

/// The golden cases of the dense families, by golden.json's `family` (the DeepseekV3 suite covers its own family).
fn dense_cases() -> Vec<std::path::PathBuf> {
    golden_cases().into_iter().filter(|c| golden_meta(c).unwrap()["family"] != "deepseek_v3").collect()
}

#[test]
fn left_padded_batch_equals_each_prompt_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = dense_cases();
    assert!(!cases.is_empty());
    for case in cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let out = tmp.path().join(&name);
        let m = export_case(&case, &out, Precision::Fp32).unwrap();
        let refs = Golden::load_all(&case).unwrap();
        for kind in BACKENDS {
            let mut be = backend::load(&out, &m, kind, &BackendOptions::default()).unwrap();
            for (variant, g) in &refs {
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
                    // The row alone, at the positions it has in the batch (0.. or, far, 60000..).
                    let alone = be
                        .run(&StepInput {
                            input_ids: g.input_ids.slice(s![r..r + 1, start..]).to_owned(),
                            attention_mask: Array2::ones((1, n)),
                            position_ids: g.position_ids.slice(s![r..r + 1, start..]).to_owned(),
                            past: empty_past(&m, 1),
                        })
                        .unwrap();
                    let from_batch = batch.logits.slice(s![r..r + 1, start.., ..]).to_owned();
                    let e = rel_err(&alone.logits, &from_batch, |_, _| true).unwrap();
                    assert!(
                        e <= 1e-4,
                        "{name}{} {kind:?} row {r}: batch vs alone relative error {e:.3e}",
                        with_space(variant)
                    );
                }
            }
        }
    }
}

/// The serving graph `r1-export --target cpu` writes for ONNX Runtime (last-position logits; each layer's attention
/// fused into `GroupQueryAttention` where the kernel takes the head size) matches transformers too, driven through
/// the engine the way the server drives it: row 0's prompt prefilled in chunks of 2 while the other rows already
/// decode (steps the engine splits into passes for the fused kernel), every row teacher-forced with the reference's
/// decode tokens. Only the reference at positions from 0: the engine numbers a sequence's positions from 0, so the
/// far-position references run on the portable graph only.
#[test]
fn serving_graph_matches_transformers_through_the_engine() {
    use r1_engine::{Engine, EngineOptions, StepWork};
    use r1_export::target::{self, Mode, TargetOptions};
    let tmp = tempfile::tempdir().unwrap();
    let cases = dense_cases();
    let mut fused_cases = 0;
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let g = Golden::load(case).unwrap();
        for precision in [Precision::Fp32, Precision::Fp16] {
            let out = tmp.path().join(format!("{name}-{}", precision.name()));
            let m = export_case(case, &out, precision).unwrap();
            target::apply(
                &out,
                &TargetOptions { targets: vec!["cpu".into()], ..Default::default() },
                Mode::AfterExport,
                &mut |_, _| {},
            )
            .unwrap();
            let m2 = r1_engine::Manifest::load(&out).unwrap();
            let fused = m2.targets.cpu().is_some_and(|c| c.fused_attention);
            let head_dim = m.config["head_dim"].as_u64().unwrap() as usize;
            assert_eq!(
                fused,
                head_dim.is_multiple_of(16),
                "{name}: fused attention recorded {fused} for head_dim {head_dim}"
            );
            fused_cases += usize::from(fused);
            let opts = EngineOptions { backend: BackendKind::Ort, ..Default::default() };
            let mut e = Engine::load(&out, &opts).unwrap();
            let (b, p) = g.input_ids.dim();
            let n = g.decode_input_ids.ncols();
            let seqs: Vec<_> =
                r1_tests::golden_prompts(&g).iter().map(|prompt| e.add_sequence(prompt, n + 1).unwrap()).collect();
            // next[r]: how many reference logits row r has matched (0 = the prompt's last position).
            let mut next = vec![0usize; b];
            let mut err = 0f32;
            while next.iter().any(|&k| k <= n) {
                let work: Vec<StepWork> = (0..b)
                    .filter(|&r| next[r] <= n)
                    .map(|r| if r == 0 { StepWork::chunk(seqs[r], 2) } else { StepWork::all(seqs[r]) })
                    .collect();
                for res in e.step(&work).unwrap() {
                    let r = seqs.iter().position(|s| *s == res.seq).unwrap();
                    let k = next[r];
                    let want = if k == 0 {
                        g.prefill_logits.slice(s![r, p - 1, ..])
                    } else {
                        g.decode_logits.slice(s![r, k - 1, ..])
                    };
                    let got = ndarray::Array3::from_shape_vec((1, 1, res.logits.len()), res.logits).unwrap();
                    let want = want.to_owned().into_shape_with_order((1, 1, got.len())).unwrap();
                    err = err.max(rel_err(&got, &want, |_, _| true).unwrap());
                    if k < n {
                        e.push_token(res.seq, g.decode_input_ids[[r, k]] as u32).unwrap();
                    }
                    next[r] += 1;
                }
            }
            let label = format!("{name} {} {} (fused attention: {fused})", precision.name(), e.backend_name());
            report.push(format!("{label}: rel err {err:.2e}"));
            if err.is_nan() || err > tolerance(precision) {
                failures.push(format!("{label}: relative logit error {err:.3e} exceeds {:.0e}", tolerance(precision)));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
    assert!(
        fused_cases >= 2 * 3,
        "expected at least 3 dense cases with a fusable head size, fused {fused_cases} exports"
    );
}
