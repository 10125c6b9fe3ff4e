//! r1-export: HuggingFace DeepSeek-R1-family checkpoint → ONNX decoder graph with KV cache →
//! artifact directory (`model.onnx`, `model.onnx.data`, tokenizer files, `manifest.json`).
//!
//! Code map:
//! - [`checkpoint`]: config.json and safetensors (single or sharded, memory-mapped, streamed).
//! - [`arch`]: one file per model family; `common.rs` holds the shared layer pieces.
//! - [`onnx`]: the typed graph builder and the external-data writer.
//! - [`artifact`]: atomic artifact directory, file hashes.
//! - [`fixture`]: random-weight checkpoints of any family and shape (`r1-fixture`).
//! - [`quantize`]: `--precision int8 | int8-wo | int4-wo` (calibration on the engine, QDQ rewrite, quality report).
//!
//! Architecture invariant: graph building never runs a model; it only reads weights and writes bytes.

pub mod arch;
pub mod artifact;
pub mod build_lock;
pub mod checkpoint;
pub mod draft;
pub mod engines;
pub mod error;
pub mod fixture;
pub mod onnx;
pub mod quantize;
pub mod target;

use std::path::{Path, PathBuf};

use prost::Message;
pub use r1_engine::manifest::names::{DATA_FILE, MODEL_FILE};
use r1_engine::manifest::{ExporterInfo, Manifest, SourceInfo, Targets, MANIFEST_VERSION};
pub use r1_engine::manifest::{Family, Precision};

pub use error::{ExportError, Result};
use onnx::{ElemType, ExternalDataWriter, GraphBuilder};

/// Default ONNX opset (see [`onnx`] for why 17).
pub const DEFAULT_OPSET: i64 = 17;

/// Element type of the graph's weights, activations and KV cache for a float `precision`: `export` writes fp32 or
/// fp16 graphs; the quantized precisions are an fp32 export rewritten by [`quantize::export_quantized`].
pub fn elem_type(precision: Precision) -> Result<ElemType> {
    match precision {
        Precision::Fp32 => Ok(ElemType::F32),
        Precision::Fp16 => Ok(ElemType::F16),
        p => Err(ExportError::InvalidOption {
            option: "--precision",
            message: format!("export() writes fp32 or fp16 graphs; `{p}` is an fp32 export quantized afterwards (quantize::export_quantized)"),
        }),
    }
}

/// What to export and where.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// HF checkpoint directory.
    pub checkpoint: PathBuf,
    /// Artifact directory to create.
    pub out_dir: PathBuf,
    /// Export precision.
    pub precision: Precision,
    /// Default-domain opset (17..=21).
    pub opset: i64,
    /// Target name (`cpu`); GPU targets come with the engine-build issue.
    pub target: String,
    /// Export the draft graph (`mtp.onnx`, DeepseekV3's multi-token-prediction module) when the checkpoint's
    /// config declares one (`num_nextn_predict_layers > 0`); `false` is `r1-export --no-draft`.
    pub draft: bool,
}

impl ExportOptions {
    /// fp32, opset 17, target cpu.
    pub fn new(checkpoint: impl Into<PathBuf>, out_dir: impl Into<PathBuf>) -> Self {
        ExportOptions {
            checkpoint: checkpoint.into(),
            out_dir: out_dir.into(),
            precision: Precision::Fp32,
            opset: DEFAULT_OPSET,
            target: "cpu".into(),
            draft: true,
        }
    }
}

/// Progress notifications of [`export`].
#[derive(Debug, Clone)]
pub enum Progress<'a> {
    /// Weight conversion starts; total bytes of checkpoint weights.
    Start {
        /// Bytes to read.
        total_bytes: u64,
    },
    /// One tensor has been written.
    Tensor {
        /// Checkpoint key.
        name: &'a str,
        /// Source bytes consumed.
        bytes: u64,
    },
    /// Hashing and renaming.
    Finishing,
}

/// Exports a checkpoint; returns the manifest written.
pub fn export(opts: &ExportOptions, progress: &mut dyn FnMut(Progress)) -> Result<Manifest> {
    export_with(opts, None, progress)
}

