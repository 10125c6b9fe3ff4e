//! Sampler against a plain reference implementation (full sort, f64 softmax), plus the properties the issue
//! names: greedy == argmax, top-k never leaves the k best, top-p keeps the minimal nucleus, seeded counts match
//! the distribution.

use proptest::prelude::*;
use r1_engine::sampling::{Sampler, SamplingParams};

/// Reference: repetition penalty → temperature → top-k → top-p → min-p, by full sorts in f64. Returns the final
/// set sorted by id with renormalized probabilities, and the nucleus margin (distance of the top-p cut from
/// `top_p`, for skipping knife-edge cases).
fn reference(logits: &[f32], context: &[u32], p: &SamplingParams) -> (Vec<(u32, f64)>, f64) {
    let mut l: Vec<f32> = logits.to_vec();
    if p.repetition_penalty != 1.0 {
        let mut seen = context.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for id in seen {
            let x = &mut l[id as usize];
            *x = if *x > 0.0 { *x / p.repetition_penalty } else { *x * p.repetition_penalty };
        }
    }
    let argmax = (0..l.len()).fold(0, |b, i| if l[i] > l[b] { i } else { b });
    if p.temperature == 0.0 {
        return (vec![(argmax as u32, 1.0)], f64::INFINITY);
    }
    // Sorted descending, ties by id.
    let mut order: Vec<usize> = (0..l.len()).collect();
    order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
    if p.top_k > 0 && (p.top_k as usize) < l.len() {
        let kth = l[order[p.top_k as usize - 1]];
        order.retain(|&i| l[i] >= kth);
    }
    let m = f64::from(l[order[0]]);
    let t = f64::from(p.temperature);
    let w: Vec<f64> = order.iter().map(|&i| ((f64::from(l[i]) - m) / t).exp()).collect();
    let z: f64 = w.iter().sum();
    let mut keep = order.len();
    let mut margin = f64::INFINITY;
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        for (j, wj) in w.iter().enumerate() {
            let before = cum;
            cum += wj / z;
            if cum >= f64::from(p.top_p) {
                keep = j + 1;
                margin = (cum - f64::from(p.top_p)).min(f64::from(p.top_p) - before);
                break;
            }
        }
    }
    let mut out: Vec<(u32, f64)> = Vec::new();
    for j in 0..keep {
        let ratio = w[j] / w[0];
        if p.min_p > 0.0 {
            margin = margin.min((ratio - f64::from(p.min_p)).abs());
        }
        if ratio >= f64::from(p.min_p) {
            out.push((order[j] as u32, w[j]));
        }
    }
    let total: f64 = out.iter().map(|x| x.1).sum();
    let mut out: Vec<(u32, f64)> = out.into_iter().map(|(i, x)| (i, x / total)).collect();
    out.sort_by_key(|x| x.0);
    (out, margin)
}

fn params() -> impl Strategy<Value = SamplingParams> {
    (
        prop_oneof![Just(0.0f32), 0.05f32..2.0],
        prop_oneof![Just(1.0f32), 0.05f32..1.0],
        prop_oneof![Just(0u32), 1u32..40],
        prop_oneof![Just(0.0f32), 0.0f32..0.5],
        prop_oneof![Just(1.0f32), 0.5f32..2.0],
        any::<u64>(),
    )
        .prop_map(|(temperature, top_p, top_k, min_p, repetition_penalty, seed)| SamplingParams {
            temperature,
            top_p,
            top_k,
            min_p,
            repetition_penalty,
            seed: Some(seed),
            ..Default::default()
        })
}

