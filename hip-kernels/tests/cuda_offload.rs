//! KV-cache offloading on CUDA (issue 6): the offloaded kernels (rows from GPU banks or, on a
//! miss, from pinned host memory over the bus) against the same kernels over a device-resident
//! paged cache, on random inputs at awkward sizes. The values read are the same bits either
//! way, so the outputs must be identical, whatever is resident. Needs a GPU (`make cuda`).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use hip_kernels::cuda::{
    dense_attn_offload_cuda, dense_attn_paged_cuda, hip_attn_decode_offload_cuda, hip_attn_decode_paged_cuda,
    hip_attn_offload_cuda, hip_attn_paged_cuda, CudaPagedKv, GpuCache, HostKvStore, LayerCaches, OffloadedKv,
};
use hip_kernels::offload::{CacheKind, Offload, TokenCache};
use hip_kernels::{Error, HipConfig, MaskCache};

fn gpu() -> Device {
    std::env::set_var("HIP_CUDA_POISON", "1");
    Device::new_cuda(0).expect("a CUDA device")
}

fn randn(shape: &[usize], seed: u64, dev: &Device) -> Tensor {
    let t = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    (t + seed as f64 * 1e-3).unwrap().to_dtype(DType::BF16).unwrap().to_device(dev).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (a, b) = (f(a), f(b));
    assert!(a.iter().all(|x| x.is_finite()), "non-finite output (unwritten element?)");
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A device pool and a host store holding the same rows, for a sequence of up to `t_max`
/// tokens in blocks of `bs` placed in reverse order after 2 unused blocks.
struct Twin {
    k: Tensor,
    v: Tensor,
    store: HostKvStore,
    table: Tensor,
    bs: usize,
}

impl Twin {
    fn new(t_max: usize, heads_kv: usize, d: usize, bs: usize, seed: u64, dev: &Device) -> Twin {
        let n = t_max.div_ceil(bs);
        let blocks = n + 2;
        let order: Vec<u32> = (0..n).map(|i| (blocks - 1 - i) as u32).collect();
        let rows = blocks * bs;
        let k = randn(&[rows, heads_kv, d], seed, dev);
        let v = randn(&[rows, heads_kv, d], seed + 1, dev);
        let mut store = HostKvStore::new(dev, rows, heads_kv, d, DType::BF16).unwrap();
        // Written through in two uneven pieces, like prefill chunks.
        let all: Vec<u32> = (0..rows as u32).collect();
        let cut = rows / 3 + 1;
        for (a, b) in [(0, cut), (cut, rows)] {
            let idx = Tensor::from_slice(&all[a..b], b - a, dev).unwrap();
            store.write_rows(&idx, &k.narrow(0, a, b - a).unwrap(), &v.narrow(0, a, b - a).unwrap()).unwrap();
        }
        let table = Tensor::from_slice(&order, n, dev).unwrap();
        Twin { k, v, store, table, bs }
    }
    fn paged(&self, len: usize) -> CudaPagedKv<'_> {
        CudaPagedKv { k: &self.k, v: &self.v, block_table: &self.table, block_size: self.bs, len }
    }
    fn offloaded(&self, len: usize) -> OffloadedKv<'_> {
        OffloadedKv { store: &self.store, block_table: &self.table, block_size: self.bs, len }
    }
}

