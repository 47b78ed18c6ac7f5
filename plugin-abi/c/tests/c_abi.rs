//! The C ABI as a C host sees it: `tests/c/abi_test.c` is compiled against the committed
//! `include/tiller.h` and the debug `libtiller.so`, and run on a tiny dictionary written here, once
//! plainly and once under Valgrind (when it is installed). The C program checks every exported
//! function and error path and compares the steered activations with values it computes itself
//! from the weights this file writes out (`weights.bin`).
//!
//! Two ignored tests serve `benches/c-overhead/run.sh`: `overhead_fixture` writes its dictionary
//! and config, `overhead_rust_api` times the Rust side of the comparison.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use tiller_runtime::{Activation, Kind, Meta, Weights};

/// The test dictionary: small, so that the run under Valgrind stays quick. `abi_test.c` reads the
/// sizes from `weights.bin` and knows the feature numbers the configs below use.
const D: usize = 16;
const F: usize = 32;

/// A deterministic normal sampler (splitmix64 + Box–Muller): tiller-capi has no `rand` dependency.
struct Normal(u64);

impl Normal {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn sample(&mut self, scale: f32) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32 * scale
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.sample(scale)).collect()
    }
}

/// `collect` into the type of `like` (an `ndarray::Array1<f32>`, which tiller-capi cannot name: it
/// has no direct ndarray dependency).
fn collect_like<T: FromIterator<f32>>(_like: &T, v: &[f32]) -> T {
    v.iter().copied().collect()
}

/// Writes a ReLU SAE (`b_dec` subtracted from the input) from row-major data: `w_enc` is
/// `[d, f]`, `w_dec` is `[f, d]`.
fn write_sae(path: &Path, hook: &str, d: usize, f: usize, data: [&[f32]; 4]) {
    let [w_enc, b_enc, w_dec, b_dec] = data;
    let mut meta = Meta::new(Kind::Sae, Activation::Relu, d, f, d);
    meta.hook_in = hook.into();
    meta.hook_out = hook.into();
    let mut w = Weights::new(
        Default::default(),
        b_enc.iter().copied().collect(),
        Default::default(),
        b_dec.iter().copied().collect(),
    );
    w.w_enc = collect_like(&w.b_enc, w_enc)
        .into_shape_with_order((d, f))
        .unwrap();
    w.w_dec = collect_like(&w.b_enc, w_dec)
        .into_shape_with_order((f, d))
        .unwrap();
    w.apply_b_dec_to_input = true;
    let model = tiller_runtime::dictionary::build_model(&meta, &w).unwrap();
    tiller_runtime::graph::write_model(model, path, tiller_runtime::graph::EXTERNAL_DATA_THRESHOLD)
        .unwrap();
}

/// The config `abi_test.c` runs: feature 7 stops a request (token window), profile `clamp` clamps
/// feature 3 to 2.5, profile `boost` adds decoder row 5 to generated tokens only; requests may
/// steer any feature (the test's overrides ablate feature 20, which the config does not name).
const CONFIG: &str = r#"
[runtime]
fvu_sample_rate = 0.0

[[dictionary]]
name = "res"
path = "dict.onnx"

[[monitor]]
name = "stopper"
dictionary = "res"
features = [7]
threshold = 3.0
window = "token"
action = "stop"

[[profile]]
name = "clamp"
[[profile.steer]]
name = "clamp-3"
dictionary = "res"
op = "clamp"
feature = 3
value = 2.5

[[profile]]
name = "boost"
[[profile.steer]]
name = "boost-5"
dictionary = "res"
op = "add"
feature = 5
strength = 1.5
apply_to = "generated"

[[requests.dictionary]]
name = "res"
any_feature = true
"#;

