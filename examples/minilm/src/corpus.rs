//! Real English text found on the machine, chunked for the model, and the activation collector.
//!
//! Sources, each with a *kind* used later to name and check features:
//! - `legal`: the licence texts of `/usr/share/common-licenses`, and the licence paragraphs of
//!   the `copyright` files of `/usr/share/doc` (without their names, addresses and paths);
//! - `prose`: Python's documentation topics (`pydoc_data/topics.py`), the READMEs and NEWS files
//!   of `/usr/share/doc`, and the Rust book when the toolchain ships its documentation;
//! - `code`: the modules of Python's standard library.
//!
//! ## The collector's output
//! A folder of shards: `shard-00000.npy` (`[rows, d]` float32, the residual stream at the hook
//! for every real token but `[CLS]` and `[SEP]`) and beside it `shard-00000.jsonl`, one JSON
//! object per text sequence in row order (`source`, `kind`, `tokens`, `first_position`: the model
//! position of `tokens[0]`); the shard's rows are the concatenation of the sequences' tokens.
//! `meta.json` records the model, hook, width and counts. `tiller-export train` reads the `.npy`
//! shards; `tiller-export dashboard` reads both.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use ndarray::{Array2, s};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::MiniLm;

/// One document.
#[derive(Debug, Clone)]
pub struct Document {
    /// Where it came from.
    pub source: String,
    /// `legal`, `prose` or `code`.
    pub kind: String,
    /// Its text.
    pub text: String,
}

fn read_text(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .ok()?;
        out
    } else {
        bytes
    };
    String::from_utf8(bytes)
        .ok()
        .filter(|t| !t.trim().is_empty())
}

/// The paragraphs of a Debian `copyright` file that are licence prose: no field names, e-mail
/// addresses, URLs or paths, and mostly letters.
fn licence_prose(text: &str) -> String {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let p: String = para
            .lines()
            .filter(|l| {
                let t = l.trim_start();
                !(t.is_empty()
                    || t == "."
                    || t.contains('@')
                    || t.contains("http")
                    || t.contains('/')
                    || t.split_once(':')
                        .is_some_and(|(k, _)| !k.contains(' ') && k.len() < 30))
            })
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(" ");
        let letters = p.chars().filter(|c| c.is_alphabetic() || *c == ' ').count();
        if p.len() > 80 && letters * 10 >= p.chars().count() * 9 {
            out.push(p);
        }
    }
    out.join("\n\n")
}

fn strip_html(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let mut rest = html;
    while let Some(i) = rest.find('<') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let lower = rest.get(..8).unwrap_or("").to_ascii_lowercase();
        let skip_to = if lower.starts_with("<script") {
            rest.find("</script>").map(|j| j + 9)
        } else if lower.starts_with("<style") {
            rest.find("</style>").map(|j| j + 8)
        } else {
            rest.find('>').map(|j| j + 1)
        };
        let Some(j) = skip_to else { break };
        let tag = &rest[..j];
        if tag.starts_with("<p")
            || tag.starts_with("</p")
            || tag.starts_with("<h")
            || tag.starts_with("<br")
            || tag.starts_with("<pre")
            || tag.starts_with("</pre")
        {
            out.push('\n');
        }
        rest = &rest[j..];
    }
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}

#[derive(Deserialize)]
struct PythonFacts {
    stdlib: String,
    topics: BTreeMap<String, String>,
}

fn python_facts() -> Result<PythonFacts> {
    let python = std::env::var("TILLER_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args([
            "-c",
            "import json, sysconfig, pydoc_data.topics as t; \
             print(json.dumps({'stdlib': sysconfig.get_paths()['stdlib'], 'topics': t.topics}))",
        ])
        .output()
        .with_context(|| format!("running {python} to read pydoc_data.topics"))?;
    ensure!(
        out.status.success(),
        "{python} could not read pydoc_data.topics: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).context("parsing what python printed")
}

