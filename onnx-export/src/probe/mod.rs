//! Linear probes and difference-in-means directions, as Tiller dictionaries.
//!
//! - [`train_probe`] (`tiller-export train-probe`): L2-penalised logistic regression on `[n, d]`
//!   activations and 0/1 labels ([`logreg`]), with a deterministic stratified held-out split and
//!   its accuracy and AUROC ([`metrics`]); written as a `probe` dictionary.
//! - [`diffmeans`] (`tiller-export diffmeans`): the unit direction `mean(A) - mean(B)` between
//!   two sets of activations, written as a `vector` dictionary: the `vector` and `project_cap`
//!   ops steer along it, and a monitor over it reads the projection `x·u`.
//! - [`import`] (`tiller-export import --format probe`): probes saved by PyTorch, scikit-learn or
//!   NumPy (`.safetensors`, `.npz`, `.npy`).
//!
//! A `probe` dictionary (`tiller.kind = probe`) is one or more read-outs over a hook:
//! `acts = sigmoid(x W_enc + b_enc)` (`tiller.activation = sigmoid`) or the logits
//! `x W_enc + b_enc` (`linear`), one column per read-out, named by `tiller.labels`. It has no
//! decoder: the runtime monitors it and never steers with it.

pub mod import;
pub mod logreg;
pub mod metrics;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ndarray::{Array1, Array2, ArrayD, Axis, Ix2};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Serialize;
use tiller_runtime::Activation;
use tiller_runtime::dictionary::{probe_dictionary, vector_dictionary};

use crate::{Error, Result};

/// What each read-out of a probe outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProbeOutput {
    /// `sigmoid(x·w + b)`, a probability (`tiller.activation = sigmoid`).
    #[default]
    Sigmoid,
    /// The logit `x·w + b` (`tiller.activation = linear`).
    Logit,
}

impl ProbeOutput {
    /// The dictionary's activation.
    pub fn activation(self) -> Activation {
        match self {
            Self::Sigmoid => Activation::Sigmoid,
            Self::Logit => Activation::Linear,
        }
    }
}

impl FromStr for ProbeOutput {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sigmoid" => Ok(Self::Sigmoid),
            "logit" | "linear" => Ok(Self::Logit),
            other => Err(format!("`{other}` is not sigmoid or logit")),
        }
    }
}

impl fmt::Display for ProbeOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sigmoid => "sigmoid",
            Self::Logit => "logit",
        })
    }
}

/// Reads a `.npy` of 0/1 labels, `[n]` or `[n, 1]`: booleans, integers or floats. Anything but
/// 0 and 1 is an error naming the row.
pub fn read_labels(path: &Path) -> Result<Vec<bool>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = std::io::BufReader::new(file);
    let header = tiller_runtime::npy::read_header(&mut reader, size)
        .map_err(|e| crate::npy::lift(path, e))?;
    let element = header.element().ok_or_else(|| {
        Error::format(
            path,
            format!(
                "dtype {} is not bool, an integer or a float: labels are 0 or 1",
                header.descr
            ),
        )
    })?;
    header
        .check_data_len(element, size)
        .map_err(|e| crate::npy::lift(path, e))?;
    let mut bytes = Vec::new();
    reader
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    let labels: Vec<f64> = bytes
        .chunks_exact(element.size)
        .map(|c| element.to_f64(c))
        .collect();
    let a = ArrayD::from_shape_vec(
        header.shape.iter().map(|&d| d as usize).collect::<Vec<_>>(),
        labels,
    )
    .map_err(|e| Error::format(path, e.to_string()))?;
    let shape = a.shape().to_vec();
    if !(shape.len() == 1 || (shape.len() == 2 && shape[1] == 1)) {
        return Err(Error::format(
            path,
            format!("has shape {shape:?}: labels are one column, [n] or [n, 1]"),
        ));
    }
    a.iter()
        .enumerate()
        .map(|(i, &l)| match l {
            0.0 => Ok(false),
            1.0 => Ok(true),
            v => Err(Error::format(
                path,
                format!("row {i} holds {v}: labels must be 0 or 1"),
            )),
        })
        .collect()
}

