//! Decode and prefill throughput of the engine on an exported artifact (no criterion: a plain
//! `harness = false` bench, so it runs the same on every host).
//!
//! ```text
//! R1_BENCH_MODEL=OUT_DIR R1_BENCH_BACKENDS=ort,tract cargo bench --workspace --bench decode
//! ```
//! Defaults: the tiny test fixture, both backends, 32 decode steps, prefill of 128 tokens
//! (clamped to the model's context). Reports median-free simple means over the measured steps,
//! after one warm-up step.
//!
//! It also measures the machine's read bandwidth (multi-threaded, vectorized) and prints batch-1 decode as a share
//! of the memory-bandwidth roofline: bandwidth / bytes of weights read per token (every initializer except the
//! gathered embedding table). `R1_BENCH_JSON=FILE` appends one JSON line per backend; `R1_BENCH_BANDWIDTH=GB/s`
//! skips the bandwidth pass (a side-by-side script measures it once).

use std::path::PathBuf;
use std::time::Instant;

use r1_engine::backend::BackendKind;
use r1_engine::generate::argmax;
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

/// Read bandwidth of this machine in bytes/s: every core streams its share of a buffer far larger than the caches,
/// with 256-bit loads (AVX2 when the CPU has it; 128-bit SSE2 otherwise), best of 5 passes. A scalar one-thread
/// loop reads about half as fast, which would flatter the roofline.
fn read_bandwidth() -> f64 {
    const BYTES: usize = 2 << 30;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let buf: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let chunk = buf.len().div_ceil(threads);
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let sink: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf.chunks(chunk).map(|part| s.spawn(move || read_kernel(part))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).fold(0, |a, b| a ^ b)
        });
        std::hint::black_box(sink);
        best = best.max(BYTES as f64 / t.elapsed().as_secs_f64());
    }
    best
}

fn read_kernel(part: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { read_avx2(part) };
    }
    // Eight independent lanes: the compiler vectorizes this into SIMD XORs.
    let mut acc = [0u64; 8];
    for c in part.chunks_exact(8) {
        for (a, v) in acc.iter_mut().zip(c) {
            *a ^= *v;
        }
    }
    acc.iter().fold(0, |a, b| a ^ b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn read_avx2(part: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_si256(); 4];
    let blocks = part.chunks_exact(16); // 4 x 256 bits per iteration
    for b in blocks {
        let p = b.as_ptr() as *const __m256i;
        // SAFETY: `b` holds 16 u64 = 4 unaligned 256-bit loads.
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm256_xor_si256(*a, unsafe { _mm256_loadu_si256(p.add(k)) });
        }
    }
    let mut out = [0u64; 4];
    let x = _mm256_xor_si256(_mm256_xor_si256(acc[0], acc[1]), _mm256_xor_si256(acc[2], acc[3]));
    // SAFETY: `out` is 32 bytes.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, x) };
    out.iter().fold(0, |a, b| a ^ b)
}

/// Bytes of weights one decode step reads: every initializer of `model.onnx` except tables that are only gathered
/// from (the token embedding: one row per token).
fn weight_bytes_per_token(dir: &std::path::Path) -> Option<u64> {
    use prost::Message;
    use r1_proto::onnx::{tensor_proto::DataLocation, ModelProto};
    let bytes = std::fs::read(dir.join("model.onnx")).ok()?;
    let model = ModelProto::decode(bytes.as_slice()).ok()?;
    let graph = model.graph?;
    let mut gathered_only = std::collections::HashSet::new();
    for init in &graph.initializer {
        let name = init.name();
        let uses: Vec<_> = graph.node.iter().filter(|n| n.input.iter().any(|i| i == name)).collect();
        if !uses.is_empty()
            && uses.iter().all(|n| n.op_type() == "Gather" && n.input.first().map(String::as_str) == Some(name))
        {
            gathered_only.insert(name.to_string());
        }
    }
    let size = |t: &r1_proto::onnx::TensorProto| -> u64 {
        if t.data_location() == DataLocation::External {
            t.external_data.iter().find(|kv| kv.key() == "length").and_then(|kv| kv.value().parse().ok()).unwrap_or(0)
        } else {
            t.raw_data().len() as u64
        }
    };
    Some(graph.initializer.iter().filter(|t| !gathered_only.contains(t.name())).map(size).sum())
}

fn main() {
    let dir = std::env::var_os("R1_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny"));
    let backends = std::env::var("R1_BENCH_BACKENDS").unwrap_or_else(|_| "ort,tract".into());
    let steps = env_usize("R1_BENCH_STEPS", 32);
    let bandwidth = match std::env::var("R1_BENCH_BANDWIDTH").ok().and_then(|v| v.parse::<f64>().ok()) {
        Some(gbs) => gbs * 1e9,
        None => read_bandwidth(),
    };
    let weight_bytes = weight_bytes_per_token(&dir);
    let roofline = weight_bytes.map(|b| bandwidth / b as f64);
    println!("model: {}", dir.display());
    println!(
        "read bandwidth {:.1} GB/s ({} threads); weights read per token {}; roofline {}",
        bandwidth / 1e9,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        weight_bytes.map_or("unknown".into(), |b| format!("{:.3} GB", b as f64 / 1e9)),
        roofline.map_or("unknown".into(), |r| format!("{r:.1} tok/s")),
    );
    println!(
        "{:<10} {:>10} {:>16} {:>10} {:>16} {:>7} {:>16}",
        "backend", "precision", "decode b1 tok/s", "roofline", "decode b8 tok/s", "b8/b1", "prefill 128 (s)"
    );
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
            Ok((b1, b8, pf)) => {
                let precision = e.manifest().precision;
                let share = roofline.map_or("-".into(), |r| format!("{:.0}%", 100.0 * b1 / r));
                println!(
                    "{:<10} {precision:>10} {b1:>16.2} {share:>10} {b8:>16.2} {:>7.2} {pf:>16.3}",
                    e.backend_name(),
                    b8 / b1
                );
                if let Ok(path) = std::env::var("R1_BENCH_JSON") {
                    let line = serde_json::json!({
                        "model": dir.display().to_string(), "backend": e.backend_name(), "precision": precision,
                        "decode_b1_tok_s": b1, "decode_b8_tok_s": b8, "prefill128_s": pf,
                        "bandwidth_gb_s": bandwidth / 1e9, "weight_bytes_per_token": weight_bytes,
                        "roofline_tok_s": roofline,
                    });
                    let appended = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()));
                    if let Err(err) = appended {
                        eprintln!("cannot append to {path}: {err}");
                    }
                }
            }
            Err(err) => eprintln!("{name}: {err}"),
        }
    }
}
