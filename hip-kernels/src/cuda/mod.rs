//! CUDA implementations (feature `cuda`): dense and block-sparse attention as one "key span"
//! kernel (`kernels/span_attn.cu`), prefill with tensor-core tiles and decode as split-KV
//! flash-decoding with a combine step. The public ops ([`crate::dense_attn`],
//! [`crate::block_sparse_attn`] and their paged forms) dispatch here for CUDA tensors.
//!
//! Supported on CUDA: bf16 and f16 (f32 accumulation), head dims 64 and 128, GQA, query offsets,
//! contiguous or paged K/V. Masks whose query blocks are a multiple of 16 run on the tensor-core
//! prefill kernel; other query blocks (e.g. the one-query blocks of a prefill tail) and up to 8
//! queries run on the per-query split-KV kernel. Anything else is a typed error before any launch.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError, LaunchConfig,
    PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CpuStorage, CudaStorage, DType, Device, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::layout::AttnDims;
use crate::ops::hip_mask::HipMask;
use launch::Launch;

mod batch;
mod fused;
mod launch;
mod mask;
mod offload;
mod qkv;
pub use batch::{dense_decode_paged_batch_cuda, hip_decode_paged_batch_cuda, CudaMaskSlots, CudaPagedBatch};
pub use fused::{
    add_rms_norm_cuda, argmax_rows_cuda, matmul_small_cuda, matmul_small_cuda_form, matmul_small_glu_cuda,
    silu_mul_cuda, to_f32_cuda, SmallMatmulForm, MATMUL_SMALL_MAX_ROWS,
};
pub use mask::hip_mask_cuda;
use mask::{check_search, launch_mask, mask_search, MaskOut};
pub use offload::{
    dense_attn_offload_cuda, free_gpu_bytes, hip_attn_decode_offload_cuda, hip_attn_offload_cuda, GpuCache,
    HostKvStore, LayerCaches, OffloadedKv,
};
pub use qkv::{qkv_rope_write_cuda, QkvRopeWrite};

/// `span_attn.cu` compiled by `build.rs`: SASS for sm_90 plus PTX (loaded without JIT on Hopper).
const SPAN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/span_attn.fatbin"));
const SPAN_MODULE: &str = "hip_span_attn";
/// `prefill_sm90.cu` (sm_90a only; empty when built for another target).
const SM90: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/prefill_sm90.fatbin"));
const SM90_MODULE: &str = "hip_prefill_sm90";

/// Whether the Hopper dense prefill (`prefill_sm90.cu`) runs on `dev`: built in, a compute
/// capability 9.0 device, and not turned off with `HIP_CUDA_WGMMA=0` (for comparisons).
fn sm90(dev: &CudaDevice) -> bool {
    if SM90.is_empty() || wgmma_mode() == "0" {
        return false;
    }
    dev.cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .is_ok_and(|major| major == 9)
}

/// `HIP_CUDA_WGMMA` picks the Hopper prefill's form (for comparisons): `0` none (the `mma.sync`
/// kernel runs), `pp` the consumer warpgroups taking turns at the tensor cores (ping-pong).
/// Unset or anything else: the default (a producer warpgroup, consumers issuing freely).
fn wgmma_mode() -> &'static str {
    static MODE: OnceLock<String> = OnceLock::new();
    MODE.get_or_init(|| std::env::var("HIP_CUDA_WGMMA").unwrap_or_default())
}

/// A kernel of one of our modules, loading the module into the device's context once.
fn func(
    dev: &CudaDevice,
    image: &'static [u8],
    module: &'static str,
    name: &str,
) -> candle_core::Result<CudaFunction> {
    type Modules = HashMap<(usize, &'static str), Arc<CudaModule>>;
    static MODULES: OnceLock<Mutex<Modules>> = OnceLock::new();
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let key = (Arc::as_ptr(ctx) as usize, module);
    let m = {
        let mut map = MODULES.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(&key) {
            Some(m) => Arc::clone(m),
            None => {
                let m = ctx.load_module(Ptx::from_binary(image.to_vec())).map_err(cuda_err)?;
                map.insert(key, Arc::clone(&m));
                m
            }
        }
    };
    m.load_function(name).map_err(cuda_err)
}

/// Queries per decode launch at most; more go through the prefill kernel.
const DECODE_MAX_TQ: usize = 8;

/// `KvArgs` of `span_attn.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct KvArgs {
    k: u64,
    v: u64,
    kv_b: i64,
    kv_t: i64,
    table: u64,
    table_stride: i32,
    page: i32,
    t_k: i32,
    heads_kv: i32,
    // Offloading (zero without): see `Residency`.
    res: u64,
    bank_k: u64,
    bank_v: u64,
    seen: u64,
    list: u64,
    list_n: u64,
    res_stride: i64,
    epoch: i32,
    list_cap: i32,
    stage: StageArgs,
    /// Per batch entry token counts (u32 on the device; 0: all `t_k`), only the dense decode
    /// kernel reads it.
    lens: u64,
}
// SAFETY: plain old data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for KvArgs {}

/// `StageArgs` of `common.cuh`: the staging area of missed rows of an offload cache (all zero:
/// none), `1 << bits` places of a key row (and a value row), each tagged with the epoch and
/// entry it holds.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct StageArgs {
    pub(crate) k: u64,
    pub(crate) v: u64,
    pub(crate) tag: u64,
    pub(crate) bits: i32,
}

impl KvArgs {
    /// Whether the decode kernels stage the rows they read over the bus (`kv_stages` in
    /// `common.cuh`: an offload cache with miss staging, while recording).
    fn stages(&self) -> bool {
        self.stage.tag != 0 && self.seen != 0
    }

