//! Keeps the Markdown documentation honest:
//! - every relative link and `#anchor` in `README.md` and `docs/**/*.md` resolves (the linked file
//!   exists relative to the linking file; an anchor matches a heading of the target file under
//!   GitHub's slug rules); external `http(s)` links are not fetched;
//! - `docs/config.md` names every key of the config structs (every struct deriving `Deserialize`
//!   in `runtime/src/config.rs` and `runtime/src/config/**/*.rs`, keys as serde spells them) and
//!   every value of the config's enums, so the reference cannot drift from the code.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the runtime crate sits in the repository root")
        .to_path_buf()
}

/// Every file under `dir` (recursively) whose name ends in `ext`, sorted.
fn files_under(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files_under(&path, ext, out);
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
}

fn markdown_files() -> Vec<PathBuf> {
    let root = repo_root();
    let mut files = vec![root.join("README.md")];
    files_under(&root.join("docs"), "md", &mut files);
    files
}

/// The lines of a Markdown file outside fenced code blocks, with their 1-based numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut fence: Option<(char, usize)> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        let marker = t.chars().next().filter(|c| *c == '`' || *c == '~');
        if let Some(c) = marker {
            let run = t.chars().take_while(|x| *x == c).count();
            if run >= 3 {
                match fence {
                    None => {
                        fence = Some((c, run));
                        continue;
                    }
                    Some((fc, frun)) if fc == c && run >= frun && t[run..].trim().is_empty() => {
                        fence = None;
                        continue;
                    }
                    _ => {}
                }
            }
        }
        if fence.is_none() {
            out.push((i + 1, line));
        }
    }
    out
}

/// `line` with inline code spans removed (their text could look like links).
fn without_code_spans(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '`' {
            let run = chars[i..].iter().take_while(|c| **c == '`').count();
            // Find the closing run of the same length.
            let mut j = i + run;
            let mut closed = None;
            while j < chars.len() {
                if chars[j] == '`' {
                    let r = chars[j..].iter().take_while(|c| **c == '`').count();
                    if r == run {
                        closed = Some(j + r);
                        break;
                    }
                    j += r;
                } else {
                    j += 1;
                }
            }
            match closed {
                Some(end) => {
                    out.push_str("CODE");
                    i = end;
                }
                None => {
                    out.extend(&chars[i..i + run]);
                    i += run;
                }
            }
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// The targets of the inline links `[text](target "title")` and images of one line.
fn link_targets(line: &str) -> Vec<String> {
    let line = without_code_spans(line);
    let mut out = Vec::new();
    let mut rest = line.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let mut depth = 0usize;
        let mut end = None;
        for (i, c) in after.char_indices() {
            match c {
                '(' => depth += 1,
                ')' if depth == 0 => {
                    end = Some(i);
                    break;
                }
                ')' => depth -= 1,
                _ => {}
            }
        }
        let Some(end) = end else { break };
        let inner = after[..end].trim();
        let target = inner
            .strip_prefix('<')
            .and_then(|t| t.split_once('>').map(|(a, _)| a))
            .unwrap_or_else(|| inner.split_whitespace().next().unwrap_or(""));
        out.push(target.to_string());
        rest = &after[end..];
    }
    out
}

/// Heading text as GitHub renders it for the slug: links become their text, emphasis and code
/// markers go.
fn heading_text(raw: &str) -> String {
    let mut text = String::new();
    let mut rest = raw;
    // `[text](target)` → `text`.
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](") else {
            break;
        };
        let close = open + close;
        let Some(paren) = rest[close + 2..].find(')') else {
            break;
        };
        text.push_str(&rest[..open]);
        text.push_str(&rest[open + 1..close]);
        rest = &rest[close + 2 + paren + 1..];
    }
    text.push_str(rest);
    text
}

