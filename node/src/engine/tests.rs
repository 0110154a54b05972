//! Engine tests driven through its command channel, with connections as plain queues:
//! - the offline inbox is played by the test, so what the engine does while a drain is outstanding can be
//!   observed (from outside, the drain takes microseconds);
//! - randomised routing (seed printed; `KEFU_ROUTING_SEED` replays it) checks the assignment invariants on the
//!   engine's own view after every step.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::conn::Closer;
use crate::protocol::parse_client_frame;

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
        Self::start_inner(tweak, true).await
    }

    /// Without an offline inbox: connections are live at once (no drain to answer).
    async fn start_without_inbox(tweak: impl FnOnce(&mut Config)) -> Harness {
        Self::start_inner(tweak, false).await
    }

    async fn start_inner(tweak: impl FnOnce(&mut Config), with_inbox: bool) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::for_test(dir.path());
        tweak(&mut cfg);
        let metrics = Metrics::new();
        let store = Store::open(dir.path()).unwrap();
        let (durable_tx, durable_rx) = mpsc::unbounded_channel();
        let writer = store.spawn_writer(durable_tx, crate::server::writer_options(&cfg, &metrics)).unwrap();
        let (inbox_tx, inbox) = mpsc::unbounded_channel();
        let (engine, _task) = Engine::start(EngineParts {
            filter: crate::filter::WordFilter::new(&[], cfg.filter.mode).unwrap(),
            cfg,
            metrics,
            store,
            writer,
            durable: durable_rx,
            ownership: Arc::new(crate::ownership::LocalOwnership),
            inbox: with_inbox.then_some(inbox_tx),
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

/// Assignment invariants over the engine's own view: no agent over capacity (a capacity lowered below the
/// current load may only shrink it), a conversation with at most one agent, offers only to online agents
/// with a connection. `allowed` carries each agent's ceiling between calls.
fn check_assignments(views: &[AgentView], allowed: &mut HashMap<String, usize>, step: usize, op: &str) {
    let mut holder: HashMap<&str, &str> = HashMap::new();
    for a in views {
        let load = a.assigned.len() + a.offered.len();
        let ceiling = allowed.get(&a.id).copied().unwrap_or(a.capacity as usize).max(a.capacity as usize);
        assert!(load <= ceiling, "step {step} ({op}): {} holds {load} > {ceiling}: {a:?}", a.id);
        allowed.insert(a.id.clone(), load.max(a.capacity as usize).min(ceiling));
        if !a.offered.is_empty() {
            assert!(
                a.status == AgentStatus::Online && a.connections > 0,
                "step {step} ({op}): offer to an agent who cannot take it: {a:?}"
            );
        }
        for c in a.assigned.iter().chain(&a.offered) {
            if let Some(other) = holder.insert(c, &a.id) {
                panic!("step {step} ({op}): {c} held by both {other} and {}", a.id);
            }
        }
    }
}

#[tokio::test]
async fn random_routing_never_over_assigns_and_serves_everyone_at_the_end() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("KEFU_ROUTING_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("routing seed {seed} (KEFU_ROUTING_SEED={seed} replays its choices)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut h = Harness::start_without_inbox(|c| {
        c.limits.outbound_queue = 65536;
        c.routing.strategy = match seed % 3 {
            0 => crate::config::Strategy::SkillsRing,
            1 => crate::config::Strategy::RoundRobin,
            _ => crate::config::Strategy::LeastLoaded,
        };
    })
    .await;
    let agent_ids = ["ann", "bo", "cy"];
    let put = |id: &str, capacity: u32| Agent {
        id: id.into(),
        name: id.into(),
        skills: vec!["general".into()],
        capacity,
        admin: false,
        token_epoch: 0,
    };
    for id in agent_ids {
        h.engine.ask(|reply| Command::PutAgent { agent: put(id, 2), reply }).await.unwrap().unwrap();
    }
    let mut agents: HashMap<&str, Vec<TestConn>> = agent_ids.iter().map(|a| (*a, Vec::new())).collect();
    let mut visitors: Vec<(TestConn, Option<String>)> = Vec::new();
    for i in 0..8 {
        let p = Principal::Visitor { id: format!("v_{i}"), name: None, token: None };
        visitors.push((h.connect(p).await, None));
    }
    let mut allowed: HashMap<String, usize> = HashMap::new();
    let (mut peak_assigned, mut offers_seen) = (0, 0);
    let mut n = 0u32;
    let mut fid = || {
        n += 1;
        format!("f{n}")
    };
    for step in 0..400 {
        let who = agent_ids[rng.random_range(0..agent_ids.len())];
        let views = h.engine.ask(|reply| Command::Agents { reply }).await.unwrap();
        let me = views.iter().find(|a| a.id == who).unwrap().clone();
        let op: &str;
        match rng.random_range(0..100) {
            0..=19 => {
                op = "visitor opens";
                let v = rng.random_range(0..visitors.len());
                if visitors[v].1.is_none() {
                    let id = fid();
                    let skills = if rng.random_bool(0.5) { r#"["general"]"# } else { "[]" };
                    h.frame(&visitors[v].0, &format!(r#"{{"type":"open","id":"{id}","skills":{skills}}}"#)).await;
                    let ack = visitors[v].0.until("open ack", acked(&id)).await;
                    visitors[v].1 = ack["conv"].as_str().map(str::to_owned);
                }
            }
            20..=29 => {
                op = "visitor closes";
                let v = rng.random_range(0..visitors.len());
                if let Some(conv) = visitors[v].1.take() {
                    let id = fid();
                    h.frame(&visitors[v].0, &format!(r#"{{"type":"close","id":"{id}","conv":"{conv}"}}"#)).await;
                    visitors[v].0.until("close ack", |f| f["id"] == id.as_str()).await;
                }
            }
            30..=41 => {
                op = "agent connects";
                if agents[who].len() < 2 {
                    let c = h.connect(Principal::Agent { id: who.into(), epoch: 0 }).await;
                    agents.get_mut(who).unwrap().push(c);
                }
            }
            42..=49 => {
                op = "agent connection closes";
                if let Some(c) = agents.get_mut(who).unwrap().pop() {
                    h.engine.send(Command::Disconnect { conn: c.id }).await.unwrap();
                }
            }
            50..=69 => {
                op = "agent accepts";
                if let (Some(conv), Some(c)) = (me.offered.first(), agents[who].first()) {
                    h.frame(c, &format!(r#"{{"type":"accept","id":"{}","conv":"{conv}"}}"#, fid())).await;
                }
            }
            70..=76 => {
                op = "agent declines";
                if let (Some(conv), Some(c)) = (me.offered.first(), agents[who].first()) {
                    h.frame(c, &format!(r#"{{"type":"decline","id":"{}","conv":"{conv}"}}"#, fid())).await;
                }
            }
            77..=84 => {
                op = "agent goes away or comes back";
                if let Some(c) = agents[who].first() {
                    let status = if rng.random_bool(0.5) { "away" } else { "online" };
                    h.frame(c, &format!(r#"{{"type":"presence","status":"{status}"}}"#)).await;
                }
            }
            85..=91 => {
                op = "agent transfers";
                if let (Some(conv), Some(c)) = (me.assigned.first(), agents[who].first()) {
                    let target = if rng.random_bool(0.5) {
                        format!(r#""to_agent":"{}""#, agent_ids[rng.random_range(0..agent_ids.len())])
                    } else {
                        r#""to_skill":"general""#.to_owned()
                    };
                    h.frame(c, &format!(r#"{{"type":"transfer","id":"{}","conv":"{conv}",{target}}}"#, fid())).await;
                }
            }
            _ => {
                op = "admin changes capacity";
                let capacity = rng.random_range(0..4);
                h.engine.ask(|reply| Command::PutAgent { agent: put(who, capacity), reply }).await.unwrap().unwrap();
            }
        }
        // Keep every queue read (nobody becomes a slow consumer), then check the engine's view.
        for c in agents.values_mut().flatten() {
            c.queued();
        }
        for (c, _) in &mut visitors {
            c.queued();
        }
        let views = h.engine.ask(|reply| Command::Agents { reply }).await.unwrap();
        check_assignments(&views, &mut allowed, step, op);
        peak_assigned = peak_assigned.max(views.iter().map(|a| a.assigned.len()).sum::<usize>());
        offers_seen += views.iter().map(|a| a.offered.len()).sum::<usize>();
    }
    eprintln!("routing: peak {peak_assigned} assigned at once, {offers_seen} offer-steps");
    assert!(peak_assigned >= 1 && offers_seen > 0, "seed {seed}: the run must exercise assignment");

    // Everyone back online with room: every open conversation gets an agent, nothing stays queued.
    for id in agent_ids {
        h.engine.ask(|reply| Command::PutAgent { agent: put(id, 10), reply }).await.unwrap().unwrap();
        if agents[id].is_empty() {
            let c = h.connect(Principal::Agent { id: id.into(), epoch: 0 }).await;
            agents.get_mut(id).unwrap().push(c);
        }
        let c = &agents[id][0];
        h.frame(c, r#"{"type":"presence","status":"online"}"#).await;
    }
    let open: Vec<String> = visitors.iter().filter_map(|(_, c)| c.clone()).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let views = h.engine.ask(|reply| Command::Agents { reply }).await.unwrap();
        check_assignments(&views, &mut allowed, usize::MAX, "final");
        let assigned: Vec<&String> = views.iter().flat_map(|a| &a.assigned).collect();
        if open.iter().all(|c| assigned.contains(&c)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "seed {seed}: not everyone served: {open:?} vs {views:?}");
        for a in &views {
            for conv in &a.offered {
                let c = &agents[a.id.as_str()][0];
                h.frame(c, &format!(r#"{{"type":"accept","id":"{}","conv":"{conv}"}}"#, fid())).await;
            }
        }
        for c in agents.values_mut().flatten() {
            c.queued();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = h.engine.ask(|reply| Command::Stats { reply }).await.unwrap();
    assert_eq!(stats.queued, 0, "seed {seed}: queue empty at the end");
    h.engine.ask(|reply| Command::Shutdown { reply }).await.unwrap();
}
