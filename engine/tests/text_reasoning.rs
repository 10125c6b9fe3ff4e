//! Reasoning split: streamed in any chunking it equals the one-shot split, and it composes with the
//! detokenizer on real R1 token streams.

use std::path::Path;

use proptest::prelude::*;
use r1_engine::text::{IncrementalDetokenizer, ReasoningSplitter, Tokenizer};

fn split(prompt_opened: bool, chunks: &[&str]) -> (String, String) {
    let mut s = ReasoningSplitter::new(prompt_opened);
    let (mut r, mut c) = (String::new(), String::new());
    for ch in chunks {
        let d = s.push(ch);
        r.push_str(&d.reasoning);
        c.push_str(&d.content);
    }
    let d = s.finish();
    (r + &d.reasoning, c + &d.content)
}

const CASES: &[(bool, &str, &str, &str)] = &[
    (false, "<think>\nA.\n</think>\n\nB.", "A.", "B."),
    (false, "<think>\n\n</think>\n\nOnly answer.", "", "Only answer."),
    (false, "<think>A</think>B", "A", "B"),
    (false, "No reasoning at all.\n", "", "No reasoning at all.\n"),
    (false, "\n<think>\nx\n</think>\ny", "x", "y"),
    (true, "Thinking...\n</think>\n\nDone.", "Thinking...", "Done."),
    (true, "</think>\n\nDone.", "", "Done."),
    (true, "never closed\n", "never closed\n", ""),
    (true, "<think>\nredundant open\n</think>\nok", "redundant open", "ok"),
    (
        false,
        "<think>\nuses </thin k> and <think> inside\n</think>\n\nend </think> kept",
        "uses </thin k> and <think> inside",
        "end </think> kept",
    ),
    (false, "<think>\n数学：１２×３＝３６ 🌍\n</think>\n\n答案是36。", "数学：１２×３＝３６ 🌍", "答案是36。"),
];

#[test]
fn documented_cases_one_shot_and_byte_by_char() {
    for &(opened, text, reasoning, content) in CASES {
        assert_eq!(split(opened, &[text]), (reasoning.to_string(), content.to_string()), "{text:?}");
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let chunks: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(split(opened, &chunks), (reasoning.to_string(), content.to_string()), "char by char {text:?}");
    }
}

#[test]
fn no_partial_tag_is_emitted() {
    let mut s = ReasoningSplitter::new(true);
    let d = s.push("abc\n</th");
    assert_eq!(d.reasoning, "abc");
    assert!(d.content.is_empty());
    let d = s.push("ink>\n\nX");
    assert_eq!((d.reasoning.as_str(), d.content.as_str()), ("", "X"));
    assert!(!s.in_reasoning());
}

#[test]
fn with_detokenizer_on_r1_tokens() {
    let tok = Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/arith-r1")).unwrap();
    let output = "<think>\nThe user asks 7*8. That is 56.\n</think>\n\n**56**<｜end▁of▁sentence｜>";
    let ids = tok.encode(output, false).unwrap();
    assert!(ids.contains(&128798) && ids.contains(&128799), "think tags are single added tokens: {ids:?}");
    let mut detok = IncrementalDetokenizer::new(true);
    let mut split = ReasoningSplitter::new(false);
    let (mut r, mut c) = (String::new(), String::new());
    for &id in &ids {
        let d = split.push(&detok.push(&tok, id).unwrap());
        r.push_str(&d.reasoning);
        c.push_str(&d.content);
    }
    let d = split.push(&detok.finish(&tok).unwrap());
    r.push_str(&d.reasoning);
    c.push_str(&d.content);
    let d = split.finish();
    r.push_str(&d.reasoning);
    c.push_str(&d.content);
    assert_eq!(r, "The user asks 7*8. That is 56.");
    assert_eq!(c, "**56**");
}

proptest! {
    #[test]
    fn any_chunking_equals_one_shot(
        opened in any::<bool>(),
        parts in prop::collection::vec(prop_oneof![
            Just("<think>"), Just("</think>"), Just("\n"), Just("\n\n"), Just("<"), Just("</"), Just("think"),
            Just(">"), Just("a"), Just("é"), Just("🌍"), Just(" "),
        ], 0..30),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let text: String = parts.concat();
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let mut points: Vec<usize> = cuts.iter().filter(|_| !chars.is_empty()).map(|i| chars[i.index(chars.len())].0).collect();
        points.sort_unstable();
        points.dedup();
        let mut chunks = Vec::new();
        let mut last = 0;
        for p in points {
            chunks.push(&text[last..p]);
            last = p;
        }
        chunks.push(&text[last..]);
        prop_assert_eq!(split(opened, &chunks), split(opened, &[text.as_str()]));
    }
}
