//! SAELens checkpoints of every architecture, v6 and pre-6 configs, imported and run through the
//! runtime, compared with a float64 implementation of SAELens's own maths written from its source
//! (sae_lens/saes/*.py) in `tests/common/saelens.rs`: normwise relative error under 1e-5, TopK
//! indices identical.
#![allow(clippy::unwrap_used)]

mod common;

use common::saelens::{Sae, reference as saelens_reference, tensors, v6};
use common::{Rng, assert_topk_indices, write_saelens};
use safetensors::Dtype;
use serde_json::json;
use tiller_runtime::{Dictionary, SessionOptions};
use tiller_test_support::rel_err;

const TOL: f64 = 1e-5;

fn run_case(name: &str, s: Sae, cfg: serde_json::Value, dtype: Dtype, seed: u64) {
    let (d_in, d_sae) = (
        cfg["d_in"].as_u64().unwrap() as usize,
        cfg["d_sae"].as_u64().unwrap() as usize,
    );
    let d_out = cfg
        .get("d_out")
        .and_then(|v| v.as_u64())
        .map_or(d_in, |v| v as usize);
    let mut rng = Rng::new(seed);
    let mut t = tensors(&mut rng, s.arch, d_in, d_sae, d_out);
    if cfg.get("sae_lens_version").is_none() && name.contains("scaling") {
        t.insert("scaling_factor".into(), rng.uniform(&[d_sae], 0.5, 1.5));
    }
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let t = write_saelens(&ckpt, &cfg, &t, dtype);
    let out = dir.path().join("dict.onnx");

    let status = std::process::Command::new(env!("CARGO_BIN_EXE_tiller-export"))
        .arg("import")
        .arg(&ckpt)
        .args(["--format", "auto", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{name}: import failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );

    let dict = Dictionary::load(&out, &SessionOptions::default()).unwrap();
    assert_eq!(dict.meta().source, "saelens");
    let x = rng.matrix(19, d_in, 1.0) + 0.25;
    let (ref_acts, ref_recon) = saelens_reference(&s, &t, &x);
    let enc = dict.encode(x.view()).unwrap();
    let (_, recon) = dict.encode_decode(x.view()).unwrap();
    let (ea, er) = (rel_err(&enc.acts, &ref_acts), rel_err(&recon, &ref_recon));
    assert!(ea < TOL, "{name}: acts relative error {ea:e}");
    assert!(er < TOL, "{name}: reconstruction relative error {er:e}");
    let active = ref_acts.iter().filter(|v| **v > 0.0).count();
    assert!(
        active > 0 && active < ref_acts.len(),
        "{name}: degenerate fixture"
    );
    if s.arch == "topk" {
        let (_, idx) = enc.top.unwrap();
        assert_topk_indices(name, &ref_acts, &enc.acts, &idx, false);
        assert_eq!(dict.meta().k, Some(s.k));
    }
    println!("{name}: acts {ea:.2e} recon {er:.2e}");
}

#[test]
fn v6_sae_architectures() {
    let sae = |arch, k, norm, rescale| Sae {
        arch,
        k,
        apply_b_dec_to_input: true,
        norm,
        rescale,
    };
    run_case(
        "v6 standard",
        sae("standard", 0, "none", false),
        v6("standard", json!({})),
        Dtype::F32,
        1,
    );
    run_case(
        "v6 standard layer_norm",
        sae("standard", 0, "layer_norm", false),
        v6("standard", json!({"normalize_activations": "layer_norm"})),
        Dtype::F32,
        2,
    );
    run_case(
        "v6 standard constant_norm_rescale",
        sae("standard", 0, "constant_norm_rescale", false),
        v6(
            "standard",
            json!({"normalize_activations": "constant_norm_rescale"}),
        ),
        Dtype::F32,
        3,
    );
    run_case(
        "v6 topk",
        sae("topk", 7, "none", false),
        v6("topk", json!({"k": 7})),
        Dtype::F32,
        4,
    );
    run_case(
        "v6 topk rescale_acts_by_decoder_norm",
        sae("topk", 7, "none", true),
        v6(
            "topk",
            json!({"k": 7, "rescale_acts_by_decoder_norm": true}),
        ),
        Dtype::F32,
        5,
    );
    run_case(
        "v6 jumprelu",
        sae("jumprelu", 0, "none", false),
        v6("jumprelu", json!({})),
        Dtype::F32,
        6,
    );
    run_case(
        "v6 gated",
        sae("gated", 0, "none", false),
        v6("gated", json!({})),
        Dtype::F32,
        7,
    );
    run_case(
        "v6 standard without b_dec on input, bf16 weights",
        Sae {
            arch: "standard",
            k: 0,
            apply_b_dec_to_input: false,
            norm: "none",
            rescale: false,
        },
        v6(
            "standard",
            json!({"apply_b_dec_to_input": false, "dtype": "bfloat16"}),
        ),
        Dtype::BF16,
        8,
    );
}

#[test]
fn v6_transcoders() {
    let tc = |arch| Sae {
        arch,
        k: 0,
        apply_b_dec_to_input: false,
        norm: "none",
        rescale: false,
    };
    for (i, arch) in ["transcoder", "jumprelu_transcoder", "skip_transcoder"]
        .into_iter()
        .enumerate()
    {
        let mut cfg = v6(arch, json!({"d_out": 24}));
        cfg["metadata"]["hook_name_out"] = json!("blocks.4.hook_mlp_out");
        run_case(
            &format!("v6 {arch}"),
            tc(arch),
            cfg,
            Dtype::F32,
            20 + i as u64,
        );
    }
    // A transcoder with layer_norm: SAELens normalises the input but does not de-normalise the output.
    let cfg = v6(
        "transcoder",
        json!({"d_out": 24, "normalize_activations": "layer_norm"}),
    );
    run_case(
        "v6 transcoder layer_norm",
        Sae {
            arch: "transcoder",
            k: 0,
            apply_b_dec_to_input: false,
            norm: "layer_norm",
            rescale: false,
        },
        cfg,
        Dtype::F32,
        30,
    );
}

#[test]
fn pre_6_configs() {
    // SAELens 3-5: flat config, activation_fn_str/activation_fn_kwargs, no sae_lens_version.
    let topk = json!({
        "architecture": "standard", "d_in": 32, "d_sae": 80, "dtype": "float32", "device": "cpu",
        "model_name": "gpt2-small", "hook_name": "blocks.8.hook_resid_pre", "hook_layer": 8,
        "hook_head_index": null, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 9},
        "apply_b_dec_to_input": true, "finetuning_scaling_factor": false,
        "sae_lens_training_version": "4.1.0", "normalize_activations": "none"
    });
    run_case(
        "pre-6 topk",
        Sae {
            arch: "topk",
            k: 9,
            apply_b_dec_to_input: true,
            norm: "none",
            rescale: false,
        },
        topk,
        Dtype::F32,
        40,
    );

    // SAELens 0-2: the whole runner config, `hook_point`, boolean normalize_activations, torch dtype.
    let old = json!({
        "d_in": 32, "d_sae": 80, "dtype": "torch.float32", "hook_point": "blocks.2.hook_resid_pre",
        "hook_point_layer": 2, "activation_fn": "relu", "normalize_activations": false,
        "apply_b_dec_to_input": true, "model_name": "gpt2-small", "lr": 0.0004, "l1_coefficient": 8e-5
    });
    run_case(
        "pre-6 relu with scaling_factor",
        Sae {
            arch: "standard",
            k: 0,
            apply_b_dec_to_input: true,
            norm: "none",
            rescale: false,
        },
        old,
        Dtype::F32,
        41,
    );
    let ln = json!({
        "architecture": "jumprelu", "d_in": 32, "d_sae": 80, "dtype": "float16", "hook_name": "blocks.3.hook_resid_post",
        "activation_fn_str": "relu", "apply_b_dec_to_input": false, "normalize_activations": "layer_norm"
    });
    run_case(
        "pre-6 jumprelu layer_norm f16",
        Sae {
            arch: "jumprelu",
            k: 0,
            apply_b_dec_to_input: false,
            norm: "layer_norm",
            rescale: false,
        },
        ln,
        Dtype::F16,
        42,
    );
}

