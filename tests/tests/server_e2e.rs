//! `r1-serve` end to end on the real engine: export the trained arith-r1 fixture at fp32, start the server in-process
//! on 127.0.0.1:0 with the engine model on ONNX Runtime, and call gRPC `Generate` / `GenerateStream` with the chat
//! `messages` of the 5 problems in `tests/fixtures/arith-r1/expected.jsonl`. Greedy output must equal what
//! transformers fp32 produced, token for token, with the `<think>` part in `reasoning` and the answer in `text`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use r1_export::{export, ExportOptions};
use r1_proto::r1::v1 as pb;
use r1_proto::r1::v1::generation_client::GenerationClient;
use r1_serve::engine_model::EngineModel;
use r1_serve::metrics::Metrics;
use r1_serve::model::Model;
use r1_serve::scheduler::SchedulerConfig;
use r1_serve::server::{run, Listeners, Loader, ServeOptions};
use r1_serve::validate::Limits;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/arith-r1")
}

/// One line of `expected.jsonl` (the fields this test checks).
#[derive(serde::Deserialize)]
struct Expected {
    messages: Vec<Message>,
    prompt_token_ids: Vec<u32>,
    completion: String,
    completion_token_ids: Vec<u32>,
    finished_by_eos: bool,
    answer: String,
}

#[derive(serde::Deserialize)]
struct Message {
    role: String,
    content: String,
}

fn load_expected() -> Vec<Expected> {
    let path = fixture().join("expected.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("expected.jsonl line"))
        .collect()
}

/// DeepSeek's split of `<think>\n{reasoning}\n</think>\n\n{answer}` into (reasoning, answer), written independently of
/// the engine's streaming splitter so that this test checks it.
fn split_reference(completion: &str) -> (String, String) {
    let body = completion.strip_prefix("<think>").expect("completion opens with <think>");
    let body = body.strip_prefix('\n').unwrap_or(body);
    let (reasoning, answer) = body.split_once("</think>").expect("completion closes </think>");
    let reasoning = reasoning.strip_suffix('\n').unwrap_or(reasoning);
    let answer = answer.strip_prefix("\n\n").or_else(|| answer.strip_prefix('\n')).unwrap_or(answer);
    (reasoning.to_string(), answer.to_string())
}

fn request(e: &Expected) -> pb::GenerateRequest {
    pb::GenerateRequest {
        messages: e
            .messages
            .iter()
            .map(|m| pb::ChatMessage { role: m.role.clone(), content: m.content.clone(), ..Default::default() })
            .collect(),
        max_tokens: Some(64),
        sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
        ..Default::default()
    }
}

struct Server {
    grpc_url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), r1_serve::ServeError>>,
}

