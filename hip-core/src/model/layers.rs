//! Shared layers: RMSNorm, RoPE, SwiGLU, and the quantized linear projection.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

pub(crate) use hip_kernels::Rope;

use crate::error::Result;

/// A linear projection with quantized weights (`y = x Wᵀ + b`).
#[derive(Debug)]
pub(crate) struct Linear {
    w: QMatMul,
    b: Option<Tensor>,
}

impl Linear {
    pub(crate) fn new(w: QTensor, b: Option<Tensor>, policy: WeightPolicy) -> Result<Self> {
        let w = match policy {
            WeightPolicy::AsStored => w,
            WeightPolicy::FastCpu => requantize_for_cpu(w)?,
        };
        Ok(Linear { w: QMatMul::from_qtensor(w)?, b })
    }
    /// A projection with plain (f32 / f16 / bf16) weights `[out, in]`, computed in their dtype
    /// (the bias is converted to it).
    pub(crate) fn from_tensor(w: Tensor, b: Option<Tensor>) -> Result<Self> {
        let b = b.map(|b| b.to_dtype(w.dtype())).transpose()?;
        Ok(Linear { w: QMatMul::Tensor(w), b })
    }
    /// The dtype the product takes its input in (and returns): the weights' for plain weights,
    /// f32 for quantized ones.
    pub(crate) fn dtype(&self) -> DType {
        match &self.w {
            QMatMul::Tensor(w) => w.dtype(),
            QMatMul::TensorF16(_) | QMatMul::QTensor(_) => DType::F32,
        }
    }
    /// `x Wᵀ + b`, with `x` converted to [`dtype`](Self::dtype) first when it is not in it (the
    /// result is in that dtype).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = self.dtype();
        #[cfg(feature = "cuda")]
        let small = self.forward_small(x)?;
        #[cfg(not(feature = "cuda"))]
        let small = None;
        let y = match small {
            Some(y) => y,
            None if x.dtype() == dt => self.w.forward(x)?,
            None => self.w.forward(&x.to_dtype(dt)?)?,
        };
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

#[cfg(feature = "cuda")]
impl Linear {
    /// A product of at most 16 rows with plain bf16 / f16 weights on the GPU (a decode step's)
    /// takes `hip_kernels::cuda::matmul_small_cuda` (one launch streaming the weights into
    /// tensor-core operands) instead of cuBLAS; `None` when it does not apply.
    ///
    /// Why (H200, docs/benchmarks.md): alone, the kernel is ~1 µs faster than cuBLAS on the
    /// narrow products and ~1 µs slower on gate/up, and in a 128k x 16 step it gained nothing
    /// (6.71 against 6.68–6.80 ms). Since our kernels launch with programmatic dependent launch
    /// (cuda/launch.rs), a product of ours starts while the kernel before it drains and lets the
    /// norm after it do the same, which cuBLAS's launches do not: the step went from 5.95–6.11
    /// to 5.72 ms (2026-12-04, one lease). `HIP_SMALL_MATMUL` limits it (comparisons): `0`
    /// never, `1` always (the default), another number: weights of at most that many million
    /// values (4: the q/k/v and o products of Qwen2.5-1.5B).
    fn forward_small(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some((w, x2)) = self.small_operands(x)? else { return Ok(None) };
        let y = hip_kernels::cuda::matmul_small_cuda(&x2, w)?;
        Ok(Some(y.reshape(out_shape(x, w.dims2()?.0))?))
    }

    /// SwiGLU over this fused gate/up product (`[2 ffn, k]` weights, no bias) in one launch of
    /// the few-row kernel (`hip_kernels::cuda::matmul_small_glu_cuda`: bit for bit the product
    /// followed by `silu_mul_cuda`, one launch less a layer); `None` where
    /// [`forward_small`](Self::forward_small) would not apply.
    pub(crate) fn forward_small_glu(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if self.b.is_some() {
            return Ok(None);
        }
        let Some((w, x2)) = self.small_operands(x)? else { return Ok(None) };
        let n = w.dims2()?.0;
        if n % 16 != 0 {
            return Ok(None);
        }
        let y = hip_kernels::cuda::matmul_small_glu_cuda(&x2, w, None)?;
        Ok(Some(y.reshape(out_shape(x, n / 2))?))
    }

