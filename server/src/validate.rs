//! Request validation: a protocol-neutral [`RawRequest`] (built by the gRPC and HTTP front ends) becomes a
//! [`ValidRequest`], or an `INVALID_ARGUMENT` error naming the field, the limit and the value given.
//! After tokenization, [`check_context`] checks the prompt against the model's context window.

use crate::error::{ConfigError, ServeError};
use crate::model::{ChatTurn, PromptInput, ResponseFormat, Sampling};

/// Default temperature when a request does not set one (DeepSeek's recommendation for R1).
pub const DEFAULT_TEMPERATURE: f32 = 0.6;
use r1_engine::sampling::limits::{self, FloatRange};
pub use r1_engine::sampling::limits::{MAX_STOP_SEQUENCES, MAX_STOP_SEQUENCE_BYTES as MAX_STOP_BYTES};
/// Chat roles the template knows.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Request limits of this server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Largest `max_tokens`.
    pub max_new_tokens: u32,
    /// `max_tokens` when unset.
    pub default_max_tokens: u32,
    /// Prompt plus output tokens at most (the model's context).
    pub max_context_tokens: u32,
    /// Sampling fields a request leaves unset take these (the server's, then the checkpoint's
    /// `generation_config.json` once the model is loaded).
    pub sampling_defaults: SamplingDefaults,
    /// Longest a request may take from arrival to its last token (`--request-timeout-secs`); a client's own
    /// shorter deadline (`grpc-timeout`, `x-request-timeout`) still wins. None: only the client's.
    pub request_timeout: Option<std::time::Duration>,
}

/// Defaults of the sampling fields of a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingDefaults {
    /// `temperature`.
    pub temperature: f32,
    /// `top_p`.
    pub top_p: f32,
    /// `top_k` (0 = off).
    pub top_k: u32,
    /// `min_p`.
    pub min_p: f32,
    /// `repetition_penalty`.
    pub repetition_penalty: f32,
}

impl SamplingDefaults {
    /// The server's own: DeepSeek's recommended temperature for R1, every filter off.
    pub const SERVER: SamplingDefaults = SamplingDefaults {
        temperature: DEFAULT_TEMPERATURE,
        top_p: 1.0,
        top_k: 0,
        min_p: 0.0,
        repetition_penalty: 1.0,
    };
}

impl Default for SamplingDefaults {
    fn default() -> Self {
        SamplingDefaults::SERVER
    }
}

impl Limits {
    /// These limits with the sampling defaults a checkpoint's `generation_config.json` sets (R1's releases: temperature
    /// 0.6, top_p 0.95; `do_sample: false` means greedy). A value outside the allowed range is left out, with a
    /// warning naming it; fields the file does not set keep the server's defaults.
    pub fn with_generation_config(mut self, g: &r1_engine::text::GenerationConfig) -> Limits {
        let d = &mut self.sampling_defaults;
        let take = |name: &str, v: Option<f32>, range: FloatRange, slot: &mut f32| match v {
            Some(v) if range.contains(v) => *slot = v,
            Some(v) => {
                tracing::warn!(field = name, value = v, allowed = %range, "generation_config.json default out of range; ignored")
            }
            None => {}
        };
        take("temperature", g.temperature, limits::TEMPERATURE, &mut d.temperature);
        take("top_p", g.top_p, limits::TOP_P, &mut d.top_p);
        take("min_p", g.min_p, limits::MIN_P, &mut d.min_p);
        take("repetition_penalty", g.repetition_penalty, limits::REPETITION_PENALTY, &mut d.repetition_penalty);
        if let Some(k) = g.top_k {
            d.top_k = k;
        }
        if g.do_sample == Some(false) {
            d.temperature = 0.0;
        }
        self
    }

    /// Checks that the limits are consistent.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_new_tokens == 0 {
            return Err(ConfigError::Invalid { name: "--max-new-tokens", message: "must be at least 1, got 0".into() });
        }
        if self.default_max_tokens == 0 || self.default_max_tokens > self.max_new_tokens {
            return Err(ConfigError::Invalid {
                name: "--default-max-tokens",
                message: format!(
                    "must be between 1 and --max-new-tokens {}, got {}",
                    self.max_new_tokens, self.default_max_tokens
                ),
            });
        }
        Ok(())
    }
}

/// Sampling fields as they arrive; `None` means "use the default".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawSampling {
    /// Temperature.
    pub temperature: Option<f32>,
    /// Nucleus threshold.
    pub top_p: Option<f32>,
    /// Top-k cut-off (0 = off).
    pub top_k: Option<u32>,
    /// Min-p threshold.
    pub min_p: Option<f32>,
    /// Repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// Seed.
    pub seed: Option<u64>,
    /// OpenAI presence penalty (0 = off).
    pub presence_penalty: Option<f32>,
    /// OpenAI frequency penalty (0 = off).
    pub frequency_penalty: Option<f32>,
}

