//! Streaming split of a DeepSeek-R1 reply into reasoning (`<think>…</think>`) and answer.
//!
//! R1 writes `<think>\n{reasoning}\n</think>\n\n{answer}`; R1-0528-style templates put `<think>\n` into the prompt,
//! so the output starts inside the reasoning. The rule, applied to the detokenized text:
//!
//! 1. **Opening.** If the prompt opened the reasoning ([`ReasoningSplitter::new`] with `true`), the output starts
//!    in reasoning, and a `<think>` the model writes anyway at the very start is dropped. Otherwise, if the output
//!    starts with `<think>` (leading whitespace allowed and dropped), that tag opens the reasoning; if it does not,
//!    there is no reasoning and everything is answer.
//! 2. **One `\n` after the opening tag** (or at the start of output that begins inside the reasoning) is dropped.
//! 3. **One `\n` right before `</think>`** is dropped.
//! 4. **Up to two `\n` right after `</think>`** are dropped (R1 writes `</think>\n\n`).
//! 5. Only the first `</think>` closes the reasoning; later tags, and a `<think>` anywhere but the start, are text.
//!    Everything else is passed through byte for byte. Output that ends inside the reasoning (max tokens) is all
//!    reasoning.
//!
//! This matches what DeepSeek's API returns as `reasoning_content` and `content` for the same completion.
//! A tag split across deltas is held back until it is complete or ruled out, so no partial tag is ever emitted.

/// Tag that opens the reasoning.
pub const THINK_START: &str = "<think>";
/// Tag that closes the reasoning.
pub const THINK_END: &str = "</think>";

/// Text produced by one step of the splitter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReasoningDelta {
    /// New reasoning text.
    pub reasoning: String,
    /// New answer text.
    pub content: String,
}

impl ReasoningDelta {
    /// True when the step produced no text.
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing decided yet: the output may open with `<think>`.
    Start,
    /// Inside the reasoning. `fresh`: nothing emitted yet (rule 2 pending); `redundant_open`: a leading `<think>`
    /// is dropped (rule 1, prompt-opened case).
    Reasoning { fresh: bool, redundant_open: bool },
    /// In the answer, `strip` newlines still to drop (rule 4).
    Content { strip: u8 },
}

/// Per-sequence streaming state machine; feed it detokenized deltas.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    phase: Phase,
    pending: String,
}

impl ReasoningSplitter {
    /// `prompt_opened_reasoning`: the rendered prompt already ends with `<think>` (see
    /// [`crate::text::prompt_opens_reasoning`]).
    pub fn new(prompt_opened_reasoning: bool) -> Self {
        let phase =
            if prompt_opened_reasoning { Phase::Reasoning { fresh: true, redundant_open: true } } else { Phase::Start };
        ReasoningSplitter { phase, pending: String::new() }
    }

    /// True until the output has shown whether it opens a reasoning part (nothing decided yet).
    pub fn is_undecided(&self) -> bool {
        matches!(self.phase, Phase::Start)
    }

    /// True while the text being produced is reasoning.
    pub fn in_reasoning(&self) -> bool {
        matches!(self.phase, Phase::Reasoning { .. })
    }

    /// Feeds one text delta and returns what can be emitted now.
    pub fn push(&mut self, delta: &str) -> ReasoningDelta {
        self.pending.push_str(delta);
        let mut out = ReasoningDelta::default();
        while self.step(&mut out) {}
        out
    }

    /// Ends the stream: everything held back is emitted in the current phase.
    pub fn finish(&mut self) -> ReasoningDelta {
        let mut out = ReasoningDelta::default();
        let rest = std::mem::take(&mut self.pending);
        match self.phase {
            Phase::Reasoning { .. } => out.reasoning = rest,
            Phase::Start | Phase::Content { .. } => out.content = rest,
        }
        self.phase = Phase::Content { strip: 0 };
        out
    }

