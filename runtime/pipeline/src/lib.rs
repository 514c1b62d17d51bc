//! Pipelines: topic filters → a chain of WASM rule stages → outputs.
//!
//! All pipelines share one [`Sink`] on the router. A message that matches a pipeline's `from`
//! filters is put in that pipeline's bounded queue (never blocking the network thread that
//! published it); one worker thread per pipeline takes messages in order (so per-topic order
//! holds), runs them through the pipeline's [`Stage`]s and sends what comes out to its
//! outputs: `local:` topic templates (published back into the router as the pipeline's own
//! in-process client, so other clients and pipelines see them) and uplinks (through
//! [`UplinkOutput`], which the gateway wires to the uplinks' outboxes).
//!
//! Loop guards: a pipeline never takes its own outputs, and a message that has already gone
//! through [`MAX_HOPS`] pipelines is dropped (counted as `loop`).
//!
//! When a rule fails on a message (error, trap, timeout, limit) the message goes to the
//! pipeline's dead-letter topic with user properties saying why; the stage re-creates its
//! instance for the next message.
//!
//! [`Pipelines::reload`] builds the new set first (loading plugins and calling every stage's
//! `init`); only when all succeed does it swap the set atomically. Old pipelines stop taking
//! messages, finish their queues, and a new pipeline of the same name starts only after its
//! predecessor finished, so order holds across a reload and nothing queued is lost.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Condvar, Mutex, MutexGuard, RwLock},
    thread::JoinHandle,
};

use edgegw_broker::{
    ByteString, Bytes, LocalClient, Message, Offer, Origin, Properties, Router, Sink, SinkId,
    StoreError, Ticket,
    topic::{Filter, TopicTemplate, matches},
};
use edgegw_rules::{MAX_BATCH, Plugin, RuleError, RuleMessage, Stage, Verdicts};
use edgegw_telemetry::names;
use metrics::{Counter, Gauge, counter, gauge};
use tokio::sync::oneshot;

/// Messages a worker takes from its queue at once.
const BATCH: usize = 256;

/// Pipelines a message may pass through, one after another, before it is dropped as a loop.
pub const MAX_HOPS: u8 = 8;

/// What a full queue does with a new message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFull {
    /// Hold the message (and a QoS 1/2 publisher's acknowledgement) until there is room; at
    /// most `capacity` more messages wait, beyond that new ones are dropped.
    Block,
    /// Drop the oldest queued message to make room.
    DropOldest,
    /// Drop the new message.
    DropNew,
}

/// Where a pipeline's results go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputTarget {
    /// A topic template (`{topic}`, `{1}`, `{2..}`) rendered against the output's topic.
    Local(String),
    /// An uplink, by name.
    Uplink(String),
}

/// One stage: a loaded plugin and its `config:` as JSON.
#[derive(Clone)]
pub struct StageSpec {
    pub plugin: Plugin,
    pub config_json: String,
}

/// One pipeline as configured.
#[derive(Clone)]
pub struct PipelineSpec {
    pub name: String,
    pub from: Vec<String>,
    pub stages: Vec<StageSpec>,
    pub to: Vec<OutputTarget>,
    pub capacity: usize,
    pub on_full: OnFull,
    pub dead_letter: String,
}

/// The gateway's bridge to an uplink's outbox.
pub trait UplinkOutput: Send + Sync + 'static {
    /// Queues `message` for the uplink as is; `Err(reason)` when it was refused.
    fn send(&self, message: &Message) -> Result<(), &'static str>;
}

