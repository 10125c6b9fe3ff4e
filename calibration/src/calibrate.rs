//! The calibration driver: feeds observed activations into per-tensor observers and turns them into scales.
//!
//! The engine runs the fp32 graph; this crate never runs a model. The boundary is [`ActivationSource`]: each call
//! runs one batch of calibration samples through a copy of the graph whose MatMul inputs were added as graph
//! outputs ([`crate::qdq::add_observed_outputs`] on [`crate::qdq::calibration_targets`]), and hands every observed
//! tensor to a sink as `(name, values)`. Activations are consumed batch by batch and never stored.
use crate::error::{CalibError, Result};
use crate::external::ExternalDataReader;
use crate::external::ExternalDataWriter;
use crate::observer::{CalibrationMethod, ChannelMaxObserver, TensorObserver};
use crate::qdq::{add_observed_outputs, calibration_targets};
use crate::quant::{scale_from_amax, INT8_QMAX};
use crate::smooth_graph::{apply_smoothquant, apply_smoothquant_spilled, SmoothSummary};
use r1_proto::onnx::ModelProto;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Receives one observed tensor of the current batch: `(tensor name, values row-major)`.
pub type ActivationSink<'a> = dyn FnMut(&str, &[f32]) -> Result<()> + 'a;

/// Something that runs the fp32 graph on calibration batches and reports intermediate tensors.
pub trait ActivationSource {
    /// Runs the next batch, passing each observed tensor to `sink`. Returns `Ok(false)` when no batch is left
    /// (and then calls `sink` no more).
    fn next_batch(&mut self, sink: &mut ActivationSink<'_>) -> Result<bool>;
}

/// One tensor to observe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Tensor name.
    pub name: String,
    /// Channel count of the last axis (the MatMul's K) for per-channel maxima (SmoothQuant); `None` to skip.
    pub channels: Option<usize>,
}

/// The targets of a model: input `A` of every MatMul with a weight initializer, with the weight's K as channels.
pub fn model_targets(model: &ModelProto) -> Vec<Target> {
    let graph = model.graph.as_ref();
    let k_of = |a: &str| -> Option<usize> {
        let g = graph?;
        let node = g
            .node
            .iter()
            .find(|n| n.op_type.as_deref() == Some("MatMul") && n.input.first().map(String::as_str) == Some(a))?;
        let w = g.initializer.iter().find(|t| t.name.as_deref() == node.input.get(1).map(String::as_str))?;
        usize::try_from(*w.dims.first()?).ok()
    };
    calibration_targets(model).into_iter().map(|name| Target { channels: k_of(&name), name }).collect()
}

/// Observers for a fixed set of tensors.
#[derive(Debug, Clone)]
pub struct Calibrator {
    order: Vec<String>,
    tensors: HashMap<String, TensorObserver>,
    channels: HashMap<String, ChannelMaxObserver>,
    batches: usize,
}

impl Calibrator {
    /// Observers for `targets` (names must be unique).
    pub fn new(targets: &[Target]) -> Result<Self> {
        Self::keeping_rows(targets, 0)
    }

    /// [`Calibrator::new`], the per-channel observers also keeping a sample of up to `rows` activation rows each
    /// (AWQ's search input, [`Calibrator::sampled_rows`]).
    pub fn keeping_rows(targets: &[Target], rows: usize) -> Result<Self> {
        let mut c = Calibrator { order: Vec::new(), tensors: HashMap::new(), channels: HashMap::new(), batches: 0 };
        for t in targets {
            if c.tensors.insert(t.name.clone(), TensorObserver::new()).is_some() {
                return Err(CalibError::invalid(
                    "calibration targets",
                    "unique tensor names",
                    format!("`{}` twice", t.name),
                ));
            }
            if let Some(k) = t.channels {
                c.channels.insert(t.name.clone(), ChannelMaxObserver::new(k).keeping_rows(rows));
            }
            c.order.push(t.name.clone());
        }
        Ok(c)
    }

    /// Feeds one observed tensor. Tensors that are not targets (e.g. `logits`) are ignored.
    pub fn observe(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let Some(obs) = self.tensors.get_mut(name) else { return Ok(()) };
        obs.observe(values).map_err(|e| CalibError::Source(format!("tensor `{name}`: {e}")))?;
        if let Some(ch) = self.channels.get_mut(name) {
            ch.observe(values).map_err(|e| CalibError::Source(format!("tensor `{name}`: {e}")))?;
        }
        Ok(())
    }

