//! `tiller-export dashboard`: a static HTML page that shows what a dictionary's features fire on.
//!
//! ```text
//! tiller-export dashboard --dictionary sae.onnx --activations acts/ -o dashboard.html \
//!     [--features 0,5,17 | --top-features 64] [--contexts 12] [--window 8] [--max-rows N]
//! ```
//!
//! # Input
//!
//! `--activations` is a folder written by an activation collector:
//! - `shard-00000.npy`, `shard-00001.npy`, …: `[rows, d_in]` activations (float32, C order; float16
//!   and float64 are widened), read in name order;
//! - beside each shard, `shard-00000.jsonl`: one JSON object per text sequence, in row order, with
//!   `source` (the file the text came from), `kind` (`legal`, `prose`, `code`, …), `tokens` (the
//!   token strings; WordPiece continuation pieces start with `##`) and `first_position` (the model
//!   position of `tokens[0]`). The rows of the shard are every line's tokens, concatenated: their
//!   number must equal the shard's rows. Unknown fields are ignored, blank lines skipped;
//! - optionally `meta.json`, a JSON object (the collector's record): its `model`, `hook` and `layer`
//!   are shown in the page header, and the whole object is kept in the JSON.
//!
//! # How it is computed
//!
//! Rows are encoded through ONNX Runtime in batches and streamed once: per feature the count of
//! rows where it is active (activation > 0), its maximum, a histogram of its nonzero activations,
//! and its top activations (a small min-heap of at least [`LABEL_POOL`] rows, ties going to the
//! earlier row). Nothing of size `rows × d_sae` is kept.
//!
//! The histogram is exact without a second pass: bins have a power-of-two width `w`, bin `i`
//! holding activations in `[i·w, (i+1)·w)`; when an activation reaches `32·w`, neighbouring bins
//! are merged and `w` doubles. The bins past the one holding the maximum are dropped, so the
//! histogram spans `[0, n·w)` with `n ≤ 32` and the maximum in its upper half.
//!
//! The chosen features (`--features`, or the `--top-features` densest that ever fired) are then
//! shown with their top `--contexts` rows: `--window` tokens either side of the top token, within
//! its sequence, each shaded by the feature's activation on it (the window rows are encoded again).
//! The auto label is the (up to) three whole words (`##` pieces joined) carrying the largest share of
//! the feature's top [`LABEL_POOL`] activations, weighted by activation; special tokens (`[CLS]`,
//! `<s>`, …) and pure punctuation are left out unless nothing else carries a tenth of the weight.
//!
//! Feature ids are the dictionary's: for a sliced dictionary, the original ids of
//! `tiller.feature_ids` (as the runtime config names them), which `--features` takes too. Labels
//! stored in `tiller.labels` are shown beside the auto labels.
//!
//! # Output
//!
//! The HTML page is one self-contained file (inline CSS and SVG; a few lines of script add a
//! filter box, but all content is in the markup). Each feature is a `<section class="feature"
//! id="f-ID">`; each context token a `<span class="tok" data-act="…">` (the top one also has class
//! `top`).
//!
//! Beside it, with the extension `.json` (`dashboard.html` → `dashboard.json`), the same data
//! ([`Dashboard`], format `tiller-dashboard/1`):
//!
//! | field | meaning |
//! | --- | --- |
//! | `format` | `"tiller-dashboard/1"` |
//! | `dictionary`, `activations` | the paths given |
//! | `kind`, `activation`, `model`, `hook_in` | from the dictionary's metadata |
//! | `d_in`, `d_sae` | the dictionary's sizes (`d_in`: the width of a row) |
//! | `rows`, `shards` | rows encoded (all of them, or `--max-rows`), shards read |
//! | `dead_fraction` | the fraction of the `d_sae` features that never fired |
//! | `mean_l0` | active features per row, averaged over the rows |
//! | `collector` | `meta.json`, as found (null when absent) |
//! | `features[]` | the chosen features, in the page's order: |
//! | `.id`, `.column` | the feature's id, and its column in the dictionary's output |
//! | `.label`, `.label_words[]` | the auto label, and its words with their `share` of the top activations' weight |
//! | `.given_label` | the label from `tiller.labels`, or null |
//! | `.count`, `.density`, `.max` | rows where it fired, `count / rows`, its largest activation |
//! | `.histogram` | `{bin_width, counts}`: `counts[i]` nonzero activations in `[i·bin_width, (i+1)·bin_width)`; they sum to `count` |
//! | `.kinds[]` | `{kind, count}` of the shown contexts, most frequent first |
//! | `.contexts[]` | the top rows, largest first: `shard` (file name), `row` (in the shard), `sequence` (line index in the `.jsonl`), `source`, `kind`, `position` (model position of the top token), `token_index` (its index in the sequence), `sequence_len`, `window_start` (index of `tokens[0]` in the sequence), `top` (index of the top token in `tokens`), `activation`, `tokens`, `activations` (the feature's activation on each token) |

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use ndarray::ArrayView2;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::train::data::Shard;
use crate::{Error, Result};

