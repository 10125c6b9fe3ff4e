//! The KV pool under churn: a property test that interleaves admissions (prompts sharing prefixes), steps with
//! prefill chunks, preemptions (a budget and slot count far below the load), cancellations and failed steps, on an
//! artifact r1-export writes and builds for `cpu` — ONNX Runtime stepping the serving graph in place over the pool,
//! and tract on the portable graph through the host path. Every sequence that finishes must equal its generation
//! alone (greedy, no prefix cache, unlimited budget), and once everything is removed every block and slot is free or
//! held by a retained prefix, and evicting those frees the rest. `R1_CHURN_STATS=1` prints each case's pool counters
//! (preemptions, prefix hits, evictions), to see what the generated cases exercise.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use ndarray::Array3;
use proptest::prelude::*;
use r1_engine::backend::{self, Backend, BackendKind, BackendOptions, StepInput, StepOutput};
use r1_engine::kv::KvPool;
use r1_engine::{Engine, EngineError, Manifest, PoolOptions, SequenceId, StepWork};
use r1_export::target::{apply, Mode, TargetOptions};
use r1_export::{export, ExportOptions};

/// Forwards everything to a backend, failing the next pass when `fail` is set.
struct Flaky {
    inner: Box<dyn Backend>,
    fail: Arc<AtomicBool>,
}

impl Flaky {
    fn check(&self) -> r1_engine::Result<()> {
        if self.fail.swap(false, Ordering::SeqCst) {
            return Err(EngineError::Backend { backend: "flaky", message: "injected failure".into() });
        }
        Ok(())
    }
}

impl Backend for Flaky {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn run(&mut self, input: &StepInput) -> r1_engine::Result<StepOutput> {
        self.check()?;
        self.inner.run(input)
    }
    fn steps_in_place(&self) -> bool {
        self.inner.steps_in_place()
    }
    fn run_in_place(
        &mut self,
        input: &StepInput,
        pool: &mut KvPool,
        first: usize,
        n: usize,
    ) -> r1_engine::Result<Array3<f32>> {
        self.check()?;
        self.inner.run_in_place(input, pool, first, n)
    }
    fn last_position_logits(&self) -> bool {
        self.inner.last_position_logits()
    }
    fn batches_chunks_with_past(&self) -> bool {
        self.inner.batches_chunks_with_past()
    }
}

/// The exported and built artifact, made once for every case.
fn artifact() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("qwen2_gqa2_bf16-fp32");
        let ck = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden/qwen2_gqa2_bf16");
        export(&ExportOptions::new(&ck, &dir), &mut |_| {}).expect("export");
        apply(&dir, &TargetOptions { targets: vec!["cpu".into()], ..Default::default() }, Mode::Build, &mut |_, _| {})
            .expect("build --target cpu");
        (tmp, dir)
    })
    .1
}

/// Prompts that share prefixes: all start with the same 12 tokens, pairs share 20.
fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    let base: Vec<u32> = (0..24u32).map(|i| (i * 37 + 5) % vocab).collect();
    (0..6u32)
        .map(|k| {
            let shared = if k % 2 == 0 { 12 } else { 20 };
            let mut p = base[..shared].to_vec();
            p.extend((0..3 + k).map(|i| (i * 53 + k * 11 + 7) % vocab));
            p
        })
        .collect()
}

const NEW_TOKENS: usize = 10;

/// Each prompt's greedy continuation alone: no prefix cache, default budget.
fn references(kind: BackendKind) -> &'static Vec<Vec<u32>> {
    static REFS: OnceLock<[Vec<Vec<u32>>; 2]> = OnceLock::new();
    let refs = REFS.get_or_init(|| {
        [BackendKind::Ort, BackendKind::Tract].map(|kind| {
            let dir = artifact();
            let manifest = Manifest::load(dir).expect("manifest");
            let b = backend::load(dir, &manifest, kind, &BackendOptions::default()).expect("load");
            let vocab = manifest.model.vocab_size as u32;
            let pool = PoolOptions { prefix_cache: false, ..Default::default() };
            let mut e = Engine::with_pool(dir, manifest, b, None, pool).expect("engine");
            prompts(vocab).iter().map(|p| e.generate_greedy(p, NEW_TOKENS, &[]).expect("reference")).collect()
        })
    });
    &refs[usize::from(kind == BackendKind::Tract)]
}

#[derive(Debug, Clone)]
enum Op {
    Add(usize),
    Step(usize),
    Cancel(usize),
    FailNext,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..6usize).prop_map(Op::Add),
        6 => (1..8usize).prop_map(Op::Step),
        1 => (0..8usize).prop_map(Op::Cancel),
        1 => Just(Op::FailNext),
    ]
}

struct Running {
    id: SequenceId,
    prompt: usize,
    out: Vec<u32>,
}

/// One step over every running sequence (prefill chunks of `chunk`, decodes of 1); finished ones are removed and
/// checked against their reference.
fn step(e: &mut Engine, running: &mut Vec<Running>, chunk: usize, refs: &[Vec<u32>], label: &str) {
    if running.is_empty() {
        return;
    }
    let work: Vec<_> = running.iter().map(|r| StepWork::chunk(r.id, chunk)).collect();
    let Ok(results) = e.step(&work) else { return };
    for res in results {
        let Some(i) = running.iter().position(|r| r.id == res.seq) else { panic!("{label}: unknown result") };
        let token = r1_engine::generate::argmax(&res.logits);
        running[i].out.push(token);
        if running[i].out.len() == NEW_TOKENS {
            let r = running.remove(i);
            assert_eq!(r.out, refs[r.prompt], "{label}: prompt {} differs from its generation alone", r.prompt);
            assert!(e.remove_sequence(r.id));
        } else {
            e.push_token(res.seq, token).expect("push");
        }
    }
}

