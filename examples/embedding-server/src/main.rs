//! `embedding-server`: all-MiniLM-L6-v2 behind an OpenAI-compatible `POST /v1/embeddings`, with
//! Tiller monitoring and steering the residual stream after `--layer`.
//!
//! ```text
//! embedding-server serve --config tiller.toml --listen 127.0.0.1:8080 [--layer 3] [--workers 2]
//! embedding-server demo [--dir target/demo] [--serve]
//! ```
//! SIGHUP reloads the config (a broken file is refused and the running config kept); SIGINT or
//! SIGTERM stop accepting connections, finish the requests in flight and exit.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use embedding_server::pipeline::{self, CODE_PAIRS, LEGAL_PAIRS, Settings};
use embedding_server::{AppState, router};
use tiller_minilm::{MiniLm, Options, provision};
use tiller_runtime::Runtime;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    version,
    about = "OpenAI-compatible embeddings with Tiller in the residual stream"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve embeddings with the given Tiller config.
    Serve {
        /// The Tiller config (dictionaries, monitors, profiles).
        #[arg(long)]
        config: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// The hook: the residual stream after this layer; must match the dictionaries' hook.
        #[arg(long, default_value_t = 3)]
        layer: usize,
        /// Concurrent model runs (ONNX Runtime session pairs).
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// ONNX Runtime threads per model run.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// The whole pipeline: collect activations, train an SAE, build the dashboard, choose concept
    /// features, write the config, measure steering, then start the server and query it.
    Demo {
        /// Where everything is built and cached.
        #[arg(long, default_value = "target/demo")]
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Keep serving after the demo queries (until Ctrl-C).
        #[arg(long)]
        serve: bool,
        /// Tokens of activations to collect.
        #[arg(long, default_value_t = Settings::default().rows)]
        rows: usize,
        /// Training tokens.
        #[arg(long, default_value_t = Settings::default().train_tokens)]
        train_tokens: u64,
    },
}

fn main() -> Result<()> {
    // Logs on stderr, filtered by RUST_LOG (default info).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Cmd::Serve {
            config,
            listen,
            layer,
            workers,
            threads,
        } => {
            let runtime = Arc::new(
                Runtime::from_config_file(&config)
                    .with_context(|| format!("loading {}", config.display()))?,
            );
            let model = Arc::new(MiniLm::load(
                &provision::model_dir()?,
                Options {
                    hook_layer: layer,
                    intra_threads: threads,
                    pool_size: workers,
                    ..Options::default()
                },
            )?);
            let state = Arc::new(AppState::new(model, runtime));
            check_hooks(&state, &config)?;
            tokio_runtime(workers)?.block_on(async {
                let listener = bind(&listen).await?;
                println!("listening on http://{}", listener.local_addr()?);
                serve(listener, state, config, shutdown_signal()?).await
            })
        }
        Cmd::Demo {
            dir,
            listen,
            serve: keep,
            rows,
            train_tokens,
        } => demo(&dir, &listen, keep, rows, train_tokens),
    }
}

fn check_hooks(state: &AppState, config: &Path) -> Result<()> {
    let hook = state.model.hook_name();
    for (h, w) in state.runtime.hooks() {
        anyhow::ensure!(
            h == hook,
            "{}: a dictionary reads hook {h:?}, but this server hooks {hook:?}; pass --layer or fix the dictionary",
            config.display()
        );
        anyhow::ensure!(
            w == state.model.d(),
            "{}: hook {h:?} has width {w}, the model {}",
            config.display(),
            state.model.d()
        );
    }
    Ok(())
}

fn tokio_runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(workers.max(1) * 2)
        .enable_all()
        .build()?)
}

async fn bind(listen: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))
}

fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static> {
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        eprintln!("shutting down: finishing the requests in flight");
    })
}

/// Serves until `shutdown` completes; SIGHUP reloads `config`.
async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    config: PathBuf,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let mut hup = signal(SignalKind::hangup())?;
    let rt = state.runtime.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match rt.reload(Some(&config)) {
                Ok(()) => eprintln!("SIGHUP: reloaded {}", config.display()),
                Err(e) => eprintln!(
                    "SIGHUP: kept the running config; {} is refused: {e}",
                    config.display()
                ),
            }
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    eprintln!("stopped");
    Ok(())
}

/// A blocking HTTP/1.1 exchange with the demo's own server: (status, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    embedding_server::client::http(addr, method, path, &[], body)
}

