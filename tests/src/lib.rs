//! End-to-end helpers shared by the `hip-eval` binary and the integration tests: asset paths,
//! tokenizing a text window, and perplexity with candle-transformers' models as the reference;
//! [`e2e`], the model folder and runner of `hip-bench e2e`; [`offload_sim`], the offload cache
//! hit ratios on recorded HiP decode masks (`hip-offload-sim`).

pub mod e2e;

pub mod eval;

pub mod offload_sim;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use hip_core::loader::tokenizer::Tokenizer;

/// The assets folder: `$HIP_ASSETS` or `~/.cache/hip`.
pub fn assets_dir() -> PathBuf {
    std::env::var_os("HIP_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/hip"))
}

/// The path of an asset, or an error telling to run the fetch script.
pub fn asset(name: &str) -> Result<PathBuf, String> {
    let p = assets_dir().join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!("{} is missing: run scripts/fetch-assets.sh", p.display()))
    }
}

/// The tokenizer stored in a GGUF file.
pub fn gguf_tokenizer(model: &Path) -> Result<Tokenizer, String> {
    let mut f = std::fs::File::open(model).map_err(|e| format!("{}: {e}", model.display()))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut f)
        .map_err(|e| format!("{}: {e}", model.display()))?;
    Tokenizer::from_gguf(&content).map_err(|e| e.to_string())
}

/// The first `n` tokens of a text file (an error if the text is shorter).
pub fn text_window(tok: &Tokenizer, text: &Path, n: usize) -> Result<Vec<u32>, String> {
    let s = std::fs::read_to_string(text).map_err(|e| format!("{}: {e}", text.display()))?;
    // Roughly 4 characters a token; take generously and cut.
    let end = s.char_indices().nth(n * 8).map(|(i, _)| i).unwrap_or(s.len());
    let mut ids = tok.encode(&s[..end], false).map_err(|e| e.to_string())?;
    if ids.len() < n {
        return Err(format!("{} has only {} tokens, {n} wanted", text.display(), ids.len()));
    }
    ids.truncate(n);
    Ok(ids)
}

/// Perplexity of `tokens` under candle-transformers' `quantized_llama` (llama GGUF) or
/// `quantized_qwen2` (qwen2 GGUF), fed one token at a time through its KV cache: the reference.
pub fn candle_perplexity(model: &Path, tokens: &[u32]) -> Result<f64, String> {
    let err = |e: candle_core::Error| e.to_string();
    let mut f = std::fs::File::open(model).map_err(|e| format!("{}: {e}", model.display()))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).map_err(err)?;
    let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned();
    let dev = Device::Cpu;
    enum M {
        Llama(candle_transformers::models::quantized_llama::ModelWeights),
        Qwen2(candle_transformers::models::quantized_qwen2::ModelWeights),
    }
    let mut m = match arch.as_deref() {
        Some("llama") => M::Llama(
            candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut f, &dev)
                .map_err(err)?,
        ),
        Some("qwen2") => M::Qwen2(
            candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(content, &mut f, &dev)
                .map_err(err)?,
        ),
        other => return Err(format!("no candle reference for architecture {other:?}")),
    };
    let mut nll = 0f64;
    for i in 0..tokens.len() - 1 {
        let x = Tensor::new(&[tokens[i]], &dev).map_err(err)?.unsqueeze(0).map_err(err)?;
        let logits = match &mut m {
            M::Llama(m) => m.forward(&x, i),
            M::Qwen2(m) => m.forward(&x, i),
        }
        .map_err(err)?;
        let row = logits.flatten_all().map_err(err)?.to_vec1::<f32>().map_err(err)?;
        nll += hip_core::eval::token_nll(&row, tokens[i + 1]);
    }
    Ok((nll / (tokens.len() - 1) as f64).exp())
}

/// Index of the largest logit (greedy decoding).
pub fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|x| x.0 as u32).unwrap_or(0)
}
