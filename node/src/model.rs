//! The data model: participants, conversations, log entries, agents, canned replies.
//!
//! These types are both the stored form (JSON values in the embedded store) and the wire form, so a
//! change here is a protocol and storage change: add optional fields, never rename.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Who a connection speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Visitor,
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Visitor => "visitor",
            Role::Agent => "agent",
        }
    }
}

/// The author of an entry or an ephemeral signal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Participant {
    /// `visitor`, `agent`, `bot` or `system`.
    pub role: String,
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
}

impl Participant {
    pub fn visitor(id: &str, name: Option<&str>) -> Self {
        Participant { role: "visitor".into(), id: id.into(), name: name.map(Into::into) }
    }
    pub fn agent(id: &str, name: &str) -> Self {
        Participant { role: "agent".into(), id: id.into(), name: Some(name.into()) }
    }
    pub fn system() -> Self {
        Participant { role: "system".into(), id: "system".into(), name: None }
    }
    /// Key used for read cursors: `visitor:ID` / `agent:ID`.
    pub fn key(&self) -> String {
        format!("{}:{}", self.role, self.id)
    }
}

/// One item of a conversation's ordered log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Dense per conversation, starting at 1.
    pub seq: u64,
    /// Client-chosen idempotency id (messages), or a server id (events).
    pub id: String,
    pub from: Participant,
    /// Hybrid logical clock: `(unix_ms << 16) | logical`.
    pub hlc: u64,
    /// Wall-clock milliseconds (the physical part of `hlc`), for display.
    pub ts: u64,
    #[serde(flatten)]
    pub body: Body,
}

/// What an entry says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    Message { text: String },
    Event { event: Event },
}

/// Conversation events recorded in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum Event {
    Opened {
        skills: Vec<String>,
    },
    Queued,
    Assigned {
        agent: String,
        agent_name: String,
    },
    Transferred {
        from_agent: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        to_agent: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        to_skill: Option<String>,
    },
    Closed {
        by: String,
    },
    Rated {
        score: u8,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        comment: Option<String>,
    },
}

/// Conversation lifecycle: `bot → queued → assigned → closed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvState {
    Bot,
    Queued,
    Assigned,
    Closed,
}

impl ConvState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConvState::Bot => "bot",
            ConvState::Queued => "queued",
            ConvState::Assigned => "assigned",
            ConvState::Closed => "closed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "bot" => ConvState::Bot,
            "queued" => ConvState::Queued,
            "assigned" => ConvState::Assigned,
            "closed" => ConvState::Closed,
            _ => return None,
        })
    }
}

/// A visitor's rating of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rating {
    pub score: u8,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub comment: Option<String>,
}

/// Stored conversation metadata (the log lives beside it, keyed by seq).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: String,
    pub visitor: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub visitor_name: Option<String>,
    pub state: ConvState,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub agent: Option<String>,
    #[serde(default)]
    pub skills: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rating: Option<Rating>,
    pub created_ms: u64,
    /// When the conversation (re-)entered the queue; orders the queue longest-waiting-first.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub queued_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub assigned_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub first_response_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub closed_ms: Option<u64>,
    /// Read cursors per participant key (`visitor:ID`), a max-register each.
    #[serde(default)]
    pub cursors: BTreeMap<String, u64>,
}

/// What clients see of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationSummary {
    pub id: String,
    pub state: ConvState,
    pub visitor: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub visitor_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub agent_name: Option<String>,
    pub skills: Vec<String>,
    pub last_seq: u64,
    pub created_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub queued_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rating: Option<Rating>,
    pub cursors: BTreeMap<String, u64>,
}

/// Agent presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    Online,
    Away,
    Offline,
}

/// A registered support agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub skills: Vec<String>,
    /// Maximum concurrent conversations (assigned + offered).
    pub capacity: u32,
    /// Admins may manage agents and canned replies over REST.
    #[serde(default)]
    pub admin: bool,
    /// Bumped to revoke every token minted before.
    #[serde(default)]
    pub token_epoch: u32,
}

/// A canned (saved) reply agents can insert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CannedReply {
    pub id: String,
    /// Short trigger, e.g. `greeting`.
    pub shortcut: String,
    pub text: String,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A hybrid logical clock: monotonic even if the wall clock steps back.
#[derive(Debug, Default)]
pub struct Hlc {
    last: u64,
}

impl Hlc {
    /// Next timestamp, strictly greater than every earlier one and than `seen`.
    pub fn tick(&mut self, wall_ms: u64) -> u64 {
        let physical = wall_ms << 16;
        self.last = if physical > self.last { physical } else { self.last + 1 };
        self.last
    }

    /// Fold in a timestamp observed elsewhere (recovery, replication).
    pub fn observe(&mut self, hlc: u64) {
        self.last = self.last.max(hlc);
    }
}

/// Random id with a prefix, e.g. `c_3f9a…` (64 bits of entropy, hex).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hlc_is_monotonic_when_wall_clock_steps_back() {
        let mut c = Hlc::default();
        let a = c.tick(1000);
        let b = c.tick(900);
        let d = c.tick(1000);
        assert!(a < b && b < d);
        assert_eq!(a >> 16, 1000);
    }

    #[test]
    fn entry_json_is_flat_with_kind() {
        let e = Entry {
            seq: 1,
            id: "m1".into(),
            from: Participant::visitor("v1", None),
            hlc: 5,
            ts: 0,
            body: Body::Message { text: "<b>hi</b>".into() },
        };
        let j = serde_json::to_string(&e).unwrap();
        assert!(j.contains(r#""kind":"message""#), "{j}");
        assert_eq!(serde_json::from_str::<Entry>(&j).unwrap(), e);
        let ev = Entry { body: Body::Event { event: Event::Closed { by: "agent:a".into() } }, ..e };
        let j = serde_json::to_string(&ev).unwrap();
        assert_eq!(serde_json::from_str::<Entry>(&j).unwrap(), ev);
    }
}
