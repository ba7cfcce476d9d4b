//! [`MappedSession`]: a session file read through a memory map, its KV data checked lazily.

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;

use super::format::{self, Header, Layout, PREFIX};
use super::{Expected, KvGeometry, LayerKv, SeqSnapshot, SessionFile, SessionFileProblem as P};
use crate::{Error, Result};

/// Which array of a layer: keys or values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvArray {
    /// The keys, stored first.
    K,
    /// The values, stored after the keys of the same layer.
    V,
}

impl KvArray {
    fn index(self) -> usize {
        match self {
            KvArray::K => 0,
            KvArray::V => 1,
        }
    }
    fn name(self) -> &'static str {
        match self {
            KvArray::K => "K",
            KvArray::V => "V",
        }
    }
}

/// A session file opened through a read-only memory map: the header, tokens and checksum
/// table are checked when it is opened, the KV data only when it is asked for.
///
/// [`MappedSession::open`] runs the same checks as [`load`](super::load) up to and including
/// the token checksum, the checksum table's checksum and the end magic (checks 1–7 of
/// `docs/format/session.md`, except the KV chunks), reading the prefix, header, tokens and table
/// but none of the KV data. The KV arrays are then borrowed straight from the map
/// ([`MappedSession::layer_k`], [`MappedSession::layer_v`]): the page cache brings in only the
/// parts that are read. Their chunk checksums are verified on request
/// ([`MappedSession::verify_chunk`], [`MappedSession::verify_all`]);
/// [`MappedSession::to_snapshot`] verifies every chunk while it copies, so it returns exactly
/// what [`load`](super::load) would, or the same error.
///
/// # The file must not change while it is mapped
///
/// [`save`](super::save) never writes into an existing file: it writes a new one and renames it
/// over the old, so a map of the old file stays valid (and keeps the old content) even when the
/// session is saved again under the same path. Another program that truncates or rewrites the
/// file in place while it is mapped makes reads of the map fault or change under the reader;
/// do not do that.
///
/// ```
/// use hip_core::persist::{self, Expected, KvArray, KvGeometry, LayerKv, MappedSession, SeqSnapshot, SessionFile};
/// let geometry = KvGeometry { num_layers: 2, num_kv_heads: 1, head_dim: 4 };
/// let rows = |x: f32| (0..3 * 4).map(|i| x + i as f32).collect::<Vec<f32>>();
/// let layers = (0..2).map(|l| LayerKv { k: rows(l as f32), v: rows(-(l as f32)) }).collect();
/// let snapshot = SeqSnapshot { geometry, tokens: vec![5, 6, 7, 8], cached: 3, layers };
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("s.hips");
/// persist::save(&path, &SessionFile::new("model-fp", snapshot.clone()))?;
///
/// let expected = Expected { fingerprint: "model-fp".into(), geometry };
/// let mapped = MappedSession::open(&path, &expected)?;
/// assert_eq!(mapped.tokens(), &[5, 6, 7, 8]);
/// assert_eq!(mapped.header().cached, 3);
/// mapped.verify_chunk(1, KvArray::K, 0)?; // layer 1's keys, first chunk of 1024 rows
/// assert_eq!(mapped.layer_k(1)?, &snapshot.layers[1].k[..]); // [cached, kv_heads * head_dim]
/// assert_eq!(mapped.to_snapshot()?, snapshot);
/// # Ok::<(), hip_core::Error>(())
/// ```
pub struct MappedSession {
    path: PathBuf,
    map: Mmap,
    header: Header,
    layout: Layout,
    tokens: Vec<u32>,
}

impl fmt::Debug for MappedSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedSession")
            .field("path", &self.path)
            .field("bytes", &self.map.len())
            .field("geometry", &self.header.geometry)
            .field("tokens", &self.header.tokens)
            .field("cached", &self.header.cached)
            .finish_non_exhaustive()
    }
}

