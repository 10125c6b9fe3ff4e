use super::*;

use crate::backend::attention::kernel::tests::noise;

/// One call's inputs; `totals[b]` is row b's length after the step (`seqlens_k + 1`).
struct Case {
    d: LatentDims,
    q_lat: Vec<f32>,
    q_rot: Vec<f32>,
    latent: Vec<f32>,
    rope_key: Vec<f32>,
    past_latent: Vec<f32>,
    past_rope: Vec<f32>,
    spans: Vec<RowSpan>,
}

fn case(d: LatentDims, totals: &[usize], seed: u64) -> Case {
    let seqlens: Vec<i32> = totals.iter().map(|&t| t as i32 - 1).collect();
    let spans = row_spans(&d, &seqlens).unwrap();
    Case {
        q_lat: noise(d.batch * d.heads * d.seq * d.rank, seed),
        q_rot: noise(d.batch * d.heads * d.seq * d.rope, seed + 1),
        latent: noise(d.batch * d.seq * d.rank, seed + 2),
        rope_key: noise(d.batch * d.seq * d.rope, seed + 3),
        past_latent: noise(d.batch * d.past_capacity * d.rank, seed + 4),
        past_rope: noise(d.batch * d.past_capacity * d.rope, seed + 5),
        spans,
        d,
    }
}

/// The portable graph's function, plainly: per row, the cache is its valid past then its new positions; query `s`
/// sees positions `..= past + s`; padding queries give zeros. Returns the output `[B, H, S, rank]`.
fn reference(c: &Case, scale: f32) -> Vec<f32> {
    let d = &c.d;
    let mut out = vec![0f32; d.batch * d.heads * d.seq * d.rank];
    for b in 0..d.batch {
        let span = c.spans[b];
        let pos = |t: usize, width: usize, past: &[f32], new: &[f32]| -> Vec<f32> {
            if t < span.past {
                past[(b * d.past_capacity + t) * width..][..width].to_vec()
            } else {
                new[(b * d.seq + t - span.past) * width..][..width].to_vec()
            }
        };
        for h in 0..d.heads {
            for s in 0..span.new {
                let q = ((b * d.heads + h) * d.seq + s) * d.rank;
                let qr = ((b * d.heads + h) * d.seq + s) * d.rope;
                let n = span.past + s + 1;
                let mut scores: Vec<f64> = (0..n)
                    .map(|t| {
                        let lat = pos(t, d.rank, &c.past_latent, &c.latent);
                        let rk = pos(t, d.rope, &c.past_rope, &c.rope_key);
                        let a: f64 = (0..d.rank).map(|j| f64::from(c.q_lat[q + j]) * f64::from(lat[j])).sum();
                        let r: f64 = (0..d.rope).map(|j| f64::from(c.q_rot[qr + j]) * f64::from(rk[j])).sum();
                        (a + r) * f64::from(scale)
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                scores.iter_mut().for_each(|x| *x = (*x - max).exp());
                let sum: f64 = scores.iter().sum();
                for (t, p) in scores.iter().enumerate() {
                    let lat = pos(t, d.rank, &c.past_latent, &c.latent);
                    for j in 0..d.rank {
                        out[q + j] += (p / sum * f64::from(lat[j])) as f32;
                    }
                }
            }
        }
    }
    out
}

/// Runs the kernel on `c`, tasks in `order` (forward or reversed), in place (one buffer as past and present, the
/// pool) or not. Returns the output and the presents.
fn run_case(c: &Case, scale: f32, in_place: bool, reversed: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = c.d;
    let mut out = vec![f32::NAN; d.batch * d.heads * d.seq * d.rank];
    let (mut present_latent, mut present_rope) = if in_place {
        (c.past_latent.clone(), c.past_rope.clone())
    } else {
        (vec![f32::NAN; d.batch * d.present_capacity * d.rank], vec![f32::NAN; d.batch * d.present_capacity * d.rope])
    };
    let buf = LatentBuffers {
        query_latent: c.q_lat.as_ptr(),
        query_rope: c.q_rot.as_ptr(),
        latent: c.latent.as_ptr(),
        rope_key: c.rope_key.as_ptr(),
        past_latent: if in_place { present_latent.as_ptr() } else { c.past_latent.as_ptr() },
        past_rope: if in_place { present_rope.as_ptr() } else { c.past_rope.as_ptr() },
        present_latent: present_latent.as_mut_ptr(),
        present_rope: present_rope.as_mut_ptr(),
        out: out.as_mut_ptr(),
    };
    let mut sequential = |n: usize, f: Tasks<'_>| -> ort::Result<()> {
        if reversed {
            (0..n).rev().for_each(f);
        } else {
            (0..n).for_each(f);
        }
        Ok(())
    };
    // SAFETY: the buffers have `d`'s sizes; the spans are `d`'s.
    unsafe { run(&d, &buf, &c.spans, scale, &mut sequential) }.unwrap();
    (out, present_latent, present_rope)
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 2e-5 * scale, "{what}: value {i}: {g} vs {w} (max |want| {scale})");
    }
}