/// GitHub's anchor for a heading: lowercased; letters, digits, `-`, `_` and spaces kept (spaces
/// become `-`); everything else dropped.
fn github_slug(heading: &str) -> String {
    heading_text(heading)
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| {
            if c == ' ' {
                Some('-')
            } else if c.is_alphanumeric() || c == '-' || c == '_' {
                Some(c)
            } else {
                None
            }
        })
        .collect()
}

/// Every anchor a Markdown file defines: its headings' slugs (a repeated slug gets `-1`, `-2`, …)
/// and explicit `<a id="…">` / `<a name="…">` anchors.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let t = line.trim_start();
        let hashes = t.chars().take_while(|c| *c == '#').count();
        if (1..=6).contains(&hashes) && t[hashes..].starts_with([' ', '\t']) {
            let title = t[hashes..].trim().trim_end_matches('#').trim();
            let slug = github_slug(title);
            let n = seen.entry(slug.clone()).or_insert(0);
            out.insert(if *n == 0 {
                slug.clone()
            } else {
                format!("{slug}-{n}")
            });
            *n += 1;
        }
        for key in ["id=\"", "name=\""] {
            let mut rest = line;
            while let Some(at) = rest.find("<a ") {
                rest = &rest[at + 3..];
                let tag = rest.split('>').next().unwrap_or("");
                if let Some(v) = tag.find(key) {
                    let v = &tag[v + key.len()..];
                    if let Some(end) = v.find('"') {
                        out.insert(v[..end].to_string());
                    }
                }
            }
        }
    }
    out
}

/// Percent-decodes what links commonly escape (`%20` and friends).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every broken relative link or anchor in `files`, as `file:line: message`.
fn broken_links(files: &[PathBuf]) -> Vec<String> {
    let root = repo_root();
    let mut anchor_cache: BTreeMap<PathBuf, BTreeSet<String>> = BTreeMap::new();
    let mut anchors_of = |path: &Path| -> Option<BTreeSet<String>> {
        if let Some(a) = anchor_cache.get(path) {
            return Some(a.clone());
        }
        let text = fs::read_to_string(path).ok()?;
        let a = anchors(&text);
        anchor_cache.insert(path.to_path_buf(), a.clone());
        Some(a)
    };
    let mut problems = Vec::new();
    for file in files {
        let shown = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        let Ok(text) = fs::read_to_string(file) else {
            problems.push(format!("{shown}: cannot be read"));
            continue;
        };
        let dir = file.parent().unwrap_or(&root);
        for (n, line) in prose_lines(&text) {
            for target in link_targets(line) {
                if target.is_empty()
                    || target.starts_with("http://")
                    || target.starts_with("https://")
                    || target.starts_with("mailto:")
                {
                    continue;
                }
                let (path_part, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target.as_str(), None),
                };
                let linked = if path_part.is_empty() {
                    file.clone()
                } else if path_part.starts_with('/') {
                    problems.push(format!(
                        "{shown}:{n}: link `{target}` is absolute; make it relative to the file"
                    ));
                    continue;
                } else {
                    dir.join(percent_decode(path_part))
                };
                if !linked.exists() {
                    problems.push(format!(
                        "{shown}:{n}: link `{target}`: {} does not exist",
                        linked.strip_prefix(&root).unwrap_or(&linked).display()
                    ));
                    continue;
                }
                let Some(anchor) = anchor else { continue };
                if linked.extension().is_none_or(|e| e != "md") {
                    continue;
                }
                let linked = linked.canonicalize().unwrap_or(linked);
                match anchors_of(&linked) {
                    Some(a) if a.contains(&percent_decode(anchor)) => {}
                    Some(a) => {
                        let near: Vec<&String> = a
                            .iter()
                            .filter(|x| x.contains(anchor.split('-').next().unwrap_or(anchor)))
                            .take(5)
                            .collect();
                        problems.push(format!(
                            "{shown}:{n}: link `{target}`: no heading with anchor `#{anchor}` in {} \
                             (near: {near:?})",
                            linked.strip_prefix(&root).unwrap_or(&linked).display()
                        ));
                    }
                    None => problems.push(format!("{shown}:{n}: link `{target}`: cannot read it")),
                }
            }
        }
    }
    problems
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let files = markdown_files();
    assert!(
        files.len() > 1,
        "no docs/ folder found beside README.md: {files:?}"
    );
    let problems = broken_links(&files);
    assert!(
        problems.is_empty(),
        "{} broken link(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn slugs_follow_github() {
    assert_eq!(github_slug("1. Layout"), "1-layout");
    assert_eq!(
        github_slug("A real model: all-MiniLM-L6-v2 behind an embedding server"),
        "a-real-model-all-minilm-l6-v2-behind-an-embedding-server"
    );
    assert_eq!(github_slug("`[runtime]`"), "runtime");
    assert_eq!(github_slug("`[[profile.steer]]`"), "profilesteer");
    assert_eq!(github_slug("llama.cpp"), "llamacpp");
    assert_eq!(github_slug("The C ABI (`tiller.h`)"), "the-c-abi-tillerh");
    assert_eq!(github_slug("Links [here](x.md) too"), "links-here-too");
    let a = anchors("# Tests\n\n```\n# not a heading\n```\n## Tests\n### FVU and L0 sampling\n");
    assert!(a.contains("tests") && a.contains("tests-1") && a.contains("fvu-and-l0-sampling"));
    assert!(!a.contains("not-a-heading"));
    assert_eq!(
        link_targets("see [a](b.md#c) and `[x](y)` and [d](<e f.md> \"t\") [g](h(i).md)"),
        vec!["b.md#c", "e f.md", "h(i).md"]
    );
}

