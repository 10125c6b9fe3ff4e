//! Writes tiny fp32 models and their quantized rewrites (W8A8, int8-wo, int4-wo) to a directory, with the input and
//! the outputs this crate's reference interpreter computes, for `scripts/check_qdq.py` to run in ONNX Runtime.
//!
//! `cargo run -p r1-calibration --example qdq_tiny -- OUT_DIR`
#[path = "../tests/common/mod.rs"]
mod common;

use common::eval::{run, T};
use common::models::{input_x, matmul_chain, rmsnorm_qk, M};
use prost::Message;
use r1_calibration::calibrate::{model_targets, Calibrator};
use r1_calibration::external::ExternalDataReader;
use r1_calibration::observer::CalibrationMethod;
use r1_calibration::qdq::{calibration_targets, rewrite_graph, QdqOptions, QuantScheme};
use r1_proto::onnx::ModelProto;
use std::path::Path;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

fn w8a8_options(model: &ModelProto, reader: &ExternalDataReader, x: &T) -> r1_calibration::Result<QdqOptions> {
    let vals = run(model, reader, &[("x", x.clone())]);
    let mut cal = Calibrator::new(&model_targets(model))?;
    for name in calibration_targets(model) {
        cal.observe(&name, &vals[&name].data)?;
    }
    let mut opts = QdqOptions::new(QuantScheme::W8A8);
    opts.activation_scales = cal.scales(CalibrationMethod::Max)?.into_iter().collect();
    Ok(opts)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).ok_or("usage: qdq_tiny OUT_DIR")?;
    let out = Path::new(&out);
    std::fs::create_dir_all(out)?;
    let reader = ExternalDataReader::new(out);
    let x = T { shape: vec![M, 64], data: input_x() };
    std::fs::write(out.join("x.bin"), f32_bytes(&x.data))?;
    let mut written = Vec::new();
    for (family, fp) in [("chain", matmul_chain(21)), ("rmsnorm", rmsnorm_qk(21))] {
        let output =
            fp.graph.as_ref().and_then(|g| g.output.first()).and_then(|o| o.name.clone()).ok_or("no output")?;
        let schemes = [
            ("fp32", None),
            ("w8a8", Some(w8a8_options(&fp, &reader, &x)?)),
            ("int8wo", Some(QdqOptions::new(QuantScheme::Int8WeightOnly))),
            ("int4wo", Some(QdqOptions::new(QuantScheme::Int4WeightOnly { block_size: 32, asymmetric: false }))),
            ("int4wo_asym", Some(QdqOptions::new(QuantScheme::Int4WeightOnly { block_size: 32, asymmetric: true }))),
        ];
        for (tag, opts) in schemes {
            let mut m = fp.clone();
            if let Some(o) = &opts {
                rewrite_graph(&mut m, &reader, o)?;
            }
            let name = format!("{family}_{tag}");
            std::fs::write(out.join(format!("{name}.onnx")), m.encode_to_vec())?;
            let y = &run(&m, &reader, &[("x", x.clone())])[&output];
            std::fs::write(out.join(format!("{name}.{output}.bin")), f32_bytes(&y.data))?;
            written.push(name);
        }
    }
    println!("{}", written.join(" "));
    Ok(())
}
