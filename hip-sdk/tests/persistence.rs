//! Session files through the async API on the real SmolLM2-135M-Instruct GGUF: save → load →
//! continue gives exactly the tokens of the uninterrupted session (in the same model and in a
//! freshly loaded one), and bad files are refused with typed errors that change nothing.

use std::path::{Path, PathBuf};

use hip_sdk::hip_core::persist::{self, Expected, SessionFileProblem};
use hip_sdk::{Attention, GenerateOptions, HipConfig, Message, Model, Session};

fn assets() -> PathBuf {
    std::env::var_os("HIP_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/hip"))
}

fn asset(name: &str) -> PathBuf {
    let p = assets().join(name);
    assert!(p.exists(), "{} is missing: run scripts/fetch-assets.sh", p.display());
    p
}

/// SmolLM2 with HiP attention that is sparse at a few hundred tokens.
async fn model() -> Model {
    let hip = HipConfig::paper()
        .with_k(64)
        .with_query_block(32, 2)
        .with_sink_window(16, 32)
        .with_dense_layers(vec![0])
        .with_refresh_interval(3);
    Model::builder(asset("smollm2-135m-instruct-q4_1.gguf"))
        .with_attention(Attention::Hip(hip))
        .with_kv_budget_bytes(128 << 20)
        .build()
        .await
        .unwrap()
}

fn document() -> String {
    let text = std::fs::read_to_string(asset("moby-dick.txt")).unwrap();
    let start = text.find("Call me Ishmael").unwrap();
    text[start..start + 1600].to_owned()
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions::greedy().with_max_tokens(n)
}

async fn session_with_document(model: &Model) -> Session {
    let s = model.session().with_system_prompt("You answer questions about a text.").build().await.unwrap();
    s.append_message(Message::user(format!("Here is the text:\n{}", document()))).await.unwrap();
    s
}

fn problem(e: &hip_sdk::Error) -> Option<SessionFileProblem> {
    assert!(e.is_session_file(), "{e:?}");
    e.session_file_problem().cloned()
}

fn no_temporaries(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_load_continue_equals_uninterrupted() {
    let model = model().await;
    let s = session_with_document(&model).await;
    let first = s.generate_with("Who is the narrator?", greedy(12)).await.unwrap();
    assert_eq!(first.tokens.len(), 12);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moby.hips");
    s.save(&path).await.unwrap();
    no_temporaries(dir.path());

    let loaded = Session::load(&model, &path).await.unwrap();
    assert_eq!(loaded.usage().tokens, s.usage().tokens);
    assert!(loaded.uses_chat_template());
    // A second model instance (another process, say) loads it too.
    let other_model = self::model().await;
    let elsewhere = Session::load(&other_model, &path).await.unwrap();

    let q = "Where does he want to go?";
    let want = s.generate_with(q, greedy(16)).await.unwrap();
    let got = loaded.generate_with(q, greedy(16)).await.unwrap();
    let got2 = elsewhere.generate_with(q, greedy(16)).await.unwrap();
    assert_eq!(got.tokens, want.tokens);
    assert_eq!(got.text, want.text);
    assert_eq!(got2.tokens, want.tokens);
    assert_eq!(loaded.usage().tokens, s.usage().tokens);

    // Saving again over the same path replaces the file atomically.
    loaded.save(&path).await.unwrap();
    let again = Session::load(&model, &path).await.unwrap();
    assert_eq!(again.usage().tokens, loaded.usage().tokens);
    no_temporaries(dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_session_files_are_refused_and_change_nothing() {
    let model = model().await;
    let s = session_with_document(&model).await;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.hips");
    s.save(&good).await.unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let kv_before = model.kv_usage();
    let bad = dir.path().join("bad.hips");

    let missing = Session::load(&model, dir.path().join("missing.hips")).await.unwrap_err();
    assert_eq!(problem(&missing), None);

    std::fs::write(&bad, b"not a session at all").unwrap();
    let e = Session::load(&model, &bad).await.unwrap_err();
    assert_eq!(problem(&e), Some(SessionFileProblem::NotASessionFile));

    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let e = Session::load(&model, &bad).await.unwrap_err();
    assert!(matches!(problem(&e), Some(SessionFileProblem::Truncated { .. })), "{e}");

    let mut flipped = bytes.clone();
    let at = bytes.len() - 4096;
    flipped[at] ^= 0x10;
    std::fs::write(&bad, &flipped).unwrap();
    let e = Session::load(&model, &bad).await.unwrap_err();
    assert!(matches!(problem(&e), Some(SessionFileProblem::Corrupt(_))), "{e}");

    // A flipped byte in the middle of the KV rows: found while the rows are copied into the
    // cache (the file is mapped, its chunks verified one by one), and the copy is undone.
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x10;
    std::fs::write(&bad, &flipped).unwrap();
    let e = Session::load(&model, &bad).await.unwrap_err();
    assert!(matches!(problem(&e), Some(SessionFileProblem::Corrupt(_))), "{e}");
    assert_eq!(model.kv_usage(), kv_before, "a failed load frees what it copied");

    let mut future = bytes.clone();
    future[8..12].copy_from_slice(&7u32.to_le_bytes());
    std::fs::write(&bad, &future).unwrap();
    let e = Session::load(&model, &bad).await.unwrap_err();
    assert!(matches!(problem(&e), Some(SessionFileProblem::UnsupportedVersion { found: 7, .. })), "{e}");

    // The same content under another model's fingerprint.
    let cfg = model.config();
    let geometry =
        persist::KvGeometry { num_layers: cfg.layers, num_kv_heads: cfg.kv_heads, head_dim: cfg.head_dim };
    let expected = Expected { fingerprint: model.fingerprint().to_owned(), geometry };
    let mut file = persist::load(&good, &expected).unwrap();
    file.model_fingerprint = "f".repeat(64);
    persist::save(&bad, &file).unwrap();
    let e = Session::load(&model, &bad).await.unwrap_err();
    assert!(matches!(problem(&e), Some(SessionFileProblem::OtherModel { .. })), "{e}");

    // A save into a missing folder fails; nothing leaked, the session goes on.
    let e = s.save(dir.path().join("no/such/folder/x.hips")).await.unwrap_err();
    assert!(e.is_session_file(), "{e:?}");
    assert_eq!(model.kv_usage(), kv_before);
    assert_eq!(std::fs::read(&good).unwrap(), bytes);
    let reply = s.generate_with("Who is the narrator?", greedy(4)).await.unwrap();
    assert_eq!(reply.tokens.len(), 4);
    no_temporaries(dir.path());
}
