//! SmolLM2-135M-Instruct completes a factual sentence through the whole stack (GGUF tokenizer,
//! FastCpu weights, engine). (Through its chat template this small quantized model answers
//! "What is the capital of France?" with "L'Étoile, la Marseillaise…", and so does
//! candle-transformers' `quantized_llama` on the same prompt: a property of the model.)

use candle_core::Device;
use hip_core::engine::{Engine, EngineConfig, GenerateParams};
use hip_core::model::Model;

#[test]
fn smollm2_knows_the_capital_of_france() {
    let path = hip_e2e::asset("smollm2-135m-instruct-q4_1.gguf").unwrap();
    let tok = hip_e2e::gguf_tokenizer(&path).unwrap();
    let ids = tok.encode("The capital of France is", false).unwrap();
    let model = Model::from_gguf(&path, &Device::Cpu).unwrap();
    let mut e = Engine::new(model, tok, EngineConfig::default()).unwrap();
    let s = e.create_sequence();
    e.append(s, &ids).unwrap();
    let r = e.generate(s, GenerateParams::greedy(8)).unwrap();
    let (_, text, _) = e.run_to_completion(r).unwrap();
    assert!(text.trim_start().starts_with("Paris"), "{text:?}");
}
