//! Cost of sampling one 129,280-wide row (R1's vocabulary): prints per-configuration medians. A measurement, not a
//! test (`BENCHMARKS.md`, "Sampling"). Run it optimized: `cargo bench -p r1-engine --bench sampling`.

use std::time::Instant;

use r1_engine::sampling::{Sampler, SamplingParams};

const VOCAB: usize = 129_280;

/// Model-like logits: a few strong candidates over a long tail (xorshift noise, Gaussian-ish via sum of 4).
fn row(seed: u64, peaked: bool) -> Vec<f32> {
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..VOCAB)
        .map(|i| {
            let noise = (next() + next() + next() + next() - 2.0) * 3.0;
            if peaked && i % 4099 == 0 {
                noise + 12.0
            } else {
                noise
            }
        })
        .collect()
}

fn median_us(mut f: impl FnMut()) -> f64 {
    for _ in 0..5 {
        f();
    }
    let mut t: Vec<f64> = (0..51)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let context: Vec<u32> = (0..2048u32).map(|i| i * 37 % VOCAB as u32).collect();
    let configs: Vec<(&str, SamplingParams, bool)> = vec![
        ("greedy", SamplingParams::greedy(), true),
        ("temperature 1", SamplingParams::default(), true),
        ("R1 default t=0.6 top_p=0.95", SamplingParams { temperature: 0.6, top_p: 0.95, ..Default::default() }, true),
        ("t=0.6 top_p=0.95 flat row", SamplingParams { temperature: 0.6, top_p: 0.95, ..Default::default() }, false),
        ("top_k=50 top_p=0.9", SamplingParams { top_k: 50, top_p: 0.9, ..Default::default() }, true),
        ("min_p=0.05 top_p=0.95", SamplingParams { min_p: 0.05, top_p: 0.95, ..Default::default() }, false),
        (
            "all + rep 1.1 (2048 ctx)",
            SamplingParams {
                temperature: 0.7,
                top_k: 40,
                top_p: 0.9,
                min_p: 0.02,
                repetition_penalty: 1.1,
                ..Default::default()
            },
            true,
        ),
    ];
    println!("sampling one row of {VOCAB} logits (median of 51):");
    for (name, params, peaked) in configs {
        let logits = row(7, peaked);
        let ctx: &[u32] = if params.repetition_penalty != 1.0 { &context } else { &[] };
        let mut s = Sampler::new(params).unwrap();
        let us = median_us(|| {
            std::hint::black_box(s.sample(std::hint::black_box(&logits), ctx).unwrap());
        });
        println!("  {name:<32} {us:>8.1} µs");
    }
}
