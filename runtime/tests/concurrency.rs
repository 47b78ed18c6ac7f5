//! Many threads at once give the same results as one; reloads under load never disturb steps and a
//! broken config changes nothing; per-request overrides work and never become metric labels.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ndarray::{Array1, Array2};
use tiller_runtime::dictionary::reference;
use tiller_runtime::{Activation, ActivationsMut, Kind, Meta, Phase, Runtime, Token, Weights};

#[path = "support/exposition.rs"]
mod exposition;
use exposition::sample;
use tiller_test_support::{randn_seeded, write_dictionary};

const D: usize = 32;
const F: usize = 96;

fn write_dict(dir: &Path, activation: Activation) -> (Meta, Weights) {
    let mut meta = Meta::new(Kind::Sae, activation, D, F, D);
    meta.hook_in = "blocks.2".into();
    meta.hook_out = "blocks.2".into();
    meta.k = (activation == Activation::TopK).then_some(16);
    let w = Weights {
        apply_b_dec_to_input: true,
        ..Weights::new(
            randn_seeded(1, (D, F)) * 0.3,
            Array1::from_elem(F, 0.02),
            randn_seeded(2, (F, D)) * 0.3,
            Array1::zeros(D),
        )
    };
    write_dictionary(&dir.join("d.onnx"), &meta, &w);
    (meta, w)
}

const GOOD: &str = r#"
[runtime]
fvu_sample_rate = 0.25
[[dictionary]]
name = "res"
path = "d.onnx"
[[monitor]]
name = "m"
dictionary = "res"
features = [1, 2, 3]
threshold = 0.5
window = "token"
[[profile]]
name = "p0"
[[profile.steer]]
name = "clamp4"
dictionary = "res"
op = "clamp"
feature = 4
value = 3.0
[[profile]]
name = "p1"
[[profile.steer]]
name = "ablate9"
dictionary = "res"
op = "ablate"
feature = 9
[[profile.steer]]
name = "add1"
dictionary = "res"
op = "add"
feature = 1
strength = -0.5
normalize = true
# Requests clamp a feature no monitor or profile names: the full dictionary runs for them.
[[requests.dictionary]]
name = "res"
any_feature = true
"#;

/// Writes the test dictionary (with `activation`) and the `GOOD` config into `dir`; returns the
/// config's path and the dictionary.
fn write_good(dir: &Path, activation: Activation) -> (PathBuf, Meta, Weights) {
    let (meta, w) = write_dict(dir, activation);
    let cfg = dir.join("t.toml");
    std::fs::write(&cfg, GOOD).unwrap();
    (cfg, meta, w)
}

/// Runs `steps` continuous-batching steps for thread `tid` and returns every step's output.
fn drive(rt: &Runtime, tid: u64, steps: usize) -> Vec<Vec<f32>> {
    let ids = [tid * 100 + 1, tid * 100 + 2, tid * 100 + 3];
    rt.begin_request(ids[0], Some("p0"), None).unwrap();
    rt.begin_request(ids[1], Some("p1"), None).unwrap();
    rt.begin_request(
        ids[2],
        None,
        Some(r#"{"steer": [{"dictionary": "res", "op": "clamp", "feature": 50, "value": 1.0}]}"#),
    )
    .unwrap();
    let mut outs = Vec::new();
    for s in 0..steps {
        let phase = if s == 0 {
            Phase::Prompt
        } else {
            Phase::Generated
        };
        let tokens: Vec<Token> = (0..5)
            .map(|i| Token {
                request: ids[i % 3],
                phase,
            })
            .collect();
        let mut x = randn_seeded(tid * 10_000 + s as u64, (tokens.len(), D));
        let mut step = rt.step(&tokens).unwrap();
        step.hook("blocks.2", ActivationsMut::F32(x.as_slice_mut().unwrap()))
            .unwrap();
        step.finish();
        outs.push(x.into_raw_vec_and_offset().0);
    }
    for id in ids {
        rt.end_request(id).unwrap();
    }
    outs
}

#[test]
fn many_threads_match_one_thread() {
    for activation in [Activation::Relu, Activation::TopK] {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, _, _) = write_good(dir.path(), activation);
        let single = Runtime::from_config_file(&cfg).unwrap();
        let want: Vec<Vec<Vec<f32>>> = (0..8).map(|t| drive(&single, t, 30)).collect();
        let shared = Arc::new(Runtime::from_config_file(&cfg).unwrap());
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let rt = shared.clone();
                std::thread::spawn(move || drive(&rt, t, 30))
            })
            .collect();
        for (t, h) in handles.into_iter().enumerate() {
            assert_eq!(
                h.join().unwrap(),
                want[t],
                "{activation}: thread {t} differs from the single-threaded run"
            );
        }
        let text = shared.metrics_text();
        assert!(
            text.contains(&format!(
                "tiller_tokens_total{{hook=\"blocks.2\"}} {}",
                8 * 30 * 5
            )),
            "{text}"
        );
    }
}

