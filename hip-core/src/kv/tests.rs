use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::Error;

fn cfg(
    num_layers: usize,
    num_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    num_blocks: usize,
) -> KvCacheConfig {
    KvCacheConfig { num_layers, num_kv_heads, head_dim, block_size, num_blocks }
}

/// What a sequence should hold: the committed K and V of each layer, `[len, row]` flattened.
#[derive(Debug, Clone)]
struct Shadow {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Shadow {
    fn new(layers: usize) -> Self {
        Shadow { k: vec![Vec::new(); layers], v: vec![Vec::new(); layers] }
    }

    fn truncate(&mut self, floats: usize) {
        self.k.iter_mut().chain(self.v.iter_mut()).for_each(|x| x.truncate(floats));
    }
}

/// Distinct, recognisable values for (tag, layer, token index within the append, element).
fn rows(tag: u32, layer: usize, n: usize, row: usize, is_v: bool) -> Vec<f32> {
    (0..n * row)
        .map(|i| {
            let sign = if is_v { -1.0 } else { 1.0 };
            sign * (tag as f32 * 1.0e4 + layer as f32 * 1.0e3 + i as f32 / 8.0)
        })
        .collect()
}

/// Reserve, write every layer, commit; mirrors the tokens into `shadow`.
fn append(
    cache: &mut PagedKvCache,
    seq: SeqId,
    shadow: &mut Shadow,
    n: usize,
    tag: u32,
) -> crate::Result<()> {
    let c = cache.config().clone();
    let row = c.row_len();
    cache.reserve(seq, n)?;
    for layer in 0..c.num_layers {
        let k = rows(tag, layer, n, row, false);
        let v = rows(tag, layer, n, row, true);
        cache.write(seq, layer, &k, &v)?;
        shadow.k[layer].extend_from_slice(&k);
        shadow.v[layer].extend_from_slice(&v);
    }
    cache.commit(seq, n)
}

/// The invariants hold and `seq` holds exactly `shadow`.
fn check(cache: &PagedKvCache, seq: SeqId, shadow: &Shadow) {
    cache.check_invariants().unwrap();
    let row = cache.config().row_len();
    let len = cache.len(seq).unwrap();
    for layer in 0..cache.config().num_layers {
        assert_eq!(shadow.k[layer].len(), len * row, "seq {seq} layer {layer}: length");
        let view = cache.layer_view(seq, layer, len).unwrap();
        let (k, v) = view.gather();
        assert_eq!(k, shadow.k[layer], "seq {seq} layer {layer}: K");
        assert_eq!(v, shadow.v[layer], "seq {seq} layer {layer}: V");
    }
}

fn blocks_for(len: usize, bs: usize) -> usize {
    len.div_ceil(bs)
}

#[test]
fn append_in_awkward_pieces() {
    for bs in [1, 3, 16] {
        let mut cache = PagedKvCache::new(cfg(3, 2, 5, bs, 400)).unwrap();
        let seq = cache.add_sequence();
        let mut shadow = Shadow::new(3);
        let mut len = 0;
        for (i, n) in [1, 7, 97, 1, 16, 0, 15, 33].into_iter().enumerate() {
            append(&mut cache, seq, &mut shadow, n, i as u32).unwrap();
            len += n;
            assert_eq!(cache.len(seq).unwrap(), len);
            assert_eq!(cache.block_table(seq).unwrap().len(), blocks_for(len, bs));
            assert_eq!(cache.used_blocks(), blocks_for(len, bs));
            assert_eq!(cache.seq_bytes(seq).unwrap(), blocks_for(len, bs) * cache.block_bytes());
            check(&cache, seq, &shadow);
        }
    }
}

#[test]
fn row_offset_matches_layout() {
    let (bs, heads, hd) = (4, 3, 2);
    let mut cache = PagedKvCache::new(cfg(2, heads, hd, bs, 10)).unwrap();
    let a = cache.add_sequence();
    let b = cache.add_sequence();
    let (mut sa, mut sb) = (Shadow::new(2), Shadow::new(2));
    // Interleave so the tables are not contiguous.
    for i in 0..4 {
        append(&mut cache, a, &mut sa, 3, i).unwrap();
        append(&mut cache, b, &mut sb, 2, 100 + i).unwrap();
    }
    let table = cache.block_table(a).unwrap().to_vec();
    let view = cache.layer_view(a, 1, 12).unwrap();
    assert_eq!(view.block_table, &table[..]);
    for j in 0..12 {
        let off = (table[j / bs] as usize * bs + j % bs) * heads * hd;
        assert_eq!(view.row_offset(j), off);
        for h in 0..heads {
            for x in 0..hd {
                let want = sa.k[1][(j * heads + h) * hd + x];
                assert_eq!(view.k[((table[j / bs] as usize * bs + j % bs) * heads + h) * hd + x], want);
            }
        }
        assert_eq!(view.k_row(j), &sa.k[1][j * 6..(j + 1) * 6]);
        assert_eq!(view.v_row(j), &sa.v[1][j * 6..(j + 1) * 6]);
    }
    check(&cache, a, &sa);
    check(&cache, b, &sb);
}

#[test]
fn truncate_then_append() {
    for bs in [1, 16] {
        let mut cache = PagedKvCache::new(cfg(2, 1, 4, bs, 64)).unwrap();
        let seq = cache.add_sequence();
        let mut shadow = Shadow::new(2);
        append(&mut cache, seq, &mut shadow, 40, 1).unwrap();
        for (new_len, n) in [(40, 3), (17, 5), (16, 16), (0, 9), (9, 0)] {
            cache.truncate(seq, new_len).unwrap();
            shadow.truncate(new_len * 4);
            assert_eq!(cache.len(seq).unwrap(), new_len);
            assert_eq!(cache.used_blocks(), blocks_for(new_len, bs));
            check(&cache, seq, &shadow);
            append(&mut cache, seq, &mut shadow, n, new_len as u32 + 7).unwrap();
            check(&cache, seq, &shadow);
        }
        assert!(matches!(cache.truncate(seq, 10), Err(Error::InvalidArgument { name: "new_len", .. })));
        check(&cache, seq, &shadow);
    }
}

#[test]
fn fork_shares_blocks_and_cow_keeps_parent_intact() {
    let bs = 16;
    let mut cache = PagedKvCache::new(cfg(2, 2, 3, bs, 16)).unwrap();
    let bb = cache.block_bytes();
    let parent = cache.add_sequence();
    let mut sp = Shadow::new(2);
    append(&mut cache, parent, &mut sp, 40, 1).unwrap(); // 2 full blocks + 8 tokens
    assert_eq!(cache.bytes_in_use(), 3 * bb);

    let child = cache.fork(parent).unwrap();
    let mut sc = sp.clone();
    assert_eq!(cache.bytes_in_use(), 3 * bb);
    assert_eq!(cache.block_table(child).unwrap(), cache.block_table(parent).unwrap());
    assert_eq!(cache.seq_bytes(child).unwrap(), 3 * bb);
    check(&cache, child, &sc);

    // The child writes into the shared partial block first: it gets a copy.
    append(&mut cache, child, &mut sc, 1, 2).unwrap();
    assert_eq!(cache.bytes_in_use(), 4 * bb);
    check(&cache, parent, &sp);
    check(&cache, child, &sc);
    // The parent now owns the original alone: no further copy.
    append(&mut cache, parent, &mut sp, 5, 3).unwrap();
    assert_eq!(cache.bytes_in_use(), 4 * bb);
    check(&cache, parent, &sp);
    check(&cache, child, &sc);
    let (tp, tc) = (cache.block_table(parent).unwrap(), cache.block_table(child).unwrap());
    assert_eq!(tp[..2], tc[..2], "full blocks stay shared");
    assert_ne!(tp[2], tc[2]);

    // The other way round: the parent writes first.
    let child2 = cache.fork(parent).unwrap();
    let mut sc2 = sp.clone();
    append(&mut cache, parent, &mut sp, 2, 4).unwrap();
    assert_eq!(cache.bytes_in_use(), 5 * bb);
    check(&cache, child2, &sc2);
    check(&cache, parent, &sp);
    append(&mut cache, child2, &mut sc2, 2, 5).unwrap();
    assert_eq!(cache.bytes_in_use(), 5 * bb);
    for (s, sh) in [(parent, &sp), (child, &sc), (child2, &sc2)] {
        check(&cache, s, sh);
    }
}

#[test]
fn fork_at_block_boundary_copies_nothing() {
    let mut cache = PagedKvCache::new(cfg(1, 1, 2, 4, 8)).unwrap();
    let parent = cache.add_sequence();
    let mut sp = Shadow::new(1);
    append(&mut cache, parent, &mut sp, 8, 1).unwrap();
    let child = cache.fork(parent).unwrap();
    let mut sc = sp.clone();
    append(&mut cache, child, &mut sc, 1, 2).unwrap();
    append(&mut cache, parent, &mut sp, 1, 3).unwrap();
    assert_eq!(cache.used_blocks(), 4); // 2 shared + 1 each
    check(&cache, parent, &sp);
    check(&cache, child, &sc);
}

#[test]
fn fork_of_fork() {
    let bs = 4;
    let mut cache = PagedKvCache::new(cfg(2, 1, 3, bs, 32)).unwrap();
    let a = cache.add_sequence();
    let mut sa = Shadow::new(2);
    append(&mut cache, a, &mut sa, 6, 1).unwrap(); // blocks: full + 2 tokens
    let b = cache.fork(a).unwrap();
    let mut sb = sa.clone();
    let c = cache.fork(b).unwrap();
    let mut sc = sb.clone();
    assert_eq!(cache.used_blocks(), 2);
    let shared = cache.block_table(a).unwrap().to_vec();
    // Three holders of each block; each writer copies the partial block until one holder is left.
    append(&mut cache, b, &mut sb, 1, 2).unwrap();
    assert_eq!(cache.used_blocks(), 3);
    append(&mut cache, c, &mut sc, 2, 3).unwrap(); // exactly fills the copy
    assert_eq!(cache.used_blocks(), 4);
    append(&mut cache, a, &mut sa, 2, 4).unwrap();
    assert_eq!(cache.used_blocks(), 4, "a is the last holder of the original partial block");
    assert_eq!(cache.block_table(a).unwrap()[1], shared[1]);
    let d = cache.fork(c).unwrap();
    let mut sd = sc.clone();
    append(&mut cache, d, &mut sd, 10, 5).unwrap();
    cache.truncate(c, 3).unwrap();
    sc.truncate(3 * 3);
    append(&mut cache, c, &mut sc, 2, 6).unwrap();
    for (s, sh) in [(a, &sa), (b, &sb), (c, &sc), (d, &sd)] {
        check(&cache, s, sh);
    }
    cache.remove_sequence(b).unwrap();
    cache.remove_sequence(a).unwrap();
    for (s, sh) in [(c, &sc), (d, &sd)] {
        check(&cache, s, sh);
    }
}

#[test]
fn remove_frees_everything() {
    let mut cache = PagedKvCache::new(cfg(2, 2, 2, 3, 40)).unwrap();
    let mut seqs = Vec::new();
    for i in 0..3 {
        let s = cache.add_sequence();
        append(&mut cache, s, &mut Shadow::new(2), 10 + i, i as u32).unwrap();
        seqs.push(s);
        seqs.push(cache.fork(s).unwrap());
    }
    let pending = cache.add_sequence();
    cache.reserve(pending, 5).unwrap();
    seqs.push(pending);
    assert!(cache.free_blocks() < cache.total_blocks());
    assert_eq!(cache.sequences().collect::<Vec<_>>(), {
        let mut s = seqs.clone();
        s.sort();
        s
    });
    for s in seqs {
        cache.remove_sequence(s).unwrap();
        cache.check_invariants().unwrap();
    }
    assert_eq!(cache.free_blocks(), cache.total_blocks());
    assert_eq!(cache.bytes_in_use(), 0);
    assert_eq!(cache.num_sequences(), 0);
}

#[test]
fn full_cache_leaves_state_unchanged() {
    let bs = 4;
    let mut cache = PagedKvCache::new(cfg(2, 1, 2, bs, 5)).unwrap();
    let a = cache.add_sequence();
    let mut sa = Shadow::new(2);
    append(&mut cache, a, &mut sa, 10, 1).unwrap(); // 3 blocks, last holds 2 tokens
    let b = cache.fork(a).unwrap();
    let mut sb = sa.clone();
    assert_eq!(cache.free_blocks(), 2);

    let snapshot = |c: &PagedKvCache, s: SeqId| {
        (c.len(s).unwrap(), c.reserved(s).unwrap(), c.block_table(s).unwrap().to_vec(), c.free_blocks())
    };
    // b needs a copy of the partial block plus 2 new blocks: 3 > 2.
    let before = snapshot(&cache, b);
    match cache.reserve(b, 10) {
        Err(Error::KvCacheFull { needed: 3, free: 2 }) => {}
        other => panic!("expected KvCacheFull, got {other:?}"),
    }
    assert_eq!(snapshot(&cache, b), before);
    check(&cache, a, &sa);
    check(&cache, b, &sb);
    // More than the whole pool can ever hold.
    match cache.reserve(b, 11) {
        Err(Error::ContextOverflow { tokens: 21, limit: 20 }) => {}
        other => panic!("expected ContextOverflow, got {other:?}"),
    }
    assert!(matches!(cache.reserve(b, usize::MAX), Err(Error::ContextOverflow { .. })));
    assert_eq!(snapshot(&cache, b), before);
    // What fits still works.
    append(&mut cache, b, &mut sb, 6, 2).unwrap(); // copy + 1 new block
    assert_eq!(cache.free_blocks(), 0);
    assert!(matches!(cache.reserve(a, 3), Err(Error::KvCacheFull { needed: 1, free: 0 })));
    append(&mut cache, a, &mut sa, 2, 3).unwrap(); // fits the partial block, now a's alone
    check(&cache, a, &sa);
    check(&cache, b, &sb);
    cache.remove_sequence(b).unwrap();
    append(&mut cache, a, &mut sa, 8, 4).unwrap();
    check(&cache, a, &sa);
}

#[test]
fn unknown_sequence_errors() {
    let mut cache = PagedKvCache::new(cfg(1, 1, 1, 2, 4)).unwrap();
    let s = cache.add_sequence();
    cache.remove_sequence(s).unwrap();
    let unknown = |r: Result<(), Error>| assert!(matches!(r, Err(Error::UnknownSequence(0))), "{r:?}");
    unknown(cache.remove_sequence(s));
    unknown(cache.len(s).map(drop));
    unknown(cache.reserved(s).map(drop));
    unknown(cache.block_table(s).map(drop));
    unknown(cache.reserve(s, 1));
    unknown(cache.reserve(s, 0));
    unknown(cache.write(s, 0, &[1.0], &[1.0]));
    unknown(cache.write(s, 5, &[1.0], &[]));
    unknown(cache.commit(s, 0));
    unknown(cache.layer_view(s, 0, 0).map(drop));
    unknown(cache.truncate(s, 0));
    unknown(cache.fork(s).map(drop));
    unknown(cache.seq_bytes(s).map(drop));
    assert!(!cache.contains(s));
    assert!(matches!(cache.len(SeqId(99)), Err(Error::UnknownSequence(99))));
    assert_eq!(cache.add_sequence(), SeqId(1), "ids are not reused");
}

#[test]
fn bad_writes_and_commits_error() {
    let mut cache = PagedKvCache::new(cfg(2, 2, 3, 4, 8)).unwrap();
    let s = cache.add_sequence();
    let mut sh = Shadow::new(2);
    let row = [0.5f32; 6];
    let bad = |r: Result<(), Error>, what: &str| {
        assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{what}: {r:?}")
    };
    bad(cache.write(s, 0, &row, &row), "write without reserve");
    bad(cache.commit(s, 1), "commit without reserve");
    cache.reserve(s, 2).unwrap();
    bad(cache.write(s, 0, &[0.0; 18], &[0.0; 18]), "write past the reservation");
    bad(cache.write(s, 2, &row, &row), "layer out of range");
    bad(cache.write(s, 0, &row, &row[..5]), "k and v differ");
    bad(cache.write(s, 0, &row[..5], &row[..5]), "not whole rows");
    bad(cache.commit(s, 3), "commit past the reservation");
    bad(cache.layer_view(s, 0, 3).map(drop), "view past the reservation");
    bad(cache.layer_view(s, 2, 0).map(drop), "view of a missing layer");
    cache.write(s, 0, &[], &[]).unwrap();
    assert_eq!(cache.len(s).unwrap(), 0);
    cache.check_invariants().unwrap();
    // The failed calls changed nothing: the protocol still works.
    append(&mut cache, s, &mut sh, 2, 1).unwrap();
    check(&cache, s, &sh);
    bad(cache.write(s, 0, &row, &row), "write after the reservation was committed");
}

#[test]
fn uncommitted_tokens_are_visible_only_through_layer_view() {
    let mut cache = PagedKvCache::new(cfg(2, 1, 2, 4, 8)).unwrap();
    let s = cache.add_sequence();
    let mut sh = Shadow::new(2);
    append(&mut cache, s, &mut sh, 3, 1).unwrap();
    cache.reserve(s, 4).unwrap();
    assert_eq!(cache.reserved(s).unwrap(), 7);
    let k = rows(2, 0, 4, 2, false);
    let v = rows(2, 0, 4, 2, true);
    cache.write(s, 0, &k, &v).unwrap();
    assert_eq!(cache.len(s).unwrap(), 3);
    let (gk, gv) = cache.layer_view(s, 0, 7).unwrap().gather();
    assert_eq!(gk, [&sh.k[0][..], &k[..]].concat());
    assert_eq!(gv, [&sh.v[0][..], &v[..]].concat());
    // A smaller reservation keeps the larger one; a fork does not carry pending tokens.
    cache.reserve(s, 1).unwrap();
    assert_eq!(cache.reserved(s).unwrap(), 7);
    let child = cache.fork(s).unwrap();
    assert_eq!((cache.len(child).unwrap(), cache.reserved(child).unwrap()), (3, 3));
    assert_eq!(cache.block_table(child).unwrap().len(), 1);
    // The parent finishes its step after the fork; the child is unaffected.
    cache.write(s, 1, &rows(3, 1, 4, 2, false), &rows(3, 1, 4, 2, true)).unwrap();
    cache.commit(s, 4).unwrap();
    check(&cache, child, &sh);
    let mut sc = sh.clone();
    sh.k[0].extend_from_slice(&k);
    sh.v[0].extend_from_slice(&v);
    sh.k[1].extend(rows(3, 1, 4, 2, false));
    sh.v[1].extend(rows(3, 1, 4, 2, true));
    check(&cache, s, &sh);
    append(&mut cache, child, &mut sc, 5, 4).unwrap();
    check(&cache, child, &sc);
    check(&cache, s, &sh);
    // Truncating to the current length drops a pending reservation.
    cache.reserve(s, 9).unwrap();
    cache.truncate(s, 7).unwrap();
    assert_eq!(cache.reserved(s).unwrap(), 7);
    check(&cache, s, &sh);
}

#[test]
fn byte_accounting_is_exact() {
    let c = cfg(3, 4, 8, 16, 10);
    let bb = 2 * 3 * 16 * 4 * 8 * 4;
    assert_eq!(c.block_bytes(), bb);
    assert_eq!(c.total_bytes(), 10 * bb);
    assert_eq!(c.max_tokens(), 160);
    assert_eq!(c.row_len(), 32);
    let mut cache = PagedKvCache::new(c).unwrap();
    assert_eq!(cache.block_bytes(), bb);
    assert_eq!((cache.total_blocks(), cache.free_blocks(), cache.bytes_in_use()), (10, 10, 0));
    let a = cache.add_sequence();
    assert_eq!(cache.seq_bytes(a).unwrap(), 0);
    cache.reserve(a, 17).unwrap();
    assert_eq!(cache.seq_bytes(a).unwrap(), 2 * bb);
    assert_eq!(cache.bytes_in_use(), 2 * bb);
    cache.commit(a, 17).unwrap();
    let b = cache.fork(a).unwrap();
    assert_eq!(cache.seq_bytes(b).unwrap(), 2 * bb);
    assert_eq!(cache.bytes_in_use(), 2 * bb);
    cache.reserve(b, 16).unwrap(); // copy of block 1 + a new block 2
    assert_eq!(cache.seq_bytes(b).unwrap(), 3 * bb);
    assert_eq!(cache.bytes_in_use(), 4 * bb);
    assert_eq!(cache.free_blocks(), 6);
    cache.truncate(a, 0).unwrap();
    assert_eq!(cache.seq_bytes(a).unwrap(), 0);
    assert_eq!(cache.bytes_in_use(), 3 * bb);
    assert_eq!(cache.used_blocks() + cache.free_blocks(), cache.total_blocks());
}

#[test]
fn config_validation_and_budget() {
    let ok = cfg(2, 2, 4, 16, 8);
    ok.validate().unwrap();
    for bad in [
        KvCacheConfig { num_layers: 0, ..ok.clone() },
        KvCacheConfig { num_kv_heads: 0, ..ok.clone() },
        KvCacheConfig { head_dim: 0, ..ok.clone() },
        KvCacheConfig { block_size: 0, ..ok.clone() },
        KvCacheConfig { num_blocks: 0, ..ok.clone() },
        KvCacheConfig { num_blocks: u32::MAX as usize + 1, ..ok.clone() },
        KvCacheConfig { head_dim: usize::MAX, ..ok.clone() },
        KvCacheConfig { num_blocks: u32::MAX as usize, block_size: 1 << 40, ..ok.clone() },
        KvCacheConfig { num_layers: usize::MAX / 2, ..ok.clone() },
    ] {
        assert!(matches!(bad.validate(), Err(Error::InvalidArgument { .. })), "{bad:?}");
        assert!(matches!(PagedKvCache::new(bad), Err(Error::InvalidArgument { .. })));
    }
    let bb = ok.block_bytes();
    let c = KvCacheConfig::for_bytes(2, 2, 4, 16, 10 * bb + bb - 1).unwrap();
    assert_eq!(c, KvCacheConfig { num_blocks: 10, ..ok.clone() });
    assert_eq!(c.total_bytes(), 10 * bb);
    assert!(matches!(KvCacheConfig::for_bytes(2, 2, 4, 16, bb - 1), Err(Error::InvalidArgument { .. })));
    assert!(matches!(KvCacheConfig::for_bytes(2, 0, 4, 16, 1 << 30), Err(Error::InvalidArgument { .. })));
    assert_eq!(KvCacheConfig::for_bytes(1, 1, 1, 1, usize::MAX / 2).unwrap().num_blocks, u32::MAX as usize);
}

/// A sequence of the model: committed contents plus the expected reservation.
#[derive(Debug, Clone)]
struct ModelSeq {
    id: SeqId,
    data: Shadow,
    len: usize,
    reserved: usize,
}

fn random_rows(rng: &mut StdRng, floats: usize) -> Vec<f32> {
    (0..floats).map(|_| rng.random::<f32>()).collect()
}

fn check_model(cache: &PagedKvCache, model: &[ModelSeq]) {
    cache.check_invariants().unwrap();
    let bs = cache.config().block_size;
    assert_eq!(cache.num_sequences(), model.len());
    let mut needed = 0;
    for m in model {
        assert_eq!(cache.len(m.id).unwrap(), m.len);
        assert_eq!(cache.reserved(m.id).unwrap(), m.reserved);
        let blocks = m.reserved.div_ceil(bs);
        assert_eq!(cache.seq_bytes(m.id).unwrap(), blocks * cache.block_bytes());
        needed += blocks;
        check(cache, m.id, &m.data);
    }
    assert!(cache.used_blocks() <= needed);
    assert_eq!(cache.bytes_in_use(), cache.used_blocks() * cache.block_bytes());
    assert_eq!(cache.used_blocks() + cache.free_blocks(), cache.total_blocks());
}

fn run_random_ops(seed: u64, bs: usize, num_blocks: usize, ops: usize) {
    let c = cfg(2, 2, 3, bs, num_blocks);
    run_random_ops_on(PagedKvCache::new(c).unwrap(), seed, bs, num_blocks, ops);
}

fn run_random_ops_on(mut cache: PagedKvCache, seed: u64, bs: usize, num_blocks: usize, ops: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (layers, heads, hd) = (2, 2, 3);
    let row = heads * hd;
    let mut model: Vec<ModelSeq> = Vec::new();
    let (mut appended, mut full) = (0, 0);
    for step in 0..ops {
        let op = if model.is_empty() { 0 } else { rng.random_range(0..10) };
        let pick = if model.is_empty() { 0 } else { rng.random_range(0..model.len()) };
        match op {
            // Add a sequence.
            0 if model.len() < 8 => {
                let id = cache.add_sequence();
                model.push(ModelSeq { id, data: Shadow::new(layers), len: 0, reserved: 0 });
            }
            // Remove one.
            1 => {
                let m = model.swap_remove(pick);
                cache.remove_sequence(m.id).unwrap();
            }
            // Append a step, maybe forking the sequence between two layer writes.
            2..=5 => {
                let n = match rng.random_range(0..4) {
                    0 => 1,
                    1 => rng.random_range(0..=bs + 1),
                    2 => rng.random_range(0..20),
                    _ => rng.random_range(0..100),
                };
                let fork_at =
                    (model.len() < 10 && rng.random_bool(0.2)).then(|| rng.random_range(0..=layers));
                let free = cache.free_blocks();
                match cache.reserve(model[pick].id, n) {
                    Err(Error::KvCacheFull { .. } | Error::ContextOverflow { .. }) => {
                        full += 1;
                        assert_eq!(cache.free_blocks(), free);
                    }
                    Err(e) => panic!("step {step}: {e}"),
                    Ok(()) => {
                        appended += 1;
                        let m = &mut model[pick];
                        if n > 0 {
                            m.reserved = m.reserved.max(m.len + n);
                        }
                        let mut child = None;
                        for layer in 0..layers {
                            if fork_at == Some(layer) {
                                child = Some(cache.fork(model[pick].id).unwrap());
                            }
                            let k = random_rows(&mut rng, n * row);
                            let v = random_rows(&mut rng, n * row);
                            cache.write(model[pick].id, layer, &k, &v).unwrap();
                            model[pick].data.k[layer].extend(k);
                            model[pick].data.v[layer].extend(v);
                        }
                        // Before the commit, the new tokens are readable through layer_view.
                        let m = &model[pick];
                        let view = cache.layer_view(m.id, layers - 1, m.len + n).unwrap();
                        assert_eq!(view.gather().0, m.data.k[layers - 1]);
                        if let Some(id) = child {
                            let mut data = model[pick].data.clone();
                            data.truncate(model[pick].len * row);
                            let len = model[pick].len;
                            model.push(ModelSeq { id, data, len, reserved: len });
                        }
                        cache.commit(model[pick].id, n).unwrap();
                        model[pick].len += n;
                        if fork_at == Some(layers) {
                            let m = model[pick].clone();
                            let id = cache.fork(m.id).unwrap();
                            model.push(ModelSeq { id, reserved: m.len, ..m });
                        }
                    }
                }
            }
            // Reserve and write some layers, then stop (an abandoned or preempted step).
            6 => {
                let n = rng.random_range(1..2 * bs + 2);
                let id = model[pick].id;
                if cache.reserve(id, n).is_ok() {
                    let m = &mut model[pick];
                    m.reserved = m.reserved.max(m.len + n);
                    for layer in 0..rng.random_range(0..=layers) {
                        let w = rng.random_range(0..=n);
                        let (k, v) = (random_rows(&mut rng, w * row), random_rows(&mut rng, w * row));
                        cache.write(id, layer, &k, &v).unwrap();
                    }
                }
            }
            // Truncate.
            7 => {
                let m = &mut model[pick];
                let new_len = rng.random_range(0..=m.len);
                cache.truncate(m.id, new_len).unwrap();
                m.data.truncate(new_len * row);
                m.len = new_len;
                m.reserved = new_len;
            }
            // Fork.
            8 if model.len() < 8 => {
                let m = model[pick].clone();
                let id = cache.fork(m.id).unwrap();
                let mut data = m.data.clone();
                data.truncate(m.len * row);
                model.push(ModelSeq { id, data, len: m.len, reserved: m.len });
            }
            // Invalid calls change nothing.
            _ => {
                let m = &model[pick];
                let over = m.reserved - m.len + 1;
                assert!(cache.commit(m.id, over).is_err());
                assert!(cache.write(m.id, 0, &vec![0.0; over * row], &vec![0.0; over * row]).is_err());
                assert!(cache.layer_view(m.id, 0, m.reserved + 1).is_err());
                assert!(cache.truncate(m.id, m.len + 1).is_err());
            }
        }
        check_model(&cache, &model);
    }
    assert!(appended > ops / 10, "seed {seed}: only {appended} appends succeeded");
    assert!(full > 0 || num_blocks * bs > 800, "seed {seed}: the pool never filled up");
}

/// A cache whose pool is a memory-mapped temporary file passes the same random-operation checks
/// (writes, forks with copy-on-write, truncation, a full pool) as the in-memory one; its file is
/// unlinked from the start, so the folder stays empty. A missing folder is a typed error.
#[test]
fn file_backed_store_matches_model() {
    let dir = tempfile::tempdir().unwrap();
    for seed in 0..3 {
        for (bs, blocks) in [(16, 24), (1, 200), (3, 60)] {
            let cache = PagedKvCache::new_file_backed(cfg(2, 2, 3, bs, blocks), dir.path()).unwrap();
            run_random_ops_on(cache, 300 + seed, bs, blocks, 300);
        }
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the cache file is unlinked");
    let missing = dir.path().join("no/such/dir");
    match PagedKvCache::new_file_backed(cfg(2, 2, 3, 16, 4), &missing) {
        Err(Error::InvalidArgument { .. }) => {}
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn random_ops_match_model() {
    for seed in 0..6 {
        run_random_ops(seed, 16, 24, 400);
        run_random_ops(100 + seed, 1, 200, 300);
        run_random_ops(200 + seed, 3, 60, 400);
    }
}

/// A cache "on a device" (here the CPU device, in f32) behaves exactly like the host cache:
/// writes across block boundaries, fork, copy-on-write of the shared partial block, truncate.
#[test]
fn device_store_matches_host_store() {
    use candle_core::{DType, Device, Tensor};
    let cfg = KvCacheConfig { num_layers: 2, num_kv_heads: 2, head_dim: 4, block_size: 4, num_blocks: 16 };
    let mut host = PagedKvCache::new(cfg.clone()).unwrap();
    let mut dev = PagedKvCache::new_on_device(cfg, &Device::Cpu, DType::F32).unwrap();
    assert!(dev.is_on_device() && !host.is_on_device());
    let rows = |n: usize, seed: f32| -> Vec<f32> { (0..n * 8).map(|i| seed + i as f32 * 0.5).collect() };
    let write = |c: &mut PagedKvCache, s: SeqId, n: usize, seed: f32| {
        c.reserve(s, n).unwrap();
        for layer in 0..2 {
            let k = Tensor::from_vec(rows(n, seed + layer as f32), (n, 2, 4), &Device::Cpu).unwrap();
            let v = (k.clone() * -1.0).unwrap();
            c.write_tensor(s, layer, &k, &v).unwrap();
        }
        c.commit(s, n).unwrap();
    };
    let (a, b) = (host.add_sequence(), dev.add_sequence());
    write(&mut host, a, 6, 1.0);
    write(&mut dev, b, 6, 1.0);
    let (fa, fb) = (host.fork(a).unwrap(), dev.fork(b).unwrap());
    write(&mut host, fa, 3, 100.0);
    write(&mut dev, fb, 3, 100.0);
    write(&mut host, a, 1, 7.0);
    write(&mut dev, b, 1, 7.0);
    for (x, y) in [(a, b), (fa, fb)] {
        let n = host.len(x).unwrap();
        assert_eq!(n, dev.len(y).unwrap());
        for layer in 0..2 {
            assert_eq!(host.gather_layer(x, layer, n).unwrap(), dev.gather_layer(y, layer, n).unwrap());
        }
    }
    assert_eq!(host.used_blocks(), dev.used_blocks());
    assert_eq!(host.bytes_in_use(), dev.bytes_in_use());
    let cfg = KvCacheConfig { num_layers: 2, num_kv_heads: 2, head_dim: 4, block_size: 4, num_blocks: 2 };
    let half = PagedKvCache::new_on_device(cfg.clone(), &Device::Cpu, DType::BF16).unwrap();
    assert_eq!(half.block_bytes() * 2, cfg.block_bytes());
    // The device cache refuses the host views and the host cache the device views.
    assert!(dev.layer_view(b, 0, 2).is_err());
    assert!(host.device_layer(a, 0, 2).is_err());
    let view = dev.device_layer(b, 1, 7).unwrap();
    assert_eq!(view.block_table.len(), 2);
    // The uploaded block table follows the host table through copy-on-write and truncate.
    let uploaded = |c: &PagedKvCache, s: SeqId| -> Vec<u32> {
        let n = c.len(s).unwrap();
        c.device_layer(s, 0, n).unwrap().device_table.expect("uploaded by write_tensor").to_vec1().unwrap()
    };
    for s in [b, fb] {
        assert_eq!(uploaded(&dev, s), dev.block_table(s).unwrap());
    }
    dev.truncate(fb, 2).unwrap();
    assert!(dev.device_layer(fb, 0, 2).unwrap().device_table.is_none(), "stale after truncate");
    write(&mut dev, fb, 5, 9.0); // through the shared first block: copy-on-write
    assert_eq!(uploaded(&dev, fb), dev.block_table(fb).unwrap());
    assert_ne!(dev.block_table(fb).unwrap()[0], dev.block_table(b).unwrap()[0]);
}

/// A batch of sequences written with one scatter per layer (`pending_rows` + `write_rows`) holds
/// exactly what per-sequence `write_tensor` calls write, at awkward lengths (a block boundary
/// crossed, a forked partial block copied on write); bad batches are refused.
#[test]
fn batched_row_writes_match_per_sequence_writes() {
    use candle_core::{DType, Device, Tensor};
    let cfg = KvCacheConfig { num_layers: 2, num_kv_heads: 2, head_dim: 4, block_size: 4, num_blocks: 32 };
    let mut one = PagedKvCache::new_on_device(cfg.clone(), &Device::Cpu, DType::F32).unwrap();
    let mut many = PagedKvCache::new_on_device(cfg.clone(), &Device::Cpu, DType::F32).unwrap();
    let rows = |n: usize, seed: f32| -> Tensor {
        Tensor::from_vec(
            (0..n * 8).map(|i| seed + i as f32 * 0.25).collect::<Vec<f32>>(),
            (n, 2, 4),
            &Device::Cpu,
        )
        .unwrap()
    };
    // Three sequences: prefixes of 3, 7 and 1 tokens, the third a fork of the first.
    let mut seqs = Vec::new();
    for c in [&mut one, &mut many] {
        let (a, b) = (c.add_sequence(), c.add_sequence());
        for (s, n, seed) in [(a, 3, 1.0), (b, 7, 50.0)] {
            c.reserve(s, n).unwrap();
            for layer in 0..2 {
                let k = rows(n, seed + layer as f32);
                c.write_tensor(s, layer, &k, &(&k * -1.0).unwrap()).unwrap();
            }
            c.commit(s, n).unwrap();
        }
        let f = c.fork(a).unwrap();
        seqs.push([a, b, f]);
    }
    // Steps of (1, 1, 1) then (2, 1, 3) new tokens.
    for (step, counts) in [[1usize, 1, 1], [2, 1, 3]].iter().enumerate() {
        let total: usize = counts.iter().sum();
        for (c, s) in [(&mut one, seqs[0]), (&mut many, seqs[1])] {
            for (&x, &n) in s.iter().zip(counts) {
                c.reserve(x, n).unwrap();
            }
        }
        let pending: Vec<(SeqId, usize)> = seqs[1].iter().copied().zip(counts.iter().copied()).collect();
        let idx = many.pending_rows(&pending).unwrap();
        assert_eq!(idx.dims(), &[total, 2, 4]);
        for layer in 0..2 {
            let k = rows(total, 1000.0 * (step + 1) as f32 + layer as f32);
            let v = (&k * 3.0).unwrap();
            many.write_rows(layer, &idx, &k, &v).unwrap();
            let mut off = 0;
            for (&x, &n) in seqs[0].iter().zip(counts) {
                one.write_tensor(x, layer, &k.narrow(0, off, n).unwrap(), &v.narrow(0, off, n).unwrap())
                    .unwrap();
                off += n;
            }
        }
        for (c, s) in [(&mut one, seqs[0]), (&mut many, seqs[1])] {
            for (&x, &n) in s.iter().zip(counts) {
                c.commit(x, n).unwrap();
            }
        }
    }
    for (&x, &y) in seqs[0].iter().zip(&seqs[1]) {
        let n = one.len(x).unwrap();
        assert_eq!(n, many.len(y).unwrap());
        for layer in 0..2 {
            assert_eq!(one.gather_layer(x, layer, n).unwrap(), many.gather_layer(y, layer, n).unwrap());
        }
        let view = many.device_layer(y, 0, n).unwrap();
        let table: Vec<u32> = view.device_table.expect("uploaded by pending_rows").to_vec1().unwrap();
        assert_eq!(table, many.block_table(y).unwrap());
    }
    // Refusals: a sequence twice, past the reservation, a host cache, shapes that do not match.
    let [a, b, _] = seqs[1];
    many.reserve(a, 1).unwrap();
    assert!(matches!(many.pending_rows(&[(a, 1), (a, 1)]), Err(Error::InvalidArgument { .. })));
    assert!(matches!(many.pending_rows(&[(a, 1), (b, 1)]), Err(Error::InvalidArgument { .. })));
    let idx = many.pending_rows(&[(a, 1)]).unwrap();
    assert!(many.write_rows(0, &idx, &rows(2, 0.0), &rows(2, 0.0)).is_err());
    assert!(many.write_rows(2, &idx, &rows(1, 0.0), &rows(1, 0.0)).is_err());
    let mut host = PagedKvCache::new(cfg).unwrap();
    let h = host.add_sequence();
    host.reserve(h, 1).unwrap();
    assert!(matches!(host.pending_rows(&[(h, 1)]), Err(Error::InvalidArgument { .. })));
}

/// The decode batch tables: row b holds sequence b's blocks for its length (padded with block
/// 0), the lengths alongside; bad lengths, unknown sequences and host caches are refused.
#[test]
fn device_batch_tables_list_each_sequences_blocks() {
    use candle_core::{DType, Device};
    let cfg = KvCacheConfig { num_layers: 2, num_kv_heads: 1, head_dim: 4, block_size: 4, num_blocks: 16 };
    let mut c = PagedKvCache::new_on_device(cfg.clone(), &Device::Cpu, DType::F32).unwrap();
    let (a, b) = (c.add_sequence(), c.add_sequence());
    // Interleaved reservations, so that the two sequences' blocks interleave in the pool.
    for _ in 0..3 {
        c.reserve(a, 3).unwrap();
        c.commit(a, 3).unwrap();
        c.reserve(b, 1).unwrap();
        c.commit(b, 1).unwrap();
    }
    let (ta, tb) = (
        c.device_layer(a, 0, 9).unwrap().block_table.to_vec(),
        c.device_layer(b, 0, 3).unwrap().block_table.to_vec(),
    );
    assert_eq!((ta.len(), tb.len()), (3, 1));
    let (tables, lens) = c.device_batch_tables(&[(b, 3), (a, 9)]).unwrap();
    assert_eq!(tables.dims(), &[2, 3]);
    assert_eq!(tables.to_vec2::<u32>().unwrap(), vec![vec![tb[0], 0, 0], ta.clone()]);
    assert_eq!(lens.to_vec1::<u32>().unwrap(), vec![3, 9]);
    assert!(c.device_pools(1).is_some() && c.device_pools(2).is_none());
    assert!(c.device_batch_tables(&[(a, 0)]).is_err(), "a length of 0");
    assert!(c.device_batch_tables(&[(a, 10)]).is_err(), "past the reservation");
    assert!(matches!(c.device_batch_tables(&[(SeqId(99), 1)]), Err(Error::UnknownSequence(99))));
    let host = PagedKvCache::new(cfg).unwrap();
    assert!(host.device_batch_tables(&[]).is_err() && host.device_pools(0).is_none());
}
