//! KV-cache offloading on CUDA (the data path of [`crate::offload`]): a sequence's K/V rows live
//! in a [`HostKvStore`] of pinned, device-mapped host memory, and each layer keeps two small GPU
//! caches ([`LayerCaches`]: keys for mask estimation, keys and values for block-sparse
//! attention), each a bank of rows plus a page table, managed by the LRU policy of
//! [`TokenCache`](crate::offload::TokenCache) run on the device.
//!
//! # One decode step ([`hip_attn_decode_offload_cuda`])
//!
//! 1. The mask search (when due) and the block-sparse attention run the usual kernels with the
//!    page tables: a resident row is read from the bank, any other row straight from the host
//!    store over the bus (zero-copy). Nothing moves into a bank during the step, so the step
//!    reads a consistent table. Each kernel appends the first read of every (KV head, token)
//!    entry in the current epoch to its cache's access list on the device.
//! 2. After a step that refreshed the mask, each cache applies its list (the policy on the
//!    device, then the inserted rows copied from the host store into the bank) and starts a
//!    new epoch. The sparse-attention list of an epoch holds what the steps since the previous
//!    refresh read; the mask list what the refresh's search read. Nothing waits for the device:
//!    an update is four kernel launches queued on a side stream behind the step, and the main
//!    stream waits for it only where the cache is read next (the sparse-attention cache at this
//!    layer's next step, the mask cache at the next refresh), so the row copies overlap the
//!    other layers' work.
//!
//! Access lists are **distinct** entries per epoch (first reads only), so the policy sees every
//! missed entry once: its "most missed first" order reduces to token order, and the hit and
//! byte counters of [`OffloadStats`] count distinct entries per epoch, not every read. A list
//! longer than its capacity keeps its first entries (the rest are not inserted this time).

use std::ffi::c_void;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaEvent, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Device, Storage, Tensor};
use half::{bf16, f16};

use candle_core::cuda_backend::cudarc::driver::DeviceRepr;

use super::{
    check_mask_fits, cuda_err, func, mask_search, span_attn, Keys, KvArgs, Paged, Residency, StageArgs,
};
use crate::error::{Error, Result};
use crate::layout::AttnDims;
use crate::offload::{CacheKind, Offload, OffloadStats};
use crate::{HipConfig, MaskCache};

/// `offload.cu` compiled by `build.rs`.
const OFF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/offload.fatbin"));
const OFF_MODULE: &str = "hip_offload";

fn cuda_device(device: &Device) -> Result<CudaDevice> {
    super::cuda_device(device, "KV offloading")
}

fn check_dtype(dtype: DType) -> Result<()> {
    if matches!(dtype, DType::BF16 | DType::F16) {
        Ok(())
    } else {
        Err(Error::DType { name: "kv", expected: "bf16 or f16".into(), got: dtype })
    }
}

/// The device pointer of a contiguous bf16/f16 tensor's first element.
fn half_ptr(t: &Tensor, dev: &CudaDevice) -> Result<u64> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*st else {
        return Err(Error::UnsupportedDevice { op: "KV offloading", device: "a host tensor".into() });
    };
    let stream = dev.cuda_stream();
    let p = match t.dtype() {
        DType::BF16 => cs.as_cuda_slice::<bf16>()?.device_ptr(&stream).0,
        DType::F16 => cs.as_cuda_slice::<f16>()?.device_ptr(&stream).0,
        dt => return Err(Error::DType { name: "kv", expected: "bf16 or f16".into(), got: dt }),
    };
    Ok(p + l.start_offset() as u64 * 2)
}

/// Pinned host memory mapped into the device's address space.
struct Mapped<T> {
    mem: PinnedHostSlice<T>,
    /// The device address of `mem`.
    dev: u64,
}

impl<
        T: candle_core::cuda_backend::cudarc::driver::DeviceRepr
            + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
    > Mapped<T>
{
    fn new(dev: &CudaDevice, len: usize, what: &'static str) -> Result<Self> {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).filter(|&b| b < isize::MAX as usize);
        let Some(bytes) = bytes else {
            return Err(Error::arg(what, len, "too many elements for one host allocation"));
        };
        let refused = |e: &dyn std::fmt::Display| Error::PinnedAllocRefused {
            what,
            bytes: bytes as u64,
            reason: e.to_string(),
        };
        let ctx = dev.cuda_stream().context().clone();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: the memory is uninitialised; the stores write rows before any read of them.
        let mut mem =
            unsafe { ctx.alloc_pinned_with_flags::<T>(len.max(1), flags) }.map_err(|e| refused(&e))?;
        let host = mem.as_mut_ptr().map_err(|e| refused(&e))?;
        let mut dptr: sys::CUdeviceptr = 0;
        // SAFETY: `host` is a live allocation made with CU_MEMHOSTALLOC_DEVICEMAP.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, host as *mut c_void, 0) }
            .result()
            .map_err(|e| refused(&e))?;
        Ok(Mapped { mem, dev: dptr })
    }
}

/// Free bytes of `device`'s memory (for [`Offload::check_fits`] before building caches).
///
/// # Errors
/// [`Error::UnsupportedDevice`] off CUDA; driver errors.
pub fn free_gpu_bytes(device: &Device) -> Result<u64> {
    let dev = cuda_device(device)?;
    let (free, _) = dev.cuda_stream().context().mem_get_info().map_err(cuda_err)?;
    Ok(free as u64)
}

/// A sequence's K/V rows in pinned, device-mapped host memory: the host store of offloading.
///
/// Laid out like a device cache pool, `[rows, heads_kv, head_dim]` for K and for V, with a block
/// table mapping tokens to rows ([`OffloadedKv`]). Kernels read it directly over the bus; it is
/// never CUDA managed memory (which can hang a shared GPU). Rows are written through from the
/// device with [`HostKvStore::write_rows`].
pub struct HostKvStore {
    k: Mapped<u16>,
    v: Mapped<u16>,
    rows: usize,
    heads_kv: usize,
    head_dim: usize,
    dtype: DType,
    dev: CudaDevice,
}

impl Drop for HostKvStore {
    fn drop(&mut self) {
        // Kernels on any stream (a cache's side-stream update included) may still read the
        // pinned memory: let them finish before it is freed.
        let _ = self.dev.cuda_stream().context().synchronize();
    }
}

impl std::fmt::Debug for HostKvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKvStore")
            .field("rows", &self.rows)
            .field("heads_kv", &self.heads_kv)
            .field("head_dim", &self.head_dim)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

