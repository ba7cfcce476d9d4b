//! Offload cache hit ratios on real HiP decode masks (issue 6), small enough for `make test`:
//! SmolLM2-135M prefills 1,024 tokens of Moby-Dick with `HipConfig::default().with_k(128)` (the
//! tree search prunes: 64 of ~500 candidate blocks per query head), decodes 8 tokens, and the
//! recorded sparse-attention reads run through the LRU policy. The full runs (8k context) are
//! `hip-offload-sim`, docs/offload.md.

use candle_core::Device;
use hip_core::model::Model;
use hip_core::HipConfig;
use hip_e2e::offload_sim::{record, simulate_sizes};

#[test]
fn hit_ratios_on_recorded_decode_masks() {
    let path = hip_e2e::asset("smollm2-135m-instruct-q4_1.gguf").unwrap();
    let tok = hip_e2e::gguf_tokenizer(&path).unwrap();
    let prompt = hip_e2e::text_window(&tok, &hip_e2e::asset("moby-dick.txt").unwrap(), 1024).unwrap();
    let model = Model::from_gguf(&path, &Device::Cpu).unwrap();
    let cfg = HipConfig::default().with_k(128);
    let steps = 8;
    assert!(steps <= cfg.refresh_interval, "one mask estimate, reused by every later step");
    let rec = record(&model, &prompt, steps, &cfg, 512).unwrap();
    assert_eq!(rec.steps.len(), steps);
    assert_eq!(rec.hip_layers, (3..rec.num_layers).collect::<Vec<_>>());
    let window = cfg.sink_tokens + cfg.window_tokens;

    for (s, layers) in rec.steps.iter().enumerate() {
        let len = rec.context + s + 1;
        for (i, ls) in layers.iter().enumerate() {
            let a = &ls.accessed;
            assert!(a.windows(2).all(|w| w[0] < w[1]), "step {s} layer {i}: sorted, distinct");
            assert!(a.iter().all(|&(h, t)| (h as usize) < rec.kv_heads && (t as usize) < len));
            assert_eq!(ls.refreshed, s == 0, "step {s} layer {i}");
            for h in 0..rec.kv_heads as u32 {
                let n = a.iter().filter(|p| p.0 == h).count();
                // Sink + window (widened by s), plus at most k block tokens per query head.
                let group = rec.heads_q / rec.kv_heads;
                assert!(
                    n > window + s && n <= window + s + group * cfg.k,
                    "step {s} layer {i} head {h}: {n}"
                );
                assert!(a.contains(&(h, len as u32 - 1)), "the newest token is read");
            }
            // The tree search selected blocks outside sink and window in every KV head.
            assert!(ls.block_only >= rec.kv_heads * cfg.k / 2, "step {s} layer {i}: {}", ls.block_only);
        }
    }

    let full = rec.max_tokens();
    let r = simulate_sizes(&rec, &[64, 256, full]).unwrap();
    assert_eq!(r.iter().map(|z| z.slots_per_head).collect::<Vec<_>>(), vec![64, 256, full]);
    let big = &r[2];
    // A cache that holds every token misses only first reads: after the cold step, with the mask
    // reused, that is exactly the newest token of each step, once per HiP layer and KV head.
    assert_eq!(big.steady.misses, big.steady.first_touch);
    assert_eq!(big.steady.misses, ((steps - 1) * rec.hip_layers.len() * rec.kv_heads) as u64);
    assert_eq!(big.all.misses, big.all.first_touch);
    assert!(big.steady.hit_ratio() > 0.99, "{}", big.steady.hit_ratio());
    assert_eq!(big.per_step[0], 0.0, "the first step is cold");
    // Caches smaller than a step's reads (~500 entries per KV head) miss every step: the LRU never
    // evicts what the current step read, so the bank keeps the same entries and the rest of the
    // step's reads go to the host each time.
    let (tiny, mid) = (&r[0], &r[1]);
    assert!(tiny.steady.hit_ratio() < 0.25, "{}", tiny.steady.hit_ratio());
    assert!(tiny.steady.hit_ratio() < mid.steady.hit_ratio());
    assert!(mid.steady.hit_ratio() < big.steady.hit_ratio());
    assert!(tiny.steady_moved_per_layer_head > big.steady_moved_per_layer_head);
    assert!(tiny.steady_bytes_per_step_llama8b > tiny.steady_bytes_per_step_model);
}
