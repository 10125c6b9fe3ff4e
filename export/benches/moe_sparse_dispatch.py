#!/usr/bin/env python3
"""Measures ONNX Runtime's sparse `com.microsoft.MoE` against the two standard-ONNX forms of `moe_dispatch.py`
(dense masked, per-token gather) on a DeepseekV3 MoE block, to choose the `--target cpu` serving graph's form
(export/src/onnx/sparse_moe/). Run by developers, beside moe_dispatch.py:

  python3 export/benches/moe_sparse_dispatch.py [dense,gather,moe] [1,8,64,256]   (needs onnx, onnxruntime, numpy)

The `moe` graph keeps the same standard-ops router (sigmoid scores + correction bias, group-limited top-k,
normalization, scaling, giving w [N,E] zero outside each token's top-k) and feeds the operator
router_probs = ln(max(w, 1e-30)); its output times sum(w) is the weighted sum over the selected experts. All forms
are checked against the first before timing.
"""
import sys
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper
import onnxruntime as ort

import moe_dispatch as md

CONFIGS = {
    # name: hidden, moe_intermediate, experts, top_k, groups, topk_groups
    "H1024 I512, 64 experts, top-6": (1024, 512, 64, 6, 8, 3),
    "H1024 I512, 64 experts, top-8": (1024, 512, 64, 8, 8, 4),
}


def build_moe(h, i, e, k, g, kg, rng):
    nodes, inits = [], []
    add = lambda name, arr: inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
    # Same draws, in the same order, as moe_dispatch.build, so the weights match the other forms.
    add("Wr_t", rng.standard_normal((h, e)) * 2 / np.sqrt(h))
    add("bias", rng.standard_normal(e) * 0.3)
    wg = rng.standard_normal((e, h, i)) / np.sqrt(h)
    wu = rng.standard_normal((e, h, i)) / np.sqrt(h)
    wd = rng.standard_normal((e, i, h)) / np.sqrt(i)
    md.router(nodes, inits, e, k, g, kg)
    fc1 = np.empty((e, 2 * i, h), np.float32)  # gate and up rows interleaved (swiglu_fusion = 1)
    fc1[:, 0::2, :] = wg.transpose(0, 2, 1)
    fc1[:, 1::2, :] = wu.transpose(0, 2, 1)
    add("fc1", fc1)
    add("fc2", wd.transpose(0, 2, 1))
    add("floor", np.array(1e-30))
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "lastax"))
    n = nodes.append
    n(helper.make_node("Max", ["w", "floor"], ["wpos"]))
    n(helper.make_node("Log", ["wpos"], ["logw"]))
    n(helper.make_node("ReduceSum", ["w", "lastax"], ["wtot"], keepdims=1))
    n(helper.make_node("MoE", ["x", "logw", "fc1", "", "fc2"], ["ym"], domain="com.microsoft", k=k,
                       activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                       normalize_routing_weights=1))
    n(helper.make_node("Mul", ["ym", "wtot"], ["y"]))
    graph = helper.make_graph(nodes, "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", h])], inits)
    return helper.make_model(graph, ir_version=8,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def main():
    kinds = sys.argv[1].split(",") if len(sys.argv) > 1 else ["dense", "gather", "moe"]
    tokens = [int(t) for t in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1, 8, 64, 256]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    print("| config | tokens | " + " | ".join(f"{k} (ms)" for k in kinds) + " | max rel. diff |")
    print("|---|---|" + "---|" * (len(kinds) + 1))
    for name, (h, i, e, k, g, kg) in CONFIGS.items():
        sess = {}
        for kind in kinds:
            rng = np.random.default_rng(0)
            m = build_moe(h, i, e, k, g, kg, rng) if kind == "moe" else md.build(kind, h, i, e, k, g, kg, rng)
            sess[kind] = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for n in tokens:
            x = np.random.default_rng(n).standard_normal((n, h)).astype(np.float32)
            ys = [s.run(None, {"x": x})[0] for s in sess.values()]
            diff = max(float(np.abs(y - ys[0]).max() / np.abs(ys[0]).max()) for y in ys)
            assert diff < 1e-4, f"{name}, {n} tokens: the forms disagree by {diff}"
            reps = max(3, 100 // n)
            times = [md.bench(s, x, reps) for s in sess.values()]
            print(f"| {name} | {n} | " + " | ".join(f"{t:.2f}" for t in times) + f" | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