impl HostKvStore {
    /// A store of `rows` rows of `heads_kv × head_dim` `dtype` elements for K and for V, pinned
    /// and mapped for `device`. Rows are uninitialised until written.
    ///
    /// # Errors
    /// [`Error::UnsupportedDevice`] off CUDA; [`Error::DType`] unless bf16/f16;
    /// [`Error::InvalidArgument`] for head dims other than 64 and 128 or zero sizes;
    /// [`Error::PinnedAllocRefused`] with the driver's reason when the host memory cannot be
    /// pinned (nothing is allocated then).
    pub fn new(device: &Device, rows: usize, heads_kv: usize, head_dim: usize, dtype: DType) -> Result<Self> {
        let dev = cuda_device(device)?;
        check_dtype(dtype)?;
        if !matches!(head_dim, 64 | 128) {
            return Err(Error::arg("head_dim", head_dim, "CUDA kernels support head dims 64 and 128"));
        }
        if rows == 0 || heads_kv == 0 {
            return Err(Error::arg("rows", format!("{rows} rows × {heads_kv} heads"), "must not be empty"));
        }
        let elems = rows
            .checked_mul(heads_kv * head_dim)
            .ok_or_else(|| Error::arg("rows", rows, "the store size overflows"))?;
        let k = Mapped::new(&dev, elems, "host K store")?;
        let v = Mapped::new(&dev, elems, "host V store")?;
        Ok(HostKvStore { k, v, rows, heads_kv, head_dim, dtype, dev })
    }

    /// Rows of the store.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// KV heads per row.
    pub fn heads_kv(&self) -> usize {
        self.heads_kv
    }
    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Pinned host bytes (K and V).
    pub fn bytes(&self) -> u64 {
        2 * (self.rows * self.heads_kv * self.head_dim * 2) as u64
    }

    /// Writes rows through from the device: row `rows[i]` of the store gets `k[i]` and `v[i]`
    /// (`[n, heads_kv, head_dim]` tensors on the store's device, `rows` a u32 tensor of `n`
    /// entries), in stream order with the kernels that read the store.
    ///
    /// # Errors
    /// Shapes, dtypes or devices that do not match the store; a row index past the store is
    /// checked on the host (the indices are read back, a wait for the device: hot loops use
    /// [`write_rows_listed`](Self::write_rows_listed) or [`write_span`](Self::write_span)).
    pub fn write_rows(&mut self, rows: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        if rows.dtype() != DType::U32 {
            return Err(Error::DType { name: "rows", expected: "u32".into(), got: rows.dtype() });
        }
        let host_rows = rows.flatten_all()?.to_vec1::<u32>()?;
        self.write_rows_listed(rows, &host_rows, k, v)
    }

