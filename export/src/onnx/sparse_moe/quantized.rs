//! Quantized routed experts: one `com.microsoft.QMoE` per MoE layer of an `int8-wo`, `int4-wo` or `int8` graph's
//! `--target cpu` serving copy. A streamed `int8-wo` / `int4-wo` export's portable graph holds the experts quantized
//! already (3-D codes behind a blocked `DequantizeLinear`, `quantize/stream.rs`): their codes, scales and zero points
//! are re-laid into the operator's layout here, nothing rounded twice. Staged exports (calibration data,
//! `--keep-float`, W8A8 `int8`) keep float stacks in `model.onnx` (the QDQ rewrite quantizes 2-D MatMul weights
//! only), and they are quantized here, with the same functions and scheme: the two give the same operator tensors
//! (`tests/tests/quantized_experts.rs` compares them byte for byte).
//!
//! What ONNX Runtime 1.31.1's CPU kernel takes (checked against a NumPy reference, `export/benches/qmoe_probe.py`):
//!
//! - `uint8` codes, each expert's matrices in the checkpoint's orientation (`fc1 [E, 2I, K/pack]`, gate and up rows
//!   interleaved as for `MoE`; `fc2 [E, H, I/pack]`), 4-bit codes two per byte, the even K index in the low nibble.
//! - Scales `[E, N, K / block_size]` and optional zero points (4-bit: packed the same way, an odd count padded to a
//!   byte); without zero points the codes are centred on 2^(bits−1). `block_size` must be a power of two ≥ 16 that
//!   divides **both** the hidden and the intermediate size.
//! - `router_weights` beside `router_probs`: `router_probs` only selects (top-`k`), `router_weights` mixes, and with
//!   `normalize_routing_weights = 0` the selected entries are used as they are. Both are fed the router's final
//!   weights `w` (zero outside each token's top-k), so the output is `Σ_e w_e · expert_e(x)` exactly, without the
//!   `ln` / rescale that the float `MoE` needs.
//! - `accuracy_level = 4` quantizes each block of the activations to int8 and runs integer dot products; block-wise
//!   8-bit experts have only that kernel. Like the `MatMulNBits` of the same graph (accuracy level 4 too), that is
//!   the CPU form of weight-only quantization here. Measured at hidden 1024, intermediate 512, 64 experts, top-8,
//!   2 threads (ms per call at 1 / 8 / 64 tokens, `export/benches/qmoe_speed.py`): float `MoE` 3.2 / 16.9 / 38.7;
//!   int4 blocks of 32 with float activations 0.51 / 6.2 / 21.3, with int8 activations 0.15 / 1.6 / 9.0; 8-bit
//!   per column with float activations 1.06 / 8.3 / 37.5, in blocks of 32 with int8 activations 0.16 / 2.8 / 10.1.
//!
//! The forms:
//!
//! - `int8-wo` and `int8`: int8 codes with one scale per output channel (symmetric, no zero points), as the QDQ
//!   rewrite quantizes every other int8 weight; the scale is repeated over the K blocks (exact at any block size),
//!   the block the longest power of two ≤ 256 that divides both sizes. For `int8` (W8A8) that makes the experts'
//!   inputs int8 too, quantized per block at run time by the kernel, not with the calibrated static scales of the
//!   QDQ MatMuls (the portable graph's calibration never observes expert inputs: they are read by 3-D stacks).
//! - `int4-wo`: the artifact's own scheme (`quantization.scheme`: blocks of 32 by default, asymmetric uint4 with a
//!   zero point per block, or symmetric), the same MSE range search as its 2-D weights ([`r1_calibration::quant`]).
//!
//! Sizes that the block does not divide (arith-r1's hidden size is 56) are padded with zeros: the tokens go through
//! a `Pad` to the padded hidden size, fc1's K and fc2's N (and, for the intermediate size, fc1's N and fc2's K)
//! carry zero weights, and a `Slice` drops the padded outputs. Zero weights quantize to exactly zero in both
//! schemes (zero is always on the asymmetric grid), so a padded block quantizes like the portable graph's shorter
//! last block; the cost is the padded multiply-adds (arith-r1: 64 × 128 instead of 56 × 112 per expert matrix).
//! Per-column scales without blocks need no padding but run the float-activation kernel, 3–7× slower (above).