/// Bins of the activation histogram (before the empty ones past the maximum are dropped).
pub const BINS: usize = 32;

/// Top activations kept per feature for its label (at least; `--contexts` if larger).
pub const LABEL_POOL: usize = 32;

/// The version written in `format`.
pub const FORMAT: &str = "tiller-dashboard/1";

/// Features processed together when the context windows are encoded again (bounds memory).
const CONTEXT_GROUP: usize = 64;

/// What to build.
#[derive(Debug, Clone)]
pub struct Options {
    /// The dictionary (`.onnx`, format v1).
    pub dictionary: PathBuf,
    /// The folder of `shard-*.npy` + `shard-*.jsonl`.
    pub activations: PathBuf,
    /// The HTML page to write; the JSON goes beside it (see [`json_path`]).
    pub output: PathBuf,
    /// Features to show (ids as the dictionary names them); `None`: the `top_features` densest.
    pub features: Option<Vec<u32>>,
    /// How many features to show when `features` is `None`.
    pub top_features: usize,
    /// Top contexts per feature.
    pub contexts: usize,
    /// Tokens shown either side of the top token.
    pub window: usize,
    /// Read at most this many rows (from the first shards on).
    pub max_rows: Option<u64>,
    /// Rows per encode call.
    pub batch: usize,
    /// Show a progress bar on stderr (hidden when stderr is not a terminal).
    pub progress: bool,
}

impl Options {
    /// The defaults of the command line: 64 densest features, 12 contexts of ±8 tokens.
    pub fn new(
        dictionary: impl Into<PathBuf>,
        activations: impl Into<PathBuf>,
        output: impl Into<PathBuf>,
    ) -> Self {
        Self {
            dictionary: dictionary.into(),
            activations: activations.into(),
            output: output.into(),
            features: None,
            top_features: 64,
            contexts: 12,
            window: 8,
            max_rows: None,
            batch: 1024,
            progress: false,
        }
    }
}

/// Everything the page shows; written as JSON beside it (see the module docs for the fields).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dashboard {
    /// `tiller-dashboard/1`.
    pub format: String,
    /// The dictionary's path.
    pub dictionary: String,
    /// The activations folder.
    pub activations: String,
    /// `tiller.kind`.
    pub kind: String,
    /// `tiller.activation`.
    pub activation: String,
    /// `tiller.model`.
    pub model: String,
    /// `tiller.hook_in`.
    pub hook_in: String,
    /// Width of a row.
    pub d_in: usize,
    /// Number of features.
    pub d_sae: usize,
    /// Rows encoded.
    pub rows: u64,
    /// Shards read.
    pub shards: usize,
    /// Fraction of features that never fired.
    pub dead_fraction: f64,
    /// Active features per row, on average.
    pub mean_l0: f64,
    /// The collector's `meta.json`, if there was one.
    pub collector: Option<serde_json::Value>,
    /// The chosen features.
    pub features: Vec<Feature>,
}

/// One feature's card.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Feature {
    /// Its id (the original id for a sliced dictionary).
    pub id: u32,
    /// Its column in the dictionary's `acts`.
    pub column: usize,
    /// The auto label: words joined with ` · ` (empty for a feature that never fired).
    pub label: String,
    /// The label's words and their share of the top activations' weight.
    pub label_words: Vec<LabelWord>,
    /// The label stored in the dictionary (`tiller.labels`).
    pub given_label: Option<String>,
    /// Rows where it fired.
    pub count: u64,
    /// `count / rows`.
    pub density: f64,
    /// Its largest activation (0 if it never fired).
    pub max: f32,
    /// Its nonzero activations, binned.
    pub histogram: Histogram,
    /// The kinds of its shown contexts, most frequent first.
    pub kinds: Vec<KindCount>,
    /// Its top contexts, largest activation first.
    pub contexts: Vec<Context>,
}

/// A word of an auto label.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelWord {
    /// The whole word (`##` pieces joined).
    pub word: String,
    /// Its share of the summed top activations.
    pub share: f64,
}

/// A histogram of equal-width bins starting at 0.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Histogram {
    /// Width of each bin (a power of two).
    pub bin_width: f64,
    /// `counts[i]`: activations in `[i·bin_width, (i+1)·bin_width)`.
    pub counts: Vec<u64>,
}

/// How many of a feature's contexts have a kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KindCount {
    /// The `kind` field of the `.jsonl` lines.
    pub kind: String,
    /// Contexts of that kind.
    pub count: usize,
}

