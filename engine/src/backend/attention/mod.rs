//! `r1.GroupQueryAttention`: r1's own CPU kernel for the serving graph's attention, registered with ONNX Runtime as
//! a custom operator (domain [`DOMAIN`]) on the sessions that load the CPU serving graph and on the exporter's
//! optimization of it ([`commit_with_ops`], one registration at a time).
//!
//! It takes the inputs, attributes and outputs of `com.microsoft.GroupQueryAttention` as the exporter's serving
//! rewrite emits them (`export/src/onnx/fused_attention.rs`: rotary from `position_ids` and the cos/sin tables,
//! non-interleaved; each row's length from `seqlens_k`; past and present bound to the same KV pool memory, or
//! separate) and computes the same function (`tests/tests/attention_op.rs` compares the two); [`kernel`] says why it is
//! faster. Like ONNX Runtime's, a row's new positions are the step's whole width after its past
//! (`past = seqlens_k + 1 − S`); only a first prompt may be shorter (right-padded).
//!
//! Work is spread over ONNX Runtime's intra-op thread pool: first one task per (row, key/value head) appends the
//! new keys and values, then one task per (row, key/value head, tile of [`kernel::QUERY_TILE`] query positions)
//! attends. A task's result never depends on how tasks were scheduled, so outputs do not depend on the thread
//! count or on which other rows share the step.
//!
//! The inner loops come in three forms ([`kernel::Isa`]), chosen once per process at run time: AVX-512 (F, BW, VL +
//! FMA + F16C, `avx512.rs`) where the CPU has it, else AVX2 (+ FMA + F16C, `avx2.rs`), else portable Rust. The
//! environment variable `R1_ATTENTION_ISA=avx512|avx2|portable` ([`kernel::ISA_VAR`]) forces one, to compare them
//! (a form the CPU lacks falls back to the best below it); all compute the same function within float32 rounding.
//!
//! Activations are float32; the caches (past and present) float32 or float16, one operator registration each
//! under the same name ([`CacheType`]): a float16 cache under float32 activations halves what a long context's
//! decode step streams (`r1-export --kv-cache-dtype`). Float16 serving graphs keep ONNX Runtime's kernel (a CPU
//! float16 graph is a test configuration, not a fast one).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod isa;
pub mod kernel;
pub mod latent;

use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput};
use ort::session::builder::SessionBuilder;
use ort::value::{PrimitiveTensorElementType, TensorElementType as T};
use std::marker::PhantomData;
use std::sync::Mutex;

use kernel::{Buffers, CacheElem, Dims, RowSpan, QUERY_TILE};

/// The operator domain of r1's kernels.
pub const DOMAIN: &str = "r1";
/// The operator's type name (the same as ONNX Runtime's, in [`DOMAIN`]).
pub const OP_TYPE: &str = "GroupQueryAttention";

/// The domain to register on a session (`SessionBuilder::with_operators`); prefer [`commit_with_ops`]. It holds
/// `GroupQueryAttention` twice, for float32 and for float16 caches (ONNX Runtime picks the kernel by the graph's
/// types), and DeepseekV3's [`latent`] attention (`r1.LatentAttention`, float32).
pub fn domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new(DOMAIN)?
        .add(GroupQueryAttention::<f32>(PhantomData))?
        .add(GroupQueryAttention::<half::f16>(PhantomData))?
        .add(latent::LatentAttention)
}

/// A cache element type the operator is registered for, with its ONNX type.
pub trait CacheType: CacheElem + PrimitiveTensorElementType {
    const ONNX: T;
}

impl CacheType for f32 {
    const ONNX: T = T::Float32;
}

impl CacheType for half::f16 {
    const ONNX: T = T::Float16;
}

/// Registers r1's operators on `builder` and commits it with `commit` (e.g. `|b| b.commit_from_file(path)`).
///
/// ONNX Runtime adds a custom domain to ONNX's process-wide domain table by check-then-insert, which fails
/// ("Trying to add a domain to DomainToVersion map, but the domain is already exist") when two sessions register
/// it at the same moment; so sessions that register it are committed one at a time, under one lock.
pub fn commit_with_ops<T>(
    builder: SessionBuilder,
    commit: impl FnOnce(SessionBuilder) -> ort::Result<T>,
) -> ort::Result<T> {
    static REGISTERING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = REGISTERING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let builder = builder.with_operators(domain()?).map_err(|e| ort::Error::new(e.to_string()))?;
    commit(builder)
}

/// The operator over caches of element `C`.
struct GroupQueryAttention<C>(PhantomData<C>);

/// The attributes, read once per node.
pub struct AttentionKernel<C> {
    heads: usize,
    kv_heads: usize,
    scale: Option<f32>,
    cache: PhantomData<C>,
}