/// Reads `[n, d]` float activations (a `[d]` file is one row), checking every value is finite.
pub fn read_rows(path: &Path) -> Result<Array2<f32>> {
    let a = crate::npy::read_f32_dyn(path)?;
    let shape = a.shape().to_vec();
    let a = match shape.len() {
        1 => a
            .into_shape_with_order((1, shape[0]))
            .map_err(|e| Error::format(path, e.to_string()))?,
        _ => a.into_dimensionality::<Ix2>().map_err(|_| {
            Error::format(
                path,
                format!("has shape {shape:?}; expected [n, d] activations"),
            )
        })?,
    };
    if a.is_empty() {
        return Err(Error::format(
            path,
            format!("has shape {shape:?}: no activations"),
        ));
    }
    crate::npy::check_finite_rows(path, &a)?;
    Ok(a)
}

/// The deterministic, stratified split of `train-probe`: `(train, held_out)` row indices, each
/// in increasing order. Each class is shuffled by a generator seeded with `seed` and its first
/// `round(holdout · n_class)` rows (at least one when `holdout > 0`) are held out.
pub fn split(labels: &[bool], holdout: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    if !(0.0..1.0).contains(&holdout) {
        return Err(tiller_runtime::Error::invalid(
            "holdout",
            format!("{holdout} is not in [0, 1)"),
        )
        .into());
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut train, mut held) = (Vec::new(), Vec::new());
    for class in [true, false] {
        let mut rows: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
        rows.shuffle(&mut rng);
        let mut k = (holdout * rows.len() as f64).round() as usize;
        if holdout > 0.0 {
            k = k.max(1);
        }
        if rows.is_empty() {
            return Err(tiller_runtime::Error::invalid(
                "labels",
                format!(
                    "no row is labelled {}: a probe needs both classes",
                    u8::from(class)
                ),
            )
            .into());
        }
        if rows.len() < k + 1 {
            return Err(tiller_runtime::Error::invalid(
                "labels",
                format!(
                    "only {} rows are labelled {}: too few to train on and hold out {}%",
                    rows.len(),
                    u8::from(class),
                    holdout * 100.0
                ),
            )
            .into());
        }
        held.extend_from_slice(&rows[..k]);
        train.extend_from_slice(&rows[k..]);
    }
    train.sort_unstable();
    held.sort_unstable();
    Ok((train, held))
}

/// Settings of [`train_probe`].
#[derive(Debug, Clone)]
pub struct TrainProbeConfig {
    /// `[n, d]` activations (`.npy`, float16/32/64).
    pub input: PathBuf,
    /// `[n]` labels, 0 or 1 (`.npy`, bool, integer or float).
    pub labels: PathBuf,
    /// The probe dictionary to write.
    pub output: PathBuf,
    /// λ of the penalty `(λ/2)‖w̃‖²` on the weights of the standardised inputs.
    pub l2: f64,
    /// Fraction of each class held out for evaluation (0: none).
    pub holdout: f64,
    /// Seed of the split.
    pub seed: u64,
    /// L-BFGS iterations at most.
    pub max_iter: usize,
    /// The read-out's label (`tiller.labels`).
    pub name: Option<String>,
    /// `tiller.hook_in`.
    pub hook: String,
    /// `tiller.model`.
    pub model: String,
    /// Probabilities or logits.
    pub probe_output: ProbeOutput,
    /// Where to write the JSON report.
    pub report: Option<PathBuf>,
}

impl TrainProbeConfig {
    /// The defaults: λ 1e-3, 20% held out, seed 0, 1000 iterations, sigmoid output.
    pub fn new(input: PathBuf, labels: PathBuf, output: PathBuf) -> Self {
        Self {
            input,
            labels,
            output,
            l2: 1e-3,
            holdout: 0.2,
            seed: 0,
            max_iter: 1000,
            name: None,
            hook: String::new(),
            model: String::new(),
            probe_output: ProbeOutput::Sigmoid,
            report: None,
        }
    }
}

/// How the written probe scores one split.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SplitMetrics {
    /// Rows.
    pub rows: usize,
    /// Rows labelled 1.
    pub positives: usize,
    /// Fraction classified right at probability 0.5.
    pub accuracy: f64,
    /// Area under the ROC curve (Mann-Whitney, ties counted one half).
    pub auroc: f64,
    /// Mean negative log-likelihood.
    pub log_loss: f64,
}

