//! Perplexity of SmolLM2 over the first 2,048 tokens of Moby-Dick: our chunked dense prefill
//! matches candle-transformers' `quantized_llama` run token by token within 0.5%.

use candle_core::Device;
use hip_core::attention::AttentionBackend;
use hip_core::model::{Model, WeightPolicy};

#[test]
fn smollm2_moby_dick_2048_matches_candle_token_by_token() {
    let model = hip_e2e::asset("smollm2-135m-instruct-q4_1.gguf").unwrap();
    let text = hip_e2e::asset("moby-dick.txt").unwrap();
    let tok = hip_e2e::gguf_tokenizer(&model).unwrap();
    let tokens = hip_e2e::text_window(&tok, &text, 2048).unwrap();
    // The weights exactly as stored, like candle-transformers runs them.
    let m = Model::from_gguf_with(&model, &Device::Cpu, WeightPolicy::AsStored).unwrap();
    let (ours, scored) = hip_core::eval::perplexity(&m, AttentionBackend::Dense, &tokens, 512).unwrap();
    assert_eq!(scored, 2047);
    let reference = hip_e2e::candle_perplexity(&model, &tokens).unwrap();
    let rel = (ours - reference).abs() / reference;
    eprintln!("ppl ours {ours:.4} candle {reference:.4} relative difference {:.4}%", rel * 100.0);
    assert!(ours.is_finite() && ours > 1.0 && ours < 1000.0, "implausible perplexity {ours}");
    assert!(rel < 0.005, "ours {ours} vs candle {reference}: {:.3}%", rel * 100.0);
}
