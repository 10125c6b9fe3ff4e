//! The published `config.json` of the R1 releases (`../shared/r1-configs/`), keys as released, with only the sizes
//! scaled down to a tiny random checkpoint, must export. DeepSeek-R1-0528-Qwen3-8B's uses YaRN with `attn_factor`,
//! which the dense families refused before.
use std::path::{Path, PathBuf};

use prost::Message;
use r1_export::fixture::{preset, write_checkpoint};

fn release_config(name: &str) -> Option<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/r1-configs").join(format!("{name}.json"));
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(serde_json::from_str(&text).unwrap()),
        Err(e) => {
            eprintln!("skipping: {} not readable ({e}); CI has ../shared beside the repository", path.display());
            None
        }
    }
}

/// A tiny-qwen3 random checkpoint whose config.json is the release's with the fixture's sizes.
fn scaled_checkpoint(dir: &Path, mut config: serde_json::Value) -> PathBuf {
    let ck = dir.join("ck");
    write_checkpoint(&preset("tiny-qwen3").unwrap(), &ck).unwrap();
    let tiny: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("config.json")).unwrap()).unwrap();
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "tie_word_embeddings",
    ] {
        config[key] = tiny[key].clone();
    }
    config["bos_token_id"] = serde_json::json!(0);
    config["eos_token_id"] = serde_json::json!(1);
    std::fs::write(ck.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    ck
}

/// Exports `config` (scaled) and returns the names of the graph's rotary nodes and the manifest.
fn export_scaled(dir: &Path, config: serde_json::Value) -> (Vec<String>, serde_json::Value) {
    let ck = scaled_checkpoint(dir, config);
    let out = dir.join("out");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_r1-export"))
        .arg(&ck)
        .arg("-o")
        .arg(&out)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let model = r1_proto::onnx::ModelProto::decode(std::fs::read(out.join("model.onnx")).unwrap().as_slice()).unwrap();
    let names =
        model.graph.unwrap().node.into_iter().filter_map(|n| n.name).filter(|n| n.contains("rotary_emb")).collect();
    let manifest = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    (names, manifest)
}

#[test]
fn r1_0528_qwen3_exports_with_its_yarn_rope_scaling() {
    let Some(config) = release_config("DeepSeek-R1-0528-Qwen3-8B") else { return };
    assert_eq!(config["rope_scaling"]["rope_type"], "yarn", "the release's own rope_scaling");
    let tmp = tempfile::tempdir().unwrap();
    let (rotary, manifest) = export_scaled(&tmp.path().join("release"), config.clone());
    // YaRN's mscale(4) = 1.1386… times the release's attn_factor 0.8782… rounds to exactly 1.0 in float32, so the
    // cos/sin tables are not scaled (and the CPU serving graph's fused attention applies).
    assert!(!rotary.iter().any(|n| n.ends_with("/Scale")), "{rotary:?}");
    assert_eq!(manifest["model"]["max_position_embeddings"], 131072, "{}", manifest["model"]);
    // transformers' reading of the same config (attn_factor ignored) scales them by 1.1386: r1 would write that
    // factor into the tables if the release had no attn_factor.
    let mut without = config;
    without["rope_scaling"].as_object_mut().unwrap().remove("attn_factor");
    let (rotary, _) = export_scaled(&tmp.path().join("without"), without);
    assert!(
        rotary.iter().any(|n| n.contains("Cos/Scale")) && rotary.iter().any(|n| n.contains("Sin/Scale")),
        "{rotary:?}"
    );
}

/// Every published config (`../shared/r1-configs/*.json`), at full size and with every key as released, validates,
/// and each of its keys is either read or listed in the manifest's `source.ignored_config_keys` with a reason from
/// the table of keys left on purpose (none is unknown, none silently dropped). DeepSeek-R1 is checked with the
/// `quantization_config` its release carries too (the shared file leaves it out, see its README).
#[test]
fn every_release_key_is_read_or_ignored_with_a_reason() {
    use r1_export::arch::config_keys::{ignored_config_keys, keys_read, UNKNOWN};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/r1-configs");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("skipping: {} not readable; CI has ../shared beside the repository", dir.display());
        return;
    };
    let mut names: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 8, "the eight R1 releases: {names:?}");
    for path in names {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let mut config = release_config(&name).unwrap();
        if name == "DeepSeek-R1" {
            config["quantization_config"] = serde_json::json!({"activation_scheme": "dynamic", "fmt": "e4m3",
                "quant_method": "fp8", "weight_block_size": [128, 128]});
        }
        r1_export::arch::from_config(&path, &config).unwrap_or_else(|e| panic!("{name}: {e}"));
        let ignored = ignored_config_keys(&config);
        let unknown: Vec<&String> = ignored.iter().filter(|(_, why)| *why == UNKNOWN).map(|(k, _)| k).collect();
        assert!(unknown.is_empty(), "{name}: keys neither read nor listed with a reason: {unknown:?}");
        let read = keys_read(config["architectures"][0].as_str().unwrap());
        for key in config.as_object().unwrap().keys() {
            assert!(
                read.contains(&key.as_str()) != ignored.contains_key(key),
                "{name}: `{key}` must be either read or listed as ignored"
            );
        }
        eprintln!(
            "{name}: {} keys, {} not read: {:?}",
            config.as_object().unwrap().len(),
            ignored.len(),
            ignored.keys()
        );
    }
}
