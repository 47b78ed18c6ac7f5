//! WASM policy plugins: monitors and steering logic written by the operator, sandboxed.
//!
//! One wasmtime [`Engine`] and [`Linker`] per runtime state; one [`Store`] per policy instance, with
//! fuel on every call and limits on memory, tables and instances. A trap, running out of fuel,
//! running out of memory, or a malformed answer cancels that call's effect, is counted in
//! `tiller_policy_traps_total{policy,reason}`, and after `max_failures` consecutive failures the
//! policy is disabled. The ABI is specified in `plugin-abi/policy/POLICY_ABI.md`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use prometheus::IntCounter;
use wasmtime::{
    Caller, Engine, Instance, Linker, Memory, Module, Store, StoreLimits, StoreLimitsBuilder, Trap,
    TypedFunc,
};

use crate::config::PolicyConfig;
use crate::metrics::Metrics;
use crate::{Error, Result};

/// The ABI's constants, defined once in `tiller-policy-abi`: the version marker, the size of an
/// action record, the limits, and the action codes (the `code` field of an action record).
pub use tiller_policy_abi::{ABI_MARKER, ACTION_SIZE, MAX_ACTIONS, MAX_PAIRS, MAX_STRING, action};
use tiller_policy_abi::{IMPORT_MODULE, export, import};

/// What a policy asked for, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyAction {
    /// Flag the request.
    Flag(String),
    /// Switch its profile.
    SwitchProfile(String),
    /// Stop it.
    Stop,
    /// Clamp a feature (an original feature id) to a value.
    Clamp(u32, f32),
    /// Ablate a feature.
    Ablate(u32),
    /// Add a feature's decoder row times a strength.
    Add(u32, f32),
    /// Remove the steering this policy added to the request.
    Clear,
}

/// Why a call failed (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The guest trapped.
    Trap,
    /// It ran out of fuel (an endless loop, or too much work).
    Fuel,
    /// It ran out of memory under its limit.
    Memory,
    /// Its answer was malformed (out of range pointer, unknown code, bad string, unknown feature).
    BadAnswer,
}

impl Failure {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trap => "trap",
            Self::Fuel => "fuel",
            Self::Memory => "memory",
            Self::BadAnswer => "bad_answer",
        }
    }
    const ALL: [Failure; 4] = [Self::Trap, Self::Fuel, Self::Memory, Self::BadAnswer];
}

struct HostState {
    limits: StoreLimits,
    config: String,
    policy: String,
    counters: Vec<IntCounter>,
    memory_denied: bool,
}

/// One instance: its store, memory and exported callbacks.
struct Instance1 {
    store: Store<HostState>,
    memory: Memory,
    begin: TypedFunc<(i64, i32, i32), i64>,
    features: TypedFunc<(i64, i64, i32, i32, i32), i64>,
    end: TypedFunc<i64, i64>,
    /// A buffer in guest memory for the pairs and strings the host hands over.
    buf: i32,
    buf_len: usize,
}

/// A loaded policy.
pub struct Policy {
    /// Its name (a metric label).
    pub name: String,
    /// The dictionary whose features it sees (an index into the runtime's dictionaries).
    pub dictionary: usize,
    /// The columns of the features it sees, and their original ids.
    pub columns: Vec<(usize, u32)>,
    /// The original ids of every feature of its dictionary (`None`: `0..d_sae`), to check answers.
    feature_ids: Option<Vec<u32>>,
    d_sae: usize,
    /// `on_failure = "closed"`: a failed call stops the request.
    pub fail_closed: bool,
    fuel: u64,
    max_failures: u32,
    failures: AtomicU32,
    disabled: AtomicBool,
    instances: Vec<Mutex<Instance1>>,
    traps: [IntCounter; 4],
    /// Failures are logged at most once a second: a policy that fails on every token would
    /// otherwise flood the log (the counter has them all).
    log_throttle: crate::logging::Throttle,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("name", &self.name)
            .field("instances", &self.instances.len())
            .finish()
    }
}