#[test]
fn host_store_holds_what_was_written() {
    let dev = gpu();
    let tw = Twin::new(300, 2, 64, 16, 5, &dev);
    let cpu = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for row in [0, 1, 101, tw.store.rows() - 1] {
        let (k, v) = tw.store.read_row(row).unwrap();
        assert_eq!(k, cpu(&tw.k.get(row).unwrap()), "K row {row}");
        assert_eq!(v, cpu(&tw.v.get(row).unwrap()), "V row {row}");
    }
    assert!(tw.store.read_row(tw.store.rows()).is_err());
    // The decode write-through: positions 3..40 of the twin's sequence written through its
    // block table land in the rows the table names.
    let mut other = HostKvStore::new(&dev, tw.store.rows(), 2, 64, DType::BF16).unwrap();
    let (k, v) = (randn(&[37, 2, 64], 11, &dev), randn(&[37, 2, 64], 12, &dev));
    other.write_span(&tw.table, tw.bs, 3, &k, &v).unwrap();
    for (i, p) in [(0, 3), (12, 15), (36, 39)] {
        let (hk, hv) = other.read_row(tw.order_row(p)).unwrap();
        assert_eq!(hk, cpu(&k.get(i).unwrap()), "span K position {p}");
        assert_eq!(hv, cpu(&v.get(i).unwrap()), "span V position {p}");
    }
    assert!(other.write_span(&tw.table, tw.bs, tw.store.rows(), &k, &v).is_err(), "span past the table");
    // Staging reads the span back through the same table, bit for bit.
    let (sk, sv) = other.read_span(&tw.table, tw.bs, 3, 37).unwrap();
    assert_eq!((max_diff(&sk, &k), max_diff(&sv, &v)), (0.0, 0.0), "read_span = what write_span wrote");
    let (sk, _) = tw.store.read_span(&tw.table, tw.bs, 0, 0).unwrap();
    assert_eq!(sk.dims(), [0, 2, 64]);
    assert!(other.read_span(&tw.table, tw.bs, 1, tw.store.rows()).is_err(), "span past the table");
    // A table naming a block past the store reads zeros there instead of out of bounds.
    let past = Tensor::from_slice(&[0u32, (tw.store.rows() / tw.bs) as u32], 2, &dev).unwrap();
    let (sk, sv) = tw.store.read_span(&past, tw.bs, 0, 2 * tw.bs).unwrap();
    let tail = |t: &Tensor| t.narrow(0, tw.bs, tw.bs).unwrap().abs().unwrap().sum_all().unwrap();
    let zero = |t: &Tensor| tail(t).to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!((zero(&sk), zero(&sv)), (0.0, 0.0));
    assert_eq!(max_diff(&sk.narrow(0, 0, tw.bs).unwrap(), &tw.k.narrow(0, 0, tw.bs).unwrap()), 0.0);
    let bad = Tensor::from_slice(&[tw.store.rows() as u32], 1, &dev).unwrap();
    let row = tw.k.narrow(0, 0, 1).unwrap();
    let mut store = tw.store;
    assert!(matches!(store.write_rows(&bad, &row, &row), Err(Error::InvalidArgument { name: "rows", .. })));
    // With the rows on the host too: checked there; the device list must have as many.
    let past = [store.rows() as u32];
    assert!(matches!(
        store.write_rows_listed(&bad, &past, &row, &row),
        Err(Error::InvalidArgument { name: "rows", .. })
    ));
    assert!(store.write_rows_listed(&bad, &[0, 1], &row, &row).is_err(), "lengths differ");
    let one = Tensor::from_slice(&[5u32], 1, &dev).unwrap();
    store.write_rows_listed(&one, &[5], &row, &row).unwrap();
    assert_eq!(store.read_row(5).unwrap().0, cpu(&row.get(0).unwrap()));
}

#[test]
fn prefill_and_dense_match_the_resident_cache() {
    let dev = gpu();
    let cfg = HipConfig::paper().with_k(64).with_query_block(32, 2).with_sink_window(16, 32);
    for (t_q, t_k, bs, hkv, d) in
        [(1, 1000, 16, 2, 128), (7, 4099, 64, 2, 128), (97, 4099, 16, 4, 64), (300, 300, 32, 2, 128)]
    {
        let tw = Twin::new(t_k, hkv, d, bs, t_k as u64, &dev);
        let q = randn(&[1, t_q, 8, d], 9 + t_q as u64, &dev);
        let what = format!("t_q {t_q} t_k {t_k} block {bs} d {d}");
        let want = dense_attn_paged_cuda(&q, &tw.paged(t_k), 0.088).unwrap();
        let got = dense_attn_offload_cuda(&q, &tw.offloaded(t_k), 0.088).unwrap();
        assert_eq!(max_diff(&got, &want), 0.0, "{what}: dense");
        // Read in place over the bus (no staging budget), and staged on the GPU first.
        for stage in [0, 2 << 30] {
            let offload = Offload::default()
                .with_gpu_cache_tokens(256)
                .with_mask_cache_tokens(512)
                .with_prefill_stage_bytes(stage);
            let mut caches = LayerCaches::new(&dev, &offload, hkv, d, DType::BF16, t_k).unwrap();
            for cfg in [cfg.clone(), cfg.clone().with_prefill_tail(7, 1)] {
                let want = hip_attn_paged_cuda(&q, &tw.paged(t_k), &cfg, 0.088).unwrap();
                let got = hip_attn_offload_cuda(&q, &tw.offloaded(t_k), &mut caches, &cfg, 0.088).unwrap();
                assert_eq!(
                    max_diff(&got, &want),
                    0.0,
                    "{what}: hip, tail {}, stage {stage}",
                    cfg.tail_queries
                );
            }
            // Prefill reads are not recorded: nothing became resident.
            let st = caches.sparse.stats().unwrap();
            assert_eq!(st.hits + st.misses, 0, "{what}");
            let rows = t_k.div_ceil(bs) * bs;
            let staged = if stage == 0 { 0 } else { 2 * (rows * hkv * d * 2 * 2) as u64 };
            assert_eq!(caches.staged_bytes(), staged, "{what}: stage {stage}");
        }
    }
}