#[test]
fn reloads_under_load_and_broken_configs_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _, _) = write_good(dir.path(), Activation::Relu);
    let reference_rt = Runtime::from_config_file(&cfg).unwrap();
    let want: Vec<Vec<Vec<f32>>> = (0..4).map(|t| drive(&reference_rt, t, 40)).collect();

    let rt = Arc::new(Runtime::from_config_file(&cfg).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let reloader = {
        let (rt, stop, cfg, dir) = (
            rt.clone(),
            stop.clone(),
            cfg.clone(),
            dir.path().to_path_buf(),
        );
        std::thread::spawn(move || {
            let broken = [
                ("syntax", "[[dictionary]\nname = "),
                (
                    "missing file",
                    "[[dictionary]]\nname = \"res\"\npath = \"nowhere.onnx\"\n",
                ),
                (
                    "bad feature",
                    &GOOD.replace("feature = 4", "feature = 4000"),
                ),
            ];
            let (mut ok, mut bad) = (0, 0);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let bad_path = dir.join("broken.toml");
                let (what, text) = broken[i % broken.len()];
                std::fs::write(&bad_path, text).unwrap();
                assert!(
                    rt.reload(Some(&bad_path)).is_err(),
                    "{what} must be rejected"
                );
                bad += 1;
                rt.reload(Some(&cfg)).unwrap();
                ok += 1;
                i += 1;
            }
            (ok, bad)
        })
    };
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let rt = rt.clone();
            std::thread::spawn(move || drive(&rt, t, 40))
        })
        .collect();
    for (t, h) in handles.into_iter().enumerate() {
        assert_eq!(
            h.join().unwrap(),
            want[t],
            "thread {t}: a reload changed a result"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, bad) = reloader.join().unwrap();
    assert!(ok >= 1 && bad >= 1);
    let text = rt.metrics_text();
    assert!(
        text.contains(&format!(
            "tiller_config_reloads_total{{result=\"accepted\"}} {ok}"
        )),
        "{text}"
    );
    assert!(text.contains(&format!(
        "tiller_config_reloads_total{{result=\"rejected\"}} {bad}"
    )));

    // The error names the file, the line and the key.
    let bad_path = dir.path().join("broken.toml");
    std::fs::write(
        &bad_path,
        GOOD.replace("threshold = 0.5", "threshold = \"high\""),
    )
    .unwrap();
    let e = rt.reload(Some(&bad_path)).unwrap_err().to_string();
    assert!(e.contains("broken.toml:") && e.contains("threshold"), "{e}");
    std::fs::write(
        &bad_path,
        GOOD.replace(
            "dictionary = \"res\"\nfeatures",
            "dictionary = \"resx\"\nfeatures",
        ),
    )
    .unwrap();
    let e = rt.reload(Some(&bad_path)).unwrap_err().to_string();
    assert!(
        e.contains("broken.toml:9:") && e.contains("`dictionary`") && e.contains("resx"),
        "{e}"
    );
}

