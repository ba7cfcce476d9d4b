//! [`PagedKvCache`], its [`SeqId`]s and the read-only [`LayerView`].

use std::collections::BTreeMap;
use std::fmt;

use candle_core::{DType, Device, Tensor};

use super::block_pool::BlockPool;
use super::config::KvCacheConfig;
use super::store::{pools, Pool};
use crate::{Error, Result};

/// Identifies a sequence of a [`PagedKvCache`]. Ids are handed out by
/// [`PagedKvCache::add_sequence`] and [`PagedKvCache::fork`] in increasing order and never reused
/// by the same cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The K and V storage of one layer, `num_blocks * block_size * row_len` floats each.
struct LayerStore {
    k: Pool,
    v: Pool,
}

/// What the cache knows about one sequence.
#[derive(Debug, Clone)]
struct SeqState {
    /// Block `i` holds the sequence's tokens `[i * block_size, (i + 1) * block_size)`.
    table: Vec<u32>,
    /// Committed tokens.
    len: usize,
    /// End of the writable range `[len, reserved)` set up by `reserve`; `len <= reserved <=
    /// table.len() * block_size`.
    reserved: usize,
    /// Device caches: `table` as a u32 tensor on the device, uploaded by the first
    /// [`write_tensor`](PagedKvCache::write_tensor) after the table changed and shared by every
    /// layer's [`device_layer`](PagedKvCache::device_layer) view until it changes again.
    dev_table: Option<Tensor>,
}

/// A paged KV cache: a pool of fixed-size blocks shared by any number of sequences through
/// per-sequence block tables, with reference-counted blocks, `fork` and copy-on-write.
///
/// See the [module documentation](super) for the layout and the write protocol.
///
/// # Memory
///
/// [`new`](Self::new) allocates the whole pool up front,
/// [`KvCacheConfig::total_bytes`] bytes of zeroed `f32`s (zeroed allocations are normally backed
/// lazily by the OS, so untouched blocks cost address space rather than resident memory).
pub struct PagedKvCache {
    cfg: KvCacheConfig,
    /// `num_kv_heads * head_dim`.
    row_len: usize,
    /// `block_size * row_len`: floats of one block in one layer's K (or V).
    block_floats: usize,
    /// Host storage (empty when the cache lives on a device).
    layers: Vec<LayerStore>,
    /// Device storage: per layer K and V, `[num_blocks * block_size, num_kv_heads, head_dim]`
    /// (a one-row placeholder for an offloaded layer).
    device: Option<Vec<(Tensor, Tensor)>>,
    /// Offloaded layers (KV-cache offloading): the layer's K/V in pinned host memory instead of
    /// `device`, laid out the same way.
    #[cfg(feature = "cuda")]
    host: Vec<Option<hip_kernels::cuda::HostKvStore>>,
    /// The rows [`pending_rows`](Self::pending_rows) named last, on the host (checked there) and
    /// as a u32 tensor on the device (for writes through to offloaded layers' stores, and fused
    /// writes), with the id of the index tensor it returned (writes with another index fall back
    /// to reading it).
    #[cfg(feature = "cuda")]
    pending: Option<(candle_core::TensorId, Vec<u32>, Tensor)>,
    /// Bytes of one K or V element: 4 on the host (f32), the dtype's size on a device.
    elem_bytes: usize,
    pool: BlockPool,
    seqs: BTreeMap<u64, SeqState>,
    next_id: u64,
}

impl fmt::Debug for PagedKvCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagedKvCache")
            .field("cfg", &self.cfg)
            .field("sequences", &self.seqs.len())
            .field("free_blocks", &self.pool.free_count())
            .finish_non_exhaustive()
    }
}

impl PagedKvCache {
    /// A cache with every block free, its storage allocated (see [Memory](#memory)).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when `cfg` fails [`KvCacheConfig::validate`].
    pub fn new(cfg: KvCacheConfig) -> Result<Self> {
        Self::with_store(cfg, None)
    }

    /// A host cache whose pool lives in a memory-mapped temporary file created (and at once
    /// unlinked) in `dir`, instead of in allocated memory: the OS pages blocks in when attention
    /// reads them and may write them back and drop them under memory pressure, so the cache can
    /// be larger than RAM (HiP reads only a few thousand keys per step). The file is sparse and
    /// disappears when the cache is dropped, also after a crash. Same behaviour as
    /// [`new`](Self::new) otherwise.
    ///
    /// # Errors
    /// As [`new`](Self::new); [`Error::InvalidArgument`] naming `dir` when the file cannot be
    /// created, sized or mapped (a missing folder, no space for the file's size on a filesystem
    /// without sparse files, a 32-bit address space).
    pub fn new_file_backed(cfg: KvCacheConfig, dir: impl AsRef<std::path::Path>) -> Result<Self> {
        Self::with_store(cfg, Some(dir.as_ref()))
    }

