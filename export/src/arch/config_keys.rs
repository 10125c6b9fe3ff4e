//! Which `config.json` keys the exporter reads, and why it leaves the others. Every key of a checkpoint's config is
//! either read (a field of its family's serde struct, `architectures`, or a key of `rope_scaling` /
//! `rope_parameters` / `quantization_config` that the rotary and FP8 parsers read) or listed in the manifest's
//! `source.ignored_config_keys` with the reason from [`IGNORED`], the one table of keys r1 leaves on purpose. A key
//! in neither gets [`UNKNOWN`] (and a manifest note), so no key is dropped silently; the release configs
//! (`export/tests/release_configs.rs`) must have none.
//!
//! The fields of each family struct are taken from serde itself ([`struct_fields`]), so the list of keys read
//! cannot drift from what the structs deserialize.

use std::collections::BTreeMap;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde_json::Value;

use super::deepseek_v3::config::{RawConfig, QUANTIZATION_KEYS_READ};
use super::llama::LlamaConfig;
use super::qwen2::Qwen2Config;
use super::qwen3::Qwen3Config;
use super::rope;

/// Reason given for a key that is neither read nor in [`IGNORED`].
pub const UNKNOWN: &str = "not read by r1-export, which knows no meaning for this key in this family: check that the \
                           artifact computes what the checkpoint means";

const TOKEN_ID: &str = "a tokenizer id: the engine takes BOS/EOS from tokenizer_config.json and \
                        generation_config.json (copied into the artifact); the graph works on ids alone";
const DTYPE: &str = "each tensor's dtype comes from the safetensors header; the graph's precision is --precision";
const WINDOW: &str = "sliding-window attention is off while use_sliding_window is false (true is refused); \
                      transformers does not apply the window then either";

/// Keys r1 leaves on purpose, with the reason (dotted for a key inside an object that is read). Shared by every
/// family: a key means the same wherever it appears.
pub const IGNORED: &[(&str, &str)] = &[
    ("model_type", "architectures[0] chooses the family; model_type names the same one"),
    ("torch_dtype", DTYPE),
    ("dtype", DTYPE),
    ("transformers_version", "metadata: the transformers version that wrote the file"),
    ("_name_or_path", "metadata: where the checkpoint was loaded from"),
    ("use_cache", "transformers' runtime switch: the graph always takes and returns the KV cache"),
    ("initializer_range", "training only: the spread of the random initialization"),
    ("attention_dropout", "training only: dropout is off at inference"),
    ("bos_token_id", TOKEN_ID),
    ("eos_token_id", TOKEN_ID),
    ("pad_token_id", TOKEN_ID),
    ("sliding_window", WINDOW),
    ("max_window_layers", WINDOW),
    (
        "use_mrope",
        "legacy Qwen2 switch for multimodal (Qwen2-VL) rotary, false in the releases; transformers' \
         Qwen2ForCausalLM does not read it either",
    ),
    (
        "pretraining_tp",
        "tensor-parallel degree of pretraining; transformers 5 does not read it (it only sliced a matmul into \
         parts with the same sum)",
    ),
    ("aux_loss_alpha", "training only: the weight of the MoE load-balancing loss"),
    ("seq_aux", "training only: the MoE load-balancing loss computed per sequence"),
    ("ep_size", "expert-parallel degree of DeepSeek's own inference code: how experts are laid out on devices"),
    (
        "quantization_config.activation_scheme",
        "how DeepSeek's FP8 kernels scale activations; the export dequantizes the FP8 weights and runs activations \
         in float",
    ),
];

/// The reason `key` (dotted inside an object) is left, [`UNKNOWN`] when [`IGNORED`] has none.
pub fn reason(key: &str) -> &'static str {
    IGNORED.iter().find(|(k, _)| *k == key).map(|(_, r)| *r).unwrap_or(UNKNOWN)
}

