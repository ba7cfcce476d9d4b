//! [`ModelBuilder`] → [`Model`]: a loaded model and its engine thread.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hip_core::attention::AttentionBackend;
use hip_core::engine::{Engine, EngineConfig};
use hip_core::loader::chat_template::ChatTemplate;
use hip_core::loader::gguf::GgufFile;
use hip_core::loader::tokenizer::Tokenizer;
use hip_core::model::ModelConfig;
use hip_core::HipConfig;
use tokio::sync::mpsc;

use crate::chat::Chat;
use crate::error::{Error, Result};
use crate::session::SessionBuilder;
use crate::worker::{Command, ModelShared, Worker, COMMAND_CAPACITY};

/// Texts longer than this (in bytes) are tokenized on a blocking thread.
const INLINE_ENCODE_BYTES: usize = 16 << 10;

/// Which attention the model runs.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Attention {
    /// Exact attention in every layer.
    Dense,
    /// HiP hierarchical sparse attention, except in the configured dense layers.
    Hip(HipConfig),
}

/// Where the weights and the KV cache live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Device {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// A CUDA GPU, by ordinal. Needs the `cuda` feature; without it, or without the GPU,
    /// [`ModelBuilder::build`] fails with a [`Load`](crate::ErrorKind::Load) error whose message
    /// starts with "no CUDA device".
    Cuda(usize),
}

/// Settings of a [`Model`]; [`build`](Self::build) loads it.
///
/// ```no_run
/// # async fn demo() -> hip_sdk::Result<()> {
/// use hip_sdk::{Attention, HipConfig, Model};
///
/// let model = Model::builder("smollm2-135m-instruct-q4_1.gguf")
///     .with_attention(Attention::Hip(HipConfig::default()))
///     .with_context_limit(32_768)
///     .with_kv_budget_bytes(2 << 30)
///     .with_threads(4)
///     .build()
///     .await?;
/// # let _ = model; Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until built"]
pub struct ModelBuilder {
    path: PathBuf,
    tokenizer: Option<PathBuf>,
    attention: Attention,
    context_limit: Option<usize>,
    kv_budget_bytes: Option<usize>,
    kv_block_size: Option<usize>,
    kv_dir: Option<PathBuf>,
    offload: Option<hip_core::Offload>,
    prefill_chunk: Option<usize>,
    threads: Option<usize>,
    device: Device,
}

