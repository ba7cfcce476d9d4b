//! One end-to-end measurement: prefill of one sequence of T tokens, then greedy decode of a batch
//! of sequences that each hold those T tokens, through `Model::forward` and a paged KV cache (on
//! the model's device: bf16 blocks on a GPU, f32 on the host).
//!
//! What is timed, and how:
//! * **prefill**: the T prompt tokens of one sequence in chunks of `chunk` tokens (one
//!   `Model::forward` each, logits of the last token only), up to the greedy first token read back
//!   to the host, which waits for the device. `prefill_tok_s = T / seconds`.
//! * **decode**: the `batch` sequences advance together, one `Model::forward` per step with one
//!   single-token chunk per sequence; the next tokens are the per-sequence argmax, taken on the
//!   device and read back each step (as a serving engine must before the next step), so each step
//!   ends with the device idle. `decode_tok_s = batch * steps / seconds`. Before the timed steps,
//!   `decode_warmup` untimed steps run (a multiple of HiP's mask refresh interval keeps the timed
//!   window at the same share of refreshes as a long generation).
//!
//! The batch's sequences are not prefilled one by one (16 × 128k tokens would take most of the
//! run): the prefilled sequence is a template whose cache is **copied** into each decoding
//! sequence ([`PrefixMode::Copy`]: separate blocks, the memory and traffic of `batch` independent
//! caches) or **forked** ([`PrefixMode::Fork`]: shared blocks, copy-on-write; one copy of the
//! prompt in memory). The template itself is never decoded.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use hip_core::attention::{AttentionBackend, AttentionState};
use hip_core::kv::{KvCacheConfig, PagedKvCache, SeqId};
use hip_core::model::{LogitsWanted, Model, SeqChunk};

/// How the decoding sequences get the prompt's KV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixMode {
    /// Device-side copies of the template's blocks: independent caches.
    Copy,
    /// `PagedKvCache::fork`: the prompt's blocks are shared.
    Fork,
}

impl PrefixMode {
    /// `copy` or `fork`.
    pub fn name(self) -> &'static str {
        match self {
            PrefixMode::Copy => "copy",
            PrefixMode::Fork => "fork",
        }
    }
}

/// What to run for one (context, method).
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Prompt tokens T.
    pub context: usize,
    /// Decode batch sizes, each measured on fresh sequences.
    pub batches: Vec<usize>,
    /// Timed decode steps.
    pub decode: usize,
    /// Untimed decode steps before them.
    pub decode_warmup: usize,
    /// Prefill chunk (tokens per forward).
    pub chunk: usize,
    /// Copy or fork the prompt's KV into the decoding sequences.
    pub prefix: PrefixMode,
    /// KV block size (tokens).
    pub block_size: usize,
    /// Seed of the prompt tokens.
    pub seed: u64,
    /// KV-cache offloading of the HiP layers (CUDA builds; the prompt's KV is then forked into
    /// the decoding sequences, whatever `prefix` says).
    pub offload: Option<hip_core::Offload>,
}

/// The prefill of one (context, method).
#[derive(Debug, Clone)]
pub struct Prefill {
    /// Seconds for the T tokens.
    pub seconds: f64,
    /// T / seconds.
    pub tok_s: f64,
}

/// One decode measurement.
#[derive(Debug, Clone)]
pub struct Decode {
    /// Sequences.
    pub batch: usize,
    /// Timed steps.
    pub steps: usize,
    /// Seconds of the timed steps.
    pub seconds: f64,
    /// batch * steps / seconds.
    pub tok_s: f64,
    /// KV bytes of the batch's sequences at the end, a shared block counted once per sequence
    /// (the bytes attention reads per step).
    pub kv_bytes: usize,
    /// KV bytes held in the cache at the end, each block once (template included).
    pub kv_bytes_in_use: usize,
}

/// Seeded prompt tokens in `[0, vocab)`.
pub fn prompt(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = super::SplitMix64::new(seed);
    (0..n).map(|_| (rng.next_u64() % vocab.max(1) as u64) as u32).collect()
}

fn sync(dev: &Device) -> Result<(), String> {
    dev.synchronize().map_err(|e| format!("device sync: {e}"))
}

/// Greedy next token of each logits row `[1, vocab]`, argmax taken on the device.
fn greedy(logits: &[Tensor]) -> Result<Vec<u32>, String> {
    let e = |e: candle_core::Error| format!("argmax: {e}");
    Tensor::cat(logits, 0).map_err(e)?.argmax(1).map_err(e)?.to_vec1::<u32>().map_err(e)
}

/// The cache geometry of `model` for `tokens` tokens in blocks of `block_size`.
fn cache_config(model: &Model, tokens: usize, block_size: usize) -> KvCacheConfig {
    let c = model.config();
    KvCacheConfig {
        num_layers: c.layers,
        num_kv_heads: c.kv_heads,
        head_dim: c.head_dim,
        block_size,
        num_blocks: tokens.div_ceil(block_size.max(1)).max(1),
    }
}

