//! [`Offload`]: the sizes of the GPU caches and the host budget of KV-cache offloading, and the
//! memory they take.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The largest cache size [`Offload::validate`] accepts, in tokens per KV head (2^24).
const MAX_CACHE_TOKENS: usize = 1 << 24;

/// Which of a layer's two GPU caches.
///
/// Each layer has a cache of **keys** for mask estimation (the tree search reads keys only) and a
/// cache of **keys and values** for the block-sparse attention over the selected blocks
/// (hip-algorithm.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CacheKind {
    /// Keys read by mask estimation.
    Mask,
    /// Keys and values read by block-sparse attention.
    SparseAttn,
}

impl CacheKind {
    /// Bytes one entry (one token of one KV head) takes in a bank of this kind: `head_dim`
    /// elements for [`CacheKind::Mask`], twice that (K and V) for [`CacheKind::SparseAttn`].
    ///
    /// ```
    /// use hip_kernels::offload::CacheKind;
    /// assert_eq!(CacheKind::Mask.entry_bytes(128, 2), 256);
    /// assert_eq!(CacheKind::SparseAttn.entry_bytes(128, 2), 512);
    /// ```
    pub fn entry_bytes(self, head_dim: usize, elem_bytes: usize) -> u64 {
        let one = (head_dim as u64).saturating_mul(elem_bytes as u64);
        match self {
            CacheKind::Mask => one,
            CacheKind::SparseAttn => one.saturating_mul(2),
        }
    }
}

/// The shape of a model's KV cache, as far as offloading sizes it.
///
/// ```
/// use hip_kernels::offload::KvShape;
/// // Llama-3.1-8B with a bf16 cache.
/// let shape = KvShape::new(32, 8, 128, 2);
/// assert_eq!(shape.token_bytes(), 2 * 32 * 8 * 128 * 2); // K and V of every layer
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvShape {
    /// Transformer layers (each has its own pair of caches).
    pub num_layers: usize,
    /// KV heads per layer.
    pub num_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Bytes of one element of the cache (2 for f16/bf16, 4 for f32, 1 for FP8).
    pub elem_bytes: usize,
}

impl KvShape {
    /// A shape from its four numbers.
    pub fn new(num_layers: usize, num_kv_heads: usize, head_dim: usize, elem_bytes: usize) -> Self {
        KvShape { num_layers, num_kv_heads, head_dim, elem_bytes }
    }

    /// Bytes of one token's K and V in every layer: what the host store holds per token.
    pub fn token_bytes(&self) -> u64 {
        product(&[
            self.num_layers as u64,
            self.num_kv_heads as u64,
            self.head_dim as u64,
            self.elem_bytes as u64,
            2,
        ])
    }
}

/// The GPU memory the offload caches of every layer take, by part. Returned by
/// [`Offload::gpu_footprint`]; every figure is in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GpuFootprint {
    /// The mask-estimation key banks.
    pub mask_cache: u64,
    /// The sparse-attention K/V banks.
    pub sa_cache: u64,
    /// The int32 page tables, two per layer.
    pub page_tables: u64,
    /// The staging areas of missed rows, two per layer ([`Offload::miss_stage_tokens`]).
    pub miss_staging: u64,
    /// The transient buffer a prefill chunk stages one layer's K/V in
    /// ([`Offload::prefill_stage_bytes`]; freed after each layer, reused by the next).
    pub prefill_stage: u64,
}

impl GpuFootprint {
    /// The sum of the parts (saturating).
    pub fn total(&self) -> u64 {
        self.mask_cache
            .saturating_add(self.sa_cache)
            .saturating_add(self.page_tables)
            .saturating_add(self.miss_staging)
            .saturating_add(self.prefill_stage)
    }
}

