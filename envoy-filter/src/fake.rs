//! A [`Host`] for native tests: one [`FakeProcess`] is an Envoy process (shared data, metrics,
//! the clock and the log are process-wide, as Envoy's are), and each [`FakeHost`] over it is one
//! worker's VM (its own streams, dispatches and upstream-instance flag). Two filter states over
//! two `FakeHost`s of one process are two workers: what one charges, stores or publishes in
//! shared data, the other reads.
//!
//! Shared data follows Envoy's rules exactly (`proxy-wasm-cpp-host`'s `SharedData::set`): a
//! value gets a fresh compare-and-swap token on every write (counting from 1, never 0); a write
//! with a token fails when the key's token moved on; a write to a key that is absent succeeds
//! whatever its token (which is why the filter creates its fixed keys at configuration time).
//! [`FakeProcess::before_next_set`] lets a test slip another worker's write in between a read
//! and a write, deterministically, which is how races that real Envoy only shows by chance are
//! tested.
//!
//! Streams are modelled as far as the driver uses them: header maps, request and response
//! buffers, resumes, resets and local replies, recorded per context. A context marked gone
//! refuses [`Host::enter`], as Envoy does for a stream that ended.
//!
//! Only built off wasm: the filter's wasm build never contains it.

use crate::host::{Buffer, CallToken, Cas, Direction, Host, Level, Map, MetricId, MetricKind};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::rc::Rc;
use std::time::Duration;
use unbusy_core::time::Nanos;

/// Headers as the host holds them.
type Headers = Vec<(String, String)>;

/// A write another worker makes just before this process's next shared-data write.
type Interleaved = Box<dyn FnOnce(&FakeProcess)>;

/// One Envoy process: what its workers share.
pub struct FakeProcess {
    clock: Cell<Nanos>,
    shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: Cell<u32>,
    metric_ids: RefCell<HashMap<String, (MetricKind, u32)>>,
    metric_values: RefCell<Vec<(i64, Vec<u64>)>>,
    logs: RefCell<Vec<(Level, String)>>,
    before_set: RefCell<Option<Interleaved>>,
    writes: Cell<u64>,
    hostcalls: RefCell<BTreeMap<&'static str, u64>>,
}

impl FakeProcess {
    /// A process whose clock reads `now`.
    pub fn new(now: Nanos) -> Rc<Self> {
        Rc::new(Self {
            clock: Cell::new(now),
            shared: RefCell::new(HashMap::new()),
            next_cas: Cell::new(1),
            metric_ids: RefCell::new(HashMap::new()),
            metric_values: RefCell::new(Vec::new()),
            logs: RefCell::new(Vec::new()),
            before_set: RefCell::new(None),
            writes: Cell::new(0),
            hostcalls: RefCell::new(BTreeMap::new()),
        })
    }

    /// The clock.
    pub fn now(&self) -> Nanos {
        self.clock.get()
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = Nanos::try_from(by.as_nanos()).unwrap_or(Nanos::MAX);
        self.clock.set(self.clock.get().saturating_add(by));
    }

    /// A shared-data value as stored (without its token).
    pub fn shared_value(&self, key: &str) -> Option<Vec<u8>> {
        self.shared.borrow().get(key).map(|(v, _)| v.clone())
    }

    /// How many shared-data writes succeeded so far.
    pub fn shared_writes(&self) -> u64 {
        self.writes.get()
    }

