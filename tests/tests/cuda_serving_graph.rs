//! The CUDA serving graph (`targets.<gpu>.cuda_graph`, issue #16): what `r1-export --target h100` writes where
//! TensorRT cannot build, and what ONNX Runtime's CUDA provider runs with the engine's KV pool on the GPU.
//!
//! CI has no GPU, so the graph is checked here on ONNX Runtime's CPU provider, which runs the same
//! `com.microsoft.GroupQueryAttention` contract: the engine steps it in place over its pool (no cache copied in a
//! steady decode step), batched greedy equals single greedy, and its logits match the portable float16 graph's.
//! `scripts/gpu_check.sh` runs it on the CUDA provider with the pool in device memory.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use r1_engine::backend::ort::{DecodeSteps, GraphChoice};
use r1_engine::backend::{self, BackendKind, BackendOptions, ExecutionProviderKind};
use r1_engine::kv::PoolDevice;
use r1_engine::manifest::{DType, Precision};
use r1_engine::{Engine, Manifest, StepWork};
use r1_export::target::{apply, Mode, Outcome, TargetOptions};
use r1_export::{export, ExportOptions};

fn export_for_h100(dir: &Path, precision: Precision) -> Vec<Outcome> {
    let ck = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden/qwen2_gqa2_bf16");
    let mut opts = ExportOptions::new(&ck, dir);
    opts.precision = precision;
    export(&opts, &mut |_| {}).expect("export the golden checkpoint");
    apply(dir, &TargetOptions { targets: vec!["h100".into()], ..Default::default() }, Mode::AfterExport, &mut |_, _| {})
        .expect("--target h100")
}

fn cpu_options(graph: GraphChoice) -> BackendOptions {
    BackendOptions { execution_provider: ExecutionProviderKind::Cpu, graph, ..Default::default() }
}

