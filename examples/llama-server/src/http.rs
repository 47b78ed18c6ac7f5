//! The HTTP side: OpenAI's routes, answers and errors, the server-sent event streams, metrics,
//! health and the admin endpoints. Handlers check a request, begin its Tiller request (so that an
//! unknown profile or refused overrides are a 400 before anything is queued), queue it for the
//! engine and turn what the engine sends back into OpenAI's shapes.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::stream::{self, Stream};
use serde_json::{Value, json};
use tokio::sync::mpsc::{self, UnboundedReceiver};

use crate::api::{
    self, CHAT_FIELDS, COMPLETION_FIELDS, EMBEDDING_FIELDS, Invalid, Prompt, SAMPLING_FIELDS,
};
use crate::engine::{Endpoint, Generate, Job, Out, Queue, Refused, TokenOut, Work};
use crate::metrics::Metrics;
use crate::model::{BeginError, Model, Tiller};
use crate::sampling::Sampling;

/// Largest request body.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// What the handlers share.
#[derive(Debug)]
pub struct App {
    /// The model.
    pub model: Arc<Model>,
    /// The runtime (None: llama.cpp alone).
    pub tiller: Option<Arc<Tiller>>,
    /// The engine's queue.
    pub queue: Arc<Queue>,
    /// The server's metrics.
    pub metrics: Metrics,
    /// The model's name.
    pub alias: String,
    /// Cells per sequence.
    pub ctx_per_seq: usize,
    /// Tokens per decode.
    pub batch: usize,
    /// An embedding server.
    pub embeddings: bool,
    /// The admin bearer token (None: `/admin/*` is off).
    pub admin_token: Option<String>,
    next_id: AtomicU64,
}

impl App {
    /// The handlers' state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: Arc<Model>,
        tiller: Option<Arc<Tiller>>,
        queue: Arc<Queue>,
        metrics: Metrics,
        alias: String,
        ctx_per_seq: usize,
        batch: usize,
        embeddings: bool,
        admin_token: Option<String>,
    ) -> Self {
        Self {
            model,
            tiller,
            queue,
            metrics,
            alias,
            ctx_per_seq,
            batch,
            embeddings,
            admin_token,
            next_id: AtomicU64::new(1),
        }
    }

    /// Reloads the Tiller config, counting the result.
    pub fn reload(&self) -> Result<(), String> {
        let Some(t) = &self.tiller else {
            return Err("this server runs without a Tiller config".into());
        };
        let r = t.reload();
        let label = if r.is_ok() { "ok" } else { "error" };
        self.metrics.reloads.with_label_values(&[label]).inc();
        r
    }
}

/// The routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/admin/reload", post(admin_reload))
        .route("/admin/pause", post(admin_pause))
        .route("/admin/resume", post(admin_resume))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

/// An error in OpenAI's shape.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
    retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn json(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl From<Invalid> for ApiError {
    fn from(i: Invalid) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: i.message,
            param: i.param,
            code: i.code,
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.json())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    Invalid::new(param, message).into()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Counts the answer by endpoint and status.
fn counted(app: &App, endpoint: Endpoint, r: Result<Response, ApiError>) -> Response {
    let r = r.unwrap_or_else(IntoResponse::into_response);
    app.metrics
        .requests
        .with_label_values(&[endpoint.as_str(), r.status().as_str()])
        .inc();
    r
}

async fn completions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = generate(&app, &headers, body, Endpoint::Completions).await;
    counted(&app, Endpoint::Completions, r)
}

async fn chat(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = generate(&app, &headers, body, Endpoint::Chat).await;
    counted(&app, Endpoint::Chat, r)
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| ApiError::new(r.status(), "invalid_request_error", r.body_text()))
}

/// The profile: the body's `tiller_profile`, else the `X-Tiller-Profile` header; "" is none.
fn profile(body: Option<String>, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let header = match headers.get("x-tiller-profile") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| {
                    bad(
                        "X-Tiller-Profile",
                        "the X-Tiller-Profile header is not text",
                    )
                })?
                .to_string(),
        ),
        None => None,
    };
    Ok(body.or(header).filter(|p| !p.is_empty()))
}

