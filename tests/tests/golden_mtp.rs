//! The draft graph (`mtp.onnx`: DeepseekV3's multi-token-prediction module, `manifest.draft`) against the PyTorch
//! reference of `tests/fixtures/make_golden_deepseek.py` (`mtp.safetensors` of each golden case with an MTP layer;
//! the module's decoder layer is transformers' own). On ONNX Runtime and tract, fp32, relative error ≤ 1e-4:
//! - the main graph's `last_hidden_state` (before the final norm) over the whole golden sequence;
//! - the draft's logits and `last_hidden_state`, run as a prefill of the prompt positions and then one position at a
//!   time through its own latent cache (the reference runs the whole sequence at once, without a cache).
//!
//! The draft runs through the engine's `r1_engine::speculative::DraftModel`. Self-speculative greedy decoding
//! (`r1_engine::speculative::greedy`) emits exactly the engine's plain greedy tokens, with the draft graph and with
//! oracle drafters that are right or wrong on purpose (both branches of the verification).
//!
//! Also: the manifest record round-trips and an older manifest without it loads; a checkpoint whose MTP module
//! lacks a tensor fails before anything is written, naming the tensor; `--no-draft` exports without the module.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ndarray::{s, Array2, Array3, ArrayD, Axis};
use r1_engine::backend::{self, BackendKind, BackendOptions, StepInput};
use r1_engine::manifest::{names, DType, Manifest};
use r1_engine::speculative::{self, DraftInput, DraftModel, Drafter, MtpDrafter};
use r1_export::{export, ExportOptions, Precision};
use r1_tests::{empty_past, export_case, golden_cases, rel_err};

const TOLERANCE: f32 = 1e-4;

/// `mtp.safetensors` of a case.
struct MtpRef {
    /// `[B, T]` prompt + decode tokens, left-padded.
    attention_mask: Array2<i64>,
    input_ids: Array2<i64>,
    position_ids: Array2<i64>,
    /// `[B, T, H]` the main model's last hidden state before the final norm.
    hidden: Array3<f32>,
    /// `[B, T]` the token after each position.
    draft_ids: Array2<i64>,
    /// `[B, T, V]`.
    draft_logits: Array3<f32>,
    /// `[B, T, H]` the MTP block's output before `shared_head.norm`.
    draft_hidden: Array3<f32>,
    /// Prompt length `P` (the draft is prefilled over `0..P`, then decoded one position at a time).
    prompt: usize,
}

fn load_ref(case: &Path) -> Result<MtpRef> {
    let path = case.join("mtp.safetensors");
    let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let raw = |n: &str| -> Result<(Vec<usize>, Vec<u8>)> {
        let t = st.tensor(n).with_context(|| format!("{}: `{n}`", path.display()))?;
        Ok((t.shape().to_vec(), t.data().to_vec()))
    };
    let ints = |n: &str| -> Result<Array2<i64>> {
        let (sh, d) = raw(n)?;
        let v = d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        Ok(Array2::from_shape_vec((sh[0], sh[1]), v)?)
    };
    let floats = |n: &str| -> Result<Array3<f32>> {
        let (sh, d) = raw(n)?;
        let v = d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        Ok(Array3::from_shape_vec((sh[0], sh[1], sh[2]), v)?)
    };
    let golden = r1_tests::Golden::load(case)?;
    Ok(MtpRef {
        attention_mask: ints("attention_mask")?,
        input_ids: ints("input_ids")?,
        position_ids: ints("position_ids")?,
        hidden: floats("hidden_states")?,
        draft_ids: ints("draft_input_ids")?,
        draft_logits: floats("draft_logits")?,
        draft_hidden: floats("draft_hidden_states")?,
        prompt: golden.input_ids.ncols(),
    })
}

fn mtp_cases() -> Vec<PathBuf> {
    golden_cases().into_iter().filter(|c| c.join("mtp.safetensors").is_file()).collect()
}

fn to3(a: ArrayD<f32>) -> Result<Array3<f32>> {
    Ok(a.into_dimensionality()?)
}

