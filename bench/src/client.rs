//! Protocol v1 clients for load: WebSocket connections from spread source addresses (127.0.0.x) with small
//! codec buffers, and the few handshakes the scenarios need.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub type Ws = WebSocketStream<TcpStream>;

/// Source address for connection `i`: 127.0.0.2, 127.0.0.3, … (one per 10,000 connections).
pub fn source_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (i / 10_000) as u8)
}

/// Open a WebSocket to `path`, bound to `src`; returns the socket and the handshake time.
pub async fn connect(addr: SocketAddr, path: &str, src: Ipv4Addr, buffer: usize) -> anyhow::Result<(Ws, Duration)> {
    connect_with(addr, path, src, buffer, None).await
}

/// [`connect`] with a kernel receive buffer of `rcvbuf` bytes: a slow consumer on a small buffer stands for
/// a stalled phone, whose few kilobytes of window fill at once (the default ~128 KiB would hide the stall
/// from the server for minutes at chat rates).
pub async fn connect_with(
    addr: SocketAddr,
    path: &str,
    src: Ipv4Addr,
    buffer: usize,
    rcvbuf: Option<u32>,
) -> anyhow::Result<(Ws, Duration)> {
    let start = Instant::now();
    let sock = TcpSocket::new_v4()?;
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n)?;
    }
    sock.bind(SocketAddr::from((src, 0)))?;
    let stream = sock.connect(addr).await.with_context(|| format!("connect {addr} from {src}"))?;
    stream.set_nodelay(true)?;
    let config = WebSocketConfig::default().read_buffer_size(buffer).write_buffer_size(buffer);
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(format!("ws://{addr}{path}"), stream, Some(config)).await?;
    Ok((ws, start.elapsed()))
}

pub async fn send(ws: &mut Ws, v: &Value) -> anyhow::Result<()> {
    ws.send(Message::Text(v.to_string().into())).await?;
    Ok(())
}

/// Next JSON frame (skipping pings), within `timeout`.
pub async fn recv(ws: &mut Ws, timeout: Duration) -> anyhow::Result<Value> {
    loop {
        match tokio::time::timeout(timeout, ws.next()).await {
            Err(_) => bail!("timed out waiting for a frame"),
            Ok(None) => bail!("connection closed"),
            Ok(Some(Err(e))) => bail!("websocket error: {e}"),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(serde_json::from_str(&t)?),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Read frames until one satisfies `pred`.
pub async fn until(ws: &mut Ws, timeout: Duration, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = recv(ws, left).await?;
        if v["type"] == "error" && v["code"] != "rate_limited" {
            bail!("server error: {v}");
        }
        if pred(&v) {
            return Ok(v);
        }
    }
}

/// hello → welcome.
pub async fn hello(ws: &mut Ws, token: Option<&str>) -> anyhow::Result<Value> {
    let mut h = json!({"type": "hello"});
    if let Some(t) = token {
        h["token"] = json!(t);
    }
    send(ws, &h).await?;
    until(ws, Duration::from_secs(30), |v| v["type"] == "welcome").await
}

/// Visitor opens a conversation; returns its id.
pub async fn open(ws: &mut Ws) -> anyhow::Result<String> {
    send(ws, &json!({"type": "open", "id": "o"})).await?;
    let ack = until(ws, Duration::from_secs(30), |v| v["type"] == "ack" && v["id"] == "o").await?;
    ack["conv"].as_str().map(str::to_owned).context("ack without conv")
}

/// Message text carrying what a receiver needs to check order and latency: `b:<visitor>:<n>:<intended_ns>`.
pub fn payload(visitor: usize, n: u64, intended_ns: u64, pad: usize) -> String {
    let mut s = format!("b:{visitor}:{n}:{intended_ns}:");
    s.extend(std::iter::repeat_n('x', pad));
    s
}

/// Parse `(visitor, n, intended_ns)` out of a raw `msg` frame without a full JSON parse.
pub fn parse_payload(frame: &str) -> Option<(usize, u64, u64)> {
    let at = frame.find("\"text\":\"b:")? + 10;
    let mut it = frame[at..].splitn(4, ':');
    let v = it.next()?.parse().ok()?;
    let n = it.next()?.parse().ok()?;
    let t = it.next()?.parse().ok()?;
    Some((v, n, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trips_through_a_msg_frame() {
        let text = payload(12, 7, 123_456, 5);
        let frame =
            json!({"type": "msg", "conv": "c", "entry": {"seq": 3, "kind": "message", "text": text}}).to_string();
        assert_eq!(parse_payload(&frame), Some((12, 7, 123_456)));
        assert_eq!(parse_payload(r#"{"type":"msg","entry":{"text":"hello"}}"#), None);
    }
}
