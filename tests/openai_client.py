#!/usr/bin/env python3
"""One OpenAI-API conversation with the official `openai` Python client against r1-serve (issue #6).

Starts <cargo target dir>/debug/r1-serve on tests/fixtures/arith-r1 (exported to a temporary directory with r1-export; or
--model), then through `openai.OpenAI(base_url=http://127.0.0.1:PORT/v1)`:

1. models.list() names the served model;
2. chat.completions.create (non-streaming, greedy) "What is 385+47?": reasoning_content holds the column sums
   (`5+7+0=12`, `8+4+1=13`, `3+0+1=4`, the arith-r1 think format), content is "432", finish_reason "stop",
   usage counts match;
3. the same request with stream=True: the deltas' reasoning_content and content concatenate to exactly the
   non-streaming message, and the last chunk carries finish_reason "stop";
4. a request with temperature 5 is refused with openai.BadRequestError (HTTP 400) naming `temperature`.

The client library is pinned (OPENAI_VERSION) and installed into .r1/venv (scripts/setup.sh --test-tools creates
it) when missing; run this file with any python3, it re-executes itself in that venv. Exit status 0 = pass.

Usage: python3 tests/openai_client.py [--model DIR] [--serve-bin PATH] [--export-bin PATH]
"""
import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENAI_VERSION = "3.51.0"
VENV = os.path.join(os.environ.get("R1_HOME", os.path.join(ROOT, ".r1")), "venv")
VENV_PY = os.path.join(VENV, "bin", "python")
QUESTION = "What is 385+47?"
ANSWER = "432"
THINK_LINES = ["5+7+0=12", "8+4+1=13", "3+0+1=4"]


def ensure_client():
    """Returns when openai==OPENAI_VERSION is importable here; otherwise installs it into .r1/venv when missing
    there and re-executes this script with that venv's python."""
    try:
        import openai

        if openai.__version__ == OPENAI_VERSION:
            return
    except ImportError:
        pass
    if os.environ.get("R1_OPENAI_REEXEC"):
        sys.exit(f"openai_client: openai=={OPENAI_VERSION} is still not importable with {sys.executable}")
    if not os.access(VENV_PY, os.X_OK):
        sys.exit(f"openai_client: {VENV_PY} is missing: run scripts/setup.sh --test-tools first")
    if not _venv_has_client():
        print(f"[openai_client] installing openai=={OPENAI_VERSION} into {VENV}", file=sys.stderr)
        r = subprocess.run([VENV_PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            f"openai=={OPENAI_VERSION}"])
        if r.returncode != 0:
            sys.exit(f"openai_client: pip could not install openai=={OPENAI_VERSION} into {VENV}")
    env = dict(os.environ, R1_OPENAI_REEXEC="1")
    os.execve(VENV_PY, [VENV_PY, os.path.abspath(__file__)] + sys.argv[1:], env)


def _venv_has_client():
    r = subprocess.run([VENV_PY, "-c", "import openai,sys; sys.exit(openai.__version__ != %r)" % OPENAI_VERSION],
                       capture_output=True)
    return r.returncode == 0


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"  ok: {what}", file=sys.stderr)


def run(base_url):
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60.0)
    models = [m.id for m in client.models.list().data]
    check(len(models) == 1, f"GET /v1/models lists one model: {models}")
    model = models[0]
    messages = [{"role": "user", "content": QUESTION}]

    r = client.chat.completions.create(model=model, messages=messages, max_tokens=96, temperature=0)
    msg = r.choices[0].message
    reasoning = getattr(msg, "reasoning_content", None)
    if reasoning is None and msg.model_extra:
        reasoning = msg.model_extra.get("reasoning_content")
    print(f"  reasoning_content={reasoning!r} content={msg.content!r}", file=sys.stderr)
    check(r.object == "chat.completion" and r.model == model, "non-streaming response object and model")
    check(msg.role == "assistant", "message role is assistant")
    check(msg.content.strip() == ANSWER, f"content is {ANSWER!r}")
    check(reasoning is not None and [l for l in reasoning.split("\n") if l.strip()] == THINK_LINES,
          f"reasoning_content is the column sums {THINK_LINES}")
    check(r.choices[0].finish_reason == "stop", "finish_reason is stop")
    check(r.usage is not None and r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
          and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, f"usage {r.usage}")

    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=96, temperature=0, stream=True)
    s_reasoning, s_content, finish, chunks = [], [], None, 0
    for chunk in stream:
        chunks += 1
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        extra = d.model_extra or {}
        rc = getattr(d, "reasoning_content", None) or extra.get("reasoning_content")
        if rc:
            s_reasoning.append(rc)
        if d.content:
            s_content.append(d.content)
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    check(chunks > 2, f"streamed {chunks} chunks")
    check("".join(s_content) == msg.content, "streamed content deltas concatenate to the non-streaming content")
    check("".join(s_reasoning) == reasoning, "streamed reasoning deltas concatenate to the non-streaming reasoning")
    check(finish == "stop", "the stream ends with finish_reason stop")

    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=5)
        check(False, "temperature 5 is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "temperature" in str(e), f"temperature 5 -> 400 naming the field: {e}")


def main():
    ensure_client()
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from soak import Server, StartError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="artifact directory (default: export tests/fixtures/arith-r1)")
    ap.add_argument("--serve-bin", help="r1-serve binary (default <cargo target dir>/debug/r1-serve)")
    ap.add_argument("--export-bin", help="r1-export binary (default <cargo target dir>/debug/r1-export)")
    a = ap.parse_args()
    try:
        with Server(a.serve_bin, a.export_bin, a.model) as srv:
            try:
                run(srv.url("/v1"))
            except Exception:
                print(f"openai_client: server log:\n{srv.log_text()}", file=sys.stderr)
                raise
            code = srv.stop()
            check(code == 0, f"r1-serve exits 0 on SIGTERM (got {code})")
    except StartError as e:
        sys.exit(f"openai_client: {e}")
    print(f"openai_client: PASS (openai {OPENAI_VERSION})", file=sys.stderr)


if __name__ == "__main__":
    main()
