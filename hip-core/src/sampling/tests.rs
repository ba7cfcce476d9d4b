//! Tests of the whole sampling pipeline through [`Sampler`].

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Sampler, SamplingParams};
use crate::Error;

fn sampler(params: SamplingParams) -> Sampler {
    Sampler::new(params).expect("valid params")
}

/// Counts of `n` draws over `logits.len()` tokens.
fn histogram(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
    let mut s = sampler(params);
    let mut counts = vec![0; logits.len()];
    for _ in 0..n {
        counts[s.sample(logits, &[]).unwrap() as usize] += 1;
    }
    counts
}

fn softmax(logits: &[f32], temperature: f64) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&l| ((l as f64 - max) / temperature).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|x| x / sum).collect()
}

/// Logits whose softmax at temperature 1 is exactly proportional to `probs`.
fn logits_of(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

fn random_logits(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-10.0f32..10.0)).collect()
}

fn assert_field(err: Error, expected: &str) {
    match err {
        Error::InvalidSampling { field, .. } => assert_eq!(field, expected, "wrong field"),
        other => panic!("expected InvalidSampling({expected}), got {other:?}"),
    }
}

#[test]
fn defaults_and_builders() {
    let d = SamplingParams::default();
    assert_eq!(
        (d.temperature, d.top_k, d.top_p, d.min_p, d.repetition_penalty, d.repetition_window, d.seed),
        (1.0, 0, 1.0, 0.0, 1.0, 64, 0)
    );
    d.validate().unwrap();
    let g = SamplingParams::greedy();
    assert!(g.is_greedy());
    assert_eq!(g.temperature, 0.0);
    let p = SamplingParams::default()
        .with_temperature(0.5)
        .with_top_k(40)
        .with_top_p(0.9)
        .with_min_p(0.05)
        .with_repetition_penalty(1.1)
        .with_repetition_window(16)
        .with_seed(9);
    assert_eq!(
        (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.repetition_window, p.seed),
        (0.5, 40, 0.9, 0.05, 1.1, 16, 9)
    );
    assert!(!p.is_greedy());
    let s = sampler(p.clone());
    assert_eq!(s.params(), &p);
}

#[test]
fn serde_round_trip_and_partial() {
    let p = SamplingParams::default().with_temperature(0.7).with_top_k(5).with_seed(3);
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(serde_json::from_str::<SamplingParams>(&json).unwrap(), p);
    let partial: SamplingParams = serde_json::from_str(r#"{"temperature": 0.25}"#).unwrap();
    assert_eq!(partial, SamplingParams::default().with_temperature(0.25));
}

#[test]
fn greedy_picks_argmax() {
    let mut s = sampler(SamplingParams::greedy());
    assert_eq!(s.sample(&[0.1, -3.0, 7.5, 2.0, 7.4], &[]).unwrap(), 2);
    assert_eq!(s.sample(&[-5.0, -4.0, -6.0], &[]).unwrap(), 1);
    assert_eq!(s.sample(&[1.0], &[]).unwrap(), 0);
}

#[test]
fn greedy_ties_pick_lowest_id() {
    let mut s = sampler(SamplingParams::greedy());
    assert_eq!(s.sample(&[1.0, 3.0, 0.0, 3.0, 3.0], &[]).unwrap(), 1);
    assert_eq!(s.sample(&[2.0, 2.0], &[]).unwrap(), 0);
}

#[test]
fn greedy_ignores_filters_and_seed() {
    let logits = random_logits(1000, 1);
    let want = sampler(SamplingParams::greedy()).sample(&logits, &[]).unwrap();
    let p = SamplingParams::greedy().with_top_k(3).with_top_p(0.1).with_min_p(0.5).with_seed(77);
    assert_eq!(sampler(p).sample(&logits, &[]).unwrap(), want);
}

#[test]
fn same_seed_is_deterministic_other_seed_diverges() {
    let logits = [0.0f32, 0.2, -0.1, 0.3, 0.1, -0.2, 0.05, 0.15];
    let run = |seed: u64| {
        let mut s = sampler(SamplingParams::default().with_seed(seed).with_repetition_penalty(1.2));
        let mut history = Vec::new();
        for _ in 0..200 {
            let t = s.sample(&logits, &history).unwrap();
            history.push(t);
        }
        history
    };
    let a = run(42);
    assert_eq!(a, run(42));
    assert_ne!(a, run(43));
    // Not degenerate: several tokens appear.
    let mut distinct = a.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() >= 4, "{distinct:?}");
}

