//! circuit-tracer checkpoints, written here in circuit-tracer's own layout (per-layer
//! `layer_{i}.safetensors`, CLT `W_enc_{i}`/`W_dec_{i}.safetensors`, `config.yaml`) with random
//! weights from a seed, imported with the CLI, run through the runtime, and compared with a float64
//! implementation of circuit-tracer's maths written from its source
//! (circuit_tracer/transcoder/single_layer_transcoder.py, cross_layer_transcoder.py,
//! activation_functions.py): normwise relative error under 1e-5. For CLTs the reconstruction of
//! each output layer is the sum of the source layers' dictionaries, compared with circuit-tracer's
//! `Σ_{i ≤ l} f_i W_dec_i[:, l-i] + b_dec_l`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Rng, Tensors, m2, stored, v1, write_safetensors};
use ndarray::{Array1, Array2, Array3, Axis, s};
use safetensors::Dtype;
use tiller_runtime::{ActivationsMut, Dictionary, Kind, Phase, Runtime, SessionOptions, Token};
use tiller_test_support::rel_err;

const TOL: f64 = 1e-5;
const D: usize = 16;
const F: usize = 48;

// ---------------------------------------------------------------------------------------------
// Fixtures.

/// One per-layer transcoder file's tensors, in circuit-tracer's current layout.
fn plt_tensors(rng: &mut Rng, jump: bool, skip: bool) -> Tensors {
    let mut t = Tensors::new();
    t.insert("W_enc".into(), rng.normal(&[F, D], 0.3));
    t.insert("W_dec".into(), rng.normal(&[F, D], 0.3));
    t.insert("b_enc".into(), rng.normal(&[F], 0.1));
    t.insert("b_dec".into(), rng.normal(&[D], 0.2));
    if jump {
        t.insert(
            "activation_function.threshold".into(),
            rng.uniform(&[F], 0.0, 0.4),
        );
    }
    if skip {
        t.insert("W_skip".into(), rng.normal(&[D, D], 0.2));
    }
    t
}

/// A CLT's files: `W_enc_{i}.safetensors` and `W_dec_{i}.safetensors` for `i < l`.
fn clt_files(rng: &mut Rng, l: usize, jump: bool) -> Vec<(String, Tensors)> {
    let mut files = Vec::new();
    for i in 0..l {
        let mut enc = Tensors::new();
        enc.insert(format!("W_enc_{i}"), rng.normal(&[F, D], 0.3));
        enc.insert(format!("b_enc_{i}"), rng.normal(&[F], 0.1));
        enc.insert(format!("b_dec_{i}"), rng.normal(&[D], 0.2));
        if jump {
            enc.insert(format!("threshold_{i}"), rng.uniform(&[F], 0.0, 0.4));
        }
        files.push((format!("W_enc_{i}.safetensors"), enc));
        let mut dec = Tensors::new();
        dec.insert(format!("W_dec_{i}"), rng.normal(&[F, l - i, D], 0.3));
        files.push((format!("W_dec_{i}.safetensors"), dec));
    }
    files
}

/// Writes `files` into `dir` in `dtype`; returns every tensor as stored, in one map.
fn write_files(dir: &Path, files: &[(String, Tensors)], dtype: Dtype) -> Tensors {
    std::fs::create_dir_all(dir).unwrap();
    let mut all = Tensors::new();
    for (name, t) in files {
        write_safetensors(&dir.join(name), t, dtype);
        for (k, v) in t {
            all.insert(k.clone(), stored(v, dtype));
        }
    }
    all
}

fn config(dir: &Path, text: &str) {
    std::fs::write(dir.join("config.yaml"), text).unwrap();
}

const CLT_CONFIG: &str = "model_name: google/gemma-2-2b\nmodel_kind: cross_layer_transcoder\n\
                          feature_input_hook: hook_resid_mid\nfeature_output_hook: hook_mlp_out\n";

fn import(dir: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tiller-export"))
        .arg("import")
        .arg(dir)
        .args(["--format", "circuit-tracer"])
        .args(extra)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap()
}

