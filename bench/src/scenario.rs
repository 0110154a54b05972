//! The scenarios: `hold` (idle connections: memory and CPU per connection), `chat` (visitors → agent +
//! watchers, open-loop, latency and loss), and `echo` (the same load against a bare tokio-tungstenite echo
//! server, for the throughput ratio).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Ws};
use crate::system;

/// Latency of messages intended in the first seconds of a run is not recorded (see `chat`).
pub const WARMUP: Duration = Duration::from_secs(2);
/// Kernel receive buffer of a slow consumer's socket, bytes.
pub const SLOW_RCVBUF: u32 = 4096;

/// Per-connection latencies are kept as raw samples (a few per connection) and merged into one histogram at
/// the end: a histogram per connection is ~220 KiB, and allocating 9,000 of them at load start cost the load
/// generator ~3 s of CPU (page faults) during which it sent late — the "start-of-load stall".
fn record_all(h: &mut Histogram<u64>, samples: &[u64]) {
    for &us in samples {
        let _ = h.record(us);
    }
}

fn hist() -> Histogram<u64> {
    // Microseconds, 1 µs .. 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: h.max() as f64 / 1000.0,
        }
    }
}

// ---------------------------------------------------------------------------------------------- hold

/// One memory sample of the hold scenario.
#[derive(Debug, Clone, Serialize)]
pub struct HoldPoint {
    pub connections: usize,
    pub server_rss_kib: u64,
    pub slab_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HoldResult {
    pub connections: usize,
    pub errors: usize,
    pub connect_secs: f64,
    pub handshake: Latency,
    pub points: Vec<HoldPoint>,
    /// Server cost per idle connection, KiB: the RSS slope plus half the kernel slab slope. Client and server
    /// sockets of a loopback pair live in the same kernel and cost the same, so half the slab growth is the
    /// server side's.
    pub kib_per_connection: f64,
    /// Least-squares slope of server RSS against connections, KiB per connection.
    pub rss_kib_per_connection: f64,
    /// Least-squares slope of kernel slab against connections (both ends of each pair), KiB per connection.
    pub slab_kib_per_connection_pair: f64,
    pub idle_secs: f64,
    /// Server CPU during the idle phase, percent of one core.
    pub idle_cpu_percent: f64,
}

/// Open `n` idle visitor connections (hello → welcome), sampling memory on the way, then idle. This process
/// holds at most `per_process` of them (the per-process open-file limit is 20,000 here); the rest are held by
/// `kefu-bench hold-worker` child processes started one after another.
pub async fn hold(
    addr: SocketAddr,
    server_pid: u32,
    n: usize,
    idle: Duration,
    buffer: usize,
    per_process: usize,
) -> HoldResult {
    let mut points =
        vec![HoldPoint { connections: 0, server_rss_kib: system::rss_kib(server_pid), slab_kib: system::slab_kib() }];
    let own_n = n.min(per_process.max(1));
    let step = (n / 8).max(1);
    let mut conns: Vec<Ws> = Vec::with_capacity(own_n);
    let mut handshake = hist();
    let mut errors = 0;
    let start = Instant::now();
    let mut i = 0;
    while i < own_n {
        let batch = (own_n - i).min(200);
        let (ws, e) = connect_idle(addr, i..i + batch, buffer, &mut handshake).await;
        conns.extend(ws);
        errors += e;
        i += batch;
        if i % step < batch || i == own_n {
            tokio::time::sleep(Duration::from_millis(300)).await;
            points.push(HoldPoint {
                connections: conns.len(),
                server_rss_kib: system::rss_kib(server_pid),
                slab_kib: system::slab_kib(),
            });
        }
    }
    let mut workers = Vec::new();
    let mut by_workers = 0;
    while i < n {
        let k = (n - i).min(per_process.max(1));
        match HoldWorker::start(addr, i, k, buffer).await {
            Ok((w, connected, e)) => {
                by_workers += connected;
                errors += e;
                workers.push(w);
            }
            Err(e) => {
                eprintln!("  hold worker for connections {i}..{}: {e:#}", i + k);
                errors += k;
            }
        }
        i += k;
        tokio::time::sleep(Duration::from_millis(300)).await;
        points.push(HoldPoint {
            connections: conns.len() + by_workers,
            server_rss_kib: system::rss_kib(server_pid),
            slab_kib: system::slab_kib(),
        });
    }
    let connect_secs = start.elapsed().as_secs_f64();
    // Idle: the node pings every 25 s; measure what holding costs.
    let cpu0 = system::cpu_seconds(server_pid);
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let readers = keep_reading(conns, &stop);
    tokio::time::sleep(idle).await;
    let idle_secs = t0.elapsed().as_secs_f64();
    let idle_cpu_percent = 100.0 * (system::cpu_seconds(server_pid) - cpu0) / idle_secs;
    stop.store(true, Ordering::Relaxed);
    let mut held = 0;
    for r in readers {
        if r.await.is_ok_and(|still_open| still_open) {
            held += 1;
        }
    }
    for w in workers {
        held += w.finish().await.unwrap_or(0);
    }
    HoldResult {
        connections: held,
        errors,
        connect_secs,
        handshake: Latency::of(&handshake),
        kib_per_connection: slope(&points, |p| p.server_rss_kib) + slope(&points, |p| p.slab_kib) / 2.0,
        rss_kib_per_connection: slope(&points, |p| p.server_rss_kib),
        slab_kib_per_connection_pair: slope(&points, |p| p.slab_kib),
        points,
        idle_secs,
        idle_cpu_percent,
    }
}

/// Connect visitors `range` (source addresses by index) concurrently and say hello; returns the sockets and
/// the number that failed.
async fn connect_idle(
    addr: SocketAddr,
    range: std::ops::Range<usize>,
    buffer: usize,
    handshake: &mut Histogram<u64>,
) -> (Vec<Ws>, usize) {
    let mut tasks = Vec::with_capacity(range.len());
    for k in range {
        tasks.push(tokio::spawn(async move {
            let (mut ws, t) = client::connect(addr, "/ws/visitor", client::source_ip(k), buffer).await?;
            client::hello(&mut ws, None).await?;
            Ok::<_, anyhow::Error>((ws, t))
        }));
    }
    let (mut out, mut errors) = (Vec::new(), 0);
    for t in tasks {
        match t.await {
            Ok(Ok((ws, d))) => {
                let _ = handshake.record(d.as_micros().max(1) as u64);
                out.push(ws);
            }
            _ => errors += 1,
        }
    }
    (out, errors)
}

/// Keep reading every socket (tungstenite answers the node's pings on read) until `stop`; each task returns
/// whether its connection was still open.
fn keep_reading(conns: Vec<Ws>, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<bool>> {
    conns
        .into_iter()
        .map(|mut ws| {
            let stop = stop.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
                        Ok(Some(Ok(_))) | Err(_) => {}
                        _ => return false,
                    }
                }
                true
            })
        })
        .collect()
}

