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
pub mod checkpoint;
pub mod error;
pub mod fixture;
pub mod onnx;
pub mod quantize;
pub mod target;

use std::path::{Path, PathBuf};

use prost::Message;
use r1_engine::manifest::{ExporterInfo, Manifest, SourceInfo, MANIFEST_VERSION};

pub use error::{ExportError, Result};
use onnx::{ElemType, ExternalDataWriter, GraphBuilder};

/// File name of the graph inside an artifact.
pub const MODEL_FILE: &str = "model.onnx";
/// File name of the external weights.
pub const DATA_FILE: &str = "model.onnx.data";
/// Default ONNX opset (see [`onnx`] for why 17).
pub const DEFAULT_OPSET: i64 = 17;

/// Precision of the exported weights, activations and KV cache. (`int8` variants come from
/// r1-calibration in a later issue.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// float32 everywhere.
    Fp32,
    /// float16 weights, activations and KV cache; RMSNorm variance and softmax in float32; logits float32.
    Fp16,
}

impl Precision {
    /// Manifest name.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
        }
    }
    /// Element type in the graph.
    pub fn elem(self) -> ElemType {
        match self {
            Precision::Fp32 => ElemType::F32,
            Precision::Fp16 => ElemType::F16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = ExportError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "fp16" => Ok(Precision::Fp16),
            other => Err(ExportError::InvalidOption {
                option: "--precision",
                message: format!("must be fp32, fp16, int8, int8-wo or int4-wo, got `{other}`"),
            }),
        }
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
    if opts.target != "cpu" {
        return Err(ExportError::InvalidOption {
            option: "--target",
            message: format!("must be `cpu` (GPU targets are not available yet), got `{}`", opts.target),
        });
    }
    let (config_path, config) = checkpoint::read_config(&opts.checkpoint)?;
    let family = arch::from_config(&config_path, &config)?;
    let ck = checkpoint::Checkpoint::open(&opts.checkpoint)?;
    // Validate the opset before creating anything on disk.
    GraphBuilder::new(opts.opset, None)?;
    let tmp = artifact::TempArtifact::create(&opts.out_dir)?;

    progress(Progress::Start { total_bytes: ck.total_bytes() });
    let writer = ExternalDataWriter::create(tmp.path(), DATA_FILE)?;
    let builder = GraphBuilder::new(opts.opset, Some(writer))?;
    let dtype = opts.precision.elem();
    let (b, kv_dtype) = {
        let mut ctx = arch::common::Ctx {
            b: builder,
            ck: &ck,
            dtype,
            progress: Box::new(|name, bytes| progress(Progress::Tensor { name, bytes })),
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
    let (model, data) = b.finish(family.family(), &doc)?;
    progress(Progress::Finishing);

    let model_path = tmp.path().join(MODEL_FILE);
    std::fs::write(&model_path, model.encode_to_vec()).map_err(ExportError::io(&model_path))?;
    let mut files = artifact::copy_checkpoint_files(&opts.checkpoint, tmp.path())?;
    files.insert(MODEL_FILE.into(), artifact::hash_file(&model_path)?);
    if let Some(d) = data {
        files.insert(d.location.clone(), r1_engine::manifest::FileEntry { sha256: d.sha256, bytes: d.bytes });
    }

    let mut notes = family.notes();
    if !Path::new(&opts.checkpoint).join("tokenizer.json").is_file() {
        notes.push("checkpoint has no tokenizer.json; the artifact cannot tokenize text".into());
    }
    let manifest = Manifest {
        format_version: MANIFEST_VERSION,
        exporter: ExporterInfo { name: "r1-export".into(), version: env!("CARGO_PKG_VERSION").into() },
        family: family.family().into(),
        architecture: family.architecture().into(),
        precision: opts.precision.name().into(),
        opset: opts.opset,
        source: SourceInfo { dtype: ck.dominant_dtype(), fp8_block_quantized: family.fp8_block_quantized(), notes },
        model: family.model_info(),
        config: family.resolved_config(),
        inputs,
        outputs,
        kv_cache: family.kv_cache(kv_dtype),
        files,
        targets: [("cpu".to_string(), serde_json::json!({ "graph": MODEL_FILE }))].into_iter().collect(),
        quantization: None,
    };
    manifest
        .check(&opts.out_dir.join(r1_engine::manifest::MANIFEST_FILE))
        .map_err(|e| ExportError::Graph(format!("manifest failed its own checks: {e}")))?;
    tmp.commit(&manifest)?;
    Ok(manifest)
}