/// What the C program reads: the dictionary, `weights.bin` (`u32` d, `u32` f, then `W_enc [d,f]`,
/// `b_enc [f]`, `W_dec [f,d]`, `b_dec [d]` as little-endian f32), `tiller.toml`, `reload.toml` (the
/// same with the clamp value 1.0) and `bad.toml` (a rule on a dictionary that does not exist).
fn write_fixtures(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Normal(7);
    let w_enc = rng.vec(D * F, 0.25);
    let b_enc = rng.vec(F, 0.05);
    let w_dec = rng.vec(F * D, 0.3);
    let b_dec = rng.vec(D, 0.1);
    write_sae(
        &dir.join("dict.onnx"),
        "layer.0",
        D,
        F,
        [&w_enc, &b_enc, &w_dec, &b_dec],
    );
    let mut raw = Vec::new();
    raw.extend_from_slice(&(D as u32).to_le_bytes());
    raw.extend_from_slice(&(F as u32).to_le_bytes());
    for v in [&w_enc, &b_enc, &w_dec, &b_dec].into_iter().flatten() {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(dir.join("weights.bin"), raw).unwrap();
    std::fs::write(dir.join("tiller.toml"), CONFIG).unwrap();
    let reload = CONFIG.replace("value = 2.5", "value = 1.0");
    assert_ne!(reload, CONFIG);
    std::fs::write(dir.join("reload.toml"), reload).unwrap();
    let bad = CONFIG.replace(
        "name = \"clamp-3\"\ndictionary = \"res\"",
        "name = \"clamp-3\"\ndictionary = \"missing\"",
    );
    assert_ne!(bad, CONFIG);
    std::fs::write(dir.join("bad.toml"), bad).unwrap();
}

/// Builds `libtiller.so` (debug: the injected-panic hook exists only there) and returns its folder.
/// The folder comes from cargo's own artifact messages, so `CARGO_TARGET_DIR` and `--target-dir`
/// set through the environment are honoured.
fn build_library() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap();
    let out = Command::new(env!("CARGO"))
        .args([
            "build",
            "-p",
            "tiller-capi",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(workspace)
        .output()
        .expect("run cargo build");
    assert!(
        out.status.success(),
        "cargo build -p tiller-capi failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_cdylib = msg["reason"] == "compiler-artifact"
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "cdylib"));
        if !is_cdylib {
            continue;
        }
        let so = msg["filenames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str())
            .find(|f| f.ends_with(".so"));
        if let Some(so) = so {
            return Path::new(so).parent().unwrap().to_path_buf();
        }
    }
    panic!("cargo build -p tiller-capi reported no libtiller.so:\n{stdout}");
}

struct Prepared {
    fixtures: PathBuf,
    program: PathBuf,
}

/// Builds the library, writes the fixtures and compiles the C program, once per test binary.
fn prepared() -> &'static Prepared {
    static PREPARED: OnceLock<Prepared> = OnceLock::new();
    PREPARED.get_or_init(|| {
        let lib = build_library();
        // One folder, emptied at each run: nothing piles up in the target directory.
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c_abi");
        let _ = std::fs::remove_dir_all(&root);
        let fixtures = root.join("fixtures");
        write_fixtures(&fixtures);
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let program = root.join("abi_test");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let out = Command::new(&cc)
            .args(["-std=c11", "-g", "-O1", "-Wall", "-Wextra", "-Werror"])
            .arg("-I")
            .arg(manifest.join("include"))
            .arg(manifest.join("tests/c/abi_test.c"))
            .arg("-o")
            .arg(&program)
            .arg("-L")
            .arg(&lib)
            .arg("-ltiller")
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .arg("-lm")
            .output()
            .unwrap_or_else(|e| panic!("run the C compiler `{cc}`: {e}"));
        assert!(
            out.status.success(),
            "compiling tests/c/abi_test.c failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Prepared { fixtures, program }
    })
}

/// The C program's command, with an environment that does not leak the caller's test knobs in.
fn c_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_remove("TILLER_TEST_PANIC_AT_HOOK")
        // The injected panic prints through the panic hook; a backtrace would only slow Valgrind.
        .env("RUST_BACKTRACE", "0");
    cmd
}

