//! [`TokenCache`]: the bookkeeping of one GPU slot bank (one layer, one [`CacheKind`](super::CacheKind)):
//! page table, slot owners, LRU ticks.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::error::{Error, Result};

/// The page-table value of a (head, token) that has no slot.
pub const NOT_RESIDENT: i32 = -1;

/// `owner` of an empty slot.
const EMPTY: u32 = u32::MAX;

/// One (head, token) entry placed in the bank by [`TokenCache::update`]: the caller copies the
/// token's row of KV head `head` from the host store into bank slot `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Insert {
    /// KV head.
    pub head: u32,
    /// Token position in the sequence.
    pub token: u32,
    /// Global slot id (`head * slots_per_head + i`), the bank row to write.
    pub slot: u32,
}

/// What one [`TokenCache::update`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Update {
    /// Accesses that found their entry resident (each element of the access list counts, so a
    /// token read for several query heads counts several times).
    pub hits: u64,
    /// Accesses that did not (counted like `hits`); during the step they were served from the
    /// host store.
    pub misses: u64,
    /// Entries placed in the bank, by head, then most-missed first (ties: lower token first).
    pub inserted: Vec<Insert>,
    /// `(head, token)` entries removed to make room, least recently used first. Their slots are
    /// reused by this update's inserts of the same head.
    pub evicted: Vec<(u32, u32)>,
    /// Distinct missed entries that were not inserted because every slot of their head was
    /// taken by entries accessed in this update.
    pub not_inserted: u64,
}

/// Hit and traffic counters of an offload cache, summed over updates (and, with
/// [`OffloadStats::merge`], over caches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OffloadStats {
    /// Accesses served by the GPU bank.
    pub hits: u64,
    /// Accesses served by the host store.
    pub misses: u64,
    /// Entries copied into the bank after a step.
    pub inserts: u64,
    /// Entries evicted from the bank.
    pub evictions: u64,
    /// Bytes moved from the host store to the GPU: every miss reads its entry over the bus
    /// during the step, and every insert not staged copies it into the bank after the step,
    /// so `(misses + inserts - staged) × entry bytes`.
    pub bytes_moved: u64,
    /// Inserts copied into the bank from the GPU staging area, where the step's kernel left the
    /// row it had read over the bus, instead of from the host store (CUDA caches with
    /// [`Offload::miss_stage_tokens`](super::Offload::miss_stage_tokens); 0 on the host policy).
    pub staged: u64,
}

impl OffloadStats {
    /// Adds the counts of `update`, whose entries are `entry_bytes` long (see
    /// [`CacheKind::entry_bytes`](super::CacheKind::entry_bytes)).
    pub fn record(&mut self, update: &Update, entry_bytes: u64) {
        let inserts = update.inserted.len() as u64;
        self.hits += update.hits;
        self.misses += update.misses;
        self.inserts += inserts;
        self.evictions += update.evicted.len() as u64;
        self.bytes_moved =
            self.bytes_moved.saturating_add((update.misses + inserts).saturating_mul(entry_bytes));
    }

    /// Adds the counters of `other` (another layer or cache).
    pub fn merge(&mut self, other: &OffloadStats) {
        self.hits += other.hits;
        self.misses += other.misses;
        self.inserts += other.inserts;
        self.evictions += other.evictions;
        self.bytes_moved = self.bytes_moved.saturating_add(other.bytes_moved);
        self.staged += other.staged;
    }

