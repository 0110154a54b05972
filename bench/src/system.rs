//! What the benchmark reads off the machine: process CPU time and RSS from /proc, kernel slab, and the
//! environment block every report carries.

use std::path::Path;

use serde::Serialize;

/// Clock ticks per second for /proc/<pid>/stat (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|x| x.1) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let stime: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (utime + stime) / TICKS_PER_SEC
}

/// CPU seconds of this process.
pub fn self_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id())
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS:")
}

fn status_field(pid: u32, name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// Kernel slab memory (all of it: sockets live there), in KiB.
pub fn slab_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Slab:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The environment block of a report.
#[derive(Debug, Clone, Serialize)]
pub struct Environment {
    pub date_utc: String,
    pub git_sha: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
    pub mem_total_kib: u64,
    pub nofile_limit: String,
    pub somaxconn: String,
    pub tcp_rmem: String,
    pub tcp_wmem: String,
    pub ip_local_port_range: String,
    pub node_binary: String,
    pub profile: String,
    pub server_cpus: String,
    pub client_cpus: String,
    pub ws_buffer_bytes: usize,
    pub crates: String,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.split_whitespace().collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

fn cmd(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

impl Environment {
    pub fn capture(node_binary: &Path, server_cpus: &str, client_cpus: &str, ws_buffer_bytes: usize) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|x| x.1.trim().to_owned())
            .unwrap_or_default();
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let nofile = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or("").to_owned();
        Environment {
            date_utc: cmd("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
            git_sha: cmd("git", &["rev-parse", "--short", "HEAD"]),
            cpu_model,
            // The machine's CPUs, not this (pinned) process's affinity.
            cpus: cpuinfo.lines().filter(|l| l.starts_with("processor")).count().max(1),
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            mem_total_kib: std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
                .unwrap_or(0),
            nofile_limit: nofile.split_whitespace().skip(3).take(2).collect::<Vec<_>>().join(" "),
            somaxconn: read_trim("/proc/sys/net/core/somaxconn"),
            tcp_rmem: read_trim("/proc/sys/net/ipv4/tcp_rmem"),
            tcp_wmem: read_trim("/proc/sys/net/ipv4/tcp_wmem"),
            ip_local_port_range: read_trim("/proc/sys/net/ipv4/ip_local_port_range"),
            node_binary: node_binary.display().to_string(),
            profile: if node_binary.to_string_lossy().contains("/release/") { "release" } else { "debug" }.into(),
            server_cpus: server_cpus.into(),
            client_cpus: client_cpus.into(),
            ws_buffer_bytes,
            crates: "tokio 1, axum 0.8 (tungstenite 0.29), redb 2, tokio-tungstenite 0.29 (client), hdrhistogram 7"
                .into(),
        }
    }
}
