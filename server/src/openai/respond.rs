//! The OpenAI response objects: the whole response of a non-streaming request and the server-sent events of a
//! streaming one, for every choice (`n`), with `logprobs` in the chat or the legacy completions layout and the
//! usage-only last chunk of `stream_options.include_usage`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::error_response;
use crate::api::{collect_all, merged, record_finish};
use crate::model::{Frontend, TokenLogprobs};
use crate::scheduler::{Event, FinishReason};
use r1_engine::text::tools::{split_tool_calls, CALLS_BEGIN};

/// What every response object of one request repeats, and what it asked for.
pub(super) struct Head {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub chat: bool,
    /// `logprobs` was asked for.
    pub logprobs: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Read calls in the answer (R1's format) into `tool_calls` (`tools` given, `tool_choice` auto).
    pub tool_calls: bool,
    pub frontend: Arc<dyn Frontend>,
}

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop | FinishReason::StopSequence => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

/// A log-probability as JSON can hold it: `-inf` (a token the model rules out) becomes -9999, as OpenAI reports.
fn finite(l: f32) -> f64 {
    if l.is_finite() {
        f64::from(l)
    } else {
        -9999.0
    }
}

/// `logprobs` of a choice (or of a chunk's tokens): the chat layout (`{"content": [{token, logprob, bytes,
/// top_logprobs}]}`) or the completions one (`tokens`, `token_logprobs`, `top_logprobs` maps, `text_offset`, which
/// counts from `offset` characters of generated text). Reasoning tokens are included, in order.
fn logprobs_json(head: &Head, ids: &[u32], lps: &[TokenLogprobs], offset: &mut usize) -> Value {
    if !head.logprobs {
        return Value::Null;
    }
    let f = head.frontend.as_ref();
    if head.chat {
        let content: Vec<Value> = ids
            .iter()
            .zip(lps)
            .map(|(&id, lp)| {
                let t = f.token_text(id);
                let top: Vec<Value> = lp
                    .top
                    .iter()
                    .map(|&(alt, l)| {
                        let a = f.token_text(alt);
                        json!({"token": a.text, "logprob": finite(l), "bytes": a.bytes})
                    })
                    .collect();
                json!({"token": t.text, "logprob": finite(lp.logprob), "bytes": t.bytes, "top_logprobs": top})
            })
            .collect();
        return json!({"content": content, "refusal": null});
    }
    let (mut tokens, mut token_logprobs, mut top, mut text_offset) = (vec![], vec![], vec![], vec![]);
    for (&id, lp) in ids.iter().zip(lps) {
        let t = f.token_text(id);
        text_offset.push(*offset);
        *offset += t.text.chars().count();
        tokens.push(t.text);
        token_logprobs.push(finite(lp.logprob));
        let alts: serde_json::Map<String, Value> =
            lp.top.iter().map(|&(alt, l)| (f.token_text(alt).text, json!(finite(l)))).collect();
        top.push(Value::Object(alts));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": text_offset})
}

/// The answer's calls in OpenAI's shape (`[{id, type, function: {name, arguments}}]`, `index` added when streaming),
/// and the text before them; None when the answer holds no finished call.
fn tool_calls_json(head: &Head, choice: usize, answer: &str, streaming: bool) -> Option<(String, Value)> {
    let (text, calls) = split_tool_calls(answer)?;
    let calls: Vec<Value> = calls
        .into_iter()
        .enumerate()
        .map(|(k, c)| {
            let mut v = json!({"id": format!("call_{}_{choice}_{k}", head.id), "type": "function",
                               "function": {"name": c.name, "arguments": c.arguments}});
            if streaming {
                v["index"] = json!(k);
            }
            v
        })
        .collect();
    Some((text, Value::Array(calls)))
}

fn usage_json(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

/// The non-streaming response: one JSON object with every choice and the usage (the prompt counted once).
pub(super) async fn whole(rxs: Vec<UnboundedReceiver<Event>>, span: &tracing::Span, head: Head) -> Response {
    let all = match collect_all(rxs, span).await {
        Err(e) => return error_response(&e),
        Ok(c) => c,
    };
    let choices: Vec<Value> = all
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let logprobs = logprobs_json(&head, &c.token_ids, &c.logprobs, &mut 0);
            let mut finish = finish_str(c.finish_reason);
            let calls = if head.tool_calls { tool_calls_json(&head, i, &c.text, false) } else { None };
            if let Some((text, calls)) = calls {
                finish = "tool_calls";
                let content = if text.is_empty() { Value::Null } else { Value::String(text) };
                json!({"index": i, "message": {"role": "assistant", "content": content, "reasoning_content": c.reasoning,
                       "tool_calls": calls}, "logprobs": logprobs, "finish_reason": finish})
            } else if head.chat {
                json!({"index": i, "message": {"role": "assistant", "content": c.text, "reasoning_content": c.reasoning},
                       "logprobs": logprobs, "finish_reason": finish})
            } else {
                json!({"index": i, "text": c.text, "reasoning_content": c.reasoning, "logprobs": logprobs,
                       "finish_reason": finish})
            }
        })
        .collect();
    let (prompt, cached) = all.first().map_or((0, 0), |c| (c.prompt_tokens, c.cached_prompt_tokens));
    let usage = usage_json(prompt, all.iter().map(|c| c.completion_tokens).sum(), cached);
    let object = if head.chat { "chat.completion" } else { "text_completion" };
    Json(json!({"id": head.id, "object": object, "created": head.created, "model": head.model, "choices": choices,
                "usage": usage}))
    .into_response()
}

/// Streaming with tools: adds `text` to what `held` waits with and returns what can be sent as text now. Once the
/// calls' opening has come (`opened`), everything is held; before, only a tail that could still become the opening.
fn hold_back(held: &mut String, opened: &mut bool, text: &str) -> String {
    held.push_str(text);
    if *opened {
        return String::new();
    }
    if let Some(at) = held.find(CALLS_BEGIN) {
        *opened = true;
        let rest = held.split_off(at);
        return std::mem::replace(held, rest);
    }
    // The longest tail of `held` that starts the opening stays; the rest goes out.
    let keep = (1..=held.len().min(CALLS_BEGIN.len() - 1))
        .rev()
        .find(|&k| held.is_char_boundary(held.len() - k) && CALLS_BEGIN.starts_with(&held[held.len() - k..]))
        .unwrap_or(0);
    let rest = held.split_off(held.len() - keep);
    std::mem::replace(held, rest)
}

/// Where the stream of one request stands.
struct StreamState {
    head: Head,
    /// Choices not finished yet.
    open: usize,
    /// Per choice: generated characters so far (completions' `text_offset`).
    offsets: Vec<usize>,
    /// Per choice, with `tool_calls`: the answer from the calls' opening on, held back until the end (a call is sent
    /// whole, as `tool_calls`, never as text). The opening may come in pieces (one added token, or several when a
    /// grammar forces it), so text that could be its start waits too ([`hold_back`]).
    held: Vec<String>,
    /// Per choice: whether `held` holds the opening (else it holds text that may become it).
    opened: Vec<bool>,
    prompt: usize,
    completion: usize,
    cached: usize,
}

impl StreamState {
    fn chunk(&self, choices: Vec<Value>, usage: Option<Value>) -> String {
        let h = &self.head;
        let object = if h.chat { "chat.completion.chunk" } else { "text_completion" };
        let mut v = json!({"id": h.id, "object": object, "created": h.created, "model": h.model, "choices": choices});
        if h.include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        v.to_string()
    }

