//! The server against the official `openai` Python client (installed in `.venv` by
//! `scripts/test`) and what it answers for an input a monitor stopped.
//!
//! - base64: the client's default (base64) vectors and an explicit base64 answer are bit for bit
//!   the `float` answer's, which is within 1e-4 relative error of the float64 NumPy implementation
//!   of all-MiniLM-L6-v2 (`examples/minilm/tests/reference.py`); another encoding is a 400 the
//!   client raises as `BadRequestError` naming the field.
//! - stops: a `stop` monitor whose threshold sits between the inputs' largest activations of its
//!   feature (computed here from the residual stream, in float64): the inputs above it come back
//!   with no embedding and the monitor's name, the others with their embedding unchanged, and
//!   `embedding_server_stopped_inputs_total` goes up by the number stopped.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use base64::Engine;
use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use serde_json::{Value, json};
use tiller_minilm::{Hidden, MiniLm, Options, provision};
use tiller_runtime::{Activation, Kind, Meta, Weights};

const D: usize = 384;
const F: usize = 64;
const LAYER: usize = 3;

const TEXTS: [&str; 8] = [
    "The licensee shall not sublicense the software without written consent.",
    "def parse(line): return [int(x) for x in line.split(',')]",
    "The quick brown fox jumps over the lazy dog.",
    "Prices rose 3.5 percent in 2023, the highest in 40 years.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy.",
    "She walked along the beach at sunset, listening to the waves.",
    "Crème brûlée is a dessert of rich custard topped with caramelised sugar.",
    "In 1969, 3 astronauts flew 384,400 km to the Moon aboard Apollo 11.",
];

/// A ReLU dictionary on the layer-3 residual stream; returns its encoder `[D, F]` and bias.
fn write_dictionary(path: &Path) -> (Array2<f32>, Array1<f32>) {
    let mut rng = StdRng::seed_from_u64(23);
    let n = Normal::new(0.0f32, 1.0 / (D as f32).sqrt()).unwrap();
    let mut meta = Meta::new(Kind::Sae, Activation::Relu, D, F, D);
    meta.hook_in = format!("encoder.layer.{LAYER}");
    meta.hook_out = meta.hook_in.clone();
    let w_dec = Array2::from_shape_simple_fn((F, D), || n.sample(&mut rng));
    let w_enc = w_dec.t().to_owned();
    let b_enc = Array1::from_elem(F, -0.1);
    let weights = Weights::new(w_enc.clone(), b_enc.clone(), w_dec, Array1::zeros(D));
    let model = tiller_runtime::dictionary::build_model(&meta, &weights).unwrap();
    tiller_runtime::graph::write_model(model, path, tiller_runtime::graph::EXTERNAL_DATA_THRESHOLD)
        .unwrap();
    (w_enc, b_enc)
}

/// Runs `script` with `$TILLER_PYTHON`, else the workspace's `.venv` (where `scripts/test`
/// installs the client), `input` on stdin; its stdout as JSON.
fn run_python(script: &Path, input: &Value) -> Value {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    tiller_test_support::run_python_json(
        &tiller_test_support::python(venv),
        script,
        input,
        "scripts/test installs numpy and openai into .venv",
    )
}

fn client(addr: &str, texts: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    run_python(
        &script,
        &json!({"base_url": format!("http://{addr}/v1"), "texts": texts}),
    )
}

/// A JSON list of numbers as float32 bit patterns: every value the server sends is a float32,
/// so its shortest decimal form read back as f64 and narrowed is that float32 exactly.
fn bits(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| (x.as_f64().unwrap() as f32).to_bits())
        .collect()
}

fn base64_bits(v: &Value) -> Vec<u32> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap();
    assert_eq!(bytes.len(), 4 * D);
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

fn scrape(addr: &str) -> String {
    let (status, m) = embedding_server::client::http(addr, "GET", "/metrics", &[], "").unwrap();
    assert_eq!(status, 200);
    m
}

const DICTIONARY: &str = "[[dictionary]]\nname = \"l3\"\npath = \"l3.onnx\"\n";

