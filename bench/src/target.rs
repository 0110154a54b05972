//! The server under test: a `kefu-node` (or the bare echo server) child process pinned to its own CPUs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// A server child process, killed on drop.
pub struct Target {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub pid: u32,
    _dir: Option<TempDir>,
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn pinned(cpus: &str, program: &Path) -> Command {
    if !cpus.is_empty() && Command::new("taskset").arg("--version").output().is_ok() {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(cpus).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Node settings for load: no rate limits in the way, auto-assignment, a generous connection cap.
fn node_env(cmd: &mut Command, data: &Path, ws_buffer: usize) {
    cmd.env("KEFU_DEMO__ENABLED", "false")
        .env("KEFU_SERVER__TCP_LISTEN", "")
        .env("KEFU_LIMITS__FRAMES_PER_SEC", "100000")
        .env("KEFU_LIMITS__BURST", "100000")
        .env("KEFU_LIMITS__MAX_CONNECTIONS", "19900")
        .env("KEFU_LIMITS__OUTBOUND_QUEUE", "1024")
        .env("KEFU_LIMITS__WS_BUFFER_BYTES", ws_buffer.to_string())
        .env("KEFU_ROUTING__AUTO_ACCEPT", "true")
        .env("KEFU_ROUTING__STRATEGY", "least-loaded")
        .env("KEFU_SERVER__IDLE_TIMEOUT_SECS", "600")
        .env("KEFU_LOG__LEVEL", "warn,kefu_node::server=info")
        .env_remove("RUST_LOG")
        .arg("--data-dir")
        .arg(data);
}

/// Register an agent with the CLI (before the node starts) and return its token.
pub fn add_agent(bin: &Path, data: &Path, id: &str, capacity: u32, admin: bool) -> anyhow::Result<String> {
    let mut cmd = Command::new(bin);
    node_env(&mut cmd, data, 4096);
    cmd.args(["agent", "add", "--id", id, "--name", id, "--capacity", &capacity.to_string()]);
    if admin {
        cmd.arg("--admin");
    }
    let out = cmd.output().context("run kefu-node agent add")?;
    if !out.status.success() {
        bail!("agent add failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// A fresh data directory.
pub fn scratch_dir(tag: &str) -> anyhow::Result<TempDir> {
    let dir = std::env::temp_dir().join(format!("kefu-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(TempDir(dir))
}

impl Target {
    /// Start `kefu-node serve` on a free port with `data` (agents already added).
    pub fn node(bin: &Path, data: TempDir, cpus: &str, ws_buffer: usize) -> anyhow::Result<Target> {
        let mut cmd = pinned(cpus, bin);
        node_env(&mut cmd, &data.0, ws_buffer);
        cmd.arg("--listen").arg("127.0.0.1:0").arg("serve");
        let mut t = spawn(cmd, "kefu-node listening", "http_addr=")?;
        t._dir = Some(data);
        Ok(t)
    }

    /// Start the bare echo server (this binary's `echo-server` subcommand).
    pub fn echo(cpus: &str, ws_buffer: usize) -> anyhow::Result<Target> {
        let me = std::env::current_exe()?;
        let mut cmd = pinned(cpus, &me);
        cmd.args(["echo-server", "--listen", "127.0.0.1:0", "--ws-buffer", &ws_buffer.to_string()]);
        spawn(cmd, "echo listening", "addr=")
    }
}

fn spawn(mut cmd: Command, marker: &str, key: &str) -> anyhow::Result<Target> {
    let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::piped()).spawn().context("spawn server")?;
    let stderr = child.stderr.take().context("stderr")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    for pipe in [Box::new(stderr) as Box<dyn std::io::Read + Send>, Box::new(stdout)] {
        let tx = tx.clone();
        let marker = marker.to_owned();
        let key = key.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if line.contains(&marker) {
                    if let Some(addr) = line.split(&key).nth(1).and_then(|s| s.split_whitespace().next()) {
                        let _ = tx.send(addr.to_owned());
                    }
                } else if line.contains("ERROR") || line.contains("WARN") {
                    eprintln!("[server] {line}");
                }
            }
        });
    }
    let addr = rx.recv_timeout(Duration::from_secs(30)).context("server did not report its address")?;
    // taskset execs the program, so the child pid is the server's pid.
    let pid = child.id();
    Ok(Target { child: Some(child), addr: addr.parse()?, pid, _dir: None })
}