/// [`export`]; with `stream`, a weight-only quantized export without fp32 staging ([`quantize`]): the fp32 graph
/// is built with its MatMul weights quantized as they are read, then rewritten, and `stream` completes the
/// manifest (precision, report, quantization record) before the artifact is committed.
pub(crate) fn export_with(
    opts: &ExportOptions,
    mut stream: Option<&mut quantize::stream::Streamed<'_>>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Manifest> {
    if opts.target != "cpu" {
        return Err(ExportError::InvalidOption {
            option: "--target",
            message: format!("must be `cpu` (GPU targets are not available yet), got `{}`", opts.target),
        });
    }
    let (config_path, config) = checkpoint::read_config(&opts.checkpoint)?;
    let family = arch::from_config(&config_path, &config)?;
    let ck = checkpoint::Checkpoint::open(&opts.checkpoint)?;
    let draft_layer = family.draft_layer().filter(|_| opts.draft);
    if draft_layer.is_some() {
        family.check_draft(&ck)?;
    }
    // Validate the opset before creating anything on disk.
    GraphBuilder::new(opts.opset, None)?;
    let tmp = artifact::TempArtifact::create(&opts.out_dir)?;

    progress(Progress::Start { total_bytes: ck.total_bytes() });
    let builder = match stream.as_mut() {
        Some(s) => GraphBuilder::streaming(opts.opset, s.weights(tmp.path())?)?,
        None => GraphBuilder::new(opts.opset, Some(ExternalDataWriter::create(tmp.path(), DATA_FILE)?))?,
    };
    let dtype = elem_type(opts.precision)?;
    let (b, kv_dtype) = {
        let mut ctx = arch::common::Ctx {
            b: builder,
            ck: &ck,
            dtype,
            progress: Box::new(|name, bytes| progress(Progress::Tensor { name, bytes })),
            last_hidden_state: draft_layer.is_some(),
        };
        family.build(&mut ctx)?;
        let kv_dtype = ctx.kv_dtype();
        (ctx.b, kv_dtype)
    };
    let inputs = b.inputs().to_vec();
    let outputs = b.outputs().to_vec();
    let doc = format!(
        "{} ({}) exported by r1-export {} at {} precision, opset {}",
        family.architecture(),
        family.family(),
        env!("CARGO_PKG_VERSION"),
        opts.precision.name(),
        opts.opset
    );
    let (model, data) = match stream.as_mut() {
        Some(s) => {
            let (mut model, weights) = b.finish_streamed(family.family().name(), &doc)?;
            let data = s.rewrite(&mut model, weights)?;
            (model, Some(data))
        }
        None => b.finish(family.family().name(), &doc)?,
    };
    let draft = match draft_layer {
        Some(layer) => Some(draft::export_draft(family.as_ref(), &ck, tmp.path(), opts, layer, &mut *progress)?),
        None => None,
    };
    progress(Progress::Finishing);

    let model_path = tmp.path().join(MODEL_FILE);
    std::fs::write(&model_path, model.encode_to_vec()).map_err(ExportError::io(&model_path))?;
    let mut files = artifact::copy_checkpoint_files(&opts.checkpoint, tmp.path())?;
    files.insert(MODEL_FILE.into(), artifact::hash_file(&model_path)?);
    if let Some(d) = data {
        files.insert(d.location.clone(), r1_engine::manifest::FileEntry { sha256: d.sha256, bytes: d.bytes });
    }

    let draft = draft.map(|(record, entries)| {
        files.extend(entries);
        record
    });

    let mut notes = family.notes();
    if let (None, Some(layer)) = (&draft, family.draft_layer()) {
        notes.push(format!(
            "skipped the multi-token-prediction module model.layers.{layer} (--no-draft): no draft graph"
        ));
    }
    if !Path::new(&opts.checkpoint).join("tokenizer.json").is_file() {
        notes.push("checkpoint has no tokenizer.json; the artifact cannot tokenize text".into());
    }
    let ignored_config_keys = arch::config_keys::ignored_config_keys(&config);
    let unknown: Vec<&str> = ignored_config_keys
        .iter()
        .filter(|(_, why)| *why == arch::config_keys::UNKNOWN)
        .map(|(k, _)| k.as_str())
        .collect();
    if !unknown.is_empty() {
        notes.push(format!(
            "config.json keys r1-export does not know and did not read: {} (source.ignored_config_keys)",
            unknown.join(", ")
        ));
    }
    let mut manifest = Manifest {
        format_version: MANIFEST_VERSION,
        exporter: ExporterInfo { name: "r1-export".into(), version: env!("CARGO_PKG_VERSION").into() },
        family: family.family(),
        architecture: family.architecture().into(),
        precision: opts.precision,
        opset: opts.opset,
        source: SourceInfo {
            dtype: ck.dominant_dtype(),
            fp8_block_quantized: family.fp8_block_quantized(),
            notes,
            ignored_config_keys,
        },
        model: family.model_info(),
        config: family.resolved_config(),
        inputs,
        outputs,
        kv_cache: family.kv_cache(kv_dtype),
        files,
        targets: Targets::default(),
        quantization: None,
        draft,
    };
    if let Some(s) = stream {
        s.complete(&mut manifest, tmp.path())?;
    }
    tmp.commit(&manifest)?;
    Ok(manifest)
}