    /// [`write_rows`](Self::write_rows) when the caller has the rows on the host too
    /// (`host_rows`, the content of `rows`): they are checked there, so nothing is read back
    /// from the device (a batched decode step writes every layer this way). Should `rows`
    /// differ from `host_rows`, a row past the store is still skipped on the device, never
    /// written out of bounds.
    ///
    /// # Errors
    /// As [`write_rows`](Self::write_rows); `rows` and `host_rows` of different lengths.
    pub fn write_rows_listed(
        &mut self,
        rows: &Tensor,
        host_rows: &[u32],
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let n = host_rows.len();
        self.check_rows(n, k, v)?;
        if rows.dtype() != DType::U32 || rows.elem_count() != n {
            return Err(Error::arg(
                "rows",
                format!("{:?} with {} entries", rows.dtype(), rows.elem_count()),
                format!("must be u32 with the {n} entries of host_rows"),
            ));
        }
        if let Some(&bad) = host_rows.iter().find(|&&r| r as usize >= self.rows) {
            return Err(Error::arg("rows", bad, format!("past the store's {} rows", self.rows)));
        }
        if n == 0 {
            return Ok(());
        }
        let (k, v, rows) = (k.contiguous()?, v.contiguous()?, rows.contiguous()?);
        let (kp, vp, rp) =
            (half_ptr(&k, &self.dev)?, half_ptr(&v, &self.dev)?, super::u32_ptr(&rows, &self.dev)?);
        let (chunks, n_i, n_rows) = ((self.heads_kv * self.head_dim / 8) as i32, n as i32, self.rows as i64);
        let f = func(&self.dev, OFF, OFF_MODULE, "offload_write_rows")?;
        let stream = self.dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&kp).arg(&vp).arg(&self.k.dev).arg(&self.v.dev).arg(&rp).arg(&n_i).arg(&chunks).arg(&n_rows);
        // SAFETY: argument list matches `offload_write_rows`; sources hold n rows, rows past the
        // store are skipped by the kernel.
        unsafe { b.launch(grid(n * chunks as usize)) }.map_err(cuda_err)?;
        Ok(())
    }

    /// Rows `rows` of K and of V as f32, token-major (`rows.len() × heads_kv × head_dim` each),
    /// after every queued kernel finished (one wait for the device). For snapshots.
    ///
    /// # Errors
    /// A row past the store; driver errors.
    pub fn read_rows(&self, rows: &[usize]) -> Result<(Vec<f32>, Vec<f32>)> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.rows) {
            return Err(Error::arg("row", bad, format!("past the store's {} rows", self.rows)));
        }
        self.dev.cuda_stream().synchronize().map_err(cuda_err)?;
        let len = self.heads_kv * self.head_dim;
        let conv = |m: &Mapped<u16>| -> Result<Vec<f32>> {
            let all = m.mem.as_slice().map_err(cuda_err)?;
            let mut out = Vec::with_capacity(rows.len() * len);
            for &r in rows {
                let bits = &all[r * len..(r + 1) * len];
                if self.dtype == DType::BF16 {
                    out.extend(bits.iter().map(|&b| bf16::from_bits(b).to_f32()));
                } else {
                    out.extend(bits.iter().map(|&b| f16::from_bits(b).to_f32()));
                }
            }
            Ok(out)
        };
        Ok((conv(&self.k)?, conv(&self.v)?))
    }

    /// Copies `n` rows from row `src` to row `dst` (K and V; copy-on-write of forked blocks),
    /// after every queued kernel finished. The ranges may not overlap.
    ///
    /// # Errors
    /// Ranges past the store or overlapping; driver errors.
    pub fn copy_rows(&mut self, src: usize, dst: usize, n: usize) -> Result<()> {
        let fits = |a: usize| a.checked_add(n).is_some_and(|e| e <= self.rows);
        if !fits(src) || !fits(dst) || (src < dst + n && dst < src + n && n > 0) {
            return Err(Error::arg(
                "copy_rows",
                format!("{n} rows {src} -> {dst}"),
                format!("ranges must lie in the store's {} rows and not overlap", self.rows),
            ));
        }
        self.dev.cuda_stream().synchronize().map_err(cuda_err)?;
        let len = self.heads_kv * self.head_dim;
        for m in [&mut self.k, &mut self.v] {
            let all = m.mem.as_mut_slice().map_err(cuda_err)?;
            all.copy_within(src * len..(src + n) * len, dst * len);
        }
        Ok(())
    }

    /// Writes the `n` tokens of `k`, `v: [n, heads_kv, head_dim]` (on the store's device, its
    /// dtype) at positions `start..start + n` of a sequence whose blocks `block_table` (u32, on
    /// the device) lists: token `p` goes to row `block_table[p / block_size] * block_size + p %
    /// block_size`. Unlike [`write_rows`](Self::write_rows) nothing is read back (the decode
    /// step's write-through): the table is trusted like a [`super::CudaPagedKv`]'s, and a row
    /// past the store is skipped on the device rather than written.
    ///
    /// # Errors
    /// Shapes, dtypes or devices that do not match the store; a table too short for the span.
    pub fn write_span(
        &mut self,
        block_table: &Tensor,
        block_size: usize,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let n = k.dim(0)?;
        self.check_rows(n, k, v)?;
        self.check_span(block_table, block_size, start, n)?;
        if n == 0 {
            return Ok(());
        }
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let (kp, vp) = (half_ptr(&k, &self.dev)?, half_ptr(&v, &self.dev)?);
        // SAFETY: the sources hold n rows (checked), the destination is the store.
        unsafe { self.span_kernel(true, block_table, block_size, start, n, [kp, vp, self.k.dev, self.v.dev]) }
    }

    /// Copies the rows of positions `start..start + n` of a sequence (found through
    /// `block_table` as in [`write_span`](Self::write_span)) into new device tensors `[n,
    /// heads_kv, head_dim]` of K and of V, in stream order: one coalesced pass over the bus.
    /// This stages a sequence's rows on the GPU (an offloaded prefill chunk attends there). A
    /// row past the store reads as zeros.
    ///
    /// # Errors
    /// A table that is not u32 or too short for the span; device memory running out.
    pub fn read_span(
        &self,
        block_table: &Tensor,
        block_size: usize,
        start: usize,
        n: usize,
    ) -> Result<(Tensor, Tensor)> {
        self.check_span(block_table, block_size, start, n)?;
        let device = Device::Cuda(self.dev.clone());
        let shape = (n, self.heads_kv, self.head_dim);
        // SAFETY: `offload_span` writes every element of both (zeros for rows past the store).
        let (k, v) = unsafe {
            (Tensor::empty(shape, self.dtype, &device)?, Tensor::empty(shape, self.dtype, &device)?)
        };
        if n > 0 {
            let (kp, vp) = (half_ptr(&k, &self.dev)?, half_ptr(&v, &self.dev)?);
            // SAFETY: the destinations are fresh tensors of n rows, the sources the store.
            unsafe {
                self.span_kernel(false, block_table, block_size, start, n, [self.k.dev, self.v.dev, kp, vp])
            }?;
        }
        Ok((k, v))
    }

    /// Checks a block table covers positions `start..start + n`.
    fn check_span(&self, block_table: &Tensor, block_size: usize, start: usize, n: usize) -> Result<()> {
        let covered = block_table.elem_count().checked_mul(block_size);
        if block_size == 0
            || block_table.dtype() != DType::U32
            || covered.is_none_or(|c| start.checked_add(n).is_none_or(|e| c < e))
            || start + n > i32::MAX as usize
        {
            return Err(Error::arg(
                "block_table",
                format!("{} entries of {block_size} tokens", block_table.elem_count()),
                format!("must be u32 and cover positions {start}..{}", start.saturating_add(n)),
            ));
        }
        Ok(())
    }

    /// Launches `offload_span` over `n` positions from `start`, into the store (`to_store`) or
    /// out of it; `ptrs` = source K, source V, destination K, destination V.
    ///
    /// # Safety
    /// The device side of `ptrs` (not the store) must hold `n` rows; the span was checked.
    #[allow(clippy::too_many_arguments)]
    unsafe fn span_kernel(
        &self,
        to_store: bool,
        block_table: &Tensor,
        block_size: usize,
        start: usize,
        n: usize,
        ptrs: [u64; 4],
    ) -> Result<()> {
        let table = block_table.contiguous()?;
        let tp = super::u32_ptr(&table, &self.dev)?;
        let chunks = (self.heads_kv * self.head_dim / 8) as i32;
        let (page, start_i, n_i, n_rows) = (block_size as i32, start as i32, n as i32, self.rows as i64);
        let dir = i32::from(to_store);
        let f = func(&self.dev, OFF, OFF_MODULE, "offload_span")?;
        let stream = self.dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&ptrs[0]).arg(&ptrs[1]).arg(&ptrs[2]).arg(&ptrs[3]).arg(&tp);
        b.arg(&page).arg(&start_i).arg(&n_i).arg(&chunks).arg(&n_rows).arg(&dir);
        // SAFETY: the argument list matches the kernel; the table covers the span (checked by
        // the caller) and rows past the store are skipped (write) or read as zeros (read).
        unsafe { b.launch(grid(n * chunks as usize)) }.map_err(cuda_err)?;
        Ok(())
    }

    /// Checks `k`, `v` are `n` rows of the store's shape and dtype.
    fn check_rows(&self, n: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let want = [n, self.heads_kv, self.head_dim];
        for (name, t) in [("k", k), ("v", v)] {
            if t.dims() != want {
                return Err(Error::shape(name, format!("{want:?}"), t.dims()));
            }
            if t.dtype() != self.dtype {
                return Err(Error::DType {
                    name,
                    expected: format!("{:?} like the store", self.dtype),
                    got: t.dtype(),
                });
            }
        }
        Ok(())
    }

    /// Row `row` of K and of V as f32 (`heads_kv × head_dim` each), after every queued kernel
    /// finished (waits for the device). For tests and inspection.
    ///
    /// # Errors
    /// A row past the store; driver errors.
    pub fn read_row(&self, row: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        if row >= self.rows {
            return Err(Error::arg("row", row, format!("past the store's {} rows", self.rows)));
        }
        self.dev.cuda_stream().synchronize().map_err(cuda_err)?;
        let len = self.heads_kv * self.head_dim;
        let conv = |m: &Mapped<u16>| -> Result<Vec<f32>> {
            let all = m.mem.as_slice().map_err(cuda_err)?;
            let bits = &all[row * len..(row + 1) * len];
            Ok(if self.dtype == DType::BF16 {
                bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
            } else {
                bits.iter().map(|&b| f16::from_bits(b).to_f32()).collect()
            })
        };
        Ok((conv(&self.k)?, conv(&self.v)?))
    }
}

