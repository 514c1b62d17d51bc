//! An uplink's outbox: messages bound for a cloud broker, durable in their own SQLite file
//! (WAL) until the cloud acknowledges them.
//!
//! Like the state file, one writer thread owns the connection and commits in groups: callers
//! [`Outbox::append`] without blocking and get a [`Ticket`] that resolves once the message is
//! durable (the uplink acknowledges the local publisher only then). The forwarder reads
//! committed entries in sequence order with [`Outbox::fetch`] (served by the same thread, off
//! the async workers) and reports the acknowledged prefix with [`Outbox::ack_through`]: that
//! is recorded at once in a 16-byte marker file beside the outbox (`<file>-acked`), and the
//! rows are deleted later, in batches, by the writer. After a restart the rows up to the
//! marker are deleted and forwarding resumes from the oldest entry left.
//!
//! Bounds (`max_messages`, `max_bytes`, `max_age`) are enforced here, with the policy
//! [`OnFull`]; every drop is counted with its reason. Counts and bytes live in a one-row
//! table updated in the same transactions, so opening a file with a million entries reads
//! no entries at all.
//!
//! A failed commit (a full disk) rolls back, keeps the entries in memory, logs once what to
//! fix, and is retried until it succeeds; tickets resolve only then, so nothing is
//! acknowledged that is not on disk.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use edgegw_telemetry::names;
use metrics::{Counter, Gauge, counter, gauge};
use rusqlite::{Connection, params};
use tokio::sync::{oneshot, watch};

use crate::{Committed, StoreError, Ticket, lock};

/// Outbox file migrations (see `schema.rs`).
const MIGRATIONS: &[&str] = &[
    // 0 -> 1
    "CREATE TABLE outbox (
         seq         INTEGER PRIMARY KEY,
         topic       TEXT NOT NULL,
         payload     BLOB NOT NULL,
         qos         INTEGER NOT NULL,
         retain      INTEGER NOT NULL,
         properties  BLOB NOT NULL,
         enqueued_ms INTEGER NOT NULL
     );
     CREATE TABLE outbox_totals (
         id       INTEGER PRIMARY KEY CHECK (id = 0),
         messages INTEGER NOT NULL,
         bytes    INTEGER NOT NULL
     );
     INSERT INTO outbox_totals(id, messages, bytes) VALUES (0, 0, 0);",
];

/// What to do with a new message when the outbox is at one of its bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFull {
    /// Accept it and delete the oldest entries until within bounds.
    DropOldest,
    /// Refuse it (counted).
    DropNew,
    /// Hold it (and its publisher's acknowledgement) until space frees up; at most
    /// `max_blocked` messages wait, beyond that new ones are refused.
    Block,
}

/// How hard a commit pushes data to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// Commit (and fsync) as soon as anything is pending.
    Always,
    /// Group commit: at most one commit (one fsync) per `commit_interval`.
    Batch,
    /// Group commit without fsync: survives a crash of the gateway, not a power cut.
    Off,
}

#[derive(Clone, Debug)]
pub struct OutboxOptions {
    /// The uplink's name (metric label, log field).
    pub uplink: String,
    pub max_messages: u64,
    pub max_bytes: u64,
    /// Entries older than this are dropped (reason `expired`).
    pub max_age: Option<Duration>,
    pub on_full: OnFull,
    pub fsync: Fsync,
    /// Minimum time between commits for [`Fsync::Batch`] and [`Fsync::Off`].
    pub commit_interval: Duration,
    /// Messages that may wait for space with [`OnFull::Block`].
    pub max_blocked: usize,
    /// Messages held in memory while commits fail (a full disk) before new ones are refused.
    pub max_pending: usize,
    /// Caps the file at this many pages (SQLite `max_page_count`); for tests of a full disk.
    #[doc(hidden)]
    pub max_pages: Option<u64>,
}

impl OutboxOptions {
    pub fn new(uplink: impl Into<String>) -> Self {
        Self {
            uplink: uplink.into(),
            max_messages: 1_000_000,
            max_bytes: 1 << 30,
            max_age: None,
            on_full: OnFull::DropOldest,
            fsync: Fsync::Batch,
            commit_interval: Duration::from_millis(10),
            max_blocked: 10_000,
            max_pending: 100_000,
            max_pages: None,
        }
    }
}

