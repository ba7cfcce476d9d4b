//! Vectorised pieces of the online softmax: `exp` of a row and its sum.

/// `exp(x)` for `x <= 0` (inputs above 0 are clamped to 0, below -87 give exactly 0).
///
/// Range reduction to `2^n * 2^f` with `|f| <= 0.5` and a degree-7 Taylor polynomial for `2^f`:
/// relative error below 1e-7, branch-free so the loop vectorises.
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = x.clamp(-87.0, 0.0);
    let t = xc * LOG2E;
    let y = t + MAGIC;
    let n = (y.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let f = t - (y - MAGIC);
    // 2^f = e^(f ln 2)
    let z = f * std::f32::consts::LN_2;
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

#[inline(always)]
fn exp_sub_sum_body(row: &mut [f32], m: f32) -> f32 {
    let mut sum = 0.0f32;
    // 8 partial sums so the reduction vectorises without reassociation flags.
    let mut acc = [0.0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for l in 0..8 {
            let e = exp_nonpos(c[l] - m);
            c[l] = e;
            acc[l] += e;
        }
    }
    for x in chunks.into_remainder() {
        *x = exp_nonpos(*x - m);
        sum += *x;
    }
    sum + acc.iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_sum_avx2(row: &mut [f32], m: f32) -> f32 {
    exp_sub_sum_body(row, m)
}

/// Replaces every `x` of `row` by `exp(x - m)` (with `-inf` giving 0) and returns the sum.
/// `m` must be at least the row's maximum.
pub(crate) fn exp_sub_sum(row: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            return unsafe { exp_sub_sum_avx2(row, m) };
        }
    }
    exp_sub_sum_body(row, m)
}

/// Maximum of a row (`-inf` for an empty row).
#[inline]
pub(crate) fn row_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] = acc[l].max(c[l]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in chunks.remainder() {
        m = m.max(x);
    }
    acc.iter().fold(m, |a, &b| a.max(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0.0f64;
        for i in 0..200_000 {
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
    fn exp_sub_sum_handles_masked_entries() {
        let mut row = vec![0.5, f32::NEG_INFINITY, -1.0, 0.0, 2.0, f32::NEG_INFINITY, 1.0, 0.3, -3.0, 1.5];
        let m = row_max(&row);
        assert_eq!(m, 2.0);
        let want: Vec<f32> = row.iter().map(|&x| (x - m).exp()).collect();
        let s = exp_sub_sum(&mut row, m);
        for (a, b) in row.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert!((s - want.iter().sum::<f32>()).abs() < 1e-5);
    }
}