/// Uplinks by name.
pub type Uplinks = HashMap<String, Arc<dyn UplinkOutput>>;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("pipeline `{pipeline}`: {source}")]
    Rule {
        pipeline: String,
        #[source]
        source: RuleError,
    },
    #[error("pipeline `{pipeline}`: {message}")]
    Settings { pipeline: String, message: String },
    #[error("pipeline `{pipeline}`: cannot start its worker thread: {source}")]
    Thread {
        pipeline: String,
        #[source]
        source: std::io::Error,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Metrics {
    messages: Counter,
    outputs: Counter,
    full: Counter,
    loops: Counter,
    unmapped: Counter,
    uplink: Counter,
    deadletter: Counter,
    depth: Gauge,
}

impl Metrics {
    fn new(pipeline: &str) -> Self {
        let p = pipeline.to_string();
        let dropped = |reason: &'static str| counter!(names::PIPELINE_DROPPED, "pipeline" => p.clone(), "reason" => reason);
        Self {
            messages: counter!(names::PIPELINE_MESSAGES, "pipeline" => p.clone()),
            outputs: counter!(names::PIPELINE_OUTPUTS, "pipeline" => p.clone()),
            full: dropped("full"),
            loops: dropped("loop"),
            unmapped: dropped("unmapped"),
            uplink: dropped("uplink"),
            deadletter: counter!(names::PIPELINE_DEADLETTER, "pipeline" => p.clone()),
            depth: gauge!(names::PIPELINE_QUEUE_DEPTH, "pipeline" => p),
        }
    }
}

type Waiter = oneshot::Sender<Result<(), StoreError>>;

#[derive(Default)]
struct QueueState {
    items: VecDeque<Arc<Message>>,
    /// [`OnFull::Block`]: messages waiting for room, with their publishers' tickets.
    blocked: VecDeque<(Arc<Message>, Waiter)>,
    closed: bool,
    /// The worker sleeps on the condvar: only then does a push wake it (a wake is a
    /// syscall, and a context switch on a gateway pinned to one core).
    idle: bool,
}

/// A pipeline's bounded queue: filled by network threads, emptied by its worker.
struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
    capacity: usize,
    on_full: OnFull,
    metrics: Arc<Metrics>,
}

impl Queue {
    fn push(&self, message: Arc<Message>) -> Offer {
        let mut state = lock(&self.state);
        if state.closed {
            // Only between a reload's swap and this read of the old set: the new set takes
            // the next messages; this one is refused rather than lost silently.
            self.metrics.full.increment(1);
            return Offer::Dropped;
        }
        if state.items.len() < self.capacity && state.blocked.is_empty() {
            state.items.push_back(message);
        } else {
            match self.on_full {
                OnFull::DropNew => {
                    self.metrics.full.increment(1);
                    return Offer::Dropped;
                }
                OnFull::DropOldest => {
                    state.items.pop_front();
                    state.items.push_back(message);
                    self.metrics.full.increment(1);
                }
                OnFull::Block => {
                    if state.blocked.len() >= self.capacity {
                        self.metrics.full.increment(1);
                        return Offer::Dropped;
                    }
                    let (waiter, ticket) = Ticket::signal();
                    state.blocked.push_back((message, waiter));
                    self.metrics.messages.increment(1);
                    drop(state);
                    return Offer::Accepted(Some(ticket));
                }
            }
        }
        self.metrics.messages.increment(1);
        // The worker sets the depth as it takes messages; here only every 32 messages of
        // growth (enough to see a backlog build up behind a slow rule, without paying for a
        // gauge update per message).
        if state.items.len().is_multiple_of(32) {
            self.metrics.depth.set(state.items.len() as f64);
        }
        let idle = state.idle;
        drop(state);
        if idle {
            self.wake.notify_one();
        }
        Offer::Accepted(None)
    }

    /// Moves up to `max` messages into `batch`, waiting for one if there is none; `false`
    /// once closed and empty.
    fn pop_batch(&self, batch: &mut Vec<Arc<Message>>, max: usize) -> bool {
        let mut yielded = false;
        let mut state = lock(&self.state);
        loop {
            if !state.items.is_empty() || !state.blocked.is_empty() {
                let take = state.items.len().min(max);
                batch.extend(state.items.drain(..take));
                // Blocked messages move up into the room just made, in order.
                while state.items.len() < self.capacity
                    && let Some((blocked, waiter)) = state.blocked.pop_front()
                {
                    let _ = waiter.send(Ok(()));
                    if batch.len() < max && state.items.is_empty() {
                        batch.push(blocked);
                    } else {
                        state.items.push_back(blocked);
                    }
                }
                self.metrics.depth.set(state.items.len() as f64);
                return true;
            }
            if state.closed {
                return false;
            }
            if !yielded {
                // Let the network threads run first (they may be about to queue more): on a
                // gateway whose broker shares one core, waking for every message would mean a
                // context switch per message.
                yielded = true;
                drop(state);
                std::thread::yield_now();
                state = lock(&self.state);
                continue;
            }
            state.idle = true;
            state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            state.idle = false;
        }
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.wake.notify_all();
    }

