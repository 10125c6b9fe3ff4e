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
//! A large MatMul weight that the checkpoint stores transposed (`[out, in]`: the LM head, 129,280 × 7168 in
//! DeepSeek-R1, 3.7 GB in float32) is quantized in bands of output columns
//! ([`crate::onnx::GraphBuilder::matmul_weight_columns`]): every scheme here quantizes each output column on its own
//! (int8: one scale per column from the column's absolute maximum; int4: the clip search per block of `K` rows of
//! one column), so a band of columns read from a band of checkpoint rows, quantized as a `[K, band]` matrix, gives
//! exactly those columns' codes, scales and zero points, which [`quantize_banded`] places into the whole tensors'
//! layout. Memory holds the quantized weight and one band of at most [`BAND_BYTES`] of float32, never the weight.
//!
//! DeepseekV3's routed experts (`[E, in, out]` stacks read by batched MatMuls, marked by
//! [`crate::onnx::GraphBuilder::stacked_matmul_weight`]) are quantized here too, one expert matrix at a time with the
//! same function and scheme as the MatMul weights (int8 per output channel; the artifact's int4 blocks along K),
//! into 3-D codes `[E, in, out]`, scales and zero points `[E, blocks, out]` (int8: one block of the whole K,
//! `[E, 1, out]`) and an opset-21 blocked `DequantizeLinear` (`axis = 1`) that feeds the dense masked MatMuls: the
//! portable graph never holds them in float (for R1, 95% of the parameters). The staged rewrite has no such step:
//! there the stacks stay float and the report's `left_float` names them; here they are not left float, so it does
//! not, and `quantization.quantized_expert_stacks` counts them. int8 per channel over a 3-D stack needs the blocked
//! form (opset 21: a per-axis scale is 1-D); below opset 21 an `int8-wo` export keeps its stacks float.
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

use super::banded::{band_columns, quantize_banded, BAND_BYTES};
use super::{
    qdq_options, quantization_json, LmHead, QuantProgress, QuantizeOptions, CALIBRATION_DIR, LM_HEAD_WEIGHT,
    REPORT_FILE,
};
use crate::error::{ExportError, Result};
use crate::onnx::{ByteSink, Columns, ElemType, ExternalSummary, Matrices, WeightStream};
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
    let mut s = Streamed { q, scheme: q.scheme()?, opset: opts.opset, summary: None, stacks: 0, report: None };
    let manifest = crate::export_with(&fp32, Some(&mut s), &mut |p| progress(QuantProgress::Export(p)))?;
    let report = s.report.take().ok_or_else(|| ExportError::Graph("the streamed export wrote no report".into()))?;
    Ok((manifest, report))
}

/// A streamed export in progress: makes the weight stream, rewrites the finished graph, completes the manifest.
pub(crate) struct Streamed<'q> {
    q: &'q QuantizeOptions,
    scheme: QuantScheme,
    /// The graph's default-domain opset (int8 expert stacks need 21).
    opset: i64,
    summary: Option<RewriteSummary>,
    /// Expert stacks quantized on the way.
    stacks: usize,
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
            opset: self.opset,
            quantized: HashMap::new(),
            stacks: Vec::new(),
            band_bytes: BAND_BYTES,
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
        let StreamWeights { mut writer, threshold, quantized, stacks, .. } = *w;
        self.stacks = stacks.len();
        wire_stacks(model, stacks)?;
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
        let json = quantization_json(q, &summary, &[], 0, serde_json::Value::Null, &report, self.stacks);
        manifest.quantization = Some(json);
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
    opset: i64,
    quantized: HashMap<String, QuantizedWeight>,
    /// Stacked weights quantized matrix by matrix, in the order they were made (3-D tensors, `DequantizeLinear`).
    stacks: Vec<(String, QuantizedWeight)>,
    /// Float32 bytes of a band of columns ([`WeightStream::quantize_columns`]; [`BAND_BYTES`] but in tests).
    band_bytes: usize,
}