/// What [`train_probe`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeReport {
    /// The dictionary written.
    pub output: String,
    /// Input width.
    pub d_in: usize,
    /// λ.
    pub l2: f64,
    /// The held-out fraction.
    pub holdout: f64,
    /// The split's seed.
    pub seed: u64,
    /// L-BFGS iterations.
    pub iterations: usize,
    /// Whether the gradient reached the tolerance.
    pub converged: bool,
    /// `‖∇f‖∞` at the solution, in standardised coordinates.
    pub grad_norm: f64,
    /// The objective at the solution (mean log-loss plus penalty).
    pub objective: f64,
    /// Input columns that are constant on the training rows (their weight is zero).
    pub constant_columns: usize,
    /// `sigmoid` or `logit`.
    pub probe_output: String,
    /// The training rows, scored by the probe as written (float32 weights).
    pub train: SplitMetrics,
    /// The held-out rows, likewise.
    pub heldout: Option<SplitMetrics>,
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "wrote {}: probe ({}) over {} inputs, λ {:e}",
            self.output, self.probe_output, self.d_in, self.l2
        )?;
        writeln!(
            f,
            "L-BFGS: {} iterations, |grad|inf {:.2e}{}, objective {:.6}",
            self.iterations,
            self.grad_norm,
            if self.converged {
                ""
            } else {
                " (NOT converged: raise --max-iter or --l2)"
            },
            self.objective
        )?;
        let line = |f: &mut fmt::Formatter<'_>, what: &str, m: &SplitMetrics| {
            writeln!(
                f,
                "{what:<9} {:>7} rows ({} positive): accuracy {:.4}  AUROC {:.4}  log-loss {:.4}",
                m.rows, m.positives, m.accuracy, m.auroc, m.log_loss
            )
        };
        line(f, "train", &self.train)?;
        if let Some(h) = &self.heldout {
            line(f, "held-out", h)?;
        }
        Ok(())
    }
}

/// Scores `rows` of `x` with `w`, `b` in float64 and measures them against `labels`.
fn score(x: &Array2<f32>, labels: &[bool], rows: &[usize], w: &[f32], b: f32) -> SplitMetrics {
    let logits: Vec<f64> = rows
        .iter()
        .map(|&i| {
            x.row(i)
                .iter()
                .zip(w)
                .map(|(a, c)| f64::from(*a) * f64::from(*c))
                .sum::<f64>()
                + f64::from(b)
        })
        .collect();
    let y: Vec<bool> = rows.iter().map(|&i| labels[i]).collect();
    SplitMetrics {
        rows: rows.len(),
        positives: y.iter().filter(|l| **l).count(),
        accuracy: metrics::accuracy(&logits, &y),
        auroc: metrics::auroc(&logits, &y).unwrap_or(f64::NAN),
        log_loss: metrics::log_loss(&logits, &y),
    }
}

/// Fits logistic regression to `rows` of `x` on standardised columns and returns the raw-space
/// weights and bias (`z = x·w + b`), the fit, and how many columns were constant.
///
/// Each column is centred and divided by its (population) standard deviation on `rows`; a
/// column whose deviation is under 1e-12 of its scale is constant and gets weight 0. The
/// standardised solution `(w̃, b̃)` maps back as `w_j = w̃_j / σ_j`, `b = b̃ - Σ_j μ_j w_j`.
pub fn fit_standardized(
    x: &Array2<f32>,
    labels: &[bool],
    rows: &[usize],
    opts: &logreg::Options,
) -> (Array1<f64>, f64, logreg::Fit, usize) {
    let d = x.ncols();
    let mut xs = Array2::<f64>::zeros((rows.len(), d));
    for (k, &i) in rows.iter().enumerate() {
        xs.row_mut(k).assign(&x.row(i).mapv(f64::from));
    }
    let n = rows.len().max(1) as f64;
    let mu = xs.sum_axis(Axis(0)) / n;
    let mut inv_sigma = Array1::<f64>::zeros(d);
    let mut constant = 0;
    for j in 0..d {
        let var = xs
            .column(j)
            .iter()
            .map(|v| (v - mu[j]).powi(2))
            .sum::<f64>()
            / n;
        let sigma = var.sqrt();
        if sigma > 1e-12 * mu[j].abs().max(1e-300) && sigma > 0.0 {
            inv_sigma[j] = 1.0 / sigma;
        } else {
            constant += 1;
        }
    }
    for mut r in xs.rows_mut() {
        r -= &mu;
        r *= &inv_sigma;
    }
    let y: Array1<f64> = rows
        .iter()
        .map(|&i| f64::from(u8::from(labels[i])))
        .collect();
    let fit = logreg::fit(xs.view(), y.view(), opts);
    let w = &fit.w * &inv_sigma;
    let b = fit.b - mu.dot(&w);
    (w, b, fit, constant)
}

