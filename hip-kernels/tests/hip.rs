//! HiP mask estimation, block-sparse attention and decode against the f64 references.

mod common;

use candle_core::DType;
use common::{max_abs_diff, qkv};
use hip_kernels::{
    block_sparse_attn, dense_attn, hip_attn, hip_attn_decode, hip_mask, reference, HipConfig, HipMask,
    MaskCache,
};

/// A small config so that short contexts already need the tree search.
fn small_cfg() -> HipConfig {
    HipConfig::paper().with_k(16).with_query_block(8, 2).with_key_block(2, 1).with_sink_window(4, 8)
}

/// Rows of two masks that select different blocks. f32 (fast) and f64 (reference) scores can
/// order near-ties differently, so a handful of rows may differ; anything more is a bug.
fn differing_rows(a: &HipMask, b: &HipMask) -> usize {
    assert_eq!(a.counts.len(), b.counts.len());
    let mut n = 0;
    for bb in 0..a.batch {
        for h in 0..a.heads {
            for m in 0..a.n_qblocks {
                if a.blocks(bb, h, m) != b.blocks(bb, h, m) {
                    n += 1;
                }
            }
        }
    }
    n
}

fn check_mask_and_bsa(seed: u64, t_q: usize, t_k: usize, hq: usize, hkv: usize, d: usize, cfg: &HipConfig) {
    let (q, k, v) = qkv(seed, 1, t_q, t_k, hq, hkv, d, DType::F32);
    let scale = 1.0 / (d as f32).sqrt();
    let fast = hip_mask(&q, &k, cfg, scale).unwrap();
    let slow = reference::hip_mask(&q, &k, cfg, scale).unwrap();
    let rows = fast.counts.len();
    let diff = differing_rows(&fast, &slow);
    assert!(
        diff * 100 <= rows,
        "T={t_k} hq={hq} d={d}: {diff} of {rows} mask rows differ from the reference"
    );
    for bb in 0..fast.batch {
        for h in 0..fast.heads {
            for m in 0..fast.n_qblocks {
                let blocks = fast.blocks(bb, h, m);
                assert!(blocks.len() <= fast.max_blocks);
                assert!(blocks.windows(2).all(|w| w[0] < w[1]), "blocks sorted and distinct");
                assert!(blocks.iter().all(|&s| s as usize >= cfg.sink_tokens && (s as usize) < t_k));
            }
        }
    }
    let out = block_sparse_attn(&q, &k, &v, &fast, scale, 0).unwrap();
    let want = reference::block_sparse_attn(&q, &k, &v, &fast, scale, 0).unwrap();
    let err = max_abs_diff(&out, &want);
    assert!(err <= 1e-5, "T={t_k} hq={hq} d={d}: block-sparse max abs err {err}");
}

#[test]
fn mask_and_block_sparse_match_reference_at_awkward_sizes() {
    let cfg = small_cfg();
    let mut seed = 100;
    for &t in &[1usize, 7, 54, 97, 1000] {
        for &(hq, hkv) in &[(1usize, 1usize), (2, 1), (7, 1)] {
            for &d in &[64usize, 128] {
                seed += 10;
                check_mask_and_bsa(seed, t, t, hq, hkv, d, &cfg);
            }
        }
    }
}

#[test]
fn paper_config_at_4099() {
    check_mask_and_bsa(7, 4099, 4099, 2, 1, 128, &HipConfig::paper());
}

#[test]
fn query_offset_and_other_configs() {
    // Queries are the last 97 of 1000 positions; odd block sizes and strides.
    let cfg =
        HipConfig::paper().with_k(24).with_query_block(12, 3).with_key_block(4, 2).with_sink_window(3, 5);
    check_mask_and_bsa(1, 97, 1000, 4, 2, 64, &cfg);
    // No sink, no window.
    let cfg = HipConfig::paper().with_k(8).with_query_block(4, 1).with_key_block(1, 1).with_sink_window(0, 0);
    check_mask_and_bsa(2, 54, 54, 2, 2, 64, &cfg);
    // Window shorter than the query block: blocks may reach past early queries (causal inside blocks).
    let cfg =
        HipConfig::paper().with_k(32).with_query_block(16, 1).with_key_block(8, 1).with_sink_window(2, 3);
    check_mask_and_bsa(3, 200, 200, 2, 1, 64, &cfg);
}

