//! DeepSeek-R1's tool-call format, read back out of a generated answer. R1 writes its calls after any text as
//!
//! ```text
//! <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
//! ```json
//! ARGUMENTS
//! ```<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>
//! ```
//!
//! (the tokens are added tokens that are not `special`, so the detokenized text keeps them). [`split_tool_calls`]
//! returns the text before the calls and each call's name and arguments (a JSON text, returned as written, as
//! OpenAI returns `arguments`).

/// Opens the calls.
pub const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
/// Closes the calls.
pub const CALLS_END: &str = "<｜tool▁calls▁end｜>";
/// Opens one call.
pub const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
/// Closes one call.
pub const CALL_END: &str = "<｜tool▁call▁end｜>";
/// Separates a call's type from its name.
pub const SEP: &str = "<｜tool▁sep｜>";

/// One call the model made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToolCall {
    /// The function's name.
    pub name: String,
    /// Its arguments, a JSON text as the model wrote it.
    pub arguments: String,
}

/// The answer's text before its tool calls, and the calls; `None` when the answer holds no call (or only an
/// unfinished one: a call is read only when its closing token came, so text cut by `max_tokens` stays text).
pub fn split_tool_calls(answer: &str) -> Option<(String, Vec<ParsedToolCall>)> {
    let start = answer.find(CALLS_BEGIN)?;
    let mut calls = Vec::new();
    let mut rest = &answer[start + CALLS_BEGIN.len()..];
    while let Some(b) = rest.find(CALL_BEGIN) {
        let after = &rest[b + CALL_BEGIN.len()..];
        let Some(e) = after.find(CALL_END) else { break };
        let call = &after[..e];
        let body = call.split_once(SEP).map_or(call, |(_, body)| body);
        let (name, args) = body.split_once('\n').unwrap_or((body, ""));
        let args = args.trim();
        let args = args.strip_prefix("```json").or_else(|| args.strip_prefix("```")).unwrap_or(args);
        let args = args.strip_suffix("```").unwrap_or(args).trim();
        calls.push(ParsedToolCall { name: name.trim().to_string(), arguments: args.to_string() });
        rest = &after[e + CALL_END.len()..];
    }
    if calls.is_empty() {
        return None;
    }
    Some((answer[..start].to_string(), calls))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &str) -> String {
        format!("{CALL_BEGIN}function{SEP}{name}\n```json\n{args}\n```{CALL_END}")
    }

    #[test]
    fn calls_after_text_are_read_in_order() {
        let answer = format!(
            "Let me check.{CALLS_BEGIN}{}\n{}{CALLS_END}",
            call("get_weather", r#"{"city": "Paris"}"#),
            call("add", r#"{"a": 1, "b": 2}"#)
        );
        let (text, calls) = split_tool_calls(&answer).unwrap();
        assert_eq!(text, "Let me check.");
        assert_eq!(
            calls,
            vec![
                ParsedToolCall { name: "get_weather".into(), arguments: r#"{"city": "Paris"}"#.into() },
                ParsedToolCall { name: "add".into(), arguments: r#"{"a": 1, "b": 2}"#.into() },
            ]
        );
    }

    #[test]
    fn text_without_a_finished_call_stays_text() {
        assert_eq!(split_tool_calls("432"), None);
        let cut = format!("{CALLS_BEGIN}{CALL_BEGIN}function{SEP}add\n```json\n{{\"a\":");
        assert_eq!(split_tool_calls(&cut), None, "cut by max_tokens");
        // A call without the closing `calls` token (the model stopped right after the call) is still read.
        let open = format!("{CALLS_BEGIN}{}", call("f", "{}"));
        assert_eq!(split_tool_calls(&open).unwrap().1[0].name, "f");
    }
}