// ---- the config reference ----

/// serde's `rename_all` rules, for the ones a field or variant name can meet.
fn apply_rename_all(rule: &str, ident: &str, is_variant: bool) -> String {
    // Variants are UpperCamelCase, fields snake_case; bring both to words first.
    let words: Vec<String> = if is_variant {
        let mut words = Vec::new();
        let mut cur = String::new();
        for c in ident.chars() {
            if c.is_uppercase() && !cur.is_empty() {
                words.push(std::mem::take(&mut cur));
            }
            cur.push(c);
        }
        if !cur.is_empty() {
            words.push(cur);
        }
        words.into_iter().map(|w| w.to_lowercase()).collect()
    } else {
        ident.split('_').map(str::to_string).collect()
    };
    let cap = |w: &String| {
        let mut c = w.chars();
        c.next()
            .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
            .unwrap_or_default()
    };
    match rule {
        "lowercase" => words.concat().to_lowercase(),
        "UPPERCASE" => words.concat().to_uppercase(),
        "snake_case" => words.join("_"),
        "SCREAMING_SNAKE_CASE" => words.join("_").to_uppercase(),
        "kebab-case" => words.join("-"),
        "SCREAMING-KEBAB-CASE" => words.join("-").to_uppercase(),
        "camelCase" => {
            let mut s = words.first().cloned().unwrap_or_default();
            for w in words.iter().skip(1) {
                s.push_str(&cap(w));
            }
            s
        }
        "PascalCase" => words.iter().map(cap).collect(),
        other => panic!("rename_all = {other:?} is not handled by this test"),
    }
}

/// What `#[serde(...)]` attributes say about an item or a field.
#[derive(Default, Debug)]
struct SerdeAttrs {
    rename: Option<String>,
    rename_all: Option<String>,
    skip: bool,
    flatten: bool,
}

