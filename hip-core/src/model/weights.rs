//! Loading the weights from GGUF and the forward pass.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use hip_kernels::PagedKv;

use super::config::{Arch, ModelConfig};
use super::layers::{dequant, rotate_tokens, Linear, Mlp, Qkv, RmsNorm, Rope, WeightPolicy};
use super::profile::{Phase, Phases};
use crate::attention::AttentionState;
use crate::error::{Error, Result};
use crate::kv::{PagedKvCache, SeqId};
use crate::loader::gguf::GgufFile;

#[derive(Debug)]
pub(super) struct Block {
    pub(super) attn_norm: RmsNorm,
    pub(super) qkv: Qkv,
    pub(super) o: Linear,
    pub(super) ffn_norm: RmsNorm,
    pub(super) mlp: Mlp,
}

/// A loaded transformer (weights stay quantized as stored).
#[derive(Debug)]
pub struct Model {
    pub(super) cfg: ModelConfig,
    pub(super) embed: Tensor,
    pub(super) blocks: Vec<Block>,
    pub(super) norm: RmsNorm,
    pub(super) output: Linear,
    pub(super) rope: Rope,
    pub(super) device: Device,
    pub(super) fingerprint: String,
}

/// New tokens of one sequence for a forward pass.
#[derive(Debug, Clone)]
pub struct SeqChunk<'a> {
    /// The sequence (its KV cache entry).
    pub seq: SeqId,
    /// Tokens appended at positions `kv.len(seq)..`.
    pub tokens: &'a [u32],
    /// Which logits to return for this chunk.
    pub logits: LogitsWanted,
}

/// Which positions of a chunk need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (a prefill chunk before the last).
    None,
    /// The last token only.
    Last,
    /// Every token (perplexity).
    All,
}

impl Model {
    /// Loads a GGUF model.
    ///
    /// # Errors
    /// As [`GgufFile::open`], [`GgufFile::config`] and [`GgufFile::tensor`]; shape mismatches of
    /// the weights are [`Error::Format`] naming the tensor.
    pub fn from_gguf(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::from_gguf_with(path, device, WeightPolicy::default())
    }