    /// `hits / (hits + misses)`; **1.0 when there were no accesses**: nothing was read from the
    /// host, and a ratio that stays finite keeps sums and tables of per-layer ratios usable (a
    /// NaN would poison them). Check `hits + misses` where "no data" must be told apart.
    pub fn hit_ratio(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            1.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

/// Slot-bank bookkeeping of one GPU offload cache (one layer, one cache kind): which
/// `(kv_head, token)` entries are resident in which bank slot, and the LRU replacement of
/// InfiniteHiP (hip-algorithm.md §3), applied after each step.
///
/// * Each KV head owns `slots_per_head` slots; slot ids are global:
///   `head * slots_per_head + i`. A bank on the GPU therefore has
///   `kv_heads * slots_per_head` rows.
/// * The **page table** ([`TokenCache::table`]) is a contiguous `[kv_heads, max_tokens]` `i32`
///   array, `table[head * max_tokens + token]` = the entry's slot, or [`NOT_RESIDENT`] (-1). This
///   is what a kernel reads to find a row in the bank (a vector map, O(T) memory; see trap 13).
/// * [`TokenCache::update`] takes the `(head, token)` pairs a step read and (1) advances the
///   tick and marks every hit accessed, (2) inserts the missed entries, most frequently missed
///   first, each into a free slot or else the least recently used slot not accessed in this
///   update, (3) reports the inserts and evictions so that exactly those rows are copied.
///
/// The struct is plain host data; it allocates nothing on a device.
///
/// ```
/// use hip_kernels::offload::{TokenCache, NOT_RESIDENT};
/// // 2 KV heads, a sequence of up to 100 tokens, 2 slots per head.
/// let mut cache = TokenCache::new(2, 100, 2)?;
/// let u = cache.update(&[(0, 7), (0, 7), (0, 9), (1, 3)])?;
/// assert_eq!((u.hits, u.misses), (0, 4));
/// // (0, 7) was missed twice, so it is inserted first; head 1's slots start at 2.
/// assert_eq!(cache.lookup(0, 7), Some(0));
/// assert_eq!(cache.lookup(0, 9), Some(1));
/// assert_eq!(cache.lookup(1, 3), Some(2));
/// assert_eq!(cache.table()[100 + 3], 2); // table[head * max_tokens + token]
/// assert_eq!(cache.table()[5], NOT_RESIDENT);
///
/// // Token 7 is used again; token 11 is new and evicts the least recently used, token 9.
/// let u = cache.update(&[(0, 7), (0, 11)])?;
/// assert_eq!((u.hits, u.misses), (1, 1));
/// assert_eq!(u.evicted, vec![(0, 9)]);
/// assert_eq!(cache.lookup(0, 11), Some(1));
/// assert!(cache.update(&[(2, 0)]).is_err()); // no head 2
/// # Ok::<(), hip_kernels::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct TokenCache {
    kv_heads: usize,
    max_tokens: usize,
    slots_per_head: usize,
    /// `[kv_heads, max_tokens]`: slot or `NOT_RESIDENT`.
    table: Vec<i32>,
    /// Per slot: the token it holds (its head is `slot / slots_per_head`), or `EMPTY`.
    owner: Vec<u32>,
    /// Per slot: the tick of its last access (insert or hit).
    last_access: Vec<u64>,
    /// Per head: its empty slots, lowest first.
    free: Vec<BinaryHeap<Reverse<u32>>>,
    /// Per head: occupied slots.
    resident: Vec<usize>,
    tick: u64,
    entry_bytes: u64,
    stats: OffloadStats,
}

impl TokenCache {
    /// An empty cache for `kv_heads` KV heads, sequences of up to `max_tokens` tokens and
    /// `slots_per_head` bank slots per head (0 is allowed: every access then misses).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for 0 heads, more than 2^31 slots in all (slot ids are `i32`
    /// in the page table), `max_tokens` ≥ 2^32 (tokens are `u32`), or a page table whose size
    /// overflows.
    pub fn new(kv_heads: usize, max_tokens: usize, slots_per_head: usize) -> Result<Self> {
        if kv_heads == 0 {
            return Err(Error::arg("kv_heads", kv_heads, "must be at least 1"));
        }
        if kv_heads.checked_mul(slots_per_head).is_none_or(|n| n as u64 > 1 << 31) {
            return Err(Error::arg(
                "slots_per_head",
                slots_per_head,
                format!(
                    "{kv_heads} heads × {slots_per_head} slots exceed the 2^31 slot ids of an i32 page table"
                ),
            ));
        }
        check_tokens(kv_heads, max_tokens)?;
        let slots = kv_heads * slots_per_head;
        let mut cache = TokenCache {
            kv_heads,
            max_tokens,
            slots_per_head,
            table: vec![NOT_RESIDENT; kv_heads * max_tokens],
            owner: vec![EMPTY; slots],
            last_access: vec![0; slots],
            free: Vec::new(),
            resident: vec![0; kv_heads],
            tick: 0,
            entry_bytes: 0,
            stats: OffloadStats::default(),
        };
        cache.reset_free();
        Ok(cache)
    }

