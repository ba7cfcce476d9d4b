//! The HiP mask search on CUDA (`kernels/hip_mask.cu`): the host side of `hip_mask_search`
//! (prefill, query blocks of many strided queries) and `hip_mask_search_few` (decode: its forms,
//! clusters for few rows, the tensor-core `_t` form by default), contiguous or paged keys.

use candle_core::cuda_backend::cudarc::driver::sys::{
    cuOccupancyMaxActiveClusters, CUdevice_attribute, CUlaunchConfig,
};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::CudaDevice;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Storage, Tensor};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use super::{
    allow_smem, check, cuda_dev, cuda_err, device_attr, func, CudaMask, Keys, KvArgs, Launch, Paged,
};
use crate::error::{Error, Result};
use crate::layout::AttnDims;
use crate::ops::hip_mask::HipMask;

/// The form of the decode mask search without a cluster (kernel name suffix; see
/// `hip_mask_search_few`): by default `_t` (two CTAs a multiprocessor, the rows placed once an
/// iteration, then scored 16 a warp on the tensor cores), `_o2p` for a cache that stages the rows
/// it reads over the bus (offloading; the same without the tensor cores: 4 rows in flight a lane
/// group, on the H200 at 128k x 16 HiP 7.92 -> 7.24 ms a step against `base`).
/// `HIP_MASK_FEW=base|o2|p|o2p|t` picks one to measure or test (`base`: one CTA a
/// multiprocessor, 8 rows in flight, no placement); a form so picked also serves the few rows
/// that otherwise take a cluster of CTAs each (the second value: forced).
fn mask_few_form() -> (&'static str, bool) {
    static FORM: OnceLock<(&'static str, bool)> = OnceLock::new();
    *FORM.get_or_init(|| match std::env::var("HIP_MASK_FEW").as_deref() {
        Ok("base") => ("", true),
        Ok("o2") => ("_o2", true),
        Ok("p") => ("_p", true),
        Ok("o2p") => ("_o2p", true),
        Ok("t") => ("_t", true),
        _ => ("_t", false),
    })
}

/// How many clusters of `cs` CTAs of the mask kernel `name` (`threads` threads, `smem` bytes of
/// dynamic shared memory each) the GPU runs at once (cached per context and kernel).
fn max_active_clusters(dev: &CudaDevice, name: &str, cs: usize, threads: u32, smem: usize) -> Result<usize> {
    type Counts = HashMap<(usize, String, usize), usize>;
    static COUNTS: OnceLock<Mutex<Counts>> = OnceLock::new();
    let key = (Arc::as_ptr(dev.cuda_stream().context()) as usize, name.to_owned(), smem);
    if let Some(&n) =
        COUNTS.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner).get(&key)
    {
        return Ok(n);
    }
    let f = func(dev, MASK, MASK_MODULE, name)?;
    allow_smem(&f, smem)?;
    let config = CUlaunchConfig {
        gridDimX: cs as u32,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem as u32,
        hStream: std::ptr::null_mut(),
        attrs: std::ptr::null_mut(),
        numAttrs: 0,
    };
    let mut n: std::ffi::c_int = 0;
    // SAFETY: a valid function handle and launch configuration (the cluster size is the kernel's
    // compile-time one); the driver writes one int.
    unsafe { cuOccupancyMaxActiveClusters(&mut n, f.cu_function(), &config) }.result().map_err(cuda_err)?;
    let n = n.max(0) as usize;
    COUNTS.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner).insert(key, n);
    Ok(n)
}

/// `hip_mask.cu` compiled by `build.rs` (as [`SPAN`]).
const MASK: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hip_mask.fatbin"));
const MASK_MODULE: &str = "hip_mask_search";

/// `SearchArgs` of `hip_mask.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct SearchArgs {
    t_q: i32,
    heads_q: i32,
    block_q: i32,
    stride_q: i32,
    block_k: i32,
    stride_k: i32,
    sink: i32,
    window: i32,
    groups: i32,
    n_qblocks: i32,
    cap: i32,
    /// Decode batches into mask slots (zero otherwise): u32 `[batch]` slot each entry writes,
    /// and u32 `[slots]` where it leaves its key count.
    slots: u64,
    tks: u64,
}
// SAFETY: plain old data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for SearchArgs {}

impl CudaMask {
    /// Downloads the mask into a [`HipMask`].
    ///
    /// # Errors
    /// Candle errors (copy).
    pub fn to_host(&self) -> Result<HipMask> {
        let mut m = self.meta.clone();
        m.block_starts = self.starts.flatten_all()?.to_vec1::<u32>()?;
        m.counts = self.counts.flatten_all()?.to_vec1::<u32>()?;
        Ok(m)
    }
}

