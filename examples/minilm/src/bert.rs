//! The BERT encoder of all-MiniLM-L6-v2 as two ONNX graphs built with Tiller's graph builder
//! from the safetensors weights: the *front* runs the embeddings and layers `0..=hook_layer` and
//! outputs the residual stream after the hook layer; the *back* runs the remaining layers, then
//! mean-pools over the attention mask and L2-normalises, as sentence-transformers does.
//!
//! The host edits the front's output in place between the two (that is the hook). BERT is
//! post-LayerNorm, so the residual stream after layer `l` is the output of layer `l`'s final
//! LayerNorm: what HuggingFace returns as `hidden_states[l + 1]`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use onnx_protobuf::ModelProto;
use onnx_protobuf::tensor_proto::DataType;
use serde::Deserialize;
use tiller_runtime::graph::{Attr, Dim, GraphBuilder};

/// The fields of `config.json` the graph needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest input.
    pub max_position_embeddings: usize,
    /// LayerNorm ε.
    pub layer_norm_eps: f64,
    /// Only `gelu` (the exact, erf form) is supported.
    pub hidden_act: String,
}

impl BertConfig {
    /// Reads and checks `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: Self =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        ensure!(
            c.hidden_act == "gelu",
            "{}: hidden_act {:?} is not supported (only \"gelu\")",
            path.display(),
            c.hidden_act
        );
        ensure!(
            c.num_attention_heads > 0 && c.hidden_size.is_multiple_of(c.num_attention_heads),
            "{}: hidden_size {} is not a multiple of num_attention_heads {}",
            path.display(),
            c.hidden_size,
            c.num_attention_heads
        );
        ensure!(
            c.num_hidden_layers > 0 && c.hidden_size > 0 && c.intermediate_size > 0,
            "{}: empty model",
            path.display()
        );
        Ok(c)
    }
}

/// The float32 tensors of `model.safetensors`, by name.
#[derive(Debug)]
pub struct BertWeights {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    path: String,
}

impl BertWeights {
    /// Reads every float32 tensor of a safetensors file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                continue;
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            tensors.insert(name, (view.shape().to_vec(), data));
        }
        Ok(Self {
            tensors,
            path: path.display().to_string(),
        })
    }

    /// The tensor `name`, checked to have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<&[f32]> {
        let (s, d) = self
            .tensors
            .get(name)
            .with_context(|| format!("{}: no float32 tensor {name:?}", self.path))?;
        ensure!(
            s == shape,
            "{}: {name} has shape {s:?}, expected {shape:?}",
            self.path
        );
        Ok(d)
    }

    /// A `[out, in]` linear weight, transposed to `[in, out]` for `x · W`.
    fn linear_t(&self, name: &str, out: usize, inp: usize) -> Result<Vec<f32>> {
        let w = self.get(name, &[out, inp])?;
        let mut t = vec![0.0; w.len()];
        for o in 0..out {
            for i in 0..inp {
                t[i * out + o] = w[o * inp + i];
            }
        }
        Ok(t)
    }
}

/// Which part of the encoder a graph holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Embeddings and layers `0..=hook_layer`: inputs `input_ids`, `attention_mask`
    /// (`[batch, seq]` int64), output `hidden` `[batch, seq, d]`.
    Front,
    /// Layers `hook_layer+1..`, mean pooling and normalisation: inputs `hidden`,
    /// `attention_mask`, output `embedding` `[batch, d]`.
    Back,
}

struct Ctx<'a> {
    g: GraphBuilder,
    w: &'a BertWeights,
    c: &'a BertConfig,
}