/// The machine's corpus, about `chars_per_kind` characters of each kind, in a fixed order.
pub fn default_corpus(chars_per_kind: usize) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    let mut budget: BTreeMap<&str, usize> = BTreeMap::new();
    let mut seen = HashSet::new();
    let mut add = |docs: &mut Vec<Document>, source: String, kind: &'static str, text: String| {
        let used = budget.entry(kind).or_default();
        if *used >= chars_per_kind || !seen.insert(text.clone()) {
            return;
        }
        *used += text.len();
        docs.push(Document {
            source,
            kind: kind.into(),
            text,
        });
    };
    let sorted = |dir: &Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        v.sort();
        v
    };

    for p in sorted(Path::new("/usr/share/common-licenses")) {
        if let Some(t) = read_text(&p) {
            add(&mut docs, p.display().to_string(), "legal", t);
        }
    }
    let doc_dirs = sorted(Path::new("/usr/share/doc"));
    for d in &doc_dirs {
        let p = d.join("copyright");
        if let Some(t) = read_text(&p).map(|t| licence_prose(&t))
            && t.len() > 200
        {
            add(&mut docs, p.display().to_string(), "legal", t);
        }
    }

    let py = python_facts()?;
    for (name, text) in &py.topics {
        add(
            &mut docs,
            format!("pydoc_data.topics[{name}]"),
            "prose",
            text.clone(),
        );
    }
    let book = glob_rust_book();
    for p in book {
        if let Some(t) = read_text(&p) {
            add(&mut docs, p.display().to_string(), "prose", strip_html(&t));
        }
    }
    for d in &doc_dirs {
        for p in sorted(d) {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            if (name.starts_with("README") || name.starts_with("NEWS"))
                && p.is_file()
                && let Some(t) = read_text(&p)
            {
                add(&mut docs, p.display().to_string(), "prose", t);
            }
        }
    }

    for p in sorted(Path::new(&py.stdlib)) {
        if p.extension().is_some_and(|e| e == "py")
            && let Some(t) = read_text(&p)
        {
            add(&mut docs, p.display().to_string(), "code", t);
        }
    }
    for kind in ["legal", "prose", "code"] {
        ensure!(
            docs.iter().any(|d| d.kind == kind),
            "found no {kind} text on this machine"
        );
    }
    Ok(docs)
}

fn glob_rust_book() -> Vec<PathBuf> {
    let home = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".rustup")));
    let Some(home) = home else { return vec![] };
    let Ok(toolchains) = std::fs::read_dir(home.join("toolchains")) else {
        return vec![];
    };
    let mut dirs: Vec<PathBuf> = toolchains
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    dirs.sort();
    for t in dirs {
        let book = t.join("share/doc/rust/html/book");
        if let Ok(r) = std::fs::read_dir(&book) {
            let mut v: Vec<PathBuf> = r
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name().is_some_and(|n| {
                        n.to_string_lossy().starts_with("ch")
                            && n.to_string_lossy().ends_with(".html")
                    })
                })
                .collect();
            v.sort();
            return v;
        }
    }
    vec![]
}

/// One model input: a piece of a document.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Index of its document.
    pub doc: usize,
    /// Token ids, `[CLS]` and `[SEP]` included.
    pub ids: Vec<u32>,
    /// Token strings, `[CLS]` and `[SEP]` included.
    pub tokens: Vec<String>,
}

