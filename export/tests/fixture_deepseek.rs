//! The `deepseek-r1-slice` fixture (issue 18, point 4): its config is R1's release config but for the documented
//! overrides, and its tensor list, built from a scaled-down copy of that config, is what the exporter reads (names,
//! shapes, dtypes, FP8 128x128 blocks, shards, the MTP draft) and runs (tract, finite logits). The full slice (31.23 GB) is never written here.
use std::path::Path;

use ndarray::{Array2, ArrayD, IxDyn};
use r1_engine::backend::{self, BackendKind, BackendOptions, KvPair, StepInput};
use r1_engine::manifest::Manifest;
use r1_export::checkpoint::fp8::{dequantize, BlockLayout};
use r1_export::checkpoint::{convert::to_f32_vec, Checkpoint};
use r1_export::fixture::deepseek_v3::R1_SLICE_CONFIG;
use r1_export::fixture::{preset, write_checkpoint, DeepseekV3Fixture, FixtureSpec};
use r1_export::{export, ExportOptions};
use serde_json::{json, Value};

fn release_r1_config() -> Option<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/r1-configs/DeepSeek-R1.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(serde_json::from_str(&text).unwrap()),
        Err(e) => {
            eprintln!("skipping the comparison: {} not readable ({e})", path.display());
            None
        }
    }
}

#[test]
fn r1_slice_config_is_the_release_config_but_the_documented_overrides() {
    let spec = preset("deepseek-r1-slice").unwrap();
    let slice = spec.config_json();
    assert_eq!(slice, serde_json::from_str::<Value>(R1_SLICE_CONFIG).unwrap());
    assert_eq!(slice["num_hidden_layers"], json!(2));
    assert_eq!(slice["first_k_dense_replace"], json!(1));
    assert_eq!(slice["num_nextn_predict_layers"], json!(1));
    assert_eq!(
        slice["quantization_config"],
        json!({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]})
    );
    // The preset's descriptive fields agree with its config.
    let from_config = FixtureSpec::deepseek_v3(DeepseekV3Fixture::r1_slice()).unwrap();
    assert_eq!(format!("{spec:?}"), format!("{from_config:?}"));
    let bytes = spec.planned_bytes().unwrap();
    println!("deepseek-r1-slice: {} tensors, {bytes} bytes planned", spec.tensor_count().unwrap());
    assert_eq!((spec.tensor_count().unwrap(), bytes), (3145, 31_226_547_872));

    let Some(release) = release_r1_config() else { return };
    let (r, s) = (release.as_object().unwrap(), slice.as_object().unwrap());
    let mut differ: Vec<&str> = r.keys().filter(|k| s.get(*k) != r.get(*k)).map(|k| k.as_str()).collect();
    differ.extend(s.keys().filter(|k| !r.contains_key(*k)).map(|k| k.as_str()));
    differ.sort();
    // shared/r1-configs leaves quantization_config out (its README quotes it; the slice carries it as released).
    assert_eq!(differ, ["first_k_dense_replace", "num_hidden_layers", "quantization_config"]);
    assert_eq!((r["num_hidden_layers"].clone(), r["first_k_dense_replace"].clone()), (json!(61), json!(3)));
}

/// R1's slice config with the sizes scaled down (block 128 kept: q_lora 32, kv_lora 16 and the experts' 64 make
/// partial blocks).
fn scaled_config() -> Value {
    let mut c: Value = serde_json::from_str(R1_SLICE_CONFIG).unwrap();
    for (k, v) in [
        ("hidden_size", 256),
        ("intermediate_size", 384),
        ("moe_intermediate_size", 64),
        ("num_attention_heads", 4),
        ("num_key_value_heads", 4),
        ("q_lora_rank", 32),
        ("kv_lora_rank", 16),
        ("qk_nope_head_dim", 16),
        ("qk_rope_head_dim", 8),
        ("v_head_dim", 16),
        ("n_routed_experts", 8),
        ("n_group", 4),
        ("topk_group", 2),
        ("num_experts_per_tok", 2),
        ("vocab_size", 512),
    ] {
        assert!(c.get(k).is_some(), "{k} is a key of the release config");
        c[k] = json!(v);
    }
    c
}

