//! Engine tests that need to hold the offline inbox still: the inbox task is played by the test, so what the
//! engine does while a drain is outstanding can be observed (from outside, the drain takes microseconds).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::conn::Closer;
use crate::protocol::parse_client_frame;
use crate::store::WriterOptions;

struct Harness {
    engine: EngineHandle,
    inbox: mpsc::UnboundedReceiver<InboxCmd>,
    next_conn: ConnId,
    _dir: tempfile::TempDir,
}

/// One test connection: the engine's outbound queue, read as JSON.
struct TestConn {
    id: ConnId,
    out: mpsc::Receiver<Out>,
    closer: Arc<Closer>,
}

impl TestConn {
    /// Frames queued so far.
    fn queued(&mut self) -> Vec<Value> {
        let mut v = Vec::new();
        while let Ok(out) = self.out.try_recv() {
            v.push(serde_json::from_str(&out).unwrap());
        }
        v
    }

    async fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let wait = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let out = self.out.recv().await.expect("connection queue open");
                let v: Value = serde_json::from_str(&out).unwrap();
                if pred(&v) {
                    return v;
                }
            }
        });
        wait.await.unwrap_or_else(|_| panic!("no {what} within 5 s"))
    }
}

impl Harness {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::for_test(dir.path());
        tweak(&mut cfg);
        let metrics = Metrics::new();
        let store = Store::open(dir.path()).unwrap();
        let (durable_tx, durable_rx) = mpsc::unbounded_channel();
        let writer = store
            .spawn_writer(
                durable_tx,
                WriterOptions {
                    commit_interval: Duration::from_micros(cfg.data.commit_interval_us),
                    index_interval: Duration::from_millis(cfg.data.index_interval_ms),
                    commit_seconds: metrics.store_commit.with_label_values(&["wal"]),
                    index_seconds: metrics.store_commit.with_label_values(&["index"]),
                    unindexed: metrics.unindexed_ops.clone(),
                },
            )
            .unwrap();
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        let (engine, _task) = Engine::start(EngineParts {
            filter: crate::filter::WordFilter::new(&[], cfg.filter.mode).unwrap(),
            cfg,
            metrics,
            store,
            writer,
            durable: durable_rx,
            ownership: Arc::new(crate::ownership::LocalOwnership),
            inbox: Some(inbox_tx),
        })
        .unwrap();
        Harness { engine, inbox, next_conn: 1, _dir: dir }
    }

    async fn connect(&mut self, principal: Principal) -> TestConn {
        let id = self.next_conn;
        self.next_conn += 1;
        let (tx, out) = mpsc::channel(256);
        let closer = Arc::new(Closer::default());
        let conn = Conn { id, out: tx, closer: closer.clone() };
        self.engine
            .ask(|reply| Command::Connect { conn, principal, resume: Vec::new(), reply })
            .await
            .unwrap()
            .unwrap();
        TestConn { id, out, closer }
    }

    /// The next inbox command, skipping puts.
    async fn next_take(&mut self) -> (String, ConnId) {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.inbox.recv()).await.unwrap().unwrap() {
                InboxCmd::Take { recipient, conn } => return (recipient, conn),
                InboxCmd::Put { .. } => {}
            }
        }
    }

    /// Puts until one carries an entry with client id `id`.
    async fn put_of(&mut self, id: &str) -> (String, Vec<(String, Entry)>) {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.inbox.recv()).await.unwrap().unwrap() {
                InboxCmd::Put { recipient, items } if items.iter().any(|(_, e)| e.id == id) => {
                    return (recipient, items);
                }
                _ => {}
            }
        }
    }

    async fn drained(&self, conn: ConnId, items: Vec<(String, Entry)>) {
        self.engine.send(Command::InboxDrained { conn, items }).await.unwrap();
    }

    async fn frame(&self, conn: &TestConn, json: &str) {
        let frame = parse_client_frame(json).unwrap();
        self.engine.send(Command::Frame { conn: conn.id, frame, at: Instant::now() }).await.unwrap();
    }
}

fn acked(id: &str) -> impl Fn(&Value) -> bool + '_ {
    move |v| v["type"] == "ack" && v["id"] == id
}

fn agent() -> Principal {
    Principal::Agent { id: "alice".into(), epoch: 0 }
}

