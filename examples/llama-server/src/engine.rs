//! The engine: one thread that owns the llama.cpp context and the adapter, admits queued requests
//! into slots (one llama.cpp sequence and one Tiller request each), and runs one decode, one
//! Tiller step, per iteration over every slot: a token for each generating sequence, then prompt
//! chunks in the batch's remaining room (continuous batching).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use crate::ffi::{self, Api, GGML_TYPE_F32, TILLER_LLAMA_ERROR};
use crate::metrics::Metrics;
use crate::model::{Model, Tiller};
use crate::sampling::{self, Sampler, Sampling};
use crate::text::{Detok, Piece};

/// Which API a request came through (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/embeddings`.
    Embeddings,
}

impl Endpoint {
    /// The label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completions => "completions",
            Self::Chat => "chat",
            Self::Embeddings => "embeddings",
        }
    }
}

/// What a generation asks for.
#[derive(Debug)]
pub struct Generate {
    /// The prompt's tokens (not empty, shorter than the context).
    pub prompt: Vec<i32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How to sample.
    pub sampling: Sampling,
    /// Strings that end the text.
    pub stops: Vec<String>,
    /// Top log-probabilities per token, when asked.
    pub logprobs: Option<usize>,
    /// Generate past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Send Tiller's events with the tokens they fired at (streaming).
    pub stream_events: bool,
}

/// A request's work.
#[derive(Debug)]
pub enum Work {
    /// A completion.
    Generate(Generate),
    /// Embeddings: each input's tokens and its Tiller request id.
    Embed(Vec<(Vec<i32>, u64)>),
}

/// A queued request.
#[derive(Debug)]
pub struct Job {
    /// Its Tiller request id (begun by the handler when Tiller is on).
    pub id: u64,
    /// Where it came from.
    pub endpoint: Endpoint,
    /// The work.
    pub work: Work,
    /// Where its output goes; closed when the client went away.
    pub tx: UnboundedSender<Out>,
    /// When it arrived.
    pub arrived: Instant,
}

/// One generated token.
#[derive(Debug)]
pub struct TokenOut {
    /// Its id.
    pub token: i32,
    /// The text it completes (possibly empty).
    pub text: String,
    /// Its log-probability and the top ones, when asked.
    pub logprob: Option<(f32, Vec<(i32, f32)>)>,
    /// Tiller events that fired since the last token sent.
    pub events: Vec<Value>,
}

/// What the engine sends a request's handler.
#[derive(Debug)]
pub enum Out {
    /// A token.
    Token(TokenOut),
    /// The end of a generation.
    Done {
        /// `stop`, `length` or `content_filter`.
        finish_reason: &'static str,
        /// Text not sent with a token yet.
        text: String,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens.
        completion_tokens: usize,
        /// The Tiller request's summary (None without Tiller).
        summary: Option<Value>,
        /// Events not sent with a token yet.
        events: Vec<Value>,
    },
    /// Embeddings (None where a monitor stopped the input), each input's tokens and summary.
    Embedded {
        /// Unit-norm vectors.
        rows: Vec<Option<Vec<f32>>>,
        /// Tokens per input.
        tokens: Vec<usize>,
        /// Summaries.
        summaries: Vec<Option<Value>>,
    },
    /// The decode carrying the request failed.
    Failed(String),
}

/// Why the queue refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// It holds its capacity.
    Full,
    /// The server is shutting down.
    Draining,
}

#[derive(Debug, Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    paused: bool,
    draining: bool,
    shutdown: bool,
}

/// The requests waiting for a slot, in arrival order.
#[derive(Debug)]
pub struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
    capacity: usize,
    metrics: Metrics,
}