use r1_calibration::quant::{quantize_blocked_i4, quantize_blocked_u4, quantize_per_channel};
use serde::Serialize;

use super::relayout::{external_tensor, Codes, QuantizedStack, Stack, Stacks};
use super::{attr_i, graph_err, i64_tensor, node, swiglu_attributes, Layer, MS_DOMAIN, PREFIX};
use crate::error::Result;
use crate::onnx::{ElemType, ExternalDataWriter, ExternalSpan};
use r1_proto::onnx::{NodeProto, TensorProto};

/// The operator, `domain.type`.
pub const QMOE_OP: &str = "com.microsoft.QMoE";
/// `accuracy_level` of the expert GEMMs: int8 activations per block (what the graph's `MatMulNBits` use).
pub const ACCURACY_LEVEL: i64 = 4;
/// The longest block the int8 form uses (`MatMulNBits`' longest, [`r1_calibration::matmul_nbits::BLOCK_SIZES`]).
const MAX_INT8_BLOCK: usize = 256;
/// The shortest block the kernel takes.
const MIN_BLOCK: usize = 16;

/// How a serving graph's routed experts are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertWeights {
    /// In the graph's float type, one `com.microsoft.MoE` per layer.
    Float,
    /// int8, one scale per output channel (symmetric).
    Int8,
    /// int4 in blocks of `block` input rows, with a zero point per block when `asymmetric`.
    Int4 { block: usize, asymmetric: bool },
}

impl ExpertWeights {
    /// Bits per weight of a quantized form.
    fn bits(self) -> usize {
        match self {
            ExpertWeights::Float => 32,
            ExpertWeights::Int8 => 8,
            ExpertWeights::Int4 { .. } => 4,
        }
    }
}

/// What `manifest.targets.cpu.expert_quantization` records about the quantized experts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExpertQuantization {
    /// `com.microsoft.QMoE`.
    pub op: String,
    pub bits: usize,
    /// Input rows per scale (the operator's `block_size`).
    pub block_size: usize,
    /// `per_channel` (one scale per output channel, repeated over the blocks) or `blocked`.
    pub scales: String,
    /// Zero points per block (uint codes over each block's own range).
    pub asymmetric: bool,
    /// The operator's `accuracy_level` (4: int8 activations per block).
    pub accuracy_level: i64,
    /// The hidden and intermediate sizes the weights are padded to (equal to the model's when nothing is padded).
    pub padded_hidden: usize,
    pub padded_intermediate: usize,
    /// Bytes of expert weights, scales and zero points written, over all layers.
    pub bytes: u64,
}

/// The operator's block size and the padded `(hidden, intermediate)` for `q`.
pub(super) fn geometry(q: ExpertWeights, hidden: usize, inter: usize) -> Result<(usize, usize, usize)> {
    match q {
        ExpertWeights::Float => Err(graph_err("float experts have no quantized geometry".into())),
        ExpertWeights::Int4 { block, .. } => {
            if !block.is_power_of_two() || block < MIN_BLOCK {
                return Err(graph_err(format!("QMoE block_size must be a power of two >= {MIN_BLOCK}, got {block}")));
            }
            Ok((block, hidden.next_multiple_of(block), inter.next_multiple_of(block)))
        }
        ExpertWeights::Int8 => {
            let (hp, ip) = (hidden.next_multiple_of(MIN_BLOCK), inter.next_multiple_of(MIN_BLOCK));
            let mut block = MAX_INT8_BLOCK;
            while hp % block != 0 || ip % block != 0 {
                block /= 2;
            }
            Ok((block, hp, ip))
        }
    }
}

/// `m` (`[rows, cols]`, row-major) zero-padded to `[rp, cp]`.
fn pad(m: &[f32], rows: usize, cols: usize, rp: usize, cp: usize) -> Vec<f32> {
    if (rows, cols) == (rp, cp) {
        return m.to_vec();
    }
    let mut out = vec![0.0; rp * cp];
    for r in 0..rows {
        out[r * cp..r * cp + cols].copy_from_slice(&m[r * cols..(r + 1) * cols]);
    }
    out
}

