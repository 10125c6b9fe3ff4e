#!/usr/bin/env python3
"""Where does a decode (or prefill) step of an r1 artifact spend its time in ONNX Runtime? Per-operator profile.

    python3 scripts/profile_ort.py ARTIFACT_DIR [--batch 1,8] [--past 32] [--seq 1] [--runs 5] [--threads N]
                                   [--graph FILE] [--no-profile]

Runs the graph ort would run on CPU (the serving graph `manifest.json`'s `targets.cpu.graph` names when
`r1-export --target cpu` wrote it, e.g. engines/cpu/<version>/model.onnx, else model.onnx)
with ONNX Runtime's own profiler (SessionOptions.enable_profiling) on random inputs of the asked shape, and prints,
per batch size, the share of the step's time per operator type plus the mean step time. The first run of each shape
is a warm-up and is left out. `--no-profile` only times the steps (the profiler itself slows a step ~2.5x);
`--graph` runs another graph with the artifact's inputs (e.g. a hand-edited copy, to compare a rewrite). Needs `onnxruntime` (the version r1 pins, 1.31.1) in the running Python.
"""
import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", help="an r1-export output directory (manifest.json + model.onnx)")
    ap.add_argument("--batch", default="1,8", help="comma list of batch sizes (default 1,8)")
    ap.add_argument("--past", type=int, default=32, help="past length (default 32)")
    ap.add_argument("--seq", type=int, default=1, help="new tokens per row: 1 = decode, 128 = a prefill (default 1)")
    ap.add_argument("--runs", type=int, default=5, help="profiled runs per shape after one warm-up (default 5)")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (default: ONNX Runtime's choice)")
    ap.add_argument("--top", type=int, default=8, help="operator types listed per shape (default 8)")
    ap.add_argument("--graph", help="run this ONNX file instead of the artifact's graph (same inputs)")
    ap.add_argument("--no-profile", action="store_true", help="only time the steps")
    a = ap.parse_args()
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as e:
        sys.exit(f"profile_ort: error: {e}; run it with a Python that has onnxruntime and numpy")
    d = Path(a.artifact)
    manifest_path = d / "manifest.json"
    if not manifest_path.is_file():
        sys.exit(f"profile_ort: error: {d} has no manifest.json (not an r1-export output directory)")
    m = json.loads(manifest_path.read_text())
    cpu = (m.get("targets") or {}).get("cpu") or {}
    graph = Path(a.graph) if a.graph else d / cpu.get("graph", "model.onnx")
    if not graph.is_file():
        graph = d / "model.onnx"
    vocab = m["model"]["vocab_size"]
    rng = np.random.default_rng(0)
    print(f"{graph} ({m['precision']}), onnxruntime {ort.__version__}, past {a.past}, {a.seq} new token(s) per row")
    for batch in [int(b) for b in a.batch.split(",")]:
        so = ort.SessionOptions()
        so.enable_profiling = not a.no_profile
        so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="r1-prof-"), "p")
        if a.threads:
            so.intra_op_num_threads = a.threads
        sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        feeds = {}
        for t in m["inputs"]:
            name = t["name"]
            if name == "input_ids":
                feeds[name] = rng.integers(0, vocab, (batch, a.seq), dtype=np.int64)
            elif name == "attention_mask":
                feeds[name] = np.ones((batch, a.past + a.seq), dtype=np.int64)
            elif name == "position_ids":
                feeds[name] = np.tile(np.arange(a.past, a.past + a.seq, dtype=np.int64), (batch, 1))
            else:
                dims = [batch if s == "batch" else a.past if s == "past_sequence" else s for s in t["shape"]]
                dtype = np.float16 if t["dtype"] == "float16" else np.float32
                feeds[name] = rng.standard_normal(dims).astype(dtype)
        sess.run(None, feeds)  # warm-up (left out below)
        t0 = time.perf_counter()
        for _ in range(a.runs):
            sess.run(None, feeds)
        step = (time.perf_counter() - t0) / a.runs
        print(f"\nbatch {batch}: {step * 1e3:.1f} ms per step ({batch * a.seq / step:.1f} tokens/s)")
        if a.no_profile:
            continue
        events = json.loads(Path(sess.end_profiling()).read_text())
        runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
        cutoff = runs[0]["ts"] + runs[0]["dur"] if runs else 0  # drop the warm-up run's node events
        per_op = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= cutoff:
                per_op[e["args"].get("op_name", "?")] += e["dur"]
        total = sum(per_op.values()) or 1
        for op, us in per_op.most_common(a.top):
            print(f"  {op:<24} {100 * us / total:5.1f}%  {us / a.runs / 1e3:8.2f} ms/step")


if __name__ == "__main__":
    main()
