#!/usr/bin/env python3
"""End-to-end dev check of the calibration crate on a real decoder graph (default: the engine's tiny fixture).

1. Adds every MatMul input with a weight initializer as a graph output (what `qdq::add_observed_outputs` does),
   runs calibration batches (random token prompts, empty KV cache) in ONNX Runtime and dumps those activations.
2. Runs `cargo run --example quantize_onnx` for int8 (W8A8, several methods), int8-wo and int4-wo.
3. Compares next-token distributions of each quantized graph with fp32 on held-out prompts (mean KL, top-1
   agreement) and lists the integer kernels ORT executes after optimization.

Usage: python3 calibration/scripts/e2e_tiny.py [MODEL_DIR] [WORK_DIR]
int4-wo needs opset 21; an opset-17 model is converted with onnx.version_converter first.
"""
import collections
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import version_converter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def targets(m):
    inits = {t.name: t for t in m.graph.initializer}
    seen, out = set(), []
    for n in m.graph.node:
        if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and len(n.input) == 2:
            t = inits.get(n.input[1])
            if t is not None and len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT and n.input[0] not in seen:
                seen.add(n.input[0])
                out.append(n.input[0])
    return out


def feeds(m, ids):
    f = {}
    for i in m.graph.input:
        dims = [d.dim_value if d.dim_value else None for d in i.type.tensor_type.shape.dim]
        if i.name == "input_ids":
            f[i.name] = ids
        elif i.name == "attention_mask":
            f[i.name] = np.ones_like(ids)
        elif i.name == "position_ids":
            f[i.name] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
        else:  # empty KV past: [batch, heads, 0, head_dim]
            f[i.name] = np.zeros([1, dims[1], 0, dims[3]], dtype=np.float32)
    return f


def session(path, opt_path=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if opt_path:
        so.optimized_model_filepath = opt_path
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main():
    model_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "engine/tests/fixtures/tiny")
    work = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="calib_e2e_")
    os.makedirs(work, exist_ok=True)
    m = onnx.load(os.path.join(model_dir, "model.onnx"))
    vocab = None
    names = targets(m)
    cal = onnx.load(os.path.join(model_dir, "model.onnx"))
    for n in names:
        cal.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    cal_path = os.path.join(work, "calibration_copy.onnx")
    onnx.save(cal, cal_path)
    s = session(cal_path)
    out_names = [o.name for o in s.get_outputs()]
    act = os.path.join(work, "act")
    os.makedirs(act, exist_ok=True)
    index = collections.defaultdict(list)
    rng = np.random.default_rng(0)
    vocab = m.graph.output[0].type.tensor_type.shape.dim[-1].dim_value or 96
    for b in range(16):
        ids = rng.integers(0, vocab, size=(1, 32), dtype=np.int64)
        res = dict(zip(out_names, s.run(None, feeds(m, ids))))
        for i, n in enumerate(names):
            f = f"t{i}_b{b}.bin"
            res[n].astype(np.float32).tofile(os.path.join(act, f))
            index[n].append(f)
    json.dump(index, open(os.path.join(act, "index.json"), "w"))
    print(f"{len(names)} observed tensors, 16 calibration batches of 32 tokens -> {act}")

    # opset 21 copy for int4-wo
    m21_dir = os.path.join(work, "fp32_opset21")
    os.makedirs(m21_dir, exist_ok=True)
    try:
        onnx.save(version_converter.convert_version(m, 21), os.path.join(m21_dir, "model.onnx"))
    except Exception as e:  # noqa: BLE001
        print("opset 21 conversion failed:", e)
        m21_dir = None

    runs = [("int8", "max"), ("int8", "entropy"), ("int8", "percentile:99.99"), ("int8", "mse"), ("int8-wo", None),
            ("int4-wo", None)]
    fp = session(os.path.join(model_dir, "model.onnx"))
    held = [rng.integers(0, vocab, size=(1, 24), dtype=np.int64) for _ in range(16)]
    ref = [fp.run(["logits"], feeds(m, ids))[0][0] for ids in held]
    print(f"{'precision':10s} {'method':18s} {'mean KL':>10s} {'top-1':>7s}  integer kernels ORT runs")
    for scheme, method in runs:
        src = m21_dir if scheme == "int4-wo" else model_dir
        if src is None:
            continue
        out = os.path.join(work, f"{scheme}_{(method or 'wo').replace(':', '_')}")
        cmd = ["cargo", "run", "-q", "-p", "r1-calibration", "--example", "quantize_onnx", "--", src, act, out, scheme]
        if method:
            cmd.append(method)
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            print(scheme, method, "FAILED:", r.stderr[-2000:])
            continue
        opt = os.path.join(out, "model.opt.onnx")
        q = session(os.path.join(out, "model.onnx"), opt)
        kls, agree, total = [], 0, 0
        for ids, rl in zip(held, ref):
            ql = q.run(["logits"], feeds(m, ids))[0][0]
            lp = rl - np.logaddexp.reduce(rl, axis=-1, keepdims=True)
            lq = ql - np.logaddexp.reduce(ql, axis=-1, keepdims=True)
            kls.append(np.sum(np.exp(lp) * (lp - lq), axis=-1))
            agree += int(np.sum(rl.argmax(-1) == ql.argmax(-1)))
            total += rl.shape[0]
        ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
        kern = {k: v for k, v in ops.items() if k in ("MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul",
                                                      "DynamicQuantizeMatMul", "MatMulNBits", "MatMul", "Gemm",
                                                      "QuantizeLinear", "DequantizeLinear")}
        print(f"{scheme:10s} {method or '-':18s} {float(np.mean(np.concatenate(kls))):10.5f} {agree / total:7.1%}  {kern}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
