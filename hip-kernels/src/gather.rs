//! Gathering scattered key/value rows into a contiguous f32 buffer, with software prefetch:
//! HiP reads a few rows from all over a long context, so the loads are latency-bound.

use crate::elem::Elem;

/// Rows ahead that are prefetched while the current one is converted.
const PREFETCH_AHEAD: usize = 16;

#[inline(always)]
fn prefetch<E>(row: &[E]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(row);
        let p = row.as_ptr() as *const i8;
        let mut off = 0;
        while off < bytes {
            // SAFETY: prefetch is a hint; the address lies inside `row`.
            unsafe { std::arch::x86_64::_mm_prefetch(p.add(off), std::arch::x86_64::_MM_HINT_T0) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Copies the rows `src[o..o + d]` for every `o` in `offsets` into consecutive rows of `dst`
/// (converted to f32).
pub(crate) fn gather_rows<E: Elem>(src: &[E], offsets: &[usize], d: usize, dst: &mut [f32]) {
    for (i, &o) in offsets.iter().enumerate() {
        if let Some(&next) = offsets.get(i + PREFETCH_AHEAD) {
            prefetch(&src[next..next + d]);
        }
        E::load(&src[o..o + d], &mut dst[i * d..(i + 1) * d]);
    }
}