    /// Loads a GGUF model with an explicit [`WeightPolicy`].
    ///
    /// # Errors
    /// As [`Model::from_gguf`].
    pub fn from_gguf_with(path: impl AsRef<Path>, device: &Device, policy: WeightPolicy) -> Result<Self> {
        let mut f = GgufFile::open(path)?;
        let cfg = f.config()?;
        let fingerprint = f.fingerprint();
        let where_ = f.path().display().to_string();
        let expect = |name: &str, t: &candle_core::quantized::QTensor, want: &[usize]| -> Result<()> {
            if t.shape().dims() != want {
                return Err(Error::format(
                    where_.clone(),
                    format!("tensor {name} has shape {:?}, expected {want:?}", t.shape().dims()),
                ));
            }
            Ok(())
        };
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let embed_q = f.tensor("token_embd.weight", device)?;
        expect("token_embd.weight", &embed_q, &[cfg.vocab_size, h])?;
        let embed = embed_q.dequantize(device)?.to_dtype(DType::F32)?;
        let output = if f.has_tensor("output.weight") {
            let w = f.tensor("output.weight", device)?;
            expect("output.weight", &w, &[cfg.vocab_size, h])?;
            Linear::new(w, None, policy)?
        } else {
            Linear::new(embed_q, None, policy)?
        };
        let norm = RmsNorm::new(f.tensor("output_norm.weight", device)?, cfg.rms_eps, device)?;
        let mut blocks = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let mut lin = |name: &str, rows: usize, cols: usize, bias: bool| -> Result<Linear> {
                let full = format!("blk.{l}.{name}.weight");
                let w = f.tensor(&full, device)?;
                expect(&full, &w, &[rows, cols])?;
                let b = if bias {
                    let bn = format!("blk.{l}.{name}.bias");
                    let b = f.tensor(&bn, device)?;
                    expect(&bn, &b, &[rows])?;
                    Some(dequant(b, device)?)
                } else {
                    None
                };
                Linear::new(w, b, policy)
            };
            let bias = cfg.arch == Arch::Qwen2;
            let q = lin("attn_q", cfg.heads * hd, h, bias)?;
            let k = lin("attn_k", cfg.kv_heads * hd, h, bias)?;
            let v = lin("attn_v", cfg.kv_heads * hd, h, bias)?;
            let o = lin("attn_output", h, cfg.heads * hd, false)?;
            let gate = lin("ffn_gate", cfg.ffn, h, false)?;
            let up = lin("ffn_up", cfg.ffn, h, false)?;
            let down = lin("ffn_down", h, cfg.ffn, false)?;
            let attn_norm =
                RmsNorm::new(f.tensor(&format!("blk.{l}.attn_norm.weight"), device)?, cfg.rms_eps, device)?;
            let ffn_norm =
                RmsNorm::new(f.tensor(&format!("blk.{l}.ffn_norm.weight"), device)?, cfg.rms_eps, device)?;
            let qkv = Qkv::Split(q, k, v);
            blocks.push(Block { attn_norm, qkv, o, ffn_norm, mlp: Mlp::new(gate, up, down) });
        }
        let rope = Rope::new(hd, cfg.rope_theta, cfg.arch == Arch::Llama)?;
        Ok(Model { cfg, embed, blocks, norm, output, rope, device: device.clone(), fingerprint })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The fingerprint of the weights file (see [`GgufFile::fingerprint`]).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The model's rotary position embedding.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the new tokens of every chunk through the model, appending their keys and values to
    /// `kv`, and returns the requested logits per chunk (`[rows, vocab]` f32; an empty `[0, vocab]`
    /// tensor for [`LogitsWanted::None`]).
    ///
    /// The linear layers run once over the tokens of all chunks; attention runs per sequence.
    /// On error no sequence grows: reserved cache space is released.
    ///
    /// # Errors
    /// Out-of-vocabulary tokens ([`Error::InvalidArgument`]), a full KV cache, kernel errors.
    pub fn forward(
        &self,
        chunks: &[SeqChunk<'_>],
        kv: &mut PagedKvCache,
        attn: &mut AttentionState,
    ) -> Result<Vec<Tensor>> {
        let mut starts = Vec::with_capacity(chunks.len());
        for c in chunks {
            if let Some(&bad) = c.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                return Err(Error::arg(
                    "token",
                    bad,
                    format!("out of the vocabulary of {}", self.cfg.vocab_size),
                ));
            }
            starts.push(kv.len(c.seq)?);
        }
        for (i, c) in chunks.iter().enumerate() {
            if let Err(e) = kv.reserve(c.seq, c.tokens.len()) {
                for (c, &s) in chunks.iter().zip(&starts).take(i) {
                    let _ = kv.truncate(c.seq, s);
                }
                return Err(e);
            }
        }
        match self.forward_reserved(chunks, &starts, kv, attn) {
            Ok(out) => {
                for c in chunks {
                    kv.commit(c.seq, c.tokens.len())?;
                }
                Ok(out)
            }
            Err(e) => {
                for (c, &s) in chunks.iter().zip(&starts) {
                    let _ = kv.truncate(c.seq, s);
                    attn.forget(c.seq);
                }
                Err(e)
            }
        }
    }

