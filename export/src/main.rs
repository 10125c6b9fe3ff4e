//! `r1-export`: HuggingFace checkpoint directory → ONNX artifact directory, then per-target builds
//! (TensorRT engines, the optimized CPU graph). See `--help`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use r1_export::quantize::{default_opset, export_quantized, QuantArgs, QuantProgress};
use r1_export::target::{self, KvCacheDtype, Mode, Outcome, TargetOptions};
use r1_export::{export, ExportOptions, Precision, Progress};

const AFTER_HELP: &str = "\
Examples:
  # DeepSeek-R1-Distill-Qwen-1.5B, float32, for the CPU backends (ort, tract)
  r1-export ~/models/DeepSeek-R1-Distill-Qwen-1.5B -o artifacts/qwen-1.5b

  # float16 weights and KV cache (logits stay float32)
  r1-export ~/models/DeepSeek-R1-Distill-Llama-8B -o artifacts/llama-8b-fp16 --precision fp16

  # plus the ONNX Runtime-optimized CPU graph (engines/cpu/<version>/model.onnx)
  r1-export ./ckpt -o ./out --target cpu

  # INT8 calibrated on your own prompts: JSONL `messages` ending with a user turn are first answered by the
  # fp32 model, and the export fails (no artifact) if accuracy drops more than 1 point on your problems
  r1-export ./ckpt -o ./out-int8 --precision int8 --calibration-data prompts.jsonl \
    --eval-problems problems.jsonl --max-accuracy-loss 1.0

  # for an A100 (fp16 by default): builds the TensorRT engine when this host has an A100 and
  # onnxruntime-gpu with TensorRT; otherwise records the build plan and prints the command below
  r1-export ./ckpt -o ./out --target a100
  r1-export build ./out --target a100            # later, on the A100 host

  # one engine for every Ampere-or-newer GPU, and several targets at once
  r1-export ./ckpt -o ./out --target a100,cpu --hardware-compatible

  # a newer opset for runtimes that want it
  r1-export ./ckpt -o ./out --opset 21

What you get in OUT_DIR:
  model.onnx + model.onnx.data   decoder graph with KV cache; standard ONNX ops only; weights in
                                 external data (4 KiB-aligned, deterministic layout)
  tokenizer.json, tokenizer_config.json, generation_config.json   copied from the checkpoint
  manifest.json                  family, resolved config, precision, opset, I/O names and shapes,
                                 KV-cache layout and bytes per token, sha256 of every file,
                                 per-target builds or build plans (`targets`)
  engines/cpu/<version>/         with --target cpu: model.onnx (+ model.onnx.data), a serving graph
                                 (last-position logits, attention fused into GroupQueryAttention)
                                 after ONNX Runtime's extended graph optimizations (portable across
                                 CPUs; needs ONNX Runtime, tract uses the portable graph)
  engines/<gpu>/<version>/       with a GPU target built on its GPU: TensorRT engine, timing cache
                                 and model_ctx.onnx (EP-context model pointing at the engine)
                                 <version>: a key of the graph, precision, target options and builder
                                 versions. Builds of one target take engines/.<target>.lock: started
                                 together (one per replica), one builds and the others find it built

Targets: a100 (sm80), h100 and h200 (sm90, fp8), b200 (sm100), l40s and l4 (sm89, fp8), a10g (sm86),
t4 (sm75, no bf16), cpu. Each GPU target has a TensorRT optimization profile (min/opt/max batch,
sequence and past length) and workspace; manifest.targets.<gpu>.options records the exact trt_*
options. An engine built for one GPU is refused on another unless built --hardware-compatible.

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

const BUILD_AFTER_HELP: &str = "\
Examples:
  # on the A100 host, for an artifact exported anywhere with --target a100 (or without)
  r1-export build ./out --target a100

  # an engine that also runs on other Ampere-or-newer GPUs
  r1-export build ./out --target h100 --hardware-compatible

  # the optimized CPU graph for an existing artifact
  r1-export build ./out --target cpu

