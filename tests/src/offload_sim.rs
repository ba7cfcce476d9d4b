//! Hit ratios of the KV-cache offload policy ([`hip_kernels::offload`]) on real HiP decode masks:
//! what `hip-offload-sim` runs and `tests/offload_sim.rs` checks (results: docs/offload.md).
//!
//! [`record`] prefills a prompt with HiP, greedy-decodes on the CPU and, after every decode step,
//! turns the decode mask of every HiP layer ([`AttentionState::decode_mask`]) into the
//! `(kv_head, token)` entries block-sparse attention read in that step ([`decode_accesses`]).
//! [`simulate_sizes`] replays those lists through one LRU [`TokenCache`] per layer for several
//! cache sizes and sums the counters.
//!
//! Only the **sparse-attention cache** is simulated: the keys that mask estimation scores during a
//! refresh are not observable through the public API (the tree search returns only its final
//! blocks), so the mask-estimation cache is not measured here.

use std::time::Instant;

use hip_core::attention::{AttentionBackend, AttentionState, HipMask};
use hip_core::kv::{KvCacheConfig, PagedKvCache};
use hip_core::model::{LogitsWanted, Model, SeqChunk};
use hip_core::HipConfig;
use hip_kernels::offload::{CacheKind, TokenCache};
use serde::Serialize;

/// The entries block-sparse attention reads for one decode query at position `len - 1` (the
/// newest of `len` tokens) with `mask`, as distinct `(kv_head, token)` pairs sorted by head, then
/// token.
///
/// Query head `h` reads KV head `h / (mask.heads / kv_heads)` (GQA) at the tokens
/// [`hip_kernels::block_sparse_attn`] admits: the sink `[0, sink)`, the window of
/// `window_tokens + (len - mask.t_k)` tokens (decode widens it by the tokens appended since the
/// mask was estimated), and every token of the query head's selected blocks, never past
/// `len - 1`. The query heads of a KV head are unioned: a bank holds each entry once.
///
/// # Errors
/// A mask that is not a single-query decode mask of batch 1 over at most `len` tokens, or query
/// heads that are not a multiple of `kv_heads`.
pub fn decode_accesses(mask: &HipMask, len: usize, kv_heads: usize) -> Result<Vec<(u32, u32)>, String> {
    if mask.batch != 1 || mask.n_qblocks != 1 || mask.t_k > len || len == 0 {
        return Err(format!(
            "not a decode mask for {len} tokens: batch {}, {} query blocks, t_k {}",
            mask.batch, mask.n_qblocks, mask.t_k
        ));
    }
    if kv_heads == 0 || mask.heads / kv_heads * kv_heads != mask.heads {
        return Err(format!("{} query heads do not group over {kv_heads} KV heads", mask.heads));
    }
    let group = mask.heads / kv_heads;
    let p = len - 1;
    let window = mask.window_tokens + (len - mask.t_k);
    let window_start = (p + 1).saturating_sub(window);
    let sink_end = mask.sink_tokens.min(window_start);
    let mut out = Vec::new();
    let mut in_blocks = vec![false; window_start];
    for kv in 0..kv_heads {
        in_blocks.fill(false);
        for h in kv * group..(kv + 1) * group {
            for &start in mask.blocks(0, h, 0) {
                let start = start as usize;
                for j in start..(start + mask.block_size_k).min(window_start) {
                    in_blocks[j] = true;
                }
            }
        }
        in_blocks[..sink_end].fill(true);
        let kv = kv as u32;
        out.extend(in_blocks.iter().enumerate().filter(|(_, &b)| b).map(|(j, _)| (kv, j as u32)));
        out.extend((window_start..=p).map(|j| (kv, j as u32)));
    }
    Ok(out)
}

/// Accesses of one decode step in one HiP layer.
#[derive(Debug, Clone)]
pub struct LayerStep {
    /// Distinct `(kv_head, token)` entries read, sorted ([`decode_accesses`]).
    pub accessed: Vec<(u32, u32)>,
    /// How many of them lie in selected blocks outside the sink and the window.
    pub block_only: usize,
    /// Whether the mask was estimated in this step (its `t_k` is the step's length).
    pub refreshed: bool,
}

