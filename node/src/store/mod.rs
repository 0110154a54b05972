//! The local durable store: a write-ahead log for durability and redb (an embedded, pure-Rust, ACID
//! B-tree) as the index every read uses.
//!
//! Writes arrive as [`Batch`]es on one writer thread, which appends every batch waiting to the log with one
//! `fdatasync` (group commit) and reports the batches durable in order — so many acks share one sync, and
//! the order in which batches were submitted is the order in which they become durable; the engine relies
//! on that to fan out entries in `seq` order. An indexer thread applies the log to redb in large batches
//! ([`WriterOptions::index_interval`]); until then the writes live in an in-memory overlay that every read
//! consults first, so a write is readable from the moment it is acknowledged. At start-up
//! [`Store::open`] replays the log past the index's last applied lsn into redb.
//! Reads (history, REST) use redb read transactions from any thread, concurrently with the writer.

mod overlay;
mod wal;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use redb::{Database, Durability, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use overlay::Overlay;
use wal::Wal;
pub use writer::WriterOptions;

use crate::error::{Error, Result};
use crate::model::{Agent, CannedReply, ConvState, Conversation, Entry};

const ENTRIES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("entries");
const IDEM: TableDefinition<(&str, &str), u64> = TableDefinition::new("idempotency");
const CONVS: TableDefinition<&str, &[u8]> = TableDefinition::new("conversations");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const CANNED: TableDefinition<&str, &[u8]> = TableDefinition::new("canned_replies");
/// `wal_applied_lsn`: the last log record the index holds.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const APPLIED_LSN: &str = "wal_applied_lsn";

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
    overlay: Arc<Mutex<Overlay>>,
    wal_dir: PathBuf,
    /// The log, until [`Store::spawn_writer`] hands it to the writer thread.
    wal: Arc<Mutex<Option<Wal>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("wal_dir", &self.wal_dir).finish_non_exhaustive()
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
    /// Open (or create) `<dir>/kefu.redb` and `<dir>/wal/`, and bring the index up to date with the log.
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
            txn.open_table(META)?;
        }
        txn.commit()?;
        let applied = db.begin_read()?.open_table(META)?.get(APPLIED_LSN)?.map_or(0, |v| v.value());
        // Only the process holding the redb lock gets here, so the log has one writer.
        let wal_dir = dir.join("wal");
        let (wal, replay) = Wal::open(&wal_dir, applied)?;
        let through = replay.last().map_or(applied, |r| r.0);
        if let Some(&(first, _)) = replay.first() {
            let records = replay.len();
            let ops: Vec<Op> = replay.into_iter().map(|(_, op)| op).collect();
            apply(&db, first, &ops, Some(through))?;
            tracing::info!(records, through_lsn = through, "replayed the write-ahead log into the index");
        }
        wal::remove_through(&wal_dir, through)?;
        Ok(Store { db: Arc::new(db), overlay: Arc::default(), wal_dir, wal: Arc::new(Mutex::new(Some(wal))) })
    }

    /// Read the state needed to resume service: agents and every conversation not closed. Reads the index
    /// only: call it at start-up, before any write (the log was replayed into the index by [`Store::open`]).
    pub fn load(&self, recent: usize) -> Result<Snapshot> {
        debug_assert!(lock(&self.overlay).is_empty(), "load() runs before writes start");
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
        if after == u64::MAX || limit == 0 {
            return Ok(Vec::new());
        }
        // Overlay first, then the index (see overlay.rs for why this order never misses a write).
        let mut rows: BTreeMap<u64, Vec<u8>> =
            lock(&self.overlay).entries_in(conv, after + 1..).into_iter().take(limit).collect();
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        for row in table.range((conv, after + 1)..=(conv, u64::MAX))?.take(limit) {
            let (k, v) = row?;
            rows.entry(k.value().1).or_insert_with(|| v.value().to_vec());
        }
        rows.values().take(limit).map(|j| decode("entries", j)).collect()
    }

    /// Entries of `conv` with `seq < before`, the newest `limit` of them, in ascending order.
    pub fn entries_before(&self, conv: &str, before: u64, limit: usize) -> Result<Vec<Entry>> {
        if before <= 1 || limit == 0 {
            return Ok(Vec::new());
        }
        let over = lock(&self.overlay).entries_in(conv, 1..before);
        let mut rows: BTreeMap<u64, Vec<u8>> = over.into_iter().rev().take(limit).collect();
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        for row in table.range((conv, 1)..(conv, before))?.rev().take(limit) {
            let (k, v) = row?;
            rows.entry(k.value().1).or_insert_with(|| v.value().to_vec());
        }
        let skip = rows.len().saturating_sub(limit);
        rows.values().skip(skip).map(|j| decode("entries", j)).collect()
    }

    /// The highest stored seq of `conv` (0 when empty).
    pub fn last_seq(&self, conv: &str) -> Result<u64> {
        let over = lock(&self.overlay).last_seq(conv);
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        let last = table.range((conv, 0)..=(conv, u64::MAX))?.next_back().transpose()?;
        Ok(last.map_or(0, |(k, _)| k.value().1).max(over.unwrap_or(0)))
    }

    /// The seq stored for a client id, if that id was appended before.
    pub fn idempotent_seq(&self, conv: &str, client_id: &str) -> Result<Option<u64>> {
        if let Some(seq) = lock(&self.overlay).idem(conv, client_id) {
            return Ok(Some(seq));
        }
        let txn = self.db.begin_read()?;
        let table = txn.open_table(IDEM)?;
        Ok(table.get((conv, client_id))?.map(|v| v.value()))
    }

    pub fn conversation(&self, id: &str) -> Result<Option<Conversation>> {
        let newer = lock(&self.overlay).latest(id, |g| &g.convs);
        self.latest_row(CONVS, "conversations", id, newer)
    }

    /// All conversations matching the filter, newest first, at most `limit`.
    pub fn conversations(
        &self,
        state: Option<ConvState>,
        agent: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Conversation>> {
        let newer = lock(&self.overlay).all_latest(|g| &g.convs).into_iter().map(|(k, v)| (k, Some(v))).collect();
        let mut out: Vec<Conversation> = self.all_rows(CONVS, "conversations", newer)?;
        out.retain(|c| state.is_none_or(|s| c.state == s) && agent.is_none_or(|a| c.agent.as_deref() == Some(a)));
        out.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(a.id.cmp(&b.id)));
        out.truncate(limit);
        Ok(out)
    }

    pub fn agent(&self, id: &str) -> Result<Option<Agent>> {
        let newer = lock(&self.overlay).latest(id, |g| &g.agents);
        self.latest_row(AGENTS, "agents", id, newer)
    }

    pub fn canned(&self) -> Result<Vec<CannedReply>> {
        let newer = lock(&self.overlay).all_latest(|g| &g.canned);
        self.all_rows(CANNED, "canned_replies", newer)
    }

    /// Row `id` of `table`: `newer` (the overlay's value, read first) when there is one, else the index's.
    fn latest_row<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &'static str,
        id: &str,
        newer: Option<Vec<u8>>,
    ) -> Result<Option<T>> {
        if let Some(json) = newer {
            return decode(name, &json).map(Some);
        }
        let txn = self.db.begin_read()?;
        let table = txn.open_table(table)?;
        table.get(id)?.map(|v| decode(name, v.value())).transpose()
    }

    /// Every row of `table` with the overlay's newer values laid over it (`None`: deleted since).
    fn all_rows<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        name: &'static str,
        newer: HashMap<String, Option<Vec<u8>>>,
    ) -> Result<Vec<T>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(table)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            if !newer.contains_key(k.value()) {
                out.push(decode(name, v.value())?);
            }
        }
        for json in newer.values().flatten() {
            out.push(decode(name, json)?);
        }
        Ok(out)
    }

    /// Apply one batch synchronously to the index (CLI use and start-up, before the writer runs).
    pub fn write_now(&self, ops: Vec<Op>) -> Result<()> {
        if lock(&self.wal).is_none() {
            return Err(Error::Store("write_now after the store writer started: submit to the Writer".into()));
        }
        apply(&self.db, 0, &ops, None)
    }

    /// Start the writer and indexer threads; durable tokens are reported on `durable`. Only one writer may
    /// run per store: the log has one appender.
    pub fn spawn_writer(&self, durable: mpsc::UnboundedSender<DurableEvent>, opts: WriterOptions) -> Result<Writer> {
        let wal = lock(&self.wal).take().ok_or_else(|| Error::Store("the store writer is already running".into()))?;
        let (tx, rx) = std_mpsc::channel::<Batch>();
        let (nudge_tx, nudge_rx) = std_mpsc::channel();
        let threads = writer::SharedThreads::default();
        let (db, overlay, wal_dir, o) = (self.db.clone(), self.overlay.clone(), self.wal_dir.clone(), opts.clone());
        let indexer = std::thread::Builder::new()
            .name("kefu-store-index".into())
            .spawn(move || writer::indexer_loop(&db, &nudge_rx, &overlay, &wal_dir, &o))
            .map_err(|e| Error::io("spawn store indexer", e))?;
        let overlay = self.overlay.clone();
        let writer = std::thread::Builder::new()
            .name("kefu-store-writer".into())
            .spawn(move || writer::writer_loop(wal, &rx, &durable, &overlay, &nudge_tx, &opts))
            .map_err(|e| Error::io("spawn store writer", e))?;
        *lock(&threads) = writer::Threads { writer: Some(writer), indexer: Some(indexer) };
        Ok(Writer { tx, threads })
    }
}

