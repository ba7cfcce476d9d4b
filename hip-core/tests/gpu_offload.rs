//! KV-cache offloading in the engine on the GPU (feature `cuda`; needs a GPU and the SmolLM2 GGUF):
//! an engine whose HiP layers keep their K/V in pinned host memory, read through small GPU caches,
//! generates the same greedy tokens as the engine with the whole cache on the GPU, with logits
//! equal to bf16 precision (the offloaded kernels read the same bits); the caches were used
//! (hits, misses, evictions reported) and the GPU held a fraction of the offloaded K/V.
#![cfg(feature = "cuda")]

mod common;

use candle_core::Device;
use common::{argmax, smollm2, sparse_hip};
use hip_core::attention::{AttentionBackend, AttentionState};
use hip_core::engine::{Engine, EngineConfig, GenerateParams};
use hip_core::kv::{KvCacheConfig, PagedKvCache};
use hip_core::loader::tokenizer::Tokenizer;
use hip_core::model::{LogitsWanted, Model, SeqChunk};
use hip_core::Error;
use hip_core::Offload;

const TEXT: &str = "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting \
the one hundred and twelve steps under his breath. At the top he trimmed the wick, polished the great \
lens until it shone, and wrote the weather in a leather book: wind from the west, a heavy swell, three \
fishing boats returning late. His daughter, who was learning to read, liked to copy the entries into \
her own notebook, adding drawings of gulls and of the supply ship that came on the first Monday of \
each month. One winter the ship did not come. The keeper rationed the oil, burned the lamp only in the \
darkest hours, and taught his daughter to signal with a mirror to the village across the bay.";

fn small_caches() -> Offload {
    // Smaller than a step's reads, so that misses and evictions happen at this short length.
    Offload::default().with_gpu_cache_tokens(96).with_mask_cache_tokens(160)
}