/// Prefill of positions `0..P`, then one position at a time through the draft's cache; the worst relative error of
/// the logits and of `last_hidden_state` against the reference (real positions only).
fn run_draft(model: &mut DraftModel, r: &MtpRef) -> Result<(f32, f32)> {
    let t = r.input_ids.ncols();
    let mut past = model.empty_cache(r.input_ids.nrows());
    let (mut worst_logits, mut worst_hidden) = (0f32, 0f32);
    let mut start = 0;
    for end in std::iter::once(r.prompt).chain(r.prompt + 1..=t) {
        let out = model.run(&DraftInput {
            input_ids: r.draft_ids.slice(s![.., start..end]).to_owned(),
            attention_mask: r.attention_mask.slice(s![.., ..end]).to_owned(),
            position_ids: r.position_ids.slice(s![.., start..end]).to_owned(),
            hidden_states: r.hidden.slice(s![.., start..end, ..]).to_owned(),
            past: &past,
        })?;
        let real = |row: usize, pos: usize| r.attention_mask[[row, start + pos]] == 1;
        let want_logits = r.draft_logits.slice(s![.., start..end, ..]).to_owned();
        let want_hidden = r.draft_hidden.slice(s![.., start..end, ..]).to_owned();
        worst_logits = worst_logits.max(rel_err(&out.logits, &want_logits, real)?);
        worst_hidden = worst_hidden.max(rel_err(&out.last_hidden_state, &want_hidden, real)?);
        past = out.present;
        assert_eq!(past.key.len_of(Axis(2)), end, "the draft's cache holds every position fed");
        start = end;
    }
    Ok((worst_logits, worst_hidden))
}