/// A visitor in a conversation assigned to agent `alice`, who has then left (so the next message for her goes
/// to the inbox). Returns the visitor's connection and the conversation id.
async fn chat_with_agent_away(h: &mut Harness) -> (TestConn, String) {
    let alice = Agent {
        id: "alice".into(),
        name: "Alice".into(),
        skills: Vec::new(),
        capacity: 2,
        admin: false,
        token_epoch: 0,
    };
    h.engine.ask(|reply| Command::PutAgent { agent: alice, reply }).await.unwrap().unwrap();
    // A visitor and the agent, each with an (empty) inbox drained at connect.
    let mut v = h.connect(Principal::Visitor { id: "v_1".into(), name: None, token: None }).await;
    let (_, conn) = h.next_take().await;
    h.drained(conn, Vec::new()).await;
    let mut a1 = h.connect(agent()).await;
    let (_, conn) = h.next_take().await;
    h.drained(conn, Vec::new()).await;
    h.frame(&v, r#"{"type":"open","id":"o1","skills":[]}"#).await;
    let conv = v.until("open ack", acked("o1")).await["conv"].as_str().unwrap().to_owned();
    a1.until("offer", |f| f["type"] == "offer").await;
    h.frame(&a1, &format!(r#"{{"type":"accept","id":"a1","conv":"{conv}"}}"#)).await;
    a1.until("accept ack", acked("a1")).await;
    h.engine.send(Command::Disconnect { conn: a1.id }).await.unwrap();
    (v, conv)
}

async fn say(h: &Harness, v: &mut TestConn, conv: &str, id: &str) -> u64 {
    h.frame(v, &format!(r#"{{"type":"send","id":"{id}","conv":"{conv}","text":"text of {id}"}}"#)).await;
    v.until("ack", acked(id)).await["seq"].as_u64().unwrap()
}

#[tokio::test]
async fn live_messages_wait_behind_the_offline_inbox_replay() {
    let mut h = Harness::start(|_| {}).await;
    let (mut v, conv) = chat_with_agent_away(&mut h).await;
    // A message for the absent agent goes to the inbox.
    let s1 = say(&h, &mut v, &conv, "m1").await;
    let (recipient, items) = h.put_of("m1").await;
    assert_eq!(recipient, "agent:alice");

    // The agent is back; the inbox read is still outstanding when the next message is durable.
    let mut a2 = h.connect(agent()).await;
    let (recipient, conn) = h.next_take().await;
    assert_eq!((recipient.as_str(), conn), ("agent:alice", a2.id));
    let s2 = say(&h, &mut v, &conv, "m2").await;
    let early: Vec<Value> = a2.queued();
    assert!(early.iter().all(|f| f["type"] != "msg"), "a live message overtook the inbox replay: {early:?}");

    // The drain lands: the replay first, then the live message that waited.
    h.drained(a2.id, items).await;
    let replay = a2.until("replay", |f| f["type"] == "replay" || f["type"] == "msg").await;
    assert_eq!(replay["type"], "replay", "{replay}");
    let seqs: Vec<u64> = replay["entries"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![s1]);
    let live = a2.until("msg", |f| f["type"] == "msg").await;
    assert_eq!(live["entry"]["seq"].as_u64(), Some(s2));
    h.engine.ask(|reply| Command::Shutdown { reply }).await.unwrap();
}

#[tokio::test]
async fn a_connection_whose_inbox_read_stalls_is_closed_once_its_hold_fills() {
    let mut h = Harness::start(|c| c.limits.outbound_queue = 8).await;
    let (mut v, conv) = chat_with_agent_away(&mut h).await;
    let mut a2 = h.connect(agent()).await;
    let (_, conn) = h.next_take().await;
    assert_eq!(conn, a2.id);
    // The inbox read never answers; live traffic for the agent is held, up to the outbound queue's size.
    for i in 0..8 {
        say(&h, &mut v, &conv, &format!("m{i}")).await;
        assert!(!a2.closer.is_closed(), "closed after only {} held messages", i + 1);
    }
    say(&h, &mut v, &conv, "m8").await;
    assert!(a2.closer.is_closed(), "a full hold closes the connection as a slow consumer");
    assert!(a2.queued().iter().all(|f| f["type"] != "msg"), "nothing overtook the replay");
    // The engine let go of it: the agent is away again, so the next message goes to her inbox.
    say(&h, &mut v, &conv, "m9").await;
    let (recipient, _) = h.put_of("m9").await;
    assert_eq!(recipient, "agent:alice");
    h.engine.ask(|reply| Command::Shutdown { reply }).await.unwrap();
}
