//! The engine's handle on one client connection: a bounded outbound queue of serialised frames and a
//! way to close it from the engine side (slow consumer, shutdown) without blocking.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Notify, mpsc};

use crate::protocol::ErrorCode;

/// Process-unique connection id.
pub type ConnId = u64;

/// A serialised frame, shared between every connection it fans out to.
pub type Out = Arc<str>;

/// Engine-initiated close request.
#[derive(Debug, Default)]
pub struct Closer {
    notify: Notify,
    closed: AtomicBool,
    reason: std::sync::Mutex<Option<CloseReason>>,
}

/// Why the engine closed a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Error frame code to send before closing.
    Error(ErrorCode, String),
    /// Graceful shutdown: tell the client to reconnect elsewhere.
    Reconnect,
}

impl Closer {
    pub fn close(&self, reason: CloseReason) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            if let Ok(mut r) = self.reason.lock() {
                *r = Some(reason);
            }
            // Both the reader loop and the writer task wait on this: wake every waiter.
            self.notify.notify_waiters();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Resolves once `close` was called, with its reason.
    pub async fn closed(&self) -> CloseReason {
        loop {
            // Register interest before checking the flag, so a close in between is not missed.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_closed() {
                return self.reason.lock().ok().and_then(|r| r.clone()).unwrap_or(CloseReason::Reconnect);
            }
            notified.await;
        }
    }
}

/// What the engine keeps per connection.
#[derive(Debug, Clone)]
pub struct Conn {
    pub id: ConnId,
    pub out: mpsc::Sender<Out>,
    pub closer: Arc<Closer>,
}
