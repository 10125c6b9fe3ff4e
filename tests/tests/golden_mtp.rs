//! The draft graph (`mtp.onnx`: DeepseekV3's multi-token-prediction module, `manifest.draft`) against the PyTorch
//! reference of `tests/fixtures/make_golden_deepseek.py` (`mtp.safetensors` of each golden case with an MTP layer;
//! the module's decoder layer is transformers' own). On ONNX Runtime and tract, fp32, relative error ≤ 1e-4:
//! - the main graph's `last_hidden_state` (before the final norm) over the whole golden sequence;
//! - the draft's logits and `last_hidden_state`, run as a prefill of the prompt positions and then one position at a
//!   time through its own latent cache (the reference runs the whole sequence at once, without a cache).
//!
//! Also: the manifest record round-trips and an older manifest without it loads; a checkpoint whose MTP module
//! lacks a tensor fails before anything is written, naming the tensor; `--no-draft` exports without the module.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ndarray::{s, Array2, Array3, ArrayD, Axis, IxDyn};
use r1_engine::backend::{self, BackendKind, BackendOptions, StepInput};
use r1_engine::manifest::{names, DType, DraftGraph, Manifest};
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

/// One draft step's feeds, by graph input name.
enum Feed {
    Int(Array2<i64>),
    Float(ArrayD<f32>),
}

/// Runs the draft graph file on one runtime; returns the named outputs.
trait DraftRunner {
    fn run(&mut self, feeds: &[(String, Feed)], outputs: &[&str]) -> Result<Vec<ArrayD<f32>>>;
}

struct OrtDraft(ort::session::Session);

impl DraftRunner for OrtDraft {
    fn run(&mut self, feeds: &[(String, Feed)], outputs: &[&str]) -> Result<Vec<ArrayD<f32>>> {
        use ort::session::SessionInputValue;
        use ort::value::Tensor;
        let mut inputs: Vec<(String, SessionInputValue)> = Vec::new();
        for (name, f) in feeds {
            let v: SessionInputValue = match f {
                Feed::Int(a) => Tensor::from_array(a.clone())?.into(),
                Feed::Float(a) => Tensor::from_array(a.clone())?.into(),
            };
            inputs.push((name.clone(), v));
        }
        let out = self.0.run(inputs)?;
        outputs
            .iter()
            .map(|n| Ok(out.get(n).with_context(|| format!("no output `{n}`"))?.try_extract_array::<f32>()?.to_owned()))
            .collect()
    }
}

