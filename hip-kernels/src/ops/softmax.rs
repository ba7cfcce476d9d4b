//! Vectorised pieces of the online softmax: `exp` of a row and its sum.

/// `exp(x)` for `x <= 0` (inputs above 0 are clamped to 0, below -87 give exactly 0).
///
/// Range reduction to `2^n * e^z` with `|z| <= ln2/2` and a degree-7 Taylor polynomial for `e^z`:
/// relative error below 1e-7, branch-free so the loop vectorises.
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = x.clamp(-87.0, 0.0);
    // Cody–Waite reduction: x = n ln2 + z with |z| <= ln2 / 2, ln2 split in a high and a low part.
    const LN2_HI: f32 = 0.693_145_75; // exactly 0x3F31_7200
    const LN2_LO: f32 = 1.428_606_8e-6;
    let y = xc * LOG2E + MAGIC;
    let n = (y.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let nf = y - MAGIC;
    let z = (xc - nf * LN2_HI) - nf * LN2_LO;
    let p = 1.0
        + z * (1.0
            + z * (0.5
                + z * (1.0 / 6.0
                    + z * (1.0 / 24.0 + z * (1.0 / 120.0 + z * (1.0 / 720.0 + z * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n + 127) as u32) << 23);
    let r = p * scale;
    if x < -87.0 {
        0.0
    } else {
        r
    }
}

/// Folds one chunk of scores into the running softmax state of `rows` query rows.
///
/// `s` holds the chunk key-major: `s[c * rows + r]` is the score of key `c` for row `r` (`-inf`
/// where masked). On return `s` holds the unnormalised probabilities `exp(s - m_new)`, `m` the new
/// row maxima, `l` the rescaled and extended row sums, and `alpha` the factor by which each row's
/// accumulator must be rescaled (`exp(m_old - m_new)`). `tmp` is scratch of at least `rows`.
#[inline(always)]
fn fold_chunk_body(
    s: &mut [f32],
    rows: usize,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
    tmp: &mut [f32],
) {
    let (m, l, alpha, tmp) = (&mut m[..rows], &mut l[..rows], &mut alpha[..rows], &mut tmp[..rows]);
    tmp.fill(f32::NEG_INFINITY);
    for srow in s.chunks_exact(rows) {
        for (t, &x) in tmp.iter_mut().zip(srow) {
            *t = t.max(x);
        }
    }
    for r in 0..rows {
        let m_new = m[r].max(tmp[r]);
        alpha[r] = if m[r] == f32::NEG_INFINITY { 0.0 } else { exp_nonpos(m[r] - m_new) };
        l[r] *= alpha[r];
        // A row with nothing admitted yet subtracts 0: its masked scores still give exp(-inf) = 0.
        tmp[r] = if m_new == f32::NEG_INFINITY { 0.0 } else { m_new };
        m[r] = m_new;
    }
    for srow in s.chunks_exact_mut(rows) {
        for ((x, &mr), lr) in srow.iter_mut().zip(tmp.iter()).zip(l.iter_mut()) {
            let e = exp_nonpos(*x - mr);
            *x = e;
            *lr += e;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fold_chunk_avx2(
    s: &mut [f32],
    rows: usize,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
    tmp: &mut [f32],
) {
    fold_chunk_body(s, rows, m, l, alpha, tmp)
}

/// See [`fold_chunk_body`]; dispatches to an AVX2 build where the CPU has it.
pub(crate) fn fold_chunk(
    s: &mut [f32],
    rows: usize,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
    tmp: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            return unsafe { fold_chunk_avx2(s, rows, m, l, alpha, tmp) };
        }
    }
    fold_chunk_body(s, rows, m, l, alpha, tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0.0f64;
        for i in 0..96_000 {
            let x = -(i as f32) * 1e-3 * 0.9;
            let want = (x as f64).exp();
            let got = exp_nonpos(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(-100.0), 0.0);
        assert_eq!(exp_nonpos(0.0), 1.0);
    }

    #[test]
    fn fold_chunk_matches_a_plain_softmax() {
        // Two chunks of 3 keys for 2 rows; row 1 has everything masked in the first chunk.
        let ninf = f32::NEG_INFINITY;
        let chunks = [vec![0.5, ninf, -1.0, ninf, 2.0, ninf], vec![1.0, 0.3, -3.0, 1.5, 0.0, 0.2]];
        let (mut m, mut l, mut alpha, mut tmp) = (vec![ninf; 2], vec![0.0; 2], vec![0.0; 2], vec![0.0; 2]);
        let mut weights: Vec<Vec<f32>> = vec![vec![], vec![]];
        for ch in &chunks {
            let mut s = ch.clone();
            fold_chunk(&mut s, 2, &mut m, &mut l, &mut alpha, &mut tmp);
            for r in 0..2 {
                weights[r].iter_mut().for_each(|w| *w *= alpha[r]);
                weights[r].extend((0..3).map(|c| s[c * 2 + r]));
            }
        }
        for r in 0..2 {
            let raw: Vec<f32> = chunks.iter().flat_map(|ch| (0..3).map(move |c| ch[c * 2 + r])).collect();
            let mx = raw.iter().cloned().fold(ninf, f32::max);
            let z: f32 = raw.iter().map(|x| (x - mx).exp()).sum();
            for (w, x) in weights[r].iter().zip(&raw) {
                assert!((w / l[r] - (x - mx).exp() / z).abs() < 1e-6);
            }
        }
    }
}
