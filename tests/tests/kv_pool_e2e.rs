//! The real `r1-serve` binary under a KV budget far smaller than its requests' `max_tokens` would reserve: requests
//! take blocks as they grow (`--kv-block-tokens`), the pool preempts and recomputes the youngest when it is full
//! (`--kv-cache-mib`), and no request is lost, failed or changed: every concurrent greedy answer equals the answer the
//! same request gets alone. `/metrics` shows the preemptions.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::ServerProcess;
use r1_export::{export, ExportOptions};
use r1_proto::r1::v1 as pb;
use r1_proto::r1::v1::generation_client::GenerationClient;

/// `GET /metrics` over plain HTTP/1.0.
fn metrics(http_port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", http_port)).expect("connect /metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("write");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    text
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// Greedy, through the end-of-sequence token to `max_tokens` 64, so that every request grows to the same length and
/// the pool must run out (arith-r1's own answers are short enough to fit).
fn request(question: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        messages: vec![pb::ChatMessage { role: "user".into(), content: question.into(), ..Default::default() }],
        max_tokens: Some(64),
        ignore_eos: true,
        sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
        ..Default::default()
    }
}

/// The answer proper: tokens up to and including the first end-of-sequence token (after it, `ignore_eos` makes the
/// model continue where nothing it was trained on applies, and near-ties could break either way when a preempted
/// sequence's cache is recomputed in one prefill instead of token by token).
fn answer(ids: &[u32], eos: u32) -> &[u32] {
    ids.iter().position(|&t| t == eos).map_or(ids, |i| &ids[..=i])
}

/// Exports arith-r1 (fp32) into `tmp` and starts the real `r1-serve` on it with `flags`; returns the process, its
/// gRPC channel, its HTTP port, the artifact and the log path.
async fn serve(tmp: &Path, flags: &[&str]) -> (ServerProcess, tonic::transport::Channel, u16, PathBuf, PathBuf) {
    let art = tmp.join("arith-fp32");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/arith-r1");
    export(&ExportOptions::new(fixture, &art), &mut |_| {}).expect("export arith-r1");
    let served = common::serve(&art, flags, &tmp.join("serve.log")).await;
    (served.process, served.channel, served.http_port, art, served.log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tight_kv_budget_preempts_and_recomputes_without_losing_or_changing_any_request() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // 1 MiB at 1,280 bytes a position (640 of float32 latent cache, counted twice while the runtime keeps the
    // running batch's present): 819 positions, 102 blocks of 8. 24 requests of ~80 positions each need ~1,900.
    // The prefix cache is off: the questions share their chat template's opening, which would blur the count.
    let flags = ["--backend", "ort", "--kv-cache-mib", "1", "--kv-block-tokens", "8", "--max-batch-size", "24"];
    let (_server, channel, http_port, art, log) =
        serve(tmp.path(), &[&flags[..], &["--prefix-cache", "off"]].concat()).await;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let questions: Vec<String> = (0..24).map(|i| format!("What is {}+{}?", 11 + 3 * i, 47 + 5 * i)).collect();
    // Alone first: one request at a time never fills the pool.
    let mut alone = Vec::new();
    for q in &questions {
        let r = GenerationClient::new(channel.clone()).generate(request(q)).await.expect("Generate alone");
        alone.push(r.into_inner().token_ids);
    }
    assert_eq!(metric(&metrics(http_port), "r1_kv_preemptions_total"), 0.0, "one request alone fits");
    // All at once: the pool fills, the youngest are preempted and recomputed.
    let tasks: Vec<_> = questions
        .iter()
        .map(|q| {
            let mut client = GenerationClient::new(channel.clone());
            let req = request(q);
            tokio::spawn(async move { client.generate(req).await.map(|r| r.into_inner().token_ids) })
        })
        .collect();
    let eos = r1_engine::text::Tokenizer::from_dir(&art).expect("tokenizer").eos_token_ids()[0];
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.expect("join").unwrap_or_else(|e| panic!("request {i} failed: {e}; log:\n{}", log_text()));
        assert_eq!(got.len(), 64, "request {i}: every token of max_tokens");
        assert!(answer(&alone[i], eos).len() < 64, "request {i}: arith-r1 answers before its 64th token");
        assert_eq!(
            answer(&got, eos),
            answer(&alone[i], eos),
            "request {i} ({}) changed under preemption",
            questions[i]
        );
    }
    // The last response can reach the client just before the scheduler frees its sequence.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut text = metrics(http_port);
    while metric(&text, "r1_kv_pool_slots_used") > 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = metrics(http_port);
    }
    let preemptions = metric(&text, "r1_kv_preemptions_total");
    assert!(preemptions > 0.0, "the budget was meant to run out; /metrics:\n{text}");
    assert!(metric(&text, "r1_kv_recomputed_tokens_total") > 0.0);
    assert_eq!(metric(&text, "r1_kv_pool_slots_used"), 0.0, "every slot is free again");
    assert_eq!(metric(&text, "r1_kv_cache_used_tokens"), 0.0, "every block is free again");
    assert_eq!(metric(&text, "r1_kv_blocks{state=\"running\"}"), 0.0);
    assert_eq!(metric(&text, "r1_kv_blocks{state=\"free\"}"), 102.0, "1 MiB / (8 positions x 1,280 bytes)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_replayed_turn_by_turn_prefills_only_what_is_new() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A served context below the model's 256 positions: every slot holds 200, and longer requests are refused.
    let flags = ["--backend", "tract", "--prefix-cache", "on", "--max-context-tokens", "200"];
    let (_server, channel, http_port, _art, _log) = serve(tmp.path(), &flags).await;
    let mut messages: Vec<pb::ChatMessage> = Vec::new();
    let mut prefilled = Vec::new();
    let mut previous_prompt = 0;
    for (turn, q) in
        ["What is 12+30?", "What is 45+17?", "What is 73+19?", "What is 26+58?", "What is 61+24?"].iter().enumerate()
    {
        messages.push(pb::ChatMessage { role: "user".into(), content: (*q).into(), ..Default::default() });
        let req = pb::GenerateRequest {
            messages: messages.clone(),
            max_tokens: Some(64),
            sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
            ..Default::default()
        };
        let reply = GenerationClient::new(channel.clone()).generate(req).await.expect("Generate").into_inner();
        let usage = reply.usage.expect("usage");
        let (prompt, cached) = (usage.prompt_tokens as usize, usage.cached_prompt_tokens as usize);
        if turn == 0 {
            assert_eq!(cached, 0, "nothing to reuse on the first turn");
        } else {
            // The conversation so far was computed by the previous turn: at least its prompt comes from the cache
            // (the template renders earlier answers without their reasoning, so the previous *answer* may not).
            assert!(
                cached >= previous_prompt.min(prompt - 1) * 9 / 10,
                "turn {turn}: {cached} of {prompt} cached, previous prompt {previous_prompt}"
            );
        }
        eprintln!("turn {}: prompt {prompt}, cached {cached}, prefilled {}", turn + 1, prompt - cached);
        prefilled.push(prompt - cached);
        previous_prompt = prompt;
        messages.push(pb::ChatMessage { role: "assistant".into(), content: reply.text, ..Default::default() });
    }
    // Each later turn prefills about as much as the first (its new question and the previous answer), not the
    // whole conversation.
    let first = prefilled[0];
    assert!(prefilled[1..].iter().all(|&p| p <= 2 * first + 40), "prefilled per turn: {prefilled:?}");
    let too_long =
        pb::GenerateRequest { prompt: Some("What is 1+1?".into()), max_tokens: Some(195), ..Default::default() };
    let err = GenerationClient::new(channel.clone()).generate(too_long).await.expect_err("beyond the served context");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("context of 200 tokens"), "{}", err.message());
    let text = metrics(http_port);
    assert!(metric(&text, "r1_prefix_cache_hit_tokens_total") > 0.0);
    assert!(metric(&text, "r1_prefix_cache_miss_tokens_total") >= first as f64);
}

