use super::*;
use half::f16;

/// Deterministic values in [-1, 1).
pub(in crate::backend::attention) fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

struct Case {
    d: Dims,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    past_key: Vec<f32>,
    past_value: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    spans: Vec<RowSpan>,
    positions: Vec<Vec<usize>>,
}

fn case(d: Dims, totals: &[usize], seed: u64) -> Case {
    let half = d.head_dim / 2;
    let angles: Vec<f32> = (0..d.rotary_positions * half)
        .map(|i| (i / half) as f32 * 10_000f32.powf(-((i % half) as f32) / half as f32))
        .collect();
    let spans: Vec<RowSpan> = totals.iter().map(|&t| RowSpan::of(t, d.seq)).collect();
    Case {
        q: noise(d.batch * d.seq * d.heads * d.head_dim, seed),
        k: noise(d.batch * d.seq * d.kv_heads * d.head_dim, seed + 1),
        v: noise(d.batch * d.seq * d.kv_heads * d.head_dim, seed + 2),
        past_key: noise(d.batch * d.kv_heads * d.past_capacity * d.head_dim, seed + 3),
        past_value: noise(d.batch * d.kv_heads * d.past_capacity * d.head_dim, seed + 4),
        cos: angles.iter().map(|a| a.cos()).collect(),
        sin: angles.iter().map(|a| a.sin()).collect(),
        positions: spans
            .iter()
            .map(|s| (0..d.seq).map(|i| (s.past + i).min(d.rotary_positions - 1)).collect())
            .collect(),
        spans,
        d,
    }
}

/// Runs both phases over every task; `in_place` binds the past buffers as the presents.
fn run(c: &Case, in_place: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    run_with::<f32>(c, in_place, Isa::selected())
}

/// [`run`] over caches of element `C`, with the loops of `isa`.
fn run_with<C: CacheElem>(c: &Case, in_place: bool, isa: Isa) -> (Vec<f32>, Vec<C>, Vec<C>) {
    let d = c.d;
    let present_len = d.batch * d.kv_heads * d.present_capacity * d.head_dim;
    let past_key: Vec<C> = c.past_key.iter().map(|&x| C::from_f32(x)).collect();
    let past_value: Vec<C> = c.past_value.iter().map(|&x| C::from_f32(x)).collect();
    let (mut pk, mut pv) = if in_place {
        assert_eq!(d.past_capacity, d.present_capacity);
        (past_key.clone(), past_value.clone())
    } else {
        (vec![C::from_f32(f32::NAN); present_len], vec![C::from_f32(f32::NAN); present_len])
    };
    let mut out = vec![f32::NAN; d.batch * d.seq * d.heads * d.head_dim];
    let buf = Buffers {
        q: c.q.as_ptr(),
        k: c.k.as_ptr(),
        v: c.v.as_ptr(),
        past_key: if in_place { pk.as_ptr() } else { past_key.as_ptr() },
        past_value: if in_place { pv.as_ptr() } else { past_value.as_ptr() },
        present_key: pk.as_mut_ptr(),
        present_value: pv.as_mut_ptr(),
        cos: c.cos.as_ptr(),
        sin: c.sin.as_ptr(),
        out: out.as_mut_ptr(),
    };
    let scale = 1.0 / (d.head_dim as f32).sqrt();
    for b in 0..d.batch {
        for g in 0..d.kv_heads {
            // SAFETY: the case's buffers have `d`'s sizes; one task at a time.
            unsafe { append(&d, &buf, b, g, c.spans[b], &c.positions[b]) };
        }
    }
    for b in 0..d.batch {
        for g in 0..d.kv_heads {
            let mut s = 0;
            while s < d.seq {
                let tile = s..(s + QUERY_TILE).min(d.seq);
                // SAFETY: as above.
                let task = Task { b, g, span: c.spans[b], tile, positions: &c.positions[b], scale };
                unsafe { attend_with(isa, &d, &buf, &task) };
                s += QUERY_TILE;
            }
        }
    }
    (out, pk, pv)
}

