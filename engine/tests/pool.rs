//! The engine's KV pool on the same fixtures as the conformance suite, on every backend: the budget grows block by
//! block, a full pool preempts and recomputes without changing any token, the prefix cache gives the same tokens and
//! skips prefill, retained prefixes are evicted before anything waits, and the served context caps each slot.

mod common;

use common::{expected, fixture, open_backend, KINDS};
use r1_engine::backend::{self, BackendKind, BackendOptions};
use r1_engine::{Engine, Manifest, PoolOptions, PrefixReuse, StepWork};

#[test]
fn kv_budget_grows_with_use_and_admits_by_prompt() {
    let dir = fixture("tiny");
    let manifest = Manifest::load(&dir).unwrap();
    // The pool is f32: 2 layers x (2x16 + 2x16) x 4 bytes = 512 bytes per token; tract feeds its own present back
    // as the next past, so the running batch's cache is held twice and the budget counts 1024 bytes per token.
    let b = backend::load(&dir, &manifest, BackendKind::Tract, &BackendOptions::default()).unwrap();
    assert!(b.can_feed_kept());
    let per_token = 2 * 512u64;
    let pool = PoolOptions { slots: 4, block_tokens: 4, prefix_cache: false, ..Default::default() };
    let mut e = Engine::with_pool(&dir, manifest.clone(), b, Some(per_token * 20), pool).unwrap();
    assert_eq!(e.kv_budget().bytes_per_token(), per_token);
    assert_eq!(e.kv_budget().total_blocks(), 5);
    assert!(e.can_admit(4, 16), "max_tokens reserves nothing: only the prompt's block must be free");
    assert!(!e.can_admit(4, 17), "but prompt + max_tokens must fit the whole pool");
    let a = e.add_sequence(&[1, 2, 3, 4], 8).unwrap();
    assert_eq!(e.kv_budget().used_blocks(), 1);
    // 13 prompt positions = 4 blocks, plus one block of headroom per running sequence: 5 > 4 free.
    assert!(!e.can_admit(13, 0));
    assert!(e.can_admit(8, 0));
    let err = e.add_sequence(&[1; 4], 17).unwrap_err();
    assert_eq!(err.kind(), "resource_exhausted");
    // Growing: the fifth position takes the second block, when it is fed.
    let out = e.step(&[StepWork::all(a)]).unwrap();
    e.push_token(a, r1_engine::generate::argmax(&out[0].logits)).unwrap();
    assert_eq!(e.kv_budget().used_blocks(), 1);
    e.step(&[StepWork::all(a)]).unwrap();
    assert_eq!(e.kv_budget().used_blocks(), 2);
    assert!(e.remove_sequence(a));
    assert!(!e.remove_sequence(a));
    assert_eq!(e.kv_budget().used_blocks(), 0);
    assert_eq!(e.kv_pool().used_slots(), 0);
}

/// Greedy decoding of `ids` together, one token a step, until each has `n` new tokens; returns them.
fn decode_together(e: &mut Engine, ids: &[r1_engine::SequenceId], n: usize) -> Vec<Vec<u32>> {
    let mut out = vec![Vec::new(); ids.len()];
    let mut steps = 0;
    while out.iter().any(|o| o.len() < n) {
        steps += 1;
        assert!(steps < 50 * n, "no progress");
        let work: Vec<_> =
            ids.iter().zip(&out).filter(|(_, o)| o.len() < n).map(|(id, _)| StepWork::chunk(*id, 1)).collect();
        for r in e.step(&work).unwrap() {
            let i = ids.iter().position(|id| *id == r.seq).unwrap();
            let t = r1_engine::generate::argmax(&r.logits);
            out[i].push(t);
            if out[i].len() < n {
                e.push_token(r.seq, t).unwrap();
            } else {
                e.remove_sequence(r.seq);
            }
        }
    }
    out
}

#[test]
fn a_full_pool_preempts_the_youngest_and_recomputes_it_without_changing_its_tokens() {
    let exp = expected("tiny");
    for kind in KINDS {
        let (manifest, b) = open_backend("tiny", kind);
        let per_token = manifest.kv_cache.computed_bytes_per_token() as u64 * if b.can_feed_kept() { 2 } else { 1 };
        let prompts: Vec<&Vec<u32>> = exp.cases.iter().map(|(p, _)| p).take(3).collect();
        let n = exp.new_tokens;
        // Room for one whole sequence and a few blocks more, not for all three to generate `n` tokens.
        let longest = prompts.iter().map(|p| p.len()).max().unwrap();
        let budget_tokens = longest + n + 4;
        let pool = PoolOptions { slots: 3, block_tokens: 2, ..Default::default() };
        let mut e =
            Engine::with_pool(&fixture("tiny"), manifest, b, Some(per_token * budget_tokens as u64), pool).unwrap();
        let ids: Vec<_> = prompts.iter().map(|p| e.add_sequence(p, n).unwrap()).collect();
        let got = decode_together(&mut e, &ids, n);
        assert!(e.pool_stats().preemptions > 0, "{kind:?}: the budget was meant to run out");
        assert!(e.pool_stats().recomputed_tokens > 0);
        for (i, (g, (_, want))) in got.iter().zip(&exp.cases).enumerate() {
            assert_eq!(g, want, "{kind:?} sequence {i}: preemption changed its tokens");
        }
    }
}

