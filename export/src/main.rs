//! `r1-export`: HuggingFace checkpoint directory → ONNX artifact directory. See `--help`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use r1_export::{export, ExportOptions, Precision, Progress};

const AFTER_HELP: &str = "\
Examples:
  # DeepSeek-R1-Distill-Qwen-1.5B, float32, for the CPU backends (ort, tract)
  r1-export ~/models/DeepSeek-R1-Distill-Qwen-1.5B -o artifacts/qwen-1.5b

  # float16 weights and KV cache (logits stay float32)
  r1-export ~/models/DeepSeek-R1-Distill-Llama-8B -o artifacts/llama-8b-fp16 --precision fp16

  # a newer opset for runtimes that want it
  r1-export ./ckpt -o ./out --opset 21

What you get in OUT_DIR:
  model.onnx + model.onnx.data   decoder graph with KV cache; standard ONNX ops only; weights in
                                 external data (4 KiB-aligned, deterministic layout)
  tokenizer.json, tokenizer_config.json, generation_config.json   copied from the checkpoint
  manifest.json                  family, resolved config, precision, opset, I/O names and shapes,
                                 KV-cache layout and bytes per token, sha256 of every file

Graph I/O (Optimum / ONNX Runtime GenAI names; batch, sequence, past_sequence symbolic):
  inputs   input_ids [batch, sequence] int64, attention_mask [batch, past+sequence] int64,
           position_ids [batch, sequence] int64, past_key_values.{i}.key/.value
  outputs  logits [batch, sequence, vocab] float32, present.{i}.key/.value
One graph serves prefill (past_sequence = 0) and decode; left-padded batches work through
attention_mask and position_ids.

Supported architectures: Qwen2ForCausalLM (R1-Distill-Qwen), LlamaForCausalLM (R1-Distill-Llama),
Qwen3ForCausalLM (R1-0528-Qwen3), DeepseekV3ForCausalLM (DeepSeek-R1 itself: MLA with a compressed
latent KV cache, MoE; bf16 or FP8 block-scaled weights, dequantized while streaming).
The export streams one tensor at a time: memory stays around one tensor whatever the model size.
Test checkpoints of any shape: see `r1-fixture --help`.";

/// Export a DeepSeek-R1-family HuggingFace checkpoint to an ONNX decoder graph with KV cache.
#[derive(Debug, Parser)]
#[command(name = "r1-export", version, about, after_help = AFTER_HELP)]
struct Cli {
    /// HuggingFace checkpoint directory (config.json + *.safetensors [+ tokenizer files]).
    checkpoint: PathBuf,

    /// Artifact directory to create (must not exist, or be empty). Written atomically.
    #[arg(short, long, value_name = "OUT_DIR")]
    out: PathBuf,

    /// Precision of weights, activations and KV cache: fp32 | fp16 (int8 comes with calibration).
    #[arg(long, default_value = "fp32", env = "R1_EXPORT_PRECISION")]
    precision: String,

    /// Deployment target: cpu (GPU targets such as a100 come with engine builds).
    #[arg(long, default_value = "cpu", env = "R1_EXPORT_TARGET")]
    target: String,

    /// ONNX default-domain opset, 17..=21 (17: newest that TensorRT 8.6+, tract and ORT all run).
    #[arg(long, default_value_t = r1_export::DEFAULT_OPSET, env = "R1_EXPORT_OPSET")]
    opset: i64,

    /// Never show a progress bar (it is shown only when stderr is a terminal anyway).
    #[arg(long)]
    quiet: bool,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let precision: Precision = cli.precision.parse()?;
    let opts = ExportOptions {
        checkpoint: cli.checkpoint.clone(),
        out_dir: cli.out.clone(),
        precision,
        opset: cli.opset,
        target: cli.target.clone(),
    };
    let show = !cli.quiet && std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::hidden();
    if show {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
    }
    let start = std::time::Instant::now();
    let manifest = export(&opts, &mut |p| match p {
        Progress::Start { total_bytes } => bar.set_length(total_bytes),
        Progress::Tensor { name, bytes } => {
            bar.inc(bytes);
            bar.set_message(name.to_string());
        }
        Progress::Finishing => bar.set_message("writing model.onnx and manifest.json"),
    })
    .with_context(|| format!("exporting {}", cli.checkpoint.display()))?;
    bar.finish_and_clear();
    let bytes: u64 = manifest.files.values().map(|f| f.bytes).sum();
    eprintln!(
        "exported {} ({}, {} layers) at {} to {} in {:.1}s ({:.2} GB)",
        manifest.architecture,
        manifest.family,
        manifest.model.num_layers,
        manifest.precision,
        cli.out.display(),
        start.elapsed().as_secs_f64(),
        bytes as f64 / 1e9
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the context chain joined with ": ".
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
