//! The HTML page: `page.html` filled with the rendered features, `style.css` and `app.js`.

use std::fmt::Write as _;
use std::path::Path;

use super::model::*;

/// Escapes text for HTML content and attribute values.
pub(super) fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A token as shown: `##` dropped from continuation pieces, whitespace made visible.
pub(super) fn shown_token(t: &str) -> String {
    let t = t.strip_prefix("##").unwrap_or(t);
    let mut o = String::with_capacity(t.len());
    for c in t.chars() {
        match c {
            '\n' => o.push('↵'),
            '\t' => o.push('⇥'),
            '\r' => {}
            c if c.is_control() => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    esc(&o)
}

/// `v` with `sig` significant digits, without exponent for ordinary magnitudes.
pub(super) fn num(v: f64, sig: usize) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let mag = v.abs().log10().floor() as i32;
    if !(-4..6).contains(&mag) {
        return format!("{:.*e}", sig.saturating_sub(1), v);
    }
    let decimals = (sig as i32 - 1 - mag).max(0) as usize;
    format!("{v:.decimals$}")
}

pub(super) fn pct(v: f64) -> String {
    if v == 0.0 {
        "0%".into()
    } else {
        format!("{}%", num(v * 100.0, 3))
    }
}

pub(super) fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut o = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            o.push(',');
        }
        o.push(c);
    }
    o
}

pub(super) const CSS: &str = include_str!("style.css");

pub(super) const SCRIPT: &str = include_str!("app.js");

/// The document around the features: `{title}`, `{style}`, `{body}`, `{version}`, `{script}`.
const PAGE: &str = include_str!("page.html");

pub(super) fn histogram_svg(f: &Feature) -> String {
    let (w, h, pad) = (260.0f64, 64.0f64, 14.0f64);
    let mut o = String::new();
    let counts = &f.histogram.counts;
    let n = counts.len().max(1) as f64;
    let top = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let _ = write!(
        o,
        r#"<svg class="histogram" width="{w}" height="{}" viewBox="0 0 {w} {}" role="img" aria-label="histogram of nonzero activations">"#,
        h + pad,
        h + pad
    );
    let bw = w / n;
    for (i, &c) in counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let bh = (c as f64 / top * (h - 2.0)).max(1.5);
        let lo = i as f64 * f.histogram.bin_width;
        let hi = lo + f.histogram.bin_width;
        let _ = write!(
            o,
            r#"<rect class="bar" x="{:.2}" y="{:.2}" width="{:.2}" height="{bh:.2}"><title>[{}, {}): {}</title></rect>"#,
            i as f64 * bw + 0.5,
            h - bh,
            (bw - 1.0).max(0.5),
            num(lo, 3),
            num(hi, 3),
            thousands(c)
        );
    }
    let _ = write!(
        o,
        r#"<line class="axis" x1="0" y1="{h}" x2="{w}" y2="{h}"/><text x="0" y="{}">0</text><text x="{w}" y="{}" text-anchor="end">{}</text></svg>"#,
        h + 11.0,
        h + 11.0,
        num(n * f.histogram.bin_width, 3)
    );
    o
}

