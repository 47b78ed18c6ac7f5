//! Checkpoints: everything a run needs to go on exactly as if it had never stopped.
//!
//! One safetensors file per checkpoint, `step-<N>.safetensors` in the checkpoint folder: the
//! parameters, Adam's moments, each feature's last activation, and the rows waiting in the shuffle
//! buffer, with the rest of the state (step, counters, stream position, normalisation, the
//! configuration's fingerprint) as JSON under the `tiller.train` metadata key. Files are written
//! to a temporary name and renamed, so a crash mid-write never leaves a broken latest checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::model::{PARAM_NAMES, Params};
use super::optim::Adam;
use super::report::Point;
use crate::{Error, Result};

/// The metadata key holding [`State`].
pub const STATE_KEY: &str = "tiller.train";

/// The small part of a checkpoint, stored as JSON. Floats that must come back bit for bit are
/// stored as their bits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Steps done.
    pub step: u64,
    /// Tokens trained on.
    pub tokens: u64,
    /// Adam's step count.
    pub adam_t: u64,
    /// BatchTopK: the threshold's running average (bits of an f64) and its number of samples.
    pub threshold_ema: (u64, u64),
    /// Normalisation: mode, input and target factors (bits of f32s).
    pub norm: (String, u32, u32),
    /// Stream: epoch, next segment, open segments, random counter.
    pub stream: (u64, usize, Vec<(usize, u64)>, u64),
    /// Progress recorded so far.
    pub history: Vec<Point>,
    /// The settings that must not change across a resume.
    pub fingerprint: BTreeMap<String, String>,
    /// Seconds trained before this checkpoint.
    pub seconds: f64,
}

/// A checkpoint read back.
#[derive(Debug)]
pub struct Loaded {
    /// Its path.
    pub path: PathBuf,
    /// The JSON part.
    pub state: State,
    tensors: HashMap<String, (Vec<usize>, Vec<u8>, Dtype)>,
}

impl Loaded {
    fn take_raw(&mut self, name: &str, shape: &[usize], dtype: Dtype) -> Result<Vec<u8>> {
        let elems: usize = shape.iter().product();
        if elems == 0 {
            return Ok(Vec::new());
        }
        let Some((have, bytes, dt)) = self.tensors.remove(name) else {
            return Err(Error::format(
                &self.path,
                format!("tensor `{name}` is missing: not a checkpoint of this run"),
            ));
        };
        if have != shape || dt != dtype {
            return Err(Error::format(
                &self.path,
                format!("tensor `{name}` is {dt:?} {have:?}; this run needs {dtype:?} {shape:?}"),
            ));
        }
        Ok(bytes)
    }

    /// Takes a float32 tensor of the given shape.
    pub fn take_f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self
            .take_raw(name, shape, Dtype::F32)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// Takes a u64 tensor of the given shape.
    pub fn take_u64(&mut self, name: &str, shape: &[usize]) -> Result<Vec<u64>> {
        Ok(self
            .take_raw(name, shape, Dtype::U64)?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect())
    }

    /// Fills `p`'s tensors (already of the right shapes) from those saved under `prefix`.
    pub fn fill_params(&mut self, prefix: &str, p: &mut Params<f32>) -> Result<()> {
        let shapes = param_shapes(p);
        for ((name, shape), t) in PARAM_NAMES.iter().zip(shapes).zip(p.tensors_mut()) {
            let v = self.take_f32(&format!("{prefix}{name}"), &shape)?;
            if !v.is_empty() {
                t.copy_from_slice(&v);
            }
        }
        Ok(())
    }

    /// The shuffle buffer's rows, `width` floats each.
    pub fn take_buffer(&mut self, width: usize) -> Result<Vec<f32>> {
        let rows = self
            .tensors
            .get("buffer")
            .map(|(s, _, _)| s.first().copied().unwrap_or(0))
            .unwrap_or(0);
        self.take_f32("buffer", &[rows, width])
    }
}

