//! An OpenAI-compatible embedding server for all-MiniLM-L6-v2 with Tiller attached to the residual
//! stream after a chosen layer.
//!
//! - `POST /v1/embeddings`: `{"input": "text" | ["text", ...], "model": "...",
//!   "encoding_format": "float" | "base64", "tiller_profile": "name", "tiller_overrides": {...}}`;
//!   the profile may also come from the `X-Tiller-Profile` header (the body field wins). The answer
//!   is OpenAI's shape plus a `tiller` object per input: its profile, monitor events and steering
//!   counts. `base64` is what OpenAI's API returns: the little-endian float32 bytes of the vector,
//!   base64-encoded (the official Python client asks for it by default).
//! - A stop is a stop: an input whose Tiller request a monitor or policy asked to stop is answered
//!   with `"embedding": null` and `tiller.stopped: true`, `tiller.stop: {"monitor", "token"}`,
//!   never with the embedding computed under it; the other inputs of the call are answered as
//!   usual. Counted in `embedding_server_stopped_inputs_total{monitor}`.
//! - `GET /metrics`: Tiller's Prometheus metrics and the server's own.
//! - `GET /healthz`: `{"status": "ok", ...}` once the model and runtime are loaded.
//!
//! Each HTTP request's inputs run as one batch; each input is one Tiller request with its own
//! profile. The model runs on a blocking thread pool; the runtime is shared.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tiller_minilm::{Hidden, MiniLm};
use tiller_runtime::{ActivationsMut, Phase, RequestSummary, Runtime, Token};

pub mod client;
pub mod pipeline;

/// Most inputs in one request.
pub const MAX_INPUTS: usize = 256;
/// Largest request body.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    /// The model.
    pub model: Arc<MiniLm>,
    /// The runtime attached at the hook.
    pub runtime: Arc<Runtime>,
    /// The model name reported back.
    pub model_name: String,
    next_id: AtomicU64,
    http_requests: AtomicU64,
    http_errors: AtomicU64,
    inputs_by_profile: Mutex<BTreeMap<String, u64>>,
    stopped_by_monitor: Mutex<BTreeMap<String, u64>>,
}

impl AppState {
    /// Shares a model and a runtime.
    pub fn new(model: Arc<MiniLm>, runtime: Arc<Runtime>) -> Self {
        Self {
            model,
            runtime,
            model_name: "all-MiniLM-L6-v2".into(),
            next_id: AtomicU64::new(1),
            http_requests: AtomicU64::new(0),
            http_errors: AtomicU64::new(0),
            inputs_by_profile: Mutex::new(BTreeMap::new()),
            stopped_by_monitor: Mutex::new(BTreeMap::new()),
        }
    }
}

/// The server's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingRequest {
    input: Input,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    tiller_profile: Option<String>,
    #[serde(default)]
    tiller_overrides: Option<Value>,
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    refusal(status, kind, message, None, None)
}

/// OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`.
fn refusal(
    status: StatusCode,
    kind: &str,
    message: impl Into<String>,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    (
        status,
        Json(json!({"error": {"message": message.into(), "type": kind, "param": param, "code": code}})),
    )
        .into_response()
}

async fn embeddings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    state.http_requests.fetch_add(1, Ordering::Relaxed);
    // A body over `MAX_BODY_BYTES` is answered in OpenAI's shape too (413), not as plain text.
    let body = match body {
        Ok(b) => b,
        Err(r) => {
            state.http_errors.fetch_add(1, Ordering::Relaxed);
            return error(r.status(), "invalid_request_error", r.body_text());
        }
    };
    let resp = match parse(&headers, &body, &state) {
        Ok(job) => {
            let st = state.clone();
            match tokio::task::spawn_blocking(move || run(&st, job)).await {
                Ok(Ok(v)) => Json(v).into_response(),
                Ok(Err(Failure::Overrides { param, message })) => refusal(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    format!("{param}: {message}"),
                    Some(&param),
                    Some("tiller_overrides_refused"),
                ),
                Ok(Err(Failure::Other(status, kind, msg))) => error(status, kind, msg),
                Err(e) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    format!("the embedding task failed: {e}"),
                ),
            }
        }
        Err(msg) => error(StatusCode::BAD_REQUEST, "invalid_request_error", msg),
    };
    if !resp.status().is_success() {
        state.http_errors.fetch_add(1, Ordering::Relaxed);
    }
    resp
}

struct Job {
    texts: Vec<String>,
    profile: Option<String>,
    overrides: Option<String>,
    base64: bool,
}