#[test]
fn the_cuda_serving_graph_steps_in_place_and_matches_the_portable_graph() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("fp16");
    let outcomes = export_for_h100(&dir, Precision::Fp16);
    let plan = match outcomes.first() {
        Some(Outcome::Planned { plan, cuda_note: None, .. }) => plan,
        Some(Outcome::Built(_)) => return, // an H100 with TensorRT: the engine was built instead
        other => panic!("h100 without TensorRT: a plan with the CUDA graph, got {other:?}"),
    };
    let manifest = Manifest::load(&dir).expect("manifest");
    let cuda = manifest.targets.tensorrt("h100").and_then(|b| b.cuda_graph.clone()).expect("cuda_graph recorded");
    assert_eq!(plan.cuda_graph.as_ref(), Some(&cuda));
    assert_eq!(cuda.attention_op, "com.microsoft.GroupQueryAttention");
    assert_eq!(cuda.kv_cache_dtype, DType::Float16);
    assert!(cuda.last_position_logits && cuda.kv_in_place);
    assert!(cuda.graph.starts_with("engines/h100/") && cuda.graph.ends_with("-cuda/model.onnx"), "{}", cuda.graph);
    // Every file is listed with its hash; the weights are the artifact's own file, hard-linked (no second copy).
    for f in &cuda.files {
        assert_eq!(manifest.files.get(f).map(|e| e.bytes), Some(std::fs::metadata(dir.join(f)).unwrap().len()), "{f}");
    }
    let data = cuda.files.iter().find(|f| f.ends_with("model.onnx.data")).expect("weights beside the graph");
    let (linked, own) =
        (std::fs::metadata(dir.join(data)).unwrap(), std::fs::metadata(dir.join("model.onnx.data")).unwrap());
    assert_eq!((linked.ino(), linked.dev()), (own.ino(), own.dev()), "the CUDA graph's weights are a hard link");
    assert_eq!(manifest.targets.cuda_graph(&dir, Some("a100")), Some(&cuda), "any GPU target's graph serves");

    // On the CPU provider (what CI can run) the graph is stepped in place over a host pool of float16.
    let b = backend::load(&dir, &manifest, BackendKind::Ort, &cpu_options(GraphChoice::Cuda)).expect("load cuda graph");
    assert!(b.steps_in_place() && b.last_position_logits());
    assert_eq!(b.kv_cache_dtype(), Some(DType::Float16));
    assert_eq!(b.kv_pool_device(), PoolDevice::Host, "the CPU provider keeps the pool on the host");
    let mut fused = Engine::from_backend(&dir, manifest.clone(), b, None).expect("engine");
    assert_eq!(fused.kv_pool().dtype(), DType::Float16);
    let portable = backend::load(&dir, &manifest, BackendKind::Ort, &cpu_options(GraphChoice::Auto)).expect("load");
    assert!(!portable.steps_in_place(), "without a cpu build the CPU provider runs the portable graph");
    let mut reference = Engine::from_backend(&dir, manifest.clone(), portable, None).expect("engine");

    let prompts = r1_tests::ragged_prompts(manifest.model.vocab_size as u32);
    let singles: Vec<Vec<u32>> = prompts.iter().map(|p| fused.generate_greedy(p, 8, &[]).expect("single")).collect();
    let batched =
        fused.generate_batch_with(&prompts, 8, &[], 3, |l| Ok(r1_engine::generate::argmax(l))).expect("batched");
    assert_eq!(batched, singles, "CUDA serving graph: batched (chunked prefill) = single");

    // Logits of each prompt's prefill and of two decode steps against the portable float16 graph's.
    let mut worst = 0f32;
    for p in &prompts {
        let (a, b) = (fused.add_sequence(p, 3).unwrap(), reference.add_sequence(p, 3).unwrap());
        for step in 0..3 {
            let ra = fused.step(&[StepWork::all(a)]).expect("fused step").remove(0);
            let rb = reference.step(&[StepWork::all(b)]).expect("portable step").remove(0);
            let (la, lb) = (ra.logits.to_vec(), rb.logits.to_vec());
            assert_eq!(la.len(), lb.len());
            let scale = lb.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
            let diff = la.iter().zip(&lb).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
            worst = worst.max(diff);
            assert!(diff < 2e-2, "prompt {p:?} step {step}: relative logit difference {diff}");
            let t = r1_engine::generate::argmax(&ra.logits);
            if step < 2 {
                fused.push_token(a, t).unwrap();
                reference.push_token(b, t).unwrap();
            }
        }
        fused.remove_sequence(a);
        reference.remove_sequence(b);
    }
    println!(
        "CUDA serving graph vs portable fp16 graph on the CPU provider: worst relative logit difference {worst:.2e}"
    );

    // On a GPU host with ONNX Runtime's CUDA provider (scripts/gpu_check.sh), the same graph with the pool in device
    // memory gives the CPU provider's greedy tokens.
    if r1_engine::targets::detect_local_gpu().is_some() {
        let opts = BackendOptions { execution_provider: ExecutionProviderKind::Cuda, ..Default::default() };
        let b = backend::load(&dir, &manifest, BackendKind::Ort, &opts).expect("load on the CUDA provider");
        assert!(b.steps_in_place());
        assert_eq!(b.kv_pool_device(), PoolDevice::Cuda { id: 0 }, "the pool lives on the GPU");
        let mut gpu = Engine::from_backend(&dir, manifest.clone(), b, None).expect("engine on the GPU");
        let on_gpu =
            gpu.generate_batch_with(&prompts, 8, &[], 3, |l| Ok(r1_engine::generate::argmax(l))).expect("GPU batched");
        assert_eq!(on_gpu, singles, "CUDA provider, device pool: the CPU provider's greedy tokens");
        let captured = gpu.fixed_decode_shapes();
        assert!(!captured.is_empty(), "decode steps ran at fixed shapes (captured as CUDA graphs)");
        println!(
            "CUDA provider with the KV pool on the GPU: greedy tokens equal the CPU provider's; decode steps captured \
             as CUDA graphs for row counts {captured:?}"
        );
    }

    // A steady decode step copies no cache: the graph appends into the pool's own memory.
    let copied = r1_tests::decode_copied_bytes(&mut fused, &prompts[..3], 3);
    assert_eq!(copied, [0, 0, 0], "KV cache bytes copied by each decode step");
}

