//! The deployment targets an artifact can be built for (`--target a100`, ..., `cpu`): one row per target with its
//! compute capability, the precisions its TensorRT can run, the default export precision, the optimization profile
//! and the builder workspace. Part of the artifact contract: `manifest.json`'s `targets` keys are these names.
//! (`crate::targets` maps a row to TensorRT's options and probes the local GPU.)

use serde::Serialize;

use super::kinds::Precision;
use crate::error::{EngineError, Result};

/// min / opt / max of one profile axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DimRange {
    pub min: usize,
    pub opt: usize,
    pub max: usize,
}

const fn r(min: usize, opt: usize, max: usize) -> DimRange {
    DimRange { min, opt, max }
}

/// The TensorRT optimization profile of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Profile {
    /// Sequences per step.
    pub batch: DimRange,
    /// New tokens per sequence per step (1 when decoding, a chunk when prefilling).
    pub sequence: DimRange,
    /// Cached positions per sequence.
    pub past: DimRange,
}

/// One deployment target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Target {
    /// Name used on the command line (`--target a100`).
    pub name: &'static str,
    /// Substrings of the GPU's marketing name that identify it (`nvidia-smi --query-gpu=name`).
    pub gpu_names: &'static [&'static str],
    /// Compute capability × 10 (`80` for sm80); 0 for `cpu`.
    pub sm: u32,
    pub fp16: bool,
    pub bf16: bool,
    pub int8: bool,
    pub fp8: bool,
    /// Precision `r1-export --target NAME` uses when none is given.
    pub default_precision: Precision,
    pub profile: Profile,
    /// TensorRT builder workspace (`trt_max_workspace_size`), bytes.
    pub workspace_bytes: u64,
}

impl Target {
    /// True for the CPU pseudo-target.
    pub fn is_cpu(&self) -> bool {
        self.sm == 0
    }

    /// Whether this target can run an artifact of `precision` (TensorRT on a GPU target).
    pub fn supports(&self, precision: Precision) -> bool {
        match precision {
            Precision::Fp32 | Precision::Int8WeightOnly | Precision::Int4WeightOnly => true,
            Precision::Fp16 => self.fp16 || self.is_cpu(),
            Precision::Int8 => self.int8 || self.is_cpu(),
        }
    }
}

const GIB: u64 = 1 << 30;
const DATACENTER: Profile = Profile { batch: r(1, 8, 64), sequence: r(1, 1, 2048), past: r(0, 1024, 8192) };
const MIDRANGE: Profile = Profile { batch: r(1, 8, 32), sequence: r(1, 1, 1024), past: r(0, 512, 4096) };
const SMALL: Profile = Profile { batch: r(1, 4, 16), sequence: r(1, 1, 512), past: r(0, 512, 2048) };

/// Every known target. sm89 (Ada) has FP8 tensor cores, so `l40s` and `l4` allow fp8 too.
#[rustfmt::skip] // a table: one target per line
pub const TARGETS: &[Target] = &[
    Target { name: "a100", gpu_names: &["A100"], sm: 80, fp16: true, bf16: true, int8: true, fp8: false, default_precision: Precision::Fp16, profile: DATACENTER, workspace_bytes: 8 * GIB },
    Target { name: "h100", gpu_names: &["H100"], sm: 90, fp16: true, bf16: true, int8: true, fp8: true, default_precision: Precision::Fp16, profile: DATACENTER, workspace_bytes: 8 * GIB },
    Target { name: "h200", gpu_names: &["H200"], sm: 90, fp16: true, bf16: true, int8: true, fp8: true, default_precision: Precision::Fp16, profile: DATACENTER, workspace_bytes: 8 * GIB },
    Target { name: "b200", gpu_names: &["B200"], sm: 100, fp16: true, bf16: true, int8: true, fp8: true, default_precision: Precision::Fp16, profile: DATACENTER, workspace_bytes: 16 * GIB },
    Target { name: "l40s", gpu_names: &["L40S"], sm: 89, fp16: true, bf16: true, int8: true, fp8: true, default_precision: Precision::Fp16, profile: MIDRANGE, workspace_bytes: 4 * GIB },
    Target { name: "l4", gpu_names: &["L4"], sm: 89, fp16: true, bf16: true, int8: true, fp8: true, default_precision: Precision::Fp16, profile: SMALL, workspace_bytes: 2 * GIB },
    Target { name: "a10g", gpu_names: &["A10G"], sm: 86, fp16: true, bf16: true, int8: true, fp8: false, default_precision: Precision::Fp16, profile: MIDRANGE, workspace_bytes: 2 * GIB },
    Target { name: "t4", gpu_names: &["T4"], sm: 75, fp16: true, bf16: false, int8: true, fp8: false, default_precision: Precision::Fp16, profile: SMALL, workspace_bytes: GIB },
    Target { name: "cpu", gpu_names: &[], sm: 0, fp16: false, bf16: false, int8: true, fp8: false, default_precision: Precision::Int8, profile: Profile { batch: r(1, 1, 64), sequence: r(1, 1, 2048), past: r(0, 512, 8192) }, workspace_bytes: 0 },
];

/// Looks a target up by name.
pub fn target(name: &str) -> Result<&'static Target> {
    TARGETS.iter().find(|t| t.name == name).ok_or_else(|| EngineError::InvalidArgument {
        name: "target".into(),
        message: format!(
            "must be one of {}; got `{name}`",
            TARGETS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
        ),
    })
}

/// The target whose GPU name matches `gpu_name` (longest match wins: `L40S` before `L4`).
pub fn target_for_gpu_name(gpu_name: &str) -> Option<&'static Target> {
    let upper = gpu_name.to_uppercase();
    TARGETS
        .iter()
        .flat_map(|t| t.gpu_names.iter().map(move |n| (t, *n)))
        .filter(|(_, n)| upper.split(|c: char| !c.is_ascii_alphanumeric()).any(|word| word == *n))
        .max_by_key(|(_, n)| n.len())
        .map(|(t, _)| t)
}