    /// Sets the bytes of one entry (see [`CacheKind::entry_bytes`](super::CacheKind::entry_bytes)),
    /// used for [`OffloadStats::bytes_moved`] in [`TokenCache::stats`] (0 until set).
    pub fn with_entry_bytes(mut self, bytes: u64) -> Self {
        self.entry_bytes = bytes;
        self
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
    /// Updates so far (the LRU clock).
    pub fn tick(&self) -> u64 {
        self.tick
    }

    /// The page table: `kv_heads * max_tokens` `i32`s, `table[head * max_tokens + token]` = the
    /// global slot holding that entry, or [`NOT_RESIDENT`].
    pub fn table(&self) -> &[i32] {
        &self.table
    }

    /// The slot holding `(head, token)`, or `None` when it is not resident (or out of range).
    pub fn lookup(&self, head: u32, token: u32) -> Option<u32> {
        if head as usize >= self.kv_heads || token as usize >= self.max_tokens {
            return None;
        }
        let s = self.table[head as usize * self.max_tokens + token as usize];
        (s >= 0).then_some(s as u32)
    }

    /// The `(head, token)` held by global slot `slot`, or `None` when it is empty (or out of
    /// range).
    pub fn slot_owner(&self, slot: u32) -> Option<(u32, u32)> {
        let t = *self.owner.get(slot as usize)?;
        (t != EMPTY).then(|| ((slot as usize / self.slots_per_head) as u32, t))
    }

    /// Entries of `head` resident in the bank (0 for a head out of range).
    pub fn resident(&self, head: usize) -> usize {
        self.resident.get(head).copied().unwrap_or(0)
    }

    /// Counters summed over every update since creation or [`TokenCache::reset_stats`].
    pub fn stats(&self) -> OffloadStats {
        self.stats
    }
    /// Zeroes the counters.
    pub fn reset_stats(&mut self) {
        self.stats = OffloadStats::default();
    }

    /// Applies the LRU policy after a step that read the `(head, token)` entries in `accessed`
    /// (duplicates allowed and meaningful: they rank misses), and returns what changed.
    ///
    /// 1. The tick advances; every resident accessed entry gets the new tick.
    /// 2. The missed entries of each head, most frequently missed in `accessed` first (ties:
    ///    lower token first), are inserted while the head has a slot not accessed in this
    ///    update: free slots (lowest first), else the slots with the smallest last-access tick
    ///    (ties: lowest slot). The slots so chosen are filled in ascending slot order (the
    ///    first inserted entry gets the lowest). Inserted entries count as accessed, so an
    ///    update never evicts what it read or inserted.
    /// 3. The counters of [`TokenCache::stats`] grow by the returned [`Update`].
    ///
    /// Time: O(accesses + m log m) for m misses, plus O(slots_per_head) for a head that has to
    /// evict.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when a head or token is out of range; the cache is then
    /// unchanged.
    pub fn update(&mut self, accessed: &[(u32, u32)]) -> Result<Update> {
        for &(h, t) in accessed {
            if h as usize >= self.kv_heads || t as usize >= self.max_tokens {
                return Err(Error::arg(
                    "accessed",
                    format!("(head {h}, token {t})"),
                    format!(
                        "out of range: the cache has {} KV heads and {} tokens",
                        self.kv_heads, self.max_tokens
                    ),
                ));
            }
        }
        self.tick += 1;
        let tick = self.tick;
        let mut up = Update::default();
        // Slots of each head accessed in this update: they cannot be evicted.
        let mut taken = vec![0usize; self.kv_heads];
        let mut missed = Vec::new();
        for &(h, t) in accessed {
            let s = self.table[h as usize * self.max_tokens + t as usize];
            if s >= 0 {
                up.hits += 1;
                if self.last_access[s as usize] != tick {
                    self.last_access[s as usize] = tick;
                    taken[h as usize] += 1;
                }
            } else {
                up.misses += 1;
                missed.push((h, t));
            }
        }
        // Distinct misses with their counts, then by head, most missed first, lower token first.
        missed.sort_unstable();
        let mut cands: Vec<(u32, u32, u32)> = Vec::new();
        for (h, t) in missed {
            match cands.last_mut() {
                Some(c) if (c.0, c.1) == (h, t) => c.2 += 1,
                _ => cands.push((h, t, 1)),
            }
        }
        cands.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.2.cmp(&a.2)).then(a.1.cmp(&b.1)));

