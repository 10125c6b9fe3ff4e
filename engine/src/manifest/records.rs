//! `manifest.targets`: what each per-target build recorded about itself, typed. The `cpu` entry is a [`CpuBuild`],
//! every other entry a TensorRT [`EngineBuild`] (a built engine, or with `built: false` the plan of one). An entry
//! that does not parse as the record its name stands for is an error naming the key, never a silent skip.

use std::collections::BTreeMap;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

use super::kinds::Precision;

/// The key of the CPU serving graph's record.
pub const CPU_TARGET: &str = "cpu";

/// What the optimized CPU graph records about itself (`manifest.targets.cpu`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuBuild {
    /// Always `cpu`.
    pub target: String,
    /// `true`: the graph exists.
    pub built: bool,
    /// The graph to load on ONNX Runtime CPU (relative path).
    pub graph: String,
    /// The portable graph it was made from.
    pub source_graph: String,
    /// ONNX Runtime graph optimization level used (`extended`).
    pub optimization_level: String,
    /// ONNX Runtime version that wrote it; the graph may use its contrib ops.
    pub ort_version: String,
    /// Wall time of the optimization, milliseconds.
    pub duration_ms: u64,
    /// Files written, relative to the artifact directory.
    pub files: Vec<String>,
    /// A rewrite applied to the portable graph before ONNX Runtime optimized it (the exporter's int8-wo
    /// lowering to `MatMulNBits`), as the exporter recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lowering: Option<serde_json::Value>,
    /// The graph returns `logits [batch, 1, vocab]`: each row's last fed position only (the exporter's
    /// serving rewrite); `false` (and artifacts written before it existed): every position, as `model.onnx`.
    #[serde(default)]
    pub last_position_logits: bool,
    /// Each layer's attention is one fused operator (the exporter's serving rewrite: `GroupQueryAttention`, or
    /// DeepseekV3's `r1.LatentAttention`; [`CpuBuild::attention_op`]), whose CPU kernel takes more than one new token
    /// per row only for rows without a past, or one row at a time: the engine splits such steps (`false`, and
    /// artifacts written before it existed: the portable attention).
    #[serde(default)]
    pub fused_attention: bool,
    /// The fused attention reads each row's length from the attention mask (`seqlens_k = Σ mask − 1`) instead of
    /// treating every row as full length, so its past and present can be the engine's KV pool bound in place
    /// (slots right-padded, written where each row ends). `false` (and artifacts written before it existed): the
    /// host layout, past gathered left-padded.
    #[serde(default)]
    pub kv_in_place: bool,
    /// The fused attention's operator, `domain.type`: `r1.GroupQueryAttention` (r1's kernel, float32 graphs,
    /// registered by the engine),
    /// `com.microsoft.GroupQueryAttention` (ONNX Runtime's; float16 graphs, and artifacts written before r1's
    /// kernel existed, which record nothing here), or `r1.LatentAttention` (DeepseekV3's latent attention, float32
    /// graphs; its cache key is the latent, its value the rope key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_op: Option<String>,
    /// The fused attention's KV cache type (the graph's `past_key_values.*` inputs and `present.*` outputs), which
    /// the engine's pool stores: float16 under float32 activations with r1's kernel (`r1-export
    /// --kv-cache-dtype`). `None` (no fused attention, and artifacts written before it existed): the portable
    /// graph's, `kv_cache.dtype`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_dtype: Option<super::DType>,
    /// Each DeepseekV3 MoE layer's routed experts are one ONNX Runtime `com.microsoft.MoE` (the exporter's serving
    /// rewrite): each token runs only the experts its router picked. `false` (other families, and artifacts written
    /// before it existed): the portable graph's dense masked compute, every expert on every token.
    #[serde(default)]
    pub sparse_experts: bool,
    /// How the sparse experts are quantized (`int8-wo`, `int4-wo`, `int8`: one `com.microsoft.QMoE` per MoE layer;
    /// the exporter's `ExpertQuantization`: op, bits, block_size, scales, asymmetric, accuracy_level, padded sizes,
    /// bytes). `None`: float experts (`com.microsoft.MoE`), no sparse experts, or artifacts written before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_quantization: Option<serde_json::Value>,
}

