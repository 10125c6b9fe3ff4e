use super::*;
use half::f16;

/// Deterministic values in [-1, 1).
fn noise(n: usize, seed: u64) -> Vec<f32> {
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
    run_with::<f32>(c, in_place, true)
}

/// [`run`] over caches of element `C`, with the AVX2 loops only when `simd`.
fn run_with<C: CacheElem>(c: &Case, in_place: bool, simd: bool) -> (Vec<f32>, Vec<C>, Vec<C>) {
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
                unsafe { attend_with(simd, &d, &buf, &task) };
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

/// Float32 and float16 caches, each through both forms of the loops (AVX2 where the CPU has it, and the portable
/// one), against the reference.
fn check(c: &Case, in_place: bool) {
    for simd in [true, false] {
        check_with::<f32>(c, in_place, simd, |x| x, 2e-5);
        // A float16 cache rounds what it stores (the reference rounds the same values); a key rotated in float32
        // may round to the neighbouring float16 of the reference's float64 rotation: one ulp, 2^-11 relative.
        check_with::<f16>(c, in_place, simd, |x| f16::from_f64(x).to_f64(), 1e-4);
    }
}

fn check_with<C: CacheElem>(c: &Case, in_place: bool, simd: bool, store: fn(f64) -> f64, tolerance: f64) {
    let d = c.d;
    let (out, pk, _) = run_with::<C>(c, in_place, simd);
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
                        "row {b} query {s} [{j}]: {} vs {}",
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