/// Decode steps, each appending a token, through the offload caches: the output equals the
/// resident-cache decode at every step, bit for bit, while the caches fill, hit and (with small
/// banks) evict; every resident bank row equals its host row, whether the updates copied it
/// from the host store or from the rows the kernels staged.
#[test]
fn offloaded_decode_matches_the_resident_cache() {
    let dev = gpu();
    let cfg = HipConfig::paper().with_k(128).with_sink_window(16, 64).with_refresh_interval(4);
    // Large banks (everything a step reads fits) and small ones (evictions every refresh).
    for (sa_slots, mask_slots, t0, d, stage) in [
        (4096, 8192, 4099, 128, 16384),
        (200, 300, 3001, 64, 16384),
        (4096, 8192, 4099, 128, 0),
        (200, 300, 3001, 64, 0),
    ] {
        let steps = 17;
        let t_max = t0 + steps;
        let tw = Twin::new(t_max, 2, d, 16, t0 as u64, &dev);
        let offload = Offload::default()
            .with_gpu_cache_tokens(sa_slots)
            .with_mask_cache_tokens(mask_slots)
            .with_miss_stage_tokens(stage);
        let mut caches = LayerCaches::new(&dev, &offload, 2, d, DType::BF16, t_max).unwrap();
        let (mut m_res, mut m_off) = (MaskCache::new(), MaskCache::new());
        for s in 0..steps {
            let len = t0 + s + 1;
            let q = randn(&[1, 1, 8, d], 1000 + s as u64, &dev);
            let want = hip_attn_decode_paged_cuda(&q, &tw.paged(len), &cfg, 0.088, &mut m_res).unwrap();
            let got =
                hip_attn_decode_offload_cuda(&q, &tw.offloaded(len), &mut caches, &cfg, 0.088, &mut m_off)
                    .unwrap();
            assert_eq!(max_diff(&got, &want), 0.0, "slots {sa_slots}: step {s}");
        }
        assert_eq!(m_off.refreshes(), m_res.refreshes());
        let (sa, mk) = (caches.sparse.stats().unwrap(), caches.mask.stats().unwrap());
        eprintln!("slots {sa_slots}/{mask_slots}, staging {stage}: SA {sa:?}; mask {mk:?}");
        assert!(sa.hits > 0 && sa.misses > 0 && sa.inserts > 0, "SA cache used: {sa:?}");
        assert!(mk.hits > 0 && mk.inserts > 0, "mask cache used: {mk:?}");
        for (st, entry) in [(sa, 4 * d as u64), (mk, 2 * d as u64)] {
            if stage == 0 {
                assert_eq!(st.staged, 0, "{st:?}");
            } else {
                // Most inserts were read by the step's kernels: staged, unless their place collided.
                assert!(st.staged > 0 && st.staged <= st.inserts, "{st:?}");
            }
            assert_eq!(st.bytes_moved, (st.misses + st.inserts - st.staged) * entry, "{st:?}");
        }
        if sa_slots < 1000 {
            assert!(sa.evictions > 0 && mk.evictions > 0, "small banks evict: {sa:?} {mk:?}");
        } else {
            assert_eq!(sa.evictions, 0, "large bank never evicts");
        }
        // Resident rows hold their host rows (checked after one more step applies the last update).
        let q = randn(&[1, 1, 8, d], 7, &dev);
        hip_attn_decode_offload_cuda(&q, &tw.offloaded(t_max), &mut caches, &cfg, 0.088, &mut m_off).unwrap();
        for (cache, kind) in [(&caches.sparse, CacheKind::SparseAttn), (&caches.mask, CacheKind::Mask)] {
            let checked = check_banks(cache, &tw, d);
            assert!(checked > 0, "{kind:?}: no resident slot checked");
        }
        // A sequence longer than the caches cover is refused.
        let big = Twin::new(t_max + 64, 2, d, 16, 1, &dev);
        let err =
            hip_attn_decode_offload_cuda(&q, &big.offloaded(t_max + 1), &mut caches, &cfg, 0.088, &mut m_off);
        assert!(matches!(err, Err(Error::InvalidArgument { name: "len", .. })), "{err:?}");
    }
}

