//! The individual steps of the sampling pipeline, over plain slices and reusable buffers.
//!
//! All of them are deterministic: given the same input they produce the same output, including
//! the order of the candidate list (ties are broken by token id).

use std::cmp::Ordering;

/// A token that survived so far: its id, its (penalised, sanitised) logit and, once [`softmax`]
/// has run, its unnormalised probability `exp((logit - max_logit) / temperature)`, in `(0, 1]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Candidate {
    pub(crate) id: u32,
    pub(crate) logit: f32,
    pub(crate) p: f64,
}

/// Most probable first; among equal logits the lowest id first. Since `p` is a non-decreasing
/// function of `logit`, this is also a "most probable first" order, and it never depends on the
/// rounding of `p`.
pub(crate) fn by_rank(a: &Candidate, b: &Candidate) -> Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// The CTRL / Hugging Face repetition penalty, applied once to each distinct token among the last
/// `window` entries of `previous` (`window == 0`: all of them). Positive logits are divided by
/// `penalty`, the others multiplied. Ids outside `logits` are ignored. `distinct` is scratch.
pub(crate) fn apply_repetition_penalty(
    logits: &mut [f32],
    previous: &[u32],
    window: usize,
    penalty: f32,
    distinct: &mut Vec<u32>,
) {
    if penalty == 1.0 || previous.is_empty() {
        return;
    }
    let recent =
        if window == 0 || window >= previous.len() { previous } else { &previous[previous.len() - window..] };
    distinct.clear();
    distinct.extend_from_slice(recent);
    distinct.sort_unstable();
    distinct.dedup();
    let mut out_of_range = 0usize;
    for &id in distinct.iter() {
        match logits.get_mut(id as usize) {
            Some(l) => *l = if *l > 0.0 { *l / penalty } else { *l * penalty },
            None => out_of_range += 1,
        }
    }
    if out_of_range > 0 {
        tracing::debug!(
            out_of_range,
            vocab = logits.len(),
            "repetition penalty: ignoring token ids >= vocab"
        );
    }
}

/// NaN becomes `-inf` (never chosen); `+inf` becomes `f32::MAX`, so that tokens at `+inf` share
/// all the probability mass equally instead of turning the softmax into NaN.
pub(crate) fn sanitize(logits: &mut [f32]) {
    for l in logits.iter_mut() {
        if l.is_nan() {
            *l = f32::NEG_INFINITY;
        } else if *l == f32::INFINITY {
            *l = f32::MAX;
        }
    }
}

/// The index of the largest logit, the lowest index among ties; `None` when `logits` is empty or
/// all `-inf`. Expects sanitised logits (no NaN).
pub(crate) fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<u32> = None;
    let mut best_val = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_val {
            best_val = l;
            best = Some(i as u32);
        }
    }
    best
}

/// Fills `out` with every token whose logit is above `-inf` (`p` still 0) and returns the largest
/// logit, or `None` (and an empty `out`) when there is none. Expects sanitised logits.
pub(crate) fn finite_candidates(logits: &[f32], out: &mut Vec<Candidate>) -> Option<f32> {
    out.clear();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return None;
    }
    out.extend(
        logits
            .iter()
            .enumerate()
            .filter(|(_, &logit)| logit > f32::NEG_INFINITY)
            .map(|(i, &logit)| Candidate { id: i as u32, logit, p: 0.0 }),
    );
    Some(max)
}

/// Temperature and (unnormalised, numerically stable) softmax: sets `p = exp((logit - max) /
/// temperature)`, so the most likely token has `p == 1` (the exponential is taken in f32; the
/// sums made from `p` later are in f64), then drops the candidates whose `p` underflowed to zero:
/// they can never be drawn. Keeps the order of the others. `max` must be the largest logit of all
/// tokens and `temperature > 0`.
pub(crate) fn softmax(candidates: &mut Vec<Candidate>, max: f32, temperature: f32) {
    for c in candidates.iter_mut() {
        // `logit - max` is <= 0 (or -inf when it overflows, which is fine); dividing (rather than
        // multiplying by 1 / temperature) keeps the max at exactly 0 for any temperature.
        c.p = f64::from(((c.logit - max) / temperature).exp());
    }
    candidates.retain(|c| c.p > 0.0);
}

/// Keeps the `k` most probable candidates (`k == 0`: all), in O(n) with a selection, not a sort.
/// Ties at the boundary keep the lowest ids.
pub(crate) fn top_k(candidates: &mut Vec<Candidate>, k: usize) {
    if k == 0 || k >= candidates.len() {
        return;
    }
    candidates.select_nth_unstable_by(k - 1, by_rank);
    candidates.truncate(k);
}