/// Builds the engine all policies of one runtime state share.
pub fn engine() -> Result<Engine> {
    let mut c = wasmtime::Config::new();
    c.consume_fuel(true);
    Engine::new(&c).map_err(|e| Error::invalid("policy engine", e.to_string()))
}

fn linker(engine: &Engine) -> Result<Linker<HostState>> {
    let mut l = Linker::new(engine);
    let err = |e: wasmtime::Error| Error::invalid("policy linker", e.to_string());
    l.func_wrap(
        IMPORT_MODULE,
        import::LOG,
        |mut caller: Caller<'_, HostState>, level: i32, ptr: i32, len: i32| {
            if let Some(text) = read_string(&mut caller, ptr, len) {
                let policy = &caller.data().policy;
                eprintln!(
                    "tiller policy `{policy}` [{}]: {text}",
                    match level {
                        0 => "debug",
                        1 => "info",
                        2 => "warn",
                        _ => "error",
                    }
                );
            }
        },
    )
    .map_err(err)?;
    l.func_wrap(
        IMPORT_MODULE,
        import::CONFIG,
        |mut caller: Caller<'_, HostState>, ptr: i32, cap: i32| -> i32 {
            let config = caller.data().config.clone();
            let Some(memory) = caller
                .get_export(export::MEMORY)
                .and_then(|e| e.into_memory())
            else {
                return -1;
            };
            let n = config.len().min(cap.max(0) as usize);
            if memory
                .write(&mut caller, ptr.max(0) as usize, &config.as_bytes()[..n])
                .is_err()
            {
                return -1;
            }
            config.len() as i32
        },
    )
    .map_err(err)?;
    l.func_wrap(
        IMPORT_MODULE,
        import::COUNTER_ADD,
        |caller: Caller<'_, HostState>, index: i32, delta: i64| {
            if let Some(c) = usize::try_from(index)
                .ok()
                .and_then(|i| caller.data().counters.get(i))
                && delta > 0
            {
                c.inc_by(delta as u64);
            }
        },
    )
    .map_err(err)?;
    Ok(l)
}

