//! Held-out evaluation: run a JSONL set of chat problems through an [`Engine`] with greedy decoding
//! and score the final answers.
//!
//! Each line of the data file is one problem, `{"messages": [{"role": "user", "content": "..."}],
//! "answer": "85"}`. A problem is rendered with the artifact's chat template
//! (`add_generation_prompt = true`) and tokenized without adding special tokens, exactly as the
//! server does for `messages`; then problems are generated greedily in batches through
//! [`Engine::generate_batch_with`], stopping on the EOS ids of `generation_config.json`. The answer
//! is the decoded text after the last `</think>`, trimmed; a problem is correct when it equals the
//! expected answer exactly. The `r1-eval` binary is a thin CLI over [`evaluate`]; the INT8 quality
//! report reuses the same function so that both measure the same thing.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::engine::Engine;
use crate::generate::argmax;
use crate::text::{ChatMessage, ChatTemplate, RenderOptions, Tokenizer, THINK_END};
use crate::EngineError;

/// Errors of the evaluation: reading the data set, or the engine failing on a problem.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The data file could not be read.
    #[error("cannot read evaluation data {path}: {source}")]
    Io {
        /// The data file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// One line of the data file is not a valid problem.
    #[error("{path}:{line}: invalid problem: {message}")]
    Problem {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The data file holds no problems (after `limit`).
    #[error("{path}: no problems to evaluate (empty file or --limit 0)")]
    Empty {
        /// The data file.
        path: PathBuf,
    },
    /// An evaluation option is out of range.
    #[error("invalid evaluation option `{name}`: {message}")]
    InvalidOption {
        /// Option name.
        name: &'static str,
        /// Limit and value given.
        message: String,
    },
    /// The artifact has no chat template, so `messages` cannot be rendered.
    #[error("the artifact's tokenizer_config.json has no chat template; evaluation needs one to render `messages`")]
    NoChatTemplate,
    /// Rendering, tokenizing or generating one problem failed.
    #[error("problem at line {line} ({question:?}): {source}")]
    Engine {
        /// 1-based line number of the problem in the data file.
        line: usize,
        /// The last user message, to find the problem.
        question: String,
        /// The engine error.
        #[source]
        source: EngineError,
    },
}

impl EvalError {
    /// Stable, low-cardinality label.
    pub fn kind(&self) -> &'static str {
        match self {
            EvalError::Io { .. } => "io",
            EvalError::Problem { .. } => "invalid_problem",
            EvalError::Empty { .. } => "empty",
            EvalError::InvalidOption { .. } => "invalid_argument",
            EvalError::NoChatTemplate => "no_chat_template",
            EvalError::Engine { source, .. } => source.kind(),
        }
    }
}

/// One problem of a held-out set.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// 1-based line number in the data file.
    pub line: usize,
    /// The conversation to render (usually one user message).
    pub messages: Vec<ChatMessage>,
    /// Expected final answer text.
    pub answer: String,
}

impl Problem {
    /// Content of the last user message (for reports and error messages).
    pub fn question(&self) -> String {
        self.messages.iter().rev().find(|m| m.role == "user").and_then(|m| m.content.clone()).unwrap_or_default()
    }
}

#[derive(serde::Deserialize)]
struct RawProblem {
    messages: Vec<ChatMessage>,
    answer: serde_json::Value,
}

/// Parses a JSONL held-out set. Blank lines are skipped; `answer` may be a string or a number.
/// `source` names the file in error messages.
pub fn parse_problems(text: &str, source: &Path) -> Result<Vec<Problem>, EvalError> {
    let mut out = Vec::new();
    for (i, raw_line) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw_line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let err = |message: String| EvalError::Problem { path: source.to_path_buf(), line, message };
        let raw: RawProblem = serde_json::from_str(trimmed).map_err(|e| {
            err(format!("{e} (expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}], \"answer\": ...}})"))
        })?;
        if raw.messages.is_empty() {
            return Err(err("`messages` is empty; it needs at least one message".into()));
        }
        let answer = match raw.answer {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            other => return Err(err(format!("`answer` must be a string or a number, got {other}"))),
        };
        out.push(Problem { line, messages: raw.messages, answer: answer.trim().to_string() });
    }
    Ok(out)
}