fn check_model(app: &App, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != app.alias => Err(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "model {m:?} is not served here (this server runs {:?})",
                    app.alias
                ),
            )
            .code("model_not_found")
        }),
        _ => Ok(()),
    }
}

/// Begins Tiller request `id` (a no-op without Tiller, where a profile or overrides are refused).
fn begin(
    app: &App,
    id: u64,
    profile: Option<&str>,
    overrides: Option<&Value>,
) -> Result<(), ApiError> {
    let Some(t) = &app.tiller else {
        if profile.is_some() {
            return Err(ApiError::from(Invalid::new(
                "tiller_profile",
                "this server runs without a Tiller config: no profile can be applied",
            ))
            .code("tiller_disabled"));
        }
        if overrides.is_some() {
            return Err(ApiError::from(Invalid::new(
                "tiller_overrides",
                "this server runs without a Tiller config: no overrides can be applied",
            ))
            .code("tiller_disabled"));
        }
        return Ok(());
    };
    let o = overrides.map(Value::to_string);
    t.begin(id, profile, o.as_deref()).map_err(|e| match e {
        BeginError::UnknownProfile(m) => {
            ApiError::from(Invalid::new("tiller_profile", m)).code("tiller_profile_unknown")
        }
        BeginError::Refused(m) => {
            ApiError::from(Invalid::new("tiller_overrides", m)).code("tiller_overrides_refused")
        }
    })
}

/// Queues a job whose Tiller requests (`ids`) have begun; ends them when it is refused.
fn enqueue(app: &App, job: Job, ids: &[u64]) -> Result<(), ApiError> {
    app.queue.push(job).map_err(|why| {
        if let Some(t) = &app.tiller {
            for &id in ids {
                t.end(id);
            }
        }
        match why {
            Refused::Full => ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "the server's queue is full; retry shortly",
                )
                .code("queue_full")
            },
            Refused::Draining => ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "the server is shutting down",
                )
                .code("draining")
            },
        }
    })
}

/// How an answer is written.
#[derive(Debug, Clone)]
struct Shape {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    logprobs: Option<usize>,
    token_ids: bool,
    tokens_as_ids: bool,
    include_usage: bool,
    /// The prompt's tokens when `token_ids` asks for them (else empty).
    prompt_tokens: Vec<i32>,
}

