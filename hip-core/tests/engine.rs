//! The engine on the real SmolLM2 model: batched decode equals sequential runs, chunked prefill
//! progress, stop conditions, abort, fork, and typed errors that leave the engine usable.

mod common;

use candle_core::Device;
use common::smollm2;
use hip_core::attention::AttentionBackend;
use hip_core::engine::{Engine, EngineConfig, Event, FinishReason, GenerateParams};
use hip_core::loader::tokenizer::Tokenizer;
use hip_core::model::Model;
use hip_core::sampling::SamplingParams;
use hip_core::{Error, HipConfig};

fn engine(cfg: EngineConfig) -> Engine {
    let path = smollm2();
    let model = Model::from_gguf(&path, &Device::Cpu).unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let tok = Tokenizer::from_gguf(&content).unwrap();
    Engine::new(model, tok, cfg).unwrap()
}

fn encode(e: &Engine, text: &str) -> Vec<u32> {
    e.tokenizer().encode(text, false).unwrap()
}

#[test]
fn batched_generation_equals_sequential_and_stop_conditions_hold() {
    let mut e = engine(EngineConfig::default().with_prefill_chunk(64));
    let prompts = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"];
    // Alone.
    let mut alone = Vec::new();
    for p in prompts {
        let s = e.create_sequence();
        e.append(s, &encode(&e, p)).unwrap();
        let r = e.generate(s, GenerateParams::greedy(12).with_ignore_eos(true)).unwrap();
        let (tokens, text, reason) = e.run_to_completion(r).unwrap();
        assert_eq!(reason, FinishReason::MaxTokens);
        assert_eq!(tokens.len(), 12);
        assert_eq!(text, e.tokenizer().decode(&tokens, true).unwrap());
        // The generated tokens stay in the context.
        assert_eq!(&e.tokens(s).unwrap()[e.tokens(s).unwrap().len() - 12..], &tokens[..]);
        alone.push(tokens);
    }
    // Together: all three decode in the same steps.
    let seqs: Vec<_> = prompts.iter().map(|_| e.create_sequence()).collect();
    let mut reqs = Vec::new();
    for (s, p) in seqs.iter().zip(prompts) {
        e.append(*s, &encode(&e, p)).unwrap();
        reqs.push(e.generate(*s, GenerateParams::greedy(12).with_ignore_eos(true)).unwrap());
    }
    let mut got = vec![Vec::new(); 3];
    let mut done = 0;
    while done < 3 {
        for ev in e.step().unwrap() {
            match ev {
                Event::Token { request, token, .. } => {
                    got[reqs.iter().position(|&r| r == request).unwrap()].push(token)
                }
                Event::Finished { .. } => done += 1,
                Event::Failed { error, .. } => panic!("{error}"),
                _ => {}
            }
        }
    }
    assert_eq!(got, alone);

    // A stop string ends generation and is not returned.
    let s = e.create_sequence();
    e.append(s, &encode(&e, prompts[0])).unwrap();
    let first_word = e.tokenizer().decode(&alone[0][..3], true).unwrap();
    let stop = first_word.split_whitespace().last().unwrap().to_string();
    let r = e.generate(s, GenerateParams::greedy(12).with_stop_strings([stop.clone()])).unwrap();
    let (_, text, reason) = e.run_to_completion(r).unwrap();
    assert_eq!(reason, FinishReason::StopString, "stop {stop:?} text {text:?}");
    assert!(!text.contains(&stop), "{text:?} contains the stop string {stop:?}");
}

