//! The diagnostic switches of the real `r1-serve` binary, read from its environment (`r1-serve --help` lists them):
//! `R1_BIND_PRESENT` (the portable graph's present kept where the session made it, `engine/src/backend/ort_bound.rs`)
//! and `R1_DECODE_STEPS` (CUDA-graph capture of in-place decode steps). Forcing the binding on or off changes where
//! the cache lives between steps, never the answer; a value the switch does not know stops the binary with an error
//! that names the variable, the values it takes and the value given.

mod common;

use std::path::Path;

use r1_export::{export, ExportOptions};
use r1_proto::r1::v1 as pb;
use r1_proto::r1::v1::generation_client::GenerationClient;

fn request() -> pb::GenerateRequest {
    pb::GenerateRequest {
        messages: vec![pb::ChatMessage { role: "user".into(), content: "What is 17+25?".into(), ..Default::default() }],
        max_tokens: Some(24),
        ignore_eos: true,
        sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_present_binding_switch_moves_the_cache_not_the_answer_and_bad_values_are_named() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // No `--target cpu` build: the ort backend runs the portable graph, the one the binding applies to.
    let art = tmp.path().join("arith-fp32");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/arith-r1");
    export(&ExportOptions::new(fixture, &art), &mut |_| {}).expect("export arith-r1");
    let flags = ["--backend", "ort", "--execution-provider", "cpu"];

    let mut answers = Vec::new();
    for (value, bound) in [("always", true), ("never", false), ("auto", false)] {
        let log = tmp.path().join(format!("serve-{value}.log"));
        let served = common::serve_with_env(&art, &flags, &[("R1_BIND_PRESENT", value)], &log).await;
        let r = GenerationClient::new(served.channel.clone()).generate(request()).await.expect("generate");
        let ids = r.into_inner().token_ids;
        assert_eq!(ids.len(), 24, "R1_BIND_PRESENT={value}");
        // The session says where its present lives: in host memory when forced on the CPU provider, nowhere else.
        let events = served.stdout_text();
        let ready = events.lines().find(|l| l.contains("ort session ready")).map(str::to_owned);
        let ready = ready.unwrap_or_else(|| panic!("no session line in the server's events:\n{events}"));
        assert_eq!(ready.contains("present_bound"), bound, "R1_BIND_PRESENT={value}: {ready}");
        if bound {
            assert!(ready.contains("host"), "{ready}");
        }
        answers.push(ids);
    }
    assert_eq!(answers[0], answers[1], "bound and host presents give the same greedy answer");
    assert_eq!(answers[1], answers[2]);

    for (var, value, expected) in
        [("R1_BIND_PRESENT", "gpu", "auto, always or never"), ("R1_DECODE_STEPS", "graphs", "auto, shaped or fixed")]
    {
        let out = std::process::Command::new(common::r1_serve_bin())
            .args(["generate", "--model"])
            .arg(&art)
            .args(flags)
            .args(["--max-tokens", "4", "1+1"])
            .env(var, value)
            .output()
            .expect("run r1-serve generate");
        assert!(!out.status.success(), "{var}={value} must stop the binary");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(var) && e.contains(expected) && e.contains(value), "{var}={value}: {e}");
    }
}

#[test]
fn help_lists_the_diagnostic_switches() {
    let out = std::process::Command::new(common::r1_serve_bin()).arg("--help").output().expect("r1-serve --help");
    let help = String::from_utf8_lossy(&out.stdout);
    for var in ["R1_BIND_PRESENT", "R1_DECODE_STEPS", "R1_ATTENTION_ISA"] {
        assert!(help.contains(var), "{var} missing from r1-serve --help:\n{help}");
    }
}