/// A KV cache for `tokens` tokens in total, on the model's device (bf16 blocks on a CUDA
/// device, the f32 host cache otherwise).
pub fn new_cache(model: &Model, tokens: usize, block_size: usize) -> Result<PagedKvCache, String> {
    let cfg = cache_config(model, tokens, block_size);
    let dev = model.device();
    let kv = if dev.is_cuda() {
        PagedKvCache::new_on_device(cfg, dev, DType::BF16)
    } else {
        PagedKvCache::new(cfg)
    };
    kv.map_err(|e| format!("KV cache for {tokens} tokens: {e}"))
}

/// [`new_cache`] with the HiP layers of `backend` offloaded to pinned host memory (CUDA builds).
pub fn new_offloaded_cache(
    model: &Model,
    backend: &AttentionBackend,
    offload: &hip_core::Offload,
    tokens: usize,
    block_size: usize,
) -> Result<PagedKvCache, String> {
    let AttentionBackend::Hip(hip) = backend else {
        return Err("offloading needs the HiP backend".into());
    };
    offload.validate().map_err(|e| e.to_string())?;
    let c = model.config();
    let cfg = cache_config(model, tokens, block_size);
    let flags = hip.hip_layers(c.layers);
    #[cfg(feature = "cuda")]
    {
        PagedKvCache::new_on_device_offloaded(cfg, model.device(), DType::BF16, &flags)
            .map_err(|e| format!("offloaded KV cache for {tokens} tokens: {e}"))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (cfg, flags);
        Err("offloading needs the `cuda` feature".into())
    }
}

/// A new sequence holding a copy of the committed tokens of `template` in blocks of its own
/// (on the device for a device cache: a gather of the template's rows per layer).
pub fn copy_sequence(kv: &mut PagedKvCache, template: SeqId) -> Result<SeqId, String> {
    let e = |e: hip_core::Error| format!("copying the prompt's KV: {e}");
    let n = kv.len(template).map_err(e)?;
    let layers = kv.config().num_layers;
    let seq = kv.add_sequence();
    kv.reserve(seq, n).map_err(e)?;
    for layer in 0..layers {
        if kv.is_on_device() {
            let (k, v) = {
                let view = kv.device_layer(template, layer, n).map_err(e)?;
                let bs = view.block_size;
                let rows: Vec<u32> =
                    (0..n).map(|j| view.block_table[j / bs] * bs as u32 + (j % bs) as u32).collect();
                let ce = |x: candle_core::Error| format!("copying the prompt's KV: {x}");
                let idx = Tensor::from_vec(rows, n, view.k.device()).map_err(ce)?;
                (view.k.index_select(&idx, 0).map_err(ce)?, view.v.index_select(&idx, 0).map_err(ce)?)
            };
            kv.write_tensor(seq, layer, &k, &v).map_err(e)?;
        } else {
            let (k, v) = kv.gather_layer(template, layer, n).map_err(e)?;
            kv.write(seq, layer, &k, &v).map_err(e)?;
        }
    }
    kv.commit(seq, n).map_err(e)?;
    Ok(seq)
}

/// Prefills `tokens` into a new sequence of `kv`; returns it, the greedy next token and the
/// timing (see the [module documentation](self)).
pub fn prefill(
    model: &Model,
    kv: &mut PagedKvCache,
    attn: &mut AttentionState,
    tokens: &[u32],
    chunk: usize,
) -> Result<(SeqId, u32, Prefill), String> {
    if tokens.is_empty() || chunk == 0 {
        return Err("prefill needs at least one token and a chunk of at least one".into());
    }
    let e = |e: hip_core::Error| format!("prefill: {e}");
    let seq = kv.add_sequence();
    sync(model.device())?;
    let t0 = Instant::now();
    let mut last = None;
    let n_chunks = tokens.len().div_ceil(chunk);
    for (i, piece) in tokens.chunks(chunk).enumerate() {
        let logits = if i + 1 == n_chunks { LogitsWanted::Last } else { LogitsWanted::None };
        let out = model.forward(&[SeqChunk { seq, tokens: piece, logits }], kv, attn).map_err(e)?;
        last = out.into_iter().next();
    }
    let first = greedy(&[last.ok_or("prefill returned no logits")?])?[0];
    let seconds = t0.elapsed().as_secs_f64();
    Ok((seq, first, Prefill { seconds, tok_s: tokens.len() as f64 / seconds }))
}

