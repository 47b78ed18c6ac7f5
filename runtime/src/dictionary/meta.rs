//! What a dictionary is, as its metadata says (docs/design.md#2-the-dictionary-file-format-v1):
//! the kinds, activations, weight types and input normalisations, and [`Meta`], read from and
//! written to the file's `tiller.*` keys.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::{Error, Result};

/// The format version this crate writes and reads.
pub const FORMAT_VERSION: &str = "1";

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $var),+ }

        impl $name {
            /// The name used in metadata and configs.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$var => $s),+ }
            }
            /// Every accepted name.
            pub const NAMES: &'static [&'static str] = &[$($s),+];
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($s => Ok(Self::$var),)+
                    other => Err(format!("`{other}` is not one of {}", Self::NAMES.join(", "))),
                }
            }
        }
    };
}

string_enum! {
    /// What a dictionary is.
    Kind {
        /// A sparse autoencoder: reads and writes the same hook.
        Sae = "sae",
        /// Encodes an MLP's input, decodes its output.
        Transcoder = "transcoder",
        /// A transcoder with a linear skip connection from its input.
        SkipTranscoder = "skip_transcoder",
        /// Reads several layers, decodes to each.
        Crosscoder = "crosscoder",
        /// A cross-layer transcoder.
        Clt = "clt",
        /// Linear read-outs (`sigmoid(x·w + b)` or the logits), no decoder: monitored, never steered.
        Probe = "probe",
        /// Raw steering directions.
        Vector = "vector",
    }
}

string_enum! {
    /// The activation function applied to the encoder's pre-activations.
    Activation {
        /// `relu(pre)`.
        Relu = "relu",
        /// The k largest pre-activations, ReLU'd; the rest zero.
        TopK = "topk",
        /// JumpReLU with one scalar threshold (BatchTopK at inference).
        BatchTopK = "batchtopk",
        /// `relu(pre) · [pre > threshold]`, per feature.
        JumpRelu = "jumprelu",
        /// A gated SAE.
        Gated = "gated",
        /// No activation: the pre-activations themselves (projections onto raw directions, probe logits).
        Linear = "linear",
        /// `1 / (1 + exp(-pre))`: a probe's probability (probes only).
        Sigmoid = "sigmoid",
    }
}

string_enum! {
    /// The element type a dictionary stores `W_enc` and `W_dec` in (biases, thresholds and the
    /// other small tensors stay float32). Half-width weights are initializers of ONNX type
    /// FLOAT16 or BFLOAT16 read through a `Cast` to float32, so that ONNX Runtime runs the same
    /// graph; the metadata does not change. The runtime's native encoder reads them at their
    /// stored width.
    WeightDtype {
        /// float32.
        F32 = "f32",
        /// IEEE float16 (values within ±65504).
        F16 = "f16",
        /// bfloat16 (float32's range, 8 bits of precision).
        Bf16 = "bf16",
    }
}

impl WeightDtype {
    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    /// `v` rounded to this type (to nearest, ties to even) and back to f32.
    pub fn round(self, v: f32) -> f32 {
        match self {
            Self::F32 => v,
            Self::F16 => half::f16::from_f32(v).to_f32(),
            Self::Bf16 => half::bf16::from_f32(v).to_f32(),
        }
    }

    pub(crate) fn onnx(self) -> onnx_protobuf::tensor_proto::DataType {
        use onnx_protobuf::tensor_proto::DataType;
        match self {
            Self::F32 => DataType::FLOAT,
            Self::F16 => DataType::FLOAT16,
            Self::Bf16 => DataType::BFLOAT16,
        }
    }
}

/// Normalisation applied to the input inside the graph (and undone on the output of SAEs and
/// crosscoders).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InputNorm {
    /// Identity.
    None,
    /// `(x - mean) / (std + 1e-5)` over the last axis, with the unbiased standard deviation
    /// (SAELens `layer_norm`, OpenAI's TopK SAEs); undone as `y·std + mean`.
    LayerNorm,
    /// `x · s` (a dataset-wise constant); undone as `y / s`.
    Scale(f32),
    /// `x · sqrt(d_in) / ‖x‖` per token (SAELens `constant_norm_rescale`); undone by the same factor.
    NormRescale,
}

