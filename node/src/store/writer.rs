//! The two store threads. The writer appends each group of batches to the write-ahead log with one
//! `fdatasync`, makes it visible in the overlay and reports it durable, in submission order. The indexer
//! applies what the log held at the end of each `index_interval` to redb during the next one (one redb
//! commit per ~1 s part, see [`indexer_loop`]), then drops those writes from the overlay and deletes log
//! segments redb now covers.
//!
//! Why two: a redb commit copies every B-tree page it touches, and chat entries of many conversations
//! land on as many different leaves, so committing each small group cost more than all the socket work of
//! delivering it. The log makes an ack cost one sequential write; redb sees each conversation's entries of
//! a whole interval in one commit.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::Database;
use tokio::sync::mpsc;

use super::overlay::Overlay;
use super::wal::{self, Wal};
use super::{Batch, Done, DurableEvent, IndexPart, Op, apply_generations, lock};
use crate::error::Error;

/// Timing of the store threads.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Under load, start a group commit at most this often (more batches share one `fdatasync`); an
    /// isolated write is committed at once.
    pub commit_interval: Duration,
    /// How long the log may run ahead of the redb index.
    pub index_interval: Duration,
    /// Duration of each group commit (`fdatasync` included).
    pub commit_seconds: prometheus::Histogram,
    /// Duration of each index batch (redb commit included).
    pub index_seconds: prometheus::Histogram,
    /// Ops in the overlay (logged, not yet indexed).
    pub unindexed: prometheus::IntGauge,
}

/// Most batches in one group commit.
const MAX_GROUP: usize = 4096;
/// Nice value of the indexer thread.
const INDEXER_NICE: i32 = 10;
/// The indexer is nudged to run early once this many ops wait.
const MAX_UNINDEXED: usize = 200_000;

pub(super) fn writer_loop(
    mut wal: Wal,
    rx: &Receiver<Batch>,
    durable: &mpsc::UnboundedSender<DurableEvent>,
    overlay: &Mutex<Overlay>,
    nudge: &Sender<()>,
    opts: &WriterOptions,
) {
    let mut last_commit: Option<Instant> = None;
    while let Ok(first) = rx.recv() {
        if let Some(wait) = last_commit.and_then(|t| opts.commit_interval.checked_sub(t.elapsed())) {
            std::thread::sleep(wait);
        }
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(b) => group.push(b),
                Err(_) => break,
            }
        }
        let ops: Vec<Op> = group.iter_mut().flat_map(|b| std::mem::take(&mut b.ops)).collect();
        let started = Instant::now();
        let result = wal.append(&ops);
        if !ops.is_empty() {
            opts.commit_seconds.observe(started.elapsed().as_secs_f64());
            last_commit = Some(Instant::now());
        }
        if let Ok(first_lsn) = result {
            if !ops.is_empty() {
                let (size, total) = {
                    let mut o = lock(overlay);
                    (o.add(first_lsn, &ops), o.len())
                };
                opts.unindexed.set(total as i64);
                if size >= MAX_UNINDEXED && size - ops.len() < MAX_UNINDEXED {
                    let _ = nudge.send(());
                }
            }
        }
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
            Ok(_) => {
                if !tokens.is_empty() {
                    let _ = durable.send(Ok(tokens));
                }
            }
            Err(e) => {
                // After a failed fdatasync the page cache may no longer match the disk: stop writing.
                tracing::error!(error = %e, "write-ahead log append failed; the node stops accepting writes");
                let _ = durable.send(Err(e.to_string()));
                return;
            }
        }
    }
}

