//! Chat template and tokenizer against transformers: every case in fixtures/text/chat_cases.json (made by
//! make_chat_cases.py with `apply_chat_template`) must render to the same string and the same token ids.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use r1_engine::text::{
    prompt_opens_reasoning, ChatMessage, ChatTemplate, GenerationConfig, RenderOptions, TextError, Tokenizer,
    TokenizerConfig,
};

fn r1_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/arith-r1")
}

fn cases_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text/chat_cases.json")
}

/// Loaded once per test binary: parsing the 7.8 MB tokenizer.json dominates this suite's time.
fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::from_dir(&r1_dir()).expect("R1 tokenizer fixture loads"))
}

#[test]
fn r1_template_matches_transformers() {
    let tok = tokenizer();
    let text = std::fs::read_to_string(cases_path()).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    // Parsed again as template values so message key order survives (Python dicts keep insertion order).
    let ordered: minijinja::Value = serde_json::from_str(&text).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 12, "expected at least a dozen cases, got {}", cases.len());
    let mut checked = 0;
    for (i, case) in cases.iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        let variant = case["template"].as_str().unwrap();
        let template = match variant {
            "r1" => ChatTemplate::from_config(tok.config(), None, false).unwrap(),
            other => ChatTemplate::from_source(other, doc["templates"][other].as_str().unwrap(), tok.config()).unwrap(),
        };
        let messages_val =
            ordered.get_attr("cases").unwrap().get_item_by_index(i).unwrap().get_attr("messages").unwrap();
        let messages: Vec<minijinja::Value> = messages_val.try_iter().unwrap().collect();
        let opts = RenderOptions {
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
            ..Default::default()
        };
        let result = template.render_values(messages, &opts);
        if let Some(expected_err) = case.get("error") {
            let err = result.expect_err(name);
            assert_eq!(err.kind(), "template_render", "{name}: {err} (python: {expected_err})");
            checked += 1;
            continue;
        }
        let rendered = result.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "case {name}: rendered text differs");
        let ids = tok.encode(&rendered, false).unwrap();
        let expected: Vec<u32> =
            case["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, expected, "case {name}: token ids differ");
        assert_eq!(prompt_opens_reasoning(&rendered), name == "r1_0528_gen", "case {name}");
        checked += 1;
    }
    assert_eq!(checked, cases.len());
}

#[test]
fn typed_messages_render_like_values() {
    let tok = tokenizer();
    let t = ChatTemplate::from_config(tok.config(), None, false).unwrap();
    let msgs =
        vec![ChatMessage::new("system", "You are a careful assistant."), ChatMessage::new("user", "Name a prime.")];
    let out = t.render(&msgs, &RenderOptions { add_generation_prompt: true, ..Default::default() }).unwrap();
    assert_eq!(out, "<｜begin▁of▁sentence｜>You are a careful assistant.<｜User｜>Name a prime.<｜Assistant｜>");
    // content None is dropped like transformers does, and the R1 template then fails on it.
    let bad = vec![ChatMessage { content: None, ..ChatMessage::new("user", "") }];
    assert!(matches!(t.render(&bad, &RenderOptions::default()), Err(TextError::Render { .. })));
}

#[test]
fn special_tokens_and_eos_merge() {
    let dir = r1_dir();
    let cfg = TokenizerConfig::from_file(&dir.join("tokenizer_config.json")).unwrap();
    assert_eq!(cfg.bos_token.as_deref(), Some("<｜begin▁of▁sentence｜>"));
    let gen = GenerationConfig { eos_token_ids: vec![1, 128001, 1], bos_token_id: Some(0), ..Default::default() };
    let tok = Tokenizer::from_parts(&dir.join("tokenizer.json"), cfg, gen).unwrap();
    assert_eq!(tok.bos_token_id(), Some(0));
    assert_eq!(tok.eos_token_ids(), &[1, 128001]);
    assert!(tok.is_eos(128001) && !tok.is_eos(2));
    assert_eq!(tok.token_to_id("<think>"), Some(128798));
    assert_eq!(tok.token_to_id("</think>"), Some(128799));
    assert!(tok.is_special(1) && !tok.is_special(128798));
    assert_eq!(tok.vocab_size(), 128815);
    // add_bos_token is false for R1: encoding with special tokens adds nothing.
    assert_eq!(tok.encode("hi", true).unwrap(), tok.encode("hi", false).unwrap());
    let err = tok.check_ids(&[5, 129000]).unwrap_err();
    assert_eq!(err.to_string(), "token id 129000 is outside the vocabulary (size 128815)");
    // Unknown ids decode to nothing instead of failing a stream.
    assert_eq!(tok.decode(&[129000], true).unwrap(), "");
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    std::fs::write(dir.path().join("tokenizer_config.json"), "{\"bos_token\": 5}").unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("`bos_token`") && err.to_string().contains("got a number"), "{err}");
}

#[test]
fn chat_template_jinja_file_is_used() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(r1_dir().join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    std::fs::write(dir.path().join("chat_template.jinja"), "{% for m in messages %}[{{ m.role }}]{% endfor %}\n")
        .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let t = ChatTemplate::from_config(tok.config(), None, false).unwrap();
    let out = t.render(&[ChatMessage::new("user", "x")], &RenderOptions::default()).unwrap();
    assert_eq!(out, "[user]");
    assert!(tok.eos_token_ids().is_empty());
}
