//! `r1-eval`: greedy accuracy of an exported artifact on a JSONL held-out set (a thin CLI over
//! `r1_engine::eval::evaluate`).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use r1_engine::eval::{self, EvalOptions};
use r1_engine::text::{ChatTemplate, Tokenizer};
use r1_engine::{BackendKind, BackendOptions, Engine, EngineOptions, ExecutionProviderKind};

const AFTER_HELP: &str = "\
What it does:
  Each line of --data is one problem: {\"messages\": [{\"role\": \"user\", \"content\": \"What is 38+47?\"}], \"answer\": \"85\"}.
  The messages are rendered with the artifact's chat template (add_generation_prompt = true) and tokenized exactly
  as r1-serve does, generated greedily in batches of --batch until an EOS id of generation_config.json or
  --max-new-tokens, and the answer is the text after </think>, trimmed. A problem counts as correct when that text
  equals \"answer\" exactly. Greedy decoding is deterministic, so two backends that compute the same graph give the
  same answers; differences point at numerics.

Output:
  a progress line per batch on stderr, then one line on stdout:
    accuracy 483/500 = 96.6% (backend ort-cpu, 12.3 s)
  --json-out writes every problem (prompt and completion token ids, completion text, extracted answer).

Examples:
  r1-export tests/fixtures/arith-r1 -o /tmp/arith-fp32
  r1-eval --model /tmp/arith-fp32 --data tests/fixtures/arith-r1/heldout.jsonl
  r1-eval --model /tmp/arith-fp32 --data tests/fixtures/arith-r1/heldout.jsonl --backend tract --limit 50
  r1-eval --model /tmp/arith-fp32 --data heldout.jsonl --batch 32 --json-out /tmp/arith-ort.json";

/// Greedy held-out accuracy of an exported r1 artifact.
#[derive(Debug, Parser)]
#[command(name = "r1-eval", version, about, after_help = format!("{AFTER_HELP}\n\n{}", r1_engine::ort_lib::LIBRARY_HELP))]
struct Cli {
    /// Artifact directory written by r1-export (manifest.json, model.onnx, tokenizer files).
    #[arg(long, env = "R1_EVAL_MODEL")]
    model: PathBuf,
    /// JSONL held-out set, one {"messages": [...], "answer": "..."} per line.
    #[arg(long, env = "R1_EVAL_DATA")]
    data: PathBuf,
    /// auto (ort when ONNX Runtime is found, else tract), ort or tract.
    #[arg(long, env = "R1_BACKEND", default_value = "auto")]
    backend: String,
    /// ONNX Runtime execution provider: auto (TensorRT, else CUDA on a GPU, else CPU), cpu, cuda or tensorrt.
    #[arg(long, env = "R1_EXECUTION_PROVIDER", default_value = "auto")]
    execution_provider: String,
    /// Evaluate only the first N problems.
    #[arg(long, env = "R1_EVAL_LIMIT")]
    limit: Option<usize>,
    /// Problems generated together per batch.
    #[arg(long, env = "R1_EVAL_BATCH", default_value_t = 16)]
    batch: usize,
    /// Maximum new tokens per problem.
    #[arg(long, env = "R1_EVAL_MAX_NEW_TOKENS", default_value_t = 64)]
    max_new_tokens: usize,
    /// Intra-op threads for ort (default: the runtime decides).
    #[arg(long, env = "R1_THREADS")]
    threads: Option<usize>,
    /// Write the full per-problem report as JSON to this file.
    #[arg(long, env = "R1_EVAL_JSON_OUT")]
    json_out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.batch == 0 {
        bail!("--batch must be at least 1, got 0");
    }
    if cli.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1, got 0");
    }
    let backend: BackendKind = cli.backend.parse().with_context(|| format!("--backend {}", cli.backend))?;
    let execution_provider: ExecutionProviderKind =
        cli.execution_provider.parse().with_context(|| format!("--execution-provider {}", cli.execution_provider))?;
    let mut problems = eval::load_problems(&cli.data)?;
    if let Some(n) = cli.limit {
        problems.truncate(n);
    }
    if problems.is_empty() {
        return Err(eval::EvalError::Empty { path: cli.data.clone() }.into());
    }
    let tokenizer =
        Tokenizer::from_dir(&cli.model).with_context(|| format!("loading the tokenizer of {}", cli.model.display()))?;
    let template =
        ChatTemplate::from_config(tokenizer.config(), None, false).map_err(|_| eval::EvalError::NoChatTemplate)?;
    let opts = EngineOptions {
        backend,
        backend_options: BackendOptions { intra_threads: cli.threads, execution_provider, ..Default::default() },
        ..Default::default()
    };
    let mut engine = Engine::load(&cli.model, &opts).with_context(|| format!("loading {}", cli.model.display()))?;
    let eval_opts = EvalOptions { batch: cli.batch, max_new_tokens: cli.max_new_tokens, ..Default::default() };
    eprintln!(
        "evaluating {} problems from {} on {} (precision {}), batch {}",
        problems.len(),
        cli.data.display(),
        engine.backend_name(),
        engine.manifest().precision,
        cli.batch
    );
    let started = std::time::Instant::now();
    let report =
        eval::evaluate(&mut engine, &tokenizer, &template, &problems, &eval_opts, &mut |done, total, correct| {
            eprintln!("  {done}/{total} done, {correct} correct, {:.1} s", started.elapsed().as_secs_f64());
        })?;
    if let Some(path) = &cli.json_out {
        let json = serde_json::to_string_pretty(&report).context("serializing the report")?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", report.summary());
    Ok(())
}