/// The epsilon of [`InputNorm::LayerNorm`], added to the standard deviation.
pub const LAYER_NORM_EPS: f64 = 1e-5;

impl InputNorm {
    /// The factor the un-normalisation multiplies a reconstruction of `row` (one token of one
    /// layer, as the dictionary reads it) by: `1/s` for `scale:s`, `‖x‖/√d` for `norm_rescale`,
    /// the unbiased standard deviation for `layer_norm` (undone as `y·σ + μ`, as the reference
    /// does), 1 for none. A feature edit moves the model's activations by its decoder row times
    /// this (docs: the steering semantics under normalisation).
    pub fn output_gain(self, row: &[f32]) -> f32 {
        let d = row.len() as f64;
        match self {
            Self::None => 1.0,
            Self::Scale(s) => 1.0 / s,
            Self::NormRescale => {
                let sq = row
                    .iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>();
                (sq.sqrt() / d.sqrt()) as f32
            }
            Self::LayerNorm => {
                let mu = row.iter().map(|&v| f64::from(v)).sum::<f64>() / d;
                let var = row
                    .iter()
                    .map(|&v| (f64::from(v) - mu) * (f64::from(v) - mu))
                    .sum::<f64>()
                    / (d - 1.0).max(1.0);
                var.sqrt() as f32
            }
        }
    }
}

impl fmt::Display for InputNorm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::LayerNorm => f.write_str("layer_norm"),
            Self::Scale(s) => write!(f, "scale:{s:?}"),
            Self::NormRescale => f.write_str("norm_rescale"),
        }
    }
}

impl FromStr for InputNorm {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "layer_norm" => Ok(Self::LayerNorm),
            "norm_rescale" => Ok(Self::NormRescale),
            _ => match s.strip_prefix("scale:") {
                Some(v) => match v.parse::<f32>() {
                    Ok(f) if f.is_finite() && f != 0.0 => Ok(Self::Scale(f)),
                    _ => Err(format!(
                        "`{s}`: the scale must be a finite, non-zero number"
                    )),
                },
                None => Err(format!(
                    "`{s}` is not one of none, layer_norm, norm_rescale, scale:<f>"
                )),
            },
        }
    }
}

/// Everything in a dictionary's `metadata_props` (docs/design.md#2-the-dictionary-file-format-v1).
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    /// `tiller.kind`.
    pub kind: Kind,
    /// `tiller.activation`.
    pub activation: Activation,
    /// `tiller.d_in`: width of one layer's input.
    pub d_in: usize,
    /// `tiller.d_sae`: number of features.
    pub d_sae: usize,
    /// `tiller.d_out`: width of one layer's output (probes write nothing: `d_in`).
    pub d_out: usize,
    /// `tiller.k` for TopK dictionaries.
    pub k: Option<usize>,
    /// `tiller.n_layers` (1 except crosscoders and CLTs).
    pub n_layers: usize,
    /// `tiller.hook_in`.
    pub hook_in: String,
    /// `tiller.hook_out`.
    pub hook_out: String,
    /// `tiller.model`.
    pub model: String,
    /// `tiller.input_norm`.
    pub input_norm: InputNorm,
    /// `tiller.feature_ids` for sliced dictionaries.
    pub feature_ids: Option<Vec<u32>>,
    /// `tiller.exact`.
    pub exact: bool,
    /// `tiller.labels`.
    pub labels: BTreeMap<u32, String>,
    /// `tiller.source`.
    pub source: String,
}

impl Meta {
    /// A plain SAE's metadata, with empty hooks, model and source.
    pub fn new(
        kind: Kind,
        activation: Activation,
        d_in: usize,
        d_sae: usize,
        d_out: usize,
    ) -> Self {
        Self {
            kind,
            activation,
            d_in,
            d_sae,
            d_out,
            k: None,
            n_layers: 1,
            hook_in: String::new(),
            hook_out: String::new(),
            model: String::new(),
            input_norm: InputNorm::None,
            feature_ids: None,
            exact: true,
            labels: BTreeMap::new(),
            source: String::new(),
        }
    }

