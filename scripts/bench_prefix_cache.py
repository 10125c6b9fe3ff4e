#!/usr/bin/env python3
"""Prefix caching and the scheduler under mixed load: the prefix-cache issue's measurements, one run.

Starts r1-serve on ARTIFACT twice, `--prefix-cache on` then `off` (same flags otherwise), and measures through the
OpenAI-compatible HTTP API (streaming, greedy, `stream_options.include_usage`):

1. **Shared prefix**: a request whose first ~1,024 prompt tokens equal an earlier request's (different tail), its time
   to first token, its text (greedy) and `usage.prompt_tokens_details.cached_tokens`.
2. **Multi-turn**: a 5-turn chat replayed turn by turn (each turn sends the whole conversation so far); per turn the
   prompt tokens, the cached ones and so the ones prefilled.
3. **Mixed load** (cache on only): 12 requests with ~32-token prompts alone, then the same 12 together with 4 requests
   with ~2,048-token prompts (16 at once); the short ones' time to first token p50/p90 in both.

    python3 scripts/bench_prefix_cache.py ARTIFACT [--serve-bin PATH] [--json OUT] [--server-args "FLAGS"]
                                                   [--mixed-only]

ARTIFACT: e.g. /tmp/r1-bench-cpu/r1-int8-wo (scripts/bench_long_context.sh makes it). Prints JSON lines and a summary;
numbers go in BENCHMARKS.md. Exits 1 if a request fails or greedy text differs between cache on and off.
"""

import argparse
import http.client
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import soak  # noqa: E402


