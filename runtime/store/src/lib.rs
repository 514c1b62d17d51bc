//! The gateway's state file: one SQLite database (WAL) owned by one writer thread.
//!
//! Callers never touch SQLite. They [`Store::submit`] a batch of [`Op`]s, which is appended
//! to the pending buffer under a short lock, and get a [`Ticket`] they can await when they
//! need the ops to be durable (e.g. before acknowledging a QoS 1 publish). The writer thread
//! takes everything pending, applies it in one transaction and commits with
//! `synchronous=FULL`: one fsync covers every op in the batch (group commit). Commits are
//! at most one per `commit_interval`, so a steady stream of messages costs a bounded number
//! of fsyncs per second however many messages it carries (SD cards wear out).
//!
//! Ordering: ops are applied in submission order. A ticket resolves once the batch holding
//! its ops (and every earlier batch) is committed, or with the error that batch hit.
//!
//! The store knows nothing about MQTT: records are opaque blobs encoded by the broker.

mod outbox;
mod schema;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use edgegw_telemetry::names;
use metrics::{Counter, Gauge, counter, gauge};
use rusqlite::{Connection, params};
use tokio::sync::watch;

pub use outbox::{Appended, Fsync, OnFull, Outbox, OutboxEntry, OutboxOptions, OutboxStats};
pub use schema::SCHEMA_VERSION;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("state file {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error(
        "state file {path} is not a valid edgegw state file ({message}); move it away to start with empty state, or restore a backup"
    )]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "state file {path} has schema version {found}, newer than this edgegw supports ({supported}); use a newer edgegw"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("writing state failed: {0}")]
    Write(String),
    #[error("the state store is closed")]
    Closed,
}

/// One change to the state. Records are opaque bytes encoded by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutRetained {
        topic: String,
        record: Vec<u8>,
    },
    DeleteRetained {
        topic: String,
    },
    /// Creates or updates a session; `owner` is the user name that created it.
    PutSession {
        client_id: String,
        expiry_secs: u32,
        owner: Option<String>,
    },
    /// `at_unix_secs: None` marks it connected.
    SetDisconnected {
        client_id: String,
        at_unix_secs: Option<u64>,
    },
    /// Removes a session with its subscriptions, deliveries and inbound QoS 2 state.
    DeleteSession {
        client_id: String,
    },
    PutSubscription {
        client_id: String,
        filter: String,
        record: Vec<u8>,
    },
    DeleteSubscription {
        client_id: String,
        filter: String,
    },
    PutDelivery {
        client_id: String,
        seq: u64,
        record: Vec<u8>,
    },
    /// A delivery got a packet id (sent) or its PUBREC (`released`).
    SetDeliveryState {
        client_id: String,
        seq: u64,
        packet_id: u16,
        released: bool,
    },
    DeleteDelivery {
        client_id: String,
        seq: u64,
    },
    PutInbound {
        client_id: String,
        packet_id: u16,
    },
    DeleteInbound {
        client_id: String,
        packet_id: u16,
    },
}

/// Everything in the state file, read once at start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub retained: Vec<(String, Vec<u8>)>,
    pub sessions: Vec<StoredSession>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub client_id: String,
    pub expiry_secs: u32,
    /// The user name that created the session (only that user may resume it).
    pub owner: Option<String>,
    /// When the client went away; `None` if it was connected when the gateway stopped.
    pub disconnected_at: Option<u64>,
    pub subscriptions: Vec<(String, Vec<u8>)>,
    /// In sequence order.
    pub deliveries: Vec<StoredDelivery>,
    pub inbound_qos2: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDelivery {
    pub seq: u64,
    pub record: Vec<u8>,
    pub packet_id: Option<u16>,
    pub released: bool,
}

/// Tuning of the writer.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Minimum time between two commits (bounds fsyncs per second).
    pub commit_interval: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            commit_interval: Duration::from_millis(10),
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Committed {
    /// Every batch with an id up to this one is committed (or failed, see `failed`).
    done: u64,
    /// The most recent failed batch and why.
    failed: Option<(u64, String)>,
    closed: bool,
}

struct Pending {
    ops: Vec<Op>,
    /// Id of the batch now accumulating.
    batch: u64,
    closing: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    committed: watch::Sender<Committed>,
    metrics: StoreMetrics,
}

struct StoreMetrics {
    commits: Counter,
    ops: Counter,
    errors: Counter,
    pending: Gauge,
}

/// Handle to the state file; cheap to clone. [`Store::close`] flushes and stops the writer.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    path: PathBuf,
}

