//! Dictionary weights and the ONNX graph built from them.

use ndarray::{Array1, Array2};
use onnx_protobuf::{ModelProto, tensor_proto::DataType};

use super::meta::{Activation, InputNorm, Kind, LAYER_NORM_EPS, Meta, WeightDtype};
use crate::graph::{Attr, Dim, EXTERNAL_DATA_THRESHOLD, ExternalSink, GraphBuilder, tensor_f32};
use crate::{Error, Result};

/// The magnitude path of a gated SAE (the gate path uses [`Weights::b_enc`] as its bias).
#[derive(Debug, Clone)]
pub struct Gated {
    /// `r_mag`, `[d_sae]`: the magnitude path's encoder is `W_enc ⊙ exp(r_mag)`.
    pub r_mag: Array1<f32>,
    /// `b_mag`, `[d_sae]`.
    pub b_mag: Array1<f32>,
}

/// A dictionary's weights, in Tiller's layout.
///
/// Crosscoders (and CLTs) flatten their layers: `w_enc` is `[n_layers·d_in, d_sae]` (layer-major, the
/// layout of `x` reshaped to `[batch, n_layers·d_in]`), `w_dec` is `[d_sae, n_layers·d_out]`.
#[derive(Debug, Clone)]
pub struct Weights {
    /// `[n_layers·d_in, d_sae]`.
    pub w_enc: Array2<f32>,
    /// `[d_sae]`; the gate bias `b_gate` of a gated SAE.
    pub b_enc: Array1<f32>,
    /// `[d_sae, n_layers·d_out]`.
    pub w_dec: Array2<f32>,
    /// `[n_layers·d_out]`.
    pub b_dec: Array1<f32>,
    /// JumpReLU: `[d_sae]`; BatchTopK: `[1]`.
    pub threshold: Option<Array1<f32>>,
    /// Gated SAEs' magnitude path.
    pub gated: Option<Gated>,
    /// Skip transcoders: `[d_out, d_in]`, added as `x W_skipᵀ` on the raw input.
    pub w_skip: Option<Array2<f32>>,
    /// An affine skip connection's bias, `[d_out]`.
    pub b_skip: Option<Array1<f32>>,
    /// Whether `b_dec` is subtracted from the (normalised) input before encoding.
    pub apply_b_dec_to_input: bool,
}

impl Weights {
    /// Plain weights: no threshold, gating or skip connection, `b_dec` not subtracted from the input.
    /// Set the other fields on the result where a dictionary has them.
    pub fn new(
        w_enc: Array2<f32>,
        b_enc: Array1<f32>,
        w_dec: Array2<f32>,
        b_dec: Array1<f32>,
    ) -> Self {
        Self {
            w_enc,
            b_enc,
            w_dec,
            b_dec,
            threshold: None,
            gated: None,
            w_skip: None,
            b_skip: None,
            apply_b_dec_to_input: false,
        }
    }

