//! On keys with attention locality, HiP's tree search finds the attention mass: it recalls at
//! least twice as much of the exact top-k attention mass as random blocks with the same budget,
//! and its output is closer to dense attention than sink + window with the same token budget.

mod common;

use candle_core::{Device, Tensor};
use common::{normal, rel_l2};
use hip_kernels::{block_sparse_attn, dense_attn, hip_mask, HipConfig};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};

const T: usize = 16 * 1024;
const D: usize = 64;

/// Keys follow an AR(1) random walk in key space (nearby tokens have similar keys); each query
/// block looks for a random earlier region of the context.
fn local_qkv(seed: u64) -> (Tensor, Tensor, Tensor, Vec<f32>, Vec<f32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let rho = 0.98f32;
    let mut w = normal(&mut rng, D);
    let mut keys = Vec::with_capacity(T * D);
    for _ in 0..T {
        let e = normal(&mut rng, D);
        for (x, n) in w.iter_mut().zip(e) {
            *x = rho * *x + (1.0 - rho * rho).sqrt() * n;
        }
        keys.extend_from_slice(&w);
    }
    let cfg = HipConfig::paper();
    let beta = 24.0 / D as f32;
    let mut queries = Vec::with_capacity(T * D);
    for m in 0..T / cfg.block_size_q {
        let p_last = (m + 1) * cfg.block_size_q - 1;
        let hi = (p_last + 1).saturating_sub(cfg.window_tokens);
        let target = if hi > cfg.sink_tokens + 64 { rng.random_range(cfg.sink_tokens..hi - 32) } else { 0 };
        for _ in 0..cfg.block_size_q {
            let t = (target + rng.random_range(0..32)).min(T - 1);
            let noise = normal(&mut rng, D);
            for c in 0..D {
                queries.push(beta * keys[t * D + c] + 0.05 * noise[c]);
            }
        }
    }
    let values = normal(&mut rng, T * D);
    let dev = Device::Cpu;
    let q = Tensor::from_vec(queries.clone(), (1, T, 1, D), &dev).unwrap();
    let k = Tensor::from_vec(keys.clone(), (1, T, 1, D), &dev).unwrap();
    let v = Tensor::from_vec(values, (1, T, 1, D), &dev).unwrap();
    (q, k, v, queries, keys)
}

#[test]
fn tree_search_finds_attention_mass_at_16k() {
    let cfg = HipConfig::paper();
    let (q, k, v, qd, kd) = local_qkv(42);
    let mask = hip_mask(&q, &k, &cfg, 1.0).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let (mut hip_recall, mut rand_recall) = (0.0f64, 0.0f64);
    let top_k = cfg.k;
    // Sample query blocks from the second half of the context.
    for m in (T / 128..T / 64).step_by(8) {
        let p_first = m * cfg.block_size_q;
        let p_last = p_first + cfg.block_size_q - 1;
        let search_end = p_last + 1 - cfg.window_tokens;
        let n_cand = (search_end - cfg.sink_tokens).div_ceil(cfg.block_size_k);
        let hip_tokens: Vec<bool> = {
            let mut sel = vec![false; T];
            for &s in mask.blocks(0, 0, m) {
                for j in s as usize..(s as usize + cfg.block_size_k).min(search_end) {
                    sel[j] = true;
                }
            }
            sel
        };
        let rand_tokens: Vec<bool> = {
            let mut sel = vec![false; T];
            for c in sample(&mut rng, n_cand, cfg.selected_blocks()) {
                let s = cfg.sink_tokens + c * cfg.block_size_k;
                for j in s..(s + cfg.block_size_k).min(search_end) {
                    sel[j] = true;
                }
            }
            sel
        };
        for i in p_first..=p_last {
            // Exact attention probabilities of query i over its causal keys.
            let qi = &qd[i * D..(i + 1) * D];
            let logits: Vec<f64> = (0..=i)
                .map(|j| qi.iter().zip(&kd[j * D..(j + 1) * D]).map(|(a, b)| (a * b) as f64).sum())
                .collect();
            let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - mx).exp()).sum();
            // The exact top-k candidate tokens (outside sink and window) by probability.
            let mut cand: Vec<(f64, usize)> =
                (cfg.sink_tokens..search_end).map(|j| ((logits[j] - mx).exp() / z, j)).collect();
            cand.sort_by(|a, b| b.0.total_cmp(&a.0));
            cand.truncate(top_k);
            let total: f64 = cand.iter().map(|c| c.0).sum();
            hip_recall += cand.iter().filter(|c| hip_tokens[c.1]).map(|c| c.0).sum::<f64>() / total;
            rand_recall += cand.iter().filter(|c| rand_tokens[c.1]).map(|c| c.0).sum::<f64>() / total;
        }
    }
    assert!(
        hip_recall >= 2.0 * rand_recall && hip_recall > 0.0,
        "top-k mass recall: HiP {hip_recall:.2} vs random blocks {rand_recall:.2} (summed over queries)"
    );

    // Output error against dense: HiP vs sink + window with the same token budget.
    let dense = dense_attn(&q, &k, &v, 1.0).unwrap();
    let hip = block_sparse_attn(&q, &k, &v, &mask, 1.0, 0).unwrap();
    let mut no_blocks = mask.clone();
    no_blocks.counts.iter_mut().for_each(|c| *c = 0);
    let sink_window = block_sparse_attn(&q, &k, &v, &no_blocks, 1.0, cfg.k).unwrap();
    let (e_hip, e_sw) = (rel_l2(&hip, &dense), rel_l2(&sink_window, &dense));
    assert!(e_hip < e_sw, "relative L2 error: HiP {e_hip:.4} vs sink+window {e_sw:.4}");
    eprintln!(
        "recall HiP {:.3} random {:.3}; rel L2 HiP {e_hip:.4} sink+window {e_sw:.4}",
        hip_recall, rand_recall
    );
}
