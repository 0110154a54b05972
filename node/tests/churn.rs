//! Randomised churn from the recipients' side: visitors and an agent talk in several conversations while
//! their sockets close, vanish without closing, come back with or without resume cursors, and the node
//! restarts; some sockets vanish mid-send and the message is re-sent with the same id on return. Whatever the
//! interleaving, every participant must have been shown each entry after its starting point exactly once and
//! in `seq` order, and every acked message must be in the log once, at the seq its ack named.
//!
//! The run is driven by one task with a seeded RNG: a failure prints the seed, and `KEFU_CHURN_SEED=<n>`
//! replays its choices (timing still varies). Frames are read in the order the node sent them; a sender's own
//! message counts as shown when its ack arrives, as the widget and the console render it, and like them a
//! client matches the echo of its own retried message by id.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use support::{Client, TestNode, http};

const PARTIES: usize = 5; // four visitors (one conversation each) and the agent (all four)
const STEPS: usize = 260;

fn tweak(cfg: &mut kefu_node::Config) {
    // The driver sends back to back and keeps vanished connections unread: neither may trip the limits.
    cfg.limits.frames_per_sec = 10_000;
    cfg.limits.burst = 10_000;
    cfg.limits.outbound_queue = 4096;
}

/// One participant as its client sees things.
struct Party {
    /// `hello` fields that identify it (visitor token or agent token).
    hello: Value,
    role: &'static str,
    convs: Vec<String>,
    live: Option<Client>,
    /// Connections that vanished: open, never read again. The node still counts them as live.
    stale: Vec<Client>,
    /// The next connection comes without cursors, relying on the offline inbox (set after some clean closes).
    fresh: bool,
    /// Connections opened without cursors, and entries their inbox replays carried (coverage, printed).
    fresh_connects: usize,
    inbox_entries: usize,
    /// A message sent on a connection that vanished before its ack: re-sent with the same id on return.
    unacked: Option<(String, String)>,
    /// Client id → (conversation, seq) of every message this party had acked.
    acked: BTreeMap<String, (String, u64)>,
    retries: usize,
    /// Per conversation: the seq it started from, and every seq shown since, in arrival order.
    base: BTreeMap<String, u64>,
    shown: BTreeMap<String, Vec<u64>>,
}

impl Party {
    fn new(hello: Value, role: &'static str, convs: Vec<String>) -> Party {
        Party {
            hello,
            role,
            convs,
            live: None,
            stale: Vec::new(),
            fresh: false,
            fresh_connects: 0,
            inbox_entries: 0,
            unacked: None,
            acked: BTreeMap::new(),
            retries: 0,
            base: BTreeMap::new(),
            shown: BTreeMap::new(),
        }
    }

    fn cursor(&self, conv: &str) -> u64 {
        self.shown[conv].last().copied().unwrap_or(self.base[conv])
    }

    fn record(&mut self, v: &Value) {
        match v["type"].as_str() {
            Some("msg") => {
                let conv = v["conv"].as_str().unwrap();
                let seq = v["entry"]["seq"].as_u64().unwrap();
                // A retried message of ours, already shown from its ack: the client matches it by id.
                let own = v["entry"]["id"].as_str().is_some_and(|id| self.acked.contains_key(id));
                if own && seq <= self.cursor(conv) {
                    return;
                }
                if let Some(s) = self.shown.get_mut(conv) {
                    s.push(seq);
                }
            }
            Some("replay") => {
                let conv = v["conv"].as_str().unwrap();
                if let Some(s) = self.shown.get_mut(conv) {
                    s.extend(v["entries"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()));
                }
            }
            Some("error") => panic!("unexpected error frame {v}"),
            _ => {}
        }
    }

    /// Read and record whatever arrives within `wait`.
    async fn pump(&mut self, wait: Duration) {
        let Some(mut c) = self.live.take() else { return };
        while let Ok(Some(v)) = tokio::time::timeout(wait, c.try_recv()).await {
            self.record(&v);
        }
        self.live = Some(c);
    }