fn read_string(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Option<String> {
    let memory = caller.get_export(export::MEMORY)?.into_memory()?;
    let (ptr, len) = (usize::try_from(ptr).ok()?, usize::try_from(len).ok()?);
    if len > MAX_STRING * 16 {
        return None;
    }
    let bytes = memory.data(&caller).get(ptr..ptr.checked_add(len)?)?;
    Some(String::from_utf8_lossy(bytes).into_owned())
}

impl Policy {
    /// Compiles and instantiates the policy of `cfg` (module path already resolved).
    pub fn load(
        engine: &Engine,
        cfg: &PolicyConfig,
        path: &std::path::Path,
        dictionary: usize,
        columns: Vec<(usize, u32)>,
        dict_meta: &crate::Meta,
        metrics: &Metrics,
    ) -> Result<Self> {
        let what = format!("policy `{}`", cfg.name);
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let module = Module::new(engine, &bytes).map_err(|e| {
            Error::invalid(
                &what,
                format!(
                    "{} is not a valid WebAssembly module: {e:#}",
                    path.display()
                ),
            )
        })?;
        let linker = linker(engine)?;
        let counters: Vec<IntCounter> = cfg
            .counters
            .iter()
            .map(|c| {
                metrics
                    .policy_counters
                    .with_label_values(&[cfg.name.as_str(), c.as_str()])
            })
            .collect();
        let mut instances = Vec::new();
        for _ in 0..cfg.instances.max(1) {
            instances.push(Mutex::new(instantiate(
                engine,
                &linker,
                &module,
                cfg,
                &what,
                counters.clone(),
            )?));
        }
        let traps = Failure::ALL.map(|f| {
            metrics
                .policy_traps
                .with_label_values(&[cfg.name.as_str(), f.as_str()])
        });
        Ok(Self {
            name: cfg.name.clone(),
            dictionary,
            columns,
            feature_ids: dict_meta.feature_ids.clone(),
            d_sae: dict_meta.d_sae,
            fail_closed: cfg.on_failure == crate::config::OnFailure::Closed,
            fuel: cfg.fuel,
            max_failures: cfg.max_failures.max(1),
            failures: AtomicU32::new(0),
            disabled: AtomicBool::new(false),
            instances,
            traps,
            log_throttle: crate::logging::Throttle::new(),
        })
    }

    /// Whether repeated failures disabled it.
    pub fn disabled(&self) -> bool {
        self.disabled.load(Ordering::Relaxed)
    }

    fn instance(&self, request: u64) -> &Mutex<Instance1> {
        // A request always goes to the same instance, which keeps its state.
        &self.instances[(request % self.instances.len() as u64) as usize]
    }

    /// Records a failed call; returns true when this failure disabled the policy.
    fn failed(&self, why: Failure) -> bool {
        self.traps[Failure::ALL.iter().position(|f| *f == why).unwrap_or(0)].inc();
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let disabled_now = n >= self.max_failures && !self.disabled.swap(true, Ordering::Relaxed);
        let (policy, reason) = (self.name.as_str(), why.as_str());
        if disabled_now {
            tracing::warn!(
                policy,
                reason,
                failures = n,
                "policy disabled after repeated failures"
            );
        } else if let Some(suppressed) = self.log_throttle.admit() {
            tracing::warn!(
                policy,
                reason,
                suppressed,
                fail_closed = self.fail_closed,
                "policy call failed"
            );
        }
        disabled_now
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// `on_request_begin`.
    pub fn request_begin(&self, request: u64, profile: &str) -> Outcome {
        self.call(request, |inst, fuel| {
            let n = profile.len().min(MAX_STRING);
            inst.write(inst.buf, &profile.as_bytes()[..n])?;
            inst.store.set_fuel(fuel).map_err(|_| Failure::Trap)?;
            let Instance1 {
                store, begin, buf, ..
            } = inst;
            begin
                .call(&mut *store, (request as i64, *buf, n as i32))
                .map_err(classify(store))
        })
    }

    /// `on_features` for one token: `pairs` are `(original feature id, value)`.
    pub fn features(
        &self,
        request: u64,
        token: u64,
        generated: bool,
        pairs: &[(u32, f32)],
    ) -> Outcome {
        self.call(request, |inst, fuel| {
            let n = pairs.len().min(MAX_PAIRS).min(inst.buf_len / 8);
            let mut bytes = [0u8; 8 * 64];
            let mut written = 0;
            for chunk in pairs[..n].chunks(64) {
                for (i, (f, v)) in chunk.iter().enumerate() {
                    bytes[i * 8..i * 8 + 4].copy_from_slice(&f.to_le_bytes());
                    bytes[i * 8 + 4..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
                }
                inst.write(inst.buf + written as i32, &bytes[..chunk.len() * 8])?;
                written += chunk.len() * 8;
            }
            inst.store.set_fuel(fuel).map_err(|_| Failure::Trap)?;
            let Instance1 {
                store,
                features,
                buf,
                ..
            } = inst;
            features
                .call(
                    &mut *store,
                    (
                        request as i64,
                        token as i64,
                        i32::from(generated),
                        *buf,
                        n as i32,
                    ),
                )
                .map_err(classify(store))
        })
    }

    /// `on_request_end`.
    pub fn request_end(&self, request: u64) -> Outcome {
        self.call(request, |inst, fuel| {
            inst.store.set_fuel(fuel).map_err(|_| Failure::Trap)?;
            let Instance1 { store, end, .. } = inst;
            end.call(&mut *store, request as i64)
                .map_err(classify(store))
        })
    }

    fn call(
        &self,
        request: u64,
        f: impl FnOnce(&mut Instance1, u64) -> std::result::Result<i64, Failure>,
    ) -> Outcome {
        if self.disabled() {
            return Outcome::Disabled;
        }
        let mut inst = self
            .instance(request)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        inst.store.data_mut().memory_denied = false;
        let answer = f(&mut inst, self.fuel).map(|a| (a, inst.store.data().memory_denied));
        let exists = |f: u32| match &self.feature_ids {
            Some(ids) => ids.contains(&f),
            None => (f as usize) < self.d_sae,
        };
        let result = match answer {
            Ok((a, _)) => inst.parse(a, &exists),
            Err(Failure::Trap) if inst.store.data().memory_denied => Err(Failure::Memory),
            Err(e) => Err(e),
        };
        drop(inst);
        match result {
            Ok(actions) => {
                self.succeeded();
                Outcome::Actions(actions)
            }
            Err(why) => Outcome::Failed {
                why,
                disabled_now: self.failed(why),
            },
        }
    }
}

/// The result of one policy call.
#[derive(Debug)]
pub enum Outcome {
    /// The call succeeded with these actions.
    Actions(Vec<PolicyAction>),
    /// The call failed; its effect is cancelled.
    Failed {
        /// Why.
        why: Failure,
        /// Whether this failure disabled the policy.
        disabled_now: bool,
    },
    /// The policy is disabled: nothing was called.
    Disabled,
}

fn classify(store: &Store<HostState>) -> impl Fn(wasmtime::Error) -> Failure + '_ {
    move |e| match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Failure::Fuel,
        _ if store.data().memory_denied => Failure::Memory,
        _ => Failure::Trap,
    }
}

impl wasmtime::ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = self.limits.memory_growing(current, desired, maximum)?;
        if !ok {
            self.memory_denied = true;
        }
        Ok(ok)
    }
    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }
    fn instances(&self) -> usize {
        self.limits.instances()
    }
    fn tables(&self) -> usize {
        self.limits.tables()
    }
    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

