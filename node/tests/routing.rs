//! Routing under contention: many visitors at once against few agents. Nobody is ever over capacity,
//! everybody is eventually served.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use support::{Client, TestNode, http};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_visitors_three_agents_of_capacity_two_never_over_capacity_all_served() {
    let node = TestNode::start_with(|c| {
        c.limits.frames_per_sec = 1000;
        c.limits.burst = 1000;
    })
    .await;
    let addr = node.http();
    let mut tokens = Vec::new();
    for id in ["admin-a", "b", "c"] {
        tokens.push(node.agent(id, &["general"], 2).await);
    }
    let admin = tokens[0].clone();

    // A watchdog polls the engine's own view of load the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let stop = stop.clone();
        let admin = admin.clone();
        tokio::spawn(async move {
            let mut samples = 0;
            while !stop.load(Ordering::SeqCst) {
                let (_, body) = http(addr, "GET", "/api/agents", Some(&admin), None).await;
                for a in body["agents"].as_array().unwrap() {
                    let load = a["assigned"].as_array().unwrap().len() + a["offered"].as_array().unwrap().len();
                    assert!(load <= 2, "agent {} over capacity: {a}", a["id"]);
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            samples
        })
    };

    // Agents: accept every offer, answer, close shortly after. Each tracks what it holds.
    let mut agent_tasks = Vec::new();
    for token in tokens.clone() {
        let stop = stop.clone();
        agent_tasks.push(tokio::spawn(async move {
            let mut a = Client::agent(addr, &token).await;
            let mut served = 0;
            let mut held = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let Ok(Some(v)) = tokio::time::timeout(Duration::from_millis(100), a.try_recv()).await else {
                    continue;
                };
                if v["type"] != "offer" {
                    continue;
                }
                let conv = v["conv"]["id"].as_str().unwrap().to_owned();
                let id = a.next_id();
                a.send(json!({"type": "accept", "id": id, "conv": conv})).await;
                a.expect("accept ack", |f| f["type"] == "ack" && f["id"] == id.as_str()).await;
                held += 1;
                assert!(held <= 2, "client-side view: holding {held}");
                a.say(&conv, "hello, how can I help?").await;
                tokio::time::sleep(Duration::from_millis(10)).await;
                let id = a.next_id();
                a.send(json!({"type": "close", "id": id, "conv": conv})).await;
                a.expect("close ack", |f| f["type"] == "ack" && f["id"] == id.as_str()).await;
                held -= 1;
                served += 1;
            }
            served
        }));
    }

    // Fifty visitors arrive at once; each is served when an agent's message reaches it.
    let mut visitors = Vec::new();
    for _ in 0..50 {
        visitors.push(tokio::spawn(async move {
            let mut v = Client::visitor(addr, json!({})).await;
            let conv = v.open(&["general"]).await;
            let served = tokio::time::timeout(Duration::from_secs(60), async {
                loop {
                    match v.try_recv().await {
                        Some(f)
                            if f["type"] == "msg"
                                && f["entry"]["from"]["role"] == "agent"
                                && f["entry"]["kind"] == "message" =>
                        {
                            return true;
                        }
                        Some(_) => continue,
                        None => return false,
                    }
                }
            })
            .await;
            (conv, served.unwrap_or(false))
        }));
    }
    let mut convs = Vec::new();
    for v in visitors {
        let (conv, served) = v.await.unwrap();
        assert!(served, "visitor of {conv} was never served");
        convs.push(conv);
    }
    convs.sort();
    convs.dedup();
    assert_eq!(convs.len(), 50, "fifty distinct conversations");
    // Let the last closes land, then stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let samples = watchdog.await.unwrap();
    assert!(samples > 5, "the watchdog actually sampled ({samples})");
    let mut total = 0;
    for t in agent_tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 50, "every conversation served exactly once");
    let (_, body) = http(addr, "GET", "/api/conversations?state=closed&limit=100", Some(&admin), None).await;
    assert_eq!(body["conversations"].as_array().unwrap().len(), 50);
    node.shutdown().await;
}

#[tokio::test]
async fn offer_not_accepted_in_time_is_reoffered_to_another_agent() {
    let node = TestNode::start_with(|c| c.routing.offer_timeout_secs = 1).await;
    let addr = node.http();
    let ta = node.agent("a", &[], 1).await;
    let tb = node.agent("b", &[], 1).await;
    let mut a = Client::agent(addr, &ta).await;
    let mut b = Client::agent(addr, &tb).await;
    let mut v = Client::visitor(addr, json!({})).await;
    let conv = v.open(&[]).await;
    // Whoever gets it first ignores it; after the timeout the other one is offered it.
    let first = tokio::select! {
        f = a.expect_type("offer") => ("a", f),
        f = b.expect_type("offer") => ("b", f),
    };
    assert_eq!(first.1["conv"]["id"], conv.as_str());
    let (ignorer, taker) = if first.0 == "a" { (&mut a, &mut b) } else { (&mut b, &mut a) };
    ignorer.expect_type("offer_withdrawn").await;
    assert_eq!(taker.accept_next_offer().await, conv);
    node.shutdown().await;
}

#[tokio::test]
async fn transfer_to_skill_group_requeues_and_routes_to_a_skilled_agent() {
    let node = TestNode::start_with(|c| c.routing.auto_accept = true).await;
    let addr = node.http();
    let ta = node.agent("a", &["general"], 2).await;
    let mut a = Client::agent(addr, &ta).await;
    let mut v = Client::visitor(addr, json!({})).await;
    let conv = v.open(&["general"]).await;
    a.expect("assigned to a", |f| f["type"] == "conversation" && f["conv"]["agent"] == "a").await;
    let tz = node.agent("z", &["zh"], 2).await;
    let mut z = Client::agent(addr, &tz).await;
    let id = a.next_id();
    a.send(json!({"type": "transfer", "id": id, "conv": conv, "to_skill": "zh"})).await;
    a.expect("transfer ack", |f| f["type"] == "ack" && f["id"] == id.as_str()).await;
    let s = z.expect("assigned to z", |f| f["type"] == "conversation" && f["conv"]["agent"] == "z").await;
    assert_eq!(s["conv"]["skills"], json!(["zh"]));
    node.shutdown().await;
}