/// What [`record`] saw.
#[derive(Debug, Clone)]
pub struct Recording {
    /// Prompt tokens (prefilled before the first decode step).
    pub context: usize,
    /// Query heads, KV heads, head dimension and layers of the model.
    pub heads_q: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Layers of the model.
    pub num_layers: usize,
    /// The HiP layers (every layer not in `cfg.dense_layers`), in order.
    pub hip_layers: Vec<usize>,
    /// `steps[s][i]`: decode step `s` (over `context + s + 1` tokens) in `hip_layers[i]`.
    pub steps: Vec<Vec<LayerStep>>,
    /// The greedy tokens, one per decode step.
    pub generated: Vec<u32>,
    /// Seconds of the prefill and of the decode steps.
    pub prefill_s: f64,
    /// Seconds of the decode steps (recording included).
    pub decode_s: f64,
}

impl Recording {
    /// Tokens in the sequence after the last step: the size of the page tables.
    pub fn max_tokens(&self) -> usize {
        self.context + self.steps.len()
    }
}

/// Prefills `prompt` in chunks of `chunk` tokens with `AttentionBackend::Hip(cfg)`, then
/// greedy-decodes `steps` tokens one at a time, recording after each step the entries every HiP
/// layer read ([`decode_accesses`]).
///
/// # Errors
/// Model or cache errors, an empty prompt, a HiP layer without a host-side decode mask.
pub fn record(
    model: &Model,
    prompt: &[u32],
    steps: usize,
    cfg: &HipConfig,
    chunk: usize,
) -> Result<Recording, String> {
    let err = |e: hip_core::Error| e.to_string();
    if prompt.is_empty() || chunk == 0 {
        return Err("empty prompt or chunk size 0".into());
    }
    let c = model.config();
    let kv_cfg = KvCacheConfig {
        num_layers: c.layers,
        num_kv_heads: c.kv_heads,
        head_dim: c.head_dim,
        block_size: 16,
        num_blocks: (prompt.len() + steps).div_ceil(16) + 1,
    };
    let mut kv = PagedKvCache::new(kv_cfg).map_err(err)?;
    let seq = kv.add_sequence();
    let mut attn = AttentionState::new(AttentionBackend::Hip(cfg.clone())).map_err(err)?;
    let hip_layers: Vec<usize> = (0..c.layers).filter(|&l| !cfg.is_dense_layer(l)).collect();
    let mut forward =
        |tokens: &[u32], logits: LogitsWanted, attn: &mut AttentionState| -> Result<u32, String> {
            let out = model.forward(&[SeqChunk { seq, tokens, logits }], &mut kv, attn).map_err(err)?;
            match logits {
                LogitsWanted::None => Ok(0),
                _ => {
                    let row =
                        out[0].flatten_all().and_then(|x| x.to_vec1::<f32>()).map_err(|e| e.to_string())?;
                    Ok(crate::argmax(&row))
                }
            }
        };

    let t0 = Instant::now();
    let n_chunks = prompt.len().div_ceil(chunk);
    let mut next = 0;
    for (i, part) in prompt.chunks(chunk).enumerate() {
        let want = if i + 1 == n_chunks { LogitsWanted::Last } else { LogitsWanted::None };
        next = forward(part, want, &mut attn)?;
    }
    let prefill_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut rec_steps = Vec::with_capacity(steps);
    let mut generated = Vec::with_capacity(steps);
    for s in 0..steps {
        generated.push(next);
        next = forward(&[next], LogitsWanted::Last, &mut attn)?;
        let len = prompt.len() + s + 1;
        let mut layers = Vec::with_capacity(hip_layers.len());
        for &l in &hip_layers {
            let mask = attn
                .decode_mask(seq, l)
                .ok_or_else(|| format!("layer {l}: no host-side decode mask after step {s}"))?;
            let accessed = decode_accesses(mask, len, c.kv_heads)?;
            let window_start = (len).saturating_sub(mask.window_tokens + (len - mask.t_k));
            let block_only = accessed
                .iter()
                .filter(|&&(_, t)| t as usize >= mask.sink_tokens && (t as usize) < window_start)
                .count();
            layers.push(LayerStep { accessed, block_only, refreshed: mask.t_k == len });
        }
        rec_steps.push(layers);
    }
    Ok(Recording {
        context: prompt.len(),
        heads_q: c.heads,
        kv_heads: c.kv_heads,
        head_dim: c.head_dim,
        num_layers: c.layers,
        hip_layers,
        steps: rec_steps,
        generated,
        prefill_s,
        decode_s: t1.elapsed().as_secs_f64(),
    })
}