/// Cuts documents into model inputs of at most `max_tokens` tokens (specials included), along
/// paragraph boundaries where possible.
pub fn chunk(model: &MiniLm, docs: &[Document], max_tokens: usize) -> Result<Vec<Chunk>> {
    ensure!(
        max_tokens >= 8,
        "chunks of {max_tokens} tokens are too short"
    );
    let (cls, sep) = model.cls_sep()?;
    let inner = max_tokens - 2;
    let mut chunks = Vec::new();
    for (di, doc) in docs.iter().enumerate() {
        let mut cur_ids: Vec<u32> = Vec::new();
        let mut cur_tok: Vec<String> = Vec::new();
        let mut flush = |ids: &mut Vec<u32>, toks: &mut Vec<String>| {
            if ids.len() >= 4 {
                let mut i = vec![cls];
                i.append(ids);
                i.push(sep);
                let mut t = vec!["[CLS]".to_string()];
                t.append(toks);
                t.push("[SEP]".to_string());
                chunks.push(Chunk {
                    doc: di,
                    ids: i,
                    tokens: t,
                });
            }
            ids.clear();
            toks.clear();
        };
        for para in doc.text.split("\n\n") {
            if para.trim().is_empty() {
                continue;
            }
            let t = model.word_pieces(para)?;
            if cur_ids.len() + t.ids.len() > inner {
                flush(&mut cur_ids, &mut cur_tok);
            }
            for (id, tok) in t.ids.into_iter().zip(t.tokens) {
                if cur_ids.len() == inner {
                    flush(&mut cur_ids, &mut cur_tok);
                }
                cur_ids.push(id);
                cur_tok.push(tok);
            }
        }
        flush(&mut cur_ids, &mut cur_tok);
    }
    Ok(chunks)
}

/// One line of a shard's `.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SequenceMeta {
    /// The document it came from.
    pub source: String,
    /// Its kind.
    pub kind: String,
    /// Its tokens, one per row.
    pub tokens: Vec<String>,
    /// The model position of `tokens[0]`.
    pub first_position: usize,
}

/// What [`collect`] wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CollectMeta {
    /// The model.
    pub model: String,
    /// The hook.
    pub hook: String,
    /// Its layer.
    pub layer: usize,
    /// Row width.
    pub d_in: usize,
    /// Rows over all shards.
    pub rows: usize,
    /// Shard file names.
    pub shards: Vec<String>,
    /// Rows per kind.
    pub kinds: BTreeMap<String, usize>,
    /// Seconds the model ran.
    pub seconds: f64,
}

/// How to collect.
#[derive(Debug, Clone)]
pub struct CollectOptions {
    /// Stop after this many rows.
    pub max_rows: usize,
    /// Rows per shard (whole sequences; a shard may pass it by one sequence).
    pub shard_rows: usize,
    /// Sequences per model call.
    pub batch: usize,
    /// Tokens per sequence, specials included.
    pub seq_tokens: usize,
    /// Seed of the chunk order.
    pub seed: u64,
}

impl Default for CollectOptions {
    fn default() -> Self {
        Self {
            max_rows: 300_000,
            shard_rows: 65_536,
            batch: 32,
            seq_tokens: 128,
            seed: 0,
        }
    }
}