/// One `[K, N]` weight quantized, kept per output column as the operator reads it.
struct Columns {
    /// Codes `[N, K]` as stored (uint8: `q + 128` for int8, `q` or `q + 8` for uint4 / int4), unpacked.
    codes: Vec<u8>,
    /// Scales `[N, K / block]`.
    scales: Vec<f32>,
    /// Zero points `[N, K / block]` (asymmetric int4 only).
    zeros: Option<Vec<u8>>,
}

/// Quantizes `w` (`[k, n]`, already padded) per `q`, with `block` rows per scale.
fn quantize(w: &[f32], k: usize, n: usize, q: ExpertWeights, block: usize) -> Result<Columns> {
    let nb = k / block;
    let mut codes = vec![0u8; n * k];
    let mut scales = vec![0f32; n * nb];
    let zeros = match q {
        ExpertWeights::Int8 => {
            let p = quantize_per_channel(w, k, n)?;
            for c in 0..n {
                for r in 0..k {
                    codes[c * k + r] = (i16::from(p.values[r * n + c]) + 128) as u8;
                }
                scales[c * nb..(c + 1) * nb].fill(p.scales[c]);
            }
            None
        }
        ExpertWeights::Int4 { asymmetric, .. } => {
            let p =
                if asymmetric { quantize_blocked_u4(w, k, n, block)? } else { quantize_blocked_i4(w, k, n, block)? };
            // Symmetric codes in [-8, 7] are stored as uint4 around the kernel's default zero point 8.
            let offset = if asymmetric { 0 } else { 8 };
            for c in 0..n {
                for r in 0..k {
                    codes[c * k + r] = (p.values[r * n + c] + offset) as u8;
                }
                for b in 0..nb {
                    scales[c * nb + b] = p.scales[b * n + c];
                }
            }
            p.zero_points
                .map(|z| (0..n).flat_map(|c| (0..nb).map(move |b| (c, b))).map(|(c, b)| z[b * n + c]).collect())
        }
        ExpertWeights::Float => return Err(graph_err("float experts are not quantized".into())),
    };
    Ok(Columns { codes, scales, zeros })
}

/// The columns of expert `e` of stack `s` (`[k, n]`, padded to `[kp, np]`) for the operator per `q`: quantized from
/// a float stack, or re-laid from a quantized one.
fn columns(s: &Stack, e: usize, [k, n, kp, np]: [usize; 4], q: ExpertWeights, block: usize) -> Result<Columns> {
    match s {
        Stack::Float(_) => quantize(&pad(&s.expert::<f32>(e, k * n)?, k, n, kp, np), kp, np, q, block),
        Stack::Quantized(qs) => relaid(qs, e, kp, np, q, block),
    }
}

