//! A full encode (every feature) of a d_in 2304 × 16384-feature ReLU SAE, one thread, at batch 1,
//! 8 and 64, with `W_enc` stored as f32, f16 and bf16: the native path (`SessionOptions::native`,
//! `Dictionary::encode_into`) beside ONNX Runtime on the same f32 file. At batch 1 the encode
//! streams the weights (151 MB in f32) from memory once, so its yardstick is the memory bandwidth,
//! measured in the same run (STREAM's copy, and a plain read); at batch 64 it is the dense
//! product's FLOP rate. After criterion's own report, a table (each figure the best of three
//! medians, the bandwidth measured between them): time, per-token time, weight bytes read per
//! second and its fraction of the copy bandwidth, speed-up over f32.

use std::path::Path;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ndarray::Array2;
use tiller_benches::machine;
use tiller_runtime::dictionary::{WeightDtype, write_dictionary_as};
use tiller_runtime::{Activation, Backend, Dictionary, DictionaryFile, SessionOptions};

const D: usize = 2304;
const F: usize = 16384;
const BATCHES: [usize; 3] = [1, 8, 64];

fn native() -> SessionOptions {
    SessionOptions {
        native: true,
        ..SessionOptions::default()
    }
}

/// The random SAE stored as each dtype: `<dtype>.onnx` in `dir`, the f32 one written by the
/// shared helper and the others from its weights.
fn write_dicts(dir: &Path) -> Vec<(WeightDtype, std::path::PathBuf)> {
    let f32_path =
        tiller_benches::write_random_sae(dir, Activation::Relu, D, F, 11).expect("f32 dictionary");
    let file = DictionaryFile::open(&f32_path).expect("open");
    let weights = file.weights().expect("weights");
    let mut out = vec![(WeightDtype::F32, f32_path)];
    for dtype in [WeightDtype::F16, WeightDtype::Bf16] {
        let path = dir.join(format!("{dtype}.onnx"));
        write_dictionary_as(file.meta(), &weights, &path, dtype).expect("half dictionary");
        out.push((dtype, path));
    }
    out
}

/// The median of `runs` timed calls of `f`, in seconds.
fn median(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn bench_full_encode(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let paths = write_dicts(dir.path());
    let dicts: Vec<(WeightDtype, Dictionary)> = paths
        .iter()
        .map(|(dtype, p)| {
            let d = Dictionary::load(p, &native()).expect("load");
            assert_eq!(
                d.backend(),
                Backend::Native(*dtype),
                "the native path applies"
            );
            (*dtype, d)
        })
        .collect();
    let ort = Dictionary::load(&paths[0].1, &SessionOptions::default()).expect("load (ORT)");

    let mut group = c.benchmark_group("full_encode_2304x16k");
    for &batch in &BATCHES {
        let x = tiller_benches::random_activations(batch, D, 5);
        let mut acts = Array2::<f32>::zeros((batch, F));
        group.throughput(Throughput::Elements(batch as u64));
        for (dtype, dict) in &dicts {
            group.bench_with_input(BenchmarkId::new(dtype.as_str(), batch), &x, |b, x| {
                b.iter(|| dict.encode_into(x.view(), acts.view_mut()).expect("encode"))
            });
        }
        group.bench_with_input(BenchmarkId::new("ort_f32", batch), &x, |b, x| {
            b.iter(|| ort.encode(x.view()).expect("encode"))
        });
    }
    group.finish();

    // The table. Other work on the machine only ever slows a measurement down, so each figure
    // is the best of `ROUNDS` medians, the bandwidth included (measured between the rounds).
    const ROUNDS: usize = 3;
    let mut copy = 0f64;
    let mut read = 0f64;
    let mut best: Vec<Vec<f64>> = vec![vec![f64::INFINITY; dicts.len() + 1]; BATCHES.len()];
    for _ in 0..ROUNDS {
        copy = copy.max(machine::stream_copy_gbps(5));
        read = read.max(machine::stream_read_gbps(5));
        for (bi, &batch) in BATCHES.iter().enumerate() {
            let x = tiller_benches::random_activations(batch, D, 5);
            let mut acts = Array2::<f32>::zeros((batch, F));
            let runs = if batch == 64 { 9 } else { 21 };
            for (di, (_, dict)) in dicts.iter().enumerate() {
                let t = median(runs, || {
                    dict.encode_into(x.view(), acts.view_mut()).expect("encode")
                });
                best[bi][di] = best[bi][di].min(t);
            }
            let t = median(runs.min(9), || {
                ort.encode(x.view()).expect("encode");
            });
            best[bi][dicts.len()] = best[bi][dicts.len()].min(t);
        }
    }
    let gflops = machine::dense_gflops(1024, 5);
    println!();
    println!(
        "one thread: STREAM copy {copy:.1} GB/s, read {read:.1} GB/s; dense f32 GEMM {gflops:.1} GFLOP/s"
    );
    println!(
        "| batch | weights | time per call | per token | weights read | of copy bandwidth | GFLOP/s | vs f32 |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (bi, &batch) in BATCHES.iter().enumerate() {
        let names = dicts
            .iter()
            .map(|(dtype, _)| (format!("native {dtype}"), *dtype))
            .chain([("ONNX Runtime f32".to_string(), WeightDtype::F32)]);
        for ((name, dtype), &t) in names.zip(&best[bi]) {
            let gbps = (D * F * dtype.size()) as f64 / t / 1e9;
            let flops = 2.0 * (batch * D * F) as f64 / t / 1e9;
            println!(
                "| {batch} | {name} | {:.3} ms | {:.3} ms | {gbps:.1} GB/s | {:.0}% | {flops:.1} | {:.2}× |",
                t * 1e3,
                t * 1e3 / batch as f64,
                100.0 * gbps / copy,
                best[bi][0] / t
            );
        }
    }
}

criterion_group!(benches, bench_full_encode);
criterion_main!(benches);