    /// Contiguous `[batch, t_k, heads_kv, hd]` K/V at `k`/`v`, no offloading.
    fn contiguous(k: u64, v: u64, dims: &AttnDims) -> Self {
        let row_kv = (dims.heads_kv * dims.head_dim) as i64;
        KvArgs {
            k,
            v,
            kv_b: dims.t_k as i64 * row_kv,
            kv_t: row_kv,
            table: 0,
            table_stride: 0,
            page: 1,
            t_k: dims.t_k as i32,
            heads_kv: dims.heads_kv as i32,
            res: 0,
            bank_k: 0,
            bank_v: 0,
            seen: 0,
            list: 0,
            list_n: 0,
            res_stride: 0,
            epoch: 0,
            list_cap: 0,
            stage: StageArgs::default(),
            lens: 0,
        }
    }

    /// Points at the paged storage `paged` describes (the pointers stay `k`/`v`).
    fn page(&mut self, p: &Paged<'_>, dev: &CudaDevice) -> candle_core::Result<()> {
        self.table = u32_ptr(p.table, dev)?;
        // One row per batch entry (a 1-D table: batch 1).
        self.table_stride = p.table.dims().last().copied().unwrap_or(0) as i32;
        if let Some(lens) = p.lens {
            self.lens = u32_ptr(lens, dev)?;
        }
        self.page = p.page as i32;
        self.t_k = p.t_k as i32;
        if let Some(r) = &p.offload {
            self.offload(r);
        }
        Ok(())
    }

    /// Offloading: the rows live in the host store of `r`; the pointers this held (those of the
    /// tensors the op was given) become the bank's.
    fn offload(&mut self, r: &Residency) {
        self.bank_k = self.k;
        self.bank_v = if r.has_values { self.v } else { 0 };
        self.k = r.host_k;
        self.v = r.host_v;
        self.res = r.table;
        self.seen = r.seen;
        self.list = r.list;
        self.list_n = r.list_n;
        self.res_stride = r.stride;
        self.epoch = r.epoch;
        self.list_cap = r.list_cap;
        self.stage = r.stage;
    }
}

/// `MaskArgs` of `span_attn.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct MaskArgs {
    starts: u64,
    counts: u64,
    n_qblocks: i32,
    max_blocks: i32,
    block_q: i32,
    block_k: i32,
    sink: i32,
    window: i64,
    /// Decode batches over mask slots ([`Keys::Slots`]; zero otherwise): u32 `[batch]` slot of
    /// each entry and u32 `[slots]` keys each slot's mask was estimated over.
    slots: u64,
    tks: u64,
}
// SAFETY: as above.
unsafe impl DeviceRepr for MaskArgs {}

/// A [`HipMask`] uploaded to a CUDA device.
#[derive(Debug, Clone)]
pub struct CudaMask {
    /// Block starts `[batch, heads, n_qblocks, max_blocks]`, u32.
    pub starts: Tensor,
    /// Used slots per row `[batch, heads, n_qblocks]`, u32.
    pub counts: Tensor,
    /// Geometry and sink/window of the mask (its `block_starts`/`counts` left empty).
    pub meta: HipMask,
}

impl CudaMask {
    /// Uploads `mask` to `device`.
    ///
    /// # Errors
    /// Candle errors (allocation, copy).
    pub fn new(mask: &HipMask, device: &Device) -> Result<Self> {
        let m = mask;
        let starts = if m.max_blocks == 0 {
            // No slot at all: one dummy slot per row (every count is 0).
            Tensor::zeros((m.batch, m.heads, m.n_qblocks, 1), DType::U32, device)?
        } else {
            Tensor::from_slice(&m.block_starts, (m.batch, m.heads, m.n_qblocks, m.max_blocks), device)?
        };
        let counts = Tensor::from_slice(&m.counts, (m.batch, m.heads, m.n_qblocks), device)?;
        let meta = HipMask {
            batch: m.batch,
            heads: m.heads,
            n_qblocks: m.n_qblocks,
            max_blocks: m.max_blocks.max(1),
            block_size_q: m.block_size_q,
            block_size_k: m.block_size_k,
            sink_tokens: m.sink_tokens,
            window_tokens: m.window_tokens,
            t_k: m.t_k,
            block_starts: Vec::new(),
            counts: Vec::new(),
        };
        Ok(CudaMask { starts, counts, meta })
    }
}

/// Which keys the queries see.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Keys<'a> {
    /// Causal dense attention.
    Dense,
    /// Sink + window (+ `extra` tokens) + the mask's blocks.
    Mask(&'a CudaMask, usize),
    /// A decode batch (one query per entry): entry `b` sees sink + window + the blocks of batch
    /// row `slots[b]` of `mask`, the window widened by its length minus `tks[slots[b]]` (the keys
    /// that row was estimated over). u32 tensors on the device.
    Slots { mask: &'a CudaMask, slots: &'a Tensor, tks: &'a Tensor },
}

/// Paged K/V: storages `[num_blocks * page, heads_kv, head_dim]` and a block table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Paged<'a> {
    /// Block table `[batch, table_stride]`, u32 on the device.
    pub(crate) table: &'a Tensor,
    pub(crate) page: usize,
    /// Tokens (with `lens`: the longest entry's).
    pub(crate) t_k: usize,
    /// Tokens of each batch entry, u32 `[batch]` on the device (decode batches: the dense and
    /// span decode kernels and the mask search read it).
    pub(crate) lens: Option<&'a Tensor>,
    /// Offloading: the storages given to the op are the GPU bank, the rows live in a host store.
    pub(crate) offload: Option<Residency>,
}

/// Where an offloaded layer's rows are (see [`offload`]): the host store (mapped pinned
/// memory), the page table of one GPU cache and its access recording. Device pointers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Residency {
    pub(crate) host_k: u64,
    pub(crate) host_v: u64,
    /// The bank holds values too (the sparse-attention cache; the mask cache holds keys only).
    pub(crate) has_values: bool,
    pub(crate) table: u64,
    pub(crate) seen: u64,
    pub(crate) list: u64,
    pub(crate) list_n: u64,
    pub(crate) stride: i64,
    pub(crate) epoch: i32,
    pub(crate) list_cap: i32,
    /// Staging area of missed rows (default: none).
    pub(crate) stage: StageArgs,
}