        let mut rest = &cands[..];
        while let Some(&(h, ..)) = rest.first() {
            let len = rest.iter().take_while(|c| c.0 == h).count();
            let (group, tail) = rest.split_at(len);
            rest = tail;
            let head = h as usize;
            let n = group.len().min(self.slots_per_head - taken[head]);
            up.not_inserted += (group.len() - n) as u64;
            let from_free = n.min(self.free[head].len());
            let victims = self.lru_victims(head, n - from_free, tick);
            let mut slots: Vec<u32> =
                (0..from_free).map(|_| self.free[head].pop().expect("counted free slot").0).collect();
            for &s in &victims {
                let old = self.owner[s as usize];
                self.table[head * self.max_tokens + old as usize] = NOT_RESIDENT;
                self.resident[head] -= 1;
                up.evicted.push((h, old));
                slots.push(s);
            }
            // The chosen slots are filled in ascending order (as the device policy does).
            slots.sort_unstable();
            for (&(_, t, _), &slot) in group[..n].iter().zip(&slots) {
                self.owner[slot as usize] = t;
                self.last_access[slot as usize] = tick;
                self.table[head * self.max_tokens + t as usize] = slot as i32;
                self.resident[head] += 1;
                up.inserted.push(Insert { head: h, token: t, slot });
            }
        }
        self.stats.record(&up, self.entry_bytes);
        Ok(up)
    }

    /// The `need` occupied slots of `head` not accessed at `tick` with the smallest
    /// (last access, slot), in that order.
    fn lru_victims(&self, head: usize, need: usize, tick: u64) -> Vec<u32> {
        if need == 0 {
            return Vec::new();
        }
        let range = head * self.slots_per_head..(head + 1) * self.slots_per_head;
        let mut old: Vec<(u64, u32)> = range
            .filter(|&s| self.owner[s] != EMPTY && self.last_access[s] < tick)
            .map(|s| (self.last_access[s], s as u32))
            .collect();
        debug_assert!(old.len() >= need, "{} evictable slots, {need} needed", old.len());
        if need < old.len() {
            old.select_nth_unstable(need - 1);
            old.truncate(need);
        }
        old.sort_unstable();
        old.into_iter().map(|(_, s)| s).collect()
    }

