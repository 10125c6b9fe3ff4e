//! Per-target builds of an artifact (`r1-export --target ...` after an export, and
//! `r1-export build OUT_DIR --target ...`), recorded in `manifest.json`.
//!
//! - `cpu`: the ONNX Runtime-optimized serving graph in `engines/cpu/` ([`crate::engines::optimize_cpu_graph`]):
//!   first, in a temporary copy, the LM head is moved to each row's last fed position ([`crate::onnx::last_logits`])
//!   and the weight-only int8 MatMuls of an `int8-wo` graph (and the LM head of an `int8` one) are lowered to
//!   wide-block, sibling-fused `MatMulNBits` ([`r1_calibration::matmul_nbits`]); DeepseekV3's routed experts run
//!   sparsely, one `com.microsoft.MoE` per layer ([`crate::onnx::sparse_moe`]).
//! - a GPU target (`a100`, `h100`, ...): on a host with that GPU and ONNX Runtime's TensorRT EP, the
//!   TensorRT engine in `engines/<target>/` ([`crate::engines::build_tensorrt`]); elsewhere, after an
//!   export, the build plan (`built: false`, the exact `trt_*` options, profile, precision and the
//!   command to run on the GPU host). `r1-export build` never plans: it builds or fails saying why.
//!
//! Architecture invariant: after every target, `manifest.json` is rewritten atomically (temporary
//! file, fsync, rename) and lists the sha256 of every file it names, so the artifact is consistent
//! at every point a build can stop.

use std::path::Path;

mod cuda;

use crate::engines as eb;
use cuda::{write_cuda_graph, CUDA_DIR_SUFFIX};
use r1_engine::manifest::names::MODEL_FILE;
use r1_engine::manifest::{CpuBuild, DType, EngineBuild, Family, Manifest, Precision};
use r1_engine::targets::{self, Target};

use prost::Message;
use r1_calibration::matmul_nbits::{self, Lowering};

use crate::artifact::hash_file;
use crate::build_lock::{build_key, version_dir, BuildLock, MANIFEST_LOCK};
use crate::error::{ExportError, Result};

/// External data file of the lowered temporary copy (the source graph of the CPU build).
const CPU_LOWERED_DATA: &str = "model.onnx.data";

/// Which targets to build and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetOptions {
    /// Target names from [`r1_engine::targets::TARGETS`], in order; duplicates are built once.
    pub targets: Vec<String>,
    /// Build TensorRT engines hardware-compatible (run on any sm80+ GPU).
    pub hardware_compatible: bool,
    /// How long to wait for another process's build of the same target ([`crate::build_lock`]).
    pub wait: std::time::Duration,
    /// `cpu`: keep a quantized DeepseekV3 artifact's routed experts float (`com.microsoft.MoE`, as in fp32) instead
    /// of quantizing them into `com.microsoft.QMoE` (`--cpu-float-experts`: more memory, the float experts' accuracy).
    pub float_experts: bool,
    /// `cpu`: the element type of the serving graph's KV cache (`--kv-cache-dtype`).
    pub kv_cache_dtype: KvCacheDtype,
    /// `cpu`: fuse a float32 DeepseekV3 graph's latent attention into `r1.LatentAttention`, which appends the latent
    /// cache in place (`--mla-in-place`). Off by default: no cache is copied, but at R1's 128 heads its decode
    /// arithmetic is still slower than ONNX Runtime's products in the portable attention (`BENCHMARKS.md`).
    pub mla_in_place: bool,
}

/// The element type of the `cpu` serving graph's KV cache (`r1-export --kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// float16 for quantized artifacts (`int8-wo`, `int4-wo`, `int8`) and float16 graphs, whose attention can take
    /// it; the graph's own type otherwise (an `fp32` artifact keeps float32 caches: transformers' numerics).
    #[default]
    Auto,
    /// float32 caches (float32 graphs only).
    Fp32,
    /// float16 caches: half the memory per position and half the bytes a long context's decode step reads; needs
    /// the fused attention (dense families).
    Fp16,
}

impl std::str::FromStr for KvCacheDtype {
    type Err = ExportError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(KvCacheDtype::Auto),
            "fp32" | "float32" => Ok(KvCacheDtype::Fp32),
            "fp16" | "float16" => Ok(KvCacheDtype::Fp16),
            other => Err(ExportError::InvalidOption {
                option: "--kv-cache-dtype",
                message: format!("`{other}` is not one of auto, fp32, fp16"),
            }),
        }
    }
}