/// Checks what the CUDA kernels support.
pub(crate) fn check(dims: &AttnDims, dtype: DType, keys: &Keys<'_>) -> Result<()> {
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return Err(Error::DType { name: "q", expected: "bf16 or f16 on CUDA".into(), got: dtype });
    }
    if !matches!(dims.head_dim, 64 | 128) {
        return Err(Error::arg("head_dim", dims.head_dim, "CUDA kernels support head dims 64 and 128"));
    }
    if let Keys::Mask(m, _) | Keys::Slots { mask: m, .. } = keys {
        if m.meta.block_size_q == 0 {
            return Err(Error::arg("block_size_q", 0, "must be at least 1"));
        }
    }
    Ok(())
}

fn cuda_dev(t: &Tensor) -> Result<CudaDevice> {
    cuda_device(t.device(), "span attention")
}

/// [`Error::UnsupportedDevice`] naming `op` for the first of `tensors` not on `like`'s device.
fn check_same_device<'a>(
    like: &Tensor,
    tensors: impl IntoIterator<Item = &'a Tensor>,
    op: &'static str,
) -> Result<()> {
    match tensors.into_iter().find(|t| !t.device().same_device(like.device())) {
        Some(t) => Err(Error::UnsupportedDevice { op, device: format!("{:?}", t.device().location()) }),
        None => Ok(()),
    }
}

/// The CUDA device of `device`, or [`Error::UnsupportedDevice`] naming `op`.
fn cuda_device(device: &Device, op: &'static str) -> Result<CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d.clone()),
        d => Err(Error::UnsupportedDevice { op, device: format!("{:?}", d.location()) }),
    }
}

/// Attention of `q` over `k`/`v` (contiguous `[batch, t_k, heads_kv, head_dim]`, or paged) on the
/// keys `keys` selects. `dims` are the checked logical dims (t_k = context length).
pub(crate) fn span_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: &AttnDims,
    keys: Keys<'_>,
    paged: Option<Paged<'_>>,
    scale: f32,
) -> Result<Tensor> {
    check(dims, q.dtype(), &keys)?;
    for (name, t) in [("k", k), ("v", v)] {
        if t.dtype() != q.dtype() {
            return Err(Error::DType { name, expected: format!("{:?} like q", q.dtype()), got: t.dtype() });
        }
    }
    let dev = cuda_dev(q)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let op = SpanOp { dims: *dims, keys, paged, scale, dev };
    Ok(q.apply_op3_no_bwd(&k, &v, &op)?)
}

struct SpanOp<'a> {
    dims: AttnDims,
    keys: Keys<'a>,
    paged: Option<Paged<'a>>,
    scale: f32,
    dev: CudaDevice,
}

/// The device pointer of a contiguous u32 tensor.
fn u32_ptr(t: &Tensor, dev: &CudaDevice) -> candle_core::Result<u64> {
    dev_ptr::<u32>(t, dev)
}

/// The device pointer of a contiguous tensor of element type `T` (at its start offset).
fn dev_ptr<T: CudaDType>(t: &Tensor, dev: &CudaDevice) -> candle_core::Result<u64> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*st else { candle_core::bail!("expected a CUDA tensor") };
    let s = cs.as_cuda_slice::<T>()?;
    let stream = dev.cuda_stream();
    let (p, _sync) = s.device_ptr(&stream);
    Ok(p + (l.start_offset() * std::mem::size_of::<T>()) as u64)
}

