//! Hostile `tiller_overrides` against the running server: each is answered in OpenAI's error
//! shape (`{"error": {"message", "type", "param", "code"}}`): 400 with `param` naming the field
//! for what the runtime refuses (counted in `tiller_errors_total{kind="override"}`), 400 for a
//! body that is not JSON the server reads (NaN, 1e400, nesting past serde_json's limit), 413 for a
//! body over the server's limit; the server keeps serving, and an allowed override steers.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use serde_json::{Value, json};
use tiller_runtime::{Activation, Kind, Meta, Weights};

const D: usize = 384;
const F: usize = 64;
const HOOK: &str = "encoder.layer.3";

/// A ReLU dictionary on the layer-3 residual stream whose features fire on some tokens, and a
/// direction file `dirs.npy` whose read succeeds.
fn write_files(dir: &Path) {
    let mut rng = StdRng::seed_from_u64(23);
    let n = Normal::new(0.0f32, 1.0 / (D as f32).sqrt()).unwrap();
    let mut meta = Meta::new(Kind::Sae, Activation::Relu, D, F, D);
    meta.hook_in = HOOK.into();
    meta.hook_out = HOOK.into();
    let w_dec = Array2::from_shape_simple_fn((F, D), || n.sample(&mut rng));
    let weights = Weights::new(
        w_dec.t().to_owned(),
        Array1::from_elem(F, -0.1),
        w_dec,
        Array1::zeros(D),
    );
    let model = tiller_runtime::dictionary::build_model(&meta, &weights).unwrap();
    tiller_runtime::graph::write_model(
        model,
        &dir.join("l3.onnx"),
        tiller_runtime::graph::EXTERNAL_DATA_THRESHOLD,
    )
    .unwrap();
    use ndarray_npy::WriteNpyExt;
    Array2::from_shape_simple_fn((1, D), || n.sample(&mut rng))
        .write_npy(std::fs::File::create(dir.join("dirs.npy")).unwrap())
        .unwrap();
}

const CONFIG: &str = r#"
[[dictionary]]
name = "l3"
path = "l3.onnx"
[[monitor]]
name = "watch"
dictionary = "l3"
features = [0, 1, 2]
threshold = 1e9
window = "token"
action = "flag"
[[profile]]
name = "safe"
[[profile.steer]]
dictionary = "l3"
op = "ablate"
feature = 3
[[vector]]
name = "push"
path = "dirs.npy"
hook = "encoder.layer.3"
[requests]
ops = ["add", "clamp", "ablate", "vector"]
vectors = ["push"]
"#;

fn post(addr: &str, body: &str) -> (u16, Value) {
    let (status, text) =
        embedding_server::client::http(addr, "POST", "/v1/embeddings", &[], body).unwrap();
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: the answer is not JSON ({e}): {text}"));
    (status, v)
}

/// Posts a body the server answers before reading it whole: the body is written from another
/// thread, whose write fails once the server has answered and closed, while this one reads.
fn post_unread(addr: &str, body: &str) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .unwrap();
    let mut w = s.try_clone().unwrap();
    let request = format!(
        "POST /v1/embeddings HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let writer = std::thread::spawn(move || w.write_all(request.as_bytes()).is_ok());
    // Read until the end or the reset that follows the answer, keeping what came.
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let _ = writer.join();
    let text = String::from_utf8(got).unwrap();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let v = serde_json::from_str(rest).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, v)
}

