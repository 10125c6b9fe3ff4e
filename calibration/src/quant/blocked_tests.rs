//! Tests of the blocked INT4 and per-channel INT8 work against the scalar definitions, on every build.
use super::*;
use crate::quant::{quantize_i4, quantize_u4, scale_from_amax};
use proptest::prelude::*;

/// The scalar definition, one column at a time (the code this module replaced).
fn reference(w: &[f32], k: usize, n: usize, block: usize, asymmetric: bool) -> BlockedI4 {
    let nb = k.div_ceil(block);
    let mut scales = vec![1.0f32; nb * n];
    let mut zps = vec![0u8; nb * n];
    for b in 0..nb {
        for c in 0..n {
            let col: Vec<f32> = (b * block..((b + 1) * block).min(k)).map(|r| w[r * n + c]).collect();
            if asymmetric {
                (scales[b * n + c], zps[b * n + c]) = best_u4_params(&col);
            } else {
                scales[b * n + c] = best_i4_scale(&col);
            }
        }
    }
    let values = (0..k * n)
        .map(|i| {
            let j = (i / n / block) * n + i % n;
            if asymmetric {
                quantize_u4(w[i], scales[j], zps[j]) as i8
            } else {
                quantize_i4(w[i], scales[j])
            }
        })
        .collect();
    BlockedI4 { k, n, block, scales, zero_points: asymmetric.then_some(zps), values }
}

fn best_i4_scale(xs: &[f32]) -> f32 {
    let base = scale_from_amax(xs.iter().fold(0.0f32, |m, x| m.max(x.abs())), INT4_QMAX).unwrap();
    let err = |s: f32| xs.iter().map(|&x| (x - f32::from(quantize_i4(x, s)) * s).powi(2)).sum::<f32>();
    let mut best = (err(base), base);
    for r in &INT4_CLIP_RATIOS[1..] {
        let s = (base * r).max(f32::MIN_POSITIVE);
        let e = err(s);
        if e < best.0 {
            best = (e, s);
        }
    }
    best.1
}

fn best_u4_params(xs: &[f32]) -> (f32, u8) {
    let lo = xs.iter().fold(0.0f32, |m, &x| m.min(x));
    let hi = xs.iter().fold(0.0f32, |m, &x| m.max(x));
    if hi - lo == 0.0 {
        return (1.0, 0);
    }
    let params = |r: f32| {
        let s = ((hi - lo) * r / UINT4_QMAX).max(f32::MIN_POSITIVE);
        (s, (-lo * r / s).round_ties_even().clamp(0.0, UINT4_QMAX) as u8)
    };
    let err = |(s, zp): (f32, u8)| {
        xs.iter().map(|&x| (x - f32::from(quantize_u4(x, s, zp) as i8 - zp as i8) * s).powi(2)).sum::<f32>()
    };
    let first = params(1.0);
    let mut best = (err(first), first);
    for &r in &INT4_CLIP_RATIOS[1..] {
        let p = params(r);
        let e = err(p);
        if e < best.0 {
            best = (e, p);
        }
    }
    best.1
}

fn same(a: &BlockedI4, b: &BlockedI4) -> bool {
    let bits = |s: &[f32]| s.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    bits(&a.scales) == bits(&b.scales) && a.zero_points == b.zero_points && a.values == b.values
}

#[test]
fn rounding_is_ties_to_even_over_the_clamped_range() {
    let mut v = -40.0f32;
    while v <= 40.0 {
        for x in [v, v + 0.5, v + 0.25, v - 1e-6, v + 1e-6] {
            let want = x.round_ties_even().clamp(-32.0, 32.0);
            assert_eq!(round_code::<false>(x), want, "{x}");
            assert_eq!(round_code::<true>(x).clamp(-32.0, 32.0), want, "{x}");
        }
        v += 1.0;
    }
    assert_eq!(round_code::<false>(f32::INFINITY), 32.0);
    assert_eq!(round_code::<false>(f32::NEG_INFINITY), -32.0);
    assert_eq!(round_code::<false>(1e30), 32.0);
}

/// Every build of both layouts, for this CPU.
fn builds() -> Vec<(&'static str, bool, BlockFn)> {
    let mut b: Vec<(&str, bool, BlockFn)> =
        vec![("portable", false, block_portable), ("portable packed", true, packed_block_portable)];
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            b.push(("avx2", false, |w, n, a, o, s, z| unsafe { block_avx2(w, n, a, o, s, z) }));
            b.push(("avx2 packed", true, |w, n, a, o, s, z| unsafe { packed_block_avx2(w, n, a, o, s, z) }));
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            b.push(("avx512f", false, |w, n, a, o, s, z| unsafe { block_avx512(w, n, a, o, s, z) }));
            b.push(("avx512f packed", true, |w, n, a, o, s, z| unsafe { packed_block_avx512(w, n, a, o, s, z) }));
        }
    }
    b
}