/// Plain attention in float64 over the same inputs: the present caches it implies and the output. Cached values
/// go through `store` (the cache's rounding).
fn reference(c: &Case, store: fn(f64) -> f64) -> (Vec<f64>, Vec<Vec<f64>>) {
    let d = c.d;
    let (hd, half) = (d.head_dim, d.head_dim / 2);
    let rot = |x: &[f32], pos: usize| -> Vec<f64> {
        let mut o = vec![0f64; hd];
        for j in 0..half {
            let (cs, sn) = (c.cos[pos * half + j] as f64, c.sin[pos * half + j] as f64);
            o[j] = x[j] as f64 * cs - x[j + half] as f64 * sn;
            o[j + half] = x[j + half] as f64 * cs + x[j] as f64 * sn;
        }
        o
    };
    let mut out = vec![0f64; d.batch * d.seq * d.heads * hd];
    let mut presents = Vec::new();
    for b in 0..d.batch {
        let span = c.spans[b];
        for g in 0..d.kv_heads {
            let mut keys: Vec<Vec<f64>> = Vec::new();
            let mut values: Vec<Vec<f64>> = Vec::new();
            let base = (b * d.kv_heads + g) * d.past_capacity * hd;
            for t in 0..span.past {
                keys.push(c.past_key[base + t * hd..base + (t + 1) * hd].iter().map(|&x| store(x as f64)).collect());
                values
                    .push(c.past_value[base + t * hd..base + (t + 1) * hd].iter().map(|&x| store(x as f64)).collect());
            }
            for s in 0..span.new {
                let src = ((b * d.seq + s) * d.kv_heads + g) * hd;
                keys.push(rot(&c.k[src..src + hd], c.positions[b][s]).into_iter().map(store).collect());
                values.push(c.v[src..src + hd].iter().map(|&x| store(x as f64)).collect());
            }
            presents.push(keys.iter().flatten().copied().collect());
            for s in 0..span.new {
                for h in 0..d.group() {
                    let head = g * d.group() + h;
                    let src = (b * d.seq + s) * d.heads * hd + head * hd;
                    let q = rot(&c.q[src..src + hd], c.positions[b][s]);
                    let n = span.past + s + 1;
                    let scores: Vec<f64> = (0..n)
                        .map(|t| q.iter().zip(&keys[t]).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt())
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for j in 0..hd {
                        out[src + j] = (0..n).map(|t| e[t] / sum * values[t][j]).sum();
                    }
                }
            }
        }
    }
    (out, presents)
}

/// The forms of the loops this CPU runs (the portable one always; AVX2 and AVX-512 where the CPU has them: a form
/// it lacks is skipped, with a note).
fn forms() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|isa| {
            let has = isa.available();
            if !has {
                eprintln!("note: this CPU lacks {isa:?}; its loops are not tested here");
            }
            has
        })
        .collect()
}

/// Float32 and float16 caches, each through every form of the loops this CPU runs, against the reference.
fn check(c: &Case, in_place: bool) {
    for isa in forms() {
        check_with::<f32>(c, in_place, isa, |x| x, 2e-5);
        // A float16 cache rounds what it stores (the reference rounds the same values); a key rotated in float32
        // may round to the neighbouring float16 of the reference's float64 rotation: one ulp, 2^-11 relative.
        check_with::<f16>(c, in_place, isa, |x| f16::from_f64(x).to_f64(), 1e-4);
    }
}

fn check_with<C: CacheElem>(c: &Case, in_place: bool, isa: Isa, store: fn(f64) -> f64, tolerance: f64) {
    let d = c.d;
    let (out, pk, _) = run_with::<C>(c, in_place, isa);
    let (want, presents) = reference(c, store);
    let hd = d.head_dim;
    for b in 0..d.batch {
        let span = c.spans[b];
        for s in 0..d.seq {
            for j in 0..d.heads * hd {
                let i = (b * d.seq + s) * d.heads * hd + j;
                if s < span.new {
                    assert!(
                        (out[i] as f64 - want[i]).abs() < tolerance,
                        "{isa:?}, row {b} query {s} [{j}]: {} vs {}",
                        out[i],
                        want[i]
                    );
                } else {
                    assert_eq!(out[i], 0.0, "padding query {s} of row {b} is zero");
                }
            }
        }
        for g in 0..d.kv_heads {
            let base = (b * d.kv_heads + g) * d.present_capacity * hd;
            let want = &presents[b * d.kv_heads + g];
            for (t, w) in want.iter().enumerate() {
                let got = pk[base + t].to_f32() as f64;
                assert!(
                    (got - w).abs() <= 1e-5 + w.abs() / 1024.0,
                    "present key of row {b} head {g} at {t}: {got} vs {w}"
                );
            }
        }
    }
}

fn dims(batch: usize, seq: usize, capacity: usize) -> Dims {
    Dims {
        batch,
        seq,
        heads: 6,
        kv_heads: 2,
        head_dim: 32,
        past_capacity: capacity,
        present_capacity: capacity,
        rotary_positions: 512,
    }
}