    /// The weights and `x` as `[rows, k]` in their dtype when the few-row kernel takes this
    /// product (see [`forward_small`](Self::forward_small)).
    fn small_operands(&self, x: &Tensor) -> Result<Option<(&Tensor, Tensor)>> {
        static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let max = *MAX.get_or_init(|| {
            match std::env::var("HIP_SMALL_MATMUL").ok().and_then(|v| v.parse::<usize>().ok()) {
                Some(0) => 0,
                Some(1) | None => usize::MAX,
                Some(m) => m.saturating_mul(1 << 20),
            }
        });
        let QMatMul::Tensor(w) = &self.w else { return Ok(None) };
        let (n, k) = w.dims2()?;
        if n * k > max {
            return Ok(None);
        }
        let rows = if x.rank() == 0 || k == 0 { 0 } else { x.elem_count() / k };
        if !x.device().is_cuda()
            || !matches!(w.dtype(), DType::BF16 | DType::F16)
            || x.dims().last() != Some(&k)
            || !(1..=hip_kernels::cuda::MATMUL_SMALL_MAX_ROWS).contains(&rows)
            || k % 32 != 0
            || n % 8 != 0
        {
            return Ok(None);
        }
        Ok(Some((w, x.to_dtype(w.dtype())?.reshape((rows, k))?)))
    }
}

/// `x`'s shape with its last dimension `n`.
#[cfg(feature = "cuda")]
fn out_shape(x: &Tensor, n: usize) -> Vec<usize> {
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    shape
}

/// How quantized weights are kept in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WeightPolicy {
    /// Exactly as stored in the file.
    AsStored,
    /// Types that candle has no SIMD CPU kernel for (Q4_1, Q5_0, Q5_1, Q8_1) are re-quantized
    /// to Q8_0 at load time, which has one: several times faster on the CPU, slightly more
    /// memory, and a weight error far below the stored type's own rounding.
    #[default]
    FastCpu,
}

/// Re-quantizes a weight without a fast CPU dot product to Q8_0 (see [`WeightPolicy::FastCpu`]).
fn requantize_for_cpu(w: QTensor) -> Result<QTensor> {
    use candle_core::quantized::GgmlDType as G;
    let slow = matches!(w.dtype(), G::Q4_1 | G::Q5_0 | G::Q5_1 | G::Q8_1);
    let cols = w.shape().dims().last().copied().unwrap_or(0);
    if !slow || !w.device().is_cpu() || cols % G::Q8_0.block_size() != 0 {
        return Ok(w);
    }
    let f = w.dequantize(&w.device())?;
    Ok(QTensor::quantize(&f, G::Q8_0)?)
}

/// RMSNorm with a learned scale.
#[derive(Debug)]
pub(crate) struct RmsNorm {
    w: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub(crate) fn new(w: QTensor, eps: f32, dev: &Device) -> Result<Self> {
        Ok(RmsNorm { w: w.dequantize(dev)?, eps })
    }
    pub(crate) fn from_tensor(w: Tensor, eps: f32) -> Self {
        RmsNorm { w, eps }
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.w, self.eps)?)
    }
    /// The residual update and this norm: `(x + delta, norm(x + delta))`, the sum in f32 (`x`
    /// is f32, `delta` any float dtype or none), the norm converted to `dtype`. On CUDA with
    /// CUDA one launch ([`hip_kernels::cuda::add_rms_norm_cuda`]) instead of up to
    /// four (`HIP_FUSED=0` keeps the separate candle operations).
    pub(crate) fn add_forward(
        &self,
        x: &Tensor,
        delta: Option<&Tensor>,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda()
            && fused_enabled()
            && x.dtype() == DType::F32
            && self.w.dtype() == DType::F32
            && delta.is_none_or(|d| d.dtype() == dtype)
        {
            return Ok(hip_kernels::cuda::add_rms_norm_cuda(x, delta, &self.w, self.eps, dtype)?);
        }
        let x = match delta {
            Some(d) => (x + d.to_dtype(DType::F32)?)?,
            None => x.clone(),
        };
        let n = self.forward(&x)?.to_dtype(dtype)?;
        Ok((x, n))
    }
}

/// Whether the fused CUDA kernels of a step run ([`RmsNorm::add_forward`], [`Qkv`]'s bias, RoPE
/// and cache write, [`Mlp`]'s gate): on by default, `HIP_FUSED=0` keeps the separate candle
/// operations (comparisons). H200, Qwen2.5-1.5B shapes, 128k x 16: the fused norm alone took the
/// HiP step from 11.49 to 9.83 ms.
#[cfg(feature = "cuda")]
pub(crate) fn fused_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HIP_FUSED").map_or(true, |v| v != "0"))
}

/// The q, k and v projections: three products (quantized weights), or one over their stacked
/// plain weights `[q; k; v]` (one launch and one read of the input instead of three).
#[derive(Debug)]
pub(crate) enum Qkv {
    Split(Linear, Linear, Linear),
    /// The stacked weights without bias; the stacked bias (f32, and in the weights' dtype);
    /// the widths of q and of k (= v).
    Fused {
        w: Linear,
        bias: Option<(Tensor, Tensor)>,
        q_width: usize,
        kv_width: usize,
    },
}

