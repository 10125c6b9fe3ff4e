//! Conformance suite: every backend runs the same cases on the same artifacts.
//!
//! Fixtures: `tests/fixtures/tiny` (float32 KV) and `tests/fixtures/tiny-kv16` (float16 KV at the
//! graph boundary), made by `tests/fixtures/make_tiny.py`, whose `expected.json` holds greedy
//! continuations computed by onnxruntime (Python) without any cache — an independent reference for
//! the engine's cached, padded, batched path.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::{engine, expected, fixture, open_backend, FIXTURES, KINDS};
use r1_engine::backend::{self, Backend, BackendKind, BackendOptions, KeptPresent, StepInput, StepOutput};
use r1_engine::{Engine, EngineError, Manifest, StepWork};

#[test]
fn backends_report_their_names() {
    // ort runs on the CPU provider unless this host has a GPU and an ONNX Runtime with a GPU provider
    // (scripts/gpu_check.sh runs this suite there: then ort-cuda or ort-tensorrt).
    let ort = engine("tiny", BackendKind::Ort).backend_name();
    if r1_engine::targets::detect_local_gpu().is_none() {
        assert_eq!(ort, "ort-cpu");
    } else {
        assert!(["ort-cpu", "ort-cuda", "ort-tensorrt"].contains(&ort), "{ort}");
    }
    assert_eq!(engine("tiny", BackendKind::Tract).backend_name(), "tract");
}

#[test]
fn single_greedy_generation_matches_the_reference() {
    for fx in FIXTURES {
        let exp = expected(fx);
        for kind in KINDS {
            let mut e = engine(fx, kind);
            for (prompt, want) in &exp.cases {
                let got = e.generate_greedy(prompt, exp.new_tokens, &[]).unwrap();
                assert_eq!(&got, want, "{fx} {kind:?} prompt {prompt:?}");
            }
            assert_eq!(e.num_sequences(), 0);
            // Every block is free or held by a retained prefix (the prefix cache keeps finished sequences).
            assert_eq!(e.kv_budget().used_blocks(), e.retained_blocks());
        }
    }
}

#[test]
fn batched_greedy_equals_single_generations() {
    for fx in FIXTURES {
        let exp = expected(fx);
        let prompts: Vec<Vec<u32>> = exp.cases.iter().map(|(p, _)| p.clone()).collect();
        for kind in KINDS {
            let mut e = engine(fx, kind);
            let singles: Vec<Vec<u32>> =
                prompts.iter().map(|p| e.generate_greedy(p, exp.new_tokens, &[]).unwrap()).collect();
            // Whole prompts at once, and 3-token prefill chunks mixed with other rows' decode steps.
            for chunk in [usize::MAX, 3, 1] {
                let batched = e
                    .generate_batch_with(&prompts, exp.new_tokens, &[], chunk, |l| Ok(r1_engine::generate::argmax(l)))
                    .unwrap();
                assert_eq!(batched, singles, "{fx} {kind:?} chunk {chunk}");
            }
        }
    }
}

#[test]
fn batched_logits_match_single_logits_numerically() {
    let exp = expected("tiny");
    for kind in KINDS {
        let mut e = engine("tiny", kind);
        let mut single = Vec::new();
        for (p, _) in &exp.cases {
            let id = e.add_sequence(p, 0).unwrap();
            let out = e.step(&[StepWork::all(id)]).unwrap();
            single.push(out[0].logits.clone());
            e.remove_sequence(id);
        }
        let ids: Vec<_> = exp.cases.iter().map(|(p, _)| e.add_sequence(p, 0).unwrap()).collect();
        let work: Vec<_> = ids.iter().map(|&id| StepWork::all(id)).collect();
        let out = e.step(&work).unwrap();
        assert_eq!(out.len(), ids.len());
        for (i, r) in out.iter().enumerate() {
            assert_eq!(r.seq, ids[i]);
            let max_diff = r.logits.iter().zip(&single[i]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            // Padding changes matmul shapes (and so summation order), not values: 1e-3 on logits of
            // magnitude ~10 is float rounding; a masking or position bug shows up as O(1).
            assert!(max_diff < 1e-3, "{kind:?} row {i}: max |batched - single| = {max_diff}");
        }
    }
}

#[test]
fn ort_and_tract_agree_on_logits() {
    let prompt = &expected("tiny").cases[2].0;
    let mut a = engine("tiny", BackendKind::Ort);
    let mut b = engine("tiny", BackendKind::Tract);
    let la = {
        let id = a.add_sequence(prompt, 0).unwrap();
        a.step(&[StepWork::all(id)]).unwrap().remove(0).logits
    };
    let lb = {
        let id = b.add_sequence(prompt, 0).unwrap();
        b.step(&[StepWork::all(id)]).unwrap().remove(0).logits
    };
    let max_diff = la.iter().zip(&lb).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(max_diff < 1e-4, "max |ort - tract| = {max_diff}");
}

/// Wraps a backend and fails the next run when told to (fault injection).
struct Flaky {
    inner: Box<dyn Backend>,
    fail: Arc<AtomicBool>,
}

impl Backend for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    fn run(&mut self, input: &StepInput) -> r1_engine::Result<StepOutput> {
        if self.fail.swap(false, Ordering::SeqCst) {
            return Err(EngineError::Backend { backend: "flaky", message: "injected failure".into() });
        }
        self.inner.run(input)
    }
    fn last_position_logits(&self) -> bool {
        self.inner.last_position_logits()
    }
}

