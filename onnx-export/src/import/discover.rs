//! Finding checkpoints on disk, shared by the formats that read folders of them: walking a tree
//! for checkpoint folders, choosing the ones `--hookpoint` names, reading JSON configs.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::imported::ImportOptions;
use crate::{Error, Result};

/// The last component of `dir`, or its whole path when it has none.
pub(crate) fn folder_name(dir: &Path) -> String {
    let full = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    full.file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| dir.display().to_string())
}

/// Reads a JSON file that must hold an object.
pub(crate) fn read_json(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    json_object(path, &text)
}

/// Parses `text` (of the file at `path`) as a JSON object.
pub(crate) fn json_object(path: &Path, text: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Error::format(path, "is not a JSON object")),
        Err(e) => Err(Error::format(path, format!("not valid JSON: {e}"))),
    }
}

/// The folders below `root` (not `root` itself, at most `depth` levels down) for which `is_leaf`
/// holds, without looking inside them, as `(path below root with `/`, folder)`, in natural order
/// (`layers.2` before `layers.10`).
pub(crate) fn find_dirs(
    root: &Path,
    is_leaf: impl Fn(&Path) -> bool + Copy,
    depth: usize,
) -> Vec<(String, PathBuf)> {
    fn walk(
        dir: &Path,
        prefix: &str,
        is_leaf: impl Fn(&Path) -> bool + Copy,
        depth: usize,
        out: &mut Vec<(String, PathBuf)>,
    ) {
        if depth == 0 {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if !p.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue;
            }
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            if is_leaf(&p) {
                out.push((rel, p));
            } else {
                walk(&p, &rel, is_leaf, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    if root.is_dir() {
        walk(root, "", is_leaf, depth, &mut out);
    }
    out.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    out
}

/// Picks what to import at `root`: `root` itself when it is a checkpoint (then `--hookpoint`, if
/// given, must name it), else the folders below it that are, or the one `--hookpoint` names.
/// `what` describes the folders looked for, for the errors.
pub(crate) fn select(
    root: &Path,
    is_leaf: impl Fn(&Path) -> bool + Copy,
    depth: usize,
    opts: &ImportOptions,
    what: &str,
) -> Result<Vec<(Option<String>, PathBuf)>> {
    if is_leaf(root) {
        if let Some(h) = &opts.hookpoint {
            let own = folder_name(root);
            if *h != own {
                return Err(Error::format(
                    root,
                    format!("is the single checkpoint `{own}`; --hookpoint `{h}` does not name it"),
                ));
            }
        }
        return Ok(vec![(None, root.to_path_buf())]);
    }
    if !root.exists() {
        return Err(Error::format(root, "does not exist"));
    }
    let found = find_dirs(root, is_leaf, depth);
    if found.is_empty() {
        return Err(Error::format(root, format!("holds no {what}")));
    }
    match &opts.hookpoint {
        None => Ok(found.into_iter().map(|(n, p)| (Some(n), p)).collect()),
        Some(h) => {
            let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
            let list = names.join(", ");
            match found.iter().find(|(n, _)| n == h) {
                Some((n, p)) => Ok(vec![(Some(n.clone()), p.clone())]),
                None => Err(Error::format(
                    root,
                    format!("has no hookpoint `{h}` (it has: {list})"),
                )),
            }
        }
    }
}

/// Compares names with runs of digits taken as numbers, as `natsort` does.
pub(crate) fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (&a[..na], &b[..nb]);
                // Compare as numbers of any length: strip leading zeros, then by length, then digits.
                let ta = &da[da.iter().take_while(|c| **c == b'0').count()..];
                let tb = &db[db.iter().take_while(|c| **c == b'0').count()..];
                let o = ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb));
                if o != Ordering::Equal {
                    return o;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec!["layers.10", "layers.2", "layers.2.mlp", "layers.1", "embed"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            ["embed", "layers.1", "layers.2", "layers.2.mlp", "layers.10"]
        );
    }
}
