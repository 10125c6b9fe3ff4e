//! Layer pieces shared by every family: weights (streamed from the checkpoint), RMSNorm, rotary
//! embeddings (default, linear, llama3), the causal + padding mask, grouped-query attention with a
//! KV cache, the SwiGLU MLP and the LM head.
//!
//! Tensor layouts inside the graph: hidden states `[batch, seq, hidden]`; per-head tensors
//! `[batch, heads, seq, head_dim]`; KV cache `[batch, kv_heads, past + seq, head_dim]` (keys after
//! rotary). Weights of `Linear` layers are stored transposed (`[in, out]`) under their checkpoint key.

use r1_engine::manifest::{names, DType, Dim};

use crate::checkpoint::convert::{convert, convert_transposed, to_f32_vec, transposed_rows_f32};
use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::onnx::{ElemType, GraphBuilder};

/// Bytes of a checkpoint tensor read between releases of its pages ([`Ctx::tensor`]).
const RELEASE_BYTES: usize = 64 << 20;

/// Everything a family builder needs: the graph, the checkpoint and the export precision.
pub struct Ctx<'a> {
    /// The graph being built.
    pub b: GraphBuilder,
    /// Where weights come from.
    pub ck: &'a Checkpoint,
    /// Element type of weights, activations and KV cache (`F32` or `F16`).
    pub dtype: ElemType,
    /// Called after each weight with its checkpoint key and byte size (progress bar).
    pub progress: ProgressFn<'a>,
    /// Also output the last decoder layer's output before the final norm (`last_hidden_state`): set when a draft
    /// graph is exported, which takes it (families without a draft graph never are asked).
    pub last_hidden_state: bool,
}

/// Progress callback of a build: checkpoint key and byte size of each weight written.
pub type ProgressFn<'a> = Box<dyn FnMut(&str, u64) + 'a>;

/// Names of the three shared graph inputs.
pub struct DecoderInputs {
    /// `input_ids` `[batch, sequence]` int64.
    pub input_ids: String,
    /// `attention_mask` `[batch, total_sequence]` int64.
    pub attention_mask: String,
    /// `position_ids` `[batch, sequence]` int64.
    pub position_ids: String,
}

/// The additive attention mask (float32; 0 where attending is allowed, `f32::MIN` elsewhere).
pub struct AttentionMask {
    /// `[batch, 1, seq, total]`, for attention with one key/value head per query head.
    pub d4: String,
    /// `[batch, 1, 1, seq, total]`, for grouped attention (`[batch, kv_heads, group, seq, total]`).
    pub d5: String,
}

/// Rotary cos/sin tables `[batch, 1, seq, rotary_dim]` in the export dtype.
pub struct Rotary {
    /// cos table.
    pub cos: String,
    /// sin table.
    pub sin: String,
    /// Last-axis size.
    pub dim: usize,
}

fn sym(s: &str) -> Dim {
    Dim::Symbolic(s.into())
}

impl<'a> Ctx<'a> {
    /// Manifest dtype of the KV cache and activations.
    pub fn kv_dtype(&self) -> DType {
        match self.dtype {
            ElemType::F16 => DType::Float16,
            _ => DType::Float32,
        }
    }

    /// A `Linear` weight `[out, in]` from the checkpoint, written transposed as `[in, out]`.
    pub fn matrix_t(&mut self, key: &str, out_f: usize, in_f: usize) -> Result<String> {
        self.matrix_t_as(key, key, out_f, in_f)
    }

    /// Like [`Ctx::matrix_t`] but stores the initializer under `name` (e.g. a tied `lm_head.weight`). It is a
    /// MatMul's weight: a streamed quantized export quantizes it as it is read, in bands of output columns (rows
    /// of the checkpoint's `[out, in]`) when it is large ([`GraphBuilder::matmul_weight_columns`]).
    pub fn matrix_t_as(&mut self, name: &str, key: &str, out_f: usize, in_f: usize) -> Result<String> {
        let ck = self.ck;
        let t = ck.tensor(key, &[out_f, in_f])?;
        let src = t.float()?;
        let dtype = self.dtype;
        let row_bytes = in_f * src.size();
        let out = self.b.matmul_weight_columns(
            name,
            dtype,
            &[in_f as i64, out_f as i64],
            |sink| convert_transposed(t.data, src, dtype, out_f, in_f, sink),
            // Each band's pages are released once read: they would stay resident beside the quantized weight.
            |(c0, c1), values| {
                transposed_rows_f32(t.data, src, out_f, in_f, (c0, c1), values)?;
                ck.release_bytes(key, c0 * row_bytes, c1 * row_bytes);
                Ok(())
            },
        );
        ck.release(key);
        let out = out?;
        (self.progress)(key, t.data.len() as u64);
        Ok(out)
    }

