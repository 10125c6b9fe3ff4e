//! Streaming range observers. None of them stores activations: memory is fixed per observed tensor
//! ([`HIST_BINS`] counters plus a few scalars, or one maximum per channel), whatever the number of samples.
//!
//! - [`Histogram`]: 2048 bins over `|x|` on `[0, range]`. The first batch sets `range` to its abs-max; when a later
//!   batch exceeds the range, the bin width grows by an integer factor `m` and every `m` old bins merge into one, so
//!   re-binning is exact (no count is split between bins).
//! - From one histogram, every method of [`CalibrationMethod`] picks a clipping threshold `amax`:
//!   max (exact running abs-max), percentile, entropy (TensorRT's KL-divergence search) and MSE.
//! - [`ChannelMaxObserver`]: per-input-channel abs-max, for SmoothQuant.
use crate::error::{ensure_finite, CalibError, Result};
use crate::quant::INT8_QMAX;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Number of histogram bins.
pub const HIST_BINS: usize = 2048;
/// Number of quantized levels the entropy search maps the clipped distribution onto (int8 magnitudes).
pub const ENTROPY_LEVELS: usize = 128;
/// Default percentile for [`CalibrationMethod::Percentile`].
pub const DEFAULT_PERCENTILE: f64 = 99.99;

/// How a clipping range is chosen from the observed statistics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum CalibrationMethod {
    /// The largest |x| seen.
    Max,
    /// The given percentile of |x| (e.g. 99.99), resolved to the upper edge of its histogram bin.
    Percentile {
        /// Percentile in `(0, 100]`.
        percentile: f64,
    },
    /// TensorRT's entropy calibration: the threshold whose 128-level quantization has minimal KL divergence.
    Entropy,
    /// The threshold minimizing the expected squared quantization error (rounding inside, clipping outside).
    Mse,
}

impl fmt::Display for CalibrationMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CalibrationMethod::Max => f.write_str("max"),
            CalibrationMethod::Percentile { percentile } => write!(f, "percentile({percentile})"),
            CalibrationMethod::Entropy => f.write_str("entropy"),
            CalibrationMethod::Mse => f.write_str("mse"),
        }
    }
}

impl FromStr for CalibrationMethod {
    type Err = CalibError;
    /// Parses `max`, `entropy`, `mse`, `percentile` (99.99) or `percentile:P`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || CalibError::invalid("calibration method", "max, entropy, mse, percentile or percentile:P", s);
        match s {
            "max" => Ok(CalibrationMethod::Max),
            "entropy" => Ok(CalibrationMethod::Entropy),
            "mse" => Ok(CalibrationMethod::Mse),
            "percentile" => Ok(CalibrationMethod::Percentile { percentile: DEFAULT_PERCENTILE }),
            _ => {
                let p: f64 = s.strip_prefix("percentile:").ok_or_else(bad)?.parse().map_err(|_| bad())?;
                validate_percentile(p)?;
                Ok(CalibrationMethod::Percentile { percentile: p })
            }
        }
    }
}

fn validate_percentile(p: f64) -> Result<()> {
    if p > 0.0 && p <= 100.0 {
        Ok(())
    } else {
        Err(CalibError::invalid("percentile", "in (0, 100]", p))
    }
}

