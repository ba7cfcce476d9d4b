//! The paged ops equal the contiguous ones on the same tokens, whatever the block order.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, paginate, qkv};
use hip_kernels::{
    block_sparse_attn_paged, dense_attn, dense_attn_paged, hip_attn, hip_attn_decode, hip_attn_decode_paged,
    hip_attn_paged, hip_mask, hip_mask_paged, Error, HipConfig, MaskCache, PagedKv,
};

#[test]
fn paged_ops_equal_contiguous_ops() {
    let cfg =
        HipConfig::paper().with_k(16).with_query_block(8, 2).with_key_block(2, 1).with_sink_window(4, 8);
    for &(t_q, t_k, hq, hkv, d, bs) in &[
        (1usize, 1usize, 1usize, 1usize, 64usize, 1usize),
        (7, 7, 2, 1, 64, 16),
        (97, 97, 7, 1, 128, 16),
        (1, 1000, 4, 2, 64, 7),
        (54, 300, 4, 2, 64, 32),
    ] {
        let (q, k, v) = qkv(t_k as u64, 1, t_q, t_k, hq, hkv, d, DType::F32);
        let (kp, vp, table) = paginate(&k, &v, bs, 9);
        let kv = PagedKv {
            k: &kp,
            v: &vp,
            block_table: &table,
            block_size: bs,
            heads_kv: hkv,
            head_dim: d,
            len: t_k,
        };
        let scale = 0.1;
        let err =
            max_abs_diff(&dense_attn_paged(&q, &kv, scale).unwrap(), &dense_attn(&q, &k, &v, scale).unwrap());
        assert!(err == 0.0, "dense T={t_k} bs={bs}: {err}");
        let mask = hip_mask(&q, &k, &cfg, scale).unwrap();
        assert_eq!(hip_mask_paged(&q, &kv, &cfg, scale).unwrap(), mask);
        for cfg in [cfg.clone(), cfg.clone().with_prefill_tail(5, 1), cfg.clone().with_prefill_tail(200, 4)] {
            let err = max_abs_diff(
                &hip_attn_paged(&q, &kv, &cfg, scale).unwrap(),
                &hip_attn(&q, &k, &v, &cfg, scale).unwrap(),
            );
            assert!(err == 0.0, "hip T={t_k} bs={bs} tail {}: {err}", cfg.tail_queries);
        }
        let err = max_abs_diff(
            &block_sparse_attn_paged(&q, &kv, &mask, scale, 3).unwrap(),
            &hip_kernels::block_sparse_attn(&q, &k, &v, &mask, scale, 3).unwrap(),
        );
        assert!(err == 0.0, "bsa T={t_k} bs={bs}: {err}");
        let (mut c1, mut c2) = (MaskCache::new(), MaskCache::new());
        let q1 = q.narrow(1, t_q - 1, 1).unwrap();
        for _ in 0..3 {
            let a = hip_attn_decode_paged(&q1, &kv, &cfg, scale, &mut c1).unwrap();
            let b = hip_attn_decode(&q1, &k, &v, &cfg, scale, &mut c2).unwrap();
            assert_eq!(max_abs_diff(&a, &b), 0.0);
        }
    }
}

#[test]
fn bad_paged_views_are_errors() {
    let (q, k, v) = qkv(1, 1, 4, 40, 2, 1, 64, DType::F32);
    let (kp, vp, table) = paginate(&k, &v, 16, 1);
    let ok =
        PagedKv { k: &kp, v: &vp, block_table: &table, block_size: 16, heads_kv: 1, head_dim: 64, len: 40 };
    dense_attn_paged(&q, &ok, 1.0).unwrap();
    let short_table = PagedKv { block_table: &table[..2], ..ok };
    assert!(matches!(
        dense_attn_paged(&q, &short_table, 1.0),
        Err(Error::InvalidArgument { name: "block_table", .. })
    ));
    let bad_index = [0u32, 1, 99];
    let oob = PagedKv { block_table: &bad_index, ..ok };
    assert!(matches!(
        dense_attn_paged(&q, &oob, 1.0),
        Err(Error::InvalidArgument { name: "block_table", .. })
    ));
    let ragged = PagedKv { v: &vp[..vp.len() - 1], ..ok };
    assert!(matches!(dense_attn_paged(&q, &ragged, 1.0), Err(Error::InvalidArgument { .. })));
    let zero = PagedKv { block_size: 0, ..ok };
    assert!(matches!(dense_attn_paged(&q, &zero, 1.0), Err(Error::InvalidArgument { .. })));
    let q_wrong = Tensor::zeros((1, 4, 3, 64), DType::F32, &Device::Cpu).unwrap();
    let two_kv = PagedKv { heads_kv: 2, head_dim: 32, ..ok };
    assert!(matches!(dense_attn_paged(&q_wrong, &two_kv, 1.0), Err(Error::Shape { name: "q", .. })));
    let too_many_q = Tensor::zeros((1, 41, 2, 64), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(dense_attn_paged(&too_many_q, &ok, 1.0), Err(Error::Shape { name: "q", .. })));
}
