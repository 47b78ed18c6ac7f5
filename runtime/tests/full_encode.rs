//! The native full encode (every feature, `W_enc` packed and read at its stored width) against
//! the float64 reference of docs/design.md#3-the-maths-the-reference-every-test-compares-with, for
//! f32, f16 and bf16 weights, every activation it supports, every input normalisation, batches 1, 7
//! and 64, and widths that are not multiples of any SIMD width or of the packing's panel.
//! Half-width dictionaries are compared with the reference computed on the same rounded weights
//! (what the file holds), and also run through ONNX Runtime (their graph reads the weights through
//! a `Cast`). Then the choice of path: where the native encoder applies, `Dictionary` and `Runtime`
//! use it, and elsewhere ONNX Runtime, with the same results.
//!
//! Tolerance: the normwise relative error `max|native - ref| / max|ref|` under 1e-5, TopK indices
//! identical. A feature whose reference pre-activation lies within 1e-5 (normwise) of its
//! threshold or of the gate (or a TopK boundary that close to a tie) can fall either way in
//! float32 and is left out of the comparison; the test counts them and requires few.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal, Uniform};
use tiller_runtime::dictionary::{Gated, WeightDtype, reference, write_dictionary_as};
use tiller_runtime::{
    Activation, ActivationsMut, Backend, Dictionary, DictionaryFile, InputNorm, Kind, Meta, Phase,
    Runtime, SessionOptions, Token, Weights,
};
use tiller_test_support::randn;

const TOL: f64 = 1e-5;

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

/// Runs `f` and returns how many heap allocations it made on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    counting_alloc::counted(f).1
}

fn randv(rng: &mut StdRng, len: usize, scale: f32) -> Array1<f32> {
    let n = Normal::new(0.0f32, scale).unwrap();
    Array1::from_shape_simple_fn(len, || n.sample(rng))
}

fn native() -> SessionOptions {
    SessionOptions {
        native: true,
        ..SessionOptions::default()
    }
}

/// A random dictionary of `kind` with `d_in` inputs and `d_sae` features.
fn make(
    kind: Kind,
    activation: Activation,
    norm: InputNorm,
    b_dec_in: bool,
    (d_in, d_sae): (usize, usize),
    seed: u64,
) -> (Meta, Weights) {
    let mut rng = StdRng::seed_from_u64(seed);
    let layers = if kind == Kind::Crosscoder { 2 } else { 1 };
    let mut meta = Meta::new(kind, activation, d_in, d_sae, d_in);
    meta.n_layers = layers;
    meta.input_norm = norm;
    meta.hook_in = (0..layers)
        .map(|l| format!("h{l}"))
        .collect::<Vec<_>>()
        .join(",");
    meta.hook_out = meta.hook_in.clone();
    if activation == Activation::TopK {
        meta.k = Some(9);
    }
    let u = Uniform::new(0.0f32, 0.4).unwrap();
    let scale = 1.5 / (d_in as f32).sqrt();
    let w = Weights {
        w_enc: randn(&mut rng, (layers * d_in, d_sae), scale),
        b_enc: randv(&mut rng, d_sae, 0.1),
        w_dec: randn(&mut rng, (d_sae, layers * d_in), 0.3),
        b_dec: randv(&mut rng, layers * d_in, 0.2),
        threshold: match activation {
            Activation::JumpRelu => {
                Some(Array1::from_shape_simple_fn(d_sae, || u.sample(&mut rng)))
            }
            Activation::BatchTopK => Some(Array1::from_elem(1, 0.25)),
            _ => None,
        },
        gated: (activation == Activation::Gated).then(|| Gated {
            r_mag: randv(&mut rng, d_sae, 0.2),
            b_mag: randv(&mut rng, d_sae, 0.1),
        }),
        w_skip: None,
        b_skip: None,
        apply_b_dec_to_input: b_dec_in,
    };
    (meta, w)
}

