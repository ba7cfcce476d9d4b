//! The shared inner loop of every attention op: a tile of query rows attends to a list of key
//! spans with an online (flash-style) softmax, so memory stays O(rows × head_dim) whatever the
//! context length.
//!
//! Keys are gathered `CHUNK` at a time (converted to f32), scored with one GEMM, masked by a
//! per-(query position, key) rule, and folded into the running max / sum / accumulator; the
//! weighted values are added with a second GEMM.

use crate::elem::Elem;
use crate::gather::gather_rows;
use crate::layout::AttnDims;
use crate::ops::softmax::fold_chunk;

/// Keys processed per GEMM.
pub(crate) const CHUNK: usize = 256;

/// A half-open key range `[start, end)`; `block` marks tokens that come from a selected HiP block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub start: u32,
    pub end: u32,
    pub block: bool,
}

/// Where the rows of one key/value head live in a K (or V) buffer.
#[derive(Clone, Copy)]
pub(crate) enum KvRows<'a> {
    /// Token `j` at `base + j * stride` (a contiguous `[batch, t_k, heads_kv, head_dim]` tensor).
    Strided { base: usize, stride: usize },
    /// Token `j` in block `table[j / block_size]` of a paged cache laid out
    /// `[blocks, block_size, heads_kv, head_dim]`: at `(table[j / bs] * bs + j % bs) * row + head_off`.
    Paged { table: &'a [u32], block_size: usize, row: usize, head_off: usize },
}

impl KvRows<'_> {
    #[inline]
    pub(crate) fn offset(&self, j: usize) -> usize {
        match *self {
            KvRows::Strided { base, stride } => base + j * stride,
            KvRows::Paged { table, block_size, row, head_off } => {
                (table[j / block_size] as usize * block_size + j % block_size) * row + head_off
            }
        }
    }
}

/// How the key/value tokens of an attention call are stored.
#[derive(Clone, Copy)]
pub(crate) enum KvLayout<'a> {
    /// Contiguous token-major tensors `[batch, t_k, heads_kv, head_dim]`.
    Contiguous,
    /// One sequence in a paged cache (batch 1).
    Paged { table: &'a [u32], block_size: usize },
}

impl<'a> KvLayout<'a> {
    /// The rows of key/value head `g` of batch entry `b`.
    pub(crate) fn rows(&self, dims: &AttnDims, b: usize, g: usize) -> KvRows<'a> {
        match *self {
            KvLayout::Contiguous => {
                KvRows::Strided { base: dims.kv_off(b, 0, g), stride: dims.heads_kv * dims.head_dim }
            }
            KvLayout::Paged { table, block_size } => KvRows::Paged {
                table,
                block_size,
                row: dims.heads_kv * dims.head_dim,
                head_off: g * dims.head_dim,
            },
        }
    }
}

/// One key/value head of one sequence.
pub(crate) struct KvHead<'a, E> {
    pub k: &'a [E],
    pub v: &'a [E],
    pub rows: KvRows<'a>,
    pub head_dim: usize,
}

/// Reusable buffers of one worker thread.
#[derive(Default)]
pub(crate) struct Scratch {
    /// Query rows (`rows × d`, row-major, pre-scaled). Filled by the caller.
    pub q: Vec<f32>,
    /// Position of each query row. Filled by the caller.
    pub pos: Vec<u32>,
    /// The normalised output (`rows × d`, row-major) after [`attend`].
    pub out: Vec<f32>,
    kbuf: Vec<f32>,
    vbuf: Vec<f32>,
    kidx: Vec<u32>,
    kblk: Vec<bool>,
    koff: Vec<usize>,
    /// Scores / probabilities of the current chunk, key-major (`c × rows`).
    s: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    alpha: Vec<f32>,
    tmp: Vec<f32>,
    /// Accumulator, dimension-major (`d × rows`).
    acc: Vec<f32>,
}

