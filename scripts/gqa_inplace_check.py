#!/usr/bin/env python3
"""Checks what ONNX Runtime's GroupQueryAttention needs to append a KV cache in place on the CPU provider, and what
it saves (groundwork of the cache-pool issue; `docs/kv-cache-pool.md` records the results).

One GQA layer at the R1-Distill-Qwen-1.5B attention shape (12 query heads, 2 KV heads, head size 128):
1. exact: decoding with past and present bound (IOBinding) to ONE preallocated [B, kv_heads, MAX, head] buffer gives
   the same outputs as the copying form (past of the current length in, present one longer out), for ragged rows;
2. in place: the shared buffer keeps its address and only the new position of each row changes;
3. cost: time of one decode step at context 128 and 4,000, shared buffer vs copying form.

Usage: python3 scripts/gqa_inplace_check.py   (needs onnxruntime 1.31.x, numpy, onnx; prints JSON)
"""
import json
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

NQ, NKV, H = 12, 2, 128


def gqa_model():
    f = TensorProto.FLOAT
    node = helper.make_node(
        "GroupQueryAttention",
        ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length"],
        ["output", "present_key", "present_value"],
        domain="com.microsoft", num_heads=NQ, kv_num_heads=NKV)
    graph = helper.make_graph(
        [node], "gqa",
        [helper.make_tensor_value_info("query", f, ["B", "S", NQ * H]),
         helper.make_tensor_value_info("key", f, ["B", "S", NKV * H]),
         helper.make_tensor_value_info("value", f, ["B", "S", NKV * H]),
         helper.make_tensor_value_info("past_key", f, ["B", NKV, "P", H]),
         helper.make_tensor_value_info("past_value", f, ["B", NKV, "P", H]),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
         helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("output", f, ["B", "S", NQ * H]),
         helper.make_tensor_value_info("present_key", f, ["B", NKV, "T", H]),
         helper.make_tensor_value_info("present_value", f, ["B", NKV, "T", H])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m.SerializeToString()


def session():
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(gqa_model(), so, providers=["CPUExecutionProvider"])


def step_inputs(rng, b):
    return (rng.standard_normal((b, 1, NQ * H), dtype=np.float32),
            rng.standard_normal((b, 1, NKV * H), dtype=np.float32),
            rng.standard_normal((b, 1, NKV * H), dtype=np.float32))


def copying_step(sess, q, k, v, past_k, past_v, lengths):
    """The copying form: past of the batch's current length in, present one position longer out (right padding)."""
    b = q.shape[0]
    seqlens = np.array([n for n in lengths], dtype=np.int32)  # new total length - 1 = old length
    total = np.array(past_k.shape[2] + 1, dtype=np.int32)
    out, pk, pv = sess.run(None, {"query": q, "key": k, "value": v, "past_key": past_k, "past_value": past_v,
                                  "seqlens_k": seqlens, "total_sequence_length": total})
    return out, pk, pv


class SharedCache:
    """One [B, kv_heads, MAX, head] buffer per K and V, bound as both past and present."""

    def __init__(self, sess, b, max_len):
        self.sess, self.b, self.max_len = sess, b, max_len
        self.k = ort.OrtValue.ortvalue_from_numpy(np.zeros((b, NKV, max_len, H), np.float32))
        self.v = ort.OrtValue.ortvalue_from_numpy(np.zeros((b, NKV, max_len, H), np.float32))

    def step(self, q, k, v, lengths):
        io = self.sess.io_binding()
        io.bind_cpu_input("query", q)
        io.bind_cpu_input("key", k)
        io.bind_cpu_input("value", v)
        io.bind_ortvalue_input("past_key", self.k)
        io.bind_ortvalue_input("past_value", self.v)
        io.bind_cpu_input("seqlens_k", np.array(lengths, dtype=np.int32))
        io.bind_cpu_input("total_sequence_length", np.array(max(lengths) + 1, dtype=np.int32))
        io.bind_output("output", "cpu")
        io.bind_ortvalue_output("present_key", self.k)
        io.bind_ortvalue_output("present_value", self.v)
        self.sess.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()  # the attention output only: the cache stays where it is


def check_exact_and_in_place():
    sess, rng = session(), np.random.default_rng(0)
    lengths = [3, 7]  # ragged rows: row 0 has 3 cached positions, row 1 has 7
    b, max_len = len(lengths), 32
    shared = SharedCache(sess, b, max_len)
    # Fill both forms with the same history.
    hist_k = rng.standard_normal((b, NKV, max(lengths), H), dtype=np.float32)
    hist_v = rng.standard_normal((b, NKV, max(lengths), H), dtype=np.float32)
    for r, n in enumerate(lengths):
        hist_k[r, :, n:] = 0
        hist_v[r, :, n:] = 0
    shared.k.numpy()[:, :, : max(lengths)] = hist_k  # numpy() views the OrtValue's own memory
    shared.v.numpy()[:, :, : max(lengths)] = hist_v
    addr = (shared.k.data_ptr(), shared.v.data_ptr())
    past_k, past_v = hist_k.copy(), hist_v.copy()
    max_err, rows_changed_ok = 0.0, True
    for _ in range(4):
        q, k, v = step_inputs(rng, b)
        before = shared.k.numpy().copy()
        out_shared = shared.step(q, k, v, lengths)
        out_copy, past_k, past_v = copying_step(sess, q, k, v, past_k, past_v, lengths)
        max_err = max(max_err, float(np.abs(out_shared - out_copy).max()))
        after = shared.k.numpy()
        for r, n in enumerate(lengths):
            changed = np.nonzero(np.any(after[r] != before[r], axis=(0, 2)))[0].tolist()
            rows_changed_ok &= changed == [n]
        # The copying form's present is as long as the longest row; rows are right-padded.
        lengths = [n + 1 for n in lengths]
    same_address = (shared.k.data_ptr(), shared.v.data_ptr()) == addr
    return {"max_abs_diff_vs_copying": max_err, "buffer_address_kept": same_address,
            "only_new_position_written": bool(rows_changed_ok)}


def timed(f, reps):
    f()
    t = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t) / reps * 1e3


def cost(context, max_len=4096, reps=20):
    sess, rng = session(), np.random.default_rng(1)
    q, k, v = step_inputs(rng, 1)
    shared = SharedCache(sess, 1, max_len)
    ms_shared = timed(lambda: shared.step(q, k, v, [context]), reps)
    past = rng.standard_normal((1, NKV, context, H), dtype=np.float32)
    ms_copy = timed(lambda: copying_step(sess, q, k, v, past, past, [context]), reps)
    return {"context": context, "ms_shared_buffer": round(ms_shared, 3), "ms_copying": round(ms_copy, 3)}


def main():
    result = {"onnxruntime": ort.__version__, "shape": {"num_heads": NQ, "kv_num_heads": NKV, "head_size": H},
              "exactness": check_exact_and_in_place(), "cost_one_layer_one_thread": [cost(128), cost(4000)]}
    print(json.dumps(result, indent=1))
    e = result["exactness"]
    ok = e["max_abs_diff_vs_copying"] < 1e-5 and e["buffer_address_kept"] and e["only_new_position_written"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
