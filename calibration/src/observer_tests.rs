//! Tests of the observers against simple references.
use super::*;
use crate::quant::quantize_with_scale;
use proptest::prelude::*;

/// Small deterministic generator (xorshift64*), so tests need no extra crates.
pub(crate) struct Rng(u64);
impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub(crate) fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32) / (1u64 << 24) as f32
    }
    /// Approximately standard normal (sum of 12 uniforms).
    pub(crate) fn normal(&mut self) -> f32 {
        (0..12).map(|_| self.uniform()).sum::<f32>() - 6.0
    }
}

/// Exact percentile: the `ceil(p/100 * n)`-th smallest |x|.
fn exact_percentile(xs: &[f32], p: f64) -> f32 {
    let mut a: Vec<f32> = xs.iter().map(|x| x.abs()).collect();
    a.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let r = ((p / 100.0 * a.len() as f64).ceil() as usize).clamp(1, a.len());
    a[r - 1]
}

/// Real MSE of symmetric int8 fake-quantization of `xs` with clip `c`.
fn real_mse(xs: &[f32], c: f32) -> f64 {
    let s = c / 127.0;
    let q = quantize_with_scale(xs, s);
    xs.iter().zip(q.dequantize()).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>() / xs.len() as f64
}

#[test]
fn method_parsing() {
    assert_eq!("entropy".parse::<CalibrationMethod>().unwrap(), CalibrationMethod::Entropy);
    assert_eq!(
        "percentile:99.9".parse::<CalibrationMethod>().unwrap(),
        CalibrationMethod::Percentile { percentile: 99.9 }
    );
    assert!("percentile:0".parse::<CalibrationMethod>().unwrap_err().to_string().contains("percentile"));
    assert!("kl".parse::<CalibrationMethod>().unwrap_err().to_string().contains("kl"));
}

#[test]
fn empty_and_zero_observers() {
    let o = TensorObserver::new();
    assert!(o.amax(CalibrationMethod::Max, "x").unwrap_err().to_string().contains("`x`"));
    let mut o = TensorObserver::new();
    o.observe(&[0.0; 10]).unwrap();
    assert_eq!(o.amax(CalibrationMethod::Entropy, "x").unwrap(), 0.0);
    o.observe(&[1.0, -2.0]).unwrap();
    assert_eq!(o.histogram().counts()[0], 10, "early zeros land in bin 0");
    assert_eq!(o.histogram().total(), 12);
    assert!(o.observe(&[f32::NAN]).is_err());
}

#[test]
fn rebinning_is_exact_merge() {
    let mut h = Histogram::new();
    h.observe(&[1.0, 0.25, 0.5]).unwrap();
    let w0 = h.bin_width();
    h.observe(&[3.5]).unwrap();
    assert_eq!(h.bin_width(), w0 * 4.0, "range 1.0 -> 4.0 merges 4 bins into one");
    let c = h.counts();
    assert_eq!(c.iter().sum::<u64>(), 4);
    assert_eq!(c[(0.25 / h.bin_width()) as usize], 1);
    assert_eq!(c[511], 1, "1.0 sat in the last of 2048 bins, now bin 2047 / 4");
    assert_eq!(c[1792], 1, "3.5 / (4.0 / 2048)");
    assert_eq!(h.max(), 3.5);
}

#[test]
fn memory_is_bounded() {
    let mut o = TensorObserver::new();
    let mut rng = Rng::new(1);
    for step in 0..200 {
        let batch: Vec<f32> = (0..1000).map(|_| rng.normal() * (1.0 + step as f32)).collect();
        o.observe(&batch).unwrap();
    }
    assert_eq!(o.histogram().counts().len(), HIST_BINS);
    assert_eq!(o.histogram().total(), 200_000);
}