/// Every `index_interval` (sooner when nudged: the overlay is large), seal the overlay's newest generation
/// and apply the sealed ones to redb, paced: in parts of about one second each, spread over the next
/// interval; returns after a last round once the writer has stopped.
///
/// Why paced: a redb commit rewrites every B-tree leaf it touches, and entries of many conversations land
/// on as many leaves. A longer interval gives each conversation several entries per leaf rewrite; parts
/// (contiguous conversation-id ranges) keep each commit's disk writes small, so the log's `fdatasync`s
/// never queue behind one large index flush. Measured with 9,270 connections at 6k msgs/s (README).
pub(super) fn indexer_loop(
    db: &Database,
    nudge: &Receiver<()>,
    overlay: &Mutex<Overlay>,
    wal_dir: &std::path::Path,
    opts: &WriterOptions,
) {
    // Index maintenance is background work, like compaction in other stores: when the core is busy, socket
    // work and log commits go first (a nice-0 thread gets ~9x the CPU share of a nice-10 one). It never
    // holds the overlay lock across work, so the writer never waits behind it. Under sustained overload
    // the indexer falls behind and its batches grow, which makes them cheaper per entry.
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), INDEXER_NICE) {
        tracing::debug!(error = %e, "could not lower the indexer thread's priority");
    }
    let parts = opts.index_interval.as_secs_f64().ceil().max(1.0) as usize;
    let mut next_round = Instant::now() + opts.index_interval;
    let mut closed = false;
    let mut hurry = false;
    loop {
        if !closed && !hurry {
            let wait = next_round.saturating_duration_since(Instant::now());
            closed = matches!(nudge.recv_timeout(wait), Err(RecvTimeoutError::Disconnected));
        }
        hurry = false;
        let round = Instant::now();
        next_round = round + opts.index_interval;
        let sealed = lock(overlay).seal();
        let Some(last) = sealed.iter().map(|g| g.last_lsn).max() else {
            if closed {
                return;
            }
            continue;
        };
        let split = IndexPart::split(&sealed, if closed { 1 } else { parts });
        let n = split.len();
        let mut failed = false;
        for (k, part) in split.iter().enumerate() {
            let started = Instant::now();
            let applied = (k + 1 == n).then_some(last);
            if let Err(e) = apply_generations(db, &sealed, part, applied) {
                // The log still holds everything and reads still see it (overlay): retry next round.
                let waiting: usize = sealed.iter().map(|g| g.len()).sum();
                tracing::error!(error = %e, waiting, "store index commit failed; retrying");
                failed = true;
                break;
            }
            opts.index_seconds.observe(started.elapsed().as_secs_f64());
            // Spread the parts over the interval; a nudge (the overlay is large) or a stop ends the pacing.
            if k + 1 < n && !closed && !hurry {
                let due = round + opts.index_interval.mul_f64((k + 1) as f64 / n as f64);
                match nudge.recv_timeout(due.saturating_duration_since(Instant::now())) {
                    Ok(()) => hurry = true,
                    Err(RecvTimeoutError::Disconnected) => closed = true,
                    Err(RecvTimeoutError::Timeout) => {}
                }
            }
        }
        if !failed {
            let (released, left) = {
                let mut o = lock(overlay);
                let released = o.release(sealed.len());
                (released, o.len())
            };
            opts.unindexed.set(left as i64);
            drop(released);
            drop(sealed);
            if let Err(e) = wal::remove_through(wal_dir, last) {
                tracing::warn!(error = %e, "could not remove indexed log segments; will retry");
            }
        }
        // After a stop, rounds repeat without pause until nothing is left (or the index fails).
        if closed && failed {
            return;
        }
    }
}

/// Handles of the running threads, joined when the last [`super::Writer`] clone is closed.
#[derive(Debug, Default)]
pub(super) struct Threads {
    pub writer: Option<std::thread::JoinHandle<()>>,
    pub indexer: Option<std::thread::JoinHandle<()>>,
}

impl Threads {
    pub fn join(&mut self) {
        for h in [self.writer.take(), self.indexer.take()].into_iter().flatten() {
            let _ = h.join();
        }
    }
}

pub(super) type SharedThreads = Arc<Mutex<Threads>>;
