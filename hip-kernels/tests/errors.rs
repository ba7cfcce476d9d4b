//! Bad configs and mismatched shapes give typed errors, never panics.

mod common;

use candle_core::{DType, Device, Tensor};
use common::qkv;
use hip_kernels::{block_sparse_attn, dense_attn, hip_attn, hip_mask, Error, HipConfig};

#[test]
fn mismatched_shapes_are_named() {
    let (q, k, v) = qkv(1, 1, 8, 8, 4, 2, 64, DType::F32);
    let bad_rank = q.reshape((8, 4, 64)).unwrap();
    assert!(matches!(dense_attn(&bad_rank, &k, &v, 1.0), Err(Error::Shape { name: "q", .. })));
    let (q3, _, _) = qkv(1, 1, 8, 8, 3, 2, 64, DType::F32);
    assert!(matches!(dense_attn(&q3, &k, &v, 1.0), Err(Error::Shape { name: "q", .. })));
    let (_, k_d, v_d) = qkv(1, 1, 8, 8, 4, 2, 32, DType::F32);
    assert!(matches!(dense_attn(&q, &k_d, &v_d, 1.0), Err(Error::Shape { name: "k", .. })));
    let (q_long, _, _) = qkv(1, 1, 9, 8, 4, 2, 64, DType::F32);
    assert!(matches!(dense_attn(&q_long, &k, &v, 1.0), Err(Error::Shape { name: "k", .. })));
    let v_short = v.narrow(1, 0, 7).unwrap();
    assert!(matches!(dense_attn(&q, &k, &v_short, 1.0), Err(Error::Shape { name: "v", .. })));
    let (q_big, k_big, v_big) = qkv(1, 1, 2, 2, 1, 1, 257, DType::F32);
    assert!(matches!(dense_attn(&q_big, &k_big, &v_big, 1.0), Err(Error::Shape { .. })));
    let empty = Tensor::zeros((1, 0, 4, 64), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(dense_attn(&empty, &k, &v, 1.0), Err(Error::Shape { .. })));
}

#[test]
fn bad_dtypes_and_scales() {
    let (q, k, v) = qkv(1, 1, 8, 8, 2, 2, 64, DType::F32);
    let k16 = k.to_dtype(DType::F16).unwrap();
    assert!(matches!(dense_attn(&q, &k16, &v, 1.0), Err(Error::DType { name: "k", .. })));
    let q64 = q.to_dtype(DType::F64).unwrap();
    assert!(matches!(dense_attn(&q64, &k, &v, 1.0), Err(Error::DType { name: "q", .. })));
    for s in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(dense_attn(&q, &k, &v, s), Err(Error::InvalidArgument { name: "scale", .. })));
    }
}

#[test]
fn bad_configs_and_masks() {
    let (q, k, v) = qkv(1, 1, 8, 8, 2, 2, 64, DType::F32);
    let bad = HipConfig::paper().with_k(3);
    assert!(matches!(hip_attn(&q, &k, &v, &bad, 1.0), Err(Error::InvalidConfig { field: "k", .. })));
    assert!(matches!(hip_mask(&q, &k, &bad, 1.0), Err(Error::InvalidConfig { field: "k", .. })));
    // A mask estimated for other queries does not fit.
    let mask = hip_mask(&q, &k, &HipConfig::paper(), 1.0).unwrap();
    let (q2, k2, v2) = qkv(2, 1, 8, 8, 4, 2, 64, DType::F32);
    assert!(matches!(
        block_sparse_attn(&q2, &k2, &v2, &mask, 1.0, 0),
        Err(Error::Shape { name: "mask", .. })
    ));
    // A context shorter than the one the mask was made for.
    let (qs, ks, vs) = qkv(4, 1, 4, 4, 2, 2, 64, DType::F32);
    let mask8 = hip_mask(&q.narrow(1, 4, 4).unwrap(), &k, &HipConfig::paper(), 1.0).unwrap();
    assert!(matches!(
        block_sparse_attn(&qs, &ks, &vs, &mask8, 1.0, 0),
        Err(Error::Shape { name: "mask", .. })
    ));
}
