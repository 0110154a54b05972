//! Wiring: open the store, start the engine and the inbox, bind the HTTP (WebSocket + REST) and raw
//! TCP listeners, and shut everything down in order on request.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::adapter::tcp::TcpAdapter;
use crate::adapter::ws::WsAdapter;
use crate::auth::Auth;
use crate::config::Config;
use crate::context::NodeContext;
use crate::engine::{Command, Engine, EngineParts};
use crate::error::{Error, Result};
use crate::filter::WordFilter;
use crate::inbox::{LocalDirInbox, run_inbox};
use crate::metrics::Metrics;
use crate::model::{Agent, Role};
use crate::ownership::LocalOwnership;
use crate::protocol::ErrorCode;
use crate::store::{Op, Store, WriterOptions, encode};

/// A started node.
#[derive(Debug)]
pub struct RunningNode {
    pub http_addr: SocketAddr,
    pub tcp_addr: Option<SocketAddr>,
    /// Token of the demo agent when it was created by this start.
    pub demo_token: Option<String>,
    pub ctx: Arc<NodeContext>,
    shutdown_tx: watch::Sender<bool>,
    http_task: tokio::task::JoinHandle<()>,
    engine_task: tokio::task::JoinHandle<()>,
    inbox_task: tokio::task::JoinHandle<()>,
}