impl SpanOp<'_> {
    fn run<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let d = &self.dims;
        let dev = &self.dev;
        let stream = dev.cuda_stream();
        let esize = std::mem::size_of::<T>() as u64;
        let (qs, ks, vs) = (q.as_cuda_slice::<T>()?, k.as_cuda_slice::<T>()?, v.as_cuda_slice::<T>()?);
        let (qp, _g1) = qs.device_ptr(&stream);
        let (kp, _g2) = ks.device_ptr(&stream);
        let (vp, _g3) = vs.device_ptr(&stream);
        let qp = qp + ql.start_offset() as u64 * esize;
        let kp = kp + kl.start_offset() as u64 * esize;
        let vp = vp + vl.start_offset() as u64 * esize;
        let hd = d.head_dim;
        let mut kv = KvArgs::contiguous(kp, vp, d);
        if let Some(p) = &self.paged {
            kv.page(p, dev)?;
        }
        let (mask, block_q, l_max) = match self.keys {
            Keys::Dense => (
                MaskArgs {
                    starts: 0,
                    counts: 0,
                    n_qblocks: 1,
                    max_blocks: 0,
                    block_q: i32::MAX,
                    block_k: 1,
                    sink: 0,
                    window: i64::MAX / 4,
                    slots: 0,
                    tks: 0,
                },
                128,
                d.t_k,
            ),
            Keys::Mask(m, _) | Keys::Slots { mask: m, .. } => {
                let (extra, slots, tks) = match self.keys {
                    Keys::Slots { slots, tks, .. } => (0, u32_ptr(slots, dev)?, u32_ptr(tks, dev)?),
                    Keys::Mask(_, extra) => (extra, 0, 0),
                    Keys::Dense => unreachable!("matched above"),
                };
                let meta = &m.meta;
                let window = meta.window_tokens + extra;
                let l_max = meta.sink_tokens + meta.max_blocks * meta.block_size_k + window + d.t_q;
                (
                    MaskArgs {
                        starts: u32_ptr(&m.starts, dev)?,
                        counts: u32_ptr(&m.counts, dev)?,
                        n_qblocks: meta.n_qblocks as i32,
                        max_blocks: meta.max_blocks as i32,
                        block_q: meta.block_size_q as i32,
                        block_k: meta.block_size_k as i32,
                        sink: meta.sink_tokens as i32,
                        window: window as i64,
                        slots,
                        tks,
                    },
                    meta.block_size_q,
                    l_max.min(d.t_k),
                )
            }
        };
        let tn = if T::DTYPE == DType::BF16 { "bf16" } else { "f16" };
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let n_out = d.batch * d.t_q * d.heads_q * hd;
        let out = if poison() {
            // Tests: NaN everywhere first, so that an element the kernels miss shows.
            dev.clone_htod(&vec![T::from_f64(f64::NAN); n_out])?
        } else {
            // SAFETY: the kernels below write every element.
            unsafe { dev.alloc::<T>(n_out)? }
        };
        let (op, _g4) = out.device_ptr(&stream);
        let q_b = (d.t_q * d.heads_q * hd) as i64;
        let q_t = (d.heads_q * hd) as i64;
        let (t_q, heads_q) = (d.t_q as i32, d.heads_q as i32);

        let group = d.heads_q / d.heads_kv;
        let dense = matches!(self.keys, Keys::Dense);
        let rows = d.batch * d.t_q * d.heads_q;
        // Multiprocessors, for the HiP decode's choice of form (not asked on the dense decode path).
        let sms = if dense && group <= 8 {
            1
        } else {
            device_attr(dev, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1)
        };
        // HiP over the group's key list: the kernel's pipeline stages.
        // Decode shapes the tensor-core GQA kernel takes (a 16-row query tile of the group's heads).
        let gqa_shape = d.t_q <= DECODE_MAX_TQ && group <= 8;
        let gqa = if !dense && gqa_shape && kv.res == 0 { span_decode_gqa(rows, sms) } else { None };
        if gqa_shape && (dense || gqa.is_some()) {
            // Decode on tensor cores, one CTA per (split, KV head): each K/V row is read once per
            // group. HiP: the group's key list (shared sink and window, then each head's blocks).
            let (per, splits) = if dense {
                decode_splits(l_max, d.batch * d.t_q * d.heads_kv, 256)
            } else {
                // The kernel splits each list in `splits` parts; their number depends on the mask's
                // geometry alone (not on the batch or the lengths), so that a sequence decodes the
                // same way alone or in any batch.
                let list = mask.sink as usize + group * mask.max_blocks as usize * mask.block_k as usize;
                (0, list.div_ceil(gqa_split()).max(1))
            };
            let parts = Partials::new(dev, rows * splits, hd)?;
            let (kind, stages) = match gqa {
                Some(2) => ("span_decode_gqa_s2", 2),
                Some(_) => ("span_decode_gqa", DENSE_DEC_STAGES),
                None => ("dense_decode_gqa", DENSE_DEC_STAGES),
            };
            let f = func(dev, SPAN, SPAN_MODULE, &format!("{kind}_{tn}_d{hd}"))?;
            // The stages of a K and a V tile of 64 rows, the 16-row query tile and (HiP)
            // GQA_GROUP placed positions: location and head bits.
            let placed = if dense { 0 } else { GQA_GROUP * (8 + 1) };
            let smem = stages * 2 * 64 * hd * 2 + 16 * (hd + 8) * 2 + placed;
            allow_smem(&f, smem)?;
            let cfg = LaunchConfig {
                grid_dim: (splits as u32, d.heads_kv as u32, (d.batch * d.t_q) as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let (per_i, splits_i) = (per as i32, splits as i32);
            let [pm, pl, pa] = parts.ptrs(&stream);
            let mut b = Launch::new(&stream, &f);
            b.arg(&qp).arg(&q_b).arg(&q_t).arg(&t_q).arg(&heads_q).arg(&kv).arg(&mask).arg(&scale_log2);
            b.arg(&per_i).arg(&pm).arg(&pl).arg(&pa).arg(&splits_i);
            // SAFETY: argument list matches `{dense,span}_decode_gqa_*`; buffers are sized above.
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
            self.combine::<T>(&parts, splits, op, rows)?;
        } else if d.t_q <= DECODE_MAX_TQ || block_q % 16 != 0 {
            // Split-KV decode, one query per row (so any query block size works): a cluster of
            // the form's CTAs per row splits its keys and merges the partials itself.
            let form = span_decode_form(rows, sms);
            let f = func(dev, SPAN, SPAN_MODULE, &format!("span_decode_{tn}_d{hd}{}", form.suffix))?;
            let smem = form.smem(hd);
            allow_smem(&f, smem)?;
            let cfg = LaunchConfig {
                grid_dim: (form.cluster, d.heads_q as u32, (d.batch * d.t_q) as u32),
                block_dim: (256, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let mut b = Launch::new(&stream, &f);
            b.arg(&qp)
                .arg(&op)
                .arg(&q_b)
                .arg(&q_t)
                .arg(&t_q)
                .arg(&heads_q)
                .arg(&kv)
                .arg(&mask)
                .arg(&scale_log2);
            // SAFETY: argument list matches `span_decode_*` (compiled with a cluster of
            // `form.cluster` CTAs along x, 256 threads, `form.stages` x `form.chunk` keys of
            // staging, `form.maxk` placed at once); it writes every output row.
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        } else if matches!(self.keys, Keys::Dense) && hd == 128 && kv.res == 0 && sm90(dev) {
            // Dense prefill on Hopper's warpgroup MMA: 128 queries per CTA of one producer and
            // two consumer warpgroups; 1 KB of alignment slack, the query tile, three stages of
            // a K and a V tile of 128 rows and six mbarriers (225 KB of the 227 a CTA may have).
            let name = if wgmma_mode() == "pp" { "dense_prefill_sm90_pp" } else { "dense_prefill_sm90" };
            let smem = 1024 + 128 * hd * 2 + 3 * 2 * 128 * hd * 2 + 64;
            let f = func(dev, SM90, SM90_MODULE, &format!("{name}_{tn}"))?;
            allow_smem(&f, smem)?;
            let cfg = LaunchConfig {
                grid_dim: (d.t_q.div_ceil(128) as u32, d.heads_q as u32, d.batch as u32),
                block_dim: (384, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let mut b = stream.launch_builder(&f);
            b.arg(&qp).arg(&op).arg(&q_b).arg(&q_t).arg(&t_q).arg(&heads_q).arg(&kv).arg(&scale_log2);
            // SAFETY: argument list matches `dense_prefill_sm90{,_pp}_*` (384 threads); shared
            // memory as computed above;
            // no offload page table (the kernel reads K/V through `kv_loc` without banks).
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        } else {
            let warps = [8usize, 4, 2, 1].into_iter().find(|w| block_q % (16 * w) == 0).unwrap_or(1);
            let bm = 16 * warps;
            // Q tile, one K and one V tile of 64 rows (padded to hd + 8 halves), and per key of
            // the two index buffers its row offset (i64), token and segment (i32 each).
            let smem = (bm + 2 * 64) * (hd + 8) * 2 + 2 * 64 * (8 + 4 + 4);
            let f = func(dev, SPAN, SPAN_MODULE, &format!("span_prefill_{tn}_d{hd}_w{warps}"))?;
            allow_smem(&f, smem)?;
            let cfg = LaunchConfig {
                grid_dim: (d.t_q.div_ceil(bm) as u32, d.heads_q as u32, d.batch as u32),
                block_dim: ((32 * warps) as u32, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let mut b = Launch::new(&stream, &f);
            b.arg(&qp)
                .arg(&op)
                .arg(&q_b)
                .arg(&q_t)
                .arg(&t_q)
                .arg(&heads_q)
                .arg(&kv)
                .arg(&mask)
                .arg(&scale_log2);
            // SAFETY: argument list matches `span_prefill_*`; shared memory as computed above.
            unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        }
        drop(_g4);
        let shape = Shape::from((d.batch, d.t_q, d.heads_q, hd));
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
    }
}

impl SpanOp<'_> {
    /// Merges the decode partials of `rows` (batch, query, head) rows into the output at `op`.
    fn combine<T: CudaDType + candle_core::WithDType>(
        &self,
        parts: &Partials,
        splits: usize,
        op: u64,
        rows: usize,
    ) -> candle_core::Result<()> {
        let d = &self.dims;
        let tn = if T::DTYPE == DType::BF16 { "bf16" } else { "f16" };
        let f = func(&self.dev, SPAN, SPAN_MODULE, &format!("span_combine_{tn}_d{}", d.head_dim))?;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(4) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (splits_i, rows_i, t_q, heads_q) = (splits as i32, rows as i32, d.t_q as i32, d.heads_q as i32);
        let q_b = (d.t_q * d.heads_q * d.head_dim) as i64;
        let q_t = (d.heads_q * d.head_dim) as i64;
        let stream = self.dev.cuda_stream();
        let [pm, pl, pa] = parts.ptrs(&stream);
        let mut b = Launch::new(&stream, &f);
        b.arg(&pm).arg(&pl).arg(&pa).arg(&splits_i).arg(&op).arg(&q_b).arg(&q_t);
        b.arg(&t_q).arg(&heads_q).arg(&rows_i);
        // SAFETY: argument list matches `span_combine_*`; the partials hold rows * splits entries.
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        Ok(())
    }
}

impl candle_core::CustomOp3 for SpanOp<'_> {
    fn name(&self) -> &'static str {
        "hip-span-attn"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("hip-span-attn runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match q.dtype() {
            DType::BF16 => self.run::<bf16>(q, ql, k, kl, v, vl),
            DType::F16 => self.run::<f16>(q, ql, k, kl, v, vl),
            dt => candle_core::bail!("hip-span-attn: unsupported dtype {dt:?}"),
        }
    }
}

/// Whether outputs are filled with NaN before the kernels run (`HIP_CUDA_POISON=1`, for tests).
fn poison() -> bool {
    static POISON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *POISON.get_or_init(|| std::env::var_os("HIP_CUDA_POISON").is_some_and(|v| v == "1"))
}

/// An output buffer of `n` elements for a kernel that writes every one of them: filled with NaN
/// first under `HIP_CUDA_POISON=1` (tests: an element a kernel misses shows), else uninitialized.
fn alloc_out<T: CudaDType + DeviceRepr + candle_core::WithDType>(
    dev: &CudaDevice,
    n: usize,
) -> candle_core::Result<CudaSlice<T>> {
    if poison() {
        dev.clone_htod(&vec![T::from_f64(f64::NAN); n])
    } else {
        // SAFETY: plain values, and the caller's kernel writes each before anything reads it.
        unsafe { dev.alloc::<T>(n) }
    }
}

/// Lets `f` launch with `smem` bytes of dynamic shared memory (above the default 48 KB).
fn allow_smem(f: &CudaFunction, smem: usize) -> candle_core::Result<()> {
    f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
        .map_err(cuda_err)
}

fn cuda_err(e: DriverError) -> candle_core::Error {
    candle_core::Error::Cuda(Box::new(e))
}

/// CTAs per row of `span_decode_*` (its `DECODE_CS`: the kernel's compile-time cluster size).
const DECODE_CLUSTER: u32 = 8;
/// Pipeline stages of `{dense,span}_decode_gqa_*` (its `DENSE_DEC_STAGES`).
const DENSE_DEC_STAGES: usize = 3;
/// List positions `span_decode_gqa_*` places at once (its `GQA_GROUP`).
const GQA_GROUP: usize = 512;
/// About the mask positions (sink and the group's blocks) of a split of `span_decode_gqa_*`:
/// Qwen2.5-1.5B's groups of 6 heads with the paper's k of 512 give 7 splits, so 16 sequences
/// (2 KV heads each) run as 224 CTAs, one wave of two a multiprocessor on the H200.
const GQA_SPLIT: usize = 448;

/// [`GQA_SPLIT`], or `HIP_GQA_SPLIT` (at least 64) to measure other split sizes.
fn gqa_split() -> usize {
    static SPLIT: OnceLock<usize> = OnceLock::new();
    *SPLIT.get_or_init(|| {
        std::env::var("HIP_GQA_SPLIT")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n >= 64)
            .unwrap_or(GQA_SPLIT)
    })
}

/// Whether a HiP decode of `rows` query rows without offloading on `sms` multiprocessors takes
/// `span_decode_gqa_*` (a CTA per KV head and split, the group's rows on tensor cores, each K/V row
/// loaded once for the group's sink and window) rather than a one-row form of
/// `span_decode_form`: from one row a multiprocessor on. On the H200 at 4k x 16 (192 rows of
/// Qwen2.5-1.5B's groups of 6), ncu: 25.8 µs + 3.9 µs of combine against 35.5 µs for the one-row
/// `p2`; at 24 rows the one-row `k64` (12.7 µs) is faster. Returns the kernel's pipeline stages
/// (3), or `None` for a one-row form. `HIP_SPAN_DECODE=gqa` forces it, `gqa2` its two-stage
/// form (`span_decode_gqa_s2_*`: three CTAs a multiprocessor; 6.75 ms a 128k x 16 step against
/// 6.68–6.80 for the default, 6.80 with `HIP_GQA_SPLIT=320`, on 2026-12-04), a one-row form's
/// name forces that one.
fn span_decode_gqa(rows: usize, sms: usize) -> Option<usize> {
    static FORCED: OnceLock<Option<Option<usize>>> = OnceLock::new();
    let forced = FORCED.get_or_init(|| match std::env::var("HIP_SPAN_DECODE").as_deref() {
        Ok("gqa") => Some(Some(DENSE_DEC_STAGES)),
        Ok("gqa2") => Some(Some(2)),
        Ok("") | Err(_) => None,
        Ok(_) => Some(None),
    });
    forced.unwrap_or((rows >= sms).then_some(DENSE_DEC_STAGES))
}
/// Keys `span_decode_*` stages in shared memory at a time (its `DECODE_CHUNK`).
const DECODE_CHUNK: usize = 128;

/// The form of `span_decode_*` (kernels/span_attn.cu's `DECODE` list).
#[derive(Clone, Copy, Debug)]
struct SpanDecodeForm {
    /// Kernel name suffix.
    suffix: &'static str,
    /// CTAs a row (the kernel's cluster).
    cluster: u32,
    /// Keys a stage of shared memory holds.
    chunk: usize,
    /// Stages: 2 loads the next chunk while the warps attend to this one.
    stages: usize,
    /// Keys placed at once before their rows stream through the stages (0: a chunk's keys are
    /// placed just before its rows load).
    maxk: usize,
}

impl SpanDecodeForm {
    const fn new(suffix: &'static str, cluster: u32, chunk: usize, stages: usize, maxk: usize) -> Self {
        SpanDecodeForm { suffix, cluster, chunk, stages, maxk }
    }

    /// Dynamic shared memory: per stage the K and V rows of `chunk` keys, then per key placed its
    /// row location (i64) and token (i32); at least the epilogue's warp states
    /// (`decode_epilogue_bytes`), which reuse it.
    fn smem(&self, head_dim: usize) -> usize {
        let placed = if self.maxk > 0 { self.maxk } else { self.stages * self.chunk };
        let bytes = self.stages * self.chunk * 2 * head_dim * 2 + placed * (8 + 4);
        bytes.max((8 * head_dim + 2 * 8 + head_dim + 2) * 4)
    }
}

/// The form of `span_decode_*` for `rows` query rows on `sms` multiprocessors: the fewest CTAs a
/// row (2, 4 or 8) that still give every multiprocessor two of them, each over two stages of
/// 64 keys (8 a row: one stage of 64). On the H200 at 128k x 16 (192 rows) two CTAs a row over two
/// stages took a HiP step from 7.39 to 6.89 ms (the former default, 8 CTAs over one stage of 128
/// keys). `HIP_SPAN_DECODE=base|c4|k64|p8|p4|p4w|p2|q2|q2w|q8` forces one, to measure against the
/// others (`q*`: every key of a CTA placed at once, then its rows through a ring of 3–4 stages:
/// 6.81–7.11 ms against 6.84–6.91 for `p2` on 2026-12-03, no gain). Since 2026-12-04 a batch of
/// that many rows takes the GQA decode (`span_decode_gqa`) unless a one-row form is forced; the
/// one-row forms serve fewer rows, offloaded caches and groups of more than 8 heads.
fn span_decode_form(rows: usize, sms: usize) -> SpanDecodeForm {
    let form = SpanDecodeForm::new;
    static FORCED: OnceLock<Option<SpanDecodeForm>> = OnceLock::new();
    let forced = FORCED.get_or_init(|| match std::env::var("HIP_SPAN_DECODE").as_deref() {
        Ok("base") => Some(form("", DECODE_CLUSTER, DECODE_CHUNK, 1, 0)),
        Ok("c4") => Some(form("_c4", 4, DECODE_CHUNK, 1, 0)),
        Ok("k64") => Some(form("_k64", DECODE_CLUSTER, 64, 1, 0)),
        Ok("p8") => Some(form("_p8", DECODE_CLUSTER, 32, 2, 0)),
        Ok("p4") => Some(form("_p4", 4, 32, 2, 0)),
        Ok("p4w") => Some(form("_p4w", 4, 64, 2, 0)),
        Ok("p2") => Some(form("_p2", 2, 64, 2, 0)),
        Ok("q2") => Some(form("_q2", 2, 32, 4, 512)),
        Ok("q2w") => Some(form("_q2w", 2, 64, 3, 512)),
        Ok("q8") => Some(form("_q8", DECODE_CLUSTER, 32, 3, 128)),
        _ => None,
    });
    if let Some(f) = forced {
        return *f;
    }
    if rows * 2 >= 2 * sms {
        form("_p2", 2, 64, 2, 0)
    } else if rows * 4 >= 2 * sms {
        form("_p4w", 4, 64, 2, 0)
    } else {
        form("_k64", DECODE_CLUSTER, 64, 1, 0)
    }
}

/// Keys per split and splits of a split-KV decode over at most `keys` keys with `ctas` CTAs per
/// split: about 4 CTAs per multiprocessor of the H200 in all, at least `min_per` keys a split.
fn decode_splits(keys: usize, ctas: usize, min_per: usize) -> (usize, usize) {
    let target = (528 / ctas.max(1)).max(1);
    let per = keys.div_ceil(target).max(min_per);
    (per, keys.div_ceil(per).max(1))
}

/// The decode workspace: per (row, split) the running max, the sum and the `head_dim` weighted
/// values, merged by `span_combine_*`.
struct Partials {
    m: CudaSlice<f32>,
    l: CudaSlice<f32>,
    acc: CudaSlice<f32>,
}

impl Partials {
    fn new(dev: &CudaDevice, slots: usize, head_dim: usize) -> candle_core::Result<Self> {
        // SAFETY: uninitialised device memory of plain f32s; every decode CTA (split) writes its
        // slots before `span_combine_*` reads them (no memset launches on the decode path).
        unsafe {
            Ok(Partials {
                m: dev.alloc::<f32>(slots)?,
                l: dev.alloc::<f32>(slots)?,
                acc: dev.alloc::<f32>(slots * head_dim)?,
            })
        }
    }

    /// The device addresses of `m`, `l` and `acc`, as kernel arguments.
    fn ptrs(&self, stream: &CudaStream) -> [u64; 3] {
        [&self.m, &self.l, &self.acc].map(|s| s.device_ptr(stream).0)
    }
}

/// `true` when the tensor lives on a CUDA device.
pub(crate) fn is_cuda(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cuda(_))
}

/// Block-sparse attention over a mask already on the device (see [`crate::block_sparse_attn`],
/// which uploads a CPU [`HipMask`] on every call).
///
/// # Errors
/// As [`crate::block_sparse_attn`]; [`Error::UnsupportedDevice`] for tensors not on CUDA.
pub fn block_sparse_attn_cuda(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &CudaMask,
    scale: f32,
    extra_window_tokens: usize,
) -> Result<Tensor> {
    let dims = AttnDims::from_qkv(q, k, Some(v))?;
    crate::layout::check_scale(scale)?;
    check_mask_fits(mask, &dims)?;
    span_attn(q, k, v, &dims, Keys::Mask(mask, extra_window_tokens), None, scale)
}

/// An integer attribute of `dev`'s device, e.g. `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT` (132 on
/// the H200) or `CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN` (227 KB on Hopper).
/// Makes the device's memory pool keep the memory that is freed, instead of handing it back to
/// the driver at every synchronization (the pool's default release threshold is 0): candle
/// allocates every intermediate tensor from that pool, and a decode loop synchronizes once a
/// step (to read the sampled tokens), so with the default each step maps its working memory
/// again. With the threshold at its maximum the pool holds on to its peak, like PyTorch's
/// caching allocator; the memory stays the process's until it exits. Idempotent; does nothing
/// on a CPU device or with `HIP_POOL_TRIM=1` (the driver's default, for comparisons).
///
/// # Errors
/// CUDA errors of the pool queries.
pub fn keep_pool_memory(device: &Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::{self, CUmemPool_attribute};
    let Device::Cuda(dev) = device else { return Ok(()) };
    if std::env::var("HIP_POOL_TRIM").is_ok_and(|v| v == "1") {
        return Ok(());
    }
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().map_err(cuda_err)?;
    let mut pool = std::ptr::null_mut();
    let mut keep = u64::MAX;
    // SAFETY: plain driver queries on the context's own device, with valid out pointers.
    unsafe {
        sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()).result().map_err(cuda_err)?;
        sys::cuMemPoolSetAttribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut keep as *mut u64).cast(),
        )
        .result()
        .map_err(cuda_err)?;
    }
    Ok(())
}