/// A launch of `n` independent threads' work, grid-strided.
fn grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 132 * 8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One sequence's rows in a [`HostKvStore`]: token `j` is row
/// `block_table[j / block_size] * block_size + j % block_size`.
#[derive(Debug, Clone, Copy)]
pub struct OffloadedKv<'a> {
    /// The host store.
    pub store: &'a HostKvStore,
    /// Store block of each group of `block_size` tokens (u32, on the device).
    pub block_table: &'a Tensor,
    /// Tokens per block.
    pub block_size: usize,
    /// Tokens in the sequence.
    pub len: usize,
}

impl OffloadedKv<'_> {
    /// Checks the view and `q: [1, t_q, heads_q, head_dim]` against it.
    ///
    /// # Errors
    /// [`Error::Shape`] / [`Error::InvalidArgument`] naming what does not fit.
    pub fn dims(&self, q: &Tensor) -> Result<AttnDims> {
        let s = self.store;
        let dims = super::paged_dims(
            s.rows,
            s.heads_kv,
            s.head_dim,
            self.block_size,
            self.len,
            self.block_table,
            q,
        )?;
        if q.dtype() != s.dtype {
            return Err(Error::DType {
                name: "q",
                expected: format!("{:?} like the store", s.dtype),
                got: q.dtype(),
            });
        }
        Ok(dims)
    }

    fn paged(&self, r: Residency) -> Paged<'_> {
        Paged { table: self.block_table, page: self.block_size, t_k: self.len, lens: None, offload: Some(r) }
    }
}

/// The side stream of `dev`'s context for the updates of caches of `kind` (one per context and
/// kind, shared by every layer's cache of that kind), created with the driver directly and
/// wrapped as a borrowed stream. One per kind: the sparse-attention caches' updates, waited for
/// at each layer's next step, must not queue behind the mask caches' (their LRU plan is the
/// slow part of an update: one CTA per KV head over 65,536 slots), which are waited for only
/// at the next refresh. A stream made through cudarc
/// (`CudaContext::new_stream`, `CudaStream::fork`) switches the whole context into cudarc's
/// multi-stream mode, in which every use of every device buffer records CUDA events (each of
/// candle's launches, for every argument): that made every decode step of a whole model about
/// 4 ms slower (Qwen2.5-1.5B shapes on the H200, whatever the context length). The ordering
/// between the streams is the caches' own ([`GpuCache`]: joins before and after each update).
/// The stream lives as long as the process, like the loaded modules (it holds the context).
fn side_stream(dev: &CudaDevice, kind: CacheKind) -> Result<Arc<CudaStream>> {
    use candle_core::cuda_backend::cudarc::driver::result::stream;
    type Streams = std::collections::HashMap<(usize, bool), Arc<CudaStream>>;
    static SIDE: std::sync::OnceLock<std::sync::Mutex<Streams>> = std::sync::OnceLock::new();
    let ctx = dev.cuda_stream().context().clone();
    let key = (Arc::as_ptr(&ctx) as usize, kind == CacheKind::Mask);
    let mut map =
        SIDE.get_or_init(Default::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(s) = map.get(&key) {
        return Ok(Arc::clone(s));
    }
    ctx.bind_to_thread().map_err(cuda_err)?;
    let raw = stream::create(stream::StreamKind::NonBlocking).map_err(cuda_err)?;
    // SAFETY: `raw` is a stream of this context that is never destroyed; the caches order their
    // work on it against the main stream themselves.
    let side = unsafe { ctx.wrap_borrowed_stream(raw) };
    map.insert(key, Arc::clone(&side));
    Ok(side)
}

/// `LruArgs` of `offload.cu`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct LruArgs {
    table: u64,
    owner: u64,
    last: u64,
    bits: u64,
    taken: u64,
    missn: u64,
    scratch: u64,
    ins: u64,
    ins_n: u64,
    stats: u64,
    tokens: i64,
    slots: i32,
    words: i32,
    tick: i32,
}
// SAFETY: plain old data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for LruArgs {}

/// One GPU cache of one layer of one sequence: a bank of rows, its page table, and the state of
/// its LRU policy, all on the device.
///
/// The policy is [`TokenCache`](crate::offload::TokenCache)'s (the host reference it is tested against): after each mask
/// refresh, the distinct entries the kernels read since the previous update are classified
/// (hits get the new tick), and each head inserts `min(misses, slots - hits)` missed tokens,
/// lowest first, into its lowest free slots, else its least recently used slots not read in
/// this update, filled in ascending slot order; the rows are copied from the host store. All of
/// it runs as four kernels in stream order, so an update costs the host nothing but launches.
pub struct GpuCache {
    kind: CacheKind,
    kv_heads: usize,
    max_tokens: usize,
    slots_per_head: usize,
    entry_bytes: u64,
    bank_k: Tensor,
    bank_v: Option<Tensor>,
    /// `[kv_heads, max_tokens]`: global slot or -1.
    table: CudaSlice<i32>,
    /// `[kv_heads × slots]`: token or -1.
    owner: CudaSlice<i32>,
    /// `[kv_heads × slots]`: tick of the last access (0 when empty).
    last: CudaSlice<i32>,
    /// `[kv_heads, ceil(max_tokens / 32)]`: missed tokens of the update in flight (zero between).
    bits: CudaSlice<u32>,
    taken: CudaSlice<u32>,
    missn: CudaSlice<u32>,
    scratch: CudaSlice<i32>,
    ins: CudaSlice<i32>,
    ins_n: CudaSlice<u32>,
    /// hits, misses, inserts, evictions, dropped, staged.
    stats: CudaSlice<u64>,
    /// Staging area of missed rows ([`GpuCache::with_miss_staging`]; `None`: none).
    staging: Option<Staging>,
    /// Per entry: the epoch of its last recorded read.
    seen: CudaSlice<i32>,
    list: CudaSlice<u32>,
    list_n: CudaSlice<u32>,
    epoch: i32,
    tick: i32,
    /// `HIP_OFFLOAD_TIMING=1`: each update waits for the device before and after, and its wall
    /// time is summed here (diagnostics for benchmarks; it stalls the pipeline).
    timing: Option<std::time::Duration>,
    /// Updates run on a side stream: the mask cache's bank and table are read only at the next
    /// refresh, the sparse-attention cache's at this layer's next step, so the update (mostly
    /// row copies over the bus) overlaps the other layers' work in between. `None` (the
    /// `HIP_OFFLOAD_SPARSE_SIDE=0` diagnostic, sparse-attention cache only) updates in stream
    /// order.
    side: Option<Arc<CudaStream>>,
    /// Recorded on `side` after each update: the main stream waits for this cache's own update,
    /// not for the other layers' queued after it.
    side_done: Option<CudaEvent>,
    /// An update was queued on `side` that the main stream has not waited for yet.
    side_pending: std::sync::atomic::AtomicBool,
    /// The block table the last side-stream update reads: a copy made on the main stream, so
    /// that the sequence's own table may be replaced (and freed on the main stream) while the
    /// update runs; dropped only after the main stream waited for the update.
    side_table: Option<Tensor>,
    head_dim: usize,
    dev: CudaDevice,
}

