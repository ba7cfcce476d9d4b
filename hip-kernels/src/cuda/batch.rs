//! Decode batches: one new token for each of several sequences of different lengths, attended in
//! one launch per layer over a shared paged pool (dense, or HiP with per-sequence mask slots).

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};

use super::{
    check_search, cuda_dev, dense_attn_paged_cuda, launch_mask, span_attn, u32_ptr, CudaMask, CudaPagedKv,
    Keys, MaskOut, Paged,
};
use crate::error::{Error, Result};
use crate::layout::AttnDims;
use crate::ops::hip_mask::HipMask;
use crate::{HipConfig, MaskCache};

/// One decode step of several sequences over one layer's paged pool: the sequences' blocks in
/// the rows of one table, each sequence with its own length. [`dense_decode_paged_batch_cuda`]
/// attends all of them in one launch (instead of one [`dense_attn_paged_cuda`] per sequence).
#[derive(Debug, Clone, Copy)]
pub struct CudaPagedBatch<'a> {
    /// Key blocks `[num_blocks * block_size, heads_kv, head_dim]`, shared by the sequences.
    pub k: &'a Tensor,
    /// Value blocks, laid out like `k`.
    pub v: &'a Tensor,
    /// `[batch, width]` u32 on the device: row `b` lists sequence `b`'s blocks in order (its
    /// first `lens[b].div_ceil(block_size)` entries are read).
    pub block_tables: &'a Tensor,
    /// Tokens of each sequence, its newest included.
    pub lens: &'a [usize],
    /// `lens` as a u32 `[batch]` tensor on the device.
    pub lens_device: &'a Tensor,
    /// Tokens per block.
    pub block_size: usize,
}

impl CudaPagedBatch<'_> {
    /// Checks the batch and `q: [batch, 1, heads_q, head_dim]` against it; returns the dims of
    /// the launch (its `t_k` the longest sequence).
    fn dims(&self, q: &Tensor) -> Result<AttnDims> {
        let (nk, hkv, d) = self
            .k
            .dims3()
            .map_err(|_| Error::shape("k", "[num_blocks * block_size, heads_kv, head_dim]", self.k.dims()))?;
        if self.v.dims() != self.k.dims() {
            return Err(Error::shape("v", format!("the shape of k, {:?}", self.k.dims()), self.v.dims()));
        }
        let batch = self.lens.len();
        let (tb, width) = self
            .block_tables
            .dims2()
            .map_err(|_| Error::shape("block_tables", "[batch, width]", self.block_tables.dims()))?;
        let bs = self.block_size;
        let max_len = self.lens.iter().copied().max().unwrap_or(0);
        if batch == 0 || tb != batch || self.block_tables.dtype() != DType::U32 {
            return Err(Error::arg(
                "block_tables",
                format!("{:?} {:?}", self.block_tables.dtype(), self.block_tables.dims()),
                format!("must be u32 [{batch} (one row per length, at least one), width]"),
            ));
        }
        if bs == 0 || nk % bs != 0 || self.lens.contains(&0) || max_len > nk || width < max_len.div_ceil(bs) {
            return Err(Error::arg(
                "paged batch",
                format!("block_size {bs}, lens up to {max_len}, {nk} rows, tables {width} wide"),
                "block_size must divide the rows, every length 0 < len <= rows, the tables cover the longest",
            ));
        }
        if self.lens_device.dtype() != DType::U32 || self.lens_device.dims() != [batch] {
            return Err(Error::shape("lens_device", format!("u32 [{batch}]"), self.lens_device.dims()));
        }
        let (b, t_q, heads_q, qd) =
            q.dims4().map_err(|_| Error::shape("q", "[batch, 1, heads_q, head_dim]", q.dims()))?;
        if b != batch || t_q != 1 || qd != d || hkv == 0 || heads_q % hkv != 0 {
            return Err(Error::shape("q", format!("[{batch}, 1, a multiple of {hkv} heads, {d}]"), q.dims()));
        }
        if cfg!(debug_assertions) {
            let lens = self.lens_device.to_vec1::<u32>()?;
            if lens.iter().zip(self.lens).any(|(&a, &b)| a as usize != b) {
                return Err(Error::arg(
                    "lens_device",
                    format!("{lens:?}"),
                    format!("must equal lens {:?}", self.lens),
                ));
            }
        }
        Ok(AttnDims { batch, t_q: 1, t_k: max_len, heads_q, heads_kv: hkv, head_dim: d })
    }
}

impl CudaPagedBatch<'_> {
    /// The batch as the kernels' paged view, `t_k` the longest sequence.
    fn paged(&self, t_k: usize) -> Paged<'_> {
        Paged {
            table: self.block_tables,
            page: self.block_size,
            t_k,
            lens: Some(self.lens_device),
            offload: None,
        }
    }
}