fn report(what: &str, out: &Output) -> String {
    format!(
        "{what} exited with {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn c_program_passes() {
    let p = prepared();
    let out = c_command(&p.program)
        .arg(&p.fixtures)
        .output()
        .expect("run abi_test");
    assert!(out.status.success(), "{}", report("abi_test", &out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("abi_test: all"),
        "{}",
        report("abi_test", &out)
    );
}

/// Definite leaks and every invalid read or write fail the test; only ONNX Runtime's and the
/// loader's own noise is suppressed (`tests/c/valgrind.supp`), never a frame in libtiller.
#[test]
fn c_program_is_clean_under_valgrind() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("valgrind is not installed: skipping the run under Valgrind");
        return;
    }
    let p = prepared();
    let supp = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/valgrind.supp");
    let mut cmd = c_command(Path::new("valgrind"));
    cmd.arg("--error-exitcode=99")
        .arg("--leak-check=full")
        .arg("--errors-for-leak-kinds=definite")
        .arg("--show-leak-kinds=definite")
        .arg("--num-callers=40")
        .arg(format!("--suppressions={}", supp.display()))
        .arg(&p.program)
        .arg(&p.fixtures);
    let out = cmd.output().expect("run valgrind");
    assert!(
        out.status.code() != Some(99),
        "Valgrind found memory errors or definite leaks:\n{}",
        report("abi_test under valgrind", &out)
    );
    assert!(
        out.status.success(),
        "abi_test failed its own checks under Valgrind:\n{}",
        report("abi_test under valgrind", &out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ERROR SUMMARY: 0 errors"),
        "{}",
        report("abi_test under valgrind", &out)
    );
}

/// Writes the dictionary and config of `benches/c-overhead/run.sh` into `$TILLER_C_OVERHEAD_DIR`:
/// the shape of `benches/benches/hook.rs` (d_in 2304, a 16384-feature ReLU SAE, 64 monitored
/// features, 4 rules), with this file's sampler in place of `rand`.
#[test]
#[ignore = "a fixture writer for benches/c-overhead/run.sh"]
fn overhead_fixture() {
    const BD: usize = 2304;
    const BF: usize = 16384;
    let Some(dir) = std::env::var_os("TILLER_C_OVERHEAD_DIR") else {
        eprintln!("TILLER_C_OVERHEAD_DIR is not set: nothing to write");
        return;
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Normal(11);
    let scale = 1.0 / (BD as f32).sqrt();
    let w_enc = rng.vec(BD * BF, scale);
    let w_dec = rng.vec(BF * BD, scale);
    write_sae(
        &dir.join("sae.onnx"),
        "h",
        BD,
        BF,
        [&w_enc, &vec![-0.1; BF], &w_dec, &vec![0.0; BD]],
    );
    let features: Vec<String> = (0..64u32)
        .map(|i| (i * 251 % BF as u32).to_string())
        .collect();
    let config = format!(
        r#"[runtime]
fvu_sample_rate = 0.0
[[dictionary]]
name = "res"
path = "sae.onnx"
hook = "h"
[[monitor]]
name = "m"
dictionary = "res"
features = [{}]
threshold = 1e9
window = "request"
aggregate = "max"
[[profile]]
name = "p"
[[profile.steer]]
dictionary = "res"
op = "clamp"
feature = {}
value = 1.0
[[profile.steer]]
dictionary = "res"
op = "add"
feature = {}
strength = 0.5
[[profile.steer]]
dictionary = "res"
op = "scale"
feature = {}
factor = 0.5
[[profile.steer]]
dictionary = "res"
op = "ablate"
feature = {}
"#,
        features.join(", "),
        features[0],
        features[1],
        features[2],
        features[3]
    );
    std::fs::write(dir.join("tiller.toml"), config).unwrap();
    eprintln!("wrote {}", dir.display());
}

/// The Rust twin of `benches/c-overhead/overhead.c`: the same runtime, config, activations and
/// timing loop through the host API, so that `run.sh` prints the C ABI's cost next to it. Run in
/// release (`cargo test --release ... -- --ignored overhead_rust_api --nocapture`); it prints and
/// asserts nothing about time.
#[test]
#[ignore = "a timing loop for benches/c-overhead/run.sh"]
fn overhead_rust_api() {
    use std::time::Instant;
    use tiller_runtime::{ActivationsMut, Phase, Runtime, Token};
    const BD: usize = 2304;
    const BATCH: usize = 1024;
    let Some(dir) = std::env::var_os("TILLER_C_OVERHEAD_DIR") else {
        eprintln!("TILLER_C_OVERHEAD_DIR is not set: nothing to time");
        return;
    };
    let rounds: usize = std::env::var("TILLER_C_OVERHEAD_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(200)
        .max(1);
    let rt = Runtime::from_config_file(Path::new(&dir).join("tiller.toml")).unwrap();
    rt.begin_request(1, Some("p"), None).unwrap();
    // overhead.c's activations: xorshift64 + Box–Muller from seed 5.
    let mut s: u64 = 5;
    let mut uniform = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / 9_007_199_254_740_992.0
    };
    let x: Vec<f32> = (0..BD)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    let mut bufs = vec![0.0f32; BATCH * BD];
    let tokens = [Token {
        request: 1,
        phase: Phase::Generated,
    }];
    let mut full = vec![0.0f64; rounds];
    let mut step_only = vec![0.0f64; rounds];
    let mut empty = vec![0.0f64; rounds];
    for _warm in 0..2 {
        for r in 0..rounds {
            for b in bufs.chunks_exact_mut(BD) {
                b.copy_from_slice(&x);
            }
            let t0 = Instant::now();
            for b in bufs.chunks_exact_mut(BD) {
                let mut step = rt.step(&tokens).unwrap();
                step.hook("h", ActivationsMut::F32(b)).unwrap();
                std::hint::black_box(step.finish());
            }
            full[r] = t0.elapsed().as_nanos() as f64 / BATCH as f64;
            let t0 = Instant::now();
            for _ in 0..BATCH {
                let step = rt.step(&tokens).unwrap();
                std::hint::black_box(step.finish());
            }
            step_only[r] = t0.elapsed().as_nanos() as f64 / BATCH as f64;
            let t0 = Instant::now();
            for _ in 0..BATCH {
                let mut step = rt.step(&[]).unwrap();
                step.hook("h", ActivationsMut::F32(&mut [])).unwrap();
                std::hint::black_box(step.finish());
            }
            empty[r] = t0.elapsed().as_nanos() as f64 / BATCH as f64;
        }
    }
    for (what, v) in [
        ("open+hook+close", &mut full),
        ("open+close (no hook)", &mut step_only),
        ("0 tokens: open+hook+close", &mut empty),
    ] {
        v.sort_by(f64::total_cmp);
        println!(
            "rust  {what:<26} median {:8.1} ns/call   min {:8.1} ns/call   ({rounds} rounds x {BATCH} calls)",
            v[rounds / 2],
            v[0]
        );
    }
    rt.end_request(1).unwrap();
}
