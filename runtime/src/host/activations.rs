//! The activations a host hands to a hook, in its own element type.

/// Activations handed to a hook, `[n_tokens, width]` row-major, edited in place.
#[derive(Debug)]
pub enum ActivationsMut<'a> {
    /// float32.
    F32(&'a mut [f32]),
    /// float16.
    F16(&'a mut [half::f16]),
    /// bfloat16.
    Bf16(&'a mut [half::bf16]),
}

impl ActivationsMut<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            Self::F32(a) => a.len(),
            Self::F16(a) => a.len(),
            Self::Bf16(a) => a.len(),
        }
    }

    pub(super) fn read_into(&self, out: &mut [f32]) {
        match self {
            Self::F32(a) => out.copy_from_slice(a),
            Self::F16(a) => out
                .iter_mut()
                .zip(a.iter())
                .for_each(|(o, v)| *o = v.to_f32()),
            Self::Bf16(a) => out
                .iter_mut()
                .zip(a.iter())
                .for_each(|(o, v)| *o = v.to_f32()),
        }
    }

    pub(super) fn write_row(&mut self, start: usize, row: &[f32]) {
        let end = start + row.len();
        match self {
            Self::F32(a) => a[start..end].copy_from_slice(row),
            Self::F16(a) => a[start..end]
                .iter_mut()
                .zip(row)
                .for_each(|(o, v)| *o = half::f16::from_f32(*v)),
            Self::Bf16(a) => a[start..end]
                .iter_mut()
                .zip(row)
                .for_each(|(o, v)| *o = half::bf16::from_f32(*v)),
        }
    }
}