#[test]
fn top_k_one_equals_greedy_at_any_temperature() {
    let logits = random_logits(5000, 2);
    let want = sampler(SamplingParams::greedy()).sample(&logits, &[]).unwrap();
    for t in [0.01f32, 0.5, 1.0, 2.0, 100.0] {
        let mut s = sampler(SamplingParams::default().with_temperature(t).with_top_k(1).with_seed(t as u64));
        for _ in 0..20 {
            assert_eq!(s.sample(&logits, &[]).unwrap(), want, "temperature {t}");
        }
    }
    // Ties: top_k = 1 keeps the lowest id, like greedy.
    let mut s = sampler(SamplingParams::default().with_top_k(1));
    for _ in 0..20 {
        assert_eq!(s.sample(&[0.0, 5.0, 5.0, 5.0], &[]).unwrap(), 1);
    }
}

#[test]
fn tiny_top_p_equals_greedy() {
    let logits = random_logits(5000, 3);
    let want = sampler(SamplingParams::greedy()).sample(&logits, &[]).unwrap();
    let mut s = sampler(SamplingParams::default().with_temperature(1.5).with_top_p(1e-6).with_seed(5));
    for _ in 0..50 {
        assert_eq!(s.sample(&logits, &[]).unwrap(), want);
    }
}

#[test]
fn empirical_distribution_matches_softmax() {
    let logits = [1.0f32, 2.0, 0.5, -1.0];
    let n = 20_000;
    let counts = histogram(SamplingParams::default().with_seed(1234), &logits, n);
    let want = softmax(&logits, 1.0);
    for (i, (&c, &p)) in counts.iter().zip(&want).enumerate() {
        let freq = c as f64 / n as f64;
        assert!((freq - p).abs() < 0.02, "token {i}: freq {freq:.4} vs softmax {p:.4}");
    }
}

#[test]
fn temperature_sharpens_and_flattens() {
    let logits = [1.0f32, 2.0, 0.5, -1.0];
    let n = 20_000;
    for t in [0.5f64, 2.0] {
        let counts = histogram(SamplingParams::default().with_temperature(t as f32).with_seed(8), &logits, n);
        let want = softmax(&logits, t);
        for (i, (&c, &p)) in counts.iter().zip(&want).enumerate() {
            let freq = c as f64 / n as f64;
            assert!((freq - p).abs() < 0.02, "t={t} token {i}: freq {freq:.4} vs {p:.4}");
        }
    }
}

#[test]
fn top_k_restricts_and_renormalises() {
    let logits = logits_of(&[0.1, 0.4, 0.2, 0.3]);
    let n = 20_000;
    let counts = histogram(SamplingParams::default().with_top_k(2).with_seed(11), &logits, n);
    assert_eq!(counts[0] + counts[2], 0, "{counts:?}");
    let f1 = counts[1] as f64 / n as f64;
    assert!((f1 - 4.0 / 7.0).abs() < 0.02, "{f1}");
}

#[test]
fn top_p_keeps_the_nucleus() {
    // Probabilities 0.5, 0.3, 0.15, 0.05: top_p = 0.75 keeps {0, 1} → 0.625 / 0.375.
    let logits = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    let n = 20_000;
    let counts = histogram(SamplingParams::default().with_top_p(0.75).with_seed(12), &logits, n);
    assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
    let f0 = counts[0] as f64 / n as f64;
    assert!((f0 - 0.625).abs() < 0.02, "{f0}");
    // top_p = 0.9 also needs token 2.
    let counts = histogram(SamplingParams::default().with_top_p(0.9).with_seed(12), &logits, n);
    assert_eq!(counts[3], 0, "{counts:?}");
    assert!(counts[2] > 0, "{counts:?}");
}

#[test]
fn top_p_is_relative_to_top_k() {
    // Probabilities 0.3, 0.2, 0.25, 0.25. top_k = 2 keeps {0, 2} → 0.545 / 0.455 after
    // renormalising, so top_p = 0.5 keeps only token 0 (against the full mass it would keep two).
    let logits = logits_of(&[0.3, 0.2, 0.25, 0.25]);
    let mut s = sampler(SamplingParams::default().with_top_k(2).with_top_p(0.5).with_seed(3));
    for _ in 0..200 {
        assert_eq!(s.sample(&logits, &[]).unwrap(), 0);
    }
    let counts = histogram(SamplingParams::default().with_top_p(0.5).with_seed(3), &logits, 2000);
    assert!(counts[0] > 0 && counts[2] + counts[3] > 0 && counts[1] == 0, "{counts:?}");
}