/// Configuration of KV-cache offloading: how many tokens the two GPU caches of each layer hold
/// per KV head, and how much host memory the full KV store may take.
///
/// Under offloading the full KV cache lives in a host store and each layer keeps two GPU caches
/// (see the [module documentation](super)): `mask_cache_tokens` keys per KV head for mask
/// estimation and `gpu_cache_tokens` K/V rows per KV head for block-sparse attention. Accesses
/// that miss are read from the host store, so the sizes trade GPU memory for PCIe traffic, never
/// for correctness.
///
/// # Defaults
///
/// | field | default | why |
/// |---|---|---|
/// | `gpu_cache_tokens` | 8192 | InfiniteHiP's documented SA cache sizes are 5000 (1×L40S, Llama-3.1-8B, 2M context), 8000 (TP=2 A100-40GB) and 32768 (R1-Distill-Qwen-32B, TP=4). One decode step of [`HipConfig::paper`](crate::HipConfig::paper) reads `k + sink + window` = 784 tokens per head; 8192 (the A100 figure rounded to a power of two) holds about ten steps' worth, which the temporal locality of HiP's masks turns into high hit ratios (InfiniteHiP reports 88.6–99.8% SA hits with its stage caches on, 51–59% without) |
/// | `mask_cache_tokens` | 65536 | the documented mask cache sizes are 64000 (L40S), 128000 (A100 TP=2) and 131072 (32B TP=4). The tree search touches ≈ `(k/b_sk)·log T` keys per head per refresh (§3; roughly 5,000–10,000 at 1M tokens with the paper config), and a decode step refreshes the mask only every `refresh_interval` steps, so 65536 (the L40S figure rounded up) holds several refreshes' worth |
/// | `prefill_stage_bytes` | 2 GiB | a prefill chunk's mask search and attention read keys all over the context, each many times and uncached (prefill reads would flood the LRU caches), so reading them over the bus made offloaded prefill 5–6× slower than resident (H200, Qwen2.5-1.5B shapes). Copying the sequence's rows of one layer into a GPU buffer first (one coalesced pass over the bus) and attending there costs `tokens × row bytes` of PCIe traffic per layer and chunk instead. 2 GiB stages 512k tokens of a Llama-3.1-8B layer (2M of Qwen2.5-1.5B); longer sequences are read in place. 0 never stages |
/// | `miss_stage_tokens` | 16384 | a decode kernel that reads a missed row over the bus also leaves it in a GPU staging area, from which the cache update after a refresh copies the rows it inserts instead of reading them from the host a second time: the bus is what an offloaded refresh step waits for, and the inserts are most of the misses. Each cache stages up to `min(miss_stage_tokens, slots_per_head / 2)` rows per KV head (hash-placed, so a few collide and are read again): a refresh's inserts per head are a fraction of the bank. At the defaults 48 MiB per Llama-3.1-8B layer (32 MiB of keys, 16 MiB of K/V). 0 never stages |
/// | `resident_layers` | 0 | every HiP layer offloaded: the smallest GPU footprint. Raise it to spend spare GPU memory on speed, or to hold a context whose full KV exceeds host memory (a 1M-token Llama-3.1-8B-shaped context needs 116 GiB of host memory with every HiP layer offloaded) |
/// | `host_budget_bytes` | 0 = unlimited | the host store is ordinary (pinned under CUDA) host memory whose limit depends on the machine and what else runs on it, so no fixed number is right; the paper's RTX 4090 runs capped CPU KV at 32 GB. Set it to refuse a context before the machine swaps |
///
/// At the defaults, Llama-3.1-8B (32 layers, 8 KV heads, head dim 128) with a bf16 cache takes
/// 4 GiB of mask-cache banks and 1 GiB of SA-cache banks, plus 2 KiB of page tables per token
/// of context (2 GiB at 1M tokens; trap 13 of hip-algorithm.md: the tables are O(T)), against
/// 128 GiB for the full KV cache at 1M tokens; prefill chunks borrow up to 2 GiB more for
/// staging one layer at a time.
///
/// ```
/// use hip_kernels::offload::{KvShape, Offload};
/// let cfg = Offload::default().with_gpu_cache_tokens(5000).with_mask_cache_tokens(64000);
/// cfg.validate()?;
/// // Llama-3.1-8B with an FP8 KV cache and a 2M-token context, as in the paper's L40S setup.
/// let shape = KvShape::new(32, 8, 128, 1);
/// let f = cfg.gpu_footprint(&shape, 2 << 20);
/// assert_eq!(f.mask_cache, 32 * 8 * 64000 * 128); // 1.95 GiB of keys
/// assert_eq!(f.sa_cache, 32 * 8 * 5000 * 128 * 2); // 0.31 GiB of keys and values
/// assert_eq!(f.page_tables, 4 << 30); // O(T): 4 GiB of int32 tables at 2M tokens
/// assert_eq!(cfg.check_fits(&shape, 2 << 20, 40 << 30)?, f.total()); // fits in 40 GiB
/// assert!(cfg.check_fits(&shape, 2 << 20, 4 << 30).is_err()); // not in 4 GiB
/// assert!(Offload::default().with_gpu_cache_tokens(0).validate().is_err());
/// # Ok::<(), hip_kernels::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Offload {
    /// Tokens per KV head in each layer's sparse-attention (K and V) GPU cache.
    pub gpu_cache_tokens: usize,
    /// Tokens per KV head in each layer's mask-estimation (K only) GPU cache.
    pub mask_cache_tokens: usize,
    /// Most bytes the host KV store may take; 0 means unlimited.
    pub host_budget_bytes: u64,
    /// Most bytes of one layer's K/V a prefill chunk copies to the GPU before attending (a
    /// transient buffer, reused layer after layer); a longer sequence is attended in place over
    /// the bus. 0 never stages.
    pub prefill_stage_bytes: u64,
    /// HiP layers that keep their K/V on the GPU like the dense layers do: the first
    /// `resident_layers` of them (in layer order); the others are offloaded. Spare GPU memory
    /// buys decode speed this way (a resident layer reads nothing over the bus), and a context
    /// whose full KV exceeds host memory can still be held. 0 (the default) offloads every HiP
    /// layer; see [`offloaded_layers`](Offload::offloaded_layers).
    pub resident_layers: usize,
    /// Rows per KV head each GPU cache can stage, at most: a decode kernel leaves the rows it
    /// read over the bus there, and the cache update copies its inserts from there instead of
    /// from the host store ([`miss_stage_rows`](Offload::miss_stage_rows)). 0 never stages.
    pub miss_stage_tokens: usize,
}

