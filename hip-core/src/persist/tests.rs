use std::fs;
use std::path::Path;

use rand::{Rng, SeedableRng};

use super::*;
use crate::Error;

pub(super) const GEOM: KvGeometry = KvGeometry { num_layers: 3, num_kv_heads: 2, head_dim: 5 };

pub(super) fn snapshot(tokens: usize, cached: usize, seed: u64) -> SeqSnapshot {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let floats = cached * GEOM.row_len();
    let layers = (0..GEOM.num_layers)
        .map(|_| LayerKv {
            k: (0..floats).map(|_| rng.random_range(-3.0..3.0)).collect(),
            v: (0..floats).map(|_| rng.random_range(-3.0..3.0)).collect(),
        })
        .collect();
    SeqSnapshot { geometry: GEOM, tokens: (0..tokens as u32).map(|t| t * 7 % 1000).collect(), cached, layers }
}

pub(super) fn expected() -> Expected {
    Expected { fingerprint: "abc123".into(), geometry: GEOM }
}

fn file(tokens: usize, cached: usize) -> SessionFile {
    SessionFile::new("abc123", snapshot(tokens, cached, tokens as u64))
        .with_app(serde_json::json!({"chat": true, "note": "é"}))
}

fn problem(e: Error) -> SessionFileProblem {
    match e {
        Error::SessionFile { problem, .. } => problem,
        other => panic!("expected a session file error, got {other:?}"),
    }
}

fn temp_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

#[test]
fn round_trips_at_awkward_sizes() {
    let dir = tempfile::tempdir().unwrap();
    // 1025 and 2049 cached rows straddle the checksum chunks.
    for (tokens, cached) in [(0, 0), (1, 0), (1, 1), (7, 6), (97, 97), (1030, 1025), (2050, 2049)] {
        let f = file(tokens, cached);
        let path = dir.path().join(format!("s{tokens}.hips"));
        let bytes = save(&path, &f).unwrap();
        assert_eq!(bytes, fs::metadata(&path).unwrap().len());
        let back = load(&path, &expected()).unwrap();
        assert_eq!(back, f, "tokens {tokens} cached {cached}");
        let h = read_header(&path).unwrap();
        assert_eq!((h.tokens, h.cached, h.chunk_tokens), (tokens, cached, CHUNK_TOKENS));
    }
    assert!(temp_files(dir.path()).is_empty());
}

#[test]
fn refuses_other_models_versions_and_geometries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.hips");
    save(&path, &file(20, 19)).unwrap();
    let other = Expected { fingerprint: "zzz".into(), geometry: GEOM };
    assert!(matches!(problem(load(&path, &other).unwrap_err()), SessionFileProblem::OtherModel { .. }));
    let geom = KvGeometry { num_layers: 4, ..GEOM };
    let other = Expected { fingerprint: "abc123".into(), geometry: geom };
    assert!(matches!(problem(load(&path, &other).unwrap_err()), SessionFileProblem::Incompatible(_)));

    let mut bytes = fs::read(&path).unwrap();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    fs::write(&path, &bytes).unwrap();
    assert_eq!(
        problem(load(&path, &expected()).unwrap_err()),
        SessionFileProblem::UnsupportedVersion { found: 2, supported: VERSION }
    );

    fs::write(&path, b"GGUF and other things").unwrap();
    assert_eq!(problem(load(&path, &expected()).unwrap_err()), SessionFileProblem::NotASessionFile);
    fs::write(&path, b"").unwrap();
    assert_eq!(problem(load(&path, &expected()).unwrap_err()), SessionFileProblem::NotASessionFile);
    let missing = load(dir.path().join("missing.hips"), &expected()).unwrap_err();
    assert!(matches!(missing, Error::Io { .. }), "{missing:?}");
}

#[test]
fn detects_every_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.hips");
    save(&path, &file(40, 33)).unwrap();
    let bytes = fs::read(&path).unwrap();
    let cut = dir.path().join("cut.hips");
    for len in (1..bytes.len()).step_by(7).chain([bytes.len() - 1, 3, 15, 16]) {
        fs::write(&cut, &bytes[..len]).unwrap();
        match problem(load(&cut, &expected()).unwrap_err()) {
            SessionFileProblem::Truncated { found, .. } => assert_eq!(found, len as u64),
            p => panic!("cut at {len}: {p:?}"),
        }
    }
    let mut longer = bytes.clone();
    longer.push(0);
    fs::write(&cut, &longer).unwrap();
    assert!(matches!(problem(load(&cut, &expected()).unwrap_err()), SessionFileProblem::Corrupt(_)));
}

#[test]
fn detects_flipped_bits_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.hips");
    save(&path, &file(1100, 1050)).unwrap();
    let bytes = fs::read(&path).unwrap();
    let bad = dir.path().join("bad.hips");
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    // Every byte of the first 64 (magic, version, length, header), then random ones.
    let positions: Vec<usize> = (0..64).chain((0..300).map(|_| rng.random_range(0..bytes.len()))).collect();
    for pos in positions {
        let mut b = bytes.clone();
        b[pos] ^= 1 << rng.random_range(0..8);
        fs::write(&bad, &b).unwrap();
        let res = load(&bad, &expected());
        // Padding bytes carry no information: flipping them is harmless only there.
        if let Ok(f) = &res {
            assert_eq!(f, &load(&path, &expected()).unwrap(), "byte {pos} changed the content");
            continue;
        }
        match res.unwrap_err() {
            Error::SessionFile { .. } => {}
            other => panic!("byte {pos}: {other:?}"),
        }
    }
}

#[test]
fn failed_save_leaves_the_old_file_and_no_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.hips");
    let good = file(10, 10);
    save(&path, &good).unwrap();
    let mut broken = file(12, 12);
    broken.snapshot.layers[1].v.pop();
    assert!(save(&path, &broken).is_err());
    assert_eq!(load(&path, &expected()).unwrap(), good);
    assert!(temp_files(dir.path()).is_empty());
    // An unwritable target folder is an I/O error.
    let e = save(dir.path().join("no/such/dir/s.hips"), &good).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
}
