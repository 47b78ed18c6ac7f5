//! Reading and validating a dictionary file before ONNX Runtime sees it.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use ndarray::{Array1, Array2};
use onnx_protobuf::{
    ModelProto, TensorProto, ValueInfoProto, tensor_proto::DataLocation, tensor_proto::DataType,
    type_proto,
};
use protobuf::{Enum, Message};

use super::meta::{Activation, Kind, Meta, WeightDtype};
use crate::graph::OPSET;
use crate::{Error, Result};

/// A dictionary file that passed validation: its metadata and its (parsed) ONNX model.
#[derive(Debug, Clone)]
pub struct DictionaryFile {
    path: PathBuf,
    meta: Meta,
    model: ModelProto,
    opset: i64,
    external: bool,
}

/// Where one tensor's bytes live.
enum Bytes<'a> {
    Inline(&'a [u8]),
    Floats(&'a [f32]),
    External {
        file: PathBuf,
        offset: u64,
        length: u64,
    },
}

fn elem_size(data_type: i32) -> Option<usize> {
    match DataType::from_i32(data_type)? {
        DataType::FLOAT | DataType::INT32 | DataType::UINT32 => Some(4),
        DataType::DOUBLE | DataType::INT64 | DataType::UINT64 => Some(8),
        DataType::FLOAT16 | DataType::BFLOAT16 | DataType::INT16 | DataType::UINT16 => Some(2),
        DataType::INT8 | DataType::UINT8 | DataType::BOOL => Some(1),
        _ => None,
    }
}

impl DictionaryFile {
    /// Reads and validates the dictionary at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, &bytes)
    }

    /// Validates a dictionary held in memory; `path` is where it came from, used for messages and to
    /// resolve external data.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let model = ModelProto::parse_from_bytes(bytes)
            .map_err(|e| Error::dictionary(path, format!("not a valid ONNX protobuf: {e}")))?;
        Self::from_model(path, model)
    }

    /// Validates an already parsed model.
    pub fn from_model(path: &Path, model: ModelProto) -> Result<Self> {
        let err = |m: String| Error::dictionary(path, m);
        let opset = model
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .ok_or_else(|| err("it imports no ai.onnx opset".into()))?;
        if opset < OPSET {
            return Err(err(format!(
                "opset {opset} is older than the required {OPSET}"
            )));
        }
        let props: BTreeMap<String, String> = model
            .metadata_props
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect();
        let meta = Meta::from_props(path, &props)?;
        let graph = model
            .graph
            .as_ref()
            .ok_or_else(|| err("it has no graph".into()))?;

        // Inputs and outputs.
        let x = graph
            .input
            .iter()
            .find(|v| v.name == "x")
            .ok_or_else(|| err("the graph has no input `x`".into()))?;
        let x_rank = if meta.kind == Kind::Crosscoder { 3 } else { 2 };
        check_value(path, x, DataType::FLOAT, x_rank, meta.d_in)?;
        if meta.kind != Kind::Vector {
            let acts = graph
                .output
                .iter()
                .find(|v| v.name == "acts")
                .ok_or_else(|| err("the graph has no output `acts`".into()))?;
            check_value(path, acts, DataType::FLOAT, 2, meta.d_sae)?;
        }

        // Every initializer: a known dtype, a size that matches its dims, external data inside the folder.
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut external = false;
        let mut f = Self {
            path: path.to_path_buf(),
            meta,
            model: ModelProto::new(),
            opset,
            external: false,
        };
        for t in &graph.initializer {
            let (_, n) = tensor_dims(path, t)?;
            let size = elem_size(t.data_type).ok_or_else(|| {
                err(format!(
                    "initializer `{}` has unsupported data type {}",
                    t.name, t.data_type
                ))
            })?;
            let want = n
                .checked_mul(size)
                .ok_or_else(|| err(format!("initializer `{}` is impossibly large", t.name)))?;
            match f.locate(&base, t)? {
                Bytes::Inline(b) => {
                    if b.len() != want && !(b.is_empty() && t.data_type != DataType::FLOAT as i32) {
                        return Err(err(format!(
                            "initializer `{}` holds {} bytes but its shape {:?} needs {want}",
                            t.name,
                            b.len(),
                            t.dims
                        )));
                    }
                }
                Bytes::Floats(v) => {
                    if v.len() != n {
                        return Err(err(format!(
                            "initializer `{}` holds {} floats but its shape {:?} needs {n}",
                            t.name,
                            v.len(),
                            t.dims
                        )));
                    }
                }
                Bytes::External {
                    file,
                    offset,
                    length,
                } => {
                    external = true;
                    if length != want as u64 {
                        return Err(err(format!(
                            "initializer `{}`: external data length {length} but its shape {:?} needs {want} bytes",
                            t.name, t.dims
                        )));
                    }
                    let len = std::fs::metadata(&file)
                        .map_err(|e| Error::io(&file, e))?
                        .len();
                    if offset.checked_add(length).is_none_or(|end| end > len) {
                        return Err(err(format!(
                            "initializer `{}`: external data [{offset}, +{length}) runs past the end of {} ({len} bytes)",
                            t.name,
                            file.display()
                        )));
                    }
                }
            }
        }
        f.external = external;

        // The decoder the runtime steers with.
        if f.meta.has_decoder() {
            let l = f.meta.n_layers;
            let (d_sae, d_out) = (f.meta.d_sae, f.meta.d_out);
            let want_dec: Vec<i64> = if f.meta.layered_decoder() {
                vec![d_sae as i64, l as i64, d_out as i64]
            } else {
                vec![d_sae as i64, d_out as i64]
            };
            let w_dec =
                find(graph, "W_dec").ok_or_else(|| err("initializer `W_dec` is missing".into()))?;
            if w_dec.dims != want_dec {
                return Err(err(format!(
                    "`W_dec` has shape {:?}, the metadata says {want_dec:?}",
                    w_dec.dims
                )));
            }
            if f.meta.kind != Kind::Vector {
                let b_dec = find(graph, "b_dec")
                    .ok_or_else(|| err("initializer `b_dec` is missing".into()))?;
                let want_b: Vec<i64> = want_dec[1..].to_vec();
                if b_dec.dims != want_b {
                    return Err(err(format!(
                        "`b_dec` has shape {:?}, the metadata says {want_b:?}",
                        b_dec.dims
                    )));
                }
            }
        }
        f.model = model;
        Ok(f)
    }

    /// Where the file came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its metadata.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The parsed ONNX model.
    pub fn model(&self) -> &ModelProto {
        &self.model
    }

    /// The ai.onnx opset it imports.
    pub fn opset(&self) -> i64 {
        self.opset
    }

    /// Whether some weights live in ONNX external data.
    pub fn has_external_data(&self) -> bool {
        self.external
    }

    /// The folder external data is resolved against.
    pub fn base_dir(&self) -> PathBuf {
        self.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    fn locate<'a>(&self, base: &Path, t: &'a TensorProto) -> Result<Bytes<'a>> {
        let err = |m: String| Error::dictionary(&self.path, m);
        if t.data_location.enum_value() == Ok(DataLocation::EXTERNAL) {
            let mut location = None;
            let mut offset = 0u64;
            let mut length = None;
            for e in &t.external_data {
                let num = |v: &str| {
                    v.parse::<u64>().map_err(|_| {
                        err(format!(
                            "initializer `{}`: external data {} = `{v}` is not a number",
                            t.name, e.key
                        ))
                    })
                };
                match e.key.as_str() {
                    "location" => location = Some(e.value.as_str()),
                    "offset" => offset = num(&e.value)?,
                    "length" => length = Some(num(&e.value)?),
                    _ => {}
                }
            }
            let location = location.ok_or_else(|| {
                err(format!(
                    "initializer `{}`: external data without a location",
                    t.name
                ))
            })?;
            let file = safe_join(base, location).map_err(|m| {
                err(format!(
                    "initializer `{}`: external data location `{location}` {m}",
                    t.name
                ))
            })?;
            let length = match length {
                Some(l) => l,
                None => {
                    let len = std::fs::metadata(&file)
                        .map_err(|e| Error::io(&file, e))?
                        .len();
                    len.saturating_sub(offset)
                }
            };
            return Ok(Bytes::External {
                file,
                offset,
                length,
            });
        }
        if !t.raw_data.is_empty() || t.float_data.is_empty() {
            Ok(Bytes::Inline(&t.raw_data))
        } else {
            Ok(Bytes::Floats(&t.float_data))
        }
    }

    /// The element type `W_enc` is stored in (float64, were it used, is read as float32).
    pub fn weight_dtype(&self) -> WeightDtype {
        let t = self.model.graph.as_ref().and_then(|g| find(g, "W_enc"));
        match t.and_then(|t| DataType::from_i32(t.data_type)) {
            Some(DataType::FLOAT16) => WeightDtype::F16,
            Some(DataType::BFLOAT16) => WeightDtype::Bf16,
            _ => WeightDtype::F32,
        }
    }

    /// The initializer `name` as stored: its dims, its ONNX element type, and its little-endian bytes
    /// (read from external data where it lives there).
    pub(crate) fn tensor_bytes(
        &self,
        name: &str,
    ) -> Result<(Vec<usize>, i32, std::borrow::Cow<'_, [u8]>)> {
        let graph = self
            .model
            .graph
            .as_ref()
            .ok_or_else(|| Error::dictionary(&self.path, "it has no graph"))?;
        let t = find(graph, name).ok_or_else(|| {
            Error::dictionary(&self.path, format!("initializer `{name}` is missing"))
        })?;
        let (dims, _) = tensor_dims(&self.path, t)?;
        let stored = t.data_type;
        let (ty, bytes): (_, std::borrow::Cow<'_, [u8]>) = match self.locate(&self.base_dir(), t)? {
            Bytes::Floats(v) => (
                DataType::FLOAT as i32,
                v.iter().flat_map(|f| f.to_le_bytes()).collect(),
            ),
            Bytes::Inline(b) => (stored, b.into()),
            Bytes::External {
                file,
                offset,
                length,
            } => {
                let mut fh = std::fs::File::open(&file).map_err(|e| Error::io(&file, e))?;
                fh.seek(SeekFrom::Start(offset))
                    .map_err(|e| Error::io(&file, e))?;
                let mut buf = vec![0u8; length as usize];
                fh.read_exact(&mut buf).map_err(|e| Error::io(&file, e))?;
                (stored, buf.into())
            }
        };
        Ok((dims, ty, bytes))
    }

    /// Reads the initializer `name` as float32 (f16, bf16 and f64 are converted), with its dims.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (dims, ty, bytes) = self.tensor_bytes(name)?;
        let n: usize = dims.iter().product();
        let values: Vec<f32> = match DataType::from_i32(ty) {
            Some(DataType::FLOAT) => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Some(DataType::FLOAT16) => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Some(DataType::BFLOAT16) => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Some(DataType::DOUBLE) => bytes
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            _ => {
                return Err(Error::dictionary(
                    &self.path,
                    format!(
                        "initializer `{name}` is not a floating-point tensor (type {})",
                        ty
                    ),
                ));
            }
        };
        if values.len() != n {
            return Err(Error::dictionary(
                &self.path,
                format!(
                    "initializer `{name}` holds {} values, expected {n}",
                    values.len()
                ),
            ));
        }
        Ok((dims, values))
    }

    /// The decoder rows, `[d_sae, n_layers·d_out]` (`[d_sae, 0]` for a probe, which has none).
    pub fn w_dec(&self) -> Result<Array2<f32>> {
        if !self.meta.has_decoder() {
            return Ok(Array2::zeros((self.meta.d_sae, 0)));
        }
        let (dims, v) = self.tensor_f32("W_dec")?;
        let rows = dims.first().copied().unwrap_or(0);
        let cols = v.len().checked_div(rows).unwrap_or(0);
        Array2::from_shape_vec((rows, cols), v)
            .map_err(|e| Error::dictionary(&self.path, format!("`W_dec`: {e}")))
    }

    /// The decoder bias, `[n_layers·d_out]` (empty for a probe).
    pub fn b_dec(&self) -> Result<Array1<f32>> {
        if !self.meta.has_decoder() {
            return Ok(Array1::zeros(0));
        }
        Ok(Array1::from_vec(self.tensor_f32("b_dec")?.1))
    }

    /// Whether the graph subtracts `b_dec` from its (normalised) input: the metadata
    /// `tiller.b_dec_on_input`, or for files written before it, a `Sub` node reading `b_dec`.
    pub fn b_dec_on_input(&self) -> bool {
        if !self.meta.has_decoder() {
            return false;
        }
        let props = &self.model.metadata_props;
        if let Some(p) = props.iter().find(|p| p.key == "tiller.b_dec_on_input") {
            return p.value == "true";
        }
        self.model.graph.as_ref().is_some_and(|g| {
            // The crosscoder graph subtracts a reshaped b_dec: follow one Reshape.
            let reshaped: Vec<&str> = g
                .node
                .iter()
                .filter(|n| n.op_type == "Reshape" && n.input.first().is_some_and(|i| i == "b_dec"))
                .flat_map(|n| n.output.iter().map(String::as_str))
                .collect();
            g.node.iter().any(|n| {
                n.op_type == "Sub"
                    && n.input
                        .get(1)
                        .is_some_and(|i| i == "b_dec" || reshaped.contains(&i.as_str()))
            })
        })
    }

    fn has(&self, name: &str) -> bool {
        self.model
            .graph
            .as_ref()
            .is_some_and(|g| find(g, name).is_some())
    }

    fn vector(&self, name: &str, len: usize) -> Result<Array1<f32>> {
        let (_, v) = self.tensor_f32(name)?;
        if v.len() != len {
            return Err(Error::dictionary(
                &self.path,
                format!("`{name}` holds {} values, expected {len}", v.len()),
            ));
        }
        Ok(Array1::from_vec(v))
    }

    /// The weights of a dictionary written by Tiller, read back from its initializers (the inverse
    /// of [`super::build::build_model`]).
    pub fn weights(&self) -> Result<super::build::Weights> {
        let m = &self.meta;
        let (li, lo) = (m.input_layers(), m.output_layers());
        let (_, w_enc) = self.tensor_f32("W_enc")?;
        let w_enc = Array2::from_shape_vec((li * m.d_in, m.d_sae), w_enc)
            .map_err(|e| Error::dictionary(&self.path, format!("`W_enc`: {e}")))?;
        let w_dec = self
            .w_dec()?
            .into_shape_with_order((m.d_sae, lo * m.d_out))
            .map_err(|e| Error::dictionary(&self.path, format!("`W_dec`: {e}")))?;
        let gated = m.activation == Activation::Gated;
        let b_enc = self.vector(if gated { "b_gate" } else { "b_enc" }, m.d_sae)?;
        let b_dec = if m.has_decoder() {
            self.vector("b_dec", lo * m.d_out)?
        } else {
            Array1::zeros(0)
        };
        let mut w = super::build::Weights::new(w_enc, b_enc, w_dec, b_dec);
        w.threshold = match m.activation {
            Activation::JumpRelu => Some(self.vector("threshold", m.d_sae)?),
            Activation::BatchTopK => Some(self.vector("threshold", 1)?),
            _ => None,
        };
        if gated {
            w.gated = Some(super::build::Gated {
                r_mag: self.vector("r_mag", m.d_sae)?,
                b_mag: self.vector("b_mag", m.d_sae)?,
            });
        }
        if self.has("W_skip") {
            let (_, ws) = self.tensor_f32("W_skip")?;
            w.w_skip = Some(
                Array2::from_shape_vec((m.d_out, m.d_in), ws)
                    .map_err(|e| Error::dictionary(&self.path, format!("`W_skip`: {e}")))?,
            );
            if self.has("b_skip") {
                w.b_skip = Some(self.vector("b_skip", m.d_out)?);
            }
        }
        w.apply_b_dec_to_input = self.b_dec_on_input();
        Ok(w)
    }
}