/// The fixed-shape decode steps that ONNX Runtime's CUDA provider captures as CUDA graphs (`DecodeSteps::Auto` on
/// CUDA; `ort_decode_graph.rs`), run uncaptured on the CPU provider: inputs staged at fixed addresses, the mask as
/// wide as the pool with each row's length in its first column, the logits read from a staged buffer. Every decode
/// step of every batch size must give the logits of the same step run as shaped, and greedy tokens must not change.
#[test]
fn fixed_shape_decode_steps_give_the_shaped_steps_logits() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("fp16");
    if !matches!(export_for_h100(&dir, Precision::Fp16).first(), Some(Outcome::Planned { cuda_note: None, .. })) {
        return; // an H100 with TensorRT: the engine was built instead
    }
    let manifest = Manifest::load(&dir).expect("manifest");
    let engine = |steps: DecodeSteps| {
        let opts = BackendOptions { decode_steps: steps, ..cpu_options(GraphChoice::Cuda) };
        let b = backend::load(&dir, &manifest, BackendKind::Ort, &opts).expect("load the CUDA graph");
        let pool = r1_engine::PoolOptions { slots: 8, max_context: Some(64), ..Default::default() };
        Engine::with_pool(&dir, manifest.clone(), b, None, pool).expect("engine")
    };
    let (mut fixed, mut shaped) = (engine(DecodeSteps::Fixed), engine(DecodeSteps::Shaped));
    let prompts = r1_tests::ragged_prompts(manifest.model.vocab_size as u32);
    // Batches of 5, 3 and 1 rows; rows leave at different times, so decode steps run over 5, 4, 3, ... slots.
    let mut worst = 0f32;
    for batch in [&prompts[..], &prompts[1..4], &prompts[4..]] {
        let mut rows: Vec<_> = batch
            .iter()
            .enumerate()
            .map(|(i, p)| (fixed.add_sequence(p, 8).unwrap(), shaped.add_sequence(p, 8).unwrap(), 3 + 2 * i))
            .collect();
        while !rows.is_empty() {
            let (wa, wb): (Vec<_>, Vec<_>) = rows.iter().map(|r| (StepWork::all(r.0), StepWork::all(r.1))).unzip();
            let (ra, rb) = (fixed.step(&wa).expect("fixed step"), shaped.step(&wb).expect("shaped step"));
            for (row, (a, b)) in rows.iter_mut().zip(ra.iter().zip(&rb)) {
                let (la, lb) = (a.logits.to_vec(), b.logits.to_vec());
                let scale = lb.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
                let diff = la.iter().zip(&lb).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
                worst = worst.max(diff);
                assert!(diff <= 1e-6, "relative logit difference {diff} between fixed-shape and shaped steps");
                let (ta, tb) = (r1_engine::generate::argmax(&a.logits), r1_engine::generate::argmax(&b.logits));
                assert_eq!(ta, tb, "greedy token");
                fixed.push_token(row.0, ta).unwrap();
                shaped.push_token(row.1, tb).unwrap();
                row.2 -= 1;
            }
            for r in rows.iter().filter(|r| r.2 == 0) {
                fixed.remove_sequence(r.0);
                shaped.remove_sequence(r.1);
            }
            rows.retain(|r| r.2 > 0);
        }
    }
    let shapes = fixed.fixed_decode_shapes();
    assert_eq!(shapes, vec![1, 2, 3, 4, 5], "decode steps of every row count ran at fixed shapes");
    assert!(shaped.fixed_decode_shapes().is_empty(), "DecodeSteps::Shaped never stages");
    // A steady decode step still copies no cache.
    assert_eq!(r1_tests::decode_copied_bytes(&mut fixed, &prompts[..3], 3), [0, 0, 0]);
    println!("fixed-shape vs shaped decode steps: worst relative logit difference {worst:.1e}, shapes {shapes:?}");
}

#[test]
fn a_float32_artifact_gets_a_plan_and_the_reason_it_has_no_cuda_graph() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("fp32");
    let outcomes = export_for_h100(&dir, Precision::Fp32);
    let (plan, why) = match outcomes.first() {
        Some(Outcome::Planned { plan, cuda_note: Some(why), .. }) => (plan, why),
        Some(Outcome::Built(_)) => return,
        other => panic!("an fp32 artifact: a plan without a CUDA graph, got {other:?}"),
    };
    assert!(plan.cuda_graph.is_none());
    assert!(why.contains("float16") && why.contains("`fp32`") && why.contains("--precision fp16"), "{why}");
    let manifest = Manifest::load(&dir).expect("manifest");
    assert!(manifest.targets.cuda_graph(&dir, Some("h100")).is_none());
    assert!(!dir.join("engines/h100").read_dir().map(|d| d.count() > 0).unwrap_or(false), "nothing written");
    // Asked for the CUDA graph anyway, the backend falls back to the portable graph.
    let b = backend::load(&dir, &manifest, BackendKind::Ort, &cpu_options(GraphChoice::Cuda)).expect("load");
    assert!(!b.steps_in_place());
}
