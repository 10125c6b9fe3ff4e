//! The `r1-export` binary: bad input gives a non-zero exit and a one-line error; `--help` teaches.

use r1_export::fixture::{preset, write_checkpoint};

#[test]
fn bad_input_exits_non_zero_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    write_checkpoint(&preset("tiny-llama").unwrap(), &ck).unwrap();
    let cfg = ck.join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("LlamaForCausalLM", "GPT2LMHeadModel");
    std::fs::write(&cfg, text).unwrap();
    let out = tmp.path().join("out");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_r1-export")).arg(&ck).arg("-o").arg(&out).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains("`GPT2LMHeadModel`") && err.contains("config.json"), "{err}");
    assert!(!out.exists());
}

#[test]
fn good_input_exports_and_help_has_examples() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    write_checkpoint(&preset("tiny-qwen3").unwrap(), &ck).unwrap();
    let out = tmp.path().join("out");
    let bin = env!("CARGO_BIN_EXE_r1-export");
    let o = std::process::Command::new(bin).arg(&ck).arg("-o").arg(&out).args(["--precision", "fp16"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["precision"], "fp16");
    assert_eq!(m["kv_cache"]["dtype"], "float16");
    assert_eq!(m["outputs"][0]["dtype"], "float32");
    let h = std::process::Command::new(bin).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&h.stdout);
    assert!(help.contains("Examples:") && help.contains("--precision fp16"), "{help}");
}
