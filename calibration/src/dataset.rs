//! Calibration samples from a file.
//!
//! - Plain text: one sample per line; blank lines are skipped.
//! - JSONL (`.jsonl`, or any file whose first non-blank line starts with `{`): one object per line with
//!   `"text": "..."`, `"prompt": "..."` or `"messages": [{"role": "...", "content": "..."}, ...]`; messages are
//!   rendered to text by the caller's chat-template function (the engine's, so calibration sees exactly what
//!   serving sees).
//!
//! A sample is **open** when the model's reply is missing: `messages` that end with a user turn (rendered with the
//! generation prompt, as the server renders a request) and bare `prompt`s. The export generates the model's own
//! continuation of an open sample before calibrating on it, because the activations of generated tokens are the
//! ones a prompt never shows (issue 20's measurement: int8 calibrated on prompts alone lost 6 points on arith-r1).
//! `text` lines and `messages` that end with an assistant turn are complete and used as given.
//!
//! Defaults: [`DEFAULT_NUM_SAMPLES`] samples of at most [`DEFAULT_SEQ_LEN`] tokens. 64 × 256 = 16k tokens
//! gives stable activation ranges for per-tensor scales (the histograms hardly move beyond ~32 samples) while a
//! 1.5B model's fp32 calibration pass stays at minutes on a CPU; longer samples are truncated by the driver.
use crate::error::{CalibError, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

/// Default number of calibration samples.
pub const DEFAULT_NUM_SAMPLES: usize = 64;
/// Default maximum tokens per calibration sample.
pub const DEFAULT_SEQ_LEN: usize = 256;

/// One chat message of a JSONL `messages` sample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

/// How the file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    /// One sample per line.
    Text,
    /// One JSON object per line.
    Jsonl,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSample {
    text: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
}

/// One calibration sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The text the model reads (messages rendered with the chat template).
    pub text: String,
    /// The model's reply is missing (a bare prompt, or messages ending with a user turn): the caller generates it.
    pub open: bool,
}

impl Sample {
    /// A complete sample, used as given.
    pub fn complete(text: impl Into<String>) -> Self {
        Sample { text: text.into(), open: false }
    }
}

/// Chat-template renderer: turns messages into the text the model sees. The flag asks for the generation prompt
/// (the assistant header), set when the messages end with a user turn.
pub type RenderFn<'a> = &'a dyn Fn(&[Message], bool) -> Result<String>;

/// Reads up to `max_samples` samples from `path` (format from the extension, else sniffed from the content).
/// Errors name the file, the 1-based line and the problem; a file with no samples is an error.
pub fn load_samples(path: &Path, max_samples: usize, render: RenderFn<'_>) -> Result<Vec<Sample>> {
    if max_samples == 0 {
        return Err(CalibError::invalid("calibration sample count", "at least 1", 0));
    }
    let open = || File::open(path).map_err(|source| CalibError::Io { op: "opening", path: path.to_path_buf(), source });
    let format = detect_format(path, BufReader::new(open()?))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(open()?).lines().enumerate() {
        let line = line.map_err(|source| CalibError::Io { op: "reading", path: path.to_path_buf(), source })?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let err = |problem: String| CalibError::Dataset { path: path.to_path_buf(), line: i + 1, problem };
        let sample = match format {
            DataFormat::Text => Sample::complete(line),
            DataFormat::Jsonl => parse_json_line(line, render).map_err(err)?,
        };
        out.push(sample);
        if out.len() == max_samples {
            break;
        }
    }
    if out.is_empty() {
        return Err(CalibError::Dataset {
            path: path.to_path_buf(),
            line: 0,
            problem: "no samples (file is empty or blank)".into(),
        });
    }
    Ok(out)
}

fn detect_format(path: &Path, reader: impl BufRead) -> Result<DataFormat> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => return Ok(DataFormat::Jsonl),
        Some("txt") => return Ok(DataFormat::Text),
        _ => {}
    }
    for line in reader.lines() {
        let line = line.map_err(|source| CalibError::Io { op: "reading", path: path.to_path_buf(), source })?;
        if !line.trim().is_empty() {
            return Ok(if line.trim_start().starts_with('{') { DataFormat::Jsonl } else { DataFormat::Text });
        }
    }
    Ok(DataFormat::Text)
}