impl KvCacheDtype {
    /// The cache type for the artifact `manifest` describes (`auto`: float16 for a quantized dense-family
    /// artifact, whose fused attention takes it; the graph's own type otherwise).
    fn resolve(self, manifest: &Manifest) -> crate::onnx::ElemType {
        use crate::onnx::ElemType::{F16, F32};
        match self {
            KvCacheDtype::Fp32 => F32,
            KvCacheDtype::Fp16 => F16,
            KvCacheDtype::Auto if manifest.precision.is_quantized() && manifest.family.is_dense() => F16,
            KvCacheDtype::Auto => manifest.kv_cache.dtype.into(),
        }
    }

    /// What the build key records (`auto` resolves per artifact, so the resolved type is keyed).
    fn key(cache: crate::onnx::ElemType) -> &'static str {
        if cache == crate::onnx::ElemType::F16 {
            "kv_fp16"
        } else {
            ""
        }
    }
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions {
            targets: Vec::new(),
            hardware_compatible: false,
            wait: crate::build_lock::DEFAULT_WAIT,
            float_experts: false,
            kv_cache_dtype: KvCacheDtype::Auto,
            mla_in_place: false,
        }
    }
}

/// Whether a GPU target that cannot be built on this host is recorded as a plan or is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Right after an export: plan what cannot be built here.
    AfterExport,
    /// `r1-export build`: build, or fail with the reason.
    Build,
}

/// What happened to one target.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `engines/cpu/model.onnx` was written.
    Cpu(CpuBuild),
    /// A TensorRT engine was built on this host.
    Built(EngineBuild),
    /// The manifest already records this target's build of this version (same graph, options and builders), with
    /// its files present: nothing was done. `dir` is its folder, relative to the artifact.
    Current {
        /// The target.
        target: &'static str,
        /// `engines/<target>/<version>`.
        dir: String,
    },
    /// The build was recorded as a plan; `reason` says why it could not run here.
    Planned {
        /// The plan (its `command` finishes it on the GPU host), with the CUDA serving graph written here when the
        /// artifact can have one (`plan.cuda_graph`).
        plan: EngineBuild,
        /// Why this host could not build it.
        reason: String,
        /// Why no CUDA serving graph was written (`None`: it was).
        cuda_note: Option<String>,
    },
}

/// Resolves target names against the table, keeping the first of duplicates; an unknown name is an
/// error listing the valid ones.
pub fn resolve(names: &[String]) -> Result<Vec<&'static Target>> {
    let mut out: Vec<&'static Target> = Vec::new();
    for n in names {
        let t = targets::target(n.trim())
            .map_err(|e| ExportError::InvalidOption { option: "--target", message: e.to_string() })?;
        if !out.iter().any(|o| o.name == t.name) {
            out.push(t);
        }
    }
    Ok(out)
}

/// Refuses a precision that a requested GPU target cannot run, before anything is exported.
pub fn check_precision(targets: &[&Target], precision: Precision) -> Result<()> {
    for t in targets.iter().filter(|t| !t.is_cpu()) {
        if !t.supports(precision) {
            return Err(ExportError::InvalidOption {
                option: "--precision",
                message: format!(
                    "`{precision}` cannot run on {} (sm{}) with TensorRT; choose another precision or target",
                    t.name, t.sm
                ),
            });
        }
    }
    Ok(())
}

fn engine_err(dir: &Path) -> impl Fn(r1_engine::EngineError) -> ExportError + '_ {
    move |e| ExportError::Output { path: dir.to_path_buf(), message: e.to_string() }
}

