//! The `r1-export` flags of the quantized precisions.
use std::path::PathBuf;

use r1_calibration::dataset;
use r1_calibration::CalibError;

use super::QuantizeOptions;
use crate::error::{ExportError, Result};
use r1_engine::manifest::Precision;

/// The `r1-export` flags of the quantized precisions (flattened into the CLI).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Quantization (--precision int8 | int8-wo | int4-wo)")]
pub struct QuantArgs {
    /// Calibration samples: plain text (one sample per line) or JSONL with `text`, `prompt` or `messages` (rendered
    /// with the checkpoint's chat template, as the server renders requests). Your own prompts are enough: a
    /// `prompt`, or `messages` ending with a user turn, is first continued by the fp32 model
    /// (--calibration-generate-tokens). Required for int8; int4-wo uses it for AWQ (--awq); for int8-wo it only
    /// feeds the quality report. Without it (and without --eval-problems and --keep-float), int8-wo and int4-wo
    /// quantize each weight as it is read from the checkpoint, with no fp32 copy on disk; with it, the checkpoint
    /// is first exported in fp32 to a staging directory beside OUT_DIR, which the calibration runs.
    #[arg(long, value_name = "FILE", env = "R1_CALIBRATION_DATA")]
    pub calibration_data: Option<PathBuf>,

    /// How each activation range is chosen: mse (least squared quantization error; the default, measured best on
    /// arith-r1), entropy (TensorRT's KL method), max, percentile (99.99) or percentile:P.
    #[arg(long, default_value = "mse", value_name = "METHOD")]
    pub calibration_method: String,

    /// SmoothQuant strength in [0, 1]: moves activation outliers into the weights, folded into the preceding
    /// RMSNorm. 0 turns it off (one calibration pass instead of two).
    #[arg(long, default_value_t = 0.5, value_name = "ALPHA")]
    pub smoothquant_alpha: f32,

    /// Calibration samples to use. 64 × 256 tokens gives stable per-tensor ranges; more costs time, not memory.
    #[arg(long, default_value_t = dataset::DEFAULT_NUM_SAMPLES, value_name = "N")]
    pub calibration_samples: usize,

    /// Tokens the fp32 model generates (greedy) after each open sample — a `prompt`, or `messages` ending with a
    /// user turn — so that calibration sees the reply's activations, not only the prompt's (on arith-r1, int8
    /// calibrated on prompts alone lost 2.8 points; BENCHMARKS.md). A sample stops at EOS or at
    /// --calibration-seq-len. 0 calibrates on the prompts as given.
    #[arg(long, default_value_t = super::DEFAULT_GENERATE_TOKENS, value_name = "TOKENS")]
    pub calibration_generate_tokens: usize,

    /// Leave this MatMul in float (repeatable): its node name as the report's layer list and
    /// `calibration/report.json` give it (e.g. `/model/layers.3/self_attn/o_proj/MatMul`), or its weight's name.
    /// (MoE routers are always left float.) Node names are known once the graph exists, so this stages an fp32
    /// export first (see --calibration-data).
    #[arg(long, value_name = "NAME")]
    pub keep_float: Vec<String>,

    /// int4-wo with --calibration-data: activation-aware weight scaling (AWQ): each input channel of the MatMuls
    /// an RMSNorm feeds is scaled by its activation magnitude to a searched power before the 4-bit rounding, the
    /// inverse folded into the norm (no run-time cost). on (default) or off. Without calibration data: off.
    #[arg(long, default_value = "on", value_name = "on|off", value_parser = ["on", "off"])]
    pub awq: String,

    /// Fail the export, writing no artifact, when the quantized model's accuracy on --eval-problems is more than
    /// POINTS percentage points below fp32's (e.g. 1.0).
    #[arg(long, value_name = "POINTS", requires = "eval_problems")]
    pub max_accuracy_loss: Option<f64>,

    /// Tokens per calibration sample (longer samples are truncated).
    #[arg(long, default_value_t = dataset::DEFAULT_SEQ_LEN, value_name = "TOKENS")]
    pub calibration_seq_len: usize,

    /// Held-out samples (read after the calibration samples) for the report's SQNR, KL and top-1 figures.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub report_samples: usize,

    /// INT4 block size (rows of the weight per scale): 32, 64 or 128.
    #[arg(long, default_value_t = 32, value_name = "ROWS")]
    pub int4_block_size: usize,

    /// INT4 codes: asymmetric (unsigned, one zero point per block; ONNX Runtime), symmetric (signed, no zero
    /// point; TensorRT's block-quantized INT4 takes only this), or auto: symmetric when a GPU --target is given,
    /// else asymmetric (more accurate: arith-r1 numbers in BENCHMARKS.md).
    #[arg(long, default_value = "auto", value_name = "SCHEME", value_parser = ["auto", "asymmetric", "symmetric"])]
    pub int4_scheme: String,

