//! Session files: one sequence's context (its tokens and the K/V rows of its cached prefix) on
//! disk, so that a long context prefilled once can be reopened without prefilling it again.
//!
//! The byte layout (format version 1) is specified in `docs/format/session.md`; in short:
//!
//! ```text
//! magic "HIPSESS\0" | version u32 | header length u32 | header (JSON) | header CRC-32
//! | tokens (u32 × n) | tokens CRC-32 | zero padding to a multiple of 64
//! | KV: for each layer, K then V, each [cached, kv_heads, head_dim] f32
//! | CRC-32 of every chunk of CHUNK_TOKENS rows of every K and V | CRC-32 of that table
//! | end magic "HIPSEND\0"
//! ```
//!
//! Integers and floats are little-endian. [`save`] writes atomically: a temporary file in the
//! target's folder, flushed and `fsync`ed, renamed over the target, and the folder `fsync`ed; a
//! crash leaves either the old file or the new one, never half of one. [`load`] checks the magic,
//! the version, the model fingerprint and the geometry before it allocates anything, the file's
//! exact length, and every checksum; any failure is an [`Error::SessionFile`](crate::Error::SessionFile) naming the
//! [`SessionFileProblem`]. [`MappedSession`] opens a file through a memory map instead: the same
//! checks except the KV chunks, whose checksums it verifies on request, and the KV arrays borrowed
//! from the map without copying.
//!
//! ```no_run
//! use hip_core::persist::{self, Expected, SessionFile};
//! # fn demo(engine: &mut hip_core::engine::Engine, seq: hip_core::kv::SeqId) -> hip_core::Result<()> {
//! let snapshot = engine.snapshot(seq)?;
//! let file = SessionFile::new(engine.model().fingerprint(), snapshot);
//! persist::save("book.hips", &file)?;
//!
//! let back = persist::load("book.hips", &Expected::of(engine.model()))?;
//! let seq = engine.restore(&back.snapshot)?;
//! # let _ = seq; Ok(()) }
//! ```

mod format;
mod mapped;

use std::path::PathBuf;

pub use format::{load, read_header, save, Header, CHUNK_TOKENS, END_MAGIC, MAGIC, VERSION};
pub use mapped::{KvArray, MappedSession};

use crate::model::Model;

/// Why a session file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionFileProblem {
    /// The file does not start with the session magic.
    #[error("not a hip session file")]
    NotASessionFile,
    /// The file was written by a newer (or unknown) format version.
    #[error("session format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// The file's version.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// The file was saved with another model.
    #[error("the session was saved with another model (fingerprint {found}, this model is {expected})")]
    OtherModel {
        /// The fingerprint of the model in use.
        expected: String,
        /// The file's fingerprint.
        found: String,
    },
    /// The file is shorter than its header says.
    #[error("truncated: {found} bytes, the header describes {expected}")]
    Truncated {
        /// Bytes the file should have.
        expected: u64,
        /// Bytes it has.
        found: u64,
    },
    /// A checksum, the header or the layout does not match.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// The file is intact but does not fit the model it is loaded into (layers, heads, vocabulary).
    #[error("incompatible: {0}")]
    Incompatible(String),
}

impl SessionFileProblem {
    /// This problem as an [`Error::SessionFile`](crate::Error::SessionFile) of `path`.
    pub fn at_path(self, path: impl Into<PathBuf>) -> crate::Error {
        crate::Error::SessionFile { path: path.into(), problem: self }
    }

    pub(crate) fn at(self, path: impl Into<PathBuf>) -> crate::Error {
        self.at_path(path)
    }
}

/// The shape of a model's KV rows: what a snapshot's K/V data must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KvGeometry {
    /// Transformer layers.
    pub num_layers: usize,
    /// KV heads per layer.
    pub num_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
}

impl KvGeometry {
    /// The geometry of `model`'s KV cache.
    pub fn of(model: &Model) -> Self {
        let c = model.config();
        KvGeometry { num_layers: c.layers, num_kv_heads: c.kv_heads, head_dim: c.head_dim }
    }

    /// Floats of one token's row in one layer's K (or V): `num_kv_heads * head_dim`.
    pub fn row_len(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// The K and V rows of one layer for the cached tokens, token-major
/// `[cached, num_kv_heads, head_dim]` each.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayerKv {
    /// Keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
}

/// One sequence's context: every token, and the KV rows of the first `cached` of them (the rest
/// are prefilled again when the sequence is restored and used).
#[derive(Debug, Clone, PartialEq)]
pub struct SeqSnapshot {
    /// The shape of the KV rows.
    pub geometry: KvGeometry,
    /// Every token of the context.
    pub tokens: Vec<u32>,
    /// Tokens whose KV rows are in `layers` (`tokens[..cached]`).
    pub cached: usize,
    /// One entry per layer.
    pub layers: Vec<LayerKv>,
}

impl SeqSnapshot {
    /// Checks that the KV data matches the geometry and `cached`.
    ///
    /// # Errors
    /// [`SessionFileProblem::Corrupt`] (as an [`Error::SessionFile`](crate::Error::SessionFile)
    /// on `"snapshot"`) naming the first mismatch.
    pub fn check(&self) -> crate::Result<()> {
        let bad = |what: String| Err(SessionFileProblem::Corrupt(what).at("snapshot"));
        if self.cached > self.tokens.len() {
            return bad(format!("{} cached tokens of {}", self.cached, self.tokens.len()));
        }
        if self.layers.len() != self.geometry.num_layers {
            return bad(format!(
                "{} layers, the geometry has {}",
                self.layers.len(),
                self.geometry.num_layers
            ));
        }
        let want = self.cached * self.geometry.row_len();
        for (i, l) in self.layers.iter().enumerate() {
            if l.k.len() != want || l.v.len() != want {
                return bad(format!("layer {i}: {} K / {} V floats, expected {want}", l.k.len(), l.v.len()));
            }
        }
        Ok(())
    }

    /// Bytes of KV data.
    pub fn kv_bytes(&self) -> usize {
        2 * self.geometry.num_layers * self.cached * self.geometry.row_len() * 4
    }
}

/// A session file's content: the model it belongs to, the sequence, and opaque application
/// state (hip-sdk keeps its chat state and sampling defaults there).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionFile {
    /// [`Model::fingerprint`] of the model that computed the KV rows.
    pub model_fingerprint: String,
    /// The sequence.
    pub snapshot: SeqSnapshot,
    /// Application state, stored as JSON in the header (`null` when there is none).
    pub app: serde_json::Value,
}

impl SessionFile {
    /// A file for `snapshot` of the model with `fingerprint`, without application state.
    pub fn new(fingerprint: impl Into<String>, snapshot: SeqSnapshot) -> Self {
        SessionFile { model_fingerprint: fingerprint.into(), snapshot, app: serde_json::Value::Null }
    }

    /// Sets the application state.
    pub fn with_app(mut self, app: serde_json::Value) -> Self {
        self.app = app;
        self
    }
}

/// What [`load`] requires of a file: the model's fingerprint and KV geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// [`Model::fingerprint`].
    pub fingerprint: String,
    /// [`KvGeometry::of`] the model.
    pub geometry: KvGeometry,
}

impl Expected {
    /// The expectations for loading into `model`.
    pub fn of(model: &Model) -> Self {
        Expected { fingerprint: model.fingerprint().to_owned(), geometry: KvGeometry::of(model) }
    }
}

#[cfg(test)]
mod mapped_tests;
#[cfg(test)]
mod tests;