#[test]
fn scaled_r1_slice_is_sharded_fp8_and_exports_with_its_mtp_draft() {
    let tmp = tempfile::tempdir().unwrap();
    let ck_dir = tmp.path().join("ck");
    let fixture = DeepseekV3Fixture { config: scaled_config(), shard_bytes: 256 << 10, mtp: true };
    let spec = FixtureSpec::deepseek_v3(fixture).unwrap();
    let bytes = write_checkpoint(&spec, &ck_dir).unwrap();
    assert_eq!(bytes, spec.planned_bytes().unwrap());

    // Shards and index as released.
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(ck_dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], json!(bytes));
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), spec.tensor_count().unwrap());
    let mut files: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    files.sort();
    files.dedup();
    assert!(files.len() >= 3, "{files:?}");
    assert_eq!(files[0], format!("model-00001-of-{:05}.safetensors", files.len()));

    // Dtypes and blocks: every FP8 weight has its [ceil(out/128), ceil(in/128)] float32 scale and dequantizes to
    // small finite values; norms, embeddings, heads, router and eh_proj are bf16, the correction bias float32.
    let ck = Checkpoint::open(&ck_dir).unwrap();
    assert_eq!(ck.total_bytes(), bytes);
    let mut fp8_weights = 0;
    for name in ck.names() {
        let t = ck.tensor_any_shape(name).unwrap();
        let dtype = format!("{:?}", t.dtype);
        if let Some(w) = name.strip_suffix("_scale_inv") {
            let wt = ck.tensor_any_shape(w).unwrap();
            assert_eq!(format!("{:?}", wt.dtype), "F8_E4M3", "{w}");
            assert_eq!(dtype, "F32", "{name}");
            let layout = BlockLayout::new(wt.shape, t.shape, &[128, 128]).unwrap();
            let v = dequantize(&layout, wt.data, &to_f32_vec(t.data, t.float().unwrap())).unwrap();
            let bound = 2.3 / (wt.shape[1] as f32).sqrt();
            let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(v.iter().all(|x| x.is_finite()) && max <= bound && max > bound / 4.0, "{w}: max {max}");
            fp8_weights += 1;
        } else if dtype == "F8_E4M3" {
            assert!(ck.has(&format!("{name}_scale_inv")), "{name}");
        } else if name.ends_with("e_score_correction_bias") {
            assert_eq!(dtype, "F32", "{name}");
        } else {
            assert_eq!(dtype, "BF16", "{name}");
        }
    }
    // Per attention 5, dense MLP 3, per MoE layer (8 experts + shared) x 3.
    assert_eq!(fp8_weights, 3 * 5 + 3 + 2 * 9 * 3);
    for bf16 in ["model.layers.2.eh_proj.weight", "model.layers.1.mlp.gate.weight", "lm_head.weight"] {
        assert_eq!(format!("{:?}", ck.tensor_any_shape(bf16).unwrap().dtype), "BF16", "{bf16}");
    }

    // The real exporter, fp32, library path (no target): main graph + the MTP draft from layer 2.
    let out = tmp.path().join("out");
    let m = export(&ExportOptions::new(&ck_dir, &out), &mut |_| {}).unwrap();
    assert!(m.source.fp8_block_quantized);
    // At this scale the bf16 embeddings and heads outweigh the experts (the full slice is 23.6 GB FP8 of 31.2).
    assert_eq!(m.source.dtype, "bf16");
    assert!(ck.dtype_bytes()["F8_E4M3"] > 0);
    assert_eq!(m.model.num_layers, 2);
    let draft = m.draft.as_ref().expect("the MTP module exported as the draft graph");
    assert_eq!(draft.source_layer, 2);
    assert!(out.join(&draft.graph).is_file() && out.join("model.onnx").is_file());
    // The random values are usable: a prefill of 5 tokens through tract gives finite logits that vary.
    let mut be = backend::load(&out, &m, BackendKind::Tract, &BackendOptions::default()).unwrap();
    let kv = &m.kv_cache;
    let step = StepInput {
        input_ids: Array2::from_shape_vec((1, 5), vec![1, 7, 300, 42, 511]).unwrap(),
        attention_mask: Array2::ones((1, 5)),
        position_ids: Array2::from_shape_vec((1, 5), (0..5).collect()).unwrap(),
        past: (0..kv.num_layers)
            .map(|_| KvPair {
                key: ArrayD::zeros(IxDyn(&[1, kv.key_heads, 0, kv.key_dim])),
                value: ArrayD::zeros(IxDyn(&[1, kv.value_heads, 0, kv.value_dim])),
            })
            .collect(),
    };
    let logits = be.run(&step).unwrap().logits;
    assert_eq!(logits.shape(), [1, 5, 512]);
    assert!(logits.iter().all(|x| x.is_finite()));
    let (lo, hi) = logits.iter().fold((f32::MAX, f32::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
    assert!(hi - lo > 1e-3 && hi.abs() < 100.0, "logits in [{lo}, {hi}]");

    // The binary, fp32 with --target cpu: the cpu serving graph is built as well.
    let out_cpu = tmp.path().join("out-cpu");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_r1-export"))
        .arg(&ck_dir)
        .args(["-o".as_ref(), out_cpu.as_os_str()])
        .args(["--precision", "fp32", "--target", "cpu", "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = Manifest::load(&out_cpu).unwrap();
    assert!(m.draft.is_some() && m.source.fp8_block_quantized);
    let graph = m.targets.cpu_graph(&out_cpu).expect("a cpu serving graph").to_string();
    assert!(out_cpu.join(graph).is_file());
}

/// `--no-mtp` (issue #18, the slice benchmark): the scaled slice without its MTP layer is the same checkpoint less
/// exactly the `model.layers.2.*` tensors, with the release's config (still declaring the module); a plain export
/// names the first missing MTP tensor, `--no-draft` exports it, and its main graph is the full checkpoint's.
#[test]
fn scaled_r1_slice_without_mtp_drops_exactly_the_mtp_tensors_and_exports_with_no_draft() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = DeepseekV3Fixture { config: scaled_config(), shard_bytes: 256 << 10, mtp: true };
    let full = FixtureSpec::deepseek_v3(fixture.clone()).unwrap();
    let stripped = FixtureSpec::deepseek_v3(fixture.without_mtp()).unwrap();
    let (full_dir, ck_dir) = (tmp.path().join("full"), tmp.path().join("ck"));
    let full_bytes = write_checkpoint(&full, &full_dir).unwrap();
    let bytes = write_checkpoint(&stripped, &ck_dir).unwrap();
    assert_eq!(bytes, stripped.planned_bytes().unwrap());
    assert_eq!(
        std::fs::read(ck_dir.join("config.json")).unwrap(),
        std::fs::read(full_dir.join("config.json")).unwrap()
    );

    let (ck_full, ck) = (Checkpoint::open(&full_dir).unwrap(), Checkpoint::open(&ck_dir).unwrap());
    let mut names: Vec<&str> = ck.names();
    let mut expected: Vec<&str> = ck_full.names().into_iter().filter(|n| !n.starts_with("model.layers.2.")).collect();
    names.sort();
    expected.sort();
    assert_eq!(names, expected);
    assert_eq!(stripped.tensor_count().unwrap(), names.len());
    let mtp_bytes: u64 = ck_full
        .names()
        .into_iter()
        .filter(|n| n.starts_with("model.layers.2."))
        .map(|n| ck_full.tensor_any_shape(n).unwrap().data.len() as u64)
        .sum();
    assert_eq!(bytes + mtp_bytes, full_bytes);
    // The tensors before the MTP layer hold the same values (one random stream in file order; model.norm and
    // lm_head come after it, so theirs differ).
    for n in ["model.embed_tokens.weight", "model.layers.1.mlp.experts.7.down_proj.weight"] {
        assert_eq!(ck.tensor_any_shape(n).unwrap().data, ck_full.tensor_any_shape(n).unwrap().data, "{n}");
    }

    let out = tmp.path().join("out");
    let e = export(&ExportOptions::new(&ck_dir, &out), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("model.layers.2.") && e.contains("--no-draft"), "{e}");
    let m = export(&ExportOptions { draft: false, ..ExportOptions::new(&ck_dir, &out) }, &mut |_| {}).unwrap();
    assert!(m.draft.is_none() && m.source.fp8_block_quantized);
    let full_out = tmp.path().join("full-out");
    let mf = export(&ExportOptions { draft: false, ..ExportOptions::new(&full_dir, &full_out) }, &mut |_| {}).unwrap();
    // The main graph is the full checkpoint's (same nodes and tensors, same offsets; values differ only in
    // model.norm and lm_head).
    assert_eq!(m.files.get("model.onnx"), mf.files.get("model.onnx"));
    assert_eq!(m.files["model.onnx.data"].bytes, mf.files["model.onnx.data"].bytes);
}

#[test]
fn r1_fixture_lists_the_slice_with_its_size_and_refuses_shape_overrides() {
    let bin = env!("CARGO_BIN_EXE_r1-fixture");
    let o = std::process::Command::new(bin).arg("--list").output().unwrap();
    let list = String::from_utf8(o.stdout).unwrap();
    let line = list.lines().find(|l| l.starts_with("deepseek-r1-slice")).expect("listed");
    assert!(line.contains("31.23 GB") && line.contains("MTP"), "{line}");
    let tmp = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(bin)
        .args(["--preset", "deepseek-r1-slice", "--layers", "4", "-o"])
        .arg(tmp.path().join("x"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--layers does not apply to --preset deepseek-r1-slice"));
    assert!(!tmp.path().join("x").exists());
    let o = std::process::Command::new(bin)
        .args(["--preset", "tiny-qwen2", "--no-mtp", "-o"])
        .arg(tmp.path().join("x"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--no-mtp applies to DeepseekV3 presets only"));
    assert!(!tmp.path().join("x").exists());
}
