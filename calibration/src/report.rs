//! Quality metrics of a quantized model against its fp32 original, and `calibration/report.json`.
//!
//! - Per layer: SQNR in dB of the quantized MatMul output against fp32, `10·log10(Σ r² / Σ (r − q)²)`.
//! - End to end: mean `KL(p_fp32 || p_quant)` of next-token distributions and the fraction of positions whose
//!   argmax (top-1 token) agrees, over held-out text.
//! - Task accuracy rows (e.g. arith-r1) per precision.
use crate::error::{ensure_len, CalibError, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

/// SQNR in dB of `quantized` against `reference`. `None` when they are identical (infinite SQNR);
/// `Some(-inf)` is impossible: an all-zero reference with a non-zero error gives a very negative finite value.
pub fn sqnr_db(reference: &[f32], quantized: &[f32]) -> Result<Option<f64>> {
    ensure_len("quantized output (vs fp32 reference)", reference.len(), quantized.len())?;
    let signal: f64 = reference.iter().map(|&r| f64::from(r).powi(2)).sum();
    let noise: f64 = reference.iter().zip(quantized).map(|(&r, &q)| (f64::from(r) - f64::from(q)).powi(2)).sum();
    if noise == 0.0 {
        return Ok(None);
    }
    Ok(Some(10.0 * (signal.max(f64::MIN_POSITIVE) / noise).log10()))
}

/// Numerically stable log-softmax.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let lse = m + logits.iter().map(|&x| (f64::from(x) - m).exp()).sum::<f64>().ln();
    logits.iter().map(|&x| f64::from(x) - lse).collect()
}

/// `KL(softmax(p) || softmax(q))` in nats for one position's logits.
pub fn kl_from_logits(p: &[f32], q: &[f32]) -> Result<f64> {
    ensure_len("quantized logits (vs fp32 vocabulary)", p.len(), q.len())?;
    if p.is_empty() {
        return Err(CalibError::invalid("logits length", "at least 1", 0));
    }
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    Ok(lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>().max(0.0))
}

/// Index of the largest value (first on ties); 0 for an empty slice.
pub fn argmax(xs: &[f32]) -> usize {
    xs.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) }).0
}

/// Streaming accumulator of next-token agreement between fp32 and quantized logits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NextTokenStats {
    positions: u64,
    kl_sum: f64,
    top1_agree: u64,
}

impl NextTokenStats {
    /// Adds one position: fp32 logits and quantized logits over the same vocabulary.
    pub fn add(&mut self, fp32: &[f32], quant: &[f32]) -> Result<()> {
        self.kl_sum += kl_from_logits(fp32, quant)?;
        self.top1_agree += u64::from(argmax(fp32) == argmax(quant));
        self.positions += 1;
        Ok(())
    }

    /// Adds every position of row-major `[positions, vocab]` logits.
    pub fn add_rows(&mut self, fp32: &[f32], quant: &[f32], vocab: usize) -> Result<()> {
        ensure_len("quantized logits", fp32.len(), quant.len())?;
        if vocab == 0 || !fp32.len().is_multiple_of(vocab) {
            return Err(CalibError::invalid("vocab", format!("a non-zero divisor of {}", fp32.len()), vocab));
        }
        for (a, b) in fp32.chunks_exact(vocab).zip(quant.chunks_exact(vocab)) {
            self.add(a, b)?;
        }
        Ok(())
    }

    /// The summary (`None` before any position).
    pub fn summary(&self) -> Option<EndToEnd> {
        (self.positions > 0).then(|| EndToEnd {
            positions: self.positions,
            mean_kl: self.kl_sum / self.positions as f64,
            top1_agreement: self.top1_agree as f64 / self.positions as f64,
        })
    }
}

/// Streaming SQNR of one tensor over many batches (signal and noise power summed, so the result equals the SQNR
/// of all batches concatenated).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SqnrAccumulator {
    signal: f64,
    noise: f64,
}