#[test]
fn entropy_clips_a_known_outlier_tail() {
    // Bulk: |N(0,1)|, 200k values; tail: 20 values at 80.
    let mut rng = Rng::new(7);
    let mut xs: Vec<f32> = (0..200_000).map(|_| rng.normal()).collect();
    xs.extend(std::iter::repeat_n(80.0, 20));
    let mut o = TensorObserver::new();
    for chunk in xs.chunks(4096) {
        o.observe(chunk).unwrap();
    }
    let t = o.amax(CalibrationMethod::Entropy, "x").unwrap();
    let bulk_max = xs[..200_000].iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(t < 0.25 * 80.0, "entropy threshold {t} should clip the outliers at 80");
    assert!(t > 2.0, "entropy threshold {t} should keep most of the bulk (bulk max {bulk_max})");
    // And the MSE choice is also well below the outlier, and above one sigma.
    let m = o.amax(CalibrationMethod::Mse, "x").unwrap();
    assert!(m < 80.0 && m > 1.0, "mse threshold {m}");
}

#[test]
fn entropy_keeps_full_range_of_uniform_data() {
    let xs: Vec<f32> = (0..100_000).map(|i| (i as f32 / 100_000.0) * 4.0).collect();
    let mut h = Histogram::new();
    h.observe(&xs).unwrap();
    let t = h.entropy_threshold();
    assert!(t >= 0.9 * 4.0, "uniform data needs no clipping, got {t}");
}

/// Reference entropy search written from the definition on a histogram of `n` bins: brute force over
/// candidates with the same candidate set and KL, but the level sums computed by a separate loop.
fn reference_entropy_bins(hist: &[u64]) -> usize {
    let n = hist.len();
    let mut best = (f64::INFINITY, n);
    for i in ENTROPY_LEVELS..=n {
        let mut p: Vec<f64> = hist[..i].iter().map(|&c| c as f64).collect();
        p[i - 1] += hist[i..].iter().map(|&c| c as f64).sum::<f64>();
        let merge = i / ENTROPY_LEVELS;
        let level_of = |b: usize| (b / merge).min(ENTROPY_LEVELS - 1);
        let mut level_sum = vec![0.0f64; ENTROPY_LEVELS];
        let mut level_nz = vec![0usize; ENTROPY_LEVELS];
        for b in 0..i {
            level_sum[level_of(b)] += hist[b] as f64;
            if p[b] != 0.0 {
                level_nz[level_of(b)] += 1;
            }
        }
        let q: Vec<f64> = (0..i)
            .map(|b| if p[b] != 0.0 { level_sum[level_of(b)] / level_nz[level_of(b)] as f64 } else { 0.0 })
            .collect();
        let kl = kl_divergence_smoothed(&p, &q);
        if kl < best.0 {
            best = (kl, i);
        }
    }
    best.1
}

