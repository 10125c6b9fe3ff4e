//! Random-weight checkpoints of any dense family and shape, written the way HF writes them
//! (`config.json`, `generation_config.json`, `model.safetensors`), for benchmarks and tests; DeepseekV3
//! checkpoints (FP8 blocks, MoE, the MTP module, sharded like the release) come from [`deepseek_v3`].
//!
//! The safetensors file is streamed: the header is computed from the shapes, then each tensor's
//! bytes are generated chunk by chunk, so a 3.5 GB checkpoint needs a few MB of memory. Values come
//! from a seeded SplitMix64 generator (deterministic across platforms and crate versions).
//! Presets are a table ([`PRESETS`]); add a row for a new shape.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use half::{bf16, f16};
use serde_json::json;

use crate::error::{ExportError, Result};

pub mod deepseek_v3;
pub use deepseek_v3::DeepseekV3Fixture;

/// Stored dtype of fixture weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixtureDtype {
    /// bfloat16 (what the R1 checkpoints ship).
    Bf16,
    /// float16.
    F16,
    /// float32.
    F32,
}

impl FixtureDtype {
    fn size(self) -> usize {
        match self {
            FixtureDtype::F32 => 4,
            _ => 2,
        }
    }
    fn safetensors_name(self) -> &'static str {
        match self {
            FixtureDtype::Bf16 => "BF16",
            FixtureDtype::F16 => "F16",
            FixtureDtype::F32 => "F32",
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            FixtureDtype::Bf16 => "bfloat16",
            FixtureDtype::F16 => "float16",
            FixtureDtype::F32 => "float32",
        }
    }
}

impl std::str::FromStr for FixtureDtype {
    type Err = ExportError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bf16" => Ok(FixtureDtype::Bf16),
            "f16" | "fp16" => Ok(FixtureDtype::F16),
            "f32" | "fp32" => Ok(FixtureDtype::F32),
            other => Err(ExportError::InvalidOption {
                option: "--dtype",
                message: format!("must be bf16, f16 or f32, got `{other}`"),
            }),
        }
    }
}

/// Shape and family of a fixture checkpoint.
#[derive(Debug, Clone)]
pub struct FixtureSpec {
    /// `architectures[0]`: `Qwen2ForCausalLM`, `LlamaForCausalLM` or `Qwen3ForCausalLM`.
    pub architecture: String,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Per-head size (`None`: hidden / heads).
    pub head_dim: Option<usize>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Tie LM head to the embedding.
    pub tie_word_embeddings: bool,
    /// Stored dtype.
    pub dtype: FixtureDtype,
    /// RNG seed.
    pub seed: u64,
    /// A DeepseekV3 checkpoint: its config and tensor list replace the dense fields above (which then only
    /// describe it).
    pub deepseek_v3: Option<DeepseekV3Fixture>,
}

/// A named fixture shape.
pub struct Preset {
    /// Name accepted by `r1-fixture --preset`.
    pub name: &'static str,
    /// What it mirrors.
    pub description: &'static str,
    /// Builds the spec.
    pub spec: fn() -> FixtureSpec,
}

#[allow(clippy::too_many_arguments)] // one row of the preset table: the arguments are its columns
fn spec(
    arch: &str,
    h: usize,
    i: usize,
    l: usize,
    nh: usize,
    nkv: usize,
    hd: Option<usize>,
    v: usize,
    tie: bool,
) -> FixtureSpec {
    FixtureSpec {
        architecture: arch.into(),
        hidden_size: h,
        intermediate_size: i,
        num_layers: l,
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
        vocab_size: v,
        tie_word_embeddings: tie,
        dtype: FixtureDtype::Bf16,
        seed: 0,
        deepseek_v3: None,
    }
}

impl FixtureSpec {
    /// A DeepseekV3 checkpoint of `fixture` (see [`deepseek_v3`]); the dense fields mirror its config.
    pub fn deepseek_v3(fixture: DeepseekV3Fixture) -> Result<FixtureSpec> {
        let c = fixture.resolved()?;
        let mut s = spec(
            "DeepseekV3ForCausalLM",
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_attention_heads,
            None,
            c.vocab_size,
            c.tie_word_embeddings,
        );
        s.deepseek_v3 = Some(fixture);
        Ok(s)
    }

    /// Bytes of tensor data the checkpoint will hold, computed from the tensor list without writing anything.
    pub fn planned_bytes(&self) -> Result<u64> {
        if let Some(d) = &self.deepseek_v3 {
            return Ok(deepseek_v3::planned_bytes(&d.tensors()?));
        }
        let n: usize = self.tensors()?.iter().map(|(_, s, _)| s.iter().product::<usize>()).sum();
        Ok((n * self.dtype.size()) as u64)
    }

    /// Number of tensors the checkpoint will hold (FP8 scales included).
    pub fn tensor_count(&self) -> Result<usize> {
        match &self.deepseek_v3 {
            Some(d) => Ok(d.tensors()?.len()),
            None => Ok(self.tensors()?.len()),
        }
    }
}