#[test]
fn overrides_and_bounded_labels() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, meta, w) = write_good(dir.path(), Activation::Relu);
    let rt = Runtime::from_config_file(&cfg).unwrap();
    // Feature 50 is not named by the config: the full dictionary runs for this request.
    rt.begin_request(
        123_456,
        None,
        Some(r#"{"steer": [{"dictionary": "res", "op": "clamp", "feature": 50, "value": 1.0}]}"#),
    )
    .unwrap();
    let mut x = randn_seeded(77, (3, D));
    let f = reference::encode(&meta, &w, x.view());
    let mut want = x.mapv(f64::from);
    for t in 0..3 {
        let c = 1.0 - f[[t, 50]];
        for j in 0..D {
            want[[t, j]] += c * f64::from(w.w_dec[[50, j]]);
        }
    }
    let tokens = [Token {
        request: 123_456,
        phase: Phase::Prompt,
    }; 3];
    let mut step = rt.step(&tokens).unwrap();
    step.hook("blocks.2", ActivationsMut::F32(x.as_slice_mut().unwrap()))
        .unwrap();
    step.finish();
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let err = x
        .iter()
        .zip(want.iter())
        .fold(0.0f64, |m, (a, b)| m.max((f64::from(*a) - b).abs()))
        / scale;
    assert!(err < 1e-5, "override rule: rel err {err:e}");

    // Bad overrides are refused with the reason.
    assert!(
        rt.begin_request(9, None, Some("{\"steer\": 3}"))
            .unwrap_err()
            .to_string()
            .contains("request overrides")
    );
    assert!(
        rt.begin_request(
            9,
            None,
            Some(
                r#"{"steer": [{"dictionary": "res", "op": "clamp", "feature": 99999, "value": 1}]}"#
            )
        )
        .is_err()
    );
    assert!(rt.begin_request(9, Some("nope"), None).is_err());
    assert!(
        rt.step(&[Token {
            request: 424242,
            phase: Phase::Prompt
        }])
        .is_err()
    );
    let mut step = rt.step(&tokens).unwrap();
    let mut short = vec![0.0f32; D * 2];
    assert!(
        step.hook("blocks.2", ActivationsMut::F32(&mut short))
            .is_err()
    );
    assert!(
        step.hook("nowhere", ActivationsMut::F32(&mut short))
            .is_err()
    );
    step.finish();

    // Every label value comes from the config or from fixed sets.
    let allowed: BTreeSet<String> = [
        "blocks.2",
        "res",
        "m",
        "clamp4",
        "ablate9",
        "add1",
        "request_override",
        "1",
        "2",
        "3",
        "4",
        "9",
        "flag",
        "switch_profile",
        "stop",
        "accepted",
        "rejected",
        // tiller_fvu_samples_total{result}.
        "measured",
        "dropped",
        "shape",
        "unknown_hook",
        "unknown_request",
        "encode",
        "profile",
        "policy",
        "override",
        env!("CARGO_PKG_VERSION"),
        "1.31.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for line in rt.metrics_text().lines().filter(|l| !l.starts_with('#')) {
        let Some(start) = line.find('{') else {
            continue;
        };
        let end = line.rfind('}').unwrap();
        for pair in line[start + 1..end].split(',') {
            let (k, v) = pair.split_once('=').unwrap();
            if k == "le" {
                continue;
            }
            let v = v.trim_matches('"');
            assert!(
                allowed.contains(v),
                "label {k}={v} is not from a bounded set: {line}"
            );
        }
    }
}