/// Fixed-size histogram of `|x|` with exact re-binning when the range grows.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    counts: Vec<u64>,
    /// Bin width; 0 until a non-zero value has been seen.
    width: f64,
    /// Zeros seen before the range was known (they belong in bin 0).
    pending_zeros: u64,
    total: u64,
    max: f32,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Histogram { counts: vec![0; HIST_BINS], width: 0.0, pending_zeros: 0, total: 0, max: 0.0 }
    }

    /// Adds a batch of values. Non-finite values are an error (and leave the histogram unchanged).
    pub fn observe(&mut self, xs: &[f32]) -> Result<()> {
        // one pass for the max and the finiteness check (the error path re-scans to name the element)
        let (mut amax, mut finite) = (0.0f32, true);
        for x in xs {
            let a = x.abs();
            finite &= a.is_finite();
            amax = amax.max(a);
        }
        if !finite {
            ensure_finite("activation batch", xs)?;
        }
        self.total += xs.len() as u64;
        self.max = self.max.max(amax);
        if self.width == 0.0 {
            if amax == 0.0 {
                self.pending_zeros += xs.len() as u64;
                return Ok(());
            }
            self.width = f64::from(amax) / HIST_BINS as f64;
            self.counts[0] += std::mem::take(&mut self.pending_zeros);
        } else if f64::from(amax) > self.range() {
            let m = (f64::from(amax) / self.range()).ceil().max(2.0) as usize;
            let mut merged = vec![0u64; HIST_BINS];
            for (i, c) in self.counts.iter().enumerate() {
                merged[i / m] += c;
            }
            self.counts = merged;
            self.width *= m as f64;
        }
        // Four interleaved partial histograms: activations crowd a few bins, and one counter array would serialize
        // on repeated increments of the same bin.
        let inv = (1.0 / self.width) as f32;
        let bin = |x: f32| ((x.abs() * inv) as usize).min(HIST_BINS - 1);
        let mut part = vec![[0u32; HIST_BINS]; 4];
        for chunk in xs.chunks(1 << 30) {
            let mut quads = chunk.chunks_exact(4);
            for q in &mut quads {
                part[0][bin(q[0])] += 1;
                part[1][bin(q[1])] += 1;
                part[2][bin(q[2])] += 1;
                part[3][bin(q[3])] += 1;
            }
            for &x in quads.remainder() {
                part[0][bin(x)] += 1;
            }
            for p in part.iter_mut() {
                for (c, v) in self.counts.iter_mut().zip(p.iter_mut()) {
                    *c += u64::from(std::mem::take(v));
                }
            }
        }
        Ok(())
    }

    /// Upper end of the binned range (`HIST_BINS * width`); 0 before any non-zero value.
    pub fn range(&self) -> f64 {
        self.width * HIST_BINS as f64
    }

    /// Bin width; 0 before any non-zero value.
    pub fn bin_width(&self) -> f64 {
        self.width
    }

    /// Bin counts (zeros seen before the range was known are reported in bin 0).
    pub fn counts(&self) -> Vec<u64> {
        let mut c = self.counts.clone();
        c[0] += self.pending_zeros;
        c
    }

    /// Number of values observed.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Exact largest |x| observed.
    pub fn max(&self) -> f32 {
        self.max
    }

    /// Upper edge of the bin holding the `p`-th percentile of |x| (`p` in `(0, 100]`): within one bin width
    /// above the exact sorted percentile, clamped to the observed max.
    pub fn percentile(&self, p: f64) -> Result<f32> {
        validate_percentile(p)?;
        if self.width == 0.0 {
            return Ok(0.0);
        }
        let target = p / 100.0 * self.total as f64;
        let mut cum = 0u64;
        for (i, c) in self.counts().iter().enumerate() {
            cum += c;
            if cum as f64 >= target {
                return Ok((((i + 1) as f64 * self.width) as f32).min(self.max));
            }
        }
        Ok(self.max)
    }

    /// TensorRT-style entropy threshold: for each candidate `i` in `128..=2048` bins, the reference distribution
    /// `P` is bins `0..i` with every count beyond folded into bin `i - 1`; `Q` merges bins `0..i` into 128 levels
    /// and spreads each level evenly over its non-empty bins; both are smoothed (zeros get 1e-4, taken from the
    /// non-zeros) and normalized. Returns `i * width` for the `i` with least `KL(P || Q)`.
    pub fn entropy_threshold(&self) -> f32 {
        if self.width == 0.0 {
            return 0.0;
        }
        ((entropy_bins(&self.counts()) as f64 * self.width) as f32).min(self.max)
    }

    /// Threshold minimizing the expected squared error of symmetric int8 fake-quantization, estimated from the
    /// histogram (bin centres): values below the clip `c` cost the rounding noise `(c/127)^2 / 12`, values above
    /// cost `(v - c)^2`. Candidates are the bin edges `width, 2*width, ..`; the result is never above the max.
    pub fn mse_threshold(&self) -> f32 {
        if self.width == 0.0 {
            return 0.0;
        }
        let counts = self.counts();
        let used = counts.iter().rposition(|&c| c > 0).map_or(1, |i| i + 1);
        let mut best = (f64::INFINITY, used);
        for i in 1..=used {
            let c = i as f64 * self.width;
            let noise = (c / f64::from(INT8_QMAX)).powi(2) / 12.0;
            let mut err = 0.0;
            for (b, &n) in counts[..used].iter().enumerate() {
                if n == 0 {
                    continue;
                }
                let v = (b as f64 + 0.5) * self.width;
                err += n as f64 * if v <= c { noise } else { (v - c).powi(2) };
            }
            if err < best.0 {
                best = (err, i);
            }
        }
        ((best.1 as f64 * self.width) as f32).min(self.max)
    }
}