    fn len(&self) -> usize {
        let state = lock(&self.state);
        state.items.len() + state.blocked.len()
    }
}

/// A running pipeline: what the sink needs to route to it.
struct Running {
    name: String,
    filters: Vec<String>,
    client: Arc<LocalClient>,
    queue: Arc<Queue>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

enum Output {
    Local(TopicTemplate),
    Uplink(String, Arc<dyn UplinkOutput>),
}

/// Elements a worker's scratch vectors keep room for between groups.
const SCRATCH_KEEP: usize = 4 * MAX_BATCH;

/// A worker's vectors, kept from one group of messages to the next: allocating them per
/// group (several KiB each) costs more than the rest of a no-op rule stage.
#[derive(Default)]
struct Scratch {
    local: Vec<Message>,
    rendered: String,
    items: Vec<Item>,
    next: Vec<Item>,
    failed: Vec<bool>,
    verdicts: Verdicts,
    /// Always empty between groups (their borrows end with the group).
    inputs: Vec<RuleMessage<'static>>,
    /// Always empty between groups.
    users: Vec<(&'static str, &'static str)>,
    spans: Vec<std::ops::Range<usize>>,
}

/// An empty vector's allocation, reused for elements of another lifetime (same type, so same
/// layout: collecting an empty `IntoIter` into it reuses the buffer in place).
fn recycle<'a, 'b, T: Relifetime<'a, 'b>>(v: Vec<T>) -> Vec<T::Other> {
    debug_assert!(v.is_empty());
    v.into_iter()
        .map(|_| unreachable!("recycled vectors are empty"))
        .collect()
}

/// `Self` with its lifetime `'a` replaced by `'b`.
trait Relifetime<'a, 'b> {
    type Other;
}

impl<'a, 'b> Relifetime<'a, 'b> for RuleMessage<'a> {
    type Other = RuleMessage<'b>;
}

impl<'a, 'b> Relifetime<'a, 'b> for (&'a str, &'a str) {
    type Other = (&'b str, &'b str);
}

/// What the worker thread owns.
struct Worker {
    name: String,
    stages: Vec<Stage>,
    outputs: Vec<Output>,
    dead_letter: String,
    client: Arc<LocalClient>,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    scratch: Scratch,
}

/// One message inside the chain: where it came from (an index in the batch), its topic and
/// payload so far.
struct Item {
    origin: usize,
    /// Shared (no copy) while a stage keeps the topic.
    topic: ByteString,
    payload: Bytes,
}

impl Worker {
    fn run(mut self, previous: Option<JoinHandle<()>>) {
        if let Some(previous) = previous {
            // The predecessor of the same name finishes its queue first: order holds.
            let _ = previous.join();
        }
        let mut batch = Vec::with_capacity(BATCH);
        while self.queue.pop_batch(&mut batch, BATCH) {
            // Through all stages a group at a time, so that the first outputs do not wait for
            // the whole of a long batch.
            for group in batch.chunks(MAX_BATCH) {
                self.process(group);
            }
            batch.clear();
        }
        tracing::debug!(pipeline = %self.name, "Pipeline worker finished its queue.");
    }

