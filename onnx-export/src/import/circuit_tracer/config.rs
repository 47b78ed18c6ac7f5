//! `config.yaml`: the subset of YAML circuit-tracer's configs use (`key: scalar` lines, block and
//! flow lists of scalars, lists of flat mappings as in the first release's `transcoders`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::{Error, Result};

/// The parts of `config.yaml` the import reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    /// `transcoder_set` or `cross_layer_transcoder`.
    pub model_kind: Option<String>,
    /// The model the dictionaries were trained on.
    pub model_name: String,
    /// The TransformerLens hook the features read, relative to `blocks.{layer}`.
    pub feature_input_hook: Option<String>,
    /// The TransformerLens hook the features write, relative to `blocks.{layer}`.
    pub feature_output_hook: Option<String>,
    /// `activation` (`relu`, `topk`, or absent: the files decide).
    pub activation: Option<String>,
    /// `transcoders`: the file of each layer, in layer order.
    pub transcoders: Option<Vec<String>>,
}

/// Imports the circuit-tracer checkpoint in `dir`: one dictionary per source layer, or only

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    Null,
    Scalar(String),
    List(Vec<Item>),
    Other,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Item {
    Scalar(String),
    Map(BTreeMap<String, String>),
}

/// Parses `config.yaml` (the text `text` of the file at `path`).
pub fn parse_config(path: &Path, text: &str) -> Result<Config> {
    let map = parse_yaml(path, text)?;
    let err = |m: String| Error::format(path, m);
    let scalar = |key: &str| -> Result<Option<String>> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Scalar(s)) => Ok(Some(s.clone())),
            Some(_) => Err(err(format!("key `{key}` is not a single value"))),
        }
    };
    let transcoders = match map.get("transcoders") {
        None | Some(Value::Null) => None,
        Some(Value::List(items)) => {
            // The first release listed `{id, layer, filepath}` mappings; later ones, paths.
            let mut by_layer: BTreeMap<usize, String> = BTreeMap::new();
            for (i, item) in items.iter().enumerate() {
                match item {
                    Item::Scalar(s) => {
                        by_layer.insert(i, s.clone());
                    }
                    Item::Map(m) => {
                        let layer = m
                            .get("layer")
                            .and_then(|l| l.parse::<usize>().ok())
                            .ok_or_else(|| {
                                err(format!("`transcoders[{i}]` has no integer `layer`"))
                            })?;
                        let file = m
                            .get("filepath")
                            .ok_or_else(|| err(format!("`transcoders[{i}]` has no `filepath`")))?;
                        if by_layer.insert(layer, file.clone()).is_some() {
                            return Err(err(format!("`transcoders` lists layer {layer} twice")));
                        }
                    }
                }
            }
            let n = by_layer.len();
            if let Some(missing) = (0..n).find(|l| !by_layer.contains_key(l)) {
                return Err(err(format!(
                    "`transcoders` has no entry for layer {missing} (circuit-tracer needs layers 0..{n})"
                )));
            }
            Some(by_layer.into_values().collect())
        }
        Some(_) => return Err(err("key `transcoders` is not a list".into())),
    };
    Ok(Config {
        model_kind: scalar("model_kind")?,
        model_name: scalar("model_name")?.unwrap_or_default(),
        feature_input_hook: scalar("feature_input_hook")?,
        feature_output_hook: scalar("feature_output_hook")?,
        activation: scalar("activation")?,
        transcoders,
    })
}

pub(super) struct Line<'a> {
    pub(super) no: usize,
    pub(super) indent: usize,
    pub(super) text: &'a str,
}

