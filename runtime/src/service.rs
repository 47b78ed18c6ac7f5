//! Background services a host may start: a config file watcher that reloads on change, and a
//! built-in `/metrics` listener for hosts that have no HTTP server of their own.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crate::{Error, Result, Runtime};

/// A background thread; stopped and joined when dropped.
#[derive(Debug)]
pub struct Service {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    addr: Option<SocketAddr>,
}

impl Service {
    /// The address a metrics listener is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(addr) = self.addr {
            // Wake the accept loop.
            let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(200));
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Runtime {
    /// Watches the config file the runtime was built from and reloads it when it changes (polled
    /// every `interval`). A broken file is reported through `tiller_config_reloads_total` and an
    /// error event naming the file, line and key, and the running state keeps serving. The watcher stops when the returned [`Service`] or the runtime
    /// is dropped.
    pub fn watch_config(self: &Arc<Self>, interval: Duration) -> Result<Service> {
        let path = self.config().source.ok_or_else(|| {
            Error::invalid("watch", "the runtime was not built from a config file")
        })?;
        let file = path.display().to_string();
        let weak: Weak<Runtime> = Arc::downgrade(self);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tiller-config-watch".into())
            .spawn(move || {
                let mut last = modified(&path);
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(interval);
                    let now = modified(&path);
                    if now != last {
                        last = now;
                        let Some(rt) = weak.upgrade() else { break };
                        // `reload` counts and logs either outcome; nobody here can act on it.
                        let _ = rt.reload(Some(&path));
                    }
                }
            })
            .map_err(|e| {
                Error::invalid("watch", format!("cannot start the watcher thread: {e}"))
            })?;
        tracing::info!(
            file,
            interval_ms = interval.as_millis() as u64,
            "watching the config file"
        );
        Ok(Service {
            stop,
            thread: Some(thread),
            addr: None,
        })
    }

    /// Serves `GET /metrics` (the text exposition) and `GET /healthz` on `addr` (e.g.
    /// `127.0.0.1:9464`; port 0 picks a free one). Stops when the returned [`Service`] is dropped.
    pub fn serve_metrics(self: &Arc<Self>, addr: &str) -> Result<Service> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::invalid("metrics_listen", format!("cannot bind {addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::invalid("metrics_listen", e.to_string()))?;
        let weak: Weak<Runtime> = Arc::downgrade(self);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tiller-metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let Some(rt) = weak.upgrade() else { break };
                    if let Err(e) = respond(&rt, conn) {
                        tracing::debug!(error = %e, "a metrics scrape failed");
                    }
                }
            })
            .map_err(|e| {
                Error::invalid(
                    "metrics_listen",
                    format!("cannot start the listener thread: {e}"),
                )
            })?;
        tracing::info!(addr = %local, "serving /metrics and /healthz");
        Ok(Service {
            stop,
            thread: Some(thread),
            addr: Some(local),
        })
    }

    /// Starts what the config's `[runtime]` asks for: the config watcher (`watch = true`) and the
    /// metrics listener (`metrics_listen`).
    pub fn start_services(self: &Arc<Self>) -> Result<Vec<Service>> {
        let cfg = self.config();
        let mut out = Vec::new();
        if cfg.runtime.watch {
            out.push(
                self.watch_config(Duration::from_millis(cfg.runtime.watch_interval_ms.max(10)))?,
            );
        }
        if let Some(addr) = &cfg.runtime.metrics_listen {
            out.push(self.serve_metrics(addr)?);
        }
        Ok(out)
    }
}

fn respond(rt: &Runtime, mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(&conn).take(8192).read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, ctype, body) = match (line.split_whitespace().next(), path) {
        (Some("GET"), "/metrics") => ("200 OK", "text/plain; version=0.0.4", rt.metrics_text()),
        (Some("GET"), "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}