#[test]
fn hip_with_k_covering_the_context_equals_dense() {
    for &(t, hq, hkv, d) in
        &[(1usize, 1usize, 1usize, 64usize), (7, 2, 1, 64), (97, 7, 1, 128), (1000, 4, 2, 64)]
    {
        let (q, k, v) = qkv(t as u64, 1, t, t, hq, hkv, d, DType::F32);
        let scale = 1.0 / (d as f32).sqrt();
        let cfg = HipConfig::paper().with_k(t.div_ceil(2) * 2 + 2);
        let hip = hip_attn(&q, &k, &v, &cfg, scale).unwrap();
        let dense = dense_attn(&q, &k, &v, scale).unwrap();
        let err = max_abs_diff(&hip, &dense);
        assert!(err <= 1e-5, "T={t}: max abs err {err}");
    }
    // The paper config at 4099 tokens with k = 4096 (the search range is T - sink - window).
    let (q, k, v) = qkv(9, 1, 4099, 4099, 2, 1, 128, DType::F32);
    let cfg = HipConfig::paper().with_k(4096);
    let err =
        max_abs_diff(&hip_attn(&q, &k, &v, &cfg, 0.088).unwrap(), &dense_attn(&q, &k, &v, 0.088).unwrap());
    assert!(err <= 1e-5, "T=4099: max abs err {err}");
}

#[test]
fn half_precision_inputs() {
    for dtype in [DType::F16, DType::BF16] {
        let (q, k, v) = qkv(5, 1, 97, 97, 4, 2, 64, dtype);
        let cfg = small_cfg();
        let mask = hip_mask(&q, &k, &cfg, 0.125).unwrap();
        let out = block_sparse_attn(&q, &k, &v, &mask, 0.125, 0).unwrap();
        assert_eq!(out.dtype(), dtype);
        let want = reference::block_sparse_attn(&q, &k, &v, &mask, 0.125, 0).unwrap();
        let err = max_abs_diff(&out, &want);
        assert!(err <= 1e-2, "{dtype:?}: max abs err {err}");
    }
}

#[test]
fn decode_reuses_the_mask_between_refreshes() {
    let (hq, hkv, d, t0, steps) = (4, 2, 64, 300, 11);
    let cfg = small_cfg().with_refresh_interval(4);
    let (_, k_all, v_all) = qkv(31, 1, 1, t0 + steps, hq, hkv, d, DType::F32);
    let q_all = common::randn(77, (1, steps, hq, d), DType::F32);
    let mut cache = MaskCache::new();
    let mut mask_at_refresh: Option<HipMask> = None;
    for s in 0..steps {
        let t = t0 + s + 1;
        let q = q_all.narrow(1, s, 1).unwrap();
        let k = k_all.narrow(1, 0, t).unwrap();
        let v = v_all.narrow(1, 0, t).unwrap();
        let out = hip_attn_decode(&q, &k, &v, &cfg, 0.125, &mut cache).unwrap();
        if s % 4 == 0 {
            let fresh = hip_mask(&q, &k, &cfg, 0.125).unwrap();
            assert_eq!(cache.mask(), Some(&fresh), "step {s}: mask refreshed");
            mask_at_refresh = Some(fresh);
        }
        let mask = mask_at_refresh.as_ref().unwrap();
        assert_eq!(cache.mask(), Some(mask), "step {s}: cached mask reused");
        let extra = t - mask.t_k;
        let want = reference::block_sparse_attn(&q, &k, &v, mask, 0.125, extra).unwrap();
        let err = max_abs_diff(&out, &want);
        assert!(err <= 1e-5, "step {s}: max abs err {err}");
    }
    assert_eq!(cache.refreshes(), 3);
    // A shape change (two query blocks instead of one) forces a refresh.
    let q2 = q_all.narrow(1, 0, 9).unwrap();
    hip_attn_decode(&q2, &k_all, &v_all, &cfg, 0.125, &mut cache).unwrap();
    assert_eq!(cache.refreshes(), 4);
}

/// The strided queries that score a block are counted back from its last query, so the newest
/// query of a block (in a prefill, the one whose logits are sampled) always takes part: here only
/// the last query of the last block looks for the keys of tokens 20..40, and its row of the mask
/// must find them. (Counting from the first query, with stride 2, it would never be scored and
/// the row would get the earliest blocks on ties.)
#[test]
fn the_last_query_of_a_block_always_scores() {
    use candle_core::{Device, Tensor};
    let (t, d) = (64usize, 16usize);
    let cfg = small_cfg(); // query blocks 8 / stride 2, k 16 in blocks of 2, sink 4, window 8
    let u: Vec<f32> = (0..d).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
    let noise = common::randn(7, (1, t, 1, d), DType::F32).flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut kd = vec![0f32; t * d];
    for j in 0..t {
        for i in 0..d {
            let signal = if (20..40).contains(&j) { 3.0 * u[i] } else { 0.0 };
            kd[j * d + i] = signal + 0.1 * noise[j * d + i];
        }
    }
    let mut qd = vec![0f32; t * d];
    for i in 0..d {
        qd[(t - 1) * d + i] = 2.0 * u[i];
    }
    let q = Tensor::from_vec(qd, (1, t, 1, d), &Device::Cpu).unwrap();
    let k = Tensor::from_vec(kd, (1, t, 1, d), &Device::Cpu).unwrap();
    for mask in [hip_mask(&q, &k, &cfg, 0.25).unwrap(), reference::hip_mask(&q, &k, &cfg, 0.25).unwrap()] {
        let last = mask.blocks(0, 0, mask.n_qblocks - 1);
        let found = last.iter().filter(|&&s| (20..40).contains(&s)).count();
        assert!(found >= 4, "the last query's row selects {found} blocks of 20..40: {last:?}");
    }
}

