//! `tiller-export inspect`: print what a dictionary is: kind, activation, sizes, hooks, source,
//! exactness, opset.

use std::path::{Path, PathBuf};

use anyhow::Result;
use tiller_runtime::DictionaryFile;

/// The arguments of `tiller-export inspect`.
#[derive(clap::Args)]
pub struct InspectArgs {
    /// The dictionary.
    dict: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl InspectArgs {
    /// Runs the command.
    pub fn run(self) -> Result<()> {
        let Self { dict, json } = self;
        inspect(&dict, json)
    }
}

fn inspect(path: &Path, json: bool) -> Result<()> {
    let f = DictionaryFile::open(path)?;
    let m = f.meta();
    let value = serde_json::json!({
        "path": path.display().to_string(),
        "kind": m.kind.as_str(),
        "activation": m.activation.as_str(),
        "d_in": m.d_in,
        "d_sae": m.d_sae,
        "d_out": m.d_out,
        "k": m.k,
        "n_layers": m.n_layers,
        "hook_in": m.hook_in,
        "hook_out": m.hook_out,
        "model": m.model,
        "input_norm": m.input_norm.to_string(),
        "source": m.source,
        "exact": m.exact,
        "sliced": m.feature_ids.is_some(),
        "labels": m.labels.len(),
        "opset": f.opset(),
        "external_data": f.has_external_data(),
        "weights": f.weight_dtype().as_str(),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("{}", path.display());
    println!("  kind        {}", m.kind);
    println!(
        "  activation  {}{}",
        m.activation,
        m.k.map(|k| format!(" (k = {k})")).unwrap_or_default()
    );
    println!(
        "  sizes       d_in {}  d_sae {}  d_out {}  layers {}",
        m.d_in, m.d_sae, m.d_out, m.n_layers
    );
    println!("  hooks       in `{}`  out `{}`", m.hook_in, m.hook_out);
    println!("  model       {}", m.model);
    println!("  input norm  {}", m.input_norm);
    println!("  source      {}", m.source);
    println!("  exact       {}", m.exact);
    println!("  weights     {}", f.weight_dtype());
    if let Some(ids) = &m.feature_ids {
        println!("  sliced      {} of the original features", ids.len());
    }
    println!(
        "  opset       {}{}",
        f.opset(),
        if f.has_external_data() {
            "  (external data)"
        } else {
            ""
        }
    );
    if !m.labels.is_empty() {
        println!("  labels      {}", m.labels.len());
        for (id, label) in m.labels.iter().take(20) {
            println!("    {id:>8}  {label}");
        }
    }
    Ok(())
}
