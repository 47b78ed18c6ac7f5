//! Reading a config file and checking it: errors name the file, the line and the key.

use std::path::Path;

use super::file::Config;
use super::monitor::Action;
use crate::{Error, Result};

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

/// The line of `key` in the `index`-th `[[table]]` of `text` (or of the table header).
fn locate(text: &str, table: &str, index: usize, key: &str) -> usize {
    let header = format!("[[{table}]]");
    let mut seen = 0;
    let mut in_table = false;
    let mut header_line = 0;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            if t == header {
                in_table = seen == index;
                if in_table {
                    header_line = i + 1;
                }
                seen += 1;
                continue;
            }
            if in_table && !t.starts_with(&format!("[[{table}.")) {
                in_table = false;
            }
        }
        if in_table {
            let k = t.split('=').next().unwrap_or("").trim();
            if k == key {
                return i + 1;
            }
        }
    }
    header_line.max(1)
}

/// The line of `key` in the `index`-th `[[table]]` of `text`, or with `rule`, in that table's
/// `rule`-th `[[table.steer]]`; the header's line when the key is not written there.
pub(crate) fn locate_key(
    text: &str,
    table: &str,
    index: usize,
    rule: Option<usize>,
    key: &str,
) -> usize {
    let Some(rule) = rule else {
        return locate(text, table, index, key);
    };
    let (header, sub) = (format!("[[{table}]]"), format!("[[{table}.steer]]"));
    let (mut tables, mut rules) = (0usize, 0usize);
    let (mut in_table, mut in_rule) = (false, false);
    let mut found = locate(text, table, index, "name");
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            in_rule = false;
            if t == header {
                in_table = tables == index;
                tables += 1;
                rules = 0;
            } else if t == sub && in_table {
                in_rule = rules == rule;
                rules += 1;
                if in_rule {
                    found = i + 1;
                }
            } else if !t.starts_with(&format!("[[{table}.")) {
                in_table = false;
            }
            continue;
        }
        if in_rule && t.split('=').next().unwrap_or("").trim() == key {
            return i + 1;
        }
    }
    found
}