/// Min-p: drops the candidates whose probability is below `min_p` times the largest one. Keeps
/// the order of the others.
pub(crate) fn min_p(candidates: &mut Vec<Candidate>, min_p: f32) {
    if min_p <= 0.0 || candidates.is_empty() {
        return;
    }
    let max = candidates.iter().map(|c| c.p).fold(0.0, f64::max);
    let threshold = f64::from(min_p) * max;
    candidates.retain(|c| c.p >= threshold);
}

/// Top-p (nucleus): keeps the smallest prefix of the most-probable-first order whose mass reaches
/// `top_p * total` (at least one candidate), where `total` is the mass the filter is relative to.
/// When the whole list does not reach it, all candidates stay.
///
/// Only as much of the list as needed is sorted: the best 64 candidates are selected and sorted
/// first, then 8 times more, and so on. On return the kept candidates are in rank order whenever
/// the list was cut.
pub(crate) fn top_p(candidates: &mut Vec<Candidate>, top_p: f32, total: f64) {
    if top_p >= 1.0 || candidates.len() <= 1 {
        return;
    }
    let target = f64::from(top_p) * total;
    let n = candidates.len();
    let mut m = n.min(64);
    loop {
        if m < n {
            candidates.select_nth_unstable_by(m - 1, by_rank);
        }
        candidates[..m].sort_unstable_by(by_rank);
        let mut acc = 0.0;
        for i in 0..m {
            acc += candidates[i].p;
            if acc >= target {
                candidates.truncate(i + 1);
                return;
            }
        }
        if m == n {
            return;
        }
        // Grow 8-fold; once past a quarter of the list, sort all of it.
        m = m.saturating_mul(8);
        if m > n / 4 {
            m = n;
        }
    }
}

/// Draws one candidate with probability proportional to `p`, from a uniform `u` in `[0, 1)`.
/// `None` only when the list is empty.
pub(crate) fn draw(candidates: &[Candidate], u: f64) -> Option<u32> {
    let total: f64 = candidates.iter().map(|c| c.p).sum();
    let r = u * total;
    let mut acc = 0.0;
    for c in candidates {
        acc += c.p;
        if r < acc {
            return Some(c.id);
        }
    }
    // Rounding can leave `r` at (or just past) the final sum: take the last token with mass.
    candidates.iter().rev().find(|c| c.p > 0.0).or(candidates.last()).map(|c| c.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(logits: &[f32]) -> Vec<Candidate> {
        let mut out = Vec::new();
        if let Some(max) = finite_candidates(logits, &mut out) {
            softmax(&mut out, max, 1.0);
        }
        out
    }

    #[test]
    fn penalty_counts_each_token_once_and_ignores_out_of_range() {
        let mut l = vec![2.0, -1.0, 0.5];
        let mut scratch = Vec::new();
        apply_repetition_penalty(&mut l, &[0, 0, 1, 1, 99], 0, 2.0, &mut scratch);
        assert_eq!(l, vec![1.0, -2.0, 0.5]);
    }

    #[test]
    fn sanitize_maps_nan_and_inf() {
        let mut l = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0];
        sanitize(&mut l);
        assert_eq!(l, vec![f32::NEG_INFINITY, f32::MAX, f32::NEG_INFINITY, 1.0]);
    }

    #[test]
    fn argmax_ties_and_empty() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), Some(1));
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), None);
    }

    #[test]
    fn softmax_skips_impossible_tokens() {
        let c = cands(&[0.0, f32::NEG_INFINITY, -1e6, 1.0]);
        let ids: Vec<u32> = c.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![0, 3]);
        assert_eq!(c[1].p, 1.0);
    }

    #[test]
    fn top_k_keeps_the_best_and_lowest_ids_on_ties() {
        let mut c = cands(&[1.0, 5.0, 5.0, 3.0, 5.0]);
        top_k(&mut c, 2);
        let mut ids: Vec<u32> = c.iter().map(|c| c.id).collect();
        ids.sort();
        assert_eq!(ids, vec![1, 2]);
    }

    #[test]
    fn top_p_cuts_at_the_smallest_prefix_beyond_64() {
        // 200 tokens with equal mass: top_p = 0.5 keeps exactly 100 (needs a second round).
        let mut c = cands(&[0.0; 200]);
        let total: f64 = c.iter().map(|c| c.p).sum();
        top_p(&mut c, 0.5, total);
        assert_eq!(c.len(), 100);
        assert!(c.iter().enumerate().all(|(i, c)| c.id == i as u32));
    }

    #[test]
    fn draw_edges() {
        let c = cands(&[0.0, 0.0]);
        assert_eq!(draw(&c, 0.0), Some(0));
        assert_eq!(draw(&c, 0.999_999), Some(1));
        assert_eq!(draw(&c, 1.0), Some(1));
        assert_eq!(draw(&[], 0.5), None);
    }
}
