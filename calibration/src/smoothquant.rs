//! SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights before INT8 quantization.
//!
//! For a MatMul `Y = X · W` with `W` stored `[K, N]`, each input channel `j` gets a factor
//! `s_j = max|X_j|^α / max|W_j|^(1−α)`, where `max|W_j|` is the abs-max of row `j` over every weight that reads `X`
//! (q, k and v projections share one input). Then `Y = (X / s) · (diag(s) · W)`: the activation is divided by `s`
//! and row `j` of each weight multiplied by `s_j`. When `X` is the output of an RMSNorm with weight `γ`, the division
//! is free: `γ'_j = γ_j / s_j` ([`fold_into_norm`]), and the weights get `W'_{j,:} = s_j · W_{j,:}`
//! ([`scale_weight_rows`]).
//!
//! `α = 0` turns smoothing off (all factors 1), not the literal formula `1 / max|W_j|`. Both maxima are clamped
//! below at [`SMOOTH_MIN`] and the factors to `[SMOOTH_MIN, 1 / SMOOTH_MIN]`, so a dead channel never produces a
//! zero or infinite factor. After smoothing, activation ranges change: calibrate per-tensor activation scales on the
//! smoothed graph (for the `max` method, [`smoothed_amax`] gives the exact new abs-max from per-channel maxima).
use crate::error::{ensure_finite, ensure_len, CalibError, Result};

/// Default migration strength.
pub const DEFAULT_ALPHA: f32 = 0.5;
/// Lower clamp for channel maxima and smoothing factors (upper clamp is its inverse).
pub const SMOOTH_MIN: f32 = 1e-5;

/// Checks `alpha` is in `[0, 1]`.
pub fn validate_alpha(alpha: f32) -> Result<()> {
    if (0.0..=1.0).contains(&alpha) {
        Ok(())
    } else {
        Err(CalibError::invalid("smoothquant alpha", "between 0 and 1 (0 turns smoothing off)", alpha))
    }
}

/// Per-input-channel factors `s_j = max|X_j|^α / max|W_j|^(1−α)` (see the module docs for clamping and `α = 0`).
pub fn smoothing_factors(act_amax: &[f32], weight_amax: &[f32], alpha: f32) -> Result<Vec<f32>> {
    validate_alpha(alpha)?;
    ensure_len("weight row maxima (one per input channel)", act_amax.len(), weight_amax.len())?;
    ensure_finite("activation channel maxima", act_amax)?;
    ensure_finite("weight row maxima", weight_amax)?;
    if alpha == 0.0 {
        return Ok(vec![1.0; act_amax.len()]);
    }
    Ok(act_amax
        .iter()
        .zip(weight_amax)
        .map(|(&a, &w)| {
            let s = a.abs().max(SMOOTH_MIN).powf(alpha) / w.abs().max(SMOOTH_MIN).powf(1.0 - alpha);
            s.clamp(SMOOTH_MIN, 1.0 / SMOOTH_MIN)
        })
        .collect())
}

/// Row-wise abs-max over several row-major `[K, N_i]` weights that read the same input (`K` rows each).
pub fn weight_row_abs_max(weights: &[(&[f32], usize)], k: usize) -> Result<Vec<f32>> {
    let mut m = vec![0.0f32; k];
    for (i, (w, n)) in weights.iter().enumerate() {
        ensure_len(&format!("weight {i} [K={k}, N={n}]"), k * n, w.len())?;
        for (r, row) in w.chunks_exact((*n).max(1)).enumerate() {
            m[r] = row.iter().fold(m[r], |a, x| a.max(x.abs()));
        }
    }
    Ok(m)
}

/// Divides an RMSNorm weight by the factors: `γ_j /= s_j`.
pub fn fold_into_norm(gamma: &mut [f32], s: &[f32]) -> Result<()> {
    ensure_len("smoothing factors (one per norm channel)", gamma.len(), s.len())?;
    for (g, f) in gamma.iter_mut().zip(s) {
        *g /= f;
    }
    Ok(())
}

/// Multiplies row `j` of a row-major `[K, N]` weight by `s_j`.
pub fn scale_weight_rows(w: &mut [f32], k: usize, n: usize, s: &[f32]) -> Result<()> {
    ensure_len("weight [K, N]", k * n, w.len())?;
    ensure_len("smoothing factors (one per weight row)", k, s.len())?;
    for (row, f) in w.chunks_exact_mut(n.max(1)).zip(s) {
        row.iter_mut().for_each(|x| *x *= f);
    }
    Ok(())
}

