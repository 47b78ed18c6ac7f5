//! `tiller-export dashboard`: a ReLU SAE with known weights over synthetic shards in which the word
//! "copyright" drives one feature. Every number on the page (density, max, histogram, top contexts,
//! activations of the context tokens, dead fraction, mean L0) is compared with a float64 reference
//! computed here from the same data (absolute and relative tolerance 1e-5; counts exactly, the
//! fixture keeping every pre-activation at least 1e-3 from zero). Bad input is refused naming the
//! file; a sliced dictionary keeps its original feature ids; the page is escaped; a headless
//! Chromium renders it (skipped when absent, unless `TILLER_REQUIRE_CHROMIUM=1`).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ndarray::{Array1, Array2};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;
use tiller_export::dashboard::{self, Dashboard, Options};
use tiller_runtime::{Activation, Kind, Meta, Weights};

const D_IN: usize = 16;
const D_SAE: usize = 24;
/// The feature that reads dimension 0, which "copyright" (and, less, "license") tokens set.
const COPYRIGHT: usize = 5;
/// Features that can never fire.
const DEAD: [usize; 2] = [7, 11];
const SCRIPT_TOKEN: &str = "<script>alert(\"x\" & 'y')</script>";

/// A `.jsonl` line as the reference needs it: kind, tokens, first position.
type Line = (String, Vec<String>, u64);

/// The synthetic data set, kept whole for the reference.
struct Fixture {
    dir: tempfile::TempDir,
    dict: PathBuf,
    acts: PathBuf,
    w_enc: Array2<f32>,
    b_enc: Array1<f32>,
    /// Per shard: rows and the lines of its `.jsonl` (kind, tokens, first_position).
    shards: Vec<(Array2<f32>, Vec<Line>)>,
}

fn sentence(rng: &mut StdRng, kind: &str) -> Vec<String> {
    let words: &[&str] = match kind {
        "legal" => &[
            "the",
            "software",
            "is",
            "provided",
            "copyright",
            "copy",
            "##right",
            "license",
            "warranty",
            "holder",
            "(",
            "c",
            ")",
            ",",
            "permission",
            "granted",
        ],
        "prose" => &[
            "the",
            "cat",
            "sat",
            "on",
            "a",
            "mat",
            ".",
            ",",
            "she",
            "wrote",
            "slowly",
            "river",
            "copyright",
        ],
        _ => &[
            "fn", "main", "(", ")", "{", "}", "let", "x", "=", ";", "return", "license",
        ],
    };
    let n = rng.random_range(6..22);
    let mut t = vec!["[CLS]".to_string()];
    for _ in 0..n {
        let w = words[rng.random_range(0..words.len())];
        if w == "##right" && t.last().is_some_and(|p| p != "copy") {
            t.push("copy".into());
        }
        t.push(w.into());
    }
    if kind == "legal" && rng.random_range(0..3) == 0 {
        let at = rng.random_range(1..t.len());
        t.insert(at, SCRIPT_TOKEN.into());
    }
    t.push("[SEP]".into());
    t
}

/// The row of one token: dimension 0 says whether it is "copyright"-like, the rest is noise.
fn row_for(rng: &mut StdRng, token: &str, next: Option<&str>) -> Vec<f32> {
    let x0: f32 = match token {
        "copyright" | "##right" => rng.random_range(2.0..3.0),
        "license" => rng.random_range(1.2..1.6),
        "copy" if next == Some("##right") => rng.random_range(0.55..0.9),
        _ => rng.random_range(-1.0..0.3),
    };
    let mut r = vec![x0];
    r.extend((1..D_IN).map(|_| rng.random_range(-1.0f32..1.0)));
    r
}

/// Float64 pre-activations of one row.
fn pre(f: &Fixture, x: &[f32]) -> Vec<f64> {
    (0..D_SAE)
        .map(|j| {
            f64::from(f.b_enc[j])
                + x.iter()
                    .enumerate()
                    .map(|(i, &v)| f64::from(v) * f64::from(f.w_enc[[i, j]]))
                    .sum::<f64>()
        })
        .collect()
}