    /// Whether the input normalisation is undone on the output (not for transcoders, whose output
    /// lives in another space; as SAELens does).
    pub fn denormalizes_output(&self) -> bool {
        matches!(self.kind, Kind::Sae | Kind::Crosscoder)
    }

    /// Layers the input holds: `n_layers` for crosscoders, else 1.
    pub fn input_layers(&self) -> usize {
        if self.kind == Kind::Crosscoder {
            self.n_layers
        } else {
            1
        }
    }

    /// Layers the decoder writes: `n_layers` for crosscoders and CLTs, none for probes, else 1.
    pub fn output_layers(&self) -> usize {
        if self.layered_decoder() {
            self.n_layers
        } else if self.has_decoder() {
            1
        } else {
            0
        }
    }

    /// Whether it has decoder rows to steer with (every kind but probes).
    pub fn has_decoder(&self) -> bool {
        self.kind != Kind::Probe
    }

    /// Whether `W_dec` is `[d_sae, n_layers, d_out]` (crosscoders and CLTs).
    pub fn layered_decoder(&self) -> bool {
        matches!(self.kind, Kind::Crosscoder | Kind::Clt)
    }

    /// The hooks it reads (`tiller.hook_in`, comma separated for crosscoders).
    pub fn hooks_in(&self) -> Vec<String> {
        split_hooks(&self.hook_in)
    }

    /// The hooks it writes (`tiller.hook_out`, comma separated for crosscoders and CLTs).
    pub fn hooks_out(&self) -> Vec<String> {
        split_hooks(&self.hook_out)
    }