#[test]
fn a_cached_prefix_gives_the_same_tokens_and_skips_its_prefill() {
    let exp = expected("tiny");
    for kind in KINDS {
        let (manifest, b) = open_backend("tiny", kind);
        let mut e = Engine::from_backend(&fixture("tiny"), manifest, b, None).unwrap();
        let (prompt, want) = &exp.cases[0];
        // A longer prompt that starts with the first case's prompt and its greedy continuation.
        let mut long = prompt.clone();
        long.extend_from_slice(&want[..6]);
        let cold = e.generate_greedy(&long, 6, &[]).unwrap();
        assert_eq!(&cold[..], &want[6..12], "{kind:?}: the continuation of its own greedy path");
        let hits = e.pool_stats().prefix_hits;
        // The finished sequence's cache is retained: the same prompt again starts from all but its last token.
        let id = e.add_sequence(&long, 6).unwrap();
        assert_eq!(e.prefix_tokens(id).unwrap(), long.len() - 1, "{kind:?}");
        assert_eq!(e.pending_tokens(id).unwrap(), 1);
        assert_eq!(e.pool_stats().prefix_hits, hits + 1);
        e.remove_sequence(id);
        let warm = e.generate_greedy(&long, 6, &[]).unwrap();
        assert_eq!(warm, cold, "{kind:?}: tokens with the prefix cache equal tokens without");
        // A prompt sharing only the first case's prompt takes that much, from a running sequence too.
        let a = e.add_sequence(&long, 4).unwrap();
        e.step(&[StepWork::all(a)]).unwrap();
        let mut other = prompt.clone();
        other.push(1);
        let b = e.add_sequence(&other, 4).unwrap();
        assert_eq!(e.prefix_tokens(b).unwrap(), prompt.len(), "{kind:?}");
        // Opting out prefills everything.
        let c = e.add_sequence_with(&other, 4, PrefixReuse::Off).unwrap();
        assert_eq!((e.prefix_tokens(c).unwrap(), e.pending_tokens(c).unwrap()), (0, other.len()));
        for id in [a, b, c] {
            e.remove_sequence(id);
        }
        assert!(e.retained_sequences() > 0);
    }
}

/// `PrefixReuse::ChunkAligned` (`r1-serve --prefix-cache exact`): the hit is rounded down to the chunk grid, so the
/// positions left are computed in the same chunks as without the cache and the logits are equal to the bit.
#[test]
fn a_chunk_aligned_prefix_hit_gives_the_same_logits_to_the_bit() {
    let exp = expected("tiny");
    let chunk = 4;
    for kind in KINDS {
        let (manifest, b) = open_backend("tiny", kind);
        let mut e = Engine::from_backend(&fixture("tiny"), manifest, b, None).unwrap();
        let (prompt, want) = &exp.cases[0];
        let mut long = prompt.clone();
        long.extend_from_slice(&want[..7]);
        assert!(long.len() % chunk != 1, "the hit must be rounded for this test to mean something");
        // Prefill `long` in chunks of `chunk`; returns the positions taken from the cache and the last logits.
        let mut run = |reuse: PrefixReuse| {
            let id = e.add_sequence_with(&long, 2, reuse).unwrap();
            let cached = e.prefix_tokens(id).unwrap();
            let mut last = None;
            while e.pending_tokens(id).unwrap() > 0 {
                last = e.step(&[StepWork::chunk(id, chunk)]).unwrap().into_iter().next().map(|r| r.logits);
            }
            e.remove_sequence(id);
            (cached, last.expect("logits once the prompt is fed"))
        };
        let (cold_cached, cold) = run(PrefixReuse::Off);
        let (hit, warm) = run(PrefixReuse::ChunkAligned(chunk));
        assert_eq!(cold_cached, 0);
        assert_eq!(hit, (long.len() - 1) / chunk * chunk, "{kind:?}: the longest hit rounded down to the grid");
        let bits = |l: &[f32]| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&warm), bits(&cold), "{kind:?}: logits after an aligned hit equal the uncached ones");
        assert_eq!(PrefixReuse::ChunkAligned(chunk).usable(chunk - 1), 0, "below one chunk nothing is reused");
    }
}