impl Qkv {
    /// One product over `q: [q_width, in]`, `k, v: [kv_width, in]` (plain weights) and their
    /// biases (`[q_width]`, `[kv_width]`, any float dtype).
    pub(crate) fn fused(q: Tensor, k: Tensor, v: Tensor, bias: Option<[Tensor; 3]>) -> Result<Self> {
        let (q_width, kv_width) = (q.dim(0)?, k.dim(0)?);
        let dt = q.dtype();
        let w = Linear::from_tensor(Tensor::cat(&[&q, &k, &v], 0)?, None)?;
        let bias = match bias {
            Some(b) => {
                let b32 = Tensor::cat(
                    &[b[0].to_dtype(DType::F32)?, b[1].to_dtype(DType::F32)?, b[2].to_dtype(DType::F32)?],
                    0,
                )?;
                let bw = b32.to_dtype(dt)?;
                Some((b32, bw))
            }
            None => None,
        };
        Ok(Qkv::Fused { w, bias, q_width, kv_width })
    }
    /// The dtype the products take and return (see [`Linear::dtype`]).
    pub(crate) fn dtype(&self) -> DType {
        match self {
            Qkv::Split(q, _, _) => q.dtype(),
            Qkv::Fused { w, .. } => w.dtype(),
        }
    }
    /// `(q, k, v)` rows `[n, width]` with bias (column ranges of one product when fused).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            Qkv::Split(q, k, v) => {
                let x = x.to_dtype(q.dtype())?; // once for the three products
                Ok((q.forward(&x)?, k.forward(&x)?, v.forward(&x)?))
            }
            Qkv::Fused { w, bias, q_width, kv_width } => {
                let y = w.forward(x)?;
                let y = match bias {
                    Some((_, b)) => y.broadcast_add(b)?,
                    None => y,
                };
                let [q, k, v] = qkv_columns(&y, *q_width, *kv_width)?;
                Ok((q, k, v))
            }
        }
    }

    /// Fused weights only: the product `[n, q_width + 2 kv_width]` without bias, the q/k/v
    /// column ranges of it and the f32 bias, for a kernel that adds the bias itself.
    #[cfg(feature = "cuda")]
    pub(crate) fn unbiased(&self, x: &Tensor) -> Option<Result<([Tensor; 3], Option<&Tensor>)>> {
        let Qkv::Fused { w, bias, q_width, kv_width } = self else { return None };
        let cols = w.forward(x).and_then(|y| qkv_columns(&y, *q_width, *kv_width));
        Some(cols.map(|t| (t, bias.as_ref().map(|(b, _)| b))))
    }
}

/// The q, k and v column ranges of a fused product `y: [.., q_width + 2 kv_width]`.
fn qkv_columns(y: &Tensor, q_width: usize, kv_width: usize) -> Result<[Tensor; 3]> {
    let last = y.rank() - 1;
    Ok([
        y.narrow(last, 0, q_width)?,
        y.narrow(last, q_width, kv_width)?,
        y.narrow(last, q_width + kv_width, kv_width)?,
    ])
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub(crate) struct Mlp {
    gate_up: GateUp,
    down: Linear,
}

/// The gate and up projections: two products, or one over their weights stacked (`[2 ffn, in]`:
/// one launch and one read of the input instead of two; plain weights only).
#[derive(Debug)]
enum GateUp {
    Split(Linear, Linear),
    Fused(Linear, usize),
}

impl Mlp {
    /// Separate gate and up products (quantized weights).
    pub(crate) fn new(gate: Linear, up: Linear, down: Linear) -> Self {
        Mlp { gate_up: GateUp::Split(gate, up), down }
    }
    /// One product over the stacked plain weights `gate: [ffn, in]` and `up: [ffn, in]`.
    pub(crate) fn fused(gate: Tensor, up: Tensor, down: Linear) -> Result<Self> {
        let ffn = gate.dim(0)?;
        let w = Tensor::cat(&[&gate, &up], 0)?;
        Ok(Mlp { gate_up: GateUp::Fused(Linear::from_tensor(w, None)?, ffn), down })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.gate_up {
            GateUp::Split(gate, up) => {
                let x = x.to_dtype(gate.dtype())?; // once for both products
                (candle_nn::ops::silu(&gate.forward(&x)?)? * up.forward(&x)?)?
            }
            GateUp::Fused(gate_up, ffn) => {
                // A decode step's few rows: the gate in the product's launch.
                #[cfg(feature = "cuda")]
                if fused_enabled() {
                    if let Some(h) = gate_up.forward_small_glu(x)? {
                        return self.down.forward(&h);
                    }
                }
                let y = gate_up.forward(x)?;
                #[cfg(feature = "cuda")]
                if y.device().is_cuda() && y.rank() == 2 && fused_enabled() {
                    return self.down.forward(&hip_kernels::cuda::silu_mul_cuda(&y)?);
                }
                let last = y.rank() - 1;
                (candle_nn::ops::silu(&y.narrow(last, 0, *ffn)?)? * y.narrow(last, *ffn, *ffn)?)?
            }
        };
        self.down.forward(&h)
    }
}

/// Rotates `x: [tokens, heads, head_dim]` (token-major) with the tables of its tokens.
pub(crate) fn rotate_tokens(rope: &Rope, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(rope.rotate_tokens(&x.unsqueeze(0)?, cos, sin)?.squeeze(0)?)
}

/// Dequantizes a (bias / norm) tensor to f32.
pub(crate) fn dequant(t: QTensor, dev: &Device) -> Result<Tensor> {
    Ok(t.dequantize(dev)?.to_dtype(DType::F32)?)
}
