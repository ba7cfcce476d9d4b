//! The async Session API on the real SmolLM2-135M-Instruct GGUF: streams against completions,
//! cancellation, concurrency, forks, errors. Needs `scripts/fetch-assets.sh` (run by `make test`).

use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use futures::StreamExt;
use hip_sdk::{Attention, Completion, FinishReason, GenerateOptions, HipConfig, Model, Session, TokenStream};

fn model_path() -> PathBuf {
    let dir = std::env::var_os("HIP_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/hip"));
    let p = dir.join("smollm2-135m-instruct-q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-assets.sh", p.display());
    p
}

/// One model shared by the tests of this file (the engine thread does not depend on a runtime).
fn shared_model() -> Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            std::thread::spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(Model::builder(model_path()).with_kv_budget_bytes(96 << 20).build()).unwrap()
            })
            .join()
            .unwrap()
        })
        .clone()
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions::greedy().with_max_tokens(n)
}

/// A session without the chat template holding `text`.
async fn raw_session(model: &Model, text: &str) -> Session {
    let s = model.session().with_chat_template(false).build().await.unwrap();
    s.append(text).await.unwrap();
    s
}

async fn collect(mut stream: TokenStream) -> (String, Vec<u32>, FinishReason) {
    let (mut text, mut ids) = (String::new(), Vec::new());
    while let Some(t) = stream.next().await {
        let t = t.unwrap();
        text.push_str(&t.text);
        ids.push(t.id);
    }
    (text, ids, stream.finish_reason().expect("ended normally"))
}