/// Resolves when the ops submitted with it are durable. Tickets of different stores (the
/// state file, an uplink outbox) combine with [`Ticket::max`]: waiting for the result
/// covers all of them.
pub struct Ticket(TicketKind);

enum TicketKind {
    One(Part),
    Many(Vec<Part>),
}

enum Part {
    /// Durable once the writer has committed batch `batch` of the store behind `committed`.
    Batch {
        batch: u64,
        committed: watch::Receiver<Committed>,
    },
    /// Durable when the writer says so (a message admitted later, e.g. an outbox that
    /// blocks while full).
    Signal(tokio::sync::oneshot::Receiver<Result<(), StoreError>>),
}

impl Part {
    async fn wait(self) -> Result<(), StoreError> {
        match self {
            Part::Batch {
                batch,
                mut committed,
            } => {
                let state = committed
                    .wait_for(|c| c.done >= batch || c.closed)
                    .await
                    .map_err(|_| StoreError::Closed)?;
                match &state.failed {
                    Some((failed, message)) if *failed == batch => {
                        Err(StoreError::Write(message.clone()))
                    }
                    _ if state.done >= batch => Ok(()),
                    _ => Err(StoreError::Closed),
                }
            }
            Part::Signal(signal) => signal.await.unwrap_or(Err(StoreError::Closed)),
        }
    }

    /// Folds `other` into `self` when both are batches of the same store.
    fn absorb(&mut self, other: Part) -> Option<Part> {
        match (self, other) {
            (
                Part::Batch { batch, committed },
                Part::Batch {
                    batch: other_batch,
                    committed: other_committed,
                },
            ) if committed.same_channel(&other_committed) => {
                *batch = (*batch).max(other_batch);
                None
            }
            (_, other) => Some(other),
        }
    }
}

impl Ticket {
    fn batch_of(batch: u64, committed: watch::Receiver<Committed>) -> Ticket {
        Ticket(TicketKind::One(Part::Batch { batch, committed }))
    }