impl Default for Offload {
    fn default() -> Self {
        Offload {
            gpu_cache_tokens: 8192,
            mask_cache_tokens: 65536,
            host_budget_bytes: 0,
            prefill_stage_bytes: 2 << 30,
            resident_layers: 0,
            miss_stage_tokens: 16384,
        }
    }
}

impl Offload {
    /// Sets the sparse-attention cache size (tokens per KV head per layer).
    pub fn with_gpu_cache_tokens(mut self, tokens: usize) -> Self {
        self.gpu_cache_tokens = tokens;
        self
    }
    /// Sets the mask-estimation cache size (tokens per KV head per layer).
    pub fn with_mask_cache_tokens(mut self, tokens: usize) -> Self {
        self.mask_cache_tokens = tokens;
        self
    }
    /// Sets the host budget in bytes (0: unlimited).
    pub fn with_host_budget_bytes(mut self, bytes: u64) -> Self {
        self.host_budget_bytes = bytes;
        self
    }
    /// Sets the prefill staging budget in bytes (0: never stage).
    pub fn with_prefill_stage_bytes(mut self, bytes: u64) -> Self {
        self.prefill_stage_bytes = bytes;
        self
    }

    /// Sets the most rows per KV head a cache stages (0: never stage).
    pub fn with_miss_stage_tokens(mut self, tokens: usize) -> Self {
        self.miss_stage_tokens = tokens;
        self
    }

    /// Sets how many HiP layers (the first ones) stay on the GPU.
    pub fn with_resident_layers(mut self, layers: usize) -> Self {
        self.resident_layers = layers;
        self
    }

    /// Which layers to offload, given which layers run HiP (`hip_layers[l]`): the HiP layers
    /// after the first [`resident_layers`](Offload::resident_layers) of them.
    ///
    /// ```
    /// use hip_kernels::offload::Offload;
    /// let hip = [false, false, true, true, true, true];
    /// assert_eq!(Offload::default().offloaded_layers(&hip), hip);
    /// let two = Offload::default().with_resident_layers(2).offloaded_layers(&hip);
    /// assert_eq!(two, [false, false, false, false, true, true]);
    /// ```
    pub fn offloaded_layers(&self, hip_layers: &[bool]) -> Vec<bool> {
        let mut kept = 0;
        hip_layers
            .iter()
            .map(|&h| {
                if h && kept < self.resident_layers {
                    kept += 1;
                    false
                } else {
                    h
                }
            })
            .collect()
    }