impl Ctx<'_> {
    fn vector(&mut self, name: &str, n: usize) -> Result<String> {
        let data = self.w.get(name, &[n])?.to_vec();
        Ok(self.g.weight(name, &[n], &data))
    }

    fn linear(&mut self, x: &str, prefix: &str, out: usize, inp: usize) -> Result<String> {
        let wt = self.w.linear_t(&format!("{prefix}.weight"), out, inp)?;
        let w = self
            .g
            .weight(&format!("{prefix}.weight_t"), &[inp, out], &wt);
        let b = self.vector(&format!("{prefix}.bias"), out)?;
        let y = self.g.op("MatMul", &[x, &w], vec![]);
        Ok(self.g.op("Add", &[&y, &b], vec![]))
    }

    fn layer_norm(&mut self, x: &str, prefix: &str) -> Result<String> {
        let d = self.c.hidden_size;
        let s = self.vector(&format!("{prefix}.weight"), d)?;
        let b = self.vector(&format!("{prefix}.bias"), d)?;
        Ok(self.g.op(
            "LayerNormalization",
            &[x, &s, &b],
            vec![
                ("axis", Attr::Int(-1)),
                ("epsilon", Attr::Float(self.c.layer_norm_eps as f32)),
            ],
        ))
    }

    /// One BERT layer on `h` (`[batch, seq, d]`) with the additive mask `bias` (`[batch,1,1,seq]`).
    fn layer(&mut self, h: &str, bias: &str, l: usize) -> Result<String> {
        let (d, nh, ff) = (
            self.c.hidden_size,
            self.c.num_attention_heads,
            self.c.intermediate_size,
        );
        let hd = d / nh;
        let p = format!("encoder.layer.{l}");
        let heads = self
            .g
            .const_i64("heads_shape", &[0, 0, nh as i64, hd as i64]);
        let q = self.linear(h, &format!("{p}.attention.self.query"), d, d)?;
        let k = self.linear(h, &format!("{p}.attention.self.key"), d, d)?;
        let v = self.linear(h, &format!("{p}.attention.self.value"), d, d)?;
        let q = self.g.op("Reshape", &[&q, &heads], vec![]);
        let q = self.g.op(
            "Transpose",
            &[&q],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        );
        let k = self.g.op("Reshape", &[&k, &heads], vec![]);
        let k = self.g.op(
            "Transpose",
            &[&k],
            vec![("perm", Attr::Ints(vec![0, 2, 3, 1]))],
        );
        let v = self.g.op("Reshape", &[&v, &heads], vec![]);
        let v = self.g.op(
            "Transpose",
            &[&v],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        );
        let scores = self.g.op("MatMul", &[&q, &k], vec![]);
        let scale = self.g.const_f32("attn_scale", 1.0 / (hd as f32).sqrt());
        let scores = self.g.op("Mul", &[&scores, &scale], vec![]);
        let scores = self.g.op("Add", &[&scores, bias], vec![]);
        let probs = self
            .g
            .op("Softmax", &[&scores], vec![("axis", Attr::Int(-1))]);
        let ctx = self.g.op("MatMul", &[&probs, &v], vec![]);
        let ctx = self.g.op(
            "Transpose",
            &[&ctx],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        );
        let merged = self.g.const_i64("merged_shape", &[0, 0, d as i64]);
        let ctx = self.g.op("Reshape", &[&ctx, &merged], vec![]);
        let attn = self.linear(&ctx, &format!("{p}.attention.output.dense"), d, d)?;
        let attn = self.g.op("Add", &[&attn, h], vec![]);
        let h1 = self.layer_norm(&attn, &format!("{p}.attention.output.LayerNorm"))?;
        let inter = self.linear(&h1, &format!("{p}.intermediate.dense"), ff, d)?;
        let inter = self.gelu(&inter);
        let out = self.linear(&inter, &format!("{p}.output.dense"), d, ff)?;
        let out = self.g.op("Add", &[&out, &h1], vec![]);
        self.layer_norm(&out, &format!("{p}.output.LayerNorm"))
    }

    /// gelu(x) = x · (1 + erf(x / √2)) / 2, the exact form BERT uses.
    fn gelu(&mut self, x: &str) -> String {
        let sqrt2 = self.g.const_f32("sqrt2", std::f32::consts::SQRT_2);
        let one = self.g.const_f32("one", 1.0);
        let half = self.g.const_f32("half", 0.5);
        let t = self.g.op("Div", &[x, &sqrt2], vec![]);
        let t = self.g.op("Erf", &[&t], vec![]);
        let t = self.g.op("Add", &[&t, &one], vec![]);
        let t = self.g.op("Mul", &[x, &t], vec![]);
        self.g.op("Mul", &[&t, &half], vec![])
    }

    /// `[batch, seq]` int64 mask → `[batch, 1, 1, seq]` additive bias (0 or -10000), and the
    /// float mask `[batch, seq]`.
    fn mask(&mut self, mask: &str) -> (String, String) {
        let m = self.g.op(
            "Cast",
            &[mask],
            vec![("to", Attr::Int(DataType::FLOAT as i64))],
        );
        let one = self.g.const_f32("one", 1.0);
        let neg = self.g.const_f32("mask_neg", -10000.0);
        let inv = self.g.op("Sub", &[&one, &m], vec![]);
        let bias = self.g.op("Mul", &[&inv, &neg], vec![]);
        let axes = self.g.const_i64("mask_axes", &[1, 2]);
        (self.g.op("Unsqueeze", &[&bias, &axes], vec![]), m)
    }
}

