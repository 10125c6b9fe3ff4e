//! Constrained decoding for the APIs' `response_format` (`json_object`, `json_schema`), through `llguidance`
//! (Microsoft's grammar engine, also used by vLLM, SGLang and mistral.rs): a [`Grammars`] per model holds the
//! vocabulary as bytes (built once from `tokenizer.json`); a [`Constraint`] per sequence masks, before each draw,
//! every token the JSON grammar does not allow at that point, and advances with the token drawn. When the JSON value
//! is complete only the end-of-sequence token is allowed.
//!
//! JSON is written compact (no free whitespace between tokens; `llguidance`'s `whitespace_flexible: false`), so a
//! small model cannot wander into whitespace until `max_tokens`; a schema may override it with its own
//! `"x-guidance"` options.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::text::Tokenizer;

/// Errors of grammar set-up and use, each naming what failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrammarError {
    /// The tokenizer's vocabulary could not be read as bytes.
    #[error("cannot build the token trie for constrained decoding from tokenizer.json: {0}")]
    Vocabulary(String),
    /// The request's schema is not one the grammar engine compiles.
    #[error("holds a JSON schema that cannot be compiled: {0}")]
    Schema(String),
    /// The grammar refused a token or failed while computing a mask (a server fault: masked tokens are never drawn).
    #[error("constrained decoding failed: {0}")]
    Matcher(String),
}

/// The grammar engine's view of one model's vocabulary; builds a [`Constraint`] per request.
pub struct Grammars {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// The vocabulary of `tokenizer` as bytes (byte-level BPE decoded, special tokens marked), padded to the
    /// model's `model_vocab` logits, with `eos` as the token that ends a complete value. Costs up to about a second
    /// on a 129k vocabulary: build it once per model.
    pub fn new(tokenizer: &Tokenizer, model_vocab: usize, eos: u32) -> Result<Self, GrammarError> {
        let err = |e: String| GrammarError::Vocabulary(e);
        let text = tokenizer.inner().to_string(false).map_err(|e| err(e.to_string()))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| err(e.to_string()))?;
        // Ids the tokenizer does not define (padding of the embedding) are empty words: never allowed.
        let vocab = words.len().max(tokenizer.vocab_size()).max(model_vocab).max(eos as usize + 1);
        words.resize(vocab, Vec::new());
        let info = TokRxInfo::new(vocab as u32, eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let factory = ParserFactory::new_simple(&env).map_err(|e| err(e.to_string()))?;
        Ok(Grammars { factory: Arc::new(factory) })
    }

    /// A constraint to JSON: any object (`schema` None, `response_format: {"type": "json_object"}`) or a value of
    /// `schema` (`json_schema`).
    pub fn json(&self, schema: Option<&Value>) -> Result<Constraint, GrammarError> {
        let mut schema = schema.cloned().unwrap_or_else(|| json!({"type": "object"}));
        if let Some(obj) = schema.as_object_mut() {
            obj.entry("x-guidance").or_insert_with(|| json!({"whitespace_flexible": false}));
        } else if !schema.is_boolean() {
            return Err(GrammarError::Schema(format!("a JSON schema is an object or a boolean, got {schema}")));
        }
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| GrammarError::Schema(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Schema(e));
        }
        Ok(Constraint { matcher })
    }
}

impl Grammars {
    /// A constraint forcing one call, in DeepSeek-R1's tool-call format (`text::tools`), of one of `tools` (name and
    /// JSON schema of its arguments): what `tool_choice: "required"` or a named function asks for. The arguments are
    /// compact JSON following the schema. Names must be OpenAI's `[A-Za-z0-9_-]{1,64}`.
    pub fn tool_call(&self, tools: &[(String, Value)]) -> Result<Constraint, GrammarError> {
        use crate::text::tools::{CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP};
        let quote = |s: &str| Value::String(s.to_string()).to_string();
        if tools.is_empty() {
            return Err(GrammarError::Schema("a forced tool call needs at least one tool".into()));
        }
        let mut rules = Vec::new();
        for (i, (name, schema)) in tools.iter().enumerate() {
            let ok = !name.is_empty()
                && name.len() <= 64
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(GrammarError::Schema(format!("tool names are [A-Za-z0-9_-]{{1,64}}, got {name:?}")));
            }
            let mut schema = schema.clone();
            if let Some(obj) = schema.as_object_mut() {
                obj.entry("x-guidance").or_insert_with(|| json!({"whitespace_flexible": false}));
            }
            rules.push(format!(
                "f{i}: {} a{i} {}\na{i}: %json {schema}",
                quote(&format!("{name}\n```json\n")),
                quote(&format!("\n```{CALL_END}"))
            ));
        }
        let alternatives: Vec<String> = (0..tools.len()).map(|i| format!("f{i}")).collect();
        let grammar = format!(
            "start: {} call {}\ncall: {} ({})\n{}\n",
            quote(CALLS_BEGIN),
            quote(CALLS_END),
            quote(&format!("{CALL_BEGIN}function{SEP}")),
            alternatives.join(" | "),
            rules.join("\n")
        );
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_lark(grammar))
            .map_err(|e| GrammarError::Schema(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(GrammarError::Schema(e)),
            None => Ok(Constraint { matcher }),
        }
    }
}

/// One sequence's grammar state.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish_non_exhaustive()
    }
}

impl Constraint {
    /// Sets to -inf every logit of a token the grammar does not allow next (only EOS once the value is complete),
    /// except `also` (e.g. the token that opens a reasoning part, which comes before the answer); ids beyond the
    /// vocabulary the grammar knows are never allowed.
    pub fn mask(&mut self, logits: &mut [f32], also: Option<u32>) -> Result<(), GrammarError> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| GrammarError::Matcher(e.to_string()))?;
        let known = allowed.len();
        for (id, l) in logits.iter_mut().enumerate() {
            if Some(id as u32) == also {
                continue;
            }
            if id >= known || !allowed.is_allowed(id as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances past the drawn token.
    pub fn accept(&mut self, token: u32) -> Result<(), GrammarError> {
        self.matcher.consume_token(token).map_err(|e| GrammarError::Matcher(e.to_string()))
    }

    /// Whether the value is complete (only EOS is allowed now).
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}
