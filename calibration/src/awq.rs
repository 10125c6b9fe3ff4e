//! Activation-aware weight scaling for the weight-only INT4 form (AWQ: Lin et al., "AWQ: Activation-aware Weight
//! Quantization for LLM Compression and Acceleration", 2024), folded into the RMSNorm that feeds the MatMuls.
//!
//! A weight row `j` (input channel `j`) that multiplies large activations matters more than the others: scaling it
//! by `s_j > 1` before quantization shrinks its relative rounding error, and dividing the activation by `s_j`
//! (folded into the norm weight, free at run time: [`crate::smooth_graph::fold_channel_factors`]) keeps the product
//! exact in real numbers. The factors are `s_j = rms(X_j)^α`, normalised so that `√(max·min) = 1`, with `α` searched
//! per input on a grid: the α whose quantized weights give the least output error on calibration activations,
//!
//! `‖X·W − (X/s)·Q(diag(s)·W)‖²`
//!
//! with `X` a uniform sample of the input's rows kept by the calibration pass (reservoir sampling,
//! [`crate::observer::ChannelMaxObserver::keeping_rows`]; [`AwqConfig::rows`]). (A first version chose α on the
//! diagonal estimate `Σ_j E[X_j²] / s_j² · Σ_n (Q(s_j W_jn) − s_j W_jn)²`, which ignores cross-channel correlation;
//! it moved arith-r1's accuracy either way and was replaced: BENCHMARKS.md.) `α = 0` is the plain quantization and always a candidate, so the chosen factors never score worse than no
//! scaling on the sample. The error is evaluated on an evenly spaced subset of each weight's columns
//! ([`AwqConfig::sample_columns`]), with the exact INT4 scheme the export writes (block size, asymmetric or
//! symmetric, MSE clip search).
//!
//! Inputs that no norm produces (`o_proj`, `down_proj`) are left alone, as SmoothQuant leaves them: folding there
//! would need an extra multiply at run time.
use std::collections::HashMap;

use serde::Serialize;

use crate::error::{ensure_finite, ensure_len, Result};
use crate::external::{ExternalDataReader, ExternalDataWriter};
use crate::quant::{quantize_blocked_i4, quantize_blocked_u4};
use crate::smooth_graph::{fold_channel_factors, SmoothSummary};
use crate::smoothquant::SMOOTH_MIN;
use r1_proto::onnx::ModelProto;

/// How the search runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AwqConfig {
    /// INT4 rows per block (32, 64 or 128), as the export quantizes.
    pub block: usize,
    /// Unsigned codes with a zero point per block (else symmetric signed codes).
    pub asymmetric: bool,
    /// α is searched over `0, 1/grid, …, 1`.
    pub grid: usize,
    /// Columns of each weight the error is evaluated on (all when the weight has fewer).
    pub sample_columns: usize,
    /// Activation rows the calibration pass keeps per input for the error.
    pub rows: usize,
}

impl AwqConfig {
    /// Defaults: a grid of 10 steps (AWQ's reference uses 20), 128 columns per weight, 512 rows per input.
    pub fn new(block: usize, asymmetric: bool) -> Self {
        AwqConfig { block, asymmetric, grid: 10, sample_columns: 128, rows: 512 }
    }
}

/// What the calibration pass observed of one MatMul input.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InputStats {
    /// Per-channel `E[x²]`.
    pub mean_square: Vec<f32>,
    /// Sampled rows, row-major `[n, k]` (at least one).
    pub rows: Vec<f32>,
}

/// The search's outcome for one input.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AwqChoice {
    /// The activation tensor.
    pub activation: String,
    /// The α chosen (0: left as is).
    pub alpha: f32,
    /// Estimated output error with the chosen factors relative to plain quantization (≤ 1).
    pub error_ratio: f64,
}

/// What [`apply_awq`] did: the folds and the α chosen per input.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AwqSummary {
    /// Inputs folded or skipped (with the reason), as SmoothQuant reports them.
    pub folds: SmoothSummary,
    /// The search's choice per searched input.
    pub choices: Vec<AwqChoice>,
}

