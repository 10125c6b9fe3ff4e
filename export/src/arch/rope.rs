//! Rotary position embedding parameters: reading them from config.json (both the transformers 4.x
//! form `rope_theta` + `rope_scaling` and the 5.x form `rope_parameters`) and computing the inverse
//! frequencies the graph multiplies positions by, and the factor the cos/sin tables are multiplied by. Supported
//! kinds: `default`, `linear`, `llama3`, `yarn` ([`Yarn`], shared with DeepseekV3); anything else (`dynamic`,
//! `longrope`, ...) is refused by name.

use std::path::Path;

use serde_json::Value;

use crate::error::{ExportError, Result};

/// Kinds of `rope_type` this exporter implements.
pub const SUPPORTED_ROPE: &str = "default, linear, llama3, yarn";

/// YaRN (Peng et al., 2023) as transformers' `_compute_yarn_parameters` computes it: inverse frequencies blended
/// between interpolation (`/ factor`) and extrapolation by a linear ramp over the dimensions whose wavelength falls
/// between `beta_fast` and `beta_slow` rotations of the original context, and cos/sin multiplied by an attention
/// factor.
///
/// The factor is `attention_factor` when given, else `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` when
/// both are set (DeepSeek-R1), else `mscale(factor, 1)` (`0.1 ln(factor) + 1`); then times **`attn_factor`** when
/// the config sets it. DeepSeek-R1-0528-Qwen3-8B's config sets `attn_factor: 0.8782…` to cancel `mscale(4) =
/// 1.1386…`; vLLM and SGLang multiply it in this way, transformers 5 ignores the key (its YaRN reads only
/// `attention_factor`). r1 follows vLLM/SGLang, i.e. what the release's authors meant; transformers given the
/// equivalent `attention_factor` (the product) computes the same tables.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Yarn {
    /// Context extension factor.
    pub factor: f64,
    /// Context length the model was trained with.
    pub original_max_position_embeddings: usize,
    /// Rotations bounding the ramp (defaults 32 and 1).
    pub beta_fast: f64,
    /// See `beta_fast`.
    pub beta_slow: f64,
    /// DeepSeek's `mscale`.
    pub mscale: Option<f64>,
    /// DeepSeek's `mscale_all_dim` (also scales the softmax: DeepseekV3's `softmax_scale`).
    pub mscale_all_dim: Option<f64>,
    /// transformers' explicit attention factor.
    pub attention_factor: Option<f64>,
    /// vLLM's / SGLang's multiplier of the attention factor (R1-0528-Qwen3).
    pub attn_factor: Option<f64>,
    /// Round the ramp's ends to whole dimensions (transformers' default).
    pub truncate: bool,
}

/// YaRN's `0.1 · m · ln(scale) + 1` (1 for `scale ≤ 1`).
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

impl Yarn {
    /// Reads the YaRN keys of a `rope_scaling` / `rope_parameters` object; `max_position_embeddings` supplies the
    /// defaults transformers uses (original context, then factor = max / original).
    pub fn from_json(path: &Path, p: &Value, max_position_embeddings: usize) -> Result<Yarn> {
        let get = |k: &str| p.get(k).and_then(Value::as_f64);
        let original = p
            .get("original_max_position_embeddings")
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .unwrap_or(max_position_embeddings);
        let factor = get("factor").unwrap_or(max_position_embeddings as f64 / original.max(1) as f64);
        if factor.is_nan() || factor <= 0.0 || original == 0 {
            return Err(ExportError::InvalidConfig {
                path: path.to_path_buf(),
                field: "rope_scaling",
                message: format!(
                    "yarn needs factor > 0 and original_max_position_embeddings > 0, got {factor} and {original}"
                ),
            });
        }
        let truthy = |k: &str| get(k).filter(|v| *v != 0.0);
        let attn_factor = get("attn_factor");
        if let Some(a) = attn_factor.filter(|a| !(a.is_finite() && *a > 0.0)) {
            return Err(ExportError::InvalidConfig {
                path: path.to_path_buf(),
                field: "rope_scaling",
                message: format!("yarn's attn_factor must be a positive number, got {a}"),
            });
        }
        Ok(Yarn {
            factor,
            original_max_position_embeddings: original,
            beta_fast: truthy("beta_fast").unwrap_or(32.0),
            beta_slow: truthy("beta_slow").unwrap_or(1.0),
            mscale: get("mscale"),
            mscale_all_dim: get("mscale_all_dim"),
            attention_factor: get("attention_factor"),
            attn_factor,
            truncate: p.get("truncate").and_then(Value::as_bool).unwrap_or(true),
        })
    }

