use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::reference::NaiveLru;
use super::*;
use crate::Error;

/// The fast cache and the model agree on `up`, and on the whole page table.
fn assert_same(cache: &TokenCache, model: &NaiveLru, up: &Update, want: &reference::NaiveUpdate, ctx: &str) {
    let inserted: Vec<(u32, u32, u32)> = up.inserted.iter().map(|i| (i.head, i.token, i.slot)).collect();
    assert_eq!((up.hits, up.misses), (want.hits, want.misses), "{ctx}: hits/misses");
    assert_eq!(inserted, want.inserted, "{ctx}: inserted");
    assert_eq!(up.evicted, want.evicted, "{ctx}: evicted");
    assert_eq!(up.not_inserted, want.not_inserted, "{ctx}: not inserted");
    assert_eq!(cache.table(), &model.table()[..], "{ctx}: page table");
}

/// A step's accesses: a drifting hot region plus uniform noise, duplicates included.
fn accesses(rng: &mut StdRng, heads: usize, len: usize, slots: usize, center: &mut usize) -> Vec<(u32, u32)> {
    let n = rng.random_range(0..=2 * slots + 3);
    let span = (slots + 2).min(len);
    *center = (*center + rng.random_range(0..=2)) % len;
    (0..n)
        .map(|_| {
            let h = rng.random_range(0..heads) as u32;
            let t = if rng.random_bool(0.7) {
                (*center + rng.random_range(0..span)) % len
            } else {
                rng.random_range(0..len)
            };
            (h, t as u32)
        })
        .collect()
}

fn check_step(accessed: &[(u32, u32)], up: &Update, cache: &TokenCache) {
    cache.check_invariants();
    let seen: HashSet<(u32, u32)> = accessed.iter().copied().collect();
    for e in &up.evicted {
        assert!(!seen.contains(e), "evicted {e:?}, which this update accessed");
    }
    for h in 0..cache.kv_heads() {
        assert!(cache.resident(h) <= cache.slots_per_head());
    }
    for i in &up.inserted {
        assert_eq!(cache.lookup(i.head, i.token), Some(i.slot));
        assert_eq!(cache.slot_owner(i.slot), Some((i.head, i.token)));
    }
}

#[test]
fn matches_the_naive_lru_at_awkward_sizes() {
    let mut seed = 0;
    for slots in [1, 7, 97] {
        for max_tokens in [1, 7, 97, 4099] {
            seed += 1;
            let heads = 1 + seed % 3;
            let mut rng = StdRng::seed_from_u64(seed as u64);
            let mut cache = TokenCache::new(heads, max_tokens, slots).unwrap();
            let mut model = NaiveLru::new(heads, max_tokens, slots);
            let mut center = 0;
            for step in 0..2000 {
                let ctx = format!("slots {slots} tokens {max_tokens} heads {heads} step {step}");
                if step % 97 == 96 {
                    let len = rng.random_range(0..=max_tokens);
                    cache.truncate(len);
                    model.truncate(len);
                    cache.check_invariants();
                    assert_eq!(cache.table(), &model.table()[..], "{ctx}: truncate to {len}");
                }
                let acc = accesses(&mut rng, heads, max_tokens, slots, &mut center);
                let up = cache.update(&acc).unwrap();
                let want = model.update(&acc);
                assert_same(&cache, &model, &up, &want, &ctx);
                check_step(&acc, &up, &cache);
            }
            assert_eq!(cache.tick(), 2000);
        }
    }
}

#[test]
fn matches_the_naive_lru_on_a_growing_sequence() {
    for (i, slots) in [1, 7, 97].into_iter().enumerate() {
        let heads = 2;
        let mut rng = StdRng::seed_from_u64(100 + i as u64);
        let mut cache = TokenCache::new(heads, 1, slots).unwrap();
        let mut model = NaiveLru::new(heads, 1, slots);
        let (mut len, mut center, mut step) = (1, 0, 0);
        while len < 4099 {
            let ctx = format!("slots {slots} len {len} step {step}");
            let acc = accesses(&mut rng, heads, len, slots, &mut center);
            let up = cache.update(&acc).unwrap();
            let want = model.update(&acc);
            assert_same(&cache, &model, &up, &want, &ctx);
            check_step(&acc, &up, &cache);
            // Decode appends 0–3 tokens per step; the table follows.
            len = (len + rng.random_range(0..=3)).min(4099);
            cache.grow(len).unwrap();
            model.grow(len);
            cache.check_invariants();
            assert_eq!(cache.table(), &model.table()[..], "{ctx}: grow");
            step += 1;
        }
    }
}