/// Builds or plans every target of `opts` for the artifact in `dir`, rewriting its manifest after
/// each one. Stops at the first error (earlier targets stay recorded).
///
/// Each target is built under its build lock, into a folder named by its version key, and is a no-op when the
/// manifest already records that version ([`crate::build_lock`]): processes started together on one artifact build
/// once. `on_wait` is told when another process holds the lock.
pub fn apply(
    dir: &Path,
    opts: &TargetOptions,
    mode: Mode,
    on_wait: &mut dyn FnMut(&str, &str),
) -> Result<Vec<Outcome>> {
    let list = resolve(&opts.targets)?;
    let mut outcomes = Vec::with_capacity(list.len());
    for t in list {
        let _lock = BuildLock::acquire(dir, t.name, opts.wait, &mut |holder| on_wait(t.name, holder))?;
        // Read under the lock: another process may have built and recorded this target meanwhile.
        let manifest = Manifest::load(dir).map_err(engine_err(dir))?;
        let options = match (t.is_cpu(), opts.hardware_compatible, opts.float_experts) {
            (false, true, _) => "hardware_compatible",
            (true, _, true) => "float_experts",
            _ => "",
        };
        let cache = opts.kv_cache_dtype.resolve(&manifest);
        let kv = if t.is_cpu() { KvCacheDtype::key(cache) } else { "" };
        let mla =
            if t.is_cpu() && opts.mla_in_place && manifest.family == Family::DeepseekV3 { "mla_in_place" } else { "" };
        let options = [options, kv, mla].into_iter().filter(|o| !o.is_empty()).collect::<Vec<_>>().join(",");
        let key = build_key(&manifest, t.name, &options, &eb::ort_version());
        let rel = version_dir(t.name, &key);
        if is_current(dir, &manifest, t, &rel) {
            outcomes.push(Outcome::Current { target: t.name, dir: rel });
            continue;
        }
        let outcome = if t.is_cpu() {
            Outcome::Cpu(write_cpu_graph(dir, &manifest, &rel, opts)?)
        } else {
            gpu_target(dir, &manifest, t, opts.hardware_compatible, mode, &rel)?
        };
        record(dir, t, &outcome, opts.wait)?;
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// Records `outcome` in `manifest.json`: read, changed and replaced under the manifest lock, so that builds of
/// other targets recording at the same time lose nothing.
fn record(dir: &Path, t: &Target, outcome: &Outcome, wait: std::time::Duration) -> Result<()> {
    let _lock = BuildLock::acquire(dir, MANIFEST_LOCK, wait, &mut |_| {})?;
    let mut manifest = Manifest::load(dir).map_err(engine_err(dir))?;
    let gpu = match outcome {
        Outcome::Cpu(b) => {
            set_target_files(dir, &mut manifest, t, &b.files)?;
            manifest.targets.set_cpu(b.clone());
            None
        }
        Outcome::Built(b) | Outcome::Planned { plan: b, .. } => Some(b.clone()),
        Outcome::Current { .. } => return Ok(()),
    };
    if let Some(mut b) = gpu {
        // A TensorRT engine built later keeps the CUDA serving graph an earlier plan wrote (when its files are still
        // there): the CUDA provider still serves it where TensorRT's libraries are missing.
        if b.cuda_graph.is_none() {
            b.cuda_graph = manifest
                .targets
                .tensorrt(&b.target)
                .and_then(|old| old.cuda_graph.clone())
                .filter(|c| c.files.iter().all(|f| dir.join(f).is_file()));
        }
        let files: Vec<String> = b.files.iter().chain(b.cuda_graph.iter().flat_map(|c| &c.files)).cloned().collect();
        set_target_files(dir, &mut manifest, t, &files)?;
        manifest.targets.set_tensorrt(b);
    }
    Ok(manifest.write_atomic(dir)?)
}

/// Whether the manifest records `t` built in `rel` with every file of the record present at its recorded size.
fn is_current(dir: &Path, manifest: &Manifest, t: &Target, rel: &str) -> bool {
    let (built, files) = if t.is_cpu() {
        match manifest.targets.cpu() {
            Some(b) => (b.built && b.graph.starts_with(&format!("{rel}/")), &b.files),
            None => return false,
        }
    } else {
        match manifest.targets.tensorrt(t.name) {
            Some(b) => (b.built && b.files.iter().all(|f| f.starts_with(&format!("{rel}/"))), &b.files),
            None => return false,
        }
    };
    built
        && !files.is_empty()
        && files.iter().all(|f| {
            let size = std::fs::metadata(dir.join(f)).map(|m| m.len()).ok();
            size.is_some() && manifest.files.get(f).map(|e| e.bytes) == size
        })
}

fn gpu_target(dir: &Path, manifest: &Manifest, t: &'static Target, hw: bool, mode: Mode, rel: &str) -> Result<Outcome> {
    let err = engine_err(dir);
    match mode {
        Mode::Build => Ok(Outcome::Built(eb::build_tensorrt(dir, manifest, t, hw, rel).map_err(err)?)),
        Mode::AfterExport => match eb::check_build_host(t, hw) {
            Ok(_) => Ok(Outcome::Built(eb::build_tensorrt(dir, manifest, t, hw, rel).map_err(err)?)),
            Err(reason) => {
                // A build that cannot run here must still be possible on the GPU host: the plan
                // fails now if the precision or the graph's dims do not fit the target.
                let mut plan = eb::tensorrt_plan(dir, manifest, t, hw).map_err(err)?;
                // What ONNX Runtime's CUDA provider runs until (or instead of) the TensorRT engine.
                let cuda = write_cuda_graph(dir, manifest, &format!("{rel}{CUDA_DIR_SUFFIX}"))?;
                let cuda_note = match cuda {
                    Ok(graph) => {
                        plan.cuda_graph = Some(graph);
                        None
                    }
                    Err(why) => Some(why),
                };
                Ok(Outcome::Planned { plan, reason: reason.to_string(), cuda_note })
            }
        },
    }
}

/// Writes `engines/cpu/<version>/` (`rel`) through a temporary sibling folder renamed into place, so an
/// interrupted run never leaves a half-written graph where the manifest points. Earlier versions are left alone: a
/// server that loaded one keeps its files.
///
/// The graph ONNX Runtime optimizes is the portable one rewritten for serving: the LM head on each row's last
/// fed position only ([`crate::onnx::last_logits`]), and, for `int8-wo` / `int8`, weight-only int8 MatMuls
/// lowered to `MatMulNBits` ([`r1_calibration::matmul_nbits`]).
fn write_cpu_graph(dir: &Path, manifest: &Manifest, rel: &str, opts: &TargetOptions) -> Result<CpuBuild> {
    let final_dir = dir.join(rel);
    let parent = final_dir.parent().unwrap_or(dir).to_path_buf();
    std::fs::create_dir_all(&parent).map_err(ExportError::io(&parent))?;
    let tmp = parent.join(format!(".build.tmp-{}", std::process::id()));
    let lowered = parent.join(format!(".lowered.tmp-{}", std::process::id()));
    // Beside model.onnx, so that its external-data paths resolve when nothing is lowered.
    let rewritten = dir.join(format!(".model.cpu-source.tmp-{}.onnx", std::process::id()));
    for d in [&tmp, &lowered] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(ExportError::io(d))?;
        }
    }
    let source = serving_source(dir, manifest, &lowered, &rewritten, opts);
    let record = source.and_then(|(source, lowering, attention, moe)| {
        let mut r = eb::optimize_cpu_graph(&source, &tmp, rel).map_err(engine_err(dir))?;
        r.lowering =
            lowering.map(|l| serde_json::to_value(&l)).transpose().map_err(|e| ExportError::Graph(e.to_string()))?;
        r.last_position_logits = true;
        r.fused_attention = attention.is_some();
        r.kv_in_place = attention.is_some();
        r.kv_cache_dtype = attention.as_ref().map(|(_, cache)| *cache);
        r.attention_op = attention.map(|(op, _)| op);
        r.sparse_experts = moe.layers > 0;
        r.expert_quantization = moe
            .quantization
            .map(|q| serde_json::to_value(&q))
            .transpose()
            .map_err(|e| ExportError::Graph(e.to_string()))?;
        Ok(r)
    });
    let _ = std::fs::remove_dir_all(&lowered);
    let _ = std::fs::remove_file(&rewritten);
    let _ = std::fs::remove_file(dir.join(experts_data_file()));
    commit_version_dir(&tmp, &final_dir, record)
}