    /// Runs `write` (another worker's) right before the next shared-data write anyone makes,
    /// after that writer read its value: the interleaving that loses a compare-and-swap.
    pub fn before_next_set(&self, write: impl FnOnce(&FakeProcess) + 'static) {
        *self.before_set.borrow_mut() = Some(Box::new(write));
    }

    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<Cas>) {
        match self.shared.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), NonZeroU32::new(*cas).map(Cas)),
            None => (None, None),
        }
    }

    /// Envoy's `SharedData::set`.
    fn set(&self, key: &str, value: &[u8], cas: Option<Cas>) -> bool {
        let interleaved = self.before_set.borrow_mut().take();
        if let Some(write) = interleaved {
            write(self);
        }
        let fresh = self.next_cas.get();
        let mut shared = self.shared.borrow_mut();
        if let Some((_, held)) = shared.get(key) {
            if cas.is_some_and(|c| c.0.get() != *held) {
                return false;
            }
        }
        self.next_cas.set(fresh.wrapping_add(1).max(1));
        shared.insert(key.to_string(), (value.to_vec(), fresh));
        self.writes.set(self.writes.get() + 1);
        true
    }

    /// Writes a shared value as another worker would (read, then write with its token).
    pub fn write(&self, key: &str, value: &[u8]) {
        let (_, cas) = self.get(key);
        self.set(key, value, cas);
    }

    /// A counter's or gauge's value (the sum of every worker's increments), by name.
    pub fn metric(&self, name: &str) -> Option<i64> {
        let id = self.metric_ids.borrow().get(name)?.1;
        self.metric_values
            .borrow()
            .get(id as usize)
            .map(|(value, _)| *value)
    }

    /// A histogram's recorded values (or a gauge's recorded settings), by name.
    pub fn recorded(&self, name: &str) -> Vec<u64> {
        let Some(id) = self.metric_ids.borrow().get(name).map(|m| m.1) else {
            return Vec::new();
        };
        self.metric_values
            .borrow()
            .get(id as usize)
            .map(|(_, values)| values.clone())
            .unwrap_or_default()
    }

    /// Forgets the histograms' recorded values and the log (a long test's record stays small).
    pub fn forget_records(&self) {
        for (_, values) in self.metric_values.borrow_mut().iter_mut() {
            *values = Vec::new();
        }
        *self.logs.borrow_mut() = Vec::new();
    }

    /// How many times each [`Host`] method was called, by any worker, since the process began
    /// or [`FakeProcess::clear_hostcalls`]: on Envoy each is one hostcall (a crossing of the
    /// wasm boundary), so this is what the filter costs the host per request.
    /// (`upstream_present` is not counted: on Envoy it reads a thread-local, not the host.)
    pub fn hostcalls(&self) -> BTreeMap<&'static str, u64> {
        self.hostcalls.borrow().clone()
    }

    /// Starts counting [`FakeProcess::hostcalls`] from zero.
    pub fn clear_hostcalls(&self) {
        self.hostcalls.borrow_mut().clear();
    }

    fn count(&self, call: &'static str) {
        *self.hostcalls.borrow_mut().entry(call).or_insert(0) += 1;
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<(Level, String)> {
        self.logs.borrow().clone()
    }
}

/// One stream (or upstream attempt) context of a worker.
#[derive(Debug, Default, Clone)]
pub struct FakeStream {
    /// Request headers.
    pub request_headers: Vec<(String, String)>,
    /// The request body.
    pub request_body: Vec<u8>,
    /// Response headers.
    pub response_headers: Vec<(String, String)>,
    /// The response body the host holds.
    pub response_body: Vec<u8>,
    /// How often the request was resumed.
    pub request_resumed: usize,
    /// How often the response was resumed.
    pub response_resumed: usize,
    /// The response was reset.
    pub reset: bool,
    /// A local reply: status, headers, body.
    pub reply: Option<(u16, Headers, Vec<u8>)>,
    /// The stream ended: the host refuses to enter it.
    pub gone: bool,
}

impl FakeStream {
    /// A header of the request.
    pub fn request_header(&self, name: &str) -> Option<&str> {
        find(&self.request_headers, name)
    }

    /// A header of the response.
    pub fn response_header(&self, name: &str) -> Option<&str> {
        find(&self.response_headers, name)
    }
}

fn find<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A request a worker dispatched.
#[derive(Debug, Clone)]
pub struct FakeCall {
    /// The token its answer must come back with.
    pub token: CallToken,
    /// The cluster.
    pub cluster: String,
    /// Its headers.
    pub headers: Vec<(String, String)>,
    /// Its body.
    pub body: Vec<u8>,
    /// Its timeout.
    pub timeout: Duration,
}

impl FakeCall {
    /// One of its headers.
    pub fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }
}

struct Worker {
    upstream: Cell<bool>,
    current: Cell<u32>,
    streams: RefCell<HashMap<u32, FakeStream>>,
    calls: RefCell<Vec<FakeCall>>,
    next_token: Cell<u32>,
    refuse_dispatch: Cell<bool>,
    call_answer: RefCell<(Headers, Vec<u8>)>,
}

