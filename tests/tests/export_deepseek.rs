//! DeepseekV3 golden tests: every `tests/fixtures/golden/deepseek_v3_*` case (made by
//! `tests/fixtures/make_golden_deepseek.py` from transformers) is exported at fp32 and run on tract and on
//! ONNX Runtime: prefill of a left-padded batch, then greedy decode through the latent KV cache. Logits must
//! match transformers within 1e-4 relative (max |diff| / max |ref|) and the greedy tokens must be identical.
//! Also checks what the manifest says about the latent cache, FP8 sources and the MTP layer (the draft graph).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::{Array2, ArrayD, Axis, IxDyn};
use r1_engine::backend::{self, BackendKind, BackendOptions, KvPair, StepInput};
use r1_engine::manifest::Manifest;
use r1_export::{export, ExportOptions};

const REL_TOL: f32 = 1e-4;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden")
}

fn cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .expect("tests/fixtures/golden exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("deepseek_v3_")))
        .collect();
    v.sort();
    assert!(v.len() >= 3, "expected the DeepseekV3 golden cases, found {v:?}");
    v
}

/// Minimal safetensors reader (f32 / i64 tensors only) for golden.safetensors.
fn read_golden(path: &Path) -> HashMap<String, (Vec<usize>, Vec<u8>, String)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = HashMap::new();
    for (k, v) in header.as_object().unwrap() {
        if k == "__metadata__" {
            continue;
        }
        let shape: Vec<usize> = v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let off = &v["data_offsets"];
        let (s, e) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
        out.insert(k.clone(), (shape, data[s..e].to_vec(), v["dtype"].as_str().unwrap().to_string()));
    }
    out
}

fn f32s(t: &(Vec<usize>, Vec<u8>, String)) -> ArrayD<f32> {
    assert_eq!(t.2, "F32");
    let v: Vec<f32> = t.1.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    ArrayD::from_shape_vec(IxDyn(&t.0), v).unwrap()
}

fn i64s(t: &(Vec<usize>, Vec<u8>, String)) -> Array2<i64> {
    assert_eq!(t.2, "I64");
    let v: Vec<i64> = t.1.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    Array2::from_shape_vec((t.0[0], t.0[1]), v).unwrap()
}

