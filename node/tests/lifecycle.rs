//! A conversation's whole life over real WebSockets: open → queued → offered → assigned → chat both
//! ways (typing, read receipts) → transfer → close → rating, and the REST view of it.

#![allow(clippy::unwrap_used)]

mod support;

use serde_json::json;
use support::{Client, TestNode, http};

#[tokio::test]
async fn full_lifecycle_from_open_to_rating() {
    let node = TestNode::start().await;
    let addr = node.http();
    let t1 = node.agent("alice", &["billing"], 2).await;
    let t2 = node.agent("bob", &["billing"], 2).await;
    let mut alice = Client::agent(addr, &t1).await;
    let mut visitor = Client::visitor(addr, json!({"name": "Vera"})).await;
    assert!(visitor.token().is_some(), "anonymous visitor gets a token");

    // open → queued, with a queue position
    let conv = visitor.open(&["billing"]).await;
    let queued = visitor.expect("queued summary", |v| v["type"] == "conversation").await;
    assert_eq!(queued["conv"]["state"], "queued");
    visitor.expect_type("queue").await;

    // offered to the only online agent, accepted → assigned
    let offered = alice.accept_next_offer().await;
    assert_eq!(offered, conv);
    let assigned =
        visitor.expect("assigned event", |v| v["type"] == "msg" && v["entry"]["event"]["name"] == "assigned").await;
    assert_eq!(assigned["entry"]["event"]["agent"], "alice");

    // chat both ways, seqs dense and increasing
    let s1 = visitor.say(&conv, "hello, my invoice is wrong").await;
    let got = alice.messages(&conv, 1).await;
    assert_eq!(got, vec![(s1, "hello, my invoice is wrong".to_owned())]);
    let s2 = alice.say(&conv, "let me check <b>that</b>").await;
    assert_eq!(s2, s1 + 1);
    let got = visitor.messages(&conv, 1).await;
    assert_eq!(got, vec![(s2, "let me check <b>that</b>".to_owned())], "text is delivered as text, unchanged");

    // typing indicator reaches the other side; read receipt advances the cursor
    alice.send(json!({"type": "typing", "conv": conv, "on": true})).await;
    let typing = visitor.expect_type("typing").await;
    assert_eq!(typing["on"], true);
    assert_eq!(typing["from"]["id"], "alice");
    assert!(typing["ttl_ms"].as_u64().unwrap() > 0);
    visitor.send(json!({"type": "read", "conv": conv, "seq": s2})).await;
    let read = alice.expect_type("read").await;
    assert_eq!(read["seq"], s2);

    // transfer to bob: bob gets the conversation, alice is told and loses it
    let mut bob = Client::agent(addr, &t2).await;
    let tid = alice.next_id();
    alice.send(json!({"type": "transfer", "id": tid, "conv": conv, "to_agent": "bob"})).await;
    alice.expect("transfer ack", |v| v["type"] == "ack" && v["id"] == tid.as_str()).await;
    let summary = bob.expect("bob's summary", |v| v["type"] == "conversation" && v["conv"]["agent"] == "bob").await;
    assert_eq!(summary["conv"]["state"], "assigned");
    visitor.expect("transferred event", |v| v["type"] == "msg" && v["entry"]["event"]["name"] == "transferred").await;
    let s3 = bob.say(&conv, "bob here").await;
    assert!(s3 > s2);
    let fid = alice.next_id();
    alice.send(json!({"type": "send", "id": fid, "conv": conv, "text": "still me?"})).await;
    let refused = alice.expect_error("forbidden").await;
    assert_eq!(refused["id"], fid.as_str());

    // close by the agent → visitor sees it → rating reaches the agent
    let cid = bob.next_id();
    bob.send(json!({"type": "close", "id": cid, "conv": conv})).await;
    bob.expect("close ack", |v| v["type"] == "ack" && v["id"] == cid.as_str()).await;
    visitor.expect("closed event", |v| v["type"] == "msg" && v["entry"]["event"]["name"] == "closed").await;
    let rid = visitor.next_id();
    visitor.send(json!({"type": "rate", "id": rid, "conv": conv, "score": 5, "comment": "quick!"})).await;
    visitor.expect("rate ack", |v| v["type"] == "ack" && v["id"] == rid.as_str()).await;
    let rated = bob.expect("rated event", |v| v["type"] == "msg" && v["entry"]["event"]["name"] == "rated").await;
    assert_eq!(rated["entry"]["event"]["score"], 5);

    // sending to a closed conversation is a conflict
    let fid = visitor.next_id();
    visitor.send(json!({"type": "send", "id": fid, "conv": conv, "text": "hello?"})).await;
    visitor.expect_error("conflict").await;

    // REST: dense history, state and rating, agent list
    let (status, body) = http(addr, "GET", &format!("/api/conversations/{conv}/entries"), Some(&t2), None).await;
    assert_eq!(status, 200, "{body}");
    let seqs: Vec<u64> = body["entries"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "seq is dense from 1");
    let names: Vec<String> = body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["name"].as_str().unwrap_or(e["kind"].as_str().unwrap()).to_owned())
        .collect();
    assert_eq!(
        names,
        ["opened", "assigned", "message", "message", "transferred", "assigned", "message", "closed", "rated"]
    );
    let (status, body) = http(addr, "GET", "/api/conversations?state=closed", Some(&t1), None).await;
    assert_eq!(status, 200);
    assert_eq!(body["conversations"][0]["id"], conv.as_str());
    assert_eq!(body["conversations"][0]["rating"]["score"], 5);
    assert_eq!(body["conversations"][0]["agent"], "bob");
    let (status, body) = http(addr, "GET", "/api/agents", Some(&t1), None).await;
    assert_eq!(status, 200);
    let bob_view = body["agents"].as_array().unwrap().iter().find(|a| a["id"] == "bob").unwrap().clone();
    assert_eq!(bob_view["status"], "online");
    assert_eq!(bob_view["assigned"].as_array().unwrap().len(), 0, "closing released bob's capacity");

    // a visitor token reads only its own history
    let vt = visitor.token().unwrap();
    let (status, _) =
        http(addr, "GET", &format!("/api/conversations/{conv}/entries?after=3&limit=2"), Some(&vt), None).await;
    assert_eq!(status, 200);
    let (status, body) = http(addr, "GET", "/api/conversations", Some(&vt), None).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = http(addr, "GET", "/api/conversations", None, None).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));

    // The metrics saw all of it.
    let (_, metrics) = http(addr, "GET", "/metrics", None, None).await;
    let text = metrics.as_str().unwrap_or_default().to_owned();
    let value = |name: &str| -> f64 {
        text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
    };
    assert!(value("kefu_store_commit_seconds_count{store=\"wal\"}") >= 1.0, "{text}");
    assert!(value("kefu_delivery_latency_seconds_count") >= 9.0, "{text}");
    assert!(value("kefu_first_response_seconds_count") >= 1.0, "{text}");
    assert!(value("kefu_queue_wait_seconds_count") >= 1.0, "{text}");
    assert_eq!(value("kefu_assignments_total{via=\"accept\"}"), 1.0, "{text}");
    assert_eq!(value("kefu_connections{role=\"agent\"}"), 2.0, "{text}");
    node.shutdown().await;
}