/// Renames the temporary build folder `tmp` to `final_dir` when `built` succeeded (deletes `tmp` when it failed).
/// A `final_dir` already there is the same version, left by a run that stopped before recording it (a recorded one
/// is current and never rebuilt): no manifest names it, so no server reads it, and the caller holds the build lock.
pub(super) fn commit_version_dir<T>(tmp: &Path, final_dir: &Path, built: Result<T>) -> Result<T> {
    let value = match built {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(tmp);
            return Err(e);
        }
    };
    if final_dir.exists() {
        std::fs::remove_dir_all(final_dir).map_err(ExportError::io(final_dir))?;
    }
    std::fs::rename(tmp, final_dir).map_err(ExportError::io(final_dir))?;
    Ok(value)
}

/// The fused attention's operator (`domain.type`) and cache type, when attention was fused.
type FusedAttention = Option<(String, DType)>;

/// Writes the serving form of the artifact's graph and returns its path, the lowering (when one was done) and
/// the fused attention's operator (`domain.type`) and cache type when attention was fused: `int8-wo` / `int8` graphs go to `lowered/model.onnx` (+ `model.onnx.data`, the
/// weights rewritten), the others to `rewritten`, a graph-only file beside `model.onnx` that reads the artifact's
/// own weight file. Last, the MoE layers whose experts run sparsely (and how they were quantized).
fn serving_source(
    dir: &Path,
    manifest: &Manifest,
    lowered: &Path,
    rewritten: &Path,
    opts: &TargetOptions,
) -> Result<(std::path::PathBuf, Option<Lowering>, FusedAttention, crate::onnx::sparse_moe::SparseExperts)> {
    let (float_experts, kv_cache) = (opts.float_experts, opts.kv_cache_dtype);
    let mut model = crate::quantize::read_model(&dir.join(MODEL_FILE))?;
    // int8 (W8A8) graphs hold weight-only int8 MatMuls too: the LM head by default (`--quantize-lm-head weights`).
    let lowering = if matches!(manifest.precision, Precision::Int8WeightOnly | Precision::Int8) {
        std::fs::create_dir_all(lowered).map_err(ExportError::io(lowered))?;
        Some(matmul_nbits::lower_int8_weight_only(
            &mut model,
            dir,
            lowered,
            CPU_LOWERED_DATA,
            matmul_nbits::DEFAULT_BLOCK_SIZE,
            1024,
        )?)
    } else {
        None
    };
    crate::onnx::last_logits::gather_last_position_logits(&mut model, manifest.model.hidden_size)?;
    // The lowered graph's external data lives in `lowered`, the others' beside `model.onnx`.
    let data_dir = if lowering.is_some() { lowered } else { dir };
    let dtype = crate::onnx::ElemType::from(manifest.kv_cache.dtype);
    let cache = kv_cache.resolve(manifest);
    let fused = match attention_shape(manifest) {
        Some(shape) => {
            let data = r1_calibration::external::ExternalDataReader::new(data_dir);
            let fa = crate::onnx::fused_attention::fuse_attention(&mut model, &shape, dtype, cache, &data)?;
            (fa > 0).then(|| {
                let op = format!("{}.GroupQueryAttention", crate::onnx::fused_attention::attention_domain(dtype));
                (op, if cache == crate::onnx::ElemType::F16 { DType::Float16 } else { DType::Float32 })
            })
        }
        // DeepseekV3's latent attention (float32 graphs and caches: the kernel's).
        None => match latent_shape(manifest) {
            Some(shape) if cache == dtype && opts.mla_in_place => {
                let data = r1_calibration::external::ExternalDataReader::new(data_dir);
                let n = crate::onnx::fused_latent::fuse_latent_attention(&mut model, &shape, dtype, cache, &data)?;
                let op = r1_engine::backend::attention::latent::OP_TYPE;
                (n > 0).then(|| (format!("{}.{op}", r1_engine::backend::attention::DOMAIN), DType::Float32))
            }
            _ => None,
        },
    };
    // Without the fused attention the caches stay the portable graph's: an explicit request for another type fails.
    if fused.is_none() && kv_cache != KvCacheDtype::Auto && cache != dtype {
        return Err(ExportError::InvalidOption {
            option: "--kv-cache-dtype",
            message: format!(
                "{kv_cache:?} needs the cpu serving graph's fused attention (Llama, Qwen2, Qwen3 with a head size \
                 that is a multiple of {}, unscaled rotary; DeepseekV3's latent attention takes its graph's float32 \
                 cache only); this {} artifact keeps its portable attention and its {:?} cache: use auto",
                crate::onnx::fused_attention::HEAD_DIM_MULTIPLE,
                manifest.family,
                manifest.kv_cache.dtype,
            ),
        });
    }
    // DeepseekV3: each token runs only its routed experts, relaid beside the serving graph's file (in `data_dir`).
    let sparse = match crate::onnx::sparse_moe::moe_top_k(manifest) {
        Some(k) => {
            let weights = match float_experts {
                true => crate::onnx::sparse_moe::ExpertWeights::Float,
                false => crate::onnx::sparse_moe::expert_weights(manifest),
            };
            crate::onnx::sparse_moe::sparse_experts(&mut model, k, weights, data_dir, data_dir, &experts_data_file())?
        }
        None => crate::onnx::sparse_moe::SparseExperts { layers: 0, quantization: None },
    };
    let path = if lowering.is_some() { lowered.join(MODEL_FILE) } else { rewritten.to_path_buf() };
    std::fs::write(&path, model.encode_to_vec()).map_err(ExportError::io(&path))?;
    Ok((path, lowering, fused, sparse))
}

