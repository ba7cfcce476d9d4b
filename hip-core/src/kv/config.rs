//! [`KvCacheConfig`]: the shape and capacity of a [`PagedKvCache`](super::PagedKvCache).

use crate::{Error, Result};

/// Bytes of one stored element (K and V are kept as `f32`).
const ELEM_BYTES: usize = std::mem::size_of::<f32>();

/// The shape and capacity of a [`PagedKvCache`](super::PagedKvCache).
///
/// The cache holds `num_blocks` blocks; each block stores, for every one of the `num_layers`
/// layers, the K and V rows of `block_size` tokens, a row being `num_kv_heads * head_dim` floats.
/// See [`KvCacheConfig::block_bytes`] for the exact size of a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Transformer layers; every block holds K and V for each of them.
    pub num_layers: usize,
    /// KV heads per layer (after grouped-query sharing, i.e. the heads K and V actually have).
    pub num_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Tokens per block (16 is typical; 1 makes every token its own block).
    pub block_size: usize,
    /// Blocks in the pool: the cache's capacity is `num_blocks * block_size` tokens in total.
    pub num_blocks: usize,
}

impl KvCacheConfig {
    /// The config whose pool has as many blocks as fit in `budget_bytes` (K and V of every layer,
    /// `f32`), at most `u32::MAX` blocks.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when a dimension is zero, when the arithmetic overflows, or when
    /// the budget is smaller than one block.
    pub fn for_bytes(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        budget_bytes: usize,
    ) -> Result<Self> {
        let mut cfg = KvCacheConfig { num_layers, num_kv_heads, head_dim, block_size, num_blocks: 1 };
        cfg.validate()?;
        // `validate` succeeded with one block, so `block_bytes` is exact and non-zero.
        let block_bytes = cfg.block_bytes();
        let blocks = budget_bytes / block_bytes;
        if blocks == 0 {
            return Err(Error::arg(
                "budget_bytes",
                budget_bytes,
                format!("smaller than one KV block ({block_bytes} bytes)"),
            ));
        }
        cfg.num_blocks = blocks.min(u32::MAX as usize);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that every field is non-zero, that the pool fits `u32` block indices and that no
    /// size computation overflows (every layer's K or V storage, and the whole pool, must stay
    /// below `isize::MAX` bytes).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] naming the offending field.
    pub fn validate(&self) -> Result<()> {
        let fields = [
            ("num_layers", self.num_layers),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
        ];
        for (name, value) in fields {
            if value == 0 {
                return Err(Error::arg(name, value, "must be at least 1"));
            }
        }
        if self.num_blocks > u32::MAX as usize {
            return Err(Error::arg("num_blocks", self.num_blocks, "block indices must fit in u32"));
        }
        let overflow = |name: &'static str, value: usize| {
            Error::arg(name, value, "the KV cache size overflows (storage must stay below isize::MAX bytes)")
        };
        let limit = isize::MAX as usize;
        let row = self
            .num_kv_heads
            .checked_mul(self.head_dim)
            .ok_or_else(|| overflow("head_dim", self.head_dim))?;
        let block_floats =
            row.checked_mul(self.block_size).ok_or_else(|| overflow("block_size", self.block_size))?;
        let layer_bytes = block_floats
            .checked_mul(self.num_blocks)
            .and_then(|f| f.checked_mul(ELEM_BYTES))
            .filter(|&b| b <= limit)
            .ok_or_else(|| overflow("num_blocks", self.num_blocks))?;
        let _total = layer_bytes
            .checked_mul(2)
            .and_then(|b| b.checked_mul(self.num_layers))
            .filter(|&b| b <= limit)
            .ok_or_else(|| overflow("num_layers", self.num_layers))?;
        Ok(())
    }

    /// Floats in one token's K (or V) row of one layer: `num_kv_heads * head_dim`.
    pub fn row_len(&self) -> usize {
        self.num_kv_heads.saturating_mul(self.head_dim)
    }

    /// Bytes of one block: `2 (K, V) * num_layers * block_size * num_kv_heads * head_dim * 4`.
    /// Exact for a config that passes [`validate`](Self::validate) (saturates otherwise).
    pub fn block_bytes(&self) -> usize {
        [self.num_layers, self.block_size, self.row_len(), ELEM_BYTES]
            .into_iter()
            .fold(2usize, |acc, f| acc.saturating_mul(f))
    }

    /// Bytes of the whole pool: `num_blocks * block_bytes()`, the memory [`PagedKvCache::new`]
    /// allocates (up front, zeroed).
    ///
    /// [`PagedKvCache::new`]: super::PagedKvCache::new
    pub fn total_bytes(&self) -> usize {
        self.num_blocks.saturating_mul(self.block_bytes())
    }

    /// Tokens the whole pool can hold: `num_blocks * block_size`. No single sequence can grow
    /// beyond this.
    pub fn max_tokens(&self) -> usize {
        self.num_blocks.saturating_mul(self.block_size)
    }
}