/// HiP mask estimation on CUDA (see [`crate::hip_mask`] for the algorithm and shapes); the mask
/// stays on the device.
///
/// Supported: bf16/f16, head dims 64 and 128, `block_size_q / block_stride_q <= 32` strided
/// queries, `block_size_k / block_stride_k <= 64` strided keys, `k / block_size_k <= 4096`.
///
/// # Errors
/// Invalid config, shapes or dtypes; unsupported sizes (above); tensors not on CUDA.
pub fn hip_mask_cuda(q: &Tensor, k: &Tensor, cfg: &crate::HipConfig, scale: f32) -> Result<CudaMask> {
    let dims = AttnDims::from_qkv(q, k, None)?;
    mask_search(q, k, &dims, None, cfg, scale)
}

/// The mask search over contiguous or paged keys.
pub(super) fn mask_search(
    q: &Tensor,
    k: &Tensor,
    dims: &AttnDims,
    paged: Option<Paged<'_>>,
    cfg: &crate::HipConfig,
    scale: f32,
) -> Result<CudaMask> {
    let dims = *dims;
    let groups = check_search(q, k, &dims, cfg, scale)?;
    let dev = cuda_dev(q)?;
    let (q, k) = (q.contiguous()?, k.contiguous()?);
    let meta = HipMask {
        batch: dims.batch,
        heads: dims.heads_q,
        n_qblocks: dims.t_q.div_ceil(cfg.block_size_q),
        max_blocks: groups,
        block_size_q: cfg.block_size_q,
        block_size_k: cfg.block_size_k,
        sink_tokens: cfg.sink_tokens,
        window_tokens: cfg.window_tokens,
        t_k: dims.t_k,
        block_starts: Vec::new(),
        counts: Vec::new(),
    };
    let rows = dims.batch * dims.heads_q * meta.n_qblocks;
    let (starts, counts) = {
        // SAFETY: plain u32s; every mask CTA writes all `groups` starts of its row and its count.
        let (out_s, out_c) = unsafe { (dev.alloc::<u32>(rows * groups)?, dev.alloc::<u32>(rows)?) };
        {
            let stream = dev.cuda_stream();
            let (sp, _g1) = out_s.device_ptr(&stream);
            let (cp, _g2) = out_c.device_ptr(&stream);
            let out = MaskOut { starts: sp, counts: cp, slots: 0, tks: 0 };
            launch_mask(&q, &k, &dims, paged, cfg, scale, &dev, out, meta.n_qblocks)?;
        }
        let s = CudaStorage::wrap_cuda_slice(out_s, dev.clone());
        let c = CudaStorage::wrap_cuda_slice(out_c, dev.clone());
        (
            Tensor::from_storage(
                Storage::Cuda(s),
                (dims.batch, dims.heads_q, meta.n_qblocks, groups),
                BackpropOp::none(),
                false,
            ),
            Tensor::from_storage(
                Storage::Cuda(c),
                (dims.batch, dims.heads_q, meta.n_qblocks),
                BackpropOp::none(),
                false,
            ),
        )
    };
    Ok(CudaMask { starts, counts, meta })
}

/// Where the mask search writes (device pointers): block starts `[rows, groups]` and counts
/// `[rows]`; for a decode batch into mask slots, the entries' slots and the slots' key counts
/// (zero otherwise).
#[derive(Debug, Clone, Copy)]
pub(super) struct MaskOut {
    pub(super) starts: u64,
    pub(super) counts: u64,
    pub(super) slots: u64,
    pub(super) tks: u64,
}

