//! The names an artifact is made of: its files and the graph's inputs and outputs. Exporter, backends, calibration
//! and the serving-graph rewrites all spell them through this module, so a name is written once.
//!
//! Graph I/O follows the convention Optimum and ONNX Runtime GenAI use (inputs `input_ids`, `attention_mask`,
//! `position_ids`, `past_key_values.{i}.key/.value`; outputs `logits`, `present.{i}.key/.value`).

/// The manifest, inside an artifact directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The portable decoder graph.
pub const MODEL_FILE: &str = "model.onnx";
/// The portable graph's external weights.
pub const DATA_FILE: &str = "model.onnx.data";
/// The draft graph (DeepseekV3's multi-token-prediction module, `manifest.draft`).
pub const MTP_FILE: &str = "mtp.onnx";
/// The draft graph's external weights.
pub const MTP_DATA_FILE: &str = "mtp.onnx.data";
/// Folder of per-target builds.
pub const ENGINES_DIR: &str = "engines";
/// `engines/<target>`: a target's build folder, relative to the artifact directory (always `/`-separated).
pub fn engine_dir(target: &str) -> String {
    format!("{ENGINES_DIR}/{target}")
}

/// Where artifacts built before versioned engine folders keep their CPU serving graph (still opened: the record
/// names it). New builds write `engines/cpu/<version>/model.onnx` and record that path.
pub const CPU_GRAPH: &str = "engines/cpu/model.onnx";
/// External-data file of the CPU serving graph, next to it.
pub const CPU_GRAPH_DATA: &str = "model.onnx.data";

/// Token ids fed this step, `[batch, sequence]`.
pub const INPUT_IDS: &str = "input_ids";
/// 1 for real positions (past and new), 0 for padding, `[batch, total_sequence]`.
pub const ATTENTION_MASK: &str = "attention_mask";
/// Position of each new token, `[batch, sequence]`.
pub const POSITION_IDS: &str = "position_ids";
/// Next-token logits (always float32).
pub const LOGITS: &str = "logits";
/// The last decoder layer's output before the final norm, `[batch, sequence, hidden]`: an output of the main graph
/// when a draft graph is exported, and of the draft graph itself.
pub const LAST_HIDDEN_STATE: &str = "last_hidden_state";
/// The draft graph's input taking the main graph's (or its own) `last_hidden_state`.
pub const HIDDEN_STATES: &str = "hidden_states";
/// Inputs every graph has besides the cache.
pub const REQUIRED_INPUTS: [&str; 3] = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS];

const PAST_PREFIX: &str = "past_key_values.";
const PRESENT_PREFIX: &str = "present.";

/// `past_key_values.{layer}.key`.
pub fn past_key(layer: usize) -> String {
    format!("{PAST_PREFIX}{layer}.key")
}
/// `past_key_values.{layer}.value`.
pub fn past_value(layer: usize) -> String {
    format!("{PAST_PREFIX}{layer}.value")
}
/// `present.{layer}.key`.
pub fn present_key(layer: usize) -> String {
    format!("{PRESENT_PREFIX}{layer}.key")
}
/// `present.{layer}.value`.
pub fn present_value(layer: usize) -> String {
    format!("{PRESENT_PREFIX}{layer}.value")
}
/// `present.{layer}.key` or `.value`.
pub fn present(layer: usize, key: bool) -> String {
    if key {
        present_key(layer)
    } else {
        present_value(layer)
    }
}

/// `(layer, is_key)` of a `past_key_values.{layer}.key|value` name; `None` for any other name.
pub fn parse_past(name: &str) -> Option<(usize, bool)> {
    parse_cache_name(name, PAST_PREFIX)
}

/// `(layer, is_key)` of a `present.{layer}.key|value` name; `None` for any other name.
pub fn parse_present(name: &str) -> Option<(usize, bool)> {
    parse_cache_name(name, PRESENT_PREFIX)
}

fn parse_cache_name(name: &str, prefix: &str) -> Option<(usize, bool)> {
    let (layer, kind) = name.strip_prefix(prefix)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    match kind {
        "key" => Some((layer, true)),
        "value" => Some((layer, false)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_names_round_trip_and_others_do_not_parse() {
        for layer in [0, 7, 61] {
            assert_eq!(parse_past(&past_key(layer)), Some((layer, true)));
            assert_eq!(parse_past(&past_value(layer)), Some((layer, false)));
            assert_eq!(parse_present(&present(layer, true)), Some((layer, true)));
            assert_eq!(parse_present(&present_value(layer)), Some((layer, false)));
        }
        assert_eq!(past_key(3), "past_key_values.3.key");
        assert_eq!(present_value(3), "present.3.value");
        for other in ["input_ids", "past_key_values.x.key", "past_key_values.1.query", "present.1.key", "logits"] {
            assert_eq!(parse_past(other), None, "{other}");
        }
        assert_eq!(parse_present("past_key_values.1.key"), None);
    }
}