#[test]
fn min_p_filters() {
    // Probabilities 0.5, 0.3, 0.15, 0.05; min_p = 0.2 → threshold 0.1 drops only token 3.
    let logits = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    let n = 20_000;
    let counts = histogram(SamplingParams::default().with_min_p(0.2).with_seed(13), &logits, n);
    assert_eq!(counts[3], 0, "{counts:?}");
    let f2 = counts[2] as f64 / n as f64;
    assert!((f2 - 0.15 / 0.95).abs() < 0.02, "{f2}");
    // min_p = 0.7 → threshold 0.35 keeps only token 0.
    let counts = histogram(SamplingParams::default().with_min_p(0.7).with_seed(13), &logits, 1000);
    assert_eq!(counts[0], 1000, "{counts:?}");
}

#[test]
fn filters_combine() {
    // top_p = 0.9 keeps {0, 1, 2}; min_p = 0.4 (threshold 0.2) then drops 2.
    let logits = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    let counts = histogram(
        SamplingParams::default().with_top_k(3).with_top_p(0.9).with_min_p(0.4).with_seed(14),
        &logits,
        5000,
    );
    assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
    assert!(counts[0] > 0 && counts[1] > 0, "{counts:?}");
}

#[test]
fn repetition_penalty_changes_argmax() {
    let params = SamplingParams::greedy().with_repetition_penalty(1.5);
    // Positive logit: 2.0 / 1.5 = 1.33 < 1.9.
    let mut s = sampler(params.clone());
    assert_eq!(s.sample(&[2.0, 1.9, 0.0], &[]).unwrap(), 0);
    assert_eq!(s.sample(&[2.0, 1.9, 0.0], &[0]).unwrap(), 1);
    // Negative logit: -1.0 * 1.5 = -1.5 < -1.2.
    assert_eq!(s.sample(&[-1.0, -1.2], &[]).unwrap(), 0);
    assert_eq!(s.sample(&[-1.0, -1.2], &[0]).unwrap(), 1);
    // Penalty 1 (off) changes nothing.
    let mut off = sampler(SamplingParams::greedy());
    assert_eq!(off.sample(&[2.0, 1.9, 0.0], &[0, 0, 0]).unwrap(), 0);
}

#[test]
fn repetition_penalty_applies_once_per_distinct_token() {
    // 2.0 / 1.2 = 1.67 > 1.5, but 2.0 / 1.44 = 1.39 < 1.5 if it were applied twice.
    let mut s = sampler(SamplingParams::greedy().with_repetition_penalty(1.2));
    assert_eq!(s.sample(&[2.0, 1.5], &[0, 0, 0, 0]).unwrap(), 0);
}

#[test]
fn repetition_penalty_respects_the_window() {
    let logits = [2.0f32, 1.9, 0.0, 0.0, 0.0, 0.0];
    let history = [0u32, 2, 3, 4];
    let base = SamplingParams::greedy().with_repetition_penalty(1.5);
    // Window 3 sees [2, 3, 4]: token 0 is not penalised.
    assert_eq!(sampler(base.clone().with_repetition_window(3)).sample(&logits, &history).unwrap(), 0);
    // Window 4 reaches token 0.
    assert_eq!(sampler(base.clone().with_repetition_window(4)).sample(&logits, &history).unwrap(), 1);
    // Window 0 = the whole history.
    assert_eq!(sampler(base.clone().with_repetition_window(0)).sample(&logits, &history).unwrap(), 1);
    // The default window (64) covers this short history.
    assert_eq!(sampler(base).sample(&logits, &history).unwrap(), 1);
}

#[test]
fn repetition_penalty_ignores_out_of_range_ids() {
    let mut s = sampler(SamplingParams::default().with_repetition_penalty(1.3).with_top_k(1));
    assert_eq!(s.sample(&[0.0, 1.0], &[7, u32::MAX, 1_000_000]).unwrap(), 1);
}

#[test]
fn invalid_params_name_the_field() {
    let d = SamplingParams::default;
    let cases = [
        (d().with_temperature(f32::NAN), "temperature"),
        (d().with_temperature(f32::INFINITY), "temperature"),
        (d().with_temperature(-0.1), "temperature"),
        (d().with_top_p(0.0), "top_p"),
        (d().with_top_p(-0.5), "top_p"),
        (d().with_top_p(1.01), "top_p"),
        (d().with_top_p(f32::NAN), "top_p"),
        (d().with_min_p(1.0), "min_p"),
        (d().with_min_p(-0.01), "min_p"),
        (d().with_min_p(f32::NAN), "min_p"),
        (d().with_repetition_penalty(0.0), "repetition_penalty"),
        (d().with_repetition_penalty(-1.0), "repetition_penalty"),
        (d().with_repetition_penalty(f32::NAN), "repetition_penalty"),
        (d().with_repetition_penalty(f32::INFINITY), "repetition_penalty"),
    ];
    for (params, field) in cases {
        assert_field(params.validate().unwrap_err(), field);
        assert_field(Sampler::new(params).unwrap_err(), field);
    }
    // Edges that are valid.
    for p in [d().with_top_p(1.0), d().with_min_p(0.0), d().with_repetition_penalty(0.5), d().with_top_k(0)] {
        p.validate().unwrap();
    }
    let msg = d().with_top_p(2.0).validate().unwrap_err().to_string();
    assert!(msg.contains("top_p") && msg.contains('2'), "{msg}");
}