fn device_attr(dev: &CudaDevice, attr: CUdevice_attribute) -> candle_core::Result<usize> {
    let n = dev.cuda_stream().context().attribute(attr).map_err(cuda_err)?;
    Ok(n.max(0) as usize)
}

/// One sequence's keys and values in a paged KV cache on a CUDA device (the CUDA counterpart of
/// [`crate::PagedKv`]).
///
/// `k` and `v` hold whole blocks, `[num_blocks * block_size, heads_kv, head_dim]` (bf16 or f16);
/// token `j` of the sequence lives in block `block_table[j / block_size]` at slot
/// `j % block_size`. `block_table` is a u32 tensor on the same device with at least
/// `len.div_ceil(block_size)` entries, each below `num_blocks`: the cache that builds it
/// guarantees that (it is checked here only in debug builds, since reading it back costs a copy).
#[derive(Debug, Clone, Copy)]
pub struct CudaPagedKv<'a> {
    /// Key blocks.
    pub k: &'a Tensor,
    /// Value blocks, laid out like `k`.
    pub v: &'a Tensor,
    /// Block of each group of `block_size` tokens, in order (u32, on the device).
    pub block_table: &'a Tensor,
    /// Tokens per block.
    pub block_size: usize,
    /// Tokens in the sequence.
    pub len: usize,
}

