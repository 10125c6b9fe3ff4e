#!/usr/bin/env python3
"""HF transformers on the GPU: the peer that scripts/gpu_check.sh measures beside r1-serve in the same run.

Loads a checkpoint (the 1.5B shape r1-fixture writes) in float16 on CUDA and times greedy `generate` with a static
cache (and `torch.compile` of the forward unless --no-compile), at the batch sizes given, for prompts of
--prompt-tokens random ids and exactly --max-tokens new tokens. Prints one JSON object per batch size:
{"peer": "transformers", "batch": B, "tokens_per_s": ..., "decode_tokens_per_s": ..., "compile": bool}.

Also prints the memory roofline of batch-1 decode for the GPU: the bytes a decode step must read (every weight but
the input embedding table, fp16) over the card's memory bandwidth (a table of published figures by GPU name).

  python3 scripts/hf_gpu_peer.py CHECKPOINT --batch 1 16 --prompt-tokens 16 --max-tokens 64
"""
import argparse
import json
import sys
import time

# Published peak memory bandwidth, bytes/s (SXM parts; PCIe variants are lower and named apart where they exist).
BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100-PCIE-80GB", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("B200", 8.0e12),
]


def bandwidth_for(name):
    for key, bw in BANDWIDTH:
        if key in name:
            return key, bw
    return None, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true", help="eager forward (torch.compile can take minutes)")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available():
        sys.exit("hf_gpu_peer: torch sees no CUDA device")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, torch_dtype=torch.float16).to(dev).eval()
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if model.config.tie_word_embeddings:
        weights += model.get_input_embeddings().weight.numel() * 2
    key, bw = bandwidth_for(name)
    roof = {"gpu": name, "decode_bytes_per_token": weights}
    if bw:
        roof.update({"bandwidth_bytes_per_s": bw, "bandwidth_of": key, "roofline_tokens_per_s": bw / weights})
    print(json.dumps({"roofline": roof}))

    compiled = False
    if not args.no_compile:
        try:
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            compiled = True
        except Exception as e:  # an older torch without a working inductor: measure eager, and say so
            print(json.dumps({"compile_failed": str(e)[:200]}), file=sys.stderr)
    vocab = model.config.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    for b in args.batch:
        ids = torch.randint(0, vocab, (b, args.prompt_tokens), generator=g).to(dev)
        kw = dict(
            max_new_tokens=args.max_tokens,
            min_new_tokens=args.max_tokens,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )
        with torch.inference_mode():
            for _ in range(2):  # warm-up: compilation and CUDA graph capture for this shape
                model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, min_new_tokens=1,
                           do_sample=False, cache_implementation="static", pad_token_id=0)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        out = {
            "peer": "transformers",
            "torch": torch.__version__,
            "batch": b,
            "tokens_per_s": b * args.max_tokens / wall,
            "decode_tokens_per_s": b * (args.max_tokens - 1) / max(wall - prefill, 1e-9),
            "compile": compiled,
        }
        print(json.dumps(out))


if __name__ == "__main__":
    main()
