//! A small ONNX graph builder on `onnx-protobuf`, and the writer that moves large weights to ONNX
//! external data.
//!
//! The exporter builds dictionary graphs with it; the runtime builds its own small graphs at load
//! time (pruned encode graphs, sliced dictionaries).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use onnx_protobuf::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
    tensor_proto::DataLocation, tensor_proto::DataType, tensor_shape_proto, type_proto,
};
use protobuf::{EnumOrUnknown, Message, MessageField};

use crate::{Error, Result};

/// The ONNX opset every Tiller graph is written against.
pub const OPSET: i64 = 17;
/// The IR version matching [`OPSET`].
pub const IR_VERSION: i64 = 8;
/// Models whose weights pass this many bytes keep them in ONNX external data: protobuf cannot
/// serialise a message of 2 GiB or more.
pub const EXTERNAL_DATA_THRESHOLD: usize = (1 << 31) - (64 << 20);

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A named symbolic size (the batch).
    Symbolic(String),
}

impl Dim {
    /// The symbolic batch dimension.
    pub fn batch() -> Self {
        Self::Symbolic("batch".into())
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Self {
        Self::Fixed(n)
    }
}

/// An attribute of a node.
#[derive(Debug, Clone)]
pub enum Attr {
    /// A single integer.
    Int(i64),
    /// A list of integers.
    Ints(Vec<i64>),
    /// A single float.
    Float(f32),
    /// A tensor (for `ConstantOfShape`'s value).
    Tensor(Box<TensorProto>),
}

fn attribute(name: &str, value: Attr) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.to_string();
    match value {
        Attr::Int(i) => {
            a.type_ = EnumOrUnknown::new(AttributeType::INT);
            a.i = i;
        }
        Attr::Ints(v) => {
            a.type_ = EnumOrUnknown::new(AttributeType::INTS);
            a.ints = v;
        }
        Attr::Float(f) => {
            a.type_ = EnumOrUnknown::new(AttributeType::FLOAT);
            a.f = f;
        }
        Attr::Tensor(t) => {
            a.type_ = EnumOrUnknown::new(AttributeType::TENSOR);
            a.t = MessageField::some(*t);
        }
    }
    a
}

fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    for d in dims {
        let mut dim = tensor_shape_proto::Dimension::new();
        dim.value = Some(match d {
            Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n as i64),
            Dim::Symbolic(s) => tensor_shape_proto::dimension::Value::DimParam(s.clone()),
        });
        shape.dim.push(dim);
    }
    let mut tensor = type_proto::Tensor::new();
    tensor.elem_type = elem as i32;
    tensor.shape = MessageField::some(shape);
    let mut ty = TypeProto::new();
    ty.value = Some(type_proto::Value::TensorType(tensor));
    let mut vi = ValueInfoProto::new();
    vi.name = name.to_string();
    vi.type_ = MessageField::some(ty);
    vi
}