fn err(message: String) -> ort::Error {
    ort::Error::new(format!("r1.{OP_TYPE}: {message}"))
}

impl<C: CacheType> Operator for GroupQueryAttention<C> {
    type Kernel<'attr> = AttentionKernel<C>;

    fn name(&self) -> &str {
        OP_TYPE
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(T::Float32), // query [B, S, H·d]
            OperatorInput::required(T::Float32), // key [B, S, Hkv·d]
            OperatorInput::required(T::Float32), // value [B, S, Hkv·d]
            OperatorInput::required(C::ONNX),    // past_key [B, Hkv, P, d]
            OperatorInput::required(C::ONNX),    // past_value
            OperatorInput::required(T::Int32),   // seqlens_k [B]: each row's total length − 1
            OperatorInput::required(T::Int32),   // total_sequence_length [1]
            OperatorInput::required(T::Float32), // cos_cache [positions, d/2]
            OperatorInput::required(T::Float32), // sin_cache
            OperatorInput::required(T::Int64),   // position_ids [B, S]
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [
            OperatorOutput::required(T::Float32), // output [B, S, H·d]
            OperatorOutput::required(C::ONNX),    // present_key [B, Hkv, max(P, total), d]
            OperatorOutput::required(C::ONNX),    // present_value
        ]
    }

    fn create_kernel<'attr>(&self, ctx: &KernelContext<'attr>) -> ort::Result<AttentionKernel<C>> {
        let int = |name: &str| ctx.get::<i64>(name);
        let heads = int("num_heads").filter(|&h| h > 0).ok_or_else(|| err("needs num_heads > 0".into()))?;
        let kv_heads = int("kv_num_heads").filter(|&h| h > 0).ok_or_else(|| err("needs kv_num_heads > 0".into()))?;
        if heads % kv_heads != 0 {
            return Err(err(format!("num_heads {heads} is not a multiple of kv_num_heads {kv_heads}")));
        }
        if int("do_rotary") != Some(1) || int("rotary_interleaved").unwrap_or(0) != 0 {
            return Err(err("computes non-interleaved rotary only (do_rotary = 1, rotary_interleaved = 0)".into()));
        }
        for unsupported in ["local_window_size", "softcap", "smooth_softmax"] {
            let set = match unsupported {
                "softcap" => ctx.get::<f32>(unsupported).is_some_and(|v| v != 0.0),
                "local_window_size" => int(unsupported).is_some_and(|v| v != -1),
                _ => int(unsupported).is_some_and(|v| v != 0),
            };
            if set {
                return Err(err(format!("does not implement the `{unsupported}` attribute")));
            }
        }
        let scale = ctx.get::<f32>("scale").filter(|&s| s != 0.0);
        Ok(AttentionKernel { heads: heads as usize, kv_heads: kv_heads as usize, scale, cache: PhantomData })
    }
}

/// Input `i`'s shape and data pointer, checked to have `rank` dimensions.
fn input<E: ort::value::PrimitiveTensorElementType>(
    ctx: &ComputeContext,
    i: usize,
    name: &str,
    rank: usize,
) -> ort::Result<(Vec<usize>, *const E, usize)> {
    let v = ctx.input(i)?.ok_or_else(|| err(format!("input `{name}` is missing")))?;
    let (shape, data) = v.try_extract_tensor::<E>()?;
    if shape.len() != rank && !(rank == 1 && shape.is_empty()) {
        return Err(err(format!("input `{name}` has shape {:?}, expected {rank} dimensions", &shape[..])));
    }
    Ok((shape.iter().map(|&x| x.max(0) as usize).collect(), data.as_ptr(), data.len()))
}

fn output<E: PrimitiveTensorElementType>(ctx: &ComputeContext, i: usize, shape: &[usize]) -> ort::Result<*mut E> {
    let dims: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
    let mut v = ctx.output(i, dims)?.ok_or_else(|| err(format!("output {i} is missing")))?;
    let (_, data) = v.try_extract_tensor_mut::<E>()?;
    Ok(data.as_mut_ptr())
}

fn expect(name: &str, got: &[usize], want: &[usize]) -> ort::Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(err(format!("input `{name}` has shape {got:?}, expected {want:?}")))
    }
}