/// The serving copy's relaid routed experts ([`crate::onnx::sparse_moe`]), beside its graph file; deleted with it.
fn experts_data_file() -> String {
    format!(".model.cpu-experts.tmp-{}.data", std::process::id())
}

/// The attention shape of a dense-family artifact (Llama, Qwen2, Qwen3: the graphs
/// [`crate::onnx::fused_attention`] rewrites), read from its manifest's `config`; `None` for other families.
pub(super) fn attention_shape(manifest: &Manifest) -> Option<crate::onnx::fused_attention::AttentionShape> {
    if !manifest.family.is_dense() {
        return None;
    }
    let get = |key: &str| manifest.config.get(key).and_then(serde_json::Value::as_u64).map(|v| v as usize);
    Some(crate::onnx::fused_attention::AttentionShape {
        num_layers: get("num_layers")?,
        num_heads: get("num_heads")?,
        num_kv_heads: get("num_kv_heads")?,
        head_dim: get("head_dim")?,
        max_positions: manifest.model.max_position_embeddings,
    })
}

/// The MLA shape of a DeepseekV3 artifact (the graphs [`crate::onnx::fused_latent`] rewrites), from its manifest's
/// `config` and KV-cache layout (key = the latent, value = the rope key, one head each); `None` for other families.
fn latent_shape(manifest: &Manifest) -> Option<crate::onnx::fused_latent::LatentShape> {
    if manifest.family != Family::DeepseekV3 {
        return None;
    }
    let kv = &manifest.kv_cache;
    Some(crate::onnx::fused_latent::LatentShape {
        num_layers: kv.num_layers,
        num_heads: manifest.config.get("num_attention_heads")?.as_u64()? as usize,
        kv_lora_rank: kv.key_dim,
        qk_rope_head_dim: kv.value_dim,
    })
}

