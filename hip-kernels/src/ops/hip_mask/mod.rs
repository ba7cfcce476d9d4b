//! HiP mask estimation: the hierarchical top-k tree search over key blocks (hip-algorithm.md §1A).

pub(crate) mod cpu;

use candle_core::Tensor;

use crate::config::HipConfig;
use crate::elem::{dispatch_dtype, Elem};
use crate::error::{Error, Result};
use crate::layout::{check_scale, AttnDims};
use crate::ops::tile::KvLayout;
use crate::ops::{require_cpu, with_cpu_data};

/// Marks an unused slot of [`HipMask::block_starts`].
pub const NO_BLOCK: u32 = u32::MAX;

/// The key blocks selected for every (batch, query head, query block).
///
/// Block `i` of row `(b, h, m)` covers key tokens `[start, start + block_size_k)`, where
/// `start = block_starts[((b * heads + h) * n_qblocks + m) * max_blocks + i]`. The first
/// `counts[(b * heads + h) * n_qblocks + m]` entries of a row are used, sorted ascending and
/// distinct; the rest hold [`NO_BLOCK`]. Blocks never overlap the sink and never start inside the
/// window of the block's last query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HipMask {
    /// Batch size.
    pub batch: usize,
    /// Query heads (masks are per query head).
    pub heads: usize,
    /// Query blocks (`ceil(t_q / block_size_q)`).
    pub n_qblocks: usize,
    /// Slots per row (`k / block_size_k`).
    pub max_blocks: usize,
    /// Queries per query block.
    pub block_size_q: usize,
    /// Tokens per key block.
    pub block_size_k: usize,
    /// Sink tokens attended besides the blocks.
    pub sink_tokens: usize,
    /// Window tokens attended besides the blocks.
    pub window_tokens: usize,
    /// Key tokens in the context when the mask was estimated.
    pub t_k: usize,
    /// Block start tokens, `[batch, heads, n_qblocks, max_blocks]` row-major.
    pub block_starts: Vec<u32>,
    /// Used slots per row, `[batch, heads, n_qblocks]`.
    pub counts: Vec<u32>,
}

impl HipMask {
    /// The selected block starts of row `(b, h, m)`.
    pub fn blocks(&self, b: usize, h: usize, m: usize) -> &[u32] {
        let row = (b * self.heads + h) * self.n_qblocks + m;
        let start = row * self.max_blocks;
        &self.block_starts[start..start + self.counts[row] as usize]
    }

    pub(crate) fn empty(dims: &AttnDims, cfg: &HipConfig) -> Self {
        let n_qblocks = dims.t_q.div_ceil(cfg.block_size_q);
        let max_blocks = cfg.selected_blocks();
        let rows = dims.batch * dims.heads_q * n_qblocks;
        HipMask {
            batch: dims.batch,
            heads: dims.heads_q,
            n_qblocks,
            max_blocks,
            block_size_q: cfg.block_size_q,
            block_size_k: cfg.block_size_k,
            sink_tokens: cfg.sink_tokens,
            window_tokens: cfg.window_tokens,
            t_k: dims.t_k,
            block_starts: vec![NO_BLOCK; rows * max_blocks],
            counts: vec![0; rows],
        }
    }

    /// Checks that this mask fits queries of `dims`.
    pub(crate) fn check_fits(&self, dims: &AttnDims) -> Result<()> {
        let n_qblocks = dims.t_q.div_ceil(self.block_size_q.max(1));
        let ok = self.batch == dims.batch
            && self.heads == dims.heads_q
            && self.n_qblocks == n_qblocks
            && self.t_k <= dims.t_k
            && self.block_starts.len() == self.counts.len() * self.max_blocks
            && self.counts.len() == self.batch * self.heads * self.n_qblocks;
        if ok {
            Ok(())
        } else {
            Err(Error::shape(
                "mask",
                format!(
                    "a mask for batch {}, {} query heads, {n_qblocks} query blocks and at most {} keys",
                    dims.batch, dims.heads_q, dims.t_k
                ),
                &[self.batch, self.heads, self.n_qblocks, self.t_k],
            ))
        }
    }
}