/// Per-tensor abs-max of the smoothed activation, `max_j max|X_j| / s_j`, exact for the `max` method.
pub fn smoothed_amax(act_amax: &[f32], s: &[f32]) -> Result<f32> {
    ensure_len("smoothing factors", act_amax.len(), s.len())?;
    Ok(act_amax.iter().zip(s).fold(0.0f32, |m, (a, f)| m.max(a / f)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matmul(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..k {
                for c in 0..n {
                    y[i * n + c] += x[i * k + j] * w[j * n + c];
                }
            }
        }
        y
    }

    /// Reference RMSNorm over rows of `[m, k]`: `x / sqrt(mean(x^2) + eps) * gamma`.
    fn rmsnorm(x: &[f32], gamma: &[f32], k: usize) -> Vec<f32> {
        x.chunks_exact(k)
            .flat_map(|row| {
                let ms = row.iter().map(|v| v * v).sum::<f32>() / k as f32;
                let inv = 1.0 / (ms + 1e-6).sqrt();
                row.iter().zip(gamma).map(move |(v, g)| v * inv * g).collect::<Vec<_>>()
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + x.abs().max(y.abs())))
    }

    #[test]
    fn factors_follow_the_formula() {
        let s = smoothing_factors(&[16.0, 1.0], &[1.0, 4.0], 0.5).unwrap();
        assert_eq!(s, vec![4.0, 0.5]);
        assert_eq!(smoothing_factors(&[16.0, 1.0], &[1.0, 4.0], 0.0).unwrap(), vec![1.0, 1.0]);
        assert_eq!(smoothing_factors(&[16.0], &[2.0], 1.0).unwrap(), vec![16.0]);
        // dead channels are clamped, never zero or infinite
        let s = smoothing_factors(&[0.0, 1e9], &[0.0, 0.0], 0.5).unwrap();
        assert!(s.iter().all(|v| v.is_finite() && *v >= SMOOTH_MIN && *v <= 1.0 / SMOOTH_MIN), "{s:?}");
        let e = smoothing_factors(&[1.0], &[1.0], 1.5).unwrap_err().to_string();
        assert!(e.contains("alpha") && e.contains("1.5"), "{e}");
        assert!(smoothing_factors(&[1.0], &[1.0, 2.0], 0.5).is_err());
    }

    #[test]
    fn smoothing_flattens_outlier_channel() {
        // channel 0 carries a 100x activation outlier; after smoothing (alpha .5) its range shrinks 10x.
        let act = [100.0, 1.0, 1.0];
        let w = [1.0, 1.0, 1.0];
        let s = smoothing_factors(&act, &w, 0.5).unwrap();
        assert!((smoothed_amax(&act, &s).unwrap() - 10.0).abs() < 1e-4);
    }

    proptest! {
        #[test]
        fn smoothed_matmul_is_equivalent((m, k, n, x, w) in (1usize..5, 1usize..9, 1usize..6).prop_flat_map(|(m, k, n)|
                (Just(m), Just(k), Just(n), prop::collection::vec(-20f32..20.0, m * k), prop::collection::vec(-2f32..2.0, k * n))),
                alpha in 0f32..=1.0) {
            let mut act = vec![0.0f32; k];
            for row in x.chunks_exact(k) { for (a, v) in act.iter_mut().zip(row) { *a = a.max(v.abs()); } }
            let wmax = weight_row_abs_max(&[(&w, n)], k).unwrap();
            let s = smoothing_factors(&act, &wmax, alpha).unwrap();
            let xs: Vec<f32> = x.iter().enumerate().map(|(i, v)| v / s[i % k]).collect();
            let mut ws = w.clone();
            scale_weight_rows(&mut ws, k, n, &s).unwrap();
            prop_assert!(close(&matmul(&x, &w, m, k, n), &matmul(&xs, &ws, m, k, n), 1e-4));
            // smoothed per-tensor max computed from channel maxima equals the max of the smoothed tensor
            let direct = xs.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            prop_assert!((smoothed_amax(&act, &s).unwrap() - direct).abs() <= 1e-5 * direct.max(1.0));
        }

        #[test]
        fn folded_rmsnorm_matmul_is_equivalent((m, k, n, x, g, w1, w2) in (1usize..4, 2usize..9, 1usize..5).prop_flat_map(|(m, k, n)|
                (Just(m), Just(k), Just(n), prop::collection::vec(-5f32..5.0, m * k), prop::collection::vec(0.1f32..3.0, k),
                 prop::collection::vec(-1f32..1.0, k * n), prop::collection::vec(-1f32..1.0, k * (n + 1)))),
                alpha in 0.05f32..0.95) {
            // Two projections (like q and k) read the same normed input.
            let y = rmsnorm(&x, &g, k);
            let mut act = vec![0.0f32; k];
            for row in y.chunks_exact(k) { for (a, v) in act.iter_mut().zip(row) { *a = a.max(v.abs()); } }
            let wmax = weight_row_abs_max(&[(&w1, n), (&w2, n + 1)], k).unwrap();
            let s = smoothing_factors(&act, &wmax, alpha).unwrap();
            let (mut g2, mut w1s, mut w2s) = (g.clone(), w1.clone(), w2.clone());
            fold_into_norm(&mut g2, &s).unwrap();
            scale_weight_rows(&mut w1s, k, n, &s).unwrap();
            scale_weight_rows(&mut w2s, k, n + 1, &s).unwrap();
            let y2 = rmsnorm(&x, &g2, k);
            prop_assert!(close(&matmul(&y, &w1, m, k, n), &matmul(&y2, &w1s, m, k, n), 1e-4));
            prop_assert!(close(&matmul(&y, &w2, m, k, n + 1), &matmul(&y2, &w2s, m, k, n + 1), 1e-4));
        }
    }
}
