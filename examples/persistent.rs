//! Persistent sessions: save a conversation to a file, load it back, fork it, and continue both
//! branches from the saved context.
//!
//! ```sh
//! cargo run --release -p hip-examples --example persistent [-- MODEL.gguf [SESSION_FILE]]
//! ```
//!
//! The model is the first argument, else `$HIP_MODEL`, else SmolLM2-135M-Instruct from
//! `${HIP_ASSETS:-~/.cache/hip}` (Qwen2.5-Coder-1.5B-Instruct with `--features cuda`, on CUDA
//! device 0); the session file defaults to one in the temporary folder.
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use futures::StreamExt;
use hip_examples::{exit_code, model_path};
use hip_sdk::{GenerateOptions, Model, Session};

/// Streams the reply to `prompt` in `session` on one line, marked with `who`.
async fn say(session: &Session, who: &str, prompt: &str) -> hip_sdk::Result<()> {
    println!("   [{who}] user: {prompt}");
    print!("   [{who}] assistant: ");
    let mut reply = session.generate_with(prompt, GenerateOptions::greedy().with_max_tokens(80));
    while let Some(token) = reply.next().await {
        print!("{}", token?.text.replace('\n', " "));
        std::io::stdout().flush().ok();
    }
    println!();
    Ok(())
}

async fn run() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let model_path = model_path(args.next());
    let file =
        args.next().map_or_else(|| std::env::temp_dir().join("hip-persistent-example.hips"), PathBuf::from);
    let builder = Model::builder(&model_path);
    #[cfg(feature = "cuda")]
    let builder = builder.with_device(hip_sdk::Device::Cuda(0));
    let model = builder.build().await?;

    println!("1. A new session: a system prompt and a first exchange.");
    let session = model.session().with_system_prompt("You are a travel guide. Be brief.").build().await?;
    say(&session, "new", "I am going to Paris. Name one famous monument there.").await?;

    println!("2. Save it to {} ({} tokens), and drop it.", file.display(), session.usage().tokens);
    session.save(&file).await?;
    drop(session);

    println!("3. Load it back: nothing is prefilled again.");
    let loaded = Session::load(&model, &file).await?;
    println!("   {} tokens in the loaded context", loaded.usage().tokens);

    println!("4. Fork it: both branches start from the saved conversation and go their own ways.");
    let fork = loaded.fork().await?;
    say(&loaded, "A", "What food should I try in that city?").await?;
    say(&fork, "B", "How tall is that monument?").await?;
    println!("   A now holds {} tokens, B {}.", loaded.usage().tokens, fork.usage().tokens);

    println!("5. A damaged file is refused with an error, never loaded.");
    let bytes = std::fs::read(&file)?;
    let damaged = file.with_extension("damaged.hips");
    std::fs::write(&damaged, &bytes[..bytes.len() / 2])?;
    match Session::load(&model, &damaged).await {
        Err(e) if e.is_session_file() => println!("   refused: {e}"),
        Err(e) => return Err(e.into()),
        Ok(_) => anyhow::bail!("a truncated session file was loaded"),
    }
    std::fs::remove_file(&damaged)?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(run().await)
}
