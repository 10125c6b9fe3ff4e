//! The CUDA serving graph of a GPU target (`targets.<gpu>.cuda_graph`): what ONNX Runtime's CUDA provider runs where
//! no TensorRT engine exists. Written beside a target's plan by [`super::apply`].

use std::path::Path;

use prost::Message;
use r1_engine::manifest::names::MODEL_FILE;
use r1_engine::manifest::{CudaGraph, DType, Manifest, Precision};

use super::{attention_shape, commit_version_dir};
use crate::error::{ExportError, Result};

/// Suffix of a GPU target's CUDA serving-graph folder, beside its TensorRT version folder
/// (`engines/<target>/<version>-cuda/`): a TensorRT build of the same version replaces its own folder only.
pub(super) const CUDA_DIR_SUFFIX: &str = "-cuda";

/// Why the artifact gets no CUDA serving graph (`None`: it can have one).
fn cuda_graph_refusal(manifest: &Manifest) -> Option<String> {
    if !manifest.family.is_dense() {
        return Some(format!(
            "{}: the CUDA serving graph fuses dense attention only (the latent cache stays the portable graph's)",
            manifest.family
        ));
    }
    if manifest.precision != Precision::Fp16 {
        return Some(format!(
            "ONNX Runtime's CUDA GroupQueryAttention runs float16 (and bfloat16) only; this artifact is `{}`: export \
             with --precision fp16 for the CUDA serving graph",
            manifest.precision
        ));
    }
    None
}

/// Writes the CUDA serving graph ([`r1_engine::manifest::CudaGraph`]) into `rel` (through a temporary sibling
/// folder renamed into place): the portable graph with the LM head on each row's last fed position and each layer's
/// attention fused into `com.microsoft.GroupQueryAttention` over a float16 cache read in place. Its weights are the
/// artifact's own data file, hard-linked beside it (copied where the file system cannot link), so it costs no disk.
/// `Ok(Err(why))` when the artifact cannot have one (the plan is recorded without it).
pub(super) fn write_cuda_graph(
    dir: &Path,
    manifest: &Manifest,
    rel: &str,
) -> Result<std::result::Result<CudaGraph, String>> {
    use crate::onnx::ElemType::F16;
    if let Some(why) = cuda_graph_refusal(manifest) {
        return Ok(Err(why));
    }
    let Some(shape) = attention_shape(manifest) else {
        return Ok(Err("the manifest's config has no attention shape".into()));
    };
    let mut model = crate::quantize::read_model(&dir.join(MODEL_FILE))?;
    crate::onnx::last_logits::gather_last_position_logits(&mut model, manifest.model.hidden_size)?;
    let data = r1_calibration::external::ExternalDataReader::new(dir);
    if crate::onnx::fused_attention::fuse_attention(&mut model, &shape, F16, F16, &data)? == 0 {
        return Ok(Err(format!(
            "the attention cannot be fused (a head size of {} that is not a multiple of {}, or scaled rotary tables)",
            shape.head_dim,
            crate::onnx::fused_attention::HEAD_DIM_MULTIPLE
        )));
    }
    let final_dir = dir.join(rel);
    let parent = final_dir.parent().unwrap_or(dir).to_path_buf();
    let tmp = parent.join(format!(".cuda.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(ExportError::io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(ExportError::io(&tmp))?;
    let written = (|| -> Result<Vec<String>> {
        let mut files = vec![MODEL_FILE.to_string()];
        for location in external_locations(&model) {
            if location.contains('/') || location.contains('\\') || location == ".." {
                return Err(ExportError::Graph(format!(
                    "external data `{location}` is not a file beside model.onnx; cannot place it beside the CUDA graph"
                )));
            }
            let (src, dst) = (dir.join(&location), tmp.join(&location));
            if std::fs::hard_link(&src, &dst).is_err() {
                std::fs::copy(&src, &dst).map_err(ExportError::io(&dst))?;
            }
            files.push(location);
        }
        let path = tmp.join(MODEL_FILE);
        std::fs::write(&path, model.encode_to_vec()).map_err(ExportError::io(&path))?;
        Ok(files)
    })();
    let files = commit_version_dir(&tmp, &final_dir, written)?;
    Ok(Ok(CudaGraph {
        graph: format!("{rel}/{MODEL_FILE}"),
        attention_op: format!("{}.GroupQueryAttention", crate::onnx::fused_attention::attention_domain(F16)),
        kv_cache_dtype: DType::Float16,
        last_position_logits: true,
        kv_in_place: true,
        files: files.into_iter().map(|f| format!("{rel}/{f}")).collect(),
    }))
}

/// The distinct external-data files the graph's initializers name, in first-use order.
fn external_locations(model: &r1_proto::onnx::ModelProto) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let inits = model.graph.iter().flat_map(|g| g.initializer.iter());
    for t in inits {
        let loc = t.external_data.iter().find(|e| e.key.as_deref() == Some("location")).and_then(|e| e.value.clone());
        if let Some(loc) = loc {
            if !out.contains(&loc) {
                out.push(loc);
            }
        }
    }
    out
}