    /// A weight stored as is (embeddings, norm weights, biases), converted to the export dtype.
    pub fn tensor(&mut self, key: &str, shape: &[usize]) -> Result<String> {
        let ck = self.ck;
        let t = ck.tensor(key, shape)?;
        let src = t.float()?;
        let dtype = self.dtype;
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        // Converted a part at a time, each part's pages released once read: the whole source of a large table (the
        // embedding's 1.85 GB of bf16 in DeepSeek-R1) would otherwise be resident by the end of it.
        let part = (RELEASE_BYTES / src.size()).max(1) * src.size();
        let out = self.b.weight(key, dtype, &dims, |sink| {
            for (i, data) in t.data.chunks(part).enumerate() {
                convert(data, src, dtype, sink)?;
                ck.release_bytes(key, i * part, i * part + data.len());
            }
            Ok(())
        });
        ck.release(key);
        let out = out?;
        (self.progress)(key, t.data.len() as u64);
        Ok(out)
    }

    /// A weight read into f32 (for tensors that are transformed before writing, e.g. small norms).
    pub fn tensor_f32(&mut self, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.ck.tensor(key, shape)?;
        Ok(to_f32_vec(t.data, t.float()?))
    }

    /// Declares `input_ids`, `attention_mask` and `position_ids`.
    pub fn declare_inputs(&mut self) -> DecoderInputs {
        let b = &mut self.b;
        DecoderInputs {
            input_ids: b.input(names::INPUT_IDS, DType::Int64, vec![sym("batch"), sym("sequence")]),
            attention_mask: b.input(names::ATTENTION_MASK, DType::Int64, vec![sym("batch"), sym("total_sequence")]),
            position_ids: b.input(names::POSITION_IDS, DType::Int64, vec![sym("batch"), sym("sequence")]),
        }
    }

    /// Declares `past_key_values.{layer}.key/.value` inputs and `present.{layer}.key/.value` outputs
    /// (`[batch, heads, past_sequence | total_sequence, dim]`), and wires the concatenation of the past
    /// with this step's `k` / `v` (`[batch, heads, seq, dim]`). Returns `(present_key, present_value)`.
    pub fn kv_cache(
        &mut self,
        layer: usize,
        k: &str,
        v: &str,
        (key_heads, key_dim): (usize, usize),
        (value_heads, value_dim): (usize, usize),
    ) -> Result<(String, String)> {
        let dt = self.kv_dtype();
        let shape =
            |h: usize, s: &str, d: usize| vec![sym("batch"), Dim::Fixed(h as i64), sym(s), Dim::Fixed(d as i64)];
        let (pk, pv) = (names::past_key(layer), names::past_value(layer));
        self.b.input(&pk, dt, shape(key_heads, "past_sequence", key_dim));
        self.b.input(&pv, dt, shape(value_heads, "past_sequence", value_dim));
        let (ok, ov) = (names::present_key(layer), names::present_value(layer));
        let p = format!("/model/layers.{layer}/self_attn");
        self.b.wire_to(
            &format!("{p}/key_cache/Concat"),
            "Concat",
            &[&pk, k],
            vec![crate::onnx::attr_i("axis", 2)],
            &[&ok],
        )?;
        self.b.wire_to(
            &format!("{p}/value_cache/Concat"),
            "Concat",
            &[&pv, v],
            vec![crate::onnx::attr_i("axis", 2)],
            &[&ov],
        )?;
        self.b.output(&ok, dt, shape(key_heads, "total_sequence", key_dim));
        self.b.output(&ov, dt, shape(value_heads, "total_sequence", value_dim));
        Ok((ok, ov))
    }