/// Compares `acts` with the reference on `w` (the weights as the file holds them), leaving out
/// the features that sit on a threshold; returns the error and how many were left out.
fn compare(meta: &Meta, w: &Weights, x: &Array2<f32>, acts: &Array2<f32>) -> (f64, usize) {
    let want = reference::encode(meta, w, x.view());
    let pre = reference::pre_activations(meta, w, x.view());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    let margin = TOL * pre.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut err = 0.0f64;
    let mut skipped = 0;
    for t in 0..x.nrows() {
        let row = pre.row(t);
        // TopK: the k-th and (k+1)-th largest too close to order reliably.
        let topk_tie = meta.activation == Activation::TopK && {
            let mut sorted: Vec<f64> = row.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let k = meta.k.unwrap();
            k < sorted.len() && sorted[k - 1] - sorted[k] < margin
        };
        for j in 0..meta.d_sae {
            let edge = match meta.activation {
                Activation::JumpRelu => {
                    let th = w.threshold.as_ref().unwrap()[j];
                    (row[j] - f64::from(th)).abs() < margin
                }
                Activation::BatchTopK => {
                    let th = w.threshold.as_ref().unwrap()[0];
                    (row[j] - f64::from(th)).abs() < margin
                }
                Activation::Gated => row[j].abs() < margin,
                Activation::TopK => topk_tie,
                _ => false,
            };
            if edge {
                // A TopK row counts once.
                if !topk_tie || j == 0 {
                    skipped += 1;
                }
                continue;
            }
            err = err.max((f64::from(acts[[t, j]]) - want[[t, j]]).abs());
        }
    }
    (err / scale, skipped)
}

/// Writes the dictionary with its weights stored as `dtype` and opens it.
fn write(dir: &Path, meta: &Meta, w: &Weights, dtype: WeightDtype) -> DictionaryFile {
    let path = dir.join(format!("{}-{dtype}.onnx", meta.activation));
    write_dictionary_as(meta, w, &path, dtype).unwrap();
    DictionaryFile::open(&path).unwrap()
}

