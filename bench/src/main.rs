//! kefu-bench: load generator and benchmark suite for kefu-node.
//!
//! `kefu-bench suite` starts the node pinned to one CPU (run this process pinned to another: `make bench`
//! does both), then runs: hold (idle connections: memory slope, idle CPU), saturate (open-loop chat at
//! rising rates), echo (the same client against a bare tokio-tungstenite echo server), scale (the rising
//! rates again with ~9,300 connections, to find the knee there), steady (chat at half that knee) and slow
//! consumers (the same with 1 % of watchers not reading). It writes report.json, report.md and plot.svg.

mod client;
mod report;
mod scenario;
mod system;
mod target;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use report::Report;
use scenario::{ChatParams, ChatTokens};
use target::Target;

#[derive(Debug, Parser)]
#[command(name = "kefu-bench", about = "Load generator and benchmarks for kefu-node")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The standard suite (about 8 minutes here); writes report.json, report.md, plot.svg under --out.
    Suite(SuiteArgs),
    /// A few connections for a few seconds: proves the tool works (used by `make test`); asserts no loss.
    Smoke(SuiteArgs),
    /// Internal: holds part of the idle connections for `suite` when one process would pass its share.
    HoldWorker {
        #[arg(long)]
        addr: SocketAddr,
        /// Index of the first connection (picks the source addresses).
        #[arg(long)]
        first: usize,
        #[arg(long)]
        connections: usize,
        #[arg(long, default_value_t = 4096)]
        ws_buffer: usize,
    },
    /// Internal: the bare echo server the echo baseline measures.
    EchoServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 4096)]
        ws_buffer: usize,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct SuiteArgs {
    /// kefu-node binary to measure.
    #[arg(long, default_value = "target/release/kefu-node")]
    node_bin: PathBuf,
    /// Output directory.
    #[arg(long, default_value = "bench/results/latest")]
    out: PathBuf,
    /// CPUs for the server (taskset list).
    #[arg(long, default_value = "0")]
    server_cpus: String,
    /// CPUs this load generator runs on (informational: pin it with taskset).
    #[arg(long, default_value = "1")]
    client_cpus: String,
    /// Idle connections for the hold phase (one load process holds at most ~19,000).
    #[arg(long, default_value_t = 10_000)]
    hold: usize,
    /// Most idle connections one load process holds (the open-file limit here is 20,000 per process); more
    /// are spread over `hold-worker` child processes.
    #[arg(long, default_value_t = 18_000)]
    per_process: usize,
    /// Seconds to hold them idle.
    #[arg(long, default_value_t = 30)]
    hold_secs: u64,
    /// Visitors in the saturation steps.
    #[arg(long, default_value_t = 1000)]
    visitors: usize,
    /// Offered message rates for the saturation steps.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,4000,8000,12000,16000,20000,24000")]
    rates: Vec<f64>,
    /// Seconds per step.
    #[arg(long, default_value_t = 10.0)]
    step_secs: f64,
    /// Visitors in the steady phase (plus agents and watchers).
    #[arg(long, default_value_t = 9000)]
    steady_visitors: usize,
    /// WebSocket read/write buffer on both ends, bytes.
    #[arg(long, default_value_t = 4096)]
    ws_buffer: usize,
    /// Phases to run (for tuning one thing at a time); the report covers what ran.
    #[arg(long, value_delimiter = ',', default_value = "hold,saturate,echo,scale,steady,slow")]
    phases: Vec<Phase>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    Hold,
    Saturate,
    Echo,
    /// Saturation steps with the steady phase's connection count (the knee P4 halves).
    Scale,
    Steady,
    Slow,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    match cli.command {
        Cmd::HoldWorker { addr, first, connections, ws_buffer } => {
            rt.block_on(scenario::hold_worker(addr, first, connections, ws_buffer))
        }
        Cmd::EchoServer { listen, ws_buffer } => rt.block_on(scenario::echo_server(listen, ws_buffer)),
        Cmd::Suite(a) => rt.block_on(suite(a, false)),
        Cmd::Smoke(a) => rt.block_on(suite(a, true)),
    }
}

struct Prepared {
    target: Target,
    tokens: ChatTokens,
}

