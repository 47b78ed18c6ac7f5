//! Checkpoints written by `tests/fixtures/make_torch_fixtures.py` with the real layouts of the
//! torch projects, the float64 record of what it stored, and the torch operations their maths use.

use std::path::Path;
use std::process::Command;

use ndarray::{Array1, Array2, Array3, ArrayD, Ix1, Ix2, Ix3};
use serde_json::Value;

/// Runs the fixture script for `group` (`dictionary-learning`, `openai`, `goodfire`) into a
/// fresh folder.
pub fn fixtures(group: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_torch_fixtures.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(dir.path())
        .arg(group)
        .output()
        .expect("python3 runs the fixture script");
    assert!(
        out.status.success(),
        "the fixture script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// The tensors (as stored, in float64) and settings the script recorded for one checkpoint.
pub struct Ref(pub Value);

impl Ref {
    pub fn load(path: &Path) -> Self {
        Self(serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap())
    }
    pub fn t(&self, name: &str) -> ArrayD<f64> {
        let spec = &self.0["tensors"][name];
        assert!(spec.is_object(), "the reference has no tensor `{name}`");
        let shape: Vec<usize> = spec["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let data: Vec<f64> = spec["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        ArrayD::from_shape_vec(shape, data).unwrap()
    }
    pub fn m2(&self, name: &str) -> Array2<f64> {
        self.t(name).into_dimensionality::<Ix2>().unwrap()
    }
    pub fn v1(&self, name: &str) -> Array1<f64> {
        self.t(name).into_dimensionality::<Ix1>().unwrap()
    }
    pub fn a3(&self, name: &str) -> Array3<f64> {
        self.t(name).into_dimensionality::<Ix3>().unwrap()
    }
    pub fn scalar(&self, name: &str) -> f64 {
        self.t(name).iter().copied().next().unwrap()
    }
    pub fn setting(&self, key: &str) -> &Value {
        &self.0[key]
    }
}

pub fn relu(a: Array2<f64>) -> Array2<f64> {
    a.mapv(|v| v.max(0.0))
}

/// `torch.nn.functional.linear`: `x wᵀ + b`, with `w` as `[out, in]`.
pub fn linear(x: &Array2<f64>, w: &Array2<f64>, b: Option<&Array1<f64>>) -> Array2<f64> {
    let y = x.dot(&w.t());
    match b {
        Some(b) => y + b,
        None => y,
    }
}

/// `topk(v, k)` then scatter into zeros (ties to the lower index).
pub fn topk(v: &Array2<f64>, k: usize) -> Array2<f64> {
    let mut out = Array2::zeros(v.raw_dim());
    for (i, row) in v.rows().into_iter().enumerate() {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &j in &idx[..k] {
            out[[i, j]] = row[j];
        }
    }
    out
}