fn dims(batch: usize, seq: usize, heads: usize, past_capacity: usize, present_capacity: usize) -> LatentDims {
    LatentDims { batch, seq, heads, rank: 24, rope: 8, past_capacity, present_capacity }
}

/// Checks `c` in place and not, in both task orders, against the reference and each other.
fn check(c: &Case, what: &str) {
    let scale = 0.3;
    let want = reference(c, scale);
    let (out, pl, pr) = run_case(c, scale, false, false);
    assert_close(&out, &want, what);
    let (rev, _, _) = run_case(c, scale, false, true);
    assert_eq!(out, rev, "{what}: the output depends on the task order");
    let d = &c.d;
    // In place (the pool bound as past and present) needs one capacity; a growing present is the host layout.
    let shared = d.past_capacity == d.present_capacity;
    let (inp, ipl, ipr) = if shared { run_case(c, scale, true, false) } else { (out.clone(), pl.clone(), pr.clone()) };
    assert_eq!(out, inp, "{what}: in place and copied pasts differ");
    // The presents: valid past, then the new positions, then (separate present) zeros / (in place) untouched.
    for b in 0..d.batch {
        let span = c.spans[b];
        for (width, present, in_place, past, new) in
            [(d.rank, &pl, &ipl, &c.past_latent, &c.latent), (d.rope, &pr, &ipr, &c.past_rope, &c.rope_key)]
        {
            for t in 0..d.present_capacity {
                let got = &present[(b * d.present_capacity + t) * width..][..width];
                let got_in_place = &in_place[(b * d.present_capacity + t) * width..][..width];
                let want: Vec<f32> = if t < span.past {
                    past[(b * d.past_capacity + t) * width..][..width].to_vec()
                } else if t < span.past + span.new {
                    new[(b * d.seq + t - span.past) * width..][..width].to_vec()
                } else {
                    assert!(got.iter().all(|&x| x == 0.0), "{what}: row {b} position {t} of a separate present");
                    if !shared {
                        continue;
                    }
                    let untouched = &past[(b * d.past_capacity + t) * width..][..width];
                    assert_eq!(got_in_place, untouched, "{what}: row {b} position {t} written in place past the row");
                    continue;
                };
                assert_eq!(got, &want[..], "{what}: row {b} position {t}");
                assert_eq!(got_in_place, &want[..], "{what}: row {b} position {t} in place");
            }
        }
    }
}

#[test]
fn ragged_decode_rows_match_the_reference() {
    // Rows with 4, 0 and 8 cached positions each decode one token; 20 heads span two head tiles.
    let d = dims(3, 1, 20, 12, 12);
    check(&case(d, &[5, 1, 9], 1), "ragged decode");
}

#[test]
fn short_decode_rows_split_their_heads_and_match_the_reference() {
    // 100 heads, one chunk per row: batch 1 splits them into 3 groups (34, 34, 32), batch 2 too, batch 32 does not.
    assert_eq!(decode::head_groups(1, 100), 3);
    assert_eq!(decode::head_groups(1, 128), 4, "DeepSeek-R1's 128 heads at batch 1: four tasks a row");
    assert_eq!(decode::head_groups(32, 128), 1);
    assert_eq!(decode::head_groups(1, 16), 1, "fewer than 32 heads a group are not split");
    let ranges: Vec<_> = (0..3).map(|g| decode::head_range(100, 3, g)).collect();
    assert_eq!(ranges, [0..34, 34..68, 68..100]);
    let d = dims(2, 1, 100, 40, 40);
    check(&case(d, &[30, 7], 4), "short decode, head groups");
}

