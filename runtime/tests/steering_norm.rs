//! Steering edits in the model's space for every input normalisation (docs: steering semantics;
//! design section 4): every feature edit must move the activations by `decode(f') − decode(f)`,
//! the reconstruction un-normalised as the dictionary's own reconstruction is. The reference is
//! the float64 decoder of `tiller_runtime::dictionary::reference`, run twice (with the token's feature
//! activations and with the edited ones) and subtracted: it never looks at a decoder row.
//! Every normalisation × every op × SAE, transcoder, CLT and crosscoder. Tolerance: normwise
//! relative error of the edited activations under 1e-5 (f32 against float64).
#![allow(clippy::unwrap_used)]

use std::path::Path;

use ndarray::{Array1, Array2, ArrayView2, Axis, concatenate};
use ndarray_npy::WriteNpyExt;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tiller_runtime::dictionary::reference;
use tiller_runtime::{
    Activation, ActivationsMut, InputNorm, Kind, Meta, Phase, Runtime, Token, Weights,
};
use tiller_test_support::{randn_around, write_dictionary};

const TOL: f64 = 1e-5;
const D: usize = 24;
const F: usize = 48;
/// Tokens per request (one request per op).
const T: usize = 3;

/// A dictionary's shape for one kind: its hooks in and out, input and output layers.
struct Shape {
    kind: Kind,
    hooks_in: Vec<&'static str>,
    hooks_out: Vec<&'static str>,
    /// The hook the rules write (a crosscoder can only edit its last layer).
    edited: &'static str,
}

fn shape(kind: Kind) -> Shape {
    match kind {
        Kind::Sae => Shape {
            kind,
            hooks_in: vec!["res"],
            hooks_out: vec!["res"],
            edited: "res",
        },
        Kind::Transcoder => Shape {
            kind,
            hooks_in: vec!["mlp.in"],
            hooks_out: vec!["mlp.out"],
            edited: "mlp.out",
        },
        Kind::Clt => Shape {
            kind,
            hooks_in: vec!["mlp.in"],
            hooks_out: vec!["out.1", "out.2"],
            edited: "out.2",
        },
        Kind::Crosscoder => Shape {
            kind,
            hooks_in: vec!["res.1", "res.2"],
            hooks_out: vec!["res.1", "res.2"],
            edited: "res.2",
        },
        other => unreachable!("{other:?}"),
    }
}

fn write_dict(dir: &Path, s: &Shape, norm: InputNorm, seed: u64) -> (Meta, Weights) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut meta = Meta::new(s.kind, Activation::Relu, D, F, D);
    meta.n_layers = s.hooks_in.len().max(s.hooks_out.len());
    meta.hook_in = s.hooks_in.join(", ");
    meta.hook_out = s.hooks_out.join(", ");
    meta.input_norm = norm;
    let (li, lo) = (meta.input_layers(), meta.output_layers());
    let mut w = Weights::new(
        randn_around(&mut rng, (li * D, F), 0.0, 0.4),
        Array1::from_elem(F, 0.05),
        randn_around(&mut rng, (F, lo * D), 0.0, 0.3),
        randn_around(&mut rng, (1, lo * D), 0.0, 0.1)
            .row(0)
            .to_owned(),
    );
    w.apply_b_dec_to_input = s.kind == Kind::Sae;
    write_dictionary(&dir.join("d.onnx"), &meta, &w);
    (meta, w)
}

/// The ops, each in its own profile: `(profile, rule body)`.
fn ops(feature: usize, cap: f64) -> Vec<(&'static str, String)> {
    vec![
        (
            "add",
            format!("op = \"add\"\nfeature = {feature}\nstrength = 1.5"),
        ),
        (
            "add-unit",
            format!("op = \"add\"\nfeature = {feature}\nstrength = 1.5\nnormalize = true"),
        ),
        (
            "clamp",
            format!("op = \"clamp\"\nfeature = {feature}\nvalue = 3.0"),
        ),
        ("ablate", format!("op = \"ablate\"\nfeature = {feature}")),
        (
            "scale",
            format!("op = \"scale\"\nfeature = {feature}\nfactor = 0.3"),
        ),
        (
            "cap",
            format!("op = \"cap\"\nfeature = {feature}\nvalue = {cap}"),
        ),
        (
            "project-cap",
            format!("op = \"project_cap\"\nfeature = {feature}\nvalue = 0.05"),
        ),
    ]
}