/// Builds the front or back graph for a hook after layer `hook_layer`.
pub fn build(w: &BertWeights, c: &BertConfig, hook_layer: usize, part: Part) -> Result<ModelProto> {
    if hook_layer >= c.num_hidden_layers {
        bail!(
            "hook layer {hook_layer} does not exist: the model has layers 0..={}",
            c.num_hidden_layers - 1
        );
    }
    let d = c.hidden_size;
    let mut ctx = Ctx {
        g: GraphBuilder::new(match part {
            Part::Front => "minilm_front",
            Part::Back => "minilm_back",
        }),
        w,
        c,
    };
    let seq = Dim::Symbolic("seq".into());
    let batch = Dim::batch();
    let mask = ctx.g.input(
        "attention_mask",
        DataType::INT64,
        &[batch.clone(), seq.clone()],
    );
    match part {
        Part::Front => {
            let ids = ctx
                .g
                .input("input_ids", DataType::INT64, &[batch.clone(), seq.clone()]);
            let words = ctx
                .w
                .get("embeddings.word_embeddings.weight", &[c.vocab_size, d])?
                .to_vec();
            let words = ctx.g.weight(
                "embeddings.word_embeddings.weight",
                &[c.vocab_size, d],
                &words,
            );
            let x = ctx.g.op("Gather", &[&words, &ids], vec![]);
            let pos_table = ctx
                .w
                .get(
                    "embeddings.position_embeddings.weight",
                    &[c.max_position_embeddings, d],
                )?
                .to_vec();
            let pos_table = ctx.g.weight(
                "embeddings.position_embeddings.weight",
                &[c.max_position_embeddings, d],
                &pos_table,
            );
            let len = ctx.g.op(
                "Shape",
                &[&ids],
                vec![("start", Attr::Int(1)), ("end", Attr::Int(2))],
            );
            let zero = ctx.g.const_i64("zero", &[0]);
            let pos = ctx.g.op("Slice", &[&pos_table, &zero, &len, &zero], vec![]);
            let x = ctx.g.op("Add", &[&x, &pos], vec![]);
            // Single-segment inputs: every token has token type 0.
            let types = ctx
                .w
                .get("embeddings.token_type_embeddings.weight", &[2, d])?;
            let type0 = ctx.g.weight("embeddings.token_type_0", &[d], &types[..d]);
            let x = ctx.g.op("Add", &[&x, &type0], vec![]);
            let mut h = ctx.layer_norm(&x, "embeddings.LayerNorm")?;
            let (bias, _) = ctx.mask(&mask);
            for l in 0..=hook_layer {
                h = ctx.layer(&h, &bias, l)?;
            }
            ctx.g.op_into("Identity", &[&h], &["hidden"], vec![]);
            ctx.g
                .output("hidden", DataType::FLOAT, &[batch, seq, Dim::Fixed(d)]);
        }
        Part::Back => {
            let mut h = ctx.g.input(
                "hidden",
                DataType::FLOAT,
                &[batch.clone(), seq.clone(), Dim::Fixed(d)],
            );
            let (bias, m) = ctx.mask(&mask);
            for l in hook_layer + 1..c.num_hidden_layers {
                h = ctx.layer(&h, &bias, l)?;
            }
            let axis2 = ctx.g.const_i64("axis2", &[2]);
            let m3 = ctx.g.op("Unsqueeze", &[&m, &axis2], vec![]);
            let masked = ctx.g.op("Mul", &[&h, &m3], vec![]);
            let axis1 = ctx.g.const_i64("axis1", &[1]);
            let sum = ctx.g.op(
                "ReduceSum",
                &[&masked, &axis1],
                vec![("keepdims", Attr::Int(0))],
            );
            let count = ctx.g.op(
                "ReduceSum",
                &[&m3, &axis1],
                vec![("keepdims", Attr::Int(0))],
            );
            let tiny = ctx.g.const_f32("count_min", 1e-9);
            let count = ctx.g.op("Max", &[&count, &tiny], vec![]);
            let mean = ctx.g.op("Div", &[&sum, &count], vec![]);
            let sq = ctx.g.op("Mul", &[&mean, &mean], vec![]);
            let ss = ctx.g.op(
                "ReduceSum",
                &[&sq, &axis1],
                vec![("keepdims", Attr::Int(1))],
            );
            let norm = ctx.g.op("Sqrt", &[&ss], vec![]);
            let eps = ctx.g.const_f32("norm_min", 1e-12);
            let norm = ctx.g.op("Max", &[&norm, &eps], vec![]);
            ctx.g
                .op_into("Div", &[&mean, &norm], &["embedding"], vec![]);
            ctx.g
                .output("embedding", DataType::FLOAT, &[batch, Dim::Fixed(d)]);
        }
    }
    ctx.g
        .finish_checked(&[])
        .map_err(|e| anyhow::anyhow!("building the {part:?} graph: {e}"))
}