/// Starts `run` with the engine model over `artifact` on ONNX Runtime and waits for SERVING.
async fn start(artifact: PathBuf) -> Server {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let grpc_url = format!("http://{}", grpc.local_addr().expect("grpc addr"));
    let load: Loader = Box::new(move || {
        EngineModel::load(&artifact, "ort", Default::default(), None, Default::default())
            .map(|m| Box::new(m) as Box<dyn Model>)
    });
    let opts = ServeOptions {
        model_id: "arith-r1".into(),
        limits: Limits {
            max_new_tokens: 256,
            default_max_tokens: 64,
            max_context_tokens: u32::MAX,
            sampling_defaults: Default::default(),
            request_timeout: None,
        },
        scheduler: SchedulerConfig::default(),
        step_budget: Default::default(),
        drain_timeout: Duration::from_secs(10),
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(Listeners { grpc, http }, opts, Arc::new(Metrics::new()), load, async {
        let _ = rx.await;
    }));
    let channel = connect(&grpc_url).await;
    let mut health = HealthClient::new(channel);
    for _ in 0..600 {
        if task.is_finished() {
            let r = task.await.expect("run did not panic");
            panic!("server stopped before serving: {r:?}");
        }
        let status = health
            .check(HealthCheckRequest { service: String::new() })
            .await
            .expect("health check")
            .into_inner()
            .status;
        if status == ServingStatus::Serving as i32 {
            return Server { grpc_url, shutdown: Some(tx), task };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server did not report SERVING within 30 s");
}

async fn connect(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_string()).expect("url").connect().await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arith_r1_over_grpc_matches_transformers_unary_concurrent_and_streamed() {
    let expected = load_expected();
    assert_eq!(expected.len(), 5, "expected.jsonl holds 5 problems");
    let tmp = tempfile::tempdir().expect("tempdir");
    let art = tmp.path().join("arith-fp32");
    let manifest = export(&ExportOptions::new(fixture(), &art), &mut |_| {}).expect("export arith-r1");
    assert_eq!((manifest.family.name(), manifest.precision.name()), ("deepseek_v3", "fp32"));

    let mut srv = start(art).await;
    let client = GenerationClient::new(connect(&srv.grpc_url).await);

    let info = client.clone().model_info(pb::ModelInfoRequest {}).await.expect("model info").into_inner();
    assert_eq!(
        (info.model_id.as_str(), info.family.as_str(), info.precision.as_str()),
        ("arith-r1", "deepseek_v3", "fp32")
    );
    assert!(info.backend.contains("ort"), "backend reported as {:?}", info.backend);

    // All 5 at once: they share batched steps in the scheduler and must still each equal the reference.
    let calls: Vec<_> = expected
        .iter()
        .map(|e| {
            let mut c = client.clone();
            let req = request(e);
            tokio::spawn(async move { c.generate(req).await })
        })
        .collect();
    let mut unary = Vec::new();
    for (call, e) in calls.into_iter().zip(&expected) {
        let q = &e.messages[0].content;
        let r = call.await.expect("task").unwrap_or_else(|s| panic!("Generate {q:?}: {s:?}")).into_inner();
        let (want_reasoning, want_text) = split_reference(&e.completion);
        assert_eq!(want_text, e.answer, "reference split of {q:?}");
        assert_eq!(r.token_ids, e.completion_token_ids, "token ids of {q:?}");
        assert_eq!(r.reasoning, want_reasoning, "reasoning of {q:?}");
        assert_eq!(r.text, want_text, "answer of {q:?}");
        assert!(e.finished_by_eos);
        assert_eq!(r.finish_reason, pb::FinishReason::Stop as i32, "finish reason of {q:?}");
        let usage = r.usage.unwrap_or_else(|| panic!("usage of {q:?}"));
        assert_eq!(usage.prompt_tokens as usize, e.prompt_token_ids.len(), "prompt tokens of {q:?}");
        assert_eq!(usage.completion_tokens as usize, e.completion_token_ids.len(), "completion tokens of {q:?}");
        // Requests running together may share their chat template's opening through the prefix cache, depending on
        // arrival order; the cached count is checked below where it is deterministic, and ignored in comparisons.
        assert!(usage.cached_prompt_tokens < usage.prompt_tokens, "cached prompt tokens of {q:?}");
        let mut r = r;
        if let Some(u) = r.usage.as_mut() {
            u.cached_prompt_tokens = 0;
        }
        unary.push(r);
    }

    // One at a time (batch of 1) gives the same as inside the batch; its prompt now comes from the prefix cache (the
    // batch's run of the same prompt), all but the last token, and only the usage says so.
    let mut alone = client.clone().generate(request(&expected[1])).await.expect("Generate alone").into_inner();
    let prompt_tokens = expected[1].prompt_token_ids.len() as u32;
    assert_eq!(alone.usage.as_ref().map(|u| u.cached_prompt_tokens), Some(prompt_tokens - 1), "prefix cache hit");
    if let Some(u) = alone.usage.as_mut() {
        u.cached_prompt_tokens = 0;
    }
    assert_eq!(alone, unary[1]);

    // Streaming: concatenated deltas equal the unary result; finish reason and usage only on the last message.
    let mut stream = client.clone().generate_stream(request(&expected[2])).await.expect("GenerateStream").into_inner();
    let (mut reasoning, mut text, mut ids, mut messages) = (String::new(), String::new(), Vec::new(), Vec::new());
    while let Some(m) = stream.message().await.expect("stream message") {
        reasoning.push_str(&m.reasoning);
        text.push_str(&m.text);
        ids.extend_from_slice(&m.token_ids);
        messages.push(m);
    }
    let last = messages.last().expect("at least one stream message");
    assert!(messages.len() > 1, "tokens are streamed, not sent at once ({} messages)", messages.len());
    assert!(messages[..messages.len() - 1].iter().all(|m| m.finish_reason == 0 && m.usage.is_none()));
    let want = &unary[2];
    assert_eq!((&reasoning, &text, &ids), (&want.reasoning, &want.text, &want.token_ids));
    let mut usage = last.usage;
    assert_eq!(
        usage.map(|u| u.cached_prompt_tokens),
        Some(expected[2].prompt_token_ids.len() as u32 - 1),
        "prefix cache hit"
    );
    if let Some(u) = usage.as_mut() {
        u.cached_prompt_tokens = 0;
    }
    assert_eq!((last.finish_reason, usage), (want.finish_reason, want.usage));

    if let Some(tx) = srv.shutdown.take() {
        let _ = tx.send(());
    }
    let done = tokio::time::timeout(Duration::from_secs(30), &mut srv.task)
        .await
        .expect("shutdown in time")
        .expect("no panic");
    done.expect("clean shutdown");
}
