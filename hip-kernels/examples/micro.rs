use std::time::Instant;
fn bench(m: usize, n: usize, k: usize, dst_rs_rowmajor: bool) -> f64 {
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0f32; m * n];
    let iters = 3000;
    let s = Instant::now();
    for _ in 0..iters {
        unsafe {
            if dst_rs_rowmajor {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    k as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            } else {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    m as isize,
                    1,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    k as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    }
    let t = s.elapsed().as_secs_f64() / iters as f64;
    2.0 * (m * n * k) as f64 / t / 1e9
}
fn main() {
    for &(m, n, k) in &[
        (32, 1024, 128),
        (1024, 32, 128),
        (64, 256, 128),
        (256, 64, 128),
        (64, 128, 256),
        (128, 64, 256),
        (256, 128, 256),
    ] {
        println!(
            "{m}x{n}x{k}: rowmajor dst {:.0} GF/s, colmajor dst {:.0} GF/s",
            bench(m, n, k, true),
            bench(m, n, k, false)
        );
    }
}
