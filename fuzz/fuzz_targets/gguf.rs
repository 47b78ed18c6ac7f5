//! GGUF control vectors (llama.cpp / repeng), and `.npy` direction files, as the runtime reads them.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::scratch_file("in.gguf", data);
    let _ = tiller_runtime::vectors::read_gguf_control_vector(&path);
    if data.starts_with(b"\x93NUMPY") {
        let path = common::scratch_file("in.npy", data);
        let _ = tiller_runtime::vectors::read_npy_vectors(&path);
    }
});
