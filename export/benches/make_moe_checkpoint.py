#!/usr/bin/env python3
"""Writes a random bf16 DeepseekV3 checkpoint with many routed experts, for the sparse-vs-dense-masked decode
benchmark in BENCHMARKS.md (r1-fixture writes the dense families only). Needs numpy; no torch.

  python3 export/benches/make_moe_checkpoint.py OUT_DIR [--experts 64] [--top-k 8] [--layers 8] [--hidden 1024]
                                                [--moe-intermediate 512] [--vocab 32000] [--seed 0]

Layer 0 is a dense MLP, the others MoE (n_group 8, topk_group 4, one shared expert, routed_scaling_factor 2.5);
MLA with q_lora_rank 384, kv_lora_rank 256, 16 heads. Weights are N(0, 0.02) like HF's initializer, router rows
N(0, 1/sqrt(hidden)) and a random correction bias, so tokens spread over the experts. One shard per layer.
"""
import argparse
import json
import os

import numpy as np


def bf16_bytes(a):
    """float32 array -> bfloat16 little-endian bytes (round to nearest even)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype("<u2").tobytes()


def save(path, tensors):
    """Minimal safetensors writer: {name: (shape, bytes)} in bf16."""
    header, offset = {}, 0
    for name, (shape, data) in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for _, data in tensors.values():
            f.write(data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--moe-intermediate", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    h, e, moe_i = a.hidden, a.experts, a.moe_intermediate
    cfg = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=a.vocab, hidden_size=h,
               intermediate_size=4 * moe_i + h, moe_intermediate_size=moe_i, num_hidden_layers=a.layers,
               num_attention_heads=16, num_key_value_heads=16, n_shared_experts=1, n_routed_experts=e,
               num_experts_per_tok=a.top_k, n_group=8, topk_group=4, first_k_dense_replace=1, norm_topk_prob=True,
               routed_scaling_factor=2.5, q_lora_rank=384, kv_lora_rank=256, qk_rope_head_dim=64,
               qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=4096, rope_theta=10000,
               rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", scoring_func="sigmoid",
               topk_method="noaux_tc", torch_dtype="bfloat16", bos_token_id=0, eos_token_id=1)
    with open(f"{a.out}/config.json", "w") as f:
        json.dump(cfg, f, indent=1)
    with open(f"{a.out}/generation_config.json", "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1}, f)
    rng = np.random.default_rng(a.seed)

    def rand(shape, std=0.02):
        return (tuple(shape), bf16_bytes(rng.standard_normal(shape, dtype=np.float32) * std))

    def ones(n):
        return ((n,), bf16_bytes(np.ones(n, np.float32)))

    c = cfg
    nh, qk = c["num_attention_heads"], c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    weight_map, total = {}, 0

    def flush(t, idx):
        nonlocal total
        fn = f"model-{idx:05d}.safetensors"
        save(f"{a.out}/{fn}", t)
        weight_map.update({k: fn for k in t})
        total += sum(len(d) for _, d in t.values())

    flush({"model.embed_tokens.weight": rand((a.vocab, h)), "lm_head.weight": rand((a.vocab, h)),
           "model.norm.weight": ones(h)}, 0)
    for i in range(a.layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": ones(h), p + "post_attention_layernorm.weight": ones(h),
             p + "self_attn.q_a_layernorm.weight": ones(c["q_lora_rank"]),
             p + "self_attn.kv_a_layernorm.weight": ones(c["kv_lora_rank"]),
             p + "self_attn.q_a_proj.weight": rand((c["q_lora_rank"], h)),
             p + "self_attn.q_b_proj.weight": rand((nh * qk, c["q_lora_rank"])),
             p + "self_attn.kv_a_proj_with_mqa.weight": rand((c["kv_lora_rank"] + c["qk_rope_head_dim"], h)),
             p + "self_attn.kv_b_proj.weight": rand((nh * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])),
             p + "self_attn.o_proj.weight": rand((h, nh * c["v_head_dim"]))}
        mlps = [("mlp", c["intermediate_size"])] if i < c["first_k_dense_replace"] else \
            [(f"mlp.experts.{j}", moe_i) for j in range(e)] + [("mlp.shared_experts", moe_i)]
        if i >= c["first_k_dense_replace"]:
            t[p + "mlp.gate.weight"] = rand((e, h), 1 / np.sqrt(h))
            t[p + "mlp.gate.e_score_correction_bias"] = rand((e,), 0.1)
        for m, inter in mlps:
            t[p + f"{m}.gate_proj.weight"] = rand((inter, h))
            t[p + f"{m}.up_proj.weight"] = rand((inter, h))
            t[p + f"{m}.down_proj.weight"] = rand((h, inter))
        flush(t, i + 1)
    with open(f"{a.out}/model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    print(f"{a.out}: {total / 1e9:.2f} GB of bf16 weights")


if __name__ == "__main__":
    main()
