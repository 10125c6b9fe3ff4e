//! Incremental detokenization: ids in one at a time, text deltas out, never a broken UTF-8 character.
//!
//! Byte-level BPE tokens can end in the middle of a multi-byte character, and some decoders change how a token
//! is spelled depending on its left neighbour (leading spaces). Like TGI and vLLM we decode a short window twice,
//! `ids[prefix..read]` (already emitted) and `ids[prefix..]` (with the new ids), and emit the difference only when
//! it grew and does not end in U+FFFD (an incomplete character). Then the window slides: `prefix = read`,
//! `read = len`. Ids before `prefix` are dropped, so memory stays bounded however long the output gets.

use super::{TextError, Tokenizer};

/// How many prompt ids [`IncrementalDetokenizer::with_context`] keeps for the first token's spelling.
pub const CONTEXT_IDS: usize = 6;

/// Per-sequence detokenizer state; pass the same [`Tokenizer`] to every call.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDetokenizer {
    /// Starts with no context. `skip_special_tokens` is passed to every decode (true for user-facing text).
    pub fn new(skip_special_tokens: bool) -> Self {
        IncrementalDetokenizer { ids: Vec::new(), prefix_offset: 0, read_offset: 0, skip_special_tokens }
    }

    /// Starts after the last [`CONTEXT_IDS`] ids of `prompt`, so the first generated token is spelled as it would
    /// be in the middle of the text (prompt text itself is never emitted).
    pub fn with_context(prompt: &[u32], skip_special_tokens: bool) -> Self {
        let tail = &prompt[prompt.len().saturating_sub(CONTEXT_IDS)..];
        IncrementalDetokenizer { ids: tail.to_vec(), prefix_offset: 0, read_offset: tail.len(), skip_special_tokens }
    }

    /// Adds one id and returns the text that became complete (often empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TextError> {
        self.ids.push(id);
        let prefix_text =
            tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let new_text = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        if new_text.len() <= prefix_text.len() || new_text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        // The window decode normally extends the emitted text; when a decoder respells the prefix, emit from the
        // first character boundary at or after its length rather than split a character.
        let mut cut = prefix_text.len();
        while !new_text.is_char_boundary(cut) {
            cut += 1;
        }
        let delta = new_text[cut..].to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        self.compact();
        Ok(delta)
    }

    /// Returns whatever is still held back (an incomplete character decodes to U+FFFD here) and empties the state.
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, TextError> {
        let prefix_text =
            tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let new_text = tokenizer.decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        self.compact();
        let mut cut = prefix_text.len().min(new_text.len());
        while !new_text.is_char_boundary(cut) {
            cut += 1;
        }
        Ok(new_text[cut..].to_string())
    }

    /// Number of ids currently held in the decode window (for tests and metrics).
    pub fn window_len(&self) -> usize {
        self.ids.len()
    }

    fn compact(&mut self) {
        if self.prefix_offset > 0 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
    }
}
