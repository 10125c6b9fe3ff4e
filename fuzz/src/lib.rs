//! Bodies of the r1 fuzz targets, one public function per target.
//!
//! Each function takes the raw bytes libFuzzer generates, feeds them to the same public entry point the
//! programs use for that input (`r1_export::arch::from_config`, `r1_export::checkpoint::Checkpoint::open`,
//! `r1_engine::Manifest::load`, `r1_engine::text::ChatTemplate::render`, `r1_serve::grpc::raw_request` +
//! `r1_serve::validate::validate`), then touches what the programs read next from a successful parse (derived
//! sizes, tensor bytes, rendered prompt). An error is a fine outcome; a panic, an abort or an out-of-memory is a
//! bug. The function never panics itself.
//!
//! This file is the library of the `fuzz/` crate (built by `cargo fuzz`) and is also compiled as a module by
//! `tests/tests/fuzz_corpus.rs`, which replays every committed corpus file through these functions in the normal
//! test suite. It must therefore only name crates both places depend on and never use `crate::` paths.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use prost::Message;
use r1_engine::manifest::DType;
use r1_engine::text::{prompt_opens_reasoning, ChatMessage, ChatTemplate, RenderOptions, TokenizerConfig};
use r1_export::arch::{self, deepseek_v3::DeepseekV3, FamilyGraph};
use r1_export::checkpoint::{self, Checkpoint};
use r1_serve::model::PromptInput;
use r1_serve::validate::{check_context, validate, Limits};

/// A fuzz target body: true when the parser accepted the input.
pub type FuzzBody = fn(&[u8]) -> bool;

/// The targets by name, with their bodies (what `scripts/fuzz.sh` runs and the replay test walks). A body returns
/// true when the parser accepted the input (so the replay test can check that each corpus reaches past the parser).
pub const TARGETS: &[(&str, FuzzBody)] = &[
    ("config_qwen2", config_qwen2),
    ("config_llama", config_llama),
    ("config_qwen3", config_qwen3),
    ("config_deepseek_v3", config_deepseek_v3),
    ("safetensors_header", safetensors_header),
    ("safetensors_index", safetensors_index),
    ("manifest", manifest),
    ("chat_template", chat_template),
    ("generate_request", generate_request),
];

/// Tensors larger than this are not decoded by the safetensors targets (the decode is linear; bigger inputs only
/// slow the fuzzer down).
const MAX_DECODE_BYTES: usize = 1 << 16;

/// The repository root (both crates that compile this file sit one level below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

thread_local! {
    /// A scratch directory per thread (the replay test runs targets on several threads).
    static SCRATCH: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

/// Runs `f` on this thread's scratch directory after writing `files` into it (every other file removed first).
fn with_files(files: &[(&str, &[u8])], f: impl FnOnce(&Path) -> bool) -> bool {
    SCRATCH.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            match tempfile::Builder::new().prefix("r1-fuzz-").tempdir() {
                Ok(d) => *slot = Some(d),
                Err(e) => {
                    eprintln!("r1-fuzz: cannot create a scratch directory: {e}");
                    std::process::abort();
                }
            }
        }
        let Some(dir) = slot.as_ref().map(|d| d.path().to_path_buf()) else { return false };
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        for (name, bytes) in files {
            if let Err(e) = std::fs::write(dir.join(name), bytes) {
                eprintln!("r1-fuzz: cannot write {name} into {}: {e}", dir.display());
                std::process::abort();
            }
        }
        f(&dir)
    })
}

/// Parses `data` as a config.json, forces `architectures` to `[architecture]` when it is an object (so each
/// family's target spends its time in that family's parser), and returns the value.
fn config_value(data: &[u8], architecture: &str) -> Option<serde_json::Value> {
    let mut v: serde_json::Value = serde_json::from_slice(data).ok()?;
    if let Some(obj) = v.as_object_mut() {
        obj.insert("architectures".into(), serde_json::json!([architecture]));
    }
    Some(v)
}

/// What the exporter reads from a validated family right after parsing (manifest fields, KV layout).
fn touch_family(family: &dyn FamilyGraph) {
    let _ = family.family();
    let _ = family.architecture();
    let _ = family.resolved_config();
    let info = family.model_info();
    let _ = (info.num_layers, info.vocab_size, info.hidden_size, info.max_position_embeddings);
    for dtype in [DType::Float32, DType::Float16] {
        let kv = family.kv_cache(dtype);
        let _ = kv.computed_bytes_per_token();
    }
    let _ = family.fp8_block_quantized();
    let _ = family.notes();
}

/// `arch::from_config`, then everything derived from the family; whether the config was accepted.
fn accept_config(path: &Path, v: &serde_json::Value) -> bool {
    match arch::from_config(path, v) {
        Ok(family) => {
            touch_family(family.as_ref());
            true
        }
        Err(_) => false,
    }
}

