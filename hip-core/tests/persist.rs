//! Session files on the real SmolLM2 model: snapshot → save → load → restore → continue gives
//! exactly the tokens of the uninterrupted sequence (HiP attention, sparse at this length), in
//! the same engine and in a fresh one; a file refuses another model.

mod common;

use candle_core::Device;
use common::{asset, smollm2, sparse_hip};
use hip_core::attention::AttentionBackend;
use hip_core::engine::{Engine, EngineConfig, GenerateParams};
use hip_core::kv::SeqId;
use hip_core::loader::tokenizer::Tokenizer;
use hip_core::model::Model;
use hip_core::persist::{self, Expected, SessionFile, SessionFileProblem};
use hip_core::Error;

fn engine() -> Engine {
    let path = smollm2();
    let model = Model::from_gguf(&path, &Device::Cpu).unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let tok = Tokenizer::from_gguf(&content).unwrap();
    let hip = sparse_hip();
    Engine::new(model, tok, EngineConfig::default().with_attention(AttentionBackend::Hip(hip))).unwrap()
}

fn generate(e: &mut Engine, s: SeqId, n: usize) -> Vec<u32> {
    let r = e.generate(s, GenerateParams::greedy(n).with_ignore_eos(true)).unwrap();
    e.run_to_completion(r).unwrap().0
}

#[test]
fn save_load_continue_equals_uninterrupted() {
    let text = std::fs::read_to_string(asset("moby-dick.txt")).unwrap();
    let start = text.find("Call me Ishmael").unwrap();
    let mut e = engine();
    let doc = e.tokenizer().encode(&text[start..start + 1500], false).unwrap();
    let more = e.tokenizer().encode(" Then the captain said", false).unwrap();
    assert!(doc.len() > 250, "{}", doc.len());

    // Uninterrupted: document, 10 tokens, then (a) 12 more straight on, (b) a prompt and 12 more.
    let s = e.create_sequence();
    e.append(s, &doc).unwrap();
    let first = generate(&mut e, s, 10);
    let fork = e.fork(s).unwrap();
    let straight_on = generate(&mut e, s, 12);
    e.append(fork, &more).unwrap();
    let after_prompt = generate(&mut e, fork, 12);

    // Interrupted after the first 10 tokens.
    let t = e.create_sequence();
    e.append(t, &doc).unwrap();
    assert_eq!(generate(&mut e, t, 10), first);
    let snap = e.snapshot(t).unwrap();
    assert_eq!(snap.tokens, e.tokens(t).unwrap());
    assert_eq!(snap.cached, e.cached_len(t).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moby.hips");
    let file = SessionFile::new(e.model().fingerprint(), snap.clone()).with_app(serde_json::json!({"x": 1}));
    persist::save(&path, &file).unwrap();
    e.remove_sequence(t).unwrap();

    // A fresh engine (a new process, say) and the same engine both continue exactly.
    let mut fresh = engine();
    for eng in [&mut e, &mut fresh] {
        let back = persist::load(&path, &Expected::of(eng.model())).unwrap();
        assert_eq!(back, file);
        let a = eng.restore(&back.snapshot).unwrap();
        let b = eng.restore(&back.snapshot).unwrap();
        assert_eq!(eng.tokens(a).unwrap(), &snap.tokens[..]);
        assert_eq!(generate(eng, a, 12), straight_on);
        eng.append(b, &more).unwrap();
        assert_eq!(generate(eng, b, 12), after_prompt);
    }

    // Another model's fingerprint is refused before anything is read.
    let other = Expected { fingerprint: "0".repeat(64), ..Expected::of(e.model()) };
    match persist::load(&path, &other) {
        Err(Error::SessionFile { problem: SessionFileProblem::OtherModel { .. }, .. }) => {}
        other => panic!("{other:?}"),
    }
    // A snapshot past the context limit is refused and leaves the engine as it was.
    let mut long = snap.clone();
    long.tokens = vec![1; e.max_context() + 1];
    let used = e.kv().used_blocks();
    assert!(matches!(e.restore(&long), Err(Error::ContextOverflow { .. })));
    assert_eq!(e.kv().used_blocks(), used);
}