impl StreamWeights {
    /// Writes `q`'s large tensors to the data file and keeps it for the rewrite.
    fn keep(&mut self, name: &str, mut q: QuantizedWeight) -> Result<()> {
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
}

/// Replaces each stacked weight's placeholder in `model` by its quantized tensors and puts its `DequantizeLinear`
/// before the first node that reads it; those nodes read the dequantized stack instead.
fn wire_stacks(model: &mut ModelProto, stacks: Vec<(String, QuantizedWeight)>) -> Result<()> {
    let g = model.graph.as_mut().ok_or_else(|| ExportError::Graph("the streamed graph has no graph".into()))?;
    for (w, q) in stacks {
        let placeholder = g.initializer.iter().position(|t| t.name.as_deref() == Some(w.as_str()));
        match placeholder {
            Some(i) if g.initializer[i].raw_data.is_none() && g.initializer[i].external_data.is_empty() => {
                g.initializer.remove(i);
            }
            _ => return Err(ExportError::Graph(format!("stacked weight `{w}` has no placeholder in the graph"))),
        }
        let out = q.dequantize.output[0].clone();
        let mut first = None;
        for (i, n) in g.node.iter_mut().enumerate() {
            for (j, input) in n.input.iter_mut().enumerate().filter(|(_, x)| **x == w) {
                if n.op_type.as_deref() != Some("MatMul") || j != 1 {
                    return Err(ExportError::Graph(format!(
                        "stacked weight `{w}` is read by `{}` other than as a MatMul's B input",
                        n.name.as_deref().unwrap_or("?")
                    )));
                }
                *input = out.clone();
                first.get_or_insert(i);
            }
        }
        let first = first.ok_or_else(|| ExportError::Graph(format!("no node reads stacked weight `{w}`")))?;
        g.node.insert(first, q.dequantize);
        g.initializer.extend(q.initializers);
    }
    Ok(())
}

/// Whether a `[e, k, n]` stack can be quantized matrix by matrix under `scheme` at `opset`: int8 per channel needs
/// the blocked `DequantizeLinear` (opset 21), and packed int4 matrices (and zero points) must end on a byte to be
/// laid end to end.
fn stack_quantizable(scheme: QuantScheme, opset: i64, k: usize, n: usize) -> bool {
    match scheme {
        QuantScheme::Int8WeightOnly => opset >= 21,
        QuantScheme::Int4WeightOnly { block_size, asymmetric } => {
            (k * n).is_multiple_of(2) && (!asymmetric || (k.div_ceil(block_size) * n).is_multiple_of(2))
        }
        QuantScheme::W8A8 => false,
    }
}

impl WeightStream for StreamWeights {
    fn takes(&self, name: &str, elem: ElemType, dims: &[i64]) -> bool {
        // The staged rewrite's exclusions that are known from the name alone: MoE routers and a float LM head.
        elem == ElemType::F32
            && dims.len() == 2
            && !name.ends_with(crate::arch::deepseek_v3::ROUTER_WEIGHT_SUFFIX)
            && !(self.lm_head_float && name == LM_HEAD_WEIGHT)
    }

    fn takes_stack(&self, name: &str, elem: ElemType, dims: &[i64]) -> bool {
        match dims {
            &[e, k, n] if e > 0 && k > 0 && n > 0 && elem == ElemType::F32 => {
                !name.ends_with(crate::arch::deepseek_v3::ROUTER_WEIGHT_SUFFIX)
                    && stack_quantizable(self.scheme, self.opset, k as usize, n as usize)
            }
            _ => false,
        }
    }

