//! Shared helpers for the cross-crate integration tests in `tests/tests/`: locating and reading the
//! golden cases (format: `tests/fixtures/golden/README.md`), exporting them, running steps through
//! an engine backend, and comparing logits.

use std::path::{Path, PathBuf};

pub mod attention_graph;

use anyhow::{bail, Context, Result};
use ndarray::{s, Array2, Array3, ArrayD, IxDyn};
use r1_engine::backend::{Backend, KvPair, StepInput, StepOutput};
use r1_engine::manifest::Manifest;
use r1_engine::{Engine, StepWork};
use r1_export::{export, ExportOptions, Precision};

/// `tests/fixtures/golden`.
pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join("golden")
}

/// Every case directory (one holding `golden.safetensors`), sorted by name.
pub fn golden_cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .map(|d| {
            d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.join("golden.safetensors").is_file()).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The reference of one case.
#[derive(Debug, Clone)]
pub struct Golden {
    /// `[B, P]` left-padded prompts.
    pub input_ids: Array2<i64>,
    /// `[B, P]`.
    pub attention_mask: Array2<i64>,
    /// `[B, P]`.
    pub position_ids: Array2<i64>,
    /// `[B, P, V]`.
    pub prefill_logits: Array3<f32>,
    /// `[B, N]` tokens fed at each decode step.
    pub decode_input_ids: Array2<i64>,
    /// `[B, N, V]`.
    pub decode_logits: Array3<f32>,
}

fn tensor<'a>(st: &'a safetensors::SafeTensors, name: &str, path: &Path) -> Result<(Vec<usize>, &'a [u8])> {
    let t = st.tensor(name).with_context(|| format!("{}: tensor `{name}`", path.display()))?;
    Ok((t.shape().to_vec(), t.data()))
}

fn i64_2d(st: &safetensors::SafeTensors, name: &str, path: &Path) -> Result<Array2<i64>> {
    let (shape, data) = tensor(st, name, path)?;
    let v: Vec<i64> = data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
    Ok(Array2::from_shape_vec((shape[0], shape[1]), v)?)
}

fn f32_3d(st: &safetensors::SafeTensors, name: &str, path: &Path) -> Result<Array3<f32>> {
    let (shape, data) = tensor(st, name, path)?;
    let v: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4]))).collect();
    Ok(Array3::from_shape_vec((shape[0], shape[1], shape[2]), v)?)
}

impl Golden {
    /// Reads `case/golden.safetensors`: the reference at positions from 0.
    pub fn load(case: &Path) -> Result<Golden> {
        Golden::load_with(case, "")?.with_context(|| format!("{}: no reference", case.display()))
    }

    /// The far-position reference of `case` (`far_*` tensors: the same prompts with positions starting at
    /// golden.json's `far_position_start`), when the case has one.
    pub fn load_far(case: &Path) -> Result<Option<Golden>> {
        Golden::load_with(case, "far_")
    }

    /// Every reference of `case`, labelled: `""` (positions from 0) and, when the case has one, `"far <start>"`.
    pub fn load_all(case: &Path) -> Result<Vec<(String, Golden)>> {
        let mut all = vec![(String::new(), Golden::load(case)?)];
        if let Some(far) = Golden::load_far(case)? {
            all.push((format!("far {}", far.position_ids.iter().min().copied().unwrap_or(0)), far));
        }
        Ok(all)
    }

    /// The prompts (`input_ids`, `attention_mask`) and the reference tensors named `{prefix}...`; `None` when the
    /// file has no `{prefix}position_ids`.
    fn load_with(case: &Path, prefix: &str) -> Result<Option<Golden>> {
        let path = case.join("golden.safetensors");
        let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
        let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| path.display().to_string())?;
        if st.tensor(&format!("{prefix}position_ids")).is_err() {
            return Ok(None);
        }
        let name = |n: &str| format!("{prefix}{n}");
        Ok(Some(Golden {
            input_ids: i64_2d(&st, "input_ids", &path)?,
            attention_mask: i64_2d(&st, "attention_mask", &path)?,
            position_ids: i64_2d(&st, &name("position_ids"), &path)?,
            prefill_logits: f32_3d(&st, &name("prefill_logits"), &path)?,
            decode_input_ids: i64_2d(&st, &name("decode_input_ids"), &path)?,
            decode_logits: f32_3d(&st, &name("decode_logits"), &path)?,
        }))
    }
}