    fn with_store(cfg: KvCacheConfig, dir: Option<&std::path::Path>) -> Result<Self> {
        cfg.validate()?;
        let row_len = cfg.row_len();
        let block_floats = cfg.block_size * row_len;
        let layer_floats = cfg.num_blocks * block_floats;
        let mut all = pools(2 * cfg.num_layers, layer_floats, dir)?.into_iter();
        let layers = (0..cfg.num_layers)
            .map(|_| LayerStore {
                k: all.next().expect("2 pools a layer"),
                v: all.next().expect("2 pools a layer"),
            })
            .collect();
        let pool = BlockPool::new(cfg.num_blocks);
        Ok(PagedKvCache {
            cfg,
            row_len,
            block_floats,
            layers,
            device: None,
            #[cfg(feature = "cuda")]
            host: Vec::new(),
            #[cfg(feature = "cuda")]
            pending: None,
            elem_bytes: 4,
            pool,
            seqs: BTreeMap::new(),
            next_id: 0,
        })
    }

    /// A cache whose blocks live on `device` as `dtype` tensors (one K and one V tensor of
    /// `[num_blocks * block_size, num_kv_heads, head_dim]` per layer) instead of host memory.
    /// Written with [`write_tensor`](Self::write_tensor) and read with
    /// [`device_layer`](Self::device_layer); the block tables, fork and copy-on-write work as for
    /// the host cache.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid `cfg`; candle errors when the device memory
    /// cannot be allocated.
    pub fn new_on_device(cfg: KvCacheConfig, device: &Device, dtype: DType) -> Result<Self> {
        cfg.validate()?;
        // A decode loop synchronizes every step: keep the freed step memory in the pool.
        #[cfg(feature = "cuda")]
        hip_kernels::cuda::keep_pool_memory(device)?;
        let row_len = cfg.row_len();
        let block_floats = cfg.block_size * row_len;
        let rows = cfg.num_blocks * cfg.block_size;
        let layers = (0..cfg.num_layers)
            .map(|_| {
                let shape = (rows, cfg.num_kv_heads, cfg.head_dim);
                Ok((Tensor::zeros(shape, dtype, device)?, Tensor::zeros(shape, dtype, device)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let pool = BlockPool::new(cfg.num_blocks);
        Ok(PagedKvCache {
            cfg,
            row_len,
            block_floats,
            layers: Vec::new(),
            device: Some(layers),
            #[cfg(feature = "cuda")]
            host: Vec::new(),
            #[cfg(feature = "cuda")]
            pending: None,
            elem_bytes: dtype.size_in_bytes(),
            pool,
            seqs: BTreeMap::new(),
            next_id: 0,
        })
    }

    /// [`new_on_device`](Self::new_on_device), except that the layers with `offloaded[layer]`
    /// keep their blocks in pinned, device-mapped host memory
    /// ([`HostKvStore`](hip_kernels::cuda::HostKvStore)): the GPU then holds only the resident
    /// layers' blocks, and attention reads offloaded layers through small GPU caches
    /// ([`AttentionState::set_offload`](crate::attention::AttentionState::set_offload)). Writes go
    /// through to host memory; forks copy blocks on write as for device layers.
    ///
    /// # Errors
    /// As [`new_on_device`](Self::new_on_device); `offloaded` not one flag per layer;
    /// [`hip_kernels::Error::PinnedAllocRefused`] (as [`Error::Kernel`]) when the host memory
    /// cannot be pinned.
    #[cfg(feature = "cuda")]
    pub fn new_on_device_offloaded(
        cfg: KvCacheConfig,
        device: &Device,
        dtype: DType,
        offloaded: &[bool],
    ) -> Result<Self> {
        cfg.validate()?;
        hip_kernels::cuda::keep_pool_memory(device)?;
        if offloaded.len() != cfg.num_layers {
            return Err(Error::arg(
                "offloaded",
                format!("{} flags", offloaded.len()),
                format!("one per layer ({})", cfg.num_layers),
            ));
        }
        let rows = cfg.num_blocks * cfg.block_size;
        let mut device_layers = Vec::with_capacity(cfg.num_layers);
        let mut host = Vec::with_capacity(cfg.num_layers);
        for &off in offloaded {
            let n = if off { 1 } else { rows };
            let shape = (n, cfg.num_kv_heads, cfg.head_dim);
            device_layers.push((Tensor::zeros(shape, dtype, device)?, Tensor::zeros(shape, dtype, device)?));
            host.push(if off {
                Some(hip_kernels::cuda::HostKvStore::new(
                    device,
                    rows,
                    cfg.num_kv_heads,
                    cfg.head_dim,
                    dtype,
                )?)
            } else {
                None
            });
        }
        let row_len = cfg.row_len();
        let pool = BlockPool::new(cfg.num_blocks);
        Ok(PagedKvCache {
            block_floats: cfg.block_size * row_len,
            row_len,
            layers: Vec::new(),
            device: Some(device_layers),
            host,
            pending: None,
            elem_bytes: dtype.size_in_bytes(),
            pool,
            seqs: BTreeMap::new(),
            next_id: 0,
            cfg,
        })
    }

    /// The host store of `layer` when it is offloaded ([`new_on_device_offloaded`](Self::new_on_device_offloaded)).
    #[cfg(feature = "cuda")]
    pub fn host_store(&self, layer: usize) -> Option<&hip_kernels::cuda::HostKvStore> {
        self.host.get(layer).and_then(Option::as_ref)
    }

    /// Pinned host bytes of the offloaded layers (0 without offloading).
    pub fn host_bytes(&self) -> u64 {
        #[cfg(feature = "cuda")]
        {
            self.host.iter().flatten().map(|h| h.bytes()).sum()
        }
        #[cfg(not(feature = "cuda"))]
        {
            0
        }
    }

    /// Whether the blocks live on a device ([`new_on_device`](Self::new_on_device)).
    pub fn is_on_device(&self) -> bool {
        self.device.is_some()
    }

    /// The element type of a device cache's blocks (`None` for a host cache).
    pub fn device_dtype(&self) -> Option<DType> {
        self.device.as_ref().and_then(|d| d.first()).map(|(k, _)| k.dtype())
    }

    /// The configuration the cache was built with.
    pub fn config(&self) -> &KvCacheConfig {
        &self.cfg
    }

    /// Starts an empty sequence (no blocks yet).
    pub fn add_sequence(&mut self) -> SeqId {
        self.insert(SeqState { table: Vec::new(), len: 0, reserved: 0, dev_table: None })
    }

    fn insert(&mut self, state: SeqState) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        self.seqs.insert(id, state);
        SeqId(id)
    }

    fn state(&self, seq: SeqId) -> Result<&SeqState> {
        self.seqs.get(&seq.0).ok_or(Error::UnknownSequence(seq.0))
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.cfg.num_layers {
            return Err(Error::arg(
                "layer",
                layer,
                format!("the KV cache has {} layers", self.cfg.num_layers),
            ));
        }
        Ok(())
    }

    /// Removes a sequence, dropping one reference of each of its blocks (blocks no other
    /// sequence holds return to the free list).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSequence`].
    pub fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        let state = self.seqs.remove(&seq.0).ok_or(Error::UnknownSequence(seq.0))?;
        for block in state.table {
            self.pool.release(block);
        }
        Ok(())
    }

    /// Whether `seq` is a sequence of this cache.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq.0)
    }

    /// The sequences, in increasing id order.
    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.keys().map(|&id| SeqId(id))
    }

