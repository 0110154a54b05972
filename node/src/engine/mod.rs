//! The conversation engine: the single writer of conversations, agent load and the queue.
//!
//! One task owns all mutable chat state and processes commands in order, so `seq` assignment,
//! idempotency and agent capacity need no locks and cannot race. State changes apply in memory at
//! once (so the next command sees them, which is what keeps capacity exact), but clients learn of them
//! only when the store reports the batch durable: acks, fan-out and notifications are *effects*
//! released in commit order. A crash before commit loses only what nobody was told about.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, Strategy};
use crate::conn::{CloseReason, Conn, ConnId, Out};
use crate::filter::{Verdict, WordFilter};
use crate::inbox::InboxCmd;
use crate::metrics::Metrics;
use crate::model::{
    Agent, AgentStatus, Body, ConvState, Conversation, ConversationSummary, Entry, Event, Hlc, Participant, Rating,
    new_id, now_ms,
};
use crate::ownership::{Owner, Ownership};
use crate::protocol::{ClientFrame, ErrorCode, Limits, ResumeCursor, ServerFrame, VERSION, Welcome};
use crate::router::{self, Candidate, Router};
use crate::store::{Batch, Done, DurableEvent, Op, Store, Writer, encode};

mod conversation;
mod delivery;
mod routing;
mod view;

#[cfg(test)]
mod tests;

/// Entries kept in memory per open conversation for cheap resume.
const RECENT: usize = 256;

/// Who an authenticated connection speaks for.
#[derive(Debug, Clone)]
pub enum Principal {
    Visitor { id: String, name: Option<String>, token: Option<String> },
    Agent { id: String, epoch: u32 },
}

/// Commands to the engine.
#[derive(Debug)]
pub enum Command {
    Connect {
        conn: Conn,
        principal: Principal,
        resume: Vec<ResumeCursor>,
        reply: oneshot::Sender<Result<(), ErrorCode>>,
    },
    Frame {
        conn: ConnId,
        frame: ClientFrame,
        at: Instant,
    },
    Disconnect {
        conn: ConnId,
    },
    InboxDrained {
        conn: ConnId,
        items: Vec<(String, Entry)>,
    },
    PutAgent {
        agent: Agent,
        reply: oneshot::Sender<Result<(), ErrorCode>>,
    },
    Agents {
        reply: oneshot::Sender<Vec<AgentView>>,
    },
    Stats {
        reply: oneshot::Sender<Stats>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

impl Command {
    /// For logs: what kind of command this is.
    fn kind(&self) -> &'static str {
        match self {
            Command::Connect { .. } => "connect",
            Command::Frame { .. } => "frame",
            Command::Disconnect { .. } => "disconnect",
            Command::InboxDrained { .. } => "inbox_drained",
            Command::PutAgent { .. } => "put_agent",
            Command::Agents { .. } => "agents",
            Command::Stats { .. } => "stats",
            Command::Shutdown { .. } => "shutdown",
        }
    }
}

/// An engine step longer than this is logged: every connection waits while the engine works.
const SLOW_STEP: Duration = Duration::from_millis(50);

/// An agent as the REST API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentView {
    pub id: String,
    pub name: String,
    pub skills: Vec<String>,
    pub capacity: u32,
    pub admin: bool,
    pub status: AgentStatus,
    pub connections: usize,
    pub assigned: Vec<String>,
    pub offered: Vec<String>,
}

/// Engine counters for health and tests.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    pub connections: usize,
    pub open_conversations: usize,
    pub queued: usize,
    pub pending_batches: usize,
    pub healthy: bool,
}

/// Cheap handle to the engine task.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
}

impl EngineHandle {
    pub async fn send(&self, cmd: Command) -> Result<(), ErrorCode> {
        self.tx.send(cmd).await.map_err(|_| ErrorCode::Unavailable)
    }

    /// Request/response helper.
    pub async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, ErrorCode> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| ErrorCode::Unavailable)
    }
}

