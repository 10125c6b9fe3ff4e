//! The quantized bytes do not depend on how the work is scheduled: the blocked int4 (both schemes) and per-channel
//! int8 codes, scales and zero points of a fixed set of weights, and the whole rewritten model (`model.onnx` and
//! its data file) of a small graph, hash to the values the scalar, single-threaded implementation produced
//! (recorded from it at commit ac413c2, before the vectorized, multi-threaded one replaced it). A change here means
//! an artifact's weights changed: that needs its own measurement (arith-r1 accuracy), not a new constant.
use prost::Message;
use r1_calibration::external::ExternalDataWriter;
use r1_calibration::qdq::{quantize_model, QdqOptions, QuantScheme};
use r1_calibration::quant::{
    quantize_blocked_i4, quantize_blocked_packed, quantize_blocked_u4, quantize_per_channel, BlockedI4,
};
use r1_proto::onnx::tensor_proto::DataType;
use r1_proto::onnx::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto};

/// FNV-1a, 64 bits: enough to tell byte strings apart in a test, no dependency.
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in *p {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        // separate the parts, so that moving a byte from one to the next changes the hash
        h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// xorshift64*: deterministic, platform independent.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A `[k, n]` weight of the given kind: 0 plain, 1 skewed positive, 2 with outliers, 3 with all-zero blocks and
/// columns, 4 tiny (near subnormal) and large magnitudes side by side, 5 few distinct values (rounding ties).
fn weight(k: usize, n: usize, kind: u32, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..k * n)
        .map(|i| {
            let (row, col) = (i / n, i % n);
            let u = r.unit();
            match kind {
                0 => 0.05 * u,
                1 => 0.3 * u.abs() + 0.02 * u - 0.01,
                2 if i % 53 == 7 => 4.0 * u,
                2 => 0.1 * u,
                3 if (row / 32) % 3 == 1 || col % 5 == 2 => 0.0,
                3 => u,
                4 if col % 2 == 0 => 1e-37 * u,
                4 => 3e4 * u,
                _ => ((u * 8.0).round() * 0.25).clamp(-1.0, 1.75),
            }
        })
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn blocked_hash(q: &BlockedI4) -> u64 {
    let zp = q.packed_zero_points().unwrap_or_default();
    fnv(&[&q.packed(), &f32_bytes(&q.scales), &zp])
}

/// (k, n, block, kind): K not a multiple of the block, N not a multiple of any vector width, one column, blocks
/// of every size.
const CASES: [(usize, usize, usize, u32); 9] = [
    (40, 3, 32, 0),
    (96, 17, 32, 1),
    (128, 33, 64, 2),
    (300, 5, 128, 3),
    (64, 40, 32, 4),
    (33, 1, 32, 5),
    (256, 24, 32, 2),
    (160, 19, 64, 5),
    (97, 70, 32, 0),
];

/// The hashes the scalar implementation gave for [`CASES`]: (asymmetric uint4, symmetric int4, per-channel int8).
const WANT: [(u64, u64, u64); 9] = [
    (0x77bacf5b30cf0340, 0xf08ba31011cb85fe, 0xee1b47feab7214ff),
    (0x3a5095fa4cb752b0, 0xa677092da2a13670, 0xe6ab8f22ba7c54ba),
    (0xed1b7e5f34c7b95f, 0x50e05b08b87750d5, 0xff2e895afe3302ee),
    (0x078e5df4fd02d983, 0xdeb33855b194a00e, 0x056d0803b8bf98e8),
    (0x4be7f2350be51596, 0xb7d2e0f81f79791f, 0x13fc12053d0eb496),
    (0x2186c5896fe7eadb, 0xcfeb7b909658e12c, 0x8f5146501aee48ee),
    (0x97b99e538dc14708, 0x27bcdb0efb535acb, 0x48d19c40a7f3b0aa),
    (0x8e624c094cabf70d, 0x379b81f2dbd9fe1a, 0x81288fd2cbe74187),
    (0x5521cf4ef8c2c4ef, 0x425805c8838979c8, 0xad36ae24387824c7),
];

#[test]
fn blocked_int4_and_int8_bytes_are_the_scalar_implementations() {
    let mut got = Vec::new();
    for (i, &(k, n, block, kind)) in CASES.iter().enumerate() {
        let w = weight(k, n, kind, i as u64 + 1);
        let u4 = blocked_hash(&quantize_blocked_u4(&w, k, n, block).unwrap());
        let i4 = blocked_hash(&quantize_blocked_i4(&w, k, n, block).unwrap());
        // The packed form the QDQ rewrite writes (packed while quantizing when N is even) has the same bytes.
        for (asymmetric, unpacked) in [(true, u4), (false, i4)] {
            let p = quantize_blocked_packed(&w, k, n, block, asymmetric).unwrap();
            let zp = p.packed_zero_points.unwrap_or_default();
            assert_eq!(fnv(&[&p.packed, &f32_bytes(&p.scales), &zp]), unpacked, "case {i}, asymmetric {asymmetric}");
        }
        let q8 = quantize_per_channel(&w, k, n).unwrap();
        let i8 = fnv(&[&q8.values.iter().map(|&v| v as u8).collect::<Vec<_>>(), &f32_bytes(&q8.scales)]);
        got.push((u4, i4, i8));
    }
    let show: Vec<String> = got.iter().map(|(a, b, c)| format!("    ({a:#x}, {b:#x}, {c:#x}),")).collect();
    assert_eq!(got, WANT, "got:\n{}", show.join("\n"));
}

fn node(op: &str, name: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        name: Some(name.into()),
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

fn f32_init(name: &str, dims: &[usize], v: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(f32_bytes(v)),
        ..Default::default()
    }
}

/// `x[*, 64]`: `w_a` read by two MatMuls, `w_b` also read by an Add (so its fp32 copy stays), `w_c` excluded, a
/// small bias left inline; every weight in an external data file like an exported graph's.
fn small_model(dir: &std::path::Path) -> ModelProto {
    let graph = GraphProto {
        name: Some("identity".into()),
        node: vec![
            node("MatMul", "mm_a1", &["x", "w_a"], "a1"),
            node("MatMul", "mm_a2", &["x", "w_a"], "a2"),
            node("Add", "sum", &["a1", "a2"], "s"),
            node("MatMul", "mm_b", &["s", "w_b"], "b"),
            node("Add", "uses_w_b", &["w_b", "w_b"], "wb2"),
            node("MatMul", "mm_c", &["b", "w_c"], "c"),
            node("Add", "bias", &["c", "bias"], "y"),
        ],
        initializer: vec![
            f32_init("w_a", &[64, 96], &weight(64, 96, 2, 11)),
            f32_init("w_b", &[96, 72], &weight(96, 72, 1, 12)),
            f32_init("bias", &[8], &weight(1, 8, 0, 13)),
            f32_init("w_c", &[72, 8], &weight(72, 8, 0, 14)),
        ],
        ..Default::default()
    };
    let mut m = ModelProto {
        ir_version: Some(10),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(21) }],
        graph: Some(graph),
        ..Default::default()
    };
    let mut w = ExternalDataWriter::create(dir, "model.onnx.data").unwrap();
    for t in m.graph.as_mut().unwrap().initializer.iter_mut().filter(|t| t.name.as_deref() != Some("bias")) {
        let bytes = t.raw_data.clone().unwrap();
        w.write_tensor(t, &bytes).unwrap();
    }
    w.finish().unwrap();
    m
}