impl Queue {
    /// An empty queue holding at most `capacity` requests.
    pub fn new(capacity: usize, metrics: Metrics) -> Self {
        Self {
            state: Mutex::new(QueueState::default()),
            ready: Condvar::new(),
            capacity,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job`, or says why not (the job is dropped).
    pub fn push(&self, job: Job) -> std::result::Result<(), Refused> {
        let mut st = self.lock();
        if st.draining {
            return Err(Refused::Draining);
        }
        if st.jobs.len() >= self.capacity {
            return Err(Refused::Full);
        }
        st.jobs.push_back(job);
        self.metrics.queue_depth.set(st.jobs.len() as i64);
        self.ready.notify_all();
        Ok(())
    }

    /// Holds queued requests back from the slots (true) or lets them in.
    pub fn pause(&self, paused: bool) {
        self.lock().paused = paused;
        self.ready.notify_all();
    }

    /// Refuses new requests from now on; the queued ones are still served.
    pub fn drain(&self) {
        let mut st = self.lock();
        st.draining = true;
        st.paused = false;
        self.ready.notify_all();
    }

    /// Whether new requests are refused.
    pub fn draining(&self) -> bool {
        self.lock().draining
    }

    /// Lets the engine stop once nothing is queued or running.
    pub fn shutdown(&self) {
        let mut st = self.lock();
        st.shutdown = true;
        st.draining = true;
        st.paused = false;
        self.ready.notify_all();
    }
}

/// The engine's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Slots.
    pub parallel: usize,
    /// Cells per sequence.
    pub ctx_per_seq: usize,
    /// Tokens per decode.
    pub batch: usize,
    /// llama.cpp's threads.
    pub threads: usize,
    /// The KV cache's type: `f16` or `f32`.
    pub cache_f32: bool,
    /// An embedding model.
    pub embeddings: bool,
    /// Hooked layers (with Tiller).
    pub layers: Vec<i32>,
    /// The hooks' names, one `%d` for the layer.
    pub hook_format: String,
}

struct Slot {
    job: Job,
    seq: i32,
    /// Prompt tokens decoded.
    prompt_done: usize,
    /// Tokens in the KV cache: the next token's position.
    n_past: usize,
    /// The token sampled last, decoded at the next step.
    pending: Option<i32>,
    /// The batch row whose logits are this sequence's, in the decode under way.
    row: Option<i32>,
    in_batch: bool,
    generated: usize,
    detok: Detok,
    sampler: Sampler,
    last_token: Option<Instant>,
    /// Events of the request's summary already taken into `events` or sent.
    events_taken: usize,
    /// Events to send with the next token.
    events: Vec<Value>,
}

impl Slot {
    fn request(&self) -> &Generate {
        match &self.job.work {
            Work::Generate(g) => g,
            Work::Embed(_) => unreachable!("embedding jobs never take a slot"),
        }
    }
}

/// The engine: owns the context, the adapter and the batch.
pub struct Engine {
    api: Arc<Api>,
    model: Arc<Model>,
    tiller: Option<Arc<Tiller>>,
    ctx: *mut ffi::Context_,
    adapter: *mut ffi::Adapter,
    batch: *mut ffi::Batch,
    settings: Settings,
    all_logits: bool,
    slots: Vec<Option<Slot>>,
    queue: Arc<Queue>,
    metrics: Metrics,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

// SAFETY: the context, adapter and batch are made on one thread and then moved to the engine's
// thread, which alone uses them; the model and runtime are shared as their own types allow.
unsafe impl Send for Engine {}

impl Engine {
    /// Creates the context (and the adapter, with Tiller) for `settings`.
    pub fn new(
        model: Arc<Model>,
        tiller: Option<Arc<Tiller>>,
        settings: Settings,
        queue: Arc<Queue>,
        metrics: Metrics,
    ) -> Result<Self> {
        let api = model.api.clone();
        let mut adapter = std::ptr::null_mut();
        if let Some(t) = &tiller {
            let fmt = ffi::cstring(&settings.hook_format, "--hook-format")?;
            // SAFETY: the runtime and model are live and outlive the adapter (the engine holds
            // both and frees the adapter first); `layers` is valid for its length.
            adapter = unsafe {
                (api.tiller_llama_new)(
                    t.ptr(),
                    model.ptr(),
                    settings.layers.as_ptr(),
                    settings.layers.len(),
                    fmt.as_ptr(),
                )
            };
            if adapter.is_null() {
                bail!("{}", api.adapter_error());
            }
        }
        let n_seq = settings.parallel.max(1);
        let n_ctx = settings.ctx_per_seq * n_seq;
        let cache = if settings.cache_f32 {
            GGML_TYPE_F32
        } else {
            ffi::GGML_TYPE_F16
        };
        // SAFETY: the model is live; the adapter is NULL or made for it.
        let ctx = unsafe {
            (api.tls_context_new)(
                model.ptr(),
                adapter,
                u32::try_from(n_ctx)?,
                u32::try_from(settings.batch)?,
                u32::try_from(n_seq)?,
                i32::try_from(settings.threads)?,
                cache,
                settings.embeddings,
            )
        };
        if ctx.is_null() {
            if !adapter.is_null() {
                // SAFETY: made above, attached to nothing.
                unsafe { (api.tiller_llama_free)(adapter) };
            }
            bail!("llama.cpp could not create a context of {n_ctx} cells for {n_seq} sequences");
        }
        // SAFETY: returns a heap batch freed in Drop.
        let batch = unsafe { (api.tls_batch_new)(i32::try_from(settings.batch)?) };
        let last = i32::try_from(model.n_layer)? - 1;
        let all_logits = settings.layers.contains(&last);
        Ok(Self {
            slots: (0..n_seq).map(|_| None).collect(),
            api,
            model,
            tiller,
            ctx,
            adapter,
            batch,
            all_logits,
            settings,
            queue,
            metrics,
        })
    }

    /// Serves until the queue is shut down and every request is answered.
    pub fn run(mut self) {
        while let Some(admitted) = self.admit() {
            for job in admitted {
                match job.work {
                    Work::Embed(_) => self.embed(job),
                    Work::Generate(_) => self.start(job),
                }
            }
            self.drop_disconnected();
            if self.slots.iter().any(Option::is_some) {
                self.step();
            }
        }
    }

    /// Takes queued requests for the free slots, waiting while there is nothing to do. None when
    /// the queue is shut down and nothing is left.
    fn admit(&mut self) -> Option<Vec<Job>> {
        let mut free = self.slots.iter().filter(|s| s.is_none()).count();
        let busy = free < self.slots.len();
        let queue = self.queue.clone();
        let mut st = queue.lock();
        loop {
            let mut out = Vec::new();
            while !st.paused && free > 0 {
                let Some(job) = st.jobs.pop_front() else {
                    break;
                };
                if job.tx.is_closed() {
                    self.cancel_queued(&job);
                    continue;
                }
                if matches!(job.work, Work::Generate(_)) {
                    free -= 1;
                }
                out.push(job);
            }
            self.metrics.queue_depth.set(st.jobs.len() as i64);
            if busy || !out.is_empty() {
                return Some(out);
            }
            if st.shutdown && st.jobs.is_empty() {
                return None;
            }
            st = queue
                .ready
                .wait_timeout(st, Duration::from_millis(250))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn cancel_queued(&self, job: &Job) {
        if let Some(t) = &self.tiller {
            match &job.work {
                Work::Generate(_) => {
                    t.end(job.id);
                }
                Work::Embed(inputs) => {
                    for (_, id) in inputs {
                        t.end(*id);
                    }
                }
            }
        }
        self.metrics
            .finished
            .with_label_values(&[job.endpoint.as_str(), "disconnected"])
            .inc();
    }

    /// Puts a generation into a free slot.
    fn start(&mut self, job: Job) {
        let Some(s) = self.slots.iter().position(Option::is_none) else {
            unreachable!("admit takes no more generations than there are free slots")
        };
        let seq = s as i32;
        let (sampling, stops, prompt_len) = match &job.work {
            Work::Generate(g) => (g.sampling, g.stops.clone(), g.prompt.len()),
            Work::Embed(_) => unreachable!(),
        };
        if !self.adapter.is_null() {
            // SAFETY: the adapter is live; `seq` is below n_seq_max.
            let ok = unsafe {
                (self.api.tiller_llama_seq_begin)(self.adapter, seq, job.id) == 0
                    && (self.api.tiller_llama_seq_prompt)(self.adapter, seq, prompt_len) == 0
            };
            if !ok {
                let msg = self.api.adapter_error();
                self.fail_job(job, &msg);
                return;
            }
        }
        self.metrics.running.inc();
        self.slots[s] = Some(Slot {
            job,
            seq,
            prompt_done: 0,
            n_past: 0,
            pending: None,
            row: None,
            in_batch: false,
            generated: 0,
            detok: Detok::new(&stops),
            sampler: Sampler::new(sampling),
            last_token: None,
            events_taken: 0,
            events: Vec::new(),
        });
    }

    fn fail_job(&self, job: Job, msg: &str) {
        if let Some(t) = &self.tiller {
            t.end(job.id);
        }
        let _ = job.tx.send(Out::Failed(msg.to_string()));
        self.metrics
            .finished
            .with_label_values(&[job.endpoint.as_str(), "error"])
            .inc();
    }

    /// Frees the slots of clients that went away.
    fn drop_disconnected(&mut self) {
        for s in 0..self.slots.len() {
            if self.slots[s]
                .as_ref()
                .is_some_and(|sl| sl.job.tx.is_closed())
            {
                self.finish(s, "disconnected");
            }
        }
    }

    /// One decode over every slot.
    fn step(&mut self) {
        let api = self.api.clone();
        // SAFETY: the engine's batch.
        unsafe { (api.tls_batch_clear)(self.batch) };
        let mut n = 0i32;
        let budget = self.settings.batch as i32;
        for slot in self.slots.iter_mut().flatten() {
            slot.row = None;
            slot.in_batch = false;
            if let Some(t) = slot.pending.take() {
                // SAFETY: fewer tokens than the batch's room (at most one per slot, and the
                // batch holds at least `parallel`).
                unsafe { (api.tls_batch_add)(self.batch, t, slot.n_past as i32, slot.seq, true) };
                slot.row = Some(n);
                slot.in_batch = true;
                slot.n_past += 1;
                n += 1;
            }
        }
        for slot in self.slots.iter_mut().flatten() {
            let remaining = slot.request().prompt.len() - slot.prompt_done;
            if remaining == 0 || n >= budget {
                continue;
            }
            let take = remaining.min((budget - n) as usize);
            for j in 0..take {
                let i = slot.prompt_done + j;
                let last = i + 1 == slot.request().prompt.len();
                let tok = slot.request().prompt[i];
                // SAFETY: within the batch's room (`n < budget`).
                unsafe {
                    (api.tls_batch_add)(
                        self.batch,
                        tok,
                        i as i32,
                        slot.seq,
                        last || self.all_logits,
                    )
                };
                if last {
                    slot.row = Some(n);
                }
                n += 1;
            }
            slot.in_batch = true;
            slot.prompt_done += take;
            slot.n_past += take;
        }
        if n == 0 {
            return;
        }
        // SAFETY: the engine's context, adapter (or NULL) and batch.
        let rc = unsafe { (api.tls_decode)(self.ctx, self.adapter, self.batch) };
        if rc != 0 {
            let msg = if rc == TILLER_LLAMA_ERROR {
                api.adapter_error()
            } else {
                format!("llama_decode returned {rc}")
            };
            tracing::error!("decode of {n} tokens failed: {msg}");
            for s in 0..self.slots.len() {
                let Some(sl) = self.slots[s].as_ref().filter(|sl| sl.in_batch) else {
                    continue;
                };
                let _ = sl.job.tx.send(Out::Failed(msg.clone()));
                self.finish(s, "error");
            }
            return;
        }
        for s in 0..self.slots.len() {
            let Some(slot) = self.slots[s].as_ref() else {
                continue;
            };
            if !slot.in_batch {
                continue;
            }
            // SAFETY: the adapter is live and the sequence bound.
            if !self.adapter.is_null()
                && unsafe { (api.tiller_llama_seq_stopped)(self.adapter, slot.seq) } == 1
            {
                self.finish(s, "content_filter");
                continue;
            }
            self.collect_events(s);
            if let Some(row) = self.slots[s].as_ref().and_then(|sl| sl.row) {
                self.next_token(s, row);
            }
        }
    }

    /// Gathers the Tiller events of a streamed request that fired since the last look.
    fn collect_events(&mut self, s: usize) {
        let Some(t) = &self.tiller else { return };
        let Some(slot) = self.slots[s].as_mut() else {
            return;
        };
        if !slot.request().stream_events {
            return;
        }
        if let Some(Value::Array(events)) = t
            .summary(slot.job.id)
            .and_then(|mut v| v.get_mut("events").map(Value::take))
        {
            let new: Vec<Value> = events.into_iter().skip(slot.events_taken).collect();
            slot.events_taken += new.len();
            slot.events.extend(new);
        }
    }

    /// Samples sequence `s`'s next token from batch row `row`.
    fn next_token(&mut self, s: usize, row: i32) {
        // SAFETY: `row` requested logits in the decode that just succeeded; the row holds
        // `n_vocab` floats until the next decode.
        let logits = unsafe {
            let p = (self.api.llama_get_logits_ith)(self.ctx, row);
            if p.is_null() {
                None
            } else {
                Some(std::slice::from_raw_parts(p, self.model.n_vocab))
            }
        };
        let Some(logits) = logits else {
            if let Some(sl) = &self.slots[s] {
                let _ = sl
                    .job
                    .tx
                    .send(Out::Failed("llama.cpp returned no logits".into()));
            }
            self.finish(s, "error");
            return;
        };
        let model = self.model.clone();
        let metrics = self.metrics.clone();
        let ctx_per_seq = self.settings.ctx_per_seq;
        let Some(slot) = self.slots[s].as_mut() else {
            return;
        };
        let token = slot.sampler.sample(logits);
        let g = match &slot.job.work {
            Work::Generate(g) => g,
            Work::Embed(_) => unreachable!(),
        };
        let now = Instant::now();
        match slot.last_token {
            None => metrics.ttft.observe((now - slot.job.arrived).as_secs_f64()),
            Some(t) => metrics.itl.observe((now - t).as_secs_f64()),
        }
        slot.last_token = Some(now);
        if model.is_eog(token) && !g.ignore_eos {
            self.finish(s, "stop");
            return;
        }
        let logprob = g.logprobs.map(|k| sampling::logprobs(logits, token, k));
        slot.generated += 1;
        let (text, stopped) = match slot.detok.push(&model.piece(token)) {
            Piece::Text(t) => (t, false),
            Piece::Stopped(t) => (t, true),
        };
        let at_max = slot.generated >= g.max_tokens || slot.n_past + 1 > ctx_per_seq;
        let events = std::mem::take(&mut slot.events);
        let _ = slot.job.tx.send(Out::Token(TokenOut {
            token,
            text,
            logprob,
            events,
        }));
        if stopped {
            self.finish(s, "stop");
        } else if at_max {
            self.finish(s, "length");
        } else {
            slot.pending = Some(token);
        }
    }

    /// Ends sequence `s`: its Tiller request, its KV cells, its answer.
    fn finish(&mut self, s: usize, reason: &'static str) {
        let Some(mut slot) = self.slots[s].take() else {
            return;
        };
        if !self.adapter.is_null() {
            // SAFETY: the adapter is live; the sequence is bound.
            unsafe { (self.api.tiller_llama_seq_end)(self.adapter, slot.seq) };
        }
        // SAFETY: the engine's context.
        unsafe { (self.api.tls_seq_rm)(self.ctx, slot.seq) };
        let summary = self.tiller.as_ref().and_then(|t| t.end(slot.job.id));
        self.metrics.running.dec();
        self.metrics
            .finished
            .with_label_values(&[slot.job.endpoint.as_str(), reason])
            .inc();
        if reason == "disconnected" || reason == "error" {
            return;
        }
        let prompt_tokens = slot.request().prompt.len();
        let mut events = std::mem::take(&mut slot.events);
        if slot.request().stream_events
            && let Some(Value::Array(all)) = summary.as_ref().and_then(|v| v.get("events"))
        {
            events.extend(all.iter().skip(slot.events_taken).cloned());
        }
        // After a stop string this is empty: its text went out with the last token.
        let text = slot.detok.flush();
        let done = Out::Done {
            finish_reason: reason,
            text,
            prompt_tokens,
            completion_tokens: slot.generated,
            summary,
            events,
        };
        if slot.job.tx.send(done).is_ok() {
            self.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
            self.metrics.generated_tokens.inc_by(slot.generated as u64);
        }
    }

    /// Embeds each input alone (sequence 0, the cache cleared before each).
    fn embed(&mut self, job: Job) {
        let Work::Embed(inputs) = &job.work else {
            return;
        };
        let api = self.api.clone();
        let mut rows = Vec::new();
        let mut tokens = Vec::new();
        let mut summaries = Vec::new();
        let mut failed = None;
        for (toks, id) in inputs {
            if failed.is_some() || job.tx.is_closed() {
                if let Some(t) = &self.tiller {
                    t.end(*id);
                }
                continue;
            }
            // SAFETY: the engine's context, adapter and batch; the input fits the batch (the
            // handler checked it).
            let rc = unsafe {
                (api.tls_memory_clear)(self.ctx);
                if !self.adapter.is_null()
                    && (api.tiller_llama_seq_begin)(self.adapter, 0, *id) != 0
                {
                    failed = Some(api.adapter_error());
                    continue;
                }
                (api.tls_batch_clear)(self.batch);
                for (j, &t) in toks.iter().enumerate() {
                    (api.tls_batch_add)(self.batch, t, j as i32, 0, true);
                }
                (api.tls_decode)(self.ctx, self.adapter, self.batch)
            };
            // SAFETY: the adapter is live and sequence 0 bound.
            let stopped = !self.adapter.is_null()
                && unsafe { (api.tiller_llama_seq_stopped)(self.adapter, 0) } == 1;
            if rc != 0 {
                failed = Some(if rc == TILLER_LLAMA_ERROR {
                    api.adapter_error()
                } else {
                    format!("llama_decode returned {rc}")
                });
            }
            // SAFETY: after a decode that succeeded, sequence 0's pooled embedding holds n_embd
            // floats.
            let row = unsafe {
                let p = (api.llama_get_embeddings_seq)(self.ctx, 0);
                (rc == 0 && !p.is_null())
                    .then(|| std::slice::from_raw_parts(p, self.model.n_embd).to_vec())
            };
            if rc == 0 && row.is_none() {
                failed =
                    Some("llama.cpp gave no embedding (is the model an embedding model?)".into());
            }
            if !self.adapter.is_null() {
                // SAFETY: sequence 0 is bound.
                unsafe { (api.tiller_llama_seq_end)(self.adapter, 0) };
            }
            let summary = self.tiller.as_ref().and_then(|t| t.end(*id));
            rows.push(row.filter(|_| !stopped).map(unit));
            tokens.push(toks.len());
            summaries.push(summary);
        }
        let reason = if let Some(msg) = failed {
            let _ = job.tx.send(Out::Failed(msg));
            "error"
        } else if job.tx.is_closed() {
            "disconnected"
        } else {
            let n: usize = tokens.iter().sum();
            if job
                .tx
                .send(Out::Embedded {
                    rows,
                    tokens,
                    summaries,
                })
                .is_ok()
            {
                self.metrics.prompt_tokens.inc_by(n as u64);
            }
            "stop"
        };
        self.metrics
            .finished
            .with_label_values(&[job.endpoint.as_str(), reason])
            .inc();
    }
}

/// `v` scaled to unit length (float64 norm).
fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x = (*x as f64 / norm) as f32;
        }
    }
    v
}

impl Drop for Engine {
    fn drop(&mut self) {
        // SAFETY: the engine's own handles, freed once, the context before the adapter attached
        // to it.
        unsafe {
            (self.api.llama_free)(self.ctx);
            if !self.adapter.is_null() {
                (self.api.tiller_llama_free)(self.adapter);
            }
            (self.api.tls_batch_free)(self.batch);
        }
    }
}
