#!/usr/bin/env python3
"""Checks whether ONNX Runtime can append DeepseekV3's latent (MLA) cache in place on the CPU provider with standard
ONNX `TensorScatter` (opset 24), and what one decode step of one MLA layer's attention costs in three forms
(`docs/kv-cache-pool.md`, DeepseekV3 section, records the results).

One absorbed MLA layer at DeepSeek-R1's attention shape (128 heads, kv_lora_rank 512, qk_rope_head_dim 64), the
part of `export/src/arch/deepseek_v3/mla.rs` that touches the cache: inputs are the absorbed query
`q_nope · W_uk [B, H, S, rank]`, the rotated `q_rot [B, H, S, rope]`, the step's latent `c [B, 1, S, rank]` and rotated
`k_rot [B, 1, S, rope]`; output the softmax-weighted latent `[B, H, S, rank]` (W_uv and o_proj come after, unchanged).
1. in place: `TensorScatter` with ONE buffer `[B, 1, MAX, *]` bound (IOBinding) as its `past_cache` input and its
   output keeps the buffer's address and writes only the new position of each row (ragged rows), and its attention
   output equals the copying form's; and the scatter alone costs the same at capacity 4,096 and 32,768 when its
   output is its input (no copy), unlike a second output buffer (a copy of the whole capacity);
2. cost of one decode step (batch 1, one thread) at contexts 128 / 1,000 / 4,000, capacity MAX:
   (a) `Concat` (today's serving graph): past of the current length in, present one longer out (a copy);
   (b) `TensorScatter` in place + attention over the whole capacity with an additive mask;
   (c) `TensorScatter` in place + `Slice` of the valid positions (a copy of them) + attention over those.

Usage: python3 scripts/latent_inplace_check.py [--heads N] [--reps N] [--threads N] [--cost-only]   (needs onnxruntime 1.31.x, numpy, onnx;
prints JSON; exit status 1 when the in-place check fails)
"""
import argparse
import json
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

RANK, ROPE = 512, 64
F = TensorProto.FLOAT


def vi(name, shape, t=F):
    return helper.make_tensor_value_info(name, t, shape)