/// Things released when a batch becomes durable.
#[derive(Debug)]
enum Effect {
    /// A new log entry: fan out, ack the author's frame.
    Entry { conv: String, entry: Arc<Entry>, ack: Option<(ConnId, String)> },
    /// Send a prepared frame to one connection.
    Frame { conn: ConnId, out: Out },
    /// Send the conversation's current summary to its participants (and these extra connections).
    Summary { conv: String, extra: Vec<ConnId> },
    /// Tell the visitor their queue position (after the conversation they are queued with exists).
    Position { conv: String },
    /// Agent creation/update finished.
    Reply(oneshot::Sender<Result<(), ErrorCode>>),
}

#[derive(Debug)]
struct Pending {
    effects: Vec<Effect>,
    /// When the first frame behind this batch was read off its socket.
    at: Instant,
    /// When the batch went to the store.
    submitted: Instant,
}

struct ConnState {
    conn: Conn,
    key: String,
    /// While the offline inbox is being drained, live frames wait here to keep order.
    syncing: Option<Vec<Out>>,
    /// Conversations replayed at connect (their inbox items are redundant).
    resumed: HashSet<String>,
    /// Conversations this connection watches, so a disconnect touches only those.
    watching: HashSet<String>,
}

#[derive(Default)]
struct VisitorRt {
    conns: Vec<ConnId>,
    name: Option<String>,
    open: BTreeSet<String>,
}

struct AgentRt {
    agent: Agent,
    conns: Vec<ConnId>,
    status: AgentStatus,
    assigned: BTreeSet<String>,
    offered: BTreeSet<String>,
}

impl AgentRt {
    /// A registered agent, offline until it connects.
    fn new(agent: Agent) -> Self {
        AgentRt {
            agent,
            conns: Vec::new(),
            status: AgentStatus::Offline,
            assigned: BTreeSet::new(),
            offered: BTreeSet::new(),
        }
    }
    fn load(&self) -> u32 {
        (self.assigned.len() + self.offered.len()) as u32
    }
    fn available(&self) -> bool {
        self.status == AgentStatus::Online && !self.conns.is_empty()
    }
}

struct Offer {
    agent: String,
    expires: Instant,
}

struct TypingState {
    last_forward: Option<Instant>,
    pending: HashMap<String, (Participant, bool)>,
}

struct ConvRt {
    meta: Conversation,
    /// Highest seq assigned (durable or not).
    next_seq: u64,
    /// Highest seq known durable; only these are ever shown to clients.
    durable_seq: u64,
    recent: VecDeque<Arc<Entry>>,
    /// `participant_key/client_id` → seq.
    idem: HashMap<String, u64>,
    /// Whether `idem` holds every id of this conversation (new ones, and open ones loaded at start), so a
    /// miss needs no store read on the send path. Closed conversations loaded on demand consult the store.
    idem_complete: bool,
    /// Retries that arrived before the original was durable: seq → (conn, frame id).
    waiters: HashMap<u64, Vec<(ConnId, String)>>,
    offer: Option<Offer>,
    declined: Vec<String>,
    watchers: HashSet<ConnId>,
    typing: TypingState,
    last_position: Option<usize>,
}