    /// Pulls up to `max_batches` batches from `source`, calling `progress(batches_done)` after each.
    /// Returns the number of batches observed.
    pub fn run(
        &mut self,
        source: &mut dyn ActivationSource,
        max_batches: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<usize> {
        let mut done = 0;
        while done < max_batches {
            let more = source.next_batch(&mut |name, values| self.observe(name, values))?;
            if !more {
                break;
            }
            done += 1;
            self.batches += 1;
            progress(done);
        }
        Ok(done)
    }

    /// Batches observed so far.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// Clipping threshold per target (target order), by `method`. Errors name a target that was never seen.
    pub fn amax(&self, method: CalibrationMethod) -> Result<Vec<(String, f32)>> {
        self.order.iter().map(|n| Ok((n.clone(), self.tensors[n].amax(method, n)?))).collect()
    }

    /// Per-tensor int8 scales (`amax / 127`), ready for [`crate::qdq::QdqOptions::activation_scales`].
    pub fn scales(&self, method: CalibrationMethod) -> Result<BTreeMap<String, f32>> {
        self.amax(method)?.into_iter().map(|(n, a)| Ok((n, scale_from_amax(a, INT8_QMAX)?))).collect()
    }

    /// Per-channel abs-max of a target observed with channels (SmoothQuant's `max|X_j|`).
    pub fn channel_max(&self, name: &str) -> Option<&[f32]> {
        self.channels.get(name).map(ChannelMaxObserver::max)
    }

    /// Per-channel mean of `x²` of a target observed with channels (AWQ's statistics, [`crate::awq`]).
    pub fn channel_mean_square(&self, name: &str) -> Option<Vec<f32>> {
        self.channels.get(name).map(ChannelMaxObserver::mean_square)
    }

    /// The sampled activation rows of a target observed with channels (`[n, k]` row-major, and `n`).
    pub fn sampled_rows(&self, name: &str) -> Option<(&[f32], usize)> {
        self.channels.get(name).map(ChannelMaxObserver::sampled_rows)
    }

    /// The observer of a target.
    pub fn observer(&self, name: &str) -> Option<&TensorObserver> {
        self.tensors.get(name)
    }
}

/// Settings of [`calibrate_w8a8`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct W8A8Config {
    /// How each tensor's range is chosen.
    pub method: CalibrationMethod,
    /// SmoothQuant strength; 0 turns it off (one calibration pass instead of two).
    pub alpha: f32,
    /// Upper bound on batches per pass.
    pub max_batches: usize,
}

/// Result of [`calibrate_w8a8`]: what to pass to [`crate::qdq::QdqOptions::activation_scales`] and the report.
#[derive(Debug, Clone)]
pub struct W8A8Calibration {
    /// Per-tensor int8 scales of the (smoothed) graph.
    pub scales: BTreeMap<String, f32>,
    /// Per-tensor clipping ranges of the (smoothed) graph the QDQ rewrite uses.
    pub amax: Vec<(String, f32)>,
    /// Per-tensor clipping ranges of the original, unsmoothed graph (same method): what a legacy TensorRT
    /// calibration cache for the fp32/fp16 graph needs. Equal to `amax` when SmoothQuant is off.
    pub fp32_amax: Vec<(String, f32)>,
    /// What SmoothQuant folded (empty when `alpha == 0`).
    pub smooth: SmoothSummary,
    /// Batches observed in the final pass.
    pub batches: usize,
}

