//! A 2^17-feature, d = 4096 SAELens dictionary (4 GiB of float32 weights): the import streams the
//! weights to ONNX external data, its peak memory stays under 1.5 times the weights' size, and the
//! result loads back into ONNX Runtime and encodes correctly.
//!
//! Long (minutes, 8 GiB of disk): `cargo test -p tiller-export --test large_import -- --ignored --nocapture`.
//! The files go under the build's own folder (`target/tmp`), or under `TILLER_LARGE_IMPORT_DIR`
//! when set; the test first checks that the folder's disk has room and says so when it has not.
#![allow(clippy::unwrap_used)]

use std::io::Write;

const D: usize = 4096;
const F: usize = 1 << 17;

/// A cheap, deterministic weight: a hash of the index mapped to [-0.5, 0.5) · scale.
fn weight(tensor: u64, i: u64, scale: f32) -> f32 {
    let mut h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ tensor.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    h ^= h >> 29;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 32;
    ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
}

/// Writes a SAELens safetensors file, streaming the data so the test itself stays small.
fn write_checkpoint(dir: &std::path::Path) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = r#"{"architecture": "standard", "d_in": 4096, "d_sae": 131072, "dtype": "float32",
                  "apply_b_dec_to_input": true, "metadata": {"sae_lens_version": "6.0.0", "hook_name": "blocks.20.hook_resid_post"}}"#;
    std::fs::write(dir.join("cfg.json"), cfg).unwrap();
    let tensors: [(&str, Vec<usize>, u64); 4] = [
        ("W_enc", vec![D, F], 1),
        ("b_enc", vec![F], 2),
        ("W_dec", vec![F, D], 3),
        ("b_dec", vec![D], 4),
    ];
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, _) in &tensors {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = std::io::BufWriter::with_capacity(
        1 << 22,
        std::fs::File::create(dir.join("sae_weights.safetensors")).unwrap(),
    );
    out.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    out.write_all(&h).unwrap();
    for (_, shape, id) in &tensors {
        let n = shape.iter().product::<usize>() as u64;
        let scale = if *id == 2 || *id == 4 { 0.1 } else { 0.05 };
        let mut buf = Vec::with_capacity(1 << 22);
        for i in 0..n {
            buf.extend_from_slice(&weight(*id, i, scale).to_le_bytes());
            if buf.len() >= 1 << 22 {
                out.write_all(&buf).unwrap();
                buf.clear();
            }
        }
        out.write_all(&buf).unwrap();
    }
    out.flush().unwrap();
    offset as u64
}

/// Bytes free on the disk holding `dir`, as `df` reports them to an unprivileged user.
fn free_bytes(dir: &std::path::Path) -> u64 {
    let o = std::process::Command::new("df")
        .args(["-P", "-k"])
        .arg(dir)
        .output()
        .expect("df runs");
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text.lines().nth(1).expect("df prints a row for the folder");
    let kb: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    kb * 1024
}

fn peak_rss_bytes(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("peak RSS:"))
        .expect("the tool reports its peak RSS");
    let kb: u64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    kb * 1024
}

#[test]
#[ignore = "writes 8 GiB and takes minutes; run explicitly"]
fn a_4_gib_dictionary_imports_within_1_5x_its_size_and_loads_back() {
    let parent = std::env::var_os("TILLER_LARGE_IMPORT_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_TARGET_TMPDIR").into());
    std::fs::create_dir_all(&parent).unwrap();
    // The checkpoint and the exported data are on disk together during the import.
    let need = 2 * (D * F * 2 + D + F) as u64 * 4 + (1 << 30);
    let free = free_bytes(&parent);
    assert!(
        free >= need,
        "{} has {:.1} GiB free; this test needs {:.1} GiB (set TILLER_LARGE_IMPORT_DIR to a folder with room)",
        parent.display(),
        free as f64 / (1u64 << 30) as f64,
        need as f64 / (1u64 << 30) as f64
    );
    let dir = tempfile::tempdir_in(&parent).unwrap();
    let ckpt = dir.path().join("ckpt");
    let t0 = std::time::Instant::now();
    let weight_bytes = write_checkpoint(&ckpt);
    println!(
        "checkpoint: {:.2} GiB written in {:.1?}",
        weight_bytes as f64 / (1u64 << 30) as f64,
        t0.elapsed()
    );
    let out = dir.path().join("big.onnx");
    let t1 = std::time::Instant::now();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tiller-export"))
        .arg("import")
        .arg(&ckpt)
        .arg("-o")
        .arg(&out)
        .env("TILLER_REPORT_PEAK_RSS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let peak = peak_rss_bytes(&stderr);
    let ratio = peak as f64 / weight_bytes as f64;
    println!(
        "import: {:.1?}, peak RSS {:.2} GiB = {ratio:.3} x the weights ({:.2} GiB)",
        t1.elapsed(),
        peak as f64 / (1u64 << 30) as f64,
        weight_bytes as f64 / (1u64 << 30) as f64
    );
    assert!(
        ratio < 1.5,
        "peak RSS {peak} is {ratio:.2} times the weights"
    );

    // External data, and a small model file.
    let data = dir.path().join("big.onnx.data");
    assert!(std::fs::metadata(&data).unwrap().len() >= weight_bytes);
    assert!(std::fs::metadata(&out).unwrap().len() < 1 << 20);
    std::fs::remove_dir_all(&ckpt).unwrap();

    // Loads back and encodes: compare a few features with a float64 reference from the formula.
    let file = tiller_runtime::DictionaryFile::open(&out).unwrap();
    assert!(file.has_external_data());
    let t2 = std::time::Instant::now();
    let dict =
        tiller_runtime::Dictionary::from_file(file, &tiller_runtime::SessionOptions::default())
            .unwrap();
    println!("ONNX Runtime load: {:.1?}", t2.elapsed());
    let x: Vec<f32> = (0..2 * D).map(|i| weight(9, i as u64, 2.0)).collect();
    let x = ndarray::Array2::from_shape_vec((2, D), x).unwrap();
    let acts = dict.encode(x.view()).unwrap().acts;
    for t in 0..2 {
        for &j in &[0usize, 1, 777, F / 2, F - 1] {
            let mut pre = f64::from(weight(2, j as u64, 0.1));
            for k in 0..D {
                let xb = f64::from(x[[t, k]]) - f64::from(weight(4, k as u64, 0.1));
                pre += xb * f64::from(weight(1, (k * F + j) as u64, 0.05));
            }
            let want = pre.max(0.0);
            assert!(
                (f64::from(acts[[t, j]]) - want).abs() < 1e-4 * want.abs().max(1.0),
                "token {t} feature {j}"
            );
        }
    }
}