/// Most choices (`n`) one request may ask for.
pub const MAX_CHOICES: u32 = 16;

/// A request as any front end received it, before checks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawRequest {
    /// Raw prompt text, if given.
    pub prompt: Option<String>,
    /// Chat messages (empty if not given).
    pub messages: Vec<ChatTurn>,
    /// The prompt as token ids (gRPC `prompt_token_ids`; empty if not given).
    pub prompt_token_ids: Vec<u32>,
    /// Log-probabilities of each generated token with this many most likely alternatives (None: off).
    pub logprobs: Option<u32>,
    /// Choices to generate (None: 1).
    pub n: Option<u32>,
    /// Tools offered to the model, a JSON array of OpenAI function tools (chat only).
    pub tools: Option<String>,
    /// The answer's required format (None: free text).
    pub response_format: Option<ResponseFormat>,
    /// Requested output length.
    pub max_tokens: Option<u32>,
    /// Sampling settings.
    pub sampling: RawSampling,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Generate past EOS.
    pub ignore_eos: bool,
    /// Prefill the whole prompt whatever the prefix cache holds.
    pub skip_prefix_cache: bool,
    /// Prefix of sampling field names in error messages (`sampling.` for gRPC, empty for OpenAI).
    pub sampling_prefix: &'static str,
}

/// A request that passed every check that needs no tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    /// What to tokenize.
    pub input: PromptInput,
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// Sampling settings with defaults applied.
    pub sampling: Sampling,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Generate past EOS.
    pub ignore_eos: bool,
    /// Start from the longest cached prefix of the prompt.
    pub prefix_cache: bool,
    /// Log-probabilities with this many alternatives per token (None: off).
    pub logprobs: Option<usize>,
    /// Choices to generate (1 ..= [`MAX_CHOICES`]).
    pub n: usize,
    /// The answer's required format.
    pub response_format: Option<ResponseFormat>,
}

/// `v` when the engine's `range` allows it; otherwise an error naming the API's field, the range and the value.
fn in_range(field: String, v: f32, range: FloatRange) -> Result<f32, ServeError> {
    if range.contains(v) {
        return Ok(v);
    }
    Err(ServeError::InvalidArgument { field, message: format!("must be in {range}, got {v}") })
}

