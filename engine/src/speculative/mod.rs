//! Self-speculative greedy decoding with the artifact's draft graph (`manifest.draft`: DeepSeek-R1's
//! multi-token-prediction module), one sequence, on a [`Backend`] running the portable `model.onnx`.
//!
//! Each main pass verifies one drafted token:
//! ```text
//! state: the main cache holds positions 0..n-1; `t` (emitted, position n) is not fed yet; `d` = the draft's guess
//!        of the token after t; the draft cache holds positions 0..n-1 too (draft position i pairs the main hidden
//!        state at i with the token at i+1, so its position n-1 already used t).
//! main pass: feed [t, d] at positions n, n+1 → a = argmax at n (the true token after t)
//!   a == d: accept; b = argmax at n+1 is the token after d. Emit d, b. Both positions stay cached.
//!           draft pass: [d, b] with the main hidden states at n, n+1 → the next guess.
//!   a != d: emit a; drop position n+1 from the main cache (d was wrong).
//!           draft pass: [a] with the main hidden state at n → the next guess.
//! ```
//! Every emitted token is the argmax of main-graph logits computed on exactly the tokens plain greedy decoding
//! would have fed, so the output is plain greedy's (up to floating-point differences between a one-token and a
//! two-token pass; `tests/tests/golden_mtp.rs` checks identity against [`crate::engine::Engine`]'s own greedy
//! decoding). A pass emits one or two tokens; [`SpeculativeStats`] counts how often the draft was right.
//!
//! Not yet wired into [`crate::engine::Engine::step`], the KV pool or the server: the caches here live on the
//! host, and the `--target cpu` serving graph (logits of the last position only) is refused.

pub mod draft;

use ndarray::{s, Array2, Array3, ArrayD, ArrayView3, Axis};

pub use draft::{DraftInput, DraftModel, DraftOutput};

use crate::backend::{Backend, KvPair, StepInput};
use crate::error::{EngineError, Result};
use crate::manifest::{names, Manifest};

/// What guesses the token after the main graph's next one. [`MtpDrafter`] is the artifact's draft graph; tests
/// give oracles that guess right or wrong on purpose.
pub trait Drafter {
    /// The draft's new positions `start..start + ids.len()`: `ids[j]` is the token *after* position `start + j`,
    /// `hidden` (`[1, ids.len(), hidden]`) the main graph's `last_hidden_state` at those positions. Returns the
    /// guess of the token after the last of `ids`. Positions before `start` were given by earlier calls.
    fn draft(&mut self, ids: &[i64], start: usize, hidden: ArrayView3<f32>) -> Result<i64>;
}

/// [`Drafter`] over the draft graph, holding its cache (one sequence).
pub struct MtpDrafter {
    model: DraftModel,
    cache: KvPair,
}

impl MtpDrafter {
    /// A drafter starting with an empty cache.
    pub fn new(model: DraftModel) -> MtpDrafter {
        let cache = model.empty_cache(1);
        MtpDrafter { model, cache }
    }
}

impl Drafter for MtpDrafter {
    fn draft(&mut self, ids: &[i64], start: usize, hidden: ArrayView3<f32>) -> Result<i64> {
        let n = ids.len();
        if self.cache.key.len_of(Axis(2)) != start {
            return Err(EngineError::InvalidArgument {
                name: "start".into(),
                message: format!(
                    "the draft cache holds {} positions, got start {start}",
                    self.cache.key.len_of(Axis(2))
                ),
            });
        }
        let out = self.model.run(&DraftInput {
            input_ids: Array2::from_shape_vec((1, n), ids.to_vec()).map_err(shape_err)?,
            attention_mask: Array2::ones((1, start + n)),
            position_ids: Array2::from_shape_fn((1, n), |(_, j)| (start + j) as i64),
            hidden_states: hidden.to_owned(),
            past: &self.cache,
        })?;
        self.cache = out.present;
        Ok(argmax(out.logits.index_axis(Axis(0), 0).row(n - 1)))
    }
}

/// How a speculative generation went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpeculativeStats {
    /// Main-graph passes, the prefill included.
    pub main_passes: usize,
    /// Tokens the draft guessed and the main graph checked.
    pub drafted: usize,
    /// Of those, the ones the main graph agreed with (each saved one main pass).
    pub accepted: usize,
}

/// One main pass's outputs: logits `[1, s, vocab]`, hidden states `[1, s, hidden]`, the cache.
struct MainOut {
    logits: Array3<f32>,
    hidden: Array3<f32>,
    cache: Vec<KvPair>,
}

fn argmax(row: ndarray::ArrayView1<f32>) -> i64 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as i64
}

