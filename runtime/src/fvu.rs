//! The reconstruction-quality gauges, `dictionary_fvu` and `dictionary_l0`, measured off the hot
//! path (design section 6: the drift alarm).
//!
//! A hook call picks every `1/fvu_sample_rate`-th token a dictionary reads (counted per
//! dictionary, so sampling follows tokens, not steps: a 512-token prefill gives about 5 rows at the
//! default rate, a lone token one now and then), copies those rows out, and hands them to one
//! background worker per runtime through a bounded queue. The worker gathers a gauge window of rows
//! (or waits 10 s), runs the dictionary's full encode and decode on them and updates the gauges. The hook never waits for it: when the queue is
//! full the rows are dropped and counted in `fvu_samples_total{result="dropped"}`.
//!
//! The reconstruction is compared with what the dictionary reconstructs: its input for an SAE and a
//! crosscoder (every read layer), the activations at `hook_out` for a transcoder (before any edit
//! at that hook), and at each layer's `hook_out` for a CLT. The FVU of a window of sampled tokens is
//! `Σ‖y − ŷ‖² / Σ‖y − ȳ‖²`, `ȳ` the window's mean of each output value, over every output layer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use ndarray::{Array2, ArrayView2};

use crate::metrics::DictionaryMetrics;

/// Measurements waiting for the worker, at most: a full queue drops new samples.
pub(crate) const QUEUE: usize = 64;

/// The largest share of one core's time the worker spends measuring: after a measurement that
/// took `d` it rests `d·(1/DUTY − 1)`, so that on a machine with few cores it cannot take the
/// hook's core (or memory bandwidth) for long; what arrives meanwhile queues up and is measured
/// as one batch, or is dropped and counted when the queue is full.
const DUTY: f64 = 0.2;

/// The longest rest after one measurement.
const MAX_REST: std::time::Duration = std::time::Duration::from_secs(1);

/// Sampled tokens per gauge update.
const WINDOW: usize = 32;

/// How long the worker waits, once a sample has arrived, for a gauge window of them (`WINDOW`
/// rows) before it measures what it has. A measurement reads all of the dictionary's weights (a
/// 16× SAE of width 1024 holds 134 MB of f32) whatever the number of rows, so that read is paid
/// once per window instead of once per sampled token: a server decoding a token per sequence per
/// step samples one row at a time.
const GATHER: std::time::Duration = std::time::Duration::from_secs(10);

/// Which tokens of a dictionary's input are sampled: every `every`-th, counted across calls.
#[derive(Debug)]
pub(crate) struct Sampler {
    every: u64,
    seen: AtomicU64,
}

impl Sampler {
    /// Samples every `every`-th token (never with 0).
    pub(crate) fn new(every: u64) -> Self {
        Self {
            every,
            seen: AtomicU64::new(0),
        }
    }

    /// Counts `n` tokens read and returns the first sampled one among them and the stride, or
    /// `None` when none of them is sampled.
    pub(crate) fn pick(&self, n: usize) -> Option<(usize, usize)> {
        if self.every == 0 || n == 0 {
            return None;
        }
        let c = self.seen.fetch_add(n as u64, Ordering::Relaxed);
        // Tokens c, c+1, …, c+n-1: the sampled ones are the multiples of `every`.
        let first = (self.every - c % self.every) % self.every;
        ((first as usize) < n).then_some((first as usize, self.every as usize))
    }
}

/// One dictionary's running window and gauges.
#[derive(Debug)]
pub(crate) struct Meter {
    window: Mutex<Window>,
    gauges: DictionaryMetrics,
}

#[derive(Debug, Default)]
struct Window {
    n: usize,
    err: f64,
    sum_sq: f64,
    sum: Vec<f64>,
    l0: f64,
}

impl Window {
    /// An empty window over targets of `width` values.
    fn new(width: usize) -> Self {
        Self {
            sum: vec![0.0; width],
            ..Self::default()
        }
    }
}

impl Meter {
    pub(crate) fn new(gauges: DictionaryMetrics) -> Self {
        Self {
            window: Mutex::default(),
            gauges,
        }
    }

    /// Counts `n` sampled tokens that the worker's queue had no room for.
    pub(crate) fn dropped(&self, n: usize) {
        self.gauges.dropped.inc_by(n as u64);
    }