    /// Number of sequences.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Committed tokens of `seq`.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSequence`].
    pub fn len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.state(seq)?.len)
    }

    /// End of the range `[len, reserved)` that [`write`](Self::write) and
    /// [`commit`](Self::commit) may cover; equal to [`len`](Self::len) when nothing is reserved.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSequence`].
    pub fn reserved(&self, seq: SeqId) -> Result<usize> {
        Ok(self.state(seq)?.reserved)
    }

    /// The block table of `seq`: block `i` holds its tokens `[i * block_size, (i + 1) *
    /// block_size)`. It may extend past the committed tokens over reserved ones.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSequence`].
    pub fn block_table(&self, seq: SeqId) -> Result<&[u32]> {
        Ok(&self.state(seq)?.table)
    }

    /// Makes room for `n_new` tokens at positions `[len, len + n_new)`: allocates the blocks the
    /// table lacks and copies-on-write every block of that range which another sequence shares
    /// (in practice the partial last block after a [`fork`](Self::fork) or a
    /// [`truncate`](Self::truncate)). Afterwards every layer may be [`write`](Self::write)n for
    /// up to `n_new` tokens and the tokens [`commit`](Self::commit)ted. A reservation never
    /// shrinks: reserving less than an earlier, still pending reservation keeps the larger one.
    /// `n_new == 0` does nothing.
    ///
    /// All or nothing: on error nothing changes.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSequence`]; [`Error::ContextOverflow`] when `len + n_new` exceeds what the
    /// whole pool can hold ([`KvCacheConfig::max_tokens`]); [`Error::KvCacheFull`] when fewer
    /// blocks are free than needed.
    pub fn reserve(&mut self, seq: SeqId, n_new: usize) -> Result<()> {
        let bs = self.cfg.block_size;
        let limit = self.cfg.max_tokens();
        let st = self.seqs.get(&seq.0).ok_or(Error::UnknownSequence(seq.0))?;
        if n_new == 0 {
            return Ok(());
        }
        let end = st.len.checked_add(n_new).ok_or(Error::ContextOverflow { tokens: usize::MAX, limit })?;
        if end > limit {
            return Err(Error::ContextOverflow { tokens: end, limit });
        }
        let blocks_needed = end.div_ceil(bs);
        let new_blocks = blocks_needed.saturating_sub(st.table.len());
        let written = st.len / bs..blocks_needed.min(st.table.len());
        let cow: Vec<usize> = written.filter(|&i| self.pool.refcount(st.table[i]) > 1).collect();
        let needed = new_blocks + cow.len();
        let free = self.pool.free_count();
        if needed > free {
            return Err(Error::KvCacheFull { needed, free });
        }

        #[cfg(feature = "cuda")]
        let PagedKvCache { seqs, pool, layers, device, block_floats, host, .. } = self;
        #[cfg(not(feature = "cuda"))]
        let PagedKvCache { seqs, pool, layers, device, block_floats, .. } = self;
        let st = seqs.get_mut(&seq.0).expect("looked up above");
        if new_blocks + cow.len() > 0 {
            st.dev_table = None;
        }
        for i in cow {
            let old = st.table[i];
            let new = pool.allocate().expect("free blocks counted above");
            let (src, dst) = (old as usize * *block_floats, new as usize * *block_floats);
            for layer in layers.iter_mut() {
                layer.k.copy_within(src..src + *block_floats, dst);
                layer.v.copy_within(src..src + *block_floats, dst);
            }
            if let Some(dev) = device.as_ref() {
                let (src, dst) = (old as usize * bs, new as usize * bs);
                for (layer, (k, v)) in dev.iter().enumerate() {
                    #[cfg(not(feature = "cuda"))]
                    let _ = layer;
                    #[cfg(feature = "cuda")]
                    if let Some(store) = host.get_mut(layer).and_then(Option::as_mut) {
                        store.copy_rows(src, dst, bs)?;
                        continue;
                    }
                    k.slice_set(&k.narrow(0, src, bs)?.copy()?, 0, dst)?;
                    v.slice_set(&v.narrow(0, src, bs)?.copy()?, 0, dst)?;
                }
            }
            pool.release(old);
            st.table[i] = new;
        }
        for _ in 0..new_blocks {
            st.table.push(pool.allocate().expect("free blocks counted above"));
        }
        st.reserved = st.reserved.max(end);
        Ok(())
    }

    /// Writes `n = k.len() / (num_kv_heads * head_dim)` tokens of `layer` at positions
    /// `[len, len + n)` of `seq`. `k` and `v` are token-major `[n, num_kv_heads, head_dim]`.
    /// The positions must have been [`reserve`](Self::reserve)d; writing the same layer again
    /// before [`commit`](Self::commit) overwrites. Empty slices do nothing.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSequence`]; [`Error::InvalidArgument`] when `layer` is out of range, the
    /// slices differ in length or are not whole rows, or the tokens exceed the reservation.
    pub fn write(&mut self, seq: SeqId, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        if self.device.is_some() {
            let shape = (k.len() / self.row_len.max(1), self.cfg.num_kv_heads, self.cfg.head_dim);
            let kt = Tensor::from_slice(k, shape, &Device::Cpu)?;
            let vt = Tensor::from_slice(v, shape, &Device::Cpu)?;
            return self.write_tensor(seq, layer, &kt, &vt);
        }
        let st = self.seqs.get(&seq.0).ok_or(Error::UnknownSequence(seq.0))?;
        self.check_layer(layer)?;
        let row = self.row_len;
        if v.len() != k.len() {
            return Err(Error::arg("v.len()", v.len(), format!("must equal k.len() = {}", k.len())));
        }
        if k.len() % row != 0 {
            return Err(Error::arg(
                "k.len()",
                k.len(),
                format!("not a multiple of num_kv_heads * head_dim = {row}"),
            ));
        }
        let n = k.len() / row;
        if n > st.reserved - st.len {
            return Err(Error::arg(
                "k.len()",
                k.len(),
                format!(
                    "{n} tokens at position {} exceed the reservation ending at {}; call reserve first",
                    st.len, st.reserved
                ),
            ));
        }
        let bs = self.cfg.block_size;
        let store = &mut self.layers[layer];
        let (mut pos, mut done) = (st.len, 0);
        while done < n {
            let run = (bs - pos % bs).min(n - done);
            let dst = (st.table[pos / bs] as usize * bs + pos % bs) * row;
            let (src, cnt) = (done * row, run * row);
            store.k[dst..dst + cnt].copy_from_slice(&k[src..src + cnt]);
            store.v[dst..dst + cnt].copy_from_slice(&v[src..src + cnt]);
            pos += run;
            done += run;
        }
        Ok(())
    }

    /// [`write`](Self::write) for tensors `k`, `v: [n, num_kv_heads, head_dim]` (any float dtype,
    /// any device): on a device cache the rows are copied on the device, converted to the
    /// cache's dtype; on a host cache they are read back as f32.
    ///
    /// # Errors
    /// As [`write`](Self::write); candle errors for mismatched shapes.
    pub fn write_tensor(&mut self, seq: SeqId, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let Some(dev) = self.device.as_ref() else {
            let kc = k.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let vc = v.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            return self.write(seq, layer, &kc, &vc);
        };
        self.check_layer(layer)?;
        let st = self.seqs.get_mut(&seq.0).ok_or(Error::UnknownSequence(seq.0))?;
        let want = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let (n, h, d) = k.dims3()?;
        if (h, d) != want || v.dims() != k.dims() {
            return Err(Error::arg(
                "k/v",
                format!("{:?} / {:?}", k.dims(), v.dims()),
                format!("must both be [n, {}, {}]", want.0, want.1),
            ));
        }
        if n > st.reserved - st.len {
            return Err(Error::arg(
                "k",
                format!("{n} tokens"),
                format!("exceed the reservation ending at {} (position {})", st.reserved, st.len),
            ));
        }
        let (ks, vs) = &dev[layer];
        if st.dev_table.is_none() {
            st.dev_table = Some(Tensor::from_slice(&st.table, st.table.len(), ks.device())?);
        }
        let (k, v) = (
            k.to_device(ks.device())?.to_dtype(ks.dtype())?,
            v.to_device(ks.device())?.to_dtype(ks.dtype())?,
        );
        let bs = self.cfg.block_size;
        #[cfg(feature = "cuda")]
        if let Some(store) = self.host.get_mut(layer).and_then(Option::as_mut) {
            let table = st.dev_table.as_ref().expect("uploaded above");
            store.write_span(table, bs, st.len, &k, &v)?;
            return Ok(());
        }
        let (mut pos, mut done) = (st.len, 0);
        while done < n {
            let run = (bs - pos % bs).min(n - done);
            let dst = st.table[pos / bs] as usize * bs + pos % bs;
            ks.slice_set(&k.narrow(0, done, run)?.contiguous()?, 0, dst)?;
            vs.slice_set(&v.narrow(0, done, run)?.contiguous()?, 0, dst)?;
            pos += run;
            done += run;
        }
        Ok(())
    }

    /// The pool rows of the next tokens of several sequences, for [`write_rows`](Self::write_rows):
    /// `pending` lists `(seq, n)`, the `n` reserved positions after each sequence's length, in the
    /// order the rows of `k` and `v` will come. Returns a u32 tensor `[N, num_kv_heads, head_dim]`
    /// on the cache's device holding each token's pool row repeated over its heads and dims (the
    /// index layout `Tensor::scatter_set` takes): the same for every layer of a step, so a batch
    /// of sequences is written with one scatter per layer for K and one for V instead of copies
    /// per sequence. Also uploads the block tables attention reads (as
    /// [`write_tensor`](Self::write_tensor) does).
    ///
    /// # Errors
    /// [`Error::UnknownSequence`]; [`Error::InvalidArgument`] on a host cache, for a sequence
    /// listed twice, or `n` past the reservation.
    pub fn pending_rows(&mut self, pending: &[(SeqId, usize)]) -> Result<Tensor> {
        let Some(device) = self.device.as_ref().and_then(|d| d.first()).map(|(k, _)| k.device().clone())
        else {
            return Err(Error::arg("cache", "host", "pending_rows needs a cache made by new_on_device"));
        };
        let bs = self.cfg.block_size;
        let mut rows: Vec<u32> = Vec::new();
        for (i, &(seq, n)) in pending.iter().enumerate() {
            if pending[..i].iter().any(|(s, _)| *s == seq) {
                return Err(Error::arg("pending", seq.0, "a sequence is listed twice"));
            }
            let st = self.seqs.get(&seq.0).ok_or(Error::UnknownSequence(seq.0))?;
            if n > st.reserved - st.len {
                return Err(Error::arg(
                    "n",
                    format!("{n} tokens of sequence {}", seq.0),
                    format!("exceed the reservation ending at {} (position {})", st.reserved, st.len),
                ));
            }
        }
        for &(seq, n) in pending {
            let st = self.seqs.get_mut(&seq.0).expect("checked above");
            for pos in st.len..st.len + n {
                let row = st.table[pos / bs] as usize * bs + pos % bs;
                rows.push(u32::try_from(row).map_err(|_| Error::arg("row", row, "past u32"))?);
            }
            if st.dev_table.is_none() {
                st.dev_table = Some(Tensor::from_slice(&st.table, st.table.len(), &device)?);
            }
        }
        let (h, d) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let per = h * d;
        let idx: Vec<u32> = rows.iter().flat_map(|&r| std::iter::repeat_n(r, per)).collect();
        let idx = Tensor::from_vec(idx, (rows.len(), h, d), &device)?;
        #[cfg(feature = "cuda")]
        {
            let dev_rows = Tensor::from_slice(&rows, rows.len(), &device)?;
            self.pending = Some((idx.id(), rows, dev_rows));
        }
        Ok(idx)
    }

    /// Writes `layer`'s K and V rows of the tokens [`pending_rows`](Self::pending_rows) named:
    /// `k`, `v: [N, num_kv_heads, head_dim]` (any float dtype, converted to the cache's), one
    /// scatter each. Device caches only.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] on a host cache, for a layer out of range or shapes that differ
    /// from `rows`; candle errors.
    pub fn write_rows(&mut self, layer: usize, rows: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        self.check_layer(layer)?;
        let Some(dev) = self.device.as_ref() else {
            return Err(Error::arg("cache", "host", "write_rows needs a cache made by new_on_device"));
        };
        if k.dims() != rows.dims() || v.dims() != rows.dims() {
            return Err(Error::arg(
                "k/v",
                format!("{:?} / {:?}", k.dims(), v.dims()),
                format!("must both match the rows {:?}", rows.dims()),
            ));
        }
        let (ks, vs) = &dev[layer];
        let k = k.to_device(ks.device())?.to_dtype(ks.dtype())?.contiguous()?;
        let v = v.to_device(vs.device())?.to_dtype(vs.dtype())?.contiguous()?;
        #[cfg(feature = "cuda")]
        if let Some(store) = self.host.get_mut(layer).and_then(Option::as_mut) {
            let n = rows.dim(0)?;
            match &self.pending {
                // The rows of the last pending_rows, checked on the host: nothing read back.
                Some((id, host, dev)) if *id == rows.id() => store.write_rows_listed(dev, host, &k, &v)?,
                _ => {
                    // One pool row per token: the first element of each token's index block.
                    let rows = rows.narrow(1, 0, 1)?.narrow(2, 0, 1)?.reshape(n)?.contiguous()?;
                    store.write_rows(&rows, &k, &v)?;
                }
            }
            return Ok(());
        }
        ks.scatter_set(rows, &k, 0)?;
        vs.scatter_set(rows, &v, 0)?;
        Ok(())
    }

    /// The device blocks of `layer` and the first `len` tokens' block table, for attention on a
    /// device cache.
    ///
    /// # Errors
    /// [`Error::UnknownSequence`]; [`Error::InvalidArgument`] on a host cache, for a layer out of
    /// range or `len` past the reservation.
    pub fn device_layer(&self, seq: SeqId, layer: usize, len: usize) -> Result<DeviceLayerView<'_>> {
        let st = self.state(seq)?;
        self.check_layer(layer)?;
        let Some(dev) = self.device.as_ref() else {
            return Err(Error::arg("cache", "host", "device_layer needs a cache made by new_on_device"));
        };
        if len > st.reserved {
            return Err(Error::arg("len", len, format!("the sequence has {} reserved tokens", st.reserved)));
        }
        let (k, v) = &dev[layer];
        let needed = len.div_ceil(self.cfg.block_size);
        Ok(DeviceLayerView {
            #[cfg(feature = "cuda")]
            host: self.host_store(layer),
            k,
            v,
            block_table: &st.table[..needed],
            device_table: st.dev_table.as_ref(),
            block_size: self.cfg.block_size,
            len,
        })
    }

    /// The key and value blocks of `layer` when they are on the device and not offloaded
    /// (`None` for a host cache or an offloaded layer).
    pub fn device_pools(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        #[cfg(feature = "cuda")]
        if self.host_store(layer).is_some() {
            return None;
        }
        self.device.as_ref().and_then(|d| d.get(layer)).map(|(k, v)| (k, v))
    }

    /// For writing K/V rows with a fused kernel (`hip_kernels::cuda::qkv_rope_write_cuda`):
    /// `layer`'s key and value pools and the u32 pool row `[n]` of each token that `rows` (what
    /// [`pending_rows`](Self::pending_rows) returned last) names. `None` for a host cache, an
    /// offloaded layer (its writes go through [`write_rows`](Self::write_rows)) or other rows.
    #[cfg(feature = "cuda")]
    pub fn pending_write_target(&self, layer: usize, rows: &Tensor) -> Option<(&Tensor, &Tensor, &Tensor)> {
        let (k, v) = self.device_pools(layer)?;
        match &self.pending {
            Some((id, _, dev_rows)) if *id == rows.id() => Some((k, v, dev_rows)),
            _ => None,
        }
    }

    /// The block tables and lengths of a decode batch on the device, for attending all of its
    /// sequences in one launch per layer: a u32 `[batch, width]` table (row `b`: sequence `b`'s
    /// blocks covering `seqs[b].1` tokens, padded with block 0, which the kernels do not read)
    /// and the u32 lengths `[batch]`. Built once per step: the tables are the same for every
    /// layer.
    ///
    /// # Errors
    /// A host cache, an unknown sequence, or a length of 0 or past the sequence's reservation.
    pub fn device_batch_tables(&self, seqs: &[(SeqId, usize)]) -> Result<(Tensor, Tensor)> {
        let Some(device) = self.device.as_ref().and_then(|d| d.first()).map(|(k, _)| k.device().clone())
        else {
            return Err(Error::arg(
                "cache",
                "host",
                "device_batch_tables needs a cache made by new_on_device",
            ));
        };
        let bs = self.cfg.block_size;
        let mut rows = Vec::with_capacity(seqs.len());
        for &(seq, len) in seqs {
            let st = self.state(seq)?;
            if len == 0 || len > st.reserved {
                return Err(Error::arg(
                    "len",
                    format!("{len} tokens of sequence {}", seq.0),
                    format!("must be 1..={} (the reservation)", st.reserved),
                ));
            }
            let len32 = u32::try_from(len).map_err(|_| Error::arg("len", len, "past u32"))?;
            rows.push((&st.table[..len.div_ceil(bs)], len32));
        }
        let width = rows.iter().map(|(blocks, _)| blocks.len()).max().unwrap_or(1);
        let mut table = vec![0u32; seqs.len() * width];
        for (row, (blocks, _)) in table.chunks_mut(width).zip(&rows) {
            row[..blocks.len()].copy_from_slice(blocks);
        }
        let lens: Vec<u32> = rows.iter().map(|&(_, l)| l).collect();
        Ok((
            Tensor::from_vec(table, (seqs.len(), width), &device)?,
            Tensor::from_vec(lens, seqs.len(), &device)?,
        ))
    }

    /// The first `len` tokens of `layer` as token-major f32 rows `(k, v)`, each
    /// `[len, num_kv_heads, head_dim]` flattened — from either kind of cache.
    ///
    /// # Errors
    /// As [`layer_view`](Self::layer_view) / [`device_layer`](Self::device_layer).
    pub fn gather_layer(&self, seq: SeqId, layer: usize, len: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        if self.device.is_none() {
            return Ok(self.layer_view(seq, layer, len)?.gather());
        }
        let view = self.device_layer(seq, layer, len)?;
        let bs = view.block_size;
        let rows: Vec<u32> =
            (0..len).map(|j| view.block_table[j / bs] * bs as u32 + (j % bs) as u32).collect();
        #[cfg(feature = "cuda")]
        if let Some(store) = view.host {
            let rows: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
            return Ok(store.read_rows(&rows)?);
        }
        let idx = Tensor::from_vec(rows, len, view.k.device())?;
        let get = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.index_select(&idx, 0)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        Ok((get(view.k)?, get(view.v)?))
    }

    /// Advances the committed length of `seq` by `n` reserved tokens, which the caller has
    /// [`write`](Self::write)n for every layer (the cache cannot check that).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSequence`]; [`Error::InvalidArgument`] when `n` exceeds the reservation.
    pub fn commit(&mut self, seq: SeqId, n: usize) -> Result<()> {
        let st = self.seqs.get_mut(&seq.0).ok_or(Error::UnknownSequence(seq.0))?;
        if n > st.reserved - st.len {
            return Err(Error::arg(
                "n",
                n,
                format!("only {} tokens are reserved past position {}", st.reserved - st.len, st.len),
            ));
        }
        st.len += n;
        Ok(())
    }

    /// A read-only view of the first `len` tokens of `layer` of `seq`. `len` may exceed the
    /// committed length over reserved (and written) tokens, not beyond the reservation.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSequence`]; [`Error::InvalidArgument`] when `layer` is out of range or
    /// `len` exceeds [`reserved`](Self::reserved).
    pub fn layer_view(&self, seq: SeqId, layer: usize, len: usize) -> Result<LayerView<'_>> {
        let st = self.state(seq)?;
        self.check_layer(layer)?;
        if self.device.is_some() {
            return Err(Error::arg("cache", "device", "layer_view reads host blocks: use device_layer"));
        }
        if len > st.reserved {
            return Err(Error::arg(
                "len",
                len,
                format!("the sequence has {} committed and {} reserved tokens", st.len, st.reserved),
            ));
        }
        let store = &self.layers[layer];
        Ok(LayerView {
            k: &store.k,
            v: &store.v,
            block_table: &st.table[..len.div_ceil(self.cfg.block_size)],
            len,
            block_size: self.cfg.block_size,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
        })
    }

    /// Shortens `seq` to its first `new_len` tokens, dropping the blocks no longer needed and
    /// cancelling any pending reservation (written but uncommitted tokens are discarded, even
    /// when `new_len` equals the current length).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSequence`]; [`Error::InvalidArgument`] when `new_len > len`.
    pub fn truncate(&mut self, seq: SeqId, new_len: usize) -> Result<()> {
        let st = self.seqs.get_mut(&seq.0).ok_or(Error::UnknownSequence(seq.0))?;
        if new_len > st.len {
            return Err(Error::arg("new_len", new_len, format!("the sequence has only {} tokens", st.len)));
        }
        let keep = new_len.div_ceil(self.cfg.block_size);
        if keep < st.table.len() {
            st.dev_table = None;
        }
        for block in st.table.drain(keep..) {
            self.pool.release(block);
        }
        st.len = new_len;
        st.reserved = new_len;
        Ok(())
    }

    /// A new sequence with the committed tokens of `seq`, sharing all blocks that hold them
    /// (the partial last one included); nothing is copied. Whichever sequence later writes into
    /// a shared block copies it first ([`reserve`](Self::reserve) does). Blocks of `seq` that
    /// hold only reserved tokens stay its own, and so does its reservation: the child starts
    /// with none.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSequence`]; [`Error::InvalidArgument`] in the unlikely case that a
    /// block's reference count would overflow `u32`.
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let st = self.state(seq)?;
        let table = st.table[..st.len.div_ceil(self.cfg.block_size)].to_vec();
        let len = st.len;
        if table.iter().any(|&b| self.pool.refcount(b) == u32::MAX) {
            return Err(Error::arg("seq", seq, "a block of the sequence is shared by too many sequences"));
        }
        for &block in &table {
            self.pool.retain(block);
        }
        Ok(self.insert(SeqState { table, len, reserved: len, dev_table: None }))
    }

    /// Bytes of one block (K and V of all layers):
    /// `2 * num_layers * block_size * num_kv_heads * head_dim * e`, with `e` = 4 (f32) on the host
    /// and the dtype's size on a device.
    pub fn block_bytes(&self) -> usize {
        self.cfg.block_bytes() / 4 * self.elem_bytes
    }

    /// Bytes of the blocks referenced by at least one sequence (each counted once).
    pub fn bytes_in_use(&self) -> usize {
        self.used_blocks() * self.block_bytes()
    }

    /// Bytes of the blocks in the table of `seq`; a block shared with other sequences counts
    /// for each of them.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownSequence`].
    pub fn seq_bytes(&self, seq: SeqId) -> Result<usize> {
        Ok(self.state(seq)?.table.len() * self.block_bytes())
    }

    /// Blocks no sequence references.
    pub fn free_blocks(&self) -> usize {
        self.pool.free_count()
    }

    /// Blocks referenced by at least one sequence.
    pub fn used_blocks(&self) -> usize {
        self.pool.total() - self.pool.free_count()
    }

    /// Blocks in the pool ([`KvCacheConfig::num_blocks`]).
    pub fn total_blocks(&self) -> usize {
        self.pool.total()
    }

    /// Checks the bookkeeping: every block's reference count equals the number of block tables
    /// holding it, the free list holds exactly the unreferenced blocks (each once), and every
    /// sequence has `len <= reserved` and exactly the `reserved.div_ceil(block_size)` blocks its
    /// reservation needs.
    #[cfg(test)]
    pub(super) fn check_invariants(&self) -> std::result::Result<(), String> {
        let total = self.pool.total();
        let mut counts = vec![0u64; total];
        let bs = self.cfg.block_size;
        for (id, st) in &self.seqs {
            if st.len > st.reserved || st.reserved > st.table.len() * bs {
                return Err(format!(
                    "seq {id}: len {} reserved {} table {}",
                    st.len,
                    st.reserved,
                    st.table.len()
                ));
            }
            if st.table.len() != st.reserved.div_ceil(bs) {
                return Err(format!(
                    "seq {id}: table of {} blocks for {} tokens",
                    st.table.len(),
                    st.reserved
                ));
            }
            for &b in &st.table {
                counts[b as usize] += 1;
            }
        }
        let mut is_free = vec![false; total];
        for &b in self.pool.free_list() {
            if std::mem::replace(&mut is_free[b as usize], true) {
                return Err(format!("block {b} is on the free list twice"));
            }
        }
        for b in 0..total {
            let rc = u64::from(self.pool.refcount(b as u32));
            if rc != counts[b] {
                return Err(format!("block {b}: refcount {rc}, held by {} tables", counts[b]));
            }
            if is_free[b] != (rc == 0) {
                return Err(format!("block {b}: refcount {rc}, on the free list: {}", is_free[b]));
            }
        }
        Ok(())
    }
}