/// A `kefu-bench hold-worker` child process holding part of the idle connections.
struct HoldWorker {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl HoldWorker {
    /// Start a worker for connections `first..first + n`; returns once it has connected them, with how many
    /// it holds and how many failed.
    async fn start(addr: SocketAddr, first: usize, n: usize, buffer: usize) -> anyhow::Result<(Self, usize, usize)> {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["hold-worker", "--addr", &addr.to_string(), "--first", &first.to_string()])
            .args(["--connections", &n.to_string(), "--ws-buffer", &buffer.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = lines.next_line().await?.context("hold worker exited before connecting")?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        let count = |k: &str| v[k].as_u64().unwrap_or(0) as usize;
        Ok((HoldWorker { child, lines }, count("connected"), count("errors")))
    }

    /// Tell the worker to stop (close its stdin); returns how many connections it still held.
    async fn finish(mut self) -> anyhow::Result<usize> {
        drop(self.child.stdin.take());
        let line = self.lines.next_line().await?.context("hold worker exited without a count")?;
        let _ = self.child.wait().await;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        Ok(v["held"].as_u64().unwrap_or(0) as usize)
    }
}

/// The child side of [`HoldWorker`]: connect, report `{"connected", "errors"}` on stdout, keep reading until
/// stdin closes, report `{"held"}`.
pub async fn hold_worker(addr: SocketAddr, first: usize, n: usize, buffer: usize) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut handshake = hist();
    let (mut conns, mut errors) = (Vec::with_capacity(n), 0);
    let mut i = first;
    while i < first + n {
        let batch = (first + n - i).min(200);
        let (ws, e) = connect_idle(addr, i..i + batch, buffer, &mut handshake).await;
        conns.extend(ws);
        errors += e;
        i += batch;
    }
    println!("{}", json!({"connected": conns.len(), "errors": errors}));
    let stop = Arc::new(AtomicBool::new(false));
    let readers = keep_reading(conns, &stop);
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    stop.store(true, Ordering::Relaxed);
    let mut held = 0;
    for r in readers {
        if r.await.is_ok_and(|open| open) {
            held += 1;
        }
    }
    println!("{}", json!({"held": held}));
    Ok(())
}

fn slope(points: &[HoldPoint], y: impl Fn(&HoldPoint) -> u64) -> f64 {
    let xs: Vec<f64> = points.iter().map(|p| p.connections as f64).collect();
    let ys: Vec<f64> = points.iter().map(|p| y(p) as f64).collect();
    let n = xs.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = xs.iter().sum::<f64>() / n;
    let my = ys.iter().sum::<f64>() / n;
    let cov: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    if var == 0.0 { 0.0 } else { cov / var }
}

// ---------------------------------------------------------------------------------------------- chat

/// Parameters of one chat run.
#[derive(Debug, Clone, Serialize)]
pub struct ChatParams {
    pub visitors: usize,
    /// Agent connections (each takes up to 1000 conversations).
    pub agents: usize,
    /// Watcher connections; each conversation gets `watchers_per_conv` of them.
    pub watchers: usize,
    pub watchers_per_conv: usize,
    /// Offered load, messages per second over all visitors.
    pub rate: f64,
    pub duration_secs: f64,
    /// Padding so a message frame is about 200 bytes.
    pub pad: usize,
    /// Fraction of watcher connections that stop reading (slow consumers).
    pub slow_fraction: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatResult {
    pub params: ChatParams,
    pub connections: usize,
    pub sent: u64,
    pub acked: u64,
    /// Deliveries expected to healthy receivers (sent × fan-out, minus those to slow consumers).
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Send → durable ack at the sender.
    pub ack: Latency,
    /// Intended send time → received by agents and healthy watchers.
    pub delivery: Latency,
    pub server_cpu_secs: f64,
    pub client_cpu_secs: f64,
    pub window_secs: f64,
    pub deliveries_per_server_cpu_sec: f64,
    pub client_cpu_percent: f64,
    pub server_rss_kib: u64,
    pub slow_closed: usize,
    /// The node's own view of the window the client's latency covers (from its /metrics, after the warm-up),
    /// to tell server time from client time.
    pub server_stages: Option<ServerStages>,
    /// The same for the warm-up (the first messages of every connection; not in the client's latency).
    pub server_stages_warmup: Option<ServerStages>,
    /// The slowest delivery of messages intended in each second after the warm-up, ms: shows whether a tail
    /// is spread out or one stall.
    pub worst_by_second_ms: Vec<f64>,
}

/// p50 / p99 / p99.9 of the node's histograms over a run, as bucket upper bounds in ms.
#[derive(Debug, Clone, Serialize)]
pub struct ServerStages {
    /// `kefu_delivery_latency_seconds`: frame read off its socket → durable and queued to every recipient.
    pub read_to_queued_ms: Option<Vec<f64>>,
    /// `kefu_message_stage_seconds{stage="engine_queue"}`: frame read off its socket → the engine takes it.
    pub engine_queue_ms: Option<Vec<f64>>,
    /// `kefu_message_stage_seconds{stage="durable_wait"}`: batch handed to the store → engine sees it durable.
    pub durable_wait_ms: Option<Vec<f64>>,
    /// `kefu_store_commit_seconds{store="wal"}`: one group commit (append + fdatasync).
    pub wal_commit_ms: Option<Vec<f64>>,
    /// `kefu_engine_step_seconds` by step kind.
    pub engine_step_ms: Vec<(String, Option<Vec<f64>>)>,
}

const STAGE_QUANTILES: [f64; 3] = [0.5, 0.99, 0.999];

impl ServerStages {
    fn between(before: &str, after: &str) -> Self {
        let q = |name: &str, label: &str| {
            system::bucket_quantiles(
                &system::histogram_buckets(before, name, label),
                &system::histogram_buckets(after, name, label),
                &STAGE_QUANTILES,
            )
        };
        ServerStages {
            read_to_queued_ms: q("kefu_delivery_latency_seconds", ""),
            engine_queue_ms: q("kefu_message_stage_seconds", "stage=\"engine_queue\""),
            durable_wait_ms: q("kefu_message_stage_seconds", "stage=\"durable_wait\""),
            wal_commit_ms: q("kefu_store_commit_seconds", "store=\"wal\""),
            engine_step_ms: ["frame", "durable", "tick", "connect", "disconnect"]
                .iter()
                .map(|k| (k.to_string(), q("kefu_engine_step_seconds", &format!("step=\"{k}\""))))
                .collect(),
        }
    }
}

struct Receiver {
    hist: Histogram<u64>,
    /// Slowest delivery (µs) of the messages intended in each second after the warm-up.
    worst: Vec<u64>,
    delivered: u64,
    dup: u64,
    reorder: u64,
    last: HashMap<usize, u64>,
}

/// Run a chat load: visitors send open-loop; agents and watchers receive.
pub async fn chat(
    addr: SocketAddr,
    server_pid: u32,
    tokens: &ChatTokens,
    p: ChatParams,
    buffer: usize,
) -> anyhow::Result<ChatResult> {
    let epoch = Instant::now();
    let now_ns = move || epoch.elapsed().as_nanos() as u64;
    // Agents first (auto-assignment needs them online), then watchers, then visitors open.
    let mut agent_ws = Vec::new();
    for (i, t) in tokens.agents.iter().take(p.agents).enumerate() {
        let (mut ws, _) = client::connect(addr, "/ws/agent", client::source_ip(i), buffer).await?;
        client::hello(&mut ws, Some(t)).await?;
        agent_ws.push(ws);
    }
    let mut visitors = Vec::new();
    let mut convs = Vec::new();
    let mut i = 0;
    while i < p.visitors {
        let batch = (p.visitors - i).min(200);
        let mut tasks = Vec::new();
        for k in i..i + batch {
            tasks.push(tokio::spawn(async move {
                let (mut ws, _) = client::connect(addr, "/ws/visitor", client::source_ip(k), buffer).await?;
                client::hello(&mut ws, None).await?;
                let conv = client::open(&mut ws).await?;
                Ok::<_, anyhow::Error>((ws, conv))
            }));
        }
        for t in tasks {
            let (ws, conv) = t.await??;
            visitors.push(ws);
            convs.push(conv);
        }
        i += batch;
    }
    let mut watcher_ws = Vec::new();
    let mut watched: Vec<Vec<usize>> = vec![Vec::new(); p.watchers];
    if p.watchers > 0 {
        for (v, _) in convs.iter().enumerate() {
            for k in 0..p.watchers_per_conv.min(p.watchers) {
                watched[(v + k) % p.watchers].push(v);
            }
        }
    }
    // The first `slow_count` watchers will stop reading (see `receive`).
    let slow_count = (p.watchers as f64 * p.slow_fraction).round() as usize;
    for (w, list) in watched.iter().enumerate() {
        let token = &tokens.watchers[w % tokens.watchers.len()];
        let rcvbuf = (w < slow_count).then_some(SLOW_RCVBUF);
        let (mut ws, _) = client::connect_with(addr, "/ws/agent", client::source_ip(w), buffer, rcvbuf).await?;
        client::hello(&mut ws, Some(token)).await?;
        // Watchers supervise; they must not be routed conversations of their own.
        client::send(&mut ws, &json!({"type": "presence", "status": "away"})).await?;
        for v in list {
            client::send(&mut ws, &json!({"type": "watch", "conv": convs[*v]})).await?;
        }
        watcher_ws.push(ws);
    }
    // Let assignments and watch summaries settle, then drain what is queued.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let connections = agent_ws.len() + visitors.len() + watcher_ws.len();

    let stop = Arc::new(AtomicBool::new(false));
    // Latency is recorded for messages intended after a warm-up (connection setup settles); loss,
    // duplicates and order are checked for every message.
    let warm_ns = now_ns() + WARMUP.as_nanos() as u64;
    let mut receivers = Vec::new();
    for (idx, ws) in agent_ws.into_iter().chain(watcher_ws).enumerate() {
        let stop = stop.clone();
        let slow = idx >= p.agents && idx - p.agents < slow_count;
        receivers.push(tokio::spawn(receive(ws, stop, slow, now_ns, warm_ns)));
    }
    eprintln!("chat load starts: {connections} connections, {:.0} msgs/s for {:.0} s", p.rate, p.duration_secs);
    // The node's histograms are read at load start, at the end of the warm-up and at the end: the second
    // window is the one the client's latency covers.
    let metrics_start = system::scrape_metrics(addr).ok();
    let warm_at = epoch + Duration::from_nanos(warm_ns);
    let metrics_warm = tokio::spawn(async move {
        tokio::time::sleep_until(warm_at.into()).await;
        tokio::task::spawn_blocking(move || system::scrape_metrics(addr).ok()).await.ok().flatten()
    });
    let cpu_s0 = system::cpu_seconds(server_pid);
    let cpu_c0 = system::self_cpu_seconds();
    let t0 = Instant::now();
    let per_visitor = p.rate / p.visitors as f64;
    let sent = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for (v, ws) in visitors.into_iter().enumerate() {
        let conv = convs[v].clone();
        let sent = sent.clone();
        let duration = Duration::from_secs_f64(p.duration_secs);
        let pad = p.pad;
        senders.push(tokio::spawn(send_loop(ws, v, conv, per_visitor, duration, pad, sent, epoch, warm_ns)));
    }
    let mut ack = hist();
    let mut acked = 0;
    let mut sent_by = vec![0u64; p.visitors];
    for (v, s) in senders.into_iter().enumerate() {
        if let Ok((h, a, n)) = s.await {
            record_all(&mut ack, &h);
            acked += a;
            sent_by[v] = n;
        }
    }
    let window = t0.elapsed().as_secs_f64();
    let server_cpu = system::cpu_seconds(server_pid) - cpu_s0;
    let client_cpu = system::self_cpu_seconds() - cpu_c0;
    let server_rss_kib = system::rss_kib(server_pid);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics_warm = metrics_warm.await.ok().flatten();
    let metrics_end = system::scrape_metrics(addr).ok();
    let stages = |a: &Option<String>, b: &Option<String>| match (a, b) {
        (Some(a), Some(b)) => Some(ServerStages::between(a, b)),
        _ => None,
    };
    let server_stages = stages(&metrics_warm, &metrics_end);
    let server_stages_warmup = stages(&metrics_start, &metrics_warm);
    stop.store(true, Ordering::Relaxed);
    let mut delivery = hist();
    let mut worst: Vec<u64> = Vec::new();
    let (mut delivered, mut dup, mut reorder) = (0, 0, 0);
    let mut healthy_receivers_per_conv = vec![1u64; p.visitors];
    let mut slow_closed = 0;
    for (idx, r) in receivers.into_iter().enumerate() {
        let slow = idx >= p.agents && idx - p.agents < slow_count;
        let Ok((rec, closed)) = r.await else { continue };
        if slow {
            slow_closed += usize::from(closed);
            continue;
        }
        if idx >= p.agents {
            for v in &watched[idx - p.agents] {
                healthy_receivers_per_conv[*v] += 1;
            }
        }
        let _ = delivery.add(&rec.hist);
        if worst.len() < rec.worst.len() {
            worst.resize(rec.worst.len(), 0);
        }
        for (w, r) in worst.iter_mut().zip(&rec.worst) {
            *w = (*w).max(*r);
        }
        delivered += rec.delivered;
        dup += rec.dup;
        reorder += rec.reorder;
    }
    let sent = sent.load(Ordering::Relaxed);
    // Each message of visitor v is expected at the agent and at every healthy watcher of v.
    let expected: u64 = sent_by.iter().zip(&healthy_receivers_per_conv).map(|(n, r)| n * r).sum();
    Ok(ChatResult {
        connections,
        sent,
        acked,
        expected_deliveries: expected,
        delivered,
        lost: expected.saturating_sub(delivered),
        duplicated: dup,
        reordered: reorder,
        ack: Latency::of(&ack),
        delivery: Latency::of(&delivery),
        server_cpu_secs: server_cpu,
        client_cpu_secs: client_cpu,
        window_secs: window,
        deliveries_per_server_cpu_sec: if server_cpu > 0.0 { delivered as f64 / server_cpu } else { 0.0 },
        client_cpu_percent: 100.0 * client_cpu / window,
        server_rss_kib,
        slow_closed,
        server_stages,
        server_stages_warmup,
        worst_by_second_ms: worst.iter().map(|us| *us as f64 / 1000.0).collect(),
        params: p,
    })
}

/// Tokens the chat scenario signs in with.
#[derive(Debug, Clone)]
pub struct ChatTokens {
    pub agents: Vec<String>,
    pub watchers: Vec<String>,
}

#[allow(clippy::too_many_arguments)]
async fn send_loop(
    ws: Ws,
    v: usize,
    conv: String,
    rate: f64,
    duration: Duration,
    pad: usize,
    sent: Arc<AtomicU64>,
    epoch: Instant,
    warm_ns: u64,
) -> (Vec<u64>, u64, u64) {
    let (mut sink, mut stream) = ws.split();
    // Acks are read concurrently; the intended time of message n is known from the schedule.
    let start = Instant::now() + Duration::from_secs_f64(rand_phase(v) / rate.max(0.001));
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let done = Arc::new(AtomicBool::new(false));
    let sender_done = done.clone();
    let reader = tokio::spawn(async move {
        let mut h: Vec<u64> = Vec::new();
        let mut acks = 0u64;
        let mut quiet_since: Option<Instant> = None;
        loop {
            // Read until the sender is done and the socket has been quiet for 1.5 s.
            let msg = match tokio::time::timeout(Duration::from_millis(250), stream.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(_) => break,
                Err(_) => {
                    if done.load(Ordering::Relaxed) {
                        let since = *quiet_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_millis(1500) {
                            break;
                        }
                    }
                    continue;
                }
            };
            quiet_since = None;
            if let Message::Text(t) = msg {
                if t.contains("\"type\":\"ack\"") {
                    if let Some(n) = ack_id(&t) {
                        let intended = start + interval * n as u32;
                        if intended.duration_since(epoch).as_nanos() as u64 >= warm_ns {
                            h.push(Instant::now().saturating_duration_since(intended).as_micros().max(1) as u64);
                        }
                        acks += 1;
                    }
                }
            }
        }
        (h, acks)
    });
    let n = send_open_loop(&mut sink, start, interval, duration, epoch, &sent, |n, intended_ns| {
        json!({"type": "send", "id": format!("m{n}"), "conv": conv, "text": client::payload(v, n, intended_ns, pad)})
    })
    .await;
    sender_done.store(true, Ordering::Relaxed);
    let (h, acks) = reader.await.unwrap_or_else(|_| (Vec::new(), 0));
    let _ = sink.close().await;
    (h, acks, n)
}

/// The open-loop schedule: message `n` is due at `start + n × interval` whether or not earlier ones were
/// answered (no coordinated omission), and carries that intended time. Returns how many were sent.
async fn send_open_loop(
    sink: &mut futures_util::stream::SplitSink<Ws, Message>,
    start: Instant,
    interval: Duration,
    duration: Duration,
    epoch: Instant,
    sent: &AtomicU64,
    frame: impl Fn(u64, u64) -> serde_json::Value,
) -> u64 {
    let mut n: u64 = 0;
    loop {
        let intended = start + interval * n as u32;
        if intended.duration_since(start) >= duration {
            return n;
        }
        tokio::time::sleep_until(intended.into()).await;
        let intended_ns = intended.duration_since(epoch).as_nanos() as u64;
        if sink.send(Message::Text(frame(n, intended_ns).to_string().into())).await.is_err() {
            return n;
        }
        sent.fetch_add(1, Ordering::Relaxed);
        n += 1;
    }
}

fn ack_id(frame: &str) -> Option<u64> {
    let at = frame.find("\"id\":\"m")? + 7;
    frame[at..].split('"').next()?.parse().ok()
}

fn rand_phase(v: usize) -> f64 {
    // Deterministic spread of start phases in [0, 1).
    ((v as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64
}

async fn receive(
    mut ws: Ws,
    stop: Arc<AtomicBool>,
    slow: bool,
    now_ns: impl Fn() -> u64,
    warm_ns: u64,
) -> (Receiver, bool) {
    let mut r = Receiver { hist: hist(), worst: Vec::new(), delivered: 0, dup: 0, reorder: 0, last: HashMap::new() };
    if slow {
        // Stop reading; report whether the node closed us (it should).
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let closed = loop {
            match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                Ok(None) | Ok(Some(Err(_))) => break true,
                Ok(Some(Ok(Message::Close(_)))) => break true,
                Ok(Some(Ok(_))) => continue,
                Err(_) => break false,
            }
        };
        return (r, closed);
    }
    while !stop.load(Ordering::Relaxed) {
        let msg = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(_) => break,
            Err(_) => continue,
        };
        let Message::Text(t) = msg else { continue };
        let Some((v, n, intended)) = client::parse_payload(&t) else { continue };
        if intended >= warm_ns {
            let us = (now_ns().saturating_sub(intended) / 1000).max(1);
            let _ = r.hist.record(us);
            let sec = ((intended - warm_ns) / 1_000_000_000) as usize;
            if r.worst.len() <= sec {
                r.worst.resize(sec + 1, 0);
            }
            r.worst[sec] = r.worst[sec].max(us);
        }
        match r.last.get(&v) {
            Some(&last) if n <= last => r.dup += 1,
            Some(&last) if n > last + 1 => {
                r.reorder += 1;
                r.delivered += 1;
                r.last.insert(v, n);
            }
            _ => {
                r.delivered += 1;
                r.last.insert(v, n);
            }
        }
    }
    (r, false)
}

// ---------------------------------------------------------------------------------------------- echo

#[derive(Debug, Clone, Serialize)]
pub struct EchoResult {
    pub connections: usize,
    pub rate: f64,
    pub sent: u64,
    pub echoed: u64,
    pub latency: Latency,
    pub server_cpu_secs: f64,
    pub window_secs: f64,
    pub deliveries_per_server_cpu_sec: f64,
    pub client_cpu_percent: f64,
}

/// The same open-loop send pattern against the bare echo server: one delivery per message.
pub async fn echo(
    addr: SocketAddr,
    server_pid: u32,
    conns: usize,
    rate: f64,
    duration: Duration,
    pad: usize,
    buffer: usize,
) -> anyhow::Result<EchoResult> {
    let epoch = Instant::now();
    let mut socks = Vec::new();
    for i in 0..conns {
        let (ws, _) = client::connect(addr, "/", client::source_ip(i), buffer).await?;
        socks.push(ws);
    }
    let cpu_s0 = system::cpu_seconds(server_pid);
    let cpu_c0 = system::self_cpu_seconds();
    let t0 = Instant::now();
    let per = rate / conns as f64;
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (v, ws) in socks.into_iter().enumerate() {
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let start = Instant::now() + Duration::from_secs_f64(rand_phase(v) / per.max(0.001));
            let interval = Duration::from_secs_f64(1.0 / per.max(0.001));
            let reader = tokio::spawn(async move {
                let mut h: Vec<u64> = Vec::new();
                let mut n = 0u64;
                while let Ok(Some(Ok(Message::Text(t)))) =
                    tokio::time::timeout(Duration::from_millis(1500), stream.next()).await
                {
                    if let Some((_, _, intended)) = client::parse_payload(&t) {
                        let now = epoch.elapsed().as_nanos() as u64;
                        h.push((now.saturating_sub(intended) / 1000).max(1));
                        n += 1;
                    }
                }
                (h, n)
            });
            // Same shape as a kefu `msg` frame so parsing costs the same.
            send_open_loop(
                &mut sink,
                start,
                interval,
                duration,
                epoch,
                &sent,
                |n, ns| json!({"type": "msg", "conv": "c", "entry": {"text": client::payload(v, n, ns, pad)}}),
            )
            .await;
            reader.await.unwrap_or_else(|_| (Vec::new(), 0))
        }));
    }
    let mut h = hist();
    let mut echoed = 0;
    for t in tasks {
        if let Ok((th, n)) = t.await {
            record_all(&mut h, &th);
            echoed += n;
        }
    }
    // The readers wait 3 s for stragglers; count CPU over the send window plus that drain.
    let window = t0.elapsed().as_secs_f64();
    let server_cpu = system::cpu_seconds(server_pid) - cpu_s0;
    let client_cpu = system::self_cpu_seconds() - cpu_c0;
    Ok(EchoResult {
        connections: conns,
        rate,
        sent: sent.load(Ordering::Relaxed),
        echoed,
        latency: Latency::of(&h),
        server_cpu_secs: server_cpu,
        window_secs: window,
        deliveries_per_server_cpu_sec: if server_cpu > 0.0 { echoed as f64 / server_cpu } else { 0.0 },
        client_cpu_percent: 100.0 * client_cpu / window,
    })
}

/// The bare echo server: accept WebSockets, send every text frame back. Runs as its own process.
pub async fn echo_server(listen: SocketAddr, buffer: usize) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("echo listening addr={}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .read_buffer_size(buffer)
                .write_buffer_size(buffer);
            let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else { return };
            while let Some(Ok(msg)) = ws.next().await {
                if msg.is_text() && ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
    }
}