    /// One transition; returns true when it made progress and another step may.
    fn step(&mut self, out: &mut ReasoningDelta) -> bool {
        match self.phase {
            Phase::Start => {
                let trimmed = self.pending.trim_start();
                if let Some(rest) = trimmed.strip_prefix(THINK_START) {
                    self.pending = rest.to_string();
                    self.phase = Phase::Reasoning { fresh: true, redundant_open: false };
                    true
                } else if THINK_START.starts_with(trimmed) {
                    false // empty or a partial tag: wait
                } else {
                    self.phase = Phase::Content { strip: 0 };
                    true
                }
            }
            Phase::Reasoning { fresh, redundant_open } => {
                if redundant_open {
                    if let Some(rest) = self.pending.strip_prefix(THINK_START) {
                        self.pending = rest.to_string();
                        self.phase = Phase::Reasoning { fresh: true, redundant_open: false };
                        return true;
                    }
                    if THINK_START.starts_with(self.pending.as_str()) {
                        return false;
                    }
                    self.phase = Phase::Reasoning { fresh, redundant_open: false };
                    return true;
                }
                if fresh {
                    if self.pending.is_empty() {
                        return false;
                    }
                    if self.pending.starts_with('\n') {
                        self.pending.remove(0);
                    }
                    self.phase = Phase::Reasoning { fresh: false, redundant_open: false };
                    return true;
                }
                if let Some(pos) = self.pending.find(THINK_END) {
                    let mut reasoning: String = self.pending[..pos].to_string();
                    if reasoning.ends_with('\n') {
                        reasoning.pop();
                    }
                    out.reasoning.push_str(&reasoning);
                    self.pending.drain(..pos + THINK_END.len());
                    self.phase = Phase::Content { strip: 2 };
                    return true;
                }
                let hold = held_suffix(&self.pending, &["\n</think>", THINK_END]);
                let emit = self.pending.len() - hold;
                out.reasoning.push_str(&self.pending[..emit]);
                self.pending.drain(..emit);
                false
            }
            Phase::Content { strip } => {
                let mut strip = strip;
                while strip > 0 && self.pending.starts_with('\n') {
                    self.pending.remove(0);
                    strip -= 1;
                }
                if strip > 0 && self.pending.is_empty() {
                    self.phase = Phase::Content { strip };
                    return false;
                }
                self.phase = Phase::Content { strip: 0 };
                out.content.push_str(&self.pending);
                self.pending.clear();
                false
            }
        }
    }
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of one of `patterns`.
fn held_suffix(text: &str, patterns: &[&str]) -> usize {
    let mut best = 0;
    for pat in patterns {
        let max = pat.len().saturating_sub(1).min(text.len());
        for len in (best + 1..=max).rev() {
            let start = text.len() - len;
            if text.is_char_boundary(start) && pat.starts_with(&text[start..]) {
                best = len;
                break;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(prompt_opened: bool, text: &str) -> (String, String) {
        let mut s = ReasoningSplitter::new(prompt_opened);
        let a = s.push(text);
        let b = s.finish();
        (a.reasoning + &b.reasoning, a.content + &b.content)
    }

    #[test]
    fn r1_shape() {
        let r = whole(false, "<think>\nLet me add.\n2+2=4\n</think>\n\nThe answer is 4.");
        assert_eq!(r, ("Let me add.\n2+2=4".to_string(), "The answer is 4.".to_string()));
    }

    #[test]
    fn prompt_opened() {
        let r = whole(true, "Hmm.\n\nOk.\n</think>\n\n4");
        assert_eq!(r, ("Hmm.\n\nOk.".to_string(), "4".to_string()));
        let r = whole(true, "<think>\nHmm.\n</think>\n\n4");
        assert_eq!(r, ("Hmm.".to_string(), "4".to_string()));
    }

    #[test]
    fn no_reasoning_and_unclosed() {
        assert_eq!(whole(false, "Just an answer <think> here"), (String::new(), "Just an answer <think> here".into()));
        assert_eq!(whole(false, "<thin"), (String::new(), "<thin".into()));
        assert_eq!(whole(false, "<think>\nstill thinking\n"), ("still thinking\n".into(), String::new()));
        assert_eq!(whole(false, "  <think>x</think>y</think>"), ("x".into(), "y</think>".into()));
    }

    #[test]
    fn only_single_newlines_stripped() {
        let r = whole(false, "<think>\n\nA\n\n</think>\n\n\nB\n");
        assert_eq!(r, ("\nA\n".to_string(), "\nB\n".to_string()));
    }

    #[test]
    fn held_suffix_examples() {
        assert_eq!(held_suffix("abc\n</th", &["\n</think>", "</think>"]), 5);
        assert_eq!(held_suffix("abc</", &["\n</think>", "</think>"]), 2);
        assert_eq!(held_suffix("abc", &["\n</think>", "</think>"]), 0);
        assert_eq!(held_suffix("é", &["\n</think>"]), 0);
    }
}