    /// The LM head (the largest single weight): weights (default: its weight quantized, its input kept float;
    /// for int8 that is an int8 weight-only MatMul, since the last hidden state has the widest activations),
    /// all (quantized like every other MatMul; for int8 the input too), or float (left in fp32).
    /// true / false are accepted for all / float.
    #[arg(long, default_value = "weights", value_name = "MODE")]
    pub quantize_lm_head: String,

    /// Engine that runs the fp32 graph for calibration and the report: auto (ort, else tract), ort, tract.
    #[arg(long, default_value = "auto", value_name = "BACKEND")]
    pub calibration_backend: String,

    /// Task problems (the `r1-eval` JSONL format, e.g. tests/fixtures/arith-r1/heldout.jsonl) to score the fp32
    /// and the quantized model on; the accuracies go into calibration/report.json. Scoring fp32 needs the fp32
    /// export, so this stages one (see --calibration-data).
    #[arg(long, value_name = "FILE")]
    pub eval_problems: Option<PathBuf>,

    /// Score at most N problems of --eval-problems.
    #[arg(long, value_name = "N")]
    pub eval_limit: Option<usize>,

    /// Export fp32 to a staging directory and rewrite it, even for int8-wo / int4-wo without calibration data,
    /// which otherwise quantize each weight as it is read (the same tensors; for measuring the two side by side).
    #[arg(long, hide = true)]
    pub quantize_staged: bool,
}

impl QuantArgs {
    /// The options for `precision`; errors name the flag and the value given. `gpu_target` is a TensorRT target
    /// among the export's `--target`s, if any (it decides `--int4-scheme auto`, and rules out `asymmetric`).
    pub fn options(&self, precision: Precision, gpu_target: Option<&str>) -> Result<QuantizeOptions> {
        let int4_asymmetric = match (self.int4_scheme.as_str(), gpu_target) {
            ("symmetric", _) => false,
            ("auto", g) => g.is_none(),
            ("asymmetric", None) => true,
            ("asymmetric", Some(t)) if precision == Precision::Int4WeightOnly => {
                return Err(ExportError::InvalidOption {
                    option: "--int4-scheme",
                    message: format!(
                        "`asymmetric` cannot be built for --target {t}: TensorRT's block-quantized INT4 takes no zero points; use symmetric (or auto)"
                    ),
                })
            }
            ("asymmetric", Some(_)) => true,
            (other, _) => {
                return Err(ExportError::InvalidOption {
                    option: "--int4-scheme",
                    message: format!("must be auto, asymmetric or symmetric, got `{other}`"),
                })
            }
        };
        let method = self.calibration_method.parse().map_err(|e: CalibError| ExportError::InvalidOption {
            option: "--calibration-method",
            message: e.to_string(),
        })?;
        let backend = self.calibration_backend.parse().map_err(|e: r1_engine::EngineError| {
            ExportError::InvalidOption { option: "--calibration-backend", message: e.to_string() }
        })?;
        Ok(QuantizeOptions {
            precision,
            calibration_data: self.calibration_data.clone(),
            method,
            smoothquant_alpha: self.smoothquant_alpha,
            samples: self.calibration_samples,
            seq_len: self.calibration_seq_len,
            eval_samples: self.report_samples,
            block_size: self.int4_block_size,
            int4_asymmetric,
            lm_head: self
                .quantize_lm_head
                .parse()
                .map_err(|message| ExportError::InvalidOption { option: "--quantize-lm-head", message })?,
            backend,
            eval_problems: self.eval_problems.clone(),
            eval_limit: self.eval_limit.unwrap_or(usize::MAX),
            generate_tokens: self.calibration_generate_tokens,
            keep_float: self.keep_float.clone(),
            max_accuracy_loss: self.max_accuracy_loss,
            awq: self.awq == "on",
            staged: self.quantize_staged,
        })
    }
}

/// How the LM head (`lm_head.weight`, or the tied embedding stored under that name) is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LmHead {
    /// Left in fp32.
    Float,
    /// Its weight in the precision's weight form; its input activation stays float (for `int8`: an int8
    /// weight-only MatMul, which `--target cpu` lowers to `MatMulNBits`). The same as `All` for the weight-only
    /// precisions.
    Weights,
    /// Like every other MatMul (for `int8`: the input activation is quantized per tensor too).
    All,
}

impl LmHead {
    /// The CLI / manifest spelling.
    pub fn name(self) -> &'static str {
        match self {
            LmHead::Float => "float",
            LmHead::Weights => "weights",
            LmHead::All => "all",
        }
    }
}

impl std::str::FromStr for LmHead {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "float" | "false" | "no" => Ok(LmHead::Float),
            "weights" => Ok(LmHead::Weights),
            "all" | "true" | "yes" => Ok(LmHead::All),
            other => Err(format!("must be float, weights or all, got `{other}`")),
        }
    }
}
