//! Interrupted and resumed runs end bit for bit where an uninterrupted run with the same seed
//! ends: stopped after N steps (`stop_after`), stopped by the Ctrl-C flag, and the real binary
//! stopped by SIGINT; periodic checkpoints keep the newest few; a resume with other settings is
//! refused with the settings named.
#![allow(clippy::unwrap_used)]

mod train_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;

use tiller_export::train::model::Params;
use tiller_export::train::{self, Control, Outcome, TrainConfig, checkpoint};
use tiller_runtime::{Activation, Kind};
use train_common::{synthetic, write_shards};

fn data(dir: &Path) -> PathBuf {
    let (_, x) = synthetic(3, 32, 64, 3.0 / 64.0, 40_000);
    write_shards(&dir.join("acts"), &x, 5)
}

fn config(data: &Path, dir: &Path, activation: Activation) -> TrainConfig {
    let mut cfg = TrainConfig::new(
        vec![data.to_path_buf()],
        Kind::Sae,
        activation,
        96,
        dir.join("sae.onnx"),
    );
    cfg.batch = 256;
    cfg.tokens = Some(256 * 80);
    cfg.lr = 2e-3;
    cfg.seed = 42;
    cfg.shuffle_buffer = Some(3000);
    cfg.checkpoint_every = 0;
    cfg.eval_tokens = Some(1024);
    if matches!(activation, Activation::TopK | Activation::BatchTopK) {
        cfg.k = Some(4);
        // Latents that miss 4 batches are dead: AuxK is at work, and its state must survive too.
        cfg.dead_tokens = Some(1024);
    }
    cfg
}

fn finished(cfg: &TrainConfig, control: &Control) -> Box<train::Finished> {
    match train::train(cfg, control).unwrap() {
        Outcome::Finished(f) => f,
        Outcome::Stopped { step, .. } => panic!("stopped at {step}"),
    }
}

fn same_bits(a: &Params<f32>, b: &Params<f32>) {
    for (i, (ta, tb)) in a.tensors().iter().zip(b.tensors()).enumerate() {
        assert_eq!(ta.len(), tb.len());
        let differ = ta
            .iter()
            .zip(tb.iter())
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        assert_eq!(differ, 0, "tensor {i}: {differ} values differ");
    }
}

#[test]
fn stop_and_resume_equals_an_uninterrupted_run() {
    for activation in [
        Activation::TopK,
        Activation::JumpRelu,
        Activation::BatchTopK,
        Activation::Relu,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let data = data(dir.path());
        let whole = finished(&config(&data, dir.path(), activation), &Control::default());

        let mut cfg = config(&data, dir.path(), activation);
        cfg.output = dir.path().join("resumed.onnx");
        cfg.stop_after = Some(37);
        match train::train(&cfg, &Control::default()).unwrap() {
            Outcome::Stopped { step, checkpoint } => {
                assert_eq!(step, 37);
                assert!(checkpoint.is_file());
            }
            Outcome::Finished(_) => panic!("{activation}: did not stop"),
        }
        assert!(!cfg.output.exists(), "a stopped run writes no dictionary");
        cfg.stop_after = None;
        cfg.resume = true;
        let resumed = finished(&cfg, &Control::default());
        assert_eq!(resumed.report.resumed_from, Some(37));
        same_bits(&whole.params, &resumed.params);
        assert_eq!(whole.threshold, resumed.threshold, "{activation}");
        assert_eq!(whole.report.eval, resumed.report.eval, "{activation}");
        assert_eq!(
            std::fs::read(dir.path().join("sae.onnx")).unwrap(),
            std::fs::read(dir.path().join("resumed.onnx")).unwrap(),
            "{activation}: the dictionaries differ"
        );
    }
}

