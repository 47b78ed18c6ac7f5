//! `tiller-llama-server`: an OpenAI-compatible server over llama.cpp with Tiller inside:
//! continuous batching, a Tiller request per sequence with its own profile, stops enforced.
//! See docs/integrations/llama-server.md.
//!
//! ```text
//! examples/llama-server/build.sh
//! tiller-llama-server --model M.gguf [--config tiller.toml --layer N] [--parallel 4] [--listen ADDR]
//! ```
//! SIGHUP reloads the Tiller config (a broken file is refused and the running config kept);
//! SIGTERM or SIGINT stop accepting connections, finish every running and queued request and exit.

mod api;
mod engine;
mod ffi;
mod http;
mod metrics;
mod model;
mod sampling;
mod text;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

use crate::engine::{Engine, Queue, Settings};
use crate::http::App;
use crate::model::{Model, Tiller};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "An OpenAI-compatible llama.cpp server with Tiller monitoring and steering every sequence"
)]
struct Cli {
    /// The GGUF model.
    #[arg(long)]
    model: PathBuf,
    /// The Tiller config (dictionaries, monitors, profiles); without it llama.cpp runs alone.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Hook the residual stream after this layer (repeat for several); required with --config.
    #[arg(long = "layer")]
    layers: Vec<i32>,
    /// The hook's name for a layer, one `%d`; the config's dictionaries read it.
    #[arg(long, default_value = "blk.%d")]
    hook_format: String,
    /// Address to listen on (port 0: a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Context per sequence, prompt and generation.
    #[arg(long, default_value_t = 2048)]
    ctx_size: usize,
    /// Most tokens in one decode (llama.cpp's n_batch and n_ubatch).
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Requests waiting for a slot; more are refused with 429.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// llama.cpp's threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// The KV cache's type: f16 (llama.cpp's default) or f32.
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32"])]
    cache_type: String,
    /// The model's name in answers (default: the file's stem).
    #[arg(long)]
    model_alias: Option<String>,
    /// A llama.cpp built-in chat template (chatml, llama3, ...) instead of the model's own.
    #[arg(long)]
    chat_template: Option<String>,
    /// Serve /v1/embeddings (an embedding model) instead of completions.
    #[arg(long)]
    embeddings: bool,
    /// Enables /admin/*: clients send `Authorization: Bearer <the file's first line>`.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// libtiller_llama_host.so (default: $TILLER_LLAMA_HOST_LIB, else beside this executable).
    #[arg(long)]
    lib: Option<PathBuf>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    check(&cli)?;
    let admin_token = cli
        .admin_token_file
        .as_deref()
        .map(read_token)
        .transpose()?;
    let api = Arc::new(ffi::Api::load(&ffi::find_library(cli.lib.as_deref())?)?);
    // SAFETY: once, before anything else of llama.cpp.
    unsafe { (api.tls_init)() };
    let model = Arc::new(Model::load(
        api.clone(),
        &cli.model,
        cli.chat_template.as_deref(),
    )?);
    for &l in &cli.layers {
        if l < 0 || l as usize >= model.n_layer {
            bail!("--layer {l}: the model has {} layers", model.n_layer);
        }
    }
    let tiller = cli
        .config
        .as_deref()
        .map(|c| Tiller::new(api.clone(), c).map(Arc::new))
        .transpose()?;
    let metrics = metrics::Metrics::new().context("the server's metrics")?;
    let queue = Arc::new(Queue::new(cli.queue, metrics.clone()));
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let settings = Settings {
        parallel: if cli.embeddings { 1 } else { cli.parallel },
        ctx_per_seq: cli.ctx_size,
        batch: cli.batch,
        threads,
        cache_f32: cli.cache_type == "f32",
        embeddings: cli.embeddings,
        layers: cli.layers.clone(),
        hook_format: cli.hook_format.clone(),
    };
    let engine = Engine::new(
        model.clone(),
        tiller.clone(),
        settings,
        queue.clone(),
        metrics.clone(),
    )?;
    let engine = std::thread::Builder::new()
        .name("tiller-engine".into())
        .spawn(move || engine.run())
        .context("starting the engine thread")?;
    let alias = cli.model_alias.clone().unwrap_or_else(|| {
        cli.model
            .file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
    });
    let app = Arc::new(App::new(
        model,
        tiller,
        queue.clone(),
        metrics,
        alias,
        cli.ctx_size,
        cli.batch,
        cli.embeddings,
        admin_token,
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting tokio")?;
    let served = rt.block_on(serve(app, &cli.listen, queue.clone()));
    // Every connection is closed: let the engine finish what is queued and stop.
    queue.shutdown();
    if engine.join().is_err() {
        bail!("the engine thread panicked");
    }
    served
}

fn check(cli: &Cli) -> Result<()> {
    if cli.config.is_some() && cli.layers.is_empty() {
        bail!("--config needs at least one --layer to hook");
    }
    if cli.config.is_none() && !cli.layers.is_empty() {
        bail!("--layer needs --config (the dictionaries that run there)");
    }
    if cli.parallel == 0 || cli.batch == 0 || cli.ctx_size < 2 || cli.queue == 0 {
        bail!("--parallel, --batch and --queue must be at least 1, --ctx-size at least 2");
    }
    if cli.batch < cli.parallel {
        bail!(
            "--batch {} must hold a token of each of the --parallel {} sequences",
            cli.batch,
            cli.parallel
        );
    }
    if cli.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    Ok(())
}

fn read_token(path: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < 16 {
        bail!(
            "{}: the admin token must be at least 16 characters",
            path.display()
        );
    }
    Ok(token)
}

async fn serve(app: Arc<App>, listen: &str, queue: Arc<Queue>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    std::io::stdout().flush()?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let reloader = app.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let a = reloader.clone();
            match tokio::task::spawn_blocking(move || a.reload()).await {
                Ok(Ok(())) => tracing::info!("SIGHUP: config reloaded"),
                Ok(Err(e)) => {
                    tracing::error!("SIGHUP: config refused, the running one is kept: {e}")
                }
                Err(e) => tracing::error!("SIGHUP: the reload task failed: {e}"),
            }
        }
    });
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down: finishing the requests in flight");
        queue.drain();
    };
    axum::serve(listener, http::router(app))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving")
}
