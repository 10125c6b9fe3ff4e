//! The closed sets an artifact is described by: its model [`Family`] and its [`Precision`]. Each is one enum, written
//! to `manifest.json` under the same names the CLI takes, so the exporter, the engine and the server share one type
//! instead of matching strings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A name that is not one of a closed set: says which set, what it accepts and what was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be one of {expected}, got `{got}`")]
pub struct UnknownName {
    /// The set (`precision`, `family`).
    pub what: &'static str,
    /// The accepted names, comma-separated.
    pub expected: String,
    /// The name given.
    pub got: String,
}

macro_rules! named_enum {
    ($(#[$meta:meta])* $ty:ident, $what:literal { $($(#[$vmeta:meta])* $variant:ident => $name:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $ty {
            $($(#[$vmeta])* #[serde(rename = $name)] $variant),+
        }

        impl $ty {
            /// Every value, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The name used in `manifest.json` and on the command line.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }

            /// The accepted names, comma-separated (for help texts and errors).
            pub fn names() -> String {
                Self::ALL.iter().map(|v| v.name()).collect::<Vec<_>>().join(", ")
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $ty {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.name() == s)
                    .ok_or_else(|| UnknownName { what: $what, expected: Self::names(), got: s.to_string() })
            }
        }
    };
}

named_enum!(
    /// Model family of an artifact, from the checkpoint's `architectures[0]`.
    Family, "family" {
        /// `Qwen2ForCausalLM` (R1-Distill-Qwen).
        Qwen2 => "qwen2",
        /// `LlamaForCausalLM` (R1-Distill-Llama).
        Llama => "llama",
        /// `Qwen3ForCausalLM` (R1-0528-Qwen3).
        Qwen3 => "qwen3",
        /// `DeepseekV3ForCausalLM` (DeepSeek-R1: MLA, MoE).
        DeepseekV3 => "deepseek_v3",
    }
);

impl Family {
    /// The HuggingFace `architectures[0]` value of the family.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::DeepseekV3 => "DeepseekV3ForCausalLM",
        }
    }

    /// The family of an `architectures[0]` value, if r1 exports it.
    pub fn from_architecture(architecture: &str) -> Option<Family> {
        Family::ALL.iter().copied().find(|f| f.architecture() == architecture)
    }

    /// Dense decoders with per-head KV caches (Qwen2, Llama, Qwen3), as opposed to DeepseekV3's MLA latent cache.
    pub fn is_dense(self) -> bool {
        !matches!(self, Family::DeepseekV3)
    }
}

named_enum!(
    /// Precision of an artifact's graph: what `--precision` takes and `manifest.json` records.
    Precision, "precision" {
        /// float32 everywhere.
        Fp32 => "fp32",
        /// float16 weights, activations and KV cache (RMSNorm variance, softmax and logits in float32).
        Fp16 => "fp16",
        /// INT8 weights and activations (W8A8 QDQ, calibrated), float32 KV cache.
        Int8 => "int8",
        /// INT8 weights, float32 activations.
        Int8WeightOnly => "int8-wo",
        /// Blocked INT4 weights (opset 21), float32 activations.
        Int4WeightOnly => "int4-wo",
    }
);

impl Precision {
    /// Whether the graph is quantized after a float32 export (calibration, QDQ rewrite).
    pub fn is_quantized(self) -> bool {
        !matches!(self, Precision::Fp32 | Precision::Fp16)
    }

    /// Whether only weights are quantized (activations stay float).
    pub fn is_weight_only(self) -> bool {
        matches!(self, Precision::Int8WeightOnly | Precision::Int4WeightOnly)
    }

    /// The float precision the graph is built in before any quantization (`fp16` stays `fp16`, the rest `fp32`).
    pub fn float_base(self) -> Precision {
        if self == Precision::Fp16 {
            Precision::Fp16
        } else {
            Precision::Fp32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_str_and_json() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>(), Ok(*p));
            assert_eq!(serde_json::to_value(p).unwrap(), serde_json::Value::String(p.name().into()));
            assert_eq!(serde_json::from_value::<Precision>(p.name().into()).unwrap(), *p);
        }
        for f in Family::ALL {
            assert_eq!(f.name().parse::<Family>(), Ok(*f));
            assert_eq!(Family::from_architecture(f.architecture()), Some(*f));
            assert_eq!(serde_json::from_value::<Family>(f.name().into()).unwrap(), *f);
        }
        assert_eq!(Precision::names(), "fp32, fp16, int8, int8-wo, int4-wo");
    }

    #[test]
    fn unknown_names_are_refused_naming_set_choices_and_value() {
        let e = "int3".parse::<Precision>().unwrap_err().to_string();
        assert_eq!(e, "precision must be one of fp32, fp16, int8, int8-wo, int4-wo, got `int3`");
        let e = "gpt2".parse::<Family>().unwrap_err().to_string();
        assert!(e.contains("family") && e.contains("deepseek_v3") && e.contains("`gpt2`"), "{e}");
        assert!(serde_json::from_value::<Precision>("bf16".into()).is_err());
        assert_eq!(Family::from_architecture("GPT2LMHeadModel"), None);
    }

    #[test]
    fn precision_classes() {
        let quantized: Vec<_> = Precision::ALL.iter().filter(|p| p.is_quantized()).map(|p| p.name()).collect();
        assert_eq!(quantized, ["int8", "int8-wo", "int4-wo"]);
        assert!(Precision::Int4WeightOnly.is_weight_only() && !Precision::Int8.is_weight_only());
        assert_eq!(Precision::Int8.float_base(), Precision::Fp32);
        assert_eq!(Precision::Fp16.float_base(), Precision::Fp16);
        assert!(Family::Qwen3.is_dense() && !Family::DeepseekV3.is_dense());
    }
}
