//! Time r1's `r1.GroupQueryAttention` against ONNX Runtime's `com.microsoft.GroupQueryAttention` at the 1.5B
//! attention shape (12 query heads, 2 KV heads, head size 128, 28 layers, each layer's cache its own
//! `[1, 2, 8192, 128]` buffer bound as past and present, as the engine's pool does), alternating the two kernels so
//! that both see the same machine. A decode step (1 new position) and a prefill chunk (256 positions) after
//! `CONTEXT` cached positions.
//!
//!   cargo run --release -p r1-tests --example attention_kernels -- [CONTEXT ...]   (default 128 2048 4000)
use std::time::Instant;

use ndarray::{Array, IxDyn};
use ort::session::Session;
use ort::value::{DynValue, Tensor};
use prost::Message;
use r1_proto::onnx::{
    attribute_proto, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TypeProto,
    ValueInfoProto,
};

const H: usize = 12;
const KV: usize = 2;
const D: usize = 128;
const CAP: usize = 8192;
const LAYERS: usize = 28;

fn value_info(name: &str, elem: i32) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: Some(elem), shape: None })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn attr(name: &str, i: Option<i64>, f: Option<f32>) -> AttributeProto {
    let t = if f.is_some() { attribute_proto::AttributeType::Float } else { attribute_proto::AttributeType::Int };
    AttributeProto { name: Some(name.into()), i, f, r#type: Some(t as i32), ..Default::default() }
}

/// `LAYERS` attention nodes of `domain` over the same q/k/v, each with its own cache.
fn model(domain: &str) -> Vec<u8> {
    let mut nodes = Vec::new();
    let mut inputs: Vec<ValueInfoProto> = [("q", 1), ("k", 1), ("seqlens", 6), ("total", 6), ("cos", 1), ("pos", 7)]
        .iter()
        .map(|(n, t)| value_info(n, *t))
        .collect();
    let mut outputs = Vec::new();
    for l in 0..LAYERS {
        let (pk, pv, o, ok, ov) =
            (format!("pk{l}"), format!("pv{l}"), format!("o{l}"), format!("ok{l}"), format!("ov{l}"));
        inputs.push(value_info(&pk, 1));
        inputs.push(value_info(&pv, 1));
        outputs.extend([value_info(&o, 1), value_info(&ok, 1), value_info(&ov, 1)]);
        nodes.push(NodeProto {
            name: Some(format!("attention{l}")),
            op_type: Some("GroupQueryAttention".into()),
            domain: Some(domain.into()),
            input: ["q", "k", "k", &pk, &pv, "seqlens", "total", "cos", "cos", "pos"].map(String::from).to_vec(),
            output: vec![o, ok, ov],
            attribute: vec![
                attr("num_heads", Some(H as i64), None),
                attr("kv_num_heads", Some(KV as i64), None),
                attr("do_rotary", Some(1), None),
                attr("scale", None, Some(1.0 / (D as f32).sqrt())),
            ],
            ..Default::default()
        });
    }
    ModelProto {
        ir_version: Some(9),
        opset_import: vec![
            OperatorSetIdProto { domain: Some(String::new()), version: Some(17) },
            OperatorSetIdProto { domain: Some(domain.into()), version: Some(1) },
        ],
        graph: Some(GraphProto {
            name: Some("attention".into()),
            node: nodes,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn tensor(shape: &[usize], fill: f32) -> DynValue {
    let n = shape.iter().product();
    Tensor::from_array(Array::from_shape_vec(IxDyn(shape), vec![fill; n]).unwrap()).unwrap().into_dyn()
}

/// Milliseconds per run of `s` (best of 5, after one warm-up) for `seq` new positions after `context` cached.
fn time(s: &mut Session, caches: &mut [DynValue], context: usize, seq: usize) -> f64 {
    let total = context + seq;
    let int32 = |v: i32| Tensor::from_array(([1usize], vec![v])).unwrap().into_dyn();
    let mut b = s.create_binding().unwrap();
    b.bind_input("q", &tensor(&[1, seq, H * D], 0.1)).unwrap();
    b.bind_input("k", &tensor(&[1, seq, KV * D], 0.1)).unwrap();
    b.bind_input("seqlens", &int32(total as i32 - 1)).unwrap();
    b.bind_input("total", &int32(total as i32)).unwrap();
    b.bind_input("cos", &tensor(&[CAP, D / 2], 0.5)).unwrap();
    let pos: Vec<i64> = (context as i64..total as i64).collect();
    b.bind_input("pos", &Tensor::from_array(([1usize, seq], pos)).unwrap().into_dyn()).unwrap();
    for l in 0..LAYERS {
        b.bind_input(format!("pk{l}"), &caches[2 * l]).unwrap();
        b.bind_input(format!("pv{l}"), &caches[2 * l + 1]).unwrap();
    }
    for (l, pair) in caches.chunks_mut(2).enumerate() {
        let (k, v) = pair.split_at_mut(1);
        b.bind_output(format!("ok{l}"), &mut k[0]).unwrap();
        b.bind_output(format!("ov{l}"), &mut v[0]).unwrap();
        b.bind_output_to_device(format!("o{l}"), &ort::memory::MemoryInfo::default()).unwrap();
    }
    let mut best = f64::INFINITY;
    for rep in 0..6 {
        let t = Instant::now();
        drop(s.run_binding(&b).unwrap());
        if rep > 0 {
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    best
}

fn main() {
    let contexts: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a context length")).collect();
    let contexts = if contexts.is_empty() { vec![128, 2048, 4000] } else { contexts };
    let env = r1_engine::host::environment().expect("ONNX Runtime");
    let open = |domain: &str| {
        Session::builder(env)
            .unwrap()
            .with_operators(r1_engine::backend::attention::domain().unwrap())
            .unwrap()
            .commit_from_memory(&model(domain))
            .unwrap()
    };
    let mut sessions = [open("r1"), open("com.microsoft")];
    // Outputs can be bound only to tensors ONNX Runtime allocated.
    let cache = || {
        let mut t = Tensor::<f32>::new(&ort::memory::Allocator::default(), [1, KV, CAP, D]).unwrap();
        t.try_extract_tensor_mut::<f32>().unwrap().1.fill(0.01);
        t.into_dyn()
    };
    let mut caches: Vec<DynValue> = (0..2 * LAYERS).map(|_| cache()).collect();
    println!("| context | step | r1 (ms) | ONNX Runtime (ms) | r1 / ONNX Runtime |");
    println!("|---|---|---|---|---|");
    for &c in &contexts {
        for (what, seq) in [("decode (1 position)", 1), ("prefill chunk (256)", 256)] {
            let mut ms = [f64::INFINITY; 2];
            for _round in 0..2 {
                for (i, s) in sessions.iter_mut().enumerate() {
                    ms[i] = ms[i].min(time(s, &mut caches, c, seq));
                }
            }
            println!("| {c} | {what} | {:.2} | {:.2} | {:.2} |", ms[0], ms[1], ms[0] / ms[1]);
        }
    }
}
