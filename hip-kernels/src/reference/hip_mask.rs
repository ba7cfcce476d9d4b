use candle_core::Tensor;

use super::{dot, to_f64};
use crate::config::HipConfig;
use crate::error::Result;
use crate::layout::AttnDims;
use crate::ops::hip_mask::{initial_groups, query_block, HipMask};

/// Reference HiP mask estimation: the tree search of [`crate::hip_mask`] written as plainly as
/// possible, scoring in f64 and re-scoring every branch in every iteration.
///
/// # Errors
/// Invalid config, inconsistent shapes or dtypes.
pub fn hip_mask(q: &Tensor, k: &Tensor, cfg: &HipConfig, scale: f32) -> Result<HipMask> {
    cfg.validate()?;
    let dims = AttnDims::from_qkv(q, k, None)?;
    let (qd, kd) = (to_f64(q)?, to_f64(k)?);
    let mut mask = HipMask::empty(&dims, cfg);
    let d = dims.head_dim;
    let g_max = mask.max_blocks;
    for b in 0..dims.batch {
        for h in 0..dims.heads_q {
            let g = h / dims.group();
            for m in 0..mask.n_qblocks {
                let qb = query_block(&dims, cfg, m);
                let block_start = |c: u32| cfg.sink_tokens + c as usize * cfg.block_size_k;
                // Score of the candidate block c: max of q·k over the strided queries of the query
                // block and the strided keys of block c (keys below the search end only).
                let score = |c: u32| -> f64 {
                    let start = block_start(c);
                    let end = (start + cfg.block_size_k).min(qb.search_end);
                    let mut best = f64::NEG_INFINITY;
                    for i in (qb.i0..qb.i1).rev().step_by(cfg.block_stride_q) {
                        let qrow = &qd[dims.q_off(b, i, h)..dims.q_off(b, i, h) + d];
                        for j in (start..end).step_by(cfg.block_stride_k) {
                            let krow = &kd[dims.kv_off(b, j, g)..dims.kv_off(b, j, g) + d];
                            best = best.max(scale as f64 * dot(qrow, krow));
                        }
                    }
                    best
                };
                let selected: Vec<u32> = if qb.n_candidates <= g_max {
                    (0..qb.n_candidates as u32).collect()
                } else {
                    let mut groups = initial_groups(qb.n_candidates, g_max);
                    while groups.iter().any(|&(s, e)| e - s > 1) {
                        let mut branches = Vec::new();
                        for (s, e) in groups {
                            if e - s == 1 {
                                branches.push((s, e));
                            } else {
                                let mid = s + (e - s) / 2;
                                branches.push((s, mid));
                                branches.push((mid, e));
                            }
                        }
                        let mut scored: Vec<(f64, (u32, u32))> =
                            branches.into_iter().map(|(s, e)| (score(s + (e - s) / 2), (s, e))).collect();
                        // Best score first; ties go to the earlier block.
                        scored.sort_by(|a, c| c.0.total_cmp(&a.0).then(a.1 .0.cmp(&c.1 .0)));
                        groups = scored.into_iter().take(g_max).map(|(_, r)| r).collect();
                    }
                    let mut starts: Vec<u32> = groups.into_iter().map(|(s, _)| s).collect();
                    starts.sort_unstable();
                    starts
                };
                let row = (b * dims.heads_q + h) * mask.n_qblocks + m;
                mask.counts[row] = selected.len() as u32;
                for (slot, c) in selected.into_iter().enumerate() {
                    mask.block_starts[row * g_max + slot] = block_start(c) as u32;
                }
            }
        }
    }
    Ok(mask)
}
