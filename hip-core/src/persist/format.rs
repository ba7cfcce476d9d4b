//! Byte layout of session files, version 1 (see `docs/format/session.md`).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Expected, KvGeometry, LayerKv, SeqSnapshot, SessionFile, SessionFileProblem as P};
use crate::{Error, Result};

/// The first 8 bytes of every session file.
pub const MAGIC: [u8; 8] = *b"HIPSESS\0";
/// The last 8 bytes of every session file.
pub const END_MAGIC: [u8; 8] = *b"HIPSEND\0";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// KV rows covered by one checksum.
pub const CHUNK_TOKENS: usize = 1024;
/// Largest header accepted (a guard against allocating for a corrupt length).
const MAX_HEADER: u32 = 16 << 20;
/// Bytes before the header: magic, version, header length.
pub(super) const PREFIX: u64 = 16;

/// The JSON header of a session file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The software that wrote the file, e.g. `hip-core 0.1.0`.
    pub writer: String,
    /// Fingerprint of the model whose KV rows the file holds.
    pub model_fingerprint: String,
    /// The shape of the KV rows.
    pub geometry: KvGeometry,
    /// Element type of the KV data; `"f32"` in version 1.
    pub dtype: String,
    /// Tokens of the context.
    pub tokens: usize,
    /// Tokens whose KV rows are stored.
    pub cached: usize,
    /// KV rows per checksum.
    pub chunk_tokens: usize,
    /// Application state.
    #[serde(default)]
    pub app: serde_json::Value,
}

/// Offsets of the sections, all derived from the header.
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    /// Offset of the tokens.
    pub(super) tokens: u64,
    /// Offset of the KV data (a multiple of 64).
    pub(super) kv: u64,
    /// Bytes of one layer's K (or V).
    pub(super) array: u64,
    /// Checksums per K (or V) array.
    pub(super) chunks: u64,
    /// Offset of the checksum table.
    pub(super) table: u64,
    /// Offset of the end magic (the table's CRC is the 4 bytes before it).
    pub(super) end: u64,
    /// Length of the file.
    pub(super) total: u64,
}

fn layout(header_len: u64, h: &Header) -> Option<Layout> {
    let tokens = PREFIX.checked_add(header_len)?.checked_add(4)?;
    let tokens_end = tokens.checked_add((h.tokens as u64).checked_mul(4)?)?;
    let kv = tokens_end.checked_add(4)?.checked_next_multiple_of(64)?;
    let row = (h.geometry.row_len() as u64).checked_mul(4)?;
    let array = (h.cached as u64).checked_mul(row)?;
    let layers = h.geometry.num_layers as u64;
    let table = kv.checked_add(array.checked_mul(2)?.checked_mul(layers)?)?;
    let chunks = (h.cached as u64).div_ceil(h.chunk_tokens.max(1) as u64);
    let table_len = chunks.checked_mul(2)?.checked_mul(layers)?.checked_mul(4)?;
    let end = table.checked_add(table_len)?.checked_add(4)?;
    Some(Layout { tokens, kv, array, chunks, table, end, total: end.checked_add(8)? })
}

pub(super) fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_owned(), source }
}

fn f32_bytes(x: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(x))
    } else {
        std::borrow::Cow::Owned(x.iter().flat_map(|f| f.to_le_bytes()).collect())
    }
}

/// Writes `file` to `path` atomically (see the [module documentation](super)) and returns the
/// bytes written. An existing file at `path` is replaced only once the new one is complete and
/// on disk.
///
/// # Errors
/// [`Error::SessionFile`] for an inconsistent snapshot; [`Error::Io`] when the folder is not
/// writable, the disk is full, … (the target is then untouched and no temporary file is left).
pub fn save(path: impl AsRef<Path>, file: &SessionFile) -> Result<u64> {
    let path = path.as_ref();
    let snap = &file.snapshot;
    snap.check()?;
    let header = Header {
        writer: concat!("hip-core ", env!("CARGO_PKG_VERSION")).to_owned(),
        model_fingerprint: file.model_fingerprint.clone(),
        geometry: snap.geometry,
        dtype: "f32".to_owned(),
        tokens: snap.tokens.len(),
        cached: snap.cached,
        chunk_tokens: CHUNK_TOKENS,
        app: file.app.clone(),
    };
    let json = serde_json::to_vec(&header).map_err(|e| P::Corrupt(format!("header: {e}")).at(path))?;
    let lay = layout(json.len() as u64, &header)
        .filter(|_| json.len() as u64 <= MAX_HEADER as u64)
        .ok_or_else(|| Error::arg("session", json.len(), "too large for a session file"))?;

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let err = io(path);
    let mut tmp = tempfile::Builder::new().prefix(".hips-").suffix(".tmp").tempfile_in(dir).map_err(&err)?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
        w.write_all(&MAGIC).map_err(&err)?;
        w.write_all(&VERSION.to_le_bytes()).map_err(&err)?;
        w.write_all(&(json.len() as u32).to_le_bytes()).map_err(&err)?;
        w.write_all(&json).map_err(&err)?;
        w.write_all(&crc32fast::hash(&json).to_le_bytes()).map_err(&err)?;
        let tokens: Vec<u8> = snap.tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        w.write_all(&tokens).map_err(&err)?;
        w.write_all(&crc32fast::hash(&tokens).to_le_bytes()).map_err(&err)?;
        let pad = lay.kv - (lay.tokens + tokens.len() as u64 + 4);
        w.write_all(&vec![0u8; pad as usize]).map_err(&err)?;
        let chunk = CHUNK_TOKENS * snap.geometry.row_len();
        let mut table = Vec::with_capacity(lay.chunks as usize * 2 * snap.layers.len() * 4);
        for layer in &snap.layers {
            for array in [&layer.k, &layer.v] {
                for part in array.chunks(chunk.max(1)) {
                    let bytes = f32_bytes(part);
                    table.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
                    w.write_all(&bytes).map_err(&err)?;
                }
            }
        }
        w.write_all(&table).map_err(&err)?;
        w.write_all(&crc32fast::hash(&table).to_le_bytes()).map_err(&err)?;
        w.write_all(&END_MAGIC).map_err(&err)?;
        w.flush().map_err(&err)?;
    }
    tmp.as_file().sync_all().map_err(&err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    // Make the rename itself durable.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(lay.total)
}

