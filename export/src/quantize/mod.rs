//! `--precision int8 | int8-wo | int4-wo`: export in fp32, calibrate on the engine, rewrite to QDQ, report.
//!
//! 1. The checkpoint is exported in fp32 to a staging directory beside `OUT_DIR` (removed at the end). Weight-only
//!    forms without calibration data, eval problems or `--keep-float` skip it: [`stream`] quantizes each MatMul
//!    weight as it is read, into the same tensors and graph.
//! 2. `int8` (W8A8): calibration samples are read with [`r1_calibration::dataset`], rendered with the artifact's
//!    chat template and tokenized as serving does; the engine runs a copy of the fp32 graph whose MatMul inputs are
//!    extra outputs ([`r1_engine::backend::load_graph`] + [`r1_engine::Backend::run_named`]), one sample per batch,
//!    and streaming observers turn them into scales ([`r1_calibration::calibrate::calibrate_w8a8`], SmoothQuant
//!    folded into the RMSNorm weights first when alpha > 0). Weight-only schemes need no activations.
//! 3. [`r1_calibration::qdq::quantize_model`] rewrites the graph; the artifact gets the new `model.onnx` +
//!    `model.onnx.data`, the tokenizer files, `calibration/report.json` and (int8) `calibration/calibration.cache`.
//! 4. The quality report runs the fp32 and the quantized graph side by side on held-out samples: per-layer SQNR
//!    of every quantized MatMul's output, mean KL and top-1 agreement of next-token distributions; with
//!    `eval_problems`, task accuracy (e.g. arith-r1) of both artifacts.
//!
//! Calibration samples never leave this module as stored activations: each batch is observed and dropped.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message;
use r1_calibration::dataset;
use r1_calibration::observer::CalibrationMethod;
use r1_calibration::qdq::{quantize_model_hashed, QdqOptions, QuantScheme, RewriteSummary};
use r1_calibration::report::{AccuracyRow, QualityReport};
use r1_calibration::CalibError;
use r1_engine::backend::BackendKind;
use r1_engine::eval::{self, EvalOptions};
use r1_engine::manifest::names::{MTP_DATA_FILE, MTP_FILE};
use r1_engine::manifest::{Manifest, Precision};
use r1_engine::text::{ChatTemplate, Tokenizer};
use r1_engine::{Engine, EngineOptions};
use r1_proto::onnx::ModelProto;

use crate::error::{ExportError, Result};

pub(crate) mod banded;
mod cli;
mod passes;
mod runner;
mod samples;
pub(crate) mod stream;

use crate::{artifact, export, ExportOptions, Progress, DATA_FILE, MODEL_FILE};
pub use cli::{LmHead, QuantArgs};
use runner::compare;
pub use samples::DEFAULT_GENERATE_TOKENS;

/// Directory of the calibration outputs inside an artifact.
pub const CALIBRATION_DIR: &str = "calibration";
/// The quality report, relative to the artifact.
pub const REPORT_FILE: &str = "calibration/report.json";
/// The legacy TensorRT calibration cache (int8 only), relative to the artifact.
pub const CACHE_FILE: &str = "calibration/calibration.cache";
/// TensorRT version written in the cache header (10.3; TensorRT only warns on a different version).
pub const TRT_CACHE_VERSION: &str = "100300";
/// Name of the LM head weight in every exported graph.
const LM_HEAD_WEIGHT: &str = "lm_head.weight";

/// The quantization scheme of a quantized `precision`; `None` for fp32 and fp16.
pub fn scheme(precision: Precision, block_size: usize, asymmetric: bool) -> Option<QuantScheme> {
    match precision {
        Precision::Int8 => Some(QuantScheme::W8A8),
        Precision::Int8WeightOnly => Some(QuantScheme::Int8WeightOnly),
        Precision::Int4WeightOnly => Some(QuantScheme::Int4WeightOnly { block_size, asymmetric }),
        Precision::Fp32 | Precision::Fp16 => None,
    }
}