    /// Extends the page table to `new_max_tokens` (the sequence grew past `max_tokens`),
    /// keeping every entry and its slot. The table is re-laid out, so a device copy of it must
    /// be uploaded again.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `new_max_tokens` is smaller than
    /// [`TokenCache::max_tokens`] (use [`TokenCache::truncate`] to drop entries) or too large.
    pub fn grow(&mut self, new_max_tokens: usize) -> Result<()> {
        if new_max_tokens < self.max_tokens {
            return Err(Error::arg(
                "new_max_tokens",
                new_max_tokens,
                format!(
                    "smaller than the current {} (grow never shrinks; truncate drops entries)",
                    self.max_tokens
                ),
            ));
        }
        check_tokens(self.kv_heads, new_max_tokens)?;
        if new_max_tokens == self.max_tokens {
            return Ok(());
        }
        let mut table = vec![NOT_RESIDENT; self.kv_heads * new_max_tokens];
        for h in 0..self.kv_heads {
            table[h * new_max_tokens..][..self.max_tokens]
                .copy_from_slice(&self.table[h * self.max_tokens..][..self.max_tokens]);
        }
        self.table = table;
        self.max_tokens = new_max_tokens;
        Ok(())
    }

    /// Drops the entries of tokens `len..` (the sequence was truncated to `len` tokens) and
    /// frees their slots; `max_tokens` is unchanged.
    pub fn truncate(&mut self, len: usize) {
        for s in 0..self.owner.len() {
            let t = self.owner[s];
            if t != EMPTY && t as usize >= len {
                let head = s / self.slots_per_head;
                self.table[head * self.max_tokens + t as usize] = NOT_RESIDENT;
                self.owner[s] = EMPTY;
                self.last_access[s] = 0;
                self.resident[head] -= 1;
                self.free[head].push(Reverse(s as u32));
            }
        }
    }

    /// Drops every entry. The tick and the counters are kept.
    pub fn clear(&mut self) {
        self.table.fill(NOT_RESIDENT);
        self.owner.fill(EMPTY);
        self.last_access.fill(0);
        self.resident.fill(0);
        self.reset_free();
    }

    fn reset_free(&mut self) {
        let n = self.slots_per_head as u32;
        self.free = (0..self.kv_heads as u32).map(|h| (h * n..(h + 1) * n).map(Reverse).collect()).collect();
    }

    /// Panics unless every invariant holds (tests only).
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let (heads, max, sph) = (self.kv_heads, self.max_tokens, self.slots_per_head);
        assert_eq!(self.table.len(), heads * max);
        assert_eq!(self.owner.len(), heads * sph);
        for h in 0..heads {
            for t in 0..max {
                let s = self.table[h * max + t];
                if s != NOT_RESIDENT {
                    assert!(
                        s >= 0 && (s as usize) / sph == h,
                        "table ({h}, {t}) -> slot {s} of another head"
                    );
                    assert_eq!(
                        self.owner[s as usize], t as u32,
                        "slot {s} does not point back at ({h}, {t})"
                    );
                }
            }
            let range = h * sph..(h + 1) * sph;
            let mut free: Vec<u32> = self.free[h].iter().map(|r| r.0).collect();
            free.sort_unstable();
            let empty: Vec<u32> =
                range.clone().filter(|&s| self.owner[s] == EMPTY).map(|s| s as u32).collect();
            assert_eq!(free, empty, "free list of head {h}");
            let occupied = range.clone().filter(|&s| self.owner[s] != EMPTY).count();
            assert_eq!(self.resident[h], occupied);
            assert!(occupied <= sph);
            for s in range {
                let t = self.owner[s];
                if t != EMPTY {
                    assert!((t as usize) < max, "slot {s} holds token {t} beyond {max}");
                    assert_eq!(self.table[h * max + t as usize], s as i32, "slot {s} owner not in table");
                    assert!(self.last_access[s] <= self.tick);
                }
            }
        }
    }
}

fn check_tokens(kv_heads: usize, max_tokens: usize) -> Result<()> {
    if max_tokens as u64 > u32::MAX as u64 || kv_heads.checked_mul(max_tokens).is_none() {
        return Err(Error::arg(
            "max_tokens",
            max_tokens,
            format!("too large for {kv_heads} heads (tokens are u32, the table must fit in memory)"),
        ));
    }
    Ok(())
}
