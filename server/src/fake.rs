//! A deterministic stand-in model for tests and demos: no ONNX, byte-level "tokenizer", and a next token that is a
//! hash of the sequence so far (so a sequence's output does not depend on what it was batched with, which is what
//! the batching tests check). It enforces the [`Model`] protocol strictly: a work item feeding more tokens than are
//! pending, an unknown sequence, or a KV over-reservation is an error, so scheduler bugs surface in tests.
//!
//! Behaviour knobs ([`FakeConfig`]): per-step delay (to make cancellation and deadline tests deterministic), an EOS
//! after N tokens, and failure injection: any step that includes a sequence whose prompt starts with `FAIL` fails,
//! and [`FakeModel::faults`] arms failures of the next N steps from outside (a fault in the middle of a running batch).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::model::{
    Emitted, ErrorClass, FinishReason, Frontend, Model, ModelDescription, ModelError, PromptInput, ResponseFormat,
    SeqId, SeqParams, TokenLogprobs, TokenText, Work,
};

/// Failures armed from outside the scheduler thread (tests): the next [`Faults::fail_next_steps`] steps fail.
#[derive(Debug, Default)]
pub struct Faults {
    fail_steps: AtomicUsize,
    failed: AtomicUsize,
}

impl Faults {
    /// Makes the next `n` steps fail (after their work was validated, changing no sequence).
    pub fn fail_next_steps(&self, n: usize) {
        self.fail_steps.store(n, Ordering::SeqCst);
    }

    /// Steps failed by this switch so far.
    pub fn failed_steps(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }

    fn take(&self) -> bool {
        let taken = self.fail_steps.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if taken {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
        taken
    }
}

/// The fake's EOS token id.
pub const FAKE_EOS: u32 = 2;
/// Generated tokens of every sequence that go to the reasoning part before the answer starts.
pub const FAKE_THINK_TOKENS: usize = 3;

/// Settings of a [`FakeModel`].
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Context window.
    pub max_context_tokens: usize,
    /// KV capacity in positions.
    pub kv_capacity_tokens: usize,
    /// Batch profiles advertised.
    pub batch_profiles: Vec<usize>,
    /// Sleep per step (simulated compute).
    pub step_delay: Duration,
    /// Emit EOS as the N-th generated token (unless `ignore_eos`).
    pub eos_after: Option<usize>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            max_context_tokens: 4096,
            kv_capacity_tokens: 1 << 20,
            batch_profiles: vec![1, 2, 4, 8, 16, 32],
            step_delay: Duration::ZERO,
            eos_after: None,
        }
    }
}

/// What one step looked like (for tests).
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    /// `(sequence, tokens fed)` per row.
    pub work: Vec<(SeqId, usize)>,
    /// The profile size the batch was aligned to.
    pub pad_to: usize,
}

#[derive(Debug)]
struct FakeSeq {
    prompt: Vec<u32>,
    fed: usize,
    generated: Vec<u32>,
    /// The last generated token has not been fed yet.
    pending_decode: bool,
    params: SeqParams,
    text: String,
    /// Bytes of `text` already returned (the rest may be the start of a stop string).
    emitted: usize,
    reserved: usize,
}

/// The byte-level tokenizer of the fake model: one token per byte, offset by 3 (0..=2 are special).
#[derive(Debug, Default)]
pub struct FakeFrontend;

impl Frontend for FakeFrontend {
    fn encode(&self, input: &PromptInput) -> Result<Vec<u32>, ModelError> {
        let text = match input {
            PromptInput::Text(t) => t.clone(),
            PromptInput::Chat(turns, tools) => {
                let mut s: String = tools.iter().map(|t| format!("<tools>{t}")).collect();
                s.extend(turns.iter().map(|t| format!("<{}>{}", t.role, t.content)));
                s.push_str("<assistant>");
                s
            }
            PromptInput::Tokens(ids) => return Ok(ids.clone()),
        };
        Ok(text.bytes().map(|b| b as u32 + 3).collect())
    }

    fn check_response_format(&self, _format: &ResponseFormat) -> Result<(), ModelError> {
        Err(ModelError::invalid(
            "response_format",
            "`response_format`: the fake model has no logits to constrain; only the engine model enforces JSON output",
        ))
    }

