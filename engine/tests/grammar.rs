//! Constrained decoding (`sampling::grammar`) over the real R1 tokenizer (arith-r1's): driving the mask with a
//! "model" that always prefers some wrong token still yields JSON that follows the schema, and only EOS is allowed
//! once the value is complete.

use std::path::Path;

use r1_engine::sampling::grammar::{Constraint, Grammars};
use r1_engine::text::Tokenizer;
use serde_json::json;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/arith-r1")).unwrap()
}

/// Greedy decoding under `c` of a row that prefers `favourite` tokens (in order), until EOS; returns the text.
fn drive(tok: &Tokenizer, c: &mut Constraint, favourite: &[u32]) -> String {
    let eos = tok.eos_token_ids()[0];
    let mut ids = Vec::new();
    for step in 0..200 {
        // A row that ranks every token by a fixed pseudo-random score, the favourites first.
        let mut row: Vec<f32> =
            (0..tok.vocab_size() as u32).map(|i| (i.wrapping_mul(2654435761) >> 16) as f32 / 1e5).collect();
        for (k, &f) in favourite.iter().enumerate() {
            row[f as usize] = 100.0 - k as f32;
        }
        c.mask(&mut row, None).unwrap();
        let t = r1_engine::generate::argmax(&row);
        assert!(row[t as usize].is_finite(), "step {step}: the mask left a token");
        if t == eos {
            assert!(c.is_complete(), "EOS only once the value is complete");
            return tok.decode(&ids, true).unwrap();
        }
        c.accept(t).unwrap();
        ids.push(t);
    }
    panic!("no EOS within 200 tokens: {:?}", tok.decode(&ids, true));
}

fn decode(tok: &Tokenizer, grammars: &Grammars, schema: Option<&serde_json::Value>, favourite: &[u32]) -> String {
    drive(tok, &mut grammars.json(schema).unwrap(), favourite)
}

#[test]
fn the_mask_forces_json_that_follows_the_schema() {
    let tok = tokenizer();
    let eos = tok.eos_token_ids()[0];
    let grammars = Grammars::new(&tok, tok.vocab_size(), eos).unwrap();
    // The "model" wants to stop at once, else to close a brace, else digits: the grammar makes it open an object
    // and write the required key first, and allows EOS only after the closing brace.
    let digits: Vec<u32> = (0..10).filter_map(|d| tok.token_to_id(&d.to_string())).collect();
    let mut fav = vec![eos, tok.token_to_id("}").unwrap()];
    fav.extend(&digits);
    let schema = json!({"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
                        "additionalProperties": false});
    let text = decode(&tok, &grammars, Some(&schema), &fav);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(v["answer"].is_i64() && v.as_object().unwrap().len() == 1, "{text}");
    assert!(text.starts_with("{\"answer\":"), "compact JSON: {text}");
    // json_object: any object, here the shortest.
    let text = decode(&tok, &grammars, None, &fav);
    assert_eq!(text, "{}");
}

#[test]
fn a_schema_that_does_not_compile_is_an_error_naming_the_field() {
    let tok = tokenizer();
    let grammars = Grammars::new(&tok, tok.vocab_size(), tok.eos_token_ids()[0]).unwrap();
    let e = grammars.json(Some(&json!({"type": "no-such-type"}))).unwrap_err().to_string();
    assert!(e.contains("JSON schema that cannot be compiled") && e.contains("no-such-type"), "{e}");
    let e = grammars.json(Some(&json!([1, 2]))).unwrap_err().to_string();
    assert!(e.contains("object or a boolean"), "{e}");
}

#[test]
fn a_forced_tool_call_is_one_call_in_r1s_format_with_schema_arguments() {
    let tok = tokenizer();
    let eos = tok.eos_token_ids()[0];
    let grammars = Grammars::new(&tok, tok.vocab_size(), eos).unwrap();
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}},
                        "required": ["a"], "additionalProperties": false});
    let tools = vec![("add".to_string(), schema.clone()), ("mul".to_string(), schema)];
    let digits: Vec<u32> = (0..10).filter_map(|d| tok.token_to_id(&d.to_string())).collect();
    let mut fav = vec![eos, tok.token_to_id("}").unwrap()];
    fav.extend(&digits);
    let text = drive(&tok, &mut grammars.tool_call(&tools).unwrap(), &fav);
    let (before, calls) = r1_engine::text::tools::split_tool_calls(&text).unwrap_or_else(|| panic!("{text:?}"));
    assert_eq!(before, "");
    assert_eq!(calls.len(), 1, "{text:?}");
    assert!(calls[0].name == "add" || calls[0].name == "mul", "{text:?}");
    let args: serde_json::Value = serde_json::from_str(&calls[0].arguments).unwrap();
    assert!(args["a"].is_u64(), "{text:?}");
    let bad = grammars.tool_call(&[("bad name".into(), json!({}))]).unwrap_err().to_string();
    assert!(bad.contains("bad name"), "{bad}");
}
