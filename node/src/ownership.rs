//! Which node owns a conversation (the single writer that assigns its `seq`).
//!
//! A single node owns everything; the cluster replaces [`LocalOwnership`] with consistent hashing over
//! the ready members, and the engine already asks before every conversation write.

/// Where a conversation's writer lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    Local,
    /// Another node, by node id.
    Remote(String),
}

/// Resolves conversation ownership.
pub trait Ownership: Send + Sync + std::fmt::Debug {
    fn owner_of(&self, conv: &str) -> Owner;
}

/// Every conversation is owned here.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalOwnership;

impl Ownership for LocalOwnership {
    fn owner_of(&self, _conv: &str) -> Owner {
        Owner::Local
    }
}