/// A read-only view of the first `len` tokens of one layer of one sequence: the layer's whole K
/// and V storage plus the sequence's block table, for attention kernels that read the blocks in
/// place. Token `j`'s K row (all heads, `num_kv_heads * head_dim` floats, head-major) starts at
/// [`row_offset(j)`](Self::row_offset) in `k`, and likewise in `v`.
#[derive(Clone, Copy)]
pub struct LayerView<'a> {
    /// The layer's K storage, all blocks: `[num_blocks * block_size, num_kv_heads, head_dim]`.
    pub k: &'a [f32],
    /// The layer's V storage, laid out as `k`.
    pub v: &'a [f32],
    /// The blocks holding the viewed tokens: `len.div_ceil(block_size)` entries.
    pub block_table: &'a [u32],
    /// Tokens viewed.
    pub len: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// KV heads per token.
    pub num_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
}

impl fmt::Debug for LayerView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerView")
            .field("block_table", &self.block_table)
            .field("len", &self.len)
            .field("block_size", &self.block_size)
            .field("num_kv_heads", &self.num_kv_heads)
            .field("head_dim", &self.head_dim)
            .finish_non_exhaustive()
    }
}

impl<'a> From<LayerView<'a>> for hip_kernels::PagedKv<'a> {
    /// The view as the attention kernels' paged input (same storage, no copy).
    fn from(v: LayerView<'a>) -> Self {
        hip_kernels::PagedKv {
            k: v.k,
            v: v.v,
            block_table: v.block_table,
            block_size: v.block_size,
            heads_kv: v.num_kv_heads,
            head_dim: v.head_dim,
            len: v.len,
        }
    }
}