    /// Read until every conversation has been shown up to `last` (the log's end).
    async fn catch_up(&mut self, last: &BTreeMap<String, u64>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.convs.iter().any(|c| self.cursor(c) < last[c]) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never caught up: {:?} vs {last:?}",
                self.role,
                self.shown
            );
            let mut c = self.live.take().expect("catching up needs a connection");
            if let Ok(Some(v)) = tokio::time::timeout(Duration::from_millis(200), c.try_recv()).await {
                self.record(&v);
            }
            self.live = Some(c);
        }
    }

    /// Connect again: without cursors after a clean close, else resuming from what was shown.
    async fn come_back(&mut self, node: &TestNode) {
        let resume = !std::mem::take(&mut self.fresh);
        self.fresh_connects += usize::from(!resume);
        let mut hello = self.hello.clone();
        if resume {
            hello["resume"] = self.convs.iter().map(|c| json!({"conv": c, "last_seq": self.cursor(c)})).collect();
        }
        let mut c = Client::ws(node.http(), &format!("/ws/{}", self.role)).await;
        c.hello(hello).await;
        if !resume {
            // The inbox replay (if anything was appended while away) comes right after the welcome.
            if let Ok(Some(v)) = tokio::time::timeout(Duration::from_millis(100), c.try_recv()).await {
                if v["type"] == "replay" {
                    self.inbox_entries += v["entries"].as_array().map_or(0, Vec::len);
                }
                self.record(&v);
            }
        }
        self.live = Some(c);
        if let Some((conv, id)) = self.unacked.take() {
            // The same id again: the node answers with the original seq, and stores it once.
            self.say(&conv, &id).await;
            self.retries += 1;
        }
    }

    /// Send a message and read (recording) up to its ack; returns the seq.
    async fn say(&mut self, conv: &str, id: &str) -> u64 {
        let mut c = self.live.take().unwrap();
        c.send(json!({"type": "send", "id": id, "conv": conv, "text": format!("text of {id}")})).await;
        let seq = loop {
            let v = c.recv().await;
            if v["type"] == "ack" && v["id"] == id {
                break v["seq"].as_u64().unwrap();
            }
            self.record(&v);
        };
        // A retried message may already have been shown by the resume replay (the widget matches it by id).
        if seq > self.cursor(conv) {
            self.shown.get_mut(conv).unwrap().push(seq);
        }
        if let Some((first_conv, first_seq)) = self.acked.insert(id.to_owned(), (conv.to_owned(), seq)) {
            panic!("{id} acked twice: {first_conv}/{first_seq}, then {conv}/{seq}");
        }
        self.live = Some(c);
        seq
    }
}

/// Wait until the node's engine counts exactly `n` client connections (so a close has been seen).
async fn wait_connections(node: &TestNode, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = &node.node.ctx.metrics.connections;
        let now = m.with_label_values(&["visitor"]).get() + m.with_label_values(&["agent"]).get();
        if now == n as i64 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "node counts {now} connections, expected {n}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn open_connections(parties: &[Party]) -> usize {
    parties.iter().map(|p| p.stale.len() + usize::from(p.live.is_some())).sum()
}

