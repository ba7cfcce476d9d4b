//! The fused CUDA kernels of a transformer step (`kernels/fused.cu`) against the candle
//! operations they replace, on fresh random inputs at awkward sizes (feature `cuda`; needs a
//! GPU: run on the H200). Outputs are poisoned with NaN before every launch
//! (`HIP_CUDA_POISON=1`), so an element a kernel fails to write fails the check.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, IndexOp, Tensor};
use hip_kernels::cuda::{
    add_rms_norm_cuda, argmax_rows_cuda, matmul_small_cuda, matmul_small_cuda_form, matmul_small_glu_cuda,
    qkv_rope_write_cuda, silu_mul_cuda, to_f32_cuda, QkvRopeWrite, SmallMatmulForm,
};
use hip_kernels::{Error, Rope};

fn gpu() -> Device {
    std::env::set_var("HIP_CUDA_POISON", "1");
    Device::new_cuda(0).expect("a CUDA device")
}

fn cpu32(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap()
}

fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    let g = cpu32(got).flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = cpu32(want).flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(g.len(), w.len());
    let bad = g.iter().filter(|x| !x.is_finite()).count();
    assert_eq!(bad, 0, "{bad} of {} output elements are not finite (unwritten?)", g.len());
    let num: f64 = g.iter().zip(&w).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = w.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt() as f32
}

fn tol(dt: DType) -> f32 {
    if dt == DType::F32 {
        1e-5
    } else {
        1e-2
    }
}

/// The fused residual update + RMSNorm against the candle operations it replaces, at awkward
/// sizes, with and without a residual, in each output dtype; bad shapes and dtypes are typed
/// errors.
#[test]
fn add_rms_norm_matches_candle_ops() {
    let dev = gpu();
    for (rows, h) in [(1usize, 1536usize), (7, 4099), (97, 64), (16, 8960)] {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let x = Tensor::randn(0f32, 1.0, (rows, h), &dev).unwrap();
            let w = (Tensor::randn(0f32, 0.1, h, &dev).unwrap() + 1.0).unwrap();
            let delta = Tensor::randn(0f32, 0.5, (rows, h), &dev).unwrap().to_dtype(dt).unwrap();
            for d in [Some(&delta), None] {
                let what = format!("{rows}x{h} {dt:?} residual {}", d.is_some());
                let (xo, xn) = add_rms_norm_cuda(&x, d, &w, 1e-6, dt).unwrap();
                let want_x = match d {
                    Some(d) => (&x + d.to_dtype(DType::F32).unwrap()).unwrap(),
                    None => x.clone(),
                };
                let want_n = candle_nn::ops::rms_norm(&want_x, &w, 1e-6).unwrap();
                assert_eq!(xo.dtype(), DType::F32, "{what}");
                assert_eq!(xn.dtype(), dt, "{what}");
                let ex = rel_err(&xo, &want_x.to_device(&Device::Cpu).unwrap());
                assert!(ex <= 1e-6, "{what}: x rel err {ex}");
                let en = rel_err(&xn, &want_n.to_device(&Device::Cpu).unwrap());
                let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
                assert!(en <= tol, "{what}: norm rel err {en}");
            }
        }
    }
    let x = Tensor::zeros((3, 64), DType::F32, &dev).unwrap();
    let w = Tensor::ones(64, DType::F32, &dev).unwrap();
    let bad_w = Tensor::ones(63, DType::F32, &dev).unwrap();
    assert!(matches!(add_rms_norm_cuda(&x, None, &bad_w, 1e-6, DType::BF16), Err(Error::Shape { .. })));
    let d16 = Tensor::zeros((3, 64), DType::F16, &dev).unwrap();
    assert!(matches!(add_rms_norm_cuda(&x, Some(&d16), &w, 1e-6, DType::BF16), Err(Error::DType { .. })));
    let xb = x.to_dtype(DType::BF16).unwrap();
    assert!(matches!(add_rms_norm_cuda(&xb, None, &w, 1e-6, DType::BF16), Err(Error::DType { .. })));
    assert!(add_rms_norm_cuda(&x.to_device(&Device::Cpu).unwrap(), None, &w, 1e-6, DType::F32).is_err());
}

