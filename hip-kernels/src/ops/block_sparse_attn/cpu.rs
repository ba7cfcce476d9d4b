//! CPU block-sparse attention: one task per (batch, query head, query block); the task turns
//! sink, selected blocks and window into sorted disjoint key spans and runs the shared tile loop.

use rayon::prelude::*;

use crate::elem::Elem;
use crate::layout::AttnDims;
use crate::ops::hip_mask::HipMask;
use crate::ops::tile::{attend, KvHead, KvLayout, OutPtr, Scratch, Span};

pub(crate) fn block_sparse_attn_cpu<E: Elem>(
    q: &[E],
    k: &[E],
    v: &[E],
    dims: &AttnDims,
    layout: KvLayout<'_>,
    mask: &HipMask,
    scale: f32,
    extra_window: usize,
) -> Vec<f32> {
    let d = dims.head_dim;
    let mut out = vec![0f32; dims.batch * dims.t_q * dims.heads_q * d];
    let ptr = OutPtr(out.as_mut_ptr());
    let n_qb = mask.n_qblocks;
    let sink = mask.sink_tokens as u32;
    let window = (mask.window_tokens + extra_window) as u32;
    let group = dims.group();
    // One key/value head at a time, so both threads share its keys in the last-level cache.
    for (b, g) in (0..dims.batch).flat_map(|b| (0..dims.heads_kv).map(move |g| (b, g))) {
        (0..group * n_qb).into_par_iter().for_each_init(
            || (Scratch::default(), Vec::<Span>::new()),
            |(sc, spans), row| {
                let (h, m) = (g * group + row / n_qb, row % n_qb);
                let i0 = m * mask.block_size_q;
                let i1 = (i0 + mask.block_size_q).min(dims.t_q);
                let p_first = dims.query_pos(i0) as u32;
                let end = dims.query_pos(i1 - 1) as u32 + 1;
                build_spans(
                    mask.blocks(b, h, m),
                    mask.block_size_k as u32,
                    sink,
                    window,
                    p_first,
                    end,
                    spans,
                );
                sc.q.clear();
                sc.q.resize((i1 - i0) * d, 0.0);
                sc.pos.clear();
                for i in i0..i1 {
                    let r = i - i0;
                    let dst = &mut sc.q[r * d..(r + 1) * d];
                    E::load(&q[dims.q_off(b, i, h)..dims.q_off(b, i, h) + d], dst);
                    dst.iter_mut().for_each(|x| *x *= scale);
                    sc.pos.push(dims.query_pos(i) as u32);
                }
                let kv = KvHead { k, v, rows: layout.rows(dims, b, g), head_dim: d };
                attend(&kv, spans, |p, j, blk| j <= p && (j < sink || j + window > p || blk), sc);
                for i in i0..i1 {
                    let r = i - i0;
                    // SAFETY: row (b, i, h) belongs to this task only; the offset is in bounds.
                    unsafe { ptr.write(dims.q_off(b, i, h), &sc.out[r * d..(r + 1) * d]) };
                }
            },
        );
    }
    out
}

/// Sorted, disjoint spans covering the sink, the selected blocks and the window of a query block
/// whose queries sit at positions `p_first..end`. Tokens of a selected block are flagged even where
/// they also fall in the window, so queries whose window does not reach them still admit them.
pub(crate) fn build_spans(
    blocks: &[u32],
    block_size: u32,
    sink: u32,
    window: u32,
    p_first: u32,
    end: u32,
    spans: &mut Vec<Span>,
) {
    spans.clear();
    let sink_end = sink.min(end);
    if sink_end > 0 {
        spans.push(Span { start: 0, end: sink_end, block: false });
    }
    let win_start = (p_first + 1).saturating_sub(window).max(sink_end);
    let mut cursor = sink_end; // everything below is covered
    let push_window_until = |upto: u32, spans: &mut Vec<Span>, cursor: &mut u32| {
        let s = win_start.max(*cursor);
        if upto > s {
            spans.push(Span { start: s, end: upto, block: false });
            *cursor = upto;
        }
    };
    for &s in blocks {
        let bs = s.max(cursor);
        let be = s.saturating_add(block_size).min(end);
        if be <= bs {
            continue;
        }
        push_window_until(bs.min(end), spans, &mut cursor);
        match spans.last_mut() {
            Some(last) if last.block && last.end == bs => last.end = be,
            _ => spans.push(Span { start: bs, end: be, block: true }),
        }
        cursor = be;
    }
    push_window_until(end, spans, &mut cursor);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(spans: &[Span]) -> Vec<(u32, bool)> {
        spans.iter().flat_map(|s| (s.start..s.end).map(move |j| (j, s.block))).collect()
    }

    #[test]
    fn spans_are_disjoint_sorted_and_flag_blocks() {
        let mut spans = Vec::new();
        // sink 4, window 8, queries at 40..44, blocks of 2 at 10, 12, 30, 34 (34 overlaps the window).
        build_spans(&[10, 12, 30, 34], 2, 4, 8, 40, 44, &mut spans);
        let got = covered(&spans);
        let mut want: Vec<(u32, bool)> = (0..4).map(|j| (j, false)).collect();
        want.extend([(10, true), (11, true), (12, true), (13, true), (30, true), (31, true)]);
        want.extend([(33, false), (34, true), (35, true)]);
        want.extend((36..44).map(|j| (j, false)));
        assert_eq!(got, want);
        for w in spans.windows(2) {
            assert!(w[0].end <= w[1].start);
        }
    }

    #[test]
    fn spans_clip_at_the_causal_end() {
        let mut spans = Vec::new();
        build_spans(&[2, 4], 2, 2, 0, 4, 5, &mut spans);
        assert_eq!(covered(&spans), vec![(0, false), (1, false), (2, true), (3, true), (4, true)]);
        build_spans(&[], 2, 16, 4, 2, 3, &mut spans);
        assert_eq!(covered(&spans), vec![(0, false), (1, false), (2, false)]);
    }
}