    fn forward_reserved(
        &self,
        chunks: &[SeqChunk<'_>],
        starts: &[usize],
        kv: &mut PagedKvCache,
        attn: &mut AttentionState,
    ) -> Result<Vec<Tensor>> {
        let cfg = &self.cfg;
        let dev = &self.device;
        let mut prof = Phases::start(dev)?;
        let ids: Vec<u32> = chunks.iter().flat_map(|c| c.tokens.iter().copied()).collect();
        let n_total = ids.len();
        let positions: Vec<usize> =
            chunks.iter().zip(starts).flat_map(|(c, &s)| s..s + c.tokens.len()).collect();
        // The linear layers' input dtype (bf16 for plain weights on a GPU, else f32): the
        // normed activations are converted once per layer, and q and k rotate in it.
        let act = self.blocks.first().map_or(DType::F32, |b| b.qkv.dtype());
        // Under Dynamic RoPE the cache keeps un-rotated keys and attention positions them.
        let tables = if attn.rotates_keys() {
            attn.set_rope(&self.rope);
            None
        } else {
            Some(self.rope.tables(&positions, dev)?) // f32
        };
        // The tables in `act` for the rotation by candle's kernels, converted on first use (the
        // fused kernel takes them in f32).
        let mut act_tables: Option<(Tensor, Tensor)> = None;
        let ids_t = Tensor::from_vec(ids, n_total, dev)?;
        let x = self.embed.index_select(&ids_t, 0)?; // [N, hidden]
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();
        // A decode step (several short chunks, or one token) on a device cache: the K and V rows
        // of all of them written at once per layer (fused with RoPE where the weights allow),
        // through rows computed once per step; and one attention launch for all of them below,
        // a batch of one included, so that a sequence decodes the same way alone or in a batch.
        let distinct = || chunks.iter().enumerate().all(|(i, c)| chunks[..i].iter().all(|o| o.seq != c.seq));
        // (A lone token on an offloaded cache keeps the per-sequence path it was tested on.)
        let decode_step = (chunks.len() > 1 && n_total <= 1024) || (n_total == 1 && kv.host_bytes() == 0);
        let rows = if kv.is_on_device() && decode_step && distinct() {
            let pending: Vec<(SeqId, usize)> = chunks.iter().map(|c| (c.seq, c.tokens.len())).collect();
            Some(kv.pending_rows(&pending)?)
        } else {
            None
        };
        // A decode batch (one token per sequence, written by `rows`): the layers that are dense,
        // or HiP, for every sequence attend all of them in one launch, through tables (and HiP
        // mask slots) built once per step on first use. `HIP_BATCH_DECODE=0` attends sequence by
        // sequence (comparisons).
        #[cfg(feature = "cuda")]
        let batchable =
            rows.is_some() && chunks.iter().all(|c| c.tokens.len() == 1) && batch_decode_enabled();
        #[cfg(feature = "cuda")]
        let mut step: Option<StepBatch> = None;
        // The residual stream `x` (f32) and its next norm `xn` (in `act`): each residual update
        // comes with the norm that follows it (RmsNorm::add_forward).
        let first = self.blocks.first().map_or(&self.norm, |b| &b.attn_norm);
        let (mut x, mut xn) = first.add_forward(&x, None, act)?;
        prof.mark(Phase::Setup)?;
        for (layer, blk) in self.blocks.iter().enumerate() {
            // A decode batch on a device cache with fused q/k/v weights: bias, RoPE, q out and the
            // K/V write in one launch. Otherwise the products with bias, the rotation, a
            // conversion to the cache's dtype and the writes (here for a batch, or per sequence
            // below).
            #[cfg(feature = "cuda")]
            let fused = match (&rows, &tables) {
                (Some(rows), Some((cos, sin))) => {
                    attention_input(blk, &xn, rows, cos, sin, &self.rope, cfg.heads, layer, kv)?
                }
                _ => None,
            };
            #[cfg(not(feature = "cuda"))]
            let fused: Option<Tensor> = None;
            let (q, per_seq_kv) = match fused {
                Some(q) => {
                    prof.mark(Phase::Qkv)?;
                    (q, None)
                }
                None => {
                    let (q, k, v) = blk.qkv.forward(&xn)?;
                    let q = q.reshape((n_total, cfg.heads, cfg.head_dim))?;
                    let k = k.reshape((n_total, cfg.kv_heads, cfg.head_dim))?;
                    let v = v.reshape((n_total, cfg.kv_heads, cfg.head_dim))?.contiguous()?;
                    prof.mark(Phase::Qkv)?;
                    let (q, k) = match &tables {
                        Some((cos, sin)) => {
                            let (cos, sin) = match act_tables {
                                Some(ref t) => t,
                                None => act_tables.insert((cos.to_dtype(act)?, sin.to_dtype(act)?)),
                            };
                            (
                                rotate_tokens(&self.rope, &q, cos, sin)?,
                                rotate_tokens(&self.rope, &k, cos, sin)?,
                            )
                        }
                        None => (q.contiguous()?, k.contiguous()?),
                    };
                    // On a device cache, convert once for all sequences (the writes and the
                    // kernels then take the rows as they are).
                    let (q, k, v) = match kv.device_dtype() {
                        Some(dt) => (q.to_dtype(dt)?, k.to_dtype(dt)?, v.to_dtype(dt)?),
                        // The host cache and its kernels are f32.
                        None => (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?),
                    };
                    prof.mark(Phase::Rope)?;
                    match &rows {
                        Some(rows) => {
                            kv.write_rows(layer, rows, &k, &v)?;
                            (q, None)
                        }
                        None => (q, Some((k, v))),
                    }
                }
            };
            prof.mark(Phase::KvWrite)?;
            #[cfg(feature = "cuda")]
            let batched = match kv.device_pools(layer) {
                Some((k, v)) if batchable && (attn.dense_for_all(layer) || attn.hip_for_all(layer)) => {
                    if step.is_none() {
                        step = Some(StepBatch::new(chunks, starts, kv)?);
                    }
                    let sb = step.as_mut().expect("built above");
                    let bkv = hip_kernels::cuda::CudaPagedBatch {
                        k,
                        v,
                        block_tables: &sb.tables,
                        lens: &sb.lens,
                        lens_device: &sb.lens_device,
                        block_size: kv.config().block_size,
                    };
                    Some(if attn.dense_for_all(layer) {
                        crate::attention::dense_decode_batch(&q, &bkv, scale)?
                    } else {
                        if sb.slots.is_none() {
                            let slots = attn.batch_slots(&sb.seqs);
                            let on_dev: Vec<u32> = slots.iter().map(|&s| s as u32).collect();
                            let t = Tensor::from_vec(on_dev, slots.len(), dev)?;
                            sb.slots = Some((slots, t));
                        }
                        let (slots, slots_t) = sb.slots.as_ref().expect("set above");
                        attn.hip_decode_batch(layer, &sb.seqs, &q, &bkv, slots, slots_t, scale)?
                    })
                }
                _ => None,
            };
            #[cfg(not(feature = "cuda"))]
            let batched: Option<Tensor> = None;
            let out = match batched {
                Some(out) => out,
                None => {
                    let mut outs = Vec::with_capacity(chunks.len());
                    let mut off = 0;
                    for (c, &start) in chunks.iter().zip(starts) {
                        let n = c.tokens.len();
                        if let Some((k, v)) = &per_seq_kv {
                            kv.write_tensor(c.seq, layer, &k.narrow(0, off, n)?, &v.narrow(0, off, n)?)?;
                        }
                        let qc = q.narrow(0, off, n)?.unsqueeze(0)?;
                        let out = if kv.is_on_device() {
                            let view = kv.device_layer(c.seq, layer, start + n)?;
                            attn.attend_device_native(layer, c.seq, &qc, &view, scale)?
                        } else {
                            let pkv = PagedKv::from(kv.layer_view(c.seq, layer, start + n)?);
                            attn.attend(layer, c.seq, &qc, &pkv, scale)?
                        };
                        outs.push(out.squeeze(0)?);
                        off += n;
                    }
                    Tensor::cat(&outs, 0)?
                }
            };
            prof.mark(Phase::Attention)?;
            let a = out.reshape((n_total, cfg.heads * cfg.head_dim))?;
            let (x1, h) = blk.ffn_norm.add_forward(&x, Some(&blk.o.forward(&a)?), act)?;
            prof.mark(Phase::OutProj)?;
            let next = self.blocks.get(layer + 1).map_or(&self.norm, |b| &b.attn_norm);
            (x, xn) = next.add_forward(&x1, Some(&blk.mlp.forward(&h)?), act)?;
            prof.mark(Phase::Mlp)?;
        }
        // After the last layer `xn` is the final norm's output.
        let x = xn;
        // The rows that want logits, chunk by chunk (start in `want`, count), and one product
        // with the output matrix for all of them: per chunk it would read the whole matrix
        // (vocab × hidden) once per sequence of a decode batch.
        let mut want: Vec<u32> = Vec::new();
        let mut spans = Vec::with_capacity(chunks.len());
        let mut off = 0;
        for c in chunks {
            let n = c.tokens.len();
            let rows = match c.logits {
                LogitsWanted::None => 0..0,
                LogitsWanted::Last => off + n - 1..off + n,
                LogitsWanted::All => off..off + n,
            };
            spans.push((want.len(), rows.len()));
            want.extend(rows.map(|r| r as u32));
            off += n;
        }
        let logits = match want.len() {
            0 => None,
            w if w == n_total => Some(logits_f32(&self.output.forward(&x)?)?),
            w => {
                let idx = Tensor::from_vec(want, w, dev)?;
                Some(logits_f32(&self.output.forward(&x.index_select(&idx, 0)?)?)?)
            }
        };
        let mut out = Vec::with_capacity(chunks.len());
        for (start, count) in spans {
            out.push(match (&logits, count) {
                (Some(l), c) if c > 0 => l.narrow(0, start, c)?,
                _ => Tensor::zeros((0, cfg.vocab_size), DType::F32, dev)?,
            });
        }
        prof.mark(Phase::Head)?;
        prof.finish()?;
        Ok(out)
    }
}

/// A decode batch's attention input through one fused launch (bias, RoPE, q out, K/V into the
/// cache: `hip_kernels::cuda::qkv_rope_write_cuda`), when the layer's weights are fused, its
/// pools on the device in the products' dtype and `rows` the step's pending rows; `None`
/// otherwise (and with `HIP_FUSED=0`).
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn attention_input(
    blk: &Block,
    xn: &Tensor,
    rows: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    rope: &Rope,
    heads: usize,
    layer: usize,
    kv: &PagedKvCache,
) -> Result<Option<Tensor>> {
    if !xn.device().is_cuda() || !super::layers::fused_enabled() || kv.device_dtype() != Some(blk.qkv.dtype())
    {
        return Ok(None);
    }
    let Some((k_pool, v_pool, pool_rows)) = kv.pending_write_target(layer, rows) else { return Ok(None) };
    let Some(y) = blk.qkv.unbiased(xn) else { return Ok(None) };
    let ([q, k, v], bias) = y?;
    let args = hip_kernels::cuda::QkvRopeWrite {
        q: &q,
        k: &k,
        v: &v,
        bias,
        cos,
        sin,
        interleaved: rope.interleaved(),
        rows: pool_rows,
        k_pool,
        v_pool,
        heads,
    };
    Ok(Some(hip_kernels::cuda::qkv_rope_write_cuda(&args)?))
}

/// What a decode step's batched layers share, built once per step: the sequences, their block
/// tables and lengths on the device, and (for HiP layers) their mask slots.
#[cfg(feature = "cuda")]
struct StepBatch {
    seqs: Vec<SeqId>,
    tables: Tensor,
    lens_device: Tensor,
    lens: Vec<usize>,
    slots: Option<(Vec<usize>, Tensor)>,
}

#[cfg(feature = "cuda")]
impl StepBatch {
    /// The batch of one new token per chunk (already reserved in `kv`).
    fn new(chunks: &[SeqChunk<'_>], starts: &[usize], kv: &PagedKvCache) -> Result<Self> {
        let seqs: Vec<SeqId> = chunks.iter().map(|c| c.seq).collect();
        let lens: Vec<usize> = starts.iter().map(|s| s + 1).collect();
        let pairs: Vec<(SeqId, usize)> = seqs.iter().copied().zip(lens.iter().copied()).collect();
        let (tables, lens_device) = kv.device_batch_tables(&pairs)?;
        Ok(StepBatch { seqs, tables, lens_device, lens, slots: None })
    }
}

/// Whether decode batches attend dense layers in one launch (`HIP_BATCH_DECODE=0` turns it off).
#[cfg(feature = "cuda")]
fn batch_decode_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HIP_BATCH_DECODE").map_or(true, |v| v != "0"))
}

/// The logits in f32: on a GPU by one launch of wide loads (candle's cast of a step's 16 x 152k
/// bf16 logits took 25 us on the H200), elsewhere by candle's cast.
fn logits_f32(l: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if l.device().is_cuda() && matches!(l.dtype(), DType::BF16 | DType::F16) {
        return Ok(hip_kernels::cuda::to_f32_cuda(l)?);
    }
    Ok(l.to_dtype(DType::F32)?)
}
