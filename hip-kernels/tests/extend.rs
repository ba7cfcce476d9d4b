//! Dynamic RoPE (hip_kernels::extend) against its f64 reference and against dense attention with
//! true positions, over paged caches of un-rotated keys.

mod common;

use candle_core::DType;
use common::{max_abs_diff, paginate, qkv};
use hip_kernels::{
    block_sparse_attn_extend_paged, dense_attn, hip_attn_extend_decode_paged, hip_attn_extend_paged,
    hip_mask_extend_paged, reference, HipConfig, HipMask, MaskCache, PagedKv, Rope, RopeExtend,
};

fn small_cfg() -> HipConfig {
    HipConfig::paper()
        .with_k(16)
        .with_query_block(8, 2)
        .with_key_block(2, 1)
        .with_sink_window(4, 8)
        .with_rope_extend(RopeExtend::default())
}

/// The tiled attention equals the reference at awkward sizes, with and without a decode
/// widening, both RoPE pairings, GQA, shuffled pages.
#[test]
fn tiled_attention_matches_reference() {
    let cases = [(1usize, 1usize, 0usize), (7, 7, 0), (3, 97, 5), (97, 97, 0), (1, 300, 17), (7, 4099, 0)];
    for (n, &(t_q, t_k, extra)) in cases.iter().enumerate() {
        let (hq, hkv, d) = (4, 2, 8);
        let (q, k, v) = qkv(40 + n as u64, 1, t_q, t_k, hq, hkv, d, DType::F32);
        let (kp, vp, table) = paginate(&k, &v, 16, n as u64);
        let kv = PagedKv {
            k: &kp,
            v: &vp,
            block_table: &table,
            block_size: 16,
            heads_kv: hkv,
            head_dim: d,
            len: t_k,
        };
        let rope = Rope::new(d, 1000.0, n % 2 == 1).unwrap();
        let cfg = small_cfg();
        let scale = 0.35;
        let mask = hip_mask_extend_paged(&q, &kv, &cfg, &rope, scale).unwrap();
        let fast = block_sparse_attn_extend_paged(&q, &kv, &mask, scale, extra, &rope).unwrap();
        let slow = reference::block_sparse_attn_extend(&q, &k, &v, &mask, scale, extra, &rope).unwrap();
        let err = max_abs_diff(&fast, &slow);
        assert!(err < 1e-4, "t_q {t_q} t_k {t_k} extra {extra}: max err {err}");
    }
}

/// When the budget covers the whole context every key is attended at its true position, so HiP
/// with Dynamic RoPE is dense attention over rotated queries and keys (prefill tail included).
#[test]
fn full_budget_is_dense_attention_at_true_positions() {
    for (t_q, t_k) in [(1usize, 1usize), (7, 7), (97, 97), (40, 130)] {
        let (hq, hkv, d) = (4, 1, 16);
        let (q, k, v) = qkv(7 + t_k as u64, 1, t_q, t_k, hq, hkv, d, DType::F32);
        let (kp, vp, table) = paginate(&k, &v, 8, 3);
        let kv = PagedKv {
            k: &kp,
            v: &vp,
            block_table: &table,
            block_size: 8,
            heads_kv: hkv,
            head_dim: d,
            len: t_k,
        };
        let rope = Rope::new(d, 10_000.0, false).unwrap();
        let cfg = HipConfig::default()
            .with_k(256)
            .with_sink_window(4, 8)
            .with_query_block(16, 2)
            .with_rope_extend(RopeExtend::default());
        let got = hip_attn_extend_paged(&q, &kv, &cfg, &rope, 0.25).unwrap();
        let qpos: Vec<usize> = (t_k - t_q..t_k).collect();
        let kpos: Vec<usize> = (0..t_k).collect();
        let want =
            dense_attn(&rope.rotate(&q, &qpos).unwrap(), &rope.rotate(&k, &kpos).unwrap(), &v, 0.25).unwrap();
        let err = max_abs_diff(&got, &want);
        assert!(err < 1e-4, "t_q {t_q} t_k {t_k}: max err {err}");
    }
}

