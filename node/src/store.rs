//! The local durable store: redb (an embedded, pure-Rust, ACID B-tree with copy-on-write pages and
//! fsync on commit), with one writer thread doing group commit.
//!
//! Writes arrive as [`Batch`]es; the writer drains every batch waiting, applies them in one write
//! transaction and commits with `Durability::Immediate`, then reports the batches durable in order.
//! So many acks share one fsync, and the order in which batches were submitted is the order in which
//! they become durable — the engine relies on that to fan out entries in `seq` order.
//! Reads (history, REST) use redb read transactions from any thread, concurrently with the writer.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;

use redb::{Database, Durability, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::model::{Agent, CannedReply, ConvState, Conversation, Entry};

const ENTRIES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("entries");
const IDEM: TableDefinition<(&str, &str), u64> = TableDefinition::new("idempotency");
const CONVS: TableDefinition<&str, &[u8]> = TableDefinition::new("conversations");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const CANNED: TableDefinition<&str, &[u8]> = TableDefinition::new("canned_replies");

/// One write.
#[derive(Debug, Clone)]
pub enum Op {
    /// Append an entry; `idem` records the client id → seq mapping for retries.
    Entry {
        conv: String,
        seq: u64,
        json: Vec<u8>,
        idem: Option<String>,
    },
    Conversation {
        id: String,
        json: Vec<u8>,
    },
    Agent {
        id: String,
        json: Vec<u8>,
    },
    Canned {
        id: String,
        json: Vec<u8>,
    },
    DeleteCanned {
        id: String,
    },
}

/// What to do when a batch is durable.
#[derive(Debug)]
pub enum Done {
    /// Report the token on the engine's durable channel (in submission order).
    Token(u64),
    /// Answer a waiting caller.
    Reply(oneshot::Sender<Result<()>>),
}

/// A set of writes committed atomically with others in the same group commit.
#[derive(Debug)]
pub struct Batch {
    pub ops: Vec<Op>,
    pub done: Done,
}

/// Durable notifications: tokens of committed batches in order, or the error that stopped the writer.
pub type DurableEvent = std::result::Result<Vec<u64>, String>;

/// Handle to the embedded store.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// Everything the engine rebuilds its state from at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub agents: Vec<Agent>,
    /// Conversations that are not closed, with their last seq, idempotency ids and recent entries.
    pub open: Vec<OpenConversation>,
}

#[derive(Debug)]
pub struct OpenConversation {
    pub meta: Conversation,
    pub last_seq: u64,
    pub idem: HashMap<String, u64>,
    pub recent: Vec<Entry>,
}

