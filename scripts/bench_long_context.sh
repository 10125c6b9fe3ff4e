#!/usr/bin/env bash
# Batch-1 decode speed against context length, through r1-serve, next to ONNX Runtime GenAI in the same run: the
# cache-pool issue's CPU figure (decode at a 4,000-token context vs a 128-token one; r1 vs GenAI int8 at 2,048).
#
#   scripts/bench_long_context.sh [WORK_DIR]
#       WORK_DIR defaults to /tmp/r1-bench-cpu (shared with scripts/bench_cpu.sh: the checkpoint, the r1 int8-wo
#       artifact and GenAI's int8 build are reused when they exist, made otherwise).
#   env: CONTEXTS="128 2048 4000", STEPS=48 (decode tokens timed per context), ROUNDS=3 (interleaved rounds over
#        the contexts), GENAI_ROUNDS=ROUNDS (GenAI's rounds: each prefills its prompts in full, ~6 min here),
#        WARMUP=1 (one untimed request per context first; 0 to skip), GRPC_PORT=50161, HTTP_PORT=8191,
#        GENAI=0 to skip GenAI, KV_CACHE_DTYPE=auto (the serving graph's cache: auto = fp16 for this int8-wo
#        artifact; fp32 to compare), PREFIX_CACHE=1 (timed requests start from the server's prefix cache; 0 to
#        prefill every request in full).
#
# Per context C: r1-bench sends one request of ~C prompt tokens with max_tokens STEPS (through EOS, greedy) at
# concurrency 1; the decode rate is 1000 / (inter-token latency p50 in ms). After the warm-up pass, ROUNDS rounds each
# take every context once, in order (128, 2048, 4000, 128, ...), so that each context sees the shared host's speed of
# every minute of the run rather than one minute of its own; each round prints a JSON line per context, then the
# summary lines give each context's median over the rounds, the ratio of each context's median to the first
# context's, and the median over the rounds of each round's own ratio (the issue's 4,000 / 128 figure: both
# numbers of a pair come from the same few seconds, so the shared host's drift cancels). With PREFIX_CACHE=1 the
# warm-up prefills each prompt once and every timed request starts from the prefix cache (its slot gets a copy of
# the cached positions, then decodes exactly as after a full prefill), so a round lasts seconds instead of the
# minutes a 4,000-token prefill takes here and the contexts of a round are timed back to back (8 slots: each
# context's warm-up entry, and the entry of a timed request whose greedy tokens differ from the warm-up's after a
# near-tie, all stay retained; with 4, three contexts evicted one of them each round); prefill speed is
# bench_cpu.sh's business. GenAI: `bench_genai.py run --context C C' ...` with the contexts
# repeated ROUNDS times (one model load, the same interleaving; its prompt of C tokens, then its timed decode steps),
# summarized the same way, then r1 / GenAI per context from the medians. On an idle machine.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"   # ROOT, R1_HOME, r1_target_dir
REL="$(r1_target_dir)/release"
WORK="${1:-/tmp/r1-bench-cpu}"
CK="$WORK/ck"
ART="$WORK/r1-int8-wo"
CONTEXTS="${CONTEXTS:-128 2048 4000}"
STEPS="${STEPS:-48}"
ROUNDS="${ROUNDS:-3}"
# GenAI prefills every prompt in full (no prefix cache): ~6 minutes a round of 128 + 2,048 + 4,000 on 2 cores.
GENAI_ROUNDS="${GENAI_ROUNDS:-$ROUNDS}"
WARMUP="${WARMUP:-1}"
GRPC_PORT="${GRPC_PORT:-50161}"
HTTP_PORT="${HTTP_PORT:-8191}"
say() { printf '[bench-long-context] %s\n' "$*" >&2; }
case "$ROUNDS" in '' | *[!0-9]* | 0) say "ROUNDS must be a positive integer (got '$ROUNDS')"; exit 2 ;; esac
case "$GENAI_ROUNDS" in '' | *[!0-9]* | 0) say "GENAI_ROUNDS must be a positive integer (got '$GENAI_ROUNDS')"; exit 2 ;; esac
cd "$ROOT"
for b in r1-fixture r1-export r1-serve r1-bench; do
  [ -x "$REL/$b" ] || { say "build the release binaries first: cargo build --release --workspace --bins --locked"; exit 2; }
done
mkdir -p "$WORK"
if [ ! -f "$CK/config.json" ]; then
  say "making the random 1.5B-shape checkpoint"
  "$REL"/r1-fixture --preset r1-distill-qwen-1.5b -o "$CK"
fi
cp -n "$R1_HOME"/tokenizer/tokenizer.json "$R1_HOME"/tokenizer/tokenizer_config.json "$CK/"
if [ ! -f "$ART/manifest.json" ]; then
  say "r1-export --precision int8-wo --target cpu"
  /usr/bin/time -f "r1-export int8-wo: %e s, peak RSS %M KB" \
    "$REL"/r1-export "$CK" -o "$ART" --precision int8-wo --target cpu --report-samples 2 --quiet
fi
# A no-op when the recorded cpu build is current (same graph, cache type, builders); rebuilt otherwise.
"$REL"/r1-export build "$ART" --target cpu --kv-cache-dtype "${KV_CACHE_DTYPE:-auto}"
python3 -c "import json,sys; c=json.load(open(sys.argv[1]))['targets']['cpu']; print('[bench-long-context] cpu graph:', c['graph'], c.get('attention_op'), 'cache', c.get('kv_cache_dtype'))" "$ART/manifest.json" >&2

