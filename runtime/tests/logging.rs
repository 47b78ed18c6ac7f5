//! What the runtime logs, read through a capturing subscriber as a host would install one: reloads
//! accepted and rejected (with the file, line and key at fault), the config watcher's failed
//! reloads, a trapping policy, and refused requests, whose log lines carry nothing the request
//! held.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ndarray::{Array1, Array2};
use tiller_runtime::{Activation, ActivationsMut, Kind, Meta, Phase, Runtime, Token};
use tiller_test_support::write_dictionary;

const D: usize = 8;
const F: usize = 16;

/// Every line the runtime logged in this process (the watcher logs from its own thread, so the
/// subscriber is the global one, shared by the tests; each test reads only the lines that name
/// its own files or policy).
fn log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::DEBUG)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buf
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The logged lines that contain every one of `needles`.
fn lines_with(needles: &[&str]) -> Vec<String> {
    let text = String::from_utf8(log().lock().unwrap().clone()).unwrap();
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

fn wait_for(mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn write_dict(dir: &Path) {
    let mut meta = Meta::new(Kind::Sae, Activation::Relu, D, F, D);
    meta.hook_in = "h".into();
    meta.hook_out = "h".into();
    let w = tiller_runtime::Weights::new(
        Array2::from_shape_fn((D, F), |(i, j)| ((i * 3 + j) % 5) as f32 / 5.0 - 0.4),
        Array1::from_elem(F, 0.05),
        Array2::from_shape_fn((F, D), |(i, j)| ((i + j * 7) % 3) as f32 / 3.0 - 0.3),
        Array1::zeros(D),
    );
    write_dictionary(&dir.join("d.onnx"), &meta, &w);
}

const GOOD: &str = "[[dictionary]]\nname = \"res\"\npath = \"d.onnx\"\n[[profile]]\nname = \"p\"\n";

/// A monitor on a dictionary that does not exist: `dictionary` on line 7.
const BAD_MONITOR: &str = "[[dictionary]]\nname = \"res\"\npath = \"d.onnx\"\n\
     [[monitor]]\nname = \"m\"\nfeatures = [1]\ndictionary = \"nope\"\nthreshold = 1.0\n";

#[test]
fn reloads_log_accepted_and_rejected_with_file_line_and_key() {
    log();
    let dir = tempfile::tempdir().unwrap();
    write_dict(dir.path());
    let cfg = dir.path().join("reload.toml");
    let file = cfg.display().to_string();
    std::fs::write(&cfg, GOOD).unwrap();
    let rt = Runtime::from_config_file(&cfg).unwrap();

    std::fs::write(&cfg, BAD_MONITOR).unwrap();
    assert!(rt.reload(None).is_err());
    let rejected = lines_with(&["config reload rejected", &file]);
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    let l = &rejected[0];
    assert!(l.contains("ERROR"), "{l}");
    assert!(l.contains(&format!("file=\"{file}\"")), "{l}");
    assert!(l.contains("line=7"), "{l}");
    assert!(l.contains("key=\"dictionary\""), "{l}");
    assert!(lines_with(&["config reload accepted", &file]).is_empty());

    // A TOML syntax error carries its line and key too.
    std::fs::write(&cfg, "[[dictionary]]\nname = \"res\"\npath = d.onnx\n").unwrap();
    assert!(rt.reload(None).is_err());
    let rejected = lines_with(&["config reload rejected", &file, "line=3"]);
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(rejected[0].contains("key=\"path\""), "{}", rejected[0]);

    // A missing file names the file.
    let gone = dir.path().join("gone.toml");
    assert!(rt.reload(Some(&gone)).is_err());
    let gone = gone.display().to_string();
    assert_eq!(
        lines_with(&["config reload rejected", &format!("file=\"{gone}\"")]).len(),
        1
    );

    std::fs::write(&cfg, GOOD).unwrap();
    rt.reload(None).unwrap();
    rt.reload(None).unwrap();
    let accepted = lines_with(&["config reload accepted", &file]);
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    assert!(accepted[0].contains(" INFO "), "{}", accepted[0]);
    // Each accepted reload runs a newer generation than the one built first (0).
    let generation = |l: &str| -> u64 {
        l.split_once("generation=")
            .unwrap()
            .1
            .trim()
            .parse()
            .unwrap()
    };
    let (first, second) = (generation(&accepted[0]), generation(&accepted[1]));
    assert!(0 < first && first < second, "{accepted:?}");
}

#[test]
fn the_watchers_failed_reload_is_logged() {
    log();
    let dir = tempfile::tempdir().unwrap();
    write_dict(dir.path());
    let cfg = dir.path().join("watched.toml");
    let file = cfg.display().to_string();
    std::fs::write(&cfg, GOOD).unwrap();
    let rt = Arc::new(Runtime::from_config_file(&cfg).unwrap());
    let watcher = rt.watch_config(Duration::from_millis(20)).unwrap();
    assert_eq!(lines_with(&["watching the config file", &file]).len(), 1);
    std::thread::sleep(Duration::from_millis(50));
    std::fs::write(&cfg, BAD_MONITOR).unwrap();
    assert!(
        wait_for(|| !lines_with(&["config reload rejected", &file]).is_empty()),
        "the watcher's failed reload was not logged"
    );
    let l = &lines_with(&["config reload rejected", &file])[0];
    assert!(
        l.contains("line=7") && l.contains("key=\"dictionary\""),
        "{l}"
    );
    drop(watcher);
}

/// A policy whose every `on_features` call traps.
const TRAPPING: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "tiller_policy_abi_v1"))
  (func (export "tiller_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tiller_on_request_begin") (param i64 i32 i32) (result i64) (i64.const 0))
  (func (export "tiller_on_request_end") (param i64) (result i64) (i64.const 0))
  (func (export "tiller_on_features") (param i64 i64 i32 i32 i32) (result i64) unreachable))"#;