impl CudaPagedKv<'_> {
    /// Checks the view and `q: [1, t_q, heads_q, head_dim]` against it.
    ///
    /// # Errors
    /// [`Error::Shape`] / [`Error::InvalidArgument`] naming what does not fit.
    pub fn dims(&self, q: &Tensor) -> Result<AttnDims> {
        let (nk, hkv, d) = self
            .k
            .dims3()
            .map_err(|_| Error::shape("k", "[num_blocks * block_size, heads_kv, head_dim]", self.k.dims()))?;
        if self.v.dims() != self.k.dims() {
            return Err(Error::shape("v", format!("the shape of k, {:?}", self.k.dims()), self.v.dims()));
        }
        let dims = paged_dims(nk, hkv, d, self.block_size, self.len, self.block_table, q)?;
        if cfg!(debug_assertions) {
            let (bs, needed) = (self.block_size, self.len.div_ceil(self.block_size));
            let table = self.block_table.flatten_all()?.to_vec1::<u32>()?;
            if let Some(&bad) = table[..needed].iter().find(|&&b| b as usize >= nk / bs) {
                return Err(Error::arg(
                    "block_table",
                    bad,
                    format!("block index past the {} blocks", nk / bs),
                ));
            }
        }
        Ok(dims)
    }

    fn paged(&self) -> Paged<'_> {
        Paged { table: self.block_table, page: self.block_size, t_k: self.len, lens: None, offload: None }
    }
}

