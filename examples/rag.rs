//! Questions over long documents, answered from one persistent session.
//!
//! `cargo run --release -p hip-examples --example rag -- [-m MODEL.gguf] [-d FILE_OR_DIR]... [QUESTION]...`
//!
//! Every text file of the documents goes into one session, prefilled once (with a progress bar)
//! and saved under `${HIP_ASSETS:-~/.cache/hip}/sessions/`: a later run with the same documents
//! and model loads it and starts at once. Each question (the arguments, else one per line of
//! stdin) is answered in a fork of that session, so questions never pile up in its context.
//! `$HIP_MODEL` and `$HIP_DOCS` (paths separated by `:`) override the defaults too.
//! With `--features cuda`: Qwen2.5-Coder-1.5B-Instruct over Moby-Dick on CUDA device 0.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use hip_examples::{assets_dir, exit_code, model_path, read_text_files};
use hip_sdk::{Attention, GenerateOptions, HipConfig, Message, Model, Session};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncBufReadExt, BufReader};

// CPU: SmolLM2-135M-Instruct has an 8,192-token context. The 2021 address (sotu-2021.txt) is 10,843
// tokens and does not fit; 2020's, 7,438 tokens, is the most recent that leaves room for Q and A.
#[cfg(not(feature = "cuda"))]
const DEFAULT_DOCS: &str = "sotu/2020_donald_j_trump_r.txt";
// GPU: Qwen2.5-Coder-1.5B-Instruct over the whole of Moby-Dick (~300k tokens).
#[cfg(feature = "cuda")]
const DEFAULT_DOCS: &str = "moby-dick.txt";
const SYSTEM: &str = "Answer the user's questions from the documents they give you, briefly.";
const ANSWER_TOKENS: usize = 200;

/// Prefills a new session with the documents, showing the progress, and saves it to `file`.
async fn prefill(model: &Model, docs: String, file: &Path) -> Result<Session> {
    let (tokens, limit) = (model.tokenizer().encode(&docs, false)?.len(), model.context_limit());
    if tokens + ANSWER_TOKENS + 100 > limit {
        bail!("the documents are {tokens} tokens: too many for the model's {limit}-token context");
    }
    eprintln!("prefilling {tokens} tokens, once: the session is saved for the next runs");
    let session = model.session().with_system_prompt(SYSTEM).build().await?;
    let bar = ProgressBar::new(tokens as u64).with_style(ProgressStyle::with_template(
        "prefill {bar:40} {pos}/{len} tokens, {per_sec}, {eta} left",
    )?);
    let mut append = session.append_message(Message::user(docs));
    while let Some(progress) = append.next().await {
        let progress = progress?;
        bar.set_length(progress.total as u64);
        bar.set_position(progress.done as u64);
    }
    bar.finish();
    let _ = std::fs::create_dir_all(file.parent().unwrap_or(Path::new(".")));
    match session.save(file).await {
        Ok(()) => eprintln!("saved the session to {}", file.display()),
        Err(e) => eprintln!("warning: the session is not saved: {e}"),
    }
    Ok(session)
}

/// Answers in a fork of the document session, streaming the tokens to stdout.
async fn answer(docs: &Session, question: &str) -> Result<()> {
    let opts = GenerateOptions::greedy().with_max_tokens(ANSWER_TOKENS).with_repetition_penalty(1.1);
    let mut stream = docs.fork().await?.generate_with(question, opts);
    let mut out = std::io::stdout(); // write!, not print!: a closed pipe is an error, not a panic
    while let Some(token) = stream.next().await {
        write!(out, "{}", token?.text)?;
        out.flush()?;
    }
    writeln!(out)?;
    Ok(())
}

async fn run() -> Result<()> {
    let (mut model_arg, mut docs, mut questions) = (None, vec![], vec![]);
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("-m" | "--model") => model_arg = Some(args.next().context("--model needs a path")?),
            Some("-d" | "--docs") => docs.push(PathBuf::from(args.next().context("--docs needs a path")?)),
            Some("-h" | "--help") => {
                println!("usage: rag [-m MODEL.gguf] [-d FILE_OR_DIR]... [QUESTION]...");
                return Ok(());
            }
            Some(q) => questions.push(q.to_owned()),
            None => bail!("the question {arg:?} is not valid UTF-8"),
        }
    }
    if docs.is_empty() {
        let env = std::env::var_os("HIP_DOCS");
        docs = env.map_or(vec![assets_dir().join(DEFAULT_DOCS)], |d| std::env::split_paths(&d).collect());
    }
    let text = read_text_files(&docs)?;
    // HiP: already at 7.4k tokens it prefills and decodes faster than dense, with answers as good.
    let attention = Attention::Hip(HipConfig::default());
    let builder = Model::builder(model_path(model_arg));
    #[cfg(feature = "cuda")] // K and V are bf16 on the GPU: 28 KiB a token of Qwen2.5-1.5B.
    let builder = builder
        .with_device(hip_sdk::Device::Cuda(0))
        .with_context_limit(320_000)
        .with_kv_budget_bytes(24 << 30);
    let model = builder.with_attention(attention.clone()).build().await?;

    // The saved session's name: a hash (FNV-1a) of the model, the attention and the documents.
    let key = format!("{}{attention:?}{SYSTEM}{text}", model.fingerprint());
    let hash =
        key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let file = assets_dir().join("sessions").join(format!("rag-{hash:016x}.hips"));
    let docs = match Session::load(&model, &file).await {
        Ok(session) => {
            eprintln!("loaded the saved session {} ({} tokens)", file.display(), session.usage().tokens);
            session
        }
        Err(e) if e.is_session_file() => {
            if file.exists() {
                eprintln!("ignoring the saved session: {e}");
            }
            prefill(&model, text, &file).await?
        }
        Err(e) => return Err(e.into()),
    };

    let interactive = questions.is_empty();
    if interactive {
        eprintln!("ask about the documents, one question a line (end the input to quit: Ctrl-D)");
    }
    let (mut lines, mut questions) = (BufReader::new(tokio::io::stdin()).lines(), questions.into_iter());
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(q) = (if interactive { lines.next_line().await? } else { questions.next() }) else { break };
        if q.trim().is_empty() {
            continue;
        } else if !interactive {
            writeln!(std::io::stdout(), "Q: {q}")?;
        }
        match answer(&docs, q.trim()).await {
            // In a conversation, a question that does not fit (say) is no reason to leave.
            Err(e) if interactive && e.downcast_ref().is_some_and(|e: &hip_sdk::Error| !e.is_engine()) => {
                eprintln!("{e}")
            }
            r => r?,
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    exit_code(run().await)
}