/// A fresh node with agents (capacity 1000 each) and watcher accounts.
fn prepare(a: &SuiteArgs, tag: &str, agents: usize, watchers: usize) -> anyhow::Result<Prepared> {
    let dir = target::scratch_dir(tag)?;
    let mut tokens = ChatTokens { agents: Vec::new(), watchers: Vec::new() };
    for i in 0..agents {
        tokens.agents.push(target::add_agent(&a.node_bin, &dir.0, &format!("agent-{i}"), 1000, false)?);
    }
    // Watcher connections share a few supervisor accounts (an agent may hold many connections); they set
    // presence `away` so routing never gives them conversations of their own.
    for i in 0..watchers.clamp(1, 4) {
        tokens.watchers.push(target::add_agent(&a.node_bin, &dir.0, &format!("sup-{i}"), 1, true)?);
    }
    let target = Target::node(&a.node_bin, dir, &a.server_cpus, a.ws_buffer)?;
    Ok(Prepared { target, tokens })
}

async fn suite(a: SuiteArgs, smoke: bool) -> anyhow::Result<()> {
    if !a.node_bin.exists() {
        bail!("{} not found: build it first (cargo build --release -p kefu-node)", a.node_bin.display());
    }
    let a = if smoke {
        // 20 idle connections, 8 per process: the smoke run also exercises the hold-worker processes.
        SuiteArgs {
            hold: 20,
            hold_secs: 1,
            per_process: 8,
            visitors: 10,
            rates: vec![50.0],
            step_secs: 2.0,
            steady_visitors: 20,
            ..a
        }
    } else {
        a
    };
    let env = system::Environment::capture(&a.node_bin, &a.server_cpus, &a.client_cpus, a.ws_buffer);
    let mut report = Report {
        environment: env,
        hold: None,
        saturate: Vec::new(),
        saturate_at_scale: Vec::new(),
        echo: Vec::new(),
        echo_at_scale: None,
        steady: None,
        slow_consumers: None,
        notes: Vec::new(),
    };
    let pad = 90; // a ~200-byte `msg` frame

    let runs = |p: Phase| a.phases.contains(&p);
    // 1. hold
    if runs(Phase::Hold) {
        eprintln!("hold: {} idle connections for {} s", a.hold, a.hold_secs);
        let p = prepare(&a, "hold", 1, 1)?;
        let r = scenario::hold(
            p.target.addr,
            p.target.pid,
            a.hold,
            Duration::from_secs(a.hold_secs),
            a.ws_buffer,
            a.per_process,
        )
        .await;
        eprintln!(
            "  {:.1} KiB/connection, idle CPU {:.2} %, {} errors",
            r.kib_per_connection, r.idle_cpu_percent, r.errors
        );
        report.hold = Some(r);
    }

    // 2. saturate: visitors → their agent + 2 watchers per conversation (fan-out 3).
    // One agent connection per ~100 conversations (an agent console, not one socket carrying everything).
    let agents_for = |v: usize| v.div_ceil(100).max(1);
    let watchers_for = |v: usize| (v / 50).clamp(2, 200);
    for &rate in a.rates.iter().filter(|_| runs(Phase::Saturate)) {
        let p = prepare(&a, "chat", agents_for(a.visitors), watchers_for(a.visitors))?;
        let params = ChatParams {
            visitors: a.visitors,
            agents: agents_for(a.visitors),
            watchers: watchers_for(a.visitors),
            watchers_per_conv: 2,
            rate,
            duration_secs: a.step_secs,
            pad,
            slow_fraction: 0.0,
        };
        let r =
            scenario::chat(p.target.addr, p.target.pid, &p.tokens, params, a.ws_buffer).await.context("chat step")?;
        eprintln!(
            "saturate {rate:.0} msgs/s: delivered {} lost {} dup {} p50 {:.2} p99 {:.2} ms, {:.0} deliveries/server-CPU-s, load-gen CPU {:.0} %",
            r.delivered,
            r.lost,
            r.duplicated,
            r.delivery.p50_ms,
            r.delivery.p99_ms,
            r.deliveries_per_server_cpu_sec,
            r.client_cpu_percent
        );
        let stop = r.lost > 0 || r.delivery.p99_ms > 200.0;
        report.saturate.push(r);
        if stop {
            break;
        }
    }

    // 3. echo baseline at the same delivery rates (one delivery per echoed message).
    // (Above ~48k echoes/s the one-core load generator, not the server, is the limit.)
    for &rate in a.rates.iter().filter(|r| runs(Phase::Echo) && **r * 3.0 <= 48_000.0) {
        let t = Target::echo(&a.server_cpus, a.ws_buffer)?;
        let r = scenario::echo(
            t.addr,
            t.pid,
            a.visitors.min(1000),
            rate * 3.0,
            Duration::from_secs_f64(a.step_secs),
            pad,
            a.ws_buffer,
        )
        .await?;
        eprintln!(
            "echo {:.0} msgs/s: p99 {:.2} ms, {:.0} deliveries/server-CPU-s",
            r.rate, r.latency.p99_ms, r.deliveries_per_server_cpu_sec
        );
        report.echo.push(r);
    }

    // 4. the knee again with the steady phase's connections (more sockets and conversations cost more per
    // message), then steady at half of it, then the same with 1 % slow consumers.
    let knee_rate = report.knee().map(|k| k.params.rate).unwrap_or(a.rates[0]);
    let steady_params = |rate: f64, slow: f64| {
        let v = a.steady_visitors;
        ChatParams {
            visitors: v,
            agents: agents_for(v),
            watchers: watchers_for(v).max(100),
            watchers_per_conv: 2,
            rate,
            duration_secs: a.step_secs,
            pad,
            slow_fraction: slow,
        }
    };
    for &rate in a.rates.iter().filter(|r| runs(Phase::Scale) && **r <= knee_rate) {
        let params = steady_params(rate, 0.0);
        let p = prepare(&a, "scale", params.agents, params.watchers)?;
        let r =
            scenario::chat(p.target.addr, p.target.pid, &p.tokens, params, a.ws_buffer).await.context("scale step")?;
        eprintln!(
            "saturate at scale {rate:.0} msgs/s, {} connections: p50 {:.2} p99 {:.2} ms, lost {}, {:.0} deliveries/server-CPU-s",
            r.connections, r.delivery.p50_ms, r.delivery.p99_ms, r.lost, r.deliveries_per_server_cpu_sec
        );
        let stop = r.lost > 0 || r.delivery.p99_ms > 50.0;
        report.saturate_at_scale.push(r);
        if stop {
            break;
        }
    }
    let rate = (report.knee_at_scale().map_or(knee_rate, |k| k.params.rate) / 2.0).max(10.0);
    let steady_phases = [(0.0, Phase::Steady), (0.01, Phase::Slow)];
    for slow in steady_phases.iter().filter(|(_, p)| runs(*p)).map(|(s, _)| *s) {
        let params = ChatParams { duration_secs: a.step_secs * 2.0, ..steady_params(rate, slow) };
        let p = prepare(&a, "steady", params.agents, params.watchers)?;
        let r = scenario::chat(p.target.addr, p.target.pid, &p.tokens, params, a.ws_buffer).await.context("steady")?;
        eprintln!(
            "steady (slow {:.0} %) {rate:.0} msgs/s, {} connections: p50 {:.2} p99 {:.2} p99.9 {:.2} ms, lost {}",
            slow * 100.0,
            r.connections,
            r.delivery.p50_ms,
            r.delivery.p99_ms,
            r.delivery.p999_ms,
            r.lost
        );
        if slow == 0.0 { report.steady = Some(r) } else { report.slow_consumers = Some(r) }
    }
    // 5. the measurement's own floor for P4: the bare echo server with the same client, as many connections
    // and the steady phase's deliveries per second.
    if let Some(st) = report.steady.as_ref().filter(|_| runs(Phase::Echo)) {
        let (conns, rate) = (st.connections, st.params.rate * (1 + st.params.watchers_per_conv) as f64);
        let t = Target::echo(&a.server_cpus, a.ws_buffer)?;
        let r =
            scenario::echo(t.addr, t.pid, conns, rate, Duration::from_secs_f64(a.step_secs), pad, a.ws_buffer).await?;
        eprintln!(
            "echo at scale {rate:.0} msgs/s, {conns} connections: p50 {:.2} p99 {:.2} p99.9 {:.2} ms",
            r.latency.p50_ms, r.latency.p99_ms, r.latency.p999_ms
        );
        report.echo_at_scale = Some(r);
    }

    report.write(&a.out)?;
    eprintln!("report: {}", a.out.join("report.md").display());
    if smoke {
        // The smoke run checks the tool, not the speed: everything sent must arrive exactly once.
        for r in report.saturate.iter().chain(&report.saturate_at_scale).chain(report.steady.iter()) {
            if r.sent == 0 || r.lost != 0 || r.duplicated != 0 || r.acked != r.sent {
                bail!("smoke chat run lost or duplicated messages: {r:?}");
            }
        }
        let h = report.hold.as_ref().context("the smoke run includes the hold phase")?;
        if h.connections != a.hold || h.errors != 0 {
            bail!("smoke hold run failed: {h:?}");
        }
        if report.echo.iter().any(|e| e.echoed != e.sent || e.sent == 0) {
            bail!("smoke echo run lost messages: {:?}", report.echo);
        }
    }
    Ok(())
}
