//! `--precision int8 | int8-wo | int4-wo`: export in fp32, calibrate on the engine, rewrite to QDQ, report.
//!
//! 1. The checkpoint is exported in fp32 to a staging directory beside `OUT_DIR` (removed at the end).
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
use r1_calibration::calibrate::{calibrate_w8a8, ActivationSource, W8A8Config};
use r1_calibration::dataset::{self, Message as DataMessage};
use r1_calibration::observer::CalibrationMethod;
use r1_calibration::qdq::{quantize_model, QdqOptions, QuantScheme, RewriteSummary};
use r1_calibration::report::{AccuracyRow, QualityReport};
use r1_calibration::trt_cache::{CacheAlgorithm, CalibrationCache};
use r1_calibration::CalibError;
use r1_engine::backend::BackendKind;
use r1_engine::eval::{self, EvalOptions};
use r1_engine::manifest::{Manifest, Precision};
use r1_engine::text::{ChatMessage, ChatTemplate, RenderOptions, Tokenizer};
use r1_engine::{Engine, EngineOptions};
use r1_proto::onnx::ModelProto;

use crate::error::{ExportError, Result};

mod cli;
mod runner;

use crate::{artifact, export, ExportOptions, Progress, DATA_FILE, MODEL_FILE};
pub use cli::QuantArgs;
use runner::{compare, GraphRunner, SampleSource};

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

/// Progress notifications of [`export_quantized`].
#[derive(Debug, Clone)]
pub enum QuantProgress<'a> {
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
    let staging_dir = sibling(&opts.out_dir, "fp32")?;
    let _ = std::fs::remove_dir_all(&staging_dir);
    let staging = Staging(staging_dir.clone());
    let fp32_opts = ExportOptions { out_dir: staging_dir.clone(), precision: crate::Precision::Fp32, ..opts.clone() };
    let fp32_manifest = export(&fp32_opts, &mut |p| progress(QuantProgress::Export(p)))?;

    let (tokenizer, template) = text_of(&staging.0, q)?;
    let (calib, held_out) = match (&q.calibration_data, &tokenizer) {
        (Some(path), Some(tokenizer)) => read_samples(path, q, tokenizer, template.as_ref())?,
        _ => (Vec::new(), Vec::new()),
    };

    let mut model = read_model(&staging.0.join(MODEL_FILE))?;
    let original = model.clone();
    let reader = r1_calibration::external::ExternalDataReader::new(&staging.0);
    let mut qopts = qdq_options(q)?;
    let cal = if q.precision == Precision::Int8 {
        Some(calibrate_int8(&mut model, &reader, &staging.0, &fp32_manifest, q, &calib, progress)?)
    } else {
        None
    };
    let batches = cal.as_ref().map_or(0, |c| c.batches);
    if let Some(c) = &cal {
        qopts.activation_scales = c.scales.clone();
    }
    let (cache, cal_json) = match cal {
        Some(c) => (Some(c.cache), c.json),
        None => (None, serde_json::Value::Null),
    };

    progress(QuantProgress::Rewriting);
    let tmp = artifact::TempArtifact::create(&opts.out_dir)?;
    let summary = quantize_model(&mut model, &staging.0, tmp.path(), DATA_FILE, &qopts)?;
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
        method: (q.precision == Precision::Int8).then(|| q.method.to_string()),
        smoothquant_alpha: if q.precision == Precision::Int8 { q.smoothquant_alpha } else { 0.0 },
        samples: batches,
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
    report.write(&tmp.path().join(REPORT_FILE))?;

    manifest.files = artifact_files(&opts.checkpoint, tmp.path())?;
    manifest.quantization = Some(quantization_json(q, &summary, &calib, batches, cal_json, &report));
    tmp.commit(&manifest)?;

    if let (Some(path), Some(tokenizer)) = (&q.eval_problems, &tokenizer) {
        let dirs = [(staging.0.as_path(), "fp32"), (opts.out_dir.as_path(), q.precision.name())];
        report.accuracy = evaluate_accuracy(path, &dirs, q, tokenizer, template.as_ref(), progress)?;
        rewrite_report(&opts.out_dir, &mut manifest, &report)?;
    }
    drop(staging);
    Ok((manifest, report))
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
/// graph and its weights, the report and the TensorRT cache when written.
fn artifact_files(checkpoint: &Path, dir: &Path) -> Result<BTreeMap<String, r1_engine::manifest::FileEntry>> {
    let mut files = artifact::copy_checkpoint_files(checkpoint, dir)?;
    for rel in [MODEL_FILE, DATA_FILE, REPORT_FILE, CACHE_FILE] {
        let p = dir.join(rel);
        if p.is_file() {
            files.insert(rel.into(), artifact::hash_file(&p)?);
        }
    }
    Ok(files)
}