/// Checks a raw request against `limits` and applies defaults.
pub fn validate(raw: RawRequest, limits: &Limits) -> Result<ValidRequest, ServeError> {
    let text_given = raw.prompt.is_some() || !raw.messages.is_empty();
    let input = match (raw.prompt, raw.messages.is_empty()) {
        _ if text_given && !raw.prompt_token_ids.is_empty() => {
            return Err(ServeError::invalid(
                "prompt_token_ids",
                "is set together with `prompt` or `messages`; give exactly one of the three",
            ));
        }
        (None, true) if !raw.prompt_token_ids.is_empty() => PromptInput::Tokens(raw.prompt_token_ids),
        (None, true) => {
            return Err(ServeError::invalid(
                "prompt",
                "and `messages` are both empty (and no `prompt_token_ids`); give exactly one of them",
            ))
        }
        (Some(_), false) => {
            return Err(ServeError::invalid("prompt", "and `messages` are both set; give exactly one of them"));
        }
        (Some(p), true) if p.is_empty() => {
            return Err(ServeError::invalid("prompt", "must not be empty, got an empty string"))
        }
        (Some(p), true) => PromptInput::Text(p),
        (None, false) => {
            for (i, m) in raw.messages.iter().enumerate() {
                if !ROLES.contains(&m.role.as_str()) {
                    return Err(ServeError::invalid(
                        format!("messages[{i}].role"),
                        format!("must be one of {}, got {:?}", ROLES.join(", "), m.role),
                    ));
                }
            }
            PromptInput::Chat(raw.messages, raw.tools)
        }
    };
    let max_tokens = raw.max_tokens.unwrap_or(limits.default_max_tokens);
    if max_tokens == 0 || max_tokens > limits.max_new_tokens {
        return Err(ServeError::invalid(
            "max_tokens",
            format!("must be between 1 and {}, got {max_tokens}", limits.max_new_tokens),
        ));
    }
    let p = raw.sampling_prefix;
    let s = raw.sampling;
    let sampling = Sampling {
        temperature: in_range(
            format!("{p}temperature"),
            s.temperature.unwrap_or(limits.sampling_defaults.temperature),
            limits::TEMPERATURE,
        )?,
        top_p: in_range(format!("{p}top_p"), s.top_p.unwrap_or(limits.sampling_defaults.top_p), limits::TOP_P)?,
        top_k: s.top_k.unwrap_or(limits.sampling_defaults.top_k),
        min_p: in_range(format!("{p}min_p"), s.min_p.unwrap_or(limits.sampling_defaults.min_p), limits::MIN_P)?,
        repetition_penalty: in_range(
            format!("{p}repetition_penalty"),
            s.repetition_penalty.unwrap_or(limits.sampling_defaults.repetition_penalty),
            limits::REPETITION_PENALTY,
        )?,
        seed: s.seed,
        presence_penalty: in_range(
            format!("{p}presence_penalty"),
            s.presence_penalty.unwrap_or(0.0),
            limits::PRESENCE_FREQUENCY_PENALTY,
        )?,
        frequency_penalty: in_range(
            format!("{p}frequency_penalty"),
            s.frequency_penalty.unwrap_or(0.0),
            limits::PRESENCE_FREQUENCY_PENALTY,
        )?,
    };
    let top = limits::MAX_TOP_LOGPROBS;
    if let Some(k) = raw.logprobs.filter(|&k| k as usize > top) {
        return Err(ServeError::invalid("top_logprobs", format!("must be between 0 and {top}, got {k}")));
    }
    let n = raw.n.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&n) {
        return Err(ServeError::invalid("n", format!("must be between 1 and {MAX_CHOICES}, got {n}")));
    }
    if raw.stop.len() > MAX_STOP_SEQUENCES {
        return Err(ServeError::invalid(
            "stop",
            format!("must hold at most {MAX_STOP_SEQUENCES} strings, got {}", raw.stop.len()),
        ));
    }
    for (i, st) in raw.stop.iter().enumerate() {
        if st.is_empty() || st.len() > MAX_STOP_BYTES {
            return Err(ServeError::invalid(
                format!("stop[{i}]"),
                format!("must be 1 to {MAX_STOP_BYTES} bytes long, got {} bytes", st.len()),
            ));
        }
    }
    Ok(ValidRequest {
        input,
        max_tokens,
        sampling,
        stop: raw.stop,
        ignore_eos: raw.ignore_eos,
        prefix_cache: !raw.skip_prefix_cache,
        logprobs: raw.logprobs.map(|k| k as usize),
        n: n as usize,
        response_format: raw.response_format,
    })
}

/// `tool_choice` as both APIs give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolChoice<'a> {
    /// Show the tools and read calls in the answer (the default).
    Auto,
    /// Show the tools, read nothing.
    None,
    /// Force one call of any tool.
    Required,
    /// Force one call of this tool.
    Named(&'a str),
}

/// `tools` and `tool_choice`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolsAsked {
    /// The tools as a JSON array text for the chat template (None when none are given).
    pub json: Option<String>,
    /// Read calls in the answer into `tool_calls` (tools given, any `tool_choice` but `none`).
    pub read_calls: bool,
    /// `required` or a named tool: the answer is forced into one call of these (name, parameters schema).
    pub forced: Option<Vec<(String, serde_json::Value)>>,
}

/// Function tools in OpenAI's shape (`[{"type": "function", "function": {"name", "parameters"}}]`) with `tool_choice`,
/// for both APIs: `field` names the tools in errors (`tools`, `tools_json`); `answer_constrained` says a
/// `response_format` already constrains the answer (a forced call would too: refused).
pub fn tools_asked(
    tools: &[serde_json::Value],
    choice: ToolChoice,
    field: &str,
    answer_constrained: bool,
) -> Result<ToolsAsked, ServeError> {
    if tools.is_empty() {
        return match choice {
            ToolChoice::Auto | ToolChoice::None => Ok(ToolsAsked { json: None, read_calls: false, forced: None }),
            c => Err(ServeError::invalid("tool_choice", format!("needs `{field}` to choose from, got {c:?}"))),
        };
    }
    let mut named = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let f = t.get("function");
        match (t.get("type").and_then(|v| v.as_str()), f.and_then(|f| f.get("name")).and_then(|v| v.as_str())) {
            (Some("function"), Some(name)) => {
                let params = f.and_then(|f| f.get("parameters")).cloned();
                named.push((name.to_string(), params.unwrap_or_else(|| serde_json::json!({"type": "object"}))));
            }
            _ => {
                return Err(ServeError::invalid(
                    format!("{field}[{i}]"),
                    format!("must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}, got {t}"),
                ))
            }
        }
    }
    let (read_calls, forced) = match choice {
        ToolChoice::Auto => (true, None),
        ToolChoice::None => (false, None),
        ToolChoice::Required => (true, Some(named)),
        ToolChoice::Named(name) => match named.into_iter().find(|(n, _)| n == name) {
            Some(tool) => (true, Some(vec![tool])),
            None => {
                return Err(ServeError::invalid(
                    "tool_choice",
                    format!("must be auto, none, required or name one of `{field}`, got {name:?}"),
                ))
            }
        },
    };
    if forced.is_some() && answer_constrained {
        return Err(ServeError::invalid(
            "tool_choice",
            "forces a call, and `response_format` constrains the answer too: give one of them",
        ));
    }
    let json = serde_json::Value::Array(tools.to_vec()).to_string();
    Ok(ToolsAsked { json: Some(json), read_calls, forced })
}

