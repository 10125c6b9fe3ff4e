//! [`Model`] over `r1_engine`: the engine steps the batch and returns logits; per sequence this adapter samples
//! (`r1_engine::sampling::Sampler`, seeded), detokenizes incrementally, checks EOS/`max_tokens`/stop strings
//! (`StopChecker`, which holds back possible stop prefixes) and splits reasoning from answer (`ReasoningSplitter`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use r1_engine::sampling::grammar::{Constraint, GrammarError, Grammars};
use r1_engine::sampling::{logprobs, Sampler, StopChecker, StopParams};
use r1_engine::text::{ChatMessage, ChatTemplate, IncrementalDetokenizer, ReasoningSplitter, RenderOptions, Tokenizer};
use r1_engine::{
    BackendKind, BackendOptions, Engine, EngineOptions, ExecutionProviderKind, PoolOptions, SequenceId, StepWork,
};

use crate::model::{
    ChatTurn, Emitted, ErrorClass, Frontend, KvPoolStatus, Model, ModelDescription, ModelError, PromptInput,
    ResponseFormat, SeqId, SeqParams, TokenText, Work,
};

/// The environment variable that says how the in-place serving graph's decode steps run: `auto` (captured as CUDA
/// graphs on ONNX Runtime's CUDA provider, as shaped elsewhere), `shaped` (never captured: to rule CUDA graphs out
/// when diagnosing a GPU deployment) or `fixed` (the captured layout without capture).
pub const DECODE_STEPS_VAR: &str = "R1_DECODE_STEPS";

/// [`DECODE_STEPS_VAR`]'s value (unset or empty: `auto`).
fn decode_steps(value: Option<&str>) -> Result<r1_engine::backend::ort::DecodeSteps, r1_engine::EngineError> {
    switch(DECODE_STEPS_VAR, value, r1_engine::backend::ort::DecodeSteps::parse, "auto, shaped or fixed")
}

/// A diagnostic switch's value parsed by `parse` (unset or empty: the default); one it does not know is an error
/// naming the variable, the values it takes and the value given.
fn switch<T: Default>(
    var: &str,
    value: Option<&str>,
    parse: fn(&str) -> Option<T>,
    values: &str,
) -> Result<T, r1_engine::EngineError> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(T::default()),
        Some(v) => parse(v).ok_or_else(|| r1_engine::EngineError::InvalidArgument {
            name: var.into(),
            message: format!("must be {values}, got {v:?}"),
        }),
    }
}

/// The environment variable that says whether the portable graph's present stays on the device between decode steps
/// (TensorRT, or the CUDA provider without a serving graph: `ort_bound.rs`): `auto` (there, and nowhere else),
/// `always` (on the CPU provider too) or `never` (every step's present comes back to the host: to rule the binding
/// out when diagnosing a GPU deployment).
pub const BIND_PRESENT_VAR: &str = "R1_BIND_PRESENT";

/// [`BIND_PRESENT_VAR`]'s value (unset or empty: `auto`).
fn bind_present(value: Option<&str>) -> Result<r1_engine::backend::ort::PresentBinding, r1_engine::EngineError> {
    switch(BIND_PRESENT_VAR, value, r1_engine::backend::ort::PresentBinding::parse, "auto, always or never")
}

/// The engine's error as a model error, classed by whose fault it is.
fn engine_err(e: r1_engine::EngineError) -> ModelError {
    use r1_engine::EngineError as E;
    let class = match &e {
        E::InvalidArgument { .. } => ErrorClass::InvalidArgument,
        E::Text(t) if t.is_invalid_input() => ErrorClass::InvalidArgument,
        E::Sampling(r1_engine::sampling::SamplingError::InvalidParam { .. }) => ErrorClass::InvalidArgument,
        E::KvBudget { .. } => ErrorClass::ResourceExhausted,
        E::Unavailable { .. } => ErrorClass::Unavailable,
        _ => ErrorClass::Internal,
    };
    ModelError::new(class, e.kind(), e.to_string())
}

fn text_err(e: r1_engine::text::TextError) -> ModelError {
    engine_err(e.into())
}

