//! The safetensors reader of `tiller-export`: header, offsets, and every tensor widened to f32.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use tiller_export::tensors::Tensors;

fuzz_target!(|data: &[u8]| {
    let path = common::scratch_file("in.safetensors", data);
    if let Ok(mut f) = tiller_export::tensors::TensorFile::open(&path) {
        let names: Vec<String> = f.names().into_iter().map(str::to_owned).collect();
        for n in names {
            let _ = f.take_any(&n);
        }
    }
});
