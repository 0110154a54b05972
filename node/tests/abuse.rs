//! Hostile and broken clients: each bad input gets its documented error code, and the node stays
//! healthy for everyone else. A client that stops reading is closed without stalling anyone.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use kefu_node::token::{Claims, Signer};
use serde_json::json;
use support::{Client, TestNode, http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "test-secret-test-secret-test-secret"; // Config::for_test

/// A visitor/agent pair that must keep chatting normally after every abuse case.
async fn control_chat_works(node: &TestNode, token: &str) {
    let addr = node.http();
    let mut a = Client::agent(addr, token).await;
    let mut v = Client::visitor(addr, json!({})).await;
    let conv = v.open(&[]).await;
    // Earlier cases may have left queued conversations: take offers until ours comes.
    while a.accept_next_offer().await != conv {}
    let seq = v.say(&conv, "still fine?").await;
    assert_eq!(a.messages(&conv, 1).await, vec![(seq, "still fine?".to_owned())]);
    let id = a.next_id();
    a.send(json!({"type": "close", "id": id, "conv": conv})).await;
    a.expect("close ack", |f| f["type"] == "ack" && f["id"] == id.as_str()).await;
}

#[tokio::test]
async fn bad_input_gets_documented_codes_and_node_stays_healthy() {
    let node = TestNode::start_with(|c| {
        c.limits.max_frame_bytes = 1024;
        c.limits.max_text_chars = 500;
    })
    .await;
    let addr = node.http();
    let token = node.agent("alice", &[], 5).await;
    let mut v = Client::visitor(addr, json!({})).await;

    // In-session errors: the connection stays open after each.
    v.send_text("{not json").await;
    v.expect_error("bad_frame").await;
    v.send_text(r#"{"type":"teleport","to":"mars"}"#).await;
    v.expect_error("unknown_type").await;
    v.send_text(r#"{"type":"send","id":"x"}"#).await;
    v.expect_error("bad_frame").await;
    v.send_text(&format!(r#"{{"type":"send","id":"big","conv":"c","text":"{}"}}"#, "x".repeat(2000))).await;
    v.expect_error("frame_too_large").await;
    v.send_raw(Message::Binary(vec![1u8, 2, 3].into())).await;
    v.expect_error("bad_frame").await;
    v.send(json!({"type": "send", "id": "n1", "conv": "c_doesnotexist", "text": "hi"})).await;
    v.expect_error("not_found").await;
    v.send(json!({"type": "accept", "id": "n2", "conv": "c_x"})).await;
    v.expect_error("forbidden").await;
    let conv = v.open(&[]).await;
    v.send(json!({"type": "send", "id": "e1", "conv": conv, "text": "   "})).await;
    v.expect_error("invalid").await;
    v.send(json!({"type": "send", "id": "e2", "conv": conv, "text": "y".repeat(501)})).await;
    v.expect_error("invalid").await;
    v.send(json!({"type": "send", "id": "", "conv": conv, "text": "no id"})).await;
    v.expect_error("invalid").await;
    v.send(json!({"type": "rate", "id": "r1", "conv": conv, "score": 9})).await;
    v.expect_error("invalid").await;
    // Hostile text is stored and echoed as text, byte for byte.
    let xss = "<img src=x onerror=alert(1)><script>alert(2)</script> & \u{202e}";
    let seq = v.say(&conv, xss).await;
    let (_, body) =
        http(addr, "GET", &format!("/api/conversations/{conv}/entries?after={}", seq - 1), Some(&token), None).await;
    assert_eq!(body["entries"][0]["text"], xss);
    v.send(json!({"type": "ping", "nonce": 7})).await;
    assert_eq!(v.expect_type("pong").await["nonce"], 7);

    // Flooding past the rate limit: `rate_limited`, the connection survives a moderate burst.
    for i in 0..60 {
        v.send(json!({"type": "ping", "nonce": i})).await;
    }
    v.expect_error("rate_limited").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    v.send(json!({"type": "ping", "nonce": 1000})).await;
    v.expect("pong after backing off", |f| f["type"] == "pong" && f["nonce"] == 1000).await;

    // Handshake errors: error frame, then the connection is closed.
    let fatal = [
        (json!({"type": "send", "id": "1", "conv": "c", "text": "no hello"}), "/ws/visitor", "hello_required"),
        (json!({"type": "hello", "token": "not-a-token"}), "/ws/agent", "unauthorized"),
        (json!({"type": "hello"}), "/ws/agent", "unauthorized"),
        (json!({"type": "hello", "token": token.replace('.', "x")}), "/ws/agent", "unauthorized"),
        (json!({"type": "hello", "v": 99}), "/ws/visitor", "invalid"),
        (json!({"type": "hello", "role": "agent"}), "/ws/visitor", "invalid"),
    ];
    for (hello, path, code) in fatal {
        let mut c = Client::ws(addr, path).await;
        c.send(hello.clone()).await;
        let e = c.recv().await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some(code)), "{hello}");
        assert!(c.try_recv().await.is_none(), "closed after {code}");
    }
    // Expired and wrong-secret tokens.
    let signer = Signer::new(SECRET.as_bytes());
    let expired = signer.sign(&Claims { sub: "alice".into(), role: "agent".into(), iat: 0, exp: 1, ep: 0 });
    let mut c = Client::ws(addr, "/ws/agent").await;
    c.send(json!({"type": "hello", "token": expired})).await;
    c.expect_error("token_expired").await;
    let forged = Signer::new(b"some-other-secret-entirely").sign(&Claims {
        sub: "alice".into(),
        role: "agent".into(),
        iat: 0,
        exp: u64::MAX / 2,
        ep: 0,
    });
    let mut c = Client::ws(addr, "/ws/agent").await;
    c.send(json!({"type": "hello", "token": forged})).await;
    c.expect_error("unauthorized").await;
    // A visitor token is not an agent token.
    let mut c = Client::ws(addr, "/ws/agent").await;
    c.send(json!({"type": "hello", "token": v.token().unwrap()})).await;
    c.expect_error("unauthorized").await;
    // A well-signed token for an agent that does not exist.
    let ghost = signer.sign(&Claims { sub: "ghost".into(), role: "agent".into(), iat: 0, exp: u64::MAX / 2, ep: 0 });
    let mut c = Client::ws(addr, "/ws/agent").await;
    c.send(json!({"type": "hello", "token": ghost})).await;
    c.expect_error("unauthorized").await;

    // Bad Origin: refused before the upgrade with 403 and the code in the body.
    let mut req = format!("ws://{addr}/ws/visitor").into_client_request().unwrap();
    req.headers_mut().insert("Origin", "https://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403);
            let body = String::from_utf8(resp.body().clone().unwrap_or_default()).unwrap();
            assert!(body.contains("forbidden_origin"), "{body}");
        }
        other => panic!("bad origin must be refused, got {other:?}"),
    }
    // Same-host origin is fine.
    let mut req = format!("ws://{addr}/ws/visitor").into_client_request().unwrap();
    req.headers_mut().insert("Origin", format!("http://{addr}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("same-origin upgrade");
    ws.send(Message::Text(json!({"type": "hello"}).to_string().into())).await.unwrap();

    // Oversized beyond the transport cap: the connection is closed, nothing else is disturbed.
    let mut big = Client::visitor(addr, json!({})).await;
    big.send_text(&"z".repeat(64 * 1024)).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(5), async { while big.try_recv().await.is_some() {} }).await.is_ok()
    );

    // Raw TCP garbage, including an overlong line and invalid UTF-8.
    let tcp = node.node.tcp_addr.unwrap();
    let mut s = tokio::net::TcpStream::connect(tcp).await.unwrap();
    s.write_all(b"\xff\xfe garbage\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("hello_required"));

    // Metrics counted the errors; health is fine; normal traffic flows.
    let (_, metrics) = http(addr, "GET", "/metrics", None, None).await;
    let text = metrics.as_str().unwrap_or_default().to_owned();
    assert!(text.contains("kefu_errors_total{code=\"bad_frame\"}"), "{text}");
    let (status, health) = http(addr, "GET", "/healthz", None, None).await;
    assert_eq!(status, 200, "{health}");
    control_chat_works(&node, &token).await;
    node.shutdown().await;
}

#[tokio::test]
async fn identity_enforce_mode_refuses_unverified_visitors() {
    let node = TestNode::start_with(|c| {
        c.identity.secret = "site-secret".into();
        c.identity.enforce = true;
    })
    .await;
    let addr = node.http();
    let mut c = Client::ws(addr, "/ws/visitor").await;
    c.send(json!({"type": "hello"})).await;
    c.expect_error("identity_required").await;
    let mut c = Client::ws(addr, "/ws/visitor").await;
    c.send(json!({"type": "hello", "user_id": "u-42", "identity_hash": "00".repeat(32)})).await;
    c.expect_error("identity_required").await;
    let hash = Signer::new(b"site-secret").identity_hash("u-42");
    let v = Client::visitor(addr, json!({"user_id": "u-42", "identity_hash": hash})).await;
    assert_eq!(v.id(), "u_u-42");
    let token = node.agent("alice", &[], 2).await;
    control_chat_works_verified(&node, &token, &hash).await;
    node.shutdown().await;
}

async fn control_chat_works_verified(node: &TestNode, token: &str, hash: &str) {
    let addr = node.http();
    let mut a = Client::agent(addr, token).await;
    let mut v = Client::visitor(addr, json!({"user_id": "u-42", "identity_hash": hash})).await;
    let conv = v.open(&[]).await;
    assert_eq!(a.accept_next_offer().await, conv);
    let seq = v.say(&conv, "verified").await;
    assert_eq!(a.messages(&conv, 1).await, vec![(seq, "verified".to_owned())]);
}

#[tokio::test]
async fn sensitive_words_are_masked_or_rejected() {
    let node = TestNode::start_with(|c| c.filter.words = vec!["darn".into()]).await;
    let addr = node.http();
    let token = node.agent("alice", &[], 2).await;
    let mut a = Client::agent(addr, &token).await;
    let mut v = Client::visitor(addr, json!({})).await;
    let conv = v.open(&[]).await;
    a.accept_next_offer().await;
    let seq = v.say(&conv, "this DARN thing").await;
    assert_eq!(a.messages(&conv, 1).await, vec![(seq, "this **** thing".to_owned())]);
    node.shutdown().await;

    let node = TestNode::start_with(|c| {
        c.filter.words = vec!["darn".into()];
        c.filter.mode = kefu_node::config::FilterMode::Reject;
    })
    .await;
    let mut v = Client::visitor(node.http(), json!({})).await;
    let conv = v.open(&[]).await;
    v.send(json!({"type": "send", "id": "x", "conv": conv, "text": "darn"})).await;
    v.expect_error("content_rejected").await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_and_others_are_unaffected() {
    let node = TestNode::start_with(|c| {
        c.limits.outbound_queue = 64;
        c.limits.frames_per_sec = 100_000;
        c.limits.burst = 100_000;
        c.limits.max_text_chars = 4000;
    })
    .await;
    let addr = node.http();
    let alice = node.agent("alice", &[], 2).await;
    let bob = node.agent("bob", &[], 2).await;
    let sup = node.agent("sup", &[], 2).await;
    let mut a = Client::agent(addr, &alice).await;
    let mut v = Client::visitor(addr, json!({})).await;
    let conv = v.open(&[]).await;
    a.accept_next_offer().await;

    // The slow watcher: raw TCP with a tiny receive buffer, says hello, watches, then never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut slow = sock.connect(node.node.tcp_addr.unwrap()).await.unwrap();
    slow.write_all(format!("{}\n", json!({"type": "hello", "role": "agent", "token": sup})).as_bytes()).await.unwrap();
    slow.write_all(format!("{}\n", json!({"type": "watch", "conv": conv})).as_bytes()).await.unwrap();
    // A healthy watcher that reads everything.
    let mut b = Client::agent(addr, &bob).await;
    b.send(json!({"type": "watch", "conv": conv})).await;
    b.expect_type("conversation").await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The visitor floods ~8 MB of messages.
    let n = 2000;
    let text = "m".repeat(3900);
    let watched = conv.clone();
    let reader = tokio::spawn(async move {
        let got = b.messages(&watched, n).await;
        (b, got)
    });
    // Windows of 16 in flight: a healthy reader is never more than a window behind.
    for w in 0..n / 16 {
        for i in w * 16..(w + 1) * 16 {
            v.send(json!({"type": "send", "id": format!("m{i}"), "conv": conv, "text": format!("{i} {text}")})).await;
        }
        let mut acks = 0;
        while acks < 16 {
            if v.recv().await["type"] == "ack" {
                acks += 1;
            }
        }
    }
    let (_b, got) = reader.await.unwrap();
    let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "healthy watcher got every message in order");
    assert!(got.iter().enumerate().all(|(i, (_, t))| t.starts_with(&format!("{i} "))));

    // The slow one was closed: draining its socket reaches EOF.
    let mut sink = vec![0u8; 1 << 16];
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        let mut total = 0usize;
        loop {
            match slow.read(&mut sink).await {
                Ok(0) | Err(_) => return total,
                Ok(k) => total += k,
            }
        }
    })
    .await
    .expect("slow consumer's socket is closed by the node");
    assert!(drained < n * text.len(), "it did not receive everything ({drained} bytes)");
    let (_, metrics) = http(addr, "GET", "/metrics", None, None).await;
    let text = metrics.as_str().unwrap_or_default().to_owned();
    let line = text.lines().find(|l| l.starts_with("kefu_slow_consumers_total")).unwrap();
    assert!(!line.ends_with(" 0"), "{line}");
    node.shutdown().await;
}
