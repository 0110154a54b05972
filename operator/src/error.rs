//! The operator's error type. Each variant maps to a bounded `kind` label for metrics.

/// Everything reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or could not be reached.
    #[error("kubernetes api: {0}")]
    Kube(#[source] kube::Error),
    /// The finalizer helper failed (wraps the apply/cleanup error).
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The KefuCluster asks for something the operator refuses to render.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// A rendered object could not be serialized.
    #[error("serialize: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The object has no namespace or name (cluster-scoped copies, bad cache entries).
    #[error("object has no {0}")]
    MissingMetadata(&'static str),
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

impl Error {
    /// A bounded label for metrics (never the message).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Serialize(_) => "serialize",
            Error::MissingMetadata(_) => "missing_metadata",
        }
    }
}

/// Result with the operator's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