/// The default-domain opset a graph of `precision` needs at least (blocked INT4 needs 21).
pub fn min_opset(precision: Precision) -> i64 {
    scheme(precision, 32, false).map_or(crate::DEFAULT_OPSET, |s| s.min_opset())
}

/// The default-domain opset `r1-export` writes a graph of `precision` from `checkpoint` at when `--opset` is not
/// given: the default raised to [`min_opset`], and 21 for an `int8-wo` checkpoint with routed experts (DeepseekV3),
/// whose expert stacks a streamed export quantizes per channel behind a blocked `DequantizeLinear` ([`stream`]).
pub fn default_opset(precision: Precision, checkpoint: &Path) -> i64 {
    let base = crate::DEFAULT_OPSET.max(min_opset(precision));
    let experts = || {
        crate::checkpoint::read_config(checkpoint)
            .is_ok_and(|(_, c)| c.get("n_routed_experts").and_then(serde_json::Value::as_u64).is_some_and(|n| n > 0))
    };
    if precision == Precision::Int8WeightOnly && experts() {
        base.max(21)
    } else {
        base
    }
}

/// How to calibrate, quantize and report.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// The quantized form.
    pub precision: Precision,
    /// Calibration text (one sample per line) or JSONL (`text` or `messages`). Required for `int8`; for the
    /// weight-only forms it only feeds the quality report.
    pub calibration_data: Option<PathBuf>,
    /// How activation ranges are chosen.
    pub method: CalibrationMethod,
    /// SmoothQuant strength (0 = off).
    pub smoothquant_alpha: f32,
    /// Calibration samples to use (at most).
    pub samples: usize,
    /// Tokens per sample (longer samples are truncated).
    pub seq_len: usize,
    /// Held-out samples for the report, read after the calibration samples.
    pub eval_samples: usize,
    /// INT4 rows per block: 32, 64 or 128.
    pub block_size: usize,
    /// INT4 codes unsigned with a zero point per block (ONNX Runtime's `MatMulNBits` takes them) instead of
    /// symmetric signed codes (what TensorRT's block-quantized INT4 takes). Measured on arith-r1 (BENCHMARKS.md).
    pub int4_asymmetric: bool,
    /// How the LM head is quantized (default [`LmHead::Weights`]: it is the largest single weight, and its input,
    /// the last hidden state, has the widest activations, so `int8` keeps that input float).
    pub lm_head: LmHead,
    /// Backend that runs the fp32 graph during calibration and the report (`auto`: ort, else tract).
    pub backend: BackendKind,
    /// Problems in the `r1-eval` JSONL format to score the fp32 and the quantized artifact on.
    pub eval_problems: Option<PathBuf>,
    /// At most this many problems from `eval_problems`.
    pub eval_limit: usize,
    /// Tokens the fp32 model generates after each open sample (a prompt without its reply) before calibration;
    /// 0 calibrates on the prompts alone.
    pub generate_tokens: usize,
    /// MatMuls left in float, by weight name (`--keep-float`).
    pub keep_float: Vec<String>,
    /// Fail the export, writing no artifact, when the quantized model scores more than this many points below fp32
    /// on `eval_problems`.
    pub max_accuracy_loss: Option<f64>,
    /// `int4-wo` with calibration data: activation-aware weight scaling ([`r1_calibration::awq`]).
    pub awq: bool,
    /// Export fp32 to a staging directory first even where the weight-only forms stream (no calibration data, no
    /// eval problems, no `--keep-float`; [`stream`]): the same tensors and graph, slower; tests compare the two.
    pub staged: bool,
}