pub(super) fn parse_yaml(path: &Path, text: &str) -> Result<BTreeMap<String, Value>> {
    let at = |no: usize, m: String| Error::format(path, format!("line {no}: {m}"));
    let mut lines = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let body = strip_comment(raw).trim_end();
        let trimmed = body.trim_start();
        if trimmed.is_empty() || trimmed == "---" || trimmed.starts_with('%') {
            continue;
        }
        if body.starts_with('\t') {
            return Err(at(
                i + 1,
                "tabs are not allowed for indentation in YAML".into(),
            ));
        }
        lines.push(Line {
            no: i + 1,
            indent: body.len() - trimmed.len(),
            text: trimmed,
        });
    }
    let mut map = BTreeMap::new();
    let mut i = 0;
    while i < lines.len() {
        let line = &lines[i];
        if line.indent != 0 || is_item(line.text) {
            return Err(at(
                line.no,
                "expected a top-level `key: value` (the config is a mapping)".into(),
            ));
        }
        let (key, rest) = split_key(line.text).ok_or_else(|| {
            at(
                line.no,
                format!("expected `key: value`, got `{}`", line.text),
            )
        })?;
        i += 1;
        let start = i;
        while i < lines.len() && (lines[i].indent > 0 || is_item(lines[i].text)) {
            i += 1;
        }
        let block = &lines[start..i];
        let value = if !rest.is_empty() {
            if !block.is_empty() {
                return Err(at(
                    block[0].no,
                    format!("key `{key}` has a value and an indented block"),
                ));
            }
            inline_value(rest).map_err(|m| at(line.no, m))?
        } else if block.is_empty() {
            Value::Null
        } else if is_item(block[0].text) {
            list(block).map_err(|(no, m)| at(no, m))?
        } else {
            Value::Other
        };
        if map.insert(key.clone(), value).is_some() {
            return Err(at(line.no, format!("key `{key}` appears twice")));
        }
    }
    Ok(map)
}

pub(super) fn is_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

/// A block list: items at the first line's indentation, each a scalar or a flat mapping.
pub(super) fn list(block: &[Line<'_>]) -> std::result::Result<Value, (usize, String)> {
    let indent = block[0].indent;
    let mut items = Vec::new();
    let mut i = 0;
    while i < block.len() {
        let line = &block[i];
        if line.indent != indent || !is_item(line.text) {
            return Err((line.no, "expected a list item `- …`".into()));
        }
        let first = line.text[1..].trim_start();
        i += 1;
        let start = i;
        while i < block.len() && block[i].indent > indent {
            i += 1;
        }
        let rest = &block[start..i];
        match split_key(first) {
            Some((k, v)) => {
                let mut m = BTreeMap::new();
                m.insert(k, scalar(v).map_err(|e| (line.no, e))?);
                for l in rest {
                    let (k, v) = split_key(l.text).ok_or_else(|| {
                        (l.no, format!("expected `key: value`, got `{}`", l.text))
                    })?;
                    m.insert(k, scalar(v).map_err(|e| (l.no, e))?);
                }
                items.push(Item::Map(m));
            }
            None => {
                if let Some(l) = rest.first() {
                    return Err((l.no, "a list item of a scalar has an indented block".into()));
                }
                items.push(Item::Scalar(scalar(first).map_err(|e| (line.no, e))?));
            }
        }
    }
    Ok(Value::List(items))
}

pub(super) fn inline_value(rest: &str) -> std::result::Result<Value, String> {
    if let Some(inner) = rest.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| format!("unterminated list `{rest}`"))?;
        if inner.trim().is_empty() {
            return Ok(Value::List(Vec::new()));
        }
        let items: std::result::Result<Vec<Item>, String> = inner
            .split(',')
            .map(|s| scalar(s.trim()).map(Item::Scalar))
            .collect();
        return Ok(Value::List(items?));
    }
    if rest.starts_with('{') || rest.starts_with('|') || rest.starts_with('>') {
        return Ok(Value::Other);
    }
    match rest {
        "~" | "null" | "Null" | "NULL" => Ok(Value::Null),
        _ => scalar(rest).map(Value::Scalar),
    }
}

