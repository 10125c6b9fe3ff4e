//! gRPC end to end over real sockets with the deterministic fake model.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use r1_proto::r1::v1 as pb;
use r1_serve::fake::{FakeConfig, FAKE_EOS};
use r1_serve::scheduler::SchedulerConfig;
use r1_serve::validate::Limits;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

async fn stream_all(
    client: &mut pb::generation_client::GenerationClient<tonic::transport::Channel>,
    req: pb::GenerateRequest,
) -> (String, String, Vec<u32>, i32, Option<pb::Usage>) {
    let mut s = client.generate_stream(req).await.expect("stream starts").into_inner();
    let (mut r, mut t, mut ids, mut fin, mut usage) = (String::new(), String::new(), Vec::new(), 0, None);
    while let Some(m) = s.message().await.expect("stream message") {
        r.push_str(&m.reasoning);
        t.push_str(&m.text);
        ids.extend(m.token_ids);
        if m.finish_reason != 0 {
            fin = m.finish_reason;
            usage = m.usage;
        }
    }
    (r, t, ids, fin, usage)
}

#[tokio::test]
async fn unary_and_stream_match_the_reference() {
    let mut srv = start_ready(Setup::default()).await;
    let mut c = srv.client().await;
    let (want_r, want_t, want_ids) = reference("abc", 12);
    let resp = c.generate(prompt_req("abc", 12)).await.expect("generate");
    assert!(resp.metadata().get("x-request-id").is_some());
    let r = resp.into_inner();
    assert_eq!((r.reasoning.as_str(), r.text.as_str(), &r.token_ids), (want_r.as_str(), want_t.as_str(), &want_ids));
    assert_eq!(r.finish_reason, pb::FinishReason::Length as i32);
    assert_eq!(r.usage, Some(pb::Usage { prompt_tokens: 3, completion_tokens: 12, cached_prompt_tokens: 0 }));
    let (sr, st, sids, fin, usage) = stream_all(&mut c, prompt_req("abc", 12)).await;
    assert_eq!((sr, st, sids), (want_r, want_t, want_ids));
    assert_eq!(fin, pb::FinishReason::Length as i32);
    assert_eq!(usage, Some(pb::Usage { prompt_tokens: 3, completion_tokens: 12, cached_prompt_tokens: 0 }));

    // Chat messages go through the template; ModelInfo describes the model.
    let chat = pb::GenerateRequest {
        messages: vec![pb::ChatMessage { role: "user".into(), content: "hi".into(), ..Default::default() }],
        max_tokens: Some(4),
        ..Default::default()
    };
    let r = c.generate(chat).await.expect("chat").into_inner();
    assert_eq!(r.usage.map(|u| u.prompt_tokens), Some("<user>hi<assistant>".len() as u32));
    let info = c.model_info(pb::ModelInfoRequest {}).await.expect("info").into_inner();
    assert_eq!((info.model_id.as_str(), info.family.as_str(), info.max_batch_size), ("fake-r1", "fake", 16));
    srv.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn eos_and_stop_sequences_finish_with_their_reasons() {
    let fake = FakeConfig { eos_after: Some(6), ..Default::default() };
    let mut srv = start_ready(Setup { fake, ..Default::default() }).await;
    let mut c = srv.client().await;
    let r = c.generate(prompt_req("abc", 50)).await.expect("generate").into_inner();
    assert_eq!(r.finish_reason, pb::FinishReason::Stop as i32);
    assert_eq!(r.token_ids.len(), 6);
    assert_eq!(r.token_ids.last(), Some(&FAKE_EOS));
    let mut ignore = prompt_req("abc", 20);
    ignore.ignore_eos = true;
    let r = c.generate(ignore).await.expect("generate").into_inner();
    assert_eq!((r.finish_reason, r.token_ids.len()), (pb::FinishReason::Length as i32, 20));
    // Stop string: pick two answer characters of the reference output and stop there.
    let (_, text, _) = reference("xyz", 5);
    let mut req = prompt_req("xyz", 5);
    req.ignore_eos = true;
    req.stop = vec![text[1..2].to_string()];
    let r = c.generate(req).await.expect("generate").into_inner();
    assert_eq!(r.finish_reason, pb::FinishReason::StopSequence as i32);
    assert_eq!(r.text, text[..text.find(&text[1..2]).expect("found")]);
    srv.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn thirty_two_concurrent_streams_equal_their_single_outputs() {
    let fake = FakeConfig { step_delay: Duration::from_millis(2), ..Default::default() };
    let sched = SchedulerConfig { max_batch_size: 32, ..Default::default() };
    let mut srv = start_ready(Setup { fake, scheduler: sched, ..Default::default() }).await;
    let prompts: Vec<String> = (0..32).map(|i| format!("prompt number {i} {}", "x".repeat(i % 7))).collect();
    let mut singles = Vec::new();
    let mut c = srv.client().await;
    for p in &prompts {
        singles.push(c.generate(prompt_req(p, 24)).await.expect("single").into_inner());
    }
    srv.steps.lock().expect("log").clear();
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (url, req) = (srv.grpc_url.clone(), prompt_req(p, 24));
            tokio::spawn(async move {
                let mut c = pb::generation_client::GenerationClient::connect(url).await.expect("connect");
                stream_all(&mut c, req).await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let (r, text, ids, fin, _) = t.await.expect("task");
        let s = &singles[i];
        assert_eq!(
            (r.as_str(), text.as_str(), &ids, fin),
            (s.reasoning.as_str(), s.text.as_str(), &s.token_ids, s.finish_reason),
            "stream {i}"
        );
        assert_eq!(ids, reference(&prompts[i], 24).2, "stream {i} equals the reference");
    }
    let biggest = srv.steps.lock().expect("log").iter().map(|s| s.work.len()).max().unwrap_or(0);
    assert!(biggest >= 8, "requests were batched together (largest step had {biggest} rows)");
    srv.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn cancelled_stream_frees_its_sequence() {
    let fake = FakeConfig { step_delay: Duration::from_millis(10), ..Default::default() };
    let mut srv = start_ready(Setup { fake, ..Default::default() }).await;
    let mut c = srv.client().await;
    let mut s = c.generate_stream(prompt_req("long", 1000)).await.expect("stream").into_inner();
    for _ in 0..3 {
        s.message().await.expect("message").expect("some");
    }
    srv.wait_metrics("one running sequence", |t| metric(t, "r1_running_sequences") == Some(1.0)).await;
    drop(s);
    let text = srv
        .wait_metrics("the sequence freed", |t| {
            metric(t, "r1_running_sequences") == Some(0.0)
                && metric(t, "r1_kv_cache_used_tokens") == Some(0.0)
                && metric(t, "r1_requests_total{api=\"grpc\",outcome=\"cancelled\"}") == Some(1.0)
        })
        .await;
    assert!(metric(&text, "r1_generated_tokens_total").unwrap_or(0.0) < 1000.0);
    srv.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn deadline_exceeded_frees_the_sequence() {
    let fake = FakeConfig { step_delay: Duration::from_millis(10), ..Default::default() };
    let mut srv = start_ready(Setup { fake, ..Default::default() }).await;
    let mut c = srv.client().await;
    // The deadline travels as the `grpc-timeout` header (what `Request::set_timeout` sends); no client-side timer,
    // so the status seen is the server's.
    let mut req = tonic::Request::new(prompt_req("slow", 1000));
    req.metadata_mut().insert("grpc-timeout", "150m".parse().expect("ascii"));
    let err = c.generate(req).await.expect_err("deadline");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("deadline exceeded"), "{}", err.message());
    srv.wait_metrics("freed", |t| {
        metric(t, "r1_running_sequences") == Some(0.0) && metric(t, "r1_kv_cache_used_tokens") == Some(0.0)
    })
    .await;
    srv.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn overload_is_rejected_with_resource_exhausted() {
    let fake = FakeConfig { step_delay: Duration::from_millis(20), ..Default::default() };
    let sched = SchedulerConfig { max_concurrent_requests: 2, ..Default::default() };
    let mut srv = start_ready(Setup { fake, scheduler: sched, ..Default::default() }).await;
    let mut c = srv.client().await;
    let mut a = c.generate_stream(prompt_req("one", 500)).await.expect("first").into_inner();
    let mut b = c.generate_stream(prompt_req("two", 500)).await.expect("second").into_inner();
    a.message().await.expect("a").expect("some");
    b.message().await.expect("b").expect("some");
    let err = c.generate(prompt_req("three", 5)).await.expect_err("overloaded");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("--max-concurrent-requests=2") && err.message().contains("2 requests"),
        "{}",
        err.message()
    );
    drop((a, b));
    srv.wait_metrics("slots released", |t| metric(t, "r1_running_sequences") == Some(0.0)).await;
    // Capacity is back once the two clients left.
    let mut ok = false;
    for _ in 0..100 {
        if c.generate(prompt_req("four", 2)).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ok, "requests are accepted again");
    srv.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn every_invalid_argument_names_field_limit_and_value() {
    let fake = FakeConfig { max_context_tokens: 64, ..Default::default() };
    let limits = Limits {
        max_new_tokens: 40,
        default_max_tokens: 8,
        max_context_tokens: u32::MAX,
        sampling_defaults: Default::default(),
        request_timeout: None,
    };
    let mut srv = start_ready(Setup { fake, limits, ..Default::default() }).await;
    let mut c = srv.client().await;
    let base = || prompt_req("hello", 4);
    let sampling = |f: &dyn Fn(&mut pb::SamplingParams)| {
        let mut r = base();
        let mut s = r.sampling.unwrap_or_default();
        f(&mut s);
        r.sampling = Some(s);
        r
    };
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (
            pb::GenerateRequest {
                messages: vec![pb::ChatMessage { role: "user".into(), content: "x".into(), ..Default::default() }],
                ..base()
            },
            "`prompt` and `messages` are both set",
        ),
        (pb::GenerateRequest { prompt: None, ..base() }, "both empty"),
        (pb::GenerateRequest { prompt: Some(String::new()), ..base() }, "`prompt` must not be empty"),
        (
            pb::GenerateRequest {
                prompt: None,
                messages: vec![pb::ChatMessage { role: "bot".into(), content: "x".into(), ..Default::default() }],
                ..base()
            },
            "`messages[0].role` must be one of system, user, assistant, tool, got \"bot\"",
        ),
        (pb::GenerateRequest { max_tokens: Some(0), ..base() }, "`max_tokens` must be between 1 and 40, got 0"),
        (pb::GenerateRequest { max_tokens: Some(41), ..base() }, "`max_tokens` must be between 1 and 40, got 41"),
        (sampling(&|s| s.temperature = Some(2.5)), "`sampling.temperature` must be in [0, 2], got 2.5"),
        (sampling(&|s| s.top_p = Some(0.0)), "`sampling.top_p` must be in (0, 1], got 0"),
        (sampling(&|s| s.min_p = Some(-0.1)), "`sampling.min_p` must be in [0, 1), got -0.1"),
        (sampling(&|s| s.repetition_penalty = Some(3.0)), "`sampling.repetition_penalty` must be in (0, 2], got 3"),
        (pb::GenerateRequest { stop: vec!["s".into(); 9], ..base() }, "`stop` must hold at most 8 strings, got 9"),
        (
            pb::GenerateRequest { stop: vec!["x".repeat(300)], ..base() },
            "`stop[0]` must be 1 to 256 bytes long, got 300 bytes",
        ),
        (prompt_req(&"p".repeat(70), 4), "`prompt` must be shorter than the context of 64 tokens, got 70 tokens"),
        (prompt_req(&"p".repeat(30), 40), "at most 34, got 40"),
        (sampling(&|s| s.presence_penalty = Some(-2.5)), "`sampling.presence_penalty` must be in [-2, 2], got -2.5"),
        (pb::GenerateRequest { n: 17, ..base() }, "`n` must be between 1 and 16, got 17"),
        (pb::GenerateRequest { top_logprobs: 3, ..base() }, "`top_logprobs` needs `logprobs: true`"),
        (pb::GenerateRequest { logprobs: true, top_logprobs: 21, ..base() }, "`top_logprobs` must be between 0 and 20"),
        (pb::GenerateRequest { tools_json: "{}".into(), ..base() }, "`tools_json` must be a JSON array"),
        (pb::GenerateRequest { prompt_token_ids: vec![5], ..base() }, "`prompt_token_ids` is set together with"),
    ];
    for (req, want) in cases {
        let err = c.generate(req.clone()).await.expect_err(want);
        assert_eq!(err.code(), Code::InvalidArgument, "{want}: {err:?}");
        assert!(err.message().contains(want), "want {want:?} in {:?}", err.message());
        let err = c.generate_stream(req).await.expect_err(want);
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    let text = srv.metrics.encode();
    // Every case counted once per call (Generate and GenerateStream), including those refused before validation.
    assert_eq!(metric(&text, "r1_requests_total{api=\"grpc\",outcome=\"invalid_argument\"}"), Some(40.0));
    srv.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn engine_error_fails_its_batch_and_the_server_keeps_serving() {
    let mut srv = start_ready(Setup::default()).await;
    let mut c = srv.client().await;
    let err = c.generate(prompt_req("FAIL please", 4)).await.expect_err("injected failure");
    assert_eq!(err.code(), Code::Internal);
    assert!(err.message().contains("injected failure"), "{}", err.message());
    let r = c.generate(prompt_req("fine", 4)).await.expect("next request works").into_inner();
    assert_eq!(r.token_ids, reference("fine", 4).2);
    assert_eq!(srv.health("").await, ServingStatus::Serving);
    let text = srv.wait_metrics("cache empty", |t| metric(t, "r1_kv_cache_used_tokens") == Some(0.0)).await;
    assert_eq!(metric(&text, "r1_step_errors_total"), Some(1.0));
    assert_eq!(metric(&text, "r1_requests_total{api=\"grpc\",outcome=\"engine_error\"}"), Some(1.0));
    srv.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn health_follows_loading_serving_and_draining() {
    let (release, gate) = std::sync::mpsc::channel();
    let fake = FakeConfig { step_delay: Duration::from_millis(5), ..Default::default() };
    let mut srv = start(Setup { fake, gate: Some(gate), drain: Duration::from_secs(10), ..Default::default() }).await;
    assert_eq!(srv.health("").await, ServingStatus::NotServing, "loading");
    assert_eq!(srv.health("r1.v1.Generation").await, ServingStatus::NotServing);
    let mut c = srv.client().await;
    assert_eq!(c.generate(prompt_req("x", 2)).await.expect_err("loading").code(), Code::Unavailable);
    release.send(()).expect("release loader");
    srv.wait_status(ServingStatus::Serving).await;
    assert_eq!(srv.health("r1.v1.Generation").await, ServingStatus::Serving);

    // Watch health on an open stream, start a long request, then signal shutdown: health flips to NOT_SERVING and
    // the in-flight request still completes (drain) before run() returns Ok.
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel(&srv.grpc_url).await);
    let mut watch =
        h.watch(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("watch").into_inner();
    assert_eq!(watch.message().await.expect("watch").map(|m| m.status), Some(ServingStatus::Serving as i32));
    let mut s = c.generate_stream(prompt_req("drain me", 60)).await.expect("stream").into_inner();
    s.message().await.expect("first").expect("some");
    srv.trigger_shutdown();
    assert_eq!(watch.message().await.expect("watch").map(|m| m.status), Some(ServingStatus::NotServing as i32));
    drop(watch);
    let mut n = 1;
    let mut fin = 0;
    while let Some(m) = s.message().await.expect("drained stream keeps going") {
        n += m.token_ids.len();
        fin = m.finish_reason;
    }
    assert_eq!((n, fin), (60, pb::FinishReason::Length as i32), "the in-flight request finished during the drain");
    let task = srv.task.take().expect("task");
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("returns").expect("no panic").expect("Ok");
}

#[tokio::test]
async fn drain_timeout_cancels_what_is_left() {
    let fake = FakeConfig { step_delay: Duration::from_millis(10), ..Default::default() };
    let mut srv = start_ready(Setup { fake, drain: Duration::from_millis(200), ..Default::default() }).await;
    let mut c = srv.client().await;
    let mut s = c.generate_stream(prompt_req("forever", 2000)).await.expect("stream").into_inner();
    s.message().await.expect("first").expect("some");
    srv.trigger_shutdown();
    let mut fin = 0;
    while let Ok(Some(m)) = s.message().await {
        fin = m.finish_reason;
    }
    assert_eq!(fin, pb::FinishReason::Cancelled as i32);
    let task = srv.task.take().expect("task");
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("returns").expect("no panic").expect("Ok");
}

#[tokio::test]
async fn reflection_lists_the_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut srv = start_ready(Setup::default()).await;
    let mut r = ServerReflectionClient::new(channel(&srv.grpc_url).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = r.server_reflection_info(futures::stream::iter(vec![req])).await.expect("reflection").into_inner();
    let msg = resp.next().await.expect("one answer").expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else { panic!("unexpected {msg:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"r1.v1.Generation".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
    srv.shutdown().await.expect("clean shutdown");
}