#[test]
fn decode_rows_of_different_lengths_match_plain_attention_in_place() {
    let c = case(dims(3, 1, 300), &[1, 37, 300], 1);
    check(&c, true);
}

#[test]
fn a_prompt_chunk_after_a_past_is_causal_across_query_tiles() {
    // 40 new positions (three query tiles) after 57 cached ones.
    let c = case(dims(1, 40, 128), &[97], 2);
    check(&c, true);
}

#[test]
fn right_padded_first_prompts_write_only_their_positions_and_zero_the_padding() {
    let c = case(dims(2, 19, 64), &[19, 5], 3);
    check(&c, true);
    let (_, pk, _) = run(&c, true);
    let d = c.d;
    // Row 1 fed 5 positions: its cache beyond them is the past buffer's, untouched.
    let base = d.kv_heads * d.present_capacity * d.head_dim;
    assert_eq!(
        &pk[base + 5 * d.head_dim..base + 64 * d.head_dim],
        &c.past_key[base + 5 * d.head_dim..base + 64 * d.head_dim]
    );
}

#[test]
fn separate_past_and_present_buffers_copy_the_past_first() {
    let mut d = dims(2, 3, 20);
    d.present_capacity = 33;
    let c = case(d, &[23, 3], 4);
    check(&c, false);
}

#[test]
fn odd_head_sizes_and_key_counts_take_the_scalar_tails() {
    let mut d = dims(1, 2, 45);
    d.head_dim = 20;
    d.heads = 4;
    d.kv_heads = 4;
    let c = case(d, &[43], 5);
    check(&c, true);
}

#[test]
fn head_sizes_of_the_real_models_and_groups_wider_than_a_register_block() {
    // Head size 128 (the 64-lane value blocks of the AVX-512 loops, twice), a group of 7 query heads (one block
    // of 6 rows, then 1), decode rows and a prompt chunk; key counts that are not multiples of 4.
    let mut d = dims(2, 1, 203);
    d.head_dim = 128;
    d.heads = 14;
    check(&case(d, &[203, 66], 6), true);
    d.seq = 18;
    check(&case(d, &[199, 18], 7), true);
    // 80 = 64 + 16 (a value block, then one vector), a group of 8.
    let mut d = dims(1, 3, 77);
    d.head_dim = 80;
    d.heads = 16;
    check(&case(d, &[77], 8), true);
}

#[test]
fn isa_names_parse_and_fall_back_to_what_the_cpu_has() {
    assert_eq!(Isa::parse("AVX512"), Some(Isa::Avx512));
    assert_eq!(Isa::parse(" avx2 "), Some(Isa::Avx2));
    assert_eq!(Isa::parse("portable"), Some(Isa::Portable));
    assert_eq!(Isa::parse("sse"), None);
    assert_eq!(Isa::Portable.or_below(), Isa::Portable);
    for isa in Isa::ALL {
        let chosen = isa.or_below();
        assert!(chosen <= isa && chosen.available());
        assert_eq!(chosen == isa, isa.available());
    }
    assert!(Isa::selected().available());
    // Forcing a form holds until it is released (every form computes the same function, so the other tests of
    // this process are indifferent to it).
    assert_eq!(Isa::force(Some(Isa::Portable)), Isa::Portable);
    assert_eq!(Isa::selected(), Isa::Portable);
    assert!(Isa::force(None).available());
}

#[test]
fn the_polynomial_exp_is_within_two_ulp_of_libm_on_softmax_inputs() {
    let mut x = 0.0f32;
    while x > -87.0 {
        let (got, want) = (exp_neg(x), x.exp());
        let ulp = (got.to_bits() as i64 - want.to_bits() as i64).abs();
        assert!(ulp <= 2, "exp({x}) = {got}, libm {want}: {ulp} ulp");
        x -= 0.0137;
    }
    assert_eq!(exp_neg(0.0), 1.0);
    assert!(exp_neg(-1e9) < 1e-37, "clamped far below any softmax weight that matters");
}

/// One decode step's attention at the 1.5B shape (12 query heads, 2 key/value heads of 128, 28 layers, each its own
/// float16 or float32 cache of 4,096 positions bound in place), two threads (one per key/value head, as ONNX
/// Runtime's pool runs the tasks), at 128 and 4,000 cached positions; every form of the loops this CPU has (and the
/// SIMD loops' prefetch distances) in interleaved rounds, so that each sees the same minutes of a shared host.
#[test]
#[ignore = "a timing, not a check: cargo test --release -p r1-engine --lib attention_decode_timing -- --ignored --nocapture"]
fn attention_decode_timing() {
    timing::<f16>("float16");
    timing::<f32>("float32");
}