/// Step buffers keep the per-feature counts and flush them at most every 10 ms, and at each
/// scrape: a scrape right after the last step, whether it gathers the registry itself (as a host
/// serving its own registry does) or asks for the text, counts every step that ended, across
/// threads and reloads, once; the counts match the float64 reference.
#[test]
fn every_scrape_counts_every_ended_step_once() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, meta, w) = write_good(dir.path(), Activation::Relu);
    let rt = Arc::new(Runtime::from_config_file(&cfg).unwrap());
    const THREADS: u64 = 4;
    const STEPS: u64 = 150;
    let input = |t: u64, s: u64| randn_seeded(1000 + t * STEPS + s, (1, D));
    let registry_text = |rt: &Runtime| {
        let mut buf = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &rt.metrics().registry().gather(),
            &mut buf,
        )
        .unwrap();
        String::from_utf8(buf).unwrap()
    };
    let stop = Arc::new(AtomicBool::new(false));
    // The steppers start once the scraper has scraped: on a loaded machine they could otherwise
    // all finish before its thread first ran, and nothing would be scraped while they stepped.
    let started = Arc::new(std::sync::Barrier::new(THREADS as usize + 1));
    // Scrapes and reloads while the threads step: counts only grow.
    let scraper = {
        let (rt, stop, cfg, started) = (rt.clone(), stop.clone(), cfg.clone(), started.clone());
        std::thread::spawn(move || {
            let mut last = 0.0;
            let mut scrapes = 0;
            while !stop.load(Ordering::Relaxed) {
                let text = registry_text(&rt);
                let n =
                    sample(&text, "tiller_feature_active_total", &["feature=\"1\""]).unwrap_or(0.0);
                assert!(n >= last, "a count went down: {last} then {n}");
                last = n;
                scrapes += 1;
                if scrapes == 1 {
                    started.wait();
                }
                if scrapes % 8 == 0 {
                    rt.reload(Some(&cfg)).unwrap();
                }
            }
            scrapes
        })
    };
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (rt, started) = (rt.clone(), started.clone());
            std::thread::spawn(move || {
                started.wait();
                rt.begin_request(t + 1, None, None).unwrap();
                for s in 0..STEPS {
                    let mut x = input(t, s);
                    let token = Token {
                        request: t + 1,
                        phase: Phase::Generated,
                    };
                    let mut step = rt.step(&[token]).unwrap();
                    step.hook("blocks.2", ActivationsMut::F32(x.as_slice_mut().unwrap()))
                        .unwrap();
                    step.finish();
                }
                rt.end_request(t + 1).unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(scraper.join().unwrap() > 0);

    let inputs: Vec<_> = (0..THREADS)
        .flat_map(|t| (0..STEPS).map(move |s| (t, s)))
        .map(|(t, s)| input(t, s))
        .collect();
    let want = reference_counts(&meta, &w, &inputs);
    // The last steps ended well within 10 ms of this scrape: only the scrape's flush counts them.
    for text in [registry_text(&rt), rt.metrics_text(), registry_text(&rt)] {
        assert_feature_counts(&text, &want, THREADS * STEPS);
    }
}

/// The float64 reference of the per-feature series for the one-token steps over `inputs`: per
/// monitored feature (1, 2, 3), the active tokens and the sum of their activations.
fn reference_counts(meta: &Meta, w: &Weights, inputs: &[Array2<f32>]) -> [(u64, f64); 3] {
    let mut want = [(0u64, 0.0f64); 3];
    for x in inputs {
        let acts = reference::encode(meta, w, x.view());
        for (j, f) in [1usize, 2, 3].into_iter().enumerate() {
            if acts[[0, f]] > 0.0 {
                want[j].0 += 1;
                want[j].1 += acts[[0, f]];
            }
        }
    }
    want
}

/// The exposition `text` holds `want`'s active counts, histogram counts and sums (1e-5), and
/// `tokens` tokens at hook `blocks.2`.
fn assert_feature_counts(text: &str, want: &[(u64, f64); 3], tokens: u64) {
    for (j, f) in [1, 2, 3].into_iter().enumerate() {
        let label = format!("feature=\"{f}\"");
        let active = sample(text, "tiller_feature_active_total", &[&label]).unwrap();
        let count = sample(text, "tiller_feature_activation_count", &[&label]).unwrap();
        let sum = sample(text, "tiller_feature_activation_sum", &[&label]).unwrap();
        assert_eq!(
            active as u64, want[j].0,
            "feature {f}: active tokens\n{text}"
        );
        assert_eq!(count as u64, want[j].0, "feature {f}: histogram count");
        assert!(
            (sum - want[j].1).abs() <= 1e-5 * want[j].1,
            "feature {f}: sum {sum} against {}",
            want[j].1
        );
    }
    assert_eq!(
        sample(text, "tiller_tokens_total", &["hook=\"blocks.2\""]),
        Some(tokens as f64)
    );
}

/// A step that ended leaves its per-feature counts in its buffer until the next flush; when the
/// next step takes that buffer and is still open at a scrape, the scrape counts them all the same.
#[test]
fn a_scrape_counts_the_steps_left_in_a_buffer_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, meta, w) = write_good(dir.path(), Activation::Relu);
    let rt = Runtime::from_config_file(&cfg).unwrap();
    rt.begin_request(1, None, None).unwrap();
    let token = Token {
        request: 1,
        phase: Phase::Generated,
    };
    // One thread: every step takes the same buffer. The first flushes at once, the next ones
    // (well within 10 ms) leave their counts in it.
    let inputs: Vec<_> = (0..6).map(|s| randn_seeded(7000 + s, (1, D))).collect();
    for x in &inputs {
        let mut x = x.clone();
        let mut step = rt.step(&[token]).unwrap();
        step.hook("blocks.2", ActivationsMut::F32(x.as_slice_mut().unwrap()))
            .unwrap();
        step.finish();
    }
    let want = reference_counts(&meta, &w, &inputs);
    let open = rt.step(&[token]).unwrap();
    assert_feature_counts(&rt.metrics_text(), &want, inputs.len() as u64);
    drop(open);
    assert_feature_counts(&rt.metrics_text(), &want, inputs.len() as u64);
}
