#!/usr/bin/env python3
"""Bounded load/soak of r1-serve on loopback (issue #8): N GenerateStream requests at concurrency C, with the
server's resident memory sampled every half second.

Starts <cargo target dir>/debug/r1-serve (or --serve-bin) on an artifact (--model, or tests/fixtures/arith-r1 exported into a
temporary directory with r1-export), waits for GET /health, runs r1-bench against the gRPC port while sampling
VmRSS from /proc/PID/status, then checks and reports:

* zero unexpected errors: every request completed (r1-bench's failed count is 0) and the server's own
  r1_requests_total counts exactly that many gRPC requests, all with outcome "ok"; no panic in the server log;
  /health still 200 after the load; SIGTERM exits 0;
* RSS flat: the resident-memory *floor* does not grow by more than --max-rss-growth (10%) between the baseline
  and the end of the run. A floor is the smallest sample in a window (--rss-window-s, 10 s): a batch's prefill
  allocates and frees large activation buffers, which shows as one-sample spikes of up to +30% (measured: an idle
  floor of 350 MiB with spikes to 476 MiB, returning to 350 MiB); a leak raises the floor, a spike does not. The
  measured pass follows a warm-up pass (--warmup, 4 x concurrency requests; not sampled) so the allocators have seen
  every batch shape. The baseline window starts at --baseline-s (120 s: "the second minute"); a measured pass
  shorter than baseline-s + 2 windows (e.g. --short) compares the floors of its first and last quarters, and
  when that exceeds the limit, fails only if the floor is still rising over its last two quarters (by more than a
  quarter of the limit): a leak grows all the time, the allocator's one-off steps (~+5%) do not;
* requests/s and request-latency p50/p99 (r1-bench's figures; TTFT and inter-token latency too).

Full run: python3 scripts/soak.py            (256 warm-up + 2,000 requests at concurrency 64; minutes)
CI run:   python3 scripts/soak.py --short    (64 warm-up + 200 requests at concurrency 16)
Exit status: 0 when every check passes, 1 when one fails, 2 on a usage or start-up error.

The Server class is also used by tests/openai_client.py. Standard library only.
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "arith-r1")


class StartError(Exception):
    """The server (or the export before it) could not be started."""


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5.0):
    """(status, body) of a GET; status 0 when the connection failed."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