#[test]
fn hit_after_insert() {
    let mut c = TokenCache::new(1, 10, 4).unwrap();
    assert_eq!(c.lookup(0, 5), None);
    let u = c.update(&[(0, 5)]).unwrap();
    assert_eq!((u.hits, u.misses), (0, 1));
    assert_eq!(u.inserted, vec![Insert { head: 0, token: 5, slot: 0 }]);
    assert!(u.evicted.is_empty());
    assert_eq!(c.lookup(0, 5), Some(0));
    assert_eq!(c.table()[5], 0);
    assert_eq!(c.resident(0), 1);
    let u = c.update(&[(0, 5), (0, 5)]).unwrap();
    assert_eq!((u.hits, u.misses), (2, 0));
    assert!(u.inserted.is_empty());
    c.check_invariants();
}

#[test]
fn evicts_least_recently_used_first() {
    let mut c = TokenCache::new(1, 10, 3).unwrap();
    for t in [1, 2, 3] {
        c.update(&[(0, t)]).unwrap();
    }
    c.update(&[(0, 1)]).unwrap(); // 1 is now the most recent; LRU order 2, 3, 1
    assert_eq!(c.update(&[(0, 4)]).unwrap().evicted, vec![(0, 2)]);
    assert_eq!(c.update(&[(0, 5)]).unwrap().evicted, vec![(0, 3)]);
    assert_eq!(c.update(&[(0, 6)]).unwrap().evicted, vec![(0, 1)]);
    // Two evictions in one update: oldest first, and the slots are reused in that order.
    let slot4 = c.lookup(0, 4).unwrap();
    let slot5 = c.lookup(0, 5).unwrap();
    let u = c.update(&[(0, 8), (0, 7)]).unwrap();
    assert_eq!(u.evicted, vec![(0, 4), (0, 5)]);
    assert_eq!(
        u.inserted,
        vec![Insert { head: 0, token: 7, slot: slot4 }, Insert { head: 0, token: 8, slot: slot5 }]
    );
    assert_eq!(c.lookup(0, 6).map(|_| ()), Some(()));
    c.check_invariants();
}

#[test]
fn inserts_the_most_missed_first_when_misses_exceed_slots() {
    let mut c = TokenCache::new(2, 20, 2).unwrap();
    let acc = [(0, 9), (0, 3), (0, 3), (0, 7), (0, 7), (0, 9), (0, 9), (1, 4)];
    let u = c.update(&acc).unwrap();
    assert_eq!((u.hits, u.misses), (0, 8));
    // 9 missed 3×, 3 and 7 2× each: 9 first, then 3 (the lower token of the tie); 7 is left out.
    let got: Vec<(u32, u32)> = u.inserted.iter().map(|i| (i.head, i.token)).collect();
    assert_eq!(got, vec![(0, 9), (0, 3), (1, 4)]);
    assert_eq!(u.not_inserted, 1);
    assert_eq!(c.lookup(0, 7), None);
    assert_eq!(c.lookup(1, 4), Some(2)); // head 1's first slot
}

#[test]
fn never_evicts_what_the_update_accessed() {
    let mut c = TokenCache::new(1, 10, 2).unwrap();
    c.update(&[(0, 1)]).unwrap();
    c.update(&[(0, 2)]).unwrap();
    // 1 is the least recently used, but it is read again now: only 2 can go.
    let u = c.update(&[(0, 1), (0, 5), (0, 6)]).unwrap();
    assert_eq!(u.evicted, vec![(0, 2)]);
    assert_eq!(u.inserted.len(), 1);
    assert_eq!(u.inserted[0].token, 5);
    assert_eq!(u.not_inserted, 1);
    // A bank full of this update's hits takes nothing.
    let u = c.update(&[(0, 1), (0, 5), (0, 6)]).unwrap();
    assert_eq!((u.hits, u.misses, u.inserted.len(), u.not_inserted), (2, 1, 0, 1));
    c.check_invariants();
}