/// Expert `e` of the quantized stack `s` as the operator's columns (`[np, kp]` codes, `[np, kp / block]` scales and
/// zero points): each column's codes moved as they are (int8 and symmetric int4 offset to the operator's unsigned
/// storage, 128 and 8), its scales (int8: the one per-channel scale repeated over the operator's blocks) and zero
/// points. Rows padded below K get the code that dequantizes to exactly zero in their block, columns padded past N
/// are what quantizing a zero column gives: the bytes of quantizing the padded float matrix ([`quantize`]), whose
/// zero rows change no block's range or clip search.
fn relaid(s: &QuantizedStack, e: usize, kp: usize, np: usize, q: ExpertWeights, block: usize) -> Result<Columns> {
    let (k, n, nb) = (s.k, s.n, kp / block);
    let form_ok = match q {
        ExpertWeights::Int8 => s.form == Codes::Int8 && s.blocks() == 1,
        ExpertWeights::Int4 { block: b, asymmetric } => {
            s.form == if asymmetric { Codes::Uint4 } else { Codes::Int4 } && s.block == b && s.blocks() == nb
        }
        ExpertWeights::Float => false,
    };
    if !form_ok || kp < k || np < n {
        return Err(graph_err(format!(
            "`{}`: {:?} experts in blocks of {} are not the artifact's {q:?}",
            s.codes_name(),
            s.form,
            s.block
        )));
    }
    let x = s.expert(e)?;
    let zero = quantize(&vec![0.0; kp], kp, 1, q, block)?;
    let stored = |c: i16| -> u8 {
        match s.form {
            Codes::Int8 => (c + 128) as u8,
            Codes::Int4 => (c + 8) as u8,
            Codes::Uint4 => c as u8,
        }
    };
    let mut codes = vec![0u8; np * kp];
    let mut scales = vec![0f32; np * nb];
    let mut zeros = x.zeros.as_ref().map(|_| vec![0u8; np * nb]);
    for c in 0..np {
        let (col, sc) = (&mut codes[c * kp..(c + 1) * kp], &mut scales[c * nb..(c + 1) * nb]);
        if c >= n {
            col.copy_from_slice(&zero.codes);
            sc.copy_from_slice(&zero.scales);
            if let (Some(z), Some(zz)) = (zeros.as_mut(), zero.zeros.as_ref()) {
                z[c * nb..(c + 1) * nb].copy_from_slice(zz);
            }
            continue;
        }
        // The portable block of the operator's block `b` (int8: the one per-channel block).
        let src = |b: usize| if s.form == Codes::Int8 { c } else { b * n + c };
        for (b, v) in sc.iter_mut().enumerate() {
            *v = x.scales[src(b)];
        }
        if let (Some(z), Some(xz)) = (zeros.as_mut(), x.zeros.as_ref()) {
            for b in 0..nb {
                z[c * nb + b] = xz[src(b)] as u8;
            }
        }
        for (r, v) in col.iter_mut().enumerate() {
            *v = if r < k {
                stored(x.codes[r * n + c])
            } else {
                // Zero in this block: its zero point (asymmetric), else the centre.
                x.zeros.as_ref().map_or(stored(0), |z| z[src(r / block)] as u8)
            };
        }
    }
    Ok(Columns { codes, scales, zeros })
}

/// Rows of `len` 4-bit values packed two per byte, the even index in the low nibble, an odd length padded.
fn pack_rows(v: &[u8], len: usize) -> Vec<u8> {
    v.chunks_exact(len)
        .flat_map(|row| row.chunks(2).map(|p| (p[0] & 0xF) | (p.get(1).copied().unwrap_or(0) << 4)))
        .collect()
}

/// Interleaves two `[N, len]` row sets (gate, up) into `[2N, len]`: row `2j` from `a`, row `2j + 1` from `b`.
fn interleave<T: Copy>(a: &[T], b: &[T], len: usize) -> Vec<T> {
    a.chunks_exact(len).zip(b.chunks_exact(len)).flat_map(|(x, y)| x.iter().chain(y).copied()).collect()
}

/// One projection's three tensors (codes, scales, zero points), collected over the experts: codes are written as
/// each expert is quantized, scales and zero points (1/`block` of the codes) kept until the codes are done.
struct Projection {
    scales: Vec<f32>,
    zeros: Vec<u8>,
}

/// Where one layer's quantized experts landed.
pub(super) struct QuantizedSpans {
    pub fc1: [Option<ExternalSpan>; 3],
    pub fc2: [Option<ExternalSpan>; 3],
    pub bytes: u64,
}

