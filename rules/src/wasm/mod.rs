//! Sandboxed WebAssembly rule functions (wasmtime).
//!
//! - [`RuleEngine`]: one wasmtime engine, the ABI's linker and the epoch
//!   ticker that bounds guest wall time.
//! - [`WasmModule`]: a validated, compiled module ready to instantiate
//!   (`InstancePre`), shared by every instance of one rule version.
//! - [`RuleInstance`]: one live instance; runs batches.

pub mod abi;
pub mod host;

use crate::Message;
use crate::manifest::Limits;
use crate::state::{StateChange, StateStore};
use host::{HostState, MessageSlot};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use wasmtime::{
    Config, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Memory, Module,
    PoolingAllocationConfig, Store, Trap, TypedFunc,
};

/// How often the epoch advances: the granularity of guest timeouts.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Sizes of the engine's instance pool: the ceiling on live instances and
/// on any one rule's limits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Instances alive at once (each worker keeps one per rule it runs).
    pub max_instances: u32,
    /// The largest linear memory any rule may be given, in MiB.
    pub max_memory_mb: u64,
    /// The largest table any rule may be given, in elements.
    pub max_table_elements: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_instances: 1000,
            max_memory_mb: 1024,
            max_table_elements: 100_000,
        }
    }
}

pub struct RuleEngine {
    engine: Engine,
    linker: Linker<HostState>,
    pool: PoolConfig,
    stop_ticker: Arc<AtomicBool>,
}

impl RuleEngine {
    /// An engine with the default pool.
    pub fn new() -> anyhow::Result<Arc<Self>> {
        Self::with_pool(PoolConfig::default())
    }

    /// Instances come from wasmtime's pooling allocator: slots of address
    /// space reserved once, so instantiating is a few page-table operations
    /// instead of mmap calls, and linear memory starts from the module's
    /// copy-on-write image instead of copying data segments. A slot reused
    /// for the same module keeps its mapping warm.
    pub fn with_pool(pool: PoolConfig) -> anyhow::Result<Arc<Self>> {
        let mut pooling = PoolingAllocationConfig::new();
        pooling
            .total_core_instances(pool.max_instances)
            .total_memories(pool.max_instances)
            .total_tables(pool.max_instances)
            .max_memory_size(usize::try_from(pool.max_memory_mb << 20).unwrap_or(usize::MAX))
            .table_elements(pool.max_table_elements as usize);
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .cranelift_opt_level(wasmtime::OptLevel::Speed)
            .memory_init_cow(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let engine = Engine::new(&config).map_err(to_anyhow)?;
        let linker = host::linker(&engine).map_err(to_anyhow)?;
        let stop_ticker = Arc::new(AtomicBool::new(false));
        let (ticking_engine, stop) = (engine.clone(), stop_ticker.clone());
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticking_engine.increment_epoch();
                }
            })?;
        Ok(Arc::new(Self {
            engine,
            linker,
            pool,
            stop_ticker,
        }))
    }

    pub fn pool(&self) -> &PoolConfig {
        &self.pool
    }

    /// Validates and compiles a module. Errors say what is wrong with it.
    pub fn compile(&self, wasm: &[u8]) -> Result<WasmModule, String> {
        let module = Module::new(&self.engine, wasm)
            .map_err(|e| format!("not a valid WebAssembly module: {e:#}"))?;
        check_interface(&module)?;
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| format!("cannot link: {e:#}"))?;
        Ok(WasmModule { pre })
    }
}