    /// Checks every shape against `meta`, naming the first tensor that disagrees.
    pub fn check(&self, meta: &Meta) -> Result<()> {
        let l = meta.n_layers;
        let (li, lo) = (meta.input_layers(), meta.output_layers());
        let shape2 = |name: &str, a: &Array2<f32>, want: [usize; 2]| -> Result<()> {
            if a.shape() != want {
                return Err(Error::tensor(
                    name,
                    format!("shape {:?}, expected {:?}", a.shape(), want),
                ));
            }
            Ok(())
        };
        let shape1 = |name: &str, a: &Array1<f32>, want: usize| -> Result<()> {
            if a.len() != want {
                return Err(Error::tensor(
                    name,
                    format!("shape [{}], expected [{want}]", a.len()),
                ));
            }
            Ok(())
        };
        shape2("W_enc", &self.w_enc, [li * meta.d_in, meta.d_sae])?;
        shape1(
            if self.gated.is_some() {
                "b_gate"
            } else {
                "b_enc"
            },
            &self.b_enc,
            meta.d_sae,
        )?;
        shape2("W_dec", &self.w_dec, [meta.d_sae, lo * meta.d_out])?;
        shape1("b_dec", &self.b_dec, lo * meta.d_out)?;
        if self.apply_b_dec_to_input && !meta.has_decoder() {
            return Err(Error::invalid(
                "apply_b_dec_to_input",
                "a probe has no b_dec to subtract from its input",
            ));
        }
        if self.apply_b_dec_to_input && (meta.d_in != meta.d_out || li != lo) {
            return Err(Error::invalid(
                "apply_b_dec_to_input",
                format!(
                    "b_dec has width {} but the input has width {}",
                    meta.d_out, meta.d_in
                ),
            ));
        }
        match (meta.activation, &self.threshold) {
            (Activation::JumpRelu, Some(t)) => shape1("threshold", t, meta.d_sae)?,
            (Activation::BatchTopK, Some(t)) => shape1("threshold", t, 1)?,
            (Activation::JumpRelu | Activation::BatchTopK, None) => {
                return Err(Error::tensor(
                    "threshold",
                    format!("a {} dictionary needs it", meta.activation),
                ));
            }
            (_, Some(_)) => {
                return Err(Error::tensor(
                    "threshold",
                    format!("a {} dictionary has none", meta.activation),
                ));
            }
            (_, None) => {}
        }
        match (meta.activation, &self.gated) {
            (Activation::Gated, Some(g)) => {
                shape1("r_mag", &g.r_mag, meta.d_sae)?;
                shape1("b_mag", &g.b_mag, meta.d_sae)?;
            }
            (Activation::Gated, None) => {
                return Err(Error::tensor(
                    "r_mag",
                    "a gated dictionary needs r_mag and b_mag",
                ));
            }
            (_, Some(_)) => {
                return Err(Error::tensor(
                    "r_mag",
                    "only gated dictionaries have r_mag and b_mag",
                ));
            }
            (_, None) => {}
        }
        if meta.activation == Activation::TopK {
            match meta.k {
                Some(k) if k >= 1 && k <= meta.d_sae => {}
                _ => {
                    return Err(Error::invalid(
                        "k",
                        format!("{:?} for d_sae {}", meta.k, meta.d_sae),
                    ));
                }
            }
        }
        match (meta.kind, &self.w_skip) {
            (Kind::SkipTranscoder, Some(w)) => shape2("W_skip", w, [meta.d_out, meta.d_in])?,
            (Kind::SkipTranscoder, None) => {
                return Err(Error::tensor("W_skip", "a skip transcoder needs it"));
            }
            (_, Some(_)) => return Err(Error::tensor("W_skip", "only skip transcoders have it")),
            (_, None) => {}
        }
        if let Some(b) = &self.b_skip {
            if self.w_skip.is_none() {
                return Err(Error::tensor("b_skip", "given without W_skip"));
            }
            shape1("b_skip", b, meta.d_out)?;
        }
        if !matches!(meta.kind, Kind::Crosscoder | Kind::Clt) && l != 1 {
            return Err(Error::invalid(
                "n_layers",
                format!("{l} for a {} dictionary", meta.kind),
            ));
        }
        match (meta.kind, meta.activation) {
            (Kind::Vector, Activation::Linear)
            | (Kind::Probe, Activation::Linear | Activation::Sigmoid) => {}
            (Kind::Vector, _) | (_, Activation::Linear) => {
                return Err(Error::invalid(
                    "activation",
                    "vector dictionaries use the linear activation (their features are projections), \
                     and only they and probes do",
                ));
            }
            (Kind::Probe, _) | (_, Activation::Sigmoid) => {
                return Err(Error::invalid(
                    "activation",
                    "probes, and only they, output `sigmoid` or `linear` (logits)",
                ));
            }
            _ => {}
        }
        let all_finite = [&self.w_enc, &self.w_dec]
            .iter()
            .all(|a| a.iter().all(|v| v.is_finite()))
            && [&self.b_enc, &self.b_dec]
                .iter()
                .all(|a| a.iter().all(|v| v.is_finite()));
        if !all_finite {
            return Err(Error::tensor("weights", "contain NaN or infinite values"));
        }
        Ok(())
    }
}