impl<C: CacheType> Kernel for AttentionKernel<C> {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let (qs, q, _) = input::<f32>(ctx, 0, "query", 3)?;
        let (batch, seq) = (qs[0], qs[1]);
        if !qs[2].is_multiple_of(self.heads) || !(qs[2] / self.heads).is_multiple_of(2) {
            return Err(err(format!("query width {} is not num_heads {} × an even head size", qs[2], self.heads)));
        }
        let hd = qs[2] / self.heads;
        let (ks, k, _) = input::<f32>(ctx, 1, "key", 3)?;
        let (vs, v, _) = input::<f32>(ctx, 2, "value", 3)?;
        expect("key", &ks, &[batch, seq, self.kv_heads * hd])?;
        expect("value", &vs, &[batch, seq, self.kv_heads * hd])?;
        let (pks, past_key, _) = input::<C>(ctx, 3, "past_key", 4)?;
        let (pvs, past_value, _) = input::<C>(ctx, 4, "past_value", 4)?;
        let past_capacity = pks[2];
        expect("past_key", &pks, &[batch, self.kv_heads, past_capacity, hd])?;
        expect("past_value", &pvs, &pks)?;
        let (ss, seqlens, _) = input::<i32>(ctx, 5, "seqlens_k", 1)?;
        expect("seqlens_k", &ss, &[batch])?;
        let (_, total, total_len) = input::<i32>(ctx, 6, "total_sequence_length", 1)?;
        if total_len != 1 {
            return Err(err(format!("total_sequence_length holds {total_len} values, expected 1")));
        }
        let (cs, cos, _) = input::<f32>(ctx, 7, "cos_cache", 2)?;
        let (sn, sin, _) = input::<f32>(ctx, 8, "sin_cache", 2)?;
        expect("cos_cache", &cs, &[cs[0], hd / 2])?;
        expect("sin_cache", &sn, &cs)?;
        let (ps, position_ids, _) = input::<i64>(ctx, 9, "position_ids", 2)?;
        expect("position_ids", &ps, &[batch, seq])?;
        // SAFETY: one int32 value, checked above.
        let total = usize::try_from(unsafe { *total }).map_err(|_| err("total_sequence_length is negative".into()))?;
        let d = Dims {
            batch,
            seq,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: hd,
            past_capacity,
            present_capacity: past_capacity.max(total),
            rotary_positions: cs[0],
        };
        let mut spans = Vec::with_capacity(batch);
        let mut positions = Vec::with_capacity(batch * seq);
        for b in 0..batch {
            // SAFETY: `seqlens_k` has `batch` values.
            let len = i64::from(unsafe { *seqlens.add(b) }) + 1;
            if len < 1 || len as usize > d.present_capacity {
                return Err(err(format!(
                    "row {b}: seqlens_k + 1 = {len} is outside 1 ..= {} (the present cache's positions)",
                    d.present_capacity
                )));
            }
            let span = RowSpan::of(len as usize, seq);
            if span.past > past_capacity {
                return Err(err(format!(
                    "row {b}: {} past positions, the past cache holds {past_capacity}",
                    span.past
                )));
            }
            spans.push(span);
            for s in 0..seq {
                // SAFETY: `position_ids` has `batch × seq` values.
                let p = unsafe { *position_ids.add(b * seq + s) };
                if s < span.new && !(0..d.rotary_positions as i64).contains(&p) {
                    return Err(err(format!(
                        "row {b}: position {p} is outside the rotary tables' {} positions",
                        d.rotary_positions
                    )));
                }
                positions.push(p.clamp(0, d.rotary_positions as i64 - 1) as usize);
            }
        }
        let out = output::<f32>(ctx, 0, &[batch, seq, self.heads * hd])?;
        let present_shape = [batch, self.kv_heads, d.present_capacity, hd];
        let present_key = output::<C>(ctx, 1, &present_shape)?;
        let present_value = output::<C>(ctx, 2, &present_shape)?;
        let buf = Buffers { q, k, v, past_key, past_value, present_key, present_value, cos, sin, out };
        let scale = self.scale.unwrap_or(1.0 / (hd as f32).sqrt());
        let heads = batch * self.kv_heads;
        // SAFETY (both phases): every buffer was checked to have `d`'s sizes, each row's span fits its caches and
        // its positions the tables; task i writes only head i % Hkv of row i / Hkv of the presents (phase one),
        // or the output rows of its own (row, tile, group) (phase two), after phase one finished.
        ctx.par_for(heads, 0, |i| unsafe {
            let (b, g) = (i / d.kv_heads, i % d.kv_heads);
            kernel::append(&d, &buf, b, g, spans[b], &positions[b * seq..(b + 1) * seq]);
        })?;
        let tiles = seq.div_ceil(QUERY_TILE);
        ctx.par_for(heads * tiles, 0, |i| unsafe {
            let (b, g, t) = (i / (d.kv_heads * tiles), i / tiles % d.kv_heads, i % tiles);
            let tile = t * QUERY_TILE..((t + 1) * QUERY_TILE).min(seq);
            let positions = &positions[b * seq..(b + 1) * seq];
            kernel::attend(&d, &buf, &kernel::Task { b, g, span: spans[b], tile, positions, scale });
        })?;
        Ok(())
    }
}
