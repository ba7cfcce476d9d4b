//! The synchronous engine: sequences (persistent contexts in the paged KV cache), generation
//! requests on them, and [`Engine::step`], which runs one batched forward pass: at most one
//! prefill chunk's worth of queued tokens plus one decode token for every generating request.
//!
//! The engine is driven through `&mut self`; it starts no threads. hip-sdk runs it on one thread
//! per model.
//!
//! A finished generation leaves its last token uncached (its KV rows need one more forward pass).
//! Such a token is not prefilled on its own: it waits for the sequence's next append or request
//! and is prefilled together with it, so that the cache never depends on when that comes.

mod request;

use std::collections::BTreeMap;

use candle_core::Tensor;

pub use request::{Event, FinishReason, GenerateParams, RequestId};

use crate::attention::{AttentionBackend, AttentionState};
use crate::error::{Error, Result};
use crate::kv::{KvCacheConfig, PagedKvCache, SeqId};
use crate::loader::tokenizer::{DecodeStream, Tokenizer};
use crate::model::{LogitsWanted, Model, SeqChunk};
use crate::persist::{KvGeometry, LayerKv, SeqSnapshot};
use crate::sampling::Sampler;

/// Engine settings.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EngineConfig {
    /// Dense or HiP attention.
    pub attention: AttentionBackend,
    /// Tokens per KV-cache block.
    pub kv_block_size: usize,
    /// Memory for the KV cache, in bytes (K and V of every layer: f32 on the CPU, bf16 on a GPU).
    pub kv_budget_bytes: usize,
    /// Most prompt tokens processed per step (chunked prefill).
    pub prefill_chunk: usize,
    /// Most tokens a sequence may hold; `None` = the model's trained context length.
    pub max_context: Option<usize>,
    /// CPU engine: keep the KV cache in a memory-mapped temporary file in this folder
    /// ([`PagedKvCache::new_file_backed`]) instead of in RAM, so `kv_budget_bytes` may exceed
    /// the memory. `None` (the default): in RAM.
    pub kv_dir: Option<std::path::PathBuf>,
    /// GPU engine: KV-cache offloading ([`hip_kernels::offload`]): the HiP layers' K/V live in
    /// pinned host memory and attention reads them through two small GPU caches per layer and
    /// sequence sized by this; dense layers stay on the GPU. Needs the HiP backend without
    /// Dynamic RoPE. `None` (the default): the whole cache on the GPU.
    pub offload: Option<hip_kernels::offload::Offload>,
}

/// What KV-cache offloading did so far ([`Engine::offload_report`]): counters of the
/// mask-estimation and sparse-attention caches of every sequence and layer (distinct entries per
/// mask refresh), their GPU bytes, and the pinned host bytes of the offloaded layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct OffloadReport {
    /// The mask-estimation (key) caches.
    pub mask: hip_kernels::offload::OffloadStats,
    /// The sparse-attention (key and value) caches.
    pub sparse: hip_kernels::offload::OffloadStats,
    /// GPU bytes of the caches (banks, page tables, policy state).
    pub gpu_cache_bytes: u64,
    /// Pinned host bytes holding the offloaded layers' K/V.
    pub host_bytes: u64,
    /// Bytes of K/V that prefill chunks copied from the host store to the GPU before attending
    /// ([`Offload::prefill_stage_bytes`](hip_kernels::offload::Offload::prefill_stage_bytes)).
    pub prefill_staged_bytes: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            attention: AttentionBackend::Dense,
            kv_block_size: 16,
            kv_budget_bytes: 512 << 20,
            prefill_chunk: 512,
            max_context: None,
            kv_dir: None,
            offload: None,
        }
    }
}

