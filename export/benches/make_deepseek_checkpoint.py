#!/usr/bin/env python3
"""Writes a random FP8-block DeepseekV3 checkpoint of ~2.8 GB (R1 tensor names, 6 layers + an MTP layer, 64 experts,
hidden 2048) for the export time / peak-RSS measurement.  Usage: make_deepseek_checkpoint.py OUT_DIR  (not in the repo)."""
import json, math, os, sys, numpy as np, torch
from safetensors.torch import save_file
out = sys.argv[1]; os.makedirs(out, exist_ok=True)
cfg = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=32000, hidden_size=2048,
           intermediate_size=5632, moe_intermediate_size=1024, num_hidden_layers=6, num_attention_heads=16,
           num_key_value_heads=16, n_shared_experts=1, n_routed_experts=64, num_experts_per_tok=6, n_group=8,
           topk_group=3, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, q_lora_rank=768,
           kv_lora_rank=256, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=16384,
           rope_theta=10000, rope_scaling=dict(type="yarn", factor=4, original_max_position_embeddings=4096,
           beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0), rms_norm_eps=1e-6, tie_word_embeddings=False,
           num_nextn_predict_layers=1, hidden_act="silu", scoring_func="sigmoid", topk_method="noaux_tc",
           quantization_config=dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[128, 128]))
json.dump(cfg, open(f"{out}/config.json", "w"), indent=1)
rng = np.random.default_rng(0)
def fp8(name, rows, cols, t):
    u = rng.integers(0, 0x7e, size=(rows, cols), dtype=np.uint8) | (rng.integers(0, 2, size=(rows, cols), dtype=np.uint8) << 7)
    t[name] = torch.from_numpy(u).view(torch.float8_e4m3fn)
    t[name + "_scale_inv"] = torch.from_numpy(rng.random((math.ceil(rows / 128), math.ceil(cols / 128)), dtype=np.float32) * 1e-3)
def bf(name, shape, t):
    t[name] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 0.02).to(torch.bfloat16)
c = cfg; H = c["hidden_size"]; nh = c["num_attention_heads"]; qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
weight_map = {}
def flush(t, idx):
    fn = f"model-{idx:05d}.safetensors"; save_file(t, f"{out}/{fn}", metadata={"format": "pt"})
    weight_map.update({k: fn for k in t})
t = {}; bf("model.embed_tokens.weight", (c["vocab_size"], H), t); bf("lm_head.weight", (c["vocab_size"], H), t)
t["model.norm.weight"] = torch.ones(H, dtype=torch.bfloat16); flush(t, 0)
for i in range(c["num_hidden_layers"] + 1):  # + the MTP layer
    t = {}; p = f"model.layers.{i}."
    for n, d in (("input_layernorm", H), ("post_attention_layernorm", H), ("self_attn.q_a_layernorm", c["q_lora_rank"]), ("self_attn.kv_a_layernorm", c["kv_lora_rank"])):
        t[p + n + ".weight"] = torch.ones(d, dtype=torch.bfloat16)
    fp8(p + "self_attn.q_a_proj.weight", c["q_lora_rank"], H, t)
    fp8(p + "self_attn.q_b_proj.weight", nh * qk, c["q_lora_rank"], t)
    fp8(p + "self_attn.kv_a_proj_with_mqa.weight", c["kv_lora_rank"] + c["qk_rope_head_dim"], H, t)
    fp8(p + "self_attn.kv_b_proj.weight", nh * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"], t)
    fp8(p + "self_attn.o_proj.weight", H, nh * c["v_head_dim"], t)
    if i < c["first_k_dense_replace"]:
        for n, (r, co) in (("gate_proj", (c["intermediate_size"], H)), ("up_proj", (c["intermediate_size"], H)), ("down_proj", (H, c["intermediate_size"]))):
            fp8(p + f"mlp.{n}.weight", r, co, t)
    else:
        I = c["moe_intermediate_size"]
        bf(p + "mlp.gate.weight", (c["n_routed_experts"], H), t)
        t[p + "mlp.gate.e_score_correction_bias"] = torch.zeros(c["n_routed_experts"])
        for j in range(c["n_routed_experts"]):
            for n, (r, co) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
                fp8(p + f"mlp.experts.{j}.{n}.weight", r, co, t)
        for n, (r, co) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            fp8(p + f"mlp.shared_experts.{n}.weight", r, co, t)
    if i == c["num_hidden_layers"]:
        bf(p + "eh_proj.weight", (H, 2 * H), t)
    flush(t, i + 1)
json.dump({"metadata": {}, "weight_map": weight_map}, open(f"{out}/model.safetensors.index.json", "w"))
print(sum(os.path.getsize(f"{out}/{f}") for f in os.listdir(out)) / 1e9, "GB")
