#!/usr/bin/env python3
"""The gRPC API from another language: a Python grpcio client built from proto/r1/v1/generate.proto (issue #19).

Starts <cargo target dir>/debug/r1-serve on tests/fixtures/arith-r1 (exported to a temporary directory with
r1-export; or --model), generates Python stubs from the committed .proto with grpcio-tools, and checks through them:

1. ModelInfo reports the default sampling settings and the EOS ids;
2. logprobs + top_logprobs: one entry per generated token, alternatives most likely first, greedy picks the first
   alternative, token bytes decode to the token text;
3. n: `n` choices, choice i sampled with seed + i (equal to a request with that seed alone), the stream tags each
   message with its choice and the deltas of each choice concatenate to the unary result;
4. prompt_token_ids: the prompt's ids (the model's own tokenizer, `tokenizers` from PyPI) give the same tokens and
   usage as the text prompt; an id beyond the vocabulary is INVALID_ARGUMENT naming the field;
5. presence / frequency penalties change greedy output, and out-of-range values are INVALID_ARGUMENT naming them;
6. top_logprobs without logprobs is refused by name;
7. response_format: a JSON schema constrains the answer (it parses and follows the schema); bad schemas are refused;
8. tools: refused by name with arith-r1's template (it does not render them); a call and its output in the history run;
   on a copy of the artifact whose template shows tools, tool_choice naming a tool forces one call in `tool_calls`.

grpcio, grpcio-tools and tokenizers are pinned below and installed into .r1/grpc-venv (created when missing); run
this file with any python3, it re-executes itself in that venv. Exit status 0 = pass.

Usage: python3 tests/grpc_client.py [--model DIR] [--serve-bin PATH] [--export-bin PATH]
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINS = ["grpcio==1.85.4", "grpcio-tools==1.85.4", "tokenizers==0.23.3"]
VENV = os.path.join(os.environ.get("R1_HOME", os.path.join(ROOT, ".r1")), "grpc-venv")
VENV_PY = os.path.join(VENV, "bin", "python")
QUESTION = "What is 385+47?"


def ensure_venv():
    """Re-executes this script in .r1/grpc-venv with the pinned packages (creating and filling it when needed)."""
    if os.environ.get("R1_GRPC_REEXEC"):
        return
    check = [VENV_PY, "-c", "import importlib.metadata as m, sys; sys.exit(any(m.version(p.split('==')[0]) != "
             "p.split('==')[1] for p in sys.argv[1:]))"] + PINS
    if not (os.access(VENV_PY, os.X_OK) and subprocess.run(check, capture_output=True).returncode == 0):
        print(f"[grpc_client] installing {' '.join(PINS)} into {VENV}", file=sys.stderr)
        if not os.access(VENV_PY, os.X_OK):
            subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        r = subprocess.run([VENV_PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"] + PINS)
        if r.returncode != 0:
            sys.exit(f"grpc_client: pip could not install {PINS} into {VENV}")
    env = dict(os.environ, R1_GRPC_REEXEC="1")
    os.execve(VENV_PY, [VENV_PY, os.path.abspath(__file__)] + sys.argv[1:], env)


def stubs(out_dir):
    """Compiles proto/r1/v1/generate.proto into out_dir and imports it."""
    from grpc_tools import protoc

    proto_root = os.path.join(ROOT, "proto")
    rc = protoc.main(["protoc", f"-I{proto_root}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                      os.path.join(proto_root, "r1", "v1", "generate.proto")])
    if rc != 0:
        sys.exit(f"grpc_client: protoc failed on generate.proto (exit {rc})")
    sys.path.insert(0, out_dir)
    from r1.v1 import generate_pb2, generate_pb2_grpc

    return generate_pb2, generate_pb2_grpc


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"  ok: {what}", file=sys.stderr)


def refused(call, field):
    import grpc

    try:
        call()
    except grpc.RpcError as e:
        return e.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.details(), e.details()
    return False, "accepted"


def run(pb, rpc, addr, model_dir):
    import grpc
    from tokenizers import Tokenizer

    stub = rpc.GenerationStub(grpc.insecure_channel(addr))
    info = stub.ModelInfo(pb.ModelInfoRequest())
    check(info.HasField("default_sampling") and info.default_sampling.HasField("temperature"),
          f"ModelInfo reports the default sampling: {info.default_sampling}".replace("\n", " "))
    check(len(info.eos_token_ids) > 0, f"ModelInfo reports the EOS ids {list(info.eos_token_ids)}")

    chat = [pb.ChatMessage(role="user", content=QUESTION)]
    greedy = pb.SamplingParams(temperature=0.0)
    r = stub.Generate(pb.GenerateRequest(messages=chat, max_tokens=64, sampling=greedy, logprobs=True,
                                         top_logprobs=3))
    check(r.text.strip() == "432", f"greedy answer {r.text!r}")
    lps = r.logprobs
    check(len(lps) == len(r.token_ids) == r.usage.completion_tokens, f"{len(lps)} logprobs, one per token")
    for lp, tid in zip(lps, r.token_ids):
        tops = [t.logprob for t in lp.top_logprobs]
        assert lp.token_id == tid and len(tops) == 3, lp
        assert tops == sorted(tops, reverse=True), tops
        assert lp.top_logprobs[0].token_id == tid, "greedy takes the most likely token"
        assert abs(lp.logprob - tops[0]) < 1e-6 and lp.logprob <= 0.0, lp
        assert lp.bytes.decode("utf-8", "replace") == lp.token, lp
    check(True, "each token: 3 alternatives, most likely first, greedy = the first, bytes decode to the text")

    sampled = pb.SamplingParams(temperature=1.0, seed=11)
    req = pb.GenerateRequest(messages=chat, max_tokens=24, sampling=sampled, n=3)
    r3 = stub.Generate(req)
    check(len(r3.choices) == 3 and [c.index for c in r3.choices] == [0, 1, 2], "n = 3 gives choices 0, 1, 2")
    for i in (0, 2):
        one = stub.Generate(pb.GenerateRequest(messages=chat, max_tokens=24,
                                               sampling=pb.SamplingParams(temperature=1.0, seed=11 + i)))
        check(list(one.token_ids) == list(r3.choices[i].token_ids), f"choice {i} equals a request with seed 11+{i}")
    check(r3.usage.completion_tokens == sum(len(c.token_ids) for c in r3.choices), "usage sums the choices")
    texts = {}
    for m in stub.GenerateStream(req):
        texts.setdefault(m.index, []).append(m.text)
    check(sorted(texts) == [0, 1, 2], "the stream tags messages with choices 0, 1, 2")
    check(all("".join(texts[i]) == r3.choices[i].text for i in range(3)),
          "each choice's streamed deltas concatenate to its unary text")

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    prompt = "Q: What is 12+30?\nA:"
    ids = tok.encode(prompt, add_special_tokens=True).ids
    by_text = stub.Generate(pb.GenerateRequest(prompt=prompt, max_tokens=12, sampling=greedy))
    by_ids = stub.Generate(pb.GenerateRequest(prompt_token_ids=ids, max_tokens=12, sampling=greedy))
    check(list(by_ids.token_ids) == list(by_text.token_ids) and by_ids.usage.prompt_tokens == len(ids),
          f"prompt_token_ids ({len(ids)} ids) give the text prompt's tokens")
    ok, msg = refused(lambda: stub.Generate(pb.GenerateRequest(prompt_token_ids=[10 ** 7], max_tokens=2)),
                      "prompt_token_ids")
    check(ok, f"an id beyond the vocabulary is refused naming prompt_token_ids: {msg}")

    # On a prompt it was not trained on the model is unsure enough for the penalties to change its greedy choices.
    plain = stub.Generate(pb.GenerateRequest(prompt="1 2 3 4", max_tokens=24, sampling=greedy))
    pen = stub.Generate(pb.GenerateRequest(prompt="1 2 3 4", max_tokens=24, sampling=pb.SamplingParams(
        temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)))
    check(list(pen.token_ids) != list(plain.token_ids), "presence/frequency penalties change greedy output")
    for field in ("presence_penalty", "frequency_penalty"):
        ok, msg = refused(lambda: stub.Generate(pb.GenerateRequest(
            messages=chat, max_tokens=2, sampling=pb.SamplingParams(**{field: 2.5}))), f"sampling.{field}")
        check(ok, f"{field} 2.5 is refused by name: {msg}")
    ok, msg = refused(lambda: stub.Generate(pb.GenerateRequest(messages=chat, max_tokens=2, top_logprobs=2)),
                      "top_logprobs")
    check(ok, f"top_logprobs without logprobs is refused by name: {msg}")
    ok, msg = refused(lambda: stub.Generate(pb.GenerateRequest(messages=chat, max_tokens=2, n=17)), "n")
    check(ok, f"n = 17 is refused by name: {msg}")

    schema = '{"type": "object", "properties": {"answer": {"type": "integer", "maximum": 9999}}, "required": ["answer"]}'
    fmt = pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=schema)
    js = stub.Generate(pb.GenerateRequest(messages=chat, max_tokens=160, sampling=greedy, response_format=fmt))
    value = json.loads(js.text)
    check(isinstance(value.get("answer"), int), f"response_format json_schema: the answer {js.text!r} follows it")
    bad = pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA, json_schema="{not json")
    ok, msg = refused(lambda: stub.Generate(pb.GenerateRequest(messages=chat, max_tokens=2, response_format=bad)),
                      "response_format.json_schema")
    check(ok, f"a schema that is not JSON is refused by name: {msg}")

    tools = '[{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]'
    ok, msg = refused(lambda: stub.Generate(pb.GenerateRequest(messages=chat, max_tokens=2, tools_json=tools)), "tools")
    check(ok, f"tools with a template that cannot show them are refused by name: {msg}")
    call = pb.ToolCall(id="c1", name="add", arguments='{"a": 385, "b": 47}')
    history = list(chat) + [pb.ChatMessage(role="assistant", tool_calls=[call]),
                            pb.ChatMessage(role="tool", tool_call_id="c1", content="432")]
    h = stub.Generate(pb.GenerateRequest(messages=history, max_tokens=4, sampling=greedy))
    check(h.usage.prompt_tokens > r.usage.prompt_tokens + 10, "an assistant tool call and its output are rendered")


def forced_calls(pb, rpc, addr):
    """Against an artifact whose template shows tools: tool_choice naming a tool forces one call, returned in
    `tool_calls` (unary) and on the stream's last message, with arguments following the tool's parameters."""
    import grpc

    stub = rpc.GenerationStub(grpc.insecure_channel(addr))
    num = {"type": "integer", "minimum": 0, "maximum": 9999}
    tools = json.dumps([{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": num, "b": num}, "required": ["a", "b"], "additionalProperties": False}}}])
    req = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=QUESTION)], max_tokens=120,
                             sampling=pb.SamplingParams(temperature=0.0), tools_json=tools, tool_choice="add")
    r = stub.Generate(req)
    check(len(r.tool_calls) == 1 and r.tool_calls[0].name == "add"
          and set(json.loads(r.tool_calls[0].arguments)) == {"a", "b"}, f"a forced call to add: {r.tool_calls}")
    last = list(stub.GenerateStream(req))[-1]
    check([c.name for c in last.tool_calls] == ["add"], "the stream's last message carries the call")


def main():
    ensure_venv()
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from soak import Server, StartError, client_test_args, run_logged, tools_template_artifact

    a = client_test_args(__doc__)
    with tempfile.TemporaryDirectory(prefix="r1-grpc-stubs-") as out:
        pb, rpc = stubs(out)
        try:
            with Server(a.serve_bin, a.export_bin, a.model) as srv:
                run_logged(srv, "grpc_client", run, pb, rpc, f"127.0.0.1:{srv.grpc_port}", srv.model)
                check(srv.stop() == 0, "r1-serve exits 0 on SIGTERM")
                art = tools_template_artifact(srv.model, os.path.join(out, "arith-r1-tools"))
                with Server(a.serve_bin, a.export_bin, art, extra_args=["--skip-integrity-check"]) as tsrv:
                    run_logged(tsrv, "grpc_client", forced_calls, pb, rpc, f"127.0.0.1:{tsrv.grpc_port}")
        except StartError as e:
            sys.exit(f"grpc_client: {e}")
    print(f"grpc_client: PASS ({', '.join(PINS)})", file=sys.stderr)


if __name__ == "__main__":
    main()