fn parse_json_line(line: &str, render: RenderFn<'_>) -> std::result::Result<Sample, String> {
    let s: JsonSample = serde_json::from_str(line).map_err(|e| format!("invalid JSON sample: {e}"))?;
    match (s.text, s.prompt, s.messages) {
        (Some(t), None, None) if t.trim().is_empty() => Err("`text` is empty".into()),
        (Some(t), None, None) => Ok(Sample::complete(t)),
        (None, Some(p), None) if p.trim().is_empty() => Err("`prompt` is empty".into()),
        (None, Some(p), None) => Ok(Sample { text: p, open: true }),
        (None, None, Some(m)) if m.is_empty() => Err("`messages` is empty".into()),
        (None, None, Some(m)) => {
            let open = m.last().is_some_and(|m| m.role == "user");
            let text = render(&m, open).map_err(|e| format!("rendering `messages` with the chat template: {e}"))?;
            Ok(Sample { text, open })
        }
        (None, None, None) => Err("expected a `text` string, a `prompt` string or a `messages` array".into()),
        _ => Err("has more than one of `text`, `prompt` and `messages`; give one".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(name: &str, body: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(name);
        std::fs::File::create(&p).unwrap().write_all(body.as_bytes()).unwrap();
        (d, p)
    }

    fn render(m: &[Message], generation_prompt: bool) -> Result<String> {
        let text: String = m.iter().map(|m| format!("<{}>{}", m.role, m.content)).collect();
        Ok(if generation_prompt { text + "<assistant>" } else { text })
    }

    fn texts(samples: Vec<Sample>) -> Vec<String> {
        samples.into_iter().map(|s| s.text).collect()
    }

    #[test]
    fn plain_text_skips_blank_lines_and_caps_count() {
        let (_d, p) = file("c.txt", "one\n\n  \ntwo\r\nthree\n");
        assert_eq!(texts(load_samples(&p, 10, &render).unwrap()), vec!["one", "two", "three"]);
        assert_eq!(texts(load_samples(&p, 2, &render).unwrap()), vec!["one", "two"]);
        assert!(load_samples(&p, 10, &render).unwrap().iter().all(|s| !s.open), "text lines are complete");
        assert!(load_samples(&p, 0, &render).unwrap_err().to_string().contains("at least 1"));
    }

    #[test]
    fn jsonl_text_and_messages() {
        let body = "{\"text\": \"2+2=4\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n";
        let (_d, p) = file("c.data", body); // sniffed
        assert_eq!(
            load_samples(&p, 64, &render).unwrap(),
            vec![Sample::complete("2+2=4"), Sample::complete("<user>hi<assistant>yo")]
        );
    }

    #[test]
    fn prompts_and_user_final_messages_are_open_and_get_the_generation_prompt() {
        let body = concat!(
            "{\"prompt\": \"Once upon\"}\n",
            "{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"q\"}]}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n",
        );
        let (_d, p) = file("c.jsonl", body);
        assert_eq!(
            load_samples(&p, 64, &render).unwrap(),
            vec![
                Sample { text: "Once upon".into(), open: true },
                Sample { text: "<system>s<user>q<assistant>".into(), open: true },
                Sample::complete("<user>q<assistant>a"),
            ]
        );
        let (_d, p) = file("e.jsonl", "{\"prompt\": \" \"}\n");
        assert!(load_samples(&p, 64, &render).unwrap_err().to_string().contains("`prompt` is empty"));
    }

    #[test]
    fn errors_name_file_line_and_problem() {
        let (_d, p) = file("bad.jsonl", "{\"text\": \"ok\"}\n\n{\"question\": \"x\"}\n");
        let e = load_samples(&p, 64, &render).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:3") && e.contains("invalid JSON sample") && e.contains("question"), "{e}");
        let (_d, p) = file("b.jsonl", "{}\n");
        assert!(load_samples(&p, 64, &render).unwrap_err().to_string().contains("b.jsonl:1: expected a `text`"));
        let (_d, p) = file("c.jsonl", "{\"text\": \"a\", \"messages\": []}\n");
        assert!(load_samples(&p, 64, &render).unwrap_err().to_string().contains("more than one"));
        let fail = |_: &[Message], _: bool| -> Result<String> { Err(CalibError::Source("template exploded".into())) };
        let (_d, p) = file("d.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n");
        let e = load_samples(&p, 64, &fail).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:1") && e.contains("template exploded"), "{e}");
        let (_d, p) = file("e.txt", "\n\n");
        assert!(load_samples(&p, 64, &render).unwrap_err().to_string().contains("no samples"));
        let missing = std::path::Path::new("/nonexistent/cal.txt");
        assert!(load_samples(missing, 64, &render).unwrap_err().to_string().contains("/nonexistent/cal.txt"));
    }
}
