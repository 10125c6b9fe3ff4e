//! GPU target table and its mapping to ONNX Runtime's TensorRT execution-provider options.
//!
//! One row per deployment target: compute capability, which reduced precisions TensorRT can use
//! there, the default export precision, the optimization profile (min/opt/max of batch, new
//! sequence length and past length) and the builder workspace. [`tensorrt_options`] turns a row
//! plus an artifact's manifest into the exact `trt_*` key/value list ONNX Runtime documents; the
//! ort backend feeds that list to `ort::ep::TensorRT` unchanged, so the unit tests below pin what
//! TensorRT is asked to build.
//!
//! [`detect_local_gpu`] reads `nvidia-smi` (or `/proc/driver/nvidia/gpus`) so an engine built for
//! one GPU is refused on another unless it was built hardware-compatible ([`check_engine_host`]).

use std::path::{Path, PathBuf};

use crate::error::{EngineError, Result};
use crate::manifest::{names, Dim, EngineBuild, Manifest, Precision, ProfileRecord};

pub use crate::manifest::target_table::{target, target_for_gpu_name, DimRange, Profile, Target, TARGETS};

/// Settings of one TensorRT build beyond what the target table fixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrtSettings {
    /// Engine and timing caches go here (`OUT_DIR/engines/<target>/`).
    pub cache_dir: PathBuf,
    /// Build with TensorRT's Ampere-plus hardware compatibility (runs on any sm80+ GPU).
    pub hardware_compatible: bool,
    /// Also write an EP-context model (`model_ctx.onnx`) that loads the engine without ONNX parsing.
    pub dump_ep_context_model: bool,
    /// TensorRT builder optimization level (0-5; TensorRT's default is 3).
    pub builder_optimization_level: u8,
}

impl TrtSettings {
    /// Defaults for `target` in artifact directory `dir`: caches in `dir/engines/<target>`,
    /// EP-context model on, level 3, not hardware-compatible.
    pub fn for_artifact(dir: &Path, target: &Target) -> Self {
        TrtSettings {
            cache_dir: dir.join(names::engine_dir(target.name)),
            hardware_compatible: false,
            dump_ep_context_model: true,
            builder_optimization_level: 3,
        }
    }
}

/// File name of the EP-context model inside the engine cache directory.
pub const EP_CONTEXT_FILE: &str = "model_ctx.onnx";

/// The `trt_profile_{min,opt,max}_shapes` strings: every input with a symbolic dim, `name:AxBxC`,
/// comma-separated, in graph order. Symbols: `batch`, `sequence`, `past_sequence`, `total_sequence`.
pub fn profile_shapes(target: &Target, manifest: &Manifest) -> Result<[String; 3]> {
    let p = target.profile;
    let mut out: [Vec<String>; 3] = Default::default();
    for spec in &manifest.inputs {
        if !spec.shape.iter().any(|d| matches!(d, Dim::Symbolic(_))) {
            continue;
        }
        for (k, pick) in [|d: DimRange| d.min, |d: DimRange| d.opt, |d: DimRange| d.max].iter().enumerate() {
            let mut dims = Vec::with_capacity(spec.shape.len());
            for d in &spec.shape {
                let v = match d {
                    Dim::Fixed(n) => usize::try_from(*n).map_err(|_| EngineError::InvalidArgument {
                        name: format!("input `{}` shape", spec.name),
                        message: format!("fixed dims must be >= 0, got {n}"),
                    })?,
                    Dim::Symbolic(s) => match s.as_str() {
                        "batch" | "batch_size" => pick(p.batch),
                        "sequence" | "sequence_length" => pick(p.sequence),
                        "past_sequence" | "past_sequence_length" => pick(p.past),
                        "total_sequence" | "total_sequence_length" => pick(p.past) + pick(p.sequence),
                        other => {
                            return Err(EngineError::InvalidArgument {
                                name: format!("input `{}` shape", spec.name),
                                message: format!(
                                "symbolic dim must be batch, sequence, past_sequence or total_sequence; got `{other}`"
                            ),
                            })
                        }
                    },
                };
                dims.push(v.to_string());
            }
            out[k].push(format!("{}:{}", spec.name, dims.join("x")));
        }
    }
    Ok(out.map(|v| v.join(",")))
}