/// Verifies the artifact's files against the sizes and sha256 sums in its `manifest.json` (unless `skip`, which is
/// logged as a warning) and logs how long it took. A mismatch is a `ModelError` of kind `integrity` naming the file,
/// the expected and the actual value.
pub fn verify_artifact(dir: &Path, skip: bool) -> Result<(), ModelError> {
    if skip {
        tracing::warn!(dir = %dir.display(), "artifact integrity check SKIPPED (--skip-integrity-check): files not verified against manifest.json");
        return Ok(());
    }
    let t0 = std::time::Instant::now();
    let manifest = r1_engine::Manifest::load(dir).map_err(engine_err)?;
    let report = manifest
        .verify_files(dir)
        .map_err(|e| ModelError::internal("integrity", format!("artifact {} refused: {e}", dir.display())))?;
    let secs = t0.elapsed().as_secs_f64();
    tracing::info!(
        files = report.files,
        bytes = report.bytes,
        ms = (secs * 1e3) as u64,
        mib_per_s = (report.bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)) as u64,
        "artifact verified against the sha256 sums in manifest.json"
    );
    if !report.unlisted.is_empty() {
        tracing::warn!(files = ?report.unlisted, "files in the artifact directory that manifest.json does not list (not verified)");
    }
    Ok(())
}

/// Tokenizer and chat template of an artifact.
pub struct EngineText {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    /// The vocabulary as the grammar engine sees it, built on the first `response_format` request (about a second
    /// for R1's 129k tokens, so a server that never sees one never pays it).
    grammars: OnceLock<Result<Grammars, GrammarError>>,
    /// The id of `<think>`, when the vocabulary has it as one token.
    think_token: Option<u32>,
}

impl EngineText {
    /// Loads `tokenizer.json` and the configs from an artifact directory.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let tokenizer = Tokenizer::from_dir(dir).map_err(text_err)?;
        // No template is fine (`prompt` still works); a template that does not compile is an artifact error, said at
        // load instead of being reported later as absent.
        let template = match ChatTemplate::from_config(tokenizer.config(), None, false) {
            Ok(t) => Some(t),
            Err(r1_engine::text::TextError::NoChatTemplate { .. }) => None,
            Err(e) => return Err(text_err(e)),
        };
        let think_token = tokenizer.token_to_id(r1_engine::text::THINK_START);
        Ok(EngineText { tokenizer, template, grammars: OnceLock::new(), think_token })
    }

    /// A constraint enforcing `format`; a schema that does not compile is the caller's error, naming the field.
    pub fn constraint(&self, format: &ResponseFormat) -> Result<Constraint, ModelError> {
        let grammars = self.grammars.get_or_init(|| {
            let eos = self.tokenizer.eos_token_ids().first().copied().unwrap_or(0);
            Grammars::new(&self.tokenizer, self.tokenizer.vocab_size(), eos)
        });
        let grammars = grammars.as_ref().map_err(|e| ModelError::internal("grammar", e.to_string()))?;
        let constraint = match format {
            ResponseFormat::JsonObject => grammars.json(None),
            ResponseFormat::JsonSchema(s) => grammars.json(Some(s)),
            ResponseFormat::ToolCall(tools) => grammars.tool_call(tools),
        };
        constraint.map_err(|e| match e {
            GrammarError::Schema(_) => ModelError::invalid("response_format", e.to_string()),
            other => ModelError::internal("grammar", other.to_string()),
        })
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

impl Frontend for EngineText {
    fn encode(&self, input: &PromptInput) -> Result<Vec<u32>, ModelError> {
        match input {
            PromptInput::Text(t) => self.tokenizer.encode(t, true).map_err(text_err),
            PromptInput::Chat(turns, tools) => {
                let template = self.template.as_ref().ok_or_else(|| {
                    ModelError::invalid(
                        "no_chat_template",
                        "`messages` needs a chat template and this artifact has none; send `prompt`",
                    )
                })?;
                let tools: Option<Vec<serde_json::Value>> = match tools {
                    Some(_) if !template.renders_tools() => {
                        return Err(ModelError::invalid(
                            "tools",
                            "cannot be shown to this model: its chat template does not render `tools` (DeepSeek-R1's released template renders earlier tool calls and outputs only; R1-0528's renders tools); describe them in a system message instead",
                        ))
                    }
                    Some(t) => Some(serde_json::from_str(t).map_err(|e| ModelError::invalid("tools", e.to_string()))?),
                    None => None,
                };
                let msgs: Vec<ChatMessage> = turns.iter().map(chat_message).collect();
                let opts = RenderOptions { add_generation_prompt: true, tools, ..Default::default() };
                let rendered = template.render(&msgs, &opts).map_err(text_err)?;
                // The template writes the BOS token itself.
                self.tokenizer.encode(&rendered, false).map_err(text_err)
            }
            PromptInput::Tokens(ids) => {
                self.tokenizer.check_ids(ids).map_err(|e| ModelError::invalid("prompt_token_ids", e.to_string()))?;
                Ok(ids.clone())
            }
        }
    }

    fn check_response_format(&self, format: &ResponseFormat) -> Result<(), ModelError> {
        self.constraint(format).map(|_| ())
    }

    fn token_text(&self, id: u32) -> TokenText {
        let bytes = self.tokenizer.token_bytes(id).unwrap_or_default();
        TokenText { text: String::from_utf8_lossy(&bytes).into_owned(), bytes }
    }
}

/// A turn as the chat template reads it: an assistant turn's tool calls in the OpenAI shape (`{id, type,
/// function: {name, arguments}}`). Its text stays a string even when empty: the renderer drops keys whose value is
/// none, and R1's template then adds the missing text to a string (`'' +` renders what its `is none` branch would).
fn chat_message(t: &ChatTurn) -> ChatMessage {
    let mut m = ChatMessage::new(t.role.clone(), t.content.clone());
    if !t.tool_calls.is_empty() {
        m.tool_calls = Some(
            t.tool_calls
                .iter()
                .map(|c| serde_json::json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                .collect(),
        );
    }
    m.tool_call_id = t.tool_call_id.clone();
    m
}

struct Seq {
    id: SequenceId,
    sampler: Sampler,
    stop: StopChecker,
    detok: IncrementalDetokenizer,
    split: ReasoningSplitter,
    context: Vec<u32>,
    logprobs: Option<usize>,
    /// The answer's grammar (`response_format`); applied once the reasoning has ended.
    constraint: Option<Constraint>,
}

/// The real model: an [`Engine`] plus per-sequence sampling and text state.
pub struct EngineModel {
    engine: Engine,
    text: Arc<EngineText>,
    seqs: HashMap<SeqId, Seq>,
    next: u64,
}

impl std::fmt::Debug for EngineModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineModel").field("engine", &self.engine).field("sequences", &self.seqs.len()).finish()
    }
}

