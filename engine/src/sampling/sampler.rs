//! The per-sequence sampler.
//!
//! Cost on a 129k vocabulary: one validating max pass; top-k finds its threshold with a buffered partial
//! selection (O(V)); the softmax denominator skips the exponential for logits more than 40 temperatures below the
//! maximum (weight < 4e-18 each) and is taken in one pass together with the mass above bands 5, 10 and 20
//! temperatures below the max: when a band already holds `top_p` of the mass, only tokens above it become
//! candidates (the nucleus is a prefix in descending order). Top-p then sorts only as much of the candidate list
//! as the nucleus needs (chunks of 64, 256, … found with `select_nth_unstable`), so a full sort happens only for
//! a flat distribution. With top-p off, the draw makes one exp pass into a reused buffer and one scan.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{SamplingError, SamplingParams};

/// Logits this many temperatures below the maximum get weight 0 (exp(-40) ≈ 4e-18).
const NEGLIGIBLE: f32 = 40.0;
/// Bands below the max (in temperatures) tried as candidate floors for top-p.
const BANDS: [f32; 3] = [5.0, 10.0, 20.0];
/// First top-p chunk; each next chunk is 4× larger.
const FIRST_CHUNK: usize = 64;

/// A token in the final candidate set and its probability after every filter (renormalized).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Token id.
    pub id: u32,
    /// Probability of drawing it.
    pub prob: f64,
}

/// Samples one sequence's tokens. Holds the sequence's own random stream and scratch buffers.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: ChaCha8Rng,
    penalized_row: Vec<f32>,
    ids: Vec<u32>,
    kbuf: Vec<f32>,
    cand: Vec<(f32, u32)>,
    weights: Vec<f32>,
    /// How often the sampler drew each token so far (presence and frequency penalties).
    drawn: HashMap<u32, u32>,
}

/// What the filters decided for one row.
struct Plan {
    max: f32,
    inv_t: f32,
    /// Top-k threshold alone (-inf when off): the softmax denominator for top-p is taken over this set.
    top_k_floor: f32,
    /// Membership threshold from top-k and min-p (logit space).
    keep_from: f32,
    /// Below this, weight is 0 (see [`NEGLIGIBLE`]).
    negligible_below: f32,
}

impl Sampler {
    /// Validates `params` and seeds the stream from `params.seed`, or from the OS when it is `None`.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        Ok(Sampler {
            params,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            penalized_row: Vec::new(),
            ids: Vec::new(),
            kbuf: Vec::new(),
            cand: Vec::new(),
            weights: Vec::new(),
            drawn: HashMap::new(),
        })
    }

    /// The seed in use (the drawn one when none was given), so a run can be repeated.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one row of logits. `context` is every token the repetition penalty applies to
    /// (prompt and generated so far); it is ignored when `repetition_penalty` is 1. The presence and frequency
    /// penalties count the tokens this sampler drew before. Consumes exactly one random draw unless greedy.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> Result<u32, SamplingError> {
        let token = self.pick(logits, context)?;
        *self.drawn.entry(token).or_insert(0) += 1;
        Ok(token)
    }

    fn pick(&mut self, logits: &[f32], context: &[u32]) -> Result<u32, SamplingError> {
        let penalized = penalize(logits, context, &self.params, &self.drawn, &mut self.penalized_row, &mut self.ids);
        let row: &[f32] = if penalized { &self.penalized_row } else { logits };
        let (max, argmax) = scan(row)?;
        if self.params.is_greedy() {
            return Ok(argmax);
        }
        let plan = plan(row, max, &self.params, &mut self.kbuf);
        let u: f64 = self.rng.random();
        if self.params.top_p >= 1.0 {
            return Ok(draw_from_row(row, &plan, u, argmax, &mut self.weights));
        }
        nucleus(row, &plan, self.params.top_p, &mut self.cand);
        Ok(draw_from_candidates(&self.cand, &plan, u))
    }

    /// The final candidate set for a row with probabilities (sorted by id), without drawing: what
    /// [`Sampler::sample`] draws from. Greedy gives the argmax with probability 1. For tests and debugging.
    pub fn candidates(&mut self, logits: &[f32], context: &[u32]) -> Result<Vec<Candidate>, SamplingError> {
        let penalized = penalize(logits, context, &self.params, &self.drawn, &mut self.penalized_row, &mut self.ids);
        let row: &[f32] = if penalized { &self.penalized_row } else { logits };
        let (max, argmax) = scan(row)?;
        if self.params.is_greedy() {
            return Ok(vec![Candidate { id: argmax, prob: 1.0 }]);
        }
        let plan = plan(row, max, &self.params, &mut self.kbuf);
        if self.params.top_p >= 1.0 {
            self.cand.clear();
            self.cand.extend(row.iter().enumerate().filter(|(_, &l)| l >= plan.keep_from).map(|(i, &l)| (l, i as u32)));
        } else {
            nucleus(row, &plan, self.params.top_p, &mut self.cand);
        }
        let total: f64 = self.cand.iter().map(|&(l, _)| weight(l, &plan)).sum();
        let mut out: Vec<Candidate> =
            self.cand.iter().map(|&(l, id)| Candidate { id, prob: weight(l, &plan) / total }).collect();
        out.sort_by_key(|c| c.id);
        Ok(out)
    }
}

