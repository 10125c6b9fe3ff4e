//! Convenience generation loops over [`Engine::step`]: one prompt or a batch of prompts to completion, choosing
//! tokens with a closure (argmax, a seeded sampler). Tests, `r1-eval` and the `generate` command use them; the
//! server drives `step` itself.

use crate::engine::{Engine, SequenceId, StepWork};
use crate::error::Result;

impl Engine {
    /// Generates up to `max_new_tokens` for one prompt, choosing each token with `pick` (given the
    /// last-position logits). Stops early after a token in `stop_ids` (which is included). The
    /// sequence is removed afterwards, also on error.
    pub fn generate_with<F>(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        stop_ids: &[u32],
        pick: F,
    ) -> Result<Vec<u32>>
    where
        F: FnMut(&[f32]) -> Result<u32>,
    {
        let mut out = self.generate_batch_with(&[prompt.to_vec()], max_new_tokens, stop_ids, usize::MAX, pick)?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Generates up to `max_new_tokens` for one prompt with [`crate::sampling::Sampler`] (seeded
    /// when `params.seed` is set; repetition penalty sees prompt and generated tokens). Stops after
    /// a token in `stop_ids` (included). Used by tests and the `generate` CLI command.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &crate::sampling::SamplingParams,
        max_new_tokens: usize,
        stop_ids: &[u32],
    ) -> Result<Vec<u32>> {
        let mut sampler = crate::sampling::Sampler::new(*params)?;
        let mut context = prompt.to_vec();
        self.generate_with(prompt, max_new_tokens, stop_ids, |logits| {
            let t = sampler.sample(logits, &context)?;
            context.push(t);
            Ok(t)
        })
    }

    /// Greedy generation for one prompt (argmax each step).
    pub fn generate_greedy(&mut self, prompt: &[u32], max_new_tokens: usize, stop_ids: &[u32]) -> Result<Vec<u32>> {
        self.generate_with(prompt, max_new_tokens, stop_ids, |l| Ok(argmax(l)))
    }

    /// Generates for several prompts at once, batched in every step: prompts are prefilled in
    /// chunks of at most `prefill_chunk` tokens alongside the decode steps of sequences that
    /// already finished their prompt. Returns the new tokens per prompt, in order. All sequences
    /// are removed afterwards, also on error.
    pub fn generate_batch_with<F>(
        &mut self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        stop_ids: &[u32],
        prefill_chunk: usize,
        mut pick: F,
    ) -> Result<Vec<Vec<u32>>>
    where
        F: FnMut(&[f32]) -> Result<u32>,
    {
        let mut ids = Vec::with_capacity(prompts.len());
        for p in prompts {
            match self.add_sequence(p, max_new_tokens) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for id in ids {
                        self.remove_sequence(id);
                    }
                    return Err(e);
                }
            }
        }
        let result = self.run_generation(&ids, max_new_tokens, stop_ids, prefill_chunk.max(1), &mut pick);
        for &id in &ids {
            self.remove_sequence(id);
        }
        result
    }

    fn run_generation(
        &mut self,
        ids: &[SequenceId],
        max_new_tokens: usize,
        stop_ids: &[u32],
        prefill_chunk: usize,
        pick: &mut dyn FnMut(&[f32]) -> Result<u32>,
    ) -> Result<Vec<Vec<u32>>> {
        let mut generated: Vec<Vec<u32>> = vec![Vec::new(); ids.len()];
        let mut active: Vec<usize> = if max_new_tokens == 0 { Vec::new() } else { (0..ids.len()).collect() };
        while !active.is_empty() {
            let work: Vec<StepWork> = active.iter().map(|&i| StepWork::chunk(ids[i], prefill_chunk)).collect();
            let results = self.step(&work)?;
            for r in results {
                let i = ids.iter().position(|&id| id == r.seq).unwrap_or(usize::MAX);
                let Some(gen) = generated.get_mut(i) else { continue };
                let token = pick(&r.logits)?;
                gen.push(token);
                let done = gen.len() >= max_new_tokens || stop_ids.contains(&token);
                if done {
                    active.retain(|&a| a != i);
                } else {
                    self.push_token(r.seq, token)?;
                }
            }
        }
        Ok(generated)
    }
}

/// Index of the largest logit (first one on ties); 0 for an empty slice.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}
