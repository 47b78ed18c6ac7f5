//! Steering directions imported as `vector` dictionaries: GGUF control vectors (one dictionary per
//! layer, named after the host's hooks) and `.npy` directions; used by the runtime with the
//! `vector` and `project_cap` ops and as projection monitors.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use tiller_runtime::{ActivationsMut, DictionaryFile, Phase, Runtime, Token};

const D: usize = 16;

fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

#[test]
fn gguf_and_npy_directions_become_vector_dictionaries() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = common::Rng::new(1);
    let u3: Vec<f32> = rng.matrix(1, D, 1.0).row(0).to_vec();
    let u5: Vec<f32> = rng.matrix(1, D, 1.0).row(0).to_vec();
    let gguf = dir.path().join("cv.gguf");
    tiller_test_support::write_gguf(&gguf, Some("llama"), &[(3, u3.clone()), (5, u5.clone())]);
    let bin = env!("CARGO_BIN_EXE_tiller-export");
    let out = dir.path().join("cv.onnx");
    let o = Command::new(bin)
        .arg("import")
        .arg(&gguf)
        .args(["--hook", "model.layers.{name}", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f3 = DictionaryFile::open(dir.path().join("cv.3.onnx")).unwrap();
    assert_eq!(f3.meta().kind, tiller_runtime::Kind::Vector);
    assert_eq!(f3.meta().hook_in, "model.layers.3");
    assert_eq!(f3.meta().model, "llama");
    assert_eq!(f3.w_dec().unwrap().row(0).to_vec(), u3);
    assert!(dir.path().join("cv.5.onnx").is_file());
    let o = Command::new(bin)
        .arg("import")
        .arg(&gguf)
        .args(["--layer", "4", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("no `direction.4`"));

    // .npy directions: one dictionary, a feature per row.
    let npy = dir.path().join("dirs.npy");
    let both =
        ndarray::Array2::from_shape_vec((2, D), u3.iter().chain(&u5).copied().collect()).unwrap();
    tiller_export::npy::write(&npy, &both).unwrap();
    let o = Command::new(bin)
        .arg("import")
        .arg(&npy)
        .args(["--hook", "model.layers.3", "-o"])
        .arg(dir.path().join("dirs.onnx"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // In the runtime: `vector` adds α·u, `project_cap` caps x·û, and a monitor reads x·û.
    let x = rng.matrix(12, D, 1.0);
    let (a, b) = (unit(&u3), unit(&u5));
    let proj = |r: &[f32], u: &[f32]| -> f64 {
        r.iter()
            .zip(u)
            .map(|(p, q)| f64::from(*p) * f64::from(*q))
            .sum()
    };
    let projections: Vec<f64> = x
        .rows()
        .into_iter()
        .map(|r| proj(r.as_slice().unwrap(), &a))
        .collect();
    let threshold = 0.3;
    let config = format!(
        r#"
[runtime]
fvu_sample_rate = 0.0
[[dictionary]]
name = "cv3"
path = "cv.3.onnx"
[[dictionary]]
name = "dirs"
path = "dirs.onnx"
[[monitor]]
name = "along-u3"
dictionary = "cv3"
features = [0]
threshold = {threshold}
window = "token"
[[profile]]
name = "push"
[[profile.steer]]
dictionary = "cv3"
op = "vector"
feature = 0
strength = 2.0
[[profile]]
name = "cap"
[[profile.steer]]
dictionary = "dirs"
op = "project_cap"
feature = 1
value = 0.1
"#
    );
    std::fs::write(dir.path().join("t.toml"), config).unwrap();
    let rt = Runtime::from_config_file(dir.path().join("t.toml")).unwrap();
    rt.begin_request(1, Some("push"), None).unwrap();
    rt.begin_request(2, Some("cap"), None).unwrap();
    for (req, check) in [(1u64, "push"), (2, "cap")] {
        let mut y = x.clone();
        let mut step = rt
            .step(
                &[Token {
                    request: req,
                    phase: Phase::Generated,
                }; 12],
            )
            .unwrap();
        step.hook(
            "model.layers.3",
            ActivationsMut::F32(y.as_slice_mut().unwrap()),
        )
        .unwrap();
        let r = step.finish();
        let fired: Vec<u64> = r.events.iter().map(|e| e.token).collect();
        let want: Vec<u64> = (0..12)
            .filter(|&t| projections[t] > threshold)
            .map(|t| t as u64)
            .collect();
        assert_eq!(
            fired, want,
            "the projection monitor fires where x·û > {threshold}"
        );
        for t in 0..12 {
            let (xr, yr) = (x.row(t), y.row(t));
            match check {
                "push" => {
                    for j in 0..D {
                        assert!((yr[j] - (xr[j] + 2.0 * u3[j])).abs() < 1e-5);
                    }
                }
                _ => {
                    let p = proj(yr.as_slice().unwrap(), &b);
                    assert!(p <= 0.1 + 1e-5, "token {t}: projection {p} over the cap");
                }
            }
        }
    }
}
