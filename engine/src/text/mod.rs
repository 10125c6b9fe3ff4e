//! Text in and out of the model: tokenizer, chat template, incremental detokenizer and the reasoning split.
//!
//! Everything here works on the tokenizer files an artifact carries (`tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`) and needs no model graph:
//!
//! * [`Tokenizer`] wraps the `tokenizers` crate and knows BOS/EOS from the configs ([`TokenizerConfig`],
//!   [`GenerationConfig`]).
//! * [`ChatTemplate`] renders conversations with minijinja exactly as transformers' `apply_chat_template` does.
//! * [`IncrementalDetokenizer`] turns a stream of ids into text deltas that are always whole UTF-8.
//! * [`ReasoningSplitter`] separates the `<think>…</think>` reasoning from the answer, delta by delta.

mod chat;
mod config;
mod detok;
mod reasoning;
mod tokenizer;
pub mod tools;

use std::path::PathBuf;

pub use chat::{prompt_opens_reasoning, ChatMessage, ChatTemplate, RenderOptions};
pub use config::{GenerationConfig, TokenizerConfig};
pub use detok::IncrementalDetokenizer;
pub use reasoning::{ReasoningDelta, ReasoningSplitter, THINK_END, THINK_START};
pub use tokenizer::{Tokenizer, CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE};

/// Errors of the text layer. [`TextError::kind`] is a stable label for metrics and status mapping.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A tokenizer file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that was read.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON config file is malformed or has a field of the wrong type.
    #[error("invalid {path}: {message}")]
    Config {
        /// The file that was parsed.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// The `tokenizers` crate failed to load a tokenizer or to encode/decode.
    #[error("tokenizer {what}: {message}")]
    Tokenizer {
        /// The operation (`load <path>`, `encode`, `decode`).
        what: String,
        /// The library's message.
        message: String,
    },
    /// A token id outside the tokenizer's vocabulary.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    TokenId {
        /// The id given.
        id: u32,
        /// Number of ids the tokenizer knows, added tokens included.
        vocab_size: usize,
    },
    /// The artifact has no chat template at all.
    #[error("no chat template: {path} has no `chat_template` and there is no chat_template.jinja beside it")]
    NoChatTemplate {
        /// The tokenizer config that was searched.
        path: PathBuf,
    },
    /// A named template was asked for that the config does not have.
    #[error("chat template `{name}` not found; available: {available}")]
    UnknownTemplate {
        /// The name asked for.
        name: String,
        /// Comma-separated names that exist.
        available: String,
    },
    /// The template source does not compile.
    #[error("chat template `{name}` does not compile: {message}")]
    TemplateSyntax {
        /// Template name.
        name: String,
        /// minijinja's message with the location.
        message: String,
    },
    /// Rendering failed: the template called `raise_exception`, or the messages lack what the template reads.
    #[error("chat template `{name}` failed to render: {message}")]
    Render {
        /// Template name.
        name: String,
        /// The template's own message (for `raise_exception`) or minijinja's.
        message: String,
    },
    /// `apply_chat_template` refuses an empty conversation and so do we.
    #[error("the conversation has 0 messages; at least 1 is required")]
    EmptyConversation,
}

impl TextError {
    /// Stable, low-cardinality label for metrics and status-code mapping.
    pub fn kind(&self) -> &'static str {
        match self {
            TextError::Io { .. } => "io",
            TextError::Config { .. } => "config",
            TextError::Tokenizer { .. } => "tokenizer",
            TextError::TokenId { .. } => "token_id",
            TextError::NoChatTemplate { .. } => "no_chat_template",
            TextError::UnknownTemplate { .. } => "unknown_template",
            TextError::TemplateSyntax { .. } => "template_syntax",
            TextError::Render { .. } => "template_render",
            TextError::EmptyConversation => "empty_conversation",
        }
    }

    /// True when the caller's input caused the error (bad messages, ids), false for artifact problems.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, TextError::TokenId { .. } | TextError::Render { .. } | TextError::EmptyConversation)
    }
}

/// Reads a file into a string, naming the path on failure.
pub(crate) fn read_to_string(path: &std::path::Path) -> Result<String, TextError> {
    std::fs::read_to_string(path).map_err(|source| TextError::Io { path: path.to_path_buf(), source })
}