/// The entropy search of [`Histogram::entropy_threshold`] on any histogram of at least [`ENTROPY_LEVELS`] bins:
/// the number of leading bins `i` (from `128..=len`) whose 128-level quantization has least KL divergence.
pub fn entropy_bins(counts: &[u64]) -> usize {
    let n = counts.len();
    if n < ENTROPY_LEVELS {
        return n;
    }
    let hist: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
    let mut suffix = vec![0.0f64; n + 1];
    for i in (0..n).rev() {
        suffix[i] = suffix[i + 1] + hist[i];
    }
    let mut best = (f64::INFINITY, n);
    let mut p = Vec::with_capacity(n);
    let mut q = Vec::with_capacity(n);
    for i in ENTROPY_LEVELS..=n {
        p.clear();
        p.extend_from_slice(&hist[..i]);
        p[i - 1] += suffix[i];
        q.clear();
        q.resize(i, 0.0);
        let merge = i / ENTROPY_LEVELS;
        for j in 0..ENTROPY_LEVELS {
            let start = j * merge;
            let end = if j == ENTROPY_LEVELS - 1 { i } else { start + merge };
            let sum: f64 = hist[start..end].iter().sum();
            let nonzero = p[start..end].iter().filter(|&&v| v != 0.0).count();
            if nonzero > 0 {
                for b in start..end {
                    if p[b] != 0.0 {
                        q[b] = sum / nonzero as f64;
                    }
                }
            }
        }
        let kl = kl_divergence_smoothed(&p, &q);
        if kl < best.0 {
            best = (kl, i);
        }
    }
    best.1
}

/// `KL(P || Q)` of two unnormalized distributions after normalizing and smoothing zeros (eps 1e-4 per zero bin,
/// taken evenly from the non-zero bins), as TensorRT and ONNX Runtime's entropy calibrators do.
pub fn kl_divergence_smoothed(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq) = (Smoothing::of(p), Smoothing::of(q));
    p.iter()
        .zip(q)
        .map(|(&a, &b)| (sp.apply(a), sq.apply(b)))
        .filter(|(a, _)| *a > 0.0)
        .map(|(a, b)| a * (a / b).ln())
        .sum()
}

/// Normalization and zero-smoothing of one distribution, applied element by element (no allocation: the entropy
/// search evaluates ~2000 candidates per tensor).
struct Smoothing {
    sum: f64,
    /// Mass taken from each non-zero bin; `None` when there is nothing to smooth.
    take: Option<f64>,
}

impl Smoothing {
    const EPS: f64 = 1e-4;

    fn of(x: &[f64]) -> Self {
        let sum: f64 = x.iter().sum();
        let zeros = x.iter().filter(|&&v| v == 0.0).count();
        let nonzeros = x.len() - zeros;
        let take = (zeros > 0 && nonzeros > 0).then(|| Self::EPS * zeros as f64 / nonzeros as f64);
        Smoothing { sum: if sum > 0.0 { sum } else { 1.0 }, take }
    }

    fn apply(&self, v: f64) -> f64 {
        match self.take {
            None => v / self.sum,
            Some(_) if v == 0.0 => Self::EPS,
            Some(t) => (v / self.sum - t).max(Self::EPS * 1e-3),
        }
    }
}

/// Range observer for one tensor: exact running max plus a [`Histogram`], from which any
/// [`CalibrationMethod`] can be resolved after the fact.
#[derive(Debug, Clone, Default)]
pub struct TensorObserver {
    hist: Histogram,
}

