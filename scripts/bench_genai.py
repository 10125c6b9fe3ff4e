#!/usr/bin/env python3
"""ONNX Runtime GenAI peer baseline for the CPU speed table (issue 9, point 9).

Builds a checkpoint with GenAI's own model builder and times it with the same protocol as our
Rust bench `engine/benches/decode.rs`, mirrored exactly:
  * prompt ids `(i*7919 + salt*104729 + 13) % vocab`, salt = sequence index (decode) or round (prefill);
  * decode: prompts of 16 tokens; one untimed step = the prefill of the prompts + the first (warm-up)
    token; then 32 timed decode steps (one forward pass + greedy argmax each, over the whole batch);
    tokens/s = batch * 32 / seconds; run at batch 1 and at batch 8 (aggregate);
  * prefill: one forward pass over 128 prompt tokens at batch 1 (time to logits of the first token),
    a fresh sequence each round, best of 3.
In GenAI terms: `append_tokens(prompt)` runs the prefill forward, the first `generate_next_token()`
only picks the token from those logits, and each later `generate_next_token()` is one forward pass
on the previous token plus a greedy pick (`do_sample=False`). `min_length = max_length` keeps EOS
from ending a run (random weights); a run that still stops early is reported, never hidden.

Subcommands (the script installs its own pinned venv in .r1/genai-venv on first use):
  build CKPT_DIR -o OUT [-p int4,int8]   GenAI builder -> OUT/genai-<precision>/ (+ build.json with
                                         wall time and peak RSS from /usr/bin/time -v)
  run MODEL_DIR [--json FILE]            decode b1, decode b8, prefill 128 of a built model
  setup                                  only create the venv
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".r1" / "genai-venv"
# Pinned: onnxruntime-genai 0.18.0 is the current release. Its builder imports torch, transformers,
# onnx_ir and tqdm. PyPI's x86_64 torch wheel is the CUDA build (~4 GB with its nvidia-* wheels; PyPI
# has no CPU-only x86_64 wheel), so the venv sees the system site-packages: an interpreter that
# already has exactly these pins installed is reused instead of downloading them again.
PINS = [
    "onnxruntime-genai==0.18.0", "onnxruntime==1.31.1", "onnx-ir==1.1.0", "onnx==1.23.2",
    "torch==2.15.0", "transformers==5.23.0", "numpy==2.4.6", "safetensors==0.8.0", "tqdm==4.70.1",
]
STAMP = VENV / ".r1-pins"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json"]
PROMPT, STEPS, BATCH, PREFILL, ROUNDS = 16, 32, 8, 128, 3  # = engine/benches/decode.rs


def die(msg):
    sys.exit(f"bench_genai: error: {msg}")


def ensure_venv():
    """Create .r1/genai-venv with the pins (skipped when the stamp matches) and re-exec inside it."""
    py = VENV / "bin" / "python"
    if not (STAMP.exists() and STAMP.read_text() == "\n".join(PINS) and py.exists()):
        print(f"bench_genai: installing {' '.join(PINS)} into {VENV}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", *PINS], check=True)
        STAMP.write_text("\n".join(PINS))
    if Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(str(py), [str(py), __file__, *sys.argv[1:]])


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    topo = {(c.joinpath("topology/physical_package_id").read_text(), c.joinpath("topology/core_id").read_text())
            for c in Path("/sys/devices/system/cpu").glob("cpu[0-9]*") if c.joinpath("topology/core_id").exists()}
    return {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "physical_cores": len(topo) or None, "cpu_model": cpu}


def dir_bytes(d):
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())


# ---------------------------------------------------------------- build
def stage_input(ckpt, stage, tokenizer):
    """A builder input dir: the checkpoint's files linked, plus tokenizer files when it has none.

    The builder writes the tokenizer next to the model; the benchmark feeds ids, so any
    Qwen2-compatible tokenizer (default: the R1 tokenizer in .r1/tokenizer) is fine."""
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.is_file():
            (stage / f.name).symlink_to(f.resolve())
    if not (ckpt / "tokenizer.json").exists():
        if not (tokenizer / "tokenizer.json").exists():
            die(f"{ckpt} has no tokenizer.json and neither has --tokenizer {tokenizer} "
                "(run scripts/setup.sh, or pass a dir with a Qwen2-compatible tokenizer.json)")
        for name in TOKENIZER_FILES:
            if (tokenizer / name).exists():
                shutil.copy(tokenizer / name, stage / name)


def cmd_build(a):
    ckpt = Path(a.checkpoint)
    if not (ckpt / "config.json").is_file():
        die(f"{ckpt} is not a checkpoint dir: no config.json (make one with "
            "target/release/r1-fixture --preset r1-distill-qwen-1.5b -o DIR)")
    if not list(ckpt.glob("*.safetensors")):
        die(f"{ckpt} has no *.safetensors weights")
    out = Path(a.output)
    if set(a.precision) - {"int4", "int8", "fp32"}:
        die(f"--precision {','.join(a.precision)}: each must be int4, int8 or fp32")
    for prec in a.precision:
        dest, stage, cache = out / f"genai-{prec}", out / f"genai-{prec}.input", out / f"genai-{prec}.cache"
        stage_input(ckpt, stage, Path(a.tokenizer))
        if dest.exists():
            shutil.rmtree(dest)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(stage),
               "-o", str(dest), "-p", prec, "-e", "cpu", "-c", str(cache)]
        if a.extra_options:
            cmd += ["--extra_options", *a.extra_options]
        full = ["nice", "-n", str(a.nice), "/usr/bin/time", "-v", *cmd]
        print("+", " ".join(full), flush=True)
        t = time.time()
        p = subprocess.run(full, stderr=subprocess.PIPE, text=True)
        wall = time.time() - t
        sys.stderr.write(p.stderr[-4000:])
        if p.returncode != 0:
            die(f"builder failed for {prec} (exit {p.returncode}); see its output above")
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
        shutil.rmtree(stage)
        shutil.rmtree(cache, ignore_errors=True)
        info = {"precision": prec, "command": cmd, "extra_options": a.extra_options or [],
                "builder_wall_s": round(wall, 1),
                "builder_peak_rss_gib": round(int(rss.group(1)) / 2**20, 2) if rss else None,
                "model_bytes": dir_bytes(dest), "genai_version": genai_version(), **machine()}
        info.update(describe_quant(dest))
        (dest / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        print(f"built {dest}: {info['builder_wall_s']} s, peak RSS {info['builder_peak_rss_gib']} GiB, "
              f"{info['model_bytes'] / 1e9:.2f} GB on disk, {info['matmul_ops']}")


def genai_version():
    import onnxruntime_genai as og
    return og.__version__


def describe_quant(dest):
    """What the builder produced: MatMul op kinds and MatMulNBits bits/block_size/accuracy_level."""
    import onnx
    m = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    kinds = {}
    for n in m.graph.node:
        if "MatMul" in n.op_type or n.op_type.startswith("Gather"):
            attrs = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute
                     if x.name in ("bits", "block_size", "accuracy_level")}
            key = n.op_type + "".join(f" {k}={v}" for k, v in sorted(attrs.items()))
            kinds[key] = kinds.get(key, 0) + 1
    return {"matmul_ops": ", ".join(f"{v}x {k}" for k, v in sorted(kinds.items()))}


def weight_bytes_per_token(d):
    """Bytes of initializers a decode step reads, as engine/benches/decode.rs counts them: all of
    model.onnx's initializers except tables only gathered from (the token embedding)."""
    import onnx
    g = onnx.load(str(Path(d) / "model.onnx"), load_external_data=False).graph
    uses = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            uses.setdefault(i, []).append(n.op_type == "Gather" and k == 0)
    size = lambda t: (int(next((kv.value for kv in t.external_data if kv.key == "length"), 0))
                      if t.data_location == onnx.TensorProto.EXTERNAL else len(t.raw_data))
    return sum(size(t) for t in g.initializer if not (uses.get(t.name) and all(uses[t.name])))