#[test]
fn official_client_gets_base64_and_float_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    write_dictionary(&dir.path().join("l3.onnx"));
    // A monitor that flags only: embeddings are the model's own.
    let server = common::start_in(
        dir.path(),
        &format!(
            "{DICTIONARY}\n[[monitor]]\nname = \"watch\"\ndictionary = \"l3\"\nfeatures = [0, 1]\n\
             threshold = 0.05\nwindow = \"token\"\naction = \"flag\"\n"
        ),
    );
    let out = client(&server.addr, &TEXTS);

    // The client asks for base64 by default and gets strings over the wire.
    assert_eq!(out["sent"]["encoding_format"], "base64", "{}", out["sent"]);
    let raw = out["raw"].as_array().unwrap();
    assert_eq!(raw.len(), TEXTS.len());
    let float: Vec<Vec<u32>> = out["float"].as_array().unwrap().iter().map(bits).collect();
    for i in 0..TEXTS.len() {
        assert_eq!(float[i].len(), D);
        assert_eq!(base64_bits(&raw[i]), float[i], "wire base64 of input {i}");
        assert_eq!(
            bits(&out["default"][i]),
            float[i],
            "the client's decoded vector {i}"
        );
        assert_eq!(
            base64_bits(&out["base64"][i]),
            float[i],
            "explicit base64 of input {i}"
        );
        assert_eq!(out["tiller"][i]["stopped"], false);
        assert!(out["tiller"][i]["tokens"].as_u64().unwrap() > 2);
    }

    // Another encoding: the client raises the server's 400, which names the field.
    let bad = &out["bad"];
    assert_eq!(bad["class"], "BadRequestError", "{bad}");
    assert_eq!(bad["status"], 400, "{bad}");
    let body = if bad["body"]["message"].is_string() {
        &bad["body"]
    } else {
        &bad["body"]["error"]
    };
    assert_eq!(body["type"], "invalid_request_error", "{bad}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("`encoding_format` \"int8\""),
        "{bad}"
    );

    // The float answer against the float64 NumPy implementation of the model.
    let reference = run_python(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../minilm/tests/reference.py"),
        &json!({"model_dir": provision::model_dir().unwrap(), "texts": TEXTS, "layer": LAYER, "edit": null}),
    );
    for (i, want) in reference["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let want: Vec<f64> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let got: Vec<f64> = float[i]
            .iter()
            .map(|&b| f64::from(f32::from_bits(b)))
            .collect();
        let num: f64 = got.iter().zip(&want).map(|(g, w)| (g - w).powi(2)).sum();
        let den: f64 = want.iter().map(|w| w * w).sum();
        let rel = (num / den).sqrt();
        assert!(
            rel < 1e-4,
            "input {i}: relative error {rel:e} to the reference"
        );
    }
}

/// Each text's residual-stream rows at the hook, the texts run as one batch as the server runs them.
fn residuals(model: &MiniLm) -> Vec<Vec<Vec<f32>>> {
    let mut out = vec![Vec::new(); TEXTS.len()];
    let mut hook = |h: &mut Hidden<'_>| -> anyhow::Result<()> {
        for (seq, range) in h.sequences.iter().enumerate() {
            for row in range.clone() {
                out[seq].push(h.data[row * h.d..(row + 1) * h.d].to_vec());
            }
        }
        Ok(())
    };
    model.embed(&TEXTS, Some(&mut hook)).unwrap();
    out
}

/// Each text's largest activation of `feature` over its tokens, ReLU applied, in float64.
fn largest_activations(
    rows: &[Vec<Vec<f32>>],
    w_enc: &Array2<f32>,
    b_enc: &Array1<f32>,
    feature: usize,
) -> Vec<f64> {
    rows.iter()
        .map(|text| {
            text.iter()
                .map(|x| {
                    x.iter()
                        .enumerate()
                        .map(|(j, &v)| f64::from(v) * f64::from(w_enc[[j, feature]]))
                        .sum::<f64>()
                        + f64::from(b_enc[feature])
                })
                .fold(0.0, f64::max)
        })
        .collect()
}