/// One message in the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Position in the outbox; increases with every append.
    pub seq: u64,
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// Opaque to the outbox (the uplink encodes MQTT 5 properties here).
    pub properties: Vec<u8>,
    /// When it was appended, milliseconds since the Unix epoch.
    pub enqueued_ms: u64,
}

impl OutboxEntry {
    /// What the entry counts against `max_bytes`.
    pub fn size(&self) -> u64 {
        (self.topic.len() + self.payload.len() + self.properties.len()) as u64
    }
}

/// The result of [`Outbox::append`].
pub enum Appended {
    /// Accepted; the ticket resolves once it is durable.
    Queued(Ticket),
    /// Refused; the reason is a metric label (`full`, `too_large`, `write_error`, `closed`).
    Dropped(&'static str),
}

/// Counts of what is in the outbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Messages accepted and not yet acknowledged upstream or dropped.
    pub messages: u64,
    pub bytes: u64,
    /// Append time of the oldest entry on disk, ms since the Unix epoch.
    pub oldest_ms: Option<u64>,
    /// The highest committed sequence number.
    pub committed_seq: u64,
    /// Commits since the outbox opened, and how many of them were synced to disk (an fsync
    /// of the WAL each; SQLite's checkpoints add a few more).
    pub commits: u64,
    pub synced_commits: u64,
}

type Waiter = oneshot::Sender<Result<(), StoreError>>;

/// A `fetch` waiting for the writer: after which seq, how many, where to answer.
type Read = (
    u64,
    usize,
    oneshot::Sender<Result<Vec<OutboxEntry>, StoreError>>,
);

struct State {
    appends: Vec<OutboxEntry>,
    reads: Vec<Read>,
    blocked: VecDeque<(OutboxEntry, Waiter)>,
    /// Admitted blocked messages: resolved when batch `.0` commits.
    signals: Vec<(u64, Waiter)>,
    batch: u64,
    next_seq: u64,
    /// Messages and bytes accepted and not yet deleted (committed or pending).
    messages: u64,
    bytes: u64,
    oldest_ms: Option<u64>,
    committed_seq: u64,
    commits: u64,
    synced_commits: u64,
    /// Every entry up to this seq is acknowledged upstream ([`Outbox::ack_through`]).
    through: u64,
    /// Rows up to this seq are deleted (the writer's `deleted_through`).
    committed_through: u64,
    /// The last commit failed; appends are held in memory.
    failing: bool,
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    committed: watch::Sender<Committed>,
    /// Deletions of acknowledged entries commit on their own, right away and without an
    /// fsync (losing one to a power cut only means a duplicate upstream), so they keep
    /// their own batch numbers.
    /// The acknowledgement marker file and the seq last written to it (see
    /// [`Outbox::ack_through`]).
    marker: Mutex<(std::fs::File, u64)>,
    /// The highest committed sequence number, for the forwarder to wait on.
    seq: watch::Sender<u64>,
    options: OutboxOptions,
    path: PathBuf,
    metrics: Metrics,
}

struct Metrics {
    messages: Gauge,
    bytes: Gauge,
    oldest_age: Gauge,
    commits: Counter,
    write_errors: Counter,
    dropped_full: Counter,
    dropped_too_large: Counter,
    dropped_write_error: Counter,
    dropped_expired: Counter,
}

impl Metrics {
    fn new(uplink: &str) -> Self {
        let label = uplink.to_string();
        let dropped = |reason: &'static str| counter!(names::UPLINK_DROPPED, "uplink" => label.clone(), "reason" => reason);
        Self {
            messages: gauge!(names::UPLINK_OUTBOX_MESSAGES, "uplink" => label.clone()),
            bytes: gauge!(names::UPLINK_OUTBOX_BYTES, "uplink" => label.clone()),
            oldest_age: gauge!(names::UPLINK_OUTBOX_OLDEST_AGE, "uplink" => label.clone()),
            commits: counter!(names::UPLINK_OUTBOX_COMMITS, "uplink" => label.clone()),
            write_errors: counter!(names::UPLINK_OUTBOX_WRITE_ERRORS, "uplink" => label.clone()),
            dropped_full: dropped("full"),
            dropped_too_large: dropped("too_large"),
            dropped_write_error: dropped("write_error"),
            dropped_expired: dropped("expired"),
        }
    }