fn timing<C: CacheElem + Send + Sync>(what: &str) {
    use std::time::Instant;
    const LAYERS: usize = 28;
    const CAP: usize = 4096;
    let d = Dims {
        batch: 1,
        seq: 1,
        heads: 12,
        kv_heads: 2,
        head_dim: 128,
        past_capacity: CAP,
        present_capacity: CAP,
        rotary_positions: CAP,
    };
    let n = d.kv_heads * CAP * d.head_dim;
    let fill = |seed| noise(n, seed).into_iter().map(|x| C::from_f32(x)).collect::<Vec<C>>();
    let mut caches: Vec<(Vec<C>, Vec<C>)> = (0..LAYERS as u64).map(|l| (fill(2 * l + 10), fill(2 * l + 11))).collect();
    let (q, k, v) =
        (noise(d.heads * d.head_dim, 1), noise(d.kv_heads * d.head_dim, 2), noise(d.kv_heads * d.head_dim, 3));
    let (cos, sin) = (vec![1f32; CAP * d.head_dim / 2], vec![0f32; CAP * d.head_dim / 2]);
    let mut outs = vec![vec![0f32; d.heads * d.head_dim]; LAYERS];
    let bufs: Vec<Buffers<C>> = caches
        .iter_mut()
        .zip(&mut outs)
        .map(|((pk, pv), out)| Buffers {
            q: q.as_ptr(),
            k: k.as_ptr(),
            v: v.as_ptr(),
            past_key: pk.as_ptr(),
            past_value: pv.as_ptr(),
            present_key: pk.as_mut_ptr(),
            present_value: pv.as_mut_ptr(),
            cos: cos.as_ptr(),
            sin: sin.as_ptr(),
            out: out.as_mut_ptr(),
        })
        .collect();
    let step = |isa: Isa, context: usize| {
        let span = RowSpan::of(context + 1, 1);
        let positions = [context];
        let t = Instant::now();
        std::thread::scope(|s| {
            for g in 0..d.kv_heads {
                let (bufs, positions) = (&bufs, &positions);
                s.spawn(move || {
                    for buf in bufs {
                        let task = Task { b: 0, g, span, tile: 0..1, positions, scale: 0.088 };
                        // SAFETY: each layer's buffers have `d`'s sizes; thread `g` writes only head `g`.
                        unsafe {
                            append(&d, buf, 0, g, span, positions);
                            attend_with(isa, &d, buf, &task);
                        }
                    }
                });
            }
        });
        t.elapsed().as_secs_f64() * 1e3
    };
    #[cfg(target_arch = "x86_64")]
    let forms: Vec<(Isa, usize)> =
        forms().into_iter().filter(|i| *i != Isa::Portable).flat_map(|i| [(i, 0), (i, 16), (i, 32), (i, 64)]).collect();
    #[cfg(not(target_arch = "x86_64"))]
    let forms: Vec<(Isa, usize)> = vec![(Isa::Portable, 0)];
    let contexts = [128, 4000];
    let mut ms = vec![vec![Vec::new(); forms.len()]; contexts.len()];
    for _round in 0..10 {
        for (ci, &c) in contexts.iter().enumerate() {
            for (fi, &(isa, ahead)) in forms.iter().enumerate() {
                #[cfg(target_arch = "x86_64")]
                PREFETCH_KEYS.store(ahead, std::sync::atomic::Ordering::Relaxed);
                let _ = ahead;
                step(isa, c); // warm-up
                for _ in 0..3 {
                    ms[ci][fi].push(step(isa, c));
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    PREFETCH_KEYS.store(16, std::sync::atomic::Ordering::Relaxed);
    println!("{what} cache: attention of one decode step, 28 layers, 2 threads (ms; best / median of 30)");
    println!("| loops | prefetch (keys ahead) | 128 best | 128 median | 4000 best | 4000 median |");
    println!("|---|---|---|---|---|---|");
    for (fi, (isa, ahead)) in forms.iter().enumerate() {
        let mut row = format!("| {isa:?} | {ahead} |");
        for per_context in &mut ms {
            let xs = &mut per_context[fi];
            xs.sort_by(f64::total_cmp);
            row += &format!(" {:.2} | {:.2} |", xs[0], xs[xs.len() / 2]);
        }
        println!("{row}");
    }
}
