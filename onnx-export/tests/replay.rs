//! `tiller-export replay`: recorded activations through a config as one request; the steered
//! activations match a float64 reference of the clamp edit (normwise relative error under 1e-5),
//! and the metrics and summary count what happened.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Rng, Tensors, m2, v1, write_saelens};
use safetensors::Dtype;
use serde_json::json;

#[test]
fn replay_dry_runs_a_config() {
    let dir = tempfile::tempdir().unwrap();
    let (d_in, d_sae) = (16, 48);
    let mut rng = Rng::new(11);
    let mut t = Tensors::new();
    t.insert("W_enc".into(), rng.normal(&[d_in, d_sae], 0.4));
    t.insert("b_enc".into(), rng.normal(&[d_sae], 0.1));
    t.insert("W_dec".into(), rng.normal(&[d_sae, d_in], 0.3));
    t.insert("b_dec".into(), rng.normal(&[d_in], 0.1));
    let cfg = json!({"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": true,
                     "metadata": {"sae_lens_version": "6.0.0", "hook_name": "blocks.5.hook_resid_post"}});
    let t = write_saelens(&dir.path().join("ckpt"), &cfg, &t, Dtype::F32);
    let bin = env!("CARGO_BIN_EXE_tiller-export");
    let dict = dir.path().join("res.onnx");
    assert!(
        std::process::Command::new(bin)
            .arg("import")
            .arg(dir.path().join("ckpt"))
            .arg("-o")
            .arg(&dict)
            .status()
            .unwrap()
            .success()
    );
    std::fs::write(
        dir.path().join("tiller.toml"),
        r#"
[runtime]
fvu_sample_rate = 0.0
[[dictionary]]
name = "res"
path = "res.onnx"
[[monitor]]
name = "f2"
dictionary = "res"
features = [2]
threshold = 0.0
window = "token"
[[profile]]
name = "calm"
[[profile.steer]]
name = "clamp7"
dictionary = "res"
op = "clamp"
feature = 7
value = 0.5
"#,
    )
    .unwrap();
    let x = rng.matrix(40, d_in, 1.0);
    let input = dir.path().join("x.npy");
    tiller_export::npy::write(&input, &x).unwrap();
    let (out, metrics, summary) = (
        dir.path().join("y.npy"),
        dir.path().join("m.txt"),
        dir.path().join("s.json"),
    );
    let o = std::process::Command::new(bin)
        .args(["replay", "--config"])
        .arg(dir.path().join("tiller.toml"))
        .args([
            "--hook",
            "blocks.5.hook_resid_post",
            "--profile",
            "calm",
            "--phase",
            "generated",
            "--input",
        ])
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .arg("--metrics")
        .arg(&metrics)
        .arg("--summary")
        .arg(&summary)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Reference: f = relu((x - b_dec) W_enc + b_enc); x' = x + (0.5 - f_7) d_7.
    let (w_enc, w_dec, b_enc, b_dec) = (
        m2(&t, "W_enc"),
        m2(&t, "W_dec"),
        v1(&t, "b_enc"),
        v1(&t, "b_dec"),
    );
    let x64 = x.mapv(f64::from);
    let f = ((&x64 - &b_dec).dot(&w_enc) + &b_enc).mapv(|v| v.max(0.0));
    let mut want = x64.clone();
    for i in 0..x.nrows() {
        let c = 0.5 - f[[i, 7]];
        let mut row = want.row_mut(i);
        row.scaled_add(c, &w_dec.row(7));
    }
    let got = tiller_export::npy::read_f32_dyn(&out)
        .unwrap()
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap();
    let e = tiller_test_support::rel_err(&got, &want);
    assert!(e < 1e-5, "replay output rel err {e:e}");

    let m = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        m.contains("tiller_tokens_total{hook=\"blocks.5.hook_resid_post\"} 40"),
        "{m}"
    );
    let edited = (0..40).filter(|&i| (0.5 - f[[i, 7]]) != 0.0).count();
    assert!(
        m.contains(&format!(
            "tiller_steering_tokens_total{{rule=\"clamp7\"}} {edited}"
        )),
        "{m}"
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["tokens"], 40);
    assert_eq!(s["steering"]["clamp7"], edited);
    let fired = (0..40).filter(|&i| f[[i, 2]] > 0.0).count();
    assert_eq!(s["events"].as_array().unwrap().len(), fired);

    // A hook the config does not know is a clear error.
    let o = std::process::Command::new(bin)
        .args(["replay", "--config"])
        .arg(dir.path().join("tiller.toml"))
        .args(["--hook", "blocks.9", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("blocks.9"));
}