    fn dropped(&self, reason: &'static str, n: u64) {
        match reason {
            "full" => self.dropped_full.increment(n),
            "too_large" => self.dropped_too_large.increment(n),
            "expired" => self.dropped_expired.increment(n),
            _ => self.dropped_write_error.increment(n),
        }
    }
}

/// Handle to one outbox; cheap to clone. [`Outbox::close`] commits and stops the writer.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Outbox {
    /// Opens (or creates) the outbox file and starts its writer thread.
    pub fn open(path: &Path, options: OutboxOptions) -> Result<Outbox, StoreError> {
        let open_error = |message: String| StoreError::Open {
            path: path.to_path_buf(),
            message,
        };
        let corrupt = |e: rusqlite::Error| StoreError::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)
                .map_err(|e| open_error(format!("cannot create its directory: {e}")))?;
        }
        let mut connection = Connection::open(path).map_err(|e| open_error(e.to_string()))?;
        let synchronous = match options.fsync {
            Fsync::Off => "OFF",
            Fsync::Always | Fsync::Batch => "FULL",
        };
        crate::schema::prepare_with(&mut connection, path, MIGRATIONS, synchronous)?;
        if let Some(pages) = options.max_pages {
            connection
                .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
                .map_err(corrupt)?;
        }
        let (messages, bytes): (i64, i64) = connection
            .query_row(
                "SELECT messages, bytes FROM outbox_totals WHERE id = 0",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(corrupt)?;
        let marker_path = marker_path(path);
        let marker = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&marker_path)
            .map_err(|e| open_error(format!("cannot open {}: {e}", marker_path.display())))?;
        let through = read_marker(&marker);
        let (messages, bytes) = if through > 0 {
            // Acknowledged before the restart, not deleted yet: delete now.
            let tx = connection.transaction().map_err(corrupt)?;
            let (n, b): (i64, i64) = tx
                .query_row(
                    "SELECT count(*), coalesce(sum(length(CAST(topic AS BLOB)) + length(payload) + length(properties)), 0)
                     FROM outbox WHERE seq <= ?1",
                    params![through as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(corrupt)?;
            if n > 0 {
                tx.execute(
                    "DELETE FROM outbox WHERE seq <= ?1",
                    params![through as i64],
                )
                .map_err(corrupt)?;
                tx.execute(
                    "UPDATE outbox_totals SET messages = messages - ?1, bytes = bytes - ?2 WHERE id = 0",
                    params![n, b],
                )
                .map_err(corrupt)?;
            }
            tx.commit().map_err(corrupt)?;
            ((messages - n).max(0), (bytes - b).max(0))
        } else {
            (messages, bytes)
        };
        let (last_seq, oldest_ms) = head_and_tail(&connection).map_err(corrupt)?;
        // Sequence numbers never go back below an acknowledged one.
        let last_seq = last_seq.max(through);

        let metrics = Metrics::new(&options.uplink);
        metrics.messages.set(messages as f64);
        metrics.bytes.set(bytes as f64);
        let (committed, _) = watch::channel(Committed::default());
        let (seq, _) = watch::channel(last_seq);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                appends: Vec::new(),
                reads: Vec::new(),
                blocked: VecDeque::new(),
                signals: Vec::new(),
                batch: 1,
                next_seq: last_seq + 1,
                messages: messages as u64,
                bytes: bytes as u64,
                oldest_ms,
                committed_seq: last_seq,
                commits: 0,
                synced_commits: 0,
                through,
                committed_through: through,
                failing: false,
                closing: false,
            }),
            wake: Condvar::new(),
            committed,
            marker: Mutex::new((marker, through)),
            seq,
            options,
            path: path.to_path_buf(),
            metrics,
        });
        let writer_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("edgegw-outbox".into())
            .spawn(move || Writer::new(connection, writer_shared, through).run())
            .map_err(|e| open_error(format!("cannot start the writer thread: {e}")))?;
        Ok(Outbox {
            shared,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Queues a message. Never blocks on I/O.
    pub fn append(
        &self,
        topic: &str,
        payload: &[u8],
        qos: u8,
        retain: bool,
        properties: Vec<u8>,
    ) -> Appended {
        let options = &self.shared.options;
        let mut entry = OutboxEntry {
            seq: 0,
            topic: topic.to_string(),
            payload: payload.to_vec(),
            qos,
            retain,
            properties,
            enqueued_ms: now_ms(),
        };
        let size = entry.size();
        let reason = if size > options.max_bytes {
            Some("too_large")
        } else {
            let mut state = lock(&self.shared.state);
            if state.closing {
                return Appended::Dropped("closed");
            }
            let full =
                state.messages + 1 > options.max_messages || state.bytes + size > options.max_bytes;
            if state.failing && state.appends.len() >= options.max_pending {
                Some("write_error")
            } else if full && options.on_full == OnFull::DropNew {
                Some("full")
            } else if (full || !state.blocked.is_empty()) && options.on_full == OnFull::Block {
                if state.blocked.len() >= options.max_blocked {
                    Some("full")
                } else {
                    let (waiter, ticket) = Ticket::signal();
                    state.blocked.push_back((entry, waiter));
                    return Appended::Queued(ticket);
                }
            } else {
                entry.seq = state.next_seq;
                state.next_seq += 1;
                state.messages += 1;
                state.bytes += size;
                state.oldest_ms.get_or_insert(entry.enqueued_ms);
                state.appends.push(entry);
                let batch = state.batch;
                drop(state);
                self.shared.wake.notify_one();
                return Appended::Queued(Ticket::batch_of(
                    batch,
                    self.shared.committed.subscribe(),
                ));
            }
        };
        let reason = reason.unwrap_or("full");
        self.shared.metrics.dropped(reason, 1);
        Appended::Dropped(reason)
    }

    /// Up to `limit` committed entries with a sequence number above `after`, in order.
    pub async fn fetch(&self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut state = lock(&self.shared.state);
            if state.closing {
                return Err(StoreError::Closed);
            }
            state.reads.push((after, limit, tx));
        }
        self.shared.wake.notify_one();
        rx.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Every entry up to `seq` is acknowledged upstream (the forwarder calls this with the
    /// end of the acknowledged prefix of what it sent). Records it before returning in a
    /// 16-byte marker file beside the outbox, with one `pwrite` to the page cache (no fsync:
    /// a power cut can only cause duplicates), so after a crash forwarding resumes after
    /// `seq`; the rows are deleted later, in batches, by the writer thread. The write is a
    /// few microseconds: call this from the uplink's own thread, not from shared async
    /// workers.
    pub fn ack_through(&self, seq: u64) -> std::io::Result<()> {
        let result = {
            let mut marker = lock(&self.shared.marker);
            if seq > marker.1 {
                let result = write_marker(&marker.0, seq);
                if result.is_ok() {
                    marker.1 = seq;
                }
                result
            } else {
                Ok(())
            }
        };
        let notify = {
            let mut state = lock(&self.shared.state);
            let was = state.through;
            state.through = state.through.max(seq);
            was == state.committed_through
        };
        if notify {
            // The writer schedules the deletion.
            self.shared.wake.notify_one();
        }
        result
    }

    /// Watches the highest committed sequence number (the forwarder sleeps on it).
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.shared.seq.subscribe()
    }

    pub fn stats(&self) -> OutboxStats {
        let state = lock(&self.shared.state);
        OutboxStats {
            messages: state.messages,
            bytes: state.bytes,
            oldest_ms: state.oldest_ms,
            committed_seq: state.committed_seq,
            commits: state.commits,
            synced_commits: state.synced_commits,
        }
    }

    /// Commits everything pending and stops the writer. Blocked messages are refused.
    pub fn close(&self) {
        lock(&self.shared.state).closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

/// The last sequence number and the oldest entry's time.
fn head_and_tail(connection: &Connection) -> rusqlite::Result<(u64, Option<u64>)> {
    let last: Option<i64> =
        connection.query_row("SELECT max(seq) FROM outbox", [], |r| r.get(0))?;
    let oldest: Option<i64> = connection
        .query_row(
            "SELECT enqueued_ms FROM outbox ORDER BY seq LIMIT 1",
            [],
            |r| r.get(0),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    Ok((last.unwrap_or(0).max(0) as u64, oldest.map(|t| t as u64)))
}

struct Writer {
    connection: Connection,
    shared: Arc<Shared>,
    last_commit: Instant,
    last_expiry: Instant,
    /// When a failed commit may be retried.
    retry_at: Option<Instant>,
    /// Rows up to this seq are deleted (committed).
    deleted_through: u64,
    last_delete: Instant,
}

/// Acknowledged rows are deleted at most this often (or once this many are waiting).
const DELETE_INTERVAL: Duration = Duration::from_millis(5);
const DELETE_BATCH: u64 = 1024;

/// The acknowledgement marker beside the outbox file.
fn marker_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-acked");
    PathBuf::from(name)
}

/// The marker: the seq, then its complement, so a torn or foreign file reads as 0 (which
/// only means: resend from the oldest entry).
fn read_marker(file: &std::fs::File) -> u64 {
    use std::os::unix::fs::FileExt as _;
    let mut buf = [0u8; 16];
    match file.read_exact_at(&mut buf, 0) {
        Ok(()) => {
            let seq = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
            let check = u64::from_le_bytes(buf[8..].try_into().expect("8 bytes"));
            if check == !seq { seq } else { 0 }
        }
        Err(_) => 0,
    }
}

fn write_marker(file: &std::fs::File, seq: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    buf[8..].copy_from_slice(&(!seq).to_le_bytes());
    file.write_all_at(&buf, 0)
}

/// What one commit changed.
#[derive(Default)]
struct Delta {
    /// Deleted because acknowledged, dropped oldest, or expired: (messages, bytes).
    acked: (u64, u64),
    dropped_full: (u64, u64),
    expired: (u64, u64),
}

const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
const EXPIRY_INTERVAL: Duration = Duration::from_secs(1);

impl Writer {
    fn new(connection: Connection, shared: Arc<Shared>, through: u64) -> Self {
        Self {
            connection,
            shared,
            deleted_through: through,
            last_delete: Instant::now(),
            last_commit: Instant::now() - Duration::from_secs(3600),
            last_expiry: Instant::now(),
            retry_at: None,
        }
    }

    fn interval(&self) -> Duration {
        match self.shared.options.fsync {
            Fsync::Always => Duration::ZERO,
            Fsync::Batch | Fsync::Off => self.shared.options.commit_interval,
        }
    }

    fn run(mut self) {
        loop {
            // Wait until there are reads to serve, or writes whose commit time has come.
            let (reads, closing) = {
                let mut state = lock(&self.shared.state);
                loop {
                    let has_writes = !state.appends.is_empty();
                    let deletes_waiting =
                        self.deletable(&state).is_some() && self.retry_at.is_none();
                    let delete_due = deletes_waiting && self.delete_due(&state);
                    let due = self.commit_due();
                    let expiry_due = self.shared.options.max_age.is_some()
                        && self.last_expiry.elapsed() >= EXPIRY_INTERVAL
                        && state.messages > 0;
                    if !state.reads.is_empty()
                        || state.closing
                        || expiry_due
                        || delete_due
                        || (has_writes && due.is_none())
                    {
                        break;
                    }
                    let wait = match (has_writes, due) {
                        (true, Some(wait)) => wait,
                        _ if self.shared.options.max_age.is_some() && state.messages > 0 => {
                            EXPIRY_INTERVAL
                        }
                        _ => Duration::from_secs(3600),
                    };
                    let wait = if deletes_waiting {
                        wait.min(DELETE_INTERVAL.saturating_sub(self.last_delete.elapsed()))
                    } else {
                        wait
                    };
                    state = self
                        .shared
                        .wake
                        .wait_timeout(state, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                (std::mem::take(&mut state.reads), state.closing)
            };
            for (after, limit, reply) in reads {
                let result = self.read(after, limit).map_err(|e| {
                    StoreError::Write(format!("reading {}: {e}", self.shared.path.display()))
                });
                let _ = reply.send(result);
            }
            let expiry_due = self.shared.options.max_age.is_some()
                && self.last_expiry.elapsed() >= EXPIRY_INTERVAL;
            let has_appends = !lock(&self.shared.state).appends.is_empty();
            if closing || expiry_due || (has_appends && self.commit_due().is_none()) {
                self.commit(false);
            } else if self.delete_due(&lock(&self.shared.state))
                && self.retry_at.is_none_or(|at| at <= Instant::now())
            {
                self.commit(true);
            }
            if closing {
                let pending = {
                    let state = lock(&self.shared.state);
                    state.appends.len()
                };
                if pending == 0 || self.retry_at.is_some() {
                    break;
                }
            }
        }
        let mut state = lock(&self.shared.state);
        for (_, waiter) in state.blocked.drain(..) {
            let _ = waiter.send(Err(StoreError::Closed));
        }
        for (_, waiter) in state.signals.drain(..) {
            let _ = waiter.send(Err(StoreError::Closed));
        }
        for (_, _, reply) in state.reads.drain(..) {
            let _ = reply.send(Err(StoreError::Closed));
        }
        drop(state);
        self.shared.committed.send_modify(|c| c.closed = true);
    }

    /// Acknowledged rows wait for deletion long enough, or are many enough.
    fn delete_due(&self, state: &State) -> bool {
        self.deletable(state).is_some_and(|through| {
            self.last_delete.elapsed() >= DELETE_INTERVAL
                || through - self.deleted_through >= DELETE_BATCH
        })
    }

    /// Acknowledged rows not deleted yet: up to this seq. Only committed rows: an entry is
    /// acknowledged only after it was read, but a caller could name one still pending.
    fn deletable(&self, state: &State) -> Option<u64> {
        let through = state.through.min(state.committed_seq);
        (through > self.deleted_through).then_some(through)
    }

    /// `None` when a commit may happen now, else how long until it may.
    fn commit_due(&self) -> Option<Duration> {
        let now = Instant::now();
        if let Some(at) = self.retry_at
            && at > now
        {
            return Some(at - now);
        }
        let next = self.last_commit + self.interval();
        (next > now).then(|| next - now)
    }

    fn read(&mut self, after: u64, limit: usize) -> rusqlite::Result<Vec<OutboxEntry>> {
        let mut statement = self.connection.prepare_cached(
            "SELECT seq, topic, payload, qos, retain, properties, enqueued_ms FROM outbox
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        statement
            .query_map(params![after as i64, limit as i64], |row| {
                Ok(OutboxEntry {
                    seq: row.get::<_, i64>(0)? as u64,
                    topic: row.get(1)?,
                    payload: row.get(2)?,
                    qos: row.get(3)?,
                    retain: row.get(4)?,
                    properties: row.get(5)?,
                    enqueued_ms: row.get::<_, i64>(6)? as u64,
                })
            })?
            .collect()
    }

    /// Commits what is pending; `acks_only`: only the deletions of acknowledged entries,
    /// without an fsync.
    fn commit(&mut self, acks_only: bool) {
        let expire = !acks_only
            && self.shared.options.max_age.is_some()
            && self.last_expiry.elapsed() >= EXPIRY_INTERVAL;
        let (appends, batch, over, through) = {
            let mut state = lock(&self.shared.state);
            let through = self.deletable(&state);
            if (acks_only || state.appends.is_empty()) && !expire && through.is_none() {
                return;
            }
            let batch = if acks_only {
                None
            } else {
                state.batch += 1;
                Some(state.batch - 1)
            };
            let options = &self.shared.options;
            // Messages above the bounds, after this batch lands (drop_oldest trims them).
            let over = if options.on_full == OnFull::DropOldest {
                (
                    state.messages.saturating_sub(options.max_messages),
                    state.bytes.saturating_sub(options.max_bytes),
                )
            } else {
                (0, 0)
            };
            let appends = if acks_only {
                Vec::new()
            } else {
                std::mem::take(&mut state.appends)
            };
            let over = if acks_only { (0, 0) } else { over };
            (appends, batch, over, through)
        };
        if expire {
            self.last_expiry = Instant::now();
        }
        let cutoff = self
            .shared
            .options
            .max_age
            .filter(|_| expire)
            .map(|age| now_ms().saturating_sub(age.as_millis() as u64));
        let synchronous = match self.shared.options.fsync {
            Fsync::Off => "OFF",
            Fsync::Always | Fsync::Batch => "FULL",
        };
        if acks_only && synchronous != "OFF" {
            let _ = self.connection.pragma_update(None, "synchronous", "OFF");
        }
        // The interval runs from one commit's start to the next (as in the state file).
        let started = Instant::now();
        let result = self.apply(&appends, through, over, cutoff);
        if acks_only && synchronous != "OFF" {
            let _ = self
                .connection
                .pragma_update(None, "synchronous", synchronous);
        }
        if !acks_only {
            self.last_commit = started;
        }
        match result {
            Ok((delta, oldest)) => {
                self.retry_at = None;
                if let Some(through) = through {
                    self.deleted_through = through;
                    self.last_delete = Instant::now();
                    lock(&self.shared.state).committed_through = through;
                }
                self.shared.metrics.commits.increment(1);
                let last_seq = appends.last().map(|e| e.seq);
                let mut state = lock(&self.shared.state);
                state.commits += 1;
                state.synced_commits += u64::from(!acks_only && synchronous != "OFF");
                if state.failing {
                    state.failing = false;
                    tracing::info!(uplink = %self.shared.options.uplink, path = %self.shared.path.display(), "Outbox writes succeed again.");
                }
                let removed = (
                    delta.acked.0 + delta.dropped_full.0 + delta.expired.0,
                    delta.acked.1 + delta.dropped_full.1 + delta.expired.1,
                );
                state.messages = state.messages.saturating_sub(removed.0);
                state.bytes = state.bytes.saturating_sub(removed.1);
                if let Some(seq) = last_seq {
                    state.committed_seq = seq;
                }
                state.oldest_ms = oldest.or_else(|| state.appends.first().map(|e| e.enqueued_ms));
                // Space freed: admit blocked messages into the next batch.
                let options = &self.shared.options;
                while let Some((entry, _)) = state.blocked.front() {
                    let size = entry.size();
                    if state.messages + 1 > options.max_messages
                        || state.bytes + size > options.max_bytes
                    {
                        break;
                    }
                    let (mut entry, waiter) = state.blocked.pop_front().expect("front exists");
                    entry.seq = state.next_seq;
                    state.next_seq += 1;
                    state.messages += 1;
                    state.bytes += size;
                    state.oldest_ms.get_or_insert(entry.enqueued_ms);
                    state.appends.push(entry);
                    let next = state.batch;
                    state.signals.push((next, waiter));
                }
                let done = batch.unwrap_or(0);
                let (ready, waiting): (Vec<_>, Vec<_>) =
                    state.signals.drain(..).partition(|(b, _)| *b <= done);
                state.signals = waiting;
                let metrics = &self.shared.metrics;
                metrics.messages.set(state.messages as f64);
                metrics.bytes.set(state.bytes as f64);
                metrics.oldest_age.set(
                    state
                        .oldest_ms
                        .map_or(0.0, |t| now_ms().saturating_sub(t) as f64 / 1000.0),
                );
                drop(state);
                for (_, waiter) in ready {
                    let _ = waiter.send(Ok(()));
                }
                metrics.dropped("full", delta.dropped_full.0);
                metrics.dropped("expired", delta.expired.0);
                if delta.dropped_full.0 > 0 {
                    tracing::warn!(uplink = %self.shared.options.uplink, dropped = delta.dropped_full.0, "Outbox full: oldest messages dropped (outbox.on_full: drop_oldest).");
                }
                if delta.expired.0 > 0 {
                    tracing::warn!(uplink = %self.shared.options.uplink, dropped = delta.expired.0, "Outbox messages older than outbox.max_age dropped.");
                }
                if let Some(batch) = batch {
                    self.shared.committed.send_modify(|c| c.done = batch);
                }
                if let Some(seq) = last_seq {
                    self.shared.seq.send_replace(seq);
                }
            }
            Err(error) => {
                self.shared.metrics.write_errors.increment(1);
                self.retry_at = Some(Instant::now() + RETRY_AFTER_FAILURE);
                let mut state = lock(&self.shared.state);
                if !state.failing {
                    tracing::error!(
                        uplink = %self.shared.options.uplink,
                        path = %self.shared.path.display(),
                        %error,
                        "Cannot write the outbox (is the disk full?); messages are held in memory and not acknowledged until the write succeeds; retrying every second."
                    );
                }
                state.failing = true;
                // Put everything back in front of what arrived meanwhile, in order. The
                // batch number moves on; tickets of the failed batch are carried to the
                // next one by treating the failed batch as not done.
                let mut back = appends;
                back.append(&mut state.appends);
                state.appends = back;
                // `done` stays below the failed batch; the retry commits these entries under
                // a later batch number, which resolves the failed batch's tickets too.
            }
        }
    }

    /// One transaction: insert, delete acknowledged, trim to bounds, expire. Returns what
    /// was removed and the oldest remaining entry's time.
    fn apply(
        &mut self,
        appends: &[OutboxEntry],
        through: Option<u64>,
        over: (u64, u64),
        cutoff: Option<u64>,
    ) -> rusqlite::Result<(Delta, Option<u64>)> {
        let mut delta = Delta::default();
        let tx = self.connection.transaction()?;
        {
            // Deletes first: on a full disk they free the pages the inserts need.
            if let Some(through) = through {
                // An aggregate, then a plain delete: `RETURNING` would stage every deleted
                // row in a temporary table first, which costs more than the delete itself.
                let (messages, bytes) = tx
                    .prepare_cached(
                        "SELECT count(*),
                             coalesce(sum(octet_length(topic) + length(payload)
                                 + length(properties)), 0)
                         FROM outbox WHERE seq <= ?1",
                    )?
                    .query_row(params![through as i64], |r| {
                        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                    })?;
                tx.prepare_cached("DELETE FROM outbox WHERE seq <= ?1")?
                    .execute(params![through as i64])?;
                delta.acked = (messages, bytes);
            }
            let mut insert = tx.prepare_cached(
                "INSERT INTO outbox(seq, topic, payload, qos, retain, properties, enqueued_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for e in appends {
                insert.execute(params![
                    e.seq as i64,
                    e.topic,
                    e.payload,
                    e.qos,
                    e.retain,
                    e.properties,
                    e.enqueued_ms as i64
                ])?;
            }
            // drop_oldest: trim from the head until within bounds.
            let (mut over_messages, mut over_bytes) = over;
            over_messages = over_messages.saturating_sub(delta.acked.0);
            over_bytes = over_bytes.saturating_sub(delta.acked.1);
            let mut trim = tx.prepare_cached(
                "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?1)
                 RETURNING length(CAST(topic AS BLOB)) + length(payload) + length(properties)",
            )?;
            while over_messages > 0 || over_bytes > 0 {
                let chunk = over_messages.clamp(1, 4096);
                let mut removed = 0;
                let mut rows = trim.query(params![chunk as i64])?;
                while let Some(row) = rows.next()? {
                    let size = row.get::<_, i64>(0)? as u64;
                    removed += 1;
                    delta.dropped_full.0 += 1;
                    delta.dropped_full.1 += size;
                    over_messages = over_messages.saturating_sub(1);
                    over_bytes = over_bytes.saturating_sub(size);
                }
                if removed == 0 {
                    break;
                }
            }
            if let Some(cutoff) = cutoff {
                let mut expire = tx.prepare_cached(
                    "DELETE FROM outbox WHERE seq IN
                       (SELECT seq FROM outbox WHERE enqueued_ms < ?1 ORDER BY seq LIMIT 4096)
                     RETURNING length(CAST(topic AS BLOB)) + length(payload) + length(properties)",
                )?;
                loop {
                    let mut removed = 0;
                    let mut rows = expire.query(params![cutoff as i64])?;
                    while let Some(row) = rows.next()? {
                        removed += 1;
                        delta.expired.0 += 1;
                        delta.expired.1 += row.get::<_, i64>(0)? as u64;
                    }
                    if removed < 4096 {
                        break;
                    }
                }
            }
            let added: u64 = appends.iter().map(OutboxEntry::size).sum();
            let removed_messages = delta.acked.0 + delta.dropped_full.0 + delta.expired.0;
            let removed_bytes = delta.acked.1 + delta.dropped_full.1 + delta.expired.1;
            tx.prepare_cached(
                "UPDATE outbox_totals SET messages = messages + ?1, bytes = bytes + ?2 WHERE id = 0",
            )?
            .execute(params![
                appends.len() as i64 - removed_messages as i64,
                added as i64 - removed_bytes as i64
            ])?;
        }
        let oldest: Option<i64> = tx
            .query_row(
                "SELECT enqueued_ms FROM outbox ORDER BY seq LIMIT 1",
                [],
                |r| r.get(0),
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        tx.commit()?;
        Ok((delta, oldest.map(|t| t as u64)))
    }
}

#[cfg(test)]
mod tests;
