//! `int8-wo` / `int4-wo` without fp32 staging: each MatMul weight is quantized as it is read from the checkpoint
//! (FP8 blocks dequantized tensor by tensor first), so the export writes only the artifact and holds one weight
//! at a time.
//!
//! The graph is the fp32 export's, built by the same family code ([`crate::export_with`]); the builder hands each
//! MatMul weight ([`crate::onnx::GraphBuilder::matmul_weight`]) to [`StreamWeights`], which quantizes it with the
//! staged rewrite's own function ([`r1_calibration::qdq::quantize_weight`]) and writes the codes, scales and zero
//! points to the artifact's data file at once (a writer thread copies and hashes them while the next weight is
//! read). Every other weight goes to the same file unchanged. The graph rewrite afterwards
//! ([`r1_calibration::qdq::rewrite_prequantized`]) selects the MatMuls as the staged rewrite does and refuses, by
//! weight name, any difference between the two sets. So every tensor and the whole graph are the staged
//! export's; only the offsets of the tensors in `model.onnx.data` differ (they are written in the order they are
//! made, where the staged rewrite writes the float tensors first). `tests/tests/quantize_streamed.rs` checks it.
//!
//! Only what needs no fp32 model streams: no calibration data (AWQ and the report's held-out comparison run the
//! fp32 graph), no `--eval-problems` (which scores the fp32 artifact), no `--keep-float` (it may name MatMul nodes,
//! known only once the graph exists). Those take the staged path ([`super::export_quantized`]).
use std::any::Any;
use std::collections::HashMap;
use std::path::Path;

use r1_calibration::external::ExternalDataWriter;
use r1_calibration::qdq::{
    quantize_weight, rewrite_prequantized, QdqOptions, QuantScheme, QuantizedWeight, RewriteSummary,
};
use r1_calibration::report::QualityReport;
use r1_engine::manifest::{Manifest, Precision};
use r1_proto::onnx::{ModelProto, TensorProto};

use super::{
    qdq_options, quantization_json, LmHead, QuantProgress, QuantizeOptions, CALIBRATION_DIR, LM_HEAD_WEIGHT,
    REPORT_FILE,
};
use crate::error::{ExportError, Result};
use crate::onnx::{ByteSink, ElemType, ExternalSummary, WeightStream};
use crate::{artifact, ExportOptions, DATA_FILE};

/// Whether `q` is exported without fp32 staging (see the module docs for what needs the fp32 model).
pub(crate) fn streamable(q: &QuantizeOptions) -> bool {
    matches!(q.precision, Precision::Int8WeightOnly | Precision::Int4WeightOnly)
        && q.calibration_data.is_none()
        && q.eval_problems.is_none()
        && q.keep_float.is_empty()
        && !q.staged
}

/// The streamed export of `opts.checkpoint` per `q` (which [`streamable`] accepts) into `opts.out_dir`.
pub(crate) fn export_streamed(
    opts: &ExportOptions,
    q: &QuantizeOptions,
    progress: &mut dyn FnMut(QuantProgress<'_>),
) -> Result<(Manifest, QualityReport)> {
    progress(QuantProgress::Streaming);
    let fp32 = ExportOptions { precision: Precision::Fp32, ..opts.clone() };
    let mut s = Streamed { q, scheme: q.scheme()?, summary: None, report: None };
    let manifest = crate::export_with(&fp32, Some(&mut s), &mut |p| progress(QuantProgress::Export(p)))?;
    let report = s.report.take().ok_or_else(|| ExportError::Graph("the streamed export wrote no report".into()))?;
    Ok((manifest, report))
}

/// A streamed export in progress: makes the weight stream, rewrites the finished graph, completes the manifest.
pub(crate) struct Streamed<'q> {
    q: &'q QuantizeOptions,
    scheme: QuantScheme,
    summary: Option<RewriteSummary>,
    report: Option<QualityReport>,
}