A GPU build needs that GPU (same compute capability; any sm80+ GPU with --hardware-compatible) and
an ONNX Runtime with the TensorRT execution provider (onnxruntime-gpu + the tensorrt wheels; set
ORT_DYLIB_PATH to its libonnxruntime.so). It writes OUT_DIR/engines/<target>/ and records the
build (GPU, TensorRT and ONNX Runtime versions, duration, files with sha256) in manifest.json.
Without the GPU or the provider it fails and says what was found and what is needed.";

/// Export a DeepSeek-R1-family HuggingFace checkpoint to an ONNX decoder graph with KV cache, and
/// build it for deployment targets.
#[derive(Debug, Parser)]
#[command(
    name = "r1-export",
    version,
    about,
    after_help = format!("{AFTER_HELP}\n\n{}", r1_engine::ort_lib::LIBRARY_HELP),
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    export: ExportArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build per-target engines for an existing artifact on this host (TensorRT on the GPU host).
    #[command(after_help = BUILD_AFTER_HELP)]
    Build(BuildArgs),
}

/// `r1-export CHECKPOINT -o OUT_DIR ...`
#[derive(Debug, Args)]
struct ExportArgs {
    /// HuggingFace checkpoint directory (config.json + *.safetensors [+ tokenizer files]).
    #[arg(required = true)]
    checkpoint: Option<PathBuf>,

    /// Artifact directory to create (must not exist, or be empty). Written atomically.
    #[arg(short, long, value_name = "OUT_DIR", required = true)]
    out: Option<PathBuf>,

    /// Precision: fp32 | fp16 | int8 (W8A8, calibrated: needs --calibration-data) | int8-wo | int4-wo
    /// (weight-only). Default: the GPU targets' default precision (fp16), else fp32. bf16 is refused: neither
    /// CPU runtime runs bfloat16 graphs (ONNX Runtime 1.31's CPU provider has no bfloat16 MatMul, Add or Mul;
    /// tract 0.23 has no bfloat16 type) and GPU targets build fp16 TensorRT engines; use fp16 for GPU targets,
    /// fp32, int8-wo or int4-wo for cpu (a bf16 checkpoint is converted tensor by tensor as it streams).
    #[arg(long, env = "R1_EXPORT_PRECISION")]
    precision: Option<String>,

    /// ONNX default-domain opset, 17..=21 (17: newest that TensorRT 8.6+, tract and ORT all run).
    /// Default 17, or 21 for int4-wo (blocked DequantizeLinear).
    #[arg(long, env = "R1_EXPORT_OPSET")]
    opset: Option<i64>,

    /// Do not export the draft graph. A DeepseekV3 checkpoint whose config.json has num_nextn_predict_layers > 0
    /// (DeepSeek-R1: 1) carries a multi-token-prediction module (layer num_hidden_layers, 61 in R1); by default it
    /// is exported as mtp.onnx beside model.onnx (manifest `draft`, for speculative decoding) and model.onnx also
    /// outputs last_hidden_state. With this flag that module is skipped (and may be absent from the checkpoint).
    #[arg(long, env = "R1_EXPORT_NO_DRAFT")]
    no_draft: bool,

    #[command(flatten)]
    quant: QuantArgs,

    #[command(flatten)]
    targets: TargetArgs,

    /// Never show a progress bar (it is shown only when stderr is a terminal anyway).
    #[arg(long)]
    quiet: bool,
}

/// `r1-export build OUT_DIR --target ...`
#[derive(Debug, Args)]
struct BuildArgs {
    /// Artifact directory written by r1-export.
    #[arg(value_name = "OUT_DIR")]
    artifact: PathBuf,

    #[command(flatten)]
    targets: TargetArgs,
}

