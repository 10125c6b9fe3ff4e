//! CI smoke for the fuzz targets (issue #8): replays every committed corpus file under `fuzz/corpus/<target>/`
//! through the same target bodies `cargo fuzz` runs (`fuzz/src/lib.rs`, compiled here as a module), asserting
//! that no input panics. Each corpus must also hold inputs the parser accepts and inputs it rejects, so the
//! replay exercises more than the first error path. The real fuzzing (libFuzzer, minutes per target) is
//! `scripts/fuzz.sh`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod bodies;

fn corpus_dir(target: &str) -> PathBuf {
    bodies::repo_root().join("fuzz/corpus").join(target)
}

fn replay(target: &str, body: fn(&[u8]) -> bool) {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} of target {target} is missing: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "target {target}: expected at least 5 corpus files in {}, found {}", dir.display(), files.len());
    let (mut accepted, mut rejected, mut panicked) = (0usize, 0usize, Vec::new());
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("cannot read {}: {e}", f.display()));
        match catch_unwind(AssertUnwindSafe(|| body(&data))) {
            Ok(true) => accepted += 1,
            Ok(false) => rejected += 1,
            Err(_) => panicked.push(f.display().to_string()),
        }
    }
    assert!(panicked.is_empty(), "target {target}: {} corpus inputs panicked: {panicked:#?}", panicked.len());
    assert!(accepted > 0, "target {target}: none of the {} corpus inputs was accepted by the parser", files.len());
    assert!(rejected > 0, "target {target}: every one of the {} corpus inputs was accepted (no error path covered)", files.len());
    eprintln!("{target}: {} inputs replayed, {accepted} accepted, {rejected} rejected, 0 panics", files.len());
}

macro_rules! replay_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                replay(stringify!($name), bodies::$name);
            }
        )*
    };
}

replay_tests!(
    config_qwen2,
    config_llama,
    config_qwen3,
    config_deepseek_v3,
    safetensors_header,
    safetensors_index,
    manifest,
    chat_template,
    generate_request,
);

/// Every target listed in `bodies::TARGETS` has a test above and a corpus directory, and nothing else is in
/// `fuzz/corpus/` (a new target cannot be added without its replay, nor a corpus left behind).
#[test]
fn every_target_has_a_corpus_and_a_replay() {
    let listed: Vec<&str> = bodies::TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(listed.len(), 9, "update the replay_tests! list together with TARGETS");
    let mut dirs: Vec<String> = std::fs::read_dir(bodies::repo_root().join("fuzz/corpus"))
        .expect("fuzz/corpus")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let mut want: Vec<String> = listed.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(dirs, want);
    let fuzz_targets = bodies::repo_root().join("fuzz/fuzz_targets");
    for name in &listed {
        let f = fuzz_targets.join(format!("{name}.rs"));
        let src = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(src.contains(&format!("r1_fuzz::{name}(data)")), "{} does not call r1_fuzz::{name}", f.display());
    }
}

/// The chat-template target renders with the arith-r1 fixture's template; it must be the real R1 one that
/// `scripts/setup.sh` installs into `.r1/tokenizer/` (checked when setup has run).
#[test]
fn fixture_template_is_the_r1_template() {
    let template = |p: PathBuf| -> Option<String> {
        let text = std::fs::read_to_string(&p).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        Some(v["chat_template"].as_str().unwrap_or_else(|| panic!("{} has no chat_template string", p.display())).to_string())
    };
    let root = bodies::repo_root();
    let fixture = template(root.join("tests/fixtures/arith-r1/tokenizer_config.json")).expect("fixture tokenizer_config.json");
    assert!(fixture.contains("<｜Assistant｜>"), "the fixture template is not the DeepSeek-R1 one");
    assert!(bodies::r1_template().is_some(), "the fixture template does not compile");
    let home = std::env::var_os("R1_HOME").map(PathBuf::from).unwrap_or_else(|| root.join(".r1"));
    if let Some(real) = template(home.join("tokenizer/tokenizer_config.json")) {
        assert_eq!(fixture, real, "tests/fixtures/arith-r1 and .r1/tokenizer chat templates differ");
    }
}
