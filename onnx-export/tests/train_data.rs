//! The training data stream: shards of every supported dtype read back exactly (widened to
//! float32), every training row seen once per epoch and no held-out row ever, batches mixing
//! shards, sources lined up row by row, and bad input refused with the file and the problem named.
#![allow(clippy::unwrap_used)]

mod train_common;

use std::collections::{BTreeMap, BTreeSet};

use ndarray::Array2;
use safetensors::Dtype;
use tiller_export::train::data::{Dataset, Segment, Stream};
use tiller_export::train::{self, Control, TrainConfig};
use tiller_runtime::{Activation, Kind};
use train_common::{npy_bytes, write_npy, write_safetensors};

/// Rows whose every value is the row's global index.
fn ids(start: usize, n: usize, width: usize) -> Array2<f32> {
    Array2::from_shape_fn((n, width), |(r, _)| (start + r) as f32)
}

#[test]
fn every_dtype_reads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let x = Array2::from_shape_fn((50, 6), |(r, c)| (r as f32 - 20.0) * 0.25 + c as f32);
    write_npy(&dir.path().join("a.npy"), &x, Dtype::F16);
    write_npy(&dir.path().join("b.npy"), &x, Dtype::F32);
    write_npy(&dir.path().join("c.npy"), &x, Dtype::F64);
    write_safetensors(&dir.path().join("d.safetensors"), &[("x", &x)], Dtype::BF16);
    write_safetensors(&dir.path().join("e.safetensors"), &[("x", &x)], Dtype::F16);
    let ds = Dataset::open(&[dir.path().to_path_buf()], &[], None, None).unwrap();
    assert_eq!(ds.shard_rows, vec![50; 5]);
    for shard in 0..5 {
        let mut out = vec![0f32; 7 * 6];
        ds.read(shard, 13, 7, &mut out).unwrap();
        let want: Vec<f32> = x.slice(ndarray::s![13..20, ..]).iter().copied().collect();
        assert_eq!(out, want, "shard {shard}");
    }
}

#[test]
fn one_epoch_sees_every_training_row_once_and_mixes_shards() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [700usize, 300, 900, 500, 600];
    let mut start = 0;
    for (i, &n) in sizes.iter().enumerate() {
        write_npy(
            &dir.path().join(format!("s{i}.npy")),
            &ids(start, n, 3),
            Dtype::F32,
        );
        start += n;
    }
    let total = start;
    let ds = Dataset::open(&[dir.path().to_path_buf()], &[], None, None).unwrap();
    let (train, eval) = ds.split(400);
    let held: BTreeSet<usize> = (total - 400..total).collect();
    assert_eq!(
        eval,
        vec![Segment {
            shard: 4,
            start: 200,
            end: 600
        }]
    );
    let train_rows = total - 400;
    // Batches of 100 from a buffer of 450 rows filled 128 rows at a time from up to 3 shards.
    let mut stream = Stream::new(train.clone(), 3, 17, 450, 128, 3);
    let mut batch = Array2::<f32>::zeros((100, 3));
    let mut seen: BTreeMap<usize, usize> = BTreeMap::new();
    let mut first = BTreeSet::new();
    let epochs = 3;
    for b in 0..epochs * train_rows / 100 {
        stream.next_batch(&ds, &mut batch).unwrap();
        for row in batch.rows() {
            assert!(row.iter().all(|v| *v == row[0]), "rows are copied whole");
            let id = row[0] as usize;
            assert!(!held.contains(&id), "held-out row {id} was drawn");
            *seen.entry(id).or_default() += 1;
            if b == 0 {
                // Which shard each row of the first batch came from.
                let mut acc = 0;
                for (i, &n) in sizes.iter().enumerate() {
                    if id < acc + n {
                        first.insert(i);
                        break;
                    }
                    acc += n;
                }
            }
        }
    }
    assert_eq!(seen.len(), train_rows, "every training row is drawn");
    // The buffer straddles epochs by at most its size: each row is drawn `epochs` times, give or
    // take one.
    for (id, n) in &seen {
        assert!(
            (epochs - 1..=epochs + 1).contains(n),
            "row {id} drawn {n} times"
        );
    }
    assert!(
        first.len() >= 2,
        "the first batch comes from one shard: {first:?}"
    );

    // The same seed gives the same batches; another seed, others.
    let draw = |seed| {
        let mut s = Stream::new(train.clone(), 3, seed, 450, 128, 3);
        let mut b = Array2::<f32>::zeros((100, 3));
        s.next_batch(&ds, &mut b).unwrap();
        b
    };
    assert_eq!(draw(5), draw(5));
    assert_ne!(draw(5), draw(6));
}

