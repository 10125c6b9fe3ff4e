//! When to stop: EOS ids, max tokens, stop sequences on the detokenized text.
//!
//! Stop sequences are matched on text, not ids (the same string has many tokenizations). Text that could still
//! become the start of a stop sequence is held back: after each delta the longest suffix of the pending text that
//! is a proper prefix of some stop sequence stays pending and the rest is released. A match therefore always lies
//! inside the pending text, and nothing of a stop sequence is ever streamed.

use super::StopParams;

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// The model produced an EOS id.
    Stop,
    /// `max_tokens` reached (or the context is full).
    Length,
    /// A stop sequence matched.
    StopSequence,
    /// Cancelled by the caller (client gone, server shutting down past its drain timeout).
    Cancelled,
}

impl FinishReason {
    /// Stable label (`stop`, `length`, `stop_sequence`, `cancelled`) for logs, spans and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::StopSequence => "stop_sequence",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one token released.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text safe to stream now.
    pub text: String,
    /// Set when the sequence is finished; no more tokens should be pushed.
    pub finish: Option<FinishReason>,
}

/// Per-sequence stop state.
#[derive(Debug, Clone)]
pub struct StopChecker {
    params: StopParams,
    generated: u32,
    pending: String,
    finished: Option<FinishReason>,
    matched: Option<usize>,
}

impl StopChecker {
    /// A checker for validated `params` (see [`StopParams::validate`]).
    pub fn new(params: StopParams) -> Self {
        StopChecker { params, generated: 0, pending: String::new(), finished: None, matched: None }
    }

    /// Tokens counted so far.
    pub fn generated(&self) -> u32 {
        self.generated
    }

    /// Why it finished, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finished
    }

    /// The stop sequence that matched, when the reason is [`FinishReason::StopSequence`].
    pub fn matched_stop(&self) -> Option<&str> {
        self.matched.and_then(|i| self.params.stop.get(i)).map(String::as_str)
    }

    /// Counts token `id` whose detokenized text is `delta` and decides. Order: EOS (unless `ignore_eos`), then
    /// stop sequences in the new text, then `max_tokens`. Pushing after the end returns nothing.
    pub fn push(&mut self, id: u32, delta: &str) -> StopOutcome {
        if self.finished.is_some() {
            return StopOutcome::default();
        }
        self.generated += 1;
        if !self.params.ignore_eos && self.params.eos_token_ids.contains(&id) {
            return self.end(FinishReason::Stop);
        }
        self.pending.push_str(delta);
        if let Some((pos, which)) = self.first_match() {
            self.pending.truncate(pos);
            self.matched = Some(which);
            return self.end(FinishReason::StopSequence);
        }
        if self.generated >= self.params.max_tokens {
            return self.end(FinishReason::Length);
        }
        let hold = self.hold_back();
        let release = self.pending.len() - hold;
        let text: String = self.pending.drain(..release).collect();
        StopOutcome { text, finish: None }
    }

    /// Adds text that arrives without a token (the detokenizer's final flush) and checks stop sequences in it.
    pub fn push_text(&mut self, delta: &str) -> StopOutcome {
        if self.finished.is_some() {
            return StopOutcome::default();
        }
        self.pending.push_str(delta);
        if let Some((pos, which)) = self.first_match() {
            self.pending.truncate(pos);
            self.matched = Some(which);
            return self.end(FinishReason::StopSequence);
        }
        let hold = self.hold_back();
        let release = self.pending.len() - hold;
        StopOutcome { text: self.pending.drain(..release).collect(), finish: None }
    }

    /// Ends the sequence for a reason the caller decided (cancel, error, context full); releases held text.
    pub fn end(&mut self, reason: FinishReason) -> StopOutcome {
        if self.finished.is_some() {
            return StopOutcome::default();
        }
        self.finished = Some(reason);
        StopOutcome { text: std::mem::take(&mut self.pending), finish: Some(reason) }
    }

    /// Earliest match in the pending text: (byte position, index of the stop sequence). At equal positions the
    /// earlier-listed sequence wins.
    fn first_match(&self) -> Option<(usize, usize)> {
        self.params
            .stop
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_empty())
            .filter_map(|(i, s)| self.pending.find(s.as_str()).map(|pos| (pos, i)))
            .min()
    }

    /// Bytes at the end of the pending text that are a proper prefix of some stop sequence.
    fn hold_back(&self) -> usize {
        let text = self.pending.as_str();
        let mut best = 0;
        for stop in &self.params.stop {
            let max = stop.len().saturating_sub(1).min(text.len());
            for len in (best + 1..=max).rev() {
                let start = text.len() - len;
                if text.is_char_boundary(start) && stop.starts_with(&text[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(stop: &[&str], max_tokens: u32, ignore_eos: bool) -> StopChecker {
        StopChecker::new(StopParams {
            max_tokens,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            eos_token_ids: vec![1],
            ignore_eos,
        })
    }

    /// Feeds (id, delta) pairs; returns streamed text and the reason.
    fn run(c: &mut StopChecker, steps: &[(u32, &str)]) -> (String, Option<FinishReason>) {
        let mut out = String::new();
        for &(id, d) in steps {
            let o = c.push(id, d);
            out.push_str(&o.text);
            if o.finish.is_some() {
                return (out, o.finish);
            }
        }
        (out, None)
    }

    #[test]
    fn stop_sequence_split_across_tokens_is_never_streamed() {
        let mut c = checker(&["###"], 100, false);
        let mut streamed = Vec::new();
        for d in ["Hello #", "#", " not yet", " ##", "# tail"] {
            let o = c.push(5, d);
            streamed.push(o.text.clone());
            if o.finish.is_some() {
                assert_eq!(o.finish, Some(FinishReason::StopSequence));
                break;
            }
        }
        assert_eq!(streamed, vec!["Hello ", "", "## not yet", " ", ""]);
        assert_eq!(c.matched_stop(), Some("###"));
    }

    #[test]
    fn eos_max_tokens_and_ignore_eos() {
        assert_eq!(
            run(&mut checker(&[], 10, false), &[(5, "a"), (1, ""), (5, "b")]),
            ("a".into(), Some(FinishReason::Stop))
        );
        assert_eq!(run(&mut checker(&[], 10, true), &[(5, "a"), (1, ""), (5, "b")]), ("ab".into(), None));
        assert_eq!(
            run(&mut checker(&["zz"], 2, false), &[(5, "a"), (5, "z")]),
            ("az".into(), Some(FinishReason::Length))
        );
        // EOS on the last allowed token is a stop, not a length finish.
        assert_eq!(run(&mut checker(&[], 2, false), &[(5, "a"), (1, "")]), ("a".into(), Some(FinishReason::Stop)));
    }

    #[test]
    fn earliest_match_wins_and_unicode_hold_back() {
        let mut c = checker(&["world", "lo w"], 100, false);
        assert_eq!(run(&mut c, &[(5, "hello world")]), ("hel".into(), Some(FinishReason::StopSequence)));
        assert_eq!(c.matched_stop(), Some("lo w"));
        let mut c = checker(&["日本語"], 100, false);
        assert_eq!(c.push(5, "これは日本").text, "これは");
        assert_eq!(c.push(5, "人").text, "日本人");
        assert_eq!(c.end(FinishReason::Cancelled).finish, Some(FinishReason::Cancelled));
        assert_eq!(c.push(5, "more"), StopOutcome::default());
    }
}
