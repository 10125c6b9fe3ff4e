//! Fixtures and helpers shared by the engine's test files: `tests/fixtures/tiny` (float32 KV) and
//! `tests/fixtures/tiny-kv16` (float16 KV at the graph boundary), made by `tests/fixtures/make_tiny.py`, whose
//! `expected.json` holds greedy continuations computed by onnxruntime (Python) without any cache.
// Each test file compiles its own copy and uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use r1_engine::backend::{self, Backend, BackendKind, BackendOptions};
use r1_engine::{Engine, Manifest};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub struct Expected {
    pub new_tokens: usize,
    pub cases: Vec<(Vec<u32>, Vec<u32>)>,
}

pub fn expected(name: &str) -> Expected {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids =
        |a: &serde_json::Value| a.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
    Expected {
        new_tokens: v["new_tokens"].as_u64().unwrap() as usize,
        cases: v["cases"].as_array().unwrap().iter().map(|c| (ids(&c["prompt"]), ids(&c["greedy"]))).collect(),
    }
}

pub fn open_backend(name: &str, kind: BackendKind) -> (Manifest, Box<dyn Backend>) {
    let dir = fixture(name);
    let manifest = Manifest::load(&dir).unwrap();
    let b = backend::load(&dir, &manifest, kind, &BackendOptions::default())
        .unwrap_or_else(|e| panic!("{kind:?} backend on {name}: {e}"));
    (manifest, b)
}

pub fn engine(name: &str, kind: BackendKind) -> Engine {
    let (manifest, b) = open_backend(name, kind);
    Engine::from_backend(&fixture(name), manifest, b, None).unwrap()
}

pub const KINDS: [BackendKind; 2] = [BackendKind::Ort, BackendKind::Tract];
pub const FIXTURES: [&str; 2] = ["tiny", "tiny-kv16"];
