//! CI smoke for the fuzz targets (issue #8): replays every committed corpus file under `fuzz/corpus/<target>/`
//! through the same target bodies `cargo fuzz` runs (`fuzz/src/lib.rs`, compiled here as a module), asserting
//! that no input panics. Each corpus must also hold inputs the parser accepts and inputs it rejects, so the
//! replay exercises more than the first error path. Then a short mutation smoke: every corpus file is mutated
//! [`MUTANTS`] times by a seeded mutator (byte flips, deletions, insertions, duplications, splices with another
//! corpus file, numbers replaced by extreme values) and every mutant must not panic either. The real fuzzing
//! (libFuzzer, coverage-guided, minutes per target) is `scripts/fuzz.sh`.

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
    assert!(
        files.len() >= 5,
        "target {target}: expected at least 5 corpus files in {}, found {}",
        dir.display(),
        files.len()
    );
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
    assert!(
        rejected > 0,
        "target {target}: every one of the {} corpus inputs was accepted (no error path covered)",
        files.len()
    );
    eprintln!("{target}: {} inputs replayed, {accepted} accepted, {rejected} rejected, 0 panics", files.len());
    mutation_smoke(target, body, &files);
}

/// Mutants per corpus file (override with `R1_FUZZ_SMOKE_MUTANTS`).
const MUTANTS: usize = 256;

/// xorshift64*: deterministic, dependency-free randomness for the mutator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const EXTREMES: [&str; 8] =
    ["0", "-1", "4294967296", "18446744073709551616", "1e309", "-9223372036854775809", "65537", "NaN"];

/// One random edit of `data` (`other` is another corpus input, for splicing).
fn mutate(rng: &mut Rng, data: &[u8], other: &[u8]) -> Vec<u8> {
    let mut d = data.to_vec();
    for _ in 0..1 + rng.below(3) {
        let len = d.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                d[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                d.drain(i..i + n);
            }
            2 => {
                let i = rng.below(len + 1);
                let bytes: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.next() as u8).collect();
                d.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let chunk = d[i..i + n].to_vec();
                let at = rng.below(len + 1);
                d.splice(at..at, chunk);
            }
            4 if !other.is_empty() => {
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                d.truncate(cut);
                d.extend_from_slice(&other[from..]);
            }
            5 => {
                // Replace one ASCII number with an extreme value (sizes, offsets, ids in JSON and headers).
                let starts: Vec<usize> =
                    (0..len).filter(|&i| d[i].is_ascii_digit() && (i == 0 || !d[i - 1].is_ascii_digit())).collect();
                if !starts.is_empty() {
                    let s = starts[rng.below(starts.len())];
                    let e = (s..len).find(|&i| !d[i].is_ascii_digit()).unwrap_or(len);
                    d.splice(s..e, EXTREMES[rng.below(EXTREMES.len())].bytes());
                }
            }
            _ => d.truncate(rng.below(len + 1)),
        }
    }
    d
}

/// Runs [`MUTANTS`] mutants of every corpus file through `body`; none may panic.
fn mutation_smoke(target: &str, body: fn(&[u8]) -> bool, files: &[PathBuf]) {
    let per_file = std::env::var("R1_FUZZ_SMOKE_MUTANTS").ok().and_then(|v| v.parse().ok()).unwrap_or(MUTANTS);
    let inputs: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).expect("corpus file")).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    let (mut runs, mut accepted) = (0usize, 0usize);
    let started = std::time::Instant::now();
    // Panics are caught and reported with the mutant's bytes; the default hook would print each one first.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failure = None;
    'outer: for (i, data) in inputs.iter().enumerate() {
        for _ in 0..per_file {
            let other = &inputs[rng.below(inputs.len())];
            let m = mutate(&mut rng, data, other);
            match catch_unwind(AssertUnwindSafe(|| body(&m))) {
                Ok(ok) => accepted += usize::from(ok),
                Err(_) => {
                    failure = Some((files[i].display().to_string(), m));
                    break 'outer;
                }
            }
            runs += 1;
        }
    }
    std::panic::set_hook(hook);
    if let Some((from, m)) = failure {
        panic!(
            "target {target}: a mutant of {from} panicked; input ({} bytes): {:?}",
            m.len(),
            String::from_utf8_lossy(&m)
        );
    }
    eprintln!("{target}: {runs} mutants in {:.2?}, {accepted} accepted, 0 panics", started.elapsed());
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
        Some(
            v["chat_template"]
                .as_str()
                .unwrap_or_else(|| panic!("{} has no chat_template string", p.display()))
                .to_string(),
        )
    };
    let root = bodies::repo_root();
    let fixture =
        template(root.join("tests/fixtures/arith-r1/tokenizer_config.json")).expect("fixture tokenizer_config.json");
    assert!(fixture.contains("<｜Assistant｜>"), "the fixture template is not the DeepSeek-R1 one");
    assert!(bodies::r1_template().is_some(), "the fixture template does not compile");
    let home = std::env::var_os("R1_HOME").map(PathBuf::from).unwrap_or_else(|| root.join(".r1"));
    if let Some(real) = template(home.join("tokenizer/tokenizer_config.json")) {
        assert_eq!(fixture, real, "tests/fixtures/arith-r1 and .r1/tokenizer chat templates differ");
    }
}
