//! The input: activation shards and the token metadata beside them.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::train::data::Shard;
use crate::{Error, Result};

/// One line of a shard's `.jsonl`.
#[derive(Debug, Deserialize)]
pub(super) struct Line {
    pub(super) source: String,
    pub(super) kind: String,
    pub(super) tokens: Vec<String>,
    pub(super) first_position: u64,
}

/// A shard's sequences, and the row at which each starts.
#[derive(Debug)]
pub(super) struct Sequences {
    pub(super) lines: Vec<Line>,
    pub(super) starts: Vec<u64>,
}

impl Sequences {
    pub(super) fn read(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut lines = Vec::new();
        let mut starts = Vec::new();
        let mut rows = 0u64;
        for (i, text) in std::io::BufReader::new(file).lines().enumerate() {
            let n = i + 1;
            let text = text.map_err(|e| Error::format(path, format!("line {n}: {e}")))?;
            if text.trim().is_empty() {
                continue;
            }
            let line: Line = serde_json::from_str(&text).map_err(|e| {
                let msg = e.to_string();
                let suffix = format!(" at line {} column {}", e.line(), e.column());
                let msg = msg.strip_suffix(&suffix).unwrap_or(&msg);
                Error::format(
                    path,
                    format!("line {n}: {msg} (column {}); expected an object with `source`, `kind`, `tokens` and `first_position`", e.column()),
                )
            })?;
            starts.push(rows);
            rows += line.tokens.len() as u64;
            lines.push(line);
        }
        Ok(Self { lines, starts })
    }

    pub(super) fn rows(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
            + self.lines.last().map_or(0, |l| l.tokens.len() as u64)
    }

    /// The line holding `row`, and the token's index in it.
    pub(super) fn locate(&self, row: u64) -> Option<(usize, usize)> {
        let line = self.starts.partition_point(|&s| s <= row).checked_sub(1)?;
        let j = (row - self.starts[line]) as usize;
        (j < self.lines[line].tokens.len()).then_some((line, j))
    }
}

/// A shard and its token file.
#[derive(Debug)]
pub(super) struct Input {
    pub(super) shard: Shard,
    pub(super) jsonl: PathBuf,
    pub(super) name: String,
}

pub(super) fn list_inputs(dir: &Path, width: usize, dict: &Path) -> Result<Vec<Input>> {
    if !dir.is_dir() {
        return Err(Error::format(
            dir,
            "is not a folder (expected shard-NNNNN.npy activations with shard-NNNNN.jsonl tokens)",
        ));
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("shard-") && name.ends_with(".npy") {
            names.push(name);
        }
    }
    names.sort();
    if names.is_empty() {
        return Err(Error::format(
            dir,
            "holds no activation shards (shard-NNNNN.npy files)",
        ));
    }
    let mut inputs = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(&name);
        let shard = Shard::open(&path, None)?;
        if shard.width != width {
            return Err(Error::format(
                &path,
                format!(
                    "has rows of width {}, but {} reads width {width}",
                    shard.width,
                    dict.display()
                ),
            ));
        }
        let jsonl = path.with_extension("jsonl");
        if !jsonl.is_file() {
            return Err(Error::format(
                &jsonl,
                format!("is missing: every shard needs its tokens beside it ({name})"),
            ));
        }
        let seqs = Sequences::read(&jsonl)?;
        if seqs.rows() != shard.rows {
            return Err(Error::format(
                &jsonl,
                format!(
                    "its {} lines hold {} tokens, but {name} has {} rows",
                    seqs.lines.len(),
                    seqs.rows(),
                    shard.rows
                ),
            ));
        }
        inputs.push(Input { shard, jsonl, name });
    }
    Ok(inputs)
}

pub(super) fn read_collector_meta(dir: &Path) -> Result<Option<serde_json::Value>> {
    let path = dir.join("meta.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&path, format!("is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(Error::format(&path, "is not a JSON object"));
    }
    Ok(Some(v))
}
