//! r1's `r1.GroupQueryAttention` computes what ONNX Runtime's `com.microsoft.GroupQueryAttention` computes: one
//! node of each, same inputs (random), same attributes, compared output by output — decode rows with pasts of
//! different lengths, a prompt chunk after a past, and a right-padded first prompt (the engine's three kinds of
//! step). And r1's operator over a float16 cache (float32 activations) computes the same within float16's rounding.
use half::f16;
use ndarray::{Array, ArrayD, IxDyn};
use ort::session::Session;
use ort::value::Tensor;
use r1_tests::attention_graph::{FLOAT, FLOAT16};

const H: usize = 6;
const KV: usize = 2;
const D: usize = 32;
const CAP: usize = 40;
const POSITIONS: usize = 64;

fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn session(domain: &str, cache: i32) -> Session {
    let env = r1_engine::host::environment().expect("ONNX Runtime");
    let graph = r1_tests::attention_graph::model(domain, 1, H, KV, D, cache);
    r1_engine::backend::attention::commit_with_ops(Session::builder(env).unwrap(), |mut b| b.commit_from_memory(&graph))
        .unwrap()
}

/// One step: `totals[b]` = row b's length after it (past + new), `seq` new positions per row.
struct Step {
    batch: usize,
    seq: usize,
    totals: Vec<usize>,
}

/// Runs `step` with random inputs from `seed`; the caches are float16 when `half_cache`. Outputs as float32.
fn run(s: &mut Session, step: &Step, seed: u64, half_cache: bool) -> Vec<ArrayD<f32>> {
    let (b, sq) = (step.batch, step.seq);
    let half = D / 2;
    let angles: Vec<f32> =
        (0..POSITIONS * half).map(|i| (i / half) as f32 * 10_000f32.powf(-((i % half) as f32) / half as f32)).collect();
    let arr = |shape: &[usize], v: Vec<f32>| Array::from_shape_vec(IxDyn(shape), v).unwrap();
    let positions: Vec<i64> =
        step.totals.iter().flat_map(|&t| (0..sq).map(move |i| (t.saturating_sub(sq) + i) as i64)).collect();
    let past = |seed: u64| -> ort::session::SessionInputValue<'static> {
        let a = arr(&[b, KV, CAP, D], noise(b * KV * CAP * D, seed));
        if half_cache {
            Tensor::from_array(a.mapv(f16::from_f32)).unwrap().into()
        } else {
            Tensor::from_array(a).unwrap().into()
        }
    };
    let outputs = s
        .run(ort::inputs![
            "q" => Tensor::from_array(arr(&[b, sq, H * D], noise(b * sq * H * D, seed))).unwrap(),
            "k" => Tensor::from_array(arr(&[b, sq, KV * D], noise(b * sq * KV * D, seed + 1))).unwrap(),
            "v" => Tensor::from_array(arr(&[b, sq, KV * D], noise(b * sq * KV * D, seed + 2))).unwrap(),
            "past_key0" => past(seed + 3),
            "past_value0" => past(seed + 4),
            "seqlens_k" => Tensor::from_array(([b], step.totals.iter().map(|&t| t as i32 - 1).collect::<Vec<_>>())).unwrap(),
            "total" => Tensor::from_array(([1usize], vec![*step.totals.iter().max().unwrap() as i32])).unwrap(),
            "cos" => Tensor::from_array(arr(&[POSITIONS, half], angles.iter().map(|a| a.cos()).collect())).unwrap(),
            "sin" => Tensor::from_array(arr(&[POSITIONS, half], angles.iter().map(|a| a.sin()).collect())).unwrap(),
            "position_ids" => Tensor::from_array(([b, sq], positions)).unwrap(),
        ])
        .unwrap();
    (0..3)
        .map(|i| {
            if half_cache && i > 0 {
                return outputs[i].try_extract_array::<f16>().unwrap().mapv(f16::to_f32);
            }
            outputs[i].try_extract_array::<f32>().unwrap().to_owned()
        })
        .collect()
}

/// The largest difference between r1's and ONNX Runtime's outputs over the positions that hold data (each row's
/// real queries; each row's first `total` cache positions).
fn compare(step: &Step, r1: &[ArrayD<f32>], ms: &[ArrayD<f32>]) -> f32 {
    let mut worst = 0f32;
    for b in 0..step.batch {
        let real = step.totals[b].min(step.seq);
        for s in 0..real {
            for j in 0..H * D {
                worst = worst.max((r1[0][[b, s, j]] - ms[0][[b, s, j]]).abs());
            }
        }
        for kind in 1..3 {
            for g in 0..KV {
                for t in 0..step.totals[b] {
                    for j in 0..D {
                        worst = worst.max((r1[kind][[b, g, t, j]] - ms[kind][[b, g, t, j]]).abs());
                    }
                }
            }
        }
    }
    worst
}

fn steps() -> [(&'static str, Step); 3] {
    [
        ("decode rows", Step { batch: 3, seq: 1, totals: vec![1, 17, 40] }),
        ("a chunk after a past", Step { batch: 1, seq: 5, totals: vec![23] }),
        ("right-padded first prompts", Step { batch: 2, seq: 7, totals: vec![7, 3] }),
    ]
}

#[test]
fn r1_attention_equals_onnx_runtime_attention_on_every_kind_of_step() {
    let (mut r1, mut ms) = (session("r1", FLOAT), session("com.microsoft", FLOAT));
    for (i, (what, step)) in steps().iter().enumerate() {
        let (a, b) = (run(&mut r1, step, 10 * i as u64, false), run(&mut ms, step, 10 * i as u64, false));
        assert_eq!(a[1].shape(), b[1].shape(), "{what}: present shapes");
        let worst = compare(step, &a, &b);
        assert!(worst < 2e-5, "{what}: r1 and ONNX Runtime differ by {worst}");
    }
}

/// The float16-cache registration of r1's operator (same name, picked by ONNX Runtime from the graph's types)
/// against ONNX Runtime's float32 kernel on the same inputs: the caches differ by float16's rounding of values in
/// [-1, 1) (≤ 2^-12), and the outputs by what that rounding moves (well under 1e-2); a float32-cache session in the
/// same process keeps computing its exact result.
#[test]
fn a_float16_cache_computes_the_same_attention_within_float16_rounding() {
    let (mut half, mut exact, mut ms) = (session("r1", FLOAT16), session("r1", FLOAT), session("com.microsoft", FLOAT));
    for (i, (what, step)) in steps().iter().enumerate() {
        let seed = 100 + 10 * i as u64;
        let (h, m) = (run(&mut half, step, seed, true), run(&mut ms, step, seed, false));
        let worst = compare(step, &h, &m);
        assert!(worst > 0.0 && worst < 2e-3, "{what}: float16 cache differs from float32 by {worst}");
        let e = run(&mut exact, step, seed, false);
        assert!(compare(step, &e, &m) < 2e-5, "{what}: the float32 registration still computes exactly");
    }
}
