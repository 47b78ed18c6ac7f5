//! The server end to end on a loopback port: concurrent requests with different profiles, the
//! scraped metrics against the sum of what the answers reported, steering visible in the
//! embeddings, bad requests, SIGHUP reloads (good and broken files) and a graceful SIGTERM.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use serde_json::{Value, json};
use tiller_minilm::{MiniLm, Options, provision};
use tiller_runtime::{Activation, Kind, Meta, Weights};

const D: usize = 384;
const F: usize = 256;

/// A ReLU dictionary on the layer-3 residual stream whose features fire on some tokens.
fn write_dictionary(path: &Path) {
    let mut rng = StdRng::seed_from_u64(11);
    let n = Normal::new(0.0f32, 1.0 / (D as f32).sqrt()).unwrap();
    let mut meta = Meta::new(Kind::Sae, Activation::Relu, D, F, D);
    meta.hook_in = "encoder.layer.3".into();
    meta.hook_out = "encoder.layer.3".into();
    let w_dec = Array2::from_shape_simple_fn((F, D), || n.sample(&mut rng));
    let weights = Weights::new(
        w_dec.t().to_owned(),
        Array1::from_elem(F, -0.1),
        w_dec,
        Array1::zeros(D),
    );
    let model = tiller_runtime::dictionary::build_model(&meta, &weights).unwrap();
    tiller_runtime::graph::write_model(model, path, tiller_runtime::graph::EXTERNAL_DATA_THRESHOLD)
        .unwrap();
}

const CONFIG: &str = r#"
[[dictionary]]
name = "l3"
path = "l3.onnx"

[[monitor]]
name = "f0-any"
dictionary = "l3"
features = [0, 1, 2, 3]
threshold = 0.05
window = "token"
action = "flag"

[[monitor]]
name = "f9-count"
dictionary = "l3"
features = [9]
threshold = 0.02
window = "request"
aggregate = "count"
count = 2
action = "flag"

[[profile]]
name = "ablate"
[[profile.steer]]
name = "ablate-0"
dictionary = "l3"
op = "ablate"
feature = 0
[[profile.steer]]
name = "ablate-1"
dictionary = "l3"
op = "ablate"
feature = 1

[[profile]]
name = "boost"
[[profile.steer]]
name = "add-5"
dictionary = "l3"
op = "add"
feature = 5
strength = 3.0
"#;

const TEXTS: [&str; 6] = [
    "The licensee shall not sublicense the software without written consent.",
    "def parse(line): return [int(x) for x in line.split(',')]",
    "The quick brown fox jumps over the lazy dog.",
    "Prices rose 3.5 percent in 2023, the highest in 40 years.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy.",
    "She walked along the beach at sunset, listening to the waves.",
];

