//! KV-cache offloading: the policy side (sizes, page tables, LRU), pure host code. The host store
//! and the device banks themselves belong to the caller (the KV cache of hip-core); this module
//! decides what goes where and tells the caller which rows to copy.
//!
//! # Design
//!
//! This follows InfiniteHiP's GPU caches (hip-algorithm.md §3, arXiv 2502.08910 App. A.2):
//!
//! * The **full KV cache lives in a host store** (pinned host memory under CUDA; plain or
//!   memory-mapped memory on the CPU). Its size is checked against
//!   [`Offload::host_budget_bytes`].
//! * Each layer keeps **two GPU caches**: one of keys for mask estimation (the hierarchical
//!   top-k search reads keys only) and one of keys and values for the block-sparse attention
//!   over the selected blocks. Each is a **slot bank** `[kv_heads × slots_per_head, row]` on the
//!   device plus a **page table**, with its bookkeeping in a [`TokenCache`] on the host.
//! * Granularity: one entry per `(kv_head, token)`. Each KV head owns `slots_per_head` slots;
//!   global slot ids are `head * slots_per_head + i`.
//! * The page table is a vector map: a contiguous `[kv_heads, max_tokens]` `i32` array,
//!   `table[head * max_tokens + token]` = the slot, or [`NOT_RESIDENT`] (-1). That is O(T)
//!   memory, as in the shipped code: the paper's O(log T) claim needs a hash table that is
//!   about 9× slower (trap 13); [`Offload::gpu_footprint`] counts the tables.
//!
//! # What a kernel reads
//!
//! For the row of `(head, token)`, a kernel reads `s = table[head * max_tokens + token]`: if
//! `s >= 0`, the row is bank row `s`; otherwise it reads the row straight from the host store
//! (zero-copy / UVM access over the bus). Only [`TokenCache::table`] (uploaded whenever it
//! changes) and the bank are needed on the device; the owners and LRU ticks stay on the host.
//!
//! # How misses are served
//!
//! During a step nothing moves into the bank: every miss is served from the host store, so the
//! step reads a consistent table. After the step (after each mask refresh), the caller passes
//! the `(head, token)` pairs the step read to [`TokenCache::update`], which applies the LRU
//! policy and returns an [`Update`]: the caller copies exactly the rows of
//! [`Update::inserted`] from the host store into their bank slots, and uploads the changed
//! table entries (the inserted ones and the [`Update::evicted`] ones, now -1). This is the
//! InfiniteHiP order (writes after the step unless `DEBUG_ONLINE=1`).
//!
//! [`simulate`] runs the policy over recorded access lists to pick cache sizes.
//!
//! ```
//! use hip_kernels::offload::{simulate, CacheKind, Offload};
//! let cfg = Offload::default();
//! // Decode over a 4096-token context, with 16 sinks and a 256-token window at each step.
//! let steps = (3000u32..4096).map(|pos| {
//!     (0..16).chain(pos - 255..=pos).map(|t| (0u32, t)).collect::<Vec<_>>()
//! });
//! let slots = cfg.slots_per_head(CacheKind::SparseAttn, 4096);
//! let stats = simulate(steps, 1, 4096, slots, CacheKind::SparseAttn.entry_bytes(64, 2))?;
//! assert!(stats.hit_ratio() > 0.99); // one new token per step
//! # Ok::<(), hip_kernels::Error>(())
//! ```

mod cache;
mod config;
#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

pub use cache::{Insert, OffloadStats, TokenCache, Update, NOT_RESIDENT};
pub use config::{CacheKind, GpuFootprint, KvShape, Offload};

use crate::error::Result;

/// Runs the LRU policy of a [`TokenCache`] of `kv_heads × max_tokens` with `slots_per_head`
/// slots over the access lists of successive steps, and returns the counters (with
/// `bytes_moved` for entries of `entry_bytes`). Useful to choose cache sizes from access lists
/// recorded from real HiP masks.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for impossible sizes (see
/// [`TokenCache::new`]) or an access out of range.
pub fn simulate<I>(
    steps: I,
    kv_heads: usize,
    max_tokens: usize,
    slots_per_head: usize,
    entry_bytes: u64,
) -> Result<OffloadStats>
where
    I: IntoIterator<Item = Vec<(u32, u32)>>,
{
    let mut cache = TokenCache::new(kv_heads, max_tokens, slots_per_head)?.with_entry_bytes(entry_bytes);
    for accessed in steps {
        cache.update(&accessed)?;
    }
    Ok(cache.stats())
}