async fn generate(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    if app.embeddings {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "this server serves an embedding model (--embeddings): use /v1/embeddings",
        ));
    }
    let (common, prompt, max_tokens, max_param, logprobs) = match endpoint {
        Endpoint::Completions => {
            let r: api::CompletionRequest =
                api::parse_body(&body, &[COMPLETION_FIELDS, SAMPLING_FIELDS], "completions")?;
            if r.echo == Some(true) {
                return Err(bad("echo", "echo is not supported"));
            }
            let prompt = match r.prompt {
                Prompt::Text(t) => app
                    .model
                    .tokenize(&t, true, false)
                    .map_err(|e| bad("prompt", e.to_string()))?,
                Prompt::Tokens(ids) => ids
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| {
                        i32::try_from(t)
                            .ok()
                            .filter(|&t| t >= 0 && (t as usize) < app.model.n_vocab)
                            .ok_or_else(|| {
                                bad(
                                    "prompt",
                                    format!("prompt[{i}] = {t} is not a token of the vocabulary (0..{})", app.model.n_vocab),
                                )
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                Prompt::Other(_) => {
                    return Err(bad("prompt", "prompt must be a string or a list of token ids (one prompt per request)"));
                }
            };
            let lp = api::check_logprobs(r.logprobs, "logprobs")?;
            let max = r.common.max_tokens;
            (r.common, prompt, max, "max_tokens", lp)
        }
        _ => {
            let r: api::ChatRequest =
                api::parse_body(&body, &[CHAT_FIELDS, SAMPLING_FIELDS], "chat completions")?;
            let messages = api::chat_messages(&r.messages)?;
            let text = app
                .model
                .render_chat(&messages)
                .map_err(|e| bad("messages", e.to_string()))?;
            let prompt = app
                .model
                .tokenize(&text, true, true)
                .map_err(|e| bad("messages", e.to_string()))?;
            let top = api::check_logprobs(r.top_logprobs, "top_logprobs")?;
            if top.is_some() && r.logprobs != Some(true) {
                return Err(bad("top_logprobs", "top_logprobs needs logprobs: true"));
            }
            let lp = (r.logprobs == Some(true)).then(|| top.unwrap_or(0));
            let (max, param) = match (r.max_completion_tokens, r.common.max_tokens) {
                (Some(m), _) => (Some(m), "max_completion_tokens"),
                (None, m) => (m, "max_tokens"),
            };
            (r.common, prompt, max, param, lp)
        }
    };
    check_model(app, common.model.as_deref())?;
    let checked = common.check(max_tokens, max_param)?;
    if prompt.is_empty() {
        return Err(bad("prompt", "the prompt is empty"));
    }
    if prompt.len() >= app.ctx_per_seq {
        return Err(ApiError::from(Invalid::new(
            if endpoint == Endpoint::Chat { "messages" } else { "prompt" },
            format!(
                "the prompt has {} tokens; the context holds {} per sequence (--ctx-size), generation included",
                prompt.len(),
                app.ctx_per_seq
            ),
        ))
        .code("context_length_exceeded"));
    }
    let room = app.ctx_per_seq - prompt.len();
    let default_max = if endpoint == Endpoint::Completions {
        16
    } else {
        room
    };
    let max_tokens = checked.max_tokens.unwrap_or(default_max).min(room);
    let profile = profile(common.tiller_profile.clone(), headers)?;
    let id = app.next_id.fetch_add(1, Ordering::Relaxed);
    let seed = checked.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ id.rotate_left(32)
    });
    begin(
        app,
        id,
        profile.as_deref(),
        common.tiller_overrides.as_ref(),
    )?;
    let shape = Shape {
        endpoint,
        id: match endpoint {
            Endpoint::Chat => format!("chatcmpl-{id}"),
            _ => format!("cmpl-{id}"),
        },
        created: now_unix(),
        model: app.alias.clone(),
        logprobs,
        token_ids: common.return_token_ids == Some(true),
        tokens_as_ids: common.return_tokens_as_token_ids == Some(true),
        include_usage: checked.include_usage,
        prompt_tokens: if common.return_token_ids == Some(true) {
            prompt.clone()
        } else {
            Vec::new()
        },
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        id,
        endpoint,
        work: Work::Generate(Generate {
            prompt,
            max_tokens,
            sampling: Sampling {
                temperature: checked.temperature,
                top_p: checked.top_p,
                seed,
            },
            stops: checked.stops,
            logprobs,
            ignore_eos: common.ignore_eos == Some(true),
            stream_events: checked.stream,
        }),
        tx,
        arrived: Instant::now(),
    };
    enqueue(app, job, &[id])?;
    if checked.stream {
        Ok(sse(app.clone(), shape, rx).into_response())
    } else {
        collect(app, shape, rx).await
    }
}

/// A token as `logprobs` writes it.
fn token_text(app: &App, shape: &Shape, t: i32) -> String {
    if shape.tokens_as_ids {
        format!("token_id:{t}")
    } else {
        String::from_utf8_lossy(&app.model.piece(t)).into_owned()
    }
}

