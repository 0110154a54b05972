//! Handles shared by every connection and request handler of one node.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use tokio::sync::watch;

use crate::auth::Auth;
use crate::config::Config;
use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::store::{Store, Writer};

/// What a session or REST handler needs from the node.
#[derive(Debug)]
pub struct NodeContext {
    pub cfg: Arc<Config>,
    pub engine: EngineHandle,
    pub auth: Auth,
    pub metrics: Metrics,
    pub store: Store,
    pub writer: Writer,
    next_conn: AtomicU64,
    open_conns: AtomicUsize,
    ready: AtomicBool,
    shutdown: watch::Receiver<bool>,
}

impl NodeContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Arc<Config>,
        engine: EngineHandle,
        auth: Auth,
        metrics: Metrics,
        store: Store,
        writer: Writer,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        NodeContext {
            cfg,
            engine,
            auth,
            metrics,
            store,
            writer,
            next_conn: AtomicU64::new(1),
            open_conns: AtomicUsize::new(0),
            ready: AtomicBool::new(true),
            shutdown,
        }
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Reserve a connection slot; `None` when the node is full.
    pub fn try_open(self: &Arc<Self>) -> Option<ConnSlot> {
        let n = self.open_conns.fetch_add(1, Ordering::SeqCst);
        if n >= self.cfg.limits.max_connections {
            self.open_conns.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(ConnSlot { ctx: self.clone() })
    }

    pub fn open_connections(&self) -> usize {
        self.open_conns.load(Ordering::SeqCst)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !*self.shutdown.borrow()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }
}

/// A held connection slot, released on drop.
#[derive(Debug)]
pub struct ConnSlot {
    ctx: Arc<NodeContext>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.ctx.open_conns.fetch_sub(1, Ordering::SeqCst);
    }
}