    /// Runs a batch of messages through the chain: each stage takes all of the batch's items in
    /// one go ([`Stage::call_batch`]), in order. A message that fails in any stage goes to the
    /// dead-letter topic and none of its outputs are emitted; the others go on. (Unlike one
    /// message at a time, a failed message's other items in the same stage, when an earlier
    /// stage emitted several for it, still go through that stage; their results are dropped.)
    /// Outputs are emitted after the last stage, in the order of the messages they came from;
    /// dead letters as the failures happen.
    fn process(&mut self, messages: &[Arc<Message>]) {
        // Taken out for the group, so that `emit` and dead letters can borrow `self`.
        let mut scratch = std::mem::take(&mut self.scratch);
        if self.stages.is_empty() {
            let Scratch {
                local, rendered, ..
            } = &mut scratch;
            for m in messages {
                self.emit(m, &m.topic, &m.payload, local, rendered);
            }
        } else {
            self.run_stages(messages, &mut scratch);
        }
        // Local outputs go into the router together: each receiving connection is woken
        // once per group, not once per message.
        self.metrics.outputs.increment(scratch.local.len() as u64);
        self.client.publish_batch(scratch.local.drain(..));
        // A burst of many outputs per message (up to `max_outputs` each) leaves big vectors
        // behind; keep only what a usual group needs.
        scratch.local.shrink_to(SCRATCH_KEEP);
        scratch.items.shrink_to(SCRATCH_KEEP);
        scratch.next.shrink_to(SCRATCH_KEEP);
        self.scratch = scratch;
    }

    /// The chain part of [`Worker::process`]: the first stage reads the messages themselves,
    /// each later one the items the stage before emitted (`scratch.items`); the last stage's
    /// outputs are emitted as they are read (into `scratch.local`), in the order of the
    /// messages they came from, without a message that failed in any stage.
    fn run_stages(&mut self, messages: &[Arc<Message>], scratch: &mut Scratch) {
        let Scratch {
            local,
            rendered,
            items,
            next,
            failed,
            verdicts,
            inputs,
            users,
            spans,
        } = scratch;
        // Every message's user properties as `&str` pairs, in one vector; `spans[i]` is
        // message i's range in it.
        let mut user_pairs = recycle(std::mem::take(users));
        for m in messages {
            let start = user_pairs.len();
            user_pairs.extend(
                m.properties
                    .user_properties
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            );
            spans.push(start..user_pairs.len());
        }
        failed.resize(messages.len(), false);
        // Taken out for the loop, so that dead letters can be sent from inside it.
        let mut stages = std::mem::take(&mut self.stages);
        let last = stages.len() - 1;
        for (n, stage) in stages.iter_mut().enumerate() {
            // Input `k` of this stage: (the message it came from, topic, payload).
            let on_messages = n == 0;
            let count = if on_messages {
                messages.len()
            } else {
                items.len()
            };
            let input = |k: usize| -> (usize, &ByteString, &Bytes) {
                if on_messages {
                    (k, &messages[k].topic, &messages[k].payload)
                } else {
                    let item = &items[k];
                    (item.origin, &item.topic, &item.payload)
                }
            };
            let mut batch = recycle(std::mem::take(inputs));
            batch.extend((0..count).map(|k| {
                let (origin, topic, payload) = input(k);
                let message = &messages[origin];
                RuleMessage {
                    topic,
                    payload,
                    qos: message.qos.as_u8(),
                    retain: message.retain,
                    content_type: message.properties.content_type.as_deref(),
                    user_properties: &user_pairs[spans[origin].clone()],
                }
            }));
            stage.call_batch_into(&batch, verdicts);
            batch.clear();
            *inputs = recycle(batch);
            // Failures first: none of a failed message's outputs go on, also those of its
            // earlier items in this stage.
            for (k, verdict) in verdicts.iter().enumerate() {
                let origin = input(k).0;
                if let Err(error) = verdict
                    && !failed[origin]
                {
                    failed[origin] = true;
                    self.dead_letter(&messages[origin], stage.plugin().name(), error);
                }
            }
            let outputs = verdicts.iter().enumerate().filter_map(|(k, verdict)| {
                let (origin, topic, payload) = input(k);
                match verdict {
                    Ok(outputs) if !failed[origin] => Some((origin, topic, payload, outputs)),
                    _ => None,
                }
            });
            if n == last {
                for (origin, topic, payload, outputs) in outputs {
                    for o in outputs {
                        let topic = o.topic.unwrap_or(topic);
                        // An output that keeps the payload (a filter, a pass-through branch)
                        // shares the input's, rather than copying it.
                        let copied;
                        let payload = if o.payload == &payload[..] {
                            payload
                        } else {
                            copied = Bytes::copy_from_slice(o.payload);
                            &copied
                        };
                        self.emit(&messages[origin], topic, payload, local, rendered);
                    }
                }
            } else {
                for (origin, topic, payload, outputs) in outputs {
                    next.extend(outputs.map(|o| Item {
                        origin,
                        // Shared (no copy) when the output keeps the topic or payload.
                        topic: match o.topic {
                            Some(t) if t != &**topic => ByteString::from(t),
                            _ => topic.clone(),
                        },
                        payload: if o.payload == &payload[..] {
                            payload.clone()
                        } else {
                            Bytes::copy_from_slice(o.payload)
                        },
                    }));
                }
            }
            verdicts.clear();
            std::mem::swap(items, next);
            next.clear();
            if n < last && items.is_empty() {
                break;
            }
        }
        self.stages = stages;
        items.clear();
        user_pairs.clear();
        *users = recycle(user_pairs);
        spans.clear();
        failed.clear();
    }

