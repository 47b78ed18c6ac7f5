//! The workload's sizes and the files `compare prepare` writes for the three runs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use ndarray::{Array1, Array2, Axis};
use serde_json::{Value, json};
use tiller_benches::dicts;
use tiller_runtime::DictionaryFile;
use tiller_runtime::dictionary::WeightDtype;

pub(crate) const D: usize = 2304;
pub(crate) const F: usize = 16384;
pub(crate) const N_FEATURES: usize = 64;
const MAX_BATCH: usize = 64;
pub(crate) const BATCHES: [usize; 2] = [1, 64];
/// Bumped whenever `compare prepare` writes something different, so that older files are rewritten.
const PREPARED_VERSION: u32 = 1;
/// The size of the dense products that measure the machine's FLOP/s.
pub(crate) const GEMM_N: usize = 1024;
/// The buffer the cache bandwidth is measured on: the L2 of most cores holds it.
pub(crate) const CACHE_BYTES: usize = 512 << 10;

/// The folder of the comparison's files.
pub(crate) fn work_dir() -> PathBuf {
    dicts::dir().join(format!("compare-{D}x{F}"))
}

pub(crate) fn npy<A, D2>(dir: &Path, name: &str, a: &ndarray::ArrayBase<A, D2>) -> Result<()>
where
    A: ndarray::Data<Elem = f32>,
    D2: ndarray::Dimension,
{
    let path = dir.join(name);
    ndarray_npy::write_npy(&path, a).with_context(|| format!("writing {}", path.display()))
}

/// The benchmark dictionary with `W_enc` and `W_dec` stored as `dtype` (f32: the cached one; f16
/// and bf16: written from it by `compare prepare`).
pub(crate) fn dict_path(dtype: WeightDtype) -> Result<PathBuf> {
    Ok(match dtype {
        WeightDtype::F32 => dicts::relu_sae(D, F)?,
        _ => work_dir().join(format!("sae-{dtype}.onnx")),
    })
}

/// When `path` was last written, in seconds since the epoch (0 when unknown).
fn modified(path: &Path) -> u64 {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// Writes everything the three runs share: the configs, the graphs ONNX Runtime's Python API runs
/// (pruned to `acts`, as the runtime prunes its own), the weights NumPy uses, the inputs.
pub(crate) fn prepare() -> Result<()> {
    let t = Instant::now();
    let dict = dicts::relu_sae(D, F)?;
    let out = work_dir();
    // Written last: its presence (with this version) means every other file is there.
    let stamp = out.join("meta.json");
    let up_to_date = std::fs::read_to_string(&stamp)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|m| {
            m.get("version") == Some(&json!(PREPARED_VERSION))
                && m.get("dictionary_modified") == Some(&json!(modified(&dict)))
        });
    if up_to_date {
        eprintln!("{} is up to date", out.display());
        return Ok(());
    }
    std::fs::remove_file(&stamp).ok();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let file = DictionaryFile::open(&dict)?;
    for dtype in [WeightDtype::F16, WeightDtype::Bf16] {
        let path = dict_path(dtype)?;
        if !path.is_file() {
            let tmp = path.with_extension("tmp.onnx");
            tiller_runtime::dictionary::write_dictionary_as(
                file.meta(),
                &file.weights()?,
                &tmp,
                dtype,
            )?;
            std::fs::rename(&tmp, &path)?;
        }
    }
    let features = dicts::monitored_features(F, N_FEATURES);
    let rules = dicts::four_rules(&features);
    let write = |name: &str, text: String| {
        let p = out.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
    };
    write(
        "tiller.toml",
        dicts::hook_config(&dict, &features, &rules, None),
    )?;
    write(
        "tiller-norules.toml",
        dicts::hook_config(&dict, &features, &[], None),
    )?;

    // ONNX Runtime's graphs: the 64 features as their own dictionary (the runtime loads the
    // dictionary file, Python the graph pruned to `acts`), and the whole encoder.
    let tmp = out.join("sliced-dictionary.onnx");
    tiller_benches::slice_relu(&file, &features, &tmp)?;
    let sliced = DictionaryFile::open(&tmp)?;
    let acts_only = |m| tiller_runtime::graph::prune(m, &["acts"]);
    tiller_runtime::graph::write_model(
        acts_only(sliced.model())?,
        &out.join("sliced.onnx"),
        usize::MAX,
    )?;
    tiller_runtime::graph::write_model(
        acts_only(file.model())?,
        &out.join("encode.onnx"),
        usize::MAX,
    )?;

    // NumPy's weights, with `b_dec` folded into the bias as the runtime folds it:
    // (x - b_dec)·W + b = x·W + (b - b_dec·W).
    let (_, w) = file.tensor_f32("W_enc")?;
    let w = Array2::from_shape_vec((D, F), w)?;
    let b_enc = Array1::from_vec(file.tensor_f32("b_enc")?.1);
    let b = &b_enc - &file.b_dec()?.dot(&w);
    let cols: Vec<usize> = features.iter().map(|&f| f as usize).collect();
    npy(&out, "w_enc.npy", &w)?;
    npy(&out, "b_enc.npy", &b)?;
    npy(&out, "w_enc_sliced.npy", &w.select(Axis(1), &cols))?;
    npy(&out, "b_enc_sliced.npy", &b.select(Axis(0), &cols))?;
    let rows: Vec<usize> = rules.iter().map(|r| r.feature as usize).collect();
    npy(
        &out,
        "w_dec_rules.npy",
        &file.w_dec()?.select(Axis(0), &rows),
    )?;
    let x = tiller_benches::random_activations(MAX_BATCH, D, 5);
    npy(&out, "x.npy", &x)?;
    write_gemm(&out.join("gemm.onnx"))?;
    let raw: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out.join("x.f32"), raw)?;
    let rules: Vec<Value> = rules
        .iter()
        .map(|r| {
            json!({"op": r.op, "feature": r.feature, "param": r.param,
                   "column": features.iter().position(|&f| f == r.feature)})
        })
        .collect();
    write(
        "meta.json",
        serde_json::to_string_pretty(&json!({
            "version": PREPARED_VERSION, "dictionary_modified": modified(&dict), "d": D, "f": F, "features": features, "threshold": 1e9, "rules": rules,
            "dictionary": dict,
        }))?,
    )?;
    eprintln!(
        "prepared {} in {:.1} s",
        out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A dense `[n, n] × [n, n]` product as an ONNX graph: the machine's FLOP/s as ONNX Runtime's own
/// GEMM (MLAS) reaches it, measured from Python.
fn write_gemm(path: &Path) -> Result<()> {
    use onnx_protobuf::tensor_proto::DataType;
    use tiller_runtime::graph::{Dim, GraphBuilder};
    const N: usize = GEMM_N;
    let mut g = GraphBuilder::new("gemm");
    let a = g.input("a", DataType::FLOAT, &[Dim::Fixed(N), Dim::Fixed(N)]);
    let b: Vec<f32> = (0..N * N)
        .map(|i| ((i * 5 + i / N) % 13) as f32 - 6.0)
        .collect();
    let b = g.weight("b", &[N, N], &b);
    let c = g.op("MatMul", &[&a, &b], vec![]);
    g.output(&c, DataType::FLOAT, &[Dim::Fixed(N), Dim::Fixed(N)]);
    tiller_runtime::graph::write_model(g.finish(&[]), path, usize::MAX)?;
    Ok(())
}
