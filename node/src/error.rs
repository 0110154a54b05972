//! The node library's error type. Protocol-facing failures are [`crate::protocol::ErrorCode`]s;
//! this type is for start-up, storage and I/O failures.

/// Errors of the node library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid; the message names the field.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The data directory is locked by another running node.
    #[error(
        "the store in {0} is in use by another kefu-node process; stop it first (or use the REST API of the running node)"
    )]
    StoreLocked(String),
    /// The embedded store failed.
    #[error("store error: {0}")]
    Store(String),
    /// A stored record could not be decoded.
    #[error("corrupt record in {table}: {reason}")]
    Corrupt { table: &'static str, reason: String },
    /// An I/O operation failed.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A token could not be verified.
    #[error("token: {0}")]
    Token(&'static str),
    /// The node is shutting down and takes no more work.
    #[error("node is shutting down")]
    ShuttingDown,
    /// A lookup found nothing.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request is invalid.
    #[error("invalid: {0}")]
    Invalid(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

macro_rules! store_err {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self { Error::Store(e.to_string()) }
        }
    )*};
}
store_err!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

/// Result with the node's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