/// Geometry of query block `m`: the queries it holds and the key-block candidates of its search.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueryBlock {
    /// First query index (into `t_q`).
    pub i0: usize,
    /// One past the last query index.
    pub i1: usize,
    /// Candidate key blocks start at `sink + c * block_size_k` for `c < n_candidates`.
    pub n_candidates: usize,
    /// Tokens below this are candidates (`max(sink, p_last + 1 - window)`).
    pub search_end: usize,
}

pub(crate) fn query_block(dims: &AttnDims, cfg: &HipConfig, m: usize) -> QueryBlock {
    let i0 = m * cfg.block_size_q;
    let i1 = (i0 + cfg.block_size_q).min(dims.t_q);
    let p_last = dims.query_pos(i1 - 1);
    let search_end = (p_last + 1).saturating_sub(cfg.window_tokens).max(cfg.sink_tokens);
    let n_candidates = (search_end - cfg.sink_tokens).div_ceil(cfg.block_size_k);
    QueryBlock { i0, i1, n_candidates, search_end }
}

/// The initial groups of the tree search over `n > groups` candidate blocks: contiguous ranges of
/// `step` blocks, `step` the smallest power of two with `ceil(n / step) <= groups`, starting at
/// multiples of `step` (the last range may be shorter). Aligned ranges make neighbouring query
/// blocks, whose candidate counts differ a little, start from the same groups, so they score the
/// same center keys while those are still in cache.
pub(crate) fn initial_groups(n: usize, groups: usize) -> Vec<(u32, u32)> {
    let step = n.div_ceil(groups).next_power_of_two();
    (0..n).step_by(step).map(|s| (s as u32, (s + step).min(n) as u32)).collect()
}

/// Estimates the HiP mask: for every batch entry, query head and query block, the
/// `cfg.k / cfg.block_size_k` key blocks found by the hierarchical top-k tree search.
///
/// * `q: [batch, t_q, heads_q, head_dim]`, `k: [batch, t_k, heads_kv, head_dim]` (GQA: query head
///   `h` searches key head `h / (heads_q / heads_kv)`); queries are the last `t_q` positions.
/// * The sink (`cfg.sink_tokens`) and the window of the block's last query (`cfg.window_tokens`)
///   are left out of the search, since they are always attended. When the candidates fit the
///   budget, all of them are selected, so HiP with `k >= t_k` is exact attention.
/// * The search: split the candidates into at most `G = k / block_size_k` contiguous groups of a
///   power-of-two number of blocks; then
///   repeatedly split every group in two halves, score each half by its center block (max of
///   `q·k` over every `block_stride_q`-th query of the block, counted back from its last query, and every `block_stride_k`-th key of
///   the center block) and keep the best `G` halves, until every group is a single block. Ties go
///   to the earlier block.
///
/// # Errors
/// Invalid config, inconsistent shapes or dtypes, a bad scale, or non-CPU tensors.
pub fn hip_mask(q: &Tensor, k: &Tensor, cfg: &HipConfig, scale: f32) -> Result<HipMask> {
    cfg.validate()?;
    check_scale(scale)?;
    let dims = AttnDims::from_qkv(q, k, None)?;
    #[cfg(feature = "cuda")]
    if crate::cuda::is_cuda(q) {
        return crate::cuda::hip_mask_cuda(q, k, cfg, scale)?.to_host();
    }
    require_cpu("hip_mask", &[q, k])?;
    dispatch_dtype!(q.dtype(), E => run::<E>(q, k, &dims, cfg, scale))
}

fn run<E: Elem>(q: &Tensor, k: &Tensor, dims: &AttnDims, cfg: &HipConfig, scale: f32) -> Result<HipMask> {
    with_cpu_data::<E, _>("q", q, |qd| {
        with_cpu_data::<E, _>("k", k, |kd| {
            Ok(cpu::hip_mask_cpu(qd, kd, dims, KvLayout::Contiguous, cfg, scale))
        })
    })
}
