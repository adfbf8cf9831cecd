//! The coordinator's one error type, [`Error`], and its mapping to gRPC in one place: the status
//! code and the standard gRPC rich error model (`google.rpc.Status` details in
//! `grpc-status-details-bin`).
//!
//! Every handler returns `Result<_, Error>`; the service wrappers turn an [`Error`] into a
//! [`Status`] with [`From`], which sets:
//! - the code and the message `"<field>: <what is wrong and what is allowed>"` (or the message
//!   alone when no field is at fault);
//! - `google.rpc.ErrorInfo`: a machine-readable `reason` (below), domain `longtake.v1`, and
//!   metadata `retryable` (`true` when calling again, or another replica, can help) and `field`;
//! - `google.rpc.BadRequest` with one field violation (the field path and the description) for
//!   errors that name a field (not for UNAVAILABLE);
//! - `google.rpc.RetryInfo` (1 s) for retryable errors.
//!
//! | kind | code | reason | retryable |
//! |---|---|---|---|
//! | [`Kind::InvalidField`] | INVALID_ARGUMENT | `INVALID_FIELD` | no |
//! | [`Kind::NotFound`] | NOT_FOUND | `NOT_FOUND` | no |
//! | [`Kind::IdempotencyKeyReused`] | ALREADY_EXISTS | `IDEMPOTENCY_KEY_REUSED` | no |
//! | [`Kind::StaleEpoch`] | FAILED_PRECONDITION | `STALE_EPOCH` | no |
//! | [`Kind::NotRunning`] | FAILED_PRECONDITION | `NOT_RUNNING` | no |
//! | [`Kind::NotYourTask`] | PERMISSION_DENIED | `NOT_YOUR_TASK` | no |
//! | [`Kind::Unauthenticated`] | UNAUTHENTICATED | `UNAUTHENTICATED` (no or malformed credentials) | no |
//! | [`Kind::PermissionDenied`] | PERMISSION_DENIED | `PERMISSION_DENIED` (credentials not known) | no |
//! | [`Kind::LimitReached`] | RESOURCE_EXHAUSTED | `LIMIT_REACHED` (a tenant limit; the field names it) | no |
//! | [`Kind::NotFinished`] | FAILED_PRECONDITION | `NOT_FINISHED` (delete before the render ended) | no |
//! | [`Kind::Cancelled`] | CANCELLED | `CANCELLED` | no |
//! | [`Kind::NotLeader`] | UNAVAILABLE | `NOT_LEADER` (a standby or deposed replica) | yes |
//! | [`Kind::Unavailable`] | UNAVAILABLE | `UNAVAILABLE` | yes |
//! | [`Kind::DeadlineExceeded`] | DEADLINE_EXCEEDED | `DEADLINE_EXCEEDED` | yes |

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::validate::InvalidField;

/// The `ErrorInfo.domain` of every longtake error.
pub const DOMAIN: &str = "longtake.v1";

/// What went wrong, which decides the gRPC code, the reason and whether a retry can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request field is malformed or out of range.
    InvalidField,
    /// The render, worker or task named does not exist.
    NotFound,
    /// The idempotency key was used before with another spec.
    IdempotencyKeyReused,
    /// A worker call for an assignment epoch that has been replaced.
    StaleEpoch,
    /// The render is not running (finished, failed, or not started).
    NotRunning,
    /// A worker call about a task held by another worker.
    NotYourTask,
    /// No credentials, or not in the expected form.
    Unauthenticated,
    /// Credentials this coordinator does not accept.
    PermissionDenied,
    /// A tenant limit would be exceeded; the field names the limit.
    LimitReached,
    /// The render has not finished (it cannot be deleted yet).
    NotFinished,
    /// The render was cancelled.
    Cancelled,
    /// This replica does not lead (a standby, or deposed).
    NotLeader,
    /// A dependency (the state or object store) or this server is unavailable for now.
    Unavailable,
    /// A wait (the halo exchange) ran out of time.
    DeadlineExceeded,
}

impl Kind {
    pub fn code(self) -> Code {
        match self {
            Kind::InvalidField => Code::InvalidArgument,
            Kind::NotFound => Code::NotFound,
            Kind::IdempotencyKeyReused => Code::AlreadyExists,
            Kind::StaleEpoch | Kind::NotRunning | Kind::NotFinished => Code::FailedPrecondition,
            Kind::NotYourTask | Kind::PermissionDenied => Code::PermissionDenied,
            Kind::Unauthenticated => Code::Unauthenticated,
            Kind::LimitReached => Code::ResourceExhausted,
            Kind::Cancelled => Code::Cancelled,
            Kind::NotLeader | Kind::Unavailable => Code::Unavailable,
            Kind::DeadlineExceeded => Code::DeadlineExceeded,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Kind::InvalidField => "INVALID_FIELD",
            Kind::NotFound => "NOT_FOUND",
            Kind::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Kind::StaleEpoch => "STALE_EPOCH",
            Kind::NotRunning => "NOT_RUNNING",
            Kind::NotYourTask => "NOT_YOUR_TASK",
            Kind::Unauthenticated => "UNAUTHENTICATED",
            Kind::PermissionDenied => "PERMISSION_DENIED",
            Kind::LimitReached => "LIMIT_REACHED",
            Kind::NotFinished => "NOT_FINISHED",
            Kind::Cancelled => "CANCELLED",
            Kind::NotLeader => "NOT_LEADER",
            Kind::Unavailable => "UNAVAILABLE",
            Kind::DeadlineExceeded => "DEADLINE_EXCEEDED",
        }
    }