    /// A ticket resolved by whoever holds the sender.
    pub fn signal() -> (tokio::sync::oneshot::Sender<Result<(), StoreError>>, Ticket) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (tx, Ticket(TicketKind::One(Part::Signal(rx))))
    }

    /// The highest commit batch this ticket waits for (0 if none).
    pub fn batch(&self) -> u64 {
        let of = |p: &Part| match p {
            Part::Batch { batch, .. } => *batch,
            Part::Signal(_) => 0,
        };
        match &self.0 {
            TicketKind::One(p) => of(p),
            TicketKind::Many(parts) => parts.iter().map(of).max().unwrap_or(0),
        }
    }

    /// A ticket that resolves once both have: the later batch of the same store, or both
    /// when they belong to different stores.
    pub fn max(self, other: Ticket) -> Ticket {
        // The common case, two batches of one store, without allocating.
        let (self_, other) = match (self.0, other.0) {
            (TicketKind::One(mut a), TicketKind::One(b)) => match a.absorb(b) {
                None => return Ticket(TicketKind::One(a)),
                Some(b) => (Ticket(TicketKind::One(a)), Ticket(TicketKind::One(b))),
            },
            (a, b) => (Ticket(a), Ticket(b)),
        };
        let mut parts = match self_.0 {
            TicketKind::One(p) => vec![p],
            TicketKind::Many(parts) => parts,
        };
        let others = match other.0 {
            TicketKind::One(p) => vec![p],
            TicketKind::Many(parts) => parts,
        };
        'next: for mut part in others {
            for mine in parts.iter_mut() {
                match mine.absorb(part) {
                    None => continue 'next,
                    Some(back) => part = back,
                }
            }
            parts.push(part);
        }
        if parts.len() == 1 {
            Ticket(TicketKind::One(parts.pop().expect("one part")))
        } else {
            Ticket(TicketKind::Many(parts))
        }
    }

    pub async fn wait(self) -> Result<(), StoreError> {
        match self.0 {
            TicketKind::One(part) => part.wait().await,
            TicketKind::Many(parts) => {
                for part in parts {
                    part.wait().await?;
                }
                Ok(())
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Store {
    /// Opens (or creates) the state file, migrates it, reads everything in it, and starts
    /// the writer thread.
    pub fn open(path: &Path, options: StoreOptions) -> Result<(Store, Snapshot), StoreError> {
        let open_error = |message: String| StoreError::Open {
            path: path.to_path_buf(),
            message,
        };
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)
                .map_err(|e| open_error(format!("cannot create its directory: {e}")))?;
        }
        let mut connection = Connection::open(path).map_err(|e| open_error(e.to_string()))?;
        schema::prepare(&mut connection, path)?;
        let snapshot = read_snapshot(&connection).map_err(|e| StoreError::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;

        let (committed, _) = watch::channel(Committed::default());
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                ops: Vec::new(),
                batch: 1,
                closing: false,
            }),
            wake: Condvar::new(),
            committed,
            metrics: StoreMetrics {
                commits: counter!(names::STORE_COMMITS),
                ops: counter!(names::STORE_OPS),
                errors: counter!(names::STORE_COMMIT_ERRORS),
                pending: gauge!(names::STORE_PENDING_OPS),
            },
        });
        let writer_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("edgegw-store".into())
            .spawn(move || writer(connection, writer_shared, options))
            .map_err(|e| open_error(format!("cannot start the writer thread: {e}")))?;
        Ok((
            Store {
                shared,
                thread: Arc::new(Mutex::new(Some(thread))),
                path: path.to_path_buf(),
            },
            snapshot,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues `ops` for the next commit. Never blocks on I/O.
    pub fn submit(&self, ops: impl IntoIterator<Item = Op>) -> Ticket {
        let batch = {
            let mut pending = lock(&self.shared.pending);
            let before = pending.ops.len();
            pending.ops.extend(ops);
            let added = pending.ops.len() - before;
            self.shared.metrics.pending.increment(added as f64);
            pending.batch
        };
        self.shared.wake.notify_one();
        Ticket::batch_of(batch, self.shared.committed.subscribe())
    }

    /// Queues one op.
    pub fn submit_one(&self, op: Op) -> Ticket {
        self.submit(std::iter::once(op))
    }

    /// Commits everything pending and stops the writer. Later submits are lost (and their
    /// tickets fail with [`StoreError::Closed`]).
    pub fn close(&self) {
        lock(&self.shared.pending).closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

fn writer(mut connection: Connection, shared: Arc<Shared>, options: StoreOptions) {
    let mut last_commit = Instant::now() - options.commit_interval;
    loop {
        // Wait for work, then let the commit interval pass so one fsync covers more.
        {
            let mut pending = lock(&shared.pending);
            while pending.ops.is_empty() && !pending.closing {
                pending = shared.wake.wait(pending).unwrap_or_else(|e| e.into_inner());
            }
            if pending.ops.is_empty() && pending.closing {
                break;
            }
            let closing = pending.closing;
            drop(pending);
            let since = last_commit.elapsed();
            if !closing && since < options.commit_interval {
                std::thread::sleep(options.commit_interval - since);
            }
        }
        let (ops, batch) = {
            let mut pending = lock(&shared.pending);
            let batch = pending.batch;
            pending.batch += 1;
            (std::mem::take(&mut pending.ops), batch)
        };
        let count = ops.len();
        // The interval runs from one commit's start to the next: measured from its end, a
        // commit's own time (its fsync) was added to every interval, and a client waiting
        // for each commit got about a quarter fewer of them per second.
        last_commit = Instant::now();
        let result = apply(&mut connection, &ops);
        shared.metrics.pending.decrement(count as f64);
        shared.metrics.ops.increment(count as u64);
        match result {
            Ok(()) => {
                shared.metrics.commits.increment(1);
                shared.committed.send_modify(|c| c.done = batch);
            }
            Err(error) => {
                shared.metrics.errors.increment(1);
                tracing::error!(%error, ops = count, "Writing state failed; these changes are lost.");
                let message = error.to_string();
                shared.committed.send_modify(|c| {
                    c.done = batch;
                    c.failed = Some((batch, message));
                });
            }
        }
    }
    shared.committed.send_modify(|c| c.closed = true);
}

fn apply(connection: &mut Connection, ops: &[Op]) -> rusqlite::Result<()> {
    let tx = connection.transaction()?;
    for op in ops {
        match op {
            Op::PutRetained { topic, record } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO retained(topic, record) VALUES (?1, ?2)",
                )?
                .execute(params![topic, record])?;
            }
            Op::DeleteRetained { topic } => {
                tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                    .execute(params![topic])?;
            }
            Op::PutSession {
                client_id,
                expiry_secs,
                owner,
            } => {
                tx.prepare_cached(
                    "INSERT INTO sessions(client_id, expiry_secs, disconnected_at, owner) VALUES (?1, ?2, NULL, ?3)
                     ON CONFLICT(client_id) DO UPDATE SET expiry_secs = excluded.expiry_secs, owner = excluded.owner",
                )?
                .execute(params![client_id, expiry_secs, owner])?;
            }
            Op::SetDisconnected {
                client_id,
                at_unix_secs,
            } => {
                tx.prepare_cached("UPDATE sessions SET disconnected_at = ?2 WHERE client_id = ?1")?
                    .execute(params![client_id, at_unix_secs.map(|t| t as i64)])?;
            }
            Op::DeleteSession { client_id } => {
                for table in ["subscriptions", "deliveries", "inbound_qos2", "sessions"] {
                    tx.prepare_cached(&format!("DELETE FROM {table} WHERE client_id = ?1"))?
                        .execute(params![client_id])?;
                }
            }
            Op::PutSubscription {
                client_id,
                filter,
                record,
            } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO subscriptions(client_id, filter, record) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![client_id, filter, record])?;
            }
            Op::DeleteSubscription { client_id, filter } => {
                tx.prepare_cached(
                    "DELETE FROM subscriptions WHERE client_id = ?1 AND filter = ?2",
                )?
                .execute(params![client_id, filter])?;
            }
            Op::PutDelivery {
                client_id,
                seq,
                record,
            } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO deliveries(client_id, seq, record, packet_id, released)
                     VALUES (?1, ?2, ?3, NULL, 0)",
                )?
                .execute(params![client_id, *seq as i64, record])?;
            }
            Op::SetDeliveryState {
                client_id,
                seq,
                packet_id,
                released,
            } => {
                tx.prepare_cached(
                    "UPDATE deliveries SET packet_id = ?3, released = ?4 WHERE client_id = ?1 AND seq = ?2",
                )?
                .execute(params![client_id, *seq as i64, packet_id, released])?;
            }
            Op::DeleteDelivery { client_id, seq } => {
                tx.prepare_cached("DELETE FROM deliveries WHERE client_id = ?1 AND seq = ?2")?
                    .execute(params![client_id, *seq as i64])?;
            }
            Op::PutInbound {
                client_id,
                packet_id,
            } => {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO inbound_qos2(client_id, packet_id) VALUES (?1, ?2)",
                )?
                .execute(params![client_id, packet_id])?;
            }
            Op::DeleteInbound {
                client_id,
                packet_id,
            } => {
                tx.prepare_cached(
                    "DELETE FROM inbound_qos2 WHERE client_id = ?1 AND packet_id = ?2",
                )?
                .execute(params![client_id, packet_id])?;
            }
        }
    }
    tx.commit()
}

