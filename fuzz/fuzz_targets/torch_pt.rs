//! The restricted unpickler of PyTorch `.pt` checkpoints (zip archive + pickle + storages).
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::scratch_file("in.pt", data);
    if let Ok(mut c) = tiller_export::torch::load(&path) {
        let names: Vec<String> = c.names().into_iter().map(str::to_owned).collect();
        for n in names.iter().take(16) {
            let _ = c.info(n);
            let _ = c.take_any(n);
        }
    }
});