/// A plain, single- or double-quoted scalar.
pub(super) fn scalar(s: &str) -> std::result::Result<String, String> {
    let s = s.trim();
    if let Some(inner) = s.strip_prefix('\'') {
        let inner = inner
            .strip_suffix('\'')
            .ok_or_else(|| format!("unterminated quoted string {s}"))?;
        return Ok(inner.replace("''", "'"));
    }
    if let Some(inner) = s.strip_prefix('"') {
        let inner = inner
            .strip_suffix('"')
            .ok_or_else(|| format!("unterminated quoted string {s}"))?;
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(c @ ('"' | '\\' | '/')) => out.push(c),
                other => {
                    return Err(format!(
                        "unsupported escape `\\{}` in {s}",
                        other.unwrap_or(' ')
                    ));
                }
            }
        }
        return Ok(out);
    }
    Ok(s.to_string())
}

/// `key: rest` (or `key:`), with the key unquoted.
pub(super) fn split_key(text: &str) -> Option<(String, &str)> {
    let (mut quote, mut prev_space) = (None, true);
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') if prev_space || i == 0 => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, ':') => {
                let after = &text[i + 1..];
                if after.is_empty() || after.starts_with(' ') {
                    let key = scalar(&text[..i]).ok()?;
                    if key.is_empty() {
                        return None;
                    }
                    return Some((key, after.trim()));
                }
            }
            _ => {}
        }
        prev_space = c == ' ';
    }
    None
}

/// The line without a trailing `# comment` (a `#` at the start or after a space, outside quotes).
pub(super) fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev == ' ' || prev == '\t' => return &line[..i],
            _ => {}
        }
        prev = c;
    }
    line
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_configs_circuit_tracer_writes() {
        let p = Path::new("config.yaml");
        let clt = "model_name: \"google/gemma-2-2b\"\nmodel_kind: cross_layer_transcoder\n\
                   feature_input_hook: hook_resid_mid # the residual stream\nfeature_output_hook: 'hook_mlp_out'\n\
                   scan:\n  - a\n  - b\n";
        let c = parse_config(p, clt).unwrap();
        assert_eq!(c.model_kind.as_deref(), Some("cross_layer_transcoder"));
        assert_eq!(c.model_name, "google/gemma-2-2b");
        assert_eq!(c.feature_input_hook.as_deref(), Some("hook_resid_mid"));
        assert_eq!(c.feature_output_hook.as_deref(), Some("hook_mlp_out"));
        assert_eq!(c.transcoders, None);

        let set = "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\n\
                   transcoders:\n- hf://mntss/x/layer_0.safetensors?revision=main\n- layer_1.safetensors\n";
        let c = parse_config(p, set).unwrap();
        assert_eq!(
            c.transcoders.unwrap(),
            vec![
                "hf://mntss/x/layer_0.safetensors?revision=main",
                "layer_1.safetensors"
            ]
        );

        // The first release's `{id, layer, filepath}` entries, in any order.
        let old = "model_name: \"meta-llama/Llama-3.2-1B\"\nfeature_input_hook: \"hook_resid_mid\"\n\
                   feature_output_hook: 'mlp.hook_out'\n\ntranscoders:\n  - id: \"b\"\n    layer: 1\n    \
                   filepath: \"b.safetensors\"\n  - id: \"a\"\n    layer: 0\n    filepath: \"a.safetensors\"\n";
        let c = parse_config(p, old).unwrap();
        assert_eq!(
            c.transcoders.unwrap(),
            vec!["a.safetensors", "b.safetensors"]
        );
        assert_eq!(
            parse_config(p, "transcoders: [a, 'b']\n")
                .unwrap()
                .transcoders
                .unwrap(),
            vec!["a", "b"]
        );
    }

    #[test]
    fn bad_configs_name_the_line() {
        let p = Path::new("config.yaml");
        let e = parse_config(p, "model_kind: x\n  oops\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        let e = parse_config(p, "a: 1\na: 2\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("`a`"), "{e}");
        let e = parse_config(p, "transcoders:\n  - layer: 1\n    filepath: x\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 0"), "{e}");
        let e = parse_config(p, "feature_input_hook:\n  - a\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("feature_input_hook"), "{e}");
    }
}