    fn token_text(&self, id: u32) -> TokenText {
        let bytes = if id >= 3 { vec![(id - 3) as u8] } else { format!("<special {id}>").into_bytes() };
        TokenText { text: String::from_utf8_lossy(&bytes).into_owned(), bytes }
    }
}

/// The deterministic fake model.
#[derive(Debug)]
pub struct FakeModel {
    cfg: FakeConfig,
    seqs: HashMap<SeqId, FakeSeq>,
    next_id: u64,
    reserved: usize,
    log: Arc<Mutex<Vec<StepRecord>>>,
    faults: Arc<Faults>,
}

impl FakeModel {
    /// A fake with these settings.
    pub fn new(cfg: FakeConfig) -> Self {
        FakeModel { cfg, seqs: HashMap::new(), next_id: 0, reserved: 0, log: Arc::default(), faults: Arc::default() }
    }

    /// Switch that makes upcoming steps fail.
    pub fn faults(&self) -> Arc<Faults> {
        self.faults.clone()
    }

    /// Shared log of every step run so far.
    pub fn step_log(&self) -> Arc<Mutex<Vec<StepRecord>>> {
        self.log.clone()
    }

    /// The token the fake generates after `history` (prompt + generated so far) with `seed`.
    pub fn next_token(history: &[u32], seed: u64) -> u32 {
        // FNV-1a over the history: depends on the sequence only, never on its batch neighbours.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
        for &t in history {
            h ^= t as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Lowercase letters and spaces, as byte tokens.
        let c = match h % 27 {
            26 => b' ',
            k => b'a' + k as u8,
        };
        c as u32 + 3
    }
}

impl Model for FakeModel {
    fn describe(&self) -> ModelDescription {
        ModelDescription {
            family: "fake".into(),
            precision: "fp32".into(),
            backend: "fake".into(),
            max_context_tokens: self.cfg.max_context_tokens,
            vocab_size: 259,
            batch_profiles: self.cfg.batch_profiles.clone(),
            kv_capacity_tokens: self.cfg.kv_capacity_tokens,
            eos_token_ids: vec![FAKE_EOS],
            generation: Default::default(),
        }
    }

    fn frontend(&self) -> Arc<dyn Frontend> {
        Arc::new(FakeFrontend)
    }

    fn can_admit(&self, prompt_tokens: usize, max_tokens: usize) -> bool {
        // The fake reserves prompt + max_tokens up front (the engine's pool grows instead).
        let positions = prompt_tokens + max_tokens;
        positions <= self.cfg.max_context_tokens && self.reserved + positions <= self.cfg.kv_capacity_tokens
    }

    fn add_sequence(&mut self, prompt: &[u32], params: &SeqParams) -> Result<SeqId, ModelError> {
        let need = prompt.len() + params.max_tokens;
        if prompt.is_empty() || !self.can_admit(prompt.len(), params.max_tokens) {
            return Err(ModelError::new(
                ErrorClass::ResourceExhausted,
                "resource_exhausted",
                format!(
                    "sequence needs {need} KV positions, {} of {} free",
                    self.cfg.kv_capacity_tokens - self.reserved,
                    self.cfg.kv_capacity_tokens
                ),
            ));
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.reserved += need;
        let seq = FakeSeq {
            prompt: prompt.to_vec(),
            fed: 0,
            generated: Vec::new(),
            pending_decode: false,
            params: params.clone(),
            text: String::new(),
            emitted: 0,
            reserved: need,
        };
        self.seqs.insert(id, seq);
        Ok(id)
    }

    fn remove_sequence(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.reserved -= s.reserved;
        }
    }