struct TractDraft {
    plan: std::sync::Arc<tract_onnx::prelude::TypedSimplePlan>,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

impl TractDraft {
    fn open(path: &Path) -> Result<TractDraft> {
        use tract_onnx::prelude::*;
        let typed = tract_onnx::onnx().model_for_path(path)?.into_optimized()?;
        let inputs = typed.input_outlets()?.iter().map(|o| typed.node(o.node).name.clone()).collect::<Vec<String>>();
        let outputs = typed
            .output_outlets()?
            .iter()
            .map(|o| typed.outlet_label(*o).map(str::to_string).unwrap_or_else(|| typed.node(o.node).name.clone()))
            .collect();
        Ok(TractDraft { plan: typed.into_runnable()?, inputs, outputs })
    }
}

impl DraftRunner for TractDraft {
    fn run(&mut self, feeds: &[(String, Feed)], outputs: &[&str]) -> Result<Vec<ArrayD<f32>>> {
        use tract_onnx::prelude::*;
        let mut values: TVec<TValue> = tvec![];
        for name in &self.inputs {
            let (_, f) = feeds.iter().find(|(n, _)| n == name).with_context(|| format!("no feed for `{name}`"))?;
            values.push(match f {
                Feed::Int(a) => Tensor::from(a.clone().into_dyn()).into_tvalue(),
                Feed::Float(a) => Tensor::from(a.clone()).into_tvalue(),
            });
        }
        let out = self.plan.run(values)?;
        outputs
            .iter()
            .map(|n| {
                let at = self.outputs.iter().position(|x| x == n).with_context(|| format!("no output `{n}`"))?;
                Ok(out[at].to_plain_array_view::<f32>()?.to_owned())
            })
            .collect()
    }
}

fn to3(a: ArrayD<f32>) -> Result<Array3<f32>> {
    Ok(a.into_dimensionality()?)
}

/// Prefill of positions `0..P`, then one position at a time through the draft's cache; the worst relative error of
/// the logits and of `last_hidden_state` against the reference (real positions only).
fn run_draft(runner: &mut dyn DraftRunner, d: &DraftGraph, r: &MtpRef) -> Result<(f32, f32)> {
    let (b, t) = r.input_ids.dim();
    let kv = &d.kv_cache;
    let mut past_k = ArrayD::<f32>::zeros(IxDyn(&[b, kv.key_heads, 0, kv.key_dim]));
    let mut past_v = ArrayD::<f32>::zeros(IxDyn(&[b, kv.value_heads, 0, kv.value_dim]));
    let (mut worst_logits, mut worst_hidden) = (0f32, 0f32);
    let mut start = 0;
    for end in std::iter::once(r.prompt).chain(r.prompt + 1..=t) {
        let feeds = vec![
            (names::INPUT_IDS.to_string(), Feed::Int(r.draft_ids.slice(s![.., start..end]).to_owned())),
            (names::ATTENTION_MASK.to_string(), Feed::Int(r.attention_mask.slice(s![.., ..end]).to_owned())),
            (names::POSITION_IDS.to_string(), Feed::Int(r.position_ids.slice(s![.., start..end]).to_owned())),
            (
                names::HIDDEN_STATES.to_string(),
                Feed::Float(r.hidden.slice(s![.., start..end, ..]).to_owned().into_dyn()),
            ),
            (names::past_key(0), Feed::Float(past_k.clone())),
            (names::past_value(0), Feed::Float(past_v.clone())),
        ];
        let want = [names::LOGITS, names::LAST_HIDDEN_STATE, "present.0.key", "present.0.value"];
        let mut out = runner.run(&feeds, &want)?.into_iter();
        let (logits, hidden) = (to3(out.next().unwrap())?, to3(out.next().unwrap())?);
        past_k = out.next().unwrap();
        past_v = out.next().unwrap();
        let real = |row: usize, pos: usize| r.attention_mask[[row, start + pos]] == 1;
        let want_logits = r.draft_logits.slice(s![.., start..end, ..]).to_owned();
        let want_hidden = r.draft_hidden.slice(s![.., start..end, ..]).to_owned();
        worst_logits = worst_logits.max(rel_err(&logits, &want_logits, real)?);
        worst_hidden = worst_hidden.max(rel_err(&hidden, &want_hidden, real)?);
        assert_eq!(past_k.len_of(Axis(2)), end, "the draft's cache holds every position fed");
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
        let env = r1_engine::host::environment().unwrap();
        let session = ort::session::Session::builder(env).unwrap().commit_from_file(out.join(&d.graph)).unwrap();
        let runners: Vec<(&str, Box<dyn DraftRunner>)> = vec![
            ("ort", Box::new(OrtDraft(session))),
            ("tract", Box::new(TractDraft::open(&out.join(&d.graph)).unwrap())),
        ];
        for (runtime, mut runner) in runners {
            let (logits, hidden) = run_draft(runner.as_mut(), &d, &r).unwrap();
            eprintln!("{name} {runtime}: draft logits rel err {logits:.2e}, draft last_hidden_state {hidden:.2e}");
            if logits.is_nan() || hidden.is_nan() || logits.max(hidden) > TOLERANCE {
                failures.push(format!("{name} {runtime}: draft rel err logits {logits:.3e}, hidden {hidden:.3e}"));
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