/// Builds the format v1 graph of a dictionary: input `x`, outputs `acts` and `recon` (and
/// `top_values`/`top_indices` for TopK), the metadata of `meta`.
pub fn build_model(meta: &Meta, w: &Weights) -> Result<ModelProto> {
    build(
        meta,
        w,
        GraphBuilder::new("tiller_dictionary"),
        WeightDtype::F32,
    )
}

/// [`build_model`] with `W_enc` and `W_dec` stored as `dtype` (rounded to nearest, ties to even),
/// read by the graph through a `Cast` to float32. A value that does not fit in `dtype` is an
/// error naming the tensor and the index.
pub fn build_model_as(meta: &Meta, w: &Weights, dtype: WeightDtype) -> Result<ModelProto> {
    build(meta, w, GraphBuilder::new("tiller_dictionary"), dtype)
}

/// Writes the dictionary to `path`. Past [`EXTERNAL_DATA_THRESHOLD`] bytes of weights, they are
/// streamed to `<path>.data` as ONNX external data while the graph is built, without a second copy
/// in memory.
pub fn write_dictionary(meta: &Meta, w: &Weights, path: &std::path::Path) -> Result<()> {
    write_dictionary_with(meta, w, path, EXTERNAL_DATA_THRESHOLD)
}

/// [`write_dictionary`] with another threshold (in bytes) for external data.
pub fn write_dictionary_with(
    meta: &Meta,
    w: &Weights,
    path: &std::path::Path,
    threshold: usize,
) -> Result<()> {
    write(meta, w, path, threshold, WeightDtype::F32)
}

/// [`write_dictionary`] with `W_enc` and `W_dec` stored as `dtype` (see [`build_model_as`]).
pub fn write_dictionary_as(
    meta: &Meta,
    w: &Weights,
    path: &std::path::Path,
    dtype: WeightDtype,
) -> Result<()> {
    write(meta, w, path, EXTERNAL_DATA_THRESHOLD, dtype)
}

