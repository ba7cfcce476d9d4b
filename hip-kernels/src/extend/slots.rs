//! Which keys a group of query blocks attends under Dynamic RoPE, and at which positions: the
//! gather plan of [`super::attend`], built on the host.
//!
//! Every row (query block `m`, query head `h`) gets `width` slots. The last `region` slots hold
//! the contiguous keys `p_last + 1 - region ..= p_last` (the window of every query of the block
//! plus the block itself); the slots before them hold, in order, the sink tokens and the tokens of
//! the mask's blocks that lie before that region; unused slots come first and are padding. A key
//! in slot `s` gets position `s`, a query `o` tokens before the block's last gets position
//! `width - 1 - o`: consecutive positions in original order with the newest key at the query's
//! position (StreamingLLM-style, hip-algorithm.md §2). Padding shifts every position of a row by
//! the same amount, which RoPE scores do not see.

use crate::layout::AttnDims;
use crate::ops::hip_mask::HipMask;

/// The slot layout of query blocks `m0..m1` (all holding `bq` queries).
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub m0: usize,
    /// First query of block `m0`.
    pub i0: usize,
    pub m1: usize,
    /// Queries per block.
    pub bq: usize,
    /// Slots per row.
    pub width: usize,
    /// Contiguous slots at the end of each row (see the module docs).
    pub region: usize,
    /// Window tokens per query (the mask's window plus the decode widening).
    pub window: usize,
    /// Per slot `[rows, width]`, rows = `(m - m0) * heads_q + h`: the sequence token, or `None`
    /// for padding.
    pub tokens: Vec<Option<u32>>,
    /// Per slot: attended by every query that the causal order allows (sink or a selected block),
    /// rather than only by queries whose window covers it.
    pub always: Vec<bool>,
}

/// Tokens of the region, counting the key of the block's first query's window start.
pub(crate) fn region_len(window: usize, bq: usize) -> usize {
    window.max(1) + bq - 1
}

/// The plan of query blocks `m0..m1` of `mask` for queries `dims` (`extra` widens the window,
/// as in decode). The blocks must hold the same number of queries.
pub(crate) fn plan(dims: &AttnDims, mask: &HipMask, extra: usize, m0: usize, m1: usize) -> Plan {
    let bqs = mask.block_size_q;
    let bq = (m0 * bqs + bqs).min(dims.t_q) - m0 * bqs;
    let window = mask.window_tokens + extra;
    let region = region_len(window, bq);
    let heads = dims.heads_q;
    // Per row: the tokens before the region, in order.
    let mut heads_lists: Vec<(usize, Vec<u32>, usize)> = Vec::with_capacity((m1 - m0) * heads);
    for m in m0..m1 {
        let p_last = dims.query_pos((m * bqs + bqs).min(dims.t_q) - 1);
        let region_start = (p_last + 1).saturating_sub(region);
        for h in 0..heads {
            let mut before = Vec::new();
            for j in 0..mask.sink_tokens.min(region_start) {
                before.push(j as u32);
            }
            for &s in mask.blocks(0, h, m) {
                let (s, e) = (s as usize, (s as usize + mask.block_size_k).min(region_start));
                for j in s.max(mask.sink_tokens)..e {
                    if before.last().is_none_or(|&l| (l as usize) < j) {
                        before.push(j as u32);
                    }
                }
            }
            heads_lists.push((m, before, p_last));
        }
    }
    let width = heads_lists.iter().map(|(_, b, _)| b.len()).max().unwrap_or(0) + region;
    let rows = heads_lists.len();
    let mut tokens = vec![None; rows * width];
    let mut always = vec![false; rows * width];
    for (r, (m, before, p_last)) in heads_lists.iter().enumerate() {
        let h = r % heads;
        let row = &mut tokens[r * width..(r + 1) * width];
        let alw = &mut always[r * width..(r + 1) * width];
        let pad = width - region - before.len();
        for (i, &j) in before.iter().enumerate() {
            row[pad + i] = Some(j);
            alw[pad + i] = true;
        }
        // Blocks are sorted ascending and region tokens ascend: one pass over both.
        let blocks = mask.blocks(0, h, *m);
        let mut b = 0;
        for c in 0..region {
            // Slot width - region + c holds token p_last + 1 - region + c.
            if let Some(j) = (p_last + 1 + c).checked_sub(region) {
                while b < blocks.len() && blocks[b] as usize + mask.block_size_k <= j {
                    b += 1;
                }
                let in_block = b < blocks.len() && blocks[b] as usize <= j;
                row[width - region + c] = Some(j as u32);
                alw[width - region + c] = j < mask.sink_tokens || in_block;
            }
        }
    }
    Plan { m0, i0: m0 * bqs, m1, bq, width, region, window, tokens, always }
}

impl Plan {
    /// The masks every row of the plan shares, `[bq, width]` as 0/1: causal order (a query sees
    /// the region's keys up to its own) and the query's window (region keys within its window).
    /// Slots before the region are causal for every query and outside every window.
    pub(crate) fn patterns(&self) -> (Vec<f32>, Vec<f32>) {
        let mut causal = vec![1f32; self.bq * self.width];
        let mut window = vec![0f32; self.bq * self.width];
        for t in 0..self.bq {
            let o = self.bq - 1 - t;
            for c in self.width - self.region..self.width {
                let r = self.width - 1 - c;
                causal[t * self.width + c] = f32::from(u8::from(r >= o));
                window[t * self.width + c] = f32::from(u8::from(r < self.window + o));
            }
        }
        (causal, window)
    }
}