#[test]
fn truncate_grow_and_clear() {
    let mut c = TokenCache::new(2, 8, 3).unwrap();
    c.update(&[(0, 1), (0, 5), (0, 7), (1, 6), (1, 2)]).unwrap();
    c.truncate(6);
    assert_eq!((c.resident(0), c.resident(1)), (2, 1));
    assert_eq!(c.lookup(0, 7), None);
    assert_eq!(c.lookup(1, 6), None);
    assert_eq!(c.lookup(0, 5).map(|_| ()), Some(()));
    c.check_invariants();
    // The freed slot is reused.
    let u = c.update(&[(0, 0)]).unwrap();
    assert!(u.evicted.is_empty());
    assert_eq!(c.resident(0), 3);

    let before: Vec<_> = [(0, 0), (0, 1), (0, 5), (1, 2)].iter().map(|&(h, t)| c.lookup(h, t)).collect();
    c.grow(1000).unwrap();
    assert_eq!(c.max_tokens(), 1000);
    assert_eq!(c.table().len(), 2000);
    let after: Vec<_> = [(0, 0), (0, 1), (0, 5), (1, 2)].iter().map(|&(h, t)| c.lookup(h, t)).collect();
    assert_eq!(before, after);
    assert_eq!(c.table()[1000 + 2], c.lookup(1, 2).unwrap() as i32);
    c.update(&[(1, 999)]).unwrap();
    c.check_invariants();
    assert!(matches!(c.grow(999), Err(Error::InvalidArgument { name: "new_max_tokens", .. })));
    c.grow(1000).unwrap(); // same size: no-op

    let tick = c.tick();
    c.clear();
    assert!(c.table().iter().all(|&s| s == NOT_RESIDENT));
    assert_eq!((c.resident(0), c.resident(1), c.tick()), (0, 0, tick));
    c.check_invariants();
    assert_eq!(c.update(&[(0, 3)]).unwrap().inserted[0].slot, 0);
}

