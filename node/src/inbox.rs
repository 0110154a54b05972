//! Offline inbox: entries addressed to a participant with no live connection, delivered when they
//! connect again. One trait, a local-directory implementation here (S3 in cluster mode later).
//!
//! The inbox is not the source of truth — the conversation log is — so it need not fsync: if an inbox
//! write is lost in a crash, a client resuming from its cursor still gets the entries from the log.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::conn::ConnId;
use crate::error::{Error, Result};
use crate::model::Entry;

/// A boxed future, so the trait can be used as an object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Storage for offline entries, keyed by recipient (`visitor:ID`, `agent:ID`).
pub trait InboxStore: Send + Sync + 'static {
    /// Append entries for `recipient`, in order.
    fn put<'a>(&'a self, recipient: &'a str, items: &'a [(String, Entry)]) -> BoxFuture<'a, Result<()>>;
    /// Remove and return everything held for `recipient`, oldest first.
    fn take<'a>(&'a self, recipient: &'a str) -> BoxFuture<'a, Result<Vec<(String, Entry)>>>;
}

/// Largest inbox file kept per recipient.
pub const MAX_INBOX_BYTES: u64 = 1024 * 1024;

/// One JSON line per entry in `<dir>/<hex(recipient)>.jsonl`.
#[derive(Debug, Clone)]
pub struct LocalDirInbox {
    dir: PathBuf,
}

impl LocalDirInbox {
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create inbox dir {}", dir.display()), e))?;
        Ok(LocalDirInbox { dir: dir.to_path_buf() })
    }

    fn path(&self, recipient: &str) -> PathBuf {
        let name: String = recipient.bytes().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{name}.jsonl"))
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Line {
    conv: String,
    entry: Entry,
}

impl InboxStore for LocalDirInbox {
    fn put<'a>(&'a self, recipient: &'a str, items: &'a [(String, Entry)]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut buf = Vec::new();
            for (conv, entry) in items {
                let line = Line { conv: conv.clone(), entry: entry.clone() };
                serde_json::to_writer(&mut buf, &line).map_err(|e| Error::Store(e.to_string()))?;
                buf.push(b'\n');
            }
            let path = self.path(recipient);
            // A recipient who never comes back must not grow the disk without bound. Past the cap new
            // entries are dropped here; they stay in the conversation log, which a resuming client reads.
            if let Ok(meta) = tokio::fs::metadata(&path).await {
                if meta.len() > MAX_INBOX_BYTES {
                    return Ok(());
                }
            }
            let mut f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .await
                .map_err(|e| Error::io(format!("open inbox {}", path.display()), e))?;
            f.write_all(&buf).await.map_err(|e| Error::io("write inbox", e))?;
            // A tokio File hands writes to a blocking thread: `write_all` can return before the bytes reach
            // the file, and a `take` that runs meanwhile would read and delete the file without them (the
            // write then lands in the unlinked file: lost). `flush` waits for the write to complete.
            f.flush().await.map_err(|e| Error::io("write inbox", e))?;
            Ok(())
        })
    }

    fn take<'a>(&'a self, recipient: &'a str) -> BoxFuture<'a, Result<Vec<(String, Entry)>>> {
        Box::pin(async move {
            let path = self.path(recipient);
            let text = match tokio::fs::read_to_string(&path).await {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(Error::io(format!("read inbox {}", path.display()), e)),
            };
            let mut out = Vec::new();
            for line in text.lines().filter(|l| !l.is_empty()) {
                // A torn last line (crash mid-append) is skipped: the log still has the entry.
                if let Ok(l) = serde_json::from_str::<Line>(line) {
                    out.push((l.conv, l.entry));
                }
            }
            tokio::fs::remove_file(&path).await.map_err(|e| Error::io("remove inbox", e))?;
            Ok(out)
        })
    }
}

/// Requests to the inbox task. Processed strictly in order, so a `Take` sees every earlier `Put`.
#[derive(Debug)]
pub enum InboxCmd {
    Put { recipient: String, items: Vec<(String, Entry)> },
    Take { recipient: String, conn: ConnId },
}

/// Runs the inbox: applies commands in order and reports drained entries through `drained`.
pub async fn run_inbox(
    store: Box<dyn InboxStore>,
    mut rx: mpsc::UnboundedReceiver<InboxCmd>,
    drained: impl Fn(ConnId, Vec<(String, Entry)>) + Send + 'static,
) {
    while let Some(cmd) = rx.recv().await {
        match cmd {
            InboxCmd::Put { recipient, items } => {
                if let Err(e) = store.put(&recipient, &items).await {
                    tracing::warn!(error = %e, "offline inbox write failed; the entry stays in the log");
                }
            }
            InboxCmd::Take { recipient, conn } => {
                let items = store.take(&recipient).await.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "offline inbox read failed");
                    Vec::new()
                });
                drained(conn, items);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Body, Entry, Participant};

    fn entry(seq: u64) -> Entry {
        let body = Body::Message { text: format!("m{seq}") };
        Entry { seq, id: format!("m-{seq}"), from: Participant::agent("alice", "Alice"), hlc: seq << 16, ts: seq, body }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn take_right_after_put_returns_what_was_put() {
        // The inbox task runs a put and then, for the reconnecting recipient, a take: the take must see the
        // put's bytes even though file I/O runs on tokio's blocking threads.
        let dir = tempfile::tempdir().expect("tempdir");
        let inbox = LocalDirInbox::new(dir.path()).expect("inbox");
        for round in 0..300u64 {
            let items = vec![("c_1".to_owned(), entry(round * 2 + 1)), ("c_2".to_owned(), entry(round * 2 + 2))];
            inbox.put("agent:alice", &items).await.expect("put");
            let got = inbox.take("agent:alice").await.expect("take");
            assert_eq!(got, items, "round {round}: the take saw the put");
        }
        assert!(inbox.take("agent:alice").await.expect("take").is_empty(), "a take empties the inbox");
    }
}