/// The token signing secret: configured, or generated once and kept in the data dir (mode 0600).
pub fn load_or_create_secret(cfg: &Config) -> Result<Vec<u8>> {
    if !cfg.auth.secret.is_empty() {
        return Ok(cfg.auth.secret.as_bytes().to_vec());
    }
    let dir = &cfg.data.dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create data dir {}", dir.display()), e))?;
    let path = dir.join("secret.key");
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() >= 32 => return Ok(s.trim().as_bytes().to_vec()),
        Ok(_) => return Err(Error::Config(format!("{} is too short; delete it to regenerate", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
    }
    let secret: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    write_private(&path, &secret).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    Ok(secret.into_bytes())
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// The store threads' timing from the config, reporting into the node's metrics.
pub(crate) fn writer_options(cfg: &Config, metrics: &Metrics) -> WriterOptions {
    WriterOptions {
        commit_interval: Duration::from_micros(cfg.data.commit_interval_us),
        index_interval: Duration::from_millis(cfg.data.index_interval_ms),
        commit_seconds: metrics.store_commit.with_label_values(&["wal"]),
        index_seconds: metrics.store_commit.with_label_values(&["index"]),
        unindexed: metrics.unindexed_ops.clone(),
    }
}

/// Start a node: returns once both listeners are bound and the engine has recovered its state.
pub async fn start(cfg: Config) -> Result<RunningNode> {
    cfg.validate()?;
    let cfg = Arc::new(cfg);
    // Bind first: a port conflict must fail before anything is written (e.g. the demo agent).
    let http = TcpListener::bind(cfg.server.listen)
        .await
        .map_err(|e| Error::io(format!("bind server.listen {}", cfg.server.listen), e))?;
    let http_addr = http.local_addr().map_err(|e| Error::io("local addr", e))?;
    let tcp = if cfg.server.tcp_listen.is_empty() {
        None
    } else {
        let addr: SocketAddr = cfg.server.tcp_listen.parse().map_err(|_| Error::Config("server.tcp_listen".into()))?;
        Some(TcpListener::bind(addr).await.map_err(|e| Error::io(format!("bind server.tcp_listen {addr}"), e))?)
    };
    // One descriptor per connection plus the store's files and some slack: sized now, not during a storm.
    match crate::fd_table::presize(cfg.limits.max_connections + 256) {
        Some(top) => tracing::debug!(descriptors = top, "file-descriptor table sized up front"),
        None => tracing::warn!("could not size the file-descriptor table up front; accepts may stall while it grows"),
    }
    let metrics = Metrics::new();
    let secret = load_or_create_secret(&cfg)?;
    let auth = Auth::new(&cfg, &secret);
    let store = Store::open(&cfg.data.dir)?;

    // First embedded start: a demo agent so `make run` is a working demo at once.
    let mut demo_token = None;
    if cfg.demo.enabled && store.load(0)?.agents.is_empty() {
        let demo = Agent {
            id: "demo".into(),
            name: "Demo Agent".into(),
            skills: vec!["general".into()],
            capacity: 5,
            admin: true,
            token_epoch: 0,
        };
        store.write_now(vec![Op::Agent { id: demo.id.clone(), json: encode(&demo) }])?;
        demo_token = Some(auth.agent_token(&demo));
    }

    let filter = WordFilter::new(&cfg.filter_words()?, cfg.filter.mode)?;
    // One writer for the engine and the REST API: the log has one appender. Durable tokens go to the engine.
    let (durable_tx, durable_rx) = mpsc::unbounded_channel();
    let writer = store.spawn_writer(durable_tx, writer_options(&cfg, &metrics))?;
    let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
    let (engine, engine_task) = Engine::start(EngineParts {
        cfg: (*cfg).clone(),
        metrics: metrics.clone(),
        store: store.clone(),
        writer: writer.clone(),
        durable: durable_rx,
        ownership: Arc::new(LocalOwnership),
        filter,
        inbox: Some(inbox_tx),
    })?;
    let inbox_store = LocalDirInbox::new(&cfg.data.dir.join("inbox"))?;
    let drained_engine = engine.clone();
    let inbox_task = tokio::spawn(run_inbox(Box::new(inbox_store), inbox_rx, move |conn, items| {
        let e = drained_engine.clone();
        tokio::spawn(async move {
            let _ = e.send(Command::InboxDrained { conn, items }).await;
        });
    }));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let ctx = Arc::new(NodeContext::new(cfg.clone(), engine, auth, metrics, store, writer, shutdown_rx.clone()));

    let tcp_addr = match tcp {
        Some(l) => {
            let bound = l.local_addr().map_err(|e| Error::io("local addr", e))?;
            tokio::spawn(tcp_accept_loop(l, ctx.clone(), shutdown_rx.clone()));
            Some(bound)
        }
        None => None,
    };

    let app = router(ctx.clone());
    let mut http_shutdown = shutdown_rx.clone();
    let send_buffer = cfg.limits.socket_send_buffer_bytes;
    let http_task = tokio::spawn(async move {
        let http = axum::serve::ListenerExt::tap_io(http, move |tcp: &mut tokio::net::TcpStream| {
            tune_client_socket(tcp, send_buffer);
        });
        let serve = axum::serve(http, app.into_make_service_with_connect_info::<SocketAddr>()).with_graceful_shutdown(
            async move {
                let _ = http_shutdown.wait_for(|s| *s).await;
            },
        );
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "http server failed");
        }
    });
    tracing::info!(%http_addr, tcp_addr = ?tcp_addr, node = %cfg.node_id, data_dir = %cfg.data.dir.display(), "kefu-node listening");
    Ok(RunningNode { http_addr, tcp_addr, demo_token, ctx, shutdown_tx, http_task, engine_task, inbox_task })
}

impl RunningNode {
    /// Graceful shutdown: stop accepting, let in-flight writes become durable and acked, tell every
    /// client to reconnect, wait (bounded) for connections to close.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        // Refuse new connections first (readyz fails, upgrades get 503), then drain the engine: in-flight
        // writes become durable and acked, every client is told to reconnect. Only then stop the
        // listeners, so no client is cut off before it heard `reconnect`.
        self.ctx.set_ready(false);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.ctx.engine.ask(|reply| Command::Shutdown { reply }))
            .await;
        let grace = Duration::from_secs(self.ctx.cfg.server.shutdown_grace_secs);
        let deadline = tokio::time::Instant::now() + grace;
        while self.ctx.open_connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.shutdown_tx.send(true);
        let _ = self.ctx.writer.flush().await;
        let _ = tokio::time::timeout(grace, self.http_task).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.engine_task).await;
        // The engine held the inbox's only sender: the inbox task now writes what is still queued and ends.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inbox_task).await;
        tracing::info!("shutdown complete");
    }
}

