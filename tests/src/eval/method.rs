//! The attention methods compared: dense, HiP, and the sink-and-window baseline.

use std::fmt;
use std::str::FromStr;

use hip_core::attention::{AttentionBackend, StreamingConfig};
use hip_core::HipConfig;
use serde::{Deserialize, Serialize};

use super::error::{EvalError, Result};

/// One attention method of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Exact attention (the reference).
    Dense,
    /// HiP attention with the run's [`HipConfig`].
    Hip,
    /// Sink + sliding window only, with the token budget of the HiP config
    /// ([`StreamingConfig::same_budget`]).
    Streaming,
    /// HiP with Dynamic RoPE (`HipConfig::rope_extend`; the run's setting, or the default
    /// `dense_layer_k` 4096 when it has none): for contexts past the model's trained length.
    #[serde(rename = "hip-extend")]
    HipExtend,
}

impl Method {
    /// The default methods of a run, in report order.
    pub const ALL: [Method; 3] = [Method::Dense, Method::Hip, Method::Streaming];
    /// Every method.
    pub const KNOWN: [Method; 4] = [Method::Dense, Method::Hip, Method::Streaming, Method::HipExtend];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Method::Dense => "dense",
            Method::Hip => "hip",
            Method::Streaming => "streaming",
            Method::HipExtend => "hip-extend",
        }
    }

    /// The attention backend of this method for a run with HiP config `hip`.
    pub fn backend(self, hip: &HipConfig) -> AttentionBackend {
        match self {
            Method::Dense => AttentionBackend::Dense,
            Method::Hip => AttentionBackend::Hip(hip.clone()),
            Method::Streaming => AttentionBackend::Streaming(StreamingConfig::same_budget(hip)),
            Method::HipExtend => {
                let ext = hip.rope_extend.clone().unwrap_or_default();
                AttentionBackend::Hip(hip.clone().with_rope_extend(ext))
            }
        }
    }

    /// Parses a comma-separated list (`"dense,hip"`), keeping order, dropping repeats.
    ///
    /// # Errors
    /// [`EvalError::UnknownMethod`] for a name not in [`Method::KNOWN`]; an empty list.
    pub fn parse_list(s: &str) -> Result<Vec<Method>> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let m: Method = part.parse()?;
            if !out.contains(&m) {
                out.push(m);
            }
        }
        if out.is_empty() {
            return Err(EvalError::arg(
                "--methods",
                "no method given (known: dense, hip, streaming, hip-extend)",
            ));
        }
        Ok(out)
    }
}

impl FromStr for Method {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self> {
        Method::KNOWN
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| EvalError::UnknownMethod(s.to_string()))
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The HiP configuration of the quality runs: [`HipConfig::default`], the published defaults
/// ([`HipConfig::paper`]: `k = 512` selected tokens in key blocks of 2 (scored with stride 1),
/// query blocks of 64 (stride 2), 16 sink tokens, a 256-token window, layers 0–2 dense, decode
/// masks refreshed every 8 steps) plus a prefill tail: the last 64 queries of each prefill chunk
/// get masks of their own (query blocks of 1). A query of a HiP layer reads at most 784 keys: 38%
/// of a 2k context, 19% at 4k, 10% at 8k.
///
/// Smaller budgets were tried on SmolLM2-135M and lose the passkey at 2k (docs/quality.md):
/// k = 128 or 256 with key blocks of 2, 4 or 8. Without the tail (`--tail 0`) the paper config
/// loses passkeys dense finds.
pub fn eval_hip_config() -> HipConfig {
    HipConfig::default()
}

/// Checks the HiP config and the streaming config derived from it.
///
/// # Errors
/// [`EvalError::Core`] naming the bad field.
pub fn validate_configs(hip: &HipConfig) -> Result<()> {
    hip.validate().map_err(hip_core::Error::from)?;
    StreamingConfig::same_budget(hip).validate()?;
    Ok(())
}
