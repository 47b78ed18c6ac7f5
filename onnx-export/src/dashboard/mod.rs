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

mod build;
mod html;
mod input;
mod labels;
mod model;
mod stats;

use std::path::{Path, PathBuf};

use crate::{Error, Result};

pub use build::build;
pub use html::render_html;
pub use model::*;

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
