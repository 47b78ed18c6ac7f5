//! `verify` against the source checkpoint, and `slice`: exact for ReLU (the sliced activations equal
//! the full dictionary's columns), calibrated JumpReLU for TopK; sliced dictionaries in the runtime
//! are addressed by their original feature ids.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Rng, Tensors, write_saelens};
use safetensors::Dtype;
use serde_json::json;
use tiller_runtime::{Dictionary, DictionaryFile, SessionOptions};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tiller-export"))
}

fn checkpoint(dir: &Path, name: &str, arch: &str, seed: u64) -> PathBuf {
    let mut rng = Rng::new(seed);
    let mut t = Tensors::new();
    t.insert("W_enc".into(), rng.normal(&[24, 96], 0.4));
    t.insert("b_enc".into(), rng.normal(&[96], 0.1));
    t.insert("W_dec".into(), rng.normal(&[96, 24], 0.3));
    t.insert("b_dec".into(), rng.normal(&[24], 0.1));
    let mut cfg = json!({"architecture": arch, "d_in": 24, "d_sae": 96, "apply_b_dec_to_input": true,
                         "metadata": {"sae_lens_version": "6.0.0", "hook_name": "h"}});
    if arch == "topk" {
        cfg["k"] = json!(8);
    }
    let p = dir.join(name);
    write_saelens(&p, &cfg, &t, Dtype::F32);
    p
}

fn import(ckpt: &Path, out: &Path) {
    assert!(
        bin()
            .arg("import")
            .arg(ckpt)
            .arg("-o")
            .arg(out)
            .status()
            .unwrap()
            .success()
    );
}

#[test]
fn verify_passes_on_its_source_and_fails_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        checkpoint(dir.path(), "a", "topk", 1),
        checkpoint(dir.path(), "b", "topk", 2),
    );
    let dict = dir.path().join("a.onnx");
    import(&a, &dict);
    let o = bin()
        .arg("verify")
        .arg(&dict)
        .arg("--source")
        .arg(&a)
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["pass"], true);
    assert!(r["acts_rel"].as_f64().unwrap() < 1e-5 && r["recon_rel"].as_f64().unwrap() < 1e-5);
    assert_eq!(r["topk_agreement"], 1.0);
    assert_eq!(r["rows"], 256);
    let o = bin()
        .arg("verify")
        .arg(&dict)
        .arg("--source")
        .arg(&b)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL"));
}

#[test]
fn relu_slices_are_exact_and_keep_original_ids() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), "c", "standard", 3);
    let full = dir.path().join("full.onnx");
    import(&ckpt, &full);
    let sliced = dir.path().join("sliced.onnx");
    let o = bin()
        .arg("slice")
        .arg(&full)
        .args(["--features", "40,3,17", "-o"])
        .arg(&sliced)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("exact"));
    let f = DictionaryFile::open(&sliced).unwrap();
    assert_eq!(f.meta().feature_ids, Some(vec![40, 3, 17]));
    assert!(f.meta().exact);
    let x = Rng::new(9).matrix(33, 24, 1.0);
    let a = Dictionary::load(&full, &SessionOptions::default())
        .unwrap()
        .encode(x.view())
        .unwrap()
        .acts;
    let (s, recon) = Dictionary::load(&sliced, &SessionOptions::default())
        .unwrap()
        .encode_decode(x.view())
        .unwrap();
    for (j, &c) in [40usize, 3, 17].iter().enumerate() {
        for t in 0..33 {
            assert!((s[[t, j]] - a[[t, c]]).abs() <= 1e-6 * a[[t, c]].abs().max(1.0));
        }
    }
    assert_eq!(recon.shape(), &[33, 24]);

    // The runtime addresses a sliced dictionary's features by their original ids.
    let cfg = |feature: u32| {
        format!(
            "[runtime]\nfvu_sample_rate = 0.0\n[[dictionary]]\nname = \"s\"\npath = \"sliced.onnx\"\n\
             [[profile]]\nname = \"p\"\n[[profile.steer]]\ndictionary = \"s\"\nop = \"ablate\"\nfeature = {feature}\n"
        )
    };
    std::fs::write(dir.path().join("ok.toml"), cfg(17)).unwrap();
    let rt = tiller_runtime::Runtime::from_config_file(dir.path().join("ok.toml")).unwrap();
    rt.begin_request(1, Some("p"), None).unwrap();
    let mut y = x.clone();
    let mut step = rt
        .step(
            &[tiller_runtime::Token {
                request: 1,
                phase: tiller_runtime::Phase::Prompt,
            }; 33],
        )
        .unwrap();
    step.hook(
        "h",
        tiller_runtime::ActivationsMut::F32(y.as_slice_mut().unwrap()),
    )
    .unwrap();
    step.finish();
    let w = f.weights().unwrap();
    for t in 0..33 {
        for j in 0..24 {
            let want = x[[t, j]] - a[[t, 17]] * w.w_dec[[2, j]];
            assert!(
                (y[[t, j]] - want).abs() < 1e-5,
                "ablating original feature 17 uses its decoder row"
            );
        }
    }
    std::fs::write(dir.path().join("bad.toml"), cfg(5)).unwrap();
    let e = tiller_runtime::Runtime::from_config_file(dir.path().join("bad.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("feature 5 is not in the sliced dictionary"),
        "{e}"
    );

    let o = bin()
        .arg("slice")
        .arg(&full)
        .args(["--features", "3,3", "-o"])
        .arg(&sliced)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("listed twice"));
    let o = bin()
        .arg("slice")
        .arg(&full)
        .args(["--features", "96", "-o"])
        .arg(&sliced)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("out of range"));
}

#[test]
fn topk_slices_are_calibrated() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), "t", "topk", 4);
    let full = dir.path().join("full.onnx");
    import(&ckpt, &full);
    let out = dir.path().join("s.onnx");
    let o = bin()
        .arg("slice")
        .arg(&full)
        .args(["--features", "1,2,3,4,5,6,7,8", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--calibrate"));

    let cal = Rng::new(5).matrix(2000, 24, 1.0);
    let cal_path = dir.path().join("cal.npy");
    tiller_export::npy::write(&cal_path, &cal).unwrap();
    let o = bin()
        .arg("slice")
        .arg(&full)
        .args(["--features", "1,2,3,4,5,6,7,8", "--calibrate"])
        .arg(&cal_path)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = DictionaryFile::open(&out).unwrap();
    assert_eq!(f.meta().activation, tiller_runtime::Activation::JumpRelu);
    assert!(!f.meta().exact);
    // On fresh activations the fitted thresholds reproduce TopK membership for most tokens, and
    // where both fire the values are the same pre-activations.
    let x = Rng::new(6).matrix(500, 24, 1.0);
    let a = Dictionary::load(&full, &SessionOptions::default())
        .unwrap()
        .encode(x.view())
        .unwrap()
        .acts;
    let s = Dictionary::load(&out, &SessionOptions::default())
        .unwrap()
        .encode(x.view())
        .unwrap()
        .acts;
    let (mut agree, mut total) = (0, 0);
    for t in 0..500 {
        for (j, c) in (1..=8).enumerate() {
            total += 1;
            if (a[[t, c]] > 0.0) == (s[[t, j]] > 0.0) {
                agree += 1;
            }
            if a[[t, c]] > 0.0 && s[[t, j]] > 0.0 {
                assert!((a[[t, c]] - s[[t, j]]).abs() <= 1e-5 * a[[t, c]].max(1.0));
            }
        }
    }
    let rate = agree as f64 / total as f64;
    assert!(rate > 0.85, "held-out agreement {rate}");
}