    /// Sends one result (`topic`, `payload`; the rest from `message`) to every output;
    /// local ones are left in `local` for the caller to publish.
    /// `rendered`: a buffer for rendering topic templates.
    fn emit(
        &self,
        message: &Message,
        topic: &str,
        payload: &Bytes,
        local: &mut Vec<Message>,
        rendered: &mut String,
    ) {
        {
            for output in &self.outputs {
                match output {
                    Output::Local(template) => {
                        // A valid template (no wildcards) over a topic name gives a topic name.
                        if !template.render_into(topic, rendered) {
                            self.metrics.unmapped.increment(1);
                            continue;
                        }
                        local.push(Message {
                            // Short topics are stored inline: no allocation.
                            topic: ByteString::from(rendered.as_str()),
                            payload: payload.clone(),
                            qos: message.qos,
                            retain: message.retain,
                            properties: message.properties.clone(),
                            origin: Origin::Broker,
                            // Expiry counts from when the input reached the broker.
                            received: message.received,
                            hops: message.hops.saturating_add(1),
                        });
                    }
                    Output::Uplink(name, uplink) => {
                        let mut out = Message::new(topic.to_string(), payload.clone(), message.qos)
                            .with_retain(message.retain);
                        out.properties = message.properties.clone();
                        match uplink.send(&out) {
                            Ok(()) => self.metrics.outputs.increment(1),
                            Err(reason) => {
                                self.metrics.uplink.increment(1);
                                tracing::debug!(pipeline = %self.name, uplink = %name, reason, "Uplink refused a pipeline output.");
                            }
                        }
                    }
                }
            }
        }
    }

    fn dead_letter(&self, message: &Message, plugin: &str, error: &RuleError) {
        self.metrics.deadletter.increment(1);
        let mut properties: Properties = (*message.properties).clone();
        let put = |properties: &mut Properties, key: &str, value: &str| {
            properties
                .user_properties
                .push((key.to_string().into(), value.to_string().into()));
        };
        put(&mut properties, "edgegw-pipeline", &self.name);
        put(&mut properties, "edgegw-plugin", plugin);
        put(&mut properties, "edgegw-topic", &message.topic);
        put(&mut properties, "edgegw-result", error.result());
        put(&mut properties, "edgegw-error", &error.to_string());
        let mut out = Message::new(
            self.dead_letter.clone(),
            message.payload.clone(),
            message.qos,
        )
        .with_properties(properties);
        out.hops = message.hops.saturating_add(1);
        self.client.publish(out);
    }
}

