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
    at: Instant,
}

struct ConnState {
    conn: Conn,
    key: String,
    /// While the offline inbox is being drained, live frames wait here to keep order.
    syncing: Option<Vec<Out>>,
    /// Conversations replayed at connect (their inbox items are redundant).
    resumed: HashSet<String>,
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
    /// Moving average of recent queue waits, for the visitor's estimated wait.
    wait_ema_ms: Option<f64>,
    healthy: bool,
    shutting_down: bool,
}

/// Everything the engine needs from the outside.
pub struct EngineParts {
    pub cfg: Config,
    pub metrics: Metrics,
    pub store: Store,
    pub ownership: Arc<dyn Ownership>,
    pub filter: WordFilter,
    pub inbox: Option<mpsc::UnboundedSender<InboxCmd>>,
}

impl Engine {
    /// Rebuild state from the store and start the engine task.
    pub fn start(parts: EngineParts) -> crate::error::Result<(EngineHandle, tokio::task::JoinHandle<()>)> {
        let (durable_tx, durable_rx) = mpsc::unbounded_channel();
        let writer = parts.store.spawn_writer(durable_tx)?;
        let snapshot = parts.store.load(RECENT)?;
        let mut engine = Engine {
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
            wait_ema_ms: None,
            healthy: true,
            shutting_down: false,
        };
        for agent in snapshot.agents {
            engine.agents.insert(
                agent.id.clone(),
                AgentRt {
                    agent,
                    conns: Vec::new(),
                    status: AgentStatus::Offline,
                    assigned: BTreeSet::new(),
                    offered: BTreeSet::new(),
                },
            );
        }
        for open in snapshot.open {
            if let Some(e) = open.recent.last() {
                engine.hlc.observe(e.hlc);
            }
            let id = open.meta.id.clone();
            engine.index_conversation(&open.meta);
            engine.convs.insert(
                id,
                ConvRt {
                    next_seq: open.last_seq,
                    durable_seq: open.last_seq,
                    recent: open.recent.into_iter().map(Arc::new).collect(),
                    idem: open.idem,
                    meta: open.meta,
                    waiters: HashMap::new(),
                    offer: None,
                    declined: Vec::new(),
                    watchers: HashSet::new(),
                    typing: TypingState { last_forward: None, pending: HashMap::new() },
                    last_position: None,
                },
            );
        }
        engine.update_gauges();
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
            tokio::select! {
                biased;
                Some(ev) = durable_rx.recv() => self.on_durable(ev),
                cmd = rx.recv() => match cmd {
                    Some(Command::Shutdown { reply }) => {
                        self.begin_shutdown();
                        shutdown_reply = Some(reply);
                        break;
                    }
                    Some(cmd) => self.handle(cmd),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(),
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
        self.conns.insert(id, ConnState { conn, key: key.clone(), syncing: None, resumed: HashSet::new() });
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
        for c in self.convs.values_mut() {
            c.watchers.remove(&conn);
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
        let Some(state) = self.conns.get_mut(&conn) else { return };
        if let Some(buf) = state.syncing.as_mut() {
            buf.push(out);
            return;
        }
        match state.conn.out.try_send(out) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(conn, key = %state.key, "closing slow consumer");
                self.metrics.slow_consumers.inc();
                state.conn.closer.close(CloseReason::Error(
                    ErrorCode::SlowConsumer,
                    "outbound queue full: the connection did not read fast enough".into(),
                ));
                self.disconnect(conn);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
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

    fn open(
        &mut self,
        conn: ConnId,
        key: &str,
        fid: &str,
        skills: Vec<String>,
        name: Option<String>,
        at: Instant,
    ) -> Result<(), (ErrorCode, String)> {
        check_id(fid)?;
        let (_, vid) = split_key(key);
        let vid = vid.to_owned();
        if skills.len() > 8 || skills.iter().any(|s| s.is_empty() || s.len() > 32) {
            return Err((ErrorCode::Invalid, "skills: at most 8 tags of 1..=32 characters".into()));
        }
        if name.as_ref().is_some_and(|n| n.chars().count() > 64) {
            return Err((ErrorCode::Invalid, "name: at most 64 characters".into()));
        }
        if let Some(existing) = self.visitors.get(&vid).and_then(|v| v.open.iter().next().cloned()) {
            let durable = self.convs.get(&existing).is_some_and(|c| c.durable_seq > 0);
            if durable {
                self.push(
                    conn,
                    &ServerFrame::Ack { id: fid.to_owned(), conv: Some(existing.clone()), seq: None, duplicate: true },
                );
                if let Some(s) = self.summary(&existing) {
                    self.push(conn, &ServerFrame::Conversation { conv: s });
                }
            } else if let Some(c) = self.convs.get_mut(&existing) {
                // The open is still being committed: answer when it is.
                c.waiters.entry(1).or_default().push((conn, fid.to_owned()));
            }
            return Ok(());
        }
        let now = now_ms();
        let id = new_id("c");
        if let Owner::Remote(node) = self.ownership.owner_of(&id) {
            return Err((ErrorCode::NotOwner, format!("conversation would be owned by node {node}")));
        }
        let visitor_name = name.or_else(|| self.visitors.get(&vid).and_then(|v| v.name.clone()));
        let meta = Conversation {
            id: id.clone(),
            visitor: vid.clone(),
            visitor_name,
            state: ConvState::Queued,
            agent: None,
            skills: skills.clone(),
            tags: Vec::new(),
            rating: None,
            created_ms: now,
            queued_ms: Some(now),
            assigned_ms: None,
            first_response_ms: None,
            closed_ms: None,
            cursors: Default::default(),
        };
        self.convs.insert(id.clone(), new_rt(meta, 0));
        self.visitors.entry(vid.clone()).or_default().open.insert(id.clone());
        self.queue.insert((now, id.clone()));
        let from = self.participant(key);
        let mut ops = Vec::new();
        let mut effects = Vec::new();
        self.append(
            &id,
            fid,
            from,
            Body::Event { event: Event::Opened { skills } },
            Some(conn),
            &mut ops,
            &mut effects,
        );
        ops.push(self.meta_op(&id));
        effects.push(Effect::Summary { conv: id.clone(), extra: vec![] });
        effects.push(Effect::Position { conv: id.clone() });
        self.commit(ops, effects, at);
        self.update_gauges();
        self.dispatch();
        Ok(())
    }

    fn send_message(
        &mut self,
        conn: ConnId,
        key: &str,
        fid: &str,
        conv: &str,
        text: &str,
        at: Instant,
    ) -> Result<(), (ErrorCode, String)> {
        check_id(fid)?;
        self.ensure_conv(conv)?;
        if self.answer_retry(conn, key, fid, conv) {
            return Ok(());
        }
        let c = self.convs.get(conv).ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        if !self.is_participant(key, c) {
            return Err((ErrorCode::Forbidden, "you are not a participant of this conversation".into()));
        }
        if c.meta.state == ConvState::Closed {
            return Err((ErrorCode::Conflict, "conversation is closed".into()));
        }
        if text.trim().is_empty() {
            return Err((ErrorCode::Invalid, "text must not be empty".into()));
        }
        if text.chars().count() > self.cfg.limits.max_text_chars {
            return Err((ErrorCode::Invalid, format!("text exceeds {} characters", self.cfg.limits.max_text_chars)));
        }
        let text = match self.filter.check(text) {
            Verdict::Clean => text.to_owned(),
            Verdict::Masked(t) => t,
            Verdict::Rejected => return Err((ErrorCode::ContentRejected, "message contains a blocked word".into())),
        };
        let from = self.participant(key);
        let mut ops = Vec::new();
        let mut effects = Vec::new();
        let is_agent = key.starts_with("agent:");
        self.append(conv, fid, from, Body::Message { text }, Some(conn), &mut ops, &mut effects);
        if is_agent {
            if let Some(c) = self.convs.get_mut(conv) {
                if c.meta.first_response_ms.is_none() {
                    let now = now_ms();
                    c.meta.first_response_ms = Some(now);
                    self.metrics.first_response.observe(now.saturating_sub(c.meta.created_ms) as f64 / 1000.0);
                    ops.push(self.meta_op(conv));
                }
            }
        }
        self.commit(ops, effects, at);
        Ok(())
    }

    /// If `fid` was already appended by this participant, answer with the original ack.
    fn answer_retry(&mut self, conn: ConnId, key: &str, fid: &str, conv: &str) -> bool {
        let Some(c) = self.convs.get_mut(conv) else { return false };
        let idem_key = format!("{key}/{fid}");
        let seq = match c.idem.get(&idem_key) {
            Some(s) => *s,
            None => match self.store.idempotent_seq(conv, &idem_key) {
                Ok(Some(s)) => s,
                _ => return false,
            },
        };
        if seq <= c.durable_seq {
            let frame =
                ServerFrame::Ack { id: fid.to_owned(), conv: Some(conv.to_owned()), seq: Some(seq), duplicate: true };
            self.push(conn, &frame);
        } else {
            c.waiters.entry(seq).or_default().push((conn, fid.to_owned()));
        }
        true
    }

    /// Assign the next seq and stage the entry's write and effects.
    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        conv: &str,
        fid: &str,
        from: Participant,
        body: Body,
        ack_conn: Option<ConnId>,
        ops: &mut Vec<Op>,
        effects: &mut Vec<Effect>,
    ) {
        let now = now_ms();
        let hlc = self.hlc.tick(now);
        let Some(c) = self.convs.get_mut(conv) else { return };
        c.next_seq += 1;
        let seq = c.next_seq;
        let idem_key = format!("{}/{fid}", from.key());
        c.idem.insert(idem_key.clone(), seq);
        let entry = Entry { seq, id: fid.to_owned(), from, hlc, ts: now, body };
        ops.push(Op::Entry { conv: conv.to_owned(), seq, json: encode(&entry), idem: Some(idem_key) });
        effects.push(Effect::Entry {
            conv: conv.to_owned(),
            entry: Arc::new(entry),
            ack: ack_conn.map(|c| (c, fid.to_owned())),
        });
    }

    fn meta_op(&mut self, conv: &str) -> Op {
        self.dirty_meta.remove(conv);
        let json = self.convs.get(conv).map(|c| encode(&c.meta)).unwrap_or_default();
        Op::Conversation { id: conv.to_owned(), json }
    }

    fn commit(&mut self, ops: Vec<Op>, effects: Vec<Effect>, at: Instant) {
        let token = self.next_token;
        self.next_token += 1;
        if let Err(e) = self.writer.submit(Batch { ops, done: Done::Token(token) }) {
            tracing::error!(error = %e, "store writer gone");
            self.healthy = false;
            return;
        }
        self.pending.push_back((token, Pending { effects, at }));
    }

    fn on_durable(&mut self, ev: DurableEvent) {
        let tokens = match ev {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "store failed: refusing writes until restart");
                self.healthy = false;
                return;
            }
        };
        for token in tokens {
            // Batches become durable in submission order.
            let Some((t, pending)) = self.pending.pop_front() else { break };
            debug_assert_eq!(t, token);
            for effect in pending.effects {
                self.release(effect, pending.at);
            }
        }
    }

    fn release(&mut self, effect: Effect, at: Instant) {
        match effect {
            Effect::Entry { conv, entry, ack } => {
                self.metrics.entries.inc();
                let Some(c) = self.convs.get_mut(&conv) else { return };
                c.durable_seq = c.durable_seq.max(entry.seq);
                c.recent.push_back(entry.clone());
                while c.recent.len() > RECENT {
                    c.recent.pop_front();
                }
                let waiters = c.waiters.remove(&entry.seq).unwrap_or_default();
                let ack_conn = ack.as_ref().map(|(conn, _)| *conn);
                if let Some((conn, id)) = ack {
                    let seq = Some(entry.seq);
                    self.push(conn, &ServerFrame::Ack { id, conv: Some(conv.clone()), seq, duplicate: false });
                }
                for (conn, id) in waiters {
                    let seq = Some(entry.seq);
                    self.push(conn, &ServerFrame::Ack { id, conv: Some(conv.clone()), seq, duplicate: true });
                }
                self.fan_out(&conv, &entry, ack_conn);
                self.metrics.delivery_latency.observe(at.elapsed().as_secs_f64());
            }
            Effect::Frame { conn, out } => self.push_out(conn, out),
            Effect::Summary { conv, extra } => {
                let Some(summary) = self.summary(&conv) else { return };
                let out: Out = Arc::from(ServerFrame::Conversation { conv: summary }.to_json());
                let mut targets = self.participant_conns(&conv);
                targets.extend(extra);
                targets.sort_unstable();
                targets.dedup();
                for t in targets {
                    self.push_out(t, out.clone());
                }
            }
            Effect::Position { conv } => self.send_position(&conv, true),
            Effect::Reply(tx) => {
                let _ = tx.send(Ok(()));
            }
        }
    }

    /// Connections of the visitor, the assigned agent and watchers.
    fn participant_conns(&self, conv: &str) -> Vec<ConnId> {
        let Some(c) = self.convs.get(conv) else { return Vec::new() };
        let mut out: Vec<ConnId> = Vec::new();
        if let Some(v) = self.visitors.get(&c.meta.visitor) {
            out.extend(&v.conns);
        }
        if let Some(a) = c.meta.agent.as_ref().and_then(|a| self.agents.get(a)) {
            out.extend(&a.conns);
        }
        out.extend(c.watchers.iter());
        out
    }

    fn fan_out(&mut self, conv: &str, entry: &Arc<Entry>, skip: Option<ConnId>) {
        let Some(c) = self.convs.get(conv) else { return };
        let out: Out = Arc::from(ServerFrame::Msg { conv: conv.to_owned(), entry: (**entry).clone() }.to_json());
        let author = entry.from.key();
        let mut offline: Vec<String> = Vec::new();
        let visitor_key = format!("visitor:{}", c.meta.visitor);
        match self.visitors.get(&c.meta.visitor) {
            Some(v) if !v.conns.is_empty() => {}
            _ if author != visitor_key => offline.push(visitor_key),
            _ => {}
        }
        if let Some(agent) = &c.meta.agent {
            let agent_key = format!("agent:{agent}");
            let connected = self.agents.get(agent).is_some_and(|a| !a.conns.is_empty());
            if !connected && author != agent_key {
                offline.push(agent_key);
            }
        }
        for t in self.participant_conns(conv) {
            if Some(t) != skip {
                self.push_out(t, out.clone());
            }
        }
        if let Some(inbox) = &self.inbox {
            for recipient in offline {
                self.metrics.offline_entries.inc();
                let _ = inbox.send(InboxCmd::Put { recipient, items: vec![(conv.to_owned(), (**entry).clone())] });
            }
        }
    }

    fn replay(&mut self, conn: ConnId, fid: Option<&str>, conv: &str, last_seq: u64) {
        let Some(c) = self.convs.get(conv) else { return };
        let durable = c.durable_seq;
        if last_seq > durable || durable - last_seq > self.cfg.limits.replay_limit as u64 {
            let frame = ServerFrame::Error {
                id: fid.map(str::to_owned),
                code: ErrorCode::Reload,
                message: "cannot replay this gap; fetch history and resume from its last seq".into(),
                conv: Some(conv.to_owned()),
                last_seq: Some(durable),
            };
            self.metrics.errors.with_label_values(&[ErrorCode::Reload.as_str()]).inc();
            self.push(conn, &frame);
            return;
        }
        let entries: Vec<Entry> = if c.recent.front().is_some_and(|e| e.seq <= last_seq + 1) || last_seq == durable {
            c.recent.iter().filter(|e| e.seq > last_seq && e.seq <= durable).map(|e| (**e).clone()).collect()
        } else {
            match self.store.entries_after(conv, last_seq, (durable - last_seq) as usize) {
                Ok(v) => v.into_iter().filter(|e| e.seq <= durable).collect(),
                Err(e) => {
                    tracing::error!(error = %e, conv, "replay read failed");
                    self.error(conn, fid, ErrorCode::Internal, "history read failed", Some(conv));
                    return;
                }
            }
        };
        let frame = ServerFrame::Replay { conv: conv.to_owned(), entries, last_seq: durable };
        self.push(conn, &frame);
    }

    fn typing(&mut self, key: &str, conv: &str, on: bool) -> Result<(), (ErrorCode, String)> {
        self.ensure_conv(conv)?;
        let from = self.participant(key);
        let c = self.convs.get(conv).ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        if !self.is_participant(key, c) {
            return Err((ErrorCode::Forbidden, "you are not a participant of this conversation".into()));
        }
        let interval = Duration::from_millis(self.cfg.typing.interval_ms);
        let now = Instant::now();
        let Some(c) = self.convs.get_mut(conv) else { return Ok(()) };
        let due = c.typing.last_forward.is_none_or(|t| now.duration_since(t) >= interval);
        if due {
            c.typing.last_forward = Some(now);
            c.typing.pending.remove(&from.key());
            self.forward_typing(conv, &from, on);
        } else {
            c.typing.pending.insert(from.key(), (from, on));
        }
        Ok(())
    }

    fn forward_typing(&mut self, conv: &str, from: &Participant, on: bool) {
        let frame =
            ServerFrame::Typing { conv: conv.to_owned(), from: from.clone(), on, ttl_ms: self.cfg.typing.ttl_ms };
        let out: Out = Arc::from(frame.to_json());
        let author = from.key();
        for t in self.participant_conns(conv) {
            if self.conns.get(&t).is_some_and(|s| s.key != author) {
                self.push_out(t, out.clone());
            }
        }
    }

    fn read(&mut self, _conn: ConnId, key: &str, conv: &str, seq: u64) -> Result<(), (ErrorCode, String)> {
        self.ensure_conv(conv)?;
        let by = self.participant(key);
        let c = self.convs.get_mut(conv).ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        let allowed = match split_key(key) {
            ("visitor", pid) => c.meta.visitor == pid,
            (_, pid) => c.meta.agent.as_deref() == Some(pid),
        };
        if !allowed {
            return Err((ErrorCode::Forbidden, "you are not a participant of this conversation".into()));
        }
        let seq = seq.min(c.durable_seq);
        let cur = c.meta.cursors.entry(key.to_owned()).or_insert(0);
        if seq <= *cur {
            return Ok(());
        }
        *cur = seq;
        self.dirty_meta.insert(conv.to_owned());
        let frame = ServerFrame::Read { conv: conv.to_owned(), by, seq };
        let out: Out = Arc::from(frame.to_json());
        for t in self.participant_conns(conv) {
            if self.conns.get(&t).is_some_and(|s| s.key != key) {
                self.push_out(t, out.clone());
            }
        }
        Ok(())
    }

    fn accept(
        &mut self,
        conn: ConnId,
        key: &str,
        fid: &str,
        conv: &str,
        at: Instant,
    ) -> Result<(), (ErrorCode, String)> {
        check_id(fid)?;
        self.ensure_conv(conv)?;
        if self.answer_retry(conn, key, fid, conv) {
            return Ok(());
        }
        let (_, aid) = split_key(key);
        let c = self.convs.get(conv).ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        if c.meta.agent.as_deref() == Some(aid) && c.meta.state == ConvState::Assigned {
            self.push(
                conn,
                &ServerFrame::Ack { id: fid.to_owned(), conv: Some(conv.to_owned()), seq: None, duplicate: true },
            );
            return Ok(());
        }
        if c.offer.as_ref().is_none_or(|o| o.agent != aid) {
            return Err((ErrorCode::Conflict, "this conversation is not offered to you".into()));
        }
        let aid = aid.to_owned();
        self.assign(conv, &aid, fid, Some(conn), "accept", at);
        Ok(())
    }

    /// Move an offered or transferred conversation to `agent`. Capacity was reserved by the offer.
    fn assign(&mut self, conv: &str, agent: &str, fid: &str, ack_conn: Option<ConnId>, via: &str, at: Instant) {
        let now = now_ms();
        let Some(c) = self.convs.get_mut(conv) else { return };
        c.offer = None;
        c.declined.clear();
        let queued_ms = c.meta.queued_ms.take();
        self.queue.remove(&(queued_ms.unwrap_or(c.meta.created_ms), conv.to_owned()));
        c.meta.state = ConvState::Assigned;
        c.meta.agent = Some(agent.to_owned());
        c.meta.assigned_ms = Some(now);
        c.last_position = None;
        if let Some(q) = queued_ms {
            let waited = now.saturating_sub(q) as f64;
            self.metrics.queue_wait.observe(waited / 1000.0);
            self.wait_ema_ms = Some(self.wait_ema_ms.map_or(waited, |e| 0.8 * e + 0.2 * waited));
        }
        let agent_name = match self.agents.get_mut(agent) {
            Some(a) => {
                a.offered.remove(conv);
                a.assigned.insert(conv.to_owned());
                a.agent.name.clone()
            }
            None => agent.to_owned(),
        };
        self.metrics.assignments.with_label_values(&[via]).inc();
        let from = Participant::agent(agent, &agent_name);
        let mut ops = Vec::new();
        let mut effects = Vec::new();
        let event = Event::Assigned { agent: agent.to_owned(), agent_name };
        self.append(conv, fid, from, Body::Event { event }, ack_conn, &mut ops, &mut effects);
        ops.push(self.meta_op(conv));
        effects.push(Effect::Summary { conv: conv.to_owned(), extra: vec![] });
        self.commit(ops, effects, at);
        self.update_gauges();
        self.send_positions();
    }

    fn decline(&mut self, conn: ConnId, key: &str, fid: &str, conv: &str) -> Result<(), (ErrorCode, String)> {
        self.ensure_conv(conv)?;
        let (_, aid) = split_key(key);
        let c = self.convs.get(conv).ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        if c.offer.as_ref().is_none_or(|o| o.agent != aid) {
            return Err((ErrorCode::Conflict, "this conversation is not offered to you".into()));
        }
        self.withdraw_offer(conv, true);
        self.push(
            conn,
            &ServerFrame::Ack { id: fid.to_owned(), conv: Some(conv.to_owned()), seq: None, duplicate: false },
        );
        self.dispatch();
        Ok(())
    }

    /// Cancel the live offer of `conv`, releasing the agent's reserved slot.
    fn withdraw_offer(&mut self, conv: &str, exclude_agent: bool) {
        let Some(c) = self.convs.get_mut(conv) else { return };
        let Some(offer) = c.offer.take() else { return };
        if exclude_agent {
            c.declined.push(offer.agent.clone());
        }
        let mut conns = Vec::new();
        if let Some(a) = self.agents.get_mut(&offer.agent) {
            a.offered.remove(conv);
            conns = a.conns.clone();
        }
        let out: Out = Arc::from(ServerFrame::OfferWithdrawn { conv: conv.to_owned() }.to_json());
        for t in conns {
            self.push_out(t, out.clone());
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &mut self,
        conn: ConnId,
        key: &str,
        fid: &str,
        conv: &str,
        to_agent: Option<String>,
        to_skill: Option<String>,
        at: Instant,
    ) -> Result<(), (ErrorCode, String)> {
        check_id(fid)?;
        self.ensure_conv(conv)?;
        if self.answer_retry(conn, key, fid, conv) {
            return Ok(());
        }
        let (_, aid) = split_key(key);
        let aid = aid.to_owned();
        let c = self.convs.get(conv).ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        let admin = self.agents.get(&aid).is_some_and(|a| a.agent.admin);
        if c.meta.state != ConvState::Assigned || (c.meta.agent.as_deref() != Some(aid.as_str()) && !admin) {
            return Err((ErrorCode::Conflict, "only the assigned agent can transfer an assigned conversation".into()));
        }
        let from_agent = c.meta.agent.clone();
        let old_conns: Vec<ConnId> =
            from_agent.as_ref().and_then(|a| self.agents.get(a)).map(|a| a.conns.clone()).unwrap_or_default();
        match (to_agent, to_skill) {
            (Some(target), None) => {
                if from_agent.as_deref() == Some(target.as_str()) {
                    return Err((ErrorCode::Invalid, "conversation is already assigned to that agent".into()));
                }
                let t = self.agents.get(&target).ok_or((ErrorCode::NotFound, "no such agent".to_owned()))?;
                if !t.available() {
                    return Err((ErrorCode::Conflict, "target agent is not online".into()));
                }
                if t.load() >= t.agent.capacity {
                    return Err((ErrorCode::Conflict, "target agent is at capacity".into()));
                }
                self.release_agent(conv);
                let from = self.participant(key);
                let mut ops = Vec::new();
                let mut effects = Vec::new();
                let event = Event::Transferred { from_agent, to_agent: Some(target.clone()), to_skill: None };
                self.append(conv, fid, from, Body::Event { event }, Some(conn), &mut ops, &mut effects);
                // Old agent sees the transfer entry and the new summary, then loses access.
                if let Some(Effect::Entry { entry, .. }) = effects.last() {
                    let out: Out =
                        Arc::from(ServerFrame::Msg { conv: conv.to_owned(), entry: (**entry).clone() }.to_json());
                    for t in &old_conns {
                        effects.push(Effect::Frame { conn: *t, out: out.clone() });
                    }
                }
                effects.push(Effect::Summary { conv: conv.to_owned(), extra: old_conns });
                self.commit(ops, effects, at);
                if let Some(a) = self.agents.get_mut(&target) {
                    a.offered.insert(conv.to_owned());
                }
                if let Some(c) = self.convs.get_mut(conv) {
                    c.meta.queued_ms = None;
                }
                let efid = new_id("e");
                self.assign(conv, &target, &efid, None, "transfer", at);
            }
            (None, Some(skill)) => {
                if skill.is_empty() || skill.len() > 32 {
                    return Err((ErrorCode::Invalid, "skill: 1..=32 characters".into()));
                }
                self.release_agent(conv);
                let Some(c) = self.convs.get_mut(conv) else { return Ok(()) };
                c.meta.state = ConvState::Queued;
                c.meta.agent = None;
                c.meta.skills = vec![skill.clone()];
                // Keep the original arrival time: a transferred visitor has waited already.
                let q = c.meta.created_ms;
                c.meta.queued_ms = Some(q);
                if let Some(prev) = from_agent.clone() {
                    c.declined = vec![prev];
                }
                self.queue.insert((q, conv.to_owned()));
                let from = self.participant(key);
                let mut ops = Vec::new();
                let mut effects = Vec::new();
                let event = Event::Transferred { from_agent, to_agent: None, to_skill: Some(skill) };
                self.append(conv, fid, from, Body::Event { event }, Some(conn), &mut ops, &mut effects);
                if let Some(Effect::Entry { entry, .. }) = effects.last() {
                    let out: Out =
                        Arc::from(ServerFrame::Msg { conv: conv.to_owned(), entry: (**entry).clone() }.to_json());
                    for t in &old_conns {
                        effects.push(Effect::Frame { conn: *t, out: out.clone() });
                    }
                }
                ops.push(self.meta_op(conv));
                effects.push(Effect::Summary { conv: conv.to_owned(), extra: old_conns });
                effects.push(Effect::Position { conv: conv.to_owned() });
                self.commit(ops, effects, at);
                self.update_gauges();
                self.dispatch();
            }
            _ => return Err((ErrorCode::Invalid, "give exactly one of to_agent or to_skill".into())),
        }
        Ok(())
    }

    /// Remove the conversation from its agent's load.
    fn release_agent(&mut self, conv: &str) {
        let Some(c) = self.convs.get_mut(conv) else { return };
        if let Some(a) = c.meta.agent.take().and_then(|a| self.agents.get_mut(&a)) {
            a.assigned.remove(conv);
        }
    }

    fn close(
        &mut self,
        conn: ConnId,
        key: &str,
        fid: &str,
        conv: &str,
        at: Instant,
    ) -> Result<(), (ErrorCode, String)> {
        check_id(fid)?;
        self.ensure_conv(conv)?;
        if self.answer_retry(conn, key, fid, conv) {
            return Ok(());
        }
        let c = self.convs.get(conv).ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        let (_, pid) = split_key(key);
        let admin = key.starts_with("agent:") && self.agents.get(pid).is_some_and(|a| a.agent.admin);
        if !self.is_participant(key, c) && !admin {
            return Err((ErrorCode::Forbidden, "you are not a participant of this conversation".into()));
        }
        if c.meta.state == ConvState::Closed {
            return Err((ErrorCode::Conflict, "conversation is already closed".into()));
        }
        let agent = c.meta.agent.clone();
        self.withdraw_offer(conv, false);
        // The agent stays on record (history, filters, rating) but no longer carries the load.
        if let Some(a) = agent.and_then(|a| self.agents.get_mut(&a)) {
            a.assigned.remove(conv);
        }
        let Some(c) = self.convs.get_mut(conv) else { return Ok(()) };
        if let Some(q) = c.meta.queued_ms.take() {
            self.queue.remove(&(q, conv.to_owned()));
        }
        c.meta.state = ConvState::Closed;
        c.meta.closed_ms = Some(now_ms());
        let visitor = c.meta.visitor.clone();
        if let Some(v) = self.visitors.get_mut(&visitor) {
            v.open.remove(conv);
        }
        let by = key.to_owned();
        let from = self.participant(key);
        let mut ops = Vec::new();
        let mut effects = Vec::new();
        self.append(conv, fid, from, Body::Event { event: Event::Closed { by } }, Some(conn), &mut ops, &mut effects);
        ops.push(self.meta_op(conv));
        effects.push(Effect::Summary { conv: conv.to_owned(), extra: vec![] });
        self.commit(ops, effects, at);
        self.update_gauges();
        self.dispatch();
        self.send_positions();
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn rate(
        &mut self,
        conn: ConnId,
        key: &str,
        fid: &str,
        conv: &str,
        score: u8,
        comment: Option<String>,
        at: Instant,
    ) -> Result<(), (ErrorCode, String)> {
        check_id(fid)?;
        self.ensure_conv(conv)?;
        if self.answer_retry(conn, key, fid, conv) {
            return Ok(());
        }
        if !(1..=5).contains(&score) {
            return Err((ErrorCode::Invalid, "score must be 1..=5".into()));
        }
        if comment.as_ref().is_some_and(|c| c.chars().count() > 1000) {
            return Err((ErrorCode::Invalid, "comment: at most 1000 characters".into()));
        }
        let c = self.convs.get_mut(conv).ok_or((ErrorCode::NotFound, "no such conversation".to_owned()))?;
        let (_, vid) = split_key(key);
        if c.meta.visitor != vid {
            return Err((ErrorCode::Forbidden, "only the visitor can rate".into()));
        }
        if c.meta.state == ConvState::Queued || c.meta.state == ConvState::Bot {
            return Err((ErrorCode::Conflict, "nothing to rate yet".into()));
        }
        c.meta.rating = Some(Rating { score, comment: comment.clone() });
        let from = self.participant(key);
        let mut ops = Vec::new();
        let mut effects = Vec::new();
        self.append(
            conv,
            fid,
            from,
            Body::Event { event: Event::Rated { score, comment } },
            Some(conn),
            &mut ops,
            &mut effects,
        );
        ops.push(self.meta_op(conv));
        self.commit(ops, effects, at);
        Ok(())
    }

    fn presence(&mut self, key: &str, status: AgentStatus) {
        let (_, aid) = split_key(key);
        let aid = aid.to_owned();
        let Some(a) = self.agents.get_mut(&aid) else { return };
        if a.status == status {
            return;
        }
        a.status = status;
        if status != AgentStatus::Online {
            let offered: Vec<String> = a.offered.iter().cloned().collect();
            for conv in offered {
                self.withdraw_offer(&conv, true);
            }
        }
        self.broadcast_presence(&aid, status);
        self.dispatch();
    }

    fn watch(&mut self, conn: ConnId, conv: &str) -> Result<(), (ErrorCode, String)> {
        self.ensure_conv(conv)?;
        if let Some(c) = self.convs.get_mut(conv) {
            c.watchers.insert(conn);
        }
        if let Some(s) = self.summary(conv) {
            self.push(conn, &ServerFrame::Conversation { conv: s });
        }
        Ok(())
    }

    fn broadcast_presence(&mut self, agent: &str, status: AgentStatus) {
        let out: Out = Arc::from(ServerFrame::Presence { agent: agent.to_owned(), status }.to_json());
        let targets: Vec<ConnId> = self.agents.values().flat_map(|a| a.conns.iter().copied()).collect();
        for t in targets {
            self.push_out(t, out.clone());
        }
    }

    // ---------------------------------------------------------------- routing

    /// Offer queued conversations to agents, longest waiting first, until nobody has room.
    fn dispatch(&mut self) {
        if self.shutting_down {
            return;
        }
        let params = router::Params {
            strategy: self.cfg.routing.strategy,
            load_threshold: self.cfg.routing.load_threshold,
            virtual_nodes: self.cfg.routing.virtual_nodes,
        };
        let waiting: Vec<String> = self.queue.iter().map(|(_, c)| c.clone()).collect();
        for conv in waiting {
            if !self.agents.values().any(|a| a.available() && a.load() < a.agent.capacity) {
                break;
            }
            let Some(c) = self.convs.get(&conv) else { continue };
            if c.offer.is_some() || c.meta.state != ConvState::Queued {
                continue;
            }
            let choice = {
                let candidates: Vec<Candidate<'_>> = self
                    .agents
                    .values()
                    .map(|a| Candidate {
                        id: &a.agent.id,
                        skills: &a.agent.skills,
                        capacity: a.agent.capacity,
                        load: a.load(),
                        available: a.available(),
                    })
                    .collect();
                let req = router::Request { key: &c.meta.visitor, skills: &c.meta.skills, exclude: &c.declined };
                let mut pick = self.router.choose(params, &req, &candidates).map(str::to_owned);
                if pick.is_none() && !c.declined.is_empty() {
                    // Everyone with room declined: start another round rather than strand the visitor.
                    let req = router::Request { key: &c.meta.visitor, skills: &c.meta.skills, exclude: &[] };
                    pick = self.router.choose(params, &req, &candidates).map(str::to_owned);
                }
                pick
            };
            let Some(agent) = choice else { continue };
            if let Some(a) = self.agents.get_mut(&agent) {
                a.offered.insert(conv.clone());
            }
            if self.cfg.routing.auto_accept {
                let fid = new_id("e");
                let via = strategy_name(self.cfg.routing.strategy);
                self.assign(&conv, &agent, &fid, None, via, Instant::now());
                continue;
            }
            let expires = Instant::now() + Duration::from_secs(self.cfg.routing.offer_timeout_secs);
            if let Some(c) = self.convs.get_mut(&conv) {
                c.offer = Some(Offer { agent: agent.clone(), expires });
            }
            if let Some(frame) = self.offer_frame(&conv) {
                let out: Out = Arc::from(frame.to_json());
                let conns = self.agents.get(&agent).map(|a| a.conns.clone()).unwrap_or_default();
                for t in conns {
                    self.push_out(t, out.clone());
                }
            }
        }
    }

    fn offer_frame(&self, conv: &str) -> Option<ServerFrame> {
        let c = self.convs.get(conv)?;
        let offer = c.offer.as_ref()?;
        let expires_in_ms = offer.expires.saturating_duration_since(Instant::now()).as_millis() as u64;
        Some(ServerFrame::Offer { conv: self.summary(conv)?, expires_in_ms })
    }

    fn send_positions(&mut self) {
        let waiting: Vec<String> = self.queue.iter().map(|(_, c)| c.clone()).collect();
        for conv in waiting {
            self.send_position(&conv, false);
        }
    }

    /// Tell the visitor their queue position when it changed (or always, when `force`).
    fn send_position(&mut self, conv: &str, force: bool) {
        let Some(position) = self.queue.iter().position(|(_, c)| c == conv).map(|p| p + 1) else { return };
        let waiting = self.queue.len();
        let Some(c) = self.convs.get_mut(conv) else { return };
        if !force && c.last_position == Some(position) {
            return;
        }
        c.last_position = Some(position);
        let visitor = c.meta.visitor.clone();
        // A rough estimate: recent average wait per position ahead. Absent until someone was assigned.
        let estimated_wait_ms = self.wait_ema_ms.map(|e| (e * position as f64) as u64);
        let frame = ServerFrame::Queue { conv: conv.to_owned(), position, waiting, estimated_wait_ms };
        let out: Out = Arc::from(frame.to_json());
        let conns = self.visitors.get(&visitor).map(|v| v.conns.clone()).unwrap_or_default();
        for t in conns {
            self.push_out(t, out.clone());
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        // Offers not accepted in time go to someone else.
        let expired: Vec<String> = self
            .convs
            .iter()
            .filter(|(_, c)| c.offer.as_ref().is_some_and(|o| o.expires <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for conv in &expired {
            tracing::info!(conv = %conv, "offer expired; re-offering");
            self.withdraw_offer(conv, true);
        }
        // Trailing edge of coalesced typing indicators.
        let interval = Duration::from_millis(self.cfg.typing.interval_ms);
        let due: Vec<(String, Vec<(Participant, bool)>)> = self
            .convs
            .iter_mut()
            .filter(|(_, c)| {
                !c.typing.pending.is_empty() && c.typing.last_forward.is_none_or(|t| now.duration_since(t) >= interval)
            })
            .map(|(id, c)| {
                c.typing.last_forward = Some(now);
                (id.clone(), c.typing.pending.drain().map(|(_, v)| v).collect())
            })
            .collect();
        for (conv, items) in due {
            for (from, on) in items {
                self.forward_typing(&conv, &from, on);
            }
        }
        if !expired.is_empty() || !self.queue.is_empty() {
            self.dispatch();
        }
        self.persist_dirty();
        // Closed conversations nobody is looking at leave memory (they stay in the store).
        if self.convs.len() > 1024 {
            let idle: Vec<String> = self
                .convs
                .iter()
                .filter(|(_, c)| {
                    c.meta.state == ConvState::Closed && c.durable_seq == c.next_seq && c.watchers.is_empty()
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in idle {
                if !self.dirty_meta.contains(&id) {
                    self.convs.remove(&id);
                }
            }
        }
    }

    fn persist_dirty(&mut self) {
        if self.dirty_meta.is_empty() {
            return;
        }
        let ids: Vec<String> = self.dirty_meta.iter().cloned().collect();
        let ops: Vec<Op> = ids.iter().map(|id| self.meta_op(id)).collect();
        self.commit(ops, Vec::new(), Instant::now());
    }

    // ---------------------------------------------------------------- agents and views

    fn put_agent(&mut self, agent: Agent, reply: oneshot::Sender<Result<(), ErrorCode>>) {
        let ops = vec![Op::Agent { id: agent.id.clone(), json: encode(&agent) }];
        match self.agents.get_mut(&agent.id) {
            Some(a) => a.agent = agent,
            None => {
                self.agents.insert(
                    agent.id.clone(),
                    AgentRt {
                        agent,
                        conns: Vec::new(),
                        status: AgentStatus::Offline,
                        assigned: BTreeSet::new(),
                        offered: BTreeSet::new(),
                    },
                );
            }
        }
        self.commit(ops, vec![Effect::Reply(reply)], Instant::now());
        self.dispatch();
    }

    fn agent_views(&self) -> Vec<AgentView> {
        let mut v: Vec<AgentView> = self
            .agents
            .values()
            .map(|a| AgentView {
                id: a.agent.id.clone(),
                name: a.agent.name.clone(),
                skills: a.agent.skills.clone(),
                capacity: a.agent.capacity,
                admin: a.agent.admin,
                status: a.status,
                connections: a.conns.len(),
                assigned: a.assigned.iter().cloned().collect(),
                offered: a.offered.iter().cloned().collect(),
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    fn participant(&self, key: &str) -> Participant {
        match split_key(key) {
            ("visitor", id) => Participant::visitor(id, self.visitors.get(id).and_then(|v| v.name.as_deref())),
            (_, id) => Participant::agent(id, self.agents.get(id).map_or(id, |a| a.agent.name.as_str())),
        }
    }

    fn summary(&self, conv: &str) -> Option<ConversationSummary> {
        let c = self.convs.get(conv)?;
        Some(ConversationSummary {
            id: c.meta.id.clone(),
            state: c.meta.state,
            visitor: c.meta.visitor.clone(),
            visitor_name: c.meta.visitor_name.clone(),
            agent: c.meta.agent.clone(),
            agent_name: c.meta.agent.as_ref().and_then(|a| self.agents.get(a)).map(|a| a.agent.name.clone()),
            skills: c.meta.skills.clone(),
            last_seq: c.durable_seq,
            created_ms: c.meta.created_ms,
            queued_ms: c.meta.queued_ms,
            rating: c.meta.rating.clone(),
            cursors: c.meta.cursors.clone(),
        })
    }

    fn summaries_for(&self, key: &str) -> Vec<ConversationSummary> {
        let ids: Vec<String> = match split_key(key) {
            ("visitor", id) => self.visitors.get(id).map(|v| v.open.iter().cloned().collect()).unwrap_or_default(),
            (_, id) => self.agents.get(id).map(|a| a.assigned.iter().cloned().collect()).unwrap_or_default(),
        };
        ids.iter().filter_map(|c| self.summary(c)).filter(|s| s.last_seq > 0).collect()
    }

    fn update_gauges(&self) {
        self.metrics.queued.set(self.queue.len() as i64);
        self.metrics
            .open_conversations
            .set(self.convs.values().filter(|c| c.meta.state != ConvState::Closed).count() as i64);
    }
}

fn new_rt(meta: Conversation, last_seq: u64) -> ConvRt {
    ConvRt {
        meta,
        next_seq: last_seq,
        durable_seq: last_seq,
        recent: VecDeque::new(),
        idem: HashMap::new(),
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