/// One worker's VM over a [`FakeProcess`]. Cloning gives another handle to the same worker.
#[derive(Clone)]
pub struct FakeHost {
    process: Rc<FakeProcess>,
    worker: Rc<Worker>,
}

impl FakeHost {
    /// A new worker of `process`.
    pub fn worker(process: &Rc<FakeProcess>) -> Self {
        Self {
            process: Rc::clone(process),
            worker: Rc::new(Worker {
                upstream: Cell::new(false),
                current: Cell::new(0),
                streams: RefCell::new(HashMap::new()),
                calls: RefCell::new(Vec::new()),
                next_token: Cell::new(1),
                refuse_dispatch: Cell::new(false),
                call_answer: RefCell::new((Vec::new(), Vec::new())),
            }),
        }
    }

    /// The process this worker belongs to.
    pub fn process(&self) -> &Rc<FakeProcess> {
        &self.process
    }

    /// Says the filter's upstream instance runs (or not) in this worker's VM.
    pub fn set_upstream_present(&self, present: bool) {
        self.worker.upstream.set(present);
    }

    /// Makes dispatches fail (an unknown cluster, say).
    pub fn refuse_dispatches(&self, refuse: bool) {
        self.worker.refuse_dispatch.set(refuse);
    }

    /// Creates (or replaces) context `id` with these request headers.
    pub fn open(&self, id: u32, request_headers: &[(&str, &str)]) {
        let stream = FakeStream {
            request_headers: owned(request_headers),
            ..FakeStream::default()
        };
        self.worker.streams.borrow_mut().insert(id, stream);
    }

    /// A copy of context `id` as it stands.
    pub fn stream(&self, id: u32) -> FakeStream {
        self.worker
            .streams
            .borrow()
            .get(&id)
            .cloned()
            .unwrap_or_default()
    }

    /// Changes context `id` (sets a buffer before a callback, say).
    pub fn edit(&self, id: u32, f: impl FnOnce(&mut FakeStream)) {
        f(self.worker.streams.borrow_mut().entry(id).or_default());
    }

    /// Makes `id` the current context, as Envoy does before calling back into it.
    pub fn call_into(&self, id: u32) {
        self.worker.current.set(id);
    }

    /// Every call dispatched so far.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.worker.calls.borrow().clone()
    }

    /// The calls dispatched since the last take, forgotten here (a long test's record stays
    /// small).
    pub fn take_calls(&self) -> Vec<FakeCall> {
        std::mem::take(&mut *self.worker.calls.borrow_mut())
    }

    /// Sets what the next `on_http_call_response` reads.
    pub fn set_call_answer(&self, headers: &[(&str, &str)], body: &[u8]) {
        *self.worker.call_answer.borrow_mut() = (owned(headers), body.to_vec());
    }

    fn with_current<T: Default>(&self, f: impl FnOnce(&mut FakeStream) -> T) -> T {
        let current = self.worker.current.get();
        let mut streams = self.worker.streams.borrow_mut();
        match streams.get_mut(&current) {
            Some(s) if !s.gone => f(s),
            _ => T::default(),
        }
    }
}

fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, v)| ((*n).to_string(), (*v).to_string()))
        .collect()
}

impl Host for FakeHost {
    fn now(&self) -> Nanos {
        self.process.count("now");
        self.process.now()
    }