/// A strided matrix operand: element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix with `cols` columns.
    pub(crate) fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat { data, rs: cols, cs: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns.
    pub(crate) fn rows_t(data: &'a [f32], cols: usize) -> Self {
        Mat { data, rs: 1, cs: cols }
    }
    fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// `dst (+)= lhs · rhs` for an `m × n` destination stored column-major (`dst[j * m + i]`), the
/// orientation the GEMM micro-kernels run fastest for our shapes.
pub(crate) fn matmul_cm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
) {
    assert!(dst.len() >= m * n && lhs.fits(m, k) && rhs.fits(k, n), "matmul operand too small");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the assert above checks that every addressed element of the three operands is in bounds.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            m as isize,
            1,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
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
/// `allow(p, j, from_block)`. For every key, the positions `p` it is admitted for must form an
/// interval (true of causal, sink, window and block rules): a chunk whose keys are all admitted at
/// both the smallest and the largest row position then skips per-element masking. Leaves the
/// normalised output in `scratch.out` (`rows × d`); a row that admits no key gets zeros.
pub(crate) fn attend<E: Elem>(
    kv: &KvHead<'_, E>,
    spans: &[Span],
    allow: impl Fn(u32, u32, bool) -> bool,
    sc: &mut Scratch,
) {
    let d = kv.head_dim;
    let rows = sc.pos.len();
    debug_assert_eq!(sc.q.len(), rows * d);
    for buf in [&mut sc.m, &mut sc.l, &mut sc.alpha, &mut sc.tmp] {
        buf.clear();
        buf.resize(rows, 0.0);
    }
    sc.m.fill(f32::NEG_INFINITY);
    sc.acc.clear();
    sc.acc.resize(rows * d, 0.0);
    sc.kbuf.resize(CHUNK * d, 0.0);
    sc.vbuf.resize(CHUNK * d, 0.0);
    sc.s.resize(rows * CHUNK, 0.0);
    sc.kidx.clear();
    sc.kblk.clear();
    sc.koff.clear();
    for span in spans {
        for j in span.start..span.end {
            sc.kidx.push(j);
            sc.kblk.push(span.block);
            sc.koff.push(kv.rows.offset(j as usize));
            if sc.kidx.len() == CHUNK {
                load_chunk(kv, sc);
                flush(sc, d, &allow);
            }
        }
    }
    if !sc.kidx.is_empty() {
        load_chunk(kv, sc);
        flush(sc, d, &allow);
    }
    sc.out.clear();
    sc.out.resize(rows * d, 0.0);
    for r in 0..rows {
        let l = sc.l[r];
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        for dd in 0..d {
            sc.out[r * d + dd] = sc.acc[dd * rows + r] * inv;
        }
    }
}

fn load_chunk<E: Elem>(kv: &KvHead<'_, E>, sc: &mut Scratch) {
    let (c, d) = (sc.koff.len(), kv.head_dim);
    gather_rows(kv.k, &sc.koff, d, &mut sc.kbuf[..c * d]);
    gather_rows(kv.v, &sc.koff, d, &mut sc.vbuf[..c * d]);
    sc.koff.clear();
}

#[inline(always)]
fn flush<F: Fn(u32, u32, bool) -> bool>(sc: &mut Scratch, d: usize, allow: &F) {
    let rows = sc.pos.len();
    let c = sc.kidx.len();
    let s = &mut sc.s[..rows * c];
    // s (rows × c, stored key-major) = q · kᵀ
    matmul_cm(rows, c, d, s, false, Mat::rows(&sc.q, d), Mat::rows_t(&sc.kbuf[..c * d], d));
    let pmin = sc.pos.iter().copied().min().unwrap_or(0);
    let pmax = sc.pos.iter().copied().max().unwrap_or(0);
    let all_allowed =
        sc.kidx.iter().zip(&sc.kblk).all(|(&j, &blk)| allow(pmin, j, blk) && allow(pmax, j, blk));
    if !all_allowed {
        for (ci, (&j, &blk)) in sc.kidx.iter().zip(&sc.kblk).enumerate() {
            for (x, &p) in s[ci * rows..(ci + 1) * rows].iter_mut().zip(&sc.pos) {
                if !allow(p, j, blk) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
    fold_chunk(s, rows, &mut sc.m, &mut sc.l, &mut sc.alpha, &mut sc.tmp);
    if sc.alpha.iter().any(|&a| a != 1.0) {
        for col in sc.acc.chunks_exact_mut(rows) {
            for (x, &a) in col.iter_mut().zip(&sc.alpha) {
                *x *= a;
            }
        }
    }
    // acc (rows × d, stored dimension-major) += p · v, with p (rows × c) stored key-major.
    let p = Mat { data: s, rs: 1, cs: rows };
    matmul_cm(rows, d, c, &mut sc.acc, true, p, Mat::rows(&sc.vbuf[..c * d], d));
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