/// Runs the model over `docs` (chunks shuffled with `opts.seed`) and writes the shards to `out`.
pub fn collect(
    model: &MiniLm,
    docs: &[Document],
    out: &Path,
    opts: &CollectOptions,
) -> Result<CollectMeta> {
    ensure!(
        opts.batch > 0 && opts.shard_rows > 0,
        "batch and shard_rows must be positive"
    );
    let mut chunks = chunk(model, docs, opts.seq_tokens)?;
    if chunks.is_empty() {
        bail!("the corpus gave no text to run");
    }
    // Shuffle each kind, then take the kinds in turn, so that every kind is represented until it
    // runs out.
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut by_kind: BTreeMap<&str, Vec<Chunk>> = BTreeMap::new();
    for c in chunks.drain(..) {
        by_kind
            .entry(docs[c.doc].kind.as_str())
            .or_default()
            .push(c);
    }
    let mut queues: Vec<std::vec::IntoIter<Chunk>> = by_kind
        .into_values()
        .map(|mut v| {
            v.shuffle(&mut rng);
            v.into_iter()
        })
        .collect();
    loop {
        let before = chunks.len();
        for q in &mut queues {
            chunks.extend(q.next());
        }
        if chunks.len() == before {
            break;
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let d = model.d();
    let mut meta = CollectMeta {
        model: "sentence-transformers/all-MiniLM-L6-v2".into(),
        hook: model.hook_name(),
        layer: model.hook_layer(),
        d_in: d,
        rows: 0,
        shards: vec![],
        kinds: BTreeMap::new(),
        seconds: 0.0,
    };
    let mut rows: Vec<f32> = Vec::new();
    let mut lines: Vec<SequenceMeta> = Vec::new();
    let started = Instant::now();
    let flush = |rows: &mut Vec<f32>,
                 lines: &mut Vec<SequenceMeta>,
                 meta: &mut CollectMeta|
     -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let name = format!("shard-{:05}", meta.shards.len());
        let n = rows.len() / d;
        let arr = Array2::from_shape_vec((n, d), std::mem::take(rows))?;
        let npy = out.join(format!("{name}.npy"));
        ndarray_npy::write_npy(&npy, &arr).with_context(|| format!("writing {}", npy.display()))?;
        let jl = out.join(format!("{name}.jsonl"));
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&jl).with_context(|| format!("creating {}", jl.display()))?,
        );
        for l in lines.drain(..) {
            serde_json::to_writer(&mut f, &l)?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
        meta.shards.push(format!("{name}.npy"));
        eprintln!(
            "  {name}: {n} rows ({} so far, {:.0} tokens/s)",
            meta.rows,
            meta.rows as f64 / started.elapsed().as_secs_f64()
        );
        Ok(())
    };
    'outer: for batch in chunks.chunks(opts.batch) {
        let seqs: Vec<&[u32]> = batch.iter().map(|c| c.ids.as_slice()).collect();
        let (h, ranges) = model.hidden(&seqs)?;
        for (c, r) in batch.iter().zip(ranges) {
            // Drop [CLS] and [SEP]: their rows are not text.
            let keep = r.start + 1..r.end - 1;
            rows.extend(h.slice(s![keep.clone(), ..]).iter());
            let doc = &docs[c.doc];
            lines.push(SequenceMeta {
                source: doc.source.clone(),
                kind: doc.kind.clone(),
                tokens: c.tokens[1..c.tokens.len() - 1].to_vec(),
                first_position: 1,
            });
            meta.rows += keep.len();
            *meta.kinds.entry(doc.kind.clone()).or_default() += keep.len();
            if rows.len() / d >= opts.shard_rows {
                flush(&mut rows, &mut lines, &mut meta)?;
            }
            if meta.rows >= opts.max_rows {
                break 'outer;
            }
        }
    }
    flush(&mut rows, &mut lines, &mut meta)?;
    meta.seconds = started.elapsed().as_secs_f64();
    let mp = out.join("meta.json");
    std::fs::write(&mp, serde_json::to_string_pretty(&meta)?)
        .with_context(|| format!("writing {}", mp.display()))?;
    Ok(meta)
}

/// Reads a collected folder's token metadata: every sequence of every shard, in row order.
pub fn read_sequences(dir: &Path) -> Result<Vec<SequenceMeta>> {
    let mp = dir.join("meta.json");
    let meta: CollectMeta = serde_json::from_str(
        &std::fs::read_to_string(&mp).with_context(|| format!("reading {}", mp.display()))?,
    )
    .with_context(|| format!("parsing {}", mp.display()))?;
    let mut out = Vec::new();
    for shard in &meta.shards {
        let jl = dir.join(shard.replace(".npy", ".jsonl"));
        let text =
            std::fs::read_to_string(&jl).with_context(|| format!("reading {}", jl.display()))?;
        for (i, line) in text.lines().enumerate() {
            out.push(
                serde_json::from_str(line).with_context(|| {
                    format!("{}:{}: not a sequence record", jl.display(), i + 1)
                })?,
            );
        }
    }
    Ok(out)
}