#[test]
fn prefill_progress_abort_fork_and_errors() {
    let mut e = engine(EngineConfig::default().with_prefill_chunk(64).with_max_context(400));
    let text = std::fs::read_to_string(smollm2().with_file_name("moby-dick.txt")).unwrap();
    let ids = encode(&e, &text[..3000]);
    let ids = &ids[..300];
    let s = e.create_sequence();
    e.append(s, ids).unwrap();
    let mut progress = Vec::new();
    while e.has_work() {
        for ev in e.step().unwrap() {
            if let Event::Prefill { done, total, .. } = ev {
                progress.push((done, total));
            }
        }
    }
    assert_eq!(progress, vec![(64, 300), (128, 300), (192, 300), (256, 300), (300, 300)]);
    assert_eq!(e.cached_len(s).unwrap(), 300);

    // Context overflow: nothing is queued, the sequence stays usable.
    let err = e.append(s, &ids[..101]).unwrap_err();
    assert!(matches!(err, Error::ContextOverflow { tokens: 401, limit: 400 }), "{err}");
    assert_eq!(e.tokens(s).unwrap().len(), 300);

    // Invalid sampling is rejected before anything starts.
    let bad = GenerateParams::default().with_sampling(SamplingParams::default().with_temperature(-1.0));
    assert!(matches!(e.generate(s, bad), Err(Error::InvalidSampling { field: "temperature", .. })));

    // Fork, then generate on the child: equals generating on a fresh copy of the context.
    let child = e.fork(s).unwrap();
    let r = e.generate(child, GenerateParams::greedy(8).with_ignore_eos(true)).unwrap();
    let (from_fork, _, _) = e.run_to_completion(r).unwrap();
    let fresh = e.create_sequence();
    e.append(fresh, ids).unwrap();
    let r = e.generate(fresh, GenerateParams::greedy(8).with_ignore_eos(true)).unwrap();
    let (from_fresh, _, _) = e.run_to_completion(r).unwrap();
    assert_eq!(from_fork, from_fresh);
    assert_eq!(e.tokens(s).unwrap(), ids, "the parent is untouched by the child's generation");

    // A busy sequence refuses a second request; abort frees it and keeps generated tokens.
    let r = e.generate(s, GenerateParams::greedy(50).with_ignore_eos(true)).unwrap();
    assert!(e.generate(s, GenerateParams::greedy(5)).is_err());
    for _ in 0..3 {
        e.step().unwrap();
    }
    e.abort(r).unwrap();
    assert!(e.tokens(s).unwrap().len() > 300);
    assert!(matches!(e.abort(r), Err(Error::UnknownRequest(_))));
    let r2 = e.generate(s, GenerateParams::greedy(2)).unwrap();
    e.run_to_completion(r2).unwrap();

    // Out-of-vocabulary tokens and unknown sequences are errors.
    assert!(matches!(e.append(s, &[1_000_000]), Err(Error::InvalidArgument { .. })));
    e.remove_sequence(fresh).unwrap();
    assert!(matches!(e.append(fresh, &[1]), Err(Error::UnknownSequence(_))));
}

#[test]
fn a_full_kv_cache_fails_the_request_and_the_engine_goes_on() {
    // Room for 4 blocks of 16 tokens only.
    let block_bytes = 2 * 30 * 16 * 3 * 64 * 4;
    let mut e = engine(EngineConfig::default().with_kv_budget_bytes(4 * block_bytes));
    let s = e.create_sequence();
    e.append(s, &[1; 100]).unwrap();
    let r = e.generate(s, GenerateParams::greedy(4)).unwrap();
    let evs = e.step().unwrap();
    assert!(evs.iter().any(|ev| matches!(ev, Event::Failed { request: Some(x), .. } if *x == r)), "{evs:?}");
    assert_eq!(e.cached_len(s).unwrap(), 0);
    // Smaller work still fits.
    let t = e.create_sequence();
    e.append(t, &encode(&e, "Hello")).unwrap();
    let r = e.generate(t, GenerateParams::greedy(3)).unwrap();
    e.run_to_completion(r).unwrap();
}

#[test]
fn hip_backend_generates_like_dense_when_k_covers_the_context() {
    let hip = HipConfig::paper().with_k(512).with_query_block(32, 2).with_dense_layers(vec![0, 1]);
    let mut a = engine(EngineConfig::default());
    let mut b = engine(EngineConfig::default().with_attention(AttentionBackend::Hip(hip)));
    let mut outs = Vec::new();
    for e in [&mut a, &mut b] {
        let s = e.create_sequence();
        let ids = encode(e, "The quick brown fox jumps over the lazy dog. The dog");
        e.append(s, &ids).unwrap();
        let r = e.generate(s, GenerateParams::greedy(16).with_ignore_eos(true)).unwrap();
        outs.push(e.run_to_completion(r).unwrap().0);
    }
    assert_eq!(outs[0], outs[1]);
}

/// A CPU engine whose KV cache lives in a memory-mapped temporary file generates what the
/// in-memory engine generates; the folder holds no visible file, and a GPU-only or missing
/// folder is refused when the engine is built.
#[test]
fn file_backed_kv_cache_generates_like_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for cfg in [EngineConfig::default(), EngineConfig::default().with_kv_dir(dir.path())] {
        let mut e = engine(cfg.with_kv_budget_bytes(64 << 20));
        let s = e.create_sequence();
        let ids = encode(&e, "The quick brown fox jumps over the lazy dog. The dog");
        e.append(s, &ids).unwrap();
        let r = e.generate(s, GenerateParams::greedy(12).with_ignore_eos(true)).unwrap();
        outs.push(e.run_to_completion(r).unwrap().0);
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let path = smollm2();
    let model = Model::from_gguf(&path, &Device::Cpu).unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let tok =
        Tokenizer::from_gguf(&candle_core::quantized::gguf_file::Content::read(&mut f).unwrap()).unwrap();
    let missing = EngineConfig::default().with_kv_dir(dir.path().join("missing"));
    assert!(matches!(Engine::new(model, tok, missing), Err(Error::InvalidArgument { .. })));
}