    /// The factor cos/sin are multiplied by (see the type's docs).
    pub fn attention_scale(&self) -> f64 {
        let base = self.attention_factor.unwrap_or_else(|| match (self.mscale, self.mscale_all_dim) {
            (Some(m), Some(a)) if m != 0.0 && a != 0.0 => yarn_mscale(self.factor, m) / yarn_mscale(self.factor, a),
            _ => yarn_mscale(self.factor, 1.0),
        });
        base * self.attn_factor.unwrap_or(1.0)
    }

    /// Inverse frequencies (`dim / 2` values, f32 powers as transformers computes them) and the cos/sin factor.
    pub fn tables(&self, theta: f64, dim: usize) -> (Vec<f32>, f32) {
        let base = theta as f32;
        let pos_freqs: Vec<f32> = (0..dim / 2).map(|i| base.powf((2 * i) as f32 / dim as f32)).collect();
        let corr = |rot: f64| {
            (dim as f64 * (self.original_max_position_embeddings as f64 / (rot * 2.0 * std::f64::consts::PI)).ln())
                / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (corr(self.beta_fast), corr(self.beta_slow));
        if self.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let mut high = high.min(dim as f64 - 1.0);
        if low == high {
            high += 0.001;
        }
        let inv = pos_freqs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                let extrapolation = 1.0 - ramp;
                let interp = 1.0 / (self.factor as f32 * p);
                let extra = 1.0 / p;
                interp * (1.0 - extrapolation) + extra * extrapolation
            })
            .collect();
        (inv, self.attention_scale() as f32)
    }
}

/// The keys of a YaRN `rope_scaling` / `rope_parameters` object that [`Yarn::from_json`] reads.
pub const YARN_KEYS: [&str; 9] = [
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
    "attn_factor",
    "truncate",
];

