//! Dynamic RoPE (HiP over un-rotated keys, `HipConfig::rope_extend`) on the real SmolLM2 model:
//! with a budget covering the context it is dense attention, and sessions move between engines
//! that cache rotated and un-rotated keys. The weights run dequantized (f32), so the two
//! attention paths, which agree to ~1e-6, are not blurred by 8-bit activation rounding in the
//! quantized matmuls.

mod common;

use candle_core::Device;
use common::{argmax, asset, smollm2};
use hip_core::attention::{AttentionBackend, AttentionState};
use hip_core::engine::{Engine, EngineConfig, GenerateParams};
use hip_core::kv::{KvCacheConfig, PagedKvCache};
use hip_core::loader::tokenizer::Tokenizer;
use hip_core::model::{LogitsWanted, Model, SeqChunk, WeightPolicy};
use hip_core::{HipConfig, RopeExtend};

fn extend_cfg() -> HipConfig {
    HipConfig::default()
        .with_k(1024)
        .with_query_block(32, 2)
        .with_rope_extend(RopeExtend { dense_layer_k: 1024 })
}

fn tokenizer() -> Tokenizer {
    let mut f = std::fs::File::open(smollm2()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    Tokenizer::from_gguf(&content).unwrap()
}

/// Greedy run: prefill `chunks`, then `n` tokens; returns the logits after the prompt and the
/// greedy tokens.
fn greedy(backend: AttentionBackend, chunks: &[&[u32]], n: usize) -> (Vec<f32>, Vec<u32>) {
    let model = Model::from_gguf_with(smollm2(), &Device::Cpu, WeightPolicy::AsStored).unwrap();
    let c = model.config();
    let mut kv =
        PagedKvCache::new(KvCacheConfig::for_bytes(c.layers, c.kv_heads, c.head_dim, 16, 128 << 20).unwrap())
            .unwrap();
    let mut attn = AttentionState::new(backend).unwrap();
    let seq = kv.add_sequence();
    let mut step = |tokens: &[u32], attn: &mut AttentionState| {
        let chunk = SeqChunk { seq, tokens, logits: LogitsWanted::Last };
        model
            .forward(&[chunk], &mut kv, attn)
            .unwrap()
            .remove(0)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let mut first = Vec::new();
    for ch in chunks {
        first = step(ch, &mut attn);
    }
    let mut out = vec![argmax(&first)];
    while out.len() < n {
        let l = step(&[*out.last().unwrap()], &mut attn);
        out.push(argmax(&l));
    }
    (first, out)
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// With a budget covering the context every key is attended at its true position, so Dynamic
/// RoPE equals dense attention: prefill in two chunks (the prefill tail included), then decode
/// steps through the mask cache.
fn covering_budget_equals_dense() {
    let text = std::fs::read_to_string(asset("moby-dick.txt")).unwrap();
    let mut prompt = tokenizer().encode(&text[..4000], false).unwrap();
    prompt.truncate(300);
    let (want_first, want) = greedy(AttentionBackend::Dense, &[&prompt], 6);
    let ext = AttentionBackend::Hip(extend_cfg());
    let (got_first, got) = greedy(ext, &[&prompt[..100], &prompt[100..]], 6);
    let rel = rel_err(&got_first, &want_first);
    assert!(rel < 1e-3, "logits after the prompt: relative error {rel}");
    assert_eq!(got, want);
}

/// Under Dynamic RoPE the cache holds un-rotated keys, but snapshots hold rotated ones like every
/// other backend's: the snapshots of both engines agree, and each restores into the other
/// engine, which then generates the same tokens.
fn snapshots_move_between_engines() {
    let engine = |cfg: EngineConfig| {
        let model = Model::from_gguf(smollm2(), &Device::Cpu).unwrap();
        Engine::new(model, tokenizer(), cfg).unwrap()
    };
    let mut dense = engine(EngineConfig::default());
    let mut ext = engine(EngineConfig::default().with_attention(AttentionBackend::Hip(extend_cfg())));
    let ids = dense
        .tokenizer()
        .encode("Call me Ishmael. Some years ago, never mind how long precisely", false)
        .unwrap();
    let mut snaps = Vec::new();
    for e in [&mut dense, &mut ext] {
        let s = e.create_sequence();
        e.append(s, &ids).unwrap();
        let r = e.generate(s, GenerateParams::greedy(1).with_ignore_eos(true)).unwrap();
        e.run_to_completion(r).unwrap();
        snaps.push(e.snapshot(s).unwrap());
    }
    assert_eq!(snaps[0].cached, snaps[1].cached);
    for (a, b) in snaps[1].layers.iter().zip(&snaps[0].layers) {
        // Un-rotated keys would differ by about |k| itself.
        let d = a.k.iter().zip(&b.k).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let m = b.k.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(d < 1e-3 * m, "rotated keys differ by {d} (max |k| {m})");
    }
    let mut continued = Vec::new();
    for (e, snapshot) in [(&mut dense, &snaps[1]), (&mut ext, &snaps[0])] {
        let r = e.restore(snapshot).unwrap();
        let g = e.generate(r, GenerateParams::greedy(8).with_ignore_eos(true)).unwrap();
        continued.push(e.run_to_completion(g).unwrap().0);
    }
    assert_eq!(continued[0], continued[1]);
}

/// A saved session restores straight from its memory-mapped file, chunk by chunk (2 chunks of
/// 1,024 rows), into a Dynamic RoPE engine whose KV cache is itself a memory-mapped file: the
/// keys are un-rotated at their positions, and generation continues as the dense engine that
/// saved it continues. A flipped byte in the KV data fails the restore and changes nothing.
fn mapped_session_restores_chunk_by_chunk() {
    use hip_core::persist::{self, Expected, MappedSession, SessionFile};
    let text = std::fs::read_to_string(asset("moby-dick.txt")).unwrap();
    let mut ids = tokenizer().encode(&text[..12_000], false).unwrap();
    ids.truncate(1100);
    let engine = |cfg: EngineConfig| {
        let model = Model::from_gguf(smollm2(), &Device::Cpu).unwrap();
        Engine::new(model, tokenizer(), cfg.with_max_context(4096)).unwrap()
    };
    let mut dense = engine(EngineConfig::default());
    let s = dense.create_sequence();
    dense.append(s, &ids).unwrap();
    let r = dense.generate(s, GenerateParams::greedy(1).with_ignore_eos(true)).unwrap();
    dense.run_to_completion(r).unwrap();
    let snap = dense.snapshot(s).unwrap();
    assert!(snap.cached > 1024, "two checksum chunks");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.hip");
    persist::save(&path, &SessionFile::new(dense.model().fingerprint(), snap.clone())).unwrap();
    let r = dense.restore(&snap).unwrap();
    let g = dense.generate(r, GenerateParams::greedy(8).with_ignore_eos(true)).unwrap();
    let want = dense.run_to_completion(g).unwrap().0;

    let cfg = HipConfig::default()
        .with_k(2048)
        .with_query_block(32, 2)
        .with_rope_extend(RopeExtend { dense_layer_k: 2048 });
    let kv_dir = tempfile::tempdir().unwrap();
    let mut ext =
        engine(EngineConfig::default().with_attention(AttentionBackend::Hip(cfg)).with_kv_dir(kv_dir.path()));
    let mapped = MappedSession::open(&path, &Expected::of(ext.model())).unwrap();
    let r = ext.restore_mapped(&mapped).unwrap();
    let g = ext.generate(r, GenerateParams::greedy(8).with_ignore_eos(true)).unwrap();
    assert_eq!(ext.run_to_completion(g).unwrap().0, want);

    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    let bad = dir.path().join("bad.hip");
    std::fs::write(&bad, &bytes).unwrap();
    let mapped = MappedSession::open(&bad, &Expected::of(ext.model())).unwrap();
    let used = ext.kv().used_blocks();
    assert!(matches!(ext.restore_mapped(&mapped), Err(hip_core::Error::SessionFile { .. })));
    assert_eq!(ext.kv().used_blocks(), used, "a failed restore frees what it took");
}

#[test]
fn dynamic_rope_on_smollm2() {
    // The only test of this binary: nothing else reads the variable. The GGUF's matmuls then run
    // f32 weights on f32 activations.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    covering_budget_equals_dense();
    snapshots_move_between_engines();
    mapped_session_restores_chunk_by_chunk();
}
