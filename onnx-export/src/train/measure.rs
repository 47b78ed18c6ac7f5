//! Reading the data to set a run up (normalisation factors, the decoder bias's start) and to
//! evaluate the dictionary on held-out rows.

use super::config::{BDecInit, TrainConfig};
use super::trainer::Trainer;
use std::path::Path;

use ndarray::{Array2, s};

use super::data::{self, Dataset, Norm, Normalize, Stream};
use super::model::{self, Arch, Batch, Coeffs, StepOptions, Workspace};
use super::report;
use super::report::Eval;
use crate::{Error, Result};

pub(super) const READ_CHUNK: usize = 1024;

pub(super) const OPEN_SHARDS: usize = 4;

pub(super) const INIT_ROWS: usize = 8192;

/// The normalisation and `b_dec` measured on a sample of training rows.
pub(super) fn measure(
    cfg: &TrainConfig,
    arch: &Arch,
    ds: &Dataset,
    segments: &[data::Segment],
) -> Result<(Norm, Vec<f32>)> {
    let total: u64 = segments.iter().map(|s| s.end - s.start).sum();
    let n = (INIT_ROWS as u64).min(total) as usize;
    let mut stream = Stream::new(
        segments.to_vec(),
        ds.row_width,
        data::mix(cfg.seed, 0x5a3b1e, 0),
        n,
        READ_CHUNK,
        OPEN_SHARDS * 4,
    );
    let mut rows = Array2::<f32>::zeros((n, ds.row_width));
    stream.next_batch(ds, &mut rows)?;
    let wi = arch.width_in();
    let mut norm = Norm {
        mode: cfg.normalize,
        s_in: 1.0,
        s_out: 1.0,
    };
    if cfg.normalize == Normalize::Scale {
        let m_in = data::mean_norm(&rows, 0..wi, arch.d_in);
        if m_in > 0.0 {
            norm.s_in = ((arch.d_in as f64).sqrt() / m_in) as f32;
        }
        if ds.row_width > wi {
            let m_out = data::mean_norm(&rows, wi..ds.row_width, arch.d_out);
            if m_out > 0.0 {
                norm.s_out = ((arch.d_out as f64).sqrt() / m_out) as f32;
            }
        }
    }
    norm.apply(&mut rows, wi, arch.in_blocks());
    let targets = if ds.row_width > wi {
        rows.slice(s![.., wi..]).to_owned()
    } else {
        rows.slice(s![.., ..wi]).to_owned()
    };
    let wo = targets.ncols();
    let d = arch.d_out;
    let mut b_dec = vec![0f32; wo];
    for b in 0..wo / d.max(1) {
        let block = targets.slice(s![.., b * d..(b + 1) * d]).mapv(f64::from);
        let v = match cfg.b_dec_init {
            BDecInit::Zeros => vec![0.0; d],
            BDecInit::Mean => block
                .mean_axis(ndarray::Axis(0))
                .map(|a| a.to_vec())
                .unwrap_or_else(|| vec![0.0; d]),
            BDecInit::Median => data::geometric_median(&block),
        };
        for (o, x) in b_dec[b * d..(b + 1) * d].iter_mut().zip(v) {
            *o = x as f32;
        }
    }
    Ok((norm, b_dec))
}

pub(super) fn norm_from(path: &Path, s: &(String, u32, u32)) -> Result<Norm> {
    Ok(Norm {
        mode: s
            .0
            .parse()
            .map_err(|e: String| Error::format(path, format!("normalisation: {e}")))?,
        s_in: f32::from_bits(s.1),
        s_out: f32::from_bits(s.2),
    })
}

/// The evaluation on the held-out rows, with the dictionary as exported.
pub(super) fn evaluate(
    trainer: &Trainer,
    ds: &Dataset,
    segments: &[data::Segment],
    norm: &Norm,
    batch: usize,
) -> Result<Option<Eval>> {
    if segments.is_empty() {
        return Ok(None);
    }
    let arch = &trainer.arch;
    let wi = arch.width_in();
    let mut ws = Workspace::<f32>::new(arch);
    ws.sparse_below = trainer.ws.sparse_below;
    let coeffs = Coeffs {
        sparsity: 0.0,
        aux: 0.0,
        bandwidth: trainer.hyper.bandwidth,
    };
    let threshold = trainer.batch_threshold();
    let mut count = vec![0u64; arch.d_sae];
    let (mut n, mut sq_err, mut nnz) = (0u64, 0.0f64, 0u64);
    let wo = arch.width_out();
    let mut ysum = vec![0.0f64; wo];
    let mut ysq = 0.0f64;
    data::for_each_block(ds, segments, batch, |block| {
        let mut block = block.clone();
        norm.apply(&mut block, wi, arch.in_blocks());
        let x = block.slice(s![.., ..wi]);
        let y = (ds.row_width > wi).then(|| block.slice(s![.., wi..]));
        let st = model::step(
            arch,
            &trainer.params,
            &mut ws,
            Batch { x, y },
            &coeffs,
            StepOptions {
                infer_threshold: threshold,
                ..StepOptions::default()
            },
            None,
        );
        sq_err += st.sq_err;
        for &j in &ws.acts.idx {
            count[j as usize] += 1;
        }
        nnz += ws.acts.idx.len() as u64;
        n += block.nrows() as u64;
        for row in y.unwrap_or(x).rows() {
            for (s, &v) in ysum.iter_mut().zip(row.iter()) {
                *s += f64::from(v);
                ysq += f64::from(v) * f64::from(v);
            }
        }
        Ok(())
    })?;
    let nf = n.max(1) as f64;
    let sq_total = ysq - ysum.iter().map(|s| s * s).sum::<f64>() / nf;
    let m = arch.d_sae as f64;
    Ok(Some(Eval {
        tokens: n,
        fvu: if sq_total > 0.0 {
            sq_err / sq_total
        } else {
            0.0
        },
        mse: sq_err / nf,
        l0: nnz as f64 / nf,
        dead_fraction: count.iter().filter(|&&c| c == 0).count() as f64 / m,
        dense_fraction: count
            .iter()
            .filter(|&&c| c as f64 > report::DENSE_ABOVE * nf)
            .count() as f64
            / m,
    }))
}