/// Applies the repetition penalty (over `context`), then the presence and frequency penalties (over the tokens
/// `drawn` so far) into `out`, a copy of `logits`; false when there is nothing to do.
fn penalize(
    logits: &[f32],
    context: &[u32],
    p: &SamplingParams,
    drawn: &HashMap<u32, u32>,
    out: &mut Vec<f32>,
    ids: &mut Vec<u32>,
) -> bool {
    let repetition = p.repetition_penalty != 1.0 && !context.is_empty();
    let additive = (p.presence_penalty != 0.0 || p.frequency_penalty != 0.0) && !drawn.is_empty();
    if !repetition && !additive {
        return false;
    }
    out.clear();
    out.extend_from_slice(logits);
    if repetition {
        ids.clear();
        ids.extend_from_slice(context);
        ids.sort_unstable();
        ids.dedup();
        let penalty = p.repetition_penalty;
        for &id in ids.iter() {
            if let Some(l) = out.get_mut(id as usize) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
    if additive {
        for (&id, &n) in drawn {
            if let Some(l) = out.get_mut(id as usize) {
                *l -= p.presence_penalty + p.frequency_penalty * n as f32;
            }
        }
    }
    true
}

/// Max and first argmax; rejects empty rows, NaN, +inf and all -inf.
fn scan(row: &[f32]) -> Result<(f32, u32), SamplingError> {
    if row.is_empty() {
        return Err(SamplingError::EmptyLogits);
    }
    let mut max = f32::NEG_INFINITY;
    let mut arg = 0usize;
    for (i, &l) in row.iter().enumerate() {
        if l > max {
            max = l;
            arg = i;
        } else if l.is_nan() {
            return Err(SamplingError::BadLogits { len: row.len(), problem: format!("NaN at index {i}") });
        }
    }
    if max == f32::INFINITY {
        return Err(SamplingError::BadLogits { len: row.len(), problem: format!("+inf at index {arg}") });
    }
    if max == f32::NEG_INFINITY {
        return Err(SamplingError::BadLogits { len: row.len(), problem: "every entry is -inf".into() });
    }
    Ok((max, arg as u32))
}

fn plan(row: &[f32], max: f32, p: &SamplingParams, kbuf: &mut Vec<f32>) -> Plan {
    let t = p.temperature;
    let k = p.top_k as usize;
    let kth = if k > 0 && k < row.len() { kth_largest(row, k, kbuf) } else { f32::NEG_INFINITY };
    let min_p = if p.min_p > 0.0 { max + t * p.min_p.ln() } else { f32::NEG_INFINITY };
    Plan { max, inv_t: 1.0 / t, top_k_floor: kth, keep_from: kth.max(min_p), negligible_below: max - NEGLIGIBLE * t }
}

fn weight(l: f32, plan: &Plan) -> f64 {
    if l < plan.negligible_below {
        0.0
    } else {
        f64::from(((l - plan.max) * plan.inv_t).exp())
    }
}

/// The k-th largest finite value, or -inf when fewer than k values are finite. Buffered threshold selection:
/// values above the running threshold are collected; at 2k the buffer is cut back to its top k.
fn kth_largest(row: &[f32], k: usize, buf: &mut Vec<f32>) -> f32 {
    let desc = |a: &f32, b: &f32| b.total_cmp(a);
    buf.clear();
    let mut threshold = f32::NEG_INFINITY;
    for &l in row {
        if l > threshold {
            buf.push(l);
            if buf.len() >= 2 * k {
                buf.select_nth_unstable_by(k - 1, desc);
                buf.truncate(k);
                threshold = buf[k - 1];
            }
        }
    }
    if buf.len() < k {
        return f32::NEG_INFINITY;
    }
    buf.select_nth_unstable_by(k - 1, desc);
    buf[k - 1]
}

/// Fills `cand` with the final set under top-p: the smallest most-likely prefix (of the top-k set, in
/// descending logit order, ties by id) whose mass reaches `top_p`, intersected with min-p (also a prefix).
fn nucleus(row: &[f32], plan: &Plan, top_p: f32, cand: &mut Vec<(f32, u32)>) {
    // Denominator over the top-k set: top-p is computed before min-p (HF and vLLM order).
    // One exp pass: the denominator over the top-k set, and the mass above a few bands below the max. When the
    // tokens above a band already hold `top_p` of the mass, the nucleus (a prefix in descending order) lies
    // inside them and only they become candidates.
    let floor = plan.top_k_floor.max(plan.negligible_below);
    let t = 1.0 / plan.inv_t;
    let bands: [f32; 3] = BANDS.map(|b| plan.max - b * t);
    let mut z = 0.0f64;
    let mut above = [0.0f64; 3];
    for &l in row {
        if l >= floor {
            let w = weight(l, plan);
            z += w;
            for (acc, &b) in above.iter_mut().zip(&bands) {
                if l >= b {
                    *acc += w;
                }
            }
        }
    }
    let target = f64::from(top_p) * z;
    let band_floor = bands.iter().zip(&above).find(|(_, &a)| a >= target).map(|(&b, _)| b).unwrap_or(floor);
    let from = plan.keep_from.max(band_floor).max(floor);
    cand.clear();
    cand.extend(row.iter().enumerate().filter(|(_, &l)| l >= from).map(|(i, &l)| (l, i as u32)));
    let desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let mut cum = 0.0f64;
    let mut done = 0;
    let mut chunk = FIRST_CHUNK;
    while done < cand.len() {
        let end = cand.len().min(done + chunk);
        if end < cand.len() {
            cand[done..].select_nth_unstable_by(end - done - 1, desc);
        }
        cand[done..end].sort_unstable_by(desc);
        for i in done..end {
            cum += weight(cand[i].0, plan);
            if cum >= target {
                cand.truncate(i + 1);
                return;
            }
        }
        done = end;
        chunk *= 4;
    }
}

fn draw_from_row(row: &[f32], plan: &Plan, u: f64, argmax: u32, weights: &mut Vec<f32>) -> u32 {
    let from = plan.keep_from.max(plan.negligible_below);
    weights.clear();
    let mut total = 0.0f64;
    weights.extend(row.iter().map(|&l| {
        let w = if l >= from { weight(l, plan) as f32 } else { 0.0 };
        total += f64::from(w);
        w
    }));
    let target = u * total;
    let mut acc = 0.0f64;
    for (i, &w) in weights.iter().enumerate() {
        acc += f64::from(w);
        if w > 0.0 && acc > target {
            return i as u32;
        }
    }
    argmax // only reached through rounding at the very top of the range
}

fn draw_from_candidates(cand: &[(f32, u32)], plan: &Plan, u: f64) -> u32 {
    let total: f64 = cand.iter().map(|&(l, _)| weight(l, plan)).sum();
    let target = u * total;
    let mut acc = 0.0f64;
    for &(l, id) in cand {
        acc += weight(l, plan);
        if acc > target {
            return id;
        }
    }
    cand.first().map(|c| c.1).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greedy(presence: f32, frequency: f32) -> Sampler {
        let p = SamplingParams { presence_penalty: presence, frequency_penalty: frequency, ..SamplingParams::greedy() };
        Sampler::new(p).unwrap()
    }

    #[test]
    fn presence_and_frequency_penalties_count_the_drawn_tokens_only() {
        let row = [0.0f32, 2.0, 1.5, 1.2];
        // The prompt (context) holds token 1, which the OpenAI penalties ignore: the first pick is still 1.
        let mut s = greedy(0.6, 0.0);
        assert_eq!(s.sample(&row, &[1, 1, 1]).unwrap(), 1);
        // Drawn once: 2.0 - 0.6 = 1.4 < 1.5, so token 2 wins; then 1.5 - 0.6 = 0.9 and token 1's 1.4 wins again.
        assert_eq!(s.sample(&row, &[1]).unwrap(), 2);
        assert_eq!(s.sample(&row, &[1]).unwrap(), 1);
        // Presence counts once however often a token was drawn: 1 at 1.4 vs 3 at 1.2, token 1 stays.
        assert_eq!(s.sample(&row, &[1]).unwrap(), 1);
        // Frequency grows with each draw: 2.0 - 0.3 n.
        let mut f = greedy(0.0, 0.3);
        let picks: Vec<u32> = (0..4).map(|_| f.sample(&row, &[]).unwrap()).collect();
        assert_eq!(picks, vec![1, 1, 2, 1], "1 at 2.0, 1.7, then 1.4 < 1.5 so 2, then 1 (1.4) vs 2 (1.2)");
        // Negative values encourage repeats; 0 is off and leaves the row alone.
        let mut neg = greedy(-1.0, 0.0);
        assert_eq!((neg.sample(&row, &[]).unwrap(), neg.sample(&row, &[]).unwrap()), (1, 1));
        let mut off = greedy(0.0, 0.0);
        assert_eq!((0..3).map(|_| off.sample(&row, &[]).unwrap()).collect::<Vec<_>>(), vec![1, 1, 1]);
    }

    #[test]
    fn penalties_out_of_range_are_refused_by_name() {
        let p = SamplingParams { frequency_penalty: 2.5, ..SamplingParams::default() };
        let e = Sampler::new(p).unwrap_err().to_string();
        assert!(e.contains("`frequency_penalty`") && e.contains("[-2, 2]") && e.contains("2.5"), "{e}");
    }
}
