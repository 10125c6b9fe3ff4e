//! HTTP port: /metrics parses as Prometheus text; OpenAI-compatible endpoints, unary and SSE.

mod common;

use common::*;
use serde_json::Value;

/// Checks the Prometheus/OpenMetrics text format line by line; returns the sample names.
fn parse_exposition(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF");
    for line in text.lines() {
        if line.starts_with('#') {
            let mut parts = line.splitn(4, ' ');
            assert_eq!(parts.next(), Some("#"));
            let kind = parts.next().expect("comment kind");
            assert!(matches!(kind, "HELP" | "TYPE" | "UNIT" | "EOF"), "bad comment {line:?}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        value.parse::<f64>().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().expect("name");
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad name {name:?}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "bad labels in {line:?}");
            }
        }
        assert!(name.starts_with("r1_"), "prefix r1_: {name}");
        names.push(name.to_string());
    }
    names
}

#[tokio::test]
async fn metrics_parse_and_cover_the_required_series() {
    let mut srv = start_ready(Setup::default()).await;
    let mut c = srv.client().await;
    c.generate(prompt_req("abc", 5)).await.expect("generate");
    let (status, ctype, body) = http(srv.http_addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let names = parse_exposition(&body);
    for want in [
        "r1_requests_total",
        "r1_queue_depth",
        "r1_running_sequences",
        "r1_batch_size_bucket",
        "r1_time_to_first_token_seconds_bucket",
        "r1_inter_token_latency_seconds_bucket",
        "r1_generated_tokens_total",
        "r1_kv_cache_usage_ratio",
    ] {
        assert!(names.iter().any(|n| n == want), "missing {want}");
    }
    // Warm-up (2 tokens) plus this request (5 tokens).
    assert_eq!(metric(&body, "r1_generated_tokens_total"), Some(7.0));
    assert_eq!(metric(&body, "r1_requests_total{api=\"grpc\",outcome=\"ok\"}"), Some(1.0));
    let (status, _, body) = http(srv.http_addr, "GET", "/health", None).await;
    assert_eq!((status, body.trim()), (200, "SERVING"));
    srv.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn openai_chat_completions_unary_and_streaming() {
    let mut srv = start_ready(Setup::default()).await;
    let (status, _, body) = http(srv.http_addr, "GET", "/v1/models", None).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["data"][0]["id"], "fake-r1");

    let req = r#"{"model":"fake-r1","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"temperature":0}"#;
    let (status, _, body) = http(srv.http_addr, "POST", "/v1/chat/completions", Some(req)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    let (want_r, want_t, _) = reference("<user>hi<assistant>", 8);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], want_t.as_str());
    assert_eq!(v["choices"][0]["message"]["reasoning_content"], want_r.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 8);

    let req = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":8,"temperature":0,"stream":true}"#;
    let (status, ctype, body) = http(srv.http_addr, "POST", "/v1/chat/completions", Some(req)).await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let (mut content, mut reasoning, mut finish) = (String::new(), String::new(), String::new());
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).expect("chunk json");
        assert_eq!(v["object"], "chat.completion.chunk");
        let c = &v["choices"][0];
        content.push_str(c["delta"]["content"].as_str().unwrap_or(""));
        reasoning.push_str(c["delta"]["reasoning_content"].as_str().unwrap_or(""));
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    assert_eq!((content, reasoning, finish.as_str()), (want_t, want_r, "length"));
    srv.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn openai_completions_and_errors() {
    let mut srv = start_ready(Setup::default()).await;
    let (status, _, body) =
        http(srv.http_addr, "POST", "/v1/completions", Some(r#"{"prompt":"abc","max_tokens":6,"temperature":0}"#))
            .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    let (r, t, _) = reference("abc", 6);
    assert_eq!(
        (v["choices"][0]["text"].as_str(), v["choices"][0]["reasoning_content"].as_str()),
        (Some(t.as_str()), Some(r.as_str()))
    );

    let (status, _, body) =
        http(srv.http_addr, "POST", "/v1/completions", Some(r#"{"prompt":"abc","temperature":9}"#)).await;
    assert_eq!(status, 400);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["error"]["param"], "temperature");
    assert_eq!(v["error"]["message"], "`temperature` must be in [0, 2], got 9");

    let (status, _, _) = http(
        srv.http_addr,
        "POST",
        "/v1/chat/completions",
        Some(r#"{"model":"gpt-4","messages":[{"role":"user","content":"x"}]}"#),
    )
    .await;
    assert_eq!(status, 404);
    srv.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn http_requests_get_the_deadline_their_timeout_header_gives() {
    let fake = r1_serve::fake::FakeConfig { step_delay: std::time::Duration::from_millis(20), ..Default::default() };
    let mut srv = start_ready(Setup { fake, ..Default::default() }).await;
    let body = r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":200,"ignore_eos":true}"#;
    // 200 tokens at 20 ms a step need ~4 s; a 0.3 s budget ends in a 504 naming the deadline.
    for header in ["x-request-timeout", "x-stainless-read-timeout"] {
        let t0 = std::time::Instant::now();
        let (status, _, resp) =
            http_with(srv.http_addr, "POST", "/v1/chat/completions", Some(body), &[(header, "0.3")]).await;
        assert_eq!(status, 504, "{header}: {resp}");
        assert!(resp.contains("deadline"), "{resp}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(2), "{header}: took {:?}", t0.elapsed());
    }
    // The SDK's read timeout does not bound a stream (it bounds the gap between chunks): a streamed request with a
    // 0.3 s read timeout runs to its end.
    let stream = r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":30,"ignore_eos":true,"stream":true}"#;
    let (status, _, resp) =
        http_with(srv.http_addr, "POST", "/v1/chat/completions", Some(stream), &[("x-stainless-read-timeout", "0.3")])
            .await;
    assert_eq!(status, 200);
    assert!(resp.contains("\"finish_reason\":\"length\"") && !resp.contains("deadline"), "{resp}");
    // Without a header, or with a budget that is long enough, it completes.
    let short = r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":3}"#;
    let (status, _, _) = http(srv.http_addr, "POST", "/v1/chat/completions", Some(short)).await;
    assert_eq!(status, 200);
    let (status, _, _) =
        http_with(srv.http_addr, "POST", "/v1/chat/completions", Some(short), &[("x-request-timeout", "30")]).await;
    assert_eq!(status, 200);
    srv.shutdown().await.expect("clean shutdown");
}

/// The `data:` payloads of an SSE body, `[DONE]` excluded.
fn sse_chunks(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("json chunk"))
        .collect()
}

#[tokio::test]
async fn openai_logprobs_choices_penalties_and_include_usage_are_honoured() {
    let mut srv = start_ready(Setup::default()).await;
    let post = |path: &'static str, body: String| {
        let addr = srv.http_addr;
        async move { http(addr, "POST", path, Some(&body)).await }
    };
    // Chat logprobs: one entry per generated token, `top_logprobs` alternatives each, with text and bytes.
    let body = r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":4,"ignore_eos":true,"logprobs":true,"top_logprobs":3,"n":3,"seed":7,"presence_penalty":0.5,"frequency_penalty":0.5}"#;
    let (status, _, resp) = post("/v1/chat/completions", body.into()).await;
    assert_eq!(status, 200, "{resp}");
    let v: Value = serde_json::from_str(&resp).unwrap();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "n = 3 choices");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        let content = c["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len(), 4, "one entry per token: {c}");
        for t in content {
            assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 3, "{t}");
            assert_eq!(t["bytes"].as_array().unwrap().len(), 1, "the fake's tokens are one byte: {t}");
            assert!(t["token"].is_string() && t["logprob"].is_number(), "{t}");
        }
    }
    assert_eq!(v["usage"]["completion_tokens"], 12, "summed over the choices");
    assert_eq!(v["usage"]["prompt_tokens"], 18, "the prompt counted once");
    // Legacy completions: integer logprobs, the four parallel lists, text offsets counting generated characters.
    let body = r#"{"prompt":"abc","max_tokens":3,"ignore_eos":true,"logprobs":2,"temperature":0}"#;
    let (status, _, resp) = post("/v1/completions", body.into()).await;
    assert_eq!(status, 200, "{resp}");
    let lp = serde_json::from_str::<Value>(&resp).unwrap()["choices"][0]["logprobs"].clone();
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3, "{lp}");
    assert_eq!(lp["text_offset"], serde_json::json!([0, 1, 2]), "{lp}");
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2, "{lp}");
    // Streaming without include_usage: no chunk carries `usage`; with it, a last chunk without choices does.
    let stream = |extra: &str| {
        format!(
            r#"{{"messages":[{{"role":"user","content":"x"}}],"max_tokens":3,"ignore_eos":true,"stream":true,"n":2{extra}}}"#
        )
    };
    let (_, _, plain) = post("/v1/chat/completions", stream("")).await;
    let chunks = sse_chunks(&plain);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()), "{plain}");
    let finishes = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).count();
    assert_eq!(finishes, 2, "each choice finishes: {plain}");
    let (_, _, with) = post("/v1/chat/completions", stream(r#","stream_options":{"include_usage":true}"#)).await;
    let chunks = sse_chunks(&with);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], serde_json::json!([]), "{with}");
    assert_eq!(last["usage"]["completion_tokens"], 6, "{with}");
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()), "{with}");
    let indexes: std::collections::BTreeSet<u64> =
        chunks.iter().filter_map(|c| c["choices"][0]["index"].as_u64()).collect();
    assert_eq!(indexes.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    srv.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn openai_fields_the_server_would_ignore_are_refused_by_name() {
    let mut srv = start_ready(Setup::default()).await;
    let chat = |extra: &str| format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"max_tokens":2{extra}}}"#);
    // Asking for something not implemented, or out of range: 400 naming the field, never a silent no-op.
    for (extra, field) in [
        (r#","response_format":{"type":"json_object"}"#, "response_format"),
        (r#","tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"required""#, "tool_choice"),
        (r#","tools":[{"type":"function"}]"#, "tools[0]"),
        (r#","tool_choice":"required""#, "tool_choice"),
        (r#","functions":[{"name":"f"}]"#, "functions"),
        (r#","logit_bias":{"5":10}"#, "logit_bias"),
        (r#","best_of":3"#, "best_of"),
        (r#","presence_penalty":2.5"#, "presence_penalty"),
        (r#","frequency_penalty":-3"#, "frequency_penalty"),
        (r#","logprobs":"yes""#, "logprobs"),
        (r#","logprobs":true,"top_logprobs":21"#, "top_logprobs"),
        (r#","top_logprobs":3"#, "top_logprobs"),
        (r#","n":17"#, "n"),
        (r#","n":0"#, "n"),
        (r#","stream_options":{"include_usage":true}"#, "stream_options"),
    ] {
        let (status, _, body) = http(srv.http_addr, "POST", "/v1/chat/completions", Some(&chat(extra))).await;
        assert_eq!(status, 400, "{extra}: {body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["error"]["param"], field, "{body}");
    }
    // A number outside its type (serde's message names the field) and a body that is not JSON: 400 in OpenAI's shape.
    for (body, needle) in [(chat(r#","max_tokens":-1"#), "max_tokens"), ("{not json".to_string(), "JSON")] {
        let (status, _, resp) = http(srv.http_addr, "POST", "/v1/chat/completions", Some(&body)).await;
        assert_eq!(status, 400, "{body}: {resp}");
        let v: Value = serde_json::from_str(&resp).expect("an OpenAI error body");
        assert!(v["error"]["message"].as_str().unwrap().contains(needle), "{resp}");
    }
    // Content given as a list of text parts is read; a non-text part is refused by position.
    let parts = r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"bc"}]}],"max_tokens":3,"temperature":0}"#;
    let (status, _, body) = http(srv.http_addr, "POST", "/v1/chat/completions", Some(parts)).await;
    assert_eq!(status, 200, "{body}");
    let plain = r#"{"messages":[{"role":"user","content":"abc"}],"max_tokens":3,"temperature":0}"#;
    let (_, _, plain_body) = http(srv.http_addr, "POST", "/v1/chat/completions", Some(plain)).await;
    let text = |b: &str| serde_json::from_str::<Value>(b).expect("json")["choices"][0]["message"].clone();
    assert_eq!(text(&body), text(&plain_body), "parts joined equal the plain string");
    let image = r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#;
    let (status, _, body) = http(srv.http_addr, "POST", "/v1/chat/completions", Some(image)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("messages[0].content[0]") && body.contains("image_url"), "{body}");
    // Tools are shown to the model (the fake renders them into its prompt: more prompt tokens), and a conversation
    // with an assistant's tool call and the tool's answer is accepted.
    let tools = r#","tools":[{"type":"function","function":{"name":"add","parameters":{"type":"object"}}}]"#;
    let (status, _, with) = http(srv.http_addr, "POST", "/v1/chat/completions", Some(&chat(tools))).await;
    assert_eq!(status, 200, "{with}");
    let (_, _, without) = http(srv.http_addr, "POST", "/v1/chat/completions", Some(&chat(""))).await;
    let prompt = |b: &str| serde_json::from_str::<Value>(b).unwrap()["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt(&with) > prompt(&without), "the tools are in the prompt");
    let turns = r#"{"messages":[{"role":"user","content":"1+2?"},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"add","arguments":"{\"a\":1,\"b\":2}"}}]},{"role":"tool","tool_call_id":"c1","content":"3"}],"max_tokens":2}"#;
    let (status, _, body) = http(srv.http_addr, "POST", "/v1/chat/completions", Some(turns)).await;
    assert_eq!(status, 200, "{body}");
    // The same fields at the value that asks for nothing, and bookkeeping fields, are accepted.
    let neutral = r#","logprobs":false,"presence_penalty":0,"frequency_penalty":0.0,"tools":[],"tool_choice":"none","response_format":{"type":"text"},"user":"u-1","logit_bias":{}"#;
    let (status, _, body) = http(srv.http_addr, "POST", "/v1/chat/completions", Some(&chat(neutral))).await;
    assert_eq!(status, 200, "{body}");
    srv.shutdown().await.expect("clean shutdown");
}
