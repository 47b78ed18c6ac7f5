//! Building a dashboard: encoding the rows, choosing features, gathering their contexts.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use rayon::prelude::*;

use super::input::*;
use super::labels::*;
use super::model::*;
use super::stats::*;
use crate::{Error, Result};

/// Computes the dashboard's data (without writing anything).
pub fn build(opts: &Options) -> Result<Dashboard> {
    let dict = tiller_runtime::Dictionary::load(
        &opts.dictionary,
        &tiller_runtime::SessionOptions::default(),
    )?;
    let meta = dict.meta().clone();
    let width = meta.input_layers() * meta.d_in;
    let d_sae = meta.d_sae;
    let ids: Vec<u32> = match &meta.feature_ids {
        Some(ids) => ids.clone(),
        None => (0..d_sae as u32).collect(),
    };
    // Check everything outside before the long pass.
    let requested = match &opts.features {
        Some(list) => Some(columns_of(list, &ids, &meta, &opts.dictionary)?),
        None => None,
    };
    let rows = Rows::new(
        list_inputs(&opts.activations, width, &opts.dictionary)?,
        opts.max_rows,
    );
    if rows.total == 0 {
        return Err(Error::format(
            &opts.activations,
            "its shards hold no rows (or --max-rows is 0)",
        ));
    }
    let collector = read_collector_meta(&opts.activations)?;

    let stats = scan(&dict, &rows, opts)?;
    let chosen: Vec<usize> = requested.unwrap_or_else(|| {
        let mut alive: Vec<usize> = (0..d_sae).filter(|&c| stats[c].count > 0).collect();
        alive.sort_by(|&a, &b| stats[b].count.cmp(&stats[a].count).then(a.cmp(&b)));
        alive.truncate(opts.top_features);
        alive
    });
    let tops: Vec<Vec<Hit>> = chosen.iter().map(|&c| stats[c].sorted()).collect();
    let (contexts, words) = gather(&dict, &rows, &chosen, &tops, opts)?;

    let features = chosen
        .iter()
        .zip(contexts.into_iter().zip(words))
        .map(|(&c, (contexts, words))| {
            let st = &stats[c];
            let label_words = choose_label(&words);
            Feature {
                id: ids[c],
                column: c,
                label: label_words
                    .iter()
                    .map(|w| w.word.as_str())
                    .collect::<Vec<_>>()
                    .join(" · "),
                label_words,
                given_label: meta.labels.get(&ids[c]).cloned(),
                count: st.count,
                density: st.count as f64 / rows.total as f64,
                max: st.max,
                histogram: st.bins.finish(st.max),
                kinds: kinds_of(&contexts),
                contexts,
            }
        })
        .collect();
    let active: u64 = stats.iter().map(|s| s.count).sum();
    let dead = stats.iter().filter(|s| s.count == 0).count();
    Ok(Dashboard {
        format: FORMAT.into(),
        dictionary: opts.dictionary.display().to_string(),
        activations: opts.activations.display().to_string(),
        kind: meta.kind.to_string(),
        activation: meta.activation.to_string(),
        model: meta.model.clone(),
        hook_in: meta.hook_in.clone(),
        d_in: width,
        d_sae,
        rows: rows.total,
        shards: rows.used.iter().filter(|&&n| n > 0).count(),
        dead_fraction: dead as f64 / d_sae.max(1) as f64,
        mean_l0: active as f64 / rows.total as f64,
        collector,
        features,
    })
}

/// The dictionary columns of the requested feature ids, in the order given, without repeats.
pub(super) fn columns_of(
    list: &[u32],
    ids: &[u32],
    meta: &tiller_runtime::Meta,
    dict: &Path,
) -> Result<Vec<usize>> {
    let mut cols = Vec::new();
    for &id in list {
        let Some(c) = ids.iter().position(|&x| x == id) else {
            let d_sae = meta.d_sae;
            return Err(Error::format(
                dict,
                match &meta.feature_ids {
                    Some(_) => format!(
                        "feature {id} is not in this sliced dictionary (it holds {d_sae} features: {})",
                        abbreviate(ids)
                    ),
                    None => format!("feature {id} is out of range (d_sae = {d_sae})"),
                },
            ));
        };
        if !cols.contains(&c) {
            cols.push(c);
        }
    }
    Ok(cols)
}

