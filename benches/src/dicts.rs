//! Benchmark dictionaries cached on disk, so that criterion's grid and `benches/compare` share them
//! (a 65536 × 4096 dictionary holds 2 GiB of weights: written once, in seconds), and the hook
//! configuration every benchmark uses.

use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2};
use tiller_runtime::{Activation, Kind, Meta, Weights};

/// Where cached dictionaries live: `$TILLER_BENCH_DICTS`, else `target/bench-dicts` of this
/// workspace (`$CARGO_TARGET_DIR/bench-dicts` when that is set).
pub fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TILLER_BENCH_DICTS") {
        return PathBuf::from(d);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().unwrap_or(manifest);
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(|| root.join("target"), |t| root.join(t));
    target.join("bench-dicts")
}

/// SplitMix64: fast enough to fill a GiB of weights in a fraction of a second.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform values of standard deviation `sd` (two per draw).
    fn fill(&mut self, out: &mut [f32], sd: f32) {
        let a = sd * 3f32.sqrt();
        let scale = 2.0 * a / (1u32 << 24) as f32;
        for pair in out.chunks_mut(2) {
            let r = self.next();
            for (i, v) in pair.iter_mut().enumerate() {
                let bits = ((r >> (32 * i + 8)) & 0xFF_FFFF) as f32;
                *v = bits * scale - a;
            }
        }
    }
}

fn uniform(seed: u64, shape: (usize, usize), sd: f32) -> Array2<f32> {
    let mut data = vec![0f32; shape.0 * shape.1];
    SplitMix(seed).fill(&mut data, sd);
    Array2::from_shape_vec(shape, data).unwrap_or_else(|_| unreachable!("the shape fits the data"))
}

/// The cached ReLU SAE of `d_in × d_sae` (`b_enc` −0.1, weights of variance `1/d_in`, `b_dec` on
/// the input), written on first use as `<dir>/relu-<d_in>x<d_sae>/sae.onnx` (with ONNX external
/// data past 2 GiB). Concurrent first uses each write a private folder and rename it into place.
pub fn relu_sae(d_in: usize, d_sae: usize) -> tiller_runtime::Result<PathBuf> {
    let root = dir();
    let folder = root.join(format!("relu-{d_in}x{d_sae}"));
    let path = folder.join("sae.onnx");
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&root).map_err(|e| tiller_runtime::Error::io(&root, e))?;
    let tmp = root.join(format!(
        ".relu-{d_in}x{d_sae}.{}.{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&tmp).map_err(|e| tiller_runtime::Error::io(&tmp, e))?;
    eprintln!(
        "writing a {d_in} x {d_sae} ReLU SAE ({:.0} MiB of weights) into {}",
        (2 * d_in * d_sae * 4) as f64 / (1 << 20) as f64,
        folder.display()
    );
    let sd = 1.0 / (d_in as f32).sqrt();
    let meta = Meta::new(Kind::Sae, Activation::Relu, d_in, d_sae, d_in);
    let weights = Weights {
        apply_b_dec_to_input: true,
        ..Weights::new(
            uniform(d_sae as u64 * 31 + d_in as u64, (d_in, d_sae), sd),
            Array1::from_elem(d_sae, -0.1),
            uniform(d_sae as u64 * 37 + d_in as u64 + 1, (d_sae, d_in), sd),
            Array1::zeros(d_in),
        )
    };
    tiller_runtime::dictionary::write_dictionary(&meta, &weights, &tmp.join("sae.onnx"))?;
    drop(weights);
    if std::fs::rename(&tmp, &folder).is_err() {
        // Another process got there first: keep its copy.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    if path.is_file() {
        Ok(path)
    } else {
        Err(tiller_runtime::Error::invalid(
            "benchmark dictionary",
            format!("{} was not written", path.display()),
        ))
    }
}

/// The `n` features a benchmark monitors: spread over the first 16384 columns, the same ids as
/// `benches/c-overhead` and `python/bench_overhead.py` use.
pub fn monitored_features(d_sae: usize, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| i * 251 % d_sae as u32).collect()
}

/// One steering rule of a profile, as TOML: op, feature and the op's parameter.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// `add`, `clamp`, `ablate`, `scale`, `cap`, `vector` or `project_cap`.
    pub op: &'static str,
    /// The feature (ignored by `vector` and `project_cap`, which use a direction file).
    pub feature: u32,
    /// Strength, value or factor (none for `ablate`).
    pub param: f32,
}

/// The four rules of the benchmark profile: clamp, add, scale and ablate on the first four
/// monitored features.
pub fn four_rules(features: &[u32]) -> Vec<Rule> {
    let f = |i: usize| features.get(i).copied().unwrap_or(0);
    vec![
        Rule {
            op: "clamp",
            feature: f(0),
            param: 1.0,
        },
        Rule {
            op: "add",
            feature: f(1),
            param: 0.5,
        },
        Rule {
            op: "scale",
            feature: f(2),
            param: 0.5,
        },
        Rule {
            op: "ablate",
            feature: f(3),
            param: 0.0,
        },
    ]
}

/// A config with one dictionary at hook `h` (named `res`), a request-window monitor over
/// `features` that never fires (threshold 1e9: its cost without its events), and profile `p`
/// holding `rules`. `direction` is the `.npy` file (one `[d_in]` row) that `vector` and
/// `project_cap` rules read.
pub fn hook_config(
    dict: &Path,
    features: &[u32],
    rules: &[Rule],
    direction: Option<&Path>,
) -> String {
    let list: Vec<String> = features.iter().map(u32::to_string).collect();
    let mut s = format!(
        "[runtime]\nfvu_sample_rate = 0.0\n\n[[dictionary]]\nname = \"res\"\npath = \"{}\"\nhook = \"h\"\n",
        dict.display()
    );
    if !features.is_empty() {
        s += &format!(
            "\n[[monitor]]\nname = \"m\"\ndictionary = \"res\"\nfeatures = [{}]\nthreshold = 1e9\nwindow = \"request\"\naggregate = \"max\"\n",
            list.join(", ")
        );
    }
    s += "\n[[profile]]\nname = \"p\"\n";
    for r in rules {
        s += &format!("\n[[profile.steer]]\nop = \"{}\"\n", r.op);
        match r.op {
            "vector" | "project_cap" => {
                let path = direction
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                s += &format!("vector = \"{path}\"\nindex = 0\nhook = \"h\"\n");
            }
            _ => s += &format!("dictionary = \"res\"\nfeature = {}\n", r.feature),
        }
        match r.op {
            "add" | "vector" => s += &format!("strength = {:?}\n", r.param),
            "scale" => s += &format!("factor = {:?}\n", r.param),
            "clamp" | "cap" | "project_cap" => s += &format!("value = {:?}\n", r.param),
            _ => {}
        }
    }
    s
}
