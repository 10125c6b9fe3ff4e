#!/usr/bin/env python3
"""Measures the two standard-ONNX ways to run a DeepseekV3 MoE block on CPU (ONNX Runtime), to choose one for
r1-export's graph. Run by developers: python3 export/benches/moe_dispatch.py  (needs onnx, onnxruntime, numpy).

  dense   every expert runs on every token ([E,N,H] batched MatMuls); outputs are weighted by a routing-weight
          matrix that is zero outside each token's top-k, then summed over experts
  gather  the top-k expert weight matrices of each token are gathered ([N,k,H,I]) and multiplied per token

Both graphs contain the same router (sigmoid scores + correction bias, group-limited top-k, normalization, scaling)
and are checked to give the same output before timing.
"""
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

CONFIGS = {
    # name: hidden, moe_intermediate, experts, top_k, groups, topk_groups
    "tiny (golden qlora_yarn_bf16)": (64, 32, 8, 3, 4, 2),
    "mid (H1024, I512, 64 experts, top-6)": (1024, 512, 64, 6, 8, 3),
}
TOKENS = (1, 8, 64)  # decode step of batch 1, decode batch 8, a 64-token prefill


def router(nodes, inits, e, k, g, kg):
    """x [N,H] -> weights [N,E] (zero outside top-k) and top-k indices [N,k]."""
    c = lambda name, arr: inits.append(numpy_helper.from_array(np.asarray(arr), name))
    c("k2", np.array([2], np.int64)); c("kg", np.array([kg], np.int64)); c("kk", np.array([k], np.int64))
    c("grp_shape", np.array([0, g, e // g], np.int64)); c("flat_shape", np.array([0, e], np.int64))
    c("ninf", np.array(-np.inf, np.float32)); c("zero", np.array(0.0, np.float32)); c("eps", np.array(1e-20, np.float32))
    c("scale", np.array(2.5, np.float32)); c("last", np.array([-1], np.int64))
    c("kg1", np.array([kg - 1], np.int64)); c("kgs", np.array([kg], np.int64)); c("k1", np.array([k - 1], np.int64))
    c("ks", np.array([k], np.int64)); c("ax1", np.array([1], np.int64)); c("ax2", np.array([2], np.int64))
    n = nodes.append
    n(helper.make_node("MatMul", ["x", "Wr_t"], ["rl"]))
    n(helper.make_node("Sigmoid", ["rl"], ["sc"]))
    n(helper.make_node("Add", ["sc", "bias"], ["sfc"]))
    n(helper.make_node("Reshape", ["sfc", "grp_shape"], ["sfc_g"]))
    n(helper.make_node("TopK", ["sfc_g", "k2"], ["top2", "_i2"], axis=-1))
    n(helper.make_node("ReduceSum", ["top2", "last"], ["gs"], keepdims=0))
    n(helper.make_node("TopK", ["gs", "kg"], ["gtop", "_gi"], axis=-1))
    n(helper.make_node("Slice", ["gtop", "kg1", "kgs", "ax1"], ["gth"]))
    n(helper.make_node("GreaterOrEqual", ["gs", "gth"], ["gsel"]))
    n(helper.make_node("Unsqueeze", ["gsel", "last"], ["gsel3"]))
    n(helper.make_node("Expand", ["gsel3", "grp_shape_full"], ["gsel_e"]))
    n(helper.make_node("Reshape", ["gsel_e", "flat_shape"], ["emask"]))
    n(helper.make_node("Where", ["emask", "sfc", "ninf"], ["masked"]))
    n(helper.make_node("TopK", ["masked", "kk"], ["etop", "eidx"], axis=-1))
    n(helper.make_node("Slice", ["etop", "k1", "ks", "ax1"], ["eth"]))
    n(helper.make_node("GreaterOrEqual", ["masked", "eth"], ["esel"]))
    n(helper.make_node("Where", ["esel", "sc", "zero"], ["w0"]))
    n(helper.make_node("ReduceSum", ["w0", "last"], ["wsum"], keepdims=1))
    n(helper.make_node("Add", ["wsum", "eps"], ["wden"]))
    n(helper.make_node("Div", ["w0", "wden"], ["w1"]))
    n(helper.make_node("Mul", ["w1", "scale"], ["w"]))  # [N,E]
    inits.append(numpy_helper.from_array(np.array([1, g, e // g], np.int64), "grp_shape_full"))


def build(kind, h, i, e, k, g, kg, rng):
    nodes, inits = [], []
    add = lambda name, arr: inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
    add("Wr_t", rng.standard_normal((h, e)) * 2 / np.sqrt(h))
    add("bias", rng.standard_normal(e) * 0.3)
    wg = rng.standard_normal((e, h, i)) / np.sqrt(h)
    wu = rng.standard_normal((e, h, i)) / np.sqrt(h)
    wd = rng.standard_normal((e, i, h)) / np.sqrt(i)
    router(nodes, inits, e, k, g, kg)
    n = nodes.append
    if kind == "dense":
        add("Wg", wg); add("Wu", wu); add("Wd", wd)
        n(helper.make_node("MatMul", ["x", "Wg"], ["g"]))  # [N,H] x [E,H,I] -> [E,N,I]
        n(helper.make_node("MatMul", ["x", "Wu"], ["u"]))
        n(helper.make_node("Sigmoid", ["g"], ["gs_"])); n(helper.make_node("Mul", ["g", "gs_"], ["silu"]))
        n(helper.make_node("Mul", ["silu", "u"], ["a"]))
        n(helper.make_node("MatMul", ["a", "Wd"], ["d"]))  # [E,N,H]
        n(helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]))  # [E,N]
        n(helper.make_node("Unsqueeze", ["wt", "last"], ["wt3"]))
        n(helper.make_node("Mul", ["d", "wt3"], ["dw"]))
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "ax0"))
        n(helper.make_node("ReduceSum", ["dw", "ax0"], ["y"], keepdims=0))
    else:
        add("Wg", wg); add("Wu", wu); add("Wd", wd)
        n(helper.make_node("GatherElements", ["w", "eidx"], ["tw"], axis=1))  # [N,k]
        n(helper.make_node("Gather", ["Wg", "eidx"], ["gw"], axis=0))  # [N,k,H,I]
        n(helper.make_node("Gather", ["Wu", "eidx"], ["uw"], axis=0))
        n(helper.make_node("Gather", ["Wd", "eidx"], ["dw_"], axis=0))  # [N,k,I,H]
        inits.append(numpy_helper.from_array(np.array([1, 2], np.int64), "ax12"))
        n(helper.make_node("Unsqueeze", ["x", "ax12"], ["x4"]))  # [N,1,1,H]
        n(helper.make_node("MatMul", ["x4", "gw"], ["g"]))  # [N,k,1,I]
        n(helper.make_node("MatMul", ["x4", "uw"], ["u"]))
        n(helper.make_node("Sigmoid", ["g"], ["gs_"])); n(helper.make_node("Mul", ["g", "gs_"], ["silu"]))
        n(helper.make_node("Mul", ["silu", "u"], ["a"]))
        n(helper.make_node("MatMul", ["a", "dw_"], ["d"]))  # [N,k,1,H]
        inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "ax23"))
        n(helper.make_node("Unsqueeze", ["tw", "ax23"], ["tw4"]))
        n(helper.make_node("Mul", ["d", "tw4"], ["dw"]))
        inits.append(numpy_helper.from_array(np.array([1, 2], np.int64), "ax12b"))
        n(helper.make_node("ReduceSum", ["dw", "ax12b"], ["y"], keepdims=0))
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", h])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def bench(sess, x, reps):
    sess.run(None, {"x": x})
    t = time.perf_counter()
    for _ in range(reps):
        sess.run(None, {"x": x})
    return (time.perf_counter() - t) / reps * 1e3


def main():
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    print("| config | tokens | dense masked (ms) | gather (ms) |")
    print("|---|---|---|---|")
    for name, (h, i, e, k, g, kg) in CONFIGS.items():
        sess = {}
        for kind in ("dense", "gather"):
            m = build(kind, h, i, e, k, g, kg, np.random.default_rng(0))
            sess[kind] = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for n in TOKENS:
            x = np.random.default_rng(n).standard_normal((n, h)).astype(np.float32)
            yd = sess["dense"].run(None, {"x": x})[0]
            yg = sess["gather"].run(None, {"x": x})[0]
            err = np.abs(yd - yg).max() / (np.abs(yd).max() + 1e-30)
            assert err < 1e-4, f"dense and gather disagree: rel {err}"
            reps = 200 if h < 256 else max(3, 60 // n)
            print(f"| {name} | {n} | {bench(sess['dense'], x, reps):.3f} | {bench(sess['gather'], x, reps):.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
