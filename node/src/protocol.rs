//! Protocol v1: the JSON frames clients and the node exchange, and the closed set of error codes.
//!
//! `node/PROTOCOL.md` is the normative description; this module is its typed mirror. Parsing never
//! panics: every failure maps to an [`ErrorCode`] the client can act on.

use serde::{Deserialize, Serialize};

use crate::model::{AgentStatus, ConversationSummary, Entry, Participant, Role};

/// Protocol version spoken by this node; clients may send it in `hello.v`.
pub const VERSION: u32 = 1;

/// A frame sent by a client.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// First frame of every connection.
    Hello(Hello),
    /// Visitor: open (or return) the visitor's active conversation.
    Open {
        id: String,
        #[serde(default)]
        skills: Vec<String>,
        #[serde(default)]
        name: Option<String>,
    },
    /// Append a text message to a conversation.
    Send { id: String, conv: String, text: String },
    /// Typing indicator (ephemeral, coalesced).
    Typing { conv: String, on: bool },
    /// Advance this participant's read cursor.
    Read { conv: String, seq: u64 },
    /// Ask for the entries after `last_seq`.
    Resume { conv: String, last_seq: u64 },
    /// Agent: accept an offered conversation.
    Accept { id: String, conv: String },
    /// Agent: decline an offered conversation (it is re-offered elsewhere).
    Decline { id: String, conv: String },
    /// Agent: hand a conversation to another agent or a skill group.
    Transfer {
        id: String,
        conv: String,
        #[serde(default)]
        to_agent: Option<String>,
        #[serde(default)]
        to_skill: Option<String>,
    },
    /// Agent or visitor: close a conversation.
    Close { id: String, conv: String },
    /// Visitor: rate a closed (or open) conversation, 1..=5.
    Rate {
        id: String,
        conv: String,
        score: u8,
        #[serde(default)]
        comment: Option<String>,
    },
    /// Agent: set presence.
    Presence { status: AgentStatus },
    /// Agent: watch (supervise) a conversation without being assigned.
    Watch { conv: String },
    /// Keep-alive.
    Ping {
        #[serde(default)]
        nonce: Option<u64>,
    },
}

impl ClientFrame {
    /// The client-chosen frame id, for frames that carry one.
    pub fn id(&self) -> Option<&str> {
        match self {
            ClientFrame::Open { id, .. }
            | ClientFrame::Send { id, .. }
            | ClientFrame::Accept { id, .. }
            | ClientFrame::Decline { id, .. }
            | ClientFrame::Transfer { id, .. }
            | ClientFrame::Close { id, .. }
            | ClientFrame::Rate { id, .. } => Some(id),
            _ => None,
        }
    }

    /// Stable name of the frame type, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Hello(_) => "hello",
            ClientFrame::Open { .. } => "open",
            ClientFrame::Send { .. } => "send",
            ClientFrame::Typing { .. } => "typing",
            ClientFrame::Read { .. } => "read",
            ClientFrame::Resume { .. } => "resume",
            ClientFrame::Accept { .. } => "accept",
            ClientFrame::Decline { .. } => "decline",
            ClientFrame::Transfer { .. } => "transfer",
            ClientFrame::Close { .. } => "close",
            ClientFrame::Rate { .. } => "rate",
            ClientFrame::Presence { .. } => "presence",
            ClientFrame::Watch { .. } => "watch",
            ClientFrame::Ping { .. } => "ping",
        }
    }
}

/// The `hello` frame: authentication and resume cursors.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// Protocol version the client speaks (1).
    #[serde(default)]
    pub v: Option<u32>,
    /// Required on the raw TCP adapter, where the path does not say the role.
    #[serde(default)]
    pub role: Option<Role>,
    /// Agent token (agents), or a visitor token from an earlier `welcome` (returning visitors).
    #[serde(default)]
    pub token: Option<String>,
    /// Site user id for verified visitors.
    #[serde(default)]
    pub user_id: Option<String>,
    /// hex(HMAC-SHA256(site_secret, user_id)).
    #[serde(default)]
    pub identity_hash: Option<String>,
    /// Visitor display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Last seen seq per conversation, for a gap-free replay.
    #[serde(default)]
    pub resume: Vec<ResumeCursor>,
}