/// `tiller-export train-probe`: fits, evaluates and writes a one-read-out probe dictionary.
pub fn train_probe(cfg: &TrainProbeConfig) -> Result<ProbeReport> {
    if !(cfg.l2.is_finite() && cfg.l2 > 0.0) {
        return Err(tiller_runtime::Error::invalid(
            "l2",
            format!(
                "{} must be positive: without a penalty separable data have no optimum",
                cfg.l2
            ),
        )
        .into());
    }
    if !(0.0..1.0).contains(&cfg.holdout) {
        return Err(tiller_runtime::Error::invalid(
            "holdout",
            format!("{} is not in [0, 1)", cfg.holdout),
        )
        .into());
    }
    let x = read_rows(&cfg.input)?;
    let labels = read_labels(&cfg.labels)?;
    if labels.len() != x.nrows() {
        return Err(Error::format(
            &cfg.labels,
            format!(
                "holds {} labels but {} has {} rows",
                labels.len(),
                cfg.input.display(),
                x.nrows()
            ),
        ));
    }
    let (train, held) = split(&labels, cfg.holdout, cfg.seed)
        .map_err(|e| Error::format(&cfg.labels, e.to_string()))?;
    let opts = logreg::Options {
        l2: cfg.l2,
        max_iter: cfg.max_iter,
        ..logreg::Options::default()
    };
    let (w, b, fit, constant) = fit_standardized(&x, &labels, &train, &opts);
    let w32: Vec<f32> = w.iter().map(|v| *v as f32).collect();
    let b32 = b as f32;
    if w32.iter().any(|v| !v.is_finite()) || !b32.is_finite() {
        return Err(Error::format(
            &cfg.input,
            "the fitted weights overflow float32: the inputs are too large or nearly constant",
        ));
    }
    let weights = Array2::from_shape_vec((1, w32.len()), w32.clone())
        .map_err(|e| Error::format(&cfg.output, e.to_string()))?;
    let (mut meta, weights) = probe_dictionary(
        weights,
        Array1::from(vec![b32]),
        cfg.probe_output.activation(),
    )?;
    meta.hook_in = cfg.hook.clone();
    meta.model = cfg.model.clone();
    meta.source = "tiller-train-probe".into();
    if let Some(n) = &cfg.name {
        meta.labels.insert(0, n.clone());
    }
    crate::import::write::write(&meta, &weights, &cfg.output)?;
    let report = ProbeReport {
        output: cfg.output.display().to_string(),
        d_in: x.ncols(),
        l2: cfg.l2,
        holdout: cfg.holdout,
        seed: cfg.seed,
        iterations: fit.iterations,
        converged: fit.converged,
        grad_norm: fit.grad_norm,
        objective: fit.objective,
        constant_columns: constant,
        probe_output: cfg.probe_output.to_string(),
        train: score(&x, &labels, &train, &w32, b32),
        heldout: (!held.is_empty()).then(|| score(&x, &labels, &held, &w32, b32)),
    };
    write_report(cfg.report.as_deref(), &report)?;
    Ok(report)
}

fn write_report(path: Option<&Path>, report: &impl Serialize) -> Result<()> {
    if let Some(p) = path {
        let text = serde_json::to_string_pretty(report)
            .map_err(|e| Error::format(p, format!("cannot write the report: {e}")))?;
        std::fs::write(p, text).map_err(|e| Error::io(p, e))?;
    }
    Ok(())
}

/// Settings of [`diffmeans`].
#[derive(Debug, Clone, Default)]
pub struct DiffmeansConfig {
    /// `[n_a, d]` activations of the positive set.
    pub positive: PathBuf,
    /// `[n_b, d]` activations of the negative set.
    pub negative: PathBuf,
    /// The `vector` dictionary to write.
    pub output: PathBuf,
    /// The direction's label (`tiller.labels`).
    pub name: Option<String>,
    /// `tiller.hook_in` and `tiller.hook_out`.
    pub hook: String,
    /// `tiller.model`.
    pub model: String,
    /// Where to write the JSON report.
    pub report: Option<PathBuf>,
}