fn serde_attrs(attrs: &[syn::Attribute]) -> SerdeAttrs {
    let mut out = SerdeAttrs::default();
    for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        attr.parse_nested_meta(|meta| {
            let name = meta
                .path
                .get_ident()
                .map(ToString::to_string)
                .unwrap_or_default();
            match name.as_str() {
                "rename" | "rename_all" => {
                    let value = if meta.input.peek(syn::Token![=]) {
                        Some(meta.value()?.parse::<syn::LitStr>()?.value())
                    } else {
                        // `rename(deserialize = "…", serialize = "…")`: the deserialize one.
                        let mut de = None;
                        meta.parse_nested_meta(|inner| {
                            let v = inner.value()?.parse::<syn::LitStr>()?.value();
                            if inner.path.is_ident("deserialize") {
                                de = Some(v);
                            }
                            Ok(())
                        })?;
                        de
                    };
                    if name == "rename" {
                        out.rename = value;
                    } else {
                        out.rename_all = value;
                    }
                }
                "skip" | "skip_deserializing" => out.skip = true,
                "flatten" => out.flatten = true,
                _ => {
                    // Consume `key = value` or `key(...)` so that parsing goes on.
                    if meta.input.peek(syn::Token![=]) {
                        meta.value()?.parse::<syn::Expr>()?;
                    } else if meta.input.peek(syn::token::Paren) {
                        meta.parse_nested_meta(|_| Ok(()))?;
                    }
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("cannot read a #[serde] attribute: {e}"));
    }
    out
}

fn derives_deserialize(attrs: &[syn::Attribute]) -> bool {
    attrs
        .iter()
        .filter(|a| a.path().is_ident("derive"))
        .any(|a| {
            let mut found = false;
            let _ = a.parse_nested_meta(|meta| {
                if meta
                    .path
                    .segments
                    .last()
                    .is_some_and(|s| s.ident == "Deserialize")
                {
                    found = true;
                }
                Ok(())
            });
            found
        })
}

/// One key (or enum value) the config accepts, and where it comes from.
#[derive(Debug)]
struct ConfigName {
    key: String,
    /// `struct RuntimeConfig` or `enum Op`, and the file.
    owner: String,
}

fn collect_names(items: &[syn::Item], file: &str, out: &mut Vec<ConfigName>) {
    for item in items {
        match item {
            syn::Item::Struct(s) if derives_deserialize(&s.attrs) => {
                let container = serde_attrs(&s.attrs);
                let syn::Fields::Named(fields) = &s.fields else {
                    continue;
                };
                for field in &fields.named {
                    let attrs = serde_attrs(&field.attrs);
                    if attrs.skip || attrs.flatten {
                        // A flattened struct's own keys are checked as that struct's.
                        continue;
                    }
                    let ident = field
                        .ident
                        .as_ref()
                        .map(|i| i.to_string().trim_start_matches("r#").to_string())
                        .unwrap_or_default();
                    let key = attrs.rename.unwrap_or_else(|| match &container.rename_all {
                        Some(rule) => apply_rename_all(rule, &ident, false),
                        None => ident,
                    });
                    out.push(ConfigName {
                        key,
                        owner: format!("struct {} ({file})", s.ident),
                    });
                }
            }
            syn::Item::Enum(e) if derives_deserialize(&e.attrs) => {
                let container = serde_attrs(&e.attrs);
                for variant in &e.variants {
                    let attrs = serde_attrs(&variant.attrs);
                    if attrs.skip || !matches!(variant.fields, syn::Fields::Unit) {
                        continue;
                    }
                    let ident = variant.ident.to_string();
                    let key = attrs.rename.unwrap_or_else(|| match &container.rename_all {
                        Some(rule) => apply_rename_all(rule, &ident, true),
                        None => ident,
                    });
                    out.push(ConfigName {
                        key,
                        owner: format!("enum {} ({file})", e.ident),
                    });
                }
            }
            syn::Item::Mod(m) => {
                let is_test = m.attrs.iter().any(|a| {
                    a.path().is_ident("cfg")
                        && a.meta
                            .require_list()
                            .is_ok_and(|l| l.tokens.to_string().contains("test"))
                });
                if let (false, Some((_, items))) = (is_test, &m.content) {
                    collect_names(items, file, out);
                }
            }
            _ => {}
        }
    }
}

/// The config module's sources: `runtime/src/config.rs` and everything under `runtime/src/config/`.
fn config_sources() -> Vec<PathBuf> {
    let src = repo_root().join("runtime/src");
    let mut files = Vec::new();
    if src.join("config.rs").is_file() {
        files.push(src.join("config.rs"));
    }
    files_under(&src.join("config"), "rs", &mut files);
    files
}

fn config_names() -> Vec<ConfigName> {
    let root = repo_root();
    let mut names = Vec::new();
    for path in config_sources() {
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let parsed = syn::parse_file(&text)
            .unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()));
        let shown = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        collect_names(&parsed.items, &shown, &mut names);
    }
    names
}