/// The router side of every pipeline.
struct PipelineSink {
    current: RwLock<Arc<Vec<Arc<Running>>>>,
}

impl PipelineSink {
    fn snapshot(&self) -> Arc<Vec<Arc<Running>>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Sink for PipelineSink {
    fn offer(&self, message: &Arc<Message>) -> Option<Offer> {
        // Held while queueing: a reload's swap waits for offers in progress, so no message
        // reaches an old pipeline after its queue closed.
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        let mut result: Option<Offer> = None;
        for pipeline in current.iter() {
            if message.origin == Origin::Session(pipeline.client.session_id())
                || !pipeline.filters.iter().any(|f| matches(f, &message.topic))
            {
                continue;
            }
            let offer = if message.hops >= MAX_HOPS {
                pipeline.queue.metrics.loops.increment(1);
                tracing::debug!(pipeline = %pipeline.name, hops = message.hops, "Message dropped: it went through too many pipelines (a loop?).");
                Offer::Dropped
            } else {
                pipeline.queue.push(message.clone())
            };
            result = Some(match (result.take(), offer) {
                (None | Some(Offer::Dropped), offer) => offer,
                (Some(accepted), Offer::Dropped) => accepted,
                (Some(Offer::Accepted(a)), Offer::Accepted(b)) => Offer::Accepted(match (a, b) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                }),
            });
        }
        result
    }
}

/// Every pipeline of the gateway. [`Pipelines::stop`] ends them.
pub struct Pipelines {
    router: Router,
    sink_id: SinkId,
    sink: Arc<PipelineSink>,
    /// `uplink:<name>` outputs; replaced by [`Pipelines::reload_with_uplinks`].
    uplinks: Mutex<Uplinks>,
    /// Serializes reloads.
    reloading: Mutex<()>,
}

impl Pipelines {
    /// Builds and starts `specs`; fails (with nothing running) if any stage cannot start.
    pub fn start(
        router: Router,
        specs: Vec<PipelineSpec>,
        uplinks: Uplinks,
    ) -> Result<Pipelines, PipelineError> {
        let sink = Arc::new(PipelineSink {
            current: RwLock::new(Arc::new(Vec::new())),
        });
        let pipelines = Pipelines {
            sink_id: router.add_sink(sink.clone()),
            router,
            sink,
            uplinks: Mutex::new(uplinks),
            reloading: Mutex::new(()),
        };
        pipelines.reload(specs)?;
        Ok(pipelines)
    }

    /// Swaps in a new set of pipelines. Everything is built first; on any failure the running
    /// set is left as it was and the error says which pipeline and why.
    pub fn reload(&self, specs: Vec<PipelineSpec>) -> Result<(), PipelineError> {
        self.reload_with_uplinks(specs, None)
    }

