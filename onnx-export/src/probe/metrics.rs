//! How well a score separates two classes: accuracy, log-loss, and the area under the ROC curve.

/// The area under the ROC curve of `scores` for `labels` (true: positive), computed as the
/// Mann-Whitney U statistic: the probability that a random positive scores above a random
/// negative, ties counting one half (each tied group gets its mean rank). `None` when either
/// class is empty.
pub fn auroc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let n = scores.len().min(labels.len());
    let pos = labels[..n].iter().filter(|l| **l).count();
    let neg = n - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Σ of the (1-based, tie-averaged) ranks of the positives.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let mean_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += mean_rank * order[i..=j].iter().filter(|&&k| labels[k]).count() as f64;
        i = j + 1;
    }
    let (p, q) = (pos as f64, neg as f64);
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * q))
}

/// The fraction of `logits` on the side of zero their label is on (a probability above 0.5 for
/// positives).
pub fn accuracy(logits: &[f64], labels: &[bool]) -> f64 {
    let right = logits
        .iter()
        .zip(labels)
        .filter(|(z, l)| (**z > 0.0) == **l)
        .count();
    right as f64 / logits.len().max(1) as f64
}

/// The mean negative log-likelihood of `labels` under `σ(logits)`.
pub fn log_loss(logits: &[f64], labels: &[bool]) -> f64 {
    let sum: f64 = logits
        .iter()
        .zip(labels)
        .map(|(z, l)| super::logreg::softplus(*z) - if *l { *z } else { 0.0 })
        .sum();
    sum / logits.len().max(1) as f64
}

/// Mean and (population) standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts pairs directly: the definition the rank formula must agree with.
    fn pairs(scores: &[f64], labels: &[bool]) -> f64 {
        let mut wins = 0.0;
        let mut total = 0.0;
        for (i, &li) in labels.iter().enumerate() {
            for (j, &lj) in labels.iter().enumerate() {
                if li && !lj {
                    total += 1.0;
                    wins += if scores[i] > scores[j] {
                        1.0
                    } else if scores[i] == scores[j] {
                        0.5
                    } else {
                        0.0
                    };
                }
            }
        }
        wins / total
    }

    #[test]
    fn auroc_counts_ties_as_halves() {
        let scores = [0.1, 0.4, 0.4, 0.4, 0.8, 0.2, 0.8, 0.05, 0.4];
        let labels = [false, true, false, true, true, false, false, false, true];
        let a = auroc(&scores, &labels).unwrap_or(f64::NAN);
        assert!((a - pairs(&scores, &labels)).abs() < 1e-15, "{a}");
        // Perfect, reversed, all tied.
        assert_eq!(auroc(&[1.0, 2.0], &[false, true]), Some(1.0));
        assert_eq!(auroc(&[1.0, 2.0], &[true, false]), Some(0.0));
        assert_eq!(auroc(&[3.0, 3.0, 3.0], &[true, false, true]), Some(0.5));
        assert_eq!(auroc(&[1.0, 2.0], &[true, true]), None);
    }

    #[test]
    fn accuracy_and_log_loss() {
        assert_eq!(
            accuracy(&[1.0, -1.0, 2.0], &[true, false, false]),
            2.0 / 3.0
        );
        let ll = log_loss(&[0.0], &[true]);
        assert!((ll - 2f64.ln()).abs() < 1e-15);
    }
}