/// The keys and values a Markdown text names as code: every `` `…` `` span, also split at
/// `=`, `.`, `[`, `]` and spaces, so that `` `[[profile.steer]]` `` names `profile` and `steer`.
fn code_words(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let mut parts = line.split('`');
        parts.next();
        while let (Some(code), Some(_)) = (parts.next(), parts.next()) {
            out.insert(code.trim().to_string());
            for w in code.split(|c: char| "=.[]{}, \"|".contains(c)) {
                if !w.is_empty() {
                    out.insert(w.to_string());
                }
            }
        }
    }
    out
}

#[test]
fn config_reference_names_every_key() {
    let names = config_names();
    assert!(
        names.len() > 40,
        "found only {} config keys in {:?}: has the config module moved?",
        names.len(),
        config_sources()
    );
    let path = repo_root().join("docs/config.md");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let documented = code_words(&text);
    let missing: Vec<String> = names
        .iter()
        .filter(|n| !documented.contains(&n.key))
        .map(|n| format!("`{}` of {}", n.key, n.owner))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/config.md does not name {} config key(s) (write each as `key`):\n{}",
        missing.len(),
        missing.join("\n")
    );
}

#[test]
fn rename_rules() {
    assert_eq!(
        apply_rename_all("snake_case", "SwitchProfile", true),
        "switch_profile"
    );
    assert_eq!(
        apply_rename_all("kebab-case", "max_abs_value", false),
        "max-abs-value"
    );
    assert_eq!(
        apply_rename_all("camelCase", "max_abs_value", false),
        "maxAbsValue"
    );
    let file: syn::File = syn::parse_quote! {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        struct A {
            #[serde(default = "one")]
            pool_size: usize,
            #[serde(rename = "dictionary")]
            dictionaries: Vec<u32>,
            #[serde(skip)]
            source: Option<u32>,
            #[serde(flatten)]
            rest: B,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum E { SwitchProfile, #[serde(rename = "x")] Y }
        #[derive(Debug)]
        struct NotConfig { field: u32 }
    };
    let mut names = Vec::new();
    collect_names(&file.items, "test", &mut names);
    let keys: Vec<&str> = names.iter().map(|n| n.key.as_str()).collect();
    assert_eq!(keys, ["pool-size", "dictionary", "switch_profile", "x"]);
}

/// Source folders whose comments may cite the docs (build outputs and virtualenvs aside).
const SOURCE_DIRS: &[&str] = &[
    "runtime",
    "onnx-export",
    "plugin-abi",
    "examples",
    "benches",
    "python",
    "scripts",
    "fuzz",
    "test-support",
    ".ci",
];

/// Every source file in the repository that can carry a citation of the docs.
fn source_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                if !matches!(
                    name,
                    "target" | ".venv" | "fixtures" | "node_modules" | "__pycache__"
                ) && !name.ends_with(".egg-info")
                {
                    walk(&path, out);
                }
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("rs" | "py" | "c" | "h" | "sh" | "toml" | "yml" | "yaml" | "md")
            ) || name == "run"
            {
                out.push(path);
            }
        }
    }
    let root = repo_root();
    let mut out = Vec::new();
    for d in SOURCE_DIRS {
        walk(&root.join(d), &mut out);
    }
    out
}