/// Reads and parses a JSONL held-out set (see [`parse_problems`]).
pub fn load_problems(path: &Path) -> Result<Vec<Problem>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io { path: path.to_path_buf(), source })?;
    parse_problems(&text, path)
}

/// The final answer of a completion: the text after the last `</think>`, trimmed. A completion
/// without `</think>` (reasoning never closed) yields its whole text trimmed.
pub fn extract_answer(completion: &str) -> &str {
    match completion.rfind(THINK_END) {
        Some(at) => completion[at + THINK_END.len()..].trim(),
        None => completion.trim(),
    }
}

/// How to run an evaluation.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Problems generated together in one batch (≥ 1).
    pub batch: usize,
    /// Maximum new tokens per problem (≥ 1).
    pub max_new_tokens: usize,
    /// Prompt tokens fed per sequence per step while prefilling (≥ 1).
    pub prefill_chunk: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { batch: 16, max_new_tokens: 64, prefill_chunk: 512 }
    }
}

/// Outcome of one problem.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProblemResult {
    /// 1-based line number in the data file.
    pub line: usize,
    /// The last user message.
    pub question: String,
    /// Expected answer.
    pub expected: String,
    /// Extracted answer (text after `</think>`, trimmed).
    pub got: String,
    /// Whether `got == expected`.
    pub correct: bool,
    /// The whole completion text (stop token not included, special tokens kept).
    pub completion: String,
    /// Prompt token ids (as rendered by the chat template).
    pub prompt_token_ids: Vec<u32>,
    /// Generated token ids, the stop token included when one was generated.
    pub completion_token_ids: Vec<u32>,
    /// Whether generation ended on an EOS id (rather than on `max_new_tokens`).
    pub finished_by_eos: bool,
}

/// Result of an evaluation run.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Backend name (`ort-cpu`, `tract`, ...).
    pub backend: String,
    /// Number of correct answers.
    pub correct: usize,
    /// Number of problems evaluated.
    pub total: usize,
    /// Wall time of rendering + generation, seconds.
    pub seconds: f64,
    /// Generated tokens in all (stop tokens included).
    pub generated_tokens: usize,
    /// Per-problem outcomes, in data-file order.
    pub results: Vec<ProblemResult>,
}

impl EvalReport {
    /// Fraction correct in `[0, 1]` (0 for an empty report).
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }

    /// One line: `accuracy 483/500 = 96.6% (backend ort-cpu, 12.3 s)`.
    pub fn summary(&self) -> String {
        format!(
            "accuracy {}/{} = {:.1}% (backend {}, {:.1} s)",
            self.correct,
            self.total,
            100.0 * self.accuracy(),
            self.backend,
            self.seconds
        )
    }
}

/// Renders a conversation with the chat template (`add_generation_prompt = true`) and tokenizes it
/// without adding special tokens (the template writes BOS itself), as the server does.
pub fn encode_chat(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[ChatMessage],
) -> Result<Vec<u32>, EngineError> {
    let opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
    let rendered = template.render(messages, &opts)?;
    Ok(tokenizer.encode(&rendered, false)?)
}

