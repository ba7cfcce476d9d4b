use std::fs;

use rand::{Rng, SeedableRng};

use super::*;
use crate::Error;

use super::tests::{expected, snapshot, GEOM};

fn file(tokens: usize, cached: usize) -> SessionFile {
    SessionFile::new("abc123", snapshot(tokens, cached, tokens as u64 + 1))
        .with_app(serde_json::json!({"chat": false, "note": "ü"}))
}

fn problem(e: Error) -> SessionFileProblem {
    match e {
        Error::SessionFile { problem, .. } => problem,
        other => panic!("expected a session file error, got {other:?}"),
    }
}

/// Opens `path` mapped and copies it out: what `load` would return.
fn mapped_load(path: &std::path::Path) -> crate::Result<SessionFile> {
    let m = MappedSession::open(path, &expected())?;
    m.verify_all()?;
    m.to_session_file()
}

#[test]
fn matches_load_at_awkward_sizes() {
    let dir = tempfile::tempdir().unwrap();
    for (tokens, cached) in [(0, 0), (1, 0), (1, 1), (7, 6), (97, 97), (1030, 1025), (2050, 2049)] {
        let f = file(tokens, cached);
        let path = dir.path().join(format!("s{tokens}.hips"));
        let bytes = save(&path, &f).unwrap();
        let loaded = load(&path, &expected()).unwrap();
        let m = MappedSession::open(&path, &expected()).unwrap();
        assert_eq!(m.file_bytes(), bytes);
        assert_eq!(m.header(), &read_header(&path).unwrap());
        assert_eq!(m.tokens(), &loaded.snapshot.tokens[..]);
        assert_eq!((m.cached(), m.geometry()), (cached, GEOM));
        assert_eq!(m.chunks(), cached.div_ceil(CHUNK_TOKENS));
        for (l, kv) in loaded.snapshot.layers.iter().enumerate() {
            let (k, v) = (m.layer_k(l).unwrap(), m.layer_v(l).unwrap());
            assert_eq!(k.len(), cached * GEOM.row_len());
            // Bit for bit, row by row.
            for (row, (a, b)) in k.chunks(GEOM.row_len()).zip(kv.k.chunks(GEOM.row_len())).enumerate() {
                assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "layer {l} K row {row}");
            }
            assert_eq!(v, &kv.v[..], "layer {l} V");
            assert_eq!(m.array(l, KvArray::V).unwrap(), v);
            assert_eq!(k.as_ptr() as usize % 4, 0);
            for c in 0..m.chunks() {
                m.verify_chunk(l, KvArray::K, c).unwrap();
                m.verify_chunk(l, KvArray::V, c).unwrap();
            }
        }
        m.verify_all().unwrap();
        assert_eq!(m.to_snapshot().unwrap(), loaded.snapshot, "tokens {tokens} cached {cached}");
        assert_eq!(m.to_session_file().unwrap(), loaded);
        let rows: Vec<_> = (0..m.chunks()).map(|c| m.chunk_rows(c)).collect();
        assert_eq!(rows.iter().map(|r| r.len()).sum::<usize>(), cached);
        assert!(m.chunk_rows(m.chunks()).is_empty());
        assert!(format!("{m:?}").contains("MappedSession"));
    }
}

#[test]
fn a_corrupt_chunk_fails_only_its_own_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.hips");
    save(&path, &file(2100, 2090)).unwrap(); // 3 chunks per array, the last of 42 rows
    let m = MappedSession::open(&path, &expected()).unwrap();
    assert_eq!(m.chunks(), 3);
    // Flip a byte inside layer 1's V, chunk 2.
    let row_bytes = GEOM.row_len() * 4;
    let array = 2090 * row_bytes;
    // KV data, then 3 CRCs per array, the table's CRC and the end magic.
    let kv_start = m.file_bytes() as usize - 2 * GEOM.num_layers * array - 8 * GEOM.num_layers * 3 - 12;
    assert_eq!(kv_start % 64, 0);
    drop(m);
    let pos = kv_start + 3 * array + 2 * CHUNK_TOKENS * row_bytes + 5 * row_bytes + 3;
    let mut bytes = fs::read(&path).unwrap();
    bytes[pos] ^= 0x10;
    fs::write(&path, &bytes).unwrap();

    let m = MappedSession::open(&path, &expected()).unwrap(); // the KV data is not read
    for l in 0..GEOM.num_layers {
        for which in [KvArray::K, KvArray::V] {
            for c in 0..3 {
                let res = m.verify_chunk(l, which, c);
                if (l, which, c) == (1, KvArray::V, 2) {
                    let p = problem(res.unwrap_err());
                    assert_eq!(
                        p,
                        SessionFileProblem::Corrupt(format!(
                            "layer 1 V rows from {} checksum mismatch",
                            2 * CHUNK_TOKENS
                        ))
                    );
                } else {
                    res.unwrap();
                }
            }
        }
    }
    // The same error as load, from verify_all and to_snapshot.
    let want = problem(load(&path, &expected()).unwrap_err());
    assert_eq!(problem(m.verify_all().unwrap_err()), want);
    assert_eq!(problem(m.to_snapshot().unwrap_err()), want);
    // The unverified data is still readable, with the flipped byte in it.
    let good = file(2100, 2090).snapshot.layers[1].v.clone();
    let v = m.layer_v(1).unwrap();
    let diff: Vec<usize> = (0..v.len()).filter(|&i| v[i].to_bits() != good[i].to_bits()).collect();
    assert_eq!(diff, vec![(2 * CHUNK_TOKENS + 5) * GEOM.row_len()]);
}

