//! `embedding-server`: all-MiniLM-L6-v2 behind an OpenAI-compatible `POST /v1/embeddings`, with
//! Tiller monitoring and steering the residual stream after `--layer`.
//!
//! ```text
//! embedding-server --config tiller.toml --listen 127.0.0.1:8080 [--layer 3] [--workers 2]
//! ```
//! SIGHUP reloads the config (a broken file is refused and the running config kept); SIGINT or
//! SIGTERM stop accepting connections, finish the requests in flight and exit.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use embedding_server::{AppState, router};
use tiller::Runtime;
use tiller_minilm::{MiniLm, Options, provision};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(version, about = "OpenAI-compatible embeddings with Tiller in the residual stream")]
struct Cli {
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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = Arc::new(
        Runtime::from_config_file(&cli.config)
            .with_context(|| format!("loading {}", cli.config.display()))?,
    );
    let model = Arc::new(MiniLm::load(
        &provision::model_dir()?,
        Options {
            hook_layer: cli.layer,
            intra_threads: cli.threads,
            pool_size: cli.workers,
            ..Options::default()
        },
    )?);
    let hook = model.hook_name();
    let hooks = runtime.hooks();
    if let Some((h, w)) = hooks.iter().find(|(h, _)| *h != hook) {
        anyhow::bail!(
            "{}: a dictionary reads hook {h:?} (width {w}), but this server hooks {hook:?}; \
             pass --layer or fix the dictionary",
            cli.config.display()
        );
    }
    if let Some((_, w)) = hooks.iter().find(|(_, w)| *w != model.d()) {
        anyhow::bail!("a dictionary has width {w}, the model {}", model.d());
    }
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(cli.workers.max(1) * 2)
        .enable_all()
        .build()?;
    tokio_rt.block_on(serve(cli, model, runtime))
}

async fn serve(cli: Cli, model: Arc<MiniLm>, runtime: Arc<Runtime>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(&cli.listen)
        .await
        .with_context(|| format!("listening on {}", cli.listen))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(AppState::new(model, runtime.clone()));

    let mut hup = signal(SignalKind::hangup())?;
    let rt = runtime.clone();
    let config = cli.config.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match rt.reload(Some(&config)) {
                Ok(()) => eprintln!("SIGHUP: reloaded {}", config.display()),
                Err(e) => eprintln!("SIGHUP: kept the running config; {} is refused: {e}", config.display()),
            }
        }
    });
    let mut term = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        eprintln!("shutting down: finishing the requests in flight");
    };
    // The line tests and scripts wait for.
    println!("listening on http://{addr}");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    eprintln!("stopped");
    Ok(())
}
