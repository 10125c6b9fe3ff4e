//! `r1-bench`: gRPC load generator for `r1-serve` (N requests at concurrency C), printing throughput and
//! time-to-first-token / inter-token latency percentiles.

use anyhow::Context;
use clap::Parser;
use r1_serve::bench::{run, BenchConfig};

/// Load-test a running r1-serve over gRPC (GenerateStream).
#[derive(Debug, Parser)]
#[command(name = "r1-bench", version, about)]
struct Args {
    /// Server URL.
    #[arg(long, env = "R1_BENCH_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Requests in total.
    #[arg(short = 'n', long, default_value_t = 64)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(short = 'c', long, default_value_t = 8)]
    concurrency: usize,
    /// Approximate prompt length in tokens.
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Stop at EOS instead of always generating --max-tokens.
    #[arg(long)]
    honor_eos: bool,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Let requests start from the server's prefix cache. Off by default: every request sends the same prompt, so
    /// all but the first would skip their prefill and the figures would not measure it.
    #[arg(long)]
    use_prefix_cache: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.requests == 0 || a.concurrency == 0 {
        anyhow::bail!("--requests and --concurrency must be at least 1, got {} and {}", a.requests, a.concurrency);
    }
    let cfg = BenchConfig {
        addr: a.addr.clone(),
        requests: a.requests,
        concurrency: a.concurrency,
        prompt_tokens: a.prompt_tokens,
        max_tokens: a.max_tokens,
        ignore_eos: !a.honor_eos,
        temperature: a.temperature,
        skip_prefix_cache: !a.use_prefix_cache,
    };
    let r = run(&cfg).await.with_context(|| format!("connecting to {}", a.addr))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "requests: {} ok, {} failed (concurrency {}, prompt ~{} tokens, max_tokens {})",
            r.ok, r.failed, a.concurrency, a.prompt_tokens, a.max_tokens
        );
        if let Some(e) = &r.first_error {
            println!("first error: {e}");
        }
        println!(
            "wall: {:.2} s, generated tokens: {}, throughput: {:.2} tokens/s, {:.2} requests/s",
            r.wall_s, r.generated_tokens, r.tokens_per_s, r.requests_per_s
        );
        let p = |name: &str, v: &r1_serve::bench::Percentiles| {
            println!("{name:<22} p50 {:>9.2} ms  p90 {:>9.2} ms  p99 {:>9.2} ms", v.p50, v.p90, v.p99)
        };
        p("time to first token", &r.ttft_ms);
        p("inter-token latency", &r.itl_ms);
        p("request latency", &r.latency_ms);
    }
    if r.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