/// Dense attention of one new token per sequence over a [`CudaPagedBatch`]: `q: [batch, 1,
/// heads_q, head_dim]` (bf16 or f16 like the pool) gives `[batch, 1, heads_q, head_dim]`, row `b`
/// what [`dense_attn_paged_cuda`] gives sequence `b` alone. GQA groups up to 8 query heads per
/// KV head run as one launch for the whole batch; larger groups run sequence by sequence.
///
/// # Errors
/// Shapes or lengths that do not fit (typed, naming the argument); unsupported dtypes or head
/// dims.
pub fn dense_decode_paged_batch_cuda(q: &Tensor, kv: &CudaPagedBatch<'_>, scale: f32) -> Result<Tensor> {
    let dims = kv.dims(q)?;
    crate::layout::check_scale(scale)?;
    if dims.heads_q / dims.heads_kv > 8 {
        let mut outs = Vec::with_capacity(dims.batch);
        for (b, &len) in kv.lens.iter().enumerate() {
            let table = kv.block_tables.get(b)?;
            let one = CudaPagedKv { k: kv.k, v: kv.v, block_table: &table, block_size: kv.block_size, len };
            outs.push(dense_attn_paged_cuda(&q.narrow(0, b, 1)?, &one, scale)?);
        }
        return Ok(Tensor::cat(&outs, 0)?);
    }
    let paged = kv.paged(dims.t_k);
    span_attn(q, kv.k, kv.v, &dims, Keys::Dense, Some(paged), scale)
}

/// The decode masks of one layer for a batch of sequences, one slot per sequence, on the device:
/// [`hip_decode_paged_batch_cuda`] estimates the masks of the sequences due for a refresh into
/// their slots in one launch and attends every sequence through its slot in another, so a step
/// of many sequences costs two launches per layer instead of two per sequence and layer. The
/// store grows as larger slots are asked for (keeping what it holds).
#[derive(Debug)]
pub struct CudaMaskSlots {
    /// Tells stores apart (a [`MaskCache`] remembers which store's slot holds its mask).
    id: u64,
    bufs: Option<SlotBufs>,
}

#[derive(Debug)]
struct SlotBufs {
    /// Block starts `[slots, heads, 1, groups]`, u32.
    starts: Tensor,
    /// Used slots per row `[slots, heads, 1]`, u32.
    counts: Tensor,
    /// Keys each slot's mask was estimated over `[slots]`, u32.
    tks: Tensor,
}

impl Default for CudaMaskSlots {
    fn default() -> Self {
        Self::new()
    }
}

impl CudaMaskSlots {
    /// An empty store (allocated on first use).
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        CudaMaskSlots { id: NEXT.fetch_add(1, Ordering::Relaxed), bufs: None }
    }

    /// Slots allocated.
    pub fn capacity(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.tks.dims1().unwrap_or(0))
    }

    /// Buffers for at least `slots` slots of `heads × groups` blocks: grown (contents kept) when
    /// too small, replaced under a new id when the geometry changed.
    fn ensure(
        &mut self,
        slots: usize,
        heads: usize,
        groups: usize,
        dev: &Device,
    ) -> Result<(u64, &SlotBufs)> {
        let cap = self.capacity();
        let fits = self.bufs.as_ref().is_some_and(|b| b.starts.dims()[1..] == [heads, 1, groups]);
        if fits && cap >= slots {
            return Ok((self.id, self.bufs.as_ref().expect("checked above")));
        }
        let n = if fits { slots.max(2 * cap) } else { slots.max(16) };
        let new = SlotBufs {
            starts: Tensor::zeros((n, heads, 1, groups), DType::U32, dev)?,
            counts: Tensor::zeros((n, heads, 1), DType::U32, dev)?,
            tks: Tensor::zeros(n, DType::U32, dev)?,
        };
        match (&self.bufs, fits) {
            (Some(old), true) => {
                new.starts.slice_set(&old.starts, 0, 0)?;
                new.counts.slice_set(&old.counts, 0, 0)?;
                new.tks.slice_set(&old.tks, 0, 0)?;
            }
            _ => self.id = CudaMaskSlots::new().id,
        }
        Ok((self.id, self.bufs.insert(new)))
    }
}

