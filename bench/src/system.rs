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

/// `GET /metrics` from a node (Prometheus text format), over a plain blocking socket: the bench needs one
/// request per phase, not an HTTP client.
pub fn scrape_metrics(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let (head, rest) = body.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("no HTTP header end"))?;
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!("/metrics answered {}", head.lines().next().unwrap_or(""));
    }
    Ok(rest.to_owned())
}

/// Cumulative buckets `(le, count)` of one Prometheus histogram series, picked by metric name and a label
/// fragment (e.g. `store="wal"`; empty for an unlabelled histogram).
pub fn histogram_buckets(text: &str, name: &str, label: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            let n = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, n))
        })
        .collect()
}

/// Quantiles of what a histogram counted between two scrapes, as bucket upper bounds in milliseconds
/// (an upper bound: the true value lies in the bucket below it). `None` if nothing was counted.
pub fn bucket_quantiles(before: &[(f64, u64)], after: &[(f64, u64)], qs: &[f64]) -> Option<Vec<f64>> {
    let delta: Vec<(f64, u64)> =
        after.iter().map(|&(le, n)| (le, n - before.iter().find(|b| b.0 == le).map_or(0, |b| b.1).min(n))).collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    Some(
        qs.iter()
            .map(|q| {
                let want = (q * total as f64).ceil() as u64;
                delta.iter().find(|(_, n)| *n >= want).map_or(f64::INFINITY, |(le, _)| le * 1000.0)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str =
        "kefu_x_bucket{le=\"0.001\"} 10\nkefu_x_bucket{le=\"0.005\"} 10\nkefu_x_bucket{le=\"+Inf\"} 10\n";
    const AFTER: &str =
        "kefu_x_bucket{le=\"0.001\"} 100\nkefu_x_bucket{le=\"0.005\"} 109\nkefu_x_bucket{le=\"+Inf\"} 110\n";

    #[test]
    fn quantiles_count_only_what_happened_between_scrapes() {
        let (b, a) = (histogram_buckets(BEFORE, "kefu_x", ""), histogram_buckets(AFTER, "kefu_x", ""));
        assert_eq!(a, vec![(0.001, 100), (0.005, 109), (f64::INFINITY, 110)]);
        // 100 new observations: 90 ≤ 1 ms, 9 ≤ 5 ms, 1 beyond.
        let q = bucket_quantiles(&b, &a, &[0.5, 0.9, 0.99, 1.0]).unwrap();
        assert_eq!(q, vec![1.0, 1.0, 5.0, f64::INFINITY]);
        assert_eq!(bucket_quantiles(&a, &a, &[0.5]), None);
    }

    #[test]
    fn labelled_series_are_picked_by_label() {
        let t = "h_bucket{store=\"index\",le=\"1\"} 3\nh_bucket{store=\"wal\",le=\"1\"} 7\n";
        assert_eq!(histogram_buckets(t, "h", "store=\"wal\""), vec![(1.0, 7)]);
    }
}
