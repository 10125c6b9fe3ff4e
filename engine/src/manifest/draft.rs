//! The draft graph record (`manifest.draft`): DeepSeek-V3 / R1's multi-token-prediction (MTP) module exported as a
//! second, small graph beside `model.onnx`, for speculative decoding.
//!
//! Contract (the same I/O conventions as the main graph, one cache layer):
//! ```text
//! main graph  (model.onnx)  ... → outputs logits, present.*, and `last_hidden_state` [batch, sequence, hidden]
//!                                 (the last decoder layer's output, before the final norm)
//! draft graph (mtp.onnx)    inputs  input_ids       [batch, sequence]  token t[i+1] (the token *after* position i)
//!                                   hidden_states   [batch, sequence, hidden]  h[i] (`last_hidden_state` at i)
//!                                   attention_mask, position_ids (positions i, as the main graph's),
//!                                   past_key_values.0.key / .value (the draft's own latent cache)
//!                           outputs logits          [batch, sequence, vocab]  prediction of t[i+2]
//!                                   present.0.key / .value
//!                                   last_hidden_state [batch, sequence, hidden]  the MTP block's output before
//!                                   `shared_head.norm`: fed back as `hidden_states` it chains the draft on itself
//! ```
//! Old manifests have no `draft` key and load as `None`.

use serde::{Deserialize, Serialize};

use super::{names, KvCacheInfo, TensorSpec};

/// What kind of draft the graph is.
pub const DRAFT_KIND_MTP: &str = "mtp";

/// The draft graph of an artifact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DraftGraph {
    /// [`DRAFT_KIND_MTP`]: DeepSeek-V3's multi-token-prediction module.
    pub kind: String,
    /// The graph file, relative to the artifact directory ([`names::MTP_FILE`]); listed in `files` with its weights.
    pub graph: String,
    /// Checkpoint layer index the module's weights came from (`model.layers.{source_layer}.*`, i.e.
    /// `num_hidden_layers` for the first MTP module).
    pub source_layer: usize,
    /// How many tokens ahead of the main graph's prediction it predicts (1 for the first MTP module).
    pub depth: usize,
    /// The main graph's output the draft takes as `hidden_states` ([`names::LAST_HIDDEN_STATE`]).
    pub hidden_state_output: String,
    /// Graph inputs, in graph order.
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs, in graph order.
    pub outputs: Vec<TensorSpec>,
    /// The draft's own KV cache (one layer, the main graph's layout).
    pub kv_cache: KvCacheInfo,
    /// For humans: what the graph computes and how to feed it.
    pub description: String,
}

impl DraftGraph {
    /// Consistency of the record with itself and with the main graph's outputs; the message names what is wrong.
    pub fn check(&self, main_outputs: &[TensorSpec]) -> Result<(), String> {
        if self.kind != DRAFT_KIND_MTP {
            return Err(format!("draft.kind must be `{DRAFT_KIND_MTP}`, got `{}`", self.kind));
        }
        if self.depth == 0 {
            return Err("draft.depth must be at least 1, got 0".into());
        }
        let inputs: Vec<&str> = names::REQUIRED_INPUTS.into_iter().chain([names::HIDDEN_STATES]).collect();
        for required in inputs {
            if !self.inputs.iter().any(|t| t.name == required) {
                return Err(format!("draft graph input `{required}` is missing"));
            }
        }
        for required in [names::LOGITS, names::LAST_HIDDEN_STATE] {
            if !self.outputs.iter().any(|t| t.name == required) {
                return Err(format!("draft graph output `{required}` is missing"));
            }
        }
        if !main_outputs.iter().any(|t| t.name == self.hidden_state_output) {
            return Err(format!(
                "draft.hidden_state_output names `{}`, which is not an output of the main graph",
                self.hidden_state_output
            ));
        }
        let kv = &self.kv_cache;
        if kv.checked_bytes_per_token() != Some(kv.bytes_per_token) {
            return Err(format!(
                "draft.kv_cache.bytes_per_token is {} but the layout gives {}",
                kv.bytes_per_token,
                kv.computed_bytes_per_token()
            ));
        }
        Ok(())
    }
}