/// The engine task's state.
pub struct Engine {
    cfg: Config,
    metrics: Metrics,
    store: Store,
    writer: Writer,
    inbox: Option<mpsc::UnboundedSender<InboxCmd>>,
    ownership: Arc<dyn Ownership>,
    filter: WordFilter,
    router: Router,
    hlc: Hlc,
    conns: HashMap<ConnId, ConnState>,
    visitors: HashMap<String, VisitorRt>,
    agents: HashMap<String, AgentRt>,
    convs: HashMap<String, ConvRt>,
    /// Longest waiting first: (queued_ms, conv id).
    queue: BTreeSet<(u64, String)>,
    pending: VecDeque<(u64, Pending)>,
    next_token: u64,
    dirty_meta: HashSet<String>,
    /// Offer deadlines, soonest first (an entry whose conversation's offer changed since is skipped).
    offer_deadlines: BTreeSet<(Instant, String)>,
    /// Conversations holding coalesced typing indicators not yet forwarded.
    typing_due: HashSet<String>,
    /// Ticks since start, to run the closed-conversation sweep now and then rather than every tick.
    ticks: u64,
    /// Moving average of recent queue waits, for the visitor's estimated wait.
    wait_ema_ms: Option<f64>,
    healthy: bool,
    shutting_down: bool,
    /// `kefu_message_stage_seconds` series, resolved once.
    stage_engine_queue: prometheus::Histogram,
    stage_durable_wait: prometheus::Histogram,
    /// `kefu_engine_step_seconds` series by step kind, resolved on first use (a lookup per step otherwise).
    step_timers: Vec<(&'static str, prometheus::Histogram)>,
}

/// Everything the engine needs from the outside.
pub struct EngineParts {
    pub cfg: Config,
    pub metrics: Metrics,
    pub store: Store,
    /// The store writer (shared with the REST API) and the channel its durable tokens arrive on.
    pub writer: Writer,
    pub durable: mpsc::UnboundedReceiver<DurableEvent>,
    pub ownership: Arc<dyn Ownership>,
    pub filter: WordFilter,
    pub inbox: Option<mpsc::UnboundedSender<InboxCmd>>,
}

impl Engine {
    /// Rebuild state from the store and start the engine task.
    pub fn start(parts: EngineParts) -> crate::error::Result<(EngineHandle, tokio::task::JoinHandle<()>)> {
        let durable_rx = parts.durable;
        let writer = parts.writer;
        let snapshot = parts.store.load(RECENT)?;
        let mut engine = Engine {
            stage_engine_queue: parts.metrics.message_stage.with_label_values(&["engine_queue"]),
            stage_durable_wait: parts.metrics.message_stage.with_label_values(&["durable_wait"]),
            step_timers: Vec::new(),
            cfg: parts.cfg,
            metrics: parts.metrics,
            store: parts.store,
            writer,
            inbox: parts.inbox,
            ownership: parts.ownership,
            filter: parts.filter,
            router: Router::default(),
            hlc: Hlc::default(),
            conns: HashMap::new(),
            visitors: HashMap::new(),
            agents: HashMap::new(),
            convs: HashMap::new(),
            queue: BTreeSet::new(),
            pending: VecDeque::new(),
            next_token: 1,
            dirty_meta: HashSet::new(),
            offer_deadlines: BTreeSet::new(),
            typing_due: HashSet::new(),
            ticks: 0,
            wait_ema_ms: None,
            healthy: true,
            shutting_down: false,
        };
        for agent in snapshot.agents {
            engine.agents.insert(agent.id.clone(), AgentRt::new(agent));
        }
        for open in snapshot.open {
            if let Some(e) = open.recent.last() {
                engine.hlc.observe(e.hlc);
            }
            let id = open.meta.id.clone();
            engine.index_conversation(&open.meta);
            let mut rt = new_rt(open.meta, open.last_seq);
            rt.recent = open.recent.into_iter().map(Arc::new).collect();
            rt.idem = open.idem;
            rt.idem_complete = true;
            engine.convs.insert(id, rt);
        }
        engine.update_gauges();
        engine.update_open_gauge();
        tracing::info!(
            agents = engine.agents.len(),
            open_conversations = engine.convs.len(),
            queued = engine.queue.len(),
            "engine state recovered from store"
        );
        let (tx, rx) = mpsc::channel(65_536);
        let handle = EngineHandle { tx };
        let task = tokio::spawn(engine.run(rx, durable_rx));
        Ok((handle, task))
    }