/// Searches α for every norm-fed MatMul input with statistics in `stats` (from
/// [`crate::calibrate::Calibrator::channel_mean_square`] and [`crate::calibrate::Calibrator::sampled_rows`]) and
/// folds the chosen factors into `model`; rescaled weights go to `spill` when given.
pub fn apply_awq(
    model: &mut ModelProto,
    reader: &ExternalDataReader,
    stats: &HashMap<String, InputStats>,
    cfg: AwqConfig,
    spill: Option<&mut ExternalDataWriter>,
) -> Result<AwqSummary> {
    let channels = stats.iter().map(|(a, m)| (a.clone(), m.mean_square.len())).collect();
    let mut choices = Vec::new();
    let mut factors = |a: &str, weights: &[(&[f32], usize)], k: usize| -> Result<Option<Vec<f32>>> {
        let (alpha, s, ratio) = search(&stats[a], weights, k, cfg)?;
        choices.push(AwqChoice { activation: a.to_string(), alpha, error_ratio: ratio });
        Ok((alpha > 0.0).then_some(s))
    };
    let folds = fold_channel_factors(model, reader, &channels, &mut factors, spill)?;
    Ok(AwqSummary { folds, choices })
}

/// `(α, factors, error ratio)` of the best α on the grid for one input read by `weights` (row-major `[k, N_i]`).
pub fn search(
    stats: &InputStats,
    weights: &[(&[f32], usize)],
    k: usize,
    cfg: AwqConfig,
) -> Result<(f32, Vec<f32>, f64)> {
    let mean_square = &stats.mean_square;
    ensure_len("per-channel mean squares (one per input channel)", k, mean_square.len())?;
    ensure_finite("per-channel mean squares", mean_square)?;
    if stats.rows.is_empty() || !stats.rows.len().is_multiple_of(k) {
        let want = format!("a non-zero multiple of K = {k}");
        return Err(crate::CalibError::invalid("sampled activation rows", want, stats.rows.len()));
    }
    let samples: Vec<(Vec<f32>, usize)> = weights
        .iter()
        .map(|(w, n)| {
            ensure_len("weight [K, N]", k * n, w.len())?;
            Ok(sample_columns(w, k, *n, cfg.sample_columns))
        })
        .collect::<Result<_>>()?;
    let rms: Vec<f32> = mean_square.iter().map(|m| m.max(0.0).sqrt().max(SMOOTH_MIN)).collect();
    let reference: Vec<Vec<f32>> = samples.iter().map(|(w, n)| matmul(&stats.rows, w, k, *n)).collect();
    let err = |s: &[f32]| output_error(&stats.rows, &samples, &reference, k, s, cfg);
    let plain = vec![1.0f32; k];
    let base = err(&plain)?;
    let mut best = (0.0f32, plain, base);
    for step in 1..=cfg.grid.max(1) {
        let alpha = step as f32 / cfg.grid.max(1) as f32;
        let s = factors(&rms, alpha);
        let e = err(&s)?;
        if e < best.2 {
            best = (alpha, s, e);
        }
    }
    let ratio = if base > 0.0 { best.2 / base } else { 1.0 };
    Ok((best.0, best.1, ratio))
}