/// A float32 tensor proto holding `data` with shape `dims`, stored little-endian in `raw_data`.
pub fn tensor_f32(name: &str, dims: &[usize], data: &[f32]) -> TensorProto {
    debug_assert_eq!(dims.iter().product::<usize>(), data.len());
    let mut t = TensorProto::new();
    t.name = name.to_string();
    t.data_type = DataType::FLOAT as i32;
    t.dims = dims.iter().map(|&d| d as i64).collect();
    let mut raw = Vec::with_capacity(data.len() * 4);
    for v in data {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    t.raw_data = raw;
    t
}

/// The little-endian bytes of `data` stored as `elem` (FLOAT, FLOAT16 or BFLOAT16; the half
/// types round to nearest, ties to even).
fn float_bytes(data: &[f32], elem: DataType) -> Vec<u8> {
    match elem {
        DataType::FLOAT16 => data
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        DataType::BFLOAT16 => data
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// A tensor proto holding `data` stored as `elem` (FLOAT, FLOAT16 or BFLOAT16) in `raw_data`.
pub fn tensor_float(name: &str, dims: &[usize], data: &[f32], elem: DataType) -> TensorProto {
    debug_assert_eq!(dims.iter().product::<usize>(), data.len());
    let mut t = TensorProto::new();
    t.name = name.to_string();
    t.data_type = float_elem(elem) as i32;
    t.dims = dims.iter().map(|&d| d as i64).collect();
    t.raw_data = float_bytes(data, elem);
    t
}

/// `elem` if it is one of the float types [`tensor_float`] writes, else FLOAT.
fn float_elem(elem: DataType) -> DataType {
    match elem {
        DataType::FLOAT16 | DataType::BFLOAT16 => elem,
        _ => DataType::FLOAT,
    }
}

/// An int64 tensor proto.
pub fn tensor_i64(name: &str, dims: &[usize], data: &[i64]) -> TensorProto {
    let mut t = TensorProto::new();
    t.name = name.to_string();
    t.data_type = DataType::INT64 as i32;
    t.dims = dims.iter().map(|&d| d as i64).collect();
    t.raw_data = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    t
}

/// Streams large initializers to an ONNX external-data file as a graph is built, so that a model
/// of several GiB is written without a second copy of its weights in memory.
#[derive(Debug)]
pub struct ExternalSink {
    path: PathBuf,
    location: String,
    out: std::io::BufWriter<std::fs::File>,
    offset: u64,
}

impl ExternalSink {
    /// Creates the external-data file beside `model_path` (`<model>.data`).
    pub fn create(model_path: &Path) -> Result<Self> {
        let path = external_data_path(model_path);
        let location = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                Error::invalid(
                    "output path",
                    format!("{} has no UTF-8 file name", model_path.display()),
                )
            })?
            .to_string();
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            path,
            location,
            out: std::io::BufWriter::with_capacity(1 << 20, file),
            offset: 0,
        })
    }

    /// Appends `data` stored as `elem` (4 KiB aligned) and returns the external-data entries that
    /// point at it.
    fn append(&mut self, data: &[f32], elem: DataType) -> Result<Vec<StringStringEntryProto>> {
        let pad = (4096 - self.offset % 4096) % 4096;
        let io = |e| Error::io(&self.path, e);
        self.out.write_all(&vec![0u8; pad as usize]).map_err(io)?;
        self.offset += pad;
        let mut length = 0u64;
        for chunk in data.chunks(1 << 16) {
            let bytes = float_bytes(chunk, elem);
            length += bytes.len() as u64;
            self.out
                .write_all(&bytes)
                .map_err(|e| Error::io(&self.path, e))?;
        }
        let entries = [
            ("location", self.location.clone()),
            ("offset", self.offset.to_string()),
            ("length", length.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| {
            let mut e = StringStringEntryProto::new();
            e.key = k.into();
            e.value = v;
            e
        })
        .collect();
        self.offset += length;
        Ok(entries)
    }

    /// Flushes the file.
    pub fn finish(mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// Builds one ONNX graph: inputs, initializers, nodes, outputs.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    graph: GraphProto,
    counter: usize,
    external: Option<ExternalSink>,
    error: Option<Error>,
}

impl GraphBuilder {
    /// An empty graph called `name`.
    pub fn new(name: &str) -> Self {
        let mut graph = GraphProto::new();
        graph.name = name.to_string();
        Self {
            graph,
            counter: 0,
            external: None,
            error: None,
        }
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, elem: DataType, dims: &[Dim]) -> String {
        self.graph.input.push(value_info(name, elem, dims));
        name.to_string()
    }

    /// Declares a graph output produced by the value `name`.
    pub fn output(&mut self, name: &str, elem: DataType, dims: &[Dim]) {
        self.graph.output.push(value_info(name, elem, dims));
    }

    /// Streams the initializers of 1 KiB or more to `sink` instead of holding them in the model.
    pub fn with_external(mut self, sink: ExternalSink) -> Self {
        self.external = Some(sink);
        self
    }

    /// Adds a float32 initializer and returns its name.
    pub fn weight(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        self.weight_as(name, dims, data, DataType::FLOAT)
    }

    /// Adds an initializer holding `data` stored as `elem` (FLOAT, FLOAT16 or BFLOAT16; the half
    /// types round to nearest, ties to even) and returns its name. Nothing converts it back: a
    /// graph that needs float32 reads it through a `Cast`.
    pub fn weight_as(
        &mut self,
        name: &str,
        dims: &[usize],
        data: &[f32],
        elem: DataType,
    ) -> String {
        match self.external.as_mut().filter(|_| data.len() >= 256) {
            Some(sink) => {
                let mut t = TensorProto::new();
                t.name = name.to_string();
                t.data_type = float_elem(elem) as i32;
                t.dims = dims.iter().map(|&d| d as i64).collect();
                t.data_location = EnumOrUnknown::new(DataLocation::EXTERNAL);
                match sink.append(data, float_elem(elem)) {
                    Ok(entries) => t.external_data = entries,
                    Err(e) => {
                        self.error.get_or_insert(e);
                    }
                }
                self.graph.initializer.push(t);
            }
            None => self
                .graph
                .initializer
                .push(tensor_float(name, dims, data, elem)),
        }
        name.to_string()
    }

    /// Adds an int64 constant initializer (shapes, axes, k) under a fresh name.
    pub fn const_i64(&mut self, hint: &str, data: &[i64]) -> String {
        let name = self.fresh(hint);
        self.graph
            .initializer
            .push(tensor_i64(&name, &[data.len()], data));
        name
    }

    /// Adds a scalar float32 constant initializer under a fresh name.
    pub fn const_f32(&mut self, hint: &str, value: f32) -> String {
        let name = self.fresh(hint);
        self.graph
            .initializer
            .push(tensor_f32(&name, &[], &[value]));
        name
    }

    /// Adds an already-built tensor proto as an initializer.
    pub fn initializer(&mut self, tensor: TensorProto) -> String {
        let name = tensor.name.clone();
        self.graph.initializer.push(tensor);
        name
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}_{}", self.counter)
    }

    /// Adds a node with one output named after `hint`, and returns that output's name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh(&op.to_ascii_lowercase());
        self.op_into(op, inputs, &[&out], attrs);
        out
    }

    /// Adds a node writing the given, named outputs.
    pub fn op_into(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<(&str, Attr)>,
    ) {
        let mut node = NodeProto::new();
        node.op_type = op.to_string();
        node.name = self.fresh(&format!("{op}_node"));
        node.input = inputs.iter().map(|s| s.to_string()).collect();
        node.output = outputs.iter().map(|s| s.to_string()).collect();
        node.attribute = attrs.into_iter().map(|(n, v)| attribute(n, v)).collect();
        self.graph.node.push(node);
    }

    /// Finishes the model with the given metadata, and flushes the external-data file if any.
    pub fn finish_checked(mut self, metadata: &[(String, String)]) -> Result<ModelProto> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if let Some(sink) = self.external.take() {
            sink.finish()?;
        }
        Ok(self.finish(metadata))
    }

    /// Finishes the model with the given metadata.
    pub fn finish(self, metadata: &[(String, String)]) -> ModelProto {
        let mut model = ModelProto::new();
        model.ir_version = IR_VERSION;
        model.producer_name = "tiller".into();
        model.producer_version = env!("CARGO_PKG_VERSION").into();
        let mut opset = OperatorSetIdProto::new();
        opset.domain = String::new();
        opset.version = OPSET;
        model.opset_import.push(opset);
        model.graph = MessageField::some(self.graph);
        for (k, v) in metadata {
            let mut e = StringStringEntryProto::new();
            e.key = k.clone();
            e.value = v.clone();
            model.metadata_props.push(e);
        }
        model
    }
}

