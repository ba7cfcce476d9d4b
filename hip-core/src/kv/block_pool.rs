//! Reference counts and the free list of the cache's blocks (no storage: that lives in
//! [`PagedKvCache`](super::PagedKvCache)).

/// Reference counts of `total` blocks plus a stack of the free ones.
///
/// A block is free exactly when its count is 0; a block table holding it accounts for one
/// reference.
#[derive(Debug, Clone)]
pub(super) struct BlockPool {
    /// References per block.
    refcounts: Vec<u32>,
    /// Free blocks; popped from the back, so a fresh pool hands out 0, 1, 2, ...
    free: Vec<u32>,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks. `num_blocks` must fit `u32` (checked by
    /// [`KvCacheConfig::validate`](super::KvCacheConfig::validate)).
    pub(super) fn new(num_blocks: usize) -> Self {
        debug_assert!(num_blocks <= u32::MAX as usize);
        let free = (0..num_blocks as u32).rev().collect();
        BlockPool { refcounts: vec![0; num_blocks], free }
    }

    /// Blocks in the pool.
    pub(super) fn total(&self) -> usize {
        self.refcounts.len()
    }

    /// Blocks with no reference.
    pub(super) fn free_count(&self) -> usize {
        self.free.len()
    }

    /// References to `block`.
    pub(super) fn refcount(&self, block: u32) -> u32 {
        self.refcounts[block as usize]
    }

    /// Takes a free block with one reference, or `None` when none is left.
    pub(super) fn allocate(&mut self) -> Option<u32> {
        let block = self.free.pop()?;
        debug_assert_eq!(self.refcounts[block as usize], 0, "free block {block} is referenced");
        self.refcounts[block as usize] = 1;
        Some(block)
    }

    /// Adds a reference to a block in use. The caller makes sure the count is below `u32::MAX`.
    pub(super) fn retain(&mut self, block: u32) {
        let rc = &mut self.refcounts[block as usize];
        debug_assert!(*rc > 0, "retaining free block {block}");
        *rc += 1;
    }

    /// Drops a reference; the block returns to the free list when its count reaches 0.
    pub(super) fn release(&mut self, block: u32) {
        let rc = &mut self.refcounts[block as usize];
        debug_assert!(*rc > 0, "releasing free block {block}");
        *rc -= 1;
        if *rc == 0 {
            self.free.push(block);
        }
    }

    /// Free blocks, for the invariant checks of the tests.
    #[cfg(test)]
    pub(super) fn free_list(&self) -> &[u32] {
        &self.free
    }
}