/// Quantizes one layer's experts into `w`: fc1 (codes, scales, zero points), then fc2.
pub(super) fn write_layer(
    s: &Stacks,
    q: ExpertWeights,
    w: &mut ExternalDataWriter,
) -> Result<(QuantizedSpans, (usize, usize, usize))> {
    let (h, i) = (s.hidden, s.inter);
    let (block, hp, ip) = geometry(q, h, i)?;
    let packed = |codes: &[u8], len: usize| if q.bits() == 4 { pack_rows(codes, len) } else { codes.to_vec() };
    let mut spans = QuantizedSpans { fc1: [None; 3], fc2: [None; 3], bytes: 0 };
    for (fc, k) in [(1, hp), (2, ip)] {
        let mut proj = Projection { scales: Vec::new(), zeros: Vec::new() };
        w.begin()?;
        for e in 0..s.experts {
            let cols = if fc == 1 {
                let g = columns(&s.gate, e, [h, i, hp, ip], q, block)?;
                let u = columns(&s.up, e, [h, i, hp, ip], q, block)?;
                let nb = hp / block;
                Columns {
                    codes: interleave(&g.codes, &u.codes, hp),
                    scales: interleave(&g.scales, &u.scales, nb),
                    zeros: g.zeros.zip(u.zeros).map(|(a, b)| interleave(&a, &b, nb)),
                }
            } else {
                columns(&s.down, e, [i, h, ip, hp], q, block)?
            };
            w.write(&packed(&cols.codes, k))?;
            proj.scales.extend_from_slice(&cols.scales);
            if let Some(z) = cols.zeros {
                proj.zeros.extend(pack_rows(&z, k / block));
            }
        }
        let codes = w.end()?;
        w.begin()?;
        w.write(bytemuck::cast_slice(&proj.scales))?;
        let scales = w.end()?;
        let zeros = if proj.zeros.is_empty() {
            None
        } else {
            w.begin()?;
            w.write(&proj.zeros)?;
            Some(w.end()?)
        };
        spans.bytes += codes.length + scales.length + zeros.map_or(0, |z| z.length);
        let slot = if fc == 1 { &mut spans.fc1 } else { &mut spans.fc2 };
        *slot = [Some(codes), Some(scales), zeros];
    }
    Ok((spans, (block, hp, ip)))
}

/// The layer's initializers for `spans` (written to `location`).
pub(super) fn initializers(
    l: &Layer,
    q: ExpertWeights,
    spans: &QuantizedSpans,
    (block, hp, ip): (usize, usize, usize),
    location: &str,
) -> Vec<TensorProto> {
    let p = format!("{PREFIX}/layers.{}", l.index);
    let e = l.experts as i64;
    let per_byte = (8 / q.bits()) as i64;
    let (hp, ip, nb1, nb2) = (hp as i64, ip as i64, (hp / block) as i64, (ip / block) as i64);
    let mut out = Vec::new();
    for (fc, span, n, k, nb) in [(1, &spans.fc1, 2 * ip, hp, nb1), (2, &spans.fc2, hp, ip, nb2)] {
        let dims: [(ElemType, Vec<i64>); 3] = [
            (ElemType::U8, vec![e, n, k / per_byte]),
            (ElemType::F32, vec![e, n, nb]),
            (ElemType::U8, vec![e, n, (nb + per_byte - 1) / per_byte]),
        ];
        for (j, ((dtype, d), kind)) in dims.into_iter().zip(["weights", "scales", "zero_points"]).enumerate() {
            if let Some(s) = span[j] {
                out.push(external_tensor(&format!("{p}/fc{fc}_{kind}"), dtype, &d, location, s));
            }
        }
    }
    out
}