/// What a TensorRT build records about itself (an entry of `manifest.targets`), or, with
/// `built: false`, the plan of a build still to run on a GPU host.
///
/// Paths inside (`options`, `files`, `ep_context_model`) are relative to the artifact directory, so
/// the record stays true when the artifact is copied elsewhere. Every field after `built` is
/// optional so that records written by older exporters still parse.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EngineBuild {
    /// Target name.
    pub target: String,
    /// Compute capability × 10 of the GPU it was built on (of the target, for a plan).
    pub sm: u32,
    /// Built with TensorRT hardware compatibility (Ampere+).
    #[serde(default)]
    pub hardware_compatible: bool,
    /// `true` once the engine exists; `false` for a recorded build plan.
    #[serde(default)]
    pub built: bool,
    /// Precision the engine runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// The `trt_*` options given to ONNX Runtime's TensorRT EP, cache paths relative to the artifact. The engine
    /// opens a built engine with exactly these (see `targets::session_tensorrt_options`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// The optimization profile (batch, sequence, past: min/opt/max) the options were made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileRecord>,
    /// GPU the engine was built on (`nvidia-smi` name); `None` for a plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_name: Option<String>,
    /// TensorRT library version that built it, when it could be determined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensorrt_version: Option<String>,
    /// ONNX Runtime version that built it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ort_version: Option<String>,
    /// Wall time of the build (session creation), milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Engine, timing-cache and context-model files, relative to the artifact directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// The EP-context model (relative path) that loads the engine without parsing the ONNX graph.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ep_context_model: Option<String>,
    /// For a plan: the command that runs the build on a host with the GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The CUDA serving graph written beside the plan (`r1-export --target <gpu>` where TensorRT cannot build):
    /// what ONNX Runtime's CUDA provider runs on this target when no TensorRT engine exists. `None`: not written
    /// (a TensorRT engine was built, the artifact cannot have one — see [`CudaGraph`] — or older exporters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_graph: Option<CudaGraph>,
}

/// The serving graph for ONNX Runtime's CUDA execution provider (`targets.<gpu>.cuda_graph`): the portable graph
/// with the LM head on each row's last fed position and each layer's attention one `com.microsoft.GroupQueryAttention`
/// over the engine's KV pool, bound in place on the device (float16 artifacts of the dense families: the CUDA
/// kernel runs float16 and bfloat16 only). It is left unoptimized: ONNX Runtime optimizes it for the GPU it loads on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaGraph {
    /// The graph (relative path, inside `engines/<target>/`).
    pub graph: String,
    /// The fused attention's operator, `domain.type` (`com.microsoft.GroupQueryAttention`).
    pub attention_op: String,
    /// The KV cache type of its `past_key_values.*` inputs and `present.*` outputs (the device pool's).
    pub kv_cache_dtype: super::DType,
    /// Returns `logits [batch, 1, vocab]`, each row's last fed position (only that crosses back to the host).
    pub last_position_logits: bool,
    /// Row lengths come from the attention mask and past/present can share the pool's memory (as `targets.cpu`).
    pub kv_in_place: bool,
    /// Files written (graph and its weights), relative to the artifact directory.
    pub files: Vec<String>,
}

/// A target's optimization profile as recorded in the manifest (plain `[min, opt, max]` triples).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileRecord {
    /// Sequences per step.
    pub batch: [usize; 3],
    /// New tokens per sequence per step.
    pub sequence: [usize; 3],
    /// Cached positions per sequence.
    pub past: [usize; 3],
}

/// One entry of `manifest.targets`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TargetRecord {
    /// `targets.cpu`: the ONNX Runtime-optimized CPU serving graph.
    Cpu(CpuBuild),
    /// `targets.<gpu target>`: a TensorRT engine, or its plan.
    TensorRt(EngineBuild),
}

impl TargetRecord {
    /// Files the build wrote, relative to the artifact directory (none for a plan).
    pub fn files(&self) -> Vec<&String> {
        match self {
            TargetRecord::Cpu(b) => b.files.iter().collect(),
            TargetRecord::TensorRt(b) => b.files.iter().chain(b.cuda_graph.iter().flat_map(|c| &c.files)).collect(),
        }
    }
}

/// `manifest.targets`: the records by target name, each parsed as the record its name stands for.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[serde(transparent)]
pub struct Targets(BTreeMap<String, TargetRecord>);

impl Targets {
    /// The `cpu` record, when the CPU serving graph was built.
    pub fn cpu(&self) -> Option<&CpuBuild> {
        match self.0.get(CPU_TARGET) {
            Some(TargetRecord::Cpu(b)) => Some(b),
            _ => None,
        }
    }