#[test]
fn native_full_encode_matches_the_float64_reference() {
    let dir = tempfile::tempdir().unwrap();
    let activations = [
        Activation::Relu,
        Activation::JumpRelu,
        Activation::BatchTopK,
        Activation::Gated,
        Activation::TopK,
    ];
    let norms = [
        (InputNorm::None, true),
        (InputNorm::None, false),
        (InputNorm::LayerNorm, true),
        (InputNorm::Scale(0.7), true),
        (InputNorm::NormRescale, false),
    ];
    let mut cases = 0;
    let mut skipped = 0;
    for (ai, &activation) in activations.iter().enumerate() {
        for (ni, &(norm, b_dec_in)) in norms.iter().enumerate() {
            // 37 inputs and 75 features: no SIMD width or panel divides them; one larger size.
            let dims = if ni == 0 { (130, 300) } else { (37, 75) };
            let seed = (ai * 10 + ni) as u64;
            let (meta, w) = make(Kind::Sae, activation, norm, b_dec_in, dims, seed);
            for dtype in [WeightDtype::F32, WeightDtype::F16, WeightDtype::Bf16] {
                let file = write(dir.path(), &meta, &w, dtype);
                assert_eq!(file.meta(), &meta, "the metadata does not change");
                assert_eq!(file.weight_dtype(), dtype);
                // The file holds the weights rounded to `dtype`: the reference uses those.
                let held = file.weights().unwrap();
                assert_eq!(held.w_enc, w.w_enc.mapv(|v| dtype.round(v)));
                assert_eq!(held.w_dec, w.w_dec.mapv(|v| dtype.round(v)));
                assert_eq!(held.b_enc, w.b_enc, "biases stay float32");
                let dict = Dictionary::from_file(file.clone(), &native()).unwrap();
                assert_eq!(dict.backend(), Backend::Native(dtype));
                let ort = Dictionary::from_file(file, &SessionOptions::default()).unwrap();
                assert_eq!(ort.backend(), Backend::OnnxRuntime);
                for batch in [1, 7, 64] {
                    let label =
                        format!("{activation} {norm} b_dec_in={b_dec_in} {dtype} batch {batch}");
                    let mut rng = StdRng::seed_from_u64(seed * 100 + batch as u64);
                    let x = randn(&mut rng, (batch, meta.d_in), 1.0) + 0.3;
                    let enc = dict.encode(x.view()).unwrap();
                    let (err, skip) = compare(&meta, &held, &x, &enc.acts);
                    assert!(err < TOL, "{label}: native rel err {err:e}");
                    skipped += skip;
                    // ONNX Runtime runs the same file (a Cast reads half-width weights).
                    let by_ort = ort.encode(x.view()).unwrap();
                    let (err, _) = compare(&meta, &held, &x, &by_ort.acts);
                    assert!(err < TOL, "{label}: ONNX Runtime rel err {err:e}");
                    if activation == Activation::TopK {
                        let (values, indices) = enc.top.as_ref().unwrap();
                        let (ort_values, ort_indices) = by_ort.top.as_ref().unwrap();
                        assert_eq!(values.dim(), (batch, 9));
                        for t in 0..batch {
                            let tie = compare(
                                &meta,
                                &held,
                                &x.slice(ndarray::s![t..t + 1, ..]).to_owned(),
                                &enc.acts.slice(ndarray::s![t..t + 1, ..]).to_owned(),
                            )
                            .1 > 0;
                            if !tie {
                                assert_eq!(
                                    indices.row(t),
                                    ort_indices.row(t),
                                    "{label}: token {t}"
                                );
                            }
                            for (r, &i) in indices.row(t).iter().enumerate() {
                                assert_eq!(values[[t, r]], enc.acts[[t, i as usize]]);
                            }
                            let vs = values.row(t).to_vec();
                            assert!(vs.windows(2).all(|p| p[0] >= p[1]), "{label}: sorted");
                            let max_err = vs
                                .iter()
                                .zip(ort_values.row(t))
                                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                            assert!(tie || max_err < 1e-4, "{label}: values");
                        }
                    }
                    // The activation function does something: some features zero, some not.
                    let active = enc.acts.iter().filter(|v| **v > 0.0).count();
                    assert!(
                        active > 0 && active < enc.acts.len(),
                        "{label}: {active} active"
                    );
                    cases += 1;
                }
                // The decoder reads its half-width `W_dec` through the Cast too.
                let x = randn(&mut StdRng::seed_from_u64(seed), (5, meta.d_in), 1.0);
                let (_, recon) = ort.encode_decode(x.view()).unwrap();
                let (_, want) = reference::encode_decode(&meta, &held, x.view());
                let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                let err = recon
                    .iter()
                    .zip(want.iter())
                    .fold(0.0f64, |m, (a, b)| m.max((f64::from(*a) - b).abs()))
                    / scale;
                assert!(err < TOL, "{activation} {dtype}: recon rel err {err:e}");
            }
        }
    }
    assert_eq!(cases, 5 * 5 * 3 * 3);
    // Of 5·5·3·(1+7+64) tokens of 75 to 300 features, a handful at most sit on an edge.
    eprintln!("{skipped} features (TopK: rows) left out");
    assert!(skipped < 50, "{skipped} features (TopK: rows) left out");
}

#[test]
fn probes_and_vectors_encode_natively() {
    let mut rng = StdRng::seed_from_u64(5);
    let (d, n) = (37, 11);
    let x = randn(&mut rng, (7, d), 1.0);
    for activation in [Activation::Sigmoid, Activation::Linear] {
        let (meta, w) = tiller_runtime::dictionary::probe_dictionary(
            randn(&mut rng, (n, d), 0.3),
            randv(&mut rng, n, 0.2),
            activation,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), &meta, &w, WeightDtype::F32);
        let dict = Dictionary::from_file(file, &native()).unwrap();
        assert_eq!(dict.backend(), Backend::Native(WeightDtype::F32));
        let (err, _) = compare(&meta, &w, &x, &dict.encode(x.view()).unwrap().acts);
        assert!(err < TOL, "probe {activation}: rel err {err:e}");
    }
}