    /// Adds sampled tokens: their feature activations `acts`, reconstructions `recon` and the
    /// activations reconstructed, `target` (same shape as `recon`); sets the gauges once the
    /// window holds [`WINDOW`] tokens or more, and starts a new one.
    pub(crate) fn add(
        &self,
        acts: ArrayView2<'_, f32>,
        recon: ArrayView2<'_, f32>,
        target: ArrayView2<'_, f32>,
    ) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if w.sum.len() != target.ncols() {
            *w = Window::new(target.ncols());
        }
        for t in 0..target.nrows() {
            let (y, r) = (target.row(t), recon.row(t));
            w.err += y
                .iter()
                .zip(r.iter())
                .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                .sum::<f64>();
            w.sum_sq += y.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>();
            for (s, a) in w.sum.iter_mut().zip(y.iter()) {
                *s += f64::from(*a);
            }
            w.l0 += acts.row(t).iter().filter(|v| **v > 0.0).count() as f64;
            w.n += 1;
        }
        self.gauges.measured.inc_by(target.nrows() as u64);
        if w.n >= WINDOW {
            let n = w.n as f64;
            let var = w.sum_sq - w.sum.iter().map(|s| s * s).sum::<f64>() / n;
            if var > 0.0 {
                self.gauges.fvu.set(w.err / var);
            }
            self.gauges.l0.set(w.l0 / n);
            *w = Window::new(target.ncols());
        }
    }
}

/// What the worker needs of a dictionary: its reconstruction, and the meter it feeds.
pub(crate) trait Reconstruct: Send + Sync {
    /// Feature activations and reconstructions of `x` (`[n, input width]`), or `None` when the
    /// dictionary failed (counted by the implementation).
    fn reconstruct(&self, x: ArrayView2<'_, f32>) -> Option<(Array2<f32>, Array2<f32>)>;
    /// The meter of its gauges.
    fn meter(&self) -> &Meter;
}

/// Sampled tokens of one dictionary, on their way to the worker.
pub(crate) struct Sample {
    /// The dictionary: samples with the same key are measured in one batch.
    pub(crate) key: (usize, usize),
    pub(crate) source: Arc<dyn Reconstruct>,
    /// `[n, input width]`.
    pub(crate) input: Vec<f32>,
    /// `[n, output width]`; `None` when the target is the input.
    pub(crate) target: Option<Vec<f32>>,
    pub(crate) n: usize,
}

/// Work for the worker.
enum Job {
    Measure(Sample),
    /// Answered once every job queued before it is done.
    Flush(SyncSender<()>),
}

/// The background worker that measures sampled tokens. Dropping the handle stops it: the worker
/// measures what is already queued, without resting, and the drop waits for its thread to end, so
/// that no measurement is still inside ONNX Runtime when the host tears the process down (a
/// detached worker could be, and crashed there at exit).
#[derive(Debug)]
pub(crate) struct Worker {
    tx: Option<SyncSender<Job>>,
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

/// Set when the worker's handle drops: its rests end at once.
#[derive(Debug, Default)]
struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stop {
    /// Rests for `d`, or less when the worker is stopped meanwhile.
    fn rest(&self, d: std::time::Duration) {
        let stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = self
            .wake
            .wait_timeout_while(stopped, d, |stopped| !*stopped)
            .unwrap_or_else(PoisonError::into_inner);
    }

    fn set(&self) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.wake.notify_all();
    }
}

impl Worker {
    /// Starts the worker thread.
    pub(crate) fn start() -> std::io::Result<Self> {
        Self::start_gathering(GATHER)
    }

    /// Starts the worker thread, which waits up to `gather` for a window of samples.
    pub(crate) fn start_gathering(gather: std::time::Duration) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(QUEUE);
        let stop = Arc::new(Stop::default());
        let thread = std::thread::Builder::new()
            .name("tiller-fvu".into())
            .spawn({
                let stop = stop.clone();
                move || run(&rx, &stop, gather)
            })?;
        Ok(Self {
            tx: Some(tx),
            stop,
            thread: Some(thread),
        })
    }

