//! The OpenAI request bodies the server takes, and their checks
//! (docs/integrations/llama-server.md#endpoints).

use serde::Deserialize;
use serde_json::Value;

/// Most log-probabilities per token.
pub const MAX_LOGPROBS: u32 = 20;
/// Most `stop` strings.
pub const MAX_STOPS: usize = 4;

/// A refusal: the message, and the body field it is about.
#[derive(Debug)]
pub struct Invalid {
    /// What is wrong.
    pub message: String,
    /// The field.
    pub param: Option<String>,
    /// A machine-readable code.
    pub code: Option<&'static str>,
}

impl Invalid {
    /// A refusal about `param`.
    pub fn new(param: &str, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            param: Some(param.into()),
            code: None,
        }
    }

    /// A body that is not the request: serde's message, with the unknown field named as `param`.
    pub fn body(e: &serde_json::Error, what: &str) -> Self {
        let msg = e.to_string();
        let param = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
            .map(str::to_string);
        Self {
            message: format!("the body is not a valid {what} request: {msg}"),
            param,
            code: None,
        }
    }
}

/// `prompt`: a string or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<i64>),
    /// Anything else (several prompts): refused by name.
    Other(serde::de::IgnoredAny),
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The fields completions and chat completions share.
#[derive(Debug, Default, Deserialize)]
pub struct Sampling {
    /// Ignored beyond a check that it names this model.
    pub model: Option<String>,
    /// Tokens to generate.
    pub max_tokens: Option<i64>,
    /// 0 to 2.
    pub temperature: Option<f64>,
    /// (0, 1].
    pub top_p: Option<f64>,
    /// The sampler's seed.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// 1 only.
    pub n: Option<i64>,
    /// 0 only.
    pub presence_penalty: Option<f64>,
    /// 0 only.
    pub frequency_penalty: Option<f64>,
    /// Ignored.
    #[allow(dead_code)]
    pub user: Option<String>,
    /// The Tiller profile.
    pub tiller_profile: Option<String>,
    /// Per-request overrides, as the config's `[requests]` allows.
    pub tiller_overrides: Option<Value>,
    /// Generate past end-of-generation tokens.
    pub ignore_eos: Option<bool>,
    /// Return token ids.
    pub return_token_ids: Option<bool>,
    /// Write tokens in `logprobs` as `token_id:N`.
    pub return_tokens_as_token_ids: Option<bool>,
}

/// The fields of [`Sampling`].
pub const SAMPLING_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "user",
    "tiller_profile",
    "tiller_overrides",
    "ignore_eos",
    "return_token_ids",
    "return_tokens_as_token_ids",
];
/// The fields of [`CompletionRequest`] beside [`SAMPLING_FIELDS`].
pub const COMPLETION_FIELDS: &[&str] = &["prompt", "logprobs", "echo"];
/// The fields of [`ChatRequest`] beside [`SAMPLING_FIELDS`].
pub const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
];

/// The fields of [`EmbeddingRequest`].
pub const EMBEDDING_FIELDS: &[&str] = &[
    "input",
    "model",
    "encoding_format",
    "dimensions",
    "user",
    "tiller_profile",
    "tiller_overrides",
];

/// Reads a JSON object whose fields are all in one of `fields` (serde's `deny_unknown_fields`
/// does not work beside `flatten`).
pub fn parse_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    fields: &[&[&str]],
    what: &str,
) -> Result<T, Invalid> {
    let v: Value = serde_json::from_slice(body).map_err(|e| Invalid::body(&e, what))?;
    let Some(map) = v.as_object() else {
        return Err(Invalid {
            message: format!("the body of a {what} request must be a JSON object"),
            param: None,
            code: None,
        });
    };
    if let Some(k) = map
        .keys()
        .find(|k| !fields.iter().any(|f| f.contains(&k.as_str())))
    {
        return Err(Invalid::new(k, format!("unknown field `{k}`")));
    }
    serde_json::from_value(v).map_err(|e| Invalid::body(&e, what))
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Top log-probabilities per token.
    pub logprobs: Option<i64>,
    /// False only.
    pub echo: Option<bool>,
    /// The shared fields.
    #[serde(flatten)]
    pub common: Sampling,
}

/// A chat message's content: text, or text parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Text.
    Text(String),
    /// Parts.
    Parts(Vec<Part>),
}

/// A content part (`{"type": "text", "text": ...}` only).
#[derive(Debug, Deserialize)]
pub struct Part {
    /// `text`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    #[serde(default)]
    pub text: Option<String>,
}

