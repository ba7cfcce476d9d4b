//! A slow, readable model of [`TokenCache`](super::TokenCache)'s policy (tests only): a `Vec` of
//! entries per head, linear searches everywhere.

/// One resident entry.
#[derive(Debug, Clone, Copy)]
struct Entry {
    token: u32,
    slot: u32,
    last: u64,
}

/// What one update did, in [`super::Update`]'s order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct NaiveUpdate {
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    /// (head, token, slot).
    pub(crate) inserted: Vec<(u32, u32, u32)>,
    pub(crate) evicted: Vec<(u32, u32)>,
    pub(crate) not_inserted: u64,
}

/// The LRU of hip-algorithm.md §3, written as plainly as possible.
#[derive(Debug, Clone)]
pub(crate) struct NaiveLru {
    slots_per_head: usize,
    max_tokens: usize,
    heads: Vec<Vec<Entry>>,
    tick: u64,
}

impl NaiveLru {
    pub(crate) fn new(kv_heads: usize, max_tokens: usize, slots_per_head: usize) -> Self {
        NaiveLru { slots_per_head, max_tokens, heads: vec![Vec::new(); kv_heads], tick: 0 }
    }

    pub(crate) fn update(&mut self, accessed: &[(u32, u32)]) -> NaiveUpdate {
        self.tick += 1;
        let tick = self.tick;
        let mut up = NaiveUpdate::default();
        // (head, token, times missed), in order of first miss.
        let mut missed: Vec<(u32, u32, u32)> = Vec::new();
        for &(h, t) in accessed {
            match self.heads[h as usize].iter_mut().find(|e| e.token == t) {
                Some(e) => {
                    e.last = tick;
                    up.hits += 1;
                }
                None => {
                    up.misses += 1;
                    match missed.iter_mut().find(|m| (m.0, m.1) == (h, t)) {
                        Some(m) => m.2 += 1,
                        None => missed.push((h, t, 1)),
                    }
                }
            }
        }
        for h in 0..self.heads.len() {
            let mut mine: Vec<(u32, u32)> =
                missed.iter().filter(|m| m.0 as usize == h).map(|m| (m.1, m.2)).collect();
            // Most missed first, then lower token.
            mine.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            for (token, _) in mine {
                let entries = &mut self.heads[h];
                let slot = if entries.len() < self.slots_per_head {
                    // The lowest free slot.
                    let first = (h * self.slots_per_head) as u32;
                    (first..first + self.slots_per_head as u32)
                        .find(|s| entries.iter().all(|e| e.slot != *s))
                        .expect("a free slot")
                } else {
                    // The least recently used entry not accessed in this update, lowest slot on ties.
                    let victim = entries
                        .iter()
                        .enumerate()
                        .filter(|(_, e)| e.last < tick)
                        .min_by_key(|(_, e)| (e.last, e.slot))
                        .map(|(i, _)| i);
                    let Some(i) = victim else {
                        up.not_inserted += 1;
                        continue;
                    };
                    let old = entries.remove(i);
                    up.evicted.push((h as u32, old.token));
                    old.slot
                };
                entries.push(Entry { token, slot, last: tick });
                up.inserted.push((h as u32, token, slot));
            }
            // The slots chosen for this head are filled in ascending order, in insertion order.
            let first = up.inserted.iter().position(|i| i.0 as usize == h).unwrap_or(up.inserted.len());
            let mine = &mut up.inserted[first..];
            let mut slots: Vec<u32> = mine.iter().map(|i| i.2).collect();
            slots.sort_unstable();
            let entries = &mut self.heads[h];
            let base = entries.len() - mine.len();
            for (i, slot) in slots.into_iter().enumerate() {
                mine[i].2 = slot;
                entries[base + i].slot = slot;
            }
        }
        up
    }

    pub(crate) fn truncate(&mut self, len: usize) {
        for entries in &mut self.heads {
            entries.retain(|e| (e.token as usize) < len);
        }
    }

    pub(crate) fn grow(&mut self, max_tokens: usize) {
        self.max_tokens = max_tokens;
    }

    /// The page table this model implies.
    pub(crate) fn table(&self) -> Vec<i32> {
        let mut table = vec![-1; self.heads.len() * self.max_tokens];
        for (h, entries) in self.heads.iter().enumerate() {
            for e in entries {
                table[h * self.max_tokens + e.token as usize] = e.slot as i32;
            }
        }
        table
    }
}
