//! all-MiniLM-L6-v2 on ONNX Runtime against an independent float64 NumPy implementation
//! (`tests/reference.py`, its own WordPiece tokenizer included) on real sentences: same token ids,
//! residual stream at the hook and sentence embeddings within 1e-4 relative error, with and
//! without an edit in the hook.
#![allow(clippy::unwrap_used)]

use serde_json::Value;
use tiller_minilm::{Hidden, MiniLm, Options, provision};

const TEXTS: [&str; 8] = [
    "This program is free software; you can redistribute it and/or modify it under the terms of the GNU General Public License.",
    "The Golden Gate Bridge is a suspension bridge spanning the strait between San Francisco Bay and the Pacific Ocean.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "In 1969, 3 astronauts flew 384,400 km to the Moon aboard Apollo 11.",
    "Crème brûlée is a dessert of rich custard topped with caramelised sugar — délicieux!",
    "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND.",
    "short",
    "Unicode: naïve façade, 東京, emoji 🙂 and tabs\tinside.",
];

fn reference(dir: &std::path::Path, layer: usize, edit: Option<&[f32]>) -> Value {
    let req = serde_json::json!({
        "model_dir": dir, "texts": TEXTS, "layer": layer, "edit": edit,
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference.py");
    tiller_test_support::run_python_json(
        &tiller_test_support::python("python3"),
        std::path::Path::new(script),
        &req,
        "the NumPy reference needs python3 with numpy",
    )
}

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap()],
        _ => panic!("not a number"),
    }
}

#[test]
fn matches_float64_numpy_reference() {
    let dir = provision::model_dir().unwrap();
    let layer = 3;
    let model = MiniLm::load(
        &dir,
        Options {
            hook_layer: layer,
            intra_threads: 2,
            ..Options::default()
        },
    )
    .unwrap();
    let r = reference(&dir, layer, None);

    // Token ids: the tokenizers crate against the reference WordPiece.
    let toks = model.tokenize(&TEXTS).unwrap();
    for (i, t) in toks.iter().enumerate() {
        let want: Vec<u32> = r["ids"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(t.ids, want, "token ids of text {i} ({:?})", t.tokens);
    }

    // The residual stream at the hook, and the embeddings.
    let seqs: Vec<&[u32]> = toks.iter().map(|t| t.ids.as_slice()).collect();
    let (hidden, ranges) = model.hidden(&seqs).unwrap();
    let (emb, _) = model.embed(&TEXTS, None).unwrap();
    let mut worst = (0f64, 0f64);
    for (i, range) in ranges.iter().enumerate() {
        let h: Vec<f32> = hidden
            .slice(ndarray::s![range.clone(), ..])
            .iter()
            .copied()
            .collect();
        let eh = rel_err(&h, &floats(&r["hidden"][i]));
        let ee = rel_err(emb.row(i).as_slice().unwrap(), &floats(&r["embeddings"][i]));
        println!("text {i}: hidden rel err {eh:.2e}, embedding rel err {ee:.2e}");
        assert!(eh < 1e-4, "text {i}: hidden relative error {eh}");
        assert!(ee < 1e-4, "text {i}: embedding relative error {ee}");
        worst = (worst.0.max(eh), worst.1.max(ee));
    }
    println!(
        "worst relative error over {} texts: hidden {:.2e}, embedding {:.2e}",
        TEXTS.len(),
        worst.0,
        worst.1
    );

    // An edit in the hook reaches the embedding exactly as the same edit in the reference.
    let edit: Vec<f32> = (0..model.d())
        .map(|j| ((j as f32) * 0.37).sin() * 0.5)
        .collect();
    let mut hook = |h: &mut Hidden<'_>| -> anyhow::Result<()> {
        for row in h.data.chunks_mut(h.d) {
            for (x, e) in row.iter_mut().zip(&edit) {
                *x += e;
            }
        }
        Ok(())
    };
    let (edited, _) = model.embed(&TEXTS, Some(&mut hook)).unwrap();
    let r2 = reference(&dir, layer, Some(&edit));
    for i in 0..TEXTS.len() {
        let want = floats(&r2["embeddings"][i]);
        let ee = rel_err(edited.row(i).as_slice().unwrap(), &want);
        assert!(ee < 1e-4, "edited text {i}: embedding relative error {ee}");
        let moved = rel_err(
            edited.row(i).as_slice().unwrap(),
            &floats(&r["embeddings"][i]),
        );
        assert!(moved > 1e-2, "the edit must change embedding {i} ({moved})");
    }
}

#[test]
fn padding_does_not_change_results() {
    // A text embedded alone and in a batch with longer texts gives the same embedding.
    let dir = provision::model_dir().unwrap();
    let model = MiniLm::load(&dir, Options::default()).unwrap();
    let (alone, _) = model.embed(&TEXTS[6..7], None).unwrap();
    let (batch, _) = model.embed(&TEXTS, None).unwrap();
    let e = rel_err(
        batch.row(6).as_slice().unwrap(),
        &alone.row(0).iter().map(|&v| v as f64).collect::<Vec<_>>(),
    );
    assert!(e < 1e-5, "padding changed the embedding: {e}");
}

#[test]
fn bad_inputs_are_errors() {
    let dir = provision::model_dir().unwrap();
    let err = MiniLm::load(
        &dir,
        Options {
            hook_layer: 6,
            ..Options::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("layer 6"), "{err}");
    let model = MiniLm::load(&dir, Options::default()).unwrap();
    let err = model.embed_ids(&[&[101, 40000, 102]], None).unwrap_err();
    assert!(err.to_string().contains("40000"), "{err}");
    let err = model.embed_ids(&[&[]], None).unwrap_err();
    assert!(err.to_string().contains("no tokens"), "{err}");
    let long = vec![101u32; 600];
    let err = model.embed_ids(&[&long], None).unwrap_err();
    assert!(err.to_string().contains("600"), "{err}");
    // A broken model folder.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), "{}").unwrap();
    let err = MiniLm::load(tmp.path(), Options::default()).unwrap_err();
    assert!(format!("{err:#}").contains("config.json"), "{err:#}");
}

#[test]
fn word_pieces_match_the_full_tokenizer() {
    // The chunker tokenises without specials; its ids and strings must be the tokenizer's.
    let model = MiniLm::load(&provision::model_dir().unwrap(), Options::default()).unwrap();
    for text in TEXTS {
        let full = &model.tokenize(&[text]).unwrap()[0];
        let pieces = model.word_pieces(text).unwrap();
        let n = full.ids.len();
        assert_eq!(pieces.ids, full.ids[1..n - 1], "{text}");
        assert_eq!(pieces.tokens, full.tokens[1..n - 1], "{text}");
        assert!(pieces.tokens.iter().all(|t| !t.is_empty()), "{text}");
    }
}
