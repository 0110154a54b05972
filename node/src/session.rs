//! One client connection, whatever the transport: the `hello` handshake, authentication, rate limits
//! and frame validation on the way in; a bounded queue and a dedicated writer on the way out.
//!
//! The writer runs as its own task so a peer that stops reading blocks only its own writer: the engine
//! never waits on a socket, it finds the bounded queue full and closes the connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::adapter::{CloseCode, FrameReader, FrameWriter, Inbound, ProtocolAdapter};
use crate::conn::{CloseReason, Closer, Conn, Out};
use crate::context::NodeContext;
use crate::engine::{Command, Principal};
use crate::model::Role;
use crate::protocol::{ClientFrame, ErrorCode, ServerFrame, parse_client_frame};
use crate::rate_limit::TokenBucket;

/// Consecutive rate-limited frames after which the connection is closed.
const ABUSE_LIMIT: u32 = 200;
/// Longest time one outbound write may take before the peer is treated as a slow consumer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most queued frames written in one go.
const WRITE_BATCH: usize = 64;

/// Serve one connection until it closes. `role` is fixed by the endpoint (WebSocket) or taken from
/// `hello.role` (raw TCP).
pub async fn run<A: ProtocolAdapter>(adapter: A, ctx: Arc<NodeContext>, role: Option<Role>) {
    let (mut reader, mut writer) = adapter.split();
    let limits = &ctx.cfg.limits;

    // 1. hello, within the deadline.
    let hello = match tokio::time::timeout(Duration::from_secs(limits.hello_timeout_secs), reader.next()).await {
        Ok(Some(Ok(Inbound::Text(t)))) => parse_client_frame(&t),
        Ok(Some(Ok(Inbound::TooLarge(_)))) => Err((ErrorCode::FrameTooLarge, "frame too large".to_owned())),
        Ok(Some(Ok(_))) => Err((ErrorCode::HelloRequired, "first frame must be a hello text frame".to_owned())),
        Ok(None | Some(Err(_))) => return,
        Err(_) => Err((ErrorCode::HelloRequired, "no hello within the deadline".to_owned())),
    };
    let hello = match hello {
        Ok(ClientFrame::Hello(h)) => h,
        Ok(_) => return refuse(&ctx, &mut writer, ErrorCode::HelloRequired, "first frame must be hello").await,
        Err((code, msg)) => {
            let code = if code == ErrorCode::FrameTooLarge { code } else { ErrorCode::HelloRequired };
            return refuse(&ctx, &mut writer, code, &msg).await;
        }
    };
    if hello.v.is_some_and(|v| v != crate::protocol::VERSION) {
        return refuse(&ctx, &mut writer, ErrorCode::Invalid, "unsupported protocol version").await;
    }
    let role = match (role, hello.role) {
        (Some(r), None) => r,
        (Some(r), Some(h)) if r == h => r,
        (Some(_), Some(_)) => {
            return refuse(&ctx, &mut writer, ErrorCode::Invalid, "hello.role does not match the endpoint").await;
        }
        (None, Some(h)) => h,
        (None, None) => {
            return refuse(&ctx, &mut writer, ErrorCode::Invalid, "hello.role is required on this transport").await;
        }
    };
    let principal = match ctx.auth.authenticate(role, &hello) {
        Ok(p) => p,
        Err((code, msg)) => return refuse(&ctx, &mut writer, code, &msg).await,
    };

    // 2. register with the engine.
    let (tx, rx) = mpsc::channel::<Out>(limits.outbound_queue);
    let closer = Arc::new(Closer::default());
    let conn_id = ctx.next_conn_id();
    let conn = Conn { id: conn_id, out: tx.clone(), closer: closer.clone() };
    let who = match &principal {
        Principal::Visitor { id, .. } | Principal::Agent { id, .. } => id.clone(),
    };
    let registered = ctx
        .engine
        .ask(|reply| Command::Connect { conn, principal, resume: hello.resume.clone(), reply })
        .await
        .and_then(|r| r);
    if let Err(code) = registered {
        let msg = match code {
            ErrorCode::Unauthorized => "unknown agent or revoked token",
            _ => "node unavailable",
        };
        return refuse(&ctx, &mut writer, code, msg).await;
    }
    let span = tracing::info_span!("conn", id = conn_id, role = role.as_str(), who = %who, transport = A::NAME);
    serve(ctx, reader, writer, role, conn_id, closer, tx, rx).instrument(span).await;
}