    /// Queues `sample` without waiting; when the queue is full (or the worker is gone) its tokens
    /// are counted as dropped.
    pub(crate) fn submit(&self, sample: Sample) {
        let Some(tx) = &self.tx else {
            sample.source.meter().dropped(sample.n);
            return;
        };
        if let Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) =
            tx.try_send(Job::Measure(sample))
            && let Job::Measure(s) = job
        {
            s.source.meter().dropped(s.n);
        }
    }

    /// Waits until every measurement queued before this call is done.
    pub(crate) fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done, wait) = sync_channel(1);
        if tx.send(Job::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.set();
        // Closing the queue ends the worker's loop once it has taken what is queued.
        self.tx = None;
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

/// The worker's loop: gathers samples until a gauge window of rows has arrived, a flush asks, or
/// `gather` has passed since the first, and measures consecutive samples of one dictionary in one
/// batch (its weights are then read once for all of them).
fn run(rx: &Receiver<Job>, stop: &Stop, gather: std::time::Duration) {
    while let Ok(first) = rx.recv() {
        let deadline = std::time::Instant::now() + gather;
        let mut jobs = vec![first];
        loop {
            while jobs.len() < QUEUE {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            let rows: usize = jobs
                .iter()
                .map(|j| match j {
                    Job::Measure(s) => s.n,
                    Job::Flush(_) => 0,
                })
                .sum();
            if rows >= WINDOW
                || jobs.len() >= QUEUE
                || jobs.iter().any(|j| matches!(j, Job::Flush(_)))
            {
                break;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            // A timeout, or the handle dropped (the queue closed): measure what is here.
            match rx.recv_timeout(left) {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let mut group: Vec<Sample> = Vec::new();
        let mut flushed = false;
        for job in jobs {
            match job {
                Job::Measure(s) => {
                    if group.first().is_some_and(|g| g.key != s.key) {
                        measure(std::mem::take(&mut group));
                    }
                    group.push(s);
                }
                Job::Flush(done) => {
                    measure(std::mem::take(&mut group));
                    let _ = done.send(());
                    flushed = true;
                }
            }
        }
        measure(group);
        // A flush is waited for: no rest after one.
        if !flushed {
            let rest = started.elapsed().mul_f64(1.0 / DUTY - 1.0);
            stop.rest(rest.min(MAX_REST));
        }
    }
}

/// Measures samples of one dictionary together.
fn measure(group: Vec<Sample>) {
    let Some(first) = group.first() else {
        return;
    };
    let source = first.source.clone();
    let n: usize = group.iter().map(|s| s.n).sum();
    let mut input = Vec::new();
    let mut target = Vec::new();
    for s in &group {
        input.extend_from_slice(&s.input);
        target.extend_from_slice(s.target.as_deref().unwrap_or(&s.input));
    }
    // A failing measurement must not end the worker (nor reach the host's threads).
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let Ok(x) = ArrayView2::from_shape((n, input.len() / n.max(1)), &input[..]) else {
            return;
        };
        let Some((acts, recon)) = source.reconstruct(x) else {
            return;
        };
        if let Ok(y) = ArrayView2::from_shape(recon.dim(), &target[..]) {
            source.meter().add(acts.view(), recon.view(), y);
        }
    }));
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use ndarray::{Array2, ArrayView2};

    use super::{Meter, QUEUE, Reconstruct, Sample, Sampler, WINDOW, Worker};
    use crate::metrics::{DictionaryMetrics, Metrics};

    #[test]
    fn sampler_picks_every_nth_token_across_calls() {
        let s = Sampler::new(4);
        // Tokens 0..3 (0 sampled), 3..4 (none), 4..13 (4, 8, 12).
        assert_eq!(s.pick(3), Some((0, 4)));
        assert_eq!(s.pick(1), None);
        assert_eq!(s.pick(9), Some((0, 4)));
        // 13..15: none; 15..17: token 16, the second of the call.
        assert_eq!(s.pick(2), None);
        assert_eq!(s.pick(2), Some((1, 4)));
        assert_eq!(Sampler::new(0).pick(100), None);
    }

    /// An identity "dictionary" whose first reconstruction waits until released, and which
    /// records the batch sizes it was given.
    struct Gate {
        meter: Meter,
        gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
        started: Mutex<Option<std::sync::mpsc::Sender<()>>>,
        batches: Mutex<Vec<usize>>,
        panics_at: AtomicUsize,
    }

    impl Reconstruct for Gate {
        fn reconstruct(&self, x: ArrayView2<'_, f32>) -> Option<(Array2<f32>, Array2<f32>)> {
            if let Some(s) = self
                .started
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                let _ = s.send(());
            }
            if let Some(g) = self.gate.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = g.recv();
            }
            let mut b = self.batches.lock().unwrap_or_else(|p| p.into_inner());
            b.push(x.nrows());
            if self.panics_at.load(Ordering::Relaxed) == b.len() {
                drop(b);
                panic!("a failing measurement");
            }
            Some((x.to_owned(), x.to_owned()))
        }
        fn meter(&self) -> &Meter {
            &self.meter
        }
    }

    fn sample(g: &Arc<Gate>, n: usize) -> Sample {
        Sample {
            key: (0, 0),
            source: g.clone(),
            input: vec![1.0; n * 2],
            target: None,
            n,
        }
    }

    /// A [`Gate`] on fresh metrics, the sender that releases its first reconstruction, and the
    /// receiver told when that reconstruction has started.
    fn gated() -> (
        Arc<Gate>,
        std::sync::mpsc::Sender<()>,
        std::sync::mpsc::Receiver<()>,
    ) {
        let metrics = Metrics::new("t", &Default::default()).expect("metrics");
        let (release, gate) = std::sync::mpsc::channel();
        let (started, running) = std::sync::mpsc::channel();
        let g = Arc::new(Gate {
            meter: Meter::new(DictionaryMetrics {
                l0: metrics.l0.with_label_values(&["d"]),
                fvu: metrics.fvu.with_label_values(&["d"]),
                measured: metrics.fvu_samples.with_label_values(&["d", "measured"]),
                dropped: metrics.fvu_samples.with_label_values(&["d", "dropped"]),
            }),
            gate: Mutex::new(Some(gate)),
            started: Mutex::new(Some(started)),
            batches: Mutex::default(),
            panics_at: AtomicUsize::new(0),
        });
        (g, release, running)
    }

    /// A full queue refuses at once (the hook never waits) and counts the tokens dropped; what
    /// queued up behind a busy worker is measured in one batch; a panicking measurement leaves
    /// the worker running.
    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let (g, release, running) = gated();
        let w = Worker::start_gathering(Duration::ZERO).expect("worker");
        w.submit(sample(&g, 1));
        running.recv().expect("the first measurement runs");
        for _ in 0..QUEUE {
            w.submit(sample(&g, 2));
        }
        w.submit(sample(&g, 3));
        assert_eq!(g.meter.gauges.dropped.get(), 3, "a full queue drops");
        release.send(()).expect("release");
        w.flush();
        assert_eq!(g.meter.gauges.measured.get(), 1 + 2 * QUEUE as u64);
        assert_eq!(
            *g.batches.lock().unwrap_or_else(|p| p.into_inner()),
            vec![1, 2 * QUEUE],
            "what queued up is measured as one batch"
        );
        g.panics_at.store(3, Ordering::Relaxed);
        w.submit(sample(&g, 4));
        w.flush();
        w.submit(sample(&g, 5));
        w.flush();
        assert_eq!(g.meter.gauges.measured.get(), 1 + 2 * QUEUE as u64 + 5);
    }

    /// Dropping the worker waits for its thread: what was queued is measured by the time the drop
    /// returns, and nothing runs on after it (a detached worker was still inside ONNX Runtime when
    /// a test process exited, and crashed there).
    #[test]
    fn dropping_the_worker_waits_for_its_thread() {
        let (g, release, running) = gated();
        let w = Worker::start_gathering(Duration::ZERO).expect("worker");
        w.submit(sample(&g, 1));
        running.recv().expect("the first measurement runs");
        w.submit(sample(&g, 2));
        // Released only after the drop has begun: the drop must wait for both measurements.
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            release.send(()).expect("release");
        });
        drop(w);
        // Checked before the releaser is joined: a drop that did not wait would return at once,
        // with the first measurement still held at the gate.
        assert_eq!(
            g.meter.gauges.measured.get(),
            3,
            "queued samples measured before the drop returned"
        );
        assert_eq!(
            Arc::strong_count(&g),
            1,
            "the worker's thread has ended and let go of its samples"
        );
        releaser.join().expect("releaser");
    }
    /// Samples that arrive one row at a time wait for a gauge window of rows and are measured in
    /// one batch (one read of the dictionary's weights), not one measurement per row; a flush, or
    /// the end of the wait, measures what has arrived.
    #[test]
    fn rows_arriving_one_at_a_time_are_measured_a_window_at_a_time() {
        let (g, release, _running) = gated();
        release.send(()).expect("release");
        let w = Worker::start_gathering(Duration::from_secs(600)).expect("worker");
        for _ in 0..WINDOW + 3 {
            w.submit(sample(&g, 1));
            std::thread::sleep(Duration::from_millis(2));
        }
        w.flush();
        let batches = g.batches.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(batches.iter().sum::<usize>(), WINDOW + 3);
        assert!(
            batches.len() <= 2 && batches[0] >= WINDOW,
            "{} rows measured in {} batches ({batches:?})",
            WINDOW + 3,
            batches.len()
        );
        // A lone sample is measured when the wait ends, without a flush.
        let (g, release, running) = gated();
        release.send(()).expect("release");
        let w = Worker::start_gathering(Duration::from_millis(200)).expect("worker");
        w.submit(sample(&g, 1));
        running.recv().expect("measured after the wait");
        drop(w);
        assert_eq!(g.meter.gauges.measured.get(), 1);
    }
}