/// One HTTP/1.1 exchange: (status, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    embedding_server::client::http(addr, method, path, headers, body).unwrap()
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn serves_embeddings_with_monitoring_and_steering() {
    let dir = tempfile::tempdir().unwrap();
    write_dictionary(&dir.path().join("l3.onnx"));
    let config = dir.path().join("tiller.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let server = common::start(&config, 2);
    let addr = server.addr.clone();

    let (status, body) = http(&addr, "GET", "/healthz", &[], "");
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["hook"], "encoder.layer.3");

    // 24 concurrent requests: profiles none / ablate (body) / boost (header), 1-3 inputs each.
    let plans: Vec<(Option<&str>, bool, Vec<&str>)> = (0..24)
        .map(|i| {
            let profile = [None, Some("ablate"), Some("boost")][i % 3];
            let inputs: Vec<&str> = (0..1 + i % 3)
                .map(|j| TEXTS[(i + j) % TEXTS.len()])
                .collect();
            (profile, i % 2 == 0, inputs)
        })
        .collect();
    let answers: Vec<(Option<&str>, Vec<&str>, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = plans
            .iter()
            .map(|(profile, in_body, inputs)| {
                let addr = addr.clone();
                s.spawn(move || {
                    let mut body = json!({"input": inputs, "model": "all-MiniLM-L6-v2"});
                    let mut headers = vec![];
                    match (profile, in_body) {
                        (Some(p), true) => body["tiller_profile"] = json!(p),
                        (Some(p), false) => headers.push(("X-Tiller-Profile", *p)),
                        _ => {}
                    }
                    let (status, resp) =
                        http(&addr, "POST", "/v1/embeddings", &headers, &body.to_string());
                    assert_eq!(status, 200, "{resp}");
                    (
                        *profile,
                        inputs.clone(),
                        serde_json::from_str::<Value>(&resp).unwrap(),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    // What the answers say, summed.
    let mut tokens = 0u64;
    let mut inputs_by_profile: BTreeMap<String, u64> = BTreeMap::new();
    let mut events: BTreeMap<String, u64> = BTreeMap::new();
    let mut steering: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_text: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for (profile, inputs, v) in &answers {
        assert_eq!(v["object"], "list");
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), inputs.len());
        let mut answer_tokens = 0;
        for (i, d) in data.iter().enumerate() {
            assert_eq!(d["index"], i);
            let e = floats(&d["embedding"]);
            assert_eq!(e.len(), D);
            let norm = cosine(&e, &e).sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "embedding norm {norm}");
            let t = &d["tiller"];
            assert_eq!(t["profile"].as_str(), *profile);
            answer_tokens += t["tokens"].as_u64().unwrap();
            for ev in t["events"].as_array().unwrap() {
                *events
                    .entry(ev["monitor"].as_str().unwrap().to_string())
                    .or_default() += 1;
            }
            for (rule, n) in t["steering"].as_object().unwrap() {
                *steering.entry(rule.clone()).or_default() += n.as_u64().unwrap();
            }
            let key = (profile.unwrap_or("none").to_string(), inputs[i].to_string());
            if let Some(prev) = by_text.insert(key, e.clone()) {
                assert!(
                    cosine(&prev, &e) > 1.0 - 1e-6,
                    "same text, same profile, same embedding"
                );
            }
        }
        assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap(), answer_tokens);
        tokens += answer_tokens;
        *inputs_by_profile
            .entry(profile.unwrap_or("none").to_string())
            .or_default() += inputs.len() as u64;
    }
    assert!(
        events.values().sum::<u64>() > 0,
        "the monitors never fired: {events:?}"
    );
    assert!(
        steering.get("ablate-0").copied().unwrap_or(0) > 0,
        "{steering:?}"
    );
    assert!(
        steering.get("add-5").copied().unwrap_or(0) > 0,
        "{steering:?}"
    );

    // The metrics agree with the answers.
    let (status, m) = http(&addr, "GET", "/metrics", &[], "");
    assert_eq!(status, 200);
    assert_eq!(
        metric(&m, "tiller_tokens_total{hook=\"encoder.layer.3\"}") as u64,
        tokens,
        "tokens"
    );
    for (p, n) in &inputs_by_profile {
        assert_eq!(
            metric(
                &m,
                &format!("embedding_server_inputs_total{{profile=\"{p}\"}}")
            ) as u64,
            *n,
            "inputs of profile {p}"
        );
    }
    for mon in ["f0-any", "f9-count"] {
        assert_eq!(
            metric(
                &m,
                &format!("tiller_monitor_events_total{{action=\"flag\",monitor=\"{mon}\"}}")
            ) as u64,
            events.get(mon).copied().unwrap_or(0),
            "events of {mon}:\n{m}"
        );
    }
    for (rule, n) in &steering {
        assert_eq!(
            metric(
                &m,
                &format!("tiller_steering_tokens_total{{rule=\"{rule}\"}}")
            ) as u64,
            *n,
            "steering tokens of {rule}"
        );
    }
    assert_eq!(
        metric(&m, "embedding_server_http_requests_total") as u64,
        24
    );

    // No profile: monitoring only, so the embedding is exactly the model's own; profiles move it.
    let model = MiniLm::load(&provision::model_dir().unwrap(), Options::default()).unwrap();
    let (plain, _) = model.embed(&TEXTS, None).unwrap();
    for (i, text) in TEXTS.iter().enumerate() {
        let p: Vec<f64> = plain.row(i).iter().map(|&x| f64::from(x)).collect();
        if let Some(e) = by_text.get(&("none".to_string(), text.to_string())) {
            assert!(
                cosine(&p, e) > 1.0 - 1e-6,
                "monitoring alone changed text {i}"
            );
        }
        if let Some(e) = by_text.get(&("boost".to_string(), text.to_string())) {
            assert!(cosine(&p, e) < 1.0 - 1e-4, "boost did not move text {i}");
        }
    }

    // Bad requests are 400s with a message, counted, and the server keeps serving.
    let bad = [
        json!({"input": "x", "tiller_profile": "nope"}).to_string(),
        "{not json".to_string(),
        json!({"input": []}).to_string(),
        json!({"input": "x", "encoding_format": "int8"}).to_string(),
        json!({"input": "x", "model": "gpt-4"}).to_string(),
    ];
    for b in &bad {
        let (status, body) = http(&addr, "POST", "/v1/embeddings", &[], b);
        assert_eq!(status, 400, "{b} -> {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    let (_, m) = http(&addr, "GET", "/metrics", &[], "");
    assert_eq!(
        metric(&m, "embedding_server_http_errors_total") as u64,
        bad.len() as u64
    );

    // SIGHUP with a broken file keeps the running config; with a good one swaps it in.
    let pid = server.child.id().to_string();
    let hup = || {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        )
    };
    std::fs::write(&config, "[[dictionary]]\nname = 3\n").unwrap();
    hup();
    let wait_for = |name: &str, want: f64| {
        let t0 = Instant::now();
        loop {
            let (_, m) = http(&addr, "GET", "/metrics", &[], "");
            if metric(&m, name) >= want {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "{name} never reached {want}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for("tiller_config_reloads_total{result=\"rejected\"}", 1.0);
    let body = json!({"input": "still here", "tiller_profile": "ablate"}).to_string();
    assert_eq!(http(&addr, "POST", "/v1/embeddings", &[], &body).0, 200);
    std::fs::write(
        &config,
        format!("{CONFIG}\n[[profile]]\nname = \"added\"\n[[profile.steer]]\nname = \"add-7\"\ndictionary = \"l3\"\nop = \"add\"\nfeature = 7\nstrength = 1.0\n"),
    )
    .unwrap();
    hup();
    wait_for("tiller_config_reloads_total{result=\"accepted\"}", 1.0);
    let body = json!({"input": "new profile", "tiller_profile": "added"}).to_string();
    let (status, resp) = http(&addr, "POST", "/v1/embeddings", &[], &body);
    assert_eq!(status, 200, "{resp}");

    // SIGTERM: a clean exit.
    let mut server = server;
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the server did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}