#[test]
fn crosscoders_and_plain_dictionaries_fall_back_to_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let (meta, w) = make(
        Kind::Crosscoder,
        Activation::Relu,
        InputNorm::LayerNorm,
        true,
        (37, 75),
        3,
    );
    let file = write(dir.path(), &meta, &w, WeightDtype::F16);
    let held = file.weights().unwrap();
    let dict = Dictionary::from_file(file, &native()).unwrap();
    assert_eq!(dict.backend(), Backend::OnnxRuntime);
    let x = randn(&mut StdRng::seed_from_u64(4), (7, 2 * 37), 1.0);
    let (err, _) = compare(&meta, &held, &x, &dict.encode(x.view()).unwrap().acts);
    assert!(
        err < TOL,
        "crosscoder through ONNX Runtime: rel err {err:e}"
    );
}

const CONFIG: &str = r#"
[runtime]
fvu_sample_rate = 0.0

[[dictionary]]
name = "topk"
path = "topk.onnx"
hook = "a"

[[dictionary]]
name = "relu"
path = "relu.onnx"
hook = "b"

[[dictionary]]
name = "cross"
path = "cross.onnx"
hook = "b, c"

[[monitor]]
name = "t"
dictionary = "topk"
features = [2, 40, 41]
threshold = 1e9
window = "request"
aggregate = "max"

[[monitor]]
name = "r"
dictionary = "relu"
features = [7]
threshold = 1e9
window = "request"
aggregate = "max"

[[monitor]]
name = "c"
dictionary = "cross"
features = [3, 60]
threshold = 1e9
window = "request"
aggregate = "max"

# A request may steer any feature of `relu`: one outside the monitors' makes it encode in full.
[[requests.dictionary]]
name = "relu"
any_feature = true
"#;

/// The largest activation over the tokens of each of `features`, from the reference.
fn ref_max(meta: &Meta, w: &Weights, x: &Array2<f32>, features: &[usize]) -> Vec<f32> {
    let f = reference::encode(meta, w, x.view());
    features
        .iter()
        .map(|&j| f.column(j).iter().fold(0.0f64, |m, v| m.max(*v)) as f32)
        .collect()
}

