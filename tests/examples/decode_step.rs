//! Time one batch-1 decode step of an artifact's serving graph at several context lengths, through the engine's own
//! in-place path (`Backend::run_in_place` over a `KvPool` of the graph's cache type, as `r1-serve` steps), without
//! prefilling: every cache byte is written first (a pool page never written reads as the kernel's shared zero page,
//! always in cache, which would hide what a step really streams). Separates the graph's per-step cost from the
//! server's (scheduling, sampling, streaming) in `scripts/bench_long_context.sh`.
//!
//!   cargo run --release -p r1-tests --example decode_step -- ARTIFACT [CONTEXT ...]   (default 128 2048 4000)
//!   env: CAPACITY (positions per slot, default the model's maximum, as r1-serve's pool), RUNS (default 8),
//!        ISA="avx2 avx512" (time each context with each form of r1's attention loops in turn, in this process:
//!        `r1_engine::backend::attention::kernel::Isa::force`; default the one `R1_ATTENTION_ISA` or the CPU picks)
use std::time::Instant;

use r1_engine::backend::attention::kernel::Isa;

use r1_engine::backend::{self, BackendKind, BackendOptions};
use r1_engine::kv::{KvGeometry, KvPool};
use r1_engine::{Manifest, StepInput};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: decode_step ARTIFACT [CONTEXT ...]"));
    let contexts: Vec<usize> = args.map(|a| a.parse().expect("a context length")).collect();
    let contexts = if contexts.is_empty() { vec![128, 2048, 4000] } else { contexts };
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
    let manifest = Manifest::load(&dir).expect("manifest");
    let capacity = env("CAPACITY").unwrap_or(manifest.model.max_position_embeddings);
    let runs = env("RUNS").unwrap_or(8);
    let mut b = backend::load(&dir, &manifest, BackendKind::Ort, &BackendOptions::default()).expect("backend");
    assert!(b.steps_in_place(), "this artifact's graph does not step in place (build it with --target cpu)");
    let dtype = b.kv_cache_dtype().unwrap_or(manifest.kv_cache.dtype);
    let geometry = KvGeometry::from(&manifest.kv_cache);
    let mut pool = KvPool::new(geometry, 1, capacity, dtype).expect("pool");
    for layer in 0..geometry.num_layers {
        let r = pool.layer_range(layer, 0, 1).expect("layer");
        let bytes = |heads: usize, dim: usize| heads * capacity * dim * dtype.size();
        // SAFETY: slot 0 of this layer is `heads × capacity × dim` values of `dtype` at each pointer; 0x11 bytes are
        // small finite values in float16 and float32.
        unsafe {
            std::ptr::write_bytes(r.key, 0x11, bytes(geometry.key_heads, geometry.key_dim));
            std::ptr::write_bytes(r.value, 0x11, bytes(geometry.value_heads, geometry.value_dim));
        }
    }
    println!("{}: {dtype:?} cache, slot capacity {capacity}, {runs} runs per context", dir.display());
    let isas: Vec<Option<Isa>> = match std::env::var("ISA") {
        Ok(v) if !v.trim().is_empty() => {
            v.split_whitespace().map(|s| Some(Isa::parse(s).expect("ISA: avx512, avx2 or portable"))).collect()
        }
        _ => vec![None],
    };
    println!("| context | attention loops | step ms (best) | step ms (median) |");
    println!("|---|---|---|---|");
    for (&c, isa) in contexts.iter().flat_map(|c| isas.iter().map(move |i| (c, i))) {
        let isa = Isa::force(*isa);
        let input = StepInput {
            input_ids: ndarray::Array2::from_elem((1, 1), 5),
            attention_mask: ndarray::Array2::ones((1, c + 1)),
            position_ids: ndarray::Array2::from_elem((1, 1), c as i64),
            past: Vec::new(),
        };
        let mut ms: Vec<f64> = (0..=runs)
            .map(|_| {
                let t = Instant::now();
                b.run_in_place(&input, &mut pool, 0, 1).expect("step");
                t.elapsed().as_secs_f64() * 1e3
            })
            .skip(1)
            .collect();
        ms.sort_by(f64::total_cmp);
        println!("| {c} | {isa:?} | {:.1} | {:.1} |", ms[0], ms[ms.len() / 2]);
    }
}
