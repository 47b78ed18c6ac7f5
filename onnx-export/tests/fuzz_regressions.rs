//! Inputs found by the fuzz targets in `fuzz/` (see the README's "Fuzzing"), kept so that
//! `cargo test` checks each stays a clear error: the files are the crashing inputs as found.

use std::path::PathBuf;

fn input(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_inputs")
        .join(name)
}

/// A format 2.0 `.npy` whose header length is 0xffffffff: `ndarray-npy` allocated 4 GiB for the
/// header before reading it (found by the `npz` target, an out-of-memory at the 2 GiB limit).
#[test]
fn npy_header_longer_than_the_file_is_refused_before_allocating() {
    let path = input("npy_v2_header_4gib.npy");
    let e = tiller_export::npy::read_f32_dyn(&path).expect_err("must be refused");
    let msg = e.to_string();
    assert!(
        msg.contains("npy_v2_header_4gib.npy")
            && msg.contains("its header is 4294967295 bytes, over the 65536 allowed"),
        "{msg}"
    );
    assert!(tiller_export::npy::read_activations(&path, 4).is_err());
}

/// A `.npz` whose deflated member `W_dec.npy` declares a header of about 2.5 GB: the same
/// allocation, through `NpzReader::by_name` (found by the `npz` target once the above was fixed).
#[test]
fn npz_member_header_longer_than_the_member_is_refused_before_allocating() {
    let path = input("npz_member_header_2gib.npz");
    let names = tiller_export::npy::npz_names(&path).expect("the archive itself is valid");
    assert!(!names.is_empty());
    for n in &names {
        if let Err(e) = tiller_export::npy::read_npz_f32(&path, n) {
            let msg = e.to_string();
            assert!(msg.contains("npz_member_header_2gib.npz"), "{msg}");
        }
    }
    let e = tiller_export::npy::read_npz_f32(&path, "W_dec").expect_err("must be refused");
    let msg = e.to_string();
    assert!(msg.contains("`W_dec`") && msg.contains("allowed"), "{msg}");
}
