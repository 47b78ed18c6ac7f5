//! The demo pipeline, as a team would deploy Tiller on all-MiniLM-L6-v2: collect the residual
//! stream over real English text, train a TopK SAE on it, build the feature dashboard, find the
//! features that stand for concepts (legal text, code, numbers), write a Tiller config that
//! monitors them and offers profiles that ablate them, and measure what the ablations do to
//! embeddings. Every step caches its output in the demo folder and is skipped when its output is
//! there and was built with the same settings.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};
use tiller_minilm::concepts::{self, ConceptFeature};
use tiller_minilm::corpus::{self, CollectOptions};
use tiller_minilm::{MiniLm, Options, provision};
use tiller_runtime::Runtime;

use crate::{AppState, embed};

/// The pipeline's settings; a change rebuilds what depends on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The hook: residual stream after this layer.
    pub layer: usize,
    /// Tokens of activations to collect.
    pub rows: usize,
    /// SAE width.
    pub d_sae: usize,
    /// Active features per token.
    pub k: usize,
    /// Training tokens.
    pub train_tokens: u64,
    /// Adam's learning rate.
    pub lr: f64,
    /// Tokens per training step.
    pub batch: usize,
    /// ONNX Runtime threads.
    pub threads: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            layer: 3,
            rows: 300_000,
            d_sae: 3072,
            k: 32,
            train_tokens: 1_500_000,
            lr: 1e-3,
            batch: 1024,
            threads: 2,
        }
    }
}

/// What the pipeline built.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Artifacts {
    /// The settings it was built with.
    pub settings: Settings,
    /// The collected activations.
    pub acts: PathBuf,
    /// The SAE.
    pub sae: PathBuf,
    /// The feature dashboard.
    pub dashboard: PathBuf,
    /// The Tiller config.
    pub config: PathBuf,
    /// Held-out evaluation of the SAE.
    pub eval: tiller_export::train::report::Eval,
    /// The chosen feature of each concept.
    pub concepts: Vec<ConceptFeature>,
}

/// The concepts monitored and given an ablation profile.
pub const MONITORED: [&str; 3] = ["legal", "code", "numbers"];

fn say(msg: impl AsRef<str>) {
    eprintln!("==> {}", msg.as_ref());
}

/// Builds (or reuses) everything in `dir`.
pub fn build(dir: &Path, s: &Settings) -> Result<Artifacts> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stamp = dir.join("artifacts.json");
    if let Ok(text) = std::fs::read_to_string(&stamp)
        && let Ok(a) = serde_json::from_str::<Artifacts>(&text)
        && a.settings == *s
        && [&a.acts, &a.sae, &a.dashboard, &a.config]
            .iter()
            .all(|p| p.exists())
    {
        say(format!(
            "reusing the pipeline built in {} (delete it to rebuild)",
            dir.display()
        ));
        return Ok(a);
    }
    let model_dir = provision::model_dir()?;
    say(format!("model: {}", model_dir.display()));
    // Steps whose outputs exist from a run with the same settings are reused.
    let settings_path = dir.join("settings.json");
    let same_settings = std::fs::read_to_string(&settings_path)
        .ok()
        .and_then(|t| serde_json::from_str::<Settings>(&t).ok())
        .is_some_and(|old| old == *s);
    if !same_settings {
        let _ = std::fs::remove_file(dir.join("acts/meta.json"));
        let _ = std::fs::remove_file(dir.join("train-report.json"));
        std::fs::write(&settings_path, serde_json::to_string_pretty(s)?)?;
    }

    let acts = dir.join("acts");
    let sae = dir.join("sae.onnx");
    let report_path = dir.join("train-report.json");
    let t = Instant::now();
    let model = MiniLm::load(
        &model_dir,
        Options {
            hook_layer: s.layer,
            intra_threads: s.threads,
            ..Options::default()
        },
    )?;
    if acts.join("meta.json").is_file() {
        say(format!("reusing the activations in {}", acts.display()));
    } else {
        let docs = corpus::default_corpus(2_000_000)?;
        say(format!(
            "collecting {} tokens of the residual stream after layer {} from {} documents",
            s.rows,
            s.layer,
            docs.len()
        ));
        let _ = std::fs::remove_dir_all(&acts);
        let meta = corpus::collect(
            &model,
            &docs,
            &acts,
            &CollectOptions {
                max_rows: s.rows,
                ..CollectOptions::default()
            },
        )?;
        say(format!(
            "collected {} rows {:?} in {:.1} s",
            meta.rows,
            meta.kinds,
            t.elapsed().as_secs_f64()
        ));
        let _ = std::fs::remove_file(&report_path);
    }

    let eval = if sae.is_file()
        && let Ok(text) = std::fs::read_to_string(&report_path)
        && let Ok(r) = serde_json::from_str::<tiller_export::train::report::Report>(&text)
        && let Some(e) = r.eval
    {
        say(format!("reusing the SAE {}", sae.display()));
        e
    } else {
        train_sae(s, &model, &acts, &sae, &report_path)?
    };
    drop(model);

    say("finding the features of each concept");
    let dict = tiller_runtime::Dictionary::load(&sae, &tiller_runtime::SessionOptions::default())?;
    let found = concepts::select(&dict, &acts, CANDIDATES, 150_000)?;
    drop(dict);
    let chosen = choose_by_ablation(dir, &sae, &acts, &found, s.layer)?;
    ensure!(
        chosen.len() == MONITORED.len(),
        "no feature found for some concept: {found:?}"
    );
    for f in &found {
        eprintln!(
            "    {:<8} feature {:>5}  fires on {:>5.1}% of its tokens, {:>5.1}% of others  top tokens: {}",
            f.concept,
            f.feature,
            f.freq_in * 100.0,
            f.freq_out * 100.0,
            f.top_tokens.join(" ")
        );
    }
    std::fs::write(
        dir.join("concepts.json"),
        serde_json::to_string_pretty(&found)?,
    )?;

    let dashboard = dir.join("dashboard.html");
    let mut dopts = tiller_export::dashboard::Options::new(&sae, &acts, &dashboard);
    let mut ids: Vec<u32> = chosen.iter().map(|f| f.feature).collect();
    for f in &found {
        if !ids.contains(&f.feature) {
            ids.push(f.feature);
        }
    }
    dopts.features = Some(ids);
    dopts.max_rows = Some(150_000);
    tiller_export::dashboard::write(&dopts)?;
    say(format!("dashboard: {}", dashboard.display()));

    let config = dir.join("tiller.toml");
    std::fs::write(&config, config_text(&chosen))?;
    say(format!("config: {}", config.display()));

    let a = Artifacts {
        settings: s.clone(),
        acts,
        sae,
        dashboard,
        config,
        eval,
        concepts: chosen,
    };
    std::fs::write(&stamp, serde_json::to_string_pretty(&a)?)?;
    Ok(a)
}