fn make_fixture(labels: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(0xda5b);
    // Feature 5 reads dimension 0 only; dead features have no weights and a negative bias; the
    // others read the noise dimensions.
    let mut w_enc = Array2::<f32>::zeros((D_IN, D_SAE));
    let mut b_enc = Array1::<f32>::zeros(D_SAE);
    for j in 0..D_SAE {
        if j == COPYRIGHT {
            w_enc[[0, j]] = 2.0;
            b_enc[j] = -1.0;
        } else if DEAD.contains(&j) {
            b_enc[j] = -1.0;
        } else {
            for i in 1..D_IN {
                w_enc[[i, j]] = rng.random_range(-0.6..0.6);
            }
            b_enc[j] = rng.random_range(-0.8..0.1);
        }
    }
    let w_dec = w_enc.t().to_owned();
    let mut meta = Meta::new(Kind::Sae, Activation::Relu, D_IN, D_SAE, D_IN);
    meta.model = "synthetic-bert".into();
    meta.hook_in = "encoder.layer.3".into();
    if labels {
        meta.labels
            .insert(COPYRIGHT as u32, "copyright notices".into());
    }
    let weights = Weights::new(w_enc.clone(), b_enc.clone(), w_dec, Array1::zeros(D_IN));
    let dict = dir.path().join("sae.onnx");
    tiller_runtime::dictionary::write_dictionary(&meta, &weights, &dict).unwrap();

    let acts = dir.path().join("acts");
    std::fs::create_dir(&acts).unwrap();
    let mut f = Fixture {
        dir,
        dict,
        acts,
        w_enc,
        b_enc,
        shards: Vec::new(),
    };
    for (s, lines) in [14usize, 11].into_iter().enumerate() {
        let mut rows: Vec<f32> = Vec::new();
        let mut meta_lines = Vec::new();
        let mut text = String::new();
        for l in 0..lines {
            let kind = ["legal", "prose", "code", "legal"][(l + s) % 4];
            let tokens = sentence(&mut rng, kind);
            for (j, t) in tokens.iter().enumerate() {
                // Keep every pre-activation clear of zero, so float32 and float64 agree on signs.
                loop {
                    let r = row_for(&mut rng, t, tokens.get(j + 1).map(String::as_str));
                    if pre(&f, &r).iter().all(|p| p.abs() > 1e-3) {
                        rows.extend(r);
                        break;
                    }
                }
            }
            let first = rng.random_range(0..3u64);
            text.push_str(
                &json!({"source": format!("corpus/{kind}-{s}-{l}.txt"), "kind": kind,
                        "tokens": tokens, "first_position": first, "extra": {"ignored": true}})
                .to_string(),
            );
            text.push('\n');
            meta_lines.push((kind.to_string(), tokens, first));
        }
        let n = rows.len() / D_IN;
        let x = Array2::from_shape_vec((n, D_IN), rows).unwrap();
        tiller_export::npy::write(&f.acts.join(format!("shard-{s:05}.npy")), &x).unwrap();
        std::fs::write(f.acts.join(format!("shard-{s:05}.jsonl")), text).unwrap();
        f.shards.push((x, meta_lines));
    }
    std::fs::write(
        f.acts.join("meta.json"),
        json!({"model": "synthetic-bert", "layer": 3, "unknown": [1, 2]}).to_string(),
    )
    .unwrap();
    f
}

/// What the reference knows about each row.
struct RefRow {
    shard: usize,
    row: u64,
    global: u64,
    acts: Vec<f64>,
    kind: String,
    /// The token's line and index in it.
    line: usize,
    j: usize,
}

fn reference(f: &Fixture) -> Vec<RefRow> {
    let mut out = Vec::new();
    let mut global = 0;
    for (s, (x, lines)) in f.shards.iter().enumerate() {
        let mut row = 0u64;
        for (line, (kind, tokens, _)) in lines.iter().enumerate() {
            for j in 0..tokens.len() {
                let acts = pre(f, x.row(row as usize).as_slice().unwrap())
                    .into_iter()
                    .map(|p| p.max(0.0))
                    .collect();
                out.push(RefRow {
                    shard: s,
                    row,
                    global,
                    acts,
                    kind: kind.clone(),
                    line,
                    j,
                });
                row += 1;
                global += 1;
            }
        }
    }
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * (1.0 + b.abs())
}