/// `rms^α`, normalised so that `√(max · min) = 1`, clamped like SmoothQuant's factors.
fn factors(rms: &[f32], alpha: f32) -> Vec<f32> {
    let s: Vec<f32> = rms.iter().map(|r| r.powf(alpha)).collect();
    let (lo, hi) = s.iter().fold((f32::INFINITY, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let norm = (lo * hi).sqrt().max(SMOOTH_MIN);
    s.iter().map(|v| (v / norm).clamp(SMOOTH_MIN, 1.0 / SMOOTH_MIN)).collect()
}

/// Evenly spaced columns (at most `max`) of a row-major `[k, n]` weight, as a row-major `[k, m]` matrix.
fn sample_columns(w: &[f32], k: usize, n: usize, max: usize) -> (Vec<f32>, usize) {
    let m = n.min(max.max(1));
    let cols: Vec<usize> = (0..m).map(|i| i * n / m).collect();
    let mut out = Vec::with_capacity(k * m);
    for r in 0..k {
        out.extend(cols.iter().map(|&c| w[r * n + c]));
    }
    (out, m)
}

/// `X · W` for row-major `X [m, k]` and `W [k, n]`.
fn matmul(x: &[f32], w: &[f32], k: usize, n: usize) -> Vec<f32> {
    let m = x.len() / k.max(1);
    let mut y = vec![0.0f32; m * n];
    for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
        for (xv, wr) in xr.iter().zip(w.chunks_exact(n)) {
            for (o, wv) in yr.iter_mut().zip(wr) {
                *o += xv * wv;
            }
        }
    }
    y
}

/// `Q(diag(s) · W)` dequantized, for row-major `W [k, n]`.
fn quantized_scaled(w: &[f32], k: usize, n: usize, s: &[f32], cfg: AwqConfig) -> Result<Vec<f32>> {
    let scaled: Vec<f32> = w.iter().enumerate().map(|(i, v)| v * s[i / n]).collect();
    let q = if cfg.asymmetric {
        quantize_blocked_u4(&scaled, k, n, cfg.block)?
    } else {
        quantize_blocked_i4(&scaled, k, n, cfg.block)?
    };
    Ok(q.dequantize())
}

/// `Σ ‖X·W − (X/s)·Q(diag(s)·W)‖²` over every sampled weight, `reference` holding each `X·W`.
fn output_error(
    x: &[f32],
    samples: &[(Vec<f32>, usize)],
    reference: &[Vec<f32>],
    k: usize,
    s: &[f32],
    cfg: AwqConfig,
) -> Result<f64> {
    let xs: Vec<f32> = x.iter().enumerate().map(|(i, v)| v / s[i % k]).collect();
    let mut total = 0.0f64;
    for ((w, n), r) in samples.iter().zip(reference) {
        let y = matmul(&xs, &quantized_scaled(w, k, *n, s, cfg)?, k, *n);
        total += y.iter().zip(r).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A weight whose rows all have the same range, read by an activation with one dominant channel: the search
    /// scales that channel's row up (α > 0) and the expected error drops below plain quantization's.
    #[test]
    fn a_salient_channel_gets_a_larger_factor_and_the_error_drops() {
        let (k, n) = (64, 32);
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 7919 % 997) as f32 / 997.0 - 0.5) * 0.2).collect();
        let mut ms = vec![0.01f32; k];
        ms[5] = 100.0;
        ms[40] = 25.0;
        let cfg = AwqConfig::new(32, true);
        // Rows drawn with those mean squares: the output error drops, and the ratio is that of the real
        // ‖X·W − (X/s)·Q(sW)‖².
        let rows: Vec<f32> = (0..200 * k)
            .map(|i| {
                let sign = if (i * 2654435761usize) % 7 < 3 { -1.0 } else { 1.0 };
                sign * ms[i % k].sqrt() * (0.5 + ((i * 40503) % 101) as f32 / 100.0)
            })
            .collect();
        let stats = InputStats { mean_square: ms, rows: rows.clone() };
        let (alpha, s, ratio) = search(&stats, &[(&w, n)], k, cfg).unwrap();
        assert!(alpha > 0.0 && ratio < 0.9, "alpha {alpha}, ratio {ratio}");
        assert!(s[5] > s[40] && s[40] > s[0], "{} {} {}", s[5], s[40], s[0]);
        let reference = matmul(&rows, &w, k, n);
        let real = |s: &[f32]| {
            let xs: Vec<f32> = rows.iter().enumerate().map(|(i, v)| v / s[i % k]).collect();
            let y = matmul(&xs, &quantized_scaled(&w, k, n, s, cfg).unwrap(), k, n);
            y.iter().zip(&reference).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>()
        };
        assert!((real(&s) / real(&[1.0; 64]) - ratio).abs() < 1e-9);
    }

    #[test]
    fn uniform_activations_keep_plain_quantization_and_bad_lengths_are_named() {
        let (k, n) = (32, 8);
        let w: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.37).sin()).collect();
        let stats = |ms: Vec<f32>, rows: Vec<f32>| InputStats { mean_square: ms, rows };
        let cfg = AwqConfig::new(32, false);
        let (alpha, _, ratio) = search(&stats(vec![1.0; 32], vec![0.5; 64]), &[(&w, n)], k, cfg).unwrap();
        // Equal statistics: every α gives factors of 1 after normalisation, so plain quantization stays.
        assert_eq!((alpha, ratio), (0.0, 1.0));
        let e = search(&stats(vec![1.0; 31], vec![0.5; 64]), &[(&w, n)], k, cfg).unwrap_err().to_string();
        assert!(e.contains("mean squares") && e.contains("32") && e.contains("31"), "{e}");
        let e = search(&stats(vec![1.0; 32], vec![0.0; 33]), &[(&w, n)], k, cfg).unwrap_err().to_string();
        assert!(e.contains("sampled activation rows") && e.contains("32") && e.contains("33"), "{e}");
        let e = search(&stats(vec![1.0; 32], vec![]), &[(&w, n)], k, cfg).unwrap_err().to_string();
        assert!(e.contains("sampled activation rows") && e.contains("got 0"), "{e}");
    }

    #[test]
    fn sampled_columns_are_evenly_spaced() {
        let w: Vec<f32> = (0..2 * 10).map(|i| i as f32).collect();
        let (s, m) = sample_columns(&w, 2, 10, 4);
        assert_eq!(m, 4);
        assert_eq!(s, vec![0.0, 2.0, 5.0, 7.0, 10.0, 12.0, 15.0, 17.0]);
        assert_eq!(sample_columns(&w, 2, 10, 100).1, 10);
    }
}