say "r1-serve on $ART"
"$REL"/r1-serve --model "$ART" --grpc-addr "127.0.0.1:$GRPC_PORT" --http-addr "127.0.0.1:$HTTP_PORT" \
  --max-batch-size 8 --max-batch-tokens 8192 --prefill-chunk 8192 --skip-integrity-check --log warn &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/health" >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { say "r1-serve exited while loading"; exit 1; }
  sleep 1
done
RESULTS="$(mktemp "${TMPDIR:-/tmp}/bench-long-context.XXXXXX")"
trap 'kill -TERM $SERVER 2>/dev/null || true; rm -f "$RESULTS"' EXIT
r1_bench() { # CONTEXT: one request, its r1-bench JSON on stdout
  local prefix=()
  [ "${PREFIX_CACHE:-1}" != 0 ] && prefix=(--use-prefix-cache)
  "$REL"/r1-bench --addr "http://127.0.0.1:$GRPC_PORT" -n 1 -c 1 --prompt-tokens "$1" --max-tokens "$STEPS" --json \
    "${prefix[@]}"
}
if [ "$WARMUP" != 0 ] || [ "${PREFIX_CACHE:-1}" != 0 ]; then
  say "warm-up: one untimed request per context"
  for c in $CONTEXTS; do r1_bench "$c" >/dev/null; done
fi
for round in $(seq 1 "$ROUNDS"); do
  for c in $CONTEXTS; do
    out="$(r1_bench "$c")"
    python3 - "$c" "$round" "$out" <<'EOF' | tee -a "$RESULTS"
import json, sys
c, rnd, r = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
itl = r["itl_ms"]["p50"]
print(json.dumps({"engine": "r1-serve", "round": int(rnd), "context": int(c), "prompt_tokens": r["prompt_tokens"],
                  "decode_tok_s": round(1000.0 / itl, 2), "itl_p50_ms": round(itl, 1),
                  "ttft_p50_ms": round(r["ttft_ms"]["p50"], 0), "failed": r["failed"]}))
EOF
  done
done
curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | grep -E "^r1_kv_(preemptions|cache_capacity)" || true
kill -TERM $SERVER && wait $SERVER || true
trap 'rm -f "$RESULTS"' EXIT

if [ "${GENAI:-1}" != 0 ]; then
  [ -f "$WORK/genai-int8/genai_config.json" ] || python3 scripts/bench_genai.py build "$CK" -o "$WORK" -p int8
  say "ONNX Runtime GenAI int8 ($GENAI_ROUNDS interleaved rounds)"
  genai_contexts=""
  for _ in $(seq 1 "$GENAI_ROUNDS"); do genai_contexts="$genai_contexts $CONTEXTS"; done
  # shellcheck disable=SC2086
  python3 scripts/bench_genai.py run "$WORK/genai-int8" --context $genai_contexts | grep --line-buffered -E "context" \
    | python3 -c '
import json, re, sys
for line in sys.stdin:
    m = re.match(r"decode b1 at context (\d+): ([0-9.]+) tok/s", line)
    if m:
        print(json.dumps({"engine": "genai-int8", "context": int(m[1]), "decode_tok_s": float(m[2])}), flush=True)
    else:
        print(line.rstrip(), file=sys.stderr)
' | tee -a "$RESULTS"
fi

# Medians per engine and context, each context's median over the first context's, r1 / GenAI per context.
python3 - "$RESULTS" "$CONTEXTS" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
contexts = [int(c) for c in sys.argv[2].split()]
med = {}
for engine in dict.fromkeys(r["engine"] for r in rows):
    for c in contexts:
        xs = [r["decode_tok_s"] for r in rows if r["engine"] == engine and r["context"] == c]
        if xs:
            med[engine, c] = statistics.median(xs)
            print(json.dumps({"engine": engine, "context": c, "rounds": len(xs),
                              "decode_tok_s_median": round(med[engine, c], 2),
                              "decode_tok_s_min": min(xs), "decode_tok_s_max": max(xs)}))
    for c in contexts[1:]:
        if (engine, c) in med and (engine, contexts[0]) in med:
            # Same-round pairs (r1-serve's rows carry their round; GenAI's come in the same interleaved order).
            base = [r["decode_tok_s"] for r in rows if r["engine"] == engine and r["context"] == contexts[0]]
            this = [r["decode_tok_s"] for r in rows if r["engine"] == engine and r["context"] == c]
            pairs = [b / a for a, b in zip(base, this)]
            print(json.dumps({"engine": engine, "ratio": f"{c}/{contexts[0]}",
                              "decode_tok_s_median_ratio": round(med[engine, c] / med[engine, contexts[0]], 3),
                              "same_round_ratio_median": round(statistics.median(pairs), 3),
                              "same_round_ratios": [round(x, 3) for x in pairs]}))
for c in contexts:
    if ("r1-serve", c) in med and ("genai-int8", c) in med:
        print(json.dumps({"ratio": "r1-serve/genai-int8", "context": c,
                          "decode_tok_s_median_ratio": round(med["r1-serve", c] / med["genai-int8", c], 3)}))
EOF