/// `--prefix-cache exact` from the real binary: a repeated conversation reuses whole `--prefill-chunk` chunks only,
/// and its tokens equal those of the server with the cache off, on both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_prefix_hits_are_whole_prefill_chunks_and_change_no_token() {
    let conversation = |turns: usize| pb::GenerateRequest {
        messages: ["What is 12+30?", "What is 45+17?", "What is 73+19?"][..turns]
            .iter()
            .map(|q| pb::ChatMessage { role: "user".into(), content: (*q).into(), ..Default::default() })
            .collect(),
        max_tokens: Some(48),
        sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
        ..Default::default()
    };
    for backend in ["ort", "tract"] {
        let mut outputs = Vec::new();
        for mode in ["exact", "off"] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let flags =
                ["--backend", backend, "--prefix-cache", mode, "--prefill-chunk", "8", "--max-batch-tokens", "64"];
            let (_server, channel, _http, _art, _log) = serve(tmp.path(), &flags).await;
            let mut tokens = Vec::new();
            for turns in [1, 2, 3, 3] {
                let reply =
                    GenerationClient::new(channel.clone()).generate(conversation(turns)).await.expect("Generate");
                let reply = reply.into_inner();
                let cached = reply.usage.expect("usage").cached_prompt_tokens as usize;
                assert_eq!(cached % 8, 0, "{backend} {mode}: {cached} cached positions, not whole chunks of 8");
                if mode == "exact" && turns > 1 {
                    assert!(cached > 0, "{backend}: turn {turns} reuses the earlier turns");
                }
                tokens.push(reply.token_ids);
            }
            outputs.push(tokens);
        }
        assert_eq!(outputs[0], outputs[1], "{backend}: tokens with --prefix-cache exact equal those with it off");
    }
}