/// Every `docs/….md` or `docs/….md#anchor` a line names, as written.
fn doc_citations(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("docs/") {
        let before = &rest[..at];
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || "/._-#".contains(c)))
            .unwrap_or(tail.len());
        let cite = tail[..len].trim_end_matches(['.', '-']);
        // `…/docs/` inside another path (a URL, `target/doc`) is not a citation of ours.
        if !before.ends_with(|c: char| c.is_ascii_alphanumeric() || c == '/' || c == '_')
            && cite.contains(".md")
        {
            out.push(cite.to_string());
        }
        rest = &tail[len.max(5)..];
    }
    out
}

#[test]
fn code_cites_docs_that_exist() {
    let root = repo_root();
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in source_files() {
        // This file names the forms it looks for.
        if file == root.join("runtime/tests/docs.rs") {
            continue;
        }
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        let shown = file
            .strip_prefix(&root)
            .unwrap_or(&file)
            .display()
            .to_string();
        for (i, line) in text.lines().enumerate() {
            if line.contains("design.md section") {
                problems.push(format!(
                    "{shown}:{}: cites `design.md section N`, which is not in the repository: \
                     cite docs/design.md#<anchor>",
                    i + 1
                ));
            }
            for cite in doc_citations(line) {
                checked += 1;
                let (path, anchor) = match cite.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (cite.as_str(), None),
                };
                let target = root.join(path);
                let Ok(md) = fs::read_to_string(&target) else {
                    problems.push(format!(
                        "{shown}:{}: `{cite}`: {path} does not exist",
                        i + 1
                    ));
                    continue;
                };
                if let Some(anchor) = anchor
                    && !anchors(&md).contains(anchor)
                {
                    problems.push(format!(
                        "{shown}:{}: `{cite}`: no heading with anchor `#{anchor}` in {path}",
                        i + 1
                    ));
                }
            }
        }
    }
    assert!(
        checked > 0,
        "no source file cites docs/: the scan found nothing"
    );
    assert!(
        problems.is_empty(),
        "{} citation(s) of the docs do not resolve:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn citations_are_found_in_code_lines() {
    assert_eq!(
        doc_citations("//! The runtime (docs/design.md#5-the-runtime): requests."),
        vec!["docs/design.md#5-the-runtime"]
    );
    assert_eq!(
        doc_citations("# see docs/operations.md. And https://x.org/docs/a.md"),
        vec!["docs/operations.md"]
    );
    assert!(doc_citations("target/docs/x.md").is_empty());
}

/// The `` `word` `` spans of a Markdown file, as a set.
fn code_spans(text: &str) -> BTreeSet<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn design_names_every_metric_and_metadata_key() {
    let root = repo_root();
    let design = fs::read_to_string(root.join("docs/design.md")).expect("docs/design.md");
    let spans = code_spans(&design);
    let mut missing = Vec::new();
    // Every metric family the runtime exports (the operator files' test checks that the list is
    // the registry's).
    for (name, ty) in tiller_runtime::metrics::METRICS {
        if !spans.contains(&format!("tiller_{name}")) {
            missing.push(format!("metric `tiller_{name}` ({ty})"));
        }
    }
    // Every `tiller.*` metadata key the dictionary code reads or writes.
    let mut sources = Vec::new();
    files_under(&root.join("runtime/src/dictionary"), "rs", &mut sources);
    let mut keys = BTreeSet::new();
    for file in &sources {
        let text = fs::read_to_string(file).expect("dictionary source");
        for quoted in text.split('"').skip(1).step_by(2) {
            if let Some(key) = quoted.strip_prefix("tiller.")
                && !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                keys.insert(format!("tiller.{key}"));
            }
        }
    }
    assert!(
        keys.len() > 10,
        "found only {keys:?} in runtime/src/dictionary"
    );
    for key in &keys {
        if !spans.contains(key) {
            missing.push(format!("metadata key `{key}`"));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/design.md does not name:\n{}",
        missing.join("\n")
    );
}
