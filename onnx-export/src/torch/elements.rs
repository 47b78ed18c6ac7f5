//! Reading a tensor's elements from its storage: strides, byte orders, conversion.

use super::dtype::*;

/// Bytes read from a member at a time.
pub(super) const CHUNK: usize = 1 << 20;

/// The axes of a view ordered as they lie in its storage, outer to inner, when the view covers
/// consecutive elements each exactly once (contiguous, or a permutation of a contiguous tensor);
/// axes of length 1 are left out.
pub(super) fn dense_axes(shape: &[usize], stride: &[u64]) -> Option<Vec<usize>> {
    let mut axes: Vec<usize> = (0..shape.len()).filter(|&a| shape[a] > 1).collect();
    axes.sort_by_key(|&a| std::cmp::Reverse(stride[a]));
    let mut want = 1u64;
    for &a in axes.iter().rev() {
        if stride[a] != want {
            return None;
        }
        want = want.checked_mul(shape[a] as u64)?;
    }
    Some(axes)
}

/// Counts through a box of `(length, step)` axes, inner axis fastest, yielding `start` plus the
/// steps taken: the place of each element in the order it is visited.
pub(super) struct Odometer {
    pub(super) axes: Vec<(usize, usize)>,
    pub(super) counter: Vec<usize>,
    pub(super) at: usize,
}

impl Odometer {
    pub(super) fn new(axes: impl Iterator<Item = (usize, usize)>, start: usize) -> Self {
        let axes: Vec<(usize, usize)> = axes.collect();
        Self {
            counter: vec![0; axes.len()],
            axes,
            at: start,
        }
    }

    pub(super) fn next(&mut self) -> usize {
        let here = self.at;
        for k in (0..self.axes.len()).rev() {
            let (len, step) = self.axes[k];
            self.counter[k] += 1;
            self.at += step;
            if self.counter[k] < len {
                return here;
            }
            self.at -= len * step;
            self.counter[k] = 0;
        }
        here
    }
}

/// Decodes one element of a storage.
#[derive(Clone, Copy)]
pub(super) enum Decoder {
    Float(fn(&[u8]) -> f32),
    Int(fn(&[u8]) -> i64),
}

pub(super) fn bytes<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

pub(super) fn decoder(dtype: Dtype, order: ByteOrder) -> Decoder {
    use ByteOrder::{Big, Little};
    match (dtype, order) {
        (Dtype::F32, Little) => Decoder::Float(|b| f32::from_le_bytes(bytes(b))),
        (Dtype::F32, Big) => Decoder::Float(|b| f32::from_be_bytes(bytes(b))),
        (Dtype::F64, Little) => Decoder::Float(|b| f64::from_le_bytes(bytes(b)) as f32),
        (Dtype::F64, Big) => Decoder::Float(|b| f64::from_be_bytes(bytes(b)) as f32),
        (Dtype::F16, Little) => {
            Decoder::Float(|b| half::f16::from_bits(u16::from_le_bytes(bytes(b))).to_f32())
        }
        (Dtype::F16, Big) => {
            Decoder::Float(|b| half::f16::from_bits(u16::from_be_bytes(bytes(b))).to_f32())
        }
        (Dtype::BF16, Little) => {
            Decoder::Float(|b| half::bf16::from_bits(u16::from_le_bytes(bytes(b))).to_f32())
        }
        (Dtype::BF16, Big) => {
            Decoder::Float(|b| half::bf16::from_bits(u16::from_be_bytes(bytes(b))).to_f32())
        }
        (Dtype::I64, Little) => Decoder::Int(|b| i64::from_le_bytes(bytes(b))),
        (Dtype::I64, Big) => Decoder::Int(|b| i64::from_be_bytes(bytes(b))),
        (Dtype::I32, Little) => Decoder::Int(|b| i64::from(i32::from_le_bytes(bytes(b)))),
        (Dtype::I32, Big) => Decoder::Int(|b| i64::from(i32::from_be_bytes(bytes(b)))),
        (Dtype::I16, Little) => Decoder::Int(|b| i64::from(i16::from_le_bytes(bytes(b)))),
        (Dtype::I16, Big) => Decoder::Int(|b| i64::from(i16::from_be_bytes(bytes(b)))),
        (Dtype::I8, _) => Decoder::Int(|b| i64::from(i8::from_le_bytes(bytes(b)))),
        (Dtype::U8 | Dtype::Bool, _) => Decoder::Int(|b| i64::from(b[0])),
    }
}

/// A tensor's elements, row-major.
pub(super) enum Elements {
    Float(Vec<f32>),
    Int(Vec<i64>),
}

impl Elements {
    pub(super) fn zeros(d: Decoder, n: usize) -> Self {
        match d {
            Decoder::Float(_) => Self::Float(vec![0.0; n]),
            Decoder::Int(_) => Self::Int(vec![0; n]),
        }
    }

    pub(super) fn set(&mut self, d: Decoder, i: usize, b: &[u8]) {
        match (self, d) {
            (Self::Float(v), Decoder::Float(f)) => {
                if let Some(slot) = v.get_mut(i) {
                    *slot = f(b);
                }
            }
            (Self::Int(v), Decoder::Int(f)) => {
                if let Some(slot) = v.get_mut(i) {
                    *slot = f(b);
                }
            }
            _ => {}
        }
    }
}