/// The reference edit of one token's row `y` at the edited hook, for `profile`'s op on feature
/// `i` of token `t`: a difference of two float64 reconstructions.
#[allow(clippy::too_many_arguments)]
fn reference_edit(
    meta: &Meta,
    w: &Weights,
    x: ArrayView2<'_, f32>,
    acts: &Array2<f64>,
    layer: usize,
    t: usize,
    i: usize,
    profile: &str,
    cap: f64,
    y: &[f32],
) -> Vec<f64> {
    let f = acts[[t, i]];
    let with = |fi: f64| {
        let mut a = acts.clone();
        a[[t, i]] = fi;
        let r = reference::decode(meta, w, x, &a);
        r.row(t)
            .slice(ndarray::s![layer * D..(layer + 1) * D])
            .to_vec()
    };
    let base = with(f);
    let diff = |fi: f64| -> Vec<f64> { with(fi).iter().zip(&base).map(|(a, b)| a - b).collect() };
    let unit = || {
        let u = diff(f + 1.0);
        let n = u.iter().map(|v| v * v).sum::<f64>().sqrt();
        u.into_iter().map(|v| v / n).collect::<Vec<f64>>()
    };
    let delta: Vec<f64> = match profile {
        "add" => diff(f + 1.5),
        "add-unit" => unit().into_iter().map(|v| 1.5 * v).collect(),
        "clamp" => diff(3.0),
        "ablate" => diff(0.0),
        "scale" => diff(0.3 * f),
        "cap" => diff(f.min(cap)),
        "project-cap" => {
            let u = unit();
            let p: f64 = u.iter().zip(y).map(|(a, b)| a * f64::from(*b)).sum();
            let c = -((p.max(0.05)) - 0.05);
            u.into_iter().map(|v| c * v).collect()
        }
        other => unreachable!("{other}"),
    };
    y.iter()
        .zip(delta)
        .map(|(a, d)| f64::from(*a) + d)
        .collect()
}

fn rel(a: &[f32], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((f64::from(*x) - y).abs()))
        / scale
}

