//! Every kind, activation and input normalisation of
//! docs/design.md#3-the-maths-the-reference-every-test-compares-with, built as an ONNX graph, run
//! through ONNX Runtime, and compared with the float64 reference.
//!
//! Tolerance: the normwise relative error `max|ort - ref| / max|ref|` under 1e-5 for activations
//! and reconstructions; TopK indices identical.
#![allow(clippy::unwrap_used)]

use ndarray::Array1;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal, Uniform};
use tiller_runtime::dictionary::{Gated, build_model, reference};
use tiller_runtime::{
    Activation, Dictionary, DictionaryFile, InputNorm, Kind, Meta, SessionOptions, Weights,
};
use tiller_test_support::{randn, rel_err};

const TOL: f64 = 1e-5;

fn randv(rng: &mut StdRng, len: usize, scale: f32) -> Array1<f32> {
    let n = Normal::new(0.0f32, scale).unwrap();
    Array1::from_shape_simple_fn(len, || n.sample(rng))
}

struct Case {
    kind: Kind,
    activation: Activation,
    norm: InputNorm,
    apply_b_dec: bool,
    skip_bias: bool,
}

fn make(case: &Case, seed: u64) -> (Meta, Weights) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (d_in, d_sae) = (32, 96);
    let d_out = if matches!(
        case.kind,
        Kind::Transcoder | Kind::SkipTranscoder | Kind::Clt
    ) {
        24
    } else {
        d_in
    };
    let l = if matches!(case.kind, Kind::Crosscoder | Kind::Clt) {
        3
    } else {
        1
    };
    let li = if case.kind == Kind::Crosscoder { l } else { 1 };
    let mut meta = Meta::new(case.kind, case.activation, d_in, d_sae, d_out);
    meta.n_layers = l;
    meta.input_norm = case.norm;
    if case.activation == Activation::TopK {
        meta.k = Some(8);
    }
    let u = Uniform::new(0.0f32, 0.4).unwrap();
    let w = Weights {
        w_enc: randn(&mut rng, (li * d_in, d_sae), 0.3),
        b_enc: randv(&mut rng, d_sae, 0.1),
        w_dec: randn(&mut rng, (d_sae, l * d_out), 0.3),
        b_dec: randv(&mut rng, l * d_out, 0.2),
        threshold: match case.activation {
            Activation::JumpRelu => {
                Some(Array1::from_shape_simple_fn(d_sae, || u.sample(&mut rng)))
            }
            Activation::BatchTopK => Some(Array1::from_elem(1, 0.25)),
            _ => None,
        },
        gated: (case.activation == Activation::Gated).then(|| Gated {
            r_mag: randv(&mut rng, d_sae, 0.2),
            b_mag: randv(&mut rng, d_sae, 0.1),
        }),
        w_skip: (case.kind == Kind::SkipTranscoder).then(|| randn(&mut rng, (d_out, d_in), 0.2)),
        b_skip: (case.kind == Kind::SkipTranscoder && case.skip_bias)
            .then(|| randv(&mut rng, d_out, 0.1)),
        apply_b_dec_to_input: case.apply_b_dec,
    };
    (meta, w)
}