/// A prefill with a tail is the head queries' HiP attention over the context without the tail's
/// tokens, then the tail queries' over the whole context with the tail's query blocks (stride 1),
/// each part checked against the f64 references, at awkward sizes.
#[test]
fn prefill_tail_is_head_then_tail_with_its_own_blocks() {
    for &(t_q, t_k, tail, tail_bq) in
        &[(1usize, 1usize, 4usize, 1usize), (7, 7, 4, 1), (7, 97, 7, 2), (97, 97, 5, 1), (97, 1000, 16, 4)]
    {
        let cfg = small_cfg().with_prefill_tail(tail, tail_bq);
        let (q, k, v) = qkv((t_q * 31 + t_k) as u64, 1, t_q, t_k, 4, 2, 64, DType::F32);
        let scale = 0.125;
        let got = hip_attn(&q, &k, &v, &cfg, scale).unwrap();
        assert_eq!(got.dims(), q.dims());
        let tail = tail.min(t_q);
        let head = t_q - tail;
        let tail_cfg = cfg.clone().with_query_block(tail_bq, 1);
        let part = |q: &candle_core::Tensor, t: usize, cfg: &HipConfig| {
            let (k, v) = (k.narrow(1, 0, t).unwrap(), v.narrow(1, 0, t).unwrap());
            let mask = reference::hip_mask(q, &k, cfg, scale).unwrap();
            reference::block_sparse_attn(q, &k, &v, &mask, scale, 0).unwrap()
        };
        let mut want = Vec::new();
        if head > 0 {
            want.push(part(&q.narrow(1, 0, head).unwrap(), t_k - tail, &cfg));
        }
        want.push(part(&q.narrow(1, head, tail).unwrap(), t_k, &tail_cfg));
        let want = candle_core::Tensor::cat(&want, 1).unwrap();
        let err = max_abs_diff(&got, &want);
        assert!(err <= 1e-4, "t_q {t_q} t_k {t_k} tail {tail}/{tail_bq}: max abs err {err}");
    }
}

/// Why the tail exists: in a 64-query block the first 63 queries look for one region of keys
/// (more blocks than the budget) and the last query for another, key `x`. The block's shared
/// mask is filled by the majority and the last query does not get `x` (its output stays far
/// from `x`'s value); with a tail the last query's own search finds `x` and its output is
/// `x`'s value.
#[test]
fn tail_queries_get_masks_of_their_own() {
    use candle_core::{Device, Tensor};
    let (t_q, t_k, d) = (64usize, 128usize, 16usize);
    let cfg = small_cfg().with_query_block(64, 1); // one query block; k 16 = 8 key blocks of 2
    let axis = |i: usize| (0..d).map(move |j| if j == i { 1.0f32 } else { 0.0 });
    let noise =
        common::randn(11, (1, t_k, 1, d), DType::F32).flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut kd = vec![0f32; t_k * d];
    let mut vd = vec![0f32; t_k * d];
    for j in 0..t_k {
        let signal: Vec<f32> = if (4..36).contains(&j) {
            axis(0).map(|x| 4.0 * x).collect() // 16 blocks the majority wants
        } else if (40..42).contains(&j) {
            axis(1).map(|x| 4.0 * x).collect() // key x, wanted by the last query only
        } else {
            vec![0.0; d]
        };
        for i in 0..d {
            kd[j * d + i] = signal[i] + 0.05 * noise[j * d + i];
            vd[j * d + i] = if (40..42).contains(&j) && i == 2 { 1.0 } else { 0.0 };
        }
    }
    let mut qd = vec![0f32; t_q * d];
    for i in 0..t_q {
        let dir = if i + 1 == t_q { 1 } else { 0 };
        qd[i * d + dir] = if i + 1 == t_q { 2.0 } else { 3.0 };
    }
    let q = Tensor::from_vec(qd, (1, t_q, 1, d), &Device::Cpu).unwrap();
    let k = Tensor::from_vec(kd, (1, t_k, 1, d), &Device::Cpu).unwrap();
    let v = Tensor::from_vec(vd, (1, t_k, 1, d), &Device::Cpu).unwrap();
    let last_x = |cfg: &HipConfig| {
        let out = hip_attn(&q, &k, &v, cfg, 1.0).unwrap();
        out.narrow(1, t_q - 1, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()[2]
    };
    let shared = last_x(&cfg);
    let own = last_x(&cfg.clone().with_prefill_tail(4, 1));
    let dense = dense_attn(&q, &k, &v, 1.0)
        .unwrap()
        .narrow(1, t_q - 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[2];
    assert!(dense > 0.9, "dense attends x: {dense}");
    assert!(own > 0.9, "with a tail the last query attends x: {own}");
    assert!(shared < 0.1, "without a tail the block's mask leaves x out: {shared}");
}