/// One top activation with the tokens around it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Context {
    /// The shard's file name.
    pub shard: String,
    /// The row in the shard.
    pub row: u64,
    /// The line of the `.jsonl` (0-based) holding the sequence.
    pub sequence: usize,
    /// The `source` of that line.
    pub source: String,
    /// The `kind` of that line.
    pub kind: String,
    /// Model position of the top token.
    pub position: u64,
    /// Index of the top token in its sequence.
    pub token_index: usize,
    /// Tokens in the sequence.
    pub sequence_len: usize,
    /// Index in the sequence of `tokens[0]`.
    pub window_start: usize,
    /// Index of the top token in `tokens`.
    pub top: usize,
    /// The feature's activation on the top token.
    pub activation: f32,
    /// The window's tokens, as the tokenizer wrote them.
    pub tokens: Vec<String>,
    /// The feature's activation on each token of the window.
    pub activations: Vec<f32>,
}

/// Where the JSON goes: the HTML path with the extension `.json`.
pub fn json_path(html: &Path) -> PathBuf {
    html.with_extension("json")
}

/// Builds the dashboard and writes the HTML page and the JSON beside it.
pub fn write(opts: &Options) -> Result<Dashboard> {
    let json = json_path(&opts.output);
    if json == opts.output {
        return Err(Error::format(
            &opts.output,
            "the page's own path ends in .json, where its JSON data would go: name it .html",
        ));
    }
    let d = build(opts)?;
    std::fs::write(&opts.output, render_html(&d)).map_err(|e| Error::io(&opts.output, e))?;
    let text = serde_json::to_string_pretty(&d)
        .map_err(|e| Error::format(&json, format!("cannot serialise: {e}")))?;
    std::fs::write(&json, text).map_err(|e| Error::io(&json, e))?;
    Ok(d)
}

// ---------------------------------------------------------------------------------------------
// Input: shards and their token metadata.

/// One line of a shard's `.jsonl`.
#[derive(Debug, Deserialize)]
struct Line {
    source: String,
    kind: String,
    tokens: Vec<String>,
    first_position: u64,
}

/// A shard's sequences, and the row at which each starts.
#[derive(Debug)]
struct Sequences {
    lines: Vec<Line>,
    starts: Vec<u64>,
}

impl Sequences {
    fn read(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut lines = Vec::new();
        let mut starts = Vec::new();
        let mut rows = 0u64;
        for (i, text) in std::io::BufReader::new(file).lines().enumerate() {
            let n = i + 1;
            let text = text.map_err(|e| Error::format(path, format!("line {n}: {e}")))?;
            if text.trim().is_empty() {
                continue;
            }
            let line: Line = serde_json::from_str(&text).map_err(|e| {
                let msg = e.to_string();
                let suffix = format!(" at line {} column {}", e.line(), e.column());
                let msg = msg.strip_suffix(&suffix).unwrap_or(&msg);
                Error::format(
                    path,
                    format!("line {n}: {msg} (column {}); expected an object with `source`, `kind`, `tokens` and `first_position`", e.column()),
                )
            })?;
            starts.push(rows);
            rows += line.tokens.len() as u64;
            lines.push(line);
        }
        Ok(Self { lines, starts })
    }

    fn rows(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
            + self.lines.last().map_or(0, |l| l.tokens.len() as u64)
    }

    /// The line holding `row`, and the token's index in it.
    fn locate(&self, row: u64) -> Option<(usize, usize)> {
        let line = self.starts.partition_point(|&s| s <= row).checked_sub(1)?;
        let j = (row - self.starts[line]) as usize;
        (j < self.lines[line].tokens.len()).then_some((line, j))
    }
}

/// A shard and its token file.
#[derive(Debug)]
struct Input {
    shard: Shard,
    jsonl: PathBuf,
    name: String,
}

fn list_inputs(dir: &Path, width: usize, dict: &Path) -> Result<Vec<Input>> {
    if !dir.is_dir() {
        return Err(Error::format(
            dir,
            "is not a folder (expected shard-NNNNN.npy activations with shard-NNNNN.jsonl tokens)",
        ));
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("shard-") && name.ends_with(".npy") {
            names.push(name);
        }
    }
    names.sort();
    if names.is_empty() {
        return Err(Error::format(
            dir,
            "holds no activation shards (shard-NNNNN.npy files)",
        ));
    }
    let mut inputs = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(&name);
        let shard = Shard::open(&path, None)?;
        if shard.width != width {
            return Err(Error::format(
                &path,
                format!(
                    "has rows of width {}, but {} reads width {width}",
                    shard.width,
                    dict.display()
                ),
            ));
        }
        let jsonl = path.with_extension("jsonl");
        if !jsonl.is_file() {
            return Err(Error::format(
                &jsonl,
                format!("is missing: every shard needs its tokens beside it ({name})"),
            ));
        }
        let seqs = Sequences::read(&jsonl)?;
        if seqs.rows() != shard.rows {
            return Err(Error::format(
                &jsonl,
                format!(
                    "its {} lines hold {} tokens, but {name} has {} rows",
                    seqs.lines.len(),
                    seqs.rows(),
                    shard.rows
                ),
            ));
        }
        inputs.push(Input { shard, jsonl, name });
    }
    Ok(inputs)
}

