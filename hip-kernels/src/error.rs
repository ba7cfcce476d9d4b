//! The crate's error type.

use candle_core::DType;

/// Everything that can go wrong in a hip-kernels call.
///
/// Every variant names the offending value, so a message like
/// `q has shape [1, 7, 3, 64] but expected 4 dims [batch, tokens, heads, head_dim] with heads a multiple of 2`
/// tells the caller exactly what to fix. The enum is `#[non_exhaustive]`: match on the variants
/// you handle and keep a catch-all arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A [`crate::HipConfig`] field (or combination of fields) is impossible.
    #[error("invalid HiP config: {field} = {value}: {reason}")]
    InvalidConfig {
        /// The field at fault.
        field: &'static str,
        /// Its value, rendered.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A tensor has the wrong shape.
    #[error("{name} has shape {got:?} but expected {expected}")]
    Shape {
        /// Which argument.
        name: &'static str,
        /// What was expected, in words.
        expected: String,
        /// The shape that was passed.
        got: Vec<usize>,
    },
    /// A tensor has an unsupported dtype, or the dtypes of the inputs disagree.
    #[error("{name} has dtype {got:?} but expected {expected}")]
    DType {
        /// Which argument.
        name: &'static str,
        /// What was expected, in words.
        expected: String,
        /// The dtype that was passed.
        got: DType,
    },
    /// A scalar argument is out of range (a softmax scale that is not finite, a head dim over 256, ...).
    #[error("invalid argument {name} = {value}: {reason}")]
    InvalidArgument {
        /// Which argument.
        name: &'static str,
        /// Its value, rendered.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// The op has no implementation for the tensors' device in this build.
    #[error("{op} is not implemented on device {device}")]
    UnsupportedDevice {
        /// The op.
        op: &'static str,
        /// The device, rendered.
        device: String,
    },
    /// The GPU caches of KV-cache offloading (see [`crate::offload`]) do not fit in the free GPU
    /// memory. Every size is in bytes.
    #[error(
        "offload GPU caches need {need} bytes (mask-estimation cache {mask_cache}, sparse-attention \
         cache {sa_cache}, page tables {page_tables}, miss staging {miss_staging}, prefill staging \
         {prefill_stage}) but only {free} are free"
    )]
    GpuCachesTooLarge {
        /// Bytes the caches need in all.
        need: u64,
        /// Bytes of GPU memory free.
        free: u64,
        /// Of `need`: the mask-estimation key caches of every layer.
        mask_cache: u64,
        /// Of `need`: the sparse-attention K/V caches of every layer.
        sa_cache: u64,
        /// Of `need`: the page tables of every layer.
        page_tables: u64,
        /// Of `need`: the staging areas of missed rows of every layer.
        miss_staging: u64,
        /// Of `need`: the transient buffer a prefill chunk stages one layer's rows in.
        prefill_stage: u64,
    },
    /// The host KV store of KV-cache offloading (see [`crate::offload`]) would exceed
    /// [`crate::offload::Offload::host_budget_bytes`].
    #[error(
        "host budget exceeded: the KV store of {tokens} tokens needs {need} bytes, the budget is {budget}"
    )]
    HostBudgetExceeded {
        /// Tokens the store would hold.
        tokens: usize,
        /// Bytes it would take.
        need: u64,
        /// The budget in bytes.
        budget: u64,
    },
    /// Pinned host memory for KV-cache offloading could not be allocated (the driver's reason
    /// says why: usually the host is out of memory or the pinned-memory limit is reached).
    #[error("cannot pin {bytes} bytes of host memory for the {what}: {reason}")]
    PinnedAllocRefused {
        /// What the memory was for.
        what: &'static str,
        /// Bytes asked for.
        bytes: u64,
        /// The driver's error.
        reason: String,
    },
    /// An error raised by candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn config(field: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        Error::InvalidConfig { field, value: value.to_string(), reason: reason.into() }
    }
    pub(crate) fn shape(name: &'static str, expected: impl Into<String>, got: &[usize]) -> Self {
        Error::Shape { name, expected: expected.into(), got: got.to_vec() }
    }
    pub(crate) fn arg(name: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { name, value: value.to_string(), reason: reason.into() }
    }
}
