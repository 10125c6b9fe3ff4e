//! Dev driver: quantizes an fp32 ONNX model with activations dumped by `scripts/e2e_tiny.py` (which runs the
//! calibration copy of the graph in ONNX Runtime), until `r1-export` drives calibration through the engine.
//!
//! `cargo run -p r1-calibration --example quantize_onnx -- MODEL_DIR ACT_DIR OUT_DIR SCHEME [METHOD]`
//! - `ACT_DIR/index.json`: `{"tensor name": ["batch0.bin", "batch1.bin", ...]}`, raw little-endian f32 files.
//! - SCHEME: `int8` (W8A8), `int8-wo`, `int4-wo` (block 32); METHOD: `max`, `entropy`, `mse`, `percentile[:P]`.
//! - Writes `OUT_DIR/model.onnx`, `model.onnx.data`, `calibration.cache` (int8 only), `summary.json`.
use prost::Message;
use r1_calibration::calibrate::{model_targets, ActivationSink, ActivationSource, Calibrator};
use r1_calibration::observer::CalibrationMethod;
use r1_calibration::qdq::{quantize_model, QdqOptions, QuantScheme};
use r1_calibration::trt_cache::{CacheAlgorithm, CalibrationCache};
use r1_calibration::{CalibError, Result};
use r1_proto::onnx::ModelProto;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Replays dumped activation files batch by batch.
struct DirSource {
    files: BTreeMap<String, Vec<PathBuf>>,
    next: usize,
}

impl ActivationSource for DirSource {
    fn next_batch(&mut self, sink: &mut ActivationSink<'_>) -> Result<bool> {
        let b = self.next;
        if self.files.values().all(|f| f.len() <= b) {
            return Ok(false);
        }
        for (name, files) in &self.files {
            let Some(path) = files.get(b) else { continue };
            let bytes =
                std::fs::read(path).map_err(|source| CalibError::Io { op: "reading", path: path.clone(), source })?;
            let v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            sink(name, &v)?;
        }
        self.next += 1;
        Ok(true)
    }
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model_dir, act_dir, out_dir, scheme, rest @ ..] = args.as_slice() else {
        return Err("usage: quantize_onnx MODEL_DIR ACT_DIR OUT_DIR int8|int8-wo|int4-wo [METHOD]".into());
    };
    let method: CalibrationMethod = rest.first().map_or("entropy", String::as_str).parse()?;
    let (model_dir, act_dir, out_dir) = (Path::new(model_dir), Path::new(act_dir), Path::new(out_dir));
    std::fs::create_dir_all(out_dir)?;
    let mut model = ModelProto::decode(std::fs::read(model_dir.join("model.onnx"))?.as_slice())?;
    let scheme = match scheme.as_str() {
        "int8" => QuantScheme::W8A8,
        "int8-wo" => QuantScheme::Int8WeightOnly,
        "int4-wo" => QuantScheme::Int4WeightOnly { block_size: 32, asymmetric: false },
        other => return Err(format!("unknown scheme {other}").into()),
    };
    let mut opts = QdqOptions::new(scheme);
    let mut summary = serde_json::Map::new();
    if scheme == QuantScheme::W8A8 {
        let index: BTreeMap<String, Vec<String>> = serde_json::from_slice(&std::fs::read(act_dir.join("index.json"))?)?;
        let files = index.into_iter().map(|(k, v)| (k, v.into_iter().map(|f| act_dir.join(f)).collect())).collect();
        let mut cal = Calibrator::new(&model_targets(&model))?;
        let t = std::time::Instant::now();
        let batches = cal.run(&mut DirSource { files, next: 0 }, usize::MAX, &mut |_| {})?;
        let amax = cal.amax(method)?;
        let maxes = cal.amax(CalibrationMethod::Max)?;
        eprintln!("calibrated {} tensors over {batches} batches ({method}) in {:?}", amax.len(), t.elapsed());
        for ((name, a), (_, m)) in amax.iter().zip(&maxes) {
            eprintln!("  {name:60} amax {a:10.4} (max {m:10.4})");
        }
        let cache = CalibrationCache::from_amax("100300", CacheAlgorithm::Entropy2, &amax)?;
        std::fs::write(out_dir.join("calibration.cache"), cache.to_text())?;
        opts.activation_scales = cal.scales(method)?.into_iter().collect();
        summary.insert("amax".into(), serde_json::to_value(amax.into_iter().collect::<BTreeMap<_, _>>())?);
    }
    let rewrite = quantize_model(&mut model, model_dir, out_dir, "model.onnx.data", &opts)?;
    std::fs::write(out_dir.join("model.onnx"), model.encode_to_vec())?;
    summary.insert("rewrite".into(), serde_json::to_value(&rewrite)?);
    std::fs::write(out_dir.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    eprintln!("quantized {} MatMuls, skipped {}", rewrite.quantized.len(), rewrite.skipped.len());
    Ok(())
}