impl ModelBuilder {
    /// A builder for the GGUF model at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ModelBuilder {
            path: path.into(),
            tokenizer: None,
            attention: Attention::Dense,
            context_limit: None,
            kv_budget_bytes: None,
            kv_block_size: None,
            kv_dir: None,
            offload: None,
            prefill_chunk: None,
            threads: None,
            device: Device::Cpu,
        }
    }

    /// Dense (the default) or HiP attention.
    pub fn with_attention(mut self, attention: Attention) -> Self {
        self.attention = attention;
        self
    }

    /// Most tokens a session's context may hold (default: the model's trained context length).
    pub fn with_context_limit(mut self, tokens: usize) -> Self {
        self.context_limit = Some(tokens);
        self
    }

    /// Memory of the KV cache shared by all sessions, in bytes, allocated when the model is
    /// built (default: hip-core's, 512 MiB).
    pub fn with_kv_budget_bytes(mut self, bytes: usize) -> Self {
        self.kv_budget_bytes = Some(bytes);
        self
    }

    /// CPU only: keep the KV cache in a memory-mapped temporary file in `dir` instead of in RAM,
    /// so the KV budget (and a session's context) may exceed the machine's memory: the OS pages
    /// in the blocks attention reads (HiP reads a few thousand keys per step) and writes pages
    /// back under memory pressure. The file is unlinked at creation, so nothing is left behind,
    /// even after a crash. A folder that cannot hold the file fails [`build`](Self::build); so
    /// does this option with a GPU device.
    pub fn with_kv_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.kv_dir = Some(dir.into());
        self
    }

    /// GPU only: KV-cache offloading. The HiP layers' keys and values live in pinned host
    /// memory (so the KV budget is host memory for them), and attention reads them through two
    /// small GPU caches per layer and session, sized by `offload`
    /// ([`Offload`](crate::Offload): tokens per KV head of the sparse-attention and
    /// mask-estimation caches, and a host budget); dense layers stay on the GPU. Needs HiP
    /// attention without Dynamic RoPE and a CUDA device: [`build`](Self::build) fails otherwise,
    /// and when the host memory cannot be pinned or exceeds the budget.
    ///
    /// ```no_run
    /// # async fn f() -> hip_sdk::Result<()> {
    /// use hip_sdk::{Attention, Device, HipConfig, Model, Offload};
    /// let model = Model::builder("model.gguf")
    ///     .with_device(Device::Cuda(0))
    ///     .with_attention(Attention::Hip(HipConfig::default()))
    ///     .with_kv_budget_bytes(64 << 30)
    ///     .with_offload(Offload::default())
    ///     .build()
    ///     .await?;
    /// # let _ = model; Ok(()) }
    /// ```
    pub fn with_offload(mut self, offload: hip_core::Offload) -> Self {
        self.offload = Some(offload);
        self
    }

    /// Tokens per KV-cache block (default 16).
    pub fn with_kv_block_size(mut self, tokens: usize) -> Self {
        self.kv_block_size = Some(tokens);
        self
    }

    /// Most queued tokens prefilled per engine step (default 512). Smaller chunks let other
    /// sessions' generations interleave more finely with a long append.
    pub fn with_prefill_chunk(mut self, tokens: usize) -> Self {
        self.prefill_chunk = Some(tokens);
        self
    }

    /// Size of the rayon thread pool the engine runs its steps in (default: rayon's global pool).
    pub fn with_threads(mut self, n: usize) -> Self {
        self.threads = Some(n);
        self
    }

    /// A Hugging Face `tokenizer.json` to use instead of the tokenizer in the GGUF file.
    pub fn with_tokenizer(mut self, path: impl Into<PathBuf>) -> Self {
        self.tokenizer = Some(path.into());
        self
    }

    /// The device (default [`Device::Cpu`]).
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("context limit", self.context_limit),
            ("KV budget", self.kv_budget_bytes),
            ("KV block size", self.kv_block_size),
            ("prefill chunk", self.prefill_chunk),
            ("thread count", self.threads),
        ];
        for (what, v) in positive {
            if v == Some(0) {
                return Err(Error::invalid(format!("the {what} must be at least 1")));
            }
        }
        if let Attention::Hip(cfg) = &self.attention {
            cfg.validate()
                .map_err(|e| Error::invalid(format!("invalid HiP configuration: {e}")).with_source(e))?;
        }
        Ok(())
    }

    /// Loads the model (on a blocking thread) and starts its engine thread.
    ///
    /// # Errors
    ///
    /// [`Load`](crate::ErrorKind::Load) for a missing, unreadable or corrupt model or tokenizer
    /// file, an unsupported architecture, an unavailable device;
    /// [`InvalidRequest`](crate::ErrorKind::InvalidRequest) for out-of-range settings (zero
    /// sizes, an invalid HiP configuration, a KV budget below one block).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops nothing already started: the loading finishes on its blocking
    /// thread and is then discarded.
    pub async fn build(self) -> Result<Model> {
        self.validate()?;
        let loaded = tokio::task::spawn_blocking(move || self.load())
            .await
            .map_err(|e| Error::engine(format!("model loading panicked: {e}")))??;
        loaded.start()
    }

    fn load(self) -> Result<Loaded> {
        let pool = match self.threads {
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("hip-worker-{i}"))
                    .build()
                    .map_err(|e| {
                        Error::engine(format!("cannot start the thread pool: {e}")).with_source(e)
                    })?,
            ),
            None => None,
        };
        let load = || self.load_in_pool();
        let (engine, chat) = match &pool {
            Some(p) => p.install(load)?,
            None => load()?,
        };
        Ok(Loaded { engine, chat, pool, path: self.path })
    }

    fn load_in_pool(&self) -> Result<(Engine, Option<Chat>)> {
        let device = match self.device {
            Device::Cpu => candle_core::Device::Cpu,
            Device::Cuda(i) => hip_core::device::cuda(i).map_err(Error::from_core_load)?,
        };
        let gguf = GgufFile::open(&self.path).map_err(Error::from_core_load)?;
        let tokenizer = match &self.tokenizer {
            Some(p) => Tokenizer::from_file(p),
            None => Tokenizer::from_gguf(gguf.content()),
        }
        .map_err(Error::from_core_load)?;
        let template = match ChatTemplate::from_gguf(gguf.content()) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("ignoring the model's chat template: {e}");
                None
            }
        };
        drop(gguf);
        let model = hip_core::model::Model::from_gguf(&self.path, &device).map_err(Error::from_core_load)?;
        let mut cfg = EngineConfig::default().with_attention(match &self.attention {
            Attention::Dense => AttentionBackend::Dense,
            Attention::Hip(c) => AttentionBackend::Hip(c.clone()),
        });
        if let Some(n) = self.context_limit {
            cfg = cfg.with_max_context(n);
        }
        if let Some(b) = self.kv_budget_bytes {
            cfg = cfg.with_kv_budget_bytes(b);
        }
        if let Some(n) = self.kv_block_size {
            cfg = cfg.with_kv_block_size(n);
        }
        if let Some(dir) = &self.kv_dir {
            cfg = cfg.with_kv_dir(dir);
        }
        if let Some(o) = &self.offload {
            cfg = cfg.with_offload(o.clone());
        }
        if let Some(n) = self.prefill_chunk {
            cfg = cfg.with_prefill_chunk(n);
        }
        let chat = template.map(|template| {
            let text = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
            Chat {
                template,
                bos: text(tokenizer.bos_token_id()),
                eos: text(tokenizer.eos_token_ids().first().copied()),
            }
        });
        let engine = Engine::new(model, tokenizer, cfg).map_err(|e| match e {
            hip_core::Error::Tokenizer(_) => Error::from_core_load(e),
            e => Error::invalid(format!("invalid engine settings: {e}")).with_source(e),
        })?;
        Ok((engine, chat))
    }
}

