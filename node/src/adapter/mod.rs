//! Transports. A [`ProtocolAdapter`] turns a connection into a reader of inbound protocol frames and a
//! writer of outbound ones; the session layer above is the same for every transport. A new channel
//! (WeChat, email, webhook) is one more adapter.

pub mod tcp;
pub mod ws;

use std::future::Future;

/// One inbound unit from a transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A complete text frame.
    Text(String),
    /// A frame over the size limit (its size in bytes, as far as known); the connection stays usable.
    TooLarge(usize),
    /// A frame that is not UTF-8 text (binary WebSocket message, invalid UTF-8 line).
    NotText,
    /// Transport-level keep-alive traffic (ping/pong): proves the peer is alive.
    Activity,
}

/// Why the server closes a transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: normal closure.
    Normal,
    /// 1008: policy violation (authentication, origin, rate abuse).
    Policy,
    /// 1009: message too big for the transport.
    TooBig,
    /// 1012: service restart; reconnect.
    Restart,
    /// 1013: try again later (overloaded, slow consumer).
    TryAgain,
}

impl CloseCode {
    pub fn ws_code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::Policy => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::Restart => 1012,
            CloseCode::TryAgain => 1013,
        }
    }
}

/// Reading half of a transport.
pub trait FrameReader: Send + 'static {
    /// The next inbound unit; `None` when the peer closed; `Err` on a transport failure.
    fn next(&mut self) -> impl Future<Output = Option<Result<Inbound, String>>> + Send;
}

/// Writing half of a transport.
pub trait FrameWriter: Send + 'static {
    fn send(&mut self, text: &str) -> impl Future<Output = Result<(), String>> + Send;
    /// Several frames in order, written to the socket together (one syscall where they fit the buffer).
    fn send_all(&mut self, texts: &[crate::conn::Out]) -> impl Future<Output = Result<(), String>> + Send;
    /// Transport keep-alive; a no-op where the transport has none.
    fn ping(&mut self) -> impl Future<Output = Result<(), String>> + Send;
    fn close(&mut self, code: CloseCode, reason: &str) -> impl Future<Output = ()> + Send;
}

/// A connection that can be split into a frame reader and writer.
pub trait ProtocolAdapter: Send + 'static {
    type Reader: FrameReader;
    type Writer: FrameWriter;
    /// `ws` or `tcp`, for logs.
    const NAME: &'static str;
    fn split(self) -> (Self::Reader, Self::Writer);
}
