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
4. a request with temperature 5 is refused with openai.BadRequestError (HTTP 400) naming `temperature`;
5. every field of the API (issue #19): logprobs + top_logprobs (chat) and integer logprobs (completions), n with
   seed + i per choice, presence / frequency penalties, seed, stop, max_completion_tokens, stream_options
   (a usage-only last chunk, and no usage without it), content as a list of text parts, an unknown model (404),
   response_format json_schema / json_object (the answer parses and follows the schema; the reasoning stays free);
   tools (refused by name with arith-r1's template, which renders earlier calls and tool outputs but not the tools:
   a conversation with a call and its output runs); and each field the server cannot honour (logit_bias) refused
   with a 400 naming it;
6. on a copy of the artifact whose template shows tools (as R1-0528's does): tool_choice naming a function or
   `required` forces one call, returned as `tool_calls` with arguments following the schema (also streamed whole);
   `auto` reads no call from this model's text answer.

The client library is pinned (OPENAI_VERSION) and installed into .r1/venv (scripts/setup.sh --test-tools creates
it) when missing; run this file with any python3, it re-executes itself in that venv. Exit status 0 = pass.

Usage: python3 tests/openai_client.py [--model DIR] [--serve-bin PATH] [--export-bin PATH]
"""
import json
import os
import tempfile
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
    every_field(client, model, messages, msg.content, reasoning)


def text_of(choice):
    m = choice.message
    return (getattr(m, "reasoning_content", None) or (m.model_extra or {}).get("reasoning_content") or "") + m.content


def every_field(client, model, messages, content, reasoning):
    import openai

    r = client.chat.completions.create(model=model, messages=messages, max_tokens=96, temperature=0, logprobs=True,
                                       top_logprobs=2)
    lp = r.choices[0].logprobs.content
    check(len(lp) == r.usage.completion_tokens, f"logprobs: {len(lp)} entries, one per generated token")
    check(all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token and t.logprob <= 0 for t in lp),
          "each with 2 alternatives, greedy's token first, log-probabilities <= 0")
    check(content.strip() in "".join(t.token for t in lp), "the tokens spell the answer (EOS included)")
    c = client.completions.create(model=model, prompt="Q: 7+5=", max_tokens=4, temperature=0, logprobs=3)
    clp = c.choices[0].logprobs
    check(len(clp.tokens) == len(clp.token_logprobs) == len(clp.top_logprobs) == len(clp.text_offset) == 4
          and all(len(t) <= 3 for t in clp.top_logprobs), "completions: integer logprobs in the legacy layout")

    n = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=1.0, seed=5, n=3)
    check([ch.index for ch in n.choices] == [0, 1, 2], "n = 3 gives three choices")
    alone = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=1.0, seed=6)
    check(text_of(alone.choices[0]) == text_of(n.choices[1]), "choice 1 is sampled with seed + 1")
    again = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=1.0, seed=5)
    check(text_of(again.choices[0]) == text_of(n.choices[0]), "the same seed gives the same text")

    # On a prompt it was not trained on the model is unsure enough for the penalties to change its greedy choices.
    free = dict(model=model, prompt="1 2 3 4", max_tokens=24, temperature=0)
    plain = client.completions.create(**free).choices[0].text
    pen = client.completions.create(**free, presence_penalty=2.0, frequency_penalty=2.0).choices[0].text
    check(pen != plain, f"presence/frequency penalties change greedy output: {plain!r} -> {pen!r}")

    st = client.chat.completions.create(model=model, messages=messages, max_tokens=96, temperature=0, stop=["+"])
    check(st.choices[0].finish_reason == "stop" and "+" not in text_of(st.choices[0])
          and st.usage.completion_tokens < 10, "stop ends at the first '+', which is not returned")
    mc = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=5, temperature=0)
    check(mc.usage.completion_tokens == 5 and mc.choices[0].finish_reason == "length", "max_completion_tokens")

    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    check(chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
          and all(ch.usage is None for ch in chunks[:-1]), "include_usage: a last chunk with no choices carries usage")
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    check(all(ch.usage is None for ch in chunks), "without include_usage no chunk carries usage")

    parts = client.chat.completions.create(model=model, max_tokens=96, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is 385"}, {"type": "text", "text": "+47?"}]}])
    check(parts.choices[0].message.content == content, "content as text parts reads as the joined string")

    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
        check(False, "an unknown model is refused")
    except openai.NotFoundError as e:
        check(e.status_code == 404 and "no-such-model" in str(e), "an unknown model -> 404 naming it")
    # Bounded, so that this small model (never trained to write JSON) cannot go on writing digits.
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 9999}},
              "required": ["answer"], "additionalProperties": False}
    js = client.chat.completions.create(model=model, messages=messages, max_tokens=160, temperature=0,
                                        response_format={"type": "json_schema",
                                                         "json_schema": {"name": "sum", "schema": schema}})
    value = json.loads(js.choices[0].message.content)
    check(set(value) == {"answer"} and 0 <= value["answer"] <= 9999 and js.choices[0].finish_reason == "stop",
          f"json_schema: the answer {js.choices[0].message.content!r} parses and follows the schema")
    check(text_of(js.choices[0]).startswith(reasoning.split("\n")[0]), "the reasoning before it stays free text")
    jo = client.chat.completions.create(model=model, messages=messages, max_tokens=64, temperature=0,
                                        response_format={"type": "json_object"})
    jc = jo.choices[0]
    # This model writes an endless key; a JSON object it is, cut by max_tokens (a finished one would parse).
    check(jc.message.content.startswith("{") and (jc.finish_reason == "length" or
                                                  isinstance(json.loads(jc.message.content), dict)),
          f"json_object: the answer is a JSON object ({jc.finish_reason}): {jc.message.content[:40]!r}")
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=2, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})
        check(False, "an invalid schema is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.param == "response_format", f"an invalid schema -> 400 naming it: {e}")
    # Tools: R1's released template (arith-r1's) renders earlier calls and tool outputs, not the tools themselves, so
    # offering tools is refused naming the field; a conversation with a call and its output runs.
    add = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    history = messages + [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 385, "b": 47}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "432"}]
    h = client.chat.completions.create(model=model, messages=history, max_tokens=8, temperature=0)
    check(h.usage.prompt_tokens > r.usage.prompt_tokens + 10, "an assistant tool call and the tool's output are rendered")
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=2, tools=[add])
        check(False, "tools are refused with a template that cannot show them")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.param == "tools" and "template" in str(e), f"tools -> 400 naming it: {e}")
    for field, kw in [("tool_choice", {"tool_choice": "required"}), ("logit_bias", {"logit_bias": {"5": 10}})]:
        # (tool_choice without tools has nothing to choose from.)
        try:
            client.chat.completions.create(model=model, messages=messages, max_tokens=2, **kw)
            check(False, f"{field} is refused")
        except openai.BadRequestError as e:
            check(e.status_code == 400 and e.param == field, f"{field} -> 400 naming it")


def tool_calls(base_url):
    """Against an artifact whose template shows tools: a named `tool_choice` and `required` force one call, which comes
    back as `tool_calls` with JSON arguments following the tool's parameters (streamed whole); `auto` reads none from
    this model, which answers in text; the reasoning stays out of the calls."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60.0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": QUESTION}]
    num = {"type": "integer", "minimum": 0, "maximum": 9999}
    add = {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
        "type": "object", "properties": {"a": num, "b": num}, "required": ["a", "b"], "additionalProperties": False}}}
    mul = {"type": "function", "function": {"name": "mul", "parameters": {"type": "object"}}}
    for choice in ({"type": "function", "function": {"name": "add"}}, "required"):
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=120, temperature=0,
                                           tools=[add, mul], tool_choice=choice)
        c = r.choices[0]
        calls = c.message.tool_calls or []
        check(c.finish_reason == "tool_calls" and len(calls) == 1 and calls[0].type == "function"
              and calls[0].id, f"tool_choice {choice}: one call, finish_reason tool_calls ({c.finish_reason})")
        if choice != "required":
            args = json.loads(calls[0].function.arguments)
            check(calls[0].function.name == "add" and set(args) == {"a", "b"} and all(isinstance(v, int) for v in
                  args.values()), f"the call is add with integer a and b: {calls[0].function.arguments}")
        extra = c.message.model_extra or {}
        rc = getattr(c.message, "reasoning_content", None) or extra.get("reasoning_content") or ""
        check(rc.strip() and "tool" not in rc, "the reasoning comes before the call and stays out of it")
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=120, temperature=0,
                                                 tools=[add], tool_choice={"type": "function",
                                                                           "function": {"name": "add"}}, stream=True))
    streamed = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    check(len(streamed) == 1 and streamed[0].function.name == "add" and "tool" not in text,
          "streamed: the call arrives whole as tool_calls, never as text")
    auto = client.chat.completions.create(model=model, messages=messages, max_tokens=96, temperature=0, tools=[add])
    ac = auto.choices[0]
    check(not ac.message.tool_calls and ac.finish_reason in ("stop", "length") and "tool" not in (ac.message.content or ""),
          f"tool_choice auto: this model (never trained to call) answers in text, no call is read: {ac.message.content!r}")
    try:
        client.chat.completions.create(model=model, messages=messages, max_tokens=2, tools=[add],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
        check(False, "a tool_choice naming no tool is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.param == "tool_choice", "a tool_choice naming no tool -> 400 naming it")


def main():
    ensure_client()
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from soak import Server, StartError, client_test_args, run_logged, tools_template_artifact

    a = client_test_args(__doc__)
    try:
        with Server(a.serve_bin, a.export_bin, a.model) as srv:
            run_logged(srv, "openai_client", run, srv.url("/v1"))
            code = srv.stop()
            check(code == 0, f"r1-serve exits 0 on SIGTERM (got {code})")
            with tempfile.TemporaryDirectory(prefix="r1-tools-") as tmp:
                art = tools_template_artifact(srv.model, os.path.join(tmp, "arith-r1-tools"))
                with Server(a.serve_bin, a.export_bin, art, extra_args=["--skip-integrity-check"]) as tsrv:
                    run_logged(tsrv, "openai_client", tool_calls, tsrv.url("/v1"))
    except StartError as e:
        sys.exit(f"openai_client: {e}")
    print(f"openai_client: PASS (openai {OPENAI_VERSION})", file=sys.stderr)


if __name__ == "__main__":
    main()