fn read_snapshot(connection: &Connection) -> rusqlite::Result<Snapshot> {
    let mut snapshot = Snapshot::default();
    let mut statement = connection.prepare("SELECT topic, record FROM retained ORDER BY topic")?;
    snapshot.retained = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;

    let mut sessions = connection.prepare(
        "SELECT client_id, expiry_secs, disconnected_at, owner FROM sessions ORDER BY client_id",
    )?;
    let mut subscriptions = connection
        .prepare("SELECT filter, record FROM subscriptions WHERE client_id = ?1 ORDER BY filter")?;
    let mut deliveries = connection.prepare(
        "SELECT seq, record, packet_id, released FROM deliveries WHERE client_id = ?1 ORDER BY seq",
    )?;
    let mut inbound = connection
        .prepare("SELECT packet_id FROM inbound_qos2 WHERE client_id = ?1 ORDER BY packet_id")?;
    type Row = (String, u32, Option<i64>, Option<String>);
    let rows: Vec<Row> = sessions
        .query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for (client_id, expiry_secs, disconnected_at, owner) in rows {
        let session = StoredSession {
            subscriptions: subscriptions
                .query_map(params![client_id], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?,
            deliveries: deliveries
                .query_map(params![client_id], |row| {
                    Ok(StoredDelivery {
                        seq: row.get::<_, i64>(0)? as u64,
                        record: row.get(1)?,
                        packet_id: row.get(2)?,
                        released: row.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?,
            inbound_qos2: inbound
                .query_map(params![client_id], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?,
            client_id,
            expiry_secs,
            owner,
            disconnected_at: disconnected_at.map(|t| t as u64),
        };
        snapshot.sessions.push(session);
    }
    Ok(snapshot)
}

/// The highest delivery sequence number in use (new ones continue after it).
pub fn max_seq(snapshot: &Snapshot) -> u64 {
    snapshot
        .sessions
        .iter()
        .flat_map(|s| s.deliveries.iter().map(|d| d.seq))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
