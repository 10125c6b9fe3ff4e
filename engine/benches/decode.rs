//! Decode and prefill throughput of the engine on an exported artifact (no criterion: a plain
//! `harness = false` bench, so it runs the same on every host).
//!
//! ```text
//! R1_BENCH_MODEL=OUT_DIR R1_BENCH_BACKENDS=ort,tract cargo bench -p r1-engine --bench decode
//! ```
//! Defaults: the tiny test fixture, both backends, 32 decode steps, prefill of 128 tokens
//! (clamped to the model's context). Reports median-free simple means over the measured steps,
//! after one warm-up step.

use std::path::PathBuf;
use std::time::Instant;

use r1_engine::backend::BackendKind;
use r1_engine::engine::argmax;
use r1_engine::{Engine, EngineOptions, StepWork};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn prompt(len: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 7919 + salt * 104_729 + 13) % vocab) as u32).collect()
}

/// Tokens per second of `steps` decode steps over `batch` sequences (after a prefill of 16).
fn decode(e: &mut Engine, batch: usize, steps: usize) -> r1_engine::Result<f64> {
    let vocab = e.manifest().model.vocab_size;
    let ids: Vec<_> = (0..batch).map(|b| e.add_sequence(&prompt(16, vocab, b), steps + 2)).collect::<Result<_, _>>()?;
    let work: Vec<_> = ids.iter().map(|&id| StepWork::all(id)).collect();
    let out = e.step(&work)?; // prefill + warm-up
    for r in &out {
        e.push_token(r.seq, argmax(&r.logits))?;
    }
    let t = Instant::now();
    for _ in 0..steps {
        for r in e.step(&work)? {
            e.push_token(r.seq, argmax(&r.logits))?;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    for id in ids {
        e.remove_sequence(id);
    }
    Ok((batch * steps) as f64 / secs)
}

/// Seconds to prefill `len` tokens of one sequence in one step (best of 3).
fn prefill(e: &mut Engine, len: usize) -> r1_engine::Result<f64> {
    let vocab = e.manifest().model.vocab_size;
    let mut best = f64::MAX;
    for round in 0..3 {
        let id = e.add_sequence(&prompt(len, vocab, round), 1)?;
        let t = Instant::now();
        e.step(&[StepWork::all(id)])?;
        best = best.min(t.elapsed().as_secs_f64());
        e.remove_sequence(id);
    }
    Ok(best)
}

fn main() {
    let dir = std::env::var_os("R1_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny"));
    let backends = std::env::var("R1_BENCH_BACKENDS").unwrap_or_else(|_| "ort,tract".into());
    let steps = env_usize("R1_BENCH_STEPS", 32);
    println!("model: {}", dir.display());
    println!("{:<8} {:>16} {:>16} {:>18}", "backend", "decode b1 tok/s", "decode b8 tok/s", "prefill 128 (s)");
    for name in backends.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let kind: BackendKind = match name.parse() {
            Ok(k) => k,
            Err(e) => {
                eprintln!("{e}");
                continue;
            }
        };
        let opts = EngineOptions { backend: kind, kv_budget_bytes: Some(16 << 30), ..EngineOptions::default() };
        let mut e = match Engine::load(&dir, &opts) {
            Ok(e) => e,
            Err(err) => {
                eprintln!("{name}: {err}");
                continue;
            }
        };
        let ctx = e.manifest().model.max_position_embeddings;
        let run = |e: &mut Engine| -> r1_engine::Result<(f64, f64, f64)> {
            Ok((decode(e, 1, steps)?, decode(e, 8, steps)?, prefill(e, 128.min(ctx - 2))?))
        };
        match run(&mut e) {
            Ok((b1, b8, pf)) => println!("{:<8} {b1:>16.1} {b8:>16.1} {pf:>18.4}", e.backend_name()),
            Err(err) => eprintln!("{name}: {err}"),
        }
    }
}