async fn log_ends(node: &TestNode, token: &str, convs: &[String]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for c in convs {
        let (status, body) = http(node.http(), "GET", &format!("/api/conversations/{c}"), Some(token), None).await;
        assert_eq!(status, 200, "{body}");
        out.insert(c.clone(), body["last_seq"].as_u64().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_participant_sees_each_entry_once_in_order_through_churn() {
    let seed: u64 = std::env::var("KEFU_CHURN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("churn seed {seed} (KEFU_CHURN_SEED={seed} replays this run)");
    let mut rng = StdRng::seed_from_u64(seed);

    let mut node = TestNode::start_with(tweak).await;
    let token = node.agent("alice", &[], PARTIES as u32).await;

    // Setup on throwaway connections: four assigned conversations.
    let mut agent = Client::agent(node.http(), &token).await;
    let mut parties = Vec::new();
    let mut convs = Vec::new();
    for _ in 0..PARTIES - 1 {
        let mut v = Client::visitor(node.http(), json!({})).await;
        let conv = v.open(&[]).await;
        agent.accept_next_offer().await;
        parties.push(Party::new(json!({"token": v.token().unwrap()}), "visitor", vec![conv.clone()]));
        convs.push(conv);
        v.close_socket().await;
    }
    parties.push(Party::new(json!({"token": token}), "agent", convs.clone()));
    agent.close_socket().await;
    wait_connections(&node, 0).await;

    // Everyone starts from the log's current end, on a resumed connection.
    let start = log_ends(&node, &token, &convs).await;
    for p in &mut parties {
        for c in p.convs.clone() {
            p.base.insert(c.clone(), start[&c]);
            p.shown.insert(c, Vec::new());
        }
        p.come_back(&node).await;
    }

    let mut restarts = 0;
    let (mut clean_closes, mut vanishes) = (0, 0);
    for step in 0..STEPS {
        let who = rng.random_range(0..PARTIES);
        match rng.random_range(0..100) {
            // Talk (most steps).
            0..=59 => {
                if parties[who].live.is_none() {
                    parties[who].come_back(&node).await;
                }
                let p = &mut parties[who];
                let conv = p.convs[rng.random_range(0..p.convs.len())].clone();
                p.say(&conv, &format!("s{step}-{who}")).await;
            }
            // Read what has arrived.
            60..=67 => parties[who].pump(Duration::from_millis(5)).await,
            // Close cleanly after reading everything. Coming back without cursors, the offline inbox must hold
            // exactly what was appended meanwhile; with cursors, the replay (and not the inbox too).
            68..=79 => {
                if parties[who].live.is_none() {
                    continue;
                }
                let last = log_ends(&node, &token, &parties[who].convs).await;
                let p = &mut parties[who];
                p.catch_up(&last).await;
                for s in p.stale.drain(..) {
                    drop(s);
                }
                p.live.take().unwrap().close_socket().await;
                // Half come back without cursors (a new page), half with them (the widget's saved state).
                p.fresh = rng.random_bool(0.5);
                clean_closes += 1;
                wait_connections(&node, open_connections(&parties)).await;
            }
            // Vanish: the socket stays open but is never read again; the next connection resumes.
            80..=85 => {
                let p = &mut parties[who];
                if let Some(mut c) = p.live.take() {
                    if rng.random_bool(0.5) {
                        // Mid-send: the frame is out, the ack never read.
                        let conv = p.convs[rng.random_range(0..p.convs.len())].clone();
                        let id = format!("s{step}-{who}");
                        c.send(json!({"type": "send", "id": id, "conv": conv, "text": format!("text of {id}")})).await;
                        p.unacked = Some((conv, id));
                    }
                    p.stale.push(c);
                    vanishes += 1;
                }
            }
            // A message arrives for someone away, who comes back that very moment.
            86..=93 => {
                let away: Vec<usize> = (0..PARTIES).filter(|&p| parties[p].live.is_none()).collect();
                if away.is_empty() {
                    continue;
                }
                let who = away[rng.random_range(0..away.len())];
                let conv = parties[who].convs[rng.random_range(0..parties[who].convs.len())].clone();
                // The other side of `conv`: the agent for a visitor, the conversation's visitor for the agent.
                let other = if parties[who].role == "agent" {
                    parties.iter().position(|p| p.role == "visitor" && p.convs.contains(&conv)).unwrap()
                } else {
                    PARTIES - 1
                };
                if parties[other].live.is_none() {
                    parties[other].come_back(&node).await;
                }
                parties[other].say(&conv, &format!("s{step}-{other}")).await;
                parties[who].come_back(&node).await;
            }
            // Come back.
            94..=98 => {
                if parties[who].live.is_none() {
                    parties[who].come_back(&node).await;
                }
            }
            // Rolling restart: clients are told to reconnect; they read to the end and resume.
            _ => {
                if restarts >= 2 {
                    continue;
                }
                restarts += 1;
                let dir = {
                    let shutdown = node.shutdown();
                    // Read concurrently with the drain: frames flushed before `reconnect` count as shown.
                    let readers = async {
                        for p in &mut parties {
                            if let Some(mut c) = p.live.take() {
                                while let Ok(Some(v)) = tokio::time::timeout(Duration::from_secs(5), c.try_recv()).await
                                {
                                    p.record(&v);
                                }
                            }
                        }
                    };
                    let (dir, ()) = tokio::join!(shutdown, readers);
                    dir
                };
                node = TestNode::start_in(dir, tweak).await;
                for p in &mut parties {
                    // Everything up to the restart was read; entries for a party that was away are in its
                    // inbox either way, so a clean-closed party still comes back without cursors.
                    p.stale.clear();
                    p.come_back(&node).await;
                }
            }
        }
    }

    // The end: everyone back (retrying what was never acked), then caught up to the log's end.
    for p in &mut parties {
        if p.live.is_none() {
            p.come_back(&node).await;
        }
    }
    let last = log_ends(&node, &token, &convs).await;
    for p in &mut parties {
        p.catch_up(&last).await;
        p.pump(Duration::from_millis(50)).await;
        for c in &p.convs {
            let expected: Vec<u64> = (p.base[c] + 1..=last[c]).collect();
            assert_eq!(p.shown[c], expected, "seed {seed}: {} in {c}: shown once each, in order", p.role);
        }
    }

    // The log holds each acked message once, at the seq its ack named.
    let acked: BTreeMap<&String, &(String, u64)> = parties.iter().flat_map(|p| p.acked.iter()).collect();
    for c in &convs {
        let (_, body) =
            http(node.http(), "GET", &format!("/api/conversations/{c}/entries?limit=1000"), Some(&token), None).await;
        let entries = body["entries"].as_array().unwrap();
        for (id, (conv, seq)) in acked.iter().filter(|(_, (conv, _))| conv == c) {
            let with_id: Vec<&Value> = entries.iter().filter(|e| e["id"] == id.as_str()).collect();
            assert_eq!(with_id.len(), 1, "seed {seed}: message {id} stored once in {conv}");
            assert_eq!(with_id[0]["seq"].as_u64(), Some(*seq), "seed {seed}: {id} at its acked seq");
        }
    }
    let fresh: usize = parties.iter().map(|p| p.fresh_connects).sum();
    let inbox: usize = parties.iter().map(|p| p.inbox_entries).sum();
    let retries: usize = parties.iter().map(|p| p.retries).sum();
    eprintln!(
        "churn: {} messages, {clean_closes} clean closes, {vanishes} vanished sockets ({retries} mid-send, \
         retried), {restarts} restarts, {fresh} returns without cursors ({inbox} entries from the offline inbox)",
        acked.len()
    );
    assert!(acked.len() > STEPS / 3, "the run must carry real traffic ({} messages)", acked.len());
    node.shutdown().await;
}