/// Runs `problems` through `engine` greedily in batches of `opts.batch` and scores them.
/// `progress(done, total, correct_so_far)` is called after each batch.
pub fn evaluate(
    engine: &mut Engine,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    problems: &[Problem],
    opts: &EvalOptions,
    progress: &mut dyn FnMut(usize, usize, usize),
) -> Result<EvalReport, EvalError> {
    if opts.batch == 0 {
        return Err(EvalError::InvalidOption { name: "batch", message: "must be at least 1, got 0".into() });
    }
    if opts.max_new_tokens == 0 {
        return Err(EvalError::InvalidOption { name: "max_new_tokens", message: "must be at least 1, got 0".into() });
    }
    let stop_ids = tokenizer.eos_token_ids().to_vec();
    let started = Instant::now();
    let mut results = Vec::with_capacity(problems.len());
    let mut correct = 0usize;
    let mut generated_tokens = 0usize;
    for chunk in problems.chunks(opts.batch) {
        let engine_err =
            |p: &Problem, source: EngineError| EvalError::Engine { line: p.line, question: p.question(), source };
        let mut prompts = Vec::with_capacity(chunk.len());
        for p in chunk {
            prompts.push(encode_chat(tokenizer, template, &p.messages).map_err(|e| engine_err(p, e))?);
        }
        let outputs = engine
            .generate_batch_with(&prompts, opts.max_new_tokens, &stop_ids, opts.prefill_chunk, |l| Ok(argmax(l)))
            .map_err(|e| engine_err(&chunk[0], e))?;
        for ((p, prompt), ids) in chunk.iter().zip(prompts).zip(outputs) {
            let finished_by_eos = ids.last().is_some_and(|t| stop_ids.contains(t));
            let text_ids = if finished_by_eos { &ids[..ids.len() - 1] } else { &ids[..] };
            let completion = tokenizer.decode(text_ids, false).map_err(|e| engine_err(p, e.into()))?;
            let got = extract_answer(&completion).to_string();
            let ok = got == p.answer;
            correct += usize::from(ok);
            generated_tokens += ids.len();
            results.push(ProblemResult {
                line: p.line,
                question: p.question(),
                expected: p.answer.clone(),
                got,
                correct: ok,
                completion,
                prompt_token_ids: prompt,
                completion_token_ids: ids,
                finished_by_eos,
            });
        }
        progress(results.len(), problems.len(), correct);
    }
    Ok(EvalReport {
        backend: engine.backend_name().to_string(),
        correct,
        total: results.len(),
        seconds: started.elapsed().as_secs_f64(),
        generated_tokens,
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_problems_and_skips_blank_lines() {
        let text = "{\"messages\":[{\"role\":\"user\",\"content\":\"What is 1+2?\"}],\"answer\":\"3\"}\n\n\
                    {\"messages\":[{\"role\":\"user\",\"content\":\"9-4=\"}],\"answer\":5}\n";
        let p = parse_problems(text, Path::new("d.jsonl")).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].line, p[0].answer.as_str(), p[0].question()), (1, "3", "What is 1+2?".to_string()));
        assert_eq!((p[1].line, p[1].answer.as_str()), (3, "5"));
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let text = "{\"messages\":[{\"role\":\"user\",\"content\":\"a\"}],\"answer\":\"1\"}\nnot json\n";
        let e = parse_problems(text, Path::new("set.jsonl")).unwrap_err();
        assert!(e.to_string().starts_with("set.jsonl:2: invalid problem"), "{e}");
        let e = parse_problems("{\"messages\":[],\"answer\":\"1\"}", Path::new("s.jsonl")).unwrap_err();
        assert!(e.to_string().contains("s.jsonl:1") && e.to_string().contains("`messages` is empty"), "{e}");
        let e = parse_problems(
            "{\"messages\":[{\"role\":\"user\",\"content\":\"a\"}],\"answer\":null}",
            Path::new("s.jsonl"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("`answer` must be a string or a number, got null"), "{e}");
        let e =
            parse_problems("{\"messages\":[{\"role\":\"user\",\"content\":\"a\"}]}", Path::new("s.jsonl")).unwrap_err();
        assert!(e.to_string().contains("missing field `answer`"), "{e}");
    }

    #[test]
    fn answer_is_text_after_last_think_end() {
        assert_eq!(extract_answer("<think>\n8+7+0=15\n</think>\n\n85"), "85");
        assert_eq!(extract_answer("<think>a</think>x</think> 12 \n"), "12");
        assert_eq!(extract_answer("  no reasoning 7 "), "no reasoning 7");
        assert_eq!(extract_answer("<think>\nunfinished"), "<think>\nunfinished");
    }

    #[test]
    fn summary_line_format() {
        let r = EvalReport {
            backend: "ort-cpu".into(),
            correct: 483,
            total: 500,
            seconds: 12.34,
            generated_tokens: 0,
            results: vec![],
        };
        assert_eq!(r.summary(), "accuracy 483/500 = 96.6% (backend ort-cpu, 12.3 s)");
    }
}