/// Positions stay small however long the context: keys between the attended ones change
/// nothing. A query attending sink + 8 selected blocks + window over 28 tokens gives the output
/// it gives when 2500 unattended keys are inserted around those blocks.
#[test]
fn unattended_keys_do_not_shift_positions() {
    let (hq, hkv, d) = (2, 1, 8);
    let rope = Rope::new(d, 10_000.0, false).unwrap();
    let (sink, mid, win, junk1, junk2) = (4usize, 16usize, 8usize, 2000usize, 500usize);
    let (q, k, v) = qkv(5, 1, 1, sink + mid + win, hq, hkv, d, DType::F32);
    let (_, kj, vj) = qkv(9, 1, 1, junk1 + junk2, hq, hkv, d, DType::F32);
    let part = |t: &candle_core::Tensor, a: usize, n: usize| t.narrow(1, a, n).unwrap();
    let long = |x: &candle_core::Tensor, j: &candle_core::Tensor| {
        candle_core::Tensor::cat(
            &[
                part(x, 0, sink),
                part(j, 0, junk1),
                part(x, sink, mid),
                part(j, junk1, junk2),
                part(x, sink + mid, win),
            ],
            1,
        )
        .unwrap()
    };
    let (kl, vl) = (long(&k, &kj), long(&v, &vj));
    let mask_at = |first: usize, t_k: usize| HipMask {
        batch: 1,
        heads: hq,
        n_qblocks: 1,
        max_blocks: mid / 2,
        block_size_q: 64,
        block_size_k: 2,
        sink_tokens: sink,
        window_tokens: win,
        t_k,
        block_starts: (0..hq).flat_map(|_| (0..mid / 2).map(move |b| (first + 2 * b) as u32)).collect(),
        counts: vec![(mid / 2) as u32; hq],
    };
    let run = |k: &candle_core::Tensor, v: &candle_core::Tensor, mask: &HipMask| {
        let t = k.dim(1).unwrap();
        let (kp, vp, table) = paginate(k, v, 32, 1);
        let kv = PagedKv {
            k: &kp,
            v: &vp,
            block_table: &table,
            block_size: 32,
            heads_kv: hkv,
            head_dim: d,
            len: t,
        };
        block_sparse_attn_extend_paged(&q, &kv, mask, 0.3, 0, &rope).unwrap()
    };
    let short = run(&k, &v, &mask_at(sink, sink + mid + win));
    let far = run(&kl, &vl, &mask_at(sink + junk1, kl.dim(1).unwrap()));
    assert!(max_abs_diff(&short, &far) < 1e-5, "{}", max_abs_diff(&short, &far));
    // Without the extension the inserted distance would change the scores.
    let shifted = mask_at(sink + junk1, kl.dim(1).unwrap());
    let plain = reference::block_sparse_attn(
        &rope.rotate(&q, &[kl.dim(1).unwrap() - 1]).unwrap(),
        &rope.rotate(&kl, &(0..kl.dim(1).unwrap()).collect::<Vec<_>>()).unwrap(),
        &vl,
        &shifted,
        0.3,
        0,
    )
    .unwrap();
    assert!(max_abs_diff(&short, &plain) > 1e-3);
}

/// Decode steps with the mask cache equal explicit mask + attention calls, the cached mask's
/// window widened by the tokens appended since it was estimated.
#[test]
fn decode_reuses_the_mask_with_a_widened_window() {
    let (hq, hkv, d, t) = (4, 2, 8, 260);
    let rope = Rope::new(d, 500.0, false).unwrap();
    let cfg = small_cfg().with_refresh_interval(3);
    let (qs, k, v) = qkv(11, 1, 8, t, hq, hkv, d, DType::F32);
    let (kp, vp, table) = paginate(&k, &v, 16, 2);
    let mut cache = MaskCache::new();
    let mut estimated = None;
    for step in 0..6 {
        let len = t - 6 + step + 1;
        let kv =
            PagedKv { k: &kp, v: &vp, block_table: &table, block_size: 16, heads_kv: hkv, head_dim: d, len };
        let q = qs.narrow(1, step, 1).unwrap();
        let got = hip_attn_extend_decode_paged(&q, &kv, &cfg, &rope, 0.3, &mut cache).unwrap();
        if step % 3 == 0 {
            estimated = Some((hip_mask_extend_paged(&q, &kv, &cfg, &rope, 0.3).unwrap(), len));
        }
        let (mask, at) = estimated.as_ref().unwrap();
        let want = block_sparse_attn_extend_paged(&q, &kv, mask, 0.3, len - at, &rope).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-6, "step {step}");
    }
    assert_eq!(cache.refreshes(), 2);
}

/// A rope of another head dim and an invalid dense-layer k are refused before any work.
#[test]
fn bad_input_is_refused() {
    let (q, k, v) = qkv(1, 1, 2, 20, 2, 1, 8, DType::F32);
    let (kp, vp, table) = paginate(&k, &v, 4, 0);
    let kv =
        PagedKv { k: &kp, v: &vp, block_table: &table, block_size: 4, heads_kv: 1, head_dim: 8, len: 20 };
    let wrong = Rope::new(16, 1e4, false).unwrap();
    assert!(hip_attn_extend_paged(&q, &kv, &small_cfg(), &wrong, 0.3).is_err());
    let rope = Rope::new(8, 1e4, false).unwrap();
    let bad = small_cfg().with_rope_extend(RopeExtend { dense_layer_k: 0 });
    assert!(hip_attn_extend_paged(&q, &kv, &bad, &rope, 0.3).is_err());
    // A hand-made mask with a zero block size is an error, not a division by zero.
    let mut mask = hip_mask_extend_paged(&q, &kv, &small_cfg(), &rope, 0.3).unwrap();
    mask.block_size_q = 0;
    mask.n_qblocks = 2;
    mask.counts = vec![0; 4];
    mask.block_starts = vec![0; 4 * mask.max_blocks];
    assert!(block_sparse_attn_extend_paged(&q, &kv, &mask, 0.3, 0, &rope).is_err());
}