#[test]
fn the_runtime_encodes_natively_where_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let d = 37;
    let (tk_meta, tk_w) = make(
        Kind::Sae,
        Activation::TopK,
        InputNorm::None,
        true,
        (d, 75),
        21,
    );
    let (re_meta, re_w) = make(
        Kind::Sae,
        Activation::Relu,
        InputNorm::None,
        true,
        (d, 75),
        22,
    );
    let (cc_meta, cc_w) = make(
        Kind::Crosscoder,
        Activation::Relu,
        InputNorm::None,
        false,
        (d, 75),
        23,
    );
    write_dictionary_as(
        &tk_meta,
        &tk_w,
        &dir.path().join("topk.onnx"),
        WeightDtype::Bf16,
    )
    .unwrap();
    write_dictionary_as(
        &re_meta,
        &re_w,
        &dir.path().join("relu.onnx"),
        WeightDtype::F16,
    )
    .unwrap();
    write_dictionary_as(
        &cc_meta,
        &cc_w,
        &dir.path().join("cross.onnx"),
        WeightDtype::F32,
    )
    .unwrap();
    let tk_held = DictionaryFile::open(dir.path().join("topk.onnx"))
        .unwrap()
        .weights()
        .unwrap();
    let re_held = DictionaryFile::open(dir.path().join("relu.onnx"))
        .unwrap()
        .weights()
        .unwrap();
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let rt = Runtime::from_config_file(&cfg).unwrap();
    assert_eq!(rt.backend("topk"), Some(Backend::Native(WeightDtype::Bf16)));
    assert_eq!(rt.backend("relu"), Some(Backend::Native(WeightDtype::F16)));
    assert_eq!(rt.backend("cross"), Some(Backend::OnnxRuntime));
    assert_eq!(rt.backend("nope"), None);

    // Request 1 clamps a feature of `relu` that the config does not name: every feature of
    // `relu` is computed for it (natively).
    rt.begin_request(
        1,
        None,
        Some(r#"{"steer": [{"dictionary": "relu", "op": "clamp", "feature": 50, "value": 1.0}]}"#),
    )
    .unwrap();
    rt.begin_request(2, None, None).unwrap();
    let n = 7;
    let tokens: Vec<Token> = (0..n)
        .map(|t| Token {
            request: 1 + (t % 2) as u64,
            phase: Phase::Prompt,
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(9);
    let xa = randn(&mut rng, (n, d), 1.0);
    let xb = randn(&mut rng, (n, d), 1.0);
    let xc = randn(&mut rng, (n, d), 1.0);
    // The reference: the clamp on request 1's tokens of hook b.
    let f = reference::encode(&re_meta, &re_held, xb.view());
    let mut want_b = xb.mapv(f64::from);
    for t in (0..n).filter(|t| t % 2 == 0) {
        let c = 1.0 - f[[t, 50]];
        for j in 0..d {
            want_b[[t, j]] += c * f64::from(re_held.w_dec[[50, j]]);
        }
    }
    let (mut a, mut b, mut c) = (xa.clone(), xb.clone(), xc.clone());
    for _ in 0..2 {
        // Twice: the second step reuses the first one's buffers.
        let (mut a2, mut b2, mut c2) = (xa.clone(), xb.clone(), xc.clone());
        let mut step = rt.step(&tokens).unwrap();
        step.hook("a", ActivationsMut::F32(a2.as_slice_mut().unwrap()))
            .unwrap();
        step.hook("b", ActivationsMut::F32(b2.as_slice_mut().unwrap()))
            .unwrap();
        step.hook("c", ActivationsMut::F32(c2.as_slice_mut().unwrap()))
            .unwrap();
        step.finish();
        (a, b, c) = (a2, b2, c2);
    }
    assert_eq!(a, xa, "no rule edits hook a");
    assert_eq!(c, xc, "no rule edits hook c");
    let scale = want_b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let err = b
        .iter()
        .zip(want_b.iter())
        .fold(0.0f64, |m, (x, y)| m.max((f64::from(*x) - y).abs()))
        / scale;
    assert!(
        err < TOL,
        "clamp through the native full encode: rel err {err:e}"
    );

    // What the monitors saw, per request, against the reference.
    let rows = |x: &Array2<f32>, r: usize| -> Array2<f32> {
        let idx: Vec<usize> = (0..n).filter(|t| t % 2 == r).collect();
        x.select(ndarray::Axis(0), &idx)
    };
    for (r, id) in [(0usize, 1u64), (1, 2)] {
        let summary = rt.end_request(id).unwrap();
        let got = |dict: &str, fs: &[u32]| -> Vec<f32> {
            fs.iter()
                .map(|f| {
                    summary
                        .features
                        .get(dict)
                        .and_then(|m| m.get(f))
                        .map_or(0.0, |s| s.max)
                })
                .collect()
        };
        let want = ref_max(&tk_meta, &tk_held, &rows(&xa, r), &[2, 40, 41]);
        let have = got("topk", &[2, 40, 41]);
        for (h, w) in have.iter().zip(&want) {
            assert!(
                (h - w).abs() <= 1e-5 * w.abs().max(1.0),
                "topk request {id}: {have:?} vs {w:?}"
            );
        }
        let want = ref_max(&re_meta, &re_held, &rows(&xb, r), &[7]);
        assert!((got("relu", &[7])[0] - want[0]).abs() <= 1e-5 * want[0].max(1.0));
        // A hook's dictionaries read it before its rules edit it.
        let xbc = ndarray::concatenate(
            ndarray::Axis(1),
            &[rows(&xb, r).view(), rows(&xc, r).view()],
        )
        .unwrap();
        let want = ref_max(&cc_meta, &cc_w, &xbc, &[3, 60]);
        let have = got("cross", &[3, 60]);
        for (h, w) in have.iter().zip(&want) {
            assert!(
                (h - w).abs() <= 1e-5 * w.abs().max(1.0),
                "cross request {id}: {have:?} vs {want:?}"
            );
        }
    }
}

#[test]
fn warm_native_encodes_allocate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // LayerNorm needs the input buffer, TopK the selection's heap.
    for (activation, norm) in [
        (Activation::Relu, InputNorm::LayerNorm),
        (Activation::TopK, InputNorm::None),
    ] {
        let (meta, w) = make(Kind::Sae, activation, norm, true, (37, 75), 31);
        let file = write(dir.path(), &meta, &w, WeightDtype::F16);
        let dict = Dictionary::from_file(file, &native()).unwrap();
        let x = randn(&mut StdRng::seed_from_u64(1), (8, 37), 1.0);
        let mut acts = Array2::<f32>::zeros((8, 75));
        dict.encode_into(x.view(), acts.view_mut()).unwrap();
        assert_eq!(acts, dict.encode(x.view()).unwrap().acts);
        let n = allocations(|| {
            for b in [8, 1, 5] {
                dict.encode_into(
                    x.slice(ndarray::s![..b, ..]),
                    acts.slice_mut(ndarray::s![..b, ..]),
                )
                .unwrap();
            }
        });
        assert_eq!(n, 0, "{activation}: {n} allocations");
    }

    // A runtime step through a TopK dictionary, with a request whose rule needs every feature.
    let (meta, w) = make(
        Kind::Sae,
        Activation::TopK,
        InputNorm::None,
        true,
        (37, 75),
        32,
    );
    write_dictionary_as(&meta, &w, &dir.path().join("topk.onnx"), WeightDtype::Bf16).unwrap();
    let cfg = dir.path().join("t.toml");
    std::fs::write(
        &cfg,
        "[runtime]\nfvu_sample_rate = 0.0\n[[dictionary]]\nname = \"topk\"\npath = \"topk.onnx\"\n\
         hook = \"a\"\n[[monitor]]\nname = \"t\"\ndictionary = \"topk\"\nfeatures = [2, 40]\n\
         threshold = 1e9\nwindow = \"request\"\naggregate = \"max\"\n\
         [[requests.dictionary]]\nname = \"topk\"\nany_feature = true\n",
    )
    .unwrap();
    let rt = Runtime::from_config_file(&cfg).unwrap();
    rt.begin_request(
        1,
        None,
        Some(r#"{"steer": [{"dictionary": "topk", "op": "ablate", "feature": 50}]}"#),
    )
    .unwrap();
    rt.begin_request(2, None, None).unwrap();
    let tokens: Vec<Token> = (0..8)
        .map(|t| Token {
            request: 1 + t % 2,
            phase: Phase::Generated,
        })
        .collect();
    let x = randn(&mut StdRng::seed_from_u64(2), (8, 37), 1.0);
    let run = |tokens: &[Token]| {
        let mut buf = x.slice(ndarray::s![..tokens.len(), ..]).to_owned();
        let mut step = rt.step(tokens).unwrap();
        step.hook("a", ActivationsMut::F32(buf.as_slice_mut().unwrap()))
            .unwrap();
        step.finish();
    };
    for _ in 0..3 {
        run(&tokens);
    }
    let mut bufs: Vec<Array2<f32>> = (0..4).map(|_| x.clone()).collect();
    let n = allocations(|| {
        for buf in bufs.iter_mut() {
            for b in [8, 1] {
                let mut step = rt.step(&tokens[..b]).unwrap();
                step.hook(
                    "a",
                    ActivationsMut::F32(&mut buf.as_slice_mut().unwrap()[..b * 37]),
                )
                .unwrap();
                step.finish();
            }
        }
    });
    assert_eq!(n, 0, "steady-state TopK steps allocated {n} times");
    assert_ne!(bufs[0], x, "request 1's tokens were edited");
}
