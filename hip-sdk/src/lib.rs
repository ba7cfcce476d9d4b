//! hip-sdk: the async Session API. Work in progress: see the issues.

pub use hip_core;
