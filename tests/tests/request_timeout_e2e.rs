//! `--request-timeout-secs` from the real `r1-serve` binary: a request that would run longer ends with
//! DEADLINE_EXCEEDED (gRPC) / 504 (HTTP) at the server's bound, and the server keeps serving.

mod common;

use std::path::Path;

use r1_export::{export, ExportOptions};
use r1_proto::r1::v1 as pb;
use r1_proto::r1::v1::generation_client::GenerationClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_own_request_timeout_ends_long_requests() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let art = tmp.path().join("arith-fp32");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/arith-r1");
    export(&ExportOptions::new(fixture, &art), &mut |_| {}).expect("export arith-r1");
    // One prefill chunk of 4 tokens per step, so a long prompt takes many steps whatever the machine's speed.
    let flags =
        ["--backend", "tract", "--request-timeout-secs", "0.2", "--prefill-chunk", "4", "--max-batch-tokens", "16"];
    let served = common::serve(&art, &flags, &tmp.path().join("serve.log")).await;
    let long = pb::GenerateRequest {
        prompt: Some("1+2+3+4+5+6+7+8+9+10+11+12+13+14+15+16+17+18+19+20+21+22+23+24".repeat(2)),
        max_tokens: Some(120),
        ignore_eos: true,
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let err = GenerationClient::new(served.channel.clone()).generate(long).await.expect_err("past the server's bound");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(t0.elapsed().as_secs_f64() < 30.0, "ended at the bound, not at the end of generation");
    // The server still answers a short request (it may itself run past 0.2 s on a slow machine: either is fine).
    let short = pb::GenerateRequest { prompt: Some("1+1=".into()), max_tokens: Some(1), ..Default::default() };
    match GenerationClient::new(served.channel.clone()).generate(short).await {
        Ok(r) => assert_eq!(r.into_inner().token_ids.len(), 1),
        Err(e) => assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}"),
    }
}