/// Last `seq` a client has seen in one conversation.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeCursor {
    pub conv: String,
    pub last_seq: u64,
}

/// A frame sent by the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome(Welcome),
    /// A state-changing frame was accepted (and is durable).
    Ack {
        id: String,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        conv: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        seq: Option<u64>,
        /// True when this ack answers a retry of an earlier frame with the same id.
        #[serde(skip_serializing_if = "is_false", default)]
        duplicate: bool,
    },
    /// A new log entry (message or event).
    Msg {
        conv: String,
        entry: Entry,
    },
    /// Entries after a resume cursor, in order.
    Replay {
        conv: String,
        entries: Vec<Entry>,
        last_seq: u64,
    },
    /// Conversation state changed (or was offered, for agents).
    Conversation {
        conv: ConversationSummary,
    },
    /// An agent is offered a queued conversation and should accept within `expires_in_ms`.
    Offer {
        conv: ConversationSummary,
        expires_in_ms: u64,
    },
    /// The offer was withdrawn (timed out, declined or taken).
    OfferWithdrawn {
        conv: String,
    },
    /// Queue position of a visitor's conversation (1 = next).
    Queue {
        conv: String,
        position: usize,
        waiting: usize,
        /// Rough estimate from recent queue waits; absent until the node has seen an assignment.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        estimated_wait_ms: Option<u64>,
    },
    Typing {
        conv: String,
        from: Participant,
        on: bool,
        ttl_ms: u64,
    },
    Read {
        conv: String,
        by: Participant,
        seq: u64,
    },
    Presence {
        agent: String,
        status: AgentStatus,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        nonce: Option<u64>,
    },
    /// The node is going away: reconnect (after `retry_after_ms`) and resume.
    Reconnect {
        reason: String,
        retry_after_ms: u64,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<String>,
        code: ErrorCode,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        conv: Option<String>,
        /// For `reload`: the conversation's current last seq.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        last_seq: Option<u64>,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl ServerFrame {
    /// An error frame without conversation context.
    pub fn error(id: Option<&str>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error { id: id.map(str::to_owned), code, message: message.into(), conv: None, last_seq: None }
    }

    /// Serialise to the wire text. Serialising these types cannot fail (no maps with non-string keys).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|_| r#"{"type":"error","code":"internal","message":"serialisation failed"}"#.to_owned())
    }
}

/// Sent once after a successful `hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub v: u32,
    pub session: String,
    pub node: String,
    pub role: Role,
    /// Visitor or agent id.
    pub id: String,
    /// Visitors: a signed token to present in the next `hello` to be recognised again.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub token: Option<String>,
    /// Open conversations of this participant.
    pub conversations: Vec<ConversationSummary>,
    /// Limits the client should respect.
    pub limits: Limits,
}

/// Limits advertised in `welcome`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_text_chars: usize,
    pub frames_per_sec: u32,
}

/// The closed set of error codes clients see. Never rename: clients switch on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON or misses required fields.
    BadFrame,
    /// The `type` is not a protocol v1 frame type.
    UnknownType,
    /// The frame exceeds the maximum frame size.
    FrameTooLarge,
    /// The first frame must be `hello`.
    HelloRequired,
    /// Token missing, malformed, badly signed or for an unknown agent.
    Unauthorized,
    /// Token signature valid but expired.
    TokenExpired,
    /// Identity verification is enforced and this visitor has no valid identity hash.
    IdentityRequired,
    /// The Origin header is not in the allowlist (HTTP 403 before upgrade).
    ForbiddenOrigin,
    /// The caller may not act on this conversation.
    Forbidden,
    /// No such conversation (or agent, or canned reply).
    NotFound,
    /// A field is invalid (empty text, score out of range, ...).
    Invalid,
    /// The action does not fit the conversation's state (accepting a conversation not offered to you, ...).
    Conflict,
    /// Too many frames: slow down.
    RateLimited,
    /// Rejected by the sensitive-word filter.
    ContentRejected,
    /// The resume gap cannot be replayed: fetch history over REST, then resume from its last seq.
    Reload,
    /// This connection did not read fast enough and is closed.
    SlowConsumer,
    /// The conversation is owned by another node (cluster mode).
    NotOwner,
    /// The node is shutting down.
    Unavailable,
    /// An unexpected server fault; the frame had no effect unless acked later.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::IdentityRequired => "identity_required",
            ErrorCode::ForbiddenOrigin => "forbidden_origin",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Invalid => "invalid",
            ErrorCode::Conflict => "conflict",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::ContentRejected => "content_rejected",
            ErrorCode::Reload => "reload",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::NotOwner => "not_owner",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// Whether the node closes the connection after sending this error.
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            ErrorCode::HelloRequired
                | ErrorCode::Unauthorized
                | ErrorCode::TokenExpired
                | ErrorCode::IdentityRequired
                | ErrorCode::ForbiddenOrigin
                | ErrorCode::SlowConsumer
                | ErrorCode::Unavailable
        )
    }
}