#[test]
fn the_stop_flag_saves_a_checkpoint_and_resume_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let whole = finished(
        &config(&data, dir.path(), Activation::TopK),
        &Control::default(),
    );

    let mut cfg = config(&data, dir.path(), Activation::TopK);
    cfg.checkpoint_dir = Some(dir.path().join("ckpt"));
    cfg.checkpoint_every = 10;
    cfg.keep_checkpoints = 2;
    cfg.stop_after = Some(55);
    assert!(matches!(
        train::train(&cfg, &Control::default()).unwrap(),
        Outcome::Stopped { step: 55, .. }
    ));
    let kept: Vec<u64> = checkpoint::list(&dir.path().join("ckpt"))
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(kept, vec![50, 55], "the two newest are kept");

    // Ctrl-C: the flag is seen at the end of the next step.
    cfg.stop_after = None;
    cfg.resume = true;
    let control = Control::default();
    control.stop.store(true, Ordering::SeqCst);
    match train::train(&cfg, &control).unwrap() {
        Outcome::Stopped { step, .. } => assert_eq!(step, 56),
        Outcome::Finished(_) => panic!("the stop flag was ignored"),
    }
    let resumed = finished(&cfg, &Control::default());
    same_bits(&whole.params, &resumed.params);
}

#[test]
fn resuming_with_other_settings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let mut cfg = config(&data, dir.path(), Activation::TopK);
    cfg.stop_after = Some(5);
    train::train(&cfg, &Control::default()).unwrap();
    cfg.stop_after = None;
    cfg.resume = true;
    cfg.lr = 1e-3;
    cfg.seed = 7;
    let e = train::train(&cfg, &Control::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("lr = 0.001") && e.contains("seed = 7"), "{e}");

    // A damaged checkpoint is an error naming it, not a panic.
    let latest = checkpoint::latest(&cfg.checkpoint_dir()).unwrap().unwrap();
    let bytes = std::fs::read(&latest).unwrap();
    std::fs::write(&latest, &bytes[..bytes.len() / 2]).unwrap();
    cfg.lr = 2e-3;
    cfg.seed = 42;
    let e = train::train(&cfg, &Control::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains(&latest.display().to_string()), "{e}");
}

fn cli(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tiller-export"));
    c.arg("train").args(args);
    c
}

/// The binary, interrupted by SIGINT mid-run: it saves a checkpoint and exits with 130; `--resume`
/// finishes it, and the dictionary is byte-identical to an uninterrupted run's.
#[test]
fn sigint_then_resume_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let d = data.to_str().unwrap();
    let args = |out: &str| -> Vec<String> {
        [
            "--input",
            d,
            "--activation",
            "topk",
            "--k",
            "4",
            "--d-sae",
            "96",
            "--batch",
            "64",
            "--tokens",
            "192000",
            "--lr",
            "2e-3",
            "--seed",
            "5",
            "--checkpoint-every",
            "0",
            "--shuffle-buffer",
            "2000",
            "-o",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let whole = dir.path().join("whole.onnx");
    let st = cli(&args(whole.to_str().unwrap())
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>())
    .arg("--quiet")
    .output()
    .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );

    let part = dir.path().join("part.onnx");
    let a = args(part.to_str().unwrap());
    let mut child = cli(&a.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first progress line (1% of the run), then interrupt.
    use std::io::{BufRead, BufReader};
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if line.starts_with("step ") {
            break;
        }
    }
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.code() == Some(0) {
        // The run finished before the signal landed: nothing to resume (a very fast machine).
        assert!(stdout.contains("wrote"), "{stdout}");
        return;
    }
    assert_eq!(out.status.code(), Some(130), "{stdout}\n{rest}");
    println!("interrupted: {}", stdout.trim());
    assert!(stdout.contains("continue with --resume"), "{stdout}");
    assert!(!part.exists());
    let st = cli(&a.iter().map(String::as_str).collect::<Vec<_>>())
        .args(["--resume", "--quiet"])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert_eq!(
        std::fs::read(&whole).unwrap(),
        std::fs::read(&part).unwrap()
    );
}