#[test]
fn kl_of_identical_distributions_is_zero() {
    let p = [1.0, 2.0, 0.0, 4.0];
    assert!(kl_divergence_smoothed(&p, &p).abs() < 1e-12);
    assert!(kl_divergence_smoothed(&p, &[4.0, 2.0, 1.0, 1.0]) > 0.1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn percentile_within_one_bin(xs in prop::collection::vec(-50f32..50.0, 10..3000), p in 50f64..100.0) {
        let mut h = Histogram::new();
        for c in xs.chunks(97) { h.observe(c).unwrap(); }
        prop_assert_eq!(h.counts().iter().sum::<u64>(), xs.len() as u64);
        let got = h.percentile(p).unwrap();
        let want = exact_percentile(&xs, p);
        let w = h.bin_width() as f32;
        prop_assert!(got >= want - w * 1e-3 && got <= want + w * (1.0 + 1e-3), "got {} want {} bin {}", got, want, w);
    }

    #[test]
    fn max_is_exact_and_thresholds_are_bounded(xs in prop::collection::vec(-1e3f32..1e3, 1..500)) {
        let mut o = TensorObserver::new();
        for c in xs.chunks(50) { o.observe(c).unwrap(); }
        let max = xs.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        prop_assert_eq!(o.amax(CalibrationMethod::Max, "x").unwrap(), max);
        for m in [CalibrationMethod::Entropy, CalibrationMethod::Mse, CalibrationMethod::Percentile { percentile: 99.0 }] {
            let a = o.amax(m, "x").unwrap();
            prop_assert!(a <= max && a >= 0.0, "{} gave {} > max {}", m, a, max);
        }
    }

    #[test]
    fn entropy_matches_reference(counts in prop::collection::vec(0u64..50, 128..400), tail in 0usize..4) {
        // small histograms (the search works on any length >= 128), with a few far outliers at the end
        let mut counts = counts;
        let n = counts.len();
        counts[n - 1] += tail as u64;
        prop_assert_eq!(entropy_bins(&counts), reference_entropy_bins(&counts));
    }

    #[test]
    fn mse_choice_is_near_the_real_optimum(seed in 0u64..1000, scale in 0.1f32..10.0) {
        let mut rng = Rng::new(seed);
        let mut xs: Vec<f32> = (0..2000).map(|_| rng.normal() * scale).collect();
        xs.extend((0..4).map(|_| scale * (20.0 + 20.0 * rng.uniform())));
        let mut h = Histogram::new();
        h.observe(&xs).unwrap();
        let chosen = h.mse_threshold();
        prop_assert!(chosen <= h.max());
        // brute-force the real MSE over a grid of clips
        let best = (1..=200).map(|i| real_mse(&xs, h.max() * i as f32 / 200.0)).fold(f64::INFINITY, f64::min);
        let got = real_mse(&xs, chosen);
        prop_assert!(got <= best * 1.3 + 1e-12, "histogram MSE choice {} has real MSE {} vs best {}", chosen, got, best);
    }
}

#[test]
fn channel_max() {
    let mut o = ChannelMaxObserver::new(3);
    o.observe(&[1.0, -5.0, 0.0, -2.0, 1.0, 0.5]).unwrap();
    o.observe(&[0.0, 0.0, -3.0]).unwrap();
    assert_eq!(o.max(), &[2.0, 5.0, 3.0]);
    // rows (1, -5, 0), (-2, 1, 0.5), (0, 0, -3): mean squares (5/3, 26/3, 9.25/3)
    let ms = o.mean_square();
    for (got, want) in ms.iter().zip([5.0f32 / 3.0, 26.0 / 3.0, 9.25 / 3.0]) {
        assert!((got - want).abs() < 1e-6, "{ms:?}");
    }
    let e = o.observe(&[1.0; 4]).unwrap_err().to_string();
    assert!(e.contains("channel count 3") && e.contains('4'), "{e}");
    assert_eq!(o.sampled_rows().1, 0, "no rows kept unless asked");
}

#[test]
fn row_sample_is_bounded_uniform_and_deterministic() {
    let run = || {
        let mut o = ChannelMaxObserver::new(2).keeping_rows(100);
        for i in 0..10_000 {
            o.observe(&[i as f32, -(i as f32)]).unwrap();
        }
        o
    };
    let (a, b) = (run(), run());
    let (rows, n) = a.sampled_rows();
    assert_eq!(n, 100);
    assert_eq!(rows, b.sampled_rows().0, "same inputs, same sample");
    // Whole rows are kept (x, -x), drawn across the stream: mean index near 5,000 and both halves represented.
    assert!(rows.chunks_exact(2).all(|r| r[1] == -r[0]));
    let mean = rows.chunks_exact(2).map(|r| f64::from(r[0])).sum::<f64>() / 100.0;
    assert!((3500.0..6500.0).contains(&mean), "mean row index {mean}");
    assert!(rows.chunks_exact(2).any(|r| r[0] < 2000.0) && rows.chunks_exact(2).any(|r| r[0] > 8000.0));
}