/// Parse one client frame, telling a malformed frame from an unknown type.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, (ErrorCode, String)> {
    match serde_json::from_str::<ClientFrame>(text) {
        Ok(f) => Ok(f),
        Err(err) => {
            // Distinguish "valid JSON object with a type we do not know" from everything else.
            let value: serde_json::Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(_) => return Err((ErrorCode::BadFrame, "frame is not valid JSON".into())),
            };
            match value.get("type").and_then(|t| t.as_str()) {
                None => Err((ErrorCode::BadFrame, "frame has no string field `type`".into())),
                Some(t) if !KNOWN_TYPES.contains(&t) => {
                    Err((ErrorCode::UnknownType, format!("unknown frame type `{}`", truncate(t, 40))))
                }
                Some(_) => Err((ErrorCode::BadFrame, truncate(&err.to_string(), 200))),
            }
        }
    }
}

const KNOWN_TYPES: &[&str] = &[
    "hello", "open", "send", "typing", "read", "resume", "accept", "decline", "transfer", "close", "rate", "presence",
    "watch", "ping",
];

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_frame_round_trips() {
        let f = parse_client_frame(r#"{"type":"send","id":"m1","conv":"c1","text":"hi"}"#).unwrap();
        assert_eq!(f, ClientFrame::Send { id: "m1".into(), conv: "c1".into(), text: "hi".into() });
    }

    #[test]
    fn malformed_and_unknown_frames_get_distinct_codes() {
        assert_eq!(parse_client_frame("{not json").unwrap_err().0, ErrorCode::BadFrame);
        assert_eq!(parse_client_frame(r#"{"type":"teleport"}"#).unwrap_err().0, ErrorCode::UnknownType);
        assert_eq!(parse_client_frame(r#"{"type":"send","id":"x"}"#).unwrap_err().0, ErrorCode::BadFrame);
        assert_eq!(parse_client_frame(r#"[1,2]"#).unwrap_err().0, ErrorCode::BadFrame);
        assert_eq!(parse_client_frame(r#"{"type":"ping","extra":1}"#).unwrap_err().0, ErrorCode::BadFrame);
    }

    #[test]
    fn error_frame_serialises_code_in_snake_case() {
        let j = ServerFrame::error(Some("a"), ErrorCode::RateLimited, "slow down").to_json();
        assert!(j.contains(r#""code":"rate_limited""#), "{j}");
        assert!(j.contains(r#""type":"error""#), "{j}");
    }

    #[test]
    fn every_error_code_string_matches_serde() {
        for c in [
            ErrorCode::BadFrame,
            ErrorCode::UnknownType,
            ErrorCode::FrameTooLarge,
            ErrorCode::HelloRequired,
            ErrorCode::Unauthorized,
            ErrorCode::TokenExpired,
            ErrorCode::IdentityRequired,
            ErrorCode::ForbiddenOrigin,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::Invalid,
            ErrorCode::Conflict,
            ErrorCode::RateLimited,
            ErrorCode::ContentRejected,
            ErrorCode::Reload,
            ErrorCode::SlowConsumer,
            ErrorCode::NotOwner,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
        ] {
            assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{}\"", c.as_str()));
        }
    }
}
