//! The `.npz` (and, through its members, `.npy`) reader of `tiller-export`.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the reader: a bare `.npy` or a `.npz` archive.
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        let path = common::scratch_file("in.npy", rest);
        let _ = tiller_export::npy::read_f32_dyn(&path);
        let _ = tiller_export::npy::read_activations(&path, 4);
    } else {
        let path = common::scratch_file("in.npz", rest);
        if let Ok(names) = tiller_export::npy::npz_names(&path) {
            for n in names.iter().take(16) {
                let _ = tiller_export::npy::read_npz_f32(&path, n);
            }
        }
    }
});