/// A chat message.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// Its content.
    pub content: Option<Content>,
    /// Ignored.
    #[allow(dead_code)]
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<Message>,
    /// As `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    /// Return log-probabilities.
    pub logprobs: Option<bool>,
    /// How many of the top ones.
    pub top_logprobs: Option<i64>,
    /// The shared fields.
    #[serde(flatten)]
    pub common: Sampling,
}

/// `input`: one text or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Input {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `POST /v1/embeddings`.
#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    /// The texts.
    pub input: Input,
    /// Ignored beyond a check that it names this model.
    pub model: Option<String>,
    /// `float` or `base64`.
    pub encoding_format: Option<String>,
    /// The model's width only.
    pub dimensions: Option<i64>,
    /// Ignored.
    #[allow(dead_code)]
    pub user: Option<String>,
    /// The Tiller profile.
    pub tiller_profile: Option<String>,
    /// Per-request overrides.
    pub tiller_overrides: Option<Value>,
}

/// The checked sampling fields.
#[derive(Debug)]
pub struct Checked {
    /// Tokens to generate (None: up to the context).
    pub max_tokens: Option<usize>,
    /// Temperature.
    pub temperature: f64,
    /// Top-p.
    pub top_p: f64,
    /// Seed (None: a fresh one).
    pub seed: Option<u64>,
    /// Stop strings.
    pub stops: Vec<String>,
    /// Stream.
    pub stream: bool,
    /// A usage chunk when streaming.
    pub include_usage: bool,
}

impl Sampling {
    /// Checks the shared fields; `max_tokens` may come from another field (`max_completion_tokens`).
    pub fn check(&self, max_tokens: Option<i64>, max_param: &str) -> Result<Checked, Invalid> {
        let max_tokens = match max_tokens {
            None => None,
            Some(m) if m >= 1 => Some(m as usize),
            Some(m) => {
                return Err(Invalid::new(
                    max_param,
                    format!("{max_param} must be at least 1 (got {m})"),
                ));
            }
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(Invalid::new(
                "temperature",
                format!("temperature must be within [0, 2] (got {temperature})"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Invalid::new(
                "top_p",
                format!("top_p must be within (0, 1] (got {top_p})"),
            ));
        }
        if let Some(n) = self.n
            && n != 1
        {
            return Err(Invalid::new(
                "n",
                format!("n must be 1 (got {n}): send one request per completion"),
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(v) = v
                && v != 0.0
            {
                return Err(Invalid::new(
                    name,
                    format!("{name} is not supported (only 0; got {v})"),
                ));
            }
        }
        let stops = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stops.len() > MAX_STOPS {
            return Err(Invalid::new(
                "stop",
                format!("stop has {} strings; at most {MAX_STOPS}", stops.len()),
            ));
        }
        if stops.iter().any(String::is_empty) {
            return Err(Invalid::new("stop", "stop strings must not be empty"));
        }
        let stream = self.stream.unwrap_or(false);
        let include_usage = self
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(Invalid::new(
                "stream_options",
                "stream_options is only allowed with stream: true",
            ));
        }
        Ok(Checked {
            max_tokens,
            temperature,
            top_p,
            seed: self.seed.map(|s| s as u64),
            stops,
            stream,
            include_usage,
        })
    }
}

/// `logprobs` (completions) or `top_logprobs` (chat): 0 to [`MAX_LOGPROBS`].
pub fn check_logprobs(v: Option<i64>, param: &str) -> Result<Option<usize>, Invalid> {
    match v {
        None => Ok(None),
        Some(k) if (0..=MAX_LOGPROBS as i64).contains(&k) => Ok(Some(k as usize)),
        Some(k) => Err(Invalid::new(
            param,
            format!("{param} must be within [0, {MAX_LOGPROBS}] (got {k})"),
        )),
    }
}

/// A chat's messages as (role, text) pairs.
pub fn chat_messages(messages: &[Message]) -> Result<Vec<(String, String)>, Invalid> {
    if messages.is_empty() {
        return Err(Invalid::new("messages", "messages is empty"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            r => {
                return Err(Invalid::new(
                    &format!("messages[{i}].role"),
                    format!("role {r:?} is not supported (system, developer, user, assistant)"),
                ));
            }
        };
        let text = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(s)) => t.push_str(s),
                        (k, _) => {
                            return Err(Invalid::new(
                                &format!("messages[{i}].content[{j}]"),
                                format!(
                                    "content parts of type {k:?} are not supported (text only)"
                                ),
                            ));
                        }
                    }
                }
                t
            }
        };
        out.push((role.to_string(), text));
    }
    Ok(out)
}