#[test]
fn stopped_inputs_get_no_embedding_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (w_enc, b_enc) = write_dictionary(&dir.path().join("l3.onnx"));
    let model = MiniLm::load(
        &provision::model_dir().unwrap(),
        Options {
            hook_layer: LAYER,
            ..Options::default()
        },
    )
    .unwrap();
    let (plain, _) = model.embed(&TEXTS, None).unwrap();
    let rows = residuals(&model);

    // The feature whose largest activations split the texts best: a threshold in the widest gap
    // with at least two texts on each side, far from every text's value.
    let mut best: Option<(f64, usize, f64)> = None;
    for feature in 0..F {
        let acts = largest_activations(&rows, &w_enc, &b_enc, feature);
        let mut sorted = acts.clone();
        sorted.sort_by(f64::total_cmp);
        for k in 2..=TEXTS.len() - 2 {
            let (lo, hi) = (sorted[k - 1], sorted[k]);
            if hi - lo > best.map_or(0.0, |b| b.0) {
                best = Some((hi - lo, feature, (lo + hi) / 2.0));
            }
        }
    }
    let (gap, feature, threshold) = best.unwrap();
    assert!(gap > 0.05, "no feature splits the texts: widest gap {gap}");
    let acts = largest_activations(&rows, &w_enc, &b_enc, feature);
    let want_stopped: Vec<bool> = acts.iter().map(|&a| a > threshold).collect();
    let n_stopped = want_stopped.iter().filter(|&&s| s).count();
    assert!(n_stopped >= 2 && n_stopped <= TEXTS.len() - 2);

    let server = common::start_in(
        dir.path(),
        &format!(
            "{DICTIONARY}\n[[monitor]]\nname = \"stopper\"\ndictionary = \"l3\"\nfeatures = [{feature}]\n\
             threshold = {threshold}\nwindow = \"token\"\naction = \"stop\"\n"
        ),
    );
    let addr = &server.addr;
    assert_eq!(
        metric(
            &scrape(addr),
            "embedding_server_stopped_inputs_total{monitor=\"stopper\"}"
        ),
        0.0
    );

    let check = |data: &[Value], base64: bool| {
        assert_eq!(data.len(), TEXTS.len());
        // The stopped inputs first: what a server that ignores stops gets wrong.
        let order = (0..TEXTS.len()).filter(|&i| want_stopped[i]);
        for i in order.chain((0..TEXTS.len()).filter(|&i| !want_stopped[i])) {
            let (d, t) = (&data[i], &data[i]["tiller"]);
            if want_stopped[i] {
                assert!(
                    d["embedding"].is_null(),
                    "input {i} (largest activation {:.4} > {threshold:.4}) was stopped but has an embedding",
                    acts[i]
                );
                assert_eq!(t["stopped"], true, "input {i}: {t}");
                assert_eq!(t["stop"]["monitor"], "stopper", "input {i}: {t}");
            } else {
                let e: Vec<f32> = if base64 {
                    base64_bits(&d["embedding"])
                        .into_iter()
                        .map(f32::from_bits)
                        .collect()
                } else {
                    bits(&d["embedding"])
                        .into_iter()
                        .map(f32::from_bits)
                        .collect()
                };
                // Monitoring alone: the model's own embedding.
                let cos: f64 = e
                    .iter()
                    .zip(plain.row(i))
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                assert!(cos > 1.0 - 1e-6, "input {i} changed: cosine {cos}");
                assert_eq!(t["stopped"], false, "input {i}: {t}");
            }
        }
    };

    // Plain HTTP with float vectors.
    let body = json!({"input": TEXTS, "encoding_format": "float"}).to_string();
    let (status, resp) =
        embedding_server::client::http(addr, "POST", "/v1/embeddings", &[], &body).unwrap();
    assert_eq!(status, 200, "{resp}");
    let v: Value = serde_json::from_str(&resp).unwrap();
    check(v["data"].as_array().unwrap(), false);
    assert_eq!(
        metric(
            &scrape(addr),
            "embedding_server_stopped_inputs_total{monitor=\"stopper\"}"
        ) as usize,
        n_stopped
    );

    // The official client (four calls of the texts: default, float, base64, and a refused one):
    // the stopped inputs come back as None, and the client's base64 decoding passes over them.
    let out = client(addr, &TEXTS);
    for i in 0..TEXTS.len() {
        assert_eq!(out["default"][i].is_null(), want_stopped[i], "input {i}");
        assert_eq!(out["raw"][i].is_null(), want_stopped[i], "input {i}");
        assert_eq!(out["tiller"][i]["stopped"], want_stopped[i], "input {i}");
    }
    let wire: Vec<Value> = out["raw"]
        .as_array()
        .unwrap()
        .iter()
        .zip(out["tiller"].as_array().unwrap())
        .map(|(e, t)| json!({"embedding": e, "tiller": t}))
        .collect();
    check(&wire, true);
    assert_eq!(
        metric(
            &scrape(addr),
            "embedding_server_stopped_inputs_total{monitor=\"stopper\"}"
        ) as usize,
        4 * n_stopped,
        "one HTTP call and three served client calls"
    );
}