/// Replaces the manifest's `engines/<target>/` file entries with the sha256 and size of `files`.
fn set_target_files(dir: &Path, manifest: &mut Manifest, t: &Target, files: &[String]) -> Result<()> {
    let prefix = format!("{}/", r1_engine::manifest::names::engine_dir(t.name));
    manifest.files.retain(|k, _| !k.starts_with(&prefix));
    for rel in files {
        manifest.files.insert(rel.clone(), hash_file(&dir.join(rel))?);
    }
    Ok(())
}

/// The precision an export uses when `--precision` is not given: the default precision shared by
/// every requested GPU target when the exporter can write it, else `fp32`.
pub fn default_precision(targets: &[&Target]) -> Precision {
    let mut gpu = targets.iter().filter(|t| !t.is_cpu()).map(|t| t.default_precision);
    match gpu.next() {
        Some(first) if gpu.all(|p| p == first) && !first.is_quantized() => first,
        _ => Precision::Fp32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_dedups_and_lists_valid_targets_on_error() {
        let names: Vec<String> = ["a100", "cpu", "a100"].iter().map(|s| s.to_string()).collect();
        let t: Vec<_> = resolve(&names).unwrap().iter().map(|t| t.name).collect();
        assert_eq!(t, ["a100", "cpu"]);
        let e = resolve(&["v100".to_string()]).unwrap_err().to_string();
        assert!(
            e.contains("`--target`") && e.contains("`v100`") && e.contains("a100, h100") && e.contains("cpu"),
            "{e}"
        );
    }

    #[test]
    fn precision_defaults_and_checks_follow_the_table() {
        let t = |n: &str| targets::target(n).unwrap();
        assert_eq!(default_precision(&[t("a100")]), Precision::Fp16);
        assert_eq!(default_precision(&[t("a100"), t("t4")]), Precision::Fp16);
        assert_eq!(default_precision(&[t("cpu")]), Precision::Fp32, "cpu's int8 default needs calibration");
        assert_eq!(default_precision(&[]), Precision::Fp32);
        check_precision(&[t("a100"), t("cpu")], Precision::Fp16).unwrap();
        check_precision(&[t("t4")], Precision::Int8).unwrap();
    }
}
