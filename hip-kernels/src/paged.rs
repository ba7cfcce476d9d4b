//! The ops over one sequence stored in a **paged** KV cache (fixed-size blocks of tokens named by
//! a block table), so an engine can attend without copying its cache into a contiguous tensor.

use candle_core::{DType, Device, Tensor};

use crate::config::HipConfig;
use crate::error::{Error, Result};
use crate::layout::{check_scale, AttnDims, MAX_HEAD_DIM};
use crate::mask_cache::MaskCache;
use crate::ops::block_sparse_attn::cpu::block_sparse_attn_cpu;
use crate::ops::dense_attn::cpu::dense_attn_cpu;
use crate::ops::hip_mask::cpu::hip_mask_cpu;
use crate::ops::hip_mask::HipMask;
use crate::ops::tile::KvLayout;
use crate::ops::with_cpu_data;

/// The keys and values of one sequence in a paged cache (f32).
///
/// `k` and `v` hold whole blocks laid out `[blocks, block_size, heads_kv, head_dim]`; token `j`
/// of the sequence lives in block `block_table[j / block_size]` at slot `j % block_size`. The
/// sequence has `len` tokens.
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a> {
    /// Key blocks.
    pub k: &'a [f32],
    /// Value blocks, laid out like `k`.
    pub v: &'a [f32],
    /// Block of each group of `block_size` tokens, in order.
    pub block_table: &'a [u32],
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads.
    pub heads_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Tokens in the sequence.
    pub len: usize,
}

impl PagedKv<'_> {
    /// Checks the view and the queries against it, returning the call's sizes.
    ///
    /// # Errors
    /// [`Error::Shape`] for a q that is not `[1, t_q, heads_q, head_dim]` with `t_q <= len` and
    /// `heads_q` a multiple of `heads_kv`; [`Error::InvalidArgument`] for an inconsistent view
    /// (sizes zero, buffers of different or partial-block lengths, a table too short for `len`, a
    /// block index out of range).
    pub fn dims(&self, q: &Tensor) -> Result<AttnDims> {
        let (bs, hkv, d) = (self.block_size, self.heads_kv, self.head_dim);
        if bs == 0 || hkv == 0 || d == 0 || d > MAX_HEAD_DIM || self.len == 0 {
            return Err(Error::arg(
                "paged kv",
                format!("block_size {bs}, heads_kv {hkv}, head_dim {d}, len {}", self.len),
                format!("sizes must be non-zero, head_dim <= {MAX_HEAD_DIM}"),
            ));
        }
        let block_elems = bs * hkv * d;
        if self.k.len() != self.v.len() || self.k.len() % block_elems != 0 {
            return Err(Error::arg(
                "paged kv",
                format!("k {} / v {} floats", self.k.len(), self.v.len()),
                format!("k and v must hold the same whole number of {block_elems}-float blocks"),
            ));
        }
        let blocks = self.k.len() / block_elems;
        let needed = self.len.div_ceil(bs);
        let table = self.block_table.get(..needed).ok_or_else(|| {
            Error::arg(
                "block_table",
                format!("{} entries", self.block_table.len()),
                format!("{} tokens need {needed} blocks", self.len),
            )
        })?;
        if let Some(&bad) = table.iter().find(|&&b| b as usize >= blocks) {
            return Err(Error::arg("block_table", bad, format!("block index out of range (< {blocks})")));
        }
        let qd = q.dims();
        if qd.len() != 4 || qd[0] != 1 || qd[1] == 0 || qd[1] > self.len || qd[3] != d || qd[2] % hkv != 0 {
            return Err(Error::shape("q", format!("[1, 1..={}, a multiple of {hkv}, {d}]", self.len), qd));
        }
        Ok(AttnDims { batch: 1, t_q: qd[1], t_k: self.len, heads_q: qd[2], heads_kv: hkv, head_dim: d })
    }

    fn layout(&self) -> KvLayout<'_> {
        KvLayout::Paged { table: self.block_table, block_size: self.block_size }
    }
}

