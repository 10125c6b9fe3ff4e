//! Writing the draft graph (`mtp.onnx` + `mtp.onnx.data`) beside the main one, and its manifest record
//! (`manifest.draft`, contract in `r1_engine::manifest::draft`). The family builds the graph
//! ([`FamilyGraph::build_draft`]); this file gives it its own external-data file and describes the result.

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message;
use r1_engine::manifest::draft::DRAFT_KIND_MTP;
use r1_engine::manifest::names::{LAST_HIDDEN_STATE, MTP_DATA_FILE, MTP_FILE};
use r1_engine::manifest::{DraftGraph, FileEntry};

use crate::arch::{common::Ctx, FamilyGraph};
use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};
use crate::onnx::{ExternalDataWriter, GraphBuilder};
use crate::{artifact, elem_type, ExportOptions, Progress};

/// Builds the draft graph of `family` (checkpoint layer `layer`) into `dir`; returns its record and the entries of
/// its two files for `manifest.files`.
pub fn export_draft(
    family: &dyn FamilyGraph,
    ck: &Checkpoint,
    dir: &Path,
    opts: &ExportOptions,
    layer: usize,
    progress: &mut dyn FnMut(Progress),
) -> Result<(DraftGraph, BTreeMap<String, FileEntry>)> {
    let writer = ExternalDataWriter::create(dir, MTP_DATA_FILE)?;
    let mut ctx = Ctx {
        b: GraphBuilder::new(opts.opset, Some(writer))?,
        ck,
        dtype: elem_type(opts.precision)?,
        progress: Box::new(|name, bytes| progress(Progress::Tensor { name, bytes })),
        last_hidden_state: true,
    };
    family.build_draft(&mut ctx)?;
    let kv_cache = family.draft_kv_cache(ctx.kv_dtype());
    let b = ctx.b;
    let (inputs, outputs) = (b.inputs().to_vec(), b.outputs().to_vec());
    let doc = format!(
        "{} multi-token-prediction module (checkpoint layer {layer}) exported by r1-export {} at {} precision, \
         opset {}: the draft graph for speculative decoding",
        family.architecture(),
        env!("CARGO_PKG_VERSION"),
        opts.precision.name(),
        opts.opset
    );
    let (model, data) = b.finish("mtp", &doc)?;
    let path = dir.join(MTP_FILE);
    std::fs::write(&path, model.encode_to_vec()).map_err(ExportError::io(&path))?;
    let mut files = BTreeMap::new();
    files.insert(MTP_FILE.to_string(), artifact::hash_file(&path)?);
    match data {
        Some(d) => files.insert(d.location.clone(), FileEntry { sha256: d.sha256, bytes: d.bytes }),
        None => return Err(ExportError::Graph(format!("the draft graph wrote no {MTP_DATA_FILE}"))),
    };
    let record = DraftGraph {
        kind: DRAFT_KIND_MTP.into(),
        graph: MTP_FILE.into(),
        source_layer: layer,
        depth: 1,
        hidden_state_output: LAST_HIDDEN_STATE.into(),
        inputs,
        outputs,
        kv_cache,
        description: format!(
            "DeepSeek-V3 multi-token prediction (checkpoint layer {layer}): at position i it takes input_ids = the \
             token after position i and hidden_states = the main graph's {LAST_HIDDEN_STATE} at i (position_ids \
             and attention_mask as the main graph's), and its logits predict the token two after i. Its own \
             latent cache is past_key_values.0 / present.0. Feeding its own {LAST_HIDDEN_STATE} back with the \
             token it predicted drafts one more token."
        ),
    };
    Ok((record, files))
}