    fn quantize_stack(&mut self, name: &str, [e, k, n]: [usize; 3], matrices: Matrices<'_>) -> Result<()> {
        let scheme = self.scheme;
        // Expert 0's tensors name the stack's (codes, scale, zero point) and give their types; every expert's
        // scales and zero points (1/block of the codes) wait in memory while the codes are written.
        let mut first: Option<QuantizedWeight> = None;
        let (mut scales, mut zeros, mut count) = (Vec::new(), Vec::new(), 0usize);
        let mut codes = TensorProto::default();
        let mut failed = None;
        let written = self.writer.write_tensor_with(&mut codes, &mut |sink| {
            let r = matrices(&mut |values| {
                let mut q = quantize_weight(name, values, k, n, scheme)?;
                let mut raw = |j: usize| q.initializers.get_mut(j).and_then(|t| t.raw_data.take());
                let c = raw(0).ok_or_else(|| ExportError::Graph(format!("`{name}`: expert {count} has no codes")))?;
                sink(&c).map_err(ExportError::from)?;
                scales.extend(raw(1).unwrap_or_default());
                zeros.extend(raw(2).unwrap_or_default());
                first.get_or_insert(q);
                count += 1;
                Ok(())
            });
            r.map_err(|e| {
                let message = e.to_string();
                failed = Some(e);
                r1_calibration::CalibError::Source(message)
            })
        });
        if let Some(e) = failed {
            return Err(e);
        }
        written?;
        let first = first.filter(|_| count == e).ok_or_else(|| {
            ExportError::Graph(format!("stacked weight `{name}`: {count} of {e} matrices were quantized"))
        })?;
        let (block, blocks) = match scheme {
            QuantScheme::Int4WeightOnly { block_size, .. } => (block_size, k.div_ceil(block_size)),
            // Per output channel: one block of the whole K.
            _ => (k, 1),
        };
        let mut tensors = first.initializers;
        let [ct, rest @ ..] = tensors.as_mut_slice() else {
            return Err(ExportError::Graph(format!("stacked weight `{name}`: no quantized tensors")));
        };
        codes.name = ct.name.take();
        codes.data_type = ct.data_type;
        codes.dims = vec![e as i64, k as i64, n as i64];
        let mut initializers = vec![codes];
        for (t, bytes) in rest.iter_mut().zip([scales, zeros]) {
            let mut t = std::mem::take(t);
            t.dims = vec![e as i64, blocks as i64, n as i64];
            if bytes.len() >= self.threshold {
                self.writer.write_tensor_owned(&mut t, bytes)?;
            } else {
                t.raw_data = Some(bytes);
            }
            initializers.push(t);
        }
        let mut dequantize = first.dequantize;
        dequantize.input = initializers.iter().filter_map(|t| t.name.clone()).collect();
        dequantize.attribute = vec![crate::onnx::attr_i("axis", 1), crate::onnx::attr_i("block_size", block as i64)];
        if self.stacks.iter().any(|(w, _)| w == name) || self.quantized.contains_key(name) {
            return Err(ExportError::Graph(format!("weight `{name}` was quantized twice")));
        }
        self.stacks.push((name.to_string(), QuantizedWeight { k, n, initializers, dequantize }));
        Ok(())
    }

    fn quantize(&mut self, name: &str, values: &[f32], k: usize, n: usize) -> Result<()> {
        let q = quantize_weight(name, values, k, n, self.scheme)?;
        self.keep(name, q)
    }

    fn quantize_columns(&mut self, name: &str, k: usize, n: usize, columns: Columns<'_>) -> Result<()> {
        let band = band_columns(k, self.band_bytes);
        if band >= n {
            let mut values = Vec::new();
            columns((0, n), &mut values)?;
            return self.quantize(name, &values, k, n);
        }
        let q = quantize_banded(name, k, n, self.scheme, band, columns)?;
        self.keep(name, q)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::GraphBuilder;

    /// A `[k, n]` weight whose columns differ in scale and hold a few outliers (so the int4 clip search picks
    /// different ratios in different columns and blocks).
    fn weight(k: usize, n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..k * n)
            .map(|i| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let col = i % n;
                let scale = 0.01 * (1 + col % 7) as f32;
                let shift = if col.is_multiple_of(3) { 0.3 * scale } else { 0.0 };
                if (x >> 20).is_multiple_of(97) {
                    u * scale * 40.0
                } else {
                    u * scale + shift
                }
            })
            .collect()
    }