#[test]
fn a_trapping_policy_is_logged_and_its_disabling_too() {
    log();
    let dir = tempfile::tempdir().unwrap();
    write_dict(dir.path());
    std::fs::write(dir.path().join("trap.wat"), TRAPPING).unwrap();
    let cfg = dir.path().join("policy.toml");
    std::fs::write(
        &cfg,
        format!(
            "{GOOD}[[policy]]\nname = \"trapper-7\"\nmodule = \"trap.wat\"\ndictionary = \"res\"\n\
             features = [1, 2, 3]\nmax_failures = 3\n"
        ),
    )
    .unwrap();
    let rt = Runtime::from_config_file(&cfg).unwrap();
    rt.begin_request(1, None, None).unwrap();
    let tokens = [Token {
        request: 1,
        phase: Phase::Prompt,
    }; 4];
    let mut x = vec![0.5f32; 4 * D];
    let mut step = rt.step(&tokens).unwrap();
    step.hook("h", ActivationsMut::F32(&mut x)).unwrap();
    step.finish();
    let failed = lines_with(&["policy call failed", "policy=\"trapper-7\""]);
    assert_eq!(
        failed.len(),
        1,
        "the first failure, then throttled: {failed:?}"
    );
    assert!(
        failed[0].contains(" WARN ") && failed[0].contains("reason=\"trap\""),
        "{}",
        failed[0]
    );
    let disabled = lines_with(&["policy disabled", "policy=\"trapper-7\""]);
    assert_eq!(disabled.len(), 1, "{disabled:?}");
    assert!(disabled[0].contains("failures=3"), "{}", disabled[0]);
}

#[test]
fn refused_requests_log_a_warning_without_their_content() {
    log();
    const SECRET: &str = "sk_live_Zq81SecretToken";
    let dir = tempfile::tempdir().unwrap();
    write_dict(dir.path());
    let cfg = dir.path().join("refuse.toml");
    std::fs::write(&cfg, GOOD).unwrap();
    let rt = Runtime::from_config_file(&cfg).unwrap();
    let before = lines_with(&["request refused"]).len();

    let hostile = [
        // An unknown field named by the secret: the parser's message quotes it.
        (
            None,
            format!(r#"{{"steer":[{{"op":"add","dictionary":"res","feature":3,"{SECRET}":1}}]}}"#),
        ),
        // A rule named by the secret, on a feature the dictionary lacks.
        (
            None,
            format!(
                r#"{{"steer":[{{"name":"{SECRET}","op":"add","dictionary":"res","feature":9999,"strength":1.0}}]}}"#
            ),
        ),
        // A path holding the secret.
        (
            None,
            format!(
                r#"{{"steer":[{{"op":"vector","vector":"/tmp/{SECRET}/v.npy","hook":"h","strength":1.0}}]}}"#
            ),
        ),
        // An unknown profile named by the secret.
        (Some(SECRET), String::new()),
    ];
    for (i, (profile, overrides)) in hostile.iter().enumerate() {
        // The error the host gets may say what was wrong in the client's own words ...
        assert!(
            rt.begin_request(100 + i as u64, *profile, Some(overrides))
                .is_err()
        );
    }
    let refused = lines_with(&["request refused"]);
    assert_eq!(refused.len() - before, hostile.len(), "{refused:?}");
    for l in &refused[before..] {
        assert!(l.contains(" WARN ") && l.contains("kind="), "{l}");
    }
    // The three override refusals point into the one rule the overrides held.
    for l in &refused[before..before + 3] {
        assert!(l.contains("field=\"steer[0]"), "{l}");
    }
    // ... but the log holds none of it.
    let text = String::from_utf8(log().lock().unwrap().clone()).unwrap();
    assert!(
        !text.contains(SECRET),
        "the log leaked request content:\n{text}"
    );
    assert!(
        !text.contains("Zq81"),
        "the log leaked part of the secret:\n{text}"
    );
}