/// Checks the prompt's size in bytes before anything else touches it (tokenizing a huge prompt is itself work):
/// `prompt` when given, otherwise the sum of the chat messages' role and content lengths.
pub fn check_prompt_bytes(raw: &RawRequest, max_bytes: usize) -> Result<(), ServeError> {
    let (field, n) = match &raw.prompt {
        None if !raw.prompt_token_ids.is_empty() => ("prompt_token_ids", raw.prompt_token_ids.len() * 4),
        Some(p) => ("prompt", p.len()),
        None => ("messages", raw.messages.iter().map(|m| m.role.len() + m.content.len()).sum()),
    };
    if n > max_bytes {
        return Err(ServeError::invalid(
            field,
            format!("must be at most {max_bytes} bytes (--max-prompt-bytes), got {n} bytes"),
        ));
    }
    Ok(())
}

/// Checks a tokenized prompt against the context window: the prompt must leave room for `max_tokens`.
pub fn check_context(prompt_tokens: usize, max_tokens: u32, limits: &Limits) -> Result<(), ServeError> {
    let ctx = limits.max_context_tokens as usize;
    if prompt_tokens == 0 {
        return Err(ServeError::invalid("prompt", "must encode to at least 1 token, got 0"));
    }
    if prompt_tokens >= ctx {
        return Err(ServeError::invalid(
            "prompt",
            format!("must be shorter than the context of {ctx} tokens, got {prompt_tokens} tokens"),
        ));
    }
    let total = prompt_tokens + max_tokens as usize;
    if total > ctx {
        return Err(ServeError::invalid(
            "max_tokens",
            format!(
                "plus the prompt's {prompt_tokens} tokens must fit the context of {ctx} tokens: at most {}, got {max_tokens}",
                ctx - prompt_tokens
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_new_tokens: 100,
        default_max_tokens: 16,
        max_context_tokens: 64,
        sampling_defaults: SamplingDefaults::SERVER,
        request_timeout: None,
    };

    fn prompt(p: &str) -> RawRequest {
        RawRequest { prompt: Some(p.into()), sampling_prefix: "sampling.", ..Default::default() }
    }

    fn err(raw: RawRequest) -> String {
        match validate(raw, &LIMITS) {
            Err(ServeError::InvalidArgument { field, message }) => format!("{field}: {message}"),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_applied() {
        let v = validate(prompt("hi"), &LIMITS).expect("valid");
        assert_eq!(v.max_tokens, 16);
        assert_eq!(v.sampling.temperature, DEFAULT_TEMPERATURE);
        assert_eq!(
            (v.sampling.top_p, v.sampling.top_k, v.sampling.min_p, v.sampling.repetition_penalty),
            (1.0, 0, 0.0, 1.0)
        );
        assert_eq!(v.input, PromptInput::Text("hi".into()));
    }

    #[test]
    fn the_checkpoints_generation_config_sets_the_defaults_and_requests_still_win() {
        use r1_engine::text::GenerationConfig;
        // R1's release: temperature 0.6, top_p 0.95.
        let r1 = GenerationConfig { temperature: Some(0.6), top_p: Some(0.95), ..Default::default() };
        let limits = LIMITS.with_generation_config(&r1);
        let v = validate(prompt("hi"), &limits).expect("valid");
        assert_eq!((v.sampling.temperature, v.sampling.top_p), (0.6, 0.95));
        let mut raw = prompt("hi");
        raw.sampling.top_p = Some(0.5);
        raw.sampling.temperature = Some(0.0);
        let v = validate(raw, &limits).expect("valid");
        assert_eq!((v.sampling.temperature, v.sampling.top_p), (0.0, 0.5), "the request's own values win");
        // do_sample false: greedy by default.
        let greedy = GenerationConfig { do_sample: Some(false), temperature: Some(0.7), ..Default::default() };
        assert_eq!(LIMITS.with_generation_config(&greedy).sampling_defaults.temperature, 0.0);
        // A default outside the allowed range is left out; the server's stays.
        let bad = GenerationConfig { temperature: Some(7.0), top_p: Some(0.0), top_k: Some(40), ..Default::default() };
        let d = LIMITS.with_generation_config(&bad).sampling_defaults;
        assert_eq!((d.temperature, d.top_p, d.top_k), (DEFAULT_TEMPERATURE, 1.0, 40));
    }

    #[test]
    fn exactly_one_input() {
        let mut both = prompt("x");
        both.messages.push(ChatTurn::new("user", "y"));
        assert!(err(both).contains("both set"));
        assert!(err(RawRequest::default()).contains("both empty"));
        assert_eq!(err(prompt("")), "prompt: must not be empty, got an empty string");
        let bad_role = RawRequest { messages: vec![ChatTurn::new("robot", "y")], ..Default::default() };
        assert_eq!(err(bad_role), "messages[0].role: must be one of system, user, assistant, tool, got \"robot\"");
        let ids_and_text = RawRequest { prompt_token_ids: vec![1, 2], ..prompt("x") };
        assert!(err(ids_and_text).starts_with("prompt_token_ids: is set together with"));
        let ids = validate(RawRequest { prompt_token_ids: vec![1, 2], ..Default::default() }, &LIMITS).unwrap();
        assert_eq!(ids.input, PromptInput::Tokens(vec![1, 2]));
    }

    #[test]
    fn every_range_names_field_limit_value() {
        type Case = (Box<dyn Fn(&mut RawRequest)>, &'static str);
        let cases: Vec<Case> = vec![
            (Box::new(|r| r.max_tokens = Some(0)), "max_tokens: must be between 1 and 100, got 0"),
            (Box::new(|r| r.max_tokens = Some(101)), "max_tokens: must be between 1 and 100, got 101"),
            (Box::new(|r| r.sampling.temperature = Some(-0.5)), "sampling.temperature: must be in [0, 2], got -0.5"),
            (Box::new(|r| r.sampling.temperature = Some(f32::NAN)), "sampling.temperature: must be in [0, 2], got NaN"),
            (Box::new(|r| r.sampling.top_p = Some(0.0)), "sampling.top_p: must be in (0, 1], got 0"),
            (Box::new(|r| r.sampling.top_p = Some(1.5)), "sampling.top_p: must be in (0, 1], got 1.5"),
            (Box::new(|r| r.sampling.min_p = Some(1.0)), "sampling.min_p: must be in [0, 1), got 1"),
            (
                Box::new(|r| r.sampling.repetition_penalty = Some(0.0)),
                "sampling.repetition_penalty: must be in (0, 2], got 0",
            ),
            (Box::new(|r| r.stop = vec!["a".into(); 9]), "stop: must hold at most 8 strings, got 9"),
            (
                Box::new(|r| r.stop = vec!["a".into(), String::new()]),
                "stop[1]: must be 1 to 256 bytes long, got 0 bytes",
            ),
        ];
        for (mutate, want) in cases {
            let mut r = prompt("hi");
            mutate(&mut r);
            assert_eq!(err(r), want);
        }
    }

    #[test]
    fn prompt_bytes_are_checked_before_tokenization() {
        assert!(check_prompt_bytes(&prompt(&"a".repeat(10)), 10).is_ok());
        let e = check_prompt_bytes(&prompt(&"a".repeat(11)), 10).unwrap_err().to_string();
        assert_eq!(e, "`prompt` must be at most 10 bytes (--max-prompt-bytes), got 11 bytes");
        let chat = RawRequest {
            messages: vec![ChatTurn::new("user", "é".repeat(3)), ChatTurn::new("system", "x")],
            ..Default::default()
        };
        let e = check_prompt_bytes(&chat, 12).unwrap_err().to_string();
        assert_eq!(e, "`messages` must be at most 12 bytes (--max-prompt-bytes), got 17 bytes", "bytes, not chars");
        assert!(check_prompt_bytes(&chat, 17).is_ok());
    }

    #[test]
    fn context_checks() {
        assert!(check_context(10, 54, &LIMITS).is_ok());
        let e = check_context(64, 1, &LIMITS).unwrap_err().to_string();
        assert_eq!(e, "`prompt` must be shorter than the context of 64 tokens, got 64 tokens");
        let e = check_context(10, 55, &LIMITS).unwrap_err().to_string();
        assert!(e.contains("at most 54, got 55"), "{e}");
    }
}
