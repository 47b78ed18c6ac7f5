//! The TOML config: parsed and checked (paths in it resolve under a folder that holds nothing).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = tiller_runtime::config::Config::parse(text, Some(Path::new("/nonexistent/tiller-fuzz/c.toml")));
});
