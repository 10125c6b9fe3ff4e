//! Per-target engine builds for an artifact directory: TensorRT engines through ONNX Runtime's
//! TensorRT execution provider (GPU hosts), and the ONNX Runtime-optimized CPU graph.
//!
//! A TensorRT build is a session creation: ONNX Runtime's TensorRT EP parses `model.onnx`, builds
//! the engine for the optimization profile of the target table, and, because the options ask for
//! it, leaves the engine cache, the timing cache and an EP-context model (embed mode 0: a small
//! ONNX file that points at the engine file) in `OUT_DIR/engines/<target>/`. On a host without the
//! GPU, [`tensorrt_plan`] records what such a build will use, and [`build_command`] is the command
//! that runs it on the GPU host.
//!
//! The CPU graph ([`optimize_cpu_graph`]) is `model.onnx` (as the exporter rewrites it for serving) after
//! ONNX Runtime's *extended* graph optimizations (constant folding, redundant-node elimination, fusions into
//! ONNX Runtime contrib ops), serialized to `engines/cpu/model.onnx` + `model.onnx.data`. Not *all*: the layout level
//! adds NCHWc transforms chosen for the CPU it runs on, and ONNX Runtime warns that a graph saved
//! with it "should only be used in the same environment the model was optimized in". The
//! optimized graph needs ONNX Runtime (contrib ops); tract keeps using the portable `model.onnx`.
//!
//! This module writes files and returns records; rewriting `manifest.json` is the exporter's job.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ort::ep::{self, ArbitrarilyConfigurableExecutionProvider};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;

use r1_engine::host;
use r1_engine::manifest::names::MODEL_FILE;
pub use r1_engine::manifest::names::{CPU_GRAPH, CPU_GRAPH_DATA, ENGINES_DIR};
use r1_engine::manifest::{CpuBuild, EngineBuild, Manifest};
use r1_engine::targets::{self, LocalGpu, Target, TrtSettings, EP_CONTEXT_FILE};
use r1_engine::{EngineError, Result};

/// ONNX Runtime graph optimization level of the CPU graph (see the module docs for why not `all`).
pub const CPU_OPTIMIZATION_LEVEL: &str = "extended";
/// Builder optimization level of TensorRT builds (TensorRT's default).
pub const TRT_BUILDER_OPTIMIZATION_LEVEL: u8 = 3;

fn be(message: impl std::fmt::Display) -> EngineError {
    EngineError::Backend { backend: "ort", message: message.to_string() }
}

/// The command that finishes a planned build on a host with the target's GPU.
pub fn build_command(out_dir: &Path, target: &Target, hardware_compatible: bool) -> String {
    let mut cmd = format!("r1-export build {} --target {}", shell_quote(&out_dir.display().to_string()), target.name);
    if hardware_compatible {
        cmd.push_str(" --hardware-compatible");
    }
    cmd
}

/// Quotes `s` for a POSIX shell when it holds anything beyond `[A-Za-z0-9_./:@%+=,-]`.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "_./:@%+=,-".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// TensorRT settings with the cache folder relative to the artifact (`rel_dir`: `engines/<target>/<version>` for a
/// build, `engines/<target>` for a plan, whose version is decided by the host that builds it): what a manifest
/// records, true wherever the artifact is copied.
fn relative_settings(rel_dir: &str, hardware_compatible: bool) -> TrtSettings {
    TrtSettings {
        cache_dir: PathBuf::from(rel_dir),
        hardware_compatible,
        dump_ep_context_model: true,
        builder_optimization_level: TRT_BUILDER_OPTIMIZATION_LEVEL,
    }
}

/// The build plan of `target` for `manifest`'s graph (`built: false`): the exact `trt_*` options,
/// the profile and precision, and the command that runs it on the GPU host. `out_dir` only appears
/// in the command.
pub fn tensorrt_plan(
    out_dir: &Path,
    manifest: &Manifest,
    target: &Target,
    hardware_compatible: bool,
) -> Result<EngineBuild> {
    let rel_dir = r1_engine::manifest::names::engine_dir(target.name);
    plan_in(out_dir, manifest, target, hardware_compatible, &rel_dir)
}