/// The TensorRT EP options (ONNX Runtime's documented `trt_*` names) for running `manifest` on
/// `target`. Refuses precisions the target cannot run.
pub fn tensorrt_options(target: &Target, manifest: &Manifest, settings: &TrtSettings) -> Result<Vec<(String, String)>> {
    if target.is_cpu() {
        return Err(EngineError::InvalidArgument {
            name: "target".into(),
            message: "TensorRT needs a GPU target, got `cpu`".into(),
        });
    }
    let precision = manifest.precision;
    if !target.supports(precision) {
        return Err(EngineError::InvalidArgument {
            name: "precision".into(),
            message: format!("{} (sm{}) cannot run `{precision}` with TensorRT", target.name, target.sm),
        });
    }
    if manifest.int4_zero_points() {
        return Err(EngineError::InvalidArgument {
            name: "precision".into(),
            message: format!(
                "this `int4-wo` artifact has INT4 zero points (asymmetric), which TensorRT's block-quantized INT4 cannot take; re-export it for {} with --int4-scheme symmetric",
                target.name
            ),
        });
    }
    let (fp16, bf16, int8) = match precision {
        Precision::Fp16 | Precision::Int8WeightOnly | Precision::Int4WeightOnly => (true, false, false),
        // Explicit QDQ graphs: INT8 layers come from the Q/DQ pairs; the rest runs fp16.
        Precision::Int8 => (target.fp16, false, true),
        Precision::Fp32 => (false, false, false),
    };
    let [min, opt, max] = profile_shapes(target, manifest)?;
    let b = |v: bool| if v { "1" } else { "0" }.to_string();
    let cache = settings.cache_dir.display().to_string();
    let mut o: Vec<(String, String)> = vec![
        ("trt_fp16_enable".into(), b(fp16)),
        ("trt_bf16_enable".into(), b(bf16)),
        ("trt_int8_enable".into(), b(int8)),
        ("trt_engine_cache_enable".into(), "1".into()),
        ("trt_engine_cache_path".into(), cache.clone()),
        ("trt_timing_cache_enable".into(), "1".into()),
        ("trt_timing_cache_path".into(), cache.clone()),
        ("trt_profile_min_shapes".into(), min),
        ("trt_profile_opt_shapes".into(), opt),
        ("trt_profile_max_shapes".into(), max),
        ("trt_engine_hw_compatible".into(), b(settings.hardware_compatible)),
        ("trt_builder_optimization_level".into(), settings.builder_optimization_level.to_string()),
        ("trt_max_workspace_size".into(), target.workspace_bytes.to_string()),
    ];
    if settings.dump_ep_context_model {
        o.push(("trt_dump_ep_context_model".into(), "1".into()));
        o.push(("trt_ep_context_file_path".into(), settings.cache_dir.join(EP_CONTEXT_FILE).display().to_string()));
        // Embed mode 0: the context model points at the engine file next to it instead of holding
        // the (multi-GB) engine bytes inside a protobuf attribute.
        o.push(("trt_ep_context_embed_mode".into(), "0".into()));
    }
    Ok(o)
}

/// Option keys whose values are paths, recorded relative to the artifact directory.
const TRT_PATH_OPTIONS: [&str; 3] = ["trt_engine_cache_path", "trt_timing_cache_path", "trt_ep_context_file_path"];

/// The TensorRT EP options a session opens `target`'s engine with, and the cache folder they name.
///
/// A built engine is opened with the options it was built with, as its record in `manifest.json` lists them
/// (paths made absolute under `dir`, or under `cache_dir` when given): an engine built `--hardware-compatible` is
/// opened asking for hardware compatibility, whatever `hardware_compatible` says here. Without a built record (a plan,
/// or nothing: ONNX Runtime then builds the engine at first load), the options are computed from the target table
/// with `hardware_compatible` (or the plan's setting, when it asked for it).
pub fn session_tensorrt_options(
    dir: &Path,
    manifest: &Manifest,
    target: &Target,
    hardware_compatible: bool,
    cache_dir: Option<&Path>,
) -> Result<(PathBuf, Vec<(String, String)>)> {
    let record = manifest.targets.tensorrt(target.name);
    match record {
        Some(b) if b.built && !b.options.is_empty() => {
            // The folder the engine was built in, as recorded (`engines/<target>/<version>` since builds are
            // versioned, `engines/<target>` before); `cache_dir` stands for that folder.
            let rel_cache =
                b.options.get("trt_engine_cache_path").cloned().unwrap_or_else(|| names::engine_dir(target.name));
            let cache = cache_dir.map(Path::to_path_buf).unwrap_or_else(|| dir.join(&rel_cache));
            let options = b
                .options
                .iter()
                .map(|(k, v)| {
                    let v = if TRT_PATH_OPTIONS.contains(&k.as_str()) {
                        let rest = v.strip_prefix(&rel_cache).unwrap_or(v).trim_start_matches('/');
                        if rest.is_empty() { cache.clone() } else { cache.join(rest) }.display().to_string()
                    } else {
                        v.clone()
                    };
                    (k.clone(), v)
                })
                .collect();
            Ok((cache, options))
        }
        _ => {
            let cache = cache_dir.map(Path::to_path_buf).unwrap_or_else(|| dir.join(names::engine_dir(target.name)));
            let mut settings = TrtSettings::for_artifact(dir, target);
            settings.cache_dir = cache.clone();
            settings.hardware_compatible = hardware_compatible || record.is_some_and(|b| b.hardware_compatible);
            Ok((cache, tensorrt_options(target, manifest, &settings)?))
        }
    }
}

impl From<Profile> for ProfileRecord {
    fn from(p: Profile) -> Self {
        let t = |d: DimRange| [d.min, d.opt, d.max];
        ProfileRecord { batch: t(p.batch), sequence: t(p.sequence), past: t(p.past) }
    }
}

