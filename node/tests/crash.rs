//! The real `kefu-node` binary as a child process: `kill -9` under traffic loses no acked entry,
//! SIGTERM drains gracefully, and bad configuration is refused with the field named.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, http};

const BIN: &str = env!("CARGO_BIN_EXE_kefu-node");

/// A node child process, killed when dropped (also when a test fails half-way).
struct Proc {
    child: Option<Child>,
    http: SocketAddr,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Wait for the process to exit on its own.
    fn wait(mut self) -> std::process::ExitStatus {
        self.child.take().unwrap().wait().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn base_cmd(data: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--data-dir")
        .arg(data)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env("KEFU_SERVER__TCP_LISTEN", "127.0.0.1:0")
        .env("KEFU_DEMO__ENABLED", "false")
        .env("KEFU_LIMITS__BURST", "1000")
        .env("KEFU_LIMITS__FRAMES_PER_SEC", "1000")
        .env("KEFU_SERVER__SHUTDOWN_GRACE_SECS", "3")
        .env_remove("RUST_LOG");
    c
}

fn spawn(data: &Path) -> Proc {
    let mut child =
        base_cmd(data).arg("serve").stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("spawn node");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.contains("kefu-node listening") {
                let addr =
                    line.split("http_addr=").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().to_owned();
                let _ = tx.send(addr);
                sent = true;
            }
            if std::env::var("KEFU_TEST_LOG").is_ok() {
                eprintln!("[node] {line}");
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(30)).expect("node prints its address");
    Proc { child: Some(child), http: addr.parse().unwrap() }
}

fn agent_add(data: &Path, id: &str, capacity: u32) -> String {
    let out = base_cmd(data)
        .args(["agent", "add", "--id", id, "--name", &format!("Agent {id}"), "--capacity", &capacity.to_string()])
        .output()
        .expect("agent add");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Send without panicking when the node dies; returns the acked seq, or None if the connection dropped.
async fn try_say(c: &mut Client, conv: &str, id: &str, text: &str) -> Option<u64> {
    c.send_text(&json!({"type": "send", "id": id, "conv": conv, "text": text}).to_string()).await;
    loop {
        let v = tokio::time::timeout(Duration::from_secs(5), c.try_recv()).await.ok()??;
        if v["type"] == "ack" && v["id"] == id {
            return v["seq"].as_u64();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_traffic_loses_no_acked_entry() {
    let dir = tempfile::tempdir().unwrap();
    let token = agent_add(dir.path(), "alice", 3);
    let node = spawn(dir.path());
    let mut agent = Client::agent(node.http, &token).await;

    // Three assigned conversations, one more waiting in the queue (alice is full).
    let mut visitors = Vec::new();
    for _ in 0..3 {
        let mut v = Client::visitor(node.http, json!({})).await;
        let conv = v.open(&[]).await;
        agent.accept_next_offer().await;
        visitors.push((v, conv));
    }
    let mut waiting = Client::visitor(node.http, json!({})).await;
    let waiting_conv = waiting.open(&[]).await;
    // A read cursor that must survive the crash.
    let (v0, c0) = &mut visitors[0];
    let s = v0.say(c0, "before crash").await;
    v0.send(json!({"type": "read", "conv": c0, "seq": s})).await;
    tokio::time::sleep(Duration::from_millis(400)).await;

    // Traffic: each visitor sends as fast as acks come back; the node is killed mid-stream.
    let mut tasks = Vec::new();
    for (i, (mut v, conv)) in visitors.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut acked: Vec<(u64, String, String)> = Vec::new();
            for n in 0.. {
                let id = format!("v{i}-{n}");
                let text = format!("visitor {i} message {n}");
                match try_say(&mut v, &conv, &id, &text).await {
                    Some(seq) => acked.push((seq, id, text)),
                    None => break,
                }
            }
            (conv, v.token().unwrap(), acked)
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let pid = node.pid();
    let status = Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(status.success());
    node.wait();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let total: usize = results.iter().map(|r| r.2.len()).sum();
    assert!(total > 10, "the crash must interrupt real traffic (only {total} acked)");

    // Restart on the same data dir.
    let node = spawn(dir.path());
    for (conv, vtoken, acked) in &results {
        let mut entries: Vec<Value> = Vec::new();
        loop {
            let path = format!("/api/conversations/{conv}/entries?limit=1000&after={}", entries.len());
            let (status, body) = http(node.http, "GET", &path, Some(&token), None).await;
            assert_eq!(status, 200, "{body}");
            let page = body["entries"].as_array().unwrap();
            if page.is_empty() {
                break;
            }
            entries.extend(page.iter().cloned());
        }
        let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "dense, ordered log after crash");
        let max_acked = acked.iter().map(|a| a.0).max().unwrap_or(0);
        assert!(entries.len() as u64 >= max_acked, "{} entries stored, acked up to {max_acked}", entries.len());
        for (seq, id, text) in acked {
            let e: &Value = &entries[(*seq - 1) as usize];
            assert_eq!(
                (e["id"].as_str(), e["text"].as_str()),
                (Some(id.as_str()), Some(text.as_str())),
                "acked entry {seq} survived"
            );
        }
        // Idempotency survived too: retrying the last acked id returns its original seq.
        if let Some((seq, id, text)) = acked.last() {
            let mut v = Client::visitor(node.http, json!({"token": vtoken})).await;
            assert_eq!(try_say(&mut v, conv, id, text).await, Some(*seq));
        }
    }
    // Assignments, queue and cursors were recovered.
    let (_, body) = http(node.http, "GET", "/api/conversations?state=assigned", Some(&token), None).await;
    assert_eq!(body["conversations"].as_array().unwrap().len(), 3);
    let (_, body) = http(node.http, "GET", "/api/conversations?state=queued", Some(&token), None).await;
    assert_eq!(body["conversations"][0]["id"], waiting_conv.as_str());
    let (_, body) = http(node.http, "GET", &format!("/api/conversations/{}", results[0].0), Some(&token), None).await;
    assert_eq!(body["cursors"].as_object().unwrap().values().next().and_then(Value::as_u64), Some(s));
    let agent = Client::agent(node.http, &token).await;
    assert_eq!(agent.welcome["conversations"].as_array().unwrap().len(), 3, "alice still holds her three");
    drop(waiting);
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_tells_clients_to_reconnect_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let token = agent_add(dir.path(), "alice", 3);
    let node = spawn(dir.path());
    let mut agent = Client::agent(node.http, &token).await;
    let mut visitor = Client::visitor(node.http, json!({})).await;
    let conv = visitor.open(&[]).await;
    agent.accept_next_offer().await;
    let seq = visitor.say(&conv, "hi").await;
    let status = Command::new("kill").args(["-TERM", &node.pid().to_string()]).status().unwrap();
    assert!(status.success());
    let r = visitor.expect_type("reconnect").await;
    assert!(r["retry_after_ms"].as_u64().is_some());
    visitor.clear_buffer();
    let after = tokio::time::timeout(Duration::from_secs(5), visitor.try_recv()).await.expect("closed in time");
    assert!(after.is_none(), "socket closed after reconnect frame, got {after:?}");
    let exit = tokio::task::spawn_blocking(move || node.wait()).await.unwrap();
    assert!(exit.success(), "clean exit on SIGTERM: {exit:?}");
    // Nothing lost across the graceful restart.
    let node = spawn(dir.path());
    let (_, body) = http(node.http, "GET", &format!("/api/conversations/{conv}/entries"), Some(&token), None).await;
    assert_eq!(body["last_seq"], seq);
    drop(node);
}

#[test]
fn invalid_config_exits_non_zero_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[routing]\nstrategy = \"random\"\n", "routing.strategy"),
        ("[limits]\nmax_frame_bytes = 1\n", "limits.max_frame_bytes"),
        ("[server]\nlisten = \"nonsense\"\n", "server.listen"),
        ("[limits]\nno_such_key = 1\n", "no_such_key"),
        ("[identity]\nenforce = true\n", "identity.enforce"),
        ("this is not toml", "config.toml"),
    ];
    for (text, field) in cases {
        let f = dir.path().join("config.toml");
        std::fs::write(&f, text).unwrap();
        let out = Command::new(BIN).arg("--config").arg(&f).arg("print-config").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text:?} must be refused");
        assert!(err.contains(field), "error for {text:?} names {field}: {err}");
    }
    // An env override with a bad value is refused the same way.
    let out = Command::new(BIN).env("KEFU_ROUTING__OFFER_TIMEOUT_SECS", "soon").arg("print-config").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("routing.offer_timeout_secs"));
}