    /// `x @ W^T (+ bias)` for a checkpoint `Linear` at `hf_prefix` (`.weight`, optional `.bias`).
    /// Node names: `{node}/MatMul`, `{node}/Add`.
    pub fn linear(
        &mut self,
        node: &str,
        x: &str,
        hf_prefix: &str,
        in_f: usize,
        out_f: usize,
        bias: bool,
    ) -> Result<String> {
        let w = self.matrix_t(&format!("{hf_prefix}.weight"), out_f, in_f)?;
        let y = self.b.matmul(&format!("{node}/MatMul"), x, &w)?;
        if !bias {
            return Ok(y);
        }
        let bname = self.tensor(&format!("{hf_prefix}.bias"), &[out_f])?;
        self.b.add(&format!("{node}/Add"), &y, &bname)
    }

    /// RMSNorm over the last axis with weight `key` (`[dim]`): variance is computed in float32 even in
    /// fp16 graphs, as in transformers.
    pub fn rms_norm(&mut self, node: &str, x: &str, key: &str, dim: usize, eps: f64) -> Result<String> {
        let w = self.tensor(key, &[dim])?;
        let f16 = self.dtype == ElemType::F16;
        let b = &mut self.b;
        let xf = if f16 { b.cast(&format!("{node}/Cast"), x, ElemType::F32)? } else { x.to_string() };
        let sq = b.mul(&format!("{node}/Square"), &xf, &xf)?;
        let var = b.reduce_mean(&format!("{node}/ReduceMean"), &sq, &[-1], true)?;
        let eps_c = b.const_scalar(ElemType::F32, eps as f32)?;
        let ve = b.add(&format!("{node}/AddEps"), &var, &eps_c)?;
        let rs = b.unary(&format!("{node}/Sqrt"), "Sqrt", &ve)?;
        let normed = b.div(&format!("{node}/Div"), &xf, &rs)?;
        let normed = if f16 { b.cast(&format!("{node}/CastBack"), &normed, ElemType::F16)? } else { normed };
        b.mul(&format!("{node}/Mul"), &normed, &w)
    }

    /// The additive causal + padding mask from `attention_mask` (`[batch, total]`) and the current
    /// sequence length. Query `i` (absolute position `past + i`) may attend key `j` when
    /// `j <= past + i` and `attention_mask[b, j] == 1`; a query always attends to itself, so rows of
    /// padding tokens never become all-masked (no NaN reaches the cache).
    pub fn attention_mask(&mut self, inputs: &DecoderInputs) -> Result<AttentionMask> {
        let p = "/model/attn_mask";
        let b = &mut self.b;
        let s = b.dim_of(&format!("{p}/seq"), &inputs.input_ids, 1)?;
        let t = b.dim_of(&format!("{p}/total"), &inputs.attention_mask, 1)?;
        let past = b.sub(&format!("{p}/past"), &t, &s)?;
        let zero = b.const_i64(0)?;
        let one = b.const_i64(1)?;
        let kidx = b.range(&format!("{p}/key_positions"), &zero, &t, &one)?;
        let q0 = b.range(&format!("{p}/query_range"), &zero, &s, &one)?;
        let qidx = b.add(&format!("{p}/query_positions"), &q0, &past)?;
        let qcol = b.unsqueeze(&format!("{p}/query_column"), &qidx, &[1])?;
        let future = b.wire(&format!("{p}/future/Greater"), "Greater", &[&kidx, &qcol], vec![])?;
        let diag = b.wire(&format!("{p}/self/Equal"), "Equal", &[&kidx, &qcol], vec![])?;
        let not_diag = b.unary(&format!("{p}/not_self/Not"), "Not", &diag)?;
        let pad = b.wire(&format!("{p}/padding/Equal"), "Equal", &[&inputs.attention_mask, &zero], vec![])?;
        let pad4 = b.unsqueeze(&format!("{p}/padding/Unsqueeze"), &pad, &[1, 2])?;
        let pad_other = b.wire(&format!("{p}/padding_not_self/And"), "And", &[&pad4, &not_diag], vec![])?;
        let blocked = b.wire(&format!("{p}/blocked/Or"), "Or", &[&future, &pad_other], vec![])?;
        let neg = b.const_scalar(ElemType::F32, f32::MIN)?;
        let zf = b.const_scalar(ElemType::F32, 0.0)?;
        let d4 = b.where_(&format!("{p}/Where"), &blocked, &neg, &zf)?;
        let d5 = b.unsqueeze(&format!("{p}/grouped/Unsqueeze"), &d4, &[2])?;
        Ok(AttentionMask { d4, d5 })
    }