#[test]
fn retained_prefixes_are_evicted_before_anything_else_waits() {
    let (manifest, b) = open_backend("tiny", BackendKind::Tract);
    // 1,024 bytes a position (float32, kept present counted too): 40 positions, 10 blocks of 4.
    let pool = PoolOptions { slots: 2, block_tokens: 4, prefix_cache: true, ..Default::default() };
    let mut e = Engine::with_pool(&fixture("tiny"), manifest, b, Some(1024 * 40), pool).unwrap();
    e.generate_greedy(&[5; 14], 2, &[]).unwrap(); // 15 positions cached: 4 blocks and a slot retained
    assert_eq!((e.retained_sequences(), e.kv_budget().free_blocks()), (1, 6));
    // 32 prompt positions need 8 blocks: admission counts the retained blocks as free, and adding evicts them.
    assert!(e.can_admit(32, 0));
    let id = e.add_sequence(&[7; 32], 0).unwrap();
    assert_eq!((e.retained_sequences(), e.pool_stats().prefix_evictions), (0, 1));
    assert_eq!(e.kv_budget().used_blocks(), 8);
    e.remove_sequence(id);
}

/// A conversation's turns hold one retained slot, not one per turn: the second turn's cache covers the first's
/// (its prompt is the first prompt and answer, then more), so retaining it gives the first turn's slot and blocks
/// back, and the first prompt still hits its whole cached prefix in the covering entry.
#[test]
fn a_conversations_turns_hold_one_retained_slot() {
    for kind in KINDS {
        let (manifest, b) = open_backend("tiny", kind);
        let pool = PoolOptions { slots: 3, block_tokens: 4, prefix_cache: true, ..Default::default() };
        let mut e = Engine::with_pool(&fixture("tiny"), manifest, b, None, pool).unwrap();
        let first = [5u32, 6, 7, 8, 9];
        let answer = e.generate_greedy(&first, 3, &[]).unwrap();
        assert_eq!((e.retained_sequences(), e.kv_budget().used_blocks()), (1, 2), "{kind:?}: 7 positions");
        let second: Vec<u32> = first.iter().chain(&answer).chain(&[10, 11]).copied().collect();
        let id = e.add_sequence(&second, 3).unwrap();
        assert_eq!(e.prefix_tokens(id).unwrap(), 7, "{kind:?}: the first turn's positions are reused");
        e.remove_sequence(id);
        e.generate_greedy(&second, 3, &[]).unwrap();
        // 12 positions retained in one slot (3 blocks); the first turn's entry is gone, and nothing was evicted.
        assert_eq!(e.retained_sequences(), 1, "{kind:?}");
        assert_eq!((e.kv_pool().used_slots(), e.kv_budget().used_blocks()), (1, 3), "{kind:?}");
        assert_eq!(e.pool_stats().prefix_evictions, 0, "{kind:?}");
        // The first prompt again: its whole prefix (all but the token fed for its logits) from the covering entry,
        // and the same answer.
        let id = e.add_sequence(&first, 3).unwrap();
        assert_eq!(e.prefix_tokens(id).unwrap(), first.len() - 1, "{kind:?}");
        e.remove_sequence(id);
        assert_eq!(e.generate_greedy(&first, 3, &[]).unwrap(), answer, "{kind:?}");
        assert_eq!(e.retained_sequences(), 1, "{kind:?}: the repeat is covered, not kept beside");
    }
}

#[test]
fn prefix_cache_off_prefills_everything() {
    let exp = expected("tiny");
    let (manifest, b) = open_backend("tiny", BackendKind::Tract);
    let pool = PoolOptions { prefix_cache: false, ..Default::default() };
    let mut e = Engine::with_pool(&fixture("tiny"), manifest, b, None, pool).unwrap();
    let (prompt, _) = &exp.cases[0];
    e.generate_greedy(prompt, 2, &[]).unwrap();
    let id = e.add_sequence(prompt, 2).unwrap();
    assert_eq!(e.prefix_tokens(id).unwrap(), 0);
    assert_eq!(e.retained_sequences(), 0);
    assert_eq!(e.pool_stats().prefix_hits, 0);
}

#[test]
fn the_served_context_caps_the_pool_below_the_model_maximum() {
    let (manifest, b) = open_backend("tiny", BackendKind::Tract);
    assert_eq!(manifest.model.max_position_embeddings, 256);
    let pool = PoolOptions { max_context: Some(32), ..Default::default() };
    let mut e = Engine::with_pool(&fixture("tiny"), manifest.clone(), b, None, pool).unwrap();
    assert_eq!((e.context_tokens(), e.kv_pool().capacity()), (32, 32));
    assert!(e.can_admit(10, 22) && !e.can_admit(10, 23));
    let err = e.add_sequence(&[1; 10], 23).unwrap_err().to_string();
    assert!(err.contains("context length 32") && err.contains("got 33"), "{err}");
    // Larger than the model's: the model's wins.
    let b = backend::load(&fixture("tiny"), &manifest, BackendKind::Tract, &BackendOptions::default()).unwrap();
    let pool = PoolOptions { max_context: Some(100_000), ..Default::default() };
    let e = Engine::with_pool(&fixture("tiny"), manifest, b, None, pool).unwrap();
    assert_eq!(e.context_tokens(), 256);
}