def attention_nodes(lat, rope, mask, heads_scale):
    """Scores over the latent and rope caches `lat [B,1,T,rank]`, `rope [B,1,T,rope]`, scaled, masked (`mask
    [B,1,S,T]`, additive), softmax, context over the latent: mla.rs's `attention_probs` + `context_latent`."""
    return [
        helper.make_node("Transpose", [lat], ["lat_t"], perm=[0, 1, 3, 2]),
        helper.make_node("Transpose", [rope], ["rope_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q_lat", "lat_t"], ["s_nope"]),
        helper.make_node("MatMul", ["q_rot", "rope_t"], ["s_rope"]),
        helper.make_node("Add", ["s_nope", "s_rope"], ["scores"]),
        helper.make_node("Mul", ["scores", heads_scale], ["scaled"]),
        helper.make_node("Add", ["scaled", mask], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", lat], ["out"]),
    ]


def model(form, heads):
    """The layer's attention in `form` ("concat", "scatter_full", "scatter_slice")."""
    scale = helper.make_tensor("scale", F, [], [0.1])
    common_in = [vi("q_lat", ["B", heads, "S", RANK]), vi("q_rot", ["B", heads, "S", ROPE]),
                 vi("c", ["B", 1, "S", RANK]), vi("k_rot", ["B", 1, "S", ROPE])]
    inits = [scale]
    if form == "concat":
        nodes = [helper.make_node("Concat", ["past_c", "c"], ["present_c"], axis=2),
                 helper.make_node("Concat", ["past_r", "k_rot"], ["present_r"], axis=2)]
        nodes += attention_nodes("present_c", "present_r", "mask", "scale")
        inputs = common_in + [vi("past_c", ["B", 1, "P", RANK]), vi("past_r", ["B", 1, "P", ROPE]),
                              vi("mask", ["B", 1, "S", "T"])]
        outputs = [vi("out", ["B", heads, "S", RANK]), vi("present_c", ["B", 1, "T", RANK]),
                   vi("present_r", ["B", 1, "T", ROPE])]
    else:
        nodes = [helper.make_node("TensorScatter", ["past_c", "c", "write_indices"], ["present_c"], axis=2),
                 helper.make_node("TensorScatter", ["past_r", "k_rot", "write_indices"], ["present_r"], axis=2)]
        inputs = common_in + [vi("past_c", ["B", 1, "MAX", RANK]), vi("past_r", ["B", 1, "MAX", ROPE]),
                              vi("write_indices", ["B"], TensorProto.INT64)]
        if form == "scatter_full":
            nodes += attention_nodes("present_c", "present_r", "mask", "scale")
            inputs.append(vi("mask", ["B", 1, "S", "MAX"]))
        else:
            # The valid positions 0 .. T (T = the mask's width): a Slice, which ONNX Runtime copies.
            inits += [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
                      helper.make_tensor("two", TensorProto.INT64, [1], [2]),
                      helper.make_tensor("three", TensorProto.INT64, [1], [3])]
            nodes += [helper.make_node("Shape", ["mask"], ["mask_shape"]),
                      helper.make_node("Slice", ["mask_shape", "three", "four_"], ["total"]),
                      helper.make_node("Slice", ["present_c", "zero", "total", "two"], ["valid_c"]),
                      helper.make_node("Slice", ["present_r", "zero", "total", "two"], ["valid_r"])]
            inits.append(helper.make_tensor("four_", TensorProto.INT64, [1], [4]))
            nodes += attention_nodes("valid_c", "valid_r", "mask", "scale")
            inputs.append(vi("mask", ["B", 1, "S", "T"]))
        outputs = [vi("out", ["B", heads, "S", RANK]), vi("present_c", ["B", 1, "MAX", RANK]),
                   vi("present_r", ["B", 1, "MAX", ROPE])]
    graph = helper.make_graph(nodes, form, inputs, outputs, initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    m.ir_version = 11
    return m.SerializeToString()


def scatter_only_model():
    """`TensorScatter` of the latent alone: `present = scatter(past [B,1,MAX,rank], c [B,1,S,rank], write_indices)`."""
    nodes = [helper.make_node("TensorScatter", ["past_c", "c", "write_indices"], ["present_c"], axis=2)]
    graph = helper.make_graph(nodes, "scatter", [vi("past_c", ["B", 1, "MAX", RANK]), vi("c", ["B", 1, "S", RANK]),
                                                 vi("write_indices", ["B"], TensorProto.INT64)],
                              [vi("present_c", ["B", 1, "MAX", RANK])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    m.ir_version = 11
    return m.SerializeToString()


def scatter_cost(max_len, reps):
    """One decode step's `TensorScatter` alone at capacity `max_len`: output bound to the input buffer (in place:
    independent of the capacity) or to a second buffer (a copy of the whole capacity)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(scatter_only_model(), so, providers=["CPUExecutionProvider"])
    buf = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, max_len, RANK), np.float32))
    other = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, max_len, RANK), np.float32))
    c = np.ones((1, 1, 1, RANK), np.float32)

    def step(out):
        io = sess.io_binding()
        io.bind_ortvalue_input("past_c", buf)
        io.bind_cpu_input("c", c)
        io.bind_cpu_input("write_indices", np.array([7], np.int64))
        io.bind_ortvalue_output("present_c", out)
        sess.run_with_iobinding(io)

    return {"capacity": max_len, "same_buffer_ms": timed(lambda: step(buf), reps),
            "other_buffer_ms": timed(lambda: step(other), reps)}


THREADS = 1  # intra-op threads of the timed sessions (--threads)


def session(form, heads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    return ort.InferenceSession(model(form, heads), so, providers=["CPUExecutionProvider"])


def step_inputs(rng, b, heads):
    n = rng.standard_normal
    return {"q_lat": n((b, heads, 1, RANK), dtype=np.float32), "q_rot": n((b, heads, 1, ROPE), dtype=np.float32),
            "c": n((b, 1, 1, RANK), dtype=np.float32), "k_rot": n((b, 1, 1, ROPE), dtype=np.float32)}


def additive_mask(lengths, width):
    """`[B, 1, 1, width]`: 0 over each row's valid positions (its past and the new one), -inf after them."""
    m = np.full((len(lengths), 1, 1, width), -np.inf, np.float32)
    for r, n in enumerate(lengths):
        m[r, :, :, : n + 1] = 0
    return m


class Shared:
    """One `[B, 1, MAX, *]` buffer per cache, bound as `TensorScatter`'s past input and its present output."""

    def __init__(self, sess, b, max_len):
        self.sess = sess
        self.c = ort.OrtValue.ortvalue_from_numpy(np.zeros((b, 1, max_len, RANK), np.float32))
        self.r = ort.OrtValue.ortvalue_from_numpy(np.zeros((b, 1, max_len, ROPE), np.float32))
        self.max_len = max_len

    def step(self, x, lengths, full):
        io = self.sess.io_binding()
        for k, v in x.items():
            io.bind_cpu_input(k, v)
        io.bind_ortvalue_input("past_c", self.c)
        io.bind_ortvalue_input("past_r", self.r)
        io.bind_cpu_input("write_indices", np.array(lengths, np.int64))
        io.bind_cpu_input("mask", additive_mask(lengths, self.max_len if full else max(lengths) + 1))
        io.bind_output("out", "cpu")
        io.bind_ortvalue_output("present_c", self.c)
        io.bind_ortvalue_output("present_r", self.r)
        self.sess.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()  # the attention output only: the caches stay where they are


def concat_step(sess, x, past_c, past_r, lengths):
    feeds = dict(x, past_c=past_c, past_r=past_r, mask=additive_mask(lengths, past_c.shape[2] + 1))
    return sess.run(None, feeds)


def check_in_place(heads):
    """Ragged rows (3 and 7 cached positions), 4 decode steps: each row's output is compared with the Concat form
    run on that row alone over its own valid positions (what the portable graph computes for it)."""
    rng = np.random.default_rng(0)
    lengths, max_len = [3, 7], 32
    b = len(lengths)
    concat = session("concat", heads)
    hist = [(rng.standard_normal((1, 1, n, RANK), dtype=np.float32),
             rng.standard_normal((1, 1, n, ROPE), dtype=np.float32)) for n in lengths]
    result = {}
    for form in ["scatter_full", "scatter_slice"]:
        shared = Shared(session(form, heads), b, max_len)
        for r, (hc, hr) in enumerate(hist):  # numpy() views the OrtValue's own memory
            shared.c.numpy()[r, :, : lengths[r]] = hc[0]
            shared.r.numpy()[r, :, : lengths[r]] = hr[0]
        addr = (shared.c.data_ptr(), shared.r.data_ptr())
        pasts, lens = [(hc.copy(), hr.copy()) for hc, hr in hist], list(lengths)
        max_err, only_new = 0.0, True
        for _ in range(4):
            x = step_inputs(rng, b, heads)
            before_c, before_r = shared.c.numpy().copy(), shared.r.numpy().copy()
            out = shared.step(x, lens, form == "scatter_full")
            for r in range(b):
                xr = {k: v[r: r + 1] for k, v in x.items()}
                ref, pc, pr = concat_step(concat, xr, pasts[r][0], pasts[r][1], [lens[r]])
                pasts[r] = (pc, pr)
                max_err = max(max_err, float(np.abs(out[r: r + 1] - ref).max()))
            for buf, before in [(shared.c.numpy(), before_c), (shared.r.numpy(), before_r)]:
                for r, n in enumerate(lens):
                    changed = np.nonzero(np.any(buf[r] != before[r], axis=(0, 2)))[0].tolist()
                    only_new &= changed == [n]
            lens = [n + 1 for n in lens]
        result[form] = {"max_abs_diff_vs_concat": max_err,
                        "buffer_address_kept": (shared.c.data_ptr(), shared.r.data_ptr()) == addr,
                        "only_new_position_written": bool(only_new)}
    return result


def timed(f, reps):
    f()
    best, total = float("inf"), 0.0
    for _ in range(reps):
        t = time.perf_counter()
        f()
        dt = time.perf_counter() - t
        best, total = min(best, dt), total + dt
    return round(total / reps * 1e3, 3), round(best * 1e3, 3)


def cost(heads, context, max_len, reps):
    rng = np.random.default_rng(1)
    x = step_inputs(rng, 1, heads)
    concat = session("concat", heads)
    past_c = rng.standard_normal((1, 1, context, RANK), dtype=np.float32)
    past_r = rng.standard_normal((1, 1, context, ROPE), dtype=np.float32)
    row = {"context": context, "capacity": max_len}
    row["a_concat_ms"] = timed(lambda: concat_step(concat, x, past_c, past_r, [context]), reps)
    for form, key in [("scatter_full", "b_scatter_whole_capacity_ms"), ("scatter_slice", "c_scatter_slice_ms")]:
        shared = Shared(session(form, heads), 1, max_len)
        shared.c.numpy()[:, :, :context] = past_c
        shared.r.numpy()[:, :, :context] = past_r
        row[key] = timed(lambda: shared.step(x, [context], form == "scatter_full"), reps)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=128, help="query heads (DeepSeek-R1: 128)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--capacity", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of the timed decode steps")
    ap.add_argument("--cost-only", action="store_true", help="only the decode-step costs (skip the in-place checks)")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    if args.cost_only:
        print(json.dumps({"onnxruntime": ort.__version__, "threads": THREADS,
                          "note": "cost: [mean ms, best ms] of one decode step, batch 1",
                          "cost": [cost(args.heads, c, args.capacity, args.reps) for c in (128, 1000, 4000)]}))
        return 0
    result = {"onnxruntime": ort.__version__,
              "shape": {"heads": args.heads, "kv_lora_rank": RANK, "qk_rope_head_dim": ROPE},
              "in_place": check_in_place(args.heads),
              "scatter_alone": [scatter_cost(m, args.reps) for m in (4096, 32768)],
              "note": f"cost: [mean ms, best ms] of one decode step, batch 1, {THREADS} intra-op thread(s)",
              "cost": [cost(args.heads, c, args.capacity, args.reps) for c in (128, 1000, 4000)]}
    print(json.dumps(result, indent=1))
    ok = all(v["max_abs_diff_vs_concat"] < 1e-4 and v["buffer_address_kept"] and v["only_new_position_written"]
             for v in result["in_place"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