/// Runs every op through a dictionary of `kind` with input normalisation `norm`, checks each
/// token against the reference, and returns the largest error of the raw-row edit (what the
/// runtime did before edits were mapped through the normalisation) for the caller to compare.
fn check(kind: Kind, norm: InputNorm, seed: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let s = shape(kind);
    let (meta, w) = write_dict(dir.path(), &s, norm, seed);
    let mut rng = StdRng::seed_from_u64(seed + 100);
    let n_ops = ops(0, 0.0).len();
    let n = n_ops * T;
    // Activations far from zero mean and unit spread, so that every normalisation matters.
    let ins: Vec<Array2<f32>> = s
        .hooks_in
        .iter()
        .map(|_| randn_around(&mut rng, (n, D), 0.7, 2.5))
        .collect();
    let x = concatenate(Axis(1), &ins.iter().map(|a| a.view()).collect::<Vec<_>>()).unwrap();
    let acts = reference::encode(&meta, &w, x.view());
    // The feature most active over the batch: every op has something to do.
    let i = (0..F)
        .max_by(|&a, &b| acts.column(a).sum().total_cmp(&acts.column(b).sum()))
        .unwrap();
    let cap = acts.column(i).iter().fold(0.0f64, |m, v| m.max(*v)) / 2.0;
    let cap = (cap * 1e4).round() / 1e4;
    let mut config = String::from(
        "[runtime]\nfvu_sample_rate = 0.0\n[[dictionary]]\nname = \"d\"\npath = \"d.onnx\"\n",
    );
    for (name, body) in ops(i, cap) {
        config += &format!(
            "[[profile]]\nname = \"{name}\"\n[[profile.steer]]\ndictionary = \"d\"\nhook = \"{}\"\n{body}\n",
            s.edited
        );
    }
    std::fs::write(dir.path().join("t.toml"), config).unwrap();
    let rt = Runtime::from_config_file(dir.path().join("t.toml")).unwrap();
    let profiles: Vec<&str> = ops(i, cap).iter().map(|(p, _)| *p).collect();
    let mut tokens = Vec::new();
    for (r, p) in profiles.iter().enumerate() {
        rt.begin_request(r as u64, Some(p), None).unwrap();
        tokens.extend((0..T).map(|_| Token {
            request: r as u64,
            phase: Phase::Generated,
        }));
    }
    // What the edited hook holds before the edit: the input itself for an SAE or crosscoder,
    // another tensor (an MLP's output) for a transcoder or CLT.
    let edited_in: Array2<f32> = match s.hooks_in.iter().position(|h| *h == s.edited) {
        Some(l) => ins[l].clone(),
        None => randn_around(&mut rng, (n, D), -0.3, 1.7),
    };
    let mut step = rt.step(&tokens).unwrap();
    let mut got = edited_in.clone();
    for (l, h) in s.hooks_in.iter().enumerate() {
        if *h == s.edited {
            step.hook(h, ActivationsMut::F32(got.as_slice_mut().unwrap()))
                .unwrap();
        } else {
            let mut a = ins[l].clone();
            step.hook(h, ActivationsMut::F32(a.as_slice_mut().unwrap()))
                .unwrap();
            assert_eq!(a, ins[l], "`{h}` is read, not edited");
        }
    }
    for h in &s.hooks_out {
        if !s.hooks_in.contains(h) && *h != s.edited {
            let mut a = randn_around(&mut rng, (n, D), 0.0, 1.0);
            let before = a.clone();
            step.hook(h, ActivationsMut::F32(a.as_slice_mut().unwrap()))
                .unwrap();
            assert_eq!(a, before, "no rule writes `{h}`");
        }
    }
    if !s.hooks_in.contains(&s.edited) {
        step.hook(s.edited, ActivationsMut::F32(got.as_slice_mut().unwrap()))
            .unwrap();
    }
    step.finish();
    let layer = s.hooks_out.iter().position(|h| *h == s.edited).unwrap();
    let mut raw_err = 0.0f64;
    for (r, p) in profiles.iter().enumerate() {
        for t in r * T..(r + 1) * T {
            let y = edited_in.row(t).to_vec();
            let want = reference_edit(&meta, &w, x.view(), &acts, layer, t, i, p, cap, &y);
            let e = rel(got.row(t).as_slice().unwrap(), &want);
            assert!(
                e < TOL,
                "{kind:?}, input_norm {norm}, {p}: token {t}: rel err {e:e}"
            );
            // The old edit: the raw decoder row times the feature-space coefficient.
            let f = acts[[t, i]];
            let c = match *p {
                "add" => Some(1.5),
                "clamp" => Some(3.0 - f),
                "ablate" => Some(-f),
                "scale" => Some(-0.7 * f),
                "cap" => Some(f.min(cap) - f),
                _ => None,
            };
            if let Some(c) = c {
                let raw: Vec<f64> = y
                    .iter()
                    .zip(
                        w.w_dec
                            .row(i)
                            .slice(ndarray::s![layer * D..(layer + 1) * D]),
                    )
                    .map(|(a, d)| f64::from(*a) + c * f64::from(*d))
                    .collect();
                raw_err = raw_err.max(rel(
                    &raw.iter().map(|v| *v as f32).collect::<Vec<_>>(),
                    &want,
                ));
            }
        }
    }
    // Raw directions are untouched by any normalisation: a vector rule on the same hook adds `α·u`.
    raw_err
}

const NORMS: [InputNorm; 4] = [
    InputNorm::None,
    InputNorm::Scale(0.37),
    InputNorm::LayerNorm,
    InputNorm::NormRescale,
];