/// Decodes `batch` sequences made from `template` (copied or forked) together: `warmup`
/// untimed steps, then `steps` timed ones. The sequences are removed afterwards.
pub fn decode(
    model: &Model,
    kv: &mut PagedKvCache,
    attn: &mut AttentionState,
    template: SeqId,
    first: u32,
    batch: usize,
    warmup: usize,
    steps: usize,
    prefix: PrefixMode,
) -> Result<Decode, String> {
    if batch == 0 || steps == 0 {
        return Err("decode needs a batch and a step count of at least one".into());
    }
    let e = |e: hip_core::Error| format!("decode: {e}");
    let vocab = model.config().vocab_size as u32;
    let mut seqs = Vec::with_capacity(batch);
    for _ in 0..batch {
        let s = match prefix {
            PrefixMode::Copy => copy_sequence(kv, template)?,
            PrefixMode::Fork => {
                let s = kv.fork(template).map_err(e)?;
                attn.fork(template, s);
                s
            }
        };
        seqs.push(s);
    }
    // Different first tokens, so the sequences do not stay identical.
    let mut toks: Vec<u32> = (0..batch as u32).map(|i| (first + i) % vocab).collect();
    let mut step = |toks: &mut Vec<u32>| -> Result<(), String> {
        let chunks: Vec<SeqChunk<'_>> = seqs
            .iter()
            .zip(toks.iter())
            .map(|(&seq, t)| SeqChunk { seq, tokens: std::slice::from_ref(t), logits: LogitsWanted::Last })
            .collect();
        let out = model.forward(&chunks, kv, attn).map_err(e)?;
        drop(chunks);
        *toks = greedy(&out)?;
        Ok(())
    };
    for _ in 0..warmup {
        step(&mut toks)?;
    }
    sync(model.device())?;
    let t0 = Instant::now();
    for _ in 0..steps {
        step(&mut toks)?;
    }
    sync(model.device())?;
    let seconds = t0.elapsed().as_secs_f64();
    let mut kv_bytes = 0;
    for &s in &seqs {
        kv_bytes += kv.seq_bytes(s).map_err(e)?;
    }
    let kv_bytes_in_use = kv.bytes_in_use();
    // The decoding sequences' offload caches go with them: report them first.
    #[cfg(feature = "cuda")]
    if let Some(t) = attn.offload_stats().map_err(e)? {
        let pct = |s: &hip_core::OffloadStats| 100.0 * s.hits as f64 / (s.hits + s.misses).max(1) as f64;
        eprintln!(
            "offload, batch {batch}: mask hits {:.1}% ({:?}); sparse hits {:.1}% ({:?}); GPU caches {:.1} MB",
            pct(&t.mask),
            t.mask,
            pct(&t.sparse),
            t.sparse,
            t.gpu_bytes as f64 / 1e6
        );
    }
    for s in seqs {
        kv.remove_sequence(s).map_err(e)?;
        attn.forget(s);
    }
    Ok(Decode { batch, steps, seconds, tok_s: (batch * steps) as f64 / seconds, kv_bytes, kv_bytes_in_use })
}

/// Blocks the whole measurement of `spec` needs: the template, plus for the largest batch its
/// copies (or, when forked, the blocks they add), each growing by `decode_warmup + decode` tokens.
pub fn cache_tokens(spec: &RunSpec) -> usize {
    let bs = spec.block_size.max(1);
    let bmax = spec.batches.iter().copied().max().unwrap_or(1);
    let grown = (spec.context + spec.decode_warmup + spec.decode).div_ceil(bs) * bs;
    let per_seq = match spec.prefix {
        PrefixMode::Copy => grown,
        // The shared part stays with the template; each fork adds its tail (and a copied
        // partial last block).
        PrefixMode::Fork => grown - spec.context / bs * bs + bs,
    };
    spec.context.div_ceil(bs) * bs + bmax * per_seq
}

/// Prefill, then decode at every batch size of `spec`, with `backend`. A fresh cache (sized by
/// [`cache_tokens`]) is allocated for the run and freed at its end.
pub fn run(
    model: &Model,
    backend: AttentionBackend,
    spec: &RunSpec,
) -> Result<(Prefill, Vec<Decode>), String> {
    let mut kv = match &spec.offload {
        Some(o) => new_offloaded_cache(model, &backend, o, cache_tokens(spec), spec.block_size)?,
        None => new_cache(model, cache_tokens(spec), spec.block_size)?,
    };
    #[allow(unused_mut)]
    let mut attn = AttentionState::new(backend).map_err(|e| e.to_string())?;
    #[cfg(feature = "cuda")]
    if let Some(o) = &spec.offload {
        attn.set_offload(o.clone(), cache_tokens(spec)).map_err(|e| e.to_string())?;
    }
    // Offloaded layers cannot be copied on the device: their sequences fork the prompt.
    let prefix = if spec.offload.is_some() { PrefixMode::Fork } else { spec.prefix };
    let tokens = prompt(spec.context, model.config().vocab_size, spec.seed);
    let (template, first, pre) = prefill(model, &mut kv, &mut attn, &tokens, spec.chunk)?;
    #[cfg(feature = "cuda")]
    if let Some(t) = attn.offload_stats().map_err(|e| e.to_string())? {
        eprintln!("offload, prefill: {:.2} GB staged on the GPU", t.staged_bytes as f64 / 1e9);
    }
    let mut decodes = Vec::with_capacity(spec.batches.len());
    for &b in &spec.batches {
        decodes.push(decode(
            model,
            &mut kv,
            &mut attn,
            template,
            first,
            b,
            spec.decode_warmup,
            spec.decode,
            prefix,
        )?);
    }
    Ok((pre, decodes))
}
