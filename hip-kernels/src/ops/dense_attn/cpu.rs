//! CPU dense attention: tiles of (batch, kv head, query block) in parallel with rayon.
//! Each tile stacks the queries of every query head of its GQA group, so a key chunk is loaded
//! once for the whole group.

use rayon::prelude::*;

use crate::elem::Elem;
use crate::layout::AttnDims;
use crate::ops::tile::{attend, KvHead, KvLayout, OutPtr, Scratch, Span};

/// Queries per tile (per query head) in prefill.
const QUERY_TILE: usize = 64;

pub(crate) fn dense_attn_cpu<E: Elem>(
    q: &[E],
    k: &[E],
    v: &[E],
    dims: &AttnDims,
    layout: KvLayout<'_>,
    scale: f32,
) -> Vec<f32> {
    let d = dims.head_dim;
    let group = dims.group();
    let q_tile = QUERY_TILE.min(dims.t_q);
    let n_tiles = dims.t_q.div_ceil(q_tile);
    let mut out = vec![0f32; dims.batch * dims.t_q * dims.heads_q * d];
    let ptr = OutPtr(out.as_mut_ptr());
    let tasks: Vec<(usize, usize, usize)> = (0..dims.batch)
        .flat_map(|b| (0..dims.heads_kv).flat_map(move |g| (0..n_tiles).map(move |t| (b, g, t))))
        .collect();
    // Large tiles first: causal tiles near the end of the context do the most work.
    tasks.into_par_iter().rev().for_each_init(Scratch::default, |sc, (b, g, t)| {
        let i0 = t * q_tile;
        let i1 = (i0 + q_tile).min(dims.t_q);
        let n = i1 - i0;
        sc.q.clear();
        sc.q.resize(group * n * d, 0.0);
        sc.pos.clear();
        for hh in 0..group {
            let h = g * group + hh;
            for i in i0..i1 {
                let r = hh * n + (i - i0);
                let src = &q[dims.q_off(b, i, h)..dims.q_off(b, i, h) + d];
                let dst = &mut sc.q[r * d..(r + 1) * d];
                E::load(src, dst);
                dst.iter_mut().for_each(|x| *x *= scale);
                sc.pos.push(dims.query_pos(i) as u32);
            }
        }
        let kv = KvHead { k, v, rows: layout.rows(dims, b, g), head_dim: d };
        let end = dims.query_pos(i1 - 1) as u32 + 1;
        let spans = [Span { start: 0, end, block: false }];
        attend(&kv, &spans, |p, j, _| j <= p, sc);
        for hh in 0..group {
            let h = g * group + hh;
            for i in i0..i1 {
                let r = hh * n + (i - i0);
                // SAFETY: row (b, i, h) belongs to this task only; the offset is in bounds.
                unsafe { ptr.write(dims.q_off(b, i, h), &sc.out[r * d..(r + 1) * d]) };
            }
        }
    });
    out
}
