//! Fixture writers shared by the integration tests: SAELens checkpoints with random weights, laid
//! out exactly as SAELens saves them; in submodules, each source format's own maths in float64.
#![allow(dead_code, clippy::unwrap_used)]

pub mod llama_scope;
pub mod openai;
pub mod saelens;
pub mod torch;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use ndarray::{Array1, Array2, ArrayD};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal, Uniform};
use safetensors::{Dtype, tensor::TensorView};
use tiller_runtime::{Dictionary, SessionOptions};

/// Tensors of one checkpoint, kept as float64 for the reference.
pub type Tensors = BTreeMap<String, ArrayD<f64>>;

pub struct Rng(pub StdRng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }
    pub fn normal(&mut self, shape: &[usize], scale: f64) -> ArrayD<f64> {
        let n = Normal::new(0.0, scale).unwrap();
        ArrayD::from_shape_simple_fn(shape, || n.sample(&mut self.0))
    }
    pub fn uniform(&mut self, shape: &[usize], lo: f64, hi: f64) -> ArrayD<f64> {
        let u = Uniform::new(lo, hi).unwrap();
        ArrayD::from_shape_simple_fn(shape, || u.sample(&mut self.0))
    }
    pub fn matrix(&mut self, rows: usize, cols: usize, scale: f64) -> Array2<f32> {
        self.normal(&[rows, cols], scale)
            .mapv(|v| v as f32)
            .into_dimensionality()
            .unwrap()
    }
}

/// Rounds every tensor to what the file will hold, so the reference sees the stored values.
pub fn stored(t: &ArrayD<f64>, dtype: Dtype) -> ArrayD<f64> {
    match dtype {
        Dtype::F16 => t.mapv(|v| f64::from(half::f16::from_f64(v).to_f32())),
        Dtype::BF16 => t.mapv(|v| f64::from(half::bf16::from_f64(v).to_f32())),
        Dtype::F64 => t.clone(),
        _ => t.mapv(|v| f64::from(v as f32)),
    }
}

fn bytes(t: &ArrayD<f64>, dtype: Dtype) -> Vec<u8> {
    let t = t.as_standard_layout();
    match dtype {
        Dtype::F16 => t
            .iter()
            .flat_map(|v| half::f16::from_f64(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => t
            .iter()
            .flat_map(|v| half::bf16::from_f64(*v).to_le_bytes())
            .collect(),
        Dtype::F64 => t.iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => t.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect(),
    }
}

/// Writes `tensors` to a safetensors file in `dtype`.
pub fn write_safetensors(path: &Path, tensors: &Tensors, dtype: Dtype) {
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), bytes(v, dtype), v.shape().to_vec()))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(k, b, s)| (k.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Writes a SAELens checkpoint folder: `cfg.json` and `sae_weights.safetensors`. Returns the
/// tensors as stored (rounded to `dtype`).
pub fn write_saelens(
    dir: &Path,
    cfg: &serde_json::Value,
    tensors: &Tensors,
    dtype: Dtype,
) -> Tensors {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("cfg.json"),
        serde_json::to_string_pretty(cfg).unwrap(),
    )
    .unwrap();
    write_safetensors(&dir.join("sae_weights.safetensors"), tensors, dtype);
    tensors
        .iter()
        .map(|(k, v)| (k.clone(), stored(v, dtype)))
        .collect()
}

pub fn m2(t: &Tensors, name: &str) -> Array2<f64> {
    t[name].clone().into_dimensionality().unwrap()
}

pub fn v1(t: &Tensors, name: &str) -> Array1<f64> {
    t[name].clone().into_dimensionality().unwrap()
}

/// Each token's TopK indices that carry a positive activation in `acts` are exactly the latents
/// the reference `want` activates; with `nonempty`, every token activates at least one.
pub fn assert_topk_indices(
    name: &str,
    want: &Array2<f64>,
    acts: &Array2<f32>,
    idx: &Array2<i64>,
    nonempty: bool,
) {
    for (i, row) in want.rows().into_iter().enumerate() {
        let mut want: Vec<usize> = (0..row.len()).filter(|&j| row[j] > 0.0).collect();
        let mut got: Vec<usize> = idx
            .row(i)
            .iter()
            .map(|&j| j as usize)
            .filter(|&j| acts[[i, j]] > 0.0)
            .collect();
        want.sort_unstable();
        got.sort_unstable();
        if nonempty {
            assert!(!want.is_empty(), "{name}: token {i} has no active latent");
        }
        assert_eq!(got, want, "{name}: token {i} TopK indices");
    }
}

/// `tiller-export import PATH --format FORMAT [--hookpoint HOOKPOINT] -o OUT`: the process's output.
pub fn run_import(format: &str, path: &Path, out: &Path, hookpoint: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tiller-export"));
    c.arg("import").arg(path).args(["--format", format]);
    if let Some(h) = hookpoint {
        c.args(["--hookpoint", h]);
    }
    c.arg("-o").arg(out).output().unwrap()
}

/// [`run_import`], which must succeed.
pub fn import_ok(format: &str, path: &Path, out: &Path, hookpoint: Option<&str>) {
    let o = run_import(format, path, out, hookpoint);
    assert!(
        o.status.success(),
        "import of {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// [`run_import`] without a hookpoint, which must fail as a handled error (exit 1, no panic);
/// its stderr.
pub fn import_err(format: &str, path: &Path, out: &Path) -> String {
    let o = run_import(format, path, out, None);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert_eq!(o.status.code(), Some(1), "expected a handled error: {err}");
    err
}

/// `tiller-export import PATH --format FORMAT -o OUT`, then the dictionary loaded by the runtime.
pub fn import(ckpt: &Path, format: &str, out: &Path) -> Dictionary {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tiller-export"))
        .arg("import")
        .arg(ckpt)
        .args(["--format", format, "-o"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "import of {} failed: {}",
        ckpt.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    Dictionary::load(out, &SessionOptions::default()).unwrap()
}

/// A bad checkpoint: what is wrong with it, the folder it is written to, how, and what the
/// import's message must name.
pub struct BadCheckpoint {
    pub what: &'static str,
    pub folder: &'static str,
    pub write: fn(&Path),
    pub names: &'static [&'static str],
}

/// Writes each case into its folder of a fresh temporary folder and imports it as `format`: the
/// import must fail as a handled error whose message names every one of the case's `names`; a
/// failure names the case.
pub fn assert_bad_checkpoints(format: &str, cases: &[BadCheckpoint]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d.onnx");
    for case in cases {
        let ckpt = dir.path().join(case.folder);
        (case.write)(&ckpt);
        let err = import_err(format, &ckpt, &out);
        assert!(
            case.names.iter().all(|n| err.contains(n)),
            "{}: {err}",
            case.what
        );
    }
}