fn instantiate(
    engine: &Engine,
    linker: &Linker<HostState>,
    module: &Module,
    cfg: &PolicyConfig,
    what: &str,
    counters: Vec<IntCounter>,
) -> Result<Instance1> {
    let limits = StoreLimitsBuilder::new()
        .memory_size(cfg.memory_mb.max(1) * (1 << 20))
        .table_elements(10_000)
        .instances(1)
        .tables(4)
        .memories(1)
        .build();
    let state = HostState {
        limits,
        config: cfg.config.clone(),
        policy: cfg.name.clone(),
        counters,
        memory_denied: false,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| s as &mut dyn wasmtime::ResourceLimiter);
    store
        .set_fuel(cfg.fuel)
        .map_err(|e| Error::invalid(what, e.to_string()))?;
    let instance: Instance = linker
        .instantiate(&mut store, module)
        .map_err(|e| Error::invalid(what, format!("cannot be instantiated: {e:#}")))?;
    if instance.get_func(&mut store, ABI_MARKER).is_none() {
        return Err(Error::invalid(
            what,
            format!("does not export `{ABI_MARKER}`: not a Tiller policy (or another ABI version)"),
        ));
    }
    let memory = instance
        .get_memory(&mut store, export::MEMORY)
        .ok_or_else(|| Error::invalid(what, "does not export its `memory`"))?;
    let typed = |store: &mut Store<HostState>, name: &str| -> Result<()> {
        if instance.get_func(&mut *store, name).is_none() {
            return Err(Error::invalid(what, format!("does not export `{name}`")));
        }
        Ok(())
    };
    for name in [
        export::ALLOC,
        export::ON_REQUEST_BEGIN,
        export::ON_FEATURES,
        export::ON_REQUEST_END,
    ] {
        typed(&mut store, name)?;
    }
    let sig = |e: wasmtime::Error| {
        Error::invalid(what, format!("an export has the wrong signature: {e}"))
    };
    let alloc = instance
        .get_typed_func::<i32, i32>(&mut store, export::ALLOC)
        .map_err(sig)?;
    let begin = instance
        .get_typed_func::<(i64, i32, i32), i64>(&mut store, export::ON_REQUEST_BEGIN)
        .map_err(sig)?;
    let features = instance
        .get_typed_func::<(i64, i64, i32, i32, i32), i64>(&mut store, export::ON_FEATURES)
        .map_err(sig)?;
    let end = instance
        .get_typed_func::<i64, i64>(&mut store, export::ON_REQUEST_END)
        .map_err(sig)?;
    let buf_len = MAX_PAIRS * 8;
    store
        .set_fuel(cfg.fuel)
        .map_err(|e| Error::invalid(what, e.to_string()))?;
    let buf = alloc
        .call(&mut store, buf_len as i32)
        .map_err(|e| Error::invalid(what, format!("`tiller_alloc` failed: {e:#}")))?;
    let mem_len = memory.data_size(&store);
    if buf <= 0
        || (buf as usize)
            .checked_add(buf_len)
            .is_none_or(|end| end > mem_len)
    {
        return Err(Error::invalid(
            what,
            format!("`tiller_alloc({buf_len})` returned {buf}, outside its memory"),
        ));
    }
    Ok(Instance1 {
        store,
        memory,
        begin,
        features,
        end,
        buf,
        buf_len,
    })
}