fn config_dense(data: &[u8], architecture: &str) -> bool {
    let Some(v) = config_value(data, architecture) else { return false };
    let path = Path::new("config.json");
    let accepted = accept_config(path, &v);
    // The dense spec itself (rotary frequencies are computed from it when the graph is built).
    let spec = match architecture {
        "Qwen2ForCausalLM" => arch::parse_struct::<arch::qwen2::Qwen2Config>(path, &v).and_then(|c| c.resolve(path)),
        "LlamaForCausalLM" => arch::parse_struct::<arch::llama::LlamaConfig>(path, &v).and_then(|c| c.resolve(path)),
        _ => arch::parse_struct::<arch::qwen3::Qwen3Config>(path, &v).and_then(|c| c.resolve(path)),
    };
    if let Ok(spec) = spec {
        let _ = spec.rope.inv_freq(spec.head_dim);
    }
    accepted
}

/// `config.json` of a Qwen2 checkpoint → `r1_export::arch::from_config`.
pub fn config_qwen2(data: &[u8]) -> bool {
    config_dense(data, "Qwen2ForCausalLM")
}

/// `config.json` of a Llama checkpoint → `r1_export::arch::from_config`.
pub fn config_llama(data: &[u8]) -> bool {
    config_dense(data, "LlamaForCausalLM")
}

/// `config.json` of a Qwen3 checkpoint → `r1_export::arch::from_config`.
pub fn config_qwen3(data: &[u8]) -> bool {
    config_dense(data, "Qwen3ForCausalLM")
}

/// `config.json` of a DeepseekV3 checkpoint → `r1_export::arch::from_config`, then the derived sizes the graph
/// builder computes (rotary/YaRN frequencies, softmax scale, KV sizes).
pub fn config_deepseek_v3(data: &[u8]) -> bool {
    let architecture = "DeepseekV3ForCausalLM";
    let Some(v) = config_value(data, architecture) else { return false };
    let path = Path::new("config.json");
    let accepted = accept_config(path, &v);
    if let Ok(ds) = DeepseekV3::from_config(path, &v, architecture) {
        let cfg = ds.config();
        let _ = cfg.qk_head_dim();
        let _ = cfg.rope_inv_freq();
        let _ = cfg.softmax_scale();
        let _ = cfg.is_moe_layer(0);
        let _ = cfg.latent_values_per_token_layer();
        let _ = cfg.per_head_values_per_token_layer();
    }
    accepted
}

/// What the exporter does with an opened checkpoint before and while converting weights.
fn touch_checkpoint(ck: &Checkpoint) {
    let _ = ck.total_bytes();
    let _ = ck.dominant_dtype();
    for name in ck.names() {
        let Ok(shape) = ck.shape(name).map(<[usize]>::to_vec) else { continue };
        let _ = ck.tensor(name, &shape);
        if let Ok(t) = ck.tensor_any_shape(name) {
            if let Ok(src) = t.float() {
                if t.data.len() <= MAX_DECODE_BYTES {
                    let _ = checkpoint::convert::to_f32_vec(t.data, src);
                    let mut sink = |_: &[u8]| Ok(());
                    let _ = checkpoint::convert::convert(t.data, src, r1_export::onnx::ElemType::F16, &mut sink);
                }
            }
        }
        ck.release(name);
    }
}

/// A `model.safetensors` file (8-byte header length, JSON header, data) → `Checkpoint::open` and every tensor.
pub fn safetensors_header(data: &[u8]) -> bool {
    with_files(&[(checkpoint::SINGLE_FILE, data)], open_and_touch)
}

fn open_and_touch(dir: &Path) -> bool {
    match Checkpoint::open(dir) {
        Ok(ck) => {
            touch_checkpoint(&ck);
            true
        }
        Err(_) => false,
    }
}

/// A valid two-tensor shard the index target can point at.
fn shard_bytes() -> &'static [u8] {
    static SHARD: OnceLock<Vec<u8>> = OnceLock::new();
    SHARD.get_or_init(|| {
        let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[1,2],"data_offsets":[8,12]}}"#;
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header);
        v.extend_from_slice(&[0, 0, 128, 63, 0, 0, 0, 64, 128, 63, 0, 64]);
        v
    })
}

/// Shard file names the index target provides next to the index.
pub const INDEX_SHARDS: [&str; 2] = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];

/// A `model.safetensors.index.json` next to two valid shards → `Checkpoint::open` and every tensor.
pub fn safetensors_index(data: &[u8]) -> bool {
    let shard = shard_bytes();
    with_files(&[(checkpoint::INDEX_FILE, data), (INDEX_SHARDS[0], shard), (INDEX_SHARDS[1], shard)], open_and_touch)
}

