//! The one error type of `r1-export`. Every message names the file or tensor concerned, what was
//! expected and what was found, so a failed export can be fixed from the message alone.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = ExportError> = std::result::Result<T, E>;

/// Everything that can go wrong while reading a checkpoint, building a graph or writing an artifact.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A required file of the checkpoint is missing.
    #[error("{path}: file not found (expected {what})")]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
        /// What the file should have held.
        what: &'static str,
    },
    /// A JSON file (config.json, the shard index) is not valid JSON or lacks a required field.
    #[error("{path}: invalid JSON: {message}")]
    Json {
        /// The file concerned.
        path: PathBuf,
        /// serde_json's message (it names the line, column and field).
        message: String,
    },
    /// `architectures[0]` names a family this exporter does not know.
    #[error("{path}: unsupported architecture `{got}`; supported: {supported}")]
    UnknownArchitecture {
        /// config.json.
        path: PathBuf,
        /// What the checkpoint declared.
        got: String,
        /// Comma-separated list of supported `architectures` values.
        supported: String,
    },
    /// A config value is out of range or inconsistent with another.
    #[error("{path}: `{field}` {message}")]
    InvalidConfig {
        /// config.json.
        path: PathBuf,
        /// The offending field.
        field: &'static str,
        /// What is wrong, with the value given and what was expected.
        message: String,
    },
    /// `rope_scaling` asks for a scaling kind the graph does not implement.
    #[error("{path}: unsupported rope_scaling type `{kind}`; supported: {supported}")]
    UnsupportedRopeScaling {
        /// config.json.
        path: PathBuf,
        /// The `rope_type` / `type` value.
        kind: String,
        /// Supported kinds.
        supported: &'static str,
    },
    /// The checkpoint lacks a tensor the family needs.
    #[error("tensor `{name}` not found in {searched} (expected shape {expected:?})")]
    MissingTensor {
        /// Checkpoint key.
        name: String,
        /// Where it was looked for (file or index).
        searched: String,
        /// The shape it should have.
        expected: Vec<usize>,
    },
    /// A tensor has the wrong shape.
    #[error("{file}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The safetensors file.
        file: PathBuf,
        /// Checkpoint key.
        name: String,
        /// Shape required by config.json.
        expected: Vec<usize>,
        /// Shape in the file.
        got: Vec<usize>,
    },
    /// A tensor has a dtype the exporter cannot convert.
    #[error("{file}: tensor `{name}` has dtype {got}, expected one of {expected}")]
    TensorDtype {
        /// The safetensors file.
        file: PathBuf,
        /// Checkpoint key.
        name: String,
        /// Accepted dtypes.
        expected: &'static str,
        /// Dtype in the file.
        got: String,
    },
    /// A safetensors file is malformed or truncated.
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong, with expected and actual sizes when known.
        message: String,
    },
    /// A command-line option is out of range.
    #[error("`{option}` {message}")]
    InvalidOption {
        /// The option (`--opset`, `--precision`, ...).
        option: &'static str,
        /// What is allowed and what was given.
        message: String,
    },
    /// The graph builder was misused (a bug in a family builder, not in the input).
    #[error("graph construction: {0}")]
    Graph(String),
    /// Calibration or quantization failed (`--precision int8 | int8-wo | int4-wo`).
    #[error("calibration: {0}")]
    Calibration(#[from] r1_calibration::CalibError),
    /// The engine failed: running the graph during calibration or evaluation, or a target build.
    #[error(transparent)]
    Engine(#[from] r1_engine::EngineError),
    /// `--max-accuracy-loss`: the quantized model lost more accuracy than allowed; no artifact was written.
    #[error(
        "--max-accuracy-loss: {precision} scored {quantized} against fp32's {fp32} on --eval-problems, a loss of \
         {loss:.1} points, more than the {limit} allowed; no artifact was written (rerun without \
         --max-accuracy-loss to keep it and read calibration/report.json for the worst layers, then try \
         --keep-float on them, more or other --calibration-data, or a wider precision)"
    )]
    AccuracyLoss {
        /// The quantized precision.
        precision: String,
        /// fp32 accuracy, as `96.6% (483/500)`.
        fp32: String,
        /// Quantized accuracy.
        quantized: String,
        /// Points lost.
        loss: f64,
        /// The limit given.
        limit: f64,
    },
    /// The output directory cannot be used.
    #[error("{path}: {message}")]
    Output {
        /// The directory.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

impl ExportError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ExportError {
        let path = path.into();
        move |source| ExportError::Io { path, source }
    }

    /// Stable short label of the error kind (for logs and tests).
    pub fn kind(&self) -> &'static str {
        match self {
            ExportError::Io { .. } => "io",
            ExportError::MissingFile { .. } => "missing_file",
            ExportError::Json { .. } => "json",
            ExportError::UnknownArchitecture { .. } => "unknown_architecture",
            ExportError::InvalidConfig { .. } => "invalid_config",
            ExportError::UnsupportedRopeScaling { .. } => "unsupported_rope_scaling",
            ExportError::MissingTensor { .. } => "missing_tensor",
            ExportError::TensorShape { .. } => "tensor_shape",
            ExportError::TensorDtype { .. } => "tensor_dtype",
            ExportError::Safetensors { .. } => "safetensors",
            ExportError::InvalidOption { .. } => "invalid_option",
            ExportError::Graph(_) => "graph",
            ExportError::Calibration(_) => "calibration",
            ExportError::Engine(_) => "engine",
            ExportError::AccuracyLoss { .. } => "accuracy_loss",
            ExportError::Output { .. } => "output",
        }
    }
}
