//! `hip-bench`: GPU benchmarks (feature `cuda`; run on the GPU host).
//!
//! * `hip-bench attn`: attention kernels alone at Llama-3.1-8B shapes, HiP vs our dense
//!   ([`attn`]; peer: `scripts/sdpa_bench.py`).
//! * `hip-bench e2e`: a whole Qwen2.5-1.5B-shaped model with seeded random weights, prefill and
//!   batched decode tokens/s, HiP vs dense ([`e2e`]; peer: `scripts/hf_e2e_bench.py`, both in one
//!   go: `scripts/e2e_bench.sh`).
//! * `hip-bench matmul`: a decode step's few-row products, cuBLAS against our tensor-core kernel
//!   in each form ([`matmul`]).
//! * `hip-bench offload`: HiP decode attention with the KV cache offloaded to pinned host memory
//!   against the GPU-resident cache ([`offload`]).

mod attn;
mod e2e;
mod matmul;
mod offload;

use std::process::ExitCode;

/// The error type of the subcommands.
type R<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let result = match args.next().as_deref() {
        Some("attn") => attn::run(args),
        Some("e2e") => e2e::run(args),
        Some("matmul") => matmul::run(args),
        Some("offload") => offload::run(args),
        other => Err(format!(
            "usage:\n  {}\n  {}\n  {}\n  {}\n(got {other:?})",
            attn::USAGE,
            e2e::USAGE,
            matmul::USAGE,
            offload::USAGE
        )
        .into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hip-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