/// One HiP decode step of several sequences over one layer's paged pool, in two launches: the
/// mask search for the sequences due for a refresh (their [`MaskCache`]s' schedule, as
/// [`super::hip_attn_decode_paged_cuda`] keeps it), written into their slots of `masks`, then
/// block-sparse attention of every sequence through its slot, the window of each widened by the
/// tokens appended since its mask was estimated.
///
/// `q: [batch, 1, heads_q, head_dim]` (the pool's dtype); `slots[b]` is sequence `b`'s slot
/// (distinct), `slots_device` the same as a u32 `[batch]` tensor, `caches[b]` its mask cache.
/// Row `b` of the result is what [`super::hip_attn_decode_paged_cuda`] gives sequence `b` alone
/// with the same cache: a cache whose mask another path estimated is copied into its slot first,
/// and a cache refreshed here keeps a view of its slot, so the two paths can alternate.
///
/// # Errors
/// Shapes, lengths, slots or caches that do not fit the batch (typed, naming the argument); as
/// [`super::hip_mask_paged_cuda`] for the config, dtypes and head dims.
#[allow(clippy::too_many_arguments)]
pub fn hip_decode_paged_batch_cuda(
    q: &Tensor,
    kv: &CudaPagedBatch<'_>,
    cfg: &HipConfig,
    scale: f32,
    masks: &mut CudaMaskSlots,
    slots: &[usize],
    slots_device: &Tensor,
    caches: &mut [&mut MaskCache],
) -> Result<Tensor> {
    let dims = kv.dims(q)?;
    let groups = check_search(q, kv.k, &dims, cfg, scale)?;
    let batch = dims.batch;
    let mut seen = slots.to_vec();
    seen.sort_unstable();
    seen.dedup();
    if slots.len() != batch || seen.len() != batch {
        return Err(Error::arg("slots", format!("{slots:?}"), format!("must be {batch} distinct slots")));
    }
    if caches.len() != batch {
        return Err(Error::arg("caches", caches.len(), format!("must be {batch}, one per sequence")));
    }
    if slots_device.dtype() != DType::U32 || slots_device.dims() != [batch] {
        return Err(Error::shape("slots_device", format!("u32 [{batch}]"), slots_device.dims()));
    }
    if cfg!(debug_assertions) {
        let on_dev = slots_device.to_vec1::<u32>()?;
        if on_dev.iter().zip(slots).any(|(&a, &b)| a as usize != b) {
            return Err(Error::arg(
                "slots_device",
                format!("{on_dev:?}"),
                format!("must equal slots {slots:?}"),
            ));
        }
    }
    let dev = q.device().clone();
    let cdev = cuda_dev(q)?;
    let heads = dims.heads_q;
    let top = seen.last().map_or(0, |s| s + 1);
    let (id, bufs) = masks.ensure(top, heads, groups, &dev)?;
    let cap = bufs.tks.dims1()?;

    // Which sequences refresh; the others' masks must be in their slots.
    let mut due = Vec::new();
    for (b, cache) in caches.iter_mut().enumerate() {
        let one = AttnDims { batch: 1, t_q: 1, t_k: kv.lens[b], ..dims };
        if cache.due(&one, cfg) {
            due.push(b);
        } else if cache.slot() != Some((id, slots[b])) {
            let m = cache.device_mask().expect("a cache not due holds a mask");
            bufs.starts.slice_set(&m.starts, 0, slots[b])?;
            bufs.counts.slice_set(&m.counts, 0, slots[b])?;
            bufs.tks.slice_set(&Tensor::from_slice(&[m.meta.t_k as u32], 1, &dev)?, 0, slots[b])?;
            cache.set_slot(id, slots[b]);
        }
    }
    let meta = |batch: usize, t_k: usize| HipMask {
        batch,
        heads,
        n_qblocks: 1,
        max_blocks: groups,
        block_size_q: cfg.block_size_q,
        block_size_k: cfg.block_size_k,
        sink_tokens: cfg.sink_tokens,
        window_tokens: cfg.window_tokens,
        t_k,
        block_starts: Vec::new(),
        counts: Vec::new(),
    };
    if !due.is_empty() {
        // All of them (sequences stepping in lockstep), or a gathered sub-batch.
        let picked;
        let (qr, tables, lens, slots_r) = if due.len() == batch {
            (q.clone(), kv.block_tables.clone(), kv.lens_device.clone(), slots_device.clone())
        } else {
            let idx: Vec<u32> = due.iter().map(|&b| b as u32).collect();
            picked = Tensor::from_vec(idx, due.len(), &dev)?;
            (
                q.index_select(&picked, 0)?,
                kv.block_tables.index_select(&picked, 0)?,
                kv.lens_device.index_select(&picked, 0)?,
                slots_device.index_select(&picked, 0)?,
            )
        };
        let t_k = due.iter().map(|&b| kv.lens[b]).max().unwrap_or(1);
        let dims_r = AttnDims { batch: due.len(), t_k, ..dims };
        let paged = Paged { table: &tables, page: kv.block_size, t_k, lens: Some(&lens), offload: None };
        let out = MaskOut {
            starts: u32_ptr(&bufs.starts, &cdev)?,
            counts: u32_ptr(&bufs.counts, &cdev)?,
            slots: u32_ptr(&slots_r, &cdev)?,
            tks: u32_ptr(&bufs.tks, &cdev)?,
        };
        launch_mask(&qr.contiguous()?, kv.k, &dims_r, Some(paged), cfg, scale, &cdev, out, 1)?;
        for &b in &due {
            let s = slots[b];
            let view = CudaMask {
                starts: bufs.starts.narrow(0, s, 1)?,
                counts: bufs.counts.narrow(0, s, 1)?,
                meta: meta(1, kv.lens[b]),
            };
            caches[b].refreshed(view, id, s);
        }
    }
    let all = CudaMask { starts: bufs.starts.clone(), counts: bufs.counts.clone(), meta: meta(cap, 0) };
    let keys = Keys::Slots { mask: &all, slots: slots_device, tks: &bufs.tks };
    let paged = kv.paged(dims.t_k);
    let out = span_attn(q, kv.k, kv.v, &dims, keys, Some(paged), scale)?;
    for cache in caches.iter_mut() {
        cache.stepped();
    }
    Ok(out)
}