/// Deployment targets, shared by the export and `build`.
#[derive(Debug, Args)]
struct TargetArgs {
    /// Deployment targets, comma-separated or repeated: a100, h100, h200, b200, l40s, l4, a10g,
    /// t4 (TensorRT engines) and cpu (ONNX Runtime-optimized graph). None: the portable graph only.
    #[arg(long = "target", value_name = "TARGET", value_delimiter = ',', value_parser = parse_target, env = "R1_EXPORT_TARGET")]
    targets: Vec<String>,

    /// Build TensorRT engines hardware-compatible: they run on any Ampere-or-newer GPU (sm80+),
    /// a little slower than an engine built for one GPU.
    #[arg(long, env = "R1_EXPORT_HARDWARE_COMPATIBLE")]
    hardware_compatible: bool,

    /// Seconds to wait for another process's build of the same target in the same artifact (every replica's
    /// init container may start one): it holds engines/.<target>.lock; once it finishes, this run finds the
    /// build recorded and does nothing.
    #[arg(long, value_name = "SECS", default_value_t = r1_export::build_lock::DEFAULT_WAIT.as_secs(), env = "R1_EXPORT_WAIT_SECS")]
    wait_secs: u64,

    /// cpu target of an int8-wo / int4-wo / int8 DeepseekV3 artifact: keep the routed experts float
    /// (com.microsoft.MoE) instead of quantizing them into com.microsoft.QMoE.
    #[arg(long, env = "R1_EXPORT_CPU_FLOAT_EXPERTS")]
    cpu_float_experts: bool,

    /// cpu target: the KV cache's element type, auto | fp32 | fp16. fp16 halves the cache's memory per token and
    /// what a decode step reads at a long context (the attention still computes in float32; needs the fused
    /// attention of Llama / Qwen2 / Qwen3). auto: fp16 for int8-wo, int4-wo and int8 artifacts, the graph's own
    /// type for fp32 (transformers' numerics) and fp16.
    #[arg(long, value_name = "DTYPE", default_value = "auto", value_parser = parse_kv_cache_dtype, env = "R1_EXPORT_KV_CACHE_DTYPE")]
    kv_cache_dtype: KvCacheDtype,

    /// cpu target of a float32 DeepseekV3 artifact (fp32, int8-wo, int4-wo): fuse each layer's latent attention into
    /// r1.LatentAttention, which appends the latent cache in place in the engine's KV pool (no cache copied per
    /// step). Off by default: at R1's 128 heads its decode arithmetic is still slower than ONNX Runtime's matrix
    /// products in the portable attention (see BENCHMARKS.md).
    #[arg(long, env = "R1_EXPORT_MLA_IN_PLACE")]
    mla_in_place: bool,
}

impl TargetArgs {
    fn options(&self) -> TargetOptions {
        TargetOptions {
            targets: self.targets.clone(),
            hardware_compatible: self.hardware_compatible,
            wait: std::time::Duration::from_secs(self.wait_secs),
            float_experts: self.cpu_float_experts,
            kv_cache_dtype: self.kv_cache_dtype,
            mla_in_place: self.mla_in_place,
        }
    }
}

fn parse_kv_cache_dtype(s: &str) -> Result<KvCacheDtype, String> {
    s.parse().map_err(|e: r1_export::ExportError| e.to_string())
}

fn parse_target(s: &str) -> Result<String, String> {
    r1_engine::targets::target(s.trim()).map(|t| t.name.to_string()).map_err(|e| e.to_string())
}

/// A progress bar on stderr when it is a terminal and `--quiet` is not given; hidden otherwise.
fn progress_bar(quiet: bool) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::hidden();
    if !quiet && std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_style(bar_style("{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}"));
    }
    bar
}

fn bar_style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
}

/// Shows the weight conversion: bytes read, the tensor being written.
fn show_export_progress(bar: &indicatif::ProgressBar, p: Progress) {
    match p {
        Progress::Start { total_bytes } => bar.set_length(total_bytes),
        Progress::Tensor { name, bytes } => {
            bar.inc(bytes);
            bar.set_message(name.to_string());
        }
        Progress::Finishing => bar.set_message("writing model.onnx and manifest.json"),
    }
}

