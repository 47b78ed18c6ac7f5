//! Runs `benches/compare --quick` end to end (release build, the dictionary, Rust, C and Python,
//! the report): minutes, so ignored by default. `cargo test -p tiller-benches --test compare --
//! --ignored --nocapture`.

use std::process::Command;

#[test]
#[ignore = "builds in release and runs every benchmark: run it with --ignored"]
fn compare_quick() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(root.join("benches/compare"))
        .arg("--quick")
        .current_dir(&root)
        .status()
        .expect("benches/compare runs");
    assert!(status.success(), "benches/compare --quick failed: {status}");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |t| root.join(t));
    let report = target.join("bench-report");
    let md = std::fs::read_to_string(report.join("compare.md")).expect("compare.md");
    for needle in [
        "Tiller, Rust API",
        "Tiller, C ABI",
        "Tiller, Python binding",
        "ONNX Runtime, Python API",
        "NumPy",
        "STREAM copy",
        "## Targets",
    ] {
        assert!(md.contains(needle), "compare.md lacks `{needle}`:\n{md}");
    }
    assert!(report.join("compare.png").is_file());
}