fn train_sae(
    s: &Settings,
    model: &MiniLm,
    acts: &Path,
    sae: &Path,
    report_path: &Path,
) -> Result<tiller_export::train::report::Eval> {
    say(format!(
        "training a TopK SAE: {} -> {} features, k = {}, {} tokens",
        model.d(),
        s.d_sae,
        s.k,
        s.train_tokens
    ));
    let mut cfg = tiller_export::train::TrainConfig::new(
        vec![acts.to_path_buf()],
        tiller_runtime::Kind::Sae,
        tiller_runtime::Activation::TopK,
        s.d_sae,
        sae.to_path_buf(),
    );
    cfg.k = Some(s.k);
    cfg.tokens = Some(s.train_tokens);
    cfg.batch = s.batch;
    cfg.lr = s.lr;
    cfg.report = Some(report_path.to_path_buf());
    cfg.hook_in = model.hook_name();
    cfg.model = "sentence-transformers/all-MiniLM-L6-v2".into();
    cfg.progress = false;
    let finished =
        match tiller_export::train::train(&cfg, &tiller_export::train::Control::default())? {
            tiller_export::train::Outcome::Finished(f) => f,
            tiller_export::train::Outcome::Stopped { .. } => {
                anyhow::bail!("training stopped early")
            }
        };
    let eval = finished
        .report
        .eval
        .clone()
        .context("the training report has no held-out evaluation")?;
    say(format!(
        "trained in {:.1} s; held-out ({} tokens): FVU {:.4}, L0 {:.1}, dead {:.2}%",
        finished.report.seconds,
        eval.tokens,
        eval.fvu,
        eval.l0,
        eval.dead_fraction * 100.0
    ));
    Ok(eval)
}

/// Candidate features per concept, tried by ablation.
pub const CANDIDATES: usize = 8;

fn detokenize(tokens: &[String]) -> String {
    let mut out = String::new();
    for t in tokens {
        match t.strip_prefix("##") {
            Some(piece) => out.push_str(piece),
            None => {
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push_str(t);
            }
        }
    }
    out
}

/// Picks, for each monitored concept, the candidate whose ablation lowers most the cosine
/// similarity between pairs of the concept's own corpus texts (16 sequences of the collected
/// corpus, not the pairs the demo reports) while moving least the similarity of prose pairs
/// (8 pairs of short prose texts, the controls: a short text's embedding averages few tokens, so
/// it shows what one feature does most): the score is the mean change of the concept's pairs plus
/// twice the largest absolute change of the controls, so that a feature which fires everywhere, and whose ablation
/// moves every embedding, loses to one specific to the concept. Numbers keep their most selective
/// feature.
/// The tokens of each control text in [`choose_by_ablation`]: a sentence's length.
const CONTROL_TOKENS: usize = 16;

