//! Resolving DeepseekV3 configs: the release's own keys, transformers 5's spelling, and refusals by name.

use super::*;

fn r1_json() -> serde_json::Value {
    // The released DeepSeek-R1 config.json (the keys the exporter reads).
    serde_json::json!({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
        "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": true,
        "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": false, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "num_nextn_predict_layers": 1, "ep_size": 1, "aux_loss_alpha": 0.001,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]}
    })
}

fn resolve(v: serde_json::Value) -> std::result::Result<DeepseekV3Config, String> {
    let raw = serde_json::from_value::<RawConfig>(v).map_err(|e| e.to_string())?;
    raw.resolve(Path::new("config.json")).map_err(|e| e.to_string())
}

#[test]
fn r1_config_resolves_with_yarn_mscale_correction() {
    let c = resolve(r1_json()).unwrap();
    assert_eq!(c.fp8, Some(Fp8Source { weight_block_size: [128, 128] }));
    assert_eq!(c.latent_values_per_token_layer(), 576);
    assert_eq!(c.per_head_values_per_token_layer(), 128 * (192 + 128));
    // mscale(40, 1) = 1 + 0.1 ln 40; softmax scale = 192^-0.5 * mscale^2
    let m = 1.0 + 0.1 * 40f64.ln();
    assert!((c.softmax_scale() - m * m / 192f64.sqrt()).abs() < 1e-12);
    let (inv, att) = c.rope_inv_freq();
    assert_eq!(inv.len(), 32);
    assert_eq!(att, 1.0); // mscale == mscale_all_dim
                          // highest-frequency dims extrapolate (unchanged), lowest interpolate (divided by factor)
    assert_eq!(inv[0], 1.0);
    let last_plain = 1.0 / 10000f32.powf(62.0 / 64.0);
    assert!((inv[31] - last_plain / 40.0).abs() < 1e-12);
}

#[test]
fn transformers5_rope_parameters_are_read() {
    let mut v = r1_json();
    let o = v.as_object_mut().unwrap();
    o.remove("rope_scaling");
    o.remove("rope_theta");
    o.insert("rope_parameters".into(), serde_json::json!({"rope_type": "default", "rope_theta": 50000.0}));
    let c = resolve(v).unwrap();
    assert_eq!(c.rope_theta, 50000.0);
    assert_eq!(c.rope_scaling, RopeScaling::Default);
    assert_eq!(c.softmax_scale(), 192f64.powf(-0.5));
}

#[test]
fn unsupported_values_are_refused_by_name() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("scoring_func", serde_json::json!("softmax"), "`scoring_func` must be \"sigmoid\""),
        ("topk_method", serde_json::json!("greedy"), "`topk_method`"),
        ("hidden_act", serde_json::json!("gelu"), "`hidden_act`"),
        ("n_group", serde_json::json!(7), "`n_group` must divide n_routed_experts (256), got 7"),
        ("topk_group", serde_json::json!(9), "`topk_group` must be between 1 and n_group (8), got 9"),
        ("rope_scaling", serde_json::json!({"type": "linear", "factor": 2.0}), "type `linear`"),
        ("attention_bias", serde_json::json!(true), "`attention_bias`"),
        ("qk_rope_head_dim", serde_json::json!(63), "`qk_rope_head_dim` must be even, got 63"),
        // Found by fuzzing (config_deepseek_v3): a 2^40 rotary dim made rope_inv_freq allocate 2 TiB.
        (
            "qk_rope_head_dim",
            serde_json::json!(1u64 << 40),
            "`qk_rope_head_dim` must be at most 1048576, got 1099511627776",
        ),
        ("num_hidden_layers", serde_json::json!(1u64 << 62), "`num_hidden_layers` must be at most 65536"),
        ("vocab_size", serde_json::json!((1u64 << 24) + 1), "`vocab_size` must be at most 16777216, got 16777217"),
        ("n_shared_experts", serde_json::json!(1u64 << 20), "`n_shared_experts` must be at most 65536"),
        (
            "quantization_config",
            serde_json::json!({"quant_method": "fp8", "weight_block_size": null}),
            "per-tensor FP8 is not supported",
        ),
        ("quantization_config", serde_json::json!({"quant_method": "awq"}), "got \"awq\""),
    ];
    for (key, value, want) in cases {
        let mut v = r1_json();
        v.as_object_mut().unwrap().insert(key.into(), value);
        let err = resolve(v).unwrap_err();
        assert!(err.contains(want), "{key}: {err}");
    }
}