/// Submits batches to the writer thread.
#[derive(Clone)]
pub struct Writer {
    tx: std_mpsc::Sender<Batch>,
    threads: writer::SharedThreads,
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

    /// Drop this handle; when it was the last one, wait (blocking) for the writer to drain its queue and
    /// the indexer to apply the rest of the log to the index, so the next start has nothing to replay.
    pub fn join(self) {
        let Writer { tx, threads } = self;
        drop(tx);
        if Arc::strong_count(&threads) == 1 {
            lock(&threads).join();
        }
    }
}

/// The index tables, open in one write transaction.
struct IndexTables<'t> {
    entries: redb::Table<'t, (&'static str, u64), &'static [u8]>,
    idem: redb::Table<'t, (&'static str, &'static str), u64>,
    convs: redb::Table<'t, &'static str, &'static [u8]>,
    agents: redb::Table<'t, &'static str, &'static [u8]>,
    canned: redb::Table<'t, &'static str, &'static [u8]>,
}

/// Run `write` in one durable redb transaction; `applied` records the last log record it includes.
fn write_index(
    db: &Database,
    applied: Option<u64>,
    write: impl FnOnce(&mut IndexTables<'_>) -> Result<()>,
) -> Result<()> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate);
    {
        let mut t = IndexTables {
            entries: txn.open_table(ENTRIES)?,
            idem: txn.open_table(IDEM)?,
            convs: txn.open_table(CONVS)?,
            agents: txn.open_table(AGENTS)?,
            canned: txn.open_table(CANNED)?,
        };
        write(&mut t)?;
        if let Some(lsn) = applied {
            txn.open_table(META)?.insert(APPLIED_LSN, lsn)?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// Apply `ops` (the first has lsn `first`) in one transaction — log replay and CLI writes — through the
/// indexer's own path: one generation (the latest value per key, which is what applying them in order leaves),
/// all of it in one part.
fn apply(db: &Database, first: u64, ops: &[Op], applied: Option<u64>) -> Result<()> {
    if ops.is_empty() {
        return Ok(());
    }
    let mut o = Overlay::default();
    o.add(first, ops);
    apply_generations(db, &o.seal(), &IndexPart::EVERYTHING, applied)
}

/// One part of a paced index round: the writes of conversations with ids in `from..until` (`None`: unbounded)
/// and, with `others`, agents and canned replies.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct IndexPart {
    pub from: Option<String>,
    pub until: Option<String>,
    pub others: bool,
}

impl IndexPart {
    /// Every conversation, agents and canned replies: a round in one part.
    const EVERYTHING: IndexPart = IndexPart { from: None, until: None, others: true };

    fn holds(&self, conv: &str) -> bool {
        self.from.as_deref().is_none_or(|f| conv >= f) && self.until.as_deref().is_none_or(|u| conv < u)
    }

    /// Split the conversations that `gens` wrote into at most `n` parts of about equal count, in id order:
    /// each part touches one contiguous stretch of every table's B-tree.
    pub fn split(gens: &[Arc<overlay::Generation>], n: usize) -> Vec<IndexPart> {
        let ids: std::collections::BTreeSet<&str> = gens
            .iter()
            .flat_map(|g| g.entries.keys().chain(g.idem.keys()).chain(g.convs.keys()))
            .map(String::as_str)
            .collect();
        let ids: Vec<&str> = ids.into_iter().collect();
        let n = n.clamp(1, ids.len().max(1));
        let bounds: Vec<Option<String>> = (1..n).map(|k| Some(ids[k * ids.len() / n].to_owned())).collect();
        (0..n)
            .map(|k| IndexPart {
                from: if k == 0 { None } else { bounds[k - 1].clone() },
                until: bounds.get(k).cloned().flatten(),
                others: k == 0,
            })
            .collect()
    }
}

/// Apply one part of sealed overlay generations, oldest first (each holds the latest value per key of its
/// interval); `applied` is recorded with the round's last part only.
fn apply_generations(
    db: &Database,
    gens: &[Arc<overlay::Generation>],
    part: &IndexPart,
    applied: Option<u64>,
) -> Result<()> {
    write_index(db, applied, |t| {
        for g in gens {
            for (conv, rows) in g.entries.iter().filter(|(c, _)| part.holds(c)) {
                for (seq, json) in rows {
                    t.entries.insert((conv.as_str(), *seq), json.as_slice())?;
                }
            }
            for (conv, ids) in g.idem.iter().filter(|(c, _)| part.holds(c)) {
                for (client, seq) in ids {
                    t.idem.insert((conv.as_str(), client.as_str()), *seq)?;
                }
            }
            for (id, json) in g.convs.iter().filter(|(c, _)| part.holds(c)) {
                t.convs.insert(id.as_str(), json.as_slice())?;
            }
            if !part.others {
                continue;
            }
            for (id, json) in &g.agents {
                t.agents.insert(id.as_str(), json.as_slice())?;
            }
            for (id, json) in &g.canned {
                match json {
                    Some(j) => t.canned.insert(id.as_str(), j.as_slice()).map(drop)?,
                    None => t.canned.remove(id.as_str()).map(drop)?,
                }
            }
        }
        Ok(())
    })
}

/// A poisoned lock only means another thread panicked mid-update of plain maps; the data is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
    use std::time::Duration;

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

    fn opts(index_interval: Duration) -> WriterOptions {
        let h = || prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("t", "t")).unwrap();
        WriterOptions {
            commit_interval: Duration::ZERO,
            index_interval,
            commit_seconds: h(),
            index_seconds: h(),
            unindexed: prometheus::IntGauge::new("u", "u").unwrap(),
        }
    }

    fn seqs(v: Vec<Entry>) -> Vec<u64> {
        v.iter().map(|e| e.seq).collect()
    }

    /// Entries 1..=n of conversation `conv` (half of them already in the index when `split`).
    fn ops(conv: &str, range: std::ops::RangeInclusive<u64>) -> Vec<Op> {
        range
            .map(|seq| Op::Entry { conv: conv.into(), seq, json: encode(&entry(seq)), idem: Some(format!("m{seq}")) })
            .collect()
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn an_acknowledged_write_is_readable_before_the_index_has_it_and_survives_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.write_now(ops("a", 1..=3)).unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        // The index never catches up in this test: everything after seq 3 lives in the log and the overlay.
        let w = s.spawn_writer(tx, opts(Duration::from_secs(3600))).unwrap();
        w.write(ops("a", 4..=6)).await.unwrap();
        w.write(vec![Op::Agent {
            id: "x".into(),
            json: b"{\"id\":\"x\",\"name\":\"X\",\"capacity\":1,\"token_epoch\":0}".to_vec(),
        }])
        .await
        .unwrap();
        assert_eq!(seqs(s.entries_after("a", 2, 10).unwrap()), vec![3, 4, 5, 6]);
        assert_eq!(seqs(s.entries_after("a", 2, 2).unwrap()), vec![3, 4]);
        assert_eq!(seqs(s.entries_before("a", 6, 3).unwrap()), vec![3, 4, 5]);
        assert_eq!(seqs(s.entries_before("a", 3, 10).unwrap()), vec![1, 2]);
        assert_eq!(s.last_seq("a").unwrap(), 6);
        assert_eq!(s.idempotent_seq("a", "m5").unwrap(), Some(5));
        assert_eq!(s.agent("x").unwrap().map(|a| a.name), Some("X".to_owned()));
        assert!(s.write_now(Vec::new()).is_err(), "the CLI path is closed once the writer runs");

        // A copy of the data directory now is what a kill -9 leaves: the index lacks 4..=6, the log has them.
        let crashed = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), crashed.path());
        let r = Store::open(crashed.path()).unwrap();
        assert_eq!(seqs(r.entries_after("a", 0, 10).unwrap()), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(r.idempotent_seq("a", "m6").unwrap(), Some(6));
        assert!(r.agent("x").unwrap().is_some());
        let snap = r.load(10).unwrap();
        assert_eq!(snap.agents.len(), 1);
        drop(r);
        w.join();
    }

    #[tokio::test]
    async fn the_indexer_catches_up_and_a_clean_stop_leaves_nothing_to_replay() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let w = s.spawn_writer(tx, opts(Duration::from_millis(10))).unwrap();
        w.write(ops("b", 1..=50)).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !lock(&s.overlay).is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(lock(&s.overlay).is_empty(), "the indexer applied the log");
        assert_eq!(seqs(s.entries_after("b", 45, 10).unwrap()), vec![46, 47, 48, 49, 50]);
        w.write(ops("b", 51..=52)).await.unwrap();
        w.join();
        drop(s);
        let r = Store::open(dir.path()).unwrap();
        assert_eq!(r.last_seq("b").unwrap(), 52);
        let applied = r.db.begin_read().unwrap().open_table(META).unwrap().get(APPLIED_LSN).unwrap().map(|v| v.value());
        assert_eq!(applied, Some(52), "every record was indexed before the clean stop");
    }

    #[test]
    fn index_parts_cover_every_conversation_once_in_id_order() {
        let mut o = overlay::Overlay::default();
        let mut all = Vec::new();
        for c in ["j", "a", "e", "c", "h", "b", "g", "d", "i", "f"] {
            all.extend(ops(c, 1..=2));
        }
        all.push(Op::Conversation { id: "k".into(), json: b"{}".to_vec() });
        all.push(Op::Agent { id: "x".into(), json: b"{}".to_vec() });
        o.add(1, &all);
        let sealed = o.seal();
        let parts = IndexPart::split(&sealed, 3);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.iter().filter(|p| p.others).count(), 1, "agents and canned replies go with one part");
        for c in ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "zzz", ""] {
            assert_eq!(parts.iter().filter(|p| p.holds(c)).count(), 1, "{c} belongs to exactly one part");
        }
        let first_of = |c: &str| parts.iter().position(|p| p.holds(c)).unwrap();
        assert!(first_of("a") <= first_of("e") && first_of("e") <= first_of("k"), "parts follow id order");
        assert_eq!(first_of("a"), 0);
        assert_eq!(first_of("k"), 2);
        // More parts than conversations: one per conversation; nothing written: one unbounded part.
        assert_eq!(IndexPart::split(&sealed, 100).len(), 11);
        assert_eq!(IndexPart::split(&[], 5), vec![IndexPart { from: None, until: None, others: true }]);
    }

    #[tokio::test]
    async fn a_crash_between_the_parts_of_an_index_round_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let w = s.spawn_writer(tx, opts(Duration::from_secs(3600))).unwrap();
        for c in ["a", "b", "c", "d"] {
            w.write(ops(c, 1..=3)).await.unwrap();
        }
        let sealed = lock(&s.overlay).seal();
        let parts = IndexPart::split(&sealed, 2);
        apply_generations(&s.db, &sealed, &parts[0], None).unwrap();
        let in_index = |db: &Database, c: &str| {
            db.begin_read().unwrap().open_table(ENTRIES).unwrap().range((c, 0)..=(c, u64::MAX)).unwrap().count()
        };
        assert_eq!([in_index(&s.db, "a"), in_index(&s.db, "b"), in_index(&s.db, "c")], [3, 3, 0], "first part only");

        // A kill -9 now: redb holds half the round and no applied lsn for it; the log replays the whole round.
        let crashed = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), crashed.path());
        let r = Store::open(crashed.path()).unwrap();
        for c in ["a", "b", "c", "d"] {
            assert_eq!(seqs(r.entries_after(c, 0, 10).unwrap()), vec![1, 2, 3], "conversation {c}");
            assert_eq!(r.idempotent_seq(c, "m3").unwrap(), Some(3));
        }
        drop(r);
        w.join();
    }

    #[tokio::test]
    async fn a_paced_index_round_applies_every_part_and_then_releases_the_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        // 1.5 s: two parts per round, the second ~0.75 s after the first.
        let o = opts(Duration::from_millis(1500));
        let unindexed = o.unindexed.clone();
        let w = s.spawn_writer(tx, o).unwrap();
        for c in ["a", "b", "c", "d"] {
            w.write(ops(c, 1..=3)).await.unwrap();
        }
        assert_eq!(unindexed.get(), 12, "all logged, none indexed yet");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !lock(&s.overlay).is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(lock(&s.overlay).is_empty(), "the round finished");
        assert_eq!(unindexed.get(), 0);
        let txn = s.db.begin_read().unwrap();
        assert_eq!(txn.open_table(ENTRIES).unwrap().iter().unwrap().count(), 12);
        let applied = txn.open_table(META).unwrap().get(APPLIED_LSN).unwrap().map(|v| v.value());
        assert_eq!(applied, Some(12));
        drop(txn);
        w.join();
    }
}