impl MappedSession {
    /// Maps the session file at `path` and checks it against `expected`: magic, version,
    /// header, model fingerprint, geometry, fields, exact length, token checksum, checksum
    /// table checksum and end magic. The KV data is not read.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be opened or mapped; [`Error::SessionFile`] with the
    /// same [`SessionFileProblem`](super::SessionFileProblem) as [`load`](super::load) gives for
    /// every problem outside the KV chunks.
    pub fn open(path: impl AsRef<Path>, expected: &Expected) -> Result<MappedSession> {
        let path = path.as_ref();
        let err = format::io(path);
        let file = File::open(path).map_err(&err)?;
        if file.metadata().map_err(&err)?.len() == 0 {
            // Nothing to map (and an empty map is not portable): the empty file of `load`.
            format::check_prefix(&[], 0, path)?;
        }
        // SAFETY: the map is read-only and private to this value. Its content may only change
        // if another program modifies the file in place while it is mapped, which the type's
        // documentation forbids; hip's own writer replaces files by renaming instead.
        let map = unsafe { Mmap::map(&file) }.map_err(&err)?;
        let bytes: &[u8] = &map;
        let len = bytes.len() as u64;
        let header_len = format::check_prefix(&bytes[..bytes.len().min(PREFIX as usize)], len, path)?;
        let json = &bytes[PREFIX as usize..][..header_len as usize];
        let header = format::parse_header(json, le_u32(bytes, PREFIX + header_len), path)?;
        let layout = format::check_header(&header, header_len, len, expected, path)?;
        // From here on every offset lies inside the file: its length is `layout.total`.
        let tokens_end = (layout.tokens + 4 * header.tokens as u64) as usize;
        let token_bytes = &bytes[layout.tokens as usize..tokens_end];
        format::check_crc(token_bytes, le_u32(bytes, tokens_end as u64), "token checksum", path)?;
        let table_crc = layout.end - 4;
        let table = &bytes[layout.table as usize..table_crc as usize];
        format::check_crc(table, le_u32(bytes, table_crc), "checksum table", path)?;
        format::check_end(&bytes[layout.end as usize..layout.total as usize], path)?;
        let tokens =
            token_bytes.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4"))).collect();
        Ok(MappedSession { path: path.to_owned(), map, header, layout, tokens })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The file's header (fingerprint, geometry, counts, application state).
    pub fn header(&self) -> &Header {
        &self.header
    }
    /// The shape of the KV rows.
    pub fn geometry(&self) -> KvGeometry {
        self.header.geometry
    }
    /// Every token of the context (checked against its checksum when the file was opened).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    /// Tokens whose KV rows are stored: the rows of every K and V array.
    pub fn cached(&self) -> usize {
        self.header.cached
    }
    /// Checksum chunks per K or V array: ⌈`cached` / `chunk_tokens`⌉.
    pub fn chunks(&self) -> usize {
        self.layout.chunks as usize
    }
    /// The rows (tokens) that chunk `chunk` of every array covers; empty past the last chunk.
    pub fn chunk_rows(&self, chunk: usize) -> Range<usize> {
        let c = self.header.chunk_tokens;
        let start = chunk.saturating_mul(c).min(self.header.cached);
        start..start.saturating_add(c).min(self.header.cached)
    }
    /// Bytes of the file.
    pub fn file_bytes(&self) -> u64 {
        self.layout.total
    }

    /// Layer `layer`'s keys, borrowed from the map: token-major `[cached, num_kv_heads,
    /// head_dim]` `f32`s (row `j` = token `j`'s keys of every KV head). Not verified: call
    /// [`MappedSession::verify_chunk`] or [`MappedSession::verify_all`] first where it matters.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a layer out of range;
    /// [`SessionFileProblem::Incompatible`](super::SessionFileProblem::Incompatible) on a
    /// big-endian host, where the little-endian file cannot be borrowed as `f32`s (use
    /// [`MappedSession::to_snapshot`] there).
    pub fn layer_k(&self, layer: usize) -> Result<&[f32]> {
        self.floats(layer, KvArray::K)
    }

    /// Layer `layer`'s values, as [`MappedSession::layer_k`].
    ///
    /// # Errors
    /// As [`MappedSession::layer_k`].
    pub fn layer_v(&self, layer: usize) -> Result<&[f32]> {
        self.floats(layer, KvArray::V)
    }

    /// One array of one layer, as [`MappedSession::layer_k`].
    ///
    /// # Errors
    /// As [`MappedSession::layer_k`].
    pub fn array(&self, layer: usize, which: KvArray) -> Result<&[f32]> {
        self.floats(layer, which)
    }

    fn floats(&self, layer: usize, which: KvArray) -> Result<&[f32]> {
        let bytes = self.array_bytes(layer, which)?;
        if cfg!(target_endian = "big") {
            return Err(P::Incompatible(
                "the KV data is little-endian and cannot be borrowed as f32 on this big-endian host".into(),
            )
            .at(&self.path));
        }
        // The KV section starts at a multiple of 64 of a page-aligned map, and every array is a
        // whole number of f32s, so this cannot fail; an error rather than a panic all the same.
        bytemuck::try_cast_slice(bytes)
            .map_err(|e| P::Corrupt(format!("layer {layer} {}: {e}", which.name())).at(&self.path))
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        let layers = self.header.geometry.num_layers;
        if layer >= layers {
            return Err(Error::arg("layer", layer, format!("the session has {layers} layers")));
        }
        Ok(())
    }

    /// The bytes of one array.
    fn array_bytes(&self, layer: usize, which: KvArray) -> Result<&[u8]> {
        self.check_layer(layer)?;
        let start = self.layout.kv + (2 * layer + which.index()) as u64 * self.layout.array;
        Ok(&self.map[start as usize..][..self.layout.array as usize])
    }

    /// The bytes of one chunk and its stored CRC; `layer` and `chunk` in range.
    fn chunk(&self, layer: usize, which: KvArray, chunk: usize) -> (&[u8], u32) {
        let row = self.header.geometry.row_len() * 4;
        let rows = self.chunk_rows(chunk);
        let start = self.layout.kv
            + (2 * layer + which.index()) as u64 * self.layout.array
            + (rows.start * row) as u64;
        let bytes = &self.map[start as usize..][..rows.len() * row];
        let index = (2 * layer + which.index()) as u64 * self.layout.chunks + chunk as u64;
        (bytes, le_u32(&self.map, self.layout.table + 4 * index))
    }

    /// Checks the CRC of chunk `chunk` (rows [`MappedSession::chunk_rows`]`(chunk)`) of `which`
    /// array of layer `layer`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a layer or chunk out of range;
    /// [`SessionFileProblem::Corrupt`](super::SessionFileProblem::Corrupt) naming the layer,
    /// array and first row, the same error [`load`](super::load) gives for that chunk.
    pub fn verify_chunk(&self, layer: usize, which: KvArray, chunk: usize) -> Result<()> {
        self.check_layer(layer)?;
        if chunk >= self.chunks() {
            return Err(Error::arg("chunk", chunk, format!("each array has {} chunks", self.chunks())));
        }
        let (bytes, crc) = self.chunk(layer, which, chunk);
        if crc32fast::hash(bytes) != crc {
            return Err(format::chunk_mismatch(
                layer,
                which.name(),
                self.chunk_rows(chunk).start,
                &self.path,
            ));
        }
        Ok(())
    }

    /// Checks every chunk of every array (in parallel), reading all the KV data once.
    ///
    /// # Errors
    /// The error of the first corrupt chunk in file order, as [`MappedSession::verify_chunk`].
    pub fn verify_all(&self) -> Result<()> {
        let chunks = self.chunks();
        let n = 2 * self.header.geometry.num_layers * chunks;
        let first_bad = (0..n).into_par_iter().find_map_first(|i| {
            let which = if (i / chunks) % 2 == 0 { KvArray::K } else { KvArray::V };
            self.verify_chunk(i / chunks / 2, which, i % chunks).err()
        });
        first_bad.map_or(Ok(()), Err)
    }

    /// Copies the context out of the map, verifying every chunk: the same [`SeqSnapshot`] as
    /// [`load`](super::load) returns for the file (on any host).
    ///
    /// # Errors
    /// The error of the first corrupt chunk in file order, as [`MappedSession::verify_chunk`].
    pub fn to_snapshot(&self) -> Result<SeqSnapshot> {
        let layers: Vec<Result<LayerKv>> = (0..self.header.geometry.num_layers)
            .into_par_iter()
            .map(|layer| {
                Ok(LayerKv { k: self.copy_array(layer, KvArray::K)?, v: self.copy_array(layer, KvArray::V)? })
            })
            .collect();
        let layers = layers.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(SeqSnapshot {
            geometry: self.header.geometry,
            tokens: self.tokens.clone(),
            cached: self.cached(),
            layers,
        })
    }

    /// [`MappedSession::to_snapshot`] with the fingerprint and application state: the same
    /// [`SessionFile`] as [`load`](super::load) returns.
    ///
    /// # Errors
    /// As [`MappedSession::to_snapshot`].
    pub fn to_session_file(&self) -> Result<SessionFile> {
        Ok(SessionFile {
            model_fingerprint: self.header.model_fingerprint.clone(),
            snapshot: self.to_snapshot()?,
            app: self.header.app.clone(),
        })
    }

    fn copy_array(&self, layer: usize, which: KvArray) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.layout.array as usize / 4];
        let row = self.header.geometry.row_len();
        for chunk in 0..self.chunks() {
            self.verify_chunk(layer, which, chunk)?;
            let (bytes, _) = self.chunk(layer, which, chunk);
            let rows = self.chunk_rows(chunk);
            let dst = &mut out[rows.start * row..rows.end * row];
            for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                *d = f32::from_le_bytes(b.try_into().expect("4 bytes"));
            }
        }
        Ok(out)
    }
}

/// The little-endian `u32` at `offset` (inside `bytes`).
fn le_u32(bytes: &[u8], offset: u64) -> u32 {
    u32::from_le_bytes(bytes[offset as usize..][..4].try_into().expect("4 bytes"))
}