impl Streamed<'_> {
    /// The weight stream, writing the artifact's data file in `dir`.
    pub(crate) fn weights(&mut self, dir: &Path) -> Result<Box<dyn WeightStream>> {
        Ok(Box::new(StreamWeights {
            writer: ExternalDataWriter::create_background(dir, DATA_FILE)?,
            threshold: QdqOptions::new(self.scheme).external_threshold,
            scheme: self.scheme,
            lm_head_float: self.q.lm_head == LmHead::Float,
            quantized: HashMap::new(),
        }))
    }

    /// Rewrites the finished graph (its quantized weights placeholders) as the staged export's rewrite does,
    /// moves its large inline initializers to the data file and closes it; returns the file's entry.
    pub(crate) fn rewrite(
        &mut self,
        model: &mut ModelProto,
        weights: Box<dyn WeightStream>,
    ) -> Result<ExternalSummary> {
        let w = weights
            .into_any()
            .downcast::<StreamWeights>()
            .map_err(|_| ExportError::Graph("the streamed graph's weights are not a quantizing stream".into()))?;
        let StreamWeights { mut writer, threshold, quantized, .. } = *w;
        let qopts = qdq_options(self.q, model)?;
        let summary = rewrite_prequantized(model, quantized, &qopts, &mut |t| match t.raw_data.take() {
            Some(raw) if raw.len() >= threshold => writer.write_tensor_owned(t, raw),
            raw => {
                t.raw_data = raw;
                Ok(())
            }
        })?;
        let file = writer.finish_hashed()?;
        let sha256 = file.sha256.ok_or_else(|| ExportError::Graph(format!("{DATA_FILE} was written unhashed")))?;
        self.summary = Some(summary);
        Ok(ExternalSummary { location: DATA_FILE.into(), bytes: file.bytes, sha256 })
    }

    /// The quantized artifact's manifest and report, as the staged export writes them without calibration data.
    pub(crate) fn complete(&mut self, manifest: &mut Manifest, dir: &Path) -> Result<()> {
        let q = self.q;
        let summary = self.summary.take().ok_or_else(|| ExportError::Graph("complete before rewrite".into()))?;
        manifest.precision = q.precision;
        let report = QualityReport {
            precision: q.precision.name().into(),
            method: None,
            smoothquant_alpha: 0.0,
            samples: 0,
            tokens: None,
            kept_float: q.keep_float.clone(),
            left_float: summary.left_float(),
            layers: Vec::new(),
            end_to_end: None,
            accuracy: Vec::new(),
        };
        let cal_dir = dir.join(CALIBRATION_DIR);
        std::fs::create_dir_all(&cal_dir).map_err(ExportError::io(&cal_dir))?;
        report.write(&dir.join(REPORT_FILE))?;
        manifest.files.insert(REPORT_FILE.into(), artifact::hash_file(&dir.join(REPORT_FILE))?);
        manifest.quantization = Some(quantization_json(q, &summary, &[], 0, serde_json::Value::Null, &report));
        self.report = Some(report);
        Ok(())
    }
}

/// The builder's weights in a streamed export: MatMul weights quantized, everything else stored as it comes.
struct StreamWeights {
    writer: ExternalDataWriter,
    /// Payloads of at least this many bytes go to the data file, smaller ones inline (the staged rewrite's rule).
    threshold: usize,
    scheme: QuantScheme,
    lm_head_float: bool,
    quantized: HashMap<String, QuantizedWeight>,
}

impl WeightStream for StreamWeights {
    fn takes(&self, name: &str, elem: ElemType, dims: &[i64]) -> bool {
        // The staged rewrite's exclusions that are known from the name alone: MoE routers and a float LM head.
        elem == ElemType::F32
            && dims.len() == 2
            && !name.ends_with(crate::arch::deepseek_v3::ROUTER_WEIGHT_SUFFIX)
            && !(self.lm_head_float && name == LM_HEAD_WEIGHT)
    }

    fn quantize(&mut self, name: &str, values: &[f32], k: usize, n: usize) -> Result<()> {
        let mut q = quantize_weight(name, values, k, n, self.scheme)?;
        for t in &mut q.initializers {
            match t.raw_data.take() {
                Some(raw) if raw.len() >= self.threshold => self.writer.write_tensor_owned(t, raw)?,
                raw => t.raw_data = raw,
            }
        }
        if self.quantized.insert(name.to_string(), q).is_some() {
            return Err(ExportError::Graph(format!("weight `{name}` was quantized twice")));
        }
        Ok(())
    }

    fn store(
        &mut self,
        t: &mut TensorProto,
        length: u64,
        fill: &mut dyn FnMut(ByteSink<'_>) -> Result<()>,
    ) -> Result<u64> {
        if length < self.threshold as u64 {
            let mut raw = Vec::with_capacity(length as usize);
            fill(&mut |chunk| {
                raw.extend_from_slice(chunk);
                Ok(())
            })?;
            let written = raw.len() as u64;
            t.raw_data = Some(raw);
            return Ok(written);
        }
        let mut written = 0u64;
        // The fill's own error (an export error) is kept apart from the writer's.
        let mut failed = None;
        let stored = self.writer.write_tensor_with(t, &mut |sink| {
            let r = fill(&mut |chunk| {
                written += chunk.len() as u64;
                sink(chunk).map_err(ExportError::from)
            });
            r.map_err(|e| {
                let message = e.to_string();
                failed = Some(e);
                r1_calibration::CalibError::Source(message)
            })
        });
        match (failed, stored) {
            (Some(e), _) => Err(e),
            (None, stored) => Ok(stored.map(|()| written)?),
        }
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}
