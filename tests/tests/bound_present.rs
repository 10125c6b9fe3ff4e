//! The portable graph with its present bound where the session runs (`engine/src/backend/ort_bound.rs`, issue #16):
//! how the TensorRT execution provider (and the CUDA provider without a serving graph) keeps the KV cache on the GPU
//! between decode steps, feeding each step's present back as the next step's past and copying out only the new
//! positions. CI has no GPU, so the same binding runs here on the CPU provider (`BackendOptions::bind_present`).
//!
//! What must hold: transformers' logits (the golden files, float32 and float16), the host path's greedy tokens and
//! logits, batched = single, and a steady decode step that copies only its new positions into the engine's pool
//! (the host path of a float16 graph gathers every row's whole cache instead).

use std::path::Path;

use r1_engine::backend::ort::PresentBinding;
use r1_engine::backend::{self, BackendKind, BackendOptions, ExecutionProviderKind};
use r1_engine::manifest::Precision;
use r1_engine::{Engine, Manifest, StepWork};
use r1_tests::{drive_engine, export_case, golden_dir, Golden};

/// `bind_present`: the binding forced on (`Always`), else forced off (`Never`, what `R1_BIND_PRESENT=never` asks
/// of r1-serve; on the CPU provider the same as the default).
fn options(bind_present: bool) -> BackendOptions {
    let bind_present = if bind_present { PresentBinding::Always } else { PresentBinding::Never };
    BackendOptions { execution_provider: ExecutionProviderKind::Cpu, bind_present, ..Default::default() }
}

fn engine(dir: &Path, m: &Manifest, bind_present: bool) -> Engine {
    let b = backend::load(dir, m, BackendKind::Ort, &options(bind_present)).expect("load the portable graph");
    assert!(!b.steps_in_place(), "no cpu build: the portable graph");
    if bind_present {
        assert!(b.can_feed_kept(), "a bound present is fed back whatever the cache type");
    }
    Engine::from_backend(dir, m.clone(), b, None).expect("engine")
}

#[test]
fn a_bound_present_matches_transformers_at_fp32_and_fp16() {
    let case = golden_dir().join("qwen2_gqa2_bf16");
    let g = Golden::load(&case).expect("golden");
    let tmp = tempfile::tempdir().expect("tempdir");
    for (precision, tolerance) in [(Precision::Fp32, 1e-4), (Precision::Fp16, 2e-2)] {
        let dir = tmp.path().join(precision.to_string());
        let m = export_case(&case, &dir, precision).expect("export");
        let mut e = engine(&dir, &m, true);
        // Row 0 prefills in chunks of 2, so passes mix prefill chunks with decode rows (the present is then not
        // kept and the next pass gathers from the pool) before the batch settles into kept decode steps.
        for chunk in [None, Some(2)] {
            let (err, wrong) = drive_engine(&mut e, &g, chunk);
            println!("bound present, {precision}, chunk {chunk:?}: relative logit error {err:.2e}");
            assert!(err <= tolerance, "{precision}: relative logit error {err:.3e} exceeds {tolerance:.0e}");
            assert!(wrong.is_empty(), "{precision}: greedy tokens differ from transformers' at {wrong:?}");
        }
    }
}

#[test]
fn a_bound_present_gives_the_host_paths_tokens_and_copies_only_new_positions() {
    let case = golden_dir().join("qwen2_gqa2_bf16");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("fp16");
    let m = export_case(&case, &dir, Precision::Fp16).expect("export");
    let (mut bound, mut host) = (engine(&dir, &m, true), engine(&dir, &m, false));
    let prompts = r1_tests::ragged_prompts(m.model.vocab_size as u32);

    let singles: Vec<Vec<u32>> = prompts.iter().map(|p| host.generate_greedy(p, 8, &[]).expect("host")).collect();
    let batched =
        bound.generate_batch_with(&prompts, 8, &[], 3, |l| Ok(r1_engine::generate::argmax(l))).expect("bound batch");
    assert_eq!(batched, singles, "bound present, batched (chunked prefill) = the host path's singles");

    // Step by step, the same logits as the host path (same graph, same values: the host pool's float32 copy of a
    // float16 cache converts back exactly).
    let (a, b) = (bound.add_sequence(&prompts[2], 4).unwrap(), host.add_sequence(&prompts[2], 4).unwrap());
    for step in 0..4 {
        let ra = bound.step(&[StepWork::all(a)]).expect("bound step").remove(0);
        let rb = host.step(&[StepWork::all(b)]).expect("host step").remove(0);
        assert_eq!(ra.logits, rb.logits, "step {step}: logits of the bound and host paths");
        let t = r1_engine::generate::argmax(&ra.logits);
        bound.push_token(a, t).unwrap();
        host.push_token(b, t).unwrap();
    }
    bound.remove_sequence(a);
    host.remove_sequence(b);

    // A steady decode step appends one position per row to the pool and gathers nothing; the host path of a float16
    // graph (whose present it cannot feed back) gathers each row's whole cache every step.
    let rows = &prompts[..3];
    let per_position = bound.kv_pool().bytes_per_position() as u64;
    let copied = r1_tests::decode_copied_bytes(&mut bound, rows, 3);
    assert_eq!(copied, vec![3 * per_position; 3], "bound present: bytes each decode step copied into the pool");
    let gathered = r1_tests::decode_copied_bytes(&mut host, rows, 3);
    assert!(gathered.iter().all(|&g| g > 3 * 3 * per_position), "the host path gathers the past: {gathered:?}");
    println!("bytes copied per decode step of 3 rows: bound {copied:?}, host path {gathered:?}");
}