/// [`tensorrt_plan`] with the engine folder `rel_dir` (relative to the artifact).
fn plan_in(
    out_dir: &Path,
    manifest: &Manifest,
    target: &Target,
    hardware_compatible: bool,
    rel_dir: &str,
) -> Result<EngineBuild> {
    let options = targets::tensorrt_options(target, manifest, &relative_settings(rel_dir, hardware_compatible))?;
    Ok(EngineBuild {
        target: target.name.to_string(),
        sm: target.sm,
        hardware_compatible,
        built: false,
        precision: Some(manifest.precision),
        options: options.into_iter().collect(),
        profile: Some(target.profile.into()),
        command: Some(build_command(out_dir, target, hardware_compatible)),
        ..EngineBuild::default()
    })
}

/// Whether the GPU of this host can build `target`: the same compute capability, or, with
/// `hardware_compatible`, any Ampere-or-newer GPU for an Ampere-or-newer target (TensorRT's
/// hardware-compatible engines run on every sm80+ GPU). The error names what was found and what
/// is needed.
pub fn check_build_gpu(target: &Target, gpu: Option<&LocalGpu>, hardware_compatible: bool) -> Result<()> {
    if target.is_cpu() {
        return Err(EngineError::InvalidArgument {
            name: "target".into(),
            message: "a TensorRT build needs a GPU target, got `cpu`".into(),
        });
    }
    let needed = format!("an NVIDIA {} (sm{})", target.gpu_names.join(" or "), target.sm);
    let what = format!("GPU for the `{}` TensorRT build", target.name);
    let Some(gpu) = gpu else {
        return Err(EngineError::Unavailable {
            what,
            message: format!(
                "it needs {needed}, but no NVIDIA GPU was found (nvidia-smi, /proc/driver/nvidia/gpus); run the build on a host with that GPU"
            ),
        });
    };
    let Some(sm) = gpu.sm else {
        return Err(EngineError::Unavailable {
            what,
            message: format!("it needs {needed}; this host has `{}`, whose compute capability is unknown", gpu.name),
        });
    };
    if sm == target.sm || (hardware_compatible && sm >= 80 && target.sm >= 80) {
        return Ok(());
    }
    let hint = if sm >= 80 && target.sm >= 80 && !hardware_compatible {
        format!(", or add --hardware-compatible (any sm80+ GPU can build an engine that runs on {})", target.name)
    } else {
        String::new()
    };
    let here = targets::target_for_gpu_name(&gpu.name)
        .map_or(String::new(), |t| format!("; build `--target {}` here", t.name));
    Err(EngineError::Unavailable {
        what,
        message: format!("it needs {needed}, but this host has `{}` (sm{sm}){here}{hint}", gpu.name),
    })
}

/// Checks everything a TensorRT build of `target` needs on this host: the GPU, then ONNX Runtime
/// with its TensorRT EP. Returns the GPU on success.
pub fn check_build_host(target: &Target, hardware_compatible: bool) -> Result<LocalGpu> {
    let gpu = targets::detect_local_gpu();
    check_build_gpu(target, gpu.as_ref(), hardware_compatible)?;
    let gpu = gpu.ok_or_else(|| be("GPU vanished between checks"))?;
    if !host::tensorrt_ep_available()? {
        return Err(host::no_tensorrt_ep(&gpu));
    }
    if let Some(missing) = targets::missing_tensorrt_library() {
        return Err(host::tensorrt_not_installed(&gpu, &missing));
    }
    Ok(gpu)
}

