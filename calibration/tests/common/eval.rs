//! A deliberately small ONNX interpreter for the rewritten test graphs, written from the ONNX operator spec and
//! independent of the crate's quantization code: MatMul (2-D), Add/Mul/Div (numpy broadcasting), Sqrt,
//! ReduceMean (last axis), QuantizeLinear (int8, per-tensor) and DequantizeLinear (per-tensor, per-axis, blocked;
//! int8 and packed int4 / uint4 inputs, optional zero points), com.microsoft MatMulNBits (8 bits) and Split (last
//! axis).
#![allow(dead_code)]
use r1_calibration::external::ExternalDataReader;
use r1_proto::onnx::tensor_proto::DataType;
use r1_proto::onnx::{ModelProto, NodeProto, TensorProto};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub struct T {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

fn decode(t: &TensorProto, reader: &ExternalDataReader) -> T {
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let n: usize = shape.iter().product();
    let bytes = reader.tensor_bytes(t).unwrap();
    let dt = t.data_type.unwrap();
    let data: Vec<f32> = if dt == DataType::Float as i32 {
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    } else if dt == DataType::Int8 as i32 {
        bytes.iter().map(|&b| f32::from(b as i8)).collect()
    } else if dt == DataType::Int64 as i32 {
        bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect()
    } else if dt == DataType::Int4 as i32 {
        // spec: element i lives in byte i/2, low nibble for even i; two's complement 4-bit
        (0..n)
            .map(|i| {
                let b = bytes[i / 2];
                let nib = if i % 2 == 0 { b & 0xf } else { b >> 4 };
                let v = nib as i32;
                (if v >= 8 { v - 16 } else { v }) as f32
            })
            .collect()
    } else if dt == DataType::Uint8 as i32 {
        bytes.iter().map(|&b| f32::from(b)).collect()
    } else if dt == DataType::Uint4 as i32 {
        (0..n).map(|i| f32::from(if i % 2 == 0 { bytes[i / 2] & 0xf } else { bytes[i / 2] >> 4 })).collect()
    } else {
        panic!("eval: unsupported data type {dt} for {:?}", t.name)
    };
    assert_eq!(data.len(), n, "payload of {:?}", t.name);
    T { shape, data }
}

fn attr(n: &NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name.as_deref() == Some(name)).and_then(|a| a.i)
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = i % shape[d];
        i /= shape[d];
    }
    idx
}

fn broadcast(a: &T, b: &T, f: impl Fn(f32, f32) -> f32) -> T {
    let r = a.shape.len().max(b.shape.len());
    let pad = |s: &[usize]| [vec![1; r - s.len()], s.to_vec()].concat();
    let (sa, sb) = (pad(&a.shape), pad(&b.shape));
    let shape: Vec<usize> = sa
        .iter()
        .zip(&sb)
        .map(|(&x, &y)| {
            if x == 1 {
                y
            } else {
                assert!(y == 1 || y == x);
                x
            }
        })
        .collect();
    let (ta, tb) = (strides(&sa), strides(&sb));
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|i| {
            let idx = unravel(i, &shape);
            let ia: usize = idx.iter().zip(&sa).zip(&ta).map(|((&x, &d), &s)| if d == 1 { 0 } else { x * s }).sum();
            let ib: usize = idx.iter().zip(&sb).zip(&tb).map(|((&x, &d), &s)| if d == 1 { 0 } else { x * s }).sum();
            f(a.data[ia], b.data[ib])
        })
        .collect();
    T { shape, data }
}

fn matmul(a: &T, b: &T) -> T {
    let (m, k) = (a.shape[0], a.shape[1]);
    let n = b.shape[1];
    assert_eq!(b.shape[0], k);
    let mut y = vec![0.0f32; m * n];
    for i in 0..m {
        for c in 0..n {
            let mut acc = 0.0f32;
            for j in 0..k {
                acc += a.data[i * k + j] * b.data[j * n + c];
            }
            y[i * n + c] = acc;
        }
    }
    T { shape: vec![m, n], data: y }
}