impl EngineModel {
    /// Opens an artifact directory with `backend` (`auto`, `ort`, `tract`) on `execution_provider` (ort), an
    /// optional KV budget in bytes and the KV pool's slots and block size.
    pub fn load(
        dir: &Path,
        backend: &str,
        execution_provider: ExecutionProviderKind,
        kv_budget_bytes: Option<u64>,
        pool: PoolOptions,
    ) -> Result<Self, ModelError> {
        let kind: BackendKind = backend.parse().map_err(engine_err)?;
        let decode_steps = decode_steps(std::env::var(DECODE_STEPS_VAR).ok().as_deref()).map_err(engine_err)?;
        let bind_present = bind_present(std::env::var(BIND_PRESENT_VAR).ok().as_deref()).map_err(engine_err)?;
        let backend_options = BackendOptions { execution_provider, decode_steps, bind_present, ..Default::default() };
        let opts = EngineOptions { backend: kind, backend_options, kv_budget_bytes, pool };
        let engine = Engine::load(dir, &opts).map_err(engine_err)?;
        let text = Arc::new(EngineText::load(dir)?);
        Ok(EngineModel { engine, text, seqs: HashMap::new(), next: 0 })
    }

    fn bytes_per_token(&self) -> u64 {
        self.engine.kv_budget().bytes_per_token().max(1)
    }
}