impl EngineConfig {
    /// Sets the attention backend.
    pub fn with_attention(mut self, attention: AttentionBackend) -> Self {
        self.attention = attention;
        self
    }
    /// Sets the KV-cache memory budget.
    pub fn with_kv_budget_bytes(mut self, bytes: usize) -> Self {
        self.kv_budget_bytes = bytes;
        self
    }
    /// Sets the prefill chunk size.
    pub fn with_prefill_chunk(mut self, tokens: usize) -> Self {
        self.prefill_chunk = tokens;
        self
    }
    /// Sets the context limit.
    pub fn with_max_context(mut self, tokens: usize) -> Self {
        self.max_context = Some(tokens);
        self
    }
    /// Sets the KV block size.
    pub fn with_kv_block_size(mut self, tokens: usize) -> Self {
        self.kv_block_size = tokens;
        self
    }
    /// Keeps the (CPU) KV cache in a memory-mapped temporary file in `dir` (see
    /// [`EngineConfig::kv_dir`]).
    pub fn with_kv_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.kv_dir = Some(dir.into());
        self
    }
    /// Offloads the (GPU) KV cache to pinned host memory (see [`EngineConfig::offload`]).
    pub fn with_offload(mut self, offload: hip_kernels::offload::Offload) -> Self {
        self.offload = Some(offload);
        self
    }
}

#[derive(Debug, Clone)]
struct Seq {
    /// Every token of the context, including those not yet in the cache.
    tokens: Vec<u32>,
    /// Tokens already in the KV cache (`tokens[..cached]`).
    cached: usize,
    /// Tokens queued since the last time the queue was empty (progress reporting).
    prefill_total: usize,
    request: Option<RequestId>,
    /// The uncached tokens wait for the next append or request instead of being prefilled on
    /// their own: the last token of a finished generation, or those of a restored snapshot.
    /// Prefilling them together with what comes next makes the cache (and, with HiP, the
    /// approximation) independent of when the next request arrives.
    dangling: bool,
}

impl Seq {
    /// Fails while a request runs on the sequence.
    fn check_idle(&self, id: SeqId) -> Result<()> {
        match self.request {
            Some(r) => Err(Error::arg("sequence", id, format!("busy with request {r}"))),
            None => Ok(()),
        }
    }
}

#[derive(Debug)]
struct Req {
    seq: SeqId,
    params: GenerateParams,
    sampler: Sampler,
    generated: Vec<u32>,
    /// Incremental detokenizer of the generated tokens (end-of-sequence tokens excluded).
    stream: DecodeStream,
    /// The text decoded so far.
    text: String,
    /// Bytes of `text` already reported.
    emitted: usize,
}

/// The engine: a model, its tokenizer, the KV cache and the live sequences and requests.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    tokenizer: Tokenizer,
    kv: PagedKvCache,
    attn: AttentionState,
    cfg: EngineConfig,
    max_context: usize,
    seqs: BTreeMap<SeqId, Seq>,
    reqs: BTreeMap<RequestId, Req>,
    next_request: u64,
}

impl Engine {
    /// Builds an engine.
    ///
    /// # Errors
    /// A tokenizer that does not fit the model, an invalid HiP config, a KV budget too small for
    /// one block, a zero prefill chunk.
    pub fn new(model: Model, tokenizer: Tokenizer, cfg: EngineConfig) -> Result<Self> {
        tokenizer.check_vocab(model.config().vocab_size)?;
        if cfg.prefill_chunk == 0 {
            return Err(Error::arg("prefill_chunk", 0, "must be at least 1"));
        }
        let mc = model.config();
        // On a GPU the cache lives there, in bf16 (the CUDA kernels' input type): the budget then
        // holds twice as many f32-sized blocks' worth of tokens.
        let on_gpu = model.device().is_cuda();
        let budget = if on_gpu { cfg.kv_budget_bytes.saturating_mul(2) } else { cfg.kv_budget_bytes };
        let kv_cfg =
            KvCacheConfig::for_bytes(mc.layers, mc.kv_heads, mc.head_dim, cfg.kv_block_size, budget)?;
        let max_context = cfg.max_context.unwrap_or(mc.context_length).max(1);
        let kv = match (&cfg.kv_dir, on_gpu) {
            _ if cfg.offload.is_some() => Self::offloaded_cache(&cfg, kv_cfg, &model, max_context)?,
            (Some(dir), true) => {
                return Err(Error::arg(
                    "kv_dir",
                    dir.display(),
                    "a file-backed KV cache is for the CPU engine; a GPU engine keeps its cache on the GPU",
                ))
            }
            (None, true) => PagedKvCache::new_on_device(kv_cfg, model.device(), candle_core::DType::BF16)?,
            (Some(dir), false) => PagedKvCache::new_file_backed(kv_cfg, dir)?,
            (None, false) => PagedKvCache::new(kv_cfg)?,
        };
        #[allow(unused_mut)]
        let mut attn = AttentionState::new(cfg.attention.clone())?;
        #[cfg(feature = "cuda")]
        if let Some(o) = &cfg.offload {
            attn.set_offload(o.clone(), max_context)?;
        }
        if max_context > mc.context_length && !attn.rotates_keys() {
            tracing::warn!(
                max_context,
                trained = mc.context_length,
                "contexts past the model's trained length see rotary positions it was not trained on; \
                 HipConfig::with_rope_extend (Dynamic RoPE) keeps attention distances inside it"
            );
        }
        Ok(Engine {
            model,
            tokenizer,
            kv,
            attn,
            cfg,
            max_context,
            seqs: BTreeMap::new(),
            reqs: BTreeMap::new(),
            next_request: 0,
        })
    }