/// The top `k` rows of feature `c` in the reference, largest first, earlier rows winning ties.
fn ref_top(rows: &[RefRow], c: usize, k: usize) -> Vec<&RefRow> {
    let mut v: Vec<&RefRow> = rows.iter().filter(|r| r.acts[c] > 0.0).collect();
    v.sort_by(|a, b| {
        b.acts[c]
            .total_cmp(&a.acts[c])
            .then(a.global.cmp(&b.global))
    });
    // The fixture must make the top k unambiguous at float32 precision.
    for w in v.windows(2).take(k) {
        assert!(
            w[0].acts[c] - w[1].acts[c] > 2e-5,
            "fixture: near tie in feature {c}"
        );
    }
    v.truncate(k);
    v
}

fn check_against_reference(f: &Fixture, d: &Dashboard, contexts: usize, window: usize) {
    let rows = reference(f);
    let n = rows.len() as u64;
    assert_eq!(d.rows, n);
    assert_eq!(d.d_sae, D_SAE);
    assert_eq!(d.d_in, D_IN);
    assert_eq!(d.shards, 2);
    let counts: Vec<u64> = (0..D_SAE)
        .map(|c| rows.iter().filter(|r| r.acts[c] > 0.0).count() as u64)
        .collect();
    let dead = counts.iter().filter(|&&c| c == 0).count();
    assert_eq!(
        dead,
        DEAD.len(),
        "fixture: only the dead features never fire"
    );
    assert!(close(d.dead_fraction, dead as f64 / D_SAE as f64));
    assert!(close(
        d.mean_l0,
        counts.iter().sum::<u64>() as f64 / n as f64
    ));
    for feat in &d.features {
        let c = feat.column;
        assert_eq!(feat.id as usize, c);
        assert_eq!(feat.count, counts[c], "count of feature {c}");
        assert!(close(feat.density, counts[c] as f64 / n as f64));
        let max = rows.iter().map(|r| r.acts[c]).fold(0.0, f64::max);
        assert!(
            close(f64::from(feat.max), max),
            "max of {c}: {} vs {max}",
            feat.max
        );
        // Histogram: sums to the count; power-of-two bins with the max in the last one; each bin
        // holds the reference's count (values within 1e-5 of an edge may fall on either side).
        let h = &feat.histogram;
        assert_eq!(h.counts.iter().sum::<u64>(), counts[c]);
        if counts[c] == 0 {
            assert!(h.counts.is_empty() && feat.contexts.is_empty() && feat.max == 0.0);
            continue;
        }
        assert!(h.counts.len() <= dashboard::BINS && h.counts.len() > dashboard::BINS / 2);
        assert_eq!(
            h.bin_width.log2().fract(),
            0.0,
            "bin width is a power of two"
        );
        assert!(max < h.bin_width * h.counts.len() as f64 + 1e-5);
        assert!(max >= h.bin_width * (h.counts.len() - 1) as f64 - 1e-5);
        let mut expect = vec![0i64; h.counts.len()];
        let mut ambiguous = 0i64;
        for r in rows.iter().filter(|r| r.acts[c] > 0.0) {
            let q = r.acts[c] / h.bin_width;
            if (q - q.round()).abs() * h.bin_width < 1e-5 {
                ambiguous += 1;
            }
            expect[(q as usize).min(h.counts.len() - 1)] += 1;
        }
        let off: i64 = expect
            .iter()
            .zip(&h.counts)
            .map(|(e, &g)| (e - g as i64).abs())
            .sum();
        assert!(
            off <= 2 * ambiguous,
            "histogram of {c}: {expect:?} vs {:?}",
            h.counts
        );
        // The contexts are exactly the reference's top rows, with their windows.
        let top = ref_top(&rows, c, contexts);
        assert_eq!(feat.contexts.len(), top.len());
        for (ctx, r) in feat.contexts.iter().zip(&top) {
            assert_eq!(
                (ctx.shard.as_str(), ctx.row),
                (format!("shard-{:05}.npy", r.shard).as_str(), r.row),
                "top rows of feature {c}"
            );
            assert!(close(f64::from(ctx.activation), r.acts[c]));
            let (kind, tokens, first) = &f.shards[r.shard].1[r.line];
            assert_eq!(&ctx.kind, kind);
            assert_eq!(ctx.sequence, r.line);
            assert_eq!(ctx.token_index, r.j);
            assert_eq!(ctx.position, first + r.j as u64);
            let j0 = r.j.saturating_sub(window);
            let j1 = (r.j + window + 1).min(tokens.len());
            assert_eq!(ctx.window_start, j0);
            assert_eq!(ctx.top, r.j - j0);
            assert_eq!(ctx.tokens, tokens[j0..j1]);
            assert_eq!(ctx.activations.len(), ctx.tokens.len());
            // Window rows: the rows before and after the top one in the same shard.
            for (i, &a) in ctx.activations.iter().enumerate() {
                let g = (r.global as i64 + i as i64 - ctx.top as i64) as usize;
                assert!(
                    close(f64::from(a), rows[g].acts[c]),
                    "feature {c}: window activation {a} vs {}",
                    rows[g].acts[c]
                );
            }
        }
        let mut kinds = std::collections::BTreeMap::new();
        for r in &top {
            *kinds.entry(r.kind.clone()).or_insert(0usize) += 1;
        }
        let got: std::collections::BTreeMap<String, usize> = feat
            .kinds
            .iter()
            .map(|k| (k.kind.clone(), k.count))
            .collect();
        assert_eq!(got, kinds);
    }
}

