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
    let o =
        std::process::Command::new(bin).arg(&ck).arg("-o").arg(&out).args(["--precision", "fp16"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["precision"], "fp16");
    assert_eq!(m["kv_cache"]["dtype"], "float16");
    assert_eq!(m["outputs"][0]["dtype"], "float32");
    let h = std::process::Command::new(bin).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&h.stdout);
    assert!(help.contains("Examples:") && help.contains("--precision fp16"), "{help}");
}

// ---- deployment targets (`--target`, `r1-export build`) ----

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use r1_engine::backend::{BackendKind, BackendOptions, ExecutionProviderKind};
use r1_engine::manifest::Manifest;
use r1_engine::{Engine, EngineOptions, StepWork};

fn r1_export(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_r1-export")).args(args).output().unwrap()
}

/// Exports the `preset` fixture with extra arguments; returns (tempdir, artifact dir, output).
fn export_with(preset_name: &str, extra: &[&str]) -> (tempfile::TempDir, PathBuf, Output) {
    let tmp = tempfile::tempdir().unwrap();
    let ck = tmp.path().join("ck");
    write_checkpoint(&preset(preset_name).unwrap(), &ck).unwrap();
    let out = tmp.path().join("out");
    let mut args: Vec<&std::ffi::OsStr> = vec![ck.as_os_str(), "-o".as_ref(), out.as_os_str()];
    args.extend(extra.iter().map(|s| std::ffi::OsStr::new(*s)));
    let o = r1_export(&args);
    (tmp, out, o)
}

fn manifest_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// This suite's GPU paths assume a GPU-less host (CI); on a GPU host they would build for real.
fn gpu_less_host() -> bool {
    let gpu = r1_engine::targets::detect_local_gpu();
    if let Some(g) = &gpu {
        eprintln!("skipping: this host has `{}`; the plan path runs only without a GPU", g.name);
    }
    gpu.is_none()
}

#[test]
fn gpu_target_without_gpu_records_the_plan_and_prints_the_build_command() {
    if !gpu_less_host() {
        return;
    }
    let (_tmp, out, o) = export_with("tiny-qwen2", &["--target", "a100"]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let command = format!("r1-export build {} --target a100", out.display());
    assert!(err.contains(&format!("\n  {command}\n")), "{err}");
    assert!(err.contains("no NVIDIA GPU was found"), "the reason is printed: {err}");
    let m = manifest_json(&out);
    // No --precision: the target's default (fp16).
    assert_eq!(m["precision"], "fp16");
    let plan = &m["targets"]["a100"];
    assert_eq!(plan["built"], false);
    assert_eq!(plan["sm"], 80);
    assert_eq!(plan["precision"], "fp16");
    assert_eq!(plan["command"], command.as_str());
    assert_eq!(plan["profile"]["batch"], serde_json::json!([1, 8, 64]));
    assert_eq!(plan["options"]["trt_fp16_enable"], "1");
    assert_eq!(plan["options"]["trt_engine_cache_path"], "engines/a100");
    assert_eq!(plan["options"]["trt_ep_context_embed_mode"], "0");
    // Every dynamic input of this graph is in the profile: 3 id/mask inputs + 2 layers x (key, value).
    assert_eq!(plan["options"]["trt_profile_opt_shapes"].as_str().unwrap().split(',').count(), 3 + 2 * 2);
    // A plan writes no TensorRT files; beside it, the fp16 artifact gets the CUDA serving graph (what ONNX
    // Runtime's CUDA provider runs without TensorRT), printed and recorded; nothing else (the build locks stay).
    let cuda = plan["cuda_graph"]["graph"].as_str().expect("cuda_graph recorded").to_string();
    assert!(err.contains("a100: wrote the CUDA serving graph"), "{err}");
    let mut on_disk = r1_export::engines::list_files(&out, &out.join("engines")).unwrap();
    on_disk.retain(|f| !(f.starts_with("engines/.") && f.ends_with(".lock")));
    let recorded: Vec<String> = serde_json::from_value(plan["cuda_graph"]["files"].clone()).unwrap();
    assert_eq!(on_disk, recorded, "only the CUDA graph's files under engines/");
    assert!(cuda.starts_with("engines/a100/") && cuda.ends_with("-cuda/model.onnx") && recorded.contains(&cuda));
    for f in &recorded {
        assert!(m["files"][f]["sha256"].is_string(), "{f} listed in manifest.files");
    }
    assert_eq!(plan["cuda_graph"]["attention_op"], "com.microsoft.GroupQueryAttention");
    // The plan parses as the engine's record type and the manifest stays loadable.
    let parsed: r1_engine::manifest::EngineBuild = serde_json::from_value(plan.clone()).unwrap();
    assert!(!parsed.built && !parsed.hardware_compatible);
    assert_eq!(Manifest::load(&out).unwrap().targets.tensorrt("a100"), Some(&parsed));

    // `build` on this host fails, naming what is missing and what is needed, and changes nothing.
    let before = std::fs::read(out.join("manifest.json")).unwrap();
    let b = r1_export(&["build".as_ref(), out.as_os_str(), "--target".as_ref(), "a100".as_ref()]);
    let berr = stderr(&b);
    assert_eq!(b.status.code(), Some(1), "{berr}");
    assert_eq!(berr.trim_end().lines().count(), 1, "{berr}");
    assert!(
        berr.starts_with("error: ") && berr.contains("`a100` TensorRT build") && berr.contains("NVIDIA A100 (sm80)"),
        "{berr}"
    );
    assert!(berr.contains("no NVIDIA GPU was found"), "{berr}");
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);
}