/// The hashes of (`model.onnx`, its data file) for int4 asymmetric (block 32), int4 symmetric (block 64) and int8
/// weight-only, as the scalar implementation wrote them.
const WANT_MODEL: [(u64, u64); 3] = [
    (0x403f4351e26f57c5, 0x5274e17ccdb13fbf),
    (0x3d134ce59ac748ed, 0x2a5fa97b1764353d),
    (0xb89854a0af8e567e, 0xc76bb426532f27df),
];

#[test]
fn quantized_model_files_are_the_scalar_implementations() {
    let schemes = [
        QuantScheme::Int4WeightOnly { block_size: 32, asymmetric: true },
        QuantScheme::Int4WeightOnly { block_size: 64, asymmetric: false },
        QuantScheme::Int8WeightOnly,
    ];
    let mut got = Vec::new();
    for scheme in schemes {
        let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut m = small_model(src.path());
        let mut opts = QdqOptions::new(scheme);
        opts.exclude.insert("w_c".into());
        opts.external_threshold = 64;
        quantize_model(&mut m, src.path(), out.path(), "model.onnx.data", &opts).unwrap();
        let data = std::fs::read(out.path().join("model.onnx.data")).unwrap();
        got.push((fnv(&[&m.encode_to_vec()]), fnv(&[&data])));
    }
    let show: Vec<String> = got.iter().map(|(a, b)| format!("({a:#x}, {b:#x})")).collect();
    assert_eq!(got, WANT_MODEL, "got: [{}]", show.join(", "));
}