/// `case/golden.json` (provenance: family, release config, scaled sizes, far-position start, ...).
pub fn golden_meta(case: &Path) -> Result<serde_json::Value> {
    let path = case.join("golden.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    serde_json::from_str(&text).with_context(|| path.display().to_string())
}

/// Exports `case` into `out` (which must not exist) at `precision`.
pub fn export_case(case: &Path, out: &Path, precision: Precision) -> Result<Manifest> {
    let mut opts = ExportOptions::new(case, out);
    opts.precision = precision;
    export(&opts, &mut |_| {}).with_context(|| format!("exporting {}", case.display()))
}

/// An empty cache (`past_sequence = 0`) for `batch` rows, shaped from the manifest.
pub fn empty_past(m: &Manifest, batch: usize) -> Vec<KvPair> {
    let kv = &m.kv_cache;
    (0..kv.num_layers)
        .map(|_| KvPair {
            key: ArrayD::zeros(IxDyn(&[batch, kv.key_heads, 0, kv.key_dim])),
            value: ArrayD::zeros(IxDyn(&[batch, kv.value_heads, 0, kv.value_dim])),
        })
        .collect()
}

/// `max |got - want| / max |want|` over the rows/positions where `keep` is true.
pub fn rel_err(got: &Array3<f32>, want: &Array3<f32>, keep: impl Fn(usize, usize) -> bool) -> Result<f32> {
    if got.shape() != want.shape() {
        bail!("logits shape {:?}, reference {:?}", got.shape(), want.shape());
    }
    let (mut num, mut den) = (0f32, 0f32);
    for b in 0..want.shape()[0] {
        for t in 0..want.shape()[1] {
            if !keep(b, t) {
                continue;
            }
            for (g, w) in got.slice(s![b, t, ..]).iter().zip(want.slice(s![b, t, ..]).iter()) {
                if !g.is_finite() {
                    bail!("non-finite logit at batch {b}, position {t}");
                }
                num = num.max((g - w).abs());
                den = den.max(w.abs());
            }
        }
    }
    Ok(if den > 0.0 { num / den } else { num })
}

/// Index of the largest value of the last position of each row.
pub fn argmax_last(logits: &Array3<f32>) -> Vec<i64> {
    let last = logits.shape()[1] - 1;
    (0..logits.shape()[0])
        .map(|b| {
            let row = logits.slice(s![b, last, ..]);
            let mut best = 0usize;
            for (i, v) in row.iter().enumerate() {
                if *v > row[best] {
                    best = i;
                }
            }
            best as i64
        })
        .collect()
}

/// Result of running a golden case on one backend.
#[derive(Debug, Clone)]
pub struct CaseRun {
    /// Worst relative logit error over prefill (real positions) and all decode steps.
    pub max_rel_err: f32,
    /// Greedy tokens the backend chose at each decode step, `[B][N]`.
    pub tokens: Vec<Vec<i64>>,
}

/// Prefill + greedy decode of a golden case through `backend`. The backend's own argmax is fed back.
pub fn run_golden(backend: &mut dyn Backend, m: &Manifest, g: &Golden) -> Result<CaseRun> {
    let (b, _p) = g.input_ids.dim();
    let out: StepOutput = backend
        .run(&StepInput {
            input_ids: g.input_ids.clone(),
            attention_mask: g.attention_mask.clone(),
            position_ids: g.position_ids.clone(),
            past: empty_past(m, b),
        })
        .context("prefill")?;
    let mask = &g.attention_mask;
    let mut err = rel_err(&out.logits, &g.prefill_logits, |r, t| mask[[r, t]] == 1)?;
    let mut tokens = vec![Vec::new(); b];
    let mut tok = argmax_last(&out.logits);
    let mut past = out.present;
    let mut am = g.attention_mask.clone();
    let mut pos: Vec<i64> = (0..b).map(|r| g.position_ids[[r, g.position_ids.ncols() - 1]]).collect();
    for k in 0..g.decode_input_ids.ncols() {
        for r in 0..b {
            tokens[r].push(tok[r]);
        }
        let mut next = Array2::<i64>::ones((b, am.ncols() + 1));
        next.slice_mut(s![.., ..am.ncols()]).assign(&am);
        am = next;
        for p in pos.iter_mut() {
            *p += 1;
        }
        let out = backend
            .run(&StepInput {
                input_ids: Array2::from_shape_vec((b, 1), tok.clone())?,
                attention_mask: am.clone(),
                position_ids: Array2::from_shape_vec((b, 1), pos.clone())?,
                past,
            })
            .with_context(|| format!("decode step {k}"))?;
        let want = g.decode_logits.slice(s![.., k..k + 1, ..]).to_owned();
        err = err.max(rel_err(&out.logits, &want, |_, _| true)?);
        tok = argmax_last(&out.logits);
        past = out.present;
    }
    Ok(CaseRun { max_rel_err: err, tokens })
}

/// Expected greedy tokens of a case, `[B][N]`.
pub fn golden_tokens(g: &Golden) -> Vec<Vec<i64>> {
    g.decode_input_ids.outer_iter().map(|r| r.to_vec()).collect()
}

/// The golden batch's prompts, one per row: the token ids its attention mask marks real (the golden files pad on
/// the left).
pub fn golden_prompts(g: &Golden) -> Vec<Vec<u32>> {
    let (b, p) = g.input_ids.dim();
    (0..b)
        .map(|r| (0..p).filter(|&t| g.attention_mask[[r, t]] == 1).map(|t| g.input_ids[[r, t]] as u32).collect())
        .collect()
}

/// Teacher-forces every row of `g` through the engine (a serving graph that returns each row's last position);
/// row 0 is fed `chunk` prompt tokens per step (`None`: all at once) while the other rows move on. Returns the worst relative error against the reference logits and the rows
/// whose greedy token differs from the reference's next token, as `(row, step)`.
pub fn drive_engine(e: &mut Engine, g: &Golden, chunk: Option<usize>) -> (f32, Vec<(usize, usize)>) {
    let (b, p) = g.input_ids.dim();
    let n = g.decode_input_ids.ncols();
    let seqs: Vec<_> = golden_prompts(g).iter().map(|prompt| e.add_sequence(prompt, n + 1).unwrap()).collect();
    let mut next = vec![0usize; b];
    let (mut err, mut wrong) = (0f32, Vec::new());
    while next.iter().any(|&k| k <= n) {
        let work: Vec<StepWork> = (0..b)
            .filter(|&r| next[r] <= n)
            .map(|r| match chunk {
                Some(c) if r == 0 => StepWork::chunk(seqs[r], c),
                _ => StepWork::all(seqs[r]),
            })
            .collect();
        for res in e.step(&work).unwrap() {
            let r = seqs.iter().position(|s| *s == res.seq).unwrap();
            let k = next[r];
            let want =
                if k == 0 { g.prefill_logits.slice(s![r, p - 1, ..]) } else { g.decode_logits.slice(s![r, k - 1, ..]) };
            let got = Array3::from_shape_vec((1, 1, res.logits.len()), res.logits.clone()).unwrap();
            let want = want.to_owned().into_shape_with_order((1, 1, got.len())).unwrap();
            err = err.max(rel_err(&got, &want, |_, _| true).unwrap());
            if k < n {
                let token = g.decode_input_ids[[r, k]];
                if r1_engine::generate::argmax(&res.logits) as i64 != token {
                    wrong.push((r, k));
                }
                e.push_token(res.seq, token as u32).unwrap();
            }
            next[r] += 1;
        }
    }
    for s in seqs {
        e.remove_sequence(s);
    }
    (err, wrong)
}

/// Adds `prompts` as sequences of up to 8 new tokens, prefills them in one step, then runs `decode_steps` greedy
/// decode steps of all of them together and returns the KV-pool bytes each decode step copied
/// (`KvPool::copied_bytes`): zero for a backend that steps the pool in place.
pub fn decode_copied_bytes(e: &mut Engine, prompts: &[Vec<u32>], decode_steps: usize) -> Vec<u64> {
    let ids: Vec<_> = prompts.iter().map(|p| e.add_sequence(p, 8).expect("add")).collect();
    let work: Vec<_> = ids.iter().map(|&id| StepWork::all(id)).collect();
    for r in e.step(&work).expect("prefill") {
        e.push_token(r.seq, r1_engine::generate::argmax(&r.logits)).expect("push");
    }
    (0..decode_steps)
        .map(|_| {
            let before = e.kv_pool().copied_bytes();
            for r in e.step(&work).expect("decode") {
                e.push_token(r.seq, r1_engine::generate::argmax(&r.logits)).expect("push");
            }
            e.kv_pool().copied_bytes() - before
        })
        .collect()
}

/// Five prompts of different lengths (7, 2, 11, 1 and 5 tokens) of ids below `vocab`: a ragged batch for the
/// batched-equals-single checks.
pub fn ragged_prompts(vocab: u32) -> Vec<Vec<u32>> {
    [7usize, 2, 11, 1, 5]
        .iter()
        .enumerate()
        .map(|(k, &n)| (0..n as u32).map(|i| (i * 31 + k as u32 * 17 + 3) % vocab).collect())
        .collect()
}