impl SqnrAccumulator {
    /// Adds one batch of fp32 reference values and the quantized graph's values.
    pub fn add(&mut self, reference: &[f32], quantized: &[f32]) -> Result<()> {
        ensure_len("quantized output (vs fp32 reference)", reference.len(), quantized.len())?;
        for (&r, &q) in reference.iter().zip(quantized) {
            self.signal += f64::from(r).powi(2);
            self.noise += (f64::from(r) - f64::from(q)).powi(2);
        }
        Ok(())
    }

    /// SQNR in dB so far; `None` when no error was seen (bit-exact or nothing added).
    pub fn db(&self) -> Option<f64> {
        (self.noise > 0.0).then(|| 10.0 * (self.signal.max(f64::MIN_POSITIVE) / self.noise).log10())
    }
}

/// SQNR of one quantized MatMul.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// MatMul node name.
    pub name: String,
    /// SQNR in dB; `None` when the output was bit-exact.
    pub sqnr_db: Option<f64>,
}

/// End-to-end next-token agreement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndToEnd {
    /// Positions compared.
    pub positions: u64,
    /// Mean KL divergence (nats) of quantized from fp32 next-token distributions.
    pub mean_kl: f64,
    /// Fraction of positions with the same top-1 token.
    pub top1_agreement: f64,
}

/// Task accuracy of one precision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccuracyRow {
    /// `fp32`, `int8`, `int8-wo`, `int4-wo`.
    pub precision: String,
    /// Problems answered correctly.
    pub correct: u32,
    /// Problems attempted.
    pub total: u32,
}

impl AccuracyRow {
    /// Accuracy in percent (0 when nothing was attempted).
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * f64::from(self.correct) / f64::from(self.total)
        }
    }
}

/// Where the calibration and report tokens came from: the samples as given, or generated by the fp32 model as the
/// continuation of an open sample (a prompt without its reply; see [`crate::dataset`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSources {
    /// Tokens read from the file (prompts and complete samples).
    pub given: usize,
    /// Tokens the fp32 model generated (greedy) after open samples.
    pub generated: usize,
    /// Samples that were open (their reply was generated).
    pub open_samples: usize,
    /// The cap on generated tokens per sample (`--calibration-generate-tokens`; 0 = generation off).
    pub generate_tokens: usize,
}

/// `calibration/report.json` of an artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualityReport {
    /// Precision of the quantized graph.
    pub precision: String,
    /// Calibration method (`max`, `entropy`, ...); `None` for weight-only schemes.
    pub method: Option<String>,
    /// SmoothQuant alpha (0 = off).
    pub smoothquant_alpha: f32,
    /// Calibration samples used.
    pub samples: usize,
    /// Where the calibration samples' tokens came from (absent in reports written before self-generation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenSources>,
    /// MatMuls kept in float by name (`--keep-float`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept_float: Vec<String>,
    /// Weights the rewrite left float for their shape (`RewriteSummary::left_float`: 3-D expert stacks and MLA's
    /// absorbed projections), with `*` for the layer index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_float: Vec<String>,
    /// Per-layer SQNR.
    pub layers: Vec<LayerReport>,
    /// End-to-end agreement on held-out text.
    pub end_to_end: Option<EndToEnd>,
    /// Task accuracy per precision.
    pub accuracy: Vec<AccuracyRow>,
}