/// Builds the TensorRT engine of `target` for the artifact in `dir` on this host's GPU, into `dir/<rel_dir>`
/// (`engines/<target>/<version>`; emptied first: the caller holds the target's build lock and no manifest names
/// the folder yet, see [`crate::build_lock`]). It is built in place, not renamed into place, because the EP-context
/// model records the engine file's path; the manifest names the folder only once the build is complete. Every node
/// must run on TensorRT (an EP-context model requires it), so CPU fallback is disabled and a graph TensorRT cannot
/// take fails the build.
pub fn build_tensorrt(
    dir: &Path,
    manifest: &Manifest,
    target: &Target,
    hardware_compatible: bool,
    rel_dir: &str,
) -> Result<EngineBuild> {
    let gpu = check_build_host(target, hardware_compatible)?;
    let env = host::environment()?;
    let cache_dir = dir.join(rel_dir);
    if cache_dir.exists() {
        std::fs::remove_dir_all(&cache_dir).map_err(|source| EngineError::Io { path: cache_dir.clone(), source })?;
    }
    std::fs::create_dir_all(&cache_dir).map_err(|source| EngineError::Io { path: cache_dir.clone(), source })?;
    let mut settings = relative_settings(rel_dir, hardware_compatible);
    settings.cache_dir = cache_dir.clone();
    let mut trt = ep::TensorRT::default();
    for (k, v) in targets::tensorrt_options(target, manifest, &settings)? {
        trt = trt.with_arbitrary_config(k, v);
    }
    let model = dir.join(MODEL_FILE);
    let start = Instant::now();
    let session = Session::builder(env)
        .map_err(be)?
        .with_disable_cpu_fallback()
        .map_err(be)?
        .with_execution_providers([trt.build().error_on_failure()])
        .map_err(be)?
        .commit_from_file(&model)
        .map_err(|e| be(format!("TensorRT build of {} for `{}` failed: {e}", model.display(), target.name)))?;
    let duration_ms = start.elapsed().as_millis() as u64;
    drop(session);
    let files = list_files(dir, &cache_dir)?;
    if files.is_empty() {
        return Err(be(format!("TensorRT EP created a session but wrote nothing to {}", cache_dir.display())));
    }
    let ctx = format!("{rel_dir}/{EP_CONTEXT_FILE}");
    let mut record = plan_in(dir, manifest, target, hardware_compatible, rel_dir)?;
    record.sm = gpu.sm.unwrap_or(target.sm);
    record.built = true;
    record.command = None;
    record.gpu_name = Some(gpu.name);
    record.tensorrt_version = std::fs::read_to_string("/proc/self/maps").ok().and_then(|m| parse_tensorrt_version(&m));
    record.ort_version = Some(ort_version());
    record.duration_ms = Some(duration_ms);
    record.ep_context_model = files.contains(&ctx).then_some(ctx);
    record.files = files;
    Ok(record)
}