def sse_events(resp):
    """The JSON events of a server-sent-events HTTP response (`data: {...}` lines), up to `data: [DONE]`."""
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def rss_kib(pid):
    """VmRSS of a process in KiB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cargo_bin_dir(profile="debug"):
    """<target dir>/<profile> of this workspace as cargo reports it (honours CARGO_TARGET_DIR and .cargo/config.toml);
    <repo>/target/<profile> when cargo cannot be asked."""
    try:
        meta = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
        return os.path.join(json.loads(meta)["target_directory"], profile)
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError):
        return os.path.join(ROOT, "target", profile)


def tools_template_artifact(model_dir, out_dir):
    """A copy of the artifact `model_dir` (links to its weights) in `out_dir` whose chat template also shows the
    request's `tools` to the model, as DeepSeek-R1-0528's template does (R1's released one renders earlier calls and
    tool outputs only). Serve it with --skip-integrity-check (its tokenizer_config.json differs from the manifest's)."""
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(model_dir):
        src = os.path.abspath(os.path.join(model_dir, name))
        if name != "tokenizer_config.json":
            os.symlink(src, os.path.join(out_dir, name))
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    anchor = "{{ bos_token }}{{ ns.system_prompt }}"
    if anchor not in cfg["chat_template"]:
        raise StartError(f"{model_dir}: the chat template is not R1's (no {anchor!r} to add the tools after)")
    tools = ("{% if tools %}\n\n## Tools\nCall a tool in the tool-call format.\n{% for t in tools %}### "
             "{{ t.function.name }}\n{{ t.function.parameters | tojson }}\n{% endfor %}{% endif %}")
    cfg["chat_template"] = cfg["chat_template"].replace(anchor, anchor + tools)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return out_dir


def run_logged(srv, who, fn, *args):
    """fn(*args) against `srv`; when it raises, the server's log is printed (headed by `who`) before the error."""
    try:
        return fn(*args)
    except Exception:
        print(f"{who}: server log:\n{srv.log_text()}", file=sys.stderr)
        raise


def client_test_args(doc):
    """Command line of the client tests (tests/openai_client.py, tests/grpc_client.py): --model, --serve-bin,
    --export-bin."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--model", help="artifact directory (default: export tests/fixtures/arith-r1)")
    ap.add_argument("--serve-bin", help="r1-serve binary (default <cargo target dir>/debug/r1-serve)")
    ap.add_argument("--export-bin", help="r1-export binary (default <cargo target dir>/debug/r1-export)")
    return ap.parse_args()


class Server:
    """r1-serve on two free loopback ports, exporting arith-r1 first when no model is given."""

    def __init__(self, serve_bin=None, export_bin=None, model=None, backend="ort", extra_args=(), log_path=None):
        self.serve_bin = serve_bin or os.path.join(cargo_bin_dir(), "r1-serve")
        self.export_bin = export_bin or os.path.join(cargo_bin_dir(), "r1-export")
        self.model = model
        self.backend = backend
        self.extra_args = list(extra_args)
        self.log_path = log_path
        self.tmp = None
        self.proc = None
        self.log = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.log:
            self.log.close()
        if self.tmp:
            self.tmp.cleanup()

    def start(self, health_timeout_s=120.0):
        for b in (self.serve_bin,) + (() if self.model else (self.export_bin,)):
            if not os.access(b, os.X_OK):
                raise StartError(f"{b} is not an executable: build it with `cargo build --workspace --bins --locked`")
        self.tmp = tempfile.TemporaryDirectory(prefix="r1-soak-")
        if not self.model:
            self.model = os.path.join(self.tmp.name, "arith-r1")
            t0 = time.monotonic()
            r = subprocess.run([self.export_bin, FIXTURE, "-o", self.model, "--quiet"], capture_output=True, text=True)
            if r.returncode != 0:
                raise StartError(f"r1-export {FIXTURE} failed (exit {r.returncode}): {r.stderr.strip()}")
            print(f"[server] exported arith-r1 in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        self.grpc_port, self.http_port = free_port(), free_port()
        while self.http_port == self.grpc_port:
            self.http_port = free_port()
        self.log_path = self.log_path or os.path.join(self.tmp.name, "serve.log")
        self.log = open(self.log_path, "w")
        env = dict(os.environ)
        env.setdefault("R1_HOME", os.path.join(ROOT, ".r1"))
        cmd = [self.serve_bin, "--model", self.model, "--backend", self.backend,
               "--grpc-addr", f"127.0.0.1:{self.grpc_port}", "--http-addr", f"127.0.0.1:{self.http_port}"] + self.extra_args
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + health_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartError(f"r1-serve exited with {self.proc.returncode} during start; log:\n{self.log_text()}")
            if http_get(self.url("/health"), timeout=2.0)[0] == 200:
                print(f"[server] r1-serve pid {self.proc.pid} healthy: grpc {self.grpc_port}, http {self.http_port}",
                      file=sys.stderr)
                return
            time.sleep(0.25)
        raise StartError(f"r1-serve was not healthy within {health_timeout_s:.0f} s; log:\n{self.log_text()}")

    def url(self, path):
        return f"http://127.0.0.1:{self.http_port}{path}"

    @property
    def grpc_url(self):
        return f"http://127.0.0.1:{self.grpc_port}"

    def log_text(self):
        if self.log:
            self.log.flush()
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self, timeout_s=60.0):
        """SIGTERM and wait; returns the exit status (None if it had to be killed)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def request_counts(metrics_text):
    """{(api, outcome): count} from r1_requests_total lines of the Prometheus text."""
    counts = {}
    for line in metrics_text.splitlines():
        if not line.startswith("r1_requests_total{"):
            continue
        m = re.match(r'r1_requests_total\{([^}]*)\}\s+([0-9.eE+]+)', line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        counts[(labels.get("api", ""), labels.get("outcome", ""))] = int(float(m.group(2)))
    return counts


class RssSampler(threading.Thread):
    """Samples a process's VmRSS once a second: [(seconds since start, KiB)]."""

    def __init__(self, pid, interval_s=1.0):
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.samples = []
        self.stop_event = threading.Event()

    def run(self):
        t0 = time.monotonic()
        while not self.stop_event.is_set():
            kib = rss_kib(self.pid)
            if kib is None:
                return
            self.samples.append((time.monotonic() - t0, kib))
            self.stop_event.wait(self.interval_s)


def rss_floor(samples, lo, hi):
    """Smallest KiB sample with lo <= t <= hi (the nearest sample after lo when none falls inside)."""
    inside = [kib for t, kib in samples if lo <= t <= hi]
    return min(inside) if inside else next(kib for t, kib in samples if t >= lo)


def rss_verdict(samples, baseline_s, max_growth, window_s):
    """(ok, dict of figures) for the RSS-flat check: floor of the baseline window vs floor of the last window."""
    if len(samples) < 4:
        return False, {"error": f"only {len(samples)} RSS samples; the run was too short to judge"}
    duration = samples[-1][0]
    if duration >= baseline_s + 2 * window_s:
        at, window = baseline_s, window_s
        rule = f"floor of [{at:.0f}, {at + window:.0f}] s vs floor of the last {window:.0f} s"
    else:
        at, window = 0.0, duration / 4
        rule = (f"floor of the first vs the last quarter ({window:.1f} s each) of the measured pass "
                f"(run shorter than {baseline_s + 2 * window_s:.0f} s)")
    base = rss_floor(samples, at, at + window)
    end = rss_floor(samples, duration - window, duration)
    growth = (end - base) / base
    ok = growth <= max_growth
    if not ok and at == 0.0:
        # A short pass cannot tell a leak from the allocator's one-off steps (~+5% each, seen here one run in
        # five) by two windows alone. A leak grows all the time: over the last two quarters a linear leak of
        # more than max_growth over the pass still grows by more than a third of it. One-off steps earlier on
        # are forgiven; growth that is still going on at the end is not.
        third = rss_floor(samples, duration - 2 * window, duration - window)
        late = (end - third) / third
        rule += f"; still growing over the last two quarters: {100 * late:+.2f}%"
        ok = late <= max_growth / 4
    fig = {
        "rss_rule": rule,
        "rss_baseline_floor_mib": round(base / 1024, 1),
        "rss_end_floor_mib": round(end / 1024, 1),
        "rss_peak_mib": round(max(k for _, k in samples) / 1024, 1),
        "rss_start_mib": round(samples[0][1] / 1024, 1),
        "rss_growth_pct": round(100 * growth, 2),
        "rss_samples": len(samples),
    }
    return ok, fig


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true", help="CI variant: 200 requests at concurrency 16")
    ap.add_argument("-n", "--requests", type=int, help="requests in total (default 2000, --short 200)")
    ap.add_argument("-c", "--concurrency", type=int, help="requests in flight (default 64, --short 16)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request (ignore_eos; default 16)")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="approximate prompt length (default 16)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    ap.add_argument("--model", help="artifact directory (default: export tests/fixtures/arith-r1 to a temp dir)")
    ap.add_argument("--backend", default="ort", help="r1-serve --backend (default ort)")
    ap.add_argument("--serve-bin", help="r1-serve binary (default <cargo target dir>/debug/r1-serve)")
    ap.add_argument("--bench-bin", help="r1-bench binary (default <cargo target dir>/debug/r1-bench)")
    ap.add_argument("--export-bin", help="r1-export binary (default <cargo target dir>/debug/r1-export)")
    ap.add_argument("--warmup", type=int, help="requests run before RSS sampling starts (default 4 x concurrency)")
    ap.add_argument("--baseline-s", type=float, default=120.0, help="start of the RSS baseline window in seconds (default 120)")
    ap.add_argument("--rss-window-s", type=float, default=10.0, help="width of the RSS floor windows (default 10 s)")
    ap.add_argument("--max-rss-growth", type=float, default=0.10, help="largest allowed RSS growth (default 0.10)")
    ap.add_argument("--json-out", help="also write the figures to this JSON file")
    a = ap.parse_args()
    requests = a.requests or (200 if a.short else 2000)
    concurrency = a.concurrency or (16 if a.short else 64)
    warmup = a.warmup if a.warmup is not None else 4 * concurrency
    bench_bin = a.bench_bin or os.path.join(cargo_bin_dir(), "r1-bench")
    if not os.access(bench_bin, os.X_OK):
        print(f"soak: {bench_bin} is not an executable: build it with `cargo build --workspace --bins --locked`", file=sys.stderr)
        return 2
    failures = []
    # Queue room for every client: the scheduler runs --max-batch-size sequences and queues the rest.
    extra = ["--max-queue", str(max(128, concurrency)), "--max-concurrent-requests", str(max(256, 2 * concurrency))]
    try:
        with Server(a.serve_bin, a.export_bin, a.model, a.backend, extra) as srv:
            def bench_cmd(n):
                return [bench_bin, "--addr", srv.grpc_url, "-n", str(n), "-c", str(concurrency),
                        "--max-tokens", str(a.max_tokens), "--prompt-tokens", str(a.prompt_tokens),
                        "--temperature", str(a.temperature), "--json"]
            if warmup:
                print(f"[soak] warm-up: {' '.join(bench_cmd(warmup)[1:])}", file=sys.stderr)
                warm = subprocess.run(bench_cmd(warmup), capture_output=True, text=True)
                if warm.returncode != 0:
                    failures.append(f"the warm-up pass failed (r1-bench exit {warm.returncode}): "
                                    f"{(warm.stdout + warm.stderr).strip()[-2000:]}")
            sampler = RssSampler(srv.proc.pid, interval_s=0.5)
            sampler.start()
            cmd = bench_cmd(requests)
            print(f"[soak] {' '.join(cmd[1:])}", file=sys.stderr)
            t0 = time.monotonic()
            bench = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.monotonic() - t0
            sampler.stop_event.set()
            sampler.join()
            try:
                report = json.loads(bench.stdout)
            except json.JSONDecodeError:
                print(f"soak: r1-bench exited {bench.returncode} without a JSON report:\n{bench.stdout}{bench.stderr}",
                      file=sys.stderr)
                srv.stop()
                return 1
            if report["failed"] or report["ok"] != requests:
                failures.append(f"{report['failed']} of {requests} requests failed (ok {report['ok']}); "
                                f"first error: {report.get('first_error')}")
            status, metrics = http_get(srv.url("/metrics"))
            counts = request_counts(metrics) if status == 200 else {}
            unexpected = {f"{api}/{outcome}": n for (api, outcome), n in counts.items() if outcome != "ok" and n}
            if status != 200:
                failures.append(f"GET /metrics answered {status}")
            elif counts.get(("grpc", "ok"), 0) != requests + warmup or unexpected:
                failures.append(f"server counted {counts.get(('grpc', 'ok'), 0)} ok gRPC requests of "
                                f"{requests} + {warmup} warm-up; "
                                f"other outcomes: {unexpected or 'none'}")
            if http_get(srv.url("/health"))[0] != 200:
                failures.append("GET /health is not 200 after the load")
            rss_ok, rss = rss_verdict(sampler.samples, a.baseline_s, a.max_rss_growth, a.rss_window_s)
            if not rss_ok:
                failures.append(f"RSS not flat: {rss}")
            code = srv.stop()
            if code != 0:
                failures.append(f"r1-serve exited with {code} after SIGTERM (expected 0)")
            log = srv.log_text()
            if "panicked" in log:
                failures.append("the server log has a panic:\n" + "\n".join(l for l in log.splitlines() if "panicked" in l))
    except StartError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    figures = {
        "requests": requests,
        "warmup_requests": warmup,
        "concurrency": concurrency,
        "max_tokens": a.max_tokens,
        "prompt_tokens": a.prompt_tokens,
        "ok": report["ok"],
        "failed": report["failed"],
        "server_outcomes": {f"{k[0]}/{k[1]}": v for k, v in sorted(counts.items())},
        "wall_s": round(wall, 2),
        "requests_per_s": round(report["requests_per_s"], 2),
        "tokens_per_s": round(report["tokens_per_s"], 1),
        "latency_ms": report["latency_ms"],
        "ttft_ms": report["ttft_ms"],
        "itl_ms": report["itl_ms"],
        **rss,
        "passed": not failures,
    }
    print(json.dumps(figures, indent=2))
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(figures, f, indent=2)
    for f in failures:
        print(f"soak: FAIL: {f}", file=sys.stderr)
    if not failures:
        print(f"soak: PASS: {requests} requests at concurrency {concurrency}, 0 errors, "
              f"{figures['requests_per_s']} req/s, p50 {report['latency_ms']['p50']:.0f} ms, "
              f"p99 {report['latency_ms']['p99']:.0f} ms, RSS floor {rss['rss_baseline_floor_mib']} -> {rss['rss_end_floor_mib']} MiB "
              f"({rss['rss_growth_pct']:+.1f}%)", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