/// The `logprobs` of a choice (or chunk) holding `tokens`, `offset` bytes into the text.
fn logprobs_json(app: &App, shape: &Shape, tokens: &[&TokenOut], mut offset: usize) -> Value {
    if shape.logprobs.is_none() {
        return Value::Null;
    }
    match shape.endpoint {
        Endpoint::Chat => {
            let content: Vec<Value> = tokens
                .iter()
                .filter_map(|t| {
                    let (lp, top) = t.logprob.as_ref()?;
                    let entry = |id: i32, lp: f32| {
                        json!({"token": token_text(app, shape, id), "logprob": lp, "bytes": app.model.piece(id)})
                    };
                    let mut e = entry(t.token, *lp);
                    e["top_logprobs"] = top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                    Some(e)
                })
                .collect();
            json!({"content": content})
        }
        _ => {
            let mut toks = Vec::new();
            let mut lps = Vec::new();
            let mut tops = Vec::new();
            let mut offsets = Vec::new();
            for t in tokens {
                let Some((lp, top)) = &t.logprob else {
                    continue;
                };
                toks.push(token_text(app, shape, t.token));
                lps.push(*lp);
                let m: serde_json::Map<String, Value> = top
                    .iter()
                    .map(|&(id, lp)| (token_text(app, shape, id), json!(lp)))
                    .collect();
                tops.push(Value::Object(m));
                offsets.push(offset);
                offset += t.text.len();
            }
            json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
        }
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn failed(message: String) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
}

/// Waits for the whole generation and answers it at once.
async fn collect(
    app: &App,
    shape: Shape,
    mut rx: UnboundedReceiver<Out>,
) -> Result<Response, ApiError> {
    let mut tokens = Vec::new();
    let mut text = String::new();
    while let Some(out) = rx.recv().await {
        match out {
            Out::Token(t) => {
                text.push_str(&t.text);
                tokens.push(t);
            }
            Out::Done {
                finish_reason,
                text: tail,
                prompt_tokens,
                completion_tokens,
                summary,
                ..
            } => {
                text.push_str(&tail);
                let refs: Vec<&TokenOut> = tokens.iter().collect();
                let logprobs = logprobs_json(app, &shape, &refs, 0);
                let mut choice = match shape.endpoint {
                    Endpoint::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs,
                        "finish_reason": finish_reason,
                    }),
                    _ => {
                        json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason})
                    }
                };
                let mut body = json!({
                    "id": shape.id,
                    "object": if shape.endpoint == Endpoint::Chat { "chat.completion" } else { "text_completion" },
                    "created": shape.created,
                    "model": shape.model,
                    "choices": [],
                    "usage": usage(prompt_tokens, completion_tokens),
                    "tiller": summary,
                });
                if shape.token_ids {
                    choice["token_ids"] = tokens.iter().map(|t| t.token).collect();
                    body["prompt_token_ids"] = json!(shape.prompt_tokens);
                }
                body["choices"] = json!([choice]);
                return Ok(Json(body).into_response());
            }
            Out::Failed(m) => return Err(failed(m)),
            Out::Embedded { .. } => break,
        }
    }
    Err(failed(
        "the engine ended the request without an answer".into(),
    ))
}