    /// Whether calling again (later, or another replica) can help.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Kind::NotLeader | Kind::Unavailable | Kind::DeadlineExceeded
        )
    }
}

/// A coordinator error: its kind, the request field at fault (a path such as `spec.steps`), and
/// what is wrong (and what is allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: Kind,
    pub field: Option<String>,
    pub message: String,
}

impl Error {
    /// An error of `kind` about `field`.
    pub fn field(kind: Kind, field: impl Into<String>, message: impl Into<String>) -> Self {
        Error {
            kind,
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// An error of `kind` that names no field.
    pub fn plain(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            field: None,
            message: message.into(),
        }
    }

    /// INVALID_ARGUMENT about `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::field(Kind::InvalidField, field, message)
    }

    /// NOT_FOUND: `field` names nothing that exists.
    pub fn not_found(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::field(Kind::NotFound, field, message)
    }

    /// UNAVAILABLE, retryable.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::plain(Kind::Unavailable, message)
    }

    /// The server is shutting down.
    pub fn shutting_down() -> Self {
        Self::unavailable("the coordinator is shutting down")
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {}

impl From<InvalidField> for Error {
    fn from(e: InvalidField) -> Self {
        Error::invalid(e.field, e.reason)
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = e.kind.code();
        let retryable = e.kind.retryable();
        let mut metadata = HashMap::from([("retryable".to_string(), retryable.to_string())]);
        let mut details = ErrorDetails::new();
        if let Some(field) = &e.field {
            metadata.insert("field".to_string(), field.clone());
            match code {
                Code::Unavailable => {}
                Code::ResourceExhausted => {
                    details.add_quota_failure_violation(field.clone(), e.message.clone());
                }
                _ => {
                    details.add_bad_request_violation(field.clone(), e.message.clone());
                }
            }
        }
        details.set_error_info(e.kind.reason(), DOMAIN, metadata);
        if retryable {
            details.set_retry_info(Some(Duration::from_secs(1)));
        }
        Status::with_error_details(code, e.to_string(), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_reasons_and_retry() {
        let s = Status::from(Error::invalid("spec.steps", "is 0; allowed: 1..=1000"));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "spec.steps: is 0; allowed: 1..=1000");
        let d = s.get_error_details();
        let v = &d.bad_request().unwrap().field_violations[0];
        assert_eq!(v.field, "spec.steps");
        assert_eq!(v.description, "is 0; allowed: 1..=1000");
        let info = d.error_info().unwrap();
        assert_eq!(info.reason, "INVALID_FIELD");
        assert_eq!(info.domain, DOMAIN);
        assert_eq!(info.metadata["retryable"], "false");
        assert_eq!(info.metadata["field"], "spec.steps");
        assert!(d.retry_info().is_none());

        let s = Status::from(Error::plain(
            Kind::NotLeader,
            "this coordinator is a standby; the leader is at 10.0.0.1:7000",
        ));
        assert_eq!(s.code(), Code::Unavailable);
        let d = s.get_error_details();
        assert_eq!(d.error_info().unwrap().reason, "NOT_LEADER");
        assert_eq!(d.error_info().unwrap().metadata["retryable"], "true");
        assert!(d.retry_info().is_some());
        assert!(d.bad_request().is_none());

        let s = Status::from(Error::field(
            Kind::StaleEpoch,
            "epoch",
            "3 is stale; render r is at epoch 4",
        ));
        assert_eq!(s.code(), Code::FailedPrecondition);
        let d = s.get_error_details();
        assert_eq!(d.error_info().unwrap().reason, "STALE_EPOCH");
        assert_eq!(d.bad_request().unwrap().field_violations[0].field, "epoch");

        // An error that names no field has no BadRequest.
        let s = Status::from(Error::plain(Kind::NotRunning, "render r failed"));
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.get_error_details().bad_request().is_none());
        assert_eq!(
            s.get_error_details().error_info().unwrap().reason,
            "NOT_RUNNING"
        );
    }

    #[test]
    fn every_kind_has_its_own_reason() {
        let kinds = [
            Kind::InvalidField,
            Kind::NotFound,
            Kind::IdempotencyKeyReused,
            Kind::StaleEpoch,
            Kind::NotRunning,
            Kind::NotYourTask,
            Kind::Cancelled,
            Kind::NotLeader,
            Kind::Unavailable,
            Kind::DeadlineExceeded,
        ];
        let reasons: std::collections::BTreeSet<_> = kinds.iter().map(|k| k.reason()).collect();
        assert_eq!(reasons.len(), kinds.len());
        assert!(kinds.iter().all(|k| k.code() != Code::Ok));
    }
}
