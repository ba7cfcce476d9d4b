//! The attention ops. Each op folder holds the public entry point (`mod.rs`: checks and dispatch)
//! and the CPU implementation (`cpu.rs`); the slow references live in [`crate::reference`].

pub(crate) mod block_sparse_attn;
pub(crate) mod dense_attn;
pub(crate) mod hip_mask;
pub(crate) mod softmax;
pub(crate) mod tile;

use candle_core::{Device, Tensor};

use crate::elem::Elem;
use crate::error::{Error, Result};

/// Borrows the contiguous CPU data of `t` as `&[E]` inside `f`.
pub(crate) fn with_cpu_data<E: Elem, R>(
    name: &'static str,
    t: &Tensor,
    f: impl FnOnce(&[E]) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let data = crate::elem::cpu_slice::<E>(name, &storage, layout)?;
    f(data)
}

/// Fails unless every tensor lives on the CPU.
pub(crate) fn require_cpu(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    for t in ts {
        if !matches!(t.device(), Device::Cpu) {
            return Err(Error::UnsupportedDevice { op, device: format!("{:?}", t.device().location()) });
        }
    }
    Ok(())
}