/// Checks a mask search's inputs against what the CUDA search supports; returns the selected
/// blocks per row.
pub(super) fn check_search(
    q: &Tensor,
    k: &Tensor,
    dims: &AttnDims,
    cfg: &crate::HipConfig,
    scale: f32,
) -> Result<usize> {
    cfg.validate()?;
    crate::layout::check_scale(scale)?;
    check(dims, q.dtype(), &Keys::Dense)?;
    if k.dtype() != q.dtype() {
        return Err(Error::DType { name: "k", expected: format!("{:?} like q", q.dtype()), got: k.dtype() });
    }
    let nq = cfg.block_size_q.div_ceil(cfg.block_stride_q);
    if nq > 32 {
        return Err(Error::arg(
            "block_size_q",
            cfg.block_size_q,
            "at most 32 strided queries per block on CUDA",
        ));
    }
    let kpb = cfg.block_size_k.div_ceil(cfg.block_stride_k);
    if kpb > 64 {
        return Err(Error::arg(
            "block_size_k",
            cfg.block_size_k,
            "at most 64 strided keys per block on CUDA",
        ));
    }
    let groups = cfg.selected_blocks();
    if groups > 4096 {
        return Err(Error::arg("k", cfg.k, "at most 4096 selected blocks on CUDA"));
    }
    Ok(groups)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn launch_mask(
    q: &Tensor,
    k: &Tensor,
    dims: &AttnDims,
    paged: Option<Paged<'_>>,
    cfg: &crate::HipConfig,
    scale: f32,
    dev: &CudaDevice,
    out: MaskOut,
    n_qblocks: usize,
) -> Result<()> {
    let stream = dev.cuda_stream();
    let (qst, ql) = q.storage_and_layout();
    let (kst, kl) = k.storage_and_layout();
    let (Storage::Cuda(qs), Storage::Cuda(ks)) = (&*qst, &*kst) else {
        return Err(Error::UnsupportedDevice { op: "hip_mask", device: "mixed devices".into() });
    };
    let hd = dims.head_dim;
    let (tn, esize) = if q.dtype() == DType::BF16 { ("bf16", 2u64) } else { ("f16", 2u64) };
    let ((qp, _g1), (kp, _g2)) = if q.dtype() == DType::BF16 {
        (qs.as_cuda_slice::<bf16>()?.device_ptr(&stream), ks.as_cuda_slice::<bf16>()?.device_ptr(&stream))
    } else {
        (qs.as_cuda_slice::<f16>()?.device_ptr(&stream), ks.as_cuda_slice::<f16>()?.device_ptr(&stream))
    };
    let qp = qp + ql.start_offset() as u64 * esize;
    let kp = kp + kl.start_offset() as u64 * esize;
    let mut kv = KvArgs::contiguous(kp, kp, dims);
    if let Some(p) = &paged {
        kv.page(p, dev)?;
    }
    let groups = cfg.selected_blocks();
    let cap = (2 * groups).next_power_of_two();
    let sa = SearchArgs {
        t_q: dims.t_q as i32,
        heads_q: dims.heads_q as i32,
        block_q: cfg.block_size_q as i32,
        stride_q: cfg.block_stride_q as i32,
        block_k: cfg.block_size_k as i32,
        stride_k: cfg.block_stride_k as i32,
        sink: cfg.sink_tokens as i32,
        window: cfg.window_tokens as i32,
        groups: groups as i32,
        n_qblocks: n_qblocks as i32,
        cap: cap as i32,
        slots: out.slots,
        tks: out.tks,
    };
    // Blocks of at most 2 strided queries (decode) take the latency-tuned search: 512 threads
    // scoring keys from global memory, shared memory only for the branches.
    let few = dims.t_q.min(cfg.block_size_q).div_ceil(cfg.block_stride_q) <= 2;
    // Few rows (a decode step of few sequences) take a cluster of 4 or 2 CTAs each, the larger
    // that lets the GPU hold every cluster at once (one 512-thread CTA per multiprocessor; the
    // GPU's layout in processing clusters decides how many clusters fit).
    let rows = dims.batch * dims.heads_q * n_qblocks;
    let (name, threads, smem, per_row) = if few {
        // score + 4 branch arrays + 2 arrays of branch maxima, `cap` entries each.
        let smem = cap * 28;
        // `mask_few_form`: the placing forms (`_p`, `_o2p` and the default `_t`) add the
        // placements' offsets to the shared memory; a search too wide for both in one CTA's
        // shared memory (a budget of thousands of blocks) takes a form without the placement.
        let (mut form, forced) = mask_few_form();
        if form == "_t" && kv.stages() {
            form = "_o2p"; // the tensor-core scoring does not stage rows read over the bus
        }
        let mut place = if form.ends_with('p') || form == "_t" {
            cap * cfg.block_size_k.div_ceil(cfg.block_stride_k) * 8
        } else {
            0
        };
        if place > 0
            && smem + place
                > device_attr(dev, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
        {
            form = if form == "_p" { "" } else { "_o2" };
            place = 0;
        }
        let mut pick = (format!("hip_mask_few_{tn}_d{hd}{form}"), 512, smem + place, 1);
        for cs in [4usize, 2].into_iter().filter(|_| !forced) {
            let name = format!("hip_mask_few_{tn}_d{hd}_c{cs}");
            if rows <= max_active_clusters(dev, &name, cs, 512, smem)? {
                pick = (name, 512, smem, cs);
                break;
            }
        }
        pick
    } else {
        // Must match the layout of `hip_mask_search`: two buffers of BN = 64 key rows, three of
        // per-slot branch and token, and score + 4 branch arrays of `cap` entries.
        let smem = 2 * 64 * hd * 2 + 3 * 64 * 4 * 2 + cap * 20;
        (format!("hip_mask_{tn}_d{hd}"), 128, smem, 1)
    };
    let f = func(dev, MASK, MASK_MODULE, &name)?;
    allow_smem(&f, smem)?;
    let cfg_l = LaunchConfig {
        grid_dim: ((n_qblocks * per_row) as u32, dims.heads_q as u32, dims.batch as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let q_b = (dims.t_q * dims.heads_q * hd) as i64;
    let q_t = (dims.heads_q * hd) as i64;
    let mut b = Launch::new(&stream, &f);
    b.arg(&qp).arg(&q_b).arg(&q_t).arg(&kv).arg(&sa).arg(&scale).arg(&out.starts).arg(&out.counts);
    // SAFETY: argument list matches `hip_mask_*`; outputs sized rows * groups and rows (or the
    // slots' rows, each entry's slot below their number).
    unsafe { b.launch(cfg_l) }.map_err(cuda_err)?;
    Ok(())
}