impl QuantizeOptions {
    /// Defaults: MSE calibration, SmoothQuant 0.5, 64 samples × 256 tokens, 8 held-out samples, INT4 block 32, asymmetric.
    ///
    /// MSE, not TensorRT's entropy method, by measurement on arith-r1 (BENCHMARKS.md): entropy clipped the
    /// widest MLP input to 9.4 dB SQNR and changed answers; MSE kept every layer above 30 dB.
    pub fn new(precision: Precision) -> Self {
        QuantizeOptions {
            precision,
            calibration_data: None,
            method: CalibrationMethod::Mse,
            smoothquant_alpha: 0.5,
            samples: dataset::DEFAULT_NUM_SAMPLES,
            seq_len: dataset::DEFAULT_SEQ_LEN,
            eval_samples: 8,
            block_size: 32,
            int4_asymmetric: true,
            lm_head: LmHead::Weights,
            backend: BackendKind::Auto,
            eval_problems: None,
            eval_limit: usize::MAX,
            generate_tokens: DEFAULT_GENERATE_TOKENS,
            keep_float: Vec::new(),
            max_accuracy_loss: None,
            awq: true,
            staged: false,
        }
    }

    /// The quantization scheme of [`QuantizeOptions::precision`]; an error naming the flag when it is fp32 or fp16.
    pub fn scheme(&self) -> Result<QuantScheme> {
        scheme(self.precision, self.block_size, self.int4_asymmetric).ok_or_else(|| ExportError::InvalidOption {
            option: "--precision",
            message: format!("quantization needs int8, int8-wo or int4-wo, got `{}`", self.precision),
        })
    }
}