fn parse(headers: &HeaderMap, body: &[u8], state: &AppState) -> Result<Job, String> {
    let req: EmbeddingRequest = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not a valid embeddings request: {e}"))?;
    let texts = match req.input {
        Input::One(s) => vec![s],
        Input::Many(v) => v,
    };
    if texts.is_empty() {
        return Err("`input` is empty".into());
    }
    if texts.len() > MAX_INPUTS {
        return Err(format!(
            "`input` has {} texts; at most {MAX_INPUTS}",
            texts.len()
        ));
    }
    if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
        return Err(format!("`input[{i}]` is empty"));
    }
    if let Some(m) = &req.model
        && m != &state.model_name
        && m != "sentence-transformers/all-MiniLM-L6-v2"
    {
        return Err(format!(
            "model {m:?} is not served here (this server runs {:?})",
            state.model_name
        ));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(f) => {
            return Err(format!(
                "`encoding_format` {f:?} is not supported (\"float\" or \"base64\")"
            ));
        }
    };
    if let Some(d) = req.dimensions
        && d != state.model.d()
    {
        return Err(format!(
            "dimensions {d} is not supported (the model gives {})",
            state.model.d()
        ));
    }
    let header_profile = match headers.get("x-tiller-profile") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| "the X-Tiller-Profile header is not text".to_string())?
                .to_string(),
        ),
        None => None,
    };
    let profile = req
        .tiller_profile
        .or(header_profile)
        .filter(|p| !p.is_empty());
    let overrides = req.tiller_overrides.map(|v| v.to_string());
    Ok(Job {
        texts,
        profile,
        overrides,
        base64,
    })
}

enum Failure {
    /// The runtime refused the request's `tiller_overrides` at `param` (its field in the body).
    Overrides {
        param: String,
        message: String,
    },
    Other(StatusCode, &'static str, String),
}

/// What [`embed`] returns: `[n, d]` embeddings, each input's token count and Tiller summary.
#[derive(Debug)]
pub struct Embedded {
    /// Unit-norm sentence embeddings, one row per input.
    pub embeddings: ndarray::Array2<f32>,
    /// Tokens per input, `[CLS]` and `[SEP]` included.
    pub tokens: Vec<usize>,
    /// Each input's Tiller request summary. Where `stopped` is set, the row of `embeddings` was
    /// computed under a stopped request: the server withholds it.
    pub summaries: Vec<RequestSummary>,
}

/// Why [`embed`] failed.
#[derive(Debug)]
pub enum EmbedError {
    /// The caller's fault: an unknown profile.
    BadRequest(String),
    /// The runtime refused the overrides ([`tiller_runtime::Error::Override`]): `field` is the path into
    /// them (`steer[3].strength`; empty: the whole overrides).
    Overrides {
        /// The field.
        field: String,
        /// Why, naming the operator's bound where one was crossed.
        message: String,
    },
    /// Ours.
    Internal(anyhow::Error),
}

impl std::fmt::Display for EmbedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadRequest(m) => f.write_str(m),
            Self::Overrides { field, message } => write!(f, "overrides `{field}`: {message}"),
            Self::Internal(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for EmbedError {}

/// Embeds `texts` as one batch, each text a Tiller request with `profile` and `overrides`
/// (JSON), Tiller running at the hook. What the HTTP handler does, callable in-process.
pub fn embed(
    state: &AppState,
    texts: &[&str],
    profile: Option<&str>,
    overrides: Option<&str>,
) -> Result<Embedded, EmbedError> {
    let toks = state.model.tokenize(texts).map_err(EmbedError::Internal)?;
    let ids: Vec<u64> = toks
        .iter()
        .map(|_| state.next_id.fetch_add(1, Ordering::Relaxed))
        .collect();
    let rt = &state.runtime;
    let mut begun = Vec::with_capacity(ids.len());
    for &id in &ids {
        if let Err(e) = rt.begin_request(id, profile, overrides) {
            for &b in &begun {
                let _ = rt.end_request(b);
            }
            return Err(match e {
                tiller_runtime::Error::Override { field, message } => {
                    EmbedError::Overrides { field, message }
                }
                e => EmbedError::BadRequest(e.to_string()),
            });
        }
        begun.push(id);
    }
    let hook_name = state.model.hook_name();
    let mut hook = |h: &mut Hidden<'_>| -> anyhow::Result<()> {
        let mut tokens = Vec::with_capacity(h.data.len() / h.d);
        for (seq, range) in h.sequences.iter().enumerate() {
            tokens.extend(std::iter::repeat_n(
                Token {
                    request: ids[seq],
                    phase: Phase::Prompt,
                },
                range.len(),
            ));
        }
        let mut step = rt.step(&tokens)?;
        step.hook(&hook_name, ActivationsMut::F32(h.data))?;
        step.finish();
        Ok(())
    };
    let seqs: Vec<&[u32]> = toks.iter().map(|t| t.ids.as_slice()).collect();
    let result = state.model.embed_ids(&seqs, Some(&mut hook));
    // End every request whatever happened, so none is left running.
    let summaries: Vec<_> = ids.iter().map(|&id| rt.end_request(id)).collect();
    let embeddings = result.map_err(EmbedError::Internal)?;
    let summaries = summaries
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EmbedError::Internal(e.into()))?;
    *state
        .inputs_by_profile
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(profile.unwrap_or("none").to_string())
        .or_default() += ids.len() as u64;
    Ok(Embedded {
        embeddings,
        tokens: toks.iter().map(|t| t.ids.len()).collect(),
        summaries,
    })
}

