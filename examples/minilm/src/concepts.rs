//! Finding the dictionary features that stand for a concept, from collected activations.
//!
//! A concept is a set of tokens: those of one corpus kind (`legal`, `code`, `prose`), or the
//! number tokens (`numbers`: word pieces made of digits). A feature's score for a concept is how
//! much more often it fires on the concept's tokens than on the rest: `P(active | concept) −
//! P(active | other)`; ties go to the larger mean activation on the concept. For the corpus kinds
//! only word tokens (holding a letter) count, on both sides, so that a feature for punctuation
//! that happens to be commoner in one kind does not stand for it.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use crate::corpus::read_sequences;

/// A feature chosen for a concept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConceptFeature {
    /// The concept.
    pub concept: String,
    /// The feature.
    pub feature: u32,
    /// Fraction of the concept's tokens on which it fires.
    pub freq_in: f64,
    /// Fraction of the other tokens on which it fires.
    pub freq_out: f64,
    /// Mean activation on the concept's tokens where it fires.
    pub mean_active_in: f64,
    /// `freq_in - freq_out`.
    pub score: f64,
    /// The concept's tokens it fires most on, most frequent first.
    pub top_tokens: Vec<String>,
}

/// The concepts [`select`] knows.
pub const CONCEPTS: [&str; 4] = ["legal", "code", "prose", "numbers"];

fn is_number(tok: &str) -> bool {
    let t = tok.trim_start_matches("##");
    !t.is_empty() && t.chars().all(|c| c.is_ascii_digit())
}

/// Picks the `per_concept` best features for each concept of [`CONCEPTS`], reading at most
/// `max_rows` rows of the collected folder `acts`.
pub fn select(
    dict: &tiller_runtime::Dictionary,
    acts: &Path,
    per_concept: usize,
    max_rows: usize,
) -> Result<Vec<ConceptFeature>> {
    let seqs = read_sequences(acts)?;
    let meta = dict.meta();
    let f = meta.d_sae;
    // Per row: its concept memberships.
    let mut member: Vec<[bool; 4]> = Vec::new();
    let mut population: Vec<[bool; 4]> = Vec::new();
    let mut tokens: Vec<&str> = Vec::new();
    for s in &seqs {
        for t in &s.tokens {
            let word = t.chars().any(char::is_alphabetic);
            member.push([
                word && s.kind == "legal",
                word && s.kind == "code",
                word && s.kind == "prose",
                is_number(t),
            ]);
            // Rows outside every concept's population: non-word tokens for the kinds.
            population.push([word, word, word, true]);
            tokens.push(t);
        }
    }
    let mut fired = vec![[0u64; 4]; f];
    let mut fired_pop = vec![[0u64; 4]; f];
    let mut pop_size = [0u64; 4];
    let mut sum_in = vec![[0f64; 4]; f];
    let mut size = [0u64; 4];
    let mut token_hits: Vec<[BTreeMap<&str, u32>; 4]> = Vec::new();
    token_hits.resize_with(f, Default::default);
    let mut row = 0usize;
    let shards = {
        let mut v: Vec<_> = std::fs::read_dir(acts)
            .with_context(|| format!("reading {}", acts.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "npy"))
            .collect();
        v.sort();
        v
    };
    'shards: for shard in shards {
        let x: ndarray::Array2<f32> = ndarray_npy::read_npy(&shard)
            .with_context(|| format!("reading {}", shard.display()))?;
        ensure!(
            x.ncols() == meta.d_in,
            "{} has width {}, the dictionary {}",
            shard.display(),
            x.ncols(),
            meta.d_in
        );
        for start in (0..x.nrows()).step_by(1024) {
            let end = (start + 1024).min(x.nrows());
            let e = dict.encode(x.slice(ndarray::s![start..end, ..]))?;
            for r in 0..end - start {
                if row >= member.len() || row >= max_rows {
                    break 'shards;
                }
                let m = member[row];
                let pop = population[row];
                for c in 0..4 {
                    size[c] += u64::from(m[c]);
                    pop_size[c] += u64::from(pop[c]);
                }
                for (j, &a) in e.acts.row(r).iter().enumerate() {
                    if a > 0.0 {
                        for c in 0..4 {
                            fired_pop[j][c] += u64::from(pop[c]);
                            if m[c] {
                                fired[j][c] += 1;
                                sum_in[j][c] += f64::from(a);
                                *token_hits[j][c].entry(tokens[row]).or_default() += 1;
                            }
                        }
                    }
                }
                row += 1;
            }
        }
    }
    let rows = row as u64;
    ensure!(rows > 0, "{} holds no rows", acts.display());
    let mut out = Vec::new();
    for (c, name) in CONCEPTS.iter().enumerate() {
        if size[c] == 0 || size[c] == pop_size[c] {
            continue;
        }
        let mut scored: Vec<ConceptFeature> = (0..f)
            .filter(|&j| fired[j][c] > 0)
            .map(|j| {
                let freq_in = fired[j][c] as f64 / size[c] as f64;
                let freq_out =
                    (fired_pop[j][c] - fired[j][c]) as f64 / (pop_size[c] - size[c]) as f64;
                let mut top: Vec<(&str, u32)> =
                    token_hits[j][c].iter().map(|(k, v)| (*k, *v)).collect();
                top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
                ConceptFeature {
                    concept: name.to_string(),
                    feature: j as u32,
                    freq_in,
                    freq_out,
                    mean_active_in: sum_in[j][c] / fired[j][c] as f64,
                    score: freq_in - freq_out,
                    top_tokens: top
                        .into_iter()
                        .take(6)
                        .map(|(t, _)| t.to_string())
                        .collect(),
                }
            })
            .collect();
        scored.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(b.mean_active_in.total_cmp(&a.mean_active_in))
        });
        out.extend(scored.into_iter().take(per_concept));
    }
    Ok(out)
}