impl TensorObserver {
    /// A fresh observer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a batch of activations.
    pub fn observe(&mut self, xs: &[f32]) -> Result<()> {
        self.hist.observe(xs)
    }

    /// The histogram seen so far.
    pub fn histogram(&self) -> &Histogram {
        &self.hist
    }

    /// The clipping threshold `amax` chosen by `method`. Errors if nothing was observed.
    pub fn amax(&self, method: CalibrationMethod, tensor: &str) -> Result<f32> {
        if self.hist.total() == 0 {
            return Err(CalibError::EmptyObserver { tensor: tensor.to_string() });
        }
        match method {
            CalibrationMethod::Max => Ok(self.hist.max()),
            CalibrationMethod::Percentile { percentile } => self.hist.percentile(percentile),
            CalibrationMethod::Entropy => Ok(self.hist.entropy_threshold()),
            CalibrationMethod::Mse => Ok(self.hist.mse_threshold()),
        }
    }
}

/// Per-channel abs-max (SmoothQuant's `max|X_j|`) and mean square (AWQ's saliency and error weight,
/// [`crate::awq`]) over the last axis of `[rows, channels]` activations.
/// With [`ChannelMaxObserver::keeping_rows`], it also keeps a uniform sample of whole rows (reservoir sampling with
/// a fixed seed: deterministic for the same inputs), which AWQ's search multiplies with candidate weights.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelMaxObserver {
    max: Vec<f32>,
    sum_sq: Vec<f64>,
    rows: u64,
    keep: usize,
    kept: Vec<f32>,
    rng: u64,
}

impl ChannelMaxObserver {
    /// An observer for `channels` channels.
    pub fn new(channels: usize) -> Self {
        ChannelMaxObserver {
            max: vec![0.0; channels],
            sum_sq: vec![0.0; channels],
            rows: 0,
            keep: 0,
            kept: Vec::new(),
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Also keeps a uniform sample of up to `rows` rows.
    pub fn keeping_rows(mut self, rows: usize) -> Self {
        self.keep = rows;
        self
    }

    /// The sampled rows, row-major `[n, channels]`, and `n`.
    pub fn sampled_rows(&self) -> (&[f32], usize) {
        (&self.kept, self.kept.len() / self.max.len().max(1))
    }

    fn sample(&mut self, row: &[f32]) {
        let c = row.len();
        let held = self.kept.len() / c.max(1);
        if held < self.keep {
            self.kept.extend_from_slice(row);
            return;
        }
        // Algorithm R: the i-th row (0-based) replaces a random slot with probability keep / (i + 1).
        self.rng = self.rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let j = (self.rng >> 33) % self.rows.max(1);
        if (j as usize) < self.keep {
            let at = j as usize * c;
            self.kept[at..at + c].copy_from_slice(row);
        }
    }

    /// Feeds a row-major `[rows, channels]` batch; the length must be a multiple of the channel count.
    pub fn observe(&mut self, xs: &[f32]) -> Result<()> {
        let c = self.max.len();
        if c == 0 || !xs.len().is_multiple_of(c) {
            return Err(CalibError::invalid(
                "activation length",
                format!("a multiple of the channel count {c}"),
                xs.len(),
            ));
        }
        ensure_finite("activation batch", xs)?;
        for row in xs.chunks_exact(c) {
            for ((m, s), x) in self.max.iter_mut().zip(self.sum_sq.iter_mut()).zip(row) {
                *m = m.max(x.abs());
                *s += f64::from(*x) * f64::from(*x);
            }
            self.rows += 1;
            if self.keep > 0 {
                self.sample(row);
            }
        }
        Ok(())
    }

    /// Per-channel maxima.
    pub fn max(&self) -> &[f32] {
        &self.max
    }

    /// Per-channel mean of `x²` over the rows seen (zeros before any row).
    pub fn mean_square(&self) -> Vec<f32> {
        let n = self.rows.max(1) as f64;
        self.sum_sq.iter().map(|s| (s / n) as f32).collect()
    }
}

#[cfg(test)]
#[path = "observer_tests.rs"]
mod tests;