#[test]
fn metadata_and_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let mut rng = Rng::new(9);
    write_saelens(
        &ckpt,
        &v6("topk", json!({"k": 5})),
        &tensors(&mut rng, "topk", 32, 80, 32),
        Dtype::F32,
    );
    let labels = dir.path().join("labels.json");
    std::fs::write(&labels, r#"{"3": "Golden Gate Bridge", "17": "deception"}"#).unwrap();
    let out = dir.path().join("d.onnx");
    let bin = env!("CARGO_BIN_EXE_tiller-export");
    let st = std::process::Command::new(bin)
        .arg("import")
        .arg(&ckpt)
        .arg("--labels")
        .arg(&labels)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let o = std::process::Command::new(bin)
        .arg("inspect")
        .arg(&out)
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kind"], "sae");
    assert_eq!(v["activation"], "topk");
    assert_eq!(v["k"], 5);
    assert_eq!(v["d_sae"], 80);
    assert_eq!(v["hook_in"], "blocks.4.hook_resid_post");
    assert_eq!(v["model"], "gpt2");
    assert_eq!(v["source"], "saelens");
    assert_eq!(v["exact"], true);
    assert_eq!(v["opset"], 17);
    assert_eq!(v["labels"], 2);
    let text = std::process::Command::new(bin)
        .arg("inspect")
        .arg(&out)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("Golden Gate Bridge"));
}

/// A checkpoint saved in f16 or bf16, imported with `--dtype` of the same width, keeps its
/// weights exactly (half the bytes of f32), and the runtime's native encoder reads them at that
/// width; the result equals SAELens's maths on the stored weights.
#[test]
fn half_width_checkpoints_import_at_their_width() {
    use tiller_runtime::dictionary::WeightDtype;
    for (dtype, flag, want) in [
        (Dtype::F16, "f16", WeightDtype::F16),
        (Dtype::BF16, "bf16", WeightDtype::Bf16),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        let mut rng = Rng::new(13);
        let t = tensors(&mut rng, "jumprelu", 32, 80, 32);
        let t = write_saelens(&ckpt, &v6("jumprelu", json!({})), &t, dtype);
        let out = dir.path().join("d.onnx");
        let bin = env!("CARGO_BIN_EXE_tiller-export");
        let o = std::process::Command::new(bin)
            .arg("import")
            .arg(&ckpt)
            .args(["--dtype", flag, "-o"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = std::process::Command::new(bin)
            .args(["inspect", "--json"])
            .arg(&out)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["weights"], flag);
        let opts = SessionOptions {
            native: true,
            ..SessionOptions::default()
        };
        let dict = Dictionary::load(&out, &opts).unwrap();
        assert_eq!(dict.backend(), tiller_runtime::Backend::Native(want));
        let s = Sae {
            arch: "jumprelu",
            k: 0,
            apply_b_dec_to_input: true,
            norm: "none",
            rescale: false,
        };
        let x = rng.matrix(19, 32, 1.0) + 0.25;
        let (ref_acts, _) = saelens_reference(&s, &t, &x);
        let ea = rel_err(&dict.encode(x.view()).unwrap().acts, &ref_acts);
        assert!(ea < TOL, "{flag}: acts relative error {ea:e}");
    }
}