/// Hits and misses of a set of updates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Accesses found resident.
    pub hits: u64,
    /// Accesses read from the host store.
    pub misses: u64,
    /// Entries copied into the bank after the steps.
    pub inserts: u64,
    /// Misses of entries never read before in their layer (no cache size avoids them).
    pub first_touch: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.inserts += o.inserts;
        self.first_touch += o.first_touch;
    }
    /// `hits / (hits + misses)`, 1.0 without accesses.
    pub fn hit_ratio(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            1.0
        } else {
            self.hits as f64 / n as f64
        }
    }
    /// Entries moved from the host: every miss is read during its step and every insert copied
    /// after it (as [`hip_kernels::offload::OffloadStats::bytes_moved`] counts).
    pub fn moved(&self) -> u64 {
        self.misses + self.inserts
    }
}

/// The counters of one cache size, per part of the run.
#[derive(Debug, Clone, Serialize)]
pub struct SizeResult {
    /// Slots per KV head in each HiP layer's sparse-attention cache.
    pub slots_per_head: usize,
    /// `slots_per_head / max_tokens` (at most 1): the share of the final sequence's KV that is
    /// resident on the GPU.
    pub resident_fraction: f64,
    /// Every step, every HiP layer.
    pub all: Counts,
    /// Steps 1.. (without the cold first step).
    pub steady: Counts,
    /// Steps 1.. at which the mask was re-estimated.
    pub steady_refresh: Counts,
    /// Hit ratio over every step: (lowest layer, highest layer).
    pub all_layer_range: (f64, f64),
    /// Hit ratio over steps 1..: (lowest layer, highest layer).
    pub steady_layer_range: (f64, f64),
    /// Hit ratio of each decode step, over every HiP layer.
    pub per_step: Vec<f64>,
    /// Entries moved per decode step, steps 1.., per (HiP layer, KV head).
    pub steady_moved_per_layer_head: f64,
    /// Steady bytes moved per step for the recorded model: every HiP layer and KV head, K and V
    /// of `head_dim` bf16 elements per entry.
    pub steady_bytes_per_step_model: f64,
    /// The same per-(layer, head) traffic scaled to Llama-3.1-8B (29 HiP layers with layers 0–2
    /// dense, 8 KV heads, head dim 128, bf16): an extrapolation that assumes the same access
    /// pattern per KV head.
    pub steady_bytes_per_step_llama8b: f64,
}

/// Llama-3.1-8B with layers 0–2 dense: HiP layers, KV heads, head dim.
pub const LLAMA8B_HIP: (usize, usize, usize) = (29, 8, 128);

