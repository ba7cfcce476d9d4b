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
//! With [`RunSpec::fill`] the prompt's KV is written from random values ([`fill`]) instead of
//! prefilled: for decode at contexts whose prefill would take minutes (decode speed does not
//! depend on the values). [`paired`] decodes two methods side by side in alternating rounds, for
//! ratios that the machine's drift between separate runs does not move.
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
    /// Write the prompt's KV from seeded random values ([`fill`]) instead of running the
    /// prefill: for decode measurements at contexts whose prefill would take minutes.
    pub fill: bool,
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

/// Greedy next token of each logits row `[1, vocab]`, argmax taken on the device (one launch
/// of many CTAs a row on CUDA: candle's argmax runs one CTA a row, 0.16 ms for 16 rows of a
/// 152k vocabulary on the H200).
fn greedy(logits: &[Tensor]) -> Result<Vec<u32>, String> {
    let e = |e: candle_core::Error| format!("argmax: {e}");
    let all = Tensor::cat(logits, 0).map_err(e)?;
    #[cfg(feature = "cuda")]
    if all.device().is_cuda() {
        return hip_kernels::cuda::argmax_rows_cuda(&all).map_err(|e| format!("argmax: {e}"));
    }
    all.argmax(1).map_err(e)?.to_vec1::<u32>().map_err(e)
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
    let flags = offload.offloaded_layers(&hip.hip_layers(c.layers));
    if !flags.contains(&true) {
        return Err(format!(
            "offload resident_layers {} leaves no HiP layer to offload",
            offload.resident_layers
        ));
    }
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

/// Writes `n` tokens of random K/V (standard normal, seeded on a GPU, in the cache's dtype) into a new
/// sequence of `kv`, `chunk` tokens at a time through the cache's own write path (write-through
/// to the host store for offloaded layers), without running the model. Decode speed does not
/// depend on the values: this stands in for a prefill at contexts where one would take minutes.
/// Returns the sequence and the time taken (`tok_s` is the fill rate, not a prefill rate).
pub fn fill(
    model: &Model,
    kv: &mut PagedKvCache,
    n: usize,
    chunk: usize,
    seed: u64,
) -> Result<(SeqId, Prefill), String> {
    if n == 0 || chunk == 0 {
        return Err("fill needs at least one token and a chunk of at least one".into());
    }
    let e = |e: hip_core::Error| format!("fill: {e}");
    let ce = |e: candle_core::Error| format!("fill: {e}");
    let c = model.config();
    let dev = model.device();
    // candle's CPU generator cannot be seeded; the values do not matter there either.
    if dev.is_cuda() {
        dev.set_seed(seed).map_err(ce)?;
    }
    let seq = kv.add_sequence();
    kv.reserve(seq, n).map_err(e)?;
    sync(dev)?;
    let t0 = Instant::now();
    let mut done = 0;
    while done < n {
        let m = chunk.min(n - done);
        for layer in 0..c.layers {
            let k = Tensor::randn(0f32, 1.0, (m, c.kv_heads, c.head_dim), dev).map_err(ce)?;
            let v = Tensor::randn(0f32, 1.0, (m, c.kv_heads, c.head_dim), dev).map_err(ce)?;
            kv.write_tensor(seq, layer, &k, &v).map_err(e)?;
        }
        kv.commit(seq, m).map_err(e)?;
        done += m;
    }
    sync(dev)?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok((seq, Prefill { seconds, tok_s: n as f64 / seconds }))
}

/// `batch` sequences made from a template (copied or forked), decoding together; see
/// [`decode`]. [`steps`](Self::steps) may be called many times (the paired runs interleave two
/// of these); [`finish`](Self::finish) reports and removes the sequences.
#[derive(Debug)]
pub struct Decoding {
    seqs: Vec<SeqId>,
    toks: Vec<u32>,
    steps: usize,
    seconds: f64,
}

impl Decoding {
    /// Makes the `batch` sequences from `template`; `first` is the template's next token (each
    /// sequence starts from a different one, so they do not stay identical).
    pub fn start(
        model: &Model,
        kv: &mut PagedKvCache,
        attn: &mut AttentionState,
        template: SeqId,
        first: u32,
        batch: usize,
        prefix: PrefixMode,
    ) -> Result<Self, String> {
        if batch == 0 {
            return Err("decode needs a batch of at least one".into());
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
        let toks = (0..batch as u32).map(|i| (first + i) % vocab).collect();
        Ok(Decoding { seqs, toks, steps: 0, seconds: 0.0 })
    }

    /// Runs `n` greedy steps; when `timed`, they count towards the result (the device is
    /// synchronised before and after). Returns the seconds of these steps.
    ///
    /// With `HIP_CUDA_PROFILE_TIMED=1` the CUDA profiler API brackets the timed steps
    /// (`cuProfilerStart` / `cuProfilerStop`), so that a profiler started with collection off
    /// (`ncu --profile-from-start off`, `nsys --capture-range=cudaProfilerApi`) records only
    /// them, not the model load, warm-up and prefill.
    pub fn steps(
        &mut self,
        model: &Model,
        kv: &mut PagedKvCache,
        attn: &mut AttentionState,
        n: usize,
        timed: bool,
    ) -> Result<f64, String> {
        let e = |e: hip_core::Error| format!("decode: {e}");
        sync(model.device())?;
        #[cfg(feature = "cuda")]
        let _profiled = match timed && std::env::var("HIP_CUDA_PROFILE_TIMED").is_ok_and(|v| v == "1") {
            true => Some(
                candle_core::cuda_backend::cudarc::driver::Profiler::new()
                    .map_err(|e| format!("cuProfilerStart: {e}"))?,
            ),
            false => None,
        };
        let t0 = Instant::now();
        for _ in 0..n {
            let chunks: Vec<SeqChunk<'_>> = self
                .seqs
                .iter()
                .zip(self.toks.iter())
                .map(|(&seq, t)| SeqChunk {
                    seq,
                    tokens: std::slice::from_ref(t),
                    logits: LogitsWanted::Last,
                })
                .collect();
            let out = model.forward(&chunks, kv, attn).map_err(e)?;
            drop(chunks);
            self.toks = greedy(&out)?;
        }
        sync(model.device())?;
        let seconds = t0.elapsed().as_secs_f64();
        if timed {
            self.steps += n;
            self.seconds += seconds;
        }
        Ok(seconds)
    }

    /// The measurement of the timed steps; removes the sequences (and their offload caches,
    /// whose hit ratios are printed first).
    pub fn finish(self, kv: &mut PagedKvCache, attn: &mut AttentionState) -> Result<Decode, String> {
        let e = |e: hip_core::Error| format!("decode: {e}");
        if self.steps == 0 {
            return Err("no timed decode steps".into());
        }
        let batch = self.seqs.len();
        let mut kv_bytes = 0;
        for &s in &self.seqs {
            kv_bytes += kv.seq_bytes(s).map_err(e)?;
        }
        let kv_bytes_in_use = kv.bytes_in_use();
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
        for s in self.seqs {
            kv.remove_sequence(s).map_err(e)?;
            attn.forget(s);
        }
        Ok(Decode {
            batch,
            steps: self.steps,
            seconds: self.seconds,
            tok_s: (batch * self.steps) as f64 / self.seconds,
            kv_bytes,
            kv_bytes_in_use,
        })
    }
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
    if steps == 0 {
        return Err("decode needs a step count of at least one".into());
    }
    let mut d = Decoding::start(model, kv, attn, template, first, batch, prefix)?;
    d.steps(model, kv, attn, warmup, false)?;
    d.steps(model, kv, attn, steps, true)?;
    d.finish(kv, attn)
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

/// A cache, attention state and prompt KV for one (context, method): the template sequence,
/// its next token, the prefill (or fill) timing, and how decoding sequences get the prompt.
struct Setup {
    kv: PagedKvCache,
    attn: AttentionState,
    template: SeqId,
    first: u32,
    pre: Prefill,
    prefix: PrefixMode,
}

/// Allocates a fresh cache sized by [`cache_tokens`] and prefills (or fills) the prompt.
fn setup(model: &Model, backend: AttentionBackend, spec: &RunSpec) -> Result<Setup, String> {
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
    let (template, first, pre) = if spec.fill {
        let (seq, pre) = fill(model, &mut kv, spec.context, spec.chunk, spec.seed)?;
        (seq, tokens[tokens.len() - 1], pre)
    } else {
        prefill(model, &mut kv, &mut attn, &tokens, spec.chunk)?
    };
    #[cfg(feature = "cuda")]
    if let Some(t) = attn.offload_stats().map_err(|e| e.to_string())? {
        eprintln!(
            "offload, prefill: {:.2} GB staged on the GPU; host store {:.1} GB",
            t.staged_bytes as f64 / 1e9,
            kv.host_bytes() as f64 / 1e9
        );
    }
    Ok(Setup { kv, attn, template, first, pre, prefix })
}

/// Prefill, then decode at every batch size of `spec`, with `backend`. A fresh cache (sized by
/// [`cache_tokens`]) is allocated for the run and freed at its end.
pub fn run(
    model: &Model,
    backend: AttentionBackend,
    spec: &RunSpec,
) -> Result<(Prefill, Vec<Decode>), String> {
    let mut s = setup(model, backend, spec)?;
    let mut decodes = Vec::with_capacity(spec.batches.len());
    for &b in &spec.batches {
        decodes.push(decode(
            model,
            &mut s.kv,
            &mut s.attn,
            s.template,
            s.first,
            b,
            spec.decode_warmup,
            spec.decode,
            s.prefix,
        )?);
    }
    Ok((s.pre, decodes))
}

/// Two methods decoding side by side, for a ratio that slow drifts of the machine do not move.
#[derive(Debug, Clone)]
pub struct Paired {
    /// The first method's prefill and decodes (one per batch size).
    pub a: (Prefill, Vec<Decode>),
    /// The second method's.
    pub b: (Prefill, Vec<Decode>),
    /// Per batch size, the second method's decode rate over the first's in each round.
    pub round_ratios: Vec<Vec<f64>>,
}

/// Prefills (or fills) the prompt of `spec_a` and of `spec_b` into two caches that stay
/// allocated together, then for each batch size decodes both in `rounds` rounds of
/// `spec_a.decode / rounds` timed steps each, alternating which goes first (A B, B A, A B, ...),
/// after `spec_a.decode_warmup` untimed steps each. The decode results sum every round.
pub fn paired(
    model: &Model,
    (backend_a, spec_a): (AttentionBackend, &RunSpec),
    (backend_b, spec_b): (AttentionBackend, &RunSpec),
    rounds: usize,
) -> Result<Paired, String> {
    if rounds == 0 || spec_a.decode == 0 || spec_a.decode % rounds != 0 {
        return Err(format!(
            "paired decode: {} timed steps do not split into {rounds} equal rounds",
            spec_a.decode
        ));
    }
    let n = spec_a.decode / rounds;
    let mut a = setup(model, backend_a, spec_a)?;
    let mut b = setup(model, backend_b, spec_b)?;
    let (mut da, mut db, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for &batch in &spec_a.batches {
        let mut xa = Decoding::start(model, &mut a.kv, &mut a.attn, a.template, a.first, batch, a.prefix)?;
        let mut xb = Decoding::start(model, &mut b.kv, &mut b.attn, b.template, b.first, batch, b.prefix)?;
        xa.steps(model, &mut a.kv, &mut a.attn, spec_a.decode_warmup, false)?;
        xb.steps(model, &mut b.kv, &mut b.attn, spec_a.decode_warmup, false)?;
        let mut r = Vec::with_capacity(rounds);
        for i in 0..rounds {
            let (ta, tb) = if i % 2 == 0 {
                let ta = xa.steps(model, &mut a.kv, &mut a.attn, n, true)?;
                (ta, xb.steps(model, &mut b.kv, &mut b.attn, n, true)?)
            } else {
                let tb = xb.steps(model, &mut b.kv, &mut b.attn, n, true)?;
                (xa.steps(model, &mut a.kv, &mut a.attn, n, true)?, tb)
            };
            r.push(ta / tb);
        }
        da.push(xa.finish(&mut a.kv, &mut a.attn)?);
        db.push(xb.finish(&mut b.kv, &mut b.attn)?);
        ratios.push(r);
    }
    Ok(Paired { a: (a.pre, da), b: (b.pre, db), round_ratios: ratios })
}
