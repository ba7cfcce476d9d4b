//! Opt-in (the 0.5B GGUF is 491 MB: `scripts/fetch-assets.sh qwen05`): our Qwen2 model against
//! candle-transformers' `quantized_qwen2` on Qwen2.5-Coder-0.5B-Instruct. Skipped with a note when
//! the file is absent. Like the SmolLM2 test, the tight comparison uses f32 weights
//! (`CANDLE_DEQUANTIZE_ALL=1`) so 8-bit activation rounding cannot amplify last-bit differences.

mod common;

use candle_core::{Device, Tensor};
use common::argmax;
use hip_core::attention::{AttentionBackend, AttentionState};
use hip_core::kv::{KvCacheConfig, PagedKvCache};
use hip_core::loader::tokenizer::Tokenizer;
use hip_core::model::{LogitsWanted, Model, SeqChunk, WeightPolicy};

#[test]
fn qwen2_matches_candle_quantized_qwen2() {
    let Some(path) = common::optional_asset("qwen2.5-coder-0.5b-instruct.gguf") else {
        eprintln!("skipped: qwen2.5-coder-0.5b-instruct.gguf absent (scripts/fetch-assets.sh qwen05)");
        return;
    };
    // SAFETY (edition 2021 `set_var`): no other test in this binary reads this variable.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    std::thread::spawn(move || {
        let mut f = std::fs::File::open(&path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        let tok = Tokenizer::from_gguf(&content).unwrap();
        let prompt = tok.encode("def quicksort(items):\n    \"\"\"Sort a list.\"\"\"\n", false).unwrap();
        let mut theirs = candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(
            content,
            &mut f,
            &Device::Cpu,
        )
        .unwrap();
        let x = Tensor::new(prompt.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let their = theirs.forward(&x, 0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();

        let model = Model::from_gguf_with(&path, &Device::Cpu, WeightPolicy::AsStored).unwrap();
        let c = model.config();
        let mut kv = PagedKvCache::new(
            KvCacheConfig::for_bytes(c.layers, c.kv_heads, c.head_dim, 16, 64 << 20).unwrap(),
        )
        .unwrap();
        let mut attn = AttentionState::new(AttentionBackend::Dense).unwrap();
        let seq = kv.add_sequence();
        let ours = model
            .forward(&[SeqChunk { seq, tokens: &prompt, logits: LogitsWanted::Last }], &mut kv, &mut attn)
            .unwrap()[0]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let range = their.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
            - their.iter().cloned().fold(f32::INFINITY, f32::min);
        let diff = ours.iter().zip(&their).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("qwen2 0.5B: max abs logit difference {diff} (range {range})");
        assert!(diff <= 1e-3 * range, "max abs logit difference {diff} vs range {range}");
        assert_eq!(argmax(&ours), argmax(&their));
    })
    .join()
    .unwrap();
}