fn read_collector_meta(dir: &Path) -> Result<Option<serde_json::Value>> {
    let path = dir.join("meta.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&path, format!("is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(Error::format(&path, "is not a JSON object"));
    }
    Ok(Some(v))
}

// ---------------------------------------------------------------------------------------------
// The streaming pass.

/// One activation of one feature, ordered by value, then earlier rows first.
#[derive(Debug, Clone, Copy)]
struct Hit {
    act: f32,
    /// Row over all shards.
    row: u64,
}

impl Ord for Hit {
    fn cmp(&self, other: &Self) -> Ordering {
        self.act
            .total_cmp(&other.act)
            .then_with(|| other.row.cmp(&self.row))
    }
}
impl PartialOrd for Hit {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Hit {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Hit {}

/// A histogram whose power-of-two bin width doubles (merging bins) as larger values arrive.
#[derive(Debug, Clone)]
struct Bins {
    width: f64,
    counts: [u64; BINS],
}

impl Bins {
    fn add(&mut self, v: f32) {
        let v = f64::from(v);
        if self.width == 0.0 {
            // The smallest power of two with v < BINS·w.
            let mut w = (v / BINS as f64).log2().floor().exp2();
            while v >= w * BINS as f64 {
                w *= 2.0;
            }
            self.width = w;
        }
        while v >= self.width * BINS as f64 {
            for i in 0..BINS / 2 {
                self.counts[i] = self.counts[2 * i] + self.counts[2 * i + 1];
            }
            self.counts[BINS / 2..].fill(0);
            self.width *= 2.0;
        }
        // Exact: dividing by a power of two only shifts the exponent.
        let i = ((v / self.width) as usize).min(BINS - 1);
        self.counts[i] += 1;
    }

    fn finish(&self, max: f32) -> Histogram {
        if self.width == 0.0 {
            return Histogram {
                bin_width: 0.0,
                counts: Vec::new(),
            };
        }
        let last = ((f64::from(max) / self.width) as usize).min(BINS - 1);
        Histogram {
            bin_width: self.width,
            counts: self.counts[..=last].to_vec(),
        }
    }
}

#[derive(Debug, Clone)]
struct Stat {
    count: u64,
    max: f32,
    bins: Bins,
    top: BinaryHeap<Reverse<Hit>>,
}

impl Stat {
    fn new() -> Self {
        Self {
            count: 0,
            max: 0.0,
            bins: Bins {
                width: 0.0,
                counts: [0; BINS],
            },
            top: BinaryHeap::new(),
        }
    }

    fn add(&mut self, act: f32, row: u64, keep: usize) {
        self.count += 1;
        if act > self.max {
            self.max = act;
        }
        self.bins.add(act);
        let hit = Hit { act, row };
        if self.top.len() < keep {
            self.top.push(Reverse(hit));
        } else if self.top.peek().is_some_and(|Reverse(min)| hit > *min) {
            self.top.pop();
            self.top.push(Reverse(hit));
        }
    }