    fn step(&mut self, work: &[Work], pad_to: usize) -> Result<Vec<Emitted>, ModelError> {
        if !self.cfg.step_delay.is_zero() {
            std::thread::sleep(self.cfg.step_delay);
        }
        // Validate everything first: a failed step changes no sequence.
        for w in work {
            let s = self
                .seqs
                .get(&w.seq)
                .ok_or_else(|| ModelError::internal("not_found", format!("unknown sequence {}", w.seq.0)))?;
            let pending = if s.pending_decode { 1 } else { s.prompt.len() - s.fed };
            if w.tokens == 0 || w.tokens > pending {
                return Err(ModelError::internal(
                    "protocol",
                    format!("sequence {} has {pending} pending tokens, work asked to feed {}", w.seq.0, w.tokens),
                ));
            }
            if s.prompt.starts_with(&FakeFrontend.encode(&PromptInput::Text("FAIL".into()))?) {
                return Err(ModelError::internal("backend", format!("injected failure (sequence {})", w.seq.0)));
            }
        }
        if self.faults.take() {
            return Err(ModelError::internal(
                "backend",
                format!("injected step failure ({} sequences in the batch)", work.len()),
            ));
        }
        if let Ok(mut log) = self.log.lock() {
            log.push(StepRecord { work: work.iter().map(|w| (w.seq, w.tokens)).collect(), pad_to });
        }
        let mut out = Vec::new();
        for w in work {
            let Some(s) = self.seqs.get_mut(&w.seq) else { continue };
            if s.pending_decode {
                s.pending_decode = false;
            } else {
                s.fed += w.tokens;
                if s.fed < s.prompt.len() {
                    continue;
                }
            }
            let seed = if s.params.sampling.temperature == 0.0 { 0 } else { s.params.sampling.seed.unwrap_or(0) };
            let history: Vec<u32> = s.prompt.iter().chain(s.generated.iter()).copied().collect();
            let n = s.generated.len() + 1;
            let eos = !s.params.ignore_eos && self.cfg.eos_after == Some(n);
            let token = if eos { FAKE_EOS } else { Self::next_token(&history, seed) };
            s.generated.push(token);
            s.pending_decode = true;
            // The fake is certain of its token: log-probability 0, the next ids after it at -1, -2, ...
            let logprobs = s.params.logprobs.map(|k| TokenLogprobs {
                logprob: 0.0,
                top: (0..k as u32).map(|i| (token + i, -(i as f32))).collect(),
            });
            let mut e =
                Emitted { seq: w.seq, token, text: String::new(), reasoning: String::new(), finish: None, logprobs };
            if eos {
                e.finish = Some(FinishReason::Stop);
            } else {
                let ch = ((token - 3) as u8 as char).to_string();
                if n <= FAKE_THINK_TOKENS {
                    e.reasoning = ch;
                } else {
                    s.text.push_str(&ch);
                    let (emit_to, stopped) = stop_scan(&s.text, &s.params.stop);
                    e.text = s.text[s.emitted..emit_to].to_string();
                    s.emitted = emit_to;
                    if stopped {
                        s.text.truncate(emit_to);
                        e.finish = Some(FinishReason::StopSequence);
                    }
                }
                // The model owns max_tokens (and the context limit): the last allowed token ends the sequence, and
                // text held back for a possible stop string is released with it.
                if e.finish.is_none() && (n >= s.params.max_tokens || s.prompt.len() + n >= self.cfg.max_context_tokens)
                {
                    e.finish = Some(FinishReason::Length);
                    e.text.push_str(&s.text[s.emitted..]);
                    s.emitted = s.text.len();
                }
            }
            out.push(e);
        }
        Ok(out)
    }

    fn kv_used_tokens(&self) -> usize {
        self.reserved
    }
}

/// Where text may be emitted up to: `(end, true)` when a stop string matched at `end`; otherwise `(end, false)` with
/// any suffix that could still grow into a stop string held back.
pub fn stop_scan(text: &str, stops: &[String]) -> (usize, bool) {
    if let Some(at) = stops.iter().filter_map(|st| text.find(st.as_str())).min() {
        return (at, true);
    }
    let mut end = text.len();
    for st in stops {
        for k in (1..st.len()).rev() {
            if text.len() >= k
                && st.is_char_boundary(k)
                && text.is_char_boundary(text.len() - k)
                && text.ends_with(&st[..k])
            {
                end = end.min(text.len() - k);
                break;
            }
        }
    }
    (end, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_scan_holds_back_prefixes() {
        let stops = vec!["abc".to_string()];
        assert_eq!(stop_scan("xxab", &stops), (2, false));
        assert_eq!(stop_scan("xxabc", &stops), (2, true));
        assert_eq!(stop_scan("xxa", &stops), (2, false));
        assert_eq!(stop_scan("xxq", &stops), (3, false));
        assert_eq!(stop_scan("xx", &[]), (2, false));
    }
}