/// A loaded model, before its engine thread starts.
struct Loaded {
    engine: Engine,
    chat: Option<Chat>,
    pool: Option<rayon::ThreadPool>,
    path: PathBuf,
}

impl Loaded {
    fn start(self) -> Result<Model> {
        let Loaded { engine, chat, pool, path } = self;
        let info = Info {
            path,
            config: engine.model().config().clone(),
            fingerprint: engine.model().fingerprint().to_owned(),
            context_limit: engine.max_context(),
            kv_capacity_bytes: engine.kv().config().total_bytes(),
        };
        let tokenizer = engine.tokenizer().clone();
        let shared = Arc::new(ModelShared::default());
        let (tx, rx) = mpsc::channel(COMMAND_CAPACITY);
        let worker = Worker::new(engine, pool, Arc::clone(&shared), tx.downgrade());
        std::thread::Builder::new()
            .name("hip-engine".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| Error::engine(format!("cannot start the engine thread: {e}")).with_source(e))?;
        Ok(Model { inner: Arc::new(ModelInner { tx, shared, tokenizer, chat, info }) })
    }
}

#[derive(Debug)]
struct Info {
    path: PathBuf,
    config: ModelConfig,
    fingerprint: String,
    context_limit: usize,
    kv_capacity_bytes: usize,
}

pub(crate) struct ModelInner {
    tx: mpsc::Sender<Command>,
    pub(crate) shared: Arc<ModelShared>,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) chat: Option<Chat>,
    info: Info,
}