/// Shows a quantized export: the fp32 export, the calibration passes, the rewrite, the report and the evaluation.
fn show_quant_progress(bar: &indicatif::ProgressBar, p: QuantProgress) {
    let count_style = || bar_style("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}");
    match p {
        QuantProgress::Export(p) => show_export_progress(bar, p),
        QuantProgress::Streaming => bar.set_message("quantizing each MatMul weight as it is read"),
        QuantProgress::Pass { pass, passes, batches } => {
            bar.set_style(count_style());
            bar.set_length(batches as u64);
            bar.set_position(0);
            bar.set_message(format!("calibration pass {pass}/{passes} (samples)"));
        }
        QuantProgress::Batch { done } => bar.set_position(done as u64),
        QuantProgress::Generating { samples } => {
            bar.set_style(count_style());
            bar.set_length(samples as u64);
            bar.set_position(0);
            bar.set_message("fp32 model writing the replies of open calibration samples");
        }
        QuantProgress::Generated { done } => bar.set_position(done as u64),
        QuantProgress::Rewriting => bar.set_message("writing the quantized graph"),
        QuantProgress::Report { samples } => {
            bar.set_message(format!("comparing with fp32 on {samples} held-out samples"))
        }
        QuantProgress::Eval { precision, problems } => {
            bar.set_style(count_style());
            bar.set_length(problems as u64);
            bar.set_position(0);
            bar.set_message(format!("scoring {precision}"));
        }
        QuantProgress::EvalProgress { done, correct } => {
            bar.set_position(done as u64);
            bar.set_message(format!("{correct} correct so far"));
        }
    }
}

fn run_export(args: ExportArgs) -> anyhow::Result<()> {
    let (Some(checkpoint), Some(out)) = (args.checkpoint.clone(), args.out.clone()) else {
        anyhow::bail!("a checkpoint directory and -o OUT_DIR are required (see --help)");
    };
    let targets = target::resolve(&args.targets.targets)?;
    let requested = match &args.precision {
        Some(name) => parse_precision(name)?,
        None => target::default_precision(&targets),
    };
    let quant = requested.is_quantized().then_some(requested);
    target::check_precision(&targets, requested)?;
    let default_opset = default_opset(requested, &checkpoint);
    let opts = ExportOptions {
        checkpoint: checkpoint.clone(),
        out_dir: out.clone(),
        precision: requested.float_base(),
        opset: args.opset.unwrap_or(default_opset),
        // The exporter writes the portable graph; targets are built on it below.
        target: "cpu".into(),
        draft: !args.no_draft,
    };
    let bar = progress_bar(args.quiet);
    let start = std::time::Instant::now();
    let manifest = match quant {
        None => export(&opts, &mut |p| show_export_progress(&bar, p))
            .with_context(|| format!("exporting {}", checkpoint.display()))?,
        Some(q) => {
            let gpu_target = targets.iter().find(|t| !t.is_cpu()).map(|t| t.name);
            let qopts = args.quant.options(q, gpu_target)?;
            let (manifest, report) = export_quantized(&opts, &qopts, &mut |p| show_quant_progress(&bar, p))
                .with_context(|| format!("exporting {} at {requested}", checkpoint.display()))?;
            bar.finish_and_clear();
            eprint!("{}", report.table());
            manifest
        }
    };
    bar.finish_and_clear();
    let bytes: u64 = manifest.files.values().map(|f| f.bytes).sum();
    eprintln!(
        "exported {} ({}, {} layers) at {} to {} in {:.1}s ({:.2} GB)",
        manifest.architecture,
        manifest.family,
        manifest.model.num_layers,
        manifest.precision,
        out.display(),
        start.elapsed().as_secs_f64(),
        bytes as f64 / 1e9
    );
    run_targets(&out, &args.targets, Mode::AfterExport)
}