fn choose_by_ablation(
    dir: &Path,
    sae: &Path,
    acts: &Path,
    found: &[ConceptFeature],
    layer: usize,
) -> Result<Vec<ConceptFeature>> {
    let seqs = corpus::read_sequences(acts)?;
    let trial = dir.join("candidates.toml");
    let mut text = format!(
        "[[dictionary]]\nname = \"sae\"\npath = {:?}\n",
        sae.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("sae.onnx")
    );
    let mut tried = std::collections::BTreeSet::new();
    for f in found.iter().filter(|f| tried.insert(f.feature)) {
        text.push_str(&format!(
            "\n[[profile]]\nname = \"try-{id}\"\n[[profile.steer]]\nname = \"ablate-{id}\"\n\
             dictionary = \"sae\"\nop = \"ablate\"\nfeature = {id}\n",
            id = f.feature
        ));
    }
    std::fs::write(&trial, text)?;
    let state = state_from(&trial, layer, 1)?;
    let prose: Vec<String> = seqs
        .iter()
        .rev()
        .filter(|q| q.kind == "prose" && q.tokens.len() >= 24)
        .take(16)
        .map(|q| detokenize(&q.tokens[..CONTROL_TOKENS]))
        .collect();
    ensure!(
        prose.len() >= 4,
        "too few prose texts to check features against"
    );
    let controls: Vec<(&str, &str)> = prose
        .chunks_exact(2)
        .map(|p| (p[0].as_str(), p[1].as_str()))
        .collect();
    let mut chosen = Vec::new();
    for concept in MONITORED {
        let candidates: Vec<&ConceptFeature> =
            found.iter().filter(|f| f.concept == concept).collect();
        let Some(first) = candidates.first() else {
            anyhow::bail!("no feature found for the concept {concept}");
        };
        if concept == "numbers" {
            chosen.push((*first).clone());
            continue;
        }
        let texts: Vec<String> = seqs
            .iter()
            .rev()
            .filter(|q| q.kind == concept && q.tokens.len() >= 24)
            .take(16)
            .map(|q| detokenize(&q.tokens[..q.tokens.len().min(64)]))
            .collect();
        ensure!(
            texts.len() >= 4,
            "too few {concept} texts to try features on"
        );
        let pairs: Vec<(&str, &str)> = texts
            .chunks_exact(2)
            .map(|p| (p[0].as_str(), p[1].as_str()))
            .collect();
        let mut best: Option<(f64, &ConceptFeature)> = None;
        for c in &candidates {
            let profile = format!("try-{}", c.feature);
            let e = pair_effects(&state, &profile, &pairs)?;
            let change = e.iter().map(|p| p.after - p.before).sum::<f64>() / e.len() as f64;
            let side = pair_effects(&state, &profile, &controls)?;
            let moved = side
                .iter()
                .map(|p| (p.after - p.before).abs())
                .fold(0.0, f64::max);
            // A feature must move its own texts more than twice what it moves short prose to
            // count as specific: the controls weigh double.
            let score = change + 2.0 * moved;
            eprintln!(
                "    {concept:<8} ablating feature {:>5} changes the similarity of {concept} pairs by {change:+.4}, moves prose pairs by {moved:.4} (score {score:+.4})",
                c.feature
            );
            if best.is_none_or(|(b, _)| score < b) {
                best = Some((score, c));
            }
        }
        if let Some((_, c)) = best {
            chosen.push(c.clone());
        }
    }
    let _ = std::fs::remove_file(&trial);
    Ok(chosen)
}

/// The Tiller config: one monitor and one ablation profile per concept.
pub fn config_text(chosen: &[ConceptFeature]) -> String {
    let mut t = String::from(
        "# Written by `embedding-server demo` from the features it found for each concept.\n\
         [runtime]\nfvu_sample_rate = 0.05\n\n\
         [[dictionary]]\nname = \"minilm-l3\"\npath = \"sae.onnx\"\n",
    );
    for f in chosen {
        t.push_str(&format!(
            "\n# {c}: feature {id} fires on {fi:.1}% of {c} tokens and {fo:.1}% of others; top tokens: {top}\n\
             [[monitor]]\nname = \"{c}\"\ndictionary = \"minilm-l3\"\nfeatures = [{id}]\nthreshold = {th:.4}\n\
             window = \"request\"\naggregate = \"count\"\ncount = 2\naction = \"flag\"\n",
            c = f.concept,
            id = f.feature,
            fi = f.freq_in * 100.0,
            fo = f.freq_out * 100.0,
            top = f.top_tokens.join(" "),
            th = f.mean_active_in * 0.5,
        ));
    }
    for f in chosen {
        t.push_str(&format!(
            "\n[[profile]]\nname = \"no-{c}\"\n[[profile.steer]]\nname = \"ablate-{c}\"\ndictionary = \"minilm-l3\"\n\
             op = \"ablate\"\nfeature = {id}\n",
            c = f.concept,
            id = f.feature
        ));
    }
    t
}

