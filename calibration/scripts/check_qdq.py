#!/usr/bin/env python3
"""Runs the tiny quantized graphs of `examples/qdq_tiny.rs` in ONNX Runtime (CPU) and reports:

- which node types ORT actually executes after graph optimization (from `optimized_model_filepath`), in particular
  the integer kernels MatMulInteger / QLinearMatMul / DynamicQuantizeMatMul / MatMulIntegerToFloat / MatMulNBits;
- the max abs difference between ORT's output and the crate's reference interpreter: with basic optimizations
  (no QDQ fusion) it must agree to float rounding, which checks axis / block_size / int4 packing semantics; with all
  optimizations ORT's fused integer kernels may round differently (MatMulNBits can quantize activations too);
- SQNR of each quantized graph against the fp32 graph, both in ORT.

Usage: python3 calibration/scripts/check_qdq.py [DIR]   (builds the models with cargo unless DIR already has them)
Dev tool only: cargo tests never run Python.
"""
import collections
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

INTEGER_OPS = {"MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits",
               "QGemm", "QuantizeLinear", "DequantizeLinear"}


def build(d):
    subprocess.run(["cargo", "run", "-q", "-p", "r1-calibration", "--example", "qdq_tiny", "--", d], check=True)


def ops_of(path):
    m = onnx.load(path)
    c = collections.Counter((n.domain or "ai.onnx") + ":" + n.op_type for n in m.graph.node)
    return dict(sorted(c.items()))


def run(path, x, opt_path, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.optimized_model_filepath = opt_path
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def sqnr(ref, got):
    noise = float(np.sum((ref.astype(np.float64) - got) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="qdq_tiny_")
    if not os.path.exists(os.path.join(d, "x.bin")):
        build(d)
    x = np.fromfile(os.path.join(d, "x.bin"), dtype=np.float32).reshape(4, 64)
    print(f"onnxruntime {ort.__version__}, models in {d}")
    ok = True
    for family, out in (("chain", "y"), ("rmsnorm", "out")):
        fp = None
        for tag in ("fp32", "w8a8", "int8wo", "int4wo", "int4wo_asym"):
            name = f"{family}_{tag}"
            path = os.path.join(d, name + ".onnx")
            ref = np.fromfile(os.path.join(d, f"{name}.{out}.bin"), dtype=np.float32)
            for lname, level in (("basic", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
                                 ("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)):
                opt = os.path.join(d, f"{name}.opt-{lname}.onnx")
                y = run(path, x, opt, level)
                if tag == "fp32" and lname == "all":
                    fp = y
                diff = float(np.max(np.abs(y.reshape(-1) - ref)))
                ops = ops_of(opt)
                integer = {k: v for k, v in ops.items() if k.split(":")[1] in INTEGER_OPS}
                rel = diff / max(1e-12, float(np.max(np.abs(ref))))
                if lname == "basic":  # no fusions: plain ONNX semantics must match the reference exactly-ish
                    ok &= rel < 1e-4
                line = f"{name:16s} opt={lname:5s} max|ort-ref|={diff:.2e} (rel {rel:.1e})"
                if fp is not None and lname == "all":
                    line += f" SQNR vs fp32 {sqnr(fp, y):6.1f} dB"
                print(line)
                print(f"    executed ops: {ops}")
                if integer:
                    print(f"    integer/QDQ ops: {integer}")
    print("OK: ORT agrees with the reference interpreter" if ok else "MISMATCH between ORT and the reference interpreter")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