#[test]
fn out_of_range_is_an_error_and_changes_nothing() {
    let mut c = TokenCache::new(2, 5, 2).unwrap();
    c.update(&[(0, 1)]).unwrap();
    let table = c.table().to_vec();
    for bad in [(2, 0), (0, 5), (u32::MAX, u32::MAX)] {
        match c.update(&[(0, 2), bad]) {
            Err(Error::InvalidArgument { name: "accessed", value, .. }) => {
                assert!(value.contains(&bad.1.to_string()), "{value}")
            }
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    assert_eq!(c.table(), &table[..]);
    assert_eq!((c.tick(), c.stats().misses), (1, 1));
    assert_eq!(c.lookup(2, 0), None);
    assert_eq!(c.lookup(0, 5), None);
    assert_eq!(c.resident(7), 0);
    assert_eq!(c.slot_owner(4), None);
    assert_eq!(c.slot_owner(1), None); // empty
    assert_eq!(c.slot_owner(0), Some((0, 1)));

    assert!(matches!(TokenCache::new(0, 5, 2), Err(Error::InvalidArgument { name: "kv_heads", .. })));
    let too_many = TokenCache::new(4, 5, (1 << 29) + 1);
    assert!(matches!(too_many, Err(Error::InvalidArgument { name: "slots_per_head", .. })));
    let too_long = TokenCache::new(1, 1 << 32, 1);
    assert!(matches!(too_long, Err(Error::InvalidArgument { name: "max_tokens", .. })));
    assert!(matches!(c.grow(usize::MAX), Err(Error::InvalidArgument { name: "max_tokens", .. })));
}

#[test]
fn zero_slots_and_zero_tokens() {
    let mut c = TokenCache::new(3, 4, 0).unwrap();
    let u = c.update(&[(0, 1), (2, 3)]).unwrap();
    assert_eq!((u.hits, u.misses, u.inserted.len(), u.not_inserted), (0, 2, 0, 2));
    c.truncate(0);
    c.check_invariants();
    let mut c = TokenCache::new(1, 0, 4).unwrap();
    assert!(c.update(&[(0, 0)]).is_err());
    assert_eq!(c.update(&[]).unwrap(), Update::default());
    c.grow(1).unwrap();
    c.update(&[(0, 0)]).unwrap();
    assert_eq!(c.lookup(0, 0), Some(0));
}

#[test]
fn stats_accumulate() {
    let mut c = TokenCache::new(1, 10, 1).unwrap().with_entry_bytes(100);
    assert_eq!(c.stats().hit_ratio(), 1.0); // no accesses yet
    c.update(&[(0, 1), (0, 1)]).unwrap(); // 2 misses, 1 insert
    c.update(&[(0, 1), (0, 2)]).unwrap(); // 1 hit, 1 miss, 0 inserts (slot taken by 1)
    c.update(&[(0, 2)]).unwrap(); // 1 miss, insert evicting 1
    let s = c.stats();
    assert_eq!((s.hits, s.misses, s.inserts, s.evictions), (1, 4, 2, 1));
    assert_eq!(s.bytes_moved, (4 + 2) * 100);
    assert!((s.hit_ratio() - 0.2).abs() < 1e-12);
    let mut sum = OffloadStats::default();
    sum.merge(&s);
    sum.merge(&s);
    assert_eq!((sum.hits, sum.misses, sum.bytes_moved), (2, 8, 1200));
    c.reset_stats();
    assert_eq!(c.stats(), OffloadStats::default());
}

/// Decode with HiP-like accesses: sinks, a sliding window and a slowly changing set of selected
/// tokens. A cache at least as large as the working set hits almost always.
#[test]
fn temporal_locality_gives_high_hit_ratios() {
    let (heads, start, end) = (2u32, 512u32, 4096u32);
    let mut rng = StdRng::seed_from_u64(7);
    let mut hot: Vec<Vec<u32>> =
        (0..heads).map(|_| (0..64).map(|_| rng.random_range(16..start - 128)).collect()).collect();
    let mut steps = Vec::new();
    for pos in start..end {
        let mut acc = Vec::new();
        for h in 0..heads {
            // One selected token changes per step and head.
            let i = rng.random_range(0..hot[h as usize].len());
            hot[h as usize][i] = rng.random_range(16..pos - 128);
            let tokens = (0..16).chain(pos - 127..=pos).chain(hot[h as usize].iter().copied());
            acc.extend(tokens.map(|t| (h, t)));
        }
        steps.push(acc);
    }
    // Working set: 16 + 128 + 64 = 208 entries per head.
    let big = simulate(steps.clone(), heads as usize, end as usize, 256, 64).unwrap();
    assert!(big.hit_ratio() > 0.9, "{big:?}");
    assert!(big.hit_ratio() > 0.98, "{big:?}");
    let small = simulate(steps.clone(), heads as usize, end as usize, 100, 64).unwrap();
    assert!(small.hit_ratio() < big.hit_ratio(), "{small:?} vs {big:?}");
    let none = simulate(steps, heads as usize, end as usize, 0, 64).unwrap();
    assert_eq!(none.hit_ratio(), 0.0);
    assert_eq!(none.bytes_moved, none.misses * 64);
}

/// LRU's known worst case: a cyclic scan one larger than the cache never hits.
#[test]
fn cyclic_scan_defeats_lru() {
    let steps = (0..100u32).map(|i| vec![(0, i % 10)]);
    let s = simulate(steps, 1, 10, 9, 1).unwrap();
    assert_eq!(s.hits, 0);
    let steps = (0..100u32).map(|i| vec![(0, i % 10)]);
    let s = simulate(steps, 1, 10, 10, 1).unwrap();
    assert_eq!(s.misses, 10);
}
