//! The allowed range of every sampling and stop parameter, in one place: the engine validates against these, and
//! the server's request validation reads the same constants (it only adds the API's field names).

use std::fmt;

/// An interval of allowed values; NaN and infinities are never inside.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FloatRange {
    /// Lower bound.
    pub lo: f32,
    /// Whether `lo` itself is allowed.
    pub lo_inclusive: bool,
    /// Upper bound.
    pub hi: f32,
    /// Whether `hi` itself is allowed.
    pub hi_inclusive: bool,
}

impl FloatRange {
    /// Whether `v` is allowed.
    pub fn contains(&self, v: f32) -> bool {
        v.is_finite()
            && (if self.lo_inclusive { v >= self.lo } else { v > self.lo })
            && (if self.hi_inclusive { v <= self.hi } else { v < self.hi })
    }
}

impl fmt::Display for FloatRange {
    /// Interval notation: `[0, 2]`, `(0, 1]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (l, r) = (if self.lo_inclusive { "[" } else { "(" }, if self.hi_inclusive { "]" } else { ")" });
        write!(f, "{l}{}, {}{r}", self.lo, self.hi)
    }
}

/// `temperature`: 0 is greedy; OpenAI's range.
pub const TEMPERATURE: FloatRange = FloatRange { lo: 0.0, lo_inclusive: true, hi: 2.0, hi_inclusive: true };
/// `top_p`: the nucleus keeps at least one token.
pub const TOP_P: FloatRange = FloatRange { lo: 0.0, lo_inclusive: false, hi: 1.0, hi_inclusive: true };
/// `min_p`: relative to the best token's probability; 1 would keep only ties with it.
pub const MIN_P: FloatRange = FloatRange { lo: 0.0, lo_inclusive: true, hi: 1.0, hi_inclusive: false };
/// `repetition_penalty`: 1 is off.
pub const REPETITION_PENALTY: FloatRange = FloatRange { lo: 0.0, lo_inclusive: false, hi: 2.0, hi_inclusive: true };
/// `presence_penalty` and `frequency_penalty`: OpenAI's range; 0 is off.
pub const PRESENCE_FREQUENCY_PENALTY: FloatRange =
    FloatRange { lo: -2.0, lo_inclusive: true, hi: 2.0, hi_inclusive: true };
/// Most alternatives `top_logprobs` may ask for per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Most stop sequences one request may give.
pub const MAX_STOP_SEQUENCES: usize = 8;
/// Longest stop sequence, in bytes.
pub const MAX_STOP_SEQUENCE_BYTES: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_include_and_exclude_their_bounds_as_written() {
        assert!(TEMPERATURE.contains(0.0) && TEMPERATURE.contains(2.0) && !TEMPERATURE.contains(2.01));
        assert!(!TOP_P.contains(0.0) && TOP_P.contains(1.0));
        assert!(MIN_P.contains(0.0) && !MIN_P.contains(1.0));
        assert!(!REPETITION_PENALTY.contains(0.0) && REPETITION_PENALTY.contains(2.0));
        for r in [TEMPERATURE, TOP_P, MIN_P, REPETITION_PENALTY] {
            assert!(!r.contains(f32::NAN) && !r.contains(f32::INFINITY), "{r}");
        }
        assert_eq!(
            (TEMPERATURE.to_string(), TOP_P.to_string(), MIN_P.to_string()),
            ("[0, 2]".into(), "(0, 1]".into(), "[0, 1)".into())
        );
    }
}
