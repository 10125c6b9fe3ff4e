//! `r1-serve`: serve an artifact over gRPC + HTTP, or `r1-serve generate` to run it in-process on one prompt.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use r1_engine::PoolOptions;
use r1_serve::config::{AskArgs, Command, GenerateArgs, ServeArgs, ServerConfig};
use r1_serve::engine_model::{verify_artifact, EngineModel};
use r1_serve::metrics::Metrics;
use r1_serve::model::{ChatTurn, Model, PromptInput, Sampling, SeqParams, Work};
use r1_serve::server::{run_with, Listeners, Loader, ServeOptions};

fn main() -> anyhow::Result<()> {
    let cli = ServeArgs::parse_cli()?;
    match cli.command {
        Some(Command::Generate(args)) => generate(&args),
        Some(Command::Ask(args)) => ask(&args),
        None => {
            let cfg = cli.serve.validate()?;
            serve(cfg)
        }
    }
}

fn serve(cfg: ServerConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    // The OTLP exporter's gRPC channel spawns its connection task on the runtime, so it is built inside it; the guard
    // is declared after `rt` and so dropped (flushing the last spans) while the runtime still runs.
    let _telemetry = {
        let _in_runtime = rt.enter();
        r1_serve::telemetry::init(&cfg.telemetry)?
    };
    rt.block_on(async move {
        let grpc = tokio::net::TcpListener::bind(cfg.grpc_addr)
            .await
            .with_context(|| format!("binding --grpc-addr {}", cfg.grpc_addr))?;
        let http = tokio::net::TcpListener::bind(cfg.http_addr)
            .await
            .with_context(|| format!("binding --http-addr {}", cfg.http_addr))?;
        let (dir, backend, ep, kv, skip) = (
            cfg.model.clone(),
            cfg.backend.clone(),
            cfg.execution_provider,
            cfg.kv_cache_bytes,
            cfg.skip_integrity_check,
        );
        // One pool slot per sequence the scheduler may run at once.
        let pool = PoolOptions {
            slots: cfg.scheduler.max_batch_size,
            block_tokens: cfg.kv_block_tokens,
            prefix_cache: cfg.prefix_cache,
            max_context: Some(cfg.max_context_tokens),
        };
        // Runs on a blocking thread while health says NOT_SERVING: verify the files, then load them.
        let load: Loader = Box::new(move || {
            verify_artifact(&dir, skip)?;
            EngineModel::load(&dir, &backend, ep, kv, pool).map(|m| Box::new(m) as Box<dyn Model>)
        });
        let opts = ServeOptions {
            model_id: cfg.model_id,
            limits: cfg.limits,
            scheduler: cfg.scheduler,
            step_budget: cfg.step_budget,
            drain_timeout: cfg.drain_timeout,
        };
        run_with(Listeners { grpc, http }, opts, cfg.security, Arc::new(Metrics::new()), load, shutdown_signal())
            .await?;
        Ok::<(), anyhow::Error>(())
    })
}

/// `r1-serve ask`: one greedy GenerateStream call to a running server, printed for a person.
fn ask(args: &AskArgs) -> anyhow::Result<()> {
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the tokio runtime")?;
    let tls = match &args.tls_ca {
        Some(ca) => {
            let id = args.tls_client_cert.as_deref().zip(args.tls_client_key.as_deref());
            Some(r1_serve::tls::client_config(ca, id)?)
        }
        None => None,
    };
    let key = std::env::var("R1_API_KEY").ok();
    let r = rt.block_on(r1_serve::ask::ask_with(&args.addr, &args.question, args.max_tokens, tls, key.as_deref()))?;
    println!("question:  {}", args.question);
    println!("reasoning: {}", r.reasoning.trim());
    println!("answer:    {}", r.text.trim());
    println!(
        "timings:   time to first token {:.1} ms, {} tokens in {:.1} ms, decode {:.0} tokens/s (prompt {} tokens, finish {:?})",
        r.ttft_s * 1e3,
        r.completion_tokens,
        r.total_s * 1e3,
        r.decode_tokens_per_s(),
        r.prompt_tokens,
        r.finish_reason
    );
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

/// Runs one request through the engine in-process (no server, no scheduler): prompt in, text out, timing on stderr.
fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    verify_artifact(&args.model, args.skip_integrity_check).context("artifact integrity check")?;
    if args.skip_integrity_check {
        eprintln!("warning: artifact integrity check skipped (--skip-integrity-check)");
    } else {
        eprintln!("artifact verified against manifest.json sha256 sums in {:.2}s", t0.elapsed().as_secs_f64());
    }
    let ep = r1_serve::config::parse_execution_provider(&args.backend, &args.execution_provider)?;
    let mut model =
        EngineModel::load(&args.model, &args.backend, ep, None, PoolOptions { slots: 1, ..Default::default() })
            .with_context(|| format!("loading {}", args.model.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let input = if args.raw {
        PromptInput::Text(args.prompt.clone())
    } else {
        PromptInput::Chat(vec![ChatTurn::new("user", args.prompt.clone())], None)
    };
    let prompt = model.frontend().encode(&input).context("tokenizing the prompt")?;
    let sampling = Sampling {
        temperature: args.temperature,
        top_p: 1.0,
        top_k: 0,
        min_p: 0.0,
        seed: Some(args.seed),
        ..Sampling::default()
    };
    let params = SeqParams {
        sampling,
        max_tokens: args.max_tokens as usize,
        stop: vec![],
        ignore_eos: false,
        logprobs: None,
        response_format: None,
        prefix: r1_serve::model::PrefixReuse::Longest,
    };
    let seq = model.add_sequence(&prompt, &params).context("adding the sequence")?;
    let t1 = Instant::now();
    let mut first: Option<f64> = None;
    let mut work = Work { seq, tokens: prompt.len() };
    let mut generated = 0usize;
    let mut in_reasoning = false;
    let mut out = std::io::stdout().lock();
    loop {
        let emitted = model.step(&[work], 1).context("model step")?;
        let Some(e) = emitted.into_iter().next() else { anyhow::bail!("the model returned no token for the sequence") };
        first.get_or_insert_with(|| t1.elapsed().as_secs_f64());
        generated += 1;
        if !e.reasoning.is_empty() {
            if !in_reasoning {
                write!(out, "<think>")?;
                in_reasoning = true;
            }
            write!(out, "{}", e.reasoning)?;
        }
        if !e.text.is_empty() {
            if in_reasoning {
                writeln!(out, "</think>")?;
                in_reasoning = false;
            }
            write!(out, "{}", e.text)?;
        }
        out.flush()?;
        if e.finish.is_some() || generated >= args.max_tokens as usize {
            break;
        }
        work = Work { seq, tokens: 1 };
    }
    writeln!(out)?;
    let total = t1.elapsed().as_secs_f64();
    let ttft = first.unwrap_or(total);
    let decode_tps = if generated > 1 { (generated - 1) as f64 / (total - ttft).max(1e-9) } else { 0.0 };
    eprintln!(
        "load {load_s:.2}s, prompt {} tokens, generated {generated} tokens, time to first token {:.1} ms, decode {decode_tps:.2} tokens/s",
        prompt.len(),
        ttft * 1e3
    );
    Ok(())
}