/// A streamed answer: a chunk per token, the last with `finish_reason`, then `[DONE]`.
fn sse(
    app: Arc<App>,
    shape: Shape,
    rx: UnboundedReceiver<Out>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    struct St {
        app: Arc<App>,
        shape: Shape,
        rx: UnboundedReceiver<Out>,
        queued: VecDeque<String>,
        offset: usize,
        first: bool,
        done: bool,
    }
    let st = St {
        app,
        shape,
        rx,
        queued: VecDeque::new(),
        offset: 0,
        first: true,
        done: false,
    };
    let s = stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.queued.pop_front() {
                return Some((Ok(Event::default().data(data)), st));
            }
            if st.done {
                return None;
            }
            let out = st.rx.recv().await;
            let object = if st.shape.endpoint == Endpoint::Chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            let chunk = |st: &St, choice: Value| json!({"id": st.shape.id, "object": object, "created": st.shape.created, "model": st.shape.model, "choices": [choice]});
            let delta = |st: &mut St, text: &str| -> Value {
                if st.shape.endpoint == Endpoint::Chat {
                    let mut d = json!({"content": text});
                    if st.first {
                        d["role"] = json!("assistant");
                    }
                    st.first = false;
                    json!({"index": 0, "delta": d})
                } else {
                    json!({"index": 0, "text": text})
                }
            };
            match out {
                Some(Out::Token(t)) => {
                    let mut choice = delta(&mut st, &t.text);
                    choice["logprobs"] = logprobs_json(&st.app, &st.shape, &[&t], st.offset);
                    choice["finish_reason"] = Value::Null;
                    if st.shape.token_ids {
                        choice["token_ids"] = json!([t.token]);
                    }
                    st.offset += t.text.len();
                    let mut c = chunk(&st, choice);
                    if !t.events.is_empty() {
                        c["tiller"] = json!({"events": t.events});
                    }
                    st.queued.push_back(c.to_string());
                }
                Some(Out::Done {
                    finish_reason,
                    text,
                    prompt_tokens,
                    completion_tokens,
                    summary,
                    events,
                }) => {
                    let mut choice = delta(&mut st, &text);
                    choice["logprobs"] = Value::Null;
                    choice["finish_reason"] = json!(finish_reason);
                    let mut c = chunk(&st, choice);
                    if let Some(mut s) = summary {
                        if !events.is_empty() {
                            s["new_events"] = json!(events);
                        }
                        c["tiller"] = s;
                    }
                    st.queued.push_back(c.to_string());
                    if st.shape.include_usage {
                        let mut u = chunk(&st, Value::Null);
                        u["choices"] = json!([]);
                        u["usage"] = usage(prompt_tokens, completion_tokens);
                        st.queued.push_back(u.to_string());
                    }
                    st.queued.push_back("[DONE]".into());
                    st.done = true;
                }
                Some(Out::Failed(m)) => {
                    st.queued.push_back(failed(m).json().to_string());
                    st.queued.push_back("[DONE]".into());
                    st.done = true;
                }
                Some(Out::Embedded { .. }) | None => {
                    st.queued.push_back(
                        failed("the engine ended the request without an answer".into())
                            .json()
                            .to_string(),
                    );
                    st.queued.push_back("[DONE]".into());
                    st.done = true;
                }
            }
        }
    });
    Sse::new(s)
}

async fn embeddings(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let r = embed(&app, &headers, body).await;
    counted(&app, Endpoint::Embeddings, r)
}

