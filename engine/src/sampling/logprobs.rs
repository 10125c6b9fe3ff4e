//! Log-probabilities of a logits row, for the APIs' `logprobs` / `top_logprobs`: the model's own distribution
//! (log-softmax of the raw logits, before penalties, temperature and filters), as vLLM reports by default. One pass
//! for the maximum, one for the normalizer (in f64), and a bounded selection of the `top` most likely tokens.

use super::SamplingError;

/// The log-probability of the chosen token and of the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// `ln p(chosen)`.
    pub logprob: f32,
    /// The `top` most likely tokens with their log-probabilities, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// Log-probabilities of `chosen` and of the `top` most likely tokens of `row`. The row is checked as the sampler
/// checks it (no NaN, no +inf, not all -inf).
pub fn logprobs(row: &[f32], chosen: u32, top: usize) -> Result<TokenLogprobs, SamplingError> {
    let bad = |problem: String| SamplingError::BadLogits { len: row.len(), problem };
    if row.is_empty() {
        return Err(SamplingError::EmptyLogits);
    }
    let mut max = f32::NEG_INFINITY;
    for (i, &l) in row.iter().enumerate() {
        if l.is_nan() || l == f32::INFINITY {
            return Err(bad(format!("{l} at index {i}")));
        }
        max = max.max(l);
    }
    if max == f32::NEG_INFINITY {
        return Err(bad("every entry is -inf".into()));
    }
    let z: f64 = row.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_z = f64::from(max) + z.ln();
    let lp = |l: f32| (f64::from(l) - log_z) as f32;
    let Some(&c) = row.get(chosen as usize) else {
        return Err(bad(format!("chosen token {chosen} is outside the row")));
    };
    // Bounded selection: keep the best `top` (logit, id) pairs, sorted descending (ties by id).
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in row.iter().enumerate() {
            if best.len() == top && l <= best[top - 1].0 {
                continue;
            }
            let at = best.partition_point(|&(b, _)| b >= l);
            best.insert(at, (l, i as u32));
            best.truncate(top);
        }
    }
    Ok(TokenLogprobs { logprob: lp(c), top: best.into_iter().map(|(l, id)| (id, lp(l))).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_of_the_raw_row_and_the_top_tokens_in_order() {
        let row = [1.0f32, 3.0, 2.0, 3.0, f32::NEG_INFINITY];
        let z: f64 = row.iter().map(|&l| f64::from(l).exp()).sum();
        let got = logprobs(&row, 2, 3).unwrap();
        assert!((f64::from(got.logprob) - (2.0 - z.ln())).abs() < 1e-6, "{got:?}");
        assert_eq!(got.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2], "descending, ties by id");
        assert!((f64::from(got.top[0].1) - (3.0 - z.ln())).abs() < 1e-6);
        let probs: f64 = row.iter().map(|&l| (f64::from(l) - z.ln()).exp()).sum();
        assert!((probs - 1.0).abs() < 1e-12);
        assert_eq!(logprobs(&row, 4, 0).unwrap().logprob, f32::NEG_INFINITY);
        assert!(logprobs(&row, 0, 0).unwrap().top.is_empty());
        assert_eq!(logprobs(&row, 0, 10).unwrap().top.len(), 5, "at most the row's length");
    }

    #[test]
    fn bad_rows_and_tokens_are_errors_naming_them() {
        assert!(matches!(logprobs(&[], 0, 1), Err(SamplingError::EmptyLogits)));
        let e = logprobs(&[0.0, f32::NAN], 0, 1).unwrap_err().to_string();
        assert!(e.contains("index 1"), "{e}");
        let e = logprobs(&[0.0, 1.0], 7, 1).unwrap_err().to_string();
        assert!(e.contains("chosen token 7"), "{e}");
    }
}