/// Forwards to a backend and counts the steps fed from a kept present; with `host_only` it hides that ability, so the
/// engine gathers every step's past from its host caches.
struct Counting {
    inner: Box<dyn Backend>,
    host_only: bool,
    fed_kept: Arc<AtomicUsize>,
}

impl Backend for Counting {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn run(&mut self, input: &StepInput) -> r1_engine::Result<StepOutput> {
        self.inner.run(input)
    }
    fn can_feed_kept(&self) -> bool {
        !self.host_only && self.inner.can_feed_kept()
    }
    fn last_position_logits(&self) -> bool {
        self.inner.last_position_logits()
    }
    fn run_keep(
        &mut self,
        input: &StepInput,
        past: Option<&KeptPresent>,
    ) -> r1_engine::Result<(ndarray::Array3<f32>, KeptPresent)> {
        if past.is_some() {
            self.fed_kept.fetch_add(1, Ordering::SeqCst);
        }
        if self.host_only {
            let out = self.inner.run(input)?;
            return Ok((out.logits, KeptPresent::Host(out.present)));
        }
        self.inner.run_keep(input, past)
    }
}

#[test]
fn feeding_the_kept_present_back_equals_gathering_the_host_caches() {
    // Steps whose rows repeat the previous step's rows take the present kept in the backend as their past (no copy
    // of the caches); any other step gathers the host caches. Both must give the same logits, bit for bit.
    let exp = expected("tiny");
    for kind in KINDS {
        let mut engines = Vec::new();
        let mut counters = Vec::new();
        for host_only in [false, true] {
            let (manifest, inner) = open_backend("tiny", kind);
            assert!(inner.can_feed_kept(), "{kind:?}: a float32-KV graph can feed its present back");
            let fed = Arc::new(AtomicUsize::new(0));
            counters.push(fed.clone());
            engines.push(
                Engine::from_backend(
                    &fixture("tiny"),
                    manifest,
                    Box::new(Counting { inner, host_only, fed_kept: fed }),
                    None,
                )
                .unwrap(),
            );
        }
        let mut logs: Vec<Vec<Vec<f32>>> = Vec::new();
        for e in &mut engines {
            let mut log = Vec::new();
            let mut run = |e: &mut Engine, ids: &[r1_engine::SequenceId]| {
                let work: Vec<_> = ids.iter().map(|&id| StepWork::all(id)).collect();
                for r in e.step(&work).unwrap() {
                    e.push_token(r.seq, r1_engine::generate::argmax(&r.logits)).unwrap();
                    log.push(r.logits);
                }
            };
            let ids: Vec<_> = exp.cases[..3].iter().map(|(p, _)| e.add_sequence(p, 8).unwrap()).collect();
            run(e, &ids); // prefill of unequal prompts: right padded, so not kept
            for _ in 0..3 {
                run(e, &ids); // gathers, then fed back twice
            }
            assert!(e.remove_sequence(ids[1]));
            let rest = [ids[0], ids[2]];
            for _ in 0..2 {
                run(e, &rest); // gathers (rows changed), then fed back once
            }
            logs.push(log);
        }
        assert_eq!(counters[0].load(Ordering::SeqCst), 3, "{kind:?}: steps fed from the kept present");
        assert_eq!(counters[1].load(Ordering::SeqCst), 0);
        assert_eq!(logs[0].len(), 3 + 9 + 4);
        assert!(logs[0] == logs[1], "{kind:?}: kept-present steps differ from host-gathered steps");
    }
}