    /// The graph the ort backend should open on CPU: the serving graph the `cpu` record names — inside
    /// `engines/cpu/` (`engines/cpu/<version>/model.onnx` since builds are versioned; [`super::names::CPU_GRAPH`]
    /// before) — when the record says it was built and the file is in `dir`; `None`: the portable `model.onnx`.
    pub fn cpu_graph(&self, dir: &std::path::Path) -> Option<&str> {
        let record = self.cpu()?;
        let inside = record.graph.starts_with(&format!("{}/", super::names::engine_dir(CPU_TARGET)))
            && !record.graph.split('/').any(|part| part == "..");
        (record.built && inside && dir.join(&record.graph).is_file()).then_some(record.graph.as_str())
    }

    /// The TensorRT record (built or planned) of GPU target `name`.
    pub fn tensorrt(&self, name: &str) -> Option<&EngineBuild> {
        match self.0.get(name) {
            Some(TargetRecord::TensorRt(b)) => Some(b),
            _ => None,
        }
    }

    /// The CUDA serving graph to open on a GPU without TensorRT: target `preferred`'s when it records one (the local
    /// GPU's target), else the first GPU target's that does (the graph is the same for every GPU: ONNX Runtime
    /// optimizes it at load). `None` when no record names one whose file is in `dir`.
    pub fn cuda_graph(&self, dir: &std::path::Path, preferred: Option<&str>) -> Option<&CudaGraph> {
        let usable = |c: &&CudaGraph| {
            c.graph.starts_with("engines/")
                && !c.graph.split('/').any(|part| part == "..")
                && dir.join(&c.graph).is_file()
        };
        let of = |name: &str| self.tensorrt(name).and_then(|b| b.cuda_graph.as_ref()).filter(usable);
        preferred.and_then(of).or_else(|| {
            self.0.iter().find_map(|(name, r)| match r {
                TargetRecord::TensorRt(_) => of(name),
                TargetRecord::Cpu(_) => None,
            })
        })
    }

    /// The record of `name`, whatever its kind.
    pub fn get(&self, name: &str) -> Option<&TargetRecord> {
        self.0.get(name)
    }

    /// Records the CPU serving graph (replacing an earlier record).
    pub fn set_cpu(&mut self, build: CpuBuild) {
        self.0.insert(CPU_TARGET.to_string(), TargetRecord::Cpu(build));
    }

    /// Records a TensorRT build or plan under its target name (replacing an earlier record).
    pub fn set_tensorrt(&mut self, build: EngineBuild) {
        self.0.insert(build.target.clone(), TargetRecord::TensorRt(build));
    }

    /// Removes the record of `name`.
    pub fn remove(&mut self, name: &str) -> Option<TargetRecord> {
        self.0.remove(name)
    }

    /// Target names and records, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &TargetRecord)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Whether no target was built or planned.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `{"graph": "model.onnx"}`: what exporters before the typed records wrote under `targets.cpu` for an artifact
/// without a CPU build (meaning "the portable graph"). Read as no record, so those artifacts still load; nothing
/// writes it any more.
fn is_legacy_cpu_placeholder(value: &serde_json::Value) -> bool {
    value.as_object().is_some_and(|o| o.len() == 1 && o.get("graph").and_then(|g| g.as_str()) == Some("model.onnx"))
}

impl<'de> Deserialize<'de> for Targets {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = BTreeMap::<String, serde_json::Value>::deserialize(deserializer)?;
        let mut out = BTreeMap::new();
        for (name, value) in raw {
            if name == CPU_TARGET && is_legacy_cpu_placeholder(&value) {
                continue;
            }
            if super::target_table::target(&name).is_err() {
                return Err(D::Error::custom(format!(
                    "`targets.{name}`: not a target r1 builds for (one of {})",
                    super::target_table::TARGETS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
                )));
            }
            let record = if name == CPU_TARGET {
                serde_json::from_value::<CpuBuild>(value).map(TargetRecord::Cpu)
            } else {
                serde_json::from_value::<EngineBuild>(value).map(TargetRecord::TensorRt)
            }
            .map_err(|e| D::Error::custom(format!("`targets.{name}`: {e}")))?;
            if let TargetRecord::TensorRt(b) = &record {
                if b.target != name {
                    return Err(D::Error::custom(format!(
                        "`targets.{name}`: the record says `target: {}`; a TensorRT record is stored under its own target name",
                        b.target
                    )));
                }
            }
            out.insert(name, record);
        }
        Ok(Targets(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu() -> CpuBuild {
        CpuBuild {
            target: "cpu".into(),
            built: true,
            graph: "engines/cpu/model.onnx".into(),
            source_graph: "model.onnx".into(),
            optimization_level: "extended".into(),
            ort_version: "1.31.1".into(),
            duration_ms: 12,
            files: vec!["engines/cpu/model.onnx".into()],
            lowering: None,
            last_position_logits: true,
            fused_attention: true,
            kv_in_place: true,
            attention_op: Some("r1.GroupQueryAttention".into()),
            kv_cache_dtype: Some(crate::manifest::DType::Float16),
            sparse_experts: false,
            expert_quantization: None,
        }
    }

    #[test]
    fn records_round_trip_by_kind() {
        let mut t = Targets::default();
        t.set_cpu(cpu());
        let plan = EngineBuild {
            target: "a100".into(),
            sm: 80,
            hardware_compatible: true,
            precision: Some(Precision::Fp16),
            ..EngineBuild::default()
        };
        t.set_tensorrt(plan.clone());
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["cpu"]["graph"], "engines/cpu/model.onnx");
        assert_eq!(json["a100"]["precision"], "fp16");
        let back: Targets = serde_json::from_value(json).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.cpu(), Some(&cpu()));
        assert_eq!(back.tensorrt("a100"), Some(&plan));
        assert_eq!(back.tensorrt("cpu"), None);
    }