fn check(case: &Case, seed: u64) {
    let (meta, w) = make(case, seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dict.onnx");
    let model = build_model(&meta, &w).unwrap();
    tiller_runtime::graph::write_model(
        model,
        &path,
        tiller_runtime::graph::EXTERNAL_DATA_THRESHOLD,
    )
    .unwrap();

    let file = DictionaryFile::open(&path).unwrap();
    assert_eq!(file.meta(), &meta, "metadata round trip");
    // The weights read back from the file are the ones written.
    let back = file.weights().unwrap();
    assert_eq!(
        (&back.w_enc, &back.b_enc, &back.w_dec, &back.b_dec),
        (&w.w_enc, &w.b_enc, &w.w_dec, &w.b_dec)
    );
    assert_eq!(
        (&back.threshold, &back.w_skip, &back.b_skip),
        (&w.threshold, &w.w_skip, &w.b_skip)
    );
    assert_eq!(
        back.gated.map(|g| (g.r_mag, g.b_mag)),
        w.gated.clone().map(|g| (g.r_mag, g.b_mag))
    );
    assert_eq!(back.apply_b_dec_to_input, w.apply_b_dec_to_input);
    let dict = Dictionary::from_file(file, &SessionOptions::default()).unwrap();

    let mut rng = StdRng::seed_from_u64(seed + 1000);
    let x = randn(&mut rng, (17, meta.input_layers() * meta.d_in), 1.0) + 0.3;
    let enc = dict.encode(x.view()).unwrap();
    let (acts, recon) = dict.encode_decode(x.view()).unwrap();
    let (ref_acts, ref_recon) = reference::encode_decode(&meta, &w, x.view());
    let label = format!(
        "{} {} {} b_dec_in={}",
        meta.kind, meta.activation, meta.input_norm, case.apply_b_dec
    );
    let ea = rel_err(&enc.acts, &ref_acts);
    let er = rel_err(&recon, &ref_recon);
    assert!(ea < TOL, "{label}: acts rel err {ea:e}");
    assert!(
        rel_err(&acts, &ref_acts) < TOL,
        "{label}: acts (full graph)"
    );
    assert!(er < TOL, "{label}: recon rel err {er:e}");
    // The activation function is really doing something: some features zero, some not.
    let active = ref_acts.iter().filter(|v| **v > 0.0).count();
    assert!(
        active > 0 && active < ref_acts.len(),
        "{label}: degenerate case, {active} active"
    );

    if meta.activation == Activation::TopK {
        let (vals, idx) = enc.top.expect("topk outputs");
        let pre = reference::pre_activations(&meta, &w, x.view());
        for (t, row) in pre.rows().into_iter().enumerate() {
            let want = reference::topk_indices(row.as_slice().unwrap(), 8);
            let got: Vec<usize> = idx.row(t).iter().map(|&i| i as usize).collect();
            assert_eq!(got, want, "{label}: token {t} TopK indices");
            for (j, &i) in want.iter().enumerate() {
                let r = row[i].max(0.0);
                assert!((f64::from(vals[[t, j]]) - r).abs() <= TOL * r.abs().max(1.0));
            }
        }
    }
}

#[test]
fn every_kind_and_activation_matches_the_reference() {
    let mut seed = 1;
    for activation in [
        Activation::Relu,
        Activation::JumpRelu,
        Activation::TopK,
        Activation::BatchTopK,
        Activation::Gated,
    ] {
        for norm in [
            InputNorm::None,
            InputNorm::LayerNorm,
            InputNorm::Scale(0.37),
            InputNorm::NormRescale,
        ] {
            for apply_b_dec in [false, true] {
                seed += 1;
                check(
                    &Case {
                        kind: Kind::Sae,
                        activation,
                        norm,
                        apply_b_dec,
                        skip_bias: false,
                    },
                    seed,
                );
            }
        }
    }
}

#[test]
fn transcoders_and_crosscoders_match_the_reference() {
    let mut seed = 100;
    for activation in [Activation::Relu, Activation::JumpRelu, Activation::TopK] {
        for norm in [InputNorm::None, InputNorm::LayerNorm] {
            for (kind, skip_bias) in [
                (Kind::Transcoder, false),
                (Kind::SkipTranscoder, false),
                (Kind::SkipTranscoder, true),
            ] {
                seed += 1;
                check(
                    &Case {
                        kind,
                        activation,
                        norm,
                        apply_b_dec: false,
                        skip_bias,
                    },
                    seed,
                );
            }
            // A cross-layer transcoder: one input, a decoder to three layers.
            seed += 1;
            check(
                &Case {
                    kind: Kind::Clt,
                    activation,
                    norm,
                    apply_b_dec: false,
                    skip_bias: false,
                },
                seed,
            );
            for apply_b_dec in [false, true] {
                seed += 1;
                check(
                    &Case {
                        kind: Kind::Crosscoder,
                        activation,
                        norm,
                        apply_b_dec,
                        skip_bias: false,
                    },
                    seed,
                );
            }
        }
    }
}

#[test]
fn external_data_round_trips() {
    let case = Case {
        kind: Kind::Sae,
        activation: Activation::Relu,
        norm: InputNorm::None,
        apply_b_dec: true,
        skip_bias: false,
    };
    let (meta, w) = make(&case, 7);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ext.onnx");
    // A threshold of 0 forces external data, as a 2 GiB dictionary would; the weights are streamed
    // to the data file while the graph is built.
    tiller_runtime::dictionary::write_dictionary_with(&meta, &w, &path, 0).unwrap();
    assert!(dir.path().join("ext.onnx.data").is_file());
    let file = DictionaryFile::open(&path).unwrap();
    assert!(file.has_external_data());
    assert_eq!(file.w_dec().unwrap(), w.w_dec);
    let dict = Dictionary::from_file(file, &SessionOptions::default()).unwrap();
    let x = randn(&mut StdRng::seed_from_u64(3), (5, meta.d_in), 1.0);
    let (acts, recon) = dict.encode_decode(x.view()).unwrap();
    let (ra, rr) = reference::encode_decode(&meta, &w, x.view());
    assert!(rel_err(&acts, &ra) < TOL);
    assert!(rel_err(&recon, &rr) < TOL);
}