fn import_ok(dir: &Path, out: &Path, extra: &[&str]) {
    let o = import(dir, out, extra);
    assert!(
        o.status.success(),
        "import failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs an import that must fail; returns its message, and checks that nothing was written.
fn import_err(dir: &Path, extra: &[&str]) -> String {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("out.onnx");
    let o = import(dir, &out, extra);
    let msg = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "import should fail: {msg}");
    assert_eq!(
        std::fs::read_dir(out_dir.path()).unwrap().count(),
        0,
        "a failed import wrote files: {msg}"
    );
    println!("refused: {}", msg.trim());
    msg
}

fn load(path: &Path) -> Dictionary {
    Dictionary::load(path, &SessionOptions::default()).unwrap()
}

fn dict_path(out: &Path, layer: usize) -> PathBuf {
    out.with_file_name(format!("out.layer_{layer}.onnx"))
}

// ---------------------------------------------------------------------------------------------
// circuit-tracer's maths, float64.

/// `x·[x > θ]` (circuit-tracer's JumpReLU: no ReLU) or `relu(x)`.
fn activate(pre: Array2<f64>, threshold: Option<Array1<f64>>) -> Array2<f64> {
    match threshold {
        Some(th) => {
            let mut f = pre;
            for mut row in f.rows_mut() {
                for (v, t) in row.iter_mut().zip(&th) {
                    if *v <= *t {
                        *v = 0.0;
                    }
                }
            }
            f
        }
        None => pre.mapv(|v| v.max(0.0)),
    }
}

/// `SingleLayerTranscoder`: `F.linear(x, W_enc, b_enc)`, the activation, `f W_dec + b_dec +
/// x W_skipᵀ`. `old_layout`: `W_dec` was stored `[d_model, d_sae]` (the first release).
fn plt_reference(t: &Tensors, old_layout: bool, x: &Array2<f32>) -> (Array2<f64>, Array2<f64>) {
    let x = x.mapv(f64::from);
    let pre = x.dot(&m2(t, "W_enc").t()) + v1(t, "b_enc");
    let acts = activate(
        pre,
        t.contains_key("activation_function.threshold")
            .then(|| v1(t, "activation_function.threshold")),
    );
    let w_dec = if old_layout {
        m2(t, "W_dec").t().to_owned()
    } else {
        m2(t, "W_dec")
    };
    let mut recon = acts.dot(&w_dec) + v1(t, "b_dec");
    if t.contains_key("W_skip") {
        recon += &x.dot(&m2(t, "W_skip").t());
    }
    (acts, recon)
}

/// `CrossLayerTranscoder`: per source layer `f_i = act(x_i W_enc_iᵀ + b_enc_i)`; per output layer
/// `l`, `Σ_{i ≤ l} f_i W_dec_i[:, l-i] + b_dec_l`. Returns the activations and, per source layer,
/// its contribution to each output layer (`[n, L-i, d]`, with `b_dec_i` on its own layer), and the
/// full reconstruction per output layer.
struct CltRef {
    acts: Vec<Array2<f64>>,
    contrib: Vec<Array3<f64>>,
    recon: Vec<Array2<f64>>,
}

fn clt_reference(t: &Tensors, l: usize, xs: &[Array2<f32>]) -> CltRef {
    let n = xs[0].nrows();
    let mut acts = Vec::new();
    let mut contrib = Vec::new();
    let mut recon: Vec<Array2<f64>> = (0..l)
        .map(|o| Array2::zeros((n, D)) + v1(t, &format!("b_dec_{o}")))
        .collect();
    for i in 0..l {
        let x = xs[i].mapv(f64::from);
        let pre = x.dot(&m2(t, &format!("W_enc_{i}")).t()) + v1(t, &format!("b_enc_{i}"));
        let th = t
            .get(&format!("threshold_{i}"))
            .map(|_| v1(t, &format!("threshold_{i}")));
        let f = activate(pre, th);
        let w_dec: Array3<f64> = t[&format!("W_dec_{i}")]
            .clone()
            .into_dimensionality()
            .unwrap();
        let mut c = Array3::zeros((n, l - i, D));
        for (o, out) in recon.iter_mut().enumerate().skip(i) {
            let part = f.dot(&w_dec.index_axis(Axis(1), o - i));
            *out += &part;
            let mut slot = c.index_axis_mut(Axis(1), o - i);
            slot.assign(&part);
            if o == i {
                slot += &v1(t, &format!("b_dec_{o}"));
            }
        }
        acts.push(f);
        contrib.push(c);
    }
    CltRef {
        acts,
        contrib,
        recon,
    }
}

fn inputs(rng: &mut Rng, count: usize, n: usize) -> Vec<Array2<f32>> {
    (0..count).map(|_| rng.matrix(n, D, 1.0) + 0.25).collect()
}

fn assert_nondegenerate(acts: &Array2<f64>, what: &str) {
    let active = acts.iter().filter(|v| **v != 0.0).count();
    assert!(
        active > 0 && active < acts.len(),
        "{what}: degenerate fixture"
    );
}

// ---------------------------------------------------------------------------------------------
// Transcoder sets.

#[test]
fn transcoder_set_with_config_jumprelu_and_skip() {
    let mut rng = Rng::new(11);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let l = 3;
    let files: Vec<(String, Tensors)> = (0..l)
        .map(|i| {
            (
                format!("layer_{i}.safetensors"),
                plt_tensors(&mut rng, true, true),
            )
        })
        .collect();
    let stored_files: Vec<Tensors> = files
        .iter()
        .map(|f| write_files(&ckpt, std::slice::from_ref(f), Dtype::BF16))
        .collect();
    // As circuit-tracer's cache writes it (yaml.dump: sorted keys).
    config(
        &ckpt,
        "feature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\nmodel_kind: transcoder_set\n\
         model_name: meta-llama/Llama-3.2-1B\nscan_name: mntss/transcoder-Llama-3.2-1B\n",
    );
    let out = dir.path().join("out.onnx");
    import_ok(&ckpt, &out, &[]);
    for (i, t) in stored_files.iter().enumerate() {
        let dict = load(&dict_path(&out, i));
        let m = dict.meta();
        assert_eq!(m.kind, Kind::SkipTranscoder);
        assert_eq!(m.activation, tiller_runtime::Activation::JumpRelu);
        assert_eq!((m.d_in, m.d_sae, m.d_out), (D, F, D));
        assert_eq!(m.hook_in, format!("blocks.{i}.mlp.hook_in"));
        assert_eq!(m.hook_out, format!("blocks.{i}.mlp.hook_out"));
        assert_eq!(m.model, "meta-llama/Llama-3.2-1B");
        assert_eq!(m.source, "circuit-tracer");
        let x = rng.matrix(23, D, 1.0) + 0.25;
        let (ref_acts, ref_recon) = plt_reference(t, false, &x);
        assert_nondegenerate(&ref_acts, "set");
        let (acts, recon) = dict.encode_decode(x.view()).unwrap();
        let (ea, er) = (rel_err(&acts, &ref_acts), rel_err(&recon, &ref_recon));
        assert!(ea < TOL && er < TOL, "layer {i}: acts {ea:e} recon {er:e}");
        println!("set layer {i}: acts {ea:.2e} recon {er:.2e}");
    }
}

#[test]
fn relu_transcoder_of_the_first_release_one_layer() {
    // The first release (mntss/skip-transcoder-Llama-3.2-1B-131k-nobos) stored `W_dec` as
    // `[d_model, d_sae]`; no config beside the files.
    let mut rng = Rng::new(12);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let mut stored_layer = Tensors::new();
    for i in 0..3 {
        let mut t = plt_tensors(&mut rng, false, i != 1);
        let w_dec = t["W_dec"]
            .clone()
            .reversed_axes()
            .as_standard_layout()
            .to_owned();
        t.insert("W_dec".into(), w_dec);
        let st = write_files(&ckpt, &[(format!("layer_{i}.safetensors"), t)], Dtype::F32);
        if i == 1 {
            stored_layer = st;
        }
    }
    assert!(tiller_export::circuit_tracer::detect(&ckpt));
    assert!(!tiller_export::circuit_tracer::detect(dir.path()));
    assert!(!tiller_export::circuit_tracer::detect(
        &ckpt.join("layer_0.safetensors")
    ));
    let out = dir.path().join("out.onnx");
    import_ok(&ckpt, &out, &["--layer", "1"]);
    assert!(!dict_path(&out, 0).exists(), "--layer imports one layer");
    let dict = load(&out);
    let m = dict.meta();
    assert_eq!(m.kind, Kind::Transcoder);
    assert_eq!(m.activation, tiller_runtime::Activation::Relu);
    assert_eq!(m.hook_in, "blocks.1.mlp.hook_in");
    assert_eq!(m.hook_out, "blocks.1.mlp.hook_out");
    let x = rng.matrix(17, D, 1.0) + 0.25;
    let (ref_acts, ref_recon) = plt_reference(&stored_layer, true, &x);
    assert_nondegenerate(&ref_acts, "relu");
    let (acts, recon) = dict.encode_decode(x.view()).unwrap();
    let (ea, er) = (rel_err(&acts, &ref_acts), rel_err(&recon, &ref_recon));
    assert!(ea < TOL && er < TOL, "acts {ea:e} recon {er:e}");
    println!("first-release relu layer: acts {ea:.2e} recon {er:.2e}");
}

#[test]
fn config_listing_the_files_of_a_set() {
    // The first release's config style (`circuit_tracer/configs/llama-relu.yaml`): `{id, layer,
    // filepath}` entries, here out of order, one local path and one hf:// URI resolved inside the
    // folder as a snapshot of the repository holds it.
    let mut rng = Rng::new(13);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let w = ckpt.join("weights");
    let t0 = write_files(
        &w,
        &[("a.safetensors".into(), plt_tensors(&mut rng, true, false))],
        Dtype::F16,
    );
    let t1 = write_files(
        &w,
        &[("b.safetensors".into(), plt_tensors(&mut rng, false, true))],
        Dtype::F32,
    );
    config(
        &ckpt,
        "# Transcoder Configuration\nmodel_name: \"meta-llama/Llama-3.2-1B\"\n\
         feature_input_hook: \"hook_resid_mid\"\nfeature_output_hook: 'mlp.hook_out'\n\n\
         transcoders:\n  - id: \"relu-1\"\n    layer: 1\n    \
         filepath: \"hf://mntss/skip-transcoder-Llama-3.2-1B-131k-nobos/weights/b.safetensors?revision=new-training\"\n\
         \n  - id: \"relu-0\"\n    layer: 0\n    filepath: \"weights/a.safetensors\"\n",
    );
    assert!(tiller_export::circuit_tracer::detect(&ckpt));
    let out = dir.path().join("out.onnx");
    import_ok(&ckpt, &out, &[]);
    for (i, t) in [t0, t1].iter().enumerate() {
        let dict = load(&dict_path(&out, i));
        let m = dict.meta();
        assert_eq!(m.hook_in, format!("blocks.{i}.hook_resid_mid"));
        assert_eq!(m.hook_out, format!("blocks.{i}.mlp.hook_out"));
        assert_eq!(
            m.kind,
            [Kind::Transcoder, Kind::SkipTranscoder][i],
            "layer {i}"
        );
        let x = rng.matrix(15, D, 1.0) + 0.25;
        let (ref_acts, ref_recon) = plt_reference(t, false, &x);
        let (acts, recon) = dict.encode_decode(x.view()).unwrap();
        let (ea, er) = (rel_err(&acts, &ref_acts), rel_err(&recon, &ref_recon));
        assert!(ea < TOL && er < TOL, "layer {i}: acts {ea:e} recon {er:e}");
    }

    // A listed file that is not here, and a Gemma Scope `.npz`.
    config(
        &ckpt,
        "model_kind: transcoder_set\nfeature_input_hook: a\nfeature_output_hook: b\ntranscoders:\n\
         - weights/a.safetensors\n- hf://google/gemma-scope-2b-pt-transcoders/layer_1/width_16k/average_l0_65/params.npz\n",
    );
    let e = import_err(&ckpt, &[]);
    assert!(
        e.contains("transcoders[1]") && e.contains("gemma-scope"),
        "{e}"
    );
    config(
        &ckpt,
        "model_kind: transcoder_set\nfeature_input_hook: a\nfeature_output_hook: b\ntranscoders:\n\
         - weights/a.safetensors\n- hf://mntss/x/layer_1.safetensors\n",
    );
    let e = import_err(&ckpt, &[]);
    assert!(
        e.contains("transcoders[1]") && e.contains("layer_1.safetensors"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Cross-layer transcoders.

fn check_clt(out: &Path, t: &Tensors, l: usize, layers: &[usize], single: bool, rng: &mut Rng) {
    let xs = inputs(rng, l, 21);
    let r = clt_reference(t, l, &xs);
    let mut summed: Vec<Array2<f32>> = (0..l).map(|_| Array2::zeros((21, D))).collect();
    for &i in layers {
        let path = if single {
            out.to_path_buf()
        } else {
            dict_path(out, i)
        };
        let dict = load(&path);
        let m = dict.meta();
        assert_eq!(m.kind, Kind::Clt);
        assert_eq!(m.n_layers, l - i);
        assert_eq!((m.d_in, m.d_sae, m.d_out), (D, F, D));
        assert_eq!(m.source, "circuit-tracer");
        assert_eq!(m.hook_in, format!("blocks.{i}.hook_resid_mid"));
        let want_out: Vec<String> = (i..l).map(|o| format!("blocks.{o}.hook_mlp_out")).collect();
        assert_eq!(m.hooks_out(), want_out);
        assert_nondegenerate(&r.acts[i], "clt");
        let (acts, recon) = dict.encode_decode(xs[i].view()).unwrap();
        let ea = rel_err(&acts, &r.acts[i]);
        assert!(ea < TOL, "source layer {i}: acts {ea:e}");
        assert_eq!(recon.shape(), &[21, (l - i) * D]);
        for (o, sum) in summed.iter_mut().enumerate().skip(i) {
            let got = recon.slice(s![.., (o - i) * D..(o - i + 1) * D]).to_owned();
            let want = r.contrib[i].index_axis(Axis(1), o - i).to_owned();
            let e = rel_err(&got, &want);
            assert!(e < TOL, "source {i} → output {o}: {e:e}");
            *sum += &got;
        }
        println!("clt source layer {i}: acts {ea:.2e}");
    }
    if layers.len() == l {
        for (o, got) in summed.iter().enumerate() {
            let e = rel_err(got, &r.recon[o]);
            assert!(e < TOL, "output layer {o}: summed reconstruction {e:e}");
            println!("clt output layer {o}: reconstruction {e:.2e}");
        }
    }
}

#[test]
fn clt_every_source_layer_sums_to_circuit_tracers_reconstruction() {
    let mut rng = Rng::new(21);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let l = 4;
    let t = write_files(&ckpt, &clt_files(&mut rng, l, true), Dtype::F32);
    config(&ckpt, CLT_CONFIG);
    assert!(tiller_export::circuit_tracer::detect(&ckpt));
    let out = dir.path().join("out.onnx");
    import_ok(&ckpt, &out, &[]);
    for i in 0..l {
        let dict = load(&dict_path(&out, i));
        assert_eq!(dict.meta().activation, tiller_runtime::Activation::JumpRelu);
        assert_eq!(dict.meta().model, "google/gemma-2-2b");
    }
    check_clt(&out, &t, l, &[0, 1, 2, 3], false, &mut rng);
}

#[test]
fn clt_relu_bf16_one_layer_without_config() {
    let mut rng = Rng::new(22);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let l = 5;
    let t = write_files(&ckpt, &clt_files(&mut rng, l, false), Dtype::BF16);
    assert!(tiller_export::circuit_tracer::detect(&ckpt));
    let out = dir.path().join("out.onnx");
    import_ok(&ckpt, &out, &["--layer", "2"]);
    let dict = load(&out);
    assert_eq!(dict.meta().activation, tiller_runtime::Activation::Relu);
    assert_eq!(dict.meta().model, "");
    check_clt(&out, &t, l, &[2], true, &mut rng);
}

#[test]
fn clt_clamp_lands_on_every_output_hook() {
    let mut rng = Rng::new(23);
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let l = 4;
    let t = write_files(&ckpt, &clt_files(&mut rng, l, true), Dtype::F32);
    config(&ckpt, CLT_CONFIG);
    import_ok(&ckpt, &dir.path().join("clt.onnx"), &["--layer", "1"]);
    let (feature, value) = (7usize, 2.0);
    std::fs::write(
        dir.path().join("t.toml"),
        format!(
            "[runtime]\nfvu_sample_rate = 0.0\n[[dictionary]]\nname = \"clt1\"\npath = \"clt.onnx\"\n\
             [[profile]]\nname = \"p\"\n[[profile.steer]]\nname = \"clamp-clt\"\ndictionary = \"clt1\"\n\
             op = \"clamp\"\nfeature = {feature}\nvalue = {value}\n"
        ),
    )
    .unwrap();
    let rt = Runtime::from_config_file(dir.path().join("t.toml")).unwrap();
    rt.begin_request(1, Some("p"), None).unwrap();
    let n = 6;
    let mut xs = inputs(&mut rng, l, n);
    let r = clt_reference(&t, l, &xs);
    let f = &r.acts[1];
    let outs: Vec<Array2<f32>> = (0..l).map(|_| rng.matrix(n, D, 1.0)).collect();
    let tokens = vec![
        Token {
            request: 1,
            phase: Phase::Prompt
        };
        n
    ];
    let mut step = rt.step(&tokens).unwrap();
    let x_in = xs[1].clone();
    step.hook(
        "blocks.1.hook_resid_mid",
        ActivationsMut::F32(xs[1].as_slice_mut().unwrap()),
    )
    .unwrap();
    let mut got = outs.clone();
    for (o, g) in got.iter_mut().enumerate().skip(1) {
        step.hook(
            &format!("blocks.{o}.hook_mlp_out"),
            ActivationsMut::F32(g.as_slice_mut().unwrap()),
        )
        .unwrap();
    }
    step.finish();
    rt.end_request(1).unwrap();
    assert_eq!(xs[1], x_in, "the CLT's input hook is read only");
    let w_dec: Array3<f64> = t["W_dec_1"].clone().into_dimensionality().unwrap();
    for o in 1..l {
        let mut want = outs[o].mapv(f64::from);
        for tok in 0..n {
            let c = value - f[[tok, feature]];
            let d = w_dec.slice(s![feature, o - 1, ..]);
            want.row_mut(tok).scaled_add(c, &d);
        }
        let e = rel_err(&got[o], &want);
        assert!(e < TOL, "output hook blocks.{o}.hook_mlp_out: {e:e}");
        assert_ne!(got[o], outs[o], "blocks.{o}.hook_mlp_out was not edited");
        println!("clamp at blocks.{o}.hook_mlp_out: {e:.2e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input.

/// A set of `layer_{i}.safetensors` files for `layers`, each a plain ReLU transcoder.
fn relu_set(dir: &Path, rng: &mut Rng, layers: &[usize]) {
    for i in layers {
        write_files(
            dir,
            &[(
                format!("layer_{i}.safetensors"),
                plt_tensors(rng, false, false),
            )],
            Dtype::F32,
        );
    }
}

/// A CLT of `l` layers, `change` applied to its files before they are written.
fn clt_with(
    dir: &Path,
    rng: &mut Rng,
    l: usize,
    jump: bool,
    change: impl FnOnce(&mut Vec<(String, Tensors)>, &mut Rng),
) {
    let mut files = clt_files(rng, l, jump);
    change(&mut files, rng);
    write_files(dir, &files, Dtype::F32);
}

/// A bad checkpoint: what is wrong with it, the folder it is written to, how, the import's extra
/// arguments, and what its message must name.
struct BadCheckpoint {
    what: &'static str,
    folder: &'static str,
    write: fn(&Path, &mut Rng),
    args: &'static [&'static str],
    names: &'static [&'static str],
}

// The shapes the messages name below are written out for these sizes.
const _: () = assert!(D == 16 && F == 48);

const BAD_CHECKPOINTS: [BadCheckpoint; 16] = [
    // Missing files.
    BadCheckpoint {
        what: "a set without its middle layer",
        folder: "set_gap",
        write: |set, rng| relu_set(set, rng, &[0, 2]),
        args: &[],
        names: &["layer_1.safetensors", "missing"],
    },
    BadCheckpoint {
        what: "a CLT without one decoder file",
        folder: "clt_no_w_dec",
        write: |clt, rng| {
            clt_with(clt, rng, 3, true, |files, _| {
                files.retain(|(n, _)| n != "W_dec_2.safetensors");
            });
        },
        args: &[],
        names: &["W_dec_2.safetensors", "missing"],
    },
    BadCheckpoint {
        what: "a CLT without one encoder file, one layer asked for",
        folder: "clt_no_w_enc",
        write: |clt, rng| {
            clt_with(clt, rng, 3, true, |files, _| {
                files.retain(|(n, _)| n != "W_enc_1.safetensors");
            });
        },
        args: &["--layer", "0"],
        names: &["W_enc_1.safetensors", "missing"],
    },
    BadCheckpoint {
        what: "a folder that does not exist",
        folder: "nothing-here",
        write: |_, _| {},
        args: &[],
        names: &["nothing-here"],
    },
    // Wrong shapes.
    BadCheckpoint {
        what: "a set's encoder one column too wide",
        folder: "set_w_enc",
        write: |set, rng| {
            let mut t = plt_tensors(rng, true, false);
            t.insert("W_enc".into(), rng.normal(&[F, D + 1], 0.3));
            write_files(set, &[("layer_0.safetensors".into(), t)], Dtype::F32);
        },
        args: &[],
        names: &["layer_0.safetensors", "`W_enc`", "[48, 17]"],
    },
    BadCheckpoint {
        what: "a set's threshold one feature short",
        folder: "set_threshold",
        write: |set, rng| {
            let mut t = plt_tensors(rng, true, false);
            t.insert(
                "activation_function.threshold".into(),
                rng.uniform(&[F - 1], 0.0, 0.4),
            );
            write_files(set, &[("layer_0.safetensors".into(), t)], Dtype::F32);
        },
        args: &[],
        names: &["`activation_function.threshold`"],
    },
    BadCheckpoint {
        what: "a CLT decoder reaching one layer too many",
        folder: "clt_w_dec",
        write: |clt, rng| {
            clt_with(clt, rng, 3, true, |files, rng| {
                for (name, t) in files {
                    if name == "W_dec_1.safetensors" {
                        t.insert("W_dec_1".into(), rng.normal(&[F, 3, D], 0.3));
                    }
                }
            });
        },
        args: &[],
        names: &["W_dec_1.safetensors", "`W_dec_1`", "[48, 2, 16]"],
    },
    BadCheckpoint {
        what: "a CLT decoder bias of the wrong width, one layer asked for",
        folder: "clt_b_dec",
        write: |clt, rng| {
            clt_with(clt, rng, 3, true, |files, rng| {
                for (name, t) in files {
                    if name == "W_enc_2.safetensors" {
                        t.insert("b_dec_2".into(), rng.normal(&[D + 3], 0.3));
                    }
                }
            });
        },
        args: &["--layer", "2"],
        names: &["W_enc_2.safetensors", "`b_dec_2`"],
    },
    // A layer that does not exist.
    BadCheckpoint {
        what: "a CLT layer past the last",
        folder: "clt_layer",
        write: |clt, rng| clt_with(clt, rng, 3, false, |_, _| {}),
        args: &["--layer", "3"],
        names: &["--layer 3 does not exist", "0..=2"],
    },
    BadCheckpoint {
        what: "a set layer past the last",
        folder: "set_layer",
        write: |set, rng| relu_set(set, rng, &[0, 1]),
        args: &["--layer", "9"],
        names: &["--layer 9 does not exist", "0, 1"],
    },
    // What Tiller cannot represent.
    BadCheckpoint {
        what: "a negative threshold: circuit-tracer's JumpReLU passes negative activations",
        folder: "neg",
        write: |clt, rng| {
            clt_with(clt, rng, 2, true, |files, _| {
                files[0].1.get_mut("threshold_0").unwrap()[[5]] = -0.1;
            });
        },
        args: &[],
        names: &["W_enc_0.safetensors", "`threshold_0`", "feature 5"],
    },
    BadCheckpoint {
        what: "a skip connection in a CLT: circuit-tracer's load_clt never reads it",
        folder: "skip",
        write: |clt, rng| {
            clt_with(clt, rng, 2, false, |files, rng| {
                files[2]
                    .1
                    .insert("W_skip_1".into(), rng.normal(&[D, D], 0.1));
            });
        },
        args: &[],
        names: &["W_enc_1.safetensors", "`W_skip_1`"],
    },
    BadCheckpoint {
        what: "a TopK set",
        folder: "topk",
        write: |set, rng| {
            relu_set(set, rng, &[0]);
            config(
                set,
                "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\n\
                 activation: topk\nk: 64\n",
            );
        },
        args: &[],
        names: &["config.yaml", "topk"],
    },
    BadCheckpoint {
        what: "a config without the output hook",
        folder: "no_output_hook",
        write: |set, rng| {
            relu_set(set, rng, &[0]);
            config(
                set,
                "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\n",
            );
        },
        args: &[],
        names: &["config.yaml", "`feature_output_hook`"],
    },
    BadCheckpoint {
        what: "a config that disagrees with the files",
        folder: "clt_config_on_a_set",
        write: |set, rng| {
            relu_set(set, rng, &[0]);
            config(set, CLT_CONFIG);
        },
        args: &[],
        names: &["config.yaml", "no `W_enc_{i}.safetensors`"],
    },
    BadCheckpoint {
        what: "a tensor the layout does not name",
        folder: "extra",
        write: |set, rng| {
            let mut t = plt_tensors(rng, false, false);
            t.insert("log_thresholds".into(), rng.normal(&[F], 0.1));
            write_files(set, &[("layer_0.safetensors".into(), t)], Dtype::F32);
        },
        args: &[],
        names: &["layer_0.safetensors", "`log_thresholds`"],
    },
];

#[test]
fn bad_checkpoints_name_the_file_and_the_problem() {
    let mut rng = Rng::new(31);
    let dir = tempfile::tempdir().unwrap();
    for case in &BAD_CHECKPOINTS {
        let ckpt = dir.path().join(case.folder);
        (case.write)(&ckpt, &mut rng);
        let e = import_err(&ckpt, case.args);
        assert!(
            case.names.iter().all(|n| e.contains(n)),
            "{}: {e}",
            case.what
        );
    }
}

#[test]
fn one_layer_of_a_set_with_a_missing_layer_is_still_read() {
    let mut rng = Rng::new(35);
    let dir = tempfile::tempdir().unwrap();
    let set = dir.path().join("set");
    relu_set(&set, &mut rng, &[0, 2]);
    let out = dir.path().join("one.onnx");
    import_ok(&set, &out, &["--layer", "2"]);
    assert!(out.exists());
}