    #[test]
    fn the_placeholder_of_older_exporters_reads_as_no_record() {
        let old = serde_json::json!({"cpu": {"graph": "model.onnx"}});
        let t: Targets = serde_json::from_value(old).unwrap();
        assert!(t.is_empty() && t.cpu().is_none());
    }

    #[test]
    fn an_entry_that_is_not_its_record_is_an_error_naming_the_key() {
        let partial = serde_json::json!({"cpu": {"graph": "engines/cpu/model.onnx", "built": true}});
        let e = serde_json::from_value::<Targets>(partial).unwrap_err().to_string();
        assert!(e.contains("`targets.cpu`") && e.contains("missing field"), "{e}");
        let bad_precision = serde_json::json!({"h100": {"target": "h100", "sm": 90, "precision": "fp4"}});
        let e = serde_json::from_value::<Targets>(bad_precision).unwrap_err().to_string();
        assert!(e.contains("`targets.h100`") && e.contains("fp4"), "{e}");
        let unknown = serde_json::json!({"v100": {"target": "v100", "sm": 70}});
        let e = serde_json::from_value::<Targets>(unknown).unwrap_err().to_string();
        assert!(e.contains("`targets.v100`") && e.contains("a100, h100"), "{e}");
        let misfiled = serde_json::json!({"h100": {"target": "a100", "sm": 80}});
        let e = serde_json::from_value::<Targets>(misfiled).unwrap_err().to_string();
        assert!(e.contains("`targets.h100`") && e.contains("target: a100"), "{e}");
    }

    #[test]
    fn the_cuda_graph_of_the_local_target_is_preferred_and_only_files_inside_the_artifact_count() {
        let dir = tempfile::tempdir().unwrap();
        let cuda = |target: &str, graph: &str| EngineBuild {
            target: target.into(),
            sm: 90,
            cuda_graph: Some(CudaGraph {
                graph: graph.into(),
                attention_op: "com.microsoft.GroupQueryAttention".into(),
                kv_cache_dtype: crate::manifest::DType::Float16,
                last_position_logits: true,
                kv_in_place: true,
                files: vec![graph.into()],
            }),
            ..EngineBuild::default()
        };
        for f in ["engines/h100/v-cuda/model.onnx", "engines/l4/v-cuda/model.onnx"] {
            std::fs::create_dir_all(dir.path().join(f).parent().unwrap()).unwrap();
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let mut t = Targets::default();
        t.set_tensorrt(cuda("h100", "engines/h100/v-cuda/model.onnx"));
        t.set_tensorrt(cuda("l4", "engines/l4/v-cuda/model.onnx"));
        t.set_tensorrt(cuda("a100", "engines/a100/../../../elsewhere/model.onnx"));
        t.set_tensorrt(cuda("h200", "engines/h200/missing/model.onnx"));
        let graph = |preferred| t.cuda_graph(dir.path(), preferred).map(|c| c.graph.as_str());
        assert_eq!(graph(Some("l4")), Some("engines/l4/v-cuda/model.onnx"), "the local GPU's target first");
        // A path out of the artifact or a missing file is never opened; another target's graph serves instead.
        assert_eq!(graph(Some("a100")), Some("engines/h100/v-cuda/model.onnx"));
        assert_eq!(graph(Some("h200")), Some("engines/h100/v-cuda/model.onnx"));
        assert_eq!(graph(None), Some("engines/h100/v-cuda/model.onnx"));
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["l4"]["cuda_graph"]["kv_cache_dtype"], "float16");
        assert_eq!(serde_json::from_value::<Targets>(json).unwrap(), t, "round trip");
        assert!(Targets::default().cuda_graph(dir.path(), Some("h100")).is_none());
    }
}