#[test]
fn refuses_what_load_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.hips");
    save(&path, &file(20, 19)).unwrap();
    let other = Expected { fingerprint: "zzz".into(), geometry: GEOM };
    assert_eq!(
        problem(MappedSession::open(&path, &other).unwrap_err()),
        SessionFileProblem::OtherModel { expected: "zzz".into(), found: "abc123".into() }
    );
    let other = Expected { fingerprint: "abc123".into(), geometry: KvGeometry { head_dim: 4, ..GEOM } };
    assert!(matches!(
        problem(MappedSession::open(&path, &other).unwrap_err()),
        SessionFileProblem::Incompatible(_)
    ));

    let mut bytes = fs::read(&path).unwrap();
    bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
    fs::write(&path, &bytes).unwrap();
    assert_eq!(
        problem(MappedSession::open(&path, &expected()).unwrap_err()),
        SessionFileProblem::UnsupportedVersion { found: 7, supported: VERSION }
    );
    fs::write(&path, b"GGUF and other things").unwrap();
    assert_eq!(
        problem(MappedSession::open(&path, &expected()).unwrap_err()),
        SessionFileProblem::NotASessionFile
    );
    fs::write(&path, b"").unwrap();
    assert_eq!(
        problem(MappedSession::open(&path, &expected()).unwrap_err()),
        SessionFileProblem::NotASessionFile
    );
    let missing = MappedSession::open(dir.path().join("missing.hips"), &expected()).unwrap_err();
    assert!(matches!(missing, Error::Io { .. }), "{missing:?}");
    let folder = MappedSession::open(dir.path(), &expected()).unwrap_err();
    assert!(matches!(folder, Error::Io { .. } | Error::SessionFile { .. }), "{folder:?}");
}

#[test]
fn every_truncation_is_reported_as_load_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.hips");
    save(&path, &file(40, 33)).unwrap();
    let bytes = fs::read(&path).unwrap();
    let cut = dir.path().join("cut.hips");
    for len in (1..bytes.len()).step_by(5).chain([bytes.len() - 1, 3, 8, 15, 16]) {
        fs::write(&cut, &bytes[..len]).unwrap();
        let got = problem(MappedSession::open(&cut, &expected()).unwrap_err());
        assert!(
            matches!(got, SessionFileProblem::Truncated { found, .. } if found == len as u64),
            "{len}: {got:?}"
        );
        assert_eq!(got, problem(load(&cut, &expected()).unwrap_err()), "cut at {len}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    fs::write(&cut, &longer).unwrap();
    assert!(matches!(
        problem(MappedSession::open(&cut, &expected()).unwrap_err()),
        SessionFileProblem::Corrupt(_)
    ));
}

/// Any flipped bit gives the mapped reader (open, then verify_all and copy) the same result as
/// `load`: the same content, or the same error.
#[test]
fn flipped_bits_anywhere_agree_with_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.hips");
    save(&path, &file(1100, 1050)).unwrap();
    let bytes = fs::read(&path).unwrap();
    let bad = dir.path().join("bad.hips");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let tail = bytes.len() - 40..bytes.len(); // the checksum table, its CRC and the end magic
    let positions: Vec<usize> =
        (0..64).chain(tail).chain((0..300).map(|_| rng.random_range(0..bytes.len()))).collect();
    for pos in positions {
        let mut b = bytes.clone();
        b[pos] ^= 1 << rng.random_range(0..8);
        fs::write(&bad, &b).unwrap();
        match (load(&bad, &expected()), mapped_load(&bad)) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "byte {pos}"),
            (Err(a), Err(b)) => assert_eq!(problem(a), problem(b), "byte {pos}"),
            (a, b) => panic!("byte {pos}: load {a:?}, mapped {b:?}"),
        }
    }
}

#[test]
fn out_of_range_arguments_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.hips");
    save(&path, &file(10, 10)).unwrap();
    let m = MappedSession::open(&path, &expected()).unwrap();
    for e in [
        m.layer_k(3).unwrap_err(),
        m.layer_v(usize::MAX).unwrap_err(),
        m.verify_chunk(3, KvArray::K, 0).unwrap_err(),
        m.verify_chunk(0, KvArray::V, 1).unwrap_err(),
        m.verify_chunk(0, KvArray::V, usize::MAX).unwrap_err(),
    ] {
        assert!(matches!(e, Error::InvalidArgument { name: "layer" | "chunk", .. }), "{e:?}");
    }
    // No chunks at all when nothing is cached.
    save(&path, &file(4, 0)).unwrap();
    let m = MappedSession::open(&path, &expected()).unwrap();
    assert_eq!((m.chunks(), m.layer_k(2).unwrap().len()), (0, 0));
    assert!(m.verify_chunk(0, KvArray::K, 0).is_err());
    m.verify_all().unwrap();
}

/// `save` replaces a file by renaming a new one over it, so a map of the old one stays intact.
#[test]
fn a_map_survives_saving_over_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.hips");
    let old = file(30, 30);
    save(&path, &old).unwrap();
    let m = MappedSession::open(&path, &expected()).unwrap();
    let new = file(50, 49);
    save(&path, &new).unwrap();
    m.verify_all().unwrap();
    assert_eq!(m.to_session_file().unwrap(), old);
    assert_eq!(MappedSession::open(&path, &expected()).unwrap().to_session_file().unwrap(), new);
}