fn row() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-12.0f32..12.0, 1..300)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, .. ProptestConfig::default() })]

    #[test]
    fn candidate_set_matches_reference(logits in row(), p in params(), ctx in prop::collection::vec(0u32..300, 0..20)) {
        let ctx: Vec<u32> = ctx.into_iter().filter(|&i| (i as usize) < logits.len()).collect();
        let (expected, margin) = reference(&logits, &ctx, &p);
        prop_assume!(margin > 1e-4);
        let mut s = Sampler::new(p).unwrap();
        let got = s.candidates(&logits, &ctx).unwrap();
        let got_ids: Vec<u32> = got.iter().map(|c| c.id).collect();
        let exp_ids: Vec<u32> = expected.iter().map(|c| c.0).collect();
        prop_assert_eq!(&got_ids, &exp_ids, "params {:?}", p);
        for (g, e) in got.iter().zip(&expected) {
            prop_assert!((g.prob - e.1).abs() < 1e-5, "prob of {} {} vs {}", g.id, g.prob, e.1);
        }
        // The drawn token is always in the set.
        let tok = s.sample(&logits, &ctx).unwrap();
        prop_assert!(got_ids.contains(&tok));
    }

    #[test]
    fn greedy_is_argmax(logits in row()) {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        let first_max = (0..logits.len()).fold(0, |b, i| if logits[i] > logits[b] { i } else { b });
        prop_assert_eq!(s.sample(&logits, &[]).unwrap(), first_max as u32);
    }

    #[test]
    fn top_k_never_leaves_the_k_best(logits in row(), k in 1u32..20, seed in any::<u64>()) {
        let mut sorted = logits.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[(k as usize).min(sorted.len()) - 1];
        let mut s = Sampler::new(SamplingParams { top_k: k, temperature: 2.0, seed: Some(seed), ..Default::default() }).unwrap();
        for _ in 0..20 {
            let t = s.sample(&logits, &[]).unwrap();
            prop_assert!(logits[t as usize] >= kth, "sampled logit {} below k-th best {}", logits[t as usize], kth);
        }
    }

    #[test]
    fn top_p_keeps_the_minimal_nucleus(logits in row(), top_p in 0.05f32..0.99, t in 0.2f32..2.0) {
        let p = SamplingParams { top_p, temperature: t, seed: Some(1), ..Default::default() };
        let mut s = Sampler::new(p).unwrap();
        let kept = s.candidates(&logits, &[]).unwrap();
        // Full-distribution probabilities of the kept tokens.
        let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let w: Vec<f64> = logits.iter().map(|&l| ((l as f64 - m) / t as f64).exp()).collect();
        let z: f64 = w.iter().sum();
        let mass: f64 = kept.iter().map(|c| w[c.id as usize] / z).sum();
        let smallest = kept.iter().map(|c| w[c.id as usize] / z).fold(f64::INFINITY, f64::min);
        prop_assume!((mass - top_p as f64).abs() > 1e-6 && (mass - smallest - top_p as f64).abs() > 1e-6);
        prop_assert!(mass >= top_p as f64, "nucleus mass {} < top_p {}", mass, top_p);
        prop_assert!(mass - smallest < top_p as f64, "nucleus not minimal: {} without its smallest", mass - smallest);
        // Every kept token is at least as likely as every dropped one.
        let min_kept = kept.iter().map(|c| logits[c.id as usize]).fold(f32::INFINITY, f32::min);
        let ids: std::collections::HashSet<u32> = kept.iter().map(|c| c.id).collect();
        prop_assert!((0..logits.len() as u32).filter(|i| !ids.contains(i)).all(|i| logits[i as usize] <= min_kept));
    }
}

#[test]
fn seeded_counts_follow_the_distribution() {
    // p = 1/7, 2/7, 4/7 at temperature 1; with top_k = 2: 1/3, 2/3 over the two best.
    let logits = [0.0f32, 2f32.ln(), 4f32.ln()];
    for (top_k, expected) in [(0u32, vec![1.0 / 7.0, 2.0 / 7.0, 4.0 / 7.0]), (2, vec![0.0, 1.0 / 3.0, 2.0 / 3.0])] {
        let n = 70_000usize;
        let mut s = Sampler::new(SamplingParams { top_k, seed: Some(42), ..Default::default() }).unwrap();
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[s.sample(&logits, &[]).unwrap() as usize] += 1;
        }
        for (c, p) in counts.iter().zip(&expected) {
            let sd = (n as f64 * p * (1.0 - p)).sqrt().max(1.0);
            let z = (*c as f64 - n as f64 * p).abs() / sd;
            assert!(z < 5.0, "top_k={top_k}: count {c} vs expected {:.0} ({z:.1} sd); all {counts:?}", n as f64 * p);
        }
    }
}

#[test]
fn repetition_penalty_lowers_seen_tokens() {
    let logits = [2.0f32, 2.0, -1.0, -1.0];
    let mut s =
        Sampler::new(SamplingParams { repetition_penalty: 2.0, temperature: 1.0, seed: Some(3), ..Default::default() })
            .unwrap();
    let c = s.candidates(&logits, &[0, 0, 2]).unwrap();
    // 2 → 1 and -1 → -2 for the seen ids, applied once however often they occur.
    let w = |l: f64| l.exp();
    let z = w(1.0) + w(2.0) + w(-2.0) + w(-1.0);
    for (cand, l) in c.iter().zip([1.0, 2.0, -2.0, -1.0]) {
        assert!((cand.prob - w(l) / z).abs() < 1e-6, "{cand:?}");
    }
    let mut greedy = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() }).unwrap();
    assert_eq!(greedy.sample(&logits, &[0]).unwrap(), 1);
}

#[test]
fn bad_rows_are_errors_not_panics() {
    let mut s = Sampler::new(SamplingParams::default()).unwrap();
    assert_eq!(s.sample(&[], &[]).unwrap_err().kind(), "empty_logits");
    let e = s.sample(&[0.0, f32::NAN, 1.0], &[]).unwrap_err();
    assert_eq!(e.to_string(), "logits row of 3 entries is unusable: NaN at index 1");
    assert!(s.sample(&[f32::NEG_INFINITY; 4], &[]).is_err());
    assert!(s.sample(&[0.0, f32::INFINITY], &[]).is_err());
    // -inf entries are masked tokens and never drawn.
    for _ in 0..100 {
        assert_eq!(s.sample(&[f32::NEG_INFINITY, 0.5, f32::NEG_INFINITY], &[]).unwrap(), 1);
    }
    // Context ids beyond the row are ignored.
    let mut p = Sampler::new(SamplingParams { repetition_penalty: 1.3, ..Default::default() }).unwrap();
    assert!(p.sample(&[0.0, 1.0], &[7, 1]).is_ok());
    assert!(Sampler::new(SamplingParams { top_p: 0.0, ..Default::default() }).is_err());
}
