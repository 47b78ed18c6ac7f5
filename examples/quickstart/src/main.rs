//! The quickstart: write a SAELens TopK checkpoint, import it with `tiller-export`'s library,
//! encode activations through the runtime, and print the top features of each token.
//!
//! The checkpoint and the activations are synthetic but built the way real ones behave: each token's
//! residual vector is a sparse sum of a few feature directions plus noise, and the SAE's decoder
//! holds those directions. The features planted in each token should come out on top.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal, Uniform};
use tiller_runtime::{Dictionary, SessionOptions};

const D_IN: usize = 64;
const D_SAE: usize = 512;
const K: usize = 8;

fn unit_rows(rng: &mut StdRng, rows: usize, cols: usize) -> Array2<f32> {
    let n = Normal::new(0.0f32, 1.0).unwrap_or_else(|_| unreachable!("valid parameters"));
    let mut m = Array2::from_shape_simple_fn((rows, cols), || n.sample(rng));
    for mut r in m.rows_mut() {
        let norm = r.dot(&r).sqrt();
        r /= norm;
    }
    m
}

/// Writes a SAELens v6 `topk` checkpoint folder (cfg.json + sae_weights.safetensors).
fn write_checkpoint(dir: &std::path::Path, w_dec: &Array2<f32>) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let cfg = serde_json::json!({
        "architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": K, "dtype": "float32",
        "apply_b_dec_to_input": true, "normalize_activations": "none",
        "metadata": {"sae_lens_version": "6.18.0", "model_name": "demo-model", "hook_name": "blocks.6.hook_resid_post"}
    });
    std::fs::write(dir.join("cfg.json"), serde_json::to_string_pretty(&cfg)?)?;
    let w_enc = w_dec.t().to_owned();
    let b_enc = Array1::<f32>::from_elem(D_SAE, -0.05);
    let b_dec = Array1::<f32>::zeros(D_IN);
    let bytes = |a: &[f32]| a.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let tensors = [
        (
            "W_enc",
            vec![D_IN, D_SAE],
            bytes(w_enc.as_standard_layout().as_slice().unwrap_or(&[])),
        ),
        ("b_enc", vec![D_SAE], bytes(b_enc.as_slice().unwrap_or(&[]))),
        (
            "W_dec",
            vec![D_SAE, D_IN],
            bytes(w_dec.as_slice().unwrap_or(&[])),
        ),
        ("b_dec", vec![D_IN], bytes(b_dec.as_slice().unwrap_or(&[]))),
    ];
    let views = tensors
        .iter()
        .map(|(n, s, b)| {
            Ok((
                n.to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, &dir.join("sae_weights.safetensors"))?;
    Ok(())
}

fn main() -> Result<()> {
    let work = PathBuf::from(
        std::env::var("TILLER_DEMO_DIR").unwrap_or_else(|_| "target/quickstart".into()),
    );
    let mut rng = StdRng::seed_from_u64(2024);
    let w_dec = unit_rows(&mut rng, D_SAE, D_IN);

    // Concepts planted in the text, with the feature that carries each.
    let concepts: BTreeMap<u32, &str> = [
        (11, "Golden Gate Bridge"),
        (42, "deception"),
        (97, "Python code"),
        (128, "legal text"),
        (255, "numbers"),
        (301, "French"),
        (404, "errors and failures"),
        (480, "bridges in general"),
    ]
    .into_iter()
    .collect();
    let tokens: [(&str, &[u32]); 8] = [
        ("The", &[]),
        (" Golden", &[11, 480]),
        (" Gate", &[11]),
        (" was", &[42]),
        (" built", &[480, 255]),
        (" in", &[]),
        (" 1937", &[255]),
        (" raise", &[97, 404]),
    ];

    // 1. A SAELens checkpoint, as a user would have on disk.
    let ckpt = work.join("saelens-topk");
    write_checkpoint(&ckpt, &w_dec).context("writing the SAELens checkpoint")?;

    // 2. Import it: the same code path as `tiller-export import ckpt --labels labels.json -o dict.onnx`.
    let (mut meta, weights) =
        tiller_export::import::read(&ckpt, tiller_export::import::Format::Auto)?;
    meta.labels = concepts.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let dict_path = work.join("demo.onnx");
    tiller_export::import::write(&meta, &weights, &dict_path)?;
    println!("imported {} -> {}", ckpt.display(), dict_path.display());

    // 3. Activations: each token a sparse sum of its planted features, plus background features and noise.
    let noise = Normal::new(0.0f32, 0.02).unwrap_or_else(|_| unreachable!("valid parameters"));
    let strength = Uniform::new(2.0f32, 4.0).unwrap_or_else(|_| unreachable!("valid parameters"));
    let background =
        Uniform::new(0usize, D_SAE).unwrap_or_else(|_| unreachable!("valid parameters"));
    let mut x = Array2::<f32>::zeros((tokens.len(), D_IN));
    for (t, (_, feats)) in tokens.iter().enumerate() {
        let mut row = x.row_mut(t);
        for &f in feats.iter() {
            row.scaled_add(strength.sample(&mut rng), &w_dec.row(f as usize));
        }
        for _ in 0..2 {
            row.scaled_add(0.6, &w_dec.row(background.sample(&mut rng)));
        }
        row.mapv_inplace(|v| v + noise.sample(&mut rng));
    }

    // 4. Encode through ONNX Runtime and print the top features per token.
    let dict = Dictionary::load(&dict_path, &SessionOptions::default())?;
    let enc = dict.encode(x.view())?;
    let (values, indices) = enc
        .top
        .context("a TopK dictionary returns its top features")?;
    let labels = &dict.meta().labels;
    println!(
        "\n{:<10} {:<60} planted",
        "token", "top features (id: activation, label)"
    );
    let mut recovered = 0;
    let mut planted_total = 0;
    for (t, (text, planted)) in tokens.iter().enumerate() {
        let mut shown = Vec::new();
        for j in 0..3 {
            let (id, v) = (indices[[t, j]] as u32, values[[t, j]]);
            if v <= 0.0 {
                break;
            }
            let label = labels.get(&id).map(String::as_str).unwrap_or("-");
            shown.push(format!("{id}: {v:.2} {label}"));
        }
        let top: Vec<u32> = (0..planted.len()).map(|j| indices[[t, j]] as u32).collect();
        planted_total += planted.len();
        recovered += planted.iter().filter(|p| top.contains(p)).count();
        println!(
            "{:<10} {:<60} {:?}",
            format!("{text:?}"),
            shown.join(" | "),
            planted
        );
    }
    println!("\nplanted features found at the top: {recovered}/{planted_total}");
    println!(
        "mean L0 {:.1} (k = {K})",
        enc.acts.iter().filter(|v| **v > 0.0).count() as f64 / tokens.len() as f64
    );
    Ok(())
}