fn find<'a>(graph: &'a onnx_protobuf::GraphProto, name: &str) -> Option<&'a TensorProto> {
    graph.initializer.iter().find(|t| t.name == name)
}

fn tensor_dims(path: &Path, t: &TensorProto) -> Result<(Vec<usize>, usize)> {
    let mut n: usize = 1;
    let mut dims = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        let d = usize::try_from(d).map_err(|_| {
            Error::dictionary(
                path,
                format!("initializer `{}` has a negative dimension {d}", t.name),
            )
        })?;
        n = n.checked_mul(d).ok_or_else(|| {
            Error::dictionary(
                path,
                format!("initializer `{}` has an impossibly large shape", t.name),
            )
        })?;
        dims.push(d);
    }
    Ok((dims, n))
}

fn check_value(
    path: &Path,
    v: &ValueInfoProto,
    elem: DataType,
    rank: usize,
    last: usize,
) -> Result<()> {
    let err = |m: String| Error::dictionary(path, format!("`{}` {m}", v.name));
    let Some(type_proto::Value::TensorType(t)) = v.type_.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(err("is not a tensor".into()));
    };
    if t.elem_type != elem as i32 {
        return Err(err(format!(
            "has element type {}, expected {elem:?}",
            t.elem_type
        )));
    }
    if let Some(shape) = t.shape.as_ref() {
        if shape.dim.len() != rank {
            return Err(err(format!(
                "has rank {}, expected {rank}",
                shape.dim.len()
            )));
        }
        if let Some(onnx_protobuf::tensor_shape_proto::dimension::Value::DimValue(d)) =
            shape.dim.last().and_then(|d| d.value.as_ref())
            && *d != last as i64
        {
            return Err(err(format!(
                "has last dimension {d}, the metadata says {last}"
            )));
        }
    }
    Ok(())
}

/// Joins an external-data `location` to `base`, refusing anything that could leave `base`:
/// absolute paths, `..`, and symlinks that resolve outside it.
fn safe_join(base: &Path, location: &str) -> std::result::Result<PathBuf, String> {
    let rel = Path::new(location);
    if location.is_empty() {
        return Err("is empty".into());
    }
    for c in rel.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err("climbs out of the model's folder with `..`".into()),
            Component::RootDir | Component::Prefix(_) => return Err("is absolute".into()),
        }
    }
    let joined = base.join(rel);
    let canon_base = base
        .canonicalize()
        .or_else(|_| std::env::current_dir().map(|d| d.join(base)))
        .map_err(|e| format!("cannot resolve the model's folder: {e}"))?;
    let canon = joined
        .canonicalize()
        .map_err(|e| format!("cannot be opened: {e}"))?;
    if !canon.starts_with(&canon_base) {
        return Err(format!(
            "resolves to {}, outside the model's folder",
            canon.display()
        ));
    }
    if !canon.is_file() {
        return Err("is not a regular file".into());
    }
    Ok(canon)
}
