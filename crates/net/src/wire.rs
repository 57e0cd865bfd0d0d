//! The parts of the wire contract that are not messages: metadata keys and
//! the structured detail attached to error statuses.

use fleet_core::deploy::ErrorClass;
use fleet_proto::{ErrorCode, ErrorDetail};
use prost::Message;
use tonic::{Code, Status};

/// A follower answers `UNAVAILABLE` with the leader's address under this
/// metadata key; clients and nodes follow it.
pub const LEADER_METADATA: &str = "fleet-leader";

/// An error status carrying a machine-readable `code`.
pub fn status_with(code: Code, message: impl Into<String>, detail: ErrorCode) -> Status {
    let bytes = ErrorDetail { code: detail as i32 }.encode_to_vec();
    Status::with_details(code, message, bytes.into())
}

/// The destination is busy and its queue policy is `reject`.
pub fn rejected(message: impl Into<String>) -> Status {
    status_with(Code::FailedPrecondition, message, ErrorCode::Rejected)
}

/// Longest error message sent on the wire. An error travels in a header
/// (`grpc-message`), and one over HTTP/2's header list limit reaches the
/// client as a protocol error instead of the refusal it was.
pub const MAX_MESSAGE_LEN: usize = 2048;

/// The same status with its message cut to [`MAX_MESSAGE_LEN`] (at a
/// character boundary, saying so); code, details and metadata are kept.
pub fn bounded(status: Status) -> Status {
    let message = status.message();
    if message.len() <= MAX_MESSAGE_LEN {
        return status;
    }
    let mut cut = MAX_MESSAGE_LEN - 40;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let short = format!("{}… (message cut, {} bytes in all)", &message[..cut], message.len());
    let mut out = Status::with_details(status.code(), short, status.details().to_vec().into());
    *out.metadata_mut() = status.metadata().clone();
    out
}

/// The structured code of an error status, if it carries one this version knows.
pub fn detail_of(status: &Status) -> Option<ErrorCode> {
    if status.details().is_empty() {
        return None;
    }
    let detail = ErrorDetail::decode(status.details()).ok()?;
    ErrorCode::try_from(detail.code).ok().filter(|c| *c != ErrorCode::Unspecified)
}

/// The wire form of an error class.
pub fn class_to_wire(class: ErrorClass) -> fleet_proto::ErrorClass {
    use fleet_proto::ErrorClass as W;
    match class {
        ErrorClass::Transient => W::Transient,
        ErrorClass::Auth => W::Auth,
        ErrorClass::Resource => W::Resource,
        ErrorClass::Invalid => W::Invalid,
        ErrorClass::Aborted => W::Aborted,
    }
}

/// An error class read off the wire. Unset or unknown values are errors,
/// never silently some class: a newer node must not be misread.
pub fn class_from_wire(value: i32) -> Result<ErrorClass, UnknownClass> {
    use fleet_proto::ErrorClass as W;
    match W::try_from(value) {
        Ok(W::Transient) => Ok(ErrorClass::Transient),
        Ok(W::Auth) => Ok(ErrorClass::Auth),
        Ok(W::Resource) => Ok(ErrorClass::Resource),
        Ok(W::Invalid) => Ok(ErrorClass::Invalid),
        Ok(W::Aborted) => Ok(ErrorClass::Aborted),
        Ok(W::Unspecified) | Err(_) => Err(UnknownClass(value)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("error class {0} is unset or unknown to this coordinator; upgrade the coordinators before the nodes")]
pub struct UnknownClass(pub i32);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_round_trips_and_unknown_values_are_errors() {
        for c in [ErrorClass::Transient, ErrorClass::Auth, ErrorClass::Resource, ErrorClass::Invalid, ErrorClass::Aborted] {
            assert_eq!(class_from_wire(class_to_wire(c) as i32), Ok(c));
        }
        assert_eq!(class_from_wire(0), Err(UnknownClass(0)));
        assert_eq!(class_from_wire(99), Err(UnknownClass(99)));
    }

    #[test]
    fn long_messages_are_cut_and_keep_their_code_and_detail() {
        let s = bounded(rejected("é".repeat(40_000)));
        assert!(s.message().len() <= MAX_MESSAGE_LEN, "{}", s.message().len());
        assert!(s.message().ends_with("(message cut, 80000 bytes in all)"), "{}", s.message());
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(detail_of(&s), Some(ErrorCode::Rejected));
        let short = bounded(Status::not_found("no deployment `d1`"));
        assert_eq!(short.message(), "no deployment `d1`");
    }

    #[test]
    fn rejected_is_recognised_by_its_detail_not_its_message() {
        let s = rejected("destination web is busy");
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(detail_of(&s), Some(ErrorCode::Rejected));
        // A message that merely looks like one is not a rejection.
        assert_eq!(detail_of(&Status::failed_precondition("rejected: no")), None);
        // Garbage details are ignored, not a panic.
        let junk = Status::with_details(Code::FailedPrecondition, "x", vec![0xff, 0xff, 0xff].into());
        assert_eq!(detail_of(&junk), None);
    }
}