/// Where a decode kernel leaves the rows it read over the bus, for the next update's inserts:
/// `1 << bits` places, each a key row (and a value row) tagged `(epoch << 32) | entry`.
struct Staging {
    k: Tensor,
    v: Option<Tensor>,
    tag: CudaSlice<u64>,
    /// The kernels' view of the above.
    args: StageArgs,
}

impl Drop for GpuCache {
    fn drop(&mut self) {
        // The buffers are freed in the main stream's order: let it wait for the last update.
        let _ = self.ready();
    }
}

impl std::fmt::Debug for GpuCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuCache")
            .field("kind", &self.kind)
            .field("kv_heads", &self.kv_heads)
            .field("slots_per_head", &self.slots_per_head)
            .field("max_tokens", &self.max_tokens)
            .field("tick", &self.tick)
            .finish_non_exhaustive()
    }
}

impl GpuCache {
    /// An empty cache of `slots_per_head` slots for each of `kv_heads` heads, covering sequences
    /// of up to `max_tokens` tokens, on `device`.
    ///
    /// # Errors
    /// As [`crate::offload::TokenCache::new`]; [`Error::UnsupportedDevice`] off CUDA; [`Error::DType`] unless
    /// bf16/f16; `kv_heads × max_tokens` beyond the 2^32 entries the access lists address;
    /// candle errors when device memory runs out.
    pub fn new(
        device: &Device,
        kind: CacheKind,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        max_tokens: usize,
        slots_per_head: usize,
    ) -> Result<Self> {
        let dev = cuda_device(device)?;
        check_dtype(dtype)?;
        // The host policy's checks on the sizes (no allocation of its tables here).
        if kv_heads == 0 || (kv_heads as u64).saturating_mul(max_tokens as u64) > u32::MAX as u64 {
            return Err(Error::arg(
                "max_tokens",
                max_tokens,
                format!(
                    "{kv_heads} heads × {max_tokens} tokens: need 1 ≤ entries ≤ 2^32 (access lists are u32)"
                ),
            ));
        }
        if kv_heads.checked_mul(slots_per_head).is_none_or(|n| n as u64 >= 1 << 31) {
            return Err(Error::arg(
                "slots_per_head",
                slots_per_head,
                "the bank's slot ids must fit in an i32",
            ));
        }
        let slots = (kv_heads * slots_per_head).max(1);
        let bank_k = Tensor::zeros((slots, head_dim), dtype, device)?;
        let bank_v = match kind {
            CacheKind::SparseAttn => Some(Tensor::zeros((slots, head_dim), dtype, device)?),
            CacheKind::Mask => None,
        };
        let stream = dev.cuda_stream();
        let e = cuda_err;
        let table = stream.clone_htod(&vec![-1i32; kv_heads * max_tokens]).map_err(e)?;
        let owner = stream.clone_htod(&vec![-1i32; slots]).map_err(e)?;
        let words = max_tokens.div_ceil(32);
        let side = match kind {
            CacheKind::SparseAttn
                if std::env::var_os("HIP_OFFLOAD_SPARSE_SIDE").is_some_and(|v| v == "0") =>
            {
                None
            }
            _ => Some(side_stream(&dev, kind)?),
        };
        // A list holds an epoch's distinct reads: at least twice the bank, at least 4096 a head.
        let cap = (2 * kv_heads * slots_per_head).max(4096 * kv_heads);
        Ok(GpuCache {
            kind,
            kv_heads,
            max_tokens,
            slots_per_head,
            entry_bytes: kind.entry_bytes(head_dim, 2),
            bank_k,
            bank_v,
            table,
            owner,
            last: stream.alloc_zeros::<i32>(slots).map_err(e)?,
            bits: stream.alloc_zeros::<u32>(kv_heads * words.max(1)).map_err(e)?,
            taken: stream.alloc_zeros::<u32>(kv_heads).map_err(e)?,
            missn: stream.alloc_zeros::<u32>(kv_heads).map_err(e)?,
            scratch: stream.alloc_zeros::<i32>(slots).map_err(e)?,
            ins: stream.alloc_zeros::<i32>(3 * slots).map_err(e)?,
            ins_n: stream.alloc_zeros::<u32>(1).map_err(e)?,
            stats: stream.alloc_zeros::<u64>(6).map_err(e)?,
            staging: None,
            seen: stream.alloc_zeros::<i32>(kv_heads * max_tokens).map_err(e)?,
            list: stream.alloc_zeros::<u32>(cap).map_err(e)?,
            list_n: stream.alloc_zeros::<u32>(1).map_err(e)?,
            epoch: 1,
            tick: 0,
            timing: std::env::var_os("HIP_OFFLOAD_TIMING")
                .is_some_and(|v| v == "1")
                .then_some(Default::default()),
            side_done: match &side {
                Some(_) => Some(stream.context().new_event(None).map_err(e)?),
                None => None,
            },
            side,
            side_pending: Default::default(),
            side_table: None,
            head_dim,
            dev,
        })
    }

    /// Gives the cache a staging area of `rows` places (rounded up to a power of two; 0: none):
    /// a decode kernel that reads a row over the bus leaves it there (hash-placed, first come
    /// first served), and the next update copies its inserts from there instead of from the
    /// host store ([`OffloadStats::staged`] counts them). Sized by
    /// [`Offload::miss_stage_rows`]; the outputs do not depend on it.
    ///
    /// # Errors
    /// candle errors when device memory runs out; more than 2^31 places.
    pub fn with_miss_staging(mut self, rows: usize) -> Result<Self> {
        if rows == 0 {
            self.staging = None;
            return Ok(self);
        }
        let places = rows
            .max(2)
            .checked_next_power_of_two()
            .filter(|&p| p <= 1 << 31)
            .ok_or_else(|| Error::arg("miss staging rows", rows, "at most 2^31 places"))?;
        let rows = || Tensor::zeros((places, self.head_dim), self.bank_k.dtype(), self.bank_k.device());
        let k = rows()?;
        let v = match self.kind {
            CacheKind::SparseAttn => Some(rows()?),
            CacheKind::Mask => None,
        };
        let stream = self.dev.cuda_stream();
        let tag = stream.alloc_zeros::<u64>(places).map_err(cuda_err)?;
        let args = StageArgs {
            k: half_ptr(&k, &self.dev)?,
            v: match &v {
                Some(v) => half_ptr(v, &self.dev)?,
                None => 0,
            },
            tag: tag.device_ptr(&stream).0,
            // At least two places: the hash takes at least one bit.
            bits: places.trailing_zeros() as i32,
        };
        self.staging = Some(Staging { k, v, tag, args });
        Ok(self)
    }

