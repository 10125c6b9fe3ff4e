//! The load generator behind `r1-bench`: N streaming `GenerateStream` requests at concurrency C against a running
//! server, measuring time to first token, inter-token latency and aggregate throughput.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use r1_proto::r1::v1 as pb;
use r1_proto::r1::v1::generation_client::GenerationClient;
use serde::Serialize;

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Server URL, e.g. `http://127.0.0.1:50051`.
    pub addr: String,
    /// Requests in total.
    pub requests: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Approximate prompt length in tokens (the prompt repeats a one-token word).
    pub prompt_tokens: usize,
    /// `max_tokens` of each request.
    pub max_tokens: u32,
    /// Generate through EOS so every request produces `max_tokens`.
    pub ignore_eos: bool,
    /// Sampling temperature.
    pub temperature: f32,
    /// Ask the server to prefill every prompt in full (`GenerateRequest.skip_prefix_cache`).
    pub skip_prefix_cache: bool,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (seconds), reported in milliseconds.
    pub fn of(samples: &mut [f64]) -> Self {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            samples[rank - 1] * 1e3
        };
        Percentiles { p50: at(0.50), p90: at(0.90), p99: at(0.99) }
    }
}

/// Results of one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BenchReport {
    /// Requests that completed.
    pub ok: usize,
    /// Requests that failed.
    pub failed: usize,
    /// First error message seen, if any.
    pub first_error: Option<String>,
    /// Wall time of the run, seconds.
    pub wall_s: f64,
    /// Generated tokens over all requests.
    pub generated_tokens: u64,
    /// Prompt tokens over all requests (as the server counted them).
    pub prompt_tokens: u64,
    /// Generated tokens per second over the run.
    pub tokens_per_s: f64,
    /// Completed requests per second.
    pub requests_per_s: f64,
    /// Time to first token.
    pub ttft_ms: Percentiles,
    /// Inter-token latency.
    pub itl_ms: Percentiles,
    /// Whole-request latency.
    pub latency_ms: Percentiles,
}

struct One {
    ttft: f64,
    gaps: Vec<f64>,
    total: f64,
    generated: u64,
    prompt: u64,
}

async fn one(
    client: &mut GenerationClient<tonic::transport::Channel>,
    req: pb::GenerateRequest,
) -> Result<One, tonic::Status> {
    let t0 = Instant::now();
    let mut stream = client.generate_stream(req).await?.into_inner();
    let mut first = None;
    let mut last = t0;
    let mut gaps = Vec::new();
    let mut generated = 0u64;
    let mut prompt = 0u64;
    while let Some(msg) = stream.message().await? {
        let now = Instant::now();
        let n = msg.token_ids.len();
        if n > 0 {
            if first.is_none() {
                first = Some(now.duration_since(t0).as_secs_f64());
            } else {
                let gap = now.duration_since(last).as_secs_f64() / n as f64;
                gaps.extend(std::iter::repeat_n(gap, n));
            }
            last = now;
            generated += n as u64;
        }
        if let Some(u) = msg.usage {
            prompt = u.prompt_tokens as u64;
        }
    }
    let total = t0.elapsed().as_secs_f64();
    Ok(One { ttft: first.unwrap_or(total), gaps, total, generated, prompt })
}

/// Runs the benchmark.
pub async fn run(cfg: &BenchConfig) -> Result<BenchReport, tonic::transport::Error> {
    let channel = tonic::transport::Endpoint::from_shared(cfg.addr.clone())?.connect().await?;
    let prompt = "hello ".repeat(cfg.prompt_tokens.max(1)).trim_end().to_string();
    let req = pb::GenerateRequest {
        prompt: Some(prompt),
        max_tokens: Some(cfg.max_tokens),
        sampling: Some(pb::SamplingParams { temperature: Some(cfg.temperature), seed: Some(0), ..Default::default() }),
        ignore_eos: cfg.ignore_eos,
        skip_prefix_cache: cfg.skip_prefix_cache,
        ..Default::default()
    };
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..cfg.concurrency.max(1) {
        let mut client = GenerationClient::new(channel.clone());
        let (next, req, n) = (next.clone(), req.clone(), cfg.requests);
        workers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            while next.fetch_add(1, Ordering::AcqRel) < n {
                results.push(one(&mut client, req.clone()).await);
            }
            results
        }));
    }
    let mut report = BenchReport::default();
    let (mut ttft, mut itl, mut lat) = (Vec::new(), Vec::new(), Vec::new());
    for w in workers {
        let Ok(results) = w.await else { continue };
        for r in results {
            match r {
                Ok(o) => {
                    report.ok += 1;
                    report.generated_tokens += o.generated;
                    report.prompt_tokens += o.prompt;
                    ttft.push(o.ttft);
                    itl.extend(o.gaps);
                    lat.push(o.total);
                }
                Err(s) => {
                    report.failed += 1;
                    report.first_error.get_or_insert_with(|| format!("{:?}: {}", s.code(), s.message()));
                }
            }
        }
    }
    report.wall_s = t0.elapsed().as_secs_f64().max(Duration::from_micros(1).as_secs_f64());
    report.tokens_per_s = report.generated_tokens as f64 / report.wall_s;
    report.requests_per_s = report.ok as f64 / report.wall_s;
    report.ttft_ms = Percentiles::of(&mut ttft);
    report.itl_ms = Percentiles::of(&mut itl);
    report.latency_ms = Percentiles::of(&mut lat);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).map(|i| i as f64 / 1000.0).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!((p.p50, p.p90, p.p99), (50.0, 90.0, 99.0));
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
        let mut one = vec![0.002];
        assert_eq!(Percentiles::of(&mut one).p99, 2.0);
    }
}