    /// The kept hits, largest first.
    fn sorted(&self) -> Vec<Hit> {
        let mut v: Vec<Hit> = self.top.iter().map(|r| r.0).collect();
        v.sort_by(|a, b| b.cmp(a));
        v
    }
}

/// Reads rows `start..start + count` of a shard and encodes them.
fn encode_rows(
    dict: &tiller_runtime::Dictionary,
    shard: &Shard,
    start: u64,
    count: usize,
    buf: &mut Vec<f32>,
) -> Result<ndarray::Array2<f32>> {
    buf.resize(count * shard.width, 0.0);
    shard.read(start, count, buf)?;
    let x = ArrayView2::from_shape((count, shard.width), buf.as_slice())
        .map_err(|e| Error::format(&shard.path, e.to_string()))?;
    let e = dict.encode(x).map_err(|e| {
        Error::format(
            &shard.path,
            format!("encoding rows {start}..{}: {e}", start + count as u64),
        )
    })?;
    Ok(e.acts)
}

// ---------------------------------------------------------------------------------------------
// Labels.

fn is_special(w: &str) -> bool {
    let bracketed = |open: char, close: char| {
        w.len() > 2 && w.starts_with(open) && w.ends_with(close) && !w[1..w.len() - 1].contains(' ')
    };
    w.is_empty() || bracketed('[', ']') || bracketed('<', '>')
}

fn is_punctuation(w: &str) -> bool {
    !w.chars().any(char::is_alphanumeric)
}

/// The whole word around token `j`: a WordPiece word is its first piece and the `##` pieces after.
fn whole_word(tokens: &[String], j: usize) -> String {
    let mut s = j;
    while s > 0 && tokens[s].starts_with("##") {
        s -= 1;
    }
    let mut e = j + 1;
    while e < tokens.len() && tokens[e].starts_with("##") {
        e += 1;
    }
    tokens[s..e]
        .iter()
        .map(|t| t.strip_prefix("##").unwrap_or(t))
        .collect()
}

fn choose_label(weights: &HashMap<String, f64>) -> Vec<LabelWord> {
    let total: f64 = weights.values().sum();
    if total <= 0.0 {
        return Vec::new();
    }
    let mut all: Vec<(&String, f64)> = weights.iter().map(|(w, v)| (w, *v)).collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let best = all[0].1;
    let good: Vec<(&String, f64)> = all
        .iter()
        .copied()
        .filter(|(w, v)| !is_special(w) && !is_punctuation(w) && *v >= 0.1 * best)
        .collect();
    let chosen = if good.is_empty() { all } else { good };
    chosen
        .into_iter()
        .take(3)
        .map(|(w, v)| LabelWord {
            word: w.clone(),
            share: v / total,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Building.

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
fn columns_of(
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
struct Rows {
    inputs: Vec<Input>,
    /// Row (over all shards) of each shard's first row.
    bases: Vec<u64>,
    /// Rows read from each shard (fewer than it has past `--max-rows`).
    used: Vec<u64>,
    total: u64,
}

impl Rows {
    fn new(inputs: Vec<Input>, max_rows: Option<u64>) -> Self {
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
    fn locate(&self, row: u64) -> (usize, u64) {
        let s = self.bases.partition_point(|&b| b <= row).saturating_sub(1);
        (s, row - self.bases[s])
    }
}

/// Pass 1: every row encoded once, folded into per-feature statistics.
fn scan(dict: &tiller_runtime::Dictionary, rows: &Rows, opts: &Options) -> Result<Vec<Stat>> {
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
struct Wanted {
    /// Index among the chosen features.
    k: usize,
    rank: usize,
    hit: Hit,
    /// Row in the shard.
    row: u64,
    line: usize,
    /// The top token's index in its line, and the window `j0..j1`.
    j: usize,
    j0: usize,
    j1: usize,
}

type Gathered = (Vec<Vec<Context>>, Vec<HashMap<String, f64>>);

/// Pass 2, over the shards holding top rows of the chosen features: the contexts (their windows
/// encoded again) and the weight of each whole word among the top rows, per chosen feature.
fn gather(
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
fn kinds_of(contexts: &[Context]) -> Vec<KindCount> {
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

fn abbreviate(ids: &[u32]) -> String {
    let shown: Vec<String> = ids.iter().take(12).map(u32::to_string).collect();
    if ids.len() > 12 {
        format!("{}, …", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

// ---------------------------------------------------------------------------------------------
// HTML.

/// Escapes text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A token as shown: `##` dropped from continuation pieces, whitespace made visible.
fn shown_token(t: &str) -> String {
    let t = t.strip_prefix("##").unwrap_or(t);
    let mut o = String::with_capacity(t.len());
    for c in t.chars() {
        match c {
            '\n' => o.push('↵'),
            '\t' => o.push('⇥'),
            '\r' => {}
            c if c.is_control() => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    esc(&o)
}

/// `v` with `sig` significant digits, without exponent for ordinary magnitudes.
fn num(v: f64, sig: usize) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let mag = v.abs().log10().floor() as i32;
    if !(-4..6).contains(&mag) {
        return format!("{:.*e}", sig.saturating_sub(1), v);
    }
    let decimals = (sig as i32 - 1 - mag).max(0) as usize;
    format!("{v:.decimals$}")
}

fn pct(v: f64) -> String {
    if v == 0.0 {
        "0%".into()
    } else {
        format!("{}%", num(v * 100.0, 3))
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut o = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            o.push(',');
        }
        o.push(c);
    }
    o
}

const CSS: &str = r#"
:root { --fg:#1d2433; --muted:#5f6b7a; --bg:#f4f5f7; --card:#fff; --line:#dde1e6; --soft:#eef0f3;
        --accent:#c2410c; --hl:234,88,12; --chip:#eef2ff; --chipfg:#3730a3; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
.top { background:var(--card); border-bottom:1px solid var(--line); }
.wrap { max-width:1200px; margin:0 auto; padding:0 28px; }
.top .wrap { padding-top:22px; padding-bottom:18px; }
h1 { margin:0; font-size:21px; font-weight:650; letter-spacing:-.01em; }
h1 small { font-weight:400; color:var(--muted); font-size:15px; margin-left:6px; }
.sub { color:var(--muted); margin-top:3px; }
.sub code { background:var(--soft); border-radius:4px; padding:0 5px; font-size:12.5px; }
.totals { display:flex; flex-wrap:wrap; gap:10px 36px; margin:16px 0 0; padding:0; }
.totals div { margin:0; }
.totals dt { color:var(--muted); font-size:11px; text-transform:uppercase; letter-spacing:.06em; }
.totals dd { margin:0; font-size:19px; font-weight:600; font-variant-numeric:tabular-nums; }
nav.index { display:flex; flex-wrap:wrap; gap:6px; padding:14px 0 4px; }
nav.index a { text-decoration:none; color:var(--fg); background:var(--card); border:1px solid var(--line);
              border-radius:999px; padding:2px 10px; font-size:12.5px; white-space:nowrap; }
nav.index a b { color:var(--accent); font-weight:600; margin-right:4px; }
nav.index a:hover { border-color:var(--accent); }
#filter { margin-top:14px; width:320px; max-width:100%; padding:6px 10px; border:1px solid var(--line);
          border-radius:6px; font:inherit; }
main.wrap { padding-top:10px; padding-bottom:48px; }
section.feature { background:var(--card); border:1px solid var(--line); border-radius:10px;
                  padding:16px 20px 10px; margin:14px 0; }
.fhead { display:flex; align-items:flex-start; justify-content:space-between; gap:24px; }
.title { display:flex; align-items:baseline; flex-wrap:wrap; gap:4px 12px; }
.fid { font-weight:700; font-size:17px; color:var(--accent); text-decoration:none; }
.label { font-size:17px; font-weight:600; }
.label.none { color:var(--muted); font-weight:400; font-style:italic; }
.given { background:var(--chip); color:var(--chipfg); border-radius:4px; padding:1px 7px; font-size:12.5px; }
dl.nums { display:flex; flex-wrap:wrap; gap:6px 26px; margin:10px 0 0; }
dl.nums div { margin:0; }
dl.nums dt { color:var(--muted); font-size:11px; text-transform:uppercase; letter-spacing:.06em; }
dl.nums dd { margin:0; font-weight:600; font-variant-numeric:tabular-nums; }
.kinds span { display:inline-block; background:var(--soft); border-radius:4px; padding:0 6px; margin-right:4px;
              font-weight:500; }
figure.hist { margin:0; flex:none; text-align:right; }
figure.hist figcaption { color:var(--muted); font-size:11px; }
svg rect.bar { fill:rgb(var(--hl)); opacity:.8; }
svg rect.bar:hover { opacity:1; }
svg .axis { stroke:#9aa4b1; stroke-width:1; }
svg text { fill:var(--muted); font-size:10px; font-family:inherit; }
ol.contexts { list-style:none; margin:12px 0 0; padding:0; }
li.ctx { display:grid; grid-template-columns:64px 70px 1fr; gap:12px; align-items:baseline;
         padding:5px 0; border-top:1px solid var(--soft); }
.act { text-align:right; font-variant-numeric:tabular-nums; font-weight:600; font-size:12.5px; }
.kind { color:var(--muted); font-size:12px; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.text { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace; font-size:13px;
        line-height:1.75; overflow-wrap:anywhere; }
.tok { border-radius:3px; padding:1px 1px; }
.tok.top { outline:2px solid var(--accent); outline-offset:0; }
.gap { color:#a0a8b3; }
p.empty { color:var(--muted); font-style:italic; margin:10px 0 6px; }
footer { color:var(--muted); font-size:12px; padding:0 0 28px; }
"#;

const SCRIPT: &str = r#"
(function () {
  var box = document.getElementById('filter');
  box.hidden = false;
  box.addEventListener('input', function () {
    var q = box.value.toLowerCase();
    document.querySelectorAll('section.feature').forEach(function (s) {
      s.hidden = q !== '' && s.getAttribute('data-search').indexOf(q) < 0;
    });
  });
})();
"#;

fn histogram_svg(f: &Feature) -> String {
    let (w, h, pad) = (260.0f64, 64.0f64, 14.0f64);
    let mut o = String::new();
    let counts = &f.histogram.counts;
    let n = counts.len().max(1) as f64;
    let top = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let _ = write!(
        o,
        r#"<svg class="histogram" width="{w}" height="{}" viewBox="0 0 {w} {}" role="img" aria-label="histogram of nonzero activations">"#,
        h + pad,
        h + pad
    );
    let bw = w / n;
    for (i, &c) in counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let bh = (c as f64 / top * (h - 2.0)).max(1.5);
        let lo = i as f64 * f.histogram.bin_width;
        let hi = lo + f.histogram.bin_width;
        let _ = write!(
            o,
            r#"<rect class="bar" x="{:.2}" y="{:.2}" width="{:.2}" height="{bh:.2}"><title>[{}, {}): {}</title></rect>"#,
            i as f64 * bw + 0.5,
            h - bh,
            (bw - 1.0).max(0.5),
            num(lo, 3),
            num(hi, 3),
            thousands(c)
        );
    }
    let _ = write!(
        o,
        r#"<line class="axis" x1="0" y1="{h}" x2="{w}" y2="{h}"/><text x="0" y="{}">0</text><text x="{w}" y="{}" text-anchor="end">{}</text></svg>"#,
        h + 11.0,
        h + 11.0,
        num(n * f.histogram.bin_width, 3)
    );
    o
}

fn render_context(o: &mut String, c: &Context, max: f32) {
    let _ = write!(
        o,
        r#"<li class="ctx" title="{} · {} row {} · position {}"><span class="act">{}</span><span class="kind">{}</span><span class="text">"#,
        esc(&c.source),
        esc(&c.shard),
        c.row,
        c.position,
        num(f64::from(c.activation), 3),
        esc(&c.kind)
    );
    if c.window_start > 0 {
        o.push_str(r#"<span class="gap">… </span>"#);
    }
    for (i, (t, &a)) in c.tokens.iter().zip(&c.activations).enumerate() {
        if i > 0 && !t.starts_with("##") {
            o.push(' ');
        }
        let alpha = if max > 0.0 {
            (a / max).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let _ = write!(
            o,
            r#"<span class="tok{}" data-act="{a}" title="{} · {}""#,
            if i == c.top { " top" } else { "" },
            esc(t),
            num(f64::from(a), 3)
        );
        if alpha > 0.0 {
            let _ = write!(o, r#" style="background:rgba(var(--hl),{alpha:.3})""#);
        }
        let _ = write!(o, ">{}</span>", shown_token(t));
    }
    if c.window_start + c.tokens.len() < c.sequence_len {
        o.push_str(r#"<span class="gap"> …</span>"#);
    }
    o.push_str("</span></li>\n");
}

fn render_feature(o: &mut String, f: &Feature, rows: u64) {
    let search = format!(
        "{} {} {}",
        f.id,
        f.label,
        f.given_label.as_deref().unwrap_or("")
    )
    .to_lowercase();
    let _ = write!(
        o,
        r#"<section class="feature" id="f-{}" data-feature="{}" data-search="{}">"#,
        f.id,
        f.id,
        esc(&search)
    );
    o.push_str(r#"<div class="fhead"><div><div class="title">"#);
    let _ = write!(o, r##"<a class="fid" href="#f-{}">#{}</a>"##, f.id, f.id);
    if f.label.is_empty() {
        o.push_str(r#"<span class="label none">never fired</span>"#);
    } else {
        let shares: Vec<String> = f
            .label_words
            .iter()
            .map(|w| format!("{} {}", w.word, pct(w.share)))
            .collect();
        let _ = write!(
            o,
            r#"<span class="label" title="share of the top activations: {}">{}</span>"#,
            esc(&shares.join(", ")),
            esc(&f.label)
        );
    }
    if let Some(g) = &f.given_label {
        let _ = write!(
            o,
            r#"<span class="given" title="label stored in the dictionary">{}</span>"#,
            esc(g)
        );
    }
    o.push_str("</div>");
    let shown = f.contexts.len();
    let kinds: Vec<String> = f
        .kinds
        .iter()
        .map(|k| format!("<span>{} {}/{shown}</span>", esc(&k.kind), k.count))
        .collect();
    let _ = write!(
        o,
        r#"<dl class="nums"><div><dt>density</dt><dd>{}</dd></div><div><dt>active on</dt><dd>{} of {}</dd></div><div><dt>max</dt><dd>{}</dd></div>{}<div class="kinds"><dt>top contexts</dt><dd>{}</dd></div></dl></div>"#,
        pct(f.density),
        thousands(f.count),
        thousands(rows),
        num(f64::from(f.max), 4),
        if f.column == f.id as usize {
            String::new()
        } else {
            format!("<div><dt>column</dt><dd>{}</dd></div>", f.column)
        },
        if kinds.is_empty() {
            "none".to_string()
        } else {
            kinds.join("")
        }
    );
    if f.count > 0 {
        let _ = write!(
            o,
            r#"<figure class="hist">{}<figcaption>nonzero activations ({})</figcaption></figure>"#,
            histogram_svg(f),
            thousands(f.count)
        );
    }
    o.push_str("</div>\n");
    if f.contexts.is_empty() {
        o.push_str(r#"<p class="empty">No contexts: this feature never fired on these rows.</p>"#);
    } else {
        o.push_str("<ol class=\"contexts\">\n");
        for c in &f.contexts {
            render_context(o, c, f.max);
        }
        o.push_str("</ol>");
    }
    o.push_str("</section>\n");
}

/// The page: one self-contained HTML document.
pub fn render_html(d: &Dashboard) -> String {
    let mut o = String::with_capacity(64 * 1024);
    let name = Path::new(&d.dictionary).file_name().map_or_else(
        || d.dictionary.clone(),
        |n| n.to_string_lossy().into_owned(),
    );
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{} · Tiller feature dashboard</title>\n<style>{CSS}</style>\n</head>\n<body>\n",
        esc(&name)
    );
    o.push_str(r#"<header class="top"><div class="wrap">"#);
    let _ = write!(
        o,
        "<h1>Tiller feature dashboard<small>{}</small></h1>",
        esc(&name)
    );
    let mut facts = vec![format!("{} · {}", esc(&d.kind), esc(&d.activation))];
    if !d.model.is_empty() {
        facts.push(format!("model <code>{}</code>", esc(&d.model)));
    }
    if !d.hook_in.is_empty() {
        facts.push(format!("hook <code>{}</code>", esc(&d.hook_in)));
    }
    facts.push(format!("activations <code>{}</code>", esc(&d.activations)));
    if let Some(serde_json::Value::Object(m)) = &d.collector {
        // The collector's own record of where the rows come from; its counts are in the totals.
        for k in ["model", "hook", "layer"] {
            let Some(v) = m.get(k) else { continue };
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => continue,
            };
            let fact = format!("{} <code>{}</code>", esc(k), esc(&v));
            if !facts.contains(&fact) {
                facts.push(fact);
            }
        }
    }
    let _ = write!(o, r#"<div class="sub">{}</div>"#, facts.join(" · "));
    let _ = write!(
        o,
        r#"<dl class="totals"><div><dt>features</dt><dd id="d-sae">{}</dd></div><div><dt>d_in</dt><dd>{}</dd></div><div><dt>tokens</dt><dd id="rows">{}</dd></div><div><dt>shards</dt><dd>{}</dd></div><div><dt>dead</dt><dd id="dead">{}</dd></div><div><dt>mean L0</dt><dd id="l0">{}</dd></div><div><dt>shown</dt><dd>{}</dd></div></dl>"#,
        thousands(d.d_sae as u64),
        d.d_in,
        thousands(d.rows),
        d.shards,
        pct(d.dead_fraction),
        num(d.mean_l0, 4),
        d.features.len()
    );
    o.push_str(
        r#"<input id="filter" type="search" placeholder="Filter features by id or label" hidden>"#,
    );
    o.push_str("</div></header>\n<main class=\"wrap\">\n");
    if d.features.is_empty() {
        o.push_str(r#"<p class="empty">No features to show: none fired on these rows.</p>"#);
    } else {
        o.push_str(r#"<nav class="index">"#);
        for f in &d.features {
            let _ = write!(
                o,
                r##"<a href="#f-{}"><b>#{}</b>{}</a>"##,
                f.id,
                f.id,
                if f.label.is_empty() {
                    "never fired".to_string()
                } else {
                    esc(&f.label)
                }
            );
        }
        o.push_str("</nav>\n");
    }
    for f in &d.features {
        render_feature(&mut o, f, d.rows);
    }
    let _ = write!(
        o,
        "</main>\n<footer class=\"wrap\">Token shading: the feature's activation over its maximum on these rows; the top token is outlined. Written by tiller-export {}.</footer>\n<script>{SCRIPT}</script>\n</body>\n</html>\n",
        env!("CARGO_PKG_VERSION")
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_double_exactly() {
        let mut b = Bins {
            width: 0.0,
            counts: [0; BINS],
        };
        let vals = [0.1f32, 0.2, 0.05, 3.0, 0.7, 12.5, 0.001];
        for v in vals {
            b.add(v);
        }
        let h = b.finish(12.5);
        assert_eq!(h.counts.iter().sum::<u64>(), vals.len() as u64);
        for v in vals {
            let i = (f64::from(v) / h.bin_width) as usize;
            assert!(i < h.counts.len());
        }
        assert!(12.5 < h.bin_width * h.counts.len() as f64);
        assert!(12.5 >= h.bin_width * (h.counts.len() - 1) as f64);
        assert!(h.counts.len() > BINS / 2);
    }

    #[test]
    fn words_join_pieces() {
        let t: Vec<String> = ["the", "copy", "##right", "##s", "holder"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(whole_word(&t, 1), "copyrights");
        assert_eq!(whole_word(&t, 2), "copyrights");
        assert_eq!(whole_word(&t, 3), "copyrights");
        assert_eq!(whole_word(&t, 4), "holder");
    }

    #[test]
    fn labels_skip_punctuation_when_words_carry_weight() {
        let mut w = HashMap::new();
        w.insert(",".to_string(), 5.0);
        w.insert("[CLS]".to_string(), 4.0);
        w.insert("license".to_string(), 2.0);
        w.insert("copyright".to_string(), 3.0);
        let l = choose_label(&w);
        let words: Vec<&str> = l.iter().map(|w| w.word.as_str()).collect();
        assert_eq!(words, ["copyright", "license"]);
        let mut p = HashMap::new();
        p.insert(".".to_string(), 5.0);
        assert_eq!(choose_label(&p)[0].word, ".");
    }

    #[test]
    fn escapes() {
        assert_eq!(
            esc(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(shown_token("##<b>\n"), "&lt;b&gt;↵");
    }
}