fn tokenizer() -> Tokenizer {
    let mut f = std::fs::File::open(smollm2()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    Tokenizer::from_gguf(&content).unwrap()
}

/// Logits of the last prompt token (prefill in two chunks) and of 12 greedy decode steps.
fn run(dev: &Device, offload: Option<Offload>, prompt: &[u32]) -> (Vec<Vec<f32>>, Vec<u32>, Option<String>) {
    let model = Model::from_gguf(smollm2(), dev).unwrap();
    let c = model.config().clone();
    let cfg = KvCacheConfig::for_bytes(c.layers, c.kv_heads, c.head_dim, 16, 64 << 20).unwrap();
    let hip = sparse_hip();
    let mut attn = AttentionState::new(AttentionBackend::Hip(hip.clone())).unwrap();
    let mut kv = match &offload {
        Some(o) => {
            let flags = hip.hip_layers(c.layers);
            attn.set_offload(o.clone(), 4096).unwrap();
            PagedKvCache::new_on_device_offloaded(cfg, dev, candle_core::DType::BF16, &flags).unwrap()
        }
        None => PagedKvCache::new_on_device(cfg, dev, candle_core::DType::BF16).unwrap(),
    };
    let seq = kv.add_sequence();
    let mut step = |tokens: &[u32]| -> Vec<f32> {
        let chunk = SeqChunk { seq, tokens, logits: LogitsWanted::Last };
        let out = model.forward(&[chunk], &mut kv, &mut attn).unwrap();
        out[0].to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let half = prompt.len() / 2;
    step(&prompt[..half]);
    let mut logits = vec![step(&prompt[half..])];
    let mut fed = Vec::new();
    for _ in 0..12 {
        let t = argmax(logits.last().unwrap());
        fed.push(t);
        logits.push(step(&[t]));
    }
    let stats = attn.offload_stats().unwrap().map(|s| format!("{s:?}"));
    (logits, fed, stats)
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn offloaded_model_matches_the_resident_cache() {
    let dev = Device::new_cuda(0).expect("a CUDA device");
    let prompt = tokenizer().encode(TEXT, false).unwrap();
    let (want, want_tokens, none) = run(&dev, None, &prompt);
    assert!(none.is_none());
    // Prefill chunks staged on the GPU (the default) and read in place over the bus.
    for offload in [small_caches(), small_caches().with_prefill_stage_bytes(0)] {
        let stage = offload.prefill_stage_bytes;
        let (got, got_tokens, stats) = run(&dev, Some(offload), &prompt);
        eprintln!(
            "{} prompt tokens, stage {stage}; greedy {got_tokens:?}; offload {}",
            prompt.len(),
            stats.as_deref().unwrap_or("-")
        );
        assert_eq!(got_tokens, want_tokens, "greedy tokens, stage {stage}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = rel(g, w);
            assert!(e <= 1e-3, "stage {stage}, step {i}: logits rel err {e}");
        }
    }
}

#[test]
fn offloading_engine_generates_like_the_resident_one_and_reports() {
    let dev = Device::new_cuda(0).expect("a CUDA device");
    let make = |offload: Option<Offload>| {
        let model = Model::from_gguf(smollm2(), &dev).unwrap();
        let mut cfg = EngineConfig::default()
            .with_attention(AttentionBackend::Hip(sparse_hip()))
            .with_prefill_chunk(96)
            .with_max_context(2048);
        if let Some(o) = offload {
            cfg = cfg.with_offload(o);
        }
        Engine::new(model, tokenizer(), cfg)
    };
    let generate = |e: &mut Engine| {
        let s = e.create_sequence();
        let p = e.tokenizer().encode(TEXT, false).unwrap();
        e.append(s, &p).unwrap();
        let r = e.generate(s, GenerateParams::greedy(16).with_ignore_eos(true)).unwrap();
        e.run_to_completion(r).unwrap().0
    };
    let mut resident = make(None).unwrap();
    let mut offloaded = make(Some(small_caches())).unwrap();
    assert!(resident.offload_report().unwrap().is_none());
    let want = generate(&mut resident);
    let got = generate(&mut offloaded);
    assert_eq!(got, want, "greedy tokens");
    let r = offloaded.offload_report().unwrap().expect("an offloading engine reports");
    eprintln!("{r:?}");
    assert!(r.sparse.hits > 0 && r.sparse.misses > 0 && r.sparse.evictions > 0, "{r:?}");
    assert!(r.mask.hits > 0 && r.mask.inserts > 0, "{r:?}");
    assert!(r.host_bytes > 0 && r.gpu_cache_bytes > 0);
    assert!(r.prefill_staged_bytes > 0, "prefill chunks were staged: {r:?}");

    // Ten HiP layers kept on the GPU: the same tokens, a smaller host store.
    let mut partly = make(Some(small_caches().with_resident_layers(10))).unwrap();
    assert_eq!(generate(&mut partly), want, "greedy tokens, 10 HiP layers resident");
    let p = partly.offload_report().unwrap().expect("still offloading");
    assert!(p.host_bytes > 0 && p.host_bytes < r.host_bytes, "{p:?} vs {r:?}");
    // Every HiP layer resident leaves nothing to offload: refused.
    assert!(matches!(
        make(Some(small_caches().with_resident_layers(1000))),
        Err(Error::InvalidArgument { name: "offload.resident_layers", .. })
    ));

    // Offloading needs HiP (dense has nothing sparse to cache).
    let model = Model::from_gguf(smollm2(), &dev).unwrap();
    let cfg = EngineConfig::default().with_offload(small_caches());
    assert!(matches!(
        Engine::new(model, tokenizer(), cfg),
        Err(Error::InvalidArgument { name: "offload", .. })
    ));
    // A host budget below the store is refused before anything is pinned.
    let model = Model::from_gguf(smollm2(), &dev).unwrap();
    let cfg = EngineConfig::default()
        .with_attention(AttentionBackend::Hip(sparse_hip()))
        .with_offload(small_caches().with_host_budget_bytes(1 << 20));
    let Err(err) = Engine::new(model, tokenizer(), cfg) else {
        panic!("a store over the host budget was accepted")
    };
    assert!(format!("{err}").contains("host budget"), "{err}");
}