/// Layer `l`'s `QMoE` (between a `Pad` of the tokens and a `Slice` of the output when the hidden size is padded),
/// ending in `l.out`.
pub(super) fn layer_nodes(
    l: &Layer,
    top_k: usize,
    q: ExpertWeights,
    (block, hp, _): (usize, usize, usize),
    zero_points: bool,
    new_inits: &mut Vec<TensorProto>,
) -> Vec<NodeProto> {
    let p = format!("{PREFIX}/layers.{}", l.index);
    let n = |s: &str| format!("{p}/{s}");
    let padded = hp != l.hidden;
    let mut nodes = Vec::new();
    let x = if padded {
        new_inits.push(i64_tensor(&n("pads"), &[4], &[0, 0, 0, (hp - l.hidden) as i64]));
        nodes.push(node(&n("Pad"), "Pad", &[&l.x, &n("pads")], &[&n("x_padded")]));
        n("x_padded")
    } else {
        l.x.clone()
    };
    let zp = |fc: usize| if zero_points { n(&format!("fc{fc}_zero_points")) } else { String::new() };
    let (fc1w, fc1s, fc2w, fc2s, z1, z2) =
        (n("fc1_weights"), n("fc1_scales"), n("fc2_weights"), n("fc2_scales"), zp(1), zp(2));
    let inputs: [&str; 15] = [&x, &l.weights, &fc1w, &fc1s, "", &fc2w, &fc2s, "", "", "", "", &z1, &z2, "", &l.weights];
    let mixed = if padded { n("mixed") } else { l.out.clone() };
    nodes.push(NodeProto {
        domain: Some(MS_DOMAIN.into()),
        attribute: [
            swiglu_attributes(top_k, false),
            vec![
                attr_i("expert_weight_bits", q.bits() as i64),
                attr_i("block_size", block as i64),
                attr_i("accuracy_level", ACCURACY_LEVEL),
            ],
        ]
        .concat(),
        ..node(&n("QMoE"), "QMoE", &inputs, &[&mixed])
    });
    if padded {
        new_inits.push(i64_tensor(&n("slice_starts"), &[1], &[0]));
        new_inits.push(i64_tensor(&n("slice_ends"), &[1], &[l.hidden as i64]));
        new_inits.push(i64_tensor(&n("slice_axes"), &[1], &[-1]));
        let ins = [mixed.as_str(), &n("slice_starts"), &n("slice_ends"), &n("slice_axes")];
        nodes.push(node(&n("Slice"), "Slice", &ins, &[&l.out]));
    }
    nodes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_pads_to_the_block() {
        // arith-r1: hidden 56, intermediate 112.
        assert_eq!(geometry(ExpertWeights::Int4 { block: 32, asymmetric: true }, 56, 112).unwrap(), (32, 64, 128));
        assert_eq!(geometry(ExpertWeights::Int8, 56, 112).unwrap(), (16, 64, 112));
        // R1: hidden 7168, intermediate 2048: no padding, the longest blocks.
        assert_eq!(geometry(ExpertWeights::Int8, 7168, 2048).unwrap(), (256, 7168, 2048));
        assert_eq!(
            geometry(ExpertWeights::Int4 { block: 128, asymmetric: false }, 7168, 2048).unwrap(),
            (128, 7168, 2048)
        );
        assert!(geometry(ExpertWeights::Int4 { block: 24, asymmetric: true }, 48, 48).is_err());
    }

    #[test]
    fn packing_puts_the_even_index_in_the_low_nibble() {
        assert_eq!(pack_rows(&[1, 2, 3, 4, 5, 6], 3), [0x21, 0x03, 0x54, 0x06]);
        assert_eq!(interleave(&[1, 2, 3, 4], &[5, 6, 7, 8], 2), [1, 2, 5, 6, 3, 4, 7, 8]);
    }

    #[test]
    fn int8_codes_are_columns_centred_on_128_with_the_column_scale_per_block() {
        // [K = 32, N = 2]: column 0 ramps to 127, column 1 is -column 0 / 2.
        let w: Vec<f32> = (0..32).flat_map(|r| [r as f32 * 4.0, -(r as f32) * 2.0]).collect();
        let c = quantize(&w, 32, 2, ExpertWeights::Int8, 16).unwrap();
        assert_eq!(c.scales, [124.0 / 127.0, 124.0 / 127.0, 62.0 / 127.0, 62.0 / 127.0]);
        assert_eq!(c.codes[31], 255); // column 0, last row: +127
        assert_eq!(c.codes[32 + 31], 1); // column 1, last row: -127
        assert!(c.zeros.is_none());
    }

    #[test]
    fn padded_zero_rows_dequantize_to_zero() {
        let w: Vec<f32> = (0..24 * 3).map(|v| ((v * 37 % 11) as f32 - 5.0) / 7.0).collect();
        let wp = pad(&w, 24, 3, 32, 4);
        for q in
            [ExpertWeights::Int4 { block: 32, asymmetric: true }, ExpertWeights::Int4 { block: 32, asymmetric: false }]
        {
            let c = quantize(&wp, 32, 4, q, 32).unwrap();
            for col in 0..4 {
                let z = c.zeros.as_ref().map_or(8, |z| z[col]);
                for r in 0..32 {
                    if r >= 24 || col >= 3 {
                        assert_eq!(c.codes[col * 32 + r], z, "{q:?} col {col} row {r}");
                    }
                }
            }
        }
    }
}
