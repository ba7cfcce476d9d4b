//! The host storage of a [`super::PagedKvCache`] layer: zeroed memory, or a memory-mapped
//! file (`PagedKvCache::new_file_backed`) that the OS pages in and out.

use std::fs::File;
use std::ops::{Deref, DerefMut};
use std::path::Path;

use memmap2::{MmapMut, MmapOptions};

use crate::{Error, Result};

/// `len` f32s of K or V.
pub(super) enum Pool {
    Memory(Vec<f32>),
    /// A shared, writable map of a region of an unlinked temporary file.
    File(MmapMut),
}

impl Deref for Pool {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Pool::Memory(v) => v,
            Pool::File(m) => bytemuck::cast_slice(m),
        }
    }
}

impl DerefMut for Pool {
    fn deref_mut(&mut self) -> &mut [f32] {
        match self {
            Pool::Memory(v) => v,
            Pool::File(m) => bytemuck::cast_slice_mut(m),
        }
    }
}

/// Regions start at multiples of this (a multiple of every page size in use).
const ALIGN: u64 = 1 << 16;

/// `n` pools of `floats` zeroed f32s each: in memory, or (with `dir`) in one unlinked
/// temporary file created in `dir`, one region per pool. The file is sparse: a block costs disk
/// and page cache only once written, and the OS can write pages back and drop them under memory
/// pressure, so the cache may be larger than RAM.
pub(super) fn pools(n: usize, floats: usize, dir: Option<&Path>) -> Result<Vec<Pool>> {
    let Some(dir) = dir else {
        return Ok((0..n).map(|_| Pool::Memory(vec![0.0; floats])).collect());
    };
    let io =
        |what: &str, e: std::io::Error| Error::arg("kv cache dir", dir.display(), format!("{what}: {e}"));
    let bytes = (floats as u64).checked_mul(4).ok_or_else(|| Error::arg("kv cache", floats, "too large"))?;
    let stride = bytes.div_ceil(ALIGN) * ALIGN;
    let total = stride.checked_mul(n as u64).ok_or_else(|| Error::arg("kv cache", n, "too large"))?;
    let file: File = tempfile::tempfile_in(dir).map_err(|e| io("cannot create the cache file", e))?;
    file.set_len(total).map_err(|e| io("cannot size the cache file", e))?;
    (0..n as u64)
        .map(|i| {
            // SAFETY: the file is private to this process (unlinked at creation) and each map
            // covers its own region, so nothing else writes or truncates what is mapped.
            let map = unsafe { MmapOptions::new().offset(i * stride).len(bytes as usize).map_mut(&file) }
                .map_err(|e| io("cannot map the cache file", e))?;
            Ok(Pool::File(map))
        })
        .collect()
}
