//! Test support: start real nodes on port 0 and talk to them with real WebSocket and TCP clients.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use kefu_node::Config;
use kefu_node::engine::Command;
use kefu_node::model::Agent;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(10);

/// A node running in this process, with its data directory.
pub struct TestNode {
    pub node: kefu_node::RunningNode,
    pub dir: tempfile::TempDir,
}

impl TestNode {
    pub async fn start() -> TestNode {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestNode {
        Self::start_in(tempfile::tempdir().expect("tempdir"), tweak).await
    }

    /// Start on an existing data directory (a restart: same secret, so tokens stay valid).
    /// In-process, the previous node's store is released only when its last task lets go of it (a real
    /// restart is a new process), so a `StoreLocked` start is retried for a while.
    pub async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> TestNode {
        let mut cfg = Config::for_test(dir.path());
        tweak(&mut cfg);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match kefu_node::start(cfg.clone()).await {
                Ok(node) => return TestNode { node, dir },
                Err(kefu_node::Error::StoreLocked(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("node starts: {e}"),
            }
        }
    }

    pub fn http(&self) -> SocketAddr {
        self.node.http_addr
    }

    /// Register an agent through the engine and return its token.
    pub async fn agent(&self, id: &str, skills: &[&str], capacity: u32) -> String {
        let agent = Agent {
            id: id.into(),
            name: format!("Agent {id}"),
            skills: skills.iter().map(|s| s.to_string()).collect(),
            capacity,
            admin: id.starts_with("admin"),
            token_epoch: 0,
        };
        let token = self.node.ctx.auth.agent_token(&agent);
        self.node
            .ctx
            .engine
            .ask(|reply| Command::PutAgent { agent, reply })
            .await
            .expect("engine")
            .expect("agent saved");
        token
    }

    /// Wait (up to 10 s) until the engine has seen every connection of agent `id` go: a closed socket is
    /// noticed asynchronously, and a test that sends to an offline agent must not race that.
    pub async fn wait_agent_offline(&self, id: &str) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let agents = self.node.ctx.engine.ask(|reply| Command::Agents { reply }).await.expect("engine");
            if agents.iter().any(|a| a.id == id && a.status == kefu_node::model::AgentStatus::Offline) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "agent {id} still online 10 s after closing");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    pub async fn shutdown(self) -> tempfile::TempDir {
        self.node.shutdown().await;
        self.dir
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

enum Transport {
    Ws(Box<Ws>),
    Tcp { reader: BufReader<tokio::net::tcp::OwnedReadHalf>, writer: tokio::net::tcp::OwnedWriteHalf },
}

/// A protocol client over WebSocket or raw TCP.
pub struct Client {
    t: Transport,
    buffered: VecDeque<Value>,
    pub welcome: Value,
    n: u64,
}

impl Client {
    pub async fn ws(addr: SocketAddr, path: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}")).await.expect("ws connect");
        Client { t: Transport::Ws(Box::new(ws)), buffered: VecDeque::new(), welcome: Value::Null, n: 0 }
    }

    pub async fn tcp(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).await.expect("tcp connect");
        let (r, w) = s.into_split();
        Client {
            t: Transport::Tcp { reader: BufReader::new(r), writer: w },
            buffered: VecDeque::new(),
            welcome: Value::Null,
            n: 0,
        }
    }

    /// Connect a visitor and complete hello → welcome.
    pub async fn visitor(addr: SocketAddr, hello: Value) -> Client {
        let mut c = Client::ws(addr, "/ws/visitor").await;
        c.hello(hello).await;
        c
    }

    pub async fn agent(addr: SocketAddr, token: &str) -> Client {
        let mut c = Client::ws(addr, "/ws/agent").await;
        c.hello(json!({ "token": token })).await;
        c
    }

    pub async fn hello(&mut self, mut hello: Value) -> Value {
        hello["type"] = json!("hello");
        self.send(hello).await;
        let w = self.recv().await;
        assert_eq!(w["type"], "welcome", "expected welcome, got {w}");
        self.welcome = w.clone();
        w
    }

    pub fn id(&self) -> String {
        self.welcome["id"].as_str().unwrap_or_default().to_owned()
    }

    pub fn token(&self) -> Option<String> {
        self.welcome["token"].as_str().map(str::to_owned)
    }

    pub fn next_id(&mut self) -> String {
        self.n += 1;
        format!("f{}-{}", self.n, rand::random::<u32>())
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        match &mut self.t {
            Transport::Ws(ws) => ws.send(Message::Text(text.into())).await.expect("ws send"),
            Transport::Tcp { writer, .. } => {
                writer.write_all(format!("{text}\n").as_bytes()).await.expect("tcp send");
            }
        }
    }

    pub async fn send_raw(&mut self, msg: Message) {
        if let Transport::Ws(ws) = &mut self.t {
            ws.send(msg).await.expect("ws send");
        }
    }

    /// Next frame from the server, or `None` when the connection closed.
    pub async fn try_recv(&mut self) -> Option<Value> {
        if let Some(v) = self.buffered.pop_front() {
            return Some(v);
        }
        loop {
            match &mut self.t {
                Transport::Ws(ws) => match ws.next().await {
                    Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).expect("server sends JSON")),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                    Some(Ok(_)) => continue,
                },
                Transport::Tcp { reader, .. } => {
                    let mut line = String::new();
                    match reader.read_line(&mut line).await {
                        Ok(0) | Err(_) => return None,
                        Ok(_) => return Some(serde_json::from_str(line.trim()).expect("server sends JSON")),
                    }
                }
            }
        }
    }

    pub async fn recv(&mut self) -> Value {
        tokio::time::timeout(WAIT, self.try_recv()).await.expect("frame within timeout").expect("connection open")
    }

    /// Read until a frame matches; frames skipped on the way are kept for later `recv`s.
    pub async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut skipped = VecDeque::new();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let v = match self.buffered.pop_front() {
                    Some(v) => v,
                    None => match self.try_recv().await {
                        Some(v) => v,
                        None => return None,
                    },
                };
                if pred(&v) {
                    return Some(v);
                }
                skipped.push_back(v);
            }
        })
        .await;
        let skipped_text: Vec<String> = skipped.iter().map(|v| v.to_string()).collect();
        skipped.extend(self.buffered.drain(..));
        self.buffered = skipped;
        match found {
            Ok(Some(v)) => v,
            Ok(None) => panic!("connection closed while waiting for {what}; saw {skipped_text:?}"),
            Err(_) => panic!("timed out waiting for {what}; saw {skipped_text:?}"),
        }
    }

    pub async fn expect_type(&mut self, ty: &str) -> Value {
        let t = ty.to_owned();
        self.expect(ty, move |v| v["type"] == t.as_str()).await
    }

    pub async fn expect_error(&mut self, code: &str) -> Value {
        let c = code.to_owned();
        self.expect(&format!("error {code}"), move |v| v["type"] == "error" && v["code"] == c.as_str()).await
    }

    /// Send a text message and wait for its ack; returns the seq.
    pub async fn say(&mut self, conv: &str, text: &str) -> u64 {
        let id = self.next_id();
        self.send(json!({"type": "send", "id": id, "conv": conv, "text": text})).await;
        let ack = self.expect(&format!("ack {id}"), |v| v["type"] == "ack" && v["id"] == id.as_str()).await;
        ack["seq"].as_u64().expect("ack has seq")
    }

    /// Open a conversation; returns its id.
    pub async fn open(&mut self, skills: &[&str]) -> String {
        let id = self.next_id();
        self.send(json!({"type": "open", "id": id, "skills": skills})).await;
        let ack = self.expect("open ack", |v| v["type"] == "ack" && v["id"] == id.as_str()).await;
        ack["conv"].as_str().expect("conv").to_owned()
    }

    /// Wait for an offer and accept it; returns the conversation id.
    pub async fn accept_next_offer(&mut self) -> String {
        let offer = self.expect_type("offer").await;
        let conv = offer["conv"]["id"].as_str().expect("offer conv").to_owned();
        let id = self.next_id();
        self.send(json!({"type": "accept", "id": id, "conv": conv})).await;
        self.expect("accept ack", |v| v["type"] == "ack" && v["id"] == id.as_str()).await;
        conv
    }

    /// Receive `msg` frames of `conv` until `count` message entries arrived; returns their texts.
    pub async fn messages(&mut self, conv: &str, count: usize) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        while out.len() < count {
            let c = conv.to_owned();
            let v = self.expect("msg", move |v| v["type"] == "msg" && v["conv"] == c.as_str()).await;
            if v["entry"]["kind"] == "message" {
                out.push((
                    v["entry"]["seq"].as_u64().unwrap_or(0),
                    v["entry"]["text"].as_str().unwrap_or("").to_owned(),
                ));
            }
        }
        out
    }

    /// Forget frames kept by `expect` (they preceded what it found).
    pub fn clear_buffer(&mut self) {
        self.buffered.clear();
    }

    pub async fn close_socket(self) {
        match self.t {
            Transport::Ws(mut ws) => {
                let _ = ws.as_mut().close(None).await;
            }
            Transport::Tcp { mut writer, .. } => {
                let _ = writer.shutdown().await;
            }
        }
    }
}

/// Minimal HTTP/1.1 GET/POST for REST and health checks (no client crate needed).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.expect("http connect");
    let body_text = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body_text.is_empty() {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body_text.len()));
    }
    req.push_str("\r\n");
    req.push_str(&body_text);
    s.write_all(req.as_bytes()).await.expect("http write");
    let mut buf = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf).await.expect("http read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    // Chunked bodies: take the JSON between the first '{' and the last '}'.
    let json = match (body.find(['{', '[']), body.rfind(['}', ']'])) {
        (Some(a), Some(b)) if b >= a => serde_json::from_str(&body[a..=b]).unwrap_or(Value::String(body.to_owned())),
        _ => Value::String(body.to_owned()),
    };
    (status, json)
}
