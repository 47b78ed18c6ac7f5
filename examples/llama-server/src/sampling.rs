//! The server's sampler: greedy (`temperature` 0), or temperature then top-p then one draw from
//! the request's own seeded generator; and the model's log-probabilities.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// How a request samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0: greedy.
    pub temperature: f64,
    /// The nucleus: the smallest set of most likely tokens whose probability reaches it.
    pub top_p: f64,
    /// The generator's seed.
    pub seed: u64,
}

/// A request's sampler.
#[derive(Debug)]
pub struct Sampler {
    params: Sampling,
    rng: StdRng,
    order: Vec<(f64, i32)>,
}

impl Sampler {
    /// A sampler seeded with `params.seed`.
    pub fn new(params: Sampling) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(params.seed),
            order: Vec::new(),
        }
    }

    /// The next token from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> i32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let t = self.params.temperature;
        if self.params.top_p >= 1.0 {
            // The whole distribution: one draw over the tokens in id order, no sort (a vocabulary
            // of 150k tokens per sequence per step).
            let total: f64 = logits.iter().map(|&l| ((l as f64 - max) / t).exp()).sum();
            let mut u = self.rng.random::<f64>() * total;
            let mut last = 0;
            for (i, &l) in logits.iter().enumerate() {
                let p = ((l as f64 - max) / t).exp();
                if p > 0.0 {
                    last = i;
                }
                if u < p {
                    return i as i32;
                }
                u -= p;
            }
            return last as i32;
        }
        self.order.clear();
        self.order.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (((l as f64 - max) / t).exp(), i as i32)),
        );
        // Most likely first; equal probabilities by token id, so a seed gives one answer.
        self.order
            .sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let total: f64 = self.order.iter().map(|p| p.0).sum();
        let mut kept = 0.0;
        let mut n = 0;
        for &(p, _) in &self.order {
            kept += p;
            n += 1;
            if kept >= self.params.top_p * total {
                break;
            }
        }
        let mut u = self.rng.random::<f64>() * kept;
        for &(p, id) in &self.order[..n] {
            if u < p {
                return id;
            }
            u -= p;
        }
        self.order[n - 1].1
    }
}

/// The first largest logit's token.
pub fn argmax(logits: &[f32]) -> i32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as i32
}

/// The model's log-probabilities at one position: the chosen token's, and the `k` most likely
/// tokens' (largest first, equal ones by id). The log-softmax of the raw logits, in float64,
/// rounded to float32.
pub fn logprobs(logits: &[f32], token: i32, k: usize) -> (f32, Vec<(i32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    let lp = |i: usize| (logits[i] as f64 - lse) as f32;
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let k = k.min(logits.len());
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| {
            logits[b].total_cmp(&logits[a]).then(a.cmp(&b))
        });
        idx.truncate(k);
    }
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    idx.truncate(k);
    (
        lp(token as usize),
        idx.into_iter().map(|i| (i as i32, lp(i))).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_largest() {
        assert_eq!(argmax(&[0.5, 2.0, 2.0, -1.0]), 1);
        let mut s = Sampler::new(Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 1,
        });
        assert_eq!(s.sample(&[0.5, 2.0, 2.0, -1.0]), 1);
    }

    #[test]
    fn a_seed_repeats_and_top_p_keeps_the_nucleus() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let p = Sampling {
            temperature: 0.8,
            top_p: 0.5,
            seed: 42,
        };
        let draw = |p| {
            let mut s = Sampler::new(p);
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(p), draw(p));
        assert_ne!(draw(p), draw(Sampling { seed: 43, ..p }));
        // The nucleus, computed here from the probabilities in float64.
        let w: Vec<f64> = logits.iter().map(|&l| (l as f64 / 0.8).exp()).collect();
        let total: f64 = w.iter().sum();
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
        let mut acc = 0.0;
        let mut nucleus = Vec::new();
        for i in order {
            acc += w[i];
            nucleus.push(i as i32);
            if acc >= 0.5 * total {
                break;
            }
        }
        let drawn = draw(p);
        assert!(
            drawn.iter().all(|t| nucleus.contains(t)),
            "{drawn:?} vs {nucleus:?}"
        );
        assert!(
            nucleus.iter().all(|t| drawn.contains(t)),
            "{drawn:?} vs {nucleus:?}"
        );
    }

    #[test]
    fn without_top_p_draws_follow_the_softmax() {
        let logits = [0.0f32, 1.0, -1.0, 2.0, 0.5];
        let t = 0.7;
        let w: Vec<f64> = logits.iter().map(|&l| (l as f64 / t).exp()).collect();
        let z: f64 = w.iter().sum();
        let mut s = Sampler::new(Sampling {
            temperature: t,
            top_p: 1.0,
            seed: 7,
        });
        let n = 40_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let p = w[i] / z;
            // 4 standard deviations of a binomial frequency: a fixed seed, so this never flakes,
            // and a sampler off by a percent of probability fails it.
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                ((c as f64 / n as f64) - p).abs() < 4.0 * sd,
                "token {i}: {c} of {n}, p {p}"
            );
        }
    }

    #[test]
    fn logprobs_are_the_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let (lp, top) = logprobs(&logits, 2, 3);
        assert!((lp as f64 - (2.0 - z.ln())).abs() < 1e-6);
        let ids: Vec<i32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2]);
        assert!((top[0].1 as f64 - (3.0 - z.ln())).abs() < 1e-6);
        assert!(logprobs(&logits, 0, 0).1.is_empty());
    }
}
