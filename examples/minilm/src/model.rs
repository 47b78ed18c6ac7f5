//! all-MiniLM-L6-v2 on ONNX Runtime with a hook between the front and back graphs.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, anyhow, ensure};
use ndarray::Array2;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;
use protobuf::Message;
use tokenizers::Tokenizer;

use crate::bert::{BertConfig, BertWeights, Part, build};

/// A hook: called with the residual stream of a batch, edits it in place.
pub type HookFn<'a> = dyn FnMut(&mut Hidden<'_>) -> Result<()> + 'a;

/// How to load the model.
#[derive(Debug, Clone)]
pub struct Options {
    /// The residual stream after this layer is the hook (0-based).
    pub hook_layer: usize,
    /// Longest input in tokens, `[CLS]` and `[SEP]` included (sentence-transformers: 256).
    pub max_tokens: usize,
    /// Threads per ONNX Runtime session.
    pub intra_threads: usize,
    /// Sessions in the pool (concurrent calls).
    pub pool_size: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            hook_layer: 3,
            max_tokens: 256,
            intra_threads: 1,
            pool_size: 1,
        }
    }
}

/// Token ids of one text, `[CLS]` and `[SEP]` included, with the token strings.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// Vocabulary ids.
    pub ids: Vec<u32>,
    /// The tokens as the tokenizer wrote them (`##` marks a word piece).
    pub tokens: Vec<String>,
}

/// The residual stream of one batch at the hook: the real (unpadded) tokens of every sequence,
/// one row each, in sequence order.
#[derive(Debug)]
pub struct Hidden<'a> {
    /// `[rows, d]` row-major, edited in place by the hook.
    pub data: &'a mut [f32],
    /// Width of a row.
    pub d: usize,
    /// The rows of each sequence.
    pub sequences: &'a [Range<usize>],
}

struct Pair {
    front: Session,
    back: Session,
}

/// The model: tokenizer and a pool of (front, back) ONNX Runtime sessions. `Send + Sync`.
pub struct MiniLm {
    tokenizer: Tokenizer,
    config: BertConfig,
    opts: Options,
    pool: Vec<Mutex<Pair>>,
    dir: PathBuf,
}