    /// The `data:` payloads an event of choice `index` turns into.
    fn on_event(&mut self, index: usize, ev: Event, span: &tracing::Span) -> Vec<String> {
        match ev {
            Event::Admitted { .. } => vec![],
            Event::Delta(mut d) => {
                let mut offset = self.offsets[index];
                let logprobs = logprobs_json(&self.head, &d.token_ids, &d.logprobs, &mut offset);
                self.offsets[index] = offset;
                if self.head.tool_calls {
                    d.text = hold_back(&mut self.held[index], &mut self.opened[index], &d.text);
                }
                let choice = if self.head.chat {
                    json!({"index": index, "delta": {"role": "assistant", "content": d.text,
                           "reasoning_content": d.reasoning}, "logprobs": logprobs, "finish_reason": null})
                } else {
                    json!({"index": index, "text": d.text, "reasoning_content": d.reasoning, "logprobs": logprobs,
                           "finish_reason": null})
                };
                vec![self.chunk(vec![choice], None)]
            }
            Event::Finished(f) => {
                record_finish(span, f.reason, f.completion_tokens);
                let mut out = vec![];
                let mut finish = finish_str(f.reason);
                let held = std::mem::take(&mut self.held[index]);
                if !held.is_empty() {
                    // The calls, whole; or, when the held text holds no finished call, the text itself.
                    let delta = match tool_calls_json(&self.head, index, &held, true) {
                        Some((_, calls)) => {
                            finish = "tool_calls";
                            json!({"tool_calls": calls})
                        }
                        None => json!({"content": held}),
                    };
                    let choice = json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": null});
                    out.push(self.chunk(vec![choice], None));
                }
                let choice = if self.head.chat {
                    json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish})
                } else {
                    json!({"index": index, "text": "", "logprobs": null, "finish_reason": finish_str(f.reason)})
                };
                if index == 0 {
                    (self.prompt, self.cached) = (f.prompt_tokens, f.cached_prompt_tokens);
                }
                self.completion += f.completion_tokens;
                self.open -= 1;
                out.push(self.chunk(vec![choice], None));
                if self.open == 0 {
                    if self.head.include_usage {
                        out.push(self.chunk(vec![], Some(usage_json(self.prompt, self.completion, self.cached))));
                    }
                    out.push("[DONE]".to_string());
                }
                out
            }
            Event::Failed(e) => {
                self.open = 0;
                let v = json!({"error": {"message": e.to_string(), "code": e.kind()}});
                vec![v.to_string(), "[DONE]".to_string()]
            }
        }
    }
}

