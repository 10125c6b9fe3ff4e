//! Choosing the next token and deciding when a sequence is done.
//!
//! * [`SamplingParams`] + [`Sampler`]: greedy when `temperature == 0`, otherwise repetition penalty →
//!   temperature → top-k → top-p → min-p (the order of HF's logits processors and vLLM), then one draw from the
//!   sequence's own ChaCha8 stream seeded by `seed`, so a sequence's tokens do not depend on which other sequences
//!   share its batch or in which order they are sampled.
//! * Presence and frequency penalties (OpenAI's) count the tokens the sampler itself drew, after the repetition
//!   penalty (vLLM's order); [`logprobs`] gives a row's log-probabilities for the API's `logprobs`.
//! * [`StopParams`] + [`StopChecker`]: EOS ids, `ignore_eos`, max tokens, and stop sequences matched on the
//!   detokenized text with hold-back, so a partial stop sequence is never streamed. [`FinishReason`] says why.

pub mod grammar;
pub mod limits;
mod logprobs;
mod sampler;
mod stop;

pub use logprobs::{logprobs, TokenLogprobs};
pub use sampler::{Candidate, Sampler};
pub use stop::{FinishReason, StopChecker, StopOutcome};

use crate::text::GenerationConfig;

pub use limits::{MAX_STOP_SEQUENCES, MAX_STOP_SEQUENCE_BYTES};

/// Errors of sampling and stop handling. [`SamplingError::kind`] is a stable label.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// A parameter is outside its allowed range.
    #[error("`{field}` must be {allowed}, got {value}")]
    InvalidParam {
        /// The parameter's name as the API spells it.
        field: &'static str,
        /// The allowed range, in words.
        allowed: String,
        /// The value given.
        value: String,
    },
    /// The logits row is empty.
    #[error("logits row is empty; expected one value per vocabulary entry")]
    EmptyLogits,
    /// The logits row holds NaN or +inf (the model produced garbage), or every entry is -inf.
    #[error("logits row of {len} entries is unusable: {problem}")]
    BadLogits {
        /// Row length.
        len: usize,
        /// What is wrong, naming the first bad index.
        problem: String,
    },
}

impl SamplingError {
    /// Stable, low-cardinality label for metrics and status-code mapping.
    pub fn kind(&self) -> &'static str {
        match self {
            SamplingError::InvalidParam { .. } => "invalid_param",
            SamplingError::EmptyLogits => "empty_logits",
            SamplingError::BadLogits { .. } => "bad_logits",
        }
    }
}

