//! The boundary between the scheduler and a model: the small [`Model`] trait the scheduler drives, and the plain
//! data types that cross it. Implementations: [`crate::fake::FakeModel`] (deterministic, no ONNX, for tests) and
//! [`crate::engine_model::EngineModel`] (over `r1_engine::Engine`).
//!
//! Protocol, per scheduler iteration: [`Model::can_admit`] then [`Model::add_sequence`] for new requests;
//! [`Model::step`] with one [`Work`] item per scheduled sequence (a prefill chunk of `tokens`, or `tokens = 1` for a
//! decode); the model returns one [`Emitted`] token for every sequence whose pending input was fully fed;
//! [`Model::remove_sequence`] when a request ends for any reason. A failed step must leave every sequence as it was.

use std::sync::Arc;

pub use crate::error::ErrorClass;
pub use r1_engine::PrefixReuse;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChatTurn {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Message text.
    pub content: String,
    /// An assistant turn's tool calls (rendered by the chat template in the model's own format).
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` turn answers.
    pub tool_call_id: Option<String>,
}

impl ChatTurn {
    /// A plain message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatTurn { role: role.into(), content: content.into(), ..Default::default() }
    }
}

/// A function call of an assistant turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The call's id (`call_...`).
    pub id: String,
    /// The function's name.
    pub name: String,
    /// Its arguments, a JSON text.
    pub arguments: String,
}

/// What to tokenize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptInput {
    /// Raw text, no template.
    Text(String),
    /// Chat messages, rendered with the model's chat template, and the tools offered (a JSON array of OpenAI
    /// function tools; the template must show them to the model).
    Chat(Vec<ChatTurn>, Option<String>),
    /// Token ids as they are (checked against the vocabulary).
    Tokens(Vec<u32>),
}

/// What shape the answer must have (`response_format`): the answer after the reasoning is constrained to it.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// A JSON value of this schema.
    JsonSchema(serde_json::Value),
    /// One call, in the model's tool-call format, of one of these tools (name, JSON schema of its arguments):
    /// `tool_choice` `required` or a named function.
    ToolCall(Vec<(String, serde_json::Value)>),
}

/// Log-probabilities of one generated token (the model's distribution: see `r1_engine::sampling::logprobs`).
pub use r1_engine::sampling::TokenLogprobs;

/// One token as the APIs show it in `logprobs`: its text (lossy where it holds part of a UTF-8 character) and its
/// exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenText {
    /// The token's text.
    pub text: String,
    /// The token's bytes.
    pub bytes: Vec<u8>,
}

/// Validated sampling settings of one request: the engine's own parameters (the scheduler fills in a random seed
/// when the request gave none).
pub use r1_engine::sampling::SamplingParams as Sampling;

/// What [`Model::kv_pool_status`] reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvPoolStatus {
    /// Sequences preempted so far.
    pub preemptions: u64,
    /// Positions recomputed after preemptions so far.
    pub recomputed_tokens: u64,
    /// Slots in use now.
    pub slots_used: usize,
    /// Prompt positions taken from the prefix cache so far.
    pub prefix_cached_tokens: u64,
    /// Prompt positions prefilled so far (no cached prefix covered them).
    pub prefix_missed_tokens: u64,
    /// Retained prefixes evicted so far.
    pub prefix_evictions: u64,
    /// Finished sequences' caches retained now.
    pub prefix_retained: usize,
    /// Budget blocks held by running sequences now.
    pub blocks_running: usize,
    /// Budget blocks held by retained prefixes now (given back on demand).
    pub blocks_retained: usize,
    /// Budget blocks free now.
    pub blocks_free: usize,
}

/// Per-sequence generation settings handed to [`Model::add_sequence`].
#[derive(Debug, Clone, PartialEq)]
pub struct SeqParams {
    /// Sampling settings.
    pub sampling: Sampling,
    /// Tokens to generate at most: the model ends the sequence with [`FinishReason::Length`] on the last one (the one
    /// place `max_tokens` is enforced; the request validation only checks it against the server's limit).
    pub max_tokens: usize,
    /// Stop strings (the model trims them from the text and reports [`FinishReason::StopSequence`]).
    pub stop: Vec<String>,
    /// Do not finish on EOS.
    pub ignore_eos: bool,
    /// Report each generated token's log-probability with this many most likely alternatives (None: off).
    pub logprobs: Option<usize>,
    /// Constrain the answer (after the reasoning) to this format (None: free text).
    pub response_format: Option<ResponseFormat>,
    /// How the prompt may start from the model's prefix cache (`Off`: prefill all of it). The scheduler rounds
    /// `Longest` to its prefill chunk under `--prefix-cache exact`.
    pub prefix: PrefixReuse,
}

/// Handle of a sequence inside a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    /// Which sequence.
    pub seq: SeqId,
    /// Tokens to feed: a prefill chunk, or 1 when decoding.
    pub tokens: usize,
}

/// Why a sequence ended: the engine's one enum, used by the model, the scheduler and both APIs. A model reports
/// `Stop` (EOS), `StopSequence` or `Length` (it owns `max_tokens`: it ends the sequence on the last allowed token);
/// `Cancelled` is the scheduler's.
pub use r1_engine::sampling::FinishReason;

/// A token produced for one sequence by a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    /// Which sequence.
    pub seq: SeqId,
    /// The token id.
    pub token: u32,
    /// New answer text (may be empty while bytes of a character are pending).
    pub text: String,
    /// New reasoning text.
    pub reasoning: String,
    /// Set when this token ends the sequence.
    pub finish: Option<FinishReason>,
    /// Its log-probabilities, when the sequence asked for them ([`SeqParams::logprobs`]).
    pub logprobs: Option<TokenLogprobs>,
}

/// Static description of a loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDescription {
    /// Family from the manifest.
    pub family: String,
    /// Weight precision.
    pub precision: String,
    /// Backend name.
    pub backend: String,
    /// Longest prompt + output in tokens.
    pub max_context_tokens: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Batch sizes the engine is optimized for (ascending; empty = any size).
    pub batch_profiles: Vec<usize>,
    /// KV cache capacity in token positions (for the whole batch).
    pub kv_capacity_tokens: usize,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// The checkpoint's `generation_config.json`: its sampling fields are the defaults of requests that do not set
    /// them (see `validate::Limits::with_generation_config`).
    pub generation: r1_engine::text::GenerationConfig,
}

/// An error from a model: whose fault it is ([`ErrorClass`], which decides the status the caller gets), a stable
/// label for logs and metrics, and a message naming what failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{label}: {message}")]
pub struct ModelError {
    /// Whose fault and what status it gets.
    pub class: ErrorClass,
    /// Stable label (`backend`, `tokenizer`, `no_chat_template`, ...).
    pub label: &'static str,
    /// What went wrong.
    pub message: String,
}

impl From<ModelError> for crate::error::ServeError {
    fn from(e: ModelError) -> Self {
        crate::error::ServeError::Engine { class: e.class, label: e.label.to_string(), message: e.message }
    }
}

impl ModelError {
    /// An error of `class`.
    pub fn new(class: ErrorClass, label: &'static str, message: impl Into<String>) -> Self {
        ModelError { class, label, message: message.into() }
    }

    /// A fault of the model or the server ([`ErrorClass::Internal`]).
    pub fn internal(label: &'static str, message: impl Into<String>) -> Self {
        ModelError::new(ErrorClass::Internal, label, message)
    }

    /// A mistake of the caller ([`ErrorClass::InvalidArgument`]).
    pub fn invalid(label: &'static str, message: impl Into<String>) -> Self {
        ModelError::new(ErrorClass::InvalidArgument, label, message)
    }
}

/// The text side of a model, used by request handlers (thread-safe, no sequence state).
pub trait Frontend: Send + Sync {
    /// Tokenizes a prompt (rendering chat messages with the chat template).
    fn encode(&self, input: &PromptInput) -> Result<Vec<u32>, ModelError>;
    /// One token's text and bytes (for `logprobs`).
    fn token_text(&self, id: u32) -> TokenText;
    /// Checks that `format` can be enforced (compiles its grammar), so a bad schema is refused before the request
    /// is queued.
    fn check_response_format(&self, format: &ResponseFormat) -> Result<(), ModelError>;
}

/// What the scheduler needs from a model. Called from one dedicated thread only.
pub trait Model: Send {
    /// Static description.
    fn describe(&self) -> ModelDescription;
    /// The tokenizer side, shared with request handlers.
    fn frontend(&self) -> Arc<dyn Frontend>;
    /// Whether a request of `prompt_tokens` that may generate `max_tokens` should start now.
    fn can_admit(&self, prompt_tokens: usize, max_tokens: usize) -> bool;
    /// Adds a sequence with `prompt` pending.
    fn add_sequence(&mut self, prompt: &[u32], params: &SeqParams) -> Result<SeqId, ModelError>;
    /// Frees a sequence (no-op if unknown).
    fn remove_sequence(&mut self, seq: SeqId);
    /// One forward pass over `work`; `pad_to` is the profile batch size the scheduler aligned the batch to.
    fn step(&mut self, work: &[Work], pad_to: usize) -> Result<Vec<Emitted>, ModelError>;
    /// KV positions held now.
    fn kv_used_tokens(&self) -> usize;
    /// Prompt tokens of `seq` that the model took from its prefix cache at [`Model::add_sequence`] (the scheduler
    /// prefills only the rest).
    fn cached_prompt_tokens(&self, seq: SeqId) -> usize {
        let _ = seq;
        0
    }
    /// The KV pool's counters so far: preemptions, positions recomputed, slots in use (zeros for models without one).
    fn kv_pool_status(&self) -> KvPoolStatus {
        KvPoolStatus::default()
    }
}