/// What [`diffmeans`] measured: the projections `x·u` of both sets on the unit direction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiffmeansReport {
    /// The dictionary written.
    pub output: String,
    /// Width.
    pub d_in: usize,
    /// Rows of the positive set.
    pub positives: usize,
    /// Rows of the negative set.
    pub negatives: usize,
    /// `‖mean(A) - mean(B)‖`, before normalising.
    pub norm: f64,
    /// Mean projection of the positive set.
    pub positive_mean: f64,
    /// Its standard deviation.
    pub positive_std: f64,
    /// Mean projection of the negative set.
    pub negative_mean: f64,
    /// Its standard deviation.
    pub negative_std: f64,
    /// AUROC of the projection, positive against negative.
    pub auroc: f64,
    /// The midpoint of the two mean projections: a monitor threshold.
    pub threshold: f64,
    /// Fraction of both sets on their side of the threshold.
    pub accuracy: f64,
}

impl fmt::Display for DiffmeansReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "wrote {}: unit difference-in-means direction over {} inputs (|mean(A) - mean(B)| = {:.6})",
            self.output, self.d_in, self.norm
        )?;
        writeln!(
            f,
            "projection x·u: positive ({} rows) {:.4} ± {:.4}, negative ({} rows) {:.4} ± {:.4}",
            self.positives,
            self.positive_mean,
            self.positive_std,
            self.negatives,
            self.negative_mean,
            self.negative_std
        )?;
        writeln!(
            f,
            "AUROC {:.4}; at the midpoint threshold {:.4}, accuracy {:.4}",
            self.auroc, self.threshold, self.accuracy
        )
    }
}

/// `tiller-export diffmeans`: the unit direction `(mean(A) - mean(B)) / ‖…‖` (means in float64)
/// as a one-direction `vector` dictionary, and how well its projection separates A from B.
pub fn diffmeans(cfg: &DiffmeansConfig) -> Result<DiffmeansReport> {
    let a = read_rows(&cfg.positive)?;
    let b = read_rows(&cfg.negative)?;
    if a.ncols() != b.ncols() {
        return Err(Error::format(
            &cfg.negative,
            format!(
                "has rows of width {}, but {} has width {}",
                b.ncols(),
                cfg.positive.display(),
                a.ncols()
            ),
        ));
    }
    let mean = |x: &Array2<f32>| x.mapv(f64::from).sum_axis(Axis(0)) / x.nrows() as f64;
    let diff = mean(&a) - mean(&b);
    let norm = diff.dot(&diff).sqrt();
    if !(norm.is_finite() && norm > 0.0) {
        return Err(Error::format(
            &cfg.negative,
            format!(
                "has the same mean as {}: there is no direction between them",
                cfg.positive.display()
            ),
        ));
    }
    let u: Vec<f32> = diff.iter().map(|v| (v / norm) as f32).collect();
    let dir = Array2::from_shape_vec((1, u.len()), u.clone())
        .map_err(|e| Error::format(&cfg.output, e.to_string()))?;
    let (mut meta, weights) = vector_dictionary(dir)?;
    meta.hook_in = cfg.hook.clone();
    meta.hook_out = cfg.hook.clone();
    meta.model = cfg.model.clone();
    meta.source = "tiller-diffmeans".into();
    if let Some(n) = &cfg.name {
        meta.labels.insert(0, n.clone());
    }
    crate::import::write::write(&meta, &weights, &cfg.output)?;
    // What the runtime reads: the projection on the direction as written (float32).
    let project = |x: &Array2<f32>| -> Vec<f64> {
        x.rows()
            .into_iter()
            .map(|r| {
                r.iter()
                    .zip(&u)
                    .map(|(p, q)| f64::from(*p) * f64::from(*q))
                    .sum()
            })
            .collect()
    };
    let (pa, pb) = (project(&a), project(&b));
    let (ma, sa) = metrics::mean_std(&pa);
    let (mb, sb) = metrics::mean_std(&pb);
    let threshold = (ma + mb) / 2.0;
    let scores: Vec<f64> = pa.iter().chain(&pb).copied().collect();
    let labels: Vec<bool> = (0..scores.len()).map(|i| i < pa.len()).collect();
    let right = scores
        .iter()
        .zip(&labels)
        .filter(|(s, l)| (**s > threshold) == **l)
        .count();
    let report = DiffmeansReport {
        output: cfg.output.display().to_string(),
        d_in: a.ncols(),
        positives: a.nrows(),
        negatives: b.nrows(),
        norm,
        positive_mean: ma,
        positive_std: sa,
        negative_mean: mb,
        negative_std: sb,
        auroc: metrics::auroc(&scores, &labels).unwrap_or(f64::NAN),
        threshold,
        accuracy: right as f64 / scores.len() as f64,
    };
    write_report(cfg.report.as_deref(), &report)?;
    Ok(report)
}