impl ModelInner {
    /// Sends a command, waiting for room in the channel.
    pub(crate) async fn send(&self, cmd: Command) -> Result<()> {
        self.shared.check_alive()?;
        self.tx.send(cmd).await.map_err(|_| self.shared.engine_error())
    }

    /// Tokenizes `text` (on a blocking thread when it is long).
    pub(crate) async fn encode(&self, text: String, add_special: bool) -> Result<Vec<u32>> {
        let encode = move |tok: &Tokenizer, text: &str| {
            tok.encode(text, add_special)
                .map_err(|e| Error::invalid(format!("cannot tokenize the text: {e}")).with_source(e))
        };
        if text.len() <= INLINE_ENCODE_BYTES {
            return encode(&self.tokenizer, &text);
        }
        let tok = self.tokenizer.clone();
        tokio::task::spawn_blocking(move || encode(&tok, &text))
            .await
            .map_err(|e| Error::engine(format!("tokenization panicked: {e}")))?
    }
}

/// A loaded model with its engine thread: the entry point of the SDK.
///
/// Cheap to clone (an `Arc`), `Send + Sync`. Each model has one engine OS thread that owns the
/// weights and the KV cache and batches the work of all its sessions; the thread exits when the
/// last clone of the model, the last [`Session`](crate::Session) and the last stream are dropped.
#[derive(Clone)]
pub struct Model {
    pub(crate) inner: Arc<ModelInner>,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.inner.info.path)
            .field("arch", &self.inner.info.config.arch)
            .field("context_limit", &self.inner.info.context_limit)
            .field("alive", &self.is_alive())
            .finish()
    }
}

/// KV-cache memory of a [`Model`], over all its sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct KvUsage {
    /// Bytes of the blocks in use (a block shared by forks counts once).
    pub bytes_in_use: usize,
    /// Bytes of the whole cache.
    pub capacity_bytes: usize,
}

impl Model {
    /// A [`ModelBuilder`] for the GGUF model at `path`.
    pub fn builder(path: impl Into<PathBuf>) -> ModelBuilder {
        ModelBuilder::new(path)
    }

    /// A [`SessionBuilder`] for a new session (a persistent context) on this model.
    pub fn session(&self) -> SessionBuilder {
        SessionBuilder::new(self.clone())
    }

    /// The model file.
    pub fn path(&self) -> &Path {
        &self.inner.info.path
    }