impl Store {
    /// Open (or create) `<dir>/kefu.redb`.
    pub fn open(dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create data dir {}", dir.display()), e))?;
        let path = dir.join("kefu.redb");
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => Error::StoreLocked(dir.display().to_string()),
            redb::DatabaseError::Storage(redb::StorageError::Io(io)) if io.kind() == std::io::ErrorKind::WouldBlock => {
                Error::StoreLocked(dir.display().to_string())
            }
            other => Error::Store(format!("open {}: {other}", path.display())),
        })?;
        let txn = db.begin_write()?;
        {
            txn.open_table(ENTRIES)?;
            txn.open_table(IDEM)?;
            txn.open_table(CONVS)?;
            txn.open_table(AGENTS)?;
            txn.open_table(CANNED)?;
        }
        txn.commit()?;
        Ok(Store { db: Arc::new(db) })
    }

    /// Read the state needed to resume service: agents and every conversation not closed.
    pub fn load(&self, recent: usize) -> Result<Snapshot> {
        let txn = self.db.begin_read()?;
        let mut snap = Snapshot::default();
        for row in txn.open_table(AGENTS)?.iter()? {
            let (_, v) = row?;
            snap.agents.push(decode("agents", v.value())?);
        }
        let convs = txn.open_table(CONVS)?;
        let entries = txn.open_table(ENTRIES)?;
        let idem_table = txn.open_table(IDEM)?;
        for row in convs.iter()? {
            let (_, v) = row?;
            let meta: Conversation = decode("conversations", v.value())?;
            if meta.state == ConvState::Closed {
                continue;
            }
            let id = meta.id.as_str();
            let mut recent_rows = Vec::new();
            for row in entries.range((id, 0)..=(id, u64::MAX))?.rev().take(recent) {
                let (_, v) = row?;
                recent_rows.push(decode::<Entry>("entries", v.value())?);
            }
            recent_rows.reverse();
            let last_seq = recent_rows.last().map_or(0, |e| e.seq);
            let mut idem = HashMap::new();
            for row in idem_table.range((id, "")..)? {
                let (k, v) = row?;
                let (c, client_id) = k.value();
                if c != id {
                    break;
                }
                idem.insert(client_id.to_owned(), v.value());
            }
            snap.open.push(OpenConversation { meta, last_seq, idem, recent: recent_rows });
        }
        Ok(snap)
    }

    /// Entries of `conv` with `seq > after`, at most `limit`, in order.
    pub fn entries_after(&self, conv: &str, after: u64, limit: usize) -> Result<Vec<Entry>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        let mut out = Vec::new();
        if after == u64::MAX {
            return Ok(out);
        }
        for row in table.range((conv, after + 1)..=(conv, u64::MAX))?.take(limit) {
            let (_, v) = row?;
            out.push(decode("entries", v.value())?);
        }
        Ok(out)
    }

    /// Entries of `conv` with `seq < before`, the newest `limit` of them, in ascending order.
    pub fn entries_before(&self, conv: &str, before: u64, limit: usize) -> Result<Vec<Entry>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        let mut out = Vec::new();
        if before <= 1 {
            return Ok(out);
        }
        for row in table.range((conv, 1)..(conv, before))?.rev().take(limit) {
            let (_, v) = row?;
            out.push(decode("entries", v.value())?);
        }
        out.reverse();
        Ok(out)
    }

    /// The highest stored seq of `conv` (0 when empty).
    pub fn last_seq(&self, conv: &str) -> Result<u64> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        let last = table.range((conv, 0)..=(conv, u64::MAX))?.next_back().transpose()?;
        Ok(last.map_or(0, |(k, _)| k.value().1))
    }

    /// The seq stored for a client id, if that id was appended before.
    pub fn idempotent_seq(&self, conv: &str, client_id: &str) -> Result<Option<u64>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(IDEM)?;
        Ok(table.get((conv, client_id))?.map(|v| v.value()))
    }

    pub fn conversation(&self, id: &str) -> Result<Option<Conversation>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CONVS)?;
        table.get(id)?.map(|v| decode("conversations", v.value())).transpose()
    }

    /// All conversations matching the filter, newest first, at most `limit`.
    pub fn conversations(
        &self,
        state: Option<ConvState>,
        agent: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Conversation>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CONVS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (_, v) = row?;
            let c: Conversation = decode("conversations", v.value())?;
            if state.is_some_and(|s| c.state != s) || agent.is_some_and(|a| c.agent.as_deref() != Some(a)) {
                continue;
            }
            out.push(c);
        }
        out.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(a.id.cmp(&b.id)));
        out.truncate(limit);
        Ok(out)
    }

    pub fn agent(&self, id: &str) -> Result<Option<Agent>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AGENTS)?;
        table.get(id)?.map(|v| decode("agents", v.value())).transpose()
    }

    pub fn canned(&self) -> Result<Vec<CannedReply>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CANNED)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (_, v) = row?;
            out.push(decode("canned_replies", v.value())?);
        }
        Ok(out)
    }

    /// Apply one batch synchronously (CLI use, before any writer runs).
    pub fn write_now(&self, ops: Vec<Op>) -> Result<()> {
        apply(&self.db, &ops)
    }

    /// Start the group-commit writer thread. Durable tokens are reported on `durable`.
    /// Each group commit's duration is observed in `commit_seconds`.
    pub fn spawn_writer(
        &self,
        durable: mpsc::UnboundedSender<DurableEvent>,
        commit_seconds: prometheus::Histogram,
    ) -> Result<Writer> {
        let (tx, rx) = std_mpsc::channel::<Batch>();
        let db = self.db.clone();
        let handle = std::thread::Builder::new()
            .name("kefu-store-writer".into())
            .spawn(move || writer_loop(&db, &rx, &durable, &commit_seconds))
            .map_err(|e| Error::io("spawn store writer", e))?;
        Ok(Writer { tx, handle: Arc::new(std::sync::Mutex::new(Some(handle))) })
    }
}

/// Submits batches to the writer thread.
#[derive(Clone)]
pub struct Writer {
    tx: std_mpsc::Sender<Batch>,
    handle: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

impl Writer {
    /// Queue a batch; fails only when the writer has stopped.
    pub fn submit(&self, batch: Batch) -> Result<()> {
        self.tx.send(batch).map_err(|_| Error::Store("store writer has stopped".into()))
    }