pub(super) fn render_context(o: &mut String, c: &Context, max: f32) {
    let _ = write!(
        o,
        r#"<li class="ctx" title="{} · {} row {} · position {}"><span class="act">{}</span><span class="kind">{}</span><span class="text">"#,
        esc(&c.source),
        esc(&c.shard),
        c.row,
        c.position,
        num(f64::from(c.activation), 3),
        esc(&c.kind)
    );
    if c.window_start > 0 {
        o.push_str(r#"<span class="gap">… </span>"#);
    }
    for (i, (t, &a)) in c.tokens.iter().zip(&c.activations).enumerate() {
        if i > 0 && !t.starts_with("##") {
            o.push(' ');
        }
        let alpha = if max > 0.0 {
            (a / max).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let _ = write!(
            o,
            r#"<span class="tok{}" data-act="{a}" title="{} · {}""#,
            if i == c.top { " top" } else { "" },
            esc(t),
            num(f64::from(a), 3)
        );
        if alpha > 0.0 {
            let _ = write!(o, r#" style="background:rgba(var(--hl),{alpha:.3})""#);
        }
        let _ = write!(o, ">{}</span>", shown_token(t));
    }
    if c.window_start + c.tokens.len() < c.sequence_len {
        o.push_str(r#"<span class="gap"> …</span>"#);
    }
    o.push_str("</span></li>\n");
}

pub(super) fn render_feature(o: &mut String, f: &Feature, rows: u64) {
    let search = format!(
        "{} {} {}",
        f.id,
        f.label,
        f.given_label.as_deref().unwrap_or("")
    )
    .to_lowercase();
    let _ = write!(
        o,
        r#"<section class="feature" id="f-{}" data-feature="{}" data-search="{}">"#,
        f.id,
        f.id,
        esc(&search)
    );
    o.push_str(r#"<div class="fhead"><div><div class="title">"#);
    let _ = write!(o, r##"<a class="fid" href="#f-{}">#{}</a>"##, f.id, f.id);
    if f.label.is_empty() {
        o.push_str(r#"<span class="label none">never fired</span>"#);
    } else {
        let shares: Vec<String> = f
            .label_words
            .iter()
            .map(|w| format!("{} {}", w.word, pct(w.share)))
            .collect();
        let _ = write!(
            o,
            r#"<span class="label" title="share of the top activations: {}">{}</span>"#,
            esc(&shares.join(", ")),
            esc(&f.label)
        );
    }
    if let Some(g) = &f.given_label {
        let _ = write!(
            o,
            r#"<span class="given" title="label stored in the dictionary">{}</span>"#,
            esc(g)
        );
    }
    o.push_str("</div>");
    let shown = f.contexts.len();
    let kinds: Vec<String> = f
        .kinds
        .iter()
        .map(|k| format!("<span>{} {}/{shown}</span>", esc(&k.kind), k.count))
        .collect();
    let _ = write!(
        o,
        r#"<dl class="nums"><div><dt>density</dt><dd>{}</dd></div><div><dt>active on</dt><dd>{} of {}</dd></div><div><dt>max</dt><dd>{}</dd></div>{}<div class="kinds"><dt>top contexts</dt><dd>{}</dd></div></dl></div>"#,
        pct(f.density),
        thousands(f.count),
        thousands(rows),
        num(f64::from(f.max), 4),
        if f.column == f.id as usize {
            String::new()
        } else {
            format!("<div><dt>column</dt><dd>{}</dd></div>", f.column)
        },
        if kinds.is_empty() {
            "none".to_string()
        } else {
            kinds.join("")
        }
    );
    if f.count > 0 {
        let _ = write!(
            o,
            r#"<figure class="hist">{}<figcaption>nonzero activations ({})</figcaption></figure>"#,
            histogram_svg(f),
            thousands(f.count)
        );
    }
    o.push_str("</div>\n");
    if f.contexts.is_empty() {
        o.push_str(r#"<p class="empty">No contexts: this feature never fired on these rows.</p>"#);
    } else {
        o.push_str("<ol class=\"contexts\">\n");
        for c in &f.contexts {
            render_context(o, c, f.max);
        }
        o.push_str("</ol>");
    }
    o.push_str("</section>\n");
}

/// The page: one self-contained HTML document.
pub fn render_html(d: &Dashboard) -> String {
    let mut o = String::with_capacity(64 * 1024);
    let name = Path::new(&d.dictionary).file_name().map_or_else(
        || d.dictionary.clone(),
        |n| n.to_string_lossy().into_owned(),
    );
    o.push_str(r#"<header class="top"><div class="wrap">"#);
    let _ = write!(
        o,
        "<h1>Tiller feature dashboard<small>{}</small></h1>",
        esc(&name)
    );
    let mut facts = vec![format!("{} · {}", esc(&d.kind), esc(&d.activation))];
    if !d.model.is_empty() {
        facts.push(format!("model <code>{}</code>", esc(&d.model)));
    }
    if !d.hook_in.is_empty() {
        facts.push(format!("hook <code>{}</code>", esc(&d.hook_in)));
    }
    facts.push(format!("activations <code>{}</code>", esc(&d.activations)));
    if let Some(serde_json::Value::Object(m)) = &d.collector {
        // The collector's own record of where the rows come from; its counts are in the totals.
        for k in ["model", "hook", "layer"] {
            let Some(v) = m.get(k) else { continue };
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => continue,
            };
            let fact = format!("{} <code>{}</code>", esc(k), esc(&v));
            if !facts.contains(&fact) {
                facts.push(fact);
            }
        }
    }
    let _ = write!(o, r#"<div class="sub">{}</div>"#, facts.join(" · "));
    let _ = write!(
        o,
        r#"<dl class="totals"><div><dt>features</dt><dd id="d-sae">{}</dd></div><div><dt>d_in</dt><dd>{}</dd></div><div><dt>tokens</dt><dd id="rows">{}</dd></div><div><dt>shards</dt><dd>{}</dd></div><div><dt>dead</dt><dd id="dead">{}</dd></div><div><dt>mean L0</dt><dd id="l0">{}</dd></div><div><dt>shown</dt><dd>{}</dd></div></dl>"#,
        thousands(d.d_sae as u64),
        d.d_in,
        thousands(d.rows),
        d.shards,
        pct(d.dead_fraction),
        num(d.mean_l0, 4),
        d.features.len()
    );
    o.push_str(
        r#"<input id="filter" type="search" placeholder="Filter features by id or label" hidden>"#,
    );
    o.push_str("</div></header>\n<main class=\"wrap\">\n");
    if d.features.is_empty() {
        o.push_str(r#"<p class="empty">No features to show: none fired on these rows.</p>"#);
    } else {
        o.push_str(r#"<nav class="index">"#);
        for f in &d.features {
            let _ = write!(
                o,
                r##"<a href="#f-{}"><b>#{}</b>{}</a>"##,
                f.id,
                f.id,
                if f.label.is_empty() {
                    "never fired".to_string()
                } else {
                    esc(&f.label)
                }
            );
        }
        o.push_str("</nav>\n");
    }
    for f in &d.features {
        render_feature(&mut o, f, d.rows);
    }
    fill(
        PAGE,
        &[
            ("title", &esc(&name)),
            ("style", CSS),
            ("body", &o),
            ("version", env!("CARGO_PKG_VERSION")),
            ("script", SCRIPT),
        ],
    )
}

/// `template` with each `{key}` of `values` replaced by its value; the values are not scanned
/// again, so braces in the CSS, the script or the body stay as they are.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let size = template.len() + values.iter().map(|(_, v)| v.len()).sum::<usize>();
    let mut out = String::with_capacity(size);
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        match values
            .iter()
            .find(|(k, _)| rest[1..].starts_with(k) && rest[1 + k.len()..].starts_with('}'))
        {
            Some((k, v)) => {
                out.push_str(v);
                rest = &rest[k.len() + 2..];
            }
            None => {
                out.push('{');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(
            esc(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(shown_token("##<b>\n"), "&lt;b&gt;↵");
    }
}
