//! The load generator: publisher and subscriber tasks on one current-thread runtime (pinned
//! to one core), and the scenario drivers that measure them.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{Notify, Semaphore},
    task::{JoinHandle, spawn_local},
    time::{sleep, timeout},
};

use crate::{
    broker::Broker,
    mqtt::{self, Packet, PublishTemplate, Reader, Stamp},
    procfs::CpuMeter,
};

/// Longest wait for any single network step (connect, CONNACK, SUBACK, a write, an ack).
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Publishes encoded into one buffer and written with one write.
pub const BATCH: usize = 128;
/// QoS 1/2 publishes a publisher keeps unacknowledged (below every broker's limit).
pub const WINDOW: usize = 500;
const SUB_READ_BUF: usize = 256 * 1024;
const PUB_READ_BUF: usize = 64 * 1024;

fn now_ns(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

/// TCP connect, CONNECT, CONNACK (accepted), all within `CONNECT_TIMEOUT` each.
pub async fn connect(
    addr: SocketAddr,
    client_id: &str,
    clean: bool,
    read_buf: usize,
) -> Result<(TcpStream, Reader)> {
    let mut stream = timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("TCP connect to {addr} timed out after {CONNECT_TIMEOUT:?}"))?
        .with_context(|| format!("TCP connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(64);
    mqtt::connect(&mut buf, client_id, clean, 60);
    stream.write_all(&buf).await.context("sending CONNECT")?;
    let mut reader = Reader::new(read_buf);
    let code = timeout(CONNECT_TIMEOUT, async {
        loop {
            if let Some(packet) = reader.next_packet()? {
                match packet {
                    Packet::ConnAck { code } => return Ok(code),
                    other => bail!("expected CONNACK, got {other:?}"),
                }
            }
            if reader.fill(&mut stream, usize::MAX).await? == 0 {
                bail!("connection closed before CONNACK");
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no CONNACK from {addr} within {CONNECT_TIMEOUT:?}"))??;
    if code != 0 {
        bail!("CONNECT refused by {addr} with return code {code}");
    }
    Ok((stream, reader))
}

/// SUBSCRIBE and wait for the SUBACK; returns the granted QoS.
async fn subscribe(
    stream: &mut TcpStream,
    reader: &mut Reader,
    filter: &str,
    qos: u8,
) -> Result<u8> {
    let mut buf = Vec::new();
    mqtt::subscribe(&mut buf, 1, filter, qos);
    stream.write_all(&buf).await?;
    let code = timeout(CONNECT_TIMEOUT, async {
        loop {
            if let Some(packet) = reader.next_packet()? {
                match packet {
                    Packet::SubAck { codes } => return Ok(codes.first().copied().unwrap_or(0x80)),
                    other => bail!("expected SUBACK, got {other:?}"),
                }
            }
            if reader.fill(stream, usize::MAX).await? == 0 {
                bail!("connection closed before SUBACK");
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no SUBACK within {CONNECT_TIMEOUT:?}"))??;
    if code == 0x80 {
        bail!("subscription to {filter} refused");
    }
    Ok(code)
}

/// Sequence numbers seen from one publisher.
#[derive(Default)]
struct Seen {
    words: Vec<u64>,
    /// One past the highest sequence number seen: how far the publisher's stream has got
    /// here (brokers keep a publisher's order, so a dropped message does not hold it back).
    next: u64,
}

impl Seen {
    /// false when `seq` was seen before.
    #[inline]
    fn insert(&mut self, seq: u64) -> bool {
        let word = (seq >> 6) as usize;
        if word >= self.words.len() {
            self.words.resize((word + 1).max(self.words.len() * 2), 0);
        }
        let bit = 1u64 << (seq & 63);
        let new = self.words[word] & bit == 0;
        self.words[word] |= bit;
        self.next = self.next.max(seq + 1);
        new
    }
}

/// What one subscriber counted.
pub struct SubStats {
    pub received: Cell<u64>,
    pub dups: Cell<u64>,
    /// Messages that were not from this scenario's publishers.
    pub foreign: Cell<u64>,
    seen: RefCell<Vec<Seen>>,
    pub record_latency: Cell<bool>,
    pub latencies: RefCell<Vec<u64>>,
    /// When each of `latencies`' messages was sent (ns since the scenario's epoch).
    pub sent_at: RefCell<Vec<u64>>,
}

impl SubStats {
    fn new(publishers: usize) -> Self {
        Self {
            received: Cell::new(0),
            dups: Cell::new(0),
            foreign: Cell::new(0),
            seen: RefCell::new((0..publishers).map(|_| Seen::default()).collect()),
            record_latency: Cell::new(false),
            latencies: RefCell::new(Vec::new()),
            sent_at: RefCell::new(Vec::new()),
        }
    }

    #[inline]
    fn record(&self, payload: &[u8], now: u64) {
        self.received.set(self.received.get() + 1);
        let Some(stamp) = Stamp::parse(payload) else {
            self.foreign.set(self.foreign.get() + 1);
            return;
        };
        let mut seen = self.seen.borrow_mut();
        match seen.get_mut(stamp.publisher as usize) {
            Some(s) if stamp.seq < 1 << 34 => {
                if !s.insert(stamp.seq) {
                    self.dups.set(self.dups.get() + 1);
                }
            }
            _ => self.foreign.set(self.foreign.get() + 1),
        }
        if now != 0 {
            self.latencies
                .borrow_mut()
                .push(now.saturating_sub(stamp.sent_ns));
            self.sent_at.borrow_mut().push(stamp.sent_ns);
        }
    }

    /// How far one publisher's stream has reached this subscriber.
    fn progress_of(&self, publisher: usize) -> u64 {
        self.seen.borrow().get(publisher).map_or(0, |s| s.next)
    }

    fn unique(&self) -> u64 {
        self.received.get() - self.dups.get() - self.foreign.get()
    }
}

/// Reads and acknowledges PUBLISHes until `stop`. `slow` = (bytes per read, pause before
/// each read) makes a slow consumer.
async fn subscriber(
    mut stream: TcpStream,
    mut reader: Reader,
    stats: Rc<SubStats>,
    stop: Rc<Cell<bool>>,
    epoch: Instant,
    slow: Option<(usize, Duration)>,
    progress: Rc<Notify>,
) -> Result<()> {
    let mut out = Vec::with_capacity(16 * 1024);
    let max_read = slow.map_or(usize::MAX, |s| s.0);
    loop {
        let now = if stats.record_latency.get() {
            now_ns(epoch)
        } else {
            0
        };
        let before = stats.received.get();
        // Process what is buffered, then whatever else already arrived (without waiting),
        // so acks go out in few writes.
        loop {
            while let Some(packet) = reader.next_packet()? {
                match packet {
                    Packet::Publish { qos, id, payload } => {
                        stats.record(payload, now);
                        match qos {
                            1 => mqtt::ack(&mut out, mqtt::PUBACK, id),
                            2 => mqtt::ack(&mut out, mqtt::PUBREC, id),
                            _ => {}
                        }
                    }
                    Packet::PubRel(id) => mqtt::ack(&mut out, mqtt::PUBCOMP, id),
                    _ => {}
                }
            }
            if slow.is_some() || out.len() >= 16 * 1024 {
                break;
            }
            match reader.try_fill(&stream) {
                Ok(0) => bail!("the broker closed a subscriber connection"),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("subscriber read"),
            }
        }
        if stats.received.get() != before {
            // Publishers waiting for end-to-end credit.
            progress.notify_waiters();
        }
        if !out.is_empty() {
            timeout(IO_TIMEOUT, stream.write_all(&out))
                .await
                .map_err(|_| anyhow!("subscriber: writing acks stalled for {IO_TIMEOUT:?}"))?
                .context("subscriber: writing acks")?;
            out.clear();
        }
        if stop.get() {
            return Ok(());
        }
        if let Some((_, pause)) = slow {
            sleep(pause).await;
        }
        match timeout(
            Duration::from_millis(100),
            reader.fill(&mut stream, max_read),
        )
        .await
        {
            Err(_) => {}
            Ok(Ok(0)) => bail!("the broker closed a subscriber connection"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e).context("subscriber read"),
        }
    }
}

#[derive(Default)]
pub struct PubStats {
    pub sent: Cell<u64>,
    /// QoS 1/2 publishes still unacknowledged when the publisher gave up waiting.
    pub unacked: Cell<u64>,
    /// Paced publishers: how late each send left against its schedule (ns), while set.
    pub record_lag: Cell<bool>,
    pub lags: RefCell<Vec<u64>>,
}

/// What one publisher sends.
struct PubJob {
    template: PublishTemplate,
    qos: u8,
    /// Messages per second, or as fast as possible.
    rate: Option<f64>,
    credit: Option<Credit>,
}

/// End-to-end flow control: at most this many messages on their way to any one subscriber
/// (split between the publishers feeding it). Brokers are so measured at the rate they
/// sustain, not in overload: without it a broker that buffers without bound (rumqttd) shows
/// a trickle while its memory grows, and others drop by policy. 2,000 keeps every broker
/// tried busy (CPU-bound) yet below the queue limits (`MAX_INFLIGHT` + `MAX_QUEUED`).
pub const CREDIT: u64 = 2000;

struct Credit {
    /// This publisher's index and the subscribers that must receive its messages.
    publisher: usize,
    subs: Vec<Rc<SubStats>>,
    limit: u64,
    progress: Rc<Notify>,
}

impl Credit {
    fn room(&self, sent: u64) -> u64 {
        let delivered = self
            .subs
            .iter()
            .map(|s| s.progress_of(self.publisher))
            .min()
            .unwrap_or(sent);
        (delivered + self.limit).saturating_sub(sent)
    }
}

/// Publishes batches until `stop`, keeping up to `WINDOW` QoS 1/2 messages in flight, then
/// waits (bounded) for the outstanding acknowledgements.
async fn publisher(
    mut stream: TcpStream,
    mut reader: Reader,
    job: PubJob,
    stats: Rc<PubStats>,
    stop: Rc<Cell<bool>>,
    epoch: Instant,
) -> Result<()> {
    let PubJob {
        template,
        qos,
        rate,
        credit,
    } = job;
    let idle_notify = Rc::new(Notify::new());
    let progress_notify = credit.as_ref().map_or(idle_notify, |c| c.progress.clone());
    let mut in_use = vec![false; 65536];
    let mut next_id: u16 = 0;
    let mut inflight = 0usize;
    let mut releases: Vec<u16> = Vec::new();
    let mut out = Vec::with_capacity(BATCH * template.len() + 4096);
    let mut seq = 0u64;
    let start = Instant::now();
    // Smallest batch worth a write while earlier messages are still outstanding: without
    // it a credit-limited publisher sends a trickle of tiny writes.
    let min_batch = match (&credit, rate) {
        (_, Some(_)) => 1,
        (Some(c), None) => (c.limit as usize / 4).clamp(1, 32),
        (None, None) => 32,
    };
    let mut acks = 0u64;
    let mut stall: (u64, Instant) = (0, Instant::now());
    loop {
        // Take in the acknowledgements that have arrived, without waiting.
        if qos > 0 {
            loop {
                match reader.try_fill(&stream) {
                    Ok(0) => bail!("the broker closed a publisher connection"),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e).context("publisher read"),
                }
                while let Some(packet) = reader.next_packet()? {
                    let done = match packet {
                        Packet::PubAck(id) if qos == 1 => Some(id),
                        Packet::PubRec(id) if qos == 2 => {
                            releases.push(id);
                            None
                        }
                        Packet::PubComp(id) if qos == 2 => Some(id),
                        _ => None,
                    };
                    if let Some(id) = done
                        && std::mem::take(&mut in_use[usize::from(id)])
                    {
                        inflight -= 1;
                    }
                    acks += 1;
                }
            }
        }
        let stopping = stop.get();
        let mut credit_blocked = false;
        out.clear();
        for id in releases.drain(..) {
            mqtt::ack(&mut out, mqtt::PUBREL, id);
        }
        if !stopping {
            let mut n = BATCH;
            if qos > 0 {
                n = n.min(WINDOW - inflight);
            }
            if let Some(rate) = rate {
                let due = (start.elapsed().as_secs_f64() * rate) as u64;
                n = n.min(due.saturating_sub(seq) as usize);
            }
            let mut outstanding = inflight > 0;
            if let Some(credit) = &credit {
                let room = credit.room(seq);
                outstanding |= room < credit.limit;
                credit_blocked = (room as usize) < min_batch.min(n);
                n = n.min(room as usize);
            }
            if n < min_batch && outstanding {
                n = 0;
            }
            if n > 0 {
                let ts = now_ns(epoch);
                if let Some(rate) = rate
                    && stats.record_lag.get()
                {
                    // How late the first of these left against its schedule.
                    let due = start.duration_since(epoch).as_nanos() as f64
                        + (seq + 1) as f64 * 1e9 / rate;
                    stats.lags.borrow_mut().push(ts.saturating_sub(due as u64));
                }
                for _ in 0..n {
                    let mut id = 0;
                    if qos > 0 {
                        loop {
                            next_id = next_id.wrapping_add(1);
                            if next_id != 0 && !in_use[usize::from(next_id)] {
                                break;
                            }
                        }
                        id = next_id;
                        in_use[usize::from(id)] = true;
                        inflight += 1;
                    }
                    template.write(&mut out, id, seq, ts);
                    seq += 1;
                }
                stats.sent.set(seq);
            }
        }
        if !out.is_empty() {
            timeout(IO_TIMEOUT, stream.write_all(&out))
                .await
                .map_err(|_| anyhow!("publisher: a write stalled for {IO_TIMEOUT:?}"))?
                .context("publisher write")?;
            tokio::task::yield_now().await;
            continue;
        }
        if stopping && inflight == 0 {
            return Ok(());
        }
        if acks != stall.0 || inflight == 0 {
            stall = (acks, Instant::now());
        } else if stall.1.elapsed() > IO_TIMEOUT {
            stats.unacked.set(inflight as u64);
            if stopping {
                return Ok(());
            }
            bail!("publisher: no acknowledgement for {IO_TIMEOUT:?} with {inflight} in flight");
        }
        if rate.is_some() {
            // Paced: spin instead of sleeping. A timer (1 ms granularity) would send bursts
            // of 5-10 messages at 5,000 msg/s, and waking this core from idle would add its
            // own delay to every reading; yielding polls the sockets without blocking, so
            // each message leaves on time and is timestamped as it arrives.
            tokio::task::yield_now().await;
            continue;
        }
        // Wait for an ack or for the subscribers to catch up.
        tokio::select! {
            biased;
            ready = stream.readable(), if qos > 0 && inflight > 0 => ready?,
            _ = progress_notify.notified(), if credit_blocked => {}
            _ = sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// A subscriber in a scenario.
pub struct SubSpec {
    pub filter: String,
    /// Clean session (false = persistent session).
    pub clean: bool,
    /// Indices of the publishers whose messages it must receive.
    pub from: Vec<usize>,
}

/// A throughput or latency scenario.
pub struct Scenario {
    pub key: &'static str,
    pub title: String,
    pub qos: u8,
    /// One topic per publisher.
    pub publishers: Vec<String>,
    pub subscribers: Vec<SubSpec>,
    /// Per publisher, messages per second (None = as fast as possible).
    pub rate: Option<f64>,
    /// Report end-to-end latency percentiles.
    pub latency: bool,
    /// Label of the measured quantity ("msg/s" or "deliveries/s").
    pub unit: &'static str,
}

#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub warmup: Duration,
    pub duration: Duration,
}

/// What each round of the latency scenario measures: twice the scenario's time in all,
/// split into `rounds` (at least 0.5 s each).
pub fn latency_round(timing: Timing, rounds: u32) -> Duration {
    (timing.duration * 2 / rounds.max(1)).max(Duration::from_millis(500))
}

#[derive(Clone, Debug, Default)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Percentiles of samples in nanoseconds (sorts them).
fn percentiles(ns: &mut [u64]) -> Option<Percentiles> {
    if ns.is_empty() {
        return None;
    }
    ns.sort_unstable();
    let at = |q: f64| {
        let rank = ((q * ns.len() as f64).ceil() as usize).clamp(1, ns.len());
        ns[rank - 1] as f64 / 1000.0
    };
    Some(Percentiles {
        samples: ns.len(),
        p50_us: at(0.50),
        p99_us: at(0.99),
        p999_us: at(0.999),
        max_us: ns[ns.len() - 1] as f64 / 1000.0,
    })
}

/// What one scenario measured on one broker.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Messages received by all subscribers per second, over the measured window.
    pub rate: f64,
    /// Messages published per second over the window.
    pub publish_rate: f64,
    pub sent: u64,
    pub expected: u64,
    pub unique: u64,
    pub loss: u64,
    pub dups: u64,
    pub unacked: u64,
    pub foreign: u64,
    pub load_cpu: f64,
    pub broker_cpu: f64,
    /// Share of the broker's / load generator's core that other processes used during the
    /// window: a sign of a noisy machine.
    pub broker_others: f64,
    pub load_others: f64,
    pub latency: Option<Percentiles>,
    /// Paced scenarios: how late sends left against their schedule.
    pub pacing_lag: Option<Percentiles>,
    /// The samples behind `latency` and `pacing_lag` (ns), kept to pool rounds.
    pub latency_ns: Vec<u64>,
    pub lag_ns: Vec<u64>,
    /// The load generator spins (paced scenarios): its CPU share is 100% by design, and
    /// `pacing_lag` shows whether it kept up.
    pub spins: bool,
    /// edgegw's state-file commits and operations per second over the window.
    pub store: Option<(f64, f64)>,
    /// Messages the broker says it dropped (edgegw's metric).
    pub broker_drops: Option<f64>,
    /// Latency in rounds (edgegw): the median of its per-round p99 ratios to Mosquitto's.
    pub p99_round_ratio: Option<f64>,
    pub notes: Vec<String>,
}

/// One broker's rounds of a scenario as one outcome: counts summed, rates and CPU shares
/// averaged, latency percentiles over all rounds' samples pooled, notes kept once.
pub fn pool_rounds(rounds: &[Outcome]) -> Outcome {
    let n = rounds.len().max(1) as f64;
    let mean = |f: fn(&Outcome) -> f64| rounds.iter().map(f).sum::<f64>() / n;
    let sum = |f: fn(&Outcome) -> u64| rounds.iter().map(f).sum::<u64>();
    let mut latency_ns: Vec<u64> = rounds
        .iter()
        .flat_map(|o| o.latency_ns.iter().copied())
        .collect();
    let mut lag_ns: Vec<u64> = rounds
        .iter()
        .flat_map(|o| o.lag_ns.iter().copied())
        .collect();
    let mut notes: Vec<String> = Vec::new();
    for note in rounds.iter().flat_map(|o| &o.notes) {
        if !notes.contains(note) {
            notes.push(note.clone());
        }
    }
    Outcome {
        rate: mean(|o| o.rate),
        publish_rate: mean(|o| o.publish_rate),
        sent: sum(|o| o.sent),
        expected: sum(|o| o.expected),
        unique: sum(|o| o.unique),
        loss: sum(|o| o.loss),
        dups: sum(|o| o.dups),
        unacked: sum(|o| o.unacked),
        foreign: sum(|o| o.foreign),
        load_cpu: mean(|o| o.load_cpu),
        broker_cpu: mean(|o| o.broker_cpu),
        broker_others: mean(|o| o.broker_others),
        load_others: mean(|o| o.load_others),
        latency: percentiles(&mut latency_ns),
        pacing_lag: percentiles(&mut lag_ns),
        latency_ns,
        lag_ns,
        spins: rounds.iter().any(|o| o.spins),
        store: None,
        broker_drops: rounds
            .iter()
            .filter_map(|o| o.broker_drops)
            .reduce(|a, b| a + b),
        p99_round_ratio: None,
        notes,
    }
}

/// Waits `total`, failing early if a client task ends (with its error) before then.
async fn watch(
    total: Duration,
    subs: &mut [JoinHandle<Result<()>>],
    pubs: &mut [JoinHandle<Result<()>>],
) -> Result<()> {
    let deadline = Instant::now() + total;
    while Instant::now() < deadline {
        sleep((deadline - Instant::now()).min(Duration::from_millis(100))).await;
        if let Some(task) = subs
            .iter_mut()
            .chain(pubs.iter_mut())
            .find(|t| t.is_finished())
        {
            return Err(match task.await {
                Ok(Ok(())) => anyhow!("a client stopped early"),
                Ok(Err(e)) => e,
                Err(e) => anyhow!("a client task failed: {e}"),
            });
        }
    }
    Ok(())
}

async fn join(task: JoinHandle<Result<()>>, limit: Duration, what: &str) -> Result<()> {
    let abort = task.abort_handle();
    match timeout(limit, task).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(anyhow!("{what} task failed: {e}")),
        Err(_) => {
            abort.abort();
            Err(anyhow!("{what} did not finish within {limit:?}"))
        }
    }
}

/// Metric samples summed by name (labels ignored).
async fn scrape(addr: SocketAddr) -> Result<HashMap<String, f64>> {
    let body = timeout(Duration::from_secs(3), async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    })
    .await
    .map_err(|_| anyhow!("GET http://{addr}/metrics timed out"))??;
    let text = String::from_utf8_lossy(&body);
    let (head, mut body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("bad HTTP response from {addr}"))?;
    let dechunked;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if size == 0 || tail.len() < size {
                break;
            }
            out.push_str(&tail[..size]);
            rest = tail[size..].trim_start_matches("\r\n");
        }
        dechunked = out;
        body = &dechunked;
    }
    let mut samples = HashMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series).to_string();
        if let Ok(v) = value.parse::<f64>() {
            *samples.entry(name).or_insert(0.0) += v;
        }
    }
    Ok(samples)
}

const STORE_COMMITS: &str = "edgegw_store_commits_total";
const STORE_OPS: &str = "edgegw_store_ops_total";
const DROPPED: &str = "edgegw_broker_dropped_messages_total";

/// Set to a directory, the latency scenario writes every sample there (see
/// [`dump_latencies`]).
pub const LATENCY_DUMP: &str = "BENCH_LATENCY_DUMP";

/// Writes a subscriber's latency samples to `DIR/BROKER-NNN.txt` (numbered in the order
/// written, over all brokers and rounds), one message a line (`sent_ns latency_ns`, sent
/// since the epoch), under a header that gives the epoch on `CLOCK_MONOTONIC`: with
/// `perf record -k CLOCK_MONOTONIC` on the broker's core, each message can be matched to
/// what the core did meanwhile (`bench/tools/latency_sched.py`).
fn dump_latencies(
    dir: &std::path::Path,
    kind: crate::broker::Kind,
    epoch: Instant,
    stats: &SubStats,
) -> Result<std::path::PathBuf> {
    use std::io::Write as _;
    static FILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{kind}-{n:03}.txt"));
    let monotonic = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let since = now_ns(epoch);
    let epoch_ns = (monotonic.tv_sec as u64 * 1_000_000_000 + monotonic.tv_nsec as u64) - since;
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
    writeln!(
        out,
        "# broker {kind}; sent_ns latency_ns; epoch_monotonic_ns {epoch_ns}"
    )?;
    for (sent, latency) in stats
        .sent_at
        .borrow()
        .iter()
        .zip(stats.latencies.borrow().iter())
    {
        writeln!(out, "{sent} {latency}")?;
    }
    out.flush()?;
    Ok(path)
}

/// Runs a throughput or latency scenario against a started broker.
pub async fn run_flow(broker: &mut Broker, sc: &Scenario, timing: Timing) -> Result<Outcome> {
    let epoch = Instant::now();
    let addr = broker.addr;
    let stop_pub = Rc::new(Cell::new(false));
    let stop_sub = Rc::new(Cell::new(false));

    let mut sub_conns = Vec::new();
    for (i, spec) in sc.subscribers.iter().enumerate() {
        let id = if spec.clean {
            format!("bench-sub-{i}")
        } else {
            format!("bench-persistent-sub-{i}")
        };
        let (mut stream, mut reader) = connect(addr, &id, spec.clean, SUB_READ_BUF)
            .await
            .with_context(|| format!("subscriber {i} on {}", broker.kind))?;
        let granted = subscribe(&mut stream, &mut reader, &spec.filter, sc.qos).await?;
        if granted != sc.qos {
            bail!(
                "{} granted QoS {granted} instead of {}",
                broker.kind,
                sc.qos
            );
        }
        sub_conns.push((stream, reader));
    }
    let mut pub_conns = Vec::new();
    for i in 0..sc.publishers.len() {
        let conn = connect(addr, &format!("bench-pub-{i}"), true, PUB_READ_BUF)
            .await
            .with_context(|| format!("publisher {i} on {}", broker.kind))?;
        pub_conns.push(conn);
    }

    let progress = Rc::new(Notify::new());
    let mut sub_stats = Vec::new();
    let mut subs = Vec::new();
    for (stream, reader) in sub_conns {
        let stats = Rc::new(SubStats::new(sc.publishers.len()));
        subs.push(spawn_local(subscriber(
            stream,
            reader,
            stats.clone(),
            stop_sub.clone(),
            epoch,
            None,
            progress.clone(),
        )));
        sub_stats.push(stats);
    }
    let mut pub_stats = Vec::new();
    let mut pubs = Vec::new();
    for (i, (stream, reader)) in pub_conns.into_iter().enumerate() {
        let stats = Rc::new(PubStats::default());
        let template = PublishTemplate::new(&sc.publishers[i], sc.qos, i as u32);
        let credit = Credit {
            publisher: i,
            subs: sc
                .subscribers
                .iter()
                .zip(&sub_stats)
                .filter(|(spec, _)| spec.from.contains(&i))
                .map(|(_, stats)| stats.clone())
                .collect(),
            limit: (CREDIT
                / sc.subscribers
                    .iter()
                    .filter(|s| s.from.contains(&i))
                    .map(|s| s.from.len() as u64)
                    .max()
                    .unwrap_or(1))
            .max(1),
            progress: progress.clone(),
        };
        let job = PubJob {
            template,
            qos: sc.qos,
            rate: sc.rate,
            credit: Some(credit),
        };
        pubs.push(spawn_local(publisher(
            stream,
            reader,
            job,
            stats.clone(),
            stop_pub.clone(),
            epoch,
        )));
        pub_stats.push(stats);
    }

    let received = |s: &[Rc<SubStats>]| s.iter().map(|s| s.received.get()).sum::<u64>();
    let sent = |p: &[Rc<PubStats>]| p.iter().map(|p| p.sent.get()).sum::<u64>();

    let measured = async {
        watch(timing.warmup, &mut subs, &mut pubs).await?;
        let metrics_before = match broker.metrics {
            Some(m) => Some(scrape(m).await?),
            None => None,
        };
        let load = CpuMeter::start("self", crate::broker::LOAD_CORE);
        let cpu = CpuMeter::start(&broker.pid_str(), crate::broker::BROKER_CORE);
        let (t0, r0, s0) = (Instant::now(), received(&sub_stats), sent(&pub_stats));
        for s in &sub_stats {
            s.record_latency.set(sc.latency);
        }
        for p in &pub_stats {
            p.record_lag.set(sc.latency);
        }
        watch(timing.duration, &mut subs, &mut pubs).await?;
        let (load_cpu, broker_cpu) = (load.share(), cpu.share());
        let (load_others, broker_others) = (load.others_share(), cpu.others_share());
        let elapsed = t0.elapsed().as_secs_f64();
        let (r1, s1) = (received(&sub_stats), sent(&pub_stats));
        for s in &sub_stats {
            s.record_latency.set(false);
        }
        for p in &pub_stats {
            p.record_lag.set(false);
        }
        let metrics_after = match broker.metrics {
            Some(m) => Some(scrape(m).await?),
            None => None,
        };
        let mut outcome = Outcome {
            rate: (r1 - r0) as f64 / elapsed,
            publish_rate: (s1 - s0) as f64 / elapsed,
            load_cpu,
            broker_cpu,
            broker_others,
            load_others,
            ..Outcome::default()
        };
        if let (Some(a), Some(b)) = (&metrics_before, &metrics_after) {
            let delta =
                |k: &str| b.get(k).copied().unwrap_or(0.0) - a.get(k).copied().unwrap_or(0.0);
            if b.contains_key(STORE_COMMITS) || b.contains_key(STORE_OPS) {
                outcome.store = Some((delta(STORE_COMMITS) / elapsed, delta(STORE_OPS) / elapsed));
            }
        }
        anyhow::Ok(outcome)
    }
    .await;
    let mut outcome = match measured {
        Ok(o) => o,
        Err(e) => {
            for t in subs.iter().chain(&pubs) {
                t.abort();
            }
            return Err(e);
        }
    };

    // Stop publishing; QoS 1/2 publishers wait (bounded) for their last acks.
    stop_pub.set(true);
    let mut errors = Vec::new();
    for t in pubs {
        if let Err(e) = join(t, IO_TIMEOUT + Duration::from_secs(5), "publisher").await {
            errors.push(e);
        }
    }
    outcome.sent = sent(&pub_stats);
    outcome.unacked = pub_stats.iter().map(|p| p.unacked.get()).sum();

    // Let subscribers drain what the broker still holds.
    let expected: Vec<u64> = sc
        .subscribers
        .iter()
        .map(|s| s.from.iter().map(|&p| pub_stats[p].sent.get()).sum())
        .collect();
    outcome.expected = expected.iter().sum();
    let quiet = if sc.qos == 0 {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(3)
    };
    let drain_start = Instant::now();
    let mut last = received(&sub_stats);
    let mut last_change = Instant::now();
    loop {
        let unique: u64 = sub_stats.iter().map(|s| s.unique()).sum();
        if unique >= outcome.expected || subs.iter().any(|t| t.is_finished()) {
            break;
        }
        if last_change.elapsed() > quiet {
            break;
        }
        if drain_start.elapsed() > Duration::from_secs(20) {
            outcome.notes.push("drain timed out after 20 s".into());
            break;
        }
        sleep(Duration::from_millis(20)).await;
        let now = received(&sub_stats);
        if now != last {
            last = now;
            last_change = Instant::now();
        }
    }
    stop_sub.set(true);
    for t in subs {
        if let Err(e) = join(t, Duration::from_secs(3), "subscriber").await {
            errors.push(e);
        }
    }
    if std::env::var_os("BENCH_DEBUG").is_some() {
        for (i, s) in sub_stats.iter().enumerate() {
            let per: Vec<(u64, u64)> = (0..pub_stats.len())
                .map(|p| (pub_stats[p].sent.get(), s.progress_of(p)))
                .collect();
            eprintln!(
                "debug: subscriber {i}: (sent, received) per publisher {per:?}; drained in {:?}",
                drain_start.elapsed()
            );
            for (p, seen) in s.seen.borrow().iter().enumerate() {
                let missing: Vec<u64> = (0..seen.next)
                    .filter(|&q| seen.words[(q >> 6) as usize] & (1u64 << (q & 63)) == 0)
                    .take(10)
                    .collect();
                if !missing.is_empty() {
                    eprintln!("debug: subscriber {i} misses from publisher {p}: {missing:?}");
                }
            }
        }
    }
    for (s, want) in sub_stats.iter().zip(&expected) {
        outcome.unique += s.unique();
        outcome.loss += want.saturating_sub(s.unique());
        outcome.dups += s.dups.get();
        outcome.foreign += s.foreign.get();
    }
    if sc.latency {
        if let Some(dir) = std::env::var_os(LATENCY_DUMP) {
            for s in &sub_stats {
                match dump_latencies(dir.as_ref(), broker.kind, epoch, s) {
                    Ok(path) => eprintln!("latency samples written to {}", path.display()),
                    Err(e) => eprintln!("warning: {LATENCY_DUMP}: writing into {dir:?}: {e}"),
                }
            }
        }
        let mut all = Vec::new();
        for s in &sub_stats {
            all.append(&mut s.latencies.borrow_mut());
        }
        outcome.latency = percentiles(&mut all);
        outcome.latency_ns = all;
        let mut lags = Vec::new();
        for p in &pub_stats {
            lags.append(&mut p.lags.borrow_mut());
        }
        outcome.pacing_lag = percentiles(&mut lags);
        outcome.lag_ns = lags;
    }
    outcome.spins = sc.rate.is_some();
    if let Some(m) = broker.metrics
        && let Ok(after) = scrape(m).await
    {
        outcome.broker_drops = Some(after.get(DROPPED).copied().unwrap_or(0.0));
        if std::env::var_os("BENCH_DEBUG").is_some() {
            let mut keys: Vec<_> = after.iter().filter(|(k, _)| k.contains("broker")).collect();
            keys.sort_by(|a, b| a.0.cmp(b.0));
            eprintln!("debug: metrics {keys:?}");
        }
    }
    broker.check_alive()?;
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    Ok(outcome)
}

/// Peak memory of a broker flooded by QoS 0 fan-in towards one slow subscriber.
#[derive(Clone, Debug, Default)]
pub struct Flood {
    pub start_kib: u64,
    /// VmHWM at the end (the process's peak), or the highest sample if larger.
    pub peak_kib: u64,
    pub end_kib: u64,
    pub publish_rate: f64,
    pub received: u64,
    pub load_cpu: f64,
    pub broker_cpu: f64,
}

/// 8 publishers at full speed, QoS 0, into `bench/#`; the subscriber reads 4 KiB every
/// 10 ms (about 3,000 messages/s).
pub async fn run_flood(broker: &mut Broker, duration: Duration) -> Result<Flood> {
    let epoch = Instant::now();
    let addr = broker.addr;
    let stop = Rc::new(Cell::new(false));
    let publishers = 8;
    let start_kib = broker.rss_kib().unwrap_or(0);
    let (mut stream, mut reader) = connect(addr, "bench-slow-sub", true, SUB_READ_BUF).await?;
    subscribe(&mut stream, &mut reader, "bench/#", 0).await?;
    let stats = Rc::new(SubStats::new(publishers));
    let mut subs = vec![spawn_local(subscriber(
        stream,
        reader,
        stats.clone(),
        stop.clone(),
        epoch,
        Some((4096, Duration::from_millis(10))),
        Rc::new(Notify::new()),
    ))];
    let mut pub_stats = Vec::new();
    let mut pubs = Vec::new();
    for i in 0..publishers {
        let (stream, reader) =
            connect(addr, &format!("bench-flood-pub-{i}"), true, PUB_READ_BUF).await?;
        let st = Rc::new(PubStats::default());
        pubs.push(spawn_local(publisher(
            stream,
            reader,
            PubJob {
                template: PublishTemplate::new(&format!("bench/flood/{i}"), 0, i as u32),
                qos: 0,
                rate: None,
                credit: None,
            },
            st.clone(),
            stop.clone(),
            epoch,
        )));
        pub_stats.push(st);
    }
    let load = CpuMeter::start("self", crate::broker::LOAD_CORE);
    let cpu = CpuMeter::start(&broker.pid_str(), crate::broker::BROKER_CORE);
    let t0 = Instant::now();
    let mut peak = start_kib;
    let mut result = Ok(());
    while t0.elapsed() < duration {
        if let Err(e) = watch(Duration::from_millis(100), &mut subs, &mut pubs).await {
            result = Err(e);
            break;
        }
        peak = peak.max(broker.rss_kib().unwrap_or(0));
    }
    let (load_cpu, broker_cpu) = (load.share(), cpu.share());
    let elapsed = t0.elapsed().as_secs_f64();
    // A flooded broker may have stopped reading: no graceful stop, just close everything.
    for t in subs.iter().chain(&pubs) {
        t.abort();
    }
    result?;
    peak = peak.max(broker.peak_rss_kib().unwrap_or(0));
    let end_kib = broker.rss_kib().unwrap_or(0);
    broker.check_alive()?;
    Ok(Flood {
        start_kib,
        peak_kib: peak,
        end_kib,
        publish_rate: pub_stats.iter().map(|p| p.sent.get()).sum::<u64>() as f64 / elapsed,
        received: stats.received.get(),
        load_cpu,
        broker_cpu,
    })
}

/// edgegw's `broker.limits.hibernate_after` in the idle scenario (the default is 30 s).
pub const IDLE_HIBERNATE_SECS: u64 = 1;
/// How long every broker idles after the last connection before its memory is read: time
/// for edgegw's connections to hibernate and for its allocator (jemalloc, which returns
/// freed pages over about 10 s) to give back what they freed.
pub const IDLE_SETTLE_SECS: u64 = IDLE_HIBERNATE_SECS + 11;

/// Resident memory per idle connection.
#[derive(Clone, Debug, Default)]
pub struct Idle {
    pub attempted: usize,
    pub accepted: usize,
    pub before_kib: u64,
    pub after_kib: u64,
    pub connect_secs: f64,
    pub first_error: Option<String>,
}

impl Idle {
    pub fn per_connection_kib(&self) -> Option<f64> {
        (self.accepted > 0)
            .then(|| (self.after_kib as f64 - self.before_kib as f64) / self.accepted as f64)
    }
}

/// Opens `n` MQTT connections (CONNECT/CONNACK, then silence), 128 at a time, within 60 s.
pub async fn run_idle(broker: &mut Broker, n: usize) -> Result<Idle> {
    let addr = broker.addr;
    sleep(Duration::from_millis(300)).await;
    let before_kib = broker
        .rss_kib()
        .ok_or_else(|| anyhow!("cannot read the broker's RSS"))?;
    let t0 = Instant::now();
    let limit = Duration::from_secs(60);
    let permits = std::sync::Arc::new(Semaphore::new(128));
    let failures = Rc::new(Cell::new(0usize));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        // Stop early when the broker refuses everything or time is up.
        if failures.get() >= 500 || t0.elapsed() > limit {
            break;
        }
        let Ok(Ok(permit)) = timeout(limit, permits.clone().acquire_owned()).await else {
            break;
        };
        let failures = failures.clone();
        tasks.push(spawn_local(async move {
            let result = connect(addr, &format!("bench-idle-{i}"), true, 64).await;
            drop(permit);
            if result.is_err() {
                failures.set(failures.get() + 1);
            }
            result.map(|(stream, _)| stream)
        }));
    }
    let attempted = tasks.len();
    let mut streams = Vec::with_capacity(n);
    let mut first_error = None;
    for t in tasks {
        match timeout(Duration::from_secs(15), t).await {
            Ok(Ok(Ok(stream))) => streams.push(stream),
            Ok(Ok(Err(e))) => {
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Ok(Err(e)) => {
                first_error.get_or_insert_with(|| format!("{e}"));
            }
            Err(_) => {
                first_error.get_or_insert_with(|| "connect task timed out".into());
            }
        }
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    // Let the broker settle (edgegw's connections hibernate after `IDLE_HIBERNATE_SECS`
    // without traffic), then measure while every connection is still open.
    sleep(Duration::from_secs(IDLE_SETTLE_SECS)).await;
    let after_kib = broker.rss_kib().unwrap_or(0);
    broker.check_alive()?;
    let accepted = streams.len();
    drop(streams);
    if attempted < n && first_error.is_none() {
        first_error = Some(format!("stopped after {attempted} attempts"));
    }
    Ok(Idle {
        attempted: n,
        accepted,
        before_kib,
        after_kib,
        connect_secs,
        first_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(latency_ms: std::ops::Range<u64>, sent: u64, rate: f64) -> Outcome {
        let mut latency_ns: Vec<u64> = latency_ms.map(|ms| ms * 1_000_000).collect();
        Outcome {
            rate,
            sent,
            expected: sent,
            unique: sent,
            latency: percentiles(&mut latency_ns),
            latency_ns,
            spins: true,
            notes: vec!["same".into()],
            ..Outcome::default()
        }
    }

    #[test]
    fn rounds_pool_their_samples_sum_their_counts_and_average_their_rates() {
        // 1..=100 ms split over two rounds: the pooled p50 and p99 are those of the whole.
        let pooled = pool_rounds(&[round(51..101, 50, 4000.0), round(1..51, 50, 6000.0)]);
        let latency = pooled.latency.expect("pooled percentiles");
        assert_eq!(latency.samples, 100);
        assert_eq!(latency.p50_us, 50_000.0);
        assert_eq!(latency.p99_us, 99_000.0);
        assert_eq!(latency.max_us, 100_000.0);
        assert_eq!(
            (pooled.sent, pooled.expected, pooled.unique),
            (100, 100, 100)
        );
        assert_eq!(pooled.rate, 5000.0);
        assert!(pooled.spins);
        assert_eq!(
            pooled.notes,
            vec!["same".to_string()],
            "a note shared by rounds once"
        );
    }

    #[test]
    fn latency_rounds_split_twice_the_scenario_time() {
        let timing = Timing {
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(5),
        };
        assert_eq!(latency_round(timing, 5), Duration::from_secs(2));
        assert_eq!(latency_round(timing, 1), Duration::from_secs(10));
        assert_eq!(latency_round(timing, 50), Duration::from_millis(500));
    }
}
