//! Delivery guarantees over real sockets: retries are exactly-once, reconnects resume without gaps or
//! duplicates, and entries for absent recipients wait in the offline inbox.

#![allow(clippy::unwrap_used)]

mod support;

use serde_json::json;
use support::{Client, TestNode, http};

/// Visitor + accepting agent + an open, assigned conversation.
async fn chat(node: &TestNode) -> (Client, Client, String, String) {
    let addr = node.http();
    let token = node.agent("alice", &[], 3).await;
    let mut agent = Client::agent(addr, &token).await;
    let mut visitor = Client::visitor(addr, json!({})).await;
    let conv = visitor.open(&[]).await;
    agent.accept_next_offer().await;
    (visitor, agent, conv, token)
}

/// `(seq, text)` of every entry in a `replay` frame.
fn replayed(replay: &serde_json::Value) -> Vec<(u64, String)> {
    replay["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["seq"].as_u64().unwrap(), e["text"].as_str().unwrap_or("").to_owned()))
        .collect()
}

#[tokio::test]
async fn retried_send_with_same_id_yields_one_entry_and_the_same_seq() {
    let node = TestNode::start().await;
    let (mut visitor, mut agent, conv, token) = chat(&node).await;
    let frame = json!({"type": "send", "id": "retry-me", "conv": conv, "text": "once"});
    visitor.send(frame.clone()).await;
    visitor.send(frame.clone()).await; // immediate retry, possibly before the first is durable
    let a1 = visitor.expect("first ack", |v| v["type"] == "ack" && v["id"] == "retry-me").await;
    let a2 = visitor.expect("second ack", |v| v["type"] == "ack" && v["id"] == "retry-me").await;
    assert_eq!(a1["seq"], a2["seq"]);
    assert!(a1["duplicate"].is_null() && a2["duplicate"] == true, "{a1} {a2}");

    // A retry after a reconnect (new connection, same visitor) is still recognised.
    let vt = visitor.token().unwrap();
    visitor.close_socket().await;
    let mut again = Client::visitor(node.http(), json!({"token": vt})).await;
    again.send(frame).await;
    let a3 = again.expect("ack after reconnect", |v| v["type"] == "ack" && v["id"] == "retry-me").await;
    assert_eq!(a3["seq"], a1["seq"]);

    // The agent saw it once; the log has it once.
    let next = again.say(&conv, "after").await;
    let got = agent.messages(&conv, 2).await;
    assert_eq!(got, vec![(a1["seq"].as_u64().unwrap(), "once".into()), (next, "after".into())]);
    let (_, body) = http(node.http(), "GET", &format!("/api/conversations/{conv}/entries"), Some(&token), None).await;
    let onces = body["entries"].as_array().unwrap().iter().filter(|e| e["text"] == "once").count();
    assert_eq!(onces, 1);

    // The same client id from a *different* participant is a different message.
    let s = agent.say(&conv, "agent also uses ids").await;
    assert!(s > next);
    node.shutdown().await;
}

#[tokio::test]
async fn reconnect_with_last_seq_replays_without_gap_or_duplicate() {
    let node = TestNode::start().await;
    let (mut visitor, mut agent, conv, _) = chat(&node).await;
    let mut seen = Vec::new();
    for i in 0..5 {
        let seq = agent.say(&conv, &format!("a{i}")).await;
        seen.push(seq);
    }
    for (seq, _) in visitor.messages(&conv, 5).await {
        assert!(seen.contains(&seq));
    }
    let last_seen = *seen.last().unwrap();
    let vt = visitor.token().unwrap();
    visitor.close_socket().await;

    // While the visitor is away the agent keeps talking.
    let mut missed = Vec::new();
    for i in 0..7 {
        missed.push((agent.say(&conv, &format!("b{i}")).await, format!("b{i}")));
    }
    let mut back =
        Client::visitor(node.http(), json!({"token": vt, "resume": [{"conv": conv, "last_seq": last_seen}]})).await;
    assert_eq!(back.welcome["conversations"][0]["id"], conv.as_str());
    let replay = back.expect_type("replay").await;
    let got = replayed(&replay);
    assert_eq!(got, missed, "exactly the missed entries, in order");
    assert_eq!(replay["last_seq"], missed.last().unwrap().0);
    // Live traffic continues right after the replay with the next seq.
    let live = agent.say(&conv, "live").await;
    assert_eq!(back.messages(&conv, 1).await, vec![(live, "live".to_owned())]);
    assert_eq!(live, missed.last().unwrap().0 + 1);
    // An explicit resume frame works too, and a cursor from the future is refused with `reload`.
    back.send(json!({"type": "resume", "conv": conv, "last_seq": live - 1})).await;
    let r = back.expect_type("replay").await;
    assert_eq!(r["entries"].as_array().unwrap().len(), 1);
    back.send(json!({"type": "resume", "conv": conv, "last_seq": live + 100})).await;
    let e = back.expect_error("reload").await;
    assert_eq!(e["last_seq"], live);
    node.shutdown().await;
}

#[tokio::test]
async fn entries_written_to_a_vanished_connection_are_replayed_from_the_cursor() {
    // A peer that vanished without closing (laptop lid shut, network gone) still looks connected until the
    // idle timeout: what is sent meanwhile goes to that dead connection, not to the offline inbox. The
    // resume cursor of the next connection is what brings those entries back, exactly once and in order.
    let node = TestNode::start().await;
    let (mut visitor, mut agent, conv, _) = chat(&node).await;
    let first = agent.say(&conv, "first").await;
    assert_eq!(visitor.messages(&conv, 1).await, vec![(first, "first".to_owned())]);
    let vt = visitor.token().unwrap();
    // `visitor` is kept open and never read again: the node still counts it as live.
    let mut sent = Vec::new();
    for text in ["are you there?", "I can see the order", "refund issued"] {
        sent.push((agent.say(&conv, text).await, text.to_owned()));
    }
    let mut back =
        Client::visitor(node.http(), json!({"token": vt, "resume": [{"conv": conv, "last_seq": first}]})).await;
    let replay = back.expect_type("replay").await;
    let got = replayed(&replay);
    assert_eq!(got, sent, "every entry after the cursor, once, in order");
    let live = agent.say(&conv, "anything else?").await;
    assert_eq!(back.messages(&conv, 1).await, vec![(live, "anything else?".to_owned())]);
    drop(visitor);
    node.shutdown().await;
}

#[tokio::test]
async fn gap_larger_than_replay_limit_gets_reload_not_silence() {
    let node = TestNode::start_with(|c| {
        c.limits.replay_limit = 3;
        c.limits.burst = 100;
    })
    .await;
    let (visitor, mut agent, conv, _) = chat(&node).await;
    let vt = visitor.token().unwrap();
    visitor.close_socket().await;
    for i in 0..6 {
        agent.say(&conv, &format!("m{i}")).await;
    }
    let mut back = Client::visitor(node.http(), json!({"token": vt, "resume": [{"conv": conv, "last_seq": 1}]})).await;
    let e = back.expect_error("reload").await;
    assert_eq!(e["conv"], conv.as_str());
    assert!(e["last_seq"].as_u64().unwrap() >= 8);
    node.shutdown().await;
}

#[tokio::test]
async fn offline_message_is_delivered_on_reconnect() {
    let node = TestNode::start().await;
    let (visitor, mut agent, conv, token) = chat(&node).await;
    let vt = visitor.token().unwrap();
    visitor.close_socket().await;
    // Give the engine a moment to see the disconnect, so the visitor is really offline.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let s1 = agent.say(&conv, "are you still there?").await;
    let s2 = agent.say(&conv, "I found the problem").await;

    // Reconnect without any resume cursor: the inbox delivers what was missed.
    let mut back = Client::visitor(node.http(), json!({"token": vt})).await;
    let replay = back.expect_type("replay").await;
    let seqs: Vec<u64> = replay["entries"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![s1, s2]);
    // Delivered once: a second reconnect gets nothing from the inbox.
    back.close_socket().await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut third = Client::visitor(node.http(), json!({"token": vt})).await;
    let s3 = agent.say(&conv, "ok, fixed").await;
    let next = third.expect("next frame", |v| v["type"] == "msg" || v["type"] == "replay").await;
    assert_eq!(next["type"], "msg", "no stale inbox replay: {next}");
    assert_eq!(next["entry"]["seq"], s3);

    // Agents get their offline messages too.
    agent.close_socket().await;
    node.wait_agent_offline("alice").await;
    let s4 = third.say(&conv, "thanks").await;
    let mut agent_back = Client::agent(node.http(), &token).await;
    let replay = agent_back.expect_type("replay").await;
    assert_eq!(replay["entries"][0]["seq"], s4);
    node.shutdown().await;
}