fn metric(addr: &str, name_and_labels: &str) -> f64 {
    let (status, text) = embedding_server::client::http(addr, "GET", "/metrics", &[], "").unwrap();
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Checks OpenAI's error shape: exactly `message`, `type`, `param`, `code`; returns the error.
fn openai_error(status: u16, v: &Value, want_status: u16) -> &serde_json::Map<String, Value> {
    assert_eq!(status, want_status, "{v}");
    let e = v["error"].as_object().unwrap_or_else(|| panic!("{v}"));
    let mut keys: Vec<&str> = e.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{v}");
    assert_eq!(e["type"], "invalid_request_error", "{v}");
    assert!(e["message"].is_string(), "{v}");
    e
}

#[test]
fn hostile_overrides_get_openai_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path());
    let server = common::start_in(dir.path(), CONFIG);
    let addr = server.addr.as_str();
    let body = |overrides: &str| {
        format!(
            r#"{{"input": ["All rights reserved.", "def f(x): return x"], "tiller_profile": "safe", "tiller_overrides": {overrides}}}"#
        )
    };
    let rule = |r: &str| format!(r#"{{"steer": [{r}]}}"#);
    let abs = dir.path().join("dirs.npy");
    let parent = format!(
        "../{}/dirs.npy",
        dir.path().file_name().unwrap().to_str().unwrap()
    );
    let vector = |path: &str| {
        rule(&format!(
            r#"{{"op": "vector", "vector": {}, "strength": 1.0}}"#,
            serde_json::to_string(path).unwrap()
        ))
    };
    let many =
        rule(&vec![r#"{"op": "ablate", "dictionary": "l3", "feature": 0}"#; 10_000].join(","));
    let long_name = rule(&format!(
        r#"{{"op": "ablate", "dictionary": "l3", "feature": 0, "name": "{}"}}"#,
        "n".repeat(3 << 20)
    ));
    // What the runtime refuses: 400, `param` the field, the message naming it and the bound.
    let refused: Vec<(String, &str, &str)> = vec![
        (
            r#"{"replace": true}"#.into(),
            "tiller_overrides.replace",
            "requests.allow_replace = false",
        ),
        (
            vector(abs.to_str().unwrap()),
            "tiller_overrides.steer[0].vector",
            "never a file",
        ),
        (
            vector(&parent),
            "tiller_overrides.steer[0].vector",
            "never a file",
        ),
        (
            vector("/etc/passwd"),
            "tiller_overrides.steer[0].vector",
            "never a file",
        ),
        (many, "tiller_overrides", "(requests.max_bytes)"),
        (long_name, "tiller_overrides", "(requests.max_bytes)"),
        (
            rule(r#"{"op": "add", "dictionary": "l3", "feature": 0, "strength": 1e30}"#),
            "tiller_overrides.steer[0].strength",
            "1e30 exceeds the operator's bound 100 (requests.max_abs_strength)",
        ),
        (
            rule(r#"{"op": "explode", "dictionary": "l3", "feature": 0}"#),
            "tiller_overrides.steer[0].op",
            "unknown variant `explode`",
        ),
        (
            rule(r#"{"op": "scale", "dictionary": "l3", "feature": 0, "factor": 2}"#),
            "tiller_overrides.steer[0].op",
            "(requests.ops: add, clamp, ablate, vector)",
        ),
        (
            rule(r#"{"op": "ablate", "dictionary": "l3", "feature": 99999}"#),
            "tiller_overrides.steer[0].feature",
            "not one the operator lets requests steer (requests.dictionary: 0, 1, 2)",
        ),
        (
            rule(r#"{"op": "ablate", "dictionary": "l3", "feature": 3}"#),
            "tiller_overrides.steer[0].feature",
            "feature 3 of `l3` is not one",
        ),
        (
            r#"{"stear": []}"#.into(),
            "tiller_overrides.stear",
            "unknown field `stear`",
        ),
    ];
    let before = metric(addr, r#"tiller_errors_total{kind="override"}"#);
    for (overrides, param, part) in &refused {
        let (status, v) = post(addr, &body(overrides));
        let e = openai_error(status, &v, 400);
        assert_eq!(e["param"], *param, "{v}");
        assert_eq!(e["code"], "tiller_overrides_refused", "{v}");
        let message = e["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("{param}: ")) && message.contains(part),
            "expected `{param}: ...{part}...` in {message}"
        );
    }
    assert_eq!(
        metric(addr, r#"tiller_errors_total{kind="override"}"#),
        before + refused.len() as f64,
        "each refusal counted once"
    );

    // A body the server cannot read as JSON: 400 before the runtime sees anything.
    let depth = 100_000;
    let nested = "[".repeat(depth) + &"]".repeat(depth);
    for (text, part) in [
        (
            body(&rule(
                r#"{"op": "add", "dictionary": "l3", "feature": 0, "strength": NaN}"#,
            )),
            "expected value",
        ),
        (
            body(&rule(
                r#"{"op": "add", "dictionary": "l3", "feature": 0, "strength": 1e400}"#,
            )),
            "number out of range",
        ),
        (body(&nested), "recursion limit exceeded"),
    ] {
        let (status, v) = post(addr, &text);
        let e = openai_error(status, &v, 400);
        let message = e["message"].as_str().unwrap();
        assert!(message.contains(part), "expected `{part}` in {message}");
        assert!(e["param"].is_null() && e["code"].is_null(), "{v}");
    }
    // A 10 MB body: over the server's limit, answered before it is read whole.
    let huge = body(&format!(
        r#"{{"steer": [], "pad": "{}"}}"#,
        "x".repeat(10 << 20)
    ));
    let (status, v) = post_unread(addr, &huge);
    let e = openai_error(status, &v, 413);
    assert!(
        e["message"].as_str().unwrap().contains("length limit"),
        "{v}"
    );

    // The server still serves: an allowed override steers (the profile's rule and the request's
    // own both count), and a plain request is untouched by it.
    let (status, v) = post(
        addr,
        &body(&rule(
            r#"{"name": "mine", "op": "vector", "vector": "push", "strength": 2.0}"#,
        )),
    );
    assert_eq!(status, 200, "{v}");
    for d in v["data"].as_array().unwrap() {
        assert!(d["tiller"]["steering"]["mine"].as_u64().unwrap() > 0, "{d}");
        assert_eq!(d["embedding"].as_array().unwrap().len(), D);
    }
    let (status, v) = post(addr, r#"{"input": "All rights reserved."}"#);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["data"][0]["tiller"]["steering"], json!({}));
}