/// Progress notifications of [`export_quantized`].
#[derive(Debug, Clone)]
pub enum QuantProgress<'a> {
    /// A weight-only export without fp32 staging starts: each MatMul weight is quantized as it is read.
    Streaming,
    /// The fp32 export (see [`Progress`]).
    Export(Progress<'a>),
    /// A calibration pass starts over `batches` samples (`pass` counts from 1; SmoothQuant needs 2).
    Pass { pass: usize, passes: usize, batches: usize },
    /// One calibration sample has been observed.
    Batch { done: usize },
    /// Rewriting the graph.
    Rewriting,
    /// Comparing fp32 and quantized outputs on `samples` held-out samples.
    Report { samples: usize },
    /// The fp32 model generates the replies of `samples` open calibration samples.
    Generating { samples: usize },
    /// Replies of `done` open samples have been generated.
    Generated { done: usize },
    /// Scoring `problems` task problems on the `precision` artifact.
    Eval { precision: &'a str, problems: usize },
    /// One batch of problems was scored.
    EvalProgress { done: usize, correct: usize },
}

/// Removes a directory when dropped.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Exports `opts.checkpoint` quantized per `q` into `opts.out_dir` (whose precision field is ignored).
/// Returns the manifest and the quality report written into the artifact.
pub fn export_quantized(
    opts: &ExportOptions,
    q: &QuantizeOptions,
    progress: &mut dyn FnMut(QuantProgress<'_>),
) -> Result<(Manifest, QualityReport)> {
    validate(opts, q)?;
    // Fail on an unusable OUT_DIR before minutes of work.
    drop(artifact::TempArtifact::create(&opts.out_dir)?);
    if stream::streamable(q) {
        return stream::export_streamed(opts, q, progress);
    }
    let staging_dir = sibling(&opts.out_dir, "fp32")?;
    let _ = std::fs::remove_dir_all(&staging_dir);
    let staging = Staging(staging_dir.clone());
    let fp32_opts = ExportOptions { out_dir: staging_dir.clone(), precision: crate::Precision::Fp32, ..opts.clone() };
    let fp32_manifest = export(&fp32_opts, &mut |p| progress(QuantProgress::Export(p)))?;

    let (tokenizer, template) = text_of(&staging.0, q)?;
    let (calib, held_out, sources) = match (&q.calibration_data, &tokenizer) {
        (Some(path), Some(tokenizer)) => {
            let s = samples::read(path, q, tokenizer, template.as_ref(), &staging.0, progress)?;
            (s.calibration, s.held_out, Some(s.sources))
        }
        _ => (Vec::new(), Vec::new(), None),
    };

    let mut model = read_model(&staging.0.join(MODEL_FILE))?;
    let original = model.clone();
    let reader = r1_calibration::external::ExternalDataReader::new(&staging.0);
    let mut qopts = qdq_options(q, &original)?;
    let pass_input =
        passes::PassInput { reader: &reader, staging: &staging.0, manifest: &fp32_manifest, q, calib: &calib };
    let cal = if q.precision == Precision::Int8 {
        Some(passes::calibrate_int8(&mut model, &pass_input, progress)?)
    } else {
        None
    };
    let awq = if q.precision == Precision::Int4WeightOnly && q.awq && !calib.is_empty() {
        Some(passes::awq_int4(&mut model, &pass_input, progress)?)
    } else {
        None
    };
    let batches = cal.as_ref().map_or(if awq.is_some() { calib.len() } else { 0 }, |c| c.batches);
    if let Some(c) = &cal {
        qopts.activation_scales = c.scales.clone();
    }
    let (cache, cal_json) = match (cal, &awq) {
        (Some(c), _) => (Some(c.cache), c.json),
        (None, Some(a)) => (None, serde_json::json!({ "awq": a })),
        (None, None) => (None, serde_json::Value::Null),
    };

    progress(QuantProgress::Rewriting);
    let tmp = artifact::TempArtifact::create(&opts.out_dir)?;
    // The draft graph (DeepseekV3's MTP module, `manifest.draft`) is carried over at fp32, unquantized.
    for rel in [MTP_FILE, MTP_DATA_FILE] {
        let (from, to) = (staging.0.join(rel), tmp.path().join(rel));
        if from.is_file() {
            std::fs::rename(&from, &to).map_err(ExportError::io(&to))?;
        }
    }
    let (summary, data) = quantize_model_hashed(&mut model, &staging.0, tmp.path(), DATA_FILE, &qopts)?;
    // Hashed as it was written: the artifact's largest file is not read again.
    let data = data.sha256.map(|sha256| r1_engine::manifest::FileEntry { sha256, bytes: data.bytes });
    let model_path = tmp.path().join(MODEL_FILE);
    std::fs::write(&model_path, model.encode_to_vec()).map_err(ExportError::io(&model_path))?;
    let cal_dir = tmp.path().join(CALIBRATION_DIR);
    std::fs::create_dir_all(&cal_dir).map_err(ExportError::io(&cal_dir))?;
    if let Some(c) = &cache {
        let p = tmp.path().join(CACHE_FILE);
        std::fs::write(&p, c.to_text()).map_err(ExportError::io(&p))?;
    }

    let mut manifest = fp32_manifest.clone();
    manifest.precision = q.precision;
    let mut report = QualityReport {
        precision: q.precision.name().into(),
        method: if q.precision == Precision::Int8 {
            Some(q.method.to_string())
        } else {
            awq.as_ref().map(|a| format!("awq ({} of {} inputs scaled)", a.folds.smoothed.len(), a.choices.len()))
        },
        smoothquant_alpha: if q.precision == Precision::Int8 { q.smoothquant_alpha } else { 0.0 },
        samples: batches,
        tokens: sources,
        kept_float: q.keep_float.clone(),
        left_float: summary.left_float(),
        layers: Vec::new(),
        end_to_end: None,
        accuracy: Vec::new(),
    };
    if !held_out.is_empty() {
        progress(QuantProgress::Report { samples: held_out.len() });
        let (layers, e2e) =
            compare(&staging.0, &original, tmp.path(), &model, &summary, &manifest, &held_out, q.backend)?;
        report.layers = layers;
        report.end_to_end = e2e;
    }
    // The task evaluation runs on the finished artifact while it is still in its temporary directory: an export
    // that fails `--max-accuracy-loss` leaves no artifact behind.
    report.write(&tmp.path().join(REPORT_FILE))?;
    manifest.files = artifact_files(&opts.checkpoint, tmp.path(), data)?;
    manifest.quantization = Some(quantization_json(q, &summary, &calib, batches, cal_json.clone(), &report, 0));
    manifest.write_atomic(tmp.path())?;
    if let (Some(path), Some(tokenizer)) = (&q.eval_problems, &tokenizer) {
        let dirs = [(staging.0.as_path(), "fp32"), (tmp.path(), q.precision.name())];
        report.accuracy = evaluate_accuracy(path, &dirs, q, tokenizer, template.as_ref(), progress)?;
        check_accuracy_loss(&report, q)?;
        // Only the report changed: rewrite it and its hash, not every file's.
        report.write(&tmp.path().join(REPORT_FILE))?;
        manifest.files.insert(REPORT_FILE.into(), artifact::hash_file(&tmp.path().join(REPORT_FILE))?);
        manifest.quantization = Some(quantization_json(q, &summary, &calib, batches, cal_json, &report, 0));
    }
    tmp.commit(&manifest)?;
    drop(staging);
    Ok((manifest, report))
}

/// `--max-accuracy-loss`: an error naming both accuracies and the limit when the quantized model lost more points.
fn check_accuracy_loss(report: &QualityReport, q: &QuantizeOptions) -> Result<()> {
    let (Some(limit), [fp32, quant]) = (q.max_accuracy_loss, report.accuracy.as_slice()) else {
        return Ok(());
    };
    let loss = fp32.percent() - quant.percent();
    if loss > limit {
        return Err(ExportError::AccuracyLoss {
            precision: quant.precision.clone(),
            fp32: format!("{:.1}% ({}/{})", fp32.percent(), fp32.correct, fp32.total),
            quantized: format!("{:.1}% ({}/{})", quant.percent(), quant.correct, quant.total),
            loss,
            limit,
        });
    }
    Ok(())
}

/// The tokenizer and chat template of the exported checkpoint, when samples or eval problems need text. They are
/// needed only to read text, so a weight-only export of a checkpoint without tokenizer files works. No template is
/// fine for plain-text samples; one that does not compile is an error, not "no template".
fn text_of(dir: &Path, q: &QuantizeOptions) -> Result<(Option<Tokenizer>, Option<ChatTemplate>)> {
    if q.calibration_data.is_none() && q.eval_problems.is_none() {
        return Ok((None, None));
    }
    let tokenizer = Tokenizer::from_dir(dir).map_err(|e| calib_input(format!("loading the tokenizer: {e}")))?;
    let template = match ChatTemplate::from_config(tokenizer.config(), None, false) {
        Ok(t) => Some(t),
        Err(r1_engine::text::TextError::NoChatTemplate { .. }) => None,
        Err(e) => return Err(calib_input(format!("the checkpoint's chat template: {e}"))),
    };
    Ok((Some(tokenizer), template))
}

/// The files of the quantized artifact in `dir` with their sha256: the checkpoint's text files (copied in), the
/// graph and its weights (`data`: their entry when already known), the report and the TensorRT cache when written.
fn artifact_files(
    checkpoint: &Path,
    dir: &Path,
    data: Option<r1_engine::manifest::FileEntry>,
) -> Result<BTreeMap<String, r1_engine::manifest::FileEntry>> {
    let mut files = artifact::copy_checkpoint_files(checkpoint, dir)?;
    for rel in [MODEL_FILE, DATA_FILE, REPORT_FILE, CACHE_FILE, MTP_FILE, MTP_DATA_FILE] {
        let p = dir.join(rel);
        if p.is_file() {
            let known = data.clone().filter(|_| rel == DATA_FILE);
            files.insert(rel.into(), known.map_or_else(|| artifact::hash_file(&p), Ok)?);
        }
    }
    Ok(files)
}

/// The QDQ rewrite options of `q`: its scheme, MoE routers excluded, the LM head excluded, weight-only or fully
/// quantized, and the
/// `--keep-float` MatMuls excluded (each names a MatMul of `model`, by node name as the report lists it or by
/// weight name).
fn qdq_options(q: &QuantizeOptions, model: &ModelProto) -> Result<QdqOptions> {
    let mut qopts = QdqOptions::new(q.scheme()?);
    // MoE routers stay float32 in every precision (the exporter keeps them so for fp16 too).
    let routers = model.graph.iter().flat_map(|g| &g.initializer).filter_map(|t| t.name.as_deref());
    for name in routers.filter(|n| n.ends_with(crate::arch::deepseek_v3::ROUTER_WEIGHT_SUFFIX)) {
        qopts.exclude.insert(name.to_string());
    }
    if !q.keep_float.is_empty() {
        // node name -> weight name, for every MatMul
        let matmuls: BTreeMap<&str, &str> = model
            .graph
            .iter()
            .flat_map(|g| &g.node)
            .filter(|n| n.op_type.as_deref() == Some("MatMul"))
            .filter_map(|n| Some((n.name.as_deref()?, n.input.get(1)?.as_str())))
            .collect();
        for name in &q.keep_float {
            let weight = matmuls.get(name.as_str()).copied().or_else(|| matmuls.values().copied().find(|w| w == name));
            let Some(weight) = weight else {
                let near: Vec<&str> = matmuls.keys().copied().filter(|n| n.contains(name.as_str())).take(5).collect();
                return Err(ExportError::InvalidOption {
                    option: "--keep-float",
                    message: format!(
                        "`{name}` names no MatMul of this graph ({} MatMuls; give a node name as the report lists \
                         it, e.g. `{}`, or its weight's name){}",
                        matmuls.len(),
                        matmuls.keys().next().unwrap_or(&"-"),
                        if near.is_empty() {
                            String::new()
                        } else {
                            format!("; names containing it: {}", near.join(", "))
                        }
                    ),
                });
            };
            qopts.exclude.insert(weight.to_string());
        }
    }
    match q.lm_head {
        LmHead::Float => {
            qopts.exclude.insert(LM_HEAD_WEIGHT.to_string());
        }
        LmHead::Weights => {
            qopts.weight_only.insert(LM_HEAD_WEIGHT.to_string());
        }
        LmHead::All => {}
    }
    Ok(qopts)
}

/// Greedy accuracy on the eval problems of every artifact in `dirs` (fp32 first, then the quantized one).
fn evaluate_accuracy(
    problems_file: &Path,
    dirs: &[(&Path, &'static str)],
    q: &QuantizeOptions,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    progress: &mut dyn FnMut(QuantProgress<'_>),
) -> Result<Vec<AccuracyRow>> {
    let problems = eval::load_problems(problems_file).map_err(|e| calib_input(e.to_string()))?;
    let problems = &problems[..problems.len().min(q.eval_limit)];
    let template = template.ok_or(ExportError::Calibration(CalibError::Source(
        "the checkpoint has no chat template, so eval problems cannot be rendered".into(),
    )))?;
    let mut rows = Vec::new();
    for (dir, name) in dirs {
        progress(QuantProgress::Eval { precision: name, problems: problems.len() });
        let mut engine = Engine::load(dir, &EngineOptions { backend: q.backend, ..Default::default() })?;
        let r = eval::evaluate(
            &mut engine,
            tokenizer,
            template,
            problems,
            &EvalOptions::default(),
            &mut |done, _, correct| progress(QuantProgress::EvalProgress { done, correct }),
        )
        .map_err(|e| calib_input(e.to_string()))?;
        rows.push(AccuracyRow { precision: (*name).into(), correct: r.correct as u32, total: r.total as u32 });
    }
    Ok(rows)
}

fn validate(opts: &ExportOptions, q: &QuantizeOptions) -> Result<()> {
    let bad = |option: &'static str, message: String| Err(ExportError::InvalidOption { option, message });
    q.scheme()?;
    if opts.opset < min_opset(q.precision) {
        return bad(
            "--opset",
            format!(
                "must be at least {} for --precision {} (DequantizeLinear with block_size), got {}",
                min_opset(q.precision),
                q.precision.name(),
                opts.opset
            ),
        );
    }
    if q.precision == Precision::Int8 && q.calibration_data.is_none() {
        return bad(
            "--calibration-data",
            "is required for --precision int8 (activation ranges are calibrated); give a text or JSONL file".into(),
        );
    }
    if ![32, 64, 128].contains(&q.block_size) {
        return bad("--int4-block-size", format!("must be 32, 64 or 128, got {}", q.block_size));
    }
    if q.samples == 0 || q.seq_len == 0 {
        return bad(
            "--calibration-samples/--calibration-seq-len",
            format!("must be at least 1, got {} and {}", q.samples, q.seq_len),
        );
    }
    match q.max_accuracy_loss {
        Some(limit) if !(limit >= 0.0 && limit.is_finite()) => {
            return bad("--max-accuracy-loss", format!("must be a number of points ≥ 0, got {limit}"));
        }
        Some(_) if q.eval_problems.is_none() => {
            return bad(
                "--max-accuracy-loss",
                "needs --eval-problems (the problems both models are scored on), which was not given".into(),
            );
        }
        _ => {}
    }
    r1_calibration::smoothquant::validate_alpha(q.smoothquant_alpha)?;
    Ok(())
}

/// `<parent>/.<name>.<tag>-<pid>` beside `out`.
fn sibling(out: &Path, tag: &str) -> Result<PathBuf> {
    let name = out.file_name().ok_or_else(|| ExportError::Output {
        path: out.to_path_buf(),
        message: "output path has no directory name".into(),
    })?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(parent.join(format!(".{}.{tag}-{}", name.to_string_lossy(), std::process::id())))
}

fn calib_input(message: String) -> ExportError {
    ExportError::Calibration(CalibError::Source(message))
}

pub(crate) fn read_model(path: &Path) -> Result<ModelProto> {
    let bytes = std::fs::read(path).map_err(ExportError::io(path))?;
    ModelProto::decode(bytes.as_slice())
        .map_err(|e| ExportError::Graph(format!("{}: cannot decode: {e}", path.display())))
}

fn quantization_json(
    q: &QuantizeOptions,
    summary: &RewriteSummary,
    calib: &[Vec<u32>],
    batches: usize,
    calibration: serde_json::Value,
    report: &QualityReport,
    expert_stacks: usize,
) -> serde_json::Value {
    serde_json::json!({
        "precision": q.precision.name(),
        "scheme": scheme(q.precision, q.block_size, q.int4_asymmetric),
        "method": (q.precision == Precision::Int8).then(|| q.method.to_string()),
        "smoothquant_alpha": if q.precision == Precision::Int8 { q.smoothquant_alpha } else { 0.0 },
        "calibration_samples": batches,
        "calibration_tokens": calib.iter().take(batches).map(Vec::len).sum::<usize>(),
        "calibration_token_sources": report.tokens,
        "keep_float": q.keep_float,
        "quantized_matmuls": summary.quantized.len(),
        "lm_head": q.lm_head.name(),
        "skipped_matmuls": summary.skipped,
        // Routed-expert stacks written quantized (a streamed export, `stream.rs`); a staged one keeps them float.
        "quantized_expert_stacks": expert_stacks,
        "report": REPORT_FILE,
        "trt_calibration_cache": (q.precision == Precision::Int8).then_some(CACHE_FILE),
        "end_to_end": report.end_to_end,
        "calibration": calibration,
    })
}

#[cfg(test)]
mod tests;
