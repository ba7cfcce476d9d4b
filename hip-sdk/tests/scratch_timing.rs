use hip_sdk::{GenerateOptions, Model};
use std::path::PathBuf;
fn model_path() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/hip/smollm2-135m-instruct-q4_1.gguf")
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timing() {
    for (limit, budget) in [(None, 8usize << 20), (Some(48), 96 << 20), (None, 96 << 20)] {
        let mut b = Model::builder(model_path()).with_kv_budget_bytes(budget);
        if let Some(l) = limit {
            b = b.with_context_limit(l);
        }
        let model = b.build().await.unwrap();
        let s = model.session().with_chat_template(false).build().await.unwrap();
        let t = std::time::Instant::now();
        let done = s
            .generate_with(
                "Hello, my name is",
                GenerateOptions::greedy().with_max_tokens(20).with_ignore_eos(true),
            )
            .await
            .unwrap();
        eprintln!("{limit:?} {budget} {} tokens {:?}", done.tokens.len(), t.elapsed());
    }
}