/// Keeps only the nodes needed to compute `outputs`, and the initializers they read.
pub fn prune(model: &ModelProto, outputs: &[&str]) -> Result<ModelProto> {
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| Error::invalid("model", "it has no graph"))?;
    let mut needed: HashSet<String> = outputs.iter().map(|s| s.to_string()).collect();
    let mut keep = vec![false; graph.node.len()];
    for (i, node) in graph.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| needed.contains(o)) {
            keep[i] = true;
            for inp in &node.input {
                needed.insert(inp.clone());
            }
        }
    }
    let mut out = model.clone();
    let g = out.graph.mut_or_insert_default();
    let mut k = keep.iter();
    g.node.retain(|_| *k.next().unwrap_or(&false));
    g.initializer.retain(|t| needed.contains(&t.name));
    g.input.retain(|v| needed.contains(&v.name));
    g.output.retain(|v| outputs.contains(&v.name.as_str()));
    for o in outputs {
        if !g.output.iter().any(|v| v.name == *o) {
            return Err(Error::invalid(
                "output",
                format!("the graph has no output `{o}`"),
            ));
        }
    }
    Ok(out)
}

/// The file ONNX external data is written to, beside `model_path`.
pub fn external_data_path(model_path: &Path) -> PathBuf {
    let mut name = model_path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".data");
    model_path.with_file_name(name)
}

/// Total bytes of the initializers' stored data.
pub fn weight_bytes(model: &ModelProto) -> usize {
    model
        .graph
        .as_ref()
        .map_or(0, |g| g.initializer.iter().map(|t| t.raw_data.len()).sum())
}

/// Writes `model` to `path`. When its weights pass `threshold` bytes, every initializer of 1 KiB or
/// more moves to `<path>.data` as ONNX external data (offsets aligned to 4 KiB, for mmap).
pub fn write_model(mut model: ModelProto, path: &Path, threshold: usize) -> Result<()> {
    if weight_bytes(&model) > threshold {
        let data_path = external_data_path(path);
        let location = data_path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                Error::invalid(
                    "output path",
                    format!("{} has no UTF-8 file name", path.display()),
                )
            })?
            .to_string();
        let file = std::fs::File::create(&data_path).map_err(|e| Error::io(&data_path, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        let mut offset = 0usize;
        let g = model.graph.mut_or_insert_default();
        for t in g.initializer.iter_mut() {
            if t.raw_data.len() < 1024 {
                continue;
            }
            let pad = (4096 - offset % 4096) % 4096;
            w.write_all(&vec![0u8; pad])
                .map_err(|e| Error::io(&data_path, e))?;
            offset += pad;
            let raw = std::mem::take(&mut t.raw_data);
            w.write_all(&raw).map_err(|e| Error::io(&data_path, e))?;
            let entry = |k: &str, v: String| {
                let mut e = StringStringEntryProto::new();
                e.key = k.into();
                e.value = v;
                e
            };
            t.external_data = vec![
                entry("location", location.clone()),
                entry("offset", offset.to_string()),
                entry("length", raw.len().to_string()),
            ];
            t.data_location = EnumOrUnknown::new(DataLocation::EXTERNAL);
            offset += raw.len();
        }
        w.flush().map_err(|e| Error::io(&data_path, e))?;
    }
    let bytes = model
        .write_to_bytes()
        .map_err(|e| Error::invalid("model", format!("cannot serialise it: {e}")))?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}