/// The QDQ rewrite options of `q`: its scheme, and the LM head excluded, weight-only or fully quantized.
fn qdq_options(q: &QuantizeOptions) -> Result<QdqOptions> {
    let mut qopts = QdqOptions::new(q.scheme()?);
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

/// What W8A8 calibration produced: activation scales for the rewrite, the TensorRT cache, and the manifest's record.
struct Int8Calibration {
    batches: usize,
    scales: std::collections::HashMap<String, f32>,
    cache: CalibrationCache,
    json: serde_json::Value,
}

/// Runs the fp32 graph over the calibration samples (two passes with SmoothQuant, whose scales are folded into
/// `model`) and derives the activation scales.
fn calibrate_int8(
    model: &mut ModelProto,
    reader: &r1_calibration::external::ExternalDataReader,
    staging: &Path,
    fp32_manifest: &Manifest,
    q: &QuantizeOptions,
    calib: &[Vec<u32>],
    progress: &mut dyn FnMut(QuantProgress<'_>),
) -> Result<Int8Calibration> {
    let passes = if q.smoothquant_alpha > 0.0 { 2 } else { 1 };
    let mut pass = 0;
    // Both the pass factory and the per-batch callback report progress.
    let shared = std::cell::RefCell::new(progress);
    let mut make_source = |copy: &ModelProto| -> r1_calibration::Result<Box<dyn ActivationSource + '_>> {
        pass += 1;
        (shared.borrow_mut())(QuantProgress::Pass { pass, passes, batches: calib.len() });
        let runner = GraphRunner::open(staging, "calibration.onnx", copy, fp32_manifest, q.backend)
            .map_err(|e| CalibError::Source(e.to_string()))?;
        Ok(Box::new(SampleSource { runner, samples: calib, next: 0 }))
    };
    let cfg = W8A8Config { method: q.method, alpha: q.smoothquant_alpha, max_batches: calib.len() };
    let cal = {
        let mut batch_progress = |done: usize| (shared.borrow_mut())(QuantProgress::Batch { done });
        calibrate_w8a8(model, reader, &mut make_source, cfg, Some(staging), &mut batch_progress)?
    };
    let algorithm = if q.method == CalibrationMethod::Max { CacheAlgorithm::MinMax } else { CacheAlgorithm::Entropy2 };
    let cache = CalibrationCache::from_amax(TRT_CACHE_VERSION, algorithm, &cal.fp32_amax)?;
    let json = serde_json::json!({
        "amax": cal.amax.iter().cloned().collect::<BTreeMap<_, _>>(),
        "smoothquant": cal.smooth,
    });
    Ok(Int8Calibration { batches: cal.batches, scales: cal.scales.into_iter().collect(), cache, json })
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

/// Token ids of the calibration samples and of the held-out samples.
type SampleSplit = (Vec<Vec<u32>>, Vec<Vec<u32>>);

/// Reads, renders and tokenizes samples; returns `(calibration, held_out)` token sequences (each ≤ `seq_len`).
/// Held-out samples come after the calibration samples in the file; a file with a single sample uses it for both.
fn read_samples(
    path: &Path,
    q: &QuantizeOptions,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
) -> Result<SampleSplit> {
    let render = |messages: &[DataMessage]| -> r1_calibration::Result<String> {
        let t = template.ok_or_else(|| {
            CalibError::Source(
                "JSONL `messages` need a chat template, and the checkpoint's tokenizer_config.json has none".into(),
            )
        })?;
        let msgs: Vec<ChatMessage> =
            messages.iter().map(|m| ChatMessage::new(m.role.clone(), m.content.clone())).collect();
        t.render(&msgs, &RenderOptions::default())
            .map_err(|e| CalibError::Source(format!("rendering the chat template: {e}")))
    };
    let texts = dataset::load_samples(path, q.samples.saturating_add(q.eval_samples), &render)?;
    let mut seqs = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        // BOS is added unless the text (e.g. a rendered template) already starts with it.
        let mut ids = tokenizer
            .encode(t, true)
            .map_err(|e| calib_input(format!("{}: sample {}: cannot tokenize: {e}", path.display(), i + 1)))?;
        ids.truncate(q.seq_len);
        if !ids.is_empty() {
            seqs.push(ids);
        }
    }
    if seqs.is_empty() {
        return Err(calib_input(format!("{}: no sample produced any token", path.display())));
    }
    let n = seqs.len();
    let held_out = match (q.eval_samples, n) {
        (0, _) => Vec::new(),
        (_, 1) => seqs.clone(),
        (e, n) => seqs.split_off(n - n.saturating_sub(q.samples).max(1).min(e)),
    };
    seqs.truncate(q.samples);
    Ok((seqs, held_out))
}

fn quantization_json(
    q: &QuantizeOptions,
    summary: &RewriteSummary,
    calib: &[Vec<u32>],
    batches: usize,
    calibration: serde_json::Value,
    report: &QualityReport,
) -> serde_json::Value {
    serde_json::json!({
        "precision": q.precision.name(),
        "scheme": scheme(q.precision, q.block_size, q.int4_asymmetric),
        "method": (q.precision == Precision::Int8).then(|| q.method.to_string()),
        "smoothquant_alpha": if q.precision == Precision::Int8 { q.smoothquant_alpha } else { 0.0 },
        "calibration_samples": batches,
        "calibration_tokens": calib.iter().take(batches).map(Vec::len).sum::<usize>(),
        "quantized_matmuls": summary.quantized.len(),
        "lm_head": q.lm_head.name(),
        "skipped_matmuls": summary.skipped,
        "report": REPORT_FILE,
        "trt_calibration_cache": (q.precision == Precision::Int8).then_some(CACHE_FILE),
        "end_to_end": report.end_to_end,
        "calibration": calibration,
    })
}

/// Writes `report` again into the committed artifact and updates its sha256 in `manifest.json` (atomically).
fn rewrite_report(dir: &Path, manifest: &mut Manifest, report: &QualityReport) -> Result<()> {
    report.write(&dir.join(REPORT_FILE))?;
    manifest.files.insert(REPORT_FILE.into(), artifact::hash_file(&dir.join(REPORT_FILE))?);
    Ok(manifest.write_atomic(dir)?)
}