/// `--precision NAME`; bfloat16 (`bf16`, `bfloat16`) is refused by name, saying why and what to use instead.
fn parse_precision(name: &str) -> Result<Precision, r1_export::ExportError> {
    let invalid = |message: String| r1_export::ExportError::InvalidOption { option: "--precision", message };
    if matches!(name.to_ascii_lowercase().as_str(), "bf16" | "bfloat16") {
        return Err(invalid(format!(
            "`{name}` is not available: neither CPU runtime r1 serves with runs bfloat16 graphs (ONNX Runtime \
             1.31's CPU provider has no bfloat16 kernel for MatMul, Add, Mul or Softmax; tract 0.23 has no \
             bfloat16 type), and r1's GPU targets build fp16 TensorRT engines. Use --precision fp16 for GPU \
             targets (a100, h100, ...), or fp32, int8-wo or int4-wo for cpu; a bf16 checkpoint is converted \
             tensor by tensor as it streams"
        )));
    }
    name.parse::<Precision>().map_err(|e| invalid(e.to_string()))
}

fn run_targets(dir: &Path, args: &TargetArgs, mode: Mode) -> anyhow::Result<()> {
    if args.targets.is_empty() {
        return Ok(());
    }
    // Errors name the artifact directory themselves.
    let mut on_wait = |target: &str, holder: &str| {
        eprintln!("{target}: another build of this artifact holds the lock ({holder}); waiting for it")
    };
    let outcomes = target::apply(dir, &args.options(), mode, &mut on_wait)?;
    for o in outcomes {
        match o {
            Outcome::Cpu(b) => eprintln!(
                "cpu: wrote {} (ONNX Runtime {} {} optimizations) in {:.1}s",
                dir.join(&b.graph).display(),
                b.ort_version,
                b.optimization_level,
                b.duration_ms as f64 / 1e3
            ),
            Outcome::Built(b) => eprintln!(
                "{}: built the TensorRT engine on {} (TensorRT {}, ONNX Runtime {}) in {:.1}s into {}",
                b.target,
                b.gpu_name.as_deref().unwrap_or("?"),
                b.tensorrt_version.as_deref().unwrap_or("version unknown"),
                b.ort_version.as_deref().unwrap_or("?"),
                b.duration_ms.unwrap_or(0) as f64 / 1e3,
                b.ep_context_model
                    .as_deref()
                    .and_then(|c| Path::new(c).parent())
                    .map_or_else(|| dir.join(r1_engine::manifest::names::engine_dir(&b.target)), |p| dir.join(p))
                    .display()
            ),
            Outcome::Current { target, dir: rel } => {
                eprintln!("{target}: already built for this artifact ({}); nothing to do", dir.join(rel).display())
            }
            Outcome::Planned { plan, reason, cuda_note } => {
                eprintln!(
                    "{}: not built here ({reason}).\n{}: build plan recorded in manifest.json; to build the engine, run on a host with that GPU:\n  {}",
                    plan.target,
                    plan.target,
                    plan.command.as_deref().unwrap_or_default()
                );
                match (&plan.cuda_graph, cuda_note) {
                    (Some(c), _) => eprintln!(
                        "{}: wrote the CUDA serving graph {} (ONNX Runtime's CUDA provider runs it where TensorRT is absent: KV cache in place on the GPU, last-position logits)",
                        plan.target,
                        dir.join(&c.graph).display()
                    ),
                    (None, Some(why)) => eprintln!("{}: no CUDA serving graph: {why}", plan.target),
                    (None, None) => {}
                }
            }
        }
    }
    Ok(())
}

fn run_build(args: BuildArgs) -> anyhow::Result<()> {
    if args.targets.targets.is_empty() {
        anyhow::bail!("`r1-export build` needs --target (one of {})", target_names());
    }
    run_targets(&args.artifact, &args.targets, Mode::Build)
}

fn target_names() -> String {
    r1_engine::targets::TARGETS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Build(b)) => run_build(b),
        None => run_export(cli.export),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the context chain joined with ": ".
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