impl std::fmt::Debug for MiniLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniLm")
            .field("dir", &self.dir)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl MiniLm {
    /// Loads the model from `dir` (see [`crate::provision::model_dir`]).
    pub fn load(dir: &Path, opts: Options) -> Result<Self> {
        let config = BertConfig::load(&dir.join("config.json"))?;
        ensure!(
            opts.max_tokens >= 3 && opts.max_tokens <= config.max_position_embeddings,
            "max_tokens {} must be in 3..={}",
            opts.max_tokens,
            config.max_position_embeddings
        );
        let weights = BertWeights::load(&dir.join("model.safetensors"))?;
        let front = build(&weights, &config, opts.hook_layer, Part::Front)?
            .write_to_bytes()
            .context("serialising the front graph")?;
        let back = build(&weights, &config, opts.hook_layer, Part::Back)?
            .write_to_bytes()
            .context("serialising the back graph")?;
        drop(weights);
        let env = tiller_runtime::onnxruntime::init(None)?;
        let session = |bytes: &[u8]| -> Result<Session> {
            let fail = |e: &dyn std::fmt::Display| {
                anyhow!("creating an ONNX Runtime session for MiniLM: {e}")
            };
            Session::builder(&env)
                .map_err(|e| fail(&e))?
                .with_optimization_level(GraphOptimizationLevel::Level3)
                .map_err(|e| fail(&e))?
                .with_intra_threads(opts.intra_threads.max(1))
                .map_err(|e| fail(&e))?
                .with_inter_threads(1)
                .map_err(|e| fail(&e))?
                .commit_from_memory(bytes)
                .map_err(|e| fail(&e))
        };
        let mut pool = Vec::new();
        for _ in 0..opts.pool_size.max(1) {
            pool.push(Mutex::new(Pair {
                front: session(&front)?,
                back: session(&back)?,
            }));
        }
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|e| anyhow!("{}: {e}", tok_path.display()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: opts.max_tokens,
                ..Default::default()
            }))
            .map_err(|e| anyhow!("{}: {e}", tok_path.display()))?;
        Ok(Self {
            tokenizer,
            config,
            opts,
            pool,
            dir: dir.to_path_buf(),
        })
    }

    /// The model's width.
    pub fn d(&self) -> usize {
        self.config.hidden_size
    }

    /// The hook layer.
    pub fn hook_layer(&self) -> usize {
        self.opts.hook_layer
    }

    /// The hook's name, as dictionaries trained on it record it.
    pub fn hook_name(&self) -> String {
        hook_name(self.opts.hook_layer)
    }

    /// Tokenises texts (truncated to `max_tokens`).
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Tokens>> {
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow!("tokenising: {e}"))?;
        Ok(enc
            .into_iter()
            .map(|e| Tokens {
                ids: e.get_ids().to_vec(),
                tokens: e.get_tokens().to_vec(),
            })
            .collect())
    }

    /// Tokenises a text without special tokens or truncation (for chunking long documents).
    pub fn word_pieces(&self, text: &str) -> Result<Tokens> {
        let e = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenising: {e}"))?;
        // `encode_fast` skips the token strings: look them up.
        let ids = e.get_ids().to_vec();
        let tokens = ids
            .iter()
            .map(|&id| {
                self.tokenizer
                    .id_to_token(id)
                    .unwrap_or_else(|| "[UNK]".into())
            })
            .collect();
        Ok(Tokens { ids, tokens })
    }

    /// The special ids `[CLS]` and `[SEP]`.
    pub fn cls_sep(&self) -> Result<(u32, u32)> {
        let id = |t: &str| {
            self.tokenizer
                .token_to_id(t)
                .with_context(|| format!("the vocabulary has no {t}"))
        };
        Ok((id("[CLS]")?, id("[SEP]")?))
    }

    fn padded(&self, seqs: &[&[u32]]) -> Result<(Vec<i64>, Vec<i64>, usize)> {
        ensure!(!seqs.is_empty(), "no input");
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        ensure!(t > 0, "an input has no tokens");
        ensure!(
            t <= self.config.max_position_embeddings,
            "an input has {t} tokens; the model takes at most {}",
            self.config.max_position_embeddings
        );
        let mut ids = vec![0i64; seqs.len() * t];
        let mut mask = vec![0i64; seqs.len() * t];
        for (b, s) in seqs.iter().enumerate() {
            ensure!(!s.is_empty(), "input {b} has no tokens");
            for (j, &id) in s.iter().enumerate() {
                ensure!(
                    (id as usize) < self.config.vocab_size,
                    "token id {id} is outside the vocabulary ({})",
                    self.config.vocab_size
                );
                ids[b * t + j] = i64::from(id);
                mask[b * t + j] = 1;
            }
        }
        Ok((ids, mask, t))
    }

    fn with_pair<T>(&self, f: impl FnOnce(&mut Pair) -> Result<T>) -> Result<T> {
        for p in &self.pool {
            if let Ok(mut p) = p.try_lock() {
                return f(&mut p);
            }
        }
        let mut p = self.pool[0].lock().unwrap_or_else(|p| p.into_inner());
        f(&mut p)
    }

    /// Runs the front graph: the residual stream at the hook, real tokens only, and each
    /// sequence's rows.
    pub fn hidden(&self, seqs: &[&[u32]]) -> Result<(Array2<f32>, Vec<Range<usize>>)> {
        let (ids, mask, t) = self.padded(seqs)?;
        self.with_pair(|p| self.front(p, seqs, &ids, &mask, t))
    }

    fn front(
        &self,
        p: &mut Pair,
        seqs: &[&[u32]],
        ids: &[i64],
        mask: &[i64],
        t: usize,
    ) -> Result<(Array2<f32>, Vec<Range<usize>>)> {
        let d = self.d();
        let shape = vec![seqs.len() as i64, t as i64];
        let out = p
            .front
            .run(ort::inputs![
                "input_ids" => TensorRef::from_array_view((shape.clone(), ids))?,
                "attention_mask" => TensorRef::from_array_view((shape, mask))?,
            ])
            .map_err(|e| anyhow!("running MiniLM (front): {e}"))?;
        let h = out["hidden"]
            .try_extract_array::<f32>()
            .map_err(|e| anyhow!("reading `hidden`: {e}"))?;
        let h = h.as_slice().context("`hidden` is not contiguous")?;
        let rows: usize = seqs.iter().map(|s| s.len()).sum();
        let mut data = Vec::with_capacity(rows * d);
        let mut ranges = Vec::with_capacity(seqs.len());
        for (b, s) in seqs.iter().enumerate() {
            let start = data.len() / d;
            data.extend_from_slice(&h[b * t * d..(b * t + s.len()) * d]);
            ranges.push(start..start + s.len());
        }
        Ok((Array2::from_shape_vec((rows, d), data)?, ranges))
    }

    /// Embeds token-id sequences, calling `hook` on the residual stream at the hook layer.
    /// Returns `[n, d]` unit-norm sentence embeddings.
    pub fn embed_ids(&self, seqs: &[&[u32]], hook: Option<&mut HookFn<'_>>) -> Result<Array2<f32>> {
        let (ids, mask, t) = self.padded(seqs)?;
        let d = self.d();
        self.with_pair(|p| {
            let (mut hidden, ranges) = self.front(p, seqs, &ids, &mask, t)?;
            if let Some(hook) = hook {
                let data = hidden.as_slice_mut().context("hidden is not contiguous")?;
                hook(&mut Hidden {
                    data,
                    d,
                    sequences: &ranges,
                })?;
            }
            let mut padded = vec![0f32; seqs.len() * t * d];
            for (b, r) in ranges.iter().enumerate() {
                let rows = hidden.slice(ndarray::s![r.clone(), ..]);
                let dst = &mut padded[b * t * d..(b * t + r.len()) * d];
                dst.copy_from_slice(rows.as_slice().context("rows are not contiguous")?);
            }
            let out = p
                .back
                .run(ort::inputs![
                    "hidden" => TensorRef::from_array_view((vec![seqs.len() as i64, t as i64, d as i64], &padded[..]))?,
                    "attention_mask" => TensorRef::from_array_view((vec![seqs.len() as i64, t as i64], &mask[..]))?,
                ])
                .map_err(|e| anyhow!("running MiniLM (back): {e}"))?;
            let e = out["embedding"]
                .try_extract_array::<f32>()
                .map_err(|e| anyhow!("reading `embedding`: {e}"))?;
            Ok(e.to_owned().into_dimensionality()?)
        })
    }

    /// Tokenises and embeds texts, calling `hook` at the hook layer.
    pub fn embed(
        &self,
        texts: &[&str],
        hook: Option<&mut HookFn<'_>>,
    ) -> Result<(Array2<f32>, Vec<Tokens>)> {
        let toks = self.tokenize(texts)?;
        let seqs: Vec<&[u32]> = toks.iter().map(|t| t.ids.as_slice()).collect();
        Ok((self.embed_ids(&seqs, hook)?, toks))
    }
}

/// The hook name of the residual stream after `layer`.
pub fn hook_name(layer: usize) -> String {
    format!("encoder.layer.{layer}")
}