    /// Write and wait until durable.
    pub async fn write(&self, ops: Vec<Op>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.submit(Batch { ops, done: Done::Reply(tx) })?;
        rx.await.map_err(|_| Error::Store("store writer has stopped".into()))?
    }

    /// Wait for everything submitted so far to be durable.
    pub async fn flush(&self) -> Result<()> {
        self.write(Vec::new()).await
    }

    /// Stop the writer once every clone is dropped and its queue is drained (blocking).
    pub fn join(self) {
        let handle = self.handle.lock().ok().and_then(|mut h| h.take());
        drop(self.tx);
        if let Some(h) = handle {
            // Other clones may still hold senders; only join when we were the last.
            if Arc::strong_count(&self.handle) == 1 {
                let _ = h.join();
            }
        }
    }
}

fn writer_loop(
    db: &Database,
    rx: &std_mpsc::Receiver<Batch>,
    durable: &mpsc::UnboundedSender<DurableEvent>,
    commit_seconds: &prometheus::Histogram,
) {
    const MAX_GROUP: usize = 4096;
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(b) => group.push(b),
                Err(_) => break,
            }
        }
        let ops: Vec<Op> = group.iter_mut().flat_map(|b| std::mem::take(&mut b.ops)).collect();
        let started = std::time::Instant::now();
        let result = apply(db, &ops);
        commit_seconds.observe(started.elapsed().as_secs_f64());
        let mut tokens = Vec::new();
        for b in group {
            match b.done {
                Done::Token(t) => tokens.push(t),
                Done::Reply(tx) => {
                    let _ = tx.send(result.as_ref().map(|_| ()).map_err(|e| Error::Store(e.to_string())));
                }
            }
        }
        match result {
            Ok(()) => {
                if !tokens.is_empty() {
                    let _ = durable.send(Ok(tokens));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; the node stops accepting writes");
                let _ = durable.send(Err(e.to_string()));
                return;
            }
        }
    }
}

fn apply(db: &Database, ops: &[Op]) -> Result<()> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate);
    {
        let mut entries = txn.open_table(ENTRIES)?;
        let mut idem = txn.open_table(IDEM)?;
        let mut convs = txn.open_table(CONVS)?;
        let mut agents = txn.open_table(AGENTS)?;
        let mut canned = txn.open_table(CANNED)?;
        for op in ops {
            match op {
                Op::Entry { conv, seq, json, idem: client_id } => {
                    entries.insert((conv.as_str(), *seq), json.as_slice())?;
                    if let Some(c) = client_id {
                        idem.insert((conv.as_str(), c.as_str()), *seq)?;
                    }
                }
                Op::Conversation { id, json } => {
                    convs.insert(id.as_str(), json.as_slice())?;
                }
                Op::Agent { id, json } => {
                    agents.insert(id.as_str(), json.as_slice())?;
                }
                Op::Canned { id, json } => {
                    canned.insert(id.as_str(), json.as_slice())?;
                }
                Op::DeleteCanned { id } => {
                    canned.remove(id.as_str())?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt { table, reason: e.to_string() })
}

/// JSON bytes of a value (our model types always serialise).
pub fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Body, Participant};

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            id: format!("m{seq}"),
            from: Participant::visitor("v", None),
            hlc: seq,
            ts: 0,
            body: Body::Message { text: format!("t{seq}") },
        }
    }

    #[test]
    fn entries_are_ranged_per_conversation() {
        let dir = std::env::temp_dir().join(format!("kefu-store-{}", rand::random::<u64>()));
        let s = Store::open(&dir).unwrap();
        let mut ops = Vec::new();
        for conv in ["a", "b"] {
            for seq in 1..=5 {
                ops.push(Op::Entry {
                    conv: conv.into(),
                    seq,
                    json: encode(&entry(seq)),
                    idem: Some(format!("m{seq}")),
                });
            }
        }
        s.write_now(ops).unwrap();
        assert_eq!(s.entries_after("a", 2, 10).unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(s.entries_before("b", 4, 2).unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(s.last_seq("a").unwrap(), 5);
        assert_eq!(s.last_seq("zzz").unwrap(), 0);
        assert_eq!(s.idempotent_seq("b", "m3").unwrap(), Some(3));
        assert!(matches!(Store::open(&dir), Err(Error::StoreLocked(_))));
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