# ---------------------------------------------------------------- run
def prompt(n, vocab, salt):
    return [(i * 7919 + salt * 104729 + 13) % vocab for i in range(n)]


def new_generator(og, model, rows, extra):
    import numpy as np
    params = og.GeneratorParams(model)
    max_len = len(rows[0]) + extra
    params.set_search_options(do_sample=False, max_length=max_len, min_length=max_len, batch_size=len(rows))
    g = og.Generator(model, params)
    t = time.perf_counter()
    g.append_tokens(np.array(rows, dtype=np.int32))
    return g, time.perf_counter() - t


def decode(og, model, vocab, batch, context=PROMPT):
    g, _ = new_generator(og, model, [prompt(context, vocab, b) for b in range(batch)], STEPS + 2)
    g.generate_next_token()  # picks the first token from the prefill logits (untimed warm-up)
    t, done = time.perf_counter(), 0
    for _ in range(STEPS):
        if g.is_done():
            break
        g.generate_next_token()
        done += 1
    secs = time.perf_counter() - t
    return batch * done / secs, done


def prefill(og, model, vocab):
    return min(new_generator(og, model, [prompt(PREFILL, vocab, r)], 1)[1] for r in range(ROUNDS))


def cmd_run(a):
    import onnxruntime_genai as og
    d = Path(a.model)
    cfg_path = d / "genai_config.json"
    if not cfg_path.is_file():
        die(f"{d} has no genai_config.json: build it first with `bench_genai.py build`")
    gcfg = json.loads(cfg_path.read_text())
    vocab = gcfg["model"]["vocab_size"]
    config = og.Config(str(d))
    if a.threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": a.threads}}}}))
    model = og.Model(config)
    so = gcfg["model"]["decoder"].get("session_options", {})
    threads = a.threads or so.get("intra_op_num_threads") or \
        f"ORT default: one per physical core ({machine()['physical_cores']} here)"
    build = json.loads((d / "build.json").read_text()) if (d / "build.json").exists() else {}
    prec = build.get("precision") or d.name.replace("genai-", "")
    print(f"model: {d} (GenAI {og.__version__}, {prec}), intra-op threads: {threads}", flush=True)
    if a.context:
        # Batch-1 decode after a prompt of `context` tokens (the cache-pool issue's long-context figure).
        ctx = {}
        for c in a.context:
            tps, n = decode(og, model, vocab, 1, context=c)
            ctx[str(c)] = round(tps, 3)
            print(f"decode b1 at context {c}: {tps:.2f} tok/s ({n}/{STEPS} steps)", flush=True)
        res = {"genai_version": og.__version__, "precision": prec, "model_dir": str(d),
               "decode_b1_at_context_tok_s": ctx, "decode_steps": STEPS, "intra_op_threads": threads, **machine()}
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
        return
    b1, n1 = decode(og, model, vocab, 1)
    print(f"decode b1: {b1:.2f} tok/s ({n1}/{STEPS} steps)", flush=True)
    b8, n8 = decode(og, model, vocab, BATCH)
    print(f"decode b{BATCH}: {b8:.2f} tok/s aggregate ({n8}/{STEPS} steps)", flush=True)
    pf = prefill(og, model, vocab)
    print(f"prefill {PREFILL}: {pf:.3f} s (best of {ROUNDS})", flush=True)
    stopped = [f"batch {b}: {n}/{STEPS}" for b, n in ((1, n1), (BATCH, n8)) if n < STEPS]
    if stopped:
        print("WARNING: decode stopped early (EOS/max_length): " + "; ".join(stopped))
    res = {"genai_version": og.__version__, "precision": prec, "model_dir": str(d),
           "decode_b1_tok_s": round(b1, 3), f"decode_b{BATCH}_tok_s": round(b8, 3),
           "prefill128_s": round(pf, 4), "decode_steps": {"b1": n1, f"b{BATCH}": n8, "asked": STEPS},
           "stopped_early": bool(stopped), "intra_op_threads": threads,
           "model_bytes": sum(p.stat().st_size for p in d.iterdir() if p.name.startswith("model.onnx")),
           "weight_bytes_per_token": weight_bytes_per_token(d),
           "matmul_ops": build.get("matmul_ops"), **machine()}
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {a.json}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="create .r1/genai-venv with the pinned packages and exit")
    b = sub.add_parser("build", help="run GenAI's model builder (-e cpu) on a HF checkpoint dir")
    b.add_argument("checkpoint", help="HF checkpoint dir (config.json + *.safetensors)")
    b.add_argument("-o", "--output", required=True, help="writes OUT/genai-<precision>/")
    b.add_argument("-p", "--precision", default="int4", type=lambda v: v.split(","),
                   help="int4, int8, fp32 or a comma list (int4,int8), built one after another; "
                        "int4/int8 = MatMulNBits weight-only, block 32, the builder's cpu accuracy_level 4")
    b.add_argument("--tokenizer", default=str(ROOT / ".r1" / "tokenizer"),
                   help="tokenizer dir used when the checkpoint has none (default: .r1/tokenizer)")
    b.add_argument("--extra-options", nargs="+", metavar="KEY=VALUE", help="passed to the builder as is")
    b.add_argument("--nice", type=int, default=10, help="niceness of the builder (default 10)")
    r = sub.add_parser("run", help="time decode b1/b8 and prefill 128 of a built model")
    r.add_argument("model", help="a built OUT/genai-<precision> dir")
    r.add_argument("--json", help="also write the results here")
    r.add_argument("--threads", type=int, help="intra-op threads (default: ORT's default)")
    r.add_argument("--context", type=int, nargs="+", metavar="N",
                   help="only measure batch-1 decode after a prompt of N tokens, for each N")
    a = ap.parse_args()
    ensure_venv()
    {"setup": lambda a: None, "build": cmd_build, "run": cmd_run}[a.cmd](a)


if __name__ == "__main__":
    main()