#[test]
fn a_failed_step_leaves_every_sequence_unchanged() {
    let exp = expected("tiny");
    let (manifest, inner) = open_backend("tiny", BackendKind::Tract);
    let fail = Arc::new(AtomicBool::new(false));
    let mut e =
        Engine::from_backend(&fixture("tiny"), manifest, Box::new(Flaky { inner, fail: fail.clone() }), None).unwrap();
    let (p0, w0) = &exp.cases[0];
    let (p1, w1) = &exp.cases[1];
    let a = e.add_sequence(p0, 4).unwrap();
    let b = e.add_sequence(p1, 4).unwrap();
    // a: prefill fully, then one decode token pending; b: prefill pending.
    let first = e.step(&[StepWork::all(a)]).unwrap();
    e.push_token(a, r1_engine::generate::argmax(&first[0].logits)).unwrap();
    let before = (
        e.cached_tokens(a).unwrap(),
        e.pending_tokens(a).unwrap(),
        e.cached_tokens(b).unwrap(),
        e.pending_tokens(b).unwrap(),
    );
    fail.store(true, Ordering::SeqCst);
    let err = e.step(&[StepWork::all(a), StepWork::all(b)]).unwrap_err();
    assert_eq!(err.kind(), "backend");
    let after = (
        e.cached_tokens(a).unwrap(),
        e.pending_tokens(a).unwrap(),
        e.cached_tokens(b).unwrap(),
        e.pending_tokens(b).unwrap(),
    );
    assert_eq!(before, after);
    // The same batch now succeeds and continues exactly like the reference.
    let out = e.step(&[StepWork::all(a), StepWork::all(b)]).unwrap();
    assert_eq!(first[0].seq, a);
    assert_eq!(r1_engine::generate::argmax(&first[0].logits), w0[0]);
    assert_eq!(r1_engine::generate::argmax(&out[0].logits), w0[1]);
    assert_eq!(r1_engine::generate::argmax(&out[1].logits), w1[0]);
}

/// Forwards to a backend under the limit of ONNX Runtime's CPU `GroupQueryAttention` (the fused serving graph): a
/// pass with several rows, more than one new token and a past is refused, as the kernel refuses it. Counts passes,
/// and fails the `fail_at`-th one (fault injection in the middle of a split step).
struct OneChunkWithPast {
    inner: Box<dyn Backend>,
    passes: Arc<AtomicUsize>,
    fail_at: Option<usize>,
}

impl Backend for OneChunkWithPast {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn run(&mut self, input: &StepInput) -> r1_engine::Result<StepOutput> {
        let (b, s) = input.input_ids.dim();
        let past = input.attention_mask.ncols() - s;
        let n = self.passes.fetch_add(1, Ordering::SeqCst) + 1;
        if b > 1 && s > 1 && past > 0 {
            return Err(EngineError::Backend {
                backend: "one-chunk",
                message: format!("{b} rows of {s} tokens with a past of {past}"),
            });
        }
        if self.fail_at == Some(n) {
            return Err(EngineError::Backend { backend: "one-chunk", message: "injected failure".into() });
        }
        self.inner.run(input)
    }
    fn last_position_logits(&self) -> bool {
        self.inner.last_position_logits()
    }
    fn batches_chunks_with_past(&self) -> bool {
        false
    }
}