impl LayerView<'_> {
    /// Floats of one token's row: `num_kv_heads * head_dim`.
    pub fn row_len(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Offset in `k` / `v` of token `j`'s head-0 row:
    /// `(block_table[j / block_size] * block_size + j % block_size) * num_kv_heads * head_dim`.
    /// Head `h` of the token follows at `+ h * head_dim`.
    ///
    /// # Panics
    ///
    /// When `j / block_size` is beyond the block table (`j` well past `len`).
    pub fn row_offset(&self, j: usize) -> usize {
        (self.block_table[j / self.block_size] as usize * self.block_size + j % self.block_size)
            * self.row_len()
    }

    /// Token `j`'s K row, `[num_kv_heads, head_dim]`.
    ///
    /// # Panics
    ///
    /// As [`row_offset`](Self::row_offset).
    pub fn k_row(&self, j: usize) -> &[f32] {
        let o = self.row_offset(j);
        &self.k[o..o + self.row_len()]
    }

    /// Token `j`'s V row, `[num_kv_heads, head_dim]`.
    ///
    /// # Panics
    ///
    /// As [`row_offset`](Self::row_offset).
    pub fn v_row(&self, j: usize) -> &[f32] {
        let o = self.row_offset(j);
        &self.v[o..o + self.row_len()]
    }

    /// Copies the viewed tokens out as contiguous `[len, num_kv_heads, head_dim]` K and V.
    /// The slow, readable path: for tests and as a fallback for kernels without paging.
    pub fn gather(&self) -> (Vec<f32>, Vec<f32>) {
        let row = self.row_len();
        let mut k = Vec::with_capacity(self.len * row);
        let mut v = Vec::with_capacity(self.len * row);
        for j in 0..self.len {
            k.extend_from_slice(self.k_row(j));
            v.extend_from_slice(self.v_row(j));
        }
        (k, v)
    }
}

/// The device blocks of one layer and the block table of one sequence
/// ([`PagedKvCache::device_layer`]).
#[derive(Debug, Clone, Copy)]
pub struct DeviceLayerView<'a> {
    /// The layer's host store when it is offloaded (then `k` and `v` are placeholders).
    #[cfg(feature = "cuda")]
    pub host: Option<&'a hip_kernels::cuda::HostKvStore>,
    /// Key blocks `[num_blocks * block_size, num_kv_heads, head_dim]`.
    pub k: &'a Tensor,
    /// Value blocks, laid out like `k`.
    pub v: &'a Tensor,
    /// The blocks of the viewed tokens: `len.div_ceil(block_size)` entries.
    pub block_table: &'a [u32],
    /// The sequence's whole block table (at least `block_table`'s entries) as a u32 tensor on
    /// the device, when the cache has uploaded it since the table last changed (the first
    /// `write_tensor` of a step does); attention reuses it instead of uploading the table once
    /// per layer.
    pub device_table: Option<&'a Tensor>,
    /// Tokens per block.
    pub block_size: usize,
    /// Tokens viewed.
    pub len: usize,
}
