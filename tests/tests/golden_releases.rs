//! The golden cases made from the R1 releases' own config.json (`tests/fixtures/make_golden_releases.py`): one case
//! per published config, whose config.json is the release's with only the sizes golden.json lists scaled; the
//! releases whose rotary is scaled past an original context carry a far-position reference; the export reads or
//! lists every key, and skips DeepSeek-R1's MTP layer on purpose. `golden.rs` checks their numbers on ort and tract
//! with every other case.

use std::path::{Path, PathBuf};

use prost::Message;
use r1_export::Precision;
use r1_tests::{export_case, golden_cases, golden_meta, Golden};
use serde_json::Value;

/// The published configs (`../shared/r1-configs/<name>.json`).
const RELEASES: [&str; 8] = [
    "DeepSeek-R1",
    "DeepSeek-R1-0528-Qwen3-8B",
    "DeepSeek-R1-Distill-Llama-70B",
    "DeepSeek-R1-Distill-Llama-8B",
    "DeepSeek-R1-Distill-Qwen-1.5B",
    "DeepSeek-R1-Distill-Qwen-14B",
    "DeepSeek-R1-Distill-Qwen-32B",
    "DeepSeek-R1-Distill-Qwen-7B",
];

/// Keys a release case may change: sizes (and DeepSeek-R1's count of leading dense layers, a layer count).
const SIZE_KEYS: [&str; 16] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "first_k_dense_replace",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "num_experts_per_tok",
];

/// Golden cases made from a release config, with their golden.json.
fn release_cases() -> Vec<(PathBuf, Value)> {
    golden_cases()
        .into_iter()
        .map(|c| {
            let meta = golden_meta(&c).unwrap();
            (c, meta)
        })
        .filter(|(_, m)| m.get("release_config").is_some())
        .collect()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn case_config(case: &Path) -> Value {
    read_json(&case.join("config.json"))
}

#[test]
fn every_release_has_a_case_with_its_keys_as_released() {
    let cases = release_cases();
    for release in RELEASES {
        let file = format!("{release}.json");
        let found: Vec<&PathBuf> = cases.iter().filter(|(_, m)| m["release_config"] == file).map(|(c, _)| c).collect();
        assert_eq!(found.len(), 1, "{release}: expected one golden case made from {file}, found {found:?}");
    }
    assert_eq!(cases.len(), RELEASES.len(), "a release case for a config not listed here");
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/r1-configs");
    if !shared.is_dir() {
        eprintln!("skipping the key-by-key comparison: {} is missing (CI has ../shared)", shared.display());
        return;
    }
    for (case, meta) in &cases {
        let released = read_json(&shared.join(meta["release_config"].as_str().unwrap()));
        let here = case_config(case);
        let scaled = meta["scaled"].as_object().unwrap();
        let (r, h) = (released.as_object().unwrap(), here.as_object().unwrap());
        assert_eq!(r.keys().collect::<Vec<_>>(), h.keys().collect::<Vec<_>>(), "{case:?}: keys as released, in order");
        for (key, value) in r {
            match scaled.get(key) {
                None => assert_eq!(&h[key], value, "{case:?}: `{key}` must be as released"),
                Some(pair) => {
                    assert!(SIZE_KEYS.contains(&key.as_str()), "{case:?}: `{key}` is not a size");
                    assert_eq!((&pair[0], &pair[1]), (value, &h[key]), "{case:?}: golden.json's record of `{key}`");
                }
            }
        }
        // Heads and KV heads are divided by one number: the release's grouping stays.
        let ratio = |c: &Value| c["num_attention_heads"].as_u64().unwrap() / c["num_key_value_heads"].as_u64().unwrap();
        assert_eq!(ratio(&released), ratio(&here), "{case:?}: heads per KV head");
    }
}

/// The releases whose rotary is scaled beyond an original context (YaRN: R1-0528-Qwen3-8B, DeepSeek-R1) have a
/// reference that starts at position 60,000, past `original_max_position_embeddings` and within
/// `max_position_embeddings`, at the positions the test feeds.
#[test]
fn yarn_releases_have_a_far_position_reference() {
    let mut yarn = 0;
    for (case, meta) in release_cases() {
        let config = case_config(&case);
        let rope = &config["rope_scaling"];
        let kind = rope.get("rope_type").or_else(|| rope.get("type")).and_then(Value::as_str).unwrap_or("default");
        let far = Golden::load_far(&case).unwrap();
        if kind == "yarn" {
            yarn += 1;
            assert!(far.is_some(), "{case:?}: a YaRN release without a far-position reference");
        }
        let Some(far) = far else { continue };
        let start = meta["far_position_start"].as_i64().unwrap();
        let original = rope["original_max_position_embeddings"].as_i64().unwrap();
        let max = config["max_position_embeddings"].as_i64().unwrap();
        assert!(start >= 60_000 && start > original, "{case:?}: far start {start}, original context {original}");
        let g = Golden::load(&case).unwrap();
        assert_eq!((far.input_ids.clone(), far.attention_mask.clone()), (g.input_ids.clone(), g.attention_mask));
        let (b, p) = far.position_ids.dim();
        for r in 0..b {
            let mut ones = 0;
            for t in 0..p {
                ones += far.attention_mask[[r, t]];
                assert_eq!(far.position_ids[[r, t]], start + (ones - 1).max(0), "{case:?} row {r} position {t}");
            }
        }
        let last = start + p as i64 + far.decode_input_ids.ncols() as i64;
        assert!(last < max, "{case:?}: positions up to {last} pass max_position_embeddings {max}");
    }
    assert_eq!(yarn, 2, "R1-0528-Qwen3-8B and DeepSeek-R1 use YaRN");
}

/// The export of each release case reads or lists every config.json key (none unknown), and DeepSeek-R1's MTP
/// layer, whose tensors are in the checkpoint, is the draft graph (`mtp.onnx`, `manifest.draft`), absent from the
/// main graph.
#[test]
fn release_exports_account_for_every_key_and_export_the_mtp_layer_as_the_draft() {
    use r1_export::arch::config_keys::{keys_read, UNKNOWN};
    let tmp = tempfile::tempdir().unwrap();
    for (case, meta) in release_cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let m = export_case(&case, &tmp.path().join(&name), Precision::Fp32).unwrap();
        let config = case_config(&case);
        let ignored = &m.source.ignored_config_keys;
        let read = keys_read(&m.architecture);
        for key in config.as_object().unwrap().keys() {
            assert!(
                read.contains(&key.as_str()) || ignored.get(key).is_some_and(|why| why != UNKNOWN),
                "{name}: `{key}` neither read nor listed with a reason: {ignored:?}"
            );
        }
        assert!(ignored.values().all(|why| why != UNKNOWN), "{name}: {ignored:?}");
        assert!(ignored.contains_key("use_cache") && ignored.contains_key("torch_dtype"), "{name}: {ignored:?}");
        let notes = m.source.notes.join("\n");
        assert!(!notes.contains("does not know"), "{name}: {notes}");
        if m.architecture != "DeepseekV3ForCausalLM" {
            continue;
        }
        let n = config["num_hidden_layers"].as_u64().unwrap();
        assert!(meta["mtp_tensors"].as_u64().unwrap() > 10, "{name}: the MTP layer's tensors: {meta}");
        let st = std::fs::read(case.join("model.safetensors")).unwrap();
        let (_, header) = safetensors::SafeTensors::read_metadata(&st).unwrap();
        let names: Vec<String> = header.tensors().into_keys().collect();
        for part in ["enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens", "self_attn"] {
            let key = format!("model.layers.{n}.{part}");
            assert!(names.iter().any(|t| t.starts_with(&key)), "{name}: the checkpoint lacks {key}*");
        }
        assert_eq!(m.draft.as_ref().map(|d| d.source_layer as u64), Some(n), "{name}: the draft record");
        let out = tmp.path().join(&name);
        let names_in = |file: &str| -> Vec<String> {
            let bytes = std::fs::read(out.join(file)).unwrap();
            let graph = r1_proto::onnx::ModelProto::decode(bytes.as_slice()).unwrap().graph.unwrap();
            graph
                .initializer
                .iter()
                .filter_map(|t| t.name.clone())
                .chain(graph.node.iter().filter_map(|n| n.name.clone()))
                .collect()
        };
        let (main, draft) = (names_in("model.onnx"), names_in(r1_engine::manifest::names::MTP_FILE));
        let of_layer = |names: &[String], i: u64| names.iter().filter(|t| t.contains(&format!("layers.{i}."))).count();
        assert!(of_layer(&main, n - 1) > 0, "{name}: the graph names its layers otherwise than expected");
        assert_eq!(of_layer(&main, n), 0, "{name}: the main graph holds MTP layer {n} tensors");
        assert!(of_layer(&draft, n) > 10, "{name}: the draft graph lacks MTP layer {n}");
        assert_eq!(of_layer(&draft, n - 1), 0, "{name}: the draft graph holds main layer {} tensors", n - 1);
    }
}