/// The connected phase: a writer task plus the reader loop, until either side ends.
#[allow(clippy::too_many_arguments)]
async fn serve<R: FrameReader, W: FrameWriter>(
    ctx: Arc<NodeContext>,
    mut reader: R,
    mut writer: W,
    role: Role,
    conn_id: u64,
    closer: Arc<Closer>,
    tx: mpsc::Sender<Out>,
    mut rx: mpsc::Receiver<Out>,
) {
    let limits = &ctx.cfg.limits;
    tracing::debug!("connected");

    // 3. writer task: drains the queue; exits on close request or write failure.
    let ping_every = Duration::from_secs(ctx.cfg.server.ping_interval_secs);
    let frames_out = ctx.metrics.frames_out.with_label_values(&[role.as_str()]);
    let writer_closer = closer.clone();
    let writer_task = tokio::spawn(
        async move {
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        // Allocated while frames flow, released when the queue empties: idle connections stay small.
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                biased;
                reason = writer_closer.closed() => {
                    // Flush what is already queued (acks before a shutdown), best effort and bounded.
                    if matches!(reason, CloseReason::Reconnect) {
                        while let Ok(out) = rx.try_recv() {
                            if tokio::time::timeout(Duration::from_secs(1), writer.send(&out)).await.is_err() { break; }
                        }
                    }
                    let (frame, code) = match &reason {
                        CloseReason::Reconnect => (
                            ServerFrame::Reconnect { reason: "node shutting down".into(), retry_after_ms: 500 },
                            CloseCode::Restart,
                        ),
                        CloseReason::Error(c, m) => (ServerFrame::error(None, *c, m.clone()), close_code(*c)),
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(1), writer.send(&frame.to_json())).await;
                    let _ = tokio::time::timeout(Duration::from_secs(1), writer.close(code, code_reason(&frame))).await;
                    return;
                }
                n = rx.recv_many(&mut batch, WRITE_BATCH) => {
                    if n == 0 { return }
                    // Whatever queued up while the last write ran goes out in one write.
                    let sent = tokio::time::timeout(WRITE_TIMEOUT, writer.send_all(&batch)).await;
                    batch.clear();
                    if rx.is_empty() {
                        batch = Vec::new();
                    }
                    match sent {
                        Ok(Ok(())) => frames_out.inc_by(n as u64),
                        Ok(Err(_)) => return,
                        Err(_) => {
                            writer_closer.close(CloseReason::Error(ErrorCode::SlowConsumer, "write timed out".into()));
                            return;
                        }
                    }
                }
                _ = ping.tick() => {
                    if tokio::time::timeout(WRITE_TIMEOUT, writer.ping()).await.map_or(true, |r| r.is_err()) {
                        return;
                    }
                }
            }
        }
    }
        .in_current_span(),
    );

    // 4. reader loop.
    let mut bucket = TokenBucket::new(limits.frames_per_sec, limits.burst, Instant::now());
    let mut limited_in_a_row = 0u32;
    let idle = Duration::from_secs(ctx.cfg.server.idle_timeout_secs);
    let send_local = |frame: ServerFrame| {
        // Session-level errors go through the same bounded queue; a full queue means the writer is
        // already closing this connection.
        let _ = tx.try_send(Arc::from(frame.to_json()));
    };
    loop {
        let next = tokio::select! {
            n = tokio::time::timeout(idle, reader.next()) => n,
            _ = closer.closed() => break,
        };
        let inbound = match next {
            Err(_) => {
                closer.close(CloseReason::Error(ErrorCode::Unavailable, "idle timeout".into()));
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                if e.contains("too long") || e.contains("Space limit") || e.contains("capacity") {
                    closer.close(CloseReason::Error(
                        ErrorCode::FrameTooLarge,
                        "frame exceeds the transport limit".into(),
                    ));
                }
                break;
            }
            Ok(Some(Ok(i))) => i,
        };
        let text = match inbound {
            Inbound::Activity => continue,
            Inbound::TooLarge(n) => {
                count_error(&ctx, ErrorCode::FrameTooLarge);
                send_local(ServerFrame::error(
                    None,
                    ErrorCode::FrameTooLarge,
                    format!("frame of {n} bytes exceeds the limit of {} bytes", limits.max_frame_bytes),
                ));
                continue;
            }
            Inbound::NotText => {
                count_error(&ctx, ErrorCode::BadFrame);
                send_local(ServerFrame::error(None, ErrorCode::BadFrame, "frames must be UTF-8 JSON text"));
                continue;
            }
            Inbound::Text(t) => t,
        };
        if !bucket.allow(Instant::now()) {
            limited_in_a_row += 1;
            count_error(&ctx, ErrorCode::RateLimited);
            if limited_in_a_row >= ABUSE_LIMIT {
                tracing::warn!("closing connection that keeps flooding past the rate limit");
                closer.close(CloseReason::Error(ErrorCode::RateLimited, "rate limit exceeded repeatedly".into()));
                break;
            }
            if limited_in_a_row == 1 || limited_in_a_row.is_multiple_of(20) {
                send_local(ServerFrame::error(None, ErrorCode::RateLimited, "too many frames; slow down"));
            }
            continue;
        }
        limited_in_a_row = 0;
        let frame = match parse_client_frame(&text) {
            Ok(f) => f,
            Err((code, msg)) => {
                count_error(&ctx, code);
                send_local(ServerFrame::error(None, code, msg));
                continue;
            }
        };
        ctx.metrics.frames_in.with_label_values(&[frame.kind()]).inc();
        if ctx.engine.send(Command::Frame { conn: conn_id, frame, at: Instant::now() }).await.is_err() {
            break;
        }
    }
    let _ = ctx.engine.send(Command::Disconnect { conn: conn_id }).await;
    if !closer.is_closed() {
        closer.close(CloseReason::Error(ErrorCode::Unavailable, "connection closed".into()));
    }
    drop(tx);
    let _ = writer_task.await;
    tracing::debug!("disconnected");
}

async fn refuse<W: FrameWriter>(ctx: &NodeContext, writer: &mut W, code: ErrorCode, msg: &str) {
    count_error(ctx, code);
    let frame = ServerFrame::error(None, code, msg);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer.send(&frame.to_json())).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), writer.close(close_code(code), code.as_str())).await;
}

fn count_error(ctx: &NodeContext, code: ErrorCode) {
    ctx.metrics.errors.with_label_values(&[code.as_str()]).inc();
}

fn close_code(code: ErrorCode) -> CloseCode {
    match code {
        ErrorCode::FrameTooLarge => CloseCode::TooBig,
        ErrorCode::SlowConsumer | ErrorCode::Unavailable => CloseCode::TryAgain,
        _ => CloseCode::Policy,
    }
}

fn code_reason(frame: &ServerFrame) -> &'static str {
    match frame {
        ServerFrame::Error { code, .. } => code.as_str(),
        _ => "reconnect",
    }
}