impl QualityReport {
    /// Pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|source| CalibError::Json { what: "quality report".into(), source })
    }

    /// Parses a report.
    pub fn from_json(s: &str) -> Result<Self> {
        serde_json::from_str(s).map_err(|source| CalibError::Json { what: "quality report".into(), source })
    }

    /// Writes `report.json` to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json()?).map_err(|source| CalibError::Io {
            op: "writing",
            path: path.into(),
            source,
        })
    }

    /// Lowest per-layer SQNR (the layer to look at first).
    pub fn worst_layer(&self) -> Option<&LayerReport> {
        self.layers
            .iter()
            .filter(|l| l.sqnr_db.is_some())
            .min_by(|a, b| a.sqnr_db.partial_cmp(&b.sqnr_db).unwrap_or(std::cmp::Ordering::Equal))
    }

    /// The human-readable table printed at the end of an export.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let method = self.method.as_deref().unwrap_or("-");
        let _ = writeln!(
            s,
            "quantization: {}  method: {}  smoothquant alpha: {}  samples: {}",
            self.precision, method, self.smoothquant_alpha, self.samples
        );
        if let Some(t) = &self.tokens {
            let _ = writeln!(
                s,
                "calibration tokens: {} given, {} generated by the fp32 model after {} open samples (up to {} each)",
                t.given, t.generated, t.open_samples, t.generate_tokens
            );
        }
        if !self.kept_float.is_empty() {
            let _ = writeln!(s, "kept float: {}", self.kept_float.join(", "));
        }
        if !self.left_float.is_empty() {
            let _ = writeln!(
                s,
                "left float in model.onnx (3-D weights; the quantization covers 2-D MatMul weights, and `--target cpu` \
                 quantizes the routed experts into com.microsoft.QMoE): {}",
                self.left_float.join(", ")
            );
        }
        let db = |v: Option<f64>| v.map_or("exact".to_string(), |v| format!("{v:.1} dB"));
        if !self.layers.is_empty() {
            let mean = self.layers.iter().filter_map(|l| l.sqnr_db).sum::<f64>()
                / self.layers.iter().filter(|l| l.sqnr_db.is_some()).count().max(1) as f64;
            let worst = self.worst_layer();
            let _ = writeln!(
                s,
                "layers: {}  mean SQNR: {mean:.1} dB  worst: {} ({})",
                self.layers.len(),
                worst.map_or("-", |l| l.name.as_str()),
                db(worst.and_then(|l| l.sqnr_db))
            );
        }
        if let Some(e) = &self.end_to_end {
            let _ = writeln!(
                s,
                "next token: {} positions  mean KL {:.5} nats  top-1 agreement {:.2}%",
                e.positions,
                e.mean_kl,
                100.0 * e.top1_agreement
            );
        }
        if !self.accuracy.is_empty() {
            let _ = writeln!(s, "{:<10} {:>8} {:>8} {:>9}", "precision", "correct", "total", "accuracy");
            for r in &self.accuracy {
                let _ = writeln!(s, "{:<10} {:>8} {:>8} {:>8.1}%", r.precision, r.correct, r.total, r.percent());
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sqnr_known_values() {
        // noise power 1% of signal -> 20 dB
        let r = [10.0f32, 0.0];
        let q = [9.0f32, 0.0];
        assert!((sqnr_db(&r, &q).unwrap().unwrap() - 20.0).abs() < 1e-9);
        assert_eq!(sqnr_db(&r, &r).unwrap(), None);
        assert!(sqnr_db(&r, &[1.0]).unwrap_err().to_string().contains("expected 2"));
    }

    #[test]
    fn sqnr_accumulates_like_concatenation() {
        let (r1, q1) = ([1.0f32, -2.0, 3.0], [1.1f32, -2.0, 2.8]);
        let (r2, q2) = ([0.5f32, 4.0], [0.5f32, 4.3]);
        let mut acc = SqnrAccumulator::default();
        assert_eq!(acc.db(), None);
        acc.add(&r1, &q1).unwrap();
        acc.add(&r2, &q2).unwrap();
        let whole = sqnr_db(&[r1.as_slice(), &r2].concat(), &[q1.as_slice(), &q2].concat()).unwrap().unwrap();
        assert!((acc.db().unwrap() - whole).abs() < 1e-9);
        assert!(acc.add(&r1, &q2).is_err());
    }

    #[test]
    fn kl_and_top1() {
        assert!(kl_from_logits(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]).unwrap() < 1e-12);
        // shift invariance
        assert!(kl_from_logits(&[1.0, 2.0, 3.0], &[11.0, 12.0, 13.0]).unwrap() < 1e-12);
        // two-way: p = (0.5, 0.5), q = softmax(0, ln 3) = (0.25, 0.75): KL = .5 ln 2 + .5 ln(2/3)
        let want = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((kl_from_logits(&[0.0, 0.0], &[0.0, 3f32.ln()]).unwrap() - want).abs() < 1e-6);
        let mut s = NextTokenStats::default();
        s.add_rows(&[0.0, 1.0, 5.0, 0.0], &[0.0, 2.0, 0.0, 5.0], 2).unwrap();
        let e = s.summary().unwrap();
        assert_eq!(e.positions, 2);
        assert_eq!(e.top1_agreement, 0.5);
        assert!(s.add_rows(&[0.0; 3], &[0.0; 3], 2).is_err());
    }

    #[test]
    fn report_json_and_table() {
        let r = QualityReport {
            precision: "int8".into(),
            method: Some("entropy".into()),
            smoothquant_alpha: 0.5,
            samples: 64,
            tokens: Some(TokenSources { given: 900, generated: 2100, open_samples: 64, generate_tokens: 256 }),
            kept_float: vec!["l0.down".into()],
            left_float: vec!["model.layers.*.mlp.experts.gate_proj (×3)".into()],
            layers: vec![
                LayerReport { name: "l0.q".into(), sqnr_db: Some(35.0) },
                LayerReport { name: "l0.down".into(), sqnr_db: Some(21.5) },
                LayerReport { name: "l1.q".into(), sqnr_db: None },
            ],
            end_to_end: Some(EndToEnd { positions: 100, mean_kl: 0.01, top1_agreement: 0.97 }),
            accuracy: vec![AccuracyRow { precision: "fp32".into(), correct: 45, total: 50 }],
        };
        let back = QualityReport::from_json(&r.to_json().unwrap()).unwrap();
        assert_eq!(back, r);
        let t = r.table();
        assert!(t.contains("worst: l0.down (21.5 dB)"), "{t}");
        assert!(t.contains("top-1 agreement 97.00%"), "{t}");
        assert!(t.contains("fp32") && t.contains("90.0%"), "{t}");
        assert!(t.contains("900 given, 2100 generated by the fp32 model after 64 open samples"), "{t}");
        assert!(t.contains("kept float: l0.down"), "{t}");
        assert!(t.contains("QMoE): model.layers.*.mlp.experts.gate_proj (×3)"), "{t}");
        // Reports written before these fields read back without them.
        let old = r#"{"precision":"int8","method":null,"smoothquant_alpha":0.0,"samples":1,"layers":[],"end_to_end":null,"accuracy":[]}"#;
        assert_eq!(QualityReport::from_json(old).unwrap().tokens, None);
        let v: serde_json::Value = serde_json::from_str(&r.to_json().unwrap()).unwrap();
        assert_eq!(v["layers"][2]["sqnr_db"], serde_json::Value::Null);
        assert_eq!(v["end_to_end"]["top1_agreement"], 0.97);
    }

    proptest! {
        #[test]
        fn kl_is_non_negative(p in prop::collection::vec(-10f32..10.0, 1..20), d in prop::collection::vec(-1f32..1.0, 20)) {
            let q: Vec<f32> = p.iter().zip(&d).map(|(a, b)| a + b).collect();
            prop_assert!(kl_from_logits(&p, &q).unwrap() >= 0.0);
        }

        #[test]
        fn sqnr_grows_as_noise_shrinks(r in prop::collection::vec(1f32..10.0, 1..50), e in 0.01f32..1.0) {
            let q1: Vec<f32> = r.iter().map(|x| x + e).collect();
            let q2: Vec<f32> = r.iter().map(|x| x + e / 10.0).collect();
            let (a, b) = (sqnr_db(&r, &q1).unwrap().unwrap(), sqnr_db(&r, &q2).unwrap().unwrap());
            prop_assert!((b - a - 20.0).abs() < 0.5, "{} vs {}", a, b);
        }
    }
}
