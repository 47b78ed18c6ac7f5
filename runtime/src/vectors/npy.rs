//! Steering directions saved by NumPy: one `[d]` or several `[n, d]`, read through the project's
//! one `.npy` reader ([`crate::npy`]).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use ndarray::Array2;

use crate::npy::{self, NpyError, describe_non_finite};
use crate::{Error, Result};

/// Reads `path`, a `.npy` holding one direction `[d]` (returned as `[1, d]`) or several `[n, d]`,
/// float16, float32 or float64, either byte order, C order. Values must be finite.
pub fn read_npy_vectors(path: &Path) -> Result<Array2<f32>> {
    let err = |message: String| Error::invalid(format!("vector file {}", path.display()), message);
    let lift = |e: NpyError| match e {
        NpyError::Io(e) => Error::io(path, e),
        NpyError::Format(m) => err(m),
    };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = BufReader::new(file);
    let header = npy::read_header(&mut reader, size).map_err(lift)?;
    let float = header.float().map_err(lift)?;
    let shape = &header.shape;
    if header.fortran_order {
        return Err(err(
            "the array is in Fortran order; only C order is supported \
             (save np.ascontiguousarray(a))"
                .to_string(),
        ));
    }
    let (rows, cols) = match shape[..] {
        [d] => (1, d),
        [n, d] => (n, d),
        _ => {
            return Err(err(format!(
                "shape {shape:?}: want one direction [d] or several [n, d]"
            )));
        }
    };
    if rows == 0 || cols == 0 {
        return Err(err(format!("shape {shape:?} holds no values")));
    }
    header.check_data_len(float, size).map_err(lift)?;
    // Bounded by the file size just checked.
    let (rows, cols) = (rows as usize, cols as usize);
    let mut row = vec![0u8; cols * float.size];
    let mut values = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        reader
            .read_exact(&mut row)
            .map_err(|e| Error::io(path, e))?;
        if let Some((c, v)) = float.decode_f32(&row, &mut values) {
            return Err(err(format!(
                "row {r}: element {c} is {}",
                describe_non_finite(v)
            )));
        }
    }
    Array2::from_shape_vec((rows, cols), values).map_err(|e| err(format!("shape {shape:?}: {e}")))
}
