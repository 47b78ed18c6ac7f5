//! The demo pipeline on real text, checked: the SAE's held-out quality, concept features that
//! fire on their concept, and ablations that do what they say to embeddings.
//!
//! It builds into the workspace's `target/demo` with the demo's default settings, so the README's
//! demo command reuses what this test built (and the other way round).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use embedding_server::pipeline::{self, CODE_PAIRS, LEGAL_PAIRS, Settings};

fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/demo")
}

#[test]
fn pipeline_on_real_text() {
    let a = pipeline::build(&demo_dir(), &Settings::default()).unwrap();

    // The SAE on held-out real text.
    println!(
        "held-out: FVU {:.4}, L0 {:.2}, dead {:.2}% ({} tokens)",
        a.eval.fvu,
        a.eval.l0,
        a.eval.dead_fraction * 100.0,
        a.eval.tokens
    );
    assert!(a.eval.fvu < 0.2, "held-out FVU {}", a.eval.fvu);
    assert!(
        (a.eval.l0 - 32.0).abs() < 1e-6,
        "TopK k=32 has L0 {}",
        a.eval.l0
    );
    assert!(a.eval.dead_fraction < 0.05, "dead {}", a.eval.dead_fraction);

    // Each concept's feature is selective: fires more on its concept than elsewhere.
    for c in &a.concepts {
        println!(
            "{:<8} feature {:>5}: {:.1}% vs {:.1}%, top tokens {:?}",
            c.concept,
            c.feature,
            c.freq_in * 100.0,
            c.freq_out * 100.0,
            c.top_tokens
        );
        assert!(c.freq_in > 1.5 * c.freq_out, "{c:?}");
        assert!(c.freq_in - c.freq_out > 0.05, "{c:?}");
    }
    let numbers = a.concepts.iter().find(|c| c.concept == "numbers").unwrap();
    assert!(
        numbers.top_tokens.iter().all(|t| t
            .trim_start_matches("##")
            .chars()
            .all(|c| c.is_ascii_digit())),
        "{numbers:?}"
    );

    // The dashboard holds those features.
    let html = std::fs::read_to_string(&a.dashboard).unwrap();
    for c in &a.concepts {
        assert!(
            html.contains(&format!("id=\"f-{}\"", c.feature)),
            "feature {} not on the page",
            c.feature
        );
    }

    // Ablating a concept's feature lowers the similarity of texts sharing the concept and
    // leaves unrelated pairs within 0.01.
    let state = pipeline::state(&a, 1).unwrap();
    for (profile, pairs) in [("no-legal", &LEGAL_PAIRS[..]), ("no-code", &CODE_PAIRS[..])] {
        let e = pipeline::steering_effect(&state, profile, pairs).unwrap();
        let mean = |v: &[pipeline::PairEffect], f: fn(&pipeline::PairEffect) -> f64| {
            v.iter().map(f).sum::<f64>() / v.len() as f64
        };
        let (before, after) = (
            mean(&e.related, |p| p.before),
            mean(&e.related, |p| p.after),
        );
        println!(
            "{profile}: related pairs {before:.4} -> {after:.4} ({:+.4})",
            after - before
        );
        for p in &e.related {
            println!(
                "    {:.4} -> {:.4}  {:?} / {:?}",
                p.before, p.after, p.a, p.b
            );
        }
        // A single layer-3 feature carries code similarity measurably; for legal text no single
        // feature does (the best found moves it by a few thousandths): reported, not asserted.
        if profile == "no-code" {
            assert!(
                after < before - 0.005,
                "{profile} did not lower related similarity: {before} -> {after}"
            );
        }
        for p in &e.unrelated {
            println!("    unrelated {:.4} -> {:.4}", p.before, p.after);
            assert!(
                (p.after - p.before).abs() <= 0.01,
                "{profile} moved an unrelated pair: {p:?}"
            );
        }
    }
}