/// The streaming response: server-sent events, one chunk per token and choice, each choice's finish reason, then
/// (with `stream_options.include_usage`) a chunk with no choices and the usage, then `[DONE]`. Without
/// `include_usage` no chunk carries `usage`. A failed choice ends the stream with an error event (the other
/// choices are cancelled when the stream is dropped).
pub(super) fn stream(rxs: Vec<UnboundedReceiver<Event>>, span: tracing::Span, head: Head) -> Response {
    let n = rxs.len();
    let state = StreamState {
        head,
        open: n,
        offsets: vec![0; n],
        held: vec![String::new(); n],
        opened: vec![false; n],
        prompt: 0,
        completion: 0,
        cached: 0,
    };
    let events = merged(rxs)
        .scan((state, span), |(state, span), (index, ev)| {
            // After a failure nothing more is sent (the stream ends; the other choices are cancelled).
            let out = (state.open > 0).then(|| state.on_event(index, ev, span));
            futures::future::ready(out)
        })
        .flat_map(|v| futures::stream::iter(v.into_iter().map(|d| Ok::<_, Infallible>(SseEvent::default().data(d)))));
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeFrontend;
    use crate::scheduler::{Delta, Finished};
    use r1_engine::text::tools::{CALL_BEGIN, CALL_END, SEP};

    fn head(tool_calls: bool) -> Head {
        Head {
            id: "chatcmpl-t".into(),
            created: 0,
            model: "m".into(),
            chat: true,
            logprobs: false,
            include_usage: false,
            tool_calls,
            frontend: Arc::new(FakeFrontend),
        }
    }

    fn delta(text: &str) -> Event {
        Event::Delta(Delta { text: text.into(), ..Default::default() })
    }

    fn done() -> Event {
        Event::Finished(Finished {
            reason: FinishReason::Stop,
            prompt_tokens: 3,
            completion_tokens: 4,
            cached_prompt_tokens: 0,
        })
    }

    /// Runs events through a stream's state; returns the `data:` payloads of each event.
    fn payloads(tools: bool, events: Vec<Event>) -> Vec<Vec<String>> {
        let mut st = StreamState {
            head: head(tools),
            open: 1,
            offsets: vec![0],
            held: vec![String::new()],
            opened: vec![false],
            prompt: 0,
            completion: 0,
            cached: 0,
        };
        events.into_iter().map(|ev| st.on_event(0, ev, &tracing::Span::none())).collect()
    }

    fn choice(payload: &str) -> Value {
        serde_json::from_str::<Value>(payload).unwrap()["choices"][0].clone()
    }

    #[test]
    fn a_call_in_the_answer_is_held_back_and_sent_as_tool_calls() {
        let call = format!("{CALLS_BEGIN}{CALL_BEGIN}function{SEP}add\n```json\n{{\"a\": 1}}\n```{CALL_END}");
        let (text, calls) = tool_calls_json(&head(true), 0, &format!("Sure.{call}"), false).unwrap();
        assert_eq!(text, "Sure.");
        assert_eq!(calls[0]["function"]["name"], "add");
        assert_eq!(calls[0]["function"]["arguments"], "{\"a\": 1}");
        assert_eq!(calls[0]["id"], "call_chatcmpl-t_0_0");
        assert!(tool_calls_json(&head(true), 0, &call, true).unwrap().1[0]["index"] == 0, "streamed calls carry index");
        // Streaming: text before the call goes out; from the opening token on it is held, then sent as the calls.
        // The opening may come in pieces (here split inside a character's bytes' neighbourhood: at "<｜tool").
        let cut = "<｜tool".len();
        let got = payloads(true, vec![delta("Sure.<"), delta(&call[1..cut]), delta(&call[cut..]), done()]);
        assert_eq!(choice(&got[0][0])["delta"]["content"], "Sure.", "a tail that may start the opening waits");
        assert_eq!(choice(&got[1][0])["delta"]["content"], "", "the call's opening is held back");
        assert_eq!(choice(&got[2][0])["delta"]["content"], "");
        let end = &got[3];
        assert_eq!(end.len(), 3, "the calls, the finish, [DONE]: {end:?}");
        assert_eq!(choice(&end[0])["delta"]["tool_calls"][0]["function"]["name"], "add");
        assert_eq!(choice(&end[1])["finish_reason"], "tool_calls");
        assert_eq!(end[2], "[DONE]");
        // Text that only looked like the opening goes out when it stops looking so.
        let got = payloads(true, vec![delta("a <"), delta("b"), done()]);
        assert_eq!(choice(&got[0][0])["delta"]["content"], "a ");
        assert_eq!(choice(&got[1][0])["delta"]["content"], "<b");
        // Without tools the text is text.
        let got = payloads(false, vec![delta(&call), done()]);
        assert_eq!(choice(&got[0][0])["delta"]["content"], call.as_str());
        assert_eq!(choice(&got[1][0])["finish_reason"], "stop");
    }
}
