//! # hip-core
//!
//! The synchronous runtime of the hip SDK: GGUF / safetensors loading, the Llama and Qwen2
//! transformers with attention through an [`attention::AttentionBackend`] (dense or HiP), a paged
//! KV cache, sampling, the [`engine::Engine`] and session files ([`persist`]). No async, no
//! threads of its own.
#![warn(missing_docs, unreachable_pub)]

pub mod attention;
pub mod device;
pub mod engine;
mod error;
pub mod eval;
pub mod kv;
pub mod loader;
pub mod model;
pub mod persist;
pub mod sampling;

pub use error::{Error, Result};
pub use hip_kernels::offload::{Offload, OffloadStats};
pub use hip_kernels::{HipConfig, Rope, RopeExtend};