#[tokio::test]
async fn typing_is_coalesced_to_two_per_second_per_conversation() {
    let node = TestNode::start().await;
    let addr = node.http();
    let t = node.agent("alice", &[], 2).await;
    let mut alice = Client::agent(addr, &t).await;
    let mut visitor = Client::visitor(addr, json!({})).await;
    let conv = visitor.open(&[]).await;
    alice.accept_next_offer().await;
    let start = std::time::Instant::now();
    for i in 0..20 {
        visitor.send(json!({"type": "typing", "conv": conv, "on": i % 2 == 0})).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Sent 20 over ~1 s: at most ~3 forwarded (leading edge + one per 500 ms window + trailing edge).
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    let elapsed = start.elapsed().as_secs_f64();
    let mut forwarded = Vec::new();
    while let Ok(Some(v)) = tokio::time::timeout(std::time::Duration::from_millis(200), alice.try_recv()).await {
        if v["type"] == "typing" {
            forwarded.push(v["on"].as_bool().unwrap());
        }
    }
    assert!(!forwarded.is_empty());
    assert!(
        forwarded.len() as f64 <= (elapsed * 2.0).ceil() + 1.0,
        "{} typing frames in {elapsed:.2}s",
        forwarded.len()
    );
    assert_eq!(forwarded.last(), Some(&false), "the final state (stopped typing) is delivered");
    node.shutdown().await;
}

#[tokio::test]
async fn raw_tcp_adapter_speaks_the_same_protocol() {
    let node = TestNode::start().await;
    let addr = node.http();
    let tcp = node.node.tcp_addr.unwrap();
    let t = node.agent("alice", &[], 2).await;
    let mut agent = Client::tcp(tcp).await;
    agent.hello(json!({"role": "agent", "token": t})).await;
    let mut visitor = Client::visitor(addr, json!({})).await;
    let conv = visitor.open(&[]).await;
    assert_eq!(agent.accept_next_offer().await, conv);
    let seq = visitor.say(&conv, "via websocket").await;
    assert_eq!(agent.messages(&conv, 1).await, vec![(seq, "via websocket".to_owned())]);
    let seq = agent.say(&conv, "via tcp").await;
    assert_eq!(visitor.messages(&conv, 1).await, vec![(seq, "via tcp".to_owned())]);
    // TCP needs hello.role
    let mut anon = Client::tcp(tcp).await;
    anon.send(json!({"type": "hello"})).await;
    anon.expect_error("invalid").await;
    node.shutdown().await;
}