/// Checks `kind` (a dictionary whose reconstruction is un-normalised) under every normalisation,
/// seeds from `seed`: the raw decoder row is right only without normalisation, so this fails on
/// an edit that ignores it.
fn check_denormalised(kind: Kind, seed: u64) {
    for (k, norm) in NORMS.into_iter().enumerate() {
        let raw = check(kind, norm, seed + k as u64);
        if norm == InputNorm::None {
            assert!(
                raw < TOL,
                "{kind:?}, no normalisation: raw rows are the edit ({raw:e})"
            );
        } else {
            assert!(
                raw > 1e-2,
                "{kind:?}, {norm}: the raw row would pass ({raw:e})"
            );
        }
    }
}

#[test]
fn sae_edits_are_in_the_model_space_for_every_normalisation() {
    check_denormalised(Kind::Sae, 10);
}

#[test]
fn crosscoder_edits_are_in_the_model_space_for_every_normalisation() {
    check_denormalised(Kind::Crosscoder, 20);
}

/// A transcoder's or CLT's reconstruction lives in its output space and is never un-normalised
/// (as SAELens does): whatever normalises the input, the edit is the raw decoder row.
#[test]
fn transcoder_and_clt_edits_are_raw_decoder_rows_whatever_the_input_norm() {
    for kind in [Kind::Transcoder, Kind::Clt] {
        for (k, norm) in NORMS.into_iter().enumerate() {
            let raw = check(kind, norm, 30 + k as u64);
            assert!(raw < TOL, "{kind:?} {norm}: rel err of the raw row {raw:e}");
        }
    }
}

/// `vector` and `project_cap` along a raw direction write the direction given, beside a
/// normalising dictionary.
#[test]
fn raw_directions_are_untouched_by_a_normalising_dictionary() {
    let dir = tempfile::tempdir().unwrap();
    let s = shape(Kind::Sae);
    write_dict(dir.path(), &s, InputNorm::LayerNorm, 7);
    let mut rng = StdRng::seed_from_u64(8);
    let u = randn_around(&mut rng, (1, D), 0.0, 1.0);
    u.write_npy(std::fs::File::create(dir.path().join("u.npy")).unwrap())
        .unwrap();
    let config = "[runtime]\nfvu_sample_rate = 0.0\n[[dictionary]]\nname = \"d\"\npath = \"d.onnx\"\n\
        [[profile]]\nname = \"v\"\n[[profile.steer]]\nop = \"vector\"\nvector = \"u.npy\"\nhook = \"res\"\nstrength = 2.0\n\
        [[profile]]\nname = \"pc\"\n[[profile.steer]]\nop = \"project_cap\"\nvector = \"u.npy\"\nhook = \"res\"\nvalue = 0.1\n";
    std::fs::write(dir.path().join("t.toml"), config).unwrap();
    let rt = Runtime::from_config_file(dir.path().join("t.toml")).unwrap();
    rt.begin_request(1, Some("v"), None).unwrap();
    rt.begin_request(2, Some("pc"), None).unwrap();
    let x = randn_around(&mut rng, (4, D), 0.7, 2.5);
    let tokens: Vec<Token> = [1, 1, 2, 2]
        .iter()
        .map(|&r| Token {
            request: r,
            phase: Phase::Prompt,
        })
        .collect();
    let mut got = x.clone();
    let mut step = rt.step(&tokens).unwrap();
    step.hook("res", ActivationsMut::F32(got.as_slice_mut().unwrap()))
        .unwrap();
    step.finish();
    let u64v: Vec<f64> = u.row(0).iter().map(|v| f64::from(*v)).collect();
    let nu = u64v.iter().map(|v| v * v).sum::<f64>().sqrt();
    for t in 0..4 {
        let xr: Vec<f64> = x.row(t).iter().map(|v| f64::from(*v)).collect();
        let want: Vec<f64> = if t < 2 {
            xr.iter().zip(&u64v).map(|(a, b)| a + 2.0 * b).collect()
        } else {
            let p: f64 = xr.iter().zip(&u64v).map(|(a, b)| a * b / nu).sum();
            let c = -(p.max(0.1) - 0.1);
            xr.iter().zip(&u64v).map(|(a, b)| a + c * b / nu).collect()
        };
        let e = rel(got.row(t).as_slice().unwrap(), &want);
        assert!(e < TOL, "token {t}: rel err {e:e}");
    }
}
