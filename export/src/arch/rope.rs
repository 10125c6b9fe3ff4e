//! Rotary position embedding parameters: reading them from config.json (both the transformers 4.x
//! form `rope_theta` + `rope_scaling` and the 5.x form `rope_parameters`) and computing the inverse
//! frequencies the graph multiplies positions by. Supported kinds: `default`, `linear`, `llama3`;
//! anything else (`dynamic`, `yarn`, `longrope`, ...) is refused by name.

use std::path::Path;

use serde_json::Value;

use crate::error::{ExportError, Result};

/// Kinds of `rope_type` this exporter implements.
pub const SUPPORTED_ROPE: &str = "default, linear, llama3";

/// A validated rotary configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Scale factor for low frequencies.
        factor: f64,
        /// Wavelength threshold (as a fraction of the original context) for low frequencies.
        low_freq_factor: f64,
        /// Wavelength threshold for high frequencies.
        high_freq_factor: f64,
        /// Context length the model was trained with.
        original_max_position_embeddings: f64,
    },
}

/// Resolved rotary settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Rope {
    /// Base (`rope_theta`).
    pub theta: f64,
    /// Scaling kind and parameters.
    pub scaling: RopeScaling,
}

fn num(path: &Path, obj: &Value, field: &'static str) -> Result<f64> {
    obj.get(field).and_then(Value::as_f64).ok_or_else(|| ExportError::InvalidConfig {
        path: path.to_path_buf(),
        field,
        message: format!("must be a number for this rope_scaling type, got {}", obj.get(field).unwrap_or(&Value::Null)),
    })
}

/// Reads rotary settings from a family config's `rope_theta`, `rope_scaling` and `rope_parameters`.
pub fn parse(
    path: &Path,
    rope_theta: Option<f64>,
    rope_scaling: Option<&Value>,
    rope_parameters: Option<&Value>,
    default_theta: f64,
) -> Result<Rope> {
    // transformers 5 puts everything into `rope_parameters`; 4.x uses `rope_theta` + `rope_scaling`.
    let params = rope_parameters.filter(|v| !v.is_null()).or(rope_scaling.filter(|v| !v.is_null()));
    let theta = rope_parameters
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or(rope_theta)
        .unwrap_or(default_theta);
    if !(theta.is_finite() && theta > 1.0) {
        return Err(ExportError::InvalidConfig {
            path: path.to_path_buf(),
            field: "rope_theta",
            message: format!("must be a finite number > 1, got {theta}"),
        });
    }
    let Some(p) = params else {
        return Ok(Rope { theta, scaling: RopeScaling::Default });
    };
    if !p.is_object() {
        return Err(ExportError::InvalidConfig {
            path: path.to_path_buf(),
            field: "rope_scaling",
            message: format!("must be an object or null, got {p}"),
        });
    }
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: num(path, p, "factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num(path, p, "factor")?,
            low_freq_factor: num(path, p, "low_freq_factor")?,
            high_freq_factor: num(path, p, "high_freq_factor")?,
            original_max_position_embeddings: num(path, p, "original_max_position_embeddings")?,
        },
        other => {
            return Err(ExportError::UnsupportedRopeScaling {
                path: path.to_path_buf(),
                kind: other.to_string(),
                supported: SUPPORTED_ROPE,
            })
        }
    };
    if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, .. } = &scaling {
        if high_freq_factor.is_nan()
            || low_freq_factor.is_nan()
            || *high_freq_factor <= *low_freq_factor
            || *factor <= 0.0
        {
            return Err(ExportError::InvalidConfig {
                path: path.to_path_buf(),
                field: "rope_scaling",
                message: format!(
                    "llama3 needs factor > 0 and high_freq_factor > low_freq_factor, got factor {factor}, low {low_freq_factor}, high {high_freq_factor}"
                ),
            });
        }
    }
    Ok(Rope { theta, scaling })
}

impl Rope {
    /// Inverse frequencies for a rotary dimension `dim` (`dim / 2` values), computed in float32 the
    /// way transformers does.
    pub fn inv_freq(&self, dim: usize) -> Vec<f32> {
        let base = self.theta as f32;
        let inv: Vec<f32> = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32)).collect();
        match self.scaling {
            RopeScaling::Default => inv,
            RopeScaling::Linear { factor } => inv.into_iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let (factor, low, high, old) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    original_max_position_embeddings as f32,
                );
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                inv.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_config_forms_parse() {
        let p = Path::new("config.json");
        let v4 = parse(p, Some(500000.0), Some(&json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})), None, 10000.0).unwrap();
        let v5 = parse(p, None, None, Some(&json!({"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})), 10000.0).unwrap();
        assert_eq!(v4, v5);
        let d = parse(p, None, None, Some(&json!({"rope_theta": 10000.0, "rope_type": "default"})), 1.0e6).unwrap();
        assert_eq!(d.scaling, RopeScaling::Default);
        assert_eq!(d.theta, 10000.0);
    }

    #[test]
    fn unsupported_kind_is_named() {
        let e = parse(Path::new("c.json"), None, Some(&json!({"type": "yarn", "factor": 4.0})), None, 1e4).unwrap_err();
        let m = e.to_string();
        assert!(m.contains("`yarn`") && m.contains("llama3"), "{m}");
    }

    #[test]
    fn llama3_keeps_high_and_scales_low_frequencies() {
        let r = Rope {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64.0,
            },
        };
        let plain = Rope { theta: 500000.0, scaling: RopeScaling::Default }.inv_freq(16);
        let s = r.inv_freq(16);
        assert_eq!(s[0], plain[0]);
        assert!((s[7] - plain[7] / 8.0).abs() < 1e-12);
    }
}
