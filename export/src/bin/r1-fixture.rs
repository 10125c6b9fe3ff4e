//! `r1-fixture`: writes a random-weight HuggingFace checkpoint of any dense family and shape, or a DeepseekV3
//! one laid out like the R1 release (FP8 blocks, MoE, MTP module, shards), for benchmarks and tests. Streams to
//! disk: a 3.5 GB checkpoint needs a few MB of memory.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use r1_export::fixture::{preset, write_checkpoint, FixtureDtype, PRESETS};

/// Write a random-weight checkpoint (config.json, generation_config.json, model.safetensors, or shards with
/// model.safetensors.index.json for deepseek-r1-slice).
#[derive(Debug, Parser)]
#[command(
    name = "r1-fixture",
    version,
    about,
    after_help = "\
Examples:
  r1-fixture --preset r1-distill-qwen-1.5b -o /tmp/qwen-1.5b-random      # ~3.5 GB, bf16
  r1-fixture --preset tiny-llama --layers 4 --dtype f32 -o /tmp/tiny
  r1-fixture --preset deepseek-r1-slice -o /data/r1-slice    # 31.23 GB, FP8 like the release; benchmarks only
  r1-fixture --preset deepseek-r1-slice --no-mtp -o /data/r1-slice   # 15.80 GB: export with r1-export --no-draft
  r1-fixture --list"
)]
struct Cli {
    /// Named shape (see --list).
    #[arg(long, default_value = "tiny-qwen2")]
    preset: String,
    /// Output directory.
    #[arg(short, long, required_unless_present = "list")]
    out: Option<PathBuf>,
    /// Override the architecture (Qwen2ForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM).
    #[arg(long)]
    arch: Option<String>,
    /// Override the number of layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Override the hidden size.
    #[arg(long)]
    hidden: Option<usize>,
    /// Override the vocabulary size.
    #[arg(long)]
    vocab: Option<usize>,
    /// Stored dtype: bf16 | f16 | f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Tie the LM head to the embedding.
    #[arg(long)]
    tie: bool,
    /// RNG seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// DeepseekV3 presets: leave out the multi-token-prediction module's tensors (checkpoint layer
    /// num_hidden_layers, `model.layers.2.*` in deepseek-r1-slice) and keep config.json as released (it still
    /// declares num_nextn_predict_layers), like a release stripped of its MTP layer. Export it with
    /// `r1-export --no-draft`; a plain export fails naming the first missing MTP tensor.
    #[arg(long)]
    no_mtp: bool,
    /// List presets and exit.
    #[arg(long)]
    list: bool,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.list {
        for p in PRESETS {
            let bytes = (p.spec)().planned_bytes()? as f64;
            let size = if bytes >= 1e9 { format!("{:.2} GB", bytes / 1e9) } else { format!("{:.2} MB", bytes / 1e6) };
            println!("{:20} {size:>9}  {}", p.name, p.description);
        }
        return Ok(());
    }
    let mut spec = preset(&cli.preset)?;
    if cli.no_mtp {
        let Some(d) = spec.deepseek_v3.take() else {
            anyhow::bail!(
                "--no-mtp applies to DeepseekV3 presets only (deepseek-r1-slice), not --preset {}",
                cli.preset
            );
        };
        spec.deepseek_v3 = Some(d.without_mtp());
    }
    if spec.deepseek_v3.is_some() {
        let overrides = [
            ("--arch", cli.arch.is_some()),
            ("--layers", cli.layers.is_some()),
            ("--hidden", cli.hidden.is_some()),
            ("--vocab", cli.vocab.is_some()),
            ("--tie", cli.tie),
            ("--dtype", cli.dtype != "bf16"),
        ];
        if let Some((opt, _)) = overrides.iter().find(|(_, set)| *set) {
            anyhow::bail!(
                "{opt} does not apply to --preset {}: its config.json is the release's and its dtypes are the \
                 release's (only --seed, --no-mtp and -o apply)",
                cli.preset
            );
        }
    }
    if let Some(a) = cli.arch {
        spec.architecture = a;
    }
    if let Some(l) = cli.layers {
        spec.num_layers = l;
    }
    if let Some(h) = cli.hidden {
        spec.hidden_size = h;
    }
    if let Some(v) = cli.vocab {
        spec.vocab_size = v;
    }
    spec.tie_word_embeddings |= cli.tie;
    spec.dtype = cli.dtype.parse::<FixtureDtype>()?;
    spec.seed = cli.seed;
    let out = cli.out.ok_or_else(|| anyhow::anyhow!("-o/--out is required"))?;
    let planned = spec.planned_bytes()?;
    eprintln!(
        "writing {} tensors, {planned} bytes ({:.2} GB) to {}",
        spec.tensor_count()?,
        planned as f64 / 1e9,
        out.display()
    );
    let t = std::time::Instant::now();
    let bytes = write_checkpoint(&spec, &out)?;
    eprintln!("wrote {} ({:.2} GB of weights) in {:.1}s", out.display(), bytes as f64 / 1e9, t.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