    /// The metadata as `(key, value)` pairs.
    pub fn to_props(&self) -> Vec<(String, String)> {
        let mut p = vec![
            ("tiller.format", FORMAT_VERSION.to_string()),
            ("tiller.kind", self.kind.to_string()),
            ("tiller.activation", self.activation.to_string()),
            ("tiller.d_in", self.d_in.to_string()),
            ("tiller.d_sae", self.d_sae.to_string()),
            ("tiller.d_out", self.d_out.to_string()),
            ("tiller.n_layers", self.n_layers.to_string()),
            ("tiller.hook_in", self.hook_in.clone()),
            ("tiller.hook_out", self.hook_out.clone()),
            ("tiller.model", self.model.clone()),
            ("tiller.input_norm", self.input_norm.to_string()),
            ("tiller.exact", self.exact.to_string()),
            ("tiller.source", self.source.clone()),
        ];
        if let Some(k) = self.k {
            p.push(("tiller.k", k.to_string()));
        }
        if let Some(ids) = &self.feature_ids {
            let s: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            p.push(("tiller.feature_ids", s.join(",")));
        }
        if !self.labels.is_empty() {
            let map: serde_json::Map<String, serde_json::Value> = self
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
                .collect();
            p.push(("tiller.labels", serde_json::Value::Object(map).to_string()));
        }
        p.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    /// Parses and checks the metadata of the file at `path`.
    pub fn from_props(path: &Path, props: &BTreeMap<String, String>) -> Result<Self> {
        let err = |m: String| Error::dictionary(path, m);
        let get = |k: &str| props.get(k).map(String::as_str);
        let need = |k: &str| get(k).ok_or_else(|| err(format!("metadata key `{k}` is missing")));
        let size = |k: &str| -> Result<usize> {
            let v = need(k)?;
            match v.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(err(format!(
                    "metadata `{k}` = `{v}` is not a positive integer"
                ))),
            }
        };
        match get("tiller.format") {
            Some(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(err(format!(
                    "`tiller.format` is `{v}`; this build reads format {FORMAT_VERSION}"
                )));
            }
            None => {
                return Err(err(
                    "metadata key `tiller.format` is missing: not a Tiller dictionary".into(),
                ));
            }
        }
        let kind: Kind = need("tiller.kind")?
            .parse()
            .map_err(|e| err(format!("`tiller.kind`: {e}")))?;
        let activation: Activation = need("tiller.activation")?
            .parse()
            .map_err(|e| err(format!("`tiller.activation`: {e}")))?;
        let d_in = size("tiller.d_in")?;
        let d_sae = size("tiller.d_sae")?;
        let d_out = if get("tiller.d_out").is_some() {
            size("tiller.d_out")?
        } else {
            d_in
        };
        let n_layers = if get("tiller.n_layers").is_some() {
            size("tiller.n_layers")?
        } else {
            1
        };
        let k = match get("tiller.k") {
            Some(_) => Some(size("tiller.k")?),
            None => None,
        };
        if activation == Activation::TopK {
            match k {
                None => return Err(err("a topk dictionary needs `tiller.k`".into())),
                Some(k) if k > d_sae => {
                    return Err(err(format!(
                        "`tiller.k` = {k} exceeds `tiller.d_sae` = {d_sae}"
                    )));
                }
                _ => {}
            }
        }
        match (kind, activation) {
            (Kind::Probe, Activation::Sigmoid | Activation::Linear) => {}
            (Kind::Probe, a) => {
                return Err(err(format!(
                    "a probe's `tiller.activation` is `sigmoid` or `linear` (logits), not `{a}`"
                )));
            }
            (k, Activation::Sigmoid) => {
                return Err(err(format!(
                    "`tiller.activation` = `sigmoid` is for probes, not {k} dictionaries"
                )));
            }
            _ => {}
        }
        let input_norm: InputNorm = match get("tiller.input_norm") {
            Some(s) => s
                .parse()
                .map_err(|e| err(format!("`tiller.input_norm`: {e}")))?,
            None => InputNorm::None,
        };
        let feature_ids = match get("tiller.feature_ids") {
            None | Some("") => None,
            Some(s) => {
                let ids: std::result::Result<Vec<u32>, _> =
                    s.split(',').map(|t| t.trim().parse::<u32>()).collect();
                let ids = ids.map_err(|e| err(format!("`tiller.feature_ids`: {e}")))?;
                if ids.len() != d_sae {
                    return Err(err(format!(
                        "`tiller.feature_ids` lists {} features but `tiller.d_sae` is {d_sae}",
                        ids.len()
                    )));
                }
                Some(ids)
            }
        };
        let exact = match get("tiller.exact") {
            None | Some("true") => true,
            Some("false") => false,
            Some(v) => return Err(err(format!("`tiller.exact` = `{v}` is not true or false"))),
        };
        let labels = match get("tiller.labels") {
            None | Some("") => BTreeMap::new(),
            Some(s) => parse_labels(s).map_err(|e| err(format!("`tiller.labels`: {e}")))?,
        };
        Ok(Self {
            kind,
            activation,
            d_in,
            d_sae,
            d_out,
            k,
            n_layers,
            hook_in: get("tiller.hook_in").unwrap_or("").to_string(),
            hook_out: get("tiller.hook_out").unwrap_or("").to_string(),
            model: get("tiller.model").unwrap_or("").to_string(),
            input_norm,
            feature_ids,
            exact,
            labels,
            source: get("tiller.source").unwrap_or("").to_string(),
        })
    }
}

/// Splits a comma-separated hook list, dropping empty names.
pub fn split_hooks(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .collect()
}

/// Parses a JSON object `{feature_id: label}`.
pub fn parse_labels(s: &str) -> std::result::Result<BTreeMap<u32, String>, String> {
    let v: serde_json::Value = serde_json::from_str(s).map_err(|e| e.to_string())?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let mut out = BTreeMap::new();
    for (k, v) in obj {
        let id: u32 = k
            .parse()
            .map_err(|_| format!("key `{k}` is not a feature index"))?;
        let label = v
            .as_str()
            .ok_or_else(|| format!("the label of feature {k} is not a string"))?;
        out.insert(id, label.to_string());
    }
    Ok(out)
}
