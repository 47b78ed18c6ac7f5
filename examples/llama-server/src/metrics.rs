//! The server's own metrics, beside Tiller's (docs/integrations/llama-server.md#metrics).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every series the server exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// HTTP requests answered, by endpoint and status.
    pub requests: IntCounterVec,
    /// Generations and embeddings finished, by endpoint and why.
    pub finished: IntCounterVec,
    /// Requests waiting for a slot.
    pub queue_depth: IntGauge,
    /// Sequences in the slots.
    pub running: IntGauge,
    /// Prompt tokens of finished requests (the sum of `usage.prompt_tokens`).
    pub prompt_tokens: IntCounter,
    /// Generated tokens of finished requests (the sum of `usage.completion_tokens`).
    pub generated_tokens: IntCounter,
    /// From a request's arrival to its first generated token.
    pub ttft: Histogram,
    /// Between a sequence's consecutive generated tokens.
    pub itl: Histogram,
    /// Config reloads, by result.
    pub reloads: IntCounterVec,
}

impl Metrics {
    /// A fresh registry.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tiller_server_requests_total",
                "HTTP requests answered, by endpoint and status",
            ),
            &["endpoint", "status"],
        )?;
        let finished = IntCounterVec::new(
            Opts::new(
                "tiller_server_finished_total",
                "Requests finished, by endpoint and finish reason (stop, length, content_filter, disconnected, error)",
            ),
            &["endpoint", "finish_reason"],
        )?;
        let queue_depth =
            IntGauge::new("tiller_server_queue_depth", "Requests waiting for a slot")?;
        let running = IntGauge::new("tiller_server_running_sequences", "Sequences being decoded")?;
        let prompt_tokens = IntCounter::new(
            "tiller_server_prompt_tokens_total",
            "Prompt tokens of finished requests",
        )?;
        let generated_tokens = IntCounter::new(
            "tiller_server_generated_tokens_total",
            "Tokens generated for finished requests",
        )?;
        let ttft = Histogram::with_opts(
            HistogramOpts::new(
                "tiller_server_time_to_first_token_seconds",
                "From a request's arrival to its first generated token",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        let itl = Histogram::with_opts(
            HistogramOpts::new(
                "tiller_server_inter_token_latency_seconds",
                "Between a sequence's consecutive generated tokens",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "tiller_server_reloads_total",
                "Tiller config reloads, by result",
            ),
            &["result"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(finished.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(generated_tokens.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(itl.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        Ok(Self {
            registry,
            requests,
            finished,
            queue_depth,
            running,
            prompt_tokens,
            generated_tokens,
            ttft,
            itl,
            reloads,
        })
    }

    /// The Prometheus text exposition.
    pub fn text(&self) -> String {
        let mut out = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