    /// Columns `[c0, c1)` of the row-major `[k, n]` `w`, as `[k, c1 - c0]`.
    fn columns_of(w: &[f32], k: usize, n: usize) -> impl FnMut((usize, usize), &mut Vec<f32>) -> Result<()> + '_ {
        move |(c0, c1), out| {
            out.clear();
            for r in 0..k {
                out.extend_from_slice(&w[r * n + c0..r * n + c1]);
            }
            Ok(())
        }
    }

    const SCHEMES: [QuantScheme; 5] = [
        QuantScheme::Int8WeightOnly,
        QuantScheme::Int4WeightOnly { block_size: 32, asymmetric: false },
        QuantScheme::Int4WeightOnly { block_size: 32, asymmetric: true },
        QuantScheme::Int4WeightOnly { block_size: 64, asymmetric: true },
        QuantScheme::Int4WeightOnly { block_size: 128, asymmetric: false },
    ];

    #[test]
    fn banded_quantization_is_the_whole_matrix_quantization_byte_for_byte() {
        // Odd and even K and N, K not a multiple of the block, bands that do not divide N (odd ones too: packed
        // int4 rows then start inside a byte).
        for (k, n) in [(64, 48), (37, 29), (33, 7), (1, 5), (96, 101), (130, 34), (2, 1)] {
            let w = weight(k, n, (k * 1000 + n) as u64);
            for scheme in SCHEMES {
                let want = quantize_weight("w", &w, k, n, scheme).unwrap();
                for band in [1, 2, 3, 5, 16, n.saturating_sub(1).max(1), n, n + 3] {
                    let mut calls = Vec::new();
                    let mut read = columns_of(&w, k, n);
                    let got = quantize_banded("w", k, n, scheme, band, &mut |c, out| {
                        calls.push(c);
                        read(c, out)
                    })
                    .unwrap();
                    let what = format!("[{k}, {n}] {scheme:?} in bands of {band}");
                    assert_eq!((got.k, got.n), (k, n), "{what}");
                    assert_eq!(got.initializers.len(), want.initializers.len(), "{what}");
                    for (g, w) in got.initializers.iter().zip(&want.initializers) {
                        assert_eq!(g, w, "{what}: tensor {:?}", w.name);
                    }
                    assert_eq!(got.dequantize, want.dequantize, "{what}");
                    assert_eq!(calls.len(), n.div_ceil(band), "{what}");
                    assert_eq!(calls.last().map(|c| c.1), Some(n), "{what}");
                }
            }
        }
    }

    #[test]
    fn banded_quantization_stops_at_the_first_error() {
        let (k, n) = (32, 40);
        let mut w = weight(k, n, 7);
        w[5 * n + 33] = f32::NAN;
        let scheme = QuantScheme::Int4WeightOnly { block_size: 32, asymmetric: true };
        let mut read = columns_of(&w, k, n);
        assert!(quantize_banded("w", k, n, scheme, 16, &mut read).is_err());
        let failing = |_: (usize, usize), _: &mut Vec<f32>| Err(ExportError::Graph("unreadable".into()));
        let e = quantize_banded("w", k, n, scheme, 16, &mut { failing }).unwrap_err();
        assert!(e.to_string().contains("unreadable"), "{e}");
    }

    #[test]
    fn band_columns_fit_the_budget_in_multiples_of_16() {
        assert_eq!(band_columns(7168, BAND_BYTES), 2336);
        assert_eq!(band_columns(1536, BAND_BYTES), 10912);
        assert_eq!(band_columns(1 << 30, BAND_BYTES), 16);
        assert!(band_columns(7168, BAND_BYTES) * 7168 * 4 <= BAND_BYTES);
    }

    /// The builder hands a weight read by columns to the stream, which quantizes it in bands when it is larger than
    /// its band budget and whole otherwise: either way the tensors [`quantize_weight`] makes of the whole weight.
    #[test]
    fn a_weight_read_by_columns_reaches_the_rewrite_as_if_quantized_whole() {
        let dir = tempfile::tempdir().unwrap();
        for scheme in SCHEMES {
            let stream = StreamWeights {
                writer: ExternalDataWriter::create_background(dir.path(), "w.data").unwrap(),
                threshold: usize::MAX,
                scheme,
                lm_head_float: false,
                opset: 21,
                quantized: HashMap::new(),
                stacks: Vec::new(),
                // 16 columns of the 96-row weights below: 7 bands of `big`, `small` whole.
                band_bytes: 96 * 4 * 16,
            };
            let mut b = GraphBuilder::streaming(21, Box::new(stream)).unwrap();
            let (k, big, small) = (96, 101, 12);
            let (wb, ws) = (weight(k, big, 1), weight(k, small, 2));
            let no_fill = |_: ByteSink<'_>| -> Result<()> { panic!("a streamed weight is read by columns") };
            let mut calls = 0;
            let mut read = columns_of(&wb, k, big);
            b.matmul_weight_columns("big", ElemType::F32, &[k as i64, big as i64], no_fill, |c, out| {
                calls += 1;
                read(c, out)
            })
            .unwrap();
            assert_eq!(calls, 7);
            b.matmul_weight_columns(
                "small",
                ElemType::F32,
                &[k as i64, small as i64],
                no_fill,
                columns_of(&ws, k, small),
            )
            .unwrap();
            let (_, stream) = b.finish_streamed("g", "").unwrap();
            let got = stream.into_any().downcast::<StreamWeights>().unwrap().quantized;
            for (name, w, n) in [("big", &wb, big), ("small", &ws, small)] {
                let want = quantize_weight(name, w, k, n, scheme).unwrap();
                assert_eq!(got[name].initializers, want.initializers, "{name} {scheme:?}");
                assert_eq!(got[name].dequantize, want.dequantize, "{name} {scheme:?}");
            }
        }
    }
}
