//! The coordinator's errors in the standard gRPC rich error model (`google.rpc.Status` details
//! in `grpc-status-details-bin`), attached in one place to every error a handler returns.
//!
//! Handlers write errors as `Status::<code>("<field>: <what is wrong and what is allowed>")`.
//! [`enrich`] adds:
//! - `google.rpc.ErrorInfo`: a machine-readable `reason` (below), domain `longtake.v1`, and
//!   metadata `retryable` (`true` when calling again, or another replica, can help) and `field`.
//! - `google.rpc.BadRequest` with one field violation (the field path and the description) for
//!   errors that name a field.
//! - `google.rpc.RetryInfo` (1 s) for retryable errors.
//!
//! | code | reason | retryable |
//! |---|---|---|
//! | INVALID_ARGUMENT | `INVALID_FIELD` | no |
//! | NOT_FOUND | `NOT_FOUND` | no |
//! | ALREADY_EXISTS | `IDEMPOTENCY_KEY_REUSED` | no |
//! | FAILED_PRECONDITION | `STALE_EPOCH` (a stale assignment) or `NOT_RUNNING` | no |
//! | PERMISSION_DENIED | `NOT_YOUR_TASK` | no |
//! | CANCELLED | `CANCELLED` | no |
//! | UNAVAILABLE | `NOT_LEADER` (a standby or deposed replica) or `UNAVAILABLE` | yes |
//! | DEADLINE_EXCEEDED | `DEADLINE_EXCEEDED` | yes |
//! | other | `INTERNAL` | no |

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every longtake error.
pub const DOMAIN: &str = "longtake.v1";

/// The field an error message names (`"spec.steps: ..."` → `spec.steps`), if it starts with a
/// field path.
fn field_of(message: &str) -> Option<(&str, &str)> {
    let (field, rest) = message.split_once(": ")?;
    let path = !field.is_empty()
        && field
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_./[]".contains(c));
    path.then_some((field, rest))
}

/// The reason and whether a retry can help, for an error.
pub fn classify(code: Code, message: &str) -> (&'static str, bool) {
    match code {
        Code::InvalidArgument => ("INVALID_FIELD", false),
        Code::NotFound => ("NOT_FOUND", false),
        Code::AlreadyExists => ("IDEMPOTENCY_KEY_REUSED", false),
        Code::FailedPrecondition if message.contains("is stale") => ("STALE_EPOCH", false),
        Code::FailedPrecondition => ("NOT_RUNNING", false),
        Code::PermissionDenied => ("NOT_YOUR_TASK", false),
        Code::Cancelled => ("CANCELLED", false),
        Code::Unavailable if message.contains("standby") || message.contains("deposed") => {
            ("NOT_LEADER", true)
        }
        Code::Unavailable => ("UNAVAILABLE", true),
        Code::DeadlineExceeded => ("DEADLINE_EXCEEDED", true),
        _ => ("INTERNAL", false),
    }
}

/// `status` with the rich error details attached (unchanged if it already has details).
pub fn enrich(status: Status) -> Status {
    if !status.details().is_empty() {
        return status;
    }
    let code = status.code();
    let message = status.message().to_string();
    let (reason, retryable) = classify(code, &message);
    let mut metadata = HashMap::from([("retryable".to_string(), retryable.to_string())]);
    let mut details = ErrorDetails::new();
    if let Some((field, description)) = field_of(&message) {
        metadata.insert("field".to_string(), field.to_string());
        if code != Code::Unavailable {
            details.add_bad_request_violation(field, description);
        }
    }
    details.set_error_info(reason, DOMAIN, metadata);
    if retryable {
        details.set_retry_info(Some(Duration::from_secs(1)));
    }
    Status::with_error_details(code, message, details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_reasons_and_retry() {
        let s = enrich(Status::invalid_argument(
            "spec.steps: is 0; allowed: 1..=1000",
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        let d = s.get_error_details();
        let v = &d.bad_request().unwrap().field_violations[0];
        assert_eq!(v.field, "spec.steps");
        assert_eq!(v.description, "is 0; allowed: 1..=1000");
        let info = d.error_info().unwrap();
        assert_eq!(info.reason, "INVALID_FIELD");
        assert_eq!(info.domain, DOMAIN);
        assert_eq!(info.metadata["retryable"], "false");
        assert!(d.retry_info().is_none());

        let s = enrich(Status::unavailable(
            "this coordinator is a standby; the leader is at 10.0.0.1:7000",
        ));
        let d = s.get_error_details();
        assert_eq!(d.error_info().unwrap().reason, "NOT_LEADER");
        assert_eq!(d.error_info().unwrap().metadata["retryable"], "true");
        assert!(d.retry_info().is_some());
        assert!(d.bad_request().is_none());

        let s = enrich(Status::failed_precondition(
            "epoch: 3 is stale; render r is at epoch 4",
        ));
        let d = s.get_error_details();
        assert_eq!(d.error_info().unwrap().reason, "STALE_EPOCH");
        assert_eq!(d.bad_request().unwrap().field_violations[0].field, "epoch");

        // A message that does not start with a field names none.
        let s = enrich(Status::not_found("no such thing"));
        assert!(s.get_error_details().bad_request().is_none());
        // Already enriched: unchanged.
        let again = enrich(s.clone());
        assert_eq!(again.details(), s.details());
    }
}
