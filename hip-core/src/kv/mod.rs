//! Paged KV cache.
//!
//! [`PagedKvCache`] keeps the keys and values of any number of sequences in one pool of
//! fixed-size **blocks**, so that memory is claimed `block_size` tokens at a time, sequences of
//! different lengths do not fragment it, and sequences with a common prefix share its blocks.
//!
//! # Blocks and storage
//!
//! The pool has [`KvCacheConfig::num_blocks`] blocks. A block holds, for **every** layer, the K
//! and V rows of `block_size` consecutive tokens of one sequence, a row being
//! `num_kv_heads * head_dim` floats (`f32`). Each layer's K (and V) storage is one `Vec<f32>` of
//! `num_blocks * block_size * num_kv_heads * head_dim` floats, block-major then token-major:
//! element (block `b`, token `t` within the block, KV head `h`, dimension `x`) is at
//!
//! ```text
//! ((b * block_size + t) * num_kv_heads + h) * head_dim + x
//! ```
//!
//! One block therefore costs [`KvCacheConfig::block_bytes`]
//! `= 2 * num_layers * block_size * num_kv_heads * head_dim * 4` bytes, and the whole pool,
//! allocated up front by [`PagedKvCache::new`], [`KvCacheConfig::total_bytes`].
//! [`KvCacheConfig::for_bytes`] sizes the pool from a memory budget.
//!
//! # Block tables
//!
//! Every sequence ([`SeqId`]) has a **block table**, a `Vec<u32>` of block indices: entry `i`
//! holds its tokens `[i * block_size, (i + 1) * block_size)`, so token `j` lives in block
//! `table[j / block_size]` at slot `j % block_size` ([`LayerView::row_offset`]). The last block
//! is usually partial. Blocks are reference-counted: a block is referenced once per table that
//! holds it and returns to the free list when the count reaches 0
//! ([`PagedKvCache::remove_sequence`], [`PagedKvCache::truncate`]).
//!
//! # Fork and copy-on-write
//!
//! [`PagedKvCache::fork`] creates a sequence that shares every block holding the parent's
//! committed tokens, the partial last block included; no data is copied and the memory in use
//! does not grow. Shared blocks are read-only: before a sequence writes into a block that another
//! sequence also references, [`PagedKvCache::reserve`] gives it a private copy (a fresh block with
//! the old one's contents, for all layers) and drops its reference to the old one. With a partial
//! last block this happens once, for whichever of parent and child writes first; the other one
//! then owns the original. Full blocks stay shared for good, since sequences only ever append.
//!
//! # Write protocol
//!
//! Appending `n` tokens (one forward pass over `n` positions) goes:
//!
//! 1. [`reserve(seq, n)`](PagedKvCache::reserve): allocates the blocks for positions
//!    `[len, len + n)` and copies-on-write a shared one. All or nothing: it either succeeds or
//!    fails with [`Error::KvCacheFull`](crate::Error::KvCacheFull) (or
//!    [`Error::ContextOverflow`](crate::Error::ContextOverflow)) and changes nothing, so a
//!    scheduler can preempt before running the layers;
//! 2. [`write(seq, layer, k, v)`](PagedKvCache::write) for every layer, each with the `n` new
//!    tokens' K and V, `[n, num_kv_heads, head_dim]` token-major; attention of that layer may then
//!    read them through [`layer_view(seq, layer, len + n)`](PagedKvCache::layer_view), before they
//!    are committed;
//! 3. [`commit(seq, n)`](PagedKvCache::commit): the tokens become part of the sequence
//!    ([`len`](PagedKvCache::len) grows by `n`).
//!
//! Until the commit, [`len`](PagedKvCache::len) is unchanged, [`fork`](PagedKvCache::fork) does not
//! carry the pending tokens, and [`truncate`](PagedKvCache::truncate) discards them.
//!
//! ```
//! use hip_core::kv::{KvCacheConfig, PagedKvCache};
//!
//! let cfg = KvCacheConfig { num_layers: 2, num_kv_heads: 2, head_dim: 4, block_size: 16, num_blocks: 8 };
//! let mut cache = PagedKvCache::new(cfg)?;
//! assert_eq!(cache.block_bytes(), 2 * 2 * 16 * 2 * 4 * 4);
//!
//! // A prompt of 20 tokens: reserve, write every layer, commit.
//! let seq = cache.add_sequence();
//! let n = 20;
//! let k: Vec<f32> = (0..n * 2 * 4).map(|i| i as f32).collect();
//! let v: Vec<f32> = k.iter().map(|x| -x).collect();
//! cache.reserve(seq, n)?;
//! for layer in 0..2 {
//!     cache.write(seq, layer, &k, &v)?;
//! }
//! cache.commit(seq, n)?;
//! assert_eq!(cache.len(seq)?, 20);
//! assert_eq!(cache.used_blocks(), 2); // 16 + 4 tokens
//!
//! // Attention reads the blocks in place, or gathers them.
//! let view = cache.layer_view(seq, 1, 20)?;
//! assert_eq!(view.k[view.row_offset(17)..][..8], k[17 * 8..18 * 8]);
//! assert_eq!(view.gather(), (k.clone(), v.clone()));
//!
//! // A fork shares both blocks; the first write into the partial one copies it.
//! let child = cache.fork(seq)?;
//! assert_eq!(cache.used_blocks(), 2);
//! cache.reserve(child, 1)?;
//! for layer in 0..2 {
//!     cache.write(child, layer, &[7.0; 8], &[7.0; 8])?;
//! }
//! cache.commit(child, 1)?;
//! assert_eq!(cache.used_blocks(), 3);
//! assert_eq!(cache.layer_view(seq, 0, 20)?.gather().0, k); // the parent is intact
//! # Ok::<(), hip_core::Error>(())
//! ```

mod block_pool;
mod config;
mod paged;
mod store;

pub use config::KvCacheConfig;
pub use paged::{DeviceLayerView, LayerView, PagedKvCache, SeqId};

#[cfg(test)]
mod tests;
