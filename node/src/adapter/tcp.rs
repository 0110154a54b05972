//! Raw TCP adapter for server-to-server integrations: newline-delimited JSON frames, the same
//! protocol as the WebSocket endpoints. The first frame's `hello.role` says who is speaking.

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::{CloseCode, FrameReader, FrameWriter, Inbound, ProtocolAdapter};

pub struct TcpAdapter {
    pub stream: TcpStream,
    pub max_frame_bytes: usize,
}

pub struct TcpReader {
    reader: BufReader<OwnedReadHalf>,
    line: Vec<u8>,
    /// Skipping the rest of an oversized line; holds its size so far.
    discarding: Option<usize>,
    max: usize,
}

pub struct TcpWriter {
    writer: OwnedWriteHalf,
}

impl ProtocolAdapter for TcpAdapter {
    type Reader = TcpReader;
    type Writer = TcpWriter;
    const NAME: &'static str = "tcp";

    fn split(self) -> (TcpReader, TcpWriter) {
        let (r, w) = self.stream.into_split();
        (
            TcpReader {
                reader: BufReader::with_capacity(4096, r),
                line: Vec::new(),
                discarding: None,
                max: self.max_frame_bytes,
            },
            TcpWriter { writer: w },
        )
    }
}

impl FrameReader for TcpReader {
    async fn next(&mut self) -> Option<Result<Inbound, String>> {
        loop {
            let buf = match self.reader.fill_buf().await {
                Ok(b) => b,
                Err(e) => return Some(Err(e.to_string())),
            };
            if buf.is_empty() {
                return None;
            }
            match buf.iter().position(|b| *b == b'\n') {
                Some(pos) => {
                    let too_large = match self.discarding.take() {
                        Some(n) => Some(n + pos),
                        None if self.line.len() + pos > self.max => Some(self.line.len() + pos),
                        None => {
                            self.line.extend_from_slice(&buf[..pos]);
                            None
                        }
                    };
                    self.reader.consume(pos + 1);
                    if let Some(n) = too_large {
                        self.line.clear();
                        return Some(Ok(Inbound::TooLarge(n)));
                    }
                    let mut line = std::mem::take(&mut self.line);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return Some(Ok(match String::from_utf8(line) {
                        Ok(t) => Inbound::Text(t),
                        Err(_) => Inbound::NotText,
                    }));
                }
                None => {
                    let n = buf.len();
                    match self.discarding.as_mut() {
                        Some(d) => *d += n,
                        None if self.line.len() + n > self.max => {
                            self.discarding = Some(self.line.len() + n);
                            self.line.clear();
                        }
                        None => self.line.extend_from_slice(buf),
                    }
                    self.reader.consume(n);
                }
            }
        }
    }
}

impl FrameWriter for TcpWriter {
    async fn send(&mut self, text: &str) -> Result<(), String> {
        let mut buf = Vec::with_capacity(text.len() + 1);
        buf.extend_from_slice(text.as_bytes());
        buf.push(b'\n');
        self.writer.write_all(&buf).await.map_err(|e| e.to_string())
    }

    async fn send_all(&mut self, texts: &[crate::conn::Out]) -> Result<(), String> {
        let mut buf = Vec::with_capacity(texts.iter().map(|t| t.len() + 1).sum());
        for t in texts {
            buf.extend_from_slice(t.as_bytes());
            buf.push(b'\n');
        }
        self.writer.write_all(&buf).await.map_err(|e| e.to_string())
    }

    async fn ping(&mut self) -> Result<(), String> {
        Ok(())
    }

    async fn close(&mut self, _code: CloseCode, _reason: &str) {
        let _ = self.writer.shutdown().await;
    }
}