def words(n, salt):
    """~n tokens of varied text (numbers tokenize to about one token per 1-3 digits plus the space)."""
    return " ".join(str((i * 7919 + salt * 104729) % 1000) for i in range(n // 2))


def stream(port, path, body, timeout_s=900.0):
    """POST a streaming request; returns dict(ok, ttft_s, text, usage, total_s, error)."""
    body = dict(body, stream=True, stream_options={"include_usage": True}, temperature=0)
    t0 = time.monotonic()
    out = {"ok": False, "ttft_s": None, "text": "", "usage": None, "error": None}
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            out["error"] = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return out
        for ev in soak.sse_events(resp):
            if "error" in ev:
                out["error"] = str(ev["error"])
                return out
            for ch in ev.get("choices", []):
                piece = ch.get("text") or ""
                d = ch.get("delta") or {}
                piece += (d.get("reasoning_content") or "") + (d.get("content") or "")
                if piece and out["ttft_s"] is None:
                    out["ttft_s"] = time.monotonic() - t0
                out["text"] += piece
            if ev.get("usage"):
                out["usage"] = ev["usage"]
        out["ok"] = out["usage"] is not None
    except (OSError, http.client.HTTPException, ValueError) as e:
        out["error"] = repr(e)
    out["total_s"] = time.monotonic() - t0
    return out


def cached(r):
    return ((r.get("usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def shared_prefix(port):
    # A little over 1,024 tokens, so that the first 1,024 are shared whatever the tail merges with.
    prefix = words(1040, 1)
    warm = stream(port, "/v1/completions", {"prompt": prefix + " first tail 11 12 13", "max_tokens": 16})
    hit = stream(port, "/v1/completions", {"prompt": prefix + " second tail 21 22 23", "max_tokens": 16})
    return {"warm": warm, "hit": hit}


def multi_turn(port):
    msgs, turns = [], []
    for k in range(5):
        msgs.append({"role": "user", "content": f"Turn {k + 1}: " + words(120, 10 + k)})
        r = stream(port, "/v1/chat/completions", {"messages": msgs, "max_tokens": 24})
        u = r.get("usage") or {}
        turns.append({"ok": r["ok"], "prompt_tokens": u.get("prompt_tokens"), "cached_tokens": cached(r),
                      "prefilled": (u.get("prompt_tokens") or 0) - cached(r), "ttft_s": r["ttft_s"],
                      "error": r["error"]})
        msgs.append({"role": "assistant", "content": r["text"]})
    return turns


def concurrent(port, bodies):
    results = [None] * len(bodies)

    def one(i):
        results[i] = stream(port, "/v1/completions", bodies[i])

    ts = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return results


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, max(0, -(-int(q * 100) * len(xs) // 100) - 1))] if xs else float("nan")


def mixed(port):
    shorts = [{"prompt": words(32, 100 + i), "max_tokens": 16} for i in range(12)]
    longs = [{"prompt": words(2048, 200 + i), "max_tokens": 16} for i in range(4)]
    alone = concurrent(port, shorts)
    # Fresh prompts for the mixed run, so that neither is served from the cache of the first.
    shorts2 = [{"prompt": words(32, 300 + i), "max_tokens": 16} for i in range(12)]
    together = concurrent(port, longs + shorts2)
    short_t = together[4:]
    return {
        "alone": {"ttft_p50_s": pct([r["ttft_s"] for r in alone], 0.5), "ttft_p90_s": pct([r["ttft_s"] for r in alone], 0.9),
                  "failed": sum(not r["ok"] for r in alone)},
        "with_long": {"ttft_p50_s": pct([r["ttft_s"] for r in short_t], 0.5),
                      "ttft_p90_s": pct([r["ttft_s"] for r in short_t], 0.9),
                      "long_ttft_s": [round(r["ttft_s"] or -1, 2) for r in together[:4]],
                      "failed": sum(not r["ok"] for r in together)},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--serve-bin", default=os.path.join(soak.cargo_bin_dir("release"), "r1-serve"))
    ap.add_argument("--json")
    ap.add_argument("--server-args", default="", help="extra r1-serve flags, e.g. '--max-batch-tokens 512'")
    ap.add_argument("--mixed-only", action="store_true", help="only the mixed-load part, cache on")
    ap.add_argument("--cache-mode", default="on", choices=["on", "exact"],
                    help="--prefix-cache value of the cached run (exact: hits rounded to the prefill chunk)")
    a = ap.parse_args()
    if a.mixed_only:
        args = ["--max-batch-size", "16", "--max-concurrent-requests", "64", "--skip-integrity-check", "--log",
                "warn"] + a.server_args.split()
        with soak.Server(a.serve_bin, None, a.model, "ort", args) as s:
            m = mixed(s.http_port)
            s.stop()
        print(json.dumps(m))
        print(f"short TTFT alone p50/p90 {m['alone']['ttft_p50_s']:.2f}/{m['alone']['ttft_p90_s']:.2f} s; with long "
              f"{m['with_long']['ttft_p50_s']:.2f}/{m['with_long']['ttft_p90_s']:.2f} s; p90 ratio "
              f"{m['with_long']['ttft_p90_s'] / m['alone']['ttft_p90_s']:.2f}; long TTFT {m['with_long']['long_ttft_s']}")
        return 1 if m["with_long"]["failed"] or m["alone"]["failed"] else 0
    report = {}
    for mode in ("on", "off"):
        args = ["--prefix-cache", a.cache_mode if mode == "on" else mode, "--max-batch-size", "16", "--max-concurrent-requests", "64",
                "--skip-integrity-check", "--log", "warn"] + a.server_args.split()
        with soak.Server(a.serve_bin, None, a.model, "ort", args) as s:
            r = {"shared_prefix": shared_prefix(s.http_port), "multi_turn": multi_turn(s.http_port)}
            if mode == "on":
                r["mixed"] = mixed(s.http_port)
            s.stop()
        report[mode] = r
        print(json.dumps({mode: r}, default=str)[:4000], flush=True)
    on, off = report["on"], report["off"]
    hit_on, hit_off = on["shared_prefix"]["hit"], off["shared_prefix"]["hit"]
    ratio = hit_on["ttft_s"] / hit_off["ttft_s"]
    same = hit_on["text"] == hit_off["text"]
    print("\n## shared 1,024-token prefix")
    print(f"cache {a.cache_mode}:  TTFT {hit_on['ttft_s']:.3f} s, prompt {hit_on['usage']['prompt_tokens']} tokens, "
          f"cached {cached(hit_on)}")
    print(f"cache off: TTFT {hit_off['ttft_s']:.3f} s, cached {cached(hit_off)}")
    print(f"ratio on/off: {ratio:.3f}; greedy text identical: {same}")
    print("\n## multi-turn (cache on): prompt / cached / prefilled per turn")
    for i, t in enumerate(on["multi_turn"]):
        print(f"turn {i + 1}: {t['prompt_tokens']} / {t['cached_tokens']} / {t['prefilled']}  (TTFT {t['ttft_s']:.2f} s)")
    print("multi-turn (cache off): prefilled " + ", ".join(str(t["prefilled"]) for t in off["multi_turn"]))
    m = on["mixed"]
    print("\n## mixed load (cache on): 12 short prompts alone vs with 4 long ones")
    print(f"alone:     TTFT p50 {m['alone']['ttft_p50_s']:.2f} s, p90 {m['alone']['ttft_p90_s']:.2f} s")
    print(f"with long: TTFT p50 {m['with_long']['ttft_p50_s']:.2f} s, p90 {m['with_long']['ttft_p90_s']:.2f} s; "
          f"long TTFT {m['with_long']['long_ttft_s']}; failed {m['with_long']['failed']}")
    print(f"short p90 ratio: {m['with_long']['ttft_p90_s'] / m['alone']['ttft_p90_s']:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    failed = [r for mode in report.values() for r in [mode["shared_prefix"]["hit"], mode["shared_prefix"]["warm"]]
              if not r["ok"]] + [t for mode in report.values() for t in mode["multi_turn"] if not t["ok"]]
    if failed or not same or m["with_long"]["failed"] or m["alone"]["failed"]:
        print(f"FAILED: {len(failed)} failed requests; same text: {same}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
