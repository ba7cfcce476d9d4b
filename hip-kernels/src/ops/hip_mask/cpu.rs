//! CPU tree search. One task per (batch, query head, query block); the branch scores of one
//! iteration are a single GEMM of the strided queries against the branches' center keys.

use rayon::prelude::*;

use super::{initial_groups, query_block, HipMask};
use crate::config::HipConfig;
use crate::elem::Elem;
use crate::gather::gather_rows;
use crate::layout::AttnDims;
use crate::ops::tile::{matmul_cm, KvLayout, KvRows, Mat};

#[derive(Default)]
struct MaskScratch {
    q: Vec<f32>,
    keys: Vec<f32>,
    scores: Vec<f32>,
    /// (start, end, cached score) of the surviving groups, in candidate-block units.
    groups: Vec<(u32, u32, f32)>,
    branches: Vec<(u32, u32, f32)>,
    /// Branches to score this iteration: index into `branches`.
    to_score: Vec<usize>,
    /// Offsets of the key rows to score.
    offsets: Vec<usize>,
}

pub(crate) fn hip_mask_cpu<E: Elem>(
    q: &[E],
    k: &[E],
    dims: &AttnDims,
    layout: KvLayout<'_>,
    cfg: &HipConfig,
    scale: f32,
) -> HipMask {
    let mut mask = HipMask::empty(dims, cfg);
    let g_max = mask.max_blocks;
    let n_qb = mask.n_qblocks;
    let group = dims.group();
    // One key/value head at a time, so both threads share its keys in the last-level cache.
    let rows_per_kv = group * n_qb;
    for (kv_row, (starts, counts)) in
        mask.block_starts.chunks_mut(rows_per_kv * g_max).zip(mask.counts.chunks_mut(rows_per_kv)).enumerate()
    {
        let (b, g) = (kv_row / dims.heads_kv, kv_row % dims.heads_kv);
        let rows: Vec<(&mut [u32], &mut u32)> = starts.chunks_mut(g_max).zip(counts.iter_mut()).collect();
        rows.into_par_iter().enumerate().for_each_init(MaskScratch::default, |sc, (row, (out, count))| {
            let (hh, m) = (row / n_qb, row % n_qb);
            let rows = layout.rows(dims, b, g);
            *count = search_row(q, k, dims, rows, cfg, scale, b, g * group + hh, m, sc, out) as u32;
        });
    }
    mask
}

fn search_row<E: Elem>(
    q: &[E],
    k: &[E],
    dims: &AttnDims,
    rows: KvRows<'_>,
    cfg: &HipConfig,
    scale: f32,
    b: usize,
    h: usize,
    m: usize,
    sc: &mut MaskScratch,
    out: &mut [u32],
) -> usize {
    let qb = query_block(dims, cfg, m);
    let g_max = out.len();
    let sink = cfg.sink_tokens as u32;
    let bk = cfg.block_size_k as u32;
    let n = qb.n_candidates;
    if n <= g_max {
        for c in 0..n {
            out[c] = sink + c as u32 * bk;
        }
        return n;
    }
    let d = dims.head_dim;
    // Strided queries of the block, scaled.
    sc.q.clear();
    let mut nq = 0;
    for i in (qb.i0..qb.i1).rev().step_by(cfg.block_stride_q) {
        let off = dims.q_off(b, i, h);
        let start = sc.q.len();
        sc.q.resize(start + d, 0.0);
        E::load(&q[off..off + d], &mut sc.q[start..]);
        sc.q[start..].iter_mut().for_each(|x| *x *= scale);
        nq += 1;
    }
    sc.groups.clear();
    sc.groups.extend(initial_groups(n, g_max).into_iter().map(|(s, e)| (s, e, f32::NAN)));
    loop {
        if sc.groups.iter().all(|&(s, e, sc)| e - s == 1 && !sc.is_nan()) {
            break;
        }
        // Split every group of more than one block into two halves.
        sc.branches.clear();
        for &(s, e, score) in &sc.groups {
            if e - s == 1 {
                sc.branches.push((s, e, score));
            } else {
                let mid = s + (e - s) / 2;
                sc.branches.push((s, mid, f32::NAN));
                sc.branches.push((mid, e, f32::NAN));
            }
        }
        score_branches(k, dims, rows, cfg, &qb, nq, sc);
        // Keep the best g_max branches; ties go to the earlier block.
        let keep = g_max.min(sc.branches.len());
        let cmp = |a: &(u32, u32, f32), c: &(u32, u32, f32)| c.2.total_cmp(&a.2).then(a.0.cmp(&c.0));
        if keep < sc.branches.len() {
            sc.branches.select_nth_unstable_by(keep - 1, cmp);
            sc.branches.truncate(keep);
        }
        std::mem::swap(&mut sc.groups, &mut sc.branches);
    }
    sc.groups.sort_unstable_by_key(|x| x.0);
    for (slot, &(s, _, _)) in out.iter_mut().zip(&sc.groups) {
        *slot = sink + s * bk;
    }
    sc.groups.len()
}

/// Scores every branch whose score is NaN (not yet known) by its center block.
fn score_branches<E: Elem>(
    k: &[E],
    dims: &AttnDims,
    rows: KvRows<'_>,
    cfg: &HipConfig,
    qb: &super::QueryBlock,
    nq: usize,
    sc: &mut MaskScratch,
) {
    let d = dims.head_dim;
    let keys_per_rep = cfg.block_size_k.div_ceil(cfg.block_stride_k);
    sc.to_score.clear();
    sc.offsets.clear();
    // Column c of the score matrix belongs to branch `owner[c]`; stored as a run per branch.
    let mut cols = 0usize;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (bi, br) in sc.branches.iter().enumerate() {
        if !br.2.is_nan() {
            continue;
        }
        let rep = br.0 + (br.1 - br.0) / 2;
        let start = cfg.sink_tokens + rep as usize * cfg.block_size_k;
        let end = (start + cfg.block_size_k).min(qb.search_end);
        let first_col = cols;
        for j in (start..end).step_by(cfg.block_stride_k) {
            sc.offsets.push(rows.offset(j));
            cols += 1;
        }
        debug_assert!(cols - first_col <= keys_per_rep && cols > first_col);
        sc.to_score.push(bi);
        runs.push((first_col, cols));
    }
    sc.keys.resize(cols * d, 0.0);
    gather_rows(k, &sc.offsets, d, &mut sc.keys[..cols * d]);
    sc.scores.resize(nq * cols, 0.0);
    // scores (nq × cols, stored key-major: one run of nq per key) = q · keysᵀ
    let keys = Mat::rows_t(&sc.keys[..cols * d], d);
    matmul_cm(nq, cols, d, &mut sc.scores[..nq * cols], false, Mat::rows(&sc.q, d), keys);
    for (&bi, &(c0, c1)) in sc.to_score.iter().zip(&runs) {
        let best = sc.scores[c0 * nq..c1 * nq].iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        sc.branches[bi].2 = best;
    }
}