    /// The model's hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.inner.info.config
    }

    /// The fingerprint of the weights file.
    pub fn fingerprint(&self) -> &str {
        &self.inner.info.fingerprint
    }

    /// Most tokens a session's context may hold.
    pub fn context_limit(&self) -> usize {
        self.inner.info.context_limit
    }

    /// The tokenizer (to count tokens, say).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.inner.chat.is_some()
    }

    /// KV-cache memory in use, as of the engine's last step.
    pub fn kv_usage(&self) -> KvUsage {
        KvUsage {
            bytes_in_use: self.inner.shared.kv_in_use.load(Ordering::Relaxed),
            capacity_bytes: self.inner.info.kv_capacity_bytes,
        }
    }

    /// What KV-cache offloading ([`ModelBuilder::with_offload`]) did so far: hits, misses,
    /// inserts, evictions and bytes moved of the mask-estimation and sparse-attention caches of
    /// every session and layer, their GPU bytes and the pinned host bytes; `None` for a model
    /// that does not offload. Waits for the engine thread's current step.
    ///
    /// # Errors
    /// The engine thread failed; a device error while reading the counters.
    pub async fn offload_report(&self) -> Result<Option<hip_core::engine::OffloadReport>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.inner.send(Command::OffloadReport { reply }).await?;
        rx.await.map_err(|_| self.inner.shared.engine_error())?
    }

    /// Whether the engine thread is running (it stops only after a failure while handles exist).
    pub fn is_alive(&self) -> bool {
        self.inner.shared.check_alive().is_ok()
    }

    /// Makes the engine thread panic.
    #[cfg(test)]
    pub(crate) async fn inject_panic(&self) -> Result<()> {
        self.inner.send(Command::Panic).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;

    use super::*;
    use crate::GenerateOptions;

    fn model_path() -> PathBuf {
        let dir = std::env::var_os("HIP_ASSETS").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/hip")
        });
        let p = dir.join("smollm2-135m-instruct-q4_1.gguf");
        assert!(p.exists(), "{} is missing: run scripts/fetch-assets.sh", p.display());
        p
    }

    async fn small_model() -> Model {
        Model::builder(model_path()).with_kv_budget_bytes(8 << 20).build().await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_engine_panic_fails_requests_and_later_calls() {
        let model = small_model().await;
        let s = model.session().with_chat_template(false).build().await.unwrap();
        s.append("Hello").await.unwrap();
        let opts = GenerateOptions::greedy().with_max_tokens(1000).with_ignore_eos(true);
        let mut stream = s.generate_with("", opts);
        stream.next().await.unwrap().unwrap();
        model.inject_panic().await.unwrap();
        let mut err = None;
        while let Some(item) = stream.next().await {
            if let Err(e) = item {
                err = Some(e);
            }
        }
        let err = err.expect("the stream fails");
        assert!(err.is_engine(), "{err:?}");
        assert!(err.to_string().contains("injected panic"), "{err}");
        assert!(!model.is_alive());
        let err = s.generate("again").await.unwrap_err();
        assert!(err.is_engine() && err.to_string().contains("injected panic"), "{err}");
        assert!(model.session().build().await.unwrap_err().is_engine());
        assert!(s.append("more").await.unwrap_err().is_engine());
    }

    async fn raw_session(model: &Model, text: &str) -> crate::Session {
        let s = model.session().with_chat_template(false).build().await.unwrap();
        s.append(text).await.unwrap();
        s
    }

    /// Token channels hold 2 tokens in unit tests: the rest waits in the engine's queue.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_reader_stalls_nobody() {
        let model = small_model().await;
        let text = "Once upon a time";
        let a = raw_session(&model, text).await;
        let n = a.usage().tokens;
        let opts = GenerateOptions::greedy().with_max_tokens(24).with_ignore_eos(true);
        let mut slow = a.generate_with("", opts.clone());
        let mut ids = vec![slow.next().await.unwrap().unwrap().id];

        // Another session generates while `slow` is not read, and so does `slow`'s request.
        let b = raw_session(&model, "The capital of France is").await;
        assert_eq!(b.generate_with("", opts.clone().with_max_tokens(8)).await.unwrap().tokens.len(), 8);
        // Generous deadline: the machine may be busy (this is not a speed check).
        for _ in 0..12_000 {
            if a.usage().tokens == n + 24 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(a.usage().tokens, n + 24, "the unread request finished in the background");

        // Everything queued arrives, in order.
        while let Some(t) = slow.next().await {
            ids.push(t.unwrap().id);
        }
        assert_eq!(slow.finish_reason(), Some(crate::FinishReason::MaxTokens));
        let fresh = raw_session(&model, text).await.generate_with("", opts).await.unwrap();
        assert_eq!(ids, fresh.tokens);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_engine_thread_exits_with_the_last_handle() {
        let model = small_model().await;
        let shared = Arc::clone(&model.inner.shared);
        let s = model.session().with_chat_template(false).build().await.unwrap();
        let fork = s.fork().await.unwrap();
        let stream = fork.generate_with("Hi", GenerateOptions::greedy().with_max_tokens(2));
        drop((model, s, fork));
        assert!(!shared.exited.load(Ordering::Acquire), "a stream still holds the model");
        stream.await.unwrap();
        for _ in 0..200 {
            if shared.exited.load(Ordering::Acquire) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the engine thread did not exit");
    }
}