async fn embed(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    if !app.embeddings {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "this server serves a generation model: start it with --embeddings on an embedding model",
        ));
    }
    let r: api::EmbeddingRequest = api::parse_body(&body, &[EMBEDDING_FIELDS], "embeddings")?;
    check_model(app, r.model.as_deref())?;
    let texts = match r.input {
        api::Input::One(s) => vec![s],
        api::Input::Many(v) => v,
    };
    if texts.is_empty() {
        return Err(bad("input", "input is empty"));
    }
    if texts.len() > 256 {
        return Err(bad(
            "input",
            format!("input has {} texts; at most 256", texts.len()),
        ));
    }
    let base64 = match r.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(f) => {
            return Err(bad(
                "encoding_format",
                format!("encoding_format {f:?} is not supported (float or base64)"),
            ));
        }
    };
    if let Some(d) = r.dimensions
        && d as usize != app.model.n_embd
    {
        return Err(bad(
            "dimensions",
            format!(
                "dimensions {d} is not supported (the model gives {})",
                app.model.n_embd
            ),
        ));
    }
    let mut inputs = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        let toks = app
            .model
            .tokenize(t, true, false)
            .map_err(|e| bad(&format!("input[{i}]"), e.to_string()))?;
        if toks.is_empty() || t.trim().is_empty() {
            return Err(bad(&format!("input[{i}]"), format!("input[{i}] is empty")));
        }
        if toks.len() > app.batch || toks.len() > app.ctx_per_seq {
            return Err(bad(
                &format!("input[{i}]"),
                format!(
                    "input[{i}] has {} tokens; at most {}",
                    toks.len(),
                    app.batch.min(app.ctx_per_seq)
                ),
            ));
        }
        inputs.push(toks);
    }
    let profile = profile(r.tiller_profile, headers)?;
    let first = app
        .next_id
        .fetch_add(inputs.len() as u64, Ordering::Relaxed);
    let ids: Vec<u64> = (first..first + inputs.len() as u64).collect();
    for (k, &id) in ids.iter().enumerate() {
        if let Err(e) = begin(app, id, profile.as_deref(), r.tiller_overrides.as_ref()) {
            if let Some(t) = &app.tiller {
                for &earlier in &ids[..k] {
                    t.end(earlier);
                }
            }
            return Err(e);
        }
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let job = Job {
        id: first,
        endpoint: Endpoint::Embeddings,
        work: Work::Embed(inputs.into_iter().zip(ids.iter().copied()).collect()),
        tx,
        arrived: Instant::now(),
    };
    enqueue(app, job, &ids)?;
    match rx.recv().await {
        Some(Out::Embedded {
            rows,
            tokens,
            summaries,
        }) => {
            let data: Vec<Value> = rows
                .into_iter()
                .zip(summaries)
                .enumerate()
                .map(|(i, (row, summary))| {
                    let embedding = match row {
                        None => Value::Null,
                        Some(v) if base64 => {
                            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                            json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                        }
                        Some(v) => json!(v),
                    };
                    json!({"object": "embedding", "index": i, "embedding": embedding, "tiller": summary})
                })
                .collect();
            let n: usize = tokens.iter().sum();
            Ok(Json(json!({
                "object": "list",
                "data": data,
                "model": app.alias,
                "usage": {"prompt_tokens": n, "total_tokens": n},
            }))
            .into_response())
        }
        Some(Out::Failed(m)) => Err(failed(m)),
        _ => Err(failed(
            "the engine ended the request without an answer".into(),
        )),
    }
}

async fn models(State(app): State<Arc<App>>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{"id": app.alias, "object": "model", "created": 0, "owned_by": "tiller"}],
    }))
    .into_response()
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    if app.queue.draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response();
    }
    Json(json!({"status": "ok", "model": app.alias, "tiller": app.tiller.is_some()}))
        .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let mut text = app.tiller.as_ref().map(|t| t.metrics()).unwrap_or_default();
    text.push_str(&app.metrics.text());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Checks the admin bearer token: 404 when the admin endpoints are off, 401 when it is wrong.
fn admin(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &app.admin_token else {
        return Err(not_found_error());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // The same time for every wrong token of the right length.
    let same = given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "a valid admin bearer token is required",
        )
        .code("invalid_admin_token"))
    }
}

async fn admin_reload(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = admin(&app, &headers) {
        return e.into_response();
    }
    let a = app.clone();
    match tokio::task::spawn_blocking(move || a.reload()).await {
        Ok(Ok(())) => {
            tracing::info!("config reloaded (admin endpoint)");
            Json(json!({"status": "reloaded"})).into_response()
        }
        Ok(Err(m)) => {
            tracing::error!("config reload refused (admin endpoint): {m}");
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", m)
                .code("config_refused")
                .into_response()
        }
        Err(e) => failed(format!("the reload task failed: {e}")).into_response(),
    }
}

async fn admin_pause(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = admin(&app, &headers) {
        return e.into_response();
    }
    app.queue.pause(true);
    Json(json!({"status": "paused"})).into_response()
}

async fn admin_resume(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = admin(&app, &headers) {
        return e.into_response();
    }
    app.queue.pause(false);
    Json(json!({"status": "running"})).into_response()
}

fn not_found_error() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such endpoint",
    )
    .code("not_found")
}

async fn not_found() -> Response {
    not_found_error().into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "this endpoint does not take that method",
    )
    .code("method_not_allowed")
    .into_response()
}
