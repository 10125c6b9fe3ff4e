//! Incremental detokenizer on the real R1 tokenizer: concatenated deltas equal one full decode, and no delta
//! carries a broken character.

use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use r1_engine::text::{IncrementalDetokenizer, Tokenizer};

fn tok() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/arith-r1")).unwrap()
    })
}

/// Streams `ids` and returns the deltas (final flush appended as the last delta).
fn stream(ids: &[u32], context: &[u32], skip_special: bool) -> Vec<String> {
    let tok = tok();
    let mut d = IncrementalDetokenizer::with_context(context, skip_special);
    let mut out: Vec<String> = ids.iter().map(|&id| d.push(tok, id).unwrap()).collect();
    out.push(d.finish(tok).unwrap());
    out
}

const TEXTS: &[&str] = &[
    "Hello, world! The answer is 42.",
    "  leading spaces and   runs of   spaces  ",
    "你好，世界。今天天气很好，我们去公园散步吧。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장도 테스트합니다.",
    "emoji: 🌍🚀👩‍💻👍🏽 and flags 🇨🇭🇯🇵",
    "mixed: naïve café — “quotes” ‘single’ … ½ ∑ ∫ ≠ ≤",
    "<think>\nLet me think about 12*13.\n</think>\n\n156",
    "code:\n```rust\nfn main() { println!(\"hi\"); }\n```\n\ttabs\r\nwindows",
    "numbers 1234567890 3.14159 -0.001 1e-9",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝒜𝒷𝒸 and rare CJK 𠀀𠀁𪚥",
    "<｜User｜>special tokens<｜Assistant｜>inside<｜end▁of▁sentence｜>",
];

#[test]
fn deltas_concatenate_to_full_decode() {
    let tok = tok();
    for text in TEXTS {
        let ids = tok.encode(text, false).unwrap();
        for skip in [true, false] {
            let deltas = stream(&ids, &[], skip);
            let full = tok.decode(&ids, skip).unwrap();
            assert_eq!(deltas.concat(), full, "text {text:?} skip_special={skip}");
            if !full.contains('\u{FFFD}') {
                assert!(
                    deltas.iter().all(|d| !d.contains('\u{FFFD}')),
                    "broken char streamed for {text:?}: {deltas:?}"
                );
            }
        }
    }
}

#[test]
fn multibyte_chars_are_held_until_complete() {
    let tok = tok();
    // A rare CJK ideograph is split over several byte-level tokens: the pushes before the last emit nothing.
    let ids = tok.encode("𪚥", false).unwrap();
    assert!(ids.len() > 1, "expected the rare ideograph to need several tokens, got {ids:?}");
    let deltas = stream(&ids, &[], true);
    assert!(deltas[..ids.len() - 1].iter().all(String::is_empty), "{deltas:?}");
    assert_eq!(deltas[ids.len() - 1], "𪚥");
}

#[test]
fn context_gives_mid_text_spelling_and_is_not_emitted() {
    let tok = tok();
    let prompt = tok.encode("The capital of France is", false).unwrap();
    let all = tok.encode("The capital of France is Paris, of course.", false).unwrap();
    assert_eq!(&all[..prompt.len()], &prompt[..], "prompt must be a token prefix for this test");
    let gen = &all[prompt.len()..];
    let deltas = stream(gen, &prompt, true);
    let expected = &tok.decode(&all, true).unwrap()[tok.decode(&prompt, true).unwrap().len()..];
    assert_eq!(deltas.concat(), expected);
}

#[test]
fn window_stays_bounded() {
    let tok = tok();
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(50);
    let ids = tok.encode(&text, false).unwrap();
    let mut d = IncrementalDetokenizer::new(true);
    let mut max_window = 0;
    for &id in &ids {
        d.push(tok, id).unwrap();
        max_window = max_window.max(d.window_len());
    }
    assert!(max_window <= 8, "window grew to {max_window} ids over {} tokens", ids.len());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn any_text_streams_to_its_decode(text in "\\PC{0,60}") {
        let tok = tok();
        let ids = tok.encode(&text, false).unwrap();
        let deltas = stream(&ids, &[], true);
        let full = tok.decode(&ids, true).unwrap();
        prop_assert_eq!(deltas.concat(), full.clone());
        if !full.contains('\u{FFFD}') {
            let clean = deltas.iter().all(|d| !d.contains(char::REPLACEMENT_CHARACTER));
            prop_assert!(clean, "a delta carries U+FFFD: {:?}", deltas);
        }
    }

    #[test]
    fn random_ids_stream_to_their_decode(ids in prop::collection::vec(0u32..128815, 0..40)) {
        let tok = tok();
        let deltas = stream(&ids, &[], true);
        prop_assert_eq!(deltas.concat(), tok.decode(&ids, true).unwrap());
    }
}
