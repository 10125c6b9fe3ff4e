//! Time r1's `r1.GroupQueryAttention` against ONNX Runtime's `com.microsoft.GroupQueryAttention` at the 1.5B
//! attention shape (12 query heads, 2 KV heads, head size 128, 28 layers, each layer's cache its own
//! `[1, 2, 8192, 128]` buffer bound as past and present, as the engine's pool does), alternating the two kernels so
//! that both see the same machine. A decode step (1 new position) and a prefill chunk (256 positions) after
//! `CONTEXT` cached positions. r1's kernel runs twice: over float32 caches, and over float16 caches (float32
//! activations, `r1-export --kv-cache-dtype fp16`).
//!
//!   cargo run --release -p r1-tests --example attention_kernels -- [CONTEXT ...]   (default 128 2048 4000)
use std::time::Instant;

use ndarray::{Array, IxDyn};
use ort::session::Session;
use ort::value::{DynValue, Tensor};

const H: usize = 12;
const KV: usize = 2;
const D: usize = 128;
const CAP: usize = 8192;
const LAYERS: usize = 28;

fn tensor(shape: &[usize], fill: f32) -> DynValue {
    let n = shape.iter().product();
    Tensor::from_array(Array::from_shape_vec(IxDyn(shape), vec![fill; n]).unwrap()).unwrap().into_dyn()
}

/// Milliseconds per run of `s` (best of 5, after one warm-up) for `seq` new positions after `context` cached.
fn time(s: &mut Session, caches: &mut [DynValue], context: usize, seq: usize) -> f64 {
    let total = context + seq;
    let int32 = |v: i32| Tensor::from_array(([1usize], vec![v])).unwrap().into_dyn();
    let mut b = s.create_binding().unwrap();
    b.bind_input("q", &tensor(&[1, seq, H * D], 0.1)).unwrap();
    b.bind_input("k", &tensor(&[1, seq, KV * D], 0.1)).unwrap();
    b.bind_input("v", &tensor(&[1, seq, KV * D], 0.1)).unwrap();
    b.bind_input("seqlens_k", &int32(total as i32 - 1)).unwrap();
    b.bind_input("total", &int32(total as i32)).unwrap();
    b.bind_input("cos", &tensor(&[CAP, D / 2], 0.5)).unwrap();
    b.bind_input("sin", &tensor(&[CAP, D / 2], 0.5)).unwrap();
    let pos: Vec<i64> = (context as i64..total as i64).collect();
    b.bind_input("position_ids", &Tensor::from_array(([1usize, seq], pos)).unwrap().into_dyn()).unwrap();
    for l in 0..LAYERS {
        b.bind_input(format!("past_key{l}"), &caches[2 * l]).unwrap();
        b.bind_input(format!("past_value{l}"), &caches[2 * l + 1]).unwrap();
    }
    for (l, pair) in caches.chunks_mut(2).enumerate() {
        let (k, v) = pair.split_at_mut(1);
        b.bind_output(format!("present_key{l}"), &mut k[0]).unwrap();
        b.bind_output(format!("present_value{l}"), &mut v[0]).unwrap();
        b.bind_output_to_device(format!("out{l}"), &ort::memory::MemoryInfo::default()).unwrap();
    }
    let mut best = f64::INFINITY;
    for rep in 0..6 {
        let t = Instant::now();
        drop(s.run_binding(&b).unwrap());
        if rep > 0 {
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    best
}

fn main() {
    let contexts: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a context length")).collect();
    let contexts = if contexts.is_empty() { vec![128, 2048, 4000] } else { contexts };
    let env = r1_engine::host::environment().expect("ONNX Runtime");
    use r1_tests::attention_graph::{FLOAT, FLOAT16};
    let open = |domain: &str, cache: i32| {
        let graph = r1_tests::attention_graph::model(domain, LAYERS, H, KV, D, cache);
        r1_engine::backend::attention::commit_with_ops(Session::builder(env).unwrap(), |mut b| {
            b.commit_from_memory(&graph)
        })
        .unwrap()
    };
    let mut sessions = [open("r1", FLOAT), open("r1", FLOAT16), open("com.microsoft", FLOAT)];
    // Outputs can be bound only to tensors ONNX Runtime allocated.
    let allocator = ort::memory::Allocator::default();
    let cache = || {
        let mut t = Tensor::<f32>::new(&allocator, [1, KV, CAP, D]).unwrap();
        t.try_extract_tensor_mut::<f32>().unwrap().1.fill(0.01);
        t.into_dyn()
    };
    let half_cache = || {
        let mut t = Tensor::<half::f16>::new(&allocator, [1, KV, CAP, D]).unwrap();
        t.try_extract_tensor_mut::<half::f16>().unwrap().1.fill(half::f16::from_f32(0.01));
        t.into_dyn()
    };
    let mut caches: Vec<DynValue> = (0..2 * LAYERS).map(|_| cache()).collect();
    let mut half_caches: Vec<DynValue> = (0..2 * LAYERS).map(|_| half_cache()).collect();
    println!("| context | step | r1, fp32 cache (ms) | r1, fp16 cache (ms) | ONNX Runtime (ms) | r1 fp32 / ORT | r1 fp16 / ORT |");
    println!("|---|---|---|---|---|---|---|");
    for &c in &contexts {
        for (what, seq) in [("decode (1 position)", 1), ("prefill chunk (256)", 256)] {
            let mut ms = [f64::INFINITY; 3];
            for _round in 0..2 {
                for (i, s) in sessions.iter_mut().enumerate() {
                    let caches = if i == 1 { &mut half_caches } else { &mut caches };
                    ms[i] = ms[i].min(time(s, caches, c, seq));
                }
            }
            println!(
                "| {c} | {what} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                ms[0],
                ms[1],
                ms[2],
                ms[0] / ms[2],
                ms[1] / ms[2]
            );
        }
    }
}