/// Draws a sequence's next token from its logits row. With a `response_format` (or a forced tool call), the answer's
/// grammar masks the row outside the reasoning (R1 thinks freely first, but may not end before the answer: EOS is
/// masked there); before the output has shown whether it opens a reasoning part, the token that opens one (`think`)
/// is allowed beside the grammar's, and is not fed to the grammar.
fn draw(s: &mut Seq, logits: &[f32], think: Option<u32>, eos: &[u32]) -> Result<u32, ModelError> {
    let sample_err = |e: r1_engine::sampling::SamplingError| engine_err(e.into());
    let Some(c) = s.constraint.as_mut() else {
        return s.sampler.sample(logits, &s.context).map_err(sample_err);
    };
    if s.split.in_reasoning() {
        let mut row = logits.to_vec();
        for &e in eos {
            if let Some(l) = row.get_mut(e as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        return s.sampler.sample(&row, &s.context).map_err(sample_err);
    }
    let grammar_err = |e: GrammarError| ModelError::internal("grammar", e.to_string());
    let opener = if s.split.is_undecided() { think } else { None };
    let mut row = logits.to_vec();
    c.mask(&mut row, opener).map_err(grammar_err)?;
    let t = s.sampler.sample(&row, &s.context).map_err(sample_err)?;
    if !c.is_complete() && Some(t) != opener {
        c.accept(t).map_err(grammar_err)?;
    }
    Ok(t)
}

impl Model for EngineModel {
    fn describe(&self) -> ModelDescription {
        let m = self.engine.manifest();
        ModelDescription {
            family: m.family.to_string(),
            precision: m.precision.to_string(),
            backend: self.engine.backend_name().to_string(),
            max_context_tokens: self.engine.context_tokens(),
            vocab_size: m.model.vocab_size,
            batch_profiles: Vec::new(),
            kv_capacity_tokens: self.engine.kv_budget().capacity_tokens(),
            eos_token_ids: self.text.tokenizer().eos_token_ids().to_vec(),
            generation: self.text.tokenizer().generation_config().clone(),
        }
    }

    fn frontend(&self) -> Arc<dyn Frontend> {
        self.text.clone()
    }

    fn can_admit(&self, prompt_tokens: usize, max_tokens: usize) -> bool {
        self.engine.can_admit(prompt_tokens, max_tokens)
    }

    fn add_sequence(&mut self, prompt: &[u32], params: &SeqParams) -> Result<SeqId, ModelError> {
        let sampler = Sampler::new(params.sampling).map_err(|e| engine_err(e.into()))?;
        let constraint = params.response_format.as_ref().map(|f| self.text.constraint(f)).transpose()?;
        let tok = self.text.tokenizer();
        let stop = StopChecker::new(StopParams {
            max_tokens: params.max_tokens.min(u32::MAX as usize) as u32,
            stop: params.stop.clone(),
            eos_token_ids: tok.eos_token_ids().to_vec(),
            ignore_eos: params.ignore_eos,
        });
        // Does the rendered prompt already open the reasoning (R1 templates end with `<think>\n`)?
        let tail = tok.decode(&prompt[prompt.len().saturating_sub(4)..], false).unwrap_or_default();
        let split = ReasoningSplitter::new(r1_engine::text::prompt_opens_reasoning(&tail));
        let id = self.engine.add_sequence_with(prompt, params.max_tokens, params.prefix).map_err(engine_err)?;
        let handle = SeqId(self.next);
        self.next += 1;
        let detok = IncrementalDetokenizer::with_context(prompt, true);
        let logprobs = params.logprobs;
        let seq = Seq { id, sampler, stop, detok, split, context: prompt.to_vec(), logprobs, constraint };
        self.seqs.insert(handle, seq);
        Ok(handle)
    }

    fn remove_sequence(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.engine.remove_sequence(s.id);
        }
    }

    fn step(&mut self, work: &[Work], _pad_to: usize) -> Result<Vec<Emitted>, ModelError> {
        let mut by_engine_id = HashMap::with_capacity(work.len());
        let mut engine_work = Vec::with_capacity(work.len());
        for w in work {
            let s = self
                .seqs
                .get(&w.seq)
                .ok_or_else(|| ModelError::internal("not_found", format!("unknown sequence {}", w.seq.0)))?;
            by_engine_id.insert(s.id, w.seq);
            engine_work.push(StepWork::chunk(s.id, w.tokens));
        }
        let results = self.engine.step(&engine_work).map_err(engine_err)?;
        let tok = self.text.tokenizer();
        let mut out = Vec::with_capacity(results.len());
        for r in results {
            let Some(&handle) = by_engine_id.get(&r.seq) else { continue };
            let Some(s) = self.seqs.get_mut(&handle) else { continue };
            let token = draw(s, &r.logits, self.text.think_token, tok.eos_token_ids())?;
            let logprobs = match s.logprobs {
                Some(top) => Some(logprobs(&r.logits, token, top).map_err(|e| engine_err(e.into()))?),
                None => None,
            };
            s.context.push(token);
            let delta = s.detok.push(tok, token).map_err(text_err)?;
            let mut released = s.stop.push(token, &delta);
            let finish = released.finish;
            let mut parts = s.split.push(&released.text);
            if finish.is_some() {
                released.text = s.detok.finish(tok).map_err(text_err)?;
                let tail = s.split.push(&released.text);
                let end = s.split.finish();
                parts.reasoning.push_str(&tail.reasoning);
                parts.reasoning.push_str(&end.reasoning);
                parts.content.push_str(&tail.content);
                parts.content.push_str(&end.content);
            } else {
                self.engine.push_token(s.id, token).map_err(engine_err)?;
            }
            out.push(Emitted { seq: handle, token, text: parts.content, reasoning: parts.reasoning, finish, logprobs });
        }
        Ok(out)
    }

    fn kv_used_tokens(&self) -> usize {
        (self.engine.kv_budget().reserved_bytes() / self.bytes_per_token()) as usize
    }

    fn kv_pool_status(&self) -> KvPoolStatus {
        let s = self.engine.pool_stats();
        KvPoolStatus {
            preemptions: s.preemptions,
            recomputed_tokens: s.recomputed_tokens,
            slots_used: self.engine.kv_pool().used_slots(),
            prefix_cached_tokens: s.prefix_cached_tokens,
            prefix_missed_tokens: s.prefix_missed_tokens,
            prefix_evictions: s.prefix_evictions,
            prefix_retained: self.engine.retained_sequences(),
            blocks_running: self.engine.kv_budget().used_blocks() - self.engine.retained_blocks(),
            blocks_retained: self.engine.retained_blocks(),
            blocks_free: self.engine.kv_budget().free_blocks(),
        }
    }

    fn cached_prompt_tokens(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).and_then(|s| self.engine.prefix_tokens(s.id).ok()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use r1_engine::EngineError;

    #[test]
    fn decode_steps_come_from_the_environment_value_and_a_bad_one_is_named() {
        use r1_engine::backend::ort::DecodeSteps;
        assert_eq!(decode_steps(None).unwrap(), DecodeSteps::Auto);
        assert_eq!(decode_steps(Some(" ")).unwrap(), DecodeSteps::Auto);
        assert_eq!(decode_steps(Some("shaped")).unwrap(), DecodeSteps::Shaped);
        assert_eq!(decode_steps(Some("FIXED")).unwrap(), DecodeSteps::Fixed);
        let e = decode_steps(Some("graphs")).unwrap_err().to_string();
        assert!(e.contains(DECODE_STEPS_VAR) && e.contains("auto, shaped or fixed") && e.contains("graphs"), "{e}");
    }

    #[test]
    fn the_present_binding_comes_from_the_environment_value_and_a_bad_one_is_named() {
        use r1_engine::backend::ort::PresentBinding;
        assert_eq!(bind_present(None).unwrap(), PresentBinding::Auto);
        assert_eq!(bind_present(Some("")).unwrap(), PresentBinding::Auto);
        assert_eq!(bind_present(Some("never")).unwrap(), PresentBinding::Never);
        assert_eq!(bind_present(Some("ALWAYS")).unwrap(), PresentBinding::Always);
        let e = bind_present(Some("gpu")).unwrap_err().to_string();
        assert!(e.contains(BIND_PRESENT_VAR) && e.contains("auto, always or never") && e.contains("gpu"), "{e}");
    }

    #[test]
    fn engine_errors_are_classed_by_whose_fault_they_are() {
        let class = |e: EngineError| engine_err(e).class;
        let invalid = EngineError::InvalidArgument { name: "max_tokens".into(), message: "got 0".into() };
        assert_eq!(class(invalid), ErrorClass::InvalidArgument);
        assert_eq!(class(r1_engine::text::TextError::EmptyConversation.into()), ErrorClass::InvalidArgument);
        let param = r1_engine::sampling::SamplingError::InvalidParam {
            field: "top_p",
            allowed: "(0, 1]".into(),
            value: "2".into(),
        };
        assert_eq!(class(param.into()), ErrorClass::InvalidArgument);
        let garbage = r1_engine::sampling::SamplingError::BadLogits { len: 3, problem: "NaN at 0".into() };
        assert_eq!(class(garbage.into()), ErrorClass::Internal, "NaN logits are the model's fault");
        let missing = EngineError::Unavailable { what: "ONNX Runtime".into(), message: "not found".into() };
        assert_eq!(class(missing), ErrorClass::Unavailable);
        assert_eq!(class(EngineError::Backend { backend: "ort", message: "x".into() }), ErrorClass::Internal);
    }
}