/// Chat frames are small and latency-bound: no Nagle delay; and a bounded kernel send buffer, so a client
/// that stops reading is found out (and closed as a slow consumer) before it pins megabytes.
fn tune_client_socket(tcp: &tokio::net::TcpStream, send_buffer: usize) {
    let _ = tcp.set_nodelay(true);
    if send_buffer > 0 {
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(tcp, send_buffer);
    }
}

async fn tcp_accept_loop(listener: TcpListener, ctx: Arc<NodeContext>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            r = listener.accept() => match r {
                Ok((stream, _peer)) => {
                    let Some(slot) = ctx.try_open() else {
                        drop(stream);
                        continue;
                    };
                    tune_client_socket(&stream, ctx.cfg.limits.socket_send_buffer_bytes);
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        let max = ctx.cfg.limits.max_frame_bytes;
                        crate::session::run(TcpAdapter { stream, max_frame_bytes: max }, ctx, None).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// The HTTP routes: WebSocket endpoints, REST, health and metrics.
pub fn router(ctx: Arc<NodeContext>) -> axum::Router {
    axum::Router::new()
        .route("/ws/visitor", get(ws_visitor))
        .route("/ws/agent", get(ws_agent))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(crate::api::router())
        .merge(crate::web::router())
        .layer(axum::middleware::map_response(security_headers))
        .with_state(ctx)
}

async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    resp
}

async fn ws_visitor(
    State(ctx): State<Arc<NodeContext>>,
    ConnectInfo(_peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(ctx, headers, ws, Role::Visitor)
}

async fn ws_agent(
    State(ctx): State<Arc<NodeContext>>,
    ConnectInfo(_peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(ctx, headers, ws, Role::Agent)
}

fn refusal(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "code": code.as_str(), "message": message }))).into_response()
}

fn upgrade(ctx: Arc<NodeContext>, headers: HeaderMap, ws: WebSocketUpgrade, role: Role) -> Response {
    if !origin_allowed(&ctx.cfg.server.allowed_origins, &headers) {
        ctx.metrics.errors.with_label_values(&[ErrorCode::ForbiddenOrigin.as_str()]).inc();
        return refusal(StatusCode::FORBIDDEN, ErrorCode::ForbiddenOrigin, "origin not allowed");
    }
    if !ctx.is_ready() {
        return refusal(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, "node is shutting down");
    }
    let Some(slot) = ctx.try_open() else {
        return refusal(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, "node is at its connection limit");
    };
    let limits = &ctx.cfg.limits;
    let max = limits.max_frame_bytes;
    ws.read_buffer_size(limits.ws_read_buffer_bytes)
        .write_buffer_size(limits.ws_buffer_bytes)
        .max_write_buffer_size(limits.ws_buffer_bytes.max(max) * 64)
        // Frames between the protocol limit and this hard cap get a `frame_too_large` error frame and the
        // connection lives on; beyond it the codec refuses to buffer them and the connection is closed.
        .max_message_size(max * 4)
        .max_frame_size(max * 4)
        .on_upgrade(move |socket| async move {
            crate::session::run(WsAdapter { socket, max_frame_bytes: max }, ctx, Some(role)).await;
            drop(slot);
        })
}

/// Browsers send Origin; non-browser clients usually do not (allowed: Origin is a browser protection).
/// An Origin naming this node's own Host is always allowed.
pub fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else { return true };
    if allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin.trim_end_matches('/'))) {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let origin_host = origin.split_once("://").map_or("", |(_, h)| h.trim_end_matches('/'));
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
}

async fn healthz(State(ctx): State<Arc<NodeContext>>) -> Response {
    match tokio::time::timeout(Duration::from_secs(2), ctx.engine.ask(|reply| Command::Stats { reply })).await {
        Ok(Ok(s)) if s.healthy => axum::Json(serde_json::json!({ "status": "ok", "stats": s })).into_response(),
        Ok(Ok(s)) => {
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({ "status": "store failed", "stats": s })))
                .into_response()
        }
        _ => refusal(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, "engine not responding"),
    }
}

async fn readyz(State(ctx): State<Arc<NodeContext>>) -> Response {
    if ctx.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    }
}

async fn metrics(State(ctx): State<Arc<NodeContext>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], ctx.metrics.render()).into_response()
}