#[test]
fn draft_graph_and_main_hidden_state_match_the_pytorch_mtp_reference_on_ort_and_tract() {
    let cases = mtp_cases();
    assert_eq!(cases.len(), 2, "expected the two DeepseekV3 golden cases with an MTP layer, found {cases:?}");
    let tmp = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let r = load_ref(case).unwrap();
        let out = tmp.path().join(&name);
        let m = export_case(case, &out, Precision::Fp32).unwrap();
        let d = m.draft.clone().unwrap_or_else(|| panic!("{name}: no draft record"));
        let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(case.join("config.json")).unwrap()).unwrap();
        assert_eq!(d.source_layer as u64, cfg["num_hidden_layers"].as_u64().unwrap(), "{name}");
        assert_eq!((d.kv_cache.num_layers, d.kv_cache.key_dim), (1, m.kv_cache.key_dim), "{name}");
        for f in [names::MTP_FILE, names::MTP_DATA_FILE] {
            assert!(m.files.contains_key(f) && out.join(f).is_file(), "{name}: {f} missing");
        }
        assert!(m.outputs.iter().any(|o| o.name == names::LAST_HIDDEN_STATE), "{name}: {:?}", m.outputs);
        assert_eq!(Manifest::load(&out).unwrap(), m, "{name}: the manifest round-trips");
        m.verify_files(&out).unwrap();

        for kind in [BackendKind::Ort, BackendKind::Tract] {
            let mut be = backend::load(&out, &m, kind, &BackendOptions::default()).unwrap();
            let input = StepInput {
                input_ids: r.input_ids.clone(),
                attention_mask: r.attention_mask.clone(),
                position_ids: r.position_ids.clone(),
                past: empty_past(&m, r.input_ids.nrows()),
            };
            let hidden = be.run_named(&input, &[names::LAST_HIDDEN_STATE.to_string()]).unwrap().remove(0);
            let err = rel_err(&to3(hidden).unwrap(), &r.hidden, |b, t| r.attention_mask[[b, t]] == 1).unwrap();
            eprintln!("{name} {kind:?}: main last_hidden_state rel err {err:.2e}");
            if err.is_nan() || err > TOLERANCE {
                failures.push(format!("{name} {kind:?}: main last_hidden_state rel err {err:.3e}"));
            }
        }
        for kind in [BackendKind::Ort, BackendKind::Tract] {
            let mut model = DraftModel::open(&out, &m, kind).unwrap();
            assert_eq!(model.record(), &d);
            let (logits, hidden) = run_draft(&mut model, &r).unwrap();
            eprintln!("{name} {kind:?}: draft logits rel err {logits:.2e}, draft last_hidden_state {hidden:.2e}");
            if logits.is_nan() || hidden.is_nan() || logits.max(hidden) > TOLERANCE {
                failures.push(format!("{name} {kind:?}: draft rel err logits {logits:.3e}, hidden {hidden:.3e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A manifest written before the draft record existed has no `draft` key: it loads with `draft: None`. A record
/// naming a main-graph output that does not exist is refused by name.
#[test]
fn manifests_without_a_draft_load_and_a_bad_record_is_named() {
    let case = &mtp_cases()[0];
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a");
    let m = export_case(case, &out, Precision::Fp32).unwrap();
    let mut json: serde_json::Value = serde_json::to_value(&m).unwrap();
    json.as_object_mut().unwrap().remove("draft");
    let old = Manifest::parse(&json.to_string()).unwrap();
    assert!(old.draft.is_none());
    old.check(Path::new("manifest.json")).unwrap();

    let mut bad = m.clone();
    bad.draft.as_mut().unwrap().hidden_state_output = "hidden".into();
    let e = bad.check(Path::new("manifest.json")).unwrap_err().to_string();
    assert!(e.contains("`hidden`") && e.contains("not an output of the main graph"), "{e}");
    let mut bad = m.clone();
    bad.files.remove(names::MTP_FILE);
    let e = bad.check(Path::new("manifest.json")).unwrap_err().to_string();
    assert!(e.contains("draft.graph `mtp.onnx` is not listed in files"), "{e}");
    let mut bad = m;
    bad.draft.as_mut().unwrap().kv_cache.dtype = DType::Float16;
    let e = bad.check(Path::new("manifest.json")).unwrap_err().to_string();
    assert!(e.contains("draft.kv_cache.bytes_per_token"), "{e}");
}

/// The checkpoint of `case` with one tensor removed, in `dir`.
fn checkpoint_without(case: &Path, dir: &Path, drop: &str) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(case.join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(case.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| n != drop).collect();
    assert!(kept.len() + 1 == st.len(), "{drop} is not in {case:?}");
    safetensors::serialize_to_file(kept, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn a_missing_mtp_tensor_is_named_before_anything_is_written_and_no_draft_skips_the_module() {
    let case = mtp_cases().into_iter().find(|c| c.to_string_lossy().contains("qlora")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let missing = "model.layers.3.self_attn.kv_b_proj.weight";
    let ck = tmp.path().join("ck");
    checkpoint_without(&case, &ck, missing);
    let out = tmp.path().join("out");
    let e = export(&ExportOptions::new(&ck, &out), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains(missing) && e.contains("num_nextn_predict_layers = 1") && e.contains("--no-draft"), "{e}");
    assert!(!out.exists(), "a failed export leaves nothing behind");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1, "no temporary directory is left either");

    let opts = ExportOptions { draft: false, ..ExportOptions::new(&ck, &out) };
    let m = export(&opts, &mut |_| {}).unwrap();
    assert!(m.draft.is_none());
    assert!(!out.join(names::MTP_FILE).exists() && !m.files.contains_key(names::MTP_FILE));
    assert!(!m.outputs.iter().any(|o| o.name == names::LAST_HIDDEN_STATE), "{:?}", m.outputs);
    let notes = m.source.notes.join("\n");
    assert!(notes.contains("skipped the multi-token-prediction module model.layers.3 (--no-draft)"), "{notes}");
}

/// A weight-only quantized export keeps the draft: its fp32 files move from the staging export into the artifact,
/// are listed with their hashes, and match the fp32 export's byte for byte.
#[test]
fn a_weight_only_export_carries_the_fp32_draft_graph() {
    use r1_export::quantize::{export_quantized, QuantizeOptions};
    let case = &mtp_cases()[0];
    let tmp = tempfile::tempdir().unwrap();
    let fp32 = export_case(case, &tmp.path().join("fp32"), Precision::Fp32).unwrap();
    let out = tmp.path().join("int8");
    let q = QuantizeOptions::new(Precision::Int8WeightOnly);
    let (m, _) = export_quantized(&ExportOptions::new(case, &out), &q, &mut |_| {}).unwrap();
    assert_eq!(m.draft, fp32.draft, "the draft record is the fp32 export's");
    for f in [names::MTP_FILE, names::MTP_DATA_FILE] {
        assert_eq!(m.files.get(f), fp32.files.get(f), "{f}");
    }
    let report = m.verify_files(&out).unwrap();
    assert!(report.unlisted.is_empty() && report.files == m.files.len(), "{report:?}");
    assert!(out.join(names::MTP_DATA_FILE).is_file());
}

/// The engine's plain greedy decoding of each golden prompt (real tokens only), `n` tokens.
fn plain_greedy(out: &Path, kind: BackendKind, prompts: &[Vec<i64>], n: usize) -> Vec<Vec<i64>> {
    let opts = r1_engine::EngineOptions { backend: kind, ..Default::default() };
    let mut e = r1_engine::Engine::load(out, &opts).unwrap();
    prompts
        .iter()
        .map(|p| {
            let p: Vec<u32> = p.iter().map(|&t| t as u32).collect();
            let argmax = |l: &[f32]| Ok((0..l.len()).fold(0, |b, i| if l[i] > l[b] { i } else { b }) as u32);
            e.generate_with(&p, n, &[], argmax).unwrap().into_iter().map(i64::from).collect()
        })
        .collect()
}

fn golden_prompts(case: &Path) -> Vec<Vec<i64>> {
    let g = r1_tests::Golden::load(case).unwrap();
    r1_tests::golden_prompts(&g).into_iter().map(|p| p.into_iter().map(i64::from).collect()).collect()
}

/// Knows the greedy continuation `seq` (prompt + plain greedy tokens) and guesses the token after the next one
/// right when `right(call)` says so, else a wrong token; checks on every call that the loop pairs each position
/// with the token after it and passes one hidden state per token.
struct Oracle {
    seq: Vec<i64>,
    vocab: i64,
    calls: usize,
    fed: usize,
    right: fn(usize) -> bool,
}

impl Drafter for Oracle {
    fn draft(&mut self, ids: &[i64], start: usize, hidden: ndarray::ArrayView3<f32>) -> r1_engine::Result<i64> {
        assert_eq!(start, self.fed, "draft positions are given once each, in order");
        assert_eq!(hidden.dim().1, ids.len());
        assert_eq!(ids, &self.seq[start + 1..start + 1 + ids.len()], "position i pairs with the token after i");
        self.fed += ids.len();
        let last = start + ids.len() - 1;
        let truth = self.seq.get(last + 2).copied().unwrap_or(0);
        self.calls += 1;
        Ok(if (self.right)(self.calls) { truth } else { (truth + 1) % self.vocab })
    }
}

#[test]
fn self_speculative_greedy_emits_the_engines_greedy_tokens_on_ort_and_tract() {
    const N: usize = 12;
    let tmp = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for case in mtp_cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let out = tmp.path().join(&name);
        let m = export_case(&case, &out, Precision::Fp32).unwrap();
        let prompts = golden_prompts(&case);
        for kind in [BackendKind::Ort, BackendKind::Tract] {
            let plain = plain_greedy(&out, kind, &prompts, N);
            let mut main = backend::load(&out, &m, kind, &BackendOptions::default()).unwrap();
            for (prompt, want) in prompts.iter().zip(&plain) {
                let model = DraftModel::open(&out, &m, kind).unwrap();
                let mut drafter = MtpDrafter::new(model);
                let (got, st) = speculative::greedy(main.as_mut(), &m, &mut drafter, prompt, N, &[]).unwrap();
                assert_eq!(&got, want, "{name} {kind:?}: speculative greedy with the MTP draft");
                assert_eq!(st.main_passes, st.drafted + 1, "{st:?}");
                // Each pass emits 1 + accepted tokens, except an accepted last pass cut at N after the draft's token.
                assert!((N..=N + 1).contains(&(st.drafted + st.accepted + 1)), "{st:?}");
                report.push(format!("{name} {kind:?}: MTP draft accepted {}/{}", st.accepted, st.drafted));

                let seq: Vec<i64> = prompt.iter().chain(want).copied().collect();
                let vocab = m.model.vocab_size as i64;
                for (label, right) in [
                    ("always right", (|_| true) as fn(usize) -> bool),
                    ("never right", |_| false),
                    ("right every other guess", |c| c % 2 == 0),
                ] {
                    let mut oracle = Oracle { seq: seq.clone(), vocab, calls: 0, fed: 0, right };
                    let (got, st) = speculative::greedy(main.as_mut(), &m, &mut oracle, prompt, N, &[]).unwrap();
                    assert_eq!(&got, want, "{name} {kind:?}: oracle {label}");
                    assert!((N..=N + 1).contains(&(st.drafted + st.accepted + 1)), "{label}: {st:?}");
                    match label {
                        "always right" => assert_eq!(st.accepted, st.drafted, "{st:?}"),
                        "never right" => assert_eq!((st.accepted, st.main_passes), (0, N), "{st:?}"),
                        _ => assert!(st.accepted > 0 && st.accepted < st.drafted, "{st:?}"),
                    }
                }
            }
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// A stop token ends the generation where plain greedy would (included), also when it is an accepted draft.
#[test]
fn speculative_greedy_stops_after_a_stop_token_like_plain_greedy() {
    let case = &mtp_cases()[0];
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a");
    let m = export_case(case, &out, Precision::Fp32).unwrap();
    let prompt = golden_prompts(case).remove(0);
    let plain = plain_greedy(&out, BackendKind::Ort, std::slice::from_ref(&prompt), 8).remove(0);
    let stop = plain[4];
    let upto = plain.iter().position(|&t| t == stop).unwrap() + 1;
    let mut main = backend::load(&out, &m, BackendKind::Ort, &BackendOptions::default()).unwrap();
    let seq: Vec<i64> = prompt.iter().chain(&plain).copied().collect();
    for right in [(|_| true) as fn(usize) -> bool, |_| false] {
        let mut oracle = Oracle { seq: seq.clone(), vocab: m.model.vocab_size as i64, calls: 0, fed: 0, right };
        let (got, _) = speculative::greedy(main.as_mut(), &m, &mut oracle, &prompt, 8, &[stop]).unwrap();
        assert_eq!(got, plain[..upto].to_vec());
    }
}
