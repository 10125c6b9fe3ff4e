//! The tokenizer: `tokenizer.json` through the `tokenizers` crate, plus BOS/EOS from the two config files.

use std::collections::HashSet;
use std::path::Path;

use super::config::{GenerationConfig, TokenizerConfig, DEFAULT_TEMPLATE_NAME};
use super::{read_to_string, TextError};

/// File names inside an artifact (or checkpoint) directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// See [`TOKENIZER_FILE`].
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// See [`TOKENIZER_FILE`].
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// transformers 5 may store the template in its own file instead of `tokenizer_config.json`.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// A loaded tokenizer with the special-token facts the engine needs.
///
/// EOS ids are the union of the id of `eos_token` from `tokenizer_config.json` and every id in
/// `generation_config.json`'s `eos_token_id`, in that order, without duplicates.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    config: TokenizerConfig,
    generation: GenerationConfig,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    special_ids: HashSet<u32>,
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (required), `tokenizer_config.json` and `generation_config.json` (both optional)
    /// and `chat_template.jinja` (used when the config has no `chat_template`) from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, TextError> {
        let cfg_path = dir.join(TOKENIZER_CONFIG_FILE);
        let mut config =
            if cfg_path.is_file() { TokenizerConfig::from_file(&cfg_path)? } else { TokenizerConfig::default() };
        let jinja = dir.join(CHAT_TEMPLATE_FILE);
        if config.chat_templates.is_empty() && jinja.is_file() {
            config.chat_templates.push((DEFAULT_TEMPLATE_NAME.to_string(), read_to_string(&jinja)?));
        }
        let gen_path = dir.join(GENERATION_CONFIG_FILE);
        let generation =
            if gen_path.is_file() { GenerationConfig::from_file(&gen_path)? } else { GenerationConfig::default() };
        Self::from_parts(&dir.join(TOKENIZER_FILE), config, generation)
    }

    /// Loads `tokenizer_json` and combines it with already parsed configs.
    pub fn from_parts(
        tokenizer_json: &Path,
        config: TokenizerConfig,
        generation: GenerationConfig,
    ) -> Result<Self, TextError> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| TextError::Tokenizer {
            what: format!("load {}", tokenizer_json.display()),
            message: e.to_string(),
        })?;
        let special_ids: HashSet<u32> =
            inner.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(id, _)| *id).collect();
        let lookup = |tok: &Option<String>| tok.as_deref().and_then(|t| inner.token_to_id(t));
        let bos_id = lookup(&config.bos_token).or(generation.bos_token_id);
        let mut eos_ids = Vec::new();
        for id in lookup(&config.eos_token).into_iter().chain(generation.eos_token_ids.iter().copied()) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        // Ids may have holes; the largest id + 1 is what decode and the logits width must cover.
        let max_id = inner.get_vocab(true).values().copied().max().unwrap_or(0);
        let vocab_size = (max_id as usize + 1).max(inner.get_vocab_size(true));
        Ok(Tokenizer { inner, config, generation, bos_id, eos_ids, special_ids, vocab_size })
    }

    /// Encodes `text`. With `add_special_tokens`, the tokenizer's post-processor runs and BOS/EOS are added
    /// when `tokenizer_config.json` says so (`add_bos_token`/`add_eos_token`) and the post-processor did not.
    /// Chat prompts are encoded with `add_special_tokens = false`: the template already wrote BOS.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TextError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TextError::Tokenizer { what: "encode".into(), message: e.to_string() })?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens {
            if let (true, Some(bos)) = (self.config.add_bos_token, self.bos_id) {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
            if let (true, Some(&eos)) = (self.config.add_eos_token, self.eos_ids.first()) {
                if ids.last() != Some(&eos) {
                    ids.push(eos);
                }
            }
        }
        Ok(ids)
    }

    /// Decodes `ids` to text. Ids the tokenizer does not know (a model's vocabulary is often padded past the
    /// tokenizer's) decode to nothing, as in transformers; use [`Tokenizer::check_ids`] to reject them.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TextError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TextError::Tokenizer { what: "decode".into(), message: e.to_string() })
    }

    /// Errors on the first id that is not below [`Tokenizer::vocab_size`] (for prompts given as ids).
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), TextError> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(&id) => Err(TextError::TokenId { id, vocab_size: self.vocab_size }),
            None => Ok(()),
        }
    }

    /// The id of a token string, added tokens included.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The exact bytes of one token (for the APIs' `logprobs`): a byte-level BPE token's characters mapped back to
    /// the bytes they stand for (GPT-2's byte-to-character table, which the R1 tokenizers use), an added token's
    /// text as UTF-8. `None` for an id the vocabulary does not have.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let piece = self.inner.id_to_token(id)?;
        if self.inner.get_added_vocabulary().is_special_token(&piece) || self.special_ids.contains(&id) {
            return Some(piece.into_bytes());
        }
        let mut out = Vec::with_capacity(piece.len());
        for c in piece.chars() {
            match byte_of_char(c) {
                Some(b) => out.push(b),
                None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        Some(out)
    }

    /// The BOS id (`bos_token` looked up, else `generation_config.json`'s `bos_token_id`).
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// All ids that end generation (see the type's documentation).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Whether `id` is one of [`Tokenizer::eos_token_ids`].
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// Whether `id` is an added token marked `special` (skipped by `decode(.., true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// Largest known id + 1 (base vocabulary plus added tokens).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The parsed `tokenizer_config.json`.
    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    /// The parsed `generation_config.json` (defaults when the file is absent).
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// The byte a byte-level BPE character stands for (GPT-2's `bytes_to_unicode`, inverted): printable Latin-1 bytes
/// stand for themselves, the other 68 bytes are mapped in order onto U+0100 and up.
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let u = c as u32;
    if printable(u) {
        return Some(u as u8);
    }
    let k = u.checked_sub(0x100)?;
    (0u32..=255).filter(|&b| !printable(b)).nth(k as usize).map(|b| b as u8)
}

#[cfg(test)]
mod byte_level_tests {
    use super::byte_of_char;

    #[test]
    fn gpt2_byte_characters_map_back_to_their_bytes() {
        assert_eq!(byte_of_char('a'), Some(b'a'));
        assert_eq!(byte_of_char('\u{120}'), Some(b' '), "Ġ is the space");
        assert_eq!(byte_of_char('\u{10a}'), Some(b'\n'), "Ċ is the newline");
        assert_eq!(byte_of_char('\u{100}'), Some(0), "the first unprintable byte");
        assert_eq!(byte_of_char('\u{143}'), Some(0xad), "the last one");
        assert_eq!(byte_of_char('\u{144}'), None);
        assert_eq!(byte_of_char('é'), Some(0xe9), "printable Latin-1 stands for itself");
    }
}
