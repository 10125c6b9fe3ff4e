//! r1-bench's load generator against a fake-model server: every request completes and the counts add up.

mod common;

use std::time::Duration;

use common::*;
use r1_serve::bench::{run, BenchConfig};
use r1_serve::fake::FakeConfig;

#[tokio::test]
async fn bench_counts_every_token_and_batching_raises_throughput() {
    let fake = FakeConfig { step_delay: Duration::from_millis(3), ..Default::default() };
    let mut srv = start_ready(Setup { fake, ..Default::default() }).await;
    let cfg = |concurrency| BenchConfig {
        addr: srv.grpc_url.clone(),
        requests: 16,
        concurrency,
        prompt_tokens: 8,
        max_tokens: 10,
        ignore_eos: true,
        temperature: 0.0,
        skip_prefix_cache: true,
    };
    let serial = run(&cfg(1)).await.expect("bench c=1");
    let batched = run(&cfg(16)).await.expect("bench c=16");
    for r in [&serial, &batched] {
        assert_eq!((r.ok, r.failed, r.generated_tokens), (16, 0, 160), "{r:?}");
        assert_eq!(r.prompt_tokens, 16 * "hello ".repeat(8).trim_end().len() as u64);
        assert!(r.ttft_ms.p50 > 0.0 && r.itl_ms.p50 > 0.0 && r.ttft_ms.p50 <= r.ttft_ms.p99);
    }
    eprintln!("fake model, 3 ms/step: c=1 {:.1} tok/s (ITL p50 {:.2} ms), c=16 {:.1} tok/s (TTFT p50 {:.2} ms, ITL p50 {:.2} ms)", serial.tokens_per_s, serial.itl_ms.p50, batched.tokens_per_s, batched.ttft_ms.p50, batched.itl_ms.p50);
    // With a fixed per-step cost, 16 concurrent requests share steps: far more tokens per second than one at a time.
    assert!(
        batched.tokens_per_s > 4.0 * serial.tokens_per_s,
        "c=16 {:.1} tok/s vs c=1 {:.1} tok/s",
        batched.tokens_per_s,
        serial.tokens_per_s
    );
    srv.shutdown().await.expect("clean shutdown");
}