/// The keys [`parse`] reads from the `parent` object (`rope_scaling` or `rope_parameters`) of rope type `kind`
/// (DeepseekV3 reads the same); `arch::config_keys` lists any other key in the manifest as not read.
pub fn keys_read(parent: &str, kind: &str) -> Vec<&'static str> {
    let mut keys = vec!["rope_type", "type"];
    if parent == "rope_parameters" {
        keys.push("rope_theta");
    }
    keys.extend_from_slice(match kind {
        "linear" => &["factor"][..],
        "llama3" => &["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"],
        "yarn" => &YARN_KEYS,
        _ => &[],
    });
    keys
}

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
    /// YaRN.
    Yarn(Yarn),
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
    max_position_embeddings: usize,
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
        "yarn" => RopeScaling::Yarn(Yarn::from_json(path, p, max_position_embeddings)?),
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
    /// Inverse frequencies for a rotary dimension `dim` (`dim / 2` values), computed in float32 the way transformers
    /// does, and the factor the cos/sin tables are multiplied by (1 except under YaRN).
    pub fn tables(&self, dim: usize) -> (Vec<f32>, f32) {
        match &self.scaling {
            RopeScaling::Yarn(y) => y.tables(self.theta, dim),
            _ => (self.inv_freq(dim), 1.0),
        }
    }

    /// Inverse frequencies for a rotary dimension `dim` (`dim / 2` values), computed in float32 the
    /// way transformers does.
    pub fn inv_freq(&self, dim: usize) -> Vec<f32> {
        let base = self.theta as f32;
        let inv: Vec<f32> = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32)).collect();
        match &self.scaling {
            RopeScaling::Default => inv,
            RopeScaling::Yarn(y) => y.tables(self.theta, dim).0,
            RopeScaling::Linear { factor } => inv.into_iter().map(|f| f / *factor as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let (factor, low, high, old) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                    *original_max_position_embeddings as f32,
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
        let v4 = parse(p, Some(500000.0), Some(&json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})), None, 10000.0, 8192).unwrap();
        let v5 = parse(p, None, None, Some(&json!({"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})), 10000.0, 8192).unwrap();
        assert_eq!(v4, v5);
        let d =
            parse(p, None, None, Some(&json!({"rope_theta": 10000.0, "rope_type": "default"})), 1.0e6, 4096).unwrap();
        assert_eq!(d.scaling, RopeScaling::Default);
        assert_eq!(d.theta, 10000.0);
    }

    #[test]
    fn unsupported_kind_is_named() {
        let e = parse(Path::new("c.json"), None, Some(&json!({"type": "longrope", "factor": 4.0})), None, 1e4, 4096)
            .unwrap_err();
        let m = e.to_string();
        assert!(m.contains("`longrope`") && m.contains("llama3") && m.contains("yarn"), "{m}");
    }

    /// The R1-0528-Qwen3-8B release's rope_scaling: `attn_factor` cancels YaRN's mscale (the vLLM/SGLang reading),
    /// and the frequencies follow transformers' `_compute_yarn_parameters`; reference values computed by hand from
    /// that formula (dim 128, θ 1e6, factor 4, original 32768: the ramp runs over dimensions 23…40 after
    /// truncation).
    #[test]
    fn yarn_as_the_qwen3_release_sets_it() {
        let release = json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                             "attn_factor": 0.8782488562869419});
        let r = parse(Path::new("c.json"), Some(1e6), Some(&release), None, 1e4, 131072).unwrap();
        let RopeScaling::Yarn(y) = &r.scaling else { panic!("{r:?}") };
        assert_eq!((y.factor, y.original_max_position_embeddings, y.beta_fast, y.beta_slow), (4.0, 32768, 32.0, 1.0));
        let (inv, scale) = r.tables(128);
        // mscale(4) = 0.1 ln 4 + 1 = 1.138629…, times attn_factor 0.878248… = 0.99999…
        assert!((scale - (0.1 * 4f32.ln() + 1.0) * 0.878_248_9).abs() < 1e-6, "{scale}");
        let plain = Rope { theta: 1e6, scaling: RopeScaling::Default }.inv_freq(128);
        // dims up to the ramp's start extrapolate (unchanged); from its end on they interpolate (/ factor)
        let corr = |rot: f64| (128.0 * (32768.0 / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * 1e6f64.ln());
        let (low, high) = (corr(32.0).floor() as usize, corr(1.0).ceil() as usize);
        assert_eq!((low, high), (23, 40));
        assert_eq!(inv[..=low], plain[..=low]);
        for i in high..64 {
            assert!((inv[i] - plain[i] / 4.0).abs() <= 1e-6 * plain[i], "dim {i}");
        }
        let mid = (low + high) / 2;
        let ramp = (mid - low) as f32 / (high - low) as f32;
        let want = plain[mid] / 4.0 * ramp + plain[mid] * (1.0 - ramp);
        assert!((inv[mid] - want).abs() <= 1e-6 * want, "dim {mid}: {} vs {want}", inv[mid]);
        // Without attn_factor: transformers' own factor; a bad attn_factor is named.
        let mut plain_yarn = release.clone();
        plain_yarn.as_object_mut().unwrap().remove("attn_factor");
        let r = parse(Path::new("c.json"), Some(1e6), Some(&plain_yarn), None, 1e4, 131072).unwrap();
        assert!((r.tables(128).1 - 1.138_629_4).abs() < 1e-6);
        let mut bad = release.clone();
        bad["attn_factor"] = json!(-1.0);
        let e = parse(Path::new("c.json"), Some(1e6), Some(&bad), None, 1e4, 131072).unwrap_err().to_string();
        assert!(e.contains("attn_factor") && e.contains("-1"), "{e}");
    }

    /// Every key `keys_read` names is read: changing its value changes what `parse` returns.
    #[test]
    fn keys_read_are_the_keys_parse_reads() {
        let p = Path::new("c.json");
        let base = json!({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 4096,
                          "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                          "attention_factor": 1.0, "attn_factor": 0.9, "truncate": true});
        let read = |v: &serde_json::Value| parse(p, Some(1e4), None, Some(v), 1e4, 16384).unwrap();
        let want = read(&base);
        for key in keys_read("rope_parameters", "yarn").into_iter().filter(|k| *k != "type" && *k != "rope_type") {
            let mut changed = base.clone();
            changed[key] = match &base[key] {
                serde_json::Value::Bool(b) => json!(!b),
                v => json!(v.as_f64().unwrap() * 2.0),
            };
            assert_ne!(read(&changed), want, "changing yarn's `{key}` changed nothing");
        }
        let llama3 = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192});
        let want = parse(p, Some(5e5), Some(&llama3), None, 1e4, 131072).unwrap();
        for key in keys_read("rope_scaling", "llama3").into_iter().filter(|k| *k != "type" && *k != "rope_type") {
            let mut changed = llama3.clone();
            changed[key] = json!(llama3[key].as_f64().unwrap() * 2.0);
            assert_ne!(parse(p, Some(5e5), Some(&changed), None, 1e4, 131072).unwrap(), want, "llama3's `{key}`");
        }
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