impl Instance1 {
    fn write(&mut self, at: i32, bytes: &[u8]) -> std::result::Result<(), Failure> {
        self.memory
            .write(&mut self.store, at as usize, bytes)
            .map_err(|_| Failure::BadAnswer)
    }

    /// Reads the answer `(ptr << 32) | count` of action records.
    fn parse(
        &self,
        answer: i64,
        exists: &dyn Fn(u32) -> bool,
    ) -> std::result::Result<Vec<PolicyAction>, Failure> {
        parse_answer(self.memory.data(&self.store), answer, exists)
    }
}

/// Decodes a guest's answer `(ptr << 32) | count` of action records in its memory `data`.
///
/// Public only so that the fuzz targets (`fuzz/`) can reach it; not part of the API.
#[doc(hidden)]
pub fn parse_answer(
    data: &[u8],
    answer: i64,
    exists: &dyn Fn(u32) -> bool,
) -> std::result::Result<Vec<PolicyAction>, Failure> {
    if answer == 0 {
        return Ok(Vec::new());
    }
    let (ptr, count) = (
        (answer as u64 >> 32) as usize,
        (answer as u64 & 0xffff_ffff) as usize,
    );
    if count > MAX_ACTIONS {
        return Err(Failure::BadAnswer);
    }
    let records = data
        .get(
            ptr..ptr
                .checked_add(count * ACTION_SIZE)
                .ok_or(Failure::BadAnswer)?,
        )
        .ok_or(Failure::BadAnswer)?;
    let mut out = Vec::with_capacity(count);
    for r in records.chunks_exact(ACTION_SIZE) {
        let u = |i: usize| u32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
        let (code, feature, value, sptr, slen) = (
            u(0),
            u(4),
            f32::from_bits(u(8)),
            u(12) as usize,
            u(16) as usize,
        );
        let string = || -> std::result::Result<String, Failure> {
            if slen > MAX_STRING {
                return Err(Failure::BadAnswer);
            }
            let b = data
                .get(sptr..sptr.checked_add(slen).ok_or(Failure::BadAnswer)?)
                .ok_or(Failure::BadAnswer)?;
            String::from_utf8(b.to_vec()).map_err(|_| Failure::BadAnswer)
        };
        let known = |f: u32| exists(f);
        let finite = |v: f32| {
            if v.is_finite() {
                Ok(v)
            } else {
                Err(Failure::BadAnswer)
            }
        };
        out.push(match code {
            action::FLAG => PolicyAction::Flag(string()?),
            action::SWITCH_PROFILE => PolicyAction::SwitchProfile(string()?),
            action::STOP => PolicyAction::Stop,
            action::CLAMP if known(feature) => PolicyAction::Clamp(feature, finite(value)?),
            action::ABLATE if known(feature) => PolicyAction::Ablate(feature),
            action::ADD if known(feature) => PolicyAction::Add(feature, finite(value)?),
            action::CLEAR => PolicyAction::Clear,
            _ => return Err(Failure::BadAnswer),
        });
    }
    Ok(out)
}
