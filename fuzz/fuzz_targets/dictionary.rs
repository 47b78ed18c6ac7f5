//! The dictionary reader: ONNX protobuf bytes, the metadata in them, and the weights they describe.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    // A folder that holds nothing: external data that resolves is refused or missing, never read
    // from elsewhere.
    let path = Path::new("/nonexistent/tiller-fuzz/dict.onnx");
    if let Ok(d) = tiller_runtime::DictionaryFile::from_bytes(path, data) {
        let _ = d.weight_dtype();
        let _ = d.b_dec_on_input();
        let _ = d.weights();
    }
});