/// Built-in shapes.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "deepseek-r1-slice",
        description: "DeepSeek-R1's release config with 2 layers (first_k_dense_replace 1: layer 0 dense, layer 1 \
                      MoE of 256 experts + shared) and the MTP module as layer 2; FP8 128x128 blocks, 7 shards of \
                      <= 5 GB, 3,145 tensors (benchmarks, not CI)",
        spec: || {
            let mut s = spec("DeepseekV3ForCausalLM", 7168, 18432, 2, 128, 128, None, 129280, false);
            s.deepseek_v3 = Some(DeepseekV3Fixture::r1_slice());
            s
        },
    },
    Preset {
        name: "r1-distill-qwen-1.5b",
        description: "DeepSeek-R1-Distill-Qwen-1.5B shape: hidden 1536, 28 layers, 12/2 heads, vocab 151936, bf16",
        spec: || spec("Qwen2ForCausalLM", 1536, 8960, 28, 12, 2, None, 151936, false),
    },
    Preset {
        name: "r1-distill-llama-8b",
        description: "DeepSeek-R1-Distill-Llama-8B shape: hidden 4096, 32 layers, 32/8 heads, vocab 128256, bf16",
        spec: || spec("LlamaForCausalLM", 4096, 14336, 32, 32, 8, None, 128256, false),
    },
    Preset {
        name: "r1-0528-qwen3-8b",
        description: "DeepSeek-R1-0528-Qwen3-8B shape: hidden 4096, 36 layers, 32/8 heads, head_dim 128, vocab 151936",
        spec: || spec("Qwen3ForCausalLM", 4096, 12288, 36, 32, 8, Some(128), 151936, false),
    },
    Preset {
        name: "tiny-qwen2",
        description: "2-layer Qwen2, hidden 64, 4/2 heads, vocab 256",
        spec: || spec("Qwen2ForCausalLM", 64, 128, 2, 4, 2, None, 256, false),
    },
    Preset {
        name: "tiny-llama",
        description: "2-layer Llama, hidden 64, 4/1 heads, vocab 256, tied embeddings",
        spec: || spec("LlamaForCausalLM", 64, 128, 2, 4, 1, None, 256, true),
    },
    Preset {
        name: "tiny-qwen3",
        description: "2-layer Qwen3, hidden 64, 4/2 heads, head_dim 32, vocab 256",
        spec: || spec("Qwen3ForCausalLM", 64, 128, 2, 4, 2, Some(32), 256, false),
    },
];

/// Looks a preset up by name.
pub fn preset(name: &str) -> Result<FixtureSpec> {
    PRESETS.iter().find(|p| p.name == name).map(|p| (p.spec)()).ok_or_else(|| ExportError::InvalidOption {
        option: "--preset",
        message: format!(
            "must be one of {}, got `{name}`",
            PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
        ),
    })
}

/// How a tensor is initialized.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// Uniform with this standard deviation around 0.
    Random(f32),
    /// 1 + uniform noise of this standard deviation (norm weights).
    AroundOne(f32),
}

impl FixtureSpec {
    fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_heads.max(1))
    }

    /// Tensors of the checkpoint in file order: name, shape, init.
    fn tensors(&self) -> Result<Vec<(String, Vec<usize>, Init)>> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let d = self.head_dim();
        let (qkv_bias, qk_norm) = match self.architecture.as_str() {
            "Qwen2ForCausalLM" => (true, false),
            "LlamaForCausalLM" => (false, false),
            "Qwen3ForCausalLM" => (false, true),
            other => {
                return Err(ExportError::InvalidOption {
                    option: "--arch",
                    message: format!("must be Qwen2ForCausalLM, LlamaForCausalLM or Qwen3ForCausalLM, got `{other}`"),
                })
            }
        };
        let w = Init::Random(0.02);
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, h], w)];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            let mut push = |n: &str, s: Vec<usize>, init: Init| t.push((format!("{p}.{n}"), s, init));
            push("input_layernorm.weight", vec![h], Init::AroundOne(0.1));
            push("self_attn.q_proj.weight", vec![self.num_heads * d, h], w);
            push("self_attn.k_proj.weight", vec![self.num_kv_heads * d, h], w);
            push("self_attn.v_proj.weight", vec![self.num_kv_heads * d, h], w);
            if qkv_bias {
                push("self_attn.q_proj.bias", vec![self.num_heads * d], w);
                push("self_attn.k_proj.bias", vec![self.num_kv_heads * d], w);
                push("self_attn.v_proj.bias", vec![self.num_kv_heads * d], w);
            }
            if qk_norm {
                push("self_attn.q_norm.weight", vec![d], Init::AroundOne(0.1));
                push("self_attn.k_norm.weight", vec![d], Init::AroundOne(0.1));
            }
            push("self_attn.o_proj.weight", vec![h, self.num_heads * d], w);
            push("post_attention_layernorm.weight", vec![h], Init::AroundOne(0.1));
            push("mlp.gate_proj.weight", vec![i, h], w);
            push("mlp.up_proj.weight", vec![i, h], w);
            push("mlp.down_proj.weight", vec![h, i], w);
        }
        t.push(("model.norm.weight".into(), vec![h], Init::AroundOne(0.1)));
        if !self.tie_word_embeddings {
            t.push(("lm_head.weight".into(), vec![v, h], w));
        }
        Ok(t)
    }

    /// The `config.json` HF would write (transformers 4.x field names); a DeepseekV3 fixture's own config.
    pub fn config_json(&self) -> serde_json::Value {
        if let Some(d) = &self.deepseek_v3 {
            return d.config.clone();
        }
        let model_type = match self.architecture.as_str() {
            "Qwen2ForCausalLM" => "qwen2",
            "LlamaForCausalLM" => "llama",
            _ => "qwen3",
        };
        let mut c = json!({
            "architectures": [self.architecture],
            "model_type": model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "vocab_size": self.vocab_size,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.dtype.torch_name(),
            "bos_token_id": 0,
            "eos_token_id": 1,
        });
        if let Some(d) = self.head_dim {
            c["head_dim"] = json!(d);
        }
        c
    }
}