/// An artifact's `manifest.json` → `Manifest::load`, then the sizes the engine derives from it.
pub fn manifest(data: &[u8]) -> bool {
    with_files(&[(r1_engine::manifest::MANIFEST_FILE, data)], |dir| {
        let Ok(m) = r1_engine::Manifest::load(dir) else { return false };
        {
            let _ = m.kv_cache.computed_bytes_per_token();
            let _ = m.kv_cache.dtype.size();
            for (name, record) in m.targets.iter() {
                let _ = (name.len(), record.files().len());
            }
            let _ = m.verify_files(dir);
        }
        true
    })
}

/// The DeepSeek-R1 chat template (from the arith-r1 fixture's `tokenizer_config.json`, whose template is the
/// real R1 one; the replay test checks that against `.r1/tokenizer/` when setup has run), compiled once.
pub fn r1_template() -> Option<&'static ChatTemplate> {
    static TEMPLATE: OnceLock<Option<ChatTemplate>> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let path = repo_root().join("tests/fixtures/arith-r1/tokenizer_config.json");
            let cfg = match TokenizerConfig::from_file(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("r1-fuzz: {e}");
                    return None;
                }
            };
            ChatTemplate::from_config(&cfg, None, false).map_err(|e| eprintln!("r1-fuzz: {e}")).ok()
        })
        .as_ref()
}

/// Chat messages → the R1 template. A JSON array is rendered both as arbitrary template values (any keys, any
/// types: what `render_values` accepts) and, when it fits, as typed [`ChatMessage`]s; any other input is split on
/// NUL bytes into alternating role/content strings (so the fuzzer can reach the template with any text without
/// having to write JSON escapes). Returns true when some rendering succeeded.
pub fn chat_template(data: &[u8]) -> bool {
    let Some(tmpl) = r1_template() else {
        eprintln!("r1-fuzz: the R1 chat template is not available");
        std::process::abort();
    };
    let render = |msgs: &[ChatMessage]| {
        let mut ok = false;
        for add_generation_prompt in [false, true] {
            let opts = RenderOptions { add_generation_prompt, ..Default::default() };
            if let Ok(s) = tmpl.render(msgs, &opts) {
                let _ = prompt_opens_reasoning(&s);
                ok = true;
            }
        }
        ok
    };
    if data.first() == Some(&b'[') {
        let mut ok = false;
        if let Ok(values) = serde_json::from_slice::<Vec<serde_json::Value>>(data) {
            let msgs = values.iter().map(minijinja::Value::from_serialize).collect();
            let opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
            ok |= tmpl.render_values(msgs, &opts).is_ok();
        }
        if let Ok(typed) = serde_json::from_slice::<Vec<ChatMessage>>(data) {
            ok |= render(&typed);
        }
        return ok;
    }
    let text = String::from_utf8_lossy(data);
    let parts: Vec<&str> = text.split('\0').collect();
    let msgs: Vec<ChatMessage> =
        parts.chunks(2).map(|c| ChatMessage::new(c[0], c.get(1).copied().unwrap_or_default())).collect();
    render(&msgs)
}

/// Protobuf bytes of an `r1.v1.GenerateRequest` → prost decode → `r1_serve::grpc::raw_request` →
/// `r1_serve::validate::validate` (the server's default limits) → `check_context` → for chat requests, the R1
/// template as the server renders it. Returns true when validation accepted the request.
pub fn generate_request(data: &[u8]) -> bool {
    let Ok(req) = r1_proto::r1::v1::GenerateRequest::decode(data) else { return false };
    let limits = Limits {
        max_new_tokens: 4096,
        default_max_tokens: 512,
        max_context_tokens: 4096,
        sampling_defaults: Default::default(),
        request_timeout: None,
    };
    let Ok(raw) = r1_serve::grpc::raw_request(req) else { return false };
    let Ok(valid) = validate(raw, &limits) else { return false };
    match &valid.input {
        PromptInput::Text(t) => {
            let _ = check_context(t.len(), valid.max_tokens, &limits);
        }
        PromptInput::Tokens(ids) => {
            let _ = check_context(ids.len(), valid.max_tokens, &limits);
        }
        PromptInput::Chat(turns, _) => {
            let Some(tmpl) = r1_template() else { return true };
            let msgs: Vec<ChatMessage> =
                turns.iter().map(|t| ChatMessage::new(t.role.clone(), t.content.clone())).collect();
            let opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
            if let Ok(s) = tmpl.render(&msgs, &opts) {
                let _ = check_context(s.len(), valid.max_tokens, &limits);
            }
        }
    }
    true
}