#[test]
fn hardware_compatible_plan_and_several_targets() {
    if !gpu_less_host() {
        return;
    }
    let (_tmp, out, o) = export_with(
        "tiny-llama",
        &["--target", "h100,l4", "--target", "h100", "--hardware-compatible", "--precision", "fp32"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let m = manifest_json(&out);
    assert_eq!(m["precision"], "fp32");
    for (t, sm) in [("h100", 90), ("l4", 89)] {
        let p = &m["targets"][t];
        assert_eq!((p["built"].as_bool(), p["sm"].as_u64()), (Some(false), Some(sm)), "{t}");
        assert_eq!(p["hardware_compatible"], true);
        assert_eq!(p["options"]["trt_engine_hw_compatible"], "1");
        assert_eq!(p["options"]["trt_fp16_enable"], "0", "fp32 graph: no reduced precision");
        let cmd = format!("r1-export build {} --target {t} --hardware-compatible", out.display());
        assert_eq!(p["command"], cmd.as_str());
        assert!(stderr(&o).contains(&cmd));
    }
    assert_eq!(stderr(&o).matches("r1-export build").count(), 2, "h100 listed twice is planned once");
}

#[test]
fn unknown_target_and_unsupported_precision_are_refused_before_exporting() {
    let (_tmp, out, o) = export_with("tiny-llama", &["--target", "v100"]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("`v100`") && err.contains("a100, h100, h200, b200, l40s, l4, a10g, t4, cpu"), "{err}");
    assert!(!out.exists());
    let b = r1_export(&["build".as_ref(), "/nonexistent".as_ref(), "--target".as_ref(), "v100".as_ref()]);
    assert!(!b.status.success() && stderr(&b).contains("a100, h100"), "{}", stderr(&b));
    let b = r1_export(&["build".as_ref(), "/nonexistent".as_ref()]);
    assert_eq!(b.status.code(), Some(1));
    assert!(stderr(&b).contains("needs --target"), "{}", stderr(&b));
}

#[test]
fn int4_scheme_follows_the_targets() {
    let scheme = |m: &serde_json::Value| m["quantization"]["scheme"]["Int4WeightOnly"]["asymmetric"].clone();
    // No GPU target: asymmetric (zero points), what ONNX Runtime runs best.
    let (_t1, out, o) = export_with("tiny-llama", &["--precision", "int4-wo"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(scheme(&manifest_json(&out)), true);
    // A TensorRT target: symmetric, and the plan is accepted.
    if gpu_less_host() {
        let (_t2, out, o) = export_with("tiny-llama", &["--precision", "int4-wo", "--target", "a100"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let m = manifest_json(&out);
        assert_eq!(
            (scheme(&m), m["targets"]["a100"]["built"].clone()),
            (serde_json::json!(false), serde_json::json!(false))
        );
    }
    // Asking for zero points with a TensorRT target is refused before any work, naming the flag and the target.
    let (_t3, out, o) =
        export_with("tiny-llama", &["--precision", "int4-wo", "--int4-scheme", "asymmetric", "--target", "a100"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--int4-scheme") && err.contains("a100") && err.contains("zero points"), "{err}");
    assert!(!out.exists());
}

#[test]
fn quantize_lm_head_takes_three_modes() {
    let (_t1, out, o) = export_with("tiny-llama", &["--precision", "int8-wo", "--quantize-lm-head", "float"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(manifest_json(&out)["quantization"]["lm_head"], "float");
    let (_t2, out, o) = export_with("tiny-llama", &["--precision", "int8-wo", "--quantize-lm-head", "maybe"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("--quantize-lm-head") && err.contains("`maybe`") && err.contains("weights"), "{err}");
    assert!(!out.exists());
}

#[test]
fn help_teaches_targets_and_build() {
    let h = r1_export(&["--help".as_ref()]);
    let help = String::from_utf8_lossy(&h.stdout);
    for want in [
        "--target a100",
        "r1-export build ./out --target a100",
        "--hardware-compatible",
        "engines/cpu/",
        "--target cpu",
    ] {
        assert!(help.contains(want), "{want} missing from --help:\n{help}");
    }
    let h = r1_export(&["build".as_ref(), "--help".as_ref()]);
    let help = String::from_utf8_lossy(&h.stdout);
    for want in ["Examples:", "OUT_DIR", "--hardware-compatible", "TensorRT execution provider"] {
        assert!(help.contains(want), "{want} missing from build --help:\n{help}");
    }
}

/// Logits after one batched prefill of two prompts of different lengths (the shorter row is padded) and after one
/// decode step of both, on ort CPU: `[prefill a, prefill b, decode a, decode b]`.
fn two_steps(dir: &Path, ids: &[u32]) -> Vec<Vec<f32>> {
    let backend_options =
        BackendOptions { execution_provider: ExecutionProviderKind::Cpu, ..BackendOptions::default() };
    let opts = EngineOptions { backend: BackendKind::Ort, backend_options, ..EngineOptions::default() };
    let mut e = Engine::load(dir, &opts).unwrap();
    let a = e.add_sequence(ids, 2).unwrap();
    let b = e.add_sequence(&ids[..ids.len() / 2], 2).unwrap();
    let mut out: Vec<Vec<f32>> =
        e.step(&[StepWork::all(a), StepWork::all(b)]).unwrap().into_iter().map(|r| r.logits).collect();
    e.push_token(a, 7).unwrap();
    e.push_token(b, 9).unwrap();
    out.extend(e.step(&[StepWork::all(a), StepWork::all(b)]).unwrap().into_iter().map(|r| r.logits));
    assert_eq!(out.len(), 4);
    out
}

/// Makes `dir` an artifact of its own: `files` copied in from `from` (renamed `(src, dst)`), and a
/// manifest whose `files` lists exactly them (and whose `cpu` target record is kept only with `keep_cpu`).
fn artifact_view(from: &Path, dir: &Path, m: &Manifest, files: &[(&str, &str)], keep_cpu: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let mut m = m.clone();
    if !keep_cpu {
        m.targets.remove("cpu");
    }
    m.files.clear();
    for (src, dst) in files {
        std::fs::create_dir_all(dir.join(dst).parent().unwrap()).unwrap();
        std::fs::copy(from.join(src), dir.join(dst)).unwrap();
        m.files.insert(dst.to_string(), r1_export::artifact::hash_file(&dir.join(dst)).unwrap());
    }
    m.write_atomic(dir).unwrap();
}

/// Op types of the graph's nodes outside the default ONNX domain.
fn contrib_ops(path: &Path) -> Vec<String> {
    use prost::Message;
    let m = r1_proto::onnx::ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
    let nodes = m.graph.map(|g| g.node).unwrap_or_default();
    nodes
        .into_iter()
        .filter_map(|n| match n.domain.as_deref() {
            None | Some("") | Some("ai.onnx") => None,
            Some(d) => Some(format!("{d}.{}", n.op_type.as_deref().unwrap_or("?"))),
        })
        .collect()
}

#[test]
fn cpu_target_writes_an_optimized_graph_with_the_portable_graphs_logits() {
    let (_tmp, out, o) = export_with("tiny-qwen2", &["--target", "cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = Manifest::load(&out).unwrap();
    let rec = m.targets.cpu().expect("cpu record");
    // engines/cpu/<version>/model.onnx, the version a 16-hex-digit key (export/src/build_lock.rs)
    let version = rec.graph.strip_prefix("engines/cpu/").and_then(|r| r.strip_suffix("/model.onnx")).unwrap();
    assert!(version.len() == 16 && version.bytes().all(|b| b.is_ascii_hexdigit()), "{}", rec.graph);
    assert_eq!(rec.optimization_level, "extended");
    assert!(rec.built);
    // Every file the record names is in manifest.files with its true sha256 and size.
    let files = rec.files.clone();
    assert!(files.contains(&rec.graph), "{files:?}");
    for f in &files {
        assert_eq!(m.files[f], r1_export::artifact::hash_file(&out.join(f)).unwrap(), "{f}");
    }
    let mut on_disk = r1_export::engines::list_files(&out, &out.join("engines")).unwrap();
    // The build locks (engines/.cpu.lock, engines/.manifest.lock) stay; nothing else but the record's files.
    on_disk.retain(|f| !(f.starts_with("engines/.") && f.ends_with(".lock")));
    assert_eq!(on_disk, files, "no stray files under engines/");
    assert_eq!(m.targets.cpu_graph(&out), Some(rec.graph.as_str()));
    // ONNX Runtime really rewrote the graph: the portable graph has standard ops only, the
    // optimized one fused some into contrib ops (SiLU's Sigmoid * Mul became QuickGelu here).
    assert_eq!(contrib_ops(&out.join("model.onnx")), Vec::<String>::new());
    let fused = contrib_ops(&out.join(&rec.graph));
    assert!(!fused.is_empty(), "no com.microsoft op in the optimized graph");

    // The serving graph returns each row's last fed position only; the portable one every position.
    assert!(rec.last_position_logits);
    use prost::Message;
    let cpu = r1_proto::onnx::ModelProto::decode(std::fs::read(out.join(&rec.graph)).unwrap().as_slice()).unwrap();
    let logits_dims = |m: &r1_proto::onnx::ModelProto| {
        format!("{:?}", m.graph.as_ref().unwrap().output.iter().find(|o| o.name.as_deref() == Some("logits")))
    };
    assert!(logits_dims(&cpu).contains("DimValue(1)"), "{}", logits_dims(&cpu));

    // Same logits for a batch of two prompts of different lengths, prefill and decode. Each graph is opened as
    // an artifact of its own (only the portable graph; only the serving graph with its record), so that which
    // file the engine prefers cannot make both sides the same graph.
    let root = out.parent().unwrap();
    let data = |d: &str| if d.ends_with("model.onnx.data") { "model.onnx.data" } else { "model.onnx" };
    let portable: Vec<(&str, &str)> = ["model.onnx", "model.onnx.data"].iter().map(|f| (*f, data(f))).collect();
    let serving: Vec<(&str, &str)> = files.iter().map(|f| (f.as_str(), f.as_str())).collect();
    artifact_view(&out, &root.join("portable"), &m, &portable, false);
    artifact_view(&out, &root.join("optimized"), &m, &serving, true);
    let ids = [3u32, 14, 15, 92, 65, 35];
    let a = two_steps(&root.join("portable"), &ids);
    let b = two_steps(&root.join("optimized"), &ids);
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        assert_eq!(a.len(), b.len());
        let scale = a.iter().fold(0f32, |s, v| s.max(v.abs()));
        let diff = a.iter().zip(b.iter()).fold(0f32, |d, (x, y)| d.max((x - y).abs()));
        assert!(scale > 0.0 && diff <= 1e-4 * scale.max(1.0), "logits {i}: max |diff| {diff} (logit scale {scale})");
    }
    assert_ne!(a[0], a[1], "the two rows are different prompts");

    // `build --target cpu` again finds this version built: a no-op that leaves the manifest as it was.
    let before = std::fs::read(out.join("manifest.json")).unwrap();
    let b = r1_export(&["build".as_ref(), out.as_os_str(), "--target".as_ref(), "cpu".as_ref()]);
    assert!(b.status.success(), "{}", stderr(&b));
    assert!(stderr(&b).contains("cpu: already built for this artifact"), "{}", stderr(&b));
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);
    assert!(
        !std::fs::read_dir(&out).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with('.')),
        "no temporary files left"
    );
}

// ---- quantization flags on the trained arith-r1 fixture ----

/// `r1-export tests/fixtures/arith-r1 -o OUT ARGS... --quiet`; `{fixture}` in an argument is the fixture's path.
fn arith_export(out: &Path, args: &[&str]) -> Output {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/arith-r1");
    let fix = fixture.to_str().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_r1-export"));
    cmd.arg(&fixture).arg("-o").arg(out).arg("--quiet");
    cmd.args(args.iter().map(|a| a.replace("{fixture}", fix)));
    cmd.output().unwrap()
}

#[test]
fn accuracy_gate_refuses_a_lossy_export_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("int4");
    // Symmetric 128-row blocks on a hidden size of 56: measured 49/60 against fp32's 53/60.
    let o = arith_export(
        &out,
        &[
            "--precision=int4-wo",
            "--opset=21",
            "--int4-scheme=symmetric",
            "--int4-block-size=128",
            "--eval-problems={fixture}/user_eval/problems.jsonl",
            "--eval-limit=60",
            "--max-accuracy-loss=0",
        ],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("--max-accuracy-loss") && e.contains("(53/60)") && e.contains("the 0 allowed"), "{e}");
    assert!(e.contains("no artifact was written"), "{e}");
    assert!(!out.exists(), "no artifact");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "no staging or temporary folder left");
}

#[test]
fn prompts_are_answered_before_calibration_and_int4_flags_are_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("int4");
    let keep = "/model/layers.0/self_attn/o_proj/MatMul";
    let o = arith_export(
        &out,
        &[
            "--precision=int4-wo",
            "--opset=21",
            "--calibration-data={fixture}/user_eval/prompts.jsonl",
            "--calibration-samples=8",
            "--report-samples=2",
            "--calibration-generate-tokens=6",
            &format!("--keep-float={keep}"),
            "--awq=on",
            "--eval-problems={fixture}/user_eval/problems.jsonl",
            "--eval-limit=8",
            "--max-accuracy-loss=100",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    // 10 prompts read (8 + 2 held out), each answered with exactly 6 tokens (the replies are longer than that).
    assert!(e.contains("generated by the fp32 model after 10 open samples (up to 6 each)"), "{e}");
    assert!(e.contains("60 generated"), "{e}");
    assert!(e.contains(&format!("kept float: {keep}")), "{e}");
    let q = &manifest_json(&out)["quantization"];
    assert_eq!(q["keep_float"], serde_json::json!([keep]));
    assert_eq!(q["calibration_token_sources"]["generated"], 60, "{q}");
    assert!(!q["calibration"]["awq"]["choices"].as_array().unwrap().is_empty(), "{q}");
    assert!(q["skipped_matmuls"].to_string().contains(keep), "{q}");
    // The flags name what is wrong.
    let e = stderr(&arith_export(&tmp.path().join("bad"), &["--precision=int8-wo", "--keep-float=o_proj"]));
    assert!(e.contains("`o_proj` names no MatMul") && e.contains("/model/layers.0/self_attn/o_proj/MatMul"), "{e}");
}

// ---- the cpu serving graph's KV cache type ----

/// The element types of the graph's cache inputs and outputs (`past_key_values.*`, `present.*`).
fn cache_types(path: &Path) -> Vec<i32> {
    use prost::Message;
    let m = r1_proto::onnx::ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
    let g = m.graph.unwrap();
    g.input
        .iter()
        .chain(&g.output)
        .filter(|v| v.name.as_deref().is_some_and(|n| n.starts_with("past_key_values.") || n.starts_with("present.")))
        .map(|v| match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(r1_proto::onnx::type_proto::Value::TensorType(t)) => t.elem_type.unwrap_or(0),
            _ => 0,
        })
        .collect()
}

#[test]
fn kv_cache_dtype_fp16_halves_the_serving_caches_and_keeps_the_logits_within_float16_rounding() {
    use r1_engine::manifest::DType;
    let (_t32, exact, o) = export_with("tiny-qwen2", &["--target", "cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (_t16, half, o) = export_with("tiny-qwen2", &["--target", "cpu", "--kv-cache-dtype", "fp16"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (m32, m16) = (Manifest::load(&exact).unwrap(), Manifest::load(&half).unwrap());
    // auto keeps an fp32 artifact's float32 cache; fp16 makes the serving graph's caches float16 (2 layers × key,
    // value, in and out), the portable graph keeps float32.
    let (r32, r16) = (m32.targets.cpu().unwrap(), m16.targets.cpu().unwrap());
    assert_eq!((r32.kv_cache_dtype, r16.kv_cache_dtype), (Some(DType::Float32), Some(DType::Float16)));
    assert_eq!(m16.kv_cache.dtype, DType::Float32);
    assert_eq!(cache_types(&half.join(&r16.graph)), vec![10; 8], "float16 caches in the serving graph");
    assert_eq!(cache_types(&exact.join(&r32.graph)), vec![1; 8]);
    assert_ne!(r16.graph, r32.graph, "the cache type is part of the build's version key");
    // The engine's pool stores what the graph takes: half the bytes per position.
    let opts = EngineOptions {
        backend: BackendKind::Ort,
        backend_options: BackendOptions { execution_provider: ExecutionProviderKind::Cpu, ..Default::default() },
        ..EngineOptions::default()
    };
    let (e32, e16) = (Engine::load(&exact, &opts).unwrap(), Engine::load(&half, &opts).unwrap());
    assert_eq!((e32.kv_pool().dtype(), e16.kv_pool().dtype()), (DType::Float32, DType::Float16));
    assert_eq!(e32.kv_pool().bytes_per_position(), 2 * e16.kv_pool().bytes_per_position());
    // Prefill and decode logits agree within what rounding the cache to float16 moves (and are not the same
    // computation: the float16 path really ran).
    let ids = [3u32, 14, 15, 92, 65, 35];
    let (a, b) = (two_steps(&exact, &ids), two_steps(&half, &ids));
    let mut worst = 0f32;
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        let scale = a.iter().fold(0f32, |s, v| s.max(v.abs()));
        let diff = a.iter().zip(b.iter()).fold(0f32, |d, (x, y)| d.max((x - y).abs()));
        assert!(diff <= 1e-2 * scale.max(1.0), "logits {i}: max |diff| {diff} (logit scale {scale})");
        worst = worst.max(diff);
    }
    assert!(worst > 0.0, "the float16 cache changed nothing: was it used?");

    // `build` with another cache type writes a new version and records it.
    let b = r1_export(&["build".as_ref(), half.as_os_str(), "--target=cpu".as_ref(), "--kv-cache-dtype=fp32".as_ref()]);
    assert!(b.status.success(), "{}", stderr(&b));
    let rebuilt = Manifest::load(&half).unwrap();
    assert_eq!(rebuilt.targets.cpu().unwrap().kv_cache_dtype, Some(DType::Float32));
    assert_eq!(cache_types(&half.join(&rebuilt.targets.cpu().unwrap().graph)), vec![1; 8]);

    // Bad values and graphs that cannot take it are refused by name.
    let bad =
        r1_export(&["build".as_ref(), half.as_os_str(), "--target=cpu".as_ref(), "--kv-cache-dtype=bf16".as_ref()]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("`bf16` is not one of auto, fp32, fp16"), "{}", stderr(&bad));
    let tmp = tempfile::tempdir().unwrap();
    let deepseek = arith_export(&tmp.path().join("a"), &["--target", "cpu", "--kv-cache-dtype", "fp16"]);
    assert!(!deepseek.status.success(), "DeepseekV3 keeps its portable attention");
    assert!(
        stderr(&deepseek).contains("--kv-cache-dtype") && stderr(&deepseek).contains("fused attention"),
        "{}",
        stderr(&deepseek)
    );
}

/// `--mla-in-place` from the real binary: a DeepseekV3 cpu graph fuses its latent attention into r1.LatentAttention
/// and steps the pool in place only when asked (a build of its own version), and gives the default graph's greedy
/// tokens; without it the portable attention stays.
#[test]
fn mla_in_place_is_opt_in_and_gives_the_default_graphs_tokens() {
    let ck = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden/deepseek_v3_noqlora_f32");
    let tmp = tempfile::tempdir().unwrap();
    let export = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args: Vec<&std::ffi::OsStr> = vec![ck.as_os_str(), "-o".as_ref(), out.as_os_str()];
        args.extend(["--target", "cpu", "--quiet"].iter().chain(extra).map(std::ffi::OsStr::new));
        let o = r1_export(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        (Manifest::load(&out).unwrap(), out)
    };
    let ((plain, plain_dir), (fused, fused_dir)) = (export("plain", &[]), export("fused", &["--mla-in-place"]));
    let (p, f) = (plain.targets.cpu().unwrap(), fused.targets.cpu().unwrap());
    assert!(!p.kv_in_place && !p.fused_attention && p.attention_op.is_none(), "default: the portable attention");
    assert!(f.kv_in_place && f.fused_attention, "--mla-in-place: the latent cache appended in place");
    assert_eq!(f.attention_op.as_deref(), Some("r1.LatentAttention"));
    assert_ne!(p.graph, f.graph, "--mla-in-place is part of the build's version key");
    let opts = EngineOptions {
        backend: BackendKind::Ort,
        backend_options: BackendOptions { execution_provider: ExecutionProviderKind::Cpu, ..Default::default() },
        ..EngineOptions::default()
    };
    let prompt: Vec<u32> = (0..9).map(|i| (i * 13 + 5) % plain.model.vocab_size as u32).collect();
    let tokens = |dir: &Path| Engine::load(dir, &opts).unwrap().generate_greedy(&prompt, 6, &[]).unwrap();
    assert_eq!(tokens(&fused_dir), tokens(&plain_dir), "greedy tokens with and without --mla-in-place");
}