/// The checks a paged view of `rows` rows of `heads_kv × head_dim` shares, whatever holds the
/// rows (a device pool or an offloaded host store): the block size divides the rows, `0 < len
/// <= rows`, the u32 table covers `len`, and `q` is `[1, t_q <= len, a multiple of heads_kv,
/// head_dim]`.
pub(crate) fn paged_dims(
    rows: usize,
    heads_kv: usize,
    head_dim: usize,
    block_size: usize,
    len: usize,
    table: &Tensor,
    q: &Tensor,
) -> Result<AttnDims> {
    let bs = block_size;
    if bs == 0 || rows % bs != 0 || len == 0 || len > rows {
        return Err(Error::arg(
            "paged kv",
            format!("block_size {bs}, len {len}, {rows} rows"),
            "block_size must divide the rows and 0 < len <= rows",
        ));
    }
    let needed = len.div_ceil(bs);
    if table.dtype() != DType::U32 || table.elem_count() < needed {
        return Err(Error::arg(
            "block_table",
            format!("{:?} with {} entries", table.dtype(), table.elem_count()),
            format!("must be u32 with at least {needed} entries"),
        ));
    }
    let (b, t_q, heads_q, qd) =
        q.dims4().map_err(|_| Error::shape("q", "[1, t_q, heads_q, head_dim]", q.dims()))?;
    if b != 1 || qd != head_dim || heads_kv == 0 || heads_q % heads_kv != 0 || t_q == 0 || t_q > len {
        return Err(Error::shape(
            "q",
            format!("[1, t_q <= {len}, a multiple of {heads_kv} heads, {head_dim}]"),
            q.dims(),
        ));
    }
    Ok(AttnDims { batch: 1, t_q, t_k: len, heads_q, heads_kv, head_dim })
}