impl Drop for RuleEngine {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

fn to_anyhow(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}

/// Refuses modules that do not speak ABI v1, before anything runs.
fn check_interface(module: &Module) -> Result<(), String> {
    for import in module.imports() {
        if import.module() != abi::HOST_MODULE {
            return Err(format!(
                "imports `{}::{}`: rule modules may import only from the `{}` host module (no WASI, files or network)",
                import.module(),
                import.name(),
                abi::HOST_MODULE
            ));
        }
        if !abi::HOST_FUNCTIONS.contains(&import.name()) {
            return Err(format!(
                "imports `{}::{}`, which ABI v{} does not provide (known: {})",
                import.module(),
                import.name(),
                abi::ABI_VERSION,
                abi::HOST_FUNCTIONS.join(", ")
            ));
        }
    }
    match module.get_export(abi::EXPORT_MEMORY) {
        Some(ExternType::Memory(_)) => {}
        _ => {
            return Err(format!(
                "does not export its linear memory as `{}`",
                abi::EXPORT_MEMORY
            ));
        }
    }
    let required: [(&str, usize, usize); 3] = [
        (abi::EXPORT_ABI_VERSION, 0, 1),
        (abi::EXPORT_ALLOC, 1, 1),
        (abi::EXPORT_ON_BATCH, 2, 1),
    ];
    for (name, params, results) in required {
        check_i32_func(module, name, params, results, true)?;
    }
    check_i32_func(module, abi::EXPORT_INIT, 2, 1, false)
}

fn check_i32_func(
    module: &Module,
    name: &str,
    params: usize,
    results: usize,
    required: bool,
) -> Result<(), String> {
    let want = || format!("({}) -> i32", vec!["i32"; params].join(", "));
    match module.get_export(name) {
        None if !required => Ok(()),
        None => Err(format!("does not export `{name}: {}`", want())),
        Some(ExternType::Func(f)) => {
            let ok = f.params().len() == params
                && f.params().all(|p| p.is_i32())
                && f.results().len() == results
                && f.results().all(|r| r.is_i32());
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "exports `{name}` with the wrong signature; ABI v1 wants {}",
                    want()
                ))
            }
        }
        Some(_) => Err(format!("exports `{name}` but not as a function")),
    }
}

/// A compiled module of one rule version.
pub struct WasmModule {
    pre: InstancePre<HostState>,
}

/// What a successful batch call produced.
pub struct BatchResult {
    /// One per message, in order.
    pub slots: Vec<MessageSlot>,
    /// State changes the call made, now to be committed.
    pub state_changes: Vec<StateChange>,
}

/// Why a call into a guest failed. The text goes into the dead letters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GuestError {
    #[error("time limit exceeded: the call ran longer than {0} ms")]
    Timeout(u64),
    #[error("{0}")]
    ResourceLimit(String),
    #[error("trap: {0}")]
    Trap(String),
    #[error("the guest returned error status {0}")]
    Status(i32),
    #[error("unsupported ABI version {0} (this server speaks 1)")]
    AbiVersion(i32),
    #[error("sluice_init failed: {0}")]
    Init(String),
    #[error("batch does not fit: {0}")]
    Alloc(String),
}

impl GuestError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            GuestError::Timeout(_) => "timeout",
            GuestError::ResourceLimit(_) => "resource_limit",
            GuestError::Trap(_) => "trap",
            GuestError::Status(_) => "status",
            GuestError::AbiVersion(_) => "abi_version",
            GuestError::Init(_) => "init",
            GuestError::Alloc(_) => "alloc",
        }
    }
}

/// One live instance of a rule version, with its own store.
///
/// An instance is reused across batches (so `sluice_init` runs once and the
/// guest may keep caches in memory) until a call fails; then the caller
/// throws it away and makes a fresh one, so a trap never leaks corrupted
/// guest state into the next batch.
pub struct RuleInstance {
    store: Store<HostState>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    on_batch: TypedFunc<(i32, i32), i32>,
    limits: Limits,
}

impl RuleInstance {
    pub fn new(
        module: &WasmModule,
        rule: Arc<str>,
        limits: &Limits,
        config_json: &[u8],
        state: Arc<StateStore>,
    ) -> Result<Self, GuestError> {
        let state = HostState::new(rule, limits, state);
        let mut store = Store::new(module.pre.module().engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(deadline_ticks(limits.timeout_ms));

        let instance = module
            .pre
            .instantiate(&mut store)
            .map_err(|e| classify(&store, e, limits))?;
        let memory = instance
            .get_memory(&mut store, abi::EXPORT_MEMORY)
            .ok_or_else(|| GuestError::Trap("no exported memory".into()))?;
        store.data_mut().memory = Some(memory);
        let typed = |store: &mut Store<HostState>, name: &str| {
            instance
                .get_typed_func::<(), i32>(&mut *store, name)
                .map_err(|e| GuestError::Trap(format!("{e:#}")))
        };
        let version = typed(&mut store, abi::EXPORT_ABI_VERSION)?;
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut store, abi::EXPORT_ALLOC)
            .map_err(|e| GuestError::Trap(format!("{e:#}")))?;
        let on_batch = instance
            .get_typed_func::<(i32, i32), i32>(&mut store, abi::EXPORT_ON_BATCH)
            .map_err(|e| GuestError::Trap(format!("{e:#}")))?;
        let init = instance
            .get_typed_func::<(i32, i32), i32>(&mut store, abi::EXPORT_INIT)
            .ok();

        let mut this = Self {
            store,
            memory,
            alloc,
            on_batch,
            limits: limits.clone(),
        };
        this.store
            .set_epoch_deadline(deadline_ticks(this.limits.timeout_ms));
        let v = version
            .call(&mut this.store, ())
            .map_err(|e| this.classify(e))?;
        if v != abi::ABI_VERSION {
            return Err(GuestError::AbiVersion(v));
        }
        if let Some(init) = init {
            let ptr = this
                .write_buffer(config_json)
                .map_err(|e| GuestError::Init(e.to_string()))?;
            this.store
                .set_epoch_deadline(deadline_ticks(this.limits.timeout_ms));
            let rc = init
                .call(&mut this.store, (ptr, config_json.len() as i32))
                .map_err(|e| GuestError::Init(this.classify(e).to_string()))?;
            if rc != 0 {
                return Err(GuestError::Init(format!("returned status {rc}")));
            }
        }
        Ok(this)
    }

