//! `hip-passkey-split`: where HiP loses a passkey that dense attention finds (diagnostic, CPU).
//!
//! ```text
//! cargo run --release -p hip-e2e --bin hip-passkey-split
//! ```
//! SmolLM2-135M-Instruct, `HipConfig::paper()`, the `hip-eval passkey` prompts at 2k and 4k tokens,
//! depths 0.1 and 0.5. Each prompt runs five ways, greedy, 8 answer tokens: dense; HiP; HiP only
//! while prefilling the prompt (dense for its last token and the answer); HiP only for the last
//! prompt token and the answer (dense prefill); and HiP prefill of the document with the last 64
//! prompt tokens (the question) fed one at a time, each with its own decode-path mask; then HiP
//! with a prefill tail (`HipConfig::default()`: the last 64 queries of each chunk searched one by
//! one). `HIP_SPLIT_PLANS=hip,"hip, prefill tail"` runs only the named plans. Results:
//! docs/quality.md.

use candle_core::Device;
use hip_core::attention::{AttentionBackend, AttentionState};
use hip_core::kv::{KvCacheConfig, PagedKvCache, SeqId};
use hip_core::model::{LogitsWanted, Model, SeqChunk};
use hip_core::HipConfig;
use hip_e2e::eval::prompt::{cell_seed, PasskeyBuilder};

/// How the prompt and the answer are attended.
struct Plan {
    name: &'static str,
    prefill: AttentionBackend,
    /// Prompt tokens at the end fed one at a time (with `answer`'s backend).
    by_token: usize,
    answer: AttentionBackend,
}

fn forward(
    model: &Model,
    kv: &mut PagedKvCache,
    attn: &mut AttentionState,
    seq: SeqId,
    t: &[u32],
    l: LogitsWanted,
) -> Vec<f32> {
    let out = model.forward(&[SeqChunk { seq, tokens: t, logits: l }], kv, attn).expect("forward");
    match l {
        LogitsWanted::None => Vec::new(),
        _ => out[0].flatten_all().and_then(|x| x.to_vec1::<f32>()).expect("logits"),
    }
}

fn main() -> Result<(), String> {
    let path = hip_e2e::asset("smollm2-135m-instruct-q4_1.gguf")?;
    let tok = hip_e2e::gguf_tokenizer(&path)?;
    let model = Model::from_gguf(&path, &Device::Cpu).map_err(|e| e.to_string())?;
    let builder = PasskeyBuilder::new(&tok).map_err(|e| e.to_string())?;
    let hip = || AttentionBackend::Hip(HipConfig::paper());
    let tail = || AttentionBackend::Hip(HipConfig::default());
    for (len, depth) in [(2048usize, 0.1f64), (2048, 0.5), (4096, 0.1), (4096, 0.5)] {
        let p = builder.build(&tok, len, depth, cell_seed(0, len, depth, 0)).map_err(|e| e.to_string())?;
        let plans = [
            Plan {
                name: "dense",
                prefill: AttentionBackend::Dense,
                by_token: 1,
                answer: AttentionBackend::Dense,
            },
            Plan { name: "hip", prefill: hip(), by_token: 1, answer: hip() },
            Plan { name: "hip prefill only", prefill: hip(), by_token: 1, answer: AttentionBackend::Dense },
            Plan { name: "hip answer only", prefill: AttentionBackend::Dense, by_token: 1, answer: hip() },
            Plan { name: "hip, question by token", prefill: hip(), by_token: 64, answer: hip() },
            Plan { name: "hip, prefill tail", prefill: tail(), by_token: 1, answer: tail() },
        ];
        let only = std::env::var("HIP_SPLIT_PLANS").ok();
        for plan in plans {
            if only.as_deref().is_some_and(|o| !o.split(',').any(|n| n == plan.name)) {
                continue;
            }
            let c = model.config();
            let blocks = (len + 32).div_ceil(16) + 1;
            let cfg = KvCacheConfig {
                num_layers: c.layers,
                num_kv_heads: c.kv_heads,
                head_dim: c.head_dim,
                block_size: 16,
                num_blocks: blocks,
            };
            let mut kv = PagedKvCache::new(cfg).map_err(|e| e.to_string())?;
            let seq = kv.add_sequence();
            let (doc, tail) = p.tokens.split_at(p.tokens.len() - plan.by_token);
            let mut a = AttentionState::new(plan.prefill).map_err(|e| e.to_string())?;
            for part in doc.chunks(512) {
                forward(&model, &mut kv, &mut a, seq, part, LogitsWanted::None);
            }
            let mut b = AttentionState::new(plan.answer).map_err(|e| e.to_string())?;
            let (feed, last) = tail.split_at(tail.len() - 1);
            for t in feed {
                forward(&model, &mut kv, &mut b, seq, std::slice::from_ref(t), LogitsWanted::None);
            }
            let (mut next, mut out) = (last.to_vec(), Vec::new());
            for _ in 0..8 {
                let row = forward(&model, &mut kv, &mut b, seq, &next, LogitsWanted::Last);
                let t = row.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).map_or(0, |m| m.0 as u32);
                out.push(t);
                next = vec![t];
            }
            let answer = tok.decode(&out, true).map_err(|e| e.to_string())?;
            let ok = answer.trim_start().starts_with(&p.expected);
            println!("{len:5} {depth:.1} {:24} {} {answer:?}", plan.name, if ok { "ok  " } else { "MISS" });
        }
    }
    Ok(())
}
