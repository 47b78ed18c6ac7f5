//! The config watcher reloads on change (and survives a broken file); the built-in listener serves
//! `/metrics` and `/healthz` on loopback.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::{Array1, Array2};
use tiller_runtime::{Activation, Kind, Meta, Runtime};
use tiller_test_support::write_dictionary;

fn setup(dir: &std::path::Path) {
    let mut meta = Meta::new(Kind::Sae, Activation::Relu, 8, 16, 8);
    meta.hook_in = "h".into();
    let w = tiller_runtime::Weights::new(
        Array2::from_shape_fn((8, 16), |(i, j)| ((i * 3 + j) % 5) as f32 / 5.0 - 0.4),
        Array1::zeros(16),
        Array2::from_shape_fn((16, 8), |(i, j)| ((i + j * 7) % 3) as f32 / 3.0 - 0.3),
        Array1::zeros(8),
    );
    write_dictionary(&dir.join("d.onnx"), &meta, &w);
}

fn config(profile: &str) -> String {
    format!(
        "[runtime]\nwatch = true\nwatch_interval_ms = 20\nmetrics_listen = \"127.0.0.1:0\"\n\
         [[dictionary]]\nname = \"res\"\npath = \"d.onnx\"\n[[profile]]\nname = \"{profile}\"\n"
    )
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

fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn watcher_and_listener() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, config("first")).unwrap();
    let rt = Arc::new(Runtime::from_config_file(&cfg).unwrap());
    let services = rt.start_services().unwrap();
    assert_eq!(services.len(), 2);
    let addr = services.iter().find_map(|s| s.local_addr()).unwrap();

    let metrics = get(addr, "/metrics");
    assert!(
        metrics.starts_with("HTTP/1.1 200 OK") && metrics.contains("tiller_build_info"),
        "{metrics}"
    );
    assert!(get(addr, "/healthz").ends_with("ok\n"));
    assert!(get(addr, "/nope").starts_with("HTTP/1.1 404"));

    // A change is picked up.
    std::thread::sleep(Duration::from_millis(50));
    std::fs::write(&cfg, config("second")).unwrap();
    assert!(
        wait_for(|| rt.begin_request(1, Some("second"), None).is_ok()),
        "the new profile never appeared"
    );
    // A broken file is rejected and the running state keeps serving.
    std::thread::sleep(Duration::from_millis(50));
    std::fs::write(&cfg, "[[dictionary]\n").unwrap();
    assert!(wait_for(|| rt
        .metrics_text()
        .contains("tiller_config_reloads_total{result=\"rejected\"} 1")));
    assert!(rt.begin_request(2, Some("second"), None).is_ok());
    drop(services);
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err()
            || get_fails(addr)
    );
}

/// After the listener stops, a connection either fails or gets no answer.
fn get_fails(addr: std::net::SocketAddr) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return true;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
    let _ = write!(s, "GET /metrics HTTP/1.1\r\n\r\n");
    let mut out = String::new();
    s.read_to_string(&mut out).is_err() || out.is_empty()
}
