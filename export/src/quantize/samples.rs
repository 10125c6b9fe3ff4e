//! Calibration samples as token ids: read ([`r1_calibration::dataset`]), rendered with the checkpoint's chat
//! template, tokenized as serving tokenizes, and — for open samples (a prompt without its reply) — continued by the
//! fp32 model itself through the engine, so that calibration observes the activations of generated tokens: the
//! `<think>` block and the answer, which a prompt alone never shows.
//!
//! Generation is greedy (deterministic, and the activations of R1's recommended sampling at temperature 0.6 are
//! those of the same distribution's mode), batched like `r1-eval`, and stops at an EOS token, at
//! `--calibration-generate-tokens` or when the sample reaches `--calibration-seq-len`, whichever comes first.
use std::path::Path;

use r1_calibration::dataset::{self, Message as DataMessage};
use r1_calibration::report::TokenSources;
use r1_calibration::CalibError;
use r1_engine::generate::argmax;
use r1_engine::text::{ChatMessage, ChatTemplate, RenderOptions, Tokenizer};
use r1_engine::{Engine, EngineOptions};

use super::{calib_input, QuantProgress, QuantizeOptions};
use crate::error::Result;

/// Default of `--calibration-generate-tokens`: fill each open sample up to the default sample length. Measured on
/// arith-r1 (BENCHMARKS.md): replies end well before it, and a shorter cap that cuts the reply before its answer
/// leaves the answer's activations unobserved.
pub const DEFAULT_GENERATE_TOKENS: usize = dataset::DEFAULT_SEQ_LEN;

/// Open samples continued together in one engine batch, and prompt tokens per prefill chunk (`r1-eval`'s).
const GENERATE_BATCH: usize = 16;
const PREFILL_CHUNK: usize = 512;

/// Token ids of the calibration and held-out samples, and where their tokens came from.
pub(super) struct Samples {
    pub calibration: Vec<Vec<u32>>,
    pub held_out: Vec<Vec<u32>>,
    pub sources: TokenSources,
}

/// A tokenized sample: ids (≤ `seq_len`) and whether its reply is still to be generated.
struct Tokenized {
    ids: Vec<u32>,
    open: bool,
}

/// Reads, renders and tokenizes the samples in `path`; continues the open ones with the fp32 artifact in
/// `fp32_dir` (unless `q.generate_tokens` is 0). Held-out samples come after the calibration samples in the file
/// and are continued too (the report compares the graphs on what serving sees); a file with a single sample uses
/// it for both.
pub(super) fn read(
    path: &Path,
    q: &QuantizeOptions,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    fp32_dir: &Path,
    progress: &mut dyn FnMut(QuantProgress<'_>),
) -> Result<Samples> {
    let mut samples = tokenize(path, q, tokenizer, template)?;
    let given = samples.iter().map(|s| s.ids.len()).sum();
    let open_samples = samples.iter().filter(|s| s.open && s.ids.len() < q.seq_len).count();
    let generated = if q.generate_tokens > 0 && open_samples > 0 {
        continue_open(&mut samples, q, tokenizer, fp32_dir, progress)?
    } else {
        0
    };
    let sources = TokenSources { given, generated, open_samples, generate_tokens: q.generate_tokens };
    let mut calibration: Vec<Vec<u32>> = samples.into_iter().map(|s| s.ids).collect();
    let n = calibration.len();
    let held_out = match (q.eval_samples, n) {
        (0, _) => Vec::new(),
        (_, 1) => calibration.clone(),
        (e, n) => calibration.split_off(n - n.saturating_sub(q.samples).max(1).min(e)),
    };
    calibration.truncate(q.samples);
    Ok(Samples { calibration, held_out, sources })
}

fn tokenize(
    path: &Path,
    q: &QuantizeOptions,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<Vec<Tokenized>> {
    let render = |messages: &[DataMessage], generation_prompt: bool| -> r1_calibration::Result<String> {
        let t = template.ok_or_else(|| {
            CalibError::Source(
                "JSONL `messages` need a chat template, and the checkpoint's tokenizer_config.json has none".into(),
            )
        })?;
        let msgs: Vec<ChatMessage> =
            messages.iter().map(|m| ChatMessage::new(m.role.clone(), m.content.clone())).collect();
        let opts = RenderOptions { add_generation_prompt: generation_prompt, ..Default::default() };
        t.render(&msgs, &opts).map_err(|e| CalibError::Source(format!("rendering the chat template: {e}")))
    };
    let samples = dataset::load_samples(path, q.samples.saturating_add(q.eval_samples), &render)?;
    let mut out = Vec::with_capacity(samples.len());
    for (i, s) in samples.iter().enumerate() {
        // BOS is added unless the text (e.g. a rendered template) already starts with it.
        let mut ids = tokenizer
            .encode(&s.text, true)
            .map_err(|e| calib_input(format!("{}: sample {}: cannot tokenize: {e}", path.display(), i + 1)))?;
        ids.truncate(q.seq_len);
        if !ids.is_empty() {
            out.push(Tokenized { ids, open: s.open });
        }
    }
    if out.is_empty() {
        return Err(calib_input(format!("{}: no sample produced any token", path.display())));
    }
    Ok(out)
}

/// Appends the fp32 model's greedy reply to every open sample shorter than `seq_len`; returns the tokens added.
fn continue_open(
    samples: &mut [Tokenized],
    q: &QuantizeOptions,
    tokenizer: &Tokenizer,
    fp32_dir: &Path,
    progress: &mut dyn FnMut(QuantProgress<'_>),
) -> Result<usize> {
    let mut open: Vec<&mut Tokenized> = samples.iter_mut().filter(|s| s.open && s.ids.len() < q.seq_len).collect();
    // Batches of similar lengths: a batch generates up to what its longest prompt leaves of the sample length.
    open.sort_by_key(|s| s.ids.len());
    progress(QuantProgress::Generating { samples: open.len() });
    let mut engine = Engine::load(fp32_dir, &EngineOptions { backend: q.backend, ..Default::default() })?;
    let room = q.seq_len.min(engine.context_tokens());
    let stop = tokenizer.eos_token_ids().to_vec();
    let (mut done, mut added) = (0, 0);
    for chunk in open.chunks_mut(GENERATE_BATCH) {
        let longest = chunk.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        let max_new = q.generate_tokens.min(room.saturating_sub(longest));
        done += chunk.len();
        if max_new == 0 {
            progress(QuantProgress::Generated { done });
            continue;
        }
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|s| s.ids.clone()).collect();
        let replies =
            engine.generate_batch_with(&prompts, max_new, &stop, PREFILL_CHUNK, |logits| Ok(argmax(logits)))?;
        for (s, mut reply) in chunk.iter_mut().zip(replies) {
            // The stop token itself is never an input when serving: leave it out.
            if reply.last().is_some_and(|t| stop.contains(t)) {
                reply.pop();
            }
            reply.truncate(q.seq_len - s.ids.len());
            added += reply.len();
            s.ids.extend(reply);
        }
        progress(QuantProgress::Generated { done });
    }
    Ok(added)
}