#[test]
fn nan_and_empty_logits_are_errors_not_panics() {
    for params in [SamplingParams::greedy(), SamplingParams::default().with_top_k(5).with_top_p(0.9)] {
        let mut s = sampler(params.clone());
        assert_field(s.sample(&[], &[]).unwrap_err(), "logits");
        assert_field(s.sample(&[f32::NAN; 4], &[]).unwrap_err(), "logits");
        assert_field(s.sample(&[f32::NEG_INFINITY; 4], &[]).unwrap_err(), "logits");
        assert_field(s.sample(&[f32::NAN, f32::NEG_INFINITY], &[0, 1]).unwrap_err(), "logits");
        // NaN is never chosen; the sampler keeps working after an error.
        for _ in 0..50 {
            assert_eq!(s.sample(&[f32::NAN, 1.0, f32::NAN, f32::NEG_INFINITY], &[]).unwrap(), 1);
        }
    }
}

#[test]
fn infinite_logits() {
    // +inf wins; two +inf share the mass.
    let mut g = sampler(SamplingParams::greedy());
    assert_eq!(g.sample(&[0.0, f32::INFINITY, 1e30], &[]).unwrap(), 1);
    let counts = histogram(SamplingParams::default(), &[f32::INFINITY, 0.0, f32::INFINITY, 3.0], 2000);
    assert_eq!(counts[1] + counts[3], 0, "{counts:?}");
    assert!(counts[0] > 800 && counts[2] > 800, "{counts:?}");
    // Extreme finite logits and temperatures stay finite.
    let mut s = sampler(SamplingParams::default().with_temperature(1e-30));
    assert_eq!(s.sample(&[f32::MAX, -f32::MAX, 0.0], &[]).unwrap(), 0);
    let mut s = sampler(SamplingParams::default().with_temperature(f32::MAX));
    assert!(s.sample(&[f32::MAX, -f32::MAX, 0.0], &[]).unwrap() < 3);
}

#[test]
fn large_vocabulary() {
    const VOCAB: usize = 151_936;
    let logits = random_logits(VOCAB, 4);
    let history: Vec<u32> = (0..500).map(|i| (i * 7919) % VOCAB as u32).collect();
    let greedy = sampler(SamplingParams::greedy()).sample(&logits, &[]).unwrap();
    let argmax = (0..VOCAB).max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a))).unwrap();
    assert_eq!(greedy as usize, argmax);

    let configs = [
        SamplingParams::default(),
        SamplingParams::default().with_top_k(40),
        SamplingParams::default().with_top_p(0.9),
        SamplingParams::default().with_top_p(0.001),
        SamplingParams::default().with_min_p(0.05),
        SamplingParams::default().with_temperature(0.7).with_top_k(50).with_top_p(0.95).with_min_p(0.01),
        SamplingParams::default()
            .with_temperature(0.6)
            .with_repetition_penalty(1.1)
            .with_repetition_window(0),
        SamplingParams::default().with_top_k(1),
    ];
    for params in configs {
        let mut s = sampler(params.clone().with_seed(99));
        let mut t = sampler(params.clone().with_seed(99));
        for _ in 0..5 {
            let a = s.sample(&logits, &history).unwrap();
            assert!((a as usize) < VOCAB);
            assert_eq!(a, t.sample(&logits, &history).unwrap(), "{params:?}");
        }
    }
    let mut k1 = sampler(SamplingParams::default().with_top_k(1).with_temperature(3.0));
    assert_eq!(k1.sample(&logits, &[]).unwrap(), greedy);

    // top_k = 40 only ever returns one of the 40 largest logits.
    let mut order: Vec<usize> = (0..VOCAB).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let top40 = &order[..40];
    let mut s = sampler(SamplingParams::default().with_top_k(40).with_temperature(5.0).with_seed(1));
    for _ in 0..100 {
        let t = s.sample(&logits, &[]).unwrap() as usize;
        assert!(top40.contains(&t), "{t} not in the top 40");
    }
}