#[test]
fn every_build_gives_the_reference_bytes() {
    // Edge cases: all-zero columns, a column of one value, tiny magnitudes (scales at f32::MIN_POSITIVE), huge
    // ones (quotients far beyond the clamp), exact half-step values (rounding ties), N below one lane group;
    // an odd N (unpacked only) and an even one.
    for (k, n) in [(70, 37), (70, 38)] {
        let w: Vec<f32> = (0..k * n)
            .map(|i| match i % n {
                0 => 0.0,
                1 => 0.75,
                2 => 1e-38 * ((i % 7) as f32 - 3.0),
                3 => 3e37 * ((i % 5) as f32 - 2.0),
                4 => 0.5 * ((i / n % 9) as f32 - 4.0),
                _ => ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1,
            })
            .collect();
        for block in [32, 64, 128] {
            for asymmetric in [false, true] {
                let want = reference(&w, k, n, block, asymmetric);
                let case = format!("k {k}, n {n}, block {block}, asymmetric {asymmetric}");
                assert!(same(&quantize(&w, k, n, block, asymmetric), &want), "dispatch, {case}");
                let (packed, scales, zeros) = quantize_packed(&w, k, n, block, asymmetric);
                assert_eq!(packed, crate::quant::pack_int4(&want.values), "{case}");
                assert_eq!((scales, zeros), (want.scales.clone(), want.zero_points.clone()), "{case}");
                for (name, packs, f) in builds().into_iter().filter(|b| n.is_multiple_of(2) || !b.1) {
                    let nb = k.div_ceil(block);
                    let per_row = if packs { n / 2 } else { n };
                    let (mut out, mut s, mut z) = (vec![0u8; k * per_row], vec![1.0f32; nb * n], vec![0u8; nb * n]);
                    for b in 0..nb {
                        let rows = b * block..((b + 1) * block).min(k);
                        f(
                            &w[rows.start * n..rows.end * n],
                            n,
                            asymmetric,
                            &mut out[rows.start * per_row..rows.end * per_row],
                            &mut s[b * n..][..n],
                            &mut z[b * n..][..n],
                        );
                    }
                    let codes = if packs { out } else { crate::quant::pack_int4(bytemuck::cast_slice(&out)) };
                    assert_eq!(codes, crate::quant::pack_int4(&want.values), "{name}, {case}");
                    assert_eq!((s, asymmetric.then_some(z)), (want.scales.clone(), want.zero_points.clone()));
                }
            }
        }
    }
}

#[test]
fn int8_per_channel_matches_the_scalar_definition() {
    let (k, n) = (300, 37);
    let w: Vec<f32> = (0..k * n)
        .map(|i| match i % n {
            0 => 0.0,
            1 => 1e-38 * ((i % 7) as f32 - 3.0),
            2 => 3e37 * ((i % 5) as f32 - 2.0),
            3 => 0.5 * ((i / n % 9) as f32 - 4.0) / 127.0 * 4.0,
            _ => ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1,
        })
        .collect();
    let want_amax: Vec<f32> = (0..n).map(|c| (0..k).fold(0.0f32, |m, r| m.max(w[r * n + c].abs()))).collect();
    let amax = column_abs_max(&w, n);
    assert_eq!(amax, want_amax);
    let scales: Vec<f32> = amax.iter().map(|&a| scale_from_amax(a, crate::quant::INT8_QMAX).unwrap()).collect();
    let want: Vec<i8> = w.iter().enumerate().map(|(i, &x)| crate::quant::quantize_i8(x, scales[i % n])).collect();
    assert_eq!(quantize_columns_i8(&w, &scales), want);
    // a scale far below the values: every code saturates
    assert_eq!(quantize_columns_i8(&[1e30, -1e30, 0.4, -0.6], &[1e-30, 1e-30]), vec![127, -128, 127, -128]);
}

proptest! {
    #[test]
    fn matches_the_scalar_definition((k, n, block, w) in (1usize..200, 1usize..40, 0usize..3).prop_flat_map(|(k, n, b)|
            (Just(k), Just(n), Just(crate::quant::INT4_BLOCK_SIZES[b]), prop::collection::vec(-2f32..3.0, k * n)))) {
        for asymmetric in [false, true] {
            let want = reference(&w, k, n, block, asymmetric);
            prop_assert!(same(&quantize(&w, k, n, block, asymmetric), &want));
            let (packed, scales, zeros) = quantize_packed(&w, k, n, block, asymmetric);
            prop_assert_eq!(packed, crate::quant::pack_int4(&want.values));
            prop_assert_eq!((scales, zeros), (want.scales.clone(), want.zero_points.clone()));
        }
    }

    #[test]
    fn packing_matches(values in prop::collection::vec(-8i8..8, 0..300_000)) {
        prop_assert_eq!(pack(&values), crate::quant::pack_int4(&values));
    }
}
