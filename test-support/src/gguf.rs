//! GGUF control vectors, as llama.cpp and repeng lay them out.

use std::path::Path;

/// Writes a GGUF v3 control vector with float32 `direction.{layer}` tensors, and the
/// `controlvector.model_hint` key when `model_hint` is given.
pub fn write_gguf(path: &Path, model_hint: Option<&str>, directions: &[(usize, Vec<f32>)]) {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, v: &str| {
        b.extend_from_slice(&(v.len() as u64).to_le_bytes());
        b.extend_from_slice(v.as_bytes());
    };
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(directions.len() as u64).to_le_bytes());
    b.extend_from_slice(&(1 + u64::from(model_hint.is_some())).to_le_bytes());
    s(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes());
    s(&mut b, "controlvector");
    if let Some(hint) = model_hint {
        s(&mut b, "controlvector.model_hint");
        b.extend_from_slice(&8u32.to_le_bytes());
        s(&mut b, hint);
    }
    let mut offset = 0u64;
    for (layer, v) in directions {
        s(&mut b, &format!("direction.{layer}"));
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&(v.len() as u64).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        offset += (v.len() as u64 * 4).div_ceil(32) * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for (_, v) in directions {
        let start = b.len();
        b.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        while (b.len() - start) % 32 != 0 {
            b.push(0);
        }
    }
    std::fs::write(path, b).unwrap();
}