/// The top-level keys the family of `architecture` (`architectures[0]`) reads; just `architectures` for one the
/// exporter does not know.
pub fn keys_read(architecture: &str) -> Vec<&'static str> {
    let fields = match architecture {
        "Qwen2ForCausalLM" => struct_fields::<Qwen2Config>(),
        "LlamaForCausalLM" => struct_fields::<LlamaConfig>(),
        "Qwen3ForCausalLM" => struct_fields::<Qwen3Config>(),
        "DeepseekV3ForCausalLM" => struct_fields::<RawConfig>(),
        _ => &[],
    };
    std::iter::once("architectures").chain(fields.iter().copied()).collect()
}

/// Every key of `config` that the exporter does not read, with the reason (see the module docs).
pub fn ignored_config_keys(config: &Value) -> BTreeMap<String, String> {
    let architecture = config.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str).unwrap_or("");
    let read = keys_read(architecture);
    let mut out = BTreeMap::new();
    let Some(obj) = config.as_object() else { return out };
    for (key, value) in obj {
        if !read.contains(&key.as_str()) {
            out.insert(key.clone(), reason(key).to_string());
            continue;
        }
        let Some(inner) = value.as_object() else { continue };
        let inner_read: Vec<&str> = match key.as_str() {
            "rope_scaling" | "rope_parameters" => {
                let kind = inner.get("rope_type").or_else(|| inner.get("type")).and_then(Value::as_str);
                rope::keys_read(key, kind.unwrap_or("default"))
            }
            "quantization_config" => QUANTIZATION_KEYS_READ.to_vec(),
            _ => continue,
        };
        for k in inner.keys().filter(|k| !inner_read.contains(&k.as_str())) {
            let path = format!("{key}.{k}");
            let why = reason(&path);
            out.insert(path, why.to_string());
        }
    }
    out
}

/// The field names a serde-derived struct deserializes (what `#[derive(Deserialize)]` passes to
/// `deserialize_struct`), read by a deserializer that only records them.
pub fn struct_fields<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}

struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("only a struct's field names are read"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("only a struct's field names are read"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn family_structs_give_their_fields() {
        let qwen2 = keys_read("Qwen2ForCausalLM");
        for k in ["architectures", "hidden_size", "rope_scaling", "use_sliding_window", "tie_word_embeddings"] {
            assert!(qwen2.contains(&k), "{k}: {qwen2:?}");
        }
        assert!(!qwen2.contains(&"head_dim"), "Qwen2 derives head_dim: {qwen2:?}");
        assert!(keys_read("DeepseekV3ForCausalLM").contains(&"num_nextn_predict_layers"));
        assert_eq!(keys_read("GPT2LMHeadModel"), ["architectures"]);
    }

    #[test]
    fn unread_keys_get_the_table_reason_or_unknown() {
        let config = json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "use_cache": true, "made_up": 1,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "partial_rotary_factor": 0.5},
        });
        let ignored = ignored_config_keys(&config);
        assert_eq!(ignored.keys().collect::<Vec<_>>(), ["made_up", "rope_scaling.partial_rotary_factor", "use_cache"]);
        assert_eq!(ignored["use_cache"], reason("use_cache"));
        assert_ne!(ignored["use_cache"], UNKNOWN);
        assert_eq!(ignored["made_up"], UNKNOWN);
        assert_eq!(ignored["rope_scaling.partial_rotary_factor"], UNKNOWN);
    }

    #[test]
    fn quantization_config_keys_are_read_or_listed() {
        let config = json!({"architectures": ["DeepseekV3ForCausalLM"], "quantization_config":
            {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}});
        let ignored = ignored_config_keys(&config);
        assert_eq!(ignored.keys().collect::<Vec<_>>(), ["quantization_config.activation_scheme"]);
        // A dense family does not read quantization_config at all.
        let dense = json!({"architectures": ["Qwen2ForCausalLM"], "quantization_config": {"quant_method": "awq"}});
        assert_eq!(ignored_config_keys(&dense)["quantization_config"], UNKNOWN);
    }

    #[test]
    fn the_table_lists_no_key_a_family_reads() {
        let read: Vec<&str> = ["Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM", "DeepseekV3ForCausalLM"]
            .iter()
            .flat_map(|a| keys_read(a))
            .collect();
        for (k, _) in IGNORED {
            assert!(!read.contains(k), "`{k}` is read by a family and listed as ignored");
        }
    }
}
