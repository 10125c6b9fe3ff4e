#!/usr/bin/env python3
"""A KV budget that fits what requests use, against one that is unlimited: the cache-pool issue's load test.

Runs r1-serve on arith-r1 twice, one after the other on the same artifact: once with the default KV budget (2 GiB,
unlimited for this load) and once with `--kv-cache-mib 3`, both with `--max-batch-size 64`. Each time, 64 short chat
requests ("What is A+B?", as the README's users ask arith-r1) go at once through the OpenAI-compatible
`/v1/chat/completions` with `stream: true`, `max_tokens` 200, greedy. It reports, per run: requests completed and
failed, time to first token p50/p90 (first streamed delta), wall time, generated tokens, and the pool's counters
from `/metrics` (preemptions, recomputed positions, peak positions held).

    python3 scripts/bench_kv_pool.py [--model ARTIFACT] [--serve-bin PATH] [--export-bin PATH] [--json OUT]

Without --model it exports tests/fixtures/arith-r1 (default precision) into a temporary directory first. Numbers go
in BENCHMARKS.md ("KV pool"); this script asserts nothing about timing, only that every request completed.
"""

import argparse
import http.client
import json
import os
import random
import re
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import soak  # noqa: E402  (the shared r1-serve launcher)


def chat_stream(port, question, max_tokens, timeout_s=600.0):
    """One streaming chat completion; returns (ok, ttft_s, tokens, total_s, error)."""
    body = json.dumps({
        "model": "arith-r1",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    t0 = time.monotonic()
    ttft = None
    tokens = 0
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return False, None, 0, time.monotonic() - t0, f"HTTP {resp.status}: {resp.read()[:200]!r}"
        for ev in soak.sse_events(resp):
            if "error" in ev:
                return False, ttft, tokens, time.monotonic() - t0, str(ev["error"])
            for ch in ev.get("choices", []):
                d = ch.get("delta", {})
                if (d.get("content") or d.get("reasoning_content")) and ttft is None:
                    ttft = time.monotonic() - t0
            if ev.get("usage"):
                tokens = ev["usage"].get("completion_tokens", tokens)
        conn.close()
        return ttft is not None, ttft, tokens, time.monotonic() - t0, None
    except (OSError, http.client.HTTPException, ValueError) as e:
        return False, ttft, tokens, time.monotonic() - t0, repr(e)


def metric(text, name):
    m = re.search(rf"^{name}(?:{{[^}}]*}})?\s+([0-9.eE+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, int(-(-q * len(xs) // 1)) - 1))]


def run_load(server, n, max_tokens, seed):
    rng = random.Random(seed)
    questions = [f"What is {rng.randint(10, 99)}+{rng.randint(10, 99)}?" for _ in range(n)]
    results = [None] * n
    peak = {"tokens": 0.0, "slots": 0.0}
    done = threading.Event()

    def watch():
        while not done.is_set():
            status, text = soak.http_get(server.url("/metrics"), timeout=2.0)
            if status == 200:
                peak["tokens"] = max(peak["tokens"], metric(text, "r1_kv_cache_used_tokens") or 0)
                peak["slots"] = max(peak["slots"], metric(text, "r1_kv_pool_slots_used") or 0)
            time.sleep(0.05)

    def one(i):
        results[i] = chat_stream(server.http_port, questions[i], max_tokens)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    done.set()
    watcher.join()
    _, text = soak.http_get(server.url("/metrics"), timeout=5.0)
    ok = [r for r in results if r[0]]
    ttfts = [r[1] for r in ok]
    return {
        "requests": n,
        "completed": len(ok),
        "failed": n - len(ok),
        "first_error": next((r[4] for r in results if not r[0]), None),
        "ttft_p50_s": pct(ttfts, 0.5),
        "ttft_p90_s": pct(ttfts, 0.9),
        "wall_s": wall,
        "generated_tokens": sum(r[2] for r in ok),
        "preemptions": metric(text, "r1_kv_preemptions_total"),
        "recomputed_tokens": metric(text, "r1_kv_recomputed_tokens_total"),
        "kv_capacity_tokens": metric(text, "r1_kv_cache_capacity_tokens"),
        "peak_kv_used_tokens": peak["tokens"],
        "peak_slots_used": peak["slots"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="an exported arith-r1 artifact (default: export one)")
    ap.add_argument("--serve-bin")
    ap.add_argument("--export-bin")
    ap.add_argument("--backend", default="ort")
    ap.add_argument("-n", type=int, default=64, help="requests, all at once (default 64)")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--kv-cache-mib", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()

    rows = []
    model = a.model
    for label, extra in [("unlimited (default 2 GiB)", []), (f"--kv-cache-mib {a.kv_cache_mib}",
                                                                  ["--kv-cache-mib", str(a.kv_cache_mib)])]:
        args = ["--max-batch-size", str(a.n), "--max-concurrent-requests", str(4 * a.n),
                "--skip-integrity-check"] + extra
        with soak.Server(a.serve_bin, a.export_bin, model, a.backend, args) as s:
            if model is None:
                model = s.model  # export once; the second run serves the same files
                keep = s.tmp
                s.tmp = None
            r = run_load(s, a.n, a.max_tokens, seed=2026)
            s.stop()
        r["budget"] = label
        rows.append(r)
        print(json.dumps(r), flush=True)
    base, tight = rows
    ratio = tight["ttft_p90_s"] / base["ttft_p90_s"]
    print(f"\n| budget | completed | failed | TTFT p50 | TTFT p90 | wall | tokens | preemptions | recomputed | "
          f"peak held / capacity (positions) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['completed']} | {r['failed']} | {r['ttft_p50_s']:.2f} s | "
              f"{r['ttft_p90_s']:.2f} s | {r['wall_s']:.1f} s | {r['generated_tokens']} | {r['preemptions']:.0f} | "
              f"{r['recomputed_tokens']:.0f} | {r['peak_kv_used_tokens']:.0f} / {r['kv_capacity_tokens']:.0f} |")
    print(f"\nTTFT p90 ratio (tight / unlimited): {ratio:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "ttft_p90_ratio": ratio}, f, indent=1)
    if "keep" in locals():
        keep.cleanup()
    if any(r["failed"] for r in rows):
        print(f"FAILED requests: {[r['first_error'] for r in rows if r['failed']]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