    /// As [`Pipelines::reload`], with a new set of uplinks for `uplink:<name>` outputs
    /// (kept only when the reload succeeds).
    pub fn reload_with_uplinks(
        &self,
        specs: Vec<PipelineSpec>,
        uplinks: Option<Uplinks>,
    ) -> Result<(), PipelineError> {
        let _guard = lock(&self.reloading);
        let uplinks = uplinks.unwrap_or_else(|| lock(&self.uplinks).clone());
        let old = self.sink.snapshot();
        let mut built = Vec::with_capacity(specs.len());
        for spec in specs {
            let previous = old.iter().find(|r| r.name == spec.name);
            built.push(self.build(spec, previous.map(|p| p.client.clone()), &uplinks)?);
        }
        *lock(&self.uplinks) = uplinks;
        let mut running = Vec::with_capacity(built.len());
        let mut workers = Vec::with_capacity(built.len());
        for (run, worker) in built {
            running.push(Arc::new(run));
            workers.push(worker);
        }
        // The swap: from here on, new messages go to the new set (offers in progress with
        // the old set finish first: they hold the read lock).
        *self.sink.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(running.clone());
        for pipeline in old.iter() {
            pipeline.queue.close();
        }
        for (run, worker) in running.iter().zip(workers) {
            let previous = old
                .iter()
                .find(|r| r.name == run.name)
                .and_then(|r| lock(&r.worker).take());
            let name = run.name.clone();
            let handle = std::thread::Builder::new()
                .name(format!("edgegw-pipe-{name}"))
                .spawn(move || worker.run(previous))
                .map_err(|source| PipelineError::Thread {
                    pipeline: name,
                    source,
                })?;
            *lock(&run.worker) = Some(handle);
        }
        // Pipelines that are gone finish their queues on their own threads.
        for pipeline in old.iter() {
            if !running.iter().any(|r| r.name == pipeline.name)
                && let Some(handle) = lock(&pipeline.worker).take()
            {
                std::thread::spawn(move || {
                    let _ = handle.join();
                });
            }
        }
        tracing::info!(
            pipelines = running.len(),
            names = %running.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", "),
            "Pipelines running."
        );
        Ok(())
    }

    fn build(
        &self,
        spec: PipelineSpec,
        client: Option<Arc<LocalClient>>,
        uplinks: &Uplinks,
    ) -> Result<(Running, Worker), PipelineError> {
        let settings = |message: String| PipelineError::Settings {
            pipeline: spec.name.clone(),
            message,
        };
        for filter in &spec.from {
            Filter::parse(filter).map_err(|e| settings(format!("from `{filter}`: {e}")))?;
        }
        let mut outputs = Vec::new();
        for target in &spec.to {
            outputs.push(match target {
                OutputTarget::Local(template) => {
                    Output::Local(TopicTemplate::parse(template).map_err(settings)?)
                }
                OutputTarget::Uplink(name) => match uplinks.get(name) {
                    Some(uplink) => Output::Uplink(name.clone(), uplink.clone()),
                    None => return Err(settings(format!("unknown uplink `{name}`"))),
                },
            });
        }
        let mut stages = Vec::new();
        for stage in &spec.stages {
            stages.push(
                Stage::new(&stage.plugin, &spec.name, &stage.config_json).map_err(|source| {
                    PipelineError::Rule {
                        pipeline: spec.name.clone(),
                        source,
                    }
                })?,
            );
        }
        let metrics = Arc::new(Metrics::new(&spec.name));
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
            capacity: spec.capacity.max(1),
            on_full: spec.on_full,
            metrics: metrics.clone(),
        });
        let client = client.unwrap_or_else(|| {
            Arc::new(
                self.router
                    .local_client(&format!("$edgegw/pipeline/{}", spec.name)),
            )
        });
        Ok((
            Running {
                name: spec.name.clone(),
                filters: spec.from.clone(),
                client: client.clone(),
                queue: queue.clone(),
                worker: Mutex::new(None),
            },
            Worker {
                name: spec.name,
                stages,
                outputs,
                dead_letter: spec.dead_letter,
                client,
                queue,
                metrics,
                scratch: Scratch::default(),
            },
        ))
    }

    /// Names of the running pipelines.
    pub fn names(&self) -> Vec<String> {
        self.sink
            .snapshot()
            .iter()
            .map(|r| r.name.clone())
            .collect()
    }

    /// Messages waiting in pipeline `name`'s queue.
    pub fn queued(&self, name: &str) -> Option<usize> {
        self.sink
            .snapshot()
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.queue.len())
    }

    /// Stops taking messages, lets every pipeline finish its queue, and waits for it.
    /// Blocks: call it off the async workers.
    pub fn stop(self) {
        self.router.remove_sink(self.sink_id);
        let current = self.sink.snapshot();
        for pipeline in current.iter() {
            pipeline.queue.close();
        }
        for pipeline in current.iter() {
            if let Some(handle) = lock(&pipeline.worker).take() {
                let _ = handle.join();
            }
        }
    }
}

impl Drop for Pipelines {
    fn drop(&mut self) {
        self.router.remove_sink(self.sink_id);
        for pipeline in self.sink.snapshot().iter() {
            pipeline.queue.close();
        }
    }
}

#[cfg(test)]
mod tests;