#[test]
fn handles_are_send_sync_static() {
    fn check<T: Send + Sync + 'static>() {}
    check::<Model>();
    check::<Session>();
    check::<TokenStream>();
    check::<hip_sdk::CompletionFuture>();
    check::<hip_sdk::Append>();
    check::<hip_sdk::AppendFuture>();
    check::<hip_sdk::Error>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_tokens_equal_the_awaited_completion() {
    let model = shared_model();
    let prompt = "Name three colors.";
    let a = model.session().build().await.unwrap();
    assert!(a.uses_chat_template());
    let (text, ids, reason) = collect(a.generate_with(prompt, greedy(20))).await;
    let b = model.session().build().await.unwrap();
    let done: Completion = b.generate_with(prompt, greedy(20)).await.unwrap();
    assert!(!done.text.is_empty());
    assert_eq!(text, done.text);
    assert_eq!(ids, done.tokens);
    assert_eq!(reason, done.finish_reason);
    assert_eq!(done.usage.completion_tokens, done.tokens.len());
    assert_eq!(a.usage(), b.usage());
    assert_eq!(b.usage().tokens, done.usage.context_tokens);
    assert!(b.usage().kv_bytes > 0);

    // A second turn sees the first: the context grows by the new turn and its reply.
    let before = b.usage().tokens;
    let again = b.generate_with("And one more?", greedy(8)).await.unwrap();
    assert!(again.usage.prompt_tokens > 0);
    assert_eq!(b.usage().tokens, before + again.usage.prompt_tokens + again.tokens.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_cancels_it() {
    let model = shared_model();
    let a = raw_session(&model, "Once upon a time, in a land far away,").await;
    let before = a.usage().tokens;
    let mut stream = a.generate_with("", greedy(500).with_ignore_eos(true));
    for _ in 0..2 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream);

    // The engine is free: another session's generation completes.
    let b = raw_session(&model, "The capital of France is").await;
    let done = b.generate_with("", greedy(8)).await.unwrap();
    assert_eq!(done.tokens.len(), 8);

    // The dropped request stopped within a few steps and produces nothing more.
    let after = a.usage().tokens;
    assert!(after >= before + 2 && after < before + 100, "{before} -> {after}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.usage().tokens, after);

    // Its session is usable again, and keeps what was generated.
    let more = a.generate_with(" The end.", greedy(4)).await.unwrap();
    assert_eq!(more.usage.context_tokens, a.usage().tokens);
    assert!(more.usage.context_tokens > after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_handle_cancels_with_an_error() {
    let model = shared_model();
    let s = raw_session(&model, "One, two, three,").await;
    let before = s.usage().tokens;
    let mut stream = s.generate_with("", greedy(500).with_ignore_eos(true));
    let handle = stream.abort_handle();
    stream.next().await.unwrap().unwrap();
    handle.abort();
    let mut err = None;
    while let Some(item) = stream.next().await {
        if let Err(e) = item {
            err = Some(e);
        }
    }
    let err = err.expect("an aborted stream ends with an error");
    assert!(err.is_cancelled(), "{err:?}");
    assert!(s.usage().tokens < before + 100);
    // The session goes on.
    s.generate_with(" four", greedy(2)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_match_solo_runs() {
    let model = shared_model();
    let prompts = [
        "The capital of France is",
        "Water boils at",
        "The largest planet in the solar system is",
        "def fibonacci(n):",
        "Once upon a time",
        "The color of the sky is",
        "1, 2, 3, 4,",
        "My favourite food is",
    ];
    let run = |prompt: &'static str| {
        let model = model.clone();
        async move {
            let s = raw_session(&model, prompt).await;
            s.generate_with("", greedy(12)).await.unwrap()
        }
    };
    let mut solo = Vec::new();
    for p in prompts {
        solo.push(run(p).await);
    }
    let together = futures::future::join_all(prompts.map(|p| tokio::spawn(run(p)))).await;
    for ((p, alone), with_others) in prompts.iter().zip(&solo).zip(together) {
        let with_others = with_others.unwrap();
        assert_eq!(alone.tokens, with_others.tokens, "{p:?}");
        assert_eq!(alone.text, with_others.text, "{p:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_diverge_independently() {
    // Its own model: the test compares the cache's bytes in use before and after a fork, which
    // other tests' sessions on the shared model would change in between.
    let model = Model::builder(model_path()).with_kv_budget_bytes(32 << 20).build().await.unwrap();
    let text = "The quick brown fox";
    let parent = raw_session(&model, text).await;
    let in_use = model.kv_usage().bytes_in_use;
    let child = parent.fork().await.unwrap();
    assert_eq!(child.usage(), parent.usage());
    // The fork shares the parent's blocks.
    assert_eq!(model.kv_usage().bytes_in_use, in_use);

    let c = child.generate_with(" sleeps", greedy(10)).await.unwrap();
    let p = parent.generate_with(" jumps", greedy(10)).await.unwrap();

    let fresh_p = raw_session(&model, text).await.generate_with(" jumps", greedy(10)).await.unwrap();
    let fresh_c = raw_session(&model, text).await.generate_with(" sleeps", greedy(10)).await.unwrap();
    assert_eq!(p.tokens, fresh_p.tokens);
    assert_eq!(c.tokens, fresh_c.tokens);
    assert_eq!(parent.usage().tokens, fresh_p.usage.context_tokens);
    assert_ne!(p.text, c.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_reports_progress_and_cancels_on_drop() {
    let model = Model::builder(model_path())
        .with_attention(Attention::Hip(HipConfig::paper()))
        .with_kv_budget_bytes(16 << 20)
        .with_prefill_chunk(16)
        .with_threads(2)
        .build()
        .await
        .unwrap();
    let s = model.session().with_chat_template(false).build().await.unwrap();
    let text = "It was the best of times, it was the worst of times, it was the age of wisdom, it was \
                the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.";
    let n = model.tokenizer().encode(text, false).unwrap().len();
    let mut append = s.append(text);
    let mut reports = Vec::new();
    while let Some(p) = append.next().await {
        reports.push(p.unwrap());
    }
    let last = reports.last().expect("progress reports");
    assert_eq!((last.done, last.total), (n, n));
    assert!(reports.windows(2).all(|w| w[0].done <= w[1].done));
    assert_eq!(s.usage().tokens, n);

    // Dropping an append before it completes restores the context.
    let append = s.append(text);
    drop(append);
    let mut cancelled =
        Box::pin(IntoFuture::into_future(s.append(" More text that will be cancelled.".repeat(8))));
    let _ = futures::poll!(cancelled.as_mut());
    drop(cancelled);
    s.append(" And so on.").await.unwrap();
    let tail = model.tokenizer().encode(" And so on.", false).unwrap().len();
    assert_eq!(s.usage().tokens, n + tail);
    // Generation runs on the HiP backend too.
    let done = s.generate_with("", greedy(4)).await.unwrap();
    assert_eq!(done.tokens.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_overflow_leaves_the_session_usable() {
    let model = Model::builder(model_path())
        .with_context_limit(24)
        .with_kv_budget_bytes(4 << 20)
        .build()
        .await
        .unwrap();
    let s = model.session().with_chat_template(false).build().await.unwrap();
    let long = "one two three four five six seven eight nine ten ".repeat(8);
    let err = s.generate_with(long.clone(), greedy(4)).await.unwrap_err();
    assert!(err.is_context_overflow(), "{err:?}");
    let err = s.append(long).await.unwrap_err();
    assert!(err.is_context_overflow(), "{err:?}");
    assert_eq!(s.usage().tokens, 0);

    let done = s.generate_with("Hello, my name is", greedy(4)).await.unwrap();
    assert_eq!(done.tokens.len(), 4);
    // A generation that reaches the limit finishes, it does not fail.
    let done = s.generate_with("", greedy(24).with_ignore_eos(true)).await.unwrap();
    assert_eq!(done.finish_reason, FinishReason::ContextFull);
    assert_eq!(s.usage().tokens, 24);
    // A full context cannot take more.
    let err = s.generate_with("", greedy(4)).await.unwrap_err();
    assert!(err.is_context_overflow(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_reported() {
    let model = shared_model();
    let s = model.session().build().await.unwrap();
    let err = s.generate_with("Hi", GenerateOptions::new().with_temperature(-1.0)).await.unwrap_err();
    assert!(err.is_invalid_request(), "{err:?}");
    let err = s.generate_with("Hi", greedy(0)).await.unwrap_err();
    assert!(err.is_invalid_request(), "{err:?}");
    // Nothing to generate from.
    let raw = model.session().with_chat_template(false).build().await.unwrap();
    let err = raw.generate_with("", greedy(4)).await.unwrap_err();
    assert!(err.is_invalid_request(), "{err:?}");
    assert_eq!(raw.usage().tokens, 0);
    let err = model.session().with_sampling(hip_sdk::SamplingParams::default().with_top_p(2.0)).build().await;
    assert!(err.unwrap_err().is_invalid_request());
}

#[tokio::test]
async fn bad_model_files_are_load_errors() {
    let err = Model::builder("/nonexistent/model.gguf").build().await.unwrap_err();
    assert!(err.is_load(), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");

    let junk = std::env::temp_dir().join(format!("hip-sdk-junk-{}.gguf", std::process::id()));
    std::fs::write(&junk, b"this is not a gguf file").unwrap();
    let err = Model::builder(&junk).build().await.unwrap_err();
    std::fs::remove_file(&junk).unwrap();
    assert!(err.is_load(), "{err:?}");

    let err = Model::builder(model_path()).with_prefill_chunk(0).build().await.unwrap_err();
    assert!(err.is_invalid_request(), "{err:?}");

    // A KV-cache folder that does not exist: refused at build, naming the folder.
    let err = Model::builder(model_path()).with_kv_dir("/nonexistent/kv-dir").build().await.unwrap_err();
    assert!(err.to_string().contains("/nonexistent/kv-dir"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_prompt_is_prefilled_at_build() {
    let model = shared_model();
    let s = model.session().with_system_prompt("You are terse.").build().await.unwrap();
    let n = s.usage().tokens;
    assert!(n > 3, "{n}");
    let done = s.generate_with("What is 2+2?", greedy(12)).await.unwrap();
    assert_eq!(s.usage().tokens, n + done.usage.prompt_tokens + done.tokens.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_kv_cache_fails_cleanly_and_dropped_sessions_free_it() {
    // SmolLM2-135M: 30 layers x 3 KV heads x 64 dims, f32 K and V, 16 tokens a block.
    let block = 2 * 30 * 16 * 3 * 64 * 4;
    let model = Model::builder(model_path()).with_kv_budget_bytes(4 * block).build().await.unwrap();
    assert_eq!(model.kv_usage().capacity_bytes, 4 * block);
    let text = "It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, \
                his chin nuzzled into his breast in an effort to escape the vile wind.";
    let a = raw_session(&model, text).await;
    assert!(a.usage().tokens > 32 && a.usage().tokens <= 48, "{:?}", a.usage());
    assert_eq!(model.kv_usage().bytes_in_use, 3 * block);

    let b = model.session().with_chat_template(false).build().await.unwrap();
    let err = b.append(text).await.unwrap_err();
    assert!(err.is_kv_cache_full(), "{err:?}");
    assert_eq!(b.usage().tokens, 0);
    assert_eq!(a.usage().kv_bytes, 3 * block);

    drop(a);
    b.append(text).await.unwrap();
    assert_eq!(model.kv_usage().bytes_in_use, 3 * block);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offloading_needs_a_gpu_and_a_cpu_model_reports_none() {
    let model = shared_model();
    assert_eq!(model.offload_report().await.unwrap(), None);
    let err = Model::builder(model_path())
        .with_attention(hip_sdk::Attention::Hip(hip_sdk::HipConfig::default()))
        .with_offload(hip_sdk::Offload::default())
        .build()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("offload"), "{err}");
}