    /// Runs one batch. On success, returns one slot per message, in order,
    /// and the state changes to commit; on failure nothing the call did stands.
    pub fn run(&mut self, messages: &[&Message]) -> Result<BatchResult, GuestError> {
        let state = self.store.data_mut();
        state.slots.clear();
        state.overlay.clear();
        // A refused growth the guest recovered from in an earlier call must
        // not be blamed for a later, unrelated failure.
        state.limiter.exceeded = None;
        state.now_ms = chrono::Utc::now().timestamp_millis();
        state.slots.extend(messages.iter().map(|m| MessageSlot {
            device: m.device_id.clone(),
            received_at_ms: m.received_at.timestamp_millis(),
            ..Default::default()
        }));
        let len = abi::batch_len(messages);
        self.store
            .set_epoch_deadline(deadline_ticks(self.limits.timeout_ms));
        let base = self.alloc_in_guest(len)?;
        let encoded = abi::encode_batch(base as u32, messages);
        self.memory
            .write(&mut self.store, base as usize, &encoded)
            .map_err(|e| GuestError::Alloc(e.to_string()))?;
        self.store
            .set_epoch_deadline(deadline_ticks(self.limits.timeout_ms));
        let rc = self
            .on_batch
            .call(&mut self.store, (base, messages.len() as i32))
            .map_err(|e| self.classify(e))?;
        if rc != 0 {
            return Err(GuestError::Status(rc));
        }
        let state = self.store.data_mut();
        let slots = std::mem::take(&mut state.slots);
        // A message headed for the dead letters takes its state changes with it.
        let state_changes = state
            .overlay
            .take_changes(|msg| slots.get(msg).is_some_and(MessageSlot::succeeds));
        Ok(BatchResult {
            slots,
            state_changes,
        })
    }

    /// The output time bounds this instance enforces from now on.
    pub fn set_time_bounds(&mut self, bounds: host::TimeBounds) {
        self.store.data_mut().time_bounds = bounds;
    }

    fn alloc_in_guest(&mut self, len: usize) -> Result<i32, GuestError> {
        let len_i32 = i32::try_from(len).map_err(|_| GuestError::Alloc(format!("{len} bytes")))?;
        let ptr = self
            .alloc
            .call(&mut self.store, len_i32)
            .map_err(|e| self.classify(e))?;
        let end = (ptr as u32 as usize).checked_add(len);
        if ptr == 0 && len > 0 || end.is_none_or(|end| end > self.memory.data_size(&self.store)) {
            return Err(GuestError::Alloc(format!(
                "sluice_alloc({len}) returned {ptr}, which is not a buffer of that size in linear memory"
            )));
        }
        Ok(ptr)
    }

    fn write_buffer(&mut self, bytes: &[u8]) -> Result<i32, GuestError> {
        let ptr = self.alloc_in_guest(bytes.len())?;
        self.memory
            .write(&mut self.store, ptr as usize, bytes)
            .map_err(|e| GuestError::Alloc(e.to_string()))?;
        Ok(ptr)
    }

    fn classify(&self, e: wasmtime::Error) -> GuestError {
        classify(&self.store, e, &self.limits)
    }
}

fn classify(store: &Store<HostState>, e: wasmtime::Error, limits: &Limits) -> GuestError {
    if let Some(limit) = &store.data().limiter.exceeded {
        return GuestError::ResourceLimit(limit.clone());
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => GuestError::Timeout(limits.timeout_ms),
        Some(trap) => GuestError::Trap(trap.to_string()),
        None => GuestError::Trap(format!("{e:#}")),
    }
}

fn deadline_ticks(timeout_ms: u64) -> u64 {
    // +1: the current tick may be about to end.
    timeout_ms.div_ceil(EPOCH_TICK.as_millis() as u64).max(1) + 1
}