    /// The KV cache of an offloading engine: HiP layers in pinned host memory, dense layers on
    /// the GPU.
    fn offloaded_cache(
        cfg: &EngineConfig,
        kv_cfg: KvCacheConfig,
        model: &Model,
        max_context: usize,
    ) -> Result<PagedKvCache> {
        let o = cfg.offload.as_ref().expect("called with offload set");
        o.validate()?;
        if cfg.kv_dir.is_some() || !model.device().is_cuda() {
            return Err(Error::arg(
                "offload",
                "set",
                "KV-cache offloading is for a GPU engine without kv_dir (the CPU engine's analogue is kv_dir)",
            ));
        }
        let hip = match &cfg.attention {
            AttentionBackend::Hip(h) if h.rope_extend.is_none() => h,
            _ => {
                return Err(Error::arg(
                    "offload",
                    "set",
                    "KV-cache offloading needs the HiP backend without Dynamic RoPE",
                ))
            }
        };
        let flags = o.offloaded_layers(&hip.hip_layers(kv_cfg.num_layers));
        let layers = flags.iter().filter(|&&f| f).count();
        if layers == 0 {
            return Err(Error::arg(
                "offload.resident_layers",
                o.resident_layers,
                "leaves no HiP layer to offload (lower it, or do not offload)",
            ));
        }
        let host = (kv_cfg.num_blocks * kv_cfg.block_size * kv_cfg.row_len() * 2 * 2 * layers) as u64;
        if o.host_budget_bytes > 0 && host > o.host_budget_bytes {
            return Err(hip_kernels::Error::HostBudgetExceeded {
                tokens: kv_cfg.num_blocks * kv_cfg.block_size,
                need: host,
                budget: o.host_budget_bytes,
            }
            .into());
        }
        #[cfg(feature = "cuda")]
        {
            // One sequence's caches must fit next to the resident layers (typed error otherwise).
            let shape = hip_kernels::offload::KvShape::new(layers, kv_cfg.num_kv_heads, kv_cfg.head_dim, 2);
            o.check_fits(&shape, max_context, hip_kernels::cuda::free_gpu_bytes(model.device())?)?;
            PagedKvCache::new_on_device_offloaded(kv_cfg, model.device(), candle_core::DType::BF16, &flags)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = max_context;
            Err(Error::arg("offload", "set", "KV-cache offloading needs the `cuda` feature"))
        }
    }