    /// Which cache this is.
    pub fn kind(&self) -> CacheKind {
        self.kind
    }
    /// KV heads.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }
    /// Tokens the page table covers.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }
    /// Slots per KV head.
    pub fn slots_per_head(&self) -> usize {
        self.slots_per_head
    }
    /// Updates applied so far (the LRU clock).
    pub fn tick(&self) -> u64 {
        self.tick as u64
    }

    /// Counters of every update so far (waits for the device). Accesses are distinct entries
    /// per epoch (see the module docs).
    ///
    /// # Errors
    /// Driver errors.
    pub fn stats(&self) -> Result<OffloadStats> {
        let v = self.download(&self.stats)?;
        Ok(OffloadStats {
            hits: v[0],
            misses: v[1],
            inserts: v[2],
            evictions: v[3],
            bytes_moved: (v[1] + v[2]).saturating_sub(v[5]).saturating_mul(self.entry_bytes),
            staged: v[5],
        })
    }

    /// Recorded reads that did not fit in an access list, so far (waits for the device): they
    /// were served, but not considered for insertion.
    ///
    /// # Errors
    /// Driver errors.
    pub fn dropped(&self) -> Result<u64> {
        Ok(self.download(&self.stats)?[4])
    }

    /// The page table, `[kv_heads, max_tokens]` (waits for the device; for tests and tools).
    ///
    /// # Errors
    /// Driver errors.
    pub fn table(&self) -> Result<Vec<i32>> {
        self.download(&self.table)
    }

    /// The token held by each global slot, or -1 (waits for the device; for tests and tools).
    ///
    /// # Errors
    /// Driver errors.
    pub fn owners(&self) -> Result<Vec<i32>> {
        self.download(&self.owner)
    }

    /// A copy of `s` on the host, after any pending update.
    fn download<T: DeviceRepr + Default + Clone>(&self, s: &CudaSlice<T>) -> Result<Vec<T>> {
        self.update_stream().synchronize().map_err(cuda_err)?;
        Ok(self.dev.cuda_stream().clone_dtoh(s).map_err(cuda_err)?)
    }

    /// The bank rows `[kv_heads × slots_per_head, head_dim]`: keys, and values for the
    /// sparse-attention cache. Row `s` holds the entry of [`owners`](Self::owners)`[s]` of head
    /// `s / slots_per_head`. The main stream first waits for a pending update, so reading the
    /// tensors sees its rows.
    ///
    /// # Errors
    /// Driver errors.
    pub fn banks(&self) -> Result<(&Tensor, Option<&Tensor>)> {
        self.ready()?;
        Ok((&self.bank_k, self.bank_v.as_ref()))
    }

    /// Device bytes of the bank, page table, policy state, recording array and access list.
    pub fn gpu_bytes(&self) -> u64 {
        let bank = self.bank_k.elem_count() as u64 * 2 * if self.bank_v.is_some() { 2 } else { 1 };
        let words = self.table.len()
            + self.owner.len()
            + self.last.len()
            + self.bits.len()
            + self.scratch.len()
            + self.ins.len()
            + self.seen.len()
            + self.list.len();
        let staging = self.staging.as_ref().map_or(0, |s| {
            let rows = s.k.elem_count() as u64 * 2 * if s.v.is_some() { 2 } else { 1 };
            rows + 8 * s.tag.len() as u64
        });
        bank + 4 * words as u64 + staging
    }

    fn residency(&self, store: &HostKvStore, record: bool) -> Residency {
        let stream = self.dev.cuda_stream();
        let p = |s: &CudaSlice<i32>| s.device_ptr(&stream).0;
        let pu = |s: &CudaSlice<u32>| s.device_ptr(&stream).0;
        Residency {
            host_k: store.k.dev,
            host_v: store.v.dev,
            has_values: self.bank_v.is_some(),
            table: p(&self.table),
            seen: if record { p(&self.seen) } else { 0 },
            list: pu(&self.list),
            list_n: pu(&self.list_n),
            stride: self.max_tokens as i64,
            epoch: self.epoch,
            list_cap: self.list.len() as i32,
            stage: self.stage_args(),
        }
    }

    /// The kernels' view of the staging area (zero without).
    fn stage_args(&self) -> StageArgs {
        self.staging.as_ref().map_or_else(StageArgs::default, |s| s.args)
    }

    /// Applies the LRU update for the entries recorded since the last one (see the type docs)
    /// and starts a new epoch. Everything is queued on the stream; nothing waits.
    fn update(&mut self, kv: &OffloadedKv<'_>) -> Result<()> {
        if self.timing.is_none() {
            return self.queue_update(kv);
        }
        self.dev.cuda_stream().synchronize().map_err(cuda_err)?;
        let t0 = std::time::Instant::now();
        self.queue_update(kv)?;
        self.update_stream().synchronize().map_err(cuda_err)?;
        *self.timing.as_mut().expect("timing on") += t0.elapsed();
        Ok(())
    }

    /// Wall time of the updates so far when `HIP_OFFLOAD_TIMING=1` was set at construction
    /// (each update then waits for the device before and after), else `None`.
    pub fn update_time(&self) -> Option<std::time::Duration> {
        self.timing
    }

    /// The stream updates run on.
    fn update_stream(&self) -> Arc<CudaStream> {
        self.side.clone().unwrap_or_else(|| self.dev.cuda_stream())
    }

