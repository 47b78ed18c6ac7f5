//! The server the integration tests talk to: `embedding-server serve` on a free local port.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running server, killed when dropped.
pub struct Server {
    pub child: Child,
    /// `host:port`.
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the server on `config` with `workers` workers; returns once it listens.
pub fn start(config: &Path, workers: usize) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_embedding-server"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .args(["--listen", "127.0.0.1:0", "--workers", &workers.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Server { child, addr }
}

/// Writes `config` to `dir/tiller.toml` and starts the server on it with one worker.
pub fn start_in(dir: &Path, config: &str) -> Server {
    let path = dir.join("tiller.toml");
    std::fs::write(&path, config).unwrap();
    start(&path, 1)
}