    /// What KV-cache offloading did so far, or `None` when the engine does not offload (waits
    /// for the device).
    ///
    /// # Errors
    /// Driver errors.
    pub fn offload_report(&self) -> Result<Option<OffloadReport>> {
        #[cfg(feature = "cuda")]
        {
            Ok(self.attn.offload_stats()?.map(|t| OffloadReport {
                mask: t.mask,
                sparse: t.sparse,
                gpu_cache_bytes: t.gpu_bytes,
                host_bytes: self.kv.host_bytes(),
                prefill_staged_bytes: t.staged_bytes,
            }))
        }
        #[cfg(not(feature = "cuda"))]
        {
            Ok(None)
        }
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }
    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }
    /// The context limit in tokens.
    pub fn max_context(&self) -> usize {
        self.max_context
    }
    /// The KV cache (read-only: sizes, byte accounting).
    pub fn kv(&self) -> &PagedKvCache {
        &self.kv
    }

    /// A new, empty sequence.
    pub fn create_sequence(&mut self) -> SeqId {
        let id = self.kv.add_sequence();
        self.seqs.insert(
            id,
            Seq { tokens: Vec::new(), cached: 0, prefill_total: 0, request: None, dangling: false },
        );
        id
    }

    fn seq(&self, seq: SeqId) -> Result<&Seq> {
        self.seqs.get(&seq).ok_or(Error::UnknownSequence(seq.0))
    }

    fn idle_seq(&mut self, seq: SeqId) -> Result<&mut Seq> {
        let s = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        s.check_idle(seq)?;
        Ok(s)
    }

    /// Every token of the sequence's context (cached or queued).
    ///
    /// # Errors
    /// An unknown sequence.
    pub fn tokens(&self, seq: SeqId) -> Result<&[u32]> {
        Ok(&self.seq(seq)?.tokens)
    }

    /// Tokens of the sequence already in the KV cache.
    ///
    /// # Errors
    /// An unknown sequence.
    pub fn cached_len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.seq(seq)?.cached)
    }

    /// Queues `tokens` at the end of the sequence; later steps prefill them (reporting progress).
    ///
    /// # Errors
    /// An unknown or busy sequence; [`Error::ContextOverflow`] when the context would pass the
    /// limit (nothing is queued then); out-of-vocabulary tokens.
    pub fn append(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        let vocab = self.model.config().vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::arg("token", bad, format!("out of the vocabulary of {vocab}")));
        }
        let limit = self.max_context;
        let s = self.idle_seq(seq)?;
        let total = s.tokens.len() + tokens.len();
        if total > limit {
            return Err(Error::ContextOverflow { tokens: total, limit });
        }
        if s.cached == s.tokens.len() {
            s.prefill_total = 0;
        }
        s.tokens.extend_from_slice(tokens);
        s.prefill_total += tokens.len();
        s.dangling = false;
        Ok(())
    }

    /// Starts generating on `seq` after its context (queued tokens are prefilled first).
    ///
    /// # Errors
    /// An unknown or busy sequence, an empty context, invalid sampling parameters, a context
    /// already at its limit.
    pub fn generate(&mut self, seq: SeqId, params: GenerateParams) -> Result<RequestId> {
        let sampler = Sampler::new(params.sampling.clone())?;
        let limit = self.max_context;
        let s = self.idle_seq(seq)?;
        if s.tokens.is_empty() {
            return Err(Error::arg("sequence", seq, "has an empty context: append a prompt first"));
        }
        if s.tokens.len() >= limit {
            return Err(Error::ContextOverflow { tokens: s.tokens.len() + 1, limit });
        }
        if s.cached == s.tokens.len() {
            // Everything is cached but the logits of the last token are gone: recompute it.
            let keep = s.cached - 1;
            self.kv.truncate(seq, keep)?;
            self.attn.forget(seq);
            let s = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
            s.cached = keep;
            s.prefill_total = 1;
        }
        // Every request starts from a fresh decode mask, so that its tokens depend only on the
        // context (a restored session then continues exactly like the uninterrupted one).
        self.attn.forget(seq);
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.dangling = false;
        }
        let id = RequestId(self.next_request);
        self.next_request += 1;
        let stream = self.tokenizer.decode_stream(true);
        let req =
            Req { seq, params, sampler, generated: Vec::new(), stream, text: String::new(), emitted: 0 };
        self.reqs.insert(id, req);
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.request = Some(id);
        }
        Ok(id)
    }

    /// A new sequence sharing `seq`'s context (and its KV blocks, copy-on-write).
    ///
    /// # Errors
    /// An unknown or busy sequence.
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let s = self.idle_seq(seq)?.clone();
        let child = self.kv.fork(seq)?;
        self.attn.fork(seq, child);
        self.seqs.insert(child, s);
        Ok(child)
    }

    /// A copy of the sequence's context: its tokens and the KV rows of the cached ones, ready for
    /// [`persist::save`](crate::persist::save) or [`restore`](Self::restore).
    ///
    /// # Errors
    /// An unknown or busy sequence.
    pub fn snapshot(&self, seq: SeqId) -> Result<SeqSnapshot> {
        let s = self.seq(seq)?;
        s.check_idle(seq)?;
        let geometry = KvGeometry::of(&self.model);
        // Session files hold rotated keys; under Dynamic RoPE the cache holds them un-rotated.
        let keys = KeyPositions::new(self);
        let layers = (0..geometry.num_layers)
            .map(|l| {
                let (k, v) = self.kv.gather_layer(seq, l, s.cached)?;
                Ok(LayerKv { k: keys.map(&k, 0, false)?.unwrap_or(k), v })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SeqSnapshot { geometry, tokens: s.tokens.clone(), cached: s.cached, layers })
    }

    /// A new sequence holding `snapshot`'s context: its cached KV rows are copied into the cache,
    /// its other tokens are queued for prefill.
    ///
    /// # Errors
    /// [`Error::SessionFile`] when the snapshot does not fit the model (geometry, vocabulary) or
    /// is inconsistent; [`Error::ContextOverflow`] past the context limit;
    /// [`Error::KvCacheFull`] when the cache has too few free blocks. Nothing changes on error.
    pub fn restore(&mut self, snapshot: &SeqSnapshot) -> Result<SeqId> {
        snapshot.check()?;
        self.check_restorable(snapshot.geometry, &snapshot.tokens, "snapshot")?;
        let keys = KeyPositions::new(self);
        self.restore_rows(&snapshot.tokens, snapshot.cached, |kv, seq| {
            kv.reserve(seq, snapshot.cached)?;
            for (l, layer) in snapshot.layers.iter().enumerate() {
                let k = keys.map(&layer.k, 0, true)?;
                kv.write(seq, l, k.as_deref().unwrap_or(&layer.k), &layer.v)?;
            }
            kv.commit(seq, snapshot.cached)
        })
    }

    /// [`restore`](Self::restore) straight from a memory-mapped session file: the KV rows are
    /// copied into the cache chunk by chunk, each chunk's checksums verified just before it is
    /// copied, so neither the file nor a [`SeqSnapshot`] of it has to fit in memory (with a
    /// file-backed cache, [`EngineConfig::with_kv_dir`], neither does the cache). The file was
    /// checked against this model when it was opened ([`MappedSession::open`]).
    ///
    /// # Errors
    /// As [`restore`](Self::restore); [`Error::SessionFile`] for a chunk whose checksum does not
    /// match. Nothing changes on error.
    ///
    /// [`MappedSession::open`]: crate::persist::MappedSession::open
    pub fn restore_mapped(&mut self, file: &crate::persist::MappedSession) -> Result<SeqId> {
        use crate::persist::KvArray;
        self.check_restorable(file.geometry(), file.tokens(), "session file")?;
        let keys = KeyPositions::new(self);
        let row = file.geometry().row_len();
        self.restore_rows(file.tokens(), file.cached(), |kv, seq| {
            for c in 0..file.chunks() {
                let rows = file.chunk_rows(c);
                kv.reserve(seq, rows.len())?;
                for l in 0..file.geometry().num_layers {
                    file.verify_chunk(l, KvArray::K, c)?;
                    file.verify_chunk(l, KvArray::V, c)?;
                    let span = rows.start * row..rows.end * row;
                    let k = &file.layer_k(l)?[span.clone()];
                    let rotated = keys.map(k, rows.start, true)?;
                    kv.write(seq, l, rotated.as_deref().unwrap_or(k), &file.layer_v(l)?[span])?;
                }
                kv.commit(seq, rows.len())?;
            }
            Ok(())
        })
    }

    /// The checks [`restore`](Self::restore) makes before it touches the cache: the geometry,
    /// the vocabulary, the context limit.
    fn check_restorable(&self, geometry: KvGeometry, tokens: &[u32], what: &'static str) -> Result<()> {
        use crate::persist::SessionFileProblem as P;
        let ours = KvGeometry::of(&self.model);
        if geometry != ours {
            return Err(P::Incompatible(format!("KV rows of {geometry:?}, the model has {ours:?}")).at(what));
        }
        let vocab = self.model.config().vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(P::Incompatible(format!("token {bad} is outside the vocabulary of {vocab}")).at(what));
        }
        if tokens.len() > self.max_context {
            return Err(Error::ContextOverflow { tokens: tokens.len(), limit: self.max_context });
        }
        Ok(())
    }

    /// A new sequence of `tokens` whose first `cached` rows `fill` writes into the cache; on
    /// error the sequence is removed again.
    fn restore_rows(
        &mut self,
        tokens: &[u32],
        cached: usize,
        fill: impl FnOnce(&mut PagedKvCache, SeqId) -> Result<()>,
    ) -> Result<SeqId> {
        let seq = self.kv.add_sequence();
        if let Err(e) = fill(&mut self.kv, seq) {
            self.kv.remove_sequence(seq)?;
            return Err(e);
        }
        let prefill_total = tokens.len() - cached;
        let s = Seq {
            tokens: tokens.to_vec(),
            cached,
            prefill_total,
            request: None,
            dangling: prefill_total > 0,
        };
        self.seqs.insert(seq, s);
        Ok(seq)
    }

    /// Cuts the sequence's context to its first `len` tokens. Tokens left uncached wait for the
    /// next append or request.
    ///
    /// # Errors
    /// An unknown or busy sequence, `len` past the end.
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let s = self.idle_seq(seq)?;
        if len > s.tokens.len() {
            return Err(Error::arg(
                "len",
                len,
                format!("past the {} tokens of the sequence", s.tokens.len()),
            ));
        }
        s.tokens.truncate(len);
        let cached = s.cached.min(len);
        s.cached = cached;
        s.prefill_total = len - cached;
        s.dangling = len > cached;
        self.kv.truncate(seq, cached)?;
        self.attn.forget(seq);
        Ok(())
    }

    /// Removes a sequence (aborting its request) and frees its cache blocks.
    ///
    /// # Errors
    /// An unknown sequence.
    pub fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        let s = self.seqs.remove(&seq).ok_or(Error::UnknownSequence(seq.0))?;
        if let Some(r) = s.request {
            self.reqs.remove(&r);
        }
        self.attn.forget(seq);
        self.kv.remove_sequence(seq)
    }

    /// Stops a request; the tokens it generated stay in the sequence (those not yet cached wait
    /// for the next append or request).
    ///
    /// # Errors
    /// An unknown request.
    pub fn abort(&mut self, request: RequestId) -> Result<()> {
        let r = self.reqs.remove(&request).ok_or(Error::UnknownRequest(request.0))?;
        if let Some(s) = self.seqs.get_mut(&r.seq) {
            s.request = None;
            s.dangling = s.cached < s.tokens.len();
        }
        Ok(())
    }

    /// Whether a step has anything to do.
    pub fn has_work(&self) -> bool {
        !self.reqs.is_empty() || self.seqs.values().any(|s| s.cached < s.tokens.len() && !s.dangling)
    }

    /// The sequence of a request.
    pub fn request_seq(&self, request: RequestId) -> Option<SeqId> {
        self.reqs.get(&request).map(|r| r.seq)
    }

    /// Runs one forward pass over a prefill chunk (at most `prefill_chunk` queued tokens, taken
    /// from sequences in id order) and one token of every generating request, samples, and
    /// reports what happened.
    ///
    /// A failure of the forward pass (a full KV cache, say) fails the requests and prefills of
    /// this step with [`Event::Failed`], leaves their sequences as before the step and drops their
    /// queued tokens; the engine stays usable.
    ///
    /// # Errors
    /// None today besides internal inconsistencies; per-request failures are events.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        let mut budget = self.cfg.prefill_chunk;
        // (seq, start, end, logits?)
        let mut plan: Vec<(SeqId, usize, usize, LogitsWanted)> = Vec::new();
        for (&id, s) in &self.seqs {
            let pending = s.tokens.len() - s.cached;
            if pending == 0 || s.dangling {
                continue;
            }
            let decoding = self.is_decoding(s);
            let n = if decoding && pending == 1 {
                1
            } else {
                if budget == 0 {
                    continue;
                }
                let n = pending.min(budget);
                budget -= n;
                n
            };
            let finishes = n == pending;
            let want = if finishes && s.request.is_some() { LogitsWanted::Last } else { LogitsWanted::None };
            plan.push((id, s.cached, s.cached + n, want));
        }
        if plan.is_empty() {
            return Ok(events);
        }
        let chunks: Vec<SeqChunk<'_>> = plan
            .iter()
            .map(|&(seq, a, b, logits)| SeqChunk { seq, tokens: &self.seqs[&seq].tokens[a..b], logits })
            .collect();
        let result = self.model.forward(&chunks, &mut self.kv, &mut self.attn);
        drop(chunks);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                for &(seq, _, _, _) in &plan {
                    let s = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
                    let request = s.request.take();
                    if let Some(r) = request {
                        // Generated tokens stay; the one not yet cached is dropped with the queue.
                        self.reqs.remove(&r);
                    }
                    s.tokens.truncate(s.cached);
                    s.prefill_total = 0;
                    events.push(Event::Failed { request, seq, error: e.to_string() });
                }
                return Ok(events);
            }
        };
        // The rows to sample, read back in one copy (on a GPU one transfer and one wait per
        // step instead of one per request).
        let mut sampled: Vec<Tensor> = Vec::new();
        for (&(seq, _, _, _), logit) in plan.iter().zip(&logits) {
            if logit.dim(0)? > 0 && self.seqs.get(&seq).is_some_and(|s| s.request.is_some()) {
                sampled.push(logit.clone());
            }
        }
        let mut rows = match sampled.len() {
            0 => Vec::new(),
            1 => vec![sampled[0].flatten_all()?.to_vec1::<f32>()?],
            _ => Tensor::cat(&sampled, 0)?.to_vec2::<f32>()?,
        }
        .into_iter();
        for (&(seq, _, end, _), logit) in plan.iter().zip(logits) {
            let s = self.seqs.get_mut(&seq).ok_or(Error::UnknownSequence(seq.0))?;
            s.cached = end;
            let s = &self.seqs[&seq];
            let pending = s.tokens.len() - s.cached;
            let generating = self.is_decoding(s);
            if !generating && s.prefill_total > 0 {
                events.push(Event::Prefill { seq, done: s.prefill_total - pending, total: s.prefill_total });
            }
            if logit.dim(0)? == 0 {
                continue;
            }
            let Some(rid) = s.request else { continue };
            // One row per (chunk with logits, request), taken in the same order as above.
            let row = rows
                .next()
                .ok_or_else(|| Error::arg("logits", seq.0, "no row read back for this request"))?;
            self.sample_and_report(rid, &row, &mut events)?;
        }
        Ok(events)
    }

    /// Whether the sequence's request has generated at least one token (its queue then holds the
    /// token to decode next).
    fn is_decoding(&self, s: &Seq) -> bool {
        s.request.is_some_and(|r| self.reqs.get(&r).is_some_and(|q| !q.generated.is_empty()))
    }

    fn sample_and_report(&mut self, rid: RequestId, logits: &[f32], events: &mut Vec<Event>) -> Result<()> {
        let req = self.reqs.get_mut(&rid).ok_or(Error::UnknownRequest(rid.0))?;
        let seq = self.seqs.get_mut(&req.seq).ok_or(Error::UnknownSequence(req.seq.0))?;
        let token = req.sampler.sample(logits, &seq.tokens)?;
        req.generated.push(token);
        seq.tokens.push(token);
        let is_eos = !req.params.ignore_eos
            && (self.tokenizer.eos_token_ids().contains(&token) || req.params.stop_tokens.contains(&token));
        if !is_eos {
            if let Some(piece) = req.stream.step(token)? {
                req.text.push_str(&piece);
            }
        }
        let stop_at = req
            .params
            .stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| req.text.find(s.as_str()))
            .min();
        let finish = if stop_at.is_some() {
            Some(FinishReason::StopString)
        } else if is_eos {
            Some(FinishReason::Eos)
        } else if req.generated.len() >= req.params.max_tokens {
            Some(FinishReason::MaxTokens)
        } else if seq.tokens.len() >= self.max_context {
            Some(FinishReason::ContextFull)
        } else {
            None
        };
        let text = &mut req.text;
        let release_end = match (finish, stop_at) {
            (_, Some(pos)) => pos,
            (Some(_), None) => {
                // Finished: release whatever the detokenizer still holds.
                if let Some(rest) = req.stream.flush()? {
                    text.push_str(&rest);
                }
                text.len()
            }
            (None, None) => {
                // Hold back any tail that may start a stop string (the detokenizer already holds
                // back incomplete characters).
                let mut end = text.len();
                for stop in &req.params.stop_strings {
                    for k in (1..stop.len()).rev() {
                        if stop.is_char_boundary(k) && text.ends_with(&stop[..k]) {
                            end = end.min(text.len() - k);
                            break;
                        }
                    }
                }
                end
            }
        };
        let release_end = release_end.max(req.emitted);
        let piece = req.text.get(req.emitted..release_end).unwrap_or_default().to_string();
        req.emitted = release_end;
        match finish {
            None => events.push(Event::Token { request: rid, token, text: piece }),
            Some(reason) => {
                events.push(Event::Token { request: rid, token, text: piece });
                events.push(Event::Finished { request: rid, reason, text: String::new() });
                let seq_id = req.seq;
                self.reqs.remove(&rid);
                if let Some(s) = self.seqs.get_mut(&seq_id) {
                    s.request = None;
                    s.prefill_total = s.tokens.len() - s.cached;
                    s.dangling = s.prefill_total > 0;
                }
            }
        }
        Ok(())
    }

    /// Runs steps until `request` finishes and returns its tokens and the finish reason (a
    /// convenience for tests and synchronous callers; other requests advance too).
    ///
    /// # Errors
    /// An unknown request; [`Error::InvalidArgument`] if it failed.
    pub fn run_to_completion(&mut self, request: RequestId) -> Result<(Vec<u32>, String, FinishReason)> {
        if !self.reqs.contains_key(&request) {
            return Err(Error::UnknownRequest(request.0));
        }
        let (mut tokens, mut text) = (Vec::new(), String::new());
        loop {
            for ev in self.step()? {
                match ev {
                    Event::Token { request: r, token, text: t } if r == request => {
                        tokens.push(token);
                        text.push_str(&t);
                    }
                    Event::Finished { request: r, reason, text: t } if r == request => {
                        text.push_str(&t);
                        return Ok((tokens, text, reason));
                    }
                    Event::Failed { request: Some(r), error, .. } if r == request => {
                        return Err(Error::arg("request", r, error));
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Converts key rows between a session file (rotated keys, as every backend but Dynamic RoPE
/// caches them) and the cache of an engine whose attention rotates keys itself.
struct KeyPositions {
    rope: Option<crate::Rope>,
    geometry: KvGeometry,
}

impl KeyPositions {
    fn new(engine: &Engine) -> Self {
        let rope = engine.attn.rotates_keys().then(|| engine.model.rope().clone());
        KeyPositions { rope, geometry: KvGeometry::of(&engine.model) }
    }

    /// `k: [n, kv_heads, head_dim]` rows of the tokens at `start..start + n`, rotated to their
    /// positions (`unrotate`: back); `None` when nothing changes (no Dynamic RoPE, no rows).
    fn map(&self, k: &[f32], start: usize, unrotate: bool) -> Result<Option<Vec<f32>>> {
        let Some(rope) = &self.rope else { return Ok(None) };
        let g = &self.geometry;
        let n = k.len() / g.row_len().max(1);
        if n == 0 {
            return Ok(None);
        }
        let t = candle_core::Tensor::from_slice(
            k,
            (1, n, g.num_kv_heads, g.head_dim),
            &candle_core::Device::Cpu,
        )?;
        let pos: Vec<usize> = (start..start + n).collect();
        let y = if unrotate { rope.unrotate(&t, &pos)? } else { rope.rotate(&t, &pos)? };
        Ok(Some(y.flatten_all()?.to_vec1::<f32>()?))
    }
}