    /// cos/sin tables for `position_ids` from inverse frequencies (`[rotary_dim / 2]`), computed in
    /// float32 and cast to the export dtype; `scale` multiplies both (1 for default and llama3 rope).
    pub fn rotary(&mut self, inputs: &DecoderInputs, inv_freq: &[f32], scale: f32) -> Result<Rotary> {
        let p = "/model/rotary_emb";
        let dtype = self.dtype;
        let b = &mut self.b;
        let inv = b.const_f32s(inv_freq)?;
        let pos = b.cast(&format!("{p}/positions/Cast"), &inputs.position_ids, ElemType::F32)?;
        let pos = b.unsqueeze(&format!("{p}/positions/Unsqueeze"), &pos, &[2])?;
        let freqs = b.mul(&format!("{p}/freqs/Mul"), &pos, &inv)?;
        let emb = b.concat(&format!("{p}/emb/Concat"), &[&freqs, &freqs], -1)?;
        let mut tables = Vec::new();
        for op in ["Cos", "Sin"] {
            let mut t = b.unary(&format!("{p}/{op}"), op, &emb)?;
            if scale != 1.0 {
                let c = b.const_scalar(ElemType::F32, scale)?;
                t = b.mul(&format!("{p}/{op}/Scale"), &t, &c)?;
            }
            if dtype != ElemType::F32 {
                t = b.cast(&format!("{p}/{op}/Cast"), &t, dtype)?;
            }
            tables.push(b.unsqueeze(&format!("{p}/{op}/Unsqueeze"), &t, &[1])?);
        }
        let sin = tables.pop().unwrap_or_default();
        let cos = tables.pop().unwrap_or_default();
        Ok(Rotary { cos, sin, dim: inv_freq.len() * 2 })
    }

    /// `x * cos + rotate_half(x) * sin` for `x` `[batch, heads, seq, rotary.dim]` (HF's half-split
    /// layout: `rotate_half(x) = concat(-x[.., d/2:], x[.., :d/2])`).
    pub fn apply_rotary(&mut self, node: &str, x: &str, rot: &Rotary) -> Result<String> {
        let half = (rot.dim / 2) as i64;
        let b = &mut self.b;
        let parts = b.split(&format!("{node}/Split"), x, &[half, half], -1)?;
        let neg = b.unary(&format!("{node}/Neg"), "Neg", &parts[1])?;
        let rotated = b.concat(&format!("{node}/Concat"), &[&neg, &parts[0]], -1)?;
        let a = b.mul(&format!("{node}/MulCos"), x, &rot.cos)?;
        let c = b.mul(&format!("{node}/MulSin"), &rotated, &rot.sin)?;
        b.add(&format!("{node}/Add"), &a, &c)
    }

