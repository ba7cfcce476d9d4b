//! hip-core: the synchronous runtime (models, KV cache, engine). Work in progress: see the issues.

pub use hip_kernels;
