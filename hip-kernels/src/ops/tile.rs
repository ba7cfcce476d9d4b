//! The shared inner loop of every attention op: a tile of query rows attends to a list of key
//! spans with an online (flash-style) softmax, so memory stays O(rows × head_dim) whatever the
//! context length.
//!
//! Keys are gathered `CHUNK` at a time (converted to f32), scored with one GEMM, masked by a
//! per-(query position, key) rule, and folded into the running max / sum / accumulator; the
//! weighted values are added with a second GEMM.

use crate::elem::Elem;
use crate::ops::softmax::{exp_sub_sum, row_max};

/// Keys processed per GEMM.
pub(crate) const CHUNK: usize = 256;

/// A half-open key range `[start, end)`; `block` marks tokens that come from a selected HiP block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub start: u32,
    pub end: u32,
    pub block: bool,
}

/// One key/value head of one batch entry, in the token-major layout.
pub(crate) struct KvHead<'a, E> {
    pub k: &'a [E],
    pub v: &'a [E],
    /// Offset of token 0 of this head.
    pub base: usize,
    /// Distance between consecutive tokens (`heads_kv * head_dim`).
    pub stride: usize,
    pub head_dim: usize,
}

impl<E: Elem> KvHead<'_, E> {
    #[inline]
    pub(crate) fn k_row(&self, j: usize) -> &[E] {
        let o = self.base + j * self.stride;
        &self.k[o..o + self.head_dim]
    }
    #[inline]
    pub(crate) fn v_row(&self, j: usize) -> &[E] {
        let o = self.base + j * self.stride;
        &self.v[o..o + self.head_dim]
    }
}

/// Reusable buffers of one worker thread.
#[derive(Default)]
pub(crate) struct Scratch {
    pub q: Vec<f32>,
    pub pos: Vec<u32>,
    kbuf: Vec<f32>,
    vbuf: Vec<f32>,
    kidx: Vec<u32>,
    kblk: Vec<bool>,
    s: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    pub acc: Vec<f32>,
}

/// `dst[m×n] (+)= lhs[m×k] · rhs`, where `rhs` is stored as `n` rows of length `k` when
/// `rhs_transposed` (so the product is `lhs · rhsᵀ`), else as `k` rows of length `n`.
#[inline]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    rhs: &[f32],
    rhs_transposed: bool,
) {
    debug_assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= k * n);
    if m == 0 || n == 0 {
        return;
    }
    let (rhs_rs, rhs_cs) = if rhs_transposed { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the slices hold at least the m×n, m×k and k×n elements addressed with these strides
    // (checked above in debug builds, guaranteed by every caller's buffer sizing).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Attends `scratch.q` (`rows × d`, already multiplied by the softmax scale; row `r` is a query at
/// position `scratch.pos[r]`) to the keys of `spans`, admitting key `j` for row position `p` when
/// `allow(p, j, from_block)`. Leaves the normalised output in `scratch.acc` (`rows × d`); a row
/// that admits no key gets zeros.
pub(crate) fn attend<E: Elem>(
    kv: &KvHead<'_, E>,
    spans: &[Span],
    allow: impl Fn(u32, u32, bool) -> bool,
    sc: &mut Scratch,
) {
    let d = kv.head_dim;
    let rows = sc.pos.len();
    debug_assert_eq!(sc.q.len(), rows * d);
    sc.m.clear();
    sc.m.resize(rows, f32::NEG_INFINITY);
    sc.l.clear();
    sc.l.resize(rows, 0.0);
    sc.acc.clear();
    sc.acc.resize(rows * d, 0.0);
    sc.kbuf.resize(CHUNK * d, 0.0);
    sc.vbuf.resize(CHUNK * d, 0.0);
    sc.s.resize(rows * CHUNK, 0.0);
    sc.kidx.clear();
    sc.kblk.clear();
    for span in spans {
        for j in span.start..span.end {
            let c = sc.kidx.len();
            E::load(kv.k_row(j as usize), &mut sc.kbuf[c * d..(c + 1) * d]);
            E::load(kv.v_row(j as usize), &mut sc.vbuf[c * d..(c + 1) * d]);
            sc.kidx.push(j);
            sc.kblk.push(span.block);
            if sc.kidx.len() == CHUNK {
                flush(sc, d, &allow);
            }
        }
    }
    if !sc.kidx.is_empty() {
        flush(sc, d, &allow);
    }
    for r in 0..rows {
        let l = sc.l[r];
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        sc.acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
    }
}

fn flush(sc: &mut Scratch, d: usize, allow: &impl Fn(u32, u32, bool) -> bool) {
    let rows = sc.pos.len();
    let c = sc.kidx.len();
    let s = &mut sc.s[..rows * c];
    matmul(rows, c, d, s, false, &sc.q, &sc.kbuf[..c * d], true);
    for r in 0..rows {
        let p = sc.pos[r];
        let srow = &mut s[r * c..(r + 1) * c];
        for (x, (&j, &blk)) in srow.iter_mut().zip(sc.kidx.iter().zip(&sc.kblk)) {
            if !allow(p, j, blk) {
                *x = f32::NEG_INFINITY;
            }
        }
        let mx = row_max(srow);
        if mx == f32::NEG_INFINITY {
            srow.iter_mut().for_each(|x| *x = 0.0);
            continue;
        }
        let m_old = sc.m[r];
        let m_new = m_old.max(mx);
        let sum = exp_sub_sum(srow, m_new);
        let alpha = if m_old == f32::NEG_INFINITY { 0.0 } else { (m_old - m_new).exp() };
        sc.l[r] = sc.l[r] * alpha + sum;
        sc.m[r] = m_new;
        if alpha != 1.0 {
            sc.acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= alpha);
        }
    }
    matmul(rows, d, c, &mut sc.acc, true, s, &sc.vbuf[..c * d], false);
    sc.kidx.clear();
    sc.kblk.clear();
}

/// Writes tile rows back into a shared output buffer.
///
/// Each `(batch, query, head)` row is written by exactly one task, so concurrent writers never
/// touch the same element.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub *mut f32);
// SAFETY: tasks write disjoint rows (see the type's docs); the buffer outlives the parallel scope.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Copies `row` to `offset`.
    ///
    /// # Safety
    /// `offset + row.len()` is within the buffer and no other thread writes that range.
    #[inline]
    pub(crate) unsafe fn write(self, offset: usize, row: &[f32]) {
        // SAFETY: guaranteed by the caller.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), self.0.add(offset), row.len()) }
    }
}