    fn index_conversation(&mut self, meta: &Conversation) {
        if meta.state == ConvState::Closed {
            return;
        }
        self.visitors.entry(meta.visitor.clone()).or_default().open.insert(meta.id.clone());
        if meta.visitor_name.is_some() {
            if let Some(v) = self.visitors.get_mut(&meta.visitor) {
                v.name.clone_from(&meta.visitor_name);
            }
        }
        match meta.state {
            ConvState::Queued => {
                self.queue.insert((meta.queued_ms.unwrap_or(meta.created_ms), meta.id.clone()));
            }
            ConvState::Assigned => {
                if let Some(a) = meta.agent.as_ref().and_then(|a| self.agents.get_mut(a)) {
                    a.assigned.insert(meta.id.clone());
                }
            }
            _ => {}
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>, mut durable_rx: mpsc::UnboundedReceiver<DurableEvent>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown_reply: Option<oneshot::Sender<()>> = None;
        loop {
            enum Event {
                Durable(DurableEvent),
                Cmd(Command),
                Tick,
            }
            let event = tokio::select! {
                biased;
                Some(ev) = durable_rx.recv() => Event::Durable(ev),
                cmd = rx.recv() => match cmd {
                    Some(Command::Shutdown { reply }) => {
                        self.begin_shutdown();
                        shutdown_reply = Some(reply);
                        break;
                    }
                    Some(cmd) => Event::Cmd(cmd),
                    None => break,
                },
                _ = tick.tick() => Event::Tick,
            };
            let started = Instant::now();
            let step = match event {
                Event::Durable(ev) => {
                    self.on_durable(ev);
                    "durable"
                }
                Event::Cmd(cmd) => {
                    let kind = cmd.kind();
                    self.handle(cmd);
                    kind
                }
                Event::Tick => {
                    self.on_tick();
                    "tick"
                }
            };
            // Everything waits while the engine works: a long step shows up in everyone's latency.
            let took = started.elapsed();
            self.step_timer(step).observe(took.as_secs_f64());
            if took >= SLOW_STEP {
                tracing::warn!(step, took_ms = took.as_millis() as u64, "slow engine step");
            }
        }
        // Drain: let in-flight batches become durable so their acks go out before sockets close.
        self.persist_dirty();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.pending.is_empty() && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(200), durable_rx.recv()).await {
                Ok(Some(ev)) => self.on_durable(ev),
                Ok(None) => break,
                Err(_) => {}
            }
        }
        let _ = self.writer.flush().await;
        for c in self.conns.values() {
            c.conn.closer.close(CloseReason::Reconnect);
        }
        if let Some(r) = shutdown_reply {
            let _ = r.send(());
        }
    }

    fn step_timer(&mut self, step: &'static str) -> &prometheus::Histogram {
        let i = match self.step_timers.iter().position(|(k, _)| *k == step) {
            Some(i) => i,
            None => {
                self.step_timers.push((step, self.metrics.engine_step.with_label_values(&[step])));
                self.step_timers.len() - 1
            }
        };
        &self.step_timers[i].1
    }

    fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        tracing::info!(connections = self.conns.len(), "engine draining");
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Connect { conn, principal, resume, reply } => {
                let r = self.connect(conn, principal, &resume);
                let _ = reply.send(r);
            }
            Command::Frame { conn, frame, at } => self.on_frame(conn, frame, at),
            Command::Disconnect { conn } => self.disconnect(conn),
            Command::InboxDrained { conn, items } => self.inbox_drained(conn, items),
            Command::PutAgent { agent, reply } => self.put_agent(agent, reply),
            Command::Agents { reply } => {
                let _ = reply.send(self.agent_views());
            }
            Command::Stats { reply } => {
                let _ = reply.send(Stats {
                    connections: self.conns.len(),
                    open_conversations: self.convs.values().filter(|c| c.meta.state != ConvState::Closed).count(),
                    queued: self.queue.len(),
                    pending_batches: self.pending.len(),
                    healthy: self.healthy,
                });
            }
            Command::Shutdown { .. } => {}
        }
    }

    // ---------------------------------------------------------------- connections

    fn connect(&mut self, conn: Conn, principal: Principal, resume: &[ResumeCursor]) -> Result<(), ErrorCode> {
        if self.shutting_down || !self.healthy {
            return Err(ErrorCode::Unavailable);
        }
        let id = conn.id;
        let (role, pid, token) = match &principal {
            Principal::Visitor { id, name, token } => {
                let v = self.visitors.entry(id.clone()).or_default();
                v.conns.push(conn.id);
                if name.is_some() {
                    v.name.clone_from(name);
                }
                (crate::model::Role::Visitor, id.clone(), token.clone())
            }
            Principal::Agent { id, epoch } => {
                let Some(a) = self.agents.get_mut(id) else { return Err(ErrorCode::Unauthorized) };
                if *epoch < a.agent.token_epoch {
                    return Err(ErrorCode::Unauthorized);
                }
                a.conns.push(conn.id);
                let was = a.status;
                if a.status == AgentStatus::Offline {
                    a.status = AgentStatus::Online;
                }
                let now = a.status;
                if was != now {
                    self.broadcast_presence(id, now);
                }
                (crate::model::Role::Agent, id.clone(), None)
            }
        };
        let key = format!("{}:{}", role.as_str(), pid);
        self.metrics.connections.with_label_values(&[role.as_str()]).inc();
        self.conns.insert(
            id,
            ConnState { conn, key: key.clone(), syncing: None, resumed: HashSet::new(), watching: HashSet::new() },
        );
        let conversations = self.summaries_for(&key);
        let welcome = ServerFrame::Welcome(Welcome {
            v: VERSION,
            session: new_id("s"),
            node: self.cfg.node_id.clone(),
            role,
            id: pid.clone(),
            token,
            conversations,
            limits: Limits {
                max_frame_bytes: self.cfg.limits.max_frame_bytes,
                max_text_chars: self.cfg.limits.max_text_chars,
                frames_per_sec: self.cfg.limits.frames_per_sec,
            },
        });
        self.push(id, &welcome);
        for cur in resume {
            if self.can_read(&key, id, &cur.conv) {
                self.replay(id, None, &cur.conv, cur.last_seq);
                if let Some(c) = self.conns.get_mut(&id) {
                    c.resumed.insert(cur.conv.clone());
                }
            }
        }
        if role == crate::model::Role::Agent {
            // Re-send live offers to the new connection.
            let offered: Vec<String> =
                self.agents.get(&pid).map(|a| a.offered.iter().cloned().collect()).unwrap_or_default();
            for conv in offered {
                if let Some(frame) = self.offer_frame(&conv) {
                    self.push(id, &frame);
                }
            }
            self.dispatch();
        } else {
            let open: Vec<String> =
                self.visitors.get(&pid).map(|v| v.open.iter().cloned().collect()).unwrap_or_default();
            for conv in open {
                self.send_position(&conv, true);
            }
        }
        if let Some(inbox) = &self.inbox {
            if let Some(c) = self.conns.get_mut(&id) {
                c.syncing = Some(Vec::new());
            }
            let _ = inbox.send(InboxCmd::Take { recipient: key, conn: id });
        }
        Ok(())
    }

    fn inbox_drained(&mut self, conn: ConnId, items: Vec<(String, Entry)>) {
        let Some(state) = self.conns.get_mut(&conn) else { return };
        let buffered = state.syncing.take().unwrap_or_default();
        let resumed = std::mem::take(&mut state.resumed);
        let mut by_conv: std::collections::BTreeMap<String, Vec<Entry>> = std::collections::BTreeMap::new();
        for (conv, e) in items {
            if !resumed.contains(&conv) {
                by_conv.entry(conv).or_default().push(e);
            }
        }
        for (conv, mut entries) in by_conv {
            entries.sort_by_key(|e| e.seq);
            entries.dedup_by_key(|e| e.seq);
            let last_seq = entries.last().map_or(0, |e| e.seq);
            let frame = ServerFrame::Replay { conv, entries, last_seq };
            self.push(conn, &frame);
        }
        for out in buffered {
            self.push_out(conn, out);
        }
    }

    fn disconnect(&mut self, conn: ConnId) {
        let Some(state) = self.conns.remove(&conn) else { return };
        let (role, pid) = split_key(&state.key);
        self.metrics.connections.with_label_values(&[role]).dec();
        for conv in &state.watching {
            if let Some(c) = self.convs.get_mut(conv) {
                c.watchers.remove(&conn);
            }
        }
        if role == "visitor" {
            if let Some(v) = self.visitors.get_mut(pid) {
                v.conns.retain(|c| *c != conn);
                if v.conns.is_empty() && v.open.is_empty() {
                    self.visitors.remove(pid);
                }
            }
        } else if let Some(a) = self.agents.get_mut(pid) {
            a.conns.retain(|c| *c != conn);
            if a.conns.is_empty() {
                a.status = AgentStatus::Offline;
                let offered: Vec<String> = a.offered.iter().cloned().collect();
                let pid = pid.to_owned();
                for conv in offered {
                    self.withdraw_offer(&conv, true);
                }
                self.broadcast_presence(&pid, AgentStatus::Offline);
                self.dispatch();
            }
        }
    }

    /// Queue a frame for one connection; a full queue closes it as a slow consumer.
    fn push(&mut self, conn: ConnId, frame: &ServerFrame) {
        let out: Out = Arc::from(frame.to_json());
        self.push_out(conn, out);
    }

    fn push_out(&mut self, conn: ConnId, out: Out) {
        let limit = self.cfg.limits.outbound_queue;
        let Some(state) = self.conns.get_mut(&conn) else { return };
        let full = match state.syncing.as_mut() {
            // Held until the offline inbox has been read (see `inbox_drained`); bounded like the queue, so a
            // stalled inbox read cannot make one connection hold unbounded memory.
            Some(buf) if buf.len() < limit => {
                buf.push(out);
                return;
            }
            Some(_) => "the offline inbox could not be read in time: reconnect and resume",
            None => match state.conn.out.try_send(out) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    "outbound queue full: the connection did not read fast enough"
                }
            },
        };
        tracing::warn!(conn, key = %state.key, reason = full, "closing slow consumer");
        self.metrics.slow_consumers.inc();
        state.conn.closer.close(CloseReason::Error(ErrorCode::SlowConsumer, full.into()));
        self.disconnect(conn);
    }

    fn error(&mut self, conn: ConnId, id: Option<&str>, code: ErrorCode, message: &str, conv: Option<&str>) {
        self.metrics.errors.with_label_values(&[code.as_str()]).inc();
        let frame = ServerFrame::Error {
            id: id.map(str::to_owned),
            code,
            message: message.to_owned(),
            conv: conv.map(str::to_owned),
            last_seq: None,
        };
        self.push(conn, &frame);
    }

    // ---------------------------------------------------------------- frames

    fn on_frame(&mut self, conn: ConnId, frame: ClientFrame, at: Instant) {
        self.stage_engine_queue.observe(at.elapsed().as_secs_f64());
        let Some(state) = self.conns.get(&conn) else { return };
        let key = state.key.clone();
        let fid = frame.id().map(str::to_owned);
        if self.shutting_down {
            self.error(conn, fid.as_deref(), ErrorCode::Unavailable, "node is shutting down; reconnect", None);
            return;
        }
        if !self.healthy {
            self.error(conn, fid.as_deref(), ErrorCode::Internal, "store unavailable", None);
            return;
        }
        let is_agent = key.starts_with("agent:");
        let result = match frame {
            ClientFrame::Hello(_) => Err((ErrorCode::Invalid, "already said hello".to_owned())),
            ClientFrame::Ping { nonce } => {
                self.push(conn, &ServerFrame::Pong { nonce });
                Ok(())
            }
            ClientFrame::Open { id, skills, name } if !is_agent => self.open(conn, &key, &id, skills, name, at),
            ClientFrame::Send { id, conv, text } => self.send_message(conn, &key, &id, &conv, &text, at),
            ClientFrame::Typing { conv, on } => self.typing(&key, &conv, on),
            ClientFrame::Read { conv, seq } => self.read(conn, &key, &conv, seq),
            ClientFrame::Resume { conv, last_seq } => {
                if self.can_read(&key, conn, &conv) {
                    self.replay(conn, None, &conv, last_seq);
                    Ok(())
                } else {
                    Err((ErrorCode::NotFound, "no such conversation".to_owned()))
                }
            }
            ClientFrame::Accept { id, conv } if is_agent => self.accept(conn, &key, &id, &conv, at),
            ClientFrame::Decline { id, conv } if is_agent => self.decline(conn, &key, &id, &conv),
            ClientFrame::Transfer { id, conv, to_agent, to_skill } if is_agent => {
                self.transfer(conn, &key, &id, &conv, to_agent, to_skill, at)
            }
            ClientFrame::Close { id, conv } => self.close(conn, &key, &id, &conv, at),
            ClientFrame::Rate { id, conv, score, comment } if !is_agent => {
                self.rate(conn, &key, &id, &conv, score, comment, at)
            }
            ClientFrame::Presence { status } if is_agent => {
                self.presence(&key, status);
                Ok(())
            }
            ClientFrame::Watch { conv } if is_agent => self.watch(conn, &conv),
            other => Err((ErrorCode::Forbidden, format!("`{}` is not allowed for this role", other.kind()))),
        };
        if let Err((code, message)) = result {
            self.error(conn, fid.as_deref(), code, &message, None);
        }
    }

    /// Make sure the conversation is in memory (closed ones are loaded on demand) and owned here.
    fn ensure_conv(&mut self, conv: &str) -> Result<(), (ErrorCode, String)> {
        if let Owner::Remote(node) = self.ownership.owner_of(conv) {
            return Err((ErrorCode::NotOwner, format!("conversation is owned by node {node}")));
        }
        if self.convs.contains_key(conv) {
            return Ok(());
        }
        if conv.len() > 64 {
            return Err((ErrorCode::NotFound, "no such conversation".into()));
        }
        let meta = self
            .store
            .conversation(conv)
            .map_err(|_| (ErrorCode::Internal, "store read failed".to_owned()))?
            .ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        let last_seq = self.store.last_seq(conv).map_err(|_| (ErrorCode::Internal, "store read failed".to_owned()))?;
        self.convs.insert(conv.to_owned(), new_rt(meta, last_seq));
        Ok(())
    }

    fn is_participant(&self, key: &str, conv: &ConvRt) -> bool {
        let (role, pid) = split_key(key);
        match role {
            "visitor" => conv.meta.visitor == pid,
            _ => conv.meta.agent.as_deref() == Some(pid),
        }
    }

    fn can_read(&mut self, key: &str, conn: ConnId, conv: &str) -> bool {
        if self.ensure_conv(conv).is_err() {
            return false;
        }
        let Some(c) = self.convs.get(conv) else { return false };
        if self.is_participant(key, c) || c.watchers.contains(&conn) {
            return true;
        }
        // Agents may read conversations offered to them, and admins may read anything.
        let (role, pid) = split_key(key);
        role == "agent"
            && (c.offer.as_ref().is_some_and(|o| o.agent == pid) || self.agents.get(pid).is_some_and(|a| a.agent.admin))
    }
}

fn new_rt(meta: Conversation, last_seq: u64) -> ConvRt {
    ConvRt {
        meta,
        next_seq: last_seq,
        durable_seq: last_seq,
        recent: VecDeque::new(),
        idem: HashMap::new(),
        idem_complete: last_seq == 0,
        waiters: HashMap::new(),
        offer: None,
        declined: Vec::new(),
        watchers: HashSet::new(),
        typing: TypingState { last_forward: None, pending: HashMap::new() },
        last_position: None,
    }
}

fn split_key(key: &str) -> (&str, &str) {
    key.split_once(':').unwrap_or(("visitor", key))
}

fn check_id(id: &str) -> Result<(), (ErrorCode, String)> {
    if id.is_empty() || id.len() > 64 {
        return Err((ErrorCode::Invalid, "id must be 1..=64 characters".into()));
    }
    Ok(())
}

fn strategy_name(s: Strategy) -> &'static str {
    match s {
        Strategy::SkillsRing => "skills-ring",
        Strategy::RoundRobin => "round-robin",
        Strategy::LeastLoaded => "least-loaded",
    }
}