/// A GPU found on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalGpu {
    /// Marketing name, e.g. `NVIDIA A100-SXM4-80GB`.
    pub name: String,
    /// Compute capability × 10 when known.
    pub sm: Option<u32>,
}

/// The first NVIDIA GPU of this host, from `nvidia-smi`, else `/proc/driver/nvidia/gpus`.
pub fn detect_local_gpu() -> Option<LocalGpu> {
    let smi = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,compute_cap", "--format=csv,noheader"])
        .output();
    if let Ok(o) = smi {
        if o.status.success() {
            if let Some(gpu) = parse_nvidia_smi(&String::from_utf8_lossy(&o.stdout)) {
                return Some(gpu);
            }
        }
    }
    let dir = std::fs::read_dir("/proc/driver/nvidia/gpus").ok()?;
    for e in dir.flatten() {
        if let Ok(text) = std::fs::read_to_string(e.path().join("information")) {
            if let Some(gpu) = parse_proc_information(&text) {
                return Some(gpu);
            }
        }
    }
    None
}

/// The TensorRT libraries ONNX Runtime 1.31's TensorRT provider links against (TensorRT 10).
pub const TENSORRT_LIBRARIES: [&str; 2] = ["libnvinfer.so.10", "libnvonnxparser.so.10"];

/// The first of [`TENSORRT_LIBRARIES`] the dynamic loader cannot open on this host, with the loader's reason; `None`
/// when all load. ONNX Runtime reports its TensorRT provider as available whenever `onnxruntime-gpu` ships it, with
/// or without TensorRT installed, so this is what tells whether a TensorRT session can start.
pub fn missing_tensorrt_library() -> Option<String> {
    missing_library(&TENSORRT_LIBRARIES)
}

/// The first of `names` that `dlopen` cannot open, with the loader's message. A library that loads stays loaded (its
/// handle is leaked on purpose): the provider that needs it opens it next, and TensorRT's ~1 GB libnvinfer would
/// otherwise be mapped and initialized twice.
pub fn missing_library(names: &[&str]) -> Option<String> {
    names.iter().find_map(|name| {
        // SAFETY: loading a shared library runs its initializers; these are NVIDIA's TensorRT libraries, which
        // ONNX Runtime's provider would load into this process anyway.
        match unsafe { libloading::Library::new(*name) } {
            Ok(lib) => {
                std::mem::forget(lib);
                None
            }
            Err(e) => {
                let reason = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
                Some(format!("{name} ({reason})"))
            }
        }
    })
}

/// Parses the first line of `nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader`.
pub fn parse_nvidia_smi(out: &str) -> Option<LocalGpu> {
    let line = out.lines().map(str::trim).find(|l| !l.is_empty())?;
    let (name, cap) = line.rsplit_once(',').unwrap_or((line, ""));
    let sm = parse_compute_cap(cap.trim()).or_else(|| target_for_gpu_name(name).map(|t| t.sm));
    Some(LocalGpu { name: name.trim().to_string(), sm })
}

/// Parses `/proc/driver/nvidia/gpus/*/information` (`Model:  NVIDIA A100-...`).
pub fn parse_proc_information(text: &str) -> Option<LocalGpu> {
    let model = text.lines().find_map(|l| l.strip_prefix("Model:"))?.trim().to_string();
    let sm = target_for_gpu_name(&model).map(|t| t.sm);
    Some(LocalGpu { name: model, sm })
}

fn parse_compute_cap(s: &str) -> Option<u32> {
    let (major, minor) = s.split_once('.')?;
    Some(major.parse::<u32>().ok()? * 10 + minor.parse::<u32>().ok()?)
}

/// Refuses to run an engine built for `build.sm` on `local` unless it is the same compute
/// capability, or it was built hardware-compatible and the local GPU is Ampere or newer.
pub fn check_engine_host(build: &EngineBuild, local: Option<&LocalGpu>) -> Result<()> {
    let Some(gpu) = local else {
        return Err(EngineError::Unavailable {
            what: format!("GPU for the `{}` TensorRT engine", build.target),
            message: "no NVIDIA GPU was found (nvidia-smi and /proc/driver/nvidia/gpus); use --backend ort with the CPU execution provider or --backend tract".into(),
        });
    };
    let Some(sm) = gpu.sm else {
        return Err(EngineError::Unavailable {
            what: format!("GPU for the `{}` TensorRT engine", build.target),
            message: format!("cannot tell the compute capability of `{}`", gpu.name),
        });
    };
    if sm == build.sm || (build.hardware_compatible && sm >= 80) {
        return Ok(());
    }
    Err(EngineError::Unavailable {
        what: format!("TensorRT engine for `{}` (sm{})", build.target, build.sm),
        message: format!(
            "this host has `{}` (sm{sm}); rebuild with `r1-export build OUT_DIR --target <this gpu>`, or build with --hardware-compatible (sm80 and newer)",
            gpu.name
        ),
    })
}

#[cfg(test)]
#[path = "targets_tests.rs"]
mod tests;
