#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into SEEDS_DIR/<target>/ (default fuzz/target/seeds, ignored by git).

The committed corpora (fuzz/corpus/<target>/) are these seeds plus what libFuzzer found, minimized with
`cargo fuzz cmin`; run this again only to start a corpus over. Seeds are valid inputs taken from the repository's
fixtures (golden checkpoints' config.json, an exported manifest, the arith-r1 prompt format) and small variations
that hit each parser's error paths. Standard library only.

Usage: python3 fuzz/make_seeds.py [SEEDS_DIR]
"""
import copy
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "golden")


def write(out, target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    elif not isinstance(data, (bytes, bytearray)):
        data = json.dumps(data, ensure_ascii=False).encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def config_seeds(out):
    family_of = {"qwen2": "config_qwen2", "llama": "config_llama", "qwen3": "config_qwen3", "deepseek": "config_deepseek_v3"}
    configs = {}
    for case in sorted(os.listdir(GOLDEN)):
        p = os.path.join(GOLDEN, case, "config.json")
        if not os.path.isfile(p):
            continue
        target = next(t for k, t in family_of.items() if case.startswith(k))
        cfg = load(p)
        write(out, target, case + ".json", cfg)
        configs.setdefault(target, cfg)
    arith = load(os.path.join(ROOT, "tests", "fixtures", "arith-r1", "config.json"))
    write(out, "config_deepseek_v3", "arith-r1.json", arith)
    for target, cfg in configs.items():
        variants = {
            "zero_layers": {"num_hidden_layers": 0},
            "huge_dims": {"hidden_size": 2**62, "num_attention_heads": 2, "num_hidden_layers": 2**40},
            "heads_not_dividing": {"num_key_value_heads": 3},
            "neg_eps": {"rms_norm_eps": -1.0},
            "string_hidden": {"hidden_size": "64"},
            "rope_linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
            "rope_yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
            "rope_llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
            "rope_theta_zero": {"rope_theta": 0.0, "rope_parameters": {"rope_theta": 0.0, "rope_type": "default"}},
            "head_dim_odd": {"head_dim": 7},
            "sliding": {"use_sliding_window": True},
            "act_gelu": {"hidden_act": "gelu"},
        }
        if target == "config_deepseek_v3":
            variants.update({
                "no_qlora": {"q_lora_rank": None},
                "fp8": {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                                "activation_scheme": "dynamic"}},
                "experts_gt": {"num_experts_per_tok": 100},
                "groups_bad": {"n_group": 3, "topk_group": 5},
                "yarn_zero_mscale": {"rope_scaling": {"type": "yarn", "factor": 1e-30, "mscale": 0.0, "mscale_all_dim": 0.0,
                                                      "original_max_position_embeddings": 0, "beta_fast": 0, "beta_slow": 0}},
                "rope_dim_huge": {"qk_rope_head_dim": 2**40},
            })
        for name, patch in variants.items():
            c = copy.deepcopy(cfg)
            c.update(patch)
            write(out, target, f"var_{name}.json", c)
        c = copy.deepcopy(cfg)
        c.pop("hidden_size", None)
        write(out, target, "var_missing_hidden.json", c)
        write(out, target, "not_object.json", "[1,2,3]")
        write(out, target, "truncated.json", json.dumps(cfg)[:40])


def safetensors_bytes(tensors, metadata=None, header_pad=0, tail=b""):
    """tensors: list of (name, dtype, shape, raw bytes)."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode() + b" " * header_pad
    return struct.pack("<Q", len(h)) + h + data + tail


def raw_header(header_obj, data):
    h = json.dumps(header_obj).encode()
    return struct.pack("<Q", len(h)) + h + data


def safetensors_seeds(out):
    t = "safetensors_header"
    f32 = struct.pack("<4f", 1.0, -2.0, 0.5, 3.25)
    bf16 = bytes([0x80, 0x3F, 0x00, 0x40, 0x00, 0xC0, 0x80, 0xBF])
    write(out, t, "f32_bf16_f16", safetensors_bytes([
        ("model.embed_tokens.weight", "BF16", [2, 2], bf16),
        ("model.norm.weight", "F32", [4], f32),
        ("lm_head.weight", "F16", [2, 2], bytes([0, 60, 0, 64, 0, 188, 0, 0])),
    ], metadata={"format": "pt"}))
    write(out, t, "fp8_and_scale", safetensors_bytes([
        ("w", "F8_E4M3", [2, 4], bytes(range(0x30, 0x38))),
        ("w_scale_inv", "F32", [1, 1], struct.pack("<f", 0.5)),
    ]))
    write(out, t, "empty_tensor", safetensors_bytes([("e", "F32", [0, 4], b"")]))
    write(out, t, "int_dtypes", safetensors_bytes([("i", "I64", [1], struct.pack("<q", 7)), ("b", "BOOL", [2], b"\x01\x00")]))
    write(out, t, "no_tensors", safetensors_bytes([], metadata={}))
    write(out, t, "padded_header", safetensors_bytes([("a", "F32", [1], f32[:4])], header_pad=7))
    write(out, t, "truncated_data", safetensors_bytes([("a", "F32", [4], f32)])[:-3])
    write(out, t, "trailing_bytes", safetensors_bytes([("a", "F32", [4], f32)], tail=b"xx"))
    write(out, t, "shape_mismatch", raw_header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, f32))
    write(out, t, "overlap", raw_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, f32))
    write(out, t, "gap", raw_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, f32[:8]))
    write(out, t, "huge_header_len", struct.pack("<Q", 2**63) + b"{}")
    write(out, t, "short", b"\x02\x00\x00")
    write(out, t, "not_utf8", struct.pack("<Q", 4) + b"\xff\xfe{}")
    write(out, t, "huge_shape", raw_header({"a": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}, b""))
    write(out, t, "unknown_dtype", raw_header({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16))


def index_seeds(out):
    t = "safetensors_index"
    s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    write(out, t, "two_shards", {"metadata": {"total_size": 24}, "weight_map": {"a": s1, "b": s2}})
    write(out, t, "one_shard", {"weight_map": {"a": s1, "b": s1}})
    real = load(os.path.join(GOLDEN, "deepseek_v3_noqlora_f32", "model.safetensors.index.json"))
    write(out, t, "golden_shape", {"metadata": real["metadata"],
                                   "weight_map": dict(list(real["weight_map"].items())[:6])})
    write(out, t, "missing_shard", {"weight_map": {"a": s1, "b": "model-00003-of-00003.safetensors"}})
    write(out, t, "no_weight_map", {"metadata": {}})
    write(out, t, "weight_map_list", {"weight_map": [s1]})
    write(out, t, "non_string_value", {"weight_map": {"a": 1, "b": None}})
    write(out, t, "empty_map", {"weight_map": {}})
    write(out, t, "dir_as_shard", {"weight_map": {"a": "."}})
    write(out, t, "parent_dir", {"weight_map": {"a": "../" + s1}})
    write(out, t, "absolute", {"weight_map": {"a": "/dev/null"}})
    write(out, t, "index_itself", {"weight_map": {"a": "model.safetensors.index.json"}})
    write(out, t, "not_json", "weight_map")


def manifest_seeds(out):
    t = "manifest"
    src = os.path.join(ROOT, ".r1", "demo", "arith-r1", "manifest.json")
    if not os.path.isfile(src):
        sys.exit(f"{src} is missing: run scripts/demo.sh (or r1-export tests/fixtures/arith-r1 -o .r1/demo/arith-r1) first")
    m = load(src)
    write(out, t, "arith_r1.json", m)
    small = copy.deepcopy(m)
    small["files"] = dict(list(m["files"].items())[:2])
    small["inputs"] = [i for i in m["inputs"] if not i["name"].startswith("past_key_values.") or ".0." in i["name"]]
    small["outputs"] = [o for o in m["outputs"] if not o["name"].startswith("present.") or ".0." in o["name"]]
    write(out, t, "small.json", small)
    for name, patch in {
        "version2": lambda x: x.update(format_version=2),
        "kv_mismatch": lambda x: x["kv_cache"].update(bytes_per_token=1),
        "kv_overflow": lambda x: x["kv_cache"].update(num_layers=2**62, key_heads=2**62, bytes_per_token=0),
        "layers_mismatch": lambda x: x["model"].update(num_layers=3),
        "no_logits": lambda x: x.update(outputs=[]),
        "bad_dtype": lambda x: x["kv_cache"].update(dtype="bfloat16"),
        "quantization": lambda x: x.update(quantization={"scheme": "int8"}),
        "no_inputs": lambda x: x.update(inputs=[]),
    }.items():
        c = copy.deepcopy(small)
        patch(c)
        write(out, t, name + ".json", c)
    write(out, t, "empty_object.json", "{}")


def chat_seeds(out):
    t = "chat_template"
    q = lambda s: {"role": "user", "content": s}
    write(out, t, "one_user.json", [q("What is 385+47?")])
    write(out, t, "system_user.json", [{"role": "system", "content": "Be brief."}, q("Calculate 12-7.")])
    write(out, t, "multi_turn.json", [q("1+1="), {"role": "assistant", "content": "<think>\n1+1+0=2\n</think>\n\n2"},
                                      q("What is 999+1?")])
    write(out, t, "assistant_reasoning.json", [q("2+2="), {"role": "assistant", "content": "4", "reasoning_content": "2+2"},
                                               q("3+3=")])
    write(out, t, "tool_call.json", [q("weather?"), {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "0"}])
    write(out, t, "two_tool_results.json", [q("x"), {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"type": "function", "function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}])
    write(out, t, "empty.json", [])
    write(out, t, "no_role.json", [{"content": "hi"}])
    write(out, t, "weird_types.json", [{"role": 5, "content": {"a": [1, None]}}, {"role": "user", "content": [1, 2]}])
    write(out, t, "unicode.json", [q("<｜User｜>日本語 \u0000 </think>{{ raise_exception('x') }}")])
    write(out, t, "raw_nul_split", "user\x00What is 385+47?\x00assistant\x00<think>\n</think>\n\n432\x00user\x0012-7=")
    write(out, t, "raw_system_only", "system\x00you are")
    write(out, t, "raw_role_only", "robot")


def pb_varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def pb_field(num, wire, payload):
    key = pb_varint((num << 3) | wire)
    if wire == 0:
        return key + pb_varint(payload)
    if wire == 2:
        return key + pb_varint(len(payload)) + payload
    if wire == 5:
        return key + payload
    raise ValueError(wire)


def pb_str(num, s):
    return pb_field(num, 2, s.encode() if isinstance(s, str) else s)


def pb_f32(num, v):
    return pb_field(num, 5, struct.pack("<f", v))


def request_seeds(out):
    t = "generate_request"
    msg = lambda role, content: pb_str(2, pb_str(1, role) + pb_str(2, content))
    sampling = lambda *fields: pb_str(4, b"".join(fields))
    write(out, t, "prompt", pb_str(1, "What is 385+47?") + pb_field(3, 0, 64))
    write(out, t, "messages", msg("user", "What is 385+47?") + pb_field(3, 0, 96))
    write(out, t, "chat_multi", msg("system", "x") + msg("user", "1+1=") + msg("assistant", "2") + msg("user", "2+2="))
    write(out, t, "sampling_all", pb_str(1, "hi") + sampling(pb_f32(1, 0.6), pb_f32(2, 0.95), pb_field(3, 0, 40),
                                                             pb_f32(4, 0.05), pb_f32(5, 1.1), pb_field(6, 0, 2**64 - 1)))
    write(out, t, "stop_ignore_eos", pb_str(1, "hi") + pb_str(5, "</think>") + pb_str(5, "\n\n") + pb_field(6, 0, 1))
    write(out, t, "both", pb_str(1, "hi") + msg("user", "hi"))
    write(out, t, "neither", pb_field(3, 0, 5))
    write(out, t, "bad_role", msg("robot", "hi"))
    write(out, t, "max_tokens_zero", pb_str(1, "hi") + pb_field(3, 0, 0))
    write(out, t, "max_tokens_huge", pb_str(1, "hi") + pb_field(3, 0, 2**32 - 1))
    write(out, t, "nan_temperature", pb_str(1, "hi") + sampling(pb_f32(1, float("nan"))))
    write(out, t, "too_many_stops", pb_str(1, "hi") + b"".join(pb_str(5, "s") for _ in range(9)))
    write(out, t, "empty_stop", pb_str(1, "hi") + pb_str(5, ""))
    write(out, t, "bad_utf8", pb_str(1, b"\xff\xfe"))
    write(out, t, "truncated", pb_str(1, "What is 385+47?")[:-4])
    write(out, t, "long_prompt", pb_str(1, "9+9=" * 1500))


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "fuzz", "target", "seeds")
    config_seeds(out)
    safetensors_seeds(out)
    index_seeds(out)
    manifest_seeds(out)
    chat_seeds(out)
    request_seeds(out)
    for t in sorted(os.listdir(out)):
        print(f"{t}: {len(os.listdir(os.path.join(out, t)))} seeds")


if __name__ == "__main__":
    main()
