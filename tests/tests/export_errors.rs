//! Bad input to r1-export: every case is an `Err` whose message names the file or tensor, what was
//! expected and what was found; never a panic.

use std::path::{Path, PathBuf};

use r1_export::fixture::{preset, write_checkpoint};
use r1_export::{export, ExportOptions};

/// A valid tiny Qwen2 checkpoint in a fresh temp dir.
fn checkpoint() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    write_checkpoint(&preset("tiny-qwen2").unwrap(), &ck).unwrap();
    (tmp, ck)
}

fn export_err(ck: &Path) -> String {
    let out = ck.parent().unwrap().join("out");
    let e = export(&ExportOptions::new(ck, &out), &mut |_| {}).expect_err("export must fail");
    assert!(!out.exists(), "a failed export left {}", out.display());
    e.to_string()
}

fn edit_config(ck: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = ck.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

/// Rewrites one tensor's header entry of model.safetensors (keeping the header length).
fn edit_header(ck: &Path, name: &str, f: impl FnOnce(&mut serde_json::Value)) {
    let p = ck.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut h[name]);
    let mut hb = serde_json::to_vec(&h).unwrap();
    assert!(hb.len() <= n, "edited header grew");
    hb.resize(n, b' ');
    bytes[8..8 + n].copy_from_slice(&hb);
    std::fs::write(&p, bytes).unwrap();
}

#[test]
fn the_unmodified_fixture_exports() {
    let (_t, ck) = checkpoint();
    let out = ck.parent().unwrap().join("out");
    export(&ExportOptions::new(&ck, &out), &mut |_| {}).unwrap();
    assert!(out.join("manifest.json").is_file());
}

#[test]
fn missing_config() {
    let (_t, ck) = checkpoint();
    std::fs::remove_file(ck.join("config.json")).unwrap();
    let m = export_err(&ck);
    assert!(m.contains("config.json") && m.contains("not found"), "{m}");
}

#[test]
fn invalid_config_json() {
    let (_t, ck) = checkpoint();
    std::fs::write(ck.join("config.json"), "{\"hidden_size\": 64,").unwrap();
    let m = export_err(&ck);
    assert!(m.contains("config.json") && m.contains("invalid JSON") && m.contains("line 1"), "{m}");
}

#[test]
fn missing_config_field() {
    let (_t, ck) = checkpoint();
    edit_config(&ck, |v| {
        v.as_object_mut().unwrap().remove("hidden_size");
    });
    let m = export_err(&ck);
    assert!(m.contains("config.json") && m.contains("hidden_size"), "{m}");
}

#[test]
fn heads_must_divide_hidden() {
    let (_t, ck) = checkpoint();
    edit_config(&ck, |v| v["num_attention_heads"] = 5.into());
    let m = export_err(&ck);
    assert!(m.contains("num_attention_heads") && m.contains("hidden_size (64)") && m.contains("got 5"), "{m}");
}

#[test]
fn unsupported_rope_scaling_is_named() {
    let (_t, ck) = checkpoint();
    edit_config(&ck, |v| v["rope_scaling"] = serde_json::json!({"type": "dynamic", "factor": 2.0}));
    let m = export_err(&ck);
    assert!(m.contains("`dynamic`") && m.contains("llama3"), "{m}");
}

#[test]
fn unknown_architecture() {
    let (_t, ck) = checkpoint();
    edit_config(&ck, |v| v["architectures"] = serde_json::json!(["MistralForCausalLM"]));
    let m = export_err(&ck);
    assert!(m.contains("`MistralForCausalLM`") && m.contains("Qwen2ForCausalLM"), "{m}");
}

#[test]
fn missing_tensor() {
    let (_t, ck) = checkpoint();
    // Rename the tensor's key in the header (same length) so it is no longer found.
    let p = ck.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let key = b"model.layers.1.mlp.up_proj.weight";
    let at = bytes[8..8 + n].windows(key.len()).position(|w| w == key).unwrap() + 8;
    bytes[at + key.len() - 1] = b'X';
    std::fs::write(&p, bytes).unwrap();
    let m = export_err(&ck);
    assert!(
        m.contains("`model.layers.1.mlp.up_proj.weight`") && m.contains("not found") && m.contains("[128, 64]"),
        "{m}"
    );
}

#[test]
fn wrong_shape() {
    let (_t, ck) = checkpoint();
    edit_header(&ck, "model.layers.0.mlp.gate_proj.weight", |t| t["shape"] = serde_json::json!([64, 128]));
    let m = export_err(&ck);
    assert!(
        m.contains("model.safetensors")
            && m.contains("`model.layers.0.mlp.gate_proj.weight`")
            && m.contains("[64, 128]")
            && m.contains("expected [128, 64]"),
        "{m}"
    );
}

#[test]
fn wrong_dtype() {
    let (_t, ck) = checkpoint();
    // I16 has the same element size as BF16, so offsets stay valid.
    edit_header(&ck, "model.norm.weight", |t| t["dtype"] = "I16".into());
    let m = export_err(&ck);
    assert!(m.contains("`model.norm.weight`") && m.contains("I16") && m.contains("BF16"), "{m}");
}

#[test]
fn truncated_safetensors() {
    let (_t, ck) = checkpoint();
    let p = ck.join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len - 1000).unwrap();
    let m = export_err(&ck);
    assert!(m.contains("model.safetensors") && m.contains("truncated") && m.contains(&format!("{len} bytes")), "{m}");
}

// The binary's exit status and one-line error are tested in export/tests/cli.rs (where Cargo
// provides the binary's path).