#[test]
fn dashboard_matches_a_float64_reference() {
    let f = make_fixture(false);
    let out = f.dir.path().join("dashboard.html");
    let opts = Options {
        batch: 37, // batches that straddle sequences and shards
        ..Options::new(&f.dict, &f.acts, &out)
    };
    let d = dashboard::write(&opts).unwrap();
    let rows = reference(&f);
    // Default choice: every feature that fired, densest first (lower id on ties).
    let mut alive: Vec<(u64, usize)> = (0..D_SAE)
        .map(|c| (rows.iter().filter(|r| r.acts[c] > 0.0).count() as u64, c))
        .filter(|(n, _)| *n > 0)
        .collect();
    alive.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let chosen: Vec<usize> = d.features.iter().map(|f| f.column).collect();
    assert_eq!(
        chosen,
        alive.iter().map(|(_, c)| *c).collect::<Vec<_>>(),
        "features shown"
    );
    check_against_reference(&f, &d, 12, 8);

    let copy = d.features.iter().find(|x| x.column == COPYRIGHT).unwrap();
    assert!(
        copy.label.contains("copyright"),
        "auto label `{}` names copyright",
        copy.label
    );
    assert_eq!(copy.label_words[0].word, "copyright");
    assert!(copy.given_label.is_none());

    // The JSON beside the page holds the same data.
    let json: Dashboard = serde_json::from_str(
        &std::fs::read_to_string(f.dir.path().join("dashboard.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json.format, dashboard::FORMAT);
    assert_eq!(json.features.len(), d.features.len());
    assert_eq!(
        json.features[0].contexts[0].tokens,
        d.features[0].contexts[0].tokens
    );
    assert_eq!(
        json.collector.as_ref().unwrap()["model"],
        json!("synthetic-bert")
    );

    // The page: a section per feature, a span per context token, everything escaped.
    let html = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        html.matches("<section class=\"feature\"").count(),
        d.features.len()
    );
    assert!(html.contains(&format!("<section class=\"feature\" id=\"f-{COPYRIGHT}\"")));
    let tokens: usize = d
        .features
        .iter()
        .flat_map(|f| &f.contexts)
        .map(|c| c.tokens.len())
        .sum();
    assert_eq!(html.matches("<span class=\"tok").count(), tokens);
    assert_eq!(
        html.matches("<span class=\"tok top\"").count(),
        d.features.iter().map(|f| f.contexts.len()).sum::<usize>()
    );
    assert!(
        d.features
            .iter()
            .flat_map(|f| &f.contexts)
            .any(|c| c.tokens.iter().any(|t| t == SCRIPT_TOKEN)),
        "fixture: the <script> token is in a context"
    );
    assert!(!html.contains("<script>alert"));
    assert!(html.contains("&lt;script&gt;alert(&quot;x&quot; &amp; &#39;y&#39;)&lt;/script&gt;"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external resources"
    );
    // A continuation piece follows its word with no space, without its ##.
    assert!(!html.contains(">##right<"));
}

#[test]
fn cli_shows_chosen_features_and_stored_labels() {
    let f = make_fixture(true);
    let out = f.dir.path().join("page.html");
    let o = Command::new(env!("CARGO_BIN_EXE_tiller-export"))
        .args(["dashboard", "--dictionary"])
        .arg(&f.dict)
        .arg("--activations")
        .arg(&f.acts)
        .arg("-o")
        .arg(&out)
        .args(["--features", "5,3,7", "--contexts", "5", "--window", "3"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("page.json"), "{stdout}");
    let d: Dashboard =
        serde_json::from_str(&std::fs::read_to_string(f.dir.path().join("page.json")).unwrap())
            .unwrap();
    assert_eq!(
        d.features.iter().map(|f| f.id).collect::<Vec<_>>(),
        [5, 3, 7]
    );
    check_against_reference(&f, &d, 5, 3);
    assert_eq!(
        d.features[0].given_label.as_deref(),
        Some("copyright notices")
    );
    // A dead feature asked for by id: shown, with no contexts.
    assert_eq!(d.features[2].count, 0);
    assert!(d.features[2].contexts.is_empty() && d.features[2].label.is_empty());
    let html = std::fs::read_to_string(&out).unwrap();
    assert!(html.contains("copyright notices"));
    assert!(html.contains("id=\"f-7\""));

    // --max-rows: only the first rows count.
    let o = Command::new(env!("CARGO_BIN_EXE_tiller-export"))
        .args(["dashboard", "--dictionary"])
        .arg(&f.dict)
        .arg("--activations")
        .arg(&f.acts)
        .arg("-o")
        .arg(&out)
        .args(["--max-rows", "50", "--top-features", "3"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d: Dashboard =
        serde_json::from_str(&std::fs::read_to_string(f.dir.path().join("page.json")).unwrap())
            .unwrap();
    assert_eq!(d.rows, 50);
    assert_eq!(d.shards, 1);
    assert_eq!(d.features.len(), 3);
    let rows = reference(&f);
    for feat in &d.features {
        let n = rows[..50]
            .iter()
            .filter(|r| r.acts[feat.column] > 0.0)
            .count() as u64;
        assert_eq!(feat.count, n);
        assert!(
            feat.contexts
                .iter()
                .all(|c| c.shard == "shard-00000.npy" && c.row < 50)
        );
    }
}

#[test]
fn sliced_dictionaries_keep_their_original_ids() {
    let f = make_fixture(true);
    let sliced = f.dir.path().join("sliced.onnx");
    let o = Command::new(env!("CARGO_BIN_EXE_tiller-export"))
        .arg("slice")
        .arg(&f.dict)
        .args(["--features", "3,5,9", "-o"])
        .arg(&sliced)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = |dict: &Path, name: &str| {
        let opts = Options {
            features: Some(vec![9, 5]),
            ..Options::new(dict, &f.acts, f.dir.path().join(name))
        };
        dashboard::write(&opts).unwrap()
    };
    let full = run(&f.dict, "full.html");
    let part = run(&sliced, "part.html");
    assert_eq!(part.d_sae, 3);
    assert_eq!(
        part.features.iter().map(|x| x.id).collect::<Vec<_>>(),
        [9, 5]
    );
    assert_eq!(
        part.features.iter().map(|x| x.column).collect::<Vec<_>>(),
        [2, 1]
    );
    for (a, b) in full.features.iter().zip(&part.features) {
        assert_eq!((a.id, a.count, &a.label), (b.id, b.count, &b.label));
        assert!(close(f64::from(a.max), f64::from(b.max)));
        let rows = |x: &dashboard::Feature| -> Vec<(String, u64)> {
            x.contexts
                .iter()
                .map(|c| (c.shard.clone(), c.row))
                .collect()
        };
        assert_eq!(rows(a), rows(b));
    }
    assert_eq!(
        part.features[1].given_label.as_deref(),
        Some("copyright notices")
    );
    let html = std::fs::read_to_string(f.dir.path().join("part.html")).unwrap();
    assert!(html.contains("id=\"f-9\"") && html.contains("id=\"f-5\""));
    let e = error_of(&f, |o| {
        o.dictionary = sliced.clone();
        o.features = Some(vec![4]);
    });
    assert!(
        e.contains("sliced.onnx") && e.contains("feature 4 is not in this sliced dictionary"),
        "{e}"
    );
}

fn error_of(f: &Fixture, tweak: impl FnOnce(&mut Options)) -> String {
    let mut opts = Options::new(&f.dict, &f.acts, f.dir.path().join("e.html"));
    tweak(&mut opts);
    match dashboard::write(&opts) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn edit_line(path: &Path, n: usize, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[n - 1] = to.to_string();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

#[test]
fn bad_input_is_refused_naming_the_file() {
    let f = make_fixture(false);
    let jsonl = f.acts.join("shard-00001.jsonl");
    let original = std::fs::read_to_string(&jsonl).unwrap();

    let e = error_of(&f, |o| o.activations = f.dir.path().join("nowhere"));
    assert!(e.contains("nowhere") && e.contains("not a folder"), "{e}");

    let empty = f.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = error_of(&f, |o| o.activations = empty.clone());
    assert!(
        e.contains("empty") && e.contains("no activation shards"),
        "{e}"
    );

    let e = error_of(&f, |o| o.features = Some(vec![3, 24]));
    assert!(
        e.contains("sae.onnx") && e.contains("feature 24") && e.contains("d_sae = 24"),
        "{e}"
    );

    // A line with one token less than the shard's rows.
    let first: serde_json::Value = serde_json::from_str(original.lines().next().unwrap()).unwrap();
    let mut shorter = first.clone();
    shorter["tokens"].as_array_mut().unwrap().pop();
    edit_line(&jsonl, 1, &shorter.to_string());
    let e = error_of(&f, |_| {});
    let rows = f.shards[1].0.nrows();
    assert!(
        e.contains("shard-00001.jsonl")
            && e.contains(&format!("hold {} tokens", rows - 1))
            && e.contains(&format!("has {rows} rows")),
        "{e}"
    );

    std::fs::write(&jsonl, &original).unwrap();
    edit_line(
        &jsonl,
        3,
        "{\"source\": \"a.txt\", \"kind\": \"legal\", \"tokens\": [\"x\"",
    );
    let e = error_of(&f, |_| {});
    assert!(
        e.contains("shard-00001.jsonl") && e.contains("line 3"),
        "{e}"
    );

    let mut no_kind = first.clone();
    no_kind.as_object_mut().unwrap().remove("kind");
    std::fs::write(&jsonl, &original).unwrap();
    edit_line(&jsonl, 2, &no_kind.to_string());
    let e = error_of(&f, |_| {});
    assert!(
        e.contains("shard-00001.jsonl") && e.contains("line 2") && e.contains("`kind`"),
        "{e}"
    );

    std::fs::remove_file(&jsonl).unwrap();
    let e = error_of(&f, |_| {});
    assert!(
        e.contains("shard-00001.jsonl") && e.contains("missing"),
        "{e}"
    );
    std::fs::write(&jsonl, &original).unwrap();

    std::fs::write(f.acts.join("meta.json"), "{\"model\": ").unwrap();
    let e = error_of(&f, |_| {});
    assert!(
        e.contains("meta.json") && e.contains("not valid JSON"),
        "{e}"
    );
    std::fs::remove_file(f.acts.join("meta.json")).unwrap();

    // A shard of the wrong width, through the command line.
    let narrow = Array2::<f32>::zeros((4, D_IN - 1));
    tiller_export::npy::write(&f.acts.join("shard-00002.npy"), &narrow).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tiller-export"))
        .args(["dashboard", "--dictionary"])
        .arg(&f.dict)
        .arg("--activations")
        .arg(&f.acts)
        .arg("-o")
        .arg(f.dir.path().join("e.html"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("shard-00002.npy") && e.contains(&format!("width {}", D_IN - 1)),
        "{e}"
    );
    assert!(!f.dir.path().join("e.html").exists());
}

/// Runs `cmd`, killing it after `limit`; returns its stdout.
fn run_with_timeout(mut cmd: Command, limit: Duration) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("stdout");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = cmd
        .stdout(out)
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let ok = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.success();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (ok, std::fs::read_to_string(&out_path).unwrap_or_default())
}

fn chromium(profile: &Path) -> Option<Command> {
    let path = std::env::var_os("TILLER_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !path.is_file() {
        return None;
    }
    let mut c = Command::new(path);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg("--window-size=1280,2000");
    Some(c)
}

#[test]
fn chromium_renders_the_page() {
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-browser");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    if chromium(&work).is_none() {
        let required = std::env::var("TILLER_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "TILLER_REQUIRE_CHROMIUM=1 but no browser at /usr/bin/chromium or $TILLER_CHROMIUM"
        );
        println!(
            "skipped: no browser at /usr/bin/chromium or $TILLER_CHROMIUM (set it to a Chromium binary)"
        );
        return;
    }
    let f = make_fixture(true);
    let html = work.join("dashboard.html");
    let d = dashboard::write(&Options::new(&f.dict, &f.acts, &html)).unwrap();
    let url = format!("file://{}", html.canonicalize().unwrap().display());

    let profile = tempfile::tempdir().unwrap();
    let mut c = chromium(profile.path()).unwrap();
    c.arg("--dump-dom").arg(&url);
    let (ok, dom) = run_with_timeout(c, Duration::from_secs(120));
    assert!(ok, "chromium --dump-dom failed");
    assert_eq!(
        dom.matches("<section class=\"feature\"").count(),
        d.features.len(),
        "rendered DOM holds a section per feature"
    );
    assert!(dom.contains(&format!("id=\"f-{COPYRIGHT}\"")));
    assert!(dom.matches("class=\"tok top\"").count() >= d.features.len());
    assert!(dom.contains("data-act="));

    let png = work.join("dashboard.png");
    let profile = tempfile::tempdir().unwrap();
    let mut c = chromium(profile.path()).unwrap();
    c.arg(format!("--screenshot={}", png.display())).arg(&url);
    let (ok, _) = run_with_timeout(c, Duration::from_secs(120));
    assert!(ok && png.is_file(), "chromium --screenshot failed");

    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.width, 1280);
    let channels = info.color_type.samples();
    assert!(channels >= 3 && info.bit_depth == png::BitDepth::Eight);
    let mut colours = std::collections::HashMap::<[u8; 3], usize>::new();
    for px in buf[..info.buffer_size()].chunks_exact(channels) {
        *colours.entry([px[0], px[1], px[2]]).or_default() += 1;
    }
    let pixels = (info.width * info.height) as usize;
    let background = colours.values().copied().max().unwrap();
    let drawn = 1.0 - background as f64 / pixels as f64;
    println!(
        "screenshot {} ({}x{}): {:.0}% of pixels differ from the most common colour, {} colours",
        png.display(),
        info.width,
        info.height,
        100.0 * drawn,
        colours.len()
    );
    assert!(drawn > 0.15, "the screenshot looks blank");
    assert!(colours.len() > 100, "the screenshot has too few colours");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("dashboard-screenshot.png");
    std::fs::copy(&png, &target).unwrap();
    println!("screenshot copied to {}", target.display());
}