/// Checks 1–3 (magic, version, header length) on `start`, the first `min(len, PREFIX)` bytes
/// of a file of `len` bytes, and returns the header length.
pub(super) fn check_prefix(start: &[u8], len: u64, path: &Path) -> Result<u64> {
    let got = start.len();
    let seen = &start[..got.min(8)];
    if seen != &MAGIC[..seen.len()] || got == 0 {
        return Err(P::NotASessionFile.at(path));
    }
    if got < PREFIX as usize {
        return Err(P::Truncated { expected: PREFIX, found: len }.at(path));
    }
    let version = u32::from_le_bytes(start[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(if version > VERSION {
            P::UnsupportedVersion { found: version, supported: VERSION }.at(path)
        } else {
            P::Corrupt(format!("version {version}")).at(path)
        });
    }
    let header_len = u32::from_le_bytes(start[12..16].try_into().expect("4 bytes"));
    if header_len > MAX_HEADER {
        return Err(P::Corrupt(format!("header length {header_len}")).at(path));
    }
    let need = PREFIX + header_len as u64 + 4;
    if len < need {
        return Err(P::Truncated { expected: need, found: len }.at(path));
    }
    Ok(header_len as u64)
}

/// Check 3, continued: the header's checksum and JSON.
pub(super) fn parse_header(json: &[u8], crc: u32, path: &Path) -> Result<Header> {
    if crc32fast::hash(json) != crc {
        return Err(P::Corrupt("header checksum mismatch".into()).at(path));
    }
    serde_json::from_slice(json).map_err(|e| P::Corrupt(format!("header: {e}")).at(path))
}

/// Checks 4–6 (model, geometry, fields, exact length of a file of `len` bytes) and returns the
/// layout.
pub(super) fn check_header(
    h: &Header,
    header_len: u64,
    len: u64,
    expected: &Expected,
    path: &Path,
) -> Result<Layout> {
    if h.model_fingerprint != expected.fingerprint {
        return Err(P::OtherModel {
            expected: expected.fingerprint.clone(),
            found: h.model_fingerprint.clone(),
        }
        .at(path));
    }
    if h.geometry != expected.geometry {
        return Err(P::Incompatible(format!(
            "KV rows of {:?}, the model has {:?}",
            h.geometry, expected.geometry
        ))
        .at(path));
    }
    if h.dtype != "f32" || h.chunk_tokens == 0 || h.cached > h.tokens {
        return Err(P::Corrupt(format!(
            "dtype {:?}, chunk_tokens {}, cached {} of {} tokens",
            h.dtype, h.chunk_tokens, h.cached, h.tokens
        ))
        .at(path));
    }
    let lay = layout(header_len, h).ok_or_else(|| P::Corrupt("sizes overflow".into()).at(path))?;
    if len < lay.total {
        return Err(P::Truncated { expected: lay.total, found: len }.at(path));
    }
    if len > lay.total {
        return Err(P::Corrupt(format!("{} bytes after the end", len - lay.total)).at(path));
    }
    Ok(lay)
}

/// Check 7 on one section: `bytes` against their stored CRC (`what`: "token checksum",
/// "checksum table").
pub(super) fn check_crc(bytes: &[u8], crc: u32, what: &str, path: &Path) -> Result<()> {
    if crc32fast::hash(bytes) != crc {
        return Err(P::Corrupt(format!("{what} mismatch")).at(path));
    }
    Ok(())
}

/// Check 7: the end magic.
pub(super) fn check_end(end: &[u8], path: &Path) -> Result<()> {
    if end != END_MAGIC {
        return Err(P::Corrupt("end marker missing".into()).at(path));
    }
    Ok(())
}

/// The error for a KV chunk whose CRC does not match: `array` is "K" or "V".
pub(super) fn chunk_mismatch(layer: usize, array: &str, first_row: usize, path: &Path) -> Error {
    P::Corrupt(format!("layer {layer} {array} rows from {first_row} checksum mismatch")).at(path)
}

/// Reads and checks the prefix and header of a session file: magic, version, header checksum.
fn open_header(path: &Path) -> Result<(BufReader<File>, Header, u64, u64)> {
    let err = io(path);
    let f = File::open(path).map_err(&err)?;
    let len = f.metadata().map_err(&err)?.len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut prefix = [0u8; PREFIX as usize];
    let got = read_up_to(&mut r, &mut prefix).map_err(&err)?;
    let header_len = check_prefix(&prefix[..got], len, path)?;
    let mut json = vec![0u8; header_len as usize];
    r.read_exact(&mut json).map_err(&err)?;
    let crc = read_u32(&mut r).map_err(&err)?;
    let header = parse_header(&json, crc, path)?;
    Ok((r, header, header_len, len))
}

/// The header of the session file at `path`, checked (magic, version, checksum) but without
/// reading the tokens or the KV data.
///
/// # Errors
/// [`Error::Io`], [`Error::SessionFile`].
pub fn read_header(path: impl AsRef<Path>) -> Result<Header> {
    Ok(open_header(path.as_ref())?.1)
}

/// Reads the session file at `path`, checking that it belongs to the expected model and that
/// every byte is intact (see the [module documentation](super)).
///
/// # Errors
/// [`Error::Io`] when it cannot be read; [`Error::SessionFile`] with the
/// [`SessionFileProblem`](super::SessionFileProblem) otherwise.
pub fn load(path: impl AsRef<Path>, expected: &Expected) -> Result<SessionFile> {
    let path = path.as_ref();
    let err = io(path);
    let (mut r, h, header_len, len) = open_header(path)?;
    let lay = check_header(&h, header_len, len, expected, path)?;

    let mut tokens = vec![0u32; h.tokens];
    read_u32s(&mut r, &mut tokens).map_err(&err)?;
    let crc = read_u32(&mut r).map_err(&err)?;
    check_crc(bytemuck::cast_slice(&tokens), crc, "token checksum", path)?;
    if cfg!(target_endian = "big") {
        tokens.iter_mut().for_each(|t| *t = u32::from_le(*t));
    }

    // The checksum table, then the KV data checked against it.
    let layers = h.geometry.num_layers;
    let mut table = vec![0u32; lay.chunks as usize * 2 * layers];
    r.seek(SeekFrom::Start(lay.table)).map_err(&err)?;
    read_u32s(&mut r, &mut table).map_err(&err)?;
    let crc = read_u32(&mut r).map_err(&err)?;
    check_crc(bytemuck::cast_slice(&table), crc, "checksum table", path)?;
    let mut end = [0u8; 8];
    r.read_exact(&mut end).map_err(&err)?;
    check_end(&end, path)?;
    r.seek(SeekFrom::Start(lay.kv)).map_err(&err)?;
    let floats = (lay.array / 4) as usize;
    let chunk = h.chunk_tokens.saturating_mul(h.geometry.row_len());
    let mut sums = table.iter().map(|&c| u32::from_le(c));
    let mut out = Vec::with_capacity(layers);
    for layer in 0..layers {
        let mut kv = LayerKv { k: vec![0f32; floats], v: vec![0f32; floats] };
        for (name, array) in [("K", &mut kv.k), ("V", &mut kv.v)] {
            for (i, part) in array.chunks_mut(chunk.max(1)).enumerate() {
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(part);
                r.read_exact(bytes).map_err(&err)?;
                if Some(crc32fast::hash(bytes)) != sums.next() {
                    return Err(chunk_mismatch(layer, name, i * h.chunk_tokens, path));
                }
                if cfg!(target_endian = "big") {
                    part.iter_mut().for_each(|x| *x = f32::from_bits(u32::from_le(x.to_bits())));
                }
            }
        }
        out.push(kv);
    }
    debug_assert_eq!(lay.end + 8, lay.total);
    let snapshot = SeqSnapshot { geometry: h.geometry, tokens, cached: h.cached, layers: out };
    Ok(SessionFile { model_fingerprint: h.model_fingerprint, snapshot, app: h.app })
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Reads raw little-endian words (the caller converts them on big-endian machines).
fn read_u32s(r: &mut impl Read, out: &mut [u32]) -> std::io::Result<()> {
    r.read_exact(bytemuck::cast_slice_mut(out))
}