/// The shards, and where each one's rows sit among all rows read.
#[derive(Debug)]
pub(super) struct Rows {
    pub(super) inputs: Vec<Input>,
    /// Row (over all shards) of each shard's first row.
    pub(super) bases: Vec<u64>,
    /// Rows read from each shard (fewer than it has past `--max-rows`).
    pub(super) used: Vec<u64>,
    pub(super) total: u64,
}

impl Rows {
    pub(super) fn new(inputs: Vec<Input>, max_rows: Option<u64>) -> Self {
        let limit = max_rows.unwrap_or(u64::MAX);
        let (mut bases, mut used, mut total) = (Vec::new(), Vec::new(), 0u64);
        for inp in &inputs {
            bases.push(total);
            let n = inp.shard.rows.min(limit - total);
            used.push(n);
            total += n;
        }
        Self {
            inputs,
            bases,
            used,
            total,
        }
    }

    /// The shard of a row over all shards, and its row in that shard.
    pub(super) fn locate(&self, row: u64) -> (usize, u64) {
        let s = self.bases.partition_point(|&b| b <= row).saturating_sub(1);
        (s, row - self.bases[s])
    }
}

/// Pass 1: every row encoded once, folded into per-feature statistics.
pub(super) fn scan(
    dict: &tiller_runtime::Dictionary,
    rows: &Rows,
    opts: &Options,
) -> Result<Vec<Stat>> {
    const CHUNK: usize = 64;
    let d_sae = dict.meta().d_sae;
    let keep = opts.contexts.max(LABEL_POOL);
    let batch = opts.batch.max(1);
    let mut stats = vec![Stat::new(); d_sae];
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(rows.total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} rows {per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut buf = Vec::new();
    for (s, inp) in rows.inputs.iter().enumerate() {
        let mut start = 0u64;
        while start < rows.used[s] {
            let n = (rows.used[s] - start).min(batch as u64) as usize;
            let acts = encode_rows(dict, &inp.shard, start, n, &mut buf)?;
            if acts.ncols() != d_sae {
                return Err(Error::format(
                    &opts.dictionary,
                    format!(
                        "its `acts` output has {} columns, but its metadata says d_sae = {d_sae}",
                        acts.ncols()
                    ),
                ));
            }
            let first = rows.bases[s] + start;
            // Features are independent: each thread owns a block of them, for every row.
            stats
                .par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(ci, chunk)| {
                    let c0 = ci * CHUNK;
                    for (r, row) in acts.rows().into_iter().enumerate() {
                        let vals = row.slice(ndarray::s![c0..c0 + chunk.len()]);
                        for (st, &v) in chunk.iter_mut().zip(vals.iter()) {
                            if v > 0.0 {
                                st.add(v, first + r as u64, keep);
                            }
                        }
                    }
                });
            start += n as u64;
            bar.inc(n as u64);
        }
    }
    bar.finish_and_clear();
    Ok(stats)
}

/// One context to fill: which feature and rank, and where its window lies.
#[derive(Debug, Clone, Copy)]
pub(super) struct Wanted {
    /// Index among the chosen features.
    pub(super) k: usize,
    pub(super) rank: usize,
    pub(super) hit: Hit,
    /// Row in the shard.
    pub(super) row: u64,
    pub(super) line: usize,
    /// The top token's index in its line, and the window `j0..j1`.
    pub(super) j: usize,
    pub(super) j0: usize,
    pub(super) j1: usize,
}

type Gathered = (Vec<Vec<Context>>, Vec<HashMap<String, f64>>);

