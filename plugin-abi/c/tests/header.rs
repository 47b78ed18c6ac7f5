//! The committed `include/tiller.h` is exactly what cbindgen generates from the source with the
//! committed `cbindgen.toml`. Set `TILLER_UPDATE_HEADER=1` to rewrite it after changing the ABI.

#[test]
fn committed_header_matches_the_source() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let path = dir.join("include").join("tiller.h");
    if std::env::var_os("TILLER_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("write the header");
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "plugin-abi/c/include/tiller.h is out of date: run `TILLER_UPDATE_HEADER=1 cargo test -p tiller-capi --test header` and commit it"
    );
}