/// OpenAI's `base64` encoding of a vector: its little-endian float32 bytes in standard base64.
fn encode_base64(row: ndarray::ArrayView1<'_, f32>) -> Value {
    use base64::Engine;
    let bytes: Vec<u8> = row.iter().flat_map(|x| x.to_le_bytes()).collect();
    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn run(state: &AppState, job: Job) -> Result<Value, Failure> {
    let refs: Vec<&str> = job.texts.iter().map(String::as_str).collect();
    let out = embed(
        state,
        &refs,
        job.profile.as_deref(),
        job.overrides.as_deref(),
    )
    .map_err(|e| match e {
        EmbedError::BadRequest(m) => {
            Failure::Other(StatusCode::BAD_REQUEST, "invalid_request_error", m)
        }
        EmbedError::Overrides { field, message } => Failure::Overrides {
            param: if field.is_empty() {
                "tiller_overrides".into()
            } else if field.starts_with('[') {
                format!("tiller_overrides{field}")
            } else {
                format!("tiller_overrides.{field}")
            },
            message,
        },
        EmbedError::Internal(e) => Failure::Other(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("{e:#}"),
        ),
    })?;
    let mut data = Vec::with_capacity(refs.len());
    for (i, s) in out.summaries.iter().enumerate() {
        let mut tiller = json!({
            "request": s.request,
            "profile": s.profile,
            "tokens": s.tokens,
            "flagged": s.flagged,
            "stopped": s.stopped,
            "events": s.events,
            "steering": s.steering,
        });
        let embedding = if s.stopped {
            // Null rather than an error entry: OpenAI's clients pass it through per input (the
            // Python client's base64 decoding skips what is not a string), and code that uses it
            // as a vector fails at once instead of computing with a vector it must not have.
            let first = s.events.iter().find(|e| e.action == "stop");
            let monitor = first.map_or("unknown", |e| e.monitor.as_str());
            tiller["stop"] = json!({"monitor": monitor, "token": first.map(|e| e.token)});
            *state
                .stopped_by_monitor
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(monitor.to_string())
                .or_default() += 1;
            Value::Null
        } else if job.base64 {
            encode_base64(out.embeddings.row(i))
        } else {
            json!(out.embeddings.row(i).to_vec())
        };
        data.push(json!({
            "object": "embedding",
            "index": i,
            "embedding": embedding,
            "tiller": tiller,
        }));
    }
    let total: usize = out.tokens.iter().sum();
    Ok(json!({
        "object": "list",
        "data": data,
        "model": state.model_name,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut text = state.runtime.metrics_text();
    text.push_str(&format!(
        "# HELP embedding_server_http_requests_total Embedding requests received.\n\
         # TYPE embedding_server_http_requests_total counter\n\
         embedding_server_http_requests_total {}\n\
         # HELP embedding_server_http_errors_total Embedding requests answered with an error.\n\
         # TYPE embedding_server_http_errors_total counter\n\
         embedding_server_http_errors_total {}\n",
        state.http_requests.load(Ordering::Relaxed),
        state.http_errors.load(Ordering::Relaxed),
    ));
    text.push_str(
        "# HELP embedding_server_inputs_total Texts embedded, by steering profile (none: no profile).\n\
         # TYPE embedding_server_inputs_total counter\n",
    );
    for (profile, n) in state
        .inputs_by_profile
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        text.push_str(&format!(
            "embedding_server_inputs_total{{profile=\"{}\"}} {n}\n",
            label(profile)
        ));
    }
    text.push_str(
        "# HELP embedding_server_stopped_inputs_total Inputs answered without an embedding because a monitor or policy stopped them, by who stopped them.\n\
         # TYPE embedding_server_stopped_inputs_total counter\n",
    );
    for (monitor, n) in state
        .stopped_by_monitor
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        text.push_str(&format!(
            "embedding_server_stopped_inputs_total{{monitor=\"{}\"}} {n}\n",
            label(monitor)
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let config = state.runtime.config();
    Json(json!({
        "status": "ok",
        "model": state.model_name,
        "hook": state.model.hook_name(),
        "dictionaries": config.dictionaries.iter().map(|d| d.name.clone()).collect::<Vec<_>>(),
        "profiles": config.profiles.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
    }))
    .into_response()
}