fn param_shapes(p: &Params<f32>) -> [Vec<usize>; 6] {
    [
        p.w_enc_t.shape().to_vec(),
        p.b_enc.shape().to_vec(),
        p.w_dec.shape().to_vec(),
        p.b_dec.shape().to_vec(),
        p.log_threshold.shape().to_vec(),
        p.w_skip.shape().to_vec(),
    ]
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// What [`save`] writes.
#[derive(Debug)]
pub struct Snapshot<'a> {
    /// The JSON part.
    pub state: &'a State,
    /// The parameters.
    pub params: &'a Params<f32>,
    /// The optimiser.
    pub adam: &'a Adam<f32>,
    /// Each feature's last activation (tokens seen then).
    pub last_active: &'a [u64],
    /// The shuffle buffer, `[rows, width]`.
    pub buffer: &'a [f32],
    /// Floats per buffered row.
    pub width: usize,
}

/// The file name of the checkpoint after `step` steps.
pub fn file_name(step: u64) -> String {
    format!("step-{step:012}.safetensors")
}

/// Writes a checkpoint into `dir` and removes all but the `keep` newest. Returns its path.
pub fn save(dir: &Path, keep: usize, s: &Snapshot<'_>) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(file_name(s.state.step));
    let mut data: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = Vec::new();
    for (prefix, p) in [
        ("", s.params),
        ("adam_m.", &s.adam.m),
        ("adam_v.", &s.adam.v),
    ] {
        for ((name, shape), t) in PARAM_NAMES.iter().zip(param_shapes(p)).zip(p.tensors()) {
            if !t.is_empty() {
                data.push((format!("{prefix}{name}"), shape, f32_bytes(t), Dtype::F32));
            }
        }
    }
    data.push((
        "last_active".into(),
        vec![s.last_active.len()],
        s.last_active.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::U64,
    ));
    let rows = s.buffer.len() / s.width.max(1);
    if rows > 0 {
        data.push((
            "buffer".into(),
            vec![rows, s.width],
            f32_bytes(s.buffer),
            Dtype::F32,
        ));
    }
    let views = data
        .iter()
        .map(|(n, shape, b, dt)| {
            TensorView::new(*dt, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::format(&path, format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let json = serde_json::to_string(s.state)
        .map_err(|e| Error::format(&path, format!("cannot encode the state: {e}")))?;
    let meta = HashMap::from([(STATE_KEY.to_string(), json)]);
    let tmp = dir.join(format!("{}.tmp", file_name(s.state.step)));
    safetensors::serialize_to_file(views, Some(meta), &tmp)
        .map_err(|e| Error::format(&tmp, format!("cannot write the checkpoint: {e}")))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    let all = list(dir)?;
    if all.len() > keep.max(1) {
        for (_, old) in &all[..all.len() - keep.max(1)] {
            std::fs::remove_file(old).map_err(|e| Error::io(old, e))?;
        }
    }
    Ok(path)
}

/// The checkpoints in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            let step = name
                .strip_prefix("step-")?
                .strip_suffix(".safetensors")?
                .parse()
                .ok()?;
            Some((step, p))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The newest checkpoint in `dir`, if any.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(dir)?.pop().map(|(_, p)| p))
}

/// Reads a checkpoint.
pub fn load(path: &Path) -> Result<Loaded> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::format(path, m);
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a valid checkpoint: {e}")))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| {
            bad(format!(
                "metadata `{STATE_KEY}` is missing: not a Tiller training checkpoint"
            ))
        })?;
    let state: State =
        serde_json::from_str(json).map_err(|e| bad(format!("metadata `{STATE_KEY}`: {e}")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a valid checkpoint: {e}")))?;
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec(), v.dtype())))
        .collect();
    Ok(Loaded {
        path: path.to_path_buf(),
        state,
        tensors,
    })
}