#[test]
fn print_config_prints_effective_defaults_that_load_back() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN).env("KEFU_ROUTING__STRATEGY", "round-robin").arg("print-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("strategy = \"round-robin\""), "{text}");
    assert!(text.contains("listen = \"127.0.0.1:8080\""), "{text}");
    let f = dir.path().join("c.toml");
    std::fs::write(&f, &text).unwrap();
    let again = Command::new(BIN).arg("--config").arg(&f).arg("print-config").output().unwrap();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
}

#[test]
fn example_config_in_repo_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/kefu.toml");
    let out = Command::new(BIN).arg("--config").arg(example).arg("print-config").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn agent_cli_refuses_while_the_node_holds_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let first = agent_add(dir.path(), "alice", 2);
    assert_eq!(first.split('.').count(), 3, "prints a token");
    let node = spawn(dir.path());
    let out = base_cmd(dir.path()).args(["agent", "add", "--id", "bob", "--name", "Bob"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another kefu-node"));
    let bad = base_cmd(dir.path()).args(["agent", "token", "--id", "nobody"]).output().unwrap();
    assert!(!bad.status.success());
    drop(node);
    // Revocation: the old token stops working after `agent revoke`.
    let out = base_cmd(dir.path()).args(["agent", "revoke", "--id", "alice"]).output().unwrap();
    assert!(out.status.success());
    let new_token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let node = spawn(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = Client::ws(node.http, "/ws/agent").await;
        c.send(json!({"type": "hello", "token": first})).await;
        c.expect_error("unauthorized").await;
        let ok = Client::agent(node.http, &new_token).await;
        assert_eq!(ok.id(), "alice");
    });
    drop(node);
}