    /// Scaled dot-product attention with grouped KV heads, without materializing repeated keys:
    /// `q` `[batch, heads, seq, qk_dim]`, `k` `[batch, kv_heads, total, qk_dim]`, `v`
    /// `[batch, kv_heads, total, v_dim]` → `[batch, seq, heads * v_dim]`. Scores and softmax are
    /// float32 whatever the export dtype.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &mut self,
        node: &str,
        q: &str,
        k: &str,
        v: &str,
        mask: &AttentionMask,
        (heads, kv_heads): (usize, usize),
        (qk_dim, v_dim): (usize, usize),
        scale: f32,
    ) -> Result<String> {
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(ExportError::Graph(format!(
                "{node}: {heads} heads cannot be grouped over {kv_heads} kv heads"
            )));
        }
        let group = (heads / kv_heads) as i64;
        let dtype = self.dtype;
        let b = &mut self.b;
        let sc = b.const_scalar(dtype, scale)?;
        let qs = b.mul(&format!("{node}/scale/Mul"), q, &sc)?;
        let q5 = b.reshape(&format!("{node}/group_q/Reshape"), &qs, &[0, kv_heads as i64, group, -1, qk_dim as i64])?;
        let kt = b.transpose(&format!("{node}/key/Transpose"), k, &[0, 1, 3, 2])?;
        let k5 = b.unsqueeze(&format!("{node}/key/Unsqueeze"), &kt, &[2])?;
        let mut scores = b.matmul(&format!("{node}/scores/MatMul"), &q5, &k5)?;
        if dtype != ElemType::F32 {
            scores = b.cast(&format!("{node}/scores/Cast"), &scores, ElemType::F32)?;
        }
        let masked = b.add(&format!("{node}/mask/Add"), &scores, &mask.d5)?;
        let mut probs = b.softmax(&format!("{node}/Softmax"), &masked, -1)?;
        if dtype != ElemType::F32 {
            probs = b.cast(&format!("{node}/probs/Cast"), &probs, dtype)?;
        }
        let v5 = b.unsqueeze(&format!("{node}/value/Unsqueeze"), v, &[2])?;
        let ctx = b.matmul(&format!("{node}/context/MatMul"), &probs, &v5)?;
        let ctx = b.reshape(&format!("{node}/context/Reshape"), &ctx, &[0, heads as i64, -1, v_dim as i64])?;
        let ctx = b.transpose(&format!("{node}/context/Transpose"), &ctx, &[0, 2, 1, 3])?;
        b.reshape(&format!("{node}/merge_heads/Reshape"), &ctx, &[0, 0, (heads * v_dim) as i64])
    }

    /// `[batch, seq, heads * dim]` → `[batch, heads, seq, dim]`.
    pub fn split_heads(&mut self, node: &str, x: &str, heads: usize, dim: usize) -> Result<String> {
        let r = self.b.reshape(&format!("{node}/Reshape"), x, &[0, 0, heads as i64, dim as i64])?;
        self.b.transpose(&format!("{node}/Transpose"), &r, &[0, 2, 1, 3])
    }

    /// SwiGLU MLP: `down(silu(gate(x)) * up(x))` with checkpoint keys `{hf}.gate_proj/up_proj/down_proj`.
    pub fn swiglu_mlp(&mut self, node: &str, x: &str, hf: &str, hidden: usize, inter: usize) -> Result<String> {
        let g = self.linear(&format!("{node}/gate_proj"), x, &format!("{hf}.gate_proj"), hidden, inter, false)?;
        let u = self.linear(&format!("{node}/up_proj"), x, &format!("{hf}.up_proj"), hidden, inter, false)?;
        let sg = self.b.unary(&format!("{node}/act_fn/Sigmoid"), "Sigmoid", &g)?;
        let act = self.b.mul(&format!("{node}/act_fn/Mul"), &g, &sg)?;
        let prod = self.b.mul(&format!("{node}/Mul"), &act, &u)?;
        self.linear(&format!("{node}/down_proj"), &prod, &format!("{hf}.down_proj"), inter, hidden, false)
    }

    /// Token embedding lookup `Gather(embed, input_ids)`.
    pub fn embed(&mut self, key: &str, input_ids: &str, vocab: usize, hidden: usize) -> Result<String> {
        let w = self.tensor(key, &[vocab, hidden])?;
        self.b.gather("/model/embed_tokens/Gather", &w, input_ids, 0)
    }

    /// The LM head (from `key`, `[vocab, hidden]`, e.g. `lm_head.weight` or the tied embedding) and the
    /// `logits` output, always float32 `[batch, sequence, vocab]`.
    pub fn lm_head(&mut self, x: &str, key: &str, hidden: usize, vocab: usize) -> Result<String> {
        let w = self.matrix_t_as("lm_head.weight", key, vocab, hidden)?;
        let out = if self.dtype == ElemType::F32 {
            self.b.wire_to("/lm_head/MatMul", "MatMul", &[x, &w], vec![], &["logits"])?;
            "logits".to_string()
        } else {
            let y = self.b.matmul("/lm_head/MatMul", x, &w)?;
            self.b.wire_to(
                "/lm_head/Cast",
                "Cast",
                &[&y],
                vec![crate::onnx::attr_i("to", ElemType::F32.onnx_code() as i64)],
                &["logits"],
            )?;
            "logits".to_string()
        };
        self.b.output(&out, DType::Float32, vec![sym("batch"), sym("sequence"), Dim::Fixed(vocab as i64)]);
        Ok(out)
    }
}