/// Replays `rec` through one [`TokenCache`] per HiP layer for every size in `slots` (slots per
/// KV head; sizes at or above [`Recording::max_tokens`] are clipped to it, duplicates dropped).
///
/// # Errors
/// A [`TokenCache`] error (an access out of range).
pub fn simulate_sizes(rec: &Recording, slots: &[usize]) -> Result<Vec<SizeResult>, String> {
    let max = rec.max_tokens();
    let mut sizes: Vec<usize> = slots.iter().map(|&s| s.min(max)).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let n_layers = rec.hip_layers.len();
    let entry = CacheKind::SparseAttn.entry_bytes(rec.head_dim, 2) as f64;
    let llama_entry = CacheKind::SparseAttn.entry_bytes(LLAMA8B_HIP.2, 2) as f64;
    let mut out = Vec::new();
    for &slots in &sizes {
        let mut caches = (0..n_layers)
            .map(|_| TokenCache::new(rec.kv_heads, max, slots).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut seen = vec![vec![false; rec.kv_heads * max]; n_layers];
        let (mut all, mut steady, mut refresh) = (Counts::default(), Counts::default(), Counts::default());
        let mut layer_all = vec![Counts::default(); n_layers];
        let mut layer_steady = vec![Counts::default(); n_layers];
        let mut per_step = Vec::with_capacity(rec.steps.len());
        for (s, layers) in rec.steps.iter().enumerate() {
            let mut step = Counts::default();
            for (i, ls) in layers.iter().enumerate() {
                let u = caches[i].update(&ls.accessed).map_err(|e| e.to_string())?;
                let mut first = 0;
                for &(h, t) in &ls.accessed {
                    let f = &mut seen[i][h as usize * max + t as usize];
                    first += u64::from(!*f);
                    *f = true;
                }
                let c = Counts {
                    hits: u.hits,
                    misses: u.misses,
                    inserts: u.inserted.len() as u64,
                    first_touch: first,
                };
                step.add(&c);
                layer_all[i].add(&c);
                if s > 0 {
                    layer_steady[i].add(&c);
                    steady.add(&c);
                    if ls.refreshed {
                        refresh.add(&c);
                    }
                }
            }
            all.add(&step);
            per_step.push(step.hit_ratio());
        }
        let range = |v: &[Counts]| {
            v.iter().map(Counts::hit_ratio).fold((1f64, 0f64), |(lo, hi), r| (lo.min(r), hi.max(r)))
        };
        let steady_steps = rec.steps.len().saturating_sub(1).max(1) as f64;
        let per_lh = steady.moved() as f64 / steady_steps / (n_layers * rec.kv_heads).max(1) as f64;
        out.push(SizeResult {
            slots_per_head: slots,
            resident_fraction: slots as f64 / max as f64,
            all,
            steady,
            steady_refresh: refresh,
            all_layer_range: range(&layer_all),
            steady_layer_range: range(&layer_steady),
            per_step,
            steady_moved_per_layer_head: per_lh,
            steady_bytes_per_step_model: per_lh * (n_layers * rec.kv_heads) as f64 * entry,
            steady_bytes_per_step_llama8b: per_lh * (LLAMA8B_HIP.0 * LLAMA8B_HIP.1) as f64 * llama_entry,
        });
    }
    Ok(out)
}

/// Mean per (HiP layer, KV head) and decode step of the entries read and of those in selected
/// blocks outside the sink and window: `(accessed, block_only)`.
pub fn mean_accesses(rec: &Recording) -> (f64, f64) {
    let n = (rec.steps.len() * rec.hip_layers.len() * rec.kv_heads).max(1) as f64;
    let (a, b) = rec
        .steps
        .iter()
        .flatten()
        .fold((0usize, 0usize), |(a, b), ls| (a + ls.accessed.len(), b + ls.block_only));
    (a as f64 / n, b as f64 / n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hip_kernels::NO_BLOCK;

    /// 4 query heads over 2 KV heads, sink 2, window 3, blocks of 2 tokens, 2 slots per row.
    fn mask(t_k: usize, rows: [&[u32]; 4]) -> HipMask {
        let mut block_starts = Vec::new();
        let mut counts = Vec::new();
        for r in rows {
            counts.push(r.len() as u32);
            block_starts.extend(r.iter().copied().chain(std::iter::repeat(NO_BLOCK)).take(2));
        }
        HipMask {
            batch: 1,
            heads: 4,
            n_qblocks: 1,
            max_blocks: 2,
            block_size_q: 64,
            block_size_k: 2,
            sink_tokens: 2,
            window_tokens: 3,
            t_k,
            block_starts,
            counts,
        }
    }

    #[test]
    fn sink_window_and_blocks_unioned_per_kv_head() {
        // Fresh mask over 20 tokens: query at 19, window 17..=19.
        let m = mask(20, [&[4, 10], &[4], &[6, 16], &[]]);
        let a = decode_accesses(&m, 20, 2).unwrap();
        let head = |h: u32| a.iter().filter(|p| p.0 == h).map(|p| p.1).collect::<Vec<_>>();
        // Head 0 (query heads 0, 1): sink, blocks 4 and 10 (4 shared), window.
        assert_eq!(head(0), vec![0, 1, 4, 5, 10, 11, 17, 18, 19]);
        // Head 1: block 16 is cut where the window starts.
        assert_eq!(head(1), vec![0, 1, 6, 7, 16, 17, 18, 19]);
        // Two steps later the window is 2 tokens wider and reaches the new query at 21.
        let a = decode_accesses(&m, 22, 2).unwrap();
        let h1: Vec<u32> = a.iter().filter(|p| p.0 == 1).map(|p| p.1).collect();
        assert_eq!(h1, vec![0, 1, 6, 7, 16, 17, 18, 19, 20, 21]);
        assert!(a.windows(2).all(|w| w[0] < w[1]), "sorted and distinct");
        // 30 steps later: sink 2 + blocks + a window of 3 + 30 tokens (17..=49).
        let a = decode_accesses(&m, 20 + 30, 2).unwrap();
        assert_eq!(a.len(), (2 + 4 + 33) + (2 + 3 + 33));
        // A window that reaches the sink: every token once.
        let small = mask(4, [&[], &[], &[], &[]]);
        assert_eq!(
            decode_accesses(&small, 4, 2).unwrap(),
            (0..2).flat_map(|h| (0..4).map(move |t| (h, t))).collect::<Vec<_>>()
        );
        assert!(decode_accesses(&m, 19, 2).is_err(), "mask over more tokens than the step");
        assert!(decode_accesses(&m, 20, 3).is_err(), "4 heads over 3");
    }
}