/// Greedy decoding of `prompt` (token ids) for up to `max_new_tokens`, stopping after a token of `stop_ids`
/// (included), with `draft` guessing one token ahead of every main pass (module docs). `main` runs the artifact's
/// portable graph, which must output the draft's `hidden_state_output` (`last_hidden_state`: it does when the
/// artifact has a draft).
pub fn greedy(
    main: &mut dyn Backend,
    manifest: &Manifest,
    draft: &mut dyn Drafter,
    prompt: &[i64],
    max_new_tokens: usize,
    stop_ids: &[i64],
) -> Result<(Vec<i64>, SpeculativeStats)> {
    if main.last_position_logits() {
        return Err(EngineError::Unavailable {
            what: "speculative decoding on this graph".into(),
            message: "it returns the last position's logits only (the `--target cpu` serving graph); open the \
                      portable model.onnx"
                .into(),
        });
    }
    if prompt.is_empty() {
        return Err(EngineError::InvalidArgument {
            name: "prompt".into(),
            message: "must hold at least one token".into(),
        });
    }
    let layers = manifest.model.num_layers;
    let hidden_name = manifest.draft.as_ref().map_or(names::LAST_HIDDEN_STATE, |d| d.hidden_state_output.as_str());
    let mut wanted = vec![names::LOGITS.to_string(), hidden_name.to_string()];
    for i in 0..layers {
        wanted.push(names::present_key(i));
        wanted.push(names::present_value(i));
    }
    let mut run_main = |ids: &[i64], start: usize, past: Vec<KvPair>| -> Result<MainOut> {
        let n = ids.len();
        let input = StepInput {
            input_ids: Array2::from_shape_vec((1, n), ids.to_vec()).map_err(shape_err)?,
            attention_mask: Array2::ones((1, start + n)),
            position_ids: Array2::from_shape_fn((1, n), |(_, j)| (start + j) as i64),
            past,
        };
        let mut out = main.run_named(&input, &wanted)?.into_iter();
        let logits = dim3(out.next(), names::LOGITS)?;
        let hidden = dim3(out.next(), names::LAST_HIDDEN_STATE)?;
        let mut cache = Vec::with_capacity(layers);
        while let (Some(key), Some(value)) = (out.next(), out.next()) {
            cache.push(KvPair { key, value });
        }
        Ok(MainOut { logits, hidden, cache })
    };
    let mut stats = SpeculativeStats { main_passes: 1, ..Default::default() };
    let p = prompt.len();
    let empty = (0..layers)
        .map(|_| {
            let kv = &manifest.kv_cache;
            KvPair {
                key: ArrayD::zeros(ndarray::IxDyn(&[1, kv.key_heads, 0, kv.key_dim])),
                value: ArrayD::zeros(ndarray::IxDyn(&[1, kv.value_heads, 0, kv.value_dim])),
            }
        })
        .collect();
    let pre = run_main(prompt, 0, empty)?;
    let mut t = argmax(pre.logits.slice(s![0, p - 1, ..]));
    let mut out = vec![t];
    let mut main_cache = pre.cache;
    // The draft over the prompt: position i pairs h[i] with the token after i (the last: t).
    let mut next_ids: Vec<i64> = prompt[1..].to_vec();
    next_ids.push(t);
    let mut d = draft.draft(&next_ids, 0, pre.hidden.view())?;
    let mut n = p;
    while out.len() < max_new_tokens && !stop_ids.contains(&t) {
        let m = run_main(&[t, d], n, std::mem::take(&mut main_cache))?;
        stats.main_passes += 1;
        stats.drafted += 1;
        let a = argmax(m.logits.slice(s![0, 0, ..]));
        main_cache = m.cache;
        if a == d {
            stats.accepted += 1;
            let b = argmax(m.logits.slice(s![0, 1, ..]));
            out.push(d);
            if out.len() >= max_new_tokens || stop_ids.contains(&d) {
                break;
            }
            out.push(b);
            d = draft.draft(&[d, b], n, m.hidden.view())?;
            t = b;
            n += 2;
        } else {
            for kv in &mut main_cache {
                kv.key = draft::truncate(&kv.key, n + 1);
                kv.value = draft::truncate(&kv.value, n + 1);
            }
            out.push(a);
            d = draft.draft(&[a], n, m.hidden.slice(s![.., 0..1, ..]))?;
            t = a;
            n += 1;
        }
    }
    out.truncate(max_new_tokens);
    Ok((out, stats))
}

fn dim3(a: Option<ArrayD<f32>>, what: &str) -> Result<Array3<f32>> {
    let a = a.ok_or_else(|| EngineError::Backend { backend: "main", message: format!("no `{what}` output") })?;
    a.into_dimensionality().map_err(|e| EngineError::Backend { backend: "main", message: format!("`{what}`: {e}") })
}

fn shape_err(e: ndarray::ShapeError) -> EngineError {
    EngineError::Shape { name: names::INPUT_IDS.into(), expected: "[1, tokens]".into(), got: e.to_string() }
}