/// How to pick the next token. `Default` is plain sampling at temperature 1 with every filter off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it. Allowed: [`limits::TEMPERATURE`].
    pub temperature: f32,
    /// Nucleus: keep the fewest most likely tokens whose probability sums to at least `top_p`. 1 = off.
    /// Allowed: (0.0, 1.0].
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (ties at the boundary kept). 0 = off.
    pub top_k: u32,
    /// Drop tokens less likely than `min_p` × the most likely one's probability. 0 = off. Allowed: 0.0..=1.0.
    pub min_p: f32,
    /// HF/CTRL repetition penalty on every token already in the context: positive logits are divided by it,
    /// negative ones multiplied. 1 = off. Allowed: [`limits::REPETITION_PENALTY`].
    pub repetition_penalty: f32,
    /// Seed of the sequence's random stream; `None` draws one from the OS (see [`Sampler::seed`]).
    pub seed: Option<u64>,
    /// OpenAI's presence penalty: subtracted once from the logit of every token the sequence has generated so far
    /// (the prompt does not count, as in vLLM). 0 = off. Allowed: [`limits::PRESENCE_FREQUENCY_PENALTY`].
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty: subtracted from a token's logit once per time the sequence has generated it.
    /// 0 = off. Allowed: [`limits::PRESENCE_FREQUENCY_PENALTY`].
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Default::default() }
    }

    /// The checkpoint's defaults from `generation_config.json` (`do_sample: false` means greedy); fields it
    /// does not set keep [`SamplingParams::default`].
    pub fn from_generation_config(cfg: &GenerationConfig) -> Self {
        let d = SamplingParams::default();
        let mut p = SamplingParams {
            temperature: cfg.temperature.unwrap_or(d.temperature),
            top_p: cfg.top_p.unwrap_or(d.top_p),
            top_k: cfg.top_k.unwrap_or(d.top_k),
            min_p: cfg.min_p.unwrap_or(d.min_p),
            repetition_penalty: cfg.repetition_penalty.unwrap_or(d.repetition_penalty),
            ..d
        };
        if cfg.do_sample == Some(false) {
            p.temperature = 0.0;
        }
        p
    }

    /// True when this is argmax decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every field; the error names the field, the allowed range and the value.
    pub fn validate(&self) -> Result<(), SamplingError> {
        for (field, range, value) in [
            ("temperature", limits::TEMPERATURE, self.temperature),
            ("top_p", limits::TOP_P, self.top_p),
            ("min_p", limits::MIN_P, self.min_p),
            ("repetition_penalty", limits::REPETITION_PENALTY, self.repetition_penalty),
            ("presence_penalty", limits::PRESENCE_FREQUENCY_PENALTY, self.presence_penalty),
            ("frequency_penalty", limits::PRESENCE_FREQUENCY_PENALTY, self.frequency_penalty),
        ] {
            if !range.contains(value) {
                return Err(SamplingError::InvalidParam {
                    field,
                    allowed: format!("in {range}"),
                    value: value.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// When a sequence ends, besides [`FinishReason::Cancelled`] which the caller decides (a failed step is an error, not a
/// finish reason).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopParams {
    /// Most tokens to generate. Allowed: at least 1.
    pub max_tokens: u32,
    /// Stop sequences; the text before the first match is returned, the match and anything after are not.
    pub stop: Vec<String>,
    /// Ids that end generation (the tokenizer's EOS ids, from both configs).
    pub eos_token_ids: Vec<u32>,
    /// Keep generating through EOS ids (benchmarks); `max_tokens` still applies.
    pub ignore_eos: bool,
}

impl StopParams {
    /// Checks every field; the error names the field, the allowed range and the value.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if self.max_tokens == 0 {
            return Err(SamplingError::InvalidParam {
                field: "max_tokens",
                allowed: "at least 1".into(),
                value: self.max_tokens.to_string(),
            });
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return Err(SamplingError::InvalidParam {
                field: "stop",
                allowed: format!("at most {MAX_STOP_SEQUENCES} sequences"),
                value: format!("{} sequences", self.stop.len()),
            });
        }
        for (i, s) in self.stop.iter().enumerate() {
            if s.is_empty() || s.len() > MAX_STOP_SEQUENCE_BYTES {
                return Err(SamplingError::InvalidParam {
                    field: "stop[]",
                    allowed: format!("a string of 1 to {MAX_STOP_SEQUENCE_BYTES} bytes"),
                    value: format!("stop[{i}] of {} bytes", s.len()),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_field_range_value() {
        let cases = [
            (SamplingParams { temperature: -0.5, ..Default::default() }, "`temperature`", "-0.5"),
            (SamplingParams { temperature: f32::NAN, ..Default::default() }, "`temperature`", "NaN"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "`top_p`", "got 0"),
            (SamplingParams { top_p: 1.5, ..Default::default() }, "`top_p`", "1.5"),
            (SamplingParams { min_p: 2.0, ..Default::default() }, "`min_p`", "got 2"),
            (SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "`repetition_penalty`", "got 0"),
        ];
        for (p, field, value) in cases {
            let msg = p.validate().unwrap_err().to_string();
            assert!(msg.contains(field) && msg.contains(value) && msg.contains("must be"), "{msg}");
        }
        assert!(SamplingParams::default().validate().is_ok());
        assert!(SamplingParams::greedy().validate().is_ok());
    }

    #[test]
    fn stop_params_validation() {
        let ok = StopParams { max_tokens: 1, stop: vec!["\n\n".into()], ..Default::default() };
        assert!(ok.validate().is_ok());
        let e = StopParams { max_tokens: 0, ..Default::default() }.validate().unwrap_err().to_string();
        assert_eq!(e, "`max_tokens` must be at least 1, got 0");
        let e = StopParams { max_tokens: 5, stop: vec!["a".into(), String::new()], ..Default::default() }
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("stop[1] of 0 bytes"), "{e}");
    }

    #[test]
    fn generation_config_defaults() {
        let cfg = GenerationConfig { temperature: Some(0.6), top_p: Some(0.95), ..Default::default() };
        let p = SamplingParams::from_generation_config(&cfg);
        assert_eq!((p.temperature, p.top_p, p.top_k), (0.6, 0.95, 0));
        let greedy = GenerationConfig { do_sample: Some(false), temperature: Some(0.6), ..Default::default() };
        assert!(SamplingParams::from_generation_config(&greedy).is_greedy());
    }
}