/// Bias, RoPE, q out and the K/V cache write in one launch against `x + bias`, Rope::rotate_tokens
/// (f32, on the CPU) and a row scatter: q from separate tensors or from column ranges of one fused
/// product, both pairings, with and without bias, every dtype; pool rows not written keep their
/// values exactly, and a row past the pools is skipped.
#[test]
fn qkv_rope_write_matches_candle_ops() {
    let dev = gpu();
    for (case, &(n, heads, kvh, d)) in
        [(1usize, 12usize, 2usize, 128usize), (7, 6, 1, 64), (97, 4, 4, 128)].iter().enumerate()
    {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            for (interleaved, fused, with_bias) in
                [(false, true, true), (true, false, true), (false, false, false), (true, true, false)]
            {
                let what = format!("n {n} heads {heads}/{kvh} d {d} {dt:?} interleaved {interleaved} fused {fused} bias {with_bias}");
                let (wq, wk) = (heads * d, kvh * d);
                let all = Tensor::randn(0f32, 1.0, (n, wq + 2 * wk), &dev).unwrap().to_dtype(dt).unwrap();
                let (q, k, v) = if fused {
                    (
                        all.narrow(1, 0, wq).unwrap(),
                        all.narrow(1, wq, wk).unwrap(),
                        all.narrow(1, wq + wk, wk).unwrap(),
                    )
                } else {
                    let c = |a, w| all.narrow(1, a, w).unwrap().contiguous().unwrap();
                    (c(0, wq), c(wq, wk), c(wq + wk, wk))
                };
                let bias = Tensor::randn(0f32, 0.5, wq + 2 * wk, &dev).unwrap();
                let rope = Rope::new(d, 1_000_000.0, interleaved).unwrap();
                let positions: Vec<usize> = (0..n).map(|i| 131_000 + 37 * i).collect();
                let (cos, sin) = rope.tables(&positions, &dev).unwrap();
                let pool_rows = 3 * n + 5;
                // Distinct rows, scattered; in the last case the last token's row is past the pools.
                let mut rows: Vec<u32> = (0..n as u32).map(|i| (i * 3 + 2) % pool_rows as u32).collect();
                if case == 2 {
                    rows[n - 1] = pool_rows as u32 + 3;
                }
                let rows_t = Tensor::from_slice(&rows, n, &dev).unwrap();
                let k_pool =
                    Tensor::randn(0f32, 1.0, (pool_rows, kvh, d), &dev).unwrap().to_dtype(dt).unwrap();
                let v_pool =
                    Tensor::randn(0f32, 1.0, (pool_rows, kvh, d), &dev).unwrap().to_dtype(dt).unwrap();
                let (k_before, v_before) = (cpu32(&k_pool), cpu32(&v_pool));
                let args = QkvRopeWrite {
                    q: &q,
                    k: &k,
                    v: &v,
                    bias: with_bias.then_some(&bias),
                    cos: &cos,
                    sin: &sin,
                    interleaved,
                    rows: &rows_t,
                    k_pool: &k_pool,
                    v_pool: &v_pool,
                    heads,
                };
                let got_q = qkv_rope_write_cuda(&args).unwrap();
                assert_eq!(got_q.dims(), [n, heads, d], "{what}");
                assert_eq!(got_q.dtype(), dt, "{what}");
                // Reference: f32 on the CPU.
                let b = cpu32(&bias);
                let add = |x: &Tensor, at: usize, w: usize, h: usize| {
                    let x = cpu32(x);
                    let x =
                        if with_bias { x.broadcast_add(&b.narrow(0, at, w).unwrap()).unwrap() } else { x };
                    x.reshape((1, n, h, d)).unwrap()
                };
                let (cc, sc) = (cpu32(&cos), cpu32(&sin));
                let want_q =
                    rope.rotate_tokens(&add(&q, 0, wq, heads), &cc, &sc).unwrap().squeeze(0).unwrap();
                let want_k = rope.rotate_tokens(&add(&k, wq, wk, kvh), &cc, &sc).unwrap().squeeze(0).unwrap();
                let want_v = add(&v, wq + wk, wk, kvh).squeeze(0).unwrap();
                let e = rel_err(&got_q, &want_q);
                assert!(e <= tol(dt), "{what}: q rel err {e}");
                for (name, pool, before, want) in
                    [("k", &k_pool, &k_before, &want_k), ("v", &v_pool, &v_before, &want_v)]
                {
                    let pool = cpu32(pool);
                    for r in 0..pool_rows {
                        let got_r = pool.i(r).unwrap();
                        match rows.iter().position(|&x| x as usize == r) {
                            Some(t) => {
                                let e = rel_err(&got_r, &want.i(t).unwrap());
                                assert!(e <= tol(dt), "{what}: {name} row {r} (token {t}) rel err {e}");
                            }
                            None => {
                                let same =
                                    (got_r - before.i(r).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
                                assert_eq!(
                                    same.to_scalar::<f32>().unwrap(),
                                    0.0,
                                    "{what}: {name} row {r} changed"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    // Typed errors.
    let z = |s: &[usize], dt| Tensor::zeros(s, dt, &dev).unwrap();
    let (q, k, v) = (z(&[2, 128], DType::BF16), z(&[2, 128], DType::BF16), z(&[2, 128], DType::BF16));
    let (cos, sin) = (z(&[2, 64], DType::F32), z(&[2, 64], DType::F32));
    let rows = Tensor::from_slice(&[0u32, 1], 2, &dev).unwrap();
    let pool = z(&[4, 1, 128], DType::BF16);
    let pool16 = z(&[4, 1, 128], DType::F16);
    let ok = QkvRopeWrite {
        q: &q,
        k: &k,
        v: &v,
        bias: None,
        cos: &cos,
        sin: &sin,
        interleaved: false,
        rows: &rows,
        k_pool: &pool,
        v_pool: &pool,
        heads: 1,
    };
    assert!(qkv_rope_write_cuda(&ok).is_ok());
    assert!(matches!(qkv_rope_write_cuda(&QkvRopeWrite { k_pool: &pool16, ..ok }), Err(Error::DType { .. })));
    assert!(matches!(qkv_rope_write_cuda(&QkvRopeWrite { heads: 2, ..ok }), Err(Error::Shape { .. })));
    let bad_cos = z(&[2, 63], DType::F32);
    assert!(matches!(qkv_rope_write_cuda(&QkvRopeWrite { cos: &bad_cos, ..ok }), Err(Error::Shape { .. })));
    let qt = z(&[128, 2], DType::BF16).t().unwrap();
    assert!(matches!(
        qkv_rope_write_cuda(&QkvRopeWrite { q: &qt, ..ok }),
        Err(Error::InvalidArgument { .. })
    ));
    let cpu_q = q.to_device(&Device::Cpu).unwrap();
    assert!(qkv_rope_write_cuda(&QkvRopeWrite { q: &cpu_q, ..ok }).is_err());
}

/// SwiGLU's gate over a fused gate/up product against candle's silu and product.
#[test]
fn silu_mul_matches_candle_ops() {
    let dev = gpu();
    for (rows, ffn) in [(1usize, 8960usize), (7, 97), (97, 64), (16, 4099)] {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let y = Tensor::randn(0f32, 2.0, (rows, 2 * ffn), &dev).unwrap().to_dtype(dt).unwrap();
            let got = silu_mul_cuda(&y).unwrap();
            assert_eq!((got.dims(), got.dtype()), (&[rows, ffn][..], dt));
            let y32 = cpu32(&y);
            let want = (candle_nn::ops::silu(&y32.narrow(1, 0, ffn).unwrap()).unwrap()
                * y32.narrow(1, ffn, ffn).unwrap())
            .unwrap();
            let e = rel_err(&got, &want);
            assert!(e <= tol(dt), "{rows}x{ffn} {dt:?}: rel err {e}");
        }
    }
    let odd = Tensor::zeros((2, 7), DType::BF16, &dev).unwrap();
    assert!(matches!(silu_mul_cuda(&odd), Err(Error::Shape { .. })));
    assert!(matches!(
        silu_mul_cuda(&odd.to_dtype(DType::U32).unwrap()),
        Err(Error::Shape { .. } | Error::DType { .. })
    ));
}

/// Row arg max (first of equal maxima) against the CPU's, at vocabulary sizes and awkward ones,
/// with ties and rows of -inf.
#[test]
fn argmax_rows_matches_cpu() {
    let dev = gpu();
    for (rows, cols) in [(1usize, 151_936usize), (16, 151_936), (7, 97), (3, 1), (5, 40_000)] {
        let mut x = Tensor::randn(0f32, 3.0, (rows, cols), &Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        if cols > 2 {
            // Row 0: a tie between two columns, the later one written first.
            let m = x[0].iter().cloned().fold(f32::NEG_INFINITY, f32::max) + 1.0;
            x[0][cols - 1] = m;
            x[0][cols / 2] = m;
        }
        if rows > 2 {
            x[2] = vec![f32::NEG_INFINITY; cols];
        }
        let want: Vec<u32> = x
            .iter()
            .map(|r| (0..r.len()).fold(0usize, |b, c| if r[c] > r[b] { c } else { b }) as u32)
            .collect();
        let t = Tensor::new(x, &dev).unwrap();
        assert_eq!(argmax_rows_cuda(&t).unwrap(), want, "{rows}x{cols}");
        if cols > 2 {
            assert_eq!(want[0] as usize, cols / 2);
        }
    }
    let b = Tensor::zeros((2, 8), DType::BF16, &dev).unwrap();
    assert!(matches!(argmax_rows_cuda(&b), Err(Error::DType { .. })));
    let e = Tensor::zeros((2, 0), DType::F32, &dev).unwrap();
    assert!(matches!(argmax_rows_cuda(&e), Err(Error::Shape { .. })));
}

/// SwiGLU's gate fused into the few-row product: bit for bit the plain product in a form with
/// the same warps followed by silu_mul (each warps count, every row count 1..=16, Qwen2.5-1.5B's
/// gate/up, awkward shapes), close to an f32 CPU reference; typed errors.
#[test]
fn matmul_small_glu_matches_product_then_silu_mul() {
    let dev = gpu();
    let shapes =
        [(1usize, 32usize, 16usize), (16, 1536, 17920), (7, 1536, 17920), (13, 96, 48), (5, 4128, 96)];
    for (m, k, n) in shapes.into_iter().chain((1..=16).map(|m| (m, 160, 32))) {
        for dt in [DType::BF16, DType::F16] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap().to_dtype(dt).unwrap();
            let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap().to_dtype(dt).unwrap();
            let y = cpu32(&x).matmul(&cpu32(&w).t().unwrap()).unwrap();
            let (g, u) = (y.narrow(1, 0, n / 2).unwrap(), y.narrow(1, n / 2, n / 2).unwrap());
            let want = (candle_nn::ops::silu(&g).unwrap() * u).unwrap();
            for warps in [None, Some(4), Some(8), Some(16)] {
                let got = matmul_small_glu_cuda(&x, &w, warps).unwrap();
                assert_eq!((got.dims(), got.dtype()), (&[m, n / 2][..], dt));
                let form =
                    SmallMatmulForm::ALL.into_iter().find(|f| f.warps == warps.unwrap_or(4) && f.tiles == 1);
                let two = silu_mul_cuda(&matmul_small_cuda_form(&x, &w, form).unwrap()).unwrap();
                let (a, b) = (cpu32(&got).to_vec2::<f32>().unwrap(), cpu32(&two).to_vec2::<f32>().unwrap());
                assert_eq!(a, b, "{m}x{k} . {n}x{k} {dt:?} warps {warps:?}: fused != product + silu_mul");
                let e = rel_err(&got, &want);
                assert!(e <= tol(dt), "{m}x{k} . {n}x{k} {dt:?} warps {warps:?}: rel err {e}");
            }
        }
    }
    let bf = |shape: (usize, usize)| Tensor::zeros(shape, DType::BF16, &dev).unwrap();
    // ffn not a multiple of 8; too many rows.
    assert!(matches!(matmul_small_glu_cuda(&bf((4, 64)), &bf((24, 64)), None), Err(Error::Shape { .. })));
    assert!(matches!(matmul_small_glu_cuda(&bf((17, 64)), &bf((16, 64)), None), Err(Error::Shape { .. })));
    assert!(matches!(
        matmul_small_glu_cuda(&bf((4, 64)), &bf((16, 64)), Some(6)),
        Err(Error::InvalidArgument { .. })
    ));
}

/// The logits cast: bit for bit what candle's bf16 / f16 -> f32 cast gives on the CPU, at
/// awkward sizes (the 8-wide loads' tail, a step's 16 x 152k), from a view whose offset is not a
/// multiple of 8 values (the one-value path) and from an aligned one.
#[test]
fn to_f32_matches_candle_cast() {
    let dev = gpu();
    for dt in [DType::BF16, DType::F16] {
        for n in [1usize, 7, 97, 4099, 16 * 151_936] {
            let x = Tensor::randn(0f32, 4.0, n + 9, &Device::Cpu).unwrap().to_dtype(dt).unwrap();
            for off in [0usize, 8, 3] {
                let want =
                    x.narrow(0, off, n).unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                let xd = x.to_device(&dev).unwrap().narrow(0, off, n).unwrap();
                let got = to_f32_cuda(&xd).unwrap();
                assert_eq!(got.dims(), [n]);
                let got = got.to_vec1::<f32>().unwrap();
                let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dt:?} n {n} offset {off}");
            }
        }
        // Shape kept.
        let x = Tensor::ones((3, 5, 7), dt, &dev).unwrap();
        assert_eq!(to_f32_cuda(&x).unwrap().dims(), [3, 5, 7]);
    }
    let cpu = Tensor::ones(4, DType::BF16, &Device::Cpu).unwrap();
    assert!(matches!(to_f32_cuda(&cpu), Err(Error::UnsupportedDevice { .. })));
}

/// The few-row product against an f32 CPU matmul of the same bf16 / f16 values, at every row
/// count it takes (1, 7, 16 among them) and at the shapes of Qwen2.5-1.5B's products (q/k/v 2048,
/// o 1536, gate/up 17920 over k 1536; down 1536 over k 8960) plus awkward ones, in every form of
/// the kernel whose tiles divide n; bad shapes, forms and
/// dtypes are typed errors.
#[test]
fn matmul_small_matches_matmul() {
    let dev = gpu();
    let shapes = [
        (1usize, 32usize, 8usize),
        (7, 1536, 2048),
        (16, 8960, 1536),
        (13, 96, 4104),
        (16, 1536, 17920),
        (9, 4128, 96),
    ];
    for (m, k, n) in shapes.into_iter().chain((1..=16).map(|m| (m, 160, 24))) {
        for dt in [DType::BF16, DType::F16] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap().to_dtype(dt).unwrap();
            let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap().to_dtype(dt).unwrap();
            let want = cpu32(&x).matmul(&cpu32(&w).t().unwrap()).unwrap();
            // The picked form, then each form whose tiles divide n.
            let forms = SmallMatmulForm::ALL.into_iter().filter(|f| f.fits(n));
            for form in std::iter::once(None).chain(forms.map(Some)) {
                let got = matmul_small_cuda_form(&x, &w, form).unwrap();
                assert_eq!((got.dims(), got.dtype()), (&[m, n][..], dt));
                let e = rel_err(&got, &want);
                assert!(e <= tol(dt), "{m}x{k} . {n}x{k} {dt:?} {form:?}: rel err {e}");
            }
        }
    }
    // A strided x (a column range) is made contiguous first.
    let wide = Tensor::randn(0f32, 1.0, (5, 96), &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let x = wide.narrow(1, 32, 64).unwrap();
    let w = Tensor::randn(0f32, 0.1, (16, 64), &dev).unwrap().to_dtype(DType::BF16).unwrap();
    let want = cpu32(&x).matmul(&cpu32(&w).t().unwrap()).unwrap();
    assert!(rel_err(&matmul_small_cuda(&x, &w).unwrap(), &want) <= 1e-2);
    let bf = |shape: (usize, usize)| Tensor::zeros(shape, DType::BF16, &dev).unwrap();
    for (x, w) in [
        (bf((17, 64)), bf((8, 64))), // too many rows
        (bf((0, 64)), bf((8, 64))),  // none
        (bf((4, 48)), bf((8, 48))),  // k not a multiple of 32
        (bf((4, 64)), bf((8, 32))),  // k differs
        (bf((4, 64)), bf((12, 64))), // n not a multiple of 8
    ] {
        assert!(
            matches!(matmul_small_cuda(&x, &w), Err(Error::Shape { .. })),
            "{:?} {:?}",
            x.dims(),
            w.dims()
        );
    }
    for (n, warps, tiles) in [(8, 6, 1), (8, 4, 3), (8, 4, 2), (24, 8, 4)] {
        let form = Some(SmallMatmulForm { warps, tiles });
        assert!(
            matches!(
                matmul_small_cuda_form(&bf((4, 64)), &bf((n, 64)), form),
                Err(Error::InvalidArgument { .. })
            ),
            "n {n} {form:?}"
        );
    }
    let x32 = Tensor::zeros((4, 64), DType::F32, &dev).unwrap();
    let w32 = Tensor::zeros((8, 64), DType::F32, &dev).unwrap();
    assert!(matches!(matmul_small_cuda(&x32, &w32), Err(Error::DType { .. })));
    let xf = Tensor::zeros((4, 64), DType::F16, &dev).unwrap();
    assert!(matches!(matmul_small_cuda(&xf, &bf((8, 64))), Err(Error::DType { .. })));
}