/// One calibration pass: runs a copy of `model` with every MatMul input added as a graph output (built by
/// `make_source`) over up to `max_batches` batches and observes them, keeping up to `keep_rows` activation rows of
/// each. Returns the observers and the batch count.
pub fn observe(
    model: &ModelProto,
    make_source: &mut SourceFactory<'_>,
    max_batches: usize,
    keep_rows: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<(Calibrator, usize)> {
    let targets = model_targets(model);
    let mut copy = model.clone();
    add_observed_outputs(&mut copy, &targets.iter().map(|t| t.name.clone()).collect::<Vec<_>>())?;
    let mut cal = Calibrator::keeping_rows(&targets, keep_rows)?;
    let mut source = make_source(&copy)?;
    let n = cal.run(source.as_mut(), max_batches, progress)?;
    Ok((cal, n))
}

/// External data file the SmoothQuant-rescaled weights are written to (see [`calibrate_w8a8`]).
pub const SMOOTHQUANT_DATA_FILE: &str = "smoothquant.onnx.data";

/// Builds a runnable activation source for a calibration copy of the model (the engine session).
pub type SourceFactory<'a> = dyn FnMut(&ModelProto) -> Result<Box<dyn ActivationSource + 'a>> + 'a;

/// The W8A8 calibration driver. With SmoothQuant: pass 1 observes per-channel maxima, the factors are folded into
/// `model` (in place), and pass 2 observes the smoothed graph's histograms; without: one pass. Each pass runs a copy
/// of `model` with every MatMul input added as a graph output, built by `make_source`.
///
/// With `spill_to`, the rescaled weights go to [`SMOOTHQUANT_DATA_FILE`] in that directory (which must be the
/// directory `reader` reads, so the model's external references resolve) instead of inline.
pub fn calibrate_w8a8(
    model: &mut ModelProto,
    reader: &ExternalDataReader,
    make_source: &mut SourceFactory<'_>,
    cfg: W8A8Config,
    spill_to: Option<&Path>,
    progress: &mut dyn FnMut(usize),
) -> Result<W8A8Calibration> {
    crate::smoothquant::validate_alpha(cfg.alpha)?;
    let mut pass = |m: &ModelProto, progress: &mut dyn FnMut(usize)| -> Result<(Calibrator, usize)> {
        observe(m, make_source, cfg.max_batches, 0, progress)
    };
    let mut smooth = SmoothSummary::default();
    let mut fp32_amax = None;
    if cfg.alpha > 0.0 {
        let (cal, _) = pass(model, progress)?;
        let channel_max = model_targets(model)
            .into_iter()
            .filter_map(|t| cal.channel_max(&t.name).map(|c| (t.name, c.to_vec())))
            .collect();
        fp32_amax = Some(cal.amax(cfg.method)?);
        smooth = match spill_to {
            Some(dir) => {
                let mut writer = ExternalDataWriter::create(dir, SMOOTHQUANT_DATA_FILE)?;
                let s = apply_smoothquant_spilled(model, reader, &channel_max, cfg.alpha, &mut writer)?;
                writer.finish()?;
                s
            }
            None => apply_smoothquant(model, reader, &channel_max, cfg.alpha)?,
        };
    }
    let (cal, batches) = pass(model, progress)?;
    let amax = cal.amax(cfg.method)?;
    Ok(W8A8Calibration {
        scales: cal.scales(cfg.method)?,
        fp32_amax: fp32_amax.unwrap_or_else(|| amax.clone()),
        amax,
        smooth,
        batches,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake engine: yields fixed batches for two tensors plus an ignored `logits` output.
    struct Fake {
        batches: Vec<Vec<(String, Vec<f32>)>>,
    }

    impl ActivationSource for Fake {
        fn next_batch(&mut self, sink: &mut ActivationSink<'_>) -> Result<bool> {
            if self.batches.is_empty() {
                return Ok(false);
            }
            for (n, v) in self.batches.remove(0) {
                sink(&n, &v)?;
            }
            Ok(true)
        }
    }

    fn fake(n: usize) -> Fake {
        let batches = (0..n)
            .map(|b| {
                let s = (b + 1) as f32;
                vec![
                    ("x".to_string(), vec![s, -2.0 * s, 0.5, 0.0]),
                    ("logits".to_string(), vec![1e9; 3]),
                    ("h".to_string(), vec![-0.25 * s; 6]),
                ]
            })
            .collect();
        Fake { batches }
    }

    fn targets() -> Vec<Target> {
        vec![Target { name: "x".into(), channels: Some(2) }, Target { name: "h".into(), channels: None }]
    }

    #[test]
    fn max_scales_from_fake_source() {
        let mut c = Calibrator::new(&targets()).unwrap();
        let mut seen = Vec::new();
        assert_eq!(c.run(&mut fake(3), 10, &mut |i| seen.push(i)).unwrap(), 3);
        assert_eq!(seen, vec![1, 2, 3]);
        let s = c.scales(CalibrationMethod::Max).unwrap();
        assert_eq!(s["x"], 6.0 / 127.0);
        assert_eq!(s["h"], 0.75 / 127.0);
        assert_eq!(c.channel_max("x").unwrap(), &[3.0, 6.0]);
        assert_eq!(c.observer("x").unwrap().histogram().total(), 12);
        assert!(c.observer("logits").is_none());
    }

    #[test]
    fn batch_limit_and_errors() {
        let mut c = Calibrator::new(&targets()).unwrap();
        assert_eq!(c.run(&mut fake(5), 2, &mut |_| {}).unwrap(), 2);
        assert_eq!(c.scales(CalibrationMethod::Max).unwrap()["x"], 4.0 / 127.0);
        let mut c = Calibrator::new(&targets()).unwrap();
        let e = c.amax(CalibrationMethod::Entropy).unwrap_err().to_string();
        assert!(e.contains("`x`") && e.contains("no data"), "{e}");
        let mut bad = Fake { batches: vec![vec![("x".into(), vec![1.0, f32::NAN])]] };
        let e = c.run(&mut bad, 1, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("`x`") && e.contains("not finite"), "{e}");
        let mut odd = Fake { batches: vec![vec![("x".into(), vec![1.0, 2.0, 3.0])]] };
        assert!(c.run(&mut odd, 1, &mut |_| {}).unwrap_err().to_string().contains("channel count 2"));
        assert!(Calibrator::new(&[targets()[0].clone(), targets()[0].clone()]).is_err());
    }
}