#[test]
fn long_decode_rows_split_into_chunks_match_the_reference() {
    // Batch 2: 16 chunks would be allowed, capped at 8; rows of 650 and 300 positions take 3 and 2 chunks of 256.
    let d = dims(2, 1, 3, 700, 700);
    assert_eq!(decode::splits(2, 2_100), decode::MAX_SPLITS);
    assert_eq!(decode::splits(2, 650), 3, "no more chunks than the longest row fills");
    assert_eq!(decode::chunk(650, 3, 2), 512..650);
    assert!(decode::chunk(300, 3, 2).is_empty());
    check(&case(d, &[650, 300], 5), "long decode rows");
    // One chunk per row from 32 rows on, or when the rows fit one chunk: the output is written directly.
    assert_eq!((decode::splits(32, 5_000), decode::splits(1, 256)), (1, 1));
    check(&case(dims(33, 1, 2, 10, 10), &(1..=33).map(|i| i % 9 + 1).collect::<Vec<_>>(), 6), "32+ decode rows");
}

#[test]
fn a_right_padded_first_prompt_matches_the_reference() {
    // Two first prompts of 2 and 11 tokens in one step of width 11 (row 0 right-padded; two query tiles).
    let d = dims(2, 11, 3, 16, 16);
    check(&case(d, &[2, 11], 2), "right-padded prompt");
}

#[test]
fn a_chunk_after_a_past_is_causal_within_the_step() {
    // Batch 1: 7 cached positions, then a chunk of 10 (query s sees ..= 7 + s only).
    let d = dims(1, 10, 2, 20, 20);
    let c = case(d, &[17], 3);
    check(&c, "chunk after a past");
    // Changing the last new latent changes only the last query's output (causality).
    let mut later = case(d, &[17], 3);
    for x in &mut later.latent[9 * d.rank..] {
        *x += 1.0;
    }
    let (a, _, _) = run_case(&c, 0.3, true, false);
    let (b, _, _) = run_case(&later, 0.3, true, false);
    for h in 0..d.heads {
        for s in 0..d.seq {
            let row = (h * d.seq + s) * d.rank;
            let same = a[row..row + d.rank] == b[row..row + d.rank];
            assert_eq!(same, s < 9, "head {h} query {s}");
        }
    }
}

#[test]
fn a_separate_present_grows_to_the_total_length() {
    // Host layout: past of 3 positions, present of max(3, total 5) = 5.
    let d = dims(2, 2, 4, 3, 5);
    check(&case(d, &[5, 4], 4), "growing present");
}