fn write(
    meta: &Meta,
    w: &Weights,
    path: &std::path::Path,
    threshold: usize,
    dtype: WeightDtype,
) -> Result<()> {
    let floats = w.b_enc.len()
        + w.b_dec.len()
        + w.w_skip.as_ref().map_or(0, |a| a.len())
        + w.gated
            .as_ref()
            .map_or(0, |g| g.r_mag.len() + g.b_mag.len());
    let bytes = floats * 4 + (w.w_enc.len() + w.w_dec.len()) * dtype.size();
    if bytes <= threshold {
        return crate::graph::write_model(build_model_as(meta, w, dtype)?, path, usize::MAX);
    }
    let g = GraphBuilder::new("tiller_dictionary").with_external(ExternalSink::create(path)?);
    let model = build(meta, w, g, dtype)?;
    let bytes = protobuf::Message::write_to_bytes(&model)
        .map_err(|e| Error::invalid("model", format!("cannot serialise it: {e}")))?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Fails if a value of `a` does not fit in `dtype` (float16's ±65504; bfloat16 only overflows
/// within half a unit of float32's largest value).
fn check_range(name: &str, a: &[f32], dtype: WeightDtype) -> Result<()> {
    if dtype == WeightDtype::F32 {
        return Ok(());
    }
    match a.iter().position(|&v| !dtype.round(v).is_finite()) {
        Some(i) => Err(Error::tensor(
            name,
            format!(
                "value {} at flat index {i} does not fit in {dtype}: store the weights as f32{}",
                a[i],
                if dtype == WeightDtype::F16 {
                    " or bf16"
                } else {
                    ""
                }
            ),
        )),
        None => Ok(()),
    }
}

fn build(meta: &Meta, w: &Weights, mut g: GraphBuilder, dtype: WeightDtype) -> Result<ModelProto> {
    w.check(meta)?;
    let (li, lo) = (meta.input_layers(), meta.output_layers());
    let crosscoder = meta.kind == Kind::Crosscoder;
    let layered = meta.layered_decoder();
    let x_dims: Vec<Dim> = if crosscoder {
        vec![Dim::batch(), li.into(), meta.d_in.into()]
    } else {
        vec![Dim::batch(), meta.d_in.into()]
    };
    let x = g.input("x", DataType::FLOAT, &x_dims);
    let d_sae = meta.d_sae;

    // Borrowed as they are when already row-major (the usual case): no copy of the weights.
    fn contiguous(a: &Array2<f32>) -> ndarray::CowArray<'_, f32, ndarray::Ix2> {
        a.as_standard_layout()
    }
    // Half-width weights are read through a Cast to float32: ONNX Runtime folds it into a
    // float32 copy when the session is built.
    let stored = |g: &mut GraphBuilder, name: &str, dims: &[usize], data: &[f32]| {
        check_range(name, data, dtype)?;
        let n = g.weight_as(name, dims, data, dtype.onnx());
        Ok::<_, Error>(if dtype == WeightDtype::F32 {
            n
        } else {
            g.op(
                "Cast",
                &[&n],
                vec![("to", Attr::Int(DataType::FLOAT as i64))],
            )
        })
    };
    let w_enc = contiguous(&w.w_enc);
    let w_enc_name = stored(
        &mut g,
        "W_enc",
        &[li * meta.d_in, d_sae],
        w_enc.as_slice().unwrap_or(&[]),
    )?;
    // A probe has no decoder: no `W_dec`, `b_dec` or `recon`.
    let decoder = meta.has_decoder();
    let (w_dec_name, b_dec_name) = if decoder {
        let w_dec = contiguous(&w.w_dec);
        let dec_dims: Vec<usize> = if layered {
            vec![d_sae, lo, meta.d_out]
        } else {
            vec![d_sae, meta.d_out]
        };
        let w_dec_name = stored(&mut g, "W_dec", &dec_dims, w_dec.as_slice().unwrap_or(&[]))?;
        let b_dec_dims: Vec<usize> = if layered {
            vec![lo, meta.d_out]
        } else {
            vec![meta.d_out]
        };
        let b_dec = w.b_dec.to_vec();
        (w_dec_name, g.weight("b_dec", &b_dec_dims, &b_dec))
    } else {
        (String::new(), String::new())
    };
    let b_enc_name = g.weight(
        if w.gated.is_some() { "b_gate" } else { "b_enc" },
        &[d_sae],
        &w.b_enc.to_vec(),
    );

    // Normalisation, per token (and per layer for crosscoders).
    let mut stats: Option<(String, String)> = None; // (std, mean) or (factor, "")
    let xn = match meta.input_norm {
        InputNorm::None => x.clone(),
        InputNorm::LayerNorm => {
            let axes = vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))];
            let mean = g.op("ReduceMean", &[&x], axes.clone());
            let xc = g.op("Sub", &[&x, &mean], vec![]);
            let ss = g.op("ReduceSumSquare", &[&xc], axes);
            let n1 = g.const_f32("n_minus_1", (meta.d_in as f32 - 1.0).max(1.0));
            let var = g.op("Div", &[&ss, &n1], vec![]);
            let std = g.op("Sqrt", &[&var], vec![]);
            let eps = g.const_f32("eps", LAYER_NORM_EPS as f32);
            let denom = g.op("Add", &[&std, &eps], vec![]);
            let xn = g.op("Div", &[&xc, &denom], vec![]);
            stats = Some((std, mean));
            xn
        }
        InputNorm::Scale(s) => {
            let s = g.const_f32("scale", s);
            let xn = g.op("Mul", &[&x, &s], vec![]);
            stats = Some((s, String::new()));
            xn
        }
        InputNorm::NormRescale => {
            let ss = g.op(
                "ReduceSumSquare",
                &[&x],
                vec![("axes", Attr::Ints(vec![-1])), ("keepdims", Attr::Int(1))],
            );
            let norm = g.op("Sqrt", &[&ss], vec![]);
            let sqrt_d = g.const_f32("sqrt_d", (meta.d_in as f32).sqrt());
            let c = g.op("Div", &[&sqrt_d, &norm], vec![]);
            let xn = g.op("Mul", &[&x, &c], vec![]);
            stats = Some((c, String::new()));
            xn
        }
    };
    let flat_in = if crosscoder {
        let shape = g.const_i64("flat_in_shape", &[0, (li * meta.d_in) as i64]);
        g.op("Reshape", &[&xn, &shape], vec![])
    } else {
        xn
    };
    let x_in = if w.apply_b_dec_to_input {
        let b = if layered {
            let shape = g.const_i64("b_dec_flat", &[(lo * meta.d_out) as i64]);
            g.op("Reshape", &[&b_dec_name, &shape], vec![])
        } else {
            b_dec_name.clone()
        };
        g.op("Sub", &[&flat_in, &b], vec![])
    } else {
        flat_in
    };
    let xw = g.op("MatMul", &[&x_in, &w_enc_name], vec![]);
    let pre = g.op("Add", &[&xw, &b_enc_name], vec![]);

    let zero = g.const_f32("zero", 0.0);
    let mut topk_outputs = false;
    match meta.activation {
        Activation::Relu => g.op_into("Relu", &[&pre], &["acts"], vec![]),
        Activation::Linear => g.op_into("Identity", &[&pre], &["acts"], vec![]),
        Activation::Sigmoid => g.op_into("Sigmoid", &[&pre], &["acts"], vec![]),
        Activation::JumpRelu | Activation::BatchTopK => {
            let t = w.threshold.as_ref().map(|t| t.to_vec()).unwrap_or_default();
            let dims: Vec<usize> = if meta.activation == Activation::JumpRelu {
                vec![d_sae]
            } else {
                vec![]
            };
            let th = g.weight("threshold", &dims, &t);
            let relu = g.op("Relu", &[&pre], vec![]);
            let mask = g.op("Greater", &[&pre, &th], vec![]);
            g.op_into("Where", &[&mask, &relu, &zero], &["acts"], vec![]);
        }
        Activation::TopK => {
            let k = g.const_i64("k", &[meta.k.unwrap_or(1) as i64]);
            g.op_into(
                "TopK",
                &[&pre, &k],
                &["topk_raw_values", "top_indices"],
                vec![
                    ("axis", Attr::Int(-1)),
                    ("largest", Attr::Int(1)),
                    ("sorted", Attr::Int(1)),
                ],
            );
            g.op_into("Relu", &["topk_raw_values"], &["top_values"], vec![]);
            let shape = g.op("Shape", &[&pre], vec![]);
            let zeros = g.op(
                "ConstantOfShape",
                &[&shape],
                vec![(
                    "value",
                    Attr::Tensor(Box::new(tensor_f32("value", &[1], &[0.0]))),
                )],
            );
            g.op_into(
                "ScatterElements",
                &[&zeros, "top_indices", "top_values"],
                &["acts"],
                vec![("axis", Attr::Int(1))],
            );
            topk_outputs = true;
        }
        Activation::Gated => {
            let Some(gated) = &w.gated else {
                return Err(Error::tensor(
                    "r_mag",
                    "a gated dictionary needs r_mag and b_mag",
                ));
            };
            let r_mag = g.weight("r_mag", &[d_sae], &gated.r_mag.to_vec());
            let b_mag = g.weight("b_mag", &[d_sae], &gated.b_mag.to_vec());
            let scale = g.op("Exp", &[&r_mag], vec![]);
            let mag_xw = g.op("Mul", &[&xw, &scale], vec![]);
            let mag_pre = g.op("Add", &[&mag_xw, &b_mag], vec![]);
            let mag = g.op("Relu", &[&mag_pre], vec![]);
            let gate = g.op("Greater", &[&pre, &zero], vec![]);
            g.op_into("Where", &[&gate, &mag, &zero], &["acts"], vec![]);
        }
    }

    if !decoder {
        g.output("acts", DataType::FLOAT, &[Dim::batch(), d_sae.into()]);
        let mut props = meta.to_props();
        props.push(("tiller.b_dec_on_input".into(), "false".into()));
        return g.finish_checked(&props);
    }

    // Decoder.
    let dec_2d = if layered {
        let shape = g.const_i64("w_dec_2d", &[d_sae as i64, (lo * meta.d_out) as i64]);
        g.op("Reshape", &[&w_dec_name, &shape], vec![])
    } else {
        w_dec_name
    };
    let b_dec_flat = if layered {
        let shape = g.const_i64("b_dec_flat", &[(lo * meta.d_out) as i64]);
        g.op("Reshape", &[&b_dec_name, &shape], vec![])
    } else {
        b_dec_name
    };
    let fw = g.op("MatMul", &["acts", &dec_2d], vec![]);
    let y = g.op("Add", &[&fw, &b_dec_flat], vec![]);
    let y = if layered {
        let shape = g.const_i64("recon_shape", &[0, lo as i64, meta.d_out as i64]);
        g.op("Reshape", &[&y, &shape], vec![])
    } else {
        y
    };
    let y = match (&stats, meta.denormalizes_output()) {
        (Some((std, mean)), true) if meta.input_norm == InputNorm::LayerNorm => {
            let ys = g.op("Mul", &[&y, std], vec![]);
            g.op("Add", &[&ys, mean], vec![])
        }
        (Some((factor, _)), true) => g.op("Div", &[&y, factor], vec![]),
        _ => y,
    };
    if let Some(w_skip) = &w.w_skip {
        let ws = contiguous(w_skip);
        let ws_name = g.weight(
            "W_skip",
            &[meta.d_out, meta.d_in],
            ws.as_slice().unwrap_or(&[]),
        );
        let wt = g.op(
            "Transpose",
            &[&ws_name],
            vec![("perm", Attr::Ints(vec![1, 0]))],
        );
        let skip = g.op("MatMul", &[&x, &wt], vec![]);
        let skip = match &w.b_skip {
            Some(b) => {
                let bn = g.weight("b_skip", &[meta.d_out], &b.to_vec());
                g.op("Add", &[&skip, &bn], vec![])
            }
            None => skip,
        };
        g.op_into("Add", &[&y, &skip], &["recon"], vec![]);
    } else {
        g.op_into("Identity", &[&y], &["recon"], vec![]);
    }

    g.output("acts", DataType::FLOAT, &[Dim::batch(), d_sae.into()]);
    let recon_dims: Vec<Dim> = if layered {
        vec![Dim::batch(), lo.into(), meta.d_out.into()]
    } else {
        vec![Dim::batch(), meta.d_out.into()]
    };
    g.output("recon", DataType::FLOAT, &recon_dims);
    if topk_outputs {
        let k = meta.k.unwrap_or(1);
        g.output("top_values", DataType::FLOAT, &[Dim::batch(), k.into()]);
        g.output("top_indices", DataType::INT64, &[Dim::batch(), k.into()]);
    }
    let mut props = meta.to_props();
    props.push((
        "tiller.b_dec_on_input".into(),
        w.apply_b_dec_to_input.to_string(),
    ));
    g.finish_checked(&props)
}