/// Pass 2, over the shards holding top rows of the chosen features: the contexts (their windows
/// encoded again) and the weight of each whole word among the top rows, per chosen feature.
pub(super) fn gather(
    dict: &tiller_runtime::Dictionary,
    rows: &Rows,
    chosen: &[usize],
    tops: &[Vec<Hit>],
    opts: &Options,
) -> Result<Gathered> {
    let batch = opts.batch.max(1);
    let mut contexts: Vec<Vec<Option<Context>>> = tops
        .iter()
        .map(|t| vec![None; t.len().min(opts.contexts)])
        .collect();
    let mut words: Vec<HashMap<String, f64>> = vec![HashMap::new(); chosen.len()];
    let mut buf = Vec::new();
    for (s, inp) in rows.inputs.iter().enumerate() {
        let in_shard = |h: &Hit| rows.locate(h.row).0 == s;
        if !tops.iter().any(|t| t.iter().any(in_shard)) {
            continue;
        }
        let seqs = Sequences::read(&inp.jsonl)?;
        let find = |row: u64| {
            seqs.locate(row).ok_or_else(|| {
                Error::format(
                    &inp.jsonl,
                    format!(
                        "row {row} is past the tokens it lists (did it change while being read?)"
                    ),
                )
            })
        };
        for (k, t) in tops.iter().enumerate() {
            for h in t.iter().filter(|h| in_shard(h)) {
                let (line, j) = find(rows.locate(h.row).1)?;
                let w = whole_word(&seqs.lines[line].tokens, j);
                *words[k].entry(w).or_insert(0.0) += f64::from(h.act);
            }
        }
        // A group of features at a time, to bound what is kept of the windows' activations.
        for group in (0..chosen.len()).collect::<Vec<_>>().chunks(CONTEXT_GROUP) {
            let mut wanted = Vec::new();
            let mut needed = BTreeSet::new();
            for &k in group {
                for (rank, &hit) in tops[k].iter().take(opts.contexts).enumerate() {
                    if !in_shard(&hit) {
                        continue;
                    }
                    let row = rows.locate(hit.row).1;
                    let (line, j) = find(row)?;
                    let j0 = j.saturating_sub(opts.window);
                    let j1 = (j + opts.window + 1).min(seqs.lines[line].tokens.len());
                    let r0 = seqs.starts[line];
                    needed.extend(r0 + j0 as u64..r0 + j1 as u64);
                    wanted.push(Wanted {
                        k,
                        rank,
                        hit,
                        row,
                        line,
                        j,
                        j0,
                        j1,
                    });
                }
            }
            if wanted.is_empty() {
                continue;
            }
            // Encode those rows, run by contiguous run, keeping this group's columns.
            let needed: Vec<u64> = needed.into_iter().collect();
            let index: HashMap<u64, usize> =
                needed.iter().enumerate().map(|(i, &r)| (r, i)).collect();
            let width = group.len();
            let mut kept = vec![0f32; needed.len() * width];
            let mut i = 0;
            while i < needed.len() {
                let mut e = i + 1;
                while e < needed.len() && needed[e] == needed[e - 1] + 1 && e - i < batch {
                    e += 1;
                }
                let acts = encode_rows(dict, &inp.shard, needed[i], e - i, &mut buf)?;
                for (r, a) in acts.rows().into_iter().enumerate() {
                    for (g, &k) in group.iter().enumerate() {
                        kept[(i + r) * width + g] = a[chosen[k]];
                    }
                }
                i = e;
            }
            for w in wanted {
                let g = w.k - group[0];
                let l = &seqs.lines[w.line];
                let first = seqs.starts[w.line];
                // The top token keeps its value from pass 1 (a batch of another size may round
                // differently), so the page agrees with the ranking.
                let activations = (w.j0..w.j1)
                    .map(|jj| {
                        if jj == w.j {
                            w.hit.act
                        } else {
                            kept[index[&(first + jj as u64)] * width + g]
                        }
                    })
                    .collect();
                contexts[w.k][w.rank] = Some(Context {
                    shard: inp.name.clone(),
                    row: w.row,
                    sequence: w.line,
                    source: l.source.clone(),
                    kind: l.kind.clone(),
                    position: l.first_position + w.j as u64,
                    token_index: w.j,
                    sequence_len: l.tokens.len(),
                    window_start: w.j0,
                    top: w.j - w.j0,
                    activation: w.hit.act,
                    tokens: l.tokens[w.j0..w.j1].to_vec(),
                    activations,
                });
            }
        }
    }
    let contexts = contexts
        .into_iter()
        .map(|c| c.into_iter().flatten().collect())
        .collect();
    Ok((contexts, words))
}

/// The kinds of the contexts, most frequent first (then by name).
pub(super) fn kinds_of(contexts: &[Context]) -> Vec<KindCount> {
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for ctx in contexts {
        *kinds.entry(ctx.kind.as_str()).or_insert(0) += 1;
    }
    let mut kinds: Vec<KindCount> = kinds
        .into_iter()
        .map(|(kind, count)| KindCount {
            kind: kind.to_string(),
            count,
        })
        .collect();
    kinds.sort_by_key(|k| Reverse(k.count));
    kinds
}

pub(super) fn abbreviate(ids: &[u32]) -> String {
    let shown: Vec<String> = ids.iter().take(12).map(u32::to_string).collect();
    if ids.len() > 12 {
        format!("{}, …", shown.join(", "))
    } else {
        shown.join(", ")
    }
}