impl Config {
    /// Reads and checks the config at `path`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, Some(path))
    }

    /// Parses a config held in a string; `path` (if any) names it in errors and anchors relative paths.
    pub fn parse(text: &str, path: Option<&Path>) -> Result<Self> {
        let name = path.map_or_else(|| "<config>".to_string(), |p| p.display().to_string());
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| line_of(text, s.start));
            // Name the key written on that line, when there is one.
            let key = text
                .lines()
                .nth(line.saturating_sub(1))
                .and_then(|l| l.split_once('='))
                .map(|(k, _)| k.trim())
                .filter(|k| !k.is_empty() && !k.starts_with('['));
            let message = match key {
                Some(k) => format!("`{k}`: {}", e.message()),
                None => e.message().to_string(),
            };
            Error::Config {
                file: name.clone(),
                line,
                message,
            }
        })?;
        cfg.source = path.map(Path::to_path_buf);
        cfg.name_vectors(text, &name)?;
        cfg.check(text, &name)?;
        cfg.check_requests(text, &name)?;
        Ok(cfg)
    }

    /// Checks `[[vector]]` and gives each profile rule that names one its hook (when the rule
    /// names none), so that rules are checked and compiled as if they had written it.
    fn name_vectors(&mut self, text: &str, file: &str) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for (i, v) in self.vectors.iter().enumerate() {
            if !seen.insert(v.name.as_str()) {
                return Err(Error::Config {
                    file: file.to_string(),
                    line: locate(text, "vector", i, "name"),
                    message: format!("`name`: `{}` is used twice", v.name),
                });
            }
        }
        let vectors = self.vectors.clone();
        for (pi, p) in self.profiles.iter_mut().enumerate() {
            for (ri, s) in p.steer.iter_mut().enumerate() {
                let Some(v) = s
                    .vector
                    .as_deref()
                    .and_then(Path::to_str)
                    .and_then(|n| vectors.iter().find(|v| v.name == n))
                else {
                    continue;
                };
                let err = |key: &str, message: String| Error::Config {
                    file: file.to_string(),
                    line: locate_key(text, "profile", pi, Some(ri), key),
                    message: format!("`{key}`: in profile `{}`: {message}", p.name),
                };
                if s.index.is_some() {
                    return Err(err(
                        "index",
                        format!("is set by the `[[vector]]` entry `{}`", v.name),
                    ));
                }
                match (&s.hook, &v.hook) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(err(
                            "hook",
                            format!("`{a}` is not the hook of vector `{}` (`{b}`)", v.name),
                        ));
                    }
                    (None, Some(b)) => s.hook = Some(b.clone()),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Checks `[requests]`.
    fn check_requests(&self, text: &str, file: &str) -> Result<()> {
        let r = &self.requests;
        // The line of `key` in `[requests]` (0 when it is not written there).
        let line = |key: &str| {
            let mut inside = false;
            for (i, l) in text.lines().enumerate() {
                let t = l.trim();
                if t.starts_with('[') {
                    inside = t == "[requests]";
                } else if inside && t.split('=').next().unwrap_or("").trim() == key {
                    return i + 1;
                }
            }
            0
        };
        let err = |key: &str, message: String| Error::Config {
            file: file.to_string(),
            line: line(key),
            message: format!("`requests.{key}`: {message}"),
        };
        for (key, v) in [
            ("max_abs_strength", r.max_abs_strength),
            ("max_abs_value", r.max_abs_value),
            ("max_abs_factor", r.max_abs_factor),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(err(key, format!("{v} is not a finite bound >= 0")));
            }
        }
        for n in &r.vectors {
            match self.vectors.iter().find(|v| &v.name == n) {
                None => return Err(err("vectors", format!("no `[[vector]]` is named `{n}`"))),
                Some(v) if v.hook.is_none() => {
                    return Err(err(
                        "vectors",
                        format!("`[[vector]]` `{n}` sets no `hook`, which a request's rule needs"),
                    ));
                }
                Some(_) => {}
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, d) in r.dictionaries.iter().enumerate() {
            let err = |key: &str, message: String| Error::Config {
                file: file.to_string(),
                line: locate(text, "requests.dictionary", i, key),
                message: format!("`{key}`: {message}"),
            };
            if !self.dictionaries.iter().any(|c| c.name == d.name) {
                return Err(err("name", format!("no dictionary is named `{}`", d.name)));
            }
            if !seen.insert(d.name.as_str()) {
                return Err(err("name", format!("`{}` is listed twice", d.name)));
            }
            if d.any_feature && d.features.is_some() {
                return Err(err(
                    "any_feature",
                    "give `features` or `any_feature = true`, not both".into(),
                ));
            }
        }
        Ok(())
    }

    fn check(&self, text: &str, file: &str) -> Result<()> {
        let err = |table: &str, i: usize, key: &str, message: String| Error::Config {
            file: file.to_string(),
            line: locate(text, table, i, key),
            message: format!("`{key}`: {message}"),
        };
        if self.runtime.execution_provider != "cpu" && self.runtime.execution_provider != "cuda" {
            return Err(Error::Config {
                file: file.to_string(),
                line: text
                    .lines()
                    .position(|l| l.trim_start().starts_with("execution_provider"))
                    .map_or(0, |i| i + 1),
                message: format!(
                    "`execution_provider`: `{}` is not cpu or cuda",
                    self.runtime.execution_provider
                ),
            });
        }
        if self.runtime.execution_provider == "cuda" {
            return Err(Error::Config {
                file: file.to_string(),
                line: text.lines().position(|l| l.trim_start().starts_with("execution_provider")).map_or(0, |i| i + 1),
                message: "`execution_provider`: this build of Tiller has no CUDA support (build with `--features cuda`)".into(),
            });
        }
        if !(0.0..=1.0).contains(&self.runtime.fvu_sample_rate) {
            return Err(Error::Config {
                file: file.to_string(),
                line: 0,
                message: "`fvu_sample_rate` must lie in [0, 1]".into(),
            });
        }
        let mut names = std::collections::HashSet::new();
        for (i, d) in self.dictionaries.iter().enumerate() {
            if !names.insert(d.name.as_str()) {
                return Err(err(
                    "dictionary",
                    i,
                    "name",
                    format!("`{}` is used twice", d.name),
                ));
            }
        }
        let profile_names: std::collections::HashSet<&str> =
            self.profiles.iter().map(|p| p.name.as_str()).collect();
        let monitor_names: std::collections::HashSet<&str> =
            self.monitors.iter().map(|m| m.name.as_str()).collect();
        for (i, m) in self.monitors.iter().enumerate() {
            if !names.contains(m.dictionary.as_str()) {
                return Err(err(
                    "monitor",
                    i,
                    "dictionary",
                    format!("no dictionary is named `{}`", m.dictionary),
                ));
            }
            if m.features.is_empty() {
                return Err(err("monitor", i, "features", "lists no feature".into()));
            }
            if !m.threshold.is_finite() {
                return Err(err(
                    "monitor",
                    i,
                    "threshold",
                    "is not a finite number".into(),
                ));
            }
            if m.action == Action::SwitchProfile {
                match &m.profile {
                    Some(p) if profile_names.contains(p.as_str()) => {}
                    Some(p) => {
                        return Err(err(
                            "monitor",
                            i,
                            "profile",
                            format!("no profile is named `{p}`"),
                        ));
                    }
                    None => {
                        return Err(err(
                            "monitor",
                            i,
                            "action",
                            "switch_profile needs `profile`".into(),
                        ));
                    }
                }
            }
        }
        let mut policy_names = std::collections::HashSet::new();
        for (i, pc) in self.policies.iter().enumerate() {
            if !policy_names.insert(pc.name.as_str()) {
                return Err(err(
                    "policy",
                    i,
                    "name",
                    format!("`{}` is used twice", pc.name),
                ));
            }
            if !names.contains(pc.dictionary.as_str()) {
                return Err(err(
                    "policy",
                    i,
                    "dictionary",
                    format!("no dictionary is named `{}`", pc.dictionary),
                ));
            }
            if pc.fuel == 0 {
                return Err(err("policy", i, "fuel", "must be positive".into()));
            }
            if pc.counters.len() > 64 {
                return Err(err("policy", i, "counters", "at most 64 counters".into()));
            }
        }
        let mut seen_profiles = std::collections::HashSet::new();
        for (i, p) in self.profiles.iter().enumerate() {
            if !seen_profiles.insert(p.name.as_str()) {
                return Err(err(
                    "profile",
                    i,
                    "name",
                    format!("`{}` is used twice", p.name),
                ));
            }
            for s in &p.steer {
                s.check(&names, &monitor_names).map_err(|(key, m)| {
                    err("profile", i, key, format!("in profile `{}`: {m}", p.name))
                })?;
            }
        }
        Ok(())
    }
}