fn demo(dir: &Path, listen: &str, keep: bool, rows: usize, train_tokens: u64) -> Result<()> {
    let settings = Settings {
        rows,
        train_tokens,
        ..Settings::default()
    };
    let a = pipeline::build(dir, &settings)?;
    println!(
        "\nSAE {} (TopK, {} features, k = {}): held-out FVU {:.4}, L0 {:.1}, dead {:.2}% on {} tokens",
        a.sae.display(),
        settings.d_sae,
        settings.k,
        a.eval.fvu,
        a.eval.l0,
        a.eval.dead_fraction * 100.0,
        a.eval.tokens
    );
    println!("feature dashboard: {}", a.dashboard.display());
    println!("Tiller config:     {}", a.config.display());
    for c in &a.concepts {
        println!(
            "  monitor {:<8} feature {:>5}: fires on {:.1}% of its tokens, {:.1}% of others; top tokens: {}",
            c.concept,
            c.feature,
            c.freq_in * 100.0,
            c.freq_out * 100.0,
            c.top_tokens.join(" ")
        );
    }

    let state = pipeline::state(&a, 2)?;
    println!("\nsteering: cosine similarity of text pairs, without -> with the profile");
    for (profile, pairs) in [("no-legal", &LEGAL_PAIRS[..]), ("no-code", &CODE_PAIRS[..])] {
        let e = pipeline::steering_effect(&state, profile, pairs)?;
        for (what, list) in [("shared concept", &e.related), ("unrelated", &e.unrelated)] {
            let mean_before = list.iter().map(|p| p.before).sum::<f64>() / list.len() as f64;
            let mean_after = list.iter().map(|p| p.after).sum::<f64>() / list.len() as f64;
            let max_change = list
                .iter()
                .map(|p| (p.after - p.before).abs())
                .fold(0.0, f64::max);
            println!(
                "  {profile:<9} {what:<15} mean {mean_before:.4} -> {mean_after:.4} ({:+.4}), largest change {max_change:.4}",
                mean_after - mean_before
            );
        }
    }

    let tokio = tokio_runtime(2)?;
    tokio.block_on(async {
        let listener = match bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("{e:#}; using a free port instead");
                bind("127.0.0.1:0").await?
            }
        };
        let addr = listener.local_addr()?.to_string();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = rx.await;
        };
        let server = tokio::spawn(serve(listener, state, a.config.clone(), shutdown));
        println!("\nserver listening on http://{addr}");
        let queries = tokio::task::spawn_blocking(move || -> Result<String> {
            let (s, h) = http(&addr, "GET", "/healthz", "")?;
            println!("GET /healthz -> {s} {h}");
            let asks = [
                (None, "Licensed under the Apache License, Version 2.0; you may not use this file except in compliance."),
                (Some("no-legal"), "Licensed under the Apache License, Version 2.0; you may not use this file except in compliance."),
                (None, "for key, value in sorted(counts.items()):\n    print(key, value)"),
                (None, "The meeting moved to 14:30 on 12 March 2025, room 401."),
                (None, "A quiet walk through the autumn forest."),
            ];
            for (profile, text) in asks {
                let mut body = serde_json::json!({"input": text, "model": "all-MiniLM-L6-v2"});
                if let Some(p) = profile {
                    body["tiller_profile"] = serde_json::json!(p);
                }
                let (s, resp) = http(&addr, "POST", "/v1/embeddings", &body.to_string())?;
                let v: serde_json::Value = serde_json::from_str(&resp)?;
                let d = &v["data"][0];
                let e = d["embedding"].as_array().map(|a| a.len()).unwrap_or(0);
                let monitors: Vec<String> = d["tiller"]["events"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|ev| ev["monitor"].as_str().map(str::to_string))
                    .collect();
                println!(
                    "POST /v1/embeddings profile={:<8} -> {s}, {e}-d embedding, {} tokens, flagged by {:?}, steered {}: {:?}",
                    profile.unwrap_or("none"),
                    d["tiller"]["tokens"],
                    monitors,
                    d["tiller"]["steering"],
                    text.lines().next().unwrap_or("")
                );
            }
            let (_, m) = http(&addr, "GET", "/metrics", "")?;
            println!("GET /metrics (excerpt):");
            for l in m.lines().filter(|l| {
                !l.starts_with('#')
                    && (l.starts_with("tiller_monitor_events_total")
                        || l.starts_with("tiller_tokens_total")
                        || l.starts_with("tiller_steering_tokens_total")
                        || l.starts_with("embedding_server_inputs_total"))
            }) {
                println!("  {l}");
            }
            Ok(addr)
        })
        .await??;
        if keep {
            println!(
                "\nserving on http://{queries} until Ctrl-C; try:\n  curl -s http://{queries}/v1/embeddings -H 'Content-Type: application/json' \\\n    -d '{{\"input\": \"All rights reserved.\", \"tiller_profile\": \"no-legal\"}}'"
            );
            shutdown_signal()?.await;
        } else {
            println!(
                "\ndemo done. Serve it yourself with:\n  cargo run -p embedding-server -- serve --config {}",
                a.config.display()
            );
        }
        let _ = tx.send(());
        server.await??;
        Ok(())
    })
}