#[test]
fn sources_line_up_row_by_row() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    for i in 0..3 {
        let x = ids(i * 100, 100, 4);
        write_npy(&a.join(format!("{i}.npy")), &x, Dtype::F32);
        write_npy(
            &b.join(format!("{i}.npy")),
            &x.mapv(|v| -v).slice(ndarray::s![.., ..2]).to_owned(),
            Dtype::F16,
        );
    }
    let ds = Dataset::open(
        std::slice::from_ref(&a),
        std::slice::from_ref(&b),
        None,
        None,
    )
    .unwrap();
    assert_eq!(ds.row_width, 6);
    let (train, _) = ds.split(0);
    let mut s = Stream::new(train, 6, 1, 300, 64, 2);
    let mut batch = Array2::<f32>::zeros((300, 6));
    s.next_batch(&ds, &mut batch).unwrap();
    for row in batch.rows() {
        assert_eq!(row[4], -row[0]);
        assert_eq!(row[5], -row[3]);
    }
    // A target with a shard of another length is refused, naming both files.
    write_npy(&b.join("2.npy"), &ids(0, 99, 2), Dtype::F32);
    let e = Dataset::open(&[a], &[b], None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("99 rows") && e.contains("line up"), "{e}");
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let open = |path: &std::path::Path| {
        Dataset::open(&[path.to_path_buf()], &[], None, None)
            .and_then(|ds| {
                let mut out = vec![0f32; ds.shard_rows[0] as usize * ds.row_width];
                ds.read(0, 0, ds.shard_rows[0] as usize, &mut out)
                    .map(|_| ds)
            })
            .unwrap_err()
            .to_string()
    };
    // NaN in a row: the file and the row.
    let mut x = ids(0, 10, 3);
    x[[7, 1]] = f32::NAN;
    write_npy(&p.join("nan.npy"), &x, Dtype::F32);
    let e = open(&p.join("nan.npy"));
    assert!(e.contains("nan.npy") && e.contains("row 7"), "{e}");
    // Truncated.
    let bytes = npy_bytes("<f4", &[100, 3], &[0u8; 40]);
    std::fs::write(p.join("short.npy"), bytes).unwrap();
    let e = open(&p.join("short.npy"));
    assert!(e.contains("short.npy") && e.contains("truncated"), "{e}");
    // Integer dtype.
    std::fs::write(p.join("int.npy"), npy_bytes("<i4", &[2, 2], &[0u8; 16])).unwrap();
    let e = open(&p.join("int.npy"));
    assert!(e.contains("<i4"), "{e}");
    // Fortran order.
    let mut f = npy_bytes("<f4", &[2, 2], &[0u8; 16]);
    let at = f.windows(5).position(|w| w == b"False").unwrap();
    f[at..at + 5].copy_from_slice(b"True ");
    std::fs::write(p.join("fortran.npy"), f).unwrap();
    assert!(open(&p.join("fortran.npy")).contains("Fortran"));
    // One dimension.
    std::fs::write(p.join("flat.npy"), npy_bytes("<f4", &[4], &[0u8; 16])).unwrap();
    assert!(open(&p.join("flat.npy")).contains("[tokens, d]"));
    // Two tensors and no --tensor.
    let y = ids(0, 4, 2);
    write_safetensors(
        &p.join("two.safetensors"),
        &[("a", &y), ("b", &y)],
        Dtype::F32,
    );
    let e = open(&p.join("two.safetensors"));
    assert!(e.contains("a, b") && e.contains("--tensor"), "{e}");
    // Not a file at all; a folder without shards; shards of different widths.
    assert!(open(&p.join("missing")).contains("does not exist"));
    let empty = p.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(open(&empty).contains("no .npy or .safetensors"));
    let mixed = p.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    write_npy(&mixed.join("a.npy"), &ids(0, 4, 3), Dtype::F32);
    write_npy(&mixed.join("b.npy"), &ids(0, 4, 5), Dtype::F32);
    let e = open(&mixed);
    assert!(e.contains("b.npy") && e.contains("rows of 5"), "{e}");

    // Through `train`: a NaN in a shard stops the run with the file and row named.
    let mut cfg = TrainConfig::new(
        vec![p.join("nan.npy")],
        Kind::Sae,
        Activation::Relu,
        8,
        p.join("out.onnx"),
    );
    cfg.batch = 4;
    cfg.eval_tokens = Some(1);
    let e = train::train(&cfg, &Control::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("nan.npy") && e.contains("row 7"), "{e}");
    assert!(!p.join("out.onnx").exists());
}