    /// Makes the main stream wait for a pending side-stream update (before anything reads the
    /// bank or the table again).
    fn ready(&self) -> Result<()> {
        if let (Some(done), true) =
            (&self.side_done, self.side_pending.load(std::sync::atomic::Ordering::Relaxed))
        {
            self.dev.cuda_stream().wait(done).map_err(cuda_err)?;
            self.side_pending.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    fn queue_update(&mut self, kv: &OffloadedKv<'_>) -> Result<()> {
        self.tick = self.tick.checked_add(1).ok_or_else(|| Error::arg("tick", self.tick, "2^31 updates"))?;
        self.ready()?;
        let stream = self.update_stream();
        if self.side.is_some() {
            // The previous copy is freed here, after the main stream waited for its reader.
            self.side_table = Some(kv.block_table.copy()?);
            // After the step that recorded the list (and the copy).
            stream.join(&self.dev.cuda_stream()).map_err(cuda_err)?;
        }
        let e = cuda_err;
        stream.memset_zeros(&mut self.ins_n).map_err(e)?;
        let words = self.max_tokens.div_ceil(32).max(1);
        let args = {
            let p = |s: &CudaSlice<i32>| s.device_ptr(&stream).0;
            let pu = |s: &CudaSlice<u32>| s.device_ptr(&stream).0;
            LruArgs {
                table: p(&self.table),
                owner: p(&self.owner),
                last: p(&self.last),
                bits: pu(&self.bits),
                taken: pu(&self.taken),
                missn: pu(&self.missn),
                scratch: p(&self.scratch),
                ins: p(&self.ins),
                ins_n: pu(&self.ins_n),
                stats: self.stats.device_ptr(&stream).0,
                tokens: self.max_tokens as i64,
                slots: self.slots_per_head as i32,
                words: words as i32,
                tick: self.tick,
            }
        };
        let cap = self.list.len() as i32;
        let f = func(&self.dev, OFF, OFF_MODULE, "lru_classify")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&args).arg(&self.list).arg(&self.list_n).arg(&cap);
        // SAFETY: argument list matches `lru_classify`; list entries are head × max_tokens +
        // token indices below the table's size (the kernels record only such).
        unsafe { b.launch(grid(self.list.len())) }.map_err(e)?;
        let f = func(&self.dev, OFF, OFF_MODULE, "lru_plan")?;
        let cfg = LaunchConfig {
            grid_dim: (self.kv_heads as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&f);
        b.arg(&args);
        // SAFETY: argument list matches `lru_plan`; one CTA per head, state sized above.
        unsafe { b.launch(cfg) }.map_err(e)?;
        let d_chunks = (self.head_dim / 8) as i32;
        let mut kva = KvArgs::contiguous(kv.store.k.dev, kv.store.v.dev, &self.kv_dims(kv));
        let table = self.side_table.as_ref().unwrap_or(kv.block_table);
        kva.page(&Paged { table, page: kv.block_size, t_k: kv.len, lens: None, offload: None }, &self.dev)?;
        // The epoch whose reads are applied, and where its kernels staged rows.
        (kva.res_stride, kva.epoch, kva.stage) = (self.max_tokens as i64, self.epoch, self.stage_args());
        let staged = self.stats.device_ptr(&stream).0 + 5 * 8;
        let bk = half_ptr(&self.bank_k, &self.dev)?;
        let bv = match &self.bank_v {
            Some(t) => half_ptr(t, &self.dev)?,
            None => 0,
        };
        let f = func(&self.dev, OFF, OFF_MODULE, "offload_fill")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&kva).arg(&bk).arg(&bv).arg(&self.ins).arg(&self.ins_n).arg(&d_chunks).arg(&staged);
        // SAFETY: argument list matches `offload_fill`; the inserts name slots of the bank and
        // tokens this sequence's kernels read (below its length). The banks are private to
        // this cache.
        unsafe { b.launch(grid(self.kv_heads * self.slots_per_head * d_chunks as usize)) }.map_err(e)?;
        stream.memset_zeros(&mut self.list_n).map_err(e)?;
        if let Some(done) = &self.side_done {
            done.record(&stream).map_err(e)?;
            self.side_pending.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.epoch += 1;
        Ok(())
    }

    /// Applies one update for the access list `accessed` (duplicates are dropped), as if the
    /// kernels had recorded exactly these reads since the last update, copying inserted rows
    /// from `kv`'s store. For tests of the device policy against
    /// [`TokenCache`](crate::offload::TokenCache) and for tools.
    ///
    /// # Errors
    /// An entry out of range; more distinct entries than the access list holds; as
    /// [`OffloadedKv::dims`] for `kv`.
    pub fn update_with(&mut self, kv: &OffloadedKv<'_>, accessed: &[(u32, u32)]) -> Result<()> {
        self.check(kv)?;
        let mut idx: Vec<u32> = Vec::with_capacity(accessed.len());
        for &(h, t) in accessed {
            if h as usize >= self.kv_heads || t as usize >= kv.len {
                return Err(Error::arg(
                    "accessed",
                    format!("(head {h}, token {t})"),
                    format!("out of range: {} KV heads, {} tokens", self.kv_heads, kv.len),
                ));
            }
            idx.push(h * self.max_tokens as u32 + t);
        }
        idx.sort_unstable();
        idx.dedup();
        if idx.len() > self.list.len() {
            return Err(Error::arg(
                "accessed",
                idx.len(),
                format!("more than the {} entries of a list", self.list.len()),
            ));
        }
        self.ready()?;
        let stream = self.dev.cuda_stream();
        if !idx.is_empty() {
            let mut head = self.list.slice_mut(..idx.len());
            stream.memcpy_htod(&idx, &mut head).map_err(cuda_err)?;
        }
        stream.memcpy_htod(&[idx.len() as u32], &mut self.list_n).map_err(cuda_err)?;
        self.update(kv)
    }

    fn kv_dims(&self, kv: &OffloadedKv<'_>) -> AttnDims {
        let s = kv.store;
        AttnDims {
            batch: 1,
            t_q: 1,
            t_k: kv.len,
            heads_q: s.heads_kv,
            heads_kv: s.heads_kv,
            head_dim: s.head_dim,
        }
    }

    fn check(&self, kv: &OffloadedKv<'_>) -> Result<()> {
        let s = kv.store;
        if s.heads_kv != self.kv_heads || s.head_dim != self.head_dim || s.dtype != self.bank_k.dtype() {
            return Err(Error::arg(
                "offload cache",
                format!("{} heads × {} {:?}", self.kv_heads, self.head_dim, self.bank_k.dtype()),
                format!("does not match the store's {} heads × {} {:?}", s.heads_kv, s.head_dim, s.dtype),
            ));
        }
        if kv.len > self.max_tokens {
            return Err(Error::arg(
                "len",
                kv.len,
                format!(
                    "the offload cache covers {} tokens (build it with a larger max_tokens)",
                    self.max_tokens
                ),
            ));
        }
        Ok(())
    }
}

/// The two GPU caches of one layer of one offloaded sequence.
#[derive(Debug)]
pub struct LayerCaches {
    /// Keys read by mask estimation.
    pub mask: GpuCache,
    /// Keys and values read by block-sparse attention.
    pub sparse: GpuCache,
    /// Whether a prefill chunk stages ([`Offload::stages`]).
    cfg: Offload,
    /// Bytes prefill chunks staged so far.
    staged: u64,
}

impl LayerCaches {
    /// The caches `cfg` sizes ([`Offload::slots_per_head`]) for sequences of up to
    /// `max_tokens` tokens.
    ///
    /// # Errors
    /// As [`GpuCache::new`]; an invalid `cfg`.
    pub fn new(
        device: &Device,
        cfg: &Offload,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        max_tokens: usize,
    ) -> Result<Self> {
        cfg.validate()?;
        let make = |kind| {
            GpuCache::new(
                device,
                kind,
                kv_heads,
                head_dim,
                dtype,
                max_tokens,
                cfg.slots_per_head(kind, max_tokens),
            )?
            .with_miss_staging(cfg.miss_stage_rows(kind, kv_heads, max_tokens))
        };
        Ok(LayerCaches {
            mask: make(CacheKind::Mask)?,
            sparse: make(CacheKind::SparseAttn)?,
            cfg: cfg.clone(),
            staged: 0,
        })
    }

    /// Bytes of K/V that prefill chunks copied from the host store to the GPU before attending
    /// ([`Offload::prefill_stage_bytes`]).
    pub fn staged_bytes(&self) -> u64 {
        self.staged
    }

    /// Device bytes of both caches.
    pub fn gpu_bytes(&self) -> u64 {
        self.mask.gpu_bytes() + self.sparse.gpu_bytes()
    }

    fn check(&self, kv: &OffloadedKv<'_>) -> Result<()> {
        self.mask.check(kv)?;
        self.sparse.check(kv)
    }
}

/// One HiP decode step over an offloaded sequence (see [`GpuCache`]): the mask is
/// re-estimated every `cfg.refresh_interval` steps through the mask cache, block-sparse
/// attention reads through the sparse-attention cache, misses come from the host store, and
/// after a refresh both caches apply their LRU update on the device.
///
/// # Errors
/// As [`OffloadedKv::dims`]; caches built for other heads, head dims, dtypes or fewer tokens;
/// as [`super::hip_attn_decode_paged_cuda`].
pub fn hip_attn_decode_offload_cuda(
    q: &Tensor,
    kv: &OffloadedKv<'_>,
    caches: &mut LayerCaches,
    cfg: &HipConfig,
    scale: f32,
    cache: &mut MaskCache,
) -> Result<Tensor> {
    let dims = kv.dims(q)?;
    crate::layout::check_scale(scale)?;
    caches.check(kv)?;
    let before = cache.refreshes();
    // Read at every step: wait for the update queued after the last refresh (long done: the
    // other layers ran in between).
    caches.sparse.ready()?;
    let sres = caches.sparse.residency(kv.store, true);
    let (mbank, sk, sv) = (&caches.mask.bank_k, &caches.sparse.bank_k, caches.sparse.bank_v.as_ref());
    let sv = sv.expect("a sparse-attention cache holds values");
    let out = cache.step_device(
        &dims,
        cfg,
        || {
            // The mask cache is read again only now: wait for its last update (and only now
            // touch its buffers, which would make the main stream wait for the side stream).
            caches.mask.ready()?;
            let mres = caches.mask.residency(kv.store, true);
            mask_search(q, mbank, &dims, Some(kv.paged(mres)), cfg, scale)
        },
        |mask, extra| {
            check_mask_fits(mask, &dims)?;
            span_attn(q, sk, sv, &dims, Keys::Mask(mask, extra), Some(kv.paged(sres)), scale)
        },
    )?;
    if cache.refreshes() != before {
        caches.mask.update(kv)?;
        caches.sparse.update(kv)?;
    }
    Ok(out)
}

/// HiP attention of a prefill chunk over an offloaded sequence (mask, then block-sparse
/// attention, with the prefill tail of `cfg`).
///
/// When the sequence's rows of this layer (K and V, rounded up to whole blocks) take at most
/// [`Offload::prefill_stage_bytes`], they are first copied to the GPU in one coalesced pass
/// ([`HostKvStore::read_span`]) and the chunk attends there like a resident cache: a chunk's
/// search and attention read keys all over the context, many of them several times, which over
/// the bus costs far more than one copy. A longer sequence is attended in place: resident rows
/// come from the caches' banks, the rest from the host store. Either way the outputs are the
/// resident path's, and prefill reads are not recorded (they would flood the caches with
/// one-off reads).
///
/// # Errors
/// As [`hip_attn_decode_offload_cuda`].
pub fn hip_attn_offload_cuda(
    q: &Tensor,
    kv: &OffloadedKv<'_>,
    caches: &mut LayerCaches,
    cfg: &HipConfig,
    scale: f32,
) -> Result<Tensor> {
    let dims = kv.dims(q)?;
    crate::layout::check_scale(scale)?;
    caches.check(kv)?;
    let blocks = kv.len.div_ceil(kv.block_size);
    let rows = blocks * kv.block_size;
    let bytes = (rows * dims.heads_kv * dims.head_dim * 2 * 2) as u64;
    if caches.cfg.stages(bytes) {
        let (k, v) = kv.store.read_span(kv.block_table, kv.block_size, 0, rows)?;
        caches.staged += bytes;
        let table = Tensor::arange(0u32, blocks as u32, q.device())?;
        let view =
            super::CudaPagedKv { k: &k, v: &v, block_table: &table, block_size: kv.block_size, len: kv.len };
        return super::hip_attn_paged_cuda(q, &view, cfg, scale);
    }
    caches.mask.ready()?;
    caches.sparse.ready()?;
    let (mres, sres) = (caches.mask.residency(kv.store, false), caches.sparse.residency(kv.store, false));
    let (mbank, sk) = (&caches.mask.bank_k, &caches.sparse.bank_k);
    let sv = caches.sparse.bank_v.as_ref().expect("a sparse-attention cache holds values");
    crate::mask_cache::with_prefill_tail(q, dims.t_q, cfg, |q, cut, cfg| {
        let kv = OffloadedKv { len: kv.len - cut, ..*kv };
        let dims = kv.dims(q)?;
        let mask = mask_search(q, mbank, &dims, Some(kv.paged(mres)), cfg, scale)?;
        check_mask_fits(&mask, &dims)?;
        span_attn(q, sk, sv, &dims, Keys::Mask(&mask, 0), Some(kv.paged(sres)), scale)
    })
}

/// Dense causal attention over an offloaded sequence, every row read from the host store (for
/// dense layers and as the baseline of the offload benchmarks).
///
/// # Errors
/// As [`OffloadedKv::dims`]; unsupported dtypes or head dims.
pub fn dense_attn_offload_cuda(q: &Tensor, kv: &OffloadedKv<'_>, scale: f32) -> Result<Tensor> {
    let dims = kv.dims(q)?;
    crate::layout::check_scale(scale)?;
    let r = Residency {
        host_k: kv.store.k.dev,
        host_v: kv.store.v.dev,
        has_values: true,
        table: 0,
        seen: 0,
        list: 0,
        list_n: 0,
        stride: 0,
        epoch: 0,
        list_cap: 0,
        stage: StageArgs::default(),
    };
    // No page table: every row comes from the host store; the tensors given as the bank are
    // never read (q stands in for them).
    span_attn(q, q, q, &dims, Keys::Dense, Some(kv.paged(r)), scale)
}
