//! The calibration passes of the quantized exports: W8A8 activation ranges (with SmoothQuant) and AWQ scaling for
//! `int4-wo`. Each runs the fp32 graph over the calibration samples through the engine ([`GraphRunner`]), observes
//! the MatMul inputs with [`r1_calibration::calibrate`] and changes `model` (folded factors) in place.
use std::collections::BTreeMap;
use std::path::Path;

use r1_calibration::awq::{apply_awq, AwqConfig, AwqSummary, InputStats};
use r1_calibration::calibrate::{calibrate_w8a8, model_targets, observe, ActivationSource, W8A8Config};
use r1_calibration::external::{ExternalDataReader, ExternalDataWriter};
use r1_calibration::observer::CalibrationMethod;
use r1_calibration::trt_cache::{CacheAlgorithm, CalibrationCache};
use r1_calibration::CalibError;
use r1_engine::manifest::Manifest;
use r1_proto::onnx::ModelProto;

use super::runner::{GraphRunner, SampleSource};
use super::{QuantProgress, QuantizeOptions, TRT_CACHE_VERSION};
use crate::error::Result;

/// External data file the AWQ-rescaled weights are written to, in the staging directory.
pub const AWQ_DATA_FILE: &str = "awq.onnx.data";

/// What W8A8 calibration produced: activation scales for the rewrite, the TensorRT cache, and the manifest's record.
pub(super) struct Int8Calibration {
    pub batches: usize,
    pub scales: std::collections::HashMap<String, f32>,
    pub cache: CalibrationCache,
    pub json: serde_json::Value,
}

/// What every calibration pass reads: the fp32 staging artifact (its directory, weights and manifest), the options
/// and the calibration samples.
pub(super) struct PassInput<'a> {
    pub reader: &'a ExternalDataReader,
    pub staging: &'a Path,
    pub manifest: &'a Manifest,
    pub q: &'a QuantizeOptions,
    pub calib: &'a [Vec<u32>],
}

impl<'a> PassInput<'a> {
    /// The engine running `copy` (a calibration copy of the graph) over the samples, one per batch.
    fn source(&self, copy: &ModelProto) -> r1_calibration::Result<Box<dyn ActivationSource + 'a>> {
        let runner = GraphRunner::open(self.staging, "calibration.onnx", copy, self.manifest, self.q.backend)
            .map_err(|e| CalibError::Source(e.to_string()))?;
        Ok(Box::new(SampleSource { runner, samples: self.calib, next: 0 }))
    }
}

/// Runs the fp32 graph over the calibration samples (two passes with SmoothQuant, whose scales are folded into
/// `model`) and derives the activation scales.
pub(super) fn calibrate_int8(
    model: &mut ModelProto,
    input: &PassInput<'_>,
    progress: &mut dyn FnMut(QuantProgress<'_>),
) -> Result<Int8Calibration> {
    let (q, calib) = (input.q, input.calib);
    let passes = if q.smoothquant_alpha > 0.0 { 2 } else { 1 };
    let mut pass = 0;
    // Both the pass factory and the per-batch callback report progress.
    let shared = std::cell::RefCell::new(progress);
    let mut make_source = |copy: &ModelProto| -> r1_calibration::Result<Box<dyn ActivationSource + '_>> {
        pass += 1;
        (shared.borrow_mut())(QuantProgress::Pass { pass, passes, batches: calib.len() });
        input.source(copy)
    };
    let cfg = W8A8Config { method: q.method, alpha: q.smoothquant_alpha, max_batches: calib.len() };
    let cal = {
        let mut batch_progress = |done: usize| (shared.borrow_mut())(QuantProgress::Batch { done });
        calibrate_w8a8(model, input.reader, &mut make_source, cfg, Some(input.staging), &mut batch_progress)?
    };
    let algorithm = if q.method == CalibrationMethod::Max { CacheAlgorithm::MinMax } else { CacheAlgorithm::Entropy2 };
    let cache = CalibrationCache::from_amax(TRT_CACHE_VERSION, algorithm, &cal.fp32_amax)?;
    let json = serde_json::json!({
        "amax": cal.amax.iter().cloned().collect::<BTreeMap<_, _>>(),
        "smoothquant": cal.smooth,
    });
    Ok(Int8Calibration { batches: cal.batches, scales: cal.scales.into_iter().collect(), cache, json })
}

/// AWQ for `int4-wo` ([`r1_calibration::awq`]): one pass over the calibration samples observes each MatMul input's
/// per-channel `E[x²]`; the α search per norm-fed input and the fold rewrite `model`, the rescaled weights going to
/// [`AWQ_DATA_FILE`] in `staging` (the directory `reader` reads).
pub(super) fn awq_int4(
    model: &mut ModelProto,
    input: &PassInput<'_>,
    progress: &mut dyn FnMut(QuantProgress<'_>),
) -> Result<AwqSummary> {
    let (q, calib) = (input.q, input.calib);
    progress(QuantProgress::Pass { pass: 1, passes: 1, batches: calib.len() });
    let mut make_source = |copy: &ModelProto| input.source(copy);
    let cfg = AwqConfig::new(q.block_size, q.int4_asymmetric);
    let (cal, _) =
        observe(model, &mut make_source, calib.len(), cfg.rows, &mut |done| progress(QuantProgress::Batch { done }))?;
    let stats = model_targets(model)
        .into_iter()
        .filter_map(|t| {
            let mean_square = cal.channel_mean_square(&t.name)?;
            let rows = cal.sampled_rows(&t.name).map(|(r, _)| r.to_vec()).unwrap_or_default();
            Some((t.name, InputStats { mean_square, rows }))
        })
        .collect();
    let mut writer = ExternalDataWriter::create(input.staging, AWQ_DATA_FILE)?;
    let summary = apply_awq(model, input.reader, &stats, cfg, Some(&mut writer))?;
    writer.finish()?;
    Ok(summary)
}