fn q_f32(q: &Tensor) -> Result<Tensor> {
    crate::elem::check_dtype("q", q)?;
    crate::ops::require_cpu("paged attention", &[q])?;
    Ok(q.to_dtype(DType::F32)?.contiguous()?)
}

fn output(dims: &AttnDims, data: Vec<f32>) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, (1, dims.t_q, dims.heads_q, dims.head_dim), &Device::Cpu)?)
}

/// [`crate::dense_attn`] over a paged sequence. `q: [1, t_q, heads_q, head_dim]` (any supported
/// dtype; computed in f32), queries are the last `t_q` of `kv.len` positions. Returns f32
/// `[1, t_q, heads_q, head_dim]`.
///
/// # Errors
/// See [`PagedKv::dims`]; a bad scale.
pub fn dense_attn_paged(q: &Tensor, kv: &PagedKv<'_>, scale: f32) -> Result<Tensor> {
    let dims = kv.dims(q)?;
    check_scale(scale)?;
    let q = q_f32(q)?;
    let out =
        with_cpu_data::<f32, _>("q", &q, |qd| Ok(dense_attn_cpu(qd, kv.k, kv.v, &dims, kv.layout(), scale)))?;
    output(&dims, out)
}

/// [`crate::hip_mask`] over a paged sequence.
///
/// # Errors
/// See [`PagedKv::dims`]; an invalid config or scale.
pub fn hip_mask_paged(q: &Tensor, kv: &PagedKv<'_>, cfg: &HipConfig, scale: f32) -> Result<HipMask> {
    cfg.validate()?;
    let dims = kv.dims(q)?;
    check_scale(scale)?;
    let q = q_f32(q)?;
    with_cpu_data::<f32, _>("q", &q, |qd| Ok(hip_mask_cpu(qd, kv.k, &dims, kv.layout(), cfg, scale)))
}

/// [`crate::block_sparse_attn`] over a paged sequence. Returns f32 `[1, t_q, heads_q, head_dim]`.
///
/// # Errors
/// See [`PagedKv::dims`]; a bad scale; a mask that does not fit.
pub fn block_sparse_attn_paged(
    q: &Tensor,
    kv: &PagedKv<'_>,
    mask: &HipMask,
    scale: f32,
    extra_window_tokens: usize,
) -> Result<Tensor> {
    let dims = kv.dims(q)?;
    check_scale(scale)?;
    mask.check_fits(&dims)?;
    let q = q_f32(q)?;
    let out = with_cpu_data::<f32, _>("q", &q, |qd| {
        Ok(block_sparse_attn_cpu(qd, kv.k, kv.v, &dims, kv.layout(), mask, scale, extra_window_tokens))
    })?;
    output(&dims, out)
}

/// [`crate::hip_attn`] over a paged sequence.
///
/// # Errors
/// As [`hip_mask_paged`] and [`block_sparse_attn_paged`].
pub fn hip_attn_paged(q: &Tensor, kv: &PagedKv<'_>, cfg: &HipConfig, scale: f32) -> Result<Tensor> {
    let dims = kv.dims(q)?;
    crate::mask_cache::with_prefill_tail(q, dims.t_q, cfg, |q, cut, cfg| {
        let kv = PagedKv { len: kv.len - cut, ..*kv };
        let mask = hip_mask_paged(q, &kv, cfg, scale)?;
        block_sparse_attn_paged(q, &kv, &mask, scale, 0)
    })
}

/// [`crate::hip_attn_decode`] over a paged sequence.
///
/// # Errors
/// As [`hip_mask_paged`] and [`block_sparse_attn_paged`].
pub fn hip_attn_decode_paged(
    q: &Tensor,
    kv: &PagedKv<'_>,
    cfg: &HipConfig,
    scale: f32,
    cache: &mut MaskCache,
) -> Result<Tensor> {
    let dims = kv.dims(q)?;
    cache.step(
        &dims,
        cfg,
        || hip_mask_paged(q, kv, cfg, scale),
        |mask, extra| block_sparse_attn_paged(q, kv, mask, scale, extra),
    )
}