/// Checks that every resident slot (a sample of them) holds its host row and that the table
/// points back at it; returns how many were checked.
fn check_banks(cache: &GpuCache, tw: &Twin, d: usize) -> usize {
    let owners = cache.owners().unwrap();
    let table = cache.table().unwrap();
    let (bk, bv) = cache.banks().unwrap();
    let sph = cache.slots_per_head();
    let mut checked = 0;
    for slot in (0..owners.len()).step_by(owners.len() / 37 + 1) {
        let t = owners[slot];
        if t < 0 {
            continue;
        }
        let h = slot / sph;
        assert_eq!(table[h * cache.max_tokens() + t as usize], slot as i32, "slot {slot} not in the table");
        let (hk, hv) = tw.store.read_row(tw.order_row(t as usize)).unwrap();
        let head = |x: &[f32]| x[h * d..(h + 1) * d].to_vec();
        let bank = |x: &Tensor| x.get(slot).unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(bank(bk), head(&hk), "slot {slot} K");
        if let Some(bv) = bv {
            assert_eq!(bank(bv), head(&hv), "slot {slot} V");
        }
        checked += 1;
    }
    checked
}

/// The device LRU against the host policy (`TokenCache`, the reference) on random distinct
/// access lists with temporal locality: identical page tables and counters after every update,
/// and bank rows equal to their host rows. Sizes force free-slot fills, evictions with ties of
/// the last-access tick, and updates with more misses than a head can take.
#[test]
fn device_lru_matches_the_host_policy() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let dev = gpu();
    for (heads, slots, len, seed) in [(1, 7, 97, 1u64), (2, 97, 1000, 2), (3, 1024, 4099, 3), (2, 1, 40, 4)] {
        let d = 64;
        let tw = Twin::new(len, heads, d, 16, seed, &dev);
        let kv = tw.offloaded(len);
        let mut gpu_cache =
            GpuCache::new(&dev, CacheKind::SparseAttn, heads, d, DType::BF16, len, slots).unwrap();
        let mut host = TokenCache::new(heads, len, slots).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut center = len / 2;
        for step in 0..40 {
            // Around a drifting center, up to three banks' worth of entries per update.
            center = (center + rng.random_range(0..=slots.min(50))) % len;
            let n = rng.random_range(0..=3 * slots * heads);
            let mut acc: Vec<(u32, u32)> = (0..n)
                .map(|_| {
                    let spread = (2 * slots + 8).min(len);
                    let t = (center + rng.random_range(0..spread)) % len;
                    (rng.random_range(0..heads) as u32, t as u32)
                })
                .collect();
            acc.sort_unstable();
            acc.dedup();
            host.update(&acc).unwrap();
            gpu_cache.update_with(&kv, &acc).unwrap();
            let what = format!("heads {heads} slots {slots} len {len} step {step}");
            assert_eq!(gpu_cache.table().unwrap(), host.table(), "{what}: page tables");
            let (g, h) = (gpu_cache.stats().unwrap(), host.stats());
            assert_eq!(
                (g.hits, g.misses, g.inserts, g.evictions),
                (h.hits, h.misses, h.inserts, h.evictions),
                "{what}"
            );
        }
        assert!(host.stats().evictions > 0, "heads {heads} slots {slots}: the sizes must force evictions");
        assert!(check_banks(&gpu_cache, &tw, d) > 0);
    }
}

impl Twin {
    /// The store row of token `t`.
    fn order_row(&self, t: usize) -> usize {
        let table = self.table.to_vec1::<u32>().unwrap();
        table[t / self.bs] as usize * self.bs + t % self.bs
    }
}

#[test]
fn mismatched_caches_are_refused() {
    let dev = gpu();
    let tw = Twin::new(500, 2, 128, 16, 3, &dev);
    let mut caches = LayerCaches::new(&dev, &Offload::default(), 4, 128, DType::BF16, 500).unwrap();
    let q = randn(&[1, 1, 8, 128], 1, &dev);
    let cfg = HipConfig::paper().with_k(64);
    let err =
        hip_attn_decode_offload_cuda(&q, &tw.offloaded(500), &mut caches, &cfg, 0.1, &mut MaskCache::new());
    assert!(matches!(err, Err(Error::InvalidArgument { .. })), "{err:?}");
    assert!(matches!(
        HostKvStore::new(&Device::Cpu, 16, 2, 128, DType::BF16),
        Err(Error::UnsupportedDevice { .. })
    ));
    assert!(matches!(HostKvStore::new(&dev, 16, 2, 80, DType::BF16), Err(Error::InvalidArgument { .. })));
    assert!(matches!(HostKvStore::new(&dev, 16, 2, 128, DType::F32), Err(Error::DType { .. })));
    // Far more pinned memory than any host has: a typed refusal, not an abort.
    let err = HostKvStore::new(&dev, 1 << 40, 8, 128, DType::BF16);
    assert!(
        matches!(err, Err(Error::PinnedAllocRefused { .. }) | Err(Error::InvalidArgument { .. })),
        "{err:?}"
    );
}