    /// Whether a prefill chunk over a sequence whose layer K/V takes `layer_bytes` stages it.
    pub fn stages(&self, layer_bytes: u64) -> bool {
        layer_bytes <= self.prefill_stage_bytes
    }

    /// Tokens per KV head of the cache of `kind`.
    pub fn cache_tokens(&self, kind: CacheKind) -> usize {
        match kind {
            CacheKind::Mask => self.mask_cache_tokens,
            CacheKind::SparseAttn => self.gpu_cache_tokens,
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first offending field: a cache size of 0 or above
    /// 2^24 tokens per KV head.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in
            [("gpu_cache_tokens", self.gpu_cache_tokens), ("mask_cache_tokens", self.mask_cache_tokens)]
        {
            if v == 0 {
                return Err(Error::config(name, v, "must be at least 1"));
            }
            if v > MAX_CACHE_TOKENS {
                return Err(Error::config(name, v, format!("must be at most {MAX_CACHE_TOKENS}")));
            }
        }
        Ok(())
    }

    /// Slots per KV head of the cache of `kind` for a context of at most `max_tokens` tokens: the
    /// configured size, but never more than `max_tokens` (a bank never needs more slots than the
    /// sequence has tokens).
    pub fn slots_per_head(&self, kind: CacheKind, max_tokens: usize) -> usize {
        self.cache_tokens(kind).min(max_tokens)
    }

    /// Rows of the staging area of one cache of `kind` with `kv_heads` heads for contexts of at
    /// most `max_tokens` tokens: `min(miss_stage_tokens, slots_per_head / 2) × kv_heads`
    /// rounded up to a power of two (rows are placed by a hash), or 0 (no staging).
    ///
    /// ```
    /// use hip_kernels::offload::{CacheKind, Offload};
    /// let d = Offload::default(); // 16384 rows, mask cache 65536 slots, SA cache 8192
    /// assert_eq!(d.miss_stage_rows(CacheKind::Mask, 8, 1 << 20), 16384 * 8);
    /// assert_eq!(d.miss_stage_rows(CacheKind::SparseAttn, 8, 1 << 20), 4096 * 8);
    /// assert_eq!(d.miss_stage_rows(CacheKind::SparseAttn, 3, 1 << 20), 16384); // 12288 rounded up
    /// assert_eq!(d.with_miss_stage_tokens(0).miss_stage_rows(CacheKind::Mask, 8, 1 << 20), 0);
    /// ```
    pub fn miss_stage_rows(&self, kind: CacheKind, kv_heads: usize, max_tokens: usize) -> usize {
        let per_head = self.miss_stage_tokens.min(self.slots_per_head(kind, max_tokens) / 2);
        if per_head == 0 || kv_heads == 0 {
            return 0;
        }
        per_head.saturating_mul(kv_heads).checked_next_power_of_two().unwrap_or(1 << 62)
    }

    /// The GPU memory of the caches of every layer for contexts up to `max_tokens`, by part:
    /// per layer, the mask bank holds `slots × num_kv_heads` keys, the SA bank as many keys and
    /// values, the two page tables `4 × num_kv_heads × max_tokens` bytes each, and the two
    /// staging areas [`miss_stage_rows`](Offload::miss_stage_rows) entries (plus an 8-byte tag)
    /// each; once, the
    /// prefill staging buffer (one layer's K/V for `max_tokens`, at most
    /// [`prefill_stage_bytes`](Offload::prefill_stage_bytes)). The LRU
    /// bookkeeping ([`TokenCache`](super::TokenCache)) lives in host memory and is not counted.
    pub fn gpu_footprint(&self, shape: &KvShape, max_tokens: usize) -> GpuFootprint {
        let (layers, heads) = (shape.num_layers as u64, shape.num_kv_heads as u64);
        let bank = |kind: CacheKind| {
            let slots = self.slots_per_head(kind, max_tokens) as u64;
            let entry = product(&[shape.head_dim as u64, shape.elem_bytes as u64, kind.entry_bytes(1, 1)]);
            product(&[layers, heads, slots, entry])
        };
        GpuFootprint {
            mask_cache: bank(CacheKind::Mask),
            sa_cache: bank(CacheKind::SparseAttn),
            page_tables: product(&[layers, 2, 4, heads, max_tokens as u64]),
            miss_staging: [CacheKind::Mask, CacheKind::SparseAttn]
                .into_iter()
                .map(|kind| {
                    let rows = self.miss_stage_rows(kind, shape.num_kv_heads, max_tokens) as u64;
                    let entry =
                        product(&[shape.head_dim as u64, shape.elem_bytes as u64, kind.entry_bytes(1, 1)]);
                    product(&[layers, rows, entry.saturating_add(8)])
                })
                .fold(0u64, u64::saturating_add),
            prefill_stage: self.prefill_stage_bytes.min(product(&[
                heads,
                max_tokens as u64,
                shape.head_dim as u64,
                shape.elem_bytes as u64,
                2,
            ])),
        }
    }

    /// Total bytes of [`Offload::gpu_footprint`].
    pub fn gpu_bytes(&self, shape: &KvShape, max_tokens: usize) -> u64 {
        self.gpu_footprint(shape, max_tokens).total()
    }

    /// Checks that the caches for contexts up to `max_tokens` fit in `free_gpu_bytes`, and
    /// returns the bytes they need.
    ///
    /// # Errors
    /// [`Error::GpuCachesTooLarge`] naming the need, the free bytes and the parts.
    pub fn check_fits(&self, shape: &KvShape, max_tokens: usize, free_gpu_bytes: u64) -> Result<u64> {
        let f = self.gpu_footprint(shape, max_tokens);
        let need = f.total();
        if need > free_gpu_bytes {
            return Err(Error::GpuCachesTooLarge {
                need,
                free: free_gpu_bytes,
                mask_cache: f.mask_cache,
                sa_cache: f.sa_cache,
                page_tables: f.page_tables,
                miss_staging: f.miss_staging,
                prefill_stage: f.prefill_stage,
            });
        }
        Ok(need)
    }

    /// Bytes the host store takes for `tokens` tokens: K and V of every layer and KV head.
    pub fn host_bytes(&self, tokens: usize, shape: &KvShape) -> u64 {
        product(&[tokens as u64, shape.token_bytes()])
    }

    /// Checks that a host store of `tokens` tokens stays within
    /// [`host_budget_bytes`](Offload::host_budget_bytes) (always true when it is 0), and returns
    /// the bytes it takes.
    ///
    /// # Errors
    /// [`Error::HostBudgetExceeded`] naming the tokens, the bytes needed and the budget.
    pub fn check_host(&self, tokens: usize, shape: &KvShape) -> Result<u64> {
        let need = self.host_bytes(tokens, shape);
        if self.host_budget_bytes != 0 && need > self.host_budget_bytes {
            return Err(Error::HostBudgetExceeded { tokens, need, budget: self.host_budget_bytes });
        }
        Ok(need)
    }
}

/// The product of `factors`, saturating at `u64::MAX`.
fn product(factors: &[u64]) -> u64 {
    factors.iter().fold(1u64, |p, &f| p.saturating_mul(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented() {
        let d = Offload::default();
        d.validate().unwrap();
        assert_eq!((d.gpu_cache_tokens, d.mask_cache_tokens, d.host_budget_bytes), (8192, 65536, 0));
        assert_eq!(d.prefill_stage_bytes, 2 << 30);
        assert_eq!((d.resident_layers, d.miss_stage_tokens), (0, 16384));
        assert!(d.stages(2 << 30) && !d.stages((2 << 30) + 1) && !d.with_prefill_stage_bytes(0).stages(1));
    }

    #[test]
    fn every_bad_field_is_named() {
        let d = Offload::default;
        for (cfg, field) in [
            (d().with_gpu_cache_tokens(0), "gpu_cache_tokens"),
            (d().with_gpu_cache_tokens(MAX_CACHE_TOKENS + 1), "gpu_cache_tokens"),
            (d().with_mask_cache_tokens(0), "mask_cache_tokens"),
            (d().with_mask_cache_tokens(usize::MAX), "mask_cache_tokens"),
        ] {
            match cfg.validate() {
                Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{cfg:?}: {other:?}"),
            }
        }
        d().with_mask_cache_tokens(MAX_CACHE_TOKENS).validate().unwrap();
    }

    #[test]
    fn gpu_bytes_by_hand() {
        let shape = KvShape::new(3, 2, 8, 2);
        let cfg = Offload::default().with_gpu_cache_tokens(10).with_mask_cache_tokens(40);
        // Context of 100 tokens: mask 40 slots, SA 10 slots per head.
        let f = cfg.gpu_footprint(&shape, 100);
        assert_eq!(f.mask_cache, 3 * 40 * 2 * 8 * 2);
        assert_eq!(f.sa_cache, 3 * 10 * 2 * 8 * 2 * 2);
        assert_eq!(f.page_tables, 3 * 2 * 4 * 2 * 100);
        assert_eq!(f.prefill_stage, 2 * 100 * 8 * 2 * 2); // one layer's K/V, under the budget
                                                          // Staging, per layer: mask min(16384, 40 / 2) × 2 heads = 40 → 64 rows of 16 B + tag,
                                                          // SA min(16384, 10 / 2) × 2 = 10 → 16 rows of 32 B + tag.
        assert_eq!(f.miss_staging, 3 * (64 * (16 + 8) + 16 * (32 + 8)));
        assert_eq!(cfg.clone().with_miss_stage_tokens(0).gpu_footprint(&shape, 100).miss_staging, 0);
        assert_eq!(
            cfg.gpu_bytes(&shape, 100),
            f.mask_cache + f.sa_cache + f.page_tables + f.miss_staging + f.prefill_stage
        );
        let capped = cfg.clone().with_prefill_stage_bytes(100).gpu_footprint(&shape, 100);
        assert_eq!(capped.prefill_stage, 100);
        // A context shorter than the caches: the banks shrink to it.
        let f = cfg.gpu_footprint(&shape, 20);
        assert_eq!(f.mask_cache, 3 * 20 * 2 * 8 * 2);
        assert_eq!(f.sa_cache, 3 * 10 * 2 * 8 * 2 * 2);
        // The defaults on Llama-3.1-8B bf16: 4 GiB + 1 GiB of banks, 2 GiB of tables at 1M tokens.
        let llama = KvShape::new(32, 8, 128, 2);
        let f = Offload::default().gpu_footprint(&llama, 1 << 20);
        assert_eq!((f.mask_cache, f.sa_cache, f.page_tables), (4 << 30, 1 << 30, 2 << 30));
        assert_eq!(f.prefill_stage, 2 << 30); // capped: a 1M-token layer is 4 GiB

        // Absurd sizes saturate instead of overflowing.
        let huge = KvShape::new(usize::MAX, usize::MAX, usize::MAX, 8);
        assert_eq!(Offload::default().gpu_bytes(&huge, usize::MAX), u64::MAX);
    }

    #[test]
    fn check_fits_names_the_sizes() {
        let shape = KvShape::new(2, 1, 4, 4);
        let cfg = Offload::default().with_gpu_cache_tokens(4).with_mask_cache_tokens(8);
        let need = cfg.gpu_bytes(&shape, 16);
        assert_eq!(cfg.check_fits(&shape, 16, need).unwrap(), need);
        match cfg.check_fits(&shape, 16, need - 1) {
            Err(e @ Error::GpuCachesTooLarge { .. }) => {
                let Error::GpuCachesTooLarge {
                    need: n,
                    free,
                    mask_cache,
                    sa_cache,
                    page_tables,
                    miss_staging,
                    prefill_stage,
                } = e
                else {
                    unreachable!()
                };
                assert_eq!((n, free), (need, need - 1));
                assert_eq!(mask_cache + sa_cache + page_tables + miss_staging + prefill_stage, need);
                let msg = e.to_string();
                assert!(msg.contains(&need.to_string()) && msg.contains("free"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn host_budget() {
        let shape = KvShape::new(2, 3, 4, 2);
        assert_eq!(shape.token_bytes(), 2 * 3 * 4 * 2 * 2);
        let cfg = Offload::default();
        assert_eq!(cfg.host_bytes(10, &shape), 10 * shape.token_bytes());
        assert_eq!(cfg.check_host(usize::MAX, &shape).unwrap(), u64::MAX); // unlimited
        let cfg = cfg.with_host_budget_bytes(10 * shape.token_bytes());
        assert_eq!(cfg.check_host(10, &shape).unwrap(), 10 * shape.token_bytes());
        let e = cfg.check_host(11, &shape).unwrap_err();
        assert!(
            matches!(e, Error::HostBudgetExceeded { tokens: 11, need, budget } if need == 11 * 96 && budget == 960),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("host budget exceeded"), "{e}");
    }
}
