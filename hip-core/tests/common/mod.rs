//! Helpers shared by the integration tests: the test assets fetched by `scripts/fetch-assets.sh`.
#![allow(dead_code)]

use std::path::PathBuf;

/// `$HIP_ASSETS`, or `~/.cache/hip`.
pub fn assets_dir() -> PathBuf {
    std::env::var_os("HIP_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/hip"))
}

/// A required asset: a missing one fails the test with instructions.
pub fn asset(name: &str) -> PathBuf {
    let p = assets_dir().join(name);
    assert!(p.exists(), "{} is missing: run scripts/fetch-assets.sh", p.display());
    p
}

/// An opt-in asset: `None` when absent.
pub fn optional_asset(name: &str) -> Option<PathBuf> {
    let p = assets_dir().join(name);
    p.exists().then_some(p)
}

/// The SmolLM2-135M-Instruct GGUF (the default test model).
pub fn smollm2() -> PathBuf {
    asset("smollm2-135m-instruct-q4_1.gguf")
}

/// Index of the largest value (the first on ties of equal bits).
pub fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|x| x.0 as u32).unwrap_or(0)
}

/// A HiP config that is sparse at a few hundred tokens: 64 selected tokens besides a 16-token
/// sink and a 32-token window, layer 0 dense, the decode mask refreshed every 3 steps.
pub fn sparse_hip() -> hip_core::HipConfig {
    hip_core::HipConfig::paper()
        .with_k(64)
        .with_query_block(32, 2)
        .with_sink_window(16, 32)
        .with_dense_layers(vec![0])
        .with_refresh_interval(3)
}