/// Texts that share a concept, and texts that share none of the monitored ones; none of them is in
/// the training corpus.
pub const LEGAL_PAIRS: [(&str, &str); 4] = [
    (
        "The licensee shall indemnify the licensor against all claims arising from use of the software.",
        "This agreement is governed by the laws of the State of New York and disputes shall be settled by arbitration.",
    ),
    (
        "Redistributions in binary form must reproduce the above copyright notice and this list of conditions.",
        "The copyright holders disclaim all warranties, express or implied, including merchantability.",
    ),
    (
        "You may not sublicense or transfer your rights under this license without prior written consent.",
        "In no event shall the authors be liable for any damages arising from the use of this work.",
    ),
    (
        "Permission is granted to copy and distribute verbatim copies of this document.",
        "Each contributor grants you a non-exclusive, royalty-free patent license to make and sell the work.",
    ),
];

/// Code pairs.
pub const CODE_PAIRS: [(&str, &str); 3] = [
    (
        "def add(a, b):\n    return a + b",
        "for i in range(10):\n    print(i * 2)",
    ),
    (
        "import os\npath = os.path.join(root, name)",
        "class Stack:\n    def push(self, item):\n        self.items.append(item)",
    ),
    (
        "if not isinstance(value, int):\n    raise TypeError('expected an int')",
        "with open(filename) as f:\n    lines = [line.strip() for line in f]",
    ),
];

/// Pairs about nothing the monitors watch.
pub const UNRELATED_PAIRS: [(&str, &str); 4] = [
    (
        "The cat slept on the warm windowsill all afternoon.",
        "She baked fresh bread every Sunday morning.",
    ),
    (
        "The river flooded the valley after days of rain.",
        "He plays the violin in the city orchestra.",
    ),
    (
        "Our team won the football match in the final minute.",
        "The mountains were covered in snow by November.",
    ),
    (
        "They planted tomatoes and basil in the garden.",
        "The old lighthouse stood alone on the rocky shore.",
    ),
];

/// One pair's cosine similarity without and with a profile.
#[derive(Debug, Clone, Serialize)]
pub struct PairEffect {
    /// The texts.
    pub a: String,
    /// The texts.
    pub b: String,
    /// Cosine similarity with no profile.
    pub before: f64,
    /// Cosine similarity with both texts under the profile.
    pub after: f64,
}

/// What a profile does to related and unrelated pairs.
#[derive(Debug, Clone, Serialize)]
pub struct SteeringEffect {
    /// The profile.
    pub profile: String,
    /// Pairs sharing the concept.
    pub related: Vec<PairEffect>,
    /// Pairs sharing no monitored concept.
    pub unrelated: Vec<PairEffect>,
}

fn pair_effects(
    state: &AppState,
    profile: &str,
    pairs: &[(&str, &str)],
) -> Result<Vec<PairEffect>> {
    let texts: Vec<&str> = pairs.iter().flat_map(|(a, b)| [*a, *b]).collect();
    let before = embed(state, &texts, None, None)?.embeddings;
    let after = embed(state, &texts, Some(profile), None)?.embeddings;
    Ok(pairs
        .iter()
        .enumerate()
        .map(|(i, (a, b))| {
            let cos = |e: &ndarray::Array2<f32>| f64::from(e.row(2 * i).dot(&e.row(2 * i + 1)));
            PairEffect {
                a: a.to_string(),
                b: b.to_string(),
                before: cos(&before),
                after: cos(&after),
            }
        })
        .collect())
}

/// Measures `profile` (an ablation of `concept`'s feature) on related and unrelated pairs.
pub fn steering_effect(
    state: &AppState,
    profile: &str,
    related: &[(&str, &str)],
) -> Result<SteeringEffect> {
    Ok(SteeringEffect {
        profile: profile.to_string(),
        related: pair_effects(state, profile, related)?,
        unrelated: pair_effects(state, profile, &UNRELATED_PAIRS)?,
    })
}

/// Loads the model and the runtime from the built config, for serving or measuring.
pub fn state(a: &Artifacts, workers: usize) -> Result<Arc<AppState>> {
    state_from(&a.config, a.settings.layer, workers)
}

fn state_from(config: &Path, layer: usize, workers: usize) -> Result<Arc<AppState>> {
    let runtime = Arc::new(Runtime::from_config_file(config)?);
    let model = Arc::new(MiniLm::load(
        &provision::model_dir()?,
        Options {
            hook_layer: layer,
            intra_threads: 1,
            pool_size: workers,
            ..Options::default()
        },
    )?);
    Ok(Arc::new(AppState::new(model, runtime)))
}
