//! A streaming chat in the terminal: each line you type is a user turn, the reply streams back.
//!
//! ```sh
//! cargo run --release -p hip-examples --example chat [-- MODEL.gguf]
//! ```
//!
//! The model is the first argument, else `$HIP_MODEL`, else SmolLM2-135M-Instruct from
//! `${HIP_ASSETS:-~/.cache/hip}` (`bash scripts/fetch-assets.sh smollm2` fetches it); with
//! `--features cuda`, Qwen2.5-Coder-1.5B-Instruct on CUDA device 0. `/reset` starts a new
//! conversation, `/quit` (or end of input) leaves.
use std::io::Write;
use std::process::ExitCode;

use futures::StreamExt;
use hip_examples::{exit_code, model_path};
use hip_sdk::{Model, SamplingParams, Session};
use tokio::io::AsyncBufReadExt;

async fn new_conversation(model: &Model) -> hip_sdk::Result<Session> {
    model
        .session()
        .with_system_prompt("You are a helpful assistant. Answer briefly.")
        .with_sampling(SamplingParams::default().with_temperature(0.3).with_top_p(0.9))
        .build()
        .await
}

async fn run() -> anyhow::Result<()> {
    let path = model_path(std::env::args_os().nth(1));
    eprintln!("loading {} ...", path.display());
    let builder = Model::builder(&path);
    #[cfg(feature = "cuda")]
    let builder = builder.with_device(hip_sdk::Device::Cuda(0));
    let model = builder.build().await?;
    let mut session = new_conversation(&model).await?;
    eprintln!("ready ({} tokens of context): type a message, /reset or /quit", model.context_limit());

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut out = std::io::stdout();
    loop {
        write!(out, "\n> ")?;
        out.flush()?;
        let Some(line) = lines.next_line().await? else { break };
        match line.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                session = new_conversation(&model).await?;
                continue;
            }
            _ => {}
        }
        let mut reply = session.generate(line);
        while let Some(token) = reply.next().await {
            match token {
                Ok(token) => write!(out, "{}", token.text)?,
                // The conversation no longer fits: start over rather than stop.
                Err(e) if e.is_context_overflow() || e.is_kv_cache_full() => {
                    eprintln!("\n[{e}; starting a new conversation]");
                    session = new_conversation(&model).await?;
                }
                Err(e) if e.is_invalid_request() => eprintln!("\n[{e}]"),
                Err(e) => return Err(e.into()),
            }
            out.flush()?;
        }
        writeln!(out)?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(run().await)
}
