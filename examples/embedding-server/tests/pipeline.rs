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

    // Ablating a concept's feature leaves unrelated pairs within 0.01; its effect on texts
    // sharing the concept is reported.
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
        // How much ablating one feature moves the similarity of texts sharing its concept depends
        // on the machine's corpus (its /usr/share/doc decides the features trained): code pairs
        // fell by 0.016 to 0.033 on one machine, by 0.001 to 0.004 once cmake's and g++'s
        // documentation joined it, and by nothing once Debian's prometheus documentation did (the
        // candidates that lowered code pairs there moved short prose as much). For legal text no
        // single layer-3 feature ever did. Reported, not asserted; what the choice guarantees,
        // and this test asserts, is that unrelated pairs stay put.
        for p in &e.unrelated {
            println!("    unrelated {:.4} -> {:.4}", p.before, p.after);
            assert!(
                (p.after - p.before).abs() <= 0.01,
                "{profile} moved an unrelated pair: {p:?}"
            );
        }
    }
    probe_on_real_activations(&a.acts);
}

/// Issue 12 on real data: a token-level probe telling code from prose, trained with
/// `tiller-export`'s trainer on the collected activations, reaches a held-out AUROC, and the
/// runtime's scores equal float64 `sigmoid(x·w + b)` on held-out tokens.
fn probe_on_real_activations(acts: &std::path::Path) {
    use tiller_minilm::corpus::read_sequences;
    use tiller_runtime::{ActivationsMut, Phase, Runtime, Token};

    let seqs = read_sequences(acts).unwrap();
    let x: ndarray::Array2<f32> = ndarray_npy::read_npy(acts.join("shard-00000.npy")).unwrap();
    let (mut rows, mut labels) = (Vec::new(), Vec::new());
    let mut r = 0;
    for q in &seqs {
        if r >= x.nrows() {
            break;
        }
        let n = q.tokens.len();
        if q.kind == "code" || q.kind == "prose" {
            for i in r..(r + n).min(x.nrows()) {
                rows.push(i);
                labels.push(q.kind == "code");
            }
        }
        r += n;
    }
    // Every other token: 20k-ish rows for training, the rest held out for the runtime check.
    let pick = |keep: usize| -> (Vec<usize>, Vec<bool>) {
        rows.iter()
            .zip(&labels)
            .enumerate()
            .filter(|(i, _)| i % 2 == keep)
            .map(|(_, (r, l))| (*r, *l))
            .unzip()
    };
    let (train_rows, train_labels) = pick(0);
    let (test_rows, test_labels) = pick(1);
    let dir = tempfile::tempdir().unwrap();
    let xs = x.select(ndarray::Axis(0), &train_rows);
    ndarray_npy::write_npy(dir.path().join("x.npy"), &xs).unwrap();
    let ys = ndarray::Array1::from_iter(train_labels.iter().map(|&b| u8::from(b)));
    ndarray_npy::write_npy(dir.path().join("y.npy"), &ys).unwrap();
    let probe = dir.path().join("code.onnx");
    let mut cfg = tiller_export::probe::TrainProbeConfig::new(
        dir.path().join("x.npy"),
        dir.path().join("y.npy"),
        probe.clone(),
    );
    cfg.hook = "encoder.layer.3".into();
    cfg.name = Some("code".into());
    let report = tiller_export::probe::train_probe(&cfg).unwrap();
    let held = report.heldout.clone().unwrap();
    println!(
        "code-vs-prose probe on {} tokens: held-out AUROC {:.4}, accuracy {:.4} ({} tokens)",
        report.train.rows, held.auroc, held.accuracy, held.rows
    );
    assert!(held.auroc > 0.85, "held-out AUROC {}", held.auroc);

    // The runtime: a token monitor that reports every token's score.
    std::fs::write(
        dir.path().join("tiller.toml"),
        "[[dictionary]]\nname = \"code\"\npath = \"code.onnx\"\n\n[[monitor]]\nname = \"score\"\n\
         dictionary = \"code\"\nfeatures = [0]\nthreshold = -1.0\nwindow = \"token\"\n",
    )
    .unwrap();
    let rt = Runtime::from_config_file(dir.path().join("tiller.toml")).unwrap();
    let w = tiller_runtime::DictionaryFile::open(&probe)
        .unwrap()
        .weights()
        .unwrap();
    let test = x.select(ndarray::Axis(0), &test_rows[..4096.min(test_rows.len())]);
    rt.begin_request(1, None, None).unwrap();
    let mut got = Vec::new();
    for chunk in test.axis_chunks_iter(ndarray::Axis(0), 256) {
        let mut rows = chunk.to_owned();
        let tokens = vec![
            Token {
                request: 1,
                phase: Phase::Prompt
            };
            rows.nrows()
        ];
        let mut step = rt.step(&tokens).unwrap();
        step.hook(
            "encoder.layer.3",
            ActivationsMut::F32(rows.as_slice_mut().unwrap()),
        )
        .unwrap();
        got.extend(step.finish().events.iter().map(|e| f64::from(e.value)));
    }
    rt.end_request(1).unwrap();
    assert_eq!(got.len(), test.nrows());
    let (mut num, mut den, mut correct) = (0f64, 0f64, 0usize);
    for (i, row) in test.rows().into_iter().enumerate() {
        let z: f64 = row
            .iter()
            .zip(w.w_enc.column(0))
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum::<f64>()
            + f64::from(w.b_enc[0]);
        let p = 1.0 / (1.0 + (-z).exp());
        num += (got[i] - p).powi(2);
        den += p * p;
        correct += usize::from((p > 0.5) == test_labels[i]);
    }
    let err = (num / den).sqrt();
    println!(
        "runtime scores vs float64 sigmoid(x·w+b) on {} held-out tokens: relative error {err:.2e}, accuracy {:.4}",
        test.nrows(),
        correct as f64 / test.nrows() as f64
    );
    assert!(err < 1e-5, "runtime vs float64: {err}");
}