fn rel_err(got: ndarray::ArrayViewD<f32>, want: ndarray::ArrayViewD<f32>) -> f32 {
    let diff = got.iter().zip(want.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    diff / scale
}

fn argmax(row: ndarray::ArrayView1<f32>) -> i64 {
    row.iter().enumerate().fold((0usize, f32::MIN), |a, (i, v)| if *v > a.1 { (i, *v) } else { a }).0 as i64
}

/// Runs one case on one backend; returns the worst relative error.
fn run_case(case: &Path, art: &Path, manifest: &Manifest, kind: BackendKind) -> f32 {
    let g = read_golden(&case.join("golden.safetensors"));
    let mut be = backend::load(art, manifest, kind, &BackendOptions::default()).unwrap();
    let ids = i64s(&g["input_ids"]);
    let mut mask = i64s(&g["attention_mask"]);
    let pos = i64s(&g["position_ids"]);
    let kv = &manifest.kv_cache;
    let b = ids.nrows();
    let past: Vec<KvPair> = (0..kv.num_layers)
        .map(|_| KvPair {
            key: ArrayD::zeros(IxDyn(&[b, kv.key_heads, 0, kv.key_dim])),
            value: ArrayD::zeros(IxDyn(&[b, kv.value_heads, 0, kv.value_dim])),
        })
        .collect();
    let out = be
        .run(&StepInput { input_ids: ids.clone(), attention_mask: mask.clone(), position_ids: pos.clone(), past })
        .unwrap();
    let want = f32s(&g["prefill_logits"]);
    let mut worst = 0f32;
    // compare real (unpadded) positions only
    for r in 0..b {
        for s in 0..ids.ncols() {
            if mask[[r, s]] == 1 {
                let e = rel_err(
                    out.logits.slice(ndarray::s![r, s, ..]).into_dyn(),
                    want.slice(ndarray::s![r, s, ..]).into_dyn(),
                );
                worst = worst.max(e);
            }
        }
    }
    let tokens = i64s(&g["decode_input_ids"]);
    let want_steps = f32s(&g["decode_logits"]);
    let last = ids.ncols() - 1;
    for r in 0..b {
        assert_eq!(
            argmax(out.logits.slice(ndarray::s![r, last, ..])),
            tokens[[r, 0]],
            "{case:?} prefill greedy row {r}"
        );
    }
    let mut present = out.present;
    let mut cur_pos = pos.column(last).to_owned();
    for t in 0..tokens.ncols() {
        let grown = ndarray::concatenate(Axis(1), &[mask.view(), Array2::ones((b, 1)).view()]).unwrap();
        mask = Array2::from_shape_vec(grown.dim(), grown.iter().copied().collect()).unwrap();
        cur_pos += 1;
        let step = StepInput {
            // Inputs are built from fresh vectors: the ort backend needs plain row-major strides.
            input_ids: Array2::from_shape_vec((b, 1), tokens.column(t).to_vec()).unwrap(),
            attention_mask: mask.clone(),
            position_ids: Array2::from_shape_vec((b, 1), cur_pos.to_vec()).unwrap(),
            // Fed back as standard-layout arrays (the ort backend refuses strided ones).
            past: present
                .into_iter()
                .map(|p| KvPair {
                    key: p.key.as_standard_layout().to_owned(),
                    value: p.value.as_standard_layout().to_owned(),
                })
                .collect(),
        };
        let o = be.run(&step).unwrap();
        let want_t = want_steps.index_axis(Axis(1), t);
        worst = worst.max(rel_err(o.logits.index_axis(Axis(1), 0).into_dyn(), want_t.view()));
        for r in 0..b {
            let got = argmax(o.logits.slice(ndarray::s![r, 0, ..]));
            let expect = argmax(want_t.slice(ndarray::s![r, ..]).into_dimensionality().unwrap());
            assert_eq!(got, expect, "{case:?} {kind:?} decode step {t} row {r}");
            if t + 1 < tokens.ncols() {
                assert_eq!(got, tokens[[r, t + 1]], "{case:?} {kind:?} greedy token at step {t} row {r}");
            }
        }
        present = o.present;
    }
    assert_eq!(present[0].key.shape()[2], ids.ncols() + tokens.ncols(), "latent cache length");
    worst
}

#[test]
fn deepseek_v3_golden_cases_match_transformers_on_tract_and_ort() {
    for case in cases() {
        let tmp = tempfile::tempdir().unwrap();
        let art = tmp.path().join("artifact");
        let manifest = export(&ExportOptions::new(&case, &art), &mut |_| {}).unwrap();
        assert_eq!(manifest.family, r1_engine::manifest::Family::DeepseekV3);
        let kv = &manifest.kv_cache;
        let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(case.join("config.json")).unwrap()).unwrap();
        assert_eq!(kv.layout, "mla_latent");
        assert_eq!((kv.key_heads, kv.key_dim), (1, cfg["kv_lora_rank"].as_u64().unwrap() as usize));
        assert_eq!((kv.value_heads, kv.value_dim), (1, cfg["qk_rope_head_dim"].as_u64().unwrap() as usize));
        let notes = manifest.source.notes.join("\n");
        // The MTP layer is the draft graph (tests/tests/golden_mtp.rs checks its numbers).
        let nextn = cfg["num_nextn_predict_layers"].as_u64().unwrap_or(0);
        assert_eq!(manifest.draft.is_some(), nextn > 0, "draft record for {case:?}");
        let fp8 = cfg.get("quantization_config").is_some();
        assert_eq!(manifest.source.fp8_block_quantized, fp8, "source.fp8_block_quantized for {case:?}");
        if fp8 {
            assert!(notes.contains("FP8"), "{notes}");
            assert_eq!(manifest.source.dtype, "fp8_e4m3", "source dtype counts bytes, not tensors");
        }
        for kind in [BackendKind::Tract, BackendKind::Ort] {
            let worst = run_case(&case, &art, &manifest, kind);
            println!(
                "{} {kind:?}: worst relative logit error {worst:.2e}",
                case.file_name().unwrap().to_string_lossy()
            );
            assert!(worst <= REL_TOL, "{case:?} on {kind:?}: relative error {worst} > {REL_TOL}");
        }
    }
}

#[test]
fn fp8_weight_without_quantization_config_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let src = golden_dir().join("deepseek_v3_fp8_block");
    let ck = tmp.path().join("ck");
    std::fs::create_dir(&ck).unwrap();
    for f in ["model.safetensors", "generation_config.json"] {
        std::fs::copy(src.join(f), ck.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(ck.join("config.json"), cfg.to_string()).unwrap();
    let err = export(&ExportOptions::new(&ck, tmp.path().join("out")), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("F8_E4M3") && err.contains("quantization_config"), "{err}");
    assert!(!tmp.path().join("out").exists(), "a failed export must not leave an artifact");
}