/// The TensorRT version of the `libnvinfer.so.X.Y.Z` mapped into this process (`/proc/self/maps`
/// text), if any: the dynamic loader resolves the soname link to the fully versioned file.
pub fn parse_tensorrt_version(maps: &str) -> Option<String> {
    maps.lines().find_map(|line| {
        let file = line.rsplit('/').next()?;
        let v = file.strip_prefix("libnvinfer.so.")?;
        (v.split('.').count() >= 2 && v.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
            .then(|| v.to_string())
    })
}

/// Version of the ONNX Runtime library in use: from its build info (`git-branch=rel-1.31.1`), else
/// the version this crate expects.
pub fn ort_version() -> String {
    // `ort::info()` would load the library under its default name if nothing had loaded it yet (a panic when that
    // name is not on the loader's path): ask only once the discovered library is loaded.
    if host::environment().is_err() {
        return r1_engine::ort_lib::ORT_VERSION.to_string();
    }
    parse_ort_build_info(ort::info()).unwrap_or_else(|| r1_engine::ort_lib::ORT_VERSION.to_string())
}

/// `1.31.1` from ONNX Runtime's build info string (`... git-branch=rel-1.31.1, ...`).
pub fn parse_ort_build_info(info: &str) -> Option<String> {
    let rest = &info[info.find("rel-")? + 4..];
    let v: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let v = v.trim_end_matches('.');
    (v.contains('.')).then(|| v.to_string())
}

/// Writes the ONNX Runtime-optimized CPU graph of `model` (an artifact's `model.onnx`, or the exporter's serving
/// copy of it; its external data is resolved next to it) into `out` (a folder renamed to `<artifact>/<rel_dir>`
/// afterwards, e.g. `engines/cpu/<version>`; created if missing): `model.onnx` plus, for every initializer of 1 KiB
/// or more, `model.onnx.data`. File paths in the record are relative to the artifact directory as if `out` were
/// `<artifact>/<rel_dir>`.
pub fn optimize_cpu_graph(model: &Path, out: &Path, rel_dir: &str) -> Result<CpuBuild> {
    let env = host::environment()?;
    std::fs::create_dir_all(out).map_err(|source| EngineError::Io { path: out.to_path_buf(), source })?;
    let optimized = out.join(MODEL_FILE);
    let start = Instant::now();
    let builder = Session::builder(env)
        .map_err(be)?
        .with_intra_threads(1)
        .map_err(be)?
        .with_optimization_level(GraphOptimizationLevel::Level2)
        .map_err(be)?
        .with_optimized_model_path(&optimized)
        .map_err(be)?
        // Protobuf cannot hold more than 2 GB: weights go to external data next to the graph.
        .with_config_entry("session.optimized_model_external_initializers_file_name", CPU_GRAPH_DATA)
        .map_err(be)?
        .with_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        .map_err(be)?;
    // The serving rewrite's float32 attention is r1's operator: ONNX Runtime must know it to load the graph.
    let session = r1_engine::backend::attention::commit_with_ops(builder, |mut b| b.commit_from_file(model))
        .map_err(|e| be(format!("cannot optimize {}: {e}", model.display())))?;
    drop(session);
    let duration_ms = start.elapsed().as_millis() as u64;
    if !optimized.is_file() {
        return Err(be(format!("ONNX Runtime did not write {}", optimized.display())));
    }
    let mut files = Vec::new();
    for name in [MODEL_FILE, CPU_GRAPH_DATA] {
        if out.join(name).is_file() {
            files.push(format!("{rel_dir}/{name}"));
        }
    }
    Ok(CpuBuild {
        target: "cpu".into(),
        built: true,
        graph: format!("{rel_dir}/{MODEL_FILE}"),
        source_graph: MODEL_FILE.into(),
        optimization_level: CPU_OPTIMIZATION_LEVEL.into(),
        ort_version: ort_version(),
        duration_ms,
        files,
        lowering: None,
        last_position_logits: false,
        fused_attention: false,
        kv_in_place: false,
        attention_op: None,
        kv_cache_dtype: None,
        sparse_experts: false,
        expert_quantization: None,
    })
}

/// Regular files under `root/..` `at`, as sorted `/`-separated paths relative to `root`.
pub fn list_files(root: &Path, at: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![at.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).map_err(|source| EngineError::Io { path: d.clone(), source })?;
        for e in rd {
            let e = e.map_err(|source| EngineError::Io { path: d.clone(), source })?;
            let path = e.path();
            let ft = e.file_type().map_err(|source| EngineError::Io { path: path.clone(), source })?;
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                if let Ok(rel) = path.strip_prefix(root) {
                    let parts: Vec<String> =
                        rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
                    out.push(parts.join("/"));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use r1_engine::manifest::Targets;
    use r1_engine::targets::target;

    fn manifest(precision: &str) -> Manifest {
        let mut m: Manifest =
            serde_json::from_str(include_str!("../../engine/tests/fixtures/tiny/manifest.json")).expect("fixture");
        m.precision = precision.parse().expect("a precision name");
        m
    }

    fn gpu(name: &str, sm: u32) -> LocalGpu {
        LocalGpu { name: name.into(), sm: Some(sm) }
    }

    #[test]
    fn a100_plan_records_relative_options_profile_and_command() {
        let plan = tensorrt_plan(Path::new("/data/art"), &manifest("fp16"), target("a100").unwrap(), false).unwrap();
        let j = serde_json::to_value(&plan).unwrap();
        assert_eq!(j["target"], "a100");
        assert_eq!(j["sm"], 80);
        assert_eq!(j["built"], false);
        assert_eq!(j["hardware_compatible"], false);
        assert_eq!(j["precision"], "fp16");
        assert_eq!(j["command"], "r1-export build /data/art --target a100");
        assert_eq!(
            j["profile"],
            serde_json::json!({"batch": [1, 8, 64], "sequence": [1, 1, 2048], "past": [0, 1024, 8192]})
        );
        let o = &j["options"];
        assert_eq!(o["trt_engine_cache_path"], "engines/a100");
        assert_eq!(o["trt_timing_cache_path"], "engines/a100");
        assert_eq!(o["trt_ep_context_file_path"], "engines/a100/model_ctx.onnx");
        assert_eq!(o["trt_ep_context_embed_mode"], "0");
        assert_eq!(o["trt_dump_ep_context_model"], "1");
        assert_eq!(o["trt_fp16_enable"], "1");
        assert_eq!(o["trt_max_workspace_size"], (8u64 << 30).to_string());
        assert_eq!(o["trt_profile_min_shapes"].as_str().unwrap().split(',').next(), Some("input_ids:1x1"));
        assert_eq!(o["trt_profile_max_shapes"].as_str().unwrap().split(',').nth(1), Some("attention_mask:64x10240"));
        // Fields a plan does not have are left out, and the record reads back.
        for absent in ["gpu_name", "tensorrt_version", "ort_version", "duration_ms", "files", "ep_context_model"] {
            assert!(j.get(absent).is_none(), "{absent} in {j}");
        }
        assert_eq!(serde_json::from_value::<EngineBuild>(j).unwrap(), plan);
    }

    #[test]
    fn plan_follows_hardware_compatibility_and_refuses_what_the_gpu_cannot_run() {
        let plan = tensorrt_plan(Path::new("out dir"), &manifest("fp16"), target("h100").unwrap(), true).unwrap();
        assert_eq!(plan.command.as_deref(), Some("r1-export build 'out dir' --target h100 --hardware-compatible"));
        assert_eq!(plan.options["trt_engine_hw_compatible"], "1");
        tensorrt_plan(Path::new("o"), &manifest("int8"), target("t4").unwrap(), false).expect("t4 runs int8");
        assert!(tensorrt_plan(Path::new("o"), &manifest("fp32"), target("cpu").unwrap(), false).is_err());
    }

    #[test]
    fn older_four_field_records_still_parse() {
        let j = serde_json::json!({"target": "a100", "sm": 80, "hardware_compatible": false, "built": true});
        let b: EngineBuild = serde_json::from_value(j).unwrap();
        assert!(b.built && b.options.is_empty() && b.command.is_none());
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("/a/b-c_d.e"), "/a/b-c_d.e");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn build_host_check_names_what_was_found_and_what_is_needed() {
        let a100 = target("a100").unwrap();
        let e = check_build_gpu(a100, None, false).unwrap_err();
        assert_eq!(e.kind(), "unavailable");
        let m = e.to_string();
        assert!(
            m.contains("`a100` TensorRT build")
                && m.contains("NVIDIA A100 (sm80)")
                && m.contains("no NVIDIA GPU was found"),
            "{m}"
        );
        let m = check_build_gpu(a100, Some(&gpu("Tesla T4", 75)), true).unwrap_err().to_string();
        assert!(
            m.contains("`Tesla T4` (sm75)") && m.contains("--target t4") && !m.contains("--hardware-compatible"),
            "{m}"
        );
        let h100 = gpu("NVIDIA H100 80GB HBM3", 90);
        let m = check_build_gpu(a100, Some(&h100), false).unwrap_err().to_string();
        assert!(m.contains("sm90") && m.contains("--hardware-compatible"), "{m}");
        check_build_gpu(a100, Some(&h100), true).unwrap();
        check_build_gpu(a100, Some(&gpu("NVIDIA A100-SXM4-80GB", 80)), false).unwrap();
        check_build_gpu(target("h200").unwrap(), Some(&h100), false).unwrap();
        let m =
            check_build_gpu(a100, Some(&LocalGpu { name: "Mystery".into(), sm: None }), false).unwrap_err().to_string();
        assert!(m.contains("`Mystery`") && m.contains("unknown"), "{m}");
        assert_eq!(check_build_gpu(target("cpu").unwrap(), None, false).unwrap_err().kind(), "invalid_argument");
        let m = host::no_tensorrt_ep(&h100).to_string();
        assert!(
            m.contains("TensorRT execution provider is not available") && m.contains("NVIDIA H100 80GB HBM3"),
            "{m}"
        );
    }

    #[test]
    fn tensorrt_and_ort_versions_are_parsed() {
        let maps = "7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
                    7f02-7f03 r-xp 0 08:01 2 /venv/tensorrt_libs/libnvinfer.so.10.3.0\n";
        assert_eq!(parse_tensorrt_version(maps).as_deref(), Some("10.3.0"));
        assert_eq!(parse_tensorrt_version("x /lib/libnvinfer.so.10\n"), None, "soname only: no full version");
        assert_eq!(parse_tensorrt_version("x /lib/libnvinfer_plugin.so.10.3.0\n"), None);
        let info = "ORT Build Info: git-branch=rel-1.31.1, git-commit-id=abc, build type=Release";
        assert_eq!(parse_ort_build_info(info).as_deref(), Some("1.31.1"));
        assert_eq!(parse_ort_build_info("ORT Build Info: git-branch=main"), None);
    }

    #[test]
    fn preferred_cpu_graph_needs_the_record_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = manifest("fp32");
        assert_eq!(m.targets.cpu_graph(dir.path()), None, "no record: the portable graph");
        let record = CpuBuild {
            target: "cpu".into(),
            built: true,
            graph: CPU_GRAPH.into(),
            source_graph: MODEL_FILE.into(),
            optimization_level: CPU_OPTIMIZATION_LEVEL.into(),
            ort_version: "1.31.1".into(),
            duration_ms: 1,
            files: vec![CPU_GRAPH.into()],
            lowering: None,
            last_position_logits: false,
            fused_attention: false,
            kv_in_place: false,
            attention_op: None,
            kv_cache_dtype: None,
            sparse_experts: false,
            expert_quantization: None,
        };
        m.targets.set_cpu(record.clone());
        assert_eq!(m.targets.cpu_graph(dir.path()), None, "file missing");
        // Records written before the serving rewrites have neither flag: every position, portable attention.
        let mut old = serde_json::to_value(&record).unwrap();
        old.as_object_mut().unwrap().retain(|k, _| k != "last_position_logits" && k != "fused_attention");
        let old: Targets = serde_json::from_value(serde_json::json!({ "cpu": old })).unwrap();
        let old = Manifest { targets: old, ..m.clone() };
        let old_cpu = old.targets.cpu().unwrap();
        assert!(!old_cpu.last_position_logits && !old_cpu.fused_attention);
        let mut newer = m.clone();
        newer.targets.set_cpu(CpuBuild { last_position_logits: true, ..record.clone() });
        assert!(newer.targets.cpu().unwrap().last_position_logits);
        assert!(!newer.targets.cpu().unwrap().fused_attention);
        newer.targets.set_cpu(CpuBuild { fused_attention: true, ..record.clone() });
        assert!(newer.targets.cpu().unwrap().fused_attention);
        std::fs::create_dir_all(dir.path().join("engines/cpu/sub")).unwrap();
        std::fs::write(dir.path().join(CPU_GRAPH), b"x").unwrap();
        std::fs::write(dir.path().join("engines/cpu/sub/y"), b"y").unwrap();
        assert_eq!(m.targets.cpu_graph(dir.path()), Some(CPU_GRAPH));
        let files = list_files(dir.path(), &dir.path().join("engines/cpu")).unwrap();
        assert_eq!(files, ["engines/cpu/model.onnx", "engines/cpu/sub/y"]);
    }
}
