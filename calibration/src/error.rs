//! The one error type of `r1-calibration`.
use std::path::PathBuf;

/// Errors raised by calibration, quantization and graph rewriting.
///
/// Messages name the thing at fault, the expected value or limit, and the value given.
#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    /// A parameter is outside its valid range.
    #[error("`{name}` must be {expected}, got {got}")]
    InvalidArgument {
        /// The parameter (e.g. `alpha`, `block_size`).
        name: String,
        /// What was expected, in words (e.g. "between 0 and 1").
        expected: String,
        /// The value given.
        got: String,
    },
    /// Buffer lengths disagree with the shape they are meant to have.
    #[error("{what}: expected {expected} elements, got {got}")]
    ShapeMismatch {
        /// The tensor or buffer.
        what: String,
        /// Element count implied by the shape.
        expected: usize,
        /// Element count given.
        got: usize,
    },
    /// A NaN or infinity where finite numbers are required.
    #[error("{what}: element {index} is not finite ({value})")]
    NonFinite {
        /// The tensor or buffer.
        what: String,
        /// Index of the first offending element.
        index: usize,
        /// The value found.
        value: f32,
    },
    /// An observer was asked for a range before it saw any data.
    #[error("observer for `{tensor}` has seen no data")]
    EmptyObserver {
        /// The observed tensor.
        tensor: String,
    },
    /// Reading or writing a file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("reading", "writing", "creating").
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A calibration data file has a bad line.
    #[error("{path}:{line}: {problem}")]
    Dataset {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        problem: String,
    },
    /// The ONNX model does not have the structure the rewrite needs.
    #[error("ONNX graph, {item}: {problem}")]
    Graph {
        /// The node, tensor or attribute at fault.
        item: String,
        /// What is wrong with it.
        problem: String,
    },
    /// An external-data reference is invalid or points outside its file.
    #[error("external data of tensor `{tensor}` ({path}): {problem}")]
    ExternalData {
        /// The initializer.
        tensor: String,
        /// The data file the reference names.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A TensorRT calibration cache could not be parsed.
    #[error("calibration cache line {line}: {problem}")]
    CacheFormat {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        problem: String,
    },
    /// JSON (de)serialization failed.
    #[error("JSON for {what}: {source}")]
    Json {
        /// What was being (de)serialized.
        what: String,
        /// The serde_json error.
        #[source]
        source: serde_json::Error,
    },
    /// The activation source (the engine running the fp32 graph) failed.
    #[error("activation source: {0}")]
    Source(String),
}

impl CalibError {
    /// A stable, short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            CalibError::InvalidArgument { .. } => "invalid_argument",
            CalibError::ShapeMismatch { .. } => "shape_mismatch",
            CalibError::NonFinite { .. } => "non_finite",
            CalibError::EmptyObserver { .. } => "empty_observer",
            CalibError::Io { .. } => "io",
            CalibError::Dataset { .. } => "dataset",
            CalibError::Graph { .. } => "graph",
            CalibError::ExternalData { .. } => "external_data",
            CalibError::CacheFormat { .. } => "cache_format",
            CalibError::Json { .. } => "json",
            CalibError::Source(_) => "source",
        }
    }

    /// Shorthand for [`CalibError::InvalidArgument`].
    pub fn invalid(name: impl Into<String>, expected: impl Into<String>, got: impl ToString) -> Self {
        CalibError::InvalidArgument { name: name.into(), expected: expected.into(), got: got.to_string() }
    }

    /// Shorthand for [`CalibError::Graph`].
    pub fn graph(item: impl Into<String>, problem: impl Into<String>) -> Self {
        CalibError::Graph { item: item.into(), problem: problem.into() }
    }
}

/// Result alias for this crate.
pub type Result<T, E = CalibError> = std::result::Result<T, E>;

/// Checks that every element is finite; names the first offender.
pub(crate) fn ensure_finite(what: &str, xs: &[f32]) -> Result<()> {
    match xs.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(index) => Err(CalibError::NonFinite { what: what.to_string(), index, value: xs[index] }),
    }
}

/// Checks a buffer length against a shape's element count.
pub(crate) fn ensure_len(what: &str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(CalibError::ShapeMismatch { what: what.to_string(), expected, got })
    }
}
