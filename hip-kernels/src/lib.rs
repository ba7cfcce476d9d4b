//! # hip-kernels
//!
//! The attention math of the `hip` SDK: exact (dense) attention and **HiP attention**
//! (Hierarchically Pruned Attention, arXiv 2406.09827), a training-free, sub-quadratic
//! replacement for dense attention. HiP finds, for every block of queries, the top-k key blocks
//! by a hierarchical tree search (O(T log T) time, O(T) memory) and attends only to those, plus
//! attention sinks and a sliding window.
//!
//! This crate knows nothing of models, tokens or requests: inputs are tensors, masks and config
//! structs. Every fast op has a slow, readable reference in [`mod@reference`] that tests compare against.
//!
//! | op | what |
//! |---|---|
//! | [`dense_attn`] | exact causal attention, flash-style online softmax, GQA, query offset |
//! | [`hip_mask`] | HiP mask estimation → [`HipMask`] |
//! | [`block_sparse_attn`] | attention over sink + window + the blocks of a [`HipMask`] |
//! | [`hip_attn`] | mask + block-sparse attention in one call (prefill) |
//! | [`hip_attn_decode`] + [`MaskCache`] | decode, re-estimating the mask every `refresh_interval` steps |
//! | `*_paged` + [`PagedKv`] | the same ops over one sequence in a paged KV cache (block table) |
//! | [`extend`] | Dynamic RoPE: HiP past the trained context, over un-rotated keys ([`hip_attn_extend_paged`]) |
//! | [`offload`] | KV-cache offloading policy: GPU cache sizes ([`offload::Offload`]), page tables and LRU ([`offload::TokenCache`]) |
//!
//! Tensors are token-major (see [`layout`]): `q: [batch, t_q, heads_q, head_dim]`,
//! `k, v: [batch, t_k, heads_kv, head_dim]`, f32 / f16 / bf16 with f32 accumulation.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use hip_kernels::{dense_attn, hip_attn, HipConfig};
//! let dev = Device::Cpu;
//! let (t, d) = (200, 64);
//! let q = Tensor::randn(0f32, 1., (1, t, 2, d), &dev)?;
//! let k = Tensor::randn(0f32, 1., (1, t, 2, d), &dev)?;
//! let v = Tensor::randn(0f32, 1., (1, t, 2, d), &dev)?;
//! let scale = 1.0 / (d as f32).sqrt();
//! // With k covering the whole context HiP is exact.
//! let cfg = HipConfig::paper().with_k(256);
//! let hip = hip_attn(&q, &k, &v, &cfg, scale)?;
//! let dense = dense_attn(&q, &k, &v, scale)?;
//! let err = (hip - dense)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
//! assert!(err < 1e-5);
//! # Ok::<(), hip_kernels::Error>(())
//! ```
#![warn(missing_docs, unreachable_pub)]

mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
mod elem;
mod error;
pub mod extend;
mod gather;
pub mod layout;
mod mask_cache;
pub mod offload;
mod ops;
mod paged;
pub mod reference;
mod rope;

pub use config::HipConfig;
pub use error::{Error, Result};
pub use extend::{
    block_sparse_attn_extend_paged, hip_attn_extend_decode_paged, hip_attn_extend_paged,
    hip_mask_extend_paged, RopeExtend,
};
#[cfg(feature = "cuda")]
pub use extend::{hip_attn_extend_decode_paged_cuda, hip_attn_extend_paged_cuda};
pub use layout::AttnDims;
pub use mask_cache::{hip_attn, hip_attn_decode, MaskCache};
pub use ops::block_sparse_attn::block_sparse_attn;
pub use ops::dense_attn::dense_attn;
pub use ops::hip_mask::{hip_mask, HipMask, NO_BLOCK};
pub use paged::{
    block_sparse_attn_paged, dense_attn_paged, hip_attn_decode_paged, hip_attn_paged, hip_mask_paged, PagedKv,
};
pub use rope::Rope;
