//! `r1-export --precision bf16`: refused before any work, by name, saying why and what to use instead (ONNX Runtime
//! 1.31's CPU provider has no bfloat16 MatMul / Add / Mul / Softmax kernels and tract 0.23 no bfloat16 type, so no
//! artifact r1 could serve on CPU would come out of it); `--help` says so too.
use std::process::Command;

use r1_export::fixture::{preset, write_checkpoint};

#[test]
fn bf16_is_refused_by_name_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    write_checkpoint(&preset("tiny-llama").unwrap(), &ck).unwrap();
    let bin = env!("CARGO_BIN_EXE_r1-export");
    for (value, extra) in
        [("bf16", &[][..]), ("bfloat16", &["--target", "cpu"][..]), ("BF16", &["--target", "a100"][..])]
    {
        let out = tmp.path().join(format!("out-{value}"));
        let o =
            Command::new(bin).arg(&ck).arg("-o").arg(&out).args(["--precision", value]).args(extra).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        // The flag and the value, why, and what to use instead.
        assert!(
            err.starts_with("error: ") && err.contains("`--precision`") && err.contains(&format!("`{value}`")),
            "{err}"
        );
        assert!(err.contains("ONNX Runtime 1.31") && err.contains("tract 0.23") && err.contains("bfloat16"), "{err}");
        assert!(err.contains("fp16 for GPU") && err.contains("fp32, int8-wo or int4-wo for cpu"), "{err}");
        // Before any work: nothing written, not even the temporary directory beside OUT_DIR.
        assert!(!out.exists(), "{err}");
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(leftovers.iter().all(|n| n == "ck"), "{leftovers:?}");
    }
    // The environment variable takes the same path.
    let o =
        Command::new(bin).arg(&ck).arg("-o").arg(tmp.path().join("env")).env("R1_EXPORT_PRECISION", "bf16").output();
    let err = String::from_utf8_lossy(&o.as_ref().unwrap().stderr).to_string();
    assert!(err.contains("`--precision`") && err.contains("`bf16`") && err.contains("not available"), "{err}");
}

#[test]
fn help_says_bf16_is_refused_and_why() {
    let h = Command::new(env!("CARGO_BIN_EXE_r1-export")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&h.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(help.contains("bf16 is refused") && help.contains("no bfloat16"), "{help}");
    assert!(help.contains("use fp16 for GPU targets, fp32, int8-wo or int4-wo for cpu"), "{help}");
}
