//! The one place errors become gRPC statuses.
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::engine::{EngineError, QueueError};
use crate::validation::ValidationError;

/// Everything a request can fail with, across layers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Validation(#[from] ValidationError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the request's deadline passed")]
    Deadline,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the model is still loading; retry shortly")]
    Loading,
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The client stopped reading its stream.
    #[error("{0}")]
    Stalled(String),
}

impl Error {
    /// Short, stable name of the error kind (a metrics label).
    pub fn error_type(&self) -> &'static str {
        match self {
            Error::Validation(_) => "validation",
            Error::Queue(QueueError::Full { .. }) => "overloaded",
            Error::Queue(QueueError::DuplicateId(_)) => "validation",
            Error::Queue(QueueError::Stopped) | Error::ShuttingDown | Error::Loading => "unavailable",
            Error::Engine(EngineError::Constraint(_)) => "validation",
            Error::Engine(_) => "internal",
            Error::Deadline => "deadline",
            Error::Auth(AuthError::Unauthenticated) => "unauthenticated",
            Error::Auth(_) => "rate_limited",
            Error::Stalled(_) => "stalled",
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Error::Validation(_) => Code::InvalidArgument,
            Error::Queue(QueueError::Full { .. }) => Code::ResourceExhausted,
            Error::Queue(QueueError::DuplicateId(_)) => Code::AlreadyExists,
            Error::Queue(QueueError::Stopped) | Error::ShuttingDown | Error::Loading => Code::Unavailable,
            Error::Engine(EngineError::Constraint(_)) => Code::InvalidArgument,
            Error::Engine(_) => Code::Internal,
            Error::Deadline => Code::DeadlineExceeded,
            Error::Auth(AuthError::Unauthenticated) => Code::Unauthenticated,
            Error::Auth(_) | Error::Stalled(_) => Code::ResourceExhausted,
        }
    }
}

impl From<Error> for Status {
    /// Validation errors carry `google.rpc.BadRequest` field violations;
    /// overload and unavailability carry `google.rpc.RetryInfo`.
    fn from(e: Error) -> Self {
        let (code, message) = (e.code(), e.to_string());
        let details = match &e {
            Error::Validation(ValidationError::Invalid { field, message }) => {
                ErrorDetails::with_bad_request_violation(*field, message.clone())
            }
            Error::Validation(ValidationError::Tokenizer(reason)) => {
                ErrorDetails::with_bad_request_violation("prompt", reason.clone())
            }
            Error::Engine(EngineError::Constraint(reason)) => {
                ErrorDetails::with_bad_request_violation("decoding.constraint", reason.clone())
            }
            Error::Queue(QueueError::DuplicateId(id)) => {
                ErrorDetails::with_bad_request_violation("request_id", format!("{id:?} is already in flight"))
            }
            Error::Queue(QueueError::Full { .. }) => ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
            Error::Loading | Error::ShuttingDown | Error::Queue(QueueError::Stopped) => {
                ErrorDetails::with_retry_info(Some(Duration::from_secs(5)))
            }
            Error::Auth(e) => match e.retry_after() {
                Some(after) => ErrorDetails::with_retry_info(Some(after)),
                None => return Status::new(code, message),
            },
            Error::Engine(_) | Error::Deadline | Error::Stalled(_) => return Status::new(code, message),
        };
        Status::with_error_details(code, message, details)
    }
}

/// Why a call was refused by the key check.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum AuthError {
    /// No key, a malformed header or an unknown key: the same answer for all
    /// three, so that a caller learns nothing about which keys exist.
    #[error("a valid API key is required (metadata `authorization: Bearer <key>`)")]
    Unauthenticated,
    #[error("API key {name:?} has {limit} requests in flight, its concurrency limit")]
    Concurrency { name: String, limit: u32 },
    #[error(
        "API key {name:?} is over its limit of {limit} tokens per minute: this request needs {cost} (prompt + max_new_tokens × sequences), {available} are available now"
    )]
    Rate { name: String, limit: u64, cost: u64, available: u64, retry_after: Duration },
    #[error(
        "API key {name:?} may use {limit} tokens per minute; this request needs {cost} (prompt + max_new_tokens × sequences) and can never fit"
    )]
    TooLarge { name: String, limit: u64, cost: u64 },
}

impl AuthError {
    /// How long to wait before retrying, when waiting helps.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AuthError::Concurrency { .. } => Some(Duration::from_secs(1)),
            AuthError::Rate { retry_after, .. } => Some(*retry_after),
            AuthError::Unauthenticated | AuthError::TooLarge { .. } => None,
        }
    }
}