    fn log(&self, level: Level, message: &str) {
        self.process.count("log");
        self.process
            .logs
            .borrow_mut()
            .push((level, message.to_string()));
    }

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<Cas>) {
        self.process.count("shared_get");
        self.process.get(key)
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<Cas>) -> bool {
        self.process.count("shared_set");
        self.process.set(key, value, cas)
    }

    /// Stats are process-wide by name, as Envoy's are: every worker defining a name gets the
    /// same metric.
    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<MetricId> {
        self.process.count("define_metric");
        let mut ids = self.process.metric_ids.borrow_mut();
        if let Some((held, id)) = ids.get(name) {
            return (*held == kind).then_some(MetricId(*id));
        }
        let mut values = self.process.metric_values.borrow_mut();
        let id = u32::try_from(values.len()).ok()?;
        values.push((0, Vec::new()));
        ids.insert(name.to_string(), (kind, id));
        Some(MetricId(id))
    }

    fn increment_metric(&self, id: MetricId, by: i64) {
        self.process.count("increment_metric");
        if let Some((value, _)) = self
            .process
            .metric_values
            .borrow_mut()
            .get_mut(id.0 as usize)
        {
            *value += by;
        }
    }

    fn record_metric(&self, id: MetricId, value: u64) {
        self.process.count("record_metric");
        if let Some((held, values)) = self
            .process
            .metric_values
            .borrow_mut()
            .get_mut(id.0 as usize)
        {
            *held = i64::try_from(value).unwrap_or(i64::MAX);
            values.push(value);
        }
    }

    fn upstream_present(&self) -> bool {
        self.worker.upstream.get()
    }

    fn enter(&self, context: u32) -> bool {
        self.process.count("enter");
        let live = self
            .worker
            .streams
            .borrow()
            .get(&context)
            .is_some_and(|s| !s.gone);
        if live {
            self.worker.current.set(context);
        }
        live
    }

    fn headers(&self, map: Map) -> Vec<(String, String)> {
        self.process.count("headers");
        match map {
            Map::CallResponseHeaders => self.worker.call_answer.borrow().0.clone(),
            Map::RequestHeaders => self.with_current(|s| s.request_headers.clone()),
            Map::ResponseHeaders => self.with_current(|s| s.response_headers.clone()),
        }
    }

    fn header(&self, map: Map, name: &str) -> Option<String> {
        self.process.count("header");
        let headers = match map {
            Map::CallResponseHeaders => self.worker.call_answer.borrow().0.clone(),
            Map::RequestHeaders => self.with_current(|s| s.request_headers.clone()),
            Map::ResponseHeaders => self.with_current(|s| s.response_headers.clone()),
        };
        find(&headers, name).map(str::to_string)
    }

    fn set_header(&self, map: Map, name: &str, value: Option<&str>) -> bool {
        self.process.count("set_header");
        self.with_current(|s| {
            let headers = match map {
                Map::RequestHeaders => &mut s.request_headers,
                Map::ResponseHeaders => &mut s.response_headers,
                Map::CallResponseHeaders => return false,
            };
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            if let Some(v) = value {
                headers.push((name.to_string(), v.to_string()));
            }
            true
        })
    }

    fn buffer(&self, kind: Buffer, max: usize) -> Option<Vec<u8>> {
        self.process.count("buffer");
        let bytes = match kind {
            Buffer::CallResponseBody => Some(self.worker.call_answer.borrow().1.clone()),
            Buffer::RequestBody => self.with_current(|s| Some(s.request_body.clone())),
            Buffer::ResponseBody => self.with_current(|s| Some(s.response_body.clone())),
            Buffer::PluginConfiguration => None,
        }?;
        Some(bytes.into_iter().take(max).collect())
    }

    fn set_buffer(&self, kind: Buffer, size: usize, value: &[u8]) -> bool {
        self.process.count("set_buffer");
        self.with_current(|s| {
            let buffer = match kind {
                Buffer::RequestBody => &mut s.request_body,
                Buffer::ResponseBody => &mut s.response_body,
                _ => return false,
            };
            let rest = buffer.split_off(size.min(buffer.len()));
            *buffer = value.to_vec();
            buffer.extend(rest);
            true
        })
    }

    fn resume(&self, direction: Direction) -> bool {
        self.process.count("resume");
        self.with_current(|s| {
            match direction {
                Direction::Request => s.request_resumed += 1,
                Direction::Response => s.response_resumed += 1,
            }
            true
        })
    }

    fn reset_response(&self) -> bool {
        self.process.count("reset_response");
        self.with_current(|s| {
            s.reset = true;
            true
        })
    }

    fn send_response(&self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> bool {
        self.process.count("send_response");
        self.with_current(|s| {
            s.reply = Some((status, owned(headers), body.to_vec()));
            true
        })
    }

    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> Result<CallToken, String> {
        self.process.count("dispatch");
        if self.worker.refuse_dispatch.get() {
            return Err("BadArgument".into());
        }
        let token = CallToken(self.worker.next_token.get());
        self.worker.next_token.set(token.0 + 1);
        self.worker.calls.borrow_mut().push(FakeCall {
            token,
            cluster: cluster.to_string(),
            headers: owned(headers),
            body: body.to_vec(),
            timeout,
        });
        Ok(token)
    }
}