#[test]
fn steps_split_for_a_backend_that_cannot_batch_chunks_with_a_past() {
    // The fused serving graph's limit: the engine runs decode rows together, first chunks together and each later
    // chunk alone, and the generations stay equal to single-sequence ones (both backends, both fixtures).
    for fx in FIXTURES {
        let exp = expected(fx);
        let prompts: Vec<Vec<u32>> = exp.cases.iter().map(|(p, _)| p.clone()).collect();
        for kind in KINDS {
            let mut plain = engine(fx, kind);
            let singles: Vec<Vec<u32>> =
                prompts.iter().map(|p| plain.generate_greedy(p, exp.new_tokens, &[]).unwrap()).collect();
            let (manifest, inner) = open_backend(fx, kind);
            let passes = Arc::new(AtomicUsize::new(0));
            let wrapped = OneChunkWithPast { inner, passes: passes.clone(), fail_at: None };
            let mut e = Engine::from_backend(&fixture(fx), manifest, Box::new(wrapped), None).unwrap();
            for chunk in [usize::MAX, 3, 1] {
                let batched = e
                    .generate_batch_with(&prompts, exp.new_tokens, &[], chunk, |l| Ok(r1_engine::generate::argmax(l)))
                    .unwrap();
                assert_eq!(batched, singles, "{fx} {kind:?} chunk {chunk}");
            }
            assert!(passes.load(Ordering::SeqCst) > 0);
        }
    }
}

#[test]
fn a_split_step_that_fails_in_its_second_pass_leaves_every_sequence_unchanged() {
    let exp = expected("tiny");
    let (p0, w0) = &exp.cases[1];
    let (p1, _) = &exp.cases[2];
    assert!(p1.len() >= 3, "case 2 needs a prompt of 3+ tokens to be chunked");
    let (manifest, inner) = open_backend("tiny", BackendKind::Tract);
    let passes = Arc::new(AtomicUsize::new(0));
    // Pass 1: a's prefill and b's first chunk; pass 2 (a decodes) runs; pass 3 (b's second chunk) fails.
    let wrapped = OneChunkWithPast { inner, passes: passes.clone(), fail_at: Some(3) };
    let mut e = Engine::from_backend(&fixture("tiny"), manifest, Box::new(wrapped), None).unwrap();
    let a = e.add_sequence(p0, 4).unwrap();
    let b = e.add_sequence(p1, 4).unwrap();
    let first = e.step(&[StepWork::all(a), StepWork::chunk(b, 1)]).unwrap();
    assert_eq!(first.len(), 1, "only a completes its prompt");
    e.push_token(a, r1_engine::generate::argmax(&first[0].logits)).unwrap();
    let state = |e: &Engine| [a, b].map(|s| (e.cached_tokens(s).unwrap(), e.pending_tokens(s).unwrap()));
    let before = state(&e);
    let err = e.step(&[StepWork::all(a), StepWork::chunk(b, 2)]).unwrap_err();
    assert_eq!(err.kind(), "backend");
    assert_eq!(passes.load(Ordering::SeqCst), 3, "the step was split into two passes");
    assert_eq!(state(&e), before, "no sequence changed although the first pass had run");
    // The same step now succeeds, and a continues exactly like the reference.
    let out = e.step(&[StepWork::all(a), StepWork::chunk(b, 2)]).unwrap();
    assert_eq!(out[0].seq, a);
    assert_eq!(r1_engine::generate::argmax(&out[0].logits), w0[1]);
}

#[test]
fn invalid_work_is_rejected_before_running() {
    let mut e = engine("tiny", BackendKind::Tract);
    let a = e.add_sequence(&[1, 2, 3], 2).unwrap();
    assert_eq!(e.step(&[]).unwrap_err().kind(), "invalid_argument");
    assert_eq!(e.step(&[StepWork::all(a), StepWork::all(a)]).unwrap_err().kind(), "invalid_argument");
    assert_eq!(e.step(&[StepWork::chunk(a, 0)]).unwrap_err().kind(), "invalid_argument");
    let missing = r1_engine::SequenceId(999);
    assert_eq!(e.step(&[StepWork::all(missing)]).unwrap_err().kind(), "not_found");
    // Prefill in chunks: 2 then 1; only the completing step returns logits.
    assert!(e.step(&[StepWork::chunk(a, 2)]).unwrap().is_empty());
    assert_eq!((e.cached_tokens(a).unwrap(), e.pending_tokens(a).unwrap()), (2, 1));
    assert_eq!(e.step(&[StepWork::chunk(a, 2)]).unwrap().len(), 1);
    // Nothing pending now: stepping it again is a caller error.
    let err = e.step(&[StepWork::all(a)]).unwrap_err().to_string();
    assert!(err.contains("push_token first"), "{err}");
    let vocab = e.manifest().model.vocab_size as u32;
    assert_eq!(e.push_token(a, vocab).unwrap_err().kind(), "invalid_argument");
    assert_eq!(e.add_sequence(&[vocab + 5], 1).unwrap_err().kind(), "invalid_argument");
    assert_eq!(e.add_sequence(&[], 1).unwrap_err().kind(), "invalid_argument");
    let too_long = e.manifest().model.max_position_embeddings;
    let err = e.add_sequence(&[1], too_long).unwrap_err().to_string();
    assert!(
        err.contains(&format!("context length {too_long} (")) && err.contains(&format!("got {}", too_long + 1)),
        "{err}"
    );
}

