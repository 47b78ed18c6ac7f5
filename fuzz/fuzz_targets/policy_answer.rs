//! The decoder of a WASM policy's answer: `(ptr << 32) | count` action records in guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first 8 bytes are the answer, the rest the guest's memory; features below 1000 exist.
    let Some((answer, memory)) = data.split_first_chunk::<8>() else {
        return;
    };
    let answer = i64::from_le_bytes(*answer);
    let exists = |f: u32| f < 1000;
    if let Ok(actions) = tiller_runtime::policy::parse_answer(memory, answer, &exists) {
        assert!(actions.len() <= tiller_runtime::policy::MAX_ACTIONS);
    }
});