/// RoPE attention depends on relative positions only, so the far reference differs from the one at position 0 only
/// by the float32 rounding of the rotary angles at 60,000 (5e-5 to 3e-4 relative in these cases). The graph's
/// far-position logits must be at least 10× closer to the far reference than the reference at 0 is: the far check
/// sees how the graph computes the angles at those positions, not just a shifted copy of the near run.
#[test]
fn far_position_runs_match_the_far_reference_more_closely_than_the_near_one_does() {
    use r1_engine::backend::{self, BackendKind, BackendOptions};
    use r1_tests::{rel_err, run_golden};
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (case, _) in release_cases() {
        let Some(far) = Golden::load_far(&case).unwrap() else { continue };
        let near = Golden::load(&case).unwrap();
        let mask = &near.attention_mask;
        let shift = rel_err(&near.prefill_logits, &far.prefill_logits, |r, t| mask[[r, t]] == 1)
            .unwrap()
            .max(rel_err(&near.decode_logits, &far.decode_logits, |_, _| true).unwrap());
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let out = tmp.path().join(&name);
        let m = export_case(&case, &out, Precision::Fp32).unwrap();
        for kind in [BackendKind::Ort, BackendKind::Tract] {
            let mut be = backend::load(&out, &m, kind, &BackendOptions::default()).unwrap();
            let err = run_golden(be.as_mut(), &m, &far).unwrap().max_rel_err;
            eprintln!("{name} {kind:?}: far run vs far reference {err:.2e}; far vs near reference {shift:.2e}");
            assert!(err * 10.0 <= shift, "{name} {kind:?}: error {err:.2e} is not well below the shift {shift:.2e}");
        }
        checked += 1;
    }
    assert_eq!(checked, 3, "R1-0528-Qwen3-8B, DeepSeek-R1 and R1-Distill-Llama-8B have far references");
}