/// Dense causal attention over a paged cache on CUDA (see [`crate::dense_attn`]).
///
/// # Errors
/// As [`CudaPagedKv::dims`]; unsupported dtypes or head dims.
pub fn dense_attn_paged_cuda(q: &Tensor, kv: &CudaPagedKv<'_>, scale: f32) -> Result<Tensor> {
    let dims = kv.dims(q)?;
    crate::layout::check_scale(scale)?;
    span_attn(q, kv.k, kv.v, &dims, Keys::Dense, Some(kv.paged()), scale)
}

/// HiP mask estimation over a paged cache on CUDA (see [`hip_mask_cuda`]).
///
/// # Errors
/// As [`CudaPagedKv::dims`] and [`hip_mask_cuda`].
pub fn hip_mask_paged_cuda(
    q: &Tensor,
    kv: &CudaPagedKv<'_>,
    cfg: &crate::HipConfig,
    scale: f32,
) -> Result<CudaMask> {
    let dims = kv.dims(q)?;
    mask_search(q, kv.k, &dims, Some(kv.paged()), cfg, scale)
}

/// Block-sparse attention over a paged cache on CUDA (see [`block_sparse_attn_cuda`]).
///
/// # Errors
/// As [`CudaPagedKv::dims`] and [`block_sparse_attn_cuda`].
pub fn block_sparse_attn_paged_cuda(
    q: &Tensor,
    kv: &CudaPagedKv<'_>,
    mask: &CudaMask,
    scale: f32,
    extra_window_tokens: usize,
) -> Result<Tensor> {
    let dims = kv.dims(q)?;
    crate::layout::check_scale(scale)?;
    check_mask_fits(mask, &dims)?;
    span_attn(q, kv.k, kv.v, &dims, Keys::Mask(mask, extra_window_tokens), Some(kv.paged()), scale)
}

/// HiP attention (mask, then block-sparse attention) over a paged cache on CUDA.
///
/// # Errors
/// As [`hip_mask_paged_cuda`] and [`block_sparse_attn_paged_cuda`].
pub fn hip_attn_paged_cuda(
    q: &Tensor,
    kv: &CudaPagedKv<'_>,
    cfg: &crate::HipConfig,
    scale: f32,
) -> Result<Tensor> {
    let dims = kv.dims(q)?;
    crate::mask_cache::with_prefill_tail(q, dims.t_q, cfg, |q, cut, cfg| {
        let kv = CudaPagedKv { len: kv.len - cut, ..*kv };
        let mask = hip_mask_paged_cuda(q, &kv, cfg, scale)?;
        block_sparse_attn_paged_cuda(q, &kv, &mask, scale, 0)
    })
}

fn check_mask_fits(mask: &CudaMask, dims: &AttnDims) -> Result<()> {
    let m = &mask.meta;
    let n_q = dims.t_q.div_ceil(m.block_size_q.max(1));
    if (m.batch, m.heads, m.n_qblocks) != (dims.batch, dims.heads_q, n_q) || m.t_k > dims.t_k {
        return Err(Error::Shape {
            name: "mask",
            expected: format!(
                "a mask for batch {}, {} query heads, {n_q} query blocks and at most {} keys",
                dims.batch, dims.heads_q, dims.t_k
            ),
            got: vec![m.batch, m.heads, m.n_qblocks, m.t_k],
        });
    }
    Ok(())
}

/// One HiP decode step over a paged cache on CUDA, with the mask re-estimated only every
/// `cfg.refresh_interval` steps (see [`crate::hip_attn_decode`] and [`crate::MaskCache`]). The
/// cached mask stays on the device: a step copies nothing between host and device (a copy from
/// pageable host memory would also wait for the stream to drain).
///
/// # Errors
/// As [`hip_mask_paged_cuda`] and [`block_sparse_attn_paged_cuda`].
pub fn hip_attn_decode_paged_cuda(
    q: &Tensor,
    kv: &CudaPagedKv<'_>,
    cfg: &crate::HipConfig,
    scale: f32,
    cache: &mut crate::MaskCache,
) -> Result<Tensor> {
    let dims = kv.dims(q)?;
    cache.step_device(
        &dims,
        cfg,
        || hip_mask_paged_cuda(q, kv, cfg, scale),
        |mask, extra| block_sparse_attn_paged_cuda(q, kv, mask, scale, extra),
    )
}
