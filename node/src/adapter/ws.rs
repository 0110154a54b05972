//! WebSocket adapter (axum): text frames carry protocol JSON; binary frames are refused.

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};

use super::{CloseCode, FrameReader, FrameWriter, Inbound, ProtocolAdapter};

/// A WebSocket connection with the node's frame size limit.
pub struct WsAdapter {
    pub socket: WebSocket,
    pub max_frame_bytes: usize,
}

pub struct WsReader {
    stream: SplitStream<WebSocket>,
    max: usize,
}

pub struct WsWriter {
    sink: SplitSink<WebSocket, Message>,
}

impl ProtocolAdapter for WsAdapter {
    type Reader = WsReader;
    type Writer = WsWriter;
    const NAME: &'static str = "ws";

    fn split(self) -> (WsReader, WsWriter) {
        let (sink, stream) = self.socket.split();
        (WsReader { stream, max: self.max_frame_bytes }, WsWriter { sink })
    }
}

impl FrameReader for WsReader {
    async fn next(&mut self) -> Option<Result<Inbound, String>> {
        match self.stream.next().await? {
            Ok(Message::Text(t)) if t.len() > self.max => Some(Ok(Inbound::TooLarge(t.len()))),
            Ok(Message::Text(t)) => Some(Ok(Inbound::Text(t.as_str().to_owned()))),
            Ok(Message::Binary(b)) if b.len() > self.max => Some(Ok(Inbound::TooLarge(b.len()))),
            Ok(Message::Binary(_)) => Some(Ok(Inbound::NotText)),
            Ok(Message::Ping(_) | Message::Pong(_)) => Some(Ok(Inbound::Activity)),
            Ok(Message::Close(_)) => None,
            Err(e) => Some(Err(e.to_string())),
        }
    }
}

impl FrameWriter for WsWriter {
    async fn send(&mut self, text: &str) -> Result<(), String> {
        self.sink.send(Message::Text(text.into())).await.map_err(|e| e.to_string())
    }

    async fn send_all(&mut self, texts: &[crate::conn::Out]) -> Result<(), String> {
        for t in texts {
            self.sink.feed(Message::Text((**t).into())).await.map_err(|e| e.to_string())?;
        }
        self.sink.flush().await.map_err(|e| e.to_string())
    }

    async fn ping(&mut self) -> Result<(), String> {
        self.sink.send(Message::Ping(Default::default())).await.map_err(|e| e.to_string())
    }

    async fn close(&mut self, code: CloseCode, reason: &str) {
        let frame = CloseFrame { code: code.ws_code(), reason: reason.chars().take(100).collect::<String>().into() };
        let _ = self.sink.send(Message::Close(Some(frame))).await;
        let _ = self.sink.close().await;
    }
}