fn churn(kind: BackendKind, ops: &[Op]) {
    let dir = artifact();
    let manifest = Manifest::load(dir).expect("manifest");
    let vocab = manifest.model.vocab_size as u32;
    let inner = backend::load(dir, &manifest, kind, &BackendOptions::default()).expect("load");
    assert_eq!(inner.steps_in_place(), kind == BackendKind::Ort);
    let fail = Arc::new(AtomicBool::new(false));
    let per_token = manifest.kv_cache.computed_bytes_per_token() as u64 * if inner.can_feed_kept() { 2 } else { 1 };
    // Room for ~1.3 whole sequences (48 positions, blocks of 4), 3 slots: admissions wait, sequences are preempted.
    let pool = PoolOptions { slots: 3, block_tokens: 4, prefix_cache: true, ..Default::default() };
    let flaky = Box::new(Flaky { inner, fail: fail.clone() });
    let mut e = Engine::with_pool(dir, manifest, flaky, Some(per_token * 48), pool).expect("engine");
    let all = prompts(vocab);
    let refs = references(kind);
    let label = format!("{kind:?}");
    let mut running: Vec<Running> = Vec::new();
    for op in ops {
        match *op {
            Op::Add(p) => {
                if e.can_admit(all[p].len(), NEW_TOKENS) {
                    let id = e.add_sequence(&all[p], NEW_TOKENS).expect("admitted");
                    running.push(Running { id, prompt: p, out: Vec::new() });
                }
            }
            Op::Step(chunk) => step(&mut e, &mut running, chunk, refs, &label),
            Op::Cancel(i) => {
                if !running.is_empty() {
                    let r = running.remove(i % running.len());
                    assert!(e.remove_sequence(r.id));
                }
            }
            Op::FailNext => fail.store(true, Ordering::SeqCst),
        }
    }
    fail.store(false, Ordering::SeqCst);
    // Drain: every admitted sequence finishes and is checked.
    for _ in 0..400 {
        if running.is_empty() {
            break;
        }
        step(&mut e, &mut running, 4, refs, &label);
    }
    assert!(running.is_empty(), "{label}: {} sequences never finished", running.len());
    if std::env::var_os("R1_CHURN_STATS").is_some() {
        eprintln!("{label}: {:?}, {} ops", e.pool_stats(), ops.len());
    }
    assert_eq!(e.num_sequences(), 0);
    assert_eq!(e.kv_budget().used_blocks(), e.retained_blocks(), "{label}: blocks held by no one");
    assert_eq!(e.kv_pool().used_slots(), e.retained_sequences(), "{label}: slots held by no one");
    // Evicting the retained prefixes gives everything back: a prompt needing the whole budget is admitted.
    let whole = e.kv_budget().total_blocks() * e.kv_budget().block_tokens() - NEW_TOKENS;
    assert!(e.can_admit(whole.min(e.context_tokens() - NEW_TOKENS), NEW_TOKENS), "{label}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    #[test]
    fn the_pool_loses_nothing_under_churn_in_place(ops in prop::collection::vec(op(), 1..48)) {
        churn(BackendKind::Ort, &ops);
    }

    #[test]
    fn the_pool_loses_nothing_under_churn_on_the_host(ops in prop::collection::vec(op(), 1..48)) {
        churn(BackendKind::Tract, &ops);
    }
}

/// In place, a new running sequence takes slot `n` (running slots stay `0 .. n`). With every slot held by a retained
/// prefix, the least recently used one is evicted (the entry in slot `n` moves into its slot), not whichever entry
/// happens to sit in slot `n` — there, the most recently retained.
#[test]
fn a_pool_full_of_prefixes_evicts_the_least_recently_used_in_place() {
    let dir = artifact();
    let manifest = Manifest::load(dir).expect("manifest");
    let vocab = manifest.model.vocab_size as u32;
    let b = backend::load(dir, &manifest, BackendKind::Ort, &BackendOptions::default()).expect("load");
    assert!(b.steps_in_place());
    let pool = PoolOptions { slots: 3, block_tokens: 4, prefix_cache: true, ..Default::default() };
    let mut e = Engine::with_pool(dir, manifest, b, None, pool).expect("engine");
    let prompt = |first: u32| (0..16).map(|i| (first + 7 * i) % vocab).collect::<Vec<u32>>();
    let (x, y, z) = (prompt(1), prompt(2), prompt(3));
    // W starts like Y, so it takes its slot to copy Y's first 8 positions into (the prefix-hit path).
    let w: Vec<u32> = y[..8].iter().copied().chain(prompt(4)[..8].iter().copied()).collect();
    for p in [&x, &y, &z] {
        e.generate_greedy(p, 2, &[]).expect("generate");
    }
    assert_eq!((e.retained_sequences(), e.kv_pool().used_slots()), (3, 3));
    // W needs slot 0, where Z (the newest) sits, and copies from Y: X, the least recently used, is the one to go
    // (Z moves into X's slot).
    e.generate_greedy(&w, 2, &[]).expect("generate");
    assert_eq!((e.retained_sequences(), e.pool_stats().prefix_evictions), (3, 1));
    let cached = |e: &mut Engine, p: &[u32]| {
        let id = e.add_sequence(p, 2).expect("add");
        let n = e.prefix_tokens(id).expect("prefix");
        e.remove_sequence(id);
        n
    };
    assert_eq!(cached(&mut e, &x), 0, "the least recently used prefix was evicted");
    // Z was in slot 0 and is still cached (looking it up takes a slot too, so now Y, the oldest, goes).
    assert_eq!(cached(&mut e, &z), z.len() - 1, "the newest prefix stays");
    assert_eq!(e.pool_stats().prefix_evictions, 2);
}