/// Runs the model on named inputs; returns every value computed (inputs, initializers, node outputs).
pub fn run(model: &ModelProto, reader: &ExternalDataReader, inputs: &[(&str, T)]) -> HashMap<String, T> {
    let g = model.graph.as_ref().unwrap();
    let mut v: HashMap<String, T> = HashMap::new();
    for t in &g.initializer {
        v.insert(t.name.clone().unwrap(), decode(t, reader));
    }
    for (n, t) in inputs {
        v.insert(n.to_string(), t.clone());
    }
    for node in &g.node {
        let get = |i: usize| v.get(&node.input[i]).unwrap_or_else(|| panic!("eval: {} missing", node.input[i])).clone();
        let op = node.op_type.as_deref().unwrap();
        let out = match op {
            "MatMul" => matmul(&get(0), &get(1)),
            "Add" => broadcast(&get(0), &get(1), |a, b| a + b),
            "Mul" => broadcast(&get(0), &get(1), |a, b| a * b),
            "Div" => broadcast(&get(0), &get(1), |a, b| a / b),
            "Sqrt" => {
                let x = get(0);
                T { data: x.data.iter().map(|a| a.sqrt()).collect(), shape: x.shape }
            }
            "ReduceMean" => {
                let x = get(0);
                let axes = get(1);
                assert!(axes.data == [-1.0] || axes.data == [(x.shape.len() - 1) as f32]);
                let last = *x.shape.last().unwrap();
                let data = x.data.chunks(last).map(|r| r.iter().sum::<f32>() / last as f32).collect();
                let mut shape = x.shape.clone();
                *shape.last_mut().unwrap() = 1;
                T { shape, data }
            }
            "QuantizeLinear" => {
                let (x, s, zp) = (get(0), get(1), get(2));
                assert_eq!(s.data.len(), 1, "eval: per-tensor QuantizeLinear only");
                let data = x
                    .data
                    .iter()
                    .map(|&a| ((a / s.data[0]).round_ties_even() + zp.data[0]).clamp(-128.0, 127.0))
                    .collect();
                T { shape: x.shape, data }
            }
            "DequantizeLinear" => {
                let (x, s) = (get(0), get(1));
                let zp = if node.input.len() > 2 { Some(get(2)) } else { None };
                let rank = x.shape.len() as i64;
                let axis = attr(node, "axis").unwrap_or(1).rem_euclid(rank.max(1)) as usize;
                let block = attr(node, "block_size").unwrap_or(0) as usize;
                let sstr = strides(&s.shape);
                let data = (0..x.data.len())
                    .map(|i| {
                        let mut idx = unravel(i, &x.shape);
                        let si = if s.data.len() == 1 {
                            0
                        } else {
                            match idx[axis].checked_div(block) {
                                // blocked: same rank as x, axis index divided by the block size
                                Some(b) => {
                                    idx[axis] = b;
                                    idx.iter().zip(&sstr).map(|(a, b)| a * b).sum()
                                }
                                // per-axis: 1-D scale indexed by the axis coordinate
                                None => idx[axis],
                            }
                        };
                        let z = zp.as_ref().map_or(0.0, |z| z.data[si]);
                        (x.data[i] - z) * s.data[si]
                    })
                    .collect();
                T { shape: x.shape, data }
            }
            // com.microsoft MatMulNBits, 8 bits, as its spec reads: B is uint8 [N, blocks, block_size], scales
            // [N * blocks], zero point 128 when absent; W[k][n] = (B[n][k / bs][k % bs] - zp) * scale[n * blocks + k / bs].
            "MatMulNBits" => {
                let (a, b, s) = (get(0), get(1), get(2));
                assert_eq!(attr(node, "bits"), Some(8), "eval: 8-bit MatMulNBits only");
                assert!(node.input.len() < 4 || node.input[3].is_empty(), "eval: MatMulNBits without zero points only");
                let (k, n, bs) = (
                    attr(node, "K").unwrap() as usize,
                    attr(node, "N").unwrap() as usize,
                    attr(node, "block_size").unwrap() as usize,
                );
                let nb = k.div_ceil(bs);
                assert_eq!((b.shape.clone(), s.data.len()), (vec![n, nb, bs], n * nb));
                let mut w = vec![0.0f32; k * n];
                for r in 0..k {
                    for c in 0..n {
                        w[r * n + c] = (b.data[(c * nb + r / bs) * bs + r % bs] - 128.0) * s.data[c * nb + r / bs];
                    }
                }
                matmul(&a, &T { shape: vec![k, n], data: w })
            }
            "Split" => {
                let (x, sizes) = (get(0), get(1));
                assert!(matches!(attr(node, "axis"), Some(-1)) || attr(node, "axis") == Some(x.shape.len() as i64 - 1));
                let last = *x.shape.last().unwrap();
                assert_eq!(sizes.data.iter().sum::<f32>() as usize, last);
                let mut start = 0;
                for (o, &sz) in node.output.iter().zip(&sizes.data) {
                    let sz = sz as usize;
                    let data = x.data.chunks(last).flat_map(|row| row[start..start + sz].to_vec()).collect();
                    let mut shape = x.shape.clone();
                    *shape.last_mut().unwrap() = sz;
                    v.insert(o.clone(), T { shape, data });
                    start += sz;
                }
                continue;
            }
            other => panic!("eval: op {other} not supported"),
        };
        v.insert(node.output[0].clone(), out);
    }
    v
}