/// SplitMix64: tiny, fast, deterministic.
struct SplitMix(u64);
impl SplitMix {
    #[inline]
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    #[inline]
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io { path: path.to_path_buf(), source }
}

/// Writes `config.json`, `generation_config.json` and `model.safetensors` into `dir` (created if
/// needed); a DeepseekV3 fixture is written in shards with an index instead. Returns the number of bytes of
/// weights written.
pub fn write_checkpoint(spec: &FixtureSpec, dir: &Path) -> Result<u64> {
    if let Some(d) = &spec.deepseek_v3 {
        return deepseek_v3::write(d, spec.seed, dir);
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tensors = spec.tensors()?;
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, serde_json::to_string_pretty(&spec.config_json()).unwrap_or_default()).map_err(io(&cfg))?;
    let gen = dir.join("generation_config.json");
    let gen_json = json!({"bos_token_id": 0, "eos_token_id": 1, "do_sample": true, "temperature": 0.6, "top_p": 0.95});
    std::fs::write(&gen, serde_json::to_string_pretty(&gen_json).unwrap_or_default()).map_err(io(&gen))?;

    // Header: offsets follow file order.
    let es = spec.dtype.size();
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, shape, _) in &tensors {
        let n: usize = shape.iter().product::<usize>() * es;
        header.insert(
            name.clone(),
            json!({"dtype": spec.dtype.safetensors_name(), "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut hbytes = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap_or_default();
    while !hbytes.len().is_multiple_of(8) {
        hbytes.push(b' ');
    }
    let path = dir.join("model.safetensors");
    let mut f = BufWriter::with_capacity(8 << 20, File::create(&path).map_err(io(&path))?);
    f.write_all(&(hbytes.len() as u64).to_le_bytes()).map_err(io(&path))?;
    f.write_all(&hbytes).map_err(io(&path))?;
    let mut rng = SplitMix(spec.seed ^ 0x5E_ED0F_F1C5);
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 22);
    for (_, shape, init) in &tensors {
        let mut left: usize = shape.iter().product();
        while left > 0 {
            let n = left.min((1 << 22) / es);
            buf.clear();
            for _ in 0..n {
                let u = rng.unit() * 1.732_050_8; // unit variance
                let x = match init {
                    Init::Random(std) => u * std,
                    Init::AroundOne(std) => 1.0 + u * std,
                };
                match spec.dtype {
                    FixtureDtype::Bf16 => buf.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
                    FixtureDtype::F16 => buf.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
                    FixtureDtype::F32 => buf.extend_from_slice(&x.to_le_bytes()),
                }
            }
            f.write_all(&buf).map_err(io(&path))?;
            left -= n;
        }
    }
    f.flush().map_err(io(&path))?;
    Ok(offset as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_presets_write_valid_safetensors() {
        for name in ["tiny-qwen2", "tiny-llama", "tiny-qwen3"] {
            let dir = tempfile::tempdir().unwrap();
            let spec = preset(name).unwrap();
            let bytes = write_checkpoint(&spec, dir.path()).unwrap();
            let ck = crate::checkpoint::Checkpoint::open(dir.path()).unwrap();
            assert_eq!(ck.total_bytes(), bytes);
            assert!(ck.has("model.layers.1.mlp.down_proj.weight"));
            assert_eq!(ck.has("lm_head.weight"), !spec.tie_word_embeddings);
        }
        assert!(preset("nope").unwrap_err().to_string().contains("r1-distill-qwen-1.5b"));
    }

    #[test]
    fn the_1_5b_preset_has_the_right_parameter_count() {
        let s = preset("r1-distill-qwen-1.5b").unwrap();
        let n: usize = s.tensors().unwrap().iter().map(|(_, sh, _)| sh.iter().product::<usize>()).sum();
        assert_eq!(n, 1_777_088_000);
    }
}