#[test]
fn auto_backend_finds_onnx_runtime_here() {
    // This host has the onnxruntime wheel (or .r1/lib, or ORT_DYLIB_PATH). Without a GPU auto = ort on CPU; on a
    // GPU host (scripts/gpu_check.sh) ort on whichever provider its ONNX Runtime and TensorRT install allow.
    let dir = fixture("tiny");
    let manifest = Manifest::load(&dir).unwrap();
    let b = backend::load(&dir, &manifest, BackendKind::Auto, &BackendOptions::default()).unwrap();
    match r1_engine::targets::detect_local_gpu() {
        None => assert_eq!(b.name(), "ort-cpu"),
        Some(gpu) => assert!(b.name().starts_with("ort-"), "{} on {}", b.name(), gpu.name),
    }
}

#[test]
fn explicit_gpu_provider_without_gpu_fails_clearly() {
    if r1_engine::targets::detect_local_gpu().is_some() {
        return; // only meaningful on a GPU-less host
    }
    let dir = fixture("tiny");
    let manifest = Manifest::load(&dir).unwrap();
    for ep in ["tensorrt", "cuda"] {
        let opts = BackendOptions { execution_provider: ep.parse().unwrap(), ..BackendOptions::default() };
        let err = backend::load(&dir, &manifest, BackendKind::Ort, &opts).err().expect("must fail without a GPU");
        assert_eq!(err.kind(), "unavailable");
        assert!(err.to_string().contains("no NVIDIA GPU was found"), "{err}");
    }
}

#[test]
fn generate_with_sampling_params_is_greedy_or_seeded_reproducible() {
    use r1_engine::sampling::SamplingParams;
    let exp = expected("tiny");
    let (prompt, want) = &exp.cases[0];
    for kind in KINDS {
        let mut e = engine("tiny", kind);
        assert_eq!(&e.generate(prompt, &SamplingParams::greedy(), exp.new_tokens, &[]).unwrap(), want, "{kind:?}");
        let seeded = SamplingParams { temperature: 1.5, top_k: 20, seed: Some(7), ..SamplingParams::default() };
        let a = e.generate(prompt, &seeded, exp.new_tokens, &[]).unwrap();
        let b = e.generate(prompt, &seeded, exp.new_tokens, &[]).unwrap();
        assert_eq!(a, b, "{kind:?}: same seed must give the same tokens");
        assert_eq!(a.len(), exp.new_tokens);
        // Stop ids end generation right after the stop token.
        let stop = want[3];
        let cut = e.generate(prompt, &SamplingParams::greedy(), exp.new_tokens, &[stop]).unwrap();
        let first = want.iter().position(|&t| t == stop).unwrap();
        assert_eq!(cut, want[..=first].to_vec());
    }
}

#[test]
fn a_backend_that_does_not_keep_its_present_is_budgeted_for_the_pool_alone() {
    let dir = fixture("tiny");
    let manifest = Manifest::load(&dir).unwrap();
    // The pool is f32: 2 layers x (2x16 + 2x16) x 4 bytes = 512 bytes per token, counted once when the backend
    // (tract, its kept-present ability hidden here) takes every past from the pool.
    let inner = backend::load(&dir, &manifest, BackendKind::Tract, &BackendOptions::default()).unwrap();
    let host_only = Counting { inner, host_only: true, fed_kept: Arc::new(AtomicUsize::new(0)) };
    let e = Engine::from_backend(&dir, manifest, Box::new(host_only), Some(512 * 20)).unwrap();
    assert_eq!(e.kv_budget().bytes_per_token(), 512);
}