#[test]
fn shapes_and_lengths_are_checked_by_name() {
    let ok = [vec![2, 4, 1, 24], vec![2, 4, 1, 8], vec![2, 1, 1, 24], vec![2, 1, 1, 8], vec![2, 1, 6, 24]];
    let shapes = |past_rope: Vec<usize>, seqlens: Vec<usize>| -> [Vec<usize>; 8] {
        let [a, b, c, e, f] = ok.clone();
        [a, b, c, e, f, past_rope, seqlens, vec![1]]
    };
    let d = check_shapes(4, &shapes(vec![2, 1, 6, 8], vec![2]), 7).unwrap();
    assert_eq!((d.batch, d.seq, d.rank, d.rope, d.past_capacity, d.present_capacity), (2, 1, 24, 8, 6, 7));
    let e = check_shapes(5, &shapes(vec![2, 1, 6, 8], vec![2]), 7).unwrap_err();
    assert!(e.contains("`query_latent` has 4 heads") && e.contains("num_heads is 5"), "{e}");
    let e = check_shapes(4, &shapes(vec![2, 1, 6, 9], vec![2]), 7).unwrap_err();
    assert!(e.contains("`past_rope` has shape [2, 1, 6, 9], expected [2, 1, 6, 8]"), "{e}");
    let e = check_shapes(4, &shapes(vec![2, 1, 6, 8], vec![3]), 7).unwrap_err();
    assert!(e.contains("`seqlens_k` has shape [3], expected [2]"), "{e}");
    let e = check_shapes(4, &shapes(vec![2, 6, 8], vec![2]), 7).unwrap_err();
    assert!(e.contains("`past_rope` has shape [2, 6, 8], expected 4 dimensions"), "{e}");
    let e = row_spans(&d, &[3, 7]).unwrap_err();
    assert!(e.contains("row 1: seqlens_k + 1 = 8 is outside 1 ..= 7"), "{e}");
    let e = row_spans(&LatentDims { seq: 1, past_capacity: 2, ..d }, &[3, 0]).unwrap_err();
    assert!(e.contains("row 0: 3 past positions, the past cache holds 2"), "{e}");
    let e = row_spans(&d, &[-1, 0]).unwrap_err();
    assert!(e.contains("row 0: seqlens_k + 1 = 0"), "{e}");
}

/// One decode step at DeepSeek-R1's attention shape (128 heads, rank 512, rope 64), batch 1, in place over a
/// 4,096-position cache, its tasks on `THREADS` threads (default 1: run in a loop): the numbers beside
/// `scripts/latent_inplace_check.py --threads N`'s in `docs/kv-cache-pool.md`.
/// `THREADS=2 cargo test --release -p r1-engine --lib latent_decode_step_timing -- --ignored --nocapture`.
#[test]
#[ignore = "timing, not a check"]
fn latent_decode_step_timing() {
    let capacity = 4096;
    for context in [128, 1000, 4000] {
        let d = LatentDims {
            batch: 1,
            seq: 1,
            heads: 128,
            rank: 512,
            rope: 64,
            past_capacity: capacity,
            present_capacity: capacity,
        };
        let mut c = case(d, &[context + 1], 7);
        let mut out = vec![0f32; d.heads * d.rank];
        let buf = LatentBuffers {
            query_latent: c.q_lat.as_ptr(),
            query_rope: c.q_rot.as_ptr(),
            latent: c.latent.as_ptr(),
            rope_key: c.rope_key.as_ptr(),
            past_latent: c.past_latent.as_ptr(),
            past_rope: c.past_rope.as_ptr(),
            present_latent: c.past_latent.as_mut_ptr(),
            present_rope: c.past_rope.as_mut_ptr(),
            out: out.as_mut_ptr(),
        };
        // Tasks over THREADS threads (default 1), each taking the next task index as ONNX Runtime's pool does.
        let threads = std::env::var("THREADS").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(1).max(1);
        let mut pool = |n: usize, f: Tasks<'_>| -> ort::Result<()> {
            if threads == 1 {
                (0..n).for_each(f);
                return Ok(());
            }
            let next = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        f(i);
                    });
                }
            });
            Ok(())
        };
        // SAFETY: the buffers have `d`'s sizes (past and present the same memory); the spans are `d`'s.
        let mut decode = || unsafe { run(&d, &buf, &c.spans, 0.1, &mut pool) }.unwrap();
        // The tiled form (16 heads per task) on the same step, for comparison.
        // SAFETY: as above; `run` appended the step's position.
        let tiled = || (0..attention_tasks(&d)).for_each(|t| unsafe { attend(&d, &buf, &c.spans, t, 0.1) });
        let time = |label: &str, f: &mut dyn FnMut()| {
            f();
            let reps = 10;
            let (mut best, mut total) = (f64::INFINITY, 0.0);
            for _ in 0..reps {
                let t = std::time::Instant::now();
                f();
                let dt = t.elapsed().as_secs_f64() * 1e3;
                (best, total) = (best.min(dt), total + dt);
            }
            eprintln!("context {context} {label}: mean {:.3} ms, best {best:.3} ms", total / reps as f64);
        };
        time("decode (chunks)", &mut decode);
        time("tiled (16 heads)", &mut { tiled });
    }
}
