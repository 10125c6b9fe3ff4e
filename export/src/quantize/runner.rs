//! Running copies of the decoder graph with extra outputs: calibration batches and the fp32-vs-quantized report.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayD};
use prost::Message;
use r1_calibration::calibrate::{ActivationSink, ActivationSource};
use r1_calibration::qdq::{add_observed_outputs, RewriteSummary};
use r1_calibration::report::{EndToEnd, LayerReport, NextTokenStats, SqnrAccumulator};
use r1_calibration::CalibError;
use r1_engine::backend::{self, Backend, BackendKind, BackendOptions, KvPair, StepInput};
use r1_engine::manifest::Manifest;
use r1_proto::onnx::ModelProto;

use crate::error::{ExportError, Result};

/// A copy of the decoder graph with extra outputs, opened on a backend beside the weights it references.
pub(super) struct GraphRunner {
    backend: Box<dyn Backend>,
    /// Extra output names, in the order `run` returns them.
    names: Vec<String>,
    manifest: Manifest,
    file: PathBuf,
}

impl GraphRunner {
    /// Writes `model` (already extended with extra outputs) as `dir/file` and opens it.
    pub(super) fn open(
        dir: &Path,
        file: &str,
        model: &ModelProto,
        manifest: &Manifest,
        kind: BackendKind,
    ) -> Result<GraphRunner> {
        let base: HashSet<&str> = manifest.outputs.iter().map(|t| t.name.as_str()).collect();
        let names = model
            .graph
            .iter()
            .flat_map(|g| g.output.iter())
            .filter_map(|o| o.name.clone())
            .filter(|n| !base.contains(n.as_str()) || n == "logits")
            .collect();
        let path = dir.join(file);
        std::fs::write(&path, model.encode_to_vec()).map_err(ExportError::io(&path))?;
        let backend = backend::load_graph(dir, file, manifest, kind, &BackendOptions::default())?;
        Ok(GraphRunner { backend, names, manifest: manifest.clone(), file: path })
    }

    /// Prefills one token sequence from an empty cache; returns the extra outputs (and `logits`) by name.
    pub(super) fn run(&mut self, ids: &[u32]) -> Result<Vec<(String, ArrayD<f32>)>> {
        let n = ids.len();
        let kv = &self.manifest.kv_cache;
        let empty = |heads: usize, dim: usize| ArrayD::<f32>::zeros(vec![1, heads, 0, dim]);
        let input = StepInput {
            input_ids: Array2::from_shape_vec((1, n), ids.iter().map(|&t| i64::from(t)).collect())
                .map_err(|e| ExportError::Graph(e.to_string()))?,
            attention_mask: Array2::ones((1, n)),
            position_ids: Array2::from_shape_vec((1, n), (0..n as i64).collect())
                .map_err(|e| ExportError::Graph(e.to_string()))?,
            past: (0..kv.num_layers)
                .map(|_| KvPair { key: empty(kv.key_heads, kv.key_dim), value: empty(kv.value_heads, kv.value_dim) })
                .collect(),
        };
        let out = self.backend.run_named(&input, &self.names)?;
        Ok(self.names.iter().cloned().zip(out).collect())
    }
}

impl Drop for GraphRunner {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// Calibration batches: one sample each, so no padding token ever reaches an observer.
pub(super) struct SampleSource<'a> {
    pub(super) runner: GraphRunner,
    pub(super) samples: &'a [Vec<u32>],
    pub(super) next: usize,
}

impl ActivationSource for SampleSource<'_> {
    fn next_batch(&mut self, sink: &mut ActivationSink<'_>) -> r1_calibration::Result<bool> {
        let Some(ids) = self.samples.get(self.next) else { return Ok(false) };
        self.next += 1;
        let outputs =
            self.runner.run(ids).map_err(|e| CalibError::Source(format!("calibration sample {}: {e}", self.next)))?;
        for (name, values) in outputs {
            if name != "logits" {
                let flat: Vec<f32> = values.iter().copied().collect();
                sink(&name, &flat)?;
            }
        }
        Ok(true)
    }
}

/// Runs the fp32 and the quantized graph on `held_out`: per-layer SQNR of each quantized MatMul output and
/// next-token agreement of the logits.
#[allow(clippy::too_many_arguments)]
pub(super) fn compare(
    fp32_dir: &Path,
    fp32: &ModelProto,
    quant_dir: &Path,
    quant: &ModelProto,
    summary: &RewriteSummary,
    manifest: &Manifest,
    held_out: &[Vec<u32>],
    kind: BackendKind,
) -> Result<(Vec<LayerReport>, Option<EndToEnd>)> {
    let outputs: Vec<String> = summary.quantized.iter().map(|m| m.output.clone()).collect();
    let extend = |m: &ModelProto| -> Result<ModelProto> {
        let mut c = m.clone();
        add_observed_outputs(&mut c, &outputs)?;
        Ok(c)
    };
    let mut reference = GraphRunner::open(fp32_dir, "report.onnx", &extend(fp32)?, manifest, kind)?;
    let mut quantized = GraphRunner::open(quant_dir, "report.onnx", &extend(quant)?, manifest, kind)?;
    let mut sqnr: Vec<SqnrAccumulator> = vec![SqnrAccumulator::default(); outputs.len()];
    let mut stats = NextTokenStats::default();
    let vocab = manifest.model.vocab_size;
    for ids in held_out {
        let r = reference.run(ids)?;
        let qo = quantized.run(ids)?;
        for ((name, a), (_, b)) in r.iter().zip(&qo) {
            let (a, b) = (a.as_slice_memory_order(), b.as_slice_memory_order());
            let (Some(a), Some(b)) = (a, b) else { continue };
            if name == "logits" {
                stats.add_rows(a, b, vocab)?;
            } else if let Some(i) = outputs.iter().position(|o| o == name) {
                sqnr[i].add(a, b)?;
            }
        }
    }
    let layers = summary
        .quantized
        .iter()
        .zip(&sqnr)
        .map(|(m, acc)| LayerReport { name: m.node.clone(), sqnr_db: acc.db() })
        .collect();
    Ok((layers, stats.summary()))
}
